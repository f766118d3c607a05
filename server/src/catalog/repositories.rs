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
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
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
