//! The versions of a replica's logical extents: which layer (the head that
//! takes writes, or a snapshot's frozen layer) holds which blocks of each
//! extent, and the rule that decides which version serves a block.
//!
//! Space is allocated in pool extents (1 MiB), copy-on-write is decided
//! per 4 KiB block. The first write into an extent that a snapshot holds
//! does not copy the extent: it allocates a fresh extent for the head, a
//! *partial* version with a bitmap of the blocks the head has written, and
//! writes only its own blocks there. Reads of the head take each block
//! from the newest version whose bitmap has it, so every unwritten block
//! still comes from the snapshot. An aligned 4 KiB write after a snapshot
//! therefore costs one 4 KiB write plus a map record, not a 1 MiB
//! read-and-copy (the naive extent-granular copy-on-write moves 256 times
//! the data); space stays extent-granular like thin provisioning, so a
//! snapshot costs one extent per extent written since, and the
//! bench/snapshot report measures both. Once every block of a partial
//! version is written it becomes a full one and writes go the fast path.
//!
//! Rules:
//! - Layer ids grow with creation order; the head has the largest id. The
//!   view of layer `L` is, per block, the newest version with a layer id
//!   `<= L` that holds the block (a full version holds all of them); no
//!   version means zeros. Revert keeps this linear: it shadows, in a fresh
//!   head, every extent that snapshots newer than the target changed (what
//!   only the old head changed leaves with it).
//! - A version is a pool extent (full or partial) or `Zeros` (a whiteout:
//!   the head trimmed an extent a snapshot still holds).
//! - Only the head's versions change; a snapshot's versions change only
//!   when a neighbour is deleted and merged, never in what they read.
//! - "Which extents changed between snapshot A and B" is the union of the
//!   extents of the layers in `(A, B]`, read from [`Layers::members`]
//!   without touching data.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::pool::ExtentAddr;
use crate::types::Id128;
pub use crate::types::SnapshotId;

pub type LayerId = u64;

/// Copy-on-write granularity.
pub const BLOCK: u64 = 4096;

/// The blocks of one extent a partial version holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bits(Box<[u64]>);

impl Bits {
    pub fn empty(blocks: u32) -> Bits {
        Bits(vec![0u64; (blocks as usize).div_ceil(64)].into_boxed_slice())
    }

    pub fn get(&self, i: u32) -> bool {
        self.0[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// Sets blocks `[first, first + count)`; true if any was unset.
    pub fn set_range(&mut self, first: u32, count: u32) -> bool {
        let mut changed = false;
        for i in first..first + count {
            let (w, b) = ((i / 64) as usize, i % 64);
            changed |= self.0[w] & (1 << b) == 0;
            self.0[w] |= 1 << b;
        }
        changed
    }

    pub fn count(&self) -> u32 {
        self.0.iter().map(|w| w.count_ones()).sum()
    }

    pub fn is_full(&self, blocks: u32) -> bool {
        self.count() == blocks
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        self.0.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    /// Bits of an extent of `blocks` blocks from their stored form.
    pub fn from_bytes(b: &[u8], blocks: u32) -> Option<Bits> {
        let words = (blocks as usize).div_ceil(64);
        if b.len() != words * 8 {
            return None;
        }
        let v: Vec<u64> = b
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        let bits = Bits(v.into_boxed_slice());
        // No bit beyond the extent's last block.
        (0..(words as u32 * 64))
            .filter(|i| *i >= blocks)
            .all(|i| !bits.get(i))
            .then_some(bits)
    }
}

/// What backs a version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backing {
    /// Reads as zeros; shadows older versions (a trimmed extent).
    Zeros,
    Extent(ExtentAddr),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Version {
    pub layer: LayerId,
    pub backing: Backing,
    /// `None`: holds every block of the extent.
    pub bits: Option<Bits>,
}

impl Version {
    pub fn holds(&self, block: u32) -> bool {
        self.bits.as_ref().is_none_or(|b| b.get(block))
    }

    pub fn addr(&self) -> Option<ExtentAddr> {
        match self.backing {
            Backing::Extent(a) => Some(a),
            Backing::Zeros => None,
        }
    }
}

const LEAF: usize = 1024;
/// `Slot::word` flags: the top version is a whiteout; `extra` holds more.
const ZEROS: u64 = 1 << 62;
const EXTRA: u64 = 1 << 63;
const ADDR: u64 = (1 << 62) - 1;

/// The newest version of one logical extent, inline: a packed address (or
/// `ZEROS`), and `EXTRA` when the top is partial or older versions exist.
#[derive(Clone, Copy, Default)]
struct Slot {
    word: u64,
    layer: LayerId,
}

#[derive(Default)]
struct Extra {
    top_bits: Option<Bits>,
    /// Older versions, newest first.
    older: Vec<Version>,
}

/// All versions of a replica's extents, in memory. A sparse two-level
/// array keeps a large, thinly written volume cheap; extents with history
/// carry the rest in a side map.
pub struct Layers {
    pub blocks: u32,
    leaves: Vec<Option<Box<[Slot; LEAF]>>>,
    extra: HashMap<u64, Extra>,
    members: BTreeMap<LayerId, BTreeSet<u64>>,
}

/// One piece of a resolved read: `count` blocks from `first` come from
/// this extent (at the same block offsets), or are zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub first: u32,
    pub count: u32,
    pub from: Option<ExtentAddr>,
}

impl Layers {
    pub fn new(blocks: u32) -> Layers {
        Layers {
            blocks,
            leaves: Vec::new(),
            extra: HashMap::new(),
            members: BTreeMap::new(),
        }
    }

    fn slot(&self, e: u64) -> Slot {
        let (hi, lo) = ((e / LEAF as u64) as usize, (e % LEAF as u64) as usize);
        self.leaves
            .get(hi)
            .and_then(|l| l.as_ref())
            .map_or(Slot::default(), |l| l[lo])
    }

    fn set_slot(&mut self, e: u64, s: Slot) {
        let (hi, lo) = ((e / LEAF as u64) as usize, (e % LEAF as u64) as usize);
        if self.leaves.len() <= hi {
            if s.word == 0 {
                return;
            }
            self.leaves.resize_with(hi + 1, || None);
        }
        let leaf = self.leaves[hi].get_or_insert_with(|| Box::new([Slot::default(); LEAF]));
        leaf[lo] = s;
    }

    /// The extent the head may write `e` in place: the top version is the
    /// head's and full. The fast path of every write.
    pub fn writable(&self, e: u64, head: LayerId) -> Option<ExtentAddr> {
        self.head_extent(e, head).filter(|x| !x.1).map(|x| x.0)
    }

    /// The head's own extent for `e` and whether its version is partial.
    pub fn head_extent(&self, e: u64, head: LayerId) -> Option<(ExtentAddr, bool)> {
        let s = self.slot(e);
        if s.layer != head || s.word == 0 || s.word & ZEROS != 0 {
            return None;
        }
        Some((ExtentAddr::unpack(s.word & ADDR)?, !self.top_full(e, s)))
    }

    /// Whether the head's own version of `e` holds every block of
    /// `[first, first + count)` (false when the head has no version).
    pub fn head_holds(&self, e: u64, head: LayerId, first: u32, count: u32) -> bool {
        let s = self.slot(e);
        if s.layer != head || s.word == 0 {
            return false;
        }
        match self.extra.get(&e).and_then(|x| x.top_bits.as_ref()) {
            Some(b) if s.word & EXTRA != 0 => (first..first + count).all(|i| b.get(i)),
            _ => true,
        }
    }

    fn top_full(&self, e: u64, s: Slot) -> bool {
        s.word & EXTRA == 0 || self.extra.get(&e).is_some_and(|x| x.top_bits.is_none())
    }

    /// Where the view of layer `at` reads all of `e` when one version
    /// serves every block (`Some(None)`: zeros); `None` when blocks come
    /// from several versions. The fast path of every read.
    pub fn whole(&self, e: u64, at: LayerId) -> Option<Option<ExtentAddr>> {
        let s = self.slot(e);
        if s.word == 0 {
            return Some(None);
        }
        if !self.top_full(e, s) {
            return None;
        }
        if s.layer <= at {
            return Some(if s.word & ZEROS != 0 {
                None
            } else {
                ExtentAddr::unpack(s.word & ADDR)
            });
        }
        (s.word & EXTRA == 0).then_some(None)
    }

    /// Whether no layer holds a version of `e`.
    pub fn is_empty(&self, e: u64) -> bool {
        self.slot(e).word == 0
    }

    /// Logical extents below which every version lies.
    pub fn span(&self) -> u64 {
        (self.leaves.len() * LEAF) as u64
    }

    /// Every version of `e`, newest first.
    pub fn stack(&self, e: u64) -> Vec<Version> {
        let s = self.slot(e);
        if s.word == 0 {
            return Vec::new();
        }
        let backing = if s.word & ZEROS != 0 {
            Backing::Zeros
        } else {
            match ExtentAddr::unpack(s.word & ADDR) {
                Some(a) => Backing::Extent(a),
                None => return Vec::new(),
            }
        };
        let mut out = vec![Version {
            layer: s.layer,
            backing,
            bits: None,
        }];
        if s.word & EXTRA != 0 {
            if let Some(x) = self.extra.get(&e) {
                out[0].bits = x.top_bits.clone();
                out.extend(x.older.iter().cloned());
            }
        }
        out
    }

    /// Replaces every version of `e` (newest first, layers strictly
    /// decreasing), keeping the per-layer index in step.
    pub fn store(&mut self, e: u64, versions: Vec<Version>) {
        for v in self.stack(e) {
            if let Some(m) = self.members.get_mut(&v.layer) {
                m.remove(&e);
                if m.is_empty() {
                    self.members.remove(&v.layer);
                }
            }
        }
        debug_assert!(versions.windows(2).all(|w| w[0].layer > w[1].layer));
        for v in &versions {
            self.members.entry(v.layer).or_default().insert(e);
        }
        let mut it = versions.into_iter();
        let Some(top) = it.next() else {
            self.extra.remove(&e);
            self.set_slot(e, Slot::default());
            return;
        };
        let older: Vec<Version> = it.collect();
        let mut word = match top.backing {
            Backing::Zeros => ZEROS,
            Backing::Extent(a) => a.pack(),
        };
        if top.bits.is_some() || !older.is_empty() {
            word |= EXTRA;
            self.extra.insert(
                e,
                Extra {
                    top_bits: top.bits,
                    older,
                },
            );
        } else {
            self.extra.remove(&e);
        }
        self.set_slot(
            e,
            Slot {
                word,
                layer: top.layer,
            },
        );
    }

    /// Where the view of layer `at` reads blocks `[first, first + count)`
    /// of extent `e`, as runs of consecutive blocks with one source.
    pub fn resolve(&self, e: u64, at: LayerId, first: u32, count: u32, out: &mut Vec<Run>) {
        out.clear();
        if let Some(from) = self.whole(e, at) {
            out.push(Run { first, count, from });
            return;
        }
        let stack = self.stack(e);
        let visible: Vec<&Version> = stack.iter().filter(|v| v.layer <= at).collect();
        for b in first..first + count {
            let from = visible.iter().find(|v| v.holds(b)).and_then(|v| v.addr());
            match out.last_mut() {
                Some(r) if r.from == from && r.first + r.count == b => r.count += 1,
                _ => out.push(Run {
                    first: b,
                    count: 1,
                    from,
                }),
            }
        }
    }

    /// Whether the view of layer `at` reads anything but zeros-by-absence
    /// from `e` (an extent a rebuild must copy).
    pub fn has_data(&self, e: u64, at: LayerId) -> bool {
        // The newest visible version decides: a whiteout shadows everything
        // below it, anything else is an extent with data.
        self.stack(e)
            .iter()
            .find(|v| v.layer <= at)
            .is_some_and(|v| v.addr().is_some())
    }

    /// Logical extents layer `layer` holds a version of.
    pub fn members(&self, layer: LayerId) -> impl Iterator<Item = u64> + '_ {
        self.members
            .get(&layer)
            .into_iter()
            .flat_map(|m| m.iter().copied())
    }

    pub fn member_count(&self, layer: LayerId) -> usize {
        self.members.get(&layer).map_or(0, |m| m.len())
    }

    /// Layers holding at least one version.
    pub fn layers(&self) -> Vec<LayerId> {
        self.members.keys().copied().collect()
    }

    /// Every pool extent any version uses.
    pub fn extents(&self) -> Vec<ExtentAddr> {
        let mut out = Vec::new();
        for (layer, es) in &self.members {
            for e in es {
                if let Some(a) = self
                    .stack(*e)
                    .iter()
                    .find(|v| v.layer == *layer)
                    .and_then(|v| v.addr())
                {
                    out.push(a);
                }
            }
        }
        out
    }
}

/// The sled key of `e`'s version in `layer` (layer 0, the head of every
/// replica made before snapshots, keeps the original 8-byte keys).
pub fn key(layer: LayerId, e: u64) -> Vec<u8> {
    if layer == 0 {
        return e.to_be_bytes().to_vec();
    }
    let mut k = layer.to_be_bytes().to_vec();
    k.extend(e.to_be_bytes());
    k
}

/// `(layer, logical extent)` of an extent key; `None` for other keys.
pub fn parse_key(k: &[u8]) -> Option<(LayerId, u64)> {
    match k.len() {
        8 => Some((0, u64::from_be_bytes(k.try_into().ok()?))),
        16 => Some((
            u64::from_be_bytes(k[..8].try_into().ok()?),
            u64::from_be_bytes(k[8..].try_into().ok()?),
        )),
        _ => None,
    }
}

/// Stored form of a version's backing and bits: the packed address (0 for
/// `Zeros`), followed by the bitmap of a partial version.
pub fn value(v: &Version) -> Vec<u8> {
    let word = v.addr().map_or(0, ExtentAddr::pack);
    let mut out = word.to_le_bytes().to_vec();
    if let Some(b) = &v.bits {
        out.extend(b.to_bytes());
    }
    out
}

pub fn parse_value(layer: LayerId, b: &[u8], blocks: u32) -> Result<Version, String> {
    if b.len() < 8 {
        return Err(format!("extent value of {} bytes", b.len()));
    }
    let word = u64::from_le_bytes(b[..8].try_into().expect("8 bytes"));
    let backing = if word == 0 {
        Backing::Zeros
    } else {
        Backing::Extent(
            ExtentAddr::unpack(word).ok_or_else(|| format!("invalid extent address {word:#x}"))?,
        )
    };
    let bits =
        if b.len() == 8 {
            None
        } else {
            Some(Bits::from_bytes(&b[8..], blocks).ok_or_else(|| {
                format!("block bitmap of {} bytes for {blocks} blocks", b.len() - 8)
            })?)
        };
    if backing == Backing::Zeros && bits.is_some() {
        return Err("a partial whiteout".into());
    }
    Ok(Version {
        layer,
        backing,
        bits,
    })
}

/// The sled key of the replica's layer chain.
pub const CHAIN_KEY: &[u8] = b"chain";
const CHAIN_VERSION: u8 = 1;

/// The replica's layers in order: its snapshots (oldest first) and the
/// head. A layer id in the map that is in neither is an orphan: the
/// remains of an interrupted revert or deletion, freed at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub head: LayerId,
    pub next: LayerId,
    pub snapshots: Vec<(LayerId, SnapshotId)>,
}

impl Default for Chain {
    /// A replica made before snapshots: its head is layer 0.
    fn default() -> Chain {
        Chain {
            head: 0,
            next: 1,
            snapshots: Vec::new(),
        }
    }
}

impl Chain {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![CHAIN_VERSION];
        b.extend(self.head.to_le_bytes());
        b.extend(self.next.to_le_bytes());
        b.extend((self.snapshots.len() as u32).to_le_bytes());
        for (l, s) in &self.snapshots {
            b.extend(l.to_le_bytes());
            b.extend(s.0);
        }
        b
    }

    pub fn decode(b: &[u8]) -> Result<Chain, String> {
        let bad = || format!("layer chain record of {} bytes is damaged", b.len());
        let (&v, rest) = b.split_first().ok_or_else(bad)?;
        if v != CHAIN_VERSION {
            return Err(format!(
                "layer chain record of format version {v}; this daemon reads {CHAIN_VERSION}: start a daemon of that version"
            ));
        }
        if rest.len() < 20 {
            return Err(bad());
        }
        let u64_at = |o: usize| u64::from_le_bytes(rest[o..o + 8].try_into().expect("8 bytes"));
        let n = u32::from_le_bytes(rest[16..20].try_into().expect("4 bytes")) as usize;
        if rest.len() != 20 + n * 24 {
            return Err(bad());
        }
        let snapshots: Vec<(LayerId, SnapshotId)> = (0..n)
            .map(|i| {
                let o = 20 + i * 24;
                (
                    u64_at(o),
                    Id128(rest[o + 8..o + 24].try_into().expect("16 bytes")),
                )
            })
            .collect();
        let c = Chain {
            head: u64_at(0),
            next: u64_at(8),
            snapshots,
        };
        let ordered = c.snapshots.windows(2).all(|w| w[0].0 < w[1].0)
            && c.snapshots.last().is_none_or(|s| s.0 < c.head)
            && c.head < c.next;
        if !ordered {
            return Err(bad());
        }
        Ok(c)
    }

    pub fn layer_of(&self, s: SnapshotId) -> Option<LayerId> {
        self.snapshots.iter().find(|x| x.1 == s).map(|x| x.0)
    }

    /// Whether `layer` belongs to the chain.
    pub fn contains(&self, layer: LayerId) -> bool {
        layer == self.head || self.snapshots.iter().any(|x| x.0 == layer)
    }

    /// The layer right above `layer` in the chain (a snapshot or the head).
    pub fn successor(&self, layer: LayerId) -> LayerId {
        self.snapshots
            .iter()
            .map(|x| x.0)
            .find(|l| *l > layer)
            .unwrap_or(self.head)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(n: u32) -> Backing {
        Backing::Extent(ExtentAddr {
            device: 0,
            extent: n,
        })
    }

    #[test]
    fn resolution_takes_each_block_from_the_newest_visible_version() {
        let mut l = Layers::new(8);
        let mut bits = Bits::empty(8);
        bits.set_range(2, 3);
        l.store(
            5,
            vec![
                Version {
                    layer: 3,
                    backing: a(30),
                    bits: Some(bits),
                },
                Version {
                    layer: 1,
                    backing: a(10),
                    bits: None,
                },
            ],
        );
        let mut out = Vec::new();
        l.resolve(5, 3, 0, 8, &mut out);
        let ext = |n| {
            Some(ExtentAddr {
                device: 0,
                extent: n,
            })
        };
        assert_eq!(
            out,
            vec![
                Run {
                    first: 0,
                    count: 2,
                    from: ext(10)
                },
                Run {
                    first: 2,
                    count: 3,
                    from: ext(30)
                },
                Run {
                    first: 5,
                    count: 3,
                    from: ext(10)
                },
            ]
        );
        l.resolve(5, 2, 0, 8, &mut out);
        assert_eq!(
            out,
            vec![Run {
                first: 0,
                count: 8,
                from: ext(10)
            }]
        );
        l.resolve(5, 0, 0, 8, &mut out);
        assert_eq!(
            out,
            vec![Run {
                first: 0,
                count: 8,
                from: None
            }]
        );
        assert_eq!(l.writable(5, 3), None, "partial");
        assert_eq!(l.members(1).collect::<Vec<_>>(), vec![5]);
        l.store(5, vec![]);
        assert_eq!(l.layers(), Vec::<LayerId>::new());
    }

    #[test]
    fn chain_and_values_round_trip_and_damage_is_refused() {
        let c = Chain {
            head: 9,
            next: 10,
            snapshots: vec![(2, Id128::random()), (5, Id128::random())],
        };
        assert_eq!(Chain::decode(&c.encode()), Ok(c.clone()));
        let mut bad = c.encode();
        bad.pop();
        assert!(Chain::decode(&bad).is_err());
        let mut newer = c.encode();
        newer[0] = 2;
        assert!(Chain::decode(&newer).unwrap_err().contains("version 2"));
        assert_eq!(c.successor(2), 5);
        assert_eq!(c.successor(5), 9);
        let mut bits = Bits::empty(256);
        bits.set_range(7, 9);
        let v = Version {
            layer: 4,
            backing: a(3),
            bits: Some(bits),
        };
        assert_eq!(parse_value(4, &value(&v), 256), Ok(v));
        assert!(parse_value(4, &[0u8; 40], 256).is_err(), "partial whiteout");
        assert!(parse_value(4, &[1u8; 12], 256).is_err());
        assert_eq!(parse_key(&key(0, 7)), Some((0, 7)));
        assert_eq!(parse_key(&key(3, 7)), Some((3, 7)));
        assert_eq!(parse_key(CHAIN_KEY), None);
    }
}
