//! The block-device frontend: how a volume engine becomes a block device
//! of this host's kernel, behind one interface the volume manager uses
//! ([`BlockFrontend`]). Today's frontend is [`FuseLoop`]: a file on the
//! daemon's FUSE mount per volume, with a loop device over it. A ublk
//! frontend (a kernel block device served from user space, no loop or FUSE
//! layer) would be a second implementation, picked at start-up; the
//! manager's attach, detach, resize, restart and shutdown code does not
//! change.
//!
//! The contract, for any implementation:
//! - `attach` gives a device path that serves the engine until `detach`;
//!   a read-only attach gives a device that refuses writes.
//! - Devices may outlive the daemon (a crash, a graceful stop with the
//!   volume in use). A new daemon learns whether it took them over from
//!   [`BlockFrontend::adopted`]; it then tells the frontend which ones it
//!   will serve again ([`BlockFrontend::serve`] with their ids, whose I/O
//!   waits meanwhile) and either [`BlockFrontend::adopt`]s an engine for
//!   each or [`BlockFrontend::abandon`]s it (its waiting I/O fails).
//! - The stop is two steps: [`BlockFrontend::stop`] before the engines
//!   flush (with `keep`, in-use devices stay usable and their I/O waits for
//!   the next daemon; the answer says whether every request in flight was
//!   answered or handed over), [`BlockFrontend::close`] after.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::fuse::FuseServer;
use crate::engine::Engine;
use crate::sys::loopdev;
use crate::types::VolumeId;

pub trait BlockFrontend: Send + Sync {
    /// For logs: which frontend this is.
    fn kind(&self) -> &'static str;
    /// Whether it took over the devices a previous daemon left (and still
    /// has to be told which of them it serves).
    fn adopted(&self) -> bool;
    /// A block device serving `engine` as volume `id`.
    fn attach(&self, id: VolumeId, engine: Arc<Engine>, read_only: bool)
        -> Result<PathBuf, String>;
    /// Whether `device` is this frontend's live device of `id`.
    fn is_bound(&self, id: VolumeId, device: &Path) -> bool;
    /// Removes `device` if it is `id`'s, and stops serving `id`.
    fn detach(&self, id: VolumeId, device: &Path) -> Result<(), String>;
    /// Makes `device` show the engine's current size.
    fn refresh_size(&self, id: VolumeId, device: &Path) -> Result<(), String>;
    /// What holds `device` open besides the frontend, if anything.
    fn in_use(&self, device: &Path) -> Option<String>;
    /// Starts serving. Devices of `kept` (taken over) wait for
    /// [`Self::adopt`] or [`Self::abandon`] until `until`.
    fn serve(&self, kept: &[VolumeId], until: Instant) -> Result<(), String>;
    /// Serves `engine` on the taken-over device of `id`; false once stopped.
    fn adopt(&self, id: VolumeId, engine: Arc<Engine>) -> bool;
    /// Gives up a taken-over device: its waiting I/O fails.
    fn abandon(&self, id: VolumeId);
    /// Stops serving (new attaches fail). With `keep`, the devices still in
    /// use stay usable for the next daemon; returns whether every request
    /// in flight was answered or handed over.
    fn stop(&self, keep: bool) -> bool;
    /// Whether [`Self::stop`] ran.
    fn stopped(&self) -> bool;
    /// Releases what the stop left (after the engines flushed).
    fn close(&self);
}

/// A file per volume on the daemon's FUSE mount, a loop device over it.
pub struct FuseLoop {
    dir: PathBuf,
    serving: Mutex<Option<FuseServer>>,
    /// After a stop without hand-off: unmounted by `close`.
    closing: Mutex<Option<FuseServer>>,
    adopted: bool,
}

impl FuseLoop {
    /// `server` was just mounted (or taken over from the holder: then not
    /// started yet) at `dir`.
    pub fn new(dir: &Path, server: FuseServer) -> FuseLoop {
        FuseLoop {
            dir: dir.to_path_buf(),
            adopted: !server.started(),
            serving: Mutex::new(Some(server)),
            closing: Mutex::new(None),
        }
    }

    fn file(&self, id: VolumeId) -> PathBuf {
        self.dir.join(id.to_string())
    }

    fn with<T>(&self, f: impl FnOnce(&FuseServer) -> T) -> Option<T> {
        self.serving.lock().expect("fuse lock").as_ref().map(f)
    }
}

impl BlockFrontend for FuseLoop {
    fn kind(&self) -> &'static str {
        "fuse+loop"
    }

    fn adopted(&self) -> bool {
        self.adopted
    }

    fn attach(
        &self,
        id: VolumeId,
        engine: Arc<Engine>,
        read_only: bool,
    ) -> Result<PathBuf, String> {
        let path = self
            .with(|f| f.add(&id.to_string(), engine))
            .ok_or("the daemon is shutting down")?;
        // A loop device over a file opened read-only is read-only.
        let result = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(&path)
            .map_err(|e| format!("open {}: {e}", path.display()))
            .and_then(|f| loopdev::attach(&f, 4096).map_err(|e| format!("loop device setup: {e}")));
        match result {
            Ok(dev) => {
                if !loopdev::uses_direct_io(&dev) {
                    if let Err(e) = loopdev::set_direct_io(&dev) {
                        tracing::warn!(device = %dev.display(), error = %e, "loop device runs without direct I/O");
                    }
                }
                Ok(dev)
            }
            Err(e) => {
                self.with(|f| f.remove(&id.to_string()));
                Err(e)
            }
        }
    }

    fn is_bound(&self, id: VolumeId, device: &Path) -> bool {
        loopdev::backing_file(device).as_deref() == Some(self.file(id).as_path())
    }

    fn detach(&self, id: VolumeId, device: &Path) -> Result<(), String> {
        if !device.as_os_str().is_empty() && self.is_bound(id, device) {
            loopdev::detach(device).map_err(|e| format!("detach {}: {e}", device.display()))?;
        }
        self.with(|f| f.remove(&id.to_string()));
        Ok(())
    }

    fn refresh_size(&self, id: VolumeId, device: &Path) -> Result<(), String> {
        // The FUSE file reports the new size on its next stat (its
        // attributes are never cached); the loop device re-reads it.
        let file = self.file(id);
        std::fs::metadata(&file).map_err(|e| format!("stat {}: {e}", file.display()))?;
        loopdev::refresh_capacity(device)
            .map_err(|e| format!("loop capacity refresh on {}: {e}", device.display()))
    }

    fn in_use(&self, device: &Path) -> Option<String> {
        loopdev::in_use(device)
    }

    fn serve(&self, kept: &[VolumeId], until: Instant) -> Result<(), String> {
        let mut serving = self.serving.lock().expect("fuse lock");
        let Some(f) = serving.as_mut() else {
            return Ok(());
        };
        for id in kept {
            f.expect(&id.to_string(), until);
        }
        f.start(true)
            .map_err(|e| format!("cannot start FUSE session threads: {e}"))
    }

    fn adopt(&self, id: VolumeId, engine: Arc<Engine>) -> bool {
        self.with(|f| f.add(&id.to_string(), engine)).is_some()
    }

    fn abandon(&self, id: VolumeId) {
        self.with(|f| f.abandon(&id.to_string()));
    }

    fn stop(&self, keep: bool) -> bool {
        let Some(f) = self.serving.lock().expect("fuse lock").take() else {
            return true;
        };
        if keep {
            tracing::info!(mountpoint = %f.mountpoint().display(), "handing the FUSE connection to the holder");
            return f.hand_off(Duration::from_secs(10));
        }
        *self.closing.lock().expect("fuse lock") = Some(f);
        true
    }

    fn stopped(&self) -> bool {
        self.serving.lock().expect("fuse lock").is_none()
    }

    fn close(&self) {
        if let Some(f) = self.closing.lock().expect("fuse lock").take() {
            f.unmount();
        }
    }
}
