//! Every on-disk format of a repository, in one place. **Formats are forever**:
//! a change here needs a new version number, a reader for the old version,
//! and a golden test (see `tests/golden.rs`).
//!
//! All integers are little-endian. CRC32 is IEEE (crc32fast). Chunk ids are
//! BLAKE3-256 of the plain chunk bytes.
//!
//! | file                         | magic  | version | module        |
//! |------------------------------|--------|---------|---------------|
//! | `config` (JSON)              | `"format": "datamover-repository"` | 1 | [`config`] |
//! | `packs/xx/<pack>.pack`       | `DMPK` | 1       | [`pack`]      |
//! | chunk frame inside a pack    | `DMCF` | 1       | [`frame`]     |
//! | `index/<name>.idx`           | `DMIX` | 1       | [`index`]     |
//! | `points/<vm>/<disk>/<id>.point` | `DMPT` | 1    | [`manifest`]  |
//!
//! Repository layout:
//!
//! ```text
//! REPO/config                 repository id + format version (JSON)
//! REPO/lock                   flock: shared by backup/restore/verify, exclusive by GC
//! REPO/packs/ab/<32 hex>.pack chunk frames, ~32 MiB each, immutable once renamed in
//! REPO/index/<32 hex>.idx     chunk id -> (pack, offset, length); many files, merged on load
//! REPO/points/<vm>/<disk>/<point id>.point   one manifest per restore point
//! REPO/tmp/                   files being written; never read; cleaned by prune
//! ```
//!
//! Every file is written to `tmp/`, fsynced, renamed into place and its
//! directory fsynced; readers only ever see complete files.

pub mod config;
pub mod frame;
pub mod index;
pub mod manifest;
pub mod pack;

/// Read a little-endian u32 at `at` (caller checked bounds).
pub(crate) fn le32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

/// Read a little-endian u64 at `at` (caller checked bounds).
pub(crate) fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Copy 32 bytes at `at` (caller checked bounds).
pub(crate) fn arr32(b: &[u8], at: usize) -> [u8; 32] {
    let mut a = [0u8; 32];
    a.copy_from_slice(&b[at..at + 32]);
    a
}
