//! Thin provisioning: a 100 GiB volume on a 2 GiB pool, usage that follows
//! written data, space returned on fstrim and delete, and a full pool that
//! writers see as errors while the daemon and other volumes stay healthy.

use cairn_tests::*;

const MIB: u64 = 1 << 20;

#[test]
fn thin_volume_usage_trim_delete_and_full_pool() {
    let node = TestNode::start("thin", "2GiB");
    let cap = node.pool()["capacity_bytes"].as_u64().unwrap();
    assert!(cap > 2000 * MIB && cap <= 2048 * MIB, "capacity {cap}");

    // A small volume whose data must survive the big one filling the pool.
    node.cli_ok(&["volume", "create", "keep", "--size", "256MiB"]);
    let keep_mnt = node.path("keep");
    node.cli_ok(&["volume", "mount", "keep", &keep_mnt.to_string_lossy()]);
    let keep = write_manifest(&keep_mnt, 8, 4 << 20, 0xabc);

    node.cli_ok(&["volume", "create", "big", "--size", "100GiB"]);
    let v = node.inspect("big");
    assert_eq!(v["size_bytes"], 100u64 << 30);
    let mnt = node.path("big");
    let mnt_s = mnt.to_string_lossy().into_owned();
    node.cli_ok(&["volume", "mount", "big", &mnt_s]);
    let after_mkfs = node.inspect("big")["allocated_bytes"].as_u64().unwrap();
    println!(
        "100 GiB ext4 after mkfs+mount allocates {} MiB",
        after_mkfs / MIB
    );
    assert!(
        after_mkfs < 300 * MIB,
        "mkfs of a thin volume allocated {after_mkfs} bytes"
    );
    let df = sh_ok(&format!("df -B1 --output=size {mnt_s} | tail -1"));
    assert!(
        df.trim().parse::<u64>().unwrap() > 90 << 30,
        "df shows {df}"
    );

    // Usage grows with written data only.
    let before = node.pool_allocated();
    sh_ok(&format!(
        "dd if=/dev/urandom of={mnt_s}/f bs=1M count=300 oflag=direct status=none && sync"
    ));
    let grown = node.pool_allocated() - before;
    println!("writing 300 MiB grew the pool by {} MiB", grown / MIB);
    assert!(
        (300 * MIB..340 * MIB).contains(&grown),
        "pool grew by {grown} bytes for 300 MiB"
    );

    // fstrim after deleting the file returns the space.
    sh_ok(&format!("rm {mnt_s}/f && sync && fstrim {mnt_s}"));
    let trimmed = node.pool_allocated();
    println!("after rm + fstrim the pool holds {} MiB", trimmed / MIB);
    assert!(
        trimmed < before + 20 * MIB,
        "fstrim returned too little: {before} -> {trimmed}"
    );

    // Fill the pool: the writer must see an error, never silent loss.
    let o = sh(&format!(
        "dd if=/dev/urandom of={mnt_s}/fill bs=1M count=3000 oflag=direct conv=fsync status=none"
    ));
    assert!(
        !o.status.success(),
        "writing 3000 MiB into a 2 GiB pool reported success"
    );
    println!("writer saw: {}", String::from_utf8_lossy(&o.stderr).trim());
    let pool = node.pool();
    assert_eq!(pool["free_bytes"], 0, "the pool should be full: {pool}");
    // The daemon still serves, and the other volume's data is intact.
    let (s, _) = node.api("GET", "/v1/node", None);
    assert_eq!(s, 200);
    verify_manifest(&keep_mnt, &keep);
    assert!(
        node.log().contains("pool is full"),
        "the full pool was not reported in the log"
    );

    // Delete returns everything the big volume held.
    let held = node.inspect("big")["allocated_bytes"].as_u64().unwrap();
    node.cli_ok(&["volume", "unmount", "big", &mnt_s]);
    node.cli_ok(&["volume", "rm", "big"]);
    let after = node.pool_allocated();
    let keep_alloc = node.inspect("keep")["allocated_bytes"].as_u64().unwrap();
    assert_eq!(
        after, keep_alloc,
        "after deleting 'big' ({held} bytes) the pool still holds more than 'keep'"
    );
    // The freed space is usable again.
    sh_ok(&format!(
        "dd if=/dev/urandom of={}/more bs=1M count=64 oflag=direct conv=fsync status=none",
        keep_mnt.display()
    ));
    verify_manifest(&keep_mnt, &keep);
    node.cli_ok(&["volume", "unmount", "keep", &keep_mnt.to_string_lossy()]);
}
