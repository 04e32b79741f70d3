//! The API edge: REST bodies (`cairn_proto::api`) to the core's request
//! types and the core's views to REST bodies. Nothing below `api` builds
//! or reads a REST body (the core shares only `SizeArg`, the size syntax).

use std::path::PathBuf;

use cairn_proto::api;

use crate::types::FsType;
use crate::volume::view::{PoolView, SnapshotView, VerifyView};
use crate::volume::{CloneSource, CreateVolume, VolumeError, VolumeView};

impl TryFrom<api::VolumeCreate> for CreateVolume {
    type Error = VolumeError;

    fn try_from(r: api::VolumeCreate) -> Result<Self, VolumeError> {
        let fs = match &r.fs {
            None => FsType::Ext4,
            Some(s) => s.parse::<FsType>().map_err(VolumeError::InvalidFs)?,
        };
        let source = match (r.from_snapshot, r.from_volume) {
            (Some(_), Some(_)) => {
                return Err(VolumeError::InvalidSource(
                    "give from_snapshot or from_volume, not both".into(),
                ))
            }
            (Some(s), None) => Some(CloneSource::parse_snapshot(&s)?),
            (None, Some(v)) => Some(CloneSource::Volume(v)),
            (None, None) => None,
        };
        if source.is_some() && r.fs.is_some() {
            return Err(VolumeError::InvalidSource(
                "a clone has its source's filesystem: leave fs out".into(),
            ));
        }
        Ok(CreateVolume {
            name: r.name,
            size: r.size,
            fs,
            replicas: r.replicas,
            locality: r.locality,
            csi_name: None,
            source,
        })
    }
}

impl From<VolumeView> for api::VolumeInfo {
    fn from(v: VolumeView) -> Self {
        let path = |p: PathBuf| p.to_string_lossy().into_owned();
        api::VolumeInfo {
            id: v.id.to_string(),
            name: v.name,
            size_bytes: v.size_bytes,
            fs: v.fs.as_str().into(),
            state: v.state.as_str().into(),
            device: v.device.map(path),
            mounts: v.mounts.into_iter().map(path).collect(),
            published: v.published.into_iter().map(path).collect(),
            allocated_bytes: v.allocated_bytes,
            formatted: v.formatted,
            epoch: v.epoch,
            attached_node: v.attached_node,
            readers: v.readers,
            created_unix_ms: v.created_unix_ms,
            replicas: v
                .replicas
                .into_iter()
                .map(|r| api::ReplicaInfo {
                    node: r.node,
                    state: r.condition.as_str().into(),
                    rebuild_progress: r.rebuild_progress,
                })
                .collect(),
            csi_name: v.csi_name,
            origin: v.origin.map(|o| api::OriginInfo {
                snapshot: o.snapshot,
                filling: o.filling,
                progress: o.progress,
            }),
        }
    }
}

impl From<PoolView> for api::PoolInfo {
    fn from(p: PoolView) -> Self {
        api::PoolInfo {
            id: p.id.to_string(),
            extent_size_bytes: p.extent_size,
            capacity_bytes: p.capacity_bytes,
            allocated_bytes: p.allocated_bytes,
            free_bytes: p.capacity_bytes.saturating_sub(p.allocated_bytes),
            provisioned_bytes: p.provisioned_bytes,
            devices: p
                .devices
                .into_iter()
                .map(|d| api::DeviceInfo {
                    index: d.index,
                    path: d.path.to_string_lossy().into_owned(),
                    kind: if d.block { "block" } else { "file" }.into(),
                    id: d.id,
                    capacity_bytes: d.capacity_bytes,
                    allocated_bytes: d.allocated_bytes,
                })
                .collect(),
        }
    }
}

impl From<VerifyView> for api::VerifyReport {
    fn from(v: VerifyView) -> Self {
        api::VerifyReport {
            extents_compared: v.extents,
            replicas_compared: v.replicas,
            mismatched_extents: v.mismatched,
            repaired: v
                .repaired
                .into_iter()
                .map(|r| api::RepairedExtent {
                    extent: r.extent,
                    source: r.source,
                    majority: r.majority,
                    targets: r.targets,
                })
                .collect(),
            snapshots: v
                .snapshots
                .into_iter()
                .map(|s| api::SnapshotVerify {
                    snapshot: s.name,
                    replicas_compared: s.compared,
                    lacking: s.lacking,
                    mismatched_extents: s.mismatched,
                })
                .collect(),
        }
    }
}

impl From<SnapshotView> for api::SnapshotInfo {
    fn from(s: SnapshotView) -> Self {
        api::SnapshotInfo {
            id: s.id.to_string(),
            name: s.name,
            volume: s.volume,
            volume_id: s.volume_id.to_string(),
            created_unix_ms: s.created_unix_ms,
            size_bytes: s.size_bytes,
            ready: s.ready,
            replicas: s.replicas,
            held_bytes: s.space.map(|x| x.held_bytes),
            exclusive_bytes: s.space.map(|x| x.exclusive_bytes),
        }
    }
}
