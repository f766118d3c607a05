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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use datamover::{BackupOptions, DiskName, ErrorKind, Repository};

use crate::api::{AGENT, Heartbeat, Orders, TaskOrder, TaskProgress, TaskResult};
use crate::client::{Auth, Client};
use crate::pki::Identity;

/// The version of the proxy component.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// How a proxy runs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The server, `https://host:port`.
    pub server: String,
    /// The host's certificate and key.
    pub identity: Identity,
    /// Directories of VM disks this proxy can open directly (SAN mode).
    pub datastores: Vec<PathBuf>,
    /// Heartbeat interval until the server says otherwise.
    pub interval: Duration,
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
pub fn run(cfg: &AgentConfig, stop: &AtomicBool) -> anyhow::Result<()> {
    let client = Client::new(
        &cfg.server,
        &cfg.identity.ca_pem,
        Some(&cfg.identity),
        Auth::Certificate,
        Duration::from_secs(30),
    )?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    let (tx, rx): (Sender<TaskResult>, Receiver<TaskResult>) = channel();
    let mut w = Tasks {
        running: HashMap::new(),
        ran: HashSet::new(),
        tx,
        interval: cfg.interval,
    };
    let mut unsent: Vec<TaskResult> = Vec::new();
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
                datastores: cfg
                    .datastores
                    .iter()
                    .filter(|d| d.is_dir())
                    .map(|d| d.display().to_string())
                    .collect(),
                running: w.progress(),
            };
            match client.post::<_, Orders>(&format!("{AGENT}/heartbeat"), &hb) {
                Ok(o) => {
                    failures = 0;
                    w.apply(o);
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
    Ok(())
}

/// The tasks of this proxy.
struct Tasks {
    running: HashMap<u64, Running>,
    /// (task, attempt) already started here: a repeated order is ignored.
    ran: HashSet<(u64, u32)>,
    tx: Sender<TaskResult>,
    interval: Duration,
}

impl Tasks {
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
        for id in o.cancel {
            if let Some(r) = self.running.get(&id) {
                tracing::info!("task {id}: cancelled by the server");
                r.cancel.store(true, Ordering::Relaxed);
            }
        }
        for t in o.assign {
            if self.running.contains_key(&t.task) || !self.ran.insert((t.task, t.attempt)) {
                continue;
            }
            if self.ran.len() > 100_000 {
                self.ran.clear();
            }
            let r = Running {
                attempt: t.attempt,
                done: Arc::new(AtomicU64::new(0)),
                total: Arc::new(AtomicU64::new(0)),
                cancel: Arc::new(AtomicBool::new(false)),
            };
            let (done, total, cancel, tx) = (
                r.done.clone(),
                r.total.clone(),
                r.cancel.clone(),
                self.tx.clone(),
            );
            self.running.insert(t.task, r);
            tracing::info!(
                "task {} ({}, attempt {}): starting",
                t.task,
                t.disk,
                t.attempt
            );
            std::thread::spawn(move || {
                let res = run_task(&t, done, total, cancel);
                let _ = tx.send(res);
            });
        }
    }
}

/// Open the repository at `path`, creating it when the directory is new
/// or empty. Several tasks (on this proxy or others) may do this at the
/// same moment: the loser of the race waits for the winner's config.
fn open_or_init(path: &Path) -> datamover::Result<Repository> {
    static INIT: Mutex<()> = Mutex::new(());
    let _g = INIT.lock().unwrap_or_else(|p| p.into_inner());
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut tried_init = false;
    loop {
        match Repository::open(path) {
            Err(datamover::Error::NotARepository { .. }) if !tried_init => {
                tried_init = true;
                if let Ok(r) = Repository::init(path) {
                    tracing::info!("created repository {}", path.display());
                    return Ok(r);
                }
            }
            Err(datamover::Error::NotARepository { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100));
            }
            r => return r,
        }
    }
}

/// Run one task to its end; never panics, always yields a result.
pub fn run_task(
    t: &TaskOrder,
    done: Arc<AtomicU64>,
    total: Arc<AtomicU64>,
    cancel: Arc<AtomicBool>,
) -> TaskResult {
    let mut res = TaskResult {
        task: t.task,
        attempt: t.attempt,
        point: None,
        mode: None,
        bottleneck: None,
        bytes_read: 0,
        bytes_stored: 0,
        total: 0,
        error: None,
        permanent: false,
    };
    let out = (|| -> datamover::Result<transports::BackupRun> {
        let disk: DiskName = t.disk.parse()?;
        let repo = open_or_init(Path::new(&t.repository))?;
        let src = transports::SourceOptions {
            disk: t.vm_disk.clone(),
            transport: t.transport.parse()?,
            failover_to_network: t.failover_to_network,
            ..Default::default()
        };
        let progress: datamover::ProgressFn = Arc::new(move |d, n| {
            done.store(d, Ordering::Relaxed);
            total.store(n, Ordering::Relaxed);
            !cancel.load(Ordering::Relaxed)
        });
        let opts = BackupOptions {
            progress: Some(progress),
            full_if_needed: true,
            ..Default::default()
        };
        transports::backup(&repo, &t.source, &disk, &src, &opts)
    })();
    match out {
        Ok(run) => {
            let r = &run.report;
            tracing::info!("task {}: point {} ({})", t.task, r.point, r.meta.transport);
            res.point = Some(r.point.to_string());
            res.mode = Some(r.meta.transport.clone());
            res.bottleneck = Some(r.stats.bottleneck().to_string());
            res.bytes_read = r.stats.bytes_read;
            res.bytes_stored = r.stats.bytes_stored;
            res.total = r.stats.bytes_total;
        }
        Err(e) => {
            tracing::warn!("task {}: {e}", t.task);
            res.permanent = matches!(e.kind(), ErrorKind::InvalidInput | ErrorKind::Unsupported);
            res.error = Some(e.to_string());
        }
    }
    res
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
