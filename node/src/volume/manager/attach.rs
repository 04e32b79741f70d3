//! Attach and detach: the FUSE file and loop device of a volume served
//! here (read-write, or read-only as one of its readers), CSI's
//! controller publish/unpublish (attachment records in the state), and the
//! teardown that releases them.

use std::path::Path;

use super::*;

impl VolumeManager {
    pub fn attach(&self, name: &str, force: bool) -> Result<String, VolumeError> {
        let v = self.find(name)?;
        let _g = self.guard(name)?;
        self.attach_locked(&v, force)
    }

    pub(super) fn attach_locked(&self, v: &Volume, force: bool) -> Result<String, VolumeError> {
        if let Some(rec) = self.local_record(v.id) {
            if rec.read_only {
                return Err(VolumeError::InUse {
                    name: v.name.clone(),
                    why: "this node holds it read-only".into(),
                });
            }
            if self.is_bound(v.id, &rec) {
                return Ok(rec.device);
            }
        }
        // Taking over from another node's attachment: its engine may have
        // died with writes in flight that reached some replicas only.
        let took_over = force
            && v.attachment
                .as_ref()
                .is_some_and(|a| a.node != self.cfg.node_id);
        // An NBD writer cannot appear meanwhile: opening one takes the guard
        // the caller holds.
        let nbd_writer = self
            .exports
            .lock()
            .expect("exports lock")
            .get(&v.id)
            .is_some_and(|u| u.writers > 0);
        if nbd_writer {
            return Err(VolumeError::InUse {
                name: v.name.clone(),
                why: "it is open for writing over NBD".into(),
            });
        }
        self.propose(
            Command::Attach {
                id: v.id,
                node: self.cfg.node_id,
                force,
            },
            &v.name,
        )?;
        let v = &self.find(&v.name)?;
        match self.bind_device(v, false) {
            Ok(dev) => {
                let mut rec = self.local_record(v.id).unwrap_or_default();
                rec.device = dev.clone();
                self.save_local(v.id, Some(&rec))?;
                tracing::info!(volume = %v.name, device = %dev, "attached volume");
                if took_over {
                    if let Some(e) = self.engine(v.id) {
                        e.start_resync();
                    }
                }
                Ok(dev)
            }
            Err(e) => {
                let _ = self.propose(
                    Command::Detach {
                        id: v.id,
                        node: self.cfg.node_id,
                    },
                    &v.name,
                );
                Err(e)
            }
        }
    }

    pub(super) fn is_bound(&self, id: VolumeId, rec: &LocalAttachment) -> bool {
        self.frontend.is_bound(id, Path::new(&rec.device))
    }

    /// Holds the volume read-only on this node (recorded as a reader in the
    /// state, which keeps writers out): a read-only loop device on an
    /// engine at the volume's epoch.
    pub(super) fn attach_reader_locked(&self, v: &Volume) -> Result<String, VolumeError> {
        if let Some(rec) = self.local_record(v.id) {
            if !rec.read_only {
                return Err(VolumeError::InUse {
                    name: v.name.clone(),
                    why: "it is attached read-write on this node".into(),
                });
            }
            if self.is_bound(v.id, &rec) {
                return Ok(rec.device);
            }
        }
        let me = self.cfg.node_id;
        self.propose(Command::AttachReader { id: v.id, node: me }, &v.name)?;
        let v = &self.find(&v.name)?;
        match self.bind_device(v, true) {
            Ok(dev) => {
                let rec = LocalAttachment {
                    device: dev.clone(),
                    read_only: true,
                    ..Default::default()
                };
                self.save_local(v.id, Some(&rec))?;
                tracing::info!(volume = %v.name, device = %dev, "attached volume read-only");
                Ok(dev)
            }
            Err(e) => {
                let _ = self.propose(self.release(v.id, true), &v.name);
                Err(e)
            }
        }
    }

    /// FUSE file + loop device for a volume attached to this node (the
    /// engine moves to the attachment's epoch first, which fences any older
    /// engine on every replica) or, with `read_only`, held by this node as
    /// a reader (the volume's epoch; the loop device cannot write).
    pub(super) fn bind_device(&self, v: &Volume, read_only: bool) -> Result<String, VolumeError> {
        let epoch = match &v.attachment {
            None if read_only && v.readers.contains(&self.cfg.node_id) => v.epoch,
            Some(a) if !read_only && a.node == self.cfg.node_id => a.epoch,
            _ => {
                return Err(VolumeError::AttachedElsewhere {
                    name: v.name.clone(),
                    node: v
                        .attachment
                        .as_ref()
                        .map(|a| self.node_name(a.node))
                        .unwrap_or_default(),
                })
            }
        };
        let engine = self.engine_for(v)?;
        engine
            .activate(v, epoch)
            .map_err(|e| VolumeError::engine(&v.name, e))?;
        if self.frontend.stopped() {
            return Err(VolumeError::ShuttingDown);
        }
        self.frontend
            .attach(v.id, engine, read_only)
            .map(|dev| dev.to_string_lossy().into_owned())
            .map_err(VolumeError::Device)
    }

    /// Records the volume's attachment to `node` (CSI ControllerPublish),
    /// or with `read_only` adds `node` to its readers; that node binds the
    /// device when it stages the volume. Each new attachment raises the
    /// epoch, fencing any engine of an older one.
    pub fn attach_to(&self, name: &str, node: NodeId, read_only: bool) -> Result<(), VolumeError> {
        let v = self.find(name)?;
        let _g = self.guard(name)?;
        let cmd = if read_only {
            Command::AttachReader { id: v.id, node }
        } else {
            Command::Attach {
                id: v.id,
                node,
                force: false,
            }
        };
        self.propose(cmd, name)
    }

    /// Clears the volume's attachment to `node` or that node's reader hold,
    /// if it has one (CSI ControllerUnpublish, also for a dead node).
    /// Refused while this node still serves it: unstaging tears the device
    /// down first.
    pub fn detach_from(&self, name: &str, node: NodeId) -> Result<(), VolumeError> {
        let v = self.find(name)?;
        let _g = self.guard(name)?;
        let writer = v.attachment.as_ref().is_some_and(|a| a.node == node);
        if !writer && !v.readers.contains(&node) {
            return Ok(());
        }
        if node == self.cfg.node_id && self.local_record(v.id).is_some() {
            return Err(VolumeError::InUse {
                name: name.into(),
                why: "it is still attached on this node; unstage it first".into(),
            });
        }
        let cmd = if writer {
            Command::Detach { id: v.id, node }
        } else {
            Command::DetachReader { id: v.id, node }
        };
        self.propose(cmd, name)
    }

    /// Holds the volume read-only on this node; returns the (read-only)
    /// device.
    pub fn attach_reader(&self, name: &str) -> Result<String, VolumeError> {
        let v = self.find(name)?;
        let _g = self.guard(name)?;
        self.attach_reader_locked(&v)
    }

    /// A copy of the committed cluster state as this node knows it.
    pub fn state(&self) -> crate::cluster::state::ClusterState {
        self.store.read().clone()
    }

    pub fn detach(&self, name: &str) -> Result<(), VolumeError> {
        let v = self.find(name)?;
        let _g = self.guard(name)?;
        if self.local_record(v.id).is_some_and(|r| r.read_only) {
            return self.teardown(&v, false, true);
        }
        match &v.attachment {
            None => return Ok(()),
            Some(a) if a.node != self.cfg.node_id => {
                return Err(VolumeError::AttachedElsewhere {
                    name: name.into(),
                    node: a.node.to_string(),
                })
            }
            Some(_) => {}
        }
        self.teardown(&v, false, true)
    }

    /// Unmounts (only with `unmount`), unbinds and, with `release`,
    /// records the detach (or the end of this node's read-only hold).
    pub(super) fn teardown(
        &self,
        v: &Volume,
        unmount: bool,
        release: bool,
    ) -> Result<(), VolumeError> {
        let mut rec = self.local_record(v.id).unwrap_or_default();
        if unmount {
            while let Some(p) = rec.published.first().cloned() {
                let target = Path::new(&p.path);
                if crate::sys::mount::is_mount_point(target) {
                    crate::sys::mount::umount(target, 0).map_err(|e| VolumeError::InUse {
                        name: v.name.clone(),
                        why: format!("unmounting {}: {e}", p.path),
                    })?;
                }
                rec.published.remove(0);
                self.save_local(v.id, Some(&rec))?;
            }
        } else {
            self.check_unpublished(v, &mut rec, None)?;
        }
        if !rec.mounts.is_empty() {
            if !unmount {
                return Err(VolumeError::Mounted {
                    name: v.name.clone(),
                    paths: rec.mounts.join(", "),
                });
            }
            while let Some(m) = rec.mounts.first().cloned() {
                crate::sys::mount::umount(Path::new(&m), 0).map_err(|e| VolumeError::InUse {
                    name: v.name.clone(),
                    why: format!("unmounting {m}: {e}"),
                })?;
                rec.mounts.remove(0);
                self.save_local(v.id, Some(&rec))?;
            }
        }
        self.unbind_device(v.id, &rec.device)?;
        self.save_local(v.id, None)?;
        // Everything written is durable on the replicas before the volume
        // is released to another node.
        if !rec.read_only {
            if let Some(e) = self.engine(v.id) {
                if let Err(err) = e.flush() {
                    tracing::error!(volume = %v.name, error = %err, "flush before detach failed");
                }
            }
        }
        if !release {
            tracing::info!(volume = %v.name, "unbound volume; its attachment stays");
            return Ok(());
        }
        self.propose(self.release(v.id, rec.read_only), &v.name)?;
        tracing::info!(volume = %v.name, read_only = rec.read_only, "detached volume");
        Ok(())
    }

    pub(super) fn unbind_device(&self, id: VolumeId, device: &str) -> Result<(), VolumeError> {
        self.frontend
            .detach(id, Path::new(device))
            .map_err(VolumeError::Device)
    }
}
