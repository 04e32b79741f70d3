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
}

impl VolumeError {
    pub fn engine(volume: &str, source: EngineError) -> VolumeError {
        VolumeError::Engine {
            volume: volume.into(),
            source,
        }
    }
}
