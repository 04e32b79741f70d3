//! Access modes, per-node limits, volume conditions and ranges.

use super::*;

#[test]
fn read_only_many_after_a_writer() {
    let nodes = cluster_with("csi-rox", &["512MiB", "512MiB", "512MiB"], 141);
    let csi: Vec<Csi> = nodes
        .iter()
        .map(|n| Csi::connect(&n.csi_socket()))
        .collect();
    let c1 = &csi[0];
    let rox = || cap(Mode::MultiNodeReaderOnly, false, "ext4", &[]);
    let only_readers = create_req("pvc-rox", 64 * MIB, rox(), &[]);
    c1.fails(
        "CreateVolume of a filesystem with only read-only modes",
        Code::InvalidArgument,
        c1.ctl().create_volume(only_readers),
    );
    let mut req = create_req("pvc-rox", 64 * MIB, ext4_cap(), &[("replicas", "2")]);
    req.volume_capabilities.push(rox());
    c1.ok("CreateVolume RWO+ROX", c1.ctl().create_volume(req));

    // A reader before anything was written has no filesystem to read.
    c1.ok(
        "ControllerPublish reader n1",
        c1.ctl()
            .controller_publish_volume(cpublish("pvc-rox", "n1", rox())),
    );
    let early = paths(&nodes[0], "rox-early");
    c1.fails(
        "NodeStage reader of a blank volume",
        Code::FailedPrecondition,
        c1.node()
            .node_stage_volume(stage_req("pvc-rox", &early.staging, rox())),
    );
    c1.ok(
        "ControllerUnpublish reader n1",
        c1.ctl()
            .controller_unpublish_volume(cunpublish("pvc-rox", "n1")),
    );

    // A writer fills it.
    c1.ok(
        "ControllerPublish writer n1",
        c1.ctl()
            .controller_publish_volume(cpublish("pvc-rox", "n1", ext4_cap())),
    );
    let w = paths(&nodes[0], "rox-writer");
    c1.ok(
        "NodeStage writer",
        c1.node()
            .node_stage_volume(stage_req("pvc-rox", &w.staging, ext4_cap())),
    );
    c1.ok(
        "NodePublish writer",
        c1.node().node_publish_volume(publish_req(
            "pvc-rox",
            &w.staging,
            &w.target,
            ext4_cap(),
            false,
        )),
    );
    std::fs::write(w.target.join("shared.txt"), b"read me everywhere").expect("write");
    sh_ok("sync");
    c1.fails(
        "ControllerPublish reader while a writer holds it",
        Code::FailedPrecondition,
        c1.ctl()
            .controller_publish_volume(cpublish("pvc-rox", "n2", rox())),
    );
    teardown_on(c1, "pvc-rox", "n1", &w);

    // Two nodes read at once; writes fail; a writer waits for them.
    let mut held = Vec::new();
    for (i, name) in ["n2", "n3"].into_iter().enumerate() {
        let c = &csi[i + 1];
        c1.ok(
            "ControllerPublish reader",
            c1.ctl()
                .controller_publish_volume(cpublish("pvc-rox", name, rox())),
        );
        let p = paths(&nodes[i + 1], "rox");
        for _ in 0..2 {
            c.ok(
                "NodeStage reader",
                c.node()
                    .node_stage_volume(stage_req("pvc-rox", &p.staging, rox())),
            );
        }
        c.ok(
            "NodePublish reader",
            c.node().node_publish_volume(publish_req(
                "pvc-rox",
                &p.staging,
                &p.target,
                rox(),
                false,
            )),
        );
        held.push((i + 1, name, p));
    }
    for (i, _, p) in &held {
        let text = std::fs::read_to_string(p.target.join("shared.txt")).expect("read");
        assert_eq!(text, "read me everywhere", "reader on n{}", i + 1);
        let err = std::fs::write(p.target.join("x"), b"no").expect_err("read-only");
        assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    }
    let v = nodes[0].inspect("pvc-rox");
    assert_eq!(v["readers"], serde_json::json!(["n2", "n3"]), "{v}");
    let got = c1.ok(
        "ControllerGetVolume",
        c1.ctl().controller_get_volume(ControllerGetVolumeRequest {
            volume_id: "pvc-rox".into(),
        }),
    );
    assert_eq!(
        got.status.expect("status").published_node_ids,
        vec!["n2", "n3"]
    );
    c1.fails(
        "ControllerPublish writer to a node that holds it read-only",
        Code::AlreadyExists,
        c1.ctl()
            .controller_publish_volume(cpublish("pvc-rox", "n2", ext4_cap())),
    );
    c1.fails(
        "ControllerPublish writer while readers hold it",
        Code::FailedPrecondition,
        c1.ctl()
            .controller_publish_volume(cpublish("pvc-rox", "n1", ext4_cap())),
    );
    c1.fails(
        "DeleteVolume while readers hold it",
        Code::FailedPrecondition,
        c1.ctl().delete_volume(DeleteVolumeRequest {
            volume_id: "pvc-rox".into(),
            secrets: HashMap::new(),
        }),
    );
    for (i, name, p) in &held {
        teardown_on(&csi[*i], "pvc-rox", name, p);
    }
    let v = nodes[0].inspect("pvc-rox");
    assert_eq!(v["readers"], serde_json::json!([]), "{v}");

    // Then a writer again, and the data is intact.
    c1.ok(
        "ControllerPublish writer after the readers",
        c1.ctl()
            .controller_publish_volume(cpublish("pvc-rox", "n1", ext4_cap())),
    );
    c1.ok(
        "NodeStage writer again",
        c1.node()
            .node_stage_volume(stage_req("pvc-rox", &w.staging, ext4_cap())),
    );
    c1.ok(
        "NodePublish writer again",
        c1.node().node_publish_volume(publish_req(
            "pvc-rox",
            &w.staging,
            &w.target,
            ext4_cap(),
            false,
        )),
    );
    assert_eq!(
        std::fs::read_to_string(w.target.join("shared.txt")).expect("read"),
        "read me everywhere"
    );
    teardown_on(c1, "pvc-rox", "n1", &w);
    c1.ok(
        "DeleteVolume",
        c1.ctl().delete_volume(DeleteVolumeRequest {
            volume_id: "pvc-rox".into(),
            secrets: HashMap::new(),
        }),
    );
}

/// Access modes that limit who may hold a volume, the per-node volume limit
/// (RESOURCE_EXHAUSTED), a degraded volume reported abnormal, expansion
/// ranges, stats of paths that do not hold the volume, and the required
/// fields the other tests leave out.
#[test]
fn access_limits_conditions_and_ranges() {
    let mut nodes = cluster_args(
        "csi-lim",
        &["512MiB", "512MiB", "512MiB"],
        151,
        &["--csi-max-volumes", "1"],
    );
    let csi: Vec<Csi> = nodes
        .iter()
        .map(|n| Csi::connect(&n.csi_socket()))
        .collect();
    let (c1, c2) = (&csi[0], &csi[1]);
    use Code::*;

    // One volume per node: a second publish to n1 is RESOURCE_EXHAUSTED;
    // a repeat of the first is not a new volume.
    let info = c1.ok(
        "NodeGetInfo",
        c1.node().node_get_info(NodeGetInfoRequest {}),
    );
    assert_eq!(info.max_volumes_per_node, 1);
    for name in ["pvc-a", "pvc-b"] {
        c1.ok(
            "CreateVolume",
            c1.ctl()
                .create_volume(create_req(name, 32 * MIB, block_cap(), &[])),
        );
    }
    for _ in 0..2 {
        c1.ok(
            "ControllerPublish a to n1",
            c1.ctl()
                .controller_publish_volume(cpublish("pvc-a", "n1", block_cap())),
        );
    }
    let m = c1.fails(
        "ControllerPublish b to a full n1",
        ResourceExhausted,
        c1.ctl()
            .controller_publish_volume(cpublish("pvc-b", "n1", block_cap())),
    );
    assert!(m.contains("(1)"), "{m}");
    assert!(nodes[0].inspect("pvc-b")["attachment"].is_null());
    c1.ok(
        "ControllerUnpublish a",
        c1.ctl()
            .controller_unpublish_volume(cunpublish("pvc-a", "n1")),
    );

    // SINGLE_NODE_READER_ONLY: one node at a time.
    let sro = || cap(Mode::SingleNodeReaderOnly, true, "", &[]);
    for _ in 0..2 {
        c1.ok(
            "ControllerPublish b single reader n2",
            c1.ctl()
                .controller_publish_volume(cpublish("pvc-b", "n2", sro())),
        );
    }
    let m = c1.fails(
        "a second node for SINGLE_NODE_READER_ONLY",
        FailedPrecondition,
        c1.ctl()
            .controller_publish_volume(cpublish("pvc-b", "n3", sro())),
    );
    assert!(m.contains("SINGLE_NODE_READER_ONLY"), "{m}");
    c1.ok(
        "ControllerUnpublish b",
        c1.ctl()
            .controller_unpublish_volume(cunpublish("pvc-b", "n2")),
    );

    // SINGLE_NODE_SINGLE_WRITER refuses a second read-write target;
    // SINGLE_NODE_MULTI_WRITER serves two targets of one filesystem.
    let rwop = || cap(Mode::SingleNodeSingleWriter, false, "ext4", &[]);
    let rwx1 = || cap(Mode::SingleNodeMultiWriter, false, "ext4", &[]);
    // On n2, so that n3 going down later leaves it alone.
    let mut one = create_req("pvc-one", 64 * MIB, rwop(), &[]);
    one.accessibility_requirements = Some(TopologyRequirement {
        requisite: vec![node_topology("n2")],
        preferred: Vec::new(),
    });
    c1.ok("CreateVolume rwop", c1.ctl().create_volume(one));
    c1.ok(
        "ControllerPublish rwop to n2",
        c1.ctl()
            .controller_publish_volume(cpublish("pvc-one", "n2", rwop())),
    );
    let p = paths(&nodes[1], "one");
    let second = nodes[1].dir.join("kubelet/pods/one-2/mount");
    c2.ok(
        "NodeStage rwop",
        c2.node()
            .node_stage_volume(stage_req("pvc-one", &p.staging, rwop())),
    );
    c2.ok(
        "NodePublish rwop",
        c2.node()
            .node_publish_volume(publish_req("pvc-one", &p.staging, &p.target, rwop(), false)),
    );
    let m = c2.fails(
        "a second read-write target of SINGLE_NODE_SINGLE_WRITER",
        FailedPrecondition,
        c2.node()
            .node_publish_volume(publish_req("pvc-one", &p.staging, &second, rwop(), false)),
    );
    assert!(m.contains("SINGLE_NODE_SINGLE_WRITER"), "{m}");
    assert!(
        mount_options(&second).is_none(),
        "the refused target got a mount"
    );
    c2.ok(
        "NodePublish the second target as SINGLE_NODE_MULTI_WRITER",
        c2.node()
            .node_publish_volume(publish_req("pvc-one", &p.staging, &second, rwx1(), false)),
    );
    std::fs::write(p.target.join("both.txt"), b"one filesystem").expect("write");
    assert_eq!(
        std::fs::read_to_string(second.join("both.txt")).expect("read"),
        "one filesystem"
    );

    // Stats: the same answer twice; NOT_FOUND for a directory that exists
    // but does not hold the volume.
    let stats = |path: &Path| NodeGetVolumeStatsRequest {
        volume_id: "pvc-one".into(),
        volume_path: path.to_string_lossy().into(),
        staging_target_path: p.staging.to_string_lossy().into(),
    };
    let a = c2.ok("stats", c2.node().node_get_volume_stats(stats(&p.target)));
    let b = c2.ok(
        "stats again",
        c2.node().node_get_volume_stats(stats(&p.target)),
    );
    assert_eq!(a, b);
    let elsewhere = nodes[1].dir.join("kubelet/not-a-mount");
    std::fs::create_dir_all(&elsewhere).expect("dir");
    c2.fails(
        "stats of a directory without the volume",
        NotFound,
        c2.node().node_get_volume_stats(stats(&elsewhere)),
    );

    // Expansion ranges.
    let expand = |required: i64, limit: i64| ControllerExpandVolumeRequest {
        volume_id: "pvc-one".into(),
        capacity_range: Some(CapacityRange {
            required_bytes: required,
            limit_bytes: limit,
        }),
        ..Default::default()
    };
    c1.fails(
        "expand under a limit below the size",
        OutOfRange,
        c1.ctl().controller_expand_volume(expand(0, 16 * MIB)),
    );
    c1.fails(
        "expand with a negative limit",
        InvalidArgument,
        c1.ctl().controller_expand_volume(expand(0, -1)),
    );
    c1.fails(
        "expand beyond the maximum size",
        OutOfRange,
        c1.ctl().controller_expand_volume(expand(1 << 60, 0)),
    );
    c2.fails(
        "NodeExpand beyond the recorded size",
        OutOfRange,
        c2.node().node_expand_volume(NodeExpandVolumeRequest {
            volume_id: "pvc-one".into(),
            volume_path: p.target.to_string_lossy().into(),
            capacity_range: Some(CapacityRange {
                required_bytes: 128 * MIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        }),
    );
    assert_eq!(nodes[0].inspect("pvc-one")["size_bytes"], 64 * MIB);

    // GetCapacity and Probe answer the same twice; a malformed capability
    // is INVALID_ARGUMENT rather than "no capacity".
    let capacity = || GetCapacityRequest {
        volume_capabilities: vec![fs_cap()],
        parameters: HashMap::new(),
        accessible_topology: Some(node_topology("n3")),
    };
    let a = c1.ok("GetCapacity", c1.ctl().get_capacity(capacity()));
    let b = c1.ok("GetCapacity again", c1.ctl().get_capacity(capacity()));
    assert_eq!(a, b);
    let mut bad = capacity();
    bad.volume_capabilities = vec![VolumeCapability {
        access_mode: None,
        access_type: Some(AccessType::Block(BlockVolume {})),
    }];
    c1.fails(
        "GetCapacity with a malformed capability",
        InvalidArgument,
        c1.ctl().get_capacity(bad),
    );
    let a = c1.ok("Probe", c1.id().probe(ProbeRequest {}));
    let b = c1.ok("Probe again", c1.id().probe(ProbeRequest {}));
    assert_eq!(a, b);

    // Required fields the other tests do not cover.
    c1.fails(
        "ControllerPublish without volume id",
        InvalidArgument,
        c1.ctl()
            .controller_publish_volume(cpublish("", "n1", block_cap())),
    );
    c2.fails(
        "NodeStage without volume id",
        InvalidArgument,
        c2.node()
            .node_stage_volume(stage_req("", &p.staging, rwop())),
    );
    c2.fails(
        "NodeUnstage without staging path",
        InvalidArgument,
        c2.node().node_unstage_volume(NodeUnstageVolumeRequest {
            volume_id: "pvc-one".into(),
            staging_target_path: String::new(),
        }),
    );
    let mut no_cap = publish_req("pvc-one", &p.staging, &p.target, rwop(), false);
    no_cap.volume_capability = None;
    c2.fails(
        "NodePublish without capability",
        InvalidArgument,
        c2.node().node_publish_volume(no_cap),
    );
    c2.fails(
        "NodeUnpublish without volume id",
        InvalidArgument,
        c2.node().node_unpublish_volume(NodeUnpublishVolumeRequest {
            volume_id: String::new(),
            target_path: p.target.to_string_lossy().into(),
        }),
    );
    c2.fails(
        "NodeExpand without volume id",
        InvalidArgument,
        c2.node().node_expand_volume(NodeExpandVolumeRequest {
            volume_path: p.target.to_string_lossy().into(),
            ..Default::default()
        }),
    );

    // A replica's node going down makes the volume abnormal in both
    // ControllerGetVolume and NodeGetVolumeStats, and normal again once it
    // is rebuilt.
    c2.ok(
        "NodeUnpublish second",
        c2.node().node_unpublish_volume(NodeUnpublishVolumeRequest {
            volume_id: "pvc-one".into(),
            target_path: second.to_string_lossy().into(),
        }),
    );
    c1.ok(
        "ControllerUnpublish a everywhere",
        c1.ctl()
            .controller_unpublish_volume(cunpublish("pvc-a", "")),
    );
    let mut two = create_req("pvc-two", 32 * MIB, block_cap(), &[("replicas", "2")]);
    two.accessibility_requirements = Some(TopologyRequirement {
        requisite: vec![node_topology("n1"), node_topology("n3")],
        preferred: Vec::new(),
    });
    c1.ok(
        "CreateVolume 2 replicas on n1+n3",
        c1.ctl().create_volume(two),
    );
    let condition = |c: &Csi| {
        c.ok(
            "ControllerGetVolume",
            c.ctl().controller_get_volume(ControllerGetVolumeRequest {
                volume_id: "pvc-two".into(),
            }),
        )
        .status
        .and_then(|s| s.volume_condition)
        .expect("condition")
    };
    assert!(!condition(c1).abnormal);
    nodes[2].kill9();
    wait_for(
        "pvc-two to be reported abnormal",
        Duration::from_secs(30),
        || condition(c1).abnormal,
    );
    let why = condition(c1).message;
    assert!(why.contains("n3") && why.contains("offline"), "{why}");
    let node_view = c2.ok(
        "NodeGetVolumeStats while a replica of another volume is down",
        c2.node().node_get_volume_stats(stats(&p.target)),
    );
    assert_eq!(node_view.volume_condition.map(|c| c.abnormal), Some(false));
    nodes[2].restart();
    wait_for(
        "pvc-two to be normal again",
        Duration::from_secs(60),
        || !condition(c1).abnormal,
    );

    teardown_on(c2, "pvc-one", "n2", &p);
    for name in ["pvc-a", "pvc-b", "pvc-one", "pvc-two"] {
        c1.ok(
            "DeleteVolume",
            c1.ctl().delete_volume(DeleteVolumeRequest {
                volume_id: name.into(),
                secrets: HashMap::new(),
            }),
        );
    }
}
