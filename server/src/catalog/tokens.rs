//! `api_tokens`: the hashes of API tokens (never the tokens), with their
//! roles and expiry.

use datamover_control::api::{ApiToken, TokenRole};
use rusqlite::{Connection, params};

use super::Q;

/// How many API tokens exist.
pub fn count(db: &Connection) -> Q<i64> {
    Ok(db.query_row("SELECT count(*) FROM api_tokens", [], |r| r.get(0))?)
}

/// A token as stored.
#[derive(Debug, Clone)]
pub struct Row {
    /// Its hash.
    pub hash: String,
    /// What it looks like listed.
    pub token: ApiToken,
}

fn role(i: usize, s: String) -> rusqlite::Result<TokenRole> {
    s.parse().map_err(|e: String| {
        rusqlite::Error::FromSqlConversionFailure(
            i,
            rusqlite::types::Type::Text,
            Box::new(std::io::Error::other(e)),
        )
    })
}

/// Record the token whose hash is `hash`.
pub fn insert(db: &Connection, t: &ApiToken, hash: &str) -> Q<()> {
    db.execute(
        "INSERT INTO api_tokens(name, hash, created, role, expires) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![t.name, hash, t.created, t.role.as_str(), t.expires],
    )?;
    Ok(())
}

/// Every token, by name.
pub fn list(db: &Connection) -> Q<Vec<Row>> {
    let mut st =
        db.prepare("SELECT hash, name, role, created, expires FROM api_tokens ORDER BY name")?;
    let rows = st.query_map([], |r| {
        Ok(Row {
            hash: r.get(0)?,
            token: ApiToken {
                name: r.get(1)?,
                role: role(2, r.get(2)?)?,
                created: r.get(3)?,
                expires: r.get(4)?,
            },
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Delete the token named `name`; whether there was one.
pub fn delete(db: &Connection, name: &str) -> Q<bool> {
    Ok(db.execute("DELETE FROM api_tokens WHERE name = ?1", [name])? > 0)
}
