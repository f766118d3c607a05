//! Errors of the proxy's services (the agent loop, the repository
//! service's listener, the installer).
//!
//! Rules: a data mover's own failure is a `datamover::Error` and travels
//! as one (it carries its kind and whether retrying can help); this type
//! only wraps what can stop a *service*: the server unreachable, a
//! certificate that does not load, a socket that cannot be set up.
//! Library code returns it; the binaries print it (no crate of the
//! workspace uses `anyhow`).

use datamover_control::client::ClientError;
use datamover_control::pki::PkiError;

/// What can stop one of the proxy's services.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// A call to the server.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// A certificate or key.
    #[error(transparent)]
    Pki(#[from] PkiError),
    /// A socket, file or process.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// Why it failed.
        source: std::io::Error,
    },
}

impl ProxyError {
    /// An [`ProxyError::Io`] with its context.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ProxyError {
        let context = context.into();
        move |source| ProxyError::Io { context, source }
    }
}
