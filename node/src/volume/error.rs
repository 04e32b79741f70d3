//! The volume manager's errors. Each front door maps these by variant to its
//! own vocabulary (HTTP status + code, CSI codes, Docker `Err`) in one place.
//! Engine and metadata failures keep their typed cause, so a full pool, a
//! fenced engine or a missing quorum stay recognisable at every door.

use std::path::PathBuf;

use crate::cluster::store::StoreError;
use crate::engine::EngineError;

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("invalid volume name: {0}")]
    InvalidName(String),
    #[error("invalid size: {0}")]
    InvalidSize(String),
    #[error("invalid filesystem: {0}")]
    InvalidFs(String),
    #[error("invalid clone source: {0}")]
    InvalidSource(String),
    #[error("invalid path: {0}")]
    InvalidPath(String),
    #[error("invalid mount options: {0}")]
    InvalidOptions(String),
    #[error("volume {0:?} not found")]
    NotFound(String),
    #[error("volume {0:?} already exists")]
    AlreadyExists(String),
    #[error("volume {name:?} is attached on node {node}; detach it first or pass force")]
    Attached { name: String, node: String },
    #[error("volume {name:?} is attached on another node ({node}); pass force to take it over if that node is dead")]
    AttachedElsewhere { name: String, node: String },
    #[error("volume {name:?} is mounted at {paths}; unmount it first")]
    Mounted { name: String, paths: String },
    #[error("volume {name:?} is in use: {why}")]
    InUse { name: String, why: String },
    #[error("invalid replica count: {0}")]
    InvalidReplicas(String),
    #[error("cannot place replicas: {0}")]
    NotEnoughNodes(String),
    #[error("another operation on volume {0:?} is in progress; retry")]
    Busy(String),
    #[error("volume {name:?} can only grow: it has {current} bytes, {requested} were requested")]
    Shrink {
        name: String,
        current: u64,
        requested: u64,
    },
    #[error(
        "volume {0:?} has fs=none (raw block); attach it and use the device instead of mounting"
    )]
    RawVolume(String),
    #[error("volume {0:?} has no filesystem yet; a writer must mount it first")]
    NotFormatted(String),
    #[error("volume {name:?} is not staged at {} on this node", path.display())]
    NotStaged { name: String, path: PathBuf },
    /// Staging or publishing again in a way that differs from how the
    /// path already shows the volume (or shows something else).
    #[error("{}: volume {name:?} cannot be exposed there as asked: {how}", path.display())]
    PublishedDifferently {
        name: String,
        path: PathBuf,
        how: String,
    },
    #[error("volume {name:?} is neither staged nor published at {} on this node", path.display())]
    NotShownAt { name: String, path: PathBuf },
    /// A device, mount or filesystem operation failed (loop ioctls, mkfs,
    /// mount, resize).
    #[error("{0}")]
    Device(String),
    /// The volume's engine failed: replicas, fencing, space.
    #[error("volume {volume:?}: {source}")]
    Engine {
        volume: String,
        #[source]
        source: EngineError,
    },
    /// The cluster metadata (Raft) refused or could not take the change.
    #[error(transparent)]
    Metadata(#[from] StoreError),
    /// This node's own records (its sled database) failed.
    #[error("local records: {0}")]
    LocalStore(String),
    #[error("the daemon is shutting down")]
    ShuttingDown,
    #[error("invalid snapshot name: {0}")]
    InvalidSnapshotName(String),
    #[error("volume {volume:?} has no snapshot {name:?}")]
    SnapshotNotFound { volume: String, name: String },
    #[error("volume {volume:?} already has a snapshot {name:?}")]
    SnapshotExists { volume: String, name: String },
    #[error("volume {0:?} has the most snapshots a volume may have (1024); delete one first")]
    TooManySnapshots(String),
    #[error("snapshot {volume}@{name} is not ready yet (it is being taken, or taking it failed)")]
    SnapshotNotReady { volume: String, name: String },
    #[error("volume {name:?} has {count} snapshot(s); delete them first, or delete it keeping them (`cairn volume rm --keep-snapshots`, `?keep_snapshots=true`)")]
    HasSnapshots { name: String, count: usize },
    #[error("volume {0:?} is being reverted to a snapshot; retry the revert to finish it")]
    Reverting(String),
    /// The filesystem on a mounted volume could not be frozen for a
    /// snapshot (or thawed after it).
    #[error("volume {name:?}: {why}; pass no-freeze for a crash-consistent snapshot instead")]
    Freeze { name: String, why: String },
    /// The node that had to run part of the operation refused it or failed;
    /// `code` is its gRPC status, `api_code` the REST API's code for the
    /// cause there (when it sent one).
    #[error("node {node}: {message}")]
    OnNode {
        node: String,
        code: tonic::Code,
        api_code: Option<String>,
        message: String,
    },
}

impl VolumeError {
    pub fn engine(volume: &str, source: EngineError) -> VolumeError {
        VolumeError::Engine {
            volume: volume.into(),
            source,
        }
    }

    /// The gRPC status code a peer answers with when this error ends an
    /// operation another node asked for (turned back into
    /// [`VolumeError::OnNode`] there).
    pub fn grpc_code(&self) -> tonic::Code {
        use tonic::Code;
        use VolumeError::*;
        match self {
            InvalidName(_)
            | InvalidSize(_)
            | InvalidFs(_)
            | InvalidSource(_)
            | InvalidPath(_)
            | InvalidOptions(_)
            | InvalidReplicas(_)
            | RawVolume(_)
            | InvalidSnapshotName(_) => Code::InvalidArgument,
            NotFound(_) | NotShownAt { .. } | SnapshotNotFound { .. } => Code::NotFound,
            AlreadyExists(_) | SnapshotExists { .. } | PublishedDifferently { .. } => {
                Code::AlreadyExists
            }
            Busy(_) => Code::Aborted,
            NotEnoughNodes(_) | TooManySnapshots(_) => Code::ResourceExhausted,
            Shrink { .. } => Code::OutOfRange,
            Engine {
                source: EngineError::Replica(crate::replica::ReplicaError::NoSpace),
                ..
            } => Code::ResourceExhausted,
            Engine {
                source:
                    EngineError::Replica(crate::replica::ReplicaError::Fenced { .. })
                    | EngineError::Stopped,
                ..
            } => Code::FailedPrecondition,
            Engine {
                source: EngineError::Replica(crate::replica::ReplicaError::Unlisted(_)),
                ..
            } => Code::Unavailable,
            Engine {
                source:
                    EngineError::Unrecorded { .. }
                    | EngineError::NoReplica
                    | EngineError::LastCopy { .. },
                ..
            }
            | Metadata(StoreError::Unavailable(_))
            | ShuttingDown => Code::Unavailable,
            Device(_) | LocalStore(_) | Engine { .. } | Metadata(_) => Code::Internal,
            Attached { .. }
            | AttachedElsewhere { .. }
            | Mounted { .. }
            | InUse { .. }
            | NotFormatted(_)
            | NotStaged { .. }
            | SnapshotNotReady { .. }
            | HasSnapshots { .. }
            | Reverting(_)
            | Freeze { .. } => Code::FailedPrecondition,
            OnNode { code, .. } => *code,
        }
    }
}
