//! Snapshots of volumes, and reverting a volume to one.
//!
//! Taking one: its name is recorded in the cluster state first (not ready),
//! then the engine that serves the volume freezes every healthy replica at
//! one point of its write order (`engine::snapshot`), then the nodes that
//! took it are recorded and it is ready. The engine is the attaching
//! node's (asked over the peer service when that is another node) or, for
//! a detached volume, one this node opens at the volume's epoch: an attach
//! meanwhile moves the epoch and fences it, so the take fails instead of
//! missing writes. A mounted filesystem on the attaching node is frozen
//! around the take unless the caller opts out; a freeze that fails fails
//! the snapshot. A take that fails forgets the record and frees what some
//! replicas took.
//!
//! Deleting one: the state forgets it first, then every replica node frees
//! it (each only once its own state no longer lists it); a node that does
//! not answer frees it in its reconciler, which frees every local snapshot
//! its state does not list.
//!
//! Reverting: see [`VolumeManager::revert`].

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use cairn_proto::data::SnapshotOp;

use super::*;
use crate::cluster::state::Snapshot;
use crate::types::{validate_snapshot_name, SnapshotId};
use crate::volume::view::{SnapshotSpaceView, SnapshotView};
use crate::volume::VolumeView;

/// How long the node that records a snapshot waits for the attaching node
/// to take it (a freeze writes every dirty page first).
const TAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

impl VolumeManager {
    /// Takes snapshot `name` of volume `volume` (attached anywhere or not);
    /// with `freeze`, mounted filesystems on the attaching node are frozen
    /// around it.
    pub fn snapshot_create(
        &self,
        volume: &str,
        name: &str,
        freeze: bool,
    ) -> Result<SnapshotView, VolumeError> {
        validate_snapshot_name(name).map_err(VolumeError::InvalidSnapshotName)?;
        let _g = self.guard(volume)?;
        self.sync_read()?;
        let v = self.find(volume)?;
        // A name already taken is refused by the state (SnapshotExists).
        let id = SnapshotId::random();
        self.propose(
            Command::CreateSnapshot {
                id,
                volume: v.id,
                name: name.into(),
                created_unix_ms: now_unix_ms(),
            },
            volume,
        )?;
        let taken = self.find(volume).and_then(|v| {
            let nodes = self.take_retrying(&v, id, freeze)?;
            self.propose(
                Command::SnapshotTaken {
                    id,
                    nodes: nodes.into_iter().collect(),
                },
                volume,
            )
        });
        if let Err(e) = taken {
            tracing::warn!(volume, snapshot = name, error = %e, "taking the snapshot failed; forgetting it");
            match self.propose_at(Command::DeleteSnapshot { id }, volume) {
                Ok(index) => {
                    self.free_snapshot(&v, id, index);
                }
                Err(f) => {
                    tracing::warn!(volume, snapshot = name, error = %f, "the failed snapshot stays listed as not ready until it is deleted")
                }
            }
            return Err(e);
        }
        tracing::info!(volume, snapshot = name, freeze, "took snapshot");
        self.snapshot_inspect(volume, name)
    }

    /// [`Self::take`], again after a moment when a replica's node refused
    /// because its state did not list the snapshot yet (nothing was
    /// faulted then).
    fn take_retrying(
        &self,
        v: &Volume,
        id: SnapshotId,
        freeze: bool,
    ) -> Result<Vec<NodeId>, VolumeError> {
        let mut tries = 0;
        loop {
            match self.take(v, id, freeze) {
                Err(e) if tries < 2 && lagged(&e) => {
                    tracing::info!(volume = %v.name, error = %e, "a replica's node does not list the snapshot yet; retrying");
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(500));
                }
                r => return r,
            }
        }
    }

    /// Takes recorded snapshot `id` through the engine that serves `v`.
    fn take(&self, v: &Volume, id: SnapshotId, freeze: bool) -> Result<Vec<NodeId>, VolumeError> {
        match &v.attachment {
            Some(a) if a.node != self.cfg.node_id => self.take_on(a.node, a.epoch, v, id, freeze),
            _ => self.take_here(v, id, freeze),
        }
    }

    /// Takes snapshot `id` with this node's engine for `v` (its attached
    /// one, or one opened for a detached volume).
    fn take_here(
        &self,
        v: &Volume,
        id: SnapshotId,
        freeze: bool,
    ) -> Result<Vec<NodeId>, VolumeError> {
        let engine = match &v.attachment {
            Some(_) => self.engine(v.id).ok_or_else(|| {
                VolumeError::Device(format!(
                    "volume {:?} is attached here but not served yet; retry",
                    v.name
                ))
            })?,
            None => {
                // The only writer: every older engine is fenced first.
                self.propose(Command::FenceDetached { id: v.id }, &v.name)?;
                let v = &self.find(&v.name)?;
                if v.attachment.is_some() {
                    return Err(VolumeError::Busy(v.name.clone()));
                }
                let e = self.engine_for(v)?;
                e.activate(v, v.epoch)
                    .map_err(|e| VolumeError::engine(&v.name, e))?;
                e
            }
        };
        // One freeze for the filesystem: every mount of the device shows
        // the same one.
        let frozen = match (freeze, &v.attachment) {
            (true, Some(_)) => self.local_record(v.id),
            _ => None,
        }
        .filter(|r| !r.read_only)
        .and_then(|r| Some((r.mounts.first()?.clone(), r.device)))
        .map(|(m, device)| {
            crate::sys::mount::freeze(Path::new(&m), Path::new(&device)).map_err(|e| {
                VolumeError::Freeze {
                    name: v.name.clone(),
                    why: format!("cannot freeze the filesystem mounted at {m}: {e}"),
                }
            })
        })
        .transpose()?;
        let r = engine
            .snapshot(id)
            .map_err(|e| VolumeError::engine(&v.name, e));
        drop(frozen);
        r
    }

    /// Asks `node`, where `v` is attached at `epoch`, to take snapshot `id`.
    fn take_on(
        &self,
        node: NodeId,
        epoch: u64,
        v: &Volume,
        id: SnapshotId,
        freeze: bool,
    ) -> Result<Vec<NodeId>, VolumeError> {
        let (cluster, addr) = {
            let s = self.store.read();
            let addr = s.nodes.get(&node).map(|n| n.peer_address.clone());
            (s.cluster_id, addr)
        };
        let name = self.node_name(node);
        let on_node = |code, message| VolumeError::OnNode {
            node: name.clone(),
            code,
            api_code: None,
            message,
        };
        let addr = addr.ok_or_else(|| {
            on_node(
                tonic::Code::Unavailable,
                "the node is not in the cluster".into(),
            )
        })?;
        let mut client = crate::cluster::peer_service::client_with_timeout(&addr, TAKE_TIMEOUT)
            .map_err(|e| on_node(tonic::Code::Unavailable, e))?;
        let req = cairn_proto::peer::TakeSnapshotRequest {
            cluster_id: cluster.to_string(),
            volume_id: v.id.to_string(),
            snapshot_id: id.to_string(),
            epoch,
            freeze,
        };
        let _rt = self.ctx.handle.enter();
        let reply = self
            .ctx
            .handle
            .block_on(async move { client.take_snapshot(req).await })
            .map_err(|s| VolumeError::OnNode {
                node: name.clone(),
                code: s.code(),
                // Only a code of the API's vocabulary is passed on.
                api_code: s
                    .metadata()
                    .get(crate::cluster::peer_service::API_CODE_KEY)
                    .and_then(|v| v.to_str().ok())
                    .filter(|c| {
                        c.len() <= 40
                            && !c.is_empty()
                            && c.bytes().all(|b| b.is_ascii_alphanumeric())
                    })
                    .map(str::to_string),
                message: s.message().to_string(),
            })?
            .into_inner();
        reply
            .nodes
            .iter()
            .map(|n| {
                n.parse().map_err(|e| {
                    on_node(
                        tonic::Code::Internal,
                        format!("answered a bad node id {n:?}: {e}"),
                    )
                })
            })
            .collect()
    }

    /// Deletes snapshot `name` of `volume` and frees it on every replica
    /// node; returns the names of nodes that have not freed it yet (their
    /// reconcilers do when they run again).
    pub fn snapshot_delete(&self, volume: &str, name: &str) -> Result<Vec<String>, VolumeError> {
        let _g = self.guard(volume)?;
        self.sync_read()?;
        let v = self.find_any(volume)?;
        let s = self.find_snapshot(&v, name)?;
        let index = self.propose_at(Command::DeleteSnapshot { id: s.id }, volume)?;
        if v.retired && !self.store.read().volumes.contains_key(&v.id) {
            // The last snapshot of a deleted volume took the volume along.
            return Ok(self.free_volume(&v, index));
        }
        let pending = self.free_snapshot(&v, s.id, index);
        if pending.is_empty() {
            tracing::info!(
                volume,
                snapshot = name,
                "deleted snapshot; freed on every replica"
            );
        } else {
            tracing::warn!(volume, snapshot = name, pending = ?pending, "deleted snapshot; not freed yet on some nodes (freed when they answer)");
        }
        Ok(pending)
    }

    /// Frees snapshot `id` (forgotten by the state at `index`) on every
    /// replica of `v`; returns the nodes that did not confirm.
    fn free_snapshot(&self, v: &Volume, id: SnapshotId, index: u64) -> Vec<String> {
        let mut pending = Vec::new();
        if v.has_replica_on(self.cfg.node_id) {
            if let Some(h) = self.hosts.get(v.id) {
                if let Err(e) = h.replica.delete_snapshot(id) {
                    tracing::warn!(volume = %v.name, snapshot = %id, error = %e, "freeing the local snapshot failed; retried");
                    pending.push(self.node_name(self.cfg.node_id));
                }
            }
        }
        let epoch = v.epoch;
        pending.extend(
            self.ask_replica_nodes(v, "free the snapshot", move |r| async move {
                r.snapshot(SnapshotOp::Delete, epoch, Some(id), index)
                    .await
                    .map(|_| ())
            }),
        );
        pending
    }

    /// Reverts the detached volume `name` to its snapshot `snapshot`: every
    /// healthy replica's head then reads as the snapshot (one that cannot
    /// is recorded faulted and rebuilt from one that did). The cluster
    /// state fences the volume for it (a new epoch; no attach, reader or
    /// snapshot until it ends), so a revert cut short leaves a volume that
    /// cannot be attached until a revert is retried to the end.
    pub fn revert(&self, name: &str, snapshot: &str) -> Result<VolumeView, VolumeError> {
        let _g = self.guard(name)?;
        self.sync_read()?;
        let v = self.find(name)?;
        let s = self.find_snapshot(&v, snapshot)?;
        if let Some(a) = &v.attachment {
            return Err(VolumeError::Attached {
                name: name.into(),
                node: self.node_name(a.node),
            });
        }
        if !v.readers.is_empty() {
            return Err(VolumeError::InUse {
                name: name.into(),
                why: format!("{} node(s) hold it read-only", v.readers.len()),
            });
        }
        self.refuse_nbd_users(&v)?;
        if !s.ready {
            return Err(VolumeError::SnapshotNotReady {
                volume: name.into(),
                name: snapshot.into(),
            });
        }
        if !v.healthy().any(|r| s.replicas.contains(&r.node)) {
            return Err(VolumeError::Engine {
                volume: name.into(),
                source: crate::engine::EngineError::NoReplica,
            });
        }
        self.propose(
            Command::BeginRevert {
                id: v.id,
                snapshot: s.id,
            },
            name,
        )?;
        let v = self.find(name)?;
        let epoch = v.reverting.as_ref().map(|r| r.epoch).unwrap_or(v.epoch);
        let engine = self.engine_for(&v)?;
        engine
            .activate(&v, epoch)
            .and_then(|()| engine.revert(s.id, &s.replicas))
            .map_err(|e| VolumeError::engine(name, e))?;
        self.propose(Command::EndRevert { id: v.id, epoch }, name)?;
        tracing::info!(volume = name, snapshot, "reverted volume to snapshot");
        self.inspect(name)
    }

    pub(super) fn find_snapshot(&self, v: &Volume, name: &str) -> Result<Snapshot, VolumeError> {
        self.store
            .read()
            .snapshot_named(v.id, name)
            .cloned()
            .ok_or_else(|| VolumeError::SnapshotNotFound {
                volume: v.name.clone(),
                name: name.into(),
            })
    }

    pub fn snapshot_inspect(&self, volume: &str, name: &str) -> Result<SnapshotView, VolumeError> {
        let v = self.find_any(volume)?;
        let s = self.find_snapshot(&v, name)?;
        let spaces = self.snapshot_spaces(&v);
        Ok(self.snapshot_view(&v, &s, &spaces))
    }

    /// Snapshots of `volume` (every volume's with `None`), oldest first per
    /// volume, volumes by name.
    pub fn snapshot_list(&self, volume: Option<&str>) -> Result<Vec<SnapshotView>, VolumeError> {
        let vols: Vec<Volume> = match volume {
            Some(n) => vec![self.find_any(n)?],
            None => {
                let mut all: Vec<Volume> = self.store.read().volumes.values().cloned().collect();
                all.sort_by(|a, b| a.name.cmp(&b.name));
                all
            }
        };
        let mut out = Vec::new();
        for v in vols {
            let snaps: Vec<Snapshot> = self
                .store
                .read()
                .snapshots_of(v.id)
                .into_iter()
                .cloned()
                .collect();
            if snaps.is_empty() {
                continue;
            }
            let spaces = self.snapshot_spaces(&v);
            out.extend(snaps.iter().map(|s| self.snapshot_view(&v, s, &spaces)));
        }
        Ok(out)
    }

    fn snapshot_view(
        &self,
        v: &Volume,
        s: &Snapshot,
        spaces: &HashMap<SnapshotId, SnapshotSpaceView>,
    ) -> SnapshotView {
        let mut replicas: Vec<String> = s.replicas.iter().map(|n| self.node_name(*n)).collect();
        replicas.sort();
        SnapshotView {
            id: s.id,
            name: s.name.clone(),
            volume: v.name.clone(),
            volume_id: v.id,
            created_unix_ms: s.created_unix_ms,
            size_bytes: s.size_bytes,
            ready: s.ready,
            replicas,
            space: spaces.get(&s.id).copied(),
        }
    }

    /// The space of `v`'s snapshots on one healthy replica: this node's
    /// when it holds one, else the first other node that answers.
    fn snapshot_spaces(&self, v: &Volume) -> HashMap<SnapshotId, SnapshotSpaceView> {
        let of = |id, held_bytes, exclusive_bytes| {
            (
                id,
                SnapshotSpaceView {
                    held_bytes,
                    exclusive_bytes,
                },
            )
        };
        let healthy: BTreeSet<NodeId> = v.healthy().map(|r| r.node).collect();
        if healthy.contains(&self.cfg.node_id) {
            if let Some(h) = self.hosts.get(v.id) {
                return h
                    .replica
                    .snapshot_space()
                    .into_iter()
                    .map(|s| of(s.id, s.held_bytes, s.exclusive_bytes))
                    .collect();
            }
        }
        for node in healthy.into_iter().filter(|n| *n != self.cfg.node_id) {
            let Ok(r) = self.remote_replica(v, node) else {
                continue;
            };
            let _rt = self.ctx.handle.enter();
            let listed = self
                .ctx
                .handle
                .block_on(async move { r.snapshot(SnapshotOp::List, v.epoch, None, 0).await });
            match listed {
                Ok(list) => {
                    return list
                        .into_iter()
                        .filter_map(|s| {
                            Some(of(
                                s.snapshot_id.parse().ok()?,
                                s.held_bytes,
                                s.exclusive_bytes,
                            ))
                        })
                        .collect()
                }
                Err(e) => {
                    tracing::debug!(volume = %v.name, node = %node, error = %e, "cannot list the replica's snapshots")
                }
            }
        }
        HashMap::new()
    }

    /// Frees the local snapshots of hosted replicas that the cluster does
    /// not record here: no longer listed (deleted while this node was
    /// away, or left by a failed take), or taken without this node (a take
    /// that arrived after its engine gave up on this replica, once the
    /// replica is no longer faulted: a rebuild's catch-up adopts snapshots
    /// on a faulted replica before it records them). Local ids
    /// are read before the state: a take waits until its node's state
    /// lists the snapshot, so one taken after this list was made is never
    /// judged against an older state; and the state is brought up to
    /// everything committed first (a restarted node may have applied
    /// entries it had not saved yet).
    pub(super) fn reconcile_snapshots(&self) {
        let me = self.cfg.node_id;
        let held: Vec<(VolumeId, SnapshotId)> = self
            .hosts
            .ids()
            .into_iter()
            .filter_map(|id| Some((id, self.hosts.get(id)?.replica.snapshot_ids())))
            .flat_map(|(v, ids)| ids.into_iter().map(move |s| (v, s)))
            .collect();
        let stray =
            |state: &crate::cluster::state::ClusterState, v: VolumeId, s: SnapshotId| match state
                .snapshots
                .get(&s)
            {
                None => true,
                Some(x) => {
                    // A faulted replica's unrecorded snapshot may be one its
                    // rebuild just copied and is about to record.
                    let faulted = state
                        .volumes
                        .get(&v)
                        .and_then(|vol| vol.replica(me))
                        .is_some_and(|r| r.state == ReplicaState::Faulted);
                    x.volume != v || (x.ready && !x.replicas.contains(&me) && !faulted)
                }
            };
        let candidates: Vec<(VolumeId, SnapshotId)> = {
            let state = self.store.read();
            held.into_iter()
                .filter(|(v, s)| stray(&state, *v, *s))
                .collect()
        };
        if candidates.is_empty() || self.sync_read().is_err() {
            return;
        }
        let unlisted: Vec<(VolumeId, SnapshotId)> = {
            let state = self.store.read();
            candidates
                .into_iter()
                .filter(|(v, s)| stray(&state, *v, *s))
                .collect()
        };
        for (v, s) in unlisted {
            let Some(h) = self.hosts.get(v) else { continue };
            match h.replica.delete_snapshot(s) {
                Ok(()) => {
                    tracing::info!(volume = %v, snapshot = %s, "freed a snapshot the cluster no longer lists")
                }
                Err(e) => {
                    tracing::warn!(volume = %v, snapshot = %s, error = %e, "cannot free a snapshot the cluster no longer lists; retried")
                }
            }
        }
    }
}

/// Whether `e` is a replica node refusing a take its state does not list
/// yet.
fn lagged(e: &VolumeError) -> bool {
    match e {
        VolumeError::Engine {
            source: crate::engine::EngineError::Replica(crate::replica::ReplicaError::Unlisted(_)),
            ..
        } => true,
        VolumeError::OnNode { api_code, .. } => api_code.as_deref() == Some("NodeLagging"),
        _ => false,
    }
}

/// Takes a snapshot for the node that recorded it: only while the volume
/// is attached here at the epoch that node saw and this node's state lists
/// the snapshot (waiting briefly for it to catch up).
impl crate::cluster::peer_service::PeerVolumes for VolumeManager {
    fn take_snapshot(
        &self,
        volume: VolumeId,
        snapshot: SnapshotId,
        epoch: u64,
        freeze: bool,
    ) -> Result<Vec<NodeId>, VolumeError> {
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        let of_volume = |s: &crate::cluster::state::ClusterState| {
            s.snapshots
                .get(&snapshot)
                .is_some_and(|x| x.volume == volume)
        };
        self.store.wait_until(deadline, |s, _| of_volume(s));
        let (v, listed) = {
            let s = self.store.read();
            (s.volumes.get(&volume).cloned(), of_volume(&s))
        };
        let v = v.ok_or_else(|| VolumeError::NotFound(volume.to_string()))?;
        if !listed {
            return Err(VolumeError::SnapshotNotFound {
                volume: v.name.clone(),
                name: snapshot.to_string(),
            });
        }
        let _g = self.guard(&v.name)?;
        match &v.attachment {
            Some(a) if a.node == self.cfg.node_id && a.epoch == epoch => {}
            _ => {
                return Err(VolumeError::InUse {
                    name: v.name.clone(),
                    why: format!("it is no longer attached to this node at epoch {epoch}; retry"),
                })
            }
        }
        self.take_here(&v, snapshot, freeze)
    }
}
