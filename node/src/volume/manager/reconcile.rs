//! The reconciler: drives this node's replicas toward the cluster state
//! (creates the ones listed here, frees the ones no longer listed, records
//! unclean ones faulted) and runs the engines of unattached volumes that
//! need a rebuild. Runs every few seconds for the daemon's life.

use super::*;

impl VolumeManager {
    /// Drives local replicas toward the state: creates the ones listed for
    /// this node, frees the ones no longer listed, and drops engines of
    /// deleted volumes. Runs every few seconds for the daemon's life.
    pub fn reconcile(&self) {
        // Hosted ids before the state: a replica created after this list
        // was taken is not judged against an older state.
        let hosted = self.hosts.ids();
        let state = self.store.read().clone();
        for v in state.volumes.values() {
            if v.has_replica_on(self.cfg.node_id) && self.hosts.get(v.id).is_none() {
                if let Err(e) = self.hosts.get_or_create(v.id, &self.store) {
                    tracing::warn!(volume = %v.name, error = %e, "cannot create local replica");
                }
            }
        }
        for id in hosted {
            let listed = state
                .volumes
                .get(&id)
                .is_some_and(|v| v.has_replica_on(self.cfg.node_id));
            if !listed {
                if let Err(e) = self.hosts.destroy(id) {
                    tracing::error!(volume = %id, error = %e, "freeing a replica failed; retried");
                }
            }
        }
        self.reconcile_snapshots();
        self.run_fillers();
        self.hosts.bound_map_log(1 << 20);
        // An unclean replica (this node's kernel restarted) still counted
        // healthy beside another healthy copy is recorded faulted, so the
        // engine reads elsewhere and rebuilds it without waiting for an I/O
        // to stumble on it. Retried each round (no quorum, a new epoch).
        for id in self.hosts.unclean_ids() {
            let Some(v) = state.volumes.get(&id) else {
                continue;
            };
            let mine = v.replica(self.cfg.node_id).map(|r| r.state);
            if mine != Some(ReplicaState::Healthy) || v.healthy().count() < 2 {
                continue;
            }
            let r = self.store.propose(Command::SetReplicaState {
                id,
                node: self.cfg.node_id,
                state: ReplicaState::Faulted,
                epoch: v.epoch,
            });
            match r {
                Ok(_) => {
                    tracing::info!(volume = %v.name, "unclean local replica recorded faulted; it is rebuilt from a healthy one")
                }
                Err(e) => {
                    tracing::debug!(volume = %v.name, error = %e, "unclean local replica not recorded faulted yet")
                }
            }
        }
        // Unattached volumes with replicas to rebuild: the node of the first
        // healthy replica runs an engine whose healer does it.
        for v in state.volumes.values() {
            let needs = v.replicas.iter().any(|r| r.state != ReplicaState::Healthy)
                || v.replicas.len() < v.wanted();
            let first = v.healthy().next().map(|r| r.node);
            if v.attachment.is_none() && needs && first == Some(self.cfg.node_id) {
                if let Err(e) = self.engine_for(v).and_then(|e| {
                    e.activate(v, v.epoch)
                        .map_err(|err| VolumeError::engine(&v.name, err))
                }) {
                    tracing::debug!(volume = %v.name, error = %e, "rebuild engine not ready");
                }
            }
        }
        let gone: Vec<VolumeId> = self
            .engines
            .read()
            .expect("engines lock")
            .keys()
            .filter(|id| !state.volumes.contains_key(id))
            .copied()
            .collect();
        for id in gone {
            if let Some(e) = self.engines.write().expect("engines lock").remove(&id) {
                e.stop();
            }
        }
    }
}
