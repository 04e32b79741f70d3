//! Clusters of real daemons on 127.0.0.x, and reading their state.

use std::time::Duration;

use cairn_node::cli::client::Client;
use serde_json::Value;

use crate::{wait_for, TestNode};

pub fn status(n: &TestNode) -> Option<Value> {
    let r = Client::new(&n.api_url())
        .ok()?
        .request("GET", "/v1/cluster", None)
        .ok()?;
    serde_json::from_slice(&r.body).ok()
}

pub fn names(n: &TestNode) -> Vec<String> {
    let (_, v) = n.api("GET", "/v1/volumes", None);
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|x| x["name"].as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Short liveness settings so that `down`/`up` marking is observable.
pub const LIVENESS: [&str; 4] = ["--heartbeat-interval", "500ms", "--node-down-timeout", "3s"];

/// The state (`up`/`down`) of node `name` as `node` reports it.
pub fn node_state(n: &TestNode, name: &str) -> Option<String> {
    let (code, v) = n.api("GET", "/v1/nodes", None);
    if code != 200 {
        return None;
    }
    v.as_array()?
        .iter()
        .find(|x| x["name"] == name)
        .and_then(|x| x["state"].as_str().map(str::to_string))
}

/// Starts a bootstrap node and `n - 1` joiners on 127.0.0.(base+i), with
/// 256 MiB pools and [`LIVENESS`] settings; waits until all agree.
pub fn cluster(tag: &str, n: usize, base: u8) -> Vec<TestNode> {
    cluster_with(tag, &vec!["256MiB"; n], base)
}

/// Like [`cluster`], with one pool size per node.
pub fn cluster_with(tag: &str, pools: &[&str], base: u8) -> Vec<TestNode> {
    cluster_args(tag, pools, base, &[])
}

/// Like [`cluster_with`], with extra daemon arguments for every node.
pub fn cluster_args(tag: &str, pools: &[&str], base: u8, extra: &[&str]) -> Vec<TestNode> {
    let n = pools.len();
    let mut args: Vec<&str> = vec!["--node-name", "n1"];
    args.extend(LIVENESS);
    args.extend(extra);
    let first = TestNode::start_on(
        &format!("{tag}-1"),
        &format!("127.0.0.{base}"),
        pools[0],
        &args,
    );
    let join = first.peer_address();
    let mut nodes = vec![first];
    for i in 2..=n {
        let name = format!("n{i}");
        let mut args: Vec<&str> = vec!["--node-name", &name, "--join", &join];
        args.extend(LIVENESS);
        args.extend(extra);
        let node = TestNode::start_on(
            &format!("{tag}-{i}"),
            &format!("127.0.0.{}", base as usize + i - 1),
            pools[i - 1],
            &args,
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

/// The value of one Prometheus sample (`name{labels}`) from a node's /metrics.
pub fn metric(n: &TestNode, series: &str) -> Option<f64> {
    let r = Client::new(&n.api_url())
        .ok()?
        .request("GET", "/metrics", None)
        .ok()?;
    let text = String::from_utf8_lossy(&r.body).into_owned();
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// `(node name, state)` of each replica of `volume`, as `n` reports them.
pub fn replica_states(n: &TestNode, volume: &str) -> Vec<(String, String)> {
    let (code, v) = n.api("GET", &format!("/v1/volumes/{volume}"), None);
    if code != 200 {
        return Vec::new();
    }
    v["replicas"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| {
                    (
                        r["node"].as_str().unwrap_or_default().to_string(),
                        r["state"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}
