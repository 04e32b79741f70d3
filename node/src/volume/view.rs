//! The core's view of a volume for every front door: states as enums,
//! paths as paths. The REST bodies are made from these at the API edge only
//! (`api::convert`); CSI and Docker glue read them directly.

use std::path::PathBuf;

use crate::cluster::state::{ClusterState, NodeState, ReplicaRecord, ReplicaState};
use crate::types::{FsType, NodeId, PoolId, VolumeId};

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
    /// What a clone was made from, and where it is still being filled.
    pub origin: Option<OriginView>,
}

/// Where a clone comes from.
#[derive(Debug, Clone, PartialEq)]
pub struct OriginView {
    /// `VOLUME@SNAPSHOT`.
    pub snapshot: String,
    /// Names of the nodes whose replica still reads the snapshot.
    pub filling: Vec<String>,
    /// This node's filler: fraction of the extents examined.
    pub progress: Option<f64>,
}

/// This node's pool.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolView {
    pub id: PoolId,
    pub extent_size: u64,
    pub capacity_bytes: u64,
    pub allocated_bytes: u64,
    /// Sum of all volumes' sizes (thin provisioning may exceed capacity).
    pub provisioned_bytes: u64,
    pub devices: Vec<DeviceView>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DeviceView {
    pub index: u32,
    pub path: PathBuf,
    /// A block device (else a file).
    pub block: bool,
    pub id: String,
    pub capacity_bytes: u64,
    pub allocated_bytes: u64,
}

/// What a verify found (and, with repair, mended), with node names.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifyView {
    pub extents: u64,
    pub replicas: u32,
    pub mismatched: Vec<u64>,
    pub repaired: Vec<RepairView>,
    pub snapshots: Vec<SnapshotVerifyView>,
}

/// One snapshot compared across the healthy replicas holding it.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotVerifyView {
    pub name: String,
    /// The healthy replicas holding it, which were compared.
    pub compared: Vec<String>,
    /// Healthy replicas that do not hold it yet.
    pub lacking: Vec<String>,
    pub mismatched: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RepairView {
    pub extent: u64,
    /// The node whose copy was kept.
    pub source: String,
    /// A majority held that copy (else it is the one reads came from).
    pub majority: bool,
    /// The nodes whose copies were rewritten.
    pub targets: Vec<String>,
}

/// A snapshot of a volume as the cluster records it, with the space its
/// data takes on one replica that holds it (none when no such replica
/// answered).
#[derive(Debug, Clone)]
pub struct SnapshotView {
    pub id: crate::types::SnapshotId,
    pub name: String,
    pub volume: String,
    pub volume_id: VolumeId,
    pub created_unix_ms: u64,
    /// The volume's size when the snapshot was taken.
    pub size_bytes: u64,
    /// Taken on its replicas (false while being taken, or after a failed
    /// take that could not be cleaned up yet).
    pub ready: bool,
    /// Names of the nodes whose replicas hold it.
    pub replicas: Vec<String>,
    pub space: Option<SnapshotSpaceView>,
}

/// Pool space of a snapshot on one replica.
#[derive(Debug, Clone, Copy)]
pub struct SnapshotSpaceView {
    /// Extents the snapshot's layer holds (shared with older snapshots or
    /// not).
    pub held_bytes: u64,
    /// What deleting the snapshot would free.
    pub exclusive_bytes: u64,
}
