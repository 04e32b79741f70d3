//! The daemon's shutdown tree: what is stopped, in which order, and proof
//! that it ended.
//!
//! - [`Stop`] is one cancellation token per layer, children of the
//!   daemon's: the front doors (REST, CSI, Docker) stop first, then the
//!   background loops (heartbeats, liveness, reconciler), each awaited.
//!   `daemon` documents the whole order.
//! - [`Threads`] holds every long-lived OS thread the daemon starts outside
//!   a component that joins its own (the FUSE and NBD servers, the Raft
//!   driver do): replica healers and resyncs, the scrubber, re-adoptions,
//!   data-connection servers. Each is joined at exit once what it waits on
//!   has stopped; one that does not end within the deadline is named in the
//!   log, so "nothing left running" is checked, not assumed.
//! - [`Conns`] holds the open data connections, so the stop can close them
//!   (their threads block in `read`) before joining their threads.

use std::collections::HashMap;
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// The cancellation tokens of the daemon's layers, stopped in order.
#[derive(Clone, Default)]
pub struct Stop {
    /// Cancelled by SIGTERM/SIGINT: the REST, CSI and Docker servers stop
    /// accepting and finish the requests they have.
    pub doors: CancellationToken,
    /// Cancelled once the doors are down: heartbeats, liveness, reconciler.
    pub background: CancellationToken,
}

/// Long-lived threads, joined at exit.
#[derive(Default)]
pub struct Threads {
    running: Mutex<Vec<(String, JoinHandle<()>)>>,
}

impl Threads {
    /// Starts `f` on a named thread that [`Threads::join_all`] waits for.
    pub fn spawn(&self, name: String, f: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
        let h = std::thread::Builder::new().name(name.clone()).spawn(f)?;
        let mut running = self.running.lock().expect("threads lock");
        // Finished threads are joined as new ones start, so the list stays
        // as long as what runs.
        let (done, live): (Vec<_>, Vec<_>) = std::mem::take(&mut *running)
            .into_iter()
            .partition(|(_, h)| h.is_finished());
        *running = live;
        running.push((name, h));
        drop(running);
        for (_, h) in done {
            let _ = h.join();
        }
        Ok(())
    }

    /// Joins every registered thread that ends within `timeout`; returns
    /// the names of those that did not (logged as errors: each is a thread
    /// whose stop condition the shutdown order failed to meet).
    pub fn join_all(&self, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let all = std::mem::take(&mut *self.running.lock().expect("threads lock"));
        let mut stuck = Vec::new();
        let mut joined = 0;
        for (name, h) in all {
            while !h.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if h.is_finished() {
                let _ = h.join();
                joined += 1;
            } else {
                tracing::error!(thread = %name, "thread still running at exit");
                stuck.push(name);
            }
        }
        if stuck.is_empty() {
            tracing::info!(joined, "every thread the daemon started has ended");
        }
        stuck
    }
}

/// Open connections whose serving threads block in `read`: closed at stop.
pub struct Conns {
    next: AtomicU64,
    /// None once closed.
    open: Mutex<Option<HashMap<u64, TcpStream>>>,
}

impl Default for Conns {
    fn default() -> Self {
        Conns {
            next: AtomicU64::new(0),
            open: Mutex::new(Some(HashMap::new())),
        }
    }
}

/// Removes its connection from [`Conns`] when the serving thread ends.
pub struct ConnGuard<'a> {
    conns: &'a Conns,
    id: u64,
}

impl Drop for ConnGuard<'_> {
    fn drop(&mut self) {
        if let Some(open) = self.conns.open.lock().expect("conns lock").as_mut() {
            open.remove(&self.id);
        }
    }
}

impl Conns {
    /// Registers `s` (by a clone of its handle) for [`Conns::close_all`];
    /// None once the stop began (the caller drops the connection).
    pub fn register(&self, s: &TcpStream) -> Option<ConnGuard<'_>> {
        let clone = s.try_clone().ok()?;
        let mut open = self.open.lock().expect("conns lock");
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        open.as_mut()?.insert(id, clone);
        Some(ConnGuard { conns: self, id })
    }

    /// Shuts every open connection down (a blocked read returns) and
    /// refuses new ones.
    pub fn close_all(&self) {
        let open = self.open.lock().expect("conns lock").take();
        for s in open.into_iter().flat_map(|m| m.into_values()) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::sync::Arc;

    #[test]
    fn join_all_joins_finished_threads_and_names_stuck_ones() {
        let t = Threads::default();
        t.spawn("quick".into(), || {}).expect("spawn");
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        t.spawn("waiter".into(), move || {
            let _ = rx.recv();
        })
        .expect("spawn");
        assert_eq!(t.join_all(Duration::from_millis(100)), vec!["waiter"]);
        drop(tx);
        assert!(t.join_all(Duration::from_secs(5)).is_empty());
        assert!(t.running.lock().expect("lock").is_empty());
    }

    #[test]
    fn close_all_wakes_a_blocked_reader_and_refuses_new_connections() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let conns = Arc::new(Conns::default());
        let threads = Threads::default();
        let _client = TcpStream::connect(addr).expect("connect");
        let (mut s, _) = l.accept().expect("accept");
        let c = conns.clone();
        threads
            .spawn("reader".into(), move || {
                let _g = c.register(&s.try_clone().expect("clone"));
                let mut b = [0u8; 1];
                let _ = s.read(&mut b);
            })
            .expect("spawn");
        while conns
            .open
            .lock()
            .expect("lock")
            .as_ref()
            .is_some_and(|m| m.is_empty())
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        conns.close_all();
        assert!(threads.join_all(Duration::from_secs(5)).is_empty());
        assert!(conns.open.lock().expect("lock").is_none());
        let _c2 = TcpStream::connect(addr).expect("connect");
        let (s2, _) = l.accept().expect("accept");
        assert!(conns.register(&s2).is_none());
    }
}
