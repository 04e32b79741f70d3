//! Loop devices through their ioctls: bind a free `/dev/loopN` to a file with
//! direct I/O and a 4 KiB block size, refresh its capacity after a resize,
//! detach it, and find the loop devices backed by files under a directory
//! (stale ones after a crash).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_SET_CAPACITY: libc::c_ulong = 0x4C07;
const LOOP_SET_DIRECT_IO: libc::c_ulong = 0x4C08;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LO_FLAGS_DIRECT_IO: u32 = 16;

#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// Binds a free loop device to `backing` and returns its path. The loop device
/// keeps its own reference to the file; `backing` may be closed afterwards.
pub fn attach(backing: &File, block_size: u32) -> io::Result<PathBuf> {
    let ctl = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")?;
    // Another process may take the free device between GET_FREE and
    // CONFIGURE; that shows as EBUSY and we ask again, a bounded number of times.
    let mut last = io::Error::other("no loop device configured");
    for _ in 0..16 {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a number.
        let n = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let path = PathBuf::from(format!("/dev/loop{n}"));
        let dev = OpenOptions::new().read(true).write(true).open(&path)?;
        // SAFETY: LoopConfig is plain old data; all-zero is a valid value.
        let mut cfg: LoopConfig = unsafe { std::mem::zeroed() };
        cfg.fd = backing.as_raw_fd() as u32;
        cfg.block_size = block_size;
        cfg.info.lo_flags = LO_FLAGS_DIRECT_IO;
        // SAFETY: LOOP_CONFIGURE reads one LoopConfig through the pointer, which
        // points to a live, fully initialised local.
        let r = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE, &cfg as *const LoopConfig) };
        if r == 0 {
            return Ok(path);
        }
        last = io::Error::last_os_error();
        if last.raw_os_error() != Some(libc::EBUSY) {
            return Err(last);
        }
    }
    Err(last)
}

/// Re-reads the backing file's size into the loop device (online grow).
pub fn refresh_capacity(device: &Path) -> io::Result<()> {
    let dev = OpenOptions::new().read(true).open(device)?;
    // SAFETY: LOOP_SET_CAPACITY takes no argument.
    let r = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_SET_CAPACITY, 0) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether the loop device runs with direct I/O (as reported by sysfs).
pub fn uses_direct_io(device: &Path) -> bool {
    let name = device
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    std::fs::read_to_string(format!("/sys/block/{name}/loop/dio"))
        .map(|s| s.trim() == "1")
        .unwrap_or(false)
}

/// Turns direct I/O on for a loop device (used when CONFIGURE refused it).
pub fn set_direct_io(device: &Path) -> io::Result<()> {
    let dev = OpenOptions::new().read(true).open(device)?;
    // SAFETY: LOOP_SET_DIRECT_IO takes an unsigned long by value.
    let r = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_SET_DIRECT_IO, 1 as libc::c_ulong) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Unbinds a loop device. Not bound is success (idempotent). While something
/// still holds the device open the kernel defers the detach to its last close.
pub fn detach(device: &Path) -> io::Result<()> {
    let dev = match OpenOptions::new().read(true).open(device) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    // SAFETY: LOOP_CLR_FD takes no argument.
    let r = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CLR_FD, 0) };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENXIO) {
        Ok(())
    } else {
        Err(e)
    }
}

/// The backing file of a bound loop device, if any.
pub fn backing_file(device: &Path) -> Option<PathBuf> {
    let name = device.file_name()?.to_str()?;
    let s = std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).ok()?;
    Some(PathBuf::from(
        s.trim_end_matches('\n').trim_end_matches(" (deleted)"),
    ))
}

/// Every bound loop device whose backing file lies under `dir`.
pub fn devices_backed_under(dir: &Path) -> Vec<(PathBuf, PathBuf)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return out;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        let dev = PathBuf::from(format!("/dev/{name}"));
        if let Some(b) = backing_file(&dev) {
            if b.starts_with(dir) {
                out.push((dev, b));
            }
        }
    }
    out.sort();
    out
}

/// Who still uses block device `device` besides this process, if anyone:
/// a filesystem on it (mounted anywhere, in any mount namespace), a bind
/// mount of the device node itself, or a process holding it open (found
/// by device number, whatever path it was opened by, e.g. inside a
/// container). Files are looked at without asking their filesystem (no
/// FUSE or NFS request can block the scan).
pub fn in_use(device: &Path) -> Option<String> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let meta = std::fs::metadata(device).ok()?;
    if !meta.file_type().is_block_device() {
        return None;
    }
    let rdev = meta.rdev();
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    let numbers = format!("{major}:{minor}");
    let node_name = format!("/{}", device.file_name()?.to_string_lossy());
    for m in crate::sys::mount::mounts() {
        if m.dev == numbers {
            return Some(format!(
                "a filesystem on it is mounted at {}",
                m.mount_point.display()
            ));
        }
        if m.fstype == "devtmpfs" && m.root == node_name {
            return Some(format!("it is bind-mounted at {}", m.mount_point.display()));
        }
    }
    // A filesystem mounted in any mount namespace (a container's) claims
    // the device exclusively.
    {
        use std::os::unix::fs::OpenOptionsExt;
        let excl = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_EXCL)
            .open(device);
        if excl.is_err_and(|e| e.raw_os_error() == Some(libc::EBUSY)) {
            return Some("a filesystem on it is mounted (maybe in another mount namespace)".into());
        }
    }
    let me = std::process::id().to_string();
    for p in std::fs::read_dir("/proc").ok()?.flatten() {
        let pid = p.file_name();
        let pid = pid.to_string_lossy();
        if !pid.bytes().all(|b| b.is_ascii_digit()) || pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if statx_rdev(&fd.path()) == Some((major, minor)) {
                let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
                return Some(format!("process {pid} ({}) has it open", comm.trim()));
            }
        }
    }
    None
}

/// The device number of the block device `path` leads to, from cached
/// attributes only (`AT_STATX_DONT_SYNC`).
fn statx_rdev(path: &Path) -> Option<(u32, u32)> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statx is plain data; all zeroes is a valid value.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is NUL-terminated and outlives the call; `st` is a live
    // out-buffer of the right type.
    let r = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::AT_STATX_DONT_SYNC,
            libc::STATX_TYPE,
            &mut st,
        )
    };
    if r != 0 || u32::from(st.stx_mode) & libc::S_IFMT != libc::S_IFBLK {
        return None;
    }
    Some((st.stx_rdev_major, st.stx_rdev_minor))
}
