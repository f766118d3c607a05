//! `Repository` and what its calls return (`Point`, `VerifyReport`,
//! `PruneReport`): the core's repository, backup and restore.

use crate::*;

/// One restore point.
#[pyclass(frozen, get_all, module = "datamover")]
pub(crate) struct Point {
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
    /// "application", "crash", or None (not a running guest's disk).
    consistency: Option<String>,
    consistency_reason: Option<String>,
    frozen_ms: Option<u64>,
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
pub(crate) struct VerifyReport {
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
pub(crate) struct PruneReport {
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
pub(crate) struct Repository {
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
    /// falls back to NBD when the mode cannot read the disk. `quiesce`
    /// ("auto", "required", "off") freezes the guest's filesystems through
    /// its agent (`?agent=` in the address) for the snapshot. `format`
    /// ("auto", "raw", "qcow2", ...) says how to read a path: "auto" reads
    /// an image file as the disk it holds.
    #[pyo3(signature = (source, name, *, chunking="fixed", block_size=1<<20, compression="optimal", threads=0, progress=None, bitmap=None, full_if_needed=false, timeout=60.0, tls_certificates=None, disk=None, transport="auto", failover_to_network=false, snapshot_provider="auto", quiesce="auto", format="auto"))]
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
        quiesce: &str,
        format: &str,
    ) -> PyResult<Stats> {
        let format = Some(format.to_string());
        let vm_disk = disk;
        let quiesce: transports::qemu::Quiesce = quiesce.parse().map_err(to_py)?;
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
                quiesce,
                quiesce_limits: Default::default(),
                format,
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

    /// Back up several disks of a running libvirt VM at one instant (one
    /// guest freeze, one backup job, one checkpoint): each disk becomes a
    /// point "VM/TARGET". `disks` names them (default: every disk of the
    /// VM); `exclude` leaves some out. Returns one `Stats` per disk.
    #[pyo3(signature = (source, vm, *, disks=None, exclude=None, quiesce="auto", compression="optimal", threads=0, progress=None, full_if_needed=true, timeout=60.0))]
    #[allow(clippy::too_many_arguments)]
    fn backup_vm(
        &self,
        py: Python<'_>,
        source: &str,
        vm: &str,
        disks: Option<Vec<String>>,
        exclude: Option<Vec<String>>,
        quiesce: &str,
        compression: &str,
        threads: usize,
        progress: Option<Py<PyAny>>,
        full_if_needed: bool,
        timeout: f64,
    ) -> PyResult<Vec<Stats>> {
        let quiesce: transports::qemu::Quiesce = quiesce.parse().map_err(to_py)?;
        let compression: Compression = compression.parse().map_err(to_py)?;
        let timeout = secs(timeout)?;
        let (spec, vm) = (source.to_string(), vm.to_string());
        let (disks, exclude) = (disks.unwrap_or_default(), exclude.unwrap_or_default());
        let repo = &self.inner;
        let runs = run_cancellable(py, progress, move |pfn| {
            let sopts = transports::SourceOptions {
                timeout: Some(timeout),
                quiesce,
                ..Default::default()
            };
            let opts = BackupOptions {
                compression,
                threads,
                progress: Some(pfn),
                full_if_needed,
                ..BackupOptions::default()
            };
            transports::backup_vm(repo, &spec, &vm, &disks, &exclude, &sopts, &opts)
        })?;
        Ok(runs.iter().map(Stats::of_run).collect())
    }

    /// Recreate a libvirt VM from its newest points: each disk "VM/TARGET"
    /// restored as `to/NAME-TARGET.raw`, a domain `name` (default
    /// "VM-restored") defined on `uri` from the definition the point
    /// stored, and started unless `start=False`. Returns the image paths.
    #[pyo3(signature = (vm, to, *, uri="qemu:///system", name=None, start=true))]
    fn restore_vm(
        &self,
        py: Python<'_>,
        vm: &str,
        to: PathBuf,
        uri: &str,
        name: Option<String>,
        start: bool,
    ) -> PyResult<Vec<PathBuf>> {
        let name = name.unwrap_or_else(|| format!("{vm}-restored"));
        let (vm, uri) = (vm.to_string(), uri.to_string());
        let repo = &self.inner;
        run_cancellable(py, None, move |_| {
            transports::libvirt::restore_vm(repo, &vm, &to, &uri, &name, start)
        })
    }

    /// Serve a point ("vm/disk", "vm/disk@id", or a Point) over NBD at
    /// `listen` ("unix:PATH" or "HOST:PORT"; port 0: any free one) until
    /// the returned Export is stopped (`stop()`, or leaving a `with`
    /// block). Writes go to the overlay file `writable` (else the export
    /// is read-only); `tls_certificates` (server-cert.pem, server-key.pem,
    /// optionally ca-cert.pem) makes TLS required.
    #[pyo3(signature = (point, listen, *, writable=None, tls_certificates=None, cache_mib=64))]
    fn export(
        &self,
        point: &Bound<'_, PyAny>,
        listen: &str,
        writable: Option<PathBuf>,
        tls_certificates: Option<PathBuf>,
        cache_mib: u64,
    ) -> PyResult<crate::export::Export> {
        let spec: String = match point.cast::<Point>() {
            Ok(p) => p.get().__str__(),
            Err(_) => point.extract()?,
        };
        let point: PointRef = spec.parse().map_err(to_py)?;
        crate::export::Export::start(
            self.inner.root().to_path_buf(),
            point,
            transports::export::Export {
                listen: listen.to_string(),
                writable,
                tls_certificates,
                cache_bytes: cache_mib.max(1) << 20,
            },
        )
    }

    /// A point's files ("vm/disk[@id]" or a Point), read by a libguestfs
    /// appliance through an export of the point; returns once its
    /// filesystems are mounted. Use `ls`, `get`, `tar`, then `close()`
    /// (or a `with` block).
    #[pyo3(signature = (point, *, appliance_mib=512))]
    fn files(
        &self,
        py: Python<'_>,
        point: &Bound<'_, PyAny>,
        appliance_mib: i32,
    ) -> PyResult<crate::export::Files> {
        let spec: String = match point.cast::<Point>() {
            Ok(p) => p.get().__str__(),
            Err(_) => point.extract()?,
        };
        let point: PointRef = spec.parse().map_err(to_py)?;
        crate::export::Files::open(
            py,
            self.inner.root().to_path_buf(),
            point,
            transports::files::FilesOptions {
                appliance_mib: appliance_mib.max(256),
                ..Default::default()
            },
        )
    }

    /// Instant VM recovery (libvirt): start the VM whose points `points`
    /// name ("vm/disk[@id]", or "vm" for each disk's newest) as domain
    /// `on` (default "libvirt:///VM-instant"; "qmp[:///NAME]" for a QEMU
    /// of our own), its disks served from the
    /// repository by a background thread, its writes to overlays under
    /// `dir`. Returns once the VM runs; migrate with
    /// `datamover.instant_migrate`, or discard.
    #[pyo3(signature = (points, *, on="libvirt:///", dir=None, cache_mib=64))]
    fn instant_recover(
        &self,
        points: Vec<String>,
        on: &str,
        dir: Option<PathBuf>,
        cache_mib: u64,
    ) -> PyResult<crate::export::InstantRecovery> {
        crate::export::InstantRecovery::start(
            self.inner.root().to_path_buf(),
            points,
            transports::instant::Recover {
                on: on.to_string(),
                dir: dir.unwrap_or_else(|| PathBuf::from(transports::instant::DEFAULT_DIR)),
                cache_bytes: cache_mib.max(1) << 20,
            },
        )
    }

    /// Bring the replicas of `vm` under `replicas` (REPLICAS/VM/DISK.img)
    /// to its newest points; only what differs is written. A list of
    /// dicts (the keys of `dm replica sync --json`).
    fn replica_sync<'py>(
        &self,
        py: Python<'py>,
        vm: &str,
        replicas: PathBuf,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (vm, repo) = (vm.to_string(), &self.inner);
        let r = run_cancellable(py, None, move |_| {
            transports::failover::sync(repo, &replicas, &vm)
        })?;
        as_py(py, &r)
    }

    /// The replicas of `vm` under `replicas`: dicts with "disk", "image"
    /// and "state" (what each holds: "applied POINT", "failover POINT", …).
    fn replicas<'py>(
        &self,
        py: Python<'py>,
        vm: &str,
        replicas: PathBuf,
    ) -> PyResult<Bound<'py, PyAny>> {
        let r = transports::failover::replicas(&self.inner, &replicas, vm).map_err(to_py)?;
        as_py(py, &r)
    }

    /// Start `vm` on its replicas: a libvirt domain (`on`, default
    /// "libvirt:///VM-replica") defined from the definition its points
    /// stored; replication stops writing the replicas. A dict.
    #[pyo3(signature = (vm, replicas, *, on="libvirt:///", start=true))]
    fn failover<'py>(
        &self,
        py: Python<'py>,
        vm: &str,
        replicas: PathBuf,
        on: &str,
        start: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (vm, on, repo) = (vm.to_string(), on.to_string(), &self.inner);
        let r = run_cancellable(py, None, move |_| {
            transports::failover::failover(repo, &replicas, &vm, &on, start)
        })?;
        as_py(py, &r)
    }

    /// Undo a failover: the replica VM is stopped and removed; the next
    /// `replica_sync` drops its writes. A dict.
    #[pyo3(signature = (vm, replicas, *, on="libvirt:///"))]
    fn undo_failover<'py>(
        &self,
        py: Python<'py>,
        vm: &str,
        replicas: PathBuf,
        on: &str,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (vm, on, repo) = (vm.to_string(), on.to_string(), &self.inner);
        let r = run_cancellable(py, None, move |_| {
            transports::failover::undo(repo, &replicas, &vm, &on)
        })?;
        as_py(py, &r)
    }

    /// Fail back: the replica VM's changes onto the original VM `to`
    /// (libvirt:///DOMAIN, shut off), which is then started unless
    /// `start=False`; the replica VM is removed. A dict.
    #[pyo3(signature = (vm, replicas, to, *, on="libvirt:///", start=true))]
    fn failback<'py>(
        &self,
        py: Python<'py>,
        vm: &str,
        replicas: PathBuf,
        to: &str,
        on: &str,
        start: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (vm, on, to, repo) = (vm.to_string(), on.to_string(), to.to_string(), &self.inner);
        let r = run_cancellable(py, None, move |_| {
            transports::failover::failback(
                repo,
                &replicas,
                &vm,
                &on,
                &to,
                start,
                &Default::default(),
            )
        })?;
        as_py(py, &r)
    }

    /// Quick migration of the running libvirt VM `source` to `to`
    /// (libvirt:///NAME) through this repository and the replicas under
    /// `replicas`. A dict (the keys of `dm migrate --json`).
    #[pyo3(signature = (source, to, replicas, *, vm=None, quiesce="auto"))]
    fn migrate_vm<'py>(
        &self,
        py: Python<'py>,
        source: &str,
        to: &str,
        replicas: PathBuf,
        vm: Option<String>,
        quiesce: &str,
    ) -> PyResult<Bound<'py, PyAny>> {
        let opts = transports::SourceOptions {
            quiesce: quiesce.parse().map_err(to_py)?,
            ..Default::default()
        };
        let (source, to, repo) = (source.to_string(), to.to_string(), &self.inner);
        let r = run_cancellable(py, None, move |_| {
            transports::failover::migrate(
                repo,
                &replicas,
                vm.as_deref(),
                &source,
                &to,
                &opts,
                &Default::default(),
            )
        })?;
        as_py(py, &r)
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
                    consistency: m.consistency.as_ref().map(|c| c.level.to_string()),
                    consistency_reason: m.consistency.as_ref().map(|c| c.reason.clone()),
                    frozen_ms: m.consistency.as_ref().and_then(|c| c.frozen_ms),
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
