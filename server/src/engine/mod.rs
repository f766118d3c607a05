//! The server's logic, behind the HTTP layer: inventory, enrollment, jobs
//! and sessions, and the task life cycle.
//!
//! ```text
//!            run job                 placement            heartbeat
//! session ──────────► task: queued ───────────► assigned ──────────► running
//!                        ▲   ▲                                         │ result
//!   proxy dead / lost ───┘   └── failed, retries left (after a delay) ─┤
//!                                                          success / failed
//! ```
//!
//! Every state change is one SQLite transaction. Proxy liveness is kept in
//! memory (a monotonic clock); a proxy silent for `dead_after` is declared
//! dead and its tasks are re-queued (not counted as failures). A result
//! is accepted only from the proxy holding the task's current attempt, so
//! a proxy that comes back from the dead cannot overwrite a task that
//! moved on.
//!
//! The engine is split by concept: [`inventory`] (tokens, hosts,
//! proxies, repositories), [`jobs`] (jobs and sessions), [`agent`] (the
//! proxies' side), [`placement`], [`tick`] and the shared [`lifecycle`]
//! steps; [`error`] holds [`EngineError`].

pub mod access;
mod agent;
pub mod clock;
pub mod error;
mod files;
pub(crate) mod inventory;
mod jobs;
mod lifecycle;
mod operations;
mod placement;
mod recoveries;
#[cfg(test)]
mod tests;
mod tick;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::ca::Ca;
use datamover_control::api::{
    self, Attempt, EnrollRequest, Enrolled, Heartbeat, Host, HostAdded, Job, JobDisk, JobKind,
    JobSpec, NewHost, Orders, Proxy, ProxyPatch, ProxyState, Session, TaskOrder, TaskResult,
};
use datamover_control::pki::{self, EnrollmentToken, Identity};
use rusqlite::Connection;

use crate::catalog::{
    self,
    ids::{HostId, JobId, ProxyId, SessionId, TaskId},
};
use crate::scheduler::{self, Location, Mode, ModeSet, Pending, Slot};

pub use clock::{Clock, ManualClock, SystemClock};
pub use error::{EngineError, ErrorKind, R};
pub(crate) use lifecycle::requeue_proxy_tasks;
use lifecycle::*;

/// Timing of the task life cycle.
#[derive(Debug, Clone)]
pub struct Timing {
    /// Heartbeat interval told to proxies.
    pub heartbeat: Duration,
    /// Silence after which a proxy is declared dead.
    pub dead_after: Duration,
    /// Delay before a failed task is retried.
    pub retry_delay: Duration,
    /// Lifetime of an enrollment token.
    pub enroll_ttl: Duration,
    /// Lifetime of a host's certificate (renewed by the host when a third
    /// of it is left).
    pub host_cert: Duration,
}

impl Timing {
    /// The heartbeat (and installer poll) interval told to hosts, in ms.
    pub fn heartbeat_ms(&self) -> u64 {
        u64::try_from(self.heartbeat.as_millis()).unwrap_or(u64::MAX)
    }
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            heartbeat: Duration::from_secs(2),
            dead_after: Duration::from_secs(20),
            retry_delay: Duration::from_secs(30),
            enroll_ttl: Duration::from_secs(24 * 3600),
            host_cert: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

/// Names of hosts, jobs, repositories: 1–64 of `[A-Za-z0-9._-]`, not
/// starting with `.` or `-`.
pub fn check_name(what: &str, n: &str) -> R<()> {
    let ok = !n.is_empty()
        && n.len() <= 64
        && !n.starts_with(['.', '-'])
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(EngineError::bad(format!(
            "{what} name {n:?} is not valid: use 1-64 letters, digits, '.', '_' or '-', not starting with '.' or '-'"
        )))
    }
}

/// Name of the server's own host and proxy.
pub const BUILTIN: &str = "builtin";

/// One slot-occupancy interval of a task on a proxy (for timelines).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Occupancy {
    /// Task id.
    pub task: u64,
    /// Proxy name.
    pub proxy: String,
    /// Attempt.
    pub attempt: u32,
    /// Unix seconds when the task was placed on the proxy.
    pub started: f64,
    /// Unix seconds when it left it (done, failed, lost); none while on it.
    pub ended: Option<f64>,
}

/// The engine.
pub struct Engine {
    db: Mutex<Connection>,
    ca: Ca,
    timing: Timing,
    pub(crate) clock: Arc<dyn Clock>,
    /// The clock's monotonic reading when the engine started.
    started: Duration,
    seen: Mutex<HashMap<ProxyId, Duration>>,
    pub(crate) packages: crate::deploy::Packages,
    /// The names and addresses in the server's own certificate: no host
    /// may have one.
    server_names: Mutex<Vec<String>>,
    /// Tokens and certificates, read from the catalog after each change.
    access: std::sync::RwLock<Option<access::Access>>,
    /// Where archives of file requests are kept (none: refused).
    files_dir: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("timing", &self.timing)
            .finish()
    }
}

impl Engine {
    /// An engine over an open catalog.
    pub fn new(db: Connection, ca: Ca, timing: Timing) -> Engine {
        Engine {
            db: Mutex::new(db),
            ca,
            timing,
            clock: Arc::new(SystemClock::default()),
            started: Duration::ZERO,
            seen: Mutex::new(HashMap::new()),
            packages: crate::deploy::Packages::default(),
            server_names: Mutex::new(Vec::new()),
            access: std::sync::RwLock::new(None),
            files_dir: None,
        }
    }

    /// Keep the archives of file requests in `dir` (made if missing).
    pub fn with_files_dir(mut self, dir: std::path::PathBuf) -> Engine {
        self.files_dir = Some(dir);
        self
    }

    /// Read time from `clock` (tests move it by hand).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Engine {
        self.started = clock.monotonic();
        self.clock = clock;
        self
    }

    /// Hand out `path` as the proxy component's package to installers
    /// (its SHA-256 is taken again whenever the file changes).
    pub fn with_proxy_package(mut self, path: std::path::PathBuf) -> Engine {
        self.packages = crate::deploy::Packages::new(Some(path));
        self
    }

    pub(crate) fn db(&self) -> MutexGuard<'_, Connection> {
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The names and addresses of the server's certificate: hosts may
    /// not be given them.
    pub fn set_server_names(&self, names: &[String]) {
        *self.server_names.lock().unwrap_or_else(|p| p.into_inner()) =
            names.iter().map(|n| n.to_ascii_lowercase()).collect();
    }

    pub(crate) fn server_names(&self) -> Vec<String> {
        self.server_names
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The task life cycle's timing.
    pub fn timing(&self) -> &Timing {
        &self.timing
    }

    /// The CA.
    pub fn ca(&self) -> &Ca {
        &self.ca
    }
}
