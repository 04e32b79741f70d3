//! The hot replica I/O path (`cairn_proto::frame`): blocking TCP, one
//! thread per connection on the replica's side, a small pool of idle
//! connections per peer on the engine's side. The replica checks
//! everything in a request before acting (magic, version, cluster, volume,
//! sizes, payload crc32) and answers every request, errors included; a
//! connection that breaks the framing is closed.
//!
//! `server` is the replica's side (a thread per connection), `client` the
//! engine's (pooled connections per peer, a request sent before its reply
//! is read).

mod client;
mod server;

pub use client::{Pending, Pool, Pools};
pub use server::Server;

use std::time::Duration;

/// Idle connections kept per peer.
const POOL: usize = 32;
/// A connection that sends nothing for this long (idle, or stalled inside
/// a frame) is closed; an engine replaces a pooled connection the peer
/// closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Payload buffer a connection keeps between requests; a larger one is
/// released after the request that needed it.
const KEEP_BUFFER: usize = 1 << 20;
