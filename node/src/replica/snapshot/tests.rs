//! The snapshot store against a model: every view (the head and each
//! snapshot) reads what the model says after any sequence of writes,
//! trims, snapshots, deletions, reverts and reloads, and the pool holds
//! exactly the space the replica accounts for.

use std::sync::Arc;

use super::super::commit::Meta;
use super::super::{LocalReplica, ReplicaError};
use super::SnapshotId;
use crate::pool::{DiskSpec, Pool, EXTENT_SIZE, IO_ALIGN};
use crate::sys::AlignedBuf;
use crate::types::Id128;

const BLOCK: usize = 4096;

struct Store {
    dir: std::path::PathBuf,
    node: Id128,
    spec: DiskSpec,
    meta: Arc<Meta>,
    pool: Arc<Pool>,
    volume: Id128,
    replica: Option<LocalReplica>,
    /// For a clone: the source replica (same pool) and its snapshot.
    source: Option<(Id128, Arc<LocalReplica>, SnapshotId)>,
}

impl Store {
    fn new(extents: u64) -> Store {
        let dir = std::env::temp_dir().join(format!("cairn-snap-{}", Id128::random()));
        std::fs::create_dir_all(&dir).expect("dir");
        let db = sled::Config::new().path(dir.join("db")).open().expect("db");
        let node = Id128::random();
        let spec = DiskSpec::File(dir.join("d.img"), (extents + 1) * EXTENT_SIZE);
        let pool = Arc::new(
            Pool::open(
                &db.open_tree("pool").expect("tree"),
                node,
                std::slice::from_ref(&spec),
                false,
            )
            .expect("pool"),
        );
        let meta = Arc::new(Meta::open(db, &dir).expect("meta"));
        let mut s = Store {
            dir,
            node,
            spec,
            meta,
            pool,
            volume: Id128::random(),
            replica: None,
            source: None,
        };
        s.reload();
        s
    }

    /// A store whose replica is a clone of snapshot `content` (one byte
    /// per block) of another replica in the same pool, whose head then
    /// changes again.
    fn clone_of(extents: u64, content: &[u8]) -> Store {
        let mut s = Store::new(extents);
        let (src, _) = LocalReplica::load(&s.meta, s.pool.clone(), Id128::random()).expect("load");
        let src = Arc::new(src);
        for (i, b) in content.iter().enumerate() {
            if *b != 0 {
                src.write((i * BLOCK) as u64, filled(BLOCK, *b).as_slice())
                    .expect("source write");
            }
        }
        let snap = Id128::random();
        src.take_snapshot(snap).expect("source snapshot");
        src.write(0, filled(content.len() * BLOCK, 0xEE).as_slice())
            .expect("source rewrite");
        s.r().init_origin(&src, snap).expect("init origin");
        s.source = Some((src.volume, src, snap));
        s
    }

    /// Loads the replica again into a pool opened again, as a restart does.
    fn reload(&mut self) {
        self.replica = None;
        let source = self.source.take();
        self.pool = Arc::new(
            Pool::open(
                &self.meta.db.open_tree("pool").expect("tree"),
                self.node,
                std::slice::from_ref(&self.spec),
                false,
            )
            .expect("pool"),
        );
        let src = source.map(|(id, old, snap)| {
            drop(old);
            let (src, mut owned) =
                LocalReplica::load(&self.meta, self.pool.clone(), id).expect("load");
            self.pool.claim_all(&mut owned).expect("claim");
            (id, Arc::new(src), snap)
        });
        let (r, mut owned) =
            LocalReplica::load(&self.meta, self.pool.clone(), self.volume).expect("load");
        self.pool.claim_all(&mut owned).expect("claim");
        r.settle().expect("settle");
        if let Some((_, src, _)) = &src {
            r.attach_origin(src).expect("attach origin");
        }
        self.source = src;
        self.replica = Some(r);
    }

    /// Pool space the source replica holds.
    fn source_bytes(&self) -> u64 {
        self.source.as_ref().map_or(0, |s| s.1.allocated_bytes())
    }

    fn r(&self) -> &LocalReplica {
        self.replica.as_ref().expect("loaded")
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn filled(len: usize, byte: u8) -> AlignedBuf {
    let mut b = AlignedBuf::new(len, IO_ALIGN);
    b.as_mut_slice().fill(byte);
    b
}

/// The fill byte of each block of a view (every block is written whole
/// with one byte, so a view is one byte per block).
fn view(r: &LocalReplica, snap: Option<SnapshotId>, blocks: usize) -> Vec<u8> {
    let mut buf = AlignedBuf::new(blocks * BLOCK, IO_ALIGN);
    match snap {
        None => r.read(0, buf.as_mut_slice()).expect("read head"),
        Some(s) => r
            .read_snapshot(s, 0, buf.as_mut_slice())
            .expect("read snapshot"),
    }
    buf.as_slice()
        .chunks(BLOCK)
        .map(|c| {
            assert!(c.iter().all(|b| *b == c[0]), "a block mixes two writes");
            c[0]
        })
        .collect()
}

#[derive(Debug, Clone)]
enum Op {
    /// Blocks `[first, first + count)` filled with `byte`.
    Write {
        first: usize,
        count: usize,
        byte: u8,
    },
    /// Whole extent trimmed.
    Trim {
        extent: usize,
    },
    /// A 4 KiB-aligned range inside an extent trimmed.
    TrimBlocks {
        first: usize,
        count: usize,
    },
    Snapshot,
    /// The n-th (modulo) snapshot deleted.
    Delete(usize),
    Revert(usize),
    Reload,
    /// One step of a clone's filler.
    Fill,
}

const EXTENTS: usize = 3;
const BLOCKS_PER_EXTENT: usize = (EXTENT_SIZE as usize) / BLOCK;
const BLOCKS: usize = EXTENTS * BLOCKS_PER_EXTENT;

fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    // Writes cluster on a few spots so versions stack up.
    let spot = prop_oneof![
        Just(0usize),
        Just(BLOCKS_PER_EXTENT - 2),
        Just(BLOCKS_PER_EXTENT + 7),
        0..BLOCKS - 1,
    ];
    prop_oneof![
        6 => (spot, 1usize..300, 1u8..255).prop_map(|(first, count, byte)| Op::Write {
            first,
            count: count.min(BLOCKS - first),
            byte
        }),
        1 => (0..EXTENTS).prop_map(|extent| Op::Trim { extent }),
        1 => (0..BLOCKS - 8, 1usize..8).prop_map(|(first, count)| Op::TrimBlocks { first, count }),
        3 => Just(Op::Snapshot),
        2 => any::<usize>().prop_map(Op::Delete),
        1 => any::<usize>().prop_map(Op::Revert),
        1 => Just(Op::Reload),
        2 => Just(Op::Fill),
    ]
}

/// What a clone in [`run`] starts as: holes, partly and wholly written
/// extents.
fn origin_content() -> Vec<u8> {
    let mut c = vec![0u8; BLOCKS];
    c[..300].fill(0xA1);
    c[2 * BLOCKS_PER_EXTENT + 5..2 * BLOCKS_PER_EXTENT + 20].fill(0xA2);
    c
}

fn run(ops: &[Op], clone: bool) {
    let (mut s, mut head) = if clone {
        (Store::clone_of(64, &origin_content()), origin_content())
    } else {
        (Store::new(64), vec![0u8; BLOCKS])
    };
    let mut cursor = Some(0u64);
    let mut snaps: Vec<(SnapshotId, Vec<u8>)> = Vec::new();
    for op in ops {
        match op {
            Op::Write { first, count, byte } => {
                let b = filled(count * BLOCK, *byte);
                s.r()
                    .write((first * BLOCK) as u64, b.as_slice())
                    .expect("write");
                head[*first..first + count].fill(*byte);
            }
            Op::Trim { extent } => {
                s.r()
                    .zero_range(*extent as u64 * EXTENT_SIZE, EXTENT_SIZE)
                    .expect("trim");
                let f = extent * BLOCKS_PER_EXTENT;
                head[f..f + BLOCKS_PER_EXTENT].fill(0);
            }
            Op::TrimBlocks { first, count } => {
                s.r()
                    .zero_range((first * BLOCK) as u64, (count * BLOCK) as u64)
                    .expect("trim blocks");
                head[*first..first + count].fill(0);
            }
            Op::Snapshot => {
                let id = Id128::random();
                s.r().take_snapshot(id).expect("snapshot");
                snaps.push((id, head.clone()));
            }
            Op::Delete(n) if !snaps.is_empty() => {
                let (id, _) = snaps.remove(n % snaps.len());
                s.r().delete_snapshot(id).expect("delete");
                s.r().delete_snapshot(id).expect("deleting twice is done");
            }
            Op::Revert(n) if !snaps.is_empty() => {
                let (id, content) = &snaps[n % snaps.len()];
                s.r().revert(*id).expect("revert");
                head = content.clone();
            }
            Op::Reload => {
                s.reload();
                cursor = cursor.map(|_| 0);
            }
            Op::Fill => {
                if let Some(c) = cursor.filter(|_| clone) {
                    cursor = s.r().fill_step(c).expect("fill").map(|p| p.done);
                }
            }
            Op::Delete(_) | Op::Revert(_) => {}
        }
        assert_eq!(view(s.r(), None, BLOCKS), head, "head after {op:?}");
        for (id, content) in &snaps {
            assert_eq!(
                &view(s.r(), Some(*id), BLOCKS),
                content,
                "snapshot after {op:?}"
            );
        }
        assert_eq!(
            s.pool.allocated_bytes(),
            s.r().allocated_bytes() + s.source_bytes(),
            "pool and replica disagree after {op:?}"
        );
        assert_eq!(
            s.r().snapshot_ids(),
            snaps.iter().map(|x| x.0).collect::<Vec<_>>()
        );
    }
    if let Some((_, src, snap)) = s.source.clone() {
        // The origin stays pinned until the clone is filled.
        if s.r().has_origin() {
            assert!(matches!(
                src.delete_snapshot(snap),
                Err(ReplicaError::Pinned { .. })
            ));
            assert!(matches!(src.destroy(), Err(ReplicaError::Pinned { .. })));
        }
        let mut c = cursor.unwrap_or(0);
        while let Some(p) = s.r().fill_step(c).expect("fill") {
            c = p.done;
        }
        assert!(!s.r().has_origin());
        src.delete_snapshot(snap)
            .expect("an unpinned snapshot is deleted");
        assert_eq!(view(s.r(), None, BLOCKS), head, "filled clone");
    }
    // Deleting every snapshot leaves no more space than the head needs.
    for (id, _) in snaps.drain(..) {
        s.r().delete_snapshot(id).expect("delete");
    }
    assert_eq!(view(s.r(), None, BLOCKS), head);
    let touched = head
        .chunks(BLOCKS_PER_EXTENT)
        .filter(|c| c.iter().any(|b| *b != 0))
        .count() as u64;
    assert!(
        s.r().allocated_bytes() <= EXTENTS as u64 * EXTENT_SIZE
            && s.r().allocated_bytes() >= touched * EXTENT_SIZE,
        "{} bytes held for {touched} extents with data",
        s.r().allocated_bytes()
    );
    if s.source.is_some() {
        s.reload();
        assert!(!s.r().has_origin(), "the origin is forgotten durably");
        assert_eq!(view(s.r(), None, BLOCKS), head, "filled clone, reloaded");
        s.source
            .as_ref()
            .expect("source")
            .1
            .destroy()
            .expect("source destroy");
    }
    s.r().destroy().expect("destroy");
    assert_eq!(s.pool.allocated_bytes(), 0);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 32, ..Default::default() })]
    #[test]
    fn every_view_reads_as_the_model_says(ops in proptest::collection::vec(op(), 1..20)) {
        run(&ops, false);
    }

    /// The same for a clone reading through to another replica's
    /// snapshot while its filler runs between the operations.
    #[test]
    fn every_view_of_a_clone_reads_as_the_model_says(ops in proptest::collection::vec(op(), 1..20)) {
        run(&ops, true);
    }
}

/// The space rules: a snapshot costs only what changes after it, deleting
/// it gives that back, and hundreds of snapshots leave nothing behind.
#[test]
fn snapshot_space_is_what_changed_and_comes_back() {
    // Each of the 300 snapshots below keeps the one extent written after it.
    let mut s = Store::new(320);
    let es = EXTENT_SIZE as usize;
    s.r().write(0, filled(8 * es, 1).as_slice()).expect("write");
    assert_eq!(s.pool.allocated_bytes(), 8 * EXTENT_SIZE);
    let snap = Id128::random();
    s.r().take_snapshot(snap).expect("snapshot");
    assert_eq!(
        s.pool.allocated_bytes(),
        8 * EXTENT_SIZE,
        "a snapshot is free"
    );
    // A 4 KiB write allocates one extent and leaves its other blocks to
    // the snapshot; rewriting two extents whole costs two.
    s.r()
        .write(4096, filled(4096, 2).as_slice())
        .expect("small write");
    s.r()
        .write(2 * EXTENT_SIZE, filled(2 * es, 3).as_slice())
        .expect("rewrite");
    assert_eq!(s.pool.allocated_bytes(), 11 * EXTENT_SIZE);
    let space = s.r().snapshot_space();
    assert_eq!(space.len(), 1);
    assert_eq!(space[0].held_bytes, 8 * EXTENT_SIZE);
    assert_eq!(space[0].exclusive_bytes, 3 * EXTENT_SIZE);
    assert_eq!(
        s.r().changed_extents(Some(snap), None).expect("diff"),
        vec![0, 2, 3]
    );
    assert_eq!(
        s.r().changed_extents(None, Some(snap)).expect("diff").len(),
        8
    );
    s.r().delete_snapshot(snap).expect("delete");
    assert_eq!(s.pool.allocated_bytes(), 8 * EXTENT_SIZE);
    let mut first = filled(8192, 0);
    s.r().read(0, first.as_mut_slice()).expect("read");
    assert!(first.as_slice()[..4096].iter().all(|b| *b == 1));
    assert!(first.as_slice()[4096..].iter().all(|b| *b == 2));
    // 300 snapshots with a write between each, then deleted in an order
    // mixing oldest, newest and middle.
    let mut ids = Vec::new();
    for i in 0..300u64 {
        let id = Id128::random();
        s.r().take_snapshot(id).expect("snapshot");
        ids.push(id);
        s.r()
            .write(
                (i % 8) * EXTENT_SIZE + 8192,
                filled(4096, i as u8).as_slice(),
            )
            .expect("write");
    }
    assert!(s.pool.allocated_bytes() > 8 * EXTENT_SIZE);
    s.reload();
    assert_eq!(s.r().snapshot_ids(), ids);
    let mut order: Vec<SnapshotId> = Vec::new();
    while !ids.is_empty() {
        let i = match order.len() % 3 {
            0 => 0,
            1 => ids.len() - 1,
            _ => ids.len() / 2,
        };
        order.push(ids.remove(i));
    }
    for id in order {
        s.r().delete_snapshot(id).expect("delete");
    }
    assert_eq!(s.pool.allocated_bytes(), 8 * EXTENT_SIZE);
    assert_eq!(s.pool.allocated_bytes(), s.r().allocated_bytes());
}

#[test]
fn unknown_snapshots_and_the_limit_are_specific_errors() {
    let s = Store::new(8);
    let ghost = Id128::random();
    let mut buf = filled(4096, 0);
    assert!(matches!(
        s.r().read_snapshot(ghost, 0, buf.as_mut_slice()),
        Err(ReplicaError::NoSnapshot { .. })
    ));
    assert!(matches!(
        s.r().revert(ghost),
        Err(ReplicaError::NoSnapshot { .. })
    ));
    s.r()
        .delete_snapshot(ghost)
        .expect("deleting an unknown snapshot is done");
    let id = Id128::random();
    s.r().take_snapshot(id).expect("snapshot");
    s.r()
        .take_snapshot(id)
        .expect("taking the same snapshot again is done");
    assert_eq!(s.r().snapshot_ids(), vec![id]);
    for _ in 1..super::MAX_SNAPSHOTS {
        s.r().take_snapshot(Id128::random()).expect("snapshot");
    }
    assert!(matches!(
        s.r().take_snapshot(Id128::random()),
        Err(ReplicaError::TooManySnapshots(_))
    ));
}

/// A revert interrupted after its new head was recorded, but before the
/// chain switched to it, leaves extents outside the chain: the next start
/// zeroes and frees them and the head reads as before.
#[test]
fn remains_outside_the_chain_are_freed_at_start() {
    let mut s = Store::new(16);
    s.r().write(0, filled(4096, 5).as_slice()).expect("write");
    s.r().take_snapshot(Id128::random()).expect("snapshot");
    let stray = s.pool.allocate().expect("extent");
    s.pool
        .write(stray, 0, filled(4096, 9).as_slice())
        .expect("data");
    let tree = s
        .meta
        .db
        .open_tree(super::super::tree_name(s.volume))
        .expect("tree");
    let v = super::Version {
        layer: 77,
        backing: super::Backing::Extent(stray),
        bits: None,
    };
    tree.insert(super::layers::key(77, 3), super::layers::value(&v))
        .expect("insert");
    s.meta.commit().expect("commit");
    s.reload();
    assert_eq!(s.pool.allocated_bytes(), s.r().allocated_bytes());
    assert_eq!(s.pool.allocated_bytes(), EXTENT_SIZE);
    assert!(tree.get(super::layers::key(77, 3)).expect("get").is_none());
    let mut back = filled(4096, 0);
    s.r()
        .read(3 * EXTENT_SIZE, back.as_mut_slice())
        .expect("read");
    assert!(back.as_slice().iter().all(|b| *b == 0));
}
