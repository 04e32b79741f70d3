//! Cairn's wire contracts, shared by the daemon, the CLI and (later) the CSI
//! and Docker adapters.
//!
//! - [`api`]: the JSON bodies of the REST admin API under `/v1`. Request types
//!   reject unknown fields; create and update requests are separate types.
//! - [`peer`]: the node-to-node gRPC service (Raft transport, join,
//!   forwarded proposals), generated from `proto/cairn/v1/peer.proto`.
//! - [`nbd`]: the constants of the NBD protocol (fixed newstyle handshake,
//!   simple replies) as the daemon's NBD export speaks it.
//!
//! Nothing here does I/O; it only names and shapes what crosses a socket.

pub mod api;
pub mod nbd;

/// The node-to-node gRPC service (`proto/cairn/v1/peer.proto`), generated.
#[allow(clippy::all, missing_docs)]
pub mod peer {
    tonic::include_proto!("cairn.v1");
}
