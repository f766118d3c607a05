//! `recoveries`: instant VM recoveries, each served by the proxy holding
//! the repository (its mount server) until migrated, discarded, stopped
//! or lost.
//!
//! Invariant: a recovery goes queued → starting (its start order sent
//! once) → serving ⇄ migrating, or stopping → migrated, stopped,
//! discarded or failed (ended). A control (migrate, discard) waits in `pending` until the
//! next heartbeat of its proxy carries it, once. A recovery its proxy
//! stops reporting is failed, never started again.

use datamover_control::api::{
    Recovery, RecoveryAction, RecoveryMigrate, RecoveryOrder, RecoveryRequest, RecoveryStatus,
};
use rusqlite::{Connection, OptionalExtension, params};

use super::Q;
use super::ids::ProxyId;

/// States of a recovery that has not ended.
const LIVE: &str = "('queued', 'starting', 'serving', 'migrating', 'stopping')";

/// Insert a queued recovery (its request with `on` filled); its id.
pub fn insert(
    db: &Connection,
    req: &RecoveryRequest,
    proxy: (ProxyId, &str),
    created: &str,
) -> Q<u64> {
    db.execute(
        "INSERT INTO recoveries(repository, vm, proxy_id, proxy, request, created)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            req.repository,
            req.vm,
            proxy.0,
            proxy.1,
            serde_json::to_string(req)?,
            created
        ],
    )?;
    Ok(db.last_insert_rowid() as u64)
}

/// A live recovery starting the same domain, if any.
pub fn live_on(db: &Connection, on: &str) -> Q<Option<u64>> {
    Ok(db
        .query_row(
            &format!(
                "SELECT id FROM recoveries WHERE json_extract(request, '$.on') = ?1 AND state IN {LIVE}"
            ),
            [on],
            |r| r.get::<_, i64>(0),
        )
        .optional()?
        .map(|i| i as u64))
}

const COLUMNS: &str = "id, repository, vm, proxy, state, percent, pending, created, finished, session, error FROM recoveries";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(Recovery, Option<String>)> {
    Ok((
        Recovery {
            id: r.get::<_, i64>(0)? as u64,
            repository: r.get(1)?,
            vm: r.get(2)?,
            proxy: r.get(3)?,
            state: r.get(4)?,
            percent: r.get::<_, i64>(5)?.clamp(0, 100) as u8,
            pending: r
                .get::<_, Option<String>>(6)?
                .and_then(|p| serde_json::from_str::<RecoveryOrder>(&p).ok())
                .map(|o| action_name(o.action).to_string()),
            created: r.get(7)?,
            finished: r.get(8)?,
            session: None,
            error: r.get(10)?,
        },
        r.get(9)?,
    ))
}

fn recovery((mut r, session): (Recovery, Option<String>)) -> Q<Recovery> {
    r.session = session.map(|s| serde_json::from_str(&s)).transpose()?;
    Ok(r)
}

fn action_name(a: RecoveryAction) -> &'static str {
    match a {
        RecoveryAction::Start => "start",
        RecoveryAction::Migrate => "migrate",
        RecoveryAction::Discard => "discard",
    }
}

/// One recovery.
pub fn get(db: &Connection, id: u64) -> Q<Option<Recovery>> {
    db.query_row(&format!("SELECT {COLUMNS} WHERE id = ?1"), [id as i64], row)
        .optional()?
        .map(recovery)
        .transpose()
}

/// The newest `limit` recoveries.
pub fn newest(db: &Connection, limit: u32) -> Q<Vec<Recovery>> {
    let mut st = db.prepare(&format!("SELECT {COLUMNS} ORDER BY id DESC LIMIT ?1"))?;
    let rows: Vec<_> = st
        .query_map([limit], row)?
        .collect::<rusqlite::Result<_>>()?;
    rows.into_iter().map(recovery).collect()
}

/// Ask for a control (migrate with `to`, or discard) of a recovery.
pub fn set_pending(
    db: &Connection,
    id: u64,
    action: RecoveryAction,
    to: Option<&RecoveryMigrate>,
) -> Q<()> {
    let o = RecoveryOrder {
        id,
        action,
        repository: String::new(),
        points: Vec::new(),
        on: String::new(),
        service: None,
        to: to.cloned(),
    };
    db.execute(
        "UPDATE recoveries SET pending = ?2, error = NULL WHERE id = ?1",
        params![id as i64, serde_json::to_string(&o)?],
    )?;
    Ok(())
}

/// End a recovery here (one whose start was never sent).
pub fn end(db: &Connection, id: u64, state: &str, at: &str) -> Q<()> {
    db.execute(
        "UPDATE recoveries SET state = ?2, finished = ?3, pending = NULL WHERE id = ?1",
        params![id as i64, state, at],
    )?;
    Ok(())
}

/// The orders for `proxy`: queued starts (with the repository's path;
/// marked starting) and pending controls (cleared); each sent once.
pub fn take_orders(db: &Connection, proxy: ProxyId) -> Q<Vec<RecoveryOrder>> {
    let mut st = db.prepare(
        "SELECT c.id, c.request, r.path, c.proxy IS NOT r.proxy FROM recoveries c
         LEFT JOIN repositories r ON r.name = c.repository
         WHERE c.proxy_id = ?1 AND c.state = 'queued' ORDER BY c.id",
    )?;
    let rows: Vec<(i64, String, Option<String>, bool)> = st
        .query_map([proxy], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })?
        .collect::<rusqlite::Result<_>>()?;
    let mut out = Vec::new();
    for (id, request, path, remote) in rows {
        let req: RecoveryRequest = serde_json::from_str(&request)?;
        let points = if req.points.is_empty() {
            vec![req.vm.clone()]
        } else {
            req.points
        };
        // Another proxy's repository is read through its service, which
        // admits this proxy for the recovery's disks (`read_grants`).
        let service = if remote {
            let at = super::repositories::service(db, &req.repository)?
                .ok_or_else(|| format!("repository {} is gone", req.repository))
                .and_then(|(h, addrs, port)| {
                    super::repositories::service_address(&req.repository, &h, &addrs, port)
                });
            match at {
                Ok(at) => Some(at),
                Err(e) => {
                    db.execute(
                        "UPDATE recoveries SET state = 'failed', error = ?2 WHERE id = ?1",
                        params![id, e],
                    )?;
                    continue;
                }
            }
        } else {
            None
        };
        out.push(RecoveryOrder {
            id: id as u64,
            action: RecoveryAction::Start,
            repository: if remote {
                String::new()
            } else {
                path.unwrap_or_default()
            },
            points,
            on: req.on.unwrap_or_default(),
            service,
            to: None,
        });
        db.execute(
            "UPDATE recoveries SET state = 'starting' WHERE id = ?1",
            [id],
        )?;
    }
    let mut st = db.prepare(&format!(
        "SELECT id, pending FROM recoveries WHERE proxy_id = ?1 AND pending IS NOT NULL AND state IN {LIVE} ORDER BY id"
    ))?;
    let rows: Vec<(i64, String)> = st
        .query_map([proxy], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    for (id, pending) in rows {
        out.push(serde_json::from_str(&pending)?);
        // What went wrong before is not this control's.
        db.execute(
            "UPDATE recoveries SET pending = NULL, error = NULL WHERE id = ?1",
            [id],
        )?;
    }
    Ok(out)
}

/// The read grants of repository `name`: the mount server of each live
/// recovery from it that is not its holder may read the recovery's
/// disks (its points, when named), as long as the recovery lives.
pub fn read_grants(db: &Connection, name: &str) -> Q<Vec<datamover_control::api::Grant>> {
    let mut st = db.prepare(&format!(
        "SELECT c.id, c.request, h.cert_fingerprint FROM recoveries c
         JOIN proxies p ON p.id = c.proxy_id JOIN hosts h ON h.id = p.host_id
         JOIN repositories r ON r.name = c.repository
         WHERE c.repository = ?1 AND c.state IN {LIVE} AND c.proxy IS NOT r.proxy
           AND h.cert_fingerprint IS NOT NULL
         ORDER BY c.id"
    ))?;
    let rows: Vec<(i64, String, String)> = st
        .query_map([name], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let mut out = Vec::new();
    for (id, request, peer) in rows {
        let req: RecoveryRequest = serde_json::from_str(&request)?;
        for p in &req.points {
            // Checked when the recovery was asked for.
            let Ok(p) = p.parse::<datamover::PointRef>() else {
                continue;
            };
            out.push(datamover_control::api::Grant {
                task: id as u64,
                peer: peer.clone(),
                disk: p.disk,
                replica: false,
                start: false,
                read: true,
                point: p.at,
            });
        }
    }
    Ok(out)
}

/// Record what `proxy` reports of its recoveries; the ones it served
/// (starting and on) and no longer reports are failed.
pub fn statuses(db: &Connection, proxy: ProxyId, st: &[RecoveryStatus], at: &str) -> Q<()> {
    for s in st {
        db.execute(
            "UPDATE recoveries SET state = ?3, percent = ?4, session = COALESCE(?5, session),
                 error = COALESCE(?6, error), finished = CASE WHEN ?7 THEN ?8 ELSE finished END
             WHERE id = ?1 AND proxy_id = ?2",
            params![
                s.id as i64,
                proxy,
                s.state,
                i64::from(s.percent),
                s.session.as_ref().map(serde_json::to_string).transpose()?,
                s.error,
                s.done,
                at
            ],
        )?;
    }
    let mut q = db.prepare(
        "SELECT id FROM recoveries WHERE proxy_id = ?1 AND state IN ('starting', 'serving', 'migrating', 'stopping')",
    )?;
    let served: Vec<i64> = q
        .query_map([proxy], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    for id in served {
        if !st.iter().any(|s| s.id as i64 == id) {
            db.execute(
                "UPDATE recoveries SET state = 'failed', finished = ?2, pending = NULL,
                     error = 'the proxy no longer serves it (restarted?): its VM lost its disks; check it, then discard it on the proxy (dm instant-recover --discard)'
                 WHERE id = ?1",
                params![id, at],
            )?;
        }
    }
    Ok(())
}
