//! Replicated volumes on real daemons: a writer that verifies every byte
//! keeps running while a replica's node is killed and restarted, the
//! restarted replica is resynced with only what changed, a volume with no
//! local replica survives the loss of its attaching node, a stale engine is
//! fenced, and without a Raft quorum a degraded write fails instead of
//! completing unrecorded.

// Test code: an unwrap that fails is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn_tests::*;

const MIB: u64 = 1 << 20;

fn signal(node: &TestNode, sig: i32) {
    // SAFETY: kill(2) on a child process this test started.
    unsafe { libc::kill(node.pid(), sig) };
}

fn all_healthy(n: &TestNode, volume: &str, count: usize) -> bool {
    let r = replica_states(n, volume);
    r.len() == count && r.iter().all(|(_, s)| s == "healthy")
}

/// Creates a 64 MiB raw volume with three replicas and attaches it on `n`;
/// returns the device.
fn raw_three_replicas(n: &TestNode, name: &str) -> PathBuf {
    n.cli_ok(&[
        "volume",
        "create",
        name,
        "--size",
        "64MiB",
        "--fs",
        "none",
        "--replicas",
        "3",
    ]);
    PathBuf::from(n.cli_ok(&["volume", "attach", name]).trim())
}

/// Waits until every node's pool size is in the state (placement reads it).
fn wait_pools_reported(n: &TestNode) {
    wait_for("pool sizes reported", Duration::from_secs(15), || {
        let (_, v) = n.api("GET", "/v1/nodes", None);
        v.as_array().is_some_and(|a| {
            a.iter()
                .all(|n| n["pool_capacity_bytes"].as_u64() > Some(0))
        })
    });
}

/// The nodes holding `volume`'s replicas, sorted.
fn placed_on(n: &TestNode, volume: &str) -> Vec<String> {
    let mut placed: Vec<String> = replica_states(n, volume).into_iter().map(|r| r.0).collect();
    placed.sort();
    placed
}

fn mount_dir(n: &TestNode, name: &str) -> PathBuf {
    let p = n.dir.join(name);
    std::fs::create_dir_all(&p).expect("mount dir");
    p
}

/// Writes 1 MiB files round-robin over 64 names, fsyncs each, and reads it
/// back with O_DIRECT, until stopped; any error or wrong byte is recorded.
struct Writer {
    stop: Arc<AtomicBool>,
    written: Arc<AtomicU64>,
    errors: Arc<Mutex<Vec<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    fn start(dir: &Path) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let (s, w, e, dir) = (
            stop.clone(),
            written.clone(),
            errors.clone(),
            dir.to_path_buf(),
        );
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; MIB as usize];
            let mut i = 0u64;
            while !s.load(Ordering::Acquire) {
                let path = dir.join(format!("w{:02}", i % 64));
                fill_pattern(&mut buf, i);
                let r = std::fs::File::create(&path)
                    .and_then(|mut f| {
                        std::io::Write::write_all(&mut f, &buf)?;
                        f.sync_all()
                    })
                    .and_then(|_| read_direct(&path, 0, buf.len()));
                match r {
                    Ok(back) if back == buf => {}
                    Ok(_) => {
                        e.lock()
                            .unwrap()
                            .push(format!("{}: wrong bytes", path.display()));
                        return;
                    }
                    Err(err) => {
                        e.lock().unwrap().push(format!("{}: {err}", path.display()));
                        return;
                    }
                }
                w.fetch_add(MIB, Ordering::AcqRel);
                i += 1;
                // Leave CPU for the three daemons on this 2-core machine.
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        Writer {
            stop,
            written,
            errors,
            thread: Some(thread),
        }
    }

    fn written(&self) -> u64 {
        self.written.load(Ordering::Acquire)
    }

    fn wait_written(&self, at_least: u64, timeout: Duration) {
        wait_for("the writer to make progress", timeout, || {
            assert!(
                self.errors.lock().unwrap().is_empty(),
                "writer failed: {:?}",
                self.errors.lock().unwrap()
            );
            self.written() >= at_least
        });
    }

    fn finish(mut self) -> Vec<String> {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.join().expect("writer thread");
        }
        self.errors.lock().unwrap().clone()
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn three_replicas_survive_a_node_kill_and_resync_only_the_delta() {
    let mut nodes = cluster("r3", 3, 81);
    nodes[0].cli_ok(&[
        "volume",
        "create",
        "r3",
        "--size",
        "1GiB",
        "--replicas",
        "3",
        "--fs",
        "xfs",
    ]);
    assert!(
        all_healthy(&nodes[0], "r3", 3),
        "{:?}",
        replica_states(&nodes[0], "r3")
    );
    let mnt = mount_dir(&nodes[0], "mnt");
    nodes[0].cli_ok(&["volume", "mount", "r3", mnt.to_str().unwrap()]);

    let writer = Writer::start(&mnt);
    writer.wait_written(16 * MIB, Duration::from_secs(60));
    let series = "cairn_volume_rebuild_bytes_total{volume=\"r3\"}";
    let rebuilt_before = metric(&nodes[0], series).unwrap_or(0.0) as u64;

    // SIGKILL a replica's node while the writer runs.
    nodes[1].kill9();
    let at_kill = writer.written();
    wait_for(
        "n2's replica recorded faulted",
        Duration::from_secs(30),
        || {
            replica_states(&nodes[0], "r3")
                .iter()
                .any(|(n, s)| n == "n2" && (s == "faulted" || s == "offline"))
        },
    );
    writer.wait_written(at_kill + 24 * MIB, Duration::from_secs(60));
    let written_down = writer.written() - at_kill;

    // Restart: the replica is resynced and healthy again.
    let t = Instant::now();
    nodes[1].restart();
    wait_for(
        "n2's replica healthy again",
        Duration::from_secs(120),
        || all_healthy(&nodes[0], "r3", 3),
    );
    let resync = metric(&nodes[0], series).unwrap_or(0.0) as u64 - rebuilt_before;
    println!(
        "resync after restart: {} MiB copied for {} MiB written while n2 was down, healthy {} ms after restart",
        resync / MIB,
        written_down / MIB,
        t.elapsed().as_millis()
    );
    let errors = writer.finish();
    assert!(errors.is_empty(), "the writer saw errors: {errors:?}");
    assert!(resync > 0, "nothing was copied to the restarted replica");
    // The writer rewrote 64 files, so the delta is bounded by what it
    // touched plus filesystem metadata (journal), far below the volume.
    assert!(
        resync <= 2 * written_down + 64 * MIB && resync < 256 * MIB,
        "resync copied {resync} bytes for {written_down} written while down"
    );

    // Online grow (xfs grows while mounted here) keeps the replicas consistent.
    nodes[0].cli_ok(&["volume", "resize", "r3", "--size", "2GiB"]);
    let report = nodes[0].cli_ok(&["volume", "verify", "r3"]);
    assert!(
        report.contains("across 3 healthy replicas: consistent"),
        "{report}\n{}",
        nodes[0]
            .log()
            .lines()
            .filter(|l| l.contains("replica") || l.contains("rebuil"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    nodes[0].cli_ok(&["volume", "unmount", "r3", mnt.to_str().unwrap()]);
}

#[test]
fn a_volume_with_no_local_replica_moves_to_a_survivor() {
    // n1's small pool keeps the replicas on n2 and n3.
    let mut nodes = cluster_with("rr", &["96MiB", "512MiB", "512MiB"], 85);
    wait_pools_reported(&nodes[0]);
    nodes[0].cli_ok(&[
        "volume",
        "create",
        "far",
        "--size",
        "256MiB",
        "--replicas",
        "2",
    ]);
    assert_eq!(placed_on(&nodes[0], "far"), ["n2", "n3"]);
    let mnt = mount_dir(&nodes[0], "mnt");
    nodes[0].cli_ok(&["volume", "mount", "far", mnt.to_str().unwrap()]);
    let manifest = write_manifest(&mnt, 24, MIB as usize, 0xfa);

    nodes[0].kill9();
    let mnt2 = mount_dir(&nodes[1], "mnt");
    // Attached to the dead node: refused without force.
    let o = nodes[1].cli(&["volume", "mount", "far", mnt2.to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("VolumeAttachedElsewhere"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let t = Instant::now();
    let mut out = String::new();
    wait_for("a forced mount on n2", Duration::from_secs(30), || {
        let o = nodes[1].cli(&["volume", "mount", "far", mnt2.to_str().unwrap(), "--force"]);
        out = String::from_utf8_lossy(&o.stderr).into_owned();
        o.status.success()
    });
    println!(
        "forced mount on n2 {} ms after killing n1",
        t.elapsed().as_millis()
    );
    verify_manifest(&mnt2, &manifest);
    nodes[1].cli_ok(&["volume", "unmount", "far", mnt2.to_str().unwrap()]);
}

#[test]
fn a_stale_engine_is_fenced_after_a_forced_attach() {
    let nodes = cluster("rf", 3, 91);
    let dev1 = raw_three_replicas(&nodes[0], "fence");
    let mut a = vec![0u8; 4 * MIB as usize];
    fill_pattern(&mut a, 1);
    write_direct(&dev1, 0, &a).expect("write through n1");

    // Freeze n1's daemon, start a writer on its device (it blocks), move
    // the volume to n2.
    signal(&nodes[0], libc::SIGSTOP);
    let stale_file = nodes[0].dir.join("stale.bin");
    let mut b = vec![0u8; 4 * MIB as usize];
    fill_pattern(&mut b, 2);
    std::fs::write(&stale_file, &b).expect("stale pattern");
    let mut dd = Command::new("dd")
        .arg(format!("if={}", stale_file.display()))
        .arg(format!("of={}", dev1.display()))
        .args(["bs=1M", "count=4", "oflag=direct", "conv=fsync"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("dd");
    // n1 may have led the metadata group: retry while a new leader is elected.
    let deadline = Instant::now() + Duration::from_secs(30);
    let forced = loop {
        let o = nodes[1].cli(&["volume", "attach", "fence", "--force"]);
        if o.status.success() || Instant::now() > deadline {
            break o;
        }
    };
    let dev2 = PathBuf::from(String::from_utf8_lossy(&forced.stdout).trim().to_string());
    let mut c = vec![0u8; 4 * MIB as usize];
    fill_pattern(&mut c, 3);
    let wrote = forced.status.success() && write_direct(&dev2, 0, &c).is_ok();
    signal(&nodes[0], libc::SIGCONT);
    assert!(
        wrote,
        "forced attach/write on n2 failed: {}",
        String::from_utf8_lossy(&forced.stderr)
    );

    // The old engine's queued writes are refused.
    let deadline = Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let Some(s) = dd.try_wait().expect("dd status") {
            break s;
        }
        assert!(Instant::now() < deadline, "the stale writer never finished");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success(), "the fenced engine's write succeeded");
    // The writer sees EIO (the FUSE errno of a fenced engine).
    let mut err = String::new();
    std::io::Read::read_to_string(&mut dd.stderr.take().expect("stderr"), &mut err)
        .expect("dd stderr");
    assert!(err.contains("Input/output error"), "dd: {err}");
    // n2 sees its own data, never the stale writer's.
    let seen = read_direct(&dev2, 0, c.len()).expect("read on n2");
    assert!(seen == c, "data on n2 was changed by the fenced engine");
    nodes[1].cli_ok(&["volume", "detach", "fence"]);
}

#[test]
fn without_quorum_a_degraded_write_fails_instead_of_completing() {
    let nodes = cluster("rq", 3, 95);
    let dev = raw_three_replicas(&nodes[0], "quorum");
    let mut a = vec![0u8; MIB as usize];
    fill_pattern(&mut a, 7);
    write_direct(&dev, 0, &a).expect("healthy write");

    signal(&nodes[1], libc::SIGSTOP);
    signal(&nodes[2], libc::SIGSTOP);
    let t = Instant::now();
    let r = write_direct(&dev, MIB, &a);
    let took = t.elapsed();
    signal(&nodes[1], libc::SIGCONT);
    signal(&nodes[2], libc::SIGCONT);
    assert!(
        r.is_err(),
        "a write completed while two replicas were unreachable and nothing could be recorded"
    );
    println!(
        "degraded write without quorum failed after {} ms: {r:?}",
        took.as_millis()
    );
    assert!(took < Duration::from_secs(60), "the failure took {took:?}");
    // Nothing was recorded faulted without a quorum; once it is back,
    // writes succeed again.
    wait_for("writes after the pause", Duration::from_secs(60), || {
        write_direct(&dev, 2 * MIB, &a).is_ok()
    });
    assert_eq!(read_direct(&dev, 0, a.len()).expect("read"), a);
    nodes[0].cli_ok(&["volume", "detach", "quorum"]);
}

#[test]
fn five_nodes_replace_lost_replicas_after_the_grace_period() {
    let mut nodes = cluster_args("r5", &["256MiB"; 5], 101, &["--replica-grace-period", "4s"]);
    wait_for("five voters", Duration::from_secs(30), || {
        status(&nodes[0]).is_some_and(|s| {
            s["members"]
                .as_array()
                .is_some_and(|m| m.iter().filter(|m| m["role"] == "voter").count() == 5)
        })
    });
    nodes[0].cli_ok(&[
        "volume",
        "create",
        "heal",
        "--size",
        "512MiB",
        "--replicas",
        "3",
        "--locality",
        "--fs",
        "xfs",
    ]);
    let mnt = mount_dir(&nodes[0], "mnt");
    nodes[0].cli_ok(&["volume", "mount", "heal", mnt.to_str().unwrap()]);
    let before: Vec<String> = replica_states(&nodes[0], "heal")
        .into_iter()
        .map(|r| r.0)
        .collect();
    assert!(before.contains(&"n1".to_string()), "{before:?}");
    let writer = Writer::start(&mnt);
    writer.wait_written(8 * MIB, Duration::from_secs(60));

    // Kill both other replica nodes: the volume keeps serving from n1.
    let victims: Vec<usize> = before
        .iter()
        .filter(|n| *n != "n1")
        .map(|n| n[1..].parse::<usize>().unwrap() - 1)
        .collect();
    for v in &victims {
        nodes[*v].kill9();
    }
    let at_kill = writer.written();
    writer.wait_written(at_kill + 8 * MIB, Duration::from_secs(60));

    // After the grace period the leader replaces them on the survivors.
    let t = Instant::now();
    let restored = || {
        let r = replica_states(&nodes[0], "heal");
        r.len() == 3
            && r.iter().all(|(_, s)| s == "healthy")
            && r.iter()
                .all(|(n, _)| !victims.iter().any(|v| *n == format!("n{}", v + 1)))
    };
    while !restored() {
        if t.elapsed() > Duration::from_secs(120) {
            let logs: String = nodes
                .iter()
                .map(|n| n.log())
                .collect::<Vec<_>>()
                .join("\n")
                .lines()
                .filter(|l| l.contains("replica") || l.contains("rebuil") || l.contains("liveness"))
                .collect::<Vec<_>>()
                .join("\n");
            panic!(
                "replicas not restored: {:?}\n{logs}",
                replica_states(&nodes[0], "heal")
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    println!(
        "replicas restored on {:?} {} ms after the kills",
        replica_states(&nodes[0], "heal"),
        t.elapsed().as_millis()
    );
    let errors = writer.finish();
    assert!(errors.is_empty(), "the writer saw errors: {errors:?}");
    let report = nodes[0].cli_ok(&["volume", "verify", "heal"]);
    assert!(
        report.contains("across 3 healthy replicas: consistent"),
        "{report}"
    );

    // Fewer replicas online, then more again.
    nodes[0].cli_ok(&["volume", "update", "heal", "--replicas", "2"]);
    wait_for("two replicas", Duration::from_secs(30), || {
        replica_states(&nodes[0], "heal").len() == 2
    });
    let o = nodes[0].cli(&["volume", "update", "heal", "--replicas", "9"]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("InvalidReplicas"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    nodes[0].cli_ok(&["volume", "update", "heal", "--replicas", "3"]);
    wait_for("three healthy replicas", Duration::from_secs(60), || {
        all_healthy(&nodes[0], "heal", 3)
    });
    nodes[0].cli_ok(&["volume", "unmount", "heal", mnt.to_str().unwrap()]);
    // A killed node's stale replica is freed when it returns.
    let v0 = victims[0];
    nodes[v0].restart();
    wait_for(
        "the returning node frees its stale replica",
        Duration::from_secs(30),
        || metric(&nodes[v0], "cairn_pool_allocated_bytes") == Some(0.0),
    );
}

/// The position of the 4 KiB block equal to `block` in `file` (one only).
fn find_block(file: &Path, block: &[u8]) -> u64 {
    use std::io::Read;
    let mut f = std::fs::File::open(file).expect("pool file");
    let mut buf = vec![0u8; MIB as usize];
    let (mut at, mut found) = (0u64, Vec::new());
    loop {
        let n = f.read(&mut buf).expect("read pool file");
        if n == 0 {
            break;
        }
        for (i, chunk) in buf[..n].chunks(4096).enumerate() {
            if chunk == block {
                found.push(at + (i * 4096) as u64);
            }
        }
        at += n as u64;
    }
    assert_eq!(
        found.len(),
        1,
        "the block is in the pool file once: {found:?}"
    );
    found[0]
}

/// A replica whose node's kernel restarted (a power loss) may lack writes
/// it acknowledged but never flushed. Here n2 loses one that way (the
/// block is put back to its flushed content while n2 is down, and n2 comes
/// back under a new boot id before the engine notices anything): the
/// engine never reads the stale block from it, and it is rebuilt, so it
/// holds the right data once it is the last replica.
#[test]
fn a_replica_that_lost_unflushed_writes_in_a_reboot_is_rebuilt_before_it_is_read() {
    let boot = test_root().join(format!("rg-boot-id-{}", std::process::id()));
    std::fs::write(&boot, "boot-1\n").expect("boot id file");
    let boot_arg = boot.to_string_lossy().into_owned();
    let mut nodes = cluster_args(
        "rg",
        &["96MiB", "512MiB", "512MiB"],
        161,
        &["--boot-id-file", &boot_arg],
    );
    wait_pools_reported(&nodes[0]);
    nodes[0].cli_ok(&[
        "volume",
        "create",
        "gen",
        "--size",
        "64MiB",
        "--fs",
        "none",
        "--replicas",
        "2",
    ]);
    assert_eq!(placed_on(&nodes[0], "gen"), ["n2", "n3"]);
    let dev = PathBuf::from(nodes[0].cli_ok(&["volume", "attach", "gen"]).trim());
    let at = 8 * MIB + 4096;
    let (mut flushed, mut unflushed) = (vec![0u8; 4096], vec![0u8; 4096]);
    fill_pattern(&mut flushed, 0x6e01);
    fill_pattern(&mut unflushed, 0x6e02);
    write_direct(&dev, at, &flushed).expect("flushed write");
    write_direct_unflushed(&dev, at, &unflushed).expect("acknowledged write");

    // n2 "loses power": the acknowledged write never reached its disk.
    nodes[1].kill9();
    let pool = nodes[1].disk_path();
    let pos = find_block(&pool, &unflushed);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&pool)
            .expect("pool file");
        f.write_all_at(&flushed, pos).expect("revert the block");
        f.sync_all().expect("sync");
    }
    std::fs::write(&boot, "boot-2\n").expect("new boot id");
    nodes[1].restart();
    assert!(
        nodes[1]
            .log()
            .contains("the kernel restarted since this daemon last ran"),
        "{}",
        nodes[1].last_log()
    );

    // Reads never return the stale block.
    for _ in 0..10 {
        assert!(
            read_direct(&dev, at, 4096).expect("read") == unflushed,
            "read the block n2 lost"
        );
    }
    // Healthy in the state is not enough (n2 starts out healthy there):
    // n2 must have been rebuilt, which is when it drops its unclean mark.
    wait_for(
        "n2's replica rebuilt and healthy",
        Duration::from_secs(60),
        || {
            nodes[1].log().contains("unclean replica serves again")
                && all_healthy(&nodes[0], "gen", 2)
        },
    );
    // With n3 gone, n2 alone serves the volume: it holds the write now.
    nodes[2].kill9();
    let alone = read_direct(&dev, at, 4096)
        .unwrap_or_else(|e| panic!("read from n2 alone: {e}; n1:\n{}", nodes[0].last_log()));
    assert!(alone == unflushed, "n2 was not resynced");
    nodes[0].cli_ok(&["volume", "detach", "gen"]);
    let _ = std::fs::remove_file(&boot);
}

/// Sends one frame to a replica's data port; returns the reply's status
/// and fence, or `None` when the replica closed the connection.
fn exchange(
    s: &mut std::net::TcpStream,
    req: &cairn_proto::frame::Request,
    payload: &[u8],
) -> Option<(u32, u64)> {
    use std::io::{Read, Write};
    let mut out = req.encode().to_vec();
    out.extend_from_slice(payload);
    s.write_all(&out).ok()?;
    let mut hdr = [0u8; cairn_proto::frame::REP_LEN];
    s.read_exact(&mut hdr).ok()?;
    let rep = cairn_proto::frame::Reply::decode(&hdr).expect("a data reply");
    let mut body = vec![0u8; rep.length as usize];
    s.read_exact(&mut body).ok()?;
    assert_eq!(crc32fast::hash(&body), rep.crc, "reply checksum");
    Some((rep.status, rep.fence))
}

/// Whatever arrives on a replica's data port (wrong version, cluster,
/// epoch, checksum, op or size, or no frame at all) is answered with the
/// matching error or a closed connection; the replica keeps serving its
/// engine, and the volume's data and replica states do not change.
#[test]
fn hostile_frames_on_the_data_port_change_nothing() {
    use cairn_proto::frame::{self, Request};
    let nodes = cluster("rh", 2, 171);
    nodes[0].cli_ok(&[
        "volume",
        "create",
        "hx",
        "--size",
        "64MiB",
        "--fs",
        "none",
        "--replicas",
        "2",
    ]);
    let dev = PathBuf::from(nodes[0].cli_ok(&["volume", "attach", "hx"]).trim());
    let mut data = vec![0u8; MIB as usize];
    fill_pattern(&mut data, 0x4858);
    write_direct(&dev, 0, &data).expect("write");
    let v = nodes[0].inspect("hx");
    let volume: cairn_node::types::Id128 = v["id"].as_str().expect("id").parse().expect("id");
    let epoch = v["epoch"].as_u64().expect("epoch");
    let (_, c) = nodes[0].api("GET", "/v1/cluster", None);
    let cluster: cairn_node::types::Id128 = c["cluster_id"]
        .as_str()
        .expect("cluster id")
        .parse()
        .expect("cluster id");
    let zeros = vec![0u8; 4096];
    let good = Request {
        version: frame::VERSION,
        op: frame::OP_WRITE,
        cluster: cluster.0,
        volume: volume.0,
        epoch,
        offset: 0,
        length: zeros.len() as u64,
        crc: crc32fast::hash(&zeros),
    };
    let connect = || std::net::TcpStream::connect(nodes[1].peer_address()).expect("data port");
    let mut s = connect();
    let answer = |s: &mut std::net::TcpStream, r: Request, p: &[u8]| {
        exchange(s, &r, p).expect("an answer, not a closed connection")
    };
    let r = Request {
        version: frame::VERSION + 7,
        ..good.clone()
    };
    assert_eq!(answer(&mut s, r, &zeros).0, frame::UNSUPPORTED);
    let r = Request {
        cluster: [7; 16],
        ..good.clone()
    };
    assert_eq!(answer(&mut s, r, &zeros).0, frame::INVALID);
    let r = Request {
        epoch: epoch - 1,
        ..good.clone()
    };
    assert_eq!(answer(&mut s, r, &zeros), (frame::FENCED, epoch));
    let r = Request {
        crc: good.crc ^ 1,
        ..good.clone()
    };
    assert_eq!(answer(&mut s, r, &zeros).0, frame::CORRUPT);
    let r = Request {
        op: 99,
        length: 0,
        ..good.clone()
    };
    assert_eq!(answer(&mut s, r, &[]).0, frame::INVALID);
    let r = Request {
        op: frame::OP_READ,
        length: 1 << 40,
        ..good.clone()
    };
    assert_eq!(answer(&mut s, r, &[]).0, frame::INVALID);
    let r = Request {
        offset: u64::MAX - 10,
        ..good.clone()
    };
    assert_eq!(answer(&mut s, r, &zeros).0, frame::INVALID);
    let r = Request {
        volume: [9; 16],
        ..good.clone()
    };
    assert_eq!(answer(&mut s, r, &zeros).0, frame::GONE);
    // A payload larger than any frame may carry: answered, then closed.
    let r = Request {
        length: 1 << 30,
        ..good.clone()
    };
    assert_eq!(exchange(&mut s, &r, &[]).map(|a| a.0), Some(frame::INVALID));
    assert!(
        exchange(&mut s, &good, &zeros).is_none(),
        "still open after a huge frame"
    );
    // Bytes that are no frame at all, and a frame cut short.
    {
        use std::io::Write;
        let mut g = connect();
        let mut junk = frame::REQ_MAGIC.to_le_bytes().to_vec();
        junk.extend_from_slice(&[0xa5; 200]);
        let _ = g.write_all(&junk);
        let mut cut = connect();
        let _ = cut.write_all(&good.encode()[..30]);
    }

    // The engine's replica on n2 served on: no fault, same data, verify
    // finds both replicas equal.
    let mut more = vec![0u8; MIB as usize];
    fill_pattern(&mut more, 0x4859);
    write_direct(&dev, MIB, &more).expect("write after the hostile frames");
    assert_eq!(read_direct(&dev, 0, data.len()).expect("read"), data);
    assert!(
        all_healthy(&nodes[0], "hx", 2),
        "{:?}",
        replica_states(&nodes[0], "hx")
    );
    let report = nodes[0].cli_ok(&["volume", "verify", "hx", "-o", "json"]);
    let report: serde_json::Value = serde_json::from_str(&report).expect("verify report");
    assert_eq!(report["replicas_compared"], 2, "{report}");
    assert_eq!(
        report["mismatched_extents"],
        serde_json::json!([]),
        "{report}"
    );
    let open = metric(&nodes[1], "cairn_data_connections").expect("connection gauge");
    assert!(open >= 1.0, "{open}");
    nodes[0].cli_ok(&["volume", "detach", "hx"]);
}

/// A graceful stop of a node that serves another node's engine closes the
/// data connections it serves (their threads block in read) and joins
/// every thread it started (`TestNode::terminate` checks the log for it);
/// the writer on another node goes on degraded (two of three voters keep
/// the quorum), and the replica comes back healthy after the restart.
#[test]
fn a_stopping_replica_node_closes_its_data_connections_and_joins_its_threads() {
    let mut nodes = cluster("rstop", 3, 99);
    let dev = raw_three_replicas(&nodes[1], "served");
    let mut a = vec![0u8; MIB as usize];
    fill_pattern(&mut a, 11);
    write_direct(&dev, 0, &a).expect("write through n2 to every replica");
    let status = nodes[0].terminate().expect("was running");
    assert!(status.success(), "exit {status}; log:\n{}", nodes[0].log());
    write_direct(&dev, MIB, &a).expect("write with n1 stopped");
    nodes[0].restart();
    wait_for("every replica healthy", Duration::from_secs(60), || {
        all_healthy(&nodes[1], "served", 3)
    });
    assert_eq!(read_direct(&dev, MIB, a.len()).expect("read"), a);
    nodes[1].cli_ok(&["volume", "detach", "served"]);
}
