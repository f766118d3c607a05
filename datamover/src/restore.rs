//! Restore a point to a target: every chunk is read from its pack, its CRC
//! and BLAKE3 checked, and written at its disk offset by a pool of workers
//! (positional writes, so order does not matter). Zero runs become holes in
//! a new file or are zeroed on a device. Any damaged or missing chunk stops
//! the restore with an error naming the point, the disk offset and the pack;
//! a new target file is then removed rather than left silently wrong.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use crossbeam_channel::bounded;

use crate::buffer::{AlignedBuf, DIRECT_ALIGN};
use crate::error::{Error, Result};
use crate::format::frame::FrameDecoder;
use crate::format::manifest::Extent;
use crate::ids::{ChunkId, DiskName, PointId};
use crate::progress::{ProgressFn, report};
use crate::repo::{PackReader, Repository};
use crate::stats::{RunStats, StageBusy};
use crate::sys::LockMode;
use crate::target::BlockTarget;

/// How to run a restore.
#[derive(Clone, Default)]
pub struct RestoreOptions {
    /// Worker threads; 0 = one per core (at least 2).
    pub threads: usize,
    /// Progress callback (and cancellation).
    pub progress: Option<ProgressFn>,
    /// The target holds this point of the same disk already: write only
    /// the extents that differ from it (a replica brought up to date).
    pub base: Option<PointId>,
    /// The target holds something close to the point, but nothing says
    /// what: read each extent back and write only those that differ (a
    /// failback onto the original disk, a replica whose state is unknown).
    /// Reads the whole target; writes only the differences.
    pub compare: bool,
}

impl std::fmt::Debug for RestoreOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestoreOptions")
            .field("threads", &self.threads)
            .field("base", &self.base)
            .field("compare", &self.compare)
            .finish()
    }
}

/// Where a base point (already on the target) holds the same extent; its
/// extents are read as the restore moves along the disk (asked in disk
/// order), so only the one at the current place is held.
struct Unchanged<I> {
    src: Option<I>,
    /// The base's extent last read, and where it starts.
    cur: Option<(u64, Extent)>,
    /// Where the next extent to read starts.
    next: u64,
}

impl<I: Iterator<Item = Result<Extent>>> Unchanged<I> {
    fn of(src: Option<I>) -> Self {
        Unchanged {
            src,
            cur: None,
            next: 0,
        }
    }

    /// The base's extent holding `off`, if any.
    fn at(&mut self, off: u64) -> Result<Option<(u64, Extent)>> {
        while self.cur.is_none_or(|(o, x)| o + x.len() <= off) {
            let Some(e) = self.src.as_mut().and_then(Iterator::next) else {
                self.cur = None;
                return Ok(None);
            };
            let e = e?;
            self.cur = Some((self.next, e));
            self.next += e.len();
        }
        Ok(self.cur)
    }

    /// Whether the base reads the same as extent `e` at `off`: the same
    /// chunk at the same offset, or zeros over the whole range. Asked in
    /// disk order.
    fn holds(&mut self, off: u64, e: &Extent) -> Result<bool> {
        match e {
            Extent::Chunk { .. } => Ok(self.at(off)?.is_some_and(|(o, x)| o == off && x == *e)),
            Extent::Zero { len } => {
                let end = off + len;
                let mut at = off;
                while let Some((o, x @ Extent::Zero { .. })) = self.at(at)? {
                    at = o + x.len();
                    if at >= end {
                        return Ok(true);
                    }
                }
                Ok(false)
            }
        }
    }
}

/// The outcome of a restore.
#[derive(Debug, Clone)]
pub struct RestoreReport {
    /// The disk.
    pub disk: DiskName,
    /// The point restored.
    pub point: PointId,
    /// Figures (bytes_read = chunk bytes written, bytes_zero = zero runs).
    pub stats: RunStats,
}

/// Whether the target holds chunk `id` (`len` bytes) at `off` already.
fn holds_chunk(
    target: &dyn BlockTarget,
    off: u64,
    id: ChunkId,
    len: u32,
    b: &mut Vec<u8>,
) -> Result<bool> {
    b.resize(len as usize, 0);
    Ok(target.read_at(off, b)? && ChunkId::of(b) == id)
}

/// Make `[off, off+len)` of the target read as zeros, zeroing only the
/// 1 MiB pieces that do not already; returns the bytes zeroed.
fn zero_differences(target: &dyn BlockTarget, mut off: u64, len: u64) -> Result<u64> {
    const PIECE: u64 = 1 << 20;
    let end = off + len;
    let mut b = vec![0u8; PIECE.min(len) as usize];
    let mut zeroed = 0;
    if target.reads_zero(off, len)? {
        return Ok(0);
    }
    while off < end {
        let n = (end - off).min(PIECE) as usize;
        if target.reads_zero(off, n as u64)? {
            off += n as u64;
            continue;
        }
        if !target.read_at(off, &mut b[..n])? || b[..n].iter().any(|x| *x != 0) {
            target.write_zeroes(off, n as u64)?;
            zeroed += n as u64;
        }
        off += n as u64;
    }
    Ok(zeroed)
}

/// Restore `point` of `disk` into `target` (whose size was checked by the
/// caller's open; it is checked again here).
pub fn restore(
    repo: &Repository,
    disk: &DiskName,
    point: &PointId,
    target: &dyn BlockTarget,
    opts: &RestoreOptions,
) -> Result<RestoreReport> {
    let _lock = repo.lock(LockMode::Shared, true)?;
    let r = run(repo, disk, point, target, opts);
    if r.is_err() {
        target.discard();
    }
    r
}

fn run(
    repo: &Repository,
    disk: &DiskName,
    point: &PointId,
    target: &dyn BlockTarget,
    opts: &RestoreOptions,
) -> Result<RestoreReport> {
    let t0 = Instant::now();
    // The manifests are read through once first: their CRCs vouch for them
    // before anything is written, then their extents stream.
    let m = repo.open_point(disk, point)?;
    m.check()?;
    let size = m.meta.disk_size;
    if target.size() < size {
        return Err(Error::TargetTooSmall {
            path: "restore target".into(),
            need: size,
            have: target.size(),
        });
    }
    let base = match &opts.base {
        Some(b) => {
            let f = repo.open_point(disk, b)?;
            f.check()?;
            Some(f)
        }
        None => None,
    };
    let mut same = Unchanged::of(base.as_ref().map(|b| b.extents()).transpose()?);
    let extents = m.extents()?;
    let (mut zero, mut chunks) = (0u64, 0u64);
    let index = repo.load_index()?;
    let reader = PackReader::new(repo);
    let threads = match opts.threads {
        0 => std::thread::available_parallelism()
            .map_or(2, |n| n.get())
            .max(2),
        n => n,
    };
    let at = |off: u64| format!("{disk}@{point}, disk offset {off}");
    let stop = AtomicBool::new(false);
    let done = AtomicU64::new(0);
    let busy_read = AtomicU64::new(0);
    let busy_write = AtomicU64::new(0);
    // Bytes a compare found right already (written by nobody).
    let alike = AtomicU64::new(0);
    let compare = opts.compare;
    let (tx, rx) = bounded::<(u64, ChunkId, u32)>(threads * 4);
    // Decoded chunks go to one writer: parallel buffered writes into one
    // file only contend on the inode lock.
    let (wtx, wrx) = bounded::<(u64, AlignedBuf)>(threads * 2);
    // Aligned buffers (direct I/O) circulate between workers and the writer.
    let (pool_tx, pool_rx) = bounded::<AlignedBuf>(threads * 4 + 2);
    let mut stats = RunStats {
        bytes_total: size,
        threads,
        ..RunStats::default()
    };

    let mut skipped = 0u64;
    let results: Vec<Result<()>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                let (rx, wtx, pool_rx) = (rx.clone(), wtx.clone(), pool_rx.clone());
                let (index, reader, stop, at, busy_read, alike) =
                    (&index, &reader, &stop, &at, &busy_read, &alike);
                s.spawn(move || -> Result<()> {
                    let mut dec =
                        FrameDecoder::new().map_err(|e| Error::Internal(e.to_string()))?;
                    let mut back = Vec::new();
                    for (off, id, len) in rx {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let t = Instant::now();
                        if compare {
                            match holds_chunk(target, off, id, len, &mut back) {
                                Ok(true) => {
                                    alike.fetch_add(u64::from(len), Ordering::Relaxed);
                                    continue;
                                }
                                Ok(false) => {}
                                Err(e) => {
                                    stop.store(true, Ordering::Relaxed);
                                    return Err(e);
                                }
                            }
                        }
                        let r = (|| {
                            let loc = index.get(&id).ok_or(Error::ChunkMissing {
                                chunk: id,
                                at: Some(at(off)),
                            })?;
                            if loc.plain_len != len {
                                return Err(Error::corrupt(
                                    "point manifest",
                                    repo.point_path(disk, point),
                                    format!(
                                        "chunk at offset {off} has length {len}, the index says {}",
                                        loc.plain_len
                                    ),
                                ));
                            }
                            let mut buf = pool_rx.try_recv().unwrap_or_default();
                            let n = reader
                                .read_chunk_into(
                                    &mut dec,
                                    id,
                                    &loc,
                                    buf.prepare_phased(
                                        len as usize,
                                        (off % DIRECT_ALIGN as u64) as usize,
                                    ),
                                )
                                .map_err(|e| e.used_at(at(off)))?;
                            buf.set_len(n);
                            Ok(buf)
                        })();
                        busy_read.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
                        match r {
                            Ok(data) => {
                                if wtx.send((off, data)).is_err() {
                                    break;
                                }
                            }
                            Err(e) => {
                                stop.store(true, Ordering::Relaxed);
                                return Err(e);
                            }
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        drop((rx, wtx, pool_rx));
        let (stop_w, done_w, busy_w) = (&stop, &done, &busy_write);
        let writer = s.spawn(move || -> Result<()> {
            for (off, buf) in wrx {
                let t = Instant::now();
                if let Err(e) = target.write_at(off, buf.as_slice()) {
                    stop_w.store(true, Ordering::Relaxed);
                    return Err(e);
                }
                busy_w.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
                done_w.fetch_add(buf.as_slice().len() as u64, Ordering::Relaxed);
                let _ = pool_tx.try_send(buf);
            }
            Ok(())
        });
        let feed = (|| -> Result<()> {
            let mut off = 0u64;
            let mut zero_done = 0u64;
            let skipped = &mut skipped;
            let (zero, chunks) = (&mut zero, &mut chunks);
            for e in extents {
                let e = &e?;
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                match e {
                    Extent::Zero { len } => *zero += len,
                    Extent::Chunk { .. } => *chunks += 1,
                }
                if same.holds(off, e)? {
                    *skipped += e.len();
                    off += e.len();
                    continue;
                }
                match *e {
                    Extent::Chunk { id, len } => {
                        if tx.send((off, id, len)).is_err() {
                            break;
                        }
                    }
                    Extent::Zero { len } => {
                        if compare {
                            let z = zero_differences(target, off, len)?;
                            alike.fetch_add(len - z, Ordering::Relaxed);
                            zero_done += z;
                        } else {
                            target.write_zeroes(off, len)?;
                            zero_done += len;
                        }
                    }
                }
                off += e.len();
                if !report(
                    &opts.progress,
                    done.load(Ordering::Relaxed)
                        + zero_done
                        + *skipped
                        + alike.load(Ordering::Relaxed),
                    size,
                ) {
                    return Err(Error::Cancelled);
                }
            }
            Ok(())
        })();
        if feed.is_err() {
            stop.store(true, Ordering::Relaxed);
        }
        drop(tx);
        let mut rs: Vec<Result<()>> = workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|_| Err(Error::Internal("restore worker panicked".into())))
            })
            .collect();
        rs.push(
            writer
                .join()
                .unwrap_or_else(|_| Err(Error::Internal("restore writer panicked".into()))),
        );
        rs.insert(0, feed);
        rs
    });
    for r in results {
        r?;
    }
    target.flush()?;
    report(&opts.progress, size, size);
    stats.bytes_read = size - zero;
    stats.bytes_zero = zero;
    stats.bytes_new = size - skipped - alike.load(Ordering::Relaxed);
    stats.chunks = chunks;
    stats.seconds = t0.elapsed().as_secs_f64();
    stats.busy = StageBusy {
        read: busy_read.load(Ordering::Relaxed) as f64 / 1e9,
        hash_compress: 0.0,
        chunk: 0.0,
        write: busy_write.load(Ordering::Relaxed) as f64 / 1e9,
    };
    Ok(RestoreReport {
        disk: disk.clone(),
        point: point.clone(),
        stats,
    })
}
