//! I/O in flight across a daemon crash: writers on attached volumes see no
//! error when the attaching node's daemon is SIGKILLed at a random moment
//! and restarted (every request the kernel handed out is kept by the FUSE
//! holder and resent), and when no daemon comes back, I/O fails after the
//! orphan timeout and everything can be torn down.

use cairn_tests::*;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A seeded xorshift for kill points; the seed is printed.
struct Rng(u64);

impl Rng {
    fn from_env() -> Rng {
        let seed = std::env::var("CAIRN_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            });
        println!("CAIRN_TEST_SEED={seed}");
        Rng(seed | 1)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }

    fn millis(&mut self, from: u64, to: u64) -> Duration {
        Duration::from_millis(from + self.below(to - from))
    }
}

/// fio 4k random writes with crc32c verification of everything written.
fn fio(target: &Path, size: &str, qd: u32, fsync_every: u32) -> Child {
    let mut c = Command::new("fio");
    c.args([
        "--name=crash",
        "--rw=randwrite",
        "--bs=4k",
        "--ioengine=libaio",
        "--direct=1",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--verify_state_save=0",
        "--randrepeat=0",
    ])
    .arg(format!("--filename={}", target.display()))
    .arg(format!("--size={size}"))
    .arg(format!("--iodepth={qd}"));
    if fsync_every > 0 {
        c.arg(format!("--fsync={fsync_every}"));
    }
    c.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start fio")
}

/// Waits (bounded) for fio and requires a clean run and verify.
fn fio_ok(mut child: Child, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        if child.try_wait().expect("fio status").is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: fio still runs after 180 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("fio output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{what}: fio failed:\n{text}");
    assert!(
        text.contains("err= 0") && !text.contains("verify:"),
        "{what}: fio reported errors:\n{text}"
    );
}

fn leader(n: &TestNode) -> Option<String> {
    status(n).and_then(|s| s["leader"].as_str().map(str::to_string))
}

/// One kill of `node` while fio runs on `target`: kill at a random point,
/// stay dead for a random few seconds, restart, fio must finish clean.
fn kill_during_fio(node: &mut TestNode, rng: &mut Rng, target: &Path, qd: u32, what: &str) {
    let size = if qd == 1 { "24M" } else { "64M" };
    let child = fio(target, size, qd, if qd == 1 { 64 } else { 0 });
    let before_kill = rng.millis(300, 2500);
    let dead = rng.millis(2000, 5000);
    println!("{what}: qd{qd}, SIGKILL after {before_kill:?}, restart {dead:?} later");
    std::thread::sleep(before_kill);
    node.kill9();
    std::thread::sleep(dead);
    node.restart();
    fio_ok(child, what);
}

#[test]
fn writers_see_no_error_when_the_attached_daemon_is_killed() {
    let mut rng = Rng::from_env();
    let mut nodes = cluster_with("crashio", &["768MiB", "768MiB", "768MiB"], 181);
    let mnt = nodes[0].path("mnt");
    let mnt_s = mnt.to_string_lossy().into_owned();
    nodes[0].cli_ok(&[
        "volume",
        "create",
        "db",
        "--size",
        "256MiB",
        "--replicas",
        "3",
    ]);
    nodes[0].cli_ok(&["volume", "mount", "db", &mnt_s]);
    nodes[0].cli_ok(&[
        "volume",
        "create",
        "solo",
        "--size",
        "128MiB",
        "--replicas",
        "1",
        "--locality",
        "--fs",
        "none",
    ]);
    let solo = nodes[0]
        .cli_ok(&["volume", "attach", "solo"])
        .trim()
        .to_string();
    let file = mnt.join("fio.dat");
    sh_ok(&format!("fallocate -l 64M {}", file.display()));
    // The first kill finds node 1 leading the metadata group.
    wait_for("n1 to lead", Duration::from_secs(20), || {
        leader(&nodes[0]).as_deref() == Some("n1")
    });
    for cycle in 0..6 {
        let qd = if cycle % 2 == 0 { 16 } else { 1 };
        let was_leader = leader(&nodes[0]).as_deref() == Some("n1");
        if cycle == 0 {
            assert!(was_leader, "n1 is not the leader for the first kill");
        }
        let (target, what) = if cycle == 5 {
            (
                Path::new(&solo).to_path_buf(),
                format!("cycle {cycle} (1 replica, raw)"),
            )
        } else {
            (
                file.clone(),
                format!("cycle {cycle} (3 replicas, ext4, leader: {was_leader})"),
            )
        };
        kill_during_fio(&mut nodes[0], &mut rng, &target, qd, &what);
    }
    // No I/O failed in the daemons either, and the replicas agree.
    let log = nodes[0].log();
    for bad in [
        "write failed",
        "read failed",
        "flush failed",
        "cannot serve a kept attachment",
    ] {
        assert!(!log.contains(bad), "n1 logged {bad:?}:\n{log}");
    }
    wait_for("db's replicas healthy", Duration::from_secs(60), || {
        let r = replica_states(&nodes[0], "db");
        r.len() == 3 && r.iter().all(|(_, s)| s == "healthy")
    });
    let (code, v) = nodes[0].api("POST", "/v1/volumes/db/verify", None);
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["replicas_compared"], 3, "{v}");
    assert_eq!(v["mismatched_extents"], serde_json::json!([]), "{v}");
    nodes[0].cli_ok(&["volume", "unmount", "db", &mnt_s]);
    nodes[0].cli_ok(&["volume", "detach", "solo"]);
}

/// The Kubernetes layout: a standby holder outlives the daemon, which is
/// killed with every process it started.
#[test]
fn writers_see_no_error_across_a_daemon_kill_with_the_standby_holder() {
    let mut rng = Rng::from_env();
    let mut node = TestNode::prepare("crashsb", "127.0.0.1", "1GiB", &[]);
    let mut holder = start_standby_holder(&node);
    node.start_prepared();
    node.cli_ok(&["volume", "create", "r", "--size", "128MiB", "--fs", "none"]);
    let dev = node.cli_ok(&["volume", "attach", "r"]).trim().to_string();
    assert!(
        node.log().contains("handed to the standby holder"),
        "{}",
        node.log()
    );
    for qd in [16, 1] {
        kill_during_fio(&mut node, &mut rng, Path::new(&dev), qd, "standby holder");
    }
    node.cli_ok(&["volume", "detach", "r"]);
    drop(node);
    let _ = holder.kill();
    let _ = holder.wait();
}

/// SIGTERM while fio writes through a filesystem and to a raw device: the
/// volumes in use stay attached and their I/O waits in the FUSE holder
/// (the writers see no error and lose nothing), an idle mount is taken
/// down as before, the daemon exits at once; a stop with nothing in use
/// leaves no holder and no FUSE mount behind.
#[test]
fn sigterm_during_fio_fails_no_writer_and_leaves_nothing_behind() {
    let mut node = TestNode::start("termio", "1GiB");
    let mnt = node.path("mnt");
    let idle = node.path("idle");
    let (mnt_s, idle_s) = (
        mnt.to_string_lossy().into_owned(),
        idle.to_string_lossy().into_owned(),
    );
    for (name, fs) in [("fsv", "ext4"), ("raw", "none"), ("still", "ext4")] {
        node.cli_ok(&["volume", "create", name, "--size", "256MiB", "--fs", fs]);
    }
    node.cli_ok(&["volume", "mount", "fsv", &mnt_s]);
    node.cli_ok(&["volume", "mount", "still", &idle_s]);
    let raw = node.cli_ok(&["volume", "attach", "raw"]).trim().to_string();
    let file = mnt.join("fio.dat");
    sh_ok(&format!("fallocate -l 96M {}", file.display()));
    let allocated = |n: &TestNode, v: &str| n.inspect(v)["allocated_bytes"].as_u64().unwrap_or(0);
    let (fs0, raw0) = (allocated(&node, "fsv"), allocated(&node, "raw"));
    let on_fs = fio(&file, "96M", 16, 0);
    let on_raw = fio(Path::new(&raw), "96M", 16, 0);
    wait_for(
        "both writers to be writing",
        Duration::from_secs(30),
        || allocated(&node, "fsv") > fs0 + (4 << 20) && allocated(&node, "raw") > raw0 + (4 << 20),
    );

    let status = node.terminate().expect("was running");
    assert!(status.success(), "exit {status}; log:\n{}", node.log());
    let log = node.last_log();
    assert_eq!(
        log.matches("volume in use: it stays attached").count(),
        2,
        "{log}"
    );
    assert!(
        log.contains("handing the FUSE connection to the holder"),
        "{log}"
    );
    // Every session thread stopped with its request answered.
    assert!(!log.contains("at the hand-off deadline"), "{log}");
    assert!(
        !cairn_node::sys::mount::is_mount_point(&idle),
        "the idle mount stayed"
    );
    assert!(
        cairn_node::sys::mount::is_mount_point(&mnt),
        "the busy mount went"
    );
    assert_eq!(
        holders(&node.dir).len(),
        1,
        "the holder keeps the connection"
    );

    node.restart();
    fio_ok(on_fs, "fio on ext4 across SIGTERM");
    fio_ok(on_raw, "fio on the raw device across SIGTERM");
    wait_for("the idle mount back", Duration::from_secs(30), || {
        cairn_node::sys::mount::is_mount_point(&idle)
    });
    let log = node.last_log();
    // The stop was clean: the idle volume, torn down, needs no resync.
    assert!(!log.contains("ended uncleanly"), "{log}");
    for bad in [
        "write failed",
        "read failed",
        "flush failed",
        "cannot serve a kept attachment",
    ] {
        assert!(!log.contains(bad), "logged {bad:?}:\n{log}");
    }

    // The kept attachment serves writes again, so its record no longer
    // says "clean stop": a crash now that takes the holder with it is
    // resynced at the next start.
    node.cli_ok(&["volume", "unmount", "fsv", &mnt_s]);
    node.cli_ok(&["volume", "unmount", "still", &idle_s]);
    node.kill9();
    let killed = kill_holders(&node.dir);
    wait_for("the holder to die", Duration::from_secs(10), || {
        holders(&node.dir).is_empty()
    });
    assert_eq!(killed.len(), 1);
    node.restart();
    wait_for(
        "the resync of the raw volume",
        Duration::from_secs(30),
        || node.last_log().contains("ended uncleanly"),
    );

    // Nothing in use: the stop takes everything down, the holder exits.
    node.cli_ok(&["volume", "detach", "raw"]);
    assert!(node.terminate().expect("was running").success());
    wait_for("the holder to exit", Duration::from_secs(10), || {
        holders(&node.dir).is_empty()
    });
    assert!(!cairn_node::sys::mount::is_mount_point(
        &node.dir.join("data/fuse")
    ));
    assert!(cairn_node::sys::loopdev::devices_backed_under(&node.dir).is_empty());
}

/// Processes in uninterruptible sleep among `pids`.
fn in_d_state(pids: &[u32]) -> Vec<u32> {
    pids.iter()
        .copied()
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit(')')
                        .next()
                        .map(|r| r.trim_start().starts_with('D'))
                })
                .unwrap_or(false)
        })
        .collect()
}

#[test]
fn io_fails_after_the_orphan_timeout_and_everything_can_be_torn_down() {
    let mut node = TestNode::start_with("orphan", "1GiB", &["--orphan-io-timeout", "3s"]);
    let mnt = node.path("mnt");
    let mnt_s = mnt.to_string_lossy().into_owned();
    node.cli_ok(&["volume", "create", "v", "--size", "256MiB"]);
    node.cli_ok(&["volume", "mount", "v", &mnt_s]);
    let manifest = write_manifest(&mnt, 2, 1 << 20, 0x0e_0001);
    let dev = node.inspect("v")["device"]
        .as_str()
        .expect("device")
        .to_string();
    // A writer that keeps writing and syncing until it gets an error.
    let script = format!(
        "while dd if=/dev/zero of={0}/w bs=4k count=16 oflag=direct conv=notrunc status=none; do :; done; exit 7",
        mnt.display()
    );
    let mut writer = Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("writer");
    std::thread::sleep(Duration::from_millis(500));
    let killed = Instant::now();
    node.kill9();
    // Waiting I/O fails once the holder gives up (3 s), not before.
    wait_for(
        "the writer to see an error",
        Duration::from_secs(60),
        || writer.try_wait().expect("writer status").is_some(),
    );
    let waited = killed.elapsed();
    assert!(
        waited >= Duration::from_millis(2500),
        "I/O failed {waited:?} after the kill, before the orphan timeout"
    );
    let holder_log =
        std::fs::read_to_string(node.dir.join("data/fuse-holder.log")).unwrap_or_default();
    assert!(
        holder_log.contains("orphan I/O timeout"),
        "holder log: {holder_log}"
    );
    assert!(in_d_state(&[writer.id()]).is_empty());
    // The mount, the loop device and the FUSE mount come down without
    // hanging (each bounded by `timeout`).
    sh_ok(&format!("timeout 20 umount {mnt_s}"));
    sh_ok(&format!("timeout 20 losetup -d {dev}"));
    sh_ok(&format!(
        "timeout 20 umount -l {}",
        node.dir.join("data/fuse").display()
    ));
    sh_ok("timeout 20 losetup -a >/dev/null");
    // A daemon started later serves the volume again, with what was synced.
    node.restart();
    wait_for("the volume mounted again", Duration::from_secs(30), || {
        node.inspect("v")["state"] == "mounted"
    });
    verify_manifest(&mnt, &manifest);
    node.cli_ok(&["volume", "unmount", "v", &mnt_s]);
}

/// A volume whose replicas are all on the restarted node needs no quorum
/// to be served again: only remote replicas need the new epoch.
#[test]
fn a_local_volume_serves_again_after_a_restart_without_quorum() {
    let mut rng = Rng::from_env();
    let mut nodes = cluster_with("crashnq", &["512MiB", "512MiB"], 221);
    nodes[0].cli_ok(&[
        "volume",
        "create",
        "loc",
        "--size",
        "128MiB",
        "--replicas",
        "1",
        "--locality",
        "--fs",
        "none",
    ]);
    let dev = nodes[0]
        .cli_ok(&["volume", "attach", "loc"])
        .trim()
        .to_string();
    // Two voters: without n2 there is no quorum.
    nodes[1].kill9();
    kill_during_fio(&mut nodes[0], &mut rng, Path::new(&dev), 16, "no quorum");
    assert!(
        nodes[0]
            .last_log()
            .contains("attachment kept across the restart"),
        "{}",
        nodes[0].last_log()
    );
    nodes[1].restart();
    nodes[0].cli_ok(&["volume", "detach", "loc"]);
}
