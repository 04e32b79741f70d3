//! The disk pool: one or more devices (block devices or files) carved into
//! fixed-size extents that replicas allocate on first write.
//!
//! Invariants:
//! - Every device starts with a [`superblock::Superblock`] naming this pool;
//!   a device with another pool's superblock, a corrupted one, or foreign data
//!   is refused unless the operator forces a format.
//! - A free extent reads as zeros on stable storage. Fresh file devices are
//!   sparse; fresh block devices are zeroed at format; an extent is zeroed
//!   (hole punched or `BLKZEROOUT`) and that made durable *before* it is
//!   recorded free. So a map entry that reached disk ahead of its data can
//!   only ever expose zeros, never another volume's bytes.
//! - The allocation state is not stored: it is rebuilt at start from the
//!   replicas' extent maps, so it cannot disagree with them.

pub mod superblock;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use superblock::{Superblock, SuperblockError, SUPERBLOCK_SIZE};

use crate::sys::{self, AlignedBuf};
use crate::types::{now_unix_ms, Id128, NodeId, PoolId};

/// Extent size of new pools.
pub const EXTENT_SIZE: u64 = 1 << 20;
/// Alignment of every `O_DIRECT` transfer to a pool device.
pub const IO_ALIGN: usize = 4096;

/// A device the operator named on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskSpec {
    /// An existing block device.
    Block(PathBuf),
    /// A file, created (sparse) with this size if absent.
    File(PathBuf, u64),
}

impl DiskSpec {
    pub fn path(&self) -> &Path {
        match self {
            DiskSpec::Block(p) | DiskSpec::File(p, _) => p,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("cannot open pool device {path}: {source}")]
    OpenDevice { path: PathBuf, source: io::Error },
    #[error("{path} is not a block device")]
    NotBlockDevice { path: PathBuf },
    #[error("pool device {path} is too small ({size} bytes); it must hold at least 2 extents of {EXTENT_SIZE} bytes")]
    DeviceTooSmall { path: PathBuf, size: u64 },
    #[error("refusing {path}: {reason}; pass --force-format to erase it and add it to this pool")]
    DeviceRefused { path: PathBuf, reason: String },
    #[error("pool device {index} ({path}, id {id}) is missing; start the daemon with it or its data is unavailable")]
    DeviceMissing { index: u32, path: String, id: Id128 },
    #[error("{path} is given twice")]
    DuplicateDevice { path: PathBuf },
    #[error("pool is full: no free extent on any device")]
    Full,
    #[error("I/O error on pool device {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("pool metadata: {0}")]
    Meta(String),
}

/// Where an extent lives: device index and extent number on that device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExtentAddr {
    pub device: u16,
    pub extent: u32,
}

impl ExtentAddr {
    /// Packs into a non-zero u64 (0 means "no extent" in extent maps).
    pub fn pack(self) -> u64 {
        ((self.device as u64 + 1) << 32) | self.extent as u64
    }
    pub fn unpack(v: u64) -> Option<ExtentAddr> {
        let dev = v >> 32;
        if dev == 0 || dev > u16::MAX as u64 + 1 {
            return None;
        }
        Some(ExtentAddr {
            device: (dev - 1) as u16,
            extent: v as u32,
        })
    }
}

/// The persisted description of the pool (in the node's metadata db).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolConfig {
    version: u32,
    pool_id: PoolId,
    extent_size: u64,
    devices: Vec<DeviceRecord>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceRecord {
    index: u32,
    id: Id128,
    path: String,
}

pub struct Device {
    pub index: u32,
    pub id: Id128,
    pub path: PathBuf,
    pub is_block: bool,
    file: File,
    data_offset: u64,
    extent_count: u32,
    /// Set before every write; cleared by a sync that covers it.
    dirty: AtomicBool,
}

struct Allocator {
    /// Per device: free extent numbers (popped from the end: low numbers first).
    free: Vec<Vec<u32>>,
    used: Vec<u64>,
}

pub struct Pool {
    pub id: PoolId,
    pub extent_size: u64,
    devices: Vec<Device>,
    alloc: Mutex<Allocator>,
}

const CONFIG_KEY: &[u8] = b"pool";

impl Pool {
    /// Opens the pool recorded in `meta`, or creates it from `specs`, adding
    /// devices that are new. Every recorded device must be present.
    pub fn open(
        meta: &sled::Tree,
        node_id: NodeId,
        specs: &[DiskSpec],
        force_format: bool,
    ) -> Result<Pool, PoolError> {
        let mut config: PoolConfig = match meta
            .get(CONFIG_KEY)
            .map_err(|e| PoolError::Meta(e.to_string()))?
        {
            Some(v) => serde_json::from_slice(&v)
                .map_err(|e| PoolError::Meta(format!("stored pool config: {e}")))?,
            None => PoolConfig {
                version: 1,
                pool_id: Id128::random(),
                extent_size: EXTENT_SIZE,
                devices: Vec::new(),
            },
        };
        let mut seen = std::collections::HashSet::new();
        for s in specs {
            let canon = std::fs::canonicalize(s.path()).unwrap_or_else(|_| s.path().to_path_buf());
            if !seen.insert(canon) {
                return Err(PoolError::DuplicateDevice {
                    path: s.path().to_path_buf(),
                });
            }
        }
        // First pass: open and classify every device, changing nothing, so a
        // refusal or a missing device never leaves a half-formatted pool.
        let mut probed = Vec::new();
        for spec in specs {
            let (file, size, is_block) = open_device(spec)?;
            let path = spec.path().to_path_buf();
            let mut sbuf = AlignedBuf::new(SUPERBLOCK_SIZE, IO_ALIGN);
            file.read_exact_at(sbuf.as_mut_slice(), 0)
                .map_err(|source| PoolError::Io {
                    path: path.clone(),
                    source,
                })?;
            let known = match Superblock::decode(sbuf.as_slice()) {
                Ok(sb) if sb.pool_id == config.pool_id => {
                    let Some(rec) = config.devices.iter().find(|d| d.id == sb.device_id) else {
                        return Err(PoolError::DeviceRefused {
                            path,
                            reason: format!(
                                "its superblock names device {} which this pool does not record",
                                sb.device_id
                            ),
                        });
                    };
                    if sb.extent_size != config.extent_size || sb.device_index != rec.index {
                        return Err(PoolError::DeviceRefused {
                            path,
                            reason: "its superblock disagrees with the pool's records".into(),
                        });
                    }
                    Some(sb)
                }
                Ok(sb) if !force_format => {
                    return Err(PoolError::DeviceRefused {
                        path,
                        reason: format!("it belongs to another Cairn pool ({})", sb.pool_id),
                    })
                }
                Err(SuperblockError::Blank) => None,
                Err(e) if !force_format => {
                    return Err(PoolError::DeviceRefused {
                        path,
                        reason: e.to_string(),
                    })
                }
                _ => None,
            };
            probed.push((path, file, size, is_block, known));
        }
        for rec in &config.devices {
            if !probed
                .iter()
                .any(|p| p.4.as_ref().map(|sb| sb.device_id) == Some(rec.id))
            {
                return Err(PoolError::DeviceMissing {
                    index: rec.index,
                    path: rec.path.clone(),
                    id: rec.id,
                });
            }
        }
        let mut opened: Vec<Device> = Vec::new();
        let mut changed = false;
        for (path, file, size, is_block, known) in probed {
            let device = match known {
                Some(sb) => {
                    let rec = config
                        .devices
                        .iter_mut()
                        .find(|d| d.id == sb.device_id)
                        .expect("checked above");
                    if rec.path != path.to_string_lossy() {
                        rec.path = path.to_string_lossy().into_owned();
                        changed = true;
                    }
                    Device {
                        index: rec.index,
                        id: sb.device_id,
                        path,
                        is_block,
                        file,
                        data_offset: sb.data_offset,
                        extent_count: sb.extent_count as u32,
                        dirty: AtomicBool::new(false),
                    }
                }
                None => {
                    if config.devices.len() >= u16::MAX as usize {
                        return Err(PoolError::Meta("too many devices".into()));
                    }
                    let index = config
                        .devices
                        .iter()
                        .map(|d| d.index + 1)
                        .max()
                        .unwrap_or(0);
                    let dev = format_device(
                        file,
                        path,
                        is_block,
                        size,
                        index,
                        config.pool_id,
                        node_id,
                        config.extent_size,
                    )?;
                    config.devices.push(DeviceRecord {
                        index,
                        id: dev.id,
                        path: dev.path.to_string_lossy().into_owned(),
                    });
                    changed = true;
                    dev
                }
            };
            opened.push(device);
        }
        if changed || meta.get(CONFIG_KEY).ok().flatten().is_none() {
            let v = serde_json::to_vec(&config).map_err(|e| PoolError::Meta(e.to_string()))?;
            meta.insert(CONFIG_KEY, v)
                .map_err(|e| PoolError::Meta(e.to_string()))?;
            meta.flush().map_err(|e| PoolError::Meta(e.to_string()))?;
        }
        opened.sort_by_key(|d| d.index);
        let max_index = opened.last().map(|d| d.index as usize + 1).unwrap_or(0);
        let mut devices: Vec<Option<Device>> = (0..max_index).map(|_| None).collect();
        for d in opened {
            let i = d.index as usize;
            devices[i] = Some(d);
        }
        let devices: Vec<Device> = devices
            .into_iter()
            .map(|d| d.expect("every recorded device was opened"))
            .collect();
        let alloc = Allocator {
            free: devices
                .iter()
                .map(|d| (0..d.extent_count).rev().collect())
                .collect(),
            used: vec![0; devices.len()],
        };
        Ok(Pool {
            id: config.pool_id,
            extent_size: config.extent_size,
            devices,
            alloc: Mutex::new(alloc),
        })
    }

    pub fn devices(&self) -> &[Device] {
        &self.devices
    }

    /// Records extents found in replica maps at start. Fails with the first
    /// address that lies outside the pool or is claimed twice (a corrupted map).
    pub fn claim_all(&self, addrs: &mut [ExtentAddr]) -> Result<(), ExtentAddr> {
        let mut a = self.alloc.lock().expect("allocator lock");
        addrs.sort();
        for w in addrs.windows(2) {
            if w[0] == w[1] {
                return Err(w[0]);
            }
        }
        for (dev, free) in a.free.iter_mut().enumerate() {
            let claimed: std::collections::HashSet<u32> = addrs
                .iter()
                .filter(|x| x.device as usize == dev)
                .map(|x| x.extent)
                .collect();
            free.retain(|e| !claimed.contains(e));
        }
        for x in addrs.iter() {
            let Some(d) = self.devices.get(x.device as usize) else {
                return Err(*x);
            };
            if x.extent >= d.extent_count {
                return Err(*x);
            }
            a.used[x.device as usize] += 1;
        }
        Ok(())
    }

    /// Takes a free extent (reading as zeros) from the device with most room.
    pub fn allocate(&self) -> Result<ExtentAddr, PoolError> {
        let mut a = self.alloc.lock().expect("allocator lock");
        let best = (0..a.free.len())
            .max_by_key(|i| a.free[*i].len())
            .filter(|i| !a.free[*i].is_empty());
        let Some(dev) = best else {
            return Err(PoolError::Full);
        };
        let extent = a.free[dev].pop().expect("non-empty");
        a.used[dev] += 1;
        Ok(ExtentAddr {
            device: dev as u16,
            extent,
        })
    }

    /// Returns extents to the free lists. The caller has already zeroed them
    /// durably ([`Pool::zero`] + [`Pool::sync`]) and persisted that no map
    /// refers to them.
    pub fn release(&self, addrs: &[ExtentAddr]) {
        let mut a = self.alloc.lock().expect("allocator lock");
        for x in addrs {
            a.free[x.device as usize].push(x.extent);
            a.used[x.device as usize] -= 1;
        }
    }

    fn device(&self, addr: ExtentAddr) -> io::Result<&Device> {
        self.devices
            .get(addr.device as usize)
            .filter(|d| addr.extent < d.extent_count)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("extent {addr:?} outside the pool"),
                )
            })
    }

    fn offset(&self, d: &Device, addr: ExtentAddr, within: u64, len: usize) -> u64 {
        debug_assert!(within + len as u64 <= self.extent_size);
        d.data_offset + addr.extent as u64 * self.extent_size + within
    }

    /// Reads `buf.len()` bytes at `within` bytes into the extent. `buf`, the
    /// offset and the length are [`IO_ALIGN`]-aligned (`O_DIRECT`).
    pub fn read(&self, addr: ExtentAddr, within: u64, buf: &mut [u8]) -> io::Result<()> {
        let d = self.device(addr)?;
        d.file
            .read_exact_at(buf, self.offset(d, addr, within, buf.len()))
    }

    /// Writes at `within` bytes into the extent; same alignment rules as read.
    pub fn write(&self, addr: ExtentAddr, within: u64, buf: &[u8]) -> io::Result<()> {
        let d = self.device(addr)?;
        d.file
            .write_all_at(buf, self.offset(d, addr, within, buf.len()))?;
        // Marked after the write completed and before it is acknowledged: a
        // sync that cleared the flag while this write was in flight would
        // otherwise leave it out of every later sync.
        d.dirty.store(true, Ordering::Release);
        Ok(())
    }

    /// Makes a range inside an extent read as zeros (not yet durable).
    pub fn zero(&self, addr: ExtentAddr, within: u64, len: u64) -> io::Result<()> {
        let d = self.device(addr)?;
        let off = self.offset(d, addr, within, len as usize);
        if d.is_block {
            sys::block_zero_out(&d.file, off, len)?;
        } else {
            sys::punch_hole(&d.file, off, len)?;
        }
        d.dirty.store(true, Ordering::Release);
        Ok(())
    }

    /// Makes every completed write and zeroing durable on every device.
    pub fn sync(&self) -> io::Result<()> {
        for d in &self.devices {
            if d.dirty.swap(false, Ordering::AcqRel) {
                if let Err(e) = sys::fdatasync(&d.file) {
                    d.dirty.store(true, Ordering::Release);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Capacity and allocation per device: (device, capacity bytes, allocated bytes).
    pub fn usage(&self) -> Vec<(&Device, u64, u64)> {
        let a = self.alloc.lock().expect("allocator lock");
        self.devices
            .iter()
            .map(|d| {
                (
                    d,
                    d.extent_count as u64 * self.extent_size,
                    a.used[d.index as usize] * self.extent_size,
                )
            })
            .collect()
    }

    pub fn capacity_bytes(&self) -> u64 {
        self.devices
            .iter()
            .map(|d| d.extent_count as u64 * self.extent_size)
            .sum()
    }

    pub fn allocated_bytes(&self) -> u64 {
        let a = self.alloc.lock().expect("allocator lock");
        a.used.iter().sum::<u64>() * self.extent_size
    }
}

fn open_device(spec: &DiskSpec) -> Result<(File, u64, bool), PoolError> {
    let path = spec.path();
    let err = |source| PoolError::OpenDevice {
        path: path.to_path_buf(),
        source,
    };
    if let DiskSpec::File(p, size) = spec {
        if !p.exists() {
            if let Some(parent) = p.parent() {
                std::fs::create_dir_all(parent).map_err(err)?;
            }
            let f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(p)
                .map_err(err)?;
            f.set_len(*size).map_err(err)?;
            f.sync_all().map_err(err)?;
            if let Some(parent) = p.parent() {
                sys::fsync_dir(parent).map_err(err)?;
            }
        }
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .map_err(err)?;
    let meta = file.metadata().map_err(err)?;
    let is_block = meta.file_type().is_block_device();
    if !is_block && meta.permissions().mode() & 0o077 != 0 {
        // A pool file holds every volume's data: root only.
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(err)?;
        tracing::info!(path = %path.display(), "pool file made readable by root only (0600)");
    }
    let size = match spec {
        DiskSpec::Block(_) if !is_block => {
            return Err(PoolError::NotBlockDevice {
                path: path.to_path_buf(),
            })
        }
        DiskSpec::Block(_) => sys::block_device_size(&file).map_err(err)?,
        DiskSpec::File(..) if is_block => sys::block_device_size(&file).map_err(err)?,
        DiskSpec::File(..) => meta.len(),
    };
    if size < 2 * EXTENT_SIZE {
        return Err(PoolError::DeviceTooSmall {
            path: path.to_path_buf(),
            size,
        });
    }
    Ok((file, size, is_block))
}

#[allow(clippy::too_many_arguments)]
fn format_device(
    file: File,
    path: PathBuf,
    is_block: bool,
    size: u64,
    index: u32,
    pool_id: PoolId,
    node_id: NodeId,
    extent_size: u64,
) -> Result<Device, PoolError> {
    let io_err = |source| PoolError::Io {
        path: path.clone(),
        source,
    };
    let data_offset = extent_size;
    let extent_count = ((size - data_offset) / extent_size).min(u32::MAX as u64);
    // Free extents must read as zeros: a fresh file is sparse, a block device
    // (or a reused file) is zeroed over its whole data area first.
    if is_block {
        sys::block_zero_out(&file, data_offset, extent_count * extent_size).map_err(io_err)?;
    } else {
        sys::punch_hole(&file, 0, size).map_err(io_err)?;
    }
    let sb = Superblock {
        pool_id,
        node_id,
        device_id: Id128::random(),
        device_index: index,
        extent_size,
        extent_count,
        data_offset,
        created_unix_ms: now_unix_ms(),
    };
    let mut buf = AlignedBuf::new(SUPERBLOCK_SIZE, IO_ALIGN);
    sb.encode(buf.as_mut_slice());
    file.write_all_at(buf.as_slice(), 0).map_err(io_err)?;
    sys::fdatasync(&file).map_err(io_err)?;
    tracing::info!(device = %path.display(), index, extents = extent_count, "formatted pool device");
    Ok(Device {
        index,
        id: sb.device_id,
        path,
        is_block,
        file,
        data_offset,
        extent_count: extent_count as u32,
        dirty: AtomicBool::new(false),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extent_addr_packing() {
        let a = ExtentAddr {
            device: 3,
            extent: 77,
        };
        assert_eq!(ExtentAddr::unpack(a.pack()), Some(a));
        assert_eq!(ExtentAddr::unpack(0), None);
        assert_ne!(
            ExtentAddr {
                device: 0,
                extent: 0
            }
            .pack(),
            0
        );
    }

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("cairn-pool-{tag}-{}", Id128::random()));
        std::fs::create_dir_all(&d).expect("tmpdir");
        d
    }

    #[test]
    fn create_reopen_refuse_foreign_and_fill() {
        let dir = tmpdir("a");
        let db = sled::Config::new().path(dir.join("db")).open().expect("db");
        let meta = db.open_tree("pool").expect("tree");
        let spec = DiskSpec::File(dir.join("d0.img"), 8 * EXTENT_SIZE);
        let node = Id128::random();
        let pool = Pool::open(&meta, node, std::slice::from_ref(&spec), false).expect("create");
        assert_eq!(pool.capacity_bytes(), 7 * EXTENT_SIZE);
        let id = pool.id;
        let mut got = Vec::new();
        for _ in 0..7 {
            got.push(pool.allocate().expect("room"));
        }
        assert!(matches!(pool.allocate(), Err(PoolError::Full)));
        pool.release(&got[..2]);
        assert_eq!(pool.allocated_bytes(), 5 * EXTENT_SIZE);
        drop(pool);

        let pool = Pool::open(&meta, node, std::slice::from_ref(&spec), false).expect("reopen");
        assert_eq!(pool.id, id);
        drop(pool);

        // Another pool's metadata db refuses the device.
        let db2 = sled::Config::new()
            .path(dir.join("db2"))
            .open()
            .expect("db2");
        let meta2 = db2.open_tree("pool").expect("tree");
        let e = Pool::open(&meta2, node, std::slice::from_ref(&spec), false)
            .err()
            .expect("refused");
        assert!(matches!(e, PoolError::DeviceRefused { .. }), "{e}");

        // Garbage is refused; forcing formats it.
        let junk = dir.join("junk.img");
        std::fs::write(&junk, vec![0xabu8; 4 * EXTENT_SIZE as usize]).expect("junk");
        let jspec = DiskSpec::File(junk, 0);
        let e = Pool::open(&meta2, node, std::slice::from_ref(&jspec), false)
            .err()
            .expect("refused");
        assert!(e.to_string().contains("other data"), "{e}");
        Pool::open(&meta2, node, std::slice::from_ref(&jspec), true).expect("forced");

        // A recorded device that is not given is reported missing.
        let e = Pool::open(&meta, node, &[], false).err().expect("missing");
        assert!(matches!(e, PoolError::DeviceMissing { .. }), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
