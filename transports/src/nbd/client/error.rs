//! Errors of the NBD client.
//!
//! Rules: a protocol violation by the server kills the connection and
//! every request waiting on it fails with the same [`NbdError`] (so the
//! error is `Clone`); a server's error reply fails only its request.

use std::time::Duration;

use super::p::{self, Violation};

/// What went wrong talking to a server.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NbdError {
    /// Could not connect or the connection broke.
    #[error("{what}")]
    Io {
        /// What happened, for a person.
        what: String,
        /// The socket's error, if there was one.
        #[source]
        source: Option<std::sync::Arc<std::io::Error>>,
    },
    /// The server broke the protocol; the connection was closed.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The server refused an option.
    #[error("{0}")]
    Server(String),
    /// The server failed a request with an error number.
    #[error("server error {} ({errno}){}", p::errno_name(*errno), if msg.is_empty() { String::new() } else { format!(": {msg}") })]
    Request {
        /// NBD error number (errno values).
        errno: u32,
        /// The server's message, if it sent one.
        msg: String,
    },
    /// Something we do not do (yet), refused rather than worked around.
    #[error("not supported: {0}")]
    Unsupported(String),
    /// TLS could not be set up, or the server refused it.
    #[error("TLS: {0}")]
    Tls(String),
    /// No reply in time.
    #[error("no reply within {0:?}; the server may be hung (raise the timeout if it is just slow)")]
    Timeout(Duration),
}

impl From<Violation> for NbdError {
    fn from(v: Violation) -> Self {
        NbdError::Protocol(v.0)
    }
}

impl NbdError {
    /// The connection broke or could not be made: `what`, no socket error.
    pub fn io_msg(what: impl Into<String>) -> NbdError {
        NbdError::Io {
            what: what.into(),
            source: None,
        }
    }

    /// The server closed the connection.
    pub fn closed() -> NbdError {
        NbdError::io_msg("the server closed the connection")
    }
}

pub(crate) fn io(e: std::io::Error) -> NbdError {
    use std::io::ErrorKind as K;
    let what = match e.kind() {
        K::UnexpectedEof => "the server closed the connection".to_string(),
        K::ConnectionReset | K::BrokenPipe | K::ConnectionAborted => {
            format!("the server closed the connection ({e})")
        }
        _ => e.to_string(),
    };
    NbdError::Io {
        what,
        source: Some(std::sync::Arc::new(e)),
    }
}
