//! A pool on a real block device (`--disk`): a loop device over a file the
//! test creates, formatted by the daemon, used, and found again on restart.

// Test code: an unwrap that fails is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use cairn_tests::*;

/// A loop device over a test file; detached and removed on drop.
struct LoopDisk {
    dir: PathBuf,
    dev: PathBuf,
}

impl LoopDisk {
    fn new(size: u64) -> LoopDisk {
        let dir = test_root().join(format!("blockdisk-{}", std::process::id()));
        cleanup_dir(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("disk.img");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&img)
            .unwrap();
        f.set_len(size).unwrap();
        let dev = cairn_node::sys::loopdev::attach(&f, 4096).expect("loop device for the pool");
        LoopDisk { dir, dev }
    }
}

impl Drop for LoopDisk {
    fn drop(&mut self) {
        cleanup_dir(&self.dir);
    }
}

#[test]
fn pool_on_a_block_device() {
    let disk = LoopDisk::new(512 << 20);
    let dev_s = disk.dev.to_string_lossy().into_owned();
    let mut node = TestNode::start_with("blockpool", "", &["--disk", &dev_s]);
    let pool = node.pool();
    assert_eq!(pool["devices"][0]["kind"], "block", "{pool}");
    assert_eq!(pool["devices"][0]["path"], dev_s.as_str());
    assert_eq!(pool["capacity_bytes"], 511u64 << 20, "{pool}");

    node.cli_ok(&["volume", "create", "b", "--size", "128MiB", "--fs", "none"]);
    let vdev = node.cli_ok(&["volume", "attach", "b"]).trim().to_string();
    let pat = node.path("pat");
    sh_ok(&format!(
        "dd if=/dev/urandom of={} bs=1M count=16 status=none",
        pat.display()
    ));
    sh_ok(&format!(
        "dd if={} of={vdev} bs=1M seek=8 oflag=direct conv=fsync status=none",
        pat.display()
    ));
    node.cli_ok(&["volume", "detach", "b"]);
    assert_eq!(node.pool_allocated(), 16 << 20);

    node.kill9();
    node.restart();
    assert_eq!(
        node.pool()["devices"][0]["id"],
        pool["devices"][0]["id"],
        "restart found another device"
    );
    let vdev = node.cli_ok(&["volume", "attach", "b"]).trim().to_string();
    sh_ok(&format!(
        "cmp -n 16777216 {} {vdev} 0 8388608",
        pat.display()
    ));
    node.cli_ok(&["volume", "detach", "b"]);
    // Deleting the volume zeroes and frees its extents on the device.
    node.cli_ok(&["volume", "rm", "b"]);
    assert_eq!(node.pool_allocated(), 0);
    drop(node);
    // The device still carries the pool's superblock and nothing else.
    let mut head = [0u8; 8];
    std::io::Read::read_exact(
        &mut std::fs::File::open(Path::new(&dev_s)).unwrap(),
        &mut head,
    )
    .unwrap();
    assert_eq!(&head, b"CAIRNPL\0");
}
