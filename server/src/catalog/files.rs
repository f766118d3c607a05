//! `file_jobs`: a point's files asked for through the API (a listing, or
//! a tar archive to download), each run once by the proxy holding the
//! repository, in its file-level restore appliance.
//!
//! Invariant: queued → running (sent once) → done or failed. A tar
//! request is done only once its archive is at the server (`size`). One
//! its proxy stops reporting fails.

use datamover_control::api::{FilesJob, FilesOrder, FilesRequest, FilesStatus};
use rusqlite::{Connection, OptionalExtension, params};

use super::Q;
use super::ids::ProxyId;

/// Insert a queued request; its id.
pub fn insert(
    db: &Connection,
    req: &FilesRequest,
    proxy: (ProxyId, &str),
    created: &str,
) -> Q<u64> {
    db.execute(
        "INSERT INTO file_jobs(request, proxy_id, proxy, created) VALUES (?1, ?2, ?3, ?4)",
        params![serde_json::to_string(req)?, proxy.0, proxy.1, created],
    )?;
    Ok(db.last_insert_rowid() as u64)
}

type Row = (
    i64,
    String,
    String,
    String,
    String,
    Option<String>,
    Option<String>,
    Option<i64>,
    Option<String>,
);

fn job(r: Row) -> Q<FilesJob> {
    let (id, request, proxy, state, created, finished, entries, size, error) = r;
    Ok(FilesJob {
        id: id as u64,
        request: serde_json::from_str(&request)?,
        proxy,
        state,
        created,
        finished,
        entries: entries.map(|e| serde_json::from_str(&e)).transpose()?,
        size: size.map(|s| s as u64),
        error,
    })
}

const COLUMNS: &str =
    "id, request, proxy, state, created, finished, entries, size, error FROM file_jobs";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
        r.get(8)?,
    ))
}

/// One request.
pub fn get(db: &Connection, id: u64) -> Q<Option<FilesJob>> {
    db.query_row(&format!("SELECT {COLUMNS} WHERE id = ?1"), [id as i64], row)
        .optional()?
        .map(job)
        .transpose()
}

/// The queued requests of `proxy` as orders (with the repository's
/// path), marked running: each is sent once.
pub fn take_queued(db: &Connection, proxy: ProxyId) -> Q<Vec<FilesOrder>> {
    let mut st = db.prepare(
        "SELECT f.id, f.request, r.path FROM file_jobs f
         LEFT JOIN repositories r ON r.name = json_extract(f.request, '$.repository')
         WHERE f.proxy_id = ?1 AND f.state = 'queued' ORDER BY f.id",
    )?;
    let rows: Vec<(i64, String, Option<String>)> = st
        .query_map([proxy], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let mut out = Vec::new();
    for (id, request, path) in rows {
        out.push(FilesOrder {
            id: id as u64,
            repository: path.unwrap_or_default(),
            request: serde_json::from_str(&request)?,
        });
        db.execute("UPDATE file_jobs SET state = 'running' WHERE id = ?1", [id])?;
    }
    Ok(out)
}

/// Whether `proxy` runs tar request `id` (and may upload its archive).
pub fn uploads(db: &Connection, proxy: ProxyId, id: u64) -> Q<bool> {
    Ok(db
        .query_row(
            "SELECT 1 FROM file_jobs WHERE id = ?1 AND proxy_id = ?2 AND state = 'running'
               AND json_extract(request, '$.op') = 'tar'",
            params![id as i64, proxy],
            |_| Ok(()),
        )
        .optional()?
        .is_some())
}

/// Record the size of request `id`'s archive, now at the server.
pub fn uploaded(db: &Connection, id: u64, size: u64) -> Q<()> {
    db.execute(
        "UPDATE file_jobs SET size = ?2 WHERE id = ?1",
        params![id as i64, size as i64],
    )?;
    Ok(())
}

/// Record what `proxy` reports; the requests it runs and no longer
/// reports fail (as does a tar request reported done without an archive).
pub fn statuses(db: &Connection, proxy: ProxyId, st: &[FilesStatus], at: &str) -> Q<()> {
    for s in st.iter().filter(|s| s.done) {
        let error = match (&s.error, get(db, s.id)?) {
            (Some(e), _) => Some(e.clone()),
            (None, Some(j))
                if j.request.op == datamover_control::api::FilesOp::Tar && j.size.is_none() =>
            {
                Some("the proxy reported the archive done but never uploaded it".to_string())
            }
            _ => None,
        };
        db.execute(
            "UPDATE file_jobs SET state = ?3, finished = ?4, entries = ?5, error = ?6
             WHERE id = ?1 AND proxy_id = ?2 AND state = 'running'",
            params![
                s.id as i64,
                proxy,
                if error.is_some() { "failed" } else { "done" },
                at,
                s.entries.as_ref().map(serde_json::to_string).transpose()?,
                error
            ],
        )?;
    }
    let mut q = db.prepare("SELECT id FROM file_jobs WHERE proxy_id = ?1 AND state = 'running'")?;
    let running: Vec<i64> = q
        .query_map([proxy], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    for id in running {
        if !st.iter().any(|s| s.id as i64 == id) {
            db.execute(
                "UPDATE file_jobs SET state = 'failed', finished = ?2,
                     error = 'the proxy no longer runs it (restarted?): ask again'
                 WHERE id = ?1",
                params![id, at],
            )?;
        }
    }
    Ok(())
}
