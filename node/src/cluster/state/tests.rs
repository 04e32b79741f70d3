use super::*;
use crate::types::Id128;

fn create(id: VolumeId, name: &str) -> Command {
    Command::CreateVolume {
        id,
        name: name.into(),
        size_bytes: 1 << 30,
        fs: FsType::Ext4,
        replica_node: Id128([7; 16]),
        more_replicas: vec![],
        created_unix_ms: 1,
        csi_name: None,
    }
}

#[test]
fn entries_carry_their_version_and_decode_strictly() {
    let c = create(Id128::random(), "a");
    let bytes = encode_command(&c);
    // Each entry carries the lowest version that knows its command, so a
    // node one version behind applies everything but what is new.
    assert_eq!(&bytes[..2], &[ENTRY_MAGIC, 2]);
    let snap = Command::DeleteSnapshot {
        id: Id128::random(),
    };
    assert_eq!(&encode_command(&snap)[..2], &[ENTRY_MAGIC, 3]);
    let copied = Command::SnapshotCopied {
        id: Id128::random(),
        node: Id128::random(),
        epoch: 1,
    };
    assert_eq!(&encode_command(&copied)[..2], &[ENTRY_MAGIC, ENTRY_VERSION]);
    assert_eq!(decode_command(&encode_command(&copied)), Ok(copied));
    assert_eq!(decode_command(&encode_command(&snap)), Ok(snap));
    assert_eq!(decode_command(&bytes), Ok(c.clone()));
    // Entries from before versions: plain JSON.
    let legacy = serde_json::to_vec(&c).expect("json");
    assert_eq!(decode_command(&legacy), Ok(c));
    let mut newer = bytes.clone();
    newer[1] = ENTRY_VERSION + 1;
    assert_eq!(
        decode_command(&newer),
        Err(EntryError::UnknownVersion {
            found: ENTRY_VERSION + 1
        })
    );
    let mut unknown = vec![ENTRY_MAGIC, ENTRY_VERSION];
    unknown.extend_from_slice(br#"{"op":"fly_away","id":"x"}"#);
    assert!(matches!(
        decode_command(&unknown),
        Err(EntryError::Malformed {
            version: ENTRY_VERSION,
            ..
        })
    ));
    for junk in [&b""[..], b"\x00", &[ENTRY_MAGIC][..]] {
        assert!(decode_command(junk).is_err(), "{junk:?}");
    }
}

#[test]
fn refused_commands_change_nothing() {
    let mut s = ClusterState::new(Id128::random());
    let (a, b, n1, n2) = (
        Id128::random(),
        Id128::random(),
        Id128::random(),
        Id128::random(),
    );
    s.apply(&create(a, "a")).expect("create");
    let before = s.clone();
    let refused = [
        create(b, "a"),
        create(a, "b"),
        Command::CreateVolume {
            id: b,
            name: "b".into(),
            size_bytes: 0,
            fs: FsType::Ext4,
            replica_node: n1,
            more_replicas: vec![],
            created_unix_ms: 1,
            csi_name: None,
        },
        Command::CreateVolume {
            id: b,
            name: "b".into(),
            size_bytes: 1000,
            fs: FsType::Ext4,
            replica_node: n1,
            more_replicas: vec![],
            created_unix_ms: 1,
            csi_name: None,
        },
        Command::ResizeVolume {
            id: a,
            size_bytes: 4096,
        },
        Command::ResizeVolume {
            id: b,
            size_bytes: 2 << 30,
        },
        Command::DeleteVolume { id: b },
    ];
    for c in &refused {
        assert!(s.apply(c).is_err(), "{c:?} was accepted");
        assert_eq!(s, before, "{c:?} changed the state");
    }
    s.apply(&Command::Attach {
        id: a,
        node: n1,
        force: false,
    })
    .expect("attach");
    let attached = s.clone();
    for c in [
        Command::Attach {
            id: a,
            node: n2,
            force: false,
        },
        Command::Detach { id: a, node: n2 },
        Command::DeleteVolume { id: a },
        Command::Reattach {
            id: a,
            node: n2,
            epoch: 1,
        },
        Command::Reattach {
            id: a,
            node: n1,
            epoch: 0,
        },
        Command::Reattach {
            id: b,
            node: n1,
            epoch: 1,
        },
    ] {
        assert!(s.apply(&c).is_err(), "{c:?} was accepted");
        assert_eq!(s, attached);
    }
    // A restarted daemon fences its previous incarnation: new epoch,
    // same node; the old epoch is then stale.
    let reattach = Command::Reattach {
        id: a,
        node: n1,
        epoch: 1,
    };
    s.apply(&reattach).expect("reattach");
    let v = &s.volumes[&a];
    assert_eq!(
        (v.epoch, v.attachment.as_ref().map(|x| (x.node, x.epoch))),
        (2, Some((n1, 2)))
    );
    let after = s.clone();
    assert!(matches!(
        s.apply(&reattach),
        Err(StateError::StaleEpoch { .. })
    ));
    assert_eq!(s, after);
    s.apply(&Command::Detach { id: a, node: n1 })
        .expect("detach");
    assert!(matches!(
        s.apply(&Command::Reattach {
            id: a,
            node: n1,
            epoch: 2
        }),
        Err(StateError::NotAttached { .. })
    ));
}

#[test]
fn readers_and_a_writer_exclude_each_other() {
    let mut s = ClusterState::new(Id128::random());
    let (a, n1, n2) = (Id128::random(), Id128::random(), Id128::random());
    s.apply(&create(a, "a")).expect("create");
    for n in [n1, n2, n2] {
        s.apply(&Command::AttachReader { id: a, node: n })
            .expect("reader");
    }
    let epoch = s.volumes[&a].epoch;
    assert_eq!(s.volumes[&a].readers.len(), 2);
    let held = s.clone();
    for c in [
        Command::Attach {
            id: a,
            node: n1,
            force: false,
        },
        Command::DeleteVolume { id: a },
    ] {
        assert!(s.apply(&c).is_err(), "{c:?} was accepted");
        assert_eq!(s, held);
    }
    s.apply(&Command::DetachReader { id: a, node: n1 })
        .expect("release");
    s.apply(&Command::DetachReader { id: a, node: n2 })
        .expect("release");
    s.apply(&Command::Attach {
        id: a,
        node: n1,
        force: false,
    })
    .expect("writer after the readers left");
    assert!(s.apply(&Command::AttachReader { id: a, node: n2 }).is_err());
    // A forced attach takes over from readers and fences them.
    s.apply(&Command::Detach { id: a, node: n1 })
        .expect("detach");
    s.apply(&Command::AttachReader { id: a, node: n2 })
        .expect("reader");
    s.apply(&Command::Attach {
        id: a,
        node: n1,
        force: true,
    })
    .expect("forced");
    assert!(s.volumes[&a].readers.is_empty());
    assert!(s.volumes[&a].epoch > epoch);
}

#[test]
fn attach_bumps_epoch_once_and_is_idempotent() {
    let mut s = ClusterState::new(Id128::random());
    let (a, n) = (Id128::random(), Id128::random());
    s.apply(&create(a, "a")).expect("create");
    s.apply(&Command::Attach {
        id: a,
        node: n,
        force: false,
    })
    .expect("attach");
    s.apply(&Command::Attach {
        id: a,
        node: n,
        force: false,
    })
    .expect("again");
    assert_eq!(s.volumes[&a].epoch, 1);
    s.apply(&Command::Detach { id: a, node: n })
        .expect("detach");
    s.apply(&Command::Detach { id: a, node: n }).expect("again");
    s.apply(&Command::Attach {
        id: a,
        node: n,
        force: false,
    })
    .expect("attach");
    assert_eq!(s.volumes[&a].epoch, 2);
}

fn register(id: NodeId, name: &str) -> Command {
    Command::RegisterNode {
        id,
        name: name.into(),
        raft_id: 1,
        api_address: "127.0.0.1:7400".into(),
        peer_address: "127.0.0.1:7401".into(),
        labels: BTreeMap::from([("zone".to_string(), "a".to_string())]),
        role: NodeRole::Voter,
        at_unix_ms: 10,
    }
}

#[test]
fn node_registry() {
    let mut s = ClusterState::new(Id128::random());
    let (a, b) = (Id128::random(), Id128::random());
    s.apply(&register(a, "n1")).expect("register");
    s.apply(&register(a, "n1"))
        .expect("re-register is an update");
    let before = s.clone();
    assert_eq!(
        s.apply(&register(b, "n1")),
        Err(StateError::NodeNameTaken("n1".into(), a))
    );
    let beat = |id, at| Command::NodeHeartbeat {
        id,
        pool_capacity_bytes: 100,
        pool_allocated_bytes: 7,
        at_unix_ms: at,
    };
    assert_eq!(s.apply(&beat(b, 20)), Err(StateError::NodeNotFound(b)));
    assert_eq!(s, before);
    s.apply(&beat(a, 20)).expect("heartbeat");
    s.apply(&beat(a, 15)).expect("late heartbeat");
    let n = &s.nodes[&a];
    assert_eq!(
        (
            n.pool_capacity_bytes,
            n.pool_allocated_bytes,
            n.last_heartbeat_unix_ms
        ),
        (100, 7, 20)
    );
    // Re-registering keeps the reported usage.
    s.apply(&register(a, "renamed")).expect("rename");
    assert_eq!(s.nodes[&a].pool_capacity_bytes, 100);
    assert_eq!(s.nodes[&a].name, "renamed");
}

#[test]
fn replay_is_deterministic() {
    let (a, n) = (Id128::random(), Id128::random());
    let cmds = vec![
        create(a, "a"),
        Command::ResizeVolume {
            id: a,
            size_bytes: 2 << 30,
        },
        Command::Attach {
            id: a,
            node: n,
            force: false,
        },
        Command::MarkFormatted { id: a },
    ];
    let cluster = Id128::random();
    let (mut s1, mut s2) = (ClusterState::new(cluster), ClusterState::new(cluster));
    for c in &cmds {
        s1.apply(c).expect("apply");
        let json = serde_json::to_string(c).expect("encode");
        s2.apply(&serde_json::from_str(&json).expect("decode"))
            .expect("apply");
    }
    assert_eq!(s1, s2);
}

fn command() -> impl proptest::strategy::Strategy<Value = Command> {
    use proptest::prelude::*;
    let node = (0u8..3).prop_map(|i| Id128([10 + i; 16]));
    let vol = (0u8..3).prop_map(|i| Id128([20 + i; 16]));
    let snap = (0u8..4).prop_map(|i| Id128([30 + i; 16]));
    let rstate = prop_oneof![
        Just(ReplicaState::Healthy),
        Just(ReplicaState::Rebuilding),
        Just(ReplicaState::Faulted)
    ];
    prop_oneof![
        (
            vol.clone(),
            0u8..3,
            0u64..3,
            node.clone(),
            proptest::collection::vec(node.clone(), 0..3)
        )
            .prop_map(|(id, n, k, replica_node, more_replicas)| {
                Command::CreateVolume {
                    id,
                    name: format!("v{n}"),
                    size_bytes: k * SIZE_ALIGN,
                    fs: FsType::Ext4,
                    replica_node,
                    more_replicas,
                    created_unix_ms: 0,
                    csi_name: None,
                }
            }),
        (vol.clone(), node.clone(), any::<bool>()).prop_map(|(id, node, force)| Command::Attach {
            id,
            node,
            force
        }),
        (vol.clone(), node.clone()).prop_map(|(id, node)| Command::Detach { id, node }),
        (vol.clone(), node.clone(), 0u64..4).prop_map(|(id, node, epoch)| Command::Reattach {
            id,
            node,
            epoch
        }),
        (vol.clone(), node.clone()).prop_map(|(id, node)| Command::AttachReader { id, node }),
        (vol.clone(), node.clone()).prop_map(|(id, node)| Command::DetachReader { id, node }),
        (vol.clone(), node.clone(), rstate, 0u64..4).prop_map(|(id, node, state, epoch)| {
            Command::SetReplicaState {
                id,
                node,
                state,
                epoch,
            }
        }),
        (vol.clone(), node.clone()).prop_map(|(id, node)| Command::AddReplica { id, node }),
        (vol.clone(), node.clone()).prop_map(|(id, node)| Command::RemoveReplica { id, node }),
        (vol.clone(), 0u32..5).prop_map(|(id, count)| Command::SetReplicaCount { id, count }),
        (vol.clone(), 0u64..4).prop_map(|(id, k)| Command::ResizeVolume {
            id,
            size_bytes: k * SIZE_ALIGN
        }),
        vol.clone().prop_map(|id| Command::DeleteVolume { id }),
        vol.clone().prop_map(|id| Command::MarkFormatted { id }),
        (snap.clone(), vol.clone(), 0u8..3).prop_map(|(id, volume, n)| Command::CreateSnapshot {
            id,
            volume,
            name: format!("s{n}"),
            created_unix_ms: 0,
        }),
        (
            snap.clone(),
            proptest::collection::btree_set(node.clone(), 0..3)
        )
            .prop_map(|(id, nodes)| Command::SnapshotTaken { id, nodes }),
        (snap.clone(), node.clone(), 0u64..3)
            .prop_map(|(id, node, epoch)| Command::SnapshotCopied { id, node, epoch }),
        vol.clone().prop_map(|id| Command::RetireVolume { id }),
        snap.clone().prop_map(|id| Command::DeleteSnapshot { id }),
        (vol.clone(), snap).prop_map(|(id, snapshot)| Command::BeginRevert { id, snapshot }),
        (vol.clone(), 0u64..4).prop_map(|(id, epoch)| Command::EndRevert { id, epoch }),
        vol.prop_map(|id| Command::FenceDetached { id }),
    ]
}

proptest::proptest! {
    /// Any sequence of commands, accepted or refused, keeps the state's
    /// invariants: a refused command changes nothing; a writer and
    /// readers never hold a volume together; an attachment carries the
    /// volume's epoch, and epochs only grow; replicas sit on distinct
    /// nodes, at most three, and at least one of them is healthy.
    #[test]
    fn random_commands_keep_the_invariants(cmds in proptest::collection::vec(command(), 1..60)) {
        let mut s = ClusterState::new(Id128([1; 16]));
        for i in 0..3u8 {
            s.apply(&register(Id128([10 + i; 16]), &format!("n{i}"))).expect("register");
        }
        let mut epochs: BTreeMap<VolumeId, u64> = BTreeMap::new();
        for c in &cmds {
            let before = s.clone();
            if s.apply(c).is_err() {
                proptest::prop_assert_eq!(&s, &before, "refused {:?} changed the state", c);
            }
            for v in s.volumes.values() {
                proptest::prop_assert!(v.attachment.is_none() || v.readers.is_empty(), "{:?}", v);
                if let Some(a) = &v.attachment {
                    proptest::prop_assert_eq!(a.epoch, v.epoch);
                }
                let seen = epochs.entry(v.id).or_insert(v.epoch);
                proptest::prop_assert!(v.epoch >= *seen, "epoch went back after {:?}", c);
                *seen = v.epoch;
                let mut nodes: Vec<NodeId> = v.replicas.iter().map(|r| r.node).collect();
                nodes.sort();
                nodes.dedup();
                proptest::prop_assert_eq!(nodes.len(), v.replicas.len());
                proptest::prop_assert!((1..=MAX_REPLICAS).contains(&v.replicas.len()));
                proptest::prop_assert!(v.healthy().count() >= 1, "no healthy replica after {:?}: {:?}", c, v);
                if let Some(r) = &v.reverting {
                    proptest::prop_assert!(v.attachment.is_none() && v.readers.is_empty(), "attached while reverting: {:?}", v);
                    proptest::prop_assert!(s.snapshots.get(&r.snapshot).is_some_and(|sn| sn.volume == v.id), "revert to a missing snapshot: {:?}", v);
                }
            }
            epochs.retain(|id, _| s.volumes.contains_key(id));
            for sn in s.snapshots.values() {
                let v = s.volumes.get(&sn.volume);
                proptest::prop_assert!(v.is_some(), "snapshot of a deleted volume after {:?}", c);
                let v = v.expect("checked");
                proptest::prop_assert!(sn.replicas.iter().all(|n| v.has_replica_on(*n)), "{:?}", sn);
                proptest::prop_assert!(!sn.ready || !sn.replicas.is_empty(), "ready without a copy: {:?}", sn);
                let same = s.snapshots.values().filter(|o| o.volume == sn.volume && o.name == sn.name).count();
                proptest::prop_assert_eq!(same, 1);
            }
        }
    }
}

#[test]
fn snapshots_are_named_per_volume_and_guard_their_volume_and_last_copy() {
    let mut s = ClusterState::new(Id128::random());
    let (a, b, n2) = (Id128::random(), Id128::random(), Id128::random());
    s.apply(&create(a, "a")).expect("create");
    s.apply(&create(b, "b")).expect("create");
    s.apply(&register(n2, "n2")).expect("register");
    s.apply(&Command::AddReplica { id: a, node: n2 })
        .expect("add");
    let snap = |id, volume, name: &str| Command::CreateSnapshot {
        id,
        volume,
        name: name.into(),
        created_unix_ms: 5,
    };
    let (s1, s2) = (Id128::random(), Id128::random());
    s.apply(&snap(s1, a, "daily")).expect("snapshot");
    assert!(!s.snapshots[&s1].ready);
    assert_eq!(s.snapshots[&s1].size_bytes, 1 << 30);
    // The same name on another volume is fine.
    s.apply(&snap(s2, b, "daily")).expect("snapshot of b");
    let before = s.clone();
    for (cmd, what) in [
        (snap(Id128::random(), a, "daily"), "name reused"),
        (snap(s1, b, "other"), "id reused"),
        (
            snap(Id128::random(), Id128::random(), "x"),
            "unknown volume",
        ),
        (snap(Id128::random(), a, "a/b"), "slash"),
        (snap(Id128::random(), a, "a@b"), "at"),
        (snap(Id128::random(), a, &"x".repeat(64)), "too long"),
        (snap(Id128::random(), a, ""), "empty"),
        (
            Command::SnapshotTaken {
                id: s1,
                nodes: BTreeSet::new(),
            },
            "no copy",
        ),
        (
            Command::SnapshotTaken {
                id: s1,
                nodes: [Id128::random()].into(),
            },
            "not a replica",
        ),
        (
            Command::DeleteSnapshot {
                id: Id128::random(),
            },
            "unknown snapshot",
        ),
        (Command::DeleteVolume { id: a }, "volume with snapshots"),
    ] {
        assert!(s.apply(&cmd).is_err(), "{what} accepted");
        assert_eq!(s, before, "{what} changed the state");
    }
    s.apply(&Command::SnapshotTaken {
        id: s1,
        nodes: [n2].into(),
    })
    .expect("taken");
    assert!(s.snapshots[&s1].ready);
    assert_eq!(
        s.apply(&Command::RemoveReplica { id: a, node: n2 }),
        Err(StateError::LastSnapshotCopy { id: s1, node: n2 })
    );
    s.apply(&Command::DeleteSnapshot { id: s1 })
        .expect("delete");
    s.apply(&Command::DeleteVolume { id: a })
        .expect("no snapshots left");
    assert_eq!(s.snapshots.len(), 1);
    // A state with snapshots round-trips; one without leaves no trace.
    let json = serde_json::to_string(&s).expect("json");
    assert_eq!(
        serde_json::from_str::<ClusterState>(&json).expect("back"),
        s
    );
    let empty = ClusterState::new(Id128::random());
    assert!(!serde_json::to_string(&empty)
        .expect("json")
        .contains("snapshots"));
}

#[test]
fn a_revert_fences_the_volume_until_it_ends() {
    let mut s = ClusterState::new(Id128::random());
    let (a, b, me) = (Id128::random(), Id128::random(), Id128([7; 16]));
    s.apply(&create(a, "a")).expect("create");
    s.apply(&create(b, "b")).expect("create");
    let (s1, of_b) = (Id128::random(), Id128::random());
    for (id, volume) in [(s1, a), (of_b, b)] {
        s.apply(&Command::CreateSnapshot {
            id,
            volume,
            name: "s".into(),
            created_unix_ms: 1,
        })
        .expect("snapshot");
    }
    let begin = |snapshot| Command::BeginRevert { id: a, snapshot };
    assert_eq!(
        s.apply(&begin(s1)),
        Err(StateError::SnapshotNotReady { id: s1 })
    );
    s.apply(&Command::SnapshotTaken {
        id: s1,
        nodes: [me].into(),
    })
    .expect("taken");
    assert!(matches!(
        s.apply(&begin(of_b)),
        Err(StateError::SnapshotOfAnotherVolume { .. })
    ));
    s.apply(&Command::Attach {
        id: a,
        node: me,
        force: false,
    })
    .expect("attach");
    assert!(matches!(
        s.apply(&begin(s1)),
        Err(StateError::AttachedElsewhere { .. })
    ));
    s.apply(&Command::Detach { id: a, node: me })
        .expect("detach");
    let before = s.volumes[&a].epoch;
    s.apply(&begin(s1)).expect("begin");
    let epoch = s.volumes[&a].epoch;
    assert_eq!(epoch, before + 1, "a revert fences older engines");
    let frozen = s.clone();
    for (cmd, what) in [
        (
            Command::Attach {
                id: a,
                node: me,
                force: true,
            },
            "attach",
        ),
        (Command::AttachReader { id: a, node: me }, "reader"),
        (Command::DeleteSnapshot { id: s1 }, "delete the target"),
        (
            Command::CreateSnapshot {
                id: Id128::random(),
                volume: a,
                name: "t".into(),
                created_unix_ms: 1,
            },
            "snapshot",
        ),
        (Command::EndRevert { id: a, epoch: 1 }, "stale end"),
    ] {
        assert!(s.apply(&cmd).is_err(), "{what} accepted while reverting");
        assert_eq!(s, frozen, "{what} changed the state");
    }
    // Another node may take an unfinished revert over.
    s.apply(&begin(s1)).expect("take over");
    let epoch2 = s.volumes[&a].epoch;
    assert!(epoch2 > epoch);
    s.apply(&Command::EndRevert {
        id: a,
        epoch: epoch2,
    })
    .expect("end");
    assert!(s.volumes[&a].reverting.is_none());
    s.apply(&Command::EndRevert {
        id: a,
        epoch: epoch2,
    })
    .expect("a repeated end is a no-op");
    s.apply(&Command::Attach {
        id: a,
        node: me,
        force: false,
    })
    .expect("attach after the revert");
}

#[test]
fn fencing_a_detached_volume_moves_its_epoch_unless_it_is_attached_or_read() {
    let mut s = ClusterState::new(Id128::random());
    let (a, me) = (Id128::random(), Id128([7; 16]));
    s.apply(&create(a, "a")).expect("create");
    let fence = Command::FenceDetached { id: a };
    let e0 = s.volumes[&a].epoch;
    s.apply(&fence).expect("fence");
    assert_eq!(s.volumes[&a].epoch, e0 + 1);
    s.apply(&Command::Attach {
        id: a,
        node: me,
        force: false,
    })
    .expect("attach");
    let attached = s.clone();
    assert_eq!(s.apply(&fence), Err(StateError::Attached(a)));
    assert_eq!(s, attached);
    s.apply(&Command::Detach { id: a, node: me })
        .expect("detach");
    s.apply(&Command::AttachReader { id: a, node: me })
        .expect("reader");
    let read = s.clone();
    s.apply(&fence).expect("fence beside a reader");
    assert_eq!(s, read, "a reader's epoch must not move");
}

#[test]
fn a_clone_is_healthy_where_it_reads_through_and_guards_its_origin_until_filled() {
    let mut s = ClusterState::new(Id128::random());
    let (a, me, n2) = (Id128::random(), Id128([7; 16]), Id128::random());
    s.apply(&create(a, "a")).expect("create");
    s.apply(&register(n2, "n2")).expect("register");
    s.apply(&Command::MarkFormatted { id: a })
        .expect("formatted");
    let (snap, pending) = (Id128::random(), Id128::random());
    for (id, name) in [(snap, "s"), (pending, "p")] {
        s.apply(&Command::CreateSnapshot {
            id,
            volume: a,
            name: name.into(),
            created_unix_ms: 1,
        })
        .expect("snapshot");
    }
    s.apply(&Command::SnapshotTaken {
        id: snap,
        nodes: [me].into(),
    })
    .expect("taken");
    let clone = |id, name: &str, size, snapshot, nodes: Vec<NodeId>, backed: Vec<NodeId>| {
        Command::CreateClone {
            id,
            name: name.into(),
            size_bytes: size,
            snapshot,
            replica_nodes: nodes,
            backed: backed.into_iter().collect(),
            implicit: false,
            created_unix_ms: 2,
            csi_name: None,
        }
    };
    let c = Id128::random();
    let before = s.clone();
    for (cmd, what) in [
        (
            clone(c, "c", 1 << 29, snap, vec![me], vec![me]),
            "smaller than the snapshot",
        ),
        (
            clone(c, "c", 1 << 30, pending, vec![me], vec![me]),
            "snapshot not ready",
        ),
        (
            clone(c, "c", 1 << 30, Id128::random(), vec![me], vec![me]),
            "unknown snapshot",
        ),
        (
            clone(c, "a", 1 << 30, snap, vec![me], vec![me]),
            "name taken",
        ),
        (
            clone(c, "c", 1 << 30, snap, vec![n2], vec![n2]),
            "backed where the snapshot is not",
        ),
        (
            clone(c, "c", 1 << 30, snap, vec![me, n2], vec![]),
            "nothing backed",
        ),
        (
            clone(c, "c", 1 << 30, snap, vec![me, me], vec![me]),
            "one node twice",
        ),
    ] {
        assert!(s.apply(&cmd).is_err(), "{what} accepted");
        assert_eq!(s, before, "{what} changed the state");
    }
    s.apply(&clone(c, "c", 2 << 30, snap, vec![me, n2], vec![me]))
        .expect("clone");
    let v = &s.volumes[&c];
    assert!(
        v.formatted,
        "a clone of a formatted volume is never formatted again"
    );
    assert_eq!(
        v.replicas.iter().map(|r| r.state).collect::<Vec<_>>(),
        vec![ReplicaState::Healthy, ReplicaState::Faulted]
    );
    assert_eq!(
        s.apply(&Command::DeleteSnapshot { id: snap }),
        Err(StateError::SnapshotBacksClone { id: snap, clone: c })
    );
    s.apply(&Command::AddReplica { id: a, node: n2 })
        .expect("add");
    assert_eq!(
        s.apply(&Command::RemoveReplica { id: a, node: me }),
        Err(StateError::ReplicaBacksClone {
            id: a,
            node: me,
            clone: c
        })
    );
    // Filled (twice: a retried proposal): the guards go.
    for _ in 0..2 {
        s.apply(&Command::CloneFilled { id: c, node: me })
            .expect("filled");
    }
    let o = s.volumes[&c].origin.as_ref().unwrap();
    assert!(o.backed.is_empty() && o.snapshot == snap, "{o:?}");
    s.apply(&Command::DeleteSnapshot { id: snap })
        .expect("delete");
    // A snapshot taken for a clone goes with the clone's origin.
    let (implicit, c2) = (Id128::random(), Id128::random());
    s.apply(&Command::CreateSnapshot {
        id: implicit,
        volume: a,
        name: "for-c2".into(),
        created_unix_ms: 3,
    })
    .expect("snapshot");
    s.apply(&Command::SnapshotTaken {
        id: implicit,
        nodes: [me].into(),
    })
    .expect("taken");
    let mut cmd = clone(c2, "c2", 1 << 30, implicit, vec![me], vec![me]);
    if let Command::CreateClone { implicit, .. } = &mut cmd {
        *implicit = true;
    }
    s.apply(&cmd).expect("clone");
    assert_eq!(encode_command(&cmd)[1], 3);
    s.apply(&Command::DeleteVolume { id: c2 })
        .expect("delete clone");
    assert!(!s.snapshots.contains_key(&implicit));
}

#[test]
fn a_snapshot_is_recorded_copied_only_to_a_faulted_replica_at_the_current_epoch() {
    let mut s = ClusterState::new(Id128::random());
    let (a, n2, s1) = (Id128::random(), Id128::random(), Id128::random());
    s.apply(&create(a, "a")).expect("create");
    s.apply(&register(n2, "n2")).expect("register");
    s.apply(&Command::AddReplica { id: a, node: n2 })
        .expect("add");
    let first = s.volumes[&a].replicas[0].node;
    s.apply(&Command::CreateSnapshot {
        id: s1,
        volume: a,
        name: "s1".into(),
        created_unix_ms: 1,
    })
    .expect("snapshot");
    let epoch = s.volumes[&a].epoch;
    let copied = |node, epoch| Command::SnapshotCopied {
        id: s1,
        node,
        epoch,
    };
    // Not ready yet.
    assert_eq!(
        s.apply(&copied(n2, epoch)),
        Err(StateError::SnapshotNotReady { id: s1 })
    );
    s.apply(&Command::SnapshotTaken {
        id: s1,
        nodes: [first].into(),
    })
    .expect("taken");
    let n2_state = s.volumes[&a].replica(n2).expect("replica").state;
    if n2_state != ReplicaState::Faulted {
        s.apply(&Command::SetReplicaState {
            id: a,
            node: n2,
            state: ReplicaState::Faulted,
            epoch,
        })
        .expect("faulted");
    }
    let before = s.clone();
    for (cmd, what) in [
        (copied(Id128::random(), epoch), "not a replica"),
        (copied(n2, epoch + 1), "another epoch"),
        (
            Command::SnapshotCopied {
                id: Id128::random(),
                node: n2,
                epoch,
            },
            "unknown snapshot",
        ),
    ] {
        assert!(s.apply(&cmd).is_err(), "{what} accepted");
        assert_eq!(s, before, "{what} changed the state");
    }
    s.apply(&copied(n2, epoch)).expect("copied");
    assert!(s.snapshots[&s1].replicas.contains(&n2));
    // Repeated: nothing changes.
    let after = s.clone();
    s.apply(&copied(n2, epoch)).expect("again");
    assert_eq!(s, after);
    // A healthy replica is never recorded a copy it did not get.
    s.apply(&Command::DeleteSnapshot { id: s1 })
        .expect("delete");
    let s2 = Id128::random();
    s.apply(&Command::CreateSnapshot {
        id: s2,
        volume: a,
        name: "s2".into(),
        created_unix_ms: 2,
    })
    .expect("snapshot");
    s.apply(&Command::SnapshotTaken {
        id: s2,
        nodes: [n2].into(),
    })
    .expect("taken");
    assert_eq!(
        s.apply(&Command::SnapshotCopied {
            id: s2,
            node: first,
            epoch,
        }),
        Err(StateError::NotACopyTarget {
            id: s2,
            node: first
        })
    );
}

#[test]
fn a_retired_volume_keeps_its_snapshots_and_name_and_goes_with_the_last() {
    let mut s = ClusterState::new(Id128::random());
    let (a, b, s1, s2) = (
        Id128::random(),
        Id128::random(),
        Id128::random(),
        Id128::random(),
    );
    s.apply(&create(a, "a")).expect("create");
    s.apply(&create(b, "b")).expect("create");
    // Without snapshots, retiring deletes.
    s.apply(&Command::RetireVolume { id: b }).expect("retire");
    assert!(!s.volumes.contains_key(&b));
    let node = s.volumes[&a].replicas[0].node;
    for (id, name) in [(s1, "one"), (s2, "two")] {
        s.apply(&Command::CreateSnapshot {
            id,
            volume: a,
            name: name.into(),
            created_unix_ms: 1,
        })
        .expect("snapshot");
        s.apply(&Command::SnapshotTaken {
            id,
            nodes: [node].into(),
        })
        .expect("taken");
    }
    s.apply(&Command::Attach {
        id: a,
        node,
        force: false,
    })
    .expect("attach");
    let before = s.clone();
    assert_eq!(
        s.apply(&Command::RetireVolume { id: a }),
        Err(StateError::Attached(a))
    );
    assert_eq!(s, before);
    s.apply(&Command::Detach { id: a, node }).expect("detach");
    s.apply(&Command::RetireVolume { id: a }).expect("retire");
    assert!(s.volumes[&a].retired);
    s.apply(&Command::RetireVolume { id: a }).expect("repeated");
    let retired = s.clone();
    for (cmd, what) in [
        (
            Command::Attach {
                id: a,
                node,
                force: false,
            },
            "attach",
        ),
        (Command::AttachReader { id: a, node }, "reader"),
        (
            Command::ResizeVolume {
                id: a,
                size_bytes: 2 << 30,
            },
            "resize",
        ),
        (
            Command::CreateSnapshot {
                id: Id128::random(),
                volume: a,
                name: "three".into(),
                created_unix_ms: 2,
            },
            "snapshot",
        ),
        (
            Command::BeginRevert {
                id: a,
                snapshot: s1,
            },
            "revert",
        ),
        (create(Id128::random(), "a"), "its name reused"),
    ] {
        assert!(s.apply(&cmd).is_err(), "{what} accepted");
        assert_eq!(s, retired, "{what} changed the state");
    }
    assert_eq!(
        s.apply(&create(Id128::random(), "a")),
        Err(StateError::NameKeptBySnapshots("a".into()))
    );
    s.apply(&Command::DeleteSnapshot { id: s1 })
        .expect("delete");
    assert!(s.volumes.contains_key(&a), "one snapshot left");
    s.apply(&Command::DeleteSnapshot { id: s2 })
        .expect("delete");
    assert!(!s.volumes.contains_key(&a), "gone with its last snapshot");
    s.apply(&create(Id128::random(), "a"))
        .expect("the name is free");
}
