//! `cairn dev up` / `cairn dev down`: a local cluster of real daemons on
//! 127.0.0.x loopback addresses, each with its own data directory and
//! file-backed pool under one directory. The integration tests start daemons
//! the same way.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::client::Client;

const API_PORT: u16 = 7400;
const PEER_PORT: u16 = 7410;

fn node_ip(i: usize) -> String {
    format!("127.0.0.{}", 10 + i)
}

fn alive(pid: i32) -> bool {
    // A zombie (our own exited child) still has a /proc entry; check its state.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|rest| !rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

pub fn up(nodes: usize, dir: &Path, disk_size: &str) -> Result<(), String> {
    if !(1..=9).contains(&nodes) {
        return Err(format!("--nodes {nodes}: between 1 and 9"));
    }
    if dir.join("n1").exists() {
        return Err(format!(
            "{} already holds a dev cluster; run `cairn dev down --dir {}` first",
            dir.display(),
            dir.display()
        ));
    }
    let exe = std::env::current_exe().map_err(|e| format!("own executable: {e}"))?;
    for i in 1..=nodes {
        let ndir = dir.join(format!("n{i}"));
        std::fs::create_dir_all(&ndir).map_err(|e| format!("{}: {e}", ndir.display()))?;
        let ip = node_ip(i);
        let log = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(ndir.join("log"))
                .map_err(|e| e.to_string())?
        };
        let mut cmd = Command::new(&exe);
        cmd.args(["node", "run", "--data-dir"])
            .arg(ndir.join("data"))
            .arg("--disk-file")
            .arg(format!("{}:{disk_size}", ndir.join("disk.img").display()))
            .args([
                "--listen",
                &format!("{ip}:{API_PORT}"),
                "--peer-listen",
                &format!("{ip}:{PEER_PORT}"),
            ])
            .args(["--node-name", &format!("n{i}")])
            .arg("--docker-plugin-socket")
            .arg(ndir.join("docker.sock"));
        if i > 1 {
            cmd.args(["--join", &format!("{}:{PEER_PORT}", node_ip(1))]);
        }
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting n{i}: {e}"))?;
        std::fs::write(ndir.join("pid"), child.id().to_string()).map_err(|e| e.to_string())?;
        let url = format!("http://{ip}:{API_PORT}");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if Client::new(&url)
                .and_then(|c| c.request("GET", "/v1/node", None))
                .is_ok_and(|r| r.status == 200)
            {
                break;
            }
            if !alive(child.id() as i32) || Instant::now() > deadline {
                return Err(format!(
                    "n{i} did not start; see {}",
                    ndir.join("log").display()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        println!(
            "n{i}  api http://{ip}:{API_PORT}  peer {ip}:{PEER_PORT}  data {}",
            ndir.display()
        );
    }
    println!(
        "\nexport CAIRN_API=http://{}:{API_PORT}    # any node answers",
        node_ip(1)
    );
    println!(
        "cairn cluster status; cairn dev down --dir {}",
        dir.display()
    );
    Ok(())
}

pub fn down(dir: &Path) -> Result<(), String> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("pid").exists())
        .collect();
    dirs.sort();
    for ndir in &dirs {
        let pid: i32 = std::fs::read_to_string(ndir.join("pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        if pid <= 0 || !alive(pid) {
            continue;
        }
        // Only a process started from this directory is ours to stop.
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if !String::from_utf8_lossy(&cmdline).contains(&*ndir.to_string_lossy()) {
            continue;
        }
        // SAFETY: kill(2) on a process this dev cluster started.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(60);
        while alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if alive(pid) {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        println!("stopped {}", ndir.display());
    }
    for ndir in &dirs {
        crate::volume::mount::cleanup_stale(&ndir.join("data").join("fuse"));
    }
    std::fs::remove_dir_all(dir).map_err(|e| format!("removing {}: {e}", dir.display()))?;
    println!("removed {}", dir.display());
    Ok(())
}
