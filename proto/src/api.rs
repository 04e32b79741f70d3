//! JSON bodies of the REST admin API (`/v1`).
//!
//! Sizes travel as [`SizeArg`]: either a byte count or a string with units
//! (`"10GiB"`, `"512MiB"`, `"1G"`); the daemon parses it once at the edge.
//! Every request type denies unknown fields so a typo is an error, not a
//! silently ignored option.

use serde::{Deserialize, Serialize};

/// A size as a client wrote it: bytes, or a string with units.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum SizeArg {
    Bytes(u64),
    Text(String),
}

impl<'de> Deserialize<'de> for SizeArg {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = SizeArg;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a size: a byte count or a string such as \"10GiB\"")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<SizeArg, E> {
                Ok(SizeArg::Bytes(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<SizeArg, E> {
                // Negative numbers reach the size parser as text so the error
                // names the value the client sent.
                Ok(SizeArg::Text(v.to_string()))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<SizeArg, E> {
                Ok(SizeArg::Text(v.to_string()))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<SizeArg, E> {
                Ok(SizeArg::Text(v.to_owned()))
            }
        }
        d.deserialize_any(V)
    }
}

/// The largest volume (64 TiB; the daemon's `MAX_VOLUME_SIZE`).
pub const MAX_SIZE_BYTES: u64 = 64 << 40;
/// Sizes are whole 4 KiB blocks.
pub const SIZE_ALIGN_BYTES: u64 = 4096;
/// The text sizes the description promises: whole MiB or GiB below 10,000,
/// or TiB up to 64 (binary units, so always whole 4 KiB blocks). The API
/// also reads other forms (`4096`, `1.5GiB`, `10GB`) when they come to
/// whole blocks.
pub const SIZE_TEXT_PATTERN: &str =
    "^([1-9][0-9]{0,3}(M|Mi|MiB|G|Gi|GiB)|([1-9]|[1-5][0-9]|6[0-4])(T|Ti|TiB))$";

impl utoipa::PartialSchema for SizeArg {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{
            KnownFormat, ObjectBuilder, OneOfBuilder, SchemaFormat, Type,
        };
        OneOfBuilder::new()
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
                    .minimum(Some(SIZE_ALIGN_BYTES))
                    .maximum(Some(MAX_SIZE_BYTES))
                    .multiple_of(Some(SIZE_ALIGN_BYTES))
                    .description(Some("Bytes: a multiple of 4 KiB.")),
            )
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .pattern(Some(SIZE_TEXT_PATTERN))
                    .description(Some("With a binary unit, e.g. 512MiB, 10GiB, 1T.")),
            )
            .description(Some(
                "A size: whole 4 KiB blocks, at most 64 TiB; one between two blocks is refused, not rounded.",
            ))
            .into()
    }
}

impl utoipa::ToSchema for SizeArg {}

/// The filesystems a volume can have (or `null`: the default).
fn fs_schema() -> utoipa::openapi::schema::Object {
    use utoipa::openapi::schema::{SchemaType, Type};
    utoipa::openapi::schema::ObjectBuilder::new()
        .schema_type(SchemaType::from_iter([Type::String, Type::Null]))
        .enum_values(Some([Some("ext4"), Some("xfs"), Some("none"), None]))
        .description(Some("`ext4` (default), `xfs` or `none` (raw block)."))
        .build()
}

impl std::fmt::Display for SizeArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SizeArg::Bytes(b) => write!(f, "{b}"),
            SizeArg::Text(t) => f.write_str(t),
        }
    }
}

/// `POST /v1/volumes`
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VolumeCreate {
    #[schema(pattern = "^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")]
    pub name: String,
    /// Required, except for a clone (default: its source's size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<SizeArg>,
    /// `ext4` (default), `xfs` or `none` (raw block); a clone has its
    /// source's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = fs_schema)]
    pub fs: Option<String>,
    /// Copies on distinct nodes, 1 to 3 (default: the daemon's
    /// `--default-replicas`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 3)]
    pub replicas: Option<u32>,
    /// Keep one replica on the node that serves this request (the node
    /// that will attach it), when it has room.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub locality: bool,
    /// Make the volume a clone of snapshot `VOLUME@SNAPSHOT`: usable at
    /// once, independent of its source afterwards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_snapshot: Option<String>,
    /// Make the volume a clone of volume `VOLUME` as it is now (through a
    /// snapshot taken for it, deleted once the clone is filled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_volume: Option<String>,
}

/// `POST /v1/volumes/{name}/attach` (body optional).
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AttachRequest {
    /// Take the volume over from the node it is attached to (use when that
    /// node is dead): its engine is fenced by a new epoch.
    #[serde(default)]
    pub force: bool,
}

/// `PATCH /v1/volumes/{name}`: grow and/or change the replica count.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VolumeUpdate {
    /// Grow to this size (volumes never shrink).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<SizeArg>,
    /// Change the replica count (1 to 3); replicas are added or removed
    /// online by the leader.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 3)]
    pub replicas: Option<u32>,
}

/// `POST /v1/volumes/{name}/mount` and `/unmount`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MountRequest {
    /// Absolute path on the daemon's host.
    pub path: String,
    /// Mount only: take the volume over from another node (see
    /// [`AttachRequest::force`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force: bool,
}

/// A volume as the API reports it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VolumeInfo {
    pub id: String,
    pub name: String,
    pub size_bytes: u64,
    pub fs: String,
    /// `detached`, `attached` or `mounted`.
    pub state: String,
    /// The block device path while attached on this node.
    pub device: Option<String>,
    pub mounts: Vec<String>,
    /// Targets the volume is published at on this node (bind mounts made
    /// by the CSI driver's NodePublishVolume).
    #[serde(default)]
    pub published: Vec<String>,
    pub allocated_bytes: u64,
    pub formatted: bool,
    pub epoch: u64,
    pub attached_node: Option<String>,
    /// Nodes holding the volume read-only (Kubernetes ReadOnlyMany).
    #[serde(default)]
    pub readers: Vec<String>,
    pub created_unix_ms: u64,
    pub replicas: Vec<ReplicaInfo>,
    /// The name a Kubernetes CO created the volume by, when it is not a
    /// valid volume name (the CSI driver maps it to `name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub csi_name: Option<String>,
    /// Set for a clone: what it was made from, and the nodes still
    /// filling it from the snapshot (which cannot be deleted until then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<OriginInfo>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OriginInfo {
    /// `VOLUME@SNAPSHOT`.
    pub snapshot: String,
    /// Nodes whose replica still reads through to the snapshot (empty:
    /// the clone is independent).
    pub filling: Vec<String>,
    /// The answering node's filler, 0 to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<f64>,
}

/// Answer of `DELETE /v1/volumes/{name}` (202) when some replica's space
/// is not freed yet.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VolumeDeleted {
    /// Nodes whose copy was not freed yet (down or slow): their space comes
    /// back when they answer again.
    pub space_pending_on: Vec<String>,
}

/// `POST /v1/volumes/{name}/snapshots`
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreate {
    /// Unique among the volume's snapshots.
    #[schema(pattern = "^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")]
    pub name: String,
    /// Freeze the volume's mounted filesystem around the snapshot (default
    /// true). A freeze that fails fails the snapshot; false takes a
    /// crash-consistent one without freezing.
    #[serde(default = "yes")]
    pub freeze: bool,
}

fn yes() -> bool {
    true
}

/// A snapshot as the API reports it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SnapshotInfo {
    pub id: String,
    pub name: String,
    pub volume: String,
    pub volume_id: String,
    pub created_unix_ms: u64,
    /// The volume's size when the snapshot was taken.
    pub size_bytes: u64,
    /// Taken on its replicas; false while it is being taken (or after a
    /// failed take whose record could not be removed yet: delete it).
    pub ready: bool,
    /// Nodes whose replicas hold it.
    pub replicas: Vec<String>,
    /// Pool space of the extents the snapshot's own layer stores (written
    /// after the previous snapshot), on one replica (absent when no
    /// replica answered).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_bytes: Option<u64>,
    /// What deleting the snapshot would free on one replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exclusive_bytes: Option<u64>,
}

/// Answer of `DELETE /v1/volumes/{name}/snapshots/{snapshot}` (202) when
/// some replica has not freed it yet.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SnapshotDeleted {
    /// Nodes that have not freed their copy yet (down or slow): they free
    /// it when they answer again.
    pub space_pending_on: Vec<String>,
}

/// `POST /v1/volumes/{name}/revert`
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RevertRequest {
    /// The name of the volume's snapshot to revert to.
    pub snapshot: String,
}

/// Answer of `POST /v1/volumes/{name}/verify`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VerifyReport {
    pub extents_compared: u64,
    pub replicas_compared: u32,
    /// Extents whose checksums differ between healthy replicas.
    pub mismatched_extents: Vec<u64>,
    /// With `?repair=true`: the differing extents made equal, and from where.
    #[serde(default)]
    pub repaired: Vec<RepairedExtent>,
    /// Each ready snapshot compared across the healthy replicas holding it
    /// (reported only: `repair` does not rewrite snapshots).
    #[serde(default)]
    pub snapshots: Vec<SnapshotVerify>,
}

/// One snapshot compared by `verify`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SnapshotVerify {
    pub snapshot: String,
    /// The healthy replicas holding it, which were compared.
    pub replicas_compared: Vec<String>,
    /// Healthy replicas that do not hold it yet (the healer copies it).
    #[serde(default)]
    pub lacking: Vec<String>,
    /// Extents whose checksums differ between the replicas compared.
    pub mismatched_extents: Vec<u64>,
}

/// One extent `verify --repair` made equal again.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RepairedExtent {
    pub extent: u64,
    /// The node whose copy was kept.
    pub source: String,
    /// Whether a majority of the healthy replicas held that copy (else it
    /// is the copy reads were served from).
    pub majority: bool,
    /// The nodes whose copies were rewritten.
    pub targets: Vec<String>,
}

/// One copy of a volume.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReplicaInfo {
    /// Node name.
    pub node: String,
    /// `healthy`, `rebuilding`, `faulted`, or `offline` (its node is down).
    pub state: String,
    /// Rebuild progress 0.0–1.0 while rebuilding, as seen by the engine on
    /// the node answering (the attaching node knows it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebuild_progress: Option<f64>,
}

/// Answer of `POST /v1/volumes/{name}/attach`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AttachInfo {
    pub device: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeviceInfo {
    pub index: u32,
    pub path: String,
    /// `file` or `block`.
    pub kind: String,
    pub id: String,
    pub capacity_bytes: u64,
    pub allocated_bytes: u64,
}

/// `GET /v1/pool`
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PoolInfo {
    pub id: String,
    pub extent_size_bytes: u64,
    pub capacity_bytes: u64,
    pub allocated_bytes: u64,
    pub free_bytes: u64,
    /// Sum of the sizes of all volumes (thin provisioning may exceed capacity).
    pub provisioned_bytes: u64,
    pub devices: Vec<DeviceInfo>,
}

/// `GET /v1/node`
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeStatus {
    pub id: String,
    pub name: String,
    pub version: String,
    pub data_dir: String,
    pub api_listen: String,
    pub nbd_socket: String,
    pub nbd_listen: Option<String>,
    pub volumes: u64,
    pub attached_volumes: u64,
    pub pool_capacity_bytes: u64,
    pub pool_allocated_bytes: u64,
    pub uptime_seconds: u64,
}

/// Every error answer: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable: e.g. `VolumeNotFound`, `InvalidSize`.
    pub code: String,
    pub message: String,
}

/// `GET /v1/nodes`: one cluster member.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeInfo {
    pub id: String,
    pub name: String,
    pub raft_id: u64,
    pub address: String,
    pub labels: std::collections::BTreeMap<String, String>,
    /// `voter` or `learner`.
    pub role: String,
    /// `up` while heartbeats arrive, `down` after they stop.
    pub state: String,
    pub pool_capacity_bytes: u64,
    pub pool_allocated_bytes: u64,
    pub last_heartbeat_unix_ms: u64,
}

/// `GET /v1/cluster`
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ClusterStatus {
    pub cluster_id: String,
    /// Name of the metadata leader, if one is known.
    pub leader: Option<String>,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub members: Vec<ClusterMember>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ClusterMember {
    pub name: String,
    pub id: String,
    pub raft_id: u64,
    /// `voter` or `learner` in the Raft group.
    pub role: String,
}
