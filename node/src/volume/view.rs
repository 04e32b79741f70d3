//! The core's view of a volume for every front door: states as enums,
//! paths as paths. The REST body (`api::VolumeInfo`) is made from it at the
//! API edge only; CSI and Docker glue read it directly.

use std::path::PathBuf;

use cairn_proto::api;

use crate::cluster::state::{ClusterState, NodeState, ReplicaRecord, ReplicaState};
use crate::types::{FsType, NodeId, VolumeId};

/// What this node does with a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeState {
    Detached,
    /// Attached (to this node or another), or held read-only.
    Attached,
    /// Mounted on this node.
    Mounted,
}

impl VolumeState {
    pub fn as_str(self) -> &'static str {
        match self {
            VolumeState::Detached => "detached",
            VolumeState::Attached => "attached",
            VolumeState::Mounted => "mounted",
        }
    }
}

/// A replica's condition as an operator sees it: its recorded state, or
/// `Offline` when it is recorded healthy but its node is down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaCondition {
    Healthy,
    Rebuilding,
    Faulted,
    Offline,
}

impl ReplicaCondition {
    /// The one place "offline" is derived.
    pub fn of(state: &ClusterState, r: &ReplicaRecord) -> ReplicaCondition {
        let down = state
            .nodes
            .get(&r.node)
            .is_none_or(|n| n.state == NodeState::Down);
        match r.state {
            ReplicaState::Healthy if down => ReplicaCondition::Offline,
            ReplicaState::Healthy => ReplicaCondition::Healthy,
            ReplicaState::Rebuilding => ReplicaCondition::Rebuilding,
            ReplicaState::Faulted => ReplicaCondition::Faulted,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaCondition::Healthy => "healthy",
            ReplicaCondition::Rebuilding => "rebuilding",
            ReplicaCondition::Faulted => "faulted",
            ReplicaCondition::Offline => "offline",
        }
    }
}

#[derive(Debug, Clone)]
pub struct ReplicaView {
    pub node_id: NodeId,
    /// The node's name (its id when it left the cluster).
    pub node: String,
    pub condition: ReplicaCondition,
    /// 0.0–1.0 while this node's engine rebuilds it.
    pub rebuild_progress: Option<f64>,
}

#[derive(Debug, Clone)]
pub struct VolumeView {
    pub id: VolumeId,
    pub name: String,
    pub size_bytes: u64,
    pub fs: FsType,
    pub state: VolumeState,
    /// The block device while attached on this node.
    pub device: Option<PathBuf>,
    pub mounts: Vec<PathBuf>,
    /// Targets it is published at on this node (CSI NodePublish).
    pub published: Vec<PathBuf>,
    /// Pool bytes this node's replica holds.
    pub allocated_bytes: u64,
    pub formatted: bool,
    pub epoch: u64,
    pub attached_node: Option<String>,
    pub readers: Vec<String>,
    pub created_unix_ms: u64,
    pub replicas: Vec<ReplicaView>,
    pub csi_name: Option<String>,
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
        }
    }
}
