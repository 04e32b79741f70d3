//! The `cairn` command line: `node run` starts the daemon; every other
//! command is a client of the REST admin API (`--api` or `CAIRN_API`), printing
//! human tables by default and the API's JSON with `-o json`. Request and
//! answer bodies are the typed `cairn_proto::api` types: an answer that does
//! not match them is an error, never a table of dashes.

pub mod client;
mod dev;
mod snapshot;

use std::path::PathBuf;

use cairn_proto::api;
use clap::{Parser, Subcommand, ValueEnum};
use serde::de::{DeserializeOwned, IgnoredAny};
use serde::Serialize;
use serde_json::{json, Value};

use client::Client;

use crate::config::RunArgs;
use crate::types::ByteSize;

#[derive(Parser, Debug)]
#[command(
    name = "cairn",
    version,
    about = "Cairn: container-native block storage"
)]
pub struct Cli {
    /// URL of the node's admin API.
    #[arg(
        long,
        global = true,
        env = "CAIRN_API",
        default_value = "http://127.0.0.1:7400"
    )]
    pub api: String,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    #[command(subcommand)]
    pub command: Top,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Top {
    /// Run or query a node.
    #[command(subcommand)]
    Node(NodeCmd),
    /// Manage volumes.
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Manage snapshots of volumes (named VOLUME@SNAPSHOT).
    #[command(subcommand)]
    Snapshot(snapshot::SnapshotCmd),
    /// Inspect the disk pool.
    #[command(subcommand)]
    Pool(PoolCmd),
    /// Inspect the cluster's metadata group.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// A local cluster of daemons on 127.0.0.x for development and tests.
    #[command(subcommand)]
    Dev(DevCmd),
    /// Keeps the daemon's FUSE connection (and so the mounts of attached
    /// volumes) alive while the daemon restarts. The daemon starts one
    /// itself; run `--standby` as a separate long-lived process, e.g. a
    /// sidecar container in Kubernetes where a container restart would
    /// kill a holder the daemon started.
    FuseHolder {
        /// The holder's socket: DATA_DIR/fuse-holder.sock.
        socket: PathBuf,
        /// The daemon's FUSE mount: DATA_DIR/fuse.
        mountpoint: PathBuf,
        /// Wait for a daemon to hand over its connection, and keep running
        /// when that mount goes away (instead of holding fd 3 and exiting).
        #[arg(long)]
        standby: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum DevCmd {
    /// Start N daemons on 127.0.0.11, .12, ... (API port 7400, peer port 7410).
    Up {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        #[arg(long, default_value = "cairn-dev")]
        dir: PathBuf,
        /// Size of each node's file-backed disk.
        #[arg(long, default_value = "4GiB")]
        disk_size: String,
    },
    /// Stop the daemons started by `dev up` and remove what they created.
    Down {
        #[arg(long, default_value = "cairn-dev")]
        dir: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub enum ClusterCmd {
    /// Cluster id, metadata leader, term, commit/applied index, members.
    Status,
}

#[derive(Subcommand, Debug)]
pub enum NodeCmd {
    /// Run the node daemon in the foreground.
    Run(Box<RunArgs>),
    /// Show this node's status.
    Status,
    /// List the cluster's nodes.
    Ls,
    /// Remove a node from the cluster.
    Rm {
        name: String,
        /// Remove it even though it holds the only copy of some volumes' data.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum PoolCmd {
    /// List the pool and its devices.
    Ls,
}

#[derive(Subcommand, Debug)]
pub enum VolumeCmd {
    /// Create a thin volume, or a clone of a snapshot or volume.
    Create {
        name: String,
        /// Size with units: 10GiB, 512MiB, 1G (a clone: at least, and by
        /// default, its source's size).
        #[arg(long, required_unless_present_any = ["from_snapshot", "from_volume"])]
        size: Option<String>,
        /// Filesystem created on first mount.
        #[arg(long, value_parser = ["ext4", "xfs", "none"])]
        fs: Option<String>,
        /// Copies on distinct nodes, 1 to 3 (default: the daemon's --default-replicas).
        #[arg(long)]
        replicas: Option<u32>,
        /// Keep one replica on the node that answers (the one that will attach it).
        #[arg(long)]
        locality: bool,
        /// Clone snapshot VOLUME@SNAPSHOT: usable at once, independent of
        /// the source afterwards, with the source's filesystem.
        #[arg(long, conflicts_with_all = ["from_volume", "fs"])]
        from_snapshot: Option<String>,
        /// Clone volume VOLUME as it is now (through a snapshot taken for
        /// the clone and deleted once the clone no longer needs it).
        #[arg(long, conflicts_with = "fs")]
        from_volume: Option<String>,
    },
    /// List volumes.
    Ls,
    /// Show one volume.
    Inspect {
        name: String,
        /// Refresh every second, with rebuild progress bars, until every
        /// replica is healthy.
        #[arg(long)]
        watch: bool,
    },
    /// Grow a volume (online; a mounted filesystem grows too).
    Resize {
        name: String,
        #[arg(long)]
        size: String,
    },
    /// Change a volume's replica count online (1 to 3).
    Update {
        name: String,
        #[arg(long)]
        replicas: u32,
    },
    /// Delete a volume.
    Rm {
        name: String,
        /// Unmount and detach it first if it is attached here.
        #[arg(long)]
        force: bool,
        /// Delete a detached volume that has snapshots and keep them
        /// (listed, usable as clone sources); its space and name are
        /// released with its last snapshot.
        #[arg(long)]
        keep_snapshots: bool,
    },
    /// Attach as a block device on the node; prints the device path.
    Attach {
        name: String,
        /// Take the volume over from the node it is attached to (when that
        /// node is dead); the old node's engine is fenced.
        #[arg(long)]
        force: bool,
    },
    /// Detach the block device.
    Detach { name: String },
    /// Compare extent checksums across the healthy replicas (on the attaching node).
    Verify {
        name: String,
        /// Make differing extents equal again: from the copy a majority of
        /// the healthy replicas holds, else the one reads are served from.
        #[arg(long)]
        repair: bool,
    },
    /// Attach, format on first use, and mount at PATH.
    Mount {
        name: String,
        path: PathBuf,
        /// Take the volume over from the node it is attached to (see attach --force).
        #[arg(long)]
        force: bool,
    },
    /// Unmount from PATH (detaches after the last mount).
    Unmount { name: String, path: PathBuf },
    /// Make a detached volume read as one of its snapshots (what was
    /// written since is lost; the snapshot stays).
    Revert {
        name: String,
        /// The snapshot's name (without the volume).
        #[arg(long)]
        snapshot: String,
    },
}

/// Runs a client command; returns the process exit code.
pub fn run_client(api: &str, output: Output, cmd: Top) -> i32 {
    match exec(api, output, cmd) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}

fn seg(name: &str) -> String {
    // Volume names are [A-Za-z0-9_.-]; anything else is escaped so a bad
    // name reaches the API (and its validation) intact.
    name.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"_.-".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// One API call: `body` serialised from its request type, the answer
/// deserialised into `T` (an empty body reads as JSON `null`, so `T` may be
/// an `Option`), an error answer turned into its message and stable code.
fn call<T: DeserializeOwned>(
    c: &Client,
    method: &str,
    path: &str,
    body: Option<&impl Serialize>,
) -> Result<T, String> {
    let body = body
        .map(serde_json::to_value)
        .transpose()
        .map_err(|e| format!("request body: {e}"))?;
    let r = c.request(method, path, body.as_ref())?;
    if !(200..300).contains(&r.status) {
        return Err(match serde_json::from_slice::<api::ErrorBody>(&r.body) {
            Ok(b) => format!("{} ({}, HTTP {})", b.error.message, b.error.code, r.status),
            Err(_) => format!(
                "HTTP {}: {}",
                r.status,
                String::from_utf8_lossy(&r.body).trim()
            ),
        });
    }
    let parsed = if r.body.is_empty() {
        serde_json::from_value(Value::Null)
    } else {
        serde_json::from_slice(&r.body)
    };
    parsed.map_err(|e| {
        format!(
            "the API answered {} with a body this CLI does not understand: {e}",
            r.status
        )
    })
}

/// Prints an answer: the API's JSON with `-o json`, else `render`'s table.
fn show<T: Serialize>(output: Output, v: &T, render: impl Fn(&T) -> String) -> Result<(), String> {
    match output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(v).map_err(|e| e.to_string())?
        ),
        Output::Table => println!("{}", render(v)),
    }
    Ok(())
}

/// No request body.
const NONE: Option<&()> = None;

fn absolute(p: PathBuf) -> Result<String, String> {
    let p = if p.is_absolute() {
        p
    } else {
        std::env::current_dir().map_err(|e| e.to_string())?.join(p)
    };
    Ok(p.to_string_lossy().into_owned())
}

fn exec(api: &str, output: Output, cmd: Top) -> Result<(), String> {
    if let Top::Dev(cmd) = cmd {
        return match cmd {
            DevCmd::Up {
                nodes,
                dir,
                disk_size,
            } => dev::up(
                nodes,
                &std::path::absolute(&dir).map_err(|e| e.to_string())?,
                &disk_size,
            ),
            DevCmd::Down { dir } => {
                dev::down(&std::path::absolute(&dir).map_err(|e| e.to_string())?)
            }
        };
    }
    let c = Client::new(api)?;
    let volume = |name: &str| format!("/v1/volumes/{}", seg(name));
    match cmd {
        Top::Node(NodeCmd::Run(_)) | Top::Dev(_) | Top::FuseHolder { .. } => {
            unreachable!("handled before")
        }
        Top::Node(NodeCmd::Status) => show(
            output,
            &call::<api::NodeStatus>(&c, "GET", "/v1/node", NONE)?,
            render_node,
        ),
        Top::Pool(PoolCmd::Ls) => show(
            output,
            &call::<api::PoolInfo>(&c, "GET", "/v1/pool", NONE)?,
            render_pool,
        ),
        Top::Node(NodeCmd::Ls) => show(
            output,
            &call::<Vec<api::NodeInfo>>(&c, "GET", "/v1/nodes", NONE)?,
            |v| render_nodes(v),
        ),
        Top::Node(NodeCmd::Rm { name, force }) => {
            call::<IgnoredAny>(
                &c,
                "DELETE",
                &format!("/v1/nodes/{}?force={force}", seg(&name)),
                NONE,
            )?;
            show(output, &json!({ "removed": name }), |_| {
                format!("removed {name}")
            })
        }
        Top::Snapshot(cmd) => snapshot::exec(&c, output, cmd),
        Top::Cluster(ClusterCmd::Status) => show(
            output,
            &call::<api::ClusterStatus>(&c, "GET", "/v1/cluster", NONE)?,
            render_cluster,
        ),
        Top::Volume(cmd) => match cmd {
            VolumeCmd::Create {
                name,
                size,
                fs,
                replicas,
                locality,
                from_snapshot,
                from_volume,
            } => {
                let body = api::VolumeCreate {
                    name,
                    size: size.map(api::SizeArg::Text),
                    fs,
                    replicas,
                    locality,
                    from_snapshot,
                    from_volume,
                };
                show(
                    output,
                    &call::<api::VolumeInfo>(&c, "POST", "/v1/volumes", Some(&body))?,
                    render_volume,
                )
            }
            VolumeCmd::Ls => show(
                output,
                &call::<Vec<api::VolumeInfo>>(&c, "GET", "/v1/volumes", NONE)?,
                |v| render_volumes(v),
            ),
            VolumeCmd::Inspect { name, watch } => {
                let path = volume(&name);
                if watch && output == Output::Table {
                    return watch_volume(&c, &path);
                }
                show(
                    output,
                    &call::<api::VolumeInfo>(&c, "GET", &path, NONE)?,
                    render_volume,
                )
            }
            VolumeCmd::Update { name, replicas } => {
                let body = api::VolumeUpdate {
                    size: None,
                    replicas: Some(replicas),
                };
                show(
                    output,
                    &call::<api::VolumeInfo>(&c, "PATCH", &volume(&name), Some(&body))?,
                    render_volume,
                )
            }
            VolumeCmd::Resize { name, size } => {
                let body = api::VolumeUpdate {
                    size: Some(api::SizeArg::Text(size)),
                    replicas: None,
                };
                show(
                    output,
                    &call::<api::VolumeInfo>(&c, "PATCH", &volume(&name), Some(&body))?,
                    render_volume,
                )
            }
            VolumeCmd::Rm {
                name,
                force,
                keep_snapshots,
            } => {
                let r = call::<Option<api::VolumeDeleted>>(
                    &c,
                    "DELETE",
                    &format!(
                        "{}?force={force}&keep_snapshots={keep_snapshots}",
                        volume(&name)
                    ),
                    NONE,
                )?;
                let pending = r.map(|d| d.space_pending_on).unwrap_or_default();
                show(
                    output,
                    &json!({ "deleted": name, "space_pending_on": pending }),
                    |_| {
                        if pending.is_empty() {
                            format!("deleted {name}")
                        } else {
                            format!(
                                "deleted {name}; its space on {} is freed when they answer again",
                                pending.join(", ")
                            )
                        }
                    },
                )
            }
            VolumeCmd::Attach { name, force } => {
                let body = force.then_some(api::AttachRequest { force: true });
                show(
                    output,
                    &call::<api::AttachInfo>(
                        &c,
                        "POST",
                        &format!("{}/attach", volume(&name)),
                        body.as_ref(),
                    )?,
                    |a| a.device.clone(),
                )
            }
            VolumeCmd::Detach { name } => show(
                output,
                &call::<api::VolumeInfo>(&c, "POST", &format!("{}/detach", volume(&name)), NONE)?,
                render_volume,
            ),
            VolumeCmd::Verify { name, repair } => show(
                output,
                &call::<api::VerifyReport>(
                    &c,
                    "POST",
                    &format!("{}/verify?repair={repair}", volume(&name)),
                    NONE,
                )?,
                render_verify,
            ),
            VolumeCmd::Mount { name, path, force } => {
                let body = api::MountRequest {
                    path: absolute(path)?,
                    force,
                };
                show(
                    output,
                    &call::<api::VolumeInfo>(
                        &c,
                        "POST",
                        &format!("{}/mount", volume(&name)),
                        Some(&body),
                    )?,
                    render_volume,
                )
            }
            VolumeCmd::Revert { name, snapshot } => snapshot::revert(&c, output, &name, snapshot),
            VolumeCmd::Unmount { name, path } => {
                let body = api::MountRequest {
                    path: absolute(path)?,
                    force: false,
                };
                show(
                    output,
                    &call::<api::VolumeInfo>(
                        &c,
                        "POST",
                        &format!("{}/unmount", volume(&name)),
                        Some(&body),
                    )?,
                    render_volume,
                )
            }
        },
    }
}

fn bytes(n: u64) -> String {
    ByteSize(n).to_string()
}

/// An optional value, `-` when absent.
fn opt(v: &Option<String>) -> String {
    v.clone().unwrap_or_else(|| "-".into())
}

fn list(v: &[String]) -> String {
    if v.is_empty() {
        "-".into()
    } else {
        v.join(", ")
    }
}

fn render_verify(v: &api::VerifyReport) -> String {
    let bad = v.mismatched_extents.len();
    let mut out = format!(
        "{} extents compared across {} healthy replicas: {}",
        v.extents_compared,
        v.replicas_compared,
        if bad == 0 {
            "consistent".to_string()
        } else {
            format!("{bad} differ: {:?}", v.mismatched_extents)
        }
    );
    for r in &v.repaired {
        out += &format!(
            "\nrepaired extent {}: {} rewritten from {} ({})",
            r.extent,
            r.targets.join(", "),
            r.source,
            if r.majority {
                "the copy a majority holds"
            } else {
                "no majority: the copy reads were served from"
            }
        );
    }
    for s in &v.snapshots {
        let state = if s.replicas_compared.len() < 2 {
            format!(
                "held by {} healthy replica(s), nothing to compare",
                s.replicas_compared.len()
            )
        } else if s.mismatched_extents.is_empty() {
            format!("consistent across {}", s.replicas_compared.join(", "))
        } else {
            format!(
                "{} extent(s) differ across {}: {:?}",
                s.mismatched_extents.len(),
                s.replicas_compared.join(", "),
                s.mismatched_extents
            )
        };
        out += &format!("\nsnapshot {}: {state}", s.snapshot);
        if !s.lacking.is_empty() {
            out += &format!(" (not yet on {})", s.lacking.join(", "));
        }
    }
    out
}

fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut w: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = w[i]))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = vec![line(headers.iter().map(|h| h.to_string()).collect())];
    out.extend(rows.into_iter().map(line));
    out.join("\n")
}

fn render_volumes(v: &[api::VolumeInfo]) -> String {
    let rows = v
        .iter()
        .map(|x| {
            vec![
                x.name.clone(),
                bytes(x.size_bytes),
                x.fs.clone(),
                x.state.clone(),
                opt(&x.device),
                bytes(x.allocated_bytes),
            ]
        })
        .collect();
    table(
        &["NAME", "SIZE", "FS", "STATE", "DEVICE", "ALLOCATED"],
        rows,
    )
}

fn render_volume(v: &api::VolumeInfo) -> String {
    let mut rows = vec![
        ("Name", v.name.clone()),
        ("ID", v.id.clone()),
        (
            "Size",
            format!("{} ({} bytes)", bytes(v.size_bytes), v.size_bytes),
        ),
        ("Filesystem", v.fs.clone()),
        ("Formatted", v.formatted.to_string()),
        ("State", v.state.clone()),
        ("Device", opt(&v.device)),
        ("Mounts", list(&v.mounts)),
        ("Published", list(&v.published)),
        ("Allocated", bytes(v.allocated_bytes)),
        ("Epoch", v.epoch.to_string()),
        ("Attached node", opt(&v.attached_node)),
        ("Read by", list(&v.readers)),
        ("Replicas", render_replicas(&v.replicas)),
    ];
    if let Some(c) = &v.csi_name {
        rows.insert(1, ("CSI name", c.clone()));
    }
    if let Some(o) = &v.origin {
        let progress = o
            .progress
            .map_or(String::new(), |p| format!(", {:.0}% here", p * 100.0));
        rows.push((
            "Clone of",
            format!(
                "{} (filling on {}{progress})",
                o.snapshot,
                o.filling.join(", ")
            ),
        ));
    }
    rows.iter()
        .map(|(k, val)| format!("{k:<14}{val}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// One line per replica: node, state, and a progress bar while rebuilding.
fn render_replicas(list: &[api::ReplicaInfo]) -> String {
    if list.is_empty() {
        return "-".into();
    }
    list.iter()
        .map(|x| {
            let mut line = format!("{:<12}{}", x.node, x.state);
            if let Some(p) = x.rebuild_progress {
                let filled = (p.clamp(0.0, 1.0) * 30.0).round() as usize;
                line.push_str(&format!(
                    "  [{}{}] {:>3.0}%",
                    "#".repeat(filled),
                    ".".repeat(30 - filled),
                    p * 100.0
                ));
            }
            line
        })
        .collect::<Vec<_>>()
        .join(&format!("\n{:14}", ""))
}

/// `volume inspect --watch`: redraws until every replica is healthy.
fn watch_volume(c: &Client, path: &str) -> Result<(), String> {
    loop {
        let v: api::VolumeInfo = call(c, "GET", path, NONE)?;
        println!("{}\n", render_volume(&v));
        if v.replicas.iter().all(|x| x.state == "healthy") {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

fn render_pool(v: &api::PoolInfo) -> String {
    let head = format!(
        "Pool {}: capacity {}, allocated {}, free {}, provisioned {} (extent {})\n",
        v.id,
        bytes(v.capacity_bytes),
        bytes(v.allocated_bytes),
        bytes(v.free_bytes),
        bytes(v.provisioned_bytes),
        bytes(v.extent_size_bytes),
    );
    let rows = v
        .devices
        .iter()
        .map(|d| {
            vec![
                d.index.to_string(),
                d.path.clone(),
                d.kind.clone(),
                bytes(d.capacity_bytes),
                bytes(d.allocated_bytes),
            ]
        })
        .collect();
    head + &table(&["INDEX", "PATH", "KIND", "CAPACITY", "ALLOCATED"], rows)
}

fn render_nodes(v: &[api::NodeInfo]) -> String {
    let now = crate::types::now_unix_ms();
    let rows = v
        .iter()
        .map(|n| {
            let labels = n
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",");
            let age = now.saturating_sub(n.last_heartbeat_unix_ms) / 1000;
            vec![
                n.name.clone(),
                n.id.clone(),
                n.address.clone(),
                if labels.is_empty() {
                    "-".into()
                } else {
                    labels
                },
                n.role.clone(),
                n.state.clone(),
                format!(
                    "{} / {}",
                    bytes(n.pool_allocated_bytes),
                    bytes(n.pool_capacity_bytes)
                ),
                format!("{age}s ago"),
            ]
        })
        .collect();
    table(
        &[
            "NAME",
            "ID",
            "ADDRESS",
            "LABELS",
            "ROLE",
            "STATE",
            "POOL USED / CAPACITY",
            "LAST HEARTBEAT",
        ],
        rows,
    )
}

fn render_cluster(v: &api::ClusterStatus) -> String {
    let head = [
        ("Cluster ID", v.cluster_id.clone()),
        ("Leader", opt(&v.leader)),
        ("Term", v.term.to_string()),
        ("Commit index", v.commit_index.to_string()),
        ("Applied index", v.applied_index.to_string()),
    ]
    .iter()
    .map(|(k, val)| format!("{k:<15}{val}"))
    .collect::<Vec<_>>()
    .join("\n");
    let rows = v
        .members
        .iter()
        .map(|m| {
            vec![
                m.name.clone(),
                m.id.clone(),
                m.raft_id.to_string(),
                m.role.clone(),
            ]
        })
        .collect();
    format!(
        "{head}\n\n{}",
        table(&["MEMBER", "ID", "RAFT ID", "ROLE"], rows)
    )
}

fn render_node(v: &api::NodeStatus) -> String {
    [
        ("Name", v.name.clone()),
        ("ID", v.id.clone()),
        ("Version", v.version.clone()),
        ("Data dir", v.data_dir.clone()),
        ("API", v.api_listen.clone()),
        ("NBD socket", v.nbd_socket.clone()),
        ("NBD TCP", opt(&v.nbd_listen)),
        (
            "Volumes",
            format!("{} ({} attached here)", v.volumes, v.attached_volumes),
        ),
        (
            "Pool",
            format!(
                "{} allocated of {}",
                bytes(v.pool_allocated_bytes),
                bytes(v.pool_capacity_bytes)
            ),
        ),
        ("Uptime", format!("{}s", v.uptime_seconds)),
    ]
    .iter()
    .map(|(k, val)| format!("{k:<12}{val}"))
    .collect::<Vec<_>>()
    .join("\n")
}

#[cfg(test)]
mod tests;
