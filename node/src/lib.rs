//! Cairn node: the daemon (`cairn node run`) and the `cairn` CLI.
//!
//! The data path, top to bottom:
//! ```text
//!   api (REST /v1, /metrics)   cli (client of the API)
//!        |
//!   volume (manager: create/resize/delete, attach/mount, restart reconcile)
//!        |                         \
//!   frontend (fuse file -> loop device; nbd export)   cluster (state machine + store)
//!        |
//!   engine (one per volume: bounds, fan-out to replicas, metrics)
//!        |
//!   replica (extent map in sled, data in pool extents)
//!        |
//!   pool (devices with superblocks, extent allocator)
//! ```
//! `sys` holds the Linux syscalls (loop ioctls, mounts, aligned buffers);
//! `daemon` wires everything and owns the shutdown order.

pub mod api;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod csi;
pub mod daemon;
pub mod docker;
pub mod engine;
pub mod frontend;
pub mod metrics;
pub mod pool;
pub mod replica;
pub mod shutdown;
pub mod sys;
pub mod types;
pub mod volume;
