//! The on-device superblock: the first 4 KiB of every pool device.
//!
//! Layout (little-endian): magic `CAIRNPL\0` (8), format version u32, pool id
//! (16), node id (16), device id (16), device index u32, extent size u64,
//! extent count u64, data offset u64, created (unix ms) u64, then a crc32 of
//! everything before it. Decoding is strict: wrong magic, unknown version or a
//! checksum mismatch are distinct errors, so a daemon refuses a foreign or
//! corrupted device instead of overwriting it.

use crate::types::Id128;

pub const MAGIC: [u8; 8] = *b"CAIRNPL\0";
pub const FORMAT_VERSION: u32 = 1;
pub const SUPERBLOCK_SIZE: usize = 4096;
const BODY_LEN: usize = 8 + 4 + 16 * 3 + 4 + 8 * 4;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub pool_id: Id128,
    pub node_id: Id128,
    pub device_id: Id128,
    pub device_index: u32,
    pub extent_size: u64,
    pub extent_count: u64,
    pub data_offset: u64,
    pub created_unix_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SuperblockError {
    #[error("no Cairn superblock (the device is blank)")]
    Blank,
    #[error("no Cairn superblock (the device holds other data)")]
    Foreign,
    #[error("Cairn superblock format version {0} is not supported (this build reads version {FORMAT_VERSION})")]
    UnsupportedVersion(u32),
    #[error("Cairn superblock checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): the superblock is corrupted")]
    Checksum { stored: u32, computed: u32 },
    #[error("Cairn superblock has impossible geometry: {0}")]
    Geometry(String),
}

impl Superblock {
    pub fn encode(&self, out: &mut [u8]) {
        out[..SUPERBLOCK_SIZE].fill(0);
        let mut w = Writer { buf: out, pos: 0 };
        w.put(&MAGIC);
        w.put(&FORMAT_VERSION.to_le_bytes());
        w.put(&self.pool_id.0);
        w.put(&self.node_id.0);
        w.put(&self.device_id.0);
        w.put(&self.device_index.to_le_bytes());
        w.put(&self.extent_size.to_le_bytes());
        w.put(&self.extent_count.to_le_bytes());
        w.put(&self.data_offset.to_le_bytes());
        w.put(&self.created_unix_ms.to_le_bytes());
        debug_assert_eq!(w.pos, BODY_LEN);
        let crc = crc32fast::hash(&out[..BODY_LEN]);
        out[BODY_LEN..BODY_LEN + 4].copy_from_slice(&crc.to_le_bytes());
    }

    pub fn decode(buf: &[u8]) -> Result<Superblock, SuperblockError> {
        if buf.len() < SUPERBLOCK_SIZE {
            return Err(SuperblockError::Geometry("short read".into()));
        }
        if buf[..8] != MAGIC {
            return Err(if buf[..SUPERBLOCK_SIZE].iter().all(|b| *b == 0) {
                SuperblockError::Blank
            } else {
                SuperblockError::Foreign
            });
        }
        let mut r = Reader { buf, pos: 8 };
        let version = u32::from_le_bytes(r.take());
        if version != FORMAT_VERSION {
            return Err(SuperblockError::UnsupportedVersion(version));
        }
        let stored = u32::from_le_bytes(buf[BODY_LEN..BODY_LEN + 4].try_into().expect("4 bytes"));
        let computed = crc32fast::hash(&buf[..BODY_LEN]);
        if stored != computed {
            return Err(SuperblockError::Checksum { stored, computed });
        }
        let sb = Superblock {
            pool_id: Id128(r.take()),
            node_id: Id128(r.take()),
            device_id: Id128(r.take()),
            device_index: u32::from_le_bytes(r.take()),
            extent_size: u64::from_le_bytes(r.take()),
            extent_count: u64::from_le_bytes(r.take()),
            data_offset: u64::from_le_bytes(r.take()),
            created_unix_ms: u64::from_le_bytes(r.take()),
        };
        if !sb.extent_size.is_power_of_two()
            || sb.extent_size < 4096
            // Block counts of an extent travel in 16 bits (extent map log).
            || sb.extent_size > 128 << 20
            || sb.data_offset < SUPERBLOCK_SIZE as u64
        {
            return Err(SuperblockError::Geometry(format!(
                "extent size {} / data offset {}",
                sb.extent_size, sb.data_offset
            )));
        }
        if sb.extent_count > u32::MAX as u64 {
            return Err(SuperblockError::Geometry(format!(
                "{} extents",
                sb.extent_count
            )));
        }
        Ok(sb)
    }
}

struct Writer<'a> {
    buf: &'a mut [u8],
    pos: usize,
}
impl Writer<'_> {
    fn put(&mut self, b: &[u8]) {
        self.buf[self.pos..self.pos + b.len()].copy_from_slice(b);
        self.pos += b.len();
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}
impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let v: [u8; N] = self.buf[self.pos..self.pos + N]
            .try_into()
            .expect("length checked by caller");
        self.pos += N;
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Superblock {
        Superblock {
            pool_id: Id128::random(),
            node_id: Id128::random(),
            device_id: Id128::random(),
            device_index: 3,
            extent_size: 1 << 20,
            extent_count: 2047,
            data_offset: 1 << 20,
            created_unix_ms: 42,
        }
    }

    #[test]
    fn roundtrip() {
        let sb = sample();
        let mut buf = vec![0u8; SUPERBLOCK_SIZE];
        sb.encode(&mut buf);
        assert_eq!(Superblock::decode(&buf), Ok(sb));
    }

    #[test]
    fn every_corrupted_body_byte_is_detected() {
        let mut buf = vec![0u8; SUPERBLOCK_SIZE];
        sample().encode(&mut buf);
        for i in 12..BODY_LEN + 4 {
            let mut b = buf.clone();
            b[i] ^= 0x40;
            assert!(
                Superblock::decode(&b).is_err(),
                "flip at byte {i} went unnoticed"
            );
        }
    }

    #[test]
    fn blank_foreign_and_version() {
        assert_eq!(
            Superblock::decode(&[0u8; SUPERBLOCK_SIZE]),
            Err(SuperblockError::Blank)
        );
        let mut g = vec![0u8; SUPERBLOCK_SIZE];
        g[100] = 7;
        assert_eq!(Superblock::decode(&g), Err(SuperblockError::Foreign));
        let mut buf = vec![0u8; SUPERBLOCK_SIZE];
        sample().encode(&mut buf);
        buf[8] = 9;
        assert_eq!(
            Superblock::decode(&buf),
            Err(SuperblockError::UnsupportedVersion(9))
        );
    }
}
