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
        if j.disks.is_empty() && j.vms.is_empty() {
            return Err(EngineError::bad(
                "a job needs at least one disk or VM (\"disks\", \"vms\")",
            ));
        }
        if !j.vms.is_empty() && j.kind == JobKind::Restore {
            return Err(EngineError::bad(
                "\"vms\" are for backup, copy, replication and migration jobs",
            ));
        }
        if let Some(v) = j
            .vms
            .iter()
            .find(|v| v.start_as.is_some() && j.kind != JobKind::Migration)
        {
            return Err(EngineError::bad(format!(
                "VM {}: \"start_as\" is for migration jobs",
                v.name
            )));
        }
        for name in j
            .vms
            .iter()
            .flat_map(|v| std::iter::once(&v.name).chain(&v.start_as))
        {
            if name.is_empty()
                || name.len() > 200
                || name.contains('/')
                || name.chars().any(char::is_control)
            {
                return Err(EngineError::bad(format!("VM name {name:?} is not valid")));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for d in &j.disks {
            if !seen.insert(&d.name) {
                return Err(EngineError::bad(format!("disk {} is listed twice", d.name)));
            }
            if d.source.trim().is_empty() {
                return Err(EngineError::bad(format!("disk {} has no source", d.name)));
            }
            if d.source.starts_with('/')
                && std::path::Path::new(&d.source).components().any(|c| {
                    matches!(
                        c,
                        std::path::Component::ParentDir | std::path::Component::CurDir
                    )
                })
            {
                return Err(EngineError::bad(format!(
                    "disk {}: path {:?} has . or .. in it: give the path itself",
                    d.name, d.source
                )));
            }
            if j.quiesce.parse::<transports::qemu::Quiesce>().is_err() {
                return Err(EngineError::bad(format!(
                    "unknown quiesce {:?}: use auto, required or off",
                    j.quiesce
                )));
            }
            if j.overwrite && j.kind != JobKind::Restore {
                return Err(EngineError::bad("\"overwrite\" is for restore jobs"));
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
                    "disk {}: source {:?} must be an absolute path, an nbd:// address or a VM (qmp+unix://, qmp:// or libvirt://)",
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
        match catalog::repositories::holder(&db, &j.repository)? {
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
        catalog::jobs::insert(&db, j, next).map_err(|e| match EngineError::from(e) {
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
        Ok(catalog::jobs::list(&self.db())?)
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
        catalog::jobs::delete(&db, id)?;
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
            let disks = with_vm_disks(&tx, &spec)?;
            let sid = catalog::sessions::start(&tx, id, spec.kind, &created, &disks)?;
            let next = spec
                .every_minutes
                .map(|m| self.clock.ms() + i64::from(m) * 60_000);
            catalog::jobs::set_run(&tx, id, &created, next)?;
            self.place(&tx)?;
            tx.commit()?;
            sid
        };
        self.session(sid.0 as u64)
    }

    // ---- sessions ----

    /// Sessions, newest first (at most `limit`).
    pub fn sessions(&self, limit: u32) -> R<Vec<Session>> {
        let ids = catalog::sessions::newest(&self.db(), limit)?;
        ids.into_iter().map(|i| self.session(i.0 as u64)).collect()
    }

    /// One session with its tasks.
    pub fn session(&self, id: u64) -> R<Session> {
        let db = self.db();
        let sid = SessionId(id as i64);
        let row = catalog::sessions::get(&db, sid)?
            .ok_or_else(|| EngineError::not_found("session", id))?;
        Ok(Session {
            id,
            job: row.job,
            kind: kind_of(&row.kind)?,
            state: row.state.parse().map_err(EngineError::internal)?,
            created: row.created,
            finished: row.finished,
            tasks: catalog::sessions::tasks(&db, sid)?,
        })
    }

    /// When each task held a slot on which proxy.
    pub fn timeline(&self, session: u64) -> R<Vec<Occupancy>> {
        let log = catalog::sessions::log(&self.db(), SessionId(session as i64))?;
        Ok(log
            .into_iter()
            .map(|(task, proxy, attempt, started, ended)| Occupancy {
                task,
                proxy,
                attempt,
                started,
                ended,
            })
            .collect())
    }
}

/// A job's disks for a run: its own, and every disk of its VMs as the
/// inventory shows them now (named `VM/TARGET`, read through the VM's
/// hypervisor by a proxy on that host), but those excluded.
fn with_vm_disks(db: &rusqlite::Connection, spec: &JobSpec) -> R<Vec<JobDisk>> {
    let mut disks = spec.disks.clone();
    if spec.vms.is_empty() {
        return Ok(disks);
    }
    let inventory = catalog::vms::list(db)?;
    for v in &spec.vms {
        let found: Vec<&datamover_control::api::InventoryVm> = inventory
            .iter()
            .filter(|i| i.name == v.name && v.host.as_ref().is_none_or(|h| *h == i.host))
            .collect();
        let vm = match found.as_slice() {
            [one] => *one,
            [] => {
                return Err(EngineError::bad(format!(
                    "VM {} is not in the inventory{}: `dm vm list` shows what the hypervisors report",
                    v.name,
                    v.host
                        .as_ref()
                        .map(|h| format!(" of {h}"))
                        .unwrap_or_default()
                )));
            }
            many => {
                let hosts: Vec<&str> = many.iter().map(|i| i.host.as_str()).collect();
                return Err(EngineError::bad(format!(
                    "VM {} is on several hypervisors ({}): give its \"host\"",
                    v.name,
                    hosts.join(", ")
                )));
            }
        };
        if let Some(x) = v
            .exclude
            .iter()
            .find(|x| !vm.disks.iter().any(|d| d.target == **x))
        {
            return Err(EngineError::bad(format!(
                "VM {}: excluded disk {x} is not one of its disks",
                v.name
            )));
        }
        let uri = catalog::vms::hypervisor_of(db, &vm.host)?
            .unwrap_or_else(|| "qemu:///system".to_string());
        for d in vm.disks.iter().filter(|d| !v.exclude.contains(&d.target)) {
            let name = format!("{}/{}", vm.name, d.target);
            disks.push(JobDisk {
                name: name.parse().map_err(|e| {
                    EngineError::bad(format!("VM disk {name} cannot name a point: {e}"))
                })?,
                // Read by the proxy on the VM's host: libvirt's export
                // on a local socket, whatever the connection URI says.
                source: format!("libvirt:///{}?uri={uri}&nbd=unix", vm.name),
                point: None,
                disk: Some(d.target.clone()),
                vm_host: Some(vm.host.clone()),
                start_as: v.start_as.clone(),
            });
        }
    }
    Ok(disks)
}
