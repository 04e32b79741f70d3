//! Kubernetes' lifecycle of filesystem and raw block volumes across nodes.

use super::*;

#[test]
fn filesystem_volume_lifecycle_across_nodes() {
    let nodes = cluster_with("csi-life", &["1GiB", "1GiB", "1GiB"], 131);
    let csi: Vec<Csi> = nodes
        .iter()
        .map(|n| Csi::connect(&n.csi_socket()))
        .collect();
    let c1 = &csi[0];

    // Identity.
    let info = c1.ok(
        "GetPluginInfo",
        c1.id().get_plugin_info(GetPluginInfoRequest {}),
    );
    assert_eq!(info.name, "csi.cairn.dev");
    assert!(!info.vendor_version.is_empty());
    let caps = c1.ok(
        "GetPluginCapabilities",
        c1.id()
            .get_plugin_capabilities(GetPluginCapabilitiesRequest {}),
    );
    assert_eq!(caps.capabilities.len(), 3, "{caps:?}");
    let probe = c1.ok("Probe", c1.id().probe(ProbeRequest {}));
    assert_eq!(probe.ready, Some(true));
    let ni = csi[1].ok(
        "NodeGetInfo",
        csi[1].node().node_get_info(NodeGetInfoRequest {}),
    );
    assert_eq!(ni.node_id, "n2");
    assert_eq!(
        ni.accessible_topology.expect("topology").segments[cairn_csi::TOPOLOGY_NODE],
        "n2"
    );
    assert!(ni.max_volumes_per_node > 0);

    // Create: the size is rounded up to whole MiB; a repeat answers the same,
    // a repeat with other parameters is ALREADY_EXISTS.
    let mut req = create_req("pvc-life", 100 * MIB + 1, fs_cap(), &[("replicas", "2")]);
    let mut exact = create_req("pvc-exact", 100 * MIB + 1, ext4_cap(), &[]);
    let v = c1
        .ok("CreateVolume ext4", c1.ctl().create_volume(exact.clone()))
        .volume
        .expect("v");
    assert_eq!(v.capacity_bytes, 100 * MIB + 4096);
    exact.capacity_range.as_mut().expect("range").limit_bytes = 100 * MIB + 2;
    c1.fails(
        "CreateVolume: no size in range",
        Code::OutOfRange,
        c1.ctl().create_volume(exact),
    );
    req.accessibility_requirements = Some(TopologyRequirement {
        requisite: Vec::new(),
        preferred: vec![node_topology("n3")],
    });
    let created = c1.ok("CreateVolume", c1.ctl().create_volume(req.clone()));
    let vol = created.volume.clone().expect("volume");
    assert_eq!(vol.volume_id, "pvc-life");
    // Cairn sizes are whole 4 KiB blocks, and xfs needs 300 MiB.
    assert_eq!(vol.capacity_bytes, 300 * MIB);
    let again = c1.ok("CreateVolume again", c1.ctl().create_volume(req.clone()));
    assert_eq!(again, created);
    let inspect = nodes[0].inspect("pvc-life");
    let replica_nodes: Vec<&str> = inspect["replicas"]
        .as_array()
        .expect("replicas")
        .iter()
        .map(|r| r["node"].as_str().expect("node"))
        .collect();
    assert_eq!(replica_nodes.len(), 2, "{inspect}");
    assert!(
        replica_nodes.contains(&"n3"),
        "the preferred node holds a replica: {inspect}"
    );
    let mut bigger = req.clone();
    bigger.capacity_range = Some(CapacityRange {
        required_bytes: 500 * MIB,
        limit_bytes: 0,
    });
    c1.fails(
        "CreateVolume, other size",
        Code::AlreadyExists,
        c1.ctl().create_volume(bigger),
    );
    let mut other_fs = req.clone();
    other_fs.volume_capabilities = vec![cap(Mode::SingleNodeWriter, false, "ext4", &[])];
    c1.fails(
        "CreateVolume, other fs",
        Code::AlreadyExists,
        c1.ctl().create_volume(other_fs),
    );

    // Publish to n1 (twice), then n2 is refused while n1 has it.
    for _ in 0..2 {
        let r = c1.ok(
            "ControllerPublishVolume n1",
            c1.ctl()
                .controller_publish_volume(cpublish("pvc-life", "n1", fs_cap())),
        );
        assert!(r.publish_context.is_empty());
    }
    c1.fails(
        "ControllerPublishVolume n2 while on n1",
        Code::FailedPrecondition,
        c1.ctl()
            .controller_publish_volume(cpublish("pvc-life", "n2", fs_cap())),
    );

    // Stage with a mount flag, publish, write.
    let p1 = paths(&nodes[0], "life");
    let flagged = cap(Mode::SingleNodeWriter, false, "xfs", &["noatime"]);
    for _ in 0..2 {
        c1.ok(
            "NodeStageVolume",
            c1.node()
                .node_stage_volume(stage_req("pvc-life", &p1.staging, flagged.clone())),
        );
    }
    let opts = mount_options(&p1.staging).expect("staging is a mount point");
    assert!(opts.contains("noatime"), "mount flags honoured: {opts}");
    for _ in 0..2 {
        c1.ok(
            "NodePublishVolume",
            c1.node().node_publish_volume(publish_req(
                "pvc-life",
                &p1.staging,
                &p1.target,
                fs_cap(),
                false,
            )),
        );
    }
    let data = p1.target.join("data.bin");
    {
        let mut buf = vec![0u8; 8 << 20];
        fill_pattern(&mut buf, 7);
        let mut f = std::fs::File::create(&data).expect("create data");
        f.write_all(&buf).expect("write data");
        f.sync_all().expect("fsync data");
    }
    let want = sha(&data);

    // A read-only publish refuses writes.
    let ro = Paths {
        staging: p1.staging.clone(),
        target: nodes[0].dir.join("kubelet/pods/life-ro/mount"),
    };
    c1.ok(
        "NodePublishVolume readonly",
        c1.node().node_publish_volume(publish_req(
            "pvc-life",
            &ro.staging,
            &ro.target,
            fs_cap(),
            true,
        )),
    );
    assert_eq!(sha(&ro.target.join("data.bin")), want);
    c1.fails(
        "NodePublish at a published target with the other read-only setting",
        Code::AlreadyExists,
        c1.node().node_publish_volume(publish_req(
            "pvc-life",
            &ro.staging,
            &ro.target,
            fs_cap(),
            false,
        )),
    );
    let err = std::fs::File::create(ro.target.join("x")).expect_err("read-only publish");
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    c1.ok(
        "NodeUnpublishVolume readonly",
        c1.node().node_unpublish_volume(NodeUnpublishVolumeRequest {
            volume_id: "pvc-life".into(),
            target_path: ro.target.to_string_lossy().into(),
        }),
    );

    // Stats while published.
    let stats = c1.ok(
        "NodeGetVolumeStats",
        c1.node().node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: "pvc-life".into(),
            volume_path: p1.target.to_string_lossy().into(),
            staging_target_path: String::new(),
        }),
    );
    let bytes = stats
        .usage
        .iter()
        .find(|u| u.unit == 1)
        .expect("bytes usage");
    let inodes = stats
        .usage
        .iter()
        .find(|u| u.unit == 2)
        .expect("inode usage");
    assert!(
        bytes.used >= 8 * MIB && bytes.total > bytes.used,
        "{stats:?}"
    );
    assert!(inodes.total > 0 && inodes.used > 0, "{stats:?}");
    assert_eq!(stats.volume_condition.map(|c| c.abnormal), Some(false));

    // Deleting a published volume is refused.
    c1.fails(
        "DeleteVolume while published",
        Code::FailedPrecondition,
        c1.ctl().delete_volume(DeleteVolumeRequest {
            volume_id: "pvc-life".into(),
            secrets: HashMap::new(),
        }),
    );

    teardown_on(c1, "pvc-life", "n1", &p1);
    let v = nodes[0].inspect("pvc-life");
    assert!(v["attached_node"].is_null(), "{v}");

    // Move to n2 (publishing through n1's controller), verify the data.
    let c2 = &csi[1];
    c1.ok(
        "ControllerPublishVolume n2",
        c1.ctl()
            .controller_publish_volume(cpublish("pvc-life", "n2", fs_cap())),
    );
    let p2 = paths(&nodes[1], "life");
    c2.ok(
        "NodeStageVolume n2",
        c2.node()
            .node_stage_volume(stage_req("pvc-life", &p2.staging, fs_cap())),
    );
    c2.ok(
        "NodePublishVolume n2",
        c2.node().node_publish_volume(publish_req(
            "pvc-life",
            &p2.staging,
            &p2.target,
            fs_cap(),
            false,
        )),
    );
    assert_eq!(
        sha(&p2.target.join("data.bin")),
        want,
        "data after the move"
    );

    // Expand online: controller, then the node (twice each).
    let before = stats_bytes(c2, &p2.target);
    for _ in 0..2 {
        let r = c1.ok(
            "ControllerExpandVolume",
            c1.ctl()
                .controller_expand_volume(ControllerExpandVolumeRequest {
                    volume_id: "pvc-life".into(),
                    capacity_range: Some(CapacityRange {
                        required_bytes: 600 * MIB,
                        limit_bytes: 0,
                    }),
                    ..Default::default()
                }),
        );
        assert_eq!(r.capacity_bytes, 600 * MIB);
        assert!(r.node_expansion_required);
    }
    for _ in 0..2 {
        let r = c2.ok(
            "NodeExpandVolume",
            c2.node().node_expand_volume(NodeExpandVolumeRequest {
                volume_id: "pvc-life".into(),
                volume_path: p2.target.to_string_lossy().into(),
                capacity_range: Some(CapacityRange {
                    required_bytes: 600 * MIB,
                    limit_bytes: 0,
                }),
                ..Default::default()
            }),
        );
        assert_eq!(r.capacity_bytes, 600 * MIB);
    }
    let after = stats_bytes(c2, &p2.target);
    assert!(
        after > before + 150 * MIB,
        "filesystem grew: {before} -> {after}"
    );
    assert_eq!(
        sha(&p2.target.join("data.bin")),
        want,
        "data after the grow"
    );

    let got = c1.ok(
        "ControllerGetVolume",
        c1.ctl().controller_get_volume(ControllerGetVolumeRequest {
            volume_id: "pvc-life".into(),
        }),
    );
    let status = got.status.expect("status");
    assert_eq!(status.published_node_ids, vec!["n2".to_string()]);
    assert_eq!(status.volume_condition.map(|c| c.abnormal), Some(false));
    assert_eq!(got.volume.expect("volume").capacity_bytes, 600 * MIB);

    teardown_on(c2, "pvc-life", "n2", &p2);
    for _ in 0..2 {
        c1.ok(
            "DeleteVolume",
            c1.ctl().delete_volume(DeleteVolumeRequest {
                volume_id: "pvc-life".into(),
                secrets: HashMap::new(),
            }),
        );
    }
    c1.fails(
        "ControllerGetVolume after delete",
        Code::NotFound,
        c1.ctl().controller_get_volume(ControllerGetVolumeRequest {
            volume_id: "pvc-life".into(),
        }),
    );
    c1.ok(
        "DeleteVolume ext4",
        c1.ctl().delete_volume(DeleteVolumeRequest {
            volume_id: "pvc-exact".into(),
            secrets: HashMap::new(),
        }),
    );
    wait_for("replica space freed", Duration::from_secs(30), || {
        nodes.iter().all(|n| n.pool_allocated() == 0)
    });
}

fn stats_bytes(c: &Csi, path: &Path) -> i64 {
    let s = c.ok(
        "NodeGetVolumeStats",
        c.node().node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: "pvc-life".into(),
            volume_path: path.to_string_lossy().into(),
            staging_target_path: String::new(),
        }),
    );
    s.usage.iter().find(|u| u.unit == 1).expect("bytes").total
}

#[test]
fn raw_block_volume_moves_between_nodes() {
    let nodes = cluster_with("csi-block", &["512MiB", "512MiB"], 135);
    let (c1, c2) = (
        Csi::connect(&nodes[0].csi_socket()),
        Csi::connect(&nodes[1].csi_socket()),
    );
    let v = c1
        .ok(
            "CreateVolume block",
            c1.ctl().create_volume(create_req(
                "pvc-raw",
                64 * MIB,
                block_cap(),
                &[("replicas", "2")],
            )),
        )
        .volume
        .expect("volume");
    assert_eq!(v.capacity_bytes, 64 * MIB);
    c1.fails(
        "NodeStage of a block volume as a filesystem",
        Code::FailedPrecondition,
        c1.node()
            .node_stage_volume(stage_req("pvc-raw", &nodes[0].dir.join("x"), fs_cap())),
    );
    let mut pattern = DirectBuf::new(4 << 20);
    fill_pattern(pattern.as_mut_slice(), 99);
    for (i, (c, n, name)) in [(&c1, &nodes[0], "n1"), (&c2, &nodes[1], "n2")]
        .into_iter()
        .enumerate()
    {
        c1.ok(
            "ControllerPublishVolume",
            c1.ctl()
                .controller_publish_volume(cpublish("pvc-raw", name, block_cap())),
        );
        let p = paths(n, "raw");
        std::fs::remove_dir(&p.staging).ok();
        std::fs::create_dir_all(&p.staging).expect("staging");
        c.ok(
            "NodeStageVolume block",
            c.node()
                .node_stage_volume(stage_req("pvc-raw", &p.staging, block_cap())),
        );
        c.fails(
            "NodePublish block read-only in a writer mode",
            Code::FailedPrecondition,
            c.node().node_publish_volume(publish_req(
                "pvc-raw",
                &p.staging,
                &p.target,
                block_cap(),
                true,
            )),
        );
        for _ in 0..2 {
            c.ok(
                "NodePublishVolume block",
                c.node().node_publish_volume(publish_req(
                    "pvc-raw",
                    &p.staging,
                    &p.target,
                    block_cap(),
                    false,
                )),
            );
        }
        let meta = std::fs::metadata(&p.target).expect("published device");
        use std::os::unix::fs::FileTypeExt;
        assert!(meta.file_type().is_block_device(), "{:?}", meta.file_type());
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&p.target)
            .expect("open device");
        if i == 0 {
            f.write_all(pattern.as_slice()).expect("write device");
            f.sync_all().expect("fsync device");
        } else {
            let mut back = DirectBuf::new(4 << 20);
            f.read_exact(back.as_mut_slice()).expect("read device");
            assert!(
                back.as_slice() == pattern.as_slice(),
                "block data differs after the move"
            );
        }
        drop(f);
        teardown_on(c, "pvc-raw", name, &p);
    }
    c1.ok(
        "DeleteVolume",
        c1.ctl().delete_volume(DeleteVolumeRequest {
            volume_id: "pvc-raw".into(),
            secrets: HashMap::new(),
        }),
    );
}
