//! Operations on VM replicas: failover, undo and failback, asked for
//! through the API and run once by the proxy that holds the replicas (the
//! proxy holding the job's repository), through its host's hypervisor.

use super::*;
use datamover_control::api::{Operation, OperationStatus, ReplicaAction, ReplicaRequest};

impl Engine {
    /// Ask for an operation on the replicas of one VM of job `job` (a
    /// replication or migration job whose repository a proxy holds).
    pub fn replica_operation(&self, job: &str, req: &ReplicaRequest) -> R<Operation> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let (_, spec) = job_row(&tx, job)?;
        if !spec.kind.replicates() {
            return Err(EngineError::bad(format!(
                "job {job} is a {} job: replicas come from replication and migration jobs",
                spec.kind.as_str()
            )));
        }
        let names_vm = spec.vms.iter().any(|v| v.name == req.vm)
            || spec.disks.iter().any(|d| d.name.vm() == req.vm);
        if !names_vm {
            return Err(EngineError::bad(format!("job {job} has no VM {}", req.vm)));
        }
        let (holder, host, pid) = Self::holding_proxy(
            &tx,
            &spec.repository,
            "replicas live beside a repository a proxy holds",
        )?;
        let hv = catalog::hosts::hypervisor(&tx, host)?;
        let on = match (&req.on, &hv) {
            (Some(on), _) => check_libvirt(on)?,
            (None, Some(uri)) => format!("libvirt:///{}-replica?uri={uri}", req.vm),
            (None, None) => {
                return Err(EngineError::bad(format!(
                    "host {holder} (holding the replicas) is no hypervisor: dm host set {holder} --hypervisor URI, or give \"on\""
                )));
            }
        };
        let to = match (req.action, &req.to) {
            (ReplicaAction::Failback, Some(to)) => Some(check_libvirt(to)?),
            (ReplicaAction::Failback, None) => Some(original_of(&tx, &req.vm)?),
            (_, _) => None,
        };
        if let Some(id) = catalog::operations::busy(&tx, job, &req.vm)? {
            return Err(EngineError::conflict(format!(
                "operation {id} on VM {} of job {job} has not ended",
                req.vm
            )));
        }
        let filled = ReplicaRequest {
            on: Some(on),
            to,
            ..req.clone()
        };
        let id = catalog::operations::insert(
            &tx,
            &catalog::operations::NewOperation {
                job,
                request: &filled,
                proxy: (pid, &holder),
                created: &self.clock.rfc3339(),
            },
        )?;
        tx.commit()?;
        drop(db);
        self.operation(id)
    }

    /// One operation.
    pub fn operation(&self, id: u64) -> R<Operation> {
        catalog::operations::get(&self.db(), id)?
            .ok_or_else(|| EngineError::not_found("operation", id))
    }

    /// The newest operations.
    pub fn operations(&self, limit: u32) -> R<Vec<Operation>> {
        Ok(catalog::operations::newest(&self.db(), limit)?)
    }

    /// What a proxy's heartbeat says of its operations: ended ones are
    /// recorded; running ones it no longer reports are failed.
    pub(super) fn operation_statuses(
        &self,
        db: &Connection,
        pid: ProxyId,
        st: &[OperationStatus],
    ) -> R<()> {
        let at = self.clock.rfc3339();
        for s in st.iter().filter(|s| s.done) {
            let outcome = match (&s.result, &s.error) {
                (_, Some(e)) => Err(e.as_str()),
                (Some(v), None) => Ok(v),
                (None, None) => Err("the proxy reported no result"),
            };
            catalog::operations::finish(db, s.id, pid, outcome, &at)?;
        }
        for id in catalog::operations::running(db, pid)? {
            if !st.iter().any(|s| s.id == id) {
                catalog::operations::finish(
                    db,
                    id,
                    pid,
                    Err(
                        "the proxy no longer runs it (restarted?): check the VMs before asking again",
                    ),
                    &at,
                )?;
            }
        }
        Ok(())
    }
}

impl Engine {
    /// The proxy holding `repository`: its host's name and id, and its
    /// id; `why` says why one is needed when none holds it.
    pub(super) fn holding_proxy(
        db: &Connection,
        repository: &str,
        why: &str,
    ) -> R<(String, HostId, ProxyId)> {
        let holder = catalog::repositories::holder(db, repository)?
            .ok_or_else(|| EngineError::not_found("repository", repository))?
            .ok_or_else(|| {
                EngineError::bad(format!(
                    "repository {repository} is not held by a proxy: {why}"
                ))
            })?;
        let host = Self::host_id(db, &holder)?;
        let pid = Self::proxy_id(db, host)?
            .ok_or_else(|| EngineError::bad(format!("host {holder} runs no proxy")))?;
        Ok((holder, host, pid))
    }
}

/// A libvirt address as the proxy will parse it.
pub(super) fn check_libvirt(a: &str) -> R<String> {
    transports::libvirt::LibvirtAddress::parse(a)
        .map(|_| a.to_string())
        .map_err(|e| EngineError::bad(e.to_string()))
}

/// The original VM of a failback: where the inventory shows it.
fn original_of(db: &Connection, vm: &str) -> R<String> {
    let found: Vec<_> = catalog::vms::list(db)?
        .into_iter()
        .filter(|v| v.name == vm)
        .collect();
    match found.as_slice() {
        [one] => {
            let uri = catalog::vms::hypervisor_of(db, &one.host)?
                .unwrap_or_else(|| "qemu:///system".into());
            Ok(format!("libvirt:///{vm}?uri={uri}"))
        }
        [] => Err(EngineError::bad(format!(
            "VM {vm} is not in the inventory: give the original VM as \"to\" (libvirt:///DOMAIN?uri=…)"
        ))),
        _ => Err(EngineError::bad(format!(
            "VM {vm} is on several hypervisors: give the original VM as \"to\""
        ))),
    }
}
