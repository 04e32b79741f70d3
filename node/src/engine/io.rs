//! Application I/O through the engine: reads from one healthy replica,
//! writes, zeroing and flushes to every writable one, under the byte-range
//! and stripe locks that order overlapping writes and hold them off while a
//! rebuild or scrub copies an extent.

use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLockReadGuard, RwLockWriteGuard};
use std::time::Instant;

use prost::bytes::Bytes;

use super::fanout::blocking;
use super::*;
use crate::replica::ReplicaError;

impl Engine {
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

    pub(super) fn lock_extent(&self, extent: u64) -> RwLockWriteGuard<'_, ()> {
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

    /// Counts the failures the front doors report by kind (a full pool,
    /// fencing) and remembers the fence for [`Engine::retired`].
    fn noted(&self, r: Result<(), EngineError>) -> Result<(), EngineError> {
        match &r {
            Err(EngineError::Replica(ReplicaError::NoSpace)) => {
                self.metrics.no_space_errors.fetch_add(1, Ordering::Relaxed);
            }
            Err(EngineError::Replica(ReplicaError::Fenced { fence, .. })) => {
                self.fence.fetch_max(*fence, Ordering::AcqRel);
                self.metrics.fenced_errors.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
        r
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
        self.noted(r)
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
        self.noted(r)
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
        self.noted(r)
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
        self.noted(r)
    }
}
