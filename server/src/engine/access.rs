//! Who may call: API tokens (roles, expiry, rotation), the certificates
//! of hosts (and their renewal), and the audit log of what callers
//! changed.
//!
//! Invariant: checking a token or a certificate reads an in-memory copy
//! of the credentials (rebuilt after every change to them), never the
//! catalog: unauthenticated requests do not wait for the catalog's lock,
//! and do not compete with the scheduler for it.

use super::*;
use datamover_control::api::{ApiToken, AuditEntry, NewToken, TokenCreated, TokenRole};

/// A caller with a valid API token.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The token's name.
    pub name: String,
    /// What it may do.
    pub role: TokenRole,
}

/// The credentials as last read from the catalog.
#[derive(Debug, Default)]
pub(crate) struct Access {
    /// Token hash → (name, role, expiry).
    tokens: HashMap<String, (String, TokenRole, Option<chrono::DateTime<chrono::Utc>>)>,
    /// Certificate fingerprint → host.
    certs: HashMap<String, (HostId, String)>,
}

/// Default lifetime of a new API token.
pub const TOKEN_DAYS: u32 = 90;

impl Engine {
    /// Read the credentials from the catalog again.
    pub(crate) fn reload_access(&self) -> R<()> {
        let (tokens, certs) = {
            let db = self.db();
            (
                catalog::tokens::list(&db)?,
                catalog::hosts::certificates(&db)?,
            )
        };
        let mut a = Access::default();
        for t in tokens {
            let exp = match &t.token.expires {
                Some(e) => Some(
                    chrono::DateTime::parse_from_rfc3339(e)
                        .map_err(EngineError::internal)?
                        .with_timezone(&chrono::Utc),
                ),
                None => None,
            };
            a.tokens.insert(t.hash, (t.token.name, t.token.role, exp));
        }
        for (fp, id, name) in certs {
            a.certs.insert(fp, (id, name));
        }
        *self.access.write().unwrap_or_else(|p| p.into_inner()) = Some(a);
        Ok(())
    }

    fn with_access<T>(&self, f: impl FnOnce(&Access) -> T) -> R<T> {
        if self
            .access
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_none()
        {
            self.reload_access()?;
        }
        let a = self.access.read().unwrap_or_else(|p| p.into_inner());
        Ok(f(a.as_ref().unwrap_or(&Access::default())))
    }

    /// Create the first API token (`admin`, never expiring until it is
    /// rotated) if there is none; returns its secret when created.
    pub fn bootstrap_token(&self) -> R<Option<String>> {
        if catalog::tokens::count(&self.db())? > 0 {
            return Ok(None);
        }
        let secret = new_secret()?;
        let t = ApiToken {
            name: "admin".into(),
            role: TokenRole::Admin,
            created: self.clock.rfc3339(),
            expires: None,
        };
        catalog::tokens::insert(&self.db(), &t, &pki::fingerprint(secret.as_bytes()))?;
        self.reload_access()?;
        Ok(Some(secret))
    }

    /// Check a bearer token: who it is, if it is valid and not expired.
    pub fn check_token(&self, token: &str) -> R<Caller> {
        let hash = pki::fingerprint(token.as_bytes());
        let now = self.clock.now();
        self.with_access(|a| match a.tokens.get(&hash) {
            Some((name, _, Some(exp))) if *exp <= now => Err(EngineError::unauthorized(format!(
                "the API token {name} expired at {}",
                exp.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            ))),
            Some((name, role, _)) => Ok(Caller {
                name: name.clone(),
                role: *role,
            }),
            None => Err(EngineError::unauthorized("the API token is not valid")),
        })?
    }

    /// The host a client certificate was issued to (by fingerprint).
    pub fn host_of_cert(&self, fingerprint: &str) -> R<(HostId, String)> {
        self.with_access(|a| a.certs.get(fingerprint).cloned())?
            .ok_or_else(|| {
                EngineError::unauthorized(
                    "this certificate belongs to no host of this server (removed, or from another installation)",
                )
            })
    }

    /// A host's certificate for the key of `csr`, for the host lifetime:
    /// valid for its name and addresses as a client and a server (the
    /// built-in proxy: `localhost`, as a client only). Returns the PEM and
    /// its fingerprint.
    pub(crate) fn sign_host_csr(
        &self,
        csr: &str,
        name: &str,
        addresses: &[String],
        builtin: bool,
    ) -> R<(String, String)> {
        let (names, usage) = if builtin {
            (vec!["localhost".to_string()], crate::ca::Usage::Client)
        } else {
            let mut n = addresses.to_vec();
            n.push(name.to_string());
            (n, crate::ca::Usage::Host)
        };
        let cert = self
            .ca
            .sign_csr(csr, name, &names, usage, Some(self.timing.host_cert))
            .map_err(|e| EngineError::bad(e.to_string()))?;
        let fp = pki::fingerprint(&pki::cert_der_from_pem(&cert).map_err(EngineError::internal)?);
        Ok((cert, fp))
    }

    /// A new certificate for `host`, for the key of `csr`: the names and
    /// usages come from the inventory, as at enrollment. The current one
    /// stays good as the previous one until the next renewal (or its own
    /// end), so a host whose answer was lost is not locked out.
    pub fn renew(&self, host: HostId, csr: &str) -> R<String> {
        let cert = {
            let mut db = self.db();
            let tx = db.transaction()?;
            let h = catalog::hosts::get(&tx, host)?;
            let builtin = catalog::hosts::is_builtin(&tx, &h.name)?.unwrap_or(false);
            let (cert, fp) = self.sign_host_csr(csr, &h.name, &h.addresses, builtin)?;
            catalog::hosts::renew_certificate(&tx, host, &fp, &cert)?;
            tx.commit()?;
            tracing::info!("host {}: certificate renewed", h.name);
            cert
        };
        self.reload_access()?;
        Ok(cert)
    }

    /// Every API token (never their secrets).
    pub fn tokens(&self) -> R<Vec<ApiToken>> {
        Ok(catalog::tokens::list(&self.db())?
            .into_iter()
            .map(|t| t.token)
            .collect())
    }

    /// Make an API token; its secret is in the answer and nowhere else.
    pub fn create_token(&self, t: &NewToken) -> R<TokenCreated> {
        check_name("token", &t.name)?;
        let days = t.expires_days.unwrap_or(TOKEN_DAYS);
        if !(1..=3650).contains(&days) {
            return Err(EngineError::bad("expires_days must be 1-3650"));
        }
        let secret = new_secret()?;
        let expires = self.clock.now() + chrono::Duration::days(i64::from(days));
        let token = ApiToken {
            name: t.name.clone(),
            role: t.role,
            created: self.clock.rfc3339(),
            expires: Some(expires.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
        };
        catalog::tokens::insert(&self.db(), &token, &pki::fingerprint(secret.as_bytes())).map_err(
            |e| match EngineError::from(e) {
                e if e.kind == ErrorKind::Conflict => {
                    EngineError::conflict(format!("a token named {} exists", t.name))
                }
                e => e,
            },
        )?;
        self.reload_access()?;
        Ok(TokenCreated { token, secret })
    }

    /// Revoke (delete) the token named `name`: it stops working at once.
    /// The last administrator token cannot be revoked (nobody could make
    /// another).
    pub fn revoke_token(&self, name: &str) -> R<()> {
        {
            let db = self.db();
            let all = catalog::tokens::list(&db)?;
            let now = self.clock.now();
            let live_admin = |t: &ApiToken| {
                t.role == TokenRole::Admin
                    && t.expires.as_deref().is_none_or(|e| {
                        chrono::DateTime::parse_from_rfc3339(e).is_ok_and(|e| e > now)
                    })
            };
            let Some(me) = all.iter().find(|t| t.token.name == name) else {
                return Err(EngineError::not_found("token", name));
            };
            if live_admin(&me.token) && all.iter().filter(|t| live_admin(&t.token)).count() == 1 {
                return Err(EngineError::conflict(
                    "this is the last administrator token: create another before revoking it",
                ));
            }
            catalog::tokens::delete(&db, name)?;
        }
        self.reload_access()
    }

    /// Record what `who` did (`action`: method and path) and how it ended.
    pub fn audit(&self, who: &str, action: &str, status: u16) -> R<()> {
        Ok(catalog::audit::insert(
            &self.db(),
            &self.clock.rfc3339(),
            who,
            action,
            status,
        )?)
    }

    /// The newest `limit` entries of the audit log, newest first.
    pub fn audit_log(&self, limit: u32) -> R<Vec<AuditEntry>> {
        Ok(catalog::audit::list(&self.db(), limit)?)
    }
}

fn new_secret() -> R<String> {
    Ok(format!(
        "dmt1.{}",
        pki::random_hex(24).map_err(EngineError::internal)?
    ))
}
