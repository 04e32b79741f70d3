//! The volume engine: one per volume served from this node (attached here,
//! or exported over NBD). Frontends (FUSE file, NBD) call it; it
//! bounds-checks, fans writes out to every replica that must have them,
//! reads from a healthy replica (the local one first), keeps the volume's
//! metrics, and rebuilds replicas that missed writes.
//!
//! Durability and fencing (DESIGN.md):
//! - `write` returns after every healthy and rebuilding replica accepted the
//!   data; `flush` after each of them made every earlier write durable.
//! - A replica that fails or times out is dropped from the set only after
//!   the cluster state records it `faulted` (a Raft commit, with this
//!   engine's epoch). Without that record the I/O fails: it never completes
//!   on a degraded set the cluster does not know about.
//! - Every request carries the engine's epoch; replicas refuse older ones.
//!   A fenced engine fails its I/O and marks nothing.
//! - Overlapping writes are serialised (a byte-range lock), so every replica
//!   applies them in the same order and replicas never diverge on a block
//!   two requests wrote at once.
//! - Replicas never silently diverge. A write or zeroing that succeeds on
//!   some replicas and fails on others is settled before the writer hears
//!   back and before the range lock lets the next write in: the failing
//!   replicas are recorded faulted (and rebuilt later) when a healthy one
//!   took the change, which keeps the change durable where it landed and
//!   reads stable (only replicas holding it are read); when no healthy one
//!   took it, the write fails and the replicas that did take it are
//!   recorded faulted. A full pool is no exception: the replica is left
//!   unchanged, so if another replica had room it is faulted like any
//!   other failure, and if none had, all stay equal and the writer sees
//!   ENOSPC. We chose faulting over making the range equal again because
//!   undoing a write that landed would need its old data, and redoing it
//!   on a replica that failed it usually fails again.
//! - Rebuild: the target first receives every new write (`rebuilding`), a
//!   barrier drains writes that started before, then extents whose
//!   checksums differ are copied under an exclusive per-extent lock that
//!   application writes to that extent take shared.
//!
//! Files: this one holds the engine's state and its replica set; `io`
//! the application I/O, `fanout` running an operation on several replicas
//! and settling the outcome, `rebuild` the healer, `scrub` comparing and
//! repairing replicas, `snapshot` snapshots and reverts at one point of
//! the write order, `metrics` the counters.

mod catch_up;
mod fanout;
mod io;
mod rebuild;
pub mod scrub;
mod snapshot;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};

use crate::metrics::VolumeMetrics;

use crate::cluster::state::{ReplicaState, Volume};
use crate::cluster::store::ClusterStore;
use crate::replica::host::{HostMap, Hosted};
use crate::replica::remote::{Channels, RemoteReplica};
use crate::replica::ReplicaError;
use crate::types::{NodeId, VolumeId};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("request [{offset}, +{len}) is beyond the end of the volume ({size} bytes)")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error(transparent)]
    Replica(#[from] ReplicaError),
    #[error("no healthy replica is reachable")]
    NoReplica,
    #[error("the engine stopped (the volume was deleted or moved)")]
    Stopped,
    #[error(
        "replica on node {node} failed ({why}) and could not be recorded as faulted: {record}"
    )]
    Unrecorded {
        node: NodeId,
        why: String,
        record: String,
    },
    /// The replica failed but the state keeps it: it is the volume's last
    /// healthy copy, so the I/O fails instead of going on without it.
    #[error("replica on node {node}, the last healthy copy, failed: {why}")]
    LastCopy {
        node: NodeId,
        why: String,
        /// It refused as unclean, which it stops doing once it is the only
        /// healthy copy: worth one more try.
        unclean: bool,
    },
}

impl EngineError {
    pub fn errno(&self) -> i32 {
        match self {
            EngineError::OutOfRange { .. } => libc::EINVAL,
            EngineError::Replica(r) => r.errno(),
            EngineError::NoReplica
            | EngineError::Stopped
            | EngineError::Unrecorded { .. }
            | EngineError::LastCopy { .. } => libc::EIO,
        }
    }
}

/// Everything engines on this node share.
pub struct EngineCtx {
    pub me: NodeId,
    pub store: Arc<ClusterStore>,
    pub hosts: Arc<HostMap>,
    pub channels: Channels,
    pub fast: crate::replica::wire::Pools,
    pub handle: tokio::runtime::Handle,
    /// Rebuild copy rate limit in bytes per second (0: unlimited).
    pub rebuild_bandwidth: u64,
    /// Healers and resyncs run here (joined at exit).
    pub threads: Arc<crate::shutdown::Threads>,
}

pub enum Target {
    Local(Arc<Hosted>),
    Remote(Arc<RemoteReplica>),
}

const HEALTHY: u8 = 0;
const REBUILDING: u8 = 1;
const FAULTED: u8 = 2;
/// Failed, but the fault could not be recorded yet (no quorum): the slot
/// gets no I/O, and no I/O completes until the fault is recorded.
const SUSPECT: u8 = 3;

fn code(s: ReplicaState) -> u8 {
    match s {
        ReplicaState::Healthy => HEALTHY,
        ReplicaState::Rebuilding => REBUILDING,
        ReplicaState::Faulted => FAULTED,
    }
}

pub struct Slot {
    pub node: NodeId,
    target: Target,
    state: AtomicU8,
}

impl Slot {
    fn state(&self) -> u8 {
        self.state.load(Ordering::Acquire)
    }
    fn is_local(&self) -> bool {
        matches!(self.target, Target::Local(_))
    }
}

/// A rebuild in progress, for the API and metrics.
#[derive(Debug, Clone, Default)]
pub struct RebuildProgress {
    pub node: Option<NodeId>,
    pub done_extents: u64,
    pub total_extents: u64,
}

const STRIPES: usize = 64;
/// Extents a rebuild copies concurrently.
const COPIERS: usize = 4;
/// Writes up to this size go to remote replicas from the writing thread
/// (see [`Engine::write_inline`]).
const INLINE_WRITE: usize = 64 << 10;

/// Byte ranges being written; a write waits while it overlaps one.
#[derive(Default)]
struct RangeLock {
    held: Mutex<Vec<(u64, u64)>>,
    freed: std::sync::Condvar,
}

struct RangeGuard<'a> {
    lock: &'a RangeLock,
    range: (u64, u64),
}

impl RangeLock {
    fn lock(&self, start: u64, len: u64) -> RangeGuard<'_> {
        let end = start + len.max(1);
        let mut held = self.held.lock().expect("range lock");
        while held.iter().any(|(s, e)| *s < end && start < *e) {
            held = self.freed.wait(held).expect("range lock");
        }
        held.push((start, end));
        RangeGuard {
            lock: self,
            range: (start, end),
        }
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.lock.held.lock().expect("range lock");
        if let Some(i) = held.iter().position(|r| *r == self.range) {
            held.swap_remove(i);
        }
        drop(held);
        self.lock.freed.notify_all();
    }
}

pub struct Engine {
    pub volume: VolumeId,
    size: AtomicU64,
    epoch: AtomicU64,
    extent_size: u64,
    slots: RwLock<Vec<Arc<Slot>>>,
    stripes: Vec<RwLock<()>>,
    writing: RangeLock,
    ctx: Arc<EngineCtx>,
    pub metrics: Arc<VolumeMetrics>,
    pub progress: Mutex<RebuildProgress>,
    /// Bytes copied to rebuild targets since the engine started.
    pub rebuild_bytes: AtomicU64,
    stopped: AtomicBool,
    /// The highest epoch a replica fenced this engine's I/O with (0: none).
    fence: AtomicU64,
    /// crc32 of an all-zero extent.
    zero_crc: u32,
}

/// What one replica did with one request.
type Outcome = (Arc<Slot>, Result<(), ReplicaError>);
/// One replica's request running on the runtime.
type RemoteTask = (Arc<Slot>, tokio::task::JoinHandle<Result<(), ReplicaError>>);

impl Engine {
    /// An engine for `v` at `epoch`, with a slot per replica in the state.
    pub fn new(
        v: &Volume,
        epoch: u64,
        ctx: Arc<EngineCtx>,
        metrics: Arc<VolumeMetrics>,
    ) -> Result<Arc<Engine>, EngineError> {
        let ctx_extent = ctx.hosts.extent_size();
        let e = Arc::new(Engine {
            volume: v.id,
            size: AtomicU64::new(v.size_bytes),
            epoch: AtomicU64::new(epoch),
            extent_size: ctx.hosts.extent_size(),
            slots: RwLock::new(Vec::new()),
            stripes: (0..STRIPES).map(|_| RwLock::new(())).collect(),
            writing: RangeLock::default(),
            ctx,
            metrics,
            progress: Mutex::new(RebuildProgress::default()),
            rebuild_bytes: AtomicU64::new(0),
            stopped: AtomicBool::new(false),
            fence: AtomicU64::new(0),
            zero_crc: crc32fast::hash(&vec![0u8; ctx_extent as usize]),
        });
        e.sync_slots(v)?;
        Ok(e)
    }

    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Why this engine's I/O fails for good, once it has seen why: it was
    /// stopped, or a replica fenced it at an epoch newer than its own (the
    /// volume was attached elsewhere since). None while it may still work.
    /// A program that writes through the engine (mkfs) fails with only an
    /// EIO; this is what the front doors report instead.
    pub fn retired(&self) -> Option<EngineError> {
        if self.stopped.load(Ordering::Acquire) {
            return Some(EngineError::Stopped);
        }
        let (epoch, fence) = (self.epoch(), self.fence.load(Ordering::Acquire));
        (fence > epoch).then_some(EngineError::Replica(ReplicaError::Fenced { epoch, fence }))
    }

    /// Volumes only grow; the caller recorded the new size in the cluster state.
    pub fn set_size(&self, size_bytes: u64) {
        self.size.fetch_max(size_bytes, Ordering::AcqRel);
    }

    /// The node and state of each replica as this engine sees it.
    pub fn replica_states(&self) -> Vec<(NodeId, ReplicaState)> {
        self.slots
            .read()
            .expect("slots lock")
            .iter()
            .map(|s| {
                let st = match s.state() {
                    HEALTHY => ReplicaState::Healthy,
                    REBUILDING => ReplicaState::Rebuilding,
                    _ => ReplicaState::Faulted,
                };
                (s.node, st)
            })
            .collect()
    }

    fn target_for(&self, node: NodeId) -> Result<Target, ReplicaError> {
        if node == self.ctx.me {
            return Ok(Target::Local(
                self.ctx.hosts.get_or_create(self.volume, &self.ctx.store)?,
            ));
        }
        // Channels connect lazily through the runtime's reactor; the
        // healer calls this from its own thread.
        let _rt = self.ctx.handle.enter();
        let (addr, cluster) = {
            let s = self.ctx.store.read();
            let addr = s
                .nodes
                .get(&node)
                .map(|n| n.peer_address.clone())
                .ok_or_else(|| ReplicaError::Remote(format!("node {node} is not a member")))?;
            (addr, s.cluster_id)
        };
        Ok(Target::Remote(Arc::new(RemoteReplica::new(
            &self.ctx.channels,
            &self.ctx.fast,
            node,
            &addr,
            cluster,
            self.volume,
        )?)))
    }

    /// Brings the slot list in line with the replicas the state lists:
    /// new replicas join as faulted (the healer rebuilds them), removed ones
    /// leave. States of known slots only move through this engine, except
    /// that a replica the state calls faulted is never written or read.
    pub fn sync_slots(&self, v: &Volume) -> Result<(), EngineError> {
        let mut slots = self.slots.write().expect("slots lock");
        slots.retain(|s| v.has_replica_on(s.node));
        for r in &v.replicas {
            match slots.iter().find(|s| s.node == r.node) {
                Some(s) => {
                    if r.state == ReplicaState::Faulted {
                        s.state.store(FAULTED, Ordering::Release);
                    }
                }
                None => {
                    let target = self.target_for(r.node)?;
                    slots.push(Arc::new(Slot {
                        node: r.node,
                        target,
                        // Only a healthy replica may be served at once; a
                        // rebuilding one restarts its rebuild here.
                        state: AtomicU8::new(if r.state == ReplicaState::Healthy {
                            HEALTHY
                        } else {
                            FAULTED
                        }),
                    }));
                }
            }
        }
        // Local replica first: reads prefer it.
        slots.sort_by_key(|s| !s.is_local());
        Ok(())
    }

    /// Moves the engine to a new epoch (a new attachment on this node) and
    /// opens every healthy replica with it, which fences older engines.
    /// A replica that cannot be opened is recorded faulted.
    pub fn activate(&self, v: &Volume, epoch: u64) -> Result<(), EngineError> {
        self.epoch.fetch_max(epoch, Ordering::AcqRel);
        self.set_size(v.size_bytes);
        self.sync_slots(v)?;
        let slots: Vec<Arc<Slot>> = self.slots.read().expect("slots lock").clone();
        let results = self.fan_out(&slots, |t, e| async move {
            match t {
                Target::Local(h) => h.open(e),
                Target::Remote(r) => r.open(e).await,
            }
        });
        self.settle(results, false)
    }
}
