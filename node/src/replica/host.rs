//! The replicas this node hosts, each behind an epoch fence.
//!
//! Fencing: a replica remembers (durably) the newest epoch it has been
//! opened with and refuses I/O from any older epoch, so once the engine of a
//! new attachment has opened a replica, the engine of the previous one can
//! never change it again. Every I/O holds the fence's read lock from the
//! check to the end of the I/O, and raising the fence takes the write lock:
//! no old-epoch write is still landing when `open` returns.
//!
//! Generations: when this node's kernel restarted since the daemon last ran
//! (power loss, kernel crash), every replica it hosted may lack writes it
//! acknowledged but had not flushed. Such a replica is marked *unclean*
//! (durably) and serves no I/O while the cluster state still counts it
//! healthy beside another healthy copy: the engine's I/O fails on it, the
//! engine records it faulted and reads elsewhere, and the rebuild makes it
//! whole. The mark is dropped once the state shows the replica
//! `rebuilding` (every engine stopped reading it before that), or shows it
//! the only healthy copy (nothing better exists). A daemon crash without a
//! kernel restart loses nothing: its `O_DIRECT` writes reached the device,
//! and a new extent's map entry is in the extent map log (page cache,
//! replayed at start) before the write into it is acknowledged.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};

use super::commit::Meta;
use super::{LocalReplica, ReplicaError};
use crate::cluster::state::{ClusterState, ReplicaState};
use crate::cluster::store::ClusterStore;
use crate::pool::Pool;
use crate::types::{NodeId, SnapshotId, VolumeId};

pub struct Hosted {
    pub replica: Arc<LocalReplica>,
    fence: RwLock<u64>,
    fences: sled::Tree,
    meta: Arc<Meta>,
    gone: AtomicBool,
    /// May lack acknowledged writes (see the module doc); persisted in
    /// `unclean_tree`.
    unclean: AtomicBool,
    unclean_tree: sled::Tree,
    pub(super) store: Arc<ClusterStore>,
    me: NodeId,
}

impl Hosted {
    fn meta(e: sled::Error) -> ReplicaError {
        ReplicaError::Meta(e.to_string())
    }

    /// Raises the fence to `epoch`; refused if it is already higher.
    pub fn open(&self, epoch: u64) -> Result<(), ReplicaError> {
        let mut f = self.fence.write().expect("fence lock");
        if self.gone.load(Ordering::Acquire) {
            return Err(ReplicaError::Gone(self.replica.volume));
        }
        if epoch < *f {
            return Err(ReplicaError::Fenced { epoch, fence: *f });
        }
        if epoch > *f {
            self.fences
                .insert(self.replica.volume.to_string(), &epoch.to_le_bytes())
                .map_err(Self::meta)?;
            self.meta.commit().map_err(Self::meta)?;
            *f = epoch;
        }
        Ok(())
    }

    pub fn fence(&self) -> u64 {
        *self.fence.read().expect("fence lock")
    }

    /// Admits one I/O of `epoch`; hold the guard until the I/O is done.
    fn admit(&self, epoch: u64) -> Result<RwLockReadGuard<'_, u64>, ReplicaError> {
        self.admit_as(Admit::Serve, epoch)
    }

    fn admit_as(&self, how: Admit, epoch: u64) -> Result<RwLockReadGuard<'_, u64>, ReplicaError> {
        loop {
            let g = self.fence.read().expect("fence lock");
            if self.gone.load(Ordering::Acquire) {
                return Err(ReplicaError::Gone(self.replica.volume));
            }
            if epoch < *g {
                return Err(ReplicaError::Fenced { epoch, fence: *g });
            }
            if epoch == *g {
                if how == Admit::Serve && self.unclean.load(Ordering::Acquire) {
                    self.settle_unclean()?;
                }
                return Ok(g);
            }
            // A newer engine that did not open yet: opening is implied.
            drop(g);
            self.open(epoch)?;
        }
    }

    pub fn is_unclean(&self) -> bool {
        self.unclean.load(Ordering::Acquire)
    }

    /// Whether the state lets an unclean replica serve again: it is being
    /// rebuilt, or it is the volume's only healthy copy.
    fn may_serve_unclean(&self, s: &ClusterState) -> bool {
        s.volumes
            .get(&self.replica.volume)
            .and_then(|v| {
                v.replica(self.me).map(|r| match r.state {
                    ReplicaState::Rebuilding => true,
                    ReplicaState::Healthy => v.healthy().count() == 1,
                    ReplicaState::Faulted => false,
                })
            })
            .unwrap_or(false)
    }

    /// Refuses I/O while the replica is unclean and the state does not let
    /// it serve (rechecked on a linearizable read, since this node may not
    /// have applied the latest state yet); otherwise drops the mark durably.
    fn settle_unclean(&self) -> Result<(), ReplicaError> {
        let volume = self.replica.volume;
        if !self.may_serve_unclean(&self.store.read()) {
            let _ = self.store.sync_read();
            if !self.may_serve_unclean(&self.store.read()) {
                return Err(ReplicaError::Unclean(volume));
            }
        }
        self.unclean_tree
            .remove(volume.to_string())
            .map_err(Self::meta)?;
        self.meta.commit().map_err(Self::meta)?;
        if self.unclean.swap(false, Ordering::AcqRel) {
            tracing::info!(volume = %volume, "unclean replica serves again (being rebuilt, or the only healthy copy)");
        }
        Ok(())
    }

    /// Marks the replica unclean, durably (the caller commits).
    fn mark_unclean(&self) -> Result<(), ReplicaError> {
        self.unclean_tree
            .insert(self.replica.volume.to_string(), &[1u8])
            .map_err(Self::meta)?;
        self.unclean.store(true, Ordering::Release);
        Ok(())
    }

    pub fn read(&self, epoch: u64, offset: u64, buf: &mut [u8]) -> Result<(), ReplicaError> {
        let _g = self.admit(epoch)?;
        self.replica.read(offset, buf)
    }

    pub fn write(&self, epoch: u64, offset: u64, buf: &[u8]) -> Result<(), ReplicaError> {
        self.write_as(Admit::Serve, epoch, offset, buf)
    }

    pub fn write_as(
        &self,
        how: Admit,
        epoch: u64,
        offset: u64,
        buf: &[u8],
    ) -> Result<(), ReplicaError> {
        let _g = self.admit_as(how, epoch)?;
        self.replica.write(offset, buf)
    }

    pub fn zero_range(&self, epoch: u64, offset: u64, len: u64) -> Result<(), ReplicaError> {
        self.zero_as(Admit::Serve, epoch, offset, len)
    }

    pub fn zero_as(
        &self,
        how: Admit,
        epoch: u64,
        offset: u64,
        len: u64,
    ) -> Result<(), ReplicaError> {
        let _g = self.admit_as(how, epoch)?;
        self.replica.zero_range(offset, len)
    }

    pub fn flush(&self, epoch: u64) -> Result<(), ReplicaError> {
        self.flush_as(Admit::Serve, epoch)
    }

    pub fn flush_as(&self, how: Admit, epoch: u64) -> Result<(), ReplicaError> {
        let _g = self.admit_as(how, epoch)?;
        self.replica.flush()
    }

    /// crc32 per extent for `count` extents from `first` (`None`: unallocated).
    pub fn checksums(
        &self,
        epoch: u64,
        first: u64,
        count: u64,
    ) -> Result<Vec<Option<u32>>, ReplicaError> {
        self.scan(Admit::Serve, epoch, None, first, count, false)
    }

    /// Whether each of `count` extents from `first` is allocated; reads
    /// nothing.
    pub fn allocation(
        &self,
        epoch: u64,
        first: u64,
        count: u64,
    ) -> Result<Vec<bool>, ReplicaError> {
        let map = self.scan(Admit::Serve, epoch, None, first, count, true)?;
        Ok(map.iter().map(Option::is_some).collect())
    }

    /// crc32 per extent of the head or of snapshot `of` for `count`
    /// extents from `first` (`None`: reads as zeros by absence); with
    /// `allocation_only` only whether each has data (`Some(0)`), read from
    /// the map alone.
    pub fn scan(
        &self,
        how: Admit,
        epoch: u64,
        of: Option<SnapshotId>,
        first: u64,
        count: u64,
        allocation_only: bool,
    ) -> Result<Vec<Option<u32>>, ReplicaError> {
        let _g = self.admit_as(how, epoch)?;
        (first..first + count)
            .map(|e| match (of, allocation_only) {
                (None, false) => self.replica.extent_checksum(e),
                (None, true) => Ok(self.replica.is_allocated(e).then_some(0)),
                (Some(id), false) => self.replica.snapshot_extent_checksum(id, e),
                (Some(id), true) => Ok(self.replica.snapshot_has_data(id, e)?.then_some(0)),
            })
            .collect()
    }

    /// Reads snapshot `id`, for a rebuild copying it to a replica that
    /// lacks it.
    pub fn read_snapshot(
        &self,
        epoch: u64,
        id: SnapshotId,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), ReplicaError> {
        let _g = self.admit(epoch)?;
        self.replica.read_snapshot(id, offset, buf)
    }

    /// Freezes the head as snapshot `id` for the rebuild of `epoch`, which
    /// made the head equal to that snapshot on a replica holding it: only
    /// a ready snapshot of this volume that does not list this node, while
    /// the state records this replica faulted (no engine writes to it, and
    /// the reconciler leaves its unrecorded snapshots alone until it is
    /// healthy again). A local snapshot of that id (a take that arrived
    /// after its engine gave up on this replica) holds another point and is
    /// dropped first.
    pub fn adopt_snapshot(&self, epoch: u64, id: SnapshotId) -> Result<(), ReplicaError> {
        let volume = self.replica.volume;
        let me = self.me;
        let adoptable = |s: &ClusterState| {
            let snap = s
                .snapshots
                .get(&id)
                .is_some_and(|x| x.volume == volume && x.ready && !x.replicas.contains(&me));
            let faulted = s
                .volumes
                .get(&volume)
                .and_then(|v| v.replica(me))
                .is_some_and(|r| r.state == ReplicaState::Faulted);
            snap && faulted
        };
        let deadline = std::time::Instant::now() + SNAPSHOT_RECORD_WAIT;
        if !self.store.wait_until(deadline, |s, _| adoptable(s)) {
            return Err(ReplicaError::Meta(format!(
                "snapshot {id} is not one this faulted replica may adopt (not ready, already held, or the replica is not faulted)"
            )));
        }
        let _g = self.admit_as(Admit::Repair, epoch)?;
        if self.replica.snapshot_ids().contains(&id) {
            self.replica.delete_snapshot(id)?;
        }
        self.replica.take_snapshot(id)
    }

    /// Freezes the head as snapshot `id` for the engine of `epoch`, whose
    /// writes to this replica are drained. Only a snapshot of this volume
    /// that this node's state lists as being taken (waiting briefly for it
    /// to catch up): the reconciler frees every local snapshot that a newer
    /// state does not list, so one taken before its record arrived could
    /// be freed while wanted; and one already recorded taken (a take that
    /// arrives late, after its engine gave up on this replica) would hold
    /// another point than the replicas recorded with it.
    pub fn take_snapshot(&self, epoch: u64, id: SnapshotId) -> Result<(), ReplicaError> {
        let volume = self.replica.volume;
        let being_taken = |s: &crate::cluster::state::ClusterState| {
            s.snapshots
                .get(&id)
                .is_some_and(|x| x.volume == volume && !x.ready)
        };
        let deadline = std::time::Instant::now() + SNAPSHOT_RECORD_WAIT;
        if !self.store.wait_until(deadline, |s, _| being_taken(s)) {
            return Err(ReplicaError::Unlisted(id));
        }
        let _g = self.admit(epoch)?;
        self.replica.take_snapshot(id)
    }

    /// Makes the head read as snapshot `id`, for the revert of `epoch`.
    pub fn revert(&self, epoch: u64, id: SnapshotId) -> Result<(), ReplicaError> {
        let _g = self.admit(epoch)?;
        self.replica.revert(id)
    }
}

/// How an I/O is admitted past the fence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// An engine's I/O: refused while the replica is unclean and the state
    /// does not let it serve (see the module doc).
    Serve,
    /// A rebuild's catch-up of a faulted replica: nothing is read from it
    /// for an application, so an unclean mark neither refuses it nor is
    /// dropped by it (the rebuild's own `Serve` I/O drops it once the
    /// state shows the replica rebuilding).
    Repair,
}

impl Admit {
    pub fn of(repair: bool) -> Admit {
        if repair {
            Admit::Repair
        } else {
            Admit::Serve
        }
    }
}

/// How long a take waits for this node's state to list the snapshot.
const SNAPSHOT_RECORD_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Every replica hosted on this node, created when the cluster state lists
/// this node for a volume and destroyed when it no longer does.
pub struct HostMap {
    pub me: NodeId,
    meta: Arc<Meta>,
    pool: Arc<Pool>,
    fences: sled::Tree,
    unclean: sled::Tree,
    store: Arc<ClusterStore>,
    map: RwLock<HashMap<VolumeId, Arc<Hosted>>>,
    destroying: std::sync::Mutex<()>,
    /// Data connections being served (`wire`), and those refused because
    /// [`MAX_DATA_CONNECTIONS`] were.
    pub data_connections: AtomicUsize,
    pub data_connections_refused: AtomicU64,
}

/// Data connections served at once (each is a thread); engines keep at
/// most 32 idle ones per peer, so this leaves room for 30 peers.
pub const MAX_DATA_CONNECTIONS: usize = 1024;

/// One served data connection; counted until dropped.
pub struct ConnectionSlot<'a>(&'a AtomicUsize);

impl Drop for ConnectionSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl HostMap {
    /// A slot for one more data connection, unless the limit is reached.
    pub fn data_connection(&self) -> Option<ConnectionSlot<'_>> {
        let open = self.data_connections.fetch_add(1, Ordering::AcqRel);
        if open >= MAX_DATA_CONNECTIONS {
            self.data_connections.fetch_sub(1, Ordering::AcqRel);
            self.data_connections_refused
                .fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(ConnectionSlot(&self.data_connections))
    }

    pub fn new(
        me: NodeId,
        meta: Arc<Meta>,
        pool: Arc<Pool>,
        store: Arc<ClusterStore>,
    ) -> Result<HostMap, String> {
        let fences = meta.db.open_tree("fences").map_err(|e| e.to_string())?;
        let unclean = meta.db.open_tree("unclean").map_err(|e| e.to_string())?;
        Ok(HostMap {
            me,
            meta,
            pool,
            fences,
            unclean,
            store,
            map: RwLock::new(HashMap::new()),
            destroying: std::sync::Mutex::new(()),
            data_connections: AtomicUsize::new(0),
            data_connections_refused: AtomicU64::new(0),
        })
    }

    fn hosted(&self, replica: Arc<LocalReplica>) -> Arc<Hosted> {
        let id = replica.volume;
        let unclean = self.unclean.contains_key(id.to_string()).unwrap_or(true);
        Arc::new(Hosted {
            replica,
            fence: RwLock::new(self.stored_fence(id)),
            fences: self.fences.clone(),
            meta: self.meta.clone(),
            gone: AtomicBool::new(false),
            unclean: AtomicBool::new(unclean),
            unclean_tree: self.unclean.clone(),
            store: self.store.clone(),
            me: self.me,
        })
    }

    /// Start-up, after the replicas were loaded: when the kernel's boot id
    /// differs from the one the daemon last ran under, the kernel restarted
    /// (cleanly or not: no shutdown record tells them apart), and every
    /// replica this node hosts may lack acknowledged writes that were never
    /// flushed; they are marked unclean. Returns how many were marked.
    pub fn note_boot(&self, boot_id: &str) -> Result<usize, String> {
        let node = self.meta.db.open_tree("node").map_err(|e| e.to_string())?;
        let before = node.get("boot_id").map_err(|e| e.to_string())?;
        let restarted = before
            .as_ref()
            .is_some_and(|b| b.as_ref() != boot_id.as_bytes());
        let mut marked = 0;
        if restarted {
            for h in self.map.read().expect("host map lock").values() {
                h.mark_unclean().map_err(|e| e.to_string())?;
                marked += 1;
            }
        }
        node.insert("boot_id", boot_id.as_bytes())
            .map_err(|e| e.to_string())?;
        self.meta.commit().map_err(|e| e.to_string())?;
        Ok(marked)
    }

    pub fn extent_size(&self) -> u64 {
        self.pool.extent_size
    }

    fn stored_fence(&self, id: VolumeId) -> u64 {
        self.fences
            .get(id.to_string())
            .ok()
            .flatten()
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map(u64::from_le_bytes)
            .unwrap_or(0)
    }

    /// Adds an already loaded replica (start-up, after its extents were claimed).
    pub fn insert(&self, replica: Arc<LocalReplica>) -> Arc<Hosted> {
        let id = replica.volume;
        let h = self.hosted(replica);
        self.map
            .write()
            .expect("host map lock")
            .insert(id, h.clone());
        h
    }

    pub fn get(&self, id: VolumeId) -> Option<Arc<Hosted>> {
        self.map.read().expect("host map lock").get(&id).cloned()
    }

    /// Commits the metadata when the extent map log has grown past
    /// `limit` bytes (a writer that never flushes would grow it forever).
    pub fn bound_map_log(&self, limit: u64) {
        if self.meta.log_bytes() > limit {
            if let Err(e) = self.meta.commit() {
                tracing::warn!(error = %e, "committing the extent map failed; retried");
            }
        }
    }

    /// Replicas marked unclean (see the module doc).
    pub fn unclean_ids(&self) -> Vec<VolumeId> {
        self.map
            .read()
            .expect("host map lock")
            .iter()
            .filter(|(_, h)| h.is_unclean())
            .map(|(id, _)| *id)
            .collect()
    }

    pub fn ids(&self) -> Vec<VolumeId> {
        self.map
            .read()
            .expect("host map lock")
            .keys()
            .copied()
            .collect()
    }

    /// The hosted replica of `id`, created (empty) when the cluster state
    /// lists this node for it. The state is read linearizably before a
    /// refusal, so a request racing the volume's creation is not refused.
    pub fn get_or_create(
        &self,
        id: VolumeId,
        store: &ClusterStore,
    ) -> Result<Arc<Hosted>, ReplicaError> {
        if let Some(h) = self.get(id) {
            return Ok(h);
        }
        let listed = |s: &ClusterStore| {
            s.read()
                .volumes
                .get(&id)
                .is_some_and(|v| v.has_replica_on(self.me))
        };
        if !listed(store) {
            let _ = store.sync_read();
            if !listed(store) {
                return Err(ReplicaError::Gone(id));
            }
        }
        let mut map = self.map.write().expect("host map lock");
        if let Some(h) = map.get(&id) {
            return Ok(h.clone());
        }
        let (rep, mut owned) = LocalReplica::load(&self.meta, self.pool.clone(), id)?;
        self.pool.claim_all(&mut owned).map_err(|a| {
            ReplicaError::Meta(format!("extent {a:?} of replica {id} is claimed twice"))
        })?;
        if let Err(e) = rep.settle() {
            // Its extents are claimed now: it stays hosted, and the next
            // snapshot operation or start tries again.
            tracing::warn!(volume = %id, error = %e, "cannot free the remains of an interrupted snapshot operation yet");
        }
        let rep = Arc::new(rep);
        self.wire_origin(&rep, &map)?;
        let h = self.hosted(rep);
        map.insert(id, h.clone());
        tracing::info!(volume = %id, "created local replica");
        Ok(h)
    }

    /// Connects a clone replica to the snapshot it reads through to, on
    /// the source replica hosted here: the one it stored, or, for a new
    /// replica the state lists as backed here, the state's origin.
    fn wire_origin(
        &self,
        rep: &Arc<LocalReplica>,
        map: &HashMap<VolumeId, Arc<Hosted>>,
    ) -> Result<(), ReplicaError> {
        let wanted = {
            let s = self.store.read();
            s.volumes
                .get(&rep.volume)
                .and_then(|v| v.origin.clone())
                .filter(|o| o.backed.contains(&self.me))
        };
        let source = |id: VolumeId| {
            map.get(&id).map(|h| h.replica.clone()).ok_or_else(|| {
                ReplicaError::Meta(format!(
                    "clone {} reads through to volume {id}, whose replica is not hosted here",
                    rep.volume
                ))
            })
        };
        match (rep.stored_origin(), wanted) {
            (Some((src, _)), _) => rep.attach_origin(&source(src)?),
            (None, Some(o)) if rep.is_fresh() => rep.init_origin(&source(o.volume)?, o.snapshot),
            // Filled already (or never a clone here).
            _ => Ok(()),
        }
    }

    /// Start-up, after every listed replica was loaded: connects clones to
    /// their origins. One whose stored origin cannot be connected stays
    /// hosted and fails every read of what it has not copied yet.
    /// A new one that could not become a clone is not hosted (its I/O
    /// fails, so the engine faults it, and the next creation tries again).
    pub fn wire_origins(&self) {
        let mut unhost = Vec::new();
        {
            let map = self.map.read().expect("host map lock");
            for h in map.values() {
                if let Err(e) = self.wire_origin(&h.replica, &map) {
                    tracing::error!(volume = %h.replica.volume, error = %e, "clone not connected to its origin");
                    if h.replica.stored_origin().is_none() {
                        unhost.push(h.replica.volume);
                    }
                }
            }
        }
        let mut map = self.map.write().expect("host map lock");
        for id in unhost {
            map.remove(&id);
        }
    }

    /// Frees a replica this node no longer holds: no I/O is admitted after
    /// this starts, then its extents return to the pool.
    /// Frees a replica's space and forgets it. Callers racing on one
    /// replica (the reconciler, a deleting node's request) are serialised,
    /// so "freed" means the space is back when any of them returns; a
    /// failure leaves the replica listed (refusing I/O) for a retry.
    pub fn destroy(&self, id: VolumeId) -> Result<(), ReplicaError> {
        let _one = self.destroying.lock().expect("destroy lock");
        let Some(h) = self.get(id) else {
            return Ok(());
        };
        {
            let _f = h.fence.write().expect("fence lock");
            h.gone.store(true, Ordering::Release);
        }
        h.replica.destroy()?;
        self.map.write().expect("host map lock").remove(&id);
        let _ = self.fences.remove(id.to_string());
        let _ = self.unclean.remove(id.to_string());
        tracing::info!(volume = %id, "freed local replica");
        Ok(())
    }
}
