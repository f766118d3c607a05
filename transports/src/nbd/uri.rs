//! NBD addresses as URIs, the libnbd way:
//! `nbd://host[:port]/export`, `nbds://…` (TLS), `nbd+unix:///export?socket=PATH`,
//! `nbds+unix:///export?socket=PATH`; `tls-certificates=DIR` and
//! `tls-hostname=NAME` in the query.
//! Invariant: a parsed address is complete (a TCP host and port, or a
//! socket path) and says whether TLS is required.

use std::path::PathBuf;

/// Default NBD TCP port.
pub const DEFAULT_PORT: u16 = 10809;

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// TCP host and port.
    Tcp {
        /// Host name or address.
        host: String,
        /// Port.
        port: u16,
    },
    /// Unix domain socket.
    Unix(PathBuf),
}

/// A parsed NBD address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    /// Where to connect.
    pub endpoint: Endpoint,
    /// Export name ("" is the default export).
    pub export: String,
    /// TLS is required (`nbds…`); never downgraded.
    pub tls: bool,
    /// Directory with `ca-cert.pem` (and optional client cert/key).
    pub tls_certificates: Option<PathBuf>,
    /// The name the server's certificate must carry, when not the host
    /// (default for unix sockets: `localhost`).
    pub tls_hostname: Option<String>,
}

fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = s.get(i + 1..i + 3).ok_or("truncated %-escape")?;
            out.push(u8::from_str_radix(h, 16).map_err(|_| format!("bad %-escape %{h}"))?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "escape is not UTF-8".to_string())
}

impl NbdUri {
    /// Parse an NBD URI; the error says what is wrong.
    pub fn parse(uri: &str) -> Result<NbdUri, String> {
        let (scheme, rest) = uri
            .split_once("://")
            .ok_or("an NBD address starts with nbd://, nbds://, nbd+unix:// or nbds+unix://")?;
        let (tls, unix) = match scheme {
            "nbd" => (false, false),
            "nbds" => (true, false),
            "nbd+unix" => (false, true),
            "nbds+unix" => (true, true),
            s => return Err(format!("unknown NBD scheme {s}://")),
        };
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let export = percent_decode(path)?;
        let mut socket = None;
        let mut tls_certificates = None;
        let mut tls_hostname = None;
        for kv in query.split('&').filter(|s| !s.is_empty()) {
            let (k, val) = kv.split_once('=').unwrap_or((kv, ""));
            let val = percent_decode(val)?;
            match k {
                "socket" => socket = Some(PathBuf::from(val)),
                "tls-certificates" => tls_certificates = Some(PathBuf::from(val)),
                "tls-hostname" => tls_hostname = Some(val),
                _ => {
                    return Err(format!(
                        "unknown NBD URI parameter {k:?} (known: socket, tls-certificates, tls-hostname)"
                    ));
                }
            }
        }
        let endpoint = if unix {
            if !authority.is_empty() {
                return Err("nbd+unix:// takes no host: nbd+unix:///export?socket=PATH".into());
            }
            Endpoint::Unix(socket.ok_or("nbd+unix:// needs ?socket=PATH")?)
        } else {
            if socket.is_some() {
                return Err("socket= belongs to nbd+unix:// addresses".into());
            }
            let (host, port) = if let Some(h) = authority.strip_prefix('[') {
                let (h, p) = h.split_once(']').ok_or("unclosed [ in IPv6 address")?;
                (h.to_string(), p.strip_prefix(':'))
            } else {
                match authority.rsplit_once(':') {
                    Some((h, p)) => (h.to_string(), Some(p)),
                    None => (authority.to_string(), None),
                }
            };
            if host.is_empty() {
                return Err("no host in NBD address".into());
            }
            let port = match port {
                Some(p) => p.parse().map_err(|_| format!("bad port {p:?}"))?,
                None => DEFAULT_PORT,
            };
            Endpoint::Tcp { host, port }
        };
        Ok(NbdUri {
            endpoint,
            export,
            tls,
            tls_certificates,
            tls_hostname,
        })
    }
}

impl std::fmt::Display for NbdUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = if self.tls { "nbds" } else { "nbd" };
        match &self.endpoint {
            Endpoint::Tcp { host, port } => write!(f, "{s}://{host}:{port}/{}", self.export),
            Endpoint::Unix(p) => write!(f, "{s}+unix:///{}?socket={}", self.export, p.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_libnbd_forms() {
        let u = NbdUri::parse("nbd://localhost/disk").expect("tcp");
        assert_eq!(
            u.endpoint,
            Endpoint::Tcp {
                host: "localhost".into(),
                port: 10809
            }
        );
        assert_eq!((u.export.as_str(), u.tls), ("disk", false));
        let u =
            NbdUri::parse("nbds://127.0.0.1:10900/a%20b?tls-certificates=/etc/pki").expect("tls");
        assert_eq!(
            u.endpoint,
            Endpoint::Tcp {
                host: "127.0.0.1".into(),
                port: 10900
            }
        );
        assert_eq!((u.export.as_str(), u.tls), ("a b", true));
        assert_eq!(u.tls_certificates, Some(PathBuf::from("/etc/pki")));
        let u = NbdUri::parse("nbd+unix:///?socket=/run/x.sock").expect("unix");
        assert_eq!(
            (u.endpoint, u.export.as_str()),
            (Endpoint::Unix("/run/x.sock".into()), "")
        );
        let u = NbdUri::parse("nbd://[::1]:99/e").expect("v6");
        assert_eq!(
            u.endpoint,
            Endpoint::Tcp {
                host: "::1".into(),
                port: 99
            }
        );
        for bad in [
            "nbd+unix:///x",
            "nbd://",
            "nbd://h:port/x",
            "nfs://h/x",
            "nbd://h/x?foo=1",
            "nbd+unix://host/x?socket=/s",
            "nbd://h/%zz",
        ] {
            assert!(NbdUri::parse(bad).is_err(), "{bad} accepted");
        }
    }
}
