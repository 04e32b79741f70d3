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
    let v = n.inspect(volume);
    !v["origin"]["filling"].as_array().unwrap().is_empty()
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

    let cdev = node.cli_ok(&["volume", "attach", "c"]).trim().to_string();
    assert_eq!(
        sha(&cdev, 1024),
        at_snapshot,
        "the clone reads as the snapshot"
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
    assert!(filling(&node, "c2"), "not filled before the SIGKILL");
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

/// Appends numbered, checksummed records to `path`, fsyncing each, and
/// writes each acknowledged number to `ack`, until `stop` exists.
const WRITER: &str = r#"
import hashlib, os, sys
path, ack, stop = sys.argv[1:4]
f = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
a = open(ack, "w")
i = 0
while not os.path.exists(stop) and i < 1000000:
    i += 1
    os.write(f, ("%08d %s\n" % (i, hashlib.sha256(str(i).encode()).hexdigest())).encode())
    os.fsync(f)
    a.write("%d\n" % i)
    a.flush()
"#;

fn record(i: u64) -> String {
    let sum = sh_ok(&format!("printf %s {i} | sha256sum"));
    format!("{i:08} {}", sum.split_whitespace().next().unwrap())
}

struct Writer {
    child: std::process::Child,
    stop: std::path::PathBuf,
    ack: std::path::PathBuf,
}

impl Writer {
    fn acked(&self) -> u64 {
        std::fs::read_to_string(&self.ack)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.parse().ok())
            .next_back()
            .unwrap_or(0)
    }

    fn stop(&mut self) {
        let _ = std::fs::write(&self.stop, b"");
        let _ = self.child.wait();
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.stop, b"");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_clone_of_a_snapshot_taken_under_fsyncing_writes_holds_every_acknowledged_record() {
    let nodes = cluster("clone3", 3, 77);
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
    let m = n0.path("db").to_string_lossy().into_owned();
    n0.cli_ok(&["volume", "mount", "db", &m]);
    let script = n0.path("writer.py");
    std::fs::write(&script, WRITER).unwrap();
    let mut w = Writer {
        child: std::process::Command::new("python3")
            .arg(&script)
            .arg(format!("{m}/log"))
            .arg(n0.path("ack"))
            .arg(n0.path("stop"))
            .spawn()
            .unwrap(),
        stop: n0.path("stop"),
        ack: n0.path("ack"),
    };
    wait_for("records written", Duration::from_secs(30), || {
        w.acked() >= 200
    });
    // Every record acknowledged before the call began is in the snapshot.
    let before = w.acked();
    let (st, s) = n1.api(
        "POST",
        "/v1/volumes/db/snapshots",
        Some(&json!({"name": "mid"})),
    );
    assert_eq!(st, 201, "{s}");
    let after_call = w.acked();
    wait_for("more records", Duration::from_secs(30), || {
        w.acked() >= after_call + 100
    });
    w.stop();
    n0.cli_ok(&["volume", "unmount", "db", &m]);

    // Cloned from n2 with every replica reading through (all hold it).
    n2.cli_ok(&[
        "volume",
        "create",
        "c",
        "--from-snapshot",
        "db@mid",
        "--replicas",
        "3",
    ]);
    let c = n2.inspect("c");
    assert_eq!(c["origin"]["filling"].as_array().unwrap().len(), 3, "{c}");
    let dev = n2.cli_ok(&["volume", "attach", "c"]).trim().to_string();
    sh_ok(&format!("fsck.ext4 -n {dev}"));
    n2.cli_ok(&["volume", "detach", "c"]);
    let m2 = n2.path("c").to_string_lossy().into_owned();
    n2.cli_ok(&["volume", "mount", "c", &m2]);
    let log = std::fs::read_to_string(format!("{m2}/log")).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    println!(
        "acknowledged before the call: {before}, when it returned: {after_call}; in the clone: {}",
        lines.len()
    );
    assert!(log.ends_with('\n'), "a torn record");
    assert!(
        lines.len() as u64 >= before,
        "{} records, {before} acknowledged before the snapshot",
        lines.len()
    );
    for (i, l) in lines.iter().enumerate() {
        if i < 3 || i + 3 > lines.len() || i % 97 == 0 {
            assert_eq!(*l, record(i as u64 + 1), "record {}", i + 1);
        } else {
            assert!(
                l.starts_with(&format!("{:08} ", i + 1)),
                "record {}: {l}",
                i + 1
            );
        }
    }
    // Independent: what the clone writes is not in the source.
    sh_ok(&format!("echo clone > {m2}/mine && sync"));
    n2.cli_ok(&["volume", "unmount", "c", &m2]);
    n0.cli_ok(&["volume", "mount", "db", &m]);
    assert!(!std::path::Path::new(&format!("{m}/mine")).exists());
    let src_lines = std::fs::read_to_string(format!("{m}/log"))
        .unwrap()
        .lines()
        .count() as u64;
    assert!(src_lines >= after_call + 100, "the source kept writing");
    n0.cli_ok(&["volume", "unmount", "db", &m]);

    // A one-replica source cloned with three: the two replicas on nodes
    // without the snapshot are rebuilt from the one that reads through.
    n0.cli_ok(&[
        "volume",
        "create",
        "one",
        "--size",
        "128MiB",
        "--fs",
        "none",
        "--replicas",
        "1",
        "--locality",
    ]);
    let odev = n0.cli_ok(&["volume", "attach", "one"]).trim().to_string();
    write(&odev, 0, 32);
    write(&odev, 100, 8);
    n0.cli_ok(&["snapshot", "create", "one", "s"]);
    let want = sha(&odev, 128);
    write(&odev, 0, 4);
    n0.cli_ok(&["volume", "detach", "one"]);
    n1.cli_ok(&[
        "volume",
        "create",
        "c1",
        "--from-snapshot",
        "one@s",
        "--replicas",
        "3",
    ]);
    let states = replica_states(n1, "c1");
    assert_eq!(states.len(), 3);
    assert_eq!(
        states.iter().filter(|(_, s)| s == "healthy").count(),
        1,
        "only the replica beside the snapshot is healthy at first: {states:?}"
    );
    // Served at once from n2, which holds no copy yet.
    let cdev = n2.cli_ok(&["volume", "attach", "c1"]).trim().to_string();
    assert_eq!(sha(&cdev, 128), want);
    wait_for(
        "all replicas of the clone healthy",
        Duration::from_secs(90),
        || replica_states(n1, "c1").iter().all(|(_, s)| s == "healthy"),
    );
    wait_for("the clone filled", Duration::from_secs(60), || {
        !filling(n1, "c1")
    });
    let report: Value =
        serde_json::from_str(&n2.cli_ok(&["-o", "json", "volume", "verify", "c1"])).unwrap();
    assert_eq!(report["replicas_compared"], 3, "{report}");
    assert!(
        report["mismatched_extents"].as_array().unwrap().is_empty(),
        "{report}"
    );
    assert_eq!(sha(&cdev, 128), want);
    n2.cli_ok(&["volume", "detach", "c1"]);
    n0.cli_ok(&["snapshot", "rm", "one@s"]);
    n0.cli_ok(&["snapshot", "rm", "db@mid"]);
}
