//! The backup pipeline:
//!
//! ```text
//! reader ──► chunker ──► N hash/dedupe/compress workers ──► writer (packs + manifest)
//! ```
//!
//! Stages are threads joined by bounded channels, so memory stays bounded
//! (a few read buffers and chunks in flight) whatever the disk size. The
//! reader asks the source for extents one window at a time and never reads
//! holes; inside data it turns aligned all-zero blocks into zero runs. Each
//! stage records busy time, from which the run's bottleneck is named.
//!
//! Ordering: workers finish out of order; the writer appends frames to packs
//! as they come (their order is irrelevant) and puts extents back in disk
//! order by sequence number before streaming them into the manifest. The
//! manifest is published only after every pack is sealed and indexed.
//!
//! Lanes: a full read with fixed chunks, of a source that need not be
//! read in order, takes two segments of the disk in turn
//! (`read::read_full_lanes`), each cut by a chunker of its own and
//! numbered from its segment's base, so that incompressible data in one
//! (disk-bound) overlaps with compressing the other (CPU-bound); the
//! writer holds the second segment's extents until the first segment's
//! end.

//!
//! The module by concept: [`plan`](self) decides full or incremental
//! (`plan.rs`), the reader stage walks the source (`read.rs`), the chunk,
//! hash and write stages turn it into frames and a manifest
//! (`stages.rs`), and `pipeline.rs`'s `Pipeline` owns the threads and
//! channels between them; this file holds the options, the report and
//! the orchestration of one run.

mod pipeline;
mod plan;
mod read;
mod stages;

use pipeline::{Pipeline, Ran};
use plan::*;
use read::*;
use stages::*;

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::fs::File;
use std::io::BufWriter;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Instant;

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender, bounded};

use crate::cbt::{ChangeTracker, DirtyRanges, Tracking};
use crate::chunker::{DEFAULT_BLOCK_SIZE, new_chunker};
use crate::compression::Compression;
use crate::error::{Error, IoContext, Result};
use crate::format::frame::{FRAME_HEADER_LEN, FrameEncoder};
use crate::format::manifest::{
    CbtMeta, ChunkingInfo, ChunkingKind, Extent, ManifestWriter, PointMeta,
};
use crate::ids::{ChunkId, DiskName, PointId};
use crate::progress::{ProgressFn, report};
use crate::repo::{PointFile, Repository};
use crate::source::{BlockSource, ExtentKind, SourceExtent};
use crate::stats::RunStats;
use crate::store::{FrameSink, Store, StoreSession};

/// Granularity of zero detection inside data (aligned to disk offsets).
pub const ZERO_BLOCK: usize = 64 << 10;
/// Extents are asked for per window of this many bytes.
const WINDOW: u64 = 64 << 20;

/// How to run a backup.
#[derive(Clone)]
pub struct BackupOptions {
    /// Chunking algorithm and size.
    pub chunking: ChunkingInfo,
    /// Compression level.
    pub compression: Compression,
    /// Threads for hashing/compression; 0 = one per core.
    pub threads: usize,
    /// Progress callback (and cancellation).
    pub progress: Option<ProgressFn>,
    /// Pack size at which packs are sealed (tests use small packs).
    pub pack_target: u64,
    /// When the source tracks changes but an incremental cannot be built
    /// (no previous point, the disk's size changed, ...), read the whole
    /// disk instead of failing.
    pub full_if_needed: bool,
    /// Read the whole disk even when the source tracks changes (a one-off
    /// full copy); the point still records the source's checkpoint.
    pub full: bool,
}

impl std::fmt::Debug for BackupOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupOptions")
            .field("chunking", &self.chunking)
            .field("compression", &self.compression)
            .field("threads", &self.threads)
            .field("full_if_needed", &self.full_if_needed)
            .field("full", &self.full)
            .finish()
    }
}

impl Default for BackupOptions {
    fn default() -> Self {
        BackupOptions {
            chunking: ChunkingInfo {
                kind: ChunkingKind::Fixed,
                block_size: DEFAULT_BLOCK_SIZE,
            },
            compression: Compression::default(),
            threads: 0,
            progress: None,
            pack_target: crate::format::pack::PACK_TARGET_LEN,
            full_if_needed: false,
            full: false,
        }
    }
}

/// The outcome of a backup.
#[derive(Debug, Clone)]
pub struct BackupReport {
    /// The disk.
    pub disk: DiskName,
    /// The new point.
    pub point: PointId,
    /// The run's figures.
    pub stats: RunStats,
    /// The metadata stored with the point.
    pub meta: PointMeta,
    /// Why the whole disk was read although the source tracks changes
    /// (only with [`BackupOptions::full_if_needed`]).
    pub full_reason: Option<String>,
}

impl BackupReport {
    /// The point this one was derived from, for an incremental.
    pub fn parent(&self) -> Option<&str> {
        self.meta.parent.as_deref()
    }
    /// Bytes the change tracker marked changed, for an incremental.
    pub fn bytes_changed(&self) -> Option<u64> {
        self.meta.cbt.as_ref().map(|c| c.bytes_changed)
    }
}

/// Removes a temp file unless forgotten.
struct TempGuard(Option<PathBuf>);
impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Back up `source` as a new point of `disk`.
///
/// When the source tracks changes ([`BlockSource::change_tracking`]) the run
/// is incremental: only changed ranges are read, and the new point takes
/// every other extent from the disk's newest point (whose chunking it
/// keeps). With CDC, chunks are re-cut from the parent extent where a
/// change starts until a new cut meets a parent boundary again; with fixed
/// chunks that is the changed blocks. Either way the point is complete on
/// its own and restores bit-identical to the disk.
pub fn backup(
    repo: &Repository,
    source: &dyn BlockSource,
    disk: &DiskName,
    opts: &BackupOptions,
) -> Result<BackupReport> {
    backup_to(repo, source, disk, opts)
}

/// [`backup`] into any [`Store`]: a local repository or a repository
/// service. New chunks go to the store's sink; the manifest is committed
/// last, so a run that fails or is killed leaves no point behind.
pub fn backup_to(
    store: &dyn Store,
    source: &dyn BlockSource,
    disk: &DiskName,
    opts: &BackupOptions,
) -> Result<BackupReport> {
    let started = chrono::Utc::now();
    let t0 = Instant::now();
    let session = store.begin(disk, started)?;
    let point = session.point().clone();
    let (plan, chunking, full_reason) = plan(session.as_ref(), source, disk, opts)?;
    let chunker = new_chunker(chunking)?;
    let threads = match opts.threads {
        0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
        n => n,
    };
    let (mtmp_file, mtmp) = session.manifest_temp()?;
    let cleanup = TempGuard(Some(mtmp.clone()));
    let mw =
        ManifestWriter::new(BufWriter::with_capacity(1 << 20, mtmp_file)).ctx("write", &mtmp)?;
    let size = source.size();

    let Ran {
        sink,
        manifest: mw,
        read: rs,
        bytes_changed,
        busy,
        write: ws,
    } = Pipeline {
        source,
        session: session.as_ref(),
        plan: &plan,
        chunking,
        threads,
        opts,
    }
    .run(chunker, mw)?;
    if mw.size() != size {
        return Err(Error::Internal(format!(
            "pipeline described {} of {size} bytes",
            mw.size()
        )));
    }
    sink.finish()?;

    let stats = RunStats {
        bytes_total: size,
        bytes_read: rs.bytes_read,
        bytes_zero: ws.bytes_zero,
        bytes_new: ws.bytes_new,
        bytes_stored: ws.bytes_stored,
        chunks: ws.chunks,
        chunks_new: ws.chunks_new,
        seconds: t0.elapsed().as_secs_f64(),
        threads,
        busy,
    };
    let (parent, cbt) = match &plan {
        Plan::Full => (None, None),
        Plan::Incremental {
            parent, tracker, ..
        } => (
            Some(parent.to_string()),
            Some(CbtMeta {
                tracker: tracker.describe(),
                bytes_changed: bytes_changed.unwrap_or(0),
            }),
        ),
    };
    let meta = PointMeta {
        name: disk.to_string(),
        point: point.to_string(),
        disk_size: size,
        source: source.info(),
        transport: source.transport().into(),
        started: started.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        finished: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        chunking,
        compression: opts.compression.to_string(),
        parent,
        stats: stats.point_stats(),
        cbt,
        checkpoint: source.checkpoint(),
        consistency: source.consistency(),
        vm_definition: source.vm_definition(),
    };
    let out = mw.finish(&meta).ctx("write", &mtmp)?;
    let f = out
        .into_inner()
        .map_err(|e| Error::io("write", &mtmp, e.into_error()))?;
    f.sync_all().ctx("sync", &mtmp)?;
    drop(f);
    session.commit(&mtmp)?;
    // The temp file was renamed into place (local) or sent and may be
    // removed (service): the guard removes whatever is left.
    drop(cleanup);
    Ok(BackupReport {
        disk: disk.clone(),
        point,
        stats,
        meta,
        full_reason,
    })
}
