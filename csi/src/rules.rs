//! The checks every service shares: volume capabilities and access modes,
//! capacity ranges, StorageClass parameters and topology segments.

use std::collections::{BTreeMap, HashMap};

use crate::pb::volume_capability::access_mode::Mode;
use crate::pb::volume_capability::AccessType;
use crate::pb::{CapacityRange, Topology, VolumeCapability};
use crate::{Error, NodeFacts, SizeRules, VolumeFacts, TOPOLOGY_NODE, TOPOLOGY_ZONE};

/// Filesystems a mount capability may ask for.
pub const FILESYSTEMS: [&str; 2] = ["ext4", "xfs"];

/// StorageClass parameters this driver reads, for a backend that keeps
/// up to `max_replicas` copies.
fn parameters_help(max_replicas: u32) -> String {
    format!("replicas (1-{max_replicas}), fs (ext4|xfs), locality (true|false), csi.storage.k8s.io/fstype")
}

/// What a list of capabilities asks of a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    pub block: bool,
    /// Filesystem named by a mount capability (empty: any).
    pub fs: String,
    pub mount_flags: Vec<String>,
    /// A reader-only mode (MULTI_NODE_READER_ONLY, SINGLE_NODE_READER_ONLY):
    /// held read-only (read-only device).
    pub reader: bool,
    /// The mode lets several nodes hold the volume (MULTI_NODE_READER_ONLY).
    pub multi_node: bool,
    /// SINGLE_NODE_SINGLE_WRITER: one read-write publication at a time.
    pub single_workload: bool,
}

/// Checks one capability; returns (block?, fs_type, mount flags).
fn capability(c: &VolumeCapability) -> Result<Wanted, Error> {
    let mode = c
        .access_mode
        .as_ref()
        .ok_or_else(|| Error::InvalidArgument("volume capability lacks access_mode".into()))?;
    let parsed = Mode::try_from(mode.mode);
    let reader = match parsed {
        Ok(Mode::SingleNodeWriter)
        | Ok(Mode::SingleNodeSingleWriter)
        | Ok(Mode::SingleNodeMultiWriter) => false,
        // Safe: readers never coexist with a writer (the cluster state
        // refuses one while the other holds the volume).
        Ok(Mode::MultiNodeReaderOnly) | Ok(Mode::SingleNodeReaderOnly) => true,
        Ok(Mode::Unknown) => {
            return Err(Error::InvalidArgument(
                "volume capability access_mode is UNKNOWN".into(),
            ))
        }
        Ok(m) => {
            return Err(Error::InvalidArgument(format!(
                "access mode {} is not supported: a Cairn volume is written by one node at a time",
                m.as_str_name()
            )))
        }
        Err(_) => {
            return Err(Error::InvalidArgument(format!(
                "access mode {} is not a CSI access mode",
                mode.mode
            )))
        }
    };
    let multi_node = parsed == Ok(Mode::MultiNodeReaderOnly);
    let single_workload = parsed == Ok(Mode::SingleNodeSingleWriter);
    match &c.access_type {
        Some(AccessType::Block(_)) => Ok(Wanted {
            block: true,
            fs: String::new(),
            mount_flags: Vec::new(),
            reader,
            multi_node,
            single_workload,
        }),
        Some(AccessType::Mount(m)) => {
            if !m.fs_type.is_empty() && !FILESYSTEMS.contains(&m.fs_type.as_str()) {
                return Err(Error::InvalidArgument(format!(
                    "fs_type {:?} is not supported; use one of {}",
                    m.fs_type,
                    FILESYSTEMS.join(", ")
                )));
            }
            if !m.volume_mount_group.is_empty() {
                return Err(Error::InvalidArgument(
                    "volume_mount_group is not supported (VOLUME_MOUNT_GROUP is not offered)"
                        .into(),
                ));
            }
            for f in &m.mount_flags {
                if f.is_empty() || f.contains('\0') {
                    return Err(Error::InvalidArgument(format!(
                        "mount flag {f:?} is empty or contains NUL"
                    )));
                }
            }
            Ok(Wanted {
                block: false,
                fs: m.fs_type.clone(),
                mount_flags: m.mount_flags.clone(),
                reader,
                multi_node,
                single_workload,
            })
        }
        None => Err(Error::InvalidArgument(
            "volume capability lacks access_type (block or mount)".into(),
        )),
    }
}

/// Whether every capability carries the fields the spec requires (an
/// access mode and an access type), whatever their values.
pub fn well_formed(cs: &[VolumeCapability]) -> Result<(), Error> {
    if cs.is_empty() {
        return Err(Error::InvalidArgument(
            "volume_capabilities is required".into(),
        ));
    }
    if cs
        .iter()
        .any(|c| c.access_mode.is_none() || c.access_type.is_none())
    {
        return Err(Error::InvalidArgument(
            "every volume capability needs access_mode and access_type".into(),
        ));
    }
    Ok(())
}

/// Bytes a new volume of `replicas` replicas can get with one replica on a
/// node among `candidates` (locality) and the others on distinct nodes
/// among `all`: the best over the candidates of the smaller of the
/// candidate's free space and the (replicas-1)-th largest free space among
/// the other nodes. 0 when there are not enough nodes.
pub fn available(all: &[NodeFacts], candidates: &[&NodeFacts], replicas: usize) -> u64 {
    candidates
        .iter()
        .filter_map(|c| {
            let mut others: Vec<u64> = all
                .iter()
                .filter(|n| n.up && n.name != c.name)
                .map(|n| n.free_bytes)
                .collect();
            others.sort_unstable_by(|a, b| b.cmp(a));
            let rest = match replicas.saturating_sub(1) {
                0 => u64::MAX,
                k => *others.get(k - 1)?,
            };
            Some(c.free_bytes.min(rest))
        })
        .max()
        .unwrap_or(0)
}

/// Checks a required single capability.
pub fn one_capability(c: Option<&VolumeCapability>) -> Result<Wanted, Error> {
    capability(c.ok_or_else(|| Error::InvalidArgument("volume_capability is required".into()))?)
}

/// Checks a required list of capabilities and what they ask together.
pub fn capabilities(cs: &[VolumeCapability]) -> Result<Wanted, Error> {
    if cs.is_empty() {
        return Err(Error::InvalidArgument(
            "volume_capabilities is required".into(),
        ));
    }
    let all = cs.iter().map(capability).collect::<Result<Vec<_>, _>>()?;
    let block = all[0].block;
    if all.iter().any(|w| w.block != block) {
        return Err(Error::InvalidArgument(
            "a volume is either raw block or a filesystem; the capabilities ask for both".into(),
        ));
    }
    let mut fs = String::new();
    for w in &all {
        if !w.fs.is_empty() {
            if !fs.is_empty() && fs != w.fs {
                return Err(Error::InvalidArgument(format!(
                    "the capabilities name two filesystems ({fs} and {})",
                    w.fs
                )));
            }
            fs = w.fs.clone();
        }
    }
    Ok(Wanted {
        block,
        fs,
        mount_flags: Vec::new(),
        reader: all.iter().all(|w| w.reader),
        multi_node: all.iter().any(|w| w.multi_node),
        single_workload: all.iter().any(|w| w.single_workload),
    })
}

/// Why `volume` cannot serve `w`, if it cannot.
pub fn mismatch(volume: &VolumeFacts, w: &Wanted) -> Option<String> {
    if w.block && !volume.is_block() {
        return Some(format!(
            "volume {:?} holds a {} filesystem; it cannot be used as a raw block device",
            volume.name, volume.fs
        ));
    }
    if !w.block && volume.is_block() {
        return Some(format!(
            "volume {:?} is a raw block volume; it cannot be mounted",
            volume.name
        ));
    }
    if !w.block && !w.fs.is_empty() && w.fs != volume.fs {
        return Some(format!(
            "volume {:?} holds {}, not {}",
            volume.name, volume.fs, w.fs
        ));
    }
    None
}

/// StorageClass parameters, checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Params {
    pub replicas: Option<u32>,
    pub fs: Option<String>,
    pub locality: Option<bool>,
}

/// Checks StorageClass parameters; `max_replicas` is the backend's limit.
pub fn params(p: &HashMap<String, String>, max_replicas: u32) -> Result<Params, Error> {
    let mut out = Params::default();
    for (k, v) in p {
        match k.as_str() {
            "replicas" => {
                let n = v
                    .parse::<u32>()
                    .ok()
                    .filter(|n| (1..=max_replicas).contains(n))
                    .ok_or_else(|| {
                        Error::InvalidArgument(format!(
                            "parameter replicas={v:?}: give a number from 1 to {max_replicas}"
                        ))
                    })?;
                out.replicas = Some(n);
            }
            "fs" | "csi.storage.k8s.io/fstype" => {
                if !FILESYSTEMS.contains(&v.as_str()) {
                    return Err(Error::InvalidArgument(format!(
                        "parameter {k}={v:?}: give one of {}",
                        FILESYSTEMS.join(", ")
                    )));
                }
                if out.fs.as_ref().is_some_and(|f| f != v) {
                    return Err(Error::InvalidArgument(
                        "parameters fs and csi.storage.k8s.io/fstype disagree".into(),
                    ));
                }
                out.fs = Some(v.clone());
            }
            "locality" => {
                out.locality = Some(match v.as_str() {
                    "true" => true,
                    "false" => false,
                    _ => {
                        return Err(Error::InvalidArgument(format!(
                            "parameter locality={v:?}: give true or false"
                        )))
                    }
                })
            }
            // Metadata the external-provisioner adds (PVC name, namespace).
            k if k.starts_with("csi.storage.k8s.io/") => {}
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "unknown parameter {k:?}; accepted: {}",
                    parameters_help(max_replicas)
                )))
            }
        }
    }
    Ok(out)
}

/// Smallest volume a filesystem can be made on (mkfs.xfs refuses less
/// than 300 MB).
/// The volume id for the CSI name `name`: CSI names are any UTF-8 without
/// control characters, up to 128 bytes; a volume name is narrower. A name
/// that `valid` accepts is the id as it is; any other maps to
/// `csi-<readable part>-<hash>`, where the hash (64-bit FNV-1a of the name's
/// bytes, a fixed function so the mapping never changes between versions)
/// tells apart names with the same readable part. The same name always
/// gives the same id, so a repeated CreateVolume finds its volume; the
/// volume records the CSI name, so an id held by another name is refused.
pub fn volume_id_for(name: &str, valid: impl Fn(&str) -> bool) -> Result<String, Error> {
    if name.len() > 128 {
        return Err(Error::InvalidArgument(format!(
            "name is {} bytes long; CSI names are at most 128 bytes",
            name.len()
        )));
    }
    if name.chars().any(char::is_control) {
        return Err(Error::InvalidArgument(format!(
            "name {name:?} contains a control character"
        )));
    }
    if valid(name) {
        return Ok(name.to_string());
    }
    let mut slug = String::new();
    for c in name.chars() {
        if slug.len() >= 40 {
            break;
        }
        let c = c.to_ascii_lowercase();
        if c.is_ascii_alphanumeric() {
            slug.push(c);
        } else if !slug.is_empty() && !slug.ends_with('-') {
            slug.push('-');
        }
    }
    let slug = slug.trim_end_matches('-');
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    Ok(if slug.is_empty() {
        format!("csi-{h:016x}")
    } else {
        format!("csi-{slug}-{h:016x}")
    })
}

pub fn min_size(fs: &str) -> u64 {
    match fs {
        "xfs" => 300 << 20,
        _ => 0,
    }
}

/// The size for a capacity range: the required bytes (at least `min`)
/// rounded up to the backend's alignment (the default size when nothing is
/// required, capped by the limit), refused with OUT_OF_RANGE when it cannot
/// fit the range.
pub fn size_for(range: Option<&CapacityRange>, rules: SizeRules, min: u64) -> Result<u64, Error> {
    let (required, limit) = range.map_or((0, 0), |r| (r.required_bytes, r.limit_bytes));
    if required < 0 || limit < 0 {
        return Err(Error::InvalidArgument(
            "capacity_range bytes must not be negative".into(),
        ));
    }
    let (required, limit) = (required as u64, limit as u64);
    if limit > 0 && required > limit {
        return Err(Error::OutOfRange(format!(
            "capacity_range asks for at least {required} bytes but at most {limit}"
        )));
    }
    let size = if required == 0 {
        match limit {
            0 => rules.default,
            l => rules.default.min(l / rules.align * rules.align),
        }
    } else {
        required.div_ceil(rules.align) * rules.align
    };
    let size = size.max(min.div_ceil(rules.align) * rules.align);
    if size == 0 || (limit > 0 && size > limit) {
        return Err(Error::OutOfRange(format!(
            "volume sizes are multiples of {} bytes; none fits between {required} and {limit}",
            rules.align
        )));
    }
    if size > rules.max {
        return Err(Error::OutOfRange(format!(
            "{size} bytes is more than the largest volume ({} bytes)",
            rules.max
        )));
    }
    Ok(size)
}

/// Whether `size` satisfies the range (for idempotent CreateVolume).
pub fn fits(size: u64, range: Option<&CapacityRange>) -> bool {
    let (required, limit) = range.map_or((0, 0), |r| (r.required_bytes, r.limit_bytes));
    size >= required.max(0) as u64 && (limit <= 0 || size <= limit as u64)
}

/// A node's topology segments.
pub fn segments(n: &NodeFacts) -> BTreeMap<String, String> {
    let mut s = BTreeMap::from([(TOPOLOGY_NODE.to_string(), n.name.clone())]);
    if let Some(z) = n.labels.get("zone") {
        s.insert(TOPOLOGY_ZONE.to_string(), z.clone());
    }
    s
}

/// Whether `n` lies in topology `t` (every key known and equal).
pub fn in_topology(n: &NodeFacts, t: &Topology) -> bool {
    let mine = segments(n);
    t.segments.iter().all(|(k, v)| mine.get(k) == Some(v))
}

/// Checks the keys of a topology given by the CO.
pub fn check_topology(t: &Topology) -> Result<(), Error> {
    if let Some(k) = t
        .segments
        .keys()
        .find(|k| *k != TOPOLOGY_NODE && *k != TOPOLOGY_ZONE)
    {
        return Err(Error::InvalidArgument(format!(
            "unknown topology key {k:?}; this driver uses {TOPOLOGY_NODE} and {TOPOLOGY_ZONE}"
        )));
    }
    Ok(())
}

/// Page tokens of the list calls: this prefix + the key of the next entry.
const TOKEN_PREFIX: &str = "after:";

/// Where a page starts: `None` for the first page, else the key a token
/// this driver issued names (ABORTED for any other token), after checking
/// `max_entries`.
pub fn page_start(token: &str, max_entries: i32) -> Result<Option<String>, Error> {
    if max_entries < 0 {
        return Err(Error::InvalidArgument(
            "max_entries must not be negative".into(),
        ));
    }
    match token {
        "" => Ok(None),
        t => t
            .strip_prefix(TOKEN_PREFIX)
            .filter(|s| !s.is_empty())
            .map(|s| Some(s.to_string()))
            .ok_or_else(|| {
                Error::Aborted(format!(
                    "starting_token {t:?} was not issued by this driver"
                ))
            }),
    }
}

/// The token of a page that ends before the entry with key `next`.
pub fn page_token(next: &str) -> String {
    format!("{TOKEN_PREFIX}{next}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::volume_capability::{AccessMode, BlockVolume, MountVolume};

    const RULES: SizeRules = SizeRules {
        align: 1 << 20,
        max: 1 << 40,
        default: 1 << 30,
    };

    #[test]
    fn csi_names_map_to_volume_ids_deterministically() {
        let valid =
            |n: &str| n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') && !n.is_empty();
        assert_eq!(volume_id_for("pvc-1", valid).unwrap(), "pvc-1");
        let a = volume_id_for("my volume+1", valid).unwrap();
        assert!(a.starts_with("csi-my-volume-1-") && valid(&a), "{a}");
        assert_eq!(volume_id_for("my volume+1", valid).unwrap(), a);
        assert_ne!(volume_id_for("my volume 1", valid).unwrap(), a);
        let u = volume_id_for("日本語のボリューム", valid).unwrap();
        assert!(u.starts_with("csi-") && u.len() == 20 && valid(&u), "{u}");
        let long = "é".repeat(64);
        assert_eq!(long.len(), 128);
        assert!(volume_id_for(&long, valid).is_ok());
        assert!(volume_id_for(&format!("{long}x"), valid).is_err());
        assert!(volume_id_for("tab\there", valid).is_err());
        // An id is valid and maps to itself.
        assert_eq!(volume_id_for(&a, valid).unwrap(), a);
    }

    fn range(required: i64, limit: i64) -> CapacityRange {
        CapacityRange {
            required_bytes: required,
            limit_bytes: limit,
        }
    }

    fn cap(mode: Mode, block: bool, fs: &str) -> VolumeCapability {
        VolumeCapability {
            access_mode: Some(AccessMode { mode: mode as i32 }),
            access_type: Some(if block {
                AccessType::Block(BlockVolume {})
            } else {
                AccessType::Mount(MountVolume {
                    fs_type: fs.into(),
                    ..Default::default()
                })
            }),
        }
    }

    #[test]
    fn sizes_round_up_within_the_range() {
        assert_eq!(size_for(None, RULES, 0), Ok(1 << 30));
        assert_eq!(size_for(Some(&range(1, 0)), RULES, 0), Ok(1 << 20));
        assert_eq!(
            size_for(Some(&range((1 << 20) + 1, 0)), RULES, 0),
            Ok(2 << 20)
        );
        assert_eq!(size_for(Some(&range(0, 5 << 20)), RULES, 0), Ok(5 << 20));
        assert!(matches!(
            size_for(Some(&range((1 << 20) + 1, (1 << 20) + 2)), RULES, 0),
            Err(Error::OutOfRange(_))
        ));
        assert!(matches!(
            size_for(Some(&range(10, 5)), RULES, 0),
            Err(Error::OutOfRange(_))
        ));
        assert!(matches!(
            size_for(Some(&range(0, 100)), RULES, 0),
            Err(Error::OutOfRange(_))
        ));
        assert!(matches!(
            size_for(Some(&range(2 << 40, 0)), RULES, 0),
            Err(Error::OutOfRange(_))
        ));
        assert!(matches!(
            size_for(Some(&range(-1, 0)), RULES, 0),
            Err(Error::InvalidArgument(_))
        ));
        assert_eq!(
            size_for(Some(&range(1, 0)), RULES, 300 << 20),
            Ok(300 << 20)
        );
        assert!(matches!(
            size_for(Some(&range(1, 10 << 20)), RULES, 300 << 20),
            Err(Error::OutOfRange(_))
        ));
        assert!(fits(2 << 20, Some(&range(1 << 20, 0))));
        assert!(!fits(2 << 20, Some(&range(0, 1 << 20))));
    }

    #[test]
    fn access_modes_and_types() {
        assert!(capabilities(&[cap(Mode::SingleNodeWriter, false, "xfs")]).is_ok());
        assert!(capabilities(&[cap(Mode::SingleNodeMultiWriter, true, "")]).is_ok());
        let rox = capabilities(&[cap(Mode::MultiNodeReaderOnly, false, "")]).expect("ROX");
        assert!(rox.reader && rox.multi_node);
        let one_reader =
            capabilities(&[cap(Mode::SingleNodeReaderOnly, false, "")]).expect("one reader");
        assert!(one_reader.reader && !one_reader.multi_node);
        let rwop = capabilities(&[cap(Mode::SingleNodeSingleWriter, false, "")]).expect("RWOP");
        assert!(!rwop.reader && rwop.single_workload);
        for m in [
            Mode::MultiNodeMultiWriter,
            Mode::MultiNodeSingleWriter,
            Mode::Unknown,
        ] {
            assert!(matches!(
                capabilities(&[cap(m, false, "")]),
                Err(Error::InvalidArgument(_))
            ));
        }
        assert!(capabilities(&[]).is_err());
        assert!(capabilities(&[
            cap(Mode::SingleNodeWriter, true, ""),
            cap(Mode::SingleNodeWriter, false, "")
        ])
        .is_err());
        assert!(capabilities(&[cap(Mode::SingleNodeWriter, false, "btrfs")]).is_err());
        let missing = VolumeCapability {
            access_mode: None,
            access_type: None,
        };
        assert!(one_capability(Some(&missing)).is_err());
        assert!(one_capability(None).is_err());
    }

    #[test]
    fn parameters_are_checked() {
        let p = |kv: &[(&str, &str)]| {
            params(
                &kv.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                3,
            )
        };
        assert_eq!(
            p(&[
                ("replicas", "3"),
                ("fs", "xfs"),
                ("csi.storage.k8s.io/pvc/name", "x")
            ]),
            Ok(Params {
                replicas: Some(3),
                fs: Some("xfs".into()),
                locality: None
            })
        );
        assert!(p(&[("replicas", "4")]).is_err());
        assert!(p(&[("fs", "xfs"), ("csi.storage.k8s.io/fstype", "ext4")]).is_err());
        assert!(p(&[("colour", "blue")]).is_err());
        assert!(p(&[("locality", "yes")]).is_err());
    }

    #[test]
    fn available_space_needs_distinct_nodes() {
        let n = |name: &str, free: u64| NodeFacts {
            name: name.into(),
            labels: BTreeMap::new(),
            up: true,
            free_bytes: free,
        };
        let all = [n("a", 100), n("b", 50), n("c", 30)];
        let every: Vec<&NodeFacts> = all.iter().collect();
        assert_eq!(available(&all, &every, 1), 100);
        assert_eq!(available(&all, &every, 2), 50);
        assert_eq!(available(&all, &every, 3), 30);
        assert_eq!(available(&all, &every, 4), 0);
        assert_eq!(available(&all, &[&all[2]], 1), 30);
        assert_eq!(available(&all, &[&all[2]], 2), 30);
        assert_eq!(available(&all, &[&all[0]], 3), 30);
        assert_eq!(available(&all, &[], 1), 0);
    }

    #[test]
    fn topology_matches_node_and_zone() {
        let n = NodeFacts {
            name: "n1".into(),
            labels: BTreeMap::from([("zone".into(), "a".into())]),
            up: true,
            free_bytes: 0,
        };
        let t = |kv: &[(&str, &str)]| Topology {
            segments: kv
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        assert!(in_topology(&n, &t(&[(TOPOLOGY_ZONE, "a")])));
        assert!(in_topology(
            &n,
            &t(&[(TOPOLOGY_NODE, "n1"), (TOPOLOGY_ZONE, "a")])
        ));
        assert!(!in_topology(&n, &t(&[(TOPOLOGY_ZONE, "b")])));
        assert!(!in_topology(&n, &t(&[("other", "a")])));
        assert!(check_topology(&t(&[("other", "a")])).is_err());
    }
}
