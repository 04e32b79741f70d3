//! Docker's volume plugin protocol (a "legacy" socket plugin implementing
//! `VolumeDriver`): HTTP + JSON over a unix socket that dockerd discovers
//! in `/run/docker/plugins/NAME.sock`. This crate speaks the protocol and
//! nothing else; the node daemon supplies a [`Backend`] built on the same
//! volume-manager calls as the CLI.
//!
//! Every endpoint answers 200 with `Err` set on failure, as dockerd expects;
//! request bodies are parsed strictly enough to refuse garbage (a name is
//! required where the protocol has one) but tolerate fields newer Docker
//! versions add.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// What dockerd shows for one volume.
#[derive(Debug, Clone, Serialize)]
pub struct VolumeView {
    #[serde(rename = "Name")]
    pub name: String,
    /// Where the volume is mounted on this host, if it is.
    #[serde(rename = "Mountpoint", skip_serializing_if = "String::is_empty")]
    pub mountpoint: String,
    /// Driver-specific state for `docker volume inspect`.
    #[serde(rename = "Status", skip_serializing_if = "Value::is_null")]
    pub status: Value,
}

/// The storage behind the plugin. Calls may block (mkfs, mount); they run
/// on the blocking pool. Errors are shown to the Docker user verbatim.
pub trait Backend: Send + Sync + 'static {
    fn create(&self, name: &str, opts: &BTreeMap<String, String>) -> Result<(), String>;
    fn remove(&self, name: &str) -> Result<(), String>;
    /// Mounts for container `id` (reference-counted); returns the path.
    fn mount(&self, name: &str, id: &str) -> Result<String, String>;
    fn unmount(&self, name: &str, id: &str) -> Result<(), String>;
    /// The mountpoint while mounted here, else empty.
    fn path(&self, name: &str) -> Result<String, String>;
    fn get(&self, name: &str) -> Result<VolumeView, String>;
    fn list(&self) -> Result<Vec<VolumeView>, String>;
}

#[derive(Deserialize)]
struct NameReq {
    #[serde(rename = "Name")]
    name: String,
}

#[derive(Deserialize)]
struct CreateReq {
    #[serde(rename = "Name")]
    name: String,
    #[serde(rename = "Opts", default)]
    opts: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
struct MountReq {
    #[serde(rename = "Name")]
    name: String,
    #[serde(rename = "ID", default)]
    id: String,
}

/// A reply in the plugin media type.
fn reply(v: Value) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/vnd.docker.plugins.v1.2+json",
        )],
        v.to_string(),
    )
        .into_response()
}

fn err(msg: impl Into<String>) -> Response {
    reply(json!({ "Err": msg.into() }))
}

fn parse<T: for<'de> Deserialize<'de>>(body: &Bytes) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|e| format!("invalid request body: {e}"))
}

type Shared = Arc<dyn Backend>;

async fn run<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(format!("internal error: {e}")))
}

async fn activate() -> Response {
    reply(json!({ "Implements": ["VolumeDriver"] }))
}

async fn capabilities() -> Response {
    // Volumes live in the cluster, not on one host.
    reply(json!({ "Capabilities": { "Scope": "global" } }))
}

async fn create(State(b): State<Shared>, body: Bytes) -> Response {
    let req: CreateReq = match parse(&body) {
        Ok(r) => r,
        Err(e) => return err(e),
    };
    let opts = req.opts.unwrap_or_default();
    match run(move || b.create(&req.name, &opts)).await {
        Ok(()) => reply(json!({ "Err": "" })),
        Err(e) => err(e),
    }
}

async fn remove(State(b): State<Shared>, body: Bytes) -> Response {
    let req: NameReq = match parse(&body) {
        Ok(r) => r,
        Err(e) => return err(e),
    };
    match run(move || b.remove(&req.name)).await {
        Ok(()) => reply(json!({ "Err": "" })),
        Err(e) => err(e),
    }
}

async fn mount(State(b): State<Shared>, body: Bytes) -> Response {
    let req: MountReq = match parse(&body) {
        Ok(r) => r,
        Err(e) => return err(e),
    };
    if req.id.is_empty() {
        return err("mount request without a container ID");
    }
    match run(move || b.mount(&req.name, &req.id)).await {
        Ok(p) => reply(json!({ "Mountpoint": p, "Err": "" })),
        Err(e) => err(e),
    }
}

async fn unmount(State(b): State<Shared>, body: Bytes) -> Response {
    let req: MountReq = match parse(&body) {
        Ok(r) => r,
        Err(e) => return err(e),
    };
    if req.id.is_empty() {
        return err("unmount request without a container ID");
    }
    match run(move || b.unmount(&req.name, &req.id)).await {
        Ok(()) => reply(json!({ "Err": "" })),
        Err(e) => err(e),
    }
}

async fn path(State(b): State<Shared>, body: Bytes) -> Response {
    let req: NameReq = match parse(&body) {
        Ok(r) => r,
        Err(e) => return err(e),
    };
    match run(move || b.path(&req.name)).await {
        Ok(p) => reply(json!({ "Mountpoint": p, "Err": "" })),
        Err(e) => err(e),
    }
}

async fn get(State(b): State<Shared>, body: Bytes) -> Response {
    let req: NameReq = match parse(&body) {
        Ok(r) => r,
        Err(e) => return err(e),
    };
    match run(move || b.get(&req.name)).await {
        Ok(v) => reply(json!({ "Volume": v, "Err": "" })),
        Err(e) => err(e),
    }
}

async fn list(State(b): State<Shared>) -> Response {
    match run(move || b.list()).await {
        Ok(v) => reply(json!({ "Volumes": v, "Err": "" })),
        Err(e) => err(e),
    }
}

/// The protocol's routes over `backend`.
pub fn router(backend: Arc<dyn Backend>) -> Router {
    Router::new()
        .route("/Plugin.Activate", post(activate))
        .route("/VolumeDriver.Capabilities", post(capabilities))
        .route("/VolumeDriver.Create", post(create))
        .route("/VolumeDriver.Remove", post(remove))
        .route("/VolumeDriver.Mount", post(mount))
        .route("/VolumeDriver.Unmount", post(unmount))
        .route("/VolumeDriver.Path", post(path))
        .route("/VolumeDriver.Get", post(get))
        .route("/VolumeDriver.List", post(list))
        .with_state(backend)
}
