//! Snapshots of one replica: freezing the head as a snapshot's layer,
//! reading a snapshot, deleting one (merging its layer into the next),
//! reverting the head to one, and the questions space accounting and
//! backups ask (what a snapshot alone holds, which extents changed
//! between two).
//!
//! Every operation here changes the layers' shape, so it runs with the
//! replica's I/O stopped (`free_gate` write-held): in-flight I/O drains
//! first, which is what makes a snapshot a single point of this replica's
//! write order. The engine orders the same point across replicas.
//!
//! Crash safety without log records (see `commit`):
//! - Taking a snapshot makes the data and map durable, then writes the
//!   new chain in one sled insert and commits it.
//! - Deleting a snapshot merges its layer `L` into the next layer `S`,
//!   extent by extent, in batches: blocks `S` lacks are copied into
//!   `S`'s extent (or the version moves to `S` whole when `S` has none);
//!   the data is synced, then the map change is committed; only then is
//!   `L`'s extent zeroed, synced, dropped from the map (committed) and
//!   released. A crash at any point leaves every surviving view intact
//!   and the deletion resumable. Time and copying are proportional to the
//!   extents the snapshot holds, never to the volume's size; each extent
//!   copied frees one.
//! - Revert builds the new head as a layer outside the chain, switches
//!   the chain to it in one insert, then frees the old head; whatever a
//!   crash leaves outside the chain is zeroed and freed at start.

use std::collections::BTreeSet;

use super::layers::{self, Backing, Chain, LayerId, Run, SnapshotId, Version, BLOCK};
use super::{meta_err, LocalReplica, ReplicaError};
use crate::pool::{ExtentAddr, IO_ALIGN};
use crate::sys::AlignedBuf;

/// Snapshots one volume may have (Portworx allows 64).
pub const MAX_SNAPSHOTS: usize = 1024;

/// Extents merged per batch of a snapshot deletion; I/O waits at most for
/// one batch.
const MERGE_BATCH: usize = 64;

/// One snapshot as this replica holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotSpace {
    pub id: SnapshotId,
    /// Pool space of the extents the snapshot's layer holds.
    pub held_bytes: u64,
    /// What deleting it would free (nothing newer shares it).
    pub exclusive_bytes: u64,
}

impl LocalReplica {
    /// Freezes the head as snapshot `id`: every write this replica
    /// completed before is in it, none that starts after. Idempotent.
    pub fn take_snapshot(&self, id: SnapshotId) -> Result<(), ReplicaError> {
        let _one = self.snapshot_ops.lock().expect("snapshot ops lock");
        let _gate = self.free_gate.write().expect("free gate");
        let mut chain = self.chain.read().expect("chain lock").clone();
        if chain.layer_of(id).is_some() {
            return Ok(());
        }
        let base = chain.layer_of(super::clone::BASE_ID).is_some() as usize;
        if chain.snapshots.len() - base >= MAX_SNAPSHOTS {
            return Err(ReplicaError::TooManySnapshots(self.volume));
        }
        // The snapshot is a flush point: its data and map are durable.
        self.pool.sync()?;
        chain.snapshots.push((chain.head, id));
        chain.head = chain.next;
        chain.next += 1;
        let before = self
            .tree
            .insert(layers::CHAIN_KEY, chain.encode())
            .map_err(meta_err)?;
        if let Err(e) = self.meta.commit() {
            // Keep sled's chain what the replica serves by.
            let _ = match before {
                Some(v) => self.tree.insert(layers::CHAIN_KEY, v).map(|_| ()),
                None => self.tree.remove(layers::CHAIN_KEY).map(|_| ()),
            };
            return Err(meta_err(e));
        }
        self.map_dirty
            .store(false, std::sync::atomic::Ordering::Release);
        *self.chain.write().expect("chain lock") = chain;
        Ok(())
    }

    /// The snapshots this replica holds, oldest first (a clone's base
    /// layer is none of them).
    pub fn snapshot_ids(&self) -> Vec<SnapshotId> {
        let chain = self.chain.read().expect("chain lock");
        chain
            .snapshots
            .iter()
            .map(|s| s.1)
            .filter(|s| *s != super::clone::BASE_ID)
            .collect()
    }

    pub(super) fn layer(&self, id: SnapshotId) -> Result<LayerId, ReplicaError> {
        self.chain
            .read()
            .expect("chain lock")
            .layer_of(id)
            .filter(|_| id != super::clone::BASE_ID)
            .ok_or(ReplicaError::NoSnapshot {
                volume: self.volume,
                snapshot: id,
            })
    }

    /// Reads snapshot `id` (same alignment rules as [`LocalReplica::read`]).
    pub fn read_snapshot(
        &self,
        id: SnapshotId,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), ReplicaError> {
        let layer = self.layer(id)?;
        self.read_layer(Some(layer), offset, buf)
    }

    /// Whether snapshot `id` reads anything but zeros-by-absence from
    /// extent `e` (a clone's origin included).
    pub fn snapshot_has_data(&self, id: SnapshotId, e: u64) -> Result<bool, ReplicaError> {
        Ok(self.view_has_data(e, self.layer(id)?))
    }

    /// crc32 of extent `e` of snapshot `id` (read whole), `None` when it
    /// reads as zeros by absence: what [`LocalReplica::extent_checksum`]
    /// is for the head.
    pub fn snapshot_extent_checksum(
        &self,
        id: SnapshotId,
        e: u64,
    ) -> Result<Option<u32>, ReplicaError> {
        if !self.snapshot_has_data(id, e)? {
            return Ok(None);
        }
        let es = self.pool.extent_size as usize;
        let mut buf = AlignedBuf::new(es, IO_ALIGN);
        self.read_snapshot(id, e * es as u64, buf.as_mut_slice())?;
        Ok(Some(crc32fast::hash(buf.as_slice())))
    }

    /// Space of each snapshot: what its layer holds, and what deleting it
    /// would free (its extents the next layer also has a version of; the
    /// others would move to that layer).
    pub fn snapshot_space(&self) -> Vec<SnapshotSpace> {
        let _gate = self.free_gate.read().expect("free gate");
        let chain = self.chain.read().expect("chain lock").clone();
        let l = self.layers.read().expect("layers lock");
        let es = self.pool.extent_size;
        chain
            .snapshots
            .iter()
            .filter(|s| s.1 != super::clone::BASE_ID)
            .map(|(layer, id)| {
                let next = chain.successor(*layer);
                let (mut held, mut exclusive) = (0u64, 0u64);
                for e in l.members(*layer) {
                    let stack = l.stack(e);
                    let Some(mine) = stack.iter().find(|v| v.layer == *layer) else {
                        continue;
                    };
                    if mine.addr().is_some() {
                        held += es;
                        if stack.iter().any(|v| v.layer == next) {
                            exclusive += es;
                        }
                    }
                }
                SnapshotSpace {
                    id: *id,
                    held_bytes: held,
                    exclusive_bytes: exclusive,
                }
            })
            .collect()
    }

    /// Logical extents whose content may differ between snapshot `from`
    /// (`None`: an empty volume) and snapshot `to` (`None`: the head),
    /// from the map alone: the extents of every layer in `(from, to]`.
    pub fn changed_extents(
        &self,
        from: Option<SnapshotId>,
        to: Option<SnapshotId>,
    ) -> Result<Vec<u64>, ReplicaError> {
        let lo = from.map(|s| self.layer(s)).transpose()?;
        let hi = match to {
            Some(s) => self.layer(s)?,
            None => self.head(),
        };
        let l = self.layers.read().expect("layers lock");
        let mut out = BTreeSet::new();
        for layer in l.layers() {
            if layer <= hi && lo.is_none_or(|lo| layer > lo) {
                out.extend(l.members(layer));
            }
        }
        Ok(out.into_iter().collect())
    }

    /// Deletes snapshot `id`, freeing exactly the space nothing else
    /// needs; idempotent (an unknown snapshot is already deleted).
    pub fn delete_snapshot(&self, id: SnapshotId) -> Result<(), ReplicaError> {
        let _one = self.snapshot_ops.lock().expect("snapshot ops lock");
        if id == super::clone::BASE_ID || !self.pins.lock().expect("pins lock").begin_delete(id) {
            return Err(ReplicaError::Pinned {
                volume: self.volume,
                snapshot: id,
            });
        }
        let r = (|| {
            self.settle()?;
            let Some(layer) = self.chain.read().expect("chain lock").layer_of(id) else {
                return Ok(());
            };
            self.delete_layer(layer)?;
            self.fold_base()
        })();
        self.pins.lock().expect("pins lock").end_delete(id);
        r
    }

    /// A filled clone with no snapshots of its own left merges its base
    /// layer into the head (the caller holds `snapshot_ops`), so it holds
    /// one version per extent like any volume.
    pub(super) fn fold_base(&self) -> Result<(), ReplicaError> {
        let base = {
            let c = self.chain.read().expect("chain lock");
            match c.snapshots.as_slice() {
                [(layer, id)] if *id == super::clone::BASE_ID => *layer,
                _ => return Ok(()),
            }
        };
        if self.has_origin() {
            return Ok(());
        }
        self.delete_layer(base)
    }

    /// Merges `layer` into the next one and drops it from the chain.
    fn delete_layer(&self, layer: LayerId) -> Result<(), ReplicaError> {
        loop {
            let batch: Vec<u64> = {
                let l = self.layers.read().expect("layers lock");
                l.members(layer).take(MERGE_BATCH).collect()
            };
            if batch.is_empty() {
                break;
            }
            if self.merge(layer, &batch)? == 0 {
                return Err(ReplicaError::Meta(format!(
                    "layer {layer} lists extents it holds no version of"
                )));
            }
        }
        let _gate = self.free_gate.write().expect("free gate");
        if self.layers.read().expect("layers lock").member_count(layer) > 0 {
            return Err(ReplicaError::Meta(format!(
                "layer {layer} still holds extents after its merge"
            )));
        }
        let mut chain = self.chain.read().expect("chain lock").clone();
        chain.snapshots.retain(|s| s.0 != layer);
        self.tree
            .insert(layers::CHAIN_KEY, chain.encode())
            .map_err(meta_err)?;
        self.meta.commit().map_err(meta_err)?;
        *self.chain.write().expect("chain lock") = chain;
        Ok(())
    }

    /// Merges the versions of `layer` in `extents` into the next layer.
    /// Returns how many it merged.
    fn merge(&self, layer: LayerId, extents: &[u64]) -> Result<usize, ReplicaError> {
        let _gate = self.free_gate.write().expect("free gate");
        let next = self.chain.read().expect("chain lock").successor(layer);
        let blocks = self.blocks();
        let mut moved = sled::Batch::default();
        let mut dropped = sled::Batch::default();
        let mut stacks = Vec::new();
        let mut victims = Vec::new();
        {
            let l = self.layers.read().expect("layers lock");
            for &e in extents {
                let mut stack = l.stack(e);
                let Some(i) = stack.iter().position(|v| v.layer == layer) else {
                    continue;
                };
                let mine = stack.remove(i);
                match stack.iter().position(|v| v.layer == next) {
                    None => {
                        // The next layer sees this version whole: it moves.
                        let v = Version {
                            layer: next,
                            ..mine
                        };
                        moved.remove(layers::key(layer, e));
                        moved.insert(layers::key(next, e), layers::value(&v));
                        stack.insert(i, v);
                    }
                    Some(j) => {
                        if let Some(bits) = stack[j].bits.clone() {
                            // Copy what the next layer reads from this one.
                            let Backing::Extent(dst) = stack[j].backing else {
                                return Err(ReplicaError::Meta("a partial whiteout".into()));
                            };
                            let mut merged = bits.clone();
                            let mut run: Option<(u32, u32)> = None;
                            for b in 0..=blocks {
                                let take = b < blocks && !bits.get(b) && mine.holds(b);
                                match (&mut run, take) {
                                    (Some((_, n)), true) => *n += 1,
                                    (None, true) => run = Some((b, 1)),
                                    (Some((f, n)), false) => {
                                        self.copy_blocks(mine.addr(), dst, *f, *n)?;
                                        merged.set_range(*f, *n);
                                        run = None;
                                    }
                                    (None, false) => {}
                                }
                            }
                            stack[j].bits = (!merged.is_full(blocks)).then_some(merged);
                            moved.insert(layers::key(next, e), layers::value(&stack[j]));
                        }
                        victims.extend(mine.addr().map(|a| (e, a)));
                        dropped.remove(layers::key(layer, e));
                    }
                }
                stacks.push((e, stack));
            }
        }
        self.pool.sync()?;
        self.structural(moved)?;
        // The next layer reads what it needs from its own versions now.
        let merged = stacks.len();
        {
            let mut l = self.layers.write().expect("layers lock");
            for (e, stack) in stacks {
                l.store(e, stack);
            }
        }
        // Nothing reads the victims any more: zero them before they leave
        // the map, so a free extent always reads as zeros.
        let addrs: Vec<ExtentAddr> = victims.iter().map(|v| v.1).collect();
        let finish = || {
            for a in &addrs {
                self.pool.zero(*a, 0, self.pool.extent_size)?;
            }
            self.pool.sync()?;
            self.structural(dropped)
        };
        if let Err(e) = finish() {
            // Outside the layers in memory already: freed by a later settle.
            let mut orphans = self.orphans.lock().expect("orphans lock");
            orphans.extend(victims.iter().map(|(e, a)| (layer, *e, Some(*a))));
            return Err(e);
        }
        self.release(&addrs);
        Ok(merged)
    }

    /// Copies blocks `[first, first + count)` from `src` (`None`: zeros)
    /// into the same blocks of `dst`.
    fn copy_blocks(
        &self,
        src: Option<ExtentAddr>,
        dst: ExtentAddr,
        first: u32,
        count: u32,
    ) -> Result<(), ReplicaError> {
        let (at, len) = (first as u64 * BLOCK, count as u64 * BLOCK);
        match src {
            None => self.pool.zero(dst, at, len)?,
            Some(src) => {
                let mut buf = AlignedBuf::new(len as usize, IO_ALIGN);
                self.pool.read(src, at, buf.as_mut_slice())?;
                self.pool.write(dst, at, buf.as_slice())?;
            }
        }
        Ok(())
    }

    /// Makes the head read exactly as snapshot `id` (the volume is
    /// detached: the caller fences every engine first). Later snapshots
    /// stay as they are. Copies the extents that changed since the
    /// snapshot, so the cost is proportional to that change.
    ///
    /// Steps: allocate the new head's extents; record them as a layer
    /// outside the chain, with the chain's next layer id moved past it
    /// (so no later layer takes its id), in one durable batch; copy the
    /// snapshot's data in; switch the chain to it in one durable insert;
    /// free the old head. Before the recording a failure gives the
    /// extents back; after it they are left to [`LocalReplica::settle`]
    /// (a restart finds them outside the chain). When the switch itself
    /// fails nothing is freed: which head is durable is known only to the
    /// next start.
    pub fn revert(&self, id: SnapshotId) -> Result<(), ReplicaError> {
        let _one = self.snapshot_ops.lock().expect("snapshot ops lock");
        self.settle()?;
        let gate = self.free_gate.write().expect("free gate");
        let target = self.layer(id)?;
        let chain = self.chain.read().expect("chain lock").clone();
        let (old_head, new_head) = (chain.head, chain.next);
        // Extents that newer snapshots hold: the new head masks them with
        // the target's data. What only the old head holds needs nothing
        // (it leaves with the old head; reads fall through to the target).
        let changed: BTreeSet<u64> = {
            let l = self.layers.read().expect("layers lock");
            l.layers()
                .into_iter()
                .filter(|x| *x > target && *x != old_head)
                .flat_map(|x| l.members(x).collect::<Vec<_>>())
                .collect()
        };
        // The new head, outside the chain until it is complete.
        let mut fresh: Vec<(u64, Version)> = Vec::new();
        let give_back = |fresh: &[(u64, Version)]| {
            let addrs: Vec<ExtentAddr> = fresh.iter().filter_map(|f| f.1.addr()).collect();
            self.release(&addrs);
        };
        for &e in &changed {
            let has = self.layers.read().expect("layers lock").has_data(e, target);
            let backing = if has {
                match self.allocate() {
                    Ok(a) => {
                        self.allocated_extents
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        Backing::Extent(a)
                    }
                    Err(err) => {
                        give_back(&fresh);
                        return Err(err);
                    }
                }
            } else {
                Backing::Zeros
            };
            fresh.push((
                e,
                Version {
                    layer: new_head,
                    backing,
                    bits: None,
                },
            ));
        }
        let staged_chain = Chain {
            next: new_head + 1,
            ..chain.clone()
        };
        let mut staged = sled::Batch::default();
        for (e, v) in &fresh {
            staged.insert(layers::key(new_head, *e), layers::value(v));
        }
        staged.insert(layers::CHAIN_KEY, staged_chain.encode());
        // Recorded (outside the chain) before any data lands in them, so a
        // crash leaves them to be zeroed and freed at start.
        if let Err(err) = self.structural(staged) {
            // Perhaps applied: freed only through the orphans.
            self.orphan(new_head, &fresh);
            *self.chain.write().expect("chain lock") = staged_chain;
            return Err(err);
        }
        *self.chain.write().expect("chain lock") = staged_chain;
        if let Err(err) = self.fill(target, &fresh) {
            self.orphan(new_head, &fresh);
            return Err(err);
        }
        let switched = Chain {
            head: new_head,
            next: new_head + 1,
            snapshots: chain.snapshots.clone(),
        };
        let mut switch = sled::Batch::default();
        switch.insert(layers::CHAIN_KEY, switched.encode());
        if let Err(err) = self.structural(switch) {
            tracing::error!(volume = %self.volume, error = %err, "a revert could not switch the head; the next start keeps whichever head is durable and frees the other");
            return Err(err);
        }
        *self.chain.write().expect("chain lock") = switched;
        // The old head is outside the chain now: free it.
        let old: Vec<(u64, Option<ExtentAddr>)> = {
            let mut l = self.layers.write().expect("layers lock");
            let members: Vec<u64> = l.members(old_head).collect();
            let mut out = Vec::new();
            for e in members {
                let mut stack = l.stack(e);
                if let Some(i) = stack.iter().position(|v| v.layer == old_head) {
                    out.push((e, stack.remove(i).addr()));
                }
                l.store(e, stack);
            }
            for (e, v) in &fresh {
                let mut stack = l.stack(*e);
                stack.insert(0, v.clone());
                l.store(*e, stack);
            }
            out
        };
        self.orphans
            .lock()
            .expect("orphans lock")
            .extend(old.iter().map(|(e, a)| (old_head, *e, *a)));
        drop(gate);
        // The revert is done; freeing the old head may wait for a later try.
        if let Err(err) = self.settle() {
            tracing::warn!(volume = %self.volume, error = %err, "the old head of a reverted volume is freed later");
        }
        Ok(())
    }

    /// Copies snapshot layer `target`'s data into the new versions `fresh`
    /// and makes it durable.
    fn fill(&self, target: LayerId, fresh: &[(u64, Version)]) -> Result<(), ReplicaError> {
        let mut buf = AlignedBuf::new(self.pool.extent_size as usize, IO_ALIGN);
        let mut runs: Vec<Run> = Vec::new();
        for (e, v) in fresh {
            let Some(dst) = v.addr() else { continue };
            self.layers.read().expect("layers lock").resolve(
                *e,
                target,
                0,
                self.blocks(),
                &mut runs,
            );
            for r in &runs {
                let (at, len) = (r.first as u64 * BLOCK, (r.count as u64 * BLOCK) as usize);
                let part = &mut buf.as_mut_slice()[..len];
                match r.from {
                    None => part.fill(0),
                    Some(src) => self.pool.read(src, at, part)?,
                }
                self.pool.write(dst, at, part)?;
            }
        }
        self.pool.sync()?;
        Ok(())
    }

    /// Hands versions of `layer` (outside the chain) to the orphans.
    fn orphan(&self, layer: LayerId, versions: &[(u64, Version)]) {
        self.orphans
            .lock()
            .expect("orphans lock")
            .extend(versions.iter().map(|(e, v)| (layer, *e, v.addr())));
    }
}

#[cfg(test)]
mod tests;
