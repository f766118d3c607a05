//! VM addresses: `qmp+unix:///path/qmp.sock` or `qmp://host:port`, with
//! their parameters.
//!
//! Invariant: a parsed address has an absolute socket path or a
//! host:port, and every parameter was recognised and checked.

use super::*;

/// A VM address: `qmp+unix:///path/to/qmp.sock` or `qmp://host:port`,
/// with optional parameters after `?`:
/// * `nbd-server=PATH|HOST:PORT`: the VM's NBD server, when it already
///   runs one (a VM process has at most one); otherwise the backup starts
///   one for the run and stops it afterwards;
/// * `nbd-port=N`: port for the NBD server started on a TCP VM (10809);
/// * `overlay-dir=PATH`: where the VM host keeps overlays while a disk is
///   frozen (default: next to the disk's image file);
/// * `agent=PATH|HOST:PORT`: the host side of the VM's guest-agent channel
///   (`org.qemu.guest_agent.0`), for application-consistent points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmAddress {
    /// The address as given.
    pub spec: String,
    /// The QMP monitor.
    pub qmp: QmpAddr,
    /// The VM's running NBD server, if any.
    pub nbd_server: Option<String>,
    /// Port for an NBD server started on a TCP VM.
    pub nbd_port: u16,
    /// Directory for overlays.
    pub overlay_dir: Option<PathBuf>,
    /// The guest agent's socket.
    pub agent: Option<String>,
}

/// Whether `spec` names a VM.
pub fn is_vm(spec: &str) -> bool {
    spec.starts_with("qmp://") || spec.starts_with("qmp+unix://")
}

impl VmAddress {
    /// Parse a VM address.
    pub fn parse(spec: &str) -> Result<VmAddress> {
        let bad = |why: &str| {
            Error::InvalidArgument(format!(
                "bad VM address {spec:?}: {why} (qmp+unix:///path/to/qmp.sock or qmp://host:port, optionally ?nbd-server=…&overlay-dir=…)"
            ))
        };
        let (base, query) = spec.split_once('?').unwrap_or((spec, ""));
        let qmp = if let Some(p) = base.strip_prefix("qmp+unix://") {
            if !p.starts_with('/') {
                return Err(bad("the socket path must be absolute"));
            }
            QmpAddr::Unix(PathBuf::from(p))
        } else if let Some(hp) = base.strip_prefix("qmp://") {
            let hp = hp.trim_end_matches('/');
            match hp.rsplit_once(':') {
                Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok() => {
                    QmpAddr::Tcp(hp.to_string())
                }
                _ => return Err(bad("give host:port")),
            }
        } else {
            return Err(bad("unknown scheme"));
        };
        let mut a = VmAddress {
            spec: spec.to_string(),
            qmp,
            nbd_server: None,
            nbd_port: 10809,
            overlay_dir: None,
            agent: None,
        };
        for kv in query.split('&').filter(|s| !s.is_empty()) {
            match kv.split_once('=') {
                Some(("nbd-server", v)) if !v.is_empty() => a.nbd_server = Some(v.to_string()),
                Some(("nbd-port", v)) => {
                    a.nbd_port = v
                        .parse()
                        .map_err(|_| bad("nbd-port must be a port number"))?
                }
                Some(("overlay-dir", v)) if v.starts_with('/') => {
                    a.overlay_dir = Some(PathBuf::from(v))
                }
                Some(("agent", v))
                    if v.starts_with('/')
                        || v.rsplit_once(':')
                            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok()) =>
                {
                    a.agent = Some(v.to_string())
                }
                _ => return Err(bad(&format!("unknown or empty parameter {kv:?}"))),
            }
        }
        Ok(a)
    }

    /// Whether the VM runs on this host (its monitor is a unix socket or a
    /// loopback address): the condition for HotAdd.
    pub fn is_local(&self) -> bool {
        match &self.qmp {
            QmpAddr::Unix(_) => true,
            QmpAddr::Tcp(hp) => {
                let host = hp.rsplit_once(':').map_or(hp.as_str(), |h| h.0);
                let host = host.trim_start_matches('[').trim_end_matches(']');
                host == "localhost"
                    || host
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            }
        }
    }
}
