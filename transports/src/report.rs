//! The report of one run, as every front door shows it: `dm backup
//! --json` prints it, Python's `Stats.to_dict()` returns it, and its
//! figures feed the server's task results.
//!
//! Invariant: one struct, one set of keys (a test in `examples/tests`
//! checks the CLI's and Python's keys against [`RunReport::KEYS`]); a
//! ratio that is not finite is `null`, never `inf`/`NaN`.

use datamover::stats::{RunStats, StageBusy};
use datamover::{BackupReport, DiskName, PointId};
use serde::Serialize;

use crate::BackupRun;

/// A fall back to network mode, as reported.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FailoverReport {
    /// The mode that failed.
    pub from: String,
    /// The mode used instead (`nbd`).
    pub to: String,
    /// Why the first mode failed.
    pub reason: String,
}

/// The figures and decisions of one backup or restore.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunReport {
    /// Bytes of the disk.
    pub bytes_total: u64,
    /// Bytes read from the source.
    pub bytes_read: u64,
    /// Bytes of zeroes or holes (not stored).
    pub bytes_zero: u64,
    /// Bytes of chunks the repository lacked.
    pub bytes_new: u64,
    /// Bytes written to the repository (compressed).
    pub bytes_stored: u64,
    /// Chunks.
    pub chunks: u64,
    /// New chunks.
    pub chunks_new: u64,
    /// Logical bytes per stored byte of new chunks (`null` if none).
    pub dedupe_ratio: Option<f64>,
    /// Compression of new chunks (`null` if none).
    pub compression_ratio: Option<f64>,
    /// Wall seconds.
    pub seconds: f64,
    /// Throughput, MB/s of the disk.
    pub mb_per_s: f64,
    /// The stage that limited the run.
    pub bottleneck: String,
    /// Worker threads.
    pub threads: usize,
    /// Busy seconds per stage.
    pub busy_seconds: StageBusy,
    /// The disk.
    pub disk: String,
    /// The point written or read.
    pub point: String,
    /// The transport mode (or source kind) the data came through.
    pub transport: String,
    /// Built from the previous point plus tracked changes.
    pub incremental: bool,
    /// The point an incremental was built from.
    pub parent: Option<String>,
    /// Bytes the change tracker marked changed.
    pub bytes_changed: Option<u64>,
    /// What tracked the changes (e.g. `qemu:dirty-bitmap:b0`).
    pub change_tracker: Option<String>,
    /// Why the whole disk was read although changes were tracked.
    pub full_reason: Option<String>,
    /// VM backups: the checkpoint (dirty bitmap) this point started.
    pub checkpoint: Option<String>,
    /// VM backups: the fall back to network mode, if any.
    pub failover: Option<FailoverReport>,
    /// VM backups: `application` or `crash`, why, and how long the guest
    /// was frozen (ms).
    pub consistency: Option<datamover::Consistency>,
    /// What the run decided and why (modes not used, ...).
    pub notes: Vec<String>,
}

fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

impl RunReport {
    /// Every key of the serialized report, in order.
    pub const KEYS: [&'static str; 26] = [
        "bytes_total",
        "bytes_read",
        "bytes_zero",
        "bytes_new",
        "bytes_stored",
        "chunks",
        "chunks_new",
        "dedupe_ratio",
        "compression_ratio",
        "seconds",
        "mb_per_s",
        "bottleneck",
        "threads",
        "busy_seconds",
        "disk",
        "point",
        "transport",
        "incremental",
        "parent",
        "bytes_changed",
        "change_tracker",
        "full_reason",
        "checkpoint",
        "failover",
        "consistency",
        "notes",
    ];

    /// The figures of `stats` for `disk`@`point` read through `transport`
    /// (a restore, or the base of a backup's report).
    pub fn of_stats(disk: &DiskName, point: &PointId, transport: &str, s: &RunStats) -> Self {
        RunReport {
            bytes_total: s.bytes_total,
            bytes_read: s.bytes_read,
            bytes_zero: s.bytes_zero,
            bytes_new: s.bytes_new,
            bytes_stored: s.bytes_stored,
            chunks: s.chunks,
            chunks_new: s.chunks_new,
            dedupe_ratio: finite(s.dedupe_ratio()),
            compression_ratio: finite(s.compression_ratio()),
            seconds: s.seconds,
            mb_per_s: s.mb_per_s(),
            bottleneck: s.bottleneck().to_string(),
            threads: s.threads,
            busy_seconds: s.busy,
            disk: disk.to_string(),
            point: point.to_string(),
            transport: transport.to_owned(),
            incremental: false,
            parent: None,
            bytes_changed: None,
            change_tracker: None,
            full_reason: None,
            checkpoint: None,
            failover: None,
            consistency: None,
            notes: Vec::new(),
        }
    }

    /// The report of a backup written by the core.
    pub fn of_backup(rep: &BackupReport) -> Self {
        RunReport {
            incremental: rep.parent().is_some(),
            parent: rep.parent().map(str::to_owned),
            bytes_changed: rep.bytes_changed(),
            change_tracker: rep.meta.cbt.as_ref().map(|c| c.tracker.clone()),
            full_reason: rep.full_reason.clone(),
            checkpoint: rep.meta.checkpoint.clone(),
            consistency: rep.meta.consistency.clone(),
            ..RunReport::of_stats(&rep.disk, &rep.point, &rep.meta.transport, &rep.stats)
        }
    }

    /// The report of a backup through [`crate::backup`].
    pub fn of_run(run: &BackupRun) -> Self {
        RunReport {
            failover: run.failover.as_ref().map(|f| FailoverReport {
                from: f.from.clone(),
                to: crate::Mode::Nbd.name().into(),
                reason: f.reason.clone(),
            }),
            notes: run.notes.clone(),
            ..RunReport::of_backup(&run.report)
        }
    }
}
