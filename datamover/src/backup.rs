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
    CbtMeta, ChunkingInfo, ChunkingKind, Extent, ManifestWriter, PointMeta, PointStats,
};
use crate::ids::{ChunkId, DiskName, PointId};
use crate::progress::{ProgressFn, report};
use crate::repo::Repository;
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

/// What the reader sends the chunker, in disk order.
#[derive(Debug)]
enum ReadMsg {
    /// Bytes read at an offset.
    Data(u64, Bytes),
    /// Zeros: (offset, length).
    Zero(u64, u64),
    /// An unchanged extent of the parent point, taken as it is.
    Reuse(Extent),
}

impl ReadMsg {
    /// (offset, length) of data and zero runs.
    fn span(&self) -> (u64, u64) {
        match self {
            ReadMsg::Data(o, b) => (*o, b.len() as u64),
            ReadMsg::Zero(o, l) => (*o, *l),
            ReadMsg::Reuse(e) => (0, e.len()),
        }
    }
}

enum Work {
    Chunk(u64, Bytes),
    Zero(u64, u64),
    Known(u64, ChunkId, u32),
}

enum Done {
    New {
        seq: u64,
        id: ChunkId,
        len: u32,
        frame: Vec<u8>,
    },
    Known {
        seq: u64,
        id: ChunkId,
        len: u32,
    },
    Zero {
        seq: u64,
        len: u64,
    },
}

#[derive(Default)]
struct ReadStats {
    busy: f64,
    bytes_read: u64,
}

#[derive(Default)]
struct WriteStats {
    busy: f64,
    bytes_zero: u64,
    bytes_new: u64,
    bytes_stored: u64,
    chunks: u64,
    chunks_new: u64,
}

/// How the reader covers the disk.
enum Plan<'s> {
    /// Read every allocated byte.
    Full,
    /// Read what changed; take the rest from the parent point.
    Incremental {
        parent: PointId,
        extents: Vec<Extent>,
        tracker: &'s dyn ChangeTracker,
    },
}

/// Decide between a full and an incremental run: (plan, chunking to use,
/// why a tracked source is read in full).
fn plan<'s>(
    session: &dyn StoreSession,
    source: &'s dyn BlockSource,
    disk: &DiskName,
    opts: &BackupOptions,
) -> Result<(Plan<'s>, ChunkingInfo, Option<String>)> {
    let tracker = match source.change_tracking() {
        _ if opts.full => return Ok((Plan::Full, opts.chunking, None)),
        Tracking::Off => return Ok((Plan::Full, opts.chunking, None)),
        Tracking::On(t) => Ok(t),
        Tracking::Unavailable(why) => Err(why),
    };
    let size = source.size();
    let why = match tracker {
        Err(why) => why,
        Ok(tracker) => match session.parent()? {
            None => format!("{disk} has no previous point to build on"),
            Some((parent, m)) => {
                let since = tracker.since_checkpoint();
                if since.is_some() && m.meta.checkpoint != since {
                    format!(
                        "the changes are tracked since checkpoint {}, but the previous point {parent} {}",
                        since.as_deref().unwrap_or_default(),
                        match &m.meta.checkpoint {
                            Some(c) => format!("started checkpoint {c}"),
                            None => "started no checkpoint (it was not taken from this VM)".into(),
                        }
                    )
                } else if m.meta.disk_size != size {
                    format!(
                        "the disk is {size} bytes but its previous point {parent} is {} bytes",
                        m.meta.disk_size
                    )
                } else if let Some(id) = session.missing_of(&m) {
                    format!(
                        "chunk {} of the previous point {parent} is missing from the repository (run `dm verify`)",
                        id.short()
                    )
                } else {
                    let chunking = m.meta.chunking;
                    return Ok((
                        Plan::Incremental {
                            parent,
                            extents: m.extents,
                            tracker,
                        },
                        chunking,
                        None,
                    ));
                }
            }
        },
    };
    if opts.full_if_needed {
        Ok((Plan::Full, opts.chunking, Some(why)))
    } else {
        Err(Error::IncrementalImpossible {
            disk: disk.clone(),
            reason: why,
        })
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
    let mut chunker = new_chunker(chunking)?;
    let threads = match opts.threads {
        0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
        n => n,
    };
    let (mtmp_file, mtmp) = session.manifest_temp()?;
    let cleanup = TempGuard(Some(mtmp.clone()));
    let mw =
        ManifestWriter::new(BufWriter::with_capacity(1 << 20, mtmp_file)).ctx("write", &mtmp)?;
    let size = source.size();

    let (read_tx, read_rx) = bounded::<ReadMsg>(8);
    let (work_tx, work_rx) = bounded::<Work>(threads * 2 + 2);
    let (done_tx, done_rx) = bounded::<Done>(threads * 2 + 2);
    let inflight = Mutex::new(HashSet::<ChunkId>::new());

    let (rres, cres, wres, outres) = std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let mut sc = Scanner::new(source, &opts.progress);
            let changed = match &plan {
                Plan::Full => read_full(&mut sc, &read_tx).map(|()| None),
                Plan::Incremental {
                    extents, tracker, ..
                } => {
                    let mut dirty = DirtyRanges::new(*tracker, size, WINDOW);
                    let parent = ParentExtents::new(extents);
                    read_incremental(&mut sc, &mut dirty, &parent, chunking, &read_tx)
                        .map(|()| Some(dirty.bytes))
                }
            };
            drop(read_tx);
            changed.map(|c| (sc.st, c))
        });
        let chunk = s.spawn(move || {
            let t = Instant::now();
            let r = chunk_stage(&mut *chunker, read_rx, work_tx);
            r.map(|busy| busy.min(t.elapsed().as_secs_f64()))
        });
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                let (rx, tx) = (work_rx.clone(), done_tx.clone());
                let (session, inflight) = (session.as_ref(), &inflight);
                s.spawn(move || hash_stage(session, inflight, opts.compression, rx, tx))
            })
            .collect();
        drop((work_rx, done_tx));
        let writer = s.spawn(|| {
            let mut sink = session.sink(opts.pack_target)?;
            let r = write_stage(sink.as_mut(), mw, done_rx);
            r.map(|(mw, ws)| (sink, mw, ws))
        });
        let rres = join(reader);
        let cres = join(chunk);
        let wres: Result<f64> = workers.into_iter().map(join).sum();
        (rres, cres, wres, join(writer))
    });
    // The writer's error is the root cause when it stopped first.
    let (sink, mw, ws) = outres?;
    let (rs, bytes_changed) = rres?;
    let chunk_busy = cres?;
    let hash_busy = wres?;
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
        busy: crate::stats::StageBusy {
            read: rs.busy,
            chunk: chunk_busy,
            hash_compress: hash_busy,
            write: ws.busy,
        },
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
        stats: PointStats {
            bytes_read: stats.bytes_read,
            bytes_zero: stats.bytes_zero,
            bytes_new: stats.bytes_new,
            bytes_stored: stats.bytes_stored,
            chunks: stats.chunks,
            chunks_new: stats.chunks_new,
            seconds: stats.seconds,
            bottleneck: stats.bottleneck().to_string(),
        },
        cbt,
        checkpoint: source.checkpoint(),
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

/// Removes a temp file unless forgotten.
struct TempGuard(Option<PathBuf>);
impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn join<T>(h: std::thread::ScopedJoinHandle<'_, Result<T>>) -> Result<T> {
    h.join()
        .unwrap_or_else(|_| Err(Error::Internal("a pipeline thread panicked".into())))
}

/// Reads the source in order, one preferred-size piece at a time, asking
/// for extents one window at a time; holes and zero extents are not read.
struct Scanner<'a> {
    src: &'a dyn BlockSource,
    progress: &'a Option<ProgressFn>,
    size: u64,
    io: u64,
    /// Extents (holes left out) of the window `[win.0, win.1)`.
    exts: Vec<SourceExtent>,
    win: (u64, u64),
    reported: u64,
    /// Reads announced with `will_read` end here.
    hinted: u64,
    st: ReadStats,
}

impl<'a> Scanner<'a> {
    fn new(src: &'a dyn BlockSource, progress: &'a Option<ProgressFn>) -> Self {
        let io = src
            .preferred_io_size()
            .clamp(ZERO_BLOCK, 16 << 20)
            .next_power_of_two() as u64;
        Scanner {
            src,
            progress,
            size: src.size(),
            io,
            exts: Vec::new(),
            win: (0, 0),
            reported: 0,
            hinted: 0,
            st: ReadStats::default(),
        }
    }

    /// Tell progress the reader is at `pos`; an error when cancelled.
    fn report(&mut self, pos: u64) -> Result<()> {
        self.reported = self.reported.max(pos);
        if report(self.progress, self.reported, self.size) {
            Ok(())
        } else {
            Err(Error::Cancelled)
        }
    }

    /// Announce the reads that follow `[.., end)` inside this window's
    /// data extents and before `limit`, up to the source's read-ahead.
    fn hint(&mut self, end: u64, limit: u64) {
        let n = self.src.read_ahead();
        if n == 0 {
            return;
        }
        let mut p = self.hinted.max(end);
        let horizon = limit.min(end + n as u64 * self.io);
        let mut i = self.exts.partition_point(|e| e.offset + e.len <= p);
        while p < horizon {
            let Some(e) = self.exts.get(i).copied() else {
                break;
            };
            if e.kind != ExtentKind::Data || e.offset + e.len <= p {
                i += 1;
                continue;
            }
            p = p.max(e.offset);
            if p >= horizon {
                break;
            }
            let to = (e.offset + e.len)
                .min((p / self.io + 1) * self.io)
                .min(limit);
            self.src.will_read(p, (to - p) as usize);
            p = to;
        }
        self.hinted = p.max(self.hinted);
    }

    /// Describe the disk from `pos` on (at most to the next preferred-size
    /// boundary, extent edge or `limit`) into `out`; returns where it stopped.
    fn step(&mut self, pos: u64, limit: u64, out: &mut Vec<ReadMsg>) -> Result<u64> {
        if pos < self.win.0 || pos >= self.win.1 {
            // Windows (and reads) sit on a grid of absolute offsets, so a
            // region read from the middle of the disk sees the same pieces
            // as a full read: same zero runs, same chunks.
            let w = WINDOW.max(self.io);
            let wend = self.size.min((pos / w + 1) * w);
            let t = Instant::now();
            let exts = self.src.extents(pos, wend - pos)?;
            self.st.busy += t.elapsed().as_secs_f64();
            let mut at = pos;
            for e in &exts {
                if e.offset < at || e.len == 0 || e.offset + e.len > wend {
                    return Err(Error::Internal(format!(
                        "source reported extent {}+{} outside window {at}..{wend}",
                        e.offset, e.len
                    )));
                }
                at = e.offset + e.len;
            }
            self.exts = exts
                .into_iter()
                .filter(|e| e.kind != ExtentKind::Hole)
                .collect();
            self.win = (pos, wend);
        }
        let i = self.exts.partition_point(|e| e.offset + e.len <= pos);
        Ok(match self.exts.get(i).copied() {
            Some(e) if e.offset <= pos && e.kind == ExtentKind::Data => {
                let end = (e.offset + e.len)
                    .min((pos / self.io + 1) * self.io)
                    .min(limit);
                // From the zero block's start, so a read that starts inside
                // one (an incremental region) judges it as a full read does.
                let from = e.offset.max(pos - pos % ZERO_BLOCK as u64);
                self.hint(end, limit);
                let t = Instant::now();
                let buf = self.src.read_bytes(from, (end - from) as usize)?;
                self.st.busy += t.elapsed().as_secs_f64();
                if buf.len() as u64 != end - from {
                    return Err(Error::Internal(format!(
                        "source returned {} bytes for a read of {}",
                        buf.len(),
                        end - from
                    )));
                }
                self.st.bytes_read += end - from;
                let first = out.len();
                split_zero(from, buf, out);
                if from < pos {
                    let read: Vec<ReadMsg> = out.drain(first..).collect();
                    for m in read {
                        let (o, l) = m.span();
                        if o + l <= pos {
                            continue;
                        }
                        let skip = pos.saturating_sub(o);
                        out.push(match m {
                            ReadMsg::Data(o, b) => {
                                ReadMsg::Data(o + skip, b.slice(skip as usize..))
                            }
                            ReadMsg::Zero(o, l) => ReadMsg::Zero(o + skip, l - skip),
                            r @ ReadMsg::Reuse(_) => r,
                        });
                    }
                }
                end
            }
            Some(e) if e.offset <= pos => {
                let end = (e.offset + e.len).min(limit);
                out.push(ReadMsg::Zero(pos, end - pos));
                end
            }
            Some(e) => {
                let end = e.offset.min(limit);
                out.push(ReadMsg::Zero(pos, end - pos));
                end
            }
            None => {
                let end = self.win.1.min(limit);
                out.push(ReadMsg::Zero(pos, end - pos));
                end
            }
        })
    }
}

/// A full run: every byte of the disk, in order.
fn read_full(sc: &mut Scanner<'_>, tx: &Sender<ReadMsg>) -> Result<()> {
    let mut out = Vec::new();
    let mut pos = 0u64;
    sc.report(0)?;
    while pos < sc.size {
        pos = sc.step(pos, sc.size, &mut out)?;
        for m in out.drain(..) {
            if tx.send(m).is_err() {
                return Ok(());
            }
        }
        sc.report(pos)?;
    }
    Ok(())
}

/// The parent point's extents with their disk offsets.
struct ParentExtents<'a> {
    extents: &'a [Extent],
    /// `starts[i]` is where extent `i` begins; `starts[n]` is the disk size.
    starts: Vec<u64>,
}

impl<'a> ParentExtents<'a> {
    fn new(extents: &'a [Extent]) -> Self {
        let mut starts = Vec::with_capacity(extents.len() + 1);
        let mut at = 0u64;
        starts.push(0);
        for e in extents {
            at += e.len();
            starts.push(at);
        }
        ParentExtents { extents, starts }
    }

    /// Index of the extent holding `b` (`n` at the disk's end).
    fn extent_at(&self, b: u64) -> usize {
        self.starts.partition_point(|s| *s <= b).saturating_sub(1)
    }

    /// Where the parent's extents may be taken up again: its extent
    /// starts, and every zero block inside its zero runs (a zero run can
    /// be split anywhere a full read would cut it).
    fn is_boundary(&self, b: u64) -> bool {
        let i = self.extent_at(b);
        self.starts[i] == b
            || (matches!(self.extents.get(i), Some(Extent::Zero { .. }))
                && b % ZERO_BLOCK as u64 == 0)
    }

    /// The first boundary after `after`, if any.
    fn next_boundary(&self, after: u64) -> Option<u64> {
        let i = self.starts.partition_point(|s| *s <= after);
        let next = self.starts.get(i).copied();
        if let Some(Extent::Zero { .. }) = i.checked_sub(1).and_then(|j| self.extents.get(j)) {
            let z = (after / ZERO_BLOCK as u64 + 1) * ZERO_BLOCK as u64;
            if next.is_none_or(|n| z < n) {
                return Some(z);
            }
        }
        next
    }

    /// The parent's extents from `pos` (a boundary) to the end of the
    /// extent holding it: the extent itself, or the rest of a zero run.
    fn from(&self, pos: u64) -> (Extent, u64) {
        let i = self.extent_at(pos);
        let end = self.starts[i + 1];
        match self.extents[i] {
            Extent::Zero { .. } => (Extent::Zero { len: end - pos }, end),
            e => (e, end),
        }
    }
}

/// An incremental run: unchanged parent extents are sent as they are;
/// from the parent extent where a change starts, the disk is read and
/// chunked again (see [`read_region`]).
fn read_incremental(
    sc: &mut Scanner<'_>,
    dirty: &mut DirtyRanges<'_>,
    parent: &ParentExtents<'_>,
    chunking: ChunkingInfo,
    tx: &Sender<ReadMsg>,
) -> Result<()> {
    let size = sc.size;
    let n = parent.extents.len();
    if parent.starts[n] != size {
        return Err(Error::Internal(
            "parent point does not cover the disk".into(),
        ));
    }
    let mut pos = 0u64;
    sc.report(0)?;
    loop {
        let next = dirty.next_range()?;
        let ds = next.map_or(size, |r| r.0);
        while pos < size {
            let (e, end) = parent.from(pos);
            if end > ds {
                break;
            }
            if tx.send(ReadMsg::Reuse(e)).is_err() {
                return Ok(());
            }
            if end / WINDOW != pos / WINDOW {
                sc.report(end)?;
            }
            pos = end;
        }
        let Some((_, de)) = next else { break };
        // A change inside a zero run: keep the zeros up to the zero block
        // holding the change (a full read cuts there too), read from there.
        if let Extent::Zero { .. } = parent.extents[parent.extent_at(pos)] {
            let z = ds - ds % ZERO_BLOCK as u64;
            if z > pos {
                if tx
                    .send(ReadMsg::Reuse(Extent::Zero { len: z - pos }))
                    .is_err()
                {
                    return Ok(());
                }
                pos = z;
            }
        }
        match read_region(sc, dirty, parent, pos, de, chunking, tx)? {
            Some(b) => pos = b,
            None => return Ok(()),
        }
    }
    sc.report(size)
}

/// Follows the cuts a chunker makes on the stream the reader produces:
/// where every chunk ends and where zero runs lie.
struct Shadow {
    chunker: Box<dyn crate::chunker::Chunker>,
    /// Offset of the next byte to be cut.
    cur: u64,
    next_data: Option<u64>,
    /// Boundaries seen, in order: (end, whether the stretch before was zeros).
    events: Vec<(u64, bool)>,
}

impl Shadow {
    /// Run `f` on the chunker, recording the cuts it makes.
    fn with(&mut self, f: impl FnOnce(&mut dyn crate::chunker::Chunker, &mut dyn FnMut(Bytes))) {
        let (cur, events) = (&mut self.cur, &mut self.events);
        f(&mut *self.chunker, &mut |c: Bytes| {
            *cur += c.len() as u64;
            events.push((*cur, false));
        });
    }
    fn feed(&mut self, m: &ReadMsg) {
        match m {
            ReadMsg::Data(off, b) => {
                if self.next_data != Some(*off) {
                    self.finish();
                    self.cur = *off;
                    self.with(|c, cut| c.start(*off, cut));
                }
                self.next_data = Some(off + b.len() as u64);
                self.with(|c, cut| c.push(b.clone(), cut));
            }
            ReadMsg::Zero(off, len) => {
                self.finish();
                self.next_data = None;
                self.cur = off + len;
                self.events.push((self.cur, true));
            }
            ReadMsg::Reuse(_) => {}
        }
    }
    fn finish(&mut self) {
        self.with(|c, cut| c.finish(cut));
    }
}

/// Send the queued messages that lie before `limit`, splitting the one
/// across it. False when the receiver is gone.
fn send_upto(q: &mut VecDeque<ReadMsg>, limit: u64, tx: &Sender<ReadMsg>) -> bool {
    while let Some(m) = q.pop_front() {
        let (off, len) = m.span();
        if off >= limit {
            q.push_front(m);
            break;
        }
        let m = if off + len <= limit {
            m
        } else {
            let n = limit - off;
            let (head, tail) = match m {
                ReadMsg::Data(o, b) => (
                    ReadMsg::Data(o, b.slice(..n as usize)),
                    ReadMsg::Data(o + n, b.slice(n as usize..)),
                ),
                ReadMsg::Zero(o, l) => (ReadMsg::Zero(o, n), ReadMsg::Zero(o + n, l - n)),
                r @ ReadMsg::Reuse(_) => (r, ReadMsg::Zero(limit, 0)),
            };
            q.push_front(tail);
            head
        };
        if tx.send(m).is_err() {
            return false;
        }
    }
    true
}

/// Read from `start` (a parent boundary where a change lies) until a
/// boundary `b` that is both a parent boundary and a cut of the new stream,
/// with no change left before it; everything before `b` is sent, what was
/// read past it is dropped. Returns `b`, or `None` when the receiver is
/// gone.
///
/// Bytes are right whatever the cuts are; the resync rule only decides how
/// much is read again and how well it dedupes. Messages are held back only
/// while the chunker has not decided its cuts (at most a maximum chunk
/// plus one read), so memory stays bounded however long a region runs.
fn read_region(
    sc: &mut Scanner<'_>,
    dirty: &mut DirtyRanges<'_>,
    parent: &ParentExtents<'_>,
    start: u64,
    mut de: u64,
    chunking: ChunkingInfo,
    tx: &Sender<ReadMsg>,
) -> Result<Option<u64>> {
    let size = sc.size;
    let mut shadow = Shadow {
        chunker: new_chunker(chunking)?,
        cur: start,
        next_data: None,
        events: Vec::new(),
    };
    let mut queue: VecDeque<ReadMsg> = VecDeque::new();
    let mut out = Vec::new();
    let (mut read_pos, mut decided) = (start, start);
    loop {
        if read_pos < size {
            // Read no further than the first parent boundary at or past the
            // changes: with fixed chunks that is where the new cut lands.
            let want = de.max(read_pos + 1);
            let limit = if parent.is_boundary(want) {
                want
            } else {
                parent.next_boundary(want).unwrap_or(size)
            };
            read_pos = sc.step(read_pos, limit, &mut out)?;
            for m in out.drain(..) {
                shadow.feed(&m);
                queue.push_back(m);
            }
        }
        if read_pos >= size {
            shadow.finish();
        }
        for (end, zeros) in std::mem::take(&mut shadow.events) {
            // Candidates: after a zero stretch, every boundary up to its end;
            // after a chunk, only its end.
            let mut cand = if zeros {
                parent.next_boundary(decided)
            } else {
                Some(end).filter(|b| parent.is_boundary(*b))
            };
            while let Some(b) = cand.filter(|b| *b <= end) {
                while let Some((s, e)) = dirty.peek()? {
                    if s >= b {
                        break;
                    }
                    de = de.max(e);
                    dirty.next_range()?;
                }
                if b >= de {
                    if !send_upto(&mut queue, b, tx) {
                        return Ok(None);
                    }
                    return Ok(Some(b));
                }
                cand = if zeros {
                    parent.next_boundary(de - 1)
                } else {
                    None
                };
            }
            decided = end;
        }
        if !send_upto(&mut queue, decided, tx) {
            return Ok(None);
        }
        sc.report(read_pos)?;
        if read_pos >= size && queue.is_empty() {
            return Err(Error::Internal(format!(
                "incremental region from {start} found no end"
            )));
        }
    }
}

/// Push `buf` (read at `offset`) as data runs and zero runs; aligned
/// [`ZERO_BLOCK`]s (or their parts at the buffer's edges) that are all zero
/// become zero runs.
fn split_zero(offset: u64, buf: Bytes, out: &mut Vec<ReadMsg>) {
    static ZEROS: [u8; ZERO_BLOCK] = [0; ZERO_BLOCK];
    let mut run_start = 0usize;
    let mut run_zero = false;
    let mut i = 0usize;
    let mut push = |from: usize, to: usize, zero: bool| {
        if to > from {
            out.push(if zero {
                ReadMsg::Zero(offset + from as u64, (to - from) as u64)
            } else {
                ReadMsg::Data(offset + from as u64, buf.slice(from..to))
            });
        }
    };
    while i < buf.len() {
        let next = ((offset + i as u64) / ZERO_BLOCK as u64 + 1) * ZERO_BLOCK as u64 - offset;
        let end = (next as usize).min(buf.len());
        let zero = buf[i..end] == ZEROS[..end - i];
        if zero != run_zero {
            push(run_start, i, run_zero);
            run_start = i;
            run_zero = zero;
        }
        i = end;
    }
    push(run_start, buf.len(), run_zero);
}

/// Numbers every item (chunk or zero run) in disk order and sends it on.
struct Emitter {
    seq: u64,
    tx: Sender<Work>,
    broken: bool,
}

impl Emitter {
    fn send(&mut self, w: impl FnOnce(u64) -> Work) {
        if !self.broken && self.tx.send(w(self.seq)).is_err() {
            self.broken = true;
        }
        self.seq += 1;
    }
    fn chunk(&mut self, b: Bytes) {
        if !b.is_empty() {
            self.send(|s| Work::Chunk(s, b));
        }
    }
}

fn chunk_stage(
    chunker: &mut dyn crate::chunker::Chunker,
    rx: Receiver<ReadMsg>,
    tx: Sender<Work>,
) -> Result<f64> {
    let mut em = Emitter {
        seq: 0,
        tx,
        broken: false,
    };
    let mut next_data: Option<u64> = None;
    let mut busy = 0f64;
    for m in rx {
        let t = Instant::now();
        match m {
            ReadMsg::Data(off, b) => {
                if next_data != Some(off) {
                    chunker.start(off, &mut |c| em.chunk(c));
                }
                next_data = Some(off + b.len() as u64);
                chunker.push(b, &mut |c| em.chunk(c));
            }
            ReadMsg::Zero(_, len) => {
                chunker.finish(&mut |c| em.chunk(c));
                next_data = None;
                em.send(|s| Work::Zero(s, len));
            }
            ReadMsg::Reuse(e) => {
                chunker.finish(&mut |c| em.chunk(c));
                next_data = None;
                match e {
                    Extent::Chunk { id, len } => em.send(|s| Work::Known(s, id, len)),
                    Extent::Zero { len } => em.send(|s| Work::Zero(s, len)),
                }
            }
        }
        busy += t.elapsed().as_secs_f64();
        if em.broken {
            break;
        }
    }
    chunker.finish(&mut |c| em.chunk(c));
    Ok(busy)
}

fn hash_stage(
    store: &dyn StoreSession,
    inflight: &Mutex<HashSet<ChunkId>>,
    compression: Compression,
    rx: Receiver<Work>,
    tx: Sender<Done>,
) -> Result<f64> {
    let mut enc =
        FrameEncoder::new(compression.zstd_level()).map_err(|e| Error::Internal(e.to_string()))?;
    let mut busy = 0f64;
    for w in rx {
        let t = Instant::now();
        let d = match w {
            Work::Zero(seq, len) => Done::Zero { seq, len },
            Work::Known(seq, id, len) => Done::Known { seq, id, len },
            Work::Chunk(seq, b) => {
                let id = ChunkId::of(&b);
                let len = b.len() as u32;
                let known = store.has(&id)
                    || !inflight
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(id);
                if known {
                    Done::Known { seq, id, len }
                } else {
                    let mut frame =
                        Vec::with_capacity(FRAME_HEADER_LEN + b.len() + b.len() / 64 + 64);
                    enc.encode_into(id, &b, &mut frame)
                        .map_err(|e| Error::Internal(format!("compress: {e}")))?;
                    Done::New {
                        seq,
                        id,
                        len,
                        frame,
                    }
                }
            }
        };
        busy += t.elapsed().as_secs_f64();
        if tx.send(d).is_err() {
            break;
        }
    }
    Ok(busy)
}

type ManifestOut = ManifestWriter<BufWriter<File>>;

fn write_stage(
    sink: &mut dyn FrameSink,
    mut mw: ManifestOut,
    rx: Receiver<Done>,
) -> Result<(ManifestOut, WriteStats)> {
    let mut st = WriteStats::default();
    let mut pending: BTreeMap<u64, Extent> = BTreeMap::new();
    let mut next = 0u64;
    for d in rx {
        let (seq, e) = match d {
            Done::New {
                seq,
                id,
                len,
                frame,
            } => {
                let t = Instant::now();
                st.bytes_stored += frame.len() as u64;
                sink.add(id, len, frame)?;
                st.busy += t.elapsed().as_secs_f64();
                st.bytes_new += u64::from(len);
                st.chunks_new += 1;
                st.chunks += 1;
                (seq, Extent::Chunk { id, len })
            }
            Done::Known { seq, id, len } => {
                st.chunks += 1;
                (seq, Extent::Chunk { id, len })
            }
            Done::Zero { seq, len } => {
                st.bytes_zero += len;
                (seq, Extent::Zero { len })
            }
        };
        pending.insert(seq, e);
        while let Some(e) = pending.remove(&next) {
            mw.push(e)
                .map_err(|e| Error::io("write", PathBuf::from("point manifest"), e))?;
            next += 1;
        }
    }
    // Anything left means an upstream stage stopped early; the caller sees
    // its error, or the size check fails.
    Ok((mw, st))
}
