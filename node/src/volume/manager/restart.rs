//! Restart and shutdown: re-serving this node's attachments when the
//! daemon starts (taking over the FUSE connection the holder kept, or
//! binding new loop devices), and the graceful shutdown that unmounts,
//! unbinds and flushes what nothing uses, hands what is in use to the FUSE
//! holder, and records a clean stop.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use super::{mount, mount_options, VolumeManager};
use crate::cluster::state::{Command, StateError, Volume};
use crate::cluster::store::StoreError;
use crate::engine::EngineError;
use crate::replica::ReplicaError;
use crate::types::VolumeId;

impl VolumeManager {
    /// Re-serves this node's attachments. With an adopted FUSE connection,
    /// loop devices still bound to it keep their mounts: their files are
    /// marked expected before the session threads start and the kernel
    /// resends what the old daemon left unanswered, so those requests wait
    /// (instead of failing) until [`Self::readopt`] has each volume's
    /// engine ready. Anything else gets a new loop device and its mounts
    /// again.
    pub(super) fn reserve_attachments(self: &Arc<Self>, adopted: bool) {
        let state = self.store.read().clone();
        let mut recorded = self.local_records();
        if adopted {
            let mut kept = Vec::new();
            recorded.retain(|(id, rec)| {
                let keep = state
                    .volumes
                    .get(id)
                    .is_some_and(|v| self.held_here(v, rec.read_only))
                    && self.is_bound(*id, rec);
                if keep {
                    kept.push((*id, rec.read_only));
                }
                !keep
            });
            let until = self.started + self.cfg.orphan_io_timeout;
            let ids: Vec<VolumeId> = kept.iter().map(|(id, _)| *id).collect();
            if let Err(e) = self.frontend.serve(&ids, until) {
                tracing::error!(frontend = self.frontend.kind(), error = %e, "cannot serve the devices taken over");
            }
            for (id, read_only) in kept {
                let epoch = state.volumes[&id].attachment.as_ref().map(|a| a.epoch);
                let mgr = self.clone();
                let spawned = self
                    .cfg
                    .threads
                    .spawn(format!("readopt-{}", &id.to_string()[..8]), move || {
                        mgr.readopt(id, read_only, epoch)
                    });
                if let Err(e) = spawned {
                    tracing::error!(volume = %id, error = %e, "cannot start re-serving a kept attachment");
                    self.frontend.abandon(id);
                }
            }
        }
        for (id, mut rec) in recorded {
            let Some(v) = state
                .volumes
                .get(&id)
                .filter(|v| self.held_here(v, rec.read_only))
            else {
                let _ = self.save_local(id, None);
                continue;
            };
            match self.bind_device(v, rec.read_only) {
                Ok(dev) => {
                    rec.device = dev.clone();
                    // Not a graceful stop, and the kernel did not keep the
                    // requests: writes in flight then may differ.
                    if !std::mem::take(&mut rec.clean_stop) && !rec.read_only {
                        if let Some(e) = self.engine(id) {
                            e.start_resync();
                        }
                    }
                    let mounts = std::mem::take(&mut rec.mounts);
                    for m in mounts {
                        if self.mount_again(v, &rec, &m) {
                            rec.mounts.push(m);
                        }
                    }
                    // Targets bound from a staging mount that is not back
                    // cannot show the volume again: dropped (unpublish
                    // cleans up what is left there).
                    let published = std::mem::take(&mut rec.published);
                    for p in published {
                        let source_back = p.staging.as_ref().is_none_or(|s| rec.mounts.contains(s));
                        if source_back && self.publish_again(v, &rec, &p) {
                            rec.published.push(p);
                        }
                    }
                    tracing::info!(volume = %v.name, device = %dev, mounts = rec.mounts.len(), published = rec.published.len(), "re-served attachment");
                    let _ = self.save_local(id, Some(&rec));
                }
                Err(e) => {
                    tracing::error!(volume = %v.name, error = %e, "cannot re-serve attachment; detaching");
                    let _ = self.save_local(id, None);
                    let _ = self.propose(self.release(id, rec.read_only), &v.name);
                }
            }
        }
        // Attachments (or reader holds) recorded in the state without local
        // reality (a crash between the command and the local record).
        for v in state.volumes.values() {
            for read_only in [false, true] {
                if self.held_here(v, read_only) && self.local_record(v.id).is_none() {
                    let _ = self.propose(self.release(v.id, read_only), &v.name);
                }
            }
        }
    }

    /// Whether the state has `v` attached to this node (or, with
    /// `read_only`, held by it as a reader).
    pub(super) fn held_here(&self, v: &Volume, read_only: bool) -> bool {
        let me = self.cfg.node_id;
        if read_only {
            v.readers.contains(&me)
        } else {
            v.attachment.as_ref().is_some_and(|a| a.node == me)
        }
    }

    /// The command that gives up this node's hold on volume `id`.
    pub(super) fn release(&self, id: VolumeId, read_only: bool) -> Command {
        let node = self.cfg.node_id;
        if read_only {
            Command::DetachReader { id, node }
        } else {
            Command::Detach { id, node }
        }
    }

    /// Serves an attachment whose loop device survived the restart on the
    /// adopted FUSE connection (its mounts are untouched), retrying what
    /// fails because of this daemon's own start-up (no quorum yet, a replica
    /// node not answering yet) until the orphan I/O timeout. `start_epoch`
    /// is the attachment's epoch when the daemon started: with a remote
    /// replica the attachment moves to a new one first, so nothing the
    /// previous incarnation sent can land after the requests it left are
    /// served again.
    fn readopt(self: Arc<Self>, id: VolumeId, read_only: bool, start_epoch: Option<u64>) {
        let name = id.to_string();
        let deadline = self.started + self.cfg.orphan_io_timeout;
        let volume = self
            .store
            .read()
            .volumes
            .get(&id)
            .map_or_else(|| name.clone(), |v| v.name.clone());
        // API calls on the volume wait for this (Busy) instead of racing it.
        let _g = loop {
            match self.guard(&volume) {
                Ok(g) => break g,
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(50)),
            }
        };
        let mut said = false;
        loop {
            match self.try_readopt(id, read_only, start_epoch) {
                Ok(v) => {
                    tracing::info!(volume = %v.name, epoch = v.epoch, "attachment kept across the restart");
                    self.settle_kept(&v);
                    return;
                }
                Err(Readopt::Never(why)) => {
                    tracing::error!(volume = %id, error = %why, "cannot serve a kept attachment again: its I/O fails");
                    break;
                }
                Err(Readopt::NotYet(why)) if Instant::now() < deadline => {
                    if !said {
                        tracing::info!(volume = %id, error = %why, "kept attachment not ready yet; its I/O waits");
                        said = true;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(250));
                }
                Err(Readopt::NotYet(why)) => {
                    tracing::error!(volume = %id, error = %why, timeout = ?self.cfg.orphan_io_timeout, "kept attachment not ready within the orphan I/O timeout: its I/O fails");
                    break;
                }
            }
        }
        self.frontend.abandon(id);
    }

    /// A kept attachment served again: its record no longer says "clean
    /// stop" (this daemon serves writes now; only its own graceful stop may
    /// say so again), and mounts that the previous daemon's stop had taken
    /// down already (it stopped at a busy one) are mounted again, and the
    /// targets bound from them.
    fn settle_kept(&self, v: &Volume) {
        let Some(mut rec) = self.local_record(v.id) else {
            return;
        };
        if std::mem::take(&mut rec.clean_stop) {
            if let Err(e) = self.save_local(v.id, Some(&rec)) {
                tracing::error!(volume = %v.name, error = %e, "cannot record that the volume serves again");
            }
        }
        for m in &rec.mounts {
            if !crate::sys::mount::is_mount_point(Path::new(m)) {
                self.mount_again(v, &rec, m);
            } else if crate::sys::mount::thaw(Path::new(m)) {
                tracing::warn!(volume = %v.name, mount = %m, "thawed a filesystem the previous daemon had frozen for a snapshot");
            }
        }
        for p in &rec.published {
            if !crate::sys::mount::is_mount_point(Path::new(&p.path)) {
                self.publish_again(v, &rec, p);
            }
        }
    }

    /// Mounts `rec.device` at `path`, one of the record's mounts of `v`,
    /// with its recorded options; false (logged) when that fails.
    fn mount_again(&self, v: &Volume, rec: &super::LocalAttachment, path: &str) -> bool {
        let given = rec.options.get(path).cloned().unwrap_or_default();
        let options = mount_options(v.fs, &given, rec.read_only);
        match mount::mount(Path::new(&rec.device), Path::new(path), v.fs, &options) {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(volume = %v.name, path = %path, error = %e, "cannot re-mount after restart");
                false
            }
        }
    }

    fn try_readopt(
        &self,
        id: VolumeId,
        read_only: bool,
        start_epoch: Option<u64>,
    ) -> Result<Volume, Readopt> {
        let v = self
            .store
            .read()
            .volumes
            .get(&id)
            .cloned()
            .ok_or_else(|| Readopt::Never("the volume was deleted".into()))?;
        if !self.held_here(&v, read_only) {
            return Err(Readopt::Never(
                "the volume is no longer attached to this node".into(),
            ));
        }
        // Only a remote replica can still receive what the previous
        // incarnation sent (a local write died with it): a volume whose
        // replicas are all here needs no new epoch, and no quorum.
        let remote = v.replicas.iter().any(|r| r.node != self.cfg.node_id);
        let v = match (read_only, v.attachment.as_ref().map(|a| a.epoch)) {
            (false, Some(epoch)) if remote && Some(epoch) == start_epoch => {
                let r = self.store.propose(Command::Reattach {
                    id,
                    node: self.cfg.node_id,
                    epoch,
                });
                match r {
                    Ok(s) => s
                        .volumes
                        .get(&id)
                        .cloned()
                        .ok_or_else(|| Readopt::Never("the volume was deleted".into()))?,
                    Err(StoreError::Refused(
                        e @ (StateError::AttachedElsewhere { .. }
                        | StateError::NotAttached { .. }
                        | StateError::VolumeNotFound(_)),
                    )) => return Err(Readopt::Never(e.to_string())),
                    // StaleEpoch: moved on already, seen on a later round.
                    Err(e) => return Err(Readopt::NotYet(format!("new epoch: {e}"))),
                }
            }
            _ => v,
        };
        let epoch = v.attachment.as_ref().map_or(v.epoch, |a| a.epoch);
        let engine = self
            .engine_for(&v)
            .map_err(|e| Readopt::NotYet(e.to_string()))?;
        engine.activate(&v, epoch).map_err(|e| match e {
            EngineError::Replica(ReplicaError::Fenced { .. }) => Readopt::Never(e.to_string()),
            e => Readopt::NotYet(e.to_string()),
        })?;
        if !self.frontend.adopt(id, engine) {
            return Err(Readopt::Never("the daemon is shutting down".into()));
        }
        Ok(v)
    }

    /// Graceful shutdown. Every attachment nothing uses any more is
    /// unmounted and unbound (its record is kept, so the next start serves
    /// it again). One that is still in use (a busy mount, another mount of
    /// its filesystem or device, a process holding the device open) stays
    /// as it is, and the FUSE connection is handed to the holder instead of
    /// unmounted: the session threads answer what they read and stop, the
    /// rest of the I/O waits in the kernel for the next daemon, as across a
    /// crash, so a stop never fails a writer. Then every engine is flushed
    /// and the stop recorded as clean.
    pub fn shutdown(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::Release);
        let recorded = self.local_records();
        let mut busy = Vec::new();
        for (id, rec) in &recorded {
            match self.release_at_shutdown(*id, rec) {
                Ok(()) => {}
                Err(why) => busy.push((*id, why)),
            }
        }
        for (id, why) in &busy {
            tracing::info!(volume = %id, reason = %why, timeout = ?self.cfg.orphan_io_timeout, "volume in use: it stays attached across the stop, its I/O waits in the FUSE holder for the next daemon");
        }
        let handed_off = self.frontend.stop(!busy.is_empty());
        for e in self.engines.read().expect("engines lock").values() {
            e.stop();
            match e.flush() {
                // A request still being served after the hand-off could
                // yet be acknowledged: then the stop is not clean.
                Ok(()) if handed_off => {
                    if let Some(mut rec) = self.local_record(e.volume) {
                        rec.clean_stop = true;
                        let _ = self.save_local(e.volume, Some(&rec));
                    }
                }
                Ok(()) => {}
                Err(err) => {
                    tracing::error!(volume = %e.volume, error = %err, "flush at shutdown failed")
                }
            }
        }
        self.frontend.close();
        let _ = self.db.flush();
    }

    /// Unmounts and unbinds one recorded attachment unless it is in use;
    /// says why it is.
    fn release_at_shutdown(
        &self,
        id: VolumeId,
        rec: &super::LocalAttachment,
    ) -> Result<(), String> {
        use crate::sys::mount;
        // A published target is in use by definition (a pod's volume).
        if let Some(p) = rec
            .published
            .iter()
            .find(|p| mount::is_mount_point(Path::new(&p.path)))
        {
            return Err(format!("it is published at {}", p.path));
        }
        for m in rec.mounts.iter().rev() {
            match mount::umount(Path::new(m), 0) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    return Err(format!("{m} is busy"));
                }
                Err(e) => return Err(format!("unmounting {m} failed: {e}")),
            }
        }
        if !rec.device.is_empty() {
            if let Some(why) = self.frontend.in_use(Path::new(&rec.device)) {
                return Err(format!("{}: {why}", rec.device));
            }
        }
        self.unbind_device(id, &rec.device)
            .map_err(|e| format!("unbinding failed: {e}"))
    }
}

/// Why a kept attachment is not served again (yet).
enum Readopt {
    /// Retried: the daemon's own start-up (no quorum, a peer not ready).
    NotYet(String),
    /// Final: the volume moved, was deleted, or this engine is fenced.
    Never(String),
}
