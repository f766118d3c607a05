//! Task life-cycle steps shared by the engine's parts (re-queue, close
//! the occupancy log, finish a session), each within the caller's
//! transaction.

use super::*;

/// A proxy's slots: the operator's setting, else its cores.
pub(super) fn effective_slots(set: Option<u32>, cores: u32) -> u32 {
    set.unwrap_or(cores).max(1)
}

/// A job's id and spec by name.
pub(super) fn job_row(db: &Connection, name: &str) -> R<(JobId, JobSpec)> {
    catalog::jobs::by_name(db, name)?.ok_or_else(|| EngineError::not_found("job", name))
}

/// The session of a job that is still running, if any.
pub(super) fn running_session(db: &Connection, job: JobId) -> R<Option<SessionId>> {
    Ok(catalog::jobs::running_session(db, job)?)
}

pub(super) fn kind_of(s: &str) -> R<JobKind> {
    serde_json::from_value(serde_json::Value::String(s.into())).map_err(EngineError::from)
}

pub(super) fn is_vm(source: &str) -> bool {
    source.starts_with("qmp+unix://")
        || source.starts_with("qmp://")
        || source.starts_with("libvirt://")
}

pub(super) fn location_of(d: &JobDisk) -> Location {
    // A libvirt domain of a host's own libvirtd: only that host's proxy.
    if let (Some(h), true) = (&d.vm_host, d.source.starts_with("libvirt:///")) {
        return Location::OnHost(h.clone());
    }
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

pub(super) fn running_counts(db: &Connection) -> R<HashMap<ProxyId, u32>> {
    Ok(catalog::tasks::running_counts(db)?)
}

pub(super) fn close_log(clock: &dyn Clock, db: &Connection, task: TaskId) -> R<()> {
    Ok(catalog::tasks::close_log(db, task, clock.secs())?)
}

/// Put a task back in the queue after it was lost (not a failure).
pub(super) fn requeue(clock: &dyn Clock, db: &Connection, task: TaskId, reason: &str) -> R<()> {
    let (attempt, proxy, mut att) = catalog::tasks::attempt_of(db, task)?;
    att.push(Attempt {
        attempt,
        proxy,
        reason: reason.into(),
        at: clock.rfc3339(),
    });
    close_log(clock, db, task)?;
    Ok(catalog::tasks::requeue(db, task, &att)?)
}

pub(crate) fn requeue_proxy_tasks(
    clock: &dyn Clock,
    db: &Connection,
    proxy: ProxyId,
    reason: &str,
) -> R<usize> {
    let ids = catalog::tasks::held_by(db, proxy, false)?;
    for id in &ids {
        requeue(clock, db, *id, reason)?;
    }
    Ok(ids.len())
}

pub(super) fn finish_session_if_done(clock: &dyn Clock, db: &Connection, sid: SessionId) -> R<()> {
    Ok(catalog::sessions::finish_if_done(
        db,
        sid,
        &clock.rfc3339(),
    )?)
}
