//! `hosts`: managed hosts, their enrollment, certificates, roles and what
//! their installers last reported.
//!
//! Invariant: a host holds either a pending enrollment (hash and expiry)
//! or a certificate fingerprint, never both; the built-in host is never
//! listed nor found by name as a managed host.

use datamover_control::api::{Host, HostRole, InstallerReport, InstallerStatus};
use rusqlite::{Connection, OptionalExtension, Row, params};

use super::Q;
use super::ids::HostId;

const COLUMNS: &str = "name, addresses, cert_fingerprint IS NOT NULL, created, roles, installer, installer_seen, datastores, cert_pem, hypervisor";

fn host(r: &Row<'_>) -> rusqlite::Result<(Host, Option<String>, Option<String>)> {
    let addresses: String = r.get(1)?;
    let roles: String = r.get(4)?;
    let datastores: String = r.get(7)?;
    let bad = |i: usize| {
        move |e: serde_json::Error| {
            rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e))
        }
    };
    Ok((
        Host {
            name: r.get(0)?,
            addresses: serde_json::from_str(&addresses).map_err(bad(1))?,
            enrolled: r.get(2)?,
            created: r.get(3)?,
            roles: serde_json::from_str(&roles).map_err(bad(4))?,
            datastores: serde_json::from_str(&datastores).map_err(bad(7))?,
            cert_expires: r
                .get::<_, Option<String>>(8)?
                .and_then(|pem| datamover_control::pki::validity(&pem).ok())
                .and_then(|(_, end)| chrono::DateTime::from_timestamp(end, 0))
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
            installer: None,
            hypervisor: r.get(9)?,
        },
        r.get(5)?,
        r.get(6)?,
    ))
}

fn with_installer(row: (Host, Option<String>, Option<String>)) -> Q<Host> {
    let (mut h, report, seen) = row;
    if let (Some(rep), Some(last_seen)) = (report, seen) {
        h.installer = Some(InstallerStatus {
            last_seen,
            report: serde_json::from_str(&rep)?,
        });
    }
    Ok(h)
}

/// Every managed host, by name.
pub fn list(db: &Connection) -> Q<Vec<Host>> {
    let mut st = db.prepare(&format!(
        "SELECT {COLUMNS} FROM hosts WHERE builtin = 0 ORDER BY name"
    ))?;
    let rows = st.query_map([], host)?;
    rows.map(|r| with_installer(r?)).collect()
}

/// One host.
pub fn get(db: &Connection, id: HostId) -> Q<Host> {
    with_installer(db.query_row(
        &format!("SELECT {COLUMNS} FROM hosts WHERE id = ?1"),
        [id],
        host,
    )?)
}

/// The managed host named `name`.
pub fn id_by_name(db: &Connection, name: &str) -> Q<Option<HostId>> {
    Ok(db
        .query_row(
            "SELECT id FROM hosts WHERE name = ?1 AND builtin = 0",
            [name],
            |r| r.get(0),
        )
        .optional()?)
}

/// Whether the host (or built-in host) named `name` is the built-in one;
/// none: no such host.
pub fn is_builtin(db: &Connection, name: &str) -> Q<Option<bool>> {
    Ok(db
        .query_row("SELECT builtin FROM hosts WHERE name = ?1", [name], |x| {
            x.get(0)
        })
        .optional()?)
}

/// Every certificate fingerprint that authenticates a host now (its
/// current one, and its previous one until the renewed one is used),
/// with the host.
pub fn certificates(db: &Connection) -> Q<Vec<(String, HostId, String)>> {
    let mut st = db.prepare(
        "SELECT cert_fingerprint, id, name FROM hosts WHERE cert_fingerprint IS NOT NULL
         UNION ALL
         SELECT prev_fingerprint, id, name FROM hosts WHERE prev_fingerprint IS NOT NULL",
    )?;
    let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// A renewed certificate for host `id`: `fp` becomes current, and the
/// current one stays good as the previous one until the next renewal
/// (or its own end).
pub fn renew_certificate(db: &Connection, id: HostId, fp: &str, pem: &str) -> Q<()> {
    db.execute(
        "UPDATE hosts SET prev_fingerprint = cert_fingerprint, cert_fingerprint = ?1,
         prev_cert_pem = cert_pem, cert_pem = ?3 WHERE id = ?2",
        params![fp, id, pem],
    )?;
    Ok(())
}

/// A new managed host, waiting to enroll.
#[derive(Debug)]
pub struct NewHostRow<'a> {
    /// Name.
    pub name: &'a str,
    /// Addresses.
    pub addresses: &'a [String],
    /// Hash of the one-time enrollment secret.
    pub enroll_hash: &'a str,
    /// When the secret expires (RFC 3339).
    pub enroll_expires: &'a str,
    /// When it was added (RFC 3339).
    pub created: &'a str,
    /// Its roles.
    pub roles: &'a [HostRole],
    /// The datastores its proxy may use.
    pub datastores: &'a [String],
    /// Its libvirt connection, when it is a hypervisor.
    pub hypervisor: Option<&'a str>,
}

/// The libvirt connection of host `id`, when it is a hypervisor.
pub fn hypervisor(db: &Connection, id: HostId) -> Q<Option<String>> {
    Ok(
        db.query_row("SELECT hypervisor FROM hosts WHERE id = ?1", [id], |r| {
            r.get(0)
        })?,
    )
}

/// Make host `id` a hypervisor (`Some`) or not; without one its VMs leave
/// the inventory.
pub fn set_hypervisor(db: &Connection, id: HostId, uri: Option<&str>) -> Q<()> {
    db.execute(
        "UPDATE hosts SET hypervisor = ?1 WHERE id = ?2",
        params![uri, id],
    )?;
    if uri.is_none() {
        db.execute("DELETE FROM vms WHERE host_id = ?1", [id])?;
    }
    Ok(())
}

/// The built-in proxy's host as a hypervisor (the server's `--hypervisor`).
pub fn set_builtin_hypervisor(db: &Connection, uri: Option<&str>) -> Q<()> {
    db.execute("UPDATE hosts SET hypervisor = ?1 WHERE builtin = 1", [uri])?;
    Ok(())
}

/// Add a managed host.
pub fn insert(db: &Connection, h: &NewHostRow<'_>) -> Q<()> {
    db.execute(
        "INSERT INTO hosts(name, addresses, enroll_hash, enroll_expires, created, roles, datastores, hypervisor) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            h.name,
            serde_json::to_string(h.addresses)?,
            h.enroll_hash,
            h.enroll_expires,
            h.created,
            serde_json::to_string(h.roles)?,
            serde_json::to_string(h.datastores)?,
            h.hypervisor
        ],
    )?;
    Ok(())
}

/// Remove a host.
pub fn delete(db: &Connection, id: HostId) -> Q<()> {
    db.execute("DELETE FROM hosts WHERE id = ?1", [id])?;
    Ok(())
}

/// A host waiting to enroll, found by its secret's hash.
#[derive(Debug)]
pub struct Enrollee {
    /// The host.
    pub id: HostId,
    /// Its name.
    pub name: String,
    /// Its addresses.
    pub addresses: Vec<String>,
    /// When the secret expires (RFC 3339).
    pub expires: String,
}

/// The host whose pending enrollment secret has hash `hash`.
pub fn enrollee(db: &Connection, hash: &str) -> Q<Option<Enrollee>> {
    let row: Option<(HostId, String, String, String)> = db
        .query_row(
            "SELECT id, name, addresses, enroll_expires FROM hosts WHERE enroll_hash = ?1",
            [hash],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .optional()?;
    row.map(|(id, name, addrs, expires)| {
        Ok(Enrollee {
            id,
            name,
            addresses: serde_json::from_str(&addrs)?,
            expires,
        })
    })
    .transpose()
}

/// The host enrolled: its certificate's fingerprint replaces its secret.
pub fn set_certificate(db: &Connection, id: HostId, fp: &str, pem: &str) -> Q<()> {
    db.execute(
        "UPDATE hosts SET cert_fingerprint = ?1, cert_pem = ?3, enroll_hash = NULL, enroll_expires = NULL WHERE id = ?2",
        params![fp, id, pem],
    )?;
    Ok(())
}

/// The certificates (PEM) of the host named `name` that verify its
/// signatures now: its current one, and its previous one.
pub fn certificate_pems(db: &Connection, name: &str) -> Q<Vec<String>> {
    let row: Option<(Option<String>, Option<String>)> = db
        .query_row(
            "SELECT cert_pem, prev_cert_pem FROM hosts WHERE name = ?1",
            [name],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    Ok(row
        .map(|(a, b)| a.into_iter().chain(b).collect())
        .unwrap_or_default())
}

/// Create the built-in host if missing and give it the certificate `fp`.
pub fn set_builtin_certificate(
    db: &Connection,
    name: &str,
    created: &str,
    fp: &str,
    pem: &str,
) -> Q<()> {
    db.execute(
        "INSERT INTO hosts(name, builtin, created) VALUES (?1, 1, ?2) ON CONFLICT(name) DO NOTHING",
        params![name, created],
    )?;
    db.execute(
        "UPDATE hosts SET cert_fingerprint = ?1, cert_pem = ?3, prev_fingerprint = NULL, prev_cert_pem = NULL WHERE name = ?2",
        params![fp, name, pem],
    )?;
    Ok(())
}

/// A host's roles, and whether an installer manages it (it has reported).
pub fn roles(db: &Connection, id: HostId) -> Q<(Vec<HostRole>, bool)> {
    let (roles, installer): (String, Option<String>) = db.query_row(
        "SELECT roles, installer FROM hosts WHERE id = ?1",
        [id],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    Ok((serde_json::from_str(&roles)?, installer.is_some()))
}

/// Whether host `id` may run a proxy: the built-in host always, any
/// other only while it has the proxy role.
pub fn may_run_proxy(db: &Connection, id: HostId) -> Q<bool> {
    let (roles, builtin): (String, bool) = db.query_row(
        "SELECT roles, builtin FROM hosts WHERE id = ?1",
        [id],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let roles: Vec<HostRole> = serde_json::from_str(&roles)?;
    Ok(builtin || roles.contains(&HostRole::Proxy))
}

/// The datastores the administrator gave host `id`'s proxy.
pub fn datastores(db: &Connection, id: HostId) -> Q<Vec<String>> {
    let ds: String = db.query_row("SELECT datastores FROM hosts WHERE id = ?1", [id], |r| {
        r.get(0)
    })?;
    Ok(serde_json::from_str(&ds)?)
}

/// Set the datastores of host `id`'s proxy.
pub fn set_datastores(db: &Connection, id: HostId, ds: &[String]) -> Q<()> {
    db.execute(
        "UPDATE hosts SET datastores = ?1 WHERE id = ?2",
        params![serde_json::to_string(ds)?, id],
    )?;
    Ok(())
}

/// Set the datastores of the built-in proxy (the server's `--datastore`).
pub fn set_builtin_datastores(db: &Connection, ds: &[String]) -> Q<()> {
    db.execute(
        "UPDATE hosts SET datastores = ?1 WHERE builtin = 1",
        params![serde_json::to_string(ds)?],
    )?;
    Ok(())
}

/// Set a host's roles.
pub fn set_roles(db: &Connection, id: HostId, roles: &[HostRole]) -> Q<()> {
    db.execute(
        "UPDATE hosts SET roles = ?1 WHERE id = ?2",
        params![serde_json::to_string(roles)?, id],
    )?;
    Ok(())
}

/// Record what a host's installer reported, and when.
pub fn set_installer(db: &Connection, id: HostId, rep: &InstallerReport, seen: &str) -> Q<()> {
    db.execute(
        "UPDATE hosts SET installer = ?1, installer_seen = ?2 WHERE id = ?3",
        params![serde_json::to_string(rep)?, seen, id],
    )?;
    Ok(())
}

/// The names and the addresses of every host (the built-in one
/// included).
pub fn all_names(db: &Connection) -> Q<(Vec<String>, Vec<String>)> {
    let mut st = db.prepare("SELECT name, addresses FROM hosts")?;
    let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
    let (mut names, mut addresses) = (Vec::new(), Vec::new());
    for row in rows {
        let (name, a) = row?;
        names.push(name);
        addresses.extend(serde_json::from_str::<Vec<String>>(&a)?);
    }
    Ok((names, addresses))
}
