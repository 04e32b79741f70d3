//! The snapshot endpoints: take, list, inspect and delete a volume's
//! snapshots, and revert a detached volume to one.

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use cairn_proto::api;
use serde::Deserialize;

use super::{blocking, parse_body, ApiError, ApiResult, ApiState};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ListQuery {
    volume: Option<String>,
}

#[utoipa::path(
    get,
    path = "/v1/snapshots",
    operation_id = "listSnapshots",
    params(
        ("volume" = Option<String>, Query, description = "Only this volume's snapshots")
    ),
    responses(
        (status = 200, description = "Snapshots, oldest first per volume, volumes by name", body = Vec<api::SnapshotInfo>),
        (status = 400, description = "Invalid request", body = api::ErrorBody),
        (status = 404, description = "Volume not found", body = api::ErrorBody),
        (status = 503, description = "Cluster metadata unavailable (no quorum) or shutting down", body = api::ErrorBody)
    )
)]
pub(super) async fn list_snapshots(
    State(s): State<ApiState>,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Vec<api::SnapshotInfo>>> {
    let Query(q) =
        q.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "InvalidQuery", e.body_text()))?;
    let m = s.mgr.clone();
    list(m, q.volume).await
}

async fn list(
    m: std::sync::Arc<crate::volume::VolumeManager>,
    volume: Option<String>,
) -> ApiResult<Json<Vec<api::SnapshotInfo>>> {
    Ok(Json(
        blocking(move || {
            m.sync_read()?;
            Ok(m.snapshot_list(volume.as_deref())?
                .into_iter()
                .map(Into::into)
                .collect())
        })
        .await?,
    ))
}

#[utoipa::path(
    get,
    path = "/v1/volumes/{name}/snapshots",
    operation_id = "listVolumeSnapshots",
    params(
        ("name" = String, Path, description = "Volume name")
    ),
    responses(
        (status = 200, description = "The volume's snapshots, oldest first", body = Vec<api::SnapshotInfo>),
        (status = 404, description = "Volume not found", body = api::ErrorBody),
        (status = 503, description = "Cluster metadata unavailable (no quorum) or shutting down", body = api::ErrorBody)
    )
)]
pub(super) async fn list_volume_snapshots(
    State(s): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<Json<Vec<api::SnapshotInfo>>> {
    list(s.mgr.clone(), Some(name)).await
}

#[utoipa::path(
    post,
    path = "/v1/volumes/{name}/snapshots",
    operation_id = "createSnapshot",
    request_body = api::SnapshotCreate,
    params(
        ("name" = String, Path, description = "Volume name")
    ),
    responses(
        (status = 201, description = "Taken on every healthy replica", body = api::SnapshotInfo),
        (status = 400, description = "Invalid request", body = api::ErrorBody),
        (status = 404, description = "Volume not found", body = api::ErrorBody),
        (status = 409, description = "Conflict (name taken, too many snapshots, reverting, busy, the freeze failed)", body = api::ErrorBody),
        (status = 500, description = "Internal error", body = api::ErrorBody),
        (status = 503, description = "Cluster metadata or the attaching node unavailable", body = api::ErrorBody)
    )
)]
pub(super) async fn create_snapshot(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<api::SnapshotInfo>)> {
    let req: api::SnapshotCreate = parse_body(&body)?;
    let m = s.mgr.clone();
    Ok((
        StatusCode::CREATED,
        Json(
            blocking(move || m.snapshot_create(&name, &req.name, req.freeze))
                .await?
                .into(),
        ),
    ))
}

#[utoipa::path(
    get,
    path = "/v1/volumes/{name}/snapshots/{snapshot}",
    operation_id = "getSnapshot",
    params(
        ("name" = String, Path, description = "Volume name"),
        ("snapshot" = String, Path, description = "Snapshot name")
    ),
    responses(
        (status = 200, description = "The snapshot", body = api::SnapshotInfo),
        (status = 404, description = "Volume or snapshot not found", body = api::ErrorBody),
        (status = 503, description = "Cluster metadata unavailable (no quorum) or shutting down", body = api::ErrorBody)
    )
)]
pub(super) async fn get_snapshot(
    State(s): State<ApiState>,
    Path((name, snapshot)): Path<(String, String)>,
) -> ApiResult<Json<api::SnapshotInfo>> {
    let m = s.mgr.clone();
    Ok(Json(
        blocking(move || {
            m.sync_read()?;
            m.snapshot_inspect(&name, &snapshot)
        })
        .await?
        .into(),
    ))
}

#[utoipa::path(
    delete,
    path = "/v1/volumes/{name}/snapshots/{snapshot}",
    operation_id = "deleteSnapshot",
    params(
        ("name" = String, Path, description = "Volume name"),
        ("snapshot" = String, Path, description = "Snapshot name")
    ),
    responses(
        (status = 204, description = "Deleted and freed on every replica"),
        (status = 202, description = "Deleted; some replicas free it when their nodes answer again", body = api::SnapshotDeleted),
        (status = 404, description = "Volume or snapshot not found", body = api::ErrorBody),
        (status = 409, description = "Conflict (an unfinished revert needs it, busy)", body = api::ErrorBody),
        (status = 503, description = "Cluster metadata unavailable (no quorum) or shutting down", body = api::ErrorBody)
    )
)]
pub(super) async fn delete_snapshot(
    State(s): State<ApiState>,
    Path((name, snapshot)): Path<(String, String)>,
) -> ApiResult<axum::response::Response> {
    let m = s.mgr.clone();
    let pending = blocking(move || m.snapshot_delete(&name, &snapshot)).await?;
    if pending.is_empty() {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    let body = api::SnapshotDeleted {
        space_pending_on: pending,
    };
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

#[utoipa::path(
    post,
    path = "/v1/volumes/{name}/revert",
    operation_id = "revertVolume",
    request_body = api::RevertRequest,
    params(
        ("name" = String, Path, description = "Volume name")
    ),
    responses(
        (status = 200, description = "Reverted: the volume reads as the snapshot", body = api::VolumeInfo),
        (status = 400, description = "Invalid request", body = api::ErrorBody),
        (status = 404, description = "Volume or snapshot not found", body = api::ErrorBody),
        (status = 409, description = "Conflict (attached, in use, snapshot not ready, busy)", body = api::ErrorBody),
        (status = 500, description = "Internal error", body = api::ErrorBody),
        (status = 503, description = "Cluster metadata unavailable, or no healthy replica holds the snapshot", body = api::ErrorBody)
    )
)]
pub(super) async fn revert(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Json<api::VolumeInfo>> {
    let req: api::RevertRequest = parse_body(&body)?;
    let m = s.mgr.clone();
    Ok(Json(
        blocking(move || m.revert(&name, &req.snapshot))
            .await?
            .into(),
    ))
}
