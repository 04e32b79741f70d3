//! The daemon's metrics: per-volume I/O counters and latency histograms
//! (also used for the store's proposal latency) updated with
//! relaxed atomics on the I/O path (no locks, no allocation), and the one
//! place they become Prometheus text: [`NodeSample::render`] for the pool,
//! data connections and volumes (sampled by the volume manager), served by
//! the API's `/metrics`.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds of the latency buckets, in microseconds.
const BUCKETS_US: [u64; 14] = [
    25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000,
];

#[derive(Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS_US.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let us = d.as_micros() as u64;
        if let Some(i) = BUCKETS_US.iter().position(|b| us <= *b) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
    }

    /// Prometheus series `name_bucket`, `_sum`, `_count`; `labels` is
    /// `k="v",...` or empty.
    pub fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cum = 0;
        for (i, b) in BUCKETS_US.iter().enumerate() {
            cum += self.buckets[i].load(Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{}\"}} {cum}",
                *b as f64 / 1e6
            );
        }
        let count = self.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum{{{labels}}} {}",
            self.sum_us.load(Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
    }
}

#[derive(Default)]
pub struct VolumeMetrics {
    reads: AtomicU64,
    writes: AtomicU64,
    flushes: AtomicU64,
    discards: AtomicU64,
    read_bytes: AtomicU64,
    write_bytes: AtomicU64,
    discard_bytes: AtomicU64,
    read_errors: AtomicU64,
    write_errors: AtomicU64,
    flush_errors: AtomicU64,
    discard_errors: AtomicU64,
    read_latency: Histogram,
    write_latency: Histogram,
    flush_latency: Histogram,
    /// Writes that failed because a replica's pool was full.
    pub no_space_errors: AtomicU64,
    /// I/O refused because a newer engine elsewhere owns the volume.
    pub fenced_errors: AtomicU64,
    /// Scrub passes completed over the volume's replicas.
    pub scrubs: AtomicU64,
    /// Extents a scrub or verify found differing between healthy replicas.
    pub scrub_mismatches: AtomicU64,
    /// Differing extents made equal again (`verify --repair`).
    pub scrub_repairs: AtomicU64,
    /// When the last scrub pass ended (Unix seconds; 0: none yet).
    pub scrub_last_unix: AtomicU64,
}

impl VolumeMetrics {
    pub fn record_read(&self, bytes: u64, d: Duration, ok: bool) {
        if ok {
            self.reads.fetch_add(1, Relaxed);
            self.read_bytes.fetch_add(bytes, Relaxed);
            self.read_latency.observe(d);
        } else {
            self.read_errors.fetch_add(1, Relaxed);
        }
    }

    pub fn record_write(&self, bytes: u64, d: Duration, ok: bool) {
        if ok {
            self.writes.fetch_add(1, Relaxed);
            self.write_bytes.fetch_add(bytes, Relaxed);
            self.write_latency.observe(d);
        } else {
            self.write_errors.fetch_add(1, Relaxed);
        }
    }

    pub fn record_flush(&self, d: Duration, ok: bool) {
        if ok {
            self.flushes.fetch_add(1, Relaxed);
            self.flush_latency.observe(d);
        } else {
            self.flush_errors.fetch_add(1, Relaxed);
        }
    }

    pub fn record_discard(&self, bytes: u64, ok: bool) {
        if ok {
            self.discards.fetch_add(1, Relaxed);
            self.discard_bytes.fetch_add(bytes, Relaxed);
        } else {
            self.discard_errors.fetch_add(1, Relaxed);
        }
    }

    /// Appends this volume's series; `volume` is a validated volume name.
    pub fn render(&self, out: &mut String, volume: &str) {
        let l = format!("volume=\"{volume}\"");
        let counters = [
            ("cairn_volume_no_space_errors_total", &self.no_space_errors),
            ("cairn_volume_fenced_errors_total", &self.fenced_errors),
            ("cairn_volume_scrubs_total", &self.scrubs),
            (
                "cairn_volume_scrub_mismatches_total",
                &self.scrub_mismatches,
            ),
            ("cairn_volume_scrub_repairs_total", &self.scrub_repairs),
            (
                "cairn_volume_scrub_last_timestamp_seconds",
                &self.scrub_last_unix,
            ),
            ("cairn_volume_reads_total", &self.reads),
            ("cairn_volume_writes_total", &self.writes),
            ("cairn_volume_flushes_total", &self.flushes),
            ("cairn_volume_discards_total", &self.discards),
            ("cairn_volume_read_bytes_total", &self.read_bytes),
            ("cairn_volume_write_bytes_total", &self.write_bytes),
            ("cairn_volume_discard_bytes_total", &self.discard_bytes),
        ];
        for (name, v) in counters {
            let _ = writeln!(out, "{name}{{{l}}} {}", v.load(Relaxed));
        }
        for (op, v) in [
            ("read", &self.read_errors),
            ("write", &self.write_errors),
            ("flush", &self.flush_errors),
            ("discard", &self.discard_errors),
        ] {
            let _ = writeln!(
                out,
                "cairn_volume_io_errors_total{{{l},op=\"{op}\"}} {}",
                v.load(Relaxed)
            );
        }
        self.read_latency
            .render(out, "cairn_volume_read_latency_seconds", &l);
        self.write_latency
            .render(out, "cairn_volume_write_latency_seconds", &l);
        self.flush_latency
            .render(out, "cairn_volume_flush_latency_seconds", &l);
    }
}

/// The `# HELP`/`# TYPE` header for the per-volume series.
fn render_headers(out: &mut String) {
    for (name, kind, help) in [
        (
            "cairn_volume_reads_total",
            "counter",
            "Completed read requests",
        ),
        (
            "cairn_volume_writes_total",
            "counter",
            "Completed write requests",
        ),
        ("cairn_volume_flushes_total", "counter", "Completed flushes"),
        (
            "cairn_volume_no_space_errors_total",
            "counter",
            "Writes that failed because a replica's pool was full (ENOSPC to the writer)",
        ),
        (
            "cairn_volume_fenced_errors_total",
            "counter",
            "I/O refused because the volume was attached elsewhere since this engine started (EIO to the writer)",
        ),
        (
            "cairn_volume_scrubs_total",
            "counter",
            "Scrub passes completed over the volume's healthy replicas",
        ),
        (
            "cairn_volume_scrub_mismatches_total",
            "counter",
            "Extents found differing between healthy replicas (scrub or verify)",
        ),
        (
            "cairn_volume_scrub_repairs_total",
            "counter",
            "Differing extents made equal again (verify --repair)",
        ),
        (
            "cairn_volume_scrub_last_timestamp_seconds",
            "gauge",
            "When the last scrub pass over the volume ended (Unix time; 0: never)",
        ),
        (
            "cairn_volume_discards_total",
            "counter",
            "Completed discard/zero requests",
        ),
        ("cairn_volume_read_bytes_total", "counter", "Bytes read"),
        ("cairn_volume_write_bytes_total", "counter", "Bytes written"),
        (
            "cairn_volume_discard_bytes_total",
            "counter",
            "Bytes discarded or zeroed",
        ),
        (
            "cairn_volume_io_errors_total",
            "counter",
            "Failed requests by operation",
        ),
        (
            "cairn_volume_rebuild_bytes_total",
            "counter",
            "Bytes copied to replicas being rebuilt by this node's engine",
        ),
        (
            "cairn_volume_rebuild_progress",
            "gauge",
            "Fraction of the volume compared by the running rebuild (0-1)",
        ),
        (
            "cairn_volume_allocated_bytes",
            "gauge",
            "Pool bytes held by this node's replica of the volume",
        ),
        (
            "cairn_volume_snapshots",
            "gauge",
            "Snapshots of the volume in the cluster state",
        ),
        (
            "cairn_volume_snapshot_bytes",
            "gauge",
            "Pool bytes held by the snapshots of this node's replica of the volume",
        ),
        (
            "cairn_volume_cow_extents_total",
            "counter",
            "Extents of this node's replica first written after a snapshot (copy-on-write), since the daemon started",
        ),
        (
            "cairn_volume_read_latency_seconds",
            "histogram",
            "Read latency in the engine",
        ),
        (
            "cairn_volume_write_latency_seconds",
            "histogram",
            "Write latency in the engine",
        ),
        (
            "cairn_volume_flush_latency_seconds",
            "histogram",
            "Flush latency in the engine",
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }
}

/// One reading of the node's pool, data connections and volumes.
pub struct NodeSample {
    pub pool_capacity_bytes: u64,
    pub pool_allocated_bytes: u64,
    pub data_connections: u64,
    pub data_connections_refused: u64,
    /// By name.
    pub volumes: Vec<VolumeSample>,
}

/// A volume this node serves (an engine) or stores (a replica).
pub struct VolumeSample {
    /// A validated volume name (safe in a label).
    pub name: String,
    pub metrics: Option<std::sync::Arc<VolumeMetrics>>,
    pub rebuild_bytes: Option<u64>,
    pub rebuild_progress: Option<f64>,
    pub allocated_bytes: Option<u64>,
    pub snapshots: u64,
    /// Held bytes of the local replica's snapshots, and its copy-on-write
    /// count (with a local replica).
    pub snapshot_bytes: Option<u64>,
    pub cow_extents: Option<u64>,
}

impl NodeSample {
    /// Appends the Prometheus text of everything sampled.
    pub fn render(&self, out: &mut String) {
        for (name, kind, help, value) in [
            (
                "cairn_pool_capacity_bytes",
                "gauge",
                "Usable pool capacity",
                self.pool_capacity_bytes,
            ),
            (
                "cairn_pool_allocated_bytes",
                "gauge",
                "Pool bytes allocated to volumes",
                self.pool_allocated_bytes,
            ),
            (
                "cairn_data_connections",
                "gauge",
                "Replica data connections being served",
                self.data_connections,
            ),
            (
                "cairn_data_connections_refused_total",
                "counter",
                "Replica data connections refused at the limit",
                self.data_connections_refused,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
        render_headers(out);
        for v in &self.volumes {
            let name = &v.name;
            if let Some(m) = &v.metrics {
                m.render(out, name);
            }
            if let Some(b) = v.rebuild_bytes {
                let _ = writeln!(
                    out,
                    "cairn_volume_rebuild_bytes_total{{volume=\"{name}\"}} {b}"
                );
            }
            if let Some(p) = v.rebuild_progress {
                let _ = writeln!(
                    out,
                    "cairn_volume_rebuild_progress{{volume=\"{name}\"}} {p}"
                );
            }
            if let Some(a) = v.allocated_bytes {
                let _ = writeln!(out, "cairn_volume_allocated_bytes{{volume=\"{name}\"}} {a}");
            }
            let _ = writeln!(
                out,
                "cairn_volume_snapshots{{volume=\"{name}\"}} {}",
                v.snapshots
            );
            if let Some(b) = v.snapshot_bytes {
                let _ = writeln!(out, "cairn_volume_snapshot_bytes{{volume=\"{name}\"}} {b}");
            }
            if let Some(c) = v.cow_extents {
                let _ = writeln!(
                    out,
                    "cairn_volume_cow_extents_total{{volume=\"{name}\"}} {c}"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let m = VolumeMetrics::default();
        m.record_write(4096, Duration::from_micros(30), true);
        m.record_write(4096, Duration::from_millis(3), true);
        m.record_write(4096, Duration::from_secs(5), true);
        let mut s = String::new();
        m.render(&mut s, "v");
        assert!(
            s.contains("cairn_volume_writes_total{volume=\"v\"} 3"),
            "{s}"
        );
        assert!(
            s.contains("cairn_volume_write_latency_seconds_bucket{volume=\"v\",le=\"0.00005\"} 1"),
            "{s}"
        );
        assert!(
            s.contains("cairn_volume_write_latency_seconds_bucket{volume=\"v\",le=\"0.005\"} 2"),
            "{s}"
        );
        assert!(
            s.contains("cairn_volume_write_latency_seconds_bucket{volume=\"v\",le=\"+Inf\"} 3"),
            "{s}"
        );
    }
}
