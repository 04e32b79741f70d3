//! The Linux system calls Cairn needs, in one place: random bytes, aligned
//! buffers for `O_DIRECT`, `fallocate`, block-device ioctls, the loop device
//! ([`loopdev`]) and mounts ([`mount`]).
//!
//! Every `unsafe` block here wraps one syscall; its SAFETY comment names the
//! invariant the call relies on. Callers above this module never see a raw
//! pointer.

pub mod loopdev;
pub mod mount;

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;

/// Fills `buf` from the kernel's CSPRNG (`getrandom(2)`).
pub fn fill_random(buf: &mut [u8]) {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`,
        // which is valid for writes for the duration of the call.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n > 0 {
            done += n as usize;
        } else if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            // getrandom only fails before the pool is initialised (it blocks
            // instead) or on EINTR; anything else means a broken kernel.
            panic!("getrandom failed: {}", io::Error::last_os_error());
        }
    }
}

/// Declares this process an I/O flusher (`PR_SET_IO_FLUSHER`): memory reclaim
/// triggered by our own allocations then avoids waiting on I/O that we
/// ourselves must serve.
pub fn set_io_flusher() -> io::Result<()> {
    const PR_SET_IO_FLUSHER: libc::c_int = 57;
    // SAFETY: prctl with integer arguments only; no memory is passed.
    let r = unsafe { libc::prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Makes every page of `buf` present and writable now, and keeps it so
/// (`mlock`): the kernel then copies into it without faulting. A FUSE
/// request copied into a page that faults while the process is being
/// killed is ended with EIO instead of being kept for the next daemon.
pub fn pin_memory(buf: &mut [u8]) -> io::Result<()> {
    for b in buf.iter_mut().step_by(4096) {
        // A volatile write: the page must really be touched.
        // SAFETY: `b` is a valid, exclusive reference into `buf`.
        unsafe { std::ptr::write_volatile(b, 0) };
    }
    // SAFETY: the range is `buf`'s, valid for the call; mlock only changes
    // paging of these pages.
    if unsafe { libc::mlock(buf.as_ptr().cast(), buf.len()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The running kernel's (major, minor) version.
pub fn kernel_version() -> Option<(u32, u32)> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// A zero-initialised heap buffer whose start is aligned to `align` bytes, for
/// `O_DIRECT` I/O. Allocated once and reused; never per request.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    layout: std::alloc::Layout,
}

// SAFETY: AlignedBuf owns its allocation exclusively (like Vec<u8>); moving it
// to another thread moves that ownership.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    pub fn new(len: usize, align: usize) -> Self {
        let layout = std::alloc::Layout::from_size_align(len.max(1), align)
            .expect("alignment is a power of two");
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(p).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, len, layout }
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is a live allocation of at least len initialised bytes
        // owned by self; the borrow of self bounds the slice's lifetime.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: ptr was allocated with exactly this layout and is freed once.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// Frees the range of a regular file so that it reads as zeros
/// (`FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`).
pub fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate on an fd we own; no memory is passed.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKZEROOUT: libc::c_ulong = 0x127f;

/// Size in bytes of a block device.
pub fn block_device_size(file: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points to
    // a live local.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if r == 0 {
        Ok(size)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Makes a range of a block device read as zeros (`BLKZEROOUT`).
pub fn block_zero_out(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let range: [u64; 2] = [offset, len];
    // SAFETY: BLKZEROOUT reads two u64s through the pointer, which points to a
    // live local array of two u64s.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKZEROOUT, range.as_ptr()) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `fdatasync(2)`.
pub fn fdatasync(file: &File) -> io::Result<()> {
    // SAFETY: fdatasync on an fd we own.
    let r = unsafe { libc::fdatasync(file.as_raw_fd()) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// fsyncs a directory so that entries created or removed in it are durable.
pub fn fsync_dir(path: &std::path::Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

/// Runs a command to completion, turning a non-zero exit into an error that
/// carries the command line and its standard error.
pub fn run_command(program: &str, args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}
