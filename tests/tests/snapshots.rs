//! Snapshots and revert on real daemons and devices: the space a snapshot
//! costs (only what is rewritten after it) and returns when deleted, 256
//! snapshots that leave nothing behind, revert of a detached volume (and
//! its refusal while attached), snapshots surviving SIGKILL, every bad
//! input refused with nothing changed, and on three nodes a snapshot of a
//! mounted volume asked for on another node (frozen there) that a revert
//! brings back on every replica, a replica node that was down while
//! snapshots were taken and deleted (it gets exactly the volume's
//! snapshots back, equal to the others'), and a new replica given them all.

// Test code: an unwrap that fails is a failed test.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use cairn_tests::*;
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

fn sha(dev: &str, mib: u64) -> String {
    sh_ok(&format!(
        "dd if={dev} bs=1M count={mib} iflag=direct status=none | sha256sum"
    ))
}

fn snap(n: &TestNode, volume: &str, name: &str) -> (u16, Value) {
    n.api(
        "POST",
        &format!("/v1/volumes/{volume}/snapshots"),
        Some(&json!({ "name": name })),
    )
}

fn snapshots(n: &TestNode, volume: &str) -> Vec<Value> {
    let (s, v) = n.api("GET", &format!("/v1/volumes/{volume}/snapshots"), None);
    assert_eq!(s, 200, "{v}");
    v.as_array().unwrap().clone()
}

fn within(what: &str, got: u64, lo: u64, hi: u64) {
    println!("{what}: {} MiB", got as f64 / MIB as f64);
    assert!(
        (lo..=hi).contains(&got),
        "{what}: {got} bytes, expected {lo}..={hi}"
    );
}

#[test]
fn snapshot_space_revert_and_restart_on_one_node() {
    let node = TestNode::start("snap1", "3GiB");
    node.cli_ok(&["volume", "create", "v", "--size", "1GiB", "--fs", "none"]);
    let dev = node.cli_ok(&["volume", "attach", "v"]).trim().to_string();
    sh_ok(&format!(
        "dd if=/dev/urandom of={dev} bs=1M count=512 oflag=direct status=none"
    ));
    let written = node.pool_allocated();
    within("512 MiB written", written, 512 * MIB, 530 * MIB);
    let before = sha(&dev, 1024);

    // The snapshot through the CLI, as an operator takes it.
    let out = node.cli_ok(&["-o", "json", "snapshot", "create", "v", "s1"]);
    let s1: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(s1["ready"], true, "{s1}");
    assert_eq!(s1["volume"], "v");
    assert_eq!(s1["size_bytes"], 1u64 << 30);
    assert_eq!(s1["replicas"].as_array().unwrap().len(), 1);
    within(
        "a snapshot right after writing",
        node.pool_allocated() - written,
        0,
        2 * MIB,
    );

    // Rewriting 100 MiB costs about 100 MiB, not the 512 the snapshot holds.
    sh_ok(&format!(
        "dd if=/dev/urandom of={dev} bs=1M count=100 seek=200 oflag=direct status=none"
    ));
    within(
        "100 MiB rewritten after the snapshot",
        node.pool_allocated() - written,
        100 * MIB,
        104 * MIB,
    );
    let after = sha(&dev, 1024);
    assert_ne!(before, after);
    let (_, s) = node.api("GET", "/v1/volumes/v/snapshots/s1", None);
    within(
        "the snapshot's exclusive bytes",
        s["exclusive_bytes"].as_u64().unwrap(),
        100 * MIB,
        101 * MIB,
    );
    assert_eq!(
        metric(&node, r#"cairn_volume_snapshots{volume="v"}"#),
        Some(1.0)
    );
    assert_eq!(
        metric(&node, r#"cairn_volume_cow_extents_total{volume="v"}"#),
        Some(100.0)
    );
    assert_eq!(
        metric(&node, r#"cairn_volume_snapshot_bytes{volume="v"}"#),
        Some((512 * MIB) as f64)
    );
    let table = node.cli_ok(&["snapshot", "ls"]);
    assert!(table.contains("v@s1"), "{table}");

    // Revert while attached: refused, nothing changed.
    let (st, e) = node.api(
        "POST",
        "/v1/volumes/v/revert",
        Some(&json!({"snapshot": "s1"})),
    );
    assert_eq!(
        (st, e["error"]["code"].as_str()),
        (409, Some("VolumeAttached"))
    );
    assert!(
        e["error"]["message"].as_str().unwrap().contains("detach"),
        "{e}"
    );
    assert_eq!(sha(&dev, 1024), after);

    // Survives SIGKILL and a restart of the daemon.
    node.cli_ok(&["volume", "detach", "v"]);
    let mut node = node;
    node.kill9();
    node.restart();
    let listed = snapshots(&node, "v");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["name"], "s1");
    assert_eq!(listed[0]["ready"], true);

    // Revert a detached volume: it reads as the snapshot, and the space
    // the rewrite took is free again.
    node.cli_ok(&["volume", "revert", "v", "--snapshot", "s1"]);
    let dev = node.cli_ok(&["volume", "attach", "v"]).trim().to_string();
    assert_eq!(sha(&dev, 1024), before, "the reverted volume differs");
    within(
        "after the revert",
        node.pool_allocated(),
        written,
        written + 2 * MIB,
    );

    // Deleting the snapshot frees what only it held (nothing now).
    node.cli_ok(&["snapshot", "rm", "v@s1"]);
    assert!(snapshots(&node, "v").is_empty());
    within(
        "after deleting the snapshot",
        node.pool_allocated(),
        written - MIB,
        written + MIB,
    );
    assert_eq!(sha(&dev, 1024), before);

    // 256 snapshots with a 4 KiB write after each, deleted oldest, newest
    // and middle first: the data is the head's, and the pool ends where
    // writing the same data without snapshots leaves it.
    let base = node.pool_allocated();
    for i in 0..256u64 {
        let (st, v) = snap(&node, "v", &format!("n{i}"));
        assert_eq!(st, 201, "snapshot {i}: {v}");
        sh_ok(&format!(
            "dd if=/dev/urandom of={dev} bs=4k count=1 seek={} oflag=direct status=none",
            i * 256 + 3
        ));
    }
    assert_eq!(snapshots(&node, "v").len(), 256);
    let head = sha(&dev, 1024);
    let order: Vec<u64> = (0..256u64)
        .filter(|i| i % 3 == 0)
        .chain((0..256).rev().filter(|i| i % 3 == 1))
        .chain((0..256).filter(|i| i % 3 == 2))
        .collect();
    for i in order {
        let (st, v) = node.api("DELETE", &format!("/v1/volumes/v/snapshots/n{i}"), None);
        assert_eq!(st, 204, "delete n{i}: {v}");
    }
    assert!(snapshots(&node, "v").is_empty());
    assert_eq!(sha(&dev, 1024), head, "deleting snapshots changed the head");
    within(
        "after 256 snapshots created and deleted",
        node.pool_allocated(),
        base - MIB,
        base + MIB,
    );
    node.cli_ok(&["volume", "detach", "v"]);
}

#[test]
fn a_volume_deleted_keeping_its_snapshots_goes_with_the_last_one() {
    let node = TestNode::start("snapkeep", "1GiB");
    let pool = node.pool_allocated();
    node.cli_ok(&["volume", "create", "v", "--size", "32MiB", "--fs", "none"]);
    let dev = node.cli_ok(&["volume", "attach", "v"]).trim().to_string();
    sh_ok(&format!(
        "dd if=/dev/urandom of={dev} bs=1M count=8 oflag=direct status=none"
    ));
    assert_eq!(snap(&node, "v", "s").0, 201);
    let at_s = sha(&dev, 32);
    // Refused while attached, and without the flag, with nothing changed.
    let o = node.cli(&["volume", "rm", "v", "--keep-snapshots"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("attached"),
        "{o:?}"
    );
    node.cli_ok(&["volume", "detach", "v"]);
    let o = node.cli(&["volume", "rm", "v"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--keep-snapshots"),
        "{o:?}"
    );
    assert!(names(&node).contains(&"v".to_string()));

    // With --force an attachment here is torn down first.
    node.cli_ok(&["volume", "attach", "v"]);
    node.cli_ok(&["volume", "rm", "v", "--keep-snapshots", "--force"]);
    assert!(!names(&node).contains(&"v".to_string()));
    assert_eq!(node.api("GET", "/v1/volumes/v", None).0, 404);
    let (st, e) = node.api("POST", "/v1/volumes/v/attach", None);
    assert_eq!(st, 404, "{e}");
    assert_eq!(snap(&node, "v", "t").0, 404);
    let (st, e) = node.api(
        "POST",
        "/v1/volumes",
        Some(&json!({"name": "v", "size": "32MiB", "fs": "none"})),
    );
    assert_eq!(st, 409, "{e}");
    assert!(e.to_string().contains("kept for its snapshots"), "{e}");
    // Its snapshot is listed and is a clone source.
    let list = snapshots(&node, "v");
    assert_eq!(list.len(), 1, "{list:?}");
    node.cli_ok(&["volume", "create", "c", "--from-snapshot", "v@s"]);
    let c = node.cli_ok(&["volume", "attach", "c"]).trim().to_string();
    assert_eq!(sha(&c, 32), at_s);
    node.cli_ok(&["volume", "detach", "c"]);
    wait_for("the clone filled", Duration::from_secs(60), || {
        node.inspect("c")["origin"]["filling"] == json!([])
    });
    node.cli_ok(&["volume", "rm", "c"]);

    // The last snapshot takes the volume along: its space and name return.
    node.cli_ok(&["snapshot", "rm", "v@s"]);
    assert_eq!(node.api("GET", "/v1/volumes/v/snapshots", None).0, 404);
    assert_eq!(node.pool_allocated(), pool);
    node.cli_ok(&["volume", "create", "v", "--size", "32MiB", "--fs", "none"]);
    node.cli_ok(&["volume", "rm", "v"]);
}

#[test]
fn snapshot_bad_input_changes_nothing() {
    let node = TestNode::start("snapbad", "1GiB");
    node.cli_ok(&["volume", "create", "a", "--size", "64MiB", "--fs", "none"]);
    node.cli_ok(&["volume", "create", "b", "--size", "64MiB", "--fs", "none"]);
    assert_eq!(snap(&node, "a", "one").0, 201);
    assert_eq!(snap(&node, "b", "other").0, 201);
    let pool = node.pool_allocated();
    let state = |n: &TestNode| (snapshots(n, "a"), snapshots(n, "b"));
    let was = state(&node);

    let long = "x".repeat(64);
    let cases: Vec<(&str, String, Option<Value>, u16, &str)> = vec![
        (
            "POST",
            "/v1/volumes/nope/snapshots".into(),
            Some(json!({"name": "s"})),
            404,
            "VolumeNotFound",
        ),
        (
            "POST",
            "/v1/volumes/a/snapshots".into(),
            Some(json!({"name": "one"})),
            409,
            "SnapshotExists",
        ),
        (
            "POST",
            "/v1/volumes/a/snapshots".into(),
            Some(json!({ "name": long })),
            400,
            "InvalidName",
        ),
        (
            "POST",
            "/v1/volumes/a/snapshots".into(),
            Some(json!({"name": "x/y"})),
            400,
            "InvalidName",
        ),
        (
            "POST",
            "/v1/volumes/a/snapshots".into(),
            Some(json!({"name": "x@y"})),
            400,
            "InvalidName",
        ),
        (
            "POST",
            "/v1/volumes/a/snapshots".into(),
            Some(json!({"name": "s", "frozen": true})),
            400,
            "InvalidBody",
        ),
        (
            "DELETE",
            "/v1/volumes/a/snapshots/missing".into(),
            None,
            404,
            "SnapshotNotFound",
        ),
        (
            "GET",
            "/v1/volumes/a/snapshots/other".into(),
            None,
            404,
            "SnapshotNotFound",
        ),
        (
            "POST",
            "/v1/volumes/a/revert".into(),
            Some(json!({"snapshot": "other"})),
            404,
            "SnapshotNotFound",
        ),
        (
            "POST",
            "/v1/volumes/a/revert".into(),
            Some(json!({})),
            400,
            "InvalidBody",
        ),
        (
            "DELETE",
            "/v1/volumes/a".into(),
            None,
            409,
            "VolumeHasSnapshots",
        ),
        (
            "GET",
            "/v1/snapshots?volume=nope".into(),
            None,
            404,
            "VolumeNotFound",
        ),
    ];
    for (method, path, body, status, code) in cases {
        let (s, v) = node.api(method, &path, body.as_ref());
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (status, Some(code)),
            "{method} {path} {body:?}: {v}"
        );
        assert!(!v["error"]["message"].as_str().unwrap().is_empty());
    }
    // Deleting twice: the second is a clear not-found.
    assert_eq!(
        node.api("DELETE", "/v1/volumes/b/snapshots/other", None).0,
        204
    );
    let (s, v) = node.api("DELETE", "/v1/volumes/b/snapshots/other", None);
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (404, Some("SnapshotNotFound"))
    );
    let o = node.cli(&["snapshot", "rm", "a"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("VOLUME@SNAPSHOT"));

    assert_eq!(state(&node).0, was.0);
    assert!(snapshots(&node, "b").is_empty());
    assert_eq!(node.pool_allocated(), pool);
    assert_eq!(node.api("GET", "/v1/node", None).0, 200);
}

#[test]
fn snapshot_of_a_volume_mounted_on_another_node_reverts_every_replica() {
    let nodes = cluster("snap3", 3, 71);
    let (n0, n1, n2) = (&nodes[0], &nodes[1], &nodes[2]);
    n0.cli_ok(&[
        "volume",
        "create",
        "db",
        "--size",
        "256MiB",
        "--replicas",
        "3",
    ]);
    let mnt = n0.path("db");
    let m = mnt.to_string_lossy().into_owned();
    n0.cli_ok(&["volume", "mount", "db", &m]);
    // Written through the page cache without a sync: only the freeze
    // writes it out before the snapshot.
    sh_ok(&format!(
        "head -c 8M /dev/urandom > {m}/a && sha256sum {m}/a > {m}/a.sha"
    ));
    let a = sh_ok(&format!("sha256sum < {m}/a"));

    // Asked for on n1: n0 freezes the filesystem and its engine takes it.
    let (st, s) = snap(n1, "db", "before");
    assert_eq!(st, 201, "{s}");
    assert_eq!(s["replicas"].as_array().unwrap().len(), 3, "{s}");
    // A freeze that cannot be taken (the filesystem is frozen already)
    // fails the snapshot with the cause, and leaves no snapshot behind.
    {
        struct Thaw(String);
        impl Drop for Thaw {
            fn drop(&mut self) {
                let _ = sh(&format!("fsfreeze -u {}", self.0));
            }
        }
        sh_ok(&format!("fsfreeze -f {m}"));
        let _thaw = Thaw(m.clone());
        let (st, e) = snap(n2, "db", "frozen");
        assert_eq!(
            (st, e["error"]["code"].as_str()),
            (409, Some("FreezeFailed")),
            "{e}"
        );
        assert!(
            e["error"]["message"].as_str().unwrap().contains("freeze"),
            "{e}"
        );
    }
    assert_eq!(snapshots(n0, "db").len(), 1);
    let o = n2.cli_ok(&[
        "-o",
        "json",
        "snapshot",
        "create",
        "db",
        "unfrozen",
        "--no-freeze",
    ]);
    assert_eq!(serde_json::from_str::<Value>(&o).unwrap()["ready"], true);
    n0.cli_ok(&["snapshot", "rm", "db@unfrozen"]);
    sh_ok(&format!("head -c 8M /dev/urandom > {m}/a && sync"));
    assert_ne!(sh_ok(&format!("sha256sum < {m}/a")), a);

    // Revert from n2 while mounted on n0: refused.
    let (st, e) = n2.api(
        "POST",
        "/v1/volumes/db/revert",
        Some(&json!({"snapshot": "before"})),
    );
    assert_eq!(st, 409, "{e}");
    n0.cli_ok(&["volume", "unmount", "db", &m]);
    n2.cli_ok(&["volume", "revert", "db", "--snapshot", "before"]);

    // Every replica reads as the snapshot: mounted on n1, and verified.
    let m1 = n1.path("db").to_string_lossy().into_owned();
    n1.cli_ok(&["volume", "mount", "db", &m1]);
    assert_eq!(sh_ok(&format!("sha256sum < {m1}/a")), a);
    sh_ok(&format!(
        "cd {m1} && sed 's#{m}#{m1}#' a.sha | sha256sum -c"
    ));
    let report: Value =
        serde_json::from_str(&n1.cli_ok(&["-o", "json", "volume", "verify", "db"])).unwrap();
    assert_eq!(report["replicas_compared"], 3, "{report}");
    assert!(
        report["mismatched_extents"].as_array().unwrap().is_empty(),
        "{report}"
    );
    wait_for("all replicas healthy", Duration::from_secs(30), || {
        replica_states(n1, "db").iter().all(|(_, s)| s == "healthy")
    });
    n1.cli_ok(&["volume", "unmount", "db", &m1]);
    n1.cli_ok(&["snapshot", "rm", "db@before"]);
    assert!(snapshots(n2, "db").is_empty());
}

#[test]
fn a_replica_down_during_snapshots_ends_up_with_exactly_the_volumes_snapshots() {
    let mut nodes = cluster("snaprep", 3, 74);
    let write = |dev: &str, seek: u64, mib: u64| {
        sh_ok(&format!(
            "dd if=/dev/urandom of={dev} bs=1M count={mib} seek={seek} oflag=direct status=none"
        ))
    };
    nodes[0].cli_ok(&[
        "volume",
        "create",
        "r",
        "--size",
        "64MiB",
        "--fs",
        "none",
        "--replicas",
        "3",
    ]);
    let dev = nodes[0]
        .cli_ok(&["volume", "attach", "r"])
        .trim()
        .to_string();
    write(&dev, 0, 16);
    assert_eq!(snap(&nodes[0], "r", "s0").0, 201);
    write(&dev, 0, 16);

    // One replica's node dies: the next snapshot is recorded on two, and
    // deleting the first leaves the dead node's copy to free later.
    nodes[2].kill9();
    write(&dev, 32, 8);
    let (st, s1) = snap(&nodes[1], "r", "s1");
    assert_eq!(st, 201, "{s1}");
    assert_eq!(s1["replicas"].as_array().unwrap().len(), 2, "{s1}");
    let (st, d) = nodes[1].api("DELETE", "/v1/volumes/r/snapshots/s0", None);
    assert_eq!(st, 202, "{d}");
    assert_eq!(d["space_pending_on"].as_array().unwrap().len(), 1, "{d}");
    let at_s1 = sha(&dev, 64);
    write(&dev, 0, 4);

    // Back: its copy of the deleted snapshot is freed, the snapshot taken
    // while it was down is copied to it, and it is healthy again.
    nodes[2].restart();
    wait_for("all replicas healthy", Duration::from_secs(60), || {
        let r = replica_states(&nodes[0], "r");
        r.len() == 3 && r.iter().all(|(_, s)| s == "healthy")
    });
    let list = snapshots(&nodes[0], "r");
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["name"], "s1");
    assert_eq!(list[0]["replicas"].as_array().unwrap().len(), 3, "{list:?}");
    // Exactly s1 on the returned node: its snapshot layers hold what the
    // others' do (s0 still held, or s1 missing, would differ).
    let held = |n: &TestNode| metric(n, r#"cairn_volume_snapshot_bytes{volume="r"}"#);
    let on_n0 = held(&nodes[0]).unwrap();
    assert!(on_n0 >= (24 * MIB) as f64, "{on_n0}");
    wait_for(
        "the returned node holding exactly s1",
        Duration::from_secs(30),
        || held(&nodes[2]) == Some(on_n0),
    );
    // Its copy is the one read through by a clone attached there.
    nodes[0].cli_ok(&[
        "volume",
        "create",
        "c",
        "--from-snapshot",
        "r@s1",
        "--replicas",
        "3",
    ]);
    let c = nodes[2]
        .cli_ok(&["volume", "attach", "c"])
        .trim()
        .to_string();
    assert_eq!(sha(&c, 64), at_s1);
    nodes[2].cli_ok(&["volume", "detach", "c"]);
    nodes[2].cli_ok(&["volume", "rm", "c"]);
    let report: Value =
        serde_json::from_str(&nodes[0].cli_ok(&["-o", "json", "volume", "verify", "r"])).unwrap();
    let snaps = report["snapshots"].as_array().unwrap();
    assert_eq!(snaps.len(), 1, "{report}");
    assert_eq!(snaps[0]["snapshot"], "s1", "{report}");
    assert_eq!(
        snaps[0]["replicas_compared"].as_array().unwrap().len(),
        3,
        "{report}"
    );
    assert!(
        snaps[0]["mismatched_extents"]
            .as_array()
            .unwrap()
            .is_empty(),
        "{report}"
    );

    // A revert reads only the replicas that hold the snapshot: every one.
    nodes[0].cli_ok(&["volume", "detach", "r"]);
    nodes[1].cli_ok(&["volume", "revert", "r", "--snapshot", "s1"]);
    let dev1 = nodes[1]
        .cli_ok(&["volume", "attach", "r"])
        .trim()
        .to_string();
    assert_eq!(sha(&dev1, 64), at_s1);
    wait_for(
        "all replicas healthy after the revert",
        Duration::from_secs(60),
        || {
            let r = replica_states(&nodes[1], "r");
            r.len() == 3 && r.iter().all(|(_, s)| s == "healthy")
        },
    );
    let report: Value =
        serde_json::from_str(&nodes[1].cli_ok(&["-o", "json", "volume", "verify", "r"])).unwrap();
    assert_eq!(report["replicas_compared"], 3, "{report}");
    assert!(
        report["mismatched_extents"].as_array().unwrap().is_empty(),
        "{report}"
    );
    assert_eq!(sha(&dev1, 64), at_s1);
    nodes[1].cli_ok(&["volume", "detach", "r"]);
    nodes[1].cli_ok(&["snapshot", "rm", "r@s1"]);

    // A new replica (more replicas wanted) is given every snapshot, each
    // equal to the other copies.
    nodes[0].cli_ok(&[
        "volume",
        "create",
        "g",
        "--size",
        "32MiB",
        "--fs",
        "none",
        "--replicas",
        "1",
    ]);
    let g = nodes[0]
        .cli_ok(&["volume", "attach", "g"])
        .trim()
        .to_string();
    write(&g, 0, 8);
    assert_eq!(snap(&nodes[0], "g", "a").0, 201);
    let at_a = sha(&g, 32);
    write(&g, 4, 8);
    assert_eq!(snap(&nodes[0], "g", "b").0, 201);
    let at_b = sha(&g, 32);
    write(&g, 16, 4);
    let head = sha(&g, 32);
    nodes[0].cli_ok(&["volume", "update", "g", "--replicas", "3"]);
    wait_for(
        "three healthy replicas of g",
        Duration::from_secs(60),
        || {
            let r = replica_states(&nodes[0], "g");
            r.len() == 3 && r.iter().all(|(_, s)| s == "healthy")
        },
    );
    for x in snapshots(&nodes[0], "g") {
        assert_eq!(x["replicas"].as_array().unwrap().len(), 3, "{x}");
    }
    let report: Value =
        serde_json::from_str(&nodes[0].cli_ok(&["-o", "json", "volume", "verify", "g"])).unwrap();
    assert!(
        report["mismatched_extents"].as_array().unwrap().is_empty(),
        "{report}"
    );
    let snaps = report["snapshots"].as_array().unwrap();
    assert_eq!(snaps.len(), 2, "{report}");
    for x in snaps {
        assert_eq!(
            x["replicas_compared"].as_array().unwrap().len(),
            3,
            "{report}"
        );
        assert!(
            x["mismatched_extents"].as_array().unwrap().is_empty(),
            "{report}"
        );
    }
    assert_eq!(sha(&g, 32), head);
    nodes[0].cli_ok(&["volume", "detach", "g"]);
    // Each snapshot read back from a node that only got it by copying.
    for (name, want) in [("a", &at_a), ("b", &at_b)] {
        let from = format!("g@{name}");
        nodes[0].cli_ok(&[
            "volume",
            "create",
            "gc",
            "--from-snapshot",
            &from,
            "--replicas",
            "3",
        ]);
        let dev = nodes[2]
            .cli_ok(&["volume", "attach", "gc"])
            .trim()
            .to_string();
        assert_eq!(&sha(&dev, 32), want, "clone of {from}");
        nodes[2].cli_ok(&["volume", "detach", "gc"]);
        nodes[2].cli_ok(&["volume", "rm", "gc"]);
    }
}
