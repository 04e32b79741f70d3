//! The `cairn` command line: `node run` starts the daemon; every other
//! command is a client of the REST admin API (`--api` or `CAIRN_API`), printing
//! human tables by default and the API's JSON with `-o json`.

pub mod client;
mod dev;

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
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
    /// Create a thin volume.
    Create {
        name: String,
        /// Size with units: 10GiB, 512MiB, 1G.
        #[arg(long)]
        size: String,
        /// Filesystem created on first mount.
        #[arg(long, value_parser = ["ext4", "xfs", "none"])]
        fs: Option<String>,
        /// Copies on distinct nodes, 1 to 3 (default: the daemon's --default-replicas).
        #[arg(long)]
        replicas: Option<u32>,
        /// Keep one replica on the node that answers (the one that will attach it).
        #[arg(long)]
        locality: bool,
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

fn call(c: &Client, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
    let r = c.request(method, path, body.as_ref())?;
    let v: Value = if r.body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&r.body).map_err(|e| {
            format!(
                "the API answered {} with a body that is not JSON: {e}",
                r.status
            )
        })?
    };
    if (200..300).contains(&r.status) {
        Ok(v)
    } else {
        let code = v["error"]["code"].as_str().unwrap_or("Unknown");
        let msg = v["error"]["message"].as_str().unwrap_or("no message");
        Err(format!("{msg} ({code}, HTTP {})", r.status))
    }
}

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
    let (v, render): (Value, fn(&Value) -> String) = match cmd {
        Top::Node(NodeCmd::Run(_)) | Top::Dev(_) | Top::FuseHolder { .. } => {
            unreachable!("handled before")
        }
        Top::Node(NodeCmd::Status) => (call(&c, "GET", "/v1/node", None)?, render_node),
        Top::Pool(PoolCmd::Ls) => (call(&c, "GET", "/v1/pool", None)?, render_pool),
        Top::Node(NodeCmd::Ls) => (call(&c, "GET", "/v1/nodes", None)?, render_nodes),
        Top::Node(NodeCmd::Rm { name, force }) => {
            call(
                &c,
                "DELETE",
                &format!("/v1/nodes/{}?force={force}", seg(&name)),
                None,
            )?;
            (json!({ "removed": name }), |v| {
                format!("removed {}", v["removed"].as_str().unwrap_or_default())
            })
        }
        Top::Cluster(ClusterCmd::Status) => (call(&c, "GET", "/v1/cluster", None)?, render_cluster),
        Top::Volume(cmd) => match cmd {
            VolumeCmd::Create {
                name,
                size,
                fs,
                replicas,
                locality,
            } => {
                let mut body = json!({ "name": name, "size": size });
                if let Some(fs) = fs {
                    body["fs"] = json!(fs);
                }
                if let Some(r) = replicas {
                    body["replicas"] = json!(r);
                }
                if locality {
                    body["locality"] = json!(true);
                }
                (call(&c, "POST", "/v1/volumes", Some(body))?, render_volume)
            }
            VolumeCmd::Ls => (call(&c, "GET", "/v1/volumes", None)?, render_volumes),
            VolumeCmd::Inspect { name, watch } => {
                let path = format!("/v1/volumes/{}", seg(&name));
                if watch && output == Output::Table {
                    return watch_volume(&c, &path);
                }
                (call(&c, "GET", &path, None)?, render_volume)
            }
            VolumeCmd::Update { name, replicas } => (
                call(
                    &c,
                    "PATCH",
                    &format!("/v1/volumes/{}", seg(&name)),
                    Some(json!({ "replicas": replicas })),
                )?,
                render_volume,
            ),
            VolumeCmd::Resize { name, size } => (
                call(
                    &c,
                    "PATCH",
                    &format!("/v1/volumes/{}", seg(&name)),
                    Some(json!({ "size": size })),
                )?,
                render_volume,
            ),
            VolumeCmd::Rm { name, force } => {
                let r = call(
                    &c,
                    "DELETE",
                    &format!("/v1/volumes/{}?force={force}", seg(&name)),
                    None,
                )?;
                let pending = r["space_pending_on"].clone();
                (
                    json!({ "deleted": name, "space_pending_on": pending }),
                    |v| {
                        let name = v["deleted"].as_str().unwrap_or_default();
                        match v["space_pending_on"].as_array() {
                            Some(p) if !p.is_empty() => {
                                let nodes: Vec<&str> =
                                    p.iter().filter_map(|n| n.as_str()).collect();
                                format!(
                                    "deleted {name}; its space on {} is freed when they answer again",
                                    nodes.join(", ")
                                )
                            }
                            _ => format!("deleted {name}"),
                        }
                    },
                )
            }
            VolumeCmd::Attach { name, force } => (
                call(
                    &c,
                    "POST",
                    &format!("/v1/volumes/{}/attach", seg(&name)),
                    force.then(|| json!({ "force": true })),
                )?,
                |v| v["device"].as_str().unwrap_or_default().to_string(),
            ),
            VolumeCmd::Detach { name } => (
                call(
                    &c,
                    "POST",
                    &format!("/v1/volumes/{}/detach", seg(&name)),
                    None,
                )?,
                render_volume,
            ),
            VolumeCmd::Verify { name, repair } => (
                call(
                    &c,
                    "POST",
                    &format!("/v1/volumes/{}/verify?repair={repair}", seg(&name)),
                    None,
                )?,
                |v| {
                    let bad = v["mismatched_extents"].as_array().map_or(0, |a| a.len());
                    let mut out = format!(
                        "{} extents compared across {} healthy replicas: {}",
                        s(&v["extents_compared"]),
                        s(&v["replicas_compared"]),
                        if bad == 0 {
                            "consistent".to_string()
                        } else {
                            format!("{bad} differ: {}", v["mismatched_extents"])
                        }
                    );
                    for r in v["repaired"].as_array().into_iter().flatten() {
                        let targets: Vec<&str> = r["targets"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter_map(|t| t.as_str())
                            .collect();
                        out += &format!(
                            "\nrepaired extent {}: {} rewritten from {} ({})",
                            s(&r["extent"]),
                            targets.join(", "),
                            s(&r["source"]),
                            if r["majority"] == true {
                                "the copy a majority holds"
                            } else {
                                "no majority: the copy reads were served from"
                            }
                        );
                    }
                    out
                },
            ),
            VolumeCmd::Mount { name, path, force } => {
                let mut body = json!({ "path": absolute(path)? });
                if force {
                    body["force"] = json!(true);
                }
                (
                    call(
                        &c,
                        "POST",
                        &format!("/v1/volumes/{}/mount", seg(&name)),
                        Some(body),
                    )?,
                    render_volume,
                )
            }
            VolumeCmd::Unmount { name, path } => {
                let body = json!({ "path": absolute(path)? });
                (
                    call(
                        &c,
                        "POST",
                        &format!("/v1/volumes/{}/unmount", seg(&name)),
                        Some(body),
                    )?,
                    render_volume,
                )
            }
        },
    };
    match output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&v).expect("serialisable")
        ),
        Output::Table => println!("{}", render(&v)),
    }
    Ok(())
}

fn bytes(v: &Value) -> String {
    ByteSize(v.as_u64().unwrap_or(0)).to_string()
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
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

fn render_volumes(v: &Value) -> String {
    let rows = v
        .as_array()
        .map(|a| {
            a.iter()
                .map(|x| {
                    vec![
                        s(&x["name"]),
                        bytes(&x["size_bytes"]),
                        s(&x["fs"]),
                        s(&x["state"]),
                        s(&x["device"]),
                        bytes(&x["allocated_bytes"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    table(
        &["NAME", "SIZE", "FS", "STATE", "DEVICE", "ALLOCATED"],
        rows,
    )
}

fn render_volume(v: &Value) -> String {
    let mounts = v["mounts"]
        .as_array()
        .map(|m| m.iter().map(s).collect::<Vec<_>>().join(", "))
        .unwrap_or_default();
    let mut rows = vec![
        ("Name", s(&v["name"])),
        ("ID", s(&v["id"])),
        (
            "Size",
            format!(
                "{} ({} bytes)",
                bytes(&v["size_bytes"]),
                s(&v["size_bytes"])
            ),
        ),
        ("Filesystem", s(&v["fs"])),
        ("Formatted", s(&v["formatted"])),
        ("State", s(&v["state"])),
        ("Device", s(&v["device"])),
        (
            "Mounts",
            if mounts.is_empty() {
                "-".into()
            } else {
                mounts
            },
        ),
        ("Allocated", bytes(&v["allocated_bytes"])),
        ("Epoch", s(&v["epoch"])),
        ("Attached node", s(&v["attached_node"])),
        ("Read by", {
            let r: Vec<&str> = v["readers"]
                .as_array()
                .map(|a| a.iter().filter_map(|n| n.as_str()).collect())
                .unwrap_or_default();
            if r.is_empty() {
                "-".into()
            } else {
                r.join(", ")
            }
        }),
        ("Replicas", render_replicas(&v["replicas"])),
    ];
    if let Some(c) = v["csi_name"].as_str() {
        rows.insert(1, ("CSI name", c.to_string()));
    }
    rows.iter()
        .map(|(k, val)| format!("{k:<14}{val}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// One line per replica: node, state, and a progress bar while rebuilding.
fn render_replicas(r: &Value) -> String {
    let Some(list) = r.as_array() else {
        return "-".into();
    };
    list.iter()
        .map(|x| {
            let mut line = format!("{:<12}{}", s(&x["node"]), s(&x["state"]));
            if let Some(p) = x["rebuild_progress"].as_f64() {
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
        let v = call(c, "GET", path, None)?;
        println!("{}\n", render_volume(&v));
        let healthy = v["replicas"]
            .as_array()
            .is_some_and(|l| l.iter().all(|x| x["state"] == "healthy"));
        if healthy {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

fn render_pool(v: &Value) -> String {
    let head = format!(
        "Pool {}: capacity {}, allocated {}, free {}, provisioned {} (extent {})\n",
        s(&v["id"]),
        bytes(&v["capacity_bytes"]),
        bytes(&v["allocated_bytes"]),
        bytes(&v["free_bytes"]),
        bytes(&v["provisioned_bytes"]),
        bytes(&v["extent_size_bytes"]),
    );
    let rows = v["devices"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|d| {
                    vec![
                        s(&d["index"]),
                        s(&d["path"]),
                        s(&d["kind"]),
                        bytes(&d["capacity_bytes"]),
                        bytes(&d["allocated_bytes"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    head + &table(&["INDEX", "PATH", "KIND", "CAPACITY", "ALLOCATED"], rows)
}

fn render_nodes(v: &Value) -> String {
    let now = crate::types::now_unix_ms();
    let rows = v
        .as_array()
        .map(|a| {
            a.iter()
                .map(|n| {
                    let labels = n["labels"]
                        .as_object()
                        .map(|m| {
                            m.iter()
                                .map(|(k, v)| format!("{k}={}", s(v)))
                                .collect::<Vec<_>>()
                                .join(",")
                        })
                        .unwrap_or_default();
                    let age = now.saturating_sub(n["last_heartbeat_unix_ms"].as_u64().unwrap_or(0))
                        / 1000;
                    vec![
                        s(&n["name"]),
                        s(&n["id"]),
                        s(&n["address"]),
                        if labels.is_empty() {
                            "-".into()
                        } else {
                            labels
                        },
                        s(&n["role"]),
                        s(&n["state"]),
                        format!(
                            "{} / {}",
                            bytes(&n["pool_allocated_bytes"]),
                            bytes(&n["pool_capacity_bytes"])
                        ),
                        format!("{age}s ago"),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
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

fn render_cluster(v: &Value) -> String {
    let head = [
        ("Cluster ID", s(&v["cluster_id"])),
        ("Leader", s(&v["leader"])),
        ("Term", s(&v["term"])),
        ("Commit index", s(&v["commit_index"])),
        ("Applied index", s(&v["applied_index"])),
    ]
    .iter()
    .map(|(k, val)| format!("{k:<15}{val}"))
    .collect::<Vec<_>>()
    .join("\n");
    let rows = v["members"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|m| vec![s(&m["name"]), s(&m["id"]), s(&m["raft_id"]), s(&m["role"])])
                .collect()
        })
        .unwrap_or_default();
    format!(
        "{head}\n\n{}",
        table(&["MEMBER", "ID", "RAFT ID", "ROLE"], rows)
    )
}

fn render_node(v: &Value) -> String {
    [
        ("Name", s(&v["name"])),
        ("ID", s(&v["id"])),
        ("Version", s(&v["version"])),
        ("Data dir", s(&v["data_dir"])),
        ("API", s(&v["api_listen"])),
        ("NBD socket", s(&v["nbd_socket"])),
        ("NBD TCP", s(&v["nbd_listen"])),
        (
            "Volumes",
            format!(
                "{} ({} attached here)",
                s(&v["volumes"]),
                s(&v["attached_volumes"])
            ),
        ),
        (
            "Pool",
            format!(
                "{} allocated of {}",
                bytes(&v["pool_allocated_bytes"]),
                bytes(&v["pool_capacity_bytes"])
            ),
        ),
        ("Uptime", format!("{}s", s(&v["uptime_seconds"]))),
    ]
    .iter()
    .map(|(k, val)| format!("{k:<12}{val}"))
    .collect::<Vec<_>>()
    .join("\n")
}
