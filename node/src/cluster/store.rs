//! The cluster store: the state machine of [`super::state`] replicated with
//! Raft. [`super::driver`] runs the `RawNode`; this is its front: proposing
//! (on the leader directly, from followers by forwarding to the leader over
//! the peer service and then waiting until the local replica has applied the
//! entry), admitting nodes, and reading the applied state.
//!
//! An acknowledged command has been persisted and committed by a quorum and
//! applied. Without a leader (no quorum) proposals fail with
//! [`StoreError::Unavailable`] after a bounded wait instead of hanging.

use std::collections::HashMap;
use std::sync::mpsc::{self, SyncSender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cairn_proto::peer::peer_client::PeerClient;
use cairn_proto::peer::{JoinReply, JoinRequest, ProposeRequest, RemoveNodeRequest};
use raft::prelude::{ConfChange, ConfChangeType, Snapshot};
use raft::RawNode;

use super::driver::{Driver, Msg};
use super::raft_storage::SledStorage;
pub use super::shared::{
    decode_state, encode_state, raft_err, RaftStatus, Shared, StoreError, PROPOSE_TIMEOUT, TICK,
};
use super::state::{ClusterState, Command, NodeRole, StateError};
use super::transport::{self, Transport};
use crate::types::{now_unix_ms, Id128, NodeId};

/// How to open the store.
pub struct StoreOptions {
    pub raft_id: u64,
    /// Bootstrap a new cluster with this id (only with empty storage).
    pub bootstrap: Option<Id128>,
    /// The cluster this node belongs to, when known before the first
    /// snapshot arrives (a joining node).
    pub cluster_id: Option<Id128>,
    /// This node's peer address.
    pub advertise: String,
    pub handle: tokio::runtime::Handle,
}

pub struct ClusterStore {
    shared: Arc<Shared>,
    tx: SyncSender<Msg>,
    thread: Mutex<Option<JoinHandle<()>>>,
    handle: tokio::runtime::Handle,
    raft_id: u64,
    transport: Arc<Transport>,
    /// One admission at a time: Raft takes one membership change at a time.
    join_lock: Mutex<()>,
    /// Peer clients for forwarding proposals, one multiplexed connection
    /// per leader address (a new connection per proposal costs a handshake).
    forward_clients: Mutex<HashMap<String, PeerClient<tonic::transport::Channel>>>,
    /// Leader-side time from proposing a command to applying it.
    pub propose_latency: crate::metrics::Histogram,
}

/// Forwards raft-rs's slog records to tracing.
struct TracingDrain;

impl slog::Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;
    fn log(&self, r: &slog::Record, _: &slog::OwnedKVList) -> Result<(), slog::Never> {
        match r.level() {
            slog::Level::Critical | slog::Level::Error => {
                tracing::error!(target: "raft", "{}", r.msg())
            }
            slog::Level::Warning => tracing::warn!(target: "raft", "{}", r.msg()),
            slog::Level::Info => tracing::debug!(target: "raft", "{}", r.msg()),
            _ => tracing::trace!(target: "raft", "{}", r.msg()),
        }
        Ok(())
    }
}

impl ClusterStore {
    /// Opens the Raft group: bootstraps a new one-voter cluster, restarts
    /// from stored state, or starts empty as a node that was just admitted
    /// (the leader then sends it a snapshot). A sole voter returns once it
    /// leads and has applied everything committed before.
    pub fn open(db: &sled::Db, opts: StoreOptions) -> Result<ClusterStore, StoreError> {
        let storage = SledStorage::open(db).map_err(raft_err)?;
        if storage.is_empty() {
            if let Some(cluster_id) = opts.bootstrap {
                let mut snap = Snapshot::default();
                snap.mut_metadata().index = 1;
                snap.mut_metadata().term = 1;
                snap.mut_metadata().mut_conf_state().voters = vec![opts.raft_id];
                snap.data = encode_state(&ClusterState::new(cluster_id))?.into();
                storage.apply_snapshot(&snap).map_err(raft_err)?;
                db.flush().map_err(|e| StoreError::Storage(e.to_string()))?;
            }
        }
        let snap = storage.latest_snapshot().map_err(raft_err)?;
        let mut state = if snap.data.is_empty() {
            let id = opts.cluster_id.ok_or_else(|| {
                StoreError::Storage("empty metadata store and no cluster to join".into())
            })?;
            ClusterState::new(id)
        } else {
            decode_state(&snap.data)?
        };
        state.applied = snap.get_metadata().index;
        let config = raft::Config {
            id: opts.raft_id,
            election_tick: 10,
            heartbeat_tick: 3,
            applied: snap.get_metadata().index,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            check_quorum: true,
            pre_vote: true,
            ..Default::default()
        };
        config.validate().map_err(raft_err)?;
        let logger = slog::Logger::root(TracingDrain, slog::o!());
        let hard_commit = storage.hard_state().map_err(raft_err)?.commit;
        let mut node = RawNode::new(&config, storage, &logger).map_err(raft_err)?;
        let sole_voter = {
            let ids = node.raft.prs().conf().voters().ids();
            ids.len() == 1 && ids.contains(opts.raft_id)
        };
        if sole_voter {
            node.campaign().map_err(raft_err)?;
        }
        let (tx, rx) = mpsc::sync_channel::<Msg>(4096);
        let report_tx = tx.clone();
        let transport = Arc::new(Transport::new(
            opts.handle.clone(),
            state.cluster_id.to_string(),
            opts.advertise.clone(),
            Box::new(move |d| {
                let _ = report_tx.try_send(Msg::Delivery(d));
            }),
        ));
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            status: Mutex::new(RaftStatus::default()),
            changed: Condvar::new(),
        });
        let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<(), StoreError>>(1);
        let mut driver = Driver {
            node,
            db: db.clone(),
            shared: shared.clone(),
            transport: transport.clone(),
            waiters: HashMap::new(),
            reads: HashMap::new(),
            next_id: 1,
            since_snapshot: 0,
            caught_up: Some(ready_tx),
        };
        let thread = std::thread::Builder::new()
            .name("raft".into())
            .spawn(move || driver.run(rx))
            .map_err(|e| StoreError::Storage(format!("raft thread: {e}")))?;
        let store = ClusterStore {
            shared,
            tx,
            thread: Mutex::new(Some(thread)),
            handle: opts.handle,
            raft_id: opts.raft_id,
            transport,
            join_lock: Mutex::new(()),
            propose_latency: Default::default(),
            forward_clients: Mutex::new(HashMap::new()),
        };
        if !sole_voter {
            // Entries this node already knows committed are replayed from its
            // own log without a quorum; callers see at least that state.
            let commit = hard_commit;
            let deadline = Instant::now() + PROPOSE_TIMEOUT;
            if !store.wait_until(deadline, |s, st| {
                s.applied >= commit || st.role == "stopped"
            }) {
                return Err(StoreError::Unavailable(
                    "replaying the local raft log timed out".into(),
                ));
            }
            if store.status().role == "stopped" {
                return Err(StoreError::Storage(
                    "the local raft log holds an entry this node cannot apply (see the error above)"
                        .into(),
                ));
            }
        }
        if sole_voter {
            match ready_rx.recv_timeout(PROPOSE_TIMEOUT) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    return Err(StoreError::Unavailable(
                        "the metadata group did not become ready".into(),
                    ))
                }
            }
        }
        Ok(store)
    }

    /// Whether the metadata store has never been initialised on this node.
    pub fn is_fresh(db: &sled::Db) -> Result<bool, StoreError> {
        Ok(SledStorage::open(db).map_err(raft_err)?.is_empty())
    }

    pub fn status(&self) -> RaftStatus {
        self.shared.status.lock().expect("status lock").clone()
    }

    /// Raft messages dropped because a peer's queue was full.
    pub fn dropped_messages(&self) -> u64 {
        self.transport
            .dropped
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// This node's id in the Raft group.
    pub fn raft_id(&self) -> u64 {
        self.raft_id
    }

    /// A view of the applied state; hold it briefly.
    pub fn read(&self) -> MutexGuard<'_, ClusterState> {
        self.shared.state.lock().expect("cluster state lock")
    }

    /// Delivers a Raft message from a peer to the driver (dropped when the
    /// driver's queue is full; Raft retransmits).
    pub fn step(&self, m: raft::prelude::Message, from_address: &str) -> bool {
        self.transport.learn(m.from, from_address);
        self.tx.try_send(Msg::Raft(Box::new(m))).is_ok()
    }

    /// Waits until `cond(state)` holds or the deadline passes.
    pub fn wait_until(
        &self,
        deadline: Instant,
        mut cond: impl FnMut(&ClusterState, &RaftStatus) -> bool,
    ) -> bool {
        let mut s = self.read();
        loop {
            let st = self.status();
            if cond(&s, &st) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            s = self
                .shared
                .changed
                .wait_timeout(s, (deadline - now).min(TICK))
                .expect("cluster state lock")
                .0;
        }
    }

    /// Makes this node's applied state at least as new as everything
    /// committed before the call (Raft ReadIndex: the leader confirms with a
    /// quorum that it still leads, then this node waits until it has applied
    /// up to the leader's commit index). Reads that decide something call
    /// this first; without a quorum it fails within [`PROPOSE_TIMEOUT`].
    pub fn sync_read(&self) -> Result<(), StoreError> {
        let deadline = Instant::now() + PROPOSE_TIMEOUT;
        // raft-rs drops a request it cannot serve yet (no leader, or a new
        // leader that has not committed in its term); ask again.
        const RETRY: Duration = Duration::from_millis(300);
        loop {
            let (reply, rx) = mpsc::sync_channel(1);
            self.tx
                .send(Msg::ReadIndex { reply })
                .map_err(|_| StoreError::Unavailable("the metadata group has stopped".into()))?;
            let left = deadline.saturating_duration_since(Instant::now());
            if let Ok(index) = rx.recv_timeout(left.min(RETRY)) {
                if self.wait_until(deadline, |s, _| s.applied >= index) {
                    return Ok(());
                }
                break;
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        Err(StoreError::Unavailable(format!(
            "no metadata leader confirmed a read within {PROPOSE_TIMEOUT:?} (is a quorum of voters reachable?)"
        )))
    }

    /// `None` on the leader; otherwise the leader's peer address to forward
    /// a request to, or an error when no leader is known.
    fn forward_to(&self) -> Result<Option<String>, StoreError> {
        let st = self.status();
        if st.leader_id == self.raft_id {
            return Ok(None);
        }
        match (st.leader_id != 0)
            .then(|| self.leader_address(&st))
            .flatten()
        {
            Some(addr) => Ok(Some(addr)),
            None => Err(StoreError::Unavailable("no metadata leader".into())),
        }
    }

    fn leader_address(&self, st: &RaftStatus) -> Option<String> {
        self.read()
            .nodes
            .values()
            .find(|n| n.raft_id == st.leader_id)
            .map(|n| n.peer_address.clone())
    }

    /// Proposes a command and waits until this node has applied it; returns
    /// the state after it. Followers forward to the leader.
    pub fn propose(&self, cmd: Command) -> Result<ClusterState, StoreError> {
        let deadline = Instant::now() + PROPOSE_TIMEOUT;
        loop {
            let st = self.status();
            if st.leader_id == self.raft_id {
                return self.propose_local(cmd, deadline);
            }
            if st.leader_id != 0 {
                if let Some(addr) = self.leader_address(&st) {
                    match self.forward(&addr, &cmd, deadline) {
                        Ok(index) => {
                            if self.wait_until(deadline, |s, _| s.applied >= index) {
                                return Ok(self.read().clone());
                            }
                            return Err(StoreError::Unavailable(
                                "committed on the leader but not yet applied here".into(),
                            ));
                        }
                        Err(
                            e @ (StoreError::Refused(_)
                            | StoreError::Rejected(_)
                            | StoreError::Storage(_)),
                        ) => return Err(e),
                        Err(StoreError::Unavailable(why)) => {
                            tracing::debug!(%why, "forwarding to the leader failed; retrying")
                        }
                    }
                }
            }
            let seen = st.leader_id;
            if !self.wait_until(deadline, |_, now| {
                now.leader_id != 0 && now.leader_id != seen
            }) {
                return Err(StoreError::Unavailable(format!(
                    "no metadata leader within {PROPOSE_TIMEOUT:?} (is a quorum of voters reachable?)"
                )));
            }
        }
    }

    /// The leader's path: validate against the applied state, propose, wait.
    pub fn propose_local(
        &self,
        cmd: Command,
        deadline: Instant,
    ) -> Result<ClusterState, StoreError> {
        {
            let mut trial = self.read().clone();
            trial.apply(&cmd)?;
        }
        let (reply, rx) = mpsc::sync_channel(1);
        self.tx
            .send(Msg::Propose { cmd, reply })
            .map_err(|_| StoreError::Unavailable("the metadata group has stopped".into()))?;
        let started = Instant::now();
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(r) => {
                if r.is_ok() {
                    self.propose_latency.observe(started.elapsed());
                }
                r
            }
            Err(_) => Err(StoreError::Unavailable(format!(
                "not committed within {PROPOSE_TIMEOUT:?} (is a quorum of voters reachable?)"
            ))),
        }
    }

    fn forward(&self, addr: &str, cmd: &Command, deadline: Instant) -> Result<u64, StoreError> {
        let command = super::state::encode_command(cmd);
        let cluster_id = self.read().cluster_id.to_string();
        let timeout = deadline.saturating_duration_since(Instant::now());
        let deadline_unix_ms = now_unix_ms() + timeout.as_millis() as u64;
        let leader = self.status().leader_id;
        // The client is built inside the runtime: its connection task needs one.
        let r = self.handle.block_on(async move {
            // Gives up on a leader that was deposed (or froze) while we
            // waited, so the caller retries with the new one.
            let deposed = async {
                loop {
                    tokio::time::sleep(TICK).await;
                    let now = self.status().leader_id;
                    if now != 0 && now != leader {
                        return;
                    }
                }
            };
            let mut client = {
                let mut clients = self.forward_clients.lock().expect("clients lock");
                match clients.get(addr) {
                    Some(c) => c.clone(),
                    None => {
                        let c = transport::client(addr).map_err(StoreError::Unavailable)?;
                        clients.insert(addr.to_string(), c.clone());
                        c
                    }
                }
            };
            let call = tokio::time::timeout(
                timeout,
                client.propose(ProposeRequest {
                    cluster_id,
                    command,
                    deadline_unix_ms,
                }),
            );
            let answered = tokio::select! {
                r = call => r,
                _ = deposed => {
                    return Err(StoreError::Unavailable("the leader changed".into()));
                }
            };
            match answered {
                Err(_) => Err(StoreError::Unavailable(
                    "the leader did not answer in time".into(),
                )),
                Ok(Err(status)) => Err(StoreError::Unavailable(status.message().to_string())),
                Ok(Ok(reply)) => Ok(reply.into_inner()),
            }
        });
        let reply = r?;
        if reply.error_code.is_empty() {
            return Ok(reply.applied_index);
        }
        Err(serde_json::from_str::<StoreError>(&reply.error)
            .unwrap_or(StoreError::Unavailable(reply.error)))
    }

    fn conf_change(&self, cc: ConfChange, deadline: Instant) -> Result<ClusterState, StoreError> {
        let (reply, rx) = mpsc::sync_channel(1);
        self.tx
            .send(Msg::ConfChange { cc, reply })
            .map_err(|_| StoreError::Unavailable("the metadata group has stopped".into()))?;
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(r) => r,
            Err(_) => Err(StoreError::Unavailable(
                "membership change not committed in time".into(),
            )),
        }
    }

    /// Admits a node (on the leader; followers forward). Idempotent for a
    /// node that is already a member.
    pub fn join(&self, req: &JoinRequest) -> Result<JoinReply, StoreError> {
        let deadline = Instant::now() + 2 * PROPOSE_TIMEOUT;
        if let Some(addr) = self.forward_to()? {
            let req = req.clone();
            return self.handle.block_on(async move {
                let mut client = transport::client_with_timeout(&addr, 2 * PROPOSE_TIMEOUT)
                    .map_err(StoreError::Unavailable)?;
                client
                    .join(req)
                    .await
                    .map(|r| r.into_inner())
                    .map_err(|s| match s.code() {
                        tonic::Code::InvalidArgument
                        | tonic::Code::AlreadyExists
                        | tonic::Code::FailedPrecondition => {
                            StoreError::Rejected(s.message().to_string())
                        }
                        _ => StoreError::Unavailable(s.message().to_string()),
                    })
            });
        }
        let _one = self.join_lock.lock().expect("join lock");
        let st = self.status();
        let state = self.read().clone();
        if !req.cluster_id.is_empty() && req.cluster_id != state.cluster_id.to_string() {
            return Err(StoreError::Rejected(format!(
                "this is cluster {}, not {}",
                state.cluster_id, req.cluster_id
            )));
        }
        let id: NodeId = req
            .node_id
            .parse()
            .map_err(|e: String| StoreError::Rejected(format!("node id: {e}")))?;
        if req.name.is_empty() || req.peer_address.is_empty() {
            return Err(StoreError::Rejected(
                "a joining node needs a name and a peer address".into(),
            ));
        }
        if let Some(other) = state
            .nodes
            .values()
            .find(|n| n.name == req.name && n.id != id)
        {
            return Err(StoreError::Refused(StateError::NodeNameTaken(
                req.name.clone(),
                other.id,
            )));
        }
        let voters = st.voters.len();
        let (raft_id, role) = match state.nodes.get(&id) {
            Some(n) => (n.raft_id, n.role),
            None => {
                let next = state
                    .nodes
                    .values()
                    .map(|n| n.raft_id)
                    .max()
                    .unwrap_or(0)
                    .max(self.raft_id)
                    + 1;
                let want_voters = if state.nodes.len() + 1 >= 5 { 5 } else { 3 };
                (
                    next,
                    if voters < want_voters {
                        NodeRole::Voter
                    } else {
                        NodeRole::Learner
                    },
                )
            }
        };
        self.propose_local(
            Command::RegisterNode {
                id,
                name: req.name.clone(),
                raft_id,
                api_address: req.api_address.clone(),
                peer_address: req.peer_address.clone(),
                labels: req.labels.clone().into_iter().collect(),
                role,
                at_unix_ms: now_unix_ms(),
            },
            deadline,
        )?;
        let member = st.voters.contains(&raft_id) || st.learners.contains(&raft_id);
        if !member {
            let mut cc = ConfChange {
                node_id: raft_id,
                ..Default::default()
            };
            cc.set_change_type(match role {
                NodeRole::Voter => ConfChangeType::AddNode,
                NodeRole::Learner => ConfChangeType::AddLearnerNode,
            });
            self.conf_change(cc, deadline)?;
        }
        tracing::info!(node = %req.name, raft_id, ?role, "admitted node");
        self.promote_learners(deadline)?;
        Ok(JoinReply {
            raft_id,
            cluster_id: state.cluster_id.to_string(),
            role: format!("{role:?}").to_lowercase(),
        })
    }
}

impl ClusterStore {
    /// Removes a node from the Raft group and the cluster state (on the
    /// leader; followers forward). Refused while the node holds the only
    /// copy of a volume's data, unless `force`.
    pub fn remove_node(&self, name: &str, force: bool) -> Result<(), StoreError> {
        let deadline = Instant::now() + 2 * PROPOSE_TIMEOUT;
        if let Some(addr) = self.forward_to()? {
            let req = RemoveNodeRequest {
                cluster_id: self.read().cluster_id.to_string(),
                name: name.into(),
                force,
            };
            return self.handle.block_on(async move {
                let mut client = transport::client_with_timeout(&addr, 2 * PROPOSE_TIMEOUT)
                    .map_err(StoreError::Unavailable)?;
                client
                    .remove_node(req)
                    .await
                    .map(|_| ())
                    .map_err(|s| match s.code() {
                        tonic::Code::NotFound | tonic::Code::FailedPrecondition => {
                            StoreError::Rejected(s.message().to_string())
                        }
                        _ => StoreError::Unavailable(s.message().to_string()),
                    })
            });
        }
        let _one = self.join_lock.lock().expect("join lock");
        // Decide on everything committed, as a leader that still leads.
        self.sync_read()?;
        let state = self.read().clone();
        let Some(node) = state.nodes.values().find(|n| n.name == name).cloned() else {
            return Err(StoreError::Rejected(format!(
                "no node named {name:?} in the cluster"
            )));
        };
        if node.raft_id == self.raft_id {
            return Err(StoreError::Rejected(format!(
                "{name:?} is the metadata leader; stop it first so another node leads"
            )));
        }
        let only: Vec<&str> = state
            .volumes
            .values()
            .filter(|v| v.has_replica_on(node.id) && v.healthy().all(|r| r.node == node.id))
            .map(|v| v.name.as_str())
            .collect();
        if !only.is_empty() && !force {
            return Err(StoreError::Rejected(format!(
                "{name:?} holds the only copy of {} volume(s) ({}); pass force to remove it anyway",
                only.len(),
                only.iter().take(5).copied().collect::<Vec<_>>().join(", ")
            )));
        }
        let st = self.status();
        if st.voters.contains(&node.raft_id) || st.learners.contains(&node.raft_id) {
            let mut cc = ConfChange {
                node_id: node.raft_id,
                ..Default::default()
            };
            cc.set_change_type(ConfChangeType::RemoveNode);
            self.conf_change(cc, deadline)?;
        }
        self.propose_local(Command::RemoveNode { id: node.id }, deadline)?;
        tracing::info!(node = %name, raft_id = node.raft_id, forced = force, "removed node");
        self.promote_learners(deadline)
    }

    /// Promotes learners while the group has fewer voters than it wants:
    /// three, or five once the cluster has five or more nodes.
    fn promote_learners(&self, deadline: Instant) -> Result<(), StoreError> {
        loop {
            let st = self.status();
            let state = self.read().clone();
            let want = if state.nodes.len() >= 5 { 5 } else { 3 };
            if st.voters.len() >= want {
                return Ok(());
            }
            let Some(n) = state
                .nodes
                .values()
                .find(|n| st.learners.contains(&n.raft_id))
            else {
                return Ok(());
            };
            // The record keeps its last heartbeat; only the role changes.
            let record = Command::RegisterNode {
                id: n.id,
                name: n.name.clone(),
                raft_id: n.raft_id,
                api_address: n.api_address.clone(),
                peer_address: n.peer_address.clone(),
                labels: n.labels.clone(),
                role: NodeRole::Voter,
                at_unix_ms: n.last_heartbeat_unix_ms,
            };
            self.propose_local(record, deadline)?;
            let mut cc = ConfChange {
                node_id: n.raft_id,
                ..Default::default()
            };
            cc.set_change_type(ConfChangeType::AddNode);
            self.conf_change(cc, deadline)?;
            tracing::info!(node = %n.name, raft_id = n.raft_id, "promoted learner to voter");
        }
    }
}

impl ClusterStore {
    /// Stops the Raft driver and joins its thread (the daemon's last step
    /// before the runtime stops). Idempotent; proposals fail afterwards.
    pub fn stop(&self) {
        let _ = self.tx.send(Msg::Stop);
        if let Some(t) = self.thread.lock().expect("thread lock").take() {
            let _ = t.join();
        }
    }
}

impl Drop for ClusterStore {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
pub(crate) mod tests;
