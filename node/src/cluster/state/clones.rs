//! The clone commands of the cluster state: a volume made from a ready
//! snapshot, whose replicas on nodes holding the snapshot read through to
//! it until filled (the others are rebuilt from them), and the guards that
//! keep the snapshot and the source replicas they read alive until then.

use std::collections::BTreeSet;

use super::{
    valid_size, ClusterState, Command, Origin, ReplicaRecord, ReplicaState, StateError, Volume,
};
use crate::types::{NodeId, SnapshotId, VolumeId};

impl ClusterState {
    pub(super) fn apply_clone(&mut self, cmd: &Command) -> Result<(), StateError> {
        match cmd {
            Command::CreateClone {
                id,
                name,
                size_bytes,
                snapshot,
                replica_nodes,
                backed,
                implicit,
                created_unix_ms,
                csi_name,
            } => {
                self.check_new_volume(*id, name, *size_bytes, replica_nodes, csi_name.as_deref())?;
                let s = self
                    .snapshots
                    .get(snapshot)
                    .ok_or(StateError::SnapshotNotFound(*snapshot))?;
                if !s.ready {
                    return Err(StateError::SnapshotNotReady { id: *snapshot });
                }
                let source = self.volume(s.volume)?;
                if *size_bytes < s.size_bytes || !valid_size(*size_bytes) {
                    return Err(StateError::CloneTooSmall {
                        size: *size_bytes,
                        min: s.size_bytes,
                    });
                }
                let readable = backed
                    .iter()
                    .all(|n| s.replicas.contains(n) && replica_nodes.contains(n));
                if backed.is_empty() || !readable {
                    return Err(StateError::BadReplicaSet);
                }
                let volume = Volume {
                    id: *id,
                    name: name.clone(),
                    size_bytes: *size_bytes,
                    fs: source.fs,
                    formatted: s.formatted,
                    epoch: 0,
                    attachment: None,
                    readers: BTreeSet::new(),
                    replicas_wanted: replica_nodes.len() as u32,
                    replicas: replica_nodes
                        .iter()
                        .map(|node| ReplicaRecord {
                            node: *node,
                            state: if backed.contains(node) {
                                ReplicaState::Healthy
                            } else {
                                ReplicaState::Faulted
                            },
                        })
                        .collect(),
                    created_unix_ms: *created_unix_ms,
                    csi_name: csi_name.clone(),
                    reverting: None,
                    origin: Some(Origin {
                        volume: s.volume,
                        snapshot: *snapshot,
                        backed: backed.clone(),
                        implicit: *implicit,
                    }),
                    retired: false,
                };
                self.volumes.insert(*id, volume);
            }
            Command::CloneFilled { id, node } => {
                // A repeat (the proposal retried) changes nothing.
                self.volume(*id)?;
                self.unback(*id, *node);
            }
            _ => unreachable!("not a clone command"),
        }
        Ok(())
    }

    /// The clone still being filled from snapshot `id`, if any.
    pub(super) fn clone_of(&self, id: SnapshotId) -> Option<VolumeId> {
        self.volumes
            .values()
            .find(|v| {
                v.origin
                    .as_ref()
                    .is_some_and(|o| o.snapshot == id && !o.backed.is_empty())
            })
            .map(|v| v.id)
    }

    /// Refuses to remove `volume`'s replica on `node` while a clone's
    /// replica there reads through to it.
    pub(super) fn check_not_backing(
        &self,
        volume: VolumeId,
        node: NodeId,
    ) -> Result<(), StateError> {
        let clone = self.volumes.values().find(|v| {
            v.origin
                .as_ref()
                .is_some_and(|o| o.volume == volume && o.backed.contains(&node))
        });
        match clone {
            Some(c) => Err(StateError::ReplicaBacksClone {
                id: volume,
                node,
                clone: c.id,
            }),
            None => Ok(()),
        }
    }

    /// Clone `id`'s replica on `node` no longer reads through (filled, or
    /// removed); the origin goes with the last one.
    pub(super) fn unback(&mut self, id: VolumeId, node: NodeId) {
        let Some(v) = self.volumes.get_mut(&id) else {
            return;
        };
        let Some(o) = v.origin.as_mut() else {
            return;
        };
        if o.backed.remove(&node) && o.backed.is_empty() {
            let o = o.clone();
            self.release_origin(&o);
        }
    }

    /// An origin no replica reads any more (the record stays, naming what
    /// the clone was made from): a snapshot taken only for the clone goes
    /// (its replicas free it when they see it gone).
    pub(super) fn release_origin(&mut self, o: &Origin) {
        // Not the target of a revert in progress (deleted by hand then).
        let reverting = self
            .volumes
            .get(&o.volume)
            .and_then(|v| v.reverting.as_ref())
            .is_some_and(|r| r.snapshot == o.snapshot);
        if o.implicit && !reverting && self.clone_of(o.snapshot).is_none() {
            self.snapshots.remove(&o.snapshot);
        }
    }
}
