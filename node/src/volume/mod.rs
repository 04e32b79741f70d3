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
    pub size: SizeArg,
    pub fs: FsType,
    /// Copies on distinct nodes (default: the daemon's `--default-replicas`).
    pub replicas: Option<u32>,
    /// Keep one replica on the node that serves the request.
    pub locality: bool,
    /// The name a CSI CO knows the volume by, when it is not `name`.
    pub csi_name: Option<String>,
}
