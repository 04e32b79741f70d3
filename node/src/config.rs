//! The daemon's configuration: TOML file, then environment, then flags (clap
//! handles env < flag; both override the file). Validated once at start.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::pool::DiskSpec;
use crate::types::ByteSize;

/// Size of the file-backed disk created when no disk is configured.
pub const DEFAULT_DISK_SIZE: u64 = 16 << 30;
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7400";
pub const DEFAULT_PEER_LISTEN: &str = "127.0.0.1:7410";
pub const DEFAULT_DATA_DIR: &str = "cairn-data";

#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// TOML config file (keys as the long flags, with '_' for '-').
    #[arg(long, env = "CAIRN_CONFIG")]
    pub config: Option<PathBuf>,
    /// Directory for metadata, the FUSE mount, sockets and default disks.
    #[arg(long, env = "CAIRN_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// An existing block device to add to the pool (repeatable).
    #[arg(long = "disk", env = "CAIRN_DISKS", value_delimiter = ',')]
    pub disks: Vec<PathBuf>,
    /// A file-backed device PATH:SIZE, created (sparse) if absent (repeatable).
    #[arg(long = "disk-file", env = "CAIRN_DISK_FILES", value_delimiter = ',')]
    pub disk_files: Vec<String>,
    /// Address of the REST admin API.
    #[arg(long, env = "CAIRN_LISTEN")]
    pub listen: Option<String>,
    /// Unix socket of the NBD export (default: DATA_DIR/nbd.sock).
    #[arg(long, env = "CAIRN_NBD_SOCKET")]
    pub nbd_socket: Option<PathBuf>,
    /// Also serve NBD on this TCP address (off by default).
    #[arg(long, env = "CAIRN_NBD_LISTEN")]
    pub nbd_listen: Option<String>,
    /// This node's name (default: the host name).
    #[arg(long, env = "CAIRN_NODE_NAME")]
    pub node_name: Option<String>,
    /// Address for the peer service (Raft, joins, forwarded proposals).
    #[arg(long, env = "CAIRN_PEER_LISTEN")]
    pub peer_listen: Option<String>,
    /// Peer address other nodes use to reach this one (default: --peer-listen).
    #[arg(long, env = "CAIRN_ADVERTISE")]
    pub advertise: Option<String>,
    /// Join the cluster of the node whose peer address this is (first start only).
    #[arg(long, env = "CAIRN_JOIN")]
    pub join: Option<String>,
    /// The cluster id to bootstrap, or to insist on when joining.
    #[arg(long, env = "CAIRN_CLUSTER_ID")]
    pub cluster_id: Option<String>,
    /// Labels describing this node, e.g. zone=a,rack=r1.
    #[arg(long, env = "CAIRN_LABELS")]
    pub labels: Option<String>,
    /// Number of FUSE session threads (default 32, about the queue depth served).
    #[arg(long, env = "CAIRN_FUSE_THREADS")]
    pub fuse_threads: Option<usize>,
    /// How often this node reports liveness and pool usage (e.g. `5s`, `500ms`).
    #[arg(long, env = "CAIRN_HEARTBEAT_INTERVAL")]
    pub heartbeat_interval: Option<String>,
    /// The leader marks a node `down` after this long without a heartbeat.
    #[arg(long, env = "CAIRN_NODE_DOWN_TIMEOUT")]
    pub node_down_timeout: Option<String>,
    /// Serve the Docker volume plugin on this socket (default
    /// `/run/docker/plugins/cairn.sock` when `/run/docker/plugins` exists;
    /// `none` turns it off).
    #[arg(long, env = "CAIRN_DOCKER_PLUGIN_SOCKET")]
    pub docker_plugin_socket: Option<String>,
    /// Where Docker volumes are mounted (default DATA_DIR/docker).
    #[arg(long, env = "CAIRN_DOCKER_MOUNT_DIR")]
    pub docker_mount_dir: Option<PathBuf>,
    /// REST `mount` and `unmount` (and so `cairn volume mount`) accept only
    /// paths below this directory (default: any absolute path). CSI and
    /// Docker mount where their protocols say and are not limited by it.
    #[arg(long, env = "CAIRN_API_MOUNT_ROOT")]
    pub api_mount_root: Option<PathBuf>,
    /// Serve the Kubernetes CSI driver (csi.cairn.dev) on this unix socket
    /// (off when not given).
    #[arg(long, env = "CAIRN_CSI_SOCKET")]
    pub csi_socket: Option<PathBuf>,
    /// Volumes the CSI driver lets one node hold at once (default 256);
    /// give every node the same value.
    #[arg(long, env = "CAIRN_CSI_MAX_VOLUMES")]
    pub csi_max_volumes: Option<u64>,
    /// A replica whose node stays down this long is replaced elsewhere.
    #[arg(long, env = "CAIRN_REPLICA_GRACE_PERIOD")]
    pub replica_grace_period: Option<String>,
    /// Replicas of a volume created without `--replicas` (1 to 3, the
    /// most a volume may have).
    #[arg(long, env = "CAIRN_DEFAULT_REPLICAS")]
    pub default_replicas: Option<u32>,
    /// Copy limit per second of rebuilds and of clone fills, e.g. `200MiB`
    /// (`0`: unlimited).
    #[arg(long, env = "CAIRN_REBUILD_BANDWIDTH")]
    pub rebuild_bandwidth: Option<String>,
    /// How often each volume's replicas are compared by the node serving it
    /// (`7d` by default; `off` turns the periodic scrub off).
    #[arg(long, env = "CAIRN_SCRUB_INTERVAL")]
    pub scrub_interval: Option<String>,
    /// Scrub read limit per second and replica, e.g. `64MiB` (`0`: unlimited).
    #[arg(long, env = "CAIRN_SCRUB_BANDWIDTH")]
    pub scrub_bandwidth: Option<String>,
    /// How long I/O on attached volumes waits for a crashed daemon to come
    /// back before it fails with EIO and mounts can be torn down (default `2m`).
    #[arg(long, env = "CAIRN_ORPHAN_IO_TIMEOUT")]
    pub orphan_io_timeout: Option<String>,
    /// Erase devices that carry other data or another pool's superblock.
    #[arg(long)]
    pub force_format: bool,
    /// Where the kernel's boot id is read (tests stand in a file for a
    /// reboot).
    #[arg(long, hide = true, default_value = "/proc/sys/kernel/random/boot_id")]
    pub boot_id_file: PathBuf,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    #[serde(default)]
    disks: Vec<PathBuf>,
    #[serde(default)]
    disk_files: Vec<String>,
    listen: Option<String>,
    nbd_socket: Option<PathBuf>,
    nbd_listen: Option<String>,
    node_name: Option<String>,
    peer_listen: Option<String>,
    advertise: Option<String>,
    join: Option<String>,
    cluster_id: Option<String>,
    labels: Option<String>,
    fuse_threads: Option<usize>,
    heartbeat_interval: Option<String>,
    node_down_timeout: Option<String>,
    default_replicas: Option<u32>,
    rebuild_bandwidth: Option<String>,
    replica_grace_period: Option<String>,
    docker_plugin_socket: Option<String>,
    docker_mount_dir: Option<PathBuf>,
    api_mount_root: Option<PathBuf>,
    csi_socket: Option<PathBuf>,
    csi_max_volumes: Option<u64>,
    orphan_io_timeout: Option<String>,
    scrub_interval: Option<String>,
    scrub_bandwidth: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub disks: Vec<DiskSpec>,
    pub listen: SocketAddr,
    pub nbd_socket: PathBuf,
    pub nbd_listen: Option<String>,
    pub node_name: String,
    pub peer_listen: SocketAddr,
    pub advertise: String,
    pub join: Option<String>,
    pub cluster_id: Option<crate::types::Id128>,
    pub labels: std::collections::BTreeMap<String, String>,
    pub fuse_threads: usize,
    pub heartbeat_interval: Duration,
    pub node_down_timeout: Duration,
    pub default_replicas: u32,
    pub rebuild_bandwidth: u64,
    pub replica_grace_period: Duration,
    pub docker_plugin_socket: Option<PathBuf>,
    pub docker_mount_dir: PathBuf,
    /// REST mount paths must lie below this (None: any absolute path).
    pub api_mount_root: Option<PathBuf>,
    pub csi_socket: Option<PathBuf>,
    pub csi_max_volumes: u64,
    pub orphan_io_timeout: Duration,
    /// None: no periodic scrub.
    pub scrub_interval: Option<Duration>,
    pub scrub_bandwidth: u64,
    pub force_format: bool,
    pub boot_id_file: PathBuf,
}

/// Parses `500ms`, `5s`, `2m`, `1h`, `7d` (a number and a unit).
pub fn parse_duration(flag: &str, s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{flag} {s:?}: expected a number and a unit, e.g. 500ms, 5s, 2m"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        "d" => Duration::from_secs(n.saturating_mul(86400)),
        _ => {
            return Err(format!(
                "{flag} {s:?}: unknown unit {unit:?}; use ms, s, m, h or d"
            ))
        }
    };
    if d.is_zero() {
        return Err(format!("{flag} {s:?}: must be positive"));
    }
    Ok(d)
}

/// A rate in bytes per second with units (`200MiB`); `0` is unlimited.
fn parse_bandwidth(flag: &str, s: Option<String>, default: u64) -> Result<u64, String> {
    match s {
        None => Ok(default),
        Some(s) if s.trim() == "0" => Ok(0),
        Some(s) => Ok(s
            .parse::<ByteSize>()
            .map_err(|e| format!("{flag} {s:?}: {e}"))?
            .0),
    }
}

fn parse_disk_file(s: &str) -> Result<DiskSpec, String> {
    let (path, size) = s.rsplit_once(':').ok_or_else(|| {
        format!("--disk-file {s:?}: expected PATH:SIZE, e.g. /var/lib/cairn/d0.img:100GiB")
    })?;
    if path.is_empty() {
        return Err(format!("--disk-file {s:?}: the path is empty"));
    }
    let size = size
        .parse::<ByteSize>()
        .map_err(|e| format!("--disk-file {s:?}: {e}"))?
        .0;
    if size < 2 * crate::pool::EXTENT_SIZE {
        return Err(format!("--disk-file {s:?}: size must be at least 2 MiB"));
    }
    Ok(DiskSpec::File(PathBuf::from(path), size))
}

/// Parses `zone=a,rack=r1`: keys and values of 1–63 characters from
/// `[A-Za-z0-9._/-]`, each key once.
pub fn parse_labels(s: &str) -> Result<std::collections::BTreeMap<String, String>, String> {
    let mut out = std::collections::BTreeMap::new();
    let ok = |t: &str| {
        !t.is_empty()
            && t.len() <= 63
            && t.chars()
                .all(|c| c.is_ascii_alphanumeric() || "._/-".contains(c))
    };
    for pair in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| format!("--labels: {pair:?} is not KEY=VALUE"))?;
        if !ok(k) || !ok(v) {
            return Err(format!("--labels: {pair:?}: keys and values are 1-63 characters of letters, digits, '.', '_', '/', '-'"));
        }
        if out.insert(k.to_string(), v.to_string()).is_some() {
            return Err(format!("--labels: key {k:?} is given twice"));
        }
    }
    Ok(out)
}

fn absolute(p: &Path) -> Result<PathBuf, String> {
    if p.is_absolute() {
        Ok(p.to_path_buf())
    } else {
        Ok(std::env::current_dir()
            .map_err(|e| format!("current directory: {e}"))?
            .join(p))
    }
}

impl Config {
    pub fn resolve(mut args: RunArgs) -> Result<Config, String> {
        // An empty value (typically an environment variable declared but
        // not set, as in the Docker plugin's config) means "not given".
        args.disks.retain(|p| !p.as_os_str().is_empty());
        args.disk_files.retain(|s| !s.is_empty());
        for o in [
            &mut args.join,
            &mut args.labels,
            &mut args.cluster_id,
            &mut args.nbd_listen,
            &mut args.advertise,
        ] {
            if o.as_deref().is_some_and(str::is_empty) {
                *o = None;
            }
        }
        let file: FileConfig = match &args.config {
            None => FileConfig::default(),
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| format!("config file {}: {e}", p.display()))?;
                toml::from_str(&text).map_err(|e| format!("config file {}: {e}", p.display()))?
            }
        };
        let data_dir = absolute(
            &args
                .data_dir
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
        )?;
        let block = if args.disks.is_empty() {
            file.disks
        } else {
            args.disks
        };
        let files = if args.disk_files.is_empty() {
            file.disk_files
        } else {
            args.disk_files
        };
        let mut disks: Vec<DiskSpec> = block
            .into_iter()
            .map(|p| absolute(&p).map(DiskSpec::Block))
            .collect::<Result<_, _>>()?;
        for f in files {
            let DiskSpec::File(p, size) = parse_disk_file(&f)? else {
                unreachable!("parse_disk_file returns files")
            };
            disks.push(DiskSpec::File(absolute(&p)?, size));
        }
        if disks.is_empty() {
            disks.push(DiskSpec::File(
                data_dir.join("disks").join("disk0.img"),
                DEFAULT_DISK_SIZE,
            ));
        }
        let listen_s = args
            .listen
            .or(file.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.into());
        let listen: SocketAddr = listen_s
            .parse()
            .map_err(|e| format!("--listen {listen_s:?}: {e}"))?;
        let nbd_socket = absolute(
            &args
                .nbd_socket
                .or(file.nbd_socket)
                .unwrap_or_else(|| data_dir.join("nbd.sock")),
        )?;
        let nbd_listen = args.nbd_listen.or(file.nbd_listen);
        if let Some(a) = &nbd_listen {
            a.parse::<SocketAddr>()
                .map_err(|e| format!("--nbd-listen {a:?}: {e}"))?;
        }
        let node_name = match args.node_name.or(file.node_name) {
            Some(n) => n,
            None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "node".into()),
        };
        let peer_s = args
            .peer_listen
            .or(file.peer_listen)
            .unwrap_or_else(|| DEFAULT_PEER_LISTEN.into());
        let peer_listen: SocketAddr = peer_s
            .parse()
            .map_err(|e| format!("--peer-listen {peer_s:?}: {e}"))?;
        let advertise = args
            .advertise
            .or(file.advertise)
            .unwrap_or_else(|| peer_listen.to_string());
        advertise
            .parse::<SocketAddr>()
            .map_err(|e| format!("--advertise {advertise:?}: {e}"))?;
        let join = args.join.or(file.join);
        if let Some(j) = &join {
            j.parse::<SocketAddr>()
                .map_err(|e| format!("--join {j:?}: {e}"))?;
        }
        let cluster_id = match args.cluster_id.or(file.cluster_id) {
            None => None,
            Some(c) => Some(c.parse().map_err(|e| format!("--cluster-id: {e}"))?),
        };
        let labels = parse_labels(&args.labels.or(file.labels).unwrap_or_default())?;
        let fuse_threads = args.fuse_threads.or(file.fuse_threads).unwrap_or(32);
        if !(1..=256).contains(&fuse_threads) {
            return Err(format!(
                "--fuse-threads {fuse_threads}: must be between 1 and 256"
            ));
        }
        let heartbeat_interval = parse_duration(
            "--heartbeat-interval",
            &args
                .heartbeat_interval
                .or(file.heartbeat_interval)
                .unwrap_or_else(|| "5s".into()),
        )?;
        let node_down_timeout = parse_duration(
            "--node-down-timeout",
            &args
                .node_down_timeout
                .or(file.node_down_timeout)
                .unwrap_or_else(|| "15s".into()),
        )?;
        if node_down_timeout < 2 * heartbeat_interval {
            return Err(format!(
                "--node-down-timeout {node_down_timeout:?} must be at least twice --heartbeat-interval {heartbeat_interval:?}, or live nodes would be marked down"
            ));
        }
        let replica_grace_period = parse_duration(
            "--replica-grace-period",
            &args
                .replica_grace_period
                .or(file.replica_grace_period)
                .unwrap_or_else(|| "5m".into()),
        )?;
        let docker_plugin_socket = match args.docker_plugin_socket.or(file.docker_plugin_socket) {
            Some(s) if s == "none" => None,
            Some(s) if s.is_empty() => {
                return Err("--docker-plugin-socket: give a path, or none to turn it off".into())
            }
            Some(s) => Some(PathBuf::from(s)),
            None => Path::new("/run/docker/plugins")
                .is_dir()
                .then(|| PathBuf::from("/run/docker/plugins/cairn.sock")),
        };
        let csi_socket = args
            .csi_socket
            .or(file.csi_socket)
            .filter(|p| !p.as_os_str().is_empty());
        if csi_socket.as_ref().is_some_and(|p| !p.is_absolute()) {
            return Err("--csi-socket: give an absolute path".into());
        }
        let csi_max_volumes = args.csi_max_volumes.or(file.csi_max_volumes).unwrap_or(256);
        if !(1..=4096).contains(&csi_max_volumes) {
            return Err(format!(
                "--csi-max-volumes {csi_max_volumes}: must be between 1 and 4096"
            ));
        }
        let orphan_io_timeout = parse_duration(
            "--orphan-io-timeout",
            &args
                .orphan_io_timeout
                .or(file.orphan_io_timeout)
                .unwrap_or_else(|| "2m".into()),
        )?;
        let docker_mount_dir = args
            .docker_mount_dir
            .or(file.docker_mount_dir)
            .unwrap_or_else(|| data_dir.join("docker"));
        let api_mount_root = args.api_mount_root.or(file.api_mount_root);
        if let Some(r) = &api_mount_root {
            if !r.is_absolute()
                || r.components()
                    .any(|c| matches!(c, std::path::Component::ParentDir))
            {
                return Err(format!(
                    "--api-mount-root {}: must be an absolute path without '..'",
                    r.display()
                ));
            }
        }
        let default_replicas = args.default_replicas.or(file.default_replicas).unwrap_or(1);
        let max = crate::volume::VolumeManager::MAX_REPLICAS;
        if !(1..=max).contains(&default_replicas) {
            return Err(format!(
                "--default-replicas {default_replicas}: must be between 1 and {max}"
            ));
        }
        let rebuild_bandwidth = parse_bandwidth(
            "--rebuild-bandwidth",
            args.rebuild_bandwidth.or(file.rebuild_bandwidth),
            256 << 20,
        )?;
        let scrub_interval = match args.scrub_interval.or(file.scrub_interval) {
            Some(s) if s.trim() == "off" => None,
            s => Some(parse_duration(
                "--scrub-interval",
                &s.unwrap_or_else(|| "7d".into()),
            )?),
        };
        let scrub_bandwidth = parse_bandwidth(
            "--scrub-bandwidth",
            args.scrub_bandwidth.or(file.scrub_bandwidth),
            64 << 20,
        )?;
        Ok(Config {
            data_dir,
            disks,
            listen,
            nbd_socket,
            nbd_listen,
            node_name,
            peer_listen,
            advertise,
            join,
            cluster_id,
            labels,
            fuse_threads,
            heartbeat_interval,
            node_down_timeout,
            default_replicas,
            rebuild_bandwidth,
            replica_grace_period,
            docker_plugin_socket,
            docker_mount_dir,
            api_mount_root,
            csi_socket,
            csi_max_volumes,
            orphan_io_timeout,
            scrub_interval,
            scrub_bandwidth,
            force_format: args.force_format,
            boot_id_file: args.boot_id_file,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> RunArgs {
        RunArgs {
            config: None,
            data_dir: None,
            disks: vec![],
            disk_files: vec![],
            listen: None,
            nbd_socket: None,
            nbd_listen: None,
            node_name: Some("n".into()),
            peer_listen: None,
            advertise: None,
            join: None,
            cluster_id: None,
            labels: None,
            fuse_threads: None,
            heartbeat_interval: None,
            node_down_timeout: None,
            default_replicas: None,
            rebuild_bandwidth: None,
            replica_grace_period: None,
            docker_plugin_socket: None,
            docker_mount_dir: None,
            api_mount_root: None,
            csi_socket: None,
            csi_max_volumes: None,
            orphan_io_timeout: None,
            scrub_interval: None,
            scrub_bandwidth: None,
            force_format: false,
            boot_id_file: "/proc/sys/kernel/random/boot_id".into(),
        }
    }

    #[test]
    fn defaults_use_a_disk_file_in_the_data_dir() {
        let mut a = args();
        a.data_dir = Some("/tmp/x".into());
        let c = Config::resolve(a).expect("valid");
        assert_eq!(
            c.disks,
            vec![DiskSpec::File(
                "/tmp/x/disks/disk0.img".into(),
                DEFAULT_DISK_SIZE
            )]
        );
        assert_eq!(c.nbd_socket, PathBuf::from("/tmp/x/nbd.sock"));
    }

    #[test]
    fn flags_win_over_the_file() {
        let dir = std::env::temp_dir().join(format!("cairn-cfg-{}", crate::types::Id128::random()));
        std::fs::create_dir_all(&dir).expect("dir");
        let f = dir.join("c.toml");
        std::fs::write(&f, "data_dir = \"/from/file\"\nlisten = \"127.0.0.1:1\"\n").expect("write");
        let mut a = args();
        a.config = Some(f.clone());
        a.listen = Some("127.0.0.1:2".into());
        let c = Config::resolve(a).expect("valid");
        assert_eq!(c.data_dir, PathBuf::from("/from/file"));
        assert_eq!(c.listen.port(), 2);
        std::fs::write(&f, "colour = 1\n").expect("write");
        let mut a = args();
        a.config = Some(f);
        assert!(Config::resolve(a).unwrap_err().contains("colour"));
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn labels() {
        let l = parse_labels("zone=a, rack=r1").expect("valid");
        assert_eq!(l.get("zone").map(String::as_str), Some("a"));
        assert_eq!(l.len(), 2);
        assert!(parse_labels("").expect("empty").is_empty());
        for bad in ["zone", "=a", "zone=", "zone=a,zone=b", "zo ne=a", "k=v;rm"] {
            assert!(parse_labels(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_disk_files() {
        assert!(parse_disk_file("/x").is_err());
        assert!(parse_disk_file("/x:abc").is_err());
        assert!(parse_disk_file("/x:1K").is_err());
        assert_eq!(
            parse_disk_file("/x:2GiB"),
            Ok(DiskSpec::File("/x".into(), 2 << 30))
        );
    }

    #[test]
    fn durations() {
        assert_eq!(
            parse_duration("--x", "500ms"),
            Ok(Duration::from_millis(500))
        );
        assert_eq!(parse_duration("--x", "5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("--x", "2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("--x", "1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(
            parse_duration("--x", "7d"),
            Ok(Duration::from_secs(7 * 86400))
        );
        for bad in ["", "5", "s", "0s", "5w", "-1s", "1.5s"] {
            assert!(parse_duration("--x", bad).is_err(), "{bad}");
        }
        let mut a = args();
        a.data_dir = Some("/tmp/x".into());
        a.heartbeat_interval = Some("5s".into());
        a.node_down_timeout = Some("6s".into());
        assert!(Config::resolve(a).is_err(), "timeout below two heartbeats");
    }
}
