//! Sending Raft messages to peers over the `Peer` gRPC service.
//!
//! One task per peer drains a bounded queue and sends in order over one
//! lazily connected channel. The Raft thread never blocks on the network:
//! when a peer's queue is full the message is dropped and counted (Raft
//! retransmits), and a failed send is logged at debug level (a down peer is
//! normal; liveness tracking reports it).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use cairn_proto::peer::peer_client::PeerClient;
use cairn_proto::peer::RaftMessage;
use tokio::sync::mpsc;

const QUEUE: usize = 1024;

type PeerQueue = (String, mpsc::Sender<Vec<u8>>);

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
    pub dropped: AtomicU64,
}

impl Transport {
    pub fn new(
        handle: tokio::runtime::Handle,
        cluster_id: String,
        own_address: String,
    ) -> Transport {
        Transport {
            handle,
            cluster_id,
            own_address,
            learned: Mutex::new(HashMap::new()),
            peers: Mutex::new(HashMap::new()),
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
    pub fn send(&self, to: u64, addr: &str, message: Vec<u8>) {
        let mut peers = self.peers.lock().expect("peers lock");
        let stale = peers
            .get(&to)
            .is_none_or(|(a, tx)| a != addr || tx.is_closed());
        if stale {
            let (tx, rx) = mpsc::channel(QUEUE);
            let (addr_owned, cluster) = (addr.to_string(), self.cluster_id.clone());
            self.handle.spawn(peer_task(
                addr_owned.clone(),
                cluster,
                self.own_address.clone(),
                rx,
            ));
            peers.insert(to, (addr_owned, tx));
        }
        let (_, tx) = peers.get(&to).expect("inserted above");
        if tx.try_send(message).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn peer_task(
    addr: String,
    cluster_id: String,
    from_address: String,
    mut rx: mpsc::Receiver<Vec<u8>>,
) {
    let mut c = match client(&addr) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(peer = %addr, error = %e, "cannot reach peer");
            return;
        }
    };
    while let Some(message) = rx.recv().await {
        let m = RaftMessage {
            cluster_id: cluster_id.clone(),
            message,
            from_address: from_address.clone(),
        };
        if let Err(e) = c.raft(m).await {
            tracing::debug!(peer = %addr, error = %e, "raft message not delivered");
        }
    }
}
