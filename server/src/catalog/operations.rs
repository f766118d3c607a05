//! `operations`: failover, undo and failback of VM replicas, each run once
//! by the proxy that holds the replicas.
//!
//! Invariant: an operation goes queued → running (sent to its proxy) →
//! done or failed, and never runs twice: one a proxy stops reporting is
//! failed, not re-sent (a VM operation half done is for a person to see).

use datamover_control::api::{Operation, OperationOrder, ReplicaRequest};
use rusqlite::{Connection, OptionalExtension, params};

use super::Q;
use super::ids::ProxyId;

/// A new operation.
#[derive(Debug)]
pub struct NewOperation<'a> {
    /// The job.
    pub job: &'a str,
    /// The request (with its addresses filled in).
    pub request: &'a ReplicaRequest,
    /// The proxy to run it, and its name.
    pub proxy: (ProxyId, &'a str),
    /// When.
    pub created: &'a str,
}

/// Insert a queued operation; its id.
pub fn insert(db: &Connection, o: &NewOperation<'_>) -> Q<u64> {
    db.execute(
        "INSERT INTO operations(job, action, vm, proxy_id, proxy, request, created)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            o.job,
            o.request.action.name(),
            o.request.vm,
            o.proxy.0,
            o.proxy.1,
            serde_json::to_string(o.request)?,
            o.created
        ],
    )?;
    Ok(db.last_insert_rowid() as u64)
}

/// Whether an operation on `vm` of `job` is queued or running.
pub fn busy(db: &Connection, job: &str, vm: &str) -> Q<Option<u64>> {
    Ok(db
        .query_row(
            "SELECT id FROM operations WHERE job = ?1 AND vm = ?2 AND state IN ('queued', 'running')",
            params![job, vm],
            |r| r.get::<_, i64>(0),
        )
        .optional()?
        .map(|i| i as u64))
}

const COLUMNS: &str =
    "id, job, request, proxy, state, created, finished, result, error FROM operations";

/// A row of [`COLUMNS`], before its JSON is parsed.
struct Row {
    id: i64,
    job: String,
    request: String,
    proxy: String,
    state: String,
    created: String,
    finished: Option<String>,
    result: Option<String>,
    error: Option<String>,
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    Ok(Row {
        id: r.get(0)?,
        job: r.get(1)?,
        request: r.get(2)?,
        proxy: r.get(3)?,
        state: r.get(4)?,
        created: r.get(5)?,
        finished: r.get(6)?,
        result: r.get(7)?,
        error: r.get(8)?,
    })
}

fn operation(r: Row) -> Q<Operation> {
    let req: ReplicaRequest = serde_json::from_str(&r.request)?;
    Ok(Operation {
        id: r.id as u64,
        job: r.job,
        action: req.action,
        vm: req.vm,
        proxy: r.proxy,
        state: r.state,
        created: r.created,
        finished: r.finished,
        result: r.result.map(|x| serde_json::from_str(&x)).transpose()?,
        error: r.error,
    })
}

/// One operation.
pub fn get(db: &Connection, id: u64) -> Q<Option<Operation>> {
    db.query_row(&format!("SELECT {COLUMNS} WHERE id = ?1"), [id as i64], row)
        .optional()?
        .map(operation)
        .transpose()
}

/// The newest `limit` operations.
pub fn newest(db: &Connection, limit: u32) -> Q<Vec<Operation>> {
    let mut st = db.prepare(&format!("SELECT {COLUMNS} ORDER BY id DESC LIMIT ?1"))?;
    let rows: Vec<_> = st
        .query_map([limit], row)?
        .collect::<rusqlite::Result<_>>()?;
    rows.into_iter().map(operation).collect()
}

/// The queued operations of `proxy` as orders (with the repository's
/// path), marked running: each is sent once.
pub fn take_queued(db: &Connection, proxy: ProxyId) -> Q<Vec<OperationOrder>> {
    let mut st = db.prepare(
        "SELECT o.id, o.request, r.path FROM operations o
         JOIN jobs j ON j.name = o.job
         LEFT JOIN repositories r ON r.name = json_extract(j.spec, '$.repository')
         WHERE o.proxy_id = ?1 AND o.state = 'queued' ORDER BY o.id",
    )?;
    let rows: Vec<(i64, String, Option<String>)> = st
        .query_map([proxy], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let mut out = Vec::new();
    for (id, request, path) in rows {
        let req: ReplicaRequest = serde_json::from_str(&request)?;
        out.push(OperationOrder {
            id: id as u64,
            action: req.action,
            vm: req.vm,
            repository: path.unwrap_or_default(),
            on: req.on.unwrap_or_default(),
            to: req.to,
            start: req.start,
        });
        db.execute(
            "UPDATE operations SET state = 'running' WHERE id = ?1",
            [id],
        )?;
    }
    Ok(out)
}

/// The running operations of `proxy`.
pub fn running(db: &Connection, proxy: ProxyId) -> Q<Vec<u64>> {
    let mut st =
        db.prepare("SELECT id FROM operations WHERE proxy_id = ?1 AND state = 'running'")?;
    let ids = st
        .query_map([proxy], |r| r.get::<_, i64>(0))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(ids.into_iter().map(|i| i as u64).collect())
}

/// End a running operation of `proxy`: done with `result`, or failed.
pub fn finish(
    db: &Connection,
    id: u64,
    proxy: ProxyId,
    outcome: Result<&serde_json::Value, &str>,
    at: &str,
) -> Q<()> {
    let (state, result, error) = match outcome {
        Ok(v) => ("done", Some(serde_json::to_string(v)?), None),
        Err(e) => ("failed", None, Some(e)),
    };
    db.execute(
        "UPDATE operations SET state = ?1, result = ?2, error = ?3, finished = ?4
         WHERE id = ?5 AND proxy_id = ?6 AND state = 'running'",
        params![state, result, error, at, id as i64, proxy],
    )?;
    Ok(())
}
