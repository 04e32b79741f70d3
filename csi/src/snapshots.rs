//! Snapshots (CREATE_DELETE_SNAPSHOT, LIST_SNAPSHOTS) and the volume
//! content sources of CreateVolume (a snapshot, or a volume: CLONE_VOLUME).
//!
//! A snapshot's CSI id is `VOLUME@NAME`, where NAME is the CO's name when
//! it is a valid snapshot name, else a deterministic mapping of it (as for
//! volumes), so a repeated CreateSnapshot finds the snapshot it made.

use std::collections::HashMap;

use crate::pb::volume_content_source::{SnapshotSource, Type, VolumeSource};
use crate::pb::*;
use crate::{required, Backend, Error, SnapshotFacts, Source};

/// Parameters the external-snapshotter adds with `--extra-create-metadata`.
const CO_PREFIX: &str = "csi.storage.k8s.io/";

pub fn message(s: &SnapshotFacts) -> Snapshot {
    Snapshot {
        size_bytes: s.size_bytes.min(i64::MAX as u64) as i64,
        snapshot_id: s.id(),
        source_volume_id: s.volume.clone(),
        creation_time: Some(prost_types::Timestamp {
            seconds: (s.created_unix_ms / 1000) as i64,
            nanos: ((s.created_unix_ms % 1000) * 1_000_000) as i32,
        }),
        ready_to_use: s.ready,
        group_snapshot_id: String::new(),
    }
}

/// `VOLUME@NAME` of a snapshot id; `None` when it cannot be one of ours.
pub fn parse_id(id: &str) -> Option<(String, String)> {
    let (v, n) = id.split_once('@')?;
    (!v.is_empty() && !n.is_empty() && !n.contains('@')).then(|| (v.into(), n.into()))
}

/// The content source of a CreateVolume request.
pub fn source_of(c: Option<&VolumeContentSource>) -> Result<Option<Source>, Error> {
    let Some(c) = c else { return Ok(None) };
    match &c.r#type {
        None => Err(Error::InvalidArgument(
            "volume_content_source names neither a snapshot nor a volume".into(),
        )),
        Some(Type::Snapshot(s)) => {
            let id = required("volume_content_source.snapshot.snapshot_id", &s.snapshot_id)?;
            let (volume, name) = parse_id(id)
                .ok_or_else(|| Error::NotFound(format!("snapshot {id:?} does not exist")))?;
            Ok(Some(Source::Snapshot { volume, name }))
        }
        Some(Type::Volume(v)) => {
            let id = required("volume_content_source.volume.volume_id", &v.volume_id)?;
            Ok(Some(Source::Volume(id.into())))
        }
    }
}

/// The CSI message of a content source.
pub fn source_message(s: &Source) -> VolumeContentSource {
    VolumeContentSource {
        r#type: Some(match s {
            Source::Snapshot { volume, name } => Type::Snapshot(SnapshotSource {
                snapshot_id: format!("{volume}@{name}"),
            }),
            Source::Volume(v) => Type::Volume(VolumeSource {
                volume_id: v.clone(),
            }),
        }),
    }
}

/// Size and filesystem of a source, which must exist (NOT_FOUND) and,
/// for a snapshot, be ready.
pub fn source_facts(b: &dyn Backend, s: &Source) -> Result<(u64, String), Error> {
    match s {
        Source::Snapshot { volume, name } => {
            let id = format!("{volume}@{name}");
            let snap = b
                .snapshots()?
                .into_iter()
                .find(|x| x.volume == *volume && x.name == *name)
                .ok_or_else(|| Error::NotFound(format!("snapshot {id:?} does not exist")))?;
            if !snap.ready {
                return Err(Error::Unavailable(format!(
                    "snapshot {id:?} is not ready yet"
                )));
            }
            // (Its volume may have been deleted with its snapshots kept.)
            Ok((snap.size_bytes, snap.fs))
        }
        Source::Volume(name) => {
            let v = b
                .volume(name)?
                .ok_or_else(|| Error::NotFound(format!("volume {name:?} does not exist")))?;
            Ok((v.size_bytes, v.fs))
        }
    }
}

pub fn check_parameters(p: &HashMap<String, String>) -> Result<(), Error> {
    match p.keys().find(|k| !k.starts_with(CO_PREFIX)) {
        Some(k) => Err(Error::InvalidArgument(format!(
            "unknown snapshot parameter {k:?}; snapshots take none"
        ))),
        None => Ok(()),
    }
}

/// CreateSnapshot, run under the source volume's claim: the snapshot of
/// that name when it exists on that volume, ALREADY_EXISTS when the name
/// is another volume's.
pub fn create(b: &dyn Backend, volume: &str, csi_name: &str) -> Result<SnapshotFacts, Error> {
    let name = crate::rules::volume_id_for(csi_name, |n| b.valid_snapshot_name(n))?;
    if b.volume(volume)?.is_none() {
        return Err(Error::NotFound(format!(
            "source volume {volume:?} does not exist"
        )));
    }
    let all = b.snapshots()?;
    if let Some(s) = all.iter().find(|s| s.name == name && s.volume == volume) {
        return Ok(s.clone());
    }
    if let Some(s) = all.iter().find(|s| s.name == name) {
        return Err(Error::AlreadyExists(format!(
            "snapshot name {csi_name:?} is taken by a snapshot of volume {:?}",
            s.volume
        )));
    }
    b.snapshot_create(volume, &name)
}

/// ListSnapshots: by id, by source volume, or all; paged by id.
pub fn list(b: &dyn Backend, req: &ListSnapshotsRequest) -> Result<ListSnapshotsResponse, Error> {
    // Paged by snapshot id.
    let start = crate::rules::page_start(&req.starting_token, req.max_entries)?;
    let mut all: Vec<SnapshotFacts> = b
        .snapshots()?
        .into_iter()
        .filter(|s| req.snapshot_id.is_empty() || s.id() == req.snapshot_id)
        .filter(|s| req.source_volume_id.is_empty() || s.volume == req.source_volume_id)
        .collect();
    all.sort_by_key(|s| s.id());
    let from = start.map_or(0, |s| all.partition_point(|x| x.id() < s));
    let take = match req.max_entries {
        0 => usize::MAX,
        n => n as usize,
    };
    let page: Vec<&SnapshotFacts> = all[from..].iter().take(take).collect();
    let next_token = all
        .get(from + page.len())
        .map(|s| crate::rules::page_token(&s.id()))
        .unwrap_or_default();
    Ok(ListSnapshotsResponse {
        entries: page
            .into_iter()
            .map(|s| list_snapshots_response::Entry {
                snapshot: Some(message(s)),
            })
            .collect(),
        next_token,
    })
}
