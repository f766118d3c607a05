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
        let report = catalog::proxies::Report {
            cores: hb.cores.max(1),
            datastores: &hb.datastores,
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
            requeue(
                &*self.clock,
                &tx,
                id,
                "the proxy no longer runs it (restarted?)",
            )?;
        }
        self.place(&tx)?;
        let orders = self.orders(&tx, pid, cancel)?;
        tx.commit()?;
        Ok(orders)
    }

    /// The result of a task from the proxy on `host`.
    pub fn task_result(&self, host: HostId, r: &TaskResult) -> R<Orders> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let pid = Self::proxy_id(&tx, host)?
            .ok_or_else(|| EngineError::conflict("this host is not a registered proxy"))?;
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
            return Err(EngineError::conflict(format!(
                "task {} attempt {} is not this proxy's any more (it was re-queued or is finished)",
                r.task, r.attempt
            )));
        };
        let spec: JobSpec = serde_json::from_str(&spec)?;
        close_log(&*self.clock, &tx, r.task)?;
        match &r.error {
            None => {
                tx.execute(
                    "UPDATE tasks SET state = 'success', point = ?1, mode = ?2, bottleneck = ?3, bytes_read = ?4,
                     bytes_stored = ?5, total = ?6, done = ?6, error = NULL, finished = ?7, wire_bytes = ?9, replica = ?10 WHERE id = ?8",
                    params![r.point, r.mode, r.bottleneck, r.bytes_read, r.bytes_stored, r.total, self.clock.rfc3339(), r.task,
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
                    at: self.clock.rfc3339(),
                });
                let failures = failures + 1;
                if !r.permanent && failures <= spec.retries {
                    let at = self.clock.ms() + self.timing.retry_delay.as_millis() as i64;
                    tx.execute(
                        "UPDATE tasks SET state = 'queued', proxy_id = NULL, proxy_name = NULL, attempt = attempt + 1, failures = ?1,
                         error = ?2, attempts = ?3, not_before = ?4, done = 0 WHERE id = ?5",
                        params![failures, err, serde_json::to_string(&att)?, at, r.task],
                    )?;
                } else {
                    tx.execute(
                        "UPDATE tasks SET state = 'failed', failures = ?1, error = ?2, attempts = ?3, finished = ?4 WHERE id = ?5",
                        params![failures, err, serde_json::to_string(&att)?, self.clock.rfc3339(), r.task],
                    )?;
                }
            }
        }
        finish_session_if_done(&*self.clock, &tx, sid)?;
        self.place(&tx)?;
        let orders = self.orders(&tx, pid, Vec::new())?;
        tx.commit()?;
        Ok(orders)
    }

    pub(super) fn orders(&self, db: &Connection, pid: ProxyId, cancel: Vec<u64>) -> R<Orders> {
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
                        service = Some(datamover_control::api::ServiceAddress {
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
        let serve = catalog::repositories::served_by(db, pid)?;
        Ok(Orders {
            assign,
            cancel,
            interval_ms: self.timing.heartbeat_ms(),
            serve,
        })
    }
}
