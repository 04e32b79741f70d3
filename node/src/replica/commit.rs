//! Group commit of the node's replica metadata (sled).
//!
//! sled keeps recent inserts in memory buffers until a flush; a daemon killed
//! before its next flush loses them, though the kernel still holds (and, with
//! `O_DIRECT`, has already written) the data they describe. A replica's extent
//! map entry must therefore be durable before the first write into that
//! extent is acknowledged, or a daemon crash turns an acknowledged write into
//! zeros (the FUSE holder keeps the filesystem mounted across the crash, so
//! nothing above would ever notice).
//!
//! Every caller that needs its metadata durable calls [`Meta::commit`]. One
//! of the waiting callers runs the sled flush; everyone who arrived before
//! that flush started is covered by it and returns, the rest wait for the
//! next one. A burst of allocations thus costs one flush, not one each.

use std::sync::{Condvar, Mutex};

/// The node's sled database with group commit.
pub struct Meta {
    pub db: sled::Db,
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

impl Meta {
    pub fn new(db: sled::Db) -> Meta {
        Meta {
            db,
            state: Mutex::new(State::default()),
            done: Condvar::new(),
        }
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
                let r = self.db.flush();
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn concurrent_commits_share_flushes_and_all_return() {
        let dir = std::env::temp_dir().join(format!("cairn-commit-{}", std::process::id()));
        let db = sled::Config::new().path(&dir).open().expect("db");
        let meta = Arc::new(Meta::new(db));
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
        assert_eq!(s.issued, 400);
        assert_eq!(s.durable, 400);
        drop(s);
        assert_eq!(meta.db.len(), 400);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
