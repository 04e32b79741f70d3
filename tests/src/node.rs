//! [`TestNode`]: one real `cairn` daemon with its own directory, ports and
//! file-backed pool; stopped and cleaned up on drop.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use cairn_node::cli::client::Client;
use serde_json::Value;

use crate::{cairn_bin, cleanup_dir, free_port_on, test_root};

static COUNTER: AtomicU32 = AtomicU32::new(0);

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
