//! Published targets are recorded on the node: unstaging refuses while a
//! target still shows the volume, a graceful stop keeps a published volume
//! attached, and a crash that takes the FUSE holder with it gets every
//! target bound again on the new device.

use super::*;

fn connect_when_ready(n: &TestNode) -> Csi {
    wait_for("the CSI socket", Duration::from_secs(30), || {
        std::os::unix::net::UnixStream::connect(n.csi_socket()).is_ok()
    });
    Csi::connect(&n.csi_socket())
}

/// The source of the mount at `path` in the mount table, if it is one.
fn mount_source(path: &Path) -> Option<String> {
    cairn_node::sys::mount::mounts()
        .into_iter()
        .find(|m| m.mount_point == path)
        .map(|m| m.source)
}

fn published(n: &TestNode, volume: &str) -> Vec<String> {
    n.inspect(volume)["published"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn published_targets_are_recorded_and_outlive_restarts() {
    let mut node = TestNode::start_with("csi-restart", "1GiB", &["--node-name", "n1"]);
    let mut c = connect_when_ready(&node);
    let one = [("replicas", "1")];
    c.ok(
        "CreateVolume fs",
        c.ctl()
            .create_volume(create_req("pvc-keep", 64 * MIB, ext4_cap(), &one)),
    );
    c.ok(
        "CreateVolume block",
        c.ctl()
            .create_volume(create_req("pvc-raw", 16 * MIB, block_cap(), &one)),
    );
    let fs = paths(&node, "keep");
    let raw = Paths {
        staging: node.dir.join("kubelet/raw/globalmount"),
        target: node.dir.join("kubelet/pods/raw/dev"),
    };
    std::fs::create_dir_all(&raw.staging).expect("staging dir");
    for (id, cap, p) in [
        ("pvc-keep", ext4_cap(), &fs),
        ("pvc-raw", block_cap(), &raw),
    ] {
        c.ok(
            "ControllerPublishVolume",
            c.ctl()
                .controller_publish_volume(cpublish(id, "n1", cap.clone())),
        );
        c.ok(
            "NodeStageVolume",
            c.node()
                .node_stage_volume(stage_req(id, &p.staging, cap.clone())),
        );
        c.ok(
            "NodePublishVolume",
            c.node()
                .node_publish_volume(publish_req(id, &p.staging, &p.target, cap, false)),
        );
    }
    let data = fs.target.join("data.bin");
    {
        let mut buf = vec![0u8; 4 << 20];
        fill_pattern(&mut buf, 11);
        let mut f = std::fs::File::create(&data).expect("create data");
        f.write_all(&buf).expect("write data");
        f.sync_all().expect("fsync data");
    }
    let want = sha(&data);
    let mut block = vec![0u8; 1 << 20];
    fill_pattern(&mut block, 12);
    write_direct(&raw.target, 0, &block).expect("write the raw target");
    assert_eq!(
        published(&node, "pvc-keep"),
        vec![fs.target.to_string_lossy().to_string()]
    );
    assert_eq!(
        published(&node, "pvc-raw"),
        vec![raw.target.to_string_lossy().to_string()]
    );

    // Unstaging while a target still shows the volume is refused, and
    // changes nothing.
    for (id, p) in [("pvc-keep", &fs), ("pvc-raw", &raw)] {
        let m = c.fails(
            "NodeUnstageVolume while published",
            Code::FailedPrecondition,
            c.node().node_unstage_volume(NodeUnstageVolumeRequest {
                volume_id: id.into(),
                staging_target_path: p.staging.to_string_lossy().into(),
            }),
        );
        assert!(m.contains("published at"), "{m}");
    }
    assert!(mount_options(&fs.staging).is_some(), "staging unmounted");
    assert_eq!(sha(&data), want);
    assert_eq!(
        read_direct(&raw.target, 0, block.len()).expect("read raw"),
        block
    );

    // A graceful stop keeps published volumes attached: the next daemon
    // serves the same mounts.
    drop(c);
    assert!(node.terminate().expect("was running").success());
    assert!(
        mount_options(&fs.target).is_some() && mount_options(&fs.staging).is_some(),
        "a published volume's mounts were taken down by the stop"
    );
    node.restart();
    c = connect_when_ready(&node);
    assert_eq!(sha(&data), want, "data after a graceful restart");
    assert_eq!(
        published(&node, "pvc-keep"),
        vec![fs.target.to_string_lossy().to_string()]
    );

    // A crash that takes the FUSE holder along: the next daemon binds new
    // devices, mounts the staging path again and binds the targets again.
    let old_dev = node.inspect("pvc-keep")["device"]
        .as_str()
        .expect("device")
        .to_string();
    drop(c);
    node.kill9();
    kill_holders(&node.dir);
    wait_for("the holder to die", Duration::from_secs(10), || {
        holders(&node.dir).is_empty()
    });
    node.restart();
    c = connect_when_ready(&node);
    wait_for(
        "the target bound again on the new device",
        Duration::from_secs(30),
        || {
            let dev = node.inspect("pvc-keep")["device"]
                .as_str()
                .map(String::from);
            dev.is_some() && mount_source(&fs.target) == dev
        },
    );
    let new_dev = node.inspect("pvc-keep")["device"]
        .as_str()
        .expect("device")
        .to_string();
    assert_eq!(mount_source(&fs.staging).as_deref(), Some(new_dev.as_str()));
    assert_eq!(sha(&data), want, "data after a crash with the holder");
    // The target is the staged filesystem, not a stale copy of the old one.
    std::fs::write(fs.target.join("after.txt"), b"after the crash").expect("write after");
    std::fs::File::open(fs.target.join("after.txt"))
        .and_then(|f| f.sync_all())
        .expect("fsync after the crash");
    assert_eq!(
        std::fs::read(fs.staging.join("after.txt")).expect("seen in staging"),
        b"after the crash"
    );
    assert_eq!(
        read_direct(&raw.target, 0, block.len()).expect("read raw after the crash"),
        block
    );
    assert!(
        node.last_log().contains("published again after restart"),
        "old device {old_dev}, new {new_dev}"
    );

    teardown_on(&c, "pvc-keep", "n1", &fs);
    teardown_on(&c, "pvc-raw", "n1", &raw);
    assert!(published(&node, "pvc-keep").is_empty());
    for id in ["pvc-keep", "pvc-raw"] {
        c.ok(
            "DeleteVolume",
            c.ctl().delete_volume(DeleteVolumeRequest {
                volume_id: id.into(),
                secrets: HashMap::new(),
            }),
        );
    }
}

/// The other ways a recorded target matters: a REST unmount of the staging
/// path a target is bound from is refused (409 VolumeInUse) and changes
/// nothing; a target that went missing while the FUSE holder kept the
/// volume is bound again when the next daemon takes it over; and `volume
/// rm --force` takes the target down with the staging mount.
#[test]
fn a_bound_target_blocks_unmount_comes_back_after_a_crash_and_goes_with_rm_force() {
    let mut node = TestNode::start_with("csi-bound", "1GiB", &["--node-name", "n1"]);
    let mut c = connect_when_ready(&node);
    c.ok(
        "CreateVolume",
        c.ctl().create_volume(create_req(
            "pvc-bound",
            64 * MIB,
            ext4_cap(),
            &[("replicas", "1")],
        )),
    );
    let p = paths(&node, "bound");
    c.ok(
        "ControllerPublishVolume",
        c.ctl()
            .controller_publish_volume(cpublish("pvc-bound", "n1", ext4_cap())),
    );
    c.ok(
        "NodeStageVolume",
        c.node()
            .node_stage_volume(stage_req("pvc-bound", &p.staging, ext4_cap())),
    );
    c.ok(
        "NodePublishVolume",
        c.node().node_publish_volume(publish_req(
            "pvc-bound",
            &p.staging,
            &p.target,
            ext4_cap(),
            false,
        )),
    );
    std::fs::write(p.target.join("kept.txt"), b"kept").expect("write");
    std::fs::File::open(p.target.join("kept.txt"))
        .and_then(|f| f.sync_all())
        .expect("fsync");

    let (st, v) = node.api(
        "POST",
        "/v1/volumes/pvc-bound/unmount",
        Some(&serde_json::json!({ "path": p.staging.to_string_lossy() })),
    );
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (409, Some("VolumeInUse")),
        "{v}"
    );
    assert!(mount_options(&p.staging).is_some() && mount_options(&p.target).is_some());

    // The target goes missing behind the daemon's back, then the daemon
    // dies while the holder keeps the volume: the next one binds it again.
    cairn_node::sys::mount::umount(&p.target, 0).expect("umount the target");
    drop(c);
    node.kill9();
    node.restart();
    c = connect_when_ready(&node);
    wait_for("the target bound again", Duration::from_secs(30), || {
        mount_options(&p.target).is_some()
    });
    assert_eq!(
        std::fs::read(p.target.join("kept.txt")).expect("read through the target"),
        b"kept"
    );
    assert_eq!(
        published(&node, "pvc-bound"),
        vec![p.target.to_string_lossy().to_string()]
    );

    node.cli_ok(&["volume", "rm", "pvc-bound", "--force"]);
    assert!(mount_options(&p.target).is_none(), "the target stayed");
    assert!(
        mount_options(&p.staging).is_none(),
        "the staging mount stayed"
    );
    assert!(!names(&node).contains(&"pvc-bound".to_string()));
    drop(c);
}
