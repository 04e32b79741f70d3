//! A replica on another node, reached over the data protocol
//! (`proto/cairn/v1/data.proto`). Every call is bounded by a timeout, so a
//! dead or partitioned node shows up as an error the engine can act on
//! instead of a hang.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_proto::data::data_client::DataClient;
use cairn_proto::data::{
    ChecksumsRequest, FlushRequest, Header, OpenRequest, ReadRequest, WriteRequest, ZeroRequest,
    DATA_PROTOCOL_VERSION,
};
use prost::bytes::Bytes;
use tonic::transport::Channel;

use super::ReplicaError;
use crate::types::{NodeId, VolumeId};

/// Bound on one I/O to a remote replica: the longest stall an application
/// sees before a replica is declared failed.
pub const IO_TIMEOUT: Duration = Duration::from_secs(3);
/// Bound on a checksum batch (it reads up to `CHECKSUM_BATCH` extents).
const SCAN_TIMEOUT: Duration = Duration::from_secs(60);
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
    cluster_id: Arc<str>,
    volume: Arc<str>,
}

fn status_err(epoch: u64, s: tonic::Status) -> ReplicaError {
    match s.code() {
        tonic::Code::Aborted => {
            let fence = s
                .metadata()
                .get("cairn-fence")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .unwrap_or(epoch + 1);
            ReplicaError::Fenced { epoch, fence }
        }
        tonic::Code::ResourceExhausted => ReplicaError::NoSpace,
        tonic::Code::DataLoss => ReplicaError::Corrupt(s.message().to_string()),
        _ => ReplicaError::Remote(format!("{:?}: {}", s.code(), s.message())),
    }
}

async fn bounded<T>(
    epoch: u64,
    limit: Duration,
    f: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, ReplicaError> {
    match tokio::time::timeout(limit, f).await {
        Err(_) => Err(ReplicaError::Remote(format!("no answer within {limit:?}"))),
        Ok(Err(s)) => Err(status_err(epoch, s)),
        Ok(Ok(r)) => Ok(r.into_inner()),
    }
}

impl RemoteReplica {
    pub fn new(
        channels: &Channels,
        node: NodeId,
        address: &str,
        cluster_id: String,
        volume: VolumeId,
    ) -> Result<RemoteReplica, ReplicaError> {
        let client = DataClient::new(channels.get(address)?)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        Ok(RemoteReplica {
            node,
            client,
            cluster_id: cluster_id.into(),
            volume: volume.to_string().into(),
        })
    }

    fn header(&self, epoch: u64) -> Option<Header> {
        Some(Header {
            version: DATA_PROTOCOL_VERSION,
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

    pub async fn write(&self, epoch: u64, offset: u64, data: Bytes) -> Result<(), ReplicaError> {
        let mut c = self.client.clone();
        let req = WriteRequest {
            header: self.header(epoch),
            offset,
            crc32: crc32fast::hash(&data),
            data,
        };
        bounded(epoch, IO_TIMEOUT, c.write(req)).await.map(|_| ())
    }

    pub async fn read(&self, epoch: u64, offset: u64, len: usize) -> Result<Bytes, ReplicaError> {
        let mut c = self.client.clone();
        let req = ReadRequest {
            header: self.header(epoch),
            offset,
            length: len as u32,
        };
        let r = bounded(epoch, IO_TIMEOUT, c.read(req)).await?;
        if r.data.len() != len {
            return Err(ReplicaError::Remote(format!(
                "read returned {} bytes, {len} asked",
                r.data.len()
            )));
        }
        if crc32fast::hash(&r.data) != r.crc32 {
            return Err(ReplicaError::Corrupt(format!(
                "read of {len} bytes at {offset} from node {}",
                self.node
            )));
        }
        Ok(r.data)
    }

    pub async fn zero(&self, epoch: u64, offset: u64, length: u64) -> Result<(), ReplicaError> {
        let mut c = self.client.clone();
        let req = ZeroRequest {
            header: self.header(epoch),
            offset,
            length,
        };
        bounded(epoch, IO_TIMEOUT, c.zero(req)).await.map(|_| ())
    }

    pub async fn flush(&self, epoch: u64) -> Result<(), ReplicaError> {
        let mut c = self.client.clone();
        let req = FlushRequest {
            header: self.header(epoch),
        };
        bounded(epoch, IO_TIMEOUT, c.flush(req)).await.map(|_| ())
    }

    pub async fn checksums(
        &self,
        epoch: u64,
        first: u64,
        count: u64,
    ) -> Result<Vec<Option<u32>>, ReplicaError> {
        let mut c = self.client.clone();
        let req = ChecksumsRequest {
            header: self.header(epoch),
            first_extent: first,
            count: count as u32,
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
