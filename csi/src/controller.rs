//! Controller: volumes' life in the cluster (create, delete, attach to a
//! node, expand) and what the CO may ask about them.

use std::collections::HashMap;

use tonic::{Request, Response, Status};

use crate::pb::controller_server::Controller;
use crate::pb::controller_service_capability::{rpc, Rpc, Type};
use crate::pb::validate_volume_capabilities_response::Confirmed;
use crate::pb::*;
use crate::rules::{self, Params, Wanted};
use crate::snapshots;
use crate::{required, CreateSpec, Driver, Error, VolumeFacts};

fn volume_message(v: &VolumeFacts) -> Volume {
    Volume {
        capacity_bytes: v.size_bytes as i64,
        volume_id: v.name.clone(),
        volume_context: HashMap::new(),
        content_source: v.source.as_ref().map(snapshots::source_message),
        accessible_topology: Vec::new(),
    }
}

fn condition(v: &VolumeFacts) -> VolumeCondition {
    VolumeCondition {
        abnormal: v.problem.is_some(),
        message: v
            .problem
            .clone()
            .unwrap_or_else(|| "all replicas healthy".into()),
    }
}

fn not_found(name: &str) -> Error {
    Error::NotFound(format!("volume {name:?} does not exist"))
}

/// Why an existing volume does not match a repeated CreateVolume.
fn create_conflict(
    v: &VolumeFacts,
    req: &CreateVolumeRequest,
    wanted: &Wanted,
    fs: &str,
    replicas: u32,
    source: Option<&crate::Source>,
) -> Option<String> {
    let source = source.cloned();
    if !rules::fits(v.size_bytes, req.capacity_range.as_ref()) {
        return Some(format!(
            "it has {} bytes, outside the requested capacity range",
            v.size_bytes
        ));
    }
    if let Some(m) = rules::mismatch(v, wanted) {
        return Some(m);
    }
    if !wanted.block && v.fs != fs {
        return Some(format!("it holds {}, not {fs}", v.fs));
    }
    if v.replicas != replicas {
        return Some(format!("it has {} replica(s), not {replicas}", v.replicas));
    }
    if v.source != source {
        return Some(match &v.source {
            None => "it was not made from a content source".into(),
            Some(s) => format!("it was made from another content source ({s:?})"),
        });
    }
    None
}

/// RESOURCE_EXHAUSTED when `node` already holds as many volumes as a node
/// may (NodeGetInfo's max_volumes_per_node).
fn room_on(b: &dyn crate::Backend, node: &str) -> Result<(), Error> {
    let max = b.max_volumes_per_node();
    let held = b
        .volumes()?
        .iter()
        .filter(|v| v.published().iter().any(|n| n == node))
        .count() as u64;
    if held >= max {
        return Err(Error::ResourceExhausted(format!(
            "node {node:?} already holds {held} volumes, the most one node may hold ({max})"
        )));
    }
    Ok(())
}

#[tonic::async_trait]
impl Controller for Driver {
    async fn create_volume(
        &self,
        request: Request<CreateVolumeRequest>,
    ) -> Result<Response<CreateVolumeResponse>, Status> {
        let req = request.into_inner();
        let csi_name = required("name", &req.name)?.to_string();
        // The volume id: the name itself when it is a valid volume name,
        // else a deterministic mapping of it (the same name always maps to
        // the same id, which keeps CreateVolume idempotent).
        let name = rules::volume_id_for(&csi_name, |n| self.backend.valid_volume_name(n))?;
        let wanted = rules::capabilities(&req.volume_capabilities)?;
        let params = rules::params(&req.parameters, self.backend.max_replicas())?;
        if wanted.reader && !wanted.block {
            return Err(Error::InvalidArgument(
                "only read-only access modes: the new filesystem could never be written; add a writer mode (e.g. SINGLE_NODE_WRITER)".into(),
            )
            .into());
        }
        let source = snapshots::source_of(req.volume_content_source.as_ref())?;
        if !req.mutable_parameters.is_empty() {
            return Err(Error::InvalidArgument(
                "mutable_parameters are not supported (MODIFY_VOLUME is not offered)".into(),
            )
            .into());
        }
        let fs = if wanted.block {
            "none".to_string()
        } else {
            match (wanted.fs.as_str(), params.fs.as_deref()) {
                ("", None) => "ext4".to_string(),
                ("", Some(p)) => p.to_string(),
                (c, Some(p)) if c != p => {
                    return Err(Error::InvalidArgument(format!(
                        "the capability asks for {c} but the fs parameter for {p}"
                    ))
                    .into())
                }
                (c, _) => c.to_string(),
            }
        };
        let size = rules::size_for(
            req.capacity_range.as_ref(),
            self.backend.size_rules(),
            rules::min_size(&fs),
        )?;
        let (requisite, preferred) = req
            .accessibility_requirements
            .as_ref()
            .map(|t| (t.requisite.clone(), t.preferred.clone()))
            .unwrap_or_default();
        for t in requisite.iter().chain(&preferred) {
            rules::check_topology(t)?;
        }
        let replicas = params
            .replicas
            .unwrap_or_else(|| self.backend.default_replicas());
        let locality = params.locality.unwrap_or(true);
        let req2 = req.clone();
        let volume = self
            .exclusive(&name.clone(), move |b| {
                if let Some(v) = b.volume(&name)? {
                    let owner = v.csi_name.as_deref().unwrap_or(&v.name);
                    if owner != csi_name {
                        return Err(Error::AlreadyExists(format!(
                            "volume id {name:?} belongs to the CSI name {owner:?}, not {csi_name:?}"
                        )));
                    }
                    let fs = if source.is_some() { v.fs.clone() } else { fs };
                    return match create_conflict(&v, &req2, &wanted, &fs, replicas, source.as_ref()) {
                        Some(why) => Err(Error::AlreadyExists(format!(
                            "volume {name:?} exists with other parameters: {why}"
                        ))),
                        None => Ok(v),
                    };
                }
                let nodes: Vec<_> = b.nodes()?.into_iter().filter(|n| n.up).collect();
                // Any node attaches any volume, so every requisite topology
                // with a node in it is served wherever the replicas are.
                // The replicas stay inside the requisite topologies when
                // they hold enough nodes (e.g. a StorageClass limited to a
                // zone), and spread further when they do not (a requisite
                // of the one node the pod was scheduled to).
                let inside: Vec<String> = nodes
                    .iter()
                    .filter(|n| requisite.iter().any(|t| rules::in_topology(n, t)))
                    .map(|n| n.name.clone())
                    .collect();
                if !requisite.is_empty() && inside.is_empty() {
                    return Err(Error::ResourceExhausted(
                        "no node that is up lies in the requisite topologies".into(),
                    ));
                }
                let allowed =
                    (!requisite.is_empty() && inside.len() >= replicas as usize).then_some(inside);
                let eligible =
                    |n: &&crate::NodeFacts| allowed.as_ref().is_none_or(|a| a.contains(&n.name));
                // The first preferred topology with an eligible node holds
                // one replica (with WaitForFirstConsumer: the pod's node).
                let local_node = locality
                    .then(|| {
                        preferred.iter().find_map(|t| {
                            nodes
                                .iter()
                                .filter(eligible)
                                .filter(|n| rules::in_topology(n, t))
                                .max_by_key(|n| n.free_bytes)
                                .map(|n| n.name.clone())
                        })
                    })
                    .flatten();
                let mut size = size;
                if let Some(s) = &source {
                    // A clone has its source's filesystem and at least its size.
                    let (min, src_fs) = snapshots::source_facts(b, s)?;
                    if wanted.block != (src_fs == "none") || (!wanted.block && !wanted.fs.is_empty() && wanted.fs != src_fs) {
                        return Err(Error::InvalidArgument(format!(
                            "the content source holds {src_fs}; the volume capability asks for {}",
                            if wanted.block { "a raw block volume".to_string() } else { wanted.fs.clone() }
                        )));
                    }
                    if size < min {
                        let limit = req2.capacity_range.as_ref().map_or(0, |r| r.limit_bytes);
                        if limit > 0 && (limit as u64) < min {
                            return Err(Error::OutOfRange(format!(
                                "the content source has {min} bytes, more than the capacity limit of {limit}"
                            )));
                        }
                        size = min;
                    }
                }
                b.create(&CreateSpec {
                    name: name.clone(),
                    csi_name: (csi_name != name).then(|| csi_name.clone()),
                    size_bytes: size,
                    source: source.clone(),
                    fs: fs.clone(),
                    replicas: Some(replicas),
                    allowed_nodes: allowed,
                    local_node,
                })
            })
            .await?;
        // No accessible topology: the volume is equally accessible from
        // every node, so the PV gets no node affinity.
        Ok(Response::new(CreateVolumeResponse {
            volume: Some(volume_message(&volume)),
        }))
    }

    async fn delete_volume(
        &self,
        request: Request<DeleteVolumeRequest>,
    ) -> Result<Response<DeleteVolumeResponse>, Status> {
        let name = required("volume_id", &request.get_ref().volume_id)?.to_string();
        self.exclusive(&name.clone(), move |b| match b.volume(&name)? {
            None => Ok(()),
            Some(v) => {
                let on = v.published();
                if !on.is_empty() {
                    return Err(Error::FailedPrecondition(format!(
                        "volume {name:?} is published to {}; unpublish it first",
                        on.join(", ")
                    )));
                }
                b.delete(&name)
            }
        })
        .await?;
        Ok(Response::new(DeleteVolumeResponse {}))
    }

    async fn controller_publish_volume(
        &self,
        request: Request<ControllerPublishVolumeRequest>,
    ) -> Result<Response<ControllerPublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let name = required("volume_id", &req.volume_id)?.to_string();
        let node = required("node_id", &req.node_id)?.to_string();
        let wanted = rules::one_capability(req.volume_capability.as_ref())?;
        self.exclusive(&name.clone(), move |b| {
            let v = b.volume(&name)?.ok_or_else(|| not_found(&name))?;
            if !b.nodes()?.iter().any(|n| n.name == node) {
                return Err(Error::NotFound(format!("node {node:?} does not exist")));
            }
            if let Some(m) = rules::mismatch(&v, &wanted) {
                return Err(Error::InvalidArgument(m));
            }
            let incompatible = |held: &str| {
                Err(Error::AlreadyExists(format!(
                    "volume {name:?} is published to node {node} {held}; unpublish it first"
                )))
            };
            if wanted.reader && v.attached_to.as_ref() == Some(&node) {
                return incompatible("read-write");
            }
            if !wanted.reader && v.readers.contains(&node) {
                return incompatible("read-only");
            }
            if wanted.reader {
                if v.readers.contains(&node) {
                    return Ok(());
                }
                if let Some(n) = &v.attached_to {
                    return Err(Error::FailedPrecondition(format!(
                        "volume {name:?} is published read-write to node {n}; readers wait until it is unpublished"
                    )));
                }
                if !wanted.multi_node && !v.readers.is_empty() {
                    return Err(Error::FailedPrecondition(format!(
                        "volume {name:?} is published to {}; SINGLE_NODE_READER_ONLY allows one node",
                        v.readers.join(", ")
                    )));
                }
                room_on(b, &node)?;
                return b.attach_to(&name, &node, true);
            }
            if !v.readers.is_empty() {
                return Err(Error::FailedPrecondition(format!(
                    "volume {name:?} is published read-only to {}; a writer waits until they unpublish",
                    v.readers.join(", ")
                )));
            }
            match &v.attached_to {
                Some(n) if *n == node => Ok(()),
                Some(n) => Err(Error::FailedPrecondition(format!(
                    "volume {name:?} is published to node {n}; a Cairn volume is written by one node at a time"
                ))),
                None => {
                    room_on(b, &node)?;
                    b.attach_to(&name, &node, false)
                }
            }
        })
        .await?;
        Ok(Response::new(ControllerPublishVolumeResponse {
            publish_context: HashMap::new(),
        }))
    }

    async fn controller_unpublish_volume(
        &self,
        request: Request<ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<ControllerUnpublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let name = required("volume_id", &req.volume_id)?.to_string();
        let node = req.node_id;
        self.exclusive(&name.clone(), move |b| {
            let Some(v) = b.volume(&name)? else {
                return Ok(());
            };
            // An empty node id means: from every node.
            for n in v.published() {
                if node.is_empty() || n == node {
                    b.detach_from(&name, &n)?;
                }
            }
            Ok(())
        })
        .await?;
        Ok(Response::new(ControllerUnpublishVolumeResponse {}))
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<ValidateVolumeCapabilitiesResponse>, Status> {
        let req = request.into_inner();
        let name = required("volume_id", &req.volume_id)?.to_string();
        rules::well_formed(&req.volume_capabilities)?;
        let n = name.clone();
        let v = self
            .call(move |b| b.volume(&n)?.ok_or_else(|| not_found(&n)))
            .await?;
        let problem = match rules::capabilities(&req.volume_capabilities) {
            Err(Error::InvalidArgument(m)) | Err(Error::OutOfRange(m)) => Some(m),
            Err(e) => return Err(e.into()),
            Ok(w) => rules::mismatch(&v, &w).or_else(|| {
                match rules::params(&req.parameters, self.backend.max_replicas()) {
                    Err(e) => Some(e.to_string()),
                    Ok(Params {
                        replicas: Some(r), ..
                    }) if r != v.replicas => Some(format!(
                        "volume has {} replica(s), the parameters ask for {r}",
                        v.replicas
                    )),
                    Ok(p) if !v.is_block() && p.fs.as_ref().is_some_and(|f| *f != v.fs) => {
                        Some(format!("volume holds {}", v.fs))
                    }
                    Ok(_) => None,
                }
            }),
        };
        Ok(Response::new(match problem {
            Some(message) => ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message,
            },
            None => ValidateVolumeCapabilitiesResponse {
                confirmed: Some(Confirmed {
                    volume_context: req.volume_context,
                    volume_capabilities: req.volume_capabilities,
                    parameters: req.parameters,
                    mutable_parameters: HashMap::new(),
                }),
                message: String::new(),
            },
        }))
    }

    async fn list_volumes(
        &self,
        request: Request<ListVolumesRequest>,
    ) -> Result<Response<ListVolumesResponse>, Status> {
        let req = request.into_inner();
        // Paged by volume name.
        let start = rules::page_start(&req.starting_token, req.max_entries)?;
        let mut all = self.call(|b| b.volumes()).await?;
        all.sort_by(|a, b| a.name.cmp(&b.name));
        let from = start.map_or(0, |s| all.partition_point(|v| v.name < s));
        let take = match req.max_entries {
            0 => usize::MAX,
            n => n as usize,
        };
        let page: Vec<_> = all[from..].iter().take(take).collect();
        let next_token = all
            .get(from + page.len())
            .map(|v| rules::page_token(&v.name))
            .unwrap_or_default();
        Ok(Response::new(ListVolumesResponse {
            entries: page
                .into_iter()
                .map(|v| list_volumes_response::Entry {
                    volume: Some(volume_message(v)),
                    status: Some(list_volumes_response::VolumeStatus {
                        published_node_ids: v.published(),
                        volume_condition: Some(condition(v)),
                    }),
                })
                .collect(),
            next_token,
        }))
    }

    async fn get_capacity(
        &self,
        request: Request<GetCapacityRequest>,
    ) -> Result<Response<GetCapacityResponse>, Status> {
        let req = request.into_inner();
        let params = rules::params(&req.parameters, self.backend.max_replicas())?;
        if let Some(t) = &req.accessible_topology {
            rules::check_topology(t)?;
        }
        // Malformed capabilities are an error; well-formed ones this driver
        // cannot serve have no capacity.
        let wanted = match req.volume_capabilities.is_empty() {
            true => None,
            false => {
                rules::well_formed(&req.volume_capabilities)?;
                rules::capabilities(&req.volume_capabilities).ok()
            }
        };
        let servable = req.volume_capabilities.is_empty() || wanted.is_some();
        let fs = match &wanted {
            Some(w) if w.block => "none".to_string(),
            Some(w) if !w.fs.is_empty() => w.fs.clone(),
            _ => params.fs.clone().unwrap_or_else(|| "ext4".into()),
        };
        let replicas = params
            .replicas
            .unwrap_or_else(|| self.backend.default_replicas())
            .max(1) as usize;
        let topology = req.accessible_topology.clone();
        // Where a volume for a pod in the segment gets its local replica
        // (the others go anywhere): see `rules::available`.
        let free = self
            .call(move |b| {
                let all = b.nodes()?;
                let candidates: Vec<_> = all
                    .iter()
                    .filter(|n| n.up && topology.as_ref().is_none_or(|t| rules::in_topology(n, t)))
                    .collect();
                Ok(rules::available(&all, &candidates, replicas))
            })
            .await?;
        let size = self.backend.size_rules();
        Ok(Response::new(GetCapacityResponse {
            available_capacity: if servable {
                free.min(i64::MAX as u64) as i64
            } else {
                0
            },
            // Volumes are thin: their size is not bounded by free space.
            maximum_volume_size: Some(size.max.min(i64::MAX as u64) as i64),
            minimum_volume_size: Some(rules::min_size(&fs).max(size.align) as i64),
        }))
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<ControllerGetCapabilitiesResponse>, Status> {
        use rpc::Type as T;
        let caps = [
            T::CreateDeleteVolume,
            T::PublishUnpublishVolume,
            T::ListVolumes,
            T::GetCapacity,
            T::ExpandVolume,
            T::ListVolumesPublishedNodes,
            T::VolumeCondition,
            T::GetVolume,
            T::SingleNodeMultiWriter,
            T::CreateDeleteSnapshot,
            T::ListSnapshots,
            T::CloneVolume,
        ];
        Ok(Response::new(ControllerGetCapabilitiesResponse {
            capabilities: caps
                .into_iter()
                .map(|t| ControllerServiceCapability {
                    r#type: Some(Type::Rpc(Rpc { r#type: t as i32 })),
                })
                .collect(),
        }))
    }

    async fn create_snapshot(
        &self,
        request: Request<CreateSnapshotRequest>,
    ) -> Result<Response<CreateSnapshotResponse>, Status> {
        let req = request.into_inner();
        let volume = required("source_volume_id", &req.source_volume_id)?.to_string();
        let name = required("name", &req.name)?.to_string();
        snapshots::check_parameters(&req.parameters)?;
        let s = self
            .exclusive(&volume.clone(), move |b| {
                snapshots::create(b, &volume, &name)
            })
            .await?;
        Ok(Response::new(CreateSnapshotResponse {
            snapshot: Some(snapshots::message(&s)),
        }))
    }

    async fn delete_snapshot(
        &self,
        request: Request<DeleteSnapshotRequest>,
    ) -> Result<Response<DeleteSnapshotResponse>, Status> {
        let id = required("snapshot_id", &request.get_ref().snapshot_id)?;
        // An id this driver never issued names no snapshot: deleted.
        if let Some((volume, name)) = snapshots::parse_id(id) {
            self.exclusive(&volume.clone(), move |b| b.snapshot_delete(&volume, &name))
                .await?;
        }
        Ok(Response::new(DeleteSnapshotResponse {}))
    }

    async fn list_snapshots(
        &self,
        request: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        let req = request.into_inner();
        let page = self.call(move |b| snapshots::list(b, &req)).await?;
        Ok(Response::new(page))
    }

    async fn get_snapshot(
        &self,
        _: Request<GetSnapshotRequest>,
    ) -> Result<Response<GetSnapshotResponse>, Status> {
        Err(Status::unimplemented("snapshots are not supported"))
    }

    async fn controller_expand_volume(
        &self,
        request: Request<ControllerExpandVolumeRequest>,
    ) -> Result<Response<ControllerExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        let name = required("volume_id", &req.volume_id)?.to_string();
        let range = req
            .capacity_range
            .ok_or_else(|| Error::InvalidArgument("capacity_range is required".into()))?;
        let wanted = match &req.volume_capability {
            Some(_) => Some(rules::one_capability(req.volume_capability.as_ref())?),
            None => None,
        };
        if range.limit_bytes < 0 {
            return Err(Error::InvalidArgument(
                "capacity_range.limit_bytes must not be negative".into(),
            )
            .into());
        }
        // required_bytes 0 means "unspecified": nothing to grow to.
        let size = match range.required_bytes {
            0 => 0,
            _ => rules::size_for(Some(&range), self.backend.size_rules(), 0)?,
        };
        let v = self
            .exclusive(&name.clone(), move |b| {
                let v = b.volume(&name)?.ok_or_else(|| not_found(&name))?;
                if let Some(m) = wanted.as_ref().and_then(|w| rules::mismatch(&v, w)) {
                    return Err(Error::InvalidArgument(m));
                }
                if range.limit_bytes > 0 && v.size_bytes > range.limit_bytes as u64 {
                    return Err(Error::OutOfRange(format!(
                        "volume {name:?} already has {} bytes, more than the limit; volumes only grow",
                        v.size_bytes
                    )));
                }
                if v.size_bytes >= size {
                    return Ok(v);
                }
                b.expand(&name, size)
            })
            .await?;
        Ok(Response::new(ControllerExpandVolumeResponse {
            capacity_bytes: v.size_bytes as i64,
            // The attached node's engine, device and filesystem follow in
            // NodeExpandVolume (a volume attached nowhere grows at its next
            // stage anyway).
            node_expansion_required: true,
        }))
    }

    async fn controller_get_volume(
        &self,
        request: Request<ControllerGetVolumeRequest>,
    ) -> Result<Response<ControllerGetVolumeResponse>, Status> {
        let name = required("volume_id", &request.get_ref().volume_id)?.to_string();
        let v = self
            .call(move |b| b.volume(&name)?.ok_or_else(|| not_found(&name)))
            .await?;
        Ok(Response::new(ControllerGetVolumeResponse {
            volume: Some(volume_message(&v)),
            status: Some(controller_get_volume_response::VolumeStatus {
                published_node_ids: v.published(),
                volume_condition: Some(condition(&v)),
            }),
        }))
    }

    async fn controller_modify_volume(
        &self,
        _: Request<ControllerModifyVolumeRequest>,
    ) -> Result<Response<ControllerModifyVolumeResponse>, Status> {
        Err(Status::unimplemented("MODIFY_VOLUME is not supported"))
    }
}
