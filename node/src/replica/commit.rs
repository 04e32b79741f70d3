//! The node's replica metadata (sled) with a crash-proof allocation log and
//! group commit.
//!
//! sled keeps recent changes in memory until a flush, so a daemon killed
//! before its next flush loses them, although the kernel still holds (with
//! `O_DIRECT`, has already written) the data they describe. An extent
//! allocated for a write must stay mapped after a daemon crash, or an
//! acknowledged write turns into zeros while the FUSE holder keeps the
//! filesystem mounted across the crash. Flushing sled before every such
//! write costs an fsync per new extent; instead every map change is also
//! appended to a small log file with a plain `pwrite` (no fsync) before the
//! write it serves is acknowledged. The page cache survives a crash of the
//! process, and the next start replays the log into sled.
//!
//! Durability against power loss is unchanged: a flush ([`Meta::commit`])
//! makes sled durable, and what a power loss takes from the log belongs to
//! writes that were never flushed (a node whose kernel restarted has its
//! replicas rebuilt anyway, see `host`).
//!
//! Every change of the I/O path is logged: a version mapped for a layer
//! (full, partial, or a whiteout), removed, or blocks added to a partial
//! version. Changes that free or move extents (snapshot deletion, revert,
//! destroy) are not: they run with the replica's I/O stopped, commit
//! first (so no record of that replica is left to replay over them),
//! apply one atomic sled batch, and commit again.
//!
//! Log records carry a format version, a sequence number and a crc32;
//! replay applies the valid ones in sequence order, so a later unmap
//! cancels an earlier map. An intact record of a newer format version
//! (written by a newer daemon) stops the start-up instead of being
//! dropped, since dropping it would lose an acknowledged write's mapping.
//! There are two log files: a commit switches appends to the other one
//! before its sled flush starts, and empties the one it switched away from
//! once the flush succeeded (every record in it described a change made
//! before the flush). A failed sled flush fails every later commit too
//! (until a restart replays both files): the file it switched away from
//! still holds records, and a later commit switching back into it would
//! leave records older than a structural change where a crash replays
//! them over it. A metadata disk that fails a flush is not trusted again
//! without a restart; the engine records the replica faulted meanwhile.
//!
//! [`Meta::commit`] is a group commit: one of the waiting callers runs the
//! sled flush; everyone who arrived before it started is covered and
//! returns, the rest wait for the next one.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Condvar, Mutex};

use crate::types::{Id128, VolumeId};

const REC_LEN: usize = 64;
const REC_MAGIC: u32 = 0x474c_4143; // "CALG" on disk
/// Format version of a record (byte 5; records from before versions hold 0
/// there and read the same). Version 2 adds the layer (bytes 52..60) and
/// the block count of an extent (bytes 6..8), and its crc covers them.
const REC_VERSION: u8 = 2;
/// A full version (address 0: a whiteout).
const MAP: u8 = 1;
const UNMAP: u8 = 2;
/// A partial version holding no block yet.
const PARTIAL: u8 = 3;
/// Blocks `[first, first + count)` (the address field: first | count << 32)
/// added to a partial version.
const BITS: u8 = 4;

/// One map change of `logical` of `volume` in `layer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Record {
    seq: u64,
    kind: u8,
    volume: VolumeId,
    layer: u64,
    /// Blocks per extent (PARTIAL and BITS).
    blocks: u16,
    logical: u64,
    addr: u64,
}

fn crc_of(b: &[u8], version: u8) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&b[..48]);
    if version >= 2 {
        h.update(&b[52..64]);
    }
    h.finalize()
}

impl Record {
    fn encode(&self) -> [u8; REC_LEN] {
        let mut b = [0u8; REC_LEN];
        b[0..4].copy_from_slice(&REC_MAGIC.to_le_bytes());
        b[4] = self.kind;
        b[5] = REC_VERSION;
        b[6..8].copy_from_slice(&self.blocks.to_le_bytes());
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..32].copy_from_slice(&self.volume.0);
        b[32..40].copy_from_slice(&self.logical.to_le_bytes());
        b[40..48].copy_from_slice(&self.addr.to_le_bytes());
        b[52..60].copy_from_slice(&self.layer.to_le_bytes());
        let crc = crc_of(&b, REC_VERSION);
        b[48..52].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// `Ok(None)` for anything but a complete, intact record; `Err` with
    /// the version for an intact record of a newer format.
    fn decode(b: &[u8]) -> Result<Option<Record>, u8> {
        if b.len() < REC_LEN {
            return Ok(None);
        }
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        let version = b[5];
        if u32::from_le_bytes(b[0..4].try_into().expect("4 bytes")) != REC_MAGIC
            || u32::from_le_bytes(b[48..52].try_into().expect("4 bytes")) != crc_of(b, version)
        {
            return Ok(None);
        }
        if version > REC_VERSION {
            return Err(version);
        }
        let kinds: &[u8] = if version >= 2 {
            &[MAP, UNMAP, PARTIAL, BITS]
        } else {
            &[MAP, UNMAP]
        };
        if !kinds.contains(&b[4]) {
            return Ok(None);
        }
        let (layer, blocks) = if version >= 2 {
            (u64_at(52), u16::from_le_bytes([b[6], b[7]]))
        } else {
            (0, 0)
        };
        Ok(Some(Record {
            seq: u64_at(8),
            kind: b[4],
            volume: Id128(b[16..32].try_into().expect("16 bytes")),
            layer,
            blocks,
            logical: u64_at(32),
            addr: u64_at(40),
        }))
    }
}

struct Log {
    files: [File; 2],
    len: [u64; 2],
    active: usize,
    next_seq: u64,
}

/// The node's sled database with the allocation log and group commit.
pub struct Meta {
    pub db: sled::Db,
    log: Mutex<Log>,
    state: Mutex<State>,
    done: Condvar,
}

#[derive(Default)]
struct State {
    /// Tickets handed out: the n-th caller holds ticket n.
    issued: u64,
    /// Every ticket up to this one is covered by a completed flush.
    durable: u64,
    flushing: bool,
    /// Why an earlier sled flush failed; every commit fails from then on.
    failed: Option<String>,
}

fn log_path(dir: &Path, i: usize) -> std::path::PathBuf {
    dir.join(format!("extent-map.log.{i}"))
}

impl Meta {
    /// Opens the log files in `dir` (creating them), replays what a crash
    /// left in them into `db`, makes that durable and empties them.
    pub fn open(db: sled::Db, dir: &Path) -> Result<Meta, String> {
        let open = |i: usize| {
            let p = log_path(dir, i);
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&p)
                .map_err(|e| format!("extent map log {}: {e}", p.display()))
        };
        let files = [open(0)?, open(1)?];
        let mut records = Vec::new();
        for (i, f) in files.iter().enumerate() {
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut &*f, &mut bytes)
                .map_err(|e| format!("extent map log {}: {e}", log_path(dir, i).display()))?;
            // A torn tail (power loss) ends the file's valid records.
            for chunk in bytes.chunks(REC_LEN) {
                match Record::decode(chunk) {
                    Ok(Some(r)) => records.push(r),
                    Ok(None) => break,
                    Err(v) => {
                        return Err(format!(
                            "extent map log {}: a record of format version {v}, newer than this daemon understands (up to {REC_VERSION}); start a daemon of that version",
                            log_path(dir, i).display()
                        ))
                    }
                }
            }
        }
        let next_seq = records.iter().map(|r| r.seq + 1).max().unwrap_or(0);
        let replayed = replay(&db, records)?;
        if replayed > 0 {
            tracing::info!(
                changes = replayed,
                "replayed extent map changes a crash kept out of the metadata db"
            );
        }
        for f in &files {
            f.set_len(0)
                .map_err(|e| format!("emptying the extent map log: {e}"))?;
        }
        Ok(Meta {
            db,
            log: Mutex::new(Log {
                files,
                len: [0, 0],
                active: 0,
                next_seq,
            }),
            state: Mutex::new(State::default()),
            done: Condvar::new(),
        })
    }

    fn append(&self, mut rec: Record) -> std::io::Result<()> {
        let mut log = self.log.lock().expect("log lock");
        rec.seq = log.next_seq;
        let (i, at) = (log.active, log.len[log.active]);
        log.files[i].write_all_at(&rec.encode(), at)?;
        log.len[i] += REC_LEN as u64;
        log.next_seq += 1;
        Ok(())
    }

    fn record(kind: u8, volume: VolumeId, layer: u64, logical: u64, addr: u64) -> Record {
        Record {
            seq: 0,
            kind,
            volume,
            layer,
            blocks: 0,
            logical,
            addr,
        }
    }

    /// Records that `logical` of `volume` is now backed in `layer` by the
    /// packed extent address `addr` as a full version, or by a whiteout
    /// when `addr` is 0 (after the sled insert, before the write it serves
    /// is acknowledged).
    pub fn log_map(
        &self,
        volume: VolumeId,
        layer: u64,
        logical: u64,
        addr: u64,
    ) -> std::io::Result<()> {
        self.append(Self::record(MAP, volume, layer, logical, addr))
    }

    /// Records a partial version holding no block yet, of an extent of
    /// `blocks` blocks.
    pub fn log_partial(
        &self,
        volume: VolumeId,
        layer: u64,
        logical: u64,
        addr: u64,
        blocks: u16,
    ) -> std::io::Result<()> {
        self.append(Record {
            blocks,
            ..Self::record(PARTIAL, volume, layer, logical, addr)
        })
    }

    /// Records that blocks `[first, first + count)` were added to the
    /// partial version of `logical` in `layer`.
    pub fn log_bits(
        &self,
        volume: VolumeId,
        layer: u64,
        logical: u64,
        first: u32,
        count: u32,
        blocks: u16,
    ) -> std::io::Result<()> {
        let range = first as u64 | (count as u64) << 32;
        self.append(Record {
            blocks,
            ..Self::record(BITS, volume, layer, logical, range)
        })
    }

    /// Records that `logical` of `volume` has no version in `layer` (before
    /// the sled removal and before its extent returns to the pool).
    pub fn log_unmap(&self, volume: VolumeId, layer: u64, logical: u64) -> std::io::Result<()> {
        self.append(Self::record(UNMAP, volume, layer, logical, 0))
    }

    /// Bytes in the log files (they shrink at each commit).
    pub fn log_bytes(&self) -> u64 {
        let log = self.log.lock().expect("log lock");
        log.len[0] + log.len[1]
    }

    /// Returns once every change this thread made to the db before the call
    /// is on stable storage.
    pub fn commit(&self) -> sled::Result<()> {
        let mut s = self.state.lock().expect("commit lock");
        s.issued += 1;
        let mine = s.issued;
        loop {
            if s.durable >= mine {
                return Ok(());
            }
            if let Some(why) = &s.failed {
                return Err(sled::Error::Io(std::io::Error::other(format!(
                    "an earlier metadata flush failed ({why}); restart the daemon to replay the extent map log"
                ))));
            }
            if !s.flushing {
                // Every ticket issued so far belongs to a change made before
                // this flush starts, so the flush covers all of them.
                let covers = s.issued;
                s.flushing = true;
                drop(s);
                let old = {
                    let mut log = self.log.lock().expect("log lock");
                    let old = log.active;
                    log.active = 1 - old;
                    old
                };
                let r = self.db.flush();
                if r.is_ok() {
                    // Everything in `old` was logged before the flush began.
                    let mut log = self.log.lock().expect("log lock");
                    if log.files[old].set_len(0).is_ok() {
                        log.len[old] = 0;
                    }
                }
                s = self.state.lock().expect("commit lock");
                s.flushing = false;
                match &r {
                    Ok(_) => s.durable = s.durable.max(covers),
                    Err(e) => {
                        tracing::error!(error = %e, "metadata flush failed; no replica on this node commits again until a restart");
                        s.failed = Some(e.to_string());
                    }
                }
                self.done.notify_all();
                r?;
                continue;
            }
            s = self.done.wait(s).expect("commit lock");
        }
    }
}

/// Applies the net effect of `records` (in sequence order) to the extent
/// maps in `db` and makes it durable; returns how many versions it changed.
fn replay(db: &sled::Db, mut records: Vec<Record>) -> Result<usize, String> {
    use super::layers::{key, Bits};
    records.sort_by_key(|r| r.seq);
    let err = |e: sled::Error| format!("replaying the extent map log: {e}");
    let existing: Vec<Vec<u8>> = db.tree_names().into_iter().map(|n| n.to_vec()).collect();
    // The value each touched version ends with (None: removed).
    let mut net: BTreeMap<(VolumeId, u64, u64), Option<Vec<u8>>> = BTreeMap::new();
    for r in &records {
        let name = super::tree_name(r.volume);
        let k = (r.volume, r.layer, r.logical);
        let cur = match net.entry(k) {
            std::collections::btree_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::btree_map::Entry::Vacant(v) => {
                let now = if existing.iter().any(|n| n.as_slice() == name.as_bytes()) {
                    db.open_tree(&name)
                        .and_then(|t| t.get(key(r.layer, r.logical)))
                        .map_err(err)?
                        .map(|v| v.to_vec())
                } else {
                    None
                };
                v.insert(now)
            }
        };
        match r.kind {
            MAP => *cur = Some(r.addr.to_le_bytes().to_vec()),
            UNMAP => *cur = None,
            PARTIAL => {
                let mut v = r.addr.to_le_bytes().to_vec();
                v.extend(Bits::empty(r.blocks as u32).to_bytes());
                *cur = Some(v);
            }
            _ => {
                // BITS: only onto a partial version of the same geometry.
                let (first, count) = (r.addr as u32, (r.addr >> 32) as u32);
                if let Some(v) = cur.as_mut().filter(|v| v.len() > 8) {
                    if let Some(mut bits) = Bits::from_bytes(&v[8..], r.blocks as u32) {
                        if first
                            .checked_add(count)
                            .is_some_and(|end| end <= r.blocks as u32)
                        {
                            bits.set_range(first, count);
                            v.truncate(8);
                            v.extend(bits.to_bytes());
                        }
                    }
                }
            }
        }
    }
    for ((volume, layer, logical), value) in &net {
        let name = super::tree_name(*volume);
        let k = key(*layer, *logical);
        match value {
            Some(v) => {
                db.open_tree(&name)
                    .and_then(|t| t.insert(k, v.as_slice()))
                    .map_err(err)?;
            }
            // A volume whose map is gone was destroyed: nothing to remove.
            None if existing.iter().any(|n| n.as_slice() == name.as_bytes()) => {
                db.open_tree(&name).and_then(|t| t.remove(k)).map_err(err)?;
            }
            None => {}
        }
    }
    db.flush().map_err(err)?;
    Ok(net.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn scratch(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("cairn-{tag}-{}", Id128::random()));
        std::fs::create_dir_all(&dir).expect("dir");
        dir
    }

    #[test]
    fn concurrent_commits_share_flushes_and_all_return() {
        let dir = scratch("commit");
        let db = sled::Config::new().path(dir.join("db")).open().expect("db");
        let meta = Arc::new(Meta::open(db, &dir).expect("meta"));
        let threads: Vec<_> = (0..8u64)
            .map(|t| {
                let m = meta.clone();
                std::thread::spawn(move || {
                    for i in 0..50u64 {
                        m.db.insert((t * 1000 + i).to_be_bytes(), &[1u8][..])
                            .expect("insert");
                        m.commit().expect("commit");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        let s = meta.state.lock().expect("lock");
        assert_eq!((s.issued, s.durable), (400, 400));
        drop(s);
        assert_eq!(meta.db.len(), 400);
        let _ = std::fs::remove_dir_all(&dir);
    }

    proptest::proptest! {
        /// Every record survives encoding; any damage to an encoded record
        /// (up to three flipped bits) makes it unreadable rather than a
        /// different record, and no bytes make decoding panic.
        #[test]
        fn records_round_trip_and_damage_never_reads_as_another_record(
            seq: u64,
            kind in 1u8..=4,
            volume: [u8; 16],
            layer: u64,
            blocks: u16,
            logical: u64,
            addr: u64,
            flips in proptest::collection::vec((0usize..64, 0u8..8), 1..4),
            junk in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..80),
        ) {
            let r = Record { seq, kind, volume: Id128(volume), layer, blocks, logical, addr };
            let b = r.encode();
            proptest::prop_assert_eq!(Record::decode(&b), Ok(Some(r)));
            let mut bad = b;
            for (byte, bit) in &flips {
                bad[*byte] ^= 1 << bit;
            }
            // Bytes 60..64 are unused (but covered by the crc).
            if bad != b {
                proptest::prop_assert_eq!(Record::decode(&bad), Ok(None));
            }
            let _ = Record::decode(&junk);
        }
    }

    #[test]
    fn records_round_trip_and_damage_is_refused() {
        let r = Record {
            seq: 7,
            kind: MAP,
            volume: Id128::random(),
            layer: 0,
            blocks: 0,
            logical: 42,
            addr: 0xdead_beef,
        };
        let b = r.encode();
        assert_eq!(Record::decode(&b), Ok(Some(r)));
        for i in [0, 4, 5, 6, 9, 20, 33, 41, 49, 53, 62] {
            let mut bad = b;
            bad[i] ^= 0x10;
            assert_eq!(Record::decode(&bad), Ok(None), "byte {i} flipped");
        }
        assert_eq!(Record::decode(&b[..REC_LEN - 1]), Ok(None));
        // Records from before versions (0) and before layers (1) read as
        // layer 0; newer ones stop.
        let reseal = |v: u8| {
            let mut x = b;
            x[5] = v;
            let crc = crc_of(&x, v);
            x[48..52].copy_from_slice(&crc.to_le_bytes());
            x
        };
        assert_eq!(Record::decode(&reseal(0)), Ok(Some(r)));
        assert_eq!(Record::decode(&reseal(1)), Ok(Some(r)));
        let mut partial_v1 = r;
        partial_v1.kind = PARTIAL;
        let mut x = reseal(1);
        x[4] = PARTIAL;
        let crc = crc_of(&x, 1);
        x[48..52].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(
            Record::decode(&x),
            Ok(None),
            "no partial versions before version 2"
        );
        assert_eq!(
            Record::decode(&{
                let mut y = x;
                y[5] = 2;
                let c = crc_of(&y, 2);
                y[48..52].copy_from_slice(&c.to_le_bytes());
                y
            }),
            Ok(Some(partial_v1))
        );
        assert_eq!(
            Record::decode(&reseal(REC_VERSION + 1)),
            Err(REC_VERSION + 1)
        );
    }

    /// What the log holds when the process dies before a flush reaches the
    /// db after reopening: maps, and unmaps that cancel earlier maps, in
    /// sequence order across both files; a torn tail is ignored.
    #[test]
    fn replay_applies_the_net_effect_in_sequence_order() {
        let dir = scratch("maplog");
        let (a, b) = (Id128::random(), Id128::random());
        let rec = |seq, kind, volume, logical, addr| Record {
            seq,
            kind,
            volume,
            layer: 0,
            blocks: 0,
            logical,
            addr,
        };
        let mut f0 = rec(0, MAP, a, 1, 100).encode().to_vec();
        f0.extend(rec(2, UNMAP, a, 1, 0).encode());
        f0.extend(rec(4, MAP, a, 2, 300).encode());
        f0.extend(&[0x55; 20]); // torn
        let mut f1 = rec(1, MAP, b, 9, 200).encode().to_vec();
        f1.extend(rec(3, MAP, b, 1, 100).encode());
        std::fs::write(log_path(&dir, 0), f0).expect("log 0");
        std::fs::write(log_path(&dir, 1), f1).expect("log 1");
        let db = sled::Config::new().path(dir.join("db")).open().expect("db");
        let meta = Meta::open(db, &dir).expect("replay");
        let get = |v: VolumeId, l: u64| {
            meta.db
                .open_tree(super::super::tree_name(v))
                .expect("tree")
                .get(l.to_be_bytes())
                .expect("get")
                .map(|x| u64::from_le_bytes(x.as_ref().try_into().expect("8 bytes")))
        };
        assert_eq!(get(a, 1), None, "unmapped later");
        assert_eq!(get(a, 2), Some(300));
        assert_eq!(get(b, 9), Some(200));
        assert_eq!(get(b, 1), Some(100), "the freed extent went to b");
        assert_eq!(std::fs::metadata(log_path(&dir, 0)).expect("log").len(), 0);
        // New records continue the sequence; a commit empties the log.
        assert_eq!(meta.log.lock().expect("log").next_seq, 5);
        meta.log_map(a, 0, 3, 400).expect("log");
        assert_eq!(meta.log_bytes(), REC_LEN as u64);
        meta.commit().expect("commit");
        assert_eq!(meta.log_bytes(), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Partial versions and the blocks added to them replay onto what sled
    /// holds; blocks outside the extent are ignored.
    #[test]
    fn replay_builds_partial_versions_of_layers() {
        use super::super::layers::{key, parse_value, Backing};
        let dir = scratch("maplog-layers");
        let v = Id128::random();
        let rec = |seq, kind, layer, logical, addr| Record {
            seq,
            kind,
            volume: v,
            layer,
            blocks: 256,
            logical,
            addr,
        };
        let mut f0 = rec(0, PARTIAL, 3, 7, 0x1_0000_0005).encode().to_vec();
        f0.extend(rec(1, BITS, 3, 7, 2 | 4 << 32).encode());
        f0.extend(rec(2, BITS, 3, 7, 255 | 9 << 32).encode()); // beyond the extent
        f0.extend(rec(3, MAP, 3, 8, 0).encode()); // a whiteout
        f0.extend(rec(4, MAP, 0, 1, 0x1_0000_0006).encode());
        std::fs::write(log_path(&dir, 0), f0).expect("log 0");
        let db = sled::Config::new().path(dir.join("db")).open().expect("db");
        let meta = Meta::open(db, &dir).expect("replay");
        let t = meta.db.open_tree(super::super::tree_name(v)).expect("tree");
        let get = |layer, e| {
            let raw = t.get(key(layer, e)).expect("get").expect("present");
            parse_value(layer, &raw, 256).expect("value")
        };
        let p = get(3, 7);
        let bits = p.bits.expect("partial");
        assert_eq!(bits.count(), 4);
        assert!(bits.get(2) && bits.get(5) && !bits.get(6));
        assert_eq!(get(3, 8).backing, Backing::Zeros);
        assert!(get(0, 1).bits.is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
