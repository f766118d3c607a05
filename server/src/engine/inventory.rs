//! The inventory: API tokens, hosts and their enrollment, proxies and
//! repositories.
//!
//! Invariant: a host's certificate is honoured only while the host is in
//! the inventory (looked up by fingerprint on every agent call), and an
//! enrollment secret works once, before it expires.

use super::*;

impl Engine {
    // ---- authentication ----

    /// Create the first API token (`admin`) if there is none; returns it
    /// when created.
    pub fn bootstrap_token(&self) -> R<Option<String>> {
        let db = self.db();
        let n: i64 = db.query_row("SELECT count(*) FROM api_tokens", [], |r| r.get(0))?;
        if n > 0 {
            return Ok(None);
        }
        let t = format!(
            "dmt1.{}",
            pki::random_hex(24).map_err(EngineError::internal)?
        );
        db.execute(
            "INSERT INTO api_tokens(name, hash, created) VALUES ('admin', ?1, ?2)",
            params![pki::fingerprint(t.as_bytes()), now()],
        )?;
        Ok(Some(t))
    }

    /// Check a bearer token.
    pub fn check_token(&self, token: &str) -> R<()> {
        let found: Option<i64> = self
            .db()
            .query_row(
                "SELECT id FROM api_tokens WHERE hash = ?1",
                [pki::fingerprint(token.as_bytes())],
                |r| r.get(0),
            )
            .optional()?;
        found
            .map(|_| ())
            .ok_or_else(|| EngineError::unauthorized("the API token is not valid"))
    }

    /// The host a client certificate was issued to (by fingerprint).
    pub fn host_of_cert(&self, fingerprint: &str) -> R<(i64, String)> {
        self.db()
            .query_row(
                "SELECT id, name FROM hosts WHERE cert_fingerprint = ?1",
                [fingerprint],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?
            .ok_or_else(|| {
                EngineError::unauthorized(
                    "this certificate belongs to no host of this server (removed, or from another installation)",
                )
            })
    }

    // ---- hosts and enrollment ----

    /// Add a managed host; returns its one-time enrollment token.
    pub fn add_host(&self, h: &NewHost) -> R<HostAdded> {
        check_name("host", &h.name)?;
        if h.name == BUILTIN {
            return Err(EngineError::bad(
                "the name 'builtin' is the server's own proxy",
            ));
        }
        for a in &h.addresses {
            if a.is_empty()
                || a.len() > 253
                || a.contains(['/', ' ', ':']) && a.parse::<std::net::IpAddr>().is_err()
            {
                return Err(EngineError::bad(format!(
                    "address {a:?} is not a host name or IP address"
                )));
            }
        }
        let secret = pki::random_hex(24).map_err(EngineError::internal)?;
        let expires = chrono::Utc::now()
            + chrono::Duration::from_std(self.timing.enroll_ttl).unwrap_or_default();
        let expires = expires.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let created = now();
        let roles = crate::deploy::normal_roles(&h.roles);
        self.db()
            .execute(
                "INSERT INTO hosts(name, addresses, enroll_hash, enroll_expires, created, roles) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    h.name,
                    serde_json::to_string(&h.addresses)?,
                    pki::fingerprint(secret.as_bytes()),
                    expires,
                    created,
                    serde_json::to_string(&roles)?
                ],
            )
            .map_err(|e| match EngineError::from(e) {
                e if e.kind == ErrorKind::Conflict => EngineError::conflict(format!("a host named {} exists", h.name)),
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
                installer: None,
            },
            enrollment_token: token.to_string(),
            expires,
        })
    }

    /// Every host.
    pub fn hosts(&self) -> R<Vec<Host>> {
        let db = self.db();
        let mut st = db.prepare(&format!(
            "SELECT {} FROM hosts WHERE builtin = 0 ORDER BY name",
            crate::deploy::HOST_COLUMNS
        ))?;
        let rows = st.query_map([], crate::deploy::host_row)?;
        rows.map(|r| r?.into_host()).collect()
    }

    /// Remove a host: its certificate stops working at once and its
    /// proxy's tasks are re-queued.
    pub fn remove_host(&self, name: &str) -> R<()> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let id = Self::host_id(&tx, name)?;
        let proxy = Self::proxy_id(&tx, id)?;
        if let Some(p) = proxy {
            requeue_proxy_tasks(&tx, p, &format!("host {name} was removed"))?;
        }
        tx.execute("DELETE FROM hosts WHERE id = ?1", [id])?;
        tx.commit()?;
        Ok(())
    }

    /// A host enrolls with its one-time secret and CSR.
    pub fn enroll(&self, req: &EnrollRequest) -> R<Enrolled> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let row: Option<(i64, String, String, String)> = tx
            .query_row(
                "SELECT id, name, addresses, enroll_expires FROM hosts WHERE enroll_hash = ?1",
                [pki::fingerprint(req.secret.as_bytes())],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()?;
        let Some((id, name, addrs, expires)) = row else {
            return Err(EngineError::unauthorized(
                "the enrollment token is not valid (already used, or the host was removed)",
            ));
        };
        let exp = chrono::DateTime::parse_from_rfc3339(&expires).map_err(EngineError::internal)?;
        if exp < chrono::Utc::now() {
            return Err(EngineError::unauthorized(format!(
                "the enrollment token of host {name} expired at {expires}; add the host again"
            )));
        }
        let addresses: Vec<String> = serde_json::from_str(&addrs)?;
        let mut names = addresses.clone();
        names.push(name.clone());
        let cert = self
            .ca
            .sign_csr(&req.csr, &name, &names)
            .map_err(|e| EngineError::bad(e.to_string()))?;
        let fp = pki::fingerprint(&pki::cert_der_from_pem(&cert).map_err(EngineError::internal)?);
        tx.execute(
            "UPDATE hosts SET cert_fingerprint = ?1, enroll_hash = NULL, enroll_expires = NULL WHERE id = ?2",
            params![fp, id],
        )?;
        tx.commit()?;
        tracing::info!("host {name} enrolled");
        Ok(Enrolled {
            host: name,
            cert,
            ca: self.ca.cert_pem().to_string(),
        })
    }

    /// The identity of the server's built-in proxy (issued afresh at each
    /// start; the old one stops working).
    pub fn builtin_identity(&self, names: &[String]) -> R<Identity> {
        let id = self
            .ca
            .issue(BUILTIN, names)
            .map_err(EngineError::internal)?;
        let fp = id.fingerprint().map_err(EngineError::internal)?;
        let db = self.db();
        db.execute(
            "INSERT INTO hosts(name, builtin, created) VALUES (?1, 1, ?2) ON CONFLICT(name) DO NOTHING",
            params![BUILTIN, now()],
        )?;
        db.execute(
            "UPDATE hosts SET cert_fingerprint = ?1 WHERE name = ?2",
            params![fp, BUILTIN],
        )?;
        Ok(id)
    }

    // ---- proxies ----

    /// Every proxy.
    pub fn proxies(&self) -> R<Vec<Proxy>> {
        let db = self.db();
        let running = running_counts(&db)?;
        let mut st = db.prepare(
            "SELECT p.id, h.name, p.slots, p.cores, p.modes, p.site, p.disabled, p.state, p.datastores, p.version, p.last_seen
             FROM proxies p JOIN hosts h ON h.id = p.host_id ORDER BY h.builtin, h.name",
        )?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Option<u32>>(2)?,
                r.get::<_, u32>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, Option<String>>(5)?,
                r.get::<_, bool>(6)?,
                r.get::<_, String>(7)?,
                r.get::<_, String>(8)?,
                r.get::<_, String>(9)?,
                r.get::<_, Option<String>>(10)?,
            ))
        })?;
        rows.map(|r| {
            let (id, name, slots, cores, modes, site, disabled, state, ds, version, last_seen) = r?;
            Ok(Proxy {
                name,
                slots: effective_slots(slots, cores),
                modes: serde_json::from_str(&modes)?,
                site,
                state: if disabled {
                    ProxyState::Disabled
                } else if state == "dead" {
                    ProxyState::Dead
                } else {
                    ProxyState::Online
                },
                running: running.get(&id).copied().unwrap_or(0),
                datastores: serde_json::from_str(&ds)?,
                version,
                last_seen,
            })
        })
        .collect()
    }

    /// Change a proxy's settings.
    pub fn patch_proxy(&self, name: &str, p: &ProxyPatch) -> R<Proxy> {
        {
            let db = self.db();
            let id: i64 = db
                .query_row(
                    "SELECT p.id FROM proxies p JOIN hosts h ON h.id = p.host_id WHERE h.name = ?1",
                    [name],
                    |r| r.get(0),
                )
                .optional()?
                .ok_or_else(|| EngineError::not_found("proxy", name))?;
            if let Some(s) = p.slots {
                if !(1..=1024).contains(&s) {
                    return Err(EngineError::bad(format!("slots must be 1-1024, not {s}")));
                }
                db.execute(
                    "UPDATE proxies SET slots = ?1 WHERE id = ?2",
                    params![s, id],
                )?;
            }
            if let Some(m) = &p.modes {
                ModeSet::from_names(m).map_err(|e| EngineError::bad(e.to_string()))?;
                db.execute(
                    "UPDATE proxies SET modes = ?1 WHERE id = ?2",
                    params![serde_json::to_string(m)?, id],
                )?;
            }
            if let Some(s) = &p.site {
                db.execute("UPDATE proxies SET site = ?1 WHERE id = ?2", params![s, id])?;
            }
            if let Some(d) = p.disabled {
                db.execute(
                    "UPDATE proxies SET disabled = ?1 WHERE id = ?2",
                    params![d, id],
                )?;
            }
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
            let builtin: Option<bool> = db
                .query_row("SELECT builtin FROM hosts WHERE name = ?1", [p], |x| {
                    x.get(0)
                })
                .optional()?;
            match builtin {
                None => return Err(EngineError::bad(format!("no host or proxy named {p}"))),
                Some(true) => {
                    return Err(EngineError::bad(
                        "the built-in proxy runs no repository service; add the repository without a proxy (a path the server sees)",
                    ));
                }
                Some(false) => {}
            }
        }
        db.execute(
            "INSERT INTO repositories(name, path, proxy) VALUES (?1, ?2, ?3)",
            params![r.name, r.path, r.proxy],
        )
        .map_err(|e| match EngineError::from(e) {
            e if e.kind == ErrorKind::Conflict => {
                EngineError::conflict(format!("a repository named {} exists", r.name))
            }
            e => e,
        })?;
        Ok(r.clone())
    }

    /// Every repository.
    pub fn repositories(&self) -> R<Vec<api::Repository>> {
        let db = self.db();
        let mut st = db.prepare("SELECT name, path, proxy FROM repositories ORDER BY name")?;
        let rows = st.query_map([], |r| {
            Ok(api::Repository {
                name: r.get(0)?,
                path: r.get(1)?,
                proxy: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}
