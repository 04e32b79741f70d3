//! Cluster metadata: a deterministic state machine ([`state`]) changed only
//! by [`state::Command`]s, and the store that persists it ([`store`]).
//!
//! Today one node applies commands locally and persists the resulting state
//! before acknowledging; the Raft issue replaces the store with a replicated
//! log without touching `state`: applying a command stays a pure function of
//! the state and the command.

pub mod state;
pub mod store;
