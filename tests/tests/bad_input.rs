//! Bad input at every front door gets a specific error, changes nothing,
//! and leaves the daemon serving.

use std::process::Command;
use std::time::Duration;

use cairn_tests::*;
use serde_json::{json, Value};

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("<none>")
}

fn volumes(node: &TestNode) -> Value {
    node.api("GET", "/v1/volumes", None).1
}

#[test]
fn api_refuses_bad_requests_and_changes_nothing() {
    let node = TestNode::start("badapi", "1GiB");
    node.cli_ok(&["volume", "create", "ok", "--size", "64MiB"]);
    let vols = volumes(&node);
    let pool = node.pool();

    let sizes: Vec<Value> = vec![
        json!("0"),
        json!(0),
        json!("-1GiB"),
        json!(-5),
        json!("abc"),
        json!("1.2.3G"),
        json!("10XB"),
        json!("99999999999999999999999999P"),
        json!("100000TiB"),
        json!("1.5"),
        json!(""),
        json!(1.5),
        json!(null),
        // Between two multiples of 4 KiB: refused, never rounded silently.
        json!(5623),
        json!("1.5K"),
        json!("1GB"),
    ];
    for s in sizes {
        let (st, v) = node.api(
            "POST",
            "/v1/volumes",
            Some(&json!({ "name": "n", "size": s })),
        );
        assert_eq!(st, 400, "size {s}: {v}");
        let c = code(&v);
        assert!(c == "InvalidSize" || c == "InvalidBody", "size {s}: {v}");
        assert!(
            v["error"]["message"].as_str().unwrap().len() > 10,
            "size {s}: message too vague: {v}"
        );
    }
    let (_, v) = node.api(
        "POST",
        "/v1/volumes",
        Some(&json!({ "name": "n", "size": 5623 })),
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("the next one up is 8192"),
        "{v}"
    );
    for name in ["", "-x", "a/b", "a b", &"x".repeat(129)] {
        let (st, v) = node.api(
            "POST",
            "/v1/volumes",
            Some(&json!({ "name": name, "size": "1GiB" })),
        );
        assert_eq!((st, code(&v)), (400, "InvalidName"), "name {name:?}: {v}");
    }
    let (st, v) = node.api(
        "POST",
        "/v1/volumes",
        Some(&json!({ "name": "n", "size": "1GiB", "fs": "btrfs" })),
    );
    assert_eq!((st, code(&v)), (400, "InvalidFs"), "{v}");
    let (st, v) = node.api(
        "POST",
        "/v1/volumes",
        Some(&json!({ "name": "ok", "size": "1GiB" })),
    );
    assert_eq!((st, code(&v)), (409, "VolumeExists"), "{v}");

    // Malformed and unknown-field bodies.
    for body in [
        &b"{\"name\":"[..],
        b"[1,2]",
        b"",
        b"nonsense",
        b"{\"name\":5,\"size\":\"1G\"}",
    ] {
        let (st, v) = node.api_raw("POST", "/v1/volumes", body);
        assert_eq!(
            (st, code(&v)),
            (400, "InvalidBody"),
            "body {:?}: {v}",
            String::from_utf8_lossy(body)
        );
    }
    let (st, v) = node.api(
        "POST",
        "/v1/volumes",
        Some(&json!({ "name": "n", "size": "1G", "colour": "red" })),
    );
    assert_eq!((st, code(&v)), (400, "InvalidBody"), "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("colour"),
        "{v}"
    );
    // Replica counts: more than the nodes that are up, out of range, or
    // nothing to update at all.
    let (st, v) = node.api(
        "PATCH",
        "/v1/volumes/ok",
        Some(&json!({ "size": "1G", "replicas": 3 })),
    );
    assert_eq!((st, code(&v)), (409, "NotEnoughNodes"), "{v}");
    let (st, v) = node.api("PATCH", "/v1/volumes/ok", Some(&json!({ "replicas": 0 })));
    assert_eq!((st, code(&v)), (400, "InvalidReplicas"), "{v}");
    let (st, v) = node.api("PATCH", "/v1/volumes/ok", Some(&json!({})));
    assert_eq!((st, code(&v)), (400, "InvalidBody"), "{v}");
    let (st, v) = node.api(
        "POST",
        "/v1/volumes",
        Some(&json!({ "name": "r4", "size": "1G", "replicas": 4 })),
    );
    assert_eq!((st, code(&v)), (400, "InvalidReplicas"), "{v}");
    let (st, v) = node.api(
        "POST",
        "/v1/volumes",
        Some(&json!({ "name": "r2", "size": "1G", "replicas": 2 })),
    );
    assert_eq!((st, code(&v)), (409, "NotEnoughNodes"), "{v}");
    let (st, v) = node.api("DELETE", "/v1/volumes/ok?forc=true", None);
    assert_eq!((st, code(&v)), (400, "InvalidQuery"), "{v}");

    // Unknown volumes, everywhere.
    for (m, p, b) in [
        ("GET", "/v1/volumes/ghost", None),
        (
            "PATCH",
            "/v1/volumes/ghost",
            Some(json!({ "size": "2GiB" })),
        ),
        ("DELETE", "/v1/volumes/ghost", None),
        ("POST", "/v1/volumes/ghost/attach", None),
        ("POST", "/v1/volumes/ghost/detach", None),
        (
            "POST",
            "/v1/volumes/ghost/mount",
            Some(json!({ "path": "/tmp/x" })),
        ),
        (
            "POST",
            "/v1/volumes/ghost/unmount",
            Some(json!({ "path": "/tmp/x" })),
        ),
    ] {
        let (st, v) = node.api(m, p, b.as_ref());
        assert_eq!((st, code(&v)), (404, "VolumeNotFound"), "{m} {p}: {v}");
    }
    // Bad mount paths.
    let fuse_dir = node.dir.join("data/fuse").to_string_lossy().into_owned();
    let inside = format!("{fuse_dir}/x");
    for path in [
        "relative/dir",
        "/tmp/../etc",
        "/",
        fuse_dir.as_str(),
        inside.as_str(),
    ] {
        let (st, v) = node.api(
            "POST",
            "/v1/volumes/ok/mount",
            Some(&json!({ "path": path })),
        );
        assert_eq!((st, code(&v)), (400, "InvalidPath"), "{path}: {v}");
    }
    // Bad resize values.
    let (st, v) = node.api("PATCH", "/v1/volumes/ok", Some(&json!({ "size": "zero" })));
    assert_eq!((st, code(&v)), (400, "InvalidSize"), "{v}");
    let (st, v) = node.api("PATCH", "/v1/volumes/ok", Some(&json!({ "size": "1MiB" })));
    assert_eq!((st, code(&v)), (400, "ShrinkNotSupported"), "{v}");

    // Nothing changed.
    assert_eq!(volumes(&node), vols);
    assert_eq!(node.pool()["allocated_bytes"], pool["allocated_bytes"]);

    // Deleting an attached volume is refused, with the volume left as it was.
    let dev = node.cli_ok(&["volume", "attach", "ok"]).trim().to_string();
    let o = node.cli(&["volume", "rm", "ok"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("VolumeAttached") && err.contains("force"),
        "{err}"
    );
    let v = node.inspect("ok");
    assert_eq!(
        (v["state"].as_str(), v["device"].as_str()),
        (Some("attached"), Some(dev.as_str()))
    );
    // --force detaches and deletes.
    node.cli_ok(&["volume", "rm", "ok", "--force"]);
    assert_eq!(node.api("GET", "/v1/volumes/ok", None).0, 404);
    assert!(cairn_node::sys::loopdev::devices_backed_under(&node.dir).is_empty());

    // The CLI reports errors clearly and exits non-zero.
    let o = node.cli(&["volume", "create", "c", "--size", "lots"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("InvalidSize"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = node.cli(&["volume", "inspect", "ghost"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("not found"));

    // The OpenAPI description is served, and inspect -o json carries the
    // documented fields.
    let (st, spec) = node.api("GET", "/v1/openapi.json", None);
    assert_eq!(st, 200);
    assert!(
        spec["paths"]["/v1/volumes/{name}/mount"]["post"].is_object(),
        "{spec}"
    );
    node.cli_ok(&["volume", "create", "j", "--size", "10MiB", "--fs", "xfs"]);
    let v: Value = serde_json::from_str(&node.cli_ok(&["-o", "json", "volume", "inspect", "j"]))
        .expect("json");
    assert_eq!(v["name"], "j");
    assert_eq!(v["size_bytes"], 10u64 << 20);
    assert_eq!(v["fs"], "xfs");
    assert_eq!(v["state"], "detached");
    assert!(v["device"].is_null());
    assert_eq!(v["allocated_bytes"], 0);

    // Still serving.
    assert_eq!(node.api("GET", "/v1/node", None).0, 200);
    assert_eq!(node.api("GET", "/v1/nonexistent", None).0, 404);
}

/// Runs a daemon expected to refuse to start; returns its stderr.
fn start_refused(dir: &std::path::Path, disk: &std::path::Path) -> String {
    let mut cmd = Command::new(cairn_bin());
    cmd.args(["node", "run", "--data-dir"])
        .arg(dir)
        .arg("--disk-file")
        .arg(format!("{}:1GiB", disk.display()))
        .args(["--listen", "127.0.0.1:0", "--peer-listen", "127.0.0.1:0"])
        .args(["--docker-plugin-socket", "none"]);
    expect_failure(cmd, Duration::from_secs(30))
}

fn crc_of(p: &std::path::Path) -> u32 {
    crc32fast::hash(&std::fs::read(p).expect("read"))
}

#[test]
fn foreign_and_corrupted_devices_are_refused() {
    let root = test_root().join(format!("badsb-{}", std::process::id()));
    cleanup_dir(&root);
    std::fs::create_dir_all(&root).unwrap();

    // Garbage.
    let junk = root.join("junk.img");
    let mut data = vec![0u8; 16 << 20];
    fill_pattern(&mut data, 3);
    std::fs::write(&junk, &data).unwrap();
    let err = start_refused(&root.join("a"), &junk);
    assert!(
        err.contains("refusing") && err.contains("other data") && err.contains("--force-format"),
        "{err}"
    );
    assert_eq!(
        crc_of(&junk),
        crc32fast::hash(&data),
        "the refused device was modified"
    );

    // Another pool's device, and a corrupted superblock of our own pool.
    let mut node = TestNode::start("badsb-owner", "64MiB");
    node.terminate();
    let disk = node.disk_path();
    let before = crc_of(&disk);
    let err = start_refused(&root.join("b"), &disk);
    assert!(err.contains("belongs to another Cairn pool"), "{err}");
    assert_eq!(crc_of(&disk), before);

    let mut bytes = std::fs::read(&disk).unwrap();
    bytes[40] ^= 0xff; // inside the superblock's pool id
    std::fs::write(&disk, &bytes).unwrap();
    let err = start_refused(&node.dir.join("data"), &disk);
    assert!(err.contains("checksum mismatch"), "{err}");
    assert_eq!(crc_of(&disk), crc32fast::hash(&bytes));
    bytes[40] ^= 0xff;
    std::fs::write(&disk, &bytes).unwrap();
    node.restart();
    assert_eq!(node.api("GET", "/v1/node", None).0, 200);
    drop(node);
    cleanup_dir(&root);
}
