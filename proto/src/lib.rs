//! Cairn's wire contracts, shared by the daemon, the CLI and (later) the CSI
//! and Docker adapters.
//!
//! - [`api`]: the JSON bodies of the REST admin API under `/v1`. Request types
//!   reject unknown fields; create and update requests are separate types.
//! - [`nbd`]: the constants of the NBD protocol (fixed newstyle handshake,
//!   simple replies) as the daemon's NBD export speaks it.
//!
//! Nothing here does I/O; it only names and shapes what crosses a socket.

pub mod api;
pub mod nbd;
