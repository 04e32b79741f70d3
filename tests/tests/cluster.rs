//! Real daemons on 127.0.0.x form a cluster whose metadata is replicated
//! with Raft: joining, metadata visible through every node, leader failover,
//! a killed node catching up, and refused joins.

// Test code: an unwrap that fails is a failed test.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::{Duration, Instant};

use cairn_tests::*;
use serde_json::Value;

fn voter_count(status: &Value) -> usize {
    status["members"]
        .as_array()
        .map(|m| m.iter().filter(|m| m["role"] == "voter").count())
        .unwrap_or(0)
}

fn leader_index(nodes: &[TestNode]) -> usize {
    let s = status(&nodes[0]).expect("status");
    let leader = s["leader"].as_str().expect("leader").to_string();
    (0..nodes.len())
        .find(|i| format!("n{}", i + 1) == leader)
        .expect("leader among nodes")
}

#[test]
fn three_nodes_replicate_metadata_and_survive_leader_loss() {
    let mut nodes = cluster("c3", 3, 21);
    let s = status(&nodes[1]).unwrap();
    let voters = voter_count(&s);
    assert_eq!(voters, 3, "{s}");
    // Metadata created through any node is visible through every node.
    for (i, n) in nodes.iter().enumerate() {
        n.cli_ok(&[
            "volume",
            "create",
            &format!("from-n{}", i + 1),
            "--size",
            "1GiB",
        ]);
    }
    for n in &nodes {
        wait_for("volumes on every node", Duration::from_secs(5), || {
            names(n).len() == 3
        });
    }
    // A volume attaches on a node without its replica (all I/O remote),
    // and not on a second node while attached.
    let dev = nodes[0].cli_ok(&["volume", "attach", "from-n2"]);
    assert!(dev.trim().starts_with("/dev/loop"), "{dev}");
    let o = nodes[2].cli(&["volume", "attach", "from-n2"]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("VolumeAttachedElsewhere"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    nodes[0].cli_ok(&["volume", "detach", "from-n2"]);

    // SIGKILL the leader; a write through a survivor succeeds within 5 s.
    let li = leader_index(&nodes);
    nodes[li].kill9();
    let survivor = (li + 1) % 3;
    let t = Instant::now();
    let deadline = t + Duration::from_secs(5);
    loop {
        let o = nodes[survivor].cli(&["volume", "create", "after-failover", "--size", "1GiB"]);
        if o.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no metadata write within 5 s of killing the leader: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    println!(
        "metadata write through a survivor succeeded {} ms after SIGKILL of the leader",
        t.elapsed().as_millis()
    );
    // The new leader marks the killed node down after the timeout (3 s).
    let killed = format!("n{}", li + 1);
    let t = Instant::now();
    wait_for(
        "the killed node marked down",
        Duration::from_secs(15),
        || node_state(&nodes[survivor], &killed).as_deref() == Some("down"),
    );
    println!(
        "killed node marked down {} ms after the failover write",
        t.elapsed().as_millis()
    );
    assert!(
        t.elapsed() >= Duration::from_millis(1500),
        "marked down before the timeout could have passed"
    );
    assert_eq!(
        node_state(&nodes[survivor], &format!("n{}", survivor + 1)).as_deref(),
        Some("up")
    );
    // The killed node restarts, catches up and is marked up again.
    nodes[li].restart();
    wait_for(
        "the restarted node to catch up",
        Duration::from_secs(15),
        || names(&nodes[li]).contains(&"after-failover".to_string()),
    );
    wait_for(
        "the restarted node marked up",
        Duration::from_secs(10),
        || node_state(&nodes[survivor], &killed).as_deref() == Some("up"),
    );

    // Refused joins change nothing.
    let before = nodes[0]
        .api("GET", "/v1/nodes", None)
        .1
        .as_array()
        .unwrap()
        .len();
    let join = nodes[survivor].peer_address();
    let err = join_refused(
        "c3-dup",
        "127.0.0.31",
        &["--node-name", "n2", "--join", &join],
    );
    assert!(err.contains("already used"), "duplicate name: {err}");
    let err = join_refused(
        "c3-wrongid",
        "127.0.0.32",
        &[
            "--node-name",
            "x",
            "--join",
            &join,
            "--cluster-id",
            "00000000-0000-0000-0000-000000000001",
        ],
    );
    assert!(
        err.contains("not 00000000-0000-0000-0000-000000000001"),
        "wrong cluster id: {err}"
    );
    let err = join_refused(
        "c3-unreachable",
        "127.0.0.33",
        &["--node-name", "y", "--join", "127.0.0.34:9"],
    );
    assert!(
        err.contains("cannot join through 127.0.0.34:9"),
        "unreachable: {err}"
    );
    assert_eq!(
        nodes[0]
            .api("GET", "/v1/nodes", None)
            .1
            .as_array()
            .unwrap()
            .len(),
        before
    );
}

/// Runs a daemon that must fail to join; returns its stderr.
fn join_refused(tag: &str, ip: &str, args: &[&str]) -> String {
    let node = TestNode::prepare(tag, ip, "64MiB", &[]);
    let mut cmd = Command::new(cairn_bin());
    cmd.args([
        "node",
        "run",
        "--docker-plugin-socket",
        "none",
        "--data-dir",
    ])
    .arg(node.dir.join("data"))
    .arg("--disk-file")
    .arg(format!("{}:64MiB", node.disk_path().display()))
    .args([
        "--listen",
        &format!("{ip}:{}", node.port),
        "--peer-listen",
        &node.peer_address(),
    ])
    .args(args);
    expect_failure(cmd, Duration::from_secs(40))
}

fn signal(node: &TestNode, sig: i32) {
    // SAFETY: kill(2) on a child process this test started.
    unsafe { libc::kill(node.pid(), sig) };
}

#[test]
fn quorum_loss_fails_cleanly_and_full_restart_keeps_everything() {
    let mut nodes = cluster("c3q", 3, 41);
    nodes[0].cli_ok(&["volume", "create", "before-pause", "--size", "1GiB"]);
    // Pause two of the three voters: nothing can commit, and the API says so
    // within a bounded time instead of hanging.
    let li = leader_index(&nodes);
    let kept = (li + 1) % 3;
    let paused: Vec<usize> = (0..3).filter(|i| *i != kept).collect();
    for i in &paused {
        signal(&nodes[*i], libc::SIGSTOP);
    }
    let t = Instant::now();
    let o = nodes[kept].cli(&["volume", "create", "during-pause", "--size", "1GiB"]);
    let took = t.elapsed();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    // Reads are linearizable: without a quorum they are refused too,
    // rather than answered from possibly stale state.
    let t = Instant::now();
    let (read_code, read_err) = nodes[kept].api("GET", "/v1/volumes", None);
    let read_took = t.elapsed();
    for i in &paused {
        signal(&nodes[*i], libc::SIGCONT);
    }
    assert!(!o.status.success(), "a write committed without a quorum");
    assert!(
        err.contains("MetadataError") && err.contains("unavailable"),
        "{err}"
    );
    assert!(took < Duration::from_secs(15), "the refusal took {took:?}");
    assert_eq!(read_code, 503, "a read without a quorum: {read_err}");
    assert_eq!(read_err["error"]["code"], "MetadataError", "{read_err}");
    assert!(
        read_took < Duration::from_secs(15),
        "the read refusal took {read_took:?}"
    );
    println!(
        "without a quorum the API refused after {} ms: {}",
        took.as_millis(),
        err.trim()
    );
    // Recovery: writes succeed again and nothing acknowledged was lost.
    wait_for("writes after SIGCONT", Duration::from_secs(20), || {
        nodes[kept]
            .cli(&["volume", "create", "after-pause", "--size", "1GiB"])
            .status
            .success()
            || names(&nodes[kept]).contains(&"after-pause".to_string())
    });
    for n in &nodes {
        wait_for(
            "the recovered cluster to agree",
            Duration::from_secs(10),
            || {
                let v = names(n);
                v.contains(&"before-pause".to_string()) && v.contains(&"after-pause".to_string())
            },
        );
    }

    // Stop every node at once, start them again: all committed metadata is there.
    for n in nodes.iter_mut() {
        n.kill9();
    }
    for n in nodes.iter_mut() {
        n.restart();
    }
    wait_for(
        "a leader after the full restart",
        Duration::from_secs(30),
        || {
            nodes
                .iter()
                .all(|n| status(n).is_some_and(|s| !s["leader"].is_null()))
        },
    );
    for n in &nodes {
        let v = names(n);
        assert!(
            v.contains(&"before-pause".to_string()) && v.contains(&"after-pause".to_string()),
            "{v:?}"
        );
        assert!(
            !v.contains(&"during-pause".to_string()),
            "a refused write appeared: {v:?}"
        );
    }
    nodes[1].cli_ok(&["volume", "create", "after-restart", "--size", "1GiB"]);
}

#[test]
fn a_node_down_during_compaction_catches_up_from_a_snapshot() {
    let mut nodes = cluster("c3s", 3, 51);
    let down = 2;
    nodes[down].kill9();
    // More than a snapshot interval of entries while it is down.
    let client = cairn_node::cli::client::Client::new(&nodes[0].api_url()).unwrap();
    let t = Instant::now();
    for i in 0..1100 {
        let body = serde_json::json!({ "name": format!("bulk-{i}"), "size": "1GiB" });
        let r = client
            .request("POST", "/v1/volumes", Some(&body))
            .expect("API");
        assert_eq!(
            r.status,
            201,
            "create bulk-{i}: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
    println!(
        "1100 creates through the API took {} ms",
        t.elapsed().as_millis()
    );
    nodes[down].restart();
    let deadline = Instant::now() + Duration::from_secs(30);
    while names(&nodes[down]).len() != 1100 {
        assert!(
            Instant::now() < deadline,
            "the restarted node did not catch up: it lists {} volumes; its log:\n{}\nleader log:\n{}",
            names(&nodes[down]).len(),
            nodes[down].last_log(),
            nodes[0].last_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        nodes[down]
            .last_log()
            .contains("installed a metadata snapshot from the leader"),
        "the node caught up without a snapshot; log:\n{}",
        nodes[down].last_log()
    );
}

#[test]
fn five_nodes_form_with_five_voters() {
    let mut nodes = cluster("c5", 5, 61);
    let s = status(&nodes[4]).unwrap();
    let voters = voter_count(&s);
    assert_eq!(voters, 5, "{s}");
    nodes[3].cli_ok(&["volume", "create", "five", "--size", "1GiB", "--locality"]);
    for n in &nodes {
        wait_for("the volume on every node", Duration::from_secs(5), || {
            names(n).contains(&"five".to_string())
        });
    }
    remove_nodes(&mut nodes);
}

/// Continues the five-node scenario: removing nodes.
fn remove_nodes(nodes: &mut [TestNode]) {
    let o = nodes[0].cli(&["node", "rm", "ghost"]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("NodeNotFound"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // n4 holds the only copy of "five": refused unless forced.
    nodes[3].kill9();
    let o = nodes[1].cli(&["node", "rm", "n4"]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        !o.status.success() && err.contains("NodeRemoveRefused") && err.contains("five"),
        "{err}"
    );
    assert_eq!(
        nodes[0]
            .api("GET", "/v1/nodes", None)
            .1
            .as_array()
            .unwrap()
            .len(),
        5
    );
    nodes[1].cli_ok(&["node", "rm", "n4", "--force"]);
    for n in nodes.iter().filter(|n| n.ip != nodes[3].ip) {
        wait_for("the removal everywhere", Duration::from_secs(10), || {
            status(n).is_some_and(|s| s["members"].as_array().map(|m| m.len()) == Some(4))
                && n.api("GET", "/v1/nodes", None)
                    .1
                    .as_array()
                    .map(|a| a.len())
                    == Some(4)
        });
    }
    nodes[4].cli_ok(&["volume", "create", "after-removal", "--size", "1GiB"]);
}

/// xorshift64*: a tiny deterministic generator, so a failing run can be
/// replayed from its printed seed (`CAIRN_TEST_SEED`).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fate {
    /// Acknowledged: must be present exactly once.
    Present,
    /// Acknowledged delete: must be absent.
    Absent,
    /// The request failed or its answer was lost: either is allowed.
    Unknown,
}

#[test]
fn randomized_writes_with_leader_kills_lose_and_duplicate_nothing() {
    let seed: u64 = std::env::var("CAIRN_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock")
                .as_nanos() as u64
                | 1
        });
    println!("randomized cluster test seed: {seed} (replay with CAIRN_TEST_SEED={seed})");
    let mut rng = Rng(seed);
    let mut nodes = cluster("c3r", 3, 71);
    // name -> (fate, index of the node holding its data)
    let mut fates: std::collections::BTreeMap<String, (Fate, usize)> = Default::default();
    let mut down: Option<usize> = None;
    let mut killer: Option<std::thread::JoinHandle<()>> = None;
    let (mut kills, mut acked, mut failed) = (0, 0, 0);
    const OPS: usize = 220;
    for op in 0..OPS {
        let live: Vec<usize> = (0..3).filter(|i| Some(*i) != down).collect();
        let roll = rng.below(100);
        if roll < 8 {
            // Restart the node that is down, or SIGKILL the current leader.
            if let Some(d) = down.take() {
                if let Some(k) = killer.take() {
                    k.join().expect("killer thread");
                }
                nodes[d].kill9(); // reaps the killed process
                nodes[d].restart();
            } else {
                let leader =
                    status(&nodes[live[0]]).and_then(|s| s["leader"].as_str().map(str::to_string));
                let victim = leader
                    .and_then(|l| (0..3).find(|i| format!("n{}", i + 1) == l))
                    .unwrap_or(live[rng.below(live.len() as u64) as usize]);
                // SIGKILL a few milliseconds later, while the next writes
                // (forwarded to this leader) are in flight.
                let pid = nodes[victim].pid();
                let delay = Duration::from_millis(rng.below(40));
                killer = Some(std::thread::spawn(move || {
                    std::thread::sleep(delay);
                    // SAFETY: kill(2) on a child this test started and has not reaped.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }));
                down = Some(victim);
                kills += 1;
            }
            continue;
        }
        let deletable: Vec<String> = fates
            .iter()
            .filter(|(_, (f, at))| *f == Fate::Present && Some(*at) != down)
            .map(|(n, _)| n.clone())
            .collect();
        if roll < 25 && !deletable.is_empty() {
            let name = deletable[rng.below(deletable.len() as u64) as usize].clone();
            let at = fates[&name].1;
            let (code, _) = nodes[at].api("DELETE", &format!("/v1/volumes/{name}"), None);
            let fate = if code == 204 || code == 200 {
                acked += 1;
                Fate::Absent
            } else {
                failed += 1;
                Fate::Unknown
            };
            fates.insert(name, (fate, at));
        } else {
            let at = live[rng.below(live.len() as u64) as usize];
            let name = format!("r{op}");
            let body = serde_json::json!({"name": name, "size": "1GiB"});
            let (code, _) = nodes[at].api("POST", "/v1/volumes", Some(&body));
            let fate = if code == 201 {
                acked += 1;
                Fate::Present
            } else {
                failed += 1;
                Fate::Unknown
            };
            fates.insert(name, (fate, at));
        }
    }
    if let Some(d) = down.take() {
        if let Some(k) = killer.take() {
            k.join().expect("killer thread");
        }
        nodes[d].kill9();
        nodes[d].restart();
    }
    println!(
        "{OPS} operations: {acked} acknowledged, {failed} failed or ambiguous, {kills} leader kills"
    );
    assert!(kills >= 5, "too few kills to mean anything: {kills}");
    assert!(acked >= 100, "too few acknowledged writes: {acked}");
    // Every node converges on the same volumes, and that set agrees with
    // every acknowledged write.
    let listing = |n: &TestNode| -> Option<Vec<String>> {
        let (code, v) = n.api("GET", "/v1/volumes", None);
        (code == 200).then(|| {
            v.as_array()
                .expect("list")
                .iter()
                .map(|x| x["name"].as_str().expect("name").to_string())
                .collect()
        })
    };
    let mut lists = Vec::new();
    for n in &nodes {
        let mut got = None;
        wait_for("a linearizable listing", Duration::from_secs(30), || {
            got = listing(n);
            got.is_some()
        });
        lists.push(got.expect("listing"));
    }
    assert!(
        lists.windows(2).all(|w| w[0] == w[1]),
        "nodes disagree after the run (seed {seed})"
    );
    let list = &lists[0];
    for (name, (fate, _)) in &fates {
        let count = list.iter().filter(|n| *n == name).count();
        match fate {
            Fate::Present => assert_eq!(count, 1, "acknowledged {name} (seed {seed})"),
            Fate::Absent => assert_eq!(count, 0, "deleted {name} is back (seed {seed})"),
            Fate::Unknown => assert!(count <= 1, "{name} twice (seed {seed})"),
        }
    }
    for name in list {
        assert!(
            fates.contains_key(name),
            "{name} was never written (seed {seed})"
        );
    }
}
