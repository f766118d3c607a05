//! Jobs and their sessions: creating, listing, running and deleting a job;
//! reading sessions with their tasks and attempts.
//!
//! Invariant: a job has at most one running session; running a job
//! creates one queued task per disk in one transaction.

use super::*;

impl Engine {
    // ---- jobs ----

    /// Create a job.
    pub fn create_job(&self, j: &JobSpec) -> R<Job> {
        check_name("job", &j.name)?;
        if j.disks.is_empty() {
            return Err(EngineError::bad("a job needs at least one disk"));
        }
        let mut seen = std::collections::HashSet::new();
        for d in &j.disks {
            d.name
                .parse::<datamover::DiskName>()
                .map_err(|e| EngineError::bad(format!("disk name {:?}: {e}", d.name)))?;
            if !seen.insert(&d.name) {
                return Err(EngineError::bad(format!("disk {} is listed twice", d.name)));
            }
            if d.source.trim().is_empty() {
                return Err(EngineError::bad(format!("disk {} has no source", d.name)));
            }
            if j.kind == JobKind::Restore {
                if is_vm(&d.source) || !(d.source.starts_with("nbd") || d.source.starts_with('/')) {
                    return Err(EngineError::bad(format!(
                        "disk {}: a restore writes to an absolute path or an nbd:// export, not {:?}",
                        d.name, d.source
                    )));
                }
                continue;
            }
            if d.point.is_some() {
                return Err(EngineError::bad(format!(
                    "disk {}: \"point\" is for restore jobs",
                    d.name
                )));
            }
            let vm = is_vm(&d.source);
            if vm && d.disk.is_none() {
                return Err(EngineError::bad(format!(
                    "disk {}: its source is a VM; name the VM disk with \"disk\"",
                    d.name
                )));
            }
            if !vm && !d.source.starts_with("nbd") && !d.source.starts_with('/') {
                return Err(EngineError::bad(format!(
                    "disk {}: source {:?} must be an absolute path, an nbd:// address or a VM (qmp+unix:// or qmp://)",
                    d.name, d.source
                )));
            }
        }
        if j.transport != "auto" {
            j.transport.parse::<Mode>().map_err(|_| {
                EngineError::bad(format!(
                    "transport {:?}: use auto, san, hotadd, nbd or storage-snapshot",
                    j.transport
                ))
            })?;
        }
        if j.retries > 10 {
            return Err(EngineError::bad("retries must be 0-10"));
        }
        if j.every_minutes == Some(0) {
            return Err(EngineError::bad("every_minutes must be at least 1"));
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
                return Err(EngineError::bad(format!(
                    "no repository named {}",
                    j.repository
                )));
            }
            Some(None) if j.kind.replicates() => {
                return Err(EngineError::bad(format!(
                    "a {} job needs a repository held by its target proxy (dm repo add NAME --path DIR --proxy TARGET); {} is shared storage",
                    j.kind.as_str(),
                    j.repository
                )));
            }
            Some(_) => {}
        }
        for p in &j.proxies {
            if catalog::hosts::is_builtin(&db, p)?.is_none() {
                return Err(EngineError::bad(format!("no host or proxy named {p}")));
            }
        }
        let next = j
            .every_minutes
            .map(|m| self.clock.ms() + i64::from(m) * 60_000);
        db.execute(
            "INSERT INTO jobs(name, spec, next_run) VALUES (?1, ?2, ?3)",
            params![
                j.name,
                serde_json::to_string(j)?,
                next.map(|n| n.to_string())
            ],
        )
        .map_err(|e| match EngineError::from(e) {
            e if e.kind == ErrorKind::Conflict => {
                EngineError::conflict(format!("a job named {} exists", j.name))
            }
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
            .ok_or_else(|| EngineError::not_found("job", name))
    }

    /// Delete a job (and its sessions' records); refused while it runs.
    pub fn delete_job(&self, name: &str) -> R<()> {
        let db = self.db();
        let (id, _) = job_row(&db, name)?;
        if let Some(s) = running_session(&db, id)? {
            return Err(EngineError::conflict(format!(
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
                return Err(EngineError::conflict(format!(
                    "job {name} is already running (session {s})"
                )));
            }
            let created = self.clock.rfc3339();
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
                .map(|m| (self.clock.ms() + i64::from(m) * 60_000).to_string());
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
            .ok_or_else(|| EngineError::not_found("session", id))?;
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
                t.state = state.parse().map_err(EngineError::internal)?;
                t.attempts = serde_json::from_str(&attempts)?;
                Ok(t)
            })
            .collect::<R<Vec<_>>>()?;
        Ok(Session {
            id,
            job,
            kind: kind_of(&kind)?,
            state: state.parse().map_err(EngineError::internal)?,
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
}
