//! Clones: a new volume made from a snapshot (or from a volume, through a
//! snapshot taken for it), usable at once.
//!
//! Placement puts as many of the clone's replicas as it can on nodes that
//! hold the snapshot: those read through to their local copy (see
//! `replica::clone`) and are healthy from the start; the others start
//! faulted and the rebuild machinery copies them from a healthy one, with
//! progress, while the clone serves I/O. A filler thread on each backed
//! node copies the snapshot's data into the clone; when done, the node
//! records it (`CloneFilled`), and once every backed replica is filled the
//! snapshot is free to delete again (one taken for a `--from-volume`
//! clone is deleted then).

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::*;
use crate::replica::clone::FillProgress;
use crate::volume::CloneSource;

impl VolumeManager {
    /// Creates volume `req.name` as a clone of `source` with `count`
    /// replicas; the caller holds the name's guard and checked the name.
    pub(super) fn create_clone(
        &self,
        req: &CreateVolume,
        source: &CloneSource,
        count: usize,
        local: Option<NodeId>,
        allowed: Option<&[NodeId]>,
    ) -> Result<crate::volume::VolumeView, VolumeError> {
        let id = VolumeId::random();
        let (volume, snapshot, implicit) = match source {
            CloneSource::Snapshot { volume, snapshot } => {
                let v = self.find_any(volume)?;
                let s = self.find_snapshot(&v, snapshot)?;
                (v, s, false)
            }
            CloneSource::Volume(volume) => {
                let name = format!("clone-{}", &id.to_string()[..8]);
                let view = self.snapshot_create(volume, &name, true)?;
                let v = self.find(volume)?;
                let s = self.find_snapshot(&v, &view.name)?;
                (v, s, true)
            }
        };
        let r = self.propose_clone(req, id, &volume, &snapshot, implicit, count, local, allowed);
        if r.is_err() && implicit {
            if let Err(e) = self.snapshot_delete(&volume.name, &snapshot.name) {
                tracing::warn!(volume = %volume.name, snapshot = %snapshot.name, error = %e, "the snapshot taken for a failed clone is left; delete it by hand");
            }
        }
        r?;
        if let Some(h) = self.hosts.get(id).or_else(|| {
            let here = self
                .store
                .read()
                .volumes
                .get(&id)
                .is_some_and(|v| v.has_replica_on(self.cfg.node_id));
            here.then(|| self.hosts.get_or_create(id, &self.store).ok())
                .flatten()
        }) {
            self.start_filler(id, h.replica.clone());
        }
        tracing::info!(volume = %req.name, source = %volume.name, snapshot = %snapshot.name, replicas = count, "created clone");
        self.inspect(&req.name)
    }

    #[allow(clippy::too_many_arguments)]
    fn propose_clone(
        &self,
        req: &CreateVolume,
        id: VolumeId,
        volume: &Volume,
        snapshot: &crate::cluster::state::Snapshot,
        implicit: bool,
        count: usize,
        local: Option<NodeId>,
        allowed: Option<&[NodeId]>,
    ) -> Result<(), VolumeError> {
        if !snapshot.ready {
            return Err(VolumeError::SnapshotNotReady {
                volume: volume.name.clone(),
                name: snapshot.name.clone(),
            });
        }
        let size = match &req.size {
            None => snapshot.size_bytes,
            Some(s) => parse_size(s)?,
        };
        if size < snapshot.size_bytes {
            return Err(VolumeError::InvalidSize(format!(
                "a clone is at least as large as its source: {}@{} is {} bytes, {} asked for {size}",
                volume.name, snapshot.name, snapshot.size_bytes, req.name
            )));
        }
        let (nodes, backed) = {
            let s = self.store.read();
            // Nodes holding the snapshot, the local one first.
            let mut holders: Vec<NodeId> = snapshot
                .replicas
                .iter()
                .copied()
                .filter(|n| s.nodes.get(n).is_some_and(|r| r.state == NodeState::Up))
                .filter(|n| allowed.is_none_or(|a| a.contains(n)))
                .collect();
            holders.sort_by_key(|n| Some(*n) != local);
            holders.truncate(count);
            if holders.is_empty() {
                return Err(VolumeError::NotEnoughNodes(format!(
                    "no node that holds snapshot {}@{} is up{}",
                    volume.name,
                    snapshot.name,
                    if allowed.is_some() {
                        " and allowed"
                    } else {
                        ""
                    }
                )));
            }
            let more = crate::cluster::placement::place(
                &s,
                count - holders.len(),
                None,
                &holders,
                allowed,
                crate::cluster::placement::PLACEMENT_LABEL,
            )
            .map_err(VolumeError::NotEnoughNodes)?;
            let backed: BTreeSet<NodeId> = holders.iter().copied().collect();
            let mut nodes = holders;
            nodes.extend(more);
            (nodes, backed)
        };
        self.propose(
            Command::CreateClone {
                id,
                name: req.name.clone(),
                size_bytes: size,
                snapshot: snapshot.id,
                replica_nodes: nodes,
                backed,
                implicit,
                created_unix_ms: now_unix_ms(),
                csi_name: req.csi_name.clone(),
            },
            &req.name,
        )
    }

    /// Starts the filler of every clone replica here that still reads
    /// through to its origin (or has yet to record that it is filled).
    pub(super) fn run_fillers(&self) {
        let state = self.store.read().clone();
        for id in self.hosts.ids() {
            let Some(h) = self.hosts.get(id) else {
                continue;
            };
            // Also a copy no longer counted backed (re-added after a
            // removal): it still pins its origin until filled.
            let backed = state.volumes.get(&id).is_some_and(|v| {
                v.origin
                    .as_ref()
                    .is_some_and(|o| o.backed.contains(&self.cfg.node_id))
            });
            if backed || h.replica.has_origin() {
                self.start_filler(id, h.replica.clone());
            }
        }
    }

    /// Runs the filler of clone replica `rep` on a thread of its own
    /// (unless one runs): it copies the origin within the rebuild
    /// bandwidth, then records the replica filled.
    fn start_filler(&self, id: VolumeId, rep: Arc<LocalReplica>) {
        if !self.fillers.lock().expect("fillers lock").insert(id) {
            return;
        }
        let ctx = FillerCtx {
            store: self.store.clone(),
            hosts: self.hosts.clone(),
            me: self.cfg.node_id,
            stopping: self.stopping.clone(),
            fillers: self.fillers.clone(),
            bandwidth: self.cfg.rebuild_bandwidth,
            extent_size: self.hosts.extent_size(),
        };
        let name = format!("fill-{}", &id.to_string()[..8]);
        let spawned = self.cfg.threads.spawn(name, move || {
            ctx.run(id, &rep);
            ctx.fillers.lock().expect("fillers lock").remove(&id);
        });
        if let Err(e) = spawned {
            self.fillers.lock().expect("fillers lock").remove(&id);
            tracing::error!(volume = %id, error = %e, "cannot start a clone filler; retried");
        }
    }

    /// Fill progress of clone replicas on this node: extents examined and
    /// of how many.
    pub fn fill_progress(&self, id: VolumeId) -> Option<(u64, u64)> {
        let h = self.hosts.get(id)?;
        h.replica.has_origin().then(|| h.replica.fill_position())
    }
}

struct FillerCtx {
    store: Arc<ClusterStore>,
    hosts: Arc<HostMap>,
    me: NodeId,
    stopping: Arc<std::sync::atomic::AtomicBool>,
    fillers: Arc<Mutex<std::collections::HashSet<VolumeId>>>,
    bandwidth: u64,
    extent_size: u64,
}

impl FillerCtx {
    /// Whether the filler should go on with `rep`: the daemon runs and the
    /// replica is still the one hosted.
    fn live(&self, id: VolumeId, rep: &Arc<LocalReplica>) -> bool {
        !self.stopping.load(Ordering::Acquire)
            && self
                .hosts
                .get(id)
                .is_some_and(|h| Arc::ptr_eq(&h.replica, rep))
    }

    fn run(&self, id: VolumeId, rep: &Arc<LocalReplica>) {
        let started = Instant::now();
        let mut copied_bytes = 0u64;
        let mut cursor = 0u64;
        while self.live(id, rep) {
            match rep.fill_step(cursor) {
                Ok(Some(FillProgress { done, copied, .. })) => {
                    cursor = done;
                    copied_bytes += copied as u64 * self.extent_size;
                    // Within the rebuild bandwidth on average.
                    if self.bandwidth > 0 {
                        let due =
                            Duration::from_secs_f64(copied_bytes as f64 / self.bandwidth as f64);
                        if let Some(wait) = due.checked_sub(started.elapsed()) {
                            std::thread::sleep(wait.min(Duration::from_secs(1)));
                        }
                    }
                }
                Ok(None) => {
                    self.record_filled(id, rep);
                    return;
                }
                Err(e) => {
                    tracing::warn!(volume = %id, error = %e, "clone fill step failed; retried");
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
    }

    /// Records the replica filled, retrying while the daemon runs.
    fn record_filled(&self, id: VolumeId, rep: &Arc<LocalReplica>) {
        while self.live(id, rep) {
            let done = self.store.read().volumes.get(&id).is_none_or(|v| {
                v.origin
                    .as_ref()
                    .is_none_or(|o| !o.backed.contains(&self.me))
            });
            if done {
                return;
            }
            match self
                .store
                .propose(Command::CloneFilled { id, node: self.me })
            {
                Ok(_) => {
                    tracing::info!(volume = %id, "clone replica filled; its origin may be deleted");
                    return;
                }
                Err(e) => {
                    tracing::debug!(volume = %id, error = %e, "clone filled, not recorded yet");
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
    }
}
