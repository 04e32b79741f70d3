//! What every front door shares: typed errors, names, the operation guard.

use super::*;

/// POSTs `body` to the Docker volume plugin protocol on `n`'s socket;
/// returns the `Err` field of the answer ("" on success).
fn docker_plugin(n: &TestNode, call: &str, body: &str) -> String {
    let out = sh_ok(&format!(
        "curl -s --max-time 60 --unix-socket {} -X POST -d '{body}' http://plugin/VolumeDriver.{call}",
        n.dir.join("docker.sock").display()
    ));
    let v: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{call}: {e}: {out}"));
    v["Err"].as_str().unwrap_or_default().to_string()
}

/// The same failure is recognisable at every door: a full pool is ENOSPC to
/// a writer (FUSE and NBD), 507 PoolFull in the API, RESOURCE_EXHAUSTED in
/// CSI and says so in Docker's `Err`; no quorum is 503, UNAVAILABLE and a
/// metadata error.
#[test]
fn a_full_pool_and_no_quorum_are_typed_at_every_door() {
    let nodes = cluster_with("doors", &["128MiB", "128MiB"], 226);
    let n1 = &nodes[0];
    let c1 = Csi::connect(&n1.csi_socket());
    // Fill both pools.
    n1.cli_ok(&[
        "volume",
        "create",
        "filler",
        "--size",
        "256MiB",
        "--replicas",
        "2",
        "--fs",
        "none",
    ]);
    let dev = n1
        .cli_ok(&["volume", "attach", "filler"])
        .trim()
        .to_string();
    let dd = sh(&format!(
        "dd if=/dev/urandom of={dev} bs=1M oflag=direct status=none"
    ));
    assert!(
        String::from_utf8_lossy(&dd.stderr).contains("No space left on device"),
        "FUSE: {}",
        String::from_utf8_lossy(&dd.stderr)
    );
    let made = |name: &str, fs: &str| {
        n1.cli_ok(&[
            "volume",
            "create",
            name,
            "--size",
            "64MiB",
            "--replicas",
            "1",
            "--locality",
            "--fs",
            fs,
        ]);
    };
    made("nbdvol", "none");
    let q = sh(&format!(
        "qemu-io -f raw -c 'write -P 7 0 1M' '{}'",
        n1.nbd_url("nbdvol")
    ));
    let qtext = format!(
        "{}{}",
        String::from_utf8_lossy(&q.stdout),
        String::from_utf8_lossy(&q.stderr)
    );
    assert!(qtext.contains("No space left on device"), "NBD: {qtext}");
    // REST: the first mount formats, which needs space.
    made("fsvol", "ext4");
    let (code, v) = n1.api(
        "POST",
        "/v1/volumes/fsvol/mount",
        Some(&serde_json::json!({ "path": n1.path("m").to_string_lossy() })),
    );
    assert_eq!(
        (code, v["error"]["code"].as_str()),
        (507, Some("PoolFull")),
        "{v}"
    );
    // CSI: staging formats too.
    c1.ok(
        "CreateVolume",
        c1.ctl()
            .create_volume(create_req("pvc-full", 64 * MIB, ext4_cap(), &[])),
    );
    c1.ok(
        "ControllerPublish",
        c1.ctl()
            .controller_publish_volume(cpublish("pvc-full", "n1", ext4_cap())),
    );
    let p = paths(n1, "full");
    let m = c1.fails(
        "NodeStage on a full pool",
        Code::ResourceExhausted,
        c1.node()
            .node_stage_volume(stage_req("pvc-full", &p.staging, ext4_cap())),
    );
    assert!(m.contains("pool is full"), "{m}");
    // Docker: the mount formats as well.
    assert_eq!(
        docker_plugin(
            n1,
            "Create",
            r#"{"Name":"dk","Opts":{"size":"64MiB","replicas":"1","locality":"true"}}"#
        ),
        ""
    );
    let err = docker_plugin(n1, "Mount", r#"{"Name":"dk","ID":"c1"}"#);
    assert!(err.contains("pool is full"), "Docker: {err}");
    // No quorum: two voters, one of them gone.
    let mut nodes = nodes;
    nodes[1].kill9();
    let n1 = &nodes[0];
    let (code, v) = n1.api(
        "POST",
        "/v1/volumes",
        Some(&serde_json::json!({ "name": "nq", "size": "8MiB" })),
    );
    assert_eq!(
        (code, v["error"]["code"].as_str()),
        (503, Some("MetadataError")),
        "{v}"
    );
    c1.fails(
        "CreateVolume without quorum",
        Code::Unavailable,
        c1.ctl()
            .create_volume(create_req("pvc-nq", 8 * MIB, ext4_cap(), &[])),
    );
    let err = docker_plugin(n1, "Create", r#"{"Name":"dknq","Opts":{"size":"8MiB"}}"#);
    assert!(err.contains("cluster metadata"), "Docker: {err}");
}

/// CSI names are any UTF-8 without control characters, up to 128 bytes:
/// each maps to one volume id, repeats find the same volume, and the CSI
/// name shows in `volume inspect`.
#[test]
fn csi_names_of_any_kind_round_trip() {
    let node = TestNode::start_with("csi-names", "512MiB", &["--node-name", "n1"]);
    let c = Csi::connect(&node.csi_socket());
    let long = "é".repeat(64);
    for name in [
        "pvc with spaces",
        "a+b",
        "日本語のボリューム",
        "-dash first",
        long.as_str(),
    ] {
        let made = c.ok(
            "CreateVolume",
            c.ctl()
                .create_volume(create_req(name, 8 * MIB, ext4_cap(), &[])),
        );
        let id = made.volume.expect("volume").volume_id;
        let again = c.ok(
            "CreateVolume again",
            c.ctl()
                .create_volume(create_req(name, 8 * MIB, ext4_cap(), &[])),
        );
        assert_eq!(again.volume.expect("volume").volume_id, id, "{name}");
        let shown = node.cli_ok(&["volume", "inspect", &id]);
        assert!(shown.contains(&format!("CSI name      {name}")), "{shown}");
        assert_eq!(node.inspect(&id)["csi_name"], name);
        c.ok(
            "DeleteVolume",
            c.ctl().delete_volume(DeleteVolumeRequest {
                volume_id: id.clone(),
                ..Default::default()
            }),
        );
        assert!(!names(&node).contains(&id));
    }
    // A valid volume name stays the id; the CSI name is not repeated.
    let made = c.ok(
        "CreateVolume",
        c.ctl()
            .create_volume(create_req("pvc-plain", 8 * MIB, ext4_cap(), &[])),
    );
    assert_eq!(made.volume.expect("volume").volume_id, "pvc-plain");
    assert!(node.inspect("pvc-plain")["csi_name"].is_null());
    for bad in [format!("{long}x"), "tab\there".to_string()] {
        c.fails(
            "CreateVolume with a bad name",
            Code::InvalidArgument,
            c.ctl()
                .create_volume(create_req(&bad, 8 * MIB, ext4_cap(), &[])),
        );
    }
    // An unknown volume is NOT_FOUND whatever the path looks like.
    for path in ["relative/path", "/does/not/exist", ""] {
        c.fails(
            "NodeGetVolumeStats of an unknown volume",
            Code::NotFound,
            c.node().node_get_volume_stats(NodeGetVolumeStatsRequest {
                volume_id: "no-such-volume".into(),
                volume_path: path.into(),
                ..Default::default()
            }),
        );
        c.fails(
            "NodeExpandVolume of an unknown volume",
            Code::NotFound,
            c.node().node_expand_volume(NodeExpandVolumeRequest {
                volume_id: "no-such-volume".into(),
                volume_path: path.into(),
                ..Default::default()
            }),
        );
    }
}

/// One guard for every door: while Docker mounts a volume (its first
/// mount formats it), a CSI operation on the same volume is ABORTED; once
/// the mount is done the same call succeeds, and nothing was half-done.
#[test]
fn csi_and_docker_share_one_operation_guard() {
    let node = TestNode::start_with("guard", "1GiB", &["--node-name", "n1"]);
    let c = Csi::connect(&node.csi_socket());
    assert_eq!(
        docker_plugin(
            &node,
            "Create",
            r#"{"Name":"shared","Opts":{"size":"8GiB","replicas":"1"}}"#
        ),
        ""
    );
    let expand = || ControllerExpandVolumeRequest {
        volume_id: "shared".into(),
        capacity_range: Some(CapacityRange {
            required_bytes: 8 << 30,
            limit_bytes: 0,
        }),
        ..Default::default()
    };
    let mounting = std::thread::scope(|sc| {
        let m = sc.spawn(|| docker_plugin(&node, "Mount", r#"{"Name":"shared","ID":"c1"}"#));
        let mut aborted = 0;
        while !m.is_finished() {
            match c.run(c.ctl().controller_expand_volume(expand())) {
                Err(s) if s.code() == Code::Aborted => aborted += 1,
                Err(s) => panic!("expand during the mount: {:?} {}", s.code(), s.message()),
                Ok(_) => {}
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        (m.join().expect("mount thread"), aborted)
    });
    assert_eq!(mounting.0, "", "Docker mount failed");
    assert!(
        mounting.1 > 0,
        "no CSI call was refused while Docker mounted"
    );
    c.ok(
        "expand after the mount",
        c.ctl().controller_expand_volume(expand()),
    );
    let v = node.inspect("shared");
    assert_eq!(
        (v["state"].as_str(), v["formatted"].as_bool()),
        (Some("mounted"), Some(true)),
        "{v}"
    );
    assert_eq!(
        docker_plugin(&node, "Unmount", r#"{"Name":"shared","ID":"c1"}"#),
        ""
    );
}
