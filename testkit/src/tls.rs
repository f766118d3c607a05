//! Test certificates with openssl: a CA, and server or client
//! certificates it signs, laid out as QEMU's `tls-creds-x509` and our NBD
//! client and server expect (`ca-cert.pem`, `ROLE-cert.pem`,
//! `ROLE-key.pem`).

use std::path::{Path, PathBuf};

use crate::run;

/// A CA (in `dir/name-ca`) and certificates it signs, made with openssl.
pub fn make_ca(dir: &Path, name: &str) -> PathBuf {
    let ca = dir.join(format!("{name}-ca"));
    std::fs::create_dir_all(&ca).unwrap();
    let p = |f: &str| ca.join(f).to_str().unwrap().to_string();
    run(
        "openssl",
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &p("ca-key.pem"),
            "-out",
            &p("ca-cert.pem"),
            "-days",
            "2",
            "-subj",
            &format!("/CN={name} test CA"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    ca
}

/// `out/{role}-cert.pem` + `-key.pem` signed by `ca`, and `ca-cert.pem`.
pub fn issue(ca: &Path, out: &Path, role: &str) {
    std::fs::create_dir_all(out).unwrap();
    let c = |f: &str| ca.join(f).to_str().unwrap().to_string();
    let o = |f: &str| out.join(f).to_str().unwrap().to_string();
    let ext = out.join(format!("{role}.ext"));
    std::fs::write(
        &ext,
        if role == "server" {
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        } else {
            "extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        },
    )
    .unwrap();
    let (key, csr, cert) = (
        o(&format!("{role}-key.pem")),
        o(&format!("{role}.csr")),
        o(&format!("{role}-cert.pem")),
    );
    run(
        "openssl",
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            &format!("/CN={role}"),
        ],
    );
    run(
        "openssl",
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &c("ca-cert.pem"),
            "-CAkey",
            &c("ca-key.pem"),
            "-CAcreateserial",
            "-out",
            &cert,
            "-days",
            "2",
            "-extfile",
            ext.to_str().unwrap(),
        ],
    );
    std::fs::copy(ca.join("ca-cert.pem"), out.join("ca-cert.pem")).unwrap();
}
