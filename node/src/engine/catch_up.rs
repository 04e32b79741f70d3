//! A rebuild carries snapshots: before a faulted replica's head is made
//! equal to the volume's, it is given every ready snapshot it lacks.
//!
//! While the replica is recorded faulted no engine writes to it, so its
//! head is free to be rewritten. For each missing snapshot, oldest first,
//! the rebuild makes the head equal to that snapshot on a healthy replica
//! holding it (copying only extents whose checksums differ, with the
//! repair admission of [`crate::replica::host::Admit::Repair`]), flushes,
//! has the replica freeze its head as that snapshot (ADOPT: a late local
//! copy of the same id is dropped first) and records it a holder
//! ([`Command::SnapshotCopied`]). Only then does the head phase start
//! (rebuilding, then healthy). A snapshot is read only from replicas the
//! state lists for it, so one in the middle of being copied is never
//! read; the reconciler leaves a faulted replica's unrecorded snapshots
//! alone, so an adopted one is not freed before it is recorded.
//!
//! A snapshot taken while a replica rebuilds is not taken by it (its data
//! is incomplete): the healer records such a healthy replica faulted again
//! once a healthy holder exists, and the next rebuild copies it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::*;
use crate::cluster::state::{Command, Snapshot};
use crate::replica::remote::Scan;
use crate::replica::ReplicaError;

impl Engine {
    /// Ready snapshots of the volume that the replica on `node` lacks,
    /// oldest first, each with a healthy replica holding it.
    pub(super) fn missing_snapshots(&self, node: NodeId) -> Vec<(Snapshot, Arc<Slot>)> {
        let mut missing: Vec<Snapshot> = {
            let s = self.ctx.store.read();
            s.snapshots_of(self.volume)
                .into_iter()
                .filter(|x| x.ready && !x.replicas.contains(&node))
                .cloned()
                .collect()
        };
        missing.sort_by_key(|x| (x.created_unix_ms, x.id));
        let healthy = self.slots_where(|st| st == HEALTHY);
        missing
            .into_iter()
            .filter_map(|x| {
                let src = healthy
                    .iter()
                    .find(|s| s.node != node && x.replicas.contains(&s.node))?;
                Some((x, src.clone()))
            })
            .collect()
    }

    /// Copies every snapshot the faulted replica of `slot` lacks to it
    /// (see the module doc); returns the bytes copied.
    pub(super) fn catch_up_snapshots(&self, slot: &Arc<Slot>) -> Result<u64, String> {
        let missing = self.missing_snapshots(slot.node);
        let es = self.extent_size;
        let total: u64 = missing
            .iter()
            .map(|(x, _)| x.size_bytes.div_ceil(es))
            .sum::<u64>()
            + self.size().div_ceil(es);
        *self.progress.lock().expect("progress lock") = RebuildProgress {
            node: Some(slot.node),
            done_extents: 0,
            total_extents: total,
        };
        let mut copied = 0;
        for (snap, src) in missing {
            copied += self
                .copy_snapshot(slot, &snap, &src)
                .map_err(|e| format!("snapshot {} ({}): {e}", snap.name, snap.id))?;
            tracing::info!(volume = %self.volume, node = %slot.node, snapshot = %snap.name, "snapshot copied to the replica");
        }
        Ok(copied)
    }

    fn copy_snapshot(&self, slot: &Slot, snap: &Snapshot, src: &Slot) -> Result<u64, String> {
        const BATCH: u64 = 64;
        let epoch = self.epoch();
        let rt = &self.ctx.handle;
        let es = self.extent_size;
        let total = snap.size_bytes.div_ceil(es);
        let head = Scan {
            repair: true,
            ..Scan::head()
        };
        let of_snap = |allocation_only| Scan {
            snapshot: Some(snap.id),
            allocation_only,
            repair: false,
        };
        let started = Instant::now();
        let done = AtomicU64::new(0);
        let mut first = 0;
        while first < total {
            if self.stopped.load(Ordering::Acquire) || slot.state() != FAULTED {
                return Err("rebuild interrupted".into());
            }
            let count = BATCH.min(total - first);
            let b = slot
                .target
                .scan(rt, epoch, head, first, count)
                .map_err(|e| format!("target checksums: {e}"))?;
            // A target with nothing in the batch (a new replica) is given
            // every extent the snapshot has, found from its map alone.
            let fresh = b.iter().all(Option::is_none);
            let a = src
                .target
                .scan(rt, epoch, of_snap(fresh), first, count)
                .map_err(|e| format!("source checksums: {e}"))?;
            let differ: Vec<u64> = a
                .iter()
                .zip(b.iter())
                .enumerate()
                .filter(|(_, (x, y))| {
                    if fresh {
                        x.is_some()
                    } else {
                        self.norm(**x) != self.norm(**y)
                    }
                })
                .map(|(i, _)| first + i as u64)
                .collect();
            self.copy_each(&differ, started, &done, |extent| {
                self.copy_snapshot_extent(src, slot, snap, extent)
            })?;
            first += count;
            self.progress.lock().expect("progress lock").done_extents += count;
        }
        slot.target
            .repair_flush(epoch)
            .map_err(|e| format!("flush: {e}"))?;
        slot.target
            .adopt_snapshot(rt, epoch, snap.id)
            .map_err(|e| format!("adopt: {e}"))?;
        self.ctx
            .store
            .propose(Command::SnapshotCopied {
                id: snap.id,
                node: slot.node,
                epoch,
            })
            .map_err(|e| format!("recording the copy: {e}"))?;
        Ok(done.load(Ordering::Relaxed))
    }

    /// Makes extent `extent` of the faulted replica's head equal to that
    /// of snapshot `snap` on `src` (whole extents: checksums cover them
    /// whole); returns bytes sent. No lock: nothing else writes either.
    fn copy_snapshot_extent(
        &self,
        src: &Slot,
        dst: &Slot,
        snap: &Snapshot,
        extent: u64,
    ) -> Result<u64, ReplicaError> {
        let epoch = self.epoch();
        let es = self.extent_size;
        let offset = extent * es;
        let mut buf = crate::sys::AlignedBuf::new(es as usize, crate::pool::IO_ALIGN);
        src.target
            .read_snapshot(&self.ctx.handle, epoch, snap.id, offset, buf.as_mut_slice())?;
        if buf.as_slice().iter().all(|b| *b == 0) {
            dst.target.repair_zero(epoch, offset, es)?;
            return Ok(0);
        }
        dst.target.repair_write(epoch, offset, buf.as_slice())?;
        self.rebuild_bytes.fetch_add(es, Ordering::Relaxed);
        Ok(es)
    }
}
