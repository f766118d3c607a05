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
    InstallerStatus,
};
use rusqlite::{Connection, params};

use crate::engine::{Engine, EngineError, R, now, requeue_proxy_tasks};

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

/// The columns [`host_row`] reads.
pub const HOST_COLUMNS: &str =
    "name, addresses, cert_fingerprint IS NOT NULL, created, roles, installer, installer_seen";

/// One row of `hosts` as read with [`HOST_COLUMNS`].
#[derive(Debug)]
pub struct HostRow {
    name: String,
    addresses: String,
    enrolled: bool,
    created: String,
    roles: String,
    installer: Option<String>,
    installer_seen: Option<String>,
}

/// Read a row selected with [`HOST_COLUMNS`].
pub fn host_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<HostRow> {
    Ok(HostRow {
        name: r.get(0)?,
        addresses: r.get(1)?,
        enrolled: r.get(2)?,
        created: r.get(3)?,
        roles: r.get(4)?,
        installer: r.get(5)?,
        installer_seen: r.get(6)?,
    })
}

impl HostRow {
    /// The API's view.
    pub fn into_host(self) -> R<Host> {
        let installer = match (self.installer, self.installer_seen) {
            (Some(rep), Some(seen)) => Some(InstallerStatus {
                last_seen: seen,
                report: serde_json::from_str(&rep)?,
            }),
            _ => None,
        };
        Ok(Host {
            name: self.name,
            addresses: serde_json::from_str(&self.addresses)?,
            enrolled: self.enrolled,
            created: self.created,
            roles: serde_json::from_str(&self.roles)?,
            installer,
        })
    }
}

fn roles_of(db: &Connection, host: i64) -> R<(Vec<HostRole>, bool)> {
    let (roles, installer): (String, Option<String>) = db.query_row(
        "SELECT roles, installer FROM hosts WHERE id = ?1",
        [host],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    Ok((serde_json::from_str(&roles)?, installer.is_some()))
}

/// A host whose installer manages it runs a proxy only with the proxy
/// role; a proxy started by hand (no installer) always may.
pub fn may_run_proxy(db: &Connection, host: i64) -> R<()> {
    let (roles, managed) = roles_of(db, host)?;
    if managed && !roles.contains(&HostRole::Proxy) {
        return Err(EngineError::forbidden(
            "this host does not have the proxy role (its installer removes the proxy)",
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
                        &tx,
                        pid,
                        &format!("the proxy role was taken from host {name}"),
                    )?;
                    tx.execute("DELETE FROM proxies WHERE id = ?1", [pid])?;
                }
            }
            tx.execute(
                "UPDATE hosts SET roles = ?1 WHERE id = ?2",
                params![serde_json::to_string(&roles)?, id],
            )?;
        }
        let h = tx
            .query_row(
                &format!("SELECT {HOST_COLUMNS} FROM hosts WHERE id = ?1"),
                [id],
                host_row,
            )?
            .into_host()?;
        tx.commit()?;
        Ok(h)
    }

    /// An installer's poll: record its report, answer with the components
    /// its host's roles need.
    pub fn installer_poll(&self, host: i64, rep: &InstallerReport) -> R<InstallerOrders> {
        let roles = {
            let db = self.db();
            db.execute(
                "UPDATE hosts SET installer = ?1, installer_seen = ?2 WHERE id = ?3",
                params![serde_json::to_string(rep)?, now(), host],
            )?;
            roles_of(&db, host)?.0
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
    pub fn component_for(&self, host: i64, component: &str) -> R<Package> {
        let (roles, _) = roles_of(&self.db(), host)?;
        if !roles.iter().any(|r| r.component() == component) {
            return Err(EngineError::forbidden(format!(
                "this host has no role that needs the {component} component"
            )));
        }
        self.packages.get(component)
    }
}
