//! `jobs`: job specs (JSON) and their schedules.
//!
//! Invariant: `next_run` (milliseconds since the epoch, as text) is set
//! exactly for jobs with a schedule.

use datamover_control::api::{Job, JobSpec};
use rusqlite::{Connection, OptionalExtension, params};

use super::Q;
use super::ids::{JobId, SessionId};

/// Add a job; `next_run` for a scheduled one.
pub fn insert(db: &Connection, j: &JobSpec, next_run: Option<i64>) -> Q<()> {
    db.execute(
        "INSERT INTO jobs(name, spec, next_run) VALUES (?1, ?2, ?3)",
        params![
            j.name,
            serde_json::to_string(j)?,
            next_run.map(|n| n.to_string())
        ],
    )?;
    Ok(())
}

/// Every job with its last run and last session, by name.
pub fn list(db: &Connection) -> Q<Vec<Job>> {
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

/// The job named `name`.
pub fn by_name(db: &Connection, name: &str) -> Q<Option<(JobId, JobSpec)>> {
    let row: Option<(JobId, String)> = db
        .query_row("SELECT id, spec FROM jobs WHERE name = ?1", [name], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()?;
    row.map(|(id, spec)| Ok((id, serde_json::from_str(&spec)?)))
        .transpose()
}

/// Delete a job.
pub fn delete(db: &Connection, id: JobId) -> Q<()> {
    db.execute("DELETE FROM jobs WHERE id = ?1", [id])?;
    Ok(())
}

/// The session of job `id` that is still running, if any.
pub fn running_session(db: &Connection, id: JobId) -> Q<Option<SessionId>> {
    Ok(db
        .query_row(
            "SELECT id FROM sessions WHERE job_id = ?1 AND state = 'running'",
            [id],
            |r| r.get(0),
        )
        .optional()?)
}

/// Record a run that started at `started`; `next_run` for a scheduled job.
pub fn set_run(db: &Connection, id: JobId, started: &str, next_run: Option<i64>) -> Q<()> {
    db.execute(
        "UPDATE jobs SET last_run = ?1, next_run = ?2 WHERE id = ?3",
        params![started, next_run.map(|n| n.to_string()), id],
    )?;
    Ok(())
}

/// Names of scheduled jobs due at `now_ms`.
pub fn due(db: &Connection, now_ms: i64) -> Q<Vec<String>> {
    let mut st = db.prepare(
        "SELECT name FROM jobs WHERE next_run IS NOT NULL AND CAST(next_run AS INTEGER) <= ?1",
    )?;
    let rows = st.query_map([now_ms], |r| r.get(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Move a scheduled job's next run one minute on (its run could not
/// start: try at the next interval, not on every tick).
pub fn postpone(db: &Connection, name: &str) -> Q<()> {
    db.execute(
        "UPDATE jobs SET next_run = CAST(CAST(next_run AS INTEGER) + 60000 AS TEXT) WHERE name = ?1",
        [name],
    )?;
    Ok(())
}
