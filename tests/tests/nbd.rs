//! The NBD export checked with qemu's real clients: content identical to the
//! mounted filesystem's block device, writes visible on the next attach,
//! writers refused while the volume is attached.

use cairn_tests::*;

#[test]
fn nbd_matches_block_device_and_writes_persist() {
    let tcp = format!("127.0.0.1:{}", free_port());
    let node = TestNode::start_with("nbd", "2GiB", &["--nbd-listen", &tcp]);
    node.cli_ok(&["volume", "create", "vm", "--size", "512MiB"]);
    let url = node.nbd_url("vm");

    let info = sh_ok(&format!("qemu-img info --output=json '{url}'"));
    let info: serde_json::Value = serde_json::from_str(&info).expect("qemu-img json");
    assert_eq!(info["virtual-size"], 512u64 << 20, "{info}");

    // Write through the mounted filesystem, then compare the block device
    // with the NBD export while the volume stays attached (NBD read-only).
    let mnt = node.path("m");
    let mnt_s = mnt.to_string_lossy().into_owned();
    let v: serde_json::Value =
        serde_json::from_str(&node.cli_ok(&["-o", "json", "volume", "mount", "vm", &mnt_s]))
            .expect("json");
    let dev = v["device"].as_str().expect("device").to_string();
    write_manifest(&mnt, 8, 4 << 20, 77);
    sh_ok("sync");
    sh_ok(&format!("blockdev --flushbufs {dev}"));
    let out = sh_ok(&format!("qemu-img compare -f raw -F raw {dev} '{url}'"));
    assert!(out.contains("Images are identical"), "{out}");

    // A writer is refused while the volume is attached.
    let o = sh(&format!("qemu-io -f raw -c 'write -P 0x11 0 64k' '{url}'"));
    let text = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && text.contains("Permission denied"),
        "write over NBD while attached was accepted: {text}"
    );
    node.cli_ok(&["volume", "unmount", "vm", &mnt_s]);

    // Detached: qemu-io writes through NBD, visible on the next attach.
    sh_ok(&format!(
        "qemu-io -f raw -c 'write -P 0xab 1M 2M' -c 'write -P 0xcd 300M 4k' -c flush '{url}'"
    ));
    sh_ok(&format!(
        "qemu-io -f raw -c 'read -P 0xab 1M 2M' -c 'read -P 0xcd 300M 4k' '{url}'"
    ));
    // Unaligned I/O goes through read-modify-write.
    sh_ok(&format!("qemu-io -f raw -c 'write -P 0x5a 1000 3000' -c 'read -P 0x5a 1000 3000' -c 'read -P 0xab 1048576 512' '{url}'"));
    let dev = node.cli_ok(&["volume", "attach", "vm"]).trim().to_string();
    let check = |off: u64, len: usize, byte: u8| {
        let data = sh(&format!(
            "dd if={dev} bs=4096 skip={} count={} iflag=direct status=none",
            off / 4096,
            len / 4096
        ))
        .stdout;
        assert_eq!(data.len(), len);
        assert!(
            data.iter().all(|b| *b == byte),
            "device bytes at {off} are not {byte:#x}"
        );
    };
    check(1 << 20, 2 << 20, 0xab);
    check(300 << 20, 4096, 0xcd);
    node.cli_ok(&["volume", "detach", "vm"]);

    // qemu-img convert into the export, then compare with the source.
    let src = node.path("src.raw");
    sh_ok(&format!(
        "dd if=/dev/urandom of={} bs=1M count=512 status=none",
        src.display()
    ));
    sh_ok(&format!(
        "qemu-img convert -n -f raw -O raw {} '{url}'",
        src.display()
    ));
    let out = sh_ok(&format!(
        "qemu-img compare -f raw -F raw {} '{url}'",
        src.display()
    ));
    assert!(out.contains("Images are identical"), "{out}");

    // TRIM over NBD returns space.
    let before = node.inspect("vm")["allocated_bytes"].as_u64().unwrap();
    sh_ok(&format!("qemu-io -f raw -c 'discard 0 256M' '{url}'"));
    let after = node.inspect("vm")["allocated_bytes"].as_u64().unwrap();
    assert_eq!(
        before - after,
        256 << 20,
        "discarding 256 MiB freed {} bytes",
        before - after
    );
    sh_ok(&format!("qemu-io -f raw -c 'read -P 0 0 256M' '{url}'"));

    // While an NBD client holds the volume open for writing, attach is refused.
    let mut holder = std::process::Command::new("qemu-io")
        .args(["-f", "raw", &url])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("qemu-io");
    {
        use std::io::{BufRead, Write};
        let stdin = holder.stdin.as_mut().unwrap();
        stdin.write_all(b"write -P 0x22 0 4k\n").unwrap();
        stdin.flush().unwrap();
        // The write's report proves the writer connection is open.
        let mut out = std::io::BufReader::new(holder.stdout.take().unwrap());
        let mut line = String::new();
        while !line.contains("wrote 4096/4096") {
            line.clear();
            assert!(
                out.read_line(&mut line).unwrap() > 0,
                "qemu-io ended before writing"
            );
        }
    }
    let o = node.cli(&["volume", "attach", "vm"]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        !o.status.success() && err.contains("VolumeInUse") && err.contains("NBD"),
        "{err}"
    );
    let o = node.cli(&["volume", "rm", "vm", "--force"]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        !o.status.success() && err.contains("VolumeInUse"),
        "delete while an NBD client is connected: {err}"
    );
    drop(holder.stdin.take());
    holder.wait().expect("qemu-io exit");
    wait_for(
        "attach after the NBD writer left",
        std::time::Duration::from_secs(10),
        || node.cli(&["volume", "attach", "vm"]).status.success(),
    );
    node.cli_ok(&["volume", "detach", "vm"]);

    // Metrics count the I/O per volume and report the pool.
    let r = cairn_node::cli::client::Client::new(&node.api_url())
        .unwrap()
        .request("GET", "/metrics", None)
        .unwrap();
    let text = String::from_utf8(r.body).unwrap();
    let metric = |name: &str| -> u64 {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from /metrics:\n{text}"))
    };
    assert!(metric("cairn_volume_write_bytes_total{volume=\"vm\"}") >= 512 << 20);
    assert!(metric("cairn_volume_reads_total{volume=\"vm\"}") > 0);
    assert!(metric("cairn_volume_write_latency_seconds_count{volume=\"vm\"}") > 0);
    assert!(metric("cairn_pool_capacity_bytes") > 0);
    assert_eq!(metric("cairn_pool_allocated_bytes"), node.pool_allocated());

    // Listing exports, and the TCP listener.
    node.cli_ok(&["volume", "create", "other", "--size", "4MiB"]);
    let list = sh_ok(&format!("qemu-nbd -L -k {}", node.nbd_socket().display()));
    assert!(
        list.contains("export=\"vm\"") || list.contains("vm"),
        "{list}"
    );
    assert!(list.contains("other"), "{list}");
    sh_ok(&format!(
        "qemu-io -f raw -r -c 'read -P 0 1M 255M' -c 'read -P 0x22 0 4k' 'nbd://{tcp}/vm'"
    ));

    // Unknown export: a clear refusal.
    let o = sh(&format!("qemu-img info '{}'", node.nbd_url("nope")));
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("not found"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // The daemon kept serving throughout.
    assert_eq!(node.api("GET", "/v1/node", None).0, 200);
}
