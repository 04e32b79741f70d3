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

pub mod commit;
pub mod host;
pub mod remote;
pub mod service;
mod status;
mod table;
pub mod wire;

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use commit::Meta;
use table::ExtentTable;

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
            | ReplicaError::Unclean(_) => libc::EIO,
        }
    }
}

pub fn tree_name(volume: VolumeId) -> String {
    format!("extents/{volume}")
}

pub struct LocalReplica {
    pub volume: VolumeId,
    pool: Arc<Pool>,
    meta: Arc<Meta>,
    tree: sled::Tree,
    table: RwLock<ExtentTable>,
    /// Serialises allocation so two writers never allocate one logical extent twice.
    alloc_lock: Mutex<()>,
    /// Read-held by every I/O, write-held while extents are freed.
    free_gate: RwLock<()>,
    map_dirty: AtomicBool,
    allocated_extents: AtomicU64,
}

impl LocalReplica {
    /// Loads the replica's map (creating an empty one), returning the extents
    /// it owns so the caller can claim them in the pool.
    pub fn load(
        meta: &Arc<Meta>,
        pool: Arc<Pool>,
        volume: VolumeId,
    ) -> Result<(LocalReplica, Vec<ExtentAddr>), ReplicaError> {
        let tree = meta
            .db
            .open_tree(tree_name(volume))
            .map_err(|e| ReplicaError::Meta(e.to_string()))?;
        let mut table = ExtentTable::default();
        let mut owned = Vec::new();
        for kv in tree.iter() {
            let (k, v) = kv.map_err(|e| ReplicaError::Meta(e.to_string()))?;
            let key: [u8; 8] = k
                .as_ref()
                .try_into()
                .map_err(|_| ReplicaError::Meta(format!("bad key length {}", k.len())))?;
            let val: [u8; 8] = v
                .as_ref()
                .try_into()
                .map_err(|_| ReplicaError::Meta(format!("bad value length {}", v.len())))?;
            let logical = u64::from_be_bytes(key);
            let addr = ExtentAddr::unpack(u64::from_le_bytes(val)).ok_or_else(|| {
                ReplicaError::Meta(format!(
                    "invalid extent address for logical extent {logical}"
                ))
            })?;
            table.set(logical, Some(addr));
            owned.push(addr);
        }
        let n = owned.len() as u64;
        let r = LocalReplica {
            volume,
            pool,
            meta: meta.clone(),
            tree,
            table: RwLock::new(table),
            alloc_lock: Mutex::new(()),
            free_gate: RwLock::new(()),
            map_dirty: AtomicBool::new(false),
            allocated_extents: AtomicU64::new(n),
        };
        Ok((r, owned))
    }

    pub fn extent_size(&self) -> u64 {
        self.pool.extent_size
    }

    /// crc32 of logical extent `logical` (read whole), `None` when it is
    /// not allocated (reads as zeros).
    pub fn extent_checksum(&self, logical: u64) -> Result<Option<u32>, ReplicaError> {
        if self.lookup(logical).is_none() {
            return Ok(None);
        }
        let es = self.pool.extent_size as usize;
        let mut buf = AlignedBuf::new(es, IO_ALIGN);
        self.read(logical * es as u64, buf.as_mut_slice())?;
        Ok(Some(crc32fast::hash(buf.as_slice())))
    }

    pub fn is_allocated(&self, logical: u64) -> bool {
        self.lookup(logical).is_some()
    }

    pub fn allocated_bytes(&self) -> u64 {
        self.allocated_extents.load(Ordering::Relaxed) * self.pool.extent_size
    }

    fn lookup(&self, logical: u64) -> Option<ExtentAddr> {
        self.table.read().expect("table lock").get(logical)
    }

    /// The extent backing `logical`, allocated (and logged, see `commit`)
    /// if there is none.
    fn lookup_or_allocate(&self, logical: u64) -> Result<ExtentAddr, ReplicaError> {
        if let Some(a) = self.lookup(logical) {
            return Ok(a);
        }
        let _g = self.alloc_lock.lock().expect("alloc lock");
        if let Some(a) = self.lookup(logical) {
            return Ok(a);
        }
        let addr = self.pool.allocate().map_err(|e| match e {
            PoolError::Full => ReplicaError::NoSpace,
            other => ReplicaError::Meta(other.to_string()),
        })?;
        if let Err(e) = self
            .tree
            .insert(logical.to_be_bytes(), &addr.pack().to_le_bytes())
        {
            self.pool.release(&[addr]);
            return Err(ReplicaError::Meta(e.to_string()));
        }
        // Survives a crash of this process before sled's next flush.
        if let Err(e) = self.meta.log_map(self.volume, logical, addr.pack()) {
            let _ = self.tree.remove(logical.to_be_bytes());
            self.pool.release(&[addr]);
            return Err(ReplicaError::Meta(format!("extent map log: {e}")));
        }
        self.map_dirty.store(true, Ordering::Release);
        self.table
            .write()
            .expect("table lock")
            .set(logical, Some(addr));
        self.allocated_extents.fetch_add(1, Ordering::Relaxed);
        Ok(addr)
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
        if !Self::aligned(offset, buf) {
            return self.read_unaligned(offset, buf);
        }
        let _gate = self.free_gate.read().expect("free gate");
        self.each_piece(offset, buf.len(), |logical, within, range| {
            let dst = &mut buf[range];
            match self.lookup(logical) {
                None => dst.fill(0),
                Some(addr) => self.pool.read(addr, within, dst)?,
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
    /// the pool ran out reads as zeros, as an unallocated one does). The
    /// engine relies on it to keep replicas equal when every one of them
    /// is full.
    pub fn write(&self, offset: u64, buf: &[u8]) -> Result<(), ReplicaError> {
        if !Self::aligned(offset, buf) {
            return self.write_unaligned(offset, buf);
        }
        let _gate = self.free_gate.read().expect("free gate");
        self.each_piece(offset, buf.len(), |logical, _, _| {
            self.lookup_or_allocate(logical).map(|_| ())
        })?;
        self.each_piece(offset, buf.len(), |logical, within, range| {
            let addr = self.lookup_or_allocate(logical)?;
            Ok(self.pool.write(addr, within, &buf[range])?)
        })
    }

    fn bounce_range(offset: u64, len: usize) -> (u64, usize) {
        let a = IO_ALIGN as u64;
        let start = offset / a * a;
        let end = (offset + len as u64).div_ceil(a) * a;
        (start, (end - start) as usize)
    }

    fn read_unaligned(&self, offset: u64, buf: &mut [u8]) -> Result<(), ReplicaError> {
        let (start, blen) = Self::bounce_range(offset, buf.len());
        let mut tmp = AlignedBuf::new(blen, IO_ALIGN);
        self.read(start, tmp.as_mut_slice())?;
        let skip = (offset - start) as usize;
        buf.copy_from_slice(&tmp.as_slice()[skip..skip + buf.len()]);
        Ok(())
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
    /// back to the pool (thin provisioning); partial ranges of allocated
    /// extents are zeroed in place.
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
            } else if let Some(addr) = self.lookup(logical) {
                let a = IO_ALIGN as u64;
                let (s, e) = (within.div_ceil(a) * a, (within + n) / a * a);
                if s < e {
                    let _gate = self.free_gate.read().expect("free gate");
                    self.pool.zero(addr, s, e - s)?;
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

    /// Frees whole logical extents: zero them durably, drop them from the map
    /// durably, then give them back to the pool.
    fn free_extents(&self, logical: &[u64]) -> Result<(), ReplicaError> {
        let _gate = self.free_gate.write().expect("free gate");
        let victims: Vec<(u64, ExtentAddr)> = logical
            .iter()
            .filter_map(|l| self.lookup(*l).map(|a| (*l, a)))
            .collect();
        if victims.is_empty() {
            return Ok(());
        }
        for (_, addr) in &victims {
            self.pool.zero(*addr, 0, self.pool.extent_size)?;
        }
        self.pool.sync()?;
        let mut batch = sled::Batch::default();
        for (l, _) in &victims {
            // Logged first, so a replay never maps what sled dropped.
            self.meta
                .log_unmap(self.volume, *l)
                .map_err(|e| ReplicaError::Meta(format!("extent map log: {e}")))?;
            batch.remove(&l.to_be_bytes());
        }
        self.tree
            .apply_batch(batch)
            .map_err(|e| ReplicaError::Meta(e.to_string()))?;
        self.meta
            .commit()
            .map_err(|e| ReplicaError::Meta(e.to_string()))?;
        {
            let mut t = self.table.write().expect("table lock");
            for (l, _) in &victims {
                t.set(*l, None);
            }
        }
        let addrs: Vec<ExtentAddr> = victims.iter().map(|v| v.1).collect();
        self.allocated_extents
            .fetch_sub(addrs.len() as u64, Ordering::Relaxed);
        self.pool.release(&addrs);
        Ok(())
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

    /// Deletes the replica: frees all its extents and drops its map.
    pub fn destroy(&self) -> Result<(), ReplicaError> {
        let all: Vec<u64> = self.table.read().expect("table lock").logical_extents();
        self.free_extents(&all)?;
        let name = tree_name(self.volume);
        self.meta
            .db
            .drop_tree(name)
            .map_err(|e| ReplicaError::Meta(e.to_string()))?;
        self.meta
            .commit()
            .map_err(|e| ReplicaError::Meta(e.to_string()))?;
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
