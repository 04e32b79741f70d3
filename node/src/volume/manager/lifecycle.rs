//! Creating, growing, re-replicating and deleting volumes (deleting frees
//! every replica's space before it returns).

use std::path::{Path, PathBuf};

use cairn_proto::api::SizeArg;

use super::*;

impl VolumeManager {
    pub fn create(&self, req: &CreateVolume) -> Result<crate::volume::VolumeView, VolumeError> {
        let local = req.locality.then_some(self.cfg.node_id);
        self.create_placed(req, local, None)
    }

    /// Creates a volume with one replica on `local` when it has room and,
    /// with `allowed`, replicas only on those nodes.
    pub fn create_placed(
        &self,
        req: &CreateVolume,
        local: Option<NodeId>,
        allowed: Option<&[NodeId]>,
    ) -> Result<crate::volume::VolumeView, VolumeError> {
        validate_volume_name(&req.name).map_err(VolumeError::InvalidName)?;
        let _g = self.guard(&req.name)?;
        let count = req.replicas.unwrap_or(self.cfg.default_replicas);
        if !(1..=MAX_REPLICAS as u32).contains(&count) {
            return Err(VolumeError::InvalidReplicas(format!(
                "replicas={count}: a volume has 1 to {MAX_REPLICAS} replicas"
            )));
        }
        let size = match (&req.size, &req.source) {
            (Some(s), _) => parse_size(s)?,
            (None, Some(_)) => 0,
            (None, None) => {
                return Err(VolumeError::InvalidSize(
                    "a size is required (only a clone defaults to its source's)".into(),
                ))
            }
        };
        let fs = req.fs;
        // Placement decides on everything committed (linearizable read).
        self.sync_read()?;
        // (A retired volume's name is refused by the state, saying why.)
        if self.find(&req.name).is_ok() {
            return Err(VolumeError::AlreadyExists(req.name.clone()));
        }
        if let Some(source) = &req.source {
            return self.create_clone(req, source, count as usize, local, allowed);
        }
        let nodes = {
            let s = self.store.read();
            crate::cluster::placement::place(
                &s,
                count as usize,
                local,
                &[],
                allowed,
                crate::cluster::placement::PLACEMENT_LABEL,
            )
            .map_err(VolumeError::NotEnoughNodes)?
        };
        let id = VolumeId::random();
        self.propose(
            Command::CreateVolume {
                id,
                name: req.name.clone(),
                size_bytes: size,
                fs,
                replica_node: nodes[0],
                more_replicas: nodes[1..].to_vec(),
                created_unix_ms: now_unix_ms(),
                csi_name: req.csi_name.clone(),
            },
            &req.name,
        )?;
        if nodes.contains(&self.cfg.node_id) {
            // The reconciler would do it too; doing it now makes the
            // replica ready before the first attach.
            if let Err(e) = self.hosts.get_or_create(id, &self.store) {
                tracing::warn!(volume = %req.name, error = %e, "local replica not created yet");
            }
        }
        tracing::info!(volume = %req.name, size, fs = fs.as_str(), replicas = count, "created volume");
        self.inspect(&req.name)
    }

    /// Sets the wanted replica count; the leader's scheduler adds or
    /// removes replicas (new ones are rebuilt online).
    pub fn set_replicas(&self, name: &str, count: u32) -> Result<(), VolumeError> {
        if !(1..=MAX_REPLICAS as u32).contains(&count) {
            return Err(VolumeError::InvalidReplicas(format!(
                "replicas={count}: a volume has 1 to {MAX_REPLICAS} replicas"
            )));
        }
        self.sync_read()?;
        let v = self.find(name)?;
        let up = self
            .store
            .read()
            .nodes
            .values()
            .filter(|n| n.state == NodeState::Up)
            .count();
        if count as usize > up {
            return Err(VolumeError::NotEnoughNodes(format!(
                "{count} replica(s) need {count} distinct nodes that are up, but {up} are"
            )));
        }
        self.propose(Command::SetReplicaCount { id: v.id, count }, name)?;
        tracing::info!(volume = %name, replicas = count, "replica count set");
        Ok(())
    }

    pub fn resize(
        &self,
        name: &str,
        size: &SizeArg,
    ) -> Result<crate::volume::VolumeView, VolumeError> {
        let v = self.find(name)?;
        let _g = self.guard(name)?;
        let size = parse_size(size)?;
        if size < v.size_bytes {
            return Err(VolumeError::Shrink {
                name: name.into(),
                current: v.size_bytes,
                requested: size,
            });
        }
        if size > v.size_bytes {
            self.propose(
                Command::ResizeVolume {
                    id: v.id,
                    size_bytes: size,
                },
                name,
            )?;
            tracing::info!(volume = %name, size, "grew volume");
        }
        // Also when unchanged here: the grow may have been recorded by
        // another node (CSI's controller) while this node's engine serves.
        if let Some(e) = self.engine(v.id) {
            e.set_size(size);
        }
        // Also when the size is unchanged: a retry after a failed filesystem
        // grow completes it (resize2fs and xfs_growfs are idempotent).
        if let Some(rec) = self.local_record(v.id) {
            let dev = PathBuf::from(&rec.device);
            self.frontend
                .refresh_size(v.id, &dev)
                .map_err(VolumeError::Device)?;
            for m in &rec.mounts {
                self.on_device(&v, || mount::grow(v.fs, &dev, Path::new(m)))?;
            }
        }
        self.inspect(name)
    }

    /// Deletes a volume and frees every replica's space: this node's at
    /// once, the others' by asking their nodes, so that when this returns
    /// the space is back everywhere. Returns the names of nodes whose copy
    /// is not freed yet (down, or slow to answer): their reconcilers free
    /// it when they run again. With `force`, an attachment here is torn
    /// down first.
    pub fn delete(&self, name: &str, force: bool) -> Result<Vec<String>, VolumeError> {
        self.remove(name, force, false)
    }

    /// Deletes volume `name` but keeps its snapshots (listed, usable as
    /// clone sources, deletable): without snapshots it is deleted as
    /// [`VolumeManager::delete`] does; with some it is retired (hidden,
    /// never attached again, its name still taken) and goes with its last
    /// snapshot. What CSI's DeleteVolume does.
    pub fn delete_keeping_snapshots(
        &self,
        name: &str,
        force: bool,
    ) -> Result<Vec<String>, VolumeError> {
        self.remove(name, force, true)
    }

    fn remove(&self, name: &str, force: bool, keep: bool) -> Result<Vec<String>, VolumeError> {
        let v = self.find(name)?;
        let _g = self.guard(name)?;
        if let Some(a) = &v.attachment {
            if !force {
                return Err(VolumeError::Attached {
                    name: name.into(),
                    node: self.node_name(a.node),
                });
            }
            if a.node != self.cfg.node_id {
                return Err(VolumeError::AttachedElsewhere {
                    name: name.into(),
                    node: self.node_name(a.node),
                });
            }
        }
        self.refuse_nbd_users(&v)?;
        if v.attachment.is_some() {
            self.teardown(&v, true, true)?;
        }
        // The state deletes a volume it retires that has no snapshot left.
        let cmd = if keep {
            Command::RetireVolume { id: v.id }
        } else {
            Command::DeleteVolume { id: v.id }
        };
        let index = self.propose_at(cmd, name)?;
        if self.store.read().volumes.contains_key(&v.id) {
            tracing::info!(volume = %name, "deleted volume; kept for its snapshots until the last is deleted");
            return Ok(Vec::new());
        }
        Ok(self.free_volume(&v, index))
    }

    /// Stops the engine of `v`, which the state forgot at `index`, and
    /// frees every replica's copy; returns the nodes that did not confirm.
    pub(super) fn free_volume(&self, v: &Volume, index: u64) -> Vec<String> {
        let name = &v.name;
        if let Some(e) = self.engines.write().expect("engines lock").remove(&v.id) {
            e.stop();
        }
        // The volume is gone from the state: every replica node frees its
        // copy now, asked by us (its reconciler would too, later).
        let mut pending = Vec::new();
        if let Err(e) = self.hosts.destroy(v.id) {
            tracing::error!(volume = %name, error = %e, "freeing deleted volume's space failed; retried");
            pending.push(self.node_name(self.cfg.node_id));
        }
        pending.extend(self.free_remote_copies(v, index));
        if pending.is_empty() {
            tracing::info!(volume = %name, "deleted volume; its space is free on every replica node");
        } else {
            tracing::warn!(volume = %name, pending = ?pending, "deleted volume; space not freed yet on some nodes (freed when they answer)");
        }
        pending
    }

    /// Asks each other node that held a replica of the deleted `v` to free
    /// it, all at once; returns the names of those that did not confirm.
    pub(super) fn free_remote_copies(&self, v: &Volume, index: u64) -> Vec<String> {
        self.ask_replica_nodes(v, "free the replica", move |r| async move {
            r.free(index).await.map(|bytes| {
                tracing::debug!(bytes, "replica freed");
            })
        })
    }

    /// Runs `ask` against the replica of `v` on every other node that
    /// holds one, all at once; returns the names of the nodes that did not
    /// confirm (`what` names the request in the log).
    pub(super) fn ask_replica_nodes<F, Fut>(&self, v: &Volume, what: &str, ask: F) -> Vec<String>
    where
        F: Fn(crate::replica::remote::RemoteReplica) -> Fut,
        Fut:
            std::future::Future<Output = Result<(), crate::replica::ReplicaError>> + Send + 'static,
    {
        let nodes: Vec<NodeId> = v
            .replicas
            .iter()
            .map(|r| r.node)
            .filter(|n| *n != self.cfg.node_id)
            .collect();
        let mut asks = Vec::new();
        let mut pending = Vec::new();
        for node in nodes {
            let name = self.node_name(node);
            match self.remote_replica(v, node) {
                Ok(r) => {
                    let _rt = self.ctx.handle.enter();
                    asks.push((name, self.ctx.handle.spawn(ask(r))));
                }
                Err(e) => {
                    tracing::debug!(volume = %v.name, node = %name, error = %e, "cannot ask to {what}");
                    pending.push(name);
                }
            }
        }
        for (name, ask) in asks {
            let why = match self.ctx.handle.block_on(ask) {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => e.to_string(),
                Err(e) => e.to_string(),
            };
            tracing::info!(volume = %v.name, node = %name, error = %why, "the node did not {what} yet");
            pending.push(name);
        }
        pending
    }
}
