//! The replica data path's frames: the engine's reads, writes, flushes and
//! zeroings to a remote replica travel as fixed little-endian headers plus
//! a payload over a plain TCP connection to the peer port (told apart from
//! gRPC by the first four bytes). Open and checksum requests stay on gRPC
//! (`data.proto`); this path carries the hot I/O without HTTP/2 framing or
//! task hand-offs.
//!
//! Request (72 bytes): magic u32 | version u16 | op u16 | cluster id [16] |
//! volume id [16] | epoch u64 | offset u64 | length u64 | crc32 u32 | 0 u32,
//! followed by `length` payload bytes for a write. Reply (24 bytes): magic
//! u32 | status u32 | fence u64 | length u32 | crc32 u32, followed by
//! `length` bytes: the data of a read, or an error message. crc32 (IEEE)
//! covers every payload; a receiver checks it before using the bytes.
//!
//! Compatibility: a receiver accepts versions `MIN_VERSION..=VERSION` and
//! answers others with `UNSUPPORTED`; new fields only ever go in new ops.

pub const REQ_MAGIC: u32 = 0x5152_4443; // "CDRQ" on the wire
pub const REP_MAGIC: u32 = 0x5052_4443; // "CDRP" on the wire
pub const VERSION: u16 = 1;
pub const MIN_VERSION: u16 = 1;
pub const REQ_LEN: usize = 72;
pub const REP_LEN: usize = 24;
/// Largest payload either side accepts.
pub const MAX_PAYLOAD: u64 = 8 << 20;

pub const OP_WRITE: u16 = 1;
pub const OP_READ: u16 = 2;
pub const OP_FLUSH: u16 = 3;
pub const OP_ZERO: u16 = 4;
/// A rebuild's catch-up of a faulted replica (copying the snapshots it
/// lacks into its head before it takes each): a write, zeroing or flush
/// admitted even on a replica marked unclean, whose mark it neither needs
/// nor drops, since nothing is read from a faulted replica. A receiver
/// that predates them answers `INVALID` (the rebuild retries later).
pub const OP_REPAIR_WRITE: u16 = 5;
pub const OP_REPAIR_ZERO: u16 = 6;
pub const OP_REPAIR_FLUSH: u16 = 7;

pub const OK: u32 = 0;
pub const FENCED: u32 = 1;
pub const GONE: u32 = 2;
pub const NO_SPACE: u32 = 3;
pub const CORRUPT: u32 = 4;
pub const INVALID: u32 = 5;
pub const FAILED: u32 = 6;
pub const UNSUPPORTED: u32 = 7;
/// The replica may lack acknowledged writes after an unclean restart of its
/// node and serves nothing until it is rebuilt. A receiver that predates
/// this status treats it as any failure (and records the replica faulted),
/// which is what it means.
pub const UNCLEAN: u32 = 8;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub version: u16,
    pub op: u16,
    pub cluster: [u8; 16],
    pub volume: [u8; 16],
    pub epoch: u64,
    pub offset: u64,
    pub length: u64,
    pub crc: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u32,
    pub fence: u64,
    pub length: u32,
    pub crc: u32,
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}

impl Request {
    pub fn encode(&self) -> [u8; REQ_LEN] {
        let mut b = [0u8; REQ_LEN];
        b[0..4].copy_from_slice(&REQ_MAGIC.to_le_bytes());
        b[4..6].copy_from_slice(&self.version.to_le_bytes());
        b[6..8].copy_from_slice(&self.op.to_le_bytes());
        b[8..24].copy_from_slice(&self.cluster);
        b[24..40].copy_from_slice(&self.volume);
        b[40..48].copy_from_slice(&self.epoch.to_le_bytes());
        b[48..56].copy_from_slice(&self.offset.to_le_bytes());
        b[56..64].copy_from_slice(&self.length.to_le_bytes());
        b[64..68].copy_from_slice(&self.crc.to_le_bytes());
        b
    }

    /// `None` when the magic is wrong (not our protocol).
    pub fn decode(b: &[u8; REQ_LEN]) -> Option<Request> {
        if u32_at(b, 0) != REQ_MAGIC {
            return None;
        }
        Some(Request {
            version: u16_at(b, 4),
            op: u16_at(b, 6),
            cluster: b[8..24].try_into().expect("16 bytes"),
            volume: b[24..40].try_into().expect("16 bytes"),
            epoch: u64_at(b, 40),
            offset: u64_at(b, 48),
            length: u64_at(b, 56),
            crc: u32_at(b, 64),
        })
    }
}

impl Reply {
    pub fn encode(&self) -> [u8; REP_LEN] {
        let mut b = [0u8; REP_LEN];
        b[0..4].copy_from_slice(&REP_MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&self.status.to_le_bytes());
        b[8..16].copy_from_slice(&self.fence.to_le_bytes());
        b[16..20].copy_from_slice(&self.length.to_le_bytes());
        b[20..24].copy_from_slice(&self.crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; REP_LEN]) -> Option<Reply> {
        if u32_at(b, 0) != REP_MAGIC {
            return None;
        }
        Some(Reply {
            status: u32_at(b, 4),
            fence: u64_at(b, 8),
            length: u32_at(b, 16),
            crc: u32_at(b, 20),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn request() -> impl Strategy<Value = Request> {
        (
            any::<u16>(),
            any::<u16>(),
            any::<[u8; 16]>(),
            any::<[u8; 16]>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<u32>(),
        )
            .prop_map(
                |(version, op, cluster, volume, epoch, offset, length, crc)| Request {
                    version,
                    op,
                    cluster,
                    volume,
                    epoch,
                    offset,
                    length,
                    crc,
                },
            )
    }

    proptest! {
        #[test]
        fn every_request_and_reply_round_trips(r in request(), status: u32, fence: u64, length: u32, crc: u32) {
            prop_assert_eq!(Request::decode(&r.encode()), Some(r));
            let rep = Reply { status, fence, length, crc };
            prop_assert_eq!(Reply::decode(&rep.encode()), Some(rep));
        }

        /// Any bytes decode to nothing (foreign magic) or to the request
        /// they spell: decoding never invents or loses a field.
        #[test]
        fn arbitrary_bytes_decode_to_what_they_spell(mut b in any::<[u8; REQ_LEN]>(), ours: bool) {
            if ours {
                b[0..4].copy_from_slice(&REQ_MAGIC.to_le_bytes());
            }
            match Request::decode(&b) {
                None => prop_assert_ne!(&b[0..4], &REQ_MAGIC.to_le_bytes()[..]),
                Some(r) => prop_assert_eq!(&r.encode()[..68], &b[..68]),
            }
        }
    }

    #[test]
    fn round_trip_and_foreign_bytes() {
        let r = Request {
            version: VERSION,
            op: OP_WRITE,
            cluster: [1; 16],
            volume: [2; 16],
            epoch: 3,
            offset: 4096,
            length: 512,
            crc: 0xdead_beef,
        };
        assert_eq!(Request::decode(&r.encode()), Some(r));
        let p = Reply {
            status: FENCED,
            fence: 9,
            length: 0,
            crc: 0,
        };
        assert_eq!(Reply::decode(&p.encode()), Some(p));
        let mut http2 = [0u8; REQ_LEN];
        http2[..4].copy_from_slice(b"PRI ");
        assert_eq!(Request::decode(&http2), None);
    }
}
