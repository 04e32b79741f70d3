//! Error codes, idempotency and paging.

use super::*;

#[test]
fn errors_idempotency_and_paging() {
    let nodes = cluster_with("csi-err", &["512MiB", "512MiB"], 138);
    let c = Csi::connect(&nodes[0].csi_socket());
    let ctl = || c.ctl();
    let node = || c.node();
    use Code::*;

    // CreateVolume: missing fields, unsupported modes, ranges, parameters.
    let good = create_req("pvc-e", 16 * MIB, fs_cap(), &[]);
    let mut r = good.clone();
    r.name.clear();
    c.fails("no name", InvalidArgument, ctl().create_volume(r));
    let mut r = good.clone();
    r.volume_capabilities.clear();
    c.fails("no capabilities", InvalidArgument, ctl().create_volume(r));
    let mut r = good.clone();
    r.volume_capabilities = vec![VolumeCapability {
        access_mode: None,
        access_type: None,
    }];
    c.fails("empty capability", InvalidArgument, ctl().create_volume(r));
    let mut r = good.clone();
    r.volume_capabilities = vec![cap(Mode::MultiNodeMultiWriter, false, "", &[])];
    let m = c.fails("multi-node writer", InvalidArgument, ctl().create_volume(r));
    assert!(m.contains("MULTI_NODE_MULTI_WRITER"), "{m}");
    let mut r = good.clone();
    r.capacity_range = Some(CapacityRange {
        required_bytes: 10 * MIB,
        limit_bytes: 5 * MIB,
    });
    c.fails("required > limit", OutOfRange, ctl().create_volume(r));
    let mut r = good.clone();
    r.capacity_range = Some(CapacityRange {
        required_bytes: 1 << 60,
        limit_bytes: 0,
    });
    c.fails("too big", OutOfRange, ctl().create_volume(r));
    let mut r = good.clone();
    r.parameters = params(&[("colour", "blue")]);
    let m = c.fails("unknown parameter", InvalidArgument, ctl().create_volume(r));
    assert!(m.contains("colour") && m.contains("replicas"), "{m}");
    let mut r = good.clone();
    r.parameters = params(&[("replicas", "3")]);
    c.fails(
        "3 replicas on 2 nodes",
        ResourceExhausted,
        ctl().create_volume(r),
    );
    let mut r = good.clone();
    r.accessibility_requirements = Some(TopologyRequirement {
        requisite: vec![node_topology("elsewhere")],
        preferred: Vec::new(),
    });
    c.fails(
        "unsatisfiable topology",
        ResourceExhausted,
        ctl().create_volume(r),
    );
    assert_eq!(
        names(&nodes[0]),
        Vec::<String>::new(),
        "no failed create left a volume"
    );

    // A requisite topology confines the replicas.
    let mut r = good.clone();
    r.accessibility_requirements = Some(TopologyRequirement {
        requisite: vec![node_topology("n2")],
        preferred: vec![node_topology("n2")],
    });
    let v = c
        .ok("CreateVolume in n2", ctl().create_volume(r))
        .volume
        .expect("volume");
    assert!(
        v.accessible_topology.is_empty(),
        "any node attaches a Cairn volume: {v:?}"
    );
    assert_eq!(
        nodes[0].inspect("pvc-e")["replicas"][0]["node"],
        "n2",
        "replica placed in the requisite topology"
    );

    // Other RPCs: missing fields and unknown volumes or nodes.
    c.fails(
        "DeleteVolume without id",
        InvalidArgument,
        ctl().delete_volume(DeleteVolumeRequest::default()),
    );
    c.ok(
        "DeleteVolume of an unknown volume",
        ctl().delete_volume(DeleteVolumeRequest {
            volume_id: "pvc-never".into(),
            secrets: HashMap::new(),
        }),
    );
    c.fails(
        "publish without node",
        InvalidArgument,
        ctl().controller_publish_volume(cpublish("pvc-e", "", fs_cap())),
    );
    let mut no_cap = cpublish("pvc-e", "n1", fs_cap());
    no_cap.volume_capability = None;
    c.fails(
        "publish without capability",
        InvalidArgument,
        ctl().controller_publish_volume(no_cap),
    );
    c.fails(
        "publish unknown volume",
        NotFound,
        ctl().controller_publish_volume(cpublish("pvc-never", "n1", fs_cap())),
    );
    c.fails(
        "publish to unknown node",
        NotFound,
        ctl().controller_publish_volume(cpublish("pvc-e", "n9", fs_cap())),
    );
    c.fails(
        "publish a filesystem volume as block",
        InvalidArgument,
        ctl().controller_publish_volume(cpublish("pvc-e", "n1", block_cap())),
    );
    c.ok(
        "unpublish of an unknown volume",
        ctl().controller_unpublish_volume(cunpublish("pvc-never", "n1")),
    );

    // ValidateVolumeCapabilities.
    let vreq = |caps: Vec<VolumeCapability>, p: &[(&str, &str)], id: &str| {
        ValidateVolumeCapabilitiesRequest {
            volume_id: id.into(),
            volume_capabilities: caps,
            parameters: params(p),
            ..Default::default()
        }
    };
    let validate = |caps, p, id| {
        let (mut client, r) = (ctl(), vreq(caps, p, id));
        async move { client.validate_volume_capabilities(r).await }
    };
    let ok = c.ok("validate", validate(vec![fs_cap()], &[], "pvc-e"));
    assert!(ok.confirmed.is_some(), "{ok:?}");
    let no = c.ok("validate block", validate(vec![block_cap()], &[], "pvc-e"));
    assert!(no.confirmed.is_none() && !no.message.is_empty(), "{no:?}");
    let no = c.ok(
        "validate multi-node writer",
        validate(
            vec![cap(Mode::MultiNodeSingleWriter, false, "", &[])],
            &[],
            "pvc-e",
        ),
    );
    assert!(no.confirmed.is_none(), "{no:?}");
    let rox = c.ok(
        "validate read-only many",
        validate(
            vec![cap(Mode::MultiNodeReaderOnly, false, "", &[])],
            &[],
            "pvc-e",
        ),
    );
    assert!(rox.confirmed.is_some(), "{rox:?}");
    let no = c.ok(
        "validate replicas",
        validate(vec![fs_cap()], &[("replicas", "2")], "pvc-e"),
    );
    assert!(no.confirmed.is_none(), "{no:?}");
    c.fails(
        "validate no caps",
        InvalidArgument,
        validate(vec![], &[], "pvc-e"),
    );
    let half = VolumeCapability {
        access_mode: None,
        access_type: Some(AccessType::Block(BlockVolume {})),
    };
    c.fails(
        "validate a capability without access mode",
        InvalidArgument,
        validate(vec![half], &[], "pvc-e"),
    );
    c.fails(
        "validate unknown",
        NotFound,
        validate(vec![fs_cap()], &[], "pvc-never"),
    );

    // ListVolumes pages; a foreign token is ABORTED.
    for i in 0..3 {
        c.ok(
            "CreateVolume for paging",
            ctl().create_volume(create_req(&format!("pvc-p{i}"), 32 * MIB, ext4_cap(), &[])),
        );
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = c.ok(
            "ListVolumes",
            ctl().list_volumes(ListVolumesRequest {
                max_entries: 2,
                starting_token: token.clone(),
            }),
        );
        assert!(page.entries.len() <= 2);
        seen.extend(
            page.entries
                .iter()
                .map(|e| e.volume.as_ref().expect("volume").volume_id.clone()),
        );
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    assert_eq!(seen, vec!["pvc-e", "pvc-p0", "pvc-p1", "pvc-p2"]);
    c.fails(
        "ListVolumes bad token",
        Aborted,
        ctl().list_volumes(ListVolumesRequest {
            max_entries: 1,
            starting_token: "garbage".into(),
        }),
    );
    c.fails(
        "ListVolumes negative",
        InvalidArgument,
        ctl().list_volumes(ListVolumesRequest {
            max_entries: -1,
            starting_token: String::new(),
        }),
    );

    // Capacity per topology segment.
    let cap_of = |t: Option<Topology>, p: &[(&str, &str)]| {
        c.ok(
            "GetCapacity",
            ctl().get_capacity(GetCapacityRequest {
                volume_capabilities: vec![fs_cap()],
                parameters: params(p),
                accessible_topology: t,
            }),
        )
        .available_capacity
    };
    let all = cap_of(None, &[]);
    let one = cap_of(Some(node_topology("n1")), &[]);
    let two = cap_of(Some(node_topology("n1")), &[("replicas", "2")]);
    assert!(
        one > 0 && all >= one && one >= two && two > 0,
        "{all} {one} {two}"
    );
    assert_eq!(cap_of(Some(node_topology("n9")), &[]), 0);
    assert_eq!(
        cap_of(None, &[("replicas", "3")]),
        0,
        "3 replicas need 3 nodes"
    );

    // Expand errors.
    c.fails(
        "expand without range",
        InvalidArgument,
        ctl().controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: "pvc-e".into(),
            ..Default::default()
        }),
    );
    c.fails(
        "expand unknown",
        NotFound,
        ctl().controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: "pvc-never".into(),
            capacity_range: Some(CapacityRange {
                required_bytes: MIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        }),
    );

    // Node RPCs: missing or bad fields, unknown volumes, not staged.
    let staging = nodes[0].dir.join("kubelet/e/globalmount");
    std::fs::create_dir_all(&staging).expect("staging");
    c.fails(
        "stage without path",
        InvalidArgument,
        node().node_stage_volume(stage_req("pvc-e", Path::new(""), fs_cap())),
    );
    c.fails(
        "stage relative path",
        InvalidArgument,
        node().node_stage_volume(stage_req("pvc-e", Path::new("rel/dir"), fs_cap())),
    );
    c.fails(
        "stage unknown volume",
        NotFound,
        node().node_stage_volume(stage_req("pvc-never", &staging, fs_cap())),
    );
    c.fails(
        "stage with a forbidden mount flag",
        InvalidArgument,
        node().node_stage_volume(stage_req(
            "pvc-p0",
            &staging,
            cap(Mode::SingleNodeWriter, false, "", &["bind"]),
        )),
    );
    c.fails(
        "publish before stage",
        FailedPrecondition,
        node().node_publish_volume(publish_req(
            "pvc-p0",
            &staging,
            &nodes[0].dir.join("kubelet/pods/e/mount"),
            ext4_cap(),
            false,
        )),
    );
    c.fails(
        "publish over /",
        InvalidArgument,
        node().node_publish_volume(publish_req(
            "pvc-p0",
            &staging,
            Path::new("/"),
            ext4_cap(),
            false,
        )),
    );
    c.fails(
        "stats of a missing path",
        NotFound,
        node().node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: "pvc-p0".into(),
            volume_path: nodes[0].dir.join("nothing").to_string_lossy().into(),
            staging_target_path: String::new(),
        }),
    );
    c.fails(
        "unpublish without target",
        InvalidArgument,
        node().node_unpublish_volume(NodeUnpublishVolumeRequest {
            volume_id: "pvc-p0".into(),
            target_path: String::new(),
        }),
    );

    // ABORTED: a second operation while one is in flight on the volume.
    let sock = nodes[0].csi_socket();
    let st = staging.clone();
    let stager = std::thread::spawn(move || {
        let c = Csi::connect(&sock);
        // Retried like kubelet does when the expand loop holds the volume.
        loop {
            match c.run(
                c.node()
                    .node_stage_volume(stage_req("pvc-p1", &st, ext4_cap())),
            ) {
                Err(s) if s.code() == Code::Aborted => continue,
                r => return r.map(|_| ()).map_err(|s| s.message().to_string()),
            }
        }
    });
    let mut aborted = false;
    while !stager.is_finished() && !aborted {
        if let Err(s) = c.run(
            ctl().controller_expand_volume(ControllerExpandVolumeRequest {
                volume_id: "pvc-p1".into(),
                capacity_range: Some(CapacityRange {
                    required_bytes: 8 * MIB,
                    limit_bytes: 0,
                }),
                ..Default::default()
            }),
        ) {
            assert_eq!(s.code(), Aborted, "{}", s.message());
            aborted = true;
        }
    }
    stager
        .join()
        .expect("stager")
        .expect("NodeStageVolume (slow: mkfs)");
    assert!(aborted, "no call saw the in-flight stage");
    c.ok(
        "NodeUnstageVolume",
        node().node_unstage_volume(NodeUnstageVolumeRequest {
            volume_id: "pvc-p1".into(),
            staging_target_path: staging.to_string_lossy().into(),
        }),
    );

    // Every other RPC without its required fields.
    c.fails(
        "ControllerUnpublish without id",
        InvalidArgument,
        ctl().controller_unpublish_volume(ControllerUnpublishVolumeRequest::default()),
    );
    c.fails(
        "ValidateVolumeCapabilities without id",
        InvalidArgument,
        ctl().validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
            volume_capabilities: vec![fs_cap()],
            ..Default::default()
        }),
    );
    c.fails(
        "ControllerGetVolume without id",
        InvalidArgument,
        ctl().controller_get_volume(ControllerGetVolumeRequest::default()),
    );
    c.fails(
        "ControllerExpand without id",
        InvalidArgument,
        ctl().controller_expand_volume(ControllerExpandVolumeRequest::default()),
    );
    c.fails(
        "NodeStage without capability",
        InvalidArgument,
        node().node_stage_volume(NodeStageVolumeRequest {
            volume_id: "pvc-p0".into(),
            staging_target_path: staging.to_string_lossy().into(),
            ..Default::default()
        }),
    );
    c.fails(
        "NodeUnstage without id",
        InvalidArgument,
        node().node_unstage_volume(NodeUnstageVolumeRequest::default()),
    );
    c.fails(
        "NodePublish without target",
        InvalidArgument,
        node().node_publish_volume(NodePublishVolumeRequest {
            volume_id: "pvc-p0".into(),
            staging_target_path: staging.to_string_lossy().into(),
            volume_capability: Some(ext4_cap()),
            ..Default::default()
        }),
    );
    c.fails(
        "NodeGetVolumeStats without id",
        InvalidArgument,
        node().node_get_volume_stats(NodeGetVolumeStatsRequest::default()),
    );
    c.fails(
        "NodeExpand without path",
        InvalidArgument,
        node().node_expand_volume(NodeExpandVolumeRequest {
            volume_id: "pvc-p0".into(),
            ..Default::default()
        }),
    );

    // Queries answer the same when repeated.
    macro_rules! same_twice {
        ($what:expr, $call:expr) => {{
            let a = c.ok($what, $call);
            let b = c.ok($what, $call);
            assert_eq!(a, b, "{} answered differently", $what);
        }};
    }
    same_twice!(
        "GetPluginInfo",
        c.id().get_plugin_info(GetPluginInfoRequest {})
    );
    same_twice!(
        "GetPluginCapabilities",
        c.id()
            .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
    );
    same_twice!(
        "ControllerGetCapabilities",
        ctl().controller_get_capabilities(ControllerGetCapabilitiesRequest {})
    );
    same_twice!(
        "NodeGetCapabilities",
        node().node_get_capabilities(NodeGetCapabilitiesRequest {})
    );
    same_twice!("NodeGetInfo", node().node_get_info(NodeGetInfoRequest {}));
    same_twice!(
        "ListVolumes",
        ctl().list_volumes(ListVolumesRequest {
            max_entries: 0,
            starting_token: String::new(),
        })
    );
    same_twice!(
        "ControllerGetVolume",
        ctl().controller_get_volume(ControllerGetVolumeRequest {
            volume_id: "pvc-p2".into(),
        })
    );
    same_twice!(
        "ValidateVolumeCapabilities",
        ctl().validate_volume_capabilities(vreq(vec![fs_cap()], &[], "pvc-e"))
    );

    // Garbage on the socket leaves the driver serving.
    {
        let mut s = std::os::unix::net::UnixStream::connect(nodes[0].csi_socket()).expect("socket");
        let _ = s.write_all(
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\xff\xff\xff\xff\xff\xff\xffgarbage",
        );
        let _ = s.write_all(&[0xa5; 4096]);
    }
    let probe = c.ok("Probe after garbage", c.id().probe(ProbeRequest {}));
    assert_eq!(probe.ready, Some(true));
}
