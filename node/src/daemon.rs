//! `cairn node run`: start-up, serving, and the shutdown order.
//!
//! Start: lock the data dir, open the metadata db, node identity, pool,
//! cluster store, volume manager (which cleans stale kernel state, mounts
//! FUSE and re-serves attachments), NBD, then the REST API.
//! Shutdown (SIGTERM/SIGINT): stop the API, stop NBD (closing connections),
//! unmount and unbind attached volumes (records kept for the next start),
//! unmount FUSE, flush the db.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use crate::api::{self, ApiState, NodeFacts};
use crate::cluster::store::ClusterStore;
use crate::config::Config;
use crate::frontend::nbd::NbdServer;
use crate::pool::Pool;
use crate::types::{Id128, NodeId};
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
    std::fs::create_dir_all(&cfg.data_dir)
        .map_err(|e| format!("data dir {}: {e}", cfg.data_dir.display()))?;
    let _lock = lock_data_dir(&cfg)?;
    // Bind the API first so a port conflict fails before anything changes.
    let api_listener = std::net::TcpListener::bind(cfg.listen)
        .map_err(|e| format!("cannot listen on {}: {e}", cfg.listen))?;
    api_listener
        .set_nonblocking(true)
        .map_err(|e| e.to_string())?;

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
    let store = Arc::new(ClusterStore::open(&db).map_err(|e| e.to_string())?);
    let mgr = VolumeManager::open(
        ManagerConfig {
            node_id,
            fuse_dir: cfg.data_dir.join("fuse"),
            fuse_threads: cfg.fuse_threads,
        },
        db.clone(),
        pool,
        store,
    )?;
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
        mgr: mgr.clone(),
        node: Arc::new(NodeFacts {
            name: cfg.node_name.clone(),
            data_dir: cfg.data_dir.to_string_lossy().into_owned(),
            api_listen: cfg.listen.to_string(),
            nbd_socket: cfg.nbd_socket.to_string_lossy().into_owned(),
            nbd_listen: cfg.nbd_listen.clone(),
        }),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(64)
        .enable_all()
        .thread_name("cairn-rt")
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    let served = rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(api_listener).map_err(|e| e.to_string())?;
        tracing::info!(listen = %cfg.listen, nbd = %cfg.nbd_socket.display(), "cairn node is serving");
        axum::serve(listener, api::router(state)).with_graceful_shutdown(shutdown_signal()).await.map_err(|e| e.to_string())
    });
    tracing::info!("shutting down");
    nbd.stop();
    mgr.shutdown();
    rt.shutdown_timeout(std::time::Duration::from_secs(5));
    tracing::info!("stopped");
    served
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
