//! The cluster state machine. `apply` validates a command completely before
//! changing anything, so a refused command leaves the state untouched.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::types::{FsType, Id128, NodeId, SnapshotId, VolumeId, MAX_VOLUME_SIZE, SIZE_ALIGN};

pub const STATE_VERSION: u32 = 1;

/// Version of the Raft entry format (the [`Command`] set and its fields).
/// Bump it with every command or field added: a node that meets an entry of
/// a newer version than it knows stops its state machine instead of
/// skipping the entry (skipping would make its state differ from the
/// others' for good). Version 1 added `Reattach`, version 2 the CSI name
/// of `CreateVolume`, version 3 snapshots; entries written before versions
/// existed (plain JSON) read as version 0. Each entry carries the lowest
/// version that knows its command ([`Command::entry_version`]), so a node
/// one version behind stops only at a command it cannot apply.
pub const ENTRY_VERSION: u8 = 4;
/// First byte of a versioned entry (`{` starts an unversioned one).
const ENTRY_MAGIC: u8 = 0xCA;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    #[error("raft entry of format version {found} is newer than this node understands (up to {ENTRY_VERSION}): upgrade this node")]
    UnknownVersion { found: u8 },
    #[error("raft entry of format version {version} is not a valid command: {why}")]
    Malformed { version: u8, why: String },
}

/// The bytes of a Raft entry (or a forwarded proposal) carrying `cmd`:
/// magic, version, then the command as JSON.
pub fn encode_command(cmd: &Command) -> Vec<u8> {
    let mut out = vec![ENTRY_MAGIC, cmd.entry_version()];
    serde_json::to_writer(&mut out, cmd).expect("a Command always serialises to JSON");
    out
}

/// Decodes [`encode_command`]'s bytes strictly (unknown fields and
/// commands are refused).
pub fn decode_command(data: &[u8]) -> Result<Command, EntryError> {
    let (version, json) = match data {
        [b'{', ..] => (0, data),
        [ENTRY_MAGIC, v, rest @ ..] if *v <= ENTRY_VERSION => (*v, rest),
        [ENTRY_MAGIC, v, ..] => return Err(EntryError::UnknownVersion { found: *v }),
        _ => {
            return Err(EntryError::Malformed {
                version: 0,
                why: "neither a versioned nor a JSON entry".into(),
            })
        }
    };
    serde_json::from_slice(json).map_err(|e| EntryError::Malformed {
        version,
        why: e.to_string(),
    })
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Volume {
    pub id: VolumeId,
    pub name: String,
    pub size_bytes: u64,
    pub fs: FsType,
    /// Set once the filesystem was created; mkfs never runs again after.
    pub formatted: bool,
    /// Bumped by every attach; replicas accept I/O only from the current epoch.
    pub epoch: u64,
    pub attachment: Option<Attachment>,
    /// Nodes holding the volume read-only (CSI MULTI_NODE_READER_ONLY).
    /// Never together with a (writing) attachment: readers read at `epoch`
    /// and nothing can change the data under them.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub readers: BTreeSet<NodeId>,
    /// The volume's copies, on distinct nodes. At least one is healthy.
    pub replicas: Vec<ReplicaRecord>,
    /// How many replicas the volume should have; the leader's scheduler
    /// adds or removes replicas toward it. 0 (state written before it
    /// existed): as many as it has.
    #[serde(default)]
    pub replicas_wanted: u32,
    pub created_unix_ms: u64,
    /// The name a CSI CO created the volume by, when that name is not a
    /// valid volume name itself (the CSI driver maps it to `name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub csi_name: Option<String>,
    /// A revert to a snapshot in progress: nothing attaches the volume
    /// until a revert finishes (every replica's head equals the snapshot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reverting: Option<Reverting>,
    /// What a clone was made from; its replicas on `origin.backed` still
    /// read through to the snapshot (see `replica::clone`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<Origin>,
    /// Deleted while it had snapshots, which stay usable (clone sources,
    /// listed, deletable): hidden from volume listings, never attached
    /// again, its name still taken, and gone with its last snapshot.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub retired: bool,
}

/// Where a clone comes from. While some of its replicas read through to
/// the snapshot (`backed`), the snapshot is not deleted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Origin {
    pub volume: VolumeId,
    pub snapshot: SnapshotId,
    /// Nodes whose clone replica reads the snapshot's local copy until
    /// its filler has copied it.
    pub backed: BTreeSet<NodeId>,
    /// The snapshot was taken for this clone (`--from-volume`) and goes
    /// when the last backed replica is filled.
    #[serde(default)]
    pub implicit: bool,
}

/// A revert of a volume's replicas to one of its snapshots, run by an
/// engine of `epoch` (which fences every older one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reverting {
    pub snapshot: SnapshotId,
    pub epoch: u64,
}

impl Volume {
    pub fn replica(&self, node: NodeId) -> Option<&ReplicaRecord> {
        self.replicas.iter().find(|r| r.node == node)
    }

    pub fn wanted(&self) -> usize {
        if self.replicas_wanted == 0 {
            self.replicas.len()
        } else {
            self.replicas_wanted as usize
        }
    }

    pub fn has_replica_on(&self, node: NodeId) -> bool {
        self.replica(node).is_some()
    }

    pub fn healthy(&self) -> impl Iterator<Item = &ReplicaRecord> {
        self.replicas
            .iter()
            .filter(|r| r.state == ReplicaState::Healthy)
    }
}

/// One copy of a volume on one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "ReplicaRepr")]
pub struct ReplicaRecord {
    pub node: NodeId,
    pub state: ReplicaState,
}

/// State written before replication recorded a bare node id per replica.
#[derive(Deserialize)]
#[serde(untagged)]
enum ReplicaRepr {
    Record { node: NodeId, state: ReplicaState },
    Node(NodeId),
}

impl From<ReplicaRepr> for ReplicaRecord {
    fn from(r: ReplicaRepr) -> Self {
        match r {
            ReplicaRepr::Record { node, state } => ReplicaRecord { node, state },
            ReplicaRepr::Node(node) => ReplicaRecord {
                node,
                state: ReplicaState::Healthy,
            },
        }
    }
}

/// Only `healthy` replicas are read from; `rebuilding` ones receive writes
/// while they are copied; `faulted` ones missed writes and get nothing
/// until a rebuild starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplicaState {
    Healthy,
    Rebuilding,
    Faulted,
}

impl ReplicaState {
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaState::Healthy => "healthy",
            ReplicaState::Rebuilding => "rebuilding",
            ReplicaState::Faulted => "faulted",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Attachment {
    pub node: NodeId,
    pub epoch: u64,
}

/// A point-in-time copy of a volume. Its data lives in the replica
/// stores of the nodes in `replicas`, which all froze the same point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    pub id: SnapshotId,
    pub volume: VolumeId,
    /// Unique among the volume's snapshots.
    pub name: String,
    pub created_unix_ms: u64,
    /// The volume's size when it was taken.
    pub size_bytes: u64,
    /// False while the replicas are taking it: it is listed (its name is
    /// taken) but serves nothing.
    pub ready: bool,
    /// Nodes whose replica holds it; only these are ever read for it.
    pub replicas: BTreeSet<NodeId>,
    /// Whether the volume's filesystem had been made when it was taken
    /// (a clone of it never runs mkfs over its data).
    #[serde(default = "formatted_default")]
    pub formatted: bool,
}

/// Snapshots recorded before `formatted` existed: never formatted over.
fn formatted_default() -> bool {
    true
}

/// Most snapshots a volume may have (the replica store's limit).
pub const MAX_SNAPSHOTS: usize = crate::replica::snapshot::MAX_SNAPSHOTS;

/// A member of the cluster as the state machine records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeRecord {
    pub id: NodeId,
    pub name: String,
    /// The node's id inside the Raft group.
    pub raft_id: u64,
    /// Where the node's admin API listens.
    pub api_address: String,
    /// Where peers reach the node's peer service (Raft, join, proposals).
    pub peer_address: String,
    pub labels: BTreeMap<String, String>,
    pub role: NodeRole,
    pub pool_capacity_bytes: u64,
    pub pool_allocated_bytes: u64,
    pub last_heartbeat_unix_ms: u64,
    /// Set by the leader from missed heartbeats (see `daemon::liveness`).
    #[serde(default)]
    pub state: NodeState,
    /// Heartbeats applied so far: the leader watches it change.
    #[serde(default)]
    pub heartbeats: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    #[default]
    Up,
    Down,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Up => "up",
            NodeState::Down => "down",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeRole {
    Voter,
    Learner,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, tag = "op", rename_all = "snake_case")]
pub enum Command {
    /// Adds a node or updates its description (name, address, labels).
    RegisterNode {
        id: NodeId,
        name: String,
        raft_id: u64,
        api_address: String,
        peer_address: String,
        labels: BTreeMap<String, String>,
        role: NodeRole,
        at_unix_ms: u64,
    },
    /// Forgets a node that left the Raft group.
    RemoveNode {
        id: NodeId,
    },
    /// A node reports itself alive with its pool usage.
    NodeHeartbeat {
        id: NodeId,
        pool_capacity_bytes: u64,
        pool_allocated_bytes: u64,
        at_unix_ms: u64,
    },
    /// The leader marks a node `down` after missed heartbeats and `up`
    /// when they resume.
    SetNodeState {
        id: NodeId,
        state: NodeState,
    },
    CreateVolume {
        id: VolumeId,
        name: String,
        size_bytes: u64,
        fs: FsType,
        /// The first replica's node.
        replica_node: NodeId,
        /// Further replicas' nodes (distinct).
        #[serde(default)]
        more_replicas: Vec<NodeId>,
        created_unix_ms: u64,
        /// See [`Volume::csi_name`].
        #[serde(default, skip_serializing_if = "Option::is_none")]
        csi_name: Option<String>,
    },
    /// The engine of `epoch` reports a replica's state: `faulted` when it
    /// failed I/O (recorded before the engine drops it), `rebuilding` when
    /// a copy starts, `healthy` when the copy is complete and durable.
    SetReplicaState {
        id: VolumeId,
        node: NodeId,
        state: ReplicaState,
        epoch: u64,
    },
    /// Adds a replica (starts `faulted`: it has no data until rebuilt).
    AddReplica {
        id: VolumeId,
        node: NodeId,
    },
    /// Removes a replica; never the last healthy one.
    RemoveReplica {
        id: VolumeId,
        node: NodeId,
    },
    /// Sets how many replicas the volume should have (1 to 3).
    SetReplicaCount {
        id: VolumeId,
        count: u32,
    },
    ResizeVolume {
        id: VolumeId,
        size_bytes: u64,
    },
    DeleteVolume {
        id: VolumeId,
    },
    Attach {
        id: VolumeId,
        node: NodeId,
        /// Take the volume over from another node (its engine is fenced
        /// by the new epoch).
        #[serde(default)]
        force: bool,
    },
    Detach {
        id: VolumeId,
        node: NodeId,
    },
    /// The daemon of the attached node restarted and serves the volume
    /// again: its attachment of `epoch` moves to a new epoch, so a request
    /// its previous incarnation left in flight can never land later.
    Reattach {
        id: VolumeId,
        node: NodeId,
        epoch: u64,
    },
    /// Adds a read-only holder; refused while the volume is attached.
    AttachReader {
        id: VolumeId,
        node: NodeId,
    },
    DetachReader {
        id: VolumeId,
        node: NodeId,
    },
    MarkFormatted {
        id: VolumeId,
    },
    /// Starts a snapshot of `volume`: its name is taken from now on, and
    /// it is not ready until [`Command::SnapshotTaken`].
    CreateSnapshot {
        id: SnapshotId,
        volume: VolumeId,
        name: String,
        created_unix_ms: u64,
    },
    /// The replicas on `nodes` froze the snapshot's point: it is ready.
    SnapshotTaken {
        id: SnapshotId,
        nodes: BTreeSet<NodeId>,
    },
    /// The faulted replica on `node`, rebuilt by the engine of `epoch`,
    /// now holds ready snapshot `id` too (copied from a holder).
    SnapshotCopied {
        id: SnapshotId,
        node: NodeId,
        epoch: u64,
    },
    /// Deletes detached volume `id` but keeps its snapshots usable: with
    /// none it is deleted outright, else it is retired (see
    /// [`Volume::retired`]) until its last snapshot is deleted.
    RetireVolume {
        id: VolumeId,
    },
    /// Forgets a snapshot; each replica holding it frees its space (and
    /// the last one of a retired volume takes the volume with it).
    DeleteSnapshot {
        id: SnapshotId,
    },
    /// Starts (or takes over) reverting detached volume `id` to its
    /// snapshot `snapshot`: a new epoch, and no attach until it ends.
    BeginRevert {
        id: VolumeId,
        snapshot: SnapshotId,
    },
    /// The revert of `epoch` finished on every healthy replica.
    EndRevert {
        id: VolumeId,
        epoch: u64,
    },
    /// Moves detached volume `id` to a new epoch, fencing every engine of
    /// the old one (a writer on a node it was detached from while
    /// unreachable, another node's repair), so the engine of a snapshot of
    /// the detached volume is its only writer. No change while nodes hold
    /// it read-only (they read at the current epoch and write nothing).
    FenceDetached {
        id: VolumeId,
    },
    /// Creates volume `id` as a clone of ready snapshot `snapshot`: the
    /// replicas on `backed` (nodes holding the snapshot) read through to
    /// it and are healthy at once, the others start faulted and are
    /// rebuilt from them.
    CreateClone {
        id: VolumeId,
        name: String,
        size_bytes: u64,
        snapshot: SnapshotId,
        replica_nodes: Vec<NodeId>,
        backed: BTreeSet<NodeId>,
        #[serde(default)]
        implicit: bool,
        created_unix_ms: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        csi_name: Option<String>,
    },
    /// The clone replica on `node` copied all of its origin and forgot it.
    CloneFilled {
        id: VolumeId,
        node: NodeId,
    },
}

impl Command {
    /// The lowest entry format version that knows this command.
    pub fn entry_version(&self) -> u8 {
        match self {
            Command::CreateSnapshot { .. }
            | Command::SnapshotTaken { .. }
            | Command::DeleteSnapshot { .. }
            | Command::BeginRevert { .. }
            | Command::EndRevert { .. }
            | Command::FenceDetached { .. }
            | Command::CreateClone { .. }
            | Command::CloneFilled { .. } => 3,
            Command::SnapshotCopied { .. } | Command::RetireVolume { .. } => 4,
            _ => 2,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum StateError {
    #[error("volume {0:?} already exists")]
    VolumeExists(String),
    #[error("volume id {0} already exists")]
    VolumeIdExists(VolumeId),
    #[error("volume {0} not found")]
    VolumeNotFound(VolumeId),
    #[error("size {0} bytes is invalid: sizes are positive multiples of {SIZE_ALIGN} up to {MAX_VOLUME_SIZE}")]
    InvalidSize(u64),
    #[error("volume can only grow: {current} bytes now, {requested} requested")]
    Shrink { current: u64, requested: u64 },
    #[error("volume {id} is attached to node {node}")]
    AttachedElsewhere { id: VolumeId, node: NodeId },
    #[error("volume {0} is attached; detach it before deleting")]
    Attached(VolumeId),
    #[error("volume {id} is not attached to node {node}")]
    NotAttached { id: VolumeId, node: NodeId },
    #[error("CSI name {0:?} is empty, longer than 128 bytes or holds control characters")]
    InvalidCsiName(String),
    #[error("volume {id} is held read-only by {count} node(s); they must release it first")]
    HasReaders { id: VolumeId, count: usize },
    #[error("node name {0:?} is already used by node {1}")]
    NodeNameTaken(String, NodeId),
    #[error("node {0} is not a member of the cluster")]
    NodeNotFound(NodeId),
    #[error("volume {id} has no replica on node {node}")]
    NoSuchReplica { id: VolumeId, node: NodeId },
    #[error("volume {id} already has a replica on node {node}")]
    ReplicaExists { id: VolumeId, node: NodeId },
    #[error("epoch {given} of volume {id} is stale (current {current})")]
    StaleEpoch {
        id: VolumeId,
        given: u64,
        current: u64,
    },
    #[error("replica on node {node} is the last healthy copy of volume {id}")]
    LastHealthy { id: VolumeId, node: NodeId },
    #[error("a volume needs 1 to {MAX_REPLICAS} replicas on distinct nodes")]
    BadReplicaSet,
    #[error("invalid snapshot name: {0}")]
    InvalidSnapshotName(String),
    #[error("volume {volume} already has a snapshot named {name:?}")]
    SnapshotExists { volume: VolumeId, name: String },
    #[error("snapshot id {0} already exists")]
    SnapshotIdExists(SnapshotId),
    #[error("snapshot {0} not found")]
    SnapshotNotFound(SnapshotId),
    #[error("volume {volume} already has {MAX_SNAPSHOTS} snapshots, the most a volume may have")]
    TooManySnapshots { volume: VolumeId },
    #[error("snapshot {id} can only be recorded on replicas of its volume, with at least one")]
    BadSnapshotReplicas { id: SnapshotId },
    #[error("volume name {0:?} is still taken by a deleted volume whose snapshots were kept; delete those snapshots first, or choose another name")]
    NameKeptBySnapshots(String),
    #[error("volume {id} was deleted (it is kept only for its snapshots)")]
    Retired { id: VolumeId },
    #[error("snapshot {id} can be recorded as copied only to a faulted replica of its volume, by the rebuild of the volume's current epoch")]
    NotACopyTarget { id: SnapshotId, node: NodeId },
    #[error("the replica on node {node} holds the last copy of snapshot {id}")]
    LastSnapshotCopy { id: SnapshotId, node: NodeId },
    #[error("volume {id} has {count} snapshot(s); delete them first")]
    HasSnapshots { id: VolumeId, count: usize },
    #[error("snapshot {id} is not ready (it is still being taken, or its taking failed)")]
    SnapshotNotReady { id: SnapshotId },
    #[error("snapshot {snapshot} belongs to another volume than {volume}")]
    SnapshotOfAnotherVolume {
        snapshot: SnapshotId,
        volume: VolumeId,
    },
    #[error("volume {id} is being reverted to a snapshot; run the revert again to finish it")]
    Reverting { id: VolumeId },
    #[error("snapshot {id} is the target of a revert in progress")]
    SnapshotInUse { id: SnapshotId },
    #[error("snapshot {id} backs clone {clone}, which is still being filled from it")]
    SnapshotBacksClone { id: SnapshotId, clone: VolumeId },
    #[error("the replica of volume {id} on node {node} backs clone {clone}, which is still being filled from it")]
    ReplicaBacksClone {
        id: VolumeId,
        node: NodeId,
        clone: VolumeId,
    },
    #[error("a clone is at least as large as its snapshot ({min} bytes), not {size}")]
    CloneTooSmall { size: u64, min: u64 },
}

/// Most replicas a volume may have.
pub const MAX_REPLICAS: usize = 3;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterState {
    pub version: u32,
    /// Chosen when the cluster is bootstrapped; joining nodes must match it.
    pub cluster_id: Id128,
    /// Raft index of the last applied entry (set by the store).
    pub applied: u64,
    pub nodes: BTreeMap<NodeId, NodeRecord>,
    pub volumes: BTreeMap<VolumeId, Volume>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub snapshots: BTreeMap<SnapshotId, Snapshot>,
}

fn valid_size(size: u64) -> bool {
    size > 0 && size.is_multiple_of(SIZE_ALIGN) && size <= MAX_VOLUME_SIZE
}

impl ClusterState {
    pub fn new(cluster_id: Id128) -> Self {
        ClusterState {
            version: STATE_VERSION,
            cluster_id,
            applied: 0,
            nodes: BTreeMap::new(),
            volumes: BTreeMap::new(),
            snapshots: BTreeMap::new(),
        }
    }

    pub fn volume_by_name(&self, name: &str) -> Option<&Volume> {
        self.volumes.values().find(|v| v.name == name)
    }

    /// The snapshots of `volume`, oldest first.
    pub fn snapshots_of(&self, volume: VolumeId) -> Vec<&Snapshot> {
        let mut out: Vec<&Snapshot> = self
            .snapshots
            .values()
            .filter(|s| s.volume == volume)
            .collect();
        out.sort_by_key(|s| (s.created_unix_ms, s.id));
        out
    }

    /// Snapshot `name` of `volume`.
    pub fn snapshot_named(&self, volume: VolumeId, name: &str) -> Option<&Snapshot> {
        self.snapshots
            .values()
            .find(|s| s.volume == volume && s.name == name)
    }

    /// What every new volume must satisfy: a free name and id, a valid
    /// size and CSI name, 1 to [`MAX_REPLICAS`] distinct nodes.
    fn check_new_volume(
        &self,
        id: VolumeId,
        name: &str,
        size_bytes: u64,
        nodes: &[NodeId],
        csi_name: Option<&str>,
    ) -> Result<(), StateError> {
        if let Some(c) = csi_name {
            if c.is_empty() || c.len() > 128 || c.chars().any(char::is_control) {
                return Err(StateError::InvalidCsiName(c.to_string()));
            }
        }
        let uniq: BTreeSet<&NodeId> = nodes.iter().collect();
        if uniq.len() != nodes.len() || nodes.is_empty() || nodes.len() > MAX_REPLICAS {
            return Err(StateError::BadReplicaSet);
        }
        match self.volume_by_name(name) {
            Some(v) if v.retired => return Err(StateError::NameKeptBySnapshots(name.to_string())),
            Some(_) => return Err(StateError::VolumeExists(name.to_string())),
            None => {}
        }
        if self.volumes.contains_key(&id) {
            return Err(StateError::VolumeIdExists(id));
        }
        if !valid_size(size_bytes) {
            return Err(StateError::InvalidSize(size_bytes));
        }
        Ok(())
    }

    fn volume(&self, id: VolumeId) -> Result<&Volume, StateError> {
        self.volumes.get(&id).ok_or(StateError::VolumeNotFound(id))
    }

    /// Volume `id` unless it is retired (deleted, kept for its snapshots).
    fn live(&self, id: VolumeId) -> Result<&Volume, StateError> {
        let v = self.volume(id)?;
        if v.retired {
            return Err(StateError::Retired { id });
        }
        Ok(v)
    }

    /// Removes volume `id`, releasing the origin it read through to.
    fn remove_volume(&mut self, id: VolumeId) {
        if let Some(o) = self.volumes.remove(&id).and_then(|v| v.origin) {
            if !o.backed.is_empty() {
                self.release_origin(&o);
            }
        }
    }

    /// Applies one command. On error nothing changed.
    pub fn apply(&mut self, cmd: &Command) -> Result<(), StateError> {
        match cmd {
            Command::RegisterNode {
                id,
                name,
                raft_id,
                api_address,
                peer_address,
                labels,
                role,
                at_unix_ms,
            } => {
                if let Some(other) = self.nodes.values().find(|n| n.name == *name && n.id != *id) {
                    return Err(StateError::NodeNameTaken(name.clone(), other.id));
                }
                let prev = self.nodes.get(id);
                let record = NodeRecord {
                    id: *id,
                    name: name.clone(),
                    raft_id: *raft_id,
                    api_address: api_address.clone(),
                    peer_address: peer_address.clone(),
                    labels: labels.clone(),
                    role: *role,
                    pool_capacity_bytes: prev.map(|p| p.pool_capacity_bytes).unwrap_or(0),
                    pool_allocated_bytes: prev.map(|p| p.pool_allocated_bytes).unwrap_or(0),
                    last_heartbeat_unix_ms: *at_unix_ms,
                    state: prev.map(|p| p.state).unwrap_or_default(),
                    heartbeats: prev.map(|p| p.heartbeats).unwrap_or(0),
                };
                self.nodes.insert(*id, record);
            }
            Command::RemoveNode { id } => {
                self.nodes.remove(id).ok_or(StateError::NodeNotFound(*id))?;
            }
            Command::NodeHeartbeat {
                id,
                pool_capacity_bytes,
                pool_allocated_bytes,
                at_unix_ms,
            } => {
                let n = self
                    .nodes
                    .get_mut(id)
                    .ok_or(StateError::NodeNotFound(*id))?;
                n.pool_capacity_bytes = *pool_capacity_bytes;
                n.pool_allocated_bytes = *pool_allocated_bytes;
                n.last_heartbeat_unix_ms = n.last_heartbeat_unix_ms.max(*at_unix_ms);
                n.heartbeats += 1;
            }
            Command::SetNodeState { id, state } => {
                self.nodes
                    .get_mut(id)
                    .ok_or(StateError::NodeNotFound(*id))?
                    .state = *state;
            }
            Command::CreateVolume {
                id,
                name,
                size_bytes,
                fs,
                replica_node,
                more_replicas,
                created_unix_ms,
                csi_name,
            } => {
                let mut nodes = vec![*replica_node];
                nodes.extend(more_replicas.iter().copied());
                self.check_new_volume(*id, name, *size_bytes, &nodes, csi_name.as_deref())?;
                self.volumes.insert(
                    *id,
                    Volume {
                        id: *id,
                        name: name.clone(),
                        size_bytes: *size_bytes,
                        fs: *fs,
                        formatted: false,
                        epoch: 0,
                        attachment: None,
                        readers: BTreeSet::new(),
                        replicas_wanted: nodes.len() as u32,
                        replicas: nodes
                            .into_iter()
                            .map(|node| ReplicaRecord {
                                node,
                                state: ReplicaState::Healthy,
                            })
                            .collect(),
                        created_unix_ms: *created_unix_ms,
                        csi_name: csi_name.clone(),
                        reverting: None,
                        origin: None,
                        retired: false,
                    },
                );
            }
            Command::ResizeVolume { id, size_bytes } => {
                let v = self.live(*id)?;
                if !valid_size(*size_bytes) {
                    return Err(StateError::InvalidSize(*size_bytes));
                }
                if *size_bytes < v.size_bytes {
                    return Err(StateError::Shrink {
                        current: v.size_bytes,
                        requested: *size_bytes,
                    });
                }
                self.volumes.get_mut(id).expect("checked").size_bytes = *size_bytes;
            }
            Command::DeleteVolume { id } => {
                let v = self.volume(*id)?;
                if v.attachment.is_some() {
                    return Err(StateError::Attached(*id));
                }
                if !v.readers.is_empty() {
                    return Err(StateError::HasReaders {
                        id: *id,
                        count: v.readers.len(),
                    });
                }
                let count = self.snapshots_of(*id).len();
                if count > 0 {
                    return Err(StateError::HasSnapshots { id: *id, count });
                }
                self.remove_volume(*id);
            }
            Command::Attach { id, node, force } => {
                let v = self.live(*id)?;
                if v.reverting.is_some() {
                    return Err(StateError::Reverting { id: *id });
                }
                if !v.readers.is_empty() {
                    if !*force {
                        return Err(StateError::HasReaders {
                            id: *id,
                            count: v.readers.len(),
                        });
                    }
                    // Taking over fences the readers too (new epoch below).
                    self.volumes.get_mut(id).expect("checked").readers.clear();
                }
                let v = self.volume(*id)?;
                match &v.attachment {
                    Some(a) if a.node != *node && *force => {
                        let v = self.volumes.get_mut(id).expect("checked");
                        v.epoch += 1;
                        v.attachment = Some(Attachment {
                            node: *node,
                            epoch: v.epoch,
                        });
                    }
                    Some(a) if a.node != *node => {
                        return Err(StateError::AttachedElsewhere {
                            id: *id,
                            node: a.node,
                        })
                    }
                    Some(_) => {}
                    None => {
                        let v = self.volumes.get_mut(id).expect("checked");
                        v.epoch += 1;
                        v.attachment = Some(Attachment {
                            node: *node,
                            epoch: v.epoch,
                        });
                    }
                }
            }
            Command::Detach { id, node } => {
                let v = self.volume(*id)?;
                match &v.attachment {
                    Some(a) if a.node != *node => {
                        return Err(StateError::AttachedElsewhere {
                            id: *id,
                            node: a.node,
                        })
                    }
                    _ => self.volumes.get_mut(id).expect("checked").attachment = None,
                }
            }
            Command::Reattach { id, node, epoch } => {
                let v = self.volume(*id)?;
                match &v.attachment {
                    Some(a) if a.node != *node => {
                        return Err(StateError::AttachedElsewhere {
                            id: *id,
                            node: a.node,
                        })
                    }
                    Some(a) if a.epoch != *epoch => {
                        return Err(StateError::StaleEpoch {
                            id: *id,
                            given: *epoch,
                            current: a.epoch,
                        })
                    }
                    Some(_) => {
                        let v = self.volumes.get_mut(id).expect("checked");
                        v.epoch += 1;
                        v.attachment = Some(Attachment {
                            node: *node,
                            epoch: v.epoch,
                        });
                    }
                    None => {
                        return Err(StateError::NotAttached {
                            id: *id,
                            node: *node,
                        })
                    }
                }
            }
            Command::AttachReader { id, node } => {
                let v = self.live(*id)?;
                if v.reverting.is_some() {
                    return Err(StateError::Reverting { id: *id });
                }
                if let Some(a) = &v.attachment {
                    return Err(StateError::AttachedElsewhere {
                        id: *id,
                        node: a.node,
                    });
                }
                self.volumes
                    .get_mut(id)
                    .expect("checked")
                    .readers
                    .insert(*node);
            }
            Command::DetachReader { id, node } => {
                self.volume(*id)?;
                self.volumes
                    .get_mut(id)
                    .expect("checked")
                    .readers
                    .remove(node);
            }
            Command::SetReplicaState {
                id,
                node,
                state,
                epoch,
            } => {
                let v = self.volume(*id)?;
                if *epoch != v.epoch {
                    return Err(StateError::StaleEpoch {
                        id: *id,
                        given: *epoch,
                        current: v.epoch,
                    });
                }
                let r = v.replica(*node).ok_or(StateError::NoSuchReplica {
                    id: *id,
                    node: *node,
                })?;
                if r.state == ReplicaState::Healthy
                    && *state != ReplicaState::Healthy
                    && v.healthy().count() == 1
                {
                    return Err(StateError::LastHealthy {
                        id: *id,
                        node: *node,
                    });
                }
                let v = self.volumes.get_mut(id).expect("checked");
                for r in v.replicas.iter_mut().filter(|r| r.node == *node) {
                    r.state = *state;
                }
            }
            Command::AddReplica { id, node } => {
                let v = self.volume(*id)?;
                if v.has_replica_on(*node) {
                    return Err(StateError::ReplicaExists {
                        id: *id,
                        node: *node,
                    });
                }
                if v.replicas.len() >= MAX_REPLICAS {
                    return Err(StateError::BadReplicaSet);
                }
                if !self.nodes.contains_key(node) {
                    return Err(StateError::NodeNotFound(*node));
                }
                self.volumes
                    .get_mut(id)
                    .expect("checked")
                    .replicas
                    .push(ReplicaRecord {
                        node: *node,
                        state: ReplicaState::Faulted,
                    });
            }
            Command::RemoveReplica { id, node } => {
                let v = self.volume(*id)?;
                self.check_not_backing(*id, *node)?;
                let r = v.replica(*node).ok_or(StateError::NoSuchReplica {
                    id: *id,
                    node: *node,
                })?;
                if r.state == ReplicaState::Healthy && v.healthy().count() == 1 {
                    return Err(StateError::LastHealthy {
                        id: *id,
                        node: *node,
                    });
                }
                // Never the last copy of a snapshot.
                if let Some(s) = self
                    .snapshots_of(*id)
                    .into_iter()
                    .find(|s| s.ready && s.replicas.len() == 1 && s.replicas.contains(node))
                {
                    return Err(StateError::LastSnapshotCopy {
                        id: s.id,
                        node: *node,
                    });
                }
                self.volumes
                    .get_mut(id)
                    .expect("checked")
                    .replicas
                    .retain(|r| r.node != *node);
                for s in self.snapshots.values_mut().filter(|s| s.volume == *id) {
                    s.replicas.remove(node);
                }
                self.unback(*id, *node);
            }
            Command::SetReplicaCount { id, count } => {
                self.live(*id)?;
                if !(1..=MAX_REPLICAS as u32).contains(count) {
                    return Err(StateError::BadReplicaSet);
                }
                self.volumes.get_mut(id).expect("checked").replicas_wanted = *count;
            }
            Command::MarkFormatted { id } => {
                self.volume(*id)?;
                self.volumes.get_mut(id).expect("checked").formatted = true;
            }
            Command::CreateSnapshot { .. }
            | Command::SnapshotTaken { .. }
            | Command::SnapshotCopied { .. }
            | Command::RetireVolume { .. }
            | Command::DeleteSnapshot { .. }
            | Command::BeginRevert { .. }
            | Command::EndRevert { .. }
            | Command::FenceDetached { .. } => self.apply_snapshot(cmd)?,
            Command::CreateClone { .. } | Command::CloneFilled { .. } => self.apply_clone(cmd)?,
        }
        Ok(())
    }
}

mod clones;
mod snapshots;

#[cfg(test)]
mod tests;
