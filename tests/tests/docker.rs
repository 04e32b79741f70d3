//! The Docker volume plugin against a real Docker engine (started by
//! `scripts/test`): volumes created with `docker volume create -d`, used by
//! containers of a locally imported busybox image, shared by two
//! containers, refused with clear errors on bad input. Each test uses its
//! own driver name (its own socket under /run/docker/plugins) and removes
//! every container, volume and image it created.

// Test code: an unwrap that fails is a failed test.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Output};
use std::time::Duration;

use cairn_tests::*;

fn docker(args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .output()
        .expect("docker CLI")
}

fn docker_ok(args: &[&str]) -> String {
    let o = docker(args);
    assert!(
        o.status.success(),
        "docker {args:?} failed: {}{}\nplugin sockets: {:?}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
        std::fs::read_dir("/run/docker/plugins")
            .map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
            .unwrap_or_default()
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn docker_err(args: &[&str]) -> String {
    let o = docker(args);
    assert!(!o.status.success(), "docker {args:?} succeeded");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Removes what a test made in Docker, even when it fails.
struct DockerThings {
    image: String,
    containers: Vec<String>,
    volumes: Vec<String>,
}

impl Drop for DockerThings {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = docker(&["rm", "-f", c]);
        }
        for v in &self.volumes {
            let _ = docker(&["volume", "rm", "-f", v]);
        }
        let _ = docker(&["rmi", "-f", &self.image]);
    }
}

impl DockerThings {
    /// `docker volume rm` that must succeed. The volume leaves the cleanup
    /// list: removing a volume dockerd no longer knows makes it ask every
    /// volume driver it ever saw, and each one whose daemon is gone costs
    /// ~15 s of retries.
    fn rm_volume(&mut self, vol: &str) {
        docker_ok(&["volume", "rm", vol]);
        self.volumes.retain(|v| v != vol);
    }

    /// `docker volume create -d DRIVER --opt size=SIZE DRIVER-SUFFIX`,
    /// removed again at the end; returns the name.
    fn volume(&mut self, driver: &str, suffix: &str, size: &str) -> String {
        let vol = format!("{driver}-{suffix}");
        self.volumes.push(vol.clone());
        let opt = format!("size={size}");
        docker_ok(&["volume", "create", "-d", driver, "--opt", &opt, &vol]);
        vol
    }
}

/// Imports a busybox-static root filesystem as an image (no registry).
fn import_image(node: &TestNode, tag: &str) {
    let root = node.dir.join("rootfs");
    std::fs::create_dir_all(root.join("bin")).expect("rootfs");
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static");
    for c in [
        "sh",
        "dd",
        "sha256sum",
        "sync",
        "cat",
        "sleep",
        "wc",
        "ls",
        "date",
        "test",
    ] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(c)).expect("symlink");
    }
    let tar = node.dir.join("rootfs.tar");
    let st = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .expect("tar");
    assert!(st.success());
    docker_ok(&["import", tar.to_str().unwrap(), tag]);
}

/// One Docker test at a time: dockerd's plugin handling (a managed plugin
/// being enabled or removed while another test's legacy driver is looked
/// up) is shared state these tests should not race on.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn setup(tag: &str) -> (TestNode, String, DockerThings) {
    let unique = format!("cairn-{tag}-{}", std::process::id());
    let socket = format!("/run/docker/plugins/{unique}.sock");
    let node = TestNode::start_with(tag, "2GiB", &["--docker-plugin-socket", &socket]);
    // dockerd finds the driver by this file.
    assert!(
        std::path::Path::new(&socket).exists(),
        "{socket} missing after start"
    );
    let image = format!("{unique}-busybox:1");
    let things = DockerThings {
        image: image.clone(),
        containers: Vec::new(),
        volumes: Vec::new(),
    };
    import_image(&node, &image);
    (node, unique, things)
}

fn allocated(node: &TestNode) -> u64 {
    node.api("GET", "/v1/pool", None).1["allocated_bytes"]
        .as_u64()
        .expect("allocated")
}

#[test]
fn containers_write_and_read_a_cairn_volume() {
    let _one = serial();
    let (node, driver, mut things) = setup("dk1");
    let vol = things.volume(&driver, "data", "1GiB");
    let ls = docker_ok(&["volume", "ls", "--format", "{{.Driver}} {{.Name}}"]);
    assert!(ls.contains(&format!("{driver} {vol}")), "{ls}");
    let inspect = docker_ok(&["volume", "inspect", &vol]);
    assert!(inspect.contains("\"size_bytes\": 1073741824"), "{inspect}");
    assert!(inspect.contains("\"replicas\""), "{inspect}");

    // One container writes 100 MiB with a checksum; the next verifies it.
    let image = things.image.clone();
    let mount = format!("{vol}:/data");
    docker_ok(&[
        "run", "--rm", "--network", "none", "-v", &mount, &image, "sh", "-c",
        "dd if=/dev/urandom of=/data/blob bs=1M count=100 2>/dev/null && sha256sum /data/blob > /data/blob.sha && sync",
    ]);
    let out = docker_ok(&[
        "run",
        "--rm",
        "--network",
        "none",
        "-v",
        &mount,
        &image,
        "sha256sum",
        "-c",
        "/data/blob.sha",
    ]);
    assert!(out.contains("OK"), "{out}");
    // Detached again once no container uses it.
    let (_, v) = node.api("GET", &format!("/v1/volumes/{vol}"), None);
    assert_eq!(v["state"], "detached", "{v}");
    let used = allocated(&node);
    assert!(used >= 100 << 20, "pool usage {used} after writing 100 MiB");

    // A volume created by the CLI is usable from Docker.
    let cli_vol = format!("{driver}-cli");
    things.volumes.push(cli_vol.clone());
    node.cli_ok(&["volume", "create", &cli_vol, "--size", "256MiB"]);
    let cli_mount = format!("{cli_vol}:/data");
    docker_ok(&[
        "run",
        "--rm",
        "--network",
        "none",
        "--volume-driver",
        &driver,
        "-v",
        &cli_mount,
        &image,
        "sh",
        "-c",
        "echo hi > /data/x && cat /data/x",
    ]);

    things.rm_volume(&vol);
    things.rm_volume(&cli_vol);
    wait_for(
        "space returned after docker volume rm",
        Duration::from_secs(10),
        || allocated(&node) < 16 << 20,
    );
    assert!(!names(&node).contains(&vol));
}

#[test]
fn two_containers_share_a_volume_and_bad_requests_change_nothing() {
    let _one = serial();
    let (node, driver, mut things) = setup("dk2");
    let vol = things.volume(&driver, "shared", "512MiB");
    let image = things.image.clone();
    let mount = format!("{vol}:/data");
    for c in ["a", "b"] {
        let name = format!("{driver}-{c}");
        things.containers.push(name.clone());
        let script = format!("while true; do date >> /data/{c}; sync; sleep 0.1; done");
        docker_ok(&[
            "run",
            "-d",
            "--name",
            &name,
            "--network",
            "none",
            "-v",
            &mount,
            &image,
            "sh",
            "-c",
            &script,
        ]);
    }
    let lines = |c: &str| -> usize {
        let o = docker(&[
            "exec",
            &format!("{driver}-b"),
            "sh",
            "-c",
            &format!("cat /data/{c} | wc -l"),
        ]);
        String::from_utf8_lossy(&o.stdout)
            .trim()
            .parse()
            .unwrap_or(0)
    };
    wait_for("both containers writing", Duration::from_secs(20), || {
        lines("a") > 2 && lines("b") > 2
    });
    // Removing a volume in use is refused.
    let err = docker_err(&["volume", "rm", &vol]);
    assert!(err.contains("in use"), "{err}");
    // Stopping one keeps the other's data path working.
    docker_ok(&["rm", "-f", &format!("{driver}-a")]);
    let before = lines("b");
    wait_for(
        "the second container keeps writing",
        Duration::from_secs(20),
        || lines("b") > before + 3,
    );
    let (_, v) = node.api("GET", &format!("/v1/volumes/{vol}"), None);
    assert_eq!(v["state"], "mounted", "{v}");
    docker_ok(&["rm", "-f", &format!("{driver}-b")]);
    wait_for(
        "the last container's unmount detaches",
        Duration::from_secs(20),
        || node.api("GET", &format!("/v1/volumes/{vol}"), None).1["state"] == "detached",
    );

    // Bad options and duplicates: a clear error through docker, no change.
    let before = names(&node);
    for (opt, expect) in [
        ("size=abc", "size"),
        ("size=0", "size"),
        ("replicas=9", "replicas"),
        ("colour=red", "unknown option \"colour\""),
        ("fs=btrfs", "fs"),
    ] {
        let name = format!("{driver}-bad");
        let err = docker_err(&["volume", "create", "-d", &driver, "--opt", opt, &name]);
        assert!(err.contains(expect), "--opt {opt}: {err}");
        assert_eq!(names(&node), before, "--opt {opt} changed the volume list");
    }
    let dup = format!("{driver}-dup");
    node.cli_ok(&["volume", "create", &dup, "--size", "64MiB"]);
    things.volumes.push(dup.clone());
    // dockerd answers a create of a name its driver already lists by
    // returning that volume (Docker's own idempotence; the driver's Create
    // is not called): whatever it answers, the volume must not change.
    let o = docker(&[
        "volume",
        "create",
        "-d",
        &driver,
        "--opt",
        "size=128MiB",
        &dup,
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() || err.contains("already exists"),
        "{err}"
    );
    let (_, v) = node.api("GET", &format!("/v1/volumes/{dup}"), None);
    assert_eq!(
        v["size_bytes"],
        64 << 20,
        "the duplicate create changed the volume"
    );
}

#[test]
fn the_managed_plugin_serves_volumes() {
    let _one = serial();
    let node = TestNode::prepare("dkm", "127.0.0.1", "64MiB", &[]);
    let unique = format!("cairn-test/cairn:{}", std::process::id());
    let image = format!("cairn-dkm-{}-busybox:1", std::process::id());
    let vol = format!("cairn-dkm-{}", std::process::id());
    /// Disables and removes the plugin (after the volume), even on failure.
    struct Plugin(String, String);
    impl Drop for Plugin {
        fn drop(&mut self) {
            let _ = docker(&["volume", "rm", "-f", &self.1]);
            let _ = docker(&["plugin", "disable", "-f", &self.0]);
            let _ = docker(&["plugin", "rm", "-f", &self.0]);
        }
    }
    let things = DockerThings {
        image: image.clone(),
        containers: Vec::new(),
        volumes: Vec::new(),
    };
    import_image(&node, &image);
    let pkg = node.dir.join("plugin");
    let data = node.dir.join("plugin-data");
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/docker-plugin/build.sh");
    let st = Command::new(script)
        .arg(&pkg)
        .env("CAIRN_BIN", cairn_bin())
        .env("CAIRN_PLUGIN_DATA", &data)
        .status()
        .expect("build.sh");
    assert!(st.success(), "deploy/docker-plugin/build.sh failed");
    let _plugin = Plugin(unique.clone(), vol.clone());
    docker_ok(&["plugin", "create", &unique, pkg.to_str().unwrap()]);
    docker_ok(&[
        "plugin",
        "set",
        &unique,
        &format!("data.source={}", data.display()),
        "CAIRN_LISTEN=127.0.0.121:7400",
        "CAIRN_PEER_LISTEN=127.0.0.121:7410",
        "CAIRN_DISK_FILES=/var/lib/cairn/pool.img:1GiB",
    ]);
    docker_ok(&["plugin", "enable", &unique]);
    docker_ok(&[
        "volume",
        "create",
        "-d",
        &unique,
        "--opt",
        "size=256MiB",
        &vol,
    ]);
    let mount = format!("{vol}:/data");
    docker_ok(&[
        "run",
        "--rm",
        "--network",
        "none",
        "-v",
        &mount,
        &image,
        "sh",
        "-c",
        "echo managed > /data/x && sync",
    ]);
    let out = docker_ok(&[
        "run",
        "--rm",
        "--network",
        "none",
        "-v",
        &mount,
        &image,
        "cat",
        "/data/x",
    ]);
    assert_eq!(out.trim(), "managed");
    drop(things);
}

#[test]
fn a_daemon_crash_keeps_running_containers_working() {
    let _one = serial();
    let (mut node, driver, mut things) = setup("dk3");
    let vol = things.volume(&driver, "crash", "256MiB");
    let image = things.image.clone();
    let mount = format!("{vol}:/data");
    let name = format!("{driver}-w");
    things.containers.push(name.clone());
    docker_ok(&[
        "run",
        "-d",
        "--name",
        &name,
        "--network",
        "none",
        "-v",
        &mount,
        &image,
        "sh",
        "-c",
        "i=0; while true; do echo $i >> /data/log; sync; i=$((i+1)); sleep 0.1; done",
    ]);
    let lines = || -> usize {
        let o = docker(&["exec", &name, "sh", "-c", "cat /data/log | wc -l"]);
        String::from_utf8_lossy(&o.stdout)
            .trim()
            .parse()
            .unwrap_or(0)
    };
    wait_for("the container writing", Duration::from_secs(20), || {
        lines() > 3
    });

    node.kill9();
    node.restart();
    let after = lines();
    wait_for(
        "the container's writes after the restart",
        Duration::from_secs(60),
        || lines() > after + 5,
    );
    let written = lines();
    docker_ok(&["rm", "-f", &name]);
    wait_for(
        "the last container's unmount detaches",
        Duration::from_secs(20),
        || node.api("GET", &format!("/v1/volumes/{vol}"), None).1["state"] == "detached",
    );
    let out = docker_ok(&[
        "run",
        "--rm",
        "--network",
        "none",
        "-v",
        &mount,
        &image,
        "sh",
        "-c",
        "cat /data/log | wc -l",
    ]);
    let read: usize = out.trim().parse().expect("line count");
    assert!(
        read >= written,
        "a later container read {read} lines, {written} were written"
    );
    assert_eq!(
        node.api("GET", &format!("/v1/volumes/{vol}"), None).1["state"],
        "detached",
        "a mount reference leaked"
    );
}

#[test]
fn a_volume_created_from_a_snapshot_holds_the_snapshots_data_in_a_container() {
    let _one = serial();
    let (node, driver, mut things) = setup("dkc");
    let vol = things.volume(&driver, "src", "256MiB");
    let image = things.image.clone();
    let run = |vol: &str, cmd: &str| {
        let mount = format!("{vol}:/data");
        docker_ok(&[
            "run",
            "--rm",
            "--network",
            "none",
            "-v",
            &mount,
            &image,
            "sh",
            "-c",
            cmd,
        ])
    };
    run(&vol, "echo before > /data/x && sync");
    node.cli_ok(&["snapshot", "create", &vol, "s"]);
    run(&vol, "echo after > /data/x && sync");

    let from_snap = format!("{driver}-fromsnap");
    things.volumes.push(from_snap.clone());
    let opt = format!("from-snapshot={vol}@s");
    docker_ok(&["volume", "create", "-d", &driver, "--opt", &opt, &from_snap]);
    assert_eq!(run(&from_snap, "cat /data/x").trim(), "before");
    let from_vol = format!("{driver}-fromvol");
    things.volumes.push(from_vol.clone());
    let opt = format!("from-volume={vol}");
    docker_ok(&["volume", "create", "-d", &driver, "--opt", &opt, &from_vol]);
    assert_eq!(run(&from_vol, "cat /data/x").trim(), "after");
    // Each is its own volume.
    run(&from_snap, "echo clone > /data/x && sync");
    assert_eq!(run(&vol, "cat /data/x").trim(), "after");
    assert_eq!(run(&from_snap, "cat /data/x").trim(), "clone");

    // Bad options: a clear error, no volume.
    let before = names(&node);
    for (opt, expect) in [
        (format!("from-snapshot={vol}"), "VOLUME@SNAPSHOT"),
        (format!("from-snapshot={vol}@nope"), "nope"),
        ("from-volume=nope".to_string(), "nope"),
    ] {
        let name = format!("{driver}-bad");
        let err = docker_err(&["volume", "create", "-d", &driver, "--opt", &opt, &name]);
        assert!(err.contains(expect), "--opt {opt}: {err}");
        assert_eq!(names(&node), before, "--opt {opt} changed the volume list");
    }
    let name = format!("{driver}-bad");
    let opt = format!("from-snapshot={vol}@s");
    let err = docker_err(&[
        "volume", "create", "-d", &driver, "--opt", &opt, "--opt", "fs=xfs", &name,
    ]);
    assert!(err.contains("filesystem"), "{err}");
    wait_for("the clones filled", Duration::from_secs(60), || {
        [&from_snap, &from_vol]
            .iter()
            .all(|v| node.inspect(v)["origin"]["filling"] == serde_json::json!([]))
    });
    things.rm_volume(&from_snap);
    things.rm_volume(&from_vol);
    node.cli_ok(&["snapshot", "rm", &format!("{vol}@s")]);
}
