//! `tasks` (one per disk of a session) and the `task_log` of slot
//! occupancy: placement, progress, results, retries and re-queueing.
//!
//! Invariant: a task is held by at most one proxy (`proxy_id`) and only
//! while `assigned` or `running`; every change that takes it from a
//! proxy closes its open `task_log` interval.

use std::collections::HashMap;

use datamover_control::api::{Attempt, JobDisk, TaskResult};
use rusqlite::{Connection, OptionalExtension, params};

use super::Q;
use super::ids::{ProxyId, SessionId, TaskId};

/// Tasks placed on each proxy (assigned or running).
pub fn running_counts(db: &Connection) -> Q<HashMap<ProxyId, u32>> {
    let mut st = db.prepare(
        "SELECT proxy_id, count(*) FROM tasks WHERE state IN ('assigned', 'running') AND proxy_id IS NOT NULL GROUP BY proxy_id",
    )?;
    let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// A queued task placement may consider.
#[derive(Debug)]
pub struct Queued {
    /// The task.
    pub id: TaskId,
    /// Its disk.
    pub disk: JobDisk,
    /// Its job's spec, as stored (JSON; tasks of one job share it).
    pub job_spec: String,
    /// The proxy holding the job's repository, if one does.
    pub holder: Option<String>,
    /// Why it could not be placed last time.
    pub waiting: Option<String>,
    /// Its session.
    pub session: i64,
}

/// Queued tasks due at `now_ms`, in queue order. A task whose repository
/// was just given to a running service waits for the service's next
/// heartbeat (which offers it).
pub fn queued(db: &Connection, now_ms: i64) -> Q<Vec<Queued>> {
    let mut st = db.prepare(
        "SELECT t.id, t.spec, j.spec, r.proxy, t.waiting, s.id FROM tasks t JOIN sessions s ON s.id = t.session_id JOIN jobs j ON j.id = s.job_id
         LEFT JOIN repositories r ON r.name = json_extract(j.spec, '$.repository')
         LEFT JOIN hosts ph ON ph.name = r.proxy
         LEFT JOIN proxies pp ON pp.host_id = ph.id
         WHERE t.state = 'queued' AND t.not_before <= ?1
         AND NOT (pp.state = 'online' AND pp.service_port IS NOT NULL
                  AND NOT EXISTS (SELECT 1 FROM json_each(pp.serving) WHERE value = r.name))
         ORDER BY t.id",
    )?;
    let rows = st.query_map([now_ms], |r| {
        Ok((
            r.get::<_, TaskId>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, Option<String>>(3)?,
            r.get::<_, Option<String>>(4)?,
            r.get::<_, i64>(5)?,
        ))
    })?;
    rows.map(|r| {
        let (id, disk, job_spec, holder, waiting, session) = r?;
        Ok(Queued {
            id,
            disk: serde_json::from_str(&disk)?,
            job_spec,
            holder,
            waiting,
            session,
        })
    })
    .collect()
}

/// Say why a queued task cannot be placed (none: clear it).
pub fn set_waiting(db: &Connection, id: TaskId, why: Option<&str>) -> Q<()> {
    db.execute(
        "UPDATE tasks SET waiting = ?1 WHERE id = ?2",
        params![why, id],
    )?;
    Ok(())
}

/// Place task `id` on proxy `proxy` (named `name`) in `mode`, starting at
/// `started` (RFC 3339) / `at` (Unix seconds, for the log).
pub fn assign(
    db: &Connection,
    id: TaskId,
    proxy: ProxyId,
    name: &str,
    mode: &str,
    started: &str,
    at: f64,
) -> Q<()> {
    let attempt: u32 = db.query_row(
        "UPDATE tasks SET state = 'assigned', proxy_id = ?1, proxy_name = ?2, mode = ?3, started = ?4, done = 0,
         waiting = NULL WHERE id = ?5 RETURNING attempt",
        params![proxy, name, mode, started, id],
        |r| r.get(0),
    )?;
    db.execute(
        "INSERT INTO task_log(task_id, proxy, attempt, started) VALUES (?1, ?2, ?3, ?4)",
        params![id, name, attempt, at],
    )?;
    Ok(())
}

/// A task assigned to a proxy and not yet sent to it, with what its
/// order needs.
#[derive(Debug)]
pub struct Assigned {
    /// The task.
    pub id: TaskId,
    /// Its attempt.
    pub attempt: u32,
    /// Its disk.
    pub disk: JobDisk,
    /// Its job's spec (JSON).
    pub job_spec: String,
    /// The directory of the job's repository, if it exists.
    pub repo_path: Option<String>,
    /// The proxy holding the job's repository, if one does.
    pub holder: Option<String>,
    /// That proxy's host's addresses.
    pub holder_addresses: Vec<String>,
    /// That proxy's repository service port, if it runs one.
    pub service_port: Option<u16>,
    /// The proxy the task is assigned to.
    pub proxy_name: Option<String>,
}

/// Tasks assigned to `proxy` and not yet sent, by id.
pub fn assigned_to(db: &Connection, proxy: ProxyId) -> Q<Vec<Assigned>> {
    let mut st = db.prepare(
        "SELECT t.id, t.attempt, t.spec, j.spec, r.path, r.proxy, ph.addresses, pp.service_port, t.proxy_name
         FROM tasks t
         JOIN sessions s ON s.id = t.session_id JOIN jobs j ON j.id = s.job_id
         LEFT JOIN repositories r ON r.name = json_extract(j.spec, '$.repository')
         LEFT JOIN hosts ph ON ph.name = r.proxy
         LEFT JOIN proxies pp ON pp.host_id = ph.id
         WHERE t.proxy_id = ?1 AND t.state = 'assigned' ORDER BY t.id",
    )?;
    let rows = st.query_map([proxy], |r| {
        Ok((
            (
                r.get::<_, TaskId>(0)?,
                r.get::<_, u32>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, Option<String>>(4)?,
            ),
            (
                r.get::<_, Option<String>>(5)?,
                r.get::<_, Option<String>>(6)?,
                r.get::<_, Option<u16>>(7)?,
                r.get::<_, Option<String>>(8)?,
            ),
        ))
    })?;
    rows.map(|r| {
        let ((id, attempt, disk, job_spec, repo_path), (holder, addrs, service_port, proxy_name)) =
            r?;
        Ok(Assigned {
            id,
            attempt,
            disk: serde_json::from_str(&disk)?,
            job_spec,
            repo_path,
            holder,
            holder_addresses: serde_json::from_str(addrs.as_deref().unwrap_or("[]"))?,
            service_port,
            proxy_name,
        })
    })
    .collect()
}

/// The orders of `proxy` were sent: its assigned tasks now run.
pub fn mark_sent(db: &Connection, proxy: ProxyId) -> Q<()> {
    db.execute(
        "UPDATE tasks SET state = 'running' WHERE proxy_id = ?1 AND state = 'assigned'",
        [proxy],
    )?;
    Ok(())
}

/// Progress of attempt `attempt` of task `id` on `proxy`; false when the
/// task is not that proxy's any more (the proxy should cancel it).
pub fn progress(
    db: &Connection,
    id: TaskId,
    proxy: ProxyId,
    attempt: u32,
    done: u64,
    total: u64,
) -> Q<bool> {
    let n = db.execute(
        "UPDATE tasks SET state = 'running', done = ?1, total = ?2
         WHERE id = ?3 AND proxy_id = ?4 AND attempt = ?5 AND state IN ('assigned', 'running')",
        params![done, total, id, proxy, attempt],
    )?;
    Ok(n > 0)
}

/// Tasks `proxy` holds: running only, or assigned and running.
pub fn held_by(db: &Connection, proxy: ProxyId, running_only: bool) -> Q<Vec<TaskId>> {
    let sql = if running_only {
        "SELECT id FROM tasks WHERE proxy_id = ?1 AND state = 'running'"
    } else {
        "SELECT id FROM tasks WHERE proxy_id = ?1 AND state IN ('assigned', 'running')"
    };
    let mut st = db.prepare(sql)?;
    let rows = st.query_map([proxy], |r| r.get(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The current attempt of a task, as its holder reports on it.
#[derive(Debug)]
pub struct Current {
    /// Its session.
    pub session: SessionId,
    /// Failed attempts so far.
    pub failures: u32,
    /// Its job's spec (JSON).
    pub job_spec: String,
    /// Attempts that did not succeed.
    pub attempts: Vec<Attempt>,
    /// The proxy holding it.
    pub proxy_name: Option<String>,
    /// Its disk.
    pub disk: datamover::DiskName,
}

/// Attempt `attempt` of task `id`, if `proxy` holds it now.
pub fn current(db: &Connection, id: TaskId, proxy: ProxyId, attempt: u32) -> Q<Option<Current>> {
    let row: Option<(SessionId, u32, String, String, Option<String>, datamover::DiskName)> = db
        .query_row(
            "SELECT t.session_id, t.failures, j.spec, t.attempts, t.proxy_name, t.disk FROM tasks t
             JOIN sessions s ON s.id = t.session_id JOIN jobs j ON j.id = s.job_id
             WHERE t.id = ?1 AND t.proxy_id = ?2 AND t.attempt = ?3 AND t.state IN ('assigned', 'running')",
            params![id, proxy, attempt],
            |x| {
                Ok((
                    x.get(0)?,
                    x.get(1)?,
                    x.get(2)?,
                    x.get(3)?,
                    x.get(4)?,
                    super::parsed(x, 5)?,
                ))
            },
        )
        .optional()?;
    row.map(
        |(session, failures, job_spec, attempts, proxy_name, disk)| {
            Ok(Current {
                session,
                failures,
                job_spec,
                attempts: serde_json::from_str(&attempts)?,
                proxy_name,
                disk,
            })
        },
    )
    .transpose()
}

/// Task `id` succeeded as `r` says, at `finished`.
pub fn succeed(db: &Connection, id: TaskId, r: &TaskResult, finished: &str) -> Q<()> {
    db.execute(
        "UPDATE tasks SET state = 'success', point = ?1, mode = ?2, bottleneck = ?3, bytes_read = ?4,
         bytes_stored = ?5, total = ?6, done = ?6, error = NULL, finished = ?7, wire_bytes = ?9, replica = ?10,
         consistency = ?11 WHERE id = ?8",
        params![
            r.point.as_ref().map(|p| p.to_string()),
            r.mode,
            r.bottleneck,
            r.bytes_read,
            r.bytes_stored,
            r.total,
            finished,
            id,
            (r.wire_bytes > 0).then_some(r.wire_bytes),
            r.replica,
            r.consistency
                .as_ref()
                .map(serde_json::to_string)
                .transpose()?
        ],
    )?;
    Ok(())
}

/// Task `id` failed with `error`; it is queued again from `not_before_ms`.
pub fn retry(
    db: &Connection,
    id: TaskId,
    failures: u32,
    error: &str,
    attempts: &[Attempt],
    not_before_ms: i64,
) -> Q<()> {
    db.execute(
        "UPDATE tasks SET state = 'queued', proxy_id = NULL, proxy_name = NULL, attempt = attempt + 1, failures = ?1,
         error = ?2, attempts = ?3, not_before = ?4, done = 0 WHERE id = ?5",
        params![failures, error, serde_json::to_string(attempts)?, not_before_ms, id],
    )?;
    Ok(())
}

/// Task `id` failed for good with `error`, at `finished`.
pub fn fail(
    db: &Connection,
    id: TaskId,
    failures: u32,
    error: &str,
    attempts: &[Attempt],
    finished: &str,
) -> Q<()> {
    db.execute(
        "UPDATE tasks SET state = 'failed', failures = ?1, error = ?2, attempts = ?3, finished = ?4 WHERE id = ?5",
        params![failures, error, serde_json::to_string(attempts)?, finished, id],
    )?;
    Ok(())
}

/// Task `id`'s attempt, holder and attempts so far.
pub fn attempt_of(db: &Connection, id: TaskId) -> Q<(u32, Option<String>, Vec<Attempt>)> {
    let (attempt, proxy, attempts): (u32, Option<String>, String) = db.query_row(
        "SELECT attempt, proxy_name, attempts FROM tasks WHERE id = ?1",
        [id],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?;
    Ok((attempt, proxy, serde_json::from_str(&attempts)?))
}

/// Put task `id` back in the queue (lost, not failed), with `attempts`.
pub fn requeue(db: &Connection, id: TaskId, attempts: &[Attempt]) -> Q<()> {
    db.execute(
        "UPDATE tasks SET state = 'queued', proxy_id = NULL, proxy_name = NULL, attempt = attempt + 1, attempts = ?1, done = 0, not_before = 0
         WHERE id = ?2",
        params![serde_json::to_string(attempts)?, id],
    )?;
    Ok(())
}

/// Close task `id`'s open slot interval at `at` (Unix seconds).
pub fn close_log(db: &Connection, id: TaskId, at: f64) -> Q<()> {
    db.execute(
        "UPDATE task_log SET ended = ?1 WHERE task_id = ?2 AND ended IS NULL",
        params![at, id],
    )?;
    Ok(())
}
