//! TLS for NBD (STARTTLS, then the rest of negotiation and all data over
//! TLS), with rustls.
//!
//! Certificates come from a directory laid out as QEMU's
//! `tls-creds-x509` and libnbd's `tls-certificates` expect:
//! `ca-cert.pem` (the CA that signed the server's certificate, required),
//! and optionally `client-cert.pem` + `client-key.pem` for servers that
//! verify their clients. The server's certificate is always verified
//! against that CA and the host name (or `tls-hostname`); there is no
//! option to skip verification.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use super::client::NbdError;

/// CA certificate file in the certificates directory.
pub const CA_CERT: &str = "ca-cert.pem";
/// Client certificate file (optional).
pub const CLIENT_CERT: &str = "client-cert.pem";
/// Client key file (with the client certificate).
pub const CLIENT_KEY: &str = "client-key.pem";

fn tls_err(what: String) -> NbdError {
    NbdError::Tls(what)
}

/// A client configuration from the certificates directory `dir`.
pub fn client_config(dir: &Path) -> Result<Arc<rustls::ClientConfig>, NbdError> {
    let ca = dir.join(CA_CERT);
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(&ca)
        .map_err(|e| tls_err(format!("cannot read {}: {e}", ca.display())))?;
    for c in certs {
        let c = c.map_err(|e| tls_err(format!("bad certificate in {}: {e}", ca.display())))?;
        roots
            .add(c)
            .map_err(|e| tls_err(format!("unusable CA certificate in {}: {e}", ca.display())))?;
    }
    if roots.is_empty() {
        return Err(tls_err(format!("no certificate in {}", ca.display())));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err(format!("TLS setup: {e}")))?
        .with_root_certificates(roots);
    let (cert, key) = (dir.join(CLIENT_CERT), dir.join(CLIENT_KEY));
    let config = if cert.exists() {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert)
            .and_then(|i| i.collect())
            .map_err(|e| tls_err(format!("cannot read {}: {e}", cert.display())))?;
        let key = PrivateKeyDer::from_pem_file(&key).map_err(|e| {
            tls_err(format!(
                "cannot read {} (needed with {CLIENT_CERT}): {e}",
                key.display()
            ))
        })?;
        builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| tls_err(format!("client certificate {}: {e}", cert.display())))?
    } else {
        builder.with_no_client_auth()
    };
    Ok(Arc::new(config))
}

/// The name the server's certificate must carry.
pub fn server_name(name: &str) -> Result<ServerName<'static>, NbdError> {
    ServerName::try_from(name.to_string())
        .map_err(|e| tls_err(format!("bad TLS host name {name:?}: {e}")))
}
