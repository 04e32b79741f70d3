//! The one translation between [`ReplicaError`] and what crosses the wire,
//! in both directions: the framed data path's status codes
//! (`cairn_proto::frame`) and the control service's gRPC status. A new
//! error kind is added here once and both sides agree on it.

use cairn_proto::frame;

use super::ReplicaError;
use crate::types::VolumeId;

impl ReplicaError {
    /// The frame status (and fence, for a fenced request) this error is
    /// answered with.
    pub fn frame_status(&self) -> (u32, u64) {
        match self {
            ReplicaError::Fenced { fence, .. } => (frame::FENCED, *fence),
            ReplicaError::Gone(_) => (frame::GONE, 0),
            ReplicaError::NoSpace => (frame::NO_SPACE, 0),
            ReplicaError::Corrupt(_) => (frame::CORRUPT, 0),
            ReplicaError::Unclean(_) => (frame::UNCLEAN, 0),
            ReplicaError::Io(_)
            | ReplicaError::Meta(_)
            | ReplicaError::Remote(_)
            | ReplicaError::NoSnapshot { .. }
            | ReplicaError::TooManySnapshots(_)
            | ReplicaError::Unlisted(_)
            | ReplicaError::Pinned { .. } => (frame::FAILED, 0),
        }
    }

    /// The error a non-OK frame status stands for, for a request of
    /// `epoch` on `volume`; `msg` is the reply's text.
    pub fn from_frame(status: u32, fence: u64, epoch: u64, volume: VolumeId, msg: String) -> Self {
        match status {
            frame::FENCED => ReplicaError::Fenced { epoch, fence },
            frame::GONE => ReplicaError::Remote(format!("replica gone: {msg}")),
            frame::NO_SPACE => ReplicaError::NoSpace,
            frame::CORRUPT => ReplicaError::Corrupt(msg),
            frame::UNCLEAN => ReplicaError::Unclean(volume),
            _ => ReplicaError::Remote(msg),
        }
    }

    /// The gRPC status the control service answers with.
    pub fn grpc_status(self) -> tonic::Status {
        match self {
            ReplicaError::Fenced { fence, .. } => {
                let mut s = tonic::Status::aborted(self.to_string());
                if let Ok(v) = fence.to_string().parse() {
                    s.metadata_mut().insert("cairn-fence", v);
                }
                s
            }
            ReplicaError::NoSnapshot { volume, snapshot } => {
                let mut s = tonic::Status::not_found(self.to_string());
                for (k, v) in [("cairn-volume", volume), ("cairn-snapshot", snapshot)] {
                    if let Ok(v) = v.to_string().parse() {
                        s.metadata_mut().insert(k, v);
                    }
                }
                s
            }
            ReplicaError::Unlisted(id) => {
                let mut s = tonic::Status::failed_precondition(self.to_string());
                if let Ok(v) = id.to_string().parse() {
                    s.metadata_mut().insert("cairn-unlisted", v);
                }
                s
            }
            ReplicaError::Gone(_) => tonic::Status::not_found(self.to_string()),
            ReplicaError::NoSpace => tonic::Status::resource_exhausted(self.to_string()),
            ReplicaError::Corrupt(_) => tonic::Status::data_loss(self.to_string()),
            other => tonic::Status::internal(other.to_string()),
        }
    }

    /// The error a control-service status stands for, for a request of
    /// `epoch`.
    pub fn from_grpc(epoch: u64, s: tonic::Status) -> Self {
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
            tonic::Code::NotFound => {
                let id = |k: &str| {
                    s.metadata()
                        .get(k)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse().ok())
                };
                match (id("cairn-volume"), id("cairn-snapshot")) {
                    (Some(volume), Some(snapshot)) => ReplicaError::NoSnapshot { volume, snapshot },
                    _ => ReplicaError::Remote(format!("{:?}: {}", s.code(), s.message())),
                }
            }
            tonic::Code::FailedPrecondition => match s
                .metadata()
                .get("cairn-unlisted")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
            {
                Some(id) => ReplicaError::Unlisted(id),
                None => ReplicaError::Remote(format!("{:?}: {}", s.code(), s.message())),
            },
            tonic::Code::ResourceExhausted => ReplicaError::NoSpace,
            tonic::Code::DataLoss => ReplicaError::Corrupt(s.message().to_string()),
            _ => ReplicaError::Remote(format!("{:?}: {}", s.code(), s.message())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Id128;

    #[test]
    fn errors_cross_both_wires_and_come_back_the_same_kind() {
        let v = Id128::random();
        let cases = [
            ReplicaError::Fenced { epoch: 3, fence: 5 },
            ReplicaError::NoSpace,
            ReplicaError::Corrupt("x".into()),
            ReplicaError::Unclean(v),
        ];
        for e in cases {
            let (status, fence) = e.frame_status();
            let back = ReplicaError::from_frame(status, fence, 3, v, "x".into());
            assert_eq!(
                std::mem::discriminant(&back),
                std::mem::discriminant(&e),
                "{e} over frames came back as {back}"
            );
            if let ReplicaError::Fenced { fence, .. } = back {
                assert_eq!(fence, 5);
            }
        }
        for e in [
            ReplicaError::Fenced { epoch: 3, fence: 5 },
            ReplicaError::NoSpace,
            ReplicaError::NoSnapshot {
                volume: v,
                snapshot: Id128::random(),
            },
            ReplicaError::Unlisted(Id128::random()),
        ] {
            let d = std::mem::discriminant(&e);
            let back = ReplicaError::from_grpc(3, e.grpc_status());
            assert_eq!(std::mem::discriminant(&back), d);
            if let ReplicaError::Fenced { fence, .. } = back {
                assert_eq!(fence, 5);
            }
        }
    }
}
