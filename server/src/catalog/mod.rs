//! The catalog: one SQLite file holding the inventory (hosts, proxies,
//! repositories), jobs, sessions and tasks, and the hashes of API and
//! enrollment tokens.
//!
//! Migrations are numbered SQL scripts applied in order inside one
//! transaction each; `PRAGMA user_version` records the last one applied.
//! A catalog newer than this build is refused, never downgraded.
//!
//! Every SQL statement of the server lives under this module, one file
//! per table group, behind typed rows and id newtypes ([`ids`]); the
//! engine never writes SQL. Functions take a `&Connection` (a
//! transaction derefs to one), so the caller decides what is atomic, and
//! never read the clock: times come from the engine.

pub mod audit;
pub mod files;
pub mod hosts;
pub mod ids;
pub mod jobs;
pub mod operations;
pub mod proxies;
pub mod recoveries;
pub mod repositories;
pub mod sessions;
pub mod tasks;
pub mod tokens;
pub mod vms;

use std::path::Path;

use rusqlite::Connection;

/// Migrations, in order; index + 1 is the schema version after it.
/// Never edit one that has shipped: add a new one.
const MIGRATIONS: &[&str] = &[
    // 1: the first schema.
    r#"
CREATE TABLE api_tokens (
    id       INTEGER PRIMARY KEY,
    name     TEXT NOT NULL UNIQUE,
    hash     TEXT NOT NULL UNIQUE,
    created  TEXT NOT NULL
);
CREATE TABLE hosts (
    id               INTEGER PRIMARY KEY,
    name             TEXT NOT NULL UNIQUE,
    addresses        TEXT NOT NULL DEFAULT '[]',
    cert_fingerprint TEXT UNIQUE,
    enroll_hash      TEXT UNIQUE,
    enroll_expires   TEXT,
    builtin          INTEGER NOT NULL DEFAULT 0,
    created          TEXT NOT NULL
);
CREATE TABLE proxies (
    id         INTEGER PRIMARY KEY,
    host_id    INTEGER NOT NULL UNIQUE REFERENCES hosts(id) ON DELETE CASCADE,
    slots      INTEGER,
    cores      INTEGER NOT NULL DEFAULT 1,
    modes      TEXT NOT NULL DEFAULT '[]',
    site       TEXT,
    disabled   INTEGER NOT NULL DEFAULT 0,
    state      TEXT NOT NULL DEFAULT 'online',
    datastores TEXT NOT NULL DEFAULT '[]',
    version    TEXT NOT NULL DEFAULT '',
    last_seen  TEXT
);
CREATE TABLE repositories (
    id    INTEGER PRIMARY KEY,
    name  TEXT NOT NULL UNIQUE,
    path  TEXT NOT NULL
);
CREATE TABLE jobs (
    id        INTEGER PRIMARY KEY,
    name      TEXT NOT NULL UNIQUE,
    spec      TEXT NOT NULL,
    last_run  TEXT,
    next_run  TEXT
);
CREATE TABLE sessions (
    id       INTEGER PRIMARY KEY,
    job_id   INTEGER NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    kind     TEXT NOT NULL,
    state    TEXT NOT NULL,
    created  TEXT NOT NULL,
    finished TEXT
);
CREATE TABLE tasks (
    id           INTEGER PRIMARY KEY,
    session_id   INTEGER NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    disk         TEXT NOT NULL,
    spec         TEXT NOT NULL,
    state        TEXT NOT NULL,
    proxy_id     INTEGER REFERENCES proxies(id) ON DELETE SET NULL,
    proxy_name   TEXT,
    attempt      INTEGER NOT NULL DEFAULT 1,
    failures     INTEGER NOT NULL DEFAULT 0,
    mode         TEXT,
    done         INTEGER NOT NULL DEFAULT 0,
    total        INTEGER NOT NULL DEFAULT 0,
    bottleneck   TEXT,
    point        TEXT,
    bytes_read   INTEGER,
    bytes_stored INTEGER,
    error        TEXT,
    attempts     TEXT NOT NULL DEFAULT '[]',
    started      TEXT,
    finished     TEXT,
    not_before   INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX tasks_state ON tasks(state);
CREATE INDEX tasks_session ON tasks(session_id);
CREATE TABLE task_log (
    task_id  INTEGER NOT NULL,
    proxy    TEXT NOT NULL,
    attempt  INTEGER NOT NULL,
    started  REAL NOT NULL,
    ended    REAL
);
"#,
    // 2: repositories held and served by a proxy; proxies' repository
    // service port; per-task wire bytes and replica image.
    r#"
ALTER TABLE repositories ADD COLUMN proxy TEXT;
ALTER TABLE proxies ADD COLUMN service_port INTEGER;
ALTER TABLE proxies ADD COLUMN serving TEXT NOT NULL DEFAULT '[]';
ALTER TABLE tasks ADD COLUMN wire_bytes INTEGER;
ALTER TABLE tasks ADD COLUMN replica TEXT;
"#,
    // 3: host roles and what each host's installer last reported; why a
    // queued task cannot be placed.
    r#"
ALTER TABLE hosts ADD COLUMN roles TEXT NOT NULL DEFAULT '[]';
ALTER TABLE hosts ADD COLUMN installer TEXT;
ALTER TABLE hosts ADD COLUMN installer_seen TEXT;
ALTER TABLE tasks ADD COLUMN waiting TEXT;
"#,
    // 4: the datastores the administrator gives each host's proxy (it
    // may report fewer, never more).
    r#"
ALTER TABLE hosts ADD COLUMN datastores TEXT NOT NULL DEFAULT '[]';
"#,
    // 5: API tokens with roles and expiry; the audit log; a host's
    // previous certificate, good until its renewed one is first used.
    r#"
ALTER TABLE api_tokens ADD COLUMN role TEXT NOT NULL DEFAULT 'admin';
ALTER TABLE api_tokens ADD COLUMN expires TEXT;
CREATE TABLE audit (
    id     INTEGER PRIMARY KEY,
    at     TEXT NOT NULL,
    who    TEXT NOT NULL,
    action TEXT NOT NULL,
    status INTEGER NOT NULL
);
ALTER TABLE hosts ADD COLUMN prev_fingerprint TEXT;
ALTER TABLE hosts ADD COLUMN cert_pem TEXT;
ALTER TABLE hosts ADD COLUMN prev_cert_pem TEXT;
"#,
    // 6: a task's point's consistency (JSON: level, reason, frozen_ms).
    r#"
ALTER TABLE tasks ADD COLUMN consistency TEXT;
"#,
    // 7: hypervisors (a host's libvirt connection) and the VM inventory
    // their proxies report.
    r#"
ALTER TABLE hosts ADD COLUMN hypervisor TEXT;
CREATE TABLE vms (
    host_id INTEGER NOT NULL REFERENCES hosts(id) ON DELETE CASCADE,
    name    TEXT NOT NULL,
    state   TEXT NOT NULL,
    disks   TEXT NOT NULL,
    seen    TEXT NOT NULL,
    PRIMARY KEY (host_id, name)
);
"#,
    // 8: operations on VM replicas (failover, undo, failback), run by the
    // proxy holding the job's repository.
    r#"
CREATE TABLE operations (
    id       INTEGER PRIMARY KEY,
    job      TEXT NOT NULL,
    action   TEXT NOT NULL,
    vm       TEXT NOT NULL,
    proxy_id INTEGER NOT NULL REFERENCES proxies(id) ON DELETE CASCADE,
    proxy    TEXT NOT NULL,
    request  TEXT NOT NULL,
    state    TEXT NOT NULL DEFAULT 'queued',
    created  TEXT NOT NULL,
    finished TEXT,
    result   TEXT,
    error    TEXT
);
"#,
    // 9: instant VM recoveries, served by the proxy holding the
    // repository.
    r#"
CREATE TABLE recoveries (
    id         INTEGER PRIMARY KEY,
    repository TEXT NOT NULL,
    vm         TEXT NOT NULL,
    proxy_id   INTEGER NOT NULL REFERENCES proxies(id) ON DELETE CASCADE,
    proxy      TEXT NOT NULL,
    request    TEXT NOT NULL,
    state      TEXT NOT NULL DEFAULT 'queued',
    percent    INTEGER NOT NULL DEFAULT 0,
    pending    TEXT,
    created    TEXT NOT NULL,
    finished   TEXT,
    session    TEXT,
    error      TEXT
);
"#,
    // 10: a point's files asked for through the API (a listing, or a tar
    // archive the proxy uploads to the server).
    r#"
CREATE TABLE file_jobs (
    id       INTEGER PRIMARY KEY,
    request  TEXT NOT NULL,
    proxy_id INTEGER NOT NULL REFERENCES proxies(id) ON DELETE CASCADE,
    proxy    TEXT NOT NULL,
    state    TEXT NOT NULL DEFAULT 'queued',
    created  TEXT NOT NULL,
    finished TEXT,
    entries  TEXT,
    size     INTEGER,
    error    TEXT
);
"#,
];

/// A query's error: SQLite's, or a JSON column that does not parse.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// SQLite said no (a constraint, a busy database, a bad statement).
    #[error("catalog: {0}")]
    Sql(#[from] rusqlite::Error),
    /// A JSON column does not hold what it should.
    #[error("catalog JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// Result of a catalog query.
pub type Q<T> = Result<T, QueryError>;

/// Column `i` as a value parsed from its text (a disk name, a point id);
/// text that does not parse is a conversion failure, as a bad integer is.
pub(crate) fn parsed<T>(r: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<T>
where
    T: std::str::FromStr,
    T::Err: std::error::Error + Send + Sync + 'static,
{
    parse_text(i, r.get::<_, String>(i)?)
}

/// [`parsed`], for a column that may be NULL.
pub(crate) fn parsed_opt<T>(r: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<Option<T>>
where
    T: std::str::FromStr,
    T::Err: std::error::Error + Send + Sync + 'static,
{
    r.get::<_, Option<String>>(i)?
        .map(|s| parse_text(i, s))
        .transpose()
}

fn parse_text<T>(i: usize, s: String) -> rusqlite::Result<T>
where
    T: std::str::FromStr,
    T::Err: std::error::Error + Send + Sync + 'static,
{
    s.parse().map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e))
    })
}

/// The schema version this build writes.
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// A catalog error.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// SQLite said no.
    #[error("catalog {path}: {source}")]
    Sqlite {
        /// The file.
        path: String,
        /// Why.
        source: rusqlite::Error,
    },
    /// The file was written by a newer server.
    #[error(
        "catalog {path} has schema version {found}; this server knows up to {SCHEMA_VERSION} (upgrade dm-server)"
    )]
    TooNew {
        /// The file.
        path: String,
        /// Its version.
        found: u32,
    },
}

/// Open (creating and migrating) the catalog at `path`.
pub fn open(path: &Path) -> Result<Connection, CatalogError> {
    let p = path.display().to_string();
    let e = |source| CatalogError::Sqlite {
        path: p.clone(),
        source,
    };
    let mut c = Connection::open(path).map_err(e)?;
    c.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 5000;",
    )
    .map_err(e)?;
    let v: u32 = c
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(e)?;
    if v > SCHEMA_VERSION {
        return Err(CatalogError::TooNew { path: p, found: v });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(v as usize) {
        let tx = c.transaction().map_err(e)?;
        tx.execute_batch(sql).map_err(e)?;
        tx.execute_batch(&format!("PRAGMA user_version = {}", i + 1))
            .map_err(e)?;
        tx.commit().map_err(e)?;
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrates_once_and_refuses_a_newer_catalog() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("catalog.sqlite");
        let c = open(&p).unwrap();
        let v: u32 = c
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, SCHEMA_VERSION);
        c.execute(
            "INSERT INTO repositories(name, path) VALUES ('r', '/x')",
            [],
        )
        .unwrap();
        drop(c);
        let c = open(&p).unwrap();
        let n: u32 = c
            .query_row("SELECT count(*) FROM repositories", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 1, "reopening keeps data and applies nothing twice");
        c.execute_batch(&format!("PRAGMA user_version = {}", SCHEMA_VERSION + 1))
            .unwrap();
        drop(c);
        let e = open(&p).unwrap_err().to_string();
        assert!(e.contains("upgrade dm-server"), "{e}");
    }
}
