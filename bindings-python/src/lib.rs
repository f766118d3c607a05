//! `datamover._datamover`: the Python face of the `datamover` crate. Glue
//! only: argument conversion, GIL handling, progress/cancel plumbing and
//! error mapping. Every capability lives in the core library.
//!
//! Long calls run on a worker thread while the calling thread waits with the
//! GIL released, waking every 50 ms to run Python's signal handlers: Ctrl-C
//! (KeyboardInterrupt) cancels the run through the same path as a progress
//! callback that raises, and the core then leaves no partial point.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use datamover::{
    BackupOptions, ChunkingInfo, ChunkingKind, Compression, DiskName, ErrorKind, KeepPolicy,
    PointRef, PruneOptions, RestoreOptions, RunStats,
};
use pyo3::exceptions::{PyFileNotFoundError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyType};

/// Map a core error to the Python exception hierarchy of `datamover._errors`.
fn to_py(e: datamover::Error) -> PyErr {
    let msg = e.to_string();
    let missing_file = match &e {
        datamover::Error::Io { source, .. }
        | datamover::Error::SourceUnavailable { source, .. } => {
            source.kind() == std::io::ErrorKind::NotFound
        }
        _ => false,
    };
    if missing_file {
        return PyFileNotFoundError::new_err(msg);
    }
    let class = match e.kind() {
        ErrorKind::Corrupt => "CorruptRepositoryError",
        ErrorKind::Unsupported => "UnsupportedError",
        ErrorKind::InvalidInput | ErrorKind::NotFound => "InvalidInputError",
        ErrorKind::Io => "TransportError",
        ErrorKind::Cancelled => "CancelledError",
    };
    py_error(class, msg)
}

/// An exception of class `class` of `datamover._errors`.
fn py_error(class: &str, msg: String) -> PyErr {
    Python::attach(|py| {
        let ty = py
            .import("datamover._errors")
            .and_then(|m| m.getattr(class))
            .and_then(|c| c.cast_into::<PyType>().map_err(PyErr::from));
        match ty {
            Ok(ty) => PyErr::from_type(ty, msg),
            Err(err) => err,
        }
    })
}

/// Run `work` on a worker thread with the GIL released; Ctrl-C and
/// exceptions from `progress` cancel it and are re-raised.
fn run_cancellable<T: Send>(
    py: Python<'_>,
    progress: Option<Py<PyAny>>,
    work: impl FnOnce(datamover::ProgressFn) -> datamover::Result<T> + Send,
) -> PyResult<T> {
    let cancel = Arc::new(AtomicBool::new(false));
    let raised: Arc<Mutex<Option<PyErr>>> = Arc::default();
    let pfn: datamover::ProgressFn = {
        let (cancel, raised) = (cancel.clone(), raised.clone());
        Arc::new(move |done, total| {
            if cancel.load(Ordering::Relaxed) {
                return false;
            }
            if let Some(cb) = &progress {
                if let Err(e) = Python::attach(|py| cb.call1(py, (done, total)).map(drop)) {
                    *raised.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                    cancel.store(true, Ordering::Relaxed);
                    return false;
                }
            }
            true
        })
    };
    let (tx, rx) = crossbeam_channel::bounded(1);
    let mut interrupt: Option<PyErr> = None;
    let result = std::thread::scope(|s| {
        s.spawn(move || {
            let _ = tx.send(work(pfn));
        });
        loop {
            match py.detach(|| rx.recv_timeout(Duration::from_millis(50))) {
                Ok(r) => break r,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    if interrupt.is_none() {
                        if let Err(e) = py.check_signals() {
                            interrupt = Some(e);
                            cancel.store(true, Ordering::Relaxed);
                        }
                    }
                }
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    break Err(datamover::Error::Internal(
                        "worker thread ended without a result".into(),
                    ));
                }
            }
        }
    });
    if let Some(e) = interrupt {
        return Err(e);
    }
    if let Some(e) = raised.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return Err(e);
    }
    result.map_err(to_py)
}

/// Figures of one backup or restore: the keys of `dm backup --json`
/// (`to_dict()`, one [`transports::RunReport`]), with the common ones as
/// attributes.
#[pyclass(frozen, module = "datamover")]
struct Stats {
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
    fn of_run(run: &transports::BackupRun) -> Self {
        Stats::from_report(transports::RunReport::of_run(run))
    }

    fn new(disk: &DiskName, point: &datamover::PointId, transport: &str, s: &RunStats) -> Self {
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

/// A positive number of seconds.
fn secs(timeout: f64) -> PyResult<std::time::Duration> {
    std::time::Duration::try_from_secs_f64(timeout)
        .ok()
        .filter(|t| !t.is_zero())
        .ok_or_else(|| {
            to_py(datamover::Error::InvalidArgument(format!(
                "timeout {timeout} s: give a positive number of seconds"
            )))
        })
}

/// One restore point.
#[pyclass(frozen, get_all, module = "datamover")]
struct Point {
    id: String,
    disk: String,
    time: Py<PyAny>,
    size: u64,
    stored_size: u64,
    source: String,
    source_kind: String,
    transport: String,
    chunking: String,
    block_size: u32,
    compression: String,
}

#[pymethods]
impl Point {
    fn __str__(&self) -> String {
        format!("{}@{}", self.disk, self.id)
    }
    fn __repr__(&self) -> String {
        format!(
            "Point({}@{}, size={}, transport={})",
            self.disk, self.id, self.size, self.transport
        )
    }
}

/// What `Repository.verify` found.
#[pyclass(frozen, get_all, module = "datamover")]
struct VerifyReport {
    ok: bool,
    points: usize,
    packs: usize,
    chunks: usize,
    chunks_read: usize,
    problems: Vec<String>,
    damaged_points: Vec<String>,
    details: Vec<(String, Vec<String>)>,
    unindexed_packs: usize,
}

#[pymethods]
impl VerifyReport {
    fn __bool__(&self) -> bool {
        self.ok
    }
    fn __repr__(&self) -> String {
        format!(
            "VerifyReport(ok={}, points={}, damaged_points={:?})",
            if self.ok { "True" } else { "False" },
            self.points,
            self.damaged_points
        )
    }
}

/// What `Repository.prune` did (or would do with `dry_run`).
#[pyclass(frozen, get_all, module = "datamover")]
struct PruneReport {
    points_kept: usize,
    points_removed: Vec<String>,
    packs_deleted: usize,
    packs_repacked: usize,
    orphan_packs_deleted: usize,
    chunks_removed: usize,
    bytes_freed: u64,
}

#[pymethods]
impl PruneReport {
    fn __repr__(&self) -> String {
        format!(
            "PruneReport(kept={}, removed={}, bytes_freed={})",
            self.points_kept,
            self.points_removed.len(),
            self.bytes_freed
        )
    }
}

/// A datamover repository (a local directory).
#[pyclass(frozen, module = "datamover")]
struct Repository {
    inner: datamover::Repository,
}

#[pymethods]
impl Repository {
    /// Create a new repository in an empty or new directory.
    #[staticmethod]
    fn init(path: PathBuf) -> PyResult<Self> {
        Ok(Repository {
            inner: datamover::Repository::init(&path).map_err(to_py)?,
        })
    }

    /// Open an existing repository.
    #[staticmethod]
    fn open(path: PathBuf) -> PyResult<Self> {
        Ok(Repository {
            inner: datamover::Repository::open(&path).map_err(to_py)?,
        })
    }

    /// The repository's directory.
    #[getter]
    fn path(&self) -> PathBuf {
        self.inner.root().to_path_buf()
    }

    /// The repository's id.
    #[getter]
    fn id(&self) -> String {
        self.inner.config().id.clone()
    }

    /// Back up `source` (path or URI) as a new point of `name` ("vm/disk").
    ///
    /// With `bitmap`, the backup is incremental (CBT): only what the QEMU
    /// dirty bitmap marks changed is read (NBD sources). `full_if_needed`
    /// reads the whole disk when no incremental is possible instead of
    /// raising. `timeout` is the network timeout in seconds;
    /// `tls_certificates` the directory with `ca-cert.pem` for `nbds://`.
    ///
    /// A running VM is backed up with `source="qmp+unix:///path/qmp.sock"`
    /// (or `qmp://host:port`) and `disk=` its node or device: the disk is
    /// snapshotted, read through `transport` ("auto": san > hotadd > nbd;
    /// or "san", "hotadd", "nbd", "storage-snapshot" with
    /// `snapshot_provider` "auto", "reflink" or "qcow2-internal"), and
    /// incremental after the first point. `failover_to_network=True`
    /// falls back to NBD when the mode cannot read the disk.
    #[pyo3(signature = (source, name, *, chunking="fixed", block_size=1<<20, compression="optimal", threads=0, progress=None, bitmap=None, full_if_needed=false, timeout=60.0, tls_certificates=None, disk=None, transport="auto", failover_to_network=false, snapshot_provider="auto"))]
    #[allow(clippy::too_many_arguments)]
    fn backup(
        &self,
        py: Python<'_>,
        source: PathBuf,
        name: &str,
        chunking: &str,
        block_size: u32,
        compression: &str,
        threads: usize,
        progress: Option<Py<PyAny>>,
        bitmap: Option<String>,
        full_if_needed: bool,
        timeout: f64,
        tls_certificates: Option<PathBuf>,
        disk: Option<String>,
        transport: &str,
        failover_to_network: bool,
        snapshot_provider: &str,
    ) -> PyResult<Stats> {
        let vm_disk = disk;
        let disk: DiskName = name.parse().map_err(to_py)?;
        let transport: transports::TransportChoice = transport.parse().map_err(to_py)?;
        let snapshot_provider = snapshot_provider.to_string();
        let timeout = secs(timeout)?;
        let kind: ChunkingKind = chunking.parse().map_err(to_py)?;
        let compression: Compression = compression.parse().map_err(to_py)?;
        let spec = source.to_string_lossy().into_owned();
        let repo = &self.inner;
        let run = run_cancellable(py, progress, move |pfn| {
            let sopts = transports::SourceOptions {
                bitmap,
                timeout: Some(timeout),
                tls_certificates,
                disk: vm_disk,
                transport,
                failover_to_network,
                snapshot_provider: Some(snapshot_provider),
            };
            let opts = BackupOptions {
                chunking: ChunkingInfo { kind, block_size },
                compression,
                threads,
                progress: Some(pfn),
                full_if_needed,
                ..BackupOptions::default()
            };
            transports::backup(repo, &spec, &disk, &sopts, &opts)
        })?;
        Ok(Stats::of_run(&run))
    }

    /// Restore a point ("vm/disk" for the newest, "vm/disk@id-or-prefix", or
    /// a Point) to a new file (sparse), an existing block device, or a
    /// writable NBD export (`nbd://…`, `nbd+unix://…`).
    #[pyo3(signature = (point, target, *, force=false, progress=None, timeout=60.0, tls_certificates=None))]
    #[allow(clippy::too_many_arguments)]
    fn restore(
        &self,
        py: Python<'_>,
        point: &Bound<'_, PyAny>,
        target: PathBuf,
        force: bool,
        progress: Option<Py<PyAny>>,
        timeout: f64,
        tls_certificates: Option<PathBuf>,
    ) -> PyResult<Stats> {
        let timeout = secs(timeout)?;
        let target = target.to_string_lossy().into_owned();
        let spec: String = match point.cast::<Point>() {
            Ok(p) => p.get().__str__(),
            Err(_) => point.extract()?,
        };
        let point: PointRef = spec.parse().map_err(to_py)?;
        let repo = &self.inner;
        let r = run_cancellable(py, progress, move |pfn| {
            transports::restore(
                repo,
                &point,
                &target,
                force,
                &transports::SourceOptions {
                    timeout: Some(timeout),
                    tls_certificates,
                    ..Default::default()
                },
                &RestoreOptions {
                    progress: Some(pfn),
                    ..RestoreOptions::default()
                },
            )
        })?;
        Ok(Stats::new(&r.disk, &r.point, "", &r.stats))
    }

    /// Restore points, oldest first per disk (of one disk if `name` is given).
    #[pyo3(signature = (name=None))]
    fn points(&self, py: Python<'_>, name: Option<&str>) -> PyResult<Vec<Point>> {
        let disk = name
            .map(|n| n.parse::<DiskName>())
            .transpose()
            .map_err(to_py)?;
        let (points, bad) = py
            .detach(|| self.inner.list_points(disk.as_ref()))
            .map_err(to_py)?;
        if let Some(e) = bad.into_iter().next() {
            return Err(to_py(e));
        }
        let fromiso = py
            .import("datetime")?
            .getattr("datetime")?
            .getattr("fromisoformat")?;
        points
            .into_iter()
            .map(|p| {
                let m = p.meta;
                Ok(Point {
                    id: p.id.to_string(),
                    disk: p.disk.to_string(),
                    time: fromiso.call1((m.started.replace('Z', "+00:00"),))?.unbind(),
                    size: m.disk_size,
                    stored_size: m.stats.bytes_stored,
                    source: m.source.location,
                    source_kind: m.source.kind,
                    transport: m.transport,
                    chunking: m.chunking.kind.name().into(),
                    block_size: m.chunking.block_size,
                    compression: m.compression,
                })
            })
            .collect()
    }

    /// Check the repository; with `read_data`, read and check every chunk.
    #[pyo3(signature = (read_data=false))]
    fn verify(&self, py: Python<'_>, read_data: bool) -> PyResult<VerifyReport> {
        let repo = &self.inner;
        let r = run_cancellable(py, None, move |_| datamover::verify(repo, read_data))?;
        Ok(VerifyReport {
            ok: r.is_ok(),
            points: r.points,
            packs: r.packs,
            chunks: r.chunks,
            chunks_read: r.chunks_read,
            problems: r.problems,
            damaged_points: r.damaged_points.iter().map(|d| d.point.clone()).collect(),
            details: r
                .damaged_points
                .into_iter()
                .map(|d| (d.point, d.problems))
                .collect(),
            unindexed_packs: r.unindexed_packs,
        })
    }

    /// Forget points outside the keep rules (per disk) and free their space.
    #[pyo3(signature = (*, keep_last=None, keep_daily=None, keep_weekly=None, keep_monthly=None, dry_run=false))]
    fn prune(
        &self,
        py: Python<'_>,
        keep_last: Option<usize>,
        keep_daily: Option<usize>,
        keep_weekly: Option<usize>,
        keep_monthly: Option<usize>,
        dry_run: bool,
    ) -> PyResult<PruneReport> {
        let opts = PruneOptions {
            keep: KeepPolicy {
                last: keep_last,
                daily: keep_daily,
                weekly: keep_weekly,
                monthly: keep_monthly,
            },
            dry_run,
            ..PruneOptions::default()
        };
        let repo = &self.inner;
        let r = run_cancellable(py, None, move |_| datamover::prune(repo, &opts))?;
        Ok(PruneReport {
            points_kept: r.points_kept,
            points_removed: r.points_removed,
            packs_deleted: r.packs_deleted,
            packs_repacked: r.packs_repacked,
            orphan_packs_deleted: r.orphan_packs_deleted,
            chunks_removed: r.chunks_removed,
            bytes_freed: r.bytes_freed,
        })
    }

    fn __repr__(&self) -> String {
        format!("Repository({:?})", self.inner.root())
    }
}

/// A running VM's disks (`qmp+unix:///path/qmp.sock` or `qmp://host:port`):
/// a list of dicts with node, device, format, file, size, backing and
/// checkpoints.
#[pyfunction]
#[pyo3(signature = (address, *, timeout=60.0))]
fn vm_disks<'py>(py: Python<'py>, address: &str, timeout: f64) -> PyResult<Vec<Bound<'py, PyAny>>> {
    let timeout = secs(timeout)?;
    let address = address.to_string();
    let disks = py
        .detach(move || transports::qemu::disks(&address, timeout))
        .map_err(to_py)?;
    // The same fields as `dm vm-disks --json`, from the one definition.
    let loads = py.import("json")?.getattr("loads")?;
    disks
        .iter()
        .map(|d| loads.call1((d.summary().to_string(),)))
        .collect()
}

/// Map a server client error: refusals and bad input are
/// `InvalidInputError`, no answer is `TransportError`.
fn client_err(e: datamover_control::client::ClientError) -> PyErr {
    let class = match e.status() {
        Some(s) if (400..500).contains(&s) => "InvalidInputError",
        _ => "TransportError",
    };
    py_error(class, e.to_string())
}

/// Why waiting for a session stopped early.
enum Waited {
    Client(datamover_control::client::ClientError),
    Interrupted(PyErr),
}

impl From<datamover_control::client::ClientError> for Waited {
    fn from(e: datamover_control::client::ClientError) -> Self {
        Waited::Client(e)
    }
}

/// A dm-server, through its REST API (the same calls as `dm --server`).
/// Answers are the API's JSON as dicts and lists.
#[pyclass(module = "datamover", frozen)]
struct Server {
    client: datamover_control::client::Client,
}

impl Server {
    fn call<'py>(
        &self,
        py: Python<'py>,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let c = self.client.clone();
        let (method, path) = (method.to_string(), path.to_string());
        let v: serde_json::Value = py
            .detach(move || match (method.as_str(), body) {
                ("GET", _) => c.get(&path),
                ("POST", b) => c.post(&path, &b.unwrap_or(serde_json::json!({}))),
                ("PATCH", b) => c.patch(&path, &b.unwrap_or(serde_json::json!({}))),
                _ => c.delete(&path).map(|()| serde_json::Value::Null),
            })
            .map_err(client_err)?;
        py.import("json")?.getattr("loads")?.call1((v.to_string(),))
    }

    fn json_of(py: Python<'_>, obj: &Bound<'_, PyAny>) -> PyResult<serde_json::Value> {
        let s: String = py
            .import("json")?
            .getattr("dumps")?
            .call1((obj,))?
            .extract()?;
        serde_json::from_str(&s).map_err(|e| PyValueError::new_err(e.to_string()))
    }
}

#[pymethods]
impl Server {
    /// Connect to `url` (https://host:port), trusting the CA certificate at
    /// `ca`, with an API token (or a file holding it).
    #[new]
    #[pyo3(signature = (url, *, ca, token=None, token_file=None, timeout=60.0))]
    fn new(
        url: &str,
        ca: PathBuf,
        token: Option<String>,
        token_file: Option<PathBuf>,
        timeout: f64,
    ) -> PyResult<Self> {
        let ca_pem = std::fs::read_to_string(&ca)
            .map_err(|e| PyFileNotFoundError::new_err(format!("{}: {e}", ca.display())))?;
        let token = match (token, token_file) {
            (Some(t), _) => t,
            (None, Some(f)) => std::fs::read_to_string(&f)
                .map_err(|e| PyFileNotFoundError::new_err(format!("{}: {e}", f.display())))?
                .trim()
                .to_string(),
            (None, None) => return Err(PyValueError::new_err("give token= or token_file=")),
        };
        let client = datamover_control::client::Client::new(
            url,
            &ca_pem,
            None,
            datamover_control::client::Auth::Token(token),
            secs(timeout)?,
        )
        .map_err(client_err)?;
        Ok(Server { client })
    }

    /// Proxies: slots, state, running tasks, datastores.
    fn proxies<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.call(py, "GET", &datamover_control::api::paths::proxies(), None)
    }

    /// Change a proxy's settings: slots, modes, site, disabled.
    #[pyo3(signature = (name, **settings))]
    fn set_proxy<'py>(
        &self,
        py: Python<'py>,
        name: &str,
        settings: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let body = match settings {
            Some(d) => Self::json_of(py, d.as_any())?,
            None => serde_json::json!({}),
        };
        self.call(
            py,
            "PATCH",
            &datamover_control::api::paths::proxy(name),
            Some(body),
        )
    }

    /// Managed hosts.
    fn hosts<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.call(py, "GET", &datamover_control::api::paths::hosts(), None)
    }

    /// Add a host; the answer's ``enrollment_token`` is for the host's
    /// ``dm-installer`` (or ``dm-proxy`` run by hand). ``roles=["proxy"]``
    /// makes its installer deploy and run the proxy.
    #[pyo3(signature = (name, addresses=Vec::new(), *, roles=Vec::new()))]
    fn add_host<'py>(
        &self,
        py: Python<'py>,
        name: &str,
        addresses: Vec<String>,
        roles: Vec<String>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let body = serde_json::json!({"name": name, "addresses": addresses, "roles": roles});
        self.call(
            py,
            "POST",
            &datamover_control::api::paths::hosts(),
            Some(body),
        )
    }

    /// Set a host's roles (``[]`` takes them all away); its installer
    /// follows within a poll.
    fn set_host_roles<'py>(
        &self,
        py: Python<'py>,
        name: &str,
        roles: Vec<String>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let body = serde_json::json!({ "roles": roles });
        self.call(
            py,
            "PATCH",
            &datamover_control::api::paths::host(name),
            Some(body),
        )
    }

    /// Remove a host (revokes its certificate).
    fn remove_host(&self, py: Python<'_>, name: &str) -> PyResult<()> {
        self.call(
            py,
            "DELETE",
            &datamover_control::api::paths::host(name),
            None,
        )
        .map(|_| ())
    }

    /// Repositories.
    fn repositories<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.call(
            py,
            "GET",
            &datamover_control::api::paths::repositories(),
            None,
        )
    }

    /// Add a repository: a directory at the same path on every proxy
    /// (shared storage), or with ``proxy=`` one held and served by that
    /// proxy's repository service (the target of replication jobs).
    #[pyo3(signature = (name, path, *, proxy=None))]
    fn add_repository<'py>(
        &self,
        py: Python<'py>,
        name: &str,
        path: &str,
        proxy: Option<&str>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let body = serde_json::to_value(datamover_control::api::Repository {
            name: name.into(),
            path: path.into(),
            proxy: proxy.map(str::to_string),
        })
        .map_err(|e| PyValueError::new_err(e.to_string()))?;
        self.call(
            py,
            "POST",
            &datamover_control::api::paths::repositories(),
            Some(body),
        )
    }

    /// Jobs.
    fn jobs<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.call(py, "GET", &datamover_control::api::paths::jobs(), None)
    }

    /// Create a job from a dict of the API's JobSpec (name, kind,
    /// repository, disks, proxies, transport, failover_to_network,
    /// retries, every_minutes).
    fn create_job<'py>(
        &self,
        py: Python<'py>,
        spec: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let body = Self::json_of(py, spec)?;
        self.call(
            py,
            "POST",
            &datamover_control::api::paths::jobs(),
            Some(body),
        )
    }

    /// Run a job; with ``wait=True`` return its session once it ended.
    #[pyo3(signature = (name, *, wait=false))]
    fn run_job<'py>(&self, py: Python<'py>, name: &str, wait: bool) -> PyResult<Bound<'py, PyAny>> {
        let s = self.call(
            py,
            "POST",
            &datamover_control::api::paths::job_run(name),
            None,
        )?;
        if !wait {
            return Ok(s);
        }
        let id: u64 = s.get_item("id")?.extract()?;
        let c = self.client.clone();
        let end = py
            .detach(move || {
                c.wait_session(id, |_| -> Result<(), Waited> {
                    Python::attach(|py| py.check_signals()).map_err(Waited::Interrupted)
                })
            })
            .map_err(|e| match e {
                Waited::Client(e) => client_err(e),
                Waited::Interrupted(e) => e,
            })?;
        let v = serde_json::to_value(&end).map_err(|e| PyValueError::new_err(e.to_string()))?;
        py.import("json")?.getattr("loads")?.call1((v.to_string(),))
    }

    /// One session: its tasks with state, proxy, mode, progress, attempts.
    fn session<'py>(&self, py: Python<'py>, id: u64) -> PyResult<Bound<'py, PyAny>> {
        self.call(py, "GET", &datamover_control::api::paths::session(id), None)
    }

    /// Recent sessions, newest first.
    #[pyo3(signature = (limit=20))]
    fn sessions<'py>(&self, py: Python<'py>, limit: u32) -> PyResult<Bound<'py, PyAny>> {
        self.call(
            py,
            "GET",
            &datamover_control::api::paths::sessions(limit),
            None,
        )
    }
}

#[pymodule]
fn _datamover(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<Repository>()?;
    m.add_class::<Stats>()?;
    m.add_class::<Point>()?;
    m.add_class::<VerifyReport>()?;
    m.add_class::<PruneReport>()?;
    m.add_class::<Server>()?;
    m.add_function(wrap_pyfunction!(vm_disks, m)?)?;
    Ok(())
}
