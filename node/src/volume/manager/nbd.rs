//! The NBD server's view of the manager: which volumes it exports and the
//! claim each connection holds (a writer attaches the volume for the
//! connection's life).

use std::sync::Arc;

use super::*;

/// Releases an NBD connection's claim on a volume.
struct ExportClaim {
    mgr: std::sync::Weak<VolumeManager>,
    id: VolumeId,
    name: String,
    writer: bool,
}

impl Drop for ExportClaim {
    fn drop(&mut self) {
        let Some(m) = self.mgr.upgrade() else { return };
        // Under the volume's guard, like opening: a new writer waits until
        // this one's detach. Nothing that holds the guard waits for an NBD
        // connection to end, so waiting here is bounded by their work.
        let _g = loop {
            match m.guard(&self.name) {
                Ok(g) => break g,
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
            }
        };
        let last_writer = {
            let mut ex = m.exports.lock().expect("exports lock");
            let Some(u) = ex.get_mut(&self.id) else {
                return;
            };
            if self.writer {
                u.writers -= 1;
            } else {
                u.readers -= 1;
            }
            self.writer && u.writers == 0
        };
        if last_writer && m.local_record(self.id).is_none() {
            // The writer's attachment ends with it: flush, then release.
            if let Some(e) = m.engine(self.id) {
                if let Err(err) = e.flush() {
                    tracing::error!(volume = %self.id, error = %err, "flush after NBD writer failed");
                }
            }
            if let Err(e) = m.store.propose(Command::Detach {
                id: self.id,
                node: m.cfg.node_id,
            }) {
                tracing::warn!(volume = %self.id, error = %e, "detach after NBD writer failed");
            }
        }
    }
}

/// The NBD server's view of the manager.
pub struct NbdExports(pub Arc<VolumeManager>);

impl ExportProvider for NbdExports {
    fn export_names(&self) -> Vec<String> {
        self.0
            .store
            .read()
            .volumes
            .values()
            .filter(|v| !v.retired)
            .map(|v| v.name.clone())
            .collect()
    }

    fn open_export(&self, name: &str) -> Result<Export, String> {
        let m = &self.0;
        // One operation on the volume at a time, as at every door; no
        // node-wide lock is held across the proposals below.
        let _g = m.guard(name).map_err(|e| e.to_string())?;
        let v = m.find(name).map_err(|e| e.to_string())?;
        let engine = m.engine_for(&v).map_err(|e| e.to_string())?;
        // Attached anywhere: readers only, so NBD never writes under a
        // mounted filesystem or another node's engine. A writer attaches
        // the volume to this node for the connection's life (a new epoch
        // that fences every other engine).
        let nbd_here = v
            .attachment
            .as_ref()
            .is_some_and(|a| a.node == m.cfg.node_id)
            && m.local_record(v.id).is_none()
            && m.exports
                .lock()
                .expect("exports lock")
                .get(&v.id)
                .is_some_and(|u| u.writers > 0);
        let writer = (v.attachment.is_none() || nbd_here)
            && m.propose(
                Command::Attach {
                    id: v.id,
                    node: m.cfg.node_id,
                    force: false,
                },
                name,
            )
            .is_ok();
        let v = m.find(name).map_err(|e| e.to_string())?;
        let epoch = v.attachment.as_ref().map_or(v.epoch, |a| a.epoch);
        if writer || v.attachment.is_none() {
            if let Err(e) = engine.activate(&v, epoch) {
                if writer {
                    let _ = m.propose(
                        Command::Detach {
                            id: v.id,
                            node: m.cfg.node_id,
                        },
                        name,
                    );
                }
                return Err(e.to_string());
            }
        }
        {
            let mut ex = m.exports.lock().expect("exports lock");
            let u = ex.entry(v.id).or_default();
            if writer {
                u.writers += 1;
            } else {
                u.readers += 1;
            }
        }
        Ok(Export {
            engine,
            read_only: !writer,
            _release: Box::new(ExportClaim {
                mgr: Arc::downgrade(m),
                id: v.id,
                name: v.name.clone(),
                writer,
            }),
        })
    }
}
