//! Replicas never silently diverge: a write that fails on some replicas
//! leaves the healthy ones equal, deleting a volume frees its space on
//! every replica node before it returns, a scrub finds bytes flipped on a
//! disk and `verify --repair` mends them, and local users cannot reach
//! volume data.

use cairn_tests::*;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

const MIB: usize = 1 << 20;

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut b = vec![0u8; len];
    fill_pattern(&mut b, seed);
    b
}

fn verify(n: &TestNode, volume: &str) -> serde_json::Value {
    let (code, v) = n.api("POST", &format!("/v1/volumes/{volume}/verify"), None);
    assert_eq!(code, 200, "verify {volume}: {v}");
    v
}

fn all_healthy(n: &TestNode, volume: &str, count: usize) -> bool {
    let r = replica_states(n, volume);
    r.len() == count && r.iter().all(|(_, s)| s == "healthy")
}

/// Creates a raw volume on `n` (with `extra` create flags) and attaches it
/// there; returns its device.
fn raw_volume(n: &TestNode, name: &str, size: &str, replicas: u32, extra: &[&str]) -> String {
    let replicas = replicas.to_string();
    let mut args = vec![
        "volume",
        "create",
        name,
        "--size",
        size,
        "--replicas",
        &replicas,
        "--fs",
        "none",
    ];
    args.extend(extra);
    n.cli_ok(&args);
    n.cli_ok(&["volume", "attach", name]).trim().to_string()
}

/// Changes one byte (at `byte`) of `node`'s copy of `data` (a block the
/// volume holds) on its disk, behind its daemon's back; returns the pool
/// file and the copy's offset in it.
fn change_copy(node: &TestNode, data: &[u8], byte: usize) -> (std::fs::File, u64) {
    let pool = node.disk_path();
    let at = find_block(&pool, &data[..64]).expect("the data on the node's disk");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&pool)
        .expect("open the pool file");
    f.write_at(&[data[byte] ^ 0x40], at + byte as u64)
        .expect("change the copy");
    f.sync_all().expect("sync");
    (f, at)
}

/// Writes random data through `dev` until the pool behind it is full.
fn fill_until_full(dev: &str) {
    let o = sh(&format!(
        "dd if=/dev/urandom of={dev} bs=1M oflag=direct status=none"
    ));
    assert!(!o.status.success(), "filling {dev} did not hit a full pool");
}

#[test]
fn a_write_that_a_full_replica_refuses_leaves_the_healthy_replicas_equal() {
    let nodes = cluster_with("divfull", &["512MiB", "512MiB", "160MiB"], 191);
    let dev = raw_volume(&nodes[0], "v", "256MiB", 3, &[]);
    let a = pattern(16 * MIB, 1);
    write_direct(Path::new(&dev), 0, &a).expect("first write");
    // n3's pool fills up with a volume of its own.
    let fdev = raw_volume(&nodes[2], "filler", "256MiB", 1, &["--locality"]);
    fill_until_full(&fdev);
    // A write into new extents: n1 and n2 take it, n3 has no room.
    let b = pattern(4 * MIB, 2);
    write_direct(Path::new(&dev), 64 << 20, &b)
        .expect("the write succeeds on the replicas with room");
    let states = replica_states(&nodes[0], "v");
    // Faulted, or already being retried by the healer (every second):
    // either way out of the healthy set that serves reads.
    assert!(
        states
            .iter()
            .any(|(n, s)| n == "n3" && (s == "faulted" || s == "rebuilding")),
        "the full replica is not out of the healthy set: {states:?}"
    );
    let r = verify(&nodes[0], "v");
    assert_eq!(r["replicas_compared"], 2, "{r}");
    assert_eq!(r["mismatched_extents"], serde_json::json!([]), "{r}");
    for _ in 0..3 {
        let back = read_direct(Path::new(&dev), 64 << 20, 4 * MIB).expect("read");
        assert!(
            back == b,
            "a read of the written range returned other bytes"
        );
    }
    // Room again on n3: it is rebuilt and all three agree.
    nodes[2].cli_ok(&["volume", "detach", "filler"]);
    nodes[2].cli_ok(&["volume", "rm", "filler"]);
    wait_for("n3 rebuilt", Duration::from_secs(90), || {
        all_healthy(&nodes[0], "v", 3)
    });
    let r = verify(&nodes[0], "v");
    assert_eq!(r["replicas_compared"], 3, "{r}");
    assert_eq!(r["mismatched_extents"], serde_json::json!([]), "{r}");
    assert!(read_direct(Path::new(&dev), 0, 16 * MIB).expect("read") == a);
    nodes[0].cli_ok(&["volume", "detach", "v"]);
}

#[test]
fn a_write_that_no_replica_has_room_for_changes_none_of_them() {
    let nodes = cluster_with("divnone", &["96MiB", "96MiB"], 196);
    let dev = raw_volume(&nodes[0], "v", "256MiB", 2, &[]);
    fill_until_full(&dev);
    let states = replica_states(&nodes[0], "v");
    assert!(
        states.iter().all(|(_, s)| s == "healthy"),
        "a full pool everywhere must not fault anyone: {states:?}"
    );
    let r = verify(&nodes[0], "v");
    assert_eq!(r["replicas_compared"], 2, "{r}");
    assert_eq!(r["mismatched_extents"], serde_json::json!([]), "{r}");
    nodes[0].cli_ok(&["volume", "detach", "v"]);
}

#[test]
fn a_replica_killed_in_the_middle_of_writes_leaves_the_rest_equal() {
    let mut nodes = cluster_with("divkill", &["512MiB", "512MiB", "512MiB"], 201);
    let dev = raw_volume(&nodes[0], "v", "128MiB", 3, &[]);
    let mut fio = std::process::Command::new("fio")
        .args([
            "--name=kill",
            "--rw=randwrite",
            "--bs=64k",
            "--iodepth=16",
            "--ioengine=libaio",
            "--direct=1",
            "--size=96M",
            // At most 32 MB/s, so the writes last about 3 s and the kill
            // below lands among them however fast the host is (unlimited,
            // a fast host finished writing before it, and the dead
            // replica was never found out).
            "--rate=32m",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
        ])
        .arg(format!("--filename={dev}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("fio");
    std::thread::sleep(Duration::from_millis(700));
    nodes[2].kill9();
    let out = {
        wait_for("fio to finish", Duration::from_secs(120), || {
            fio.try_wait().expect("fio status").is_some()
        });
        fio.wait_with_output().expect("fio")
    };
    assert!(
        out.status.success(),
        "fio: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = verify(&nodes[0], "v");
    assert_eq!(r["replicas_compared"], 2, "{r}");
    assert_eq!(r["mismatched_extents"], serde_json::json!([]), "{r}");
    nodes[2].restart();
    wait_for("n3 rebuilt", Duration::from_secs(90), || {
        all_healthy(&nodes[0], "v", 3)
    });
    let r = verify(&nodes[0], "v");
    assert_eq!(r["mismatched_extents"], serde_json::json!([]), "{r}");
    nodes[0].cli_ok(&["volume", "detach", "v"]);
}

#[test]
fn delete_returns_once_the_space_is_free_on_every_replica_node() {
    let mut nodes = cluster_with("rmfree", &["160MiB", "160MiB", "160MiB"], 206);
    for round in 0..2 {
        let name = format!("a{round}");
        nodes[0].cli_ok(&[
            "volume",
            "create",
            &name,
            "--size",
            "128MiB",
            "--replicas",
            "3",
            "--fs",
            "none",
        ]);
        let dev = nodes[0]
            .cli_ok(&["volume", "attach", &name])
            .trim()
            .to_string();
        write_direct(Path::new(&dev), 0, &pattern(128 * MIB, round)).expect("fill");
        nodes[0].cli_ok(&["volume", "detach", &name]);
        let (code, body) = nodes[0].api("DELETE", &format!("/v1/volumes/{name}"), None);
        assert_eq!(code, 204, "{body}");
        // At once: the next volume needs that space on all three nodes.
    }
    let dev = raw_volume(&nodes[0], "b", "128MiB", 3, &[]);
    write_direct(Path::new(&dev), 0, &pattern(128 * MIB, 9))
        .expect("writes into the freed space succeed");
    assert!(
        all_healthy(&nodes[0], "b", 3),
        "{:?}",
        replica_states(&nodes[0], "b")
    );
    nodes[0].cli_ok(&["volume", "detach", "b"]);
    nodes[0].cli_ok(&["volume", "rm", "b"]);
    // A replica node that is down: the delete says its space is pending,
    // and the node frees it when it comes back.
    let dev = raw_volume(&nodes[0], "c", "64MiB", 3, &[]);
    write_direct(Path::new(&dev), 0, &pattern(32 * MIB, 10)).expect("write");
    nodes[0].cli_ok(&["volume", "detach", "c"]);
    wait_for(
        "n3's pool to show the data",
        Duration::from_secs(10),
        || nodes[2].pool_allocated() >= 32 << 20,
    );
    nodes[2].kill9();
    let (code, body) = nodes[0].api("DELETE", "/v1/volumes/c", None);
    assert_eq!(code, 202, "{body}");
    assert_eq!(
        body["space_pending_on"],
        serde_json::json!(["n3"]),
        "{body}"
    );
    nodes[2].restart();
    wait_for(
        "n3 to free the deleted copy",
        Duration::from_secs(30),
        || nodes[2].pool_allocated() == 0,
    );
}

/// Runs `cmd` as the unprivileged user `nobody`.
fn as_nobody(cmd: &str) -> std::process::Output {
    sh(&format!(
        "setpriv --reuid=65534 --regid=65534 --clear-groups -- sh -c '{cmd}'"
    ))
}

#[test]
fn local_users_cannot_reach_volume_data() {
    let node = TestNode::start("access", "512MiB");
    let dev = raw_volume(&node, "v", "64MiB", 1, &[]);
    write_direct(Path::new(&dev), 0, &pattern(MIB, 3)).expect("write");
    let id = node.inspect("v")["id"].as_str().expect("id").to_string();
    let data = node.dir.join("data");
    let file = data.join("fuse").join(&id);
    let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700, "data dir");
    assert_eq!(mode(&node.disk_path()), 0o600, "pool file");
    let meta = data.join("meta");
    for bad in [
        format!("head -c 1 {}", file.display()),
        format!(
            "echo x | dd of={} bs=1 count=1 conv=notrunc",
            file.display()
        ),
        format!("head -c 1 {}", node.disk_path().display()),
        format!("cat {}/db", meta.display()),
    ] {
        let o = as_nobody(&bad);
        assert!(!o.status.success(), "nobody could run {bad:?}");
    }
    // The FUSE mount refuses on its own too, even with the data directory
    // opened up: the kernel enforces the files' root-only mode.
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let o = as_nobody(&format!("head -c 1 {}", file.display()));
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    assert!(
        !o.status.success() && err.contains("Permission denied"),
        "{err}"
    );
    let back = read_direct(Path::new(&dev), 0, MIB).expect("root still reads");
    assert!(back == pattern(MIB, 3));
    node.cli_ok(&["volume", "detach", "v"]);
}

/// The offset of the first 4 KiB block of `path` that starts with `head`.
fn find_block(path: &Path, head: &[u8]) -> Option<u64> {
    let f = std::fs::File::open(path).expect("open pool file");
    let len = f.metadata().expect("stat").len();
    let mut buf = vec![0u8; MIB];
    let mut off = 0u64;
    while off < len {
        let n = f.read_at(&mut buf, off).expect("read pool file");
        if n == 0 {
            break;
        }
        for b in (0..n).step_by(4096) {
            if buf[b..].starts_with(head) {
                return Some(off + b as u64);
            }
        }
        off += n as u64;
    }
    None
}

#[test]
fn a_scrub_finds_a_flipped_byte_and_verify_repair_mends_it() {
    let nodes = cluster_args(
        "scrub",
        &["256MiB", "256MiB", "256MiB"],
        211,
        &["--scrub-interval", "2s"],
    );
    let dev = raw_volume(&nodes[0], "v", "64MiB", 3, &[]);
    let data = pattern(MIB, 0xf1);
    write_direct(Path::new(&dev), 8 << 20, &data).expect("write");
    // Flip one byte of n3's copy, on its disk behind its daemon's back.
    let (f, at) = change_copy(&nodes[2], &data, 100);
    let series = "cairn_volume_scrub_mismatches_total{volume=\"v\"}";
    wait_for(
        "the scrub to find the difference",
        Duration::from_secs(30),
        || metric(&nodes[0], series).is_some_and(|v| v >= 1.0),
    );
    assert!(
        nodes[0].log().contains("replicas differ"),
        "{}",
        nodes[0].log()
    );
    let out = nodes[0].cli_ok(&["volume", "verify", "v", "--repair"]);
    assert!(
        out.contains("1 differ") && out.contains("the copy a majority holds"),
        "{out}"
    );
    assert!(out.contains("n3 rewritten"), "{out}");
    let r = verify(&nodes[0], "v");
    assert_eq!(r["mismatched_extents"], serde_json::json!([]), "{r}");
    let mut buf = vec![0u8; 4096];
    f.read_at(&mut buf, at).expect("read back n3's disk");
    assert_eq!(&buf[..], &data[..4096], "n3's copy not repaired");
    assert!(
        metric(&nodes[0], "cairn_volume_scrub_repairs_total{volume=\"v\"}")
            .is_some_and(|v| v >= 1.0)
    );
    nodes[0].cli_ok(&["volume", "detach", "v"]);
}

#[test]
fn replicas_are_resynced_after_an_attachment_ends_uncleanly() {
    let mut nodes = cluster_with("resync", &["256MiB", "256MiB"], 216);
    let dev = raw_volume(&nodes[0], "v", "64MiB", 2, &[]);
    let data = pattern(MIB, 0xa7);
    write_direct(Path::new(&dev), 8 << 20, &data).expect("write");
    // n2's copy differs, as after a write the dead engine had in flight
    // that reached n2 only.
    change_copy(&nodes[1], &data, 7);
    assert_eq!(
        verify(&nodes[0], "v")["mismatched_extents"],
        serde_json::json!([8])
    );
    // An unclean end: the daemon dies and its holder with it, so nothing
    // keeps the requests; the next start re-serves and resyncs.
    nodes[0].kill9();
    kill_holders(&nodes[0].dir);
    nodes[0].restart();
    wait_for("the resync", Duration::from_secs(60), || {
        nodes[0]
            .last_log()
            .contains("replicas resynced after the unclean end")
    });
    assert_eq!(
        verify(&nodes[0], "v")["mismatched_extents"],
        serde_json::json!([])
    );
    let dev = nodes[0].inspect("v")["device"]
        .as_str()
        .expect("device")
        .to_string();
    assert!(
        read_direct(Path::new(&dev), 8 << 20, MIB).expect("read") == data,
        "the resync did not keep the copy reads were served from"
    );
    // A graceful stop is clean: no resync on the next start.
    nodes[0].terminate();
    nodes[0].restart();
    wait_for("the attachment back", Duration::from_secs(30), || {
        nodes[0].inspect("v")["state"] == "attached"
    });
    assert!(
        !nodes[0].last_log().contains("ended uncleanly"),
        "{}",
        nodes[0].last_log()
    );
    nodes[0].cli_ok(&["volume", "detach", "v"]);
}
