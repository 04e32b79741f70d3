//! Cleaning up after a node, and the FUSE holders it may leave.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{cairn_bin, test_root, wait_for, TestNode};

/// Removes the kernel state under `dir` (mounts deepest first, loop devices
/// backed by files under it) and then the directory itself. Retries until
/// nothing is left (bounded); what it could not remove is written, with the
/// errors seen, to `$CAIRN_TEST_ROOT/leftover-<dir name>.txt` (the test
/// script prints those files when its final check finds anything).
pub fn cleanup_dir(dir: &Path) {
    // The daemon's FUSE holder first, and until it is gone: without it a
    // dead daemon's FUSE connection is aborted and nothing below can hang
    // on it.
    let holders = kill_holders(dir);
    let gone = |pid: &i32| !Path::new(&format!("/proc/{pid}")).exists() || is_zombie(*pid);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !holders.iter().all(gone) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut errors: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        // Loop devices first, while their backing files still resolve
        // under `dir` (after the FUSE mount is gone they would not).
        let loops = cairn_node::sys::loopdev::devices_backed_under(dir);
        for (dev, _) in &loops {
            let src = dev.to_string_lossy().into_owned();
            for m in cairn_node::sys::mount::mounts()
                .into_iter()
                .filter(|m| m.source == src)
            {
                if let Err(e) = cairn_node::sys::mount::umount(&m.mount_point, libc::MNT_DETACH) {
                    errors.push(format!("umount {}: {e}", m.mount_point.display()));
                }
            }
        }
        for (dev, _) in &loops {
            if let Err(e) = cairn_node::sys::loopdev::detach(dev) {
                errors.push(format!("detach {}: {e}", dev.display()));
            }
        }
        let mut mounts: Vec<PathBuf> = cairn_node::sys::mount::mounts()
            .into_iter()
            .map(|m| m.mount_point)
            .filter(|m| m.starts_with(dir))
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
        for m in &mounts {
            if let Err(e) = cairn_node::sys::mount::umount(m, libc::MNT_DETACH) {
                errors.push(format!("umount {}: {e}", m.display()));
            }
        }
        let left_mounts: Vec<String> = cairn_node::sys::mount::mounts()
            .into_iter()
            .filter(|m| m.mount_point.starts_with(dir))
            .map(|m| format!("mount {} ({})", m.mount_point.display(), m.fstype))
            .collect();
        // A detach the kernel deferred to the last close shows the device
        // bound still; it goes when its user does.
        let left_loops: Vec<String> = cairn_node::sys::loopdev::devices_backed_under(dir)
            .into_iter()
            .map(|(d, b)| format!("loop {} -> {}", d.display(), b.display()))
            .collect();
        if left_mounts.is_empty() && left_loops.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            let name = dir.file_name().map(|n| n.to_string_lossy().into_owned());
            let report = format!(
                "cleanup of {} left:\n{}\n{}\nerrors:\n{}\nholders killed: {holders:?}\n",
                dir.display(),
                left_mounts.join("\n"),
                left_loops.join("\n"),
                errors.join("\n")
            );
            eprintln!("{report}");
            if let Some(name) = name {
                let _ = std::fs::write(test_root().join(format!("leftover-{name}.txt")), report);
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = std::fs::remove_dir_all(dir);
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.starts_with('Z')))
        .unwrap_or(true)
}

/// The live `cairn fuse-holder` processes serving a socket under `dir`.
pub fn holders(dir: &Path) -> Vec<i32> {
    let mut found = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return found;
    };
    let want = dir.to_string_lossy().into_owned();
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let cmd = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains("fuse-holder") && cmd.contains(&want) && !is_zombie(pid) {
            found.push(pid);
        }
    }
    found
}

/// SIGKILLs `cairn fuse-holder` processes serving a socket under `dir`;
/// returns their pids.
pub fn kill_holders(dir: &Path) -> Vec<i32> {
    let killed = holders(dir);
    for pid in &killed {
        // SAFETY: kill(2) on a holder of a daemon this test started.
        unsafe { libc::kill(*pid, libc::SIGKILL) };
    }
    killed
}

/// Starts a standby `cairn fuse-holder` for the (prepared, not yet
/// started) `node`, as a Kubernetes sidecar would run, and waits until it
/// listens. The caller kills it after the node is gone.
pub fn start_standby_holder(node: &TestNode) -> Child {
    let data = node.dir.join("data");
    std::fs::create_dir_all(&data).expect("data dir");
    let socket = data.join("fuse-holder.sock");
    let holder = Command::new(cairn_bin())
        .arg("fuse-holder")
        .arg("--standby")
        .arg(&socket)
        .arg(data.join("fuse"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the standby holder");
    wait_for(
        "the standby holder's socket",
        Duration::from_secs(10),
        || socket.exists(),
    );
    holder
}
