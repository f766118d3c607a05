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

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use datamover_proxy::api::{
    self, Attempt, EnrollRequest, Enrolled, Heartbeat, Host, HostAdded, Job, JobDisk, JobKind,
    JobSpec, NewHost, Orders, Proxy, ProxyPatch, ProxyState, ServedRepository, Session, State,
    Task, TaskOrder, TaskResult,
};
use datamover_proxy::pki::{self, Ca, EnrollmentToken, Identity};
use rusqlite::{Connection, OptionalExtension, params};

use crate::scheduler::{self, Location, Mode, Pending, Slot};

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
        }
    }
}

/// An error to show an API client, with its HTTP status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// What went wrong.
    pub message: String,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.status)
    }
}

impl ApiError {
    fn of(status: u16, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }
    /// 400.
    pub fn bad(m: impl Into<String>) -> Self {
        Self::of(400, m)
    }
    /// 401.
    pub fn unauthorized(m: impl Into<String>) -> Self {
        Self::of(401, m)
    }
    /// 403.
    pub fn forbidden(m: impl Into<String>) -> Self {
        Self::of(403, m)
    }
    /// 404.
    pub fn not_found(what: &str, name: impl std::fmt::Display) -> Self {
        Self::of(404, format!("no {what} named {name}"))
    }
    /// 409.
    pub fn conflict(m: impl Into<String>) -> Self {
        Self::of(409, m)
    }
    /// 500.
    pub fn internal(m: impl std::fmt::Display) -> Self {
        Self::of(500, m.to_string())
    }
    /// 503.
    pub fn unavailable(m: impl Into<String>) -> Self {
        Self::of(503, m)
    }
}

impl From<rusqlite::Error> for ApiError {
    fn from(e: rusqlite::Error) -> Self {
        if let rusqlite::Error::SqliteFailure(f, _) = &e
            && f.code == rusqlite::ErrorCode::ConstraintViolation
        {
            return ApiError::conflict(format!("already exists ({e})"));
        }
        ApiError::internal(format!("catalog: {e}"))
    }
}

impl From<serde_json::Error> for ApiError {
    fn from(e: serde_json::Error) -> Self {
        ApiError::internal(format!("catalog JSON: {e}"))
    }
}

pub(crate) type R<T> = Result<T, ApiError>;

pub(crate) fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn unix_secs() -> f64 {
    now_ms() as f64 / 1000.0
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
        Err(ApiError::bad(format!(
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
    started: Instant,
    seen: Mutex<HashMap<i64, Instant>>,
    pub(crate) packages: crate::deploy::Packages,
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
            started: Instant::now(),
            seen: Mutex::new(HashMap::new()),
            packages: crate::deploy::Packages::default(),
        }
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

    /// The task life cycle's timing.
    pub fn timing(&self) -> &Timing {
        &self.timing
    }

    /// The CA.
    pub fn ca(&self) -> &Ca {
        &self.ca
    }

    // ---- authentication ----

    /// Create the first API token (`admin`) if there is none; returns it
    /// when created.
    pub fn bootstrap_token(&self) -> R<Option<String>> {
        let db = self.db();
        let n: i64 = db.query_row("SELECT count(*) FROM api_tokens", [], |r| r.get(0))?;
        if n > 0 {
            return Ok(None);
        }
        let t = format!("dmt1.{}", pki::random_hex(24).map_err(ApiError::internal)?);
        db.execute(
            "INSERT INTO api_tokens(name, hash, created) VALUES ('admin', ?1, ?2)",
            params![pki::fingerprint(t.as_bytes()), now()],
        )?;
        Ok(Some(t))
    }

    /// Check a bearer token.
    pub fn check_token(&self, token: &str) -> R<()> {
        let found: Option<i64> = self
            .db()
            .query_row(
                "SELECT id FROM api_tokens WHERE hash = ?1",
                [pki::fingerprint(token.as_bytes())],
                |r| r.get(0),
            )
            .optional()?;
        found
            .map(|_| ())
            .ok_or_else(|| ApiError::unauthorized("the API token is not valid"))
    }

    /// The host a client certificate was issued to (by fingerprint).
    pub fn host_of_cert(&self, fingerprint: &str) -> R<(i64, String)> {
        self.db()
            .query_row(
                "SELECT id, name FROM hosts WHERE cert_fingerprint = ?1",
                [fingerprint],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?
            .ok_or_else(|| {
                ApiError::unauthorized(
                    "this certificate belongs to no host of this server (removed, or from another installation)",
                )
            })
    }

    // ---- hosts and enrollment ----

    /// Add a managed host; returns its one-time enrollment token.
    pub fn add_host(&self, h: &NewHost) -> R<HostAdded> {
        check_name("host", &h.name)?;
        if h.name == BUILTIN {
            return Err(ApiError::bad(
                "the name 'builtin' is the server's own proxy",
            ));
        }
        for a in &h.addresses {
            if a.is_empty()
                || a.len() > 253
                || a.contains(['/', ' ', ':']) && a.parse::<std::net::IpAddr>().is_err()
            {
                return Err(ApiError::bad(format!(
                    "address {a:?} is not a host name or IP address"
                )));
            }
        }
        let secret = pki::random_hex(24).map_err(ApiError::internal)?;
        let expires = chrono::Utc::now()
            + chrono::Duration::from_std(self.timing.enroll_ttl).unwrap_or_default();
        let expires = expires.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let created = now();
        let roles = crate::deploy::normal_roles(&h.roles);
        self.db()
            .execute(
                "INSERT INTO hosts(name, addresses, enroll_hash, enroll_expires, created, roles) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    h.name,
                    serde_json::to_string(&h.addresses)?,
                    pki::fingerprint(secret.as_bytes()),
                    expires,
                    created,
                    serde_json::to_string(&roles)?
                ],
            )
            .map_err(|e| match ApiError::from(e) {
                e if e.status == 409 => ApiError::conflict(format!("a host named {} exists", h.name)),
                e => e,
            })?;
        let token = EnrollmentToken {
            secret,
            ca_fingerprint: self.ca.fingerprint(),
        };
        Ok(HostAdded {
            host: Host {
                name: h.name.clone(),
                addresses: h.addresses.clone(),
                enrolled: false,
                created,
                roles,
                installer: None,
            },
            enrollment_token: token.to_string(),
            expires,
        })
    }

    /// Every host.
    pub fn hosts(&self) -> R<Vec<Host>> {
        let db = self.db();
        let mut st = db.prepare(&format!(
            "SELECT {} FROM hosts WHERE builtin = 0 ORDER BY name",
            crate::deploy::HOST_COLUMNS
        ))?;
        let rows = st.query_map([], crate::deploy::host_row)?;
        rows.map(|r| r?.into_host()).collect()
    }

    /// Remove a host: its certificate stops working at once and its
    /// proxy's tasks are re-queued.
    pub fn remove_host(&self, name: &str) -> R<()> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let id = Self::host_id(&tx, name)?;
        let proxy = Self::proxy_id(&tx, id)?;
        if let Some(p) = proxy {
            requeue_proxy_tasks(&tx, p, &format!("host {name} was removed"))?;
        }
        tx.execute("DELETE FROM hosts WHERE id = ?1", [id])?;
        tx.commit()?;
        Ok(())
    }

    /// A host enrolls with its one-time secret and CSR.
    pub fn enroll(&self, req: &EnrollRequest) -> R<Enrolled> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let row: Option<(i64, String, String, String)> = tx
            .query_row(
                "SELECT id, name, addresses, enroll_expires FROM hosts WHERE enroll_hash = ?1",
                [pki::fingerprint(req.secret.as_bytes())],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()?;
        let Some((id, name, addrs, expires)) = row else {
            return Err(ApiError::unauthorized(
                "the enrollment token is not valid (already used, or the host was removed)",
            ));
        };
        let exp = chrono::DateTime::parse_from_rfc3339(&expires).map_err(ApiError::internal)?;
        if exp < chrono::Utc::now() {
            return Err(ApiError::unauthorized(format!(
                "the enrollment token of host {name} expired at {expires}; add the host again"
            )));
        }
        let addresses: Vec<String> = serde_json::from_str(&addrs)?;
        let mut names = addresses.clone();
        names.push(name.clone());
        let cert = self
            .ca
            .sign_csr(&req.csr, &name, &names)
            .map_err(|e| ApiError::bad(e.to_string()))?;
        let fp = pki::fingerprint(&pki::cert_der_from_pem(&cert).map_err(ApiError::internal)?);
        tx.execute(
            "UPDATE hosts SET cert_fingerprint = ?1, enroll_hash = NULL, enroll_expires = NULL WHERE id = ?2",
            params![fp, id],
        )?;
        tx.commit()?;
        tracing::info!("host {name} enrolled");
        Ok(Enrolled {
            host: name,
            cert,
            ca: self.ca.cert_pem().to_string(),
        })
    }

    /// The identity of the server's built-in proxy (issued afresh at each
    /// start; the old one stops working).
    pub fn builtin_identity(&self, names: &[String]) -> R<Identity> {
        let id = self.ca.issue(BUILTIN, names).map_err(ApiError::internal)?;
        let fp = id.fingerprint().map_err(ApiError::internal)?;
        let db = self.db();
        db.execute(
            "INSERT INTO hosts(name, builtin, created) VALUES (?1, 1, ?2) ON CONFLICT(name) DO NOTHING",
            params![BUILTIN, now()],
        )?;
        db.execute(
            "UPDATE hosts SET cert_fingerprint = ?1 WHERE name = ?2",
            params![fp, BUILTIN],
        )?;
        Ok(id)
    }

    // ---- proxies ----

    /// Every proxy.
    pub fn proxies(&self) -> R<Vec<Proxy>> {
        let db = self.db();
        let running = running_counts(&db)?;
        let mut st = db.prepare(
            "SELECT p.id, h.name, p.slots, p.cores, p.modes, p.site, p.disabled, p.state, p.datastores, p.version, p.last_seen
             FROM proxies p JOIN hosts h ON h.id = p.host_id ORDER BY h.builtin, h.name",
        )?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Option<u32>>(2)?,
                r.get::<_, u32>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, Option<String>>(5)?,
                r.get::<_, bool>(6)?,
                r.get::<_, String>(7)?,
                r.get::<_, String>(8)?,
                r.get::<_, String>(9)?,
                r.get::<_, Option<String>>(10)?,
            ))
        })?;
        rows.map(|r| {
            let (id, name, slots, cores, modes, site, disabled, state, ds, version, last_seen) = r?;
            Ok(Proxy {
                name,
                slots: effective_slots(slots, cores),
                modes: serde_json::from_str(&modes)?,
                site,
                state: if disabled {
                    ProxyState::Disabled
                } else if state == "dead" {
                    ProxyState::Dead
                } else {
                    ProxyState::Online
                },
                running: running.get(&id).copied().unwrap_or(0),
                datastores: serde_json::from_str(&ds)?,
                version,
                last_seen,
            })
        })
        .collect()
    }

    /// Change a proxy's settings.
    pub fn patch_proxy(&self, name: &str, p: &ProxyPatch) -> R<Proxy> {
        {
            let db = self.db();
            let id: i64 = db
                .query_row(
                    "SELECT p.id FROM proxies p JOIN hosts h ON h.id = p.host_id WHERE h.name = ?1",
                    [name],
                    |r| r.get(0),
                )
                .optional()?
                .ok_or_else(|| ApiError::not_found("proxy", name))?;
            if let Some(s) = p.slots {
                if !(1..=1024).contains(&s) {
                    return Err(ApiError::bad(format!("slots must be 1-1024, not {s}")));
                }
                db.execute(
                    "UPDATE proxies SET slots = ?1 WHERE id = ?2",
                    params![s, id],
                )?;
            }
            if let Some(m) = &p.modes {
                scheduler::mode_set(m).map_err(ApiError::bad)?;
                db.execute(
                    "UPDATE proxies SET modes = ?1 WHERE id = ?2",
                    params![serde_json::to_string(m)?, id],
                )?;
            }
            if let Some(s) = &p.site {
                db.execute("UPDATE proxies SET site = ?1 WHERE id = ?2", params![s, id])?;
            }
            if let Some(d) = p.disabled {
                db.execute(
                    "UPDATE proxies SET disabled = ?1 WHERE id = ?2",
                    params![d, id],
                )?;
            }
        }
        self.proxies()?
            .into_iter()
            .find(|x| x.name == name)
            .ok_or_else(|| ApiError::not_found("proxy", name))
    }

    // ---- repositories ----

    /// Add a repository.
    pub fn add_repository(&self, r: &api::Repository) -> R<api::Repository> {
        check_name("repository", &r.name)?;
        if !r.path.starts_with('/') {
            return Err(ApiError::bad(format!(
                "repository path {:?} must be absolute",
                r.path
            )));
        }
        let db = self.db();
        if let Some(p) = &r.proxy {
            let builtin: Option<bool> = db
                .query_row("SELECT builtin FROM hosts WHERE name = ?1", [p], |x| {
                    x.get(0)
                })
                .optional()?;
            match builtin {
                None => return Err(ApiError::bad(format!("no host or proxy named {p}"))),
                Some(true) => {
                    return Err(ApiError::bad(
                        "the built-in proxy runs no repository service; add the repository without a proxy (a path the server sees)",
                    ));
                }
                Some(false) => {}
            }
        }
        db.execute(
            "INSERT INTO repositories(name, path, proxy) VALUES (?1, ?2, ?3)",
            params![r.name, r.path, r.proxy],
        )
        .map_err(|e| match ApiError::from(e) {
            e if e.status == 409 => {
                ApiError::conflict(format!("a repository named {} exists", r.name))
            }
            e => e,
        })?;
        Ok(r.clone())
    }

    /// Every repository.
    pub fn repositories(&self) -> R<Vec<api::Repository>> {
        let db = self.db();
        let mut st = db.prepare("SELECT name, path, proxy FROM repositories ORDER BY name")?;
        let rows = st.query_map([], |r| {
            Ok(api::Repository {
                name: r.get(0)?,
                path: r.get(1)?,
                proxy: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    // ---- jobs ----

    /// Create a job.
    pub fn create_job(&self, j: &JobSpec) -> R<Job> {
        check_name("job", &j.name)?;
        if j.disks.is_empty() {
            return Err(ApiError::bad("a job needs at least one disk"));
        }
        let mut seen = std::collections::HashSet::new();
        for d in &j.disks {
            d.name
                .parse::<datamover::DiskName>()
                .map_err(|e| ApiError::bad(format!("disk name {:?}: {e}", d.name)))?;
            if !seen.insert(&d.name) {
                return Err(ApiError::bad(format!("disk {} is listed twice", d.name)));
            }
            if d.source.trim().is_empty() {
                return Err(ApiError::bad(format!("disk {} has no source", d.name)));
            }
            if j.kind == JobKind::Restore {
                if is_vm(&d.source) || !(d.source.starts_with("nbd") || d.source.starts_with('/')) {
                    return Err(ApiError::bad(format!(
                        "disk {}: a restore writes to an absolute path or an nbd:// export, not {:?}",
                        d.name, d.source
                    )));
                }
                continue;
            }
            if d.point.is_some() {
                return Err(ApiError::bad(format!(
                    "disk {}: \"point\" is for restore jobs",
                    d.name
                )));
            }
            let vm = is_vm(&d.source);
            if vm && d.disk.is_none() {
                return Err(ApiError::bad(format!(
                    "disk {}: its source is a VM; name the VM disk with \"disk\"",
                    d.name
                )));
            }
            if !vm && !d.source.starts_with("nbd") && !d.source.starts_with('/') {
                return Err(ApiError::bad(format!(
                    "disk {}: source {:?} must be an absolute path, an nbd:// address or a VM (qmp+unix:// or qmp://)",
                    d.name, d.source
                )));
            }
        }
        if j.transport != "auto" {
            Mode::parse(&j.transport).ok_or_else(|| {
                ApiError::bad(format!(
                    "transport {:?}: use auto, san, hotadd, nbd or storage-snapshot",
                    j.transport
                ))
            })?;
        }
        if j.retries > 10 {
            return Err(ApiError::bad("retries must be 0-10"));
        }
        if j.every_minutes == Some(0) {
            return Err(ApiError::bad("every_minutes must be at least 1"));
        }
        let db = self.db();
        let repo: Option<Option<String>> = db
            .query_row(
                "SELECT proxy FROM repositories WHERE name = ?1",
                [&j.repository],
                |r| r.get(0),
            )
            .optional()?;
        match repo {
            None => {
                return Err(ApiError::bad(format!(
                    "no repository named {}",
                    j.repository
                )));
            }
            Some(None) if j.kind.replicates() => {
                return Err(ApiError::bad(format!(
                    "a {} job needs a repository held by its target proxy (dm repo add NAME --path DIR --proxy TARGET); {} is shared storage",
                    j.kind.as_str(),
                    j.repository
                )));
            }
            Some(_) => {}
        }
        for p in &j.proxies {
            let found: Option<i64> = db
                .query_row("SELECT id FROM hosts WHERE name = ?1", [p], |r| r.get(0))
                .optional()?;
            if found.is_none() {
                return Err(ApiError::bad(format!("no host or proxy named {p}")));
            }
        }
        let next = j.every_minutes.map(|m| now_ms() + i64::from(m) * 60_000);
        db.execute(
            "INSERT INTO jobs(name, spec, next_run) VALUES (?1, ?2, ?3)",
            params![
                j.name,
                serde_json::to_string(j)?,
                next.map(|n| n.to_string())
            ],
        )
        .map_err(|e| match ApiError::from(e) {
            e if e.status == 409 => ApiError::conflict(format!("a job named {} exists", j.name)),
            e => e,
        })?;
        Ok(Job {
            spec: j.clone(),
            last_run: None,
            last_session: None,
        })
    }

    /// Every job.
    pub fn jobs(&self) -> R<Vec<Job>> {
        let db = self.db();
        let mut st = db.prepare(
            "SELECT j.spec, j.last_run, (SELECT max(id) FROM sessions s WHERE s.job_id = j.id) FROM jobs j ORDER BY j.name",
        )?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Option<String>>(1)?,
                r.get::<_, Option<u64>>(2)?,
            ))
        })?;
        rows.map(|r| {
            let (spec, last_run, last_session) = r?;
            Ok(Job {
                spec: serde_json::from_str(&spec)?,
                last_run,
                last_session,
            })
        })
        .collect()
    }

    /// One job.
    pub fn job(&self, name: &str) -> R<Job> {
        self.jobs()?
            .into_iter()
            .find(|j| j.spec.name == name)
            .ok_or_else(|| ApiError::not_found("job", name))
    }

    /// Delete a job (and its sessions' records); refused while it runs.
    pub fn delete_job(&self, name: &str) -> R<()> {
        let db = self.db();
        let (id, _) = job_row(&db, name)?;
        if let Some(s) = running_session(&db, id)? {
            return Err(ApiError::conflict(format!(
                "job {name} is running (session {s}); wait for it to end"
            )));
        }
        db.execute("DELETE FROM jobs WHERE id = ?1", [id])?;
        Ok(())
    }

    /// Start a run of a job: one task per disk, placed at once where slots
    /// are free.
    pub fn run_job(&self, name: &str) -> R<Session> {
        let sid = {
            let mut db = self.db();
            let tx = db.transaction()?;
            let (id, spec) = job_row(&tx, name)?;
            if let Some(s) = running_session(&tx, id)? {
                return Err(ApiError::conflict(format!(
                    "job {name} is already running (session {s})"
                )));
            }
            let created = now();
            tx.execute(
                "INSERT INTO sessions(job_id, kind, state, created) VALUES (?1, ?2, 'running', ?3)",
                params![id, spec.kind.as_str(), created],
            )?;
            let sid = tx.last_insert_rowid();
            for d in &spec.disks {
                tx.execute(
                    "INSERT INTO tasks(session_id, disk, spec, state) VALUES (?1, ?2, ?3, 'queued')",
                    params![sid, d.name, serde_json::to_string(d)?],
                )?;
            }
            let next = spec
                .every_minutes
                .map(|m| (now_ms() + i64::from(m) * 60_000).to_string());
            tx.execute(
                "UPDATE jobs SET last_run = ?1, next_run = ?2 WHERE id = ?3",
                params![created, next, id],
            )?;
            self.place(&tx)?;
            tx.commit()?;
            sid
        };
        self.session(sid as u64)
    }

    // ---- sessions ----

    /// Sessions, newest first (at most `limit`).
    pub fn sessions(&self, limit: u32) -> R<Vec<Session>> {
        let ids: Vec<u64> = {
            let db = self.db();
            let mut st = db.prepare("SELECT id FROM sessions ORDER BY id DESC LIMIT ?1")?;
            st.query_map([limit], |r| r.get(0))?
                .collect::<Result<_, _>>()?
        };
        ids.into_iter().map(|i| self.session(i)).collect()
    }

    /// One session with its tasks.
    pub fn session(&self, id: u64) -> R<Session> {
        let db = self.db();
        let (job, kind, state, created, finished): (String, String, String, String, Option<String>) = db
            .query_row(
                "SELECT j.name, s.kind, s.state, s.created, s.finished FROM sessions s JOIN jobs j ON j.id = s.job_id WHERE s.id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
            )
            .optional()?
            .ok_or_else(|| ApiError::not_found("session", id))?;
        let mut st = db.prepare(
            "SELECT id, disk, state, proxy_name, attempt, mode, done, total, bottleneck, point, bytes_read, bytes_stored, error, attempts, started, finished,
             wire_bytes, replica, waiting FROM tasks WHERE session_id = ?1 ORDER BY id",
        )?;
        let rows = st.query_map([id], |r| {
            Ok((
                Task {
                    id: r.get(0)?,
                    disk: r.get(1)?,
                    state: State::Queued,
                    proxy: r.get(3)?,
                    attempt: r.get(4)?,
                    mode: r.get(5)?,
                    done: r.get(6)?,
                    total: r.get(7)?,
                    bottleneck: r.get(8)?,
                    point: r.get(9)?,
                    bytes_read: r.get(10)?,
                    bytes_stored: r.get(11)?,
                    wire_bytes: r.get(16)?,
                    replica: r.get(17)?,
                    waiting: r.get(18)?,
                    error: r.get(12)?,
                    attempts: Vec::new(),
                    started: r.get(14)?,
                    finished: r.get(15)?,
                },
                r.get::<_, String>(2)?,
                r.get::<_, String>(13)?,
            ))
        })?;
        let tasks = rows
            .map(|r| {
                let (mut t, state, attempts) = r?;
                t.state = state.parse().map_err(ApiError::internal)?;
                t.attempts = serde_json::from_str(&attempts)?;
                Ok(t)
            })
            .collect::<R<Vec<_>>>()?;
        Ok(Session {
            id,
            job,
            kind: kind_of(&kind)?,
            state: state.parse().map_err(ApiError::internal)?,
            created,
            finished,
            tasks,
        })
    }

    /// When each task held a slot on which proxy.
    pub fn timeline(&self, session: u64) -> R<Vec<Occupancy>> {
        let db = self.db();
        let mut st = db.prepare(
            "SELECT l.task_id, l.proxy, l.attempt, l.started, l.ended FROM task_log l JOIN tasks t ON t.id = l.task_id
             WHERE t.session_id = ?1 ORDER BY l.started",
        )?;
        let rows = st.query_map([session], |r| {
            Ok(Occupancy {
                task: r.get(0)?,
                proxy: r.get(1)?,
                attempt: r.get(2)?,
                started: r.get(3)?,
                ended: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    // ---- agent side ----

    /// The id of managed host `name` (not the built-in one).
    pub(crate) fn host_id(db: &Connection, name: &str) -> R<i64> {
        db.query_row(
            "SELECT id FROM hosts WHERE name = ?1 AND builtin = 0",
            [name],
            |r| r.get(0),
        )
        .optional()?
        .ok_or_else(|| ApiError::not_found("host", name))
    }

    /// The proxy of host `host`, once it has heartbeated.
    pub(crate) fn proxy_id(db: &Connection, host: i64) -> R<Option<i64>> {
        Ok(db
            .query_row("SELECT id FROM proxies WHERE host_id = ?1", [host], |r| {
                r.get(0)
            })
            .optional()?)
    }

    /// A heartbeat from the proxy on `host`: registers it on first
    /// contact, records progress, places work, and answers with its orders.
    pub fn heartbeat(&self, host: i64, hb: &Heartbeat) -> R<Orders> {
        let mut db = self.db();
        let tx = db.transaction()?;
        crate::deploy::may_run_proxy(&tx, host)?;
        tx.execute(
            "INSERT INTO proxies(host_id, cores) VALUES (?1, ?2) ON CONFLICT(host_id) DO NOTHING",
            params![host, hb.cores.max(1)],
        )?;
        let pid = Self::proxy_id(&tx, host)?.ok_or_else(|| ApiError::internal("proxy row"))?;
        let was: String = tx.query_row("SELECT state FROM proxies WHERE id = ?1", [pid], |r| {
            r.get(0)
        })?;
        tx.execute(
            "UPDATE proxies SET cores = ?1, datastores = ?2, version = ?3, last_seen = ?4, state = 'online', service_port = ?6,
             serving = ?7 WHERE id = ?5",
            params![hb.cores.max(1), serde_json::to_string(&hb.datastores)?, hb.version, now(), pid, hb.service_port,
                    serde_json::to_string(&hb.serving)?],
        )?;
        if was == "dead" {
            tracing::info!("proxy {pid} is back");
        }
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(pid, Instant::now());
        let mut cancel = Vec::new();
        let reported: std::collections::HashSet<u64> = hb.running.iter().map(|t| t.task).collect();
        for t in &hb.running {
            let n = tx.execute(
                "UPDATE tasks SET state = 'running', done = ?1, total = ?2
                 WHERE id = ?3 AND proxy_id = ?4 AND attempt = ?5 AND state IN ('assigned', 'running')",
                params![t.done, t.total, t.task, pid, t.attempt],
            )?;
            if n == 0 {
                cancel.push(t.task);
            }
        }
        // Running here by our books but not reported: the proxy lost it
        // (restarted). Results are sent before heartbeats, so a finished
        // task is never mistaken for a lost one.
        let lost: Vec<u64> = {
            let mut st =
                tx.prepare("SELECT id FROM tasks WHERE proxy_id = ?1 AND state = 'running'")?;
            st.query_map([pid], |r| r.get::<_, u64>(0))?
                .collect::<Result<Vec<_>, _>>()?
                .into_iter()
                .filter(|id| !reported.contains(id))
                .collect()
        };
        for id in lost {
            requeue(&tx, id, "the proxy no longer runs it (restarted?)")?;
        }
        self.place(&tx)?;
        let orders = self.orders(&tx, pid, cancel)?;
        tx.commit()?;
        Ok(orders)
    }

    /// The result of a task from the proxy on `host`.
    pub fn task_result(&self, host: i64, r: &TaskResult) -> R<Orders> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let pid = Self::proxy_id(&tx, host)?
            .ok_or_else(|| ApiError::conflict("this host is not a registered proxy"))?;
        let row: Option<(i64, u32, String, String)> = tx
            .query_row(
                "SELECT t.session_id, t.failures, j.spec, t.attempts FROM tasks t
                 JOIN sessions s ON s.id = t.session_id JOIN jobs j ON j.id = s.job_id
                 WHERE t.id = ?1 AND t.proxy_id = ?2 AND t.attempt = ?3 AND t.state IN ('assigned', 'running')",
                params![r.task, pid, r.attempt],
                |x| Ok((x.get(0)?, x.get(1)?, x.get(2)?, x.get(3)?)),
            )
            .optional()?;
        let Some((sid, failures, spec, attempts)) = row else {
            return Err(ApiError::conflict(format!(
                "task {} attempt {} is not this proxy's any more (it was re-queued or is finished)",
                r.task, r.attempt
            )));
        };
        let spec: JobSpec = serde_json::from_str(&spec)?;
        close_log(&tx, r.task)?;
        match &r.error {
            None => {
                tx.execute(
                    "UPDATE tasks SET state = 'success', point = ?1, mode = ?2, bottleneck = ?3, bytes_read = ?4,
                     bytes_stored = ?5, total = ?6, done = ?6, error = NULL, finished = ?7, wire_bytes = ?9, replica = ?10 WHERE id = ?8",
                    params![r.point, r.mode, r.bottleneck, r.bytes_read, r.bytes_stored, r.total, now(), r.task,
                            (r.wire_bytes > 0).then_some(r.wire_bytes), r.replica],
                )?;
            }
            Some(err) => {
                let mut att: Vec<Attempt> = serde_json::from_str(&attempts)?;
                let proxy_name: Option<String> = tx.query_row(
                    "SELECT proxy_name FROM tasks WHERE id = ?1",
                    [r.task],
                    |x| x.get(0),
                )?;
                att.push(Attempt {
                    attempt: r.attempt,
                    proxy: proxy_name,
                    reason: err.clone(),
                    at: now(),
                });
                let failures = failures + 1;
                if !r.permanent && failures <= spec.retries {
                    let at = now_ms() + self.timing.retry_delay.as_millis() as i64;
                    tx.execute(
                        "UPDATE tasks SET state = 'queued', proxy_id = NULL, proxy_name = NULL, attempt = attempt + 1, failures = ?1,
                         error = ?2, attempts = ?3, not_before = ?4, done = 0 WHERE id = ?5",
                        params![failures, err, serde_json::to_string(&att)?, at, r.task],
                    )?;
                } else {
                    tx.execute(
                        "UPDATE tasks SET state = 'failed', failures = ?1, error = ?2, attempts = ?3, finished = ?4 WHERE id = ?5",
                        params![failures, err, serde_json::to_string(&att)?, now(), r.task],
                    )?;
                }
            }
        }
        finish_session_if_done(&tx, sid)?;
        self.place(&tx)?;
        let orders = self.orders(&tx, pid, Vec::new())?;
        tx.commit()?;
        Ok(orders)
    }

    fn orders(&self, db: &Connection, pid: i64, cancel: Vec<u64>) -> R<Orders> {
        let mut st = db.prepare(
            "SELECT t.id, t.attempt, t.disk, t.spec, j.spec, r.path, r.proxy, ph.addresses, pp.service_port, t.proxy_name
             FROM tasks t
             JOIN sessions s ON s.id = t.session_id JOIN jobs j ON j.id = s.job_id
             LEFT JOIN repositories r ON r.name = json_extract(j.spec, '$.repository')
             LEFT JOIN hosts ph ON ph.name = r.proxy
             LEFT JOIN proxies pp ON pp.host_id = ph.id
             WHERE t.proxy_id = ?1 AND t.state = 'assigned' ORDER BY t.id",
        )?;
        let rows = st.query_map([pid], |r| {
            Ok((
                (
                    r.get::<_, u64>(0)?,
                    r.get::<_, u32>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, Option<String>>(5)?,
                ),
                (
                    r.get::<_, Option<String>>(6)?,
                    r.get::<_, Option<String>>(7)?,
                    r.get::<_, Option<u16>>(8)?,
                    r.get::<_, Option<String>>(9)?,
                ),
            ))
        })?;
        let mut assign = Vec::new();
        for row in rows {
            let ((task, attempt, disk, dspec, jspec, repo), (holder, addrs, port, me)) = row?;
            let d: JobDisk = serde_json::from_str(&dspec)?;
            let j: JobSpec = serde_json::from_str(&jspec)?;
            // A repository held by a proxy is written through its
            // repository service, except by that proxy itself (a backup
            // or copy, or a restore, which always runs there); replicas
            // are always updated by the service.
            let remote = holder.is_some()
                && (j.kind.replicates() || (j.kind != JobKind::Restore && holder != me));
            let (mut service, mut service_error) = (None, None);
            if let (true, Some(h)) = (remote, &holder) {
                let addrs: Vec<String> = serde_json::from_str(addrs.as_deref().unwrap_or("[]"))?;
                match (addrs.first(), port) {
                    (Some(a), Some(port)) => {
                        let host = if a.contains(':') {
                            format!("[{a}]")
                        } else {
                            a.clone()
                        };
                        service = Some(datamover_proxy::repo_service::ServiceAddress {
                            address: format!("{host}:{port}"),
                            server_name: a.clone(),
                            repository: j.repository.clone(),
                            replica: j.kind.replicates(),
                        });
                    }
                    (None, _) => {
                        service_error = Some(format!(
                            "repository {} is held by {h}, which has no address to reach it at (dm host add {h} --address …)",
                            j.repository
                        ));
                    }
                    (_, None) => {
                        service_error = Some(format!(
                            "repository {} is held by {h}, whose repository service is not running (dm-proxy run --repo-listen ADDR)",
                            j.repository
                        ));
                    }
                }
            }
            assign.push(TaskOrder {
                service,
                service_error,
                point: d.point.clone(),
                task,
                attempt,
                kind: j.kind,
                disk,
                source: d.source,
                vm_disk: d.disk,
                repository: repo.unwrap_or_default(),
                transport: j.transport,
                failover_to_network: j.failover_to_network,
            });
        }
        drop(st);
        // Sent once: from now on the proxy holds the task. If this answer
        // is lost, its next heartbeat does not report the task, and the
        // task is re-queued as lost.
        db.execute(
            "UPDATE tasks SET state = 'running' WHERE proxy_id = ?1 AND state = 'assigned'",
            [pid],
        )?;
        let serve = {
            let mut st = db.prepare(
                "SELECT r.name, r.path FROM repositories r JOIN hosts h ON h.name = r.proxy
                 JOIN proxies p ON p.host_id = h.id WHERE p.id = ?1 ORDER BY r.name",
            )?;
            let rows = st.query_map([pid], |r| {
                Ok(ServedRepository {
                    name: r.get(0)?,
                    path: r.get(1)?,
                })
            })?;
            rows.collect::<Result<Vec<_>, _>>()?
        };
        Ok(Orders {
            assign,
            cancel,
            interval_ms: self.timing.heartbeat_ms(),
            serve,
        })
    }

    /// Place queued tasks on proxies with free slots.
    fn place(&self, db: &Connection) -> R<()> {
        let running = running_counts(db)?;
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut st = db.prepare(
            "SELECT p.id, h.name, h.builtin, p.slots, p.cores, p.modes, p.datastores
             FROM proxies p JOIN hosts h ON h.id = p.host_id
             WHERE p.disabled = 0 AND p.state = 'online'",
        )?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, bool>(2)?,
                r.get::<_, Option<u32>>(3)?,
                r.get::<_, u32>(4)?,
                r.get::<_, String>(5)?,
                r.get::<_, String>(6)?,
            ))
        })?;
        let others: i64 = db.query_row(
            "SELECT count(*) FROM proxies p JOIN hosts h ON h.id = p.host_id WHERE h.builtin = 0 AND p.disabled = 0",
            [],
            |r| r.get(0),
        )?;
        let mut slots = Vec::new();
        for row in rows {
            let (id, name, builtin, s, cores, modes, ds) = row?;
            // The built-in proxy works only while no other proxy exists.
            if builtin && others > 0 {
                continue;
            }
            if !seen.contains_key(&id) {
                continue;
            }
            let modes: Vec<String> = serde_json::from_str(&modes)?;
            slots.push(Slot {
                id,
                host: name.clone(),
                name,
                slots: effective_slots(s, cores),
                running: running.get(&id).copied().unwrap_or(0),
                modes: scheduler::mode_set(&modes).unwrap_or(scheduler::ALL_MODES),
                datastores: serde_json::from_str(&ds)?,
            });
        }
        drop(st);
        if !slots.is_empty() && slots.iter().all(|s| s.running >= s.slots) {
            return Ok(());
        }
        let names: HashMap<String, i64> = slots.iter().map(|s| (s.name.clone(), s.id)).collect();
        let mut st = db.prepare(
            "SELECT t.id, t.spec, j.spec, r.proxy, t.waiting FROM tasks t JOIN sessions s ON s.id = t.session_id JOIN jobs j ON j.id = s.job_id
             LEFT JOIN repositories r ON r.name = json_extract(j.spec, '$.repository')
             LEFT JOIN hosts ph ON ph.name = r.proxy
             LEFT JOIN proxies pp ON pp.host_id = ph.id
             WHERE t.state = 'queued' AND t.not_before <= ?1
             -- A repository just given to a running service is offered at
             -- its next heartbeat: until then its tasks wait.
             AND NOT (pp.state = 'online' AND pp.service_port IS NOT NULL
                      AND NOT EXISTS (SELECT 1 FROM json_each(pp.serving) WHERE value = r.name))
             ORDER BY t.id",
        )?;
        let rows = st.query_map([now_ms()], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, Option<String>>(3)?,
                r.get::<_, Option<String>>(4)?,
            ))
        })?;
        let mut pending = Vec::new();
        let mut waiting: HashMap<i64, Option<String>> = HashMap::new();
        let mut jobs: HashMap<String, JobSpec> = HashMap::new();
        for row in rows {
            let (id, dspec, jspec, holder, why) = row?;
            waiting.insert(id, why);
            let d: JobDisk = serde_json::from_str(&dspec)?;
            if !jobs.contains_key(&jspec) {
                jobs.insert(jspec.clone(), serde_json::from_str(&jspec)?);
            }
            let Some(j) = jobs.get(&jspec) else { continue };
            // A restore from a repository a proxy holds runs on that proxy.
            let only: Vec<String> = match (&holder, j.kind) {
                (Some(h), JobKind::Restore) => vec![h.clone()],
                _ => j.proxies.clone(),
            };
            pending.push(Pending {
                id,
                location: location_of(&d),
                // A job's proxy list names proxies that may not be online:
                // an unknown id keeps the task queued rather than anywhere.
                proxies: only
                    .iter()
                    .map(|n| names.get(n).copied().unwrap_or(-1))
                    .collect(),
                pinned: Mode::parse(&j.transport),
                failover: j.failover_to_network,
            });
        }
        drop(st);
        let placed = scheduler::place(&pending, &mut slots);
        // With slots still free, a task left queued is one no proxy can
        // take: say why (once; placement clears it).
        if slots.is_empty() || slots.iter().any(|s| s.running < s.slots) {
            let done: std::collections::HashSet<i64> = placed.iter().map(|p| p.task).collect();
            for p in pending.iter().filter(|p| !done.contains(&p.id)) {
                let why = scheduler::why_unplaceable(p, &slots);
                if why.is_some() && waiting.get(&p.id) != Some(&why) {
                    db.execute(
                        "UPDATE tasks SET waiting = ?1 WHERE id = ?2",
                        params![why, p.id],
                    )?;
                }
            }
        }
        let t = unix_secs();
        for p in placed {
            let name = slots
                .iter()
                .find(|s| s.id == p.proxy)
                .map(|s| s.name.clone())
                .unwrap_or_default();
            let attempt: u32 = db.query_row(
                "UPDATE tasks SET state = 'assigned', proxy_id = ?1, proxy_name = ?2, mode = ?3, started = ?4, done = 0,
                 waiting = NULL WHERE id = ?5 RETURNING attempt",
                params![p.proxy, name, p.mode.as_str(), now(), p.task],
                |r| r.get(0),
            )?;
            db.execute(
                "INSERT INTO task_log(task_id, proxy, attempt, started) VALUES (?1, ?2, ?3, ?4)",
                params![p.task, name, attempt, t],
            )?;
        }
        Ok(())
    }

    /// Periodic work: declare silent proxies dead (re-queueing their
    /// tasks), start scheduled jobs, place queued tasks.
    pub fn tick(&self) -> R<()> {
        let dead: Vec<(i64, String)> = {
            let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let db = self.db();
            let mut st = db.prepare(
                "SELECT p.id, h.name FROM proxies p JOIN hosts h ON h.id = p.host_id WHERE p.state = 'online'",
            )?;
            let rows = st.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))?;
            let mut out = Vec::new();
            for r in rows {
                let (id, name) = r?;
                let last = seen.get(&id).copied().unwrap_or(self.started);
                if last.elapsed() > self.timing.dead_after {
                    out.push((id, name));
                }
            }
            out
        };
        for (id, name) in dead {
            let mut db = self.db();
            let tx = db.transaction()?;
            tx.execute("UPDATE proxies SET state = 'dead' WHERE id = ?1", [id])?;
            let n = requeue_proxy_tasks(
                &tx,
                id,
                &format!(
                    "proxy {name} missed its heartbeats for {} s and was declared dead",
                    self.timing.dead_after.as_secs()
                ),
            )?;
            tx.commit()?;
            tracing::warn!("proxy {name} declared dead; {n} task(s) re-queued");
        }
        let due: Vec<String> = {
            let db = self.db();
            let mut st = db.prepare(
                "SELECT name FROM jobs WHERE next_run IS NOT NULL AND CAST(next_run AS INTEGER) <= ?1",
            )?;
            st.query_map([now_ms()], |r| r.get(0))?
                .collect::<Result<_, _>>()?
        };
        for j in due {
            match self.run_job(&j) {
                Ok(s) => tracing::info!("scheduled run of job {j}: session {}", s.id),
                Err(e) => {
                    tracing::warn!("scheduled run of job {j} not started: {e}");
                    // Try again at the next interval, not on every tick.
                    let db = self.db();
                    let _ = db.execute(
                        "UPDATE jobs SET next_run = CAST(CAST(next_run AS INTEGER) + 60000 AS TEXT) WHERE name = ?1",
                        [&j],
                    );
                }
            }
        }
        let mut db = self.db();
        let tx = db.transaction()?;
        self.place(&tx)?;
        tx.commit()?;
        Ok(())
    }
}

/// A proxy's slots: the operator's setting, else its cores.
fn effective_slots(set: Option<u32>, cores: u32) -> u32 {
    set.unwrap_or(cores).max(1)
}

/// A job's id and spec by name.
fn job_row(db: &Connection, name: &str) -> R<(i64, JobSpec)> {
    let (id, spec): (i64, String) = db
        .query_row("SELECT id, spec FROM jobs WHERE name = ?1", [name], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()?
        .ok_or_else(|| ApiError::not_found("job", name))?;
    Ok((id, serde_json::from_str(&spec)?))
}

/// The session of a job that is still running, if any.
fn running_session(db: &Connection, job: i64) -> R<Option<i64>> {
    Ok(db
        .query_row(
            "SELECT id FROM sessions WHERE job_id = ?1 AND state = 'running'",
            [job],
            |r| r.get(0),
        )
        .optional()?)
}

fn kind_of(s: &str) -> R<JobKind> {
    serde_json::from_value(serde_json::Value::String(s.into())).map_err(ApiError::from)
}

fn is_vm(source: &str) -> bool {
    source.starts_with("qmp+unix://") || source.starts_with("qmp://")
}

fn location_of(d: &JobDisk) -> Location {
    if is_vm(&d.source) {
        Location::Vm {
            host: d.vm_host.clone(),
        }
    } else if d.source.starts_with("nbd") {
        Location::Network
    } else {
        Location::Path(d.source.clone())
    }
}

fn running_counts(db: &Connection) -> R<HashMap<i64, u32>> {
    let mut st = db.prepare(
        "SELECT proxy_id, count(*) FROM tasks WHERE state IN ('assigned', 'running') AND proxy_id IS NOT NULL GROUP BY proxy_id",
    )?;
    let rows = st.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, u32>(1)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn close_log(db: &Connection, task: u64) -> R<()> {
    db.execute(
        "UPDATE task_log SET ended = ?1 WHERE task_id = ?2 AND ended IS NULL",
        params![unix_secs(), task],
    )?;
    Ok(())
}

/// Put a task back in the queue after it was lost (not a failure).
fn requeue(db: &Connection, task: u64, reason: &str) -> R<()> {
    let (attempt, proxy, attempts): (u32, Option<String>, String) = db.query_row(
        "SELECT attempt, proxy_name, attempts FROM tasks WHERE id = ?1",
        [task],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?;
    let mut att: Vec<Attempt> = serde_json::from_str(&attempts)?;
    att.push(Attempt {
        attempt,
        proxy,
        reason: reason.into(),
        at: now(),
    });
    close_log(db, task)?;
    db.execute(
        "UPDATE tasks SET state = 'queued', proxy_id = NULL, proxy_name = NULL, attempt = attempt + 1, attempts = ?1, done = 0, not_before = 0
         WHERE id = ?2",
        params![serde_json::to_string(&att)?, task],
    )?;
    Ok(())
}

pub(crate) fn requeue_proxy_tasks(db: &Connection, proxy: i64, reason: &str) -> R<usize> {
    let ids: Vec<u64> = {
        let mut st = db.prepare(
            "SELECT id FROM tasks WHERE proxy_id = ?1 AND state IN ('assigned', 'running')",
        )?;
        st.query_map([proxy], |r| r.get(0))?
            .collect::<Result<_, _>>()?
    };
    for id in &ids {
        requeue(db, *id, reason)?;
    }
    Ok(ids.len())
}

fn finish_session_if_done(db: &Connection, sid: i64) -> R<()> {
    let (open, failed): (i64, i64) = db.query_row(
        "SELECT sum(state NOT IN ('success', 'failed')), sum(state = 'failed') FROM tasks WHERE session_id = ?1",
        [sid],
        |r| Ok((r.get::<_, Option<i64>>(0)?.unwrap_or(0), r.get::<_, Option<i64>>(1)?.unwrap_or(0))),
    )?;
    if open == 0 {
        db.execute(
            "UPDATE sessions SET state = ?1, finished = ?2 WHERE id = ?3",
            params![if failed > 0 { "failed" } else { "success" }, now(), sid],
        )?;
    }
    Ok(())
}
