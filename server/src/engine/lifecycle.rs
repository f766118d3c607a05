//! Task life-cycle steps shared by the engine's parts (re-queue, close
//! the occupancy log, finish a session), each within the caller's
//! transaction.

use super::*;

/// A proxy's slots: the operator's setting, else its cores.
pub(super) fn effective_slots(set: Option<u32>, cores: u32) -> u32 {
    set.unwrap_or(cores).max(1)
}

/// A job's id and spec by name.
pub(super) fn job_row(db: &Connection, name: &str) -> R<(i64, JobSpec)> {
    let (id, spec): (i64, String) = db
        .query_row("SELECT id, spec FROM jobs WHERE name = ?1", [name], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()?
        .ok_or_else(|| EngineError::not_found("job", name))?;
    Ok((id, serde_json::from_str(&spec)?))
}

/// The session of a job that is still running, if any.
pub(super) fn running_session(db: &Connection, job: i64) -> R<Option<i64>> {
    Ok(db
        .query_row(
            "SELECT id FROM sessions WHERE job_id = ?1 AND state = 'running'",
            [job],
            |r| r.get(0),
        )
        .optional()?)
}

pub(super) fn kind_of(s: &str) -> R<JobKind> {
    serde_json::from_value(serde_json::Value::String(s.into())).map_err(EngineError::from)
}

pub(super) fn is_vm(source: &str) -> bool {
    source.starts_with("qmp+unix://") || source.starts_with("qmp://")
}

pub(super) fn location_of(d: &JobDisk) -> Location {
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

pub(super) fn running_counts(db: &Connection) -> R<HashMap<i64, u32>> {
    let mut st = db.prepare(
        "SELECT proxy_id, count(*) FROM tasks WHERE state IN ('assigned', 'running') AND proxy_id IS NOT NULL GROUP BY proxy_id",
    )?;
    let rows = st.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, u32>(1)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub(super) fn close_log(clock: &dyn Clock, db: &Connection, task: u64) -> R<()> {
    db.execute(
        "UPDATE task_log SET ended = ?1 WHERE task_id = ?2 AND ended IS NULL",
        params![clock.secs(), task],
    )?;
    Ok(())
}

/// Put a task back in the queue after it was lost (not a failure).
pub(super) fn requeue(clock: &dyn Clock, db: &Connection, task: u64, reason: &str) -> R<()> {
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
        at: clock.rfc3339(),
    });
    close_log(clock, db, task)?;
    db.execute(
        "UPDATE tasks SET state = 'queued', proxy_id = NULL, proxy_name = NULL, attempt = attempt + 1, attempts = ?1, done = 0, not_before = 0
         WHERE id = ?2",
        params![serde_json::to_string(&att)?, task],
    )?;
    Ok(())
}

pub(crate) fn requeue_proxy_tasks(
    clock: &dyn Clock,
    db: &Connection,
    proxy: ProxyId,
    reason: &str,
) -> R<usize> {
    let ids: Vec<u64> = {
        let mut st = db.prepare(
            "SELECT id FROM tasks WHERE proxy_id = ?1 AND state IN ('assigned', 'running')",
        )?;
        st.query_map([proxy], |r| r.get(0))?
            .collect::<Result<_, _>>()?
    };
    for id in &ids {
        requeue(clock, db, *id, reason)?;
    }
    Ok(ids.len())
}

pub(super) fn finish_session_if_done(clock: &dyn Clock, db: &Connection, sid: i64) -> R<()> {
    let (open, failed): (i64, i64) = db.query_row(
        "SELECT sum(state NOT IN ('success', 'failed')), sum(state = 'failed') FROM tasks WHERE session_id = ?1",
        [sid],
        |r| Ok((r.get::<_, Option<i64>>(0)?.unwrap_or(0), r.get::<_, Option<i64>>(1)?.unwrap_or(0))),
    )?;
    if open == 0 {
        db.execute(
            "UPDATE sessions SET state = ?1, finished = ?2 WHERE id = ?3",
            params![
                if failed > 0 { "failed" } else { "success" },
                clock.rfc3339(),
                sid
            ],
        )?;
    }
    Ok(())
}
