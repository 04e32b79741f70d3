//! The volume manager proper. Locking: `busy` admits one operation per volume
//! at a time, from every front door (a second one gets [`VolumeError::Busy`];
//! a door holds it across several steps with [`VolumeManager::claim`]); `hosts` holds the
//! replicas stored on this node, `engines` the engines of volumes served
//! from this node (attached or exported); `exports` counts NBD users (held
//! only to read or change a count: NBD opens take the volume's guard). No
//! node-wide lock is held across a Raft proposal, engine creation or a
//! command that runs a program (mkfs, resize2fs).
//!
//! This file holds the manager's state, its start-up and the helpers every
//! operation uses; the operations live beside it by concept: `lifecycle`
//! (create, grow, delete), `attach` (devices, attachment records,
//! teardown), `mounting` (format, mount, unmount), `publish` (stage,
//! publish, unpublish, usage: what CSI's node service asks for),
//! `restart` (re-serving after a start, shutdown), `reconcile`, `scrub`,
//! `snapshots` (take, delete, revert, their views),
//! `views` (API views, metrics text) and `nbd` (export claims).

mod attach;
mod clones;
mod lifecycle;
mod mounting;
mod nbd;
mod publish;
mod reconcile;
mod restart;
mod scrub;
mod snapshots;
mod views;

pub use nbd::NbdExports;
pub use publish::{PathUsage, PublishSpec, StageSpec};

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use cairn_proto::api::SizeArg;
use serde::{Deserialize, Serialize};

use super::mount;
use super::{CreateVolume, VolumeError};
use crate::cluster::state::{Command, NodeState, ReplicaState, StateError, Volume, MAX_REPLICAS};
use crate::cluster::store::{ClusterStore, StoreError};
use crate::engine::{Engine, EngineCtx, EngineError};
use crate::frontend::block::{BlockFrontend, FuseLoop};
use crate::frontend::fuse::{holder, FuseServer};
use crate::frontend::nbd::{Export, ExportProvider};
use crate::metrics::VolumeMetrics;
use crate::pool::Pool;
use crate::replica::commit::Meta;
use crate::replica::host::HostMap;
use crate::replica::{LocalReplica, ReplicaError};
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
    /// Where the manager's and its engines' threads are registered, to be
    /// joined at exit.
    pub threads: Arc<crate::shutdown::Threads>,
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
    /// Targets the volume is published at (bind mounts of a staging mount
    /// or of the device file).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    published: Vec<publish::Publication>,
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
    /// How engines become block devices here (FUSE file + loop device).
    frontend: Box<dyn BlockFrontend>,
    hosts: Arc<HostMap>,
    ctx: Arc<EngineCtx>,
    engines: RwLock<HashMap<VolumeId, Arc<Engine>>>,
    busy: Arc<Busy>,
    exports: Mutex<HashMap<VolumeId, ExportUse>>,
    pub started: Instant,
    /// Clone replicas whose filler runs (see `clones`).
    fillers: Arc<Mutex<std::collections::HashSet<VolumeId>>>,
    /// Set when the daemon stops: fillers end.
    stopping: Arc<std::sync::atomic::AtomicBool>,
}

/// Admits one operation on a volume; released on drop.
struct OpGuard {
    busy: Arc<Busy>,
    name: String,
    /// False for a nested guard on the thread that already holds it.
    owned: bool,
}

/// Volumes with an operation in progress, by name, and the thread running
/// it (so that operation may call others on the same volume).
type Busy = Mutex<HashMap<String, std::thread::ThreadId>>;

impl Drop for OpGuard {
    fn drop(&mut self) {
        if self.owned {
            self.busy.lock().expect("busy lock").remove(&self.name);
        }
    }
}

/// A front door's hold on one volume for an operation of several steps
/// (CSI's CreateVolume, Docker's mount with its reference count): any
/// other operation on the volume, from any door, gets
/// [`VolumeError::Busy`] until it is dropped; operations called on the
/// same thread meanwhile run inside it.
pub struct Claim(#[allow(dead_code)] OpGuard);

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

/// A size the API was given: a positive multiple of 4 KiB up to the
/// largest volume. A size between two multiples is refused with the next
/// one up named, never silently rounded.
pub fn parse_size(arg: &SizeArg) -> Result<u64, VolumeError> {
    let given = parse_bytes(arg)?;
    let bytes = round_size(arg, given)?;
    if given != bytes {
        return Err(VolumeError::InvalidSize(format!(
            "size {arg} ({given} bytes) is not a multiple of 4 KiB ({SIZE_ALIGN} bytes); the next one up is {bytes}"
        )));
    }
    Ok(bytes)
}

/// A size rounded up to whole 4 KiB blocks: the rule of doors whose sizes
/// are free text or minimums (Docker options, CSI capacity ranges).
pub fn parse_size_rounded(arg: &SizeArg) -> Result<u64, VolumeError> {
    round_size(arg, parse_bytes(arg)?)
}

/// `bytes` (as `arg` gave it) in range, rounded up to whole blocks.
fn round_size(arg: &SizeArg, bytes: u64) -> Result<u64, VolumeError> {
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

fn parse_bytes(arg: &SizeArg) -> Result<u64, VolumeError> {
    Ok(match arg {
        SizeArg::Bytes(b) => *b,
        SizeArg::Text(t) => {
            t.parse::<ByteSize>()
                .map_err(|e| VolumeError::InvalidSize(e.to_string()))?
                .0
        }
    })
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
        // Sources that clones here still read through to.
        let sources: std::collections::HashSet<VolumeId> = hosts
            .ids()
            .into_iter()
            .filter_map(|id| hosts.get(id)?.replica.stored_origin().map(|o| o.0))
            .collect();
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
            if sources.contains(&id) {
                // Kept (unlisted, refusing I/O) until the clone is filled;
                // the reconciler frees it then.
                tracing::info!(volume = %id, "keeping a replica no longer held here: a clone is still filled from it");
                let (rep, owned) =
                    LocalReplica::load(&meta, pool.clone(), id).map_err(|e| e.to_string())?;
                claimed.extend(owned);
                hosts.insert(Arc::new(rep));
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
        for id in hosts.ids() {
            if let Some(h) = hosts.get(id) {
                if let Err(e) = h.replica.settle() {
                    // Kept for the next snapshot operation or start.
                    tracing::warn!(volume = %id, error = %e, "cannot free the remains of an interrupted snapshot operation yet");
                }
            }
        }
        hosts.wire_origins();
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
            threads: cfg.threads.clone(),
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
        let frontend = FuseLoop::new(&cfg.fuse_dir, fuse);
        let adopted = frontend.adopted();
        let mgr = Arc::new(VolumeManager {
            cfg,
            db,
            pool,
            store,
            local,
            frontend: Box::new(frontend),
            hosts,
            ctx,
            engines: RwLock::new(HashMap::new()),
            busy: Arc::default(),
            exports: Mutex::new(HashMap::new()),
            started: Instant::now(),
            fillers: Arc::default(),
            stopping: Arc::default(),
        });
        mgr.reserve_attachments(adopted);
        Ok(mgr)
    }

    /// The replicas this node stores (for the data service).
    pub fn hosts(&self) -> Arc<HostMap> {
        self.hosts.clone()
    }

    /// Most replicas a volume may have (on distinct nodes).
    pub const MAX_REPLICAS: u32 = MAX_REPLICAS as u32;

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

    /// Admits one operation on the volume `name` at a time, for every front
    /// door (reentrant on the thread that holds it).
    fn guard(&self, name: &str) -> Result<OpGuard, VolumeError> {
        let me = std::thread::current().id();
        let mut b = self.busy.lock().expect("busy lock");
        let owned = match b.get(name) {
            Some(t) if *t == me => false,
            Some(_) => return Err(VolumeError::Busy(name.into())),
            None => {
                b.insert(name.to_string(), me);
                true
            }
        };
        Ok(OpGuard {
            busy: self.busy.clone(),
            name: name.to_string(),
            owned,
        })
    }

    /// Holds `name` (which need not exist yet) for a door's multi-step
    /// operation; see [`Claim`].
    pub fn claim(&self, name: &str) -> Result<Claim, VolumeError> {
        self.guard(name).map(Claim)
    }

    /// Volume `name`, unless it was deleted with its snapshots kept.
    fn find(&self, name: &str) -> Result<Volume, VolumeError> {
        self.find_any(name).and_then(|v| {
            (!v.retired)
                .then_some(v)
                .ok_or_else(|| VolumeError::NotFound(name.into()))
        })
    }

    /// Volume `name`, retired or not: for its snapshots.
    fn find_any(&self, name: &str) -> Result<Volume, VolumeError> {
        self.store
            .read()
            .volume_by_name(name)
            .cloned()
            .ok_or_else(|| VolumeError::NotFound(name.into()))
    }

    fn snapshot_name(&self, id: crate::types::SnapshotId) -> String {
        self.store
            .read()
            .snapshots
            .get(&id)
            .map(|s| s.name.clone())
            .unwrap_or_else(|| id.to_string())
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
        // Created without the node-wide lock (opening replicas may wait on
        // the network or a linearizable read); a racing creator's engine
        // wins and this one is dropped before its healer starts.
        let e = Engine::new(
            v,
            v.epoch,
            self.ctx.clone(),
            Arc::new(VolumeMetrics::default()),
        )
        .map_err(|e| VolumeError::engine(&v.name, e))?;
        let mut engines = self.engines.write().expect("engines lock");
        if let Some(won) = engines.get(&v.id) {
            return Ok(won.clone());
        }
        engines.insert(v.id, e.clone());
        drop(engines);
        e.start_healer();
        Ok(e)
    }

    /// Refuses an operation that must not run under open NBD connections
    /// of `v`. No new one opens meanwhile: opening takes the volume's
    /// guard, which the caller holds.
    fn refuse_nbd_users(&self, v: &Volume) -> Result<(), VolumeError> {
        match self.exports.lock().expect("exports lock").get(&v.id) {
            Some(u) if u.readers + u.writers > 0 => Err(VolumeError::InUse {
                name: v.name.clone(),
                why: format!("{} NBD connection(s) open", u.readers + u.writers),
            }),
            _ => Ok(()),
        }
    }

    /// A client of `v`'s replica on `node` (another node).
    fn remote_replica(
        &self,
        v: &Volume,
        node: NodeId,
    ) -> Result<crate::replica::remote::RemoteReplica, String> {
        let (cluster, addr) = {
            let s = self.store.read();
            let addr = s
                .nodes
                .get(&node)
                .map(|n| n.peer_address.clone())
                .unwrap_or_default();
            (s.cluster_id, addr)
        };
        let _rt = self.ctx.handle.enter();
        crate::replica::remote::RemoteReplica::new(
            &self.ctx.channels,
            &self.ctx.fast,
            node,
            &addr,
            cluster,
            v.id,
        )
        .map_err(|e| e.to_string())
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
                StateError::NameKeptBySnapshots(n) => VolumeError::InUse {
                    why: format!("a deleted volume of that name is kept for its snapshots; delete them (`cairn snapshot ls {n}`) or choose another name"),
                    name: n,
                },
                StateError::Retired { .. } => VolumeError::NotFound(name.into()),
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
                StateError::Reverting { .. } => VolumeError::Reverting(name.into()),
                StateError::HasSnapshots { count, .. } => VolumeError::HasSnapshots {
                    name: name.into(),
                    count,
                },
                StateError::TooManySnapshots { .. } => VolumeError::TooManySnapshots(name.into()),
                StateError::InvalidSnapshotName(m) => VolumeError::InvalidSnapshotName(m),
                StateError::SnapshotExists { name: n, .. } => VolumeError::SnapshotExists {
                    volume: name.into(),
                    name: n,
                },
                StateError::SnapshotNotFound(id) => VolumeError::SnapshotNotFound {
                    volume: name.into(),
                    name: self.snapshot_name(id),
                },
                StateError::SnapshotBacksClone { id, clone } => VolumeError::InUse {
                    name: name.into(),
                    why: format!(
                        "snapshot {:?} backs clone {:?}, which is still being filled from it; delete the snapshot once `cairn volume inspect` shows the clone filled",
                        self.snapshot_name(id),
                        self.store.read().volumes.get(&clone).map_or_else(|| clone.to_string(), |v| v.name.clone())
                    ),
                },
                StateError::CloneTooSmall { size, min } => VolumeError::InvalidSize(format!(
                    "a clone is at least as large as its snapshot ({min} bytes), not {size}"
                )),
                StateError::SnapshotInUse { id } => VolumeError::InUse {
                    name: name.into(),
                    why: format!(
                        "an unfinished revert to snapshot {:?} needs it; finish the revert first",
                        self.snapshot_name(id)
                    ),
                },
                StateError::SnapshotNotReady { id } => VolumeError::SnapshotNotReady {
                    volume: name.into(),
                    name: self.snapshot_name(id),
                },
                other => VolumeError::Metadata(StoreError::Refused(other)),
            }),
            Err(e) => Err(e.into()),
        }
    }
}
