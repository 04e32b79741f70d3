//! The one place where [`VolumeError`]s become HTTP statuses and stable
//! error codes, and the error body every failed call answers with.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use cairn_proto::api::{ErrorBody, ErrorDetail};

use crate::cluster::store::StoreError;
use crate::engine::EngineError;
use crate::replica::ReplicaError;
use crate::volume::VolumeError;

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: std::borrow::Cow<'static, str>,
    message: String,
}

impl ApiError {
    pub(super) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code: code.into(),
            message: message.into(),
        }
    }
}

/// The HTTP status and stable code of `e`.
pub fn status_and_code(e: &VolumeError) -> (StatusCode, &'static str) {
    use VolumeError::*;
    match e {
        InvalidName(_) => (StatusCode::BAD_REQUEST, "InvalidName"),
        InvalidSize(_) => (StatusCode::BAD_REQUEST, "InvalidSize"),
        InvalidFs(_) => (StatusCode::BAD_REQUEST, "InvalidFs"),
        InvalidPath(_) => (StatusCode::BAD_REQUEST, "InvalidPath"),
        InvalidOptions(_) => (StatusCode::BAD_REQUEST, "InvalidOptions"),
        NotFound(_) => (StatusCode::NOT_FOUND, "VolumeNotFound"),
        AlreadyExists(_) => (StatusCode::CONFLICT, "VolumeExists"),
        Attached { .. } => (StatusCode::CONFLICT, "VolumeAttached"),
        AttachedElsewhere { .. } => (StatusCode::CONFLICT, "VolumeAttachedElsewhere"),
        Mounted { .. } => (StatusCode::CONFLICT, "VolumeMounted"),
        InUse { .. } => (StatusCode::CONFLICT, "VolumeInUse"),
        Busy(_) => (StatusCode::CONFLICT, "OperationInProgress"),
        InvalidReplicas(_) => (StatusCode::BAD_REQUEST, "InvalidReplicas"),
        NotEnoughNodes(_) => (StatusCode::CONFLICT, "NotEnoughNodes"),
        Shrink { .. } => (StatusCode::BAD_REQUEST, "ShrinkNotSupported"),
        RawVolume(_) => (StatusCode::BAD_REQUEST, "RawVolume"),
        NotFormatted(_) => (StatusCode::CONFLICT, "NotFormatted"),
        NotStaged { .. } => (StatusCode::CONFLICT, "NotStaged"),
        PublishedDifferently { .. } => (StatusCode::CONFLICT, "PublishConflict"),
        NotShownAt { .. } => (StatusCode::NOT_FOUND, "NotShownAt"),
        Device(_) => (StatusCode::INTERNAL_SERVER_ERROR, "DeviceError"),
        Engine { source, .. } => match source {
            EngineError::Replica(ReplicaError::NoSpace) => {
                (StatusCode::INSUFFICIENT_STORAGE, "PoolFull")
            }
            EngineError::Replica(ReplicaError::Fenced { .. }) => (StatusCode::CONFLICT, "Fenced"),
            EngineError::Replica(ReplicaError::Unlisted(_)) => {
                (StatusCode::SERVICE_UNAVAILABLE, "NodeLagging")
            }
            EngineError::Stopped => (StatusCode::CONFLICT, "EngineStopped"),
            EngineError::Unrecorded { .. } => (StatusCode::SERVICE_UNAVAILABLE, "MetadataError"),
            EngineError::NoReplica | EngineError::LastCopy { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "NoHealthyReplica")
            }
            EngineError::OutOfRange { .. } | EngineError::Replica(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "DeviceError")
            }
        },
        Metadata(StoreError::Unavailable(_)) => (StatusCode::SERVICE_UNAVAILABLE, "MetadataError"),
        Metadata(StoreError::Refused(_) | StoreError::Rejected(_)) => {
            (StatusCode::CONFLICT, "MetadataRefused")
        }
        Metadata(StoreError::Storage(_)) => {
            (StatusCode::INTERNAL_SERVER_ERROR, "MetadataStorageError")
        }
        LocalStore(_) => (StatusCode::INTERNAL_SERVER_ERROR, "LocalStoreError"),
        ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, "ShuttingDown"),
        InvalidSnapshotName(_) => (StatusCode::BAD_REQUEST, "InvalidName"),
        InvalidSource(_) => (StatusCode::BAD_REQUEST, "InvalidSource"),
        SnapshotNotFound { .. } => (StatusCode::NOT_FOUND, "SnapshotNotFound"),
        SnapshotExists { .. } => (StatusCode::CONFLICT, "SnapshotExists"),
        TooManySnapshots(_) => (StatusCode::CONFLICT, "TooManySnapshots"),
        SnapshotNotReady { .. } => (StatusCode::CONFLICT, "SnapshotNotReady"),
        HasSnapshots { .. } => (StatusCode::CONFLICT, "VolumeHasSnapshots"),
        Reverting(_) => (StatusCode::CONFLICT, "VolumeReverting"),
        Freeze { .. } => (StatusCode::CONFLICT, "FreezeFailed"),
        OnNode { code, .. } => {
            use tonic::Code;
            match code {
                Code::InvalidArgument | Code::OutOfRange => {
                    (StatusCode::BAD_REQUEST, "InvalidArgument")
                }
                Code::NotFound => (StatusCode::NOT_FOUND, "NotFound"),
                Code::AlreadyExists => (StatusCode::CONFLICT, "AlreadyExists"),
                Code::FailedPrecondition => (StatusCode::CONFLICT, "FailedPrecondition"),
                Code::Aborted => (StatusCode::CONFLICT, "OperationInProgress"),
                Code::ResourceExhausted => (StatusCode::INSUFFICIENT_STORAGE, "ResourceExhausted"),
                Code::Unavailable | Code::DeadlineExceeded => {
                    (StatusCode::SERVICE_UNAVAILABLE, "NodeUnavailable")
                }
                _ => (StatusCode::INTERNAL_SERVER_ERROR, "NodeError"),
            }
        }
    }
}

impl From<VolumeError> for ApiError {
    fn from(e: VolumeError) -> Self {
        let (status, code) = status_and_code(&e);
        let message = e.to_string();
        match e {
            // The code the other node gave, when it sent one.
            VolumeError::OnNode {
                api_code: Some(c), ..
            } => ApiError {
                status,
                code: c.into(),
                message,
            },
            _ => ApiError::new(status, code, message),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(code = %self.code, message = %self.message, "request failed");
        }
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.into_owned(),
                message: self.message,
            },
        };
        (self.status, Json(body)).into_response()
    }
}
