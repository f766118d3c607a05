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

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::BufWriter;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use crossbeam_channel::{Receiver, Sender, bounded};

use crate::chunker::{DEFAULT_BLOCK_SIZE, new_chunker};
use crate::compression::Compression;
use crate::error::{Error, IoContext, Result};
use crate::format::frame::{FRAME_HEADER_LEN, FrameEncoder};
use crate::format::manifest::{
    ChunkingInfo, ChunkingKind, Extent, ManifestWriter, PointMeta, PointStats,
};
use crate::ids::{ChunkId, DiskName, PointId};
use crate::progress::{ProgressFn, report};
use crate::repo::{Index, PackWriter, Repository};
use crate::source::{BlockSource, ExtentKind};
use crate::stats::RunStats;
use crate::sys::LockMode;

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
}

impl std::fmt::Debug for BackupOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupOptions")
            .field("chunking", &self.chunking)
            .field("compression", &self.compression)
            .field("threads", &self.threads)
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
}

enum ReadMsg {
    Data(u64, Bytes),
    Zero(u64),
}

enum Work {
    Chunk(u64, Bytes),
    Zero(u64, u64),
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

/// Back up `source` as a new point of `disk`.
pub fn backup(
    repo: &Repository,
    source: &dyn BlockSource,
    disk: &DiskName,
    opts: &BackupOptions,
) -> Result<BackupReport> {
    let _lock = repo.lock(LockMode::Shared, true)?;
    let started = chrono::Utc::now();
    let t0 = Instant::now();
    let point = repo.new_point_id(disk, started)?;
    let mut chunker = new_chunker(opts.chunking)?;
    let threads = match opts.threads {
        0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
        n => n,
    };
    let index = repo.load_index()?;
    let (mtmp_file, mtmp) = repo.temp_file("point")?;
    let cleanup = TempGuard(Some(mtmp.clone()));
    let mw =
        ManifestWriter::new(BufWriter::with_capacity(1 << 20, mtmp_file)).ctx("write", &mtmp)?;
    let size = source.size();

    let (read_tx, read_rx) = bounded::<ReadMsg>(8);
    let (work_tx, work_rx) = bounded::<Work>(threads * 2 + 2);
    let (done_tx, done_rx) = bounded::<Done>(threads * 2 + 2);
    let inflight = Mutex::new(HashSet::<ChunkId>::new());

    let (rres, cres, wres, outres) = std::thread::scope(|s| {
        let reader = s.spawn(|| read_stage(source, &opts.progress, read_tx));
        let chunk = s.spawn(move || {
            let t = Instant::now();
            let r = chunk_stage(&mut *chunker, read_rx, work_tx);
            r.map(|busy| busy.min(t.elapsed().as_secs_f64()))
        });
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                let (rx, tx) = (work_rx.clone(), done_tx.clone());
                let (index, inflight) = (&index, &inflight);
                s.spawn(move || hash_stage(index, inflight, opts.compression, rx, tx))
            })
            .collect();
        drop((work_rx, done_tx));
        let mut packer = PackWriter::with_target(repo, opts.pack_target);
        let writer = s.spawn(move || {
            let r = write_stage(&mut packer, mw, done_rx);
            r.map(|(mw, ws)| (packer, mw, ws))
        });
        let rres = join(reader);
        let cres = join(chunk);
        let wres: Result<f64> = workers.into_iter().map(join).sum();
        (rres, cres, wres, join(writer))
    });
    // The writer's error is the root cause when it stopped first.
    let (packer, mw, ws) = outres?;
    let rs = rres?;
    let chunk_busy = cres?;
    let hash_busy = wres?;
    if mw.size() != size {
        return Err(Error::Internal(format!(
            "pipeline described {} of {size} bytes",
            mw.size()
        )));
    }
    packer.commit()?;

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
    let meta = PointMeta {
        name: disk.to_string(),
        point: point.to_string(),
        disk_size: size,
        source: source.info(),
        transport: source.transport().into(),
        started: started.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        finished: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        chunking: opts.chunking,
        compression: opts.compression.to_string(),
        parent: None,
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
    };
    let out = mw.finish(&meta).ctx("write", &mtmp)?;
    let f = out
        .into_inner()
        .map_err(|e| Error::io("write", &mtmp, e.into_error()))?;
    f.sync_all().ctx("sync", &mtmp)?;
    drop(f);
    repo.publish(&mtmp, &repo.disk_dir(disk), &format!("{point}.point"))?;
    std::mem::forget(cleanup);
    Ok(BackupReport {
        disk: disk.clone(),
        point,
        stats,
        meta,
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

fn read_stage(
    src: &dyn BlockSource,
    progress: &Option<ProgressFn>,
    tx: Sender<ReadMsg>,
) -> Result<ReadStats> {
    let size = src.size();
    let io = src
        .preferred_io_size()
        .clamp(ZERO_BLOCK, 16 << 20)
        .next_power_of_two() as u64;
    let mut st = ReadStats::default();
    let mut win = 0u64;
    if !report(progress, 0, size) {
        return Err(Error::Cancelled);
    }
    while win < size {
        let wend = size.min(win + WINDOW.max(io));
        let t = Instant::now();
        let exts = src.extents(win, wend - win)?;
        st.busy += t.elapsed().as_secs_f64();
        let mut pos = win;
        for e in exts {
            if e.offset < pos || e.len == 0 || e.offset + e.len > wend {
                return Err(Error::Internal(format!(
                    "source reported extent {}+{} outside window {pos}..{wend}",
                    e.offset, e.len
                )));
            }
            if e.offset > pos && tx.send(ReadMsg::Zero(e.offset - pos)).is_err() {
                return Ok(st);
            }
            pos = e.offset + e.len;
            if e.kind != ExtentKind::Data {
                if tx.send(ReadMsg::Zero(e.len)).is_err() {
                    return Ok(st);
                }
                continue;
            }
            let mut p = e.offset;
            while p < pos {
                let n = (pos.min((p / io + 1) * io) - p) as usize;
                let mut buf = BytesMut::zeroed(n);
                let t = Instant::now();
                src.read_at(p, &mut buf)?;
                st.busy += t.elapsed().as_secs_f64();
                st.bytes_read += n as u64;
                if !split_zero(p, buf.freeze(), &tx) {
                    return Ok(st);
                }
                p += n as u64;
                if !report(progress, p, size) {
                    return Err(Error::Cancelled);
                }
            }
        }
        if wend > pos && tx.send(ReadMsg::Zero(wend - pos)).is_err() {
            return Ok(st);
        }
        win = wend;
        if !report(progress, win, size) {
            return Err(Error::Cancelled);
        }
    }
    Ok(st)
}

/// Send `buf` (read at `offset`) as data runs and zero runs; aligned
/// [`ZERO_BLOCK`]s (or their parts at the buffer's edges) that are all zero
/// become zero runs. False when the receiver is gone.
fn split_zero(offset: u64, buf: Bytes, tx: &Sender<ReadMsg>) -> bool {
    static ZEROS: [u8; ZERO_BLOCK] = [0; ZERO_BLOCK];
    let mut run_start = 0usize;
    let mut run_zero = false;
    let mut i = 0usize;
    let send = |from: usize, to: usize, zero: bool| -> bool {
        if to == from {
            return true;
        }
        let m = if zero {
            ReadMsg::Zero((to - from) as u64)
        } else {
            ReadMsg::Data(offset + from as u64, buf.slice(from..to))
        };
        tx.send(m).is_ok()
    };
    while i < buf.len() {
        let next = ((offset + i as u64) / ZERO_BLOCK as u64 + 1) * ZERO_BLOCK as u64 - offset;
        let end = (next as usize).min(buf.len());
        let zero = buf[i..end] == ZEROS[..end - i];
        if zero != run_zero {
            if !send(run_start, i, run_zero) {
                return false;
            }
            run_start = i;
            run_zero = zero;
        }
        i = end;
    }
    send(run_start, buf.len(), run_zero)
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
            ReadMsg::Zero(len) => {
                chunker.finish(&mut |c| em.chunk(c));
                next_data = None;
                em.send(|s| Work::Zero(s, len));
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
    index: &Index,
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
            Work::Chunk(seq, b) => {
                let id = ChunkId::of(&b);
                let len = b.len() as u32;
                let known = index.contains(&id)
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
    packer: &mut PackWriter<'_>,
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
                packer.add(id, len, &frame)?;
                st.busy += t.elapsed().as_secs_f64();
                st.bytes_new += u64::from(len);
                st.bytes_stored += frame.len() as u64;
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
