//! Cluster metadata: a deterministic state machine ([`state`]) changed only
//! by [`state::Command`]s, replicated through a Raft log ([`store`], with the
//! log, hard state and snapshots in sled: [`raft_storage`]), driven by one
//! thread ([`driver`]) and carried between nodes over gRPC ([`transport`],
//! [`peer_service`]). [`liveness`] is the leader's view of which nodes are up.
//!
//! Applying a command is a pure function of the state and the command, so
//! every replica that applies the same log holds the same state.

mod driver;
pub mod liveness;
pub mod peer_service;
pub mod placement;
pub mod raft_storage;
mod shared;
pub mod state;
pub mod store;
mod transport;
