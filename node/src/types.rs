//! Identifiers and sizes, parsed once at the edge and typed from then on.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A 128-bit random identifier shown as a UUID-formatted string.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct Id128(pub [u8; 16]);

impl Id128 {
    pub fn random() -> Self {
        let mut b = [0u8; 16];
        crate::sys::fill_random(&mut b);
        Id128(b)
    }
}

impl fmt::Display for Id128 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Id128 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Id128 {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let hex: String = s.chars().filter(|c| *c != '-').collect();
        if hex.len() != 32 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(format!("{s:?} is not a 128-bit id"));
        }
        let mut b = [0u8; 16];
        for (i, out) in b.iter_mut().enumerate() {
            *out = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
        }
        Ok(Id128(b))
    }
}

impl From<Id128> for String {
    fn from(id: Id128) -> String {
        id.to_string()
    }
}

impl TryFrom<String> for Id128 {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

pub type VolumeId = Id128;
pub type NodeId = Id128;
pub type PoolId = Id128;
pub type SnapshotId = Id128;

/// Volume sizes are whole multiples of this (the loop device's block size).
pub const SIZE_ALIGN: u64 = 4096;
/// Largest volume Cairn creates: 64 TiB (ext4's limit with 4 KiB blocks).
pub const MAX_VOLUME_SIZE: u64 = 64 << 40;

/// A byte count parsed from `10GiB`, `512MiB`, `1G`, `1.5GiB`, `4096`.
///
/// Binary units (`K`, `Ki`, `KiB`, `M`, ... `P`) are powers of 1024; decimal
/// units with a `B` (`KB`, `MB`, `GB`, `TB`) are powers of 1000, as `truncate`
/// and `qemu-img` read them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("size is empty")]
    Empty,
    #[error("size {0:?} is not a number with an optional unit (e.g. 10GiB, 512MiB, 1G)")]
    NotANumber(String),
    #[error("size {0:?} is negative")]
    Negative(String),
    #[error("size {0:?} has an unknown unit; use B, KiB, MiB, GiB, TiB, PiB, K, M, G, T, KB, MB, GB or TB")]
    UnknownUnit(String),
    #[error("size {0:?} is too large to represent")]
    Overflow(String),
    #[error("size {0:?} is not a whole number of bytes")]
    Fractional(String),
}

impl FromStr for ByteSize {
    type Err = SizeError;
    fn from_str(input: &str) -> Result<Self, SizeError> {
        let s = input.trim();
        if s.is_empty() {
            return Err(SizeError::Empty);
        }
        if s.starts_with('-') {
            return Err(SizeError::Negative(input.into()));
        }
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let unit = unit.trim();
        if num.is_empty() || num.matches('.').count() > 1 || num == "." {
            return Err(SizeError::NotANumber(input.into()));
        }
        let mult: u128 = match unit {
            "" | "B" | "b" => 1,
            "K" | "k" | "Ki" | "KiB" | "kiB" => 1 << 10,
            "M" | "Mi" | "MiB" => 1 << 20,
            "G" | "Gi" | "GiB" => 1 << 30,
            "T" | "Ti" | "TiB" => 1 << 40,
            "P" | "Pi" | "PiB" => 1 << 50,
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            "TB" => 1_000_000_000_000,
            _ => return Err(SizeError::UnknownUnit(input.into())),
        };
        let overflow = || SizeError::Overflow(input.into());
        let bytes: u128 = match num.split_once('.') {
            None => num
                .parse::<u128>()
                .map_err(|_| overflow())?
                .checked_mul(mult)
                .ok_or_else(overflow)?,
            Some((int, frac)) => {
                // Exact decimal arithmetic: int * mult + frac * mult / 10^len.
                let int: u128 = if int.is_empty() {
                    0
                } else {
                    int.parse().map_err(|_| overflow())?
                };
                if frac.len() > 18 {
                    return Err(SizeError::NotANumber(input.into()));
                }
                let scale = 10u128.pow(frac.len() as u32);
                let frac: u128 = if frac.is_empty() {
                    0
                } else {
                    frac.parse().map_err(|_| overflow())?
                };
                let whole = int.checked_mul(mult).ok_or_else(overflow)?;
                let scaled = frac.checked_mul(mult).ok_or_else(overflow)?;
                if scaled % scale != 0 {
                    return Err(SizeError::Fractional(input.into()));
                }
                let part = scaled / scale;
                whole.checked_add(part).ok_or_else(overflow)?
            }
        };
        u64::try_from(bytes).map(ByteSize).map_err(|_| overflow())
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
        let mut v = self.0 as f64;
        let mut u = 0;
        while v >= 1024.0 && u < UNITS.len() - 1 {
            v /= 1024.0;
            u += 1;
        }
        if u == 0 {
            write!(f, "{} B", self.0)
        } else if v.fract() == 0.0 {
            write!(f, "{v:.0} {}", UNITS[u])
        } else {
            write!(f, "{v:.1} {}", UNITS[u])
        }
    }
}

/// The filesystem a volume is formatted with on first mount.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsType {
    Ext4,
    Xfs,
    /// Raw block: never formatted, cannot be mounted.
    None,
}

impl FsType {
    pub fn as_str(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Xfs => "xfs",
            FsType::None => "none",
        }
    }
}

impl FromStr for FsType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ext4" => Ok(FsType::Ext4),
            "xfs" => Ok(FsType::Xfs),
            "none" => Ok(FsType::None),
            other => Err(format!(
                "filesystem {other:?} is not supported; use ext4, xfs or none"
            )),
        }
    }
}

/// Volume names: 1–128 characters from `[A-Za-z0-9_.-]`, starting with a
/// letter or digit (fits Docker volume names and CSI `pvc-<uuid>` names).
pub fn validate_volume_name(name: &str) -> Result<(), String> {
    validate_name("volume", name, 128)
}

/// Longest snapshot name.
pub const MAX_SNAPSHOT_NAME: usize = 63;

/// Snapshot names: 1–63 characters of the same alphabet (so no `/` or `@`,
/// which `VOL@SNAP` uses).
pub fn validate_snapshot_name(name: &str) -> Result<(), String> {
    validate_name("snapshot", name, MAX_SNAPSHOT_NAME)
}

/// The one name rule: 1–`max` characters from `[A-Za-z0-9_.-]`, starting
/// with a letter or digit; `kind` names what is named in the error.
fn validate_name(kind: &str, name: &str, max: usize) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("{kind} name is empty"));
    }
    if name.len() > max {
        return Err(format!(
            "{kind} name is {} characters long; the limit is {max}",
            name.len()
        ));
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric() {
        return Err(format!(
            "{kind} name {name:?} must start with a letter or digit"
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(format!(
            "{kind} name {name:?} contains {c:?}; use letters, digits, '_', '.' and '-'"
        ));
    }
    Ok(())
}

pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        let p = |s: &str| s.parse::<ByteSize>().map(|b| b.0);
        assert_eq!(p("4096"), Ok(4096));
        assert_eq!(p("10GiB"), Ok(10 << 30));
        assert_eq!(p("512MiB"), Ok(512 << 20));
        assert_eq!(p("1G"), Ok(1 << 30));
        assert_eq!(p("1Gi"), Ok(1 << 30));
        assert_eq!(p("1GB"), Ok(1_000_000_000));
        assert_eq!(p("1.5GiB"), Ok(3 << 29));
        assert_eq!(p(" 2 TiB "), Ok(2 << 40));
    }

    #[test]
    fn rejects_bad_sizes() {
        assert_eq!("".parse::<ByteSize>(), Err(SizeError::Empty));
        assert!(matches!(
            "-1G".parse::<ByteSize>(),
            Err(SizeError::Negative(_))
        ));
        assert!(matches!(
            "abc".parse::<ByteSize>(),
            Err(SizeError::NotANumber(_))
        ));
        assert!(matches!(
            "1.2.3G".parse::<ByteSize>(),
            Err(SizeError::NotANumber(_))
        ));
        assert!(matches!(
            "10XB".parse::<ByteSize>(),
            Err(SizeError::UnknownUnit(_))
        ));
        assert!(matches!(
            "99999999999999999999999P".parse::<ByteSize>(),
            Err(SizeError::Overflow(_))
        ));
        assert!(matches!(
            "20000P".parse::<ByteSize>(),
            Err(SizeError::Overflow(_))
        ));
        assert!(matches!(
            "1.5".parse::<ByteSize>(),
            Err(SizeError::Fractional(_))
        ));
    }

    #[test]
    fn id_roundtrip() {
        let id = Id128::random();
        assert_eq!(id.to_string().parse::<Id128>(), Ok(id));
        assert!("xyz".parse::<Id128>().is_err());
    }

    #[test]
    fn names() {
        assert!(validate_volume_name("pvc-0a1b.data_1").is_ok());
        assert!(validate_volume_name("").is_err());
        assert!(validate_volume_name("-x").is_err());
        assert!(validate_volume_name("a/b").is_err());
        assert!(validate_volume_name(&"a".repeat(129)).is_err());
    }
}
