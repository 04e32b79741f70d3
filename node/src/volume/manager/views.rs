//! What the manager shows, as core types (`volume::view`, and the metrics
//! sample of `crate::metrics`): volume and pool views, verify reports, the
//! counters of the node's pool and volumes. The REST bodies and the
//! Prometheus text are made from these at the API edge.

use std::collections::HashMap;
use std::path::PathBuf;

use super::*;
use crate::metrics::{NodeSample, VolumeSample};
use crate::volume::view::{
    DeviceView, PoolView, RepairView, ReplicaCondition, ReplicaView, SnapshotVerifyView,
    VerifyView, VolumeState, VolumeView,
};

impl VolumeManager {
    pub(super) fn info(&self, v: &Volume) -> VolumeView {
        let rec = self.local_record(v.id);
        let allocated = self
            .hosts
            .get(v.id)
            .map(|h| h.replica.allocated_bytes())
            .unwrap_or(0);
        let engine = self.engine(v.id);
        let progress = engine
            .as_ref()
            .map(|e| e.progress.lock().expect("progress lock").clone());
        let replicas = {
            let s = self.store.read();
            v.replicas
                .iter()
                .map(|r| ReplicaView {
                    node_id: r.node,
                    node: s
                        .nodes
                        .get(&r.node)
                        .map(|n| n.name.clone())
                        .unwrap_or_else(|| r.node.to_string()),
                    condition: ReplicaCondition::of(&s, r),
                    rebuild_progress: progress
                        .as_ref()
                        .filter(|p| p.node == Some(r.node) && p.total_extents > 0)
                        .map(|p| p.done_extents as f64 / p.total_extents as f64),
                })
                .collect()
        };
        let device = rec.as_ref().map(|r| PathBuf::from(&r.device));
        let (mounts, published): (Vec<PathBuf>, Vec<PathBuf>) = rec
            .map(|r| {
                (
                    r.mounts.iter().map(PathBuf::from).collect(),
                    r.published.iter().map(|p| PathBuf::from(&p.path)).collect(),
                )
            })
            .unwrap_or_default();
        let state = if !mounts.is_empty() {
            VolumeState::Mounted
        } else if device.is_some() || v.attachment.is_some() || !v.readers.is_empty() {
            VolumeState::Attached
        } else {
            VolumeState::Detached
        };
        VolumeView {
            id: v.id,
            name: v.name.clone(),
            size_bytes: v.size_bytes,
            fs: v.fs,
            state,
            device,
            mounts,
            published,
            allocated_bytes: allocated,
            formatted: v.formatted,
            epoch: v.epoch,
            attached_node: v.attachment.as_ref().map(|a| self.node_name(a.node)),
            readers: {
                let mut r: Vec<String> = v.readers.iter().map(|n| self.node_name(*n)).collect();
                r.sort();
                r
            },
            created_unix_ms: v.created_unix_ms,
            replicas,
            csi_name: v.csi_name.clone(),
            origin: v.origin.as_ref().map(|o| {
                let s = self.store.read();
                let vol = s
                    .volumes
                    .get(&o.volume)
                    .map_or_else(|| o.volume.to_string(), |x| x.name.clone());
                let snap = s
                    .snapshots
                    .get(&o.snapshot)
                    .map_or_else(|| o.snapshot.to_string(), |x| x.name.clone());
                drop(s);
                crate::volume::view::OriginView {
                    snapshot: format!("{vol}@{snap}"),
                    filling: o.backed.iter().map(|n| self.node_name(*n)).collect(),
                    progress: self
                        .fill_progress(v.id)
                        .filter(|p| p.1 > 0)
                        .map(|(d, t)| d as f64 / t as f64),
                }
            }),
        }
    }

    /// Brings the applied metadata up to everything committed (ReadIndex).
    pub fn sync_read(&self) -> Result<(), VolumeError> {
        Ok(self.store.sync_read()?)
    }

    pub fn list(&self) -> Vec<VolumeView> {
        let vols: Vec<Volume> = self
            .store
            .read()
            .volumes
            .values()
            .filter(|v| !v.retired)
            .cloned()
            .collect();
        let mut out: Vec<_> = vols.iter().map(|v| self.info(v)).collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Compares all healthy replicas extent by extent (through the engine
    /// that serves the volume, so it must run on the attaching node); with
    /// `repair`, makes differing extents equal (see `engine::scrub`). Then
    /// compares each snapshot across the healthy replicas holding it.
    pub fn verify(&self, name: &str, repair: bool) -> Result<VerifyView, VolumeError> {
        let v = self.find(name)?;
        match &v.attachment {
            Some(a) if a.node != self.cfg.node_id => {
                return Err(VolumeError::AttachedElsewhere {
                    name: name.into(),
                    node: self.node_name(a.node),
                })
            }
            _ => {}
        }
        let engine = self.engine_for(&v)?;
        if v.attachment.is_none() {
            engine
                .activate(&v, v.epoch)
                .map_err(|e| VolumeError::engine(name, e))?;
        }
        let r = engine
            .scrub(repair, 0)
            .map_err(|e| VolumeError::engine(name, e))?;
        let snapshots = engine
            .compare_snapshots(0)
            .map_err(|e| VolumeError::engine(name, e))?;
        let names: std::collections::HashMap<crate::types::SnapshotId, String> = self
            .store
            .read()
            .snapshots_of(v.id)
            .into_iter()
            .map(|s| (s.id, s.name.clone()))
            .collect();
        let nodes = |ns: &[crate::types::NodeId]| -> Vec<String> {
            ns.iter().map(|n| self.node_name(*n)).collect()
        };
        let snapshots = snapshots
            .into_iter()
            .map(|c| SnapshotVerifyView {
                name: names
                    .get(&c.snapshot)
                    .cloned()
                    .unwrap_or_else(|| c.snapshot.to_string()),
                compared: nodes(&c.holders),
                lacking: nodes(&c.lacking),
                mismatched: c.mismatched,
            })
            .collect();
        Ok(VerifyView {
            snapshots,
            extents: r.extents,
            replicas: r.replicas as u32,
            mismatched: r.mismatched,
            repaired: r
                .repaired
                .iter()
                .map(|x| RepairView {
                    extent: x.extent,
                    source: self.node_name(x.source),
                    majority: x.majority,
                    targets: x.targets.iter().map(|n| self.node_name(*n)).collect(),
                })
                .collect(),
        })
    }

    pub fn inspect(&self, name: &str) -> Result<VolumeView, VolumeError> {
        Ok(self.info(&self.find(name)?))
    }

    pub fn pool_info(&self) -> PoolView {
        let usage = self.pool.usage();
        let provisioned = self
            .store
            .read()
            .volumes
            .values()
            .map(|v| v.size_bytes)
            .sum();
        PoolView {
            id: self.pool.id,
            extent_size: self.pool.extent_size,
            capacity_bytes: usage.iter().map(|u| u.1).sum(),
            allocated_bytes: usage.iter().map(|u| u.2).sum(),
            provisioned_bytes: provisioned,
            devices: usage
                .iter()
                .map(|(d, cap, used)| DeviceView {
                    index: d.index,
                    path: d.path.clone(),
                    block: d.is_block,
                    id: d.id.to_string(),
                    capacity_bytes: *cap,
                    allocated_bytes: *used,
                })
                .collect(),
        }
    }

    pub fn counts(&self) -> (u64, u64) {
        let s = self.store.read();
        let attached = s
            .volumes
            .values()
            .filter(|v| {
                v.attachment
                    .as_ref()
                    .is_some_and(|a| a.node == self.cfg.node_id)
            })
            .count();
        let live = s.volumes.values().filter(|v| !v.retired).count();
        (live as u64, attached as u64)
    }

    /// The counters of the pool, the data connections and every volume
    /// this node serves or stores (rendered by `crate::metrics`). Takes
    /// the locks only to copy what it reads.
    pub fn metrics_sample(&self) -> NodeSample {
        use std::sync::atomic::Ordering::Relaxed;
        let (names, snapshots): (HashMap<VolumeId, String>, HashMap<VolumeId, u64>) = {
            let s = self.store.read();
            let mut counts = HashMap::new();
            for snap in s.snapshots.values() {
                *counts.entry(snap.volume).or_default() += 1;
            }
            (
                s.volumes.values().map(|v| (v.id, v.name.clone())).collect(),
                counts,
            )
        };
        let engines = self.engines.read().expect("engines lock").clone();
        let mut ids: Vec<VolumeId> = engines.keys().copied().chain(self.hosts.ids()).collect();
        ids.sort_by_key(|id| names.get(id).cloned());
        ids.dedup();
        let volumes = ids
            .into_iter()
            .filter_map(|id| {
                let name = names.get(&id)?.clone();
                let engine = engines.get(&id);
                Some(VolumeSample {
                    name,
                    metrics: engine.map(|e| e.metrics.clone()),
                    rebuild_bytes: engine.map(|e| e.rebuild_bytes.load(Relaxed)),
                    rebuild_progress: engine.and_then(|e| {
                        let p = e.progress.lock().expect("progress lock").clone();
                        (p.total_extents > 0)
                            .then(|| p.done_extents as f64 / p.total_extents as f64)
                    }),
                    allocated_bytes: self.hosts.get(id).map(|h| h.replica.allocated_bytes()),
                    snapshots: snapshots.get(&id).copied().unwrap_or(0),
                    snapshot_bytes: self.hosts.get(id).map(|h| {
                        h.replica
                            .snapshot_space()
                            .iter()
                            .map(|s| s.held_bytes)
                            .sum()
                    }),
                    cow_extents: self
                        .hosts
                        .get(id)
                        .map(|h| h.replica.cow_extents.load(Relaxed)),
                })
            })
            .collect();
        NodeSample {
            pool_capacity_bytes: self.pool.capacity_bytes(),
            pool_allocated_bytes: self.pool.allocated_bytes(),
            data_connections: self.hosts.data_connections.load(Relaxed) as u64,
            data_connections_refused: self.hosts.data_connections_refused.load(Relaxed),
            volumes,
        }
    }
}
