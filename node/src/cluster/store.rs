//! The cluster store: the state machine of [`super::state`] replicated with
//! Raft (raft-rs `RawNode`, log and snapshots in sled via
//! [`super::raft_storage`]).
//!
//! One thread drives the `RawNode` in the documented Ready order: send
//! messages, install a snapshot, apply committed entries, persist entries and
//! hard state (one db flush), send persisted messages, advance, apply again.
//! A proposal carries a unique id in the entry context; the proposer's reply
//! is sent when that entry is applied — after it was persisted and committed
//! — so an acknowledged command is durable. Proposals pending when leadership
//! is lost fail with [`StoreError::Unavailable`].
//!
//! Today the group has one voter (this node); peers, transport and
//! membership come with the cluster issue and slot into `send`.
//! Every `SNAPSHOT_EVERY` applied entries the state is snapshotted and the log
//! compacted, so a restart replays at most that many entries.

use std::collections::HashMap;
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use protobuf::Message as _;
use raft::prelude::{ConfState, Entry, EntryType, Message, Snapshot};
use raft::{RawNode, StateRole, Storage};

use super::raft_storage::SledStorage;
use super::state::{ClusterState, Command, StateError, STATE_VERSION};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Refused(#[from] StateError),
    #[error("cluster metadata is unavailable: {0}")]
    Unavailable(String),
    #[error("metadata store: {0}")]
    Storage(String),
}

const TICK: Duration = Duration::from_millis(100);
const SNAPSHOT_EVERY: u64 = 1000;
const PROPOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// This node's id in its Raft group (the only voter for now).
const RAFT_ID: u64 = 1;

type Reply = SyncSender<Result<ClusterState, StoreError>>;

enum Msg {
    Propose { cmd: Command, reply: Reply },
    Stop,
}

/// What the Raft group looks like from this node, refreshed by the driver.
#[derive(Debug, Clone, Default)]
pub struct RaftStatus {
    pub raft_id: u64,
    /// 0 while no leader is known.
    pub leader_id: u64,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    /// `leader`, `follower`, `candidate` or `precandidate`.
    pub role: String,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
}

pub struct ClusterStore {
    state: Arc<Mutex<ClusterState>>,
    status: Arc<Mutex<RaftStatus>>,
    tx: SyncSender<Msg>,
    thread: Mutex<Option<JoinHandle<()>>>,
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

fn raft_err(e: raft::Error) -> StoreError {
    StoreError::Storage(e.to_string())
}

fn encode_state(s: &ClusterState) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(s).map_err(|e| StoreError::Storage(e.to_string()))
}

fn decode_state(data: &[u8]) -> Result<ClusterState, StoreError> {
    let s: ClusterState = serde_json::from_slice(data)
        .map_err(|e| StoreError::Storage(format!("snapshot state: {e}")))?;
    if s.version != STATE_VERSION {
        return Err(StoreError::Storage(format!(
            "cluster state version {} is not supported",
            s.version
        )));
    }
    Ok(s)
}

impl ClusterStore {
    /// Opens (or bootstraps) the Raft group and returns once this node leads
    /// it and has applied everything committed before.
    pub fn open(db: &sled::Db) -> Result<ClusterStore, StoreError> {
        let storage = SledStorage::open(db).map_err(raft_err)?;
        if storage.is_empty() {
            // A new single-voter cluster: an initial snapshot at index 1
            // holding the empty state and the configuration.
            let mut snap = Snapshot::default();
            snap.mut_metadata().index = 1;
            snap.mut_metadata().term = 1;
            snap.mut_metadata().mut_conf_state().voters = vec![RAFT_ID];
            snap.data = encode_state(&ClusterState::new(crate::types::Id128::random()))?.into();
            storage.apply_snapshot(&snap).map_err(raft_err)?;
            db.flush().map_err(|e| StoreError::Storage(e.to_string()))?;
        }
        let snap = storage.latest_snapshot().map_err(raft_err)?;
        let mut state = decode_state(&snap.data)?;
        state.applied = snap.get_metadata().index;
        let config = raft::Config {
            id: RAFT_ID,
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
        let mut node = RawNode::new(&config, storage, &logger).map_err(raft_err)?;
        node.campaign().map_err(raft_err)?;

        let state = Arc::new(Mutex::new(state));
        let status = Arc::new(Mutex::new(RaftStatus::default()));
        let (tx, rx) = mpsc::sync_channel::<Msg>(1024);
        let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<(), StoreError>>(1);
        let mut driver = Driver {
            node,
            db: db.clone(),
            state: state.clone(),
            status: status.clone(),
            waiters: HashMap::new(),
            next_id: 1,
            since_snapshot: 0,
            caught_up: Some(ready_tx),
        };
        let thread = std::thread::Builder::new()
            .name("raft".into())
            .spawn(move || driver.run(rx))
            .map_err(|e| StoreError::Storage(format!("raft thread: {e}")))?;
        match ready_rx.recv_timeout(PROPOSE_TIMEOUT) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(StoreError::Unavailable(
                    "the metadata group did not become ready".into(),
                ))
            }
        }
        Ok(ClusterStore {
            state,
            status,
            tx,
            thread: Mutex::new(Some(thread)),
        })
    }

    pub fn status(&self) -> RaftStatus {
        self.status.lock().expect("status lock").clone()
    }

    /// This node's id in the Raft group.
    pub fn raft_id(&self) -> u64 {
        RAFT_ID
    }

    /// A consistent view of the applied state; hold it briefly.
    pub fn read(&self) -> MutexGuard<'_, ClusterState> {
        self.state.lock().expect("cluster state lock")
    }

    /// Proposes a command and waits until it is applied; returns the state
    /// after it. A command the state machine refuses is refused before it
    /// reaches the log when that can be seen from the current state.
    pub fn propose(&self, cmd: Command) -> Result<ClusterState, StoreError> {
        {
            let mut trial = self.read().clone();
            trial.apply(&cmd)?;
        }
        let (reply, rx) = mpsc::sync_channel(1);
        self.tx
            .send(Msg::Propose { cmd, reply })
            .map_err(|_| StoreError::Unavailable("the metadata group has stopped".into()))?;
        match rx.recv_timeout(PROPOSE_TIMEOUT) {
            Ok(r) => r,
            Err(_) => Err(StoreError::Unavailable(format!(
                "no answer within {PROPOSE_TIMEOUT:?}"
            ))),
        }
    }
}

impl Drop for ClusterStore {
    fn drop(&mut self) {
        let _ = self.tx.send(Msg::Stop);
        if let Some(t) = self.thread.lock().expect("thread lock").take() {
            let _ = t.join();
        }
    }
}

struct Driver {
    node: RawNode<SledStorage>,
    db: sled::Db,
    state: Arc<Mutex<ClusterState>>,
    status: Arc<Mutex<RaftStatus>>,
    waiters: HashMap<u64, Reply>,
    next_id: u64,
    since_snapshot: u64,
    /// Signalled once the node leads and has applied an entry of its term.
    caught_up: Option<SyncSender<Result<(), StoreError>>>,
}

impl Driver {
    fn run(&mut self, rx: mpsc::Receiver<Msg>) {
        let mut last_tick = Instant::now();
        loop {
            match rx.recv_timeout(TICK.saturating_sub(last_tick.elapsed())) {
                Ok(Msg::Propose { cmd, reply }) => self.propose(cmd, reply),
                Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {}
            }
            if last_tick.elapsed() >= TICK {
                self.node.tick();
                last_tick = Instant::now();
            }
            let r = self.on_ready();
            self.publish_status();
            if let Err(e) = r {
                // Persisting failed: nothing more may be acknowledged.
                tracing::error!(error = %e, "raft storage failed; the metadata group stops");
                self.fail_all(&e.to_string());
                if let Some(tx) = self.caught_up.take() {
                    let _ = tx.send(Err(e));
                }
                return;
            }
        }
        self.fail_all("the daemon is stopping");
    }

    fn publish_status(&self) {
        let r = &self.node.raft;
        let conf = r.prs().conf();
        let mut st = self.status.lock().expect("status lock");
        st.raft_id = r.id;
        st.leader_id = r.leader_id;
        st.term = r.term;
        st.commit_index = r.raft_log.committed;
        st.applied_index = r.raft_log.applied;
        st.role = format!("{:?}", r.state).to_lowercase();
        st.voters = conf.voters().ids().iter().collect();
        st.learners = conf.learners().iter().copied().collect();
        st.voters.sort_unstable();
        st.learners.sort_unstable();
    }

    fn fail_all(&mut self, why: &str) {
        for (_, w) in self.waiters.drain() {
            let _ = w.send(Err(StoreError::Unavailable(why.into())));
        }
    }

    fn propose(&mut self, cmd: Command, reply: Reply) {
        if self.node.raft.state != StateRole::Leader {
            let _ = reply.send(Err(StoreError::Unavailable(
                "this node is not the metadata leader".into(),
            )));
            return;
        }
        let data = match serde_json::to_vec(&cmd) {
            Ok(d) => d,
            Err(e) => {
                let _ = reply.send(Err(StoreError::Storage(e.to_string())));
                return;
            }
        };
        let id = self.next_id;
        self.next_id += 1;
        match self.node.propose(id.to_le_bytes().to_vec(), data) {
            Ok(()) => {
                self.waiters.insert(id, reply);
            }
            Err(e) => {
                let _ = reply.send(Err(StoreError::Unavailable(e.to_string())));
            }
        }
    }

    fn send(&mut self, msgs: Vec<Message>) {
        // A single-voter group has no peers; the transport arrives with the
        // cluster issue.
        if !msgs.is_empty() {
            tracing::warn!(
                count = msgs.len(),
                "raft messages without a transport dropped"
            );
        }
    }

    fn on_ready(&mut self) -> Result<(), StoreError> {
        if !self.node.has_ready() {
            return Ok(());
        }
        let was_leader = self.node.raft.state == StateRole::Leader;
        let mut ready = self.node.ready();
        self.send(ready.take_messages());
        if !ready.snapshot().is_empty() {
            let snap = ready.snapshot().clone();
            self.node
                .mut_store()
                .apply_snapshot(&snap)
                .map_err(raft_err)?;
            let mut s = decode_state(&snap.data)?;
            s.applied = snap.get_metadata().index;
            *self.state.lock().expect("cluster state lock") = s;
            self.since_snapshot = 0;
        }
        self.apply(ready.take_committed_entries())?;
        self.node
            .mut_store()
            .append(ready.entries())
            .map_err(raft_err)?;
        if let Some(hs) = ready.hs() {
            self.node.mut_store().set_hard_state(hs).map_err(raft_err)?;
        }
        self.db
            .flush()
            .map_err(|e| StoreError::Storage(e.to_string()))?;
        self.send(ready.take_persisted_messages());
        let mut light = self.node.advance(ready);
        if let Some(commit) = light.commit_index() {
            let mut hs = self.node.store().hard_state().map_err(raft_err)?;
            hs.commit = commit;
            self.node
                .mut_store()
                .set_hard_state(&hs)
                .map_err(raft_err)?;
            self.db
                .flush()
                .map_err(|e| StoreError::Storage(e.to_string()))?;
        }
        self.send(light.take_messages());
        self.apply(light.take_committed_entries())?;
        self.node.advance_apply();
        if was_leader && self.node.raft.state != StateRole::Leader {
            self.fail_all("leadership lost");
        }
        if self.since_snapshot >= SNAPSHOT_EVERY {
            self.snapshot()?;
        }
        Ok(())
    }

    fn apply(&mut self, entries: Vec<Entry>) -> Result<(), StoreError> {
        for e in entries {
            match e.get_entry_type() {
                EntryType::EntryNormal if e.data.is_empty() => {
                    // The empty entry a new leader commits: everything
                    // before it is applied now.
                    self.state.lock().expect("cluster state lock").applied = e.index;
                    if e.term == self.node.raft.term {
                        if let Some(tx) = self.caught_up.take() {
                            let _ = tx.send(Ok(()));
                        }
                    }
                }
                EntryType::EntryNormal => {
                    let result = match serde_json::from_slice::<Command>(&e.data) {
                        Ok(cmd) => {
                            let mut s = self.state.lock().expect("cluster state lock");
                            let r = s.apply(&cmd);
                            s.applied = e.index;
                            r.map(|_| s.clone()).map_err(StoreError::from)
                        }
                        Err(err) => {
                            // Deterministic on every replica: the entry is skipped.
                            tracing::error!(index = e.index, error = %err, "undecodable command in the raft log skipped");
                            self.state.lock().expect("cluster state lock").applied = e.index;
                            Err(StoreError::Storage(format!("undecodable command: {err}")))
                        }
                    };
                    let id = <[u8; 8]>::try_from(e.context.as_ref())
                        .map(u64::from_le_bytes)
                        .ok();
                    if let Some(w) = id.and_then(|id| self.waiters.remove(&id)) {
                        let _ = w.send(result);
                    }
                }
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                    // Membership changes arrive with the cluster issue; a
                    // single-voter group never proposes one.
                    tracing::error!(
                        index = e.index,
                        "unexpected configuration change in the raft log"
                    );
                }
            }
            self.since_snapshot += 1;
        }
        Ok(())
    }

    /// Snapshots the applied state and compacts the log up to it.
    fn snapshot(&mut self) -> Result<(), StoreError> {
        let (data, index) = {
            let s = self.state.lock().expect("cluster state lock");
            (encode_state(&s)?, s.applied)
        };
        let term = self.node.store().term(index).map_err(raft_err)?;
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = index;
        snap.mut_metadata().term = term;
        *snap.mut_metadata().mut_conf_state() = ConfState::from((
            self.node
                .raft
                .prs()
                .conf()
                .voters()
                .ids()
                .iter()
                .collect::<Vec<_>>(),
            vec![],
        ));
        snap.data = data.into();
        self.node.mut_store().compact(&snap).map_err(raft_err)?;
        self.db
            .flush()
            .map_err(|e| StoreError::Storage(e.to_string()))?;
        tracing::debug!(
            index,
            bytes = snap.write_to_bytes().map(|b| b.len()).unwrap_or(0),
            "raft snapshot taken, log compacted"
        );
        self.since_snapshot = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{FsType, Id128};

    fn create(name: &str) -> Command {
        Command::CreateVolume {
            id: Id128::random(),
            name: name.into(),
            size_bytes: 1 << 20,
            fs: FsType::Ext4,
            created_unix_ms: 0,
        }
    }

    #[test]
    fn commands_survive_restart_and_compaction() {
        let dir = std::env::temp_dir().join(format!("cairn-store-{}", Id128::random()));
        let open = || sled::Config::new().path(&dir).open().expect("db");
        let n = SNAPSHOT_EVERY + 50;
        {
            let db = open();
            let store = ClusterStore::open(&db).expect("bootstrap");
            for i in 0..n {
                let s = store.propose(create(&format!("v{i}"))).expect("accepted");
                assert_eq!(s.volumes.len() as u64, i + 1);
            }
            // Refused commands answer with the state machine's error.
            assert!(matches!(
                store.propose(create("v0")),
                Err(StoreError::Refused(StateError::VolumeExists(_)))
            ));
            let snap = SledStorage::open(&db).unwrap().latest_snapshot().unwrap();
            assert!(
                snap.get_metadata().index >= SNAPSHOT_EVERY,
                "the log was never compacted"
            );
        }
        let db = open();
        let store = ClusterStore::open(&db).expect("reopen");
        let s = store.read().clone();
        assert_eq!(s.volumes.len() as u64, n);
        assert!(s.volume_by_name(&format!("v{}", n - 1)).is_some());
        drop(store);
        drop(db);
        std::fs::remove_dir_all(&dir).ok();
    }
}
