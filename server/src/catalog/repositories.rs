//! `repositories`: where jobs write, and which proxy serves each.

use datamover_control::api::Repository;
use rusqlite::{Connection, params};

use super::Q;

/// Add a repository.
pub fn insert(db: &Connection, r: &Repository) -> Q<()> {
    db.execute(
        "INSERT INTO repositories(name, path, proxy) VALUES (?1, ?2, ?3)",
        params![r.name, r.path, r.proxy],
    )?;
    Ok(())
}

/// Every repository, by name.
pub fn list(db: &Connection) -> Q<Vec<Repository>> {
    let mut st = db.prepare("SELECT name, path, proxy FROM repositories ORDER BY name")?;
    let rows = st.query_map([], |r| {
        Ok(Repository {
            name: r.get(0)?,
            path: r.get(1)?,
            proxy: r.get(2)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The repositories the proxy `proxy` holds and serves, by name.
pub fn served_by(
    db: &Connection,
    proxy: super::ids::ProxyId,
) -> Q<Vec<datamover_control::api::ServedRepository>> {
    let mut st = db.prepare(
        "SELECT r.name, r.path FROM repositories r JOIN hosts h ON h.name = r.proxy
         JOIN proxies p ON p.host_id = h.id WHERE p.id = ?1 ORDER BY r.name",
    )?;
    let rows = st.query_map([proxy], |r| {
        Ok(datamover_control::api::ServedRepository {
            name: r.get(0)?,
            path: r.get(1)?,
            grants: Vec::new(),
        })
    })?;
    let mut out: Vec<datamover_control::api::ServedRepository> = rows.collect::<Result<_, _>>()?;
    for r in &mut out {
        r.grants = grants(db, &r.name)?;
    }
    Ok(out)
}

/// The grants of repository `name`: for every task assigned or running
/// that writes to it, its proxy's certificate may use its disk.
pub fn grants(db: &Connection, name: &str) -> Q<Vec<datamover_control::api::Grant>> {
    let mut st = db.prepare(
        "SELECT t.id, t.disk, json_extract(j.spec, '$.kind'), h.cert_fingerprint FROM tasks t
         JOIN sessions s ON s.id = t.session_id JOIN jobs j ON j.id = s.job_id
         JOIN proxies p ON p.id = t.proxy_id JOIN hosts h ON h.id = p.host_id
         WHERE t.state IN ('assigned', 'running') AND json_extract(j.spec, '$.repository') = ?1
           AND h.cert_fingerprint IS NOT NULL
         ORDER BY t.id",
    )?;
    let rows = st.query_map([name], |r| {
        let kind: String = r.get(2)?;
        Ok(datamover_control::api::Grant {
            task: r.get::<_, i64>(0)? as u64,
            disk: super::parsed(r, 1)?,
            replica: kind == "replication" || kind == "migration",
            start: kind == "migration",
            peer: r.get(3)?,
            read: false,
            point: None,
        })
    })?;
    let mut out: Vec<_> = rows.collect::<Result<_, _>>()?;
    out.extend(super::recoveries::read_grants(db, name)?);
    Ok(out)
}

/// Where repository `repository`'s service is, held by `holder` at its
/// `addresses` with its service on `port`; or why it cannot be reached.
pub fn service_address(
    repository: &str,
    holder: &str,
    addresses: &[String],
    port: Option<u16>,
) -> Result<datamover_control::api::ServiceAddress, String> {
    match (addresses.first(), port) {
        (Some(a), Some(port)) => Ok(datamover_control::api::ServiceAddress {
            address: if a.contains(':') {
                format!("[{a}]:{port}")
            } else {
                format!("{a}:{port}")
            },
            server_name: a.clone(),
            repository: repository.to_string(),
            replica: false,
            task: None,
        }),
        (None, _) => Err(format!(
            "repository {repository} is held by {holder}, which has no address to reach it at (dm host add {holder} --address …)"
        )),
        (_, None) => Err(format!(
            "repository {repository} is held by {holder}, whose repository service is not running (dm-proxy run --repo-listen ADDR)"
        )),
    }
}

/// A repository's holder, its host's addresses and its service's port.
pub type HolderService = (String, Vec<String>, Option<u16>);

/// Where repository `name`'s holder serves it: the holder, its host's
/// addresses and its service's port (none while it runs no service);
/// none for a repository no proxy holds.
pub fn service(db: &Connection, name: &str) -> Q<Option<HolderService>> {
    use rusqlite::OptionalExtension;
    let row: Option<(String, String, Option<u16>)> = db
        .query_row(
            "SELECT r.proxy, h.addresses, p.service_port FROM repositories r
             JOIN hosts h ON h.name = r.proxy LEFT JOIN proxies p ON p.host_id = h.id
             WHERE r.name = ?1",
            [name],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    row.map(|(holder, addrs, port)| Ok((holder, serde_json::from_str(&addrs)?, port)))
        .transpose()
}

/// The holder of repository `name`: none if there is no such repository,
/// `Some(None)` for shared storage, `Some(Some(proxy))` for one a proxy
/// holds.
pub fn holder(db: &Connection, name: &str) -> Q<Option<Option<String>>> {
    use rusqlite::OptionalExtension;
    Ok(db
        .query_row(
            "SELECT proxy FROM repositories WHERE name = ?1",
            [name],
            |r| r.get(0),
        )
        .optional()?)
}

/// The directory of repository `name`, if there is one.
pub fn path(db: &Connection, name: &str) -> Q<Option<String>> {
    use rusqlite::OptionalExtension;
    Ok(db
        .query_row(
            "SELECT path FROM repositories WHERE name = ?1",
            [name],
            |r| r.get(0),
        )
        .optional()?)
}
