//! The fan-out: running one operation on a set of replicas (remote ones
//! concurrently on the runtime, local ones inline), settling the outcome
//! (which replicas are recorded faulted, see the module doc of `engine`),
//! and the per-replica operations of a [`Target`].

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::*;
use crate::cluster::state::{Command, ReplicaState, StateError};
use crate::cluster::store::StoreError;
use crate::replica::host::Admit;
use crate::replica::remote::Scan;
use crate::replica::ReplicaError;
use crate::types::SnapshotId;

impl Engine {
    /// Runs `op` on each slot: remote ones concurrently on the runtime,
    /// while local ones run inline on this thread.
    pub(super) fn fan_out<F, Fut>(&self, slots: &[Arc<Slot>], op: F) -> Vec<Outcome>
    where
        F: Fn(Target, u64) -> Fut,
        Fut: std::future::Future<Output = Result<(), ReplicaError>> + Send + 'static,
    {
        let epoch = self.epoch();
        let mut remote = Vec::new();
        let mut out = Vec::with_capacity(slots.len());
        for s in slots.iter().filter(|s| !s.is_local()) {
            let fut = op(s.target.clone_handle(), epoch);
            remote.push((s.clone(), self.ctx.handle.spawn(fut)));
        }
        for s in slots.iter().filter(|s| s.is_local()) {
            // Local futures complete without awaiting anything remote.
            let r = self.ctx.handle.block_on(op(s.target.clone_handle(), epoch));
            out.push((s.clone(), r));
        }
        self.join_remote(remote, &mut out);
        out
    }

    /// Waits for remote replicas' tasks and adds their outcomes to `out`.
    pub(super) fn join_remote(&self, remote: Vec<RemoteTask>, out: &mut Vec<Outcome>) {
        for (s, h) in remote {
            let r = self
                .ctx
                .handle
                .block_on(h)
                .unwrap_or_else(|e| Err(ReplicaError::Remote(e.to_string())));
            out.push((s, r));
        }
    }

    /// Handles the outcomes of one fan-out. A fenced engine fails and marks
    /// nothing (a newer engine owns the volume); so does a snapshot take
    /// that a replica's node may not run yet (its state lags). Otherwise every replica
    /// that failed is recorded faulted before it leaves the set, and a
    /// fault that cannot be recorded fails the I/O: nothing completes on a
    /// degraded set the cluster does not know about. Ok when at least one
    /// healthy replica succeeded.
    ///
    /// With `changes` (writes, zeroing) the replicas must stay equal, so
    /// the outcome decides which side is kept (see the module doc): when a
    /// healthy replica took the change, every replica that did not is
    /// recorded faulted, a full pool included; when none did, the change
    /// fails and the replicas that took it anyway (rebuilding ones) are
    /// recorded faulted instead. A full pool leaves its replica unchanged
    /// (`LocalReplica::write` allocates before it writes), so replicas that
    /// all ran out of space stay equal, healthy, and the writer sees ENOSPC.
    pub(super) fn settle(&self, results: Vec<Outcome>, changes: bool) -> Result<(), EngineError> {
        if let Some(i) = results.iter().position(|(_, r)| {
            matches!(
                r,
                Err(ReplicaError::Fenced { .. } | ReplicaError::Unlisted(_))
            )
        }) {
            let (_, r) = results.into_iter().nth(i).expect("found");
            return Err(r.expect_err("fenced").into());
        }
        let healthy_ok = results
            .iter()
            .any(|(s, r)| r.is_ok() && s.state() == HEALTHY);
        let mut unrecorded: Option<EngineError> = None;
        let mut failed: Option<EngineError> = None;
        for (slot, r) in results {
            let cause = match r {
                Ok(()) if !changes || healthy_ok => continue,
                Ok(()) => ReplicaError::Remote(
                    "it took a write that no healthy replica took, so it differs from them".into(),
                ),
                Err(ReplicaError::NoSpace) if !(changes && healthy_ok) => {
                    failed.get_or_insert(ReplicaError::NoSpace.into());
                    continue;
                }
                Err(e) => e,
            };
            match self.mark_faulted(&slot, &cause) {
                Err(u) => {
                    unrecorded.get_or_insert(u);
                }
                Ok(()) => {
                    failed.get_or_insert(EngineError::Replica(cause));
                }
            }
        }
        if let Some(e) = unrecorded {
            return Err(e);
        }
        if healthy_ok {
            return Ok(());
        }
        Err(failed.unwrap_or(EngineError::NoReplica))
    }

    /// Before any I/O: faults that could not be recorded earlier must be
    /// recorded now, or the I/O fails.
    pub(super) fn record_suspects(&self) -> Result<(), EngineError> {
        let suspects: Vec<Arc<Slot>> = self.slots_where(|st| st == SUSPECT);
        for s in suspects {
            self.mark_faulted(&s, &ReplicaError::Remote("an earlier failure".into()))?;
        }
        Ok(())
    }

    /// Records `slot` faulted in the cluster state (with this engine's
    /// epoch), then stops sending it I/O.
    pub(super) fn mark_faulted(
        &self,
        slot: &Slot,
        cause: &ReplicaError,
    ) -> Result<(), EngineError> {
        if slot.state() == FAULTED {
            return Ok(());
        }
        let why = cause.to_string();
        tracing::warn!(volume = %self.volume, node = %slot.node, error = %why, "replica failed; recording it faulted");
        let r = self.ctx.store.propose(Command::SetReplicaState {
            id: self.volume,
            node: slot.node,
            state: ReplicaState::Faulted,
            epoch: self.epoch(),
        });
        match r {
            Ok(_) => {
                slot.state.store(FAULTED, Ordering::Release);
                Ok(())
            }
            // The cluster keeps its last healthy copy: so does the engine
            // (this I/O fails, later ones try it again).
            Err(StoreError::Refused(StateError::LastHealthy { .. })) => {
                Err(EngineError::LastCopy {
                    node: slot.node,
                    why,
                    unclean: matches!(cause, ReplicaError::Unclean(_)),
                })
            }
            Err(e) => {
                slot.state.store(SUSPECT, Ordering::Release);
                Err(EngineError::Unrecorded {
                    node: slot.node,
                    why,
                    record: e.to_string(),
                })
            }
        }
    }

    /// The slots whose (local) state satisfies `want`.
    pub(super) fn slots_where(&self, want: impl Fn(u8) -> bool) -> Vec<Arc<Slot>> {
        self.slots
            .read()
            .expect("slots lock")
            .iter()
            .filter(|s| want(s.state()))
            .cloned()
            .collect()
    }

    pub(super) fn writable(&self) -> Vec<Arc<Slot>> {
        self.slots_where(|st| matches!(st, HEALTHY | REBUILDING))
    }
}

/// Runs a blocking replica call on the runtime's blocking pool.
pub(super) async fn blocking(
    f: impl FnOnce() -> Result<(), ReplicaError> + Send + 'static,
) -> Result<(), ReplicaError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(ReplicaError::Remote(e.to_string())))
}

/// One replica operation on the calling thread, local or remote.
impl Target {
    /// A handle for use inside a spawned future.
    pub(super) fn clone_handle(&self) -> Target {
        match self {
            Target::Local(h) => Target::Local(h.clone()),
            Target::Remote(r) => Target::Remote(r.clone()),
        }
    }

    pub(super) fn open(&self, rt: &tokio::runtime::Handle, epoch: u64) -> Result<(), ReplicaError> {
        match self {
            Target::Local(h) => h.open(epoch),
            Target::Remote(r) => rt.block_on(r.open(epoch)),
        }
    }

    pub(super) fn read(&self, epoch: u64, offset: u64, buf: &mut [u8]) -> Result<(), ReplicaError> {
        match self {
            Target::Local(h) => h.read(epoch, offset, buf),
            Target::Remote(r) => r.read_blocking(epoch, offset, buf),
        }
    }

    pub(super) fn write(&self, epoch: u64, offset: u64, buf: &[u8]) -> Result<(), ReplicaError> {
        match self {
            Target::Local(h) => h.write(epoch, offset, buf),
            Target::Remote(r) => r.write_blocking(epoch, offset, buf),
        }
    }

    pub(super) fn zero(&self, epoch: u64, offset: u64, len: u64) -> Result<(), ReplicaError> {
        match self {
            Target::Local(h) => h.zero_range(epoch, offset, len),
            Target::Remote(r) => r.zero_blocking(epoch, offset, len),
        }
    }

    pub(super) fn flush(&self, epoch: u64) -> Result<(), ReplicaError> {
        match self {
            Target::Local(h) => h.flush(epoch),
            Target::Remote(r) => r.flush_blocking(epoch),
        }
    }

    /// Snapshot operation `op` (take or revert: what an engine runs on its
    /// replicas) of snapshot `id`.
    pub(super) async fn snapshot_op(
        self,
        op: cairn_proto::data::SnapshotOp,
        epoch: u64,
        id: crate::types::SnapshotId,
    ) -> Result<(), ReplicaError> {
        use cairn_proto::data::SnapshotOp;
        match self {
            Target::Local(h) => {
                blocking(move || match op {
                    SnapshotOp::Take => h.take_snapshot(epoch, id),
                    SnapshotOp::Revert => h.revert(epoch, id),
                    other => Err(ReplicaError::Meta(format!(
                        "{other:?} is not an engine's snapshot operation"
                    ))),
                })
                .await
            }
            Target::Remote(r) => r.snapshot(op, epoch, Some(id), 0).await.map(|_| ()),
        }
    }

    pub(super) fn checksums(
        &self,
        rt: &tokio::runtime::Handle,
        epoch: u64,
        first: u64,
        count: u64,
    ) -> Result<Vec<Option<u32>>, ReplicaError> {
        self.scan(rt, epoch, Scan::head(), first, count)
    }

    pub(super) fn allocation(
        &self,
        rt: &tokio::runtime::Handle,
        epoch: u64,
        first: u64,
        count: u64,
    ) -> Result<Vec<bool>, ReplicaError> {
        let scan = Scan {
            allocation_only: true,
            ..Scan::head()
        };
        let map = self.scan(rt, epoch, scan, first, count)?;
        Ok(map.iter().map(Option::is_some).collect())
    }

    /// Checksums (or which extents have data) of the head or a snapshot,
    /// as `scan` says.
    pub(super) fn scan(
        &self,
        rt: &tokio::runtime::Handle,
        epoch: u64,
        scan: Scan,
        first: u64,
        count: u64,
    ) -> Result<Vec<Option<u32>>, ReplicaError> {
        match self {
            Target::Local(h) => h.scan(
                Admit::of(scan.repair),
                epoch,
                scan.snapshot,
                first,
                count,
                scan.allocation_only,
            ),
            Target::Remote(r) => rt.block_on(r.scan(epoch, scan, first, count)),
        }
    }

    /// Reads `buf.len()` bytes (at most one extent) at `offset` of
    /// snapshot `id`.
    pub(super) fn read_snapshot(
        &self,
        rt: &tokio::runtime::Handle,
        epoch: u64,
        id: SnapshotId,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), ReplicaError> {
        match self {
            Target::Local(h) => h.read_snapshot(epoch, id, offset, buf),
            Target::Remote(r) => rt.block_on(r.read_snapshot(epoch, id, offset, buf)),
        }
    }

    /// A rebuild's catch-up write to the head of a faulted replica.
    pub(super) fn repair_write(
        &self,
        epoch: u64,
        offset: u64,
        buf: &[u8],
    ) -> Result<(), ReplicaError> {
        match self {
            Target::Local(h) => h.write_as(Admit::Repair, epoch, offset, buf),
            Target::Remote(r) => r.repair_write_blocking(epoch, offset, buf),
        }
    }

    pub(super) fn repair_zero(
        &self,
        epoch: u64,
        offset: u64,
        len: u64,
    ) -> Result<(), ReplicaError> {
        match self {
            Target::Local(h) => h.zero_as(Admit::Repair, epoch, offset, len),
            Target::Remote(r) => r.repair_zero_blocking(epoch, offset, len),
        }
    }

    pub(super) fn repair_flush(&self, epoch: u64) -> Result<(), ReplicaError> {
        match self {
            Target::Local(h) => h.flush_as(Admit::Repair, epoch),
            Target::Remote(r) => r.repair_flush_blocking(epoch),
        }
    }

    /// Freezes the head of a faulted replica, made equal to snapshot `id`
    /// by the rebuild of `epoch`, as that snapshot.
    pub(super) fn adopt_snapshot(
        &self,
        rt: &tokio::runtime::Handle,
        epoch: u64,
        id: SnapshotId,
    ) -> Result<(), ReplicaError> {
        match self {
            Target::Local(h) => h.adopt_snapshot(epoch, id),
            Target::Remote(r) => rt
                .block_on(r.snapshot(cairn_proto::data::SnapshotOp::Adopt, epoch, Some(id), 0))
                .map(|_| ()),
        }
    }
}
