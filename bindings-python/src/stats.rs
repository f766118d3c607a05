//! `Stats`: the run report of one backup or restore.

use crate::*;

/// Figures of one backup or restore: the keys of `dm backup --json`
/// (`to_dict()`, one [`transports::RunReport`]), with the common ones as
/// attributes.
#[pyclass(frozen, module = "datamover")]
pub(crate) struct Stats {
    #[pyo3(get)]
    disk: String,
    #[pyo3(get)]
    point: String,
    #[pyo3(get)]
    transport: String,
    #[pyo3(get)]
    bytes_total: u64,
    #[pyo3(get)]
    bytes_read: u64,
    #[pyo3(get)]
    bytes_zero: u64,
    #[pyo3(get)]
    bytes_new: u64,
    #[pyo3(get)]
    bytes_stored: u64,
    #[pyo3(get)]
    chunks: u64,
    #[pyo3(get)]
    chunks_new: u64,
    #[pyo3(get)]
    dedupe_ratio: f64,
    #[pyo3(get)]
    compression_ratio: f64,
    #[pyo3(get)]
    seconds: f64,
    #[pyo3(get)]
    mb_per_s: f64,
    #[pyo3(get)]
    bottleneck: String,
    #[pyo3(get)]
    threads: usize,
    /// Backups: built from the previous point plus tracked changes.
    #[pyo3(get)]
    incremental: bool,
    /// Backups: the point an incremental was built from.
    #[pyo3(get)]
    parent: Option<String>,
    /// Backups: bytes the change tracker marked changed.
    #[pyo3(get)]
    bytes_changed: Option<u64>,
    /// Backups: what tracked the changes (e.g. `qemu:dirty-bitmap:b0`).
    #[pyo3(get)]
    change_tracker: Option<String>,
    /// Backups: why the whole disk was read although a bitmap was given.
    #[pyo3(get)]
    full_reason: Option<String>,
    /// VM backups: the checkpoint (dirty bitmap) this point started.
    #[pyo3(get)]
    checkpoint: Option<String>,
    /// VM backups: the mode that failed when the run fell back to NBD.
    #[pyo3(get)]
    failover_from: Option<String>,
    /// VM backups: why it failed.
    #[pyo3(get)]
    failover_reason: Option<String>,
    /// VM backups: what the run decided and why (modes not used, ...).
    #[pyo3(get)]
    notes: Vec<String>,
    /// The whole report (`to_dict()`).
    report: transports::RunReport,
}

impl Stats {
    pub(crate) fn of_run(run: &transports::BackupRun) -> Self {
        Stats::from_report(transports::RunReport::of_run(run))
    }

    pub(crate) fn new(
        disk: &DiskName,
        point: &datamover::PointId,
        transport: &str,
        s: &RunStats,
    ) -> Self {
        Stats::from_report(transports::RunReport::of_stats(disk, point, transport, s))
    }

    fn from_report(r: transports::RunReport) -> Self {
        Stats {
            disk: r.disk.clone(),
            point: r.point.clone(),
            transport: r.transport.clone(),
            bytes_total: r.bytes_total,
            bytes_read: r.bytes_read,
            bytes_zero: r.bytes_zero,
            bytes_new: r.bytes_new,
            bytes_stored: r.bytes_stored,
            chunks: r.chunks,
            chunks_new: r.chunks_new,
            dedupe_ratio: r.dedupe_ratio.unwrap_or(f64::NAN),
            compression_ratio: r.compression_ratio.unwrap_or(f64::NAN),
            seconds: r.seconds,
            mb_per_s: r.mb_per_s,
            bottleneck: r.bottleneck.clone(),
            threads: r.threads,
            incremental: r.incremental,
            parent: r.parent.clone(),
            bytes_changed: r.bytes_changed,
            change_tracker: r.change_tracker.clone(),
            full_reason: r.full_reason.clone(),
            checkpoint: r.checkpoint.clone(),
            failover_from: r.failover.as_ref().map(|f| f.from.clone()),
            failover_reason: r.failover.as_ref().map(|f| f.reason.clone()),
            notes: r.notes.clone(),
            report: r,
        }
    }
}

#[pymethods]
impl Stats {
    /// All figures as a dict: exactly the keys of `dm backup --json`.
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let text = serde_json::to_string(&self.report)
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        py.import("json")?.getattr("loads")?.call1((text,))
    }

    fn __repr__(&self) -> String {
        format!(
            "Stats({}@{}: {} bytes in {:.2} s, new {}, stored {}, bottleneck {})",
            self.disk,
            self.point,
            self.bytes_total,
            self.seconds,
            self.bytes_new,
            self.bytes_stored,
            self.bottleneck
        )
    }
}
