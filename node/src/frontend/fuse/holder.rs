//! Keeps the FUSE connection, and every request the kernel handed out on
//! it, alive across a daemon crash or restart.
//!
//! The kernel ends the requests a `/dev/fuse` fd had handed out when that
//! fd's last reference closes (with ECONNABORTED, which reaches a loop
//! device as EIO), and aborts the connection when its last fd closes. So
//! the holder keeps a reference to *every* fd the daemon serves the
//! connection on, the main one and each session thread's clone: when the
//! daemon dies, none of them closes, the requests it had read stay in the
//! kernel's processing lists, and new ones wait in its queue. The next
//! daemon asks the holder for the fds (SCM_RIGHTS over a root-only unix
//! socket in the data directory), tells the kernel to resend what is
//! unanswered (`FUSE_NOTIFY_RESEND`, which requeues the processing lists of
//! all open fds), and serves on. Loop devices, the filesystems on them and
//! the containers using those never see the crash.
//!
//! The daemon holds a *lease*: one connection to the holder that stays open
//! for the daemon's life. When it closes without a new lease following (no
//! daemon came back) for the orphan I/O timeout, the holder closes its fds:
//! the kernel aborts the connection, every waiting request fails with EIO,
//! and mounts and loop devices can be torn down instead of hanging every
//! process that touches them. The holder logs that to stderr (the daemon
//! points it at `fuse-holder.log` beside the socket).
//!
//! The holder exits once the FUSE mount is gone (a graceful shutdown
//! unmounts it). A holder can also run on its own (`--standby`), started
//! before the daemon and outliving it, e.g. as a sidecar container in
//! Kubernetes, where restarting the daemon's container kills every process
//! in it; the daemon then hands the fds to it instead of starting one, and
//! a standby holder keeps running when the mount goes.
//!
//! Requests on the socket, one per connection, are a tag byte and a payload:
//! `G` (send me the fds: answered by `F` messages of up to [`BATCH`] fds,
//! the last one's payload byte 0), `H` with fds attached (hold these too:
//! answered `K`), `L` with the orphan timeout in milliseconds as 8 bytes
//! little-endian (this connection is the lease: answered `K`).

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The fd number a spawned holder receives the main connection fd on.
const HELD_FD: RawFd = 3;
/// Most fds in one message (the kernel allows 253).
pub const BATCH: usize = 64;
/// How long a daemon that never said otherwise may stay away.
pub const DEFAULT_ORPHAN_TIMEOUT: Duration = Duration::from_secs(120);
/// How often the holder looks at the mount and the orphan clock.
const TICK_MS: i32 = 250;

pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join("fuse-holder.sock")
}

fn log_path(socket: &Path) -> PathBuf {
    socket.with_file_name("fuse-holder.log")
}

/// True while `mountpoint` is a cairn FUSE mount.
fn mounted(mountpoint: &Path) -> bool {
    // Unreadable is "still mounted": giving up the fds aborts every request.
    let Ok(raw) = std::fs::read("/proc/self/mountinfo") else {
        return true;
    };
    let info = String::from_utf8_lossy(&raw);
    let want = mountpoint.to_string_lossy();
    info.lines().any(|l| {
        let mut f = l.split(' ');
        let point = f.nth(4);
        point == Some(&want) && l.contains(" - fuse.cairn ")
    })
}

fn connect(socket: &Path) -> io::Result<UnixStream> {
    let s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    Ok(s)
}

/// Gives `fds` to the holder on `socket` (in batches); the daemon keeps
/// its own references.
pub fn deposit(socket: &Path, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    for batch in fds.chunks(BATCH) {
        let s = connect(socket)?;
        let raw: Vec<RawFd> = batch.iter().map(|f| f.as_raw_fd()).collect();
        send_msg(&s, b"H", &raw)?;
        let mut ack = [0u8; 1];
        (&s).read_exact(&mut ack)?;
        if ack[0] != b'K' {
            return Err(io::Error::other("the FUSE holder refused the fds"));
        }
    }
    Ok(())
}

/// Takes a lease on the holder: while the returned stream is open (the
/// daemon lives), the holder never gives up; `timeout` is how long it waits
/// for a next daemon once the stream closes.
pub fn lease(socket: &Path, timeout: Duration) -> io::Result<UnixStream> {
    let s = connect(socket)?;
    let mut msg = [0u8; 9];
    msg[0] = b'L';
    let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
    msg[1..].copy_from_slice(&ms.to_le_bytes());
    send_msg(&s, &msg, &[])?;
    let mut ack = [0u8; 1];
    (&s).read_exact(&mut ack)?;
    if ack[0] != b'K' {
        return Err(io::Error::other("the FUSE holder refused the lease"));
    }
    s.set_read_timeout(None)?;
    Ok(s)
}

/// Hands the main fd to a standby holder on `socket`, or starts a holder
/// process for it (the daemon keeps its own copy either way). Further fds
/// are given with [`deposit`].
pub fn spawn(fd: &impl AsRawFd, socket: &Path, mountpoint: &Path) -> io::Result<()> {
    use std::os::unix::process::CommandExt;
    // SAFETY: `fd` is open for the duration of this call.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd.as_raw_fd()) };
    if UnixStream::connect(socket).is_ok() && deposit(socket, &[borrowed]).is_ok() {
        tracing::info!(socket = %socket.display(), "FUSE connection handed to the standby holder");
        return Ok(());
    }
    let exe = std::env::current_exe()?;
    let log = open_private_log(&log_path(socket))?;
    let src = fd.as_raw_fd();
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("fuse-holder")
        .arg(socket)
        .arg(mountpoint)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: between fork and exec only async-signal-safe calls (dup2,
    // fcntl, setsid) are made, on fds this process owns.
    unsafe {
        cmd.pre_exec(move || {
            if src == HELD_FD {
                // dup2 onto itself keeps close-on-exec: clear it instead.
                if libc::fcntl(src, libc::F_SETFD, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
            } else if libc::dup2(src, HELD_FD) < 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    // The holder outlives us on purpose; it is not our child to reap later.
    std::mem::forget(child);
    // Wait (bounded) until it answers, so a crash right after mount is covered.
    for _ in 0..100 {
        if UnixStream::connect(socket).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(io::Error::other("the FUSE holder did not start"))
}

fn open_private_log(path: &Path) -> io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

/// Takes the held connection over from a running holder, if there is one
/// and the mount is still in place: every fd it holds.
pub fn reclaim(socket: &Path, mountpoint: &Path) -> Option<Vec<OwnedFd>> {
    if !mounted(mountpoint) {
        return None;
    }
    let s = connect(socket).ok()?;
    send_msg(&s, b"G", &[]).ok()?;
    let mut fds = Vec::new();
    loop {
        let (data, got) = recv_msg(&s).ok()?;
        if data.first() != Some(&b'F') {
            return None;
        }
        fds.extend(got);
        if data.get(1) != Some(&1) {
            break;
        }
    }
    (!fds.is_empty()).then_some(fds)
}

/// What a holder holds and whom it serves.
struct Holder {
    fds: Vec<OwnedFd>,
    lease: Option<UnixStream>,
    timeout: Duration,
    /// When the last lease ended (or the fds arrived without one).
    orphaned_since: Instant,
    /// A lease ended since the fds arrived: the next one is a takeover.
    orphaned: bool,
}

fn say(msg: &str) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    eprintln!("{now} cairn fuse-holder[{}]: {msg}", std::process::id());
}

/// `cairn fuse-holder SOCKET MOUNTPOINT`: holds fd 3 (and what a daemon
/// deposits) until the mount is gone. With `standby`, starts holding
/// nothing, takes what a daemon hands over, and keeps running when the
/// mount goes.
pub fn run(socket: &Path, mountpoint: &Path, standby: bool) -> i32 {
    let fds = if standby {
        Vec::new()
    } else {
        // SAFETY: without --standby, fd 3 was set up by `spawn` and is
        // owned by this process.
        vec![unsafe { OwnedFd::from_raw_fd(HELD_FD) }]
    };
    let mut h = Holder {
        fds,
        lease: None,
        timeout: DEFAULT_ORPHAN_TIMEOUT,
        orphaned_since: Instant::now(),
        orphaned: false,
    };
    let _ = std::fs::remove_file(socket);
    let Ok(listener) = UnixListener::bind(socket) else {
        say("cannot bind the socket");
        return 1;
    };
    let _ = std::fs::set_permissions(socket, std::os::unix::fs::PermissionsExt::from_mode(0o600));
    if listener.set_nonblocking(true).is_err() {
        return 1;
    }
    let mut last_check = Instant::now();
    loop {
        let mut polls = vec![libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        if let Some(l) = &h.lease {
            polls.push(libc::pollfd {
                fd: l.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        // SAFETY: `polls` is a live array of initialised pollfds.
        let n = unsafe { libc::poll(polls.as_mut_ptr(), polls.len() as _, TICK_MS) };
        if n > 0 {
            if polls.get(1).is_some_and(|p| p.revents != 0) {
                h.check_lease();
            }
            if polls[0].revents & libc::POLLIN != 0 {
                while let Ok((s, _)) = listener.accept() {
                    h.serve(s, mountpoint);
                }
            }
        }
        if last_check.elapsed() < Duration::from_millis(TICK_MS as u64) {
            continue;
        }
        last_check = Instant::now();
        if !h.fds.is_empty() && !mounted(mountpoint) {
            h.fds.clear();
            h.lease = None;
            if !standby {
                let _ = std::fs::remove_file(socket);
                return 0;
            }
        }
        if !h.fds.is_empty() && h.lease.is_none() && h.orphaned_since.elapsed() >= h.timeout {
            say(&format!(
                "no daemon came back within the orphan I/O timeout ({:?}): closing the FUSE connection, so waiting I/O on {} fails with EIO and its mounts can be torn down",
                h.timeout,
                mountpoint.display()
            ));
            // Closing the last references aborts the connection.
            h.fds.clear();
            h.orphaned = false;
            if !standby {
                let _ = std::fs::remove_file(socket);
                return 0;
            }
        }
    }
}

impl Holder {
    /// The lease's stream became readable: the daemon closed it (it died,
    /// or stopped), or sent something it should not have.
    fn check_lease(&mut self) {
        let Some(l) = &self.lease else { return };
        let _ = l.set_nonblocking(true);
        let mut b = [0u8; 16];
        match (&*l).read(&mut b) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            _ => {
                self.lease = None;
                self.orphaned_since = Instant::now();
                if !self.fds.is_empty() {
                    self.orphaned = true;
                    say(&format!(
                        "the daemon is gone; I/O waits for the next one (at most {:?})",
                        self.timeout
                    ));
                }
            }
        }
    }

    fn serve(&mut self, s: UnixStream, mountpoint: &Path) {
        let _ = s.set_nonblocking(false);
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
        let Ok((data, fds)) = recv_msg(&s) else {
            return;
        };
        match data.first() {
            Some(b'G') => {
                let raw: Vec<RawFd> = self.fds.iter().map(|f| f.as_raw_fd()).collect();
                let batches: Vec<&[RawFd]> = if raw.is_empty() {
                    vec![&[]]
                } else {
                    raw.chunks(BATCH).collect()
                };
                let last = batches.len() - 1;
                for (i, b) in batches.into_iter().enumerate() {
                    let more = u8::from(i < last);
                    if send_msg(&s, &[b'F', more], b).is_err() {
                        return;
                    }
                }
            }
            Some(b'H') if !fds.is_empty() => {
                if self.fds.is_empty() {
                    // A new connection: its orphan clock starts now.
                    self.orphaned_since = Instant::now();
                    self.orphaned = false;
                }
                self.fds.extend(fds);
                let _ = (&s).write_all(b"K");
            }
            Some(b'L') if data.len() == 9 => {
                let ms = u64::from_le_bytes(data[1..9].try_into().expect("8 bytes"));
                self.timeout = Duration::from_millis(ms);
                if (&s).write_all(b"K").is_ok() {
                    if std::mem::take(&mut self.orphaned) && mounted(mountpoint) {
                        say("a daemon took the connection over");
                    }
                    self.lease = Some(s);
                }
            }
            // Anything else: hang up.
            _ => {}
        }
    }
}

/// Sends `data` with `fds` attached (at most [`BATCH`]).
fn send_msg(s: &UnixStream, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
    debug_assert!(fds.len() <= BATCH);
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut _,
        iov_len: data.len(),
    };
    let fd_bytes = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
    let mut cbuf = vec![0u8; space];
    // SAFETY: msghdr is plain data; every pointer set below refers to
    // locals that outlive the sendmsg call, and the kernel only reads them.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: the control buffer holds one cmsg of CMSG_SPACE(fds) bytes,
        // and CMSG_DATA has room for exactly `fds.len()` descriptors.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as _;
            std::ptr::copy_nonoverlapping(fds.as_ptr().cast::<u8>(), libc::CMSG_DATA(c), fd_bytes);
        }
    }
    // SAFETY: msg is fully initialised and points at live buffers.
    if unsafe { libc::sendmsg(s.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Receives one message (at most 16 data bytes) and the fds attached to it.
fn recv_msg(s: &UnixStream) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut data = [0u8; 16];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE((BATCH * std::mem::size_of::<RawFd>()) as u32) } as usize;
    let mut cbuf = vec![0u8; space];
    // SAFETY: as in send_msg; here the kernel writes into the buffers.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: msg points at live buffers; MSG_CMSG_CLOEXEC keeps received
    // fds from leaking into programs we run.
    let n = unsafe { libc::recvmsg(s.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n == 0 {
        return Err(io::Error::other(
            "nothing received on the FUSE holder socket",
        ));
    }
    let mut fds = Vec::new();
    // SAFETY: the kernel filled the control buffer up to msg_controllen;
    // each cmsg's level, type and length are checked before its fds are
    // read, and every fd received is owned by this process from now on.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let bytes = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let p = libc::CMSG_DATA(c).cast::<RawFd>();
                for i in 0..bytes / std::mem::size_of::<RawFd>() {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(p.add(i))));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        // Some fds were dropped by the kernel: refuse the whole message.
        return Err(io::Error::other("too many fds in one FUSE holder message"));
    }
    Ok((data[..n as usize].to_vec(), fds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fds_cross_in_batches_and_keep_their_file() {
        let (a, b) = UnixStream::pair().expect("pair");
        let files: Vec<std::fs::File> = (0..3)
            .map(|_| std::fs::File::open("/dev/null").expect("open"))
            .collect();
        let raw: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
        send_msg(&a, &[b'F', 1], &raw).expect("send");
        let (data, got) = recv_msg(&b).expect("recv");
        assert_eq!(data, vec![b'F', 1]);
        assert_eq!(got.len(), 3);
        for (g, f) in got.iter().zip(&files) {
            use std::os::unix::fs::MetadataExt;
            let gm = std::fs::File::from(g.try_clone().expect("dup"))
                .metadata()
                .expect("stat");
            let fm = f.metadata().expect("stat");
            assert_eq!((gm.dev(), gm.ino()), (fm.dev(), fm.ino()));
        }
        send_msg(&a, b"G", &[]).expect("send");
        let (data, got) = recv_msg(&b).expect("recv");
        assert_eq!((data, got.len()), (b"G".to_vec(), 0));
    }
}
