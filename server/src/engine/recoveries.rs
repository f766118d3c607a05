//! Instant VM recoveries: asked for through the API, served by a proxy
//! (the mount server: the one holding the repository, or another one,
//! which reads the points from the holder's repository service under a
//! read grant for the recovery's disks) through its host's hypervisor;
//! migrate and discard reach that proxy as one-shot orders.

use super::*;
use datamover_control::api::{Recovery, RecoveryAction, RecoveryMigrate, RecoveryRequest};

impl Engine {
    /// Ask for an instant recovery of a VM from repository `req.repository`.
    pub fn create_recovery(&self, req: &RecoveryRequest) -> R<Recovery> {
        format!("{}/x", req.vm)
            .parse::<datamover::DiskName>()
            .map_err(|e| EngineError::bad(format!("VM {:?}: {e}", req.vm)))?;
        for p in &req.points {
            let r: datamover::PointRef = p
                .parse()
                .map_err(|e| EngineError::bad(format!("point {p:?}: {e}")))?;
            if r.disk.vm() != req.vm {
                return Err(EngineError::bad(format!(
                    "point {p} is not of VM {}",
                    req.vm
                )));
            }
        }
        let mut db = self.db();
        let tx = db.transaction()?;
        let (holder, host, pid) = Self::holding_proxy(
            &tx,
            &req.repository,
            "a VM is recovered by a proxy from a repository a proxy holds",
        )?;
        let (mount, host, pid) = match req.proxy.as_deref() {
            Some(p) if p != holder => {
                if req.points.is_empty() {
                    return Err(EngineError::bad(format!(
                        "name the VM's disks (VM/DISK[@POINT]) for {p} to read from {holder}'s repository service"
                    )));
                }
                let (h, port) = catalog::repositories::service(&tx, &req.repository)?
                    .map(|(_, addrs, port)| (addrs, port))
                    .unwrap_or_default();
                catalog::repositories::service_address(&req.repository, &holder, &h, port)
                    .map_err(EngineError::bad)?;
                let host = Self::host_id(&tx, p)?;
                let pid = Self::proxy_id(&tx, host)?
                    .ok_or_else(|| EngineError::bad(format!("host {p} runs no proxy")))?;
                (p.to_string(), host, pid)
            }
            _ => (holder, host, pid),
        };
        // A QEMU of the proxy's own needs no libvirt on its host.
        let own = match &req.on {
            Some(on) => transports::instant::own_qemu(on, &format!("{}-instant", req.vm))
                .map_err(|e| EngineError::bad(e.to_string()))?,
            None => None,
        };
        let on = match (&req.on, catalog::hosts::hypervisor(&tx, host)?) {
            (Some(on), _) if own.is_some() => on.clone(),
            (Some(on), _) => super::operations::check_libvirt(on)?,
            (None, Some(uri)) => format!("libvirt:///{}-instant?uri={uri}", req.vm),
            (None, None) => {
                return Err(EngineError::bad(format!(
                    "host {mount} (the mount server of repository {}) is no hypervisor: dm host set {mount} --hypervisor URI, or give \"on\"",
                    req.repository
                )));
            }
        };
        if let Some(id) = catalog::recoveries::live_on(&tx, &on)? {
            return Err(EngineError::conflict(format!(
                "recovery {id} serves {on} already"
            )));
        }
        let filled = RecoveryRequest {
            on: Some(on),
            ..req.clone()
        };
        let id = catalog::recoveries::insert(&tx, &filled, (pid, &mount), &self.clock.rfc3339())?;
        tx.commit()?;
        drop(db);
        self.recovery(id)
    }

    /// One recovery.
    pub fn recovery(&self, id: u64) -> R<Recovery> {
        catalog::recoveries::get(&self.db(), id)?
            .ok_or_else(|| EngineError::not_found("recovery", id))
    }

    /// The newest recoveries.
    pub fn recoveries(&self, limit: u32) -> R<Vec<Recovery>> {
        Ok(catalog::recoveries::newest(&self.db(), limit)?)
    }

    /// Move recovery `id`'s VM to `m.to` (a directory in one of its
    /// proxy's datastores) while it runs.
    pub fn migrate_recovery(&self, id: u64, m: &RecoveryMigrate) -> R<Recovery> {
        if !matches!(m.format.as_str(), "raw" | "qcow2") {
            return Err(EngineError::bad(format!(
                "format {:?}: raw or qcow2",
                m.format
            )));
        }
        if !m.to.starts_with('/') {
            return Err(EngineError::bad(format!(
                "{:?}: give an absolute directory in one of the proxy's datastores",
                m.to
            )));
        }
        let db = self.db();
        let r = catalog::recoveries::get(&db, id)?
            .ok_or_else(|| EngineError::not_found("recovery", id))?;
        if r.state != "serving" || r.pending.is_some() {
            return Err(EngineError::conflict(format!(
                "recovery {id} is {}{}: only a serving recovery migrates",
                r.state,
                r.pending
                    .as_deref()
                    .map(|p| format!(" ({p} asked)"))
                    .unwrap_or_default()
            )));
        }
        catalog::recoveries::set_pending(&db, id, RecoveryAction::Migrate, Some(m))?;
        drop(db);
        self.recovery(id)
    }

    /// Power recovery `id`'s VM off and drop its writes.
    pub fn discard_recovery(&self, id: u64) -> R<Recovery> {
        let db = self.db();
        let r = catalog::recoveries::get(&db, id)?
            .ok_or_else(|| EngineError::not_found("recovery", id))?;
        match r.state.as_str() {
            "queued" => {
                catalog::recoveries::end(&db, id, "discarded", &self.clock.rfc3339())?;
            }
            "starting" | "serving" => {
                catalog::recoveries::set_pending(&db, id, RecoveryAction::Discard, None)?;
            }
            s => {
                return Err(EngineError::conflict(format!(
                    "recovery {id} is {s}: {}",
                    if s == "migrating" {
                        "wait for its migration"
                    } else {
                        "it has ended"
                    }
                )));
            }
        }
        drop(db);
        self.recovery(id)
    }
}
