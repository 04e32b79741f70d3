//! Mount and unmount: format on first use, mount, grow, and the checks on
//! the paths something of a volume may be mounted on.

use std::path::{Path, PathBuf};

use super::*;

impl VolumeManager {
    pub(super) fn check_path(path: &str) -> Result<PathBuf, VolumeError> {
        let p = Path::new(path);
        if !p.is_absolute() {
            return Err(VolumeError::InvalidPath(format!(
                "{path:?} is not an absolute path"
            )));
        }
        if p.components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
            || path.contains('\0')
        {
            return Err(VolumeError::InvalidPath(format!(
                "{path:?} must not contain '..' or NUL"
            )));
        }
        if p == Path::new("/") {
            return Err(VolumeError::InvalidPath("refusing to mount over /".into()));
        }
        Ok(p.components().collect())
    }

    /// A path something of a volume may be mounted on: absolute, no `..`,
    /// not `/`, clear of the daemon's FUSE directory.
    pub fn check_mount_target(&self, path: &str) -> Result<PathBuf, VolumeError> {
        let path = Self::check_path(path)?;
        if path.starts_with(&self.cfg.fuse_dir) || self.cfg.fuse_dir.starts_with(&path) {
            return Err(VolumeError::InvalidPath(format!(
                "{} overlaps the daemon's FUSE directory {}",
                path.display(),
                self.cfg.fuse_dir.display()
            )));
        }
        Ok(path)
    }

    pub fn mount(
        &self,
        name: &str,
        path: &str,
        force: bool,
    ) -> Result<crate::volume::VolumeView, VolumeError> {
        self.mount_with(name, path, force, &[], false)
    }

    /// [`VolumeManager::mount`] with mount options (kept for re-mounts
    /// after a restart) and, with `read_only`, as one of the volume's
    /// readers: read-only device and mount, journal left alone, no
    /// attachment (any number of nodes may read while none writes).
    pub fn mount_with(
        &self,
        name: &str,
        path: &str,
        force: bool,
        options: &[String],
        read_only: bool,
    ) -> Result<crate::volume::VolumeView, VolumeError> {
        crate::sys::mount::parse_options(options).map_err(VolumeError::InvalidOptions)?;
        let path = self.check_mount_target(path)?;
        let v = self.find(name)?;
        let _g = self.guard(name)?;
        if v.fs == FsType::None {
            return Err(VolumeError::RawVolume(name.into()));
        }
        let path_s = path.to_string_lossy().into_owned();
        if let Some(rec) = self.local_record(v.id) {
            if rec.mounts.contains(&path_s) && crate::sys::mount::is_mount_point(&path) {
                return self.inspect(name);
            }
        }
        if crate::sys::mount::is_mount_point(&path) {
            return Err(VolumeError::InvalidPath(format!(
                "{path_s} is already a mount point"
            )));
        }
        let was_attached = self.local_record(v.id).is_some();
        let r = if read_only {
            if !v.formatted {
                return Err(VolumeError::NotFormatted(name.into()));
            }
            let dev = self.attach_reader_locked(&v)?;
            let opts = mount_options(v.fs, options, true);
            self.on_device(&v, || mount::mount(Path::new(&dev), &path, v.fs, &opts))
        } else {
            let dev = self.attach_locked(&v, force)?;
            self.format_and_mount(&v, Path::new(&dev), &path, options)
        };
        if let Err(e) = r {
            if !was_attached {
                let v = self.find(name)?;
                if let Err(e2) = self.teardown(&v, false, true) {
                    tracing::error!(volume = %name, error = %e2, "rolling back attach failed");
                }
            }
            return Err(e);
        }
        let mut rec = self.local_record(v.id).unwrap_or_default();
        if !rec.mounts.contains(&path_s) {
            rec.mounts.push(path_s.clone());
        }
        if !options.is_empty() {
            rec.options.insert(path_s.clone(), options.to_vec());
        }
        self.save_local(v.id, Some(&rec))?;
        tracing::info!(volume = %name, path = %path_s, "mounted volume");
        self.inspect(name)
    }

    pub(super) fn format_and_mount(
        &self,
        v: &Volume,
        dev: &Path,
        path: &Path,
        options: &[String],
    ) -> Result<(), VolumeError> {
        let current = self.find(&v.name)?;
        if !current.formatted {
            match self.on_device(v, || mount::probe_fs(dev))? {
                // A crash after mkfs but before the record: keep that filesystem.
                Some(t) if t == v.fs.as_str() => {}
                Some(t) => {
                    return Err(VolumeError::Device(format!(
                        "volume {:?} is not marked formatted but carries a {t} signature; refusing to format over it",
                        v.name
                    )))
                }
                None => {
                    tracing::info!(volume = %v.name, fs = v.fs.as_str(), "formatting volume (first use)");
                    self.on_device(v, || mount::format(dev, v.fs))?;
                }
            }
            self.propose(Command::MarkFormatted { id: v.id }, &v.name)?;
        }
        self.on_device(v, || {
            mount::grow_before_mount(v.fs, dev, current.size_bytes)
        })?;
        self.on_device(v, || mount::mount(dev, path, v.fs, options))?;
        if v.fs == FsType::Xfs {
            // XFS grows only while mounted; a no-op when it already fits.
            if let Err(e) = mount::grow(v.fs, dev, path) {
                tracing::warn!(volume = %v.name, error = %e, "growing xfs after mount failed");
            }
        }
        Ok(())
    }

    /// Runs a program or syscall that writes to `v`'s device (mkfs, a
    /// journal replay, a grow). Such a program sees only EIO or ENOSPC; when
    /// it fails, the engine's own reason is the error where it has one: it
    /// was fenced (the volume was attached elsewhere since) or stopped, or
    /// the volume's writes ran out of pool space meanwhile (PoolFull at the
    /// doors). The program's message otherwise.
    pub(super) fn on_device<T>(
        &self,
        v: &Volume,
        op: impl FnOnce() -> Result<T, String>,
    ) -> Result<T, VolumeError> {
        let engine = self.engine(v.id);
        let full = || {
            engine.as_ref().map_or(0, |e| {
                e.metrics
                    .no_space_errors
                    .load(std::sync::atomic::Ordering::Relaxed)
            })
        };
        let before = full();
        op().map_err(|e| {
            if let Some(why) = engine.as_ref().and_then(|en| en.retired()) {
                tracing::warn!(volume = %v.name, error = %e, reason = %why, "a program writing to the volume failed");
                VolumeError::engine(&v.name, why)
            } else if full() > before {
                tracing::warn!(volume = %v.name, error = %e, "the volume's pool ran out of space");
                VolumeError::engine(&v.name, EngineError::Replica(ReplicaError::NoSpace))
            } else {
                VolumeError::Device(e)
            }
        })
    }

    pub fn unmount(
        &self,
        name: &str,
        path: &str,
    ) -> Result<crate::volume::VolumeView, VolumeError> {
        let path = Self::check_path(path)?;
        let path_s = path.to_string_lossy().into_owned();
        let v = self.find(name)?;
        let _g = self.guard(name)?;
        let Some(mut rec) = self.local_record(v.id) else {
            return self.inspect(name);
        };
        if !rec.mounts.contains(&path_s) {
            return self.inspect(name);
        }
        self.forget_mount(&v, &mut rec, &path)?;
        if rec.mounts.is_empty() {
            self.teardown(&v, false, true)?;
        }
        tracing::info!(volume = %name, path = %path_s, "unmounted volume");
        self.inspect(name)
    }

    /// Unmounts `path`, one of `rec`'s recorded mounts of `v` (a busy one,
    /// or one a recorded target is bound from, is `InUse` and stays
    /// recorded), and records that it is gone.
    pub(super) fn forget_mount(
        &self,
        v: &Volume,
        rec: &mut LocalAttachment,
        path: &Path,
    ) -> Result<(), VolumeError> {
        let path_s = path.to_string_lossy().into_owned();
        // A target bound from this mount would keep showing the volume
        // after its device is gone.
        self.check_unpublished(v, rec, Some(&path_s))?;
        crate::sys::mount::umount(path, 0).map_err(|e| VolumeError::InUse {
            name: v.name.clone(),
            why: format!("unmounting {path_s}: {e}"),
        })?;
        rec.mounts.retain(|m| *m != path_s);
        rec.options.remove(&path_s);
        self.save_local(v.id, Some(rec))
    }
}
