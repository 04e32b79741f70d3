//! The CSI driver's backend: CSI volumes are Cairn volumes (volume id =
//! name), CSI nodes are cluster nodes (node id = node name). Controller
//! calls act on the cluster state from whichever node serves them; node
//! calls act on this node through the same volume-manager calls as the CLI
//! (stage, publish and their reverses own every mount and bind); this file
//! only translates arguments and maps errors, in one place.

use std::path::Path;
use std::sync::Arc;

use cairn_csi::{
    Backend, CreateSpec, Error, NodeFacts, Publish, SizeRules, SnapshotFacts, Source, Stage, Usage,
    VolumeFacts,
};
use cairn_proto::api::SizeArg;

use crate::cluster::state::{ClusterState, NodeState, Volume};
use crate::cluster::store::StoreError;
use crate::engine::EngineError;
use crate::replica::ReplicaError;
use crate::types::{NodeId, MAX_VOLUME_SIZE, SIZE_ALIGN};
use crate::volume::{
    CloneSource, CreateVolume, PublishSpec, ReplicaCondition, StageSpec, VolumeError, VolumeManager,
};

/// Size of a volume created without a capacity range.
const DEFAULT_SIZE: u64 = 1 << 30;
pub struct CsiBackend {
    mgr: Arc<VolumeManager>,
    name: String,
    labels: std::collections::BTreeMap<String, String>,
    /// Volumes one node holds at once (`--csi-max-volumes`; each attached
    /// volume is a loop device, a FUSE file and an engine with its healer).
    max_volumes: u64,
}

impl CsiBackend {
    pub fn new(
        mgr: Arc<VolumeManager>,
        name: String,
        labels: std::collections::BTreeMap<String, String>,
        max_volumes: u64,
    ) -> CsiBackend {
        CsiBackend {
            mgr,
            name,
            labels,
            max_volumes,
        }
    }

    /// A committed (linearizable) view of the state.
    fn fresh_state(&self) -> Result<ClusterState, Error> {
        self.mgr.sync_read().map_err(map)?;
        Ok(self.mgr.state())
    }

    fn node_id(state: &ClusterState, name: &str) -> Result<NodeId, Error> {
        state
            .nodes
            .values()
            .find(|n| n.name == name)
            .map(|n| n.id)
            .ok_or_else(|| Error::NotFound(format!("node {name:?} does not exist")))
    }
}

fn map(e: VolumeError) -> Error {
    use VolumeError::*;
    let m = e.to_string();
    match e {
        InvalidName(_) | InvalidSize(_) | InvalidFs(_) | InvalidPath(_) | InvalidOptions(_)
        | InvalidReplicas(_) | RawVolume(_) => Error::InvalidArgument(m),
        NotFormatted(_) | NotStaged { .. } => Error::FailedPrecondition(m),
        PublishedDifferently { .. } => Error::AlreadyExists(m),
        NotShownAt { .. } => Error::NotFound(m),
        NotFound(_) => Error::NotFound(m),
        AlreadyExists(_) => Error::AlreadyExists(m),
        Attached { .. } | AttachedElsewhere { .. } | Mounted { .. } | InUse { .. } => {
            Error::FailedPrecondition(m)
        }
        NotEnoughNodes(_) => Error::ResourceExhausted(m),
        Busy(_) => Error::Aborted(m),
        Shrink { .. } => Error::OutOfRange(m),
        Device(_) | LocalStore(_) => Error::Internal(m),
        Engine { source, .. } => match source {
            EngineError::Replica(ReplicaError::NoSpace) => Error::ResourceExhausted(m),
            EngineError::Replica(ReplicaError::Unlisted(_)) => Error::Unavailable(m),
            EngineError::Replica(ReplicaError::Fenced { .. }) | EngineError::Stopped => {
                Error::FailedPrecondition(m)
            }
            EngineError::Unrecorded { .. }
            | EngineError::NoReplica
            | EngineError::LastCopy { .. } => Error::Unavailable(m),
            EngineError::OutOfRange { .. } | EngineError::Replica(_) => Error::Internal(m),
        },
        Metadata(StoreError::Unavailable(_)) | ShuttingDown => Error::Unavailable(m),
        Metadata(StoreError::Refused(_) | StoreError::Rejected(_)) => Error::FailedPrecondition(m),
        Metadata(StoreError::Storage(_)) => Error::Internal(m),
        InvalidSnapshotName(_) | InvalidSource(_) => Error::InvalidArgument(m),
        SnapshotNotFound { .. } => Error::NotFound(m),
        SnapshotExists { .. } => Error::AlreadyExists(m),
        TooManySnapshots(_) => Error::ResourceExhausted(m),
        SnapshotNotReady { .. } | HasSnapshots { .. } | Reverting(_) | Freeze { .. } => {
            Error::FailedPrecondition(m)
        }
        OnNode { code, .. } => {
            use tonic::Code;
            match code {
                Code::InvalidArgument => Error::InvalidArgument(m),
                Code::NotFound => Error::NotFound(m),
                Code::AlreadyExists => Error::AlreadyExists(m),
                Code::FailedPrecondition => Error::FailedPrecondition(m),
                Code::Aborted => Error::Aborted(m),
                Code::ResourceExhausted => Error::ResourceExhausted(m),
                Code::OutOfRange => Error::OutOfRange(m),
                Code::Unavailable | Code::DeadlineExceeded => Error::Unavailable(m),
                _ => Error::Internal(m),
            }
        }
    }
}

fn facts(state: &ClusterState, v: &Volume) -> VolumeFacts {
    let name_of = |id: NodeId| {
        state
            .nodes
            .get(&id)
            .map(|n| n.name.clone())
            .unwrap_or_else(|| id.to_string())
    };
    let mut problems: Vec<String> = v
        .replicas
        .iter()
        .filter_map(|r| {
            let c = ReplicaCondition::of(state, r);
            (c != ReplicaCondition::Healthy)
                .then(|| format!("replica on {} is {}", name_of(r.node), c.as_str()))
        })
        .collect();
    if v.replicas.len() < v.wanted() {
        problems.push(format!(
            "{} of {} replicas exist",
            v.replicas.len(),
            v.wanted()
        ));
    }
    let source = v.origin.as_ref().map(|o| {
        let volume = state
            .volumes
            .get(&o.volume)
            .map_or_else(|| o.volume.to_string(), |x| x.name.clone());
        if o.implicit {
            return Source::Volume(volume);
        }
        let name = state
            .snapshots
            .get(&o.snapshot)
            .map_or_else(|| o.snapshot.to_string(), |x| x.name.clone());
        Source::Snapshot { volume, name }
    });
    VolumeFacts {
        source,
        name: v.name.clone(),
        csi_name: v.csi_name.clone(),
        size_bytes: v.size_bytes,
        fs: v.fs.as_str().to_string(),
        replicas: v.wanted() as u32,
        attached_to: v.attachment.as_ref().map(|a| name_of(a.node)),
        readers: {
            let mut r: Vec<String> = v.readers.iter().map(|n| name_of(*n)).collect();
            r.sort();
            r
        },
        problem: (!problems.is_empty()).then(|| problems.join("; ")),
    }
}

fn snapshot_facts(s: &crate::volume::view::SnapshotView, fs: String) -> SnapshotFacts {
    SnapshotFacts {
        volume: s.volume.clone(),
        name: s.name.clone(),
        size_bytes: s.size_bytes,
        created_unix_ms: s.created_unix_ms,
        ready: s.ready,
        fs,
    }
}

impl Backend for CsiBackend {
    /// Ready once this node is a member of a cluster. A lost quorum is not
    /// "unready": calls then fail with UNAVAILABLE, and a failed probe would
    /// only make kubelet restart every daemon of a partitioned cluster.
    fn ready(&self) -> Result<(), String> {
        let me = self.mgr.node_id();
        if self.mgr.state().nodes.contains_key(&me) {
            Ok(())
        } else {
            Err("this node has not joined a cluster yet".into())
        }
    }

    fn this_node(&self) -> NodeFacts {
        NodeFacts {
            name: self.name.clone(),
            labels: self.labels.clone(),
            up: true,
            free_bytes: 0,
        }
    }

    fn nodes(&self) -> Result<Vec<NodeFacts>, Error> {
        Ok(self
            .fresh_state()?
            .nodes
            .values()
            .map(|n| NodeFacts {
                name: n.name.clone(),
                labels: n.labels.clone(),
                up: n.state == NodeState::Up,
                free_bytes: n.pool_capacity_bytes.saturating_sub(n.pool_allocated_bytes),
            })
            .collect())
    }

    fn size_rules(&self) -> SizeRules {
        SizeRules {
            align: SIZE_ALIGN,
            max: MAX_VOLUME_SIZE,
            default: DEFAULT_SIZE,
        }
    }

    fn default_replicas(&self) -> u32 {
        self.mgr.default_replicas()
    }

    fn max_replicas(&self) -> u32 {
        VolumeManager::MAX_REPLICAS
    }

    fn claim(&self, volume: &str) -> Result<Box<dyn std::any::Any + Send>, Error> {
        Ok(Box::new(self.mgr.claim(volume).map_err(map)?))
    }

    fn valid_volume_name(&self, name: &str) -> bool {
        crate::types::validate_volume_name(name).is_ok()
    }

    fn max_volumes_per_node(&self) -> u64 {
        self.max_volumes
    }

    fn create(&self, spec: &CreateSpec) -> Result<VolumeFacts, Error> {
        let state = self.fresh_state()?;
        let allowed = spec
            .allowed_nodes
            .as_ref()
            .map(|names| {
                names
                    .iter()
                    .map(|n| Self::node_id(&state, n))
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()?;
        let local = spec
            .local_node
            .as_ref()
            .map(|n| Self::node_id(&state, n))
            .transpose()?;
        let req = CreateVolume {
            name: spec.name.clone(),
            size: Some(SizeArg::Bytes(spec.size_bytes)),
            source: spec.source.as_ref().map(|s| match s {
                Source::Snapshot { volume, name } => CloneSource::Snapshot {
                    volume: volume.clone(),
                    snapshot: name.clone(),
                },
                Source::Volume(v) => CloneSource::Volume(v.clone()),
            }),
            fs: spec
                .fs
                .parse()
                .map_err(|e: String| Error::InvalidArgument(e))?,
            replicas: spec.replicas,
            locality: false,
            csi_name: spec.csi_name.clone(),
        };
        self.mgr
            .create_placed(&req, local, allowed.as_deref())
            .map_err(map)?;
        self.volume(&spec.name)?
            .ok_or_else(|| Error::Internal("the created volume is not in the state".into()))
    }

    fn volume(&self, name: &str) -> Result<Option<VolumeFacts>, Error> {
        let state = self.fresh_state()?;
        // A volume deleted with its snapshots kept is gone for the CO.
        Ok(state
            .volume_by_name(name)
            .filter(|v| !v.retired)
            .map(|v| facts(&state, v)))
    }

    fn volumes(&self) -> Result<Vec<VolumeFacts>, Error> {
        let state = self.fresh_state()?;
        Ok(state
            .volumes
            .values()
            .filter(|v| !v.retired)
            .map(|v| facts(&state, v))
            .collect())
    }

    /// A volume with snapshots is deleted with them kept: Kubernetes
    /// users delete PVCs whose VolumeSnapshots they keep.
    fn delete(&self, name: &str) -> Result<(), Error> {
        match self.mgr.delete_keeping_snapshots(name, false) {
            Ok(_) | Err(VolumeError::NotFound(_)) => Ok(()),
            Err(e) => Err(map(e)),
        }
    }

    fn attach_to(&self, name: &str, node: &str, read_only: bool) -> Result<(), Error> {
        let id = Self::node_id(&self.fresh_state()?, node)?;
        self.mgr.attach_to(name, id, read_only).map_err(map)
    }

    fn detach_from(&self, name: &str, node: &str) -> Result<(), Error> {
        let Ok(id) = Self::node_id(&self.fresh_state()?, node) else {
            return Ok(());
        };
        self.mgr.detach_from(name, id).map_err(map)
    }

    fn expand(&self, name: &str, size_bytes: u64) -> Result<VolumeFacts, Error> {
        self.mgr
            .resize(name, &SizeArg::Bytes(size_bytes))
            .map_err(map)?;
        self.volume(name)?
            .ok_or_else(|| Error::NotFound(format!("volume {name:?} does not exist")))
    }

    fn stage(&self, name: &str, staging: &Path, how: &Stage) -> Result<(), Error> {
        let spec = StageSpec {
            block: how.block,
            read_only: how.read_only,
            options: how.flags.clone(),
        };
        self.mgr
            .stage(name, &staging.to_string_lossy(), &spec)
            .map_err(map)
    }

    fn unstage(&self, name: &str, staging: &Path) -> Result<(), Error> {
        match self.mgr.unstage(name, &staging.to_string_lossy()) {
            Err(VolumeError::NotFound(_)) => Ok(()),
            r => r.map_err(map),
        }
    }

    fn publish(
        &self,
        name: &str,
        staging: &Path,
        target: &Path,
        how: Publish,
    ) -> Result<(), Error> {
        let spec = PublishSpec {
            block: how.block,
            read_only: how.read_only,
            sole_writer: how.sole_writer,
        };
        self.mgr
            .publish(
                name,
                &staging.to_string_lossy(),
                &target.to_string_lossy(),
                spec,
            )
            .map_err(|e| match e {
                VolumeError::InUse { .. } if how.sole_writer => Error::FailedPrecondition(format!(
                    "{e} (SINGLE_NODE_SINGLE_WRITER allows one read-write target)"
                )),
                e => map(e),
            })
    }

    fn unpublish(&self, name: &str, target: &Path) -> Result<(), Error> {
        self.mgr
            .unpublish(name, &target.to_string_lossy())
            .map_err(map)
    }

    fn usage(&self, name: &str, path: &Path) -> Result<Usage, Error> {
        let u = self.mgr.usage(name, path).map_err(map)?;
        Ok(Usage {
            total_bytes: u.total_bytes,
            used_bytes: u.used_bytes,
            available_bytes: u.available_bytes,
            inodes: u.inodes,
        })
    }

    fn expand_on_node(&self, name: &str, _path: &Path) -> Result<u64, Error> {
        self.mgr.sync_read().map_err(map)?;
        let size = self.mgr.inspect(name).map_err(map)?.size_bytes;
        let info = self.mgr.resize(name, &SizeArg::Bytes(size)).map_err(map)?;
        Ok(info.size_bytes)
    }

    fn valid_snapshot_name(&self, name: &str) -> bool {
        crate::types::validate_snapshot_name(name).is_ok()
    }

    fn snapshot_create(&self, volume: &str, name: &str) -> Result<SnapshotFacts, Error> {
        let s = self.mgr.snapshot_create(volume, name, true).map_err(map)?;
        let fs = self.mgr.inspect(volume).map_err(map)?.fs;
        Ok(snapshot_facts(&s, fs.as_str().to_string()))
    }

    fn snapshots(&self) -> Result<Vec<SnapshotFacts>, Error> {
        let state = self.fresh_state()?;
        let views = self.mgr.snapshot_list(None).map_err(map)?;
        let fs = |s: &crate::volume::view::SnapshotView| {
            state
                .volumes
                .get(&s.volume_id)
                .map_or_else(String::new, |v| v.fs.as_str().to_string())
        };
        Ok(views.iter().map(|s| snapshot_facts(s, fs(s))).collect())
    }

    fn snapshot_delete(&self, volume: &str, name: &str) -> Result<(), Error> {
        match self.mgr.snapshot_delete(volume, name) {
            Ok(_) | Err(VolumeError::NotFound(_) | VolumeError::SnapshotNotFound { .. }) => Ok(()),
            Err(e) => Err(map(e)),
        }
    }
}
