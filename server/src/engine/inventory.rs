//! The inventory: hosts and their enrollment, proxies and repositories
//! (tokens and certificates as credentials: `access`).
//!
//! Invariant: a host's certificate is honoured only while the host is in
//! the inventory, and an enrollment secret works once, before it expires.

use super::*;

impl Engine {
    // ---- hosts and enrollment ----

    /// Add a managed host; returns its one-time enrollment token.
    pub fn add_host(&self, h: &NewHost) -> R<HostAdded> {
        check_name("host", &h.name)?;
        if h.name == BUILTIN {
            return Err(EngineError::bad(
                "the name 'builtin' is the server's own proxy",
            ));
        }
        self.check_certificate_names(&h.name, &h.addresses)?;
        let secret = pki::random_hex(24).map_err(EngineError::internal)?;
        let expires = self.clock.now()
            + chrono::Duration::from_std(self.timing.enroll_ttl).unwrap_or_default();
        let expires = expires.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let created = self.clock.rfc3339();
        let roles = crate::deploy::normal_roles(&h.roles);
        let datastores = check_datastores(&h.datastores)?;
        let hypervisor = match &h.hypervisor {
            Some(u) => check_hypervisor(u)?,
            None => None,
        };
        let row = catalog::hosts::NewHostRow {
            name: &h.name,
            addresses: &h.addresses,
            enroll_hash: &pki::fingerprint(secret.as_bytes()),
            enroll_expires: &expires,
            created: &created,
            roles: &roles,
            datastores: &datastores,
            hypervisor: hypervisor.as_deref(),
        };
        catalog::hosts::insert(&self.db(), &row).map_err(|e| match EngineError::from(e) {
            e if e.kind == ErrorKind::Conflict => {
                EngineError::conflict(format!("a host named {} exists", h.name))
            }
            e => e,
        })?;
        let token = EnrollmentToken {
            secret,
            ca_fingerprint: self.ca.fingerprint(),
        };
        Ok(HostAdded {
            host: Host {
                name: h.name.clone(),
                addresses: h.addresses.clone(),
                enrolled: false,
                created,
                roles,
                datastores,
                cert_expires: None,
                installer: None,
                hypervisor,
            },
            enrollment_token: token.to_string(),
            expires,
        })
    }

    /// The VM inventory: what each hypervisor's proxy last reported.
    pub fn vms(&self) -> R<Vec<datamover_control::api::InventoryVm>> {
        Ok(catalog::vms::list(&self.db())?)
    }

    /// Make the built-in proxy's host a hypervisor (the server's
    /// `--hypervisor`), or not.
    pub fn set_builtin_hypervisor(&self, uri: Option<&str>) -> R<()> {
        let uri = match uri {
            Some(u) => check_hypervisor(u)?,
            None => None,
        };
        Ok(catalog::hosts::set_builtin_hypervisor(
            &self.db(),
            uri.as_deref(),
        )?)
    }

    /// Every host.
    pub fn hosts(&self) -> R<Vec<Host>> {
        Ok(catalog::hosts::list(&self.db())?)
    }

    /// Remove a host: its certificate stops working at once and its
    /// proxy's tasks are re-queued.
    pub fn remove_host(&self, name: &str) -> R<()> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let id = Self::host_id(&tx, name)?;
        if let Some(p) = catalog::proxies::id_of_host(&tx, id)? {
            requeue_proxy_tasks(&*self.clock, &tx, p, &format!("host {name} was removed"))?;
        }
        catalog::hosts::delete(&tx, id)?;
        tx.commit()?;
        drop(db);
        self.reload_access()?;
        Ok(())
    }

    /// A host enrolls with its one-time secret and CSR.
    pub fn enroll(&self, req: &EnrollRequest) -> R<Enrolled> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let row = catalog::hosts::enrollee(&tx, &pki::fingerprint(req.secret.as_bytes()))?;
        let Some(catalog::hosts::Enrollee {
            id,
            name,
            addresses,
            expires,
        }) = row
        else {
            return Err(EngineError::unauthorized(
                "the enrollment token is not valid (already used, or the host was removed)",
            ));
        };
        let exp = chrono::DateTime::parse_from_rfc3339(&expires).map_err(EngineError::internal)?;
        if exp < self.clock.now() {
            return Err(EngineError::unauthorized(format!(
                "the enrollment token of host {name} expired at {expires}; add the host again"
            )));
        }
        let (cert, fp) = self.sign_host_csr(&req.csr, &name, &addresses, false)?;
        catalog::hosts::set_certificate(&tx, id, &fp, &cert)?;
        tx.commit()?;
        drop(db);
        self.reload_access()?;
        tracing::info!("host {name} enrolled");
        Ok(Enrolled {
            host: name,
            cert,
            ca: self.ca.cert_pem().to_string(),
        })
    }

    /// A host's name and addresses go into its certificate, which other
    /// hosts trust for exactly those names: each must be a plain host name
    /// or a unicast IP address, no wildcard, and none may be the server's
    /// (its certificate's names, where the built-in proxy and every host
    /// reach it) or another host's.
    fn check_certificate_names(&self, name: &str, addresses: &[String]) -> R<()> {
        let server = self.server_names();
        let db = self.db();
        let (taken_names, taken_addresses) = catalog::hosts::all_names(&db)?;
        let names = std::iter::once(name).chain(addresses.iter().map(String::as_str));
        for (i, a) in names.enumerate() {
            // A second host of the same name is the catalog's conflict.
            let other_names: &[String] = if i == 0 { &[] } else { &taken_names };
            let lower = a.to_ascii_lowercase();
            let ip = a.parse::<std::net::IpAddr>().ok();
            let bad = if a.is_empty() || a.len() > 253 {
                Some("is not a host name or IP address")
            } else if a.contains('*') {
                Some("is a wildcard")
            } else if ip.is_none()
                && !a
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
            {
                Some("is not a host name or IP address")
            } else if ip.is_some_and(|i| i.is_unspecified() || i.is_multicast())
                || a == "255.255.255.255"
            {
                Some("is not the address of one host")
            } else if server.contains(&lower) || lower == "localhost" {
                Some("belongs to the server (its certificate names it)")
            } else if taken_addresses
                .iter()
                .chain(other_names)
                .any(|t| t.eq_ignore_ascii_case(a))
            {
                Some("belongs to another host")
            } else {
                None
            };
            if let Some(why) = bad {
                return Err(EngineError::bad(format!(
                    "{a:?} {why}: a host's certificate is valid for its name and addresses, so each must be its own"
                )));
            }
        }
        Ok(())
    }

    /// The identity of the server's built-in proxy (issued afresh at each
    /// start; the old one stops working).
    pub fn builtin_identity(&self, names: &[String]) -> R<Identity> {
        let id = self
            .ca
            .issue_for(
                BUILTIN,
                names,
                crate::ca::Usage::Client,
                Some(self.timing.host_cert),
            )
            .map_err(EngineError::internal)?;
        let fp = id.fingerprint().map_err(EngineError::internal)?;
        catalog::hosts::set_builtin_certificate(
            &self.db(),
            BUILTIN,
            &self.clock.rfc3339(),
            &fp,
            &id.cert_pem,
        )?;
        self.reload_access()?;
        Ok(id)
    }

    /// Set the datastores of the built-in proxy (the server's
    /// `--datastore`, given by the administrator who starts it).
    pub fn set_builtin_datastores(&self, ds: &[String]) -> R<()> {
        let ds = check_datastores(ds)?;
        catalog::hosts::set_builtin_datastores(&self.db(), &ds)?;
        Ok(())
    }

    // ---- proxies ----

    /// Every proxy.
    pub fn proxies(&self) -> R<Vec<Proxy>> {
        let db = self.db();
        let running = running_counts(&db)?;
        let proxies = catalog::proxies::list(&db)?;
        Ok(proxies
            .into_iter()
            .map(|p| Proxy {
                slots: effective_slots(p.slots, p.cores),
                state: if p.disabled {
                    ProxyState::Disabled
                } else if p.state == "dead" {
                    ProxyState::Dead
                } else {
                    ProxyState::Online
                },
                running: running.get(&p.id).copied().unwrap_or(0),
                name: p.name,
                modes: p.modes,
                site: p.site,
                datastores: p.datastores,
                version: p.version,
                last_seen: p.last_seen,
            })
            .collect())
    }

    /// Change a proxy's settings.
    pub fn patch_proxy(&self, name: &str, p: &ProxyPatch) -> R<Proxy> {
        {
            let db = self.db();
            let id = catalog::proxies::id_by_name(&db, name)?
                .ok_or_else(|| EngineError::not_found("proxy", name))?;
            if let Some(s) = p.slots
                && !(1..=1024).contains(&s)
            {
                return Err(EngineError::bad(format!("slots must be 1-1024, not {s}")));
            }
            if let Some(m) = &p.modes {
                ModeSet::from_names(m).map_err(|e| EngineError::bad(e.to_string()))?;
            }
            let settings = catalog::proxies::Settings {
                slots: p.slots,
                modes: p.modes.as_deref(),
                site: p.site.as_deref(),
                disabled: p.disabled,
            };
            catalog::proxies::update_settings(&db, id, &settings)?;
        }
        self.proxies()?
            .into_iter()
            .find(|x| x.name == name)
            .ok_or_else(|| EngineError::not_found("proxy", name))
    }

    // ---- repositories ----

    /// Add a repository.
    pub fn add_repository(&self, r: &api::Repository) -> R<api::Repository> {
        check_name("repository", &r.name)?;
        if !r.path.starts_with('/') {
            return Err(EngineError::bad(format!(
                "repository path {:?} must be absolute",
                r.path
            )));
        }
        let db = self.db();
        if let Some(p) = &r.proxy {
            match catalog::hosts::is_builtin(&db, p)? {
                None => return Err(EngineError::bad(format!("no host or proxy named {p}"))),
                Some(true) => {
                    return Err(EngineError::bad(
                        "the built-in proxy runs no repository service; add the repository without a proxy (a path the server sees)",
                    ));
                }
                Some(false) => {}
            }
        }
        catalog::repositories::insert(&db, r).map_err(|e| match EngineError::from(e) {
            e if e.kind == ErrorKind::Conflict => {
                EngineError::conflict(format!("a repository named {} exists", r.name))
            }
            e => e,
        })?;
        Ok(r.clone())
    }

    /// Every repository.
    pub fn repositories(&self) -> R<Vec<api::Repository>> {
        Ok(catalog::repositories::list(&self.db())?)
    }
}

/// The datastores a proxy reports, split into those under one the
/// administrator gave its host (used) and the others (refused): a proxy
/// may report fewer, never more.
pub(crate) fn within_allowed(
    allowed: &[String],
    reported: &[String],
) -> (Vec<String>, Vec<String>) {
    reported
        .iter()
        .cloned()
        .partition(|d| transports::mode::sees(allowed, d))
}

/// Datastores as the administrator gives them: absolute directories
/// without `.` or `..`, written the one normal way, without duplicates.
/// Whatever a proxy reports is kept only where it lies under one of
/// these, and the proxy itself resolves every task path (symlinks
/// included) against its own.
/// A hypervisor's libvirt connection URI (`""`: none): a URI libvirt
/// would take (`qemu:///system`, `qemu+ssh://host/system`, ...).
pub(crate) fn check_hypervisor(uri: &str) -> R<Option<String>> {
    if uri.is_empty() {
        return Ok(None);
    }
    let ok = uri.len() <= 512
        && uri.split_once("://").is_some_and(|(scheme, _)| {
            !scheme.is_empty()
                && scheme
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'-')
        })
        && !uri
            .chars()
            .any(|c| c.is_control() || c.is_whitespace() || c == '&');
    if !ok {
        return Err(EngineError::bad(format!(
            "hypervisor {uri:?}: give a libvirt connection URI, e.g. qemu:///system or qemu+ssh://kvm01/system"
        )));
    }
    Ok(Some(uri.to_string()))
}

pub(crate) fn check_datastores(ds: &[String]) -> R<Vec<String>> {
    use std::path::{Component, Path};
    let mut out = Vec::new();
    for d in ds {
        let p = Path::new(d);
        let normal = p.is_absolute()
            && p.components()
                .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
        if !normal || d.len() > 4096 {
            return Err(EngineError::bad(format!(
                "datastore {d:?} must be an absolute directory without . or .."
            )));
        }
        let d = p
            .components()
            .collect::<std::path::PathBuf>()
            .display()
            .to_string();
        if !out.contains(&d) {
            out.push(d);
        }
    }
    Ok(out)
}
