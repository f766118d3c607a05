//! Index file: which pack holds each chunk.
//!
//! ```text
//! 0   4   magic "DMIX"
//! 4   4   version = 1
//! 8   4   pack_count (P)
//! 12  4   reserved, 0
//! 16  8   entry_count (E)
//! 24  16·P  pack ids
//! …   48·E  entries, sorted by chunk id:
//!           0 32 chunk id | 32 4 pack number (< P) | 36 4 frame offset in pack
//!           40 4 frame length (header + payload)   | 44 4 plain length
//! end 4   CRC32 of every byte before it
//! ```
//!
//! A repository holds many index files (one per sealed pack while a backup
//! runs, merged into one per backup when it commits, and into one per
//! repository by prune); the in-memory index is their union.

use crate::ids::{ChunkId, PackId};

/// Index magic.
pub const INDEX_MAGIC: [u8; 4] = *b"DMIX";
/// Index version written by this build.
pub const INDEX_VERSION: u32 = 1;
const HEADER: usize = 24;
/// Size of one entry on disk.
pub const ENTRY_LEN: usize = 48;

/// One chunk's location, with the pack given as a number into a pack table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    /// The chunk.
    pub id: ChunkId,
    /// Position of the pack in the accompanying pack table.
    pub pack: u32,
    /// Frame offset in the pack.
    pub offset: u32,
    /// Frame length, header included.
    pub frame_len: u32,
    /// Plain chunk length.
    pub plain_len: u32,
}

/// Serialize an index file. Entries are sorted by id here.
pub fn encode(packs: &[PackId], entries: &mut [IndexEntry]) -> Vec<u8> {
    entries.sort_unstable_by_key(|e| e.id);
    let mut out = Vec::with_capacity(HEADER + packs.len() * 16 + entries.len() * ENTRY_LEN + 4);
    out.extend_from_slice(&INDEX_MAGIC);
    out.extend_from_slice(&INDEX_VERSION.to_le_bytes());
    out.extend_from_slice(&(packs.len() as u32).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    for p in packs {
        out.extend_from_slice(&p.0);
    }
    for e in entries.iter() {
        out.extend_from_slice(&e.id.0);
        out.extend_from_slice(&e.pack.to_le_bytes());
        out.extend_from_slice(&e.offset.to_le_bytes());
        out.extend_from_slice(&e.frame_len.to_le_bytes());
        out.extend_from_slice(&e.plain_len.to_le_bytes());
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// What is wrong with an index file.
#[derive(Debug, PartialEq, Eq)]
pub enum IndexError {
    /// Damaged; the detail says how.
    Corrupt(String),
    /// Written by a newer format version.
    Version(u32),
}

/// Parse an index file, checking its size arithmetic before allocating.
pub fn decode(b: &[u8]) -> Result<(Vec<PackId>, Vec<IndexEntry>), IndexError> {
    let bad = |s: &str| IndexError::Corrupt(s.to_owned());
    if b.len() < HEADER + 4 {
        return Err(bad("shorter than its header"));
    }
    if b[..4] != INDEX_MAGIC {
        return Err(bad("bad magic (not a datamover index)"));
    }
    let v = super::le32(b, 4);
    if v != INDEX_VERSION {
        return Err(IndexError::Version(v));
    }
    let pc = super::le32(b, 8) as u64;
    let ec = super::le64(b, 16);
    let want = pc
        .checked_mul(16)
        .and_then(|p| {
            ec.checked_mul(ENTRY_LEN as u64)
                .and_then(|e| e.checked_add(p))
        })
        .and_then(|n| n.checked_add(HEADER as u64 + 4));
    if want != Some(b.len() as u64) {
        return Err(bad("length does not match its counts (truncated?)"));
    }
    let body = b.len() - 4;
    if crc32fast::hash(&b[..body]) != super::le32(b, body) {
        return Err(bad("CRC mismatch"));
    }
    let mut packs = Vec::with_capacity(pc as usize);
    let mut at = HEADER;
    for _ in 0..pc {
        let mut p = [0u8; 16];
        p.copy_from_slice(&b[at..at + 16]);
        packs.push(PackId(p));
        at += 16;
    }
    let mut entries = Vec::with_capacity(ec as usize);
    for _ in 0..ec {
        let e = IndexEntry {
            id: ChunkId(super::arr32(b, at)),
            pack: super::le32(b, at + 32),
            offset: super::le32(b, at + 36),
            frame_len: super::le32(b, at + 40),
            plain_len: super::le32(b, at + 44),
        };
        if u64::from(e.pack) >= pc {
            return Err(bad("entry names a pack outside the table"));
        }
        entries.push(e);
        at += ENTRY_LEN;
    }
    Ok((packs, entries))
}
