//! The agent protocol, server side: a proxy's heartbeat and task results,
//! answered with its orders (tasks to start, tasks to cancel, repositories
//! to serve).
//!
//! Invariant: a result is accepted only from the proxy holding the task's
//! current attempt, and each assignment is sent once.

use super::*;

impl Engine {
    // ---- agent side ----

    /// The id of managed host `name` (not the built-in one).
    pub(crate) fn host_id(db: &Connection, name: &str) -> R<HostId> {
        catalog::hosts::id_by_name(db, name)?.ok_or_else(|| EngineError::not_found("host", name))
    }

    /// The proxy of host `host`, once it has heartbeated.
    pub(crate) fn proxy_id(db: &Connection, host: HostId) -> R<Option<ProxyId>> {
        Ok(catalog::proxies::id_of_host(db, host)?)
    }

    /// A heartbeat from the proxy on `host`: registers it on first
    /// contact, records progress, places work, and answers with its orders.
    pub fn heartbeat(&self, host: HostId, hb: &Heartbeat) -> R<Orders> {
        let mut db = self.db();
        let tx = db.transaction()?;
        crate::deploy::may_run_proxy(&tx, host)?;
        // A proxy may report fewer datastores than the administrator gave
        // its host, never more: the others are not used for placement.
        let allowed = catalog::hosts::datastores(&tx, host)?;
        let (datastores, refused) = super::inventory::within_allowed(&allowed, &hb.datastores);
        if !refused.is_empty() {
            tracing::warn!(
                "host {host:?} reports datastores it was not given, not used: {}",
                refused.join(", ")
            );
        }
        if let Some(vms) = &hb.vms {
            catalog::vms::replace(&tx, host, vms, &self.clock.rfc3339())?;
        }
        if let Some(p) = Self::proxy_id(&tx, host)? {
            self.operation_statuses(&tx, p, &hb.operations)?;
            catalog::recoveries::statuses(&tx, p, &hb.recoveries, &self.clock.rfc3339())?;
            catalog::files::statuses(&tx, p, &hb.files, &self.clock.rfc3339())?;
        }
        let hypervisor = catalog::hosts::hypervisor(&tx, host)?;
        let report = catalog::proxies::Report {
            cores: hb.cores.max(1),
            datastores: &datastores,
            version: &hb.version,
            seen: &self.clock.rfc3339(),
            service_port: hb.service_port,
            serving: &hb.serving,
        };
        let (pid, was) = catalog::proxies::heartbeat(&tx, host, &report)?;
        if was == "dead" {
            tracing::info!("proxy {pid} is back");
        }
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(pid, self.clock.monotonic());
        let mut cancel = Vec::new();
        let reported: std::collections::HashSet<u64> = hb.running.iter().map(|t| t.task).collect();
        for t in &hb.running {
            let id = TaskId::of_api(t.task);
            if !catalog::tasks::progress(&tx, id, pid, t.attempt, t.done, t.total)? {
                cancel.push(t.task);
            }
        }
        // Running here by our books but not reported: the proxy lost it
        // (restarted). Results are sent before heartbeats, so a finished
        // task is never mistaken for a lost one.
        let lost: Vec<TaskId> = catalog::tasks::held_by(&tx, pid, true)?
            .into_iter()
            .filter(|id| !reported.contains(&id.api()))
            .collect();
        for id in lost {
            requeue(
                &*self.clock,
                &tx,
                id,
                "the proxy no longer runs it (restarted?)",
            )?;
        }
        self.place(&tx)?;
        let mut orders = self.orders(&tx, pid, cancel)?;
        orders.hypervisor = hypervisor;
        orders.operations = catalog::operations::take_queued(&tx, pid)?;
        orders.recoveries = catalog::recoveries::take_orders(&tx, pid)?;
        orders.files = catalog::files::take_queued(&tx, pid)?;
        tx.commit()?;
        Ok(orders)
    }

    /// The result of a task from the proxy on `host`.
    pub fn task_result(&self, host: HostId, r: &TaskResult) -> R<Orders> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let pid = Self::proxy_id(&tx, host)?
            .ok_or_else(|| EngineError::conflict("this host is not a registered proxy"))?;
        let task = TaskId::of_api(r.task);
        let Some(cur) = catalog::tasks::current(&tx, task, pid, r.attempt)? else {
            return Err(EngineError::conflict(format!(
                "task {} attempt {} is not this proxy's any more (it was re-queued or is finished)",
                r.task, r.attempt
            )));
        };
        let spec: JobSpec = serde_json::from_str(&cur.job_spec)?;
        close_log(&*self.clock, &tx, task)?;
        // A success counts once the server has seen its point.
        let checked;
        let r = match (&r.error, check_point(&tx, &spec, &cur.disk, r)?) {
            (None, Err(why)) => {
                tracing::warn!("task {}: the proxy reported success, but {why}", r.task);
                checked = TaskResult {
                    error: Some(format!("the proxy reported success, but {why}")),
                    permanent: false,
                    ..r.clone()
                };
                &checked
            }
            _ => r,
        };
        match &r.error {
            None => catalog::tasks::succeed(&tx, task, r, &self.clock.rfc3339())?,
            Some(err) => {
                let mut att = cur.attempts;
                att.push(Attempt {
                    attempt: r.attempt,
                    proxy: cur.proxy_name,
                    reason: err.clone(),
                    at: self.clock.rfc3339(),
                });
                let failures = cur.failures + 1;
                if !r.permanent && failures <= spec.retries {
                    let at = self.clock.ms() + self.timing.retry_delay.as_millis() as i64;
                    catalog::tasks::retry(&tx, task, failures, err, &att, at)?;
                } else {
                    catalog::tasks::fail(&tx, task, failures, err, &att, &self.clock.rfc3339())?;
                }
            }
        }
        finish_session_if_done(&*self.clock, &tx, cur.session)?;
        self.place(&tx)?;
        let orders = self.orders(&tx, pid, Vec::new())?;
        tx.commit()?;
        Ok(orders)
    }

    pub(super) fn orders(&self, db: &Connection, pid: ProxyId, cancel: Vec<u64>) -> R<Orders> {
        let mut assign = Vec::new();
        for t in catalog::tasks::assigned_to(db, pid)? {
            let (holder, me, port) = (t.holder, t.proxy_name, t.service_port);
            let d = t.disk;
            let j: JobSpec = serde_json::from_str(&t.job_spec)?;
            // A repository held by a proxy is written through its
            // repository service, except by that proxy itself (a backup
            // or copy, or a restore, which always runs there); replicas
            // are always updated by the service.
            let remote = holder.is_some()
                && (j.kind.replicates() || (j.kind != JobKind::Restore && holder != me));
            let (mut service, mut service_error) = (None, None);
            if let (true, Some(h)) = (remote, &holder) {
                match catalog::repositories::service_address(
                    &j.repository,
                    h,
                    &t.holder_addresses,
                    port,
                ) {
                    Ok(at) => {
                        service = Some(datamover_control::api::ServiceAddress {
                            replica: j.kind.replicates(),
                            task: Some(t.id.api()),
                            ..at
                        })
                    }
                    Err(e) => service_error = Some(e),
                }
            }
            assign.push(TaskOrder {
                service,
                service_error,
                point: d.point.clone(),
                task: t.id.api(),
                attempt: t.attempt,
                kind: j.kind,
                disk: d.name.clone(),
                source: d.source,
                vm_disk: d.disk,
                repository: t.repo_path.unwrap_or_default(),
                transport: j.transport,
                failover_to_network: j.failover_to_network,
                overwrite: j.overwrite,
                quiesce: j.quiesce,
                start_as: d.start_as,
                receipt_for: (holder.is_some() && !remote).then(|| j.repository.clone()),
            });
        }
        // Sent once: from now on the proxy holds the task. If this answer
        // is lost, its next heartbeat does not report the task, and the
        // task is re-queued as lost.
        catalog::tasks::mark_sent(db, pid)?;
        let serve = catalog::repositories::served_by(db, pid)?;
        Ok(Orders {
            assign,
            cancel,
            interval_ms: self.timing.heartbeat_ms(),
            serve,
            hypervisor: None,
            operations: Vec::new(),
            recoveries: Vec::new(),
            files: Vec::new(),
        })
    }
}

/// What the server checks of a point a proxy reports: that it is in the
/// job's repository, for the task's disk, with the size reported. For a
/// repository a proxy holds, that proxy's signed receipt says so (its
/// repository service signs one at every commit; it signs its own
/// results on it); for shared storage, the server opens the repository's
/// directory where it can (where it cannot, the report is taken as it
/// is, and a warning says so).
fn check_point(
    db: &Connection,
    spec: &JobSpec,
    disk: &datamover::DiskName,
    r: &TaskResult,
) -> R<Result<(), String>> {
    if r.error.is_some() {
        return Ok(Ok(()));
    }
    let Some(point) = &r.point else {
        return Ok(Err("it named no point".into()));
    };
    if let Some(Some(holder)) = catalog::repositories::holder(db, &spec.repository)? {
        let Some(rc) = &r.receipt else {
            return Ok(Err(format!(
                "it brought no receipt from {holder}, which holds repository {}",
                spec.repository
            )));
        };
        let claims = (
            rc.task,
            rc.repository.as_str(),
            &rc.disk,
            &rc.point,
            rc.size,
        );
        if claims != (r.task, spec.repository.as_str(), disk, point, r.total) {
            return Ok(Err(format!(
                "its receipt is for task {} {}:{}@{} ({} bytes), not this task's point",
                rc.task, rc.repository, rc.disk, rc.point, rc.size
            )));
        }
        let good = catalog::hosts::certificate_pems(db, &holder)?
            .iter()
            .any(|c| rc.signed_by(c));
        return Ok(if good {
            Ok(())
        } else {
            Err(format!("its receipt is not signed by {holder}"))
        });
    }
    let Some(path) = catalog::repositories::path(db, &spec.repository)? else {
        return Ok(Err(format!("repository {} is gone", spec.repository)));
    };
    let repo = match datamover::Repository::open(std::path::Path::new(&path)) {
        Ok(repo) => repo,
        Err(e) => {
            tracing::warn!(
                "task {}: point {point} not checked: the server cannot open repository {} at {path} ({e})",
                r.task,
                spec.repository
            );
            return Ok(Ok(()));
        }
    };
    Ok(match repo.point_meta(disk, point) {
        Ok(m) if m.meta.disk_size == r.total => Ok(()),
        Ok(m) => Err(format!(
            "point {point} of {disk} holds {} bytes, not the {} reported",
            m.meta.disk_size, r.total
        )),
        Err(e) => Err(format!(
            "repository {} has no point {point} of disk {disk} ({e})",
            spec.repository
        )),
    })
}
