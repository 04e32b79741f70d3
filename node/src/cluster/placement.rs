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

    proptest::proptest! {
        /// On any cluster: `count` distinct nodes that are up, allowed and
        /// not excluded; the local node first when it is eligible and has
        /// room; as many zones as the eligible nodes offer; the same answer
        /// every time.
        #[test]
        fn placement_keeps_its_rules_on_any_cluster(
            nodes in proptest::collection::vec((0u8..4, 0u64..1000, proptest::bool::weighted(0.8)), 1..8),
            count in 1usize..4,
            local in proptest::option::of(0usize..8),
            exclude_first: bool,
            restrict: bool,
        ) {
            let mut s = ClusterState::new(Id128([1; 16]));
            let mut ids = Vec::new();
            for (i, (zone, free, up)) in nodes.iter().enumerate() {
                let id = node(&mut s, &format!("z{zone}"), *free, *up);
                // Deterministic ids keep the tie-break by id reproducible.
                let rec = s.nodes.remove(&id).expect("just added");
                let fixed = Id128([i as u8 + 1; 16]);
                s.nodes.insert(fixed, NodeRecord { id: fixed, ..rec });
                ids.push(fixed);
            }
            let local = local.and_then(|i| ids.get(i).copied());
            let exclude: Vec<NodeId> = if exclude_first { ids[..1].to_vec() } else { vec![] };
            let allowed: Option<Vec<NodeId>> = restrict.then(|| ids.iter().step_by(2).copied().collect());
            let eligible: Vec<&NodeRecord> = s.nodes.values()
                .filter(|n| n.state == NodeState::Up && !exclude.contains(&n.id))
                .filter(|n| allowed.as_ref().is_none_or(|a| a.contains(&n.id)))
                .collect();
            let r = place(&s, count, local, &exclude, allowed.as_deref(), "zone");
            proptest::prop_assert_eq!(&r, &place(&s, count, local, &exclude, allowed.as_deref(), "zone"));
            let Ok(p) = r else {
                proptest::prop_assert!(eligible.len() < count);
                return Ok(());
            };
            proptest::prop_assert_eq!(p.len(), count);
            let mut uniq = p.clone();
            uniq.sort();
            uniq.dedup();
            proptest::prop_assert_eq!(uniq.len(), count);
            for id in &p {
                proptest::prop_assert!(eligible.iter().any(|n| n.id == *id), "{id} is not eligible");
            }
            if let Some(l) = local {
                let room = s.nodes[&l].pool_allocated_bytes < s.nodes[&l].pool_capacity_bytes;
                if eligible.iter().any(|n| n.id == l) && room {
                    proptest::prop_assert_eq!(p[0], l);
                }
            }
            if exclude.is_empty() && local.is_none() {
                let zones = |ns: &mut dyn Iterator<Item = &NodeId>| {
                    let mut z: Vec<String> = ns.map(|id| s.nodes[id].labels["zone"].clone()).collect();
                    z.sort();
                    z.dedup();
                    z.len()
                };
                let offered = zones(&mut eligible.iter().map(|n| &n.id));
                proptest::prop_assert_eq!(zones(&mut p.iter()), offered.min(count));
            }
        }
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
