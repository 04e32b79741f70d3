//! The node's periodic scrub (the comparison itself is `engine::scrub`):
//! every `--scrub-interval`, each volume whose engine this node runs —
//! attached here, or unattached with its first healthy replica here (the
//! node that also heals it) — has its healthy replicas compared, one volume
//! at a time, at most `--scrub-bandwidth` per second and replica. A
//! difference is counted in the volume's metrics and logged; making it
//! equal is left to `cairn volume verify NAME --repair`, so a scrub never
//! changes data on its own judgement. The first pass over a volume comes
//! one interval after the daemon started (or first saw the volume).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::VolumeManager;
use crate::cluster::state::Volume;
use crate::types::{now_unix_ms, VolumeId};

impl VolumeManager {
    /// Starts the scrub thread; it ends with the manager.
    pub fn start_scrubber(self: &Arc<Self>, every: Duration, bandwidth: u64) {
        let weak = Arc::downgrade(self);
        let spawned = self.cfg.threads.spawn("scrub".into(), move || {
            let mut due: HashMap<VolumeId, Instant> = HashMap::new();
            loop {
                std::thread::sleep(every.min(Duration::from_secs(1)));
                let Some(m) = weak.upgrade() else { return };
                if m.frontend.stopped() {
                    return; // shut down
                }
                let volumes: Vec<Volume> = m.store.read().volumes.values().cloned().collect();
                let now = Instant::now();
                due.retain(|id, _| volumes.iter().any(|v| v.id == *id));
                for v in &volumes {
                    let d = *due.entry(v.id).or_insert(now + every);
                    if Instant::now() >= d {
                        due.insert(v.id, Instant::now() + every);
                        m.scrub_one(v, bandwidth);
                    }
                }
            }
        });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the scrub thread; replicas are not compared periodically");
        }
    }

    /// Scrubs `v` if this node runs its engine.
    fn scrub_one(&self, v: &Volume, bandwidth: u64) {
        let me = self.cfg.node_id;
        let engine = match &v.attachment {
            Some(a) if a.node == me => self.engine(v.id),
            Some(_) => None,
            None if v.healthy().next().map(|r| r.node) == Some(me) => {
                match self.engine_for(v).and_then(|e| {
                    e.activate(v, v.epoch)
                        .map_err(|err| super::VolumeError::engine(&v.name, err))
                        .map(|_| e)
                }) {
                    Ok(e) => Some(e),
                    Err(e) => {
                        tracing::info!(volume = %v.name, error = %e, "scrub skipped: replicas not ready");
                        None
                    }
                }
            }
            None => None,
        };
        let Some(engine) = engine else { return };
        tracing::debug!(volume = %v.name, "scrubbing");
        match engine.scrub(false, bandwidth) {
            Ok(r) => {
                engine.metrics.scrubs.fetch_add(1, Ordering::Relaxed);
                engine
                    .metrics
                    .scrub_last_unix
                    .store(now_unix_ms() / 1000, Ordering::Relaxed);
                if r.mismatched.is_empty() {
                    tracing::info!(volume = %v.name, extents = r.extents, replicas = r.replicas, "scrub found the replicas equal");
                } else {
                    tracing::warn!(volume = %v.name, differing = r.mismatched.len(), extents = ?r.mismatched, "scrub found replicas that differ; `cairn volume verify {} --repair` makes them equal", v.name);
                }
            }
            Err(e) => {
                tracing::info!(volume = %v.name, error = %e, "scrub not finished; retried next interval")
            }
        }
    }
}
