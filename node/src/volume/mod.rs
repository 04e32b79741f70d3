//! The volume manager: every front door (REST API, NBD, later CSI and the
//! Docker plugin) changes volumes through it. It turns requests into cluster
//! state commands, opens engines, and drives the attach/mount path
//! ([`mount`]) — mkfs on first use, mount, grow, and cleanup of stale kernel
//! state after a crash.

mod error;
mod manager;
pub mod mount;

pub use error::VolumeError;
pub use manager::{parse_size, ManagerConfig, NbdExports, VolumeManager};
