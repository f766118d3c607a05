//! `proxies`: one row per host that has heartbeated as a proxy, with its
//! operator settings and what it last reported.

use rusqlite::{Connection, OptionalExtension, params};

use super::Q;
use super::ids::{HostId, ProxyId};

/// A proxy as stored.
#[derive(Debug)]
pub struct ProxyRow {
    /// The row.
    pub id: ProxyId,
    /// Its host's name.
    pub name: String,
    /// Slots set by an operator (none: from its cores).
    pub slots: Option<u32>,
    /// Cores it reported.
    pub cores: u32,
    /// Allowed transport modes (empty: all).
    pub modes: Vec<String>,
    /// Site.
    pub site: Option<String>,
    /// Taken out of service.
    pub disabled: bool,
    /// `online` or `dead`.
    pub state: String,
    /// Datastores it reported.
    pub datastores: Vec<String>,
    /// Its version.
    pub version: String,
    /// Last heartbeat (RFC 3339).
    pub last_seen: Option<String>,
}

/// Every proxy: the built-in one last, then by name.
pub fn list(db: &Connection) -> Q<Vec<ProxyRow>> {
    let mut st = db.prepare(
        "SELECT p.id, h.name, p.slots, p.cores, p.modes, p.site, p.disabled, p.state, p.datastores, p.version, p.last_seen
         FROM proxies p JOIN hosts h ON h.id = p.host_id ORDER BY h.builtin, h.name",
    )?;
    let rows = st.query_map([], |r| {
        Ok((
            r.get::<_, ProxyId>(0)?,
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
        Ok(ProxyRow {
            id,
            name,
            slots,
            cores,
            modes: serde_json::from_str(&modes)?,
            site,
            disabled,
            state,
            datastores: serde_json::from_str(&ds)?,
            version,
            last_seen,
        })
    })
    .collect()
}

/// The proxy of the host named `name`.
pub fn id_by_name(db: &Connection, name: &str) -> Q<Option<ProxyId>> {
    Ok(db
        .query_row(
            "SELECT p.id FROM proxies p JOIN hosts h ON h.id = p.host_id WHERE h.name = ?1",
            [name],
            |r| r.get(0),
        )
        .optional()?)
}

/// The proxy of host `host`, once it has heartbeated.
pub fn id_of_host(db: &Connection, host: HostId) -> Q<Option<ProxyId>> {
    Ok(db
        .query_row("SELECT id FROM proxies WHERE host_id = ?1", [host], |r| {
            r.get(0)
        })
        .optional()?)
}

/// An operator's change to a proxy's settings; `None` leaves a setting.
#[derive(Debug, Default)]
pub struct Settings<'a> {
    /// Task slots.
    pub slots: Option<u32>,
    /// Allowed modes.
    pub modes: Option<&'a [String]>,
    /// Site.
    pub site: Option<&'a str>,
    /// Out of service.
    pub disabled: Option<bool>,
}

/// Apply `s` to proxy `id`.
pub fn update_settings(db: &Connection, id: ProxyId, s: &Settings<'_>) -> Q<()> {
    if let Some(n) = s.slots {
        db.execute(
            "UPDATE proxies SET slots = ?1 WHERE id = ?2",
            params![n, id],
        )?;
    }
    if let Some(m) = s.modes {
        db.execute(
            "UPDATE proxies SET modes = ?1 WHERE id = ?2",
            params![serde_json::to_string(m)?, id],
        )?;
    }
    if let Some(site) = s.site {
        db.execute(
            "UPDATE proxies SET site = ?1 WHERE id = ?2",
            params![site, id],
        )?;
    }
    if let Some(d) = s.disabled {
        db.execute(
            "UPDATE proxies SET disabled = ?1 WHERE id = ?2",
            params![d, id],
        )?;
    }
    Ok(())
}

/// Forget a proxy (its host keeps its certificate).
pub fn delete(db: &Connection, id: ProxyId) -> Q<()> {
    db.execute("DELETE FROM proxies WHERE id = ?1", [id])?;
    Ok(())
}

/// Proxies marked online, with their hosts' names.
pub fn online(db: &Connection) -> Q<Vec<(ProxyId, String)>> {
    let mut st = db.prepare(
        "SELECT p.id, h.name FROM proxies p JOIN hosts h ON h.id = p.host_id WHERE p.state = 'online'",
    )?;
    let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Mark proxy `id` `online` or `dead`.
pub fn set_state(db: &Connection, id: ProxyId, state: &str) -> Q<()> {
    db.execute(
        "UPDATE proxies SET state = ?1 WHERE id = ?2",
        params![state, id],
    )?;
    Ok(())
}

/// A proxy placement may use: enabled and online.
#[derive(Debug)]
pub struct Placeable {
    /// The row.
    pub id: ProxyId,
    /// Its host's name.
    pub name: String,
    /// The server's own proxy.
    pub builtin: bool,
    /// Slots set by an operator.
    pub slots: Option<u32>,
    /// Cores it reported.
    pub cores: u32,
    /// Allowed modes (empty: all).
    pub modes: Vec<String>,
    /// Datastores it reported.
    pub datastores: Vec<String>,
}

/// Every enabled, online proxy.
pub fn placeable(db: &Connection) -> Q<Vec<Placeable>> {
    let mut st = db.prepare(
        "SELECT p.id, h.name, h.builtin, p.slots, p.cores, p.modes, p.datastores
         FROM proxies p JOIN hosts h ON h.id = p.host_id
         WHERE p.disabled = 0 AND p.state = 'online'",
    )?;
    let rows = st.query_map([], |r| {
        Ok((
            r.get::<_, ProxyId>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, bool>(2)?,
            r.get::<_, Option<u32>>(3)?,
            r.get::<_, u32>(4)?,
            r.get::<_, String>(5)?,
            r.get::<_, String>(6)?,
        ))
    })?;
    rows.map(|r| {
        let (id, name, builtin, slots, cores, modes, ds) = r?;
        Ok(Placeable {
            id,
            name,
            builtin,
            slots,
            cores,
            modes: serde_json::from_str(&modes)?,
            datastores: serde_json::from_str(&ds)?,
        })
    })
    .collect()
}

/// How many enabled proxies of managed hosts exist (the built-in proxy
/// works only while there are none).
pub fn managed_enabled(db: &Connection) -> Q<i64> {
    Ok(db.query_row(
        "SELECT count(*) FROM proxies p JOIN hosts h ON h.id = p.host_id WHERE h.builtin = 0 AND p.disabled = 0",
        [],
        |r| r.get(0),
    )?)
}

/// What a proxy reports in a heartbeat.
#[derive(Debug)]
pub struct Report<'a> {
    /// Cores.
    pub cores: u32,
    /// Datastores it sees.
    pub datastores: &'a [String],
    /// Its version.
    pub version: &'a str,
    /// When (RFC 3339).
    pub seen: &'a str,
    /// Its repository service's port.
    pub service_port: Option<u16>,
    /// The repositories its service offers.
    pub serving: &'a [String],
}

/// Record a heartbeat of the proxy on `host` (registering it on first
/// contact) and mark it online; returns the proxy and the state it was in.
pub fn heartbeat(db: &Connection, host: HostId, r: &Report<'_>) -> Q<(ProxyId, String)> {
    db.execute(
        "INSERT INTO proxies(host_id, cores) VALUES (?1, ?2) ON CONFLICT(host_id) DO NOTHING",
        params![host, r.cores],
    )?;
    let (id, was): (ProxyId, String) = db.query_row(
        "SELECT id, state FROM proxies WHERE host_id = ?1",
        [host],
        |x| Ok((x.get(0)?, x.get(1)?)),
    )?;
    db.execute(
        "UPDATE proxies SET cores = ?1, datastores = ?2, version = ?3, last_seen = ?4, state = 'online', service_port = ?6,
         serving = ?7 WHERE id = ?5",
        params![
            r.cores,
            serde_json::to_string(r.datastores)?,
            r.version,
            r.seen,
            id,
            r.service_port,
            serde_json::to_string(r.serving)?
        ],
    )?;
    Ok((id, was))
}

/// The datastores proxy `id` uses now.
pub fn datastores(db: &Connection, id: ProxyId) -> Q<Vec<String>> {
    let ds: String = db.query_row("SELECT datastores FROM proxies WHERE id = ?1", [id], |r| {
        r.get(0)
    })?;
    Ok(serde_json::from_str(&ds)?)
}

/// Set the datastores proxy `id` uses.
pub fn set_datastores(db: &Connection, id: ProxyId, ds: &[String]) -> Q<()> {
    db.execute(
        "UPDATE proxies SET datastores = ?1 WHERE id = ?2",
        params![serde_json::to_string(ds)?, id],
    )?;
    Ok(())
}
