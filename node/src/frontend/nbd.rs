//! The NBD export: fixed-newstyle negotiation (LIST, INFO, GO, EXPORT_NAME,
//! ABORT) and simple replies for READ, WRITE (with FUA), FLUSH, TRIM and
//! WRITE_ZEROES, over a unix socket and optionally TCP. The export name is
//! the volume name.
//!
//! Every byte from the socket is hostile: lengths are bounded before any
//! buffer is sized, ranges are checked by the engine, a malformed request
//! closes the connection, and nothing here can panic on input. Connections
//! run on their own threads (blocking I/O, one request at a time per
//! connection) and are bounded in number.

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use cairn_proto::nbd::*;

use crate::engine::{Engine, EngineError};
use crate::sys::AlignedBuf;

const MAX_CONNECTIONS: usize = 64;

type Closer = Box<dyn Fn() + Send>;

/// An opened export. Dropping it releases whatever the provider holds for it
/// (the writer registration, the engine reference).
pub struct Export {
    pub engine: Arc<Engine>,
    pub read_only: bool,
    pub _release: Box<dyn Send>,
}

/// What the NBD server needs from the volume manager.
pub trait ExportProvider: Send + Sync {
    fn export_names(&self) -> Vec<String>;
    fn open_export(&self, name: &str) -> Result<Export, String>;
}

trait Conn: Read + Write + Send + Sized + 'static {
    fn shutdown_handle(&self) -> io::Result<Box<dyn Fn() + Send>>;
    fn try_clone_conn(&self) -> io::Result<Self>;
}
impl Conn for UnixStream {
    fn try_clone_conn(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn shutdown_handle(&self) -> io::Result<Box<dyn Fn() + Send>> {
        let c = self.try_clone()?;
        Ok(Box::new(move || {
            let _ = c.shutdown(Shutdown::Both);
        }))
    }
}
impl Conn for TcpStream {
    fn try_clone_conn(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn shutdown_handle(&self) -> io::Result<Box<dyn Fn() + Send>> {
        let c = self.try_clone()?;
        Ok(Box::new(move || {
            let _ = c.shutdown(Shutdown::Both);
        }))
    }
}

struct Shared {
    provider: Arc<dyn ExportProvider>,
    stopping: AtomicBool,
    active: AtomicUsize,
    /// Open connections and how to close each (at shutdown).
    conns: Mutex<Vec<(u64, Closer)>>,
    next_id: std::sync::atomic::AtomicU64,
}

pub struct NbdServer {
    shared: Arc<Shared>,
    /// Kept so `stop` can wake the accept threads with shutdown(2).
    listeners: Vec<Arc<dyn AsRawFd + Send + Sync>>,
    threads: Vec<JoinHandle<()>>,
    socket_path: PathBuf,
}

impl NbdServer {
    pub fn start(
        provider: Arc<dyn ExportProvider>,
        socket: &Path,
        tcp: Option<&str>,
    ) -> io::Result<NbdServer> {
        let shared = Arc::new(Shared {
            provider,
            stopping: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            conns: Mutex::new(Vec::new()),
            next_id: Default::default(),
        });
        if let Some(parent) = socket.parent() {
            std::fs::create_dir_all(parent)?;
        }
        match std::fs::remove_file(socket) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut listeners: Vec<Arc<dyn AsRawFd + Send + Sync>> = Vec::new();
        let mut threads = Vec::new();
        let unix = Arc::new(UnixListener::bind(socket)?);
        listeners.push(unix.clone());
        threads.push(spawn_acceptor("nbd-unix", &shared, move || {
            unix.accept().map(|(s, _)| s)
        })?);
        if let Some(addr) = tcp {
            let l = Arc::new(TcpListener::bind(addr)?);
            listeners.push(l.clone());
            threads.push(spawn_acceptor("nbd-tcp", &shared, move || {
                l.accept().map(|(s, _)| {
                    let _ = s.set_nodelay(true);
                    s
                })
            })?);
        }
        Ok(NbdServer {
            shared,
            listeners,
            threads,
            socket_path: socket.to_path_buf(),
        })
    }

    /// Stops accepting, closes every connection and waits for the threads.
    pub fn stop(self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        for l in &self.listeners {
            // SAFETY: shutdown(2) on a listening socket we still own (the
            // Arc keeps it open); it only wakes the blocked accept.
            unsafe { libc::shutdown(l.as_raw_fd(), libc::SHUT_RDWR) };
        }
        for (_, close) in self.shared.conns.lock().expect("conns").iter() {
            close();
        }
        for t in self.threads {
            let _ = t.join();
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while self.shared.active.load(Ordering::SeqCst) > 0 && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let _ = std::fs::remove_file(&self.socket_path);
    }
}

fn spawn_acceptor<C: Conn>(
    name: &str,
    shared: &Arc<Shared>,
    accept: impl Fn() -> io::Result<C> + Send + 'static,
) -> io::Result<JoinHandle<()>> {
    let sh = shared.clone();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || accept_loop(&sh, accept))
}

fn accept_loop<C: Conn>(shared: &Arc<Shared>, accept: impl Fn() -> io::Result<C>) {
    loop {
        let stream = accept();
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "NBD accept failed");
                continue;
            }
        };
        if shared.active.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
            tracing::warn!("NBD connection refused: {MAX_CONNECTIONS} connections already open");
            continue;
        }
        let Ok(close) = stream.shutdown_handle() else {
            continue;
        };
        let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
        shared.conns.lock().expect("conns").push((id, close));
        shared.active.fetch_add(1, Ordering::SeqCst);
        let sh = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("nbd-conn".into())
            .spawn(move || {
                if let Err(e) = serve(stream, sh.provider.as_ref()) {
                    tracing::debug!(error = %e, "NBD connection ended");
                }
                sh.conns.lock().expect("conns").retain(|(i, _)| *i != id);
                sh.active.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            shared
                .conns
                .lock()
                .expect("conns")
                .retain(|(i, _)| *i != id);
            shared.active.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

struct Wire<C: Conn> {
    r: BufReader<C>,
    w: BufWriter<C>,
}

impl<C: Conn> Wire<C> {
    fn u32(&mut self) -> io::Result<u32> {
        let mut b = [0u8; 4];
        self.r.read_exact(&mut b)?;
        Ok(u32::from_be_bytes(b))
    }
    fn u64(&mut self) -> io::Result<u64> {
        let mut b = [0u8; 8];
        self.r.read_exact(&mut b)?;
        Ok(u64::from_be_bytes(b))
    }
    fn opt_reply(&mut self, opt: u32, kind: u32, data: &[u8]) -> io::Result<()> {
        self.w.write_all(&OPT_REPLY_MAGIC.to_be_bytes())?;
        self.w.write_all(&opt.to_be_bytes())?;
        self.w.write_all(&kind.to_be_bytes())?;
        self.w.write_all(&(data.len() as u32).to_be_bytes())?;
        self.w.write_all(data)?;
        self.w.flush()
    }
    fn simple_reply(&mut self, cookie: u64, error: u32, data: &[u8]) -> io::Result<()> {
        self.w.write_all(&SIMPLE_REPLY_MAGIC.to_be_bytes())?;
        self.w.write_all(&error.to_be_bytes())?;
        self.w.write_all(&cookie.to_be_bytes())?;
        self.w.write_all(data)?;
        self.w.flush()
    }
}

fn transmission_flags(read_only: bool) -> u16 {
    let mut f = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA;
    if read_only {
        f |= TFLAG_READ_ONLY;
    } else {
        f |= TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES;
    }
    f
}

/// Parses the payload of INFO/GO: name and the list of requested info types.
fn parse_info_request(data: &[u8]) -> Option<(String, Vec<u16>)> {
    let nlen = u32::from_be_bytes(data.get(0..4)?.try_into().ok()?) as usize;
    let name = std::str::from_utf8(data.get(4..4usize.checked_add(nlen)?)?)
        .ok()?
        .to_string();
    let rest = data.get(4 + nlen..)?;
    let n = u16::from_be_bytes(rest.get(0..2)?.try_into().ok()?) as usize;
    if rest.len() != 2 + 2 * n {
        return None;
    }
    let reqs = (0..n)
        .map(|i| u16::from_be_bytes([rest[2 + 2 * i], rest[3 + 2 * i]]))
        .collect();
    Some((name, reqs))
}

fn serve<C: Conn>(stream: C, provider: &dyn ExportProvider) -> io::Result<()> {
    let w = stream.try_clone_conn()?;
    let mut c = Wire {
        r: BufReader::new(stream),
        w: BufWriter::with_capacity(64 << 10, w),
    };
    c.w.write_all(&NBDMAGIC.to_be_bytes())?;
    c.w.write_all(&IHAVEOPT.to_be_bytes())?;
    c.w.write_all(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes())?;
    c.w.flush()?;
    let cflags = c.u32()?;
    if cflags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(bad("unknown client flags"));
    }
    let no_zeroes = cflags & FLAG_C_NO_ZEROES != 0;
    let export = loop {
        if c.u64()? != IHAVEOPT {
            return Err(bad("bad option magic"));
        }
        let opt = c.u32()?;
        let len = c.u32()?;
        if len > MAX_OPTION_LEN {
            return Err(bad("option too long"));
        }
        let mut data = vec![0u8; len as usize];
        c.r.read_exact(&mut data)?;
        match opt {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                // No way to report an error here but closing.
                let export = provider.open_export(&name).map_err(|e| bad(&e))?;
                c.w.write_all(&export.engine.size().to_be_bytes())?;
                c.w.write_all(&transmission_flags(export.read_only).to_be_bytes())?;
                if !no_zeroes {
                    c.w.write_all(&[0u8; 124])?;
                }
                c.w.flush()?;
                break export;
            }
            OPT_ABORT => {
                let _ = c.opt_reply(opt, REP_ACK, &[]);
                return Ok(());
            }
            OPT_LIST => {
                if !data.is_empty() {
                    c.opt_reply(opt, REP_ERR_INVALID, b"LIST takes no data")?;
                    continue;
                }
                for name in provider.export_names() {
                    let mut d = (name.len() as u32).to_be_bytes().to_vec();
                    d.extend_from_slice(name.as_bytes());
                    c.opt_reply(opt, REP_SERVER, &d)?;
                }
                c.opt_reply(opt, REP_ACK, &[])?;
            }
            OPT_INFO | OPT_GO => {
                let Some((name, reqs)) = parse_info_request(&data) else {
                    c.opt_reply(opt, REP_ERR_INVALID, b"malformed INFO/GO request")?;
                    continue;
                };
                let export = match provider.open_export(&name) {
                    Ok(e) => e,
                    Err(msg) => {
                        let kind = if msg.contains("not found") {
                            REP_ERR_UNKNOWN
                        } else {
                            REP_ERR_POLICY
                        };
                        c.opt_reply(opt, kind, msg.as_bytes())?;
                        continue;
                    }
                };
                let mut d = INFO_EXPORT.to_be_bytes().to_vec();
                d.extend_from_slice(&export.engine.size().to_be_bytes());
                d.extend_from_slice(&transmission_flags(export.read_only).to_be_bytes());
                c.opt_reply(opt, REP_INFO, &d)?;
                if reqs.contains(&INFO_NAME) {
                    let mut d = INFO_NAME.to_be_bytes().to_vec();
                    d.extend_from_slice(name.as_bytes());
                    c.opt_reply(opt, REP_INFO, &d)?;
                }
                if reqs.contains(&INFO_BLOCK_SIZE) {
                    let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                    d.extend_from_slice(&1u32.to_be_bytes());
                    d.extend_from_slice(&4096u32.to_be_bytes());
                    d.extend_from_slice(&MAX_REQUEST_LEN.to_be_bytes());
                    c.opt_reply(opt, REP_INFO, &d)?;
                }
                c.opt_reply(opt, REP_ACK, &[])?;
                if opt == OPT_GO {
                    break export;
                }
            }
            _ => c.opt_reply(opt, REP_ERR_UNSUP, b"option not supported")?,
        }
    };
    transmit(&mut c, &export)
}

fn errno_to_nbd(errno: i32) -> u32 {
    match errno {
        libc::EPERM | libc::EROFS => EPERM,
        libc::EINVAL => EINVAL,
        libc::ENOSPC => ENOSPC,
        libc::EOPNOTSUPP => ENOTSUP,
        _ => EIO,
    }
}

/// Runs a modifying command and returns the NBD error (0 for success): refused
/// on a read-only export, followed by a flush when the client asked for FUA.
fn modify(export: &Export, flags: u16, op: impl FnOnce() -> Result<(), EngineError>) -> u32 {
    if export.read_only {
        return EPERM;
    }
    let r = op().and_then(|_| {
        if flags & CMD_FLAG_FUA != 0 {
            export.engine.flush()
        } else {
            Ok(())
        }
    });
    r.map_or_else(|e| errno_to_nbd(e.errno()), |_| 0)
}

fn transmit<C: Conn>(c: &mut Wire<C>, export: &Export) -> io::Result<()> {
    let engine = &export.engine;
    let mut buf = AlignedBuf::new(1 << 20, 4096);
    loop {
        let mut hdr = [0u8; 28];
        c.r.read_exact(&mut hdr)?;
        let magic = u32::from_be_bytes(hdr[0..4].try_into().expect("4"));
        if magic != REQUEST_MAGIC {
            return Err(bad("bad request magic"));
        }
        let flags = u16::from_be_bytes(hdr[4..6].try_into().expect("2"));
        let kind = u16::from_be_bytes(hdr[6..8].try_into().expect("2"));
        let cookie = u64::from_be_bytes(hdr[8..16].try_into().expect("8"));
        let offset = u64::from_be_bytes(hdr[16..24].try_into().expect("8"));
        let len = u32::from_be_bytes(hdr[24..28].try_into().expect("4"));
        match kind {
            CMD_READ => {
                if len > MAX_REQUEST_LEN {
                    c.simple_reply(cookie, EINVAL, &[])?;
                    continue;
                }
                if buf.as_slice().len() < len as usize {
                    buf = AlignedBuf::new(len as usize, 4096);
                }
                let dst = &mut buf.as_mut_slice()[..len as usize];
                match engine.read(offset, dst) {
                    Ok(()) => c.simple_reply(cookie, 0, dst)?,
                    Err(e) => c.simple_reply(cookie, errno_to_nbd(e.errno()), &[])?,
                }
            }
            CMD_WRITE => {
                if len > MAX_REQUEST_LEN {
                    // The payload cannot be skipped safely: end the connection.
                    return Err(bad("write larger than the advertised maximum"));
                }
                if buf.as_slice().len() < len as usize {
                    buf = AlignedBuf::new(len as usize, 4096);
                }
                let src = &mut buf.as_mut_slice()[..len as usize];
                c.r.read_exact(src)?;
                let err = modify(export, flags, || engine.write(offset, src));
                c.simple_reply(cookie, err, &[])?;
            }
            CMD_FLUSH => {
                let r = engine.flush().map_err(|e| errno_to_nbd(e.errno()));
                c.simple_reply(cookie, r.err().unwrap_or(0), &[])?;
            }
            CMD_TRIM | CMD_WRITE_ZEROES => {
                let err = modify(export, flags, || engine.zero_range(offset, len as u64));
                c.simple_reply(cookie, err, &[])?;
            }
            CMD_DISC => return Ok(()),
            _ => c.simple_reply(cookie, EINVAL, &[])?,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_request_parsing_is_bounded() {
        let mut d = 3u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"vol");
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        assert_eq!(
            parse_info_request(&d),
            Some(("vol".into(), vec![INFO_BLOCK_SIZE]))
        );
        assert_eq!(parse_info_request(&d[..d.len() - 1]), None);
        let mut huge = u32::MAX.to_be_bytes().to_vec();
        huge.extend_from_slice(b"x");
        assert_eq!(parse_info_request(&huge), None);
        assert_eq!(parse_info_request(&[]), None);
    }
}
