//! The volume engine: exactly one per open volume on this node. Frontends
//! (FUSE file, NBD) call it; it bounds-checks, fans writes out to every
//! replica, reads from the first (local) one, and keeps the volume's metrics.
//!
//! The replica set is a list behind the [`Replica`] trait so remote replicas
//! slot in beside the local one; with one replica the fan-out is a loop of one.
//! Durability: `write` returns after every replica accepted the data; `flush`
//! returns after every replica made all earlier acknowledged writes durable.

pub mod metrics;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use metrics::VolumeMetrics;

use crate::replica::{LocalReplica, ReplicaError};
use crate::types::VolumeId;

/// What the engine needs of a replica, local or (later) remote.
pub trait Replica: Send + Sync {
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ReplicaError>;
    fn write(&self, offset: u64, buf: &[u8]) -> Result<(), ReplicaError>;
    fn zero_range(&self, offset: u64, len: u64) -> Result<(), ReplicaError>;
    fn flush(&self) -> Result<(), ReplicaError>;
}

impl Replica for LocalReplica {
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ReplicaError> {
        LocalReplica::read(self, offset, buf)
    }
    fn write(&self, offset: u64, buf: &[u8]) -> Result<(), ReplicaError> {
        LocalReplica::write(self, offset, buf)
    }
    fn zero_range(&self, offset: u64, len: u64) -> Result<(), ReplicaError> {
        LocalReplica::zero_range(self, offset, len)
    }
    fn flush(&self) -> Result<(), ReplicaError> {
        LocalReplica::flush(self)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("request [{offset}, +{len}) is beyond the end of the volume ({size} bytes)")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error(transparent)]
    Replica(#[from] ReplicaError),
}

impl EngineError {
    pub fn errno(&self) -> i32 {
        match self {
            EngineError::OutOfRange { .. } => libc::EINVAL,
            EngineError::Replica(r) => r.errno(),
        }
    }
}

pub struct Engine {
    pub volume: VolumeId,
    size: AtomicU64,
    replicas: Vec<Arc<dyn Replica>>,
    pub metrics: Arc<VolumeMetrics>,
}

impl Engine {
    pub fn new(
        volume: VolumeId,
        size_bytes: u64,
        replicas: Vec<Arc<dyn Replica>>,
        metrics: Arc<VolumeMetrics>,
    ) -> Engine {
        assert!(!replicas.is_empty(), "an engine needs at least one replica");
        Engine {
            volume,
            size: AtomicU64::new(size_bytes),
            replicas,
            metrics,
        }
    }

    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Volumes only grow; the caller recorded the new size in the cluster state.
    pub fn set_size(&self, size_bytes: u64) {
        self.size.fetch_max(size_bytes, Ordering::AcqRel);
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), EngineError> {
        let size = self.size();
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(EngineError::OutOfRange { offset, len, size });
        }
        Ok(())
    }

    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), EngineError> {
        let t = Instant::now();
        let r = self
            .check(offset, buf.len() as u64)
            .and_then(|_| Ok(self.replicas[0].read(offset, buf)?));
        self.metrics
            .record_read(buf.len() as u64, t.elapsed(), r.is_ok());
        r
    }

    pub fn write(&self, offset: u64, buf: &[u8]) -> Result<(), EngineError> {
        let t = Instant::now();
        let r = self.check(offset, buf.len() as u64).and_then(|_| {
            for rep in &self.replicas {
                rep.write(offset, buf)?;
            }
            Ok(())
        });
        self.metrics
            .record_write(buf.len() as u64, t.elapsed(), r.is_ok());
        r
    }

    /// TRIM/discard and write-zeroes: the range reads as zeros afterwards.
    pub fn zero_range(&self, offset: u64, len: u64) -> Result<(), EngineError> {
        let r = self.check(offset, len).and_then(|_| {
            for rep in &self.replicas {
                rep.zero_range(offset, len)?;
            }
            Ok(())
        });
        self.metrics.record_discard(len, r.is_ok());
        r
    }

    pub fn flush(&self) -> Result<(), EngineError> {
        let t = Instant::now();
        let r = (|| {
            for rep in &self.replicas {
                rep.flush()?;
            }
            Ok(())
        })();
        self.metrics.record_flush(t.elapsed(), r.is_ok());
        r
    }
}
