//! # datamover-control — the contracts of datamover's control plane
//!
//! What the server, the proxies, the installers, `dm --server` and the
//! Python module must agree on, and nothing that runs a data mover:
//!
//! * [`api`]: the JSON shapes of the REST API (`/api/v1`, bearer token)
//!   and of the agent API (`/agent/v1`, mutual TLS), and the REST paths
//!   ([`api::paths`]).
//! * [`pki`]: host identities, enrollment tokens and the TLS settings of
//!   every connection (the CA's signing half lives in the server).
//! * [`client`]: the blocking HTTPS client of both APIs, with typed calls
//!   of the REST API ([`client::Client::jobs`], [`client::Client::wait_session`] …).
//! * [`enroll`]: a host joins an installation with a one-time token.
//!
//! Invariant: of the workspace, this crate depends only on the core
//! (`datamover`), for its newtypes (`DiskName`, `PointId`): never on
//! `datamover-proxy`, the transports or the server, so the CLI and the
//! Python wheel link no proxy runtime.
//!
//! Errors: [`client::ClientError`] (a call) and [`pki::PkiError`] (a
//! certificate, key or token). Each says whether retrying can help
//! ([`client::ClientError::is_retryable`]).

#![warn(missing_docs)]

pub mod api;
pub mod client;
pub mod pki;

use std::path::Path;
use std::time::Duration;

use api::{EnrollRequest, Enrolled, paths};
use client::{Auth, Client, ClientError};
use pki::{EnrollmentToken, Identity};

/// File in a host's state directory holding the server's URL.
pub const SERVER_FILE: &str = "server.url";

/// Join the installation: check the server's CA against the token,
/// send a CSR for a key made here, and save the issued identity (and the
/// server's URL) in `dir`.
pub fn enroll(server: &str, token: &str, dir: &Path) -> Result<(Enrolled, Identity), ClientError> {
    let token: EnrollmentToken = token.parse()?;
    let timeout = Duration::from_secs(30);
    let ca = Client::fetch_ca(server, &token.ca_fingerprint, timeout)?;
    let (key_pem, csr) = Identity::new_request("datamover-host")?;
    let c = Client::new(server, &ca, None, Auth::None, timeout)?;
    let enrolled: Enrolled = c.post(
        &paths::enroll(),
        &EnrollRequest {
            secret: token.secret,
            csr,
        },
    )?;
    let id = Identity {
        cert_pem: enrolled.cert.clone(),
        key_pem,
        ca_pem: enrolled.ca.clone(),
    };
    id.save(dir)?;
    std::fs::write(dir.join(SERVER_FILE), format!("{server}\n"))
        .map_err(|e| ClientError::Config(format!("{}: {e}", dir.display())))?;
    Ok((enrolled, id))
}
