//! Data written through a mounted volume survives SIGKILL of the daemon,
//! and a daemon restart re-serves (or cleans up) what it had attached.

use cairn_tests::*;
use std::time::Duration;

const FILE: usize = 4 << 20;

#[test]
fn data_survives_sigkill_and_restart() {
    let mut node = TestNode::start("durability", "2GiB");
    node.cli_ok(&["volume", "create", "db", "--size", "1GiB"]);
    let mnt = node.path("mnt");
    let mnt_s = mnt.to_string_lossy().into_owned();
    node.cli_ok(&["volume", "mount", "db", &mnt_s]);

    // 256 MiB of random data with a checksum manifest.
    let manifest = write_manifest(&mnt, 64, FILE, 0x5eed_0001);
    println!("wrote 64 x 4 MiB with seed 0x5eed0001");
    node.cli_ok(&["volume", "unmount", "db", &mnt_s]);
    assert_eq!(node.inspect("db")["state"], "detached");

    node.kill9();
    node.restart();
    node.cli_ok(&["volume", "mount", "db", &mnt_s]);
    verify_manifest(&mnt, &manifest);
    let v = node.inspect("db");
    assert_eq!(v["formatted"], true);
    assert!(
        v["allocated_bytes"].as_u64().unwrap() >= 256 << 20,
        "allocation does not cover the data: {v}"
    );

    // SIGKILL while mounted: the restart cleans the dead loop device and
    // mount and re-serves the attachment at the same path.
    let more = write_manifest(&mnt, 4, FILE, 0x5eed_0002);
    let old_dev = v["device"].as_str().unwrap().to_string();
    node.kill9();
    node.restart();
    let v = node.inspect("db");
    assert_eq!(v["state"], "mounted", "attachment not re-served: {v}");
    assert_eq!(v["mounts"][0].as_str(), Some(mnt_s.as_str()));
    let dev = v["device"].as_str().unwrap().to_string();
    let backing =
        cairn_node::sys::loopdev::backing_file(std::path::Path::new(&dev)).expect("device bound");
    assert!(
        backing.starts_with(node.dir.join("data/fuse")),
        "{dev} is bound to {backing:?}"
    );
    // Exactly one loop device serves the volume: the stale one is gone.
    let ours = cairn_node::sys::loopdev::devices_backed_under(&node.dir);
    assert_eq!(
        ours.len(),
        1,
        "stale loop devices remain (old {old_dev}): {ours:?}"
    );
    verify_manifest(&mnt, &manifest);
    verify_manifest(&mnt, &more);

    // Graceful stop unmounts and detaches; the next start re-serves.
    assert!(
        node.terminate().expect("was running").success(),
        "log:\n{}",
        node.log()
    );
    assert!(
        cairn_node::sys::loopdev::devices_backed_under(&node.dir).is_empty(),
        "SIGTERM left a loop device"
    );
    assert!(
        !cairn_node::sys::mount::is_mount_point(&mnt),
        "SIGTERM left the volume mounted"
    );
    node.restart();
    assert_eq!(node.inspect("db")["state"], "mounted");
    verify_manifest(&mnt, &more);
    node.cli_ok(&["volume", "unmount", "db", &mnt_s]);
    node.cli_ok(&["volume", "rm", "db"]);
    assert_eq!(
        node.pool_allocated(),
        0,
        "deleting the volume must return its space"
    );
}

#[test]
fn raw_block_attach_detach_is_idempotent() {
    let node = TestNode::start("rawblock", "1GiB");
    node.cli_ok(&["volume", "create", "raw", "--size", "64MiB", "--fs", "none"]);
    let dev = node.cli_ok(&["volume", "attach", "raw"]).trim().to_string();
    assert!(dev.starts_with("/dev/loop"), "{dev}");
    assert_eq!(
        node.cli_ok(&["volume", "attach", "raw"]).trim(),
        dev,
        "second attach must return the same device"
    );
    assert_eq!(
        std::fs::read_to_string(format!("/sys/block/{}/loop/dio", &dev[5..]))
            .unwrap()
            .trim(),
        "1",
        "loop device without direct I/O"
    );
    assert_eq!(
        std::fs::read_to_string(format!("/sys/block/{}/size", &dev[5..]))
            .unwrap()
            .trim(),
        (64u64 << 20 >> 9).to_string()
    );
    sh_ok(&format!("dd if=/dev/urandom of={0}/pat bs=1M count=8 status=none && dd if={0}/pat of={dev} bs=1M oflag=direct conv=fsync status=none", node.dir.display()));
    sh_ok(&format!("cmp -n 8388608 {}/pat {dev}", node.dir.display()));
    // Concurrent verified I/O through the loop device and FUSE (queue depth 32).
    let fio = sh(&format!(
        "fio --name=verify --filename={dev} --rw=randwrite --bs=4k --iodepth=32 --ioengine=libaio --direct=1 \
         --size=32M --offset=16M --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_state_save=0 --output-format=terse"
    ));
    assert!(
        fio.status.success(),
        "fio verify failed: {}",
        String::from_utf8_lossy(&fio.stderr)
    );
    sh_ok(&format!("cmp -n 8388608 {}/pat {dev}", node.dir.display()));
    // A raw volume cannot be mounted.
    let o = node.cli(&["volume", "mount", "raw", &node.path("m").to_string_lossy()]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("RawVolume"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    node.cli_ok(&["volume", "detach", "raw"]);
    node.cli_ok(&["volume", "detach", "raw"]);
    assert!(
        cairn_node::sys::loopdev::backing_file(std::path::Path::new(&dev))
            .is_none_or(|b| !b.starts_with(&node.dir))
    );
    // Data persists across detach/attach.
    let dev2 = node.cli_ok(&["volume", "attach", "raw"]).trim().to_string();
    sh_ok(&format!("cmp -n 8388608 {}/pat {dev2}", node.dir.display()));
    node.cli_ok(&["volume", "detach", "raw"]);
}

/// A daemon crash keeps the volume's mount: the FUSE connection is held
/// by the holder process, a write issued while the daemon is dead completes
/// once it is back, and the same filesystem serves before and after.
#[test]
fn mounts_survive_a_daemon_crash() {
    let mut node = TestNode::start("keep", "1GiB");
    node.cli_ok(&["volume", "create", "keep", "--size", "256MiB"]);
    let mnt = node.dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    node.cli_ok(&["volume", "mount", "keep", mnt.to_str().unwrap()]);
    let source = |p: &std::path::Path| {
        cairn_node::sys::mount::mounts()
            .into_iter()
            .find(|m| m.mount_point == p)
            .map(|m| m.source)
    };
    let before = source(&mnt).expect("mounted");
    let mut a = vec![0u8; 1 << 20];
    fill_pattern(&mut a, 11);
    std::fs::write(mnt.join("a"), &a).unwrap();
    std::fs::File::open(mnt.join("a"))
        .unwrap()
        .sync_all()
        .unwrap();

    node.kill9();
    // Written while no daemon runs: it waits in the kernel, not fails.
    let (path_b, mut b) = (mnt.join("b"), vec![0u8; 1 << 20]);
    fill_pattern(&mut b, 12);
    let expect_b = b.clone();
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&path_b)?;
        std::io::Write::write_all(&mut f, &b)?;
        f.sync_all()
    });
    node.restart();
    wait_for(
        "the write issued during the crash",
        Duration::from_secs(60),
        || writer.is_finished(),
    );
    writer.join().unwrap().expect("write across the crash");
    assert_eq!(source(&mnt), Some(before), "the mount changed");
    assert_eq!(read_direct(&mnt.join("a"), 0, a.len()).unwrap(), a);
    assert_eq!(
        read_direct(&mnt.join("b"), 0, expect_b.len()).unwrap(),
        expect_b
    );
    assert!(node.log().contains("took over the FUSE connection"));
    node.cli_ok(&["volume", "unmount", "keep", mnt.to_str().unwrap()]);
}

/// Processes whose command line runs a FUSE holder of `dir`.
fn holders_of(dir: &std::path::Path) -> usize {
    let want = dir.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter(|p| {
            p.file_name()
                .to_str()
                .is_some_and(|s| s.parse::<u32>().is_ok())
        })
        .filter(|p| {
            let cmd = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            cmd.contains("fuse-holder") && cmd.contains(&want)
        })
        .count()
}

/// Like a Kubernetes pod: the holder runs on its own (a sidecar container)
/// and the daemon hands it the connection, so killing the daemon together
/// with everything it started (a container restart) keeps the mounts.
#[test]
fn a_standby_holder_keeps_mounts_when_the_daemon_and_its_processes_die() {
    let mut node = TestNode::prepare("standby", "127.0.0.1", "1GiB", &[]);
    let mut holder = start_standby_holder(&node);
    node.start_prepared();
    node.cli_ok(&["volume", "create", "side", "--size", "256MiB"]);
    let mnt = node.dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    node.cli_ok(&["volume", "mount", "side", mnt.to_str().unwrap()]);
    assert!(
        node.log().contains("handed to the standby holder"),
        "{}",
        node.last_log()
    );
    assert_eq!(
        holders_of(&node.dir),
        1,
        "the daemon started a holder of its own"
    );
    let mut a = vec![0u8; 1 << 20];
    fill_pattern(&mut a, 21);
    std::fs::write(mnt.join("a"), &a).unwrap();
    std::fs::File::open(mnt.join("a"))
        .unwrap()
        .sync_all()
        .unwrap();

    node.kill9();
    let (path_b, mut b) = (mnt.join("b"), vec![0u8; 1 << 20]);
    fill_pattern(&mut b, 22);
    let expect_b = b.clone();
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&path_b)?;
        std::io::Write::write_all(&mut f, &b)?;
        f.sync_all()
    });
    node.restart();
    wait_for(
        "the write issued while no daemon ran",
        Duration::from_secs(60),
        || writer.is_finished(),
    );
    writer.join().unwrap().expect("write across the restart");
    assert_eq!(read_direct(&mnt.join("a"), 0, a.len()).unwrap(), a);
    assert_eq!(
        read_direct(&mnt.join("b"), 0, expect_b.len()).unwrap(),
        expect_b
    );
    assert!(node.log().contains("took over the FUSE connection"));
    node.cli_ok(&["volume", "unmount", "side", mnt.to_str().unwrap()]);
    // A graceful stop unmounts FUSE; the standby holder stays for the next
    // daemon.
    node.terminate();
    // Nothing to wait for: the holder looks at the mount every 500 ms, so
    // after two looks it would have exited if it were going to.
    std::thread::sleep(Duration::from_millis(1200));
    assert!(
        holder.try_wait().expect("holder status").is_none(),
        "the standby holder exited"
    );
    holder.kill().expect("stop the standby holder");
    let _ = holder.wait();
}

/// A write the volume acknowledged survives a daemon crash even when no
/// flush followed it: the map entry of a freshly allocated extent is durable
/// before the write into it completes. The loop device stays bound across
/// the crash (the FUSE holder keeps the connection), so whatever it reads
/// afterwards is what a mounted filesystem would see.
#[test]
fn unflushed_writes_to_new_extents_survive_a_daemon_crash() {
    let mut node = TestNode::start("fresh", "1GiB");
    node.cli_ok(&[
        "volume", "create", "fresh", "--size", "128MiB", "--fs", "none",
    ]);
    let dev = node
        .cli_ok(&["volume", "attach", "fresh"])
        .trim()
        .to_string();
    let dev_path = std::path::PathBuf::from(&dev);
    // One 4 KiB block in each of 48 extents that were never written, with
    // no fsync: the daemon is killed right after the last write returns,
    // well inside sled's own flush interval.
    let blocks: Vec<(u64, Vec<u8>)> = (0..48u64)
        .map(|i| {
            let mut b = vec![0u8; 4096];
            fill_pattern(&mut b, 0xf00 + i);
            (i * (2 << 20) + 8192, b)
        })
        .collect();
    for (off, b) in &blocks {
        write_direct_unflushed(&dev_path, *off, b).expect("direct write");
    }
    node.kill9();
    node.restart();
    for (off, b) in &blocks {
        let got = read_direct(&dev_path, *off, b.len()).expect("read after the crash");
        assert!(
            got == *b,
            "the acknowledged write at offset {off} was lost in the crash"
        );
    }
    assert!(node.log().contains("took over the FUSE connection"));
    node.cli_ok(&["volume", "detach", "fresh"]);
}
