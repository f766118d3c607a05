//! The installation's certificate authority: the signing half of the
//! PKI, held only by the server (hosts hold [`Identity`]s, see
//! `datamover_control::pki`).
//!
//! Invariant: the CA (ECDSA P-256) signs only certificates whose subject
//! and names come from the server's inventory, never from a request; a
//! host's key never reaches the server (it sends a CSR). Each certificate
//! has the usages its holder needs and no more ([`Usage`]): the server's
//! is a TLS server certificate only, the built-in proxy's a client one
//! only, and a host's both (it calls the server and serves its
//! repository service).

use std::path::Path;

use datamover_control::pki::{
    CA_CERT, Identity, Result, cert_der_from_pem, err, fingerprint, io_err, write_file,
    write_private,
};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::CertificateDer;

/// What a certificate may be used for (its extended key usages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// A TLS server only (the server's HTTPS port).
    Server,
    /// A TLS client only (the built-in proxy).
    Client,
    /// Both: a host calls the server and serves its repository service.
    Host,
}

/// The installation's certificate authority (held by the server).
pub struct Ca {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("fingerprint", &self.fingerprint())
            .finish()
    }
}

const CA_KEY: &str = "ca.key";

impl Ca {
    /// Load the CA from `dir`, creating it on first use.
    pub fn load_or_create(dir: &Path, name: &str) -> Result<Ca> {
        let (cp, kp) = (dir.join(CA_CERT), dir.join(CA_KEY));
        if cp.exists() || kp.exists() {
            let cert_pem = std::fs::read_to_string(&cp).map_err(io_err(&cp))?;
            let key_pem = std::fs::read_to_string(&kp).map_err(io_err(&kp))?;
            let key = KeyPair::from_pem(&key_pem).map_err(|e| err("CA key", e))?;
            let issuer =
                Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| err("CA certificate", e))?;
            let cert_der = cert_der_from_pem(&cert_pem)?;
            return Ok(Ca {
                cert_pem,
                cert_der,
                issuer,
            });
        }
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let key = KeyPair::generate().map_err(|e| err("generate CA key", e))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("datamover CA {name}"));
        dn.push(DnType::OrganizationName, "datamover");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        params.not_after = rcgen::date_time_ymd(2044, 1, 1);
        let cert = params.self_signed(&key).map_err(|e| err("sign CA", e))?;
        let cert_pem = cert.pem();
        write_private(&kp, key.serialize_pem().as_bytes())?;
        write_file(&cp, cert_pem.as_bytes())?;
        Ok(Ca {
            cert_der: cert.der().clone(),
            cert_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// SHA-256 fingerprint of the CA certificate.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.cert_der)
    }

    fn leaf_params(
        cn: &str,
        names: &[String],
        usage: Usage,
        lifetime: Option<std::time::Duration>,
    ) -> Result<CertificateParams> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        dn.push(DnType::OrganizationName, "datamover");
        params.distinguished_name = dn;
        params.subject_alt_names = names
            .iter()
            .map(|n| match n.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => n.clone().try_into().map(SanType::DnsName).map_err(|_| {
                    datamover_control::pki::PkiError::Invalid(format!(
                        "{n:?} is neither an IP address nor a DNS name"
                    ))
                }),
            })
            .collect::<Result<_>>()?;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = match usage {
            Usage::Server => vec![ExtendedKeyUsagePurpose::ServerAuth],
            Usage::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
            Usage::Host => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        };
        // Hosts' certificates live `lifetime` (from a little before now,
        // for clocks a little behind) and are renewed over the agent
        // channel; the server's own is issued afresh at every start.
        match lifetime {
            Some(l) => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default();
                let skew = (l / 10).min(std::time::Duration::from_secs(300));
                let epoch = rcgen::date_time_ymd(1970, 1, 1);
                params.not_before = epoch + now.saturating_sub(skew);
                params.not_after = epoch + now + l;
            }
            None => {
                params.not_before = rcgen::date_time_ymd(2024, 1, 1);
                params.not_after = rcgen::date_time_ymd(2044, 1, 1);
            }
        }
        let mut serial = [0u8; 16];
        getrandom::fill(&mut serial)
            .map_err(|e| err("random", std::io::Error::other(e.to_string())))?;
        serial[0] &= 0x7f;
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        Ok(params)
    }

    /// Issue a certificate and a new key for `cn`, valid for `names`
    /// (host names or IP addresses) and for `usage` only: the server's own
    /// certificate (until 2044: it is issued afresh at every start).
    pub fn issue(&self, cn: &str, names: &[String], usage: Usage) -> Result<Identity> {
        self.issue_for(cn, names, usage, None)
    }

    /// [`Ca::issue`], valid for `lifetime` from now (none: until 2044).
    pub fn issue_for(
        &self,
        cn: &str,
        names: &[String],
        usage: Usage,
        lifetime: Option<std::time::Duration>,
    ) -> Result<Identity> {
        let key = KeyPair::generate().map_err(|e| err("generate key", e))?;
        let cert = Self::leaf_params(cn, names, usage, lifetime)?
            .signed_by(&key, &self.issuer)
            .map_err(|e| err("sign certificate", e))?;
        Ok(Identity {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            ca_pem: self.cert_pem.clone(),
        })
    }

    /// Sign a host's CSR for `usage`, valid for `lifetime` (none: until
    /// 2044). The subject and names come from the server's inventory,
    /// never from the request.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        cn: &str,
        names: &[String],
        usage: Usage,
        lifetime: Option<std::time::Duration>,
    ) -> Result<String> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| err("certificate request", e))?;
        let req = CertificateSigningRequestParams {
            params: Self::leaf_params(cn, names, usage, lifetime)?,
            public_key: csr.public_key,
        };
        Ok(req
            .signed_by(&self.issuer)
            .map_err(|e| err("sign certificate", e))?
            .pem())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datamover_control::pki::{ClientAuth, EnrollmentToken};

    #[test]
    fn ca_signs_a_csr_and_rustls_accepts_the_chain() {
        let d = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(d.path(), "t").unwrap();
        let again = Ca::load_or_create(d.path(), "t").unwrap();
        assert_eq!(ca.fingerprint(), again.fingerprint());
        let (key, csr) = Identity::new_request("ignored").unwrap();
        let cert = again
            .sign_csr(
                &csr,
                "host-a",
                &["127.0.0.1".into(), "host-a".into()],
                Usage::Host,
                None,
            )
            .unwrap();
        let id = Identity {
            cert_pem: cert,
            key_pem: key,
            ca_pem: ca.cert_pem().into(),
        };
        id.server_config(ClientAuth::Required).unwrap();
        let tok = EnrollmentToken {
            secret: "abc".into(),
            ca_fingerprint: ca.fingerprint(),
        };
        assert_eq!(tok.to_string().parse::<EnrollmentToken>().unwrap(), tok);
        assert!("dmj1.x.zz".parse::<EnrollmentToken>().is_err());
    }

    /// Each certificate is good for its usage only: the server's cannot
    /// authenticate a client, the built-in proxy's cannot serve TLS, a
    /// host's does both; and none is good for a name it was not given.
    #[test]
    fn certificates_have_the_usages_their_holders_need_and_no_more() {
        use rustls::client::danger::ServerCertVerifier;
        datamover_control::pki::install_crypto();
        let d = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(d.path(), "t").unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert_der().clone()).unwrap();
        let roots = std::sync::Arc::new(roots);
        let as_server = rustls::client::WebPkiServerVerifier::builder(roots.clone())
            .build()
            .unwrap();
        let as_client = rustls::server::WebPkiClientVerifier::builder(roots)
            .build()
            .unwrap();
        let now = rustls_pki_types::UnixTime::now();
        let name = |n: &str| rustls_pki_types::ServerName::try_from(n.to_string()).unwrap();
        let check = |id: &Identity, host: &str| {
            let der = cert_der_from_pem(&id.cert_pem).unwrap();
            let server = as_server
                .verify_server_cert(&der, &[], &name(host), &[], now)
                .is_ok();
            let client = as_client.verify_client_cert(&der, &[], now).is_ok();
            (server, client)
        };
        let server = ca
            .issue("dm-server", &["dm.example".into()], Usage::Server)
            .unwrap();
        let builtin = ca
            .issue("builtin", &["localhost".into()], Usage::Client)
            .unwrap();
        let (key, csr) = Identity::new_request("ignored").unwrap();
        let host = Identity {
            cert_pem: ca
                .sign_csr(&csr, "kvm1", &["kvm1".into()], Usage::Host, None)
                .unwrap(),
            key_pem: key,
            ca_pem: ca.cert_pem().into(),
        };
        assert_eq!(check(&server, "dm.example"), (true, false));
        assert_eq!(check(&builtin, "localhost"), (false, true));
        assert_eq!(check(&host, "kvm1"), (true, true));
        assert_eq!(check(&host, "dm.example"), (false, true));
    }

    /// A host's signature (receipts) verifies under its certificate only,
    /// and only for the bytes it signed.
    #[test]
    fn signatures_verify_under_the_signers_certificate_only() {
        let d = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(d.path(), "t").unwrap();
        let a = ca.issue("a", &["a".into()], Usage::Host).unwrap();
        let b = ca.issue("b", &["b".into()], Usage::Host).unwrap();
        let sig = a.sign(b"dm-receipt/1\n1\n").unwrap();
        use datamover_control::pki::verify_signature;
        assert!(verify_signature(&a.cert_pem, b"dm-receipt/1\n1\n", &sig));
        assert!(!verify_signature(&a.cert_pem, b"dm-receipt/1\n2\n", &sig));
        assert!(!verify_signature(&b.cert_pem, b"dm-receipt/1\n1\n", &sig));
        assert!(!verify_signature(&a.cert_pem, b"dm-receipt/1\n1\n", "zz"));
        assert!(!verify_signature("not a certificate", b"x", &sig));
    }
}
