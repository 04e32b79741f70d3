//! The volume manager: every front door (REST API, NBD, later CSI and the
//! Docker plugin) changes volumes through it. It turns requests into cluster
//! state commands, opens engines, and drives the attach/mount path
//! ([`mount`]) — mkfs on first use, mount, grow, and cleanup of stale kernel
//! state after a crash.

mod error;
mod manager;
pub mod mount;
pub mod view;

pub use error::VolumeError;
pub use manager::{
    parse_size, parse_size_rounded, ManagerConfig, NbdExports, PathUsage, PublishSpec, StageSpec,
    VolumeManager,
};
pub use view::{ReplicaCondition, ReplicaView, VolumeState, VolumeView};

use cairn_proto::api::SizeArg;

use crate::types::FsType;

/// A volume to create, as every front door asks for it: the REST body,
/// Docker's options and CSI's CreateVolume are converted into this at their
/// edge.
#[derive(Debug, Clone)]
pub struct CreateVolume {
    pub name: String,
    /// `None`: a clone's source size (a plain volume needs one).
    pub size: Option<SizeArg>,
    pub fs: FsType,
    /// Copies on distinct nodes (default: the daemon's `--default-replicas`).
    pub replicas: Option<u32>,
    /// Keep one replica on the node that serves the request.
    pub locality: bool,
    /// The name a CSI CO knows the volume by, when it is not `name`.
    pub csi_name: Option<String>,
    /// Make the volume a clone of this (its filesystem is the source's).
    pub source: Option<CloneSource>,
}

/// What a clone is made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloneSource {
    /// Snapshot `snapshot` of volume `volume`.
    Snapshot { volume: String, snapshot: String },
    /// Volume `0` as it is now (a snapshot is taken for the clone and
    /// deleted once the clone no longer needs it).
    Volume(String),
}

impl CloneSource {
    /// `VOL@SNAP`, as the CLI and the Docker option give it.
    pub fn parse_snapshot(s: &str) -> Result<CloneSource, VolumeError> {
        match s.split_once('@') {
            Some((v, n)) if !v.is_empty() && !n.is_empty() => Ok(CloneSource::Snapshot {
                volume: v.into(),
                snapshot: n.into(),
            }),
            _ => Err(VolumeError::InvalidSnapshotName(format!(
                "{s:?}: name a snapshot as VOLUME@SNAPSHOT"
            ))),
        }
    }
}
