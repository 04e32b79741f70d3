//! Data for tests: patterns, file manifests written and verified through a
//! mount, and O_DIRECT reads and writes of block devices.

use std::io::Write;
use std::path::Path;

/// Deterministic pseudo-random bytes (xorshift64*), seeded per call.
pub fn fill_pattern(buf: &mut [u8], seed: u64) {
    let mut x = seed | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

/// The data files written by [`write_manifest`]: name, seed and crc32.
pub struct Manifest {
    pub files: Vec<(String, u64, u32)>,
    pub file_size: usize,
}

/// Writes `files` files of `file_size` bytes of seeded random data under
/// `dir`, fsyncing each and the directory.
pub fn write_manifest(dir: &Path, files: usize, file_size: usize, seed: u64) -> Manifest {
    let mut buf = vec![0u8; file_size];
    let mut out = Vec::new();
    for i in 0..files {
        let s = seed.wrapping_add(i as u64 * 7919);
        fill_pattern(&mut buf, s);
        let name = format!("data-{seed:x}-{i:04}.bin");
        let mut f = std::fs::File::create(dir.join(&name)).expect("create data file");
        f.write_all(&buf).expect("write data file");
        f.sync_all().expect("fsync data file");
        out.push((name, s, crc32fast::hash(&buf)));
    }
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .expect("fsync dir");
    Manifest {
        files: out,
        file_size,
    }
}

/// Verifies every file of a manifest byte for byte; on a mismatch reports
/// the first differing offset.
pub fn verify_manifest(dir: &Path, m: &Manifest) {
    let mut expect = vec![0u8; m.file_size];
    for (name, seed, crc) in &m.files {
        let data = std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("reading {name}: {e}"));
        assert_eq!(data.len(), m.file_size, "{name} has the wrong length");
        if crc32fast::hash(&data) != *crc {
            fill_pattern(&mut expect, *seed);
            let at = data
                .iter()
                .zip(&expect)
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            let bad = data.iter().zip(&expect).filter(|(a, b)| a != b).count();
            panic!("{name}: content differs from what was written, first at byte {at}, {bad} bytes differ");
        }
    }
}

// ---- direct I/O ----

/// A 4 KiB-aligned buffer for O_DIRECT I/O.
pub struct DirectBuf {
    ptr: *mut u8,
    len: usize,
}

impl DirectBuf {
    pub fn new(len: usize) -> DirectBuf {
        let layout = std::alloc::Layout::from_size_align(len, 4096).expect("layout");
        // SAFETY: the layout has a non-zero size (callers pass whole blocks).
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "allocation failed");
        DirectBuf { ptr, len }
    }
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len bytes for the buffer's lifetime.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for DirectBuf {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len, 4096).expect("layout");
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, layout) };
    }
}

fn open_direct(path: &Path, write: bool) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_DIRECT)
        .open(path)
}

/// Reads `len` bytes at `offset` bypassing the page cache.
pub fn read_direct(path: &Path, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let f = open_direct(path, false)?;
    let mut buf = DirectBuf::new(len);
    f.read_exact_at(buf.as_mut_slice(), offset)?;
    Ok(buf.as_slice().to_vec())
}

/// Writes `data` at `offset` with O_DIRECT, then fsync.
pub fn write_direct(path: &Path, offset: u64, data: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let f = open_direct(path, true)?;
    let mut buf = DirectBuf::new(data.len());
    buf.as_mut_slice().copy_from_slice(data);
    f.write_all_at(buf.as_slice(), offset)?;
    f.sync_all()
}

/// Writes `data` at `offset` with O_DIRECT and no fsync: acknowledged by
/// the device, not flushed.
pub fn write_direct_unflushed(path: &Path, offset: u64, data: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let f = open_direct(path, true)?;
    let mut buf = DirectBuf::new(data.len());
    buf.as_mut_slice().copy_from_slice(data);
    f.write_all_at(buf.as_slice(), offset)
}
