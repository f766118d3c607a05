//! The transport service of a proxy: heartbeats to the server with its
//! load, the storage it sees and the progress of its tasks; takes the tasks
//! the server assigns; runs each as a data mover (the same
//! [`transports::backup`] that `dm backup` runs) in its own thread; reports
//! each result at once, so a freed slot is refilled without waiting for
//! the next heartbeat.
//!
//! The server's built-in proxy is this same code, run inside the server
//! process with a certificate the server issues to itself.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::time::{Duration, Instant};

use datamover::{BackupOptions, DiskName, Repository, Store};

use crate::repo_service::{RemoteStore, Served, ServedMap};
use datamover_control::api::{
    AGENT, Heartbeat, JobKind, OperationOrder, OperationStatus, Orders, ReplicaAction, TaskOrder,
    TaskProgress, TaskResult,
};
use datamover_control::client::Client;

/// The version of the proxy component.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// How a proxy runs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The server, `https://host:port`.
    pub server: String,
    /// The host's certificate and key (renewed as they age).
    pub identity: crate::identity::LiveIdentity,
    /// Directories of VM disks this proxy can open directly (SAN mode).
    pub datastores: Vec<PathBuf>,
    /// Heartbeat interval until the server says otherwise.
    pub interval: Duration,
    /// The repositories this proxy's repository service offers, kept as
    /// the server's orders say (unused without a service).
    pub served: ServedMap,
    /// The port of this proxy's repository service, if it runs one.
    pub service_port: Option<u16>,
    /// Where manifests of points written through repository services
    /// are kept for the next backup of the same disk (none: fetched each
    /// time).
    pub manifest_cache: Option<PathBuf>,
    /// Where the instant recoveries this proxy serves keep their sessions
    /// (sockets, overlays).
    pub recoveries: PathBuf,
}

/// What a task needs of its proxy besides the order.
#[derive(Debug)]
pub struct Mover {
    /// The host's certificate (for repository services).
    pub identity: crate::identity::LiveIdentity,
    /// See [`AgentConfig::manifest_cache`].
    pub manifest_cache: Option<PathBuf>,
    /// The datastores this proxy was given; those that exist are the
    /// ones it reports (and may read and write paths under).
    pub datastores: Vec<PathBuf>,
}

impl Mover {
    /// A task's path (a disk to read, a restore target, also as a
    /// `file://` URI) resolved: every `..` and symlink followed, and the
    /// result must lie under a datastore this proxy was given
    /// ([`transports::mode::resolve_within`]). The task then opens the
    /// resolved path. Addresses that are not paths (NBD, VMs) are returned
    /// as they are.
    fn resolve(&self, source: &str) -> datamover::Result<String> {
        let Some(path) = datamover::source::local_path(source)? else {
            return Ok(source.to_string());
        };
        transports::mode::resolve_within(&self.datastores, path)
            .map(|p| p.display().to_string())
            .map_err(|e| datamover::Error::InvalidArgument(e.to_string()))
    }
}

/// How often a hypervisor's VMs are listed for the server's inventory.
const INVENTORY_EVERY: Duration = Duration::from_secs(30);

/// The VMs of the host's libvirt connection when it is a hypervisor and
/// the last list is old; `None` otherwise (the server keeps the last).
fn inventory(
    hypervisor: &Option<String>,
    listed: &mut Option<Instant>,
) -> Option<Vec<datamover_control::api::VmReport>> {
    let uri = hypervisor.as_deref()?;
    if listed.is_some_and(|t| t.elapsed() < INVENTORY_EVERY) {
        return None;
    }
    *listed = Some(Instant::now());
    match transports::libvirt::domains(&format!("libvirt:///?uri={uri}")) {
        Ok(doms) => Some(
            doms.into_iter()
                .map(|d| datamover_control::api::VmReport {
                    name: d.name,
                    state: d.state,
                    disks: d
                        .disks
                        .into_iter()
                        .map(|k| datamover_control::api::VmDisk {
                            target: k.target,
                            format: k.format,
                            source: k.source,
                        })
                        .collect(),
                })
                .collect(),
        ),
        Err(e) => {
            tracing::warn!("listing the VMs of {uri}: {e}");
            None
        }
    }
}

/// The datastores that exist, as the proxy reports them.
fn visible(datastores: &[PathBuf]) -> Vec<String> {
    datastores
        .iter()
        .filter(|d| d.is_dir())
        .map(|d| d.display().to_string())
        .collect()
}

/// One running task as the agent tracks it.
#[derive(Debug)]
struct Running {
    attempt: u32,
    done: Arc<AtomicU64>,
    total: Arc<AtomicU64>,
    cancel: Arc<AtomicBool>,
}

/// Run the agent until `stop` is set. Errors reaching the server are
/// logged and retried; they never end the agent.
pub fn run(cfg: &AgentConfig, stop: &AtomicBool) -> Result<(), crate::error::ProxyError> {
    let mut client = Client::for_host(&cfg.server, &cfg.identity.get())?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    let (tx, rx): (Sender<TaskResult>, Receiver<TaskResult>) = channel();
    let mut w = Tasks {
        running: HashMap::new(),
        ran: HashSet::new(),
        tx,
        interval: cfg.interval,
        mover: Arc::new(Mover {
            identity: cfg.identity.clone(),
            manifest_cache: cfg.manifest_cache.clone(),
            datastores: cfg.datastores.clone(),
        }),
        served: cfg.served.clone(),
        operations: Arc::new(std::sync::Mutex::new(HashMap::new())),
        recoveries: crate::recoveries::Recoveries::new(
            cfg.recoveries.clone(),
            cfg.datastores.clone(),
            cfg.identity.clone(),
        ),
        files: crate::files::FileRequests::new(cfg.server.clone(), cfg.identity.clone()),
    };
    let mut unsent: Vec<TaskResult> = Vec::new();
    // The host's libvirt connection when the server made it a hypervisor,
    // and when its VMs were last listed.
    let mut hypervisor: Option<String> = None;
    let mut listed: Option<Instant> = None;
    let mut next_beat = Instant::now();
    let mut failures = 0u32;
    while !stop.load(Ordering::Relaxed) {
        // Results first: each frees a slot the server can refill at once.
        // Orders are applied as soon as they come, so the heartbeat that
        // follows already reports the tasks they started.
        while let Ok(r) = rx.try_recv() {
            w.running.remove(&r.task);
            unsent.push(r);
        }
        let mut reached = true;
        while let Some(r) = unsent.first() {
            match client.post::<_, Orders>(&format!("{AGENT}/tasks/{}/result", r.task), r) {
                Ok(o) => {
                    unsent.remove(0);
                    w.apply(o);
                }
                Err(e) if e.status().is_some_and(|s| (400..500).contains(&s)) => {
                    tracing::warn!("server refused result of task {}: {e}", r.task);
                    unsent.remove(0);
                }
                Err(e) => {
                    tracing::warn!("cannot report task {}: {e}", r.task);
                    reached = false;
                    break;
                }
            }
        }
        if reached && Instant::now() >= next_beat {
            let hb = Heartbeat {
                version: VERSION.into(),
                cores,
                datastores: visible(&cfg.datastores),
                running: w.progress(),
                service_port: cfg.service_port,
                vms: inventory(&hypervisor, &mut listed),
                operations: w.operation_statuses(),
                recoveries: w.recoveries.statuses(),
                files: w.files.statuses(),
                serving: match cfg.service_port {
                    Some(_) => {
                        let mut v: Vec<String> = cfg
                            .served
                            .read()
                            .unwrap_or_else(|p| p.into_inner())
                            .keys()
                            .cloned()
                            .collect();
                        v.sort();
                        v
                    }
                    None => Vec::new(),
                },
            };
            match client.post::<_, Orders>(&format!("{AGENT}/heartbeat"), &hb) {
                Ok(o) => {
                    failures = 0;
                    w.forget_reported(&hb.operations);
                    w.recoveries.forget_reported(&hb.recoveries);
                    w.files.forget_reported(&hb.files);
                    if o.hypervisor != hypervisor {
                        hypervisor = o.hypervisor.clone();
                        listed = None;
                    }
                    w.apply(o);
                    // Renew the host's certificate when it is due.
                    cfg.identity.keep_fresh(&cfg.server, &mut client);
                }
                Err(e) => {
                    failures += 1;
                    if failures == 1 || failures % 30 == 0 {
                        tracing::warn!("heartbeat failed ({failures} in a row): {e}");
                    }
                }
            }
            next_beat = Instant::now() + w.interval;
        }
        // Wake for a result at once, else at the next heartbeat.
        let wait = next_beat.saturating_duration_since(Instant::now());
        let wait = if unsent.is_empty() {
            wait
        } else {
            wait.max(Duration::from_millis(500))
        };
        match rx.recv_timeout(wait) {
            Ok(r) => {
                w.running.remove(&r.task);
                unsent.push(r);
            }
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {}
        }
    }
    for r in w.running.values() {
        r.cancel.store(true, Ordering::Relaxed);
    }
    w.recoveries.stop_all();
    Ok(())
}

/// The tasks of this proxy.
struct Tasks {
    running: HashMap<u64, Running>,
    /// (task, attempt) already started here: a repeated order is ignored.
    ran: HashSet<(u64, u32)>,
    tx: Sender<TaskResult>,
    interval: Duration,
    mover: Arc<Mover>,
    served: ServedMap,
    /// Operations on VM replicas: running, or ended and not yet reported.
    operations: Arc<std::sync::Mutex<HashMap<u64, OperationStatus>>>,
    /// Instant recoveries this proxy serves.
    recoveries: crate::recoveries::Recoveries,
    /// File requests: listings and archives of points' files.
    files: crate::files::FileRequests,
}

impl Tasks {
    fn operation_statuses(&self) -> Vec<OperationStatus> {
        let m = self.operations.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<OperationStatus> = m.values().cloned().collect();
        v.sort_by_key(|s| s.id);
        v
    }

    /// A heartbeat carried these: the ended ones need not be sent again.
    fn forget_reported(&self, sent: &[OperationStatus]) {
        let mut m = self.operations.lock().unwrap_or_else(|p| p.into_inner());
        for s in sent.iter().filter(|s| s.done) {
            m.remove(&s.id);
        }
    }

    /// Start an operation the server ordered (once), in its own thread.
    fn start_operation(&self, o: OperationOrder) {
        {
            let mut m = self.operations.lock().unwrap_or_else(|p| p.into_inner());
            if m.contains_key(&o.id) {
                return;
            }
            m.insert(
                o.id,
                OperationStatus {
                    id: o.id,
                    done: false,
                    result: None,
                    error: None,
                },
            );
        }
        tracing::info!("operation {}: {} of VM {}", o.id, o.action.name(), o.vm);
        let (ops, id) = (self.operations.clone(), o.id);
        let spawned = std::thread::Builder::new()
            .name(format!("operation-{}", o.id))
            .spawn(move || {
                let r = run_operation(&o);
                if let Err(e) = &r {
                    tracing::warn!("operation {}: {e}", o.id);
                }
                let mut m = ops.lock().unwrap_or_else(|p| p.into_inner());
                m.insert(
                    o.id,
                    OperationStatus {
                        id: o.id,
                        done: true,
                        error: r.as_ref().err().map(ToString::to_string),
                        result: r.ok(),
                    },
                );
            });
        if let Err(e) = spawned {
            let mut m = self.operations.lock().unwrap_or_else(|p| p.into_inner());
            m.insert(
                id,
                OperationStatus {
                    id,
                    done: true,
                    result: None,
                    error: Some(format!("cannot start a thread: {e}")),
                },
            );
        }
    }

    fn progress(&self) -> Vec<TaskProgress> {
        self.running
            .iter()
            .map(|(id, r)| TaskProgress {
                task: *id,
                attempt: r.attempt,
                done: r.done.load(Ordering::Relaxed),
                total: r.total.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// Apply the server's orders: cancel, start.
    fn apply(&mut self, o: Orders) {
        if o.interval_ms > 0 {
            self.interval = Duration::from_millis(o.interval_ms.clamp(50, 60_000));
        }
        let serve: HashMap<String, Served> = o
            .serve
            .iter()
            .map(|r| {
                (
                    r.name.clone(),
                    Served {
                        path: PathBuf::from(&r.path),
                        grants: r.grants.clone(),
                        hypervisor: o.hypervisor.clone(),
                    },
                )
            })
            .collect();
        let mut m = self.served.write().unwrap_or_else(|p| p.into_inner());
        if m.keys().ne(serve.keys()) {
            tracing::info!(
                "repository service offers: {}",
                serve.keys().cloned().collect::<Vec<_>>().join(", ")
            );
        }
        *m = serve;
        drop(m);
        for op in o.operations {
            self.start_operation(op);
        }
        for r in o.recoveries {
            self.recoveries.apply(r);
        }
        for f in o.files {
            self.files.apply(f);
        }
        for id in o.cancel {
            if let Some(r) = self.running.get(&id) {
                tracing::info!("task {id}: cancelled by the server");
                r.cancel.store(true, Ordering::Relaxed);
            }
        }
        let mut fresh: Vec<TaskOrder> = Vec::new();
        for t in o.assign {
            if self.running.contains_key(&t.task) || !self.ran.insert((t.task, t.attempt)) {
                continue;
            }
            if self.ran.len() > 100_000 {
                self.ran.clear();
            }
            fresh.push(t);
        }
        // The disks of one libvirt VM ordered together are read in one
        // backup: one guest freeze, one backup job, one checkpoint.
        let mut groups: Vec<Vec<TaskOrder>> = Vec::new();
        for t in fresh {
            let joins = groupable(&t)
                .then(|| {
                    groups.iter_mut().find(|g| {
                        g.first()
                            .is_some_and(|f| f.source == t.source && f.kind == t.kind)
                    })
                })
                .flatten();
            match joins {
                Some(g) => g.push(t),
                None => groups.push(vec![t]),
            }
        }
        for g in groups {
            let runs: Vec<Running> = g
                .iter()
                .map(|t| Running {
                    attempt: t.attempt,
                    done: Arc::new(AtomicU64::new(0)),
                    total: Arc::new(AtomicU64::new(0)),
                    cancel: Arc::new(AtomicBool::new(false)),
                })
                .collect();
            let counters: Vec<_> = runs
                .iter()
                .map(|r| (r.done.clone(), r.total.clone(), r.cancel.clone()))
                .collect();
            for (t, r) in g.iter().zip(runs) {
                tracing::info!(
                    "task {} ({}, attempt {}): starting",
                    t.task,
                    t.disk,
                    t.attempt
                );
                self.running.insert(t.task, r);
            }
            let (tx, mover) = (self.tx.clone(), self.mover.clone());
            std::thread::spawn(move || {
                let progress: datamover::ProgressFn = Arc::new(move |d, n| {
                    for (done, total, _) in &counters {
                        done.store(d, Ordering::Relaxed);
                        total.store(n, Ordering::Relaxed);
                    }
                    !counters.iter().any(|(_, _, c)| c.load(Ordering::Relaxed))
                });
                for res in run_group(&g, &mover, progress) {
                    let _ = tx.send(res);
                }
            });
        }
    }
}

/// Whether a task may share a backup with the other disks of its VM.
fn groupable(t: &TaskOrder) -> bool {
    t.kind != JobKind::Restore && t.vm_disk.is_some() && transports::libvirt::is_libvirt(&t.source)
}

/// Run tasks ordered together: one alone as before; the disks of one
/// libvirt VM in one backup. Every task gets its result.
fn run_group(g: &[TaskOrder], mover: &Mover, progress: datamover::ProgressFn) -> Vec<TaskResult> {
    if let [t] = g
        && !(groupable(t) && t.kind == JobKind::Migration)
    {
        return vec![run_task(t, mover, progress)];
    }
    match run_vm_tasks(g, mover, progress) {
        Ok(outcomes) => g
            .iter()
            .zip(outcomes)
            .map(|(t, o)| result_of(t, o.and_then(|o| sign_receipt(t, mover, o))))
            .collect(),
        Err(e) => {
            let msg = e.to_string();
            g.iter()
                .map(|t| {
                    result_of(
                        t,
                        Err(datamover::Error::transport(
                            t.source.clone(),
                            datamover::TransportKind::Refused,
                            msg.clone(),
                        )),
                    )
                })
                .collect()
        }
    }
}

/// The rest of a libvirt VM's quick migration, after the first pass: the
/// guest frozen (when its agent answers) and paused, the final sync of
/// every disk, the VM started on its replicas by the target's repository
/// service, the source powered off. On any failure before the VM runs on
/// the target, the source is resumed and thawed.
fn migrate_vm(
    g: &[TaskOrder],
    mover: &Mover,
    store: &dyn Store,
    source: &str,
    targets: &[String],
    src: &transports::SourceOptions,
    opts: &BackupOptions,
) -> datamover::Result<Vec<transports::BackupRun>> {
    let first = &g[0];
    let vm = first.disk.vm();
    let at = first.service.clone().ok_or_else(|| {
        datamover::Error::Internal(
            "a migration writes through the target's repository service".into(),
        )
    })?;
    let paused = transports::libvirt::pause(source, src.quiesce)?;
    tracing::info!(
        "VM {vm}: paused ({}) for the final sync of {} disks",
        paused.consistency(),
        g.len()
    );
    let still = transports::SourceOptions {
        quiesce: paused.held(),
        ..src.clone()
    };
    let last =
        transports::backup_vm(store, source, vm, targets, &[], &still, opts).and_then(|runs| {
            let started = RemoteStore::new(at.clone(), &mover.identity.get())
                .map_err(|e| {
                    datamover::Error::InvalidArgument(format!(
                        "repository service {}: {e:#}",
                        at.address
                    ))
                })?
                .start_vm(&first.disk, first.start_as.as_deref())?;
            Ok((runs, started))
        });
    match last {
        Ok((runs, started)) => {
            tracing::info!("VM {vm}: running on the target: {started}");
            if let Err(e) = paused.power_off() {
                tracing::warn!("VM {vm} runs on the target, but: {e}");
            }
            Ok(runs)
        }
        Err(e) => {
            paused.resume();
            Err(e)
        }
    }
}

/// Points go where each task's repository is, by disk.
struct ByDisk<'a>(Vec<(&'a DiskName, &'a dyn Store)>);

impl ByDisk<'_> {
    fn of(&self, disk: &DiskName) -> datamover::Result<&dyn Store> {
        self.0
            .iter()
            .find(|(d, _)| *d == disk)
            .map(|(_, s)| *s)
            .ok_or_else(|| datamover::Error::Internal(format!("no task writes {disk}")))
    }
}

impl Store for ByDisk<'_> {
    fn describe(&self) -> String {
        self.0
            .first()
            .map(|(_, s)| s.describe())
            .unwrap_or_default()
    }
    fn latest_meta(
        &self,
        disk: &DiskName,
    ) -> datamover::Result<Option<(datamover::PointId, datamover::PointMeta)>> {
        self.of(disk)?.latest_meta(disk)
    }
    fn begin<'s>(
        &'s self,
        disk: &DiskName,
        started: chrono::DateTime<chrono::Utc>,
    ) -> datamover::Result<Box<dyn datamover::StoreSession + 's>> {
        self.of(disk)?.begin(disk, started)
    }
}

/// The disks of one libvirt VM in one backup (a migration: a first pass,
/// the VM paused, a final one); each task's outcome, in order.
fn run_vm_tasks(
    g: &[TaskOrder],
    mover: &Mover,
    progress: datamover::ProgressFn,
) -> datamover::Result<Vec<datamover::Result<Outcome>>> {
    let first = &g[0];
    let source = mover.resolve(&first.source)?;
    let dests: Vec<Dest> = g
        .iter()
        .map(|t| store_for(t, mover))
        .collect::<datamover::Result<_>>()?;
    let store = ByDisk(
        g.iter()
            .zip(&dests)
            .map(|(t, d)| (&t.disk, d.store()))
            .collect(),
    );
    let targets: Vec<String> = g.iter().filter_map(|t| t.vm_disk.clone()).collect();
    let vm = first.disk.vm().to_string();
    let src = transports::SourceOptions {
        transport: first.transport.parse()?,
        failover_to_network: first.failover_to_network,
        quiesce: first.quiesce.parse()?,
        ..Default::default()
    };
    let opts = BackupOptions {
        progress: Some(progress),
        full_if_needed: true,
        full: first.kind == JobKind::Copy,
        ..Default::default()
    };
    let mut runs = transports::backup_vm(&store, &source, &vm, &targets, &[], &src, &opts)?;
    if first.kind == JobKind::Migration {
        runs = migrate_vm(g, mover, &store, &source, &targets, &src, &opts)?;
    }
    Ok(g.iter()
        .zip(&dests)
        .map(|(t, d)| {
            let run = runs
                .iter()
                .find(|r| r.report.disk == t.disk)
                .ok_or_else(|| datamover::Error::Internal(format!("no point of {}", t.disk)))?;
            finish_outcome(t, d, run)
        })
        .collect())
}

/// Run one task to its end; never panics, always yields a result.
fn run_task(t: &TaskOrder, mover: &Mover, progress: datamover::ProgressFn) -> TaskResult {
    result_of(
        t,
        run_kind(t, mover, progress).and_then(|o| sign_receipt(t, mover, o)),
    )
}

/// A task's result as the server takes it.
fn result_of(t: &TaskOrder, r: datamover::Result<Outcome>) -> TaskResult {
    let mut res = TaskResult {
        task: t.task,
        attempt: t.attempt,
        point: None,
        mode: None,
        bottleneck: None,
        bytes_read: 0,
        bytes_stored: 0,
        total: 0,
        wire_bytes: 0,
        replica: None,
        error: None,
        permanent: false,
        receipt: None,
        consistency: None,
    };
    match r {
        Ok(o) => {
            tracing::info!(
                "task {}: {} {} ({})",
                t.task,
                t.kind.as_str(),
                o.point,
                o.mode
            );
            res.point = Some(o.point);
            res.mode = Some(o.mode);
            res.bottleneck = Some(o.bottleneck);
            res.bytes_read = o.bytes_read;
            res.bytes_stored = o.bytes_stored;
            res.total = o.total;
            res.wire_bytes = o.wire_bytes;
            res.replica = o.replica;
            res.receipt = o.receipt;
            res.consistency = o.consistency;
        }
        Err(e) => {
            tracing::warn!("task {}: {e}", t.task);
            res.permanent = !e.is_retryable();
            res.error = Some(e.to_string());
        }
    }
    res
}

/// A result on a repository this proxy holds and wrote directly carries
/// a receipt signed with its own key (the repository service signs the
/// others).
fn sign_receipt(t: &TaskOrder, mover: &Mover, mut o: Outcome) -> datamover::Result<Outcome> {
    let Some(repository) = &t.receipt_for else {
        return Ok(o);
    };
    let r = datamover_control::api::Receipt::signed(
        &mover.identity.get(),
        t.task,
        repository,
        &t.disk,
        &o.point,
        o.total,
    )
    .map_err(|e| datamover::Error::Internal(format!("sign the receipt: {e}")))?;
    o.receipt = Some(r);
    Ok(o)
}

/// What a task did.
struct Outcome {
    point: datamover::PointId,
    mode: String,
    bottleneck: String,
    bytes_read: u64,
    bytes_stored: u64,
    total: u64,
    wire_bytes: u64,
    replica: Option<String>,
    receipt: Option<datamover_control::api::Receipt>,
    consistency: Option<datamover::Consistency>,
}

impl Outcome {
    fn of(run: &transports::BackupRun) -> Outcome {
        let r = &run.report;
        Outcome {
            point: r.point.clone(),
            mode: r.meta.transport.clone(),
            bottleneck: r.stats.bottleneck().to_string(),
            bytes_read: r.stats.bytes_read,
            bytes_stored: r.stats.bytes_stored,
            total: r.stats.bytes_total,
            wire_bytes: 0,
            replica: None,
            receipt: None,
            consistency: r.meta.consistency.clone(),
        }
    }
}

/// Where a task's points go: the repository's directory, or its
/// repository service.
enum Dest {
    Local(Repository),
    Remote(Box<RemoteStore>),
}

impl Dest {
    fn store(&self) -> &dyn Store {
        match self {
            Dest::Local(r) => r,
            Dest::Remote(r) => r.as_ref(),
        }
    }
}

fn store_for(t: &TaskOrder, mover: &Mover) -> datamover::Result<Dest> {
    if let Some(e) = &t.service_error {
        return Err(datamover::Error::transport(
            t.repository.clone(),
            datamover::TransportKind::Connect,
            e.clone(),
        ));
    }
    match &t.service {
        Some(at) => Ok(Dest::Remote(Box::new(
            RemoteStore::new(at.clone(), &mover.identity.get())
                .map(|r| match &mover.manifest_cache {
                    Some(d) => r.with_manifest_cache(d.clone()),
                    None => r,
                })
                .map_err(|e| {
                    datamover::Error::InvalidArgument(format!(
                        "repository service {}: {e:#}",
                        at.address
                    ))
                })?,
        ))),
        None => Ok(Dest::Local(crate::open_or_init(Path::new(&t.repository))?)),
    }
}

fn run_kind(
    t: &TaskOrder,
    mover: &Mover,
    progress: datamover::ProgressFn,
) -> datamover::Result<Outcome> {
    let disk: DiskName = t.disk.clone();
    let resolved = TaskOrder {
        source: mover.resolve(&t.source)?,
        ..t.clone()
    };
    let t = &resolved;
    if t.kind == JobKind::Restore {
        return restore_task(t, &disk, progress);
    }
    let dest = store_for(t, mover)?;
    let store = dest.store();
    let src = transports::SourceOptions {
        disk: t.vm_disk.clone(),
        transport: t.transport.parse()?,
        failover_to_network: t.failover_to_network,
        quiesce: t.quiesce.parse()?,
        ..Default::default()
    };
    let opts = BackupOptions {
        progress: Some(progress),
        full_if_needed: true,
        full: t.kind == JobKind::Copy,
        ..Default::default()
    };
    let mut run = transports::backup(store, &t.source, &disk, &src, &opts)?;
    if t.kind == JobKind::Migration {
        // The first pass copied the disk while it ran; now stop the
        // writer and send what changed since.
        if transports::qemu::is_vm(&t.source) {
            transports::qemu::pause(&t.source)?;
            tracing::info!("task {}: source VM paused for the final sync", t.task);
        }
        let first = run.report.stats.bytes_read;
        run = transports::backup(store, &t.source, &disk, &src, &opts)?;
        tracing::info!(
            "task {}: final sync read {} bytes (first pass {first})",
            t.task,
            run.report.stats.bytes_read
        );
    }
    finish_outcome(t, &dest, &run)
}

/// A run's outcome with what its destination adds: the wire bytes, the
/// receipt and the replica a repository service reports.
fn finish_outcome(
    t: &TaskOrder,
    dest: &Dest,
    run: &transports::BackupRun,
) -> datamover::Result<Outcome> {
    let mut o = Outcome::of(run);
    if let Dest::Remote(r) = dest {
        let w = &r.wire;
        o.wire_bytes = w.sent.load(Ordering::Relaxed) + w.received.load(Ordering::Relaxed);
        let last = r.last.lock().unwrap_or_else(|p| p.into_inner()).take();
        o.receipt = last.as_ref().and_then(|c| c.receipt.clone());
        o.replica = last.and_then(|c| c.replica).map(|x| x.path);
        if let (Some(c), false) = (&o.replica, t.kind.replicates()) {
            tracing::warn!("task {}: unexpected replica {c}", t.task);
        }
    }
    if t.kind.replicates() && o.replica.is_none() {
        return Err(datamover::Error::Internal(
            "the target proxy did not update the replica".into(),
        ));
    }
    Ok(o)
}

/// A restore task: the point from the repository's directory (this
/// proxy holds it, or sees the shared path) to the location in `source`.
fn restore_task(
    t: &TaskOrder,
    disk: &DiskName,
    progress: datamover::ProgressFn,
) -> datamover::Result<Outcome> {
    // A file or device that exists is only written over when the job
    // says so (NBD exports always exist: naming one is the consent).
    if let Some(p) = datamover::source::local_path(&t.source)?
        && !t.overwrite
        && std::fs::symlink_metadata(p).is_ok()
    {
        return Err(datamover::Error::InvalidArgument(format!(
            "restore target {} exists; a restore job writes over a file or device only with \"overwrite\" (dm job create --overwrite)",
            p.display()
        )));
    }
    let repo = Repository::open(Path::new(&t.repository))?;
    let wanted = datamover::PointRef {
        disk: disk.clone(),
        at: t.point.clone(),
    };
    let r = transports::restore(
        &repo,
        &wanted,
        &t.source,
        t.overwrite,
        &Default::default(),
        &datamover::RestoreOptions {
            progress: Some(progress),
            ..Default::default()
        },
    )?;
    Ok(Outcome {
        point: r.point.clone(),
        mode: if t.source.starts_with("nbd") {
            "nbd".into()
        } else {
            "san".into()
        },
        bottleneck: r.stats.bottleneck().to_string(),
        bytes_read: r.stats.bytes_read,
        bytes_stored: 0,
        total: r.stats.bytes_total,
        wire_bytes: 0,
        replica: None,
        receipt: None,
        consistency: None,
    })
}

/// Run the agent in a thread (the server's built-in proxy); returns a
/// handle that stops it when dropped.
pub fn spawn(cfg: AgentConfig) -> AgentHandle {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let join = std::thread::Builder::new()
        .name("builtin-proxy".into())
        .spawn(move || {
            if let Err(e) = run(&cfg, &s) {
                tracing::error!("built-in proxy stopped: {e:#}");
            }
        })
        .ok();
    AgentHandle { stop, join }
}

/// A running in-process agent.
#[derive(Debug)]
pub struct AgentHandle {
    stop: Arc<AtomicBool>,
    join: Option<std::thread::JoinHandle<()>>,
}

impl Drop for AgentHandle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

/// Run an operation on VM replicas: the repository's replicas, the
/// addresses the server filled in.
fn run_operation(o: &OperationOrder) -> datamover::Result<serde_json::Value> {
    use transports::failover;
    let repo = Repository::open(Path::new(&o.repository))?;
    let root = crate::repo_service::replica_root(Path::new(&o.repository));
    let json = |v: serde_json::Result<serde_json::Value>| {
        v.map_err(|e| datamover::Error::Internal(e.to_string()))
    };
    match o.action {
        ReplicaAction::Failover => json(serde_json::to_value(failover::failover(
            &repo, &root, &o.vm, &o.on, o.start,
        )?)),
        ReplicaAction::Undo => json(serde_json::to_value(failover::undo(
            &repo, &root, &o.vm, &o.on,
        )?)),
        ReplicaAction::Failback => {
            let to = o.to.as_deref().ok_or_else(|| {
                datamover::Error::InvalidArgument("a failback needs the original VM".into())
            })?;
            json(serde_json::to_value(failover::failback(
                &repo,
                &root,
                &o.vm,
                &o.on,
                to,
                o.start,
                &BackupOptions::default(),
            )?))
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A proxy runs a path task only under a datastore it reports: the
    /// rule placement used, checked again where the data moves.
    #[test]
    fn paths_outside_the_datastores_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let ds = d.path().join("images");
        std::fs::create_dir(&ds).unwrap();
        let m = Mover {
            identity: crate::identity::LiveIdentity::new(
                datamover_control::pki::Identity {
                    cert_pem: String::new(),
                    key_pem: String::new(),
                    ca_pem: String::new(),
                },
                None,
            ),
            manifest_cache: None,
            datastores: vec![ds.clone(), d.path().join("missing")],
        };
        let inside = ds.join("a.raw").display().to_string();
        let real = std::fs::canonicalize(&ds).unwrap().join("a.raw");
        assert_eq!(m.resolve(&inside).unwrap(), real.display().to_string());
        assert_eq!(
            m.resolve(&format!("file://{inside}")).unwrap(),
            real.display().to_string()
        );
        // Through `..` that stays inside: resolved to the real path.
        std::fs::create_dir(ds.join("sub")).unwrap();
        let via = format!("{}/sub/../a.raw", ds.display());
        assert_eq!(m.resolve(&via).unwrap(), real.display().to_string());
        assert_eq!(m.resolve("nbd://host/export").unwrap(), "nbd://host/export");
        assert_eq!(
            m.resolve("qmp+unix:///run/vm.qmp").unwrap(),
            "qmp+unix:///run/vm.qmp"
        );
        // Symlinks out of the datastore, to a file and to a directory.
        std::os::unix::fs::symlink("/etc/hostname", ds.join("link")).unwrap();
        std::os::unix::fs::symlink("/etc", ds.join("etc")).unwrap();
        std::os::unix::fs::symlink("/nonexistent/x", ds.join("dangling")).unwrap();
        for bad in [
            "/etc/shadow".to_string(),
            "file:///etc/shadow".to_string(),
            format!("{}/../secret.raw", ds.display()),
            d.path().join("missing/a.raw").display().to_string(),
            ds.join("link").display().to_string(),
            ds.join("etc/new.raw").display().to_string(),
            ds.join("dangling").display().to_string(),
            "relative.raw".to_string(),
        ] {
            let e = m.resolve(&bad).unwrap_err();
            assert_eq!(e.kind(), datamover::ErrorKind::InvalidInput, "{bad}");
        }
    }
}
