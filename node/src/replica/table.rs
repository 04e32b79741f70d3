//! The in-memory extent table: logical extent number -> pool address, as a
//! two-level array so a sparse 64 TiB volume costs memory only for the
//! regions it has written.

use crate::pool::ExtentAddr;

const LEAF: usize = 1024;

#[derive(Default)]
pub struct ExtentTable {
    leaves: Vec<Option<Box<[u64; LEAF]>>>,
}

impl ExtentTable {
    pub fn get(&self, logical: u64) -> Option<ExtentAddr> {
        let (hi, lo) = (
            (logical / LEAF as u64) as usize,
            (logical % LEAF as u64) as usize,
        );
        let leaf = self.leaves.get(hi)?.as_ref()?;
        ExtentAddr::unpack(leaf[lo])
    }

    pub fn set(&mut self, logical: u64, addr: Option<ExtentAddr>) {
        let (hi, lo) = (
            (logical / LEAF as u64) as usize,
            (logical % LEAF as u64) as usize,
        );
        if self.leaves.len() <= hi {
            if addr.is_none() {
                return;
            }
            self.leaves.resize_with(hi + 1, || None);
        }
        let leaf = self.leaves[hi].get_or_insert_with(|| Box::new([0u64; LEAF]));
        leaf[lo] = addr.map(ExtentAddr::pack).unwrap_or(0);
    }

    pub fn logical_extents(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for (hi, leaf) in self.leaves.iter().enumerate() {
            if let Some(leaf) = leaf {
                for (lo, v) in leaf.iter().enumerate() {
                    if *v != 0 {
                        out.push((hi * LEAF + lo) as u64);
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_set_get_clear() {
        let mut t = ExtentTable::default();
        let a = ExtentAddr {
            device: 1,
            extent: 9,
        };
        assert_eq!(t.get(5_000_000), None);
        t.set(5_000_000, Some(a));
        t.set(3, Some(a));
        assert_eq!(t.get(5_000_000), Some(a));
        assert_eq!(t.logical_extents(), vec![3, 5_000_000]);
        t.set(3, None);
        assert_eq!(t.get(3), None);
        assert_eq!(t.logical_extents(), vec![5_000_000]);
    }
}
