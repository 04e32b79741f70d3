//! The CSI driver driven through its unix sockets by a tonic client, on a
//! real cluster of daemons: the lifecycle Kubernetes runs (create, publish
//! to a node, stage, publish, write, tear down, move to another node,
//! verify, expand, stats, delete), raw block volumes, idempotency, and the
//! spec's error codes.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cairn_csi::pb::controller_client::ControllerClient;
use cairn_csi::pb::identity_client::IdentityClient;
use cairn_csi::pb::node_client::NodeClient;
use cairn_csi::pb::volume_capability::access_mode::Mode;
use cairn_csi::pb::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use cairn_csi::pb::*;
use cairn_tests::*;
use tonic::transport::Channel;
use tonic::Code;

const MIB: i64 = 1 << 20;

/// Blocking CSI clients for one node's socket.
struct Csi {
    rt: tokio::runtime::Runtime,
    ch: Channel,
}

impl Csi {
    fn connect(socket: &Path) -> Csi {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let path = socket.to_path_buf();
        let ch = rt
            .block_on(async move {
                tonic::transport::Endpoint::from_static("http://csi.invalid")
                    .connect_with_connector(tower::service_fn(move |_| {
                        let path = path.clone();
                        async move {
                            tokio::net::UnixStream::connect(path)
                                .await
                                .map(hyper_util::rt::TokioIo::new)
                        }
                    }))
                    .await
            })
            .expect("connect to the CSI socket");
        Csi { rt, ch }
    }

    fn id(&self) -> IdentityClient<Channel> {
        IdentityClient::new(self.ch.clone())
    }
    fn ctl(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.ch.clone())
    }
    fn node(&self) -> NodeClient<Channel> {
        NodeClient::new(self.ch.clone())
    }

    // tonic's Status is what every CSI call answers with.
    #[allow(clippy::result_large_err)]
    fn run<T>(
        &self,
        f: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, tonic::Status> {
        self.rt.block_on(f).map(|r| r.into_inner())
    }

    fn ok<T>(
        &self,
        what: &str,
        f: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> T {
        self.run(f)
            .unwrap_or_else(|s| panic!("{what}: {:?} {}", s.code(), s.message()))
    }

    /// Asserts the call fails with `code`; returns the message.
    fn fails<T: std::fmt::Debug>(
        &self,
        what: &str,
        code: Code,
        f: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> String {
        match self.run(f) {
            Ok(r) => panic!("{what}: expected {code:?}, got {r:?}"),
            Err(s) => {
                assert_eq!(s.code(), code, "{what}: {}", s.message());
                assert!(!s.message().is_empty(), "{what}: empty message");
                s.message().to_string()
            }
        }
    }
}

fn cap(mode: Mode, block: bool, fs: &str, flags: &[&str]) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode { mode: mode as i32 }),
        access_type: Some(if block {
            AccessType::Block(BlockVolume {})
        } else {
            AccessType::Mount(MountVolume {
                fs_type: fs.into(),
                mount_flags: flags.iter().map(|s| s.to_string()).collect(),
                volume_mount_group: String::new(),
            })
        }),
    }
}

fn fs_cap() -> VolumeCapability {
    cap(Mode::SingleNodeWriter, false, "xfs", &[])
}

fn ext4_cap() -> VolumeCapability {
    cap(Mode::SingleNodeWriter, false, "ext4", &[])
}

fn block_cap() -> VolumeCapability {
    cap(Mode::SingleNodeWriter, true, "", &[])
}

fn params(kv: &[(&str, &str)]) -> HashMap<String, String> {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn create_req(
    name: &str,
    bytes: i64,
    c: VolumeCapability,
    p: &[(&str, &str)],
) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![c],
        parameters: params(p),
        ..Default::default()
    }
}

fn node_topology(name: &str) -> Topology {
    Topology {
        segments: HashMap::from([(cairn_csi::TOPOLOGY_NODE.to_string(), name.to_string())]),
    }
}

fn stage_req(id: &str, staging: &Path, c: VolumeCapability) -> NodeStageVolumeRequest {
    NodeStageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.to_string_lossy().into(),
        volume_capability: Some(c),
        ..Default::default()
    }
}

fn publish_req(
    id: &str,
    staging: &Path,
    target: &Path,
    c: VolumeCapability,
    readonly: bool,
) -> NodePublishVolumeRequest {
    NodePublishVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.to_string_lossy().into(),
        target_path: target.to_string_lossy().into(),
        volume_capability: Some(c),
        readonly,
        ..Default::default()
    }
}

fn cpublish(id: &str, node: &str, c: VolumeCapability) -> ControllerPublishVolumeRequest {
    ControllerPublishVolumeRequest {
        volume_id: id.into(),
        node_id: node.into(),
        volume_capability: Some(c),
        ..Default::default()
    }
}

fn cunpublish(id: &str, node: &str) -> ControllerUnpublishVolumeRequest {
    ControllerUnpublishVolumeRequest {
        volume_id: id.into(),
        node_id: node.into(),
        ..Default::default()
    }
}

fn sha(path: &Path) -> String {
    sh_ok(&format!("sha256sum {} | cut -d' ' -f1", path.display()))
        .trim()
        .to_string()
}

fn mount_options(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let p = path.to_string_lossy();
    text.lines()
        .find(|l| l.split(' ').nth(4) == Some(&*p))
        .map(|l| l.split(' ').nth(5).unwrap_or("").to_string())
}

/// Stage + publish on one node, then unpublish + unstage, all twice to
/// check idempotency; `body` runs while published at `target`.
struct Paths {
    staging: PathBuf,
    target: PathBuf,
}

fn paths(n: &TestNode, tag: &str) -> Paths {
    let staging = n.dir.join(format!("kubelet/{tag}/globalmount"));
    let target = n.dir.join(format!("kubelet/pods/{tag}/mount"));
    std::fs::create_dir_all(&staging).expect("staging dir");
    std::fs::create_dir_all(target.parent().expect("parent")).expect("pod dir");
    Paths { staging, target }
}

fn teardown_on(c: &Csi, id: &str, node: &str, p: &Paths) {
    for _ in 0..2 {
        c.ok(
            "NodeUnpublishVolume",
            c.node().node_unpublish_volume(NodeUnpublishVolumeRequest {
                volume_id: id.into(),
                target_path: p.target.to_string_lossy().into(),
            }),
        );
    }
    assert!(!p.target.exists(), "target path left behind");
    for _ in 0..2 {
        c.ok(
            "NodeUnstageVolume",
            c.node().node_unstage_volume(NodeUnstageVolumeRequest {
                volume_id: id.into(),
                staging_target_path: p.staging.to_string_lossy().into(),
            }),
        );
    }
    assert!(mount_options(&p.staging).is_none(), "staging still mounted");
    // Unstaged but still published to the node until the controller says.
    let v = c.ok(
        "ControllerGetVolume after unstage",
        c.ctl().controller_get_volume(ControllerGetVolumeRequest {
            volume_id: id.into(),
        }),
    );
    let on = v.status.expect("status").published_node_ids;
    assert!(on.contains(&node.to_string()), "{on:?}");
    for _ in 0..2 {
        c.ok(
            "ControllerUnpublishVolume",
            c.ctl().controller_unpublish_volume(cunpublish(id, node)),
        );
    }
}

mod access;
mod doors;
mod errors;
mod lifecycle;
mod restart;
mod snapshots;
