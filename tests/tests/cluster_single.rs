//! A single node is a one-voter cluster: its metadata goes through the Raft
//! log, it registers itself with its labels, heartbeats its pool usage, and
//! everything committed survives SIGKILL.

use std::time::Duration;

use cairn_tests::*;
use serde_json::Value;

fn json(node: &TestNode, args: &[&str]) -> Value {
    let mut all = vec!["-o", "json"];
    all.extend_from_slice(args);
    serde_json::from_str(&node.cli_ok(&all)).expect("CLI JSON")
}

#[test]
fn single_node_cluster_status_nodes_and_restart() {
    let mut node = TestNode::start_with("cluster1", "1GiB", &["--labels", "zone=a,rack=r1"]);
    let c = json(&node, &["cluster", "status"]);
    assert_eq!(c["leader"], "test", "{c}");
    assert!(c["term"].as_u64().unwrap() >= 2, "{c}");
    assert_eq!(c["members"].as_array().unwrap().len(), 1, "{c}");
    assert_eq!(c["members"][0]["role"], "voter");
    let cluster_id = c["cluster_id"].as_str().unwrap().to_string();
    let commit = c["commit_index"].as_u64().unwrap();

    let nodes = json(&node, &["node", "ls"]);
    let me = &nodes[0];
    assert_eq!(
        (
            me["name"].as_str(),
            me["state"].as_str(),
            me["role"].as_str()
        ),
        (Some("test"), Some("up"), Some("voter"))
    );
    assert_eq!(me["labels"]["zone"], "a");
    assert_eq!(me["labels"]["rack"], "r1");
    let table = node.cli_ok(&["node", "ls"]);
    assert!(
        table.contains("zone=a") && table.contains("rack=r1") && table.contains("up"),
        "{table}"
    );
    // Heartbeats report the pool.
    wait_for(
        "a heartbeat with pool usage",
        Duration::from_secs(15),
        || {
            json(&node, &["node", "ls"])[0]["pool_capacity_bytes"].as_u64()
                == node.pool()["capacity_bytes"].as_u64()
        },
    );

    // Metadata changes are Raft entries: the commit index moves.
    for i in 0..20 {
        node.cli_ok(&["volume", "create", &format!("v{i}"), "--size", "1GiB"]);
    }
    let c2 = json(&node, &["cluster", "status"]);
    assert!(c2["commit_index"].as_u64().unwrap() >= commit + 20, "{c2}");
    assert_eq!(c2["applied_index"], c2["commit_index"]);
    let r = cairn_node::cli::client::Client::new(&node.api_url())
        .unwrap()
        .request("GET", "/metrics", None)
        .unwrap();
    let text = String::from_utf8(r.body).unwrap();
    assert!(text.contains("cairn_raft_is_leader 1"), "{text}");
    assert!(
        text.contains(&format!("cairn_raft_term {}", c2["term"])),
        "{text}"
    );

    // SIGKILL: every acknowledged command is there after the restart, and
    // the node is still the same cluster member.
    node.kill9();
    node.restart();
    assert_eq!(
        node.api("GET", "/v1/volumes", None)
            .1
            .as_array()
            .unwrap()
            .len(),
        20
    );
    let c3 = json(&node, &["cluster", "status"]);
    assert_eq!(c3["cluster_id"], cluster_id.as_str());
    assert!(
        c3["term"].as_u64().unwrap() > c["term"].as_u64().unwrap(),
        "a restart starts a new term: {c3}"
    );
    assert_eq!(json(&node, &["node", "ls"]).as_array().unwrap().len(), 1);
}
