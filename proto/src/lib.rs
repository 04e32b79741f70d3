//! Cairn's wire contracts, shared by the daemon, the CLI and (later) the CSI
//! and Docker adapters.
//!
//! - [`api`]: the JSON bodies of the REST admin API under `/v1`. Request types
//!   reject unknown fields; create and update requests are separate types.
//! - [`peer`]: the node-to-node gRPC service (Raft transport, join,
//!   forwarded proposals), generated from `proto/cairn/v1/peer.proto`.
//! - [`data`]: the replica data protocol (engine to remote replicas),
//!   generated from `proto/cairn/v1/data.proto`.
//! - [`frame`]: the framed TCP path that carries replica reads, writes,
//!   flushes and zeroings.
//! - [`nbd`]: the constants of the NBD protocol (fixed newstyle handshake,
//!   simple replies) as the daemon's NBD export speaks it.
//!
//! Nothing here does I/O; it only names and shapes what crosses a socket.

pub mod api;
pub mod frame;
pub mod nbd;

/// The node-to-node gRPC service (`proto/cairn/v1/peer.proto`), generated.
#[allow(clippy::all, missing_docs)]
pub mod peer {
    tonic::include_proto!("cairn.v1");
}

/// The replica data protocol (`proto/cairn/v1/data.proto`), generated.
#[allow(clippy::all, missing_docs)]
pub mod data {
    tonic::include_proto!("cairn.data.v1");

    /// The version this build speaks (2: snapshots; 3: a rebuild copies
    /// snapshots: checksums and reads of a snapshot, ADOPT).
    pub const DATA_PROTOCOL_VERSION: u32 = 3;
    /// The oldest version this build still accepts.
    pub const DATA_PROTOCOL_MIN: u32 = 1;
}
