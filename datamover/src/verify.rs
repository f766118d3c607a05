//! Checking a repository. Structure: config, every index file, every point
//! manifest, every pack the index names (present, long enough, right
//! header), every chunk a point references (indexed). With `read_data`,
//! also every frame of every pack (CRC, decompression, BLAKE3). Every
//! problem is traced to the points it affects.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::format::frame::FrameDecoder;
use crate::format::manifest::Extent;
use crate::format::pack;
use crate::ids::{ChunkId, PackId};
use crate::repo::{Index, Location, Repository};
use crate::sys::LockMode;

/// A point that cannot be restored intact, and why.
#[derive(Debug, Clone, Serialize)]
pub struct DamagedPoint {
    /// `<vm>/<disk>@<point>` (or the manifest path when it cannot be read).
    pub point: String,
    /// What is wrong (first problems; `more` counts the rest).
    pub problems: Vec<String>,
    /// Problems not listed.
    pub more: usize,
}

/// What verify found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    /// Points checked.
    pub points: usize,
    /// Packs checked.
    pub packs: usize,
    /// Chunks in the index.
    pub chunks: usize,
    /// Chunks whose data was read and checked.
    pub chunks_read: usize,
    /// Problems not tied to one point (damaged index files, packs).
    pub problems: Vec<String>,
    /// Points that would not restore intact.
    pub damaged_points: Vec<DamagedPoint>,
    /// Pack files no index names (left by an interrupted backup; harmless,
    /// removed by prune).
    pub unindexed_packs: usize,
}

impl VerifyReport {
    /// True when nothing is wrong.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty() && self.damaged_points.is_empty()
    }
}

const LIST: usize = 8;

/// Verify `repo`; `read_data` reads and checks every chunk.
pub fn verify(repo: &Repository, read_data: bool) -> Result<VerifyReport> {
    let _lock = repo.lock(LockMode::Shared, true)?;
    let mut rep = VerifyReport::default();
    let (index, bad) = Index::load(&repo.root().join("index"))?;
    rep.problems
        .extend(bad.into_iter().map(|b| b.error.to_string()));
    rep.chunks = index.len();

    // Chunks by pack.
    let mut by_pack: HashMap<PackId, Vec<(ChunkId, Location)>> = HashMap::new();
    for (id, loc) in index.iter() {
        by_pack.entry(loc.pack).or_default().push((id, loc));
    }
    rep.packs = by_pack.len();
    let mut damaged: HashMap<ChunkId, String> = HashMap::new();
    let mut packs: Vec<_> = by_pack.into_iter().collect();
    packs.sort_by_key(|p| p.0);
    for (pack, chunks) in &packs {
        check_pack(repo, *pack, chunks, read_data, &mut damaged, &mut rep)?;
    }
    rep.unindexed_packs = crate::prune::pack_files(repo)?
        .into_iter()
        .filter(|(p, _)| packs.binary_search_by_key(p, |x| x.0).is_err())
        .count();

    // Points.
    for disk in repo.disks()? {
        for id in repo.point_ids(&disk)? {
            rep.points += 1;
            let name = format!("{disk}@{id}");
            let m = match repo.read_point(&disk, &id) {
                Ok(m) => m,
                Err(e) => {
                    rep.damaged_points.push(DamagedPoint {
                        point: name,
                        problems: vec![e.to_string()],
                        more: 0,
                    });
                    continue;
                }
            };
            let mut probs = Vec::new();
            let mut off = 0u64;
            for e in &m.extents {
                if let Extent::Chunk { id, .. } = e {
                    if let Some(why) = damaged.get(id) {
                        probs.push(format!("disk offset {off}: chunk {} {why}", id.short()));
                    } else if !index.contains(id) {
                        probs.push(format!(
                            "disk offset {off}: chunk {} is missing from the index",
                            id.short()
                        ));
                    }
                }
                off += e.len();
            }
            if !probs.is_empty() {
                let more = probs.len().saturating_sub(LIST);
                probs.truncate(LIST);
                rep.damaged_points.push(DamagedPoint {
                    point: name,
                    problems: probs,
                    more,
                });
            }
        }
    }
    Ok(rep)
}

fn check_pack(
    repo: &Repository,
    pack: PackId,
    chunks: &[(ChunkId, Location)],
    read_data: bool,
    damaged: &mut HashMap<ChunkId, String>,
    rep: &mut VerifyReport,
) -> Result<()> {
    let path = repo.pack_path(&pack);
    let mut mark = |chunks: &[(ChunkId, Location)], why: &str| {
        for (id, loc) in chunks {
            damaged.insert(
                *id,
                format!("in pack {pack} at offset {}: {why}", loc.offset),
            );
        }
    };
    let mut f = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            rep.problems
                .push(format!("pack {pack} is missing ({} chunks)", chunks.len()));
            mark(chunks, "is lost: pack file missing");
            return Ok(());
        }
        Err(e) => return Err(Error::io("open", &path, e)),
    };
    let len = f.metadata().map_err(|e| Error::io("stat", &path, e))?.len();
    let mut head = [0u8; pack::PACK_HEADER_LEN];
    let head_ok = f.read_exact(&mut head).is_ok() && matches!(pack::check_header(&head), Ok(None));
    if !head_ok {
        rep.problems
            .push(format!("pack {pack} has a damaged header"));
    }
    let short: Vec<_> = chunks
        .iter()
        .filter(|(_, l)| l.offset + u64::from(l.frame_len) > len)
        .copied()
        .collect();
    if !short.is_empty() {
        rep.problems.push(format!(
            "pack {pack} is truncated to {len} bytes ({} chunks lost)",
            short.len()
        ));
        mark(&short, "is lost: pack truncated");
    }
    if !read_data {
        return Ok(());
    }
    let reader = crate::repo::PackReader::new(repo);
    let mut dec = FrameDecoder::new().map_err(|e| Error::Internal(e.to_string()))?;
    let mut bad = BTreeMap::new();
    for (id, loc) in chunks {
        if loc.offset + u64::from(loc.frame_len) > len {
            continue;
        }
        rep.chunks_read += 1;
        if let Err(e) = reader.read_chunk(&mut dec, *id, loc) {
            let why = match e {
                Error::ChunkDamaged { detail, .. } => detail,
                e => e.to_string(),
            };
            bad.insert(loc.offset, (*id, why));
        }
    }
    if !bad.is_empty() {
        rep.problems
            .push(format!("pack {pack}: {} damaged chunks", bad.len()));
    }
    for (off, (id, why)) in bad {
        damaged.insert(id, format!("in pack {pack} at offset {off}: {why}"));
    }
    Ok(())
}
