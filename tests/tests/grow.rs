//! Online grow: the volume, its loop device and the mounted filesystem grow
//! without unmounting, and data written before the grow stays intact.

// Test code: an unwrap that fails is a failed test.
#![allow(clippy::unwrap_used)]

use cairn_tests::*;

fn df_size(path: &str) -> u64 {
    sh_ok(&format!("df -B1 --output=size {path} | tail -1"))
        .trim()
        .parse()
        .expect("df size")
}

fn device_size(dev: &str) -> u64 {
    sh_ok(&format!("blockdev --getsize64 {dev}"))
        .trim()
        .parse()
        .expect("blockdev size")
}

/// Creates, mounts, writes, grows 512 MiB -> 1 GiB; returns (node, mount, device).
fn grow(fs: &str) -> (TestNode, String, String, Manifest, Result<String, String>) {
    let node = TestNode::start(&format!("grow-{fs}"), "2GiB");
    node.cli_ok(&["volume", "create", "g", "--size", "512MiB", "--fs", fs]);
    let mnt = node.path("m").to_string_lossy().into_owned();
    node.cli_ok(&["volume", "mount", "g", &mnt]);
    let dev = node.inspect("g")["device"].as_str().unwrap().to_string();
    let data = write_manifest(std::path::Path::new(&mnt), 4, 4 << 20, 9);
    let before = df_size(&mnt);
    assert!(
        before < 520 << 20,
        "{fs}: df before the grow shows {before}"
    );
    let o = node.cli(&["volume", "resize", "g", "--size", "1GiB"]);
    let r = if o.status.success() {
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&o.stderr).into_owned())
    };
    assert_eq!(node.inspect("g")["size_bytes"], 1u64 << 30);
    assert_eq!(
        device_size(&dev),
        1 << 30,
        "{fs}: the loop device did not grow"
    );
    (node, mnt, dev, data, r)
}

#[test]
fn xfs_grows_online() {
    let (node, mnt, _dev, data, r) = grow("xfs");
    r.expect("resize of a mounted xfs volume");
    let after = df_size(&mnt);
    assert!(after > 900 << 20, "df after the grow shows {after}");
    assert!(
        cairn_node::sys::mount::is_mount_point(std::path::Path::new(&mnt)),
        "the grow unmounted the volume"
    );
    verify_manifest(std::path::Path::new(&mnt), &data);
    node.cli_ok(&["volume", "unmount", "g", &mnt]);
}

#[test]
fn ext4_grows_online() {
    let (node, mnt, _dev, data, r) = grow("ext4");
    if has_cap_sys_resource() {
        r.expect("resize of a mounted ext4 volume");
        let after = df_size(&mnt);
        assert!(after > 900 << 20, "df after the grow shows {after}");
    } else {
        // Online ext4 growth needs CAP_SYS_RESOURCE (EXT4_IOC_RESIZE_FS);
        // without it the API must say so, and the next mount grows offline.
        let err = r.expect_err("ext4 online resize cannot succeed without CAP_SYS_RESOURCE");
        assert!(err.contains("CAP_SYS_RESOURCE"), "{err}");
        println!("SKIP ext4 online filesystem grow: this machine withholds CAP_SYS_RESOURCE; checking the offline grow at the next mount instead");
        assert!(df_size(&mnt) < 520 << 20);
        node.cli_ok(&["volume", "unmount", "g", &mnt]);
        node.cli_ok(&["volume", "mount", "g", &mnt]);
        let after = df_size(&mnt);
        assert!(after > 900 << 20, "df after remount shows {after}");
    }
    verify_manifest(std::path::Path::new(&mnt), &data);
    // Shrinking is refused and changes nothing.
    let o = node.cli(&["volume", "resize", "g", "--size", "256MiB"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("ShrinkNotSupported"));
    assert_eq!(node.inspect("g")["size_bytes"], 1u64 << 30);
    node.cli_ok(&["volume", "unmount", "g", &mnt]);
}
