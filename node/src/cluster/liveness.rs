//! Node liveness and replica replenishment, decided by the leader alone so
//! that the cluster state holds one answer: a node whose heartbeat count
//! has not moved for the configured timeout is marked `down`; the next
//! heartbeat marks it `up`. A replica whose node stays silent beyond the
//! grace period is removed and a new one placed elsewhere (its space is
//! freed by that node's reconciler if it ever returns); volumes are brought
//! to their wanted replica count.
//!
//! The leader measures silence on its own monotonic clock from when it
//! last saw each node's count change (or from when it became leader), so
//! clock skew between nodes cannot mark a live node down, and a new leader
//! gives every node a full timeout before judging it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::state::{ClusterState, Command, NodeState, ReplicaState};
use super::store::ClusterStore;
use crate::types::NodeId;

/// Settings of the leader's loop.
#[derive(Clone, Copy)]
pub struct Timing {
    /// Silence after which a node is marked down.
    pub down_after: Duration,
    /// Silence after which a node's replicas are replaced.
    pub replace_after: Duration,
}

/// What the leader has seen of each node's heartbeats.
#[derive(Default)]
pub struct Tracker {
    /// Heartbeat count and when it last changed.
    seen: HashMap<NodeId, (u64, Instant)>,
}

impl Tracker {
    /// The state changes the leader should propose now. `me` is the
    /// leader itself, which is up by definition.
    pub fn judge(
        &mut self,
        state: &ClusterState,
        me: u64,
        now: Instant,
        timeout: Duration,
    ) -> Vec<Command> {
        self.seen.retain(|id, _| state.nodes.contains_key(id));
        let mut out = Vec::new();
        for n in state.nodes.values() {
            let e = self.seen.entry(n.id).or_insert((n.heartbeats, now));
            if e.0 != n.heartbeats {
                *e = (n.heartbeats, now);
            }
            let alive = n.raft_id == me || now.duration_since(e.1) < timeout;
            let want = if alive {
                NodeState::Up
            } else {
                NodeState::Down
            };
            if n.state != want {
                out.push(Command::SetNodeState {
                    id: n.id,
                    state: want,
                });
            }
        }
        out
    }

    /// How long the leader has not heard from `node` (zero when unknown).
    fn silent_for(&self, node: NodeId, now: Instant) -> Duration {
        self.seen
            .get(&node)
            .map(|(_, at)| now.duration_since(*at))
            .unwrap_or_default()
    }

    /// Replica changes toward every volume's wanted count: at most one per
    /// volume per call (the next call sees the result).
    pub fn schedule(
        &self,
        state: &ClusterState,
        now: Instant,
        replace_after: Duration,
        label: &str,
    ) -> Vec<Command> {
        let mut out = Vec::new();
        for v in state.volumes.values() {
            let healthy = v.healthy().count();
            let lost = v.replicas.iter().find(|r| {
                let gone = match state.nodes.get(&r.node) {
                    None => true,
                    Some(n) => {
                        n.state == NodeState::Down && self.silent_for(r.node, now) >= replace_after
                    }
                };
                gone && (r.state != ReplicaState::Healthy || healthy > 1)
            });
            if let Some(r) = lost {
                out.push(Command::RemoveReplica {
                    id: v.id,
                    node: r.node,
                });
                continue;
            }
            let wanted = v.wanted();
            if v.replicas.len() < wanted {
                let have: Vec<NodeId> = v.replicas.iter().map(|r| r.node).collect();
                if let Ok(nodes) = super::placement::place(state, 1, None, &have, None, label) {
                    out.push(Command::AddReplica {
                        id: v.id,
                        node: nodes[0],
                    });
                }
                continue;
            }
            if v.replicas.len() > wanted {
                // Drop a replica that is not serving first, and never the
                // attaching node's or the last healthy one.
                let attached = v.attachment.as_ref().map(|a| a.node);
                let victim = v
                    .replicas
                    .iter()
                    .filter(|r| Some(r.node) != attached)
                    .filter(|r| r.state != ReplicaState::Healthy || healthy > 1)
                    .min_by_key(|r| (r.state == ReplicaState::Healthy, r.node));
                if let Some(r) = victim {
                    out.push(Command::RemoveReplica {
                        id: v.id,
                        node: r.node,
                    });
                }
            }
        }
        out
    }
}

/// Runs for the daemon's life; acts only while this node leads.
pub async fn run(
    store: Arc<ClusterStore>,
    timing: Timing,
    stop: tokio_util::sync::CancellationToken,
) {
    let timeout = timing.down_after;
    let mut every = tokio::time::interval(
        (timeout / 10).clamp(Duration::from_millis(100), Duration::from_secs(1)),
    );
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tracker: Option<Tracker> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        let me = store.raft_id();
        if store.status().leader_id != me {
            tracker = None;
            continue;
        }
        let t = tracker.get_or_insert_with(Tracker::default);
        let now = Instant::now();
        let mut cmds = t.judge(&store.read(), me, now, timeout);
        if cmds.is_empty() {
            cmds = t.schedule(
                &store.read(),
                now,
                timing.replace_after,
                super::placement::PLACEMENT_LABEL,
            );
        }
        for cmd in cmds {
            let s = store.clone();
            let r = tokio::task::spawn_blocking(move || {
                match &cmd {
                    Command::SetNodeState { id, state } => {
                        let name = s.read().nodes.get(id).map(|n| n.name.clone());
                        tracing::warn!(node = ?name, state = state.as_str(), "node liveness changed");
                    }
                    other => tracing::info!(command = ?other, "replica scheduling"),
                }
                s.propose(cmd)
            })
            .await;
            if let Ok(Err(e)) = r {
                tracing::warn!(error = %e, "leader command not recorded");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::state::{NodeRecord, NodeRole};
    use crate::types::Id128;

    fn node(raft_id: u64) -> NodeRecord {
        NodeRecord {
            id: Id128::random(),
            name: format!("n{raft_id}"),
            raft_id,
            api_address: String::new(),
            peer_address: String::new(),
            labels: Default::default(),
            role: NodeRole::Voter,
            pool_capacity_bytes: 0,
            pool_allocated_bytes: 0,
            last_heartbeat_unix_ms: 0,
            state: NodeState::Up,
            heartbeats: 0,
        }
    }

    #[test]
    fn silent_nodes_go_down_and_come_back() {
        let mut s = ClusterState::new(Id128::random());
        let (me, other) = (node(1), node(2));
        let other_id = other.id;
        s.nodes.insert(me.id, me);
        s.nodes.insert(other.id, other);
        let t0 = Instant::now();
        let timeout = Duration::from_secs(3);
        let mut t = Tracker::default();
        assert!(t.judge(&s, 1, t0, timeout).is_empty());
        // A full timeout after the leader started watching, not before.
        assert!(t
            .judge(&s, 1, t0 + Duration::from_secs(2), timeout)
            .is_empty());
        let down = t.judge(&s, 1, t0 + Duration::from_secs(4), timeout);
        assert_eq!(
            down,
            vec![Command::SetNodeState {
                id: other_id,
                state: NodeState::Down
            }]
        );
        s.apply(&down[0]).expect("apply");
        // The leader itself never goes down; a fresh heartbeat brings the
        // other back.
        s.nodes.get_mut(&other_id).unwrap().heartbeats += 1;
        let up = t.judge(&s, 1, t0 + Duration::from_secs(10), timeout);
        assert_eq!(
            up,
            vec![Command::SetNodeState {
                id: other_id,
                state: NodeState::Up
            }]
        );
    }
}
