//! Rebuild and self-healing: the healer thread keeps the slots in line
//! with the cluster state and rebuilds faulted replicas whose node answers:
//! first the snapshots they lack (see `catch_up`), then the head, copying
//! only extents whose checksums differ, under per-extent locks that
//! application writes take shared, within the rebuild bandwidth.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::*;
use crate::cluster::state::{Command, ReplicaState};
use crate::cluster::store::StoreError;
use crate::replica::ReplicaError;

impl Engine {
    /// Stops the healer (the engine is being dropped from the node).
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
    }

    /// Starts the healer thread: it keeps the slots in line with the state
    /// and rebuilds faulted replicas whose node answers, while this engine
    /// holds the volume's current attachment.
    pub fn start_healer(self: &Arc<Self>) {
        let weak: Weak<Engine> = Arc::downgrade(self);
        let name = format!("heal-{}", &self.volume.to_string()[..8]);
        let spawned = self.ctx.threads.spawn(name, move || loop {
            std::thread::sleep(Duration::from_secs(1));
            let Some(e) = weak.upgrade() else { return };
            if e.stopped.load(Ordering::Acquire) {
                return;
            }
            e.heal_once();
        });
        if let Err(err) = spawned {
            tracing::error!(volume = %self.volume, error = %err, "cannot start the replica healer");
        }
    }

    /// One pass of the healer.
    fn heal_once(&self) {
        let v = {
            let s = self.ctx.store.read();
            match s.volumes.get(&self.volume) {
                Some(v) => v.clone(),
                None => return,
            }
        };
        // The attached engine heals its volume; an unattached volume is
        // healed by the node of its first healthy replica.
        let ours = match &v.attachment {
            Some(a) => a.node == self.ctx.me && a.epoch == self.epoch(),
            None => {
                v.epoch == self.epoch() && v.healthy().next().map(|r| r.node) == Some(self.ctx.me)
            }
        };
        if !ours {
            return;
        }
        if let Err(e) = self.sync_slots(&v) {
            tracing::debug!(volume = %self.volume, error = %e, "replica set not refreshed");
            return;
        }
        // A healthy replica lacking a snapshot a healthy replica holds
        // (it was rebuilding when the snapshot was taken) is rebuilt again,
        // which copies it.
        for slot in self.slots_where(|st| st == HEALTHY) {
            if let Some((snap, _)) = self.missing_snapshots(slot.node).first() {
                let cause = ReplicaError::NoSnapshot {
                    volume: self.volume,
                    snapshot: snap.id,
                };
                let _ = self.mark_faulted(&slot, &cause);
            }
        }
        let faulted: Vec<Arc<Slot>> = self.slots_where(|st| st == FAULTED);
        for slot in faulted {
            let up = self
                .ctx
                .store
                .read()
                .nodes
                .get(&slot.node)
                .is_some_and(|n| n.state == crate::cluster::state::NodeState::Up);
            if !up {
                continue;
            }
            match self.rebuild(&slot) {
                Ok(copied) => {
                    tracing::info!(volume = %self.volume, node = %slot.node, copied, "replica rebuilt and healthy")
                }
                Err(e) => {
                    tracing::info!(volume = %self.volume, node = %slot.node, error = %e, "rebuild not done; retried later")
                }
            }
            *self.progress.lock().expect("progress lock") = RebuildProgress::default();
        }
    }

    fn set_state(&self, slot: &Slot, state: ReplicaState) -> Result<(), StoreError> {
        self.ctx.store.propose(Command::SetReplicaState {
            id: self.volume,
            node: slot.node,
            state,
            epoch: self.epoch(),
        })?;
        slot.state.store(code(state), Ordering::Release);
        Ok(())
    }

    /// Copies what differs from a healthy replica to `slot`; returns the
    /// bytes copied.
    fn rebuild(&self, slot: &Arc<Slot>) -> Result<u64, String> {
        let epoch = self.epoch();
        let target = &slot.target;
        // The node must answer (and accept our epoch) before anything starts.
        target
            .open(&self.ctx.handle, epoch)
            .map_err(|e| format!("open: {e}"))?;
        // The snapshots it lacks first, while it is faulted (see
        // `catch_up`), then its head.
        let mut copied = self.catch_up_snapshots(slot)?;
        self.set_state(slot, ReplicaState::Rebuilding)
            .map_err(|e| format!("recording rebuilding: {e}"))?;
        // Barrier: writes that chose their targets before the state change
        // finish before any extent is compared.
        for s in &self.stripes {
            drop(s.write().expect("stripe lock"));
        }
        let r = self.copy_differences(slot);
        match r {
            Ok(n) => {
                copied += n;
                let flushed = target.flush(epoch);
                if let Err(e) = flushed {
                    let _ = self.mark_faulted(slot, &e);
                    return Err(format!("flush: {e}"));
                }
                self.set_state(slot, ReplicaState::Healthy)
                    .map_err(|e| format!("recording healthy: {e}"))?;
                Ok(copied)
            }
            Err(e) => {
                if slot.state() == REBUILDING {
                    let _ = self.mark_faulted(slot, &ReplicaError::Remote(e.clone()));
                }
                Err(e)
            }
        }
    }

    /// An unallocated extent reads as zeros: compare it as such.
    pub(super) fn norm(&self, sum: Option<u32>) -> u32 {
        sum.unwrap_or(self.zero_crc)
    }

    fn source(&self) -> Option<Arc<Slot>> {
        self.slots
            .read()
            .expect("slots lock")
            .iter()
            .find(|s| s.state() == HEALTHY)
            .cloned()
    }

    pub(super) fn checksums(
        &self,
        t: &Target,
        first: u64,
        count: u64,
    ) -> Result<Vec<Option<u32>>, ReplicaError> {
        t.checksums(&self.ctx.handle, self.epoch(), first, count)
    }

    fn copy_differences(&self, slot: &Arc<Slot>) -> Result<u64, String> {
        const BATCH: u64 = 64;
        let es = self.extent_size;
        let total = self.size().div_ceil(es);
        // Progress goes on from the snapshots' catch-up.
        let base = self.progress.lock().expect("progress lock").done_extents;
        let started = Instant::now();
        let mut copied = 0u64;
        let mut first = 0;
        while first < total {
            if self.stopped.load(Ordering::Acquire) || slot.state() != REBUILDING {
                return Err("rebuild interrupted".into());
            }
            let count = BATCH.min(total - first);
            let src = self.source().ok_or("no healthy source replica")?;
            let b = self
                .checksums(&slot.target, first, count)
                .map_err(|e| format!("target checksums: {e}"))?;
            // When the target has none of the batch allocated (a new
            // replica), every extent the source has allocated is copied
            // without checksumming the source first, which would read every
            // byte twice; the allocation map costs no read.
            let fresh = b.iter().all(Option::is_none);
            let differ: Vec<u64> = if fresh {
                let a = src
                    .target
                    .allocation(&self.ctx.handle, self.epoch(), first, count)
                    .map_err(|e| format!("source allocation: {e}"))?;
                (first..first + count)
                    .filter(|e| a[(e - first) as usize])
                    .collect()
            } else {
                let a = self
                    .checksums(&src.target, first, count)
                    .map_err(|e| format!("source checksums: {e}"))?;
                a.iter()
                    .zip(b.iter())
                    .enumerate()
                    .filter(|(_, (x, y))| self.norm(**x) != self.norm(**y))
                    .map(|(i, _)| first + i as u64)
                    .collect()
            };
            let done = AtomicU64::new(copied);
            // A few extents in flight at once (distinct stripes within a
            // batch), each under its own lock.
            self.copy_each(&differ, started, &done, |extent| {
                self.copy_extent(&src, slot, extent, !fresh)
            })?;
            copied = done.load(Ordering::Relaxed);
            first += count;
            self.progress.lock().expect("progress lock").done_extents = base + first;
        }
        Ok(copied)
    }

    /// Runs `copy` on each of `extents`, [`COPIERS`] at a time, adding the
    /// bytes each sent to `done` and keeping the total within the rebuild
    /// bandwidth since `started`; the first failure stops the rest.
    pub(super) fn copy_each(
        &self,
        extents: &[u64],
        started: Instant,
        done: &AtomicU64,
        copy: impl Fn(u64) -> Result<u64, ReplicaError> + Sync,
    ) -> Result<(), String> {
        let next = std::sync::atomic::AtomicUsize::new(0);
        let failed: Mutex<Option<String>> = Mutex::new(None);
        std::thread::scope(|sc| {
            for _ in 0..COPIERS.min(extents.len()) {
                sc.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= extents.len() || failed.lock().expect("failed lock").is_some() {
                        return;
                    }
                    let extent = extents[i];
                    match copy(extent) {
                        Ok(n) => {
                            let total = done.fetch_add(n, Ordering::Relaxed) + n;
                            self.throttle(started, total);
                        }
                        Err(e) => {
                            *failed.lock().expect("failed lock") =
                                Some(format!("extent {extent}: {e}"));
                            return;
                        }
                    }
                });
            }
        });
        match failed.into_inner().expect("failed lock") {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Copies one extent under its exclusive lock; returns bytes sent.
    /// The comparison that selected it ran without the lock, so with
    /// `recheck` both sides are looked at again under it before anything is
    /// written. Without it (the target had nothing allocated) the source is
    /// copied unless it reads as zeros: under the lock no write is in
    /// flight, and every write since the barrier reached both sides, so
    /// whatever the target holds now the source holds too.
    fn copy_extent(
        &self,
        src: &Slot,
        dst: &Slot,
        extent: u64,
        recheck: bool,
    ) -> Result<u64, ReplicaError> {
        let _x = self.lock_extent(extent);
        let epoch = self.epoch();
        let es = self.extent_size;
        let offset = extent * es;
        let len = es.min(self.size() - offset);
        // One read of the source (an unallocated extent reads as zeros
        // without touching the disk), compared with the target's checksum.
        let mut buf = crate::sys::AlignedBuf::new(len as usize, crate::pool::IO_ALIGN);
        src.target.read(epoch, offset, buf.as_mut_slice())?;
        if recheck {
            let from = crc32fast::hash(buf.as_slice());
            let to = self.checksums(&dst.target, extent, 1)?[0];
            let to_crc = match to {
                Some(c) => c,
                None if len == es => self.zero_crc,
                None => crc32fast::hash(&vec![0u8; len as usize]),
            };
            if from == to_crc {
                return Ok(0);
            }
        }
        if buf.as_slice().iter().all(|b| *b == 0) {
            // Zeros: give the target's space back instead of writing them
            // (a target that had nothing allocated has nothing to give).
            if recheck {
                dst.target.zero(epoch, offset, len)?;
            }
            return Ok(0);
        }
        dst.target.write(epoch, offset, buf.as_slice())?;
        self.rebuild_bytes.fetch_add(len, Ordering::Relaxed);
        Ok(len)
    }

    /// Sleeps so the copy rate stays under the configured bandwidth.
    pub(super) fn throttle(&self, started: Instant, copied: u64) {
        let bw = self.ctx.rebuild_bandwidth;
        if bw == 0 {
            return;
        }
        let due = Duration::from_secs_f64(copied as f64 / bw as f64);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            std::thread::sleep(wait);
        }
    }
}
