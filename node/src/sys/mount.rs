//! Mounts: `mount(2)`, `umount2(2)`, reading `/proc/self/mountinfo`, and
//! freezing a mounted filesystem.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))
}

/// `mount(source, target, fstype, flags, data)`.
pub fn mount(
    source: &str,
    target: &Path,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> io::Result<()> {
    let src = CString::new(source)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in source"))?;
    let tgt = cstr(target)?;
    let fst = CString::new(fstype)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in fstype"))?;
    let dat = CString::new(data)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in data"))?;
    // SAFETY: all pointers are NUL-terminated strings that outlive the call.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            tgt.as_ptr(),
            fst.as_ptr(),
            flags,
            dat.as_ptr().cast(),
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `umount2(target, flags)`; "not mounted" is success.
pub fn umount(target: &Path, flags: libc::c_int) -> io::Result<()> {
    let tgt = cstr(target)?;
    // SAFETY: tgt is a NUL-terminated string that outlives the call.
    let r = unsafe { libc::umount2(tgt.as_ptr(), flags) };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EINVAL) | Some(libc::ENOENT) => Ok(()),
        _ => Err(e),
    }
}

/// Unmounts, falling back to a lazy detach if the mount is busy.
pub fn umount_or_detach(target: &Path) -> io::Result<()> {
    match umount(target, 0) {
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => umount(target, libc::MNT_DETACH),
        other => other,
    }
}

#[derive(Debug, Clone)]
pub struct MountEntry {
    pub mount_point: PathBuf,
    pub fstype: String,
    pub source: String,
    /// What of the source filesystem is mounted (`/` for all of it; a bind
    /// mount of a device file shows that file's path in devtmpfs).
    pub root: String,
    pub read_only: bool,
    /// The filesystem's device number (`major:minor`, as in `st_dev`).
    pub dev: String,
}

fn unescape(s: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            if let Ok(v) =
                u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 4]).unwrap_or("x"), 8)
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses `/proc/self/mountinfo`.
pub fn mounts() -> Vec<MountEntry> {
    // Bytes, not a String: a path anywhere in the table that is not UTF-8
    // must not hide every mount.
    let Ok(raw) = std::fs::read("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let text = String::from_utf8_lossy(&raw);
    text.lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let mut pre = pre.split(' ').skip(2);
            let dev = pre.next()?;
            let root = pre.next()?;
            let mount_point = pre.next()?;
            let options = pre.next()?;
            let mut post = post.split(' ');
            let fstype = post.next()?;
            let source = post.next()?;
            Some(MountEntry {
                mount_point: PathBuf::from(unescape(mount_point)),
                fstype: fstype.into(),
                source: unescape(source),
                root: unescape(root),
                read_only: options.split(',').any(|o| o == "ro"),
                dev: dev.into(),
            })
        })
        .collect()
}

/// Whether `path` is currently a mount point.
pub fn is_mount_point(path: &Path) -> bool {
    mounts().iter().any(|m| m.mount_point == path)
}

/// Mount options as given by a user (e.g. CSI `mount_flags`): generic flags
/// become `MS_*` bits, anything else is passed to the filesystem. Options
/// that change what a mount *is* (bind, move, remount, propagation) are
/// refused.
pub fn parse_options(opts: &[String]) -> Result<(libc::c_ulong, String), String> {
    let mut flags: libc::c_ulong = 0;
    let mut data: Vec<&str> = Vec::new();
    for o in opts.iter().flat_map(|o| o.split(',')).map(str::trim) {
        let bit = match o {
            "" | "rw" | "defaults" => continue,
            "ro" => libc::MS_RDONLY,
            "noatime" => libc::MS_NOATIME,
            "nodiratime" => libc::MS_NODIRATIME,
            "relatime" => libc::MS_RELATIME,
            "strictatime" => libc::MS_STRICTATIME,
            "lazytime" => libc::MS_LAZYTIME,
            "nodev" => libc::MS_NODEV,
            "nosuid" => libc::MS_NOSUID,
            "noexec" => libc::MS_NOEXEC,
            "sync" => libc::MS_SYNCHRONOUS,
            "dirsync" => libc::MS_DIRSYNC,
            "bind" | "rbind" | "move" | "remount" | "shared" | "rshared" | "slave" | "rslave"
            | "private" | "rprivate" | "unbindable" | "runbindable" => {
                return Err(format!("mount option {o:?} is not allowed"))
            }
            o if o.contains('\0') => return Err("mount option contains NUL".into()),
            o => {
                data.push(o);
                continue;
            }
        };
        flags |= bit;
    }
    Ok((flags, data.join(",")))
}

/// Bind-mounts `source` on `target`, read-only when asked (a bind mount
/// takes the read-only flag only on a remount).
pub fn bind(source: &Path, target: &Path, readonly: bool) -> io::Result<()> {
    mount(&source.to_string_lossy(), target, "", libc::MS_BIND, "")?;
    if readonly {
        let r = mount(
            "",
            target,
            "",
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
            "",
        );
        if let Err(e) = r {
            let _ = umount(target, 0);
            return Err(e);
        }
    }
    Ok(())
}

/// Space and inodes of the filesystem holding `path`:
/// (total, used, available bytes; total, used, free inodes).
pub fn statvfs(path: &Path) -> io::Result<(u64, u64, u64, u64, u64, u64)> {
    let p = cstr(path)?;
    // SAFETY: zeroed statvfs is a valid value of this plain C struct.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: p is NUL-terminated and s is a valid, writable statvfs.
    if unsafe { libc::statvfs(p.as_ptr(), &mut s) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let bs = s.f_frsize as u64;
    let total = s.f_blocks as u64 * bs;
    let free = s.f_bfree as u64 * bs;
    Ok((
        total,
        total - free,
        s.f_bavail as u64 * bs,
        s.f_files as u64,
        (s.f_files - s.f_ffree) as u64,
        s.f_ffree as u64,
    ))
}

/// A filesystem frozen with FIFREEZE (every dirty page written, new writes
/// held by the kernel); thawed when dropped.
pub struct Frozen {
    dir: File,
    path: PathBuf,
}

const FIFREEZE: libc::c_ulong = 0xC004_5877;
const FITHAW: libc::c_ulong = 0xC004_5878;

/// Freezes the filesystem mounted at `mountpoint`, which must be the root
/// of a mount of block device `device` (never the filesystem below a path
/// that was unmounted behind our back).
pub fn freeze(mountpoint: &Path, device: &Path) -> io::Result<Frozen> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let dir = File::open(mountpoint)?;
    let dev = std::fs::metadata(device)?;
    let held = dir.metadata()?;
    if !dev.file_type().is_block_device() || held.dev() != dev.rdev() || !is_mount_point(mountpoint)
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} is not a mount of {}",
                mountpoint.display(),
                device.display()
            ),
        ));
    }
    // SAFETY: FIFREEZE takes no argument; the fd is open for the call.
    if unsafe { libc::ioctl(dir.as_raw_fd(), FIFREEZE as _, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Frozen {
        dir,
        path: mountpoint.to_path_buf(),
    })
}

/// Thaws the filesystem mounted at `mountpoint` if it is frozen (one a
/// crashed daemon froze for a snapshot); true when it was.
pub fn thaw(mountpoint: &Path) -> bool {
    let Ok(dir) = File::open(mountpoint) else {
        return false;
    };
    // SAFETY: FITHAW takes no argument; the fd is open for the call. A
    // filesystem that is not frozen answers EINVAL and nothing changes.
    unsafe { libc::ioctl(dir.as_raw_fd(), FITHAW as _, 0) == 0 }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        // A filesystem left frozen holds every writer: retried, then said
        // loudly (`fsfreeze -u` thaws it by hand).
        for attempt in 0..3 {
            // SAFETY: FITHAW takes no argument; the fd is open for the call.
            if unsafe { libc::ioctl(self.dir.as_raw_fd(), FITHAW as _, 0) } == 0 {
                return;
            }
            let e = io::Error::last_os_error();
            if attempt == 2 {
                tracing::error!(path = %self.path.display(), error = %e, "cannot thaw the filesystem frozen for a snapshot; run fsfreeze -u on it");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_split_into_flags_and_data() {
        let o = |v: &[&str]| parse_options(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(
            o(&["noatime,nodev", "discard", "rw"]),
            Ok((libc::MS_NOATIME | libc::MS_NODEV, "discard".into()))
        );
        assert_eq!(o(&[]), Ok((0, String::new())));
        assert!(o(&["bind"]).is_err());
        assert!(o(&["remount,ro"]).is_err());
    }
}
