//! A replica on another node, reached over the data protocol
//! (`proto/cairn/v1/data.proto`). Every call is bounded by a timeout, so a
//! dead or partitioned node shows up as an error the engine can act on
//! instead of a hang.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_proto::data::data_client::DataClient;
use cairn_proto::data::{
    ChecksumsRequest, FreeRequest, Header, OpenRequest, ReadSnapshotRequest, SnapshotOp,
    SnapshotRequest, SnapshotSpace, DATA_PROTOCOL_MIN, DATA_PROTOCOL_VERSION,
};
use cairn_proto::frame::{self, Request};
use tonic::transport::Channel;

use super::{ReplicaError, IO_TIMEOUT};
use crate::types::{NodeId, SnapshotId, VolumeId};

/// Bound on a checksum batch (it reads up to `CHECKSUM_BATCH` extents).
const SCAN_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on freeing a deleted volume's replica (it zeroes every extent).
const FREE_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on taking a snapshot (a pool sync and a metadata commit).
const TAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on deleting or reverting to a snapshot (copies what changed).
const REWRITE_TIMEOUT: Duration = Duration::from_secs(600);
/// Largest message either side accepts (data requests are at most a few MiB).
pub const MAX_MESSAGE: usize = 64 << 20;

/// One multiplexed connection per peer address, shared by all volumes.
#[derive(Default)]
pub struct Channels {
    map: Mutex<HashMap<String, Channel>>,
}

impl Channels {
    pub fn get(&self, addr: &str) -> Result<Channel, ReplicaError> {
        let mut m = self.map.lock().expect("channels lock");
        if let Some(c) = m.get(addr) {
            return Ok(c.clone());
        }
        let c = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| ReplicaError::Remote(format!("peer address {addr:?}: {e}")))?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(1))
            .keep_alive_timeout(Duration::from_secs(2))
            .connect_lazy();
        m.insert(addr.to_string(), c.clone());
        Ok(c)
    }
}

/// Cheap to clone: one clone per request rides into the spawned future.
#[derive(Clone)]
pub struct RemoteReplica {
    pub node: NodeId,
    client: DataClient<Channel>,
    /// The framed TCP path for reads, writes, flushes and zeroings.
    fast: Arc<super::wire::Pool>,
    cluster_id: Arc<str>,
    volume: Arc<str>,
    cluster_raw: [u8; 16],
    volume_raw: [u8; 16],
}

async fn bounded<T>(
    epoch: u64,
    limit: Duration,
    f: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, ReplicaError> {
    match tokio::time::timeout(limit, f).await {
        Err(_) => Err(ReplicaError::Remote(format!("no answer within {limit:?}"))),
        Ok(Err(s)) => Err(ReplicaError::from_grpc(epoch, s)),
        Ok(Ok(r)) => Ok(r.into_inner()),
    }
}

impl RemoteReplica {
    pub fn new(
        channels: &Channels,
        pools: &super::wire::Pools,
        node: NodeId,
        address: &str,
        cluster_id: crate::types::Id128,
        volume: VolumeId,
    ) -> Result<RemoteReplica, ReplicaError> {
        let client = DataClient::new(channels.get(address)?)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        Ok(RemoteReplica {
            node,
            client,
            fast: pools.get(address)?,
            cluster_id: cluster_id.to_string().into(),
            volume: volume.to_string().into(),
            cluster_raw: cluster_id.0,
            volume_raw: volume.0,
        })
    }

    /// The header of a request of the first protocol version (which nodes
    /// one version older also accept).
    fn header(&self, epoch: u64) -> Option<Header> {
        self.header_of(DATA_PROTOCOL_MIN, epoch)
    }

    fn header_of(&self, version: u32, epoch: u64) -> Option<Header> {
        Some(Header {
            version,
            cluster_id: self.cluster_id.to_string(),
            volume_id: self.volume.to_string(),
            epoch,
        })
    }

    pub async fn open(&self, epoch: u64) -> Result<(), ReplicaError> {
        let mut c = self.client.clone();
        let req = OpenRequest {
            header: self.header(epoch),
        };
        bounded(epoch, IO_TIMEOUT, c.open(req)).await.map(|_| ())
    }

    /// Asks the node to free its copy of this volume, deleted at Raft
    /// index `applied_index`; returns the bytes it gave back to its pool.
    pub async fn free(&self, applied_index: u64) -> Result<u64, ReplicaError> {
        let mut c = self.client.clone();
        let req = FreeRequest {
            header: self.header(0),
            applied_index,
        };
        bounded(0, FREE_TIMEOUT, c.free(req))
            .await
            .map(|r| r.freed_bytes)
    }

    /// Runs snapshot operation `op` on the replica; returns the snapshots
    /// it holds afterwards.
    pub async fn snapshot(
        &self,
        op: SnapshotOp,
        epoch: u64,
        id: Option<SnapshotId>,
        applied_index: u64,
    ) -> Result<Vec<SnapshotSpace>, ReplicaError> {
        let mut c = self.client.clone();
        let req = SnapshotRequest {
            header: self.header_of(DATA_PROTOCOL_VERSION, epoch),
            op: op as i32,
            snapshot_id: id.map(|i| i.to_string()).unwrap_or_default(),
            applied_index,
        };
        let limit = match op {
            SnapshotOp::Take | SnapshotOp::List | SnapshotOp::Unspecified | SnapshotOp::Adopt => {
                TAKE_TIMEOUT
            }
            SnapshotOp::Revert | SnapshotOp::Delete => REWRITE_TIMEOUT,
        };
        bounded(epoch, limit, c.snapshot(req))
            .await
            .map(|r| r.snapshots)
    }

    fn frame(&self, op: u16, epoch: u64, offset: u64, length: u64, crc: u32) -> Request {
        Request {
            version: frame::VERSION,
            op,
            cluster: self.cluster_raw,
            volume: self.volume_raw,
            epoch,
            offset,
            length,
            crc,
        }
    }

    /// Framed calls block the calling thread (engine threads: FUSE, NBD,
    /// healer); the fan-out runs them on the blocking pool.
    pub fn write_blocking(&self, epoch: u64, offset: u64, data: &[u8]) -> Result<(), ReplicaError> {
        self.fast
            .call(&self.write_frame(epoch, offset, data), data)
            .map(|_| ())
    }

    fn write_frame(&self, epoch: u64, offset: u64, data: &[u8]) -> Request {
        self.frame(
            frame::OP_WRITE,
            epoch,
            offset,
            data.len() as u64,
            crc32fast::hash(data),
        )
    }

    /// Sends a write without waiting for its reply: the engine sends a
    /// small write to every remote replica from its own thread, writes the
    /// local replica, then collects the replies.
    pub fn begin_write(
        &self,
        epoch: u64,
        offset: u64,
        data: &[u8],
    ) -> Result<super::wire::Pending<'_>, ReplicaError> {
        self.fast
            .begin(&self.write_frame(epoch, offset, data), data)
    }

    pub fn read_blocking(
        &self,
        epoch: u64,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), ReplicaError> {
        let req = self.frame(frame::OP_READ, epoch, offset, buf.len() as u64, 0);
        let data = self.fast.call(&req, &[])?;
        if data.len() != buf.len() {
            return Err(ReplicaError::Remote(format!(
                "read returned {} bytes, {} asked",
                data.len(),
                buf.len()
            )));
        }
        buf.copy_from_slice(&data);
        Ok(())
    }

    pub fn zero_blocking(&self, epoch: u64, offset: u64, length: u64) -> Result<(), ReplicaError> {
        let req = self.frame(frame::OP_ZERO, epoch, offset, length, 0);
        self.fast.call(&req, &[]).map(|_| ())
    }

    pub fn flush_blocking(&self, epoch: u64) -> Result<(), ReplicaError> {
        let req = self.frame(frame::OP_FLUSH, epoch, 0, 0, 0);
        self.fast.call(&req, &[]).map(|_| ())
    }

    /// A rebuild's catch-up write, zeroing or flush of a faulted replica
    /// (see [`frame::OP_REPAIR_WRITE`]).
    pub fn repair_write_blocking(
        &self,
        epoch: u64,
        offset: u64,
        data: &[u8],
    ) -> Result<(), ReplicaError> {
        let req = self.frame(
            frame::OP_REPAIR_WRITE,
            epoch,
            offset,
            data.len() as u64,
            crc32fast::hash(data),
        );
        self.fast.call(&req, data).map(|_| ())
    }

    pub fn repair_zero_blocking(
        &self,
        epoch: u64,
        offset: u64,
        length: u64,
    ) -> Result<(), ReplicaError> {
        let req = self.frame(frame::OP_REPAIR_ZERO, epoch, offset, length, 0);
        self.fast.call(&req, &[]).map(|_| ())
    }

    pub fn repair_flush_blocking(&self, epoch: u64) -> Result<(), ReplicaError> {
        let req = self.frame(frame::OP_REPAIR_FLUSH, epoch, 0, 0, 0);
        self.fast.call(&req, &[]).map(|_| ())
    }

    /// Reads `buf.len()` bytes at `offset` of snapshot `id` (at most one
    /// extent).
    pub async fn read_snapshot(
        &self,
        epoch: u64,
        id: SnapshotId,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), ReplicaError> {
        let mut c = self.client.clone();
        let req = ReadSnapshotRequest {
            header: self.header_of(DATA_PROTOCOL_VERSION, epoch),
            snapshot_id: id.to_string(),
            offset,
            length: buf.len() as u64,
        };
        let r = bounded(epoch, IO_TIMEOUT, c.read_snapshot(req)).await?;
        if r.data.len() != buf.len() {
            return Err(ReplicaError::Remote(format!(
                "snapshot read returned {} bytes, {} asked",
                r.data.len(),
                buf.len()
            )));
        }
        if crc32fast::hash(&r.data) != r.crc32 {
            return Err(ReplicaError::Remote(
                "snapshot read failed its checksum".into(),
            ));
        }
        buf.copy_from_slice(&r.data);
        Ok(())
    }

    pub async fn checksums(
        &self,
        epoch: u64,
        first: u64,
        count: u64,
    ) -> Result<Vec<Option<u32>>, ReplicaError> {
        self.scan(epoch, Scan::head(), first, count).await
    }

    /// Which extents are allocated (the replica reads nothing).
    pub async fn allocation(
        &self,
        epoch: u64,
        first: u64,
        count: u64,
    ) -> Result<Vec<bool>, ReplicaError> {
        let scan = Scan {
            allocation_only: true,
            ..Scan::head()
        };
        let r = self.scan(epoch, scan, first, count).await?;
        Ok(r.iter().map(Option::is_some).collect())
    }

    /// Checksums (or with `allocation_only`, `Some(0)` for each extent
    /// with data) of the head or a snapshot, as `scan` says.
    pub async fn scan(
        &self,
        epoch: u64,
        scan: Scan,
        first: u64,
        count: u64,
    ) -> Result<Vec<Option<u32>>, ReplicaError> {
        let mut c = self.client.clone();
        // A snapshot's checksums need a node that knows the field (an
        // older one would answer for the head).
        let header = match scan.snapshot {
            Some(_) => self.header_of(DATA_PROTOCOL_VERSION, epoch),
            None => self.header(epoch),
        };
        let req = ChecksumsRequest {
            header,
            first_extent: first,
            count: count as u32,
            allocation_only: scan.allocation_only,
            snapshot_id: scan.snapshot.map(|s| s.to_string()).unwrap_or_default(),
            repair: scan.repair,
        };
        let r = bounded(epoch, SCAN_TIMEOUT, c.checksums(req)).await?;
        if r.extents.len() as u64 != count {
            return Err(ReplicaError::Remote(format!(
                "checksums returned {} extents, {count} asked",
                r.extents.len()
            )));
        }
        Ok(r.extents
            .iter()
            .map(|e| e.allocated.then_some(e.crc32))
            .collect())
    }
}

/// What a checksum request covers.
#[derive(Debug, Clone, Copy)]
pub struct Scan {
    /// A snapshot's extents instead of the head's.
    pub snapshot: Option<SnapshotId>,
    /// Which extents have data, read from the map alone.
    pub allocation_only: bool,
    /// A rebuild's catch-up of a faulted replica (see [`super::host::Admit`]).
    pub repair: bool,
}

impl Scan {
    pub fn head() -> Scan {
        Scan {
            snapshot: None,
            allocation_only: false,
            repair: false,
        }
    }
}
