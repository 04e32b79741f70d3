//! The replica control service (gRPC): remote engines open the replicas
//! this node hosts (raising their epoch fence) and read extent checksums
//! for rebuilds, runs snapshot operations on them and reads their snapshots
//! for rebuilds that copy them. Every field is checked before use (version, cluster,
//! volume id, ranges); pool I/O runs on the blocking pool. Reads and writes
//! arrive on the framed path ([`super::wire`]).

use std::sync::{Arc, OnceLock};

use cairn_proto::data::data_server::Data;
use cairn_proto::data::{
    ChecksumsReply, ChecksumsRequest, ExtentChecksum, FreeReply, FreeRequest, Header, OpenReply,
    OpenRequest, ReadSnapshotReply, ReadSnapshotRequest, SnapshotOp, SnapshotReply,
    SnapshotRequest, SnapshotSpace, DATA_PROTOCOL_MIN, DATA_PROTOCOL_VERSION,
};
use tonic::{Request, Response, Status};

use super::host::{Admit, HostMap, Hosted};
use super::ReplicaError;
use crate::cluster::store::ClusterStore;
use crate::pool::IO_ALIGN;
use crate::sys::AlignedBuf;
use crate::types::{SnapshotId, VolumeId, MAX_VOLUME_SIZE};

/// Most extents one checksum request may cover.
pub const MAX_CHECKSUM_EXTENTS: u32 = 256;

#[derive(Clone, Default)]
pub struct DataService {
    pub inner: Arc<OnceLock<(Arc<ClusterStore>, Arc<HostMap>)>>,
}

#[allow(clippy::result_large_err)]
fn snapshot_id(s: &str) -> Result<SnapshotId, Status> {
    s.parse()
        .map_err(|e| Status::invalid_argument(format!("snapshot id: {e}")))
}

/// Frees snapshot `id` of this node's replica of `hosted` once this node
/// has applied `index` and its state no longer lists the snapshot.
#[allow(clippy::result_large_err)]
fn delete_snapshot_blocking(hosted: &Hosted, id: SnapshotId, index: u64) -> Result<(), Status> {
    let store = &hosted.store;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    if !store.wait_until(deadline, |s, _| s.applied >= index) {
        return Err(Status::unavailable(format!(
            "this node has not applied index {index} yet"
        )));
    }
    if store.read().snapshots.contains_key(&id) {
        return Err(Status::failed_precondition(format!(
            "snapshot {id} is still in the cluster state"
        )));
    }
    hosted
        .replica
        .delete_snapshot(id)
        .map_err(ReplicaError::grpc_status)
}

fn spaces(h: &Hosted) -> Vec<SnapshotSpace> {
    h.replica
        .snapshot_space()
        .into_iter()
        .map(|s| SnapshotSpace {
            snapshot_id: s.id.to_string(),
            held_bytes: s.held_bytes,
            exclusive_bytes: s.exclusive_bytes,
        })
        .collect()
}

#[allow(clippy::result_large_err)]
fn check_range(offset: u64, len: u64, limit: u64) -> Result<(), Status> {
    if len > limit {
        return Err(Status::invalid_argument(format!(
            "request of {len} bytes exceeds the limit of {limit}"
        )));
    }
    if offset
        .checked_add(len)
        .is_none_or(|end| end > MAX_VOLUME_SIZE)
    {
        return Err(Status::invalid_argument(format!(
            "range [{offset}, +{len}) is outside any volume"
        )));
    }
    Ok(())
}

type Checked = (Arc<ClusterStore>, Arc<HostMap>, VolumeId, u64);

impl DataService {
    /// Validates the header: protocol version, cluster, volume id.
    #[allow(clippy::result_large_err)]
    fn check(&self, h: Option<Header>) -> Result<Checked, Status> {
        let (store, hosts) = self
            .inner
            .get()
            .cloned()
            .ok_or_else(|| Status::unavailable("this node is still starting"))?;
        let h = h.ok_or_else(|| Status::invalid_argument("missing header"))?;
        if h.version < DATA_PROTOCOL_MIN || h.version > DATA_PROTOCOL_VERSION {
            return Err(Status::failed_precondition(format!(
                "data protocol version {} is not supported (this node speaks {DATA_PROTOCOL_MIN}..={DATA_PROTOCOL_VERSION})",
                h.version
            )));
        }
        let ours = store.read().cluster_id.to_string();
        if h.cluster_id != ours {
            return Err(Status::failed_precondition(format!(
                "this node belongs to cluster {ours}, not {}",
                h.cluster_id
            )));
        }
        let id: VolumeId = h
            .volume_id
            .parse()
            .map_err(|e| Status::invalid_argument(format!("volume id: {e}")))?;
        Ok((store, hosts, id, h.epoch))
    }

    /// Validates the header and finds (or creates) the hosted replica.
    async fn hosted(&self, h: Option<Header>) -> Result<(u64, Arc<Hosted>), Status> {
        let (store, hosts, id, epoch) = self.check(h)?;
        if let Some(hosted) = hosts.get(id) {
            return Ok((epoch, hosted));
        }
        let hosted = tokio::task::spawn_blocking(move || hosts.get_or_create(id, &store))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(ReplicaError::grpc_status)?;
        Ok((epoch, hosted))
    }
}

/// Frees the replica of deleted volume `id` once this node has applied
/// the delete (`index`); returns the bytes given back.
#[allow(clippy::result_large_err)]
fn free_blocking(
    store: &ClusterStore,
    hosts: &HostMap,
    id: VolumeId,
    index: u64,
) -> Result<u64, Status> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    if !store.wait_until(deadline, |s, _| s.applied >= index) {
        return Err(Status::unavailable(format!(
            "this node has not applied index {index} yet"
        )));
    }
    let listed = store
        .read()
        .volumes
        .get(&id)
        .is_some_and(|v| v.has_replica_on(hosts.me));
    if listed {
        return Err(Status::failed_precondition(format!(
            "volume {id} still has a replica on this node"
        )));
    }
    let bytes = hosts.get(id).map_or(0, |h| h.replica.allocated_bytes());
    hosts.destroy(id).map_err(ReplicaError::grpc_status)?;
    Ok(bytes)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ReplicaError> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(ReplicaError::grpc_status)
}

#[tonic::async_trait]
impl Data for DataService {
    async fn open(&self, req: Request<OpenRequest>) -> Result<Response<OpenReply>, Status> {
        let (epoch, h) = self.hosted(req.into_inner().header).await?;
        let (es, allocated) = (h.replica.extent_size(), h.replica.allocated_bytes());
        blocking(move || h.open(epoch)).await?;
        Ok(Response::new(OpenReply {
            version: DATA_PROTOCOL_VERSION,
            extent_size: es,
            allocated_bytes: allocated,
        }))
    }

    async fn checksums(
        &self,
        req: Request<ChecksumsRequest>,
    ) -> Result<Response<ChecksumsReply>, Status> {
        let r = req.into_inner();
        if r.count > MAX_CHECKSUM_EXTENTS {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_CHECKSUM_EXTENTS} extents per request"
            )));
        }
        let (epoch, h) = self.hosted(r.header).await?;
        let es = h.replica.extent_size();
        check_range(
            r.first_extent.saturating_mul(es),
            r.count as u64 * es,
            MAX_VOLUME_SIZE,
        )?;
        let (first, count) = (r.first_extent, r.count as u64);
        let of = if r.snapshot_id.is_empty() {
            None
        } else {
            Some(snapshot_id(&r.snapshot_id)?)
        };
        let how = Admit::of(r.repair);
        let sums = if r.allocation_only {
            h.scan(how, epoch, of, first, count, true)
                .map_err(ReplicaError::grpc_status)?
        } else {
            blocking(move || h.scan(how, epoch, of, first, count, false)).await?
        };
        Ok(Response::new(ChecksumsReply {
            extent_size: es,
            extents: sums
                .into_iter()
                .enumerate()
                .map(|(i, s)| ExtentChecksum {
                    extent: first + i as u64,
                    allocated: s.is_some(),
                    crc32: s.unwrap_or(0),
                })
                .collect(),
        }))
    }

    #[allow(clippy::result_large_err)]
    async fn free(&self, req: Request<FreeRequest>) -> Result<Response<FreeReply>, Status> {
        let r = req.into_inner();
        let (store, hosts, id, _) = self.check(r.header)?;
        let index = r.applied_index;
        let freed = tokio::task::spawn_blocking(move || free_blocking(&store, &hosts, id, index))
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
        Ok(Response::new(FreeReply { freed_bytes: freed }))
    }

    #[allow(clippy::result_large_err)]
    async fn snapshot(
        &self,
        req: Request<SnapshotRequest>,
    ) -> Result<Response<SnapshotReply>, Status> {
        let r = req.into_inner();
        let op = SnapshotOp::try_from(r.op).map_err(|_| {
            Status::invalid_argument(format!("unknown snapshot operation {}", r.op))
        })?;
        let (epoch, h) = self.hosted(r.header).await?;
        let hosted = h.clone();
        match op {
            SnapshotOp::Unspecified => {
                return Err(Status::invalid_argument("no snapshot operation given"))
            }
            SnapshotOp::Take => {
                let id = snapshot_id(&r.snapshot_id)?;
                blocking(move || hosted.take_snapshot(epoch, id)).await?;
            }
            SnapshotOp::Revert => {
                let id = snapshot_id(&r.snapshot_id)?;
                blocking(move || hosted.revert(epoch, id)).await?;
            }
            SnapshotOp::Adopt => {
                let id = snapshot_id(&r.snapshot_id)?;
                blocking(move || hosted.adopt_snapshot(epoch, id)).await?;
            }
            SnapshotOp::Delete => {
                let id = snapshot_id(&r.snapshot_id)?;
                let index = r.applied_index;
                tokio::task::spawn_blocking(move || delete_snapshot_blocking(&hosted, id, index))
                    .await
                    .map_err(|e| Status::internal(e.to_string()))??;
            }
            SnapshotOp::List => {}
        }
        let snapshots = tokio::task::spawn_blocking(move || spaces(&h))
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(SnapshotReply { snapshots }))
    }

    async fn read_snapshot(
        &self,
        req: Request<ReadSnapshotRequest>,
    ) -> Result<Response<ReadSnapshotReply>, Status> {
        let r = req.into_inner();
        let id = snapshot_id(&r.snapshot_id)?;
        let (epoch, h) = self.hosted(r.header).await?;
        let es = h.replica.extent_size();
        check_range(r.offset, r.length, es)?;
        if !r.offset.is_multiple_of(IO_ALIGN as u64) || !r.length.is_multiple_of(IO_ALIGN as u64) {
            return Err(Status::invalid_argument(format!(
                "a snapshot read must be aligned to {IO_ALIGN} bytes"
            )));
        }
        let (offset, length) = (r.offset, r.length as usize);
        let data = blocking(move || {
            let mut buf = AlignedBuf::new(length, IO_ALIGN);
            h.read_snapshot(epoch, id, offset, buf.as_mut_slice())?;
            Ok(buf.as_slice().to_vec())
        })
        .await?;
        let crc32 = crc32fast::hash(&data);
        Ok(Response::new(ReadSnapshotReply {
            data: data.into(),
            crc32,
        }))
    }
}
