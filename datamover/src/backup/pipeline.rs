//! The [`Pipeline`] of one backup: it owns the stages, the bounded
//! channels between them and their joins.
//!
//! ```text
//! reader ──► chunker ──► N hash/dedupe/compress workers ──► writer (packs + manifest)
//! ```
//!
//! Invariant: every stage is joined before `run` returns, and when
//! several fail, the writer's error (the root cause when it stopped
//! first) wins; memory stays bounded by the channels' capacities.

use super::*;
use crate::chunker::Chunker;
use crate::stats::StageBusy;

/// Bytes of reads queued for the chunker, at most (in reads of the
/// source's preferred size, 2 to 8 of them).
const READ_QUEUE_BYTES: usize = 32 << 20;

/// The span the tracker is asked about at once: one question (an NBD
/// block status, one round trip, whose length is a u32) per 2 GiB of the
/// disk, not per window of reads: an unchanged TiB costs 512 round trips,
/// not 16,000 (256 MiB spans cost a 256 GiB disk 0.27 s, 2 GiB 0.18 s).
const CHANGE_WINDOW: u64 = 2 << 30;

/// One backup's pipeline.
pub(super) struct Pipeline<'a, 's> {
    /// The disk being read.
    pub(super) source: &'a dyn BlockSource,
    /// The store session the point is written into.
    pub(super) session: &'s (dyn StoreSession + 's),
    /// Full or incremental.
    pub(super) plan: &'a Plan<'a>,
    /// The chunking the point uses.
    pub(super) chunking: ChunkingInfo,
    /// Hash/compress workers.
    pub(super) threads: usize,
    /// The run's options (progress, compression, pack size).
    pub(super) opts: &'a BackupOptions,
}

/// What a finished pipeline leaves: the sink to finish, the manifest
/// written so far (extents, no meta yet), and each stage's figures.
pub(super) struct Ran<'a> {
    pub(super) sink: Box<dyn FrameSink + 'a>,
    pub(super) manifest: ManifestOut,
    pub(super) read: ReadStats,
    /// Bytes the tracker marked changed (incrementals).
    pub(super) bytes_changed: Option<u64>,
    pub(super) busy: StageBusy,
    pub(super) write: WriteStats,
}

impl<'s> Pipeline<'_, 's> {
    /// Run every stage to its end.
    pub(super) fn run(&self, chunker: Box<dyn Chunker>, mw: ManifestOut) -> Result<Ran<'s>> {
        let (source, session, plan, chunking, threads, opts) = (
            self.source,
            self.session,
            self.plan,
            self.chunking,
            self.threads,
            self.opts,
        );
        let size = source.size();
        // The reads queued for the chunker are bounded by bytes.
        let io = source.preferred_io_size().max(1);
        let (read_tx, read_rx) = bounded::<ReadMsg>((READ_QUEUE_BYTES / io).clamp(2, 8));
        let (work_tx, work_rx) = bounded::<Work>(threads * 2 + 2);
        let (done_tx, done_rx) = bounded::<Done>(threads * 2 + 2);
        let inflight = Mutex::new(HashSet::<ChunkId>::new());

        let (rres, cres, wres, outres) = std::thread::scope(|s| {
            let reader = s.spawn(|| {
                let mut sc = Scanner::new(source, &opts.progress);
                let changed = match &plan {
                    Plan::Full => match lane_span(&sc, chunking) {
                        Some(span) => read_full_lanes(&mut sc, span, &read_tx).map(|()| None),
                        None => read_full(&mut sc, &read_tx).map(|()| None),
                    },
                    Plan::Incremental {
                        manifest, tracker, ..
                    } => manifest.extents().and_then(|extents| {
                        let mut dirty = DirtyRanges::new(*tracker, size, CHANGE_WINDOW);
                        let mut parent = ParentExtents::new(extents, manifest.meta.disk_size);
                        read_incremental(&mut sc, &mut dirty, &mut parent, chunking, &read_tx)
                            .map(|()| Some(dirty.bytes))
                    }),
                };
                drop(read_tx);
                changed.map(|c| (sc.st, c))
            });
            let chunk = s.spawn(move || {
                let t = Instant::now();
                let r = chunk_stage(chunker, chunking, read_rx, work_tx);
                r.map(|busy| busy.min(t.elapsed().as_secs_f64()))
            });
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    let (rx, tx) = (work_rx.clone(), done_tx.clone());
                    let (session, inflight) = (session, &inflight);
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
        let (sink, manifest, write) = outres?;
        let (read, bytes_changed) = rres?;
        let busy = StageBusy {
            read: read.busy,
            chunk: cres?,
            hash_compress: wres?,
            write: write.busy,
        };
        Ok(Ran {
            sink,
            manifest,
            read,
            bytes_changed,
            busy,
            write,
        })
    }
}

fn join<T>(h: std::thread::ScopedJoinHandle<'_, Result<T>>) -> Result<T> {
    h.join()
        .unwrap_or_else(|_| Err(Error::Internal("a pipeline thread panicked".into())))
}
