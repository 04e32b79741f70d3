//! The Raft driver: one thread owns the `RawNode` and handles, in the
//! documented Ready order, messages to peers, snapshots, committed entries,
//! persistence (one db flush per Ready) and advancing. Proposals carry a
//! unique id in the entry context and are answered when applied; pending
//! proposals fail when leadership is lost.

use std::collections::HashMap;
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::time::Instant;

use protobuf::Message as _;
use raft::prelude::{ConfChange, ConfState, Entry, EntryType, Message, Snapshot};
use raft::{RawNode, StateRole, Storage};

use super::raft_storage::SledStorage;
use super::shared::{decode_state, encode_state, raft_err, Shared, StoreError, TICK};
use super::transport::Transport;
use crate::cluster::state::ClusterState;

/// Snapshot and compact the log after this many applied entries.
pub const SNAPSHOT_EVERY: u64 = 1000;

pub type Reply = SyncSender<Result<ClusterState, StoreError>>;

pub enum Msg {
    Delivery(super::transport::Delivery),
    Propose {
        cmd: super::state::Command,
        reply: Reply,
    },
    ConfChange {
        cc: ConfChange,
        reply: Reply,
    },
    Raft(Box<Message>),
    /// Asks the leader for a read index (answered with the index once the
    /// leader confirmed with a quorum that it still leads).
    ReadIndex {
        reply: SyncSender<u64>,
    },
    Stop,
    /// Proposes raw entry bytes (tests of entries this version would never
    /// write).
    #[cfg(test)]
    ProposeRaw {
        data: Vec<u8>,
        reply: Reply,
    },
}

/// Read requests older than this are forgotten: raft-rs drops a request
/// it cannot serve (no leader), and the caller has retried or given up.
const READ_FORGET: std::time::Duration = std::time::Duration::from_secs(10);

pub struct Driver {
    pub node: RawNode<SledStorage>,
    pub db: sled::Db,
    pub shared: Arc<Shared>,
    pub transport: Arc<Transport>,
    pub waiters: HashMap<u64, Reply>,
    pub reads: HashMap<u64, (Instant, SyncSender<u64>)>,
    pub next_id: u64,
    pub since_snapshot: u64,
    /// Signalled once the node leads and has applied an entry of its term.
    pub caught_up: Option<SyncSender<Result<(), StoreError>>>,
}

impl Driver {
    pub fn run(&mut self, rx: mpsc::Receiver<Msg>) {
        let mut last_tick = Instant::now();
        loop {
            match rx.recv_timeout(TICK.saturating_sub(last_tick.elapsed())) {
                Ok(Msg::Propose { cmd, reply }) => self.propose(cmd, reply),
                Ok(Msg::ConfChange { cc, reply }) => self.propose_conf_change(cc, reply),
                Ok(Msg::Delivery(d)) => match d {
                    super::transport::Delivery::Snapshot { to, ok } => {
                        let status = if ok {
                            raft::SnapshotStatus::Finish
                        } else {
                            raft::SnapshotStatus::Failure
                        };
                        self.node.report_snapshot(to, status);
                    }
                    super::transport::Delivery::Unreachable { to } => {
                        self.node.report_unreachable(to)
                    }
                },
                Ok(Msg::ReadIndex { reply }) => {
                    let id = self.next_id;
                    self.next_id += 1;
                    self.reads.insert(id, (Instant::now(), reply));
                    self.node.read_index(id.to_le_bytes().to_vec());
                }
                Ok(Msg::Raft(m)) => {
                    if let Err(e) = self.node.step(*m) {
                        tracing::debug!(error = %e, "raft message ignored");
                    }
                }
                #[cfg(test)]
                Ok(Msg::ProposeRaw { data, reply }) => {
                    self.submit(reply, |node, ctx| node.propose(ctx, data))
                }
                Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {}
            }
            if last_tick.elapsed() >= TICK {
                self.node.tick();
                last_tick = Instant::now();
                self.reads.retain(|_, (at, _)| at.elapsed() < READ_FORGET);
            }
            let r = self.on_ready();
            self.publish_status();
            if let Err(e) = r {
                // Persisting or applying failed: nothing more may be
                // acknowledged, and this node takes no further part.
                tracing::error!(error = %e, "the metadata state machine stops on this node");
                self.fail_all(&e.to_string());
                if let Some(tx) = self.caught_up.take() {
                    let _ = tx.send(Err(e));
                }
                let mut st = self.shared.status.lock().expect("status lock");
                st.role = "stopped".into();
                st.leader_id = 0;
                drop(st);
                let _g = self.shared.state.lock().expect("cluster state lock");
                self.shared.changed.notify_all();
                return;
            }
        }
        self.fail_all("the daemon is stopping");
    }

    fn publish_status(&self) {
        let r = &self.node.raft;
        let conf = r.prs().conf();
        let mut st = self.shared.status.lock().expect("status lock");
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
        drop(st);
        // Wake everyone waiting for an applied index or a leader.
        let _g = self.shared.state.lock().expect("cluster state lock");
        self.shared.changed.notify_all();
    }

    fn fail_all(&mut self, why: &str) {
        for (_, w) in self.waiters.drain() {
            let _ = w.send(Err(StoreError::Unavailable(why.into())));
        }
    }

    fn propose(&mut self, cmd: super::state::Command, reply: Reply) {
        let data = super::state::encode_command(&cmd);
        self.submit(reply, |node, ctx| node.propose(ctx, data));
    }

    fn propose_conf_change(&mut self, cc: ConfChange, reply: Reply) {
        self.submit(reply, |node, ctx| node.propose_conf_change(ctx, cc));
    }

    /// Proposes on the leader with a fresh id in the entry context and
    /// registers the proposer to be answered when that entry is applied.
    fn submit(
        &mut self,
        reply: Reply,
        propose: impl FnOnce(&mut RawNode<SledStorage>, Vec<u8>) -> raft::Result<()>,
    ) {
        if self.node.raft.state != StateRole::Leader {
            let _ = reply.send(Err(StoreError::Unavailable(
                "this node is not the metadata leader".into(),
            )));
            return;
        }
        let id = self.next_id;
        self.next_id += 1;
        match propose(&mut self.node, id.to_le_bytes().to_vec()) {
            Ok(()) => {
                self.waiters.insert(id, reply);
            }
            Err(e) => {
                let _ = reply.send(Err(StoreError::Unavailable(e.to_string())));
            }
        }
    }

    /// Hands messages to the transport, addressed by the peers' recorded
    /// peer addresses. A peer without a known address is skipped (it is
    /// registered before it is added to the group).
    fn send(&mut self, msgs: Vec<Message>) {
        if msgs.is_empty() {
            return;
        }
        let addrs: HashMap<u64, String> = {
            let s = self.shared.state.lock().expect("cluster state lock");
            s.nodes
                .values()
                .map(|n| (n.raft_id, n.peer_address.clone()))
                .collect()
        };
        for m in msgs {
            let Some(addr) = addrs
                .get(&m.to)
                .cloned()
                .or_else(|| self.transport.learned_address(m.to))
            else {
                tracing::debug!(to = m.to, "no address for raft peer; message dropped");
                continue;
            };
            match m.write_to_bytes() {
                Ok(bytes) => {
                    let snapshot = m.get_msg_type() == raft::prelude::MessageType::MsgSnapshot;
                    self.transport.send(m.to, &addr, bytes, snapshot)
                }
                Err(e) => tracing::error!(error = %e, "encoding a raft message failed"),
            }
        }
    }

    fn on_ready(&mut self) -> Result<(), StoreError> {
        if !self.node.has_ready() {
            return Ok(());
        }
        let was_leader = self.node.raft.state == StateRole::Leader;
        let mut ready = self.node.ready();
        self.send(ready.take_messages());
        for rs in ready.take_read_states() {
            let id = <[u8; 8]>::try_from(rs.request_ctx.as_slice()).map(u64::from_le_bytes);
            if let Some((_, reply)) = id.ok().and_then(|id| self.reads.remove(&id)) {
                let _ = reply.send(rs.index);
            }
        }
        if !ready.snapshot().is_empty() {
            let snap = ready.snapshot().clone();
            self.node
                .mut_store()
                .apply_snapshot(&snap)
                .map_err(raft_err)?;
            tracing::info!(
                index = snap.get_metadata().index,
                "installed a metadata snapshot from the leader"
            );
            let mut s = decode_state(&snap.data)?;
            s.applied = snap.get_metadata().index;
            *self.shared.state.lock().expect("cluster state lock") = s;
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
                    // The empty entry a new leader commits (everything before
                    // it is applied now), or a conf change the leader dropped
                    // because another one was pending: tell its proposer.
                    self.shared
                        .state
                        .lock()
                        .expect("cluster state lock")
                        .applied = e.index;
                    self.answer(
                        &e.context,
                        Err(StoreError::Unavailable(
                            "membership change dropped: another one was pending".into(),
                        )),
                    );
                    if e.term == self.node.raft.term {
                        if let Some(tx) = self.caught_up.take() {
                            let _ = tx.send(Ok(()));
                        }
                    }
                }
                EntryType::EntryNormal => {
                    let cmd = match super::state::decode_command(&e.data) {
                        Ok(cmd) => cmd,
                        Err(err) => return Err(self.undecodable(&e, &err.to_string())),
                    };
                    let result = {
                        let mut s = self.shared.state.lock().expect("cluster state lock");
                        let r = s.apply(&cmd);
                        s.applied = e.index;
                        r.map(|_| s.clone()).map_err(StoreError::from)
                    };
                    self.answer(&e.context, result);
                }
                EntryType::EntryConfChange => {
                    let result = match ConfChange::parse_from_bytes(&e.data) {
                        Ok(cc) => {
                            let cs = self.node.apply_conf_change(&cc).map_err(raft_err)?;
                            self.node
                                .mut_store()
                                .set_conf_state(&cs)
                                .map_err(raft_err)?;
                            tracing::info!(node = cc.node_id, change = ?cc.get_change_type(), "raft membership changed");
                            // A node just added catches up from a snapshot,
                            // which must already name it as a member.
                            self.since_snapshot = SNAPSHOT_EVERY;
                            let mut s = self.shared.state.lock().expect("cluster state lock");
                            s.applied = e.index;
                            Ok(s.clone())
                        }
                        Err(err) => {
                            return Err(self.undecodable(&e, &format!("membership change: {err}")))
                        }
                    };
                    self.answer(&e.context, result);
                }
                EntryType::EntryConfChangeV2 => {
                    return Err(self.undecodable(
                        &e,
                        "a joint membership change, which this version never makes",
                    ))
                }
            }
            self.since_snapshot += 1;
        }
        Ok(())
    }

    /// A committed entry this node cannot apply: skipping it would leave
    /// this node's state different from every other node's for good, so its
    /// state machine stops here (the driver returns the error and the node
    /// takes no further part in the group's votes or commits) until it runs
    /// a version that understands the entry.
    fn undecodable(&mut self, e: &Entry, why: &str) -> StoreError {
        tracing::error!(index = e.index, error = %why, "cannot apply a committed raft entry: this node's metadata state machine stops; upgrade it to a version that understands the entry");
        let err = StoreError::Storage(format!("raft entry {} cannot be applied: {why}", e.index));
        self.answer(&e.context, Err(err.clone()));
        err
    }

    /// Answers the proposer whose id is in an applied entry's context.
    fn answer(&mut self, context: &[u8], result: Result<ClusterState, StoreError>) {
        let id = <[u8; 8]>::try_from(context).map(u64::from_le_bytes).ok();
        if let Some(w) = id.and_then(|id| self.waiters.remove(&id)) {
            let _ = w.send(result);
        }
    }

    /// Snapshots the applied state and compacts the log up to it.
    fn snapshot(&mut self) -> Result<(), StoreError> {
        let (data, index) = {
            let s = self.shared.state.lock().expect("cluster state lock");
            (encode_state(&s)?, s.applied)
        };
        let term = self.node.store().term(index).map_err(raft_err)?;
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = index;
        snap.mut_metadata().term = term;
        let conf = self.node.raft.prs().conf();
        *snap.mut_metadata().mut_conf_state() = ConfState::from((
            conf.voters().ids().iter().collect::<Vec<_>>(),
            conf.learners().iter().copied().collect::<Vec<_>>(),
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
