//! Raft log, hard state, conf state and snapshot persisted in sled, behind
//! raft-rs's [`Storage`] trait.
//!
//! Layout: tree `raft_log` maps the big-endian entry index to the encoded
//! `Entry`; tree `raft_meta` holds `hs` (HardState), `cs` (ConfState) and
//! `snap` (the latest Snapshot, whose data is the state machine at its
//! index). Writes here are not flushed: the driver flushes the db once per
//! Ready, before anything that depends on them is sent or acknowledged.
//!
//! Invariants: the log holds exactly the entries `(snapshot index, last]`;
//! `first_index` is snapshot index + 1.

use protobuf::Message as _;
use raft::prelude::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};

pub struct SledStorage {
    log: sled::Tree,
    meta: sled::Tree,
}

fn store_err<E: std::error::Error + Send + Sync + 'static>(e: E) -> raft::Error {
    raft::Error::Store(StorageError::Other(Box::new(e)))
}

fn corrupt(what: &str) -> raft::Error {
    raft::Error::Store(StorageError::Other(
        format!("corrupted raft storage: {what}").into(),
    ))
}

impl SledStorage {
    pub fn open(db: &sled::Db) -> Result<SledStorage, raft::Error> {
        Ok(SledStorage {
            log: db.open_tree("raft_log").map_err(store_err)?,
            meta: db.open_tree("raft_meta").map_err(store_err)?,
        })
    }

    /// Whether this storage has never been initialised (a new cluster).
    pub fn is_empty(&self) -> bool {
        self.meta.is_empty() && self.log.is_empty()
    }

    fn get<M: protobuf::Message>(&self, key: &str) -> raft::Result<Option<M>> {
        match self.meta.get(key).map_err(store_err)? {
            None => Ok(None),
            Some(v) => M::parse_from_bytes(&v).map(Some).map_err(|_| corrupt(key)),
        }
    }

    fn put<M: protobuf::Message>(&self, key: &str, m: &M) -> raft::Result<()> {
        let bytes = m.write_to_bytes().map_err(store_err)?;
        self.meta.insert(key, bytes).map_err(store_err)?;
        Ok(())
    }

    pub fn latest_snapshot(&self) -> raft::Result<Snapshot> {
        Ok(self.get("snap")?.unwrap_or_default())
    }

    fn snapshot_index_term(&self) -> raft::Result<(u64, u64)> {
        let s = self.latest_snapshot()?;
        Ok((s.get_metadata().index, s.get_metadata().term))
    }

    pub fn hard_state(&self) -> raft::Result<HardState> {
        Ok(self.get("hs")?.unwrap_or_default())
    }

    pub fn set_hard_state(&self, hs: &HardState) -> raft::Result<()> {
        self.put("hs", hs)
    }

    pub fn set_conf_state(&self, cs: &ConfState) -> raft::Result<()> {
        self.put("cs", cs)
    }

    fn entry_at(&self, idx: u64) -> raft::Result<Option<Entry>> {
        match self.log.get(idx.to_be_bytes()).map_err(store_err)? {
            None => Ok(None),
            Some(v) => Entry::parse_from_bytes(&v)
                .map(Some)
                .map_err(|_| corrupt("entry")),
        }
    }

    /// Appends entries, first dropping any existing entries at or after the
    /// first new index (a new leader overwrote them).
    pub fn append(&self, ents: &[Entry]) -> raft::Result<()> {
        let Some(first) = ents.first() else {
            return Ok(());
        };
        let mut batch = sled::Batch::default();
        for kv in self.log.range(first.index.to_be_bytes()..) {
            let (k, _) = kv.map_err(store_err)?;
            batch.remove(k);
        }
        for e in ents {
            batch.insert(
                &e.index.to_be_bytes(),
                e.write_to_bytes().map_err(store_err)?,
            );
        }
        self.log.apply_batch(batch).map_err(store_err)
    }

    /// Installs a snapshot (from the leader or made locally): the log before
    /// and at its index is dropped, and hard/conf state follow it.
    pub fn apply_snapshot(&self, snap: &Snapshot) -> raft::Result<()> {
        let idx = snap.get_metadata().index;
        let mut batch = sled::Batch::default();
        for kv in self.log.range(..=idx.to_be_bytes()) {
            let (k, _) = kv.map_err(store_err)?;
            batch.remove(k);
        }
        self.log.apply_batch(batch).map_err(store_err)?;
        self.put("snap", snap)?;
        self.set_conf_state(snap.get_metadata().get_conf_state())?;
        let mut hs = self.hard_state()?;
        hs.term = hs.term.max(snap.get_metadata().term);
        hs.commit = hs.commit.max(idx);
        self.set_hard_state(&hs)
    }

    /// Replaces the log prefix up to `snap`'s index with `snap` (compaction
    /// after the state machine applied that index).
    pub fn compact(&self, snap: &Snapshot) -> raft::Result<()> {
        let idx = snap.get_metadata().index;
        let mut batch = sled::Batch::default();
        for kv in self.log.range(..=idx.to_be_bytes()) {
            let (k, _) = kv.map_err(store_err)?;
            batch.remove(k);
        }
        self.put("snap", snap)?;
        self.log.apply_batch(batch).map_err(store_err)
    }
}

impl Storage for SledStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(
            self.hard_state()?,
            self.get("cs")?.unwrap_or_default(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _ctx: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.first_index()? {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last_index()? + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let mut out = Vec::with_capacity((high - low) as usize);
        for kv in self.log.range(low.to_be_bytes()..high.to_be_bytes()) {
            let (_, v) = kv.map_err(store_err)?;
            out.push(Entry::parse_from_bytes(&v).map_err(|_| corrupt("entry"))?);
        }
        if out.len() as u64 != high - low {
            return Err(corrupt("gap in the log"));
        }
        raft::util::limit_size(&mut out, max_size.into());
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let (sidx, sterm) = self.snapshot_index_term()?;
        if idx == sidx {
            return Ok(sterm);
        }
        if idx < sidx {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        match self.entry_at(idx)? {
            Some(e) => Ok(e.term),
            None => Err(raft::Error::Store(StorageError::Unavailable)),
        }
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.snapshot_index_term()?.0 + 1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        match self.log.last().map_err(store_err)? {
            Some((k, _)) => Ok(u64::from_be_bytes(
                k.as_ref().try_into().map_err(|_| corrupt("log key"))?,
            )),
            None => Ok(self.snapshot_index_term()?.0),
        }
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let s = self.latest_snapshot()?;
        if s.get_metadata().index < request_index {
            // The driver makes a fresh snapshot at its applied index soon.
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            data: format!("e{index}").into_bytes().into(),
            ..Default::default()
        }
    }

    fn open(dir: &std::path::Path) -> (sled::Db, SledStorage) {
        let db = crate::cluster::store::tests::open_db(dir);
        let s = SledStorage::open(&db).expect("storage");
        (db, s)
    }

    #[test]
    fn append_truncate_compact_and_reopen() {
        let dir =
            std::env::temp_dir().join(format!("cairn-raftlog-{}", crate::types::Id128::random()));
        {
            let (db, s) = open(&dir);
            assert!(s.is_empty());
            assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (1, 0));
            s.append(&(1..=10).map(|i| entry(i, 1)).collect::<Vec<_>>())
                .unwrap();
            assert_eq!(s.last_index().unwrap(), 10);
            // A new leader overwrites 6.. with term 2 entries.
            s.append(&[entry(6, 2), entry(7, 2)]).unwrap();
            assert_eq!(s.last_index().unwrap(), 7);
            assert_eq!(s.term(7).unwrap(), 2);
            assert_eq!(s.term(5).unwrap(), 1);
            let got = s
                .entries(3, 8, None, GetEntriesContext::empty(false))
                .unwrap();
            assert_eq!(
                got.iter().map(|e| e.index).collect::<Vec<_>>(),
                vec![3, 4, 5, 6, 7]
            );
            assert!(s
                .entries(3, 9, None, GetEntriesContext::empty(false))
                .is_err());
            let hs = HardState {
                term: 2,
                commit: 7,
                ..Default::default()
            };
            s.set_hard_state(&hs).unwrap();
            let mut snap = Snapshot::default();
            snap.mut_metadata().index = 5;
            snap.mut_metadata().term = 1;
            snap.data = b"state".to_vec().into();
            s.compact(&snap).unwrap();
            assert_eq!(s.first_index().unwrap(), 6);
            assert_eq!(s.term(5).unwrap(), 1);
            assert!(matches!(
                s.term(4),
                Err(raft::Error::Store(StorageError::Compacted))
            ));
            assert!(matches!(
                s.entries(4, 6, None, GetEntriesContext::empty(false)),
                Err(raft::Error::Store(StorageError::Compacted))
            ));
            db.flush().unwrap();
        }
        let (_db, s) = open(&dir);
        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (6, 7));
        assert_eq!(s.initial_state().unwrap().hard_state.commit, 7);
        assert_eq!(s.latest_snapshot().unwrap().data.as_ref(), b"state");
        assert!(matches!(
            s.snapshot(6, 2),
            Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable
            ))
        ));
        // Installing a leader's snapshot past the log drops the whole log.
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = 20;
        snap.mut_metadata().term = 3;
        s.apply_snapshot(&snap).unwrap();
        assert_eq!(
            (s.first_index().unwrap(), s.last_index().unwrap()),
            (21, 20)
        );
        assert_eq!(s.hard_state().unwrap().commit, 20);
        std::fs::remove_dir_all(&dir).ok();
    }
}
