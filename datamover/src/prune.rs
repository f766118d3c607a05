//! Retention and garbage collection.
//!
//! `prune` forgets points outside the keep policy, then collects garbage:
//! packs with no referenced chunk are deleted, packs with at least
//! [`PruneOptions::repack_waste`] of dead bytes are rewritten with their
//! live frames only (copied verbatim after a full check), every index file
//! is replaced by one, and pack files no index names (left by interrupted
//! backups) and stale temp files are removed.
//!
//! Safety: all of it runs under the repository's exclusive lock, which
//! waits for running backups (they hold it shared) and makes new ones wait,
//! so no chunk a backup has chosen to reuse can disappear under it. Order of
//! writes: new packs, new index, then deletions; a crash at any step leaves
//! a repository where every kept point restores (at worst with garbage left
//! for the next prune). A point whose manifest cannot be read stops garbage
//! collection rather than risk deleting what it references.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use chrono::{Datelike, NaiveDateTime};
use serde::Serialize;

use crate::error::{Error, IoContext, Result};
use crate::format::frame::FrameDecoder;
use crate::format::index::{self as fmt, IndexEntry};
use crate::format::manifest::Extent;
use crate::format::pack::PACK_HEADER_LEN;
use crate::ids::{ChunkId, DiskName, PackId, PointId, hex, random_bytes};
use crate::repo::{Index, PackReader, PackWriter, Repository};
use crate::sys::LockMode;

/// Which points to keep, per disk. A point is kept if any rule keeps it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeepPolicy {
    /// The newest N points.
    pub last: Option<usize>,
    /// The newest point of each of the last N days that have points.
    pub daily: Option<usize>,
    /// ... of each of the last N ISO weeks.
    pub weekly: Option<usize>,
    /// ... of each of the last N months.
    pub monthly: Option<usize>,
}

impl KeepPolicy {
    fn is_empty(&self) -> bool {
        self.last.is_none()
            && self.daily.is_none()
            && self.weekly.is_none()
            && self.monthly.is_none()
    }
}

/// How to prune.
#[derive(Debug, Clone, Copy)]
pub struct PruneOptions {
    /// Retention.
    pub keep: KeepPolicy,
    /// Only report what would be done.
    pub dry_run: bool,
    /// Repack a pack once this fraction of it is dead (default 0.1).
    pub repack_waste: f64,
}

impl Default for PruneOptions {
    fn default() -> Self {
        PruneOptions {
            keep: KeepPolicy::default(),
            dry_run: false,
            repack_waste: 0.1,
        }
    }
}

/// What prune did (or would do).
#[derive(Debug, Clone, Default, Serialize)]
pub struct PruneReport {
    /// Points kept.
    pub points_kept: usize,
    /// Points forgotten, as `<vm>/<disk>@<point>`.
    pub points_removed: Vec<String>,
    /// Packs deleted whole.
    pub packs_deleted: usize,
    /// Packs rewritten.
    pub packs_repacked: usize,
    /// Pack files no index named, deleted.
    pub orphan_packs_deleted: usize,
    /// Chunks dropped.
    pub chunks_removed: usize,
    /// Bytes freed in pack files.
    pub bytes_freed: u64,
}

/// Choose the points to forget for one disk (ids oldest first).
pub fn select_forget(ids: &[PointId], keep: &KeepPolicy) -> Vec<PointId> {
    let mut kept = vec![false; ids.len()];
    let newest_first: Vec<usize> = (0..ids.len()).rev().collect();
    if let Some(n) = keep.last {
        for &i in newest_first.iter().take(n) {
            kept[i] = true;
        }
    }
    let time = |id: &PointId| id.time().map(|t| t.naive_utc());
    let mut bucket = |n: Option<usize>, key: &dyn Fn(NaiveDateTime) -> (i32, u32)| {
        let Some(n) = n else { return };
        let mut seen = HashSet::new();
        for &i in &newest_first {
            if let Some(t) = time(&ids[i]) {
                if seen.len() < n && seen.insert(key(t)) {
                    kept[i] = true;
                }
            }
        }
    };
    bucket(keep.daily, &|t| (t.year(), t.ordinal()));
    bucket(keep.weekly, &|t| (t.iso_week().year(), t.iso_week().week()));
    bucket(keep.monthly, &|t| (t.year(), t.month()));
    ids.iter()
        .zip(kept)
        .filter(|(_, k)| !k)
        .map(|(i, _)| i.clone())
        .collect()
}

/// Every pack file on disk with its size.
pub(crate) fn pack_files(repo: &Repository) -> Result<Vec<(PackId, u64)>> {
    let root = repo.root().join("packs");
    let mut out = Vec::new();
    for sub in std::fs::read_dir(&root).ctx("list", &root)? {
        let sub = sub.ctx("list", &root)?.path();
        if !sub.is_dir() {
            continue;
        }
        for f in std::fs::read_dir(&sub).ctx("list", &sub)? {
            let f = f.ctx("list", &sub)?;
            let name = f.file_name();
            let name = name.to_string_lossy();
            if let Some(id) = name.strip_suffix(".pack").and_then(PackId::from_hex) {
                out.push((id, f.metadata().ctx("stat", &f.path())?.len()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Forget points outside `opts.keep` and collect garbage.
pub fn prune(repo: &Repository, opts: &PruneOptions) -> Result<PruneReport> {
    if opts.keep.is_empty() {
        return Err(Error::InvalidArgument(
            "give at least one of --keep-last, --keep-daily, --keep-weekly, --keep-monthly".into(),
        ));
    }
    let lock = match repo.lock(LockMode::Exclusive, false)? {
        Some(l) => l,
        None => {
            tracing::info!("waiting for running backups to finish before pruning");
            repo.lock(LockMode::Exclusive, true)?
                .ok_or_else(|| Error::Internal("lock".into()))?
        }
    };
    let mut rep = PruneReport::default();
    let mut survivors: Vec<(DiskName, PointId)> = Vec::new();
    for disk in repo.disks()? {
        let ids = repo.point_ids(&disk)?;
        let forget = select_forget(&ids, &opts.keep);
        for id in ids {
            if forget.contains(&id) {
                rep.points_removed.push(format!("{disk}@{id}"));
                if !opts.dry_run {
                    let p = repo.point_path(&disk, &id);
                    std::fs::remove_file(&p).ctx("remove", &p)?;
                }
            } else {
                survivors.push((disk.clone(), id));
            }
        }
        if !opts.dry_run {
            crate::repo::sync_dir(&repo.disk_dir(&disk))?;
        }
    }
    rep.points_kept = survivors.len();

    // Everything still referenced.
    let mut live: HashSet<ChunkId> = HashSet::new();
    for (disk, id) in &survivors {
        let m = repo.read_point(disk, id).map_err(|e| {
            Error::InvalidArgument(format!(
                "garbage collection stopped, nothing deleted but forgotten points: point {disk}@{id} cannot be read ({e})"
            ))
        })?;
        live.extend(m.extents.iter().filter_map(|e| match e {
            Extent::Chunk { id, .. } => Some(*id),
            Extent::Zero { .. } => None,
        }));
    }
    let index = repo.load_index()?;
    let files = pack_files(repo)?;
    let sizes: HashMap<PackId, u64> = files.iter().copied().collect();

    // Live bytes per indexed pack.
    let mut per_pack: HashMap<PackId, (u64, Vec<(ChunkId, crate::repo::Location)>)> =
        HashMap::new();
    for (id, loc) in index.iter() {
        let e = per_pack.entry(loc.pack).or_default();
        if live.contains(&id) {
            e.0 += u64::from(loc.frame_len);
            e.1.push((id, loc));
        } else {
            rep.chunks_removed += 1;
        }
    }
    let mut delete: Vec<PackId> = Vec::new();
    let mut repack: Vec<PackId> = Vec::new();
    for (pack, (live_bytes, chunks)) in &per_pack {
        let size = sizes.get(pack).copied().unwrap_or(0);
        if chunks.is_empty() {
            delete.push(*pack);
        } else if size > 0
            && (size.saturating_sub(PACK_HEADER_LEN as u64 + live_bytes)) as f64
                >= opts.repack_waste * size as f64
        {
            repack.push(*pack);
        }
    }
    let orphans: Vec<PackId> = files
        .iter()
        .map(|f| f.0)
        .filter(|p| !per_pack.contains_key(p))
        .collect();
    rep.orphan_packs_deleted = orphans.len();
    rep.packs_deleted = delete.len();
    if opts.dry_run {
        rep.packs_repacked = repack.len();
        rep.bytes_freed = delete
            .iter()
            .chain(&orphans)
            .filter_map(|p| sizes.get(p))
            .sum();
        return Ok(rep);
    }

    // Repack: copy checked live frames into new packs.
    let reader = PackReader::new(repo);
    let mut dec = FrameDecoder::new().map_err(|e| Error::Internal(e.to_string()))?;
    let mut writer = PackWriter::new(repo);
    let mut repacked: Vec<PackId> = Vec::new();
    for pack in &repack {
        let chunks = &per_pack[pack].1;
        let mut frames = Vec::with_capacity(chunks.len());
        let mut sound = true;
        for (id, loc) in chunks {
            match reader.read_frame(*id, loc).and_then(|f| {
                dec.check(&f, Some(*id))
                    .map(|()| f)
                    .map_err(Error::Internal)
            }) {
                Ok(f) => frames.push((*id, loc.plain_len, f)),
                Err(e) => {
                    tracing::warn!(
                        "pack {pack} not repacked: chunk {} is damaged ({e})",
                        id.short()
                    );
                    sound = false;
                    break;
                }
            }
        }
        if sound {
            for (id, plain, f) in frames {
                writer.add(id, plain, &f)?;
            }
            repacked.push(*pack);
        }
    }
    writer.commit()?;
    rep.packs_repacked = repacked.len();

    // One index of every live chunk in a surviving pack. Reload so that the
    // new packs' entries are included; prefer locations outside dead packs.
    let gone: HashSet<PackId> = delete
        .iter()
        .chain(&repacked)
        .chain(&orphans)
        .copied()
        .collect();
    let (mut all, old_files) = Index::load_raw(&repo.root().join("index"))?;
    all.retain(|(id, loc)| live.contains(id) && !gone.contains(&loc.pack));
    all.sort_by_key(|a| a.0);
    all.dedup_by(|a, b| a.0 == b.0);
    let mut packs: Vec<PackId> = all.iter().map(|(_, l)| l.pack).collect();
    packs.sort();
    packs.dedup();
    let mut entries: Vec<IndexEntry> = all
        .iter()
        .map(|(id, l)| IndexEntry {
            id: *id,
            pack: packs.binary_search(&l.pack).unwrap_or(0) as u32,
            offset: l.offset as u32,
            frame_len: l.frame_len,
            plain_len: l.plain_len,
        })
        .collect();
    let bytes = fmt::encode(&packs, &mut entries);
    let name = format!("{}.idx", hex(&random_bytes::<16>()?));
    let new_index = repo.write_atomic(&repo.root().join("index"), &name, &bytes)?;
    for f in old_files.iter().filter(|f| **f != new_index) {
        std::fs::remove_file(f).ctx("remove", f)?;
    }
    crate::repo::sync_dir(&repo.root().join("index"))?;
    for p in &gone {
        let path = repo.pack_path(p);
        match std::fs::remove_file(&path) {
            Ok(()) => rep.bytes_freed += sizes.get(p).copied().unwrap_or(0),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("remove", &path, e)),
        }
    }
    clean_tmp(repo)?;
    drop(lock);
    Ok(rep)
}

fn clean_tmp(repo: &Repository) -> Result<()> {
    let dir: PathBuf = repo.root().join("tmp");
    for f in std::fs::read_dir(&dir).ctx("list", &dir)? {
        let p = f.ctx("list", &dir)?.path();
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}
