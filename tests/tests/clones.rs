//! Clones on real daemons and devices: a clone of a snapshot reads as the
//! snapshot at once, writes to it and to its source stay apart, its
//! snapshot cannot be deleted until the clone is filled (then it can), a
//! SIGKILL mid-fill loses nothing, `--from-volume` takes and later drops a
//! snapshot of its own, bad requests are refused with nothing changed; on
//! three nodes a clone of a snapshot taken while a writer fsyncs records
//! holds a clean filesystem with every record acknowledged before the
//! snapshot, and replicas on nodes without the snapshot are rebuilt from
//! the ones that read through to it.

// Test code: an unwrap that fails is a failed test.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use cairn_tests::*;
use serde_json::{json, Value};

fn sha(dev: &str, mib: u64) -> String {
    sh_ok(&format!(
        "dd if={dev} bs=1M count={mib} iflag=direct status=none | sha256sum"
    ))
}

fn write(dev: &str, seek_mib: u64, mib: u64) {
    sh_ok(&format!(
        "dd if=/dev/urandom of={dev} bs=1M count={mib} seek={seek_mib} oflag=direct status=none"
    ));
}

fn create(n: &TestNode, body: Value) -> (u16, Value) {
    n.api("POST", "/v1/volumes", Some(&body))
}

fn filling(n: &TestNode, volume: &str) -> bool {
    !n.inspect(volume)["origin"].is_null()
}

#[test]
fn a_clone_reads_as_its_snapshot_at_once_and_stays_apart_from_its_source() {
    // A slow fill, so the clone is seen reading through to the snapshot.
    let mut node = TestNode::start_with("clone1", "4GiB", &["--rebuild-bandwidth", "4MiB"]);
    node.cli_ok(&["volume", "create", "v", "--size", "1GiB", "--fs", "none"]);
    let dev = node.cli_ok(&["volume", "attach", "v"]).trim().to_string();
    write(&dev, 0, 64);
    write(&dev, 700, 16);
    node.cli_ok(&["snapshot", "create", "v", "s1"]);
    let at_snapshot = sha(&dev, 1024);
    write(&dev, 10, 20);
    let source_after = sha(&dev, 1024);
    assert_ne!(at_snapshot, source_after);

    // Bad requests: each a specific error, nothing created.
    let pool_before = node.pool_allocated();
    for (body, status, code) in [
        (
            json!({"name": "c", "from_snapshot": "v@s1", "size": "512MiB"}),
            400,
            "InvalidSize",
        ),
        (
            json!({"name": "c", "from_snapshot": "v@nope"}),
            404,
            "SnapshotNotFound",
        ),
        (
            json!({"name": "c", "from_snapshot": "nope@s1"}),
            404,
            "VolumeNotFound",
        ),
        (
            json!({"name": "c", "from_snapshot": "v"}),
            400,
            "InvalidName",
        ),
        (
            json!({"name": "c", "from_snapshot": "v@s1", "from_volume": "v"}),
            400,
            "InvalidSource",
        ),
        (
            json!({"name": "c", "from_snapshot": "v@s1", "fs": "xfs"}),
            400,
            "InvalidSource",
        ),
        (
            json!({"name": "v", "from_snapshot": "v@s1"}),
            409,
            "VolumeExists",
        ),
        (json!({"name": "c"}), 400, "InvalidSize"),
    ] {
        let (st, e) = create(&node, body.clone());
        assert_eq!(
            (st, e["error"]["code"].as_str()),
            (status, Some(code)),
            "{body}: {e}"
        );
    }
    let (_, vols) = node.api("GET", "/v1/volumes", None);
    assert_eq!(vols.as_array().unwrap().len(), 1, "{vols}");
    assert_eq!(node.pool_allocated(), pool_before);

    // The clone: the snapshot's size and data at once, through the CLI.
    let out = node.cli_ok(&[
        "-o",
        "json",
        "volume",
        "create",
        "c",
        "--from-snapshot",
        "v@s1",
    ]);
    let c: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(c["size_bytes"], 1u64 << 30, "{c}");
    assert_eq!(c["origin"]["snapshot"], "v@s1", "{c}");
    let cdev = node.cli_ok(&["volume", "attach", "c"]).trim().to_string();
    assert_eq!(
        sha(&cdev, 1024),
        at_snapshot,
        "the clone reads as the snapshot"
    );
    assert!(filling(&node, "c"), "80 MiB at 4 MiB/s is not copied yet");
    let table = node.cli_ok(&["volume", "inspect", "c"]);
    assert!(
        table.contains("Clone of") && table.contains("v@s1"),
        "{table}"
    );

    // Its snapshot stays until the clone is filled.
    let (st, e) = node.api("DELETE", "/v1/volumes/v/snapshots/s1", None);
    assert_eq!(
        (st, e["error"]["code"].as_str()),
        (409, Some("VolumeInUse")),
        "{e}"
    );
    assert!(
        e["error"]["message"].as_str().unwrap().contains("\"c\""),
        "{e}"
    );

    // Writes to either stay in their own volume.
    write(&cdev, 700, 4);
    let clone_after = sha(&cdev, 1024);
    assert_ne!(clone_after, at_snapshot);
    assert_eq!(sha(&dev, 1024), source_after);
    write(&dev, 0, 1);
    let source_after = sha(&dev, 1024);
    assert_eq!(sha(&cdev, 1024), clone_after);

    // A second clone, SIGKILLed mid-fill: after the restart it still reads
    // as the snapshot and goes on filling.
    node.cli_ok(&[
        "volume",
        "create",
        "c2",
        "--from-snapshot",
        "v@s1",
        "--size",
        "2GiB",
    ]);
    assert_eq!(node.inspect("c2")["size_bytes"], 2u64 << 30);
    node.kill9();
    node.restart();
    let c2dev = node.cli_ok(&["volume", "attach", "c2"]).trim().to_string();
    assert_eq!(sha(&c2dev, 1024), at_snapshot, "the clone after SIGKILL");
    // Beyond the source's size the clone reads zeros.
    sh_ok(&format!(
        "dd if={c2dev} bs=1M skip=1024 count=1024 iflag=direct status=none | cmp -n {} - /dev/zero",
        1u64 << 30
    ));

    wait_for("both clones filled", Duration::from_secs(120), || {
        !filling(&node, "c") && !filling(&node, "c2")
    });
    // Filled: independent of the snapshot, which can go now.
    node.cli_ok(&["snapshot", "rm", "v@s1"]);
    let cdev = node.inspect("c")["device"].as_str().unwrap().to_string();
    assert_eq!(sha(&cdev, 1024), clone_after);
    assert_eq!(sha(&c2dev, 1024), at_snapshot);
    assert_eq!(sha(&dev, 1024), source_after);

    // From a volume: a snapshot taken for the clone, gone once it is filled.
    node.cli_ok(&["volume", "create", "c3", "--from-volume", "v"]);
    let c3dev = node.cli_ok(&["volume", "attach", "c3"]).trim().to_string();
    assert_eq!(sha(&c3dev, 1024), source_after);
    let (_, snaps) = node.api("GET", "/v1/volumes/v/snapshots", None);
    assert_eq!(snaps.as_array().unwrap().len(), 1, "{snaps}");
    let (st, e) = node.api("DELETE", "/v1/volumes/v", None);
    assert_eq!(st, 409, "the source of a filling clone is kept: {e}");
    wait_for(
        "the from-volume clone filled",
        Duration::from_secs(120),
        || !filling(&node, "c3"),
    );
    wait_for("its snapshot deleted", Duration::from_secs(10), || {
        let (_, s) = node.api("GET", "/v1/volumes/v/snapshots", None);
        s.as_array().unwrap().is_empty()
    });
    assert_eq!(sha(&c3dev, 1024), source_after);

    // A clone being filled may be deleted; its snapshot is free then.
    node.cli_ok(&["snapshot", "create", "v", "s2"]);
    node.cli_ok(&["volume", "create", "c4", "--from-snapshot", "v@s2"]);
    node.cli_ok(&["volume", "rm", "c4"]);
    node.cli_ok(&["snapshot", "rm", "v@s2"]);
    for v in ["v", "c", "c2", "c3"] {
        node.cli_ok(&["volume", "detach", v]);
        node.cli_ok(&["volume", "rm", v]);
    }
    wait_for("pool empty", Duration::from_secs(10), || {
        node.pool_allocated() == 0
    });
}
