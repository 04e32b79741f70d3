//! Keeps the FUSE connection alive across a daemon crash or restart.
//!
//! At mount time the daemon starts `cairn fuse-holder` in its own session
//! with a duplicate of the `/dev/fuse` fd. While the holder lives, the
//! kernel's FUSE connection survives the daemon: loop devices, filesystems
//! mounted on them, and containers using those mounts stay in place, their
//! I/O queued. The next daemon asks the holder for the fd (SCM_RIGHTS over
//! a root-only unix socket in the data directory), tells the kernel to
//! resend the requests the dead daemon had read but not answered
//! (`FUSE_NOTIFY_RESEND`), and serves on. The holder exits once the FUSE
//! mount is gone (a graceful shutdown unmounts it).
//!
//! A holder can also run on its own (`--standby`), started before the
//! daemon and outliving it, e.g. as a sidecar container in Kubernetes, where
//! restarting the daemon's container kills every process in it. At mount
//! time the daemon hands the connection to a holder that already listens
//! instead of starting one. Requests on the socket are one byte: `G` (send
//! me the connection) or `H` with an fd attached (hold this one).

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The fd number the holder receives the connection on.
const HELD_FD: RawFd = 3;

pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join("fuse-holder.sock")
}

/// True while `mountpoint` is a cairn FUSE mount.
fn mounted(mountpoint: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = mountpoint.to_string_lossy();
    info.lines().any(|l| {
        let mut f = l.split(' ');
        let point = f.nth(4);
        point == Some(&want) && l.contains(" - fuse.cairn ")
    })
}

/// Gives `fd` to a holder already listening on `socket` (a standby one);
/// false when none answers.
fn deposit(fd: &impl AsRawFd, socket: &Path) -> bool {
    let Ok(s) = UnixStream::connect(socket) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut ack = [0u8; 1];
    send_fd(&s, b'H', fd.as_raw_fd()).is_ok() && (&s).read_exact(&mut ack).is_ok() && ack[0] == b'K'
}

/// Hands `fd` to a standby holder, or starts a holder for it (the daemon
/// keeps its own copy either way).
pub fn spawn(fd: &impl AsRawFd, socket: &Path, mountpoint: &Path) -> io::Result<()> {
    use std::os::unix::process::CommandExt;
    if deposit(fd, socket) {
        tracing::info!(socket = %socket.display(), "FUSE connection handed to the standby holder");
        return Ok(());
    }
    let exe = std::env::current_exe()?;
    let src = fd.as_raw_fd();
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("fuse-holder")
        .arg(socket)
        .arg(mountpoint)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: between fork and exec only async-signal-safe calls (dup2,
    // setsid) are made, on fds this process owns.
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

/// Takes the held connection over from a running holder, if there is one
/// and the mount is still in place.
pub fn reclaim(socket: &Path, mountpoint: &Path) -> Option<OwnedFd> {
    if !mounted(mountpoint) {
        return None;
    }
    let mut s = UnixStream::connect(socket).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"G").ok()?;
    recv_fd(&s).ok()
}

/// `cairn fuse-holder SOCKET MOUNTPOINT`: hands fd 3 to whoever asks,
/// until the mount is gone. With `standby`, starts holding nothing, takes
/// what a daemon hands over, and keeps running when the mount goes.
pub fn run(socket: &Path, mountpoint: &Path, standby: bool) -> i32 {
    // SAFETY: without --standby, fd 3 was set up by `spawn` and is owned
    // by this process.
    let mut held = (!standby).then(|| unsafe { OwnedFd::from_raw_fd(HELD_FD) });
    let _ = std::fs::remove_file(socket);
    let Ok(listener) = UnixListener::bind(socket) else {
        return 1;
    };
    let _ = std::fs::set_permissions(socket, std::os::unix::fs::PermissionsExt::from_mode(0o600));
    if listener.set_nonblocking(true).is_err() {
        return 1;
    }
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                let _ = s.set_nonblocking(false);
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                match recv_request(&s) {
                    Ok((b'G', _)) => {
                        if let Some(fd) = &held {
                            let _ = send_fd(&s, b'F', fd.as_raw_fd());
                        }
                    }
                    Ok((b'H', Some(fd))) => {
                        held = Some(fd);
                        let _ = (&s).write_all(b"K");
                    }
                    // Anything else: hang up.
                    _ => {}
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if held.is_some() && !mounted(mountpoint) {
                    if !standby {
                        let _ = std::fs::remove_file(socket);
                        return 0;
                    }
                    held = None;
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

/// Calls `f` with a msghdr of one data byte (`byte`) and room for one fd;
/// returns what `f` returns and the data byte afterwards.
fn with_fd_msg<R>(byte: u8, f: impl FnOnce(&mut libc::msghdr) -> R) -> (R, u8) {
    let mut byte = [byte];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
    let mut cbuf = vec![0u8; space];
    // SAFETY: msghdr is plain data; every pointer set below refers to
    // locals that outlive `f`.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    let r = f(&mut msg);
    (r, byte[0])
}

/// Sends the data byte `tag` with `fd` attached.
fn send_fd(s: &UnixStream, tag: u8, fd: RawFd) -> io::Result<()> {
    with_fd_msg(tag, |msg| {
        // SAFETY: the control buffer holds one cmsg of CMSG_SPACE(fd) bytes.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<RawFd>(), fd);
        }
        // SAFETY: msg is fully initialised.
        if unsafe { libc::sendmsg(s.as_raw_fd(), msg, 0) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    })
    .0
}

/// Receives one data byte and the fd attached to it, if any.
fn recv_request(s: &UnixStream) -> io::Result<(u8, Option<OwnedFd>)> {
    let (r, byte) = with_fd_msg(0, |msg| {
        // SAFETY: msg points at live buffers; MSG_CMSG_CLOEXEC keeps the fd
        // from leaking into programs we run.
        let n = unsafe { libc::recvmsg(s.as_raw_fd(), msg, libc::MSG_CMSG_CLOEXEC) };
        if n <= 0 {
            return Err(io::Error::other(
                "nothing received on the FUSE holder socket",
            ));
        }
        // SAFETY: the kernel filled the control buffer; the cmsg type is
        // checked before the fd is read out of it.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(msg);
            if c.is_null()
                || (*c).cmsg_level != libc::SOL_SOCKET
                || (*c).cmsg_type != libc::SCM_RIGHTS
            {
                return Ok(None);
            }
            let fd = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<RawFd>());
            Ok(Some(OwnedFd::from_raw_fd(fd)))
        }
    });
    r.map(|fd| (byte, fd))
}

fn recv_fd(s: &UnixStream) -> io::Result<OwnedFd> {
    recv_request(s)?
        .1
        .ok_or_else(|| io::Error::other("the FUSE holder sent no fd"))
}
