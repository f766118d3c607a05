//! `sessions` (runs of jobs) and what they show of their `tasks` and the
//! `task_log` of slot occupancy.
//!
//! Invariant: a session is `running` until every one of its tasks is
//! `success` or `failed`; then it is `failed` if any task failed.

use datamover_control::api::{JobDisk, JobKind, State, Task};
use rusqlite::{Connection, OptionalExtension, params};

use super::Q;
use super::ids::{JobId, SessionId};

/// Start a session of job `job` with one queued task per disk.
pub fn start(
    db: &Connection,
    job: JobId,
    kind: JobKind,
    created: &str,
    disks: &[JobDisk],
) -> Q<SessionId> {
    db.execute(
        "INSERT INTO sessions(job_id, kind, state, created) VALUES (?1, ?2, 'running', ?3)",
        params![job, kind.as_str(), created],
    )?;
    let sid = SessionId(db.last_insert_rowid());
    for d in disks {
        db.execute(
            "INSERT INTO tasks(session_id, disk, spec, state) VALUES (?1, ?2, ?3, 'queued')",
            params![sid, d.name.to_string(), serde_json::to_string(d)?],
        )?;
    }
    Ok(sid)
}

/// Ids of the newest `limit` sessions, newest first.
pub fn newest(db: &Connection, limit: u32) -> Q<Vec<SessionId>> {
    let mut st = db.prepare("SELECT id FROM sessions ORDER BY id DESC LIMIT ?1")?;
    let rows = st.query_map([limit], |r| r.get(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// A session as stored, without its tasks.
#[derive(Debug)]
pub struct SessionRow {
    /// Its job's name.
    pub job: String,
    /// The job's kind when it ran.
    pub kind: String,
    /// `running`, `success` or `failed`.
    pub state: String,
    /// When it started (RFC 3339).
    pub created: String,
    /// When it ended.
    pub finished: Option<String>,
}

/// Session `id`.
pub fn get(db: &Connection, id: SessionId) -> Q<Option<SessionRow>> {
    Ok(db
        .query_row(
            "SELECT j.name, s.kind, s.state, s.created, s.finished FROM sessions s JOIN jobs j ON j.id = s.job_id WHERE s.id = ?1",
            [id],
            |r| {
                Ok(SessionRow {
                    job: r.get(0)?,
                    kind: r.get(1)?,
                    state: r.get(2)?,
                    created: r.get(3)?,
                    finished: r.get(4)?,
                })
            },
        )
        .optional()?)
}

/// The tasks of session `id`, by id, as the API shows them.
pub fn tasks(db: &Connection, id: SessionId) -> Q<Vec<Task>> {
    let mut st = db.prepare(
        "SELECT id, disk, state, proxy_name, attempt, mode, done, total, bottleneck, point, bytes_read, bytes_stored, error, attempts, started, finished,
         wire_bytes, replica, waiting, consistency FROM tasks WHERE session_id = ?1 ORDER BY id",
    )?;
    let rows = st.query_map([id], |r| {
        Ok((
            Task {
                id: r.get(0)?,
                disk: super::parsed(r, 1)?,
                state: State::Queued,
                proxy: r.get(3)?,
                attempt: r.get(4)?,
                mode: r.get(5)?,
                done: r.get(6)?,
                total: r.get(7)?,
                bottleneck: r.get(8)?,
                point: super::parsed_opt(r, 9)?,
                bytes_read: r.get(10)?,
                bytes_stored: r.get(11)?,
                wire_bytes: r.get(16)?,
                replica: r.get(17)?,
                waiting: r.get(18)?,
                consistency: None,
                error: r.get(12)?,
                attempts: Vec::new(),
                started: r.get(14)?,
                finished: r.get(15)?,
            },
            r.get::<_, String>(2)?,
            r.get::<_, String>(13)?,
            r.get::<_, Option<String>>(19)?,
        ))
    })?;
    rows.map(|r| {
        let (mut t, state, attempts, consistency) = r?;
        t.consistency = consistency.map(|c| serde_json::from_str(&c)).transpose()?;
        t.state = serde_json::from_value(serde_json::Value::String(state))?;
        t.attempts = serde_json::from_str(&attempts)?;
        Ok(t)
    })
    .collect()
}

/// One slot-occupancy interval: (task, proxy, attempt, started, ended),
/// Unix seconds.
pub type LogRow = (u64, String, u32, f64, Option<f64>);

/// The task log of session `id`, by start.
pub fn log(db: &Connection, id: SessionId) -> Q<Vec<LogRow>> {
    let mut st = db.prepare(
        "SELECT l.task_id, l.proxy, l.attempt, l.started, l.ended FROM task_log l JOIN tasks t ON t.id = l.task_id
         WHERE t.session_id = ?1 ORDER BY l.started",
    )?;
    let rows = st.query_map([id], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// End session `id` at `now` if none of its tasks is open any more.
pub fn finish_if_done(db: &Connection, id: SessionId, now: &str) -> Q<()> {
    let (open, failed): (i64, i64) = db.query_row(
        "SELECT sum(state NOT IN ('success', 'failed')), sum(state = 'failed') FROM tasks WHERE session_id = ?1",
        [id],
        |r| Ok((r.get::<_, Option<i64>>(0)?.unwrap_or(0), r.get::<_, Option<i64>>(1)?.unwrap_or(0))),
    )?;
    if open == 0 {
        db.execute(
            "UPDATE sessions SET state = ?1, finished = ?2 WHERE id = ?3",
            params![if failed > 0 { "failed" } else { "success" }, now, id],
        )?;
    }
    Ok(())
}
