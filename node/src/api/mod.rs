//! The REST admin API under `/v1` (axum, JSON), `/v1/openapi.json` and
//! `/metrics`. This is the one place where [`VolumeError`]s become HTTP
//! statuses and stable error codes. Bodies are parsed strictly (unknown
//! fields refused) and every volume-manager call runs on the blocking pool,
//! because attach and mount run programs and syscalls that block.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use cairn_proto::api::{self, MountRequest, VolumeCreate, VolumeUpdate};

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::cluster::state::NodeRole;
use crate::cluster::store::ClusterStore;
use crate::volume::{VolumeError, VolumeManager};

mod convert;
mod error;
mod snapshots;
pub use error::{status_and_code, ApiError};

/// The OpenAPI description, generated from the request and answer types
/// (`cairn_proto::api`, `utoipa::ToSchema`) and the handlers' `path`
/// attributes below.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "Cairn admin API",
        description = "Volumes, snapshots, pool and node status of one Cairn node. Errors are {\"error\":{\"code\",\"message\"}} with a stable code. Request bodies reject unknown fields."
    ),
    paths(
        list_volumes,
        create_volume,
        get_volume,
        update_volume,
        delete_volume,
        attach,
        detach,
        mount,
        unmount,
        verify,
        snapshots::list_snapshots,
        snapshots::list_volume_snapshots,
        snapshots::create_snapshot,
        snapshots::get_snapshot,
        snapshots::delete_snapshot,
        snapshots::revert,
        pool,
        node,
        nodes,
        remove_node,
        cluster,
        openapi,
        metrics
    )
)]
struct ApiDoc;

/// The OpenAPI description as JSON.
pub fn openapi_json() -> &'static str {
    static JSON: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        use utoipa::OpenApi;
        ApiDoc::openapi()
            .to_pretty_json()
            .expect("an OpenAPI document always serialises")
    });
    &JSON
}

#[derive(Clone)]
pub struct ApiState {
    pub mgr: Arc<VolumeManager>,
    pub store: Arc<ClusterStore>,
    pub node: Arc<NodeFacts>,
    /// `--api-mount-root`: mount and unmount paths must lie below it.
    pub mount_root: Option<Arc<std::path::Path>>,
}

/// Refuses a mount path outside `--api-mount-root` (before anything is
/// looked up, so the answer says nothing about the volume).
fn within_mount_root(s: &ApiState, path: &str) -> Result<(), ApiError> {
    let Some(root) = &s.mount_root else {
        return Ok(());
    };
    // The manager's own rules first (absolute, no `..`, not its FUSE
    // directory), then the root.
    let p = s.mgr.check_mount_target(path)?;
    if p.starts_with(root) && p != **root {
        Ok(())
    } else {
        Err(VolumeError::InvalidPath(format!(
            "{path:?} is not below {}, the only place this node mounts volumes for the API (--api-mount-root)",
            root.display()
        ))
        .into())
    }
}

/// Static facts about this node for `/v1/node`.
pub struct NodeFacts {
    pub name: String,
    pub data_dir: String,
    pub api_listen: String,
    pub nbd_socket: String,
    pub nbd_listen: Option<String>,
}

type ApiResult<T> = Result<T, ApiError>;

/// Parses a JSON body strictly, with serde's message (line, column, field).
fn parse_body<T: DeserializeOwned>(body: &Bytes) -> ApiResult<T> {
    if body.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "InvalidBody",
            "request body is empty; a JSON object is required",
        ));
    }
    serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "InvalidBody",
            format!("invalid JSON body: {e}"),
        )
    })
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, VolumeError> + Send + 'static,
) -> ApiResult<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(ApiError::from),
        Err(e) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Internal",
            format!("operation aborted: {e}"),
        )),
    }
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/volumes", get(list_volumes).post(create_volume))
        .route(
            "/v1/volumes/{name}",
            get(get_volume).patch(update_volume).delete(delete_volume),
        )
        .route("/v1/volumes/{name}/attach", post(attach))
        .route("/v1/volumes/{name}/detach", post(detach))
        .route("/v1/volumes/{name}/mount", post(mount))
        .route("/v1/volumes/{name}/unmount", post(unmount))
        .route("/v1/volumes/{name}/verify", post(verify))
        .route(
            "/v1/volumes/{name}/snapshots",
            get(snapshots::list_volume_snapshots).post(snapshots::create_snapshot),
        )
        .route(
            "/v1/volumes/{name}/snapshots/{snapshot}",
            get(snapshots::get_snapshot).delete(snapshots::delete_snapshot),
        )
        .route("/v1/volumes/{name}/revert", post(snapshots::revert))
        .route("/v1/snapshots", get(snapshots::list_snapshots))
        .route("/v1/pool", get(pool))
        .route("/v1/node", get(node))
        .route("/v1/nodes", get(nodes))
        .route("/v1/nodes/{name}", axum::routing::delete(remove_node))
        .route("/v1/cluster", get(cluster))
        .route("/v1/openapi.json", get(openapi))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "NotFound", "no such endpoint") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                "method not allowed on this endpoint",
            )
        })
        .with_state(state)
}

#[utoipa::path(
    get,
    path = "/v1/volumes",
    operation_id = "listVolumes",
    responses(
        (status = 200, description = "Every volume", body = Vec<api::VolumeInfo>),
        (status = 503, description = "Cluster metadata unavailable (no quorum) or shutting down", body = api::ErrorBody)
    )
)]
async fn list_volumes(State(s): State<ApiState>) -> ApiResult<Json<Vec<api::VolumeInfo>>> {
    let m = s.mgr.clone();
    Ok(Json(
        blocking(move || {
            m.sync_read()?;
            Ok(m.list().into_iter().map(Into::into).collect())
        })
        .await?,
    ))
}

#[utoipa::path(
    post,
    path = "/v1/volumes",
    operation_id = "createVolume",
    request_body = api::VolumeCreate,
    responses(
        (status = 201, description = "Created", body = api::VolumeInfo),
        (status = 400, description = "Invalid request", body = api::ErrorBody),
        (status = 404, description = "A clone's source volume or snapshot does not exist", body = api::ErrorBody),
        (status = 409, description = "Conflict (in use, attached elsewhere, fenced, exists, source snapshot not ready)", body = api::ErrorBody),
        (status = 500, description = "Internal error", body = api::ErrorBody),
        (status = 503, description = "Cluster metadata unavailable (no quorum) or shutting down", body = api::ErrorBody),
        (status = 507, description = "The pool is full", body = api::ErrorBody)
    )
)]
async fn create_volume(
    State(s): State<ApiState>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<api::VolumeInfo>)> {
    let req: VolumeCreate = parse_body(&body)?;
    let req = crate::volume::CreateVolume::try_from(req)?;
    let m = s.mgr.clone();
    Ok((
        StatusCode::CREATED,
        Json(blocking(move || m.create(&req)).await?.into()),
    ))
}

#[utoipa::path(
    get,
    path = "/v1/volumes/{name}",
    operation_id = "getVolume",
    params(
        ("name" = String, Path, description = "Volume name")
    ),
    responses(
        (status = 200, description = "The volume", body = api::VolumeInfo),
        (status = 400, description = "Invalid request", body = api::ErrorBody),
        (status = 404, description = "Not found", body = api::ErrorBody),
        (status = 503, description = "Cluster metadata unavailable (no quorum) or shutting down", body = api::ErrorBody)
    )
)]
async fn get_volume(
    State(s): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<Json<api::VolumeInfo>> {
    let m = s.mgr.clone();
    Ok(Json(
        blocking(move || {
            m.sync_read()?;
            m.inspect(&name)
        })
        .await?
        .into(),
    ))
}

#[utoipa::path(
    patch,
    path = "/v1/volumes/{name}",
    operation_id = "updateVolume",
    request_body = api::VolumeUpdate,
    params(
        ("name" = String, Path, description = "Volume name")
    ),
    responses(
        (status = 200, description = "Updated", body = api::VolumeInfo),
        (status = 400, description = "Invalid request", body = api::ErrorBody),
        (status = 404, description = "Not found", body = api::ErrorBody),
        (status = 409, description = "Conflict (in use, attached elsewhere, fenced, exists)", body = api::ErrorBody),
        (status = 500, description = "Internal error", body = api::ErrorBody),
        (status = 503, description = "Cluster metadata unavailable (no quorum) or shutting down", body = api::ErrorBody),
        (status = 507, description = "The pool is full", body = api::ErrorBody)
    )
)]
async fn update_volume(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Json<api::VolumeInfo>> {
    let req: VolumeUpdate = parse_body(&body)?;
    if req.size.is_none() && req.replicas.is_none() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "InvalidBody",
            "nothing to update: give size and/or replicas",
        ));
    }
    let m = s.mgr.clone();
    Ok(Json(
        blocking(move || {
            if let Some(n) = req.replicas {
                m.set_replicas(&name, n)?;
            }
            match &req.size {
                Some(size) => m.resize(&name, size),
                None => m.inspect(&name),
            }
        })
        .await?
        .into(),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeleteQuery {
    #[serde(default)]
    force: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VolumeDeleteQuery {
    #[serde(default)]
    force: bool,
    #[serde(default)]
    keep_snapshots: bool,
}

/// The `?force=` flag of the DELETE endpoints; any other parameter is refused.
fn force_flag(
    q: Result<Query<DeleteQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<bool> {
    q.map(|Query(q)| q.force)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "InvalidQuery", e.body_text()))
}

#[utoipa::path(
    delete,
    path = "/v1/volumes/{name}",
    operation_id = "deleteVolume",
    params(
        ("name" = String, Path, description = "Volume name"),
        ("force" = Option<bool>, Query, description = "Detach and unmount first"),
        ("keep_snapshots" = Option<bool>, Query, description = "Delete a detached volume that has snapshots and keep them (listed, usable as clone sources, deletable); the volume's space and name are released with its last snapshot")
    ),
    responses(
        (status = 204, description = "Deleted, every replica freed (or, with keep_snapshots, kept for its snapshots)"),
        (status = 202, description = "Deleted; some replicas are freed when their nodes answer again", body = api::VolumeDeleted),
        (status = 400, description = "Invalid request", body = api::ErrorBody),
        (status = 404, description = "Not found", body = api::ErrorBody),
        (status = 409, description = "Conflict (in use, attached elsewhere, fenced, exists)", body = api::ErrorBody),
        (status = 500, description = "Internal error", body = api::ErrorBody),
        (status = 503, description = "Cluster metadata unavailable (no quorum) or shutting down", body = api::ErrorBody)
    )
)]
async fn delete_volume(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    q: Result<Query<VolumeDeleteQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<axum::response::Response> {
    let Query(q) =
        q.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "InvalidQuery", e.body_text()))?;
    let m = s.mgr.clone();
    let pending = blocking(move || {
        if q.keep_snapshots {
            m.delete_keeping_snapshots(&name, q.force)
        } else {
            m.delete(&name, q.force)
        }
    })
    .await?;
    if pending.is_empty() {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    let body = api::VolumeDeleted {
        space_pending_on: pending,
    };
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

/// Attach/detach take no body; anything but nothing or `{}` is refused.
fn empty_body(body: &Bytes) -> ApiResult<()> {
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok(());
    }
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Empty {}
    parse_body::<Empty>(body).map(|_| ())
}

#[utoipa::path(
    post,
    path = "/v1/volumes/{name}/attach",
    operation_id = "attachVolume",
    request_body = Option<api::AttachRequest>,
    params(
        ("name" = String, Path, description = "Volume name")
    ),
    responses(
        (status = 200, description = "Attached: the block device", body = api::AttachInfo),
        (status = 400, description = "Invalid request", body = api::ErrorBody),
        (status = 404, description = "Not found", body = api::ErrorBody),
        (status = 409, description = "Conflict (in use, attached elsewhere, fenced, exists)", body = api::ErrorBody),
        (status = 500, description = "Internal error", body = api::ErrorBody),
        (status = 503, description = "Cluster metadata unavailable (no quorum) or shutting down", body = api::ErrorBody),
        (status = 507, description = "The pool is full", body = api::ErrorBody)
    )
)]
async fn attach(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Json<api::AttachInfo>> {
    // No body, or JSON `null`, is no options (the description's optional body).
    let req: api::AttachRequest = if body.is_empty() {
        Default::default()
    } else {
        parse_body::<Option<api::AttachRequest>>(&body)?.unwrap_or_default()
    };
    let m = s.mgr.clone();
    let device = blocking(move || m.attach(&name, req.force)).await?;
    Ok(Json(api::AttachInfo { device }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VerifyQuery {
    #[serde(default)]
    repair: bool,
}

#[utoipa::path(
    post,
    path = "/v1/volumes/{name}/verify",
    operation_id = "verifyVolume",
    params(
        ("name" = String, Path, description = "Volume name"),
        ("repair" = Option<bool>, Query, description = "Rewrite differing extents")
    ),
    responses(
        (status = 200, description = "The comparison", body = api::VerifyReport),
        (status = 400, description = "Invalid request", body = api::ErrorBody),
        (status = 404, description = "Not found", body = api::ErrorBody),
        (status = 409, description = "Conflict (in use, attached elsewhere, fenced, exists)", body = api::ErrorBody),
        (status = 500, description = "Internal error", body = api::ErrorBody),
        (status = 503, description = "Cluster metadata unavailable (no quorum) or shutting down", body = api::ErrorBody)
    )
)]
async fn verify(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    q: Result<Query<VerifyQuery>, axum::extract::rejection::QueryRejection>,
    body: Bytes,
) -> ApiResult<Json<api::VerifyReport>> {
    let Query(q) =
        q.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "InvalidQuery", e.body_text()))?;
    empty_body(&body)?;
    let m = s.mgr.clone();
    Ok(Json(
        blocking(move || m.verify(&name, q.repair).map(api::VerifyReport::from)).await?,
    ))
}

#[utoipa::path(
    post,
    path = "/v1/volumes/{name}/detach",
    operation_id = "detachVolume",
    params(
        ("name" = String, Path, description = "Volume name")
    ),
    responses(
        (status = 200, description = "Detached", body = api::VolumeInfo),
        (status = 400, description = "Invalid request", body = api::ErrorBody),
        (status = 404, description = "Not found", body = api::ErrorBody),
        (status = 409, description = "Conflict (in use, attached elsewhere, fenced, exists)", body = api::ErrorBody),
        (status = 500, description = "Internal error", body = api::ErrorBody),
        (status = 503, description = "Cluster metadata unavailable (no quorum) or shutting down", body = api::ErrorBody)
    )
)]
async fn detach(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Json<api::VolumeInfo>> {
    empty_body(&body)?;
    let m = s.mgr.clone();
    Ok(Json(
        blocking(move || m.detach(&name).and_then(|_| m.inspect(&name)))
            .await?
            .into(),
    ))
}

#[utoipa::path(
    post,
    path = "/v1/volumes/{name}/mount",
    operation_id = "mountVolume",
    request_body = api::MountRequest,
    params(
        ("name" = String, Path, description = "Volume name")
    ),
    responses(
        (status = 200, description = "Mounted", body = api::VolumeInfo),
        (status = 400, description = "Invalid request", body = api::ErrorBody),
        (status = 404, description = "Not found", body = api::ErrorBody),
        (status = 409, description = "Conflict (in use, attached elsewhere, fenced, exists)", body = api::ErrorBody),
        (status = 500, description = "Internal error", body = api::ErrorBody),
        (status = 503, description = "Cluster metadata unavailable (no quorum) or shutting down", body = api::ErrorBody),
        (status = 507, description = "The pool is full", body = api::ErrorBody)
    )
)]
async fn mount(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Json<api::VolumeInfo>> {
    let req: MountRequest = parse_body(&body)?;
    within_mount_root(&s, &req.path)?;
    let m = s.mgr.clone();
    Ok(Json(
        blocking(move || m.mount(&name, &req.path, req.force))
            .await?
            .into(),
    ))
}

#[utoipa::path(
    post,
    path = "/v1/volumes/{name}/unmount",
    operation_id = "unmountVolume",
    request_body = api::MountRequest,
    params(
        ("name" = String, Path, description = "Volume name")
    ),
    responses(
        (status = 200, description = "Unmounted", body = api::VolumeInfo),
        (status = 400, description = "Invalid request", body = api::ErrorBody),
        (status = 404, description = "Not found", body = api::ErrorBody),
        (status = 409, description = "Conflict (in use, attached elsewhere, fenced, exists)", body = api::ErrorBody),
        (status = 500, description = "Internal error", body = api::ErrorBody),
        (status = 503, description = "Cluster metadata unavailable (no quorum) or shutting down", body = api::ErrorBody)
    )
)]
async fn unmount(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Json<api::VolumeInfo>> {
    let req: MountRequest = parse_body(&body)?;
    within_mount_root(&s, &req.path)?;
    let m = s.mgr.clone();
    Ok(Json(
        blocking(move || m.unmount(&name, &req.path)).await?.into(),
    ))
}

#[utoipa::path(
    get,
    path = "/v1/pool",
    operation_id = "getPool",
    responses(
        (status = 200, description = "This node's pool", body = api::PoolInfo),
        (status = 500, description = "Internal error", body = api::ErrorBody)
    )
)]
async fn pool(State(s): State<ApiState>) -> ApiResult<Json<api::PoolInfo>> {
    let m = s.mgr.clone();
    Ok(Json(blocking(move || Ok(m.pool_info().into())).await?))
}

#[utoipa::path(
    get,
    path = "/v1/node",
    operation_id = "getNode",
    responses(
        (status = 200, description = "This node", body = api::NodeStatus),
        (status = 500, description = "Internal error", body = api::ErrorBody)
    )
)]
async fn node(State(s): State<ApiState>) -> ApiResult<Json<api::NodeStatus>> {
    let m = s.mgr.clone();
    let f = s.node.clone();
    Ok(Json(
        blocking(move || {
            let (volumes, attached) = m.counts();
            Ok(api::NodeStatus {
                id: m.node_id().to_string(),
                name: f.name.clone(),
                version: env!("CARGO_PKG_VERSION").into(),
                data_dir: f.data_dir.clone(),
                api_listen: f.api_listen.clone(),
                nbd_socket: f.nbd_socket.clone(),
                nbd_listen: f.nbd_listen.clone(),
                volumes,
                attached_volumes: attached,
                pool_capacity_bytes: m.pool().capacity_bytes(),
                pool_allocated_bytes: m.pool().allocated_bytes(),
                uptime_seconds: m.started.elapsed().as_secs(),
            })
        })
        .await?,
    ))
}

#[utoipa::path(
    delete,
    path = "/v1/nodes/{name}",
    operation_id = "removeNode",
    params(
        ("name" = String, Path, description = "Node name"),
        ("force" = Option<bool>, Query, description = "Remove even with replicas on it")
    ),
    responses(
        (status = 204, description = "Removed"),
        (status = 400, description = "Invalid request", body = api::ErrorBody),
        (status = 404, description = "Not found", body = api::ErrorBody),
        (status = 409, description = "Conflict (in use, attached elsewhere, fenced, exists)", body = api::ErrorBody),
        (status = 500, description = "Internal error", body = api::ErrorBody),
        (status = 503, description = "Cluster metadata unavailable (no quorum) or shutting down", body = api::ErrorBody)
    )
)]
async fn remove_node(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    q: Result<Query<DeleteQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<StatusCode> {
    use crate::cluster::store::StoreError;
    let force = force_flag(q)?;
    let store = s.store.clone();
    let r = tokio::task::spawn_blocking(move || store.remove_node(&name, force))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "Internal", e.to_string()))?;
    match r {
        Ok(()) => Ok(StatusCode::NO_CONTENT),
        Err(StoreError::Rejected(m)) if m.starts_with("no node named") => {
            Err(ApiError::new(StatusCode::NOT_FOUND, "NodeNotFound", m))
        }
        Err(StoreError::Rejected(m)) => {
            Err(ApiError::new(StatusCode::CONFLICT, "NodeRemoveRefused", m))
        }
        Err(e @ StoreError::Unavailable(_)) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "MetadataError",
            e.to_string(),
        )),
        Err(e) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "MetadataError",
            e.to_string(),
        )),
    }
}

fn role_name(r: NodeRole) -> &'static str {
    match r {
        NodeRole::Voter => "voter",
        NodeRole::Learner => "learner",
    }
}

#[utoipa::path(
    get,
    path = "/v1/nodes",
    operation_id = "listNodes",
    responses(
        (status = 200, description = "Every member", body = Vec<api::NodeInfo>),
        (status = 503, description = "Cluster metadata unavailable (no quorum) or shutting down", body = api::ErrorBody)
    )
)]
async fn nodes(State(s): State<ApiState>) -> ApiResult<Json<Vec<api::NodeInfo>>> {
    let m = s.mgr.clone();
    blocking(move || m.sync_read()).await?;
    let state = s.store.read();
    let mut out: Vec<api::NodeInfo> = state
        .nodes
        .values()
        .map(|n| api::NodeInfo {
            id: n.id.to_string(),
            name: n.name.clone(),
            raft_id: n.raft_id,
            address: n.api_address.clone(),
            labels: n.labels.clone(),
            role: role_name(n.role).into(),
            state: n.state.as_str().into(),
            pool_capacity_bytes: n.pool_capacity_bytes,
            pool_allocated_bytes: n.pool_allocated_bytes,
            last_heartbeat_unix_ms: n.last_heartbeat_unix_ms,
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Json(out))
}

#[utoipa::path(
    get,
    path = "/v1/cluster",
    operation_id = "getCluster",
    responses(
        (status = 200, description = "The Raft group", body = api::ClusterStatus)
    )
)]
async fn cluster(State(s): State<ApiState>) -> Json<api::ClusterStatus> {
    let st = s.store.status();
    let state = s.store.read();
    let name_of = |raft_id: u64| state.nodes.values().find(|n| n.raft_id == raft_id);
    let members = st
        .voters
        .iter()
        .map(|id| (*id, "voter"))
        .chain(st.learners.iter().map(|id| (*id, "learner")))
        .map(|(id, role)| api::ClusterMember {
            name: name_of(id).map(|n| n.name.clone()).unwrap_or_default(),
            id: name_of(id).map(|n| n.id.to_string()).unwrap_or_default(),
            raft_id: id,
            role: role.into(),
        })
        .collect();
    Json(api::ClusterStatus {
        cluster_id: state.cluster_id.to_string(),
        leader: (st.leader_id != 0)
            .then(|| name_of(st.leader_id).map(|n| n.name.clone()))
            .flatten(),
        term: st.term,
        commit_index: st.commit_index,
        applied_index: st.applied_index,
        members,
    })
}

#[utoipa::path(
    get,
    path = "/v1/openapi.json",
    operation_id = "getOpenApi",
    responses((status = 200, description = "This description", content_type = "application/json", body = Object))
)]
async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], openapi_json())
}

#[utoipa::path(
    get,
    path = "/metrics",
    operation_id = "getMetrics",
    responses(
        (status = 200, description = "Prometheus text format", content_type = "text/plain", body = String),
        (status = 500, description = "Internal error", body = api::ErrorBody)
    )
)]
async fn metrics(State(s): State<ApiState>) -> ApiResult<impl IntoResponse> {
    // Sampling takes the manager's locks: off the async workers.
    let m = s.mgr.clone();
    let mut out = blocking(move || {
        let mut out = String::with_capacity(16 << 10);
        m.metrics_sample().render(&mut out);
        Ok(out)
    })
    .await?;
    let st = s.store.status();
    use std::fmt::Write;
    let _ = write!(
        out,
        "# HELP cairn_raft_term Current Raft term\n# TYPE cairn_raft_term gauge\ncairn_raft_term {}\n\
         # HELP cairn_raft_commit_index Raft commit index\n# TYPE cairn_raft_commit_index gauge\ncairn_raft_commit_index {}\n\
         # HELP cairn_raft_applied_index Raft applied index\n# TYPE cairn_raft_applied_index gauge\ncairn_raft_applied_index {}\n\
         # HELP cairn_raft_is_leader 1 when this node leads the metadata group\n# TYPE cairn_raft_is_leader gauge\ncairn_raft_is_leader {}\n\
         # HELP cairn_raft_messages_dropped_total Raft messages dropped on a full peer queue\n# TYPE cairn_raft_messages_dropped_total counter\ncairn_raft_messages_dropped_total {}\n",
        st.term,
        st.commit_index,
        st.applied_index,
        u8::from(st.leader_id == st.raft_id && st.raft_id != 0),
        s.store.dropped_messages()
    );
    out.push_str("# HELP cairn_raft_propose_seconds Leader time from proposing a metadata command to applying it\n# TYPE cairn_raft_propose_seconds histogram\n");
    s.store
        .propose_latency
        .render(&mut out, "cairn_raft_propose_seconds", "");
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out))
}

#[cfg(test)]
mod tests;
