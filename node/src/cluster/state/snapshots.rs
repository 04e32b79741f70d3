//! The snapshot commands of the cluster state: taking one (its name is
//! reserved first, it is ready once replicas froze it), a rebuild copying
//! one to a replica that lacks it, forgetting one,
//! and the revert guard (a new epoch and no attach until every healthy
//! replica's head equals the snapshot).

use std::collections::BTreeSet;

use super::{ClusterState, Command, ReplicaState, Reverting, Snapshot, StateError, MAX_SNAPSHOTS};
use crate::types::validate_snapshot_name;

impl ClusterState {
    pub(super) fn apply_snapshot(&mut self, cmd: &Command) -> Result<(), StateError> {
        match cmd {
            Command::CreateSnapshot {
                id,
                volume,
                name,
                created_unix_ms,
            } => {
                let v = self.live(*volume)?;
                validate_snapshot_name(name).map_err(StateError::InvalidSnapshotName)?;
                if v.reverting.is_some() {
                    return Err(StateError::Reverting { id: *volume });
                }
                if self.snapshots.contains_key(id) {
                    return Err(StateError::SnapshotIdExists(*id));
                }
                let existing = self.snapshots_of(*volume);
                if existing.iter().any(|s| s.name == *name) {
                    return Err(StateError::SnapshotExists {
                        volume: *volume,
                        name: name.clone(),
                    });
                }
                if existing.len() >= MAX_SNAPSHOTS {
                    return Err(StateError::TooManySnapshots { volume: *volume });
                }
                let snapshot = Snapshot {
                    id: *id,
                    volume: *volume,
                    name: name.clone(),
                    created_unix_ms: *created_unix_ms,
                    size_bytes: v.size_bytes,
                    ready: false,
                    replicas: BTreeSet::new(),
                    formatted: v.formatted,
                };
                self.snapshots.insert(*id, snapshot);
            }
            Command::SnapshotTaken { id, nodes } => {
                let s = self
                    .snapshots
                    .get(id)
                    .ok_or(StateError::SnapshotNotFound(*id))?;
                let v = self.volume(s.volume)?;
                if nodes.is_empty() || !nodes.iter().all(|n| v.has_replica_on(*n)) {
                    return Err(StateError::BadSnapshotReplicas { id: *id });
                }
                let s = self.snapshots.get_mut(id).expect("checked");
                s.ready = true;
                s.replicas = nodes.clone();
            }
            Command::SnapshotCopied { id, node, epoch } => {
                let s = self
                    .snapshots
                    .get(id)
                    .ok_or(StateError::SnapshotNotFound(*id))?;
                if !s.ready {
                    return Err(StateError::SnapshotNotReady { id: *id });
                }
                if s.replicas.contains(node) {
                    // Already recorded (a repeated proposal).
                    return Ok(());
                }
                let v = self.volume(s.volume)?;
                if v.epoch != *epoch {
                    return Err(StateError::StaleEpoch {
                        id: v.id,
                        given: *epoch,
                        current: v.epoch,
                    });
                }
                let faulted = v
                    .replica(*node)
                    .is_some_and(|r| r.state == ReplicaState::Faulted);
                if !faulted {
                    return Err(StateError::NotACopyTarget {
                        id: *id,
                        node: *node,
                    });
                }
                self.snapshots
                    .get_mut(id)
                    .expect("checked")
                    .replicas
                    .insert(*node);
            }
            Command::DeleteSnapshot { id } => {
                let s = self
                    .snapshots
                    .get(id)
                    .ok_or(StateError::SnapshotNotFound(*id))?;
                let in_use = self
                    .volumes
                    .get(&s.volume)
                    .and_then(|v| v.reverting.as_ref())
                    .is_some_and(|r| r.snapshot == *id);
                if in_use {
                    return Err(StateError::SnapshotInUse { id: *id });
                }
                if let Some(clone) = self.clone_of(*id) {
                    return Err(StateError::SnapshotBacksClone { id: *id, clone });
                }
                let volume = s.volume;
                self.snapshots.remove(id);
                let retired = self.volumes.get(&volume).is_some_and(|v| v.retired);
                if retired && self.snapshots_of(volume).is_empty() {
                    self.remove_volume(volume);
                }
            }
            Command::RetireVolume { id } => {
                let v = self.volume(*id)?;
                if v.retired {
                    return Ok(()); // a repeated proposal
                }
                if v.attachment.is_some() {
                    return Err(StateError::Attached(*id));
                }
                if !v.readers.is_empty() {
                    return Err(StateError::HasReaders {
                        id: *id,
                        count: v.readers.len(),
                    });
                }
                if v.reverting.is_some() {
                    return Err(StateError::Reverting { id: *id });
                }
                if self.snapshots_of(*id).is_empty() {
                    self.remove_volume(*id);
                    return Ok(());
                }
                // It keeps its name (snapshot ids are `VOLUME@NAME`) until
                // it goes with its last snapshot.
                self.volumes.get_mut(id).expect("checked").retired = true;
            }
            Command::BeginRevert { id, snapshot } => {
                let v = self.live(*id)?;
                let s = self
                    .snapshots
                    .get(snapshot)
                    .ok_or(StateError::SnapshotNotFound(*snapshot))?;
                if s.volume != *id {
                    return Err(StateError::SnapshotOfAnotherVolume {
                        snapshot: *snapshot,
                        volume: *id,
                    });
                }
                if !s.ready {
                    return Err(StateError::SnapshotNotReady { id: *snapshot });
                }
                if let Some(a) = &v.attachment {
                    return Err(StateError::AttachedElsewhere {
                        id: *id,
                        node: a.node,
                    });
                }
                if !v.readers.is_empty() {
                    return Err(StateError::HasReaders {
                        id: *id,
                        count: v.readers.len(),
                    });
                }
                // Taking over an unfinished revert is allowed: the new
                // epoch fences the engine that ran it.
                let v = self.volumes.get_mut(id).expect("checked");
                v.epoch += 1;
                v.reverting = Some(Reverting {
                    snapshot: *snapshot,
                    epoch: v.epoch,
                });
            }
            Command::EndRevert { id, epoch } => {
                let v = self.volume(*id)?;
                match &v.reverting {
                    Some(r) if r.epoch == *epoch => {}
                    Some(r) => {
                        return Err(StateError::StaleEpoch {
                            id: *id,
                            given: *epoch,
                            current: r.epoch,
                        })
                    }
                    // Already ended (a repeated proposal).
                    None => return Ok(()),
                }
                self.volumes.get_mut(id).expect("checked").reverting = None;
            }
            Command::FenceDetached { id } => {
                let v = self.volume(*id)?;
                if v.attachment.is_some() {
                    return Err(StateError::Attached(*id));
                }
                if v.reverting.is_some() {
                    return Err(StateError::Reverting { id: *id });
                }
                if v.readers.is_empty() {
                    self.volumes.get_mut(id).expect("checked").epoch += 1;
                }
            }
            _ => unreachable!("not a snapshot command"),
        }
        Ok(())
    }
}
