//! Deployment: the roles of managed hosts, their installers' polls, and
//! the component packages the server hands out.
//!
//! A host given the `proxy` role gets, in the answer to its installer's
//! next poll, the SHA-256 and size of the server's proxy package; the
//! installer downloads it from `/agent/v1/components/proxy` (mutual TLS,
//! only for hosts with the role), checks it, runs it, and does the same
//! again when the package's checksum changes (an upgrade). Taking the
//! role away re-queues the proxy's tasks, forgets the proxy, refuses its
//! heartbeats, and the installer stops and deletes it.
//!
//! The package is a file on the server (`--proxy-package`, by default the
//! `dm-proxy` next to `dm-server`); its checksum is taken again whenever
//! its size or modification time changes.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::SystemTime;

use datamover_control::api::{
    AGENT, ComponentOrder, Host, HostPatch, HostRole, InstallerOrders, InstallerReport,
};
use rusqlite::Connection;

use crate::catalog::{self, ids::HostId};

use crate::engine::{Engine, EngineError, R, requeue_proxy_tasks};

/// The packages of the components the server hands out.
#[derive(Debug, Default)]
pub struct Packages {
    proxy: Option<PathBuf>,
    /// The proxy package as last hashed, with the file's mtime then.
    cache: Mutex<Option<(SystemTime, Package)>>,
}

/// A package as it is now.
#[derive(Debug, Clone)]
pub struct Package {
    /// The file.
    pub path: PathBuf,
    /// Its size.
    pub size: u64,
    /// Its SHA-256 (hex).
    pub sha256: String,
}

impl Packages {
    /// Packages with the proxy's at `proxy`.
    pub fn new(proxy: Option<PathBuf>) -> Packages {
        Packages {
            proxy,
            cache: Mutex::new(None),
        }
    }

    /// The package of `component`, with a checksum of its current bytes.
    pub fn get(&self, component: &str) -> R<Package> {
        if component != datamover_control::api::COMPONENT_PROXY {
            return Err(EngineError::not_found("component", component));
        }
        let path = self.proxy.clone().ok_or_else(|| {
            EngineError::unavailable(
                "this server hands out no proxy package (start it with --proxy-package)",
            )
        })?;
        let unavailable = |e: std::io::Error| {
            EngineError::unavailable(format!("proxy package {}: {e}", path.display()))
        };
        let meta = std::fs::metadata(&path).map_err(unavailable)?;
        let modified = meta.modified().map_err(unavailable)?;
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, p)) = cache
            .as_ref()
            .filter(|(m, p)| p.size == meta.len() && *m == modified)
        {
            return Ok(p.clone());
        }
        let (size, sha256) = datamover_control::pki::sha256_file(&path).map_err(unavailable)?;
        tracing::info!(
            "proxy package {}: {size} bytes, SHA-256 {sha256}",
            path.display()
        );
        let p = Package { path, size, sha256 };
        *cache = Some((modified, p.clone()));
        Ok(p)
    }
}

/// Roles sorted, each once.
pub fn normal_roles(roles: &[HostRole]) -> Vec<HostRole> {
    let mut v = roles.to_vec();
    v.sort();
    v.dedup();
    v
}

/// A host whose installer manages it runs a proxy only with the proxy
/// role; a proxy started by hand (no installer) always may.
pub fn may_run_proxy(db: &Connection, host: HostId) -> R<()> {
    if !catalog::hosts::may_run_proxy(db, host)? {
        return Err(EngineError::forbidden(
            "this host does not have the proxy role (dm host set NAME --roles proxy); it gets no tasks",
        ));
    }
    Ok(())
}

impl Engine {
    /// Change a host's roles. Taking the proxy role away re-queues its
    /// proxy's tasks and forgets the proxy.
    pub fn patch_host(&self, name: &str, p: &HostPatch) -> R<Host> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let id = Self::host_id(&tx, name)?;
        if let Some(roles) = &p.roles {
            let roles = normal_roles(roles);
            if roles.contains(&HostRole::Proxy) {
                // Fail now, not at the installer's next poll.
                self.packages.get(HostRole::Proxy.component())?;
            } else {
                if let Some(pid) = Self::proxy_id(&tx, id)? {
                    requeue_proxy_tasks(
                        &*self.clock,
                        &tx,
                        pid,
                        &format!("the proxy role was taken from host {name}"),
                    )?;
                    catalog::proxies::delete(&tx, pid)?;
                }
            }
            catalog::hosts::set_roles(&tx, id, &roles)?;
        }
        if let Some(h) = &p.hypervisor {
            let h = crate::engine::inventory::check_hypervisor(h)?;
            catalog::hosts::set_hypervisor(&tx, id, h.as_deref())?;
        }
        if let Some(ds) = &p.datastores {
            let ds = crate::engine::inventory::check_datastores(ds)?;
            catalog::hosts::set_datastores(&tx, id, &ds)?;
            // Narrowed at once, not at the proxy's next heartbeat.
            if let Some(pid) = Self::proxy_id(&tx, id)? {
                let reported = catalog::proxies::datastores(&tx, pid)?;
                let (kept, _) = crate::engine::inventory::within_allowed(&ds, &reported);
                catalog::proxies::set_datastores(&tx, pid, &kept)?;
            }
        }
        let h = catalog::hosts::get(&tx, id)?;
        tx.commit()?;
        Ok(h)
    }

    /// An installer's poll: record its report, answer with the components
    /// its host's roles need.
    pub fn installer_poll(&self, host: HostId, rep: &InstallerReport) -> R<InstallerOrders> {
        let roles = {
            let db = self.db();
            catalog::hosts::set_installer(&db, host, rep, &self.clock.rfc3339())?;
            catalog::hosts::roles(&db, host)?.0
        };
        let mut components = Vec::new();
        for r in roles {
            let pkg = self.packages.get(r.component())?;
            components.push(ComponentOrder {
                name: r.component().into(),
                sha256: pkg.sha256,
                size: pkg.size,
                url: format!("{AGENT}/components/{}", r.component()),
            });
        }
        Ok(InstallerOrders {
            interval_ms: self.timing().heartbeat_ms(),
            components,
        })
    }

    /// The package of `component` for `host`, which must have a role that
    /// needs it.
    pub fn component_for(&self, host: HostId, component: &str) -> R<Package> {
        let (roles, _) = catalog::hosts::roles(&self.db(), host)?;
        if !roles.iter().any(|r| r.component() == component) {
            return Err(EngineError::forbidden(format!(
                "this host has no role that needs the {component} component"
            )));
        }
        self.packages.get(component)
    }
}
