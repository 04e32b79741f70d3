//! Real daemons on 127.0.0.x form a cluster whose metadata is replicated
//! with Raft: joining, metadata visible through every node, leader failover,
//! a killed node catching up, and refused joins.

use std::process::Command;
use std::time::{Duration, Instant};

use cairn_tests::*;
use serde_json::Value;

fn status(n: &TestNode) -> Option<Value> {
    let r = cairn_node::cli::client::Client::new(&n.api_url())
        .ok()?
        .request("GET", "/v1/cluster", None)
        .ok()?;
    serde_json::from_slice(&r.body).ok()
}

fn names(n: &TestNode) -> Vec<String> {
    let (_, v) = n.api("GET", "/v1/volumes", None);
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|x| x["name"].as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Starts a bootstrap node and `n - 1` joiners on 127.0.0.(base+i).
fn cluster(tag: &str, n: usize, base: u8) -> Vec<TestNode> {
    let first = TestNode::start_on(
        &format!("{tag}-1"),
        &format!("127.0.0.{base}"),
        "256MiB",
        &["--node-name", "n1"],
    );
    let join = first.peer_address();
    let mut nodes = vec![first];
    for i in 2..=n {
        let name = format!("n{i}");
        let node = TestNode::start_on(
            &format!("{tag}-{i}"),
            &format!("127.0.0.{}", base as usize + i - 1),
            "256MiB",
            &["--node-name", &name, "--join", &join],
        );
        nodes.push(node);
    }
    wait_for(
        "every node to see the same leader and all members",
        Duration::from_secs(30),
        || {
            let all: Vec<Option<Value>> = nodes.iter().map(status).collect();
            let leaders: Vec<_> = all
                .iter()
                .map(|s| s.as_ref().map(|s| s["leader"].clone()))
                .collect();
            all.iter().all(|s| {
                s.as_ref().is_some_and(|s| {
                    s["members"].as_array().map(|m| m.len()) == Some(n) && !s["leader"].is_null()
                })
            }) && leaders.windows(2).all(|w| w[0] == w[1])
        },
    );
    nodes
}

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
    // Data operations stay on the node holding the replica.
    let o = nodes[0].cli(&["volume", "attach", "from-n2"]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("VolumeNotLocal"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

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
    // The killed node restarts and catches up.
    nodes[li].restart();
    wait_for(
        "the restarted node to catch up",
        Duration::from_secs(15),
        || names(&nodes[li]).contains(&"after-failover".to_string()),
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
    cmd.args(["node", "run", "--data-dir"])
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
    for i in &paused {
        signal(&nodes[*i], libc::SIGCONT);
    }
    assert!(!o.status.success(), "a write committed without a quorum");
    assert!(
        err.contains("MetadataError") && err.contains("unavailable"),
        "{err}"
    );
    assert!(took < Duration::from_secs(15), "the refusal took {took:?}");
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
    nodes[3].cli_ok(&["volume", "create", "five", "--size", "1GiB"]);
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
