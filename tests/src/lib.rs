//! Test harness for cross-process tests: [`TestNode`] starts a real `cairn`
//! daemon on 127.0.0.1 with its own data directory and file-backed pool under
//! `$CAIRN_TEST_ROOT` (default `/tmp/cairn-tests`), and on drop stops it and
//! removes everything it created — mounts, loop devices, the FUSE mount, the
//! directory — even when the test failed. It never touches anything outside
//! its own directory.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod cleanup;
mod cluster;
mod data;
pub mod gate;
mod node;

pub use cleanup::*;
pub use cluster::*;
pub use data::*;
pub use node::*;

pub fn cairn_bin() -> PathBuf {
    if let Ok(p) = std::env::var("CAIRN_BIN") {
        return PathBuf::from(p);
    }
    // target/<profile>/deps/<test> -> target/<profile>/cairn
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let bin = dir.join("cairn");
    assert!(
        bin.exists(),
        "{} not built: run `cargo build --bins` first",
        bin.display()
    );
    bin
}

pub fn test_root() -> PathBuf {
    PathBuf::from(std::env::var("CAIRN_TEST_ROOT").unwrap_or_else(|_| "/tmp/cairn-tests".into()))
}

/// Waits for `cond` with a deadline; panics with `what` when it passes.
pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn free_port() -> u16 {
    free_port_on("127.0.0.1")
}

/// A port that is free on `ip` right now.
pub fn free_port_on(ip: &str) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// Runs a shell command; returns its output (no assertion).
pub fn sh(cmd: &str) -> Output {
    Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::null())
        .output()
        .expect("sh")
}

/// Runs a shell command and asserts success; returns stdout.
pub fn sh_ok(cmd: &str) -> String {
    let o = sh(cmd);
    assert!(
        o.status.success(),
        "`{cmd}` failed: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Whether this process may use CAP_SYS_RESOURCE (online ext4 resize needs it).
pub fn has_cap_sys_resource() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << 24) != 0)
}

/// Runs a command that must exit with failure within `timeout`; returns its
/// standard error. Kills it (and panics) if it is still running then.
pub fn expect_failure(mut cmd: Command, timeout: Duration) -> String {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} was expected to fail but still runs after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().expect("stderr"), &mut err)
        .expect("read stderr");
    assert!(!status.success(), "{cmd:?} succeeded");
    err
}
