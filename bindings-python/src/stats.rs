//! `Stats`: the run report of one backup or restore.
//!
//! Invariant: one [`transports::RunReport`] is the whole state; every
//! attribute is read from it, and `to_dict()` is it, so Python shows
//! exactly what `dm backup --json` prints.

use crate::*;

/// Figures of one backup or restore: the keys of `dm backup --json`
/// (`to_dict()`), with each figure also as an attribute.
#[pyclass(frozen, module = "datamover")]
pub(crate) struct Stats {
    report: transports::RunReport,
}

impl Stats {
    pub(crate) fn of_run(run: &transports::BackupRun) -> Self {
        Stats {
            report: transports::RunReport::of_run(run),
        }
    }

    pub(crate) fn new(
        disk: &DiskName,
        point: &datamover::PointId,
        transport: &str,
        s: &RunStats,
    ) -> Self {
        Stats {
            report: transports::RunReport::of_stats(disk, point, transport, s),
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

    #[getter]
    fn disk(&self) -> &str {
        &self.report.disk
    }
    #[getter]
    fn point(&self) -> &str {
        &self.report.point
    }
    #[getter]
    fn transport(&self) -> &str {
        &self.report.transport
    }
    #[getter]
    fn bytes_total(&self) -> u64 {
        self.report.bytes_total
    }
    #[getter]
    fn bytes_read(&self) -> u64 {
        self.report.bytes_read
    }
    #[getter]
    fn bytes_zero(&self) -> u64 {
        self.report.bytes_zero
    }
    #[getter]
    fn bytes_new(&self) -> u64 {
        self.report.bytes_new
    }
    #[getter]
    fn bytes_stored(&self) -> u64 {
        self.report.bytes_stored
    }
    #[getter]
    fn chunks(&self) -> u64 {
        self.report.chunks
    }
    #[getter]
    fn chunks_new(&self) -> u64 {
        self.report.chunks_new
    }
    /// NaN when there was nothing new to measure it on.
    #[getter]
    fn dedupe_ratio(&self) -> f64 {
        self.report.dedupe_ratio.unwrap_or(f64::NAN)
    }
    /// NaN when there was nothing new to measure it on.
    #[getter]
    fn compression_ratio(&self) -> f64 {
        self.report.compression_ratio.unwrap_or(f64::NAN)
    }
    #[getter]
    fn seconds(&self) -> f64 {
        self.report.seconds
    }
    #[getter]
    fn mb_per_s(&self) -> f64 {
        self.report.mb_per_s
    }
    #[getter]
    fn bottleneck(&self) -> &str {
        &self.report.bottleneck
    }
    #[getter]
    fn threads(&self) -> usize {
        self.report.threads
    }
    /// Backups: built from the previous point plus tracked changes.
    #[getter]
    fn incremental(&self) -> bool {
        self.report.incremental
    }
    /// Backups: the point an incremental was built from.
    #[getter]
    fn parent(&self) -> Option<&str> {
        self.report.parent.as_deref()
    }
    /// Backups: bytes the change tracker marked changed.
    #[getter]
    fn bytes_changed(&self) -> Option<u64> {
        self.report.bytes_changed
    }
    /// Backups: what tracked the changes (e.g. `qemu:dirty-bitmap:b0`).
    #[getter]
    fn change_tracker(&self) -> Option<&str> {
        self.report.change_tracker.as_deref()
    }
    /// Backups: why the whole disk was read although a bitmap was given.
    #[getter]
    fn full_reason(&self) -> Option<&str> {
        self.report.full_reason.as_deref()
    }
    /// VM backups: the checkpoint (dirty bitmap) this point started.
    #[getter]
    fn checkpoint(&self) -> Option<&str> {
        self.report.checkpoint.as_deref()
    }
    /// VM backups: "application" (the guest agent froze the guest for the
    /// snapshot) or "crash".
    #[getter]
    fn consistency(&self) -> Option<String> {
        self.report
            .consistency
            .as_ref()
            .map(|c| c.level.to_string())
    }
    /// VM backups: why the point has that consistency.
    #[getter]
    fn consistency_reason(&self) -> Option<&str> {
        self.report.consistency.as_ref().map(|c| c.reason.as_str())
    }
    /// VM backups: how long the guest was frozen, in milliseconds.
    #[getter]
    fn frozen_ms(&self) -> Option<u64> {
        self.report.consistency.as_ref().and_then(|c| c.frozen_ms)
    }
    /// VM backups: the mode that failed when the run fell back to NBD.
    #[getter]
    fn failover_from(&self) -> Option<&str> {
        self.report.failover.as_ref().map(|f| f.from.as_str())
    }
    /// VM backups: why it failed.
    #[getter]
    fn failover_reason(&self) -> Option<&str> {
        self.report.failover.as_ref().map(|f| f.reason.as_str())
    }
    /// VM backups: what the run decided and why (modes not used, ...).
    #[getter]
    fn notes(&self) -> Vec<String> {
        self.report.notes.clone()
    }

    fn __repr__(&self) -> String {
        let r = &self.report;
        format!(
            "Stats({}@{}: {} bytes in {:.2} s, new {}, stored {}, bottleneck {})",
            r.disk, r.point, r.bytes_total, r.seconds, r.bytes_new, r.bytes_stored, r.bottleneck
        )
    }
}
