//! The `Peer` gRPC service every node serves on its peer address: Raft
//! messages in, join requests, and proposals forwarded by followers. The
//! store is set once it is open; until then every call answers UNAVAILABLE.
//! Store calls that block run on the blocking pool.

use std::sync::{Arc, OnceLock};

use cairn_proto::peer::peer_server::Peer;
use cairn_proto::peer::{
    JoinReply, JoinRequest, ProposeReply, ProposeRequest, RaftAck, RaftMessage, RemoveNodeReply,
    RemoveNodeRequest, TakeSnapshotReply, TakeSnapshotRequest,
};
use protobuf::Message as _;
use tonic::{Request, Response, Status};

use super::state::Command;
use super::store::{ClusterStore, StoreError, PROPOSE_TIMEOUT};
use crate::types::{NodeId, SnapshotId, VolumeId};
use crate::volume::VolumeError;

pub use super::transport::{client, client_with_timeout};

#[derive(Clone, Default)]
pub struct PeerService {
    pub store: Arc<OnceLock<Arc<ClusterStore>>>,
    /// This node's volumes, set once the volume manager is open.
    pub volumes: Arc<OnceLock<Arc<dyn PeerVolumes>>>,
}

/// What other nodes ask of this node's volume manager.
pub trait PeerVolumes: Send + Sync {
    /// Takes recorded snapshot `snapshot` of `volume`, attached here at
    /// `epoch`, through this node's engine; returns the nodes whose
    /// replicas took it.
    fn take_snapshot(
        &self,
        volume: VolumeId,
        snapshot: SnapshotId,
        epoch: u64,
        freeze: bool,
    ) -> Result<Vec<NodeId>, VolumeError>;
}

/// Metadata key of the REST API's error code in a failed peer call's
/// status, so the asking node answers with the same code.
pub const API_CODE_KEY: &str = "cairn-api-code";

/// `e` as a gRPC status: its code, its message, and the REST API's code.
fn volume_status(e: VolumeError) -> Status {
    let (_, api) = crate::api::status_and_code(&e);
    let mut s = Status::new(e.grpc_code(), e.to_string());
    if let Ok(v) = api.parse() {
        s.metadata_mut().insert(API_CODE_KEY, v);
    }
    s
}

impl PeerService {
    // tonic's Status is large; these helpers return it because every caller
    // hands it straight back to tonic.
    #[allow(clippy::result_large_err)]
    fn store(&self) -> Result<Arc<ClusterStore>, Status> {
        self.store
            .get()
            .cloned()
            .ok_or_else(|| Status::unavailable("this node is still starting"))
    }

    #[allow(clippy::result_large_err)]
    fn check_cluster(store: &ClusterStore, cluster_id: &str) -> Result<(), Status> {
        let ours = store.read().cluster_id.to_string();
        if cluster_id != ours {
            return Err(Status::failed_precondition(format!(
                "this node belongs to cluster {ours}, not {cluster_id}"
            )));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl Peer for PeerService {
    async fn raft(&self, req: Request<RaftMessage>) -> Result<Response<RaftAck>, Status> {
        let store = self.store()?;
        let req = req.into_inner();
        Self::check_cluster(&store, &req.cluster_id)?;
        let m = raft::prelude::Message::parse_from_bytes(&req.message)
            .map_err(|e| Status::invalid_argument(format!("raft message: {e}")))?;
        if !store.step(m, &req.from_address) {
            return Err(Status::resource_exhausted("raft queue full"));
        }
        Ok(Response::new(RaftAck {}))
    }

    async fn join(&self, req: Request<JoinRequest>) -> Result<Response<JoinReply>, Status> {
        let store = self.store()?;
        let req = req.into_inner();
        let r = tokio::task::spawn_blocking(move || store.join(&req))
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        match r {
            Ok(reply) => Ok(Response::new(reply)),
            Err(StoreError::Refused(e)) => Err(Status::already_exists(e.to_string())),
            Err(StoreError::Rejected(m)) => Err(Status::failed_precondition(m)),
            Err(e @ StoreError::Unavailable(_)) => Err(Status::unavailable(e.to_string())),
            Err(e) => Err(Status::internal(e.to_string())),
        }
    }

    async fn propose(
        &self,
        req: Request<ProposeRequest>,
    ) -> Result<Response<ProposeReply>, Status> {
        let store = self.store()?;
        let req = req.into_inner();
        Self::check_cluster(&store, &req.cluster_id)?;
        let cmd: Command = super::state::decode_command(&req.command)
            .map_err(|e| Status::invalid_argument(format!("command: {e}")))?;
        let now = crate::types::now_unix_ms();
        if req.deadline_unix_ms != 0 && now >= req.deadline_unix_ms {
            return Err(Status::deadline_exceeded(
                "the proposer's deadline has passed",
            ));
        }
        let left = std::time::Duration::from_millis(req.deadline_unix_ms.saturating_sub(now))
            .min(PROPOSE_TIMEOUT);
        let left = if req.deadline_unix_ms == 0 {
            PROPOSE_TIMEOUT
        } else {
            left
        };
        let r = tokio::task::spawn_blocking(move || {
            store.propose_local(cmd, std::time::Instant::now() + left)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(match r {
            Ok(state) => ProposeReply {
                applied_index: state.applied,
                error_code: String::new(),
                error: String::new(),
            },
            Err(e) => ProposeReply {
                applied_index: 0,
                error_code: "error".into(),
                error: serde_json::to_string(&e).unwrap_or_else(|_| e.to_string()),
            },
        }))
    }

    async fn remove_node(
        &self,
        req: Request<RemoveNodeRequest>,
    ) -> Result<Response<RemoveNodeReply>, Status> {
        let store = self.store()?;
        let req = req.into_inner();
        Self::check_cluster(&store, &req.cluster_id)?;
        let r = tokio::task::spawn_blocking(move || store.remove_node(&req.name, req.force))
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        match r {
            Ok(()) => Ok(Response::new(RemoveNodeReply {})),
            Err(StoreError::Rejected(m)) => Err(Status::failed_precondition(m)),
            Err(e @ StoreError::Unavailable(_)) => Err(Status::unavailable(e.to_string())),
            Err(e) => Err(Status::internal(e.to_string())),
        }
    }

    async fn take_snapshot(
        &self,
        req: Request<TakeSnapshotRequest>,
    ) -> Result<Response<TakeSnapshotReply>, Status> {
        let store = self.store()?;
        let req = req.into_inner();
        Self::check_cluster(&store, &req.cluster_id)?;
        let volumes = self
            .volumes
            .get()
            .cloned()
            .ok_or_else(|| Status::unavailable("this node is still starting"))?;
        let volume: VolumeId = req
            .volume_id
            .parse()
            .map_err(|e| Status::invalid_argument(format!("volume id: {e}")))?;
        let snapshot: SnapshotId = req
            .snapshot_id
            .parse()
            .map_err(|e| Status::invalid_argument(format!("snapshot id: {e}")))?;
        let nodes = tokio::task::spawn_blocking(move || {
            volumes.take_snapshot(volume, snapshot, req.epoch, req.freeze)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(volume_status)?;
        Ok(Response::new(TakeSnapshotReply {
            nodes: nodes.iter().map(|n| n.to_string()).collect(),
        }))
    }
}
