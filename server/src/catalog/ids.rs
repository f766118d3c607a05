//! Id newtypes of catalog rows, so a host id cannot be passed where a
//! proxy id is meant. Each is the row's SQLite `INTEGER PRIMARY KEY`.

use rusqlite::ToSql;
use rusqlite::types::{FromSql, FromSqlResult, ToSqlOutput, ValueRef};

macro_rules! row_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub i64);

        impl ToSql for $name {
            fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
                self.0.to_sql()
            }
        }

        impl FromSql for $name {
            fn column_result(v: ValueRef<'_>) -> FromSqlResult<Self> {
                i64::column_result(v).map($name)
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

row_id!(
    /// A row of `hosts`.
    HostId
);
row_id!(
    /// A row of `proxies`.
    ProxyId
);
row_id!(
    /// A row of `jobs`.
    JobId
);
row_id!(
    /// A row of `sessions`.
    SessionId
);
row_id!(
    /// A row of `tasks` (the API shows it as a number).
    TaskId
);

impl TaskId {
    /// The id as the API shows it.
    pub fn api(self) -> u64 {
        self.0 as u64
    }

    /// The id the API names.
    pub fn of_api(id: u64) -> TaskId {
        TaskId(id as i64)
    }
}
