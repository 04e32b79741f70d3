//! Cluster metadata: a deterministic state machine ([`state`]) changed only
//! by [`state::Command`]s, replicated through a Raft log ([`store`], with the
//! log, hard state and snapshots in sled: [`raft_storage`]).
//!
//! Applying a command is a pure function of the state and the command, so
//! every replica that applies the same log holds the same state. Today the
//! Raft group has a single voter; peers, transport and membership are the
//! next step and change only `store`.

mod driver;
pub mod peer_service;
pub mod raft_storage;
pub mod state;
pub mod store;
mod transport;
