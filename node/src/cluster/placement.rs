//! Replica placement, decided on a linearizably read state: one replica per
//! node, only on nodes that are up, spread across the values of a node
//! label (`zone` by default), then by free pool space, then by node id (so
//! the choice is deterministic for a given state).

use super::state::{ClusterState, NodeState};

/// The node label replicas are spread across.
pub const PLACEMENT_LABEL: &str = "zone";
use crate::types::NodeId;

/// Chooses `count` nodes. `local` (locality) is placed first when it is up
/// and has free space. `exclude` are nodes that must not be chosen (they
/// already hold a replica); with `allowed`, only those nodes may be chosen
/// (topology requirements).
pub fn place(
    state: &ClusterState,
    count: usize,
    local: Option<NodeId>,
    exclude: &[NodeId],
    allowed: Option<&[NodeId]>,
    label: &str,
) -> Result<Vec<NodeId>, String> {
    let eligible: Vec<_> = state
        .nodes
        .values()
        .filter(|n| n.state == NodeState::Up && !exclude.contains(&n.id))
        .filter(|n| allowed.is_none_or(|a| a.contains(&n.id)))
        .collect();
    if count > eligible.len() {
        return Err(format!(
            "{count} replica(s) need {count} distinct nodes that are up, but {} {} eligible",
            eligible.len(),
            if eligible.len() == 1 { "is" } else { "are" }
        ));
    }
    let free = |id: &NodeId| {
        state
            .nodes
            .get(id)
            .map(|n| n.pool_capacity_bytes.saturating_sub(n.pool_allocated_bytes))
            .unwrap_or(0)
    };
    let mut chosen: Vec<NodeId> = Vec::with_capacity(count);
    if let Some(l) = local {
        // A node that has not reported its pool yet (capacity 0) counts as
        // having room.
        let unknown = state
            .nodes
            .get(&l)
            .is_some_and(|n| n.pool_capacity_bytes == 0);
        if count > 0 && eligible.iter().any(|n| n.id == l) && (unknown || free(&l) > 0) {
            chosen.push(l);
        }
    }
    let zone = |id: &NodeId| {
        state
            .nodes
            .get(id)
            .and_then(|n| n.labels.get(label).cloned())
    };
    while chosen.len() < count {
        let best = eligible
            .iter()
            .filter(|n| !chosen.contains(&n.id))
            .min_by_key(|n| {
                let z = zone(&n.id);
                let same_zone = state
                    .nodes
                    .values()
                    .filter(|m| exclude.contains(&m.id) || chosen.contains(&m.id))
                    .filter(|m| z.is_some() && m.labels.get(label) == z.as_ref())
                    .count();
                (same_zone, std::cmp::Reverse(free(&n.id)), n.id)
            })
            .expect("enough eligible nodes");
        chosen.push(best.id);
    }
    Ok(chosen)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::state::{NodeRecord, NodeRole};
    use crate::types::Id128;

    fn node(s: &mut ClusterState, zone: &str, free: u64, up: bool) -> NodeId {
        let id = Id128::random();
        s.nodes.insert(
            id,
            NodeRecord {
                id,
                name: id.to_string(),
                raft_id: 1,
                api_address: String::new(),
                peer_address: String::new(),
                labels: [("zone".to_string(), zone.to_string())].into(),
                role: NodeRole::Voter,
                pool_capacity_bytes: 1000,
                pool_allocated_bytes: 1000 - free,
                last_heartbeat_unix_ms: 0,
                state: if up { NodeState::Up } else { NodeState::Down },
                heartbeats: 0,
            },
        );
        id
    }

    #[test]
    fn spreads_zones_then_free_space() {
        let mut s = ClusterState::new(Id128::random());
        let a1 = node(&mut s, "a", 900, true);
        let a2 = node(&mut s, "a", 800, true);
        let b1 = node(&mut s, "b", 100, true);
        let c1 = node(&mut s, "c", 50, true);
        let _down = node(&mut s, "d", 1000, false);
        let p = place(&s, 3, None, &[], None, "zone").unwrap();
        assert_eq!(p, vec![a1, b1, c1], "one per zone before doubling up");
        let p = place(&s, 2, Some(a2), &[], None, "zone").unwrap();
        assert_eq!(p, vec![a2, b1], "locality first, then another zone");
        let p = place(&s, 1, None, &[a1, b1], None, "zone").unwrap();
        assert_eq!(p, vec![c1], "avoids zones already holding the volume");
        assert!(place(&s, 5, None, &[], None, "zone")
            .unwrap_err()
            .contains("4 are eligible"));
        let p = place(&s, 2, Some(a1), &[], Some(&[a2, c1]), "zone").unwrap();
        assert_eq!(p, vec![a2, c1], "only allowed nodes, even over locality");
        assert!(place(&s, 3, None, &[], Some(&[a2, c1]), "zone").is_err());
    }
}
