//! Snapshots through the engine: the point every healthy replica freezes
//! is one point of the volume's write order.
//!
//! Writes and zeroings hold their extents' stripe locks shared until every
//! replica answered; holding every stripe exclusively therefore waits for
//! the writes in flight and holds off new ones. With the stripes held, each
//! healthy replica freezes its head. Every write acknowledged before the
//! call is in the snapshot on every replica that took it; no write that
//! starts after it returns is. Rebuilding replicas do not take it (their
//! data is incomplete): the snapshot records the nodes that took it, and
//! only those are ever read for it. A healthy replica that fails to take
//! it is recorded faulted like after any failed I/O.

use std::sync::Arc;

use cairn_proto::data::SnapshotOp;

use super::*;

impl Engine {
    /// Holds every stripe exclusively: no write or zeroing is in flight
    /// while the guards live.
    fn drain(&self) -> Vec<std::sync::RwLockWriteGuard<'_, ()>> {
        self.stripes
            .iter()
            .map(|s| s.write().expect("stripe lock"))
            .collect()
    }

    /// Takes snapshot `id` on every healthy replica at one point of the
    /// write order; returns the nodes whose replicas hold it.
    pub fn snapshot(&self, id: crate::types::SnapshotId) -> Result<Vec<NodeId>, EngineError> {
        self.record_suspects()?;
        let _drained = self.drain();
        let slots: Vec<Arc<Slot>> = self.slots_where(|st| st == HEALTHY);
        let results = self.fan_out(&slots, |t, e| t.snapshot_op(SnapshotOp::Take, e, id));
        let took: Vec<NodeId> = results
            .iter()
            .filter(|(_, r)| r.is_ok())
            .map(|(s, _)| s.node)
            .collect();
        self.settle(results, false)?;
        Ok(took)
    }

    /// Makes every healthy replica's head read as snapshot `id`; a healthy
    /// replica that cannot (it lacks the snapshot, or fails) is recorded
    /// faulted, so it is rebuilt from one that did. Only for a detached
    /// volume, by the engine of the revert's epoch.
    pub fn revert(&self, id: crate::types::SnapshotId) -> Result<(), EngineError> {
        self.record_suspects()?;
        let _drained = self.drain();
        let slots: Vec<Arc<Slot>> = self.slots_where(|st| st == HEALTHY);
        let results = self.fan_out(&slots, |t, e| t.snapshot_op(SnapshotOp::Revert, e, id));
        self.settle(results, true)
    }
}
