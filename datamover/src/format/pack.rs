//! Pack file header. A pack is `DMPK` + version (u32) followed by chunk
//! frames ([`super::frame`]) back to back, nothing else. Frames carry their
//! own chunk id, so a pack alone is enough to rebuild its index entries.
//!
//! ```text
//! 0  4  magic "DMPK"
//! 4  4  version = 1
//! 8  …  frames
//! ```

/// Pack magic.
pub const PACK_MAGIC: [u8; 4] = *b"DMPK";
/// Pack format version written by this build.
pub const PACK_VERSION: u32 = 1;
/// Length of the pack header.
pub const PACK_HEADER_LEN: usize = 8;
/// A pack is sealed once it grows past this many bytes.
pub const PACK_TARGET_LEN: u64 = 32 << 20;

/// The 8 header bytes of every pack.
pub fn header() -> [u8; PACK_HEADER_LEN] {
    let mut h = [0u8; PACK_HEADER_LEN];
    h[..4].copy_from_slice(&PACK_MAGIC);
    h[4..8].copy_from_slice(&PACK_VERSION.to_le_bytes());
    h
}

/// Check a pack header; `Err` holds the detail for a corruption error, or
/// `Ok(Some(v))` an unsupported version.
pub fn check_header(b: &[u8]) -> Result<Option<u32>, &'static str> {
    if b.len() < PACK_HEADER_LEN {
        return Err("shorter than its header");
    }
    if b[..4] != PACK_MAGIC {
        return Err("bad magic (not a datamover pack)");
    }
    let v = super::le32(b, 4);
    Ok((v != PACK_VERSION).then_some(v))
}
