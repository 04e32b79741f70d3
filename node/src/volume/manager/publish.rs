//! Staging and publication, the coarse operations a container orchestrator's
//! node service needs (CSI's NodeStage/NodePublish and their reverses; any
//! door may use them): stage attaches the volume and, for a filesystem,
//! formats it on first use and mounts it at a staging path; publish exposes
//! a staged volume at a target — a bind mount of the staged filesystem, or
//! of the device file for a raw block volume — read-only or not; usage
//! reports space and inodes at a staged or published path.
//!
//! Every publication is recorded in the volume's local record, beside its
//! mounts, so that unstaging refuses while a target still shows the volume,
//! a graceful stop keeps a published volume attached (its targets are in
//! use by definition), and a restart that had to bind a new loop device
//! binds the recorded targets again on the remounted filesystem.

use std::path::{Path, PathBuf};

use super::*;
use crate::sys::mount::{self as sysmount, MountEntry};

/// How [`VolumeManager::stage`] prepares a volume.
#[derive(Debug, Clone, Default)]
pub struct StageSpec {
    /// Attach only (a raw block volume; publish binds the device file);
    /// otherwise also format on first use and mount at the staging path.
    pub block: bool,
    /// As one of the volume's readers: read-only device and mount, no
    /// formatting, no attachment of its own.
    pub read_only: bool,
    /// Mount options (see [`crate::sys::mount::parse_options`]).
    pub options: Vec<String>,
}

/// How [`VolumeManager::publish`] exposes a staged volume.
#[derive(Debug, Clone, Copy, Default)]
pub struct PublishSpec {
    /// Bind the device file instead of the staged filesystem.
    pub block: bool,
    pub read_only: bool,
    /// Refuse a read-write publication while another target holds one
    /// (CSI's SINGLE_NODE_SINGLE_WRITER).
    pub sole_writer: bool,
}

/// Space and inodes at a staged or published path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathUsage {
    pub total_bytes: u64,
    pub used_bytes: u64,
    pub available_bytes: u64,
    /// (total, used, free); `None` for a raw block volume.
    pub inodes: Option<(u64, u64, u64)>,
}

/// One target a volume is published at, in its local record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Publication {
    pub path: String,
    /// The staging mount the target binds; `None` for the device file of
    /// a raw block volume.
    pub staging: Option<String>,
    pub read_only: bool,
}

/// Whether mount `m` shows the volume whose device is `dev`: a filesystem
/// mounted from it (staging) or bound from that mount (publish), or for a
/// raw block volume the device file bound onto a file.
fn shows_device(m: &MountEntry, dev: &Path, block: bool) -> bool {
    if dev.as_os_str().is_empty() {
        return false;
    }
    if block {
        dev.file_name()
            .is_some_and(|f| Path::new(&m.root).file_name() == Some(f))
    } else {
        Path::new(&m.source) == dev
    }
}

impl VolumeManager {
    /// Makes `name` usable on this node: attached (read-write, or with
    /// `read_only` as one of its readers) and, unless `block`, formatted on
    /// first use and mounted at `staging`. A repeat is a no-op; staging it
    /// again with the other read-only setting is refused.
    pub fn stage(&self, name: &str, staging: &str, how: &StageSpec) -> Result<(), VolumeError> {
        let staging = self.check_mount_target(staging)?;
        let v = self.find(name)?;
        let _g = self.guard(name)?;
        if let Some(rec) = self.local_record(v.id) {
            let here = how.block || rec.mounts.iter().any(|m| Path::new(m) == staging);
            if here && rec.read_only != how.read_only {
                return Err(VolumeError::PublishedDifferently {
                    name: name.into(),
                    path: staging,
                    how: if rec.read_only {
                        "it is staged read-only on this node".into()
                    } else {
                        "it is staged read-write on this node".into()
                    },
                });
            }
        }
        // Both are no-ops for what is attached (and mounted) already.
        let staging_s = staging.to_string_lossy();
        match (how.block, how.read_only) {
            (false, ro) => self
                .mount_with(name, &staging_s, false, &how.options, ro)
                .map(|_| ()),
            (true, false) => self.attach_locked(&v, false).map(|_| ()),
            (true, true) => self.attach_reader_locked(&v).map(|_| ()),
        }
    }

    /// The reverse of [`Self::stage`] (CSI NodeUnstage): unmounts `path`
    /// if the volume is mounted there and, once nothing of it is mounted
    /// or published on this node, unbinds its device (refused while a
    /// target still shows it). The attachment (or read-only hold) stays
    /// until the controller unpublishes, so the volume stays fenced to this
    /// node until then.
    pub fn unstage(&self, name: &str, path: &str) -> Result<(), VolumeError> {
        let path = Self::check_path(path)?;
        let path_s = path.to_string_lossy().into_owned();
        let v = self.find(name)?;
        let _g = self.guard(name)?;
        let Some(mut rec) = self.local_record(v.id) else {
            return Ok(());
        };
        if rec.mounts.contains(&path_s) {
            self.forget_mount(&v, &mut rec, &path)?;
        }
        if rec.mounts.is_empty() {
            // Refused while a target (a raw block one) still shows it.
            self.teardown(&v, false, false)?;
        }
        Ok(())
    }

    /// Exposes the staged volume at `target`: a bind mount of its
    /// filesystem staged at `staging`, or with `block` of its device file
    /// (the target file is created). Recorded, so unstage, shutdown and
    /// restart know the target. A repeat is a no-op; a target that shows
    /// the volume with the other read-only setting, or shows something
    /// else, is refused.
    pub fn publish(
        &self,
        name: &str,
        staging: &str,
        target: &str,
        how: PublishSpec,
    ) -> Result<(), VolumeError> {
        let target = self.check_mount_target(target)?;
        let staging = Self::check_path(staging)?;
        let target_s = target.to_string_lossy().into_owned();
        let v = self.find(name)?;
        let _g = self.guard(name)?;
        let not_staged = || VolumeError::NotStaged {
            name: name.into(),
            path: staging.clone(),
        };
        let mut rec = self.local_record(v.id).ok_or_else(not_staged)?;
        let publication = Publication {
            path: target_s.clone(),
            staging: (!how.block).then(|| staging.to_string_lossy().into_owned()),
            read_only: how.read_only,
        };
        let dev = PathBuf::from(&rec.device);
        let table = sysmount::mounts();
        if let Some(m) = table.iter().find(|m| m.mount_point == target) {
            let ours = shows_device(m, &dev, how.block);
            if ours && m.read_only == how.read_only {
                // A repeat, or a bind made before a crash kept it from
                // being recorded: record it now.
                if !rec.published.iter().any(|p| p.path == target_s) {
                    rec.published.push(publication);
                    self.save_local(v.id, Some(&rec))?;
                }
                return Ok(());
            }
            return Err(VolumeError::PublishedDifferently {
                name: name.into(),
                path: target,
                how: if ours {
                    "published there with the other read-only setting".into()
                } else {
                    "not what is mounted there".into()
                },
            });
        }
        // Recorded but no longer mounted (unmounted behind our back).
        rec.published.retain(|p| p.path != target_s);
        if how.sole_writer && !how.read_only {
            if let Some(p) = rec.published.iter().find(|p| !p.read_only) {
                return Err(VolumeError::InUse {
                    name: name.into(),
                    why: format!(
                        "it is published read-write at {}; a single writer was asked for",
                        p.path
                    ),
                });
            }
        }
        let source = if how.block {
            if rec.device.is_empty() || !self.is_bound(v.id, &rec) {
                return Err(not_staged());
            }
            if let Some(dir) = target.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| VolumeError::Device(format!("{}: {e}", dir.display())))?;
            }
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&target)
                .map_err(|e| VolumeError::Device(format!("{}: {e}", target.display())))?;
            dev.clone()
        } else {
            let staged = rec.mounts.iter().any(|m| Path::new(m) == staging)
                && table
                    .iter()
                    .any(|m| m.mount_point == staging && shows_device(m, &dev, false));
            if !staged {
                return Err(not_staged());
            }
            std::fs::create_dir_all(&target)
                .map_err(|e| VolumeError::Device(format!("{}: {e}", target.display())))?;
            staging.clone()
        };
        sysmount::bind(&source, &target, how.read_only).map_err(|e| {
            VolumeError::Device(format!(
                "bind mount {} on {}: {e}",
                source.display(),
                target.display()
            ))
        })?;
        rec.published.push(publication);
        if let Err(e) = self.save_local(v.id, Some(&rec)) {
            // Nothing half-done: a bind the record does not know is undone.
            let _ = sysmount::umount(&target, 0);
            return Err(e);
        }
        tracing::info!(volume = %name, target = %target.display(), read_only = how.read_only, "published volume");
        Ok(())
    }

    /// Takes down whatever is mounted at `target` (the volume's bind mount;
    /// a stale one of an earlier device too), removes the target and drops
    /// its record. Idempotent; a volume that no longer exists only has its
    /// leftover target cleaned up.
    pub fn unpublish(&self, name: &str, target: &str) -> Result<(), VolumeError> {
        let target = self.check_mount_target(target)?;
        let target_s = target.to_string_lossy().into_owned();
        let v = match self.find(name) {
            Ok(v) => Some(v),
            Err(VolumeError::NotFound(_)) => None,
            Err(e) => return Err(e),
        };
        let _g = self.guard(name)?;
        if sysmount::is_mount_point(&target) {
            sysmount::umount(&target, 0).map_err(|e| VolumeError::InUse {
                name: name.into(),
                why: format!("unmounting {target_s}: {e}"),
            })?;
            tracing::info!(volume = %name, target = %target_s, "unpublished volume");
        }
        let removed = match std::fs::symlink_metadata(&target) {
            Ok(m) if m.is_dir() => std::fs::remove_dir(&target),
            Ok(_) => std::fs::remove_file(&target),
            Err(e) => Err(e),
        };
        if let Err(e) = removed {
            if e.kind() != std::io::ErrorKind::NotFound {
                return Err(VolumeError::Device(format!("removing {target_s}: {e}")));
            }
        }
        if let Some(v) = v {
            if let Some(mut rec) = self.local_record(v.id) {
                if rec.published.iter().any(|p| p.path == target_s) {
                    rec.published.retain(|p| p.path != target_s);
                    self.save_local(v.id, Some(&rec))?;
                }
            }
        }
        Ok(())
    }

    /// Space and inodes at `path`, which must be where this node stages or
    /// publishes the volume (and show it now); `NotFound` otherwise.
    pub fn usage(&self, name: &str, path: &Path) -> Result<PathUsage, VolumeError> {
        let v = self.find(name)?;
        let path = Self::check_path(&path.to_string_lossy())?;
        let elsewhere = || VolumeError::NotShownAt {
            name: name.into(),
            path: path.clone(),
        };
        let rec = self.local_record(v.id).ok_or_else(elsewhere)?;
        let block = v.fs == FsType::None;
        let recorded = rec.mounts.iter().any(|m| Path::new(m) == path)
            || rec.published.iter().any(|p| Path::new(&p.path) == path);
        let dev = PathBuf::from(&rec.device);
        let shown = recorded
            && sysmount::mounts()
                .iter()
                .any(|m| m.mount_point == path && shows_device(m, &dev, block));
        if !shown {
            return Err(elsewhere());
        }
        if block {
            return Ok(PathUsage {
                total_bytes: v.size_bytes,
                used_bytes: 0,
                available_bytes: 0,
                inodes: None,
            });
        }
        let (total, used, avail, itotal, iused, ifree) = sysmount::statvfs(&path)
            .map_err(|e| VolumeError::Device(format!("statvfs {}: {e}", path.display())))?;
        Ok(PathUsage {
            total_bytes: total,
            used_bytes: used,
            available_bytes: avail,
            inodes: Some((itotal, iused, ifree)),
        })
    }

    /// Refuses while a recorded target still shows the volume (pruning
    /// records of targets that no longer do); `staging`, when given, only
    /// counts the targets bound from that staging mount.
    pub(super) fn check_unpublished(
        &self,
        v: &Volume,
        rec: &mut LocalAttachment,
        staging: Option<&str>,
    ) -> Result<(), VolumeError> {
        if rec.published.is_empty() {
            return Ok(());
        }
        let table = sysmount::mounts();
        let before = rec.published.len();
        rec.published.retain(|p| {
            table
                .iter()
                .any(|m| Path::new(&m.mount_point) == Path::new(&p.path))
        });
        if rec.published.len() != before {
            self.save_local(v.id, Some(rec))?;
        }
        let busy: Vec<&str> = rec
            .published
            .iter()
            .filter(|p| staging.is_none() || p.staging.as_deref() == staging)
            .map(|p| p.path.as_str())
            .collect();
        if busy.is_empty() {
            return Ok(());
        }
        Err(VolumeError::InUse {
            name: v.name.clone(),
            why: format!("it is published at {}; unpublish it first", busy.join(", ")),
        })
    }

    /// After a restart bound a new device (and mounted its filesystem
    /// again): the recorded targets show the old device, if anything; each
    /// is bound again from the new one. False (logged) for a target that
    /// could not be.
    pub(super) fn publish_again(&self, v: &Volume, rec: &LocalAttachment, p: &Publication) -> bool {
        let target = Path::new(&p.path);
        let dev = PathBuf::from(&rec.device);
        let block = p.staging.is_none();
        let table = sysmount::mounts();
        if let Some(m) = table.iter().find(|m| m.mount_point == target) {
            if shows_device(m, &dev, block) {
                return true;
            }
            // The stale bind of a device that is gone; a process may still
            // hold it, so detach it lazily.
            if let Err(e) = sysmount::umount(target, libc::MNT_DETACH) {
                tracing::error!(volume = %v.name, target = %p.path, error = %e, "cannot take down a stale publication");
                return false;
            }
        }
        let source = match &p.staging {
            Some(s) => PathBuf::from(s),
            None => dev,
        };
        match sysmount::bind(&source, target, p.read_only) {
            Ok(()) => {
                tracing::info!(volume = %v.name, target = %p.path, "published again after restart");
                true
            }
            Err(e) => {
                tracing::error!(volume = %v.name, target = %p.path, error = %e, "cannot publish again after restart");
                false
            }
        }
    }
}
