//! Sending Raft messages to peers over the `Peer` gRPC service.
//!
//! One task per peer drains a bounded queue and sends in order over one
//! lazily connected channel. The Raft thread never blocks on the network:
//! when a peer's queue is full the message is dropped and counted (Raft
//! retransmits), and a failed send drops what is queued for that peer and
//! is logged at debug level (a down peer is normal; liveness tracking
//! reports it).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use cairn_proto::peer::peer_client::PeerClient;
use cairn_proto::peer::RaftMessage;
use tokio::sync::mpsc;

const QUEUE: usize = 1024;

/// A gRPC client for `addr` (host:port), connecting on first use.
pub fn client(addr: &str) -> Result<PeerClient<tonic::transport::Channel>, String> {
    client_with_timeout(addr, Duration::from_secs(5))
}

/// Like [`client`], with a per-request timeout.
pub fn client_with_timeout(
    addr: &str,
    timeout: Duration,
) -> Result<PeerClient<tonic::transport::Channel>, String> {
    let ep = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| format!("peer address {addr:?}: {e}"))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(timeout)
        .tcp_nodelay(true);
    Ok(PeerClient::new(ep.connect_lazy()))
}

/// Outcome of sending to a peer, reported back to the Raft driver: a failed
/// snapshot must be reported or the leader waits for it forever, and an
/// unreachable peer moves back to probing.
pub enum Delivery {
    Snapshot { to: u64, ok: bool },
    Unreachable { to: u64 },
}

/// A queued message: the encoded bytes and whether it carries a snapshot.
struct Outgoing {
    bytes: Vec<u8>,
    snapshot: bool,
}

type PeerQueue = (String, mpsc::Sender<Outgoing>);

pub struct Transport {
    handle: tokio::runtime::Handle,
    cluster_id: String,
    /// This node's peer address, sent with every message.
    own_address: String,
    /// Peer addresses learned from incoming messages (used before the
    /// cluster state with the peers' records has arrived).
    learned: Mutex<HashMap<u64, String>>,
    /// Per peer: the address its task sends to, and that task's queue.
    peers: Mutex<HashMap<u64, PeerQueue>>,
    /// Where delivery outcomes go (the driver's queue; dropped when full).
    report: Box<dyn Fn(Delivery) + Send + Sync>,
    pub dropped: AtomicU64,
}

impl Transport {
    pub fn new(
        handle: tokio::runtime::Handle,
        cluster_id: String,
        own_address: String,
        report: Box<dyn Fn(Delivery) + Send + Sync>,
    ) -> Transport {
        Transport {
            handle,
            cluster_id,
            own_address,
            learned: Mutex::new(HashMap::new()),
            peers: Mutex::new(HashMap::new()),
            report,
            dropped: AtomicU64::new(0),
        }
    }

    pub fn learn(&self, raft_id: u64, addr: &str) {
        if !addr.is_empty() {
            self.learned
                .lock()
                .expect("learned lock")
                .insert(raft_id, addr.to_string());
        }
    }

    pub fn learned_address(&self, raft_id: u64) -> Option<String> {
        self.learned
            .lock()
            .expect("learned lock")
            .get(&raft_id)
            .cloned()
    }

    /// Queues an encoded Raft message for peer `to` at `addr`.
    pub fn send(self: &std::sync::Arc<Self>, to: u64, addr: &str, bytes: Vec<u8>, snapshot: bool) {
        let mut peers = self.peers.lock().expect("peers lock");
        let stale = peers
            .get(&to)
            .is_none_or(|(a, tx)| a != addr || tx.is_closed());
        if stale {
            let (tx, rx) = mpsc::channel(QUEUE);
            self.handle
                .spawn(peer_task(self.clone(), to, addr.to_string(), rx));
            peers.insert(to, (addr.to_string(), tx));
        }
        let (_, tx) = peers.get(&to).expect("inserted above");
        if tx.try_send(Outgoing { bytes, snapshot }).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            if snapshot {
                (self.report)(Delivery::Snapshot { to, ok: false });
            }
        }
    }
}

async fn peer_task(
    t: std::sync::Arc<Transport>,
    to: u64,
    addr: String,
    mut rx: mpsc::Receiver<Outgoing>,
) {
    let mut c = match client(&addr) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(peer = %addr, error = %e, "cannot reach peer");
            return;
        }
    };
    while let Some(out) = rx.recv().await {
        let m = RaftMessage {
            cluster_id: t.cluster_id.clone(),
            message: out.bytes,
            from_address: t.own_address.clone(),
        };
        let ok = c.raft(m).await;
        if out.snapshot {
            (t.report)(Delivery::Snapshot { to, ok: ok.is_ok() });
        }
        if let Err(e) = ok {
            // The peer is down or unreachable: what is queued is stale by the
            // time it comes back, and Raft resends what matters. Drop it and
            // pause briefly instead of timing out once per queued message.
            let mut dropped = 0;
            while let Ok(stale) = rx.try_recv() {
                dropped += 1;
                if stale.snapshot {
                    (t.report)(Delivery::Snapshot { to, ok: false });
                }
            }
            (t.report)(Delivery::Unreachable { to });
            tracing::debug!(peer = %addr, error = %e, dropped, "raft messages not delivered");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
