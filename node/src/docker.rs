//! The Docker volume plugin's backend: Docker volumes are Cairn volumes,
//! mounted under `DATA_DIR/docker/NAME` on this node. Mounts are
//! reference-counted per container ID, and the references are persisted in
//! the node's db, so a daemon restart (which re-serves the mount) neither
//! forgets nor double-counts them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;

use cairn_plugin::{Backend, VolumeView};
use cairn_proto::api::SizeArg;
use serde_json::json;

use crate::types::FsType;
use crate::volume::{CreateVolume, VolumeError, VolumeManager};

/// `--opt` names Docker users may pass, with what they accept.
fn options_help() -> String {
    format!(
        "size (e.g. 10GiB), replicas (1-{}), fs (ext4|xfs), locality (true|false), from-snapshot (VOLUME@SNAPSHOT), from-volume (VOLUME)",
        VolumeManager::MAX_REPLICAS
    )
}

/// Docker's view of the manager. A volume's reference changes and the
/// mounts they cause run under the manager's claim on that volume, the one
/// guard every front door shares (a concurrent operation gets Busy).
pub struct DockerBackend {
    mgr: Arc<VolumeManager>,
    refs: sled::Tree,
    root: PathBuf,
}

fn msg(e: VolumeError) -> String {
    e.to_string()
}

impl DockerBackend {
    pub fn new(mgr: Arc<VolumeManager>, db: &sled::Db, root: PathBuf) -> Result<Self, String> {
        std::fs::create_dir_all(&root).map_err(|e| format!("{}: {e}", root.display()))?;
        Ok(DockerBackend {
            mgr,
            refs: db.open_tree("docker_refs").map_err(|e| e.to_string())?,
            root,
        })
    }

    fn refs_of(&self, name: &str) -> BTreeSet<String> {
        self.refs
            .get(name)
            .ok()
            .flatten()
            .and_then(|v| serde_json::from_slice(&v).ok())
            .unwrap_or_default()
    }

    fn save_refs(&self, name: &str, refs: &BTreeSet<String>) -> Result<(), String> {
        let r = if refs.is_empty() {
            self.refs.remove(name).map(|_| ())
        } else {
            self.refs
                .insert(name, serde_json::to_vec(refs).expect("serialisable"))
                .map(|_| ())
        };
        r.and_then(|_| self.refs.flush().map(|_| ()))
            .map_err(|e| format!("recording mount references: {e}"))
    }

    fn mountpoint(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    fn view(&self, v: &crate::volume::VolumeView) -> VolumeView {
        let mp = self.mountpoint(&v.name);
        let mounted = v.mounts.contains(&mp);
        VolumeView {
            name: v.name.clone(),
            mountpoint: if mounted {
                mp.to_string_lossy().into_owned()
            } else {
                String::new()
            },
            status: json!({
                "size_bytes": v.size_bytes,
                "fs": v.fs.as_str(),
                "state": v.state.as_str(),
                "attached_node": v.attached_node,
                "replicas": v.replicas.iter().map(|r| json!({"node": r.node, "state": r.condition.as_str()})).collect::<Vec<_>>(),
            }),
        }
    }

    /// Turns `--opt` pairs into a create request, refusing unknown options
    /// and bad values by name.
    fn request(name: &str, opts: &BTreeMap<String, String>) -> Result<CreateVolume, String> {
        let mut req = CreateVolume {
            name: name.to_string(),
            size: None,
            fs: FsType::Ext4,
            replicas: None,
            locality: false,
            csi_name: None,
            source: None,
        };
        let mut fs_given = false;
        for (k, v) in opts {
            match k.as_str() {
                "size" => {
                    // Free text: rounded up to whole 4 KiB blocks.
                    let bytes = crate::volume::parse_size_rounded(&SizeArg::Text(v.clone()))
                        .map_err(|e| {
                            format!(
                                "option size={v:?}: {e}; accepted: a size with units such as 10GiB"
                            )
                        })?;
                    req.size = Some(SizeArg::Bytes(bytes));
                }
                "replicas" => {
                    // The range is the core's rule; it refuses others.
                    let n: u32 = v.parse().map_err(|_| {
                        format!(
                            "option replicas={v:?}: give a number from 1 to {}",
                            VolumeManager::MAX_REPLICAS
                        )
                    })?;
                    req.replicas = Some(n);
                }
                "from-snapshot" => {
                    req.source = Some(
                        crate::volume::CloneSource::parse_snapshot(v)
                            .map_err(|e| format!("option from-snapshot={v:?}: {e}"))?,
                    );
                }
                "from-volume" => {
                    req.source = Some(crate::volume::CloneSource::Volume(v.clone()));
                }
                "fs" => {
                    fs_given = true;
                    req.fs = match v.as_str() {
                        "ext4" => FsType::Ext4,
                        "xfs" => FsType::Xfs,
                        _ => {
                            return Err(format!(
                                "option fs={v:?}: accepted values are ext4 or xfs (Docker needs a filesystem)"
                            ))
                        }
                    };
                }
                "locality" => {
                    req.locality = match v.as_str() {
                        "true" | "1" | "yes" => true,
                        "false" | "0" | "no" => false,
                        _ => {
                            return Err(format!(
                                "option locality={v:?}: accepted values are true or false"
                            ))
                        }
                    }
                }
                other => {
                    return Err(format!(
                        "unknown option {other:?}; accepted options: {}",
                        options_help()
                    ))
                }
            }
        }
        if req.source.is_some() && fs_given {
            return Err("option fs: a clone (from-snapshot, from-volume) has its source's filesystem; leave fs out".into());
        }
        if req.source.is_none() && req.size.is_none() {
            req.size = Some(SizeArg::Text("10GiB".into()));
        }
        Ok(req)
    }
}

impl Backend for DockerBackend {
    fn create(&self, name: &str, opts: &BTreeMap<String, String>) -> Result<(), String> {
        let req = Self::request(name, opts)?;
        self.mgr.create(&req).map(|_| ()).map_err(msg)
    }

    fn remove(&self, name: &str) -> Result<(), String> {
        let _claim = self.mgr.claim(name).map_err(msg)?;
        let refs = self.refs_of(name);
        if !refs.is_empty() {
            return Err(format!(
                "volume {name:?} is in use by {} container(s)",
                refs.len()
            ));
        }
        self.mgr.delete(name, false).map(|_| ()).map_err(msg)
    }

    fn mount(&self, name: &str, id: &str) -> Result<String, String> {
        let _claim = self.mgr.claim(name).map_err(msg)?;
        let v = self.mgr.inspect(name).map_err(msg)?;
        if v.fs == FsType::None {
            return Err(format!(
                "volume {name:?} is a raw block volume (fs=none); Docker volumes need a filesystem"
            ));
        }
        let mp = self.mountpoint(name);
        let mp_s = mp.to_string_lossy().into_owned();
        let mut refs = self.refs_of(name);
        if !v.mounts.contains(&mp) {
            std::fs::create_dir_all(&mp).map_err(|e| format!("{mp_s}: {e}"))?;
            self.mgr.mount(name, &mp_s, false).map_err(msg)?;
            // A mount that was gone (refs left from an earlier life) starts over.
            refs.clear();
        }
        refs.insert(id.to_string());
        self.save_refs(name, &refs)?;
        Ok(mp_s)
    }

    fn unmount(&self, name: &str, id: &str) -> Result<(), String> {
        let _claim = self.mgr.claim(name).map_err(msg)?;
        let mut refs = self.refs_of(name);
        if !refs.remove(id) {
            // Unknown container: nothing of ours to release (idempotent).
            return Ok(());
        }
        if refs.is_empty() {
            let mp = self.mountpoint(name).to_string_lossy().into_owned();
            self.mgr.unmount(name, &mp).map_err(msg)?;
        }
        self.save_refs(name, &refs)
    }

    fn path(&self, name: &str) -> Result<String, String> {
        let v = self.mgr.inspect(name).map_err(msg)?;
        Ok(self.view(&v).mountpoint)
    }

    fn get(&self, name: &str) -> Result<VolumeView, String> {
        self.mgr
            .sync_read()
            .and_then(|_| self.mgr.inspect(name))
            .map(|v| self.view(&v))
            .map_err(msg)
    }

    fn list(&self) -> Result<Vec<VolumeView>, String> {
        self.mgr.sync_read().map_err(msg)?;
        Ok(self.mgr.list().iter().map(|v| self.view(v)).collect())
    }
}

/// Serves the plugin on `socket` until the daemon stops. A stale socket
/// file (nobody listening) is replaced; a live one is an error.
pub fn bind(socket: &std::path::Path) -> Result<std::os::unix::net::UnixListener, String> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    if socket.exists() {
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            return Err(format!(
                "{} is served by another process (another cairn daemon?)",
                socket.display()
            ));
        }
        std::fs::remove_file(socket).map_err(|e| format!("{}: {e}", socket.display()))?;
    }
    let l = std::os::unix::net::UnixListener::bind(socket)
        .map_err(|e| format!("{}: {e}", socket.display()))?;
    l.set_nonblocking(true).map_err(|e| e.to_string())?;
    Ok(l)
}
