//! `audit`: every change made through the API, and every restore: who,
//! what, when, and how it ended. Rows are only ever added.

use datamover_control::api::AuditEntry;
use rusqlite::{Connection, params};

use super::Q;

/// Add an entry.
pub fn insert(db: &Connection, at: &str, who: &str, action: &str, status: u16) -> Q<()> {
    db.execute(
        "INSERT INTO audit(at, who, action, status) VALUES (?1, ?2, ?3, ?4)",
        params![at, who, action, status],
    )?;
    Ok(())
}

/// The newest `limit` entries, newest first.
pub fn list(db: &Connection, limit: u32) -> Q<Vec<AuditEntry>> {
    let mut st =
        db.prepare("SELECT id, at, who, action, status FROM audit ORDER BY id DESC LIMIT ?1")?;
    let rows = st.query_map([limit], |r| {
        Ok(AuditEntry {
            id: r.get::<_, i64>(0)? as u64,
            at: r.get(1)?,
            who: r.get(2)?,
            action: r.get(3)?,
            status: r.get(4)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}
