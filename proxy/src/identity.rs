//! A host's identity that renews itself: host certificates are short-lived
//! (30 days by default, the server's `--host-cert-days`), and each host
//! asks the server for a new one, for a new key, over the agent channel
//! when a third of its validity is left.
//!
//! The agent, the mover and the repository service of one process share a
//! [`LiveIdentity`]; the installer and the proxy it runs share the state
//! directory, so a renewal takes `<dir>/renew.lock` and each process
//! adopts the files another one renewed before it considers renewing.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use datamover_control::api::{AGENT, RenewRequest, Renewed};
use datamover_control::client::Client;
use datamover_control::pki::Identity;

use crate::error::ProxyError;

/// A host identity that follows renewals.
#[derive(Debug, Clone)]
pub struct LiveIdentity {
    current: Arc<RwLock<Identity>>,
    /// Where it is kept (none: in memory only, the built-in proxy's).
    dir: Option<PathBuf>,
}

impl LiveIdentity {
    /// `id`, kept in `dir` if given.
    pub fn new(id: Identity, dir: Option<PathBuf>) -> LiveIdentity {
        LiveIdentity {
            current: Arc::new(RwLock::new(id)),
            dir,
        }
    }

    /// The identity as it is now.
    pub fn get(&self) -> Identity {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set(&self, id: Identity) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = id;
    }

    /// [`LiveIdentity::refresh`], then make `client` (of `server`) again
    /// from the identity if it changed; problems are logged, and the
    /// next call tries again.
    pub fn keep_fresh(&self, server: &str, client: &mut Client) {
        match self.refresh(client) {
            Ok(true) => match Client::for_host(server, &self.get()) {
                Ok(c) => *client = c,
                Err(e) => tracing::warn!("renewed certificate not usable: {e}"),
            },
            Ok(false) => {}
            Err(e) => tracing::warn!("certificate renewal failed: {e}"),
        }
    }

    /// Adopt a renewal another process made, then renew through `client`
    /// if a third or less of the certificate's validity is left. Returns
    /// whether the identity changed (clients made from it must be made
    /// again).
    pub fn refresh(&self, client: &Client) -> Result<bool, ProxyError> {
        let _lock = match &self.dir {
            Some(d) => {
                let p = d.join("renew.lock");
                let f = std::fs::File::create(&p)
                    .map_err(ProxyError::io(format!("open {}", p.display())))?;
                use std::os::fd::AsRawFd;
                // SAFETY: flock on a descriptor this function owns; the
                // lock is released when `f` is closed.
                if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
                    return Err(ProxyError::io(format!("lock {}", p.display()))(
                        std::io::Error::last_os_error(),
                    ));
                }
                Some(f)
            }
            None => None,
        };
        let mut changed = false;
        if let Some(d) = &self.dir
            && let Ok(on_disk) = Identity::load(d)
            && on_disk.cert_pem != self.get().cert_pem
        {
            self.set(on_disk);
            changed = true;
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let cur = self.get();
        if !cur.renewal_due(now)? {
            return Ok(changed);
        }
        let (key_pem, csr) = Identity::new_request("renewal")?;
        let r: Renewed = client.post(&format!("{AGENT}/renew"), &RenewRequest { csr })?;
        let new = Identity {
            cert_pem: r.cert,
            key_pem,
            ca_pem: cur.ca_pem,
        };
        if let Some(d) = &self.dir {
            new.save(d)?;
        }
        self.set(new);
        tracing::info!("host certificate renewed");
        Ok(true)
    }
}
