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

pub mod metrics;
pub mod scrub;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};
use std::time::{Duration, Instant};

use metrics::VolumeMetrics;
use prost::bytes::Bytes;

use crate::cluster::state::{Command, ReplicaState, StateError, Volume};
use crate::cluster::store::{ClusterStore, StoreError};
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
    pub fast: crate::replica::fast::FastPools,
    pub handle: tokio::runtime::Handle,
    /// Rebuild copy rate limit in bytes per second (0: unlimited).
    pub rebuild_bandwidth: u64,
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

    // ---- fan-out ------------------------------------------------------------

    /// Runs `op` on each slot: remote ones concurrently on the runtime,
    /// while local ones run inline on this thread.
    fn fan_out<F, Fut>(&self, slots: &[Arc<Slot>], op: F) -> Vec<Outcome>
    where
        F: Fn(Target, u64) -> Fut,
        Fut: std::future::Future<Output = Result<(), ReplicaError>> + Send + 'static,
    {
        let epoch = self.epoch();
        let mut remote = Vec::new();
        let mut out = Vec::with_capacity(slots.len());
        for s in slots.iter().filter(|s| !s.is_local()) {
            let fut = op(s.target.clone_handle(), epoch);
            remote.push((s.clone(), self.ctx.handle.spawn(fut)));
        }
        for s in slots.iter().filter(|s| s.is_local()) {
            // Local futures complete without awaiting anything remote.
            let r = self.ctx.handle.block_on(op(s.target.clone_handle(), epoch));
            out.push((s.clone(), r));
        }
        self.join_remote(remote, &mut out);
        out
    }

    /// Waits for remote replicas' tasks and adds their outcomes to `out`.
    fn join_remote(&self, remote: Vec<RemoteTask>, out: &mut Vec<Outcome>) {
        for (s, h) in remote {
            let r = self
                .ctx
                .handle
                .block_on(h)
                .unwrap_or_else(|e| Err(ReplicaError::Remote(e.to_string())));
            out.push((s, r));
        }
    }

    /// Handles the outcomes of one fan-out. A fenced engine fails and marks
    /// nothing (a newer engine owns the volume). Otherwise every replica
    /// that failed is recorded faulted before it leaves the set, and a
    /// fault that cannot be recorded fails the I/O: nothing completes on a
    /// degraded set the cluster does not know about. Ok when at least one
    /// healthy replica succeeded.
    ///
    /// With `changes` (writes, zeroing) the replicas must stay equal, so
    /// the outcome decides which side is kept (see the module doc): when a
    /// healthy replica took the change, every replica that did not is
    /// recorded faulted, a full pool included; when none did, the change
    /// fails and the replicas that took it anyway (rebuilding ones) are
    /// recorded faulted instead. A full pool leaves its replica unchanged
    /// (`LocalReplica::write` allocates before it writes), so replicas that
    /// all ran out of space stay equal, healthy, and the writer sees ENOSPC.
    fn settle(&self, results: Vec<Outcome>, changes: bool) -> Result<(), EngineError> {
        if let Some(i) = results
            .iter()
            .position(|(_, r)| matches!(r, Err(ReplicaError::Fenced { .. })))
        {
            let (_, r) = results.into_iter().nth(i).expect("found");
            return Err(r.expect_err("fenced").into());
        }
        let healthy_ok = results
            .iter()
            .any(|(s, r)| r.is_ok() && s.state() == HEALTHY);
        let mut unrecorded: Option<EngineError> = None;
        let mut failed: Option<EngineError> = None;
        for (slot, r) in results {
            let cause = match r {
                Ok(()) if !changes || healthy_ok => continue,
                Ok(()) => ReplicaError::Remote(
                    "it took a write that no healthy replica took, so it differs from them".into(),
                ),
                Err(ReplicaError::NoSpace) if !(changes && healthy_ok) => {
                    failed.get_or_insert(ReplicaError::NoSpace.into());
                    continue;
                }
                Err(e) => e,
            };
            match self.mark_faulted(&slot, &cause) {
                Err(u) => {
                    unrecorded.get_or_insert(u);
                }
                Ok(()) => {
                    failed.get_or_insert(EngineError::Replica(cause));
                }
            }
        }
        if let Some(e) = unrecorded {
            return Err(e);
        }
        if healthy_ok {
            return Ok(());
        }
        Err(failed.unwrap_or(EngineError::NoReplica))
    }

    /// Before any I/O: faults that could not be recorded earlier must be
    /// recorded now, or the I/O fails.
    fn record_suspects(&self) -> Result<(), EngineError> {
        let suspects: Vec<Arc<Slot>> = self.slots_where(|st| st == SUSPECT);
        for s in suspects {
            self.mark_faulted(&s, &ReplicaError::Remote("an earlier failure".into()))?;
        }
        Ok(())
    }

    /// Records `slot` faulted in the cluster state (with this engine's
    /// epoch), then stops sending it I/O.
    fn mark_faulted(&self, slot: &Slot, cause: &ReplicaError) -> Result<(), EngineError> {
        if slot.state() == FAULTED {
            return Ok(());
        }
        let why = cause.to_string();
        tracing::warn!(volume = %self.volume, node = %slot.node, error = %why, "replica failed; recording it faulted");
        let r = self.ctx.store.propose(Command::SetReplicaState {
            id: self.volume,
            node: slot.node,
            state: ReplicaState::Faulted,
            epoch: self.epoch(),
        });
        match r {
            Ok(_) => {
                slot.state.store(FAULTED, Ordering::Release);
                Ok(())
            }
            // The cluster keeps its last healthy copy: so does the engine
            // (this I/O fails, later ones try it again).
            Err(StoreError::Refused(StateError::LastHealthy { .. })) => {
                Err(EngineError::LastCopy {
                    node: slot.node,
                    why,
                    unclean: matches!(cause, ReplicaError::Unclean(_)),
                })
            }
            Err(e) => {
                slot.state.store(SUSPECT, Ordering::Release);
                Err(EngineError::Unrecorded {
                    node: slot.node,
                    why,
                    record: e.to_string(),
                })
            }
        }
    }

    /// The slots whose (local) state satisfies `want`.
    fn slots_where(&self, want: impl Fn(u8) -> bool) -> Vec<Arc<Slot>> {
        self.slots
            .read()
            .expect("slots lock")
            .iter()
            .filter(|s| want(s.state()))
            .cloned()
            .collect()
    }

    fn writable(&self) -> Vec<Arc<Slot>> {
        self.slots_where(|st| matches!(st, HEALTHY | REBUILDING))
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), EngineError> {
        let size = self.size();
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(EngineError::OutOfRange { offset, len, size });
        }
        Ok(())
    }

    /// Shared locks on the stripes of the extents `[offset, offset+len)`
    /// touches, taken in stripe order.
    fn lock_shared(&self, offset: u64, len: u64) -> Vec<RwLockReadGuard<'_, ()>> {
        let first = offset / self.extent_size;
        let last = (offset + len.max(1) - 1) / self.extent_size;
        let mut idx: Vec<usize> = if last - first >= STRIPES as u64 {
            (0..STRIPES).collect()
        } else {
            (first..=last)
                .map(|e| (e % STRIPES as u64) as usize)
                .collect()
        };
        idx.sort_unstable();
        idx.dedup();
        idx.into_iter()
            .map(|i| self.stripes[i].read().expect("stripe lock"))
            .collect()
    }

    fn lock_extent(&self, extent: u64) -> RwLockWriteGuard<'_, ()> {
        self.stripes[(extent % STRIPES as u64) as usize]
            .write()
            .expect("stripe lock")
    }

    // ---- I/O ----------------------------------------------------------------

    /// Runs `op`, and once more when it failed on the last healthy copy
    /// refusing as unclean: that copy serves once it is the only healthy
    /// one, which the failed attempt may just have made it by recording
    /// the others faulted.
    fn retrying(&self, mut op: impl FnMut() -> Result<(), EngineError>) -> Result<(), EngineError> {
        match op() {
            Err(EngineError::LastCopy { unclean: true, .. }) => op(),
            r => r,
        }
    }

    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), EngineError> {
        let t = Instant::now();
        let r = self.check(offset, buf.len() as u64).and_then(|_| {
            self.retrying(|| {
                self.record_suspects()?;
                self.read_any(offset, buf)
            })
        });
        self.metrics
            .record_read(buf.len() as u64, t.elapsed(), r.is_ok());
        r
    }

    fn read_any(&self, offset: u64, buf: &mut [u8]) -> Result<(), EngineError> {
        let epoch = self.epoch();
        let healthy: Vec<Arc<Slot>> = self.slots_where(|st| st == HEALTHY);
        for slot in healthy {
            let r = slot.target.read(epoch, offset, buf);
            match r {
                Ok(()) => return Ok(()),
                Err(e @ ReplicaError::Fenced { .. }) => return Err(e.into()),
                Err(e) => self.mark_faulted(&slot, &e)?,
            }
        }
        Err(EngineError::NoReplica)
    }

    pub fn write(&self, offset: u64, buf: &[u8]) -> Result<(), EngineError> {
        let t = Instant::now();
        let r = self
            .check(offset, buf.len() as u64)
            .and_then(|_| self.retrying(|| self.write_once(offset, buf)));
        self.metrics
            .record_write(buf.len() as u64, t.elapsed(), r.is_ok());
        if let Err(EngineError::Replica(ReplicaError::NoSpace)) = &r {
            self.metrics.no_space_errors.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    fn write_once(&self, offset: u64, buf: &[u8]) -> Result<(), EngineError> {
        self.record_suspects()?;
        let _range = self.writing.lock(offset, buf.len() as u64);
        let _locks = self.lock_shared(offset, buf.len() as u64);
        let slots = self.writable();
        if buf.len() <= INLINE_WRITE {
            return self.write_inline(&slots, offset, buf);
        }
        let data = if slots.iter().any(|s| !s.is_local()) {
            Bytes::copy_from_slice(buf)
        } else {
            Bytes::new()
        };
        // Local writes use the caller's buffer (no copy); remote ones
        // share one reference-counted copy.
        let local_buf = buf;
        let mut results = Vec::with_capacity(slots.len());
        let epoch = self.epoch();
        let remote: Vec<_> = slots
            .iter()
            .filter_map(|s| match &s.target {
                Target::Remote(r) => {
                    let (r, d) = (r.clone(), data.clone());
                    Some((
                        s.clone(),
                        self.ctx
                            .handle
                            .spawn_blocking(move || r.write_blocking(epoch, offset, &d)),
                    ))
                }
                Target::Local(_) => None,
            })
            .collect();
        for s in &slots {
            if let Target::Local(h) = &s.target {
                results.push((s.clone(), h.write(epoch, offset, local_buf)));
            }
        }
        self.join_remote(remote, &mut results);
        self.settle(results, true)
    }

    /// A small write without thread hand-offs: this thread sends it to
    /// every remote replica, writes the local one while they work, then
    /// reads their replies. (A large write's sends would block on socket
    /// buffers one after the other; those go to the blocking pool.)
    fn write_inline(
        &self,
        slots: &[Arc<Slot>],
        offset: u64,
        buf: &[u8],
    ) -> Result<(), EngineError> {
        let epoch = self.epoch();
        let sent: Vec<_> = slots
            .iter()
            .filter_map(|s| match &s.target {
                Target::Remote(r) => Some((s.clone(), r.begin_write(epoch, offset, buf))),
                Target::Local(_) => None,
            })
            .collect();
        let mut results = Vec::with_capacity(slots.len());
        for s in slots {
            if let Target::Local(h) = &s.target {
                results.push((s.clone(), h.write(epoch, offset, buf)));
            }
        }
        for (s, pending) in sent {
            let r = pending.and_then(|p| p.finish()).map(|_| ());
            results.push((s, r));
        }
        self.settle(results, true)
    }

    /// TRIM/discard and write-zeroes: the range reads as zeros afterwards.
    pub fn zero_range(&self, offset: u64, len: u64) -> Result<(), EngineError> {
        let r = self.check(offset, len).and_then(|_| {
            self.retrying(|| {
                self.record_suspects()?;
                let _range = self.writing.lock(offset, len);
                let _locks = self.lock_shared(offset, len);
                let slots = self.writable();
                let results = self.fan_out(&slots, |t, e| async move {
                    match t {
                        Target::Local(h) => h.zero_range(e, offset, len),
                        Target::Remote(r) => {
                            blocking(move || r.zero_blocking(e, offset, len)).await
                        }
                    }
                });
                self.settle(results, true)
            })
        });
        self.metrics.record_discard(len, r.is_ok());
        r
    }

    pub fn flush(&self) -> Result<(), EngineError> {
        let t = Instant::now();
        let r = self.retrying(|| {
            self.record_suspects()?;
            let slots = self.writable();
            let results = self.fan_out(&slots, |t, e| async move {
                match t {
                    Target::Local(h) => h.flush(e),
                    Target::Remote(r) => blocking(move || r.flush_blocking(e)).await,
                }
            });
            self.settle(results, false)
        });
        self.metrics.record_flush(t.elapsed(), r.is_ok());
        r
    }

    // ---- rebuild ------------------------------------------------------------

    /// Stops the healer (the engine is being dropped from the node).
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
    }

    /// Starts the healer thread: it keeps the slots in line with the state
    /// and rebuilds faulted replicas whose node answers, while this engine
    /// holds the volume's current attachment.
    pub fn start_healer(self: &Arc<Self>) {
        let weak: Weak<Engine> = Arc::downgrade(self);
        let name = format!("heal-{}", &self.volume.to_string()[..8]);
        let spawned = std::thread::Builder::new().name(name).spawn(move || loop {
            std::thread::sleep(Duration::from_secs(1));
            let Some(e) = weak.upgrade() else { return };
            if e.stopped.load(Ordering::Acquire) {
                return;
            }
            e.heal_once();
        });
        if let Err(err) = spawned {
            tracing::error!(volume = %self.volume, error = %err, "cannot start the replica healer");
        }
    }

    /// One pass of the healer.
    fn heal_once(&self) {
        let v = {
            let s = self.ctx.store.read();
            match s.volumes.get(&self.volume) {
                Some(v) => v.clone(),
                None => return,
            }
        };
        // The attached engine heals its volume; an unattached volume is
        // healed by the node of its first healthy replica.
        let ours = match &v.attachment {
            Some(a) => a.node == self.ctx.me && a.epoch == self.epoch(),
            None => {
                v.epoch == self.epoch() && v.healthy().next().map(|r| r.node) == Some(self.ctx.me)
            }
        };
        if !ours {
            return;
        }
        if let Err(e) = self.sync_slots(&v) {
            tracing::debug!(volume = %self.volume, error = %e, "replica set not refreshed");
            return;
        }
        let faulted: Vec<Arc<Slot>> = self.slots_where(|st| st == FAULTED);
        for slot in faulted {
            let up = self
                .ctx
                .store
                .read()
                .nodes
                .get(&slot.node)
                .is_some_and(|n| n.state == crate::cluster::state::NodeState::Up);
            if !up {
                continue;
            }
            match self.rebuild(&slot) {
                Ok(copied) => {
                    tracing::info!(volume = %self.volume, node = %slot.node, copied, "replica rebuilt and healthy")
                }
                Err(e) => {
                    tracing::info!(volume = %self.volume, node = %slot.node, error = %e, "rebuild not done; retried later")
                }
            }
            *self.progress.lock().expect("progress lock") = RebuildProgress::default();
        }
    }

    fn set_state(&self, slot: &Slot, state: ReplicaState) -> Result<(), StoreError> {
        self.ctx.store.propose(Command::SetReplicaState {
            id: self.volume,
            node: slot.node,
            state,
            epoch: self.epoch(),
        })?;
        slot.state.store(code(state), Ordering::Release);
        Ok(())
    }

    /// Copies what differs from a healthy replica to `slot`; returns the
    /// bytes copied.
    fn rebuild(&self, slot: &Arc<Slot>) -> Result<u64, String> {
        let epoch = self.epoch();
        let target = &slot.target;
        // The node must answer (and accept our epoch) before anything starts.
        target
            .open(&self.ctx.handle, epoch)
            .map_err(|e| format!("open: {e}"))?;
        self.set_state(slot, ReplicaState::Rebuilding)
            .map_err(|e| format!("recording rebuilding: {e}"))?;
        // Barrier: writes that chose their targets before the state change
        // finish before any extent is compared.
        for s in &self.stripes {
            drop(s.write().expect("stripe lock"));
        }
        let r = self.copy_differences(slot);
        match r {
            Ok(copied) => {
                let flushed = target.flush(epoch);
                if let Err(e) = flushed {
                    let _ = self.mark_faulted(slot, &e);
                    return Err(format!("flush: {e}"));
                }
                self.set_state(slot, ReplicaState::Healthy)
                    .map_err(|e| format!("recording healthy: {e}"))?;
                Ok(copied)
            }
            Err(e) => {
                if slot.state() == REBUILDING {
                    let _ = self.mark_faulted(slot, &ReplicaError::Remote(e.clone()));
                }
                Err(e)
            }
        }
    }

    /// An unallocated extent reads as zeros: compare it as such.
    fn norm(&self, sum: Option<u32>) -> u32 {
        sum.unwrap_or(self.zero_crc)
    }

    fn source(&self) -> Option<Arc<Slot>> {
        self.slots
            .read()
            .expect("slots lock")
            .iter()
            .find(|s| s.state() == HEALTHY)
            .cloned()
    }

    fn checksums(
        &self,
        t: &Target,
        first: u64,
        count: u64,
    ) -> Result<Vec<Option<u32>>, ReplicaError> {
        t.checksums(&self.ctx.handle, self.epoch(), first, count)
    }

    fn copy_differences(&self, slot: &Arc<Slot>) -> Result<u64, String> {
        const BATCH: u64 = 64;
        let es = self.extent_size;
        let total = self.size().div_ceil(es);
        *self.progress.lock().expect("progress lock") = RebuildProgress {
            node: Some(slot.node),
            done_extents: 0,
            total_extents: total,
        };
        let started = Instant::now();
        let mut copied = 0u64;
        let mut first = 0;
        while first < total {
            if self.stopped.load(Ordering::Acquire) || slot.state() != REBUILDING {
                return Err("rebuild interrupted".into());
            }
            let count = BATCH.min(total - first);
            let src = self.source().ok_or("no healthy source replica")?;
            let b = self
                .checksums(&slot.target, first, count)
                .map_err(|e| format!("target checksums: {e}"))?;
            // When the target has none of the batch allocated (a new
            // replica), every extent the source has allocated is copied
            // without checksumming the source first, which would read every
            // byte twice; the allocation map costs no read.
            let fresh = b.iter().all(Option::is_none);
            let differ: Vec<u64> = if fresh {
                let a = src
                    .target
                    .allocation(&self.ctx.handle, self.epoch(), first, count)
                    .map_err(|e| format!("source allocation: {e}"))?;
                (first..first + count)
                    .filter(|e| a[(e - first) as usize])
                    .collect()
            } else {
                let a = self
                    .checksums(&src.target, first, count)
                    .map_err(|e| format!("source checksums: {e}"))?;
                a.iter()
                    .zip(b.iter())
                    .enumerate()
                    .filter(|(_, (x, y))| self.norm(**x) != self.norm(**y))
                    .map(|(i, _)| first + i as u64)
                    .collect()
            };
            // A few extents in flight at once (distinct stripes within a
            // batch), each under its own lock.
            let next = std::sync::atomic::AtomicUsize::new(0);
            let done = AtomicU64::new(copied);
            let failed: Mutex<Option<String>> = Mutex::new(None);
            std::thread::scope(|sc| {
                for _ in 0..COPIERS.min(differ.len()) {
                    sc.spawn(|| loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= differ.len() || failed.lock().expect("failed lock").is_some() {
                            return;
                        }
                        let extent = differ[i];
                        match self.copy_extent(&src, slot, extent, !fresh) {
                            Ok(n) => {
                                let total = done.fetch_add(n, Ordering::Relaxed) + n;
                                self.throttle(started, total);
                            }
                            Err(e) => {
                                *failed.lock().expect("failed lock") =
                                    Some(format!("extent {extent}: {e}"));
                                return;
                            }
                        }
                    });
                }
            });
            if let Some(e) = failed.into_inner().expect("failed lock") {
                return Err(e);
            }
            copied = done.load(Ordering::Relaxed);
            first += count;
            self.progress.lock().expect("progress lock").done_extents = first;
        }
        Ok(copied)
    }

    /// Copies one extent under its exclusive lock; returns bytes sent.
    /// The comparison that selected it ran without the lock, so with
    /// `recheck` both sides are looked at again under it before anything is
    /// written. Without it (the target had nothing allocated) the source is
    /// copied unless it reads as zeros: under the lock no write is in
    /// flight, and every write since the barrier reached both sides, so
    /// whatever the target holds now the source holds too.
    fn copy_extent(
        &self,
        src: &Slot,
        dst: &Slot,
        extent: u64,
        recheck: bool,
    ) -> Result<u64, ReplicaError> {
        let _x = self.lock_extent(extent);
        let epoch = self.epoch();
        let es = self.extent_size;
        let offset = extent * es;
        let len = es.min(self.size() - offset);
        // One read of the source (an unallocated extent reads as zeros
        // without touching the disk), compared with the target's checksum.
        let mut buf = crate::sys::AlignedBuf::new(len as usize, crate::pool::IO_ALIGN);
        src.target.read(epoch, offset, buf.as_mut_slice())?;
        if recheck {
            let from = crc32fast::hash(buf.as_slice());
            let to = self.checksums(&dst.target, extent, 1)?[0];
            let to_crc = match to {
                Some(c) => c,
                None if len == es => self.zero_crc,
                None => crc32fast::hash(&vec![0u8; len as usize]),
            };
            if from == to_crc {
                return Ok(0);
            }
        }
        if buf.as_slice().iter().all(|b| *b == 0) {
            // Zeros: give the target's space back instead of writing them
            // (a target that had nothing allocated has nothing to give).
            if recheck {
                dst.target.zero(epoch, offset, len)?;
            }
            return Ok(0);
        }
        dst.target.write(epoch, offset, buf.as_slice())?;
        self.rebuild_bytes.fetch_add(len, Ordering::Relaxed);
        Ok(len)
    }

    /// Sleeps so the copy rate stays under the configured bandwidth.
    fn throttle(&self, started: Instant, copied: u64) {
        let bw = self.ctx.rebuild_bandwidth;
        if bw == 0 {
            return;
        }
        let due = Duration::from_secs_f64(copied as f64 / bw as f64);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            std::thread::sleep(wait);
        }
    }
}

/// Runs a blocking replica call on the runtime's blocking pool.
async fn blocking(
    f: impl FnOnce() -> Result<(), ReplicaError> + Send + 'static,
) -> Result<(), ReplicaError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(ReplicaError::Remote(e.to_string())))
}

/// One replica operation on the calling thread, local or remote.
impl Target {
    /// A handle for use inside a spawned future.
    fn clone_handle(&self) -> Target {
        match self {
            Target::Local(h) => Target::Local(h.clone()),
            Target::Remote(r) => Target::Remote(r.clone()),
        }
    }

    fn open(&self, rt: &tokio::runtime::Handle, epoch: u64) -> Result<(), ReplicaError> {
        match self {
            Target::Local(h) => h.open(epoch),
            Target::Remote(r) => rt.block_on(r.open(epoch)),
        }
    }

    fn read(&self, epoch: u64, offset: u64, buf: &mut [u8]) -> Result<(), ReplicaError> {
        match self {
            Target::Local(h) => h.read(epoch, offset, buf),
            Target::Remote(r) => r.read_blocking(epoch, offset, buf),
        }
    }

    fn write(&self, epoch: u64, offset: u64, buf: &[u8]) -> Result<(), ReplicaError> {
        match self {
            Target::Local(h) => h.write(epoch, offset, buf),
            Target::Remote(r) => r.write_blocking(epoch, offset, buf),
        }
    }

    fn zero(&self, epoch: u64, offset: u64, len: u64) -> Result<(), ReplicaError> {
        match self {
            Target::Local(h) => h.zero_range(epoch, offset, len),
            Target::Remote(r) => r.zero_blocking(epoch, offset, len),
        }
    }

    fn flush(&self, epoch: u64) -> Result<(), ReplicaError> {
        match self {
            Target::Local(h) => h.flush(epoch),
            Target::Remote(r) => r.flush_blocking(epoch),
        }
    }

    fn checksums(
        &self,
        rt: &tokio::runtime::Handle,
        epoch: u64,
        first: u64,
        count: u64,
    ) -> Result<Vec<Option<u32>>, ReplicaError> {
        match self {
            Target::Local(h) => h.checksums(epoch, first, count),
            Target::Remote(r) => rt.block_on(r.checksums(epoch, first, count)),
        }
    }

    fn allocation(
        &self,
        rt: &tokio::runtime::Handle,
        epoch: u64,
        first: u64,
        count: u64,
    ) -> Result<Vec<bool>, ReplicaError> {
        match self {
            Target::Local(h) => h.allocation(epoch, first, count),
            Target::Remote(r) => rt.block_on(r.allocation(epoch, first, count)),
        }
    }
}
