//! Node: making a volume usable on this node (stage: attach, format on
//! first use, mount; publish: bind into the pod) and reporting on it.

use std::collections::HashMap;

use tonic::{Request, Response, Status};

use crate::pb::node_server::Node;
use crate::pb::node_service_capability::{rpc, Rpc, Type};
use crate::pb::volume_usage::Unit;
use crate::pb::*;
use crate::{path_field, required, rules, Driver, Error, Publish, Stage};

fn not_found(name: &str) -> Error {
    Error::NotFound(format!("volume {name:?} does not exist"))
}

/// The volume, which must exist and suit the capability.
fn volume_for(
    b: &dyn crate::Backend,
    name: &str,
    wanted: Option<&rules::Wanted>,
) -> Result<crate::VolumeFacts, Error> {
    let v = b.volume(name)?.ok_or_else(|| not_found(name))?;
    // The spec's "exceeds capabilities".
    if let Some(m) = wanted.and_then(|w| rules::mismatch(&v, w)) {
        return Err(Error::FailedPrecondition(m));
    }
    Ok(v)
}

#[tonic::async_trait]
impl Node for Driver {
    async fn node_stage_volume(
        &self,
        request: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        let req = request.into_inner();
        let name = required("volume_id", &req.volume_id)?.to_string();
        let staging = path_field("staging_target_path", &req.staging_target_path)?;
        let wanted = rules::one_capability(req.volume_capability.as_ref())?;
        self.exclusive(&name.clone(), move |b| {
            volume_for(b, &name, Some(&wanted))?;
            let how = Stage {
                block: wanted.block,
                flags: wanted.mount_flags.clone(),
                read_only: wanted.reader,
            };
            b.stage(&name, &staging, &how)
        })
        .await?;
        Ok(Response::new(NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        request: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        let req = request.into_inner();
        let name = required("volume_id", &req.volume_id)?.to_string();
        let staging = path_field("staging_target_path", &req.staging_target_path)?;
        self.exclusive(&name.clone(), move |b| b.unstage(&name, &staging))
            .await?;
        Ok(Response::new(NodeUnstageVolumeResponse {}))
    }

    async fn node_publish_volume(
        &self,
        request: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let name = required("volume_id", &req.volume_id)?.to_string();
        let target = path_field("target_path", &req.target_path)?;
        let wanted = rules::one_capability(req.volume_capability.as_ref())?;
        // STAGE_UNSTAGE_VOLUME is offered, so the CO stages first.
        if req.staging_target_path.is_empty() {
            return Err(Error::FailedPrecondition(
                "staging_target_path is not set; stage the volume first".into(),
            )
            .into());
        }
        let staging = path_field("staging_target_path", &req.staging_target_path)?;
        let readonly = req.readonly || wanted.reader;
        if wanted.block && readonly && !wanted.reader {
            // A read-only bind mount of a device file does not stop writes
            // to the device; only a reader-mode volume's device is read-only.
            return Err(Error::FailedPrecondition(
                "a raw block volume is published read-only only in a read-only access mode (SINGLE_NODE_READER_ONLY or MULTI_NODE_READER_ONLY)".into(),
            )
            .into());
        }
        self.exclusive(&name.clone(), move |b| {
            volume_for(b, &name, Some(&wanted))?;
            let how = Publish {
                block: wanted.block,
                read_only: readonly,
                sole_writer: wanted.single_workload,
            };
            b.publish(&name, &staging, &target, how)
        })
        .await?;
        Ok(Response::new(NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let name = required("volume_id", &req.volume_id)?.to_string();
        let target = path_field("target_path", &req.target_path)?;
        self.exclusive(&name.clone(), move |b| b.unpublish(&name, &target))
            .await?;
        Ok(Response::new(NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        let req = request.into_inner();
        let name = required("volume_id", &req.volume_id)?.to_string();
        let (v, u) = self
            .call(move |b| {
                // An unknown volume is NOT_FOUND whatever the path.
                let v = volume_for(b, &name, None)?;
                let path = path_field("volume_path", &req.volume_path)?;
                if !path.exists() {
                    return Err(Error::NotFound(format!(
                        "volume path {} does not exist",
                        path.display()
                    )));
                }
                Ok((v, b.usage(&name, &path)?))
            })
            .await?;
        let mut usage = vec![VolumeUsage {
            available: u.available_bytes as i64,
            total: u.total_bytes as i64,
            used: u.used_bytes as i64,
            unit: Unit::Bytes as i32,
        }];
        if let Some((total, used, free)) = u.inodes {
            usage.push(VolumeUsage {
                available: free as i64,
                total: total as i64,
                used: used as i64,
                unit: Unit::Inodes as i32,
            });
        }
        Ok(Response::new(NodeGetVolumeStatsResponse {
            usage,
            volume_condition: Some(VolumeCondition {
                abnormal: v.problem.is_some(),
                message: v.problem.unwrap_or_else(|| "all replicas healthy".into()),
            }),
        }))
    }

    async fn node_expand_volume(
        &self,
        request: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        let name = required("volume_id", &req.volume_id)?.to_string();
        if req.volume_capability.is_some() {
            rules::one_capability(req.volume_capability.as_ref())?;
        }
        let wanted = match &req.capacity_range {
            Some(r) if r.required_bytes != 0 => {
                Some(rules::size_for(Some(r), self.backend.size_rules(), 0)?)
            }
            _ => None,
        };
        let size = self
            .exclusive(&name.clone(), move |b| {
                // An unknown volume is NOT_FOUND whatever the path.
                let v = volume_for(b, &name, None)?;
                let path = path_field("volume_path", &req.volume_path)?;
                if wanted.is_some_and(|w| w > v.size_bytes) {
                    return Err(Error::OutOfRange(format!(
                        "volume {name:?} has {} bytes; expand it with ControllerExpandVolume first",
                        v.size_bytes
                    )));
                }
                if !path.exists() {
                    return Err(Error::NotFound(format!(
                        "volume path {} does not exist",
                        path.display()
                    )));
                }
                b.expand_on_node(&name, &path)
            })
            .await?;
        Ok(Response::new(NodeExpandVolumeResponse {
            capacity_bytes: size as i64,
        }))
    }

    async fn node_get_capabilities(
        &self,
        _: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        use rpc::Type as T;
        let caps = [
            T::StageUnstageVolume,
            T::GetVolumeStats,
            T::ExpandVolume,
            T::VolumeCondition,
            T::SingleNodeMultiWriter,
        ];
        Ok(Response::new(NodeGetCapabilitiesResponse {
            capabilities: caps
                .into_iter()
                .map(|t| NodeServiceCapability {
                    r#type: Some(Type::Rpc(Rpc { r#type: t as i32 })),
                })
                .collect(),
        }))
    }

    async fn node_get_info(
        &self,
        _: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        let me = self.backend.this_node();
        let segments: HashMap<String, String> = rules::segments(&me).into_iter().collect();
        Ok(Response::new(NodeGetInfoResponse {
            node_id: me.name,
            max_volumes_per_node: self.backend.max_volumes_per_node() as i64,
            accessible_topology: Some(Topology { segments }),
        }))
    }
}
