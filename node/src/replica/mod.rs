//! A replica: one volume's copy on this node — its extent map, persisted in
//! the node's sled db, and its data in pool extents allocated on first write.
//!
//! Invariants:
//! - A logical extent with no map entry reads as zeros.
//! - A map entry is inserted, and appended to the extent map log (which a
//!   restart after a crash replays, see `commit`), before the data write it
//!   serves is acknowledged, and made durable by [`LocalReplica::flush`]
//!   after the data (pool sync first, then the db), so an acknowledged flush
//!   covers both.
//! - An extent leaves the map only after it was zeroed durably, and returns to
//!   the pool only after the removal is durable (see `pool`'s invariants).
//! - Freeing an extent waits for in-flight I/O of the replica (`free_gate`),
//!   so a write never lands in an extent that was handed to another volume.

pub mod clone;
pub mod commit;
pub mod host;
pub mod layers;
pub mod remote;
pub mod service;
pub mod snapshot;
mod status;
pub mod wire;

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use commit::Meta;
use layers::{Backing, Bits, Chain, LayerId, Layers, Run, Version, BLOCK};

use crate::pool::{ExtentAddr, Pool, PoolError, IO_ALIGN};
use crate::sys::AlignedBuf;
use crate::types::VolumeId;

/// Bound on one I/O to a remote replica: the longest stall an application
/// sees before a replica is declared failed.
pub const IO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// Errors of one replica I/O, mapped to errno by the frontends.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error("pool is full: no space for a new extent")]
    NoSpace,
    #[error("I/O error on the pool: {0}")]
    Io(#[from] io::Error),
    #[error("extent map: {0}")]
    Meta(String),
    /// The request's epoch is older than the newest this replica has seen:
    /// the volume was attached elsewhere since.
    #[error("fenced: epoch {epoch} is older than {fence}; the volume was attached elsewhere")]
    Fenced { epoch: u64, fence: u64 },
    /// The replica was removed from this node.
    #[error("replica {0} is not hosted here")]
    Gone(VolumeId),
    /// A remote replica failed, timed out or could not be reached.
    #[error("remote replica: {0}")]
    Remote(String),
    /// Data failed its checksum.
    #[error("checksum mismatch: {0}")]
    Corrupt(String),
    /// The replica's node went down uncleanly (the kernel restarted) since
    /// this replica last served, so it may lack writes that were
    /// acknowledged but not flushed; it serves nothing until the cluster
    /// stops counting it healthy (to rebuild it) or has no better copy.
    #[error("replica {0} may have lost unflushed writes in an unclean restart of its node; it serves again once rebuilt")]
    Unclean(VolumeId),
    /// A snapshot this replica does not hold (never taken here, or deleted).
    #[error("replica {volume} holds no snapshot {snapshot}")]
    NoSnapshot {
        volume: VolumeId,
        snapshot: layers::SnapshotId,
    },
    #[error("replica {0} already holds the most snapshots a volume may have ({max})", max = snapshot::MAX_SNAPSHOTS)]
    TooManySnapshots(VolumeId),
    /// A snapshot operation this replica's node may not run (yet): its
    /// cluster state does not list the snapshot as one being taken. Says
    /// nothing about the replica's health (an engine does not fault it).
    #[error("snapshot {0} is not being taken according to this node's cluster state (it lags, or the snapshot is already taken or gone)")]
    Unlisted(layers::SnapshotId),
    /// A clone on this node still reads through to the snapshot.
    #[error("snapshot {snapshot} of replica {volume} backs a clone that is still being filled from it on this node")]
    Pinned {
        volume: VolumeId,
        snapshot: layers::SnapshotId,
    },
}

impl ReplicaError {
    pub fn errno(&self) -> i32 {
        match self {
            ReplicaError::NoSpace => libc::ENOSPC,
            ReplicaError::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
            ReplicaError::Meta(_)
            | ReplicaError::Fenced { .. }
            | ReplicaError::Gone(_)
            | ReplicaError::Remote(_)
            | ReplicaError::Corrupt(_)
            | ReplicaError::Unclean(_)
            | ReplicaError::NoSnapshot { .. }
            | ReplicaError::TooManySnapshots(_)
            | ReplicaError::Unlisted(_)
            | ReplicaError::Pinned { .. } => libc::EIO,
        }
    }
}

fn meta_err(e: impl std::fmt::Display) -> ReplicaError {
    ReplicaError::Meta(e.to_string())
}

pub fn tree_name(volume: VolumeId) -> String {
    format!("extents/{volume}")
}

pub struct LocalReplica {
    pub volume: VolumeId,
    pool: Arc<Pool>,
    meta: Arc<Meta>,
    tree: sled::Tree,
    layers: RwLock<Layers>,
    /// The replica's layers; changed only with `free_gate` write-held.
    chain: RwLock<Chain>,
    /// Versions of layers outside the chain found at start (an interrupted
    /// revert or deletion), zeroed and freed by [`LocalReplica::settle`].
    orphans: Mutex<Vec<(LayerId, u64, Option<ExtentAddr>)>>,
    /// Serialises snapshot operations (take, delete, revert) on this
    /// replica: each runs in several steps that assume the layers keep
    /// their shape between them.
    snapshot_ops: Mutex<()>,
    /// Serialises map changes so two writers never allocate one logical
    /// extent twice or store a version's bits out of order.
    alloc_lock: Mutex<()>,
    /// Read-held by every I/O, write-held while extents are freed or the
    /// layers change shape (snapshot, deletion, revert).
    free_gate: RwLock<()>,
    map_dirty: AtomicBool,
    allocated_extents: AtomicU64,
    /// Head extents allocated over a snapshot's data (copy-on-write events
    /// since this daemon started: the first write to each snapshotted
    /// extent).
    pub cow_extents: AtomicU64,
    /// A clone's snapshot it reads through to until filled (see `clone`);
    /// `has_origin` says whether one is stored, `stored_origin` which.
    origin: RwLock<Option<clone::Origin>>,
    stored_origin: Mutex<Option<(VolumeId, layers::SnapshotId)>>,
    has_origin: AtomicBool,
    /// Logical extents the filler has examined.
    fill_done: AtomicU64,
    /// Snapshots clones read through to, with how many: never deleted,
    /// and the replica never destroyed, while any is pinned.
    pins: Mutex<clone::Pins>,
}

/// What a write does in one extent: the extent to write and whether it is
/// the head's partial version (whose bits the write then sets).
#[derive(Clone, Copy)]
struct Target {
    addr: ExtentAddr,
    partial: bool,
}

impl LocalReplica {
    /// Loads the replica's map (creating an empty one), returning the extents
    /// it owns so the caller can claim them in the pool; then the caller
    /// runs [`LocalReplica::settle`].
    pub fn load(
        meta: &Arc<Meta>,
        pool: Arc<Pool>,
        volume: VolumeId,
    ) -> Result<(LocalReplica, Vec<ExtentAddr>), ReplicaError> {
        let tree = meta.db.open_tree(tree_name(volume)).map_err(meta_err)?;
        let blocks = u16::try_from(pool.extent_size / BLOCK)
            .map(u32::from)
            .map_err(|_| ReplicaError::Meta("extent size too large".into()))?;
        let chain = match tree.get(layers::CHAIN_KEY).map_err(meta_err)? {
            Some(v) => Chain::decode(&v).map_err(ReplicaError::Meta)?,
            None => Chain::default(),
        };
        let mut table = Layers::new(blocks);
        let mut stacks: std::collections::BTreeMap<u64, Vec<Version>> = Default::default();
        let mut orphans = Vec::new();
        let mut owned = Vec::new();
        let mut origin = None;
        for kv in tree.iter() {
            let (k, v) = kv.map_err(meta_err)?;
            if k.as_ref() == layers::CHAIN_KEY {
                continue;
            }
            if k.as_ref() == clone::ORIGIN_KEY {
                origin = Some(clone::decode_origin(&v).map_err(ReplicaError::Meta)?);
                continue;
            }
            let (layer, logical) = layers::parse_key(&k)
                .ok_or_else(|| ReplicaError::Meta(format!("bad key length {}", k.len())))?;
            let mut version = layers::parse_value(layer, &v, blocks).map_err(|e| {
                ReplicaError::Meta(format!("logical extent {logical} of layer {layer}: {e}"))
            })?;
            if version.bits.as_ref().is_some_and(|b| b.is_full(blocks)) {
                version.bits = None;
            }
            owned.extend(version.addr());
            if chain.contains(layer) {
                stacks.entry(logical).or_default().push(version);
            } else {
                orphans.push((layer, logical, version.addr()));
            }
        }
        for (e, mut vs) in stacks {
            vs.sort_by_key(|v| std::cmp::Reverse(v.layer));
            table.store(e, vs);
        }
        let n = owned.len() as u64;
        let r = LocalReplica {
            volume,
            pool,
            meta: meta.clone(),
            tree,
            layers: RwLock::new(table),
            chain: RwLock::new(chain),
            orphans: Mutex::new(orphans),
            snapshot_ops: Mutex::new(()),
            alloc_lock: Mutex::new(()),
            free_gate: RwLock::new(()),
            map_dirty: AtomicBool::new(false),
            allocated_extents: AtomicU64::new(n),
            cow_extents: AtomicU64::new(0),
            origin: RwLock::new(None),
            stored_origin: Mutex::new(origin),
            has_origin: AtomicBool::new(origin.is_some()),
            fill_done: AtomicU64::new(0),
            pins: Mutex::new(Default::default()),
        };
        Ok((r, owned))
    }

    /// Frees what an interrupted revert or snapshot deletion left outside
    /// the layer chain; runs after the caller claimed the extents `load`
    /// returned (so none of them is handed out before it is zeroed).
    pub fn settle(&self) -> Result<(), ReplicaError> {
        let orphans = std::mem::take(&mut *self.orphans.lock().expect("orphans lock"));
        if orphans.is_empty() {
            return Ok(());
        }
        let _gate = self.free_gate.write().expect("free gate");
        tracing::info!(volume = %self.volume, versions = orphans.len(), "freeing the remains of an interrupted snapshot operation");
        let addrs: Vec<ExtentAddr> = orphans.iter().filter_map(|o| o.2).collect();
        let r = (|| {
            // A metadata db that cannot commit may still hold what it
            // failed to make durable: nothing is zeroed then.
            self.meta.commit().map_err(meta_err)?;
            for a in &addrs {
                self.pool.zero(*a, 0, self.pool.extent_size)?;
            }
            self.pool.sync()?;
            let mut batch = sled::Batch::default();
            for (layer, e, _) in &orphans {
                batch.remove(layers::key(*layer, *e));
            }
            self.structural(batch)
        })();
        match r {
            Ok(()) => {
                self.release(&addrs);
                Ok(())
            }
            Err(e) => {
                // Every step repeats safely: kept for the next try.
                self.orphans.lock().expect("orphans lock").extend(orphans);
                Err(e)
            }
        }
    }

    pub fn extent_size(&self) -> u64 {
        self.pool.extent_size
    }

    fn blocks(&self) -> u32 {
        (self.pool.extent_size / BLOCK) as u32
    }

    fn head(&self) -> LayerId {
        self.chain.read().expect("chain lock").head
    }

    /// crc32 of logical extent `logical` (read whole), `None` when it is
    /// not allocated (reads as zeros).
    pub fn extent_checksum(&self, logical: u64) -> Result<Option<u32>, ReplicaError> {
        if !self.is_allocated(logical) {
            return Ok(None);
        }
        let es = self.pool.extent_size as usize;
        let mut buf = AlignedBuf::new(es, IO_ALIGN);
        self.read(logical * es as u64, buf.as_mut_slice())?;
        Ok(Some(crc32fast::hash(buf.as_slice())))
    }

    /// Whether the head reads anything but zeros-by-absence from `logical`
    /// (a clone's origin included).
    pub fn is_allocated(&self, logical: u64) -> bool {
        self.view_has_data(logical, self.head())
    }

    /// Pool space the replica holds: its head and all its snapshots.
    pub fn allocated_bytes(&self) -> u64 {
        self.allocated_extents.load(Ordering::Relaxed) * self.pool.extent_size
    }

    /// The head's extent to write `logical` in, allocating (and logging,
    /// see `commit`) a version if the head has none: a full one when no
    /// snapshot holds data there, else a partial one over the snapshot's.
    fn prepare(&self, logical: u64, head: LayerId) -> Result<Target, ReplicaError> {
        if let Some(t) = self.target(logical, head) {
            return Ok(t);
        }
        let _g = self.alloc_lock.lock().expect("alloc lock");
        if let Some(t) = self.target(logical, head) {
            return Ok(t);
        }
        // A clone copies its origin's data first (maybe into the head).
        if self.fill_locked(&[logical])? > 0 {
            if let Some(t) = self.target(logical, head) {
                return Ok(t);
            }
        }
        let mut stack = self.layers.read().expect("layers lock").stack(logical);
        // Whether the head reads anything but zeros here today: if not, a
        // fresh (zeroed) extent is already its whole content.
        let over_data = stack.first().is_some_and(|v| v.backing != Backing::Zeros);
        let addr = self.allocate()?;
        let version = Version {
            layer: head,
            backing: Backing::Extent(addr),
            bits: over_data.then(|| Bits::empty(self.blocks())),
        };
        if let Err(e) = self
            .tree
            .insert(layers::key(head, logical), layers::value(&version))
        {
            self.pool.release(&[addr]);
            return Err(meta_err(e));
        }
        // Survives a crash of this process before sled's next flush.
        let logged = if over_data {
            self.meta.log_partial(
                self.volume,
                head,
                logical,
                addr.pack(),
                self.blocks() as u16,
            )
        } else {
            self.meta.log_map(self.volume, head, logical, addr.pack())
        };
        if let Err(e) = logged {
            // Put back what the head had (a whiteout), or nothing.
            let _ = match stack.first().filter(|v| v.layer == head) {
                Some(v) => self
                    .tree
                    .insert(layers::key(head, logical), layers::value(v))
                    .map(|_| ()),
                None => self.tree.remove(layers::key(head, logical)).map(|_| ()),
            };
            self.pool.release(&[addr]);
            return Err(ReplicaError::Meta(format!("extent map log: {e}")));
        }
        self.map_dirty.store(true, Ordering::Release);
        // A head whiteout is replaced, anything older stays below.
        if stack.first().is_some_and(|v| v.layer == head) {
            stack.remove(0);
        }
        stack.insert(0, version);
        self.layers
            .write()
            .expect("layers lock")
            .store(logical, stack);
        self.allocated_extents.fetch_add(1, Ordering::Relaxed);
        if over_data {
            self.cow_extents.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Target {
            addr,
            partial: over_data,
        })
    }

    /// A fresh (zeroed) pool extent; a full pool is [`ReplicaError::NoSpace`].
    fn allocate(&self) -> Result<ExtentAddr, ReplicaError> {
        self.pool.allocate().map_err(|e| match e {
            PoolError::Full => ReplicaError::NoSpace,
            other => ReplicaError::Meta(other.to_string()),
        })
    }

    /// The head's own extent for `logical`, if it has one.
    fn target(&self, logical: u64, head: LayerId) -> Option<Target> {
        let (addr, partial) = self
            .layers
            .read()
            .expect("layers lock")
            .head_extent(logical, head)?;
        Some(Target { addr, partial })
    }

    /// Adds blocks `[first, first + count)` to the head's partial version
    /// of `logical` once their data is written (so a read never takes a
    /// block from the head before it holds the data).
    fn mark(
        &self,
        logical: u64,
        head: LayerId,
        first: u32,
        count: u32,
    ) -> Result<(), ReplicaError> {
        let held = |l: &Layers| l.head_holds(logical, head, first, count);
        if held(&self.layers.read().expect("layers lock")) {
            return Ok(());
        }
        let _g = self.alloc_lock.lock().expect("alloc lock");
        let mut stack = self.layers.read().expect("layers lock").stack(logical);
        let Some(top) = stack.first_mut().filter(|v| v.layer == head) else {
            return Ok(());
        };
        let addr = top.addr().map_or(0, ExtentAddr::pack);
        let Some(bits) = top.bits.as_mut() else {
            return Ok(());
        };
        if !bits.set_range(first, count) {
            return Ok(());
        }
        let blocks = self.blocks();
        let full = bits.is_full(blocks);
        if full {
            top.bits = None;
        }
        self.tree
            .insert(layers::key(head, logical), layers::value(top))
            .map_err(meta_err)?;
        let logged = if full {
            self.meta.log_map(self.volume, head, logical, addr)
        } else {
            self.meta
                .log_bits(self.volume, head, logical, first, count, blocks as u16)
        };
        logged.map_err(|e| ReplicaError::Meta(format!("extent map log: {e}")))?;
        self.map_dirty.store(true, Ordering::Release);
        self.layers
            .write()
            .expect("layers lock")
            .store(logical, stack);
        Ok(())
    }

    /// Calls `f(logical extent, offset within it, range of the buffer)` for
    /// each extent-sized piece of `[offset, offset+len)`, stopping at the
    /// first error.
    fn each_piece(
        &self,
        offset: u64,
        len: usize,
        mut f: impl FnMut(u64, u64, std::ops::Range<usize>) -> Result<(), ReplicaError>,
    ) -> Result<(), ReplicaError> {
        let es = self.pool.extent_size;
        let mut pos = 0usize;
        while pos < len {
            let abs = offset + pos as u64;
            let (logical, within) = (abs / es, abs % es);
            let n = ((es - within) as usize).min(len - pos);
            f(logical, within, pos..pos + n)?;
            pos += n;
        }
        Ok(())
    }

    fn aligned(offset: u64, buf: &[u8]) -> bool {
        offset.is_multiple_of(IO_ALIGN as u64)
            && buf.len().is_multiple_of(IO_ALIGN)
            && (buf.as_ptr() as usize).is_multiple_of(IO_ALIGN)
    }

    /// Reads into `buf`. Fast path: offset, length and buffer aligned to
    /// 4 KiB; anything else goes through a bounce buffer.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ReplicaError> {
        self.read_layer(None, offset, buf)
    }

    /// Reads the view of `layer` (`None`: the head).
    fn read_layer(
        &self,
        layer: Option<LayerId>,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), ReplicaError> {
        if !Self::aligned(offset, buf) {
            let (start, blen) = Self::bounce_range(offset, buf.len());
            let mut tmp = AlignedBuf::new(blen, IO_ALIGN);
            self.read_layer(layer, start, tmp.as_mut_slice())?;
            let skip = (offset - start) as usize;
            buf.copy_from_slice(&tmp.as_slice()[skip..skip + buf.len()]);
            return Ok(());
        }
        let _gate = self.free_gate.read().expect("free gate");
        let at = layer.unwrap_or_else(|| self.head());
        let mut runs: Vec<Run> = Vec::new();
        self.each_piece(offset, buf.len(), |logical, within, range| {
            let dst = &mut buf[range];
            let first = (within / BLOCK) as u32;
            let count = (dst.len() as u64 / BLOCK) as u32;
            let (whole, through) = {
                let l = self.layers.read().expect("layers lock");
                let whole = l.whole(logical, at);
                if whole.is_none() {
                    l.resolve(logical, at, first, count, &mut runs);
                }
                // Decided under the same lock as `whole`: a copy stored
                // after it reads as the origin does anyway.
                let through = whole == Some(None) && self.has_origin() && l.is_empty(logical);
                (whole, through)
            };
            match whole {
                Some(None) if through => {
                    return self.read_origin(logical, within, dst);
                }
                Some(None) => {
                    dst.fill(0);
                    return Ok(());
                }
                Some(Some(addr)) => return Ok(self.pool.read(addr, within, dst)?),
                None => {}
            }
            for r in &runs {
                let s = ((r.first - first) as u64 * BLOCK) as usize;
                let part = &mut dst[s..s + (r.count as u64 * BLOCK) as usize];
                match r.from {
                    None => part.fill(0),
                    Some(addr) => self.pool.read(addr, r.first as u64 * BLOCK, part)?,
                }
            }
            Ok(())
        })
    }

    /// Writes `buf`; same alignment rules as [`LocalReplica::read`]. An
    /// extent allocated for it is in the extent map log before this
    /// returns, so an acknowledged write survives a daemon crash.
    ///
    /// All-or-nothing on a full pool: every extent the write needs is
    /// allocated before any byte is written, so [`ReplicaError::NoSpace`]
    /// means the replica's data did not change (an extent allocated before
    /// the pool ran out reads as what it read before). The engine relies on
    /// it to keep replicas equal when every one of them is full.
    pub fn write(&self, offset: u64, buf: &[u8]) -> Result<(), ReplicaError> {
        if !Self::aligned(offset, buf) {
            return self.write_unaligned(offset, buf);
        }
        let _gate = self.free_gate.read().expect("free gate");
        let head = self.head();
        self.each_piece(offset, buf.len(), |logical, _, _| {
            self.prepare(logical, head).map(|_| ())
        })?;
        self.each_piece(offset, buf.len(), |logical, within, range| {
            let t = self.prepare(logical, head)?;
            let len = range.len() as u64;
            self.pool.write(t.addr, within, &buf[range])?;
            if t.partial {
                self.mark(logical, head, (within / BLOCK) as u32, (len / BLOCK) as u32)?;
            }
            Ok(())
        })
    }

    fn bounce_range(offset: u64, len: usize) -> (u64, usize) {
        let a = IO_ALIGN as u64;
        let start = offset / a * a;
        let end = (offset + len as u64).div_ceil(a) * a;
        (start, (end - start) as usize)
    }

    /// Read-modify-write of the covering aligned range. Clients that send
    /// unaligned writes (NBD) are told the 4 KiB minimum block size and
    /// serialise their own overlapping requests; the loop device never does.
    fn write_unaligned(&self, offset: u64, buf: &[u8]) -> Result<(), ReplicaError> {
        let (start, blen) = Self::bounce_range(offset, buf.len());
        let mut tmp = AlignedBuf::new(blen, IO_ALIGN);
        let skip = (offset - start) as usize;
        let head_partial = skip != 0;
        let tail_partial = !(skip + buf.len()).is_multiple_of(IO_ALIGN);
        if head_partial || tail_partial {
            self.read(start, tmp.as_mut_slice())?;
        }
        tmp.as_mut_slice()[skip..skip + buf.len()].copy_from_slice(buf);
        self.write(start, tmp.as_slice())
    }

    /// Makes `[offset, offset+len)` read as zeros. Whole extents are freed
    /// back to the pool (thin provisioning) or, where a snapshot still
    /// holds data, shadowed by a whiteout; partial ranges of the head's
    /// own full extents are zeroed in place, others written with zeros.
    pub fn zero_range(&self, offset: u64, len: u64) -> Result<(), ReplicaError> {
        let es = self.pool.extent_size;
        let mut whole = Vec::new();
        let mut pos = 0u64;
        while pos < len {
            let abs = offset + pos;
            let (logical, within) = (abs / es, abs % es);
            let n = (es - within).min(len - pos);
            if within == 0 && n == es {
                whole.push(logical);
            } else if self.is_allocated(logical) {
                let a = IO_ALIGN as u64;
                let (s, e) = (within.div_ceil(a) * a, (within + n) / a * a);
                if s < e {
                    let gate = self.free_gate.read().expect("free gate");
                    let in_place = self
                        .layers
                        .read()
                        .expect("layers lock")
                        .writable(logical, self.head());
                    match in_place {
                        Some(addr) => self.pool.zero(addr, s, e - s)?,
                        None => {
                            drop(gate);
                            let zeros = AlignedBuf::new((e - s) as usize, IO_ALIGN);
                            self.write(logical * es + s, zeros.as_slice())?;
                        }
                    }
                }
                // Unaligned edges are written with zeros through the normal path.
                let edges = [(within, s.min(within + n)), (e.max(within), within + n)];
                for (from, to) in edges {
                    if from < to {
                        let zeros = vec![0u8; (to - from) as usize];
                        self.write(logical * es + from, &zeros)?;
                    }
                }
            }
            pos += n;
        }
        if !whole.is_empty() {
            self.free_extents(&whole)?;
        }
        Ok(())
    }

    /// Makes whole logical extents of the head read as zeros: the head's
    /// own extents are zeroed durably and dropped from the map durably,
    /// then given back to the pool; where a snapshot holds data below, the
    /// head keeps a whiteout instead.
    fn free_extents(&self, logical: &[u64]) -> Result<(), ReplicaError> {
        // A clone's snapshots still reading its origin there get a copy
        // first (the head then shadows it); checked again with I/O stopped,
        // since a snapshot may be taken in between.
        let needs_copy = |r: &LocalReplica| {
            r.has_origin()
                && r.chain.read().expect("chain lock").snapshots.len() > 1
                && logical.iter().any(|e| {
                    r.layers.read().expect("layers lock").is_empty(*e) && r.origin_has_data(*e)
                })
        };
        let _gate = loop {
            if needs_copy(self) {
                let _gate = self.free_gate.read().expect("free gate");
                let _g = self.alloc_lock.lock().expect("alloc lock");
                for chunk in logical.chunks(clone::FILL_BATCH) {
                    self.fill_locked(chunk)?;
                }
            }
            let gate = self.free_gate.write().expect("free gate");
            if !needs_copy(self) {
                break gate;
            }
        };
        let head = self.head();
        // (logical, new stack, extent freed)
        let mut changes: Vec<(u64, Vec<Version>, Option<ExtentAddr>)> = Vec::new();
        {
            let l = self.layers.read().expect("layers lock");
            for e in logical {
                let mut stack = l.stack(*e);
                let own = stack.first().filter(|v| v.layer == head).cloned();
                if own.is_some() {
                    stack.remove(0);
                }
                let below_data = match stack.first() {
                    Some(v) => v.backing != Backing::Zeros,
                    None => self.origin_has_data(*e),
                };
                let freed = own.as_ref().and_then(|v| v.addr());
                if below_data {
                    if own.as_ref().is_some_and(|v| v.backing == Backing::Zeros) {
                        continue;
                    }
                    stack.insert(
                        0,
                        Version {
                            layer: head,
                            backing: Backing::Zeros,
                            bits: None,
                        },
                    );
                } else if own.is_none() {
                    continue;
                }
                changes.push((*e, stack, freed));
            }
        }
        if changes.is_empty() {
            return Ok(());
        }
        let freed: Vec<ExtentAddr> = changes.iter().filter_map(|c| c.2).collect();
        for addr in &freed {
            self.pool.zero(*addr, 0, self.pool.extent_size)?;
        }
        self.pool.sync()?;
        let mut batch = sled::Batch::default();
        for (e, stack, _) in &changes {
            // Logged first, so a replay never maps what sled dropped.
            let whiteout = stack.first().is_some_and(|v| v.layer == head);
            let logged = if whiteout {
                batch.insert(layers::key(head, *e), layers::value(&stack[0]));
                self.meta.log_map(self.volume, head, *e, 0)
            } else {
                batch.remove(layers::key(head, *e));
                self.meta.log_unmap(self.volume, head, *e)
            };
            logged.map_err(|e| ReplicaError::Meta(format!("extent map log: {e}")))?;
        }
        self.tree.apply_batch(batch).map_err(meta_err)?;
        self.meta.commit().map_err(meta_err)?;
        {
            let mut l = self.layers.write().expect("layers lock");
            for (e, stack, _) in changes {
                l.store(e, stack);
            }
        }
        self.release(&freed);
        Ok(())
    }

    /// Returns extents (zeroed, and no longer in any durable map) to the pool.
    fn release(&self, addrs: &[ExtentAddr]) {
        self.allocated_extents
            .fetch_sub(addrs.len() as u64, Ordering::Relaxed);
        self.pool.release(addrs);
    }

    /// A change of the map that frees or moves extents, with I/O stopped
    /// (`free_gate` write-held by the caller): commit first, so no logged
    /// change of this replica is left to replay over it, then apply the
    /// batch atomically and commit it.
    fn structural(&self, batch: sled::Batch) -> Result<(), ReplicaError> {
        self.meta.commit().map_err(meta_err)?;
        self.tree.apply_batch(batch).map_err(meta_err)?;
        self.meta.commit().map_err(meta_err)
    }

    /// Durability point: every acknowledged write and map change is on
    /// stable storage when this returns Ok.
    pub fn flush(&self) -> Result<(), ReplicaError> {
        self.pool.sync()?;
        if self.map_dirty.swap(false, Ordering::AcqRel) {
            if let Err(e) = self.meta.commit() {
                self.map_dirty.store(true, Ordering::Release);
                return Err(ReplicaError::Meta(e.to_string()));
            }
        }
        Ok(())
    }

    /// Deletes the replica: frees all its extents (head, snapshots, and
    /// anything left of an interrupted operation) and drops its map.
    pub fn destroy(&self) -> Result<(), ReplicaError> {
        if let Err(id) = self.pins.lock().expect("pins lock").begin_destroy() {
            return Err(ReplicaError::Pinned {
                volume: self.volume,
                snapshot: id,
            });
        }
        let r = self.destroy_unpinned();
        if r.is_err() {
            self.pins.lock().expect("pins lock").end_destroy();
        }
        r
    }

    fn destroy_unpinned(&self) -> Result<(), ReplicaError> {
        let _gate = self.free_gate.write().expect("free gate");
        self.drop_origin();
        let mut all = self.layers.read().expect("layers lock").extents();
        all.extend(
            std::mem::take(&mut *self.orphans.lock().expect("orphans lock"))
                .into_iter()
                .filter_map(|o| o.2),
        );
        for addr in &all {
            self.pool.zero(*addr, 0, self.pool.extent_size)?;
        }
        self.pool.sync()?;
        self.meta.commit().map_err(meta_err)?;
        self.meta
            .db
            .drop_tree(tree_name(self.volume))
            .map_err(meta_err)?;
        self.meta.commit().map_err(meta_err)?;
        *self.layers.write().expect("layers lock") = Layers::new(self.blocks());
        self.release(&all);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::{DiskSpec, EXTENT_SIZE};
    use crate::types::Id128;

    struct Fixture {
        dir: std::path::PathBuf,
        db: Arc<Meta>,
        pool: Arc<Pool>,
    }

    fn fixture(extents: u64) -> Fixture {
        let dir = std::env::temp_dir().join(format!("cairn-replica-{}", Id128::random()));
        std::fs::create_dir_all(&dir).expect("dir");
        let db = sled::Config::new().path(dir.join("db")).open().expect("db");
        let meta = db.open_tree("pool").expect("tree");
        let spec = DiskSpec::File(dir.join("d.img"), (extents + 1) * EXTENT_SIZE);
        let pool = Arc::new(Pool::open(&meta, Id128::random(), &[spec], false).expect("pool"));
        let db = Arc::new(Meta::open(db, &dir).expect("meta"));
        Fixture { dir, db, pool }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn aligned(len: usize, byte: u8) -> AlignedBuf {
        let mut b = AlignedBuf::new(len, IO_ALIGN);
        b.as_mut_slice().fill(byte);
        b
    }

    #[test]
    fn thin_write_read_zero_and_reload() {
        let f = fixture(8);
        let vol = Id128::random();
        let (r, owned) = LocalReplica::load(&f.db, f.pool.clone(), vol).expect("load");
        assert!(owned.is_empty());
        // Unwritten space reads as zeros and allocates nothing.
        let mut buf = aligned(8192, 0xff);
        r.read(5 * EXTENT_SIZE, buf.as_mut_slice()).expect("read");
        assert!(buf.as_slice().iter().all(|b| *b == 0));
        assert_eq!(r.allocated_bytes(), 0);
        // A write spanning an extent boundary allocates two extents.
        let w = aligned(8192, 0xab);
        r.write(EXTENT_SIZE - 4096, w.as_slice()).expect("write");
        assert_eq!(r.allocated_bytes(), 2 * EXTENT_SIZE);
        r.read(EXTENT_SIZE - 4096, buf.as_mut_slice())
            .expect("read");
        assert!(buf.as_slice().iter().all(|b| *b == 0xab));
        // Unaligned write and read (read-modify-write path).
        r.write(EXTENT_SIZE - 100, &[7u8; 300])
            .expect("unaligned write");
        let mut small = [0u8; 400];
        r.read(EXTENT_SIZE - 150, &mut small)
            .expect("unaligned read");
        assert_eq!(&small[..50], &[0xab; 50][..]);
        assert_eq!(&small[50..350], &[7u8; 300][..]);
        assert_eq!(&small[350..], &[0xab; 50][..]);
        // Partial zeroing keeps the extent, whole-extent zeroing frees it.
        r.zero_range(EXTENT_SIZE, 4096).expect("partial zero");
        assert_eq!(r.allocated_bytes(), 2 * EXTENT_SIZE);
        r.read(EXTENT_SIZE, &mut buf.as_mut_slice()[..4096])
            .expect("read");
        assert!(buf.as_slice()[..4096].iter().all(|b| *b == 0));
        r.zero_range(0, EXTENT_SIZE).expect("whole zero");
        assert_eq!(r.allocated_bytes(), EXTENT_SIZE);
        assert_eq!(f.pool.allocated_bytes(), EXTENT_SIZE);
        r.write(EXTENT_SIZE + 8192, aligned(4096, 0xcd).as_slice())
            .expect("write");
        r.flush().expect("flush");
        drop(r);
        // The map survives a reload; the freed extent stays freed.
        let (r, owned) = LocalReplica::load(&f.db, f.pool.clone(), vol).expect("reload");
        assert_eq!(owned.len(), 1);
        let mut one = aligned(4096, 0);
        r.read(EXTENT_SIZE + 8192, one.as_mut_slice())
            .expect("read");
        assert!(one.as_slice().iter().all(|b| *b == 0xcd));
        r.read(0, one.as_mut_slice()).expect("read");
        assert!(
            one.as_slice().iter().all(|b| *b == 0),
            "a freed extent came back"
        );
        r.destroy().expect("destroy");
        assert_eq!(f.pool.allocated_bytes(), 0);
        assert!(!f
            .db
            .db
            .tree_names()
            .iter()
            .any(|n| n.as_ref() == tree_name(vol).as_bytes()));
    }

    #[test]
    fn full_pool_is_an_error_not_a_silent_drop() {
        let f = fixture(2);
        let (r, _) = LocalReplica::load(&f.db, f.pool.clone(), Id128::random()).expect("load");
        let w = aligned(4096, 1);
        r.write(0, w.as_slice()).expect("first extent");
        // A write that needs the last free extent and one more changes
        // nothing, not even the part that would have fit.
        let e = r
            .write(2 * EXTENT_SIZE - 4096, aligned(8192, 9).as_slice())
            .expect_err("needs two extents, one is free");
        assert!(matches!(e, ReplicaError::NoSpace));
        let mut back = aligned(4096, 0xff);
        r.read(2 * EXTENT_SIZE - 4096, back.as_mut_slice())
            .expect("read");
        assert!(
            back.as_slice().iter().all(|b| *b == 0),
            "a failed write left data behind"
        );
        r.write(EXTENT_SIZE, w.as_slice()).expect("second extent");
        let e = r
            .write(2 * EXTENT_SIZE, w.as_slice())
            .expect_err("pool is full");
        assert!(matches!(e, ReplicaError::NoSpace));
        assert_eq!(e.errno(), libc::ENOSPC);
        // Existing extents still take writes.
        r.write(4096, w.as_slice())
            .expect("write into an allocated extent");
    }
}
