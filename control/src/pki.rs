//! Host identities and the TLS settings every connection of a datamover
//! installation uses (the CA's signing half lives in the server,
//! `datamover_server::ca`).
//!
//! Invariant: every connection between server, proxies, installers and
//! repository services is mutual TLS under the installation's CA, and a
//! host's private key never leaves the machine that generated it (the
//! host sends a CSR, [`Identity::new_request`]).
//!
//! * A host joins with an enrollment token `dmj1.<secret>.<ca-sha256>`
//!   ([`EnrollmentToken`]): the CA fingerprint in it lets the host trust
//!   the server before it has any certificate (as kubeadm's discovery
//!   hash does).
//! * The server also checks that a client's certificate is one it issued
//!   to a host still in its inventory (by SHA-256 fingerprint), so
//!   removing a host revokes it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{CertificateParams, DnType, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A PKI error: a file that could not be read or written, a certificate
/// or key that does not parse or sign, or a malformed token.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// Reading or writing a certificate or key file.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A certificate, key or request that does not parse, verify or sign.
    #[error("{what}: {source}")]
    Crypto {
        /// What was being done.
        what: &'static str,
        /// The library's error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Input that is not what it should be (no certificate in a PEM
    /// text, a malformed enrollment token).
    #[error("{0}")]
    Invalid(String),
}

/// A [`PkiError::Crypto`] for `what`.
pub fn err(what: &'static str, e: impl std::error::Error + Send + Sync + 'static) -> PkiError {
    PkiError::Crypto {
        what,
        source: Box::new(e),
    }
}

/// A [`PkiError::Io`] for `path`.
pub fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, PkiError>;

/// File name of the CA certificate in a host's (and the server's CA)
/// directory.
pub const CA_CERT: &str = "ca.pem";

/// Install the ring crypto provider as the process default (idempotent).
pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// SHA-256, lower-case hex: certificate fingerprints (of the DER) and
/// the stored form of tokens.
pub fn fingerprint(bytes: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

/// Length and SHA-256 (hex) of a file, read in 1 MiB pieces.
pub fn sha256_file(path: &std::path::Path) -> std::io::Result<(u64, String)> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hash.update(&buf[..n]);
        len += n as u64;
    }
    Ok((len, hex(hash.finish().as_ref())))
}

/// Lower-case hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `n` random bytes as hex: tokens and secrets.
pub fn random_hex(n: usize) -> Result<String> {
    let mut b = vec![0u8; n];
    getrandom::fill(&mut b).map_err(|e| err("random", std::io::Error::other(e.to_string())))?;
    Ok(hex(&b))
}

/// Parse the first certificate of a PEM text.
pub fn cert_der_from_pem(pem: &str) -> Result<CertificateDer<'static>> {
    certs_from_pem(pem)?
        .into_iter()
        .next()
        .ok_or_else(|| PkiError::Invalid("no certificate in PEM".into()))
}

/// Every certificate of a PEM text.
pub fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| err("bad certificate PEM", e))
}

/// The private key of a PEM text.
pub fn key_from_pem(pem: &str) -> Result<PrivateKeyDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| err("bad private key PEM", e))
}

/// A certificate with its key and the CA that issued it (PEM).
#[derive(Clone)]
pub struct Identity {
    /// Certificate, PEM.
    pub cert_pem: String,
    /// Private key, PEM.
    pub key_pem: String,
    /// The issuing CA, PEM.
    pub ca_pem: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("cert_fingerprint", &self.fingerprint().unwrap_or_default())
            .finish()
    }
}

const ID_CERT: &str = "cert.pem";
const ID_KEY: &str = "key.pem";

impl Identity {
    /// A new key and a CSR for it: (key PEM, CSR PEM).
    pub fn new_request(cn: &str) -> Result<(String, String)> {
        let key = KeyPair::generate().map_err(|e| err("generate key", e))?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, cn);
        let csr = params
            .serialize_request(&key)
            .map_err(|e| err("certificate request", e))?;
        Ok((
            key.serialize_pem(),
            csr.pem().map_err(|e| err("CSR PEM", e))?,
        ))
    }

    /// Load from `dir` (cert.pem, key.pem, ca.pem).
    pub fn load(dir: &Path) -> Result<Identity> {
        let read = |n: &str| {
            let p = dir.join(n);
            std::fs::read_to_string(&p).map_err(io_err(&p))
        };
        Ok(Identity {
            cert_pem: read(ID_CERT)?,
            key_pem: read(ID_KEY)?,
            ca_pem: read(CA_CERT)?,
        })
    }

    /// Whether `dir` holds an identity.
    pub fn exists(dir: &Path) -> bool {
        dir.join(ID_CERT).is_file() && dir.join(ID_KEY).is_file()
    }

    /// Save to `dir`; the key is readable by its owner only.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        write_private(&dir.join(ID_KEY), self.key_pem.as_bytes())?;
        write_file(&dir.join(ID_CERT), self.cert_pem.as_bytes())?;
        write_file(&dir.join(CA_CERT), self.ca_pem.as_bytes())
    }

    /// Fingerprint of the certificate.
    pub fn fingerprint(&self) -> Result<String> {
        Ok(fingerprint(&cert_der_from_pem(&self.cert_pem)?))
    }

    /// Sign `msg` with this identity's key (ECDSA P-256, SHA-256, the
    /// fixed r||s form), hex.
    pub fn sign(&self, msg: &[u8]) -> Result<String> {
        use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
        let der = key_from_pem(&self.key_pem)?;
        let rng = ring::rand::SystemRandom::new();
        let key =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der.secret_der(), &rng)
                .map_err(|e| PkiError::Invalid(format!("host key: {e}")))?;
        let sig = key
            .sign(&rng, msg)
            .map_err(|e| PkiError::Invalid(format!("sign: {e}")))?;
        Ok(hex(sig.as_ref()))
    }

    /// Whether the certificate should be renewed at Unix time `now`: less
    /// than a third of its validity is left.
    pub fn renewal_due(&self, now: i64) -> Result<bool> {
        let (from, until) = validity(&self.cert_pem)?;
        Ok(until - now < (until - from) / 3)
    }

    /// A TLS server config presenting this identity; `clients` says
    /// whether client certificates under the CA are required or optional.
    pub fn server_config(&self, clients: ClientAuth) -> Result<Arc<rustls::ServerConfig>> {
        install_crypto();
        let roots = Arc::new(root_store(&self.ca_pem)?);
        let verifier = rustls::server::WebPkiClientVerifier::builder(roots);
        let verifier = match clients {
            ClientAuth::Required => verifier,
            ClientAuth::Optional => verifier.allow_unauthenticated(),
        }
        .build()
        .map_err(|e| err("client verifier", e))?;
        let mut cfg = rustls::ServerConfig::builder()
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                certs_from_pem(&self.cert_pem)?,
                key_from_pem(&self.key_pem)?,
            )
            .map_err(|e| err("server certificate", e))?;
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(cfg))
    }
}

impl Identity {
    /// A TLS client config that trusts only the CA and presents this
    /// identity (host-to-host connections: the repository service).
    pub fn client_config(&self, alpn: &[u8]) -> Result<Arc<rustls::ClientConfig>> {
        install_crypto();
        let mut cfg = rustls::ClientConfig::builder()
            .with_root_certificates(root_store(&self.ca_pem)?)
            .with_client_auth_cert(
                certs_from_pem(&self.cert_pem)?,
                key_from_pem(&self.key_pem)?,
            )
            .map_err(|e| err("client certificate", e))?;
        cfg.alpn_protocols = vec![alpn.to_vec()];
        Ok(Arc::new(cfg))
    }
}

/// Whether a TLS server asks for client certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// Every client must present a certificate under the CA.
    Required,
    /// Clients may present one (the REST API: users come with a token).
    Optional,
}

/// A root store holding the CA(s) of a PEM text.
pub fn root_store(ca_pem: &str) -> Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs_from_pem(ca_pem)? {
        roots.add(c).map_err(|e| err("CA certificate", e))?;
    }
    Ok(roots)
}

/// An enrollment token: a one-time secret and the CA's fingerprint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrollmentToken {
    /// The secret the server checks (it stores only its hash).
    pub secret: String,
    /// SHA-256 of the CA certificate the host must see.
    pub ca_fingerprint: String,
}

impl std::fmt::Display for EnrollmentToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "dmj1.{}.{}", self.secret, self.ca_fingerprint)
    }
}

impl std::str::FromStr for EnrollmentToken {
    type Err = PkiError;
    fn from_str(s: &str) -> Result<Self> {
        let mut it = s.trim().split('.');
        match (it.next(), it.next(), it.next(), it.next()) {
            (Some("dmj1"), Some(secret), Some(fp), None)
                if !secret.is_empty()
                    && fp.len() == 64
                    && fp.bytes().all(|b| b.is_ascii_hexdigit()) =>
            {
                Ok(EnrollmentToken {
                    secret: secret.into(),
                    ca_fingerprint: fp.to_ascii_lowercase(),
                })
            }
            _ => Err(PkiError::Invalid(
                "not an enrollment token (expected dmj1.<secret>.<ca sha256>)".into(),
            )),
        }
    }
}

/// Write a file (certificates: anyone may read them).
pub fn write_file(p: &Path, b: &[u8]) -> Result<()> {
    replace_file(p, b, 0o644)
}

/// Write `b` to `p` whole or not at all: a new file with `mode` beside it,
/// synced, then renamed over `p` (a crash leaves the old file or the new
/// one, never a torn or missing one).
fn replace_file(p: &Path, b: &[u8], mode: u32) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let name = p
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = p.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .and_then(|mut f| f.write_all(b).and_then(|_| f.sync_all()))
        .and_then(|_| std::fs::rename(&tmp, p))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            io_err(p)(e)
        })
}

/// Whether `sig` (hex, from [`Identity::sign`]) is a signature of `msg`
/// by the key of the PEM certificate `cert_pem`.
pub fn verify_signature(cert_pem: &str, msg: &[u8], sig: &str) -> bool {
    use ring::signature::{ECDSA_P256_SHA256_FIXED, UnparsedPublicKey};
    let Ok(der) = cert_der_from_pem(cert_pem) else {
        return false;
    };
    let Ok((_, c)) = x509_parser::parse_x509_certificate(der.as_ref()) else {
        return false;
    };
    let Some(sig) = unhex(sig) else {
        return false;
    };
    let point = c.public_key().subject_public_key.data.as_ref();
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point)
        .verify(msg, &sig)
        .is_ok()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 || s.len() > 1024 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The validity of a PEM certificate: (not before, not after), in Unix
/// seconds.
pub fn validity(cert_pem: &str) -> Result<(i64, i64)> {
    validity_der(cert_der_from_pem(cert_pem)?.as_ref())
}

/// [`validity`] of a DER certificate.
pub fn validity_der(der: &[u8]) -> Result<(i64, i64)> {
    let (_, c) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| PkiError::Invalid(format!("certificate: {e}")))?;
    let v = c.validity();
    Ok((v.not_before.timestamp(), v.not_after.timestamp()))
}

/// Write a file readable by its owner only.
pub fn write_private(p: &Path, b: &[u8]) -> Result<()> {
    replace_file(p, b, 0o600)
}
