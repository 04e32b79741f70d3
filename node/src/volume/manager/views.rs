//! What the manager shows: volume and pool views for the API, verify, and
//! the Prometheus text of the node's pool and volumes.

use std::collections::HashMap;

use cairn_proto::api::{self};

use std::path::PathBuf;

use super::*;
use crate::volume::view::{ReplicaCondition, ReplicaView, VolumeState, VolumeView};

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
        }
    }

    /// Brings the applied metadata up to everything committed (ReadIndex).
    pub fn sync_read(&self) -> Result<(), VolumeError> {
        Ok(self.store.sync_read()?)
    }

    pub fn list(&self) -> Vec<VolumeView> {
        let vols: Vec<Volume> = self.store.read().volumes.values().cloned().collect();
        let mut out: Vec<_> = vols.iter().map(|v| self.info(v)).collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Compares all healthy replicas extent by extent (through the engine
    /// that serves the volume, so it must run on the attaching node); with
    /// `repair`, makes differing extents equal (see `engine::scrub`).
    pub fn verify(&self, name: &str, repair: bool) -> Result<api::VerifyReport, VolumeError> {
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
        Ok(api::VerifyReport {
            extents_compared: r.extents,
            replicas_compared: r.replicas as u32,
            mismatched_extents: r.mismatched,
            repaired: r
                .repaired
                .iter()
                .map(|x| api::RepairedExtent {
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

    pub fn pool_info(&self) -> api::PoolInfo {
        let usage = self.pool.usage();
        let provisioned = self
            .store
            .read()
            .volumes
            .values()
            .map(|v| v.size_bytes)
            .sum();
        let capacity: u64 = usage.iter().map(|u| u.1).sum();
        let allocated: u64 = usage.iter().map(|u| u.2).sum();
        api::PoolInfo {
            id: self.pool.id.to_string(),
            extent_size_bytes: self.pool.extent_size,
            capacity_bytes: capacity,
            allocated_bytes: allocated,
            free_bytes: capacity - allocated,
            provisioned_bytes: provisioned,
            devices: usage
                .iter()
                .map(|(d, cap, used)| api::DeviceInfo {
                    index: d.index,
                    path: d.path.to_string_lossy().into_owned(),
                    kind: if d.is_block { "block" } else { "file" }.into(),
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
        (s.volumes.len() as u64, attached as u64)
    }

    /// Prometheus text for every volume plus pool gauges.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write;
        let cap = self.pool.capacity_bytes();
        let used = self.pool.allocated_bytes();
        let _ = writeln!(out, "# HELP cairn_pool_capacity_bytes Usable pool capacity\n# TYPE cairn_pool_capacity_bytes gauge");
        let _ = writeln!(out, "cairn_pool_capacity_bytes {cap}");
        let _ = writeln!(out, "# HELP cairn_pool_allocated_bytes Pool bytes allocated to volumes\n# TYPE cairn_pool_allocated_bytes gauge");
        let _ = writeln!(out, "cairn_pool_allocated_bytes {used}");
        let _ = writeln!(out, "# HELP cairn_data_connections Replica data connections being served\n# TYPE cairn_data_connections gauge");
        let _ = writeln!(
            out,
            "cairn_data_connections {}",
            self.hosts
                .data_connections
                .load(std::sync::atomic::Ordering::Relaxed)
        );
        let _ = writeln!(out, "# HELP cairn_data_connections_refused_total Replica data connections refused at the limit\n# TYPE cairn_data_connections_refused_total counter");
        let _ = writeln!(
            out,
            "cairn_data_connections_refused_total {}",
            self.hosts
                .data_connections_refused
                .load(std::sync::atomic::Ordering::Relaxed)
        );
        let names: HashMap<VolumeId, String> = self
            .store
            .read()
            .volumes
            .values()
            .map(|v| (v.id, v.name.clone()))
            .collect();
        render_headers(out);
        let engines = self.engines.read().expect("engines lock").clone();
        let mut ids: Vec<VolumeId> = engines.keys().copied().chain(self.hosts.ids()).collect();
        ids.sort_by_key(|id| names.get(id).cloned());
        ids.dedup();
        for id in ids {
            let Some(name) = names.get(&id) else { continue };
            if let Some(e) = engines.get(&id) {
                e.metrics.render(out, name);
                let _ = writeln!(
                    out,
                    "cairn_volume_rebuild_bytes_total{{volume=\"{name}\"}} {}",
                    e.rebuild_bytes.load(std::sync::atomic::Ordering::Relaxed)
                );
                let p = e.progress.lock().expect("progress lock").clone();
                if p.total_extents > 0 {
                    let _ = writeln!(
                        out,
                        "cairn_volume_rebuild_progress{{volume=\"{name}\"}} {}",
                        p.done_extents as f64 / p.total_extents as f64
                    );
                }
            }
            if let Some(h) = self.hosts.get(id) {
                let _ = writeln!(
                    out,
                    "cairn_volume_allocated_bytes{{volume=\"{name}\"}} {}",
                    h.replica.allocated_bytes()
                );
            }
        }
    }
}
