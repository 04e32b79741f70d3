//! The volume manager proper. Locking: `busy` admits one operation per volume
//! at a time (a second one gets [`VolumeError::Busy`]); `hosts` holds the
//! replicas stored on this node, `engines` the engines of volumes served
//! from this node (attached or exported); `exports` counts NBD users and is
//! the lock under which attach and NBD writers exclude each other. No lock is
//! held across a command that runs a program (mkfs, resize2fs).

mod restart;
mod scrub;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use cairn_proto::api::{self, SizeArg};
use serde::{Deserialize, Serialize};

use super::mount;
use super::{CreateVolume, VolumeError};
use crate::cluster::state::{Command, NodeState, ReplicaState, StateError, Volume, MAX_REPLICAS};
use crate::cluster::store::{ClusterStore, StoreError};
use crate::engine::metrics::{render_headers, VolumeMetrics};
use crate::engine::{Engine, EngineCtx, EngineError};
use crate::frontend::fuse::{holder, FuseServer};
use crate::frontend::nbd::{Export, ExportProvider};
use crate::pool::Pool;
use crate::replica::commit::Meta;
use crate::replica::host::HostMap;
use crate::replica::{LocalReplica, ReplicaError};
use crate::sys::loopdev;
use crate::types::{
    now_unix_ms, validate_volume_name, ByteSize, FsType, NodeId, VolumeId, MAX_VOLUME_SIZE,
    SIZE_ALIGN,
};

pub struct ManagerConfig {
    pub node_id: NodeId,
    pub fuse_dir: PathBuf,
    /// Socket of the process that keeps the FUSE connection across restarts.
    pub holder_socket: PathBuf,
    pub fuse_threads: usize,
    /// Replicas of a volume created without `replicas`.
    pub default_replicas: u32,
    /// Rebuild copy limit in bytes per second (0: unlimited).
    pub rebuild_bandwidth: u64,
    /// The running kernel's boot id (a change since the last start marks
    /// the hosted replicas unclean).
    pub boot_id: String,
    /// How long I/O on attached volumes waits for a daemon: the FUSE
    /// holder's patience with a dead one, and a restarted one's with its
    /// own start-up.
    pub orphan_io_timeout: std::time::Duration,
    pub handle: tokio::runtime::Handle,
}

/// What this node did to the kernel for an attached volume, persisted so a
/// restart can re-serve it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LocalAttachment {
    device: String,
    mounts: Vec<String>,
    /// Mount options per mount path (when not the defaults).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    options: BTreeMap<String, Vec<String>>,
    /// Held as a reader (read-only device, no attachment of its own).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    read_only: bool,
    /// Set by a graceful shutdown once everything was flushed: the next
    /// start re-serves the attachment without resyncing its replicas.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    clean_stop: bool,
}

#[derive(Default, Clone, Copy)]
struct ExportUse {
    readers: usize,
    writers: usize,
}

pub struct VolumeManager {
    cfg: ManagerConfig,
    db: sled::Db,
    pool: Arc<Pool>,
    store: Arc<ClusterStore>,
    local: sled::Tree,
    fuse: Mutex<Option<FuseServer>>,
    hosts: Arc<HostMap>,
    ctx: Arc<EngineCtx>,
    engines: RwLock<HashMap<VolumeId, Arc<Engine>>>,
    busy: Mutex<HashSet<VolumeId>>,
    exports: Mutex<HashMap<VolumeId, ExportUse>>,
    pub started: Instant,
}

/// Admits one operation on a volume; released on drop.
struct OpGuard<'a> {
    busy: &'a Mutex<HashSet<VolumeId>>,
    id: VolumeId,
}

impl Drop for OpGuard<'_> {
    fn drop(&mut self) {
        self.busy.lock().expect("busy lock").remove(&self.id);
    }
}

/// Mount options for `fs`: a reader's mount is read-only and never replays
/// the journal (it must not write, and no writer exists to have left one).
fn mount_options(fs: FsType, given: &[String], read_only: bool) -> Vec<String> {
    let mut o = given.to_vec();
    if read_only {
        o.push("ro".into());
        match fs {
            FsType::Ext4 => o.push("noload".into()),
            FsType::Xfs => o.push("norecovery".into()),
            FsType::None => {}
        }
    }
    o
}

pub fn parse_size(arg: &SizeArg) -> Result<u64, VolumeError> {
    let bytes = match arg {
        SizeArg::Bytes(b) => *b,
        SizeArg::Text(t) => {
            t.parse::<ByteSize>()
                .map_err(|e| VolumeError::InvalidSize(e.to_string()))?
                .0
        }
    };
    if bytes == 0 {
        return Err(VolumeError::InvalidSize(format!(
            "size {arg} must be greater than zero"
        )));
    }
    if bytes > MAX_VOLUME_SIZE {
        return Err(VolumeError::InvalidSize(format!(
            "size {arg} ({bytes} bytes) exceeds the maximum volume size of {}",
            ByteSize(MAX_VOLUME_SIZE)
        )));
    }
    Ok(bytes.div_ceil(SIZE_ALIGN) * SIZE_ALIGN)
}

impl VolumeManager {
    /// Opens every replica, claims its extents, removes orphans, cleans stale
    /// kernel state, mounts FUSE and re-serves this node's attachments.
    pub fn open(
        cfg: ManagerConfig,
        meta: Arc<Meta>,
        pool: Arc<Pool>,
        store: Arc<ClusterStore>,
    ) -> Result<Arc<Self>, String> {
        let db = meta.db.clone();
        let local = db
            .open_tree("local_attachments")
            .map_err(|e| e.to_string())?;
        let volumes: Vec<Volume> = store.read().volumes.values().cloned().collect();
        let hosts = Arc::new(HostMap::new(
            cfg.node_id,
            meta.clone(),
            pool.clone(),
            store.clone(),
        )?);
        let mut claimed = Vec::new();
        // Replicas this node holds for volumes that list it.
        for v in volumes.iter().filter(|v| v.has_replica_on(cfg.node_id)) {
            let (rep, owned) = LocalReplica::load(&meta, pool.clone(), v.id)
                .map_err(|e| format!("volume {}: {e}", v.name))?;
            claimed.extend(owned);
            hosts.insert(Arc::new(rep));
        }
        // Orphans: replicas of volumes the state no longer lists here (a
        // crash between the delete command and freeing the space, or a
        // replica moved away while this node was down).
        for name in db.tree_names() {
            let name = String::from_utf8_lossy(&name).into_owned();
            let Some(id) = name
                .strip_prefix("extents/")
                .and_then(|s| s.parse::<VolumeId>().ok())
            else {
                continue;
            };
            if hosts.get(id).is_some() {
                continue;
            }
            tracing::info!(volume = %id, "freeing the space of a replica no longer held here");
            let (rep, mut owned) =
                LocalReplica::load(&meta, pool.clone(), id).map_err(|e| e.to_string())?;
            pool.claim_all(&mut owned)
                .map_err(|a| format!("orphan replica {id} claims {a:?} twice"))?;
            rep.destroy()
                .map_err(|e| format!("freeing orphan replica {id}: {e}"))?;
        }
        pool.claim_all(&mut claimed)
            .map_err(|a| format!("extent {a:?} is claimed twice or lies outside the pool"))?;
        let unclean = hosts.note_boot(&cfg.boot_id)?;
        if unclean > 0 {
            tracing::warn!(
                replicas = unclean,
                "the kernel restarted since this daemon last ran: hosted replicas may lack unflushed writes and serve again once rebuilt"
            );
        }
        let ctx = Arc::new(EngineCtx {
            me: cfg.node_id,
            store: store.clone(),
            hosts: hosts.clone(),
            channels: Default::default(),
            fast: Default::default(),
            handle: cfg.handle.clone(),
            rebuild_bandwidth: cfg.rebuild_bandwidth,
        });

        // A FUSE connection kept by the holder across a crash is taken
        // over: its loop devices and mounts (containers' included) live on.
        let adopted = holder::reclaim(&cfg.holder_socket, &cfg.fuse_dir);
        let fuse = match adopted {
            Some(fds) => {
                tracing::info!(path = %cfg.fuse_dir.display(), fds = fds.len(), "took over the FUSE connection kept across the restart");
                FuseServer::adopt(
                    &cfg.fuse_dir,
                    fds,
                    cfg.fuse_threads,
                    &cfg.holder_socket,
                    cfg.orphan_io_timeout,
                )
            }
            None => {
                mount::cleanup_stale(&cfg.fuse_dir);
                FuseServer::mount(
                    &cfg.fuse_dir,
                    cfg.fuse_threads,
                    &cfg.holder_socket,
                    cfg.orphan_io_timeout,
                )
                .map_err(|e| format!("cannot mount FUSE at {}: {e}", cfg.fuse_dir.display()))?
            }
        };
        let adopted = !fuse.started();
        let mgr = Arc::new(VolumeManager {
            cfg,
            db,
            pool,
            store,
            local,
            fuse: Mutex::new(Some(fuse)),
            hosts,
            ctx,
            engines: RwLock::new(HashMap::new()),
            busy: Mutex::new(HashSet::new()),
            exports: Mutex::new(HashMap::new()),
            started: Instant::now(),
        });
        mgr.reserve_attachments(adopted);
        Ok(mgr)
    }

    /// The replicas this node stores (for the data service).
    pub fn hosts(&self) -> Arc<HostMap> {
        self.hosts.clone()
    }

    /// Drives local replicas toward the state: creates the ones listed for
    /// this node, frees the ones no longer listed, and drops engines of
    /// deleted volumes. Runs every few seconds for the daemon's life.
    pub fn reconcile(&self) {
        // Hosted ids before the state: a replica created after this list
        // was taken is not judged against an older state.
        let hosted = self.hosts.ids();
        let state = self.store.read().clone();
        for v in state.volumes.values() {
            if v.has_replica_on(self.cfg.node_id) && self.hosts.get(v.id).is_none() {
                if let Err(e) = self.hosts.get_or_create(v.id, &self.store) {
                    tracing::warn!(volume = %v.name, error = %e, "cannot create local replica");
                }
            }
        }
        for id in hosted {
            let listed = state
                .volumes
                .get(&id)
                .is_some_and(|v| v.has_replica_on(self.cfg.node_id));
            if !listed {
                if let Err(e) = self.hosts.destroy(id) {
                    tracing::error!(volume = %id, error = %e, "freeing a replica failed; retried");
                }
            }
        }
        self.hosts.bound_map_log(1 << 20);
        // An unclean replica (this node's kernel restarted) still counted
        // healthy beside another healthy copy is recorded faulted, so the
        // engine reads elsewhere and rebuilds it without waiting for an I/O
        // to stumble on it. Retried each round (no quorum, a new epoch).
        for id in self.hosts.unclean_ids() {
            let Some(v) = state.volumes.get(&id) else {
                continue;
            };
            let mine = v.replica(self.cfg.node_id).map(|r| r.state);
            if mine != Some(ReplicaState::Healthy) || v.healthy().count() < 2 {
                continue;
            }
            let r = self.store.propose(Command::SetReplicaState {
                id,
                node: self.cfg.node_id,
                state: ReplicaState::Faulted,
                epoch: v.epoch,
            });
            match r {
                Ok(_) => {
                    tracing::info!(volume = %v.name, "unclean local replica recorded faulted; it is rebuilt from a healthy one")
                }
                Err(e) => {
                    tracing::debug!(volume = %v.name, error = %e, "unclean local replica not recorded faulted yet")
                }
            }
        }
        // Unattached volumes with replicas to rebuild: the node of the first
        // healthy replica runs an engine whose healer does it.
        for v in state.volumes.values() {
            let needs = v.replicas.iter().any(|r| r.state != ReplicaState::Healthy)
                || v.replicas.len() < v.wanted();
            let first = v.healthy().next().map(|r| r.node);
            if v.attachment.is_none() && needs && first == Some(self.cfg.node_id) {
                if let Err(e) = self.engine_for(v).and_then(|e| {
                    e.activate(v, v.epoch)
                        .map_err(|err| VolumeError::engine(&v.name, err))
                }) {
                    tracing::debug!(volume = %v.name, error = %e, "rebuild engine not ready");
                }
            }
        }
        let gone: Vec<VolumeId> = self
            .engines
            .read()
            .expect("engines lock")
            .keys()
            .filter(|id| !state.volumes.contains_key(id))
            .copied()
            .collect();
        for id in gone {
            if let Some(e) = self.engines.write().expect("engines lock").remove(&id) {
                e.stop();
            }
        }
    }

    /// Replicas of a volume created without a count.
    pub fn default_replicas(&self) -> u32 {
        self.cfg.default_replicas
    }

    pub fn node_id(&self) -> NodeId {
        self.cfg.node_id
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    fn guard(&self, id: VolumeId, name: &str) -> Result<OpGuard<'_>, VolumeError> {
        if !self.busy.lock().expect("busy lock").insert(id) {
            return Err(VolumeError::Busy(name.into()));
        }
        Ok(OpGuard {
            busy: &self.busy,
            id,
        })
    }

    fn find(&self, name: &str) -> Result<Volume, VolumeError> {
        self.store
            .read()
            .volume_by_name(name)
            .cloned()
            .ok_or_else(|| VolumeError::NotFound(name.into()))
    }

    fn node_name(&self, id: NodeId) -> String {
        self.store
            .read()
            .nodes
            .get(&id)
            .map(|n| n.name.clone())
            .unwrap_or_else(|| id.to_string())
    }

    /// This node's engine for `v`, created (at the volume's current epoch,
    /// with its healer running) on first use.
    fn engine_for(&self, v: &Volume) -> Result<Arc<Engine>, VolumeError> {
        if let Some(e) = self.engines.read().expect("engines lock").get(&v.id) {
            return Ok(e.clone());
        }
        let mut engines = self.engines.write().expect("engines lock");
        if let Some(e) = engines.get(&v.id) {
            return Ok(e.clone());
        }
        let e = Engine::new(
            v,
            v.epoch,
            self.ctx.clone(),
            Arc::new(VolumeMetrics::default()),
        )
        .map_err(|e| VolumeError::engine(&v.name, e))?;
        e.start_healer();
        engines.insert(v.id, e.clone());
        Ok(e)
    }

    fn engine(&self, id: VolumeId) -> Option<Arc<Engine>> {
        self.engines.read().expect("engines lock").get(&id).cloned()
    }

    fn local_record(&self, id: VolumeId) -> Option<LocalAttachment> {
        let v = self.local.get(id.to_string()).ok().flatten()?;
        serde_json::from_slice(&v).ok()
    }

    /// Every local attachment record (unreadable ones are skipped).
    fn local_records(&self) -> Vec<(VolumeId, LocalAttachment)> {
        self.local
            .iter()
            .filter_map(|kv| kv.ok())
            .filter_map(|(k, v)| {
                Some((
                    String::from_utf8_lossy(&k).parse().ok()?,
                    serde_json::from_slice(&v).ok()?,
                ))
            })
            .collect()
    }

    fn save_local(&self, id: VolumeId, rec: Option<&LocalAttachment>) -> Result<(), VolumeError> {
        let key = id.to_string();
        let r = match rec {
            Some(rec) => self
                .local
                .insert(key, serde_json::to_vec(rec).expect("serialisable"))
                .map(|_| ()),
            None => self.local.remove(key).map(|_| ()),
        };
        r.and_then(|_| self.db.flush().map(|_| ()))
            .map_err(|e| VolumeError::LocalStore(e.to_string()))
    }

    fn propose(&self, cmd: Command, name: &str) -> Result<(), VolumeError> {
        self.propose_at(cmd, name).map(|_| ())
    }

    /// Proposes `cmd`; returns the applied index that includes it.
    fn propose_at(&self, cmd: Command, name: &str) -> Result<u64, VolumeError> {
        match self.store.propose(cmd) {
            Ok(s) => Ok(s.applied),
            Err(StoreError::Refused(e)) => Err(match e {
                StateError::VolumeExists(n) => VolumeError::AlreadyExists(n),
                StateError::VolumeNotFound(_) => VolumeError::NotFound(name.into()),
                StateError::InvalidSize(s) => VolumeError::InvalidSize(format!("{s} bytes")),
                StateError::Shrink { current, requested } => VolumeError::Shrink {
                    name: name.into(),
                    current,
                    requested,
                },
                StateError::AttachedElsewhere { node, .. } => VolumeError::AttachedElsewhere {
                    name: name.into(),
                    node: node.to_string(),
                },
                StateError::Attached(_) => VolumeError::Attached {
                    name: name.into(),
                    node: "?".into(),
                },
                StateError::HasReaders { count, .. } => VolumeError::InUse {
                    name: name.into(),
                    why: format!("{count} node(s) hold it read-only"),
                },
                other => VolumeError::Metadata(StoreError::Refused(other)),
            }),
            Err(e) => Err(e.into()),
        }
    }

    // ---- queries -------------------------------------------------------

    fn info(&self, v: &Volume) -> api::VolumeInfo {
        let rec = self.local_record(v.id);
        let allocated = self
            .hosts
            .get(v.id)
            .map(|h| h.replica.allocated_bytes())
            .unwrap_or(0);
        let engine = self.engine(v.id);
        let progress = engine
            .as_ref()
            .map(|e| e.progress.lock().expect("progress lock").clone());
        let replicas = {
            let s = self.store.read();
            v.replicas
                .iter()
                .map(|r| {
                    let node = s.nodes.get(&r.node);
                    let down = node.is_none_or(|n| n.state == NodeState::Down);
                    let state = if down && r.state == ReplicaState::Healthy {
                        "offline"
                    } else {
                        r.state.as_str()
                    };
                    api::ReplicaInfo {
                        node: node
                            .map(|n| n.name.clone())
                            .unwrap_or_else(|| r.node.to_string()),
                        state: state.into(),
                        rebuild_progress: progress
                            .as_ref()
                            .filter(|p| p.node == Some(r.node) && p.total_extents > 0)
                            .map(|p| p.done_extents as f64 / p.total_extents as f64),
                    }
                })
                .collect()
        };
        let device = rec.as_ref().map(|r| r.device.clone());
        let mounts = rec.map(|r| r.mounts).unwrap_or_default();
        let state = if !mounts.is_empty() {
            "mounted"
        } else if device.is_some() || v.attachment.is_some() || !v.readers.is_empty() {
            "attached"
        } else {
            "detached"
        };
        api::VolumeInfo {
            id: v.id.to_string(),
            name: v.name.clone(),
            size_bytes: v.size_bytes,
            fs: v.fs.as_str().into(),
            state: state.into(),
            device,
            mounts,
            allocated_bytes: allocated,
            formatted: v.formatted,
            epoch: v.epoch,
            attached_node: v.attachment.as_ref().map(|a| self.node_name(a.node)),
            readers: {
                let mut r: Vec<String> = v.readers.iter().map(|n| self.node_name(*n)).collect();
                r.sort();
                r
            },
            created_unix_ms: v.created_unix_ms,
            replicas,
            csi_name: v.csi_name.clone(),
        }
    }

    /// Brings the applied metadata up to everything committed (ReadIndex).
    pub fn sync_read(&self) -> Result<(), VolumeError> {
        Ok(self.store.sync_read()?)
    }

    pub fn list(&self) -> Vec<api::VolumeInfo> {
        let vols: Vec<Volume> = self.store.read().volumes.values().cloned().collect();
        let mut out: Vec<_> = vols.iter().map(|v| self.info(v)).collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Compares all healthy replicas extent by extent (through the engine
    /// that serves the volume, so it must run on the attaching node); with
    /// `repair`, makes differing extents equal (see `engine::scrub`).
    pub fn verify(&self, name: &str, repair: bool) -> Result<api::VerifyReport, VolumeError> {
        let v = self.find(name)?;
        match &v.attachment {
            Some(a) if a.node != self.cfg.node_id => {
                return Err(VolumeError::AttachedElsewhere {
                    name: name.into(),
                    node: self.node_name(a.node),
                })
            }
            _ => {}
        }
        let engine = self.engine_for(&v)?;
        if v.attachment.is_none() {
            engine
                .activate(&v, v.epoch)
                .map_err(|e| VolumeError::engine(name, e))?;
        }
        let r = engine
            .scrub(repair, 0)
            .map_err(|e| VolumeError::engine(name, e))?;
        Ok(api::VerifyReport {
            extents_compared: r.extents,
            replicas_compared: r.replicas as u32,
            mismatched_extents: r.mismatched,
            repaired: r
                .repaired
                .iter()
                .map(|x| api::RepairedExtent {
                    extent: x.extent,
                    source: self.node_name(x.source),
                    majority: x.majority,
                    targets: x.targets.iter().map(|n| self.node_name(*n)).collect(),
                })
                .collect(),
        })
    }

    pub fn inspect(&self, name: &str) -> Result<api::VolumeInfo, VolumeError> {
        Ok(self.info(&self.find(name)?))
    }

    pub fn pool_info(&self) -> api::PoolInfo {
        let usage = self.pool.usage();
        let provisioned = self
            .store
            .read()
            .volumes
            .values()
            .map(|v| v.size_bytes)
            .sum();
        let capacity: u64 = usage.iter().map(|u| u.1).sum();
        let allocated: u64 = usage.iter().map(|u| u.2).sum();
        api::PoolInfo {
            id: self.pool.id.to_string(),
            extent_size_bytes: self.pool.extent_size,
            capacity_bytes: capacity,
            allocated_bytes: allocated,
            free_bytes: capacity - allocated,
            provisioned_bytes: provisioned,
            devices: usage
                .iter()
                .map(|(d, cap, used)| api::DeviceInfo {
                    index: d.index,
                    path: d.path.to_string_lossy().into_owned(),
                    kind: if d.is_block { "block" } else { "file" }.into(),
                    id: d.id.to_string(),
                    capacity_bytes: *cap,
                    allocated_bytes: *used,
                })
                .collect(),
        }
    }

    pub fn counts(&self) -> (u64, u64) {
        let s = self.store.read();
        let attached = s
            .volumes
            .values()
            .filter(|v| {
                v.attachment
                    .as_ref()
                    .is_some_and(|a| a.node == self.cfg.node_id)
            })
            .count();
        (s.volumes.len() as u64, attached as u64)
    }

    /// Prometheus text for every volume plus pool gauges.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write;
        let cap = self.pool.capacity_bytes();
        let used = self.pool.allocated_bytes();
        let _ = writeln!(out, "# HELP cairn_pool_capacity_bytes Usable pool capacity\n# TYPE cairn_pool_capacity_bytes gauge");
        let _ = writeln!(out, "cairn_pool_capacity_bytes {cap}");
        let _ = writeln!(out, "# HELP cairn_pool_allocated_bytes Pool bytes allocated to volumes\n# TYPE cairn_pool_allocated_bytes gauge");
        let _ = writeln!(out, "cairn_pool_allocated_bytes {used}");
        let _ = writeln!(out, "# HELP cairn_data_connections Replica data connections being served\n# TYPE cairn_data_connections gauge");
        let _ = writeln!(
            out,
            "cairn_data_connections {}",
            self.hosts
                .data_connections
                .load(std::sync::atomic::Ordering::Relaxed)
        );
        let _ = writeln!(out, "# HELP cairn_data_connections_refused_total Replica data connections refused at the limit\n# TYPE cairn_data_connections_refused_total counter");
        let _ = writeln!(
            out,
            "cairn_data_connections_refused_total {}",
            self.hosts
                .data_connections_refused
                .load(std::sync::atomic::Ordering::Relaxed)
        );
        let names: HashMap<VolumeId, String> = self
            .store
            .read()
            .volumes
            .values()
            .map(|v| (v.id, v.name.clone()))
            .collect();
        render_headers(out);
        let engines = self.engines.read().expect("engines lock").clone();
        let mut ids: Vec<VolumeId> = engines.keys().copied().chain(self.hosts.ids()).collect();
        ids.sort_by_key(|id| names.get(id).cloned());
        ids.dedup();
        for id in ids {
            let Some(name) = names.get(&id) else { continue };
            if let Some(e) = engines.get(&id) {
                e.metrics.render(out, name);
                let _ = writeln!(
                    out,
                    "cairn_volume_rebuild_bytes_total{{volume=\"{name}\"}} {}",
                    e.rebuild_bytes.load(std::sync::atomic::Ordering::Relaxed)
                );
                let p = e.progress.lock().expect("progress lock").clone();
                if p.total_extents > 0 {
                    let _ = writeln!(
                        out,
                        "cairn_volume_rebuild_progress{{volume=\"{name}\"}} {}",
                        p.done_extents as f64 / p.total_extents as f64
                    );
                }
            }
            if let Some(h) = self.hosts.get(id) {
                let _ = writeln!(
                    out,
                    "cairn_volume_allocated_bytes{{volume=\"{name}\"}} {}",
                    h.replica.allocated_bytes()
                );
            }
        }
    }

    // ---- create / resize / delete ---------------------------------------

    pub fn create(&self, req: &CreateVolume) -> Result<api::VolumeInfo, VolumeError> {
        let local = req.locality.then_some(self.cfg.node_id);
        self.create_placed(req, local, None)
    }

    /// Creates a volume with one replica on `local` when it has room and,
    /// with `allowed`, replicas only on those nodes.
    pub fn create_placed(
        &self,
        req: &CreateVolume,
        local: Option<NodeId>,
        allowed: Option<&[NodeId]>,
    ) -> Result<api::VolumeInfo, VolumeError> {
        validate_volume_name(&req.name).map_err(VolumeError::InvalidName)?;
        let size = parse_size(&req.size)?;
        let fs = req.fs;
        let count = req.replicas.unwrap_or(self.cfg.default_replicas);
        if !(1..=MAX_REPLICAS as u32).contains(&count) {
            return Err(VolumeError::InvalidReplicas(format!(
                "replicas={count}: a volume has 1 to {MAX_REPLICAS} replicas"
            )));
        }
        // Placement decides on everything committed (linearizable read).
        self.sync_read()?;
        if self.store.read().volume_by_name(&req.name).is_some() {
            return Err(VolumeError::AlreadyExists(req.name.clone()));
        }
        let nodes = {
            let s = self.store.read();
            crate::cluster::placement::place(
                &s,
                count as usize,
                local,
                &[],
                allowed,
                crate::cluster::placement::PLACEMENT_LABEL,
            )
            .map_err(VolumeError::NotEnoughNodes)?
        };
        let id = VolumeId::random();
        self.propose(
            Command::CreateVolume {
                id,
                name: req.name.clone(),
                size_bytes: size,
                fs,
                replica_node: nodes[0],
                more_replicas: nodes[1..].to_vec(),
                created_unix_ms: now_unix_ms(),
                csi_name: req.csi_name.clone(),
            },
            &req.name,
        )?;
        if nodes.contains(&self.cfg.node_id) {
            // The reconciler would do it too; doing it now makes the
            // replica ready before the first attach.
            if let Err(e) = self.hosts.get_or_create(id, &self.store) {
                tracing::warn!(volume = %req.name, error = %e, "local replica not created yet");
            }
        }
        tracing::info!(volume = %req.name, size, fs = fs.as_str(), replicas = count, "created volume");
        self.inspect(&req.name)
    }

    /// Sets the wanted replica count; the leader's scheduler adds or
    /// removes replicas (new ones are rebuilt online).
    pub fn set_replicas(&self, name: &str, count: u32) -> Result<(), VolumeError> {
        if !(1..=MAX_REPLICAS as u32).contains(&count) {
            return Err(VolumeError::InvalidReplicas(format!(
                "replicas={count}: a volume has 1 to {MAX_REPLICAS} replicas"
            )));
        }
        self.sync_read()?;
        let v = self.find(name)?;
        let up = self
            .store
            .read()
            .nodes
            .values()
            .filter(|n| n.state == NodeState::Up)
            .count();
        if count as usize > up {
            return Err(VolumeError::NotEnoughNodes(format!(
                "{count} replica(s) need {count} distinct nodes that are up, but {up} are"
            )));
        }
        self.propose(Command::SetReplicaCount { id: v.id, count }, name)?;
        tracing::info!(volume = %name, replicas = count, "replica count set");
        Ok(())
    }

    pub fn resize(&self, name: &str, size: &SizeArg) -> Result<api::VolumeInfo, VolumeError> {
        let v = self.find(name)?;
        let _g = self.guard(v.id, name)?;
        let size = parse_size(size)?;
        if size < v.size_bytes {
            return Err(VolumeError::Shrink {
                name: name.into(),
                current: v.size_bytes,
                requested: size,
            });
        }
        if size > v.size_bytes {
            self.propose(
                Command::ResizeVolume {
                    id: v.id,
                    size_bytes: size,
                },
                name,
            )?;
            tracing::info!(volume = %name, size, "grew volume");
        }
        // Also when unchanged here: the grow may have been recorded by
        // another node (CSI's controller) while this node's engine serves.
        if let Some(e) = self.engine(v.id) {
            e.set_size(size);
        }
        // Also when the size is unchanged: a retry after a failed filesystem
        // grow completes it (resize2fs and xfs_growfs are idempotent).
        if let Some(rec) = self.local_record(v.id) {
            // The FUSE file reports the new size on its next stat (its
            // attributes are never cached); the loop device re-reads it.
            let file = self.fuse_path(v.id);
            std::fs::metadata(&file)
                .map_err(|e| VolumeError::Device(format!("stat {}: {e}", file.display())))?;
            let dev = PathBuf::from(&rec.device);
            loopdev::refresh_capacity(&dev).map_err(|e| {
                VolumeError::Device(format!("loop capacity refresh on {}: {e}", rec.device))
            })?;
            for m in &rec.mounts {
                self.on_device(&v, || mount::grow(v.fs, &dev, Path::new(m)))?;
            }
        }
        self.inspect(name)
    }

    /// Deletes a volume and frees every replica's space: this node's at
    /// once, the others' by asking their nodes, so that when this returns
    /// the space is back everywhere. Returns the names of nodes whose copy
    /// is not freed yet (down, or slow to answer): their reconcilers free
    /// it when they run again.
    pub fn delete(&self, name: &str, force: bool) -> Result<Vec<String>, VolumeError> {
        let v = self.find(name)?;
        let _g = self.guard(v.id, name)?;
        if let Some(a) = &v.attachment {
            if !force {
                return Err(VolumeError::Attached {
                    name: name.into(),
                    node: self.node_name(a.node),
                });
            }
            if a.node != self.cfg.node_id {
                return Err(VolumeError::AttachedElsewhere {
                    name: name.into(),
                    node: self.node_name(a.node),
                });
            }
        }
        let nbd_users = |ex: &HashMap<VolumeId, ExportUse>| match ex.get(&v.id) {
            Some(u) if u.readers + u.writers > 0 => Err(VolumeError::InUse {
                name: name.into(),
                why: format!("{} NBD connection(s) open", u.readers + u.writers),
            }),
            _ => Ok(()),
        };
        // Checked before unmounting anything, and again under the lock that
        // keeps new NBD connections out until the volume is gone.
        nbd_users(&self.exports.lock().expect("exports lock"))?;
        if v.attachment.is_some() {
            self.teardown(&v, true, true)?;
        }
        let ex = self.exports.lock().expect("exports lock");
        nbd_users(&ex)?;
        let index = self.propose_at(Command::DeleteVolume { id: v.id }, name)?;
        if let Some(e) = self.engines.write().expect("engines lock").remove(&v.id) {
            e.stop();
        }
        drop(ex);
        // The volume is gone from the state: every replica node frees its
        // copy now, asked by us (its reconciler would too, later).
        let mut pending = Vec::new();
        if let Err(e) = self.hosts.destroy(v.id) {
            tracing::error!(volume = %name, error = %e, "freeing deleted volume's space failed; retried");
            pending.push(self.node_name(self.cfg.node_id));
        }
        pending.extend(self.free_remote_copies(&v, index));
        if pending.is_empty() {
            tracing::info!(volume = %name, "deleted volume; its space is free on every replica node");
        } else {
            tracing::warn!(volume = %name, pending = ?pending, "deleted volume; space not freed yet on some nodes (freed when they answer)");
        }
        Ok(pending)
    }

    /// Asks each other node that held a replica of the deleted `v` to free
    /// it, all at once; returns the names of those that did not confirm.
    fn free_remote_copies(&self, v: &Volume, index: u64) -> Vec<String> {
        let (cluster, nodes): (_, Vec<(NodeId, String, String)>) = {
            let s = self.store.read();
            let nodes = v
                .replicas
                .iter()
                .filter(|r| r.node != self.cfg.node_id)
                .map(|r| {
                    let n = s.nodes.get(&r.node);
                    (
                        r.node,
                        n.map(|n| n.name.clone())
                            .unwrap_or_else(|| r.node.to_string()),
                        n.map(|n| n.peer_address.clone()).unwrap_or_default(),
                    )
                })
                .collect();
            (s.cluster_id, nodes)
        };
        let _rt = self.ctx.handle.enter();
        let mut asks = Vec::new();
        let mut pending = Vec::new();
        for (node, name, addr) in nodes {
            match crate::replica::remote::RemoteReplica::new(
                &self.ctx.channels,
                &self.ctx.fast,
                node,
                &addr,
                cluster,
                v.id,
            ) {
                Ok(r) => asks.push((
                    name,
                    self.ctx.handle.spawn(async move { r.free(index).await }),
                )),
                Err(e) => {
                    tracing::debug!(volume = %v.name, node = %name, error = %e, "cannot ask to free a replica");
                    pending.push(name);
                }
            }
        }
        for (name, ask) in asks {
            match self.ctx.handle.block_on(ask) {
                Ok(Ok(bytes)) => {
                    tracing::debug!(volume = %v.name, node = %name, bytes, "replica freed")
                }
                Ok(Err(e)) => {
                    tracing::info!(volume = %v.name, node = %name, error = %e, "replica not freed yet");
                    pending.push(name);
                }
                Err(e) => {
                    tracing::info!(volume = %v.name, node = %name, error = %e, "replica not freed yet");
                    pending.push(name);
                }
            }
        }
        pending
    }

    // ---- attach / detach -------------------------------------------------

    fn fuse_path(&self, id: VolumeId) -> PathBuf {
        self.cfg.fuse_dir.join(id.to_string())
    }

    pub fn attach(&self, name: &str, force: bool) -> Result<String, VolumeError> {
        let v = self.find(name)?;
        let _g = self.guard(v.id, name)?;
        self.attach_locked(&v, force)
    }

    fn attach_locked(&self, v: &Volume, force: bool) -> Result<String, VolumeError> {
        if let Some(rec) = self.local_record(v.id) {
            if rec.read_only {
                return Err(VolumeError::InUse {
                    name: v.name.clone(),
                    why: "this node holds it read-only".into(),
                });
            }
            if self.is_bound(v.id, &rec) {
                return Ok(rec.device);
            }
        }
        // Taking over from another node's attachment: its engine may have
        // died with writes in flight that reached some replicas only.
        let took_over = force
            && v.attachment
                .as_ref()
                .is_some_and(|a| a.node != self.cfg.node_id);
        {
            let ex = self.exports.lock().expect("exports lock");
            if ex.get(&v.id).is_some_and(|u| u.writers > 0) {
                return Err(VolumeError::InUse {
                    name: v.name.clone(),
                    why: "it is open for writing over NBD".into(),
                });
            }
            self.propose(
                Command::Attach {
                    id: v.id,
                    node: self.cfg.node_id,
                    force,
                },
                &v.name,
            )?;
        }
        let v = &self.find(&v.name)?;
        match self.bind_device(v, false) {
            Ok(dev) => {
                let mut rec = self.local_record(v.id).unwrap_or_default();
                rec.device = dev.clone();
                self.save_local(v.id, Some(&rec))?;
                tracing::info!(volume = %v.name, device = %dev, "attached volume");
                if took_over {
                    if let Some(e) = self.engine(v.id) {
                        e.start_resync();
                    }
                }
                Ok(dev)
            }
            Err(e) => {
                let _ = self.propose(
                    Command::Detach {
                        id: v.id,
                        node: self.cfg.node_id,
                    },
                    &v.name,
                );
                Err(e)
            }
        }
    }

    fn is_bound(&self, id: VolumeId, rec: &LocalAttachment) -> bool {
        loopdev::backing_file(Path::new(&rec.device)).as_deref()
            == Some(self.fuse_path(id).as_path())
    }

    /// Holds the volume read-only on this node (recorded as a reader in the
    /// state, which keeps writers out): a read-only loop device on an
    /// engine at the volume's epoch.
    fn attach_reader_locked(&self, v: &Volume) -> Result<String, VolumeError> {
        if let Some(rec) = self.local_record(v.id) {
            if !rec.read_only {
                return Err(VolumeError::InUse {
                    name: v.name.clone(),
                    why: "it is attached read-write on this node".into(),
                });
            }
            if self.is_bound(v.id, &rec) {
                return Ok(rec.device);
            }
        }
        let me = self.cfg.node_id;
        self.propose(Command::AttachReader { id: v.id, node: me }, &v.name)?;
        let v = &self.find(&v.name)?;
        match self.bind_device(v, true) {
            Ok(dev) => {
                let rec = LocalAttachment {
                    device: dev.clone(),
                    read_only: true,
                    ..Default::default()
                };
                self.save_local(v.id, Some(&rec))?;
                tracing::info!(volume = %v.name, device = %dev, "attached volume read-only");
                Ok(dev)
            }
            Err(e) => {
                let _ = self.propose(self.release(v.id, true), &v.name);
                Err(e)
            }
        }
    }

    /// FUSE file + loop device for a volume attached to this node (the
    /// engine moves to the attachment's epoch first, which fences any older
    /// engine on every replica) or, with `read_only`, held by this node as
    /// a reader (the volume's epoch; the loop device cannot write).
    fn bind_device(&self, v: &Volume, read_only: bool) -> Result<String, VolumeError> {
        let epoch = match &v.attachment {
            None if read_only && v.readers.contains(&self.cfg.node_id) => v.epoch,
            Some(a) if !read_only && a.node == self.cfg.node_id => a.epoch,
            _ => {
                return Err(VolumeError::AttachedElsewhere {
                    name: v.name.clone(),
                    node: v
                        .attachment
                        .as_ref()
                        .map(|a| self.node_name(a.node))
                        .unwrap_or_default(),
                })
            }
        };
        let engine = self.engine_for(v)?;
        engine
            .activate(v, epoch)
            .map_err(|e| VolumeError::engine(&v.name, e))?;
        let path = {
            let fuse = self.fuse.lock().expect("fuse lock");
            let fuse = fuse.as_ref().ok_or(VolumeError::ShuttingDown)?;
            fuse.add(&v.id.to_string(), engine)
        };
        // A loop device over a file opened read-only is read-only.
        let result = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(&path)
            .map_err(|e| format!("open {}: {e}", path.display()))
            .and_then(|f| loopdev::attach(&f, 4096).map_err(|e| format!("loop device setup: {e}")));
        match result {
            Ok(dev) => {
                if !loopdev::uses_direct_io(&dev) {
                    if let Err(e) = loopdev::set_direct_io(&dev) {
                        tracing::warn!(device = %dev.display(), error = %e, "loop device runs without direct I/O");
                    }
                }
                Ok(dev.to_string_lossy().into_owned())
            }
            Err(e) => {
                if let Some(f) = self.fuse.lock().expect("fuse lock").as_ref() {
                    f.remove(&v.id.to_string());
                }
                Err(VolumeError::Device(e))
            }
        }
    }

    /// Records the volume's attachment to `node` (CSI ControllerPublish),
    /// or with `read_only` adds `node` to its readers; that node binds the
    /// device when it stages the volume. Each new attachment raises the
    /// epoch, fencing any engine of an older one.
    pub fn attach_to(&self, name: &str, node: NodeId, read_only: bool) -> Result<(), VolumeError> {
        let v = self.find(name)?;
        let _g = self.guard(v.id, name)?;
        let cmd = if read_only {
            Command::AttachReader { id: v.id, node }
        } else {
            Command::Attach {
                id: v.id,
                node,
                force: false,
            }
        };
        self.propose(cmd, name)
    }

    /// Clears the volume's attachment to `node` or that node's reader hold,
    /// if it has one (CSI ControllerUnpublish, also for a dead node).
    /// Refused while this node still serves it: unstaging tears the device
    /// down first.
    pub fn detach_from(&self, name: &str, node: NodeId) -> Result<(), VolumeError> {
        let v = self.find(name)?;
        let _g = self.guard(v.id, name)?;
        let writer = v.attachment.as_ref().is_some_and(|a| a.node == node);
        if !writer && !v.readers.contains(&node) {
            return Ok(());
        }
        if node == self.cfg.node_id && self.local_record(v.id).is_some() {
            return Err(VolumeError::InUse {
                name: name.into(),
                why: "it is still attached on this node; unstage it first".into(),
            });
        }
        let cmd = if writer {
            Command::Detach { id: v.id, node }
        } else {
            Command::DetachReader { id: v.id, node }
        };
        self.propose(cmd, name)
    }

    /// Holds the volume read-only on this node; returns the (read-only)
    /// device.
    pub fn attach_reader(&self, name: &str) -> Result<String, VolumeError> {
        let v = self.find(name)?;
        let _g = self.guard(v.id, name)?;
        self.attach_reader_locked(&v)
    }

    /// A copy of the committed cluster state as this node knows it.
    pub fn state(&self) -> crate::cluster::state::ClusterState {
        self.store.read().clone()
    }

    pub fn detach(&self, name: &str) -> Result<(), VolumeError> {
        let v = self.find(name)?;
        let _g = self.guard(v.id, name)?;
        if self.local_record(v.id).is_some_and(|r| r.read_only) {
            return self.teardown(&v, false, true);
        }
        match &v.attachment {
            None => return Ok(()),
            Some(a) if a.node != self.cfg.node_id => {
                return Err(VolumeError::AttachedElsewhere {
                    name: name.into(),
                    node: a.node.to_string(),
                })
            }
            Some(_) => {}
        }
        self.teardown(&v, false, true)
    }

    /// Unmounts (only with `unmount`), unbinds and, with `release`,
    /// records the detach (or the end of this node's read-only hold).
    fn teardown(&self, v: &Volume, unmount: bool, release: bool) -> Result<(), VolumeError> {
        let mut rec = self.local_record(v.id).unwrap_or_default();
        if !rec.mounts.is_empty() {
            if !unmount {
                return Err(VolumeError::Mounted {
                    name: v.name.clone(),
                    paths: rec.mounts.join(", "),
                });
            }
            while let Some(m) = rec.mounts.first().cloned() {
                crate::sys::mount::umount(Path::new(&m), 0).map_err(|e| VolumeError::InUse {
                    name: v.name.clone(),
                    why: format!("unmounting {m}: {e}"),
                })?;
                rec.mounts.remove(0);
                self.save_local(v.id, Some(&rec))?;
            }
        }
        self.unbind_device(v.id, &rec.device)?;
        self.save_local(v.id, None)?;
        // Everything written is durable on the replicas before the volume
        // is released to another node.
        if !rec.read_only {
            if let Some(e) = self.engine(v.id) {
                if let Err(err) = e.flush() {
                    tracing::error!(volume = %v.name, error = %err, "flush before detach failed");
                }
            }
        }
        if !release {
            tracing::info!(volume = %v.name, "unbound volume; its attachment stays");
            return Ok(());
        }
        self.propose(self.release(v.id, rec.read_only), &v.name)?;
        tracing::info!(volume = %v.name, read_only = rec.read_only, "detached volume");
        Ok(())
    }

    /// CSI NodeUnstage: unmounts `path` if the volume is mounted there and,
    /// once nothing of it is mounted on this node, unbinds its device. The
    /// attachment (or read-only hold) stays until the controller
    /// unpublishes, so the volume stays fenced to this node until then.
    pub fn unstage(&self, name: &str, path: &str) -> Result<(), VolumeError> {
        let path = Self::check_path(path)?;
        let path_s = path.to_string_lossy().into_owned();
        let v = self.find(name)?;
        let _g = self.guard(v.id, name)?;
        let Some(mut rec) = self.local_record(v.id) else {
            return Ok(());
        };
        if rec.mounts.contains(&path_s) {
            crate::sys::mount::umount(&path, 0).map_err(|e| VolumeError::InUse {
                name: name.into(),
                why: format!("unmounting {path_s}: {e}"),
            })?;
            rec.mounts.retain(|m| *m != path_s);
            rec.options.remove(&path_s);
            self.save_local(v.id, Some(&rec))?;
        }
        if rec.mounts.is_empty() {
            self.teardown(&v, false, false)?;
        }
        Ok(())
    }

    fn unbind_device(&self, id: VolumeId, device: &str) -> Result<(), VolumeError> {
        if !device.is_empty() {
            let dev = Path::new(device);
            if loopdev::backing_file(dev).as_deref() == Some(self.fuse_path(id).as_path()) {
                loopdev::detach(dev)
                    .map_err(|e| VolumeError::Device(format!("detach {device}: {e}")))?;
            }
        }
        if let Some(f) = self.fuse.lock().expect("fuse lock").as_ref() {
            f.remove(&id.to_string());
        }
        Ok(())
    }

    // ---- mount / unmount -------------------------------------------------

    fn check_path(path: &str) -> Result<PathBuf, VolumeError> {
        let p = Path::new(path);
        if !p.is_absolute() {
            return Err(VolumeError::InvalidPath(format!(
                "{path:?} is not an absolute path"
            )));
        }
        if p.components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
            || path.contains('\0')
        {
            return Err(VolumeError::InvalidPath(format!(
                "{path:?} must not contain '..' or NUL"
            )));
        }
        if p == Path::new("/") {
            return Err(VolumeError::InvalidPath("refusing to mount over /".into()));
        }
        Ok(p.components().collect())
    }

    /// A path something of a volume may be mounted on: absolute, no `..`,
    /// not `/`, clear of the daemon's FUSE directory.
    pub fn check_mount_target(&self, path: &str) -> Result<PathBuf, VolumeError> {
        let path = Self::check_path(path)?;
        if path.starts_with(&self.cfg.fuse_dir) || self.cfg.fuse_dir.starts_with(&path) {
            return Err(VolumeError::InvalidPath(format!(
                "{} overlaps the daemon's FUSE directory {}",
                path.display(),
                self.cfg.fuse_dir.display()
            )));
        }
        Ok(path)
    }

    pub fn mount(
        &self,
        name: &str,
        path: &str,
        force: bool,
    ) -> Result<api::VolumeInfo, VolumeError> {
        self.mount_with(name, path, force, &[], false)
    }

    /// [`VolumeManager::mount`] with mount options (kept for re-mounts
    /// after a restart) and, with `read_only`, as one of the volume's
    /// readers: read-only device and mount, journal left alone, no
    /// attachment (any number of nodes may read while none writes).
    pub fn mount_with(
        &self,
        name: &str,
        path: &str,
        force: bool,
        options: &[String],
        read_only: bool,
    ) -> Result<api::VolumeInfo, VolumeError> {
        crate::sys::mount::parse_options(options).map_err(VolumeError::InvalidOptions)?;
        let path = self.check_mount_target(path)?;
        let v = self.find(name)?;
        let _g = self.guard(v.id, name)?;
        if v.fs == FsType::None {
            return Err(VolumeError::RawVolume(name.into()));
        }
        let path_s = path.to_string_lossy().into_owned();
        if let Some(rec) = self.local_record(v.id) {
            if rec.mounts.contains(&path_s) && crate::sys::mount::is_mount_point(&path) {
                return self.inspect(name);
            }
        }
        if crate::sys::mount::is_mount_point(&path) {
            return Err(VolumeError::InvalidPath(format!(
                "{path_s} is already a mount point"
            )));
        }
        let was_attached = self.local_record(v.id).is_some();
        let r = if read_only {
            if !v.formatted {
                return Err(VolumeError::NotFormatted(name.into()));
            }
            let dev = self.attach_reader_locked(&v)?;
            let opts = mount_options(v.fs, options, true);
            mount::mount(Path::new(&dev), &path, v.fs, &opts).map_err(VolumeError::Device)
        } else {
            let dev = self.attach_locked(&v, force)?;
            self.format_and_mount(&v, Path::new(&dev), &path, options)
        };
        if let Err(e) = r {
            if !was_attached {
                let v = self.find(name)?;
                if let Err(e2) = self.teardown(&v, false, true) {
                    tracing::error!(volume = %name, error = %e2, "rolling back attach failed");
                }
            }
            return Err(e);
        }
        let mut rec = self.local_record(v.id).unwrap_or_default();
        if !rec.mounts.contains(&path_s) {
            rec.mounts.push(path_s.clone());
        }
        if !options.is_empty() {
            rec.options.insert(path_s.clone(), options.to_vec());
        }
        self.save_local(v.id, Some(&rec))?;
        tracing::info!(volume = %name, path = %path_s, "mounted volume");
        self.inspect(name)
    }

    fn format_and_mount(
        &self,
        v: &Volume,
        dev: &Path,
        path: &Path,
        options: &[String],
    ) -> Result<(), VolumeError> {
        let current = self.find(&v.name)?;
        if !current.formatted {
            match mount::probe_fs(dev).map_err(VolumeError::Device)? {
                // A crash after mkfs but before the record: keep that filesystem.
                Some(t) if t == v.fs.as_str() => {}
                Some(t) => {
                    return Err(VolumeError::Device(format!(
                        "volume {:?} is not marked formatted but carries a {t} signature; refusing to format over it",
                        v.name
                    )))
                }
                None => {
                    tracing::info!(volume = %v.name, fs = v.fs.as_str(), "formatting volume (first use)");
                    self.on_device(v, || mount::format(dev, v.fs))?;
                }
            }
            self.propose(Command::MarkFormatted { id: v.id }, &v.name)?;
        }
        self.on_device(v, || {
            mount::grow_before_mount(v.fs, dev, current.size_bytes)
        })?;
        self.on_device(v, || mount::mount(dev, path, v.fs, options))?;
        if v.fs == FsType::Xfs {
            // XFS grows only while mounted; a no-op when it already fits.
            if let Err(e) = mount::grow(v.fs, dev, path) {
                tracing::warn!(volume = %v.name, error = %e, "growing xfs after mount failed");
            }
        }
        Ok(())
    }

    /// Runs a program or syscall that writes to `v`'s device (mkfs, a
    /// journal replay, a grow). When it fails while the volume's writes ran
    /// out of pool space, the error is that (PoolFull at the doors), not
    /// the program's message.
    fn on_device(
        &self,
        v: &Volume,
        op: impl FnOnce() -> Result<(), String>,
    ) -> Result<(), VolumeError> {
        let engine = self.engine(v.id);
        let full = || {
            engine.as_ref().map_or(0, |e| {
                e.metrics
                    .no_space_errors
                    .load(std::sync::atomic::Ordering::Relaxed)
            })
        };
        let before = full();
        op().map_err(|e| {
            if full() > before {
                tracing::warn!(volume = %v.name, error = %e, "the volume's pool ran out of space");
                VolumeError::engine(&v.name, EngineError::Replica(ReplicaError::NoSpace))
            } else {
                VolumeError::Device(e)
            }
        })
    }

    pub fn unmount(&self, name: &str, path: &str) -> Result<api::VolumeInfo, VolumeError> {
        let path = Self::check_path(path)?;
        let path_s = path.to_string_lossy().into_owned();
        let v = self.find(name)?;
        let _g = self.guard(v.id, name)?;
        let Some(mut rec) = self.local_record(v.id) else {
            return self.inspect(name);
        };
        if !rec.mounts.contains(&path_s) {
            return self.inspect(name);
        }
        crate::sys::mount::umount(&path, 0).map_err(|e| VolumeError::InUse {
            name: name.into(),
            why: format!("unmounting {path_s}: {e}"),
        })?;
        rec.mounts.retain(|m| *m != path_s);
        rec.options.remove(&path_s);
        self.save_local(v.id, Some(&rec))?;
        if rec.mounts.is_empty() {
            self.teardown(&v, false, true)?;
        }
        tracing::info!(volume = %name, path = %path_s, "unmounted volume");
        self.inspect(name)
    }
}

/// Releases an NBD connection's claim on a volume.
struct ExportClaim {
    mgr: std::sync::Weak<VolumeManager>,
    id: VolumeId,
    writer: bool,
}

impl Drop for ExportClaim {
    fn drop(&mut self) {
        if let Some(m) = self.mgr.upgrade() {
            let mut ex = m.exports.lock().expect("exports lock");
            if let Some(u) = ex.get_mut(&self.id) {
                if self.writer {
                    u.writers -= 1;
                } else {
                    u.readers -= 1;
                }
            }
            let last_writer = self.writer && ex.get(&self.id).is_some_and(|u| u.writers == 0);
            // `ex` stays held: a new writer waits until this one's detach.
            if last_writer && m.local_record(self.id).is_none() {
                // The writer's attachment ends with it: flush, then release.
                if let Some(e) = m.engine(self.id) {
                    if let Err(err) = e.flush() {
                        tracing::error!(volume = %self.id, error = %err, "flush after NBD writer failed");
                    }
                }
                if let Err(e) = m.store.propose(Command::Detach {
                    id: self.id,
                    node: m.cfg.node_id,
                }) {
                    tracing::warn!(volume = %self.id, error = %e, "detach after NBD writer failed");
                }
            }
            drop(ex);
        }
    }
}

/// The NBD server's view of the manager.
pub struct NbdExports(pub Arc<VolumeManager>);

impl ExportProvider for NbdExports {
    fn export_names(&self) -> Vec<String> {
        self.0
            .store
            .read()
            .volumes
            .values()
            .map(|v| v.name.clone())
            .collect()
    }

    fn open_export(&self, name: &str) -> Result<Export, String> {
        let m = &self.0;
        let mut ex = m.exports.lock().expect("exports lock");
        let v = m.find(name).map_err(|e| e.to_string())?;
        let engine = m.engine_for(&v).map_err(|e| e.to_string())?;
        // Attached anywhere: readers only, so NBD never writes under a
        // mounted filesystem or another node's engine. A writer attaches
        // the volume to this node for the connection's life (a new epoch
        // that fences every other engine).
        let nbd_here = v
            .attachment
            .as_ref()
            .is_some_and(|a| a.node == m.cfg.node_id)
            && m.local_record(v.id).is_none()
            && ex.get(&v.id).is_some_and(|u| u.writers > 0);
        let writer = (v.attachment.is_none() || nbd_here)
            && m.propose(
                Command::Attach {
                    id: v.id,
                    node: m.cfg.node_id,
                    force: false,
                },
                name,
            )
            .is_ok();
        let v = m.find(name).map_err(|e| e.to_string())?;
        let epoch = v.attachment.as_ref().map_or(v.epoch, |a| a.epoch);
        if writer || v.attachment.is_none() {
            if let Err(e) = engine.activate(&v, epoch) {
                if writer {
                    let _ = m.propose(
                        Command::Detach {
                            id: v.id,
                            node: m.cfg.node_id,
                        },
                        name,
                    );
                }
                return Err(e.to_string());
            }
        }
        let u = ex.entry(v.id).or_default();
        if writer {
            u.writers += 1;
        } else {
            u.readers += 1;
        }
        Ok(Export {
            engine,
            read_only: !writer,
            _release: Box::new(ExportClaim {
                mgr: Arc::downgrade(m),
                id: v.id,
                writer,
            }),
        })
    }
}
