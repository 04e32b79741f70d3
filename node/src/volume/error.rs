//! The volume manager's errors. Each front door maps these by variant to its
//! own vocabulary (HTTP status + code, later CSI codes and Docker `Err`).

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
    #[error("{0}")]
    Device(String),
    #[error("metadata: {0}")]
    Store(String),
}
