//! The engine's error: a kind and a message for a person.
//!
//! Rules: the engine says *what kind* of failure happened (bad input,
//! not found, conflict …); only the HTTP layer (`crate::http`) maps a
//! kind to a status code. Catalog (SQLite) errors are internal, except a
//! constraint violation, which is a conflict. Messages name what to do.

/// What kind of failure an [`EngineError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request is malformed or names something invalid.
    BadInput,
    /// No valid credentials.
    Unauthenticated,
    /// Valid credentials that may not do this.
    Forbidden,
    /// What the request names does not exist.
    NotFound,
    /// The request clashes with the current state (a duplicate name, a
    /// running session).
    Conflict,
    /// Something the server needs is missing for now (a package).
    Unavailable,
    /// A fault of the server itself (the catalog).
    Internal,
}

/// An error of the engine, for an API client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineError {
    /// Its kind.
    pub kind: ErrorKind,
    /// What went wrong, for a person.
    pub message: String,
}

impl std::fmt::Display for EngineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({:?})", self.message, self.kind)
    }
}

impl std::error::Error for EngineError {}

impl EngineError {
    /// An error of `kind`.
    pub fn of(kind: ErrorKind, message: impl Into<String>) -> Self {
        EngineError {
            kind,
            message: message.into(),
        }
    }
    /// Bad input.
    pub fn bad(m: impl Into<String>) -> Self {
        Self::of(ErrorKind::BadInput, m)
    }
    /// No valid credentials.
    pub fn unauthorized(m: impl Into<String>) -> Self {
        Self::of(ErrorKind::Unauthenticated, m)
    }
    /// Not allowed.
    pub fn forbidden(m: impl Into<String>) -> Self {
        Self::of(ErrorKind::Forbidden, m)
    }
    /// No `what` named `name`.
    pub fn not_found(what: &str, name: impl std::fmt::Display) -> Self {
        Self::of(ErrorKind::NotFound, format!("no {what} named {name}"))
    }
    /// A clash with the current state.
    pub fn conflict(m: impl Into<String>) -> Self {
        Self::of(ErrorKind::Conflict, m)
    }
    /// A fault of the server.
    pub fn internal(m: impl std::fmt::Display) -> Self {
        Self::of(ErrorKind::Internal, m.to_string())
    }
    /// Missing for now.
    pub fn unavailable(m: impl Into<String>) -> Self {
        Self::of(ErrorKind::Unavailable, m)
    }
}

impl From<rusqlite::Error> for EngineError {
    fn from(e: rusqlite::Error) -> Self {
        if let rusqlite::Error::SqliteFailure(f, _) = &e
            && f.code == rusqlite::ErrorCode::ConstraintViolation
        {
            return EngineError::conflict(format!("already exists ({e})"));
        }
        EngineError::internal(format!("catalog: {e}"))
    }
}

impl From<crate::catalog::QueryError> for EngineError {
    fn from(e: crate::catalog::QueryError) -> Self {
        match e {
            crate::catalog::QueryError::Sql(e) => e.into(),
            crate::catalog::QueryError::Json(e) => e.into(),
        }
    }
}

impl From<serde_json::Error> for EngineError {
    fn from(e: serde_json::Error) -> Self {
        EngineError::internal(format!("catalog JSON: {e}"))
    }
}

/// Result of the engine.
pub type R<T> = Result<T, EngineError>;
