//! `api_tokens`: the hashes of API tokens (never the tokens).

use rusqlite::{Connection, OptionalExtension, params};

use super::Q;

/// How many API tokens exist.
pub fn count(db: &Connection) -> Q<i64> {
    Ok(db.query_row("SELECT count(*) FROM api_tokens", [], |r| r.get(0))?)
}

/// Record the token whose hash is `hash`.
pub fn insert(db: &Connection, name: &str, hash: &str, created: &str) -> Q<()> {
    db.execute(
        "INSERT INTO api_tokens(name, hash, created) VALUES (?1, ?2, ?3)",
        params![name, hash, created],
    )?;
    Ok(())
}

/// Whether a token with hash `hash` exists.
pub fn exists(db: &Connection, hash: &str) -> Q<bool> {
    Ok(db
        .query_row("SELECT id FROM api_tokens WHERE hash = ?1", [hash], |r| {
            r.get::<_, i64>(0)
        })
        .optional()?
        .is_some())
}
