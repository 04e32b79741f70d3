//! What every front door shares: typed errors, names, the operation guard.

use std::io::BufRead;
use std::process::{Command, Stdio};

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

/// A REST mount of `volume` on `n` that must fail: its status and code.
fn rest_mount_fails(n: &TestNode, volume: &str) -> (u16, Option<String>) {
    let (code, v) = n.api(
        "POST",
        &format!("/v1/volumes/{volume}/mount"),
        Some(&serde_json::json!({ "path": n.path("m").to_string_lossy() })),
    );
    (code, v["error"]["code"].as_str().map(String::from))
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
    assert_eq!(
        rest_mount_fails(n1, "fsvol"),
        (507, Some("PoolFull".into()))
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
    // The mount's mkfs waits at a gate, so the CSI call surely meets the
    // mount in progress (and cannot take the guard before the mount does).
    let gate = cairn_tests::gate::Gate::install(&node, "mkfs.ext4");
    gate.close();
    let mounted = std::thread::scope(|sc| {
        let m = sc.spawn(|| docker_plugin(&node, "Mount", r#"{"Name":"shared","ID":"c1"}"#));
        gate.wait_held(Duration::from_secs(60));
        let during = c.run(c.ctl().controller_expand_volume(expand()));
        gate.open();
        let mounted = m.join().expect("mount thread");
        match during {
            Err(s) if s.code() == Code::Aborted => {}
            Err(s) => panic!("expand during the mount: {:?} {}", s.code(), s.message()),
            Ok(_) => panic!("no CSI call was refused while Docker mounted"),
        }
        mounted
    });
    assert_eq!(mounted, "", "Docker mount failed");
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

/// A stale engine is reported as fenced at every door, never as an internal
/// error. Each door's first mount formats the volume on n1; the mkfs is held
/// at a gate until n2 has taken the volume over (a forced attach, which
/// fences n1's engine on both replicas), then runs and fails with EIO: the
/// API answers 409 Fenced, CSI FAILED_PRECONDITION and Docker's Err says
/// fenced. NBD: a client writing through n1 gets EIO once n2 took over.
#[test]
fn a_fenced_engine_is_a_clear_error_at_every_door() {
    let nodes = cluster("fenced", 2, 230);
    let (n1, n2) = (&nodes[0], &nodes[1]);
    let gate = cairn_tests::gate::Gate::install(n1, "mkfs.ext4");
    let c1 = Csi::connect(&n1.csi_socket());
    // Runs `door` (a first mount on n1) while n2 takes `name` over.
    let fenced_during_mkfs = |name: &str, door: &mut dyn FnMut()| {
        gate.close();
        std::thread::scope(|s| {
            let fencer = s.spawn(|| {
                gate.wait_held(Duration::from_secs(60));
                let out = wait_ok(n2, &["volume", "attach", name, "--force"]);
                gate.open();
                out
            });
            door();
            fencer.join().expect("fencer");
        });
        n2.cli_ok(&["volume", "detach", name]);
    };
    let create = |name: &str| {
        n1.cli_ok(&[
            "volume",
            "create",
            name,
            "--size",
            "64MiB",
            "--replicas",
            "2",
        ]);
    };

    create("restvol");
    fenced_during_mkfs("restvol", &mut || {
        assert_eq!(
            rest_mount_fails(n1, "restvol"),
            (409, Some("Fenced".into()))
        );
    });

    c1.ok(
        "CreateVolume",
        c1.ctl().create_volume(create_req(
            "pvc-fenced",
            64 * MIB,
            ext4_cap(),
            &[("replicas", "2")],
        )),
    );
    c1.ok(
        "ControllerPublish",
        c1.ctl()
            .controller_publish_volume(cpublish("pvc-fenced", "n1", ext4_cap())),
    );
    let p = paths(n1, "fenced");
    fenced_during_mkfs("pvc-fenced", &mut || {
        let m = c1.fails(
            "NodeStage with a fenced engine",
            Code::FailedPrecondition,
            c1.node()
                .node_stage_volume(stage_req("pvc-fenced", &p.staging, ext4_cap())),
        );
        assert!(m.contains("fenced"), "{m}");
    });

    assert_eq!(
        docker_plugin(
            n1,
            "Create",
            r#"{"Name":"dkf","Opts":{"size":"64MiB","replicas":"2"}}"#
        ),
        ""
    );
    fenced_during_mkfs("dkf", &mut || {
        let err = docker_plugin(n1, "Mount", r#"{"Name":"dkf","ID":"c1"}"#);
        assert!(err.contains("fenced"), "Docker: {err}");
    });
    assert!(
        metric(n1, "cairn_volume_fenced_errors_total{volume=\"dkf\"}").unwrap_or(0.0) > 0.0,
        "the fenced I/O is counted"
    );

    // NBD: one qemu-io session writes through n1, n2 takes over, the next
    // write fails.
    n1.cli_ok(&[
        "volume",
        "create",
        "nbdf",
        "--size",
        "64MiB",
        "--replicas",
        "2",
        "--fs",
        "none",
    ]);
    let mut q = Command::new("qemu-io")
        .args(["-f", "raw", &n1.nbd_url("nbdf")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-io");
    let mut stdin = q.stdin.take().expect("stdin");
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let readers: Vec<_> = [
        Box::new(q.stdout.take().expect("stdout")) as Box<dyn Read + Send>,
        Box::new(q.stderr.take().expect("stderr")),
    ]
    .into_iter()
    .map(|r| {
        let lines = lines.clone();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(r).lines().map_while(Result::ok) {
                lines.lock().expect("lines").push(l);
            }
        })
    })
    .collect();
    let saw = |what: &str, text: &str| {
        wait_for(what, Duration::from_secs(60), || {
            lines
                .lock()
                .expect("lines")
                .iter()
                .any(|l| l.contains(text))
        })
    };
    writeln!(stdin, "write -P 1 0 64k").expect("qemu-io stdin");
    saw("the first NBD write", "wrote 65536/65536");
    wait_ok(n2, &["volume", "attach", "nbdf", "--force"]);
    writeln!(stdin, "write -P 2 0 64k").expect("qemu-io stdin");
    saw("the fenced NBD write to fail", "Input/output error");
    writeln!(stdin, "quit").expect("qemu-io stdin");
    drop(stdin);
    let _ = q.wait();
    for r in readers {
        let _ = r.join();
    }
    assert!(
        metric(n1, "cairn_volume_fenced_errors_total{volume=\"nbdf\"}").unwrap_or(0.0) > 0.0,
        "the fenced NBD write is counted"
    );
    // n2 holds the first write, not the refused one.
    let dev = n2.inspect("nbdf")["device"]
        .as_str()
        .expect("device on n2")
        .to_string();
    assert_eq!(
        read_direct(Path::new(&dev), 0, 65536).expect("read on n2"),
        vec![1u8; 65536]
    );
    n2.cli_ok(&["volume", "detach", "nbdf"]);
}

/// Runs a CLI command on `n` until it succeeds (a leader may be changing).
fn wait_ok(n: &TestNode, args: &[&str]) -> String {
    let mut out = String::new();
    wait_for(&args.join(" "), Duration::from_secs(30), || {
        let o = n.cli(args);
        out = String::from_utf8_lossy(&o.stdout).into_owned();
        o.status.success()
    });
    out
}
