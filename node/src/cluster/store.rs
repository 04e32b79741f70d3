//! Persists the cluster state in the node's sled db: every accepted command
//! is applied to a copy, the copy is written and flushed, and only then does
//! it replace the live state and the caller get its answer (persist before
//! acknowledging). Refused commands write nothing.

use std::sync::{Mutex, MutexGuard};

use super::state::{ClusterState, Command, StateError, STATE_VERSION};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Refused(#[from] StateError),
    #[error("metadata store: {0}")]
    Storage(String),
}

const STATE_KEY: &[u8] = b"state";

pub struct ClusterStore {
    tree: sled::Tree,
    db: sled::Db,
    state: Mutex<ClusterState>,
}

impl ClusterStore {
    pub fn open(db: &sled::Db) -> Result<ClusterStore, StoreError> {
        let tree = db
            .open_tree("cluster")
            .map_err(|e| StoreError::Storage(e.to_string()))?;
        let state = match tree
            .get(STATE_KEY)
            .map_err(|e| StoreError::Storage(e.to_string()))?
        {
            None => ClusterState::new(),
            Some(v) => {
                let s: ClusterState = serde_json::from_slice(&v)
                    .map_err(|e| StoreError::Storage(format!("stored cluster state: {e}")))?;
                if s.version != STATE_VERSION {
                    return Err(StoreError::Storage(format!(
                        "cluster state version {} is not supported",
                        s.version
                    )));
                }
                s
            }
        };
        Ok(ClusterStore {
            tree,
            db: db.clone(),
            state: Mutex::new(state),
        })
    }

    /// A consistent view of the state; hold it briefly.
    pub fn read(&self) -> MutexGuard<'_, ClusterState> {
        self.state.lock().expect("cluster state lock")
    }

    /// Applies and persists one command; returns the state after it.
    pub fn propose(&self, cmd: Command) -> Result<ClusterState, StoreError> {
        let mut live = self.state.lock().expect("cluster state lock");
        let mut next = live.clone();
        next.apply(&cmd)?;
        let bytes = serde_json::to_vec(&next).map_err(|e| StoreError::Storage(e.to_string()))?;
        self.tree
            .insert(STATE_KEY, bytes)
            .map_err(|e| StoreError::Storage(e.to_string()))?;
        self.db
            .flush()
            .map_err(|e| StoreError::Storage(e.to_string()))?;
        tracing::debug!(?cmd, applied = next.applied, "applied command");
        *live = next.clone();
        Ok(next)
    }
}
