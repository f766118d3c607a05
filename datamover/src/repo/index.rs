//! The in-memory chunk index: the union of every index file, as one sorted
//! array (48 bytes a chunk), so a million chunks load in a fraction of a
//! second and take about 50 MB. A lookup starts from a fan-out table of
//! where each 16-bit id prefix begins (ids are hashes, so a million chunks
//! leave about 16 per prefix): a few cache misses instead of the twenty
//! of a binary search over the whole array, which made checking a 1 TiB
//! parent point's million chunks cost a second.
//!
//! Invariant: `entries` is sorted by chunk id with no duplicate id; a chunk
//! stored twice (two concurrent backups) keeps one location.

use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};
use crate::format::index::{self as fmt, IndexEntry, IndexError};
use crate::ids::{ChunkId, PackId};

/// Where a chunk's frame lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    /// The pack.
    pub pack: PackId,
    /// Frame offset in the pack.
    pub offset: u64,
    /// Frame length (header + payload).
    pub frame_len: u32,
    /// Plain chunk length.
    pub plain_len: u32,
}

/// All chunks of a repository.
#[derive(Debug, Default)]
pub struct Index {
    packs: Vec<PackId>,
    entries: Vec<IndexEntry>,
    files: Vec<PathBuf>,
    /// `fanout[p]`: the first entry whose id's 16-bit prefix is at least
    /// `p` (65,537 of them); empty for small indexes.
    fanout: Vec<u32>,
}

/// Indexes smaller than this are searched without a fan-out table.
const FANOUT_MIN: usize = 1 << 14;

fn prefix(id: &ChunkId) -> usize {
    usize::from(u16::from_be_bytes([id.0[0], id.0[1]]))
}

/// Every (chunk, location) of every index file, and the files read.
pub type RawIndex = (Vec<(ChunkId, Location)>, Vec<PathBuf>);

/// An index file that could not be read.
#[derive(Debug)]
pub struct BadIndexFile {
    /// The file.
    pub path: PathBuf,
    /// Why.
    pub error: Error,
}

impl Index {
    /// Read every `*.idx` in `dir`, sorted but not deduplicated. Unreadable
    /// files are returned apart so that verify can report them; callers
    /// that need a sound index fail on them instead.
    fn load_unmerged(dir: &Path) -> Result<(Index, Vec<BadIndexFile>)> {
        let mut idx = Index::default();
        let mut bad = Vec::new();
        let mut pack_no = std::collections::HashMap::new();
        let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
            .ctx("list", dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "idx"))
            .collect();
        names.sort();
        for path in names {
            let bytes = match std::fs::read(&path) {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue, // removed by prune meanwhile
                Err(e) => return Err(Error::io("read", &path, e)),
            };
            match fmt::decode(&bytes) {
                Ok((packs, entries)) => {
                    let map: Vec<u32> = packs
                        .iter()
                        .map(|p| {
                            *pack_no.entry(*p).or_insert_with(|| {
                                idx.packs.push(*p);
                                (idx.packs.len() - 1) as u32
                            })
                        })
                        .collect();
                    idx.entries.extend(entries.into_iter().map(|e| IndexEntry {
                        pack: map[e.pack as usize],
                        ..e
                    }));
                    idx.files.push(path);
                }
                Err(IndexError::Version(v)) => {
                    return Err(Error::UnsupportedVersion {
                        path,
                        found: v,
                        supported: fmt::INDEX_VERSION,
                    });
                }
                Err(IndexError::Corrupt(d)) => bad.push(BadIndexFile {
                    error: Error::corrupt("index", &path, d),
                    path,
                }),
            }
        }
        idx.entries.sort_unstable_by_key(|e| e.id);
        Ok((idx, bad))
    }

    /// Load every index file and merge them, dropping duplicate ids.
    pub fn load(dir: &Path) -> Result<(Index, Vec<BadIndexFile>)> {
        let (mut idx, bad) = Self::load_unmerged(dir)?;
        idx.entries.dedup_by(|a, b| a.id == b.id);
        idx.build_fanout();
        Ok((idx, bad))
    }

    /// Every entry of every index file, duplicates included, with the files
    /// read; any damaged file is an error (garbage collection needs all).
    pub fn load_raw(dir: &Path) -> Result<RawIndex> {
        let (idx, mut bad) = Self::load_unmerged(dir)?;
        if let Some(b) = bad.pop() {
            return Err(b.error);
        }
        let all = idx.iter().collect();
        Ok((all, idx.files))
    }

    fn build_fanout(&mut self) {
        self.fanout.clear();
        if self.entries.len() < FANOUT_MIN || self.entries.len() > u32::MAX as usize {
            return;
        }
        self.fanout.reserve(65_537);
        let mut i = 0usize;
        for p in 0..=65_536usize {
            while i < self.entries.len() && prefix(&self.entries[i].id) < p {
                i += 1;
            }
            self.fanout.push(i as u32);
        }
    }

    /// The entry of `id`, if any.
    fn find(&self, id: &ChunkId) -> Option<&IndexEntry> {
        let p = prefix(id);
        let (lo, hi) = match (self.fanout.get(p), self.fanout.get(p + 1)) {
            (Some(&lo), Some(&hi)) => (lo as usize, hi as usize),
            _ => (0, self.entries.len()),
        };
        let part = self.entries.get(lo..hi)?;
        let i = part.binary_search_by(|e| e.id.cmp(id)).ok()?;
        part.get(i)
    }

    /// Where `id` is stored, if anywhere.
    pub fn get(&self, id: &ChunkId) -> Option<Location> {
        let e = self.find(id)?;
        Some(Location {
            pack: self.packs[e.pack as usize],
            offset: u64::from(e.offset),
            frame_len: e.frame_len,
            plain_len: e.plain_len,
        })
    }

    /// Whether `id` is stored.
    pub fn contains(&self, id: &ChunkId) -> bool {
        self.find(id).is_some()
    }

    /// Number of distinct chunks.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when the repository holds no chunk.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The index files this was loaded from.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Every chunk with its location.
    pub fn iter(&self) -> impl Iterator<Item = (ChunkId, Location)> + '_ {
        self.entries.iter().map(|e| {
            (
                e.id,
                Location {
                    pack: self.packs[e.pack as usize],
                    offset: u64::from(e.offset),
                    frame_len: e.frame_len,
                    plain_len: e.plain_len,
                },
            )
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn index(ids: &[ChunkId]) -> Index {
        let mut entries: Vec<IndexEntry> = ids
            .iter()
            .enumerate()
            .map(|(n, id)| IndexEntry {
                id: *id,
                pack: 0,
                offset: n as u32,
                frame_len: 1,
                plain_len: 1,
            })
            .collect();
        entries.sort_unstable_by_key(|e| e.id);
        let mut idx = Index {
            packs: vec![PackId([7; 16])],
            entries,
            ..Index::default()
        };
        idx.build_fanout();
        idx
    }

    #[test]
    fn lookups_find_every_chunk_with_or_without_fan_out() {
        for n in [0usize, 1, 100, FANOUT_MIN + 1000] {
            let mut ids: Vec<ChunkId> = (0..n as u32)
                .map(|i| ChunkId(*blake3::hash(&i.to_le_bytes()).as_bytes()))
                .collect();
            // The first and last prefixes.
            ids.push(ChunkId([0; 32]));
            ids.push(ChunkId([0xff; 32]));
            let idx = index(&ids);
            assert_eq!(idx.fanout.is_empty(), ids.len() < FANOUT_MIN);
            for id in &ids {
                let loc = idx.get(id).unwrap();
                assert_eq!(ids[loc.offset as usize], *id);
            }
            for i in 0..1000u32 {
                let absent = ChunkId(*blake3::hash(&(i + 1_000_000).to_le_bytes()).as_bytes());
                assert!(!idx.contains(&absent));
            }
            let mut edge = [0xff; 32];
            edge[31] = 0xfe;
            assert!(!idx.contains(&ChunkId(edge)));
        }
    }
}
