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
//! Log records carry a format version, a sequence number and a crc32;
//! replay applies the valid ones in sequence order, so a later unmap
//! cancels an earlier map. An intact record of a newer format version
//! (written by a newer daemon) stops the start-up instead of being
//! dropped, since dropping it would lose an acknowledged write's mapping.
//! There are two log files: a commit switches appends to the other one
//! before its sled flush starts, and empties the one it switched away from
//! once the flush succeeded (every record in it described a change made
//! before the flush).
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
/// there and read the same).
const REC_VERSION: u8 = 1;
const MAP: u8 = 1;
const UNMAP: u8 = 2;

/// One map change: logical extent `logical` of `volume` is backed by the
/// packed extent address `addr` (MAP) or by nothing (UNMAP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Record {
    seq: u64,
    kind: u8,
    volume: VolumeId,
    logical: u64,
    addr: u64,
}

impl Record {
    fn encode(&self) -> [u8; REC_LEN] {
        let mut b = [0u8; REC_LEN];
        b[0..4].copy_from_slice(&REC_MAGIC.to_le_bytes());
        b[4] = self.kind;
        b[5] = REC_VERSION;
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..32].copy_from_slice(&self.volume.0);
        b[32..40].copy_from_slice(&self.logical.to_le_bytes());
        b[40..48].copy_from_slice(&self.addr.to_le_bytes());
        let crc = crc32fast::hash(&b[..48]);
        b[48..52].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// `Ok(None)` for anything but a complete, intact record; `Err` with
    /// the version for an intact record of a newer format.
    fn decode(b: &[u8]) -> Result<Option<Record>, u8> {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        if b.len() < REC_LEN
            || u32::from_le_bytes(b[0..4].try_into().expect("4 bytes")) != REC_MAGIC
            || u32::from_le_bytes(b[48..52].try_into().expect("4 bytes"))
                != crc32fast::hash(&b[..48])
        {
            return Ok(None);
        }
        if b[5] > REC_VERSION {
            return Err(b[5]);
        }
        if !matches!(b[4], MAP | UNMAP) {
            return Ok(None);
        }
        Ok(Some(Record {
            seq: u64_at(8),
            kind: b[4],
            volume: Id128(b[16..32].try_into().expect("16 bytes")),
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

    fn append(&self, kind: u8, volume: VolumeId, logical: u64, addr: u64) -> std::io::Result<()> {
        let mut log = self.log.lock().expect("log lock");
        let rec = Record {
            seq: log.next_seq,
            kind,
            volume,
            logical,
            addr,
        };
        let (i, at) = (log.active, log.len[log.active]);
        log.files[i].write_all_at(&rec.encode(), at)?;
        log.len[i] += REC_LEN as u64;
        log.next_seq += 1;
        Ok(())
    }

    /// Records that `logical` of `volume` is now backed by `addr` (after
    /// the sled insert, before the write it serves is acknowledged).
    pub fn log_map(&self, volume: VolumeId, logical: u64, addr: u64) -> std::io::Result<()> {
        self.append(MAP, volume, logical, addr)
    }

    /// Records that `logical` of `volume` is backed by nothing (before the
    /// sled removal and before its extent returns to the pool).
    pub fn log_unmap(&self, volume: VolumeId, logical: u64) -> std::io::Result<()> {
        self.append(UNMAP, volume, logical, 0)
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
                if r.is_ok() {
                    s.durable = s.durable.max(covers);
                }
                self.done.notify_all();
                // A failed flush fails its runner; waiters try their own.
                r?;
                continue;
            }
            s = self.done.wait(s).expect("commit lock");
        }
    }
}

/// Applies the net effect of `records` (in sequence order) to the extent
/// maps in `db` and makes it durable; returns how many changes it applied.
fn replay(db: &sled::Db, mut records: Vec<Record>) -> Result<usize, String> {
    records.sort_by_key(|r| r.seq);
    let mut net: BTreeMap<(VolumeId, u64), Option<u64>> = BTreeMap::new();
    for r in &records {
        net.insert((r.volume, r.logical), (r.kind == MAP).then_some(r.addr));
    }
    let existing: Vec<Vec<u8>> = db.tree_names().into_iter().map(|n| n.to_vec()).collect();
    for ((volume, logical), addr) in &net {
        let name = super::tree_name(*volume);
        let key = logical.to_be_bytes();
        match addr {
            Some(a) => {
                db.open_tree(&name)
                    .and_then(|t| t.insert(key, &a.to_le_bytes()))
                    .map_err(|e| format!("replaying the extent map log: {e}"))?;
            }
            // A volume whose map is gone was destroyed: nothing to remove.
            None if existing.iter().any(|n| n.as_slice() == name.as_bytes()) => {
                db.open_tree(&name)
                    .and_then(|t| t.remove(key))
                    .map_err(|e| format!("replaying the extent map log: {e}"))?;
            }
            None => {}
        }
    }
    db.flush()
        .map_err(|e| format!("replaying the extent map log: {e}"))?;
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
            unmap: bool,
            volume: [u8; 16],
            logical: u64,
            addr: u64,
            flips in proptest::collection::vec((0usize..52, 0u8..8), 1..4),
            junk in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..80),
        ) {
            let r = Record { seq, kind: if unmap { UNMAP } else { MAP }, volume: Id128(volume), logical, addr };
            let b = r.encode();
            proptest::prop_assert_eq!(Record::decode(&b), Ok(Some(r)));
            let mut bad = b;
            for (byte, bit) in &flips {
                bad[*byte] ^= 1 << bit;
            }
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
            logical: 42,
            addr: 0xdead_beef,
        };
        let b = r.encode();
        assert_eq!(Record::decode(&b), Ok(Some(r)));
        for i in [0, 4, 5, 9, 20, 33, 41, 49] {
            let mut bad = b;
            bad[i] ^= 0x10;
            assert_eq!(Record::decode(&bad), Ok(None), "byte {i} flipped");
        }
        assert_eq!(Record::decode(&b[..REC_LEN - 1]), Ok(None));
        // Records from before versions (0) read the same; newer ones stop.
        let reseal = |v: u8| {
            let mut x = b;
            x[5] = v;
            let crc = crc32fast::hash(&x[..48]);
            x[48..52].copy_from_slice(&crc.to_le_bytes());
            x
        };
        assert_eq!(Record::decode(&reseal(0)), Ok(Some(r)));
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
        meta.log_map(a, 3, 400).expect("log");
        assert_eq!(meta.log_bytes(), REC_LEN as u64);
        meta.commit().expect("commit");
        assert_eq!(meta.log_bytes(), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
