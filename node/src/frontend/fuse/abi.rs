//! The subset of the FUSE kernel ABI (`linux/fuse.h`, protocol 7.x) that the
//! file server speaks, with bounds-checked little helpers to read request
//! structs and build replies. Field offsets are those of the C structs.

pub const KERNEL_MAJOR: u32 = 7;
/// Newest minor we know the reply layouts of (`fuse_init_out` is 64 bytes
/// from 7.23 on).
pub const KERNEL_MINOR_MAX: u32 = 41;

pub const IN_HEADER_LEN: usize = 40;
pub const OUT_HEADER_LEN: usize = 16;
/// Notification code asking the kernel to resend requests it sent but got
/// no reply for (Linux 6.9+).
pub const NOTIFY_RESEND: i32 = 7;
pub const WRITE_IN_LEN: usize = 40;

pub const LOOKUP: u32 = 1;
pub const FORGET: u32 = 2;
pub const GETATTR: u32 = 3;
pub const SETATTR: u32 = 4;
pub const OPEN: u32 = 14;
pub const READ: u32 = 15;
pub const WRITE: u32 = 16;
pub const STATFS: u32 = 17;
pub const RELEASE: u32 = 18;
pub const FSYNC: u32 = 20;
pub const FLUSH: u32 = 25;
pub const INIT: u32 = 26;
pub const OPENDIR: u32 = 27;
pub const READDIR: u32 = 28;
pub const RELEASEDIR: u32 = 29;
pub const FSYNCDIR: u32 = 30;
pub const ACCESS: u32 = 34;
pub const INTERRUPT: u32 = 36;
pub const DESTROY: u32 = 38;
pub const BATCH_FORGET: u32 = 42;
pub const FALLOCATE: u32 = 43;

// INIT flags.
pub const ASYNC_READ: u32 = 1 << 0;
pub const BIG_WRITES: u32 = 1 << 5;
pub const ASYNC_DIO: u32 = 1 << 15;
pub const MAX_PAGES: u32 = 1 << 22;

// OPEN reply flags.
pub const FOPEN_DIRECT_IO: u32 = 1 << 0;
pub const FOPEN_PARALLEL_DIRECT_WRITES: u32 = 1 << 6;

// SETATTR valid bits.
pub const FATTR_SIZE: u32 = 1 << 3;

// fallocate modes.
pub const FALLOC_KEEP_SIZE: u32 = 0x01;
pub const FALLOC_PUNCH_HOLE: u32 = 0x02;
pub const FALLOC_ZERO_RANGE: u32 = 0x10;

pub const ROOT_INO: u64 = 1;

pub fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

pub fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

pub fn put_u16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}
pub fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}
pub fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// `struct fuse_in_header`.
#[derive(Debug, Clone, Copy)]
pub struct InHeader {
    pub len: u32,
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
}

impl InHeader {
    pub fn parse(b: &[u8]) -> Option<InHeader> {
        Some(InHeader {
            len: u32_at(b, 0)?,
            opcode: u32_at(b, 4)?,
            unique: u64_at(b, 8)?,
            nodeid: u64_at(b, 16)?,
        })
    }
}

pub const ATTR_LEN: usize = 88;

/// Fills a `struct fuse_attr` (88 bytes) at `b[0..88]`.
pub fn encode_attr(b: &mut [u8], ino: u64, size: u64, mode: u32, nlink: u32) {
    b[..ATTR_LEN].fill(0);
    put_u64(b, 0, ino);
    put_u64(b, 8, size);
    put_u64(b, 16, size.div_ceil(512));
    put_u32(b, 60, mode);
    put_u32(b, 64, nlink);
    put_u32(b, 80, 4096); // blksize
}
