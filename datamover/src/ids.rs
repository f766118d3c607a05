//! Typed identifiers: chunk ids, pack ids, point ids and disk names.
//!
//! Invariant: every value of these types is valid by construction; parsing
//! from user input or from disk goes through `FromStr`/`from_*` which reject
//! anything malformed with [`Error::InvalidName`] or a corruption error.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// BLAKE3-256 of a chunk's plain (uncompressed) bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    /// Hash plain chunk bytes into their id.
    pub fn of(data: &[u8]) -> Self {
        ChunkId(*blake3::hash(data).as_bytes())
    }
    /// Lower-case hex form (64 characters).
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }
    /// Short form for messages (first 12 hex digits).
    pub fn short(&self) -> String {
        hex(&self.0[..6])
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", self.short())
    }
}
impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Random 128-bit name of a pack file.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PackId(pub [u8; 16]);

impl PackId {
    /// A fresh random pack id.
    pub fn random() -> Result<Self> {
        Ok(PackId(random_bytes()?))
    }
    /// Lower-case hex form (32 characters), also the pack's file stem.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }
    /// Parse the 32-hex-digit form.
    pub fn from_hex(s: &str) -> Option<Self> {
        let mut out = [0u8; 16];
        unhex(s, &mut out).then_some(PackId(out))
    }
}
impl fmt::Debug for PackId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PackId({})", self.to_hex())
    }
}
impl fmt::Display for PackId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// 16 random bytes from the OS.
pub(crate) fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b)
        .map_err(|e| Error::Internal(format!("no randomness from the OS: {e}")))?;
    Ok(b)
}

/// A restore point id: `YYYYMMDDTHHMMSS.mmmZ-xxxxxx` (UTC start time to the
/// millisecond + 24 random bits), so that ids sort by time. A repository
/// never gives a disk a new id that sorts before its newest one.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PointId(String);

impl PointId {
    /// A new id for a point started at `time`.
    pub fn new(time: chrono::DateTime<chrono::Utc>) -> Result<Self> {
        let r: [u8; 3] = random_bytes()?;
        Ok(PointId(format!(
            "{}-{}",
            time.format("%Y%m%dT%H%M%S%.3fZ"),
            hex(&r)
        )))
    }
    /// The start time encoded in the id.
    pub fn time(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        chrono::NaiveDateTime::parse_from_str(&self.0[..19], "%Y%m%dT%H%M%S%.3f")
            .ok()
            .map(|t| t.and_utc())
    }
    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}
impl FromStr for PointId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let b = s.as_bytes();
        let ok = b.len() == 27
            && b[8] == b'T'
            && b[15] == b'.'
            && b[19] == b'Z'
            && b[20] == b'-'
            && b[..8].iter().all(u8::is_ascii_digit)
            && b[9..15].iter().all(u8::is_ascii_digit)
            && b[16..19].iter().all(u8::is_ascii_digit)
            && b[21..]
                .iter()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c));
        if ok {
            Ok(PointId(s.to_owned()))
        } else {
            Err(Error::InvalidName {
                name: s.to_owned(),
                reason: "a point id looks like 20261125T095235.120Z-1a2b3c (see `dm points`)",
            })
        }
    }
}
impl fmt::Debug for PointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PointId({})", self.0)
    }
}
impl fmt::Display for PointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A disk's name in the repository: `<vm>/<disk>`. Each part is 1–64 of
/// `[A-Za-z0-9._-]`, not starting with `.` or `-`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DiskName {
    vm: String,
    disk: String,
}

impl DiskName {
    /// The VM part.
    pub fn vm(&self) -> &str {
        &self.vm
    }
    /// The disk part.
    pub fn disk(&self) -> &str {
        &self.disk
    }
}

fn valid_part(p: &str) -> bool {
    !p.is_empty()
        && p.len() <= 64
        && !p.starts_with('.')
        && !p.starts_with('-')
        && p.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

impl FromStr for DiskName {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.split_once('/') {
            Some((vm, disk)) if valid_part(vm) && valid_part(disk) => Ok(DiskName {
                vm: vm.to_owned(),
                disk: disk.to_owned(),
            }),
            _ => Err(Error::InvalidName {
                name: s.to_owned(),
                reason: "a disk name is <vm>/<disk>, each part 1-64 of A-Z a-z 0-9 . _ - (e.g. web01/vda)",
            }),
        }
    }
}
/// A reference to a point of a disk, as users write it: `disk` (the
/// newest point) or `disk@id` (a point id or a unique prefix of one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PointRef {
    /// The disk.
    pub disk: DiskName,
    /// The point id or prefix after `@`; none: the newest point.
    pub at: Option<String>,
}

impl FromStr for PointRef {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let (name, at) = match s.split_once('@') {
            Some((n, p)) => (n, Some(p.to_owned())),
            None => (s, None),
        };
        Ok(PointRef {
            disk: name.parse()?,
            at,
        })
    }
}

impl fmt::Display for PointRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.at {
            Some(at) => write!(f, "{}@{at}", self.disk),
            None => write!(f, "{}", self.disk),
        }
    }
}

impl fmt::Debug for DiskName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DiskName({}/{})", self.vm, self.disk)
    }
}
impl fmt::Display for DiskName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.vm, self.disk)
    }
}

/// Lower-case hex of bytes.
pub(crate) fn hex(bytes: &[u8]) -> String {
    const D: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(D[(b >> 4) as usize] as char);
        s.push(D[(b & 15) as usize] as char);
    }
    s
}

fn unhex(s: &str, out: &mut [u8]) -> bool {
    let b = s.as_bytes();
    if b.len() != out.len() * 2 {
        return false;
    }
    fn nib(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    for (i, o) in out.iter_mut().enumerate() {
        match (nib(b[2 * i]), nib(b[2 * i + 1])) {
            (Some(h), Some(l)) => *o = (h << 4) | l,
            _ => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn point_refs_and_chunking_parse_one_way() {
        let r: PointRef = "web01/vda@20261125T0952".parse().unwrap();
        assert_eq!(r.disk.to_string(), "web01/vda");
        assert_eq!(r.at.as_deref(), Some("20261125T0952"));
        assert_eq!(r.to_string(), "web01/vda@20261125T0952");
        let newest: PointRef = "web01/vda".parse().unwrap();
        assert_eq!(newest.at, None);
        assert_eq!(newest.to_string(), "web01/vda");
        assert!("../x@1".parse::<PointRef>().is_err());
        use crate::ChunkingKind;
        for k in [ChunkingKind::Fixed, ChunkingKind::Cdc] {
            assert_eq!(k.name().parse::<ChunkingKind>().unwrap(), k);
        }
        let e = "rabin".parse::<ChunkingKind>().unwrap_err();
        assert!(e.to_string().contains("use fixed or cdc"), "{e}");
    }

    #[test]
    fn disk_names() {
        assert!("web01/vda".parse::<DiskName>().is_ok());
        assert!("a.b_c-d/disk-0.raw".parse::<DiskName>().is_ok());
        for bad in [
            "",
            "vm",
            "/vda",
            "vm/",
            "vm/a/b",
            "../x",
            "vm/..",
            "vm/.hidden",
            "vm/-x",
            "vm/a b",
            "vm/ä",
        ] {
            assert!(bad.parse::<DiskName>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn point_ids() {
        let t = chrono::DateTime::from_timestamp_millis(1_764_064_355_120).unwrap_or_default();
        let p = PointId::new(t).unwrap_or_else(|e| panic!("{e}"));
        assert!(p.as_str().starts_with("20251125T095235.120Z-"), "{p}");
        assert_eq!(p.time(), Some(t));
        assert_eq!(p.as_str().parse::<PointId>().ok(), Some(p.clone()));
        assert!("20251125T095235.120Z-zzzzzz".parse::<PointId>().is_err());
        assert!("20251125T095235Z-1a2b3c".parse::<PointId>().is_err());
        assert!("latest".parse::<PointId>().is_err());
    }

    #[test]
    fn pack_id_hex_round_trip() {
        let p = PackId([0xab; 16]);
        assert_eq!(PackId::from_hex(&p.to_hex()), Some(p));
        assert_eq!(PackId::from_hex("xyz"), None);
    }
}

/// Serde as text, checked on the way in (`FromStr`): ids and names in
/// JSON (the control plane's API) are the same strings users type.
macro_rules! serde_as_text {
    ($t:ty) => {
        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(
                &self,
                s: S,
            ) -> std::result::Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(
                d: D,
            ) -> std::result::Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}
serde_as_text!(DiskName);
serde_as_text!(PointId);
