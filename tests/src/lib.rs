//! Test harness for cross-process tests: [`TestNode`] starts a real `cairn`
//! daemon on 127.0.0.1 with its own data directory and file-backed pool under
//! `$CAIRN_TEST_ROOT` (default `/tmp/cairn-tests`), and on drop stops it and
//! removes everything it created — mounts, loop devices, the FUSE mount, the
//! directory — even when the test failed. It never touches anything outside
//! its own directory.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use cairn_node::cli::client::Client;
use serde_json::Value;

pub mod gate;

static COUNTER: AtomicU32 = AtomicU32::new(0);

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

pub struct TestNode {
    pub dir: PathBuf,
    /// Loopback address the node's API and peer service listen on.
    pub ip: String,
    pub port: u16,
    pub peer_port: u16,
    pub pool_size: String,
    /// Extra `cairn node run` arguments (replacing the default disk file
    /// when they name a disk).
    pub extra_args: Vec<String>,
    child: Option<Child>,
    starts: u32,
}

impl TestNode {
    /// Starts a daemon with a file-backed pool of `pool_size` (e.g. "2GiB").
    pub fn start(tag: &str, pool_size: &str) -> TestNode {
        Self::start_with(tag, pool_size, &[])
    }

    /// Like [`TestNode::start`], with extra daemon arguments.
    pub fn start_with(tag: &str, pool_size: &str, extra_args: &[&str]) -> TestNode {
        Self::start_on(tag, "127.0.0.1", pool_size, extra_args)
    }

    /// A node listening on loopback address `ip` (API and peer service).
    pub fn start_on(tag: &str, ip: &str, pool_size: &str, extra_args: &[&str]) -> TestNode {
        let mut node = Self::prepare(tag, ip, pool_size, extra_args);
        node.spawn();
        node
    }

    /// Creates the node's directory and picks its ports without starting it.
    pub fn prepare(tag: &str, ip: &str, pool_size: &str, extra_args: &[&str]) -> TestNode {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let dir = test_root().join(format!("{tag}-{}-{n}", std::process::id()));
        if dir.exists() {
            cleanup_dir(&dir);
        }
        std::fs::create_dir_all(&dir).expect("test dir");
        let port = free_port_on(ip);
        let peer_port = std::iter::repeat_with(|| free_port_on(ip))
            .find(|p| *p != port)
            .expect("a second port");
        let node = TestNode {
            dir,
            ip: ip.to_string(),
            port,
            peer_port,
            pool_size: pool_size.into(),
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
            child: None,
            starts: 0,
        };
        node
    }

    pub fn peer_address(&self) -> String {
        format!("{}:{}", self.ip, self.peer_port)
    }

    /// Starts the daemon prepared by [`TestNode::prepare`].
    pub fn start_prepared(&mut self) {
        assert!(self.child.is_none(), "already running");
        self.spawn();
    }

    pub fn api_url(&self) -> String {
        format!("http://{}:{}", self.ip, self.port)
    }

    /// Where the node serves the CSI driver.
    pub fn csi_socket(&self) -> PathBuf {
        self.dir.join("csi.sock")
    }

    pub fn nbd_socket(&self) -> PathBuf {
        self.dir.join("data/nbd.sock")
    }

    pub fn nbd_url(&self, volume: &str) -> String {
        format!(
            "nbd+unix:///{volume}?socket={}",
            self.nbd_socket().display()
        )
    }

    /// Programs placed here shadow the system's for this node's daemon
    /// (first on its PATH); see [`gate::Gate`].
    pub fn bin_dir(&self) -> PathBuf {
        self.dir.join("bin")
    }

    pub fn disk_path(&self) -> PathBuf {
        self.dir.join("disk0.img")
    }

    pub fn log(&self) -> String {
        let mut out = String::new();
        for i in 0..self.starts {
            out += &std::fs::read_to_string(self.dir.join(format!("daemon-{i}.log")))
                .unwrap_or_default();
        }
        out
    }

    /// The log of the most recent start only.
    pub fn last_log(&self) -> String {
        std::fs::read_to_string(
            self.dir
                .join(format!("daemon-{}.log", self.starts.saturating_sub(1))),
        )
        .unwrap_or_default()
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.join(format!("daemon-{}.log", self.starts)))
            .expect("log file");
        self.starts += 1;
        let mut cmd = Command::new(cairn_bin());
        cmd.args(["node", "run", "--data-dir"])
            .arg(self.dir.join("data"));
        if !self.extra_args.iter().any(|a| a == "--disk") {
            cmd.arg("--disk-file").arg(format!(
                "{}:{}",
                self.disk_path().display(),
                self.pool_size
            ));
        }
        if !self.extra_args.iter().any(|a| a == "--node-name") {
            cmd.args(["--node-name", "test"]);
        }
        // Never the machine's shared /run/docker/plugins/cairn.sock.
        if !self
            .extra_args
            .iter()
            .any(|a| a == "--docker-plugin-socket")
        {
            cmd.arg("--docker-plugin-socket")
                .arg(self.dir.join("docker.sock"));
        }
        if !self.extra_args.iter().any(|a| a == "--csi-socket") {
            cmd.arg("--csi-socket").arg(self.csi_socket());
        }
        let path = match std::env::var_os("PATH") {
            Some(p) => {
                let mut dirs = vec![self.bin_dir()];
                dirs.extend(std::env::split_paths(&p));
                std::env::join_paths(dirs).expect("PATH")
            }
            None => self.bin_dir().into_os_string(),
        };
        let child = cmd
            .args(&self.extra_args)
            .args([
                "--listen",
                &format!("{}:{}", self.ip, self.port),
                "--peer-listen",
                &format!("{}:{}", self.ip, self.peer_port),
            ])
            .env("CAIRN_LOG", "info")
            .env("PATH", path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn cairn");
        self.child = Some(child);
        let url = self.api_url();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "daemon exited with {status} during start; log:\n{}",
                    self.log()
                );
            }
            if Client::new(&url)
                .and_then(|c| c.request("GET", "/v1/node", None))
                .is_ok_and(|r| r.status == 200)
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not answer within 30 s; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    /// SIGKILL: no chance to clean up anything.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait (bounded) for a graceful exit; returns its status.
    /// A clean exit must have joined every thread the daemon started (its
    /// log says so), whatever the test checks besides.
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(s)) = c.try_wait() {
                let log = self.last_log();
                assert!(
                    !s.success()
                        || (log.contains("every thread the daemon started has ended")
                            && !log.contains("still running")),
                    "the daemon exited without joining its threads:\n{log}"
                );
                return Some(s);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!("daemon ignored SIGTERM for 60 s; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop the daemon first");
        self.spawn();
    }

    /// Raw API call: (status, JSON body or Null).
    pub fn api(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let r = Client::new(&self.api_url())
            .expect("url")
            .request(method, path, body)
            .expect("API reachable");
        let v = if r.body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&r.body).unwrap_or(Value::Null)
        };
        (r.status, v)
    }

    /// Sends raw bytes as a request body (for malformed-JSON tests).
    pub fn api_raw(&self, method: &str, path: &str, body: &[u8]) -> (u16, Value) {
        use std::io::Read;
        let mut s = std::net::TcpStream::connect((self.ip.as_str(), self.port)).expect("connect");
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).expect("send");
        s.write_all(body).expect("send");
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).expect("read");
        let text = String::from_utf8_lossy(&raw).into_owned();
        let status: u16 = text
            .split(' ')
            .nth(1)
            .and_then(|x| x.parse().ok())
            .expect("status");
        let body = text.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
        (status, serde_json::from_str(body).unwrap_or(Value::Null))
    }

    /// Runs the `cairn` CLI against this node.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(cairn_bin())
            .args(args)
            .env("CAIRN_API", self.api_url())
            .stdin(Stdio::null())
            .output()
            .expect("run cairn")
    }

    /// Runs the CLI and asserts success; returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let o = self.cli(args);
        assert!(
            o.status.success(),
            "cairn {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&o.stderr),
            String::from_utf8_lossy(&o.stdout)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    pub fn inspect(&self, name: &str) -> Value {
        let (s, v) = self.api("GET", &format!("/v1/volumes/{name}"), None);
        assert_eq!(s, 200, "inspect {name}: {v}");
        v
    }

    pub fn pool(&self) -> Value {
        let (s, v) = self.api("GET", "/v1/pool", None);
        assert_eq!(s, 200, "{v}");
        v
    }

    pub fn pool_allocated(&self) -> u64 {
        self.pool()["allocated_bytes"]
            .as_u64()
            .expect("allocated_bytes")
    }

    /// A directory under this node's dir (for mount points).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if self.child.is_some() {
            // Graceful first: the daemon unmounts and detaches on SIGTERM.
            if let Some(mut c) = self.child.take() {
                // SAFETY: kill(2) on our own child's pid.
                unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
                let deadline = Instant::now() + Duration::from_secs(30);
                while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        cleanup_dir(&self.dir);
    }
}

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

/// Deterministic pseudo-random bytes (xorshift64*), seeded per call.
pub fn fill_pattern(buf: &mut [u8], seed: u64) {
    let mut x = seed | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

/// The data files written by [`write_manifest`]: name, seed and crc32.
pub struct Manifest {
    pub files: Vec<(String, u64, u32)>,
    pub file_size: usize,
}

/// Writes `files` files of `file_size` bytes of seeded random data under
/// `dir`, fsyncing each and the directory.
pub fn write_manifest(dir: &Path, files: usize, file_size: usize, seed: u64) -> Manifest {
    let mut buf = vec![0u8; file_size];
    let mut out = Vec::new();
    for i in 0..files {
        let s = seed.wrapping_add(i as u64 * 7919);
        fill_pattern(&mut buf, s);
        let name = format!("data-{seed:x}-{i:04}.bin");
        let mut f = std::fs::File::create(dir.join(&name)).expect("create data file");
        f.write_all(&buf).expect("write data file");
        f.sync_all().expect("fsync data file");
        out.push((name, s, crc32fast::hash(&buf)));
    }
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .expect("fsync dir");
    Manifest {
        files: out,
        file_size,
    }
}

/// Verifies every file of a manifest byte for byte; on a mismatch reports
/// the first differing offset.
pub fn verify_manifest(dir: &Path, m: &Manifest) {
    let mut expect = vec![0u8; m.file_size];
    for (name, seed, crc) in &m.files {
        let data = std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("reading {name}: {e}"));
        assert_eq!(data.len(), m.file_size, "{name} has the wrong length");
        if crc32fast::hash(&data) != *crc {
            fill_pattern(&mut expect, *seed);
            let at = data
                .iter()
                .zip(&expect)
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            let bad = data.iter().zip(&expect).filter(|(a, b)| a != b).count();
            panic!("{name}: content differs from what was written, first at byte {at}, {bad} bytes differ");
        }
    }
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

// ---- clusters -------------------------------------------------------------

pub fn status(n: &TestNode) -> Option<Value> {
    let r = Client::new(&n.api_url())
        .ok()?
        .request("GET", "/v1/cluster", None)
        .ok()?;
    serde_json::from_slice(&r.body).ok()
}

pub fn names(n: &TestNode) -> Vec<String> {
    let (_, v) = n.api("GET", "/v1/volumes", None);
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|x| x["name"].as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Short liveness settings so that `down`/`up` marking is observable.
pub const LIVENESS: [&str; 4] = ["--heartbeat-interval", "500ms", "--node-down-timeout", "3s"];

/// The state (`up`/`down`) of node `name` as `node` reports it.
pub fn node_state(n: &TestNode, name: &str) -> Option<String> {
    let (code, v) = n.api("GET", "/v1/nodes", None);
    if code != 200 {
        return None;
    }
    v.as_array()?
        .iter()
        .find(|x| x["name"] == name)
        .and_then(|x| x["state"].as_str().map(str::to_string))
}

/// Starts a bootstrap node and `n - 1` joiners on 127.0.0.(base+i), with
/// 256 MiB pools and [`LIVENESS`] settings; waits until all agree.
pub fn cluster(tag: &str, n: usize, base: u8) -> Vec<TestNode> {
    cluster_with(tag, &vec!["256MiB"; n], base)
}

/// Like [`cluster`], with one pool size per node.
pub fn cluster_with(tag: &str, pools: &[&str], base: u8) -> Vec<TestNode> {
    cluster_args(tag, pools, base, &[])
}

/// Like [`cluster_with`], with extra daemon arguments for every node.
pub fn cluster_args(tag: &str, pools: &[&str], base: u8, extra: &[&str]) -> Vec<TestNode> {
    let n = pools.len();
    let mut args: Vec<&str> = vec!["--node-name", "n1"];
    args.extend(LIVENESS);
    args.extend(extra);
    let first = TestNode::start_on(
        &format!("{tag}-1"),
        &format!("127.0.0.{base}"),
        pools[0],
        &args,
    );
    let join = first.peer_address();
    let mut nodes = vec![first];
    for i in 2..=n {
        let name = format!("n{i}");
        let mut args: Vec<&str> = vec!["--node-name", &name, "--join", &join];
        args.extend(LIVENESS);
        args.extend(extra);
        let node = TestNode::start_on(
            &format!("{tag}-{i}"),
            &format!("127.0.0.{}", base as usize + i - 1),
            pools[i - 1],
            &args,
        );
        nodes.push(node);
    }
    wait_for(
        "every node to see the same leader and all members",
        Duration::from_secs(30),
        || {
            let all: Vec<Option<Value>> = nodes.iter().map(status).collect();
            let leaders: Vec<_> = all
                .iter()
                .map(|s| s.as_ref().map(|s| s["leader"].clone()))
                .collect();
            all.iter().all(|s| {
                s.as_ref().is_some_and(|s| {
                    s["members"].as_array().map(|m| m.len()) == Some(n) && !s["leader"].is_null()
                })
            }) && leaders.windows(2).all(|w| w[0] == w[1])
        },
    );
    nodes
}

// ---- direct I/O and metrics -------------------------------------------------

/// A 4 KiB-aligned buffer for O_DIRECT I/O.
pub struct DirectBuf {
    ptr: *mut u8,
    len: usize,
}

impl DirectBuf {
    pub fn new(len: usize) -> DirectBuf {
        let layout = std::alloc::Layout::from_size_align(len, 4096).expect("layout");
        // SAFETY: the layout has a non-zero size (callers pass whole blocks).
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "allocation failed");
        DirectBuf { ptr, len }
    }
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len bytes for the buffer's lifetime.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for DirectBuf {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len, 4096).expect("layout");
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, layout) };
    }
}

fn open_direct(path: &Path, write: bool) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_DIRECT)
        .open(path)
}

/// Reads `len` bytes at `offset` bypassing the page cache.
pub fn read_direct(path: &Path, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let f = open_direct(path, false)?;
    let mut buf = DirectBuf::new(len);
    f.read_exact_at(buf.as_mut_slice(), offset)?;
    Ok(buf.as_slice().to_vec())
}

/// Writes `data` at `offset` with O_DIRECT, then fsync.
pub fn write_direct(path: &Path, offset: u64, data: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let f = open_direct(path, true)?;
    let mut buf = DirectBuf::new(data.len());
    buf.as_mut_slice().copy_from_slice(data);
    f.write_all_at(buf.as_slice(), offset)?;
    f.sync_all()
}

/// Writes `data` at `offset` with O_DIRECT and no fsync: acknowledged by
/// the device, not flushed.
pub fn write_direct_unflushed(path: &Path, offset: u64, data: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let f = open_direct(path, true)?;
    let mut buf = DirectBuf::new(data.len());
    buf.as_mut_slice().copy_from_slice(data);
    f.write_all_at(buf.as_slice(), offset)
}

/// The value of one Prometheus sample (`name{labels}`) from a node's /metrics.
pub fn metric(n: &TestNode, series: &str) -> Option<f64> {
    let r = Client::new(&n.api_url())
        .ok()?
        .request("GET", "/metrics", None)
        .ok()?;
    let text = String::from_utf8_lossy(&r.body).into_owned();
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// `(node name, state)` of each replica of `volume`, as `n` reports them.
pub fn replica_states(n: &TestNode, volume: &str) -> Vec<(String, String)> {
    let (code, v) = n.api("GET", &format!("/v1/volumes/{volume}"), None);
    if code != 200 {
        return Vec::new();
    }
    v["replicas"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| {
                    (
                        r["node"].as_str().unwrap_or_default().to_string(),
                        r["state"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}
