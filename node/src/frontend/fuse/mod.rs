//! The FUSE file server: one FUSE mount per daemon whose root directory holds
//! one file per attached volume (named by volume id). A loop device binds to
//! that file with direct I/O, which makes the volume a kernel block device.
//!
//! Built for the job (see DESIGN.md, "What makes the FUSE-loop path fast"):
//! - `FUSE_ASYNC_DIO` so the loop device's requests arrive concurrently;
//! - many session threads, each on its own cloned `/dev/fuse` fd, doing the
//!   engine I/O inline (no hand-off to a worker pool);
//! - files opened with `FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES`;
//! - requests of up to 1 MiB, read into a per-thread buffer positioned so a
//!   WRITE payload lands 4 KiB-aligned: it goes to the `O_DIRECT` pool
//!   without a copy, and nothing is allocated per request.
//!
//! Teardown order (written down here, followed by the volume manager): detach
//! the loop device, remove the file, and only at daemon shutdown unmount FUSE.
//! A daemon that stops while volumes are still in use does not unmount: it
//! hands the connection to the holder ([`FuseServer::hand_off`]).
//!
//! Crashes ([`holder`]): every fd the session threads read requests from is
//! also held by the FUSE holder process, so a daemon crash ends no request.
//! A restarted daemon takes the fds over, marks the files it will serve
//! again as *expected*, and only then starts its threads and asks the
//! kernel to resend: a request for an expected file waits until the
//! volume's engine is ready ([`FuseServer::add`]) instead of being answered
//! with an error caused by the daemon's own start-up.

mod abi;
mod handoff;
pub mod holder;

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use abi::*;

use crate::engine::Engine;
use crate::sys::{self, AlignedBuf};

/// Largest READ/WRITE payload we negotiate.
const MAX_IO: usize = 1 << 20;
/// Requests are read at this offset into the thread buffer: the in-header
/// and `fuse_write_in` take 80 bytes, so a WRITE payload starts at 4096.
const HDR_OFF: usize = 4096 - IN_HEADER_LEN - WRITE_IN_LEN;
const DATA_OFF: usize = 4096;
const BUF_LEN: usize = DATA_OFF + MAX_IO + 8192;

const FUSE_DEV_IOC_CLONE: libc::c_ulong = 0x8004_E500;

struct Served {
    name: String,
    engine: Arc<Engine>,
}

#[derive(Default)]
struct Files {
    /// Files being served.
    by_ino: HashMap<u64, Arc<Served>>,
    /// Every name ever served on this mount and its inode number.
    inos: HashMap<String, u64>,
    /// Inodes of files a restarted daemon will serve again once their
    /// engines are ready, with the time their requests stop waiting.
    expected: HashMap<u64, std::time::Instant>,
}

/// The served files, and a signal for requests waiting on expected ones.
#[derive(Default)]
struct Table {
    files: RwLock<Files>,
    changed: Mutex<()>,
    ready: Condvar,
    /// Set by [`FuseServer::hand_off`]: session threads return at their
    /// next read instead of serving another request.
    stopping: std::sync::atomic::AtomicBool,
}

impl Table {
    fn notify(&self) {
        let _g = self.changed.lock().expect("table signal");
        self.ready.notify_all();
    }

    /// The file `ino`, waiting while it is expected.
    fn served(&self, ino: u64) -> Option<Arc<Served>> {
        loop {
            let f = self.files.read().expect("files lock");
            if let Some(s) = f.by_ino.get(&ino) {
                return Some(s.clone());
            }
            match f.expected.get(&ino) {
                Some(until) if std::time::Instant::now() < *until => {}
                _ => return None,
            }
            drop(f);
            self.wait();
        }
    }

    /// Waits for a change (bounded, so a missed signal only delays).
    fn wait(&self) {
        let g = self.changed.lock().expect("table signal");
        let _ = self
            .ready
            .wait_timeout(g, Duration::from_millis(200))
            .expect("table signal");
    }
}

pub struct FuseServer {
    mountpoint: PathBuf,
    table: Arc<Table>,
    threads: Vec<JoinHandle<()>>,
    /// The session fds until the session threads start (the first is the
    /// one the mount was made with); the holder holds each of them too.
    fds: Vec<File>,
    /// Open while this daemon serves: the holder's sign that it lives.
    _lease: Option<UnixStream>,
    /// On kernels without FUSE resend: the held mount fd, never read.
    _anchor: Option<File>,
}

/// Whether the kernel requeues unanswered requests on `FUSE_NOTIFY_RESEND`
/// (Linux 6.9).
fn resend_supported() -> bool {
    sys::kernel_version().is_some_and(|v| v >= (6, 9))
}

/// A file's inode number, derived from its name so that it is the same for
/// every daemon that serves this mount (a restarted daemon takes over the
/// kernel's view, dentries and open files included). Never 1 (the root).
fn ino_of(name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h >> 1) | 2
}

impl FuseServer {
    /// Mounts an empty FUSE directory at `mountpoint`, opens `threads`
    /// session fds on the connection, gives every one of them to a holder
    /// process listening on `holder` (so the connection and every request
    /// it hands out survive a daemon crash), and starts serving.
    pub fn mount(
        mountpoint: &Path,
        threads: usize,
        holder: &Path,
        orphan_timeout: Duration,
    ) -> io::Result<FuseServer> {
        std::fs::create_dir_all(mountpoint)?;
        let dev = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")?;
        // default_permissions: the kernel enforces the files' 0600 root
        // mode (allow_other alone would let any local user open them).
        let opts = format!(
            "fd={},rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions,max_read={MAX_IO}",
            dev.as_raw_fd()
        );
        sys::mount::mount(
            "cairn",
            mountpoint,
            "fuse.cairn",
            libc::MS_NOSUID | libc::MS_NODEV,
            &opts,
        )?;
        let held = holder::spawn(&dev, holder, mountpoint);
        let mut server = FuseServer {
            mountpoint: mountpoint.to_path_buf(),
            table: Arc::default(),
            threads: Vec::new(),
            fds: vec![dev],
            _lease: None,
            _anchor: None,
        };
        match held {
            Ok(()) => server.add_fds(threads, holder, orphan_timeout),
            Err(e) => {
                tracing::warn!(error = %e, "no FUSE holder: a daemon crash will take attached volumes' mounts with it");
                server.clone_fds(threads);
            }
        }
        server.start(false)?;
        Ok(server)
    }

    /// Takes over a live FUSE connection from the holder (`fds`: every fd
    /// it holds) without serving yet: the caller marks the files it will
    /// serve again ([`Self::expect`]), then calls [`Self::start`].
    pub fn adopt(
        mountpoint: &Path,
        fds: Vec<OwnedFd>,
        threads: usize,
        holder: &Path,
        orphan_timeout: Duration,
    ) -> FuseServer {
        let mut server = FuseServer {
            mountpoint: mountpoint.to_path_buf(),
            table: Arc::default(),
            threads: Vec::new(),
            fds: fds.into_iter().map(File::from).collect(),
            _lease: None,
            _anchor: None,
        };
        server.add_fds(threads, holder, orphan_timeout);
        server
    }

    /// Clones session fds up to `threads`, deposits the new ones with the
    /// holder before any thread reads from them, and takes the lease.
    fn add_fds(&mut self, threads: usize, holder: &Path, orphan_timeout: Duration) {
        let had = self.fds.len();
        self.clone_fds(threads);
        if !resend_supported() {
            // Requests read on a held fd could never be resent: they would
            // hang. The holder keeps only the mount's fd (no thread reads
            // it, see `start`); requests on the others end with the daemon.
            tracing::warn!(kernel = ?sys::kernel_version(), "this kernel cannot resend FUSE requests (Linux 6.9+ can): I/O in flight at a daemon crash fails with EIO");
        } else {
            let new: Vec<BorrowedFd<'_>> = self.fds[had..].iter().map(|f| f.as_fd()).collect();
            if let Err(e) = holder::deposit(holder, &new) {
                tracing::warn!(error = %e, "the FUSE holder did not take the session fds: requests in flight at a crash would fail");
                // Serve only on what the holder has.
                self.fds.truncate(had);
            }
        }
        for attempt in 1..=3 {
            match holder::lease(holder, orphan_timeout) {
                Ok(l) => {
                    self._lease = Some(l);
                    break;
                }
                Err(e) if attempt < 3 => {
                    tracing::debug!(error = %e, "lease on the FUSE holder not taken; retrying");
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "no lease on the FUSE holder: it gives the connection up after the orphan I/O timeout")
                }
            }
        }
    }

    /// Opens clones of the first fd until there are `threads` of them.
    fn clone_fds(&mut self, threads: usize) {
        while self.fds.len() < threads.max(1) {
            match clone_fd(&self.fds[0]) {
                Ok(f) => self.fds.push(f),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot clone /dev/fuse fd; serving with fewer threads");
                    break;
                }
            }
        }
    }

    /// True once session threads serve the connection.
    pub fn started(&self) -> bool {
        !self.threads.is_empty()
    }

    /// Starts a session thread on each fd; `resend` asks the kernel to send
    /// again every request an earlier daemon read but did not answer.
    pub fn start(&mut self, resend: bool) -> io::Result<()> {
        if self.fds.is_empty() {
            return Ok(());
        }
        if resend {
            let mut hdr = [0u8; OUT_HEADER_LEN];
            put_u32(&mut hdr, 0, OUT_HEADER_LEN as u32);
            put_u32(&mut hdr, 4, NOTIFY_RESEND as u32);
            // SAFETY: writing a 16-byte buffer we own to the FUSE fd.
            let n = unsafe { libc::write(self.fds[0].as_raw_fd(), hdr.as_ptr().cast(), hdr.len()) };
            if n < 0 {
                tracing::warn!(error = %io::Error::last_os_error(), "FUSE resend notification failed; requests in flight at the crash may hang");
            }
        }
        let mut fds = std::mem::take(&mut self.fds);
        if !resend_supported() && fds.len() > 1 {
            // The held mount fd stays unread (see `add_fds`).
            self._anchor = Some(fds.remove(0));
        }
        for (i, fd) in fds.into_iter().enumerate() {
            let table = self.table.clone();
            let h = std::thread::Builder::new()
                .name(format!("fuse-{i}"))
                .stack_size(256 << 10)
                .spawn(move || Session { fd, table }.run())?;
            self.threads.push(h);
        }
        Ok(())
    }

    /// Marks `name` as a file this daemon will serve again (after a
    /// restart): requests for it wait until [`Self::add`], [`Self::abandon`]
    /// or `until`, whichever comes first.
    pub fn expect(&self, name: &str, until: std::time::Instant) {
        let mut f = self.table.files.write().expect("files lock");
        f.expected.insert(ino_of(name), until);
    }

    /// Gives up serving an expected file: its waiting requests fail.
    pub fn abandon(&self, name: &str) {
        self.table
            .files
            .write()
            .expect("files lock")
            .expected
            .remove(&ino_of(name));
        self.table.notify();
    }

    /// Exposes `engine` as `<mountpoint>/<name>` and returns that path. A
    /// name keeps its inode number for the life of the mount, so a dentry the
    /// kernel still holds from an earlier attach resolves to the new engine.
    pub fn add(&self, name: &str, engine: Arc<Engine>) -> PathBuf {
        let mut f = self.table.files.write().expect("files lock");
        let ino = *f.inos.entry(name.into()).or_insert_with(|| ino_of(name));
        f.by_ino.insert(
            ino,
            Arc::new(Served {
                name: name.into(),
                engine,
            }),
        );
        f.expected.remove(&ino);
        drop(f);
        self.table.notify();
        self.mountpoint.join(name)
    }

    /// Removes a file; callers detach its loop device first.
    pub fn remove(&self, name: &str) {
        let mut f = self.table.files.write().expect("files lock");
        if let Some(ino) = f.inos.get(name).copied() {
            f.by_ino.remove(&ino);
        }
    }

    pub fn path_of(&self, name: &str) -> PathBuf {
        self.mountpoint.join(name)
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Unmounts (loop devices must already be detached) and joins the threads.
    pub fn unmount(self) {
        if let Err(e) = sys::mount::umount(&self.mountpoint, libc::MNT_DETACH) {
            tracing::warn!(error = %e, mountpoint = %self.mountpoint.display(), "unmounting FUSE failed");
        }
        for h in self.threads {
            let _ = h.join();
        }
    }
}

fn clone_fd(session: &File) -> io::Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")?;
    let mut src: u32 = session.as_raw_fd() as u32;
    // SAFETY: FUSE_DEV_IOC_CLONE reads one u32 (the session fd) through the
    // pointer, which points to a live local.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), FUSE_DEV_IOC_CLONE, &mut src as *mut u32) };
    if r == 0 {
        Ok(f)
    } else {
        Err(io::Error::last_os_error())
    }
}

struct Session {
    fd: File,
    table: Arc<Table>,
}

enum Reply<'a> {
    None,
    Err(i32),
    Data(&'a [u8]),
}

impl Session {
    fn run(self) {
        let mut buf = AlignedBuf::new(BUF_LEN, 4096);
        static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if let Err(e) = sys::pin_memory(buf.as_mut_slice()) {
            if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::warn!(error = %e, "session buffers not locked in memory (needs CAP_IPC_LOCK): a request being read at a daemon crash may fail instead of being resent");
            }
        }
        let raw = self.fd.as_raw_fd();
        loop {
            let region = &mut buf.as_mut_slice()[HDR_OFF..];
            // SAFETY: reading into `region`, a live exclusive slice of our buffer.
            let n = unsafe { libc::read(raw, region.as_mut_ptr().cast(), region.len()) };
            if n < 0 {
                match io::Error::last_os_error().raw_os_error() {
                    Some(libc::EINTR)
                        if self
                            .table
                            .stopping
                            .load(std::sync::atomic::Ordering::Acquire) =>
                    {
                        return
                    }
                    Some(libc::EINTR) | Some(libc::ENOENT) | Some(libc::EAGAIN) => continue,
                    Some(libc::ENODEV) => return, // unmounted
                    e => {
                        tracing::error!(errno = ?e, "reading /dev/fuse failed; session thread stops");
                        return;
                    }
                }
            }
            let n = n as usize;
            let Some(h) = InHeader::parse(&buf.as_slice()[HDR_OFF..HDR_OFF + n]) else {
                continue;
            };
            if h.len as usize != n {
                self.send(h.unique, Reply::Err(libc::EIO));
                continue;
            }
            if self.dispatch(h, &mut buf, n).is_break() {
                return;
            }
            // Under load the next read returns at once and never sees the
            // hand-off's signal: look at the flag between requests too.
            if self
                .table
                .stopping
                .load(std::sync::atomic::Ordering::Acquire)
            {
                return;
            }
        }
    }

    fn served(&self, ino: u64) -> Option<Arc<Served>> {
        self.table.served(ino)
    }

    fn dispatch(&self, h: InHeader, buf: &mut AlignedBuf, n: usize) -> std::ops::ControlFlow<()> {
        let body_len = n.saturating_sub(IN_HEADER_LEN);
        // Request bodies other than WRITE's payload are small; copy them out
        // (bounded) so the data area is free for READ replies.
        let mut inb = [0u8; 512];
        let copy = if h.opcode == WRITE {
            WRITE_IN_LEN.min(body_len)
        } else {
            body_len.min(inb.len())
        };
        let start = HDR_OFF + IN_HEADER_LEN;
        inb[..copy].copy_from_slice(&buf.as_slice()[start..start + copy]);
        let body = &inb[..];
        let data = &mut buf.as_mut_slice()[DATA_OFF..];
        let mut small = [0u8; 256];
        let reply = match h.opcode {
            INIT => self.init(body, &mut small),
            LOOKUP => self.lookup(h, &inb[..copy], &mut small),
            FORGET | BATCH_FORGET | INTERRUPT => Reply::None,
            GETATTR | SETATTR => self.getattr(h, body, &mut small),
            OPEN => self.open(h, &mut small),
            OPENDIR => {
                if h.nodeid == ROOT_INO {
                    small[..16].fill(0);
                    Reply::Data(&small[..16])
                } else {
                    Reply::Err(libc::ENOTDIR)
                }
            }
            READDIR => self.readdir(h, body, data),
            READ => self.read(h, body, data),
            WRITE => self.write(h, body, body_len, data, &mut small),
            FSYNC => match self.served(h.nodeid) {
                None => Reply::Err(libc::ENOENT),
                Some(s) => match s.engine.flush() {
                    Ok(()) => Reply::Data(&[]),
                    Err(e) => {
                        tracing::error!(volume = %s.engine.volume, error = %e, "flush failed");
                        Reply::Err(e.errno())
                    }
                },
            },
            FALLOCATE => self.fallocate(h, body),
            // FLUSH is close(), not a durability point; RELEASE needs no state.
            FLUSH | RELEASE | RELEASEDIR | FSYNCDIR | ACCESS => Reply::Data(&[]),
            STATFS => {
                small[..80].fill(0);
                put_u32(&mut small, 40, 4096); // bsize
                put_u32(&mut small, 44, 255); // namelen
                put_u32(&mut small, 48, 4096); // frsize
                Reply::Data(&small[..80])
            }
            DESTROY => {
                self.send(h.unique, Reply::Data(&[]));
                return std::ops::ControlFlow::Break(());
            }
            _ => Reply::Err(libc::ENOSYS),
        };
        self.send(h.unique, reply);
        std::ops::ControlFlow::Continue(())
    }

    fn init<'a>(&self, body: &[u8], out: &'a mut [u8; 256]) -> Reply<'a> {
        let (Some(major), Some(minor), Some(readahead), Some(flags)) = (
            u32_at(body, 0),
            u32_at(body, 4),
            u32_at(body, 8),
            u32_at(body, 12),
        ) else {
            return Reply::Err(libc::EINVAL);
        };
        out[..64].fill(0);
        put_u32(out, 0, KERNEL_MAJOR);
        if major != KERNEL_MAJOR || minor < 28 {
            // The kernel retries with our major, or we cannot serve it.
            tracing::error!(major, minor, "unsupported FUSE protocol version");
            return if major > KERNEL_MAJOR {
                Reply::Data(&out[..8])
            } else {
                Reply::Err(libc::EPROTO)
            };
        }
        let want = ASYNC_READ | BIG_WRITES | ASYNC_DIO | MAX_PAGES;
        if flags & ASYNC_DIO == 0 {
            tracing::warn!("kernel does not offer FUSE_ASYNC_DIO; loop I/O will be serialised");
        }
        put_u32(out, 4, minor.min(KERNEL_MINOR_MAX));
        put_u32(out, 8, readahead);
        put_u32(out, 12, flags & want);
        put_u16(out, 16, 64); // max_background
        put_u16(out, 18, 48); // congestion_threshold
        put_u32(out, 20, MAX_IO as u32); // max_write
        put_u32(out, 24, 1); // time_gran
        put_u16(out, 28, (MAX_IO / 4096) as u16); // max_pages
        Reply::Data(&out[..64])
    }

    fn file_attr(out: &mut [u8], ino: u64, s: &Served) {
        encode_attr(out, ino, s.engine.size(), libc::S_IFREG | 0o600, 1);
    }

    fn lookup<'a>(&self, h: InHeader, name: &[u8], out: &'a mut [u8; 256]) -> Reply<'a> {
        if h.nodeid != ROOT_INO {
            return Reply::Err(libc::ENOTDIR);
        }
        let name = name.split(|b| *b == 0).next().unwrap_or_default();
        let Ok(name) = std::str::from_utf8(name) else {
            return Reply::Err(libc::ENOENT);
        };
        let ino = {
            let f = self.table.files.read().expect("files lock");
            f.inos.get(name).copied().unwrap_or_else(|| ino_of(name))
        };
        let Some(s) = self.served(ino) else {
            return Reply::Err(libc::ENOENT);
        };
        out[..128].fill(0);
        put_u64(out, 0, ino); // nodeid
                              // entry_valid = attr_valid = 0: every open looks the name up again
                              // (files come and go with attach/detach) and sizes are always
                              // fetched fresh (online grow).
        Self::file_attr(&mut out[40..], ino, &s);
        Reply::Data(&out[..128])
    }

    fn getattr<'a>(&self, h: InHeader, body: &[u8], out: &'a mut [u8; 256]) -> Reply<'a> {
        out[..104].fill(0);
        if h.nodeid == ROOT_INO {
            encode_attr(&mut out[16..], ROOT_INO, 0, libc::S_IFDIR | 0o700, 2);
            return Reply::Data(&out[..104]);
        }
        let Some(s) = self.served(h.nodeid) else {
            return Reply::Err(libc::ENOENT);
        };
        if h.opcode == SETATTR {
            let valid = u32_at(body, 0).unwrap_or(0);
            let size = u64_at(body, 16).unwrap_or(0);
            if valid & FATTR_SIZE != 0 && size != s.engine.size() {
                return Reply::Err(libc::EPERM);
            }
        }
        Self::file_attr(&mut out[16..], h.nodeid, &s);
        Reply::Data(&out[..104])
    }

    fn open<'a>(&self, h: InHeader, out: &'a mut [u8; 256]) -> Reply<'a> {
        if self.served(h.nodeid).is_none() {
            return Reply::Err(libc::ENOENT);
        }
        out[..16].fill(0);
        put_u64(out, 0, h.nodeid);
        put_u32(out, 8, FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES);
        Reply::Data(&out[..16])
    }

    fn readdir<'a>(&self, h: InHeader, body: &[u8], data: &'a mut [u8]) -> Reply<'a> {
        if h.nodeid != ROOT_INO {
            return Reply::Err(libc::ENOTDIR);
        }
        let (Some(offset), Some(size)) = (u64_at(body, 8), u32_at(body, 16)) else {
            return Reply::Err(libc::EINVAL);
        };
        let size = (size as usize).min(MAX_IO);
        let f = self.table.files.read().expect("files lock");
        let mut entries: Vec<(u64, String, u32)> =
            vec![(ROOT_INO, ".".into(), 4), (ROOT_INO, "..".into(), 4)];
        let mut files: Vec<_> = f
            .by_ino
            .iter()
            .map(|(i, s)| (*i, s.name.clone(), 8u32))
            .collect();
        files.sort();
        entries.extend(files);
        drop(f);
        let mut pos = 0;
        for (i, (ino, name, kind)) in entries.iter().enumerate().skip(offset as usize) {
            let rec = (24 + name.len()).div_ceil(8) * 8;
            if pos + rec > size {
                break;
            }
            let e = &mut data[pos..pos + rec];
            e.fill(0);
            put_u64(e, 0, *ino);
            put_u64(e, 8, i as u64 + 1);
            put_u32(e, 16, name.len() as u32);
            put_u32(e, 20, *kind);
            e[24..24 + name.len()].copy_from_slice(name.as_bytes());
            pos += rec;
        }
        Reply::Data(&data[..pos])
    }

    fn read<'a>(&self, h: InHeader, body: &[u8], data: &'a mut [u8]) -> Reply<'a> {
        let (Some(offset), Some(size)) = (u64_at(body, 8), u32_at(body, 16)) else {
            return Reply::Err(libc::EINVAL);
        };
        let Some(s) = self.served(h.nodeid) else {
            return Reply::Err(libc::ENOENT);
        };
        let end = s.engine.size();
        if offset >= end {
            return Reply::Data(&[]);
        }
        let len = (size as usize).min(MAX_IO).min((end - offset) as usize);
        match s.engine.read(offset, &mut data[..len]) {
            Ok(()) => Reply::Data(&data[..len]),
            Err(e) => {
                tracing::error!(volume = %s.engine.volume, offset, len, error = %e, "read failed");
                Reply::Err(e.errno())
            }
        }
    }

    fn write<'a>(
        &self,
        h: InHeader,
        body: &[u8],
        body_len: usize,
        data: &[u8],
        out: &'a mut [u8; 256],
    ) -> Reply<'a> {
        let (Some(offset), Some(size)) = (u64_at(body, 8), u32_at(body, 16)) else {
            return Reply::Err(libc::EINVAL);
        };
        let size = size as usize;
        if body_len < WRITE_IN_LEN + size || size > MAX_IO {
            return Reply::Err(libc::EINVAL);
        }
        let Some(s) = self.served(h.nodeid) else {
            return Reply::Err(libc::ENOENT);
        };
        if offset.saturating_add(size as u64) > s.engine.size() {
            return Reply::Err(libc::ENOSPC);
        }
        match s.engine.write(offset, &data[..size]) {
            Ok(()) => {
                out[..8].fill(0);
                put_u32(out, 0, size as u32);
                Reply::Data(&out[..8])
            }
            Err(e) => {
                tracing::warn!(volume = %s.engine.volume, offset, size, error = %e, "write failed");
                Reply::Err(e.errno())
            }
        }
    }

    fn fallocate<'a>(&self, h: InHeader, body: &[u8]) -> Reply<'a> {
        let (Some(offset), Some(length), Some(mode)) =
            (u64_at(body, 8), u64_at(body, 16), u32_at(body, 24))
        else {
            return Reply::Err(libc::EINVAL);
        };
        let Some(s) = self.served(h.nodeid) else {
            return Reply::Err(libc::ENOENT);
        };
        let zeroing = mode & (FALLOC_PUNCH_HOLE | FALLOC_ZERO_RANGE) != 0;
        if !zeroing || mode & !(FALLOC_PUNCH_HOLE | FALLOC_ZERO_RANGE | FALLOC_KEEP_SIZE) != 0 {
            return Reply::Err(libc::EOPNOTSUPP);
        }
        let size = s.engine.size();
        if offset >= size {
            return Reply::Data(&[]);
        }
        let len = length.min(size - offset);
        match s.engine.zero_range(offset, len) {
            Ok(()) => Reply::Data(&[]),
            Err(e) => {
                tracing::warn!(volume = %s.engine.volume, offset, len, error = %e, "discard failed");
                Reply::Err(e.errno())
            }
        }
    }

    fn send(&self, unique: u64, reply: Reply<'_>) {
        let (err, payload): (i32, &[u8]) = match reply {
            Reply::None => return,
            Reply::Err(e) => (-e, &[]),
            Reply::Data(d) => (0, d),
        };
        let mut hdr = [0u8; OUT_HEADER_LEN];
        put_u32(&mut hdr, 0, (OUT_HEADER_LEN + payload.len()) as u32);
        hdr[4..8].copy_from_slice(&err.to_le_bytes());
        put_u64(&mut hdr, 8, unique);
        let iov = [
            libc::iovec {
                iov_base: hdr.as_ptr() as *mut _,
                iov_len: hdr.len(),
            },
            libc::iovec {
                iov_base: payload.as_ptr() as *mut _,
                iov_len: payload.len(),
            },
        ];
        let cnt = if payload.is_empty() { 1 } else { 2 };
        // SAFETY: both iovecs point to live buffers of the stated lengths that
        // outlive the call; the kernel only reads them.
        let r = unsafe { libc::writev(self.fd.as_raw_fd(), iov.as_ptr(), cnt) };
        if r < 0 {
            let e = io::Error::last_os_error();
            // ENOENT: the request was interrupted and no longer wanted.
            if e.raw_os_error() != Some(libc::ENOENT) {
                tracing::warn!(error = %e, "writing FUSE reply failed");
            }
        }
    }
}
