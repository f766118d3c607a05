//! Point manifest: one file per restore point, listing every extent of the
//! disk in order, so each point restores on its own (no chains, no merges).
//!
//! ```text
//! header   0 4 magic "DMPT" | 4 4 version = 1 | 8 8 reserved, 0
//! records  0x01 chunk: u32 plain length, 32-byte chunk id   (37 bytes)
//!          0x02 zero:  u64 length                           (9 bytes)
//!          0x00 end of records
//! meta     JSON object (PointMeta), meta_len bytes
//! footer   0 8 extent count | 8 8 disk size (sum of extents) | 16 4 meta_len
//!          20 4 CRC32 of meta | 24 4 CRC32 of header+records+end | 28 4 magic "DMPE"
//! ```
//!
//! Invariants checked on decode: extents are in disk order, non-empty,
//! adjacent zero runs are merged, their lengths sum to `disk_size`, chunks
//! are at most [`super::frame::MAX_CHUNK_LEN`]. The records stream is written
//! as the backup runs and read back a block at a time ([`Records`]), so
//! neither costs memory that grows with the disk; the metadata is appended
//! at the end, and the fixed footer lets a lister read the metadata without
//! parsing the records.
//!
//! A later point is derived from an earlier one plus changed ranges (CBT) by
//! walking both extent lists by offset: unchanged extents are copied by id.

use serde::{Deserialize, Serialize};

use super::frame::MAX_CHUNK_LEN;
use crate::ids::ChunkId;

/// Manifest magic.
pub const MANIFEST_MAGIC: [u8; 4] = *b"DMPT";
/// Footer magic.
pub const FOOTER_MAGIC: [u8; 4] = *b"DMPE";
/// Manifest version written by this build.
pub const MANIFEST_VERSION: u32 = 1;
/// Header length.
pub const HEADER_LEN: usize = 16;
/// Footer length.
pub const FOOTER_LEN: usize = 32;
/// The largest manifest file read into memory (1 GiB: about 29 million
/// chunks, a 28 TiB disk at 1 MiB chunks).
pub const MAX_MANIFEST_LEN: u64 = 1 << 30;
/// The largest metadata object.
pub const MAX_META_LEN: u32 = 1 << 20;

const TAG_END: u8 = 0;
const TAG_CHUNK: u8 = 1;
const TAG_ZERO: u8 = 2;

/// One extent of a disk, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extent {
    /// `len` bytes stored as chunk `id`.
    Chunk {
        /// The chunk.
        id: ChunkId,
        /// Its plain length.
        len: u32,
    },
    /// `len` bytes of zeros (holes and zero blocks alike); never stored.
    Zero {
        /// Run length.
        len: u64,
    },
}

impl Extent {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        match self {
            Extent::Chunk { len, .. } => u64::from(*len),
            Extent::Zero { len } => *len,
        }
    }
    /// Never true for a decoded extent.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where the data came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct SourceInfo {
    /// "file", "blockdev", later "nbd", "qmp", ...
    pub kind: String,
    /// Path or URI as given.
    pub location: String,
}

/// How the point was chunked; an incremental must chunk the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkingInfo {
    /// "cdc" or "fixed".
    pub kind: ChunkingKind,
    /// Average (cdc) or exact (fixed) chunk size.
    pub block_size: u32,
}

/// Chunking algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChunkingKind {
    /// FastCDC 2020, min = size/4, max = size*4, normalization level 1.
    Cdc,
    /// Fixed-size blocks aligned to disk offsets.
    Fixed,
}

impl ChunkingKind {
    /// Its name: `cdc` or `fixed` (as in manifests, the CLI and Python).
    pub fn name(self) -> &'static str {
        match self {
            ChunkingKind::Cdc => "cdc",
            ChunkingKind::Fixed => "fixed",
        }
    }
}

impl std::str::FromStr for ChunkingKind {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        match s {
            "fixed" => Ok(ChunkingKind::Fixed),
            "cdc" => Ok(ChunkingKind::Cdc),
            other => Err(crate::Error::InvalidArgument(format!(
                "unknown chunking {other:?}: use fixed or cdc"
            ))),
        }
    }
}

/// Figures of the run that made the point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct PointStats {
    /// Bytes read from the source (allocated data).
    pub bytes_read: u64,
    /// Bytes recorded as zero runs (holes and zero blocks).
    pub bytes_zero: u64,
    /// Bytes of chunks not already in the repository.
    pub bytes_new: u64,
    /// Bytes written to packs for those chunks (after compression).
    pub bytes_stored: u64,
    /// Chunks referenced by the point.
    pub chunks: u64,
    /// Chunks newly stored.
    pub chunks_new: u64,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// "source read", "CPU" or "target write".
    pub bottleneck: String,
}

/// A point's metadata (the JSON part of the manifest). Unknown fields are
/// ignored on read, so later versions may add fields without a new version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PointMeta {
    /// `<vm>/<disk>`.
    pub name: String,
    /// Point id.
    pub point: String,
    /// Disk size in bytes.
    pub disk_size: u64,
    /// Source of the data.
    pub source: SourceInfo,
    /// Transport mode used: "file", "blockdev", "nbd", "san", "hotadd",
    /// "storage-snapshot".
    pub transport: String,
    /// Start time, RFC 3339 UTC.
    pub started: String,
    /// End time, RFC 3339 UTC.
    pub finished: String,
    /// Chunking used.
    pub chunking: ChunkingInfo,
    /// Compression level name.
    pub compression: String,
    /// The point this one was derived from (CBT), if any.
    #[serde(default)]
    pub parent: Option<String>,
    /// Figures of the run.
    #[serde(default)]
    pub stats: PointStats,
    /// Set when the point was built from `parent` plus tracked changes.
    /// Absent (not `null`) in full points, so their bytes are unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cbt: Option<CbtMeta>,
    /// The checkpoint started when this point's data was frozen: the name
    /// of the dirty bitmap that records every write after that instant
    /// (VM sources). The next incremental must read its changes from this
    /// checkpoint and no other. Absent when no checkpoint was started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
    /// How consistent the point's data is: `application` (the guest's
    /// filesystems were frozen by its agent around the snapshot) or `crash`
    /// (as after a power cut), and why (VM sources). Absent for sources
    /// that are not a running guest, so their bytes are unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistency: Option<Consistency>,
    /// The VM's definition when the point was taken (a libvirt domain's
    /// XML), so a restore or an instant recovery can recreate the VM.
    /// Absent for other sources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_definition: Option<String>,
}

/// A point's consistency level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConsistencyLevel {
    /// The guest flushed and froze its filesystems (its applications'
    /// freeze hooks ran) for the instant of the snapshot.
    Application,
    /// The disk as it was at one instant, as after a power cut.
    Crash,
}

impl std::fmt::Display for ConsistencyLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ConsistencyLevel::Application => "application",
            ConsistencyLevel::Crash => "crash",
        })
    }
}

/// How consistent a point is, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Consistency {
    /// `application` or `crash`.
    pub level: ConsistencyLevel,
    /// Why: what was frozen, or why the guest was not quiesced.
    pub reason: String,
    /// How long the guest's filesystems were frozen, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frozen_ms: Option<u64>,
}

impl Consistency {
    /// A crash-consistent point, for `reason`.
    pub fn crash(reason: impl Into<String>) -> Consistency {
        Consistency {
            level: ConsistencyLevel::Crash,
            reason: reason.into(),
            frozen_ms: None,
        }
    }
}

/// How an incremental point was built.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CbtMeta {
    /// What tracked the changes (e.g. `qemu:dirty-bitmap:b0`).
    pub tracker: String,
    /// Bytes the tracker marked changed.
    pub bytes_changed: u64,
}

/// Streams a manifest out: records first, metadata and footer at the end.
#[derive(Debug)]
pub struct ManifestWriter<W: std::io::Write> {
    out: W,
    crc: crc32fast::Hasher,
    extents: u64,
    size: u64,
    pending_zero: u64,
}

impl<W: std::io::Write> ManifestWriter<W> {
    /// Start a manifest, writing its header.
    pub fn new(mut out: W) -> std::io::Result<Self> {
        let mut h = [0u8; HEADER_LEN];
        h[..4].copy_from_slice(&MANIFEST_MAGIC);
        h[4..8].copy_from_slice(&MANIFEST_VERSION.to_le_bytes());
        out.write_all(&h)?;
        let mut crc = crc32fast::Hasher::new();
        crc.update(&h);
        Ok(ManifestWriter {
            out,
            crc,
            extents: 0,
            size: 0,
            pending_zero: 0,
        })
    }

    fn put(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.crc.update(b);
        self.out.write_all(b)
    }

    fn flush_zero(&mut self) -> std::io::Result<()> {
        if self.pending_zero > 0 {
            let mut r = [0u8; 9];
            r[0] = TAG_ZERO;
            r[1..].copy_from_slice(&self.pending_zero.to_le_bytes());
            self.put(&r)?;
            self.extents += 1;
            self.size += self.pending_zero;
            self.pending_zero = 0;
        }
        Ok(())
    }

    /// Append an extent (adjacent zero runs are merged; empty ones dropped).
    pub fn push(&mut self, e: Extent) -> std::io::Result<()> {
        match e {
            Extent::Zero { len } => self.pending_zero += len,
            Extent::Chunk { id, len } if len > 0 => {
                self.flush_zero()?;
                let mut r = [0u8; 37];
                r[0] = TAG_CHUNK;
                r[1..5].copy_from_slice(&len.to_le_bytes());
                r[5..].copy_from_slice(&id.0);
                self.put(&r)?;
                self.extents += 1;
                self.size += u64::from(len);
            }
            Extent::Chunk { .. } => {}
        }
        Ok(())
    }

    /// Bytes of disk described so far.
    pub fn size(&self) -> u64 {
        self.size + self.pending_zero
    }

    /// Write the end marker, metadata and footer; returns the sink.
    pub fn finish(mut self, meta: &PointMeta) -> std::io::Result<W> {
        self.flush_zero()?;
        self.put(&[TAG_END])?;
        let json = serde_json::to_vec(meta).map_err(std::io::Error::other)?;
        self.out.write_all(&json)?;
        let mut f = [0u8; FOOTER_LEN];
        f[0..8].copy_from_slice(&self.extents.to_le_bytes());
        f[8..16].copy_from_slice(&self.size.to_le_bytes());
        f[16..20].copy_from_slice(&(json.len() as u32).to_le_bytes());
        f[20..24].copy_from_slice(&crc32fast::hash(&json).to_le_bytes());
        f[24..28].copy_from_slice(&self.crc.clone().finalize().to_le_bytes());
        f[28..32].copy_from_slice(&FOOTER_MAGIC);
        self.out.write_all(&f)?;
        Ok(self.out)
    }
}

/// What is wrong with a manifest.
#[derive(Debug, PartialEq, Eq)]
pub enum ManifestError {
    /// Damaged; the detail says how.
    Corrupt(String),
    /// Written by another format version.
    Version(u32),
}

fn bad(s: impl Into<String>) -> ManifestError {
    ManifestError::Corrupt(s.into())
}

/// The parsed footer.
#[derive(Debug, Clone, Copy)]
pub struct Footer {
    /// Number of extent records.
    pub extents: u64,
    /// Disk size.
    pub disk_size: u64,
    /// Metadata length.
    pub meta_len: u32,
    meta_crc: u32,
    body_crc: u32,
}

/// Parse the fixed footer (the last [`FOOTER_LEN`] bytes of the file).
pub fn parse_footer(f: &[u8]) -> Result<Footer, ManifestError> {
    if f.len() != FOOTER_LEN || f[28..32] != FOOTER_MAGIC {
        return Err(bad("footer missing or damaged (truncated file?)"));
    }
    let ft = Footer {
        extents: super::le64(f, 0),
        disk_size: super::le64(f, 8),
        meta_len: super::le32(f, 16),
        meta_crc: super::le32(f, 20),
        body_crc: super::le32(f, 24),
    };
    if ft.meta_len > MAX_META_LEN {
        return Err(bad("metadata length beyond limit"));
    }
    Ok(ft)
}

/// Parse and check the metadata JSON against the footer.
pub fn parse_meta(footer: &Footer, meta: &[u8]) -> Result<PointMeta, ManifestError> {
    if crc32fast::hash(meta) != footer.meta_crc {
        return Err(bad("metadata CRC mismatch"));
    }
    let m: PointMeta =
        serde_json::from_slice(meta).map_err(|e| bad(format!("metadata is not valid: {e}")))?;
    if m.disk_size != footer.disk_size {
        return Err(bad("metadata and footer disagree on the disk size"));
    }
    Ok(m)
}

/// Check the header of a manifest file.
pub fn check_header(b: &[u8]) -> Result<(), ManifestError> {
    if b.len() < HEADER_LEN || b[..4] != MANIFEST_MAGIC {
        return Err(bad("bad magic (not a datamover point manifest)"));
    }
    match super::le32(b, 4) {
        MANIFEST_VERSION => Ok(()),
        v => Err(ManifestError::Version(v)),
    }
}

/// A decoded manifest.
#[derive(Debug, Clone, PartialEq)]
pub struct Manifest {
    /// Metadata.
    pub meta: PointMeta,
    /// Every extent of the disk, in order.
    pub extents: Vec<Extent>,
}

/// Decode a whole manifest file, checking every invariant.
pub fn decode(b: &[u8]) -> Result<Manifest, ManifestError> {
    check_header(b)?;
    if b.len() < HEADER_LEN + 1 + FOOTER_LEN {
        return Err(bad("truncated"));
    }
    let footer = parse_footer(&b[b.len() - FOOTER_LEN..])?;
    let meta_end = b.len() - FOOTER_LEN;
    let meta_start = body_len(b.len() as u64, &footer)? as usize;
    let meta = parse_meta(&footer, &b[meta_start..meta_end])?;
    // Records::new bounds the count by the file's size.
    let records = Records::new(&b[..meta_start], &footer, meta_start as u64)?;
    let mut extents = Vec::with_capacity(footer.extents as usize);
    for e in records {
        extents.push(e?);
    }
    Ok(Manifest { meta, extents })
}

/// Where the records end and the metadata starts in a manifest file of
/// `file_len` bytes (the header, records and end marker come before it).
pub fn body_len(file_len: u64, footer: &Footer) -> Result<u64, ManifestError> {
    file_len
        .checked_sub(FOOTER_LEN as u64 + u64::from(footer.meta_len))
        .filter(|s| *s > HEADER_LEN as u64)
        .ok_or_else(|| bad("metadata length beyond file"))
}

/// A place in a manifest's records (see [`Records::place`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Place {
    /// File offset of the record.
    pub at: u64,
    /// Extents before it.
    pub count: u64,
    /// Where on the disk its extent starts.
    pub disk_offset: u64,
}

/// Bytes of a manifest's records read at once.
const READ_AHEAD: u64 = 64 << 10;

/// The extents of a manifest, decoded one at a time from its first
/// `body_len` bytes (header, records, end marker): memory stays bounded
/// whatever the disk size. Every invariant [`decode`] checks is checked
/// here, as the records go by; the CRC and the count and size in the
/// footer when the end marker is reached, so a consumer must read to the
/// end (`None`) before it trusts what it took. After an error the
/// iterator ends.
#[derive(Debug)]
pub struct Records<R: std::io::Read> {
    r: R,
    crc: crc32fast::Hasher,
    /// Bytes of the body not read yet.
    left: u64,
    /// Read ahead (CRC taken as it is read): `buf[at..filled]` not parsed.
    buf: Vec<u8>,
    at: usize,
    filled: usize,
    expect: Footer,
    count: u64,
    size: u64,
    last_zero: bool,
    done: bool,
    /// Where the body's bytes read so far end (file offset).
    read_to: u64,
    /// From the header: the CRC and the footer's totals are checked at the
    /// end. Resumed mid-way ([`Records::resume`]): they cannot be.
    whole: bool,
}

impl<R: std::io::Read> Records<R> {
    /// Start reading `r` (positioned at the file's first byte); checks
    /// the header. `footer` and `body_len` come from the file's end.
    pub fn new(mut r: R, footer: &Footer, body_len: u64) -> Result<Self, ManifestError> {
        // Each record is at least 9 bytes, so the count is bounded by the file.
        if footer.extents > body_len / 9 {
            return Err(bad("extent count beyond file size"));
        }
        let left = body_len
            .checked_sub(HEADER_LEN as u64)
            .ok_or_else(|| bad("truncated"))?;
        let mut h = [0u8; HEADER_LEN];
        r.read_exact(&mut h).map_err(|_| bad("truncated"))?;
        check_header(&h)?;
        let mut crc = crc32fast::Hasher::new();
        crc.update(&h);
        Ok(Records {
            r,
            crc,
            left,
            buf: vec![0; left.min(READ_AHEAD) as usize],
            at: 0,
            filled: 0,
            expect: *footer,
            count: 0,
            size: 0,
            last_zero: false,
            done: false,
            read_to: HEADER_LEN as u64,
            whole: true,
        })
    }

    /// Read on from a place [`Records::place`] gave during an earlier
    /// whole pass over the same file (`r` positioned at `place.at`). The
    /// records are checked one by one as ever, but the CRC and the
    /// footer's totals cannot be: that earlier pass vouched for them.
    pub fn resume(
        r: R,
        footer: &Footer,
        body_len: u64,
        place: Place,
    ) -> Result<Self, ManifestError> {
        let left = body_len
            .checked_sub(place.at)
            .filter(|_| place.at >= HEADER_LEN as u64)
            .ok_or_else(|| bad("resumed beyond the records"))?;
        Ok(Records {
            r,
            crc: crc32fast::Hasher::new(),
            left,
            buf: vec![0; left.min(READ_AHEAD) as usize],
            at: 0,
            filled: 0,
            expect: *footer,
            count: place.count,
            size: place.disk_offset,
            last_zero: false,
            done: false,
            read_to: place.at,
            whole: false,
        })
    }

    /// Where the next record lies: its file offset, how many extents came
    /// before it and where on the disk it starts.
    pub fn place(&self) -> Place {
        Place {
            at: self.read_to - (self.filled - self.at) as u64,
            count: self.count,
            disk_offset: self.size,
        }
    }

    fn take<const N: usize>(&mut self, what: &str) -> Result<[u8; N], ManifestError> {
        if self.filled - self.at < N {
            self.buf.copy_within(self.at..self.filled, 0);
            self.filled -= self.at;
            self.at = 0;
            while self.filled < N {
                let room = (self.buf.len() - self.filled) as u64;
                let want = self.filled + room.min(self.left) as usize;
                let n = match self.r.read(&mut self.buf[self.filled..want]) {
                    Ok(0) => return Err(bad(format!("truncated {what}"))),
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(bad(format!("truncated {what}: {e}"))),
                };
                if self.whole {
                    self.crc.update(&self.buf[self.filled..self.filled + n]);
                }
                self.filled += n;
                self.left -= n as u64;
                self.read_to += n as u64;
            }
        }
        let mut a = [0u8; N];
        a.copy_from_slice(&self.buf[self.at..self.at + N]);
        self.at += N;
        Ok(a)
    }

    fn record(&mut self) -> Result<Option<Extent>, ManifestError> {
        let [tag] = self
            .take::<1>("record")
            .map_err(|_| bad("extent list has no end marker"))?;
        let e = match tag {
            TAG_END => {
                if self.left != 0 || self.at != self.filled {
                    return Err(bad("bytes after the end marker"));
                }
                if !self.whole {
                    return Ok(None);
                }
                if self.crc.clone().finalize() != self.expect.body_crc {
                    return Err(bad("CRC mismatch in the extent list"));
                }
                if self.count != self.expect.extents || self.size != self.expect.disk_size {
                    return Err(bad("extent list disagrees with the footer"));
                }
                return Ok(None);
            }
            TAG_CHUNK => {
                let r = self.take::<36>("chunk record")?;
                let len = super::le32(&r, 0);
                if len == 0 || len > MAX_CHUNK_LEN {
                    return Err(bad(format!("chunk record with length {len}")));
                }
                self.last_zero = false;
                Extent::Chunk {
                    id: ChunkId(super::arr32(&r, 4)),
                    len,
                }
            }
            TAG_ZERO => {
                let r = self.take::<8>("zero record")?;
                let len = super::le64(&r, 0);
                if len == 0 || self.last_zero {
                    return Err(bad("empty or unmerged zero record"));
                }
                self.last_zero = true;
                Extent::Zero { len }
            }
            t => return Err(bad(format!("unknown record tag {t}"))),
        };
        self.size = self
            .size
            .checked_add(e.len())
            .filter(|s| *s <= self.expect.disk_size)
            .ok_or_else(|| bad("extent lengths beyond the disk size"))?;
        self.count += 1;
        if self.count > self.expect.extents {
            return Err(bad("more extents than the footer counts"));
        }
        Ok(Some(e))
    }
}

impl<R: std::io::Read> Iterator for Records<R> {
    type Item = Result<Extent, ManifestError>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let r = self.record();
        if !matches!(r, Ok(Some(_))) {
            self.done = true;
        }
        r.transpose()
    }
}
