//! What the cluster store and its Raft driver thread share: the applied
//! state and Raft status behind one condition variable, the store's error
//! type, the tick, and the state's snapshot encoding. Both sides import it;
//! neither imports the other's internals for it.

use std::sync::{Condvar, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::state::{ClusterState, StateError, STATE_VERSION};

#[derive(Debug, Clone, thiserror::Error, Serialize, Deserialize)]
pub enum StoreError {
    #[error(transparent)]
    Refused(#[from] StateError),
    #[error("cluster metadata is unavailable: {0}")]
    Unavailable(String),
    #[error("{0}")]
    Rejected(String),
    #[error("metadata store: {0}")]
    Storage(String),
}

pub const TICK: Duration = Duration::from_millis(100);
/// How long a proposal may wait for a leader, a commit and the local apply.
pub const PROPOSE_TIMEOUT: Duration = Duration::from_secs(5);

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

/// State shared by the store and its driver thread. `changed` is notified
/// (under the `state` lock) after entries are applied and status changes.
pub struct Shared {
    pub state: Mutex<ClusterState>,
    pub status: Mutex<RaftStatus>,
    pub changed: Condvar,
}

pub fn raft_err(e: raft::Error) -> StoreError {
    StoreError::Storage(e.to_string())
}

pub fn encode_state(s: &ClusterState) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(s).map_err(|e| StoreError::Storage(e.to_string()))
}

pub fn decode_state(data: &[u8]) -> Result<ClusterState, StoreError> {
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
