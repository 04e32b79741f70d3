//! The Kubernetes CSI driver `csi.cairn.dev` (CSI spec v1.12): the
//! Identity, Controller and Node services, served over a unix socket by the
//! node daemon. This crate owns the protocol: required fields, capability
//! and access-mode checks, capacity rounding, topology matching,
//! pagination, idempotency and the spec's error codes. The daemon supplies
//! a [`Backend`] built on its volume manager; backend calls may block (mkfs,
//! mount) and run on the blocking pool.
//!
//! Cairn's CSI volume id is the Cairn volume name, so `cairn volume inspect
//! <id>` works on what Kubernetes shows. A volume is attached to one node
//! at a time (the attachment is the fencing epoch), so only single-node
//! access modes are offered.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

mod controller;
mod identity;
mod node;
mod rules;
mod snapshots;

/// Generated from `proto/csi.proto` (package `csi.v1`).
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("csi.v1");
}

/// The driver name Kubernetes objects refer to.
pub const DRIVER_NAME: &str = "csi.cairn.dev";
/// Topology key carrying the node name.
pub const TOPOLOGY_NODE: &str = "topology.cairn.dev/node";
/// Topology key carrying the node's `zone` label.
pub const TOPOLOGY_ZONE: &str = "topology.cairn.dev/zone";

/// A failure with the CSI status code it maps to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    InvalidArgument(String),
    NotFound(String),
    AlreadyExists(String),
    OutOfRange(String),
    ResourceExhausted(String),
    FailedPrecondition(String),
    Aborted(String),
    Unavailable(String),
    Internal(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (Error::InvalidArgument(m)
        | Error::NotFound(m)
        | Error::AlreadyExists(m)
        | Error::OutOfRange(m)
        | Error::ResourceExhausted(m)
        | Error::FailedPrecondition(m)
        | Error::Aborted(m)
        | Error::Unavailable(m)
        | Error::Internal(m)) = self;
        f.write_str(m)
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        use tonic::Status;
        match e {
            Error::InvalidArgument(m) => Status::invalid_argument(m),
            Error::NotFound(m) => Status::not_found(m),
            Error::AlreadyExists(m) => Status::already_exists(m),
            Error::OutOfRange(m) => Status::out_of_range(m),
            Error::ResourceExhausted(m) => Status::resource_exhausted(m),
            Error::FailedPrecondition(m) => Status::failed_precondition(m),
            Error::Aborted(m) => Status::aborted(m),
            Error::Unavailable(m) => Status::unavailable(m),
            Error::Internal(m) => Status::internal(m),
        }
    }
}

/// A cluster node as the CSI driver sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeFacts {
    /// The node name: the CSI node id (the Kubernetes node name).
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub up: bool,
    pub free_bytes: u64,
}

/// What a volume is made from (CSI's volume content source).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Snapshot `name` of volume `volume` (CSI snapshot id `volume@name`).
    Snapshot { volume: String, name: String },
    /// A volume as it was when the clone was made.
    Volume(String),
}

/// A snapshot as the CSI driver sees it; its CSI id is `volume@name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotFacts {
    pub volume: String,
    pub name: String,
    pub size_bytes: u64,
    pub created_unix_ms: u64,
    pub ready: bool,
    /// The filesystem of its volume (a clone of it gets the same).
    pub fs: String,
}

impl SnapshotFacts {
    pub fn id(&self) -> String {
        format!("{}@{}", self.volume, self.name)
    }
}

/// A volume as the CSI driver sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeFacts {
    /// What it was made from.
    pub source: Option<Source>,
    pub name: String,
    /// The CO's name it was created by, when not `name`.
    pub csi_name: Option<String>,
    pub size_bytes: u64,
    /// `ext4`, `xfs`, or `none` (raw block).
    pub fs: String,
    pub replicas: u32,
    /// The node the volume is attached to (read-write).
    pub attached_to: Option<String>,
    /// Nodes holding it read-only.
    pub readers: Vec<String>,
    /// Why the volume is degraded (a replica faulted, offline or missing).
    pub problem: Option<String>,
}

impl VolumeFacts {
    pub fn is_block(&self) -> bool {
        self.fs == "none"
    }

    /// Every node the volume is published to.
    pub fn published(&self) -> Vec<String> {
        self.attached_to
            .iter()
            .chain(&self.readers)
            .cloned()
            .collect()
    }
}

/// What CreateVolume asks the backend for (all checked already).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateSpec {
    pub name: String,
    /// The CO's name for the volume when it differs from `name` (see
    /// `rules::volume_id_for`).
    pub csi_name: Option<String>,
    pub size_bytes: u64,
    pub fs: String,
    pub replicas: Option<u32>,
    /// Make it a clone of this (its size at least the source's).
    pub source: Option<Source>,
    /// Replicas only on these nodes (topology requisites); `None`: any.
    pub allowed_nodes: Option<Vec<String>>,
    /// One replica on this node when it has room (locality).
    pub local_node: Option<String>,
}

/// How NodeStageVolume prepares a volume on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage {
    /// Attach only (publish binds the device file); otherwise also format
    /// on first use and mount at the staging path with `flags`.
    pub block: bool,
    pub flags: Vec<String>,
    /// As one of several readers (MULTI_NODE_READER_ONLY): read-only
    /// device and mount, no formatting.
    pub read_only: bool,
}

/// How NodePublishVolume exposes a staged volume at a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Publish {
    /// Bind the device file (raw block) instead of the staged filesystem.
    pub block: bool,
    pub read_only: bool,
    /// SINGLE_NODE_SINGLE_WRITER: refuse a read-write publication while
    /// another target holds one.
    pub sole_writer: bool,
}

/// Space and inode use of a published volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub total_bytes: u64,
    pub used_bytes: u64,
    pub available_bytes: u64,
    /// (total, used, free); `None` for raw block volumes.
    pub inodes: Option<(u64, u64, u64)>,
}

/// Sizes the backend accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizeRules {
    /// Volume sizes are multiples of this.
    pub align: u64,
    pub max: u64,
    /// Size of a volume created without a capacity range.
    pub default: u64,
}

/// The storage behind the driver.
pub trait Backend: Send + Sync + 'static {
    /// Ok when this node can serve requests.
    fn ready(&self) -> Result<(), String>;
    /// This node.
    fn this_node(&self) -> NodeFacts;
    fn nodes(&self) -> Result<Vec<NodeFacts>, Error>;
    fn size_rules(&self) -> SizeRules;
    /// Replicas of a volume created without `replicas`.
    fn default_replicas(&self) -> u32;
    /// Most replicas a volume may have.
    fn max_replicas(&self) -> u32;
    /// Most volumes this node attaches at once.
    fn max_volumes_per_node(&self) -> u64;
    /// Whether `name` is a valid volume name of the core (a CSI name that
    /// is one becomes the volume id as it is).
    fn valid_volume_name(&self, name: &str) -> bool;
    /// Holds `volume` against every other operation on it (from any front
    /// door) until the returned value is dropped; `Aborted` while another
    /// one runs. Operations on the calling thread run inside it.
    fn claim(&self, volume: &str) -> Result<Box<dyn std::any::Any + Send>, Error>;

    fn create(&self, spec: &CreateSpec) -> Result<VolumeFacts, Error>;
    fn volume(&self, name: &str) -> Result<Option<VolumeFacts>, Error>;
    /// Every volume, in any order.
    fn volumes(&self) -> Result<Vec<VolumeFacts>, Error>;
    fn delete(&self, name: &str) -> Result<(), Error>;
    /// Records the volume's attachment to `node`, or with `read_only` adds
    /// `node` to its readers (idempotent).
    fn attach_to(&self, name: &str, node: &str, read_only: bool) -> Result<(), Error>;
    /// Clears `node`'s attachment or reader hold; Ok when it has neither.
    fn detach_from(&self, name: &str, node: &str) -> Result<(), Error>;
    /// Grows the volume to at least `size_bytes`; returns the volume.
    fn expand(&self, name: &str, size_bytes: u64) -> Result<VolumeFacts, Error>;

    /// Ok when already staged there the same way; ALREADY_EXISTS when
    /// staged there differently.
    fn stage(&self, name: &str, staging: &Path, how: &Stage) -> Result<(), Error>;
    /// Undoes [`Backend::stage`] on this node (the attachment stays until
    /// [`Backend::detach_from`]); Ok when the volume is not staged there.
    fn unstage(&self, name: &str, staging: &Path) -> Result<(), Error>;
    /// Bind-mounts the staged filesystem (or, for `block`, the device file)
    /// on `target`. Ok when already published there the same way;
    /// ALREADY_EXISTS when something else or another mode is there;
    /// FAILED_PRECONDITION when `sole_writer` and another target holds it
    /// read-write.
    fn publish(&self, name: &str, staging: &Path, target: &Path, how: Publish)
        -> Result<(), Error>;
    /// Unmounts and removes `target`; Ok when nothing is there.
    fn unpublish(&self, name: &str, target: &Path) -> Result<(), Error>;
    /// Use of the volume staged or published at `path`; NOT_FOUND when the
    /// volume is neither staged nor published there.
    fn usage(&self, name: &str, path: &Path) -> Result<Usage, Error>;
    /// Makes this node's view (engine, device, filesystem at `path`) match
    /// the volume's recorded size; returns that size.
    fn expand_on_node(&self, name: &str, path: &Path) -> Result<u64, Error>;

    /// Whether `name` is a valid snapshot name of the core.
    fn valid_snapshot_name(&self, name: &str) -> bool;
    /// Takes snapshot `name` of `volume` (a mounted filesystem frozen
    /// around it); returns it once ready.
    fn snapshot_create(&self, volume: &str, name: &str) -> Result<SnapshotFacts, Error>;
    /// Every snapshot, in any order.
    fn snapshots(&self) -> Result<Vec<SnapshotFacts>, Error>;
    /// Deletes a snapshot; Ok when it does not exist.
    fn snapshot_delete(&self, volume: &str, name: &str) -> Result<(), Error>;
}

/// Shared by the three services.
#[derive(Clone)]
pub struct Driver {
    backend: Arc<dyn Backend>,
    version: &'static str,
}

impl Driver {
    pub fn new(backend: Arc<dyn Backend>) -> Driver {
        Driver {
            backend,
            version: env!("CARGO_PKG_VERSION"),
        }
    }

    /// Runs a backend call on the blocking pool.
    async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Backend) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, tonic::Status> {
        let b = self.backend.clone();
        tokio::task::spawn_blocking(move || f(b.as_ref()))
            .await
            .map_err(|e| tonic::Status::internal(format!("backend task failed: {e}")))?
            .map_err(tonic::Status::from)
    }

    /// Like [`Driver::call`], holding the backend's claim on `volume` for as
    /// long as the work runs (not just the request: a client that gives up
    /// and retries must not overtake it). ABORTED while another operation
    /// on the volume, from any front door, is in progress.
    async fn exclusive<T: Send + 'static>(
        &self,
        volume: &str,
        f: impl FnOnce(&dyn Backend) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, tonic::Status> {
        let volume = volume.to_string();
        self.call(move |b| {
            let _claim = b.claim(&volume)?;
            f(b)
        })
        .await
    }
}

/// The unix socket's connections as a stream for tonic.
struct Incoming(tokio::net::UnixListener);

impl futures_core::Stream for Incoming {
    type Item = std::io::Result<tokio::net::UnixStream>;
    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.0.poll_accept(cx).map(|r| Some(r.map(|(s, _)| s)))
    }
}

/// Binds `path` (replacing a stale socket file, creating the directory).
pub fn bind(path: &Path) -> Result<std::os::unix::net::UnixListener, String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("removing old {}: {e}", path.display())),
    }
    let l = std::os::unix::net::UnixListener::bind(path)
        .map_err(|e| format!("bind {}: {e}", path.display()))?;
    l.set_nonblocking(true)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(l)
}

/// Serves the three services on `listener` until `stop` resolves.
pub async fn serve(
    listener: std::os::unix::net::UnixListener,
    backend: Arc<dyn Backend>,
    stop: impl std::future::Future<Output = ()> + Send,
) -> Result<(), String> {
    let listener = tokio::net::UnixListener::from_std(listener).map_err(|e| e.to_string())?;
    let d = Driver::new(backend);
    tonic::transport::Server::builder()
        .add_service(pb::identity_server::IdentityServer::new(d.clone()))
        .add_service(pb::controller_server::ControllerServer::new(d.clone()))
        .add_service(pb::node_server::NodeServer::new(d))
        .serve_with_incoming_shutdown(Incoming(listener), stop)
        .await
        .map_err(|e| e.to_string())
}

/// A path field: required, absolute, no `..`, no NUL; returned normalised
/// (no `.` or empty components, no trailing `/`).
fn path_field(field: &str, value: &str) -> Result<PathBuf, Error> {
    if value.is_empty() {
        return Err(Error::InvalidArgument(format!("{field} is required")));
    }
    let p = Path::new(value);
    if !p.is_absolute()
        || value.contains('\0')
        || p.components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(Error::InvalidArgument(format!(
            "{field} {value:?} must be an absolute path without '..'"
        )));
    }
    Ok(p.components().collect())
}

/// A string field that must be set.
fn required<'a>(field: &str, value: &'a str) -> Result<&'a str, Error> {
    if value.is_empty() {
        return Err(Error::InvalidArgument(format!("{field} is required")));
    }
    Ok(value)
}
