//! The in-memory chunk index: the union of every index file, as one sorted
//! array (48 bytes a chunk, binary search), so a million chunks load in a
//! fraction of a second and take about 50 MB.
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

    /// Where `id` is stored, if anywhere.
    pub fn get(&self, id: &ChunkId) -> Option<Location> {
        let i = self.entries.binary_search_by(|e| e.id.cmp(id)).ok()?;
        let e = &self.entries[i];
        Some(Location {
            pack: self.packs[e.pack as usize],
            offset: u64::from(e.offset),
            frame_len: e.frame_len,
            plain_len: e.plain_len,
        })
    }

    /// Whether `id` is stored.
    pub fn contains(&self, id: &ChunkId) -> bool {
        self.entries.binary_search_by(|e| e.id.cmp(id)).is_ok()
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
