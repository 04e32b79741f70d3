//! Snapshots and clones through CSI: CreateSnapshot / DeleteSnapshot /
//! ListSnapshots with their idempotency, filters, paging and error codes,
//! and CreateVolume from a snapshot and from a volume (the clone holds the
//! source's data; a repeat with another source is ALREADY_EXISTS).

use super::*;

fn snap_req(volume: &str, name: &str) -> CreateSnapshotRequest {
    CreateSnapshotRequest {
        source_volume_id: volume.into(),
        name: name.into(),
        ..Default::default()
    }
}

fn from(source: volume_content_source::Type, name: &str, bytes: i64) -> CreateVolumeRequest {
    let mut r = create_req(name, bytes, block_cap(), &[("replicas", "1")]);
    r.volume_content_source = Some(VolumeContentSource {
        r#type: Some(source),
    });
    r
}

fn of_snapshot(id: &str) -> volume_content_source::Type {
    volume_content_source::Type::Snapshot(volume_content_source::SnapshotSource {
        snapshot_id: id.into(),
    })
}

fn of_volume(id: &str) -> volume_content_source::Type {
    volume_content_source::Type::Volume(volume_content_source::VolumeSource {
        volume_id: id.into(),
    })
}

fn device_sha(n: &TestNode, volume: &str) -> String {
    let dev = n.cli_ok(&["volume", "attach", volume]).trim().to_string();
    let s = sh_ok(&format!(
        "dd if={dev} bs=1M iflag=direct status=none | sha256sum"
    ));
    n.cli_ok(&["volume", "detach", volume]);
    s
}

#[test]
fn snapshots_and_clones_through_csi() {
    let nodes = cluster_with("csi-snap", &["512MiB", "512MiB"], 141);
    let n0 = &nodes[0];
    let c = Csi::connect(&n0.csi_socket());
    let ctl = || c.ctl();
    use Code::*;

    let caps = c.ok(
        "ControllerGetCapabilities",
        ctl().controller_get_capabilities(ControllerGetCapabilitiesRequest {}),
    );
    let has = |t: controller_service_capability::rpc::Type| {
        caps.capabilities.iter().any(|x| {
            x.r#type
                == Some(controller_service_capability::Type::Rpc(
                    controller_service_capability::Rpc { r#type: t as i32 },
                ))
        })
    };
    use controller_service_capability::rpc::Type as T;
    assert!(has(T::CreateDeleteSnapshot) && has(T::ListSnapshots) && has(T::CloneVolume));

    c.ok(
        "CreateVolume",
        ctl().create_volume(create_req(
            "pvc-src",
            32 * MIB,
            block_cap(),
            &[("replicas", "1")],
        )),
    );
    let dev = n0
        .cli_ok(&["volume", "attach", "pvc-src"])
        .trim()
        .to_string();
    sh_ok(&format!(
        "dd if=/dev/urandom of={dev} bs=1M count=20 oflag=direct status=none"
    ));
    n0.cli_ok(&["volume", "detach", "pvc-src"]);
    let at_snapshot = device_sha(n0, "pvc-src");

    // CreateSnapshot, and its repeat.
    let s = c
        .ok(
            "CreateSnapshot",
            ctl().create_snapshot(snap_req("pvc-src", "snapshot-1")),
        )
        .snapshot
        .expect("snapshot");
    assert_eq!(s.snapshot_id, "pvc-src@snapshot-1");
    assert_eq!(s.source_volume_id, "pvc-src");
    assert_eq!(s.size_bytes, 32 * MIB);
    assert!(s.ready_to_use);
    assert!(s.creation_time.as_ref().is_some_and(|t| t.seconds > 0));
    let again = c
        .ok(
            "CreateSnapshot again",
            ctl().create_snapshot(snap_req("pvc-src", "snapshot-1")),
        )
        .snapshot
        .expect("snapshot");
    assert_eq!(again, s);
    // A CO name that is not a snapshot name maps to one, the same each time.
    let odd = "Snap shot/2";
    let s2 = c
        .ok(
            "CreateSnapshot odd name",
            ctl().create_snapshot(snap_req("pvc-src", odd)),
        )
        .snapshot
        .expect("snapshot");
    assert_eq!(
        c.ok("again", ctl().create_snapshot(snap_req("pvc-src", odd)))
            .snapshot
            .expect("snapshot")
            .snapshot_id,
        s2.snapshot_id
    );
    c.ok(
        "CreateVolume other",
        ctl().create_volume(create_req(
            "pvc-other",
            16 * MIB,
            block_cap(),
            &[("replicas", "1")],
        )),
    );
    c.fails(
        "name taken on another volume",
        AlreadyExists,
        ctl().create_snapshot(snap_req("pvc-other", "snapshot-1")),
    );
    c.fails(
        "unknown source volume",
        NotFound,
        ctl().create_snapshot(snap_req("pvc-none", "snapshot-9")),
    );
    c.fails(
        "no name",
        InvalidArgument,
        ctl().create_snapshot(snap_req("pvc-src", "")),
    );
    c.fails(
        "no source",
        InvalidArgument,
        ctl().create_snapshot(snap_req("", "x")),
    );
    let mut r = snap_req("pvc-src", "snapshot-3");
    r.parameters = params(&[("colour", "blue")]);
    c.fails(
        "unknown parameter",
        InvalidArgument,
        ctl().create_snapshot(r),
    );

    // ListSnapshots: filters and paging.
    let list = |r: ListSnapshotsRequest| c.ok("ListSnapshots", ctl().list_snapshots(r));
    let all = list(ListSnapshotsRequest::default());
    assert_eq!(all.entries.len(), 2, "{all:?}");
    let by_id = list(ListSnapshotsRequest {
        snapshot_id: s.snapshot_id.clone(),
        ..Default::default()
    });
    assert_eq!(by_id.entries.len(), 1);
    assert_eq!(by_id.entries[0].snapshot.as_ref(), Some(&s));
    let none = list(ListSnapshotsRequest {
        snapshot_id: "pvc-src@nope".into(),
        ..Default::default()
    });
    assert!(none.entries.is_empty());
    assert!(list(ListSnapshotsRequest {
        source_volume_id: "pvc-other".into(),
        ..Default::default()
    })
    .entries
    .is_empty());
    let p1 = list(ListSnapshotsRequest {
        max_entries: 1,
        ..Default::default()
    });
    assert_eq!(p1.entries.len(), 1);
    assert!(!p1.next_token.is_empty());
    let p2 = list(ListSnapshotsRequest {
        max_entries: 1,
        starting_token: p1.next_token.clone(),
        ..Default::default()
    });
    assert_eq!(p2.entries.len(), 1);
    assert!(p2.next_token.is_empty());
    assert_ne!(p1.entries[0], p2.entries[0]);
    c.fails(
        "bad token",
        Aborted,
        ctl().list_snapshots(ListSnapshotsRequest {
            starting_token: "garbage".into(),
            ..Default::default()
        }),
    );
    c.fails(
        "negative max_entries",
        InvalidArgument,
        ctl().list_snapshots(ListSnapshotsRequest {
            max_entries: -1,
            ..Default::default()
        }),
    );

    // The source changes after the snapshot.
    let dev = n0
        .cli_ok(&["volume", "attach", "pvc-src"])
        .trim()
        .to_string();
    sh_ok(&format!(
        "dd if=/dev/urandom of={dev} bs=1M count=4 oflag=direct status=none"
    ));
    n0.cli_ok(&["volume", "detach", "pvc-src"]);
    let source_now = device_sha(n0, "pvc-src");
    assert_ne!(source_now, at_snapshot);

    // CreateVolume from the snapshot: its size (asked for less), its data.
    let v = c
        .ok(
            "CreateVolume from snapshot",
            ctl().create_volume(from(of_snapshot(&s.snapshot_id), "pvc-c1", 16 * MIB)),
        )
        .volume
        .expect("volume");
    assert_eq!(v.capacity_bytes, 32 * MIB);
    assert_eq!(
        v.content_source,
        Some(VolumeContentSource {
            r#type: Some(of_snapshot(&s.snapshot_id))
        })
    );
    let again = c
        .ok(
            "CreateVolume from snapshot again",
            ctl().create_volume(from(of_snapshot(&s.snapshot_id), "pvc-c1", 16 * MIB)),
        )
        .volume
        .expect("volume");
    assert_eq!(again, v);
    c.fails(
        "the same name with another source",
        AlreadyExists,
        ctl().create_volume(from(of_volume("pvc-src"), "pvc-c1", 16 * MIB)),
    );
    c.fails(
        "the same name without a source",
        AlreadyExists,
        ctl().create_volume(create_req(
            "pvc-c1",
            32 * MIB,
            block_cap(),
            &[("replicas", "1")],
        )),
    );
    c.fails(
        "unknown snapshot",
        NotFound,
        ctl().create_volume(from(of_snapshot("pvc-src@nope"), "pvc-c9", 16 * MIB)),
    );
    c.fails(
        "malformed snapshot id",
        NotFound,
        ctl().create_volume(from(of_snapshot("no-at-sign"), "pvc-c9", 16 * MIB)),
    );
    c.fails(
        "unknown volume",
        NotFound,
        ctl().create_volume(from(of_volume("pvc-none"), "pvc-c9", 16 * MIB)),
    );
    let mut r = from(of_snapshot(&s.snapshot_id), "pvc-c9", 16 * MIB);
    r.capacity_range = Some(CapacityRange {
        required_bytes: 8 * MIB,
        limit_bytes: 16 * MIB,
    });
    c.fails("limit below the source", OutOfRange, ctl().create_volume(r));
    let mut r = from(of_snapshot(&s.snapshot_id), "pvc-c9", 16 * MIB);
    r.volume_capabilities = vec![ext4_cap()];
    c.fails(
        "a filesystem from a raw block source",
        InvalidArgument,
        ctl().create_volume(r),
    );
    assert!(!names(n0).contains(&"pvc-c9".to_string()));
    assert_eq!(device_sha(n0, "pvc-c1"), at_snapshot);

    // CreateVolume from a volume (CLONE_VOLUME): the source as it is now.
    let v2 = c
        .ok(
            "CreateVolume from volume",
            ctl().create_volume(from(of_volume("pvc-src"), "pvc-c2", 32 * MIB)),
        )
        .volume
        .expect("volume");
    assert_eq!(
        v2.content_source,
        Some(VolumeContentSource {
            r#type: Some(of_volume("pvc-src"))
        })
    );
    assert_eq!(device_sha(n0, "pvc-c2"), source_now);
    assert_eq!(device_sha(n0, "pvc-c1"), at_snapshot);

    // DeleteSnapshot: unknown and malformed ids are deleted already.
    let del = |id: &str| {
        let mut client = ctl();
        let r = DeleteSnapshotRequest {
            snapshot_id: id.into(),
            ..Default::default()
        };
        async move { client.delete_snapshot(r).await }
    };
    c.fails("no id", InvalidArgument, del(""));
    c.ok("unknown", del("pvc-src@nope"));
    c.ok("malformed", del("garbage"));
    c.ok("unknown volume", del("pvc-none@x"));
    // A volume with snapshots is deleted, its snapshots kept: still
    // listed, still sources (Kubernetes users delete PVCs whose
    // VolumeSnapshots they keep).
    let before = list(ListSnapshotsRequest::default());
    let delete_src = || {
        let mut client = ctl();
        async move {
            client
                .delete_volume(DeleteVolumeRequest {
                    volume_id: "pvc-src".into(),
                    ..Default::default()
                })
                .await
        }
    };
    c.ok("DeleteVolume with snapshots", delete_src());
    c.ok("DeleteVolume with snapshots again", delete_src());
    assert!(!names(n0).contains(&"pvc-src".to_string()));
    assert_eq!(
        n0.api("GET", "/v1/volumes/pvc-src", None).0,
        404,
        "a deleted volume is not shown"
    );
    assert_eq!(list(ListSnapshotsRequest::default()), before);
    let lv = c.ok(
        "ListVolumes",
        ctl().list_volumes(ListVolumesRequest::default()),
    );
    assert!(lv
        .entries
        .iter()
        .all(|e| e.volume.as_ref().is_some_and(|v| v.volume_id != "pvc-src")));
    c.ok(
        "CreateVolume from a deleted volume's snapshot",
        ctl().create_volume(from(of_snapshot(&s.snapshot_id), "pvc-c3", 32 * MIB)),
    );
    assert_eq!(device_sha(n0, "pvc-c3"), at_snapshot);
    c.fails(
        "CreateVolume from the deleted volume itself",
        NotFound,
        ctl().create_volume(from(of_volume("pvc-src"), "pvc-c4", 32 * MIB)),
    );
    wait_for("the clones filled", Duration::from_secs(60), || {
        ["pvc-c1", "pvc-c2", "pvc-c3"]
            .iter()
            .all(|v| n0.inspect(v)["origin"]["filling"] == serde_json::json!([]))
    });
    for id in [s.snapshot_id.as_str(), s2.snapshot_id.as_str()] {
        c.ok("DeleteSnapshot", del(id));
        c.ok("DeleteSnapshot again", del(id));
    }
    assert!(list(ListSnapshotsRequest::default()).entries.is_empty());
    // The last snapshot took the deleted volume along: its name is free.
    c.ok(
        "CreateVolume with the freed name",
        ctl().create_volume(create_req("pvc-src", 16 * MIB, block_cap(), &[])),
    );
    for v in ["pvc-c1", "pvc-c2", "pvc-c3", "pvc-other", "pvc-src"] {
        c.ok(
            "DeleteVolume",
            ctl().delete_volume(DeleteVolumeRequest {
                volume_id: v.into(),
                ..Default::default()
            }),
        );
    }
}
