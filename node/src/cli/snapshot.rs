//! `cairn snapshot …` and `cairn volume revert`: clients of the snapshot
//! endpoints. A snapshot is named `VOLUME@SNAPSHOT` on the command line.

use cairn_proto::api;
use clap::Subcommand;
use serde_json::json;

use super::{bytes, call, list, seg, show, table, Client, Output, NONE};

#[derive(Subcommand, Debug)]
pub enum SnapshotCmd {
    /// Take a snapshot of a volume (attached anywhere, or detached): every
    /// write acknowledged before it started is in it, none after.
    Create {
        volume: String,
        name: String,
        /// Do not freeze the mounted filesystem around the snapshot (the
        /// snapshot is then crash-consistent only).
        #[arg(long)]
        no_freeze: bool,
    },
    /// List snapshots (every volume's, or one volume's).
    Ls { volume: Option<String> },
    /// Show one snapshot.
    Inspect {
        #[arg(value_name = "VOLUME@SNAPSHOT", value_parser = parse_ref)]
        snapshot: (String, String),
    },
    /// Delete a snapshot and free the space only it holds.
    Rm {
        #[arg(value_name = "VOLUME@SNAPSHOT", value_parser = parse_ref)]
        snapshot: (String, String),
    },
}

/// `VOLUME@SNAPSHOT`, both parts non-empty (their names are checked by the
/// daemon).
pub fn parse_ref(s: &str) -> Result<(String, String), String> {
    match s.split_once('@') {
        Some((v, n)) if !v.is_empty() && !n.is_empty() && !n.contains('@') => {
            Ok((v.to_string(), n.to_string()))
        }
        _ => Err(format!(
            "{s:?} is not VOLUME@SNAPSHOT (a volume name, @, a snapshot name)"
        )),
    }
}

fn path(volume: &str, name: &str) -> String {
    format!("/v1/volumes/{}/snapshots/{}", seg(volume), seg(name))
}

pub fn exec(c: &Client, output: Output, cmd: SnapshotCmd) -> Result<(), String> {
    match cmd {
        SnapshotCmd::Create {
            volume,
            name,
            no_freeze,
        } => {
            let body = api::SnapshotCreate {
                name,
                freeze: !no_freeze,
            };
            show(
                output,
                &call::<api::SnapshotInfo>(
                    c,
                    "POST",
                    &format!("/v1/volumes/{}/snapshots", seg(&volume)),
                    Some(&body),
                )?,
                render_snapshot,
            )
        }
        SnapshotCmd::Ls { volume } => {
            let p = match &volume {
                Some(v) => format!("/v1/volumes/{}/snapshots", seg(v)),
                None => "/v1/snapshots".into(),
            };
            show(
                output,
                &call::<Vec<api::SnapshotInfo>>(c, "GET", &p, NONE)?,
                |v| render_snapshots(v),
            )
        }
        SnapshotCmd::Inspect {
            snapshot: (volume, name),
        } => show(
            output,
            &call::<api::SnapshotInfo>(c, "GET", &path(&volume, &name), NONE)?,
            render_snapshot,
        ),
        SnapshotCmd::Rm {
            snapshot: (volume, name),
        } => {
            let r = call::<Option<api::SnapshotDeleted>>(c, "DELETE", &path(&volume, &name), NONE)?;
            let pending = r.map(|d| d.space_pending_on).unwrap_or_default();
            show(
                output,
                &json!({ "deleted": format!("{volume}@{name}"), "space_pending_on": pending }),
                |_| {
                    if pending.is_empty() {
                        format!("deleted {volume}@{name}")
                    } else {
                        format!(
                            "deleted {volume}@{name}; its space on {} is freed when they answer again",
                            pending.join(", ")
                        )
                    }
                },
            )
        }
    }
}

/// `cairn volume revert NAME --snapshot S`.
pub fn revert(c: &Client, output: Output, volume: &str, snapshot: String) -> Result<(), String> {
    let body = api::RevertRequest { snapshot };
    show(
        output,
        &call::<api::VolumeInfo>(
            c,
            "POST",
            &format!("/v1/volumes/{}/revert", seg(volume)),
            Some(&body),
        )?,
        super::render_volume,
    )
}

/// How long ago `unix_ms` was, kubectl-style (`42s`, `5m`, `3h`, `12d`).
fn age(unix_ms: u64) -> String {
    let s = crate::types::now_unix_ms().saturating_sub(unix_ms) / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

fn space(b: Option<u64>) -> String {
    b.map(bytes).unwrap_or_else(|| "-".into())
}

fn render_snapshots(v: &[api::SnapshotInfo]) -> String {
    let rows = v
        .iter()
        .map(|x| {
            vec![
                format!("{}@{}", x.volume, x.name),
                bytes(x.size_bytes),
                if x.ready { "yes" } else { "no" }.into(),
                age(x.created_unix_ms),
                x.replicas.len().to_string(),
                space(x.exclusive_bytes),
            ]
        })
        .collect();
    table(
        &["SNAPSHOT", "SIZE", "READY", "AGE", "REPLICAS", "EXCLUSIVE"],
        rows,
    )
}

fn render_snapshot(x: &api::SnapshotInfo) -> String {
    let rows = [
        ("Snapshot", format!("{}@{}", x.volume, x.name)),
        ("ID", x.id.clone()),
        ("Volume ID", x.volume_id.clone()),
        (
            "Size",
            format!("{} ({} bytes)", bytes(x.size_bytes), x.size_bytes),
        ),
        ("Ready", x.ready.to_string()),
        ("Created", format!("{} ago", age(x.created_unix_ms))),
        ("Replicas", list(&x.replicas)),
        ("Held", space(x.held_bytes)),
        ("Exclusive", space(x.exclusive_bytes)),
    ];
    rows.iter()
        .map(|(k, val)| format!("{k:<14}{val}"))
        .collect::<Vec<_>>()
        .join("\n")
}
