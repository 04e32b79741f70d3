//! Scrub: compares a volume's healthy replicas extent by extent, counts and
//! logs every difference, and with `repair` makes them equal again.
//!
//! The comparison runs batch by batch without locks (each healthy replica
//! checksums up to [`BATCH`] extents), so application I/O is not held off.
//! An extent whose checksums differ is looked at again under its exclusive
//! stripe lock, where no write to it is in flight: a write that had reached
//! one replica but not yet another is not taken for a difference. Only a
//! difference that holds there counts (the volume's
//! `cairn_volume_scrub_mismatches_total`, a warning naming each replica's
//! checksum) and, with repair, is rewritten under the same lock from the
//! source: the copy a majority of the healthy replicas agree on, else the
//! copy reads are served from (this engine's first healthy replica, the
//! local one when there is one), which is what the application has been
//! reading, so the repair changes nothing it saw. Checksums alone cannot
//! tell which of two different copies is right; the report says whether a
//! majority chose.
//!
//! The same pass, keeping the copy reads are served from, resyncs a volume
//! whose previous attachment ended without a clean stop ([`Engine::start_resync`]):
//! a forced takeover from a dead node, or a daemon that came back after
//! the orphan I/O timeout (or without its FUSE holder), so that the writes
//! it had in flight, which reached some replicas only, leave no lasting
//! difference. (A daemon restart within the timeout needs none: the kernel
//! resends those writes and they reach every replica.)
//!
//! `volume verify` also compares every ready snapshot across the healthy
//! replicas holding it ([`Engine::compare_snapshots`]); it reports, never
//! rewrites, a snapshot (no copy of it is known to be the right one).
//!
//! Divergence of any cause is found this way: a bug, a write that failed
//! on some replicas before the engine settled it, a disk that silently
//! flipped bits. The node scrubs each volume it serves every
//! `--scrub-interval`, reading at most `--scrub-bandwidth` per second.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::{Engine, EngineError, Slot, HEALTHY};
use crate::replica::remote::Scan;
use crate::types::{NodeId, SnapshotId};

/// Extents each replica checksums per request.
const BATCH: u64 = 64;

/// One extent made equal again.
#[derive(Debug, Clone)]
pub struct Repair {
    pub extent: u64,
    /// The replica whose copy was kept.
    pub source: NodeId,
    /// Whether a majority of the healthy replicas held that copy.
    pub majority: bool,
    /// The replicas rewritten from it.
    pub targets: Vec<NodeId>,
}

#[derive(Debug, Clone, Default)]
pub struct ScrubReport {
    pub extents: u64,
    /// Healthy replicas compared (the most in any batch).
    pub replicas: usize,
    /// Extents whose healthy replicas differed.
    pub mismatched: Vec<u64>,
    pub repaired: Vec<Repair>,
}

/// One snapshot compared across the healthy replicas holding it.
#[derive(Debug, Clone)]
pub struct SnapshotCompare {
    pub snapshot: SnapshotId,
    /// The healthy replicas holding it, which were compared.
    pub holders: Vec<NodeId>,
    /// Healthy replicas that do not hold it (the healer copies it to them).
    pub lacking: Vec<NodeId>,
    /// Extents whose checksums differ between the holders.
    pub mismatched: Vec<u64>,
}

/// Which copy a repair keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// The copy a majority holds, else the one reads are served from.
    Majority,
    /// Always the one reads are served from: after an attachment ended
    /// uncleanly its replicas may differ where writes were in flight, and
    /// either version is legitimate; keeping what reads return keeps them
    /// stable while the resync runs.
    Reads,
}

impl Engine {
    /// Compares every extent across the healthy replicas; with `repair`
    /// makes differing ones equal. Reads at most `bandwidth` bytes per
    /// second per replica (0: unlimited). A stopped engine ends early.
    pub fn scrub(&self, repair: bool, bandwidth: u64) -> Result<ScrubReport, EngineError> {
        self.scrub_keeping(repair.then_some(Keep::Majority), bandwidth)
    }

    /// Makes the replicas equal in the background after the volume's
    /// previous attachment ended without a clean stop (a forced takeover,
    /// a daemon that did not come back in time): writes it had in flight
    /// may have reached some replicas only. Reads are served from one
    /// replica throughout, and the resync keeps its copy.
    pub fn start_resync(self: &Arc<Self>) {
        let e = self.clone();
        let spawned = self
            .ctx
            .threads
            .spawn(format!("resync-{}", &self.volume.to_string()[..8]), move || {
                tracing::info!(volume = %e.volume, "the previous attachment ended uncleanly: making the replicas equal where its writes were in flight");
                match e.scrub_keeping(Some(Keep::Reads), e.ctx.rebuild_bandwidth) {
                    Ok(r) => tracing::info!(volume = %e.volume, extents = r.extents, differed = r.mismatched.len(), "replicas resynced after the unclean end"),
                    Err(err) => tracing::warn!(volume = %e.volume, error = %err, "resync after the unclean end did not finish; the periodic scrub will report what still differs"),
                }
            });
        if let Err(err) = spawned {
            tracing::error!(volume = %self.volume, error = %err, "cannot start the resync after an unclean end");
        }
    }

    fn scrub_keeping(
        &self,
        repair: Option<Keep>,
        bandwidth: u64,
    ) -> Result<ScrubReport, EngineError> {
        let es = self.extent_size;
        let total = self.size().div_ceil(es);
        let mut report = ScrubReport {
            extents: total,
            ..Default::default()
        };
        let started = Instant::now();
        let mut first = 0;
        while first < total {
            if self.stopped.load(Ordering::Acquire) {
                return Err(EngineError::Stopped);
            }
            let count = BATCH.min(total - first);
            let healthy = self.slots_where(|st| st == HEALTHY);
            report.replicas = report.replicas.max(healthy.len());
            if healthy.len() >= 2 {
                let mut sums = Vec::with_capacity(healthy.len());
                for s in &healthy {
                    sums.push(self.checksums(&s.target, first, count)?);
                }
                for i in 0..count as usize {
                    let c0 = self.norm(sums[0][i]);
                    if sums.iter().any(|v| self.norm(v[i]) != c0) {
                        self.recheck(first + i as u64, repair, &mut report)?;
                    }
                }
            }
            first += count;
            if bandwidth > 0 {
                let due =
                    std::time::Duration::from_secs_f64((first * es) as f64 / bandwidth as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
        }
        Ok(report)
    }

    /// Compares each ready snapshot of the volume extent by extent across
    /// the healthy replicas that hold it (snapshots do not change, so no
    /// lock is taken), at most `bandwidth` bytes per second per replica.
    /// Only reports: which copy of a snapshot is right cannot be told.
    pub fn compare_snapshots(&self, bandwidth: u64) -> Result<Vec<SnapshotCompare>, EngineError> {
        let snapshots: Vec<crate::cluster::state::Snapshot> = {
            let s = self.ctx.store.read();
            s.snapshots_of(self.volume)
                .into_iter()
                .filter(|x| x.ready)
                .cloned()
                .collect()
        };
        let es = self.extent_size;
        let epoch = self.epoch();
        let started = Instant::now();
        let mut read = 0u64;
        let mut out = Vec::with_capacity(snapshots.len());
        for snap in snapshots {
            let (holders, lacking): (Vec<Arc<Slot>>, Vec<Arc<Slot>>) = self
                .slots_where(|st| st == HEALTHY)
                .into_iter()
                .partition(|s| snap.replicas.contains(&s.node));
            let mut mismatched = Vec::new();
            let total = snap.size_bytes.div_ceil(es);
            let scan = Scan {
                snapshot: Some(snap.id),
                ..Scan::head()
            };
            let mut first = 0;
            while holders.len() >= 2 && first < total {
                if self.stopped.load(Ordering::Acquire) {
                    return Err(EngineError::Stopped);
                }
                let count = BATCH.min(total - first);
                let mut sums = Vec::with_capacity(holders.len());
                for h in &holders {
                    sums.push(h.target.scan(&self.ctx.handle, epoch, scan, first, count)?);
                }
                for i in 0..count as usize {
                    let c0 = self.norm(sums[0][i]);
                    if sums.iter().any(|v| self.norm(v[i]) != c0) {
                        let extent = first + i as u64;
                        let detail: Vec<String> = holders
                            .iter()
                            .zip(&sums)
                            .map(|(s, v)| format!("{}={:08x}", s.node, self.norm(v[i])))
                            .collect();
                        tracing::warn!(volume = %self.volume, snapshot = %snap.id, extent, replicas = ?detail, "snapshot copies differ");
                        self.metrics
                            .scrub_mismatches
                            .fetch_add(1, Ordering::Relaxed);
                        mismatched.push(extent);
                    }
                }
                first += count;
                read += count * es;
                if bandwidth > 0 {
                    let due = std::time::Duration::from_secs_f64(read as f64 / bandwidth as f64);
                    if let Some(wait) = due.checked_sub(started.elapsed()) {
                        std::thread::sleep(wait);
                    }
                }
            }
            out.push(SnapshotCompare {
                snapshot: snap.id,
                holders: holders.iter().map(|s| s.node).collect(),
                lacking: lacking.iter().map(|s| s.node).collect(),
                mismatched,
            });
        }
        Ok(out)
    }

    /// Compares `extent` again with writes to it held off, and counts (and
    /// with `repair` mends) a difference that holds.
    fn recheck(
        &self,
        extent: u64,
        repair: Option<Keep>,
        report: &mut ScrubReport,
    ) -> Result<(), EngineError> {
        let _x = self.lock_extent(extent);
        let healthy = self.slots_where(|st| st == HEALTHY);
        let mut sums = Vec::with_capacity(healthy.len());
        for s in &healthy {
            sums.push(self.norm(self.checksums(&s.target, extent, 1)?[0]));
        }
        if sums.iter().all(|c| *c == sums[0]) {
            return Ok(());
        }
        report.mismatched.push(extent);
        self.metrics
            .scrub_mismatches
            .fetch_add(1, Ordering::Relaxed);
        let detail: Vec<String> = healthy
            .iter()
            .zip(&sums)
            .map(|(s, c)| format!("{}={c:08x}", s.node))
            .collect();
        tracing::warn!(volume = %self.volume, extent, replicas = ?detail, "replicas differ");
        let Some(keep) = repair else {
            return Ok(());
        };
        let (src, majority) = match keep {
            Keep::Majority => pick_source(&sums),
            Keep::Reads => (0, false),
        };
        let source = &healthy[src];
        let targets: Vec<&Arc<Slot>> = healthy
            .iter()
            .zip(&sums)
            .filter(|(_, c)| **c != sums[src])
            .map(|(s, _)| s)
            .collect();
        let epoch = self.epoch();
        let offset = extent * self.extent_size;
        let len = self.extent_size.min(self.size() - offset);
        let mut buf = crate::sys::AlignedBuf::new(len as usize, crate::pool::IO_ALIGN);
        source.target.read(epoch, offset, buf.as_mut_slice())?;
        let zeros = buf.as_slice().iter().all(|b| *b == 0);
        for t in &targets {
            if zeros {
                t.target.zero(epoch, offset, len)?;
            } else {
                t.target.write(epoch, offset, buf.as_slice())?;
            }
            t.target.flush(epoch)?;
        }
        self.metrics.scrub_repairs.fetch_add(1, Ordering::Relaxed);
        let to: Vec<NodeId> = targets.iter().map(|t| t.node).collect();
        tracing::warn!(volume = %self.volume, extent, source = %source.node, majority, targets = ?to, "differing extent repaired");
        report.repaired.push(Repair {
            extent,
            source: source.node,
            majority,
            targets: to,
        });
        Ok(())
    }
}

/// The index of the copy to keep: one that a strict majority holds, else
/// the first (the replica reads are served from).
fn pick_source(sums: &[u32]) -> (usize, bool) {
    for (i, c) in sums.iter().enumerate() {
        if sums.iter().filter(|x| *x == c).count() * 2 > sums.len() {
            return (i, true);
        }
    }
    (0, false)
}

#[cfg(test)]
mod tests {
    use super::pick_source;

    #[test]
    fn a_majority_wins_else_the_read_replica() {
        assert_eq!(pick_source(&[1, 2, 2]), (1, true));
        assert_eq!(pick_source(&[2, 1, 2]), (0, true));
        assert_eq!(pick_source(&[1, 2]), (0, false));
        assert_eq!(pick_source(&[1, 2, 3]), (0, false));
    }
}
