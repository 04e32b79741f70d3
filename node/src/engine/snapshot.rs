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
//! only those are ever read for it; the healer rebuilds them again
//! afterwards, and a rebuild copies every snapshot a replica lacks (see
//! `catch_up`). A healthy replica that fails to take it is recorded faulted
//! like after any failed I/O.

use std::collections::BTreeSet;
use std::sync::Arc;

use cairn_proto::data::SnapshotOp;

use super::*;
use crate::types::SnapshotId;

impl Engine {
    /// Runs snapshot operation `op` of `id` on every healthy replica on
    /// `only` (all with `None`) with no write or zeroing in flight (every
    /// stripe held exclusively); the other healthy ones fail with
    /// [`ReplicaError::NoSnapshot`].
    fn on_drained(
        &self,
        op: SnapshotOp,
        id: SnapshotId,
        only: Option<&BTreeSet<NodeId>>,
    ) -> Result<Vec<Outcome>, EngineError> {
        self.record_suspects()?;
        let _drained: Vec<_> = self
            .stripes
            .iter()
            .map(|s| s.write().expect("stripe lock"))
            .collect();
        let (slots, others): (Vec<Arc<Slot>>, Vec<Arc<Slot>>) = self
            .slots_where(|st| st == HEALTHY)
            .into_iter()
            .partition(|s| only.is_none_or(|o| o.contains(&s.node)));
        let mut results = self.fan_out(&slots, |t, e| t.snapshot_op(op, e, id));
        results.extend(others.into_iter().map(|s| {
            (
                s,
                Err(ReplicaError::NoSnapshot {
                    volume: self.volume,
                    snapshot: id,
                }),
            )
        }));
        Ok(results)
    }

    /// Takes snapshot `id` on every healthy replica at one point of the
    /// write order; returns the nodes whose replicas hold it.
    pub fn snapshot(&self, id: SnapshotId) -> Result<Vec<NodeId>, EngineError> {
        let results = self.on_drained(SnapshotOp::Take, id, None)?;
        let took: Vec<NodeId> = results
            .iter()
            .filter(|(_, r)| r.is_ok())
            .map(|(s, _)| s.node)
            .collect();
        self.settle(results, false)?;
        Ok(took)
    }

    /// Makes every healthy replica's head read as snapshot `id`, which the
    /// replicas on `holders` took (the only ones read for it: another
    /// could hold a late, different copy); a healthy replica that cannot
    /// (not a holder, or it fails) is recorded faulted, so it is rebuilt
    /// from one that did. Only for a detached volume, by the engine of the
    /// revert's epoch.
    pub fn revert(&self, id: SnapshotId, holders: &BTreeSet<NodeId>) -> Result<(), EngineError> {
        let results = self.on_drained(SnapshotOp::Revert, id, Some(holders))?;
        self.settle(results, true)
    }
}
