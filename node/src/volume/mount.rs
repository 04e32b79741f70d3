//! Filesystem and kernel-state helpers of the attach/mount path: probing,
//! formatting, mounting, growing, and removing what a crashed daemon left
//! behind (loop devices bound to files of a dead FUSE mount, mounts on top of
//! them, the dead FUSE mount itself). Every adapter reuses these through the
//! volume manager.

use std::path::Path;

use crate::sys::{self, loopdev};
use crate::types::FsType;

/// The filesystem signature on a device, if any (`blkid -p`).
pub fn probe_fs(device: &Path) -> Result<Option<String>, String> {
    let dev = device.to_string_lossy();
    let out = std::process::Command::new("blkid")
        .args(["-p", "-s", "TYPE", "-o", "value", &dev])
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("cannot run blkid: {e}"))?;
    match out.status.code() {
        Some(0) => {
            let t = String::from_utf8_lossy(&out.stdout).trim().to_string();
            Ok(if t.is_empty() { None } else { Some(t) })
        }
        // 2: nothing found.
        Some(2) => Ok(None),
        _ => Err(format!(
            "blkid {dev} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}

/// Creates the filesystem. Fresh volumes read as zeros, so lazy inode-table
/// and journal initialisation are safe and discarding first is pointless.
pub fn format(device: &Path, fs: FsType) -> Result<(), String> {
    let dev = device.to_string_lossy();
    match fs {
        FsType::Ext4 => sys::run_command(
            "mkfs.ext4",
            &[
                "-q",
                "-F",
                "-E",
                "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
                &dev,
            ],
        )
        .map(|_| ()),
        FsType::Xfs => sys::run_command("mkfs.xfs", &["-q", "-f", "-K", &dev]).map(|_| ()),
        FsType::None => Err("fs=none volumes are not formatted".into()),
    }
}

/// Mounts with user `options` (see [`sys::mount::parse_options`]).
pub fn mount(device: &Path, path: &Path, fs: FsType, options: &[String]) -> Result<(), String> {
    let (flags, data) = sys::mount::parse_options(options)?;
    std::fs::create_dir_all(path)
        .map_err(|e| format!("cannot create mount point {}: {e}", path.display()))?;
    sys::mount::mount(&device.to_string_lossy(), path, fs.as_str(), flags, &data).map_err(|e| {
        format!(
            "mount {} on {} failed: {e}",
            device.display(),
            path.display()
        )
    })
}

/// Grows the mounted filesystem to the size of its (already grown) device.
pub fn grow(fs: FsType, device: &Path, path: &Path) -> Result<(), String> {
    match fs {
        FsType::Ext4 => sys::run_command("resize2fs", &[&device.to_string_lossy()]).map(|_| ()).map_err(|e| {
            if e.contains("Permission denied") {
                format!("{e} (growing a mounted ext4 needs CAP_SYS_RESOURCE, which this daemon lacks; the volume has grown and its filesystem will grow at the next mount)")
            } else {
                e
            }
        }),
        FsType::Xfs => sys::run_command("xfs_growfs", &[&path.to_string_lossy()]).map(|_| ()),
        FsType::None => Ok(()),
    }
}

/// Bytes an unmounted ext4 filesystem spans (`dumpe2fs -h`).
fn ext4_size(device: &Path) -> Result<u64, String> {
    let out = sys::run_command("dumpe2fs", &["-h", &device.to_string_lossy()])?;
    let field = |name: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .ok_or_else(|| format!("dumpe2fs output lacks {name:?}"))
    };
    Ok(field("Block count:")? * field("Block size:")?)
}

/// Before mounting: an ext4 filesystem smaller than its device (the volume
/// grew while it was not mounted, or an online grow was not permitted) is
/// checked and grown offline, which needs no special capability.
pub fn grow_before_mount(fs: FsType, device: &Path, device_bytes: u64) -> Result<(), String> {
    if fs != FsType::Ext4 || ext4_size(device)? + (1 << 20) > device_bytes {
        return Ok(());
    }
    tracing::info!(device = %device.display(), "growing ext4 to its device before mounting");
    let dev = device.to_string_lossy();
    let fsck = std::process::Command::new("e2fsck")
        .args(["-f", "-p", &dev])
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("cannot run e2fsck: {e}"))?;
    // e2fsck exit codes 0 and 1 mean clean or corrected.
    if !matches!(fsck.status.code(), Some(0) | Some(1)) {
        return Err(format!(
            "e2fsck -f -p {dev} failed ({}): {}",
            fsck.status,
            String::from_utf8_lossy(&fsck.stdout).trim()
        ));
    }
    sys::run_command("resize2fs", &[&dev]).map(|_| ())
}

/// Unmounts everything mounted from `device` (lazily if busy).
pub fn unmount_device(device: &Path) {
    let src = device.to_string_lossy();
    for m in sys::mount::mounts().into_iter().filter(|m| m.source == src) {
        if let Err(e) = sys::mount::umount_or_detach(&m.mount_point) {
            tracing::warn!(device = %src, path = %m.mount_point.display(), error = %e, "cannot unmount");
        }
    }
}

/// Removes the kernel state a previous daemon left under `fuse_dir`: mounts
/// of loop devices bound to its files, the loop devices, the FUSE mount.
pub fn cleanup_stale(fuse_dir: &Path) {
    for (dev, backing) in loopdev::devices_backed_under(fuse_dir) {
        tracing::info!(device = %dev.display(), backing = %backing.display(), "removing stale loop device");
        unmount_device(&dev);
        if let Err(e) = loopdev::detach(&dev) {
            tracing::warn!(device = %dev.display(), error = %e, "cannot detach stale loop device");
        }
    }
    for _ in 0..8 {
        if !sys::mount::is_mount_point(fuse_dir) {
            break;
        }
        tracing::info!(path = %fuse_dir.display(), "unmounting stale FUSE mount");
        if let Err(e) = sys::mount::umount(fuse_dir, libc::MNT_DETACH) {
            tracing::warn!(path = %fuse_dir.display(), error = %e, "cannot unmount stale FUSE mount");
            break;
        }
    }
}
