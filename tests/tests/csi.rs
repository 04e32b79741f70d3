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

#[test]
fn filesystem_volume_lifecycle_across_nodes() {
    let nodes = cluster_with("csi-life", &["1GiB", "1GiB", "1GiB"], 131);
    let csi: Vec<Csi> = nodes
        .iter()
        .map(|n| Csi::connect(&n.csi_socket()))
        .collect();
    let c1 = &csi[0];

    // Identity.
    let info = c1.ok(
        "GetPluginInfo",
        c1.id().get_plugin_info(GetPluginInfoRequest {}),
    );
    assert_eq!(info.name, "csi.cairn.dev");
    assert!(!info.vendor_version.is_empty());
    let caps = c1.ok(
        "GetPluginCapabilities",
        c1.id()
            .get_plugin_capabilities(GetPluginCapabilitiesRequest {}),
    );
    assert_eq!(caps.capabilities.len(), 3, "{caps:?}");
    let probe = c1.ok("Probe", c1.id().probe(ProbeRequest {}));
    assert_eq!(probe.ready, Some(true));
    let ni = csi[1].ok(
        "NodeGetInfo",
        csi[1].node().node_get_info(NodeGetInfoRequest {}),
    );
    assert_eq!(ni.node_id, "n2");
    assert_eq!(
        ni.accessible_topology.expect("topology").segments[cairn_csi::TOPOLOGY_NODE],
        "n2"
    );
    assert!(ni.max_volumes_per_node > 0);

    // Create: the size is rounded up to whole MiB; a repeat answers the same,
    // a repeat with other parameters is ALREADY_EXISTS.
    let mut req = create_req("pvc-life", 100 * MIB + 1, fs_cap(), &[("replicas", "2")]);
    let mut exact = create_req("pvc-exact", 100 * MIB + 1, ext4_cap(), &[]);
    let v = c1
        .ok("CreateVolume ext4", c1.ctl().create_volume(exact.clone()))
        .volume
        .expect("v");
    assert_eq!(v.capacity_bytes, 100 * MIB + 4096);
    exact.capacity_range.as_mut().expect("range").limit_bytes = 100 * MIB + 2;
    c1.fails(
        "CreateVolume: no size in range",
        Code::OutOfRange,
        c1.ctl().create_volume(exact),
    );
    req.accessibility_requirements = Some(TopologyRequirement {
        requisite: Vec::new(),
        preferred: vec![node_topology("n3")],
    });
    let created = c1.ok("CreateVolume", c1.ctl().create_volume(req.clone()));
    let vol = created.volume.clone().expect("volume");
    assert_eq!(vol.volume_id, "pvc-life");
    // Cairn sizes are whole 4 KiB blocks, and xfs needs 300 MiB.
    assert_eq!(vol.capacity_bytes, 300 * MIB);
    let again = c1.ok("CreateVolume again", c1.ctl().create_volume(req.clone()));
    assert_eq!(again, created);
    let inspect = nodes[0].inspect("pvc-life");
    let replica_nodes: Vec<&str> = inspect["replicas"]
        .as_array()
        .expect("replicas")
        .iter()
        .map(|r| r["node"].as_str().expect("node"))
        .collect();
    assert_eq!(replica_nodes.len(), 2, "{inspect}");
    assert!(
        replica_nodes.contains(&"n3"),
        "the preferred node holds a replica: {inspect}"
    );
    let mut bigger = req.clone();
    bigger.capacity_range = Some(CapacityRange {
        required_bytes: 500 * MIB,
        limit_bytes: 0,
    });
    c1.fails(
        "CreateVolume, other size",
        Code::AlreadyExists,
        c1.ctl().create_volume(bigger),
    );
    let mut other_fs = req.clone();
    other_fs.volume_capabilities = vec![cap(Mode::SingleNodeWriter, false, "ext4", &[])];
    c1.fails(
        "CreateVolume, other fs",
        Code::AlreadyExists,
        c1.ctl().create_volume(other_fs),
    );

    // Publish to n1 (twice), then n2 is refused while n1 has it.
    for _ in 0..2 {
        let r = c1.ok(
            "ControllerPublishVolume n1",
            c1.ctl()
                .controller_publish_volume(cpublish("pvc-life", "n1", fs_cap())),
        );
        assert!(r.publish_context.is_empty());
    }
    c1.fails(
        "ControllerPublishVolume n2 while on n1",
        Code::FailedPrecondition,
        c1.ctl()
            .controller_publish_volume(cpublish("pvc-life", "n2", fs_cap())),
    );

    // Stage with a mount flag, publish, write.
    let p1 = paths(&nodes[0], "life");
    let flagged = cap(Mode::SingleNodeWriter, false, "xfs", &["noatime"]);
    for _ in 0..2 {
        c1.ok(
            "NodeStageVolume",
            c1.node()
                .node_stage_volume(stage_req("pvc-life", &p1.staging, flagged.clone())),
        );
    }
    let opts = mount_options(&p1.staging).expect("staging is a mount point");
    assert!(opts.contains("noatime"), "mount flags honoured: {opts}");
    for _ in 0..2 {
        c1.ok(
            "NodePublishVolume",
            c1.node().node_publish_volume(publish_req(
                "pvc-life",
                &p1.staging,
                &p1.target,
                fs_cap(),
                false,
            )),
        );
    }
    let data = p1.target.join("data.bin");
    {
        let mut buf = vec![0u8; 8 << 20];
        fill_pattern(&mut buf, 7);
        let mut f = std::fs::File::create(&data).expect("create data");
        f.write_all(&buf).expect("write data");
        f.sync_all().expect("fsync data");
    }
    let want = sha(&data);

    // A read-only publish refuses writes.
    let ro = Paths {
        staging: p1.staging.clone(),
        target: nodes[0].dir.join("kubelet/pods/life-ro/mount"),
    };
    c1.ok(
        "NodePublishVolume readonly",
        c1.node().node_publish_volume(publish_req(
            "pvc-life",
            &ro.staging,
            &ro.target,
            fs_cap(),
            true,
        )),
    );
    assert_eq!(sha(&ro.target.join("data.bin")), want);
    c1.fails(
        "NodePublish at a published target with the other read-only setting",
        Code::AlreadyExists,
        c1.node().node_publish_volume(publish_req(
            "pvc-life",
            &ro.staging,
            &ro.target,
            fs_cap(),
            false,
        )),
    );
    let err = std::fs::File::create(ro.target.join("x")).expect_err("read-only publish");
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    c1.ok(
        "NodeUnpublishVolume readonly",
        c1.node().node_unpublish_volume(NodeUnpublishVolumeRequest {
            volume_id: "pvc-life".into(),
            target_path: ro.target.to_string_lossy().into(),
        }),
    );

    // Stats while published.
    let stats = c1.ok(
        "NodeGetVolumeStats",
        c1.node().node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: "pvc-life".into(),
            volume_path: p1.target.to_string_lossy().into(),
            staging_target_path: String::new(),
        }),
    );
    let bytes = stats
        .usage
        .iter()
        .find(|u| u.unit == 1)
        .expect("bytes usage");
    let inodes = stats
        .usage
        .iter()
        .find(|u| u.unit == 2)
        .expect("inode usage");
    assert!(
        bytes.used >= 8 * MIB && bytes.total > bytes.used,
        "{stats:?}"
    );
    assert!(inodes.total > 0 && inodes.used > 0, "{stats:?}");
    assert_eq!(stats.volume_condition.map(|c| c.abnormal), Some(false));

    // Deleting a published volume is refused.
    c1.fails(
        "DeleteVolume while published",
        Code::FailedPrecondition,
        c1.ctl().delete_volume(DeleteVolumeRequest {
            volume_id: "pvc-life".into(),
            secrets: HashMap::new(),
        }),
    );

    teardown_on(c1, "pvc-life", "n1", &p1);
    let v = nodes[0].inspect("pvc-life");
    assert!(v["attached_node"].is_null(), "{v}");

    // Move to n2 (publishing through n1's controller), verify the data.
    let c2 = &csi[1];
    c1.ok(
        "ControllerPublishVolume n2",
        c1.ctl()
            .controller_publish_volume(cpublish("pvc-life", "n2", fs_cap())),
    );
    let p2 = paths(&nodes[1], "life");
    c2.ok(
        "NodeStageVolume n2",
        c2.node()
            .node_stage_volume(stage_req("pvc-life", &p2.staging, fs_cap())),
    );
    c2.ok(
        "NodePublishVolume n2",
        c2.node().node_publish_volume(publish_req(
            "pvc-life",
            &p2.staging,
            &p2.target,
            fs_cap(),
            false,
        )),
    );
    assert_eq!(
        sha(&p2.target.join("data.bin")),
        want,
        "data after the move"
    );

    // Expand online: controller, then the node (twice each).
    let before = stats_bytes(c2, &p2.target);
    for _ in 0..2 {
        let r = c1.ok(
            "ControllerExpandVolume",
            c1.ctl()
                .controller_expand_volume(ControllerExpandVolumeRequest {
                    volume_id: "pvc-life".into(),
                    capacity_range: Some(CapacityRange {
                        required_bytes: 600 * MIB,
                        limit_bytes: 0,
                    }),
                    ..Default::default()
                }),
        );
        assert_eq!(r.capacity_bytes, 600 * MIB);
        assert!(r.node_expansion_required);
    }
    for _ in 0..2 {
        let r = c2.ok(
            "NodeExpandVolume",
            c2.node().node_expand_volume(NodeExpandVolumeRequest {
                volume_id: "pvc-life".into(),
                volume_path: p2.target.to_string_lossy().into(),
                capacity_range: Some(CapacityRange {
                    required_bytes: 600 * MIB,
                    limit_bytes: 0,
                }),
                ..Default::default()
            }),
        );
        assert_eq!(r.capacity_bytes, 600 * MIB);
    }
    let after = stats_bytes(c2, &p2.target);
    assert!(
        after > before + 150 * MIB,
        "filesystem grew: {before} -> {after}"
    );
    assert_eq!(
        sha(&p2.target.join("data.bin")),
        want,
        "data after the grow"
    );

    let got = c1.ok(
        "ControllerGetVolume",
        c1.ctl().controller_get_volume(ControllerGetVolumeRequest {
            volume_id: "pvc-life".into(),
        }),
    );
    let status = got.status.expect("status");
    assert_eq!(status.published_node_ids, vec!["n2".to_string()]);
    assert_eq!(status.volume_condition.map(|c| c.abnormal), Some(false));
    assert_eq!(got.volume.expect("volume").capacity_bytes, 600 * MIB);

    teardown_on(c2, "pvc-life", "n2", &p2);
    for _ in 0..2 {
        c1.ok(
            "DeleteVolume",
            c1.ctl().delete_volume(DeleteVolumeRequest {
                volume_id: "pvc-life".into(),
                secrets: HashMap::new(),
            }),
        );
    }
    c1.fails(
        "ControllerGetVolume after delete",
        Code::NotFound,
        c1.ctl().controller_get_volume(ControllerGetVolumeRequest {
            volume_id: "pvc-life".into(),
        }),
    );
    c1.ok(
        "DeleteVolume ext4",
        c1.ctl().delete_volume(DeleteVolumeRequest {
            volume_id: "pvc-exact".into(),
            secrets: HashMap::new(),
        }),
    );
    wait_for("replica space freed", Duration::from_secs(30), || {
        nodes.iter().all(|n| n.pool_allocated() == 0)
    });
}

fn stats_bytes(c: &Csi, path: &Path) -> i64 {
    let s = c.ok(
        "NodeGetVolumeStats",
        c.node().node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: "pvc-life".into(),
            volume_path: path.to_string_lossy().into(),
            staging_target_path: String::new(),
        }),
    );
    s.usage.iter().find(|u| u.unit == 1).expect("bytes").total
}

#[test]
fn raw_block_volume_moves_between_nodes() {
    let nodes = cluster_with("csi-block", &["512MiB", "512MiB"], 135);
    let (c1, c2) = (
        Csi::connect(&nodes[0].csi_socket()),
        Csi::connect(&nodes[1].csi_socket()),
    );
    let v = c1
        .ok(
            "CreateVolume block",
            c1.ctl().create_volume(create_req(
                "pvc-raw",
                64 * MIB,
                block_cap(),
                &[("replicas", "2")],
            )),
        )
        .volume
        .expect("volume");
    assert_eq!(v.capacity_bytes, 64 * MIB);
    c1.fails(
        "NodeStage of a block volume as a filesystem",
        Code::FailedPrecondition,
        c1.node()
            .node_stage_volume(stage_req("pvc-raw", &nodes[0].dir.join("x"), fs_cap())),
    );
    let mut pattern = DirectBuf::new(4 << 20);
    fill_pattern(pattern.as_mut_slice(), 99);
    for (i, (c, n, name)) in [(&c1, &nodes[0], "n1"), (&c2, &nodes[1], "n2")]
        .into_iter()
        .enumerate()
    {
        c1.ok(
            "ControllerPublishVolume",
            c1.ctl()
                .controller_publish_volume(cpublish("pvc-raw", name, block_cap())),
        );
        let p = paths(n, "raw");
        std::fs::remove_dir(&p.staging).ok();
        std::fs::create_dir_all(&p.staging).expect("staging");
        c.ok(
            "NodeStageVolume block",
            c.node()
                .node_stage_volume(stage_req("pvc-raw", &p.staging, block_cap())),
        );
        c.fails(
            "NodePublish block read-only in a writer mode",
            Code::FailedPrecondition,
            c.node().node_publish_volume(publish_req(
                "pvc-raw",
                &p.staging,
                &p.target,
                block_cap(),
                true,
            )),
        );
        for _ in 0..2 {
            c.ok(
                "NodePublishVolume block",
                c.node().node_publish_volume(publish_req(
                    "pvc-raw",
                    &p.staging,
                    &p.target,
                    block_cap(),
                    false,
                )),
            );
        }
        let meta = std::fs::metadata(&p.target).expect("published device");
        use std::os::unix::fs::FileTypeExt;
        assert!(meta.file_type().is_block_device(), "{:?}", meta.file_type());
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&p.target)
            .expect("open device");
        if i == 0 {
            f.write_all(pattern.as_slice()).expect("write device");
            f.sync_all().expect("fsync device");
        } else {
            let mut back = DirectBuf::new(4 << 20);
            f.read_exact(back.as_mut_slice()).expect("read device");
            assert!(
                back.as_slice() == pattern.as_slice(),
                "block data differs after the move"
            );
        }
        drop(f);
        teardown_on(c, "pvc-raw", name, &p);
    }
    c1.ok(
        "DeleteVolume",
        c1.ctl().delete_volume(DeleteVolumeRequest {
            volume_id: "pvc-raw".into(),
            secrets: HashMap::new(),
        }),
    );
}

#[test]
fn errors_idempotency_and_paging() {
    let nodes = cluster_with("csi-err", &["512MiB", "512MiB"], 138);
    let c = Csi::connect(&nodes[0].csi_socket());
    let ctl = || c.ctl();
    let node = || c.node();
    use Code::*;

    // CreateVolume: missing fields, unsupported modes, ranges, parameters.
    let good = create_req("pvc-e", 16 * MIB, fs_cap(), &[]);
    let mut r = good.clone();
    r.name.clear();
    c.fails("no name", InvalidArgument, ctl().create_volume(r));
    let mut r = good.clone();
    r.volume_capabilities.clear();
    c.fails("no capabilities", InvalidArgument, ctl().create_volume(r));
    let mut r = good.clone();
    r.volume_capabilities = vec![VolumeCapability {
        access_mode: None,
        access_type: None,
    }];
    c.fails("empty capability", InvalidArgument, ctl().create_volume(r));
    let mut r = good.clone();
    r.volume_capabilities = vec![cap(Mode::MultiNodeMultiWriter, false, "", &[])];
    let m = c.fails("multi-node writer", InvalidArgument, ctl().create_volume(r));
    assert!(m.contains("MULTI_NODE_MULTI_WRITER"), "{m}");
    let mut r = good.clone();
    r.capacity_range = Some(CapacityRange {
        required_bytes: 10 * MIB,
        limit_bytes: 5 * MIB,
    });
    c.fails("required > limit", OutOfRange, ctl().create_volume(r));
    let mut r = good.clone();
    r.capacity_range = Some(CapacityRange {
        required_bytes: 1 << 60,
        limit_bytes: 0,
    });
    c.fails("too big", OutOfRange, ctl().create_volume(r));
    let mut r = good.clone();
    r.parameters = params(&[("colour", "blue")]);
    let m = c.fails("unknown parameter", InvalidArgument, ctl().create_volume(r));
    assert!(m.contains("colour") && m.contains("replicas"), "{m}");
    let mut r = good.clone();
    r.parameters = params(&[("replicas", "3")]);
    c.fails(
        "3 replicas on 2 nodes",
        ResourceExhausted,
        ctl().create_volume(r),
    );
    let mut r = good.clone();
    r.accessibility_requirements = Some(TopologyRequirement {
        requisite: vec![node_topology("elsewhere")],
        preferred: Vec::new(),
    });
    c.fails(
        "unsatisfiable topology",
        ResourceExhausted,
        ctl().create_volume(r),
    );
    assert_eq!(
        names(&nodes[0]),
        Vec::<String>::new(),
        "no failed create left a volume"
    );

    // A requisite topology confines the replicas.
    let mut r = good.clone();
    r.accessibility_requirements = Some(TopologyRequirement {
        requisite: vec![node_topology("n2")],
        preferred: vec![node_topology("n2")],
    });
    let v = c
        .ok("CreateVolume in n2", ctl().create_volume(r))
        .volume
        .expect("volume");
    assert!(
        v.accessible_topology.is_empty(),
        "any node attaches a Cairn volume: {v:?}"
    );
    assert_eq!(
        nodes[0].inspect("pvc-e")["replicas"][0]["node"],
        "n2",
        "replica placed in the requisite topology"
    );

    // Other RPCs: missing fields and unknown volumes or nodes.
    c.fails(
        "DeleteVolume without id",
        InvalidArgument,
        ctl().delete_volume(DeleteVolumeRequest::default()),
    );
    c.ok(
        "DeleteVolume of an unknown volume",
        ctl().delete_volume(DeleteVolumeRequest {
            volume_id: "pvc-never".into(),
            secrets: HashMap::new(),
        }),
    );
    c.fails(
        "publish without node",
        InvalidArgument,
        ctl().controller_publish_volume(cpublish("pvc-e", "", fs_cap())),
    );
    let mut no_cap = cpublish("pvc-e", "n1", fs_cap());
    no_cap.volume_capability = None;
    c.fails(
        "publish without capability",
        InvalidArgument,
        ctl().controller_publish_volume(no_cap),
    );
    c.fails(
        "publish unknown volume",
        NotFound,
        ctl().controller_publish_volume(cpublish("pvc-never", "n1", fs_cap())),
    );
    c.fails(
        "publish to unknown node",
        NotFound,
        ctl().controller_publish_volume(cpublish("pvc-e", "n9", fs_cap())),
    );
    c.fails(
        "publish a filesystem volume as block",
        InvalidArgument,
        ctl().controller_publish_volume(cpublish("pvc-e", "n1", block_cap())),
    );
    c.ok(
        "unpublish of an unknown volume",
        ctl().controller_unpublish_volume(cunpublish("pvc-never", "n1")),
    );

    // ValidateVolumeCapabilities.
    let vreq = |caps: Vec<VolumeCapability>, p: &[(&str, &str)], id: &str| {
        ValidateVolumeCapabilitiesRequest {
            volume_id: id.into(),
            volume_capabilities: caps,
            parameters: params(p),
            ..Default::default()
        }
    };
    let validate = |caps, p, id| {
        let (mut client, r) = (ctl(), vreq(caps, p, id));
        async move { client.validate_volume_capabilities(r).await }
    };
    let ok = c.ok("validate", validate(vec![fs_cap()], &[], "pvc-e"));
    assert!(ok.confirmed.is_some(), "{ok:?}");
    let no = c.ok("validate block", validate(vec![block_cap()], &[], "pvc-e"));
    assert!(no.confirmed.is_none() && !no.message.is_empty(), "{no:?}");
    let no = c.ok(
        "validate multi-node writer",
        validate(
            vec![cap(Mode::MultiNodeSingleWriter, false, "", &[])],
            &[],
            "pvc-e",
        ),
    );
    assert!(no.confirmed.is_none(), "{no:?}");
    let rox = c.ok(
        "validate read-only many",
        validate(
            vec![cap(Mode::MultiNodeReaderOnly, false, "", &[])],
            &[],
            "pvc-e",
        ),
    );
    assert!(rox.confirmed.is_some(), "{rox:?}");
    let no = c.ok(
        "validate replicas",
        validate(vec![fs_cap()], &[("replicas", "2")], "pvc-e"),
    );
    assert!(no.confirmed.is_none(), "{no:?}");
    c.fails(
        "validate no caps",
        InvalidArgument,
        validate(vec![], &[], "pvc-e"),
    );
    let half = VolumeCapability {
        access_mode: None,
        access_type: Some(AccessType::Block(BlockVolume {})),
    };
    c.fails(
        "validate a capability without access mode",
        InvalidArgument,
        validate(vec![half], &[], "pvc-e"),
    );
    c.fails(
        "validate unknown",
        NotFound,
        validate(vec![fs_cap()], &[], "pvc-never"),
    );

    // ListVolumes pages; a foreign token is ABORTED.
    for i in 0..3 {
        c.ok(
            "CreateVolume for paging",
            ctl().create_volume(create_req(&format!("pvc-p{i}"), 32 * MIB, ext4_cap(), &[])),
        );
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = c.ok(
            "ListVolumes",
            ctl().list_volumes(ListVolumesRequest {
                max_entries: 2,
                starting_token: token.clone(),
            }),
        );
        assert!(page.entries.len() <= 2);
        seen.extend(
            page.entries
                .iter()
                .map(|e| e.volume.as_ref().expect("volume").volume_id.clone()),
        );
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    assert_eq!(seen, vec!["pvc-e", "pvc-p0", "pvc-p1", "pvc-p2"]);
    c.fails(
        "ListVolumes bad token",
        Aborted,
        ctl().list_volumes(ListVolumesRequest {
            max_entries: 1,
            starting_token: "garbage".into(),
        }),
    );
    c.fails(
        "ListVolumes negative",
        InvalidArgument,
        ctl().list_volumes(ListVolumesRequest {
            max_entries: -1,
            starting_token: String::new(),
        }),
    );

    // Capacity per topology segment.
    let cap_of = |t: Option<Topology>, p: &[(&str, &str)]| {
        c.ok(
            "GetCapacity",
            ctl().get_capacity(GetCapacityRequest {
                volume_capabilities: vec![fs_cap()],
                parameters: params(p),
                accessible_topology: t,
            }),
        )
        .available_capacity
    };
    let all = cap_of(None, &[]);
    let one = cap_of(Some(node_topology("n1")), &[]);
    let two = cap_of(Some(node_topology("n1")), &[("replicas", "2")]);
    assert!(
        one > 0 && all >= one && one >= two && two > 0,
        "{all} {one} {two}"
    );
    assert_eq!(cap_of(Some(node_topology("n9")), &[]), 0);
    assert_eq!(
        cap_of(None, &[("replicas", "3")]),
        0,
        "3 replicas need 3 nodes"
    );

    // Expand errors.
    c.fails(
        "expand without range",
        InvalidArgument,
        ctl().controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: "pvc-e".into(),
            ..Default::default()
        }),
    );
    c.fails(
        "expand unknown",
        NotFound,
        ctl().controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: "pvc-never".into(),
            capacity_range: Some(CapacityRange {
                required_bytes: MIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        }),
    );

    // Node RPCs: missing or bad fields, unknown volumes, not staged.
    let staging = nodes[0].dir.join("kubelet/e/globalmount");
    std::fs::create_dir_all(&staging).expect("staging");
    c.fails(
        "stage without path",
        InvalidArgument,
        node().node_stage_volume(stage_req("pvc-e", Path::new(""), fs_cap())),
    );
    c.fails(
        "stage relative path",
        InvalidArgument,
        node().node_stage_volume(stage_req("pvc-e", Path::new("rel/dir"), fs_cap())),
    );
    c.fails(
        "stage unknown volume",
        NotFound,
        node().node_stage_volume(stage_req("pvc-never", &staging, fs_cap())),
    );
    c.fails(
        "stage with a forbidden mount flag",
        InvalidArgument,
        node().node_stage_volume(stage_req(
            "pvc-p0",
            &staging,
            cap(Mode::SingleNodeWriter, false, "", &["bind"]),
        )),
    );
    c.fails(
        "publish before stage",
        FailedPrecondition,
        node().node_publish_volume(publish_req(
            "pvc-p0",
            &staging,
            &nodes[0].dir.join("kubelet/pods/e/mount"),
            ext4_cap(),
            false,
        )),
    );
    c.fails(
        "publish over /",
        InvalidArgument,
        node().node_publish_volume(publish_req(
            "pvc-p0",
            &staging,
            Path::new("/"),
            ext4_cap(),
            false,
        )),
    );
    c.fails(
        "stats of a missing path",
        NotFound,
        node().node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: "pvc-p0".into(),
            volume_path: nodes[0].dir.join("nothing").to_string_lossy().into(),
            staging_target_path: String::new(),
        }),
    );
    c.fails(
        "unpublish without target",
        InvalidArgument,
        node().node_unpublish_volume(NodeUnpublishVolumeRequest {
            volume_id: "pvc-p0".into(),
            target_path: String::new(),
        }),
    );

    // ABORTED: a second operation while one is in flight on the volume.
    let sock = nodes[0].csi_socket();
    let st = staging.clone();
    let stager = std::thread::spawn(move || {
        let c = Csi::connect(&sock);
        // Retried like kubelet does when the expand loop holds the volume.
        loop {
            match c.run(
                c.node()
                    .node_stage_volume(stage_req("pvc-p1", &st, ext4_cap())),
            ) {
                Err(s) if s.code() == Code::Aborted => continue,
                r => return r.map(|_| ()).map_err(|s| s.message().to_string()),
            }
        }
    });
    let mut aborted = false;
    while !stager.is_finished() && !aborted {
        if let Err(s) = c.run(
            ctl().controller_expand_volume(ControllerExpandVolumeRequest {
                volume_id: "pvc-p1".into(),
                capacity_range: Some(CapacityRange {
                    required_bytes: 8 * MIB,
                    limit_bytes: 0,
                }),
                ..Default::default()
            }),
        ) {
            assert_eq!(s.code(), Aborted, "{}", s.message());
            aborted = true;
        }
    }
    stager
        .join()
        .expect("stager")
        .expect("NodeStageVolume (slow: mkfs)");
    assert!(aborted, "no call saw the in-flight stage");
    c.ok(
        "NodeUnstageVolume",
        node().node_unstage_volume(NodeUnstageVolumeRequest {
            volume_id: "pvc-p1".into(),
            staging_target_path: staging.to_string_lossy().into(),
        }),
    );

    // Every other RPC without its required fields.
    c.fails(
        "ControllerUnpublish without id",
        InvalidArgument,
        ctl().controller_unpublish_volume(ControllerUnpublishVolumeRequest::default()),
    );
    c.fails(
        "ValidateVolumeCapabilities without id",
        InvalidArgument,
        ctl().validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
            volume_capabilities: vec![fs_cap()],
            ..Default::default()
        }),
    );
    c.fails(
        "ControllerGetVolume without id",
        InvalidArgument,
        ctl().controller_get_volume(ControllerGetVolumeRequest::default()),
    );
    c.fails(
        "ControllerExpand without id",
        InvalidArgument,
        ctl().controller_expand_volume(ControllerExpandVolumeRequest::default()),
    );
    c.fails(
        "NodeStage without capability",
        InvalidArgument,
        node().node_stage_volume(NodeStageVolumeRequest {
            volume_id: "pvc-p0".into(),
            staging_target_path: staging.to_string_lossy().into(),
            ..Default::default()
        }),
    );
    c.fails(
        "NodeUnstage without id",
        InvalidArgument,
        node().node_unstage_volume(NodeUnstageVolumeRequest::default()),
    );
    c.fails(
        "NodePublish without target",
        InvalidArgument,
        node().node_publish_volume(NodePublishVolumeRequest {
            volume_id: "pvc-p0".into(),
            staging_target_path: staging.to_string_lossy().into(),
            volume_capability: Some(ext4_cap()),
            ..Default::default()
        }),
    );
    c.fails(
        "NodeGetVolumeStats without id",
        InvalidArgument,
        node().node_get_volume_stats(NodeGetVolumeStatsRequest::default()),
    );
    c.fails(
        "NodeExpand without path",
        InvalidArgument,
        node().node_expand_volume(NodeExpandVolumeRequest {
            volume_id: "pvc-p0".into(),
            ..Default::default()
        }),
    );

    // Queries answer the same when repeated.
    macro_rules! same_twice {
        ($what:expr, $call:expr) => {{
            let a = c.ok($what, $call);
            let b = c.ok($what, $call);
            assert_eq!(a, b, "{} answered differently", $what);
        }};
    }
    same_twice!(
        "GetPluginInfo",
        c.id().get_plugin_info(GetPluginInfoRequest {})
    );
    same_twice!(
        "GetPluginCapabilities",
        c.id()
            .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
    );
    same_twice!(
        "ControllerGetCapabilities",
        ctl().controller_get_capabilities(ControllerGetCapabilitiesRequest {})
    );
    same_twice!(
        "NodeGetCapabilities",
        node().node_get_capabilities(NodeGetCapabilitiesRequest {})
    );
    same_twice!("NodeGetInfo", node().node_get_info(NodeGetInfoRequest {}));
    same_twice!(
        "ListVolumes",
        ctl().list_volumes(ListVolumesRequest {
            max_entries: 0,
            starting_token: String::new(),
        })
    );
    same_twice!(
        "ControllerGetVolume",
        ctl().controller_get_volume(ControllerGetVolumeRequest {
            volume_id: "pvc-p2".into(),
        })
    );
    same_twice!(
        "ValidateVolumeCapabilities",
        ctl().validate_volume_capabilities(vreq(vec![fs_cap()], &[], "pvc-e"))
    );

    // Garbage on the socket leaves the driver serving.
    {
        let mut s = std::os::unix::net::UnixStream::connect(nodes[0].csi_socket()).expect("socket");
        let _ = s.write_all(
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\xff\xff\xff\xff\xff\xff\xffgarbage",
        );
        let _ = s.write_all(&[0xa5; 4096]);
    }
    let probe = c.ok("Probe after garbage", c.id().probe(ProbeRequest {}));
    assert_eq!(probe.ready, Some(true));
}

#[test]
fn read_only_many_after_a_writer() {
    let nodes = cluster_with("csi-rox", &["512MiB", "512MiB", "512MiB"], 141);
    let csi: Vec<Csi> = nodes
        .iter()
        .map(|n| Csi::connect(&n.csi_socket()))
        .collect();
    let c1 = &csi[0];
    let rox = || cap(Mode::MultiNodeReaderOnly, false, "ext4", &[]);
    let only_readers = create_req("pvc-rox", 64 * MIB, rox(), &[]);
    c1.fails(
        "CreateVolume of a filesystem with only read-only modes",
        Code::InvalidArgument,
        c1.ctl().create_volume(only_readers),
    );
    let mut req = create_req("pvc-rox", 64 * MIB, ext4_cap(), &[("replicas", "2")]);
    req.volume_capabilities.push(rox());
    c1.ok("CreateVolume RWO+ROX", c1.ctl().create_volume(req));

    // A reader before anything was written has no filesystem to read.
    c1.ok(
        "ControllerPublish reader n1",
        c1.ctl()
            .controller_publish_volume(cpublish("pvc-rox", "n1", rox())),
    );
    let early = paths(&nodes[0], "rox-early");
    c1.fails(
        "NodeStage reader of a blank volume",
        Code::FailedPrecondition,
        c1.node()
            .node_stage_volume(stage_req("pvc-rox", &early.staging, rox())),
    );
    c1.ok(
        "ControllerUnpublish reader n1",
        c1.ctl()
            .controller_unpublish_volume(cunpublish("pvc-rox", "n1")),
    );

    // A writer fills it.
    c1.ok(
        "ControllerPublish writer n1",
        c1.ctl()
            .controller_publish_volume(cpublish("pvc-rox", "n1", ext4_cap())),
    );
    let w = paths(&nodes[0], "rox-writer");
    c1.ok(
        "NodeStage writer",
        c1.node()
            .node_stage_volume(stage_req("pvc-rox", &w.staging, ext4_cap())),
    );
    c1.ok(
        "NodePublish writer",
        c1.node().node_publish_volume(publish_req(
            "pvc-rox",
            &w.staging,
            &w.target,
            ext4_cap(),
            false,
        )),
    );
    std::fs::write(w.target.join("shared.txt"), b"read me everywhere").expect("write");
    sh_ok("sync");
    c1.fails(
        "ControllerPublish reader while a writer holds it",
        Code::FailedPrecondition,
        c1.ctl()
            .controller_publish_volume(cpublish("pvc-rox", "n2", rox())),
    );
    teardown_on(c1, "pvc-rox", "n1", &w);

    // Two nodes read at once; writes fail; a writer waits for them.
    let mut held = Vec::new();
    for (i, name) in ["n2", "n3"].into_iter().enumerate() {
        let c = &csi[i + 1];
        c1.ok(
            "ControllerPublish reader",
            c1.ctl()
                .controller_publish_volume(cpublish("pvc-rox", name, rox())),
        );
        let p = paths(&nodes[i + 1], "rox");
        for _ in 0..2 {
            c.ok(
                "NodeStage reader",
                c.node()
                    .node_stage_volume(stage_req("pvc-rox", &p.staging, rox())),
            );
        }
        c.ok(
            "NodePublish reader",
            c.node().node_publish_volume(publish_req(
                "pvc-rox",
                &p.staging,
                &p.target,
                rox(),
                false,
            )),
        );
        held.push((i + 1, name, p));
    }
    for (i, _, p) in &held {
        let text = std::fs::read_to_string(p.target.join("shared.txt")).expect("read");
        assert_eq!(text, "read me everywhere", "reader on n{}", i + 1);
        let err = std::fs::write(p.target.join("x"), b"no").expect_err("read-only");
        assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    }
    let v = nodes[0].inspect("pvc-rox");
    assert_eq!(v["readers"], serde_json::json!(["n2", "n3"]), "{v}");
    let got = c1.ok(
        "ControllerGetVolume",
        c1.ctl().controller_get_volume(ControllerGetVolumeRequest {
            volume_id: "pvc-rox".into(),
        }),
    );
    assert_eq!(
        got.status.expect("status").published_node_ids,
        vec!["n2", "n3"]
    );
    c1.fails(
        "ControllerPublish writer to a node that holds it read-only",
        Code::AlreadyExists,
        c1.ctl()
            .controller_publish_volume(cpublish("pvc-rox", "n2", ext4_cap())),
    );
    c1.fails(
        "ControllerPublish writer while readers hold it",
        Code::FailedPrecondition,
        c1.ctl()
            .controller_publish_volume(cpublish("pvc-rox", "n1", ext4_cap())),
    );
    c1.fails(
        "DeleteVolume while readers hold it",
        Code::FailedPrecondition,
        c1.ctl().delete_volume(DeleteVolumeRequest {
            volume_id: "pvc-rox".into(),
            secrets: HashMap::new(),
        }),
    );
    for (i, name, p) in &held {
        teardown_on(&csi[*i], "pvc-rox", name, p);
    }
    let v = nodes[0].inspect("pvc-rox");
    assert_eq!(v["readers"], serde_json::json!([]), "{v}");

    // Then a writer again, and the data is intact.
    c1.ok(
        "ControllerPublish writer after the readers",
        c1.ctl()
            .controller_publish_volume(cpublish("pvc-rox", "n1", ext4_cap())),
    );
    c1.ok(
        "NodeStage writer again",
        c1.node()
            .node_stage_volume(stage_req("pvc-rox", &w.staging, ext4_cap())),
    );
    c1.ok(
        "NodePublish writer again",
        c1.node().node_publish_volume(publish_req(
            "pvc-rox",
            &w.staging,
            &w.target,
            ext4_cap(),
            false,
        )),
    );
    assert_eq!(
        std::fs::read_to_string(w.target.join("shared.txt")).expect("read"),
        "read me everywhere"
    );
    teardown_on(c1, "pvc-rox", "n1", &w);
    c1.ok(
        "DeleteVolume",
        c1.ctl().delete_volume(DeleteVolumeRequest {
            volume_id: "pvc-rox".into(),
            secrets: HashMap::new(),
        }),
    );
}

/// Access modes that limit who may hold a volume, the per-node volume limit
/// (RESOURCE_EXHAUSTED), a degraded volume reported abnormal, expansion
/// ranges, stats of paths that do not hold the volume, and the required
/// fields the other tests leave out.
#[test]
fn access_limits_conditions_and_ranges() {
    let mut nodes = cluster_args(
        "csi-lim",
        &["512MiB", "512MiB", "512MiB"],
        151,
        &["--csi-max-volumes", "1"],
    );
    let csi: Vec<Csi> = nodes
        .iter()
        .map(|n| Csi::connect(&n.csi_socket()))
        .collect();
    let (c1, c2) = (&csi[0], &csi[1]);
    use Code::*;

    // One volume per node: a second publish to n1 is RESOURCE_EXHAUSTED;
    // a repeat of the first is not a new volume.
    let info = c1.ok(
        "NodeGetInfo",
        c1.node().node_get_info(NodeGetInfoRequest {}),
    );
    assert_eq!(info.max_volumes_per_node, 1);
    for name in ["pvc-a", "pvc-b"] {
        c1.ok(
            "CreateVolume",
            c1.ctl()
                .create_volume(create_req(name, 32 * MIB, block_cap(), &[])),
        );
    }
    for _ in 0..2 {
        c1.ok(
            "ControllerPublish a to n1",
            c1.ctl()
                .controller_publish_volume(cpublish("pvc-a", "n1", block_cap())),
        );
    }
    let m = c1.fails(
        "ControllerPublish b to a full n1",
        ResourceExhausted,
        c1.ctl()
            .controller_publish_volume(cpublish("pvc-b", "n1", block_cap())),
    );
    assert!(m.contains("(1)"), "{m}");
    assert!(nodes[0].inspect("pvc-b")["attachment"].is_null());
    c1.ok(
        "ControllerUnpublish a",
        c1.ctl()
            .controller_unpublish_volume(cunpublish("pvc-a", "n1")),
    );

    // SINGLE_NODE_READER_ONLY: one node at a time.
    let sro = || cap(Mode::SingleNodeReaderOnly, true, "", &[]);
    for _ in 0..2 {
        c1.ok(
            "ControllerPublish b single reader n2",
            c1.ctl()
                .controller_publish_volume(cpublish("pvc-b", "n2", sro())),
        );
    }
    let m = c1.fails(
        "a second node for SINGLE_NODE_READER_ONLY",
        FailedPrecondition,
        c1.ctl()
            .controller_publish_volume(cpublish("pvc-b", "n3", sro())),
    );
    assert!(m.contains("SINGLE_NODE_READER_ONLY"), "{m}");
    c1.ok(
        "ControllerUnpublish b",
        c1.ctl()
            .controller_unpublish_volume(cunpublish("pvc-b", "n2")),
    );

    // SINGLE_NODE_SINGLE_WRITER refuses a second read-write target;
    // SINGLE_NODE_MULTI_WRITER serves two targets of one filesystem.
    let rwop = || cap(Mode::SingleNodeSingleWriter, false, "ext4", &[]);
    let rwx1 = || cap(Mode::SingleNodeMultiWriter, false, "ext4", &[]);
    // On n2, so that n3 going down later leaves it alone.
    let mut one = create_req("pvc-one", 64 * MIB, rwop(), &[]);
    one.accessibility_requirements = Some(TopologyRequirement {
        requisite: vec![node_topology("n2")],
        preferred: Vec::new(),
    });
    c1.ok("CreateVolume rwop", c1.ctl().create_volume(one));
    c1.ok(
        "ControllerPublish rwop to n2",
        c1.ctl()
            .controller_publish_volume(cpublish("pvc-one", "n2", rwop())),
    );
    let p = paths(&nodes[1], "one");
    let second = nodes[1].dir.join("kubelet/pods/one-2/mount");
    c2.ok(
        "NodeStage rwop",
        c2.node()
            .node_stage_volume(stage_req("pvc-one", &p.staging, rwop())),
    );
    c2.ok(
        "NodePublish rwop",
        c2.node()
            .node_publish_volume(publish_req("pvc-one", &p.staging, &p.target, rwop(), false)),
    );
    let m = c2.fails(
        "a second read-write target of SINGLE_NODE_SINGLE_WRITER",
        FailedPrecondition,
        c2.node()
            .node_publish_volume(publish_req("pvc-one", &p.staging, &second, rwop(), false)),
    );
    assert!(m.contains("SINGLE_NODE_SINGLE_WRITER"), "{m}");
    assert!(
        mount_options(&second).is_none(),
        "the refused target got a mount"
    );
    c2.ok(
        "NodePublish the second target as SINGLE_NODE_MULTI_WRITER",
        c2.node()
            .node_publish_volume(publish_req("pvc-one", &p.staging, &second, rwx1(), false)),
    );
    std::fs::write(p.target.join("both.txt"), b"one filesystem").expect("write");
    assert_eq!(
        std::fs::read_to_string(second.join("both.txt")).expect("read"),
        "one filesystem"
    );

    // Stats: the same answer twice; NOT_FOUND for a directory that exists
    // but does not hold the volume.
    let stats = |path: &Path| NodeGetVolumeStatsRequest {
        volume_id: "pvc-one".into(),
        volume_path: path.to_string_lossy().into(),
        staging_target_path: p.staging.to_string_lossy().into(),
    };
    let a = c2.ok("stats", c2.node().node_get_volume_stats(stats(&p.target)));
    let b = c2.ok(
        "stats again",
        c2.node().node_get_volume_stats(stats(&p.target)),
    );
    assert_eq!(a, b);
    let elsewhere = nodes[1].dir.join("kubelet/not-a-mount");
    std::fs::create_dir_all(&elsewhere).expect("dir");
    c2.fails(
        "stats of a directory without the volume",
        NotFound,
        c2.node().node_get_volume_stats(stats(&elsewhere)),
    );

    // Expansion ranges.
    let expand = |required: i64, limit: i64| ControllerExpandVolumeRequest {
        volume_id: "pvc-one".into(),
        capacity_range: Some(CapacityRange {
            required_bytes: required,
            limit_bytes: limit,
        }),
        ..Default::default()
    };
    c1.fails(
        "expand under a limit below the size",
        OutOfRange,
        c1.ctl().controller_expand_volume(expand(0, 16 * MIB)),
    );
    c1.fails(
        "expand with a negative limit",
        InvalidArgument,
        c1.ctl().controller_expand_volume(expand(0, -1)),
    );
    c1.fails(
        "expand beyond the maximum size",
        OutOfRange,
        c1.ctl().controller_expand_volume(expand(1 << 60, 0)),
    );
    c2.fails(
        "NodeExpand beyond the recorded size",
        OutOfRange,
        c2.node().node_expand_volume(NodeExpandVolumeRequest {
            volume_id: "pvc-one".into(),
            volume_path: p.target.to_string_lossy().into(),
            capacity_range: Some(CapacityRange {
                required_bytes: 128 * MIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        }),
    );
    assert_eq!(nodes[0].inspect("pvc-one")["size_bytes"], 64 * MIB);

    // GetCapacity and Probe answer the same twice; a malformed capability
    // is INVALID_ARGUMENT rather than "no capacity".
    let capacity = || GetCapacityRequest {
        volume_capabilities: vec![fs_cap()],
        parameters: HashMap::new(),
        accessible_topology: Some(node_topology("n3")),
    };
    let a = c1.ok("GetCapacity", c1.ctl().get_capacity(capacity()));
    let b = c1.ok("GetCapacity again", c1.ctl().get_capacity(capacity()));
    assert_eq!(a, b);
    let mut bad = capacity();
    bad.volume_capabilities = vec![VolumeCapability {
        access_mode: None,
        access_type: Some(AccessType::Block(BlockVolume {})),
    }];
    c1.fails(
        "GetCapacity with a malformed capability",
        InvalidArgument,
        c1.ctl().get_capacity(bad),
    );
    let a = c1.ok("Probe", c1.id().probe(ProbeRequest {}));
    let b = c1.ok("Probe again", c1.id().probe(ProbeRequest {}));
    assert_eq!(a, b);

    // Required fields the other tests do not cover.
    c1.fails(
        "ControllerPublish without volume id",
        InvalidArgument,
        c1.ctl()
            .controller_publish_volume(cpublish("", "n1", block_cap())),
    );
    c2.fails(
        "NodeStage without volume id",
        InvalidArgument,
        c2.node()
            .node_stage_volume(stage_req("", &p.staging, rwop())),
    );
    c2.fails(
        "NodeUnstage without staging path",
        InvalidArgument,
        c2.node().node_unstage_volume(NodeUnstageVolumeRequest {
            volume_id: "pvc-one".into(),
            staging_target_path: String::new(),
        }),
    );
    let mut no_cap = publish_req("pvc-one", &p.staging, &p.target, rwop(), false);
    no_cap.volume_capability = None;
    c2.fails(
        "NodePublish without capability",
        InvalidArgument,
        c2.node().node_publish_volume(no_cap),
    );
    c2.fails(
        "NodeUnpublish without volume id",
        InvalidArgument,
        c2.node().node_unpublish_volume(NodeUnpublishVolumeRequest {
            volume_id: String::new(),
            target_path: p.target.to_string_lossy().into(),
        }),
    );
    c2.fails(
        "NodeExpand without volume id",
        InvalidArgument,
        c2.node().node_expand_volume(NodeExpandVolumeRequest {
            volume_path: p.target.to_string_lossy().into(),
            ..Default::default()
        }),
    );

    // A replica's node going down makes the volume abnormal in both
    // ControllerGetVolume and NodeGetVolumeStats, and normal again once it
    // is rebuilt.
    c2.ok(
        "NodeUnpublish second",
        c2.node().node_unpublish_volume(NodeUnpublishVolumeRequest {
            volume_id: "pvc-one".into(),
            target_path: second.to_string_lossy().into(),
        }),
    );
    c1.ok(
        "ControllerUnpublish a everywhere",
        c1.ctl()
            .controller_unpublish_volume(cunpublish("pvc-a", "")),
    );
    let mut two = create_req("pvc-two", 32 * MIB, block_cap(), &[("replicas", "2")]);
    two.accessibility_requirements = Some(TopologyRequirement {
        requisite: vec![node_topology("n1"), node_topology("n3")],
        preferred: Vec::new(),
    });
    c1.ok(
        "CreateVolume 2 replicas on n1+n3",
        c1.ctl().create_volume(two),
    );
    let condition = |c: &Csi| {
        c.ok(
            "ControllerGetVolume",
            c.ctl().controller_get_volume(ControllerGetVolumeRequest {
                volume_id: "pvc-two".into(),
            }),
        )
        .status
        .and_then(|s| s.volume_condition)
        .expect("condition")
    };
    assert!(!condition(c1).abnormal);
    nodes[2].kill9();
    wait_for(
        "pvc-two to be reported abnormal",
        Duration::from_secs(30),
        || condition(c1).abnormal,
    );
    let why = condition(c1).message;
    assert!(why.contains("n3") && why.contains("offline"), "{why}");
    let node_view = c2.ok(
        "NodeGetVolumeStats while a replica of another volume is down",
        c2.node().node_get_volume_stats(stats(&p.target)),
    );
    assert_eq!(node_view.volume_condition.map(|c| c.abnormal), Some(false));
    nodes[2].restart();
    wait_for(
        "pvc-two to be normal again",
        Duration::from_secs(60),
        || !condition(c1).abnormal,
    );

    teardown_on(c2, "pvc-one", "n2", &p);
    for name in ["pvc-a", "pvc-b", "pvc-one", "pvc-two"] {
        c1.ok(
            "DeleteVolume",
            c1.ctl().delete_volume(DeleteVolumeRequest {
                volume_id: name.into(),
                secrets: HashMap::new(),
            }),
        );
    }
}

/// POSTs `body` to the Docker volume plugin protocol on `n`'s socket;
/// returns the `Err` field of the answer ("" on success).
fn docker_plugin(n: &TestNode, call: &str, body: &str) -> String {
    let out = sh_ok(&format!(
        "curl -s --max-time 60 --unix-socket {} -X POST -d '{body}' http://plugin/VolumeDriver.{call}",
        n.dir.join("docker.sock").display()
    ));
    let v: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{call}: {e}: {out}"));
    v["Err"].as_str().unwrap_or_default().to_string()
}

/// The same failure is recognisable at every door: a full pool is ENOSPC to
/// a writer (FUSE and NBD), 507 PoolFull in the API, RESOURCE_EXHAUSTED in
/// CSI and says so in Docker's `Err`; no quorum is 503, UNAVAILABLE and a
/// metadata error.
#[test]
fn a_full_pool_and_no_quorum_are_typed_at_every_door() {
    let nodes = cluster_with("doors", &["128MiB", "128MiB"], 226);
    let n1 = &nodes[0];
    let c1 = Csi::connect(&n1.csi_socket());
    // Fill both pools.
    n1.cli_ok(&[
        "volume",
        "create",
        "filler",
        "--size",
        "256MiB",
        "--replicas",
        "2",
        "--fs",
        "none",
    ]);
    let dev = n1
        .cli_ok(&["volume", "attach", "filler"])
        .trim()
        .to_string();
    let dd = sh(&format!(
        "dd if=/dev/urandom of={dev} bs=1M oflag=direct status=none"
    ));
    assert!(
        String::from_utf8_lossy(&dd.stderr).contains("No space left on device"),
        "FUSE: {}",
        String::from_utf8_lossy(&dd.stderr)
    );
    let made = |name: &str, fs: &str| {
        n1.cli_ok(&[
            "volume",
            "create",
            name,
            "--size",
            "64MiB",
            "--replicas",
            "1",
            "--locality",
            "--fs",
            fs,
        ]);
    };
    made("nbdvol", "none");
    let q = sh(&format!(
        "qemu-io -f raw -c 'write -P 7 0 1M' '{}'",
        n1.nbd_url("nbdvol")
    ));
    let qtext = format!(
        "{}{}",
        String::from_utf8_lossy(&q.stdout),
        String::from_utf8_lossy(&q.stderr)
    );
    assert!(qtext.contains("No space left on device"), "NBD: {qtext}");
    // REST: the first mount formats, which needs space.
    made("fsvol", "ext4");
    let (code, v) = n1.api(
        "POST",
        "/v1/volumes/fsvol/mount",
        Some(&serde_json::json!({ "path": n1.path("m").to_string_lossy() })),
    );
    assert_eq!(
        (code, v["error"]["code"].as_str()),
        (507, Some("PoolFull")),
        "{v}"
    );
    // CSI: staging formats too.
    c1.ok(
        "CreateVolume",
        c1.ctl()
            .create_volume(create_req("pvc-full", 64 * MIB, ext4_cap(), &[])),
    );
    c1.ok(
        "ControllerPublish",
        c1.ctl()
            .controller_publish_volume(cpublish("pvc-full", "n1", ext4_cap())),
    );
    let p = paths(n1, "full");
    let m = c1.fails(
        "NodeStage on a full pool",
        Code::ResourceExhausted,
        c1.node()
            .node_stage_volume(stage_req("pvc-full", &p.staging, ext4_cap())),
    );
    assert!(m.contains("pool is full"), "{m}");
    // Docker: the mount formats as well.
    assert_eq!(
        docker_plugin(
            n1,
            "Create",
            r#"{"Name":"dk","Opts":{"size":"64MiB","replicas":"1","locality":"true"}}"#
        ),
        ""
    );
    let err = docker_plugin(n1, "Mount", r#"{"Name":"dk","ID":"c1"}"#);
    assert!(err.contains("pool is full"), "Docker: {err}");
    // No quorum: two voters, one of them gone.
    let mut nodes = nodes;
    nodes[1].kill9();
    let n1 = &nodes[0];
    let (code, v) = n1.api(
        "POST",
        "/v1/volumes",
        Some(&serde_json::json!({ "name": "nq", "size": "8MiB" })),
    );
    assert_eq!(
        (code, v["error"]["code"].as_str()),
        (503, Some("MetadataError")),
        "{v}"
    );
    c1.fails(
        "CreateVolume without quorum",
        Code::Unavailable,
        c1.ctl()
            .create_volume(create_req("pvc-nq", 8 * MIB, ext4_cap(), &[])),
    );
    let err = docker_plugin(n1, "Create", r#"{"Name":"dknq","Opts":{"size":"8MiB"}}"#);
    assert!(err.contains("cluster metadata"), "Docker: {err}");
}

/// CSI names are any UTF-8 without control characters, up to 128 bytes:
/// each maps to one volume id, repeats find the same volume, and the CSI
/// name shows in `volume inspect`.
#[test]
fn csi_names_of_any_kind_round_trip() {
    let node = TestNode::start_with("csi-names", "512MiB", &["--node-name", "n1"]);
    let c = Csi::connect(&node.csi_socket());
    let long = "é".repeat(64);
    for name in [
        "pvc with spaces",
        "a+b",
        "日本語のボリューム",
        "-dash first",
        long.as_str(),
    ] {
        let made = c.ok(
            "CreateVolume",
            c.ctl()
                .create_volume(create_req(name, 8 * MIB, ext4_cap(), &[])),
        );
        let id = made.volume.expect("volume").volume_id;
        let again = c.ok(
            "CreateVolume again",
            c.ctl()
                .create_volume(create_req(name, 8 * MIB, ext4_cap(), &[])),
        );
        assert_eq!(again.volume.expect("volume").volume_id, id, "{name}");
        let shown = node.cli_ok(&["volume", "inspect", &id]);
        assert!(shown.contains(&format!("CSI name      {name}")), "{shown}");
        assert_eq!(node.inspect(&id)["csi_name"], name);
        c.ok(
            "DeleteVolume",
            c.ctl().delete_volume(DeleteVolumeRequest {
                volume_id: id.clone(),
                ..Default::default()
            }),
        );
        assert!(!names(&node).contains(&id));
    }
    // A valid volume name stays the id; the CSI name is not repeated.
    let made = c.ok(
        "CreateVolume",
        c.ctl()
            .create_volume(create_req("pvc-plain", 8 * MIB, ext4_cap(), &[])),
    );
    assert_eq!(made.volume.expect("volume").volume_id, "pvc-plain");
    assert!(node.inspect("pvc-plain")["csi_name"].is_null());
    for bad in [format!("{long}x"), "tab\there".to_string()] {
        c.fails(
            "CreateVolume with a bad name",
            Code::InvalidArgument,
            c.ctl()
                .create_volume(create_req(&bad, 8 * MIB, ext4_cap(), &[])),
        );
    }
    // An unknown volume is NOT_FOUND whatever the path looks like.
    for path in ["relative/path", "/does/not/exist", ""] {
        c.fails(
            "NodeGetVolumeStats of an unknown volume",
            Code::NotFound,
            c.node().node_get_volume_stats(NodeGetVolumeStatsRequest {
                volume_id: "no-such-volume".into(),
                volume_path: path.into(),
                ..Default::default()
            }),
        );
        c.fails(
            "NodeExpandVolume of an unknown volume",
            Code::NotFound,
            c.node().node_expand_volume(NodeExpandVolumeRequest {
                volume_id: "no-such-volume".into(),
                volume_path: path.into(),
                ..Default::default()
            }),
        );
    }
}

/// One guard for every door: while Docker mounts a volume (its first
/// mount formats it), a CSI operation on the same volume is ABORTED; once
/// the mount is done the same call succeeds, and nothing was half-done.
#[test]
fn csi_and_docker_share_one_operation_guard() {
    let node = TestNode::start_with("guard", "1GiB", &["--node-name", "n1"]);
    let c = Csi::connect(&node.csi_socket());
    assert_eq!(
        docker_plugin(
            &node,
            "Create",
            r#"{"Name":"shared","Opts":{"size":"8GiB","replicas":"1"}}"#
        ),
        ""
    );
    let expand = || ControllerExpandVolumeRequest {
        volume_id: "shared".into(),
        capacity_range: Some(CapacityRange {
            required_bytes: 8 << 30,
            limit_bytes: 0,
        }),
        ..Default::default()
    };
    let mounting = std::thread::scope(|sc| {
        let m = sc.spawn(|| docker_plugin(&node, "Mount", r#"{"Name":"shared","ID":"c1"}"#));
        let mut aborted = 0;
        while !m.is_finished() {
            match c.run(c.ctl().controller_expand_volume(expand())) {
                Err(s) if s.code() == Code::Aborted => aborted += 1,
                Err(s) => panic!("expand during the mount: {:?} {}", s.code(), s.message()),
                Ok(_) => {}
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        (m.join().expect("mount thread"), aborted)
    });
    assert_eq!(mounting.0, "", "Docker mount failed");
    assert!(
        mounting.1 > 0,
        "no CSI call was refused while Docker mounted"
    );
    c.ok(
        "expand after the mount",
        c.ctl().controller_expand_volume(expand()),
    );
    let v = node.inspect("shared");
    assert_eq!(
        (v["state"].as_str(), v["formatted"].as_bool()),
        (Some("mounted"), Some(true)),
        "{v}"
    );
    assert_eq!(
        docker_plugin(&node, "Unmount", r#"{"Name":"shared","ID":"c1"}"#),
        ""
    );
}
