//! `cairn node run`: start-up, serving, and the shutdown order.
//!
//! Start: lock the data dir, open the metadata db, node identity, pool,
//! peer service, cluster store, volume manager (which cleans stale kernel
//! state, mounts FUSE and re-serves attachments), NBD, then the REST API,
//! CSI and Docker doors and the background loops.
//!
//! Shutdown (SIGTERM/SIGINT), one tree (`shutdown`), each step awaited:
//! 1. The doors' token: REST, CSI and Docker stop accepting and finish the
//!    requests they hold (bounded).
//! 2. The background token: heartbeats, liveness and the reconciler end at
//!    their next turn, after the blocking work in hand.
//! 3. NBD stops (closing connections, joining its threads).
//! 4. The volume manager: attached volumes nothing uses are unmounted and
//!    unbound (records kept for the next start); if any is still in use,
//!    the FUSE connection goes to the holder (session threads answer what
//!    they read and stop), else FUSE is unmounted; engines stop (their
//!    healers and resyncs end) and flush; the db is flushed.
//! 5. The data connections this node serves for peers' engines are closed
//!    and the peer service (gRPC) stops.
//! 6. Every registered thread is joined (healers, resyncs, scrubber,
//!    re-adoptions, data connections); one still running after 10 s is
//!    named in the log as an error.
//! 7. The Raft driver stops and its thread is joined; then the runtime.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use crate::api::{self, ApiState, NodeFacts};
use crate::cluster::peer_service::PeerService;
use crate::cluster::state::{Command, NodeRole};
use crate::cluster::store::{ClusterStore, StoreOptions};
use crate::config::Config;
use crate::frontend::nbd::NbdServer;
use crate::pool::Pool;
use crate::shutdown::{Conns, Stop, Threads};
use crate::types::{now_unix_ms, Id128, NodeId};
use cairn_proto::peer::peer_server::PeerServer;
use cairn_proto::peer::{JoinReply, JoinRequest};
use tokio_util::sync::CancellationToken;

use crate::volume::{ManagerConfig, VolumeManager};

fn node_identity(db: &sled::Db) -> Result<NodeId, String> {
    let t = db.open_tree("node").map_err(|e| e.to_string())?;
    if let Some(v) = t.get("id").map_err(|e| e.to_string())? {
        return String::from_utf8_lossy(&v)
            .parse()
            .map_err(|e| format!("stored node id: {e}"));
    }
    let id = Id128::random();
    t.insert("id", id.to_string().as_bytes())
        .map_err(|e| e.to_string())?;
    db.flush().map_err(|e| e.to_string())?;
    Ok(id)
}

fn lock_data_dir(cfg: &Config) -> Result<std::fs::File, String> {
    let p = cfg.data_dir.join("cairn.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&p)
        .map_err(|e| format!("{}: {e}", p.display()))?;
    // SAFETY: flock on an fd we own; no memory is passed.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r != 0 {
        return Err(format!(
            "data directory {} is in use by another cairn daemon",
            cfg.data_dir.display()
        ));
    }
    Ok(f)
}

pub fn run(cfg: Config) -> Result<(), String> {
    tracing::info!(?cfg, "starting cairn node");
    if let Err(e) = crate::sys::set_io_flusher() {
        tracing::warn!(error = %e, "PR_SET_IO_FLUSHER failed; memory reclaim may wait on our own I/O");
    }
    // Everything the daemon creates (metadata, logs, sockets, pool files)
    // is for root only unless it says otherwise.
    // SAFETY: umask(2) only changes this process's file mode mask.
    unsafe { libc::umask(0o077) };
    std::fs::create_dir_all(&cfg.data_dir)
        .map_err(|e| format!("data dir {}: {e}", cfg.data_dir.display()))?;
    // Metadata, sockets, the FUSE mount and default pool files live here:
    // root only, whatever the umask or an older version left.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&cfg.data_dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("data dir {}: {e}", cfg.data_dir.display()))?;
    }
    let _lock = lock_data_dir(&cfg)?;
    // Bind the API first so a port conflict fails before anything changes.
    let api_listener = std::net::TcpListener::bind(cfg.listen)
        .map_err(|e| format!("cannot listen on {}: {e}", cfg.listen))?;
    api_listener
        .set_nonblocking(true)
        .map_err(|e| e.to_string())?;

    let peer_listener = std::net::TcpListener::bind(cfg.peer_listen)
        .map_err(|e| format!("cannot listen for peers on {}: {e}", cfg.peer_listen))?;
    peer_listener
        .set_nonblocking(true)
        .map_err(|e| e.to_string())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(64)
        .enable_all()
        .thread_name("cairn-rt")
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;

    let db = sled::Config::new()
        .path(cfg.data_dir.join("meta"))
        .open()
        .map_err(|e| format!("metadata db {}: {e}", cfg.data_dir.join("meta").display()))?;
    let node_id = node_identity(&db)?;
    let pool_tree = db.open_tree("pool").map_err(|e| e.to_string())?;
    let pool = Arc::new(
        Pool::open(&pool_tree, node_id, &cfg.disks, cfg.force_format).map_err(|e| e.to_string())?,
    );
    tracing::info!(pool = %pool.id, capacity = pool.capacity_bytes(), devices = pool.devices().len(), "pool ready");

    // The peer service answers (UNAVAILABLE) from now on, so a leader that
    // admits this node can reach it while the store opens.
    let peer_service = PeerService::default();
    let data_service = crate::replica::service::DataService::default();
    let fast_server: Arc<std::sync::OnceLock<crate::replica::wire::Server>> = Arc::default();
    let stop = Stop::default();
    let threads = Arc::new(Threads::default());
    let data_conns = Arc::new(Conns::default());
    let (peer_stop_tx, peer_stop_rx) = tokio::sync::oneshot::channel::<()>();
    {
        let listener = rt
            .block_on(async { tokio::net::TcpListener::from_std(peer_listener) })
            .map_err(|e| e.to_string())?;
        let svc = peer_service.clone();
        let fast_route = fast_server.clone();
        let (data_threads, data_open) = (threads.clone(), data_conns.clone());
        let data = cairn_proto::data::data_server::DataServer::new(data_service.clone())
            .max_decoding_message_size(crate::replica::remote::MAX_MESSAGE)
            .max_encoding_message_size(crate::replica::remote::MAX_MESSAGE);
        rt.spawn(async move {
            let r = tonic::transport::Server::builder()
                .add_service(PeerServer::new(svc))
                .add_service(data)
                .serve_with_incoming_shutdown(
                    route_peer_connections(listener, fast_route, data_threads, data_open),
                    async {
                        let _ = peer_stop_rx.await;
                    },
                )
                .await;
            if let Err(e) = r {
                tracing::error!(error = %e, "peer service failed");
            }
        });
    }
    let (store, joined) = open_store(&db, &cfg, node_id, &rt)?;
    let store = Arc::new(store);
    let _ = peer_service.store.set(store.clone());
    if joined {
        // Caught up once the leader's snapshot or log carried our own record.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        if !store.wait_until(deadline, |s, _| s.nodes.contains_key(&node_id)) {
            return Err("admitted to the cluster but did not catch up with it within 60 s".into());
        }
    }
    let mgr = VolumeManager::open(
        ManagerConfig {
            node_id,
            fuse_dir: cfg.data_dir.join("fuse"),
            holder_socket: crate::frontend::fuse::holder::socket_path(&cfg.data_dir),
            fuse_threads: cfg.fuse_threads,
            default_replicas: cfg.default_replicas,
            rebuild_bandwidth: cfg.rebuild_bandwidth,
            boot_id: std::fs::read_to_string(&cfg.boot_id_file)
                .map(|s| s.trim().to_string())
                .map_err(|e| format!("kernel boot id {}: {e}", cfg.boot_id_file.display()))?,
            orphan_io_timeout: cfg.orphan_io_timeout,
            handle: rt.handle().clone(),
            threads: threads.clone(),
        },
        Arc::new(crate::replica::commit::Meta::open(
            db.clone(),
            &cfg.data_dir.join("meta"),
        )?),
        pool,
        store.clone(),
    )?;
    tracing::info!(timeout = ?cfg.orphan_io_timeout, "I/O on attached volumes waits this long for a crashed daemon to come back (--orphan-io-timeout), then fails with EIO");
    for knob in ["default_request_timeout", "max_request_timeout"] {
        let path = format!("/proc/sys/fs/fuse/{knob}");
        let secs: u64 = std::fs::read_to_string(&path)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        if secs > 0 && std::time::Duration::from_secs(secs) < cfg.orphan_io_timeout {
            tracing::warn!(sysctl = %path, secs, "the kernel aborts FUSE connections whose requests wait longer than this: a daemon outage past it fails I/O before --orphan-io-timeout");
        }
    }
    let _ = data_service.inner.set((store.clone(), mgr.hosts()));
    let _ = peer_service.volumes.set(mgr.clone());
    let _ = fast_server.set(crate::replica::wire::Server {
        store: store.clone(),
        hosts: mgr.hosts(),
    });
    match cfg.scrub_interval {
        Some(every) => mgr.start_scrubber(every, cfg.scrub_bandwidth),
        None => tracing::warn!("periodic scrub is off (--scrub-interval off): replicas that differ are found only by `cairn volume verify`"),
    }
    let registration = Registration::new(&cfg, node_id);
    register_node(&store, &registration).inspect_err(|_| mgr.shutdown())?;
    let nbd = match NbdServer::start(
        Arc::new(crate::volume::NbdExports(mgr.clone())),
        &cfg.nbd_socket,
        cfg.nbd_listen.as_deref(),
    ) {
        Ok(n) => n,
        Err(e) => {
            mgr.shutdown();
            return Err(format!(
                "cannot start NBD on {}: {e}",
                cfg.nbd_socket.display()
            ));
        }
    };

    let state = ApiState {
        mount_root: cfg.api_mount_root.as_deref().map(Arc::from),
        mgr: mgr.clone(),
        store: store.clone(),
        node: Arc::new(NodeFacts {
            name: cfg.node_name.clone(),
            data_dir: cfg.data_dir.to_string_lossy().into_owned(),
            api_listen: cfg.listen.to_string(),
            nbd_socket: cfg.nbd_socket.to_string_lossy().into_owned(),
            nbd_listen: cfg.nbd_listen.clone(),
        }),
    };
    let (docker_listener, docker_backend) = match &cfg.docker_plugin_socket {
        Some(path) => {
            let backend =
                crate::docker::DockerBackend::new(mgr.clone(), &db, cfg.docker_mount_dir.clone())
                    .inspect_err(|_| mgr.shutdown())?;
            let l = crate::docker::bind(path)
                .map_err(|e| format!("docker plugin socket: {e}"))
                .inspect_err(|_| mgr.shutdown())?;
            let b: Arc<dyn cairn_plugin::Backend> = Arc::new(backend);
            (Some((l, path.clone())), Some(b))
        }
        None => (None, None),
    };
    let csi = match &cfg.csi_socket {
        Some(path) => {
            let l = cairn_csi::bind(path)
                .map_err(|e| format!("CSI socket: {e}"))
                .inspect_err(|_| mgr.shutdown())?;
            let b: Arc<dyn cairn_csi::Backend> = Arc::new(crate::csi::CsiBackend::new(
                mgr.clone(),
                cfg.node_name.clone(),
                cfg.labels.clone(),
                cfg.csi_max_volumes,
            ));
            Some((l, b, path.clone()))
        }
        None => None,
    };
    let (beat_store, beat_mgr) = (store.clone(), mgr.clone());
    let beat_every = cfg.heartbeat_interval;
    let timing = crate::cluster::liveness::Timing {
        down_after: cfg.node_down_timeout,
        replace_after: cfg.replica_grace_period,
    };
    let live_store = store.clone();
    let recon_mgr = mgr.clone();
    let (doors, background) = (stop.doors.clone(), stop.background.clone());
    let served = rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(api_listener).map_err(|e| e.to_string())?;
        tracing::info!(listen = %cfg.listen, nbd = %cfg.nbd_socket.display(), "cairn node is serving");
        let signal = {
            let doors = doors.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = shutdown_signal() => doors.cancel(),
                    _ = doors.cancelled() => {}
                }
            })
        };
        let loops = [
            tokio::spawn(heartbeats(
                beat_store,
                beat_mgr,
                registration,
                beat_every,
                background.clone(),
            )),
            tokio::spawn(crate::cluster::liveness::run(
                live_store,
                timing,
                background.clone(),
            )),
            tokio::spawn(reconciler(recon_mgr, background.clone())),
        ];
        use axum::serve::ListenerExt;
        let listener = listener.tap_io(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "TCP_NODELAY not set on an API connection");
            }
        });
        let plugin = match docker_listener {
            Some((l, path)) => {
                let l = tokio::net::UnixListener::from_std(l).map_err(|e| e.to_string())?;
                let app = cairn_plugin::router(docker_backend.expect("backend with listener"));
                tracing::info!(socket = %path.display(), "serving the Docker volume plugin");
                let stop = doors.clone().cancelled_owned();
                let task = tokio::spawn(async move {
                    if let Err(e) = axum::serve(l, app).with_graceful_shutdown(stop).await {
                        tracing::error!(error = %e, "Docker plugin service failed");
                    }
                });
                Some((task, path))
            }
            None => None,
        };
        let csi = csi.map(|(l, backend, path)| {
            tracing::info!(socket = %path.display(), "serving the CSI driver");
            let stop = doors.clone().cancelled_owned();
            let task = tokio::spawn(async move {
                if let Err(e) = cairn_csi::serve(l, backend, stop).await {
                    tracing::error!(error = %e, "CSI service failed");
                }
            });
            (task, path)
        });
        let r = axum::serve(listener, api::router(state))
            .with_graceful_shutdown(doors.clone().cancelled_owned())
            .await
            .map_err(|e| e.to_string());
        // The API may also end by failing: the other doors stop with it.
        doors.cancel();
        let _ = signal.await;
        let limit = std::time::Duration::from_secs(10);
        for (task, path, door) in csi
            .map(|(t, p)| (t, p, "CSI"))
            .into_iter()
            .chain(plugin.map(|(t, p)| (t, p, "Docker plugin")))
        {
            if tokio::time::timeout(limit, task).await.is_err() {
                tracing::error!(door, "requests still running {limit:?} after the stop");
            }
            let _ = std::fs::remove_file(path);
        }
        // Each loop ends at its next turn, after the blocking work it has
        // in hand.
        background.cancel();
        for task in loops {
            if tokio::time::timeout(limit, task).await.is_err() {
                tracing::error!("a background loop did not end {limit:?} after the stop");
            }
        }
        r
    });
    tracing::info!("shutting down");
    nbd.stop();
    mgr.shutdown();
    // Peers' engines may write to this node's replicas until here.
    data_conns.close_all();
    let _ = peer_stop_tx.send(());
    let stuck = threads.join_all(std::time::Duration::from_secs(10));
    store.stop();
    rt.shutdown_timeout(std::time::Duration::from_secs(5));
    if !stuck.is_empty() {
        tracing::error!(threads = ?stuck, "threads still running at exit");
    }
    tracing::info!("stopped");
    served
}

/// Opens the metadata store: restart from stored state, join the cluster at
/// `--join`, or bootstrap a new cluster.
fn open_store(
    db: &sled::Db,
    cfg: &Config,
    node_id: NodeId,
    rt: &tokio::runtime::Runtime,
) -> Result<(ClusterStore, bool), String> {
    let ident = db.open_tree("node").map_err(|e| e.to_string())?;
    let stored_raft_id = ident
        .get("raft_id")
        .map_err(|e| e.to_string())?
        .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
        .map(u64::from_le_bytes);
    let fresh = ClusterStore::is_fresh(db).map_err(|e| e.to_string())?;
    let handle = rt.handle().clone();
    let (raft_id, bootstrap, cluster_id, joined) = match (&cfg.join, stored_raft_id) {
        (_, Some(id)) if !fresh => (id, None, None, false),
        (Some(addr), _) => {
            let reply = rt.block_on(join_cluster(addr, cfg, node_id))?;
            let cluster: Id128 = reply
                .cluster_id
                .parse()
                .map_err(|e| format!("join reply: {e}"))?;
            tracing::info!(raft_id = reply.raft_id, cluster = %cluster, role = %reply.role, "admitted to the cluster");
            (reply.raft_id, None, Some(cluster), true)
        }
        (None, _) => {
            let cluster = cfg.cluster_id.unwrap_or_else(Id128::random);
            tracing::info!(cluster = %cluster, "bootstrapping a new cluster");
            (1, Some(cluster), None, false)
        }
    };
    ident
        .insert("raft_id", &raft_id.to_le_bytes())
        .map_err(|e| e.to_string())?;
    db.flush().map_err(|e| e.to_string())?;
    let store = ClusterStore::open(
        db,
        StoreOptions {
            raft_id,
            bootstrap,
            cluster_id,
            advertise: cfg.advertise.clone(),
            handle,
        },
    )
    .map_err(|e| e.to_string())?;
    Ok((store, joined))
}

/// Asks a member at `addr` to admit this node, retrying for a while when it
/// cannot be reached.
async fn join_cluster(addr: &str, cfg: &Config, node_id: NodeId) -> Result<JoinReply, String> {
    let req = JoinRequest {
        cluster_id: cfg.cluster_id.map(|c| c.to_string()).unwrap_or_default(),
        node_id: node_id.to_string(),
        name: cfg.node_name.clone(),
        peer_address: cfg.advertise.clone(),
        api_address: cfg.listen.to_string(),
        labels: cfg.labels.clone().into_iter().collect(),
    };
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let mut client = crate::cluster::peer_service::client_with_timeout(
            addr,
            std::time::Duration::from_secs(30),
        )?;
        let retryable = |c: tonic::Code| {
            matches!(
                c,
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
            )
        };
        match client.join(req.clone()).await {
            Ok(r) => return Ok(r.into_inner()),
            Err(s) if retryable(s.code()) && tokio::time::Instant::now() < deadline => {
                tracing::info!(join = %addr, error = %s.message(), "join address not ready; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            Err(s) if retryable(s.code()) => {
                return Err(format!("cannot join through {addr}: {}", s.message()))
            }
            Err(s) => {
                return Err(format!(
                    "joining through {addr} was refused: {}",
                    s.message()
                ))
            }
        }
    }
}

/// How this node describes itself in the cluster state.
#[derive(Clone)]
struct Registration {
    node_id: NodeId,
    name: String,
    api_address: String,
    peer_address: String,
    labels: std::collections::BTreeMap<String, String>,
}

impl Registration {
    fn new(cfg: &Config, node_id: NodeId) -> Self {
        Registration {
            node_id,
            name: cfg.node_name.clone(),
            api_address: cfg.listen.to_string(),
            peer_address: cfg.advertise.clone(),
            labels: cfg.labels.clone(),
        }
    }

    /// The command that brings the recorded description up to date, if the
    /// record is missing or differs.
    fn command(&self, store: &ClusterStore) -> Option<Command> {
        let state = store.read();
        let current = state.nodes.get(&self.node_id);
        if current.is_some_and(|n| {
            n.name == self.name
                && n.api_address == self.api_address
                && n.peer_address == self.peer_address
                && n.labels == self.labels
        }) {
            return None;
        }
        Some(Command::RegisterNode {
            id: self.node_id,
            name: self.name.clone(),
            raft_id: store.raft_id(),
            api_address: self.api_address.clone(),
            peer_address: self.peer_address.clone(),
            labels: self.labels.clone(),
            role: current.map(|n| n.role).unwrap_or(NodeRole::Voter),
            at_unix_ms: now_unix_ms(),
        })
    }
}

/// A node new to the cluster state must be recorded before it serves; a
/// known node whose description changed is updated by the heartbeat loop
/// (a restart may find no quorum yet).
fn register_node(store: &ClusterStore, reg: &Registration) -> Result<(), String> {
    if store.read().nodes.contains_key(&reg.node_id) {
        return Ok(());
    }
    match reg.command(store) {
        None => Ok(()),
        Some(cmd) => store
            .propose(cmd)
            .map(|_| ())
            .map_err(|e| format!("registering node {:?}: {e}", reg.name)),
    }
}

/// Reports liveness and pool usage every `interval`, first bringing this
/// node's record up to date when it changed.
async fn heartbeats(
    store: Arc<ClusterStore>,
    mgr: Arc<VolumeManager>,
    reg: Registration,
    interval: std::time::Duration,
    stop: CancellationToken,
) {
    let mut every = tokio::time::interval(interval);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        let (store, mgr, reg) = (store.clone(), mgr.clone(), reg.clone());
        let r = tokio::task::spawn_blocking(move || {
            let cmd = reg.command(&store).unwrap_or(Command::NodeHeartbeat {
                id: reg.node_id,
                pool_capacity_bytes: mgr.pool().capacity_bytes(),
                pool_allocated_bytes: mgr.pool().allocated_bytes(),
                at_unix_ms: now_unix_ms(),
            });
            store.propose(cmd)
        })
        .await;
        match r {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "heartbeat not recorded"),
            Err(e) => tracing::warn!(error = %e, "heartbeat task failed"),
        }
    }
}

/// Drives this node's replicas toward the state every 2 s (see
/// [`VolumeManager::reconcile`]) until `stop`.
async fn reconciler(mgr: Arc<VolumeManager>, stop: CancellationToken) {
    let mut every = tokio::time::interval(std::time::Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        let m = mgr.clone();
        let _ = tokio::task::spawn_blocking(move || m.reconcile()).await;
    }
}

/// The peer port's connections, told apart by their first bytes: data
/// frames (`cairn_proto::frame`) go to a thread of the data wire server (`replica::wire`),
/// everything else (HTTP/2) to the gRPC server through the returned stream.
struct Incoming(tokio::sync::mpsc::Receiver<std::io::Result<tokio::net::TcpStream>>);

impl futures_core::Stream for Incoming {
    type Item = std::io::Result<tokio::net::TcpStream>;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.0.poll_recv(cx)
    }
}

fn route_peer_connections(
    listener: tokio::net::TcpListener,
    fast: Arc<std::sync::OnceLock<crate::replica::wire::Server>>,
    threads: Arc<Threads>,
    conns: Arc<Conns>,
) -> Incoming {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let s = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a peer connection failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            // Small Raft messages and 4 KiB writes must not wait for Nagle.
            let _ = s.set_nodelay(true);
            let (tx, fast) = (tx.clone(), fast.clone());
            let (threads, conns) = (threads.clone(), conns.clone());
            tokio::spawn(async move {
                let mut b = [0u8; 4];
                let peeked =
                    tokio::time::timeout(std::time::Duration::from_secs(10), s.peek(&mut b)).await;
                let frames = matches!(peeked, Ok(Ok(4)))
                    && u32::from_le_bytes(b) == cairn_proto::frame::REQ_MAGIC;
                if !frames {
                    let _ = tx.send(Ok(s)).await;
                    return;
                }
                if fast.get().is_none() {
                    return; // still starting: the engine retries or marks the replica
                }
                match s.into_std() {
                    Ok(std_stream) => {
                        if std_stream.set_nonblocking(false).is_ok() {
                            let spawned = threads.spawn("data-conn".into(), move || {
                                // None: the daemon is stopping.
                                let Some(_open) = conns.register(&std_stream) else {
                                    return;
                                };
                                if let Some(server) = fast.get() {
                                    server.serve(std_stream)
                                }
                            });
                            if let Err(e) = spawned {
                                tracing::warn!(error = %e, "cannot start a data connection thread");
                            }
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "data connection lost"),
                }
            });
        }
    });
    Incoming(rx)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}
