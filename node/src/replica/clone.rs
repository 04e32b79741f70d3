//! Clones: a replica that starts as a copy of a snapshot of another
//! volume's replica on the same node, and serves I/O at once.
//!
//! A clone replica made on a node holding the source snapshot *reads
//! through* to it (its origin): a logical extent of which the clone has no
//! version in any layer reads the origin's data there. A filler copies
//! every extent the origin holds data in, and anything that changes an
//! extent (a write, a trim) copies it first, so an extent with a version
//! never reads the origin again. Once every extent is copied the clone
//! forgets its origin and is independent. Until then the source replica
//! keeps the snapshot *pinned*: it refuses to delete it or to be destroyed
//! (and the cluster state refuses to delete the snapshot), so the origin
//! can never change or vanish under the clone.
//!
//! Where a copy goes: into the head while the clone has no snapshots of
//! its own (the head is then the only view, and writes to the copy take
//! the fast path), else into the clone's base layer below all of them, so
//! every view sees it. Either way an extent that has a version keeps one:
//! a trim leaves a whiteout where the origin has data, a merge moves
//! versions, a revert frees only the old head's.
//!
//! Crash safety: a copy is first mapped in a scratch layer outside the
//! chain (an orphan a start frees), then written and synced, and only then
//! moved to its layer: a crash never leaves a mapped extent that reads
//! other than the origin, nor written data in an extent no map holds.
//!
//! Why copy rather than share the source's pool extents: sharing needs
//! reference counts on every extent and breaks snapshot deletion, which
//! rewrites and frees a layer's extents in place; read-through keeps each
//! extent owned by one replica, makes a clone usable at once and its
//! creation independent of the volume's size, at the price that the
//! filled clone holds its own copy of the data it was made from.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::layers::{self, Backing, Chain, LayerId, SnapshotId, Version};
use super::{meta_err, LocalReplica, ReplicaError};
use crate::pool::{ExtentAddr, IO_ALIGN};
use crate::sys::AlignedBuf;
use crate::types::{Id128, VolumeId};

/// The sled key of a clone's origin (absent once it is filled).
pub const ORIGIN_KEY: &[u8] = b"origin";
const ORIGIN_VERSION: u8 = 1;

/// The layer a clone's copies go to when it has snapshots of its own,
/// listed in the chain as a snapshot with this id that is never shown,
/// deleted or reverted to.
pub const BASE_ID: SnapshotId = Id128(*b"cairn-clone-base");
const BASE_LAYER: LayerId = 0;

/// Copies being written, mapped here until they are synced.
const SCRATCH_LAYER: LayerId = u64::MAX - 1;

/// Extents one fill step copies before one sync.
pub const FILL_BATCH: usize = 8;

/// Snapshots clones read through to, and what no clone may pin any more.
#[derive(Default)]
pub struct Pins {
    count: std::collections::HashMap<SnapshotId, usize>,
    /// Snapshots being deleted.
    deleting: std::collections::HashSet<SnapshotId>,
    /// The replica is being destroyed.
    destroying: bool,
}

impl Pins {
    /// Marks `id` as being deleted unless a clone pins it.
    pub fn begin_delete(&mut self, id: SnapshotId) -> bool {
        if self.count.contains_key(&id) {
            return false;
        }
        self.deleting.insert(id);
        true
    }

    pub fn end_delete(&mut self, id: SnapshotId) {
        self.deleting.remove(&id);
    }

    /// Marks the replica as being destroyed unless a clone pins any of
    /// its snapshots; returns a pinned one otherwise.
    pub fn begin_destroy(&mut self) -> Result<(), SnapshotId> {
        if let Some(id) = self.count.keys().next() {
            return Err(*id);
        }
        self.destroying = true;
        Ok(())
    }

    pub fn end_destroy(&mut self) {
        self.destroying = false;
    }
}

/// The snapshot a clone replica reads through to; unpins it when dropped.
pub struct Origin {
    pub source: Arc<LocalReplica>,
    pub snapshot: SnapshotId,
    layer: LayerId,
}

impl Drop for Origin {
    fn drop(&mut self) {
        let mut pins = self.source.pins.lock().expect("pins lock");
        if let Some(n) = pins.count.get_mut(&self.snapshot) {
            *n -= 1;
            if *n == 0 {
                pins.count.remove(&self.snapshot);
            }
        }
    }
}

/// Where a clone replica stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FillProgress {
    /// Logical extents examined so far (of `span`).
    pub done: u64,
    pub span: u64,
    /// Extents this step copied.
    pub copied: usize,
}

pub fn encode_origin(source: VolumeId, snapshot: SnapshotId) -> Vec<u8> {
    let mut b = vec![ORIGIN_VERSION];
    b.extend(source.0);
    b.extend(snapshot.0);
    b
}

pub fn decode_origin(b: &[u8]) -> Result<(VolumeId, SnapshotId), String> {
    match b.split_first() {
        Some((&ORIGIN_VERSION, rest)) if rest.len() == 32 => Ok((
            Id128(rest[..16].try_into().expect("16 bytes")),
            Id128(rest[16..].try_into().expect("16 bytes")),
        )),
        Some((&v, _)) if v != ORIGIN_VERSION => Err(format!(
            "clone origin record of format version {v}; this daemon reads {ORIGIN_VERSION}"
        )),
        _ => Err(format!(
            "clone origin record of {} bytes is damaged",
            b.len()
        )),
    }
}

impl LocalReplica {
    /// Pins snapshot `id` for a clone reading through to it: refused when
    /// this replica does not hold it, is deleting it or being destroyed.
    /// Never waits for a snapshot operation (a deletion marks itself).
    fn pin(self: &Arc<Self>, id: SnapshotId) -> Result<Origin, ReplicaError> {
        let mut pins = self.pins.lock().expect("pins lock");
        let layer = self.layer(id)?;
        if pins.destroying || pins.deleting.contains(&id) {
            return Err(ReplicaError::NoSnapshot {
                volume: self.volume,
                snapshot: id,
            });
        }
        *pins.count.entry(id).or_insert(0) += 1;
        drop(pins);
        Ok(Origin {
            source: self.clone(),
            snapshot: id,
            layer,
        })
    }

    /// Whether snapshot `id` backs a clone being filled here.
    pub fn is_pinned(&self, id: SnapshotId) -> bool {
        self.pins.lock().expect("pins lock").count.contains_key(&id)
    }

    /// The clone's origin as stored (source volume, snapshot), if any.
    pub fn stored_origin(&self) -> Option<(VolumeId, SnapshotId)> {
        *self.stored_origin.lock().expect("origin lock")
    }

    /// Where the filler stands: extents examined, of how many.
    pub fn fill_position(&self) -> (u64, u64) {
        (self.fill_done.load(Ordering::Relaxed), self.span())
    }

    /// Whether nothing was ever stored for this replica (a new one).
    pub fn is_fresh(&self) -> bool {
        self.tree.iter().next().is_none()
    }

    /// Whether this replica still reads through to an origin.
    pub fn has_origin(&self) -> bool {
        self.has_origin.load(Ordering::Acquire)
    }

    /// Makes this new, empty replica a clone of `source`'s snapshot `id`:
    /// durably records the origin and the base layer, then reads through.
    pub fn init_origin(
        &self,
        source: &Arc<LocalReplica>,
        id: SnapshotId,
    ) -> Result<(), ReplicaError> {
        let _gate = self.free_gate.write().expect("free gate");
        let fresh = self.tree.iter().next().is_none()
            && self.layers.read().expect("layers lock").layers().is_empty();
        if !fresh {
            return Err(ReplicaError::Meta(format!(
                "replica {} already holds data: it cannot become a clone",
                self.volume
            )));
        }
        let origin = source.pin(id)?;
        let chain = Chain {
            head: BASE_LAYER + 1,
            next: BASE_LAYER + 2,
            snapshots: vec![(BASE_LAYER, BASE_ID)],
        };
        let mut batch = sled::Batch::default();
        batch.insert(layers::CHAIN_KEY, chain.encode());
        batch.insert(ORIGIN_KEY, encode_origin(source.volume, id));
        self.tree.apply_batch(batch).map_err(meta_err)?;
        self.meta.commit().map_err(meta_err)?;
        *self.chain.write().expect("chain lock") = chain;
        *self.stored_origin.lock().expect("origin lock") = Some((source.volume, id));
        *self.origin.write().expect("origin lock") = Some(origin);
        self.has_origin.store(true, Ordering::Release);
        Ok(())
    }

    /// At start: connects a loaded clone to its stored origin's replica.
    pub fn attach_origin(&self, source: &Arc<LocalReplica>) -> Result<(), ReplicaError> {
        let Some((vol, id)) = self.stored_origin() else {
            return Ok(());
        };
        if vol != source.volume {
            return Err(ReplicaError::Meta(format!(
                "clone {} reads through to volume {vol}, not {}",
                self.volume, source.volume
            )));
        }
        let origin = source.pin(id)?;
        *self.origin.write().expect("origin lock") = Some(origin);
        Ok(())
    }

    /// Whether the view of `layer` reads data (not zeros) in extent `e`,
    /// through this replica's own origin too.
    pub(super) fn view_has_data(&self, e: u64, layer: LayerId) -> bool {
        let empty = {
            let l = self.layers.read().expect("layers lock");
            if l.has_data(e, layer) {
                return true;
            }
            l.is_empty(e)
        };
        empty && self.origin_has_data(e)
    }

    /// Whether the origin holds data in extent `e` (false without one).
    pub(super) fn origin_has_data(&self, e: u64) -> bool {
        if !self.has_origin() {
            return false;
        }
        match &*self.origin.read().expect("origin lock") {
            Some(o) => o.source.view_has_data(e, o.layer),
            // Unknown: treated as data, so nothing is read as zeros or
            // skipped (reads of it fail).
            None => true,
        }
    }

    /// Reads extent `e` from `within` through the origin.
    pub(super) fn read_origin(
        &self,
        e: u64,
        within: u64,
        buf: &mut [u8],
    ) -> Result<(), ReplicaError> {
        let origin = self.origin.read().expect("origin lock");
        let o = origin.as_ref().ok_or_else(|| self.origin_missing())?;
        o.source
            .read_layer(Some(o.layer), e * self.pool.extent_size + within, buf)
    }

    fn origin_missing(&self) -> ReplicaError {
        let what = self.stored_origin().map_or("?".to_string(), |(v, s)| {
            format!("snapshot {s} of volume {v}")
        });
        ReplicaError::Meta(format!(
            "clone {} is not filled yet and its origin ({what}) is not held on this node",
            self.volume
        ))
    }

    /// Copies the origin's data of those of `extents` that have no version
    /// yet; the caller holds `alloc_lock` and a read of `free_gate`.
    pub(super) fn fill_locked(&self, extents: &[u64]) -> Result<usize, ReplicaError> {
        if !self.has_origin() {
            return Ok(0);
        }
        if self.origin.read().expect("origin lock").is_none() {
            return Err(self.origin_missing());
        }
        let todo: Vec<u64> = extents
            .iter()
            .copied()
            .filter(|e| self.layers.read().expect("layers lock").is_empty(*e))
            .filter(|e| self.origin_has_data(*e))
            .collect();
        if todo.is_empty() {
            return Ok(0);
        }
        let es = self.pool.extent_size;
        let target = {
            let c = self.chain.read().expect("chain lock");
            if c.snapshots.len() == 1 {
                c.head
            } else {
                BASE_LAYER
            }
        };
        let mut copies: Vec<(u64, ExtentAddr)> = Vec::new();
        let r = (|| {
            let mut buf = AlignedBuf::new(es as usize, IO_ALIGN);
            for &e in &todo {
                let addr = self.allocate()?;
                let v = Version {
                    layer: SCRATCH_LAYER,
                    backing: Backing::Extent(addr),
                    bits: None,
                };
                if let Err(err) = self
                    .tree
                    .insert(layers::key(SCRATCH_LAYER, e), layers::value(&v))
                {
                    self.pool.release(&[addr]);
                    return Err(meta_err(err));
                }
                self.allocated_extents.fetch_add(1, Ordering::Relaxed);
                copies.push((e, addr));
                self.meta
                    .log_map(self.volume, SCRATCH_LAYER, e, addr.pack())
                    .map_err(|err| ReplicaError::Meta(format!("extent map log: {err}")))?;
                self.read_origin(e, 0, buf.as_mut_slice())?;
                self.pool.write(addr, 0, buf.as_slice())?;
            }
            self.pool.sync()?;
            let mut batch = sled::Batch::default();
            for &(e, addr) in &copies {
                let v = Version {
                    layer: target,
                    backing: Backing::Extent(addr),
                    bits: None,
                };
                batch.remove(layers::key(SCRATCH_LAYER, e));
                batch.insert(layers::key(target, e), layers::value(&v));
            }
            // In sled before the log, as every map change: a commit between
            // the two makes the batch durable, and the records replay it.
            self.tree.apply_batch(batch).map_err(meta_err)?;
            for &(e, addr) in &copies {
                self.meta
                    .log_unmap(self.volume, SCRATCH_LAYER, e)
                    .and_then(|_| self.meta.log_map(self.volume, target, e, addr.pack()))
                    .map_err(|err| ReplicaError::Meta(format!("extent map log: {err}")))?;
            }
            Ok(())
        })();
        if let Err(err) = r {
            // Written or not, they are zeroed and freed by the next settle
            // (a start finds them in the scratch layer too).
            let mut orphans = self.orphans.lock().expect("orphans lock");
            orphans.extend(copies.iter().map(|(e, a)| (SCRATCH_LAYER, *e, Some(*a))));
            return Err(err);
        }
        self.map_dirty.store(true, Ordering::Release);
        let mut l = self.layers.write().expect("layers lock");
        for &(e, addr) in &copies {
            l.store(
                e,
                vec![Version {
                    layer: target,
                    backing: Backing::Extent(addr),
                    bits: None,
                }],
            );
        }
        Ok(copies.len())
    }

    /// Copies the next extents the origin holds (at most [`FILL_BATCH`]),
    /// from logical extent `from`; returns where to go on, or `None` when
    /// every extent is copied and the origin is forgotten.
    pub fn fill_step(&self, from: u64) -> Result<Option<FillProgress>, ReplicaError> {
        let span = {
            let origin = self.origin.read().expect("origin lock");
            match origin.as_ref() {
                Some(o) => o.source.span(),
                None if self.has_origin() => return Err(self.origin_missing()),
                // A new replica that never became a clone is not filled.
                None if self.is_fresh() => {
                    return Err(ReplicaError::Meta(format!(
                        "replica {} was never made a clone of its origin",
                        self.volume
                    )))
                }
                None => return Ok(None),
            }
        };
        let mut batch = Vec::new();
        let mut e = from;
        while e < span && batch.len() < FILL_BATCH {
            if self.layers.read().expect("layers lock").is_empty(e) && self.origin_has_data(e) {
                batch.push(e);
            }
            e += 1;
        }
        let mut copied = 0;
        if !batch.is_empty() {
            let _gate = self.free_gate.read().expect("free gate");
            let _g = self.alloc_lock.lock().expect("alloc lock");
            copied = self.fill_locked(&batch)?;
        }
        self.fill_done.store(e, Ordering::Relaxed);
        if e < span {
            return Ok(Some(FillProgress {
                done: e,
                span,
                copied,
            }));
        }
        self.finish_origin()?;
        let _one = self.snapshot_ops.lock().expect("snapshot ops lock");
        self.fold_base()?;
        Ok(None)
    }

    /// Logical extents below which every version of this replica (and of
    /// its origin) lies.
    fn span(&self) -> u64 {
        let own = self.layers.read().expect("layers lock").span();
        let below = match &*self.origin.read().expect("origin lock") {
            Some(o) => o.source.span(),
            None => 0,
        };
        own.max(below)
    }

    /// Forgets the origin once no extent reads through to it any more.
    fn finish_origin(&self) -> Result<(), ReplicaError> {
        let _gate = self.free_gate.write().expect("free gate");
        let span = self.span();
        let left = (0..span)
            .filter(|e| self.layers.read().expect("layers lock").is_empty(*e))
            .any(|e| self.origin_has_data(e));
        if left {
            return Err(ReplicaError::Meta(format!(
                "clone {} still reads extents through its origin",
                self.volume
            )));
        }
        // Every copy durable before the origin is dropped durably.
        self.meta.commit().map_err(meta_err)?;
        self.tree.remove(ORIGIN_KEY).map_err(meta_err)?;
        self.meta.commit().map_err(meta_err)?;
        self.has_origin.store(false, Ordering::Release);
        *self.stored_origin.lock().expect("origin lock") = None;
        self.origin.write().expect("origin lock").take();
        tracing::info!(volume = %self.volume, "clone filled: it no longer reads its origin");
        Ok(())
    }

    /// Drops the origin of a replica being destroyed.
    pub(super) fn drop_origin(&self) {
        self.has_origin.store(false, Ordering::Release);
        self.origin.write().expect("origin lock").take();
    }
}
