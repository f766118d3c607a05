//! # datamover-proxy — the proxy side of a datamover installation
//!
//! * [`agent`]: the transport service. It heartbeats to the server, takes
//!   the per-disk tasks the server assigns to its slots and runs each as a
//!   data mover ([`transports::backup`]), streaming progress.
//! * [`installer`]: the installer service of a managed host: deploys,
//!   runs, upgrades and removes the proxy component as the server's roles
//!   for the host say.
//! * [`repo_service`]: the target data mover: a repository service other
//!   proxies write to (sending only the chunks it lacks), which also keeps
//!   replica images, and its client.
//!
//! A host joins once with [`enroll`] (one-time token) and from then on
//! authenticates with its certificate. The contracts it speaks (API
//! shapes, identities, the API client) live in `datamover-control`.

#![warn(missing_docs)]

pub mod agent;
pub mod error;
mod files;
pub mod identity;
pub mod installer;
mod recoveries;
pub mod repo_service;

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use datamover::Repository;
use datamover_control::client::ClientError;
use datamover_control::pki::Identity;
pub use datamover_control::{SERVER_FILE, enroll};

/// Logging of the server's and hosts' binaries: to stderr, `info` unless
/// `DM_LOG` says otherwise (`DM_LOG=debug`, `DM_LOG=datamover_proxy=trace`).
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// A host's way in, for `dm-proxy run` and `dm-installer`: enroll with
/// `token` unless `dir` already holds an identity, then return the server
/// URL (`server`, else the one enrolled with).
pub fn join(dir: &Path, server: Option<&str>, token: Option<&str>) -> Result<String, ClientError> {
    if !Identity::exists(dir) {
        match (token, server) {
            (Some(t), Some(s)) => {
                let (e, _) = enroll(s, t, dir)?;
                tracing::info!("enrolled as {}", e.host);
            }
            _ => {
                return Err(ClientError::Config(format!(
                    "not enrolled: no identity in {} (run `dm-proxy enroll --server URL --token TOKEN`, or give --server and --token; `dm host add` prints the token)",
                    dir.display()
                )));
            }
        }
    }
    match server {
        Some(s) => Ok(s.to_string()),
        None => {
            let p = dir.join(SERVER_FILE);
            let s = std::fs::read_to_string(&p).map_err(|e| {
                ClientError::Config(format!("{}: {e} (give --server URL)", p.display()))
            })?;
            Ok(s.trim().to_string())
        }
    }
}

/// Open the repository at `path`, creating it when the directory is new
/// or empty. Several tasks (on this proxy or others) may do this at the
/// same moment: the loser of the race waits for the winner's config.
pub fn open_or_init(path: &Path) -> datamover::Result<Repository> {
    static INIT: Mutex<()> = Mutex::new(());
    let _g = INIT.lock().unwrap_or_else(|p| p.into_inner());
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut tried_init = false;
    loop {
        match Repository::open(path) {
            Err(datamover::Error::NotARepository { .. }) if !tried_init => {
                tried_init = true;
                if let Ok(r) = Repository::init(path) {
                    tracing::info!("created repository {}", path.display());
                    return Ok(r);
                }
            }
            Err(datamover::Error::NotARepository { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100));
            }
            r => return r,
        }
    }
}

/// No datastore may hold `secrets` (a directory of keys, a catalog) or
/// lie inside it: a task could otherwise copy the keys out through a
/// backup, or overwrite them with a restore. Paths are resolved first
/// (a datastore that does not exist yet is taken as written).
pub fn check_datastores_outside(
    datastores: &[std::path::PathBuf],
    secrets: &Path,
) -> Result<(), String> {
    let s = std::fs::canonicalize(secrets).unwrap_or_else(|_| secrets.to_path_buf());
    for d in datastores {
        if !d.is_absolute() {
            return Err(format!(
                "datastore {}: give an absolute directory",
                d.display()
            ));
        }
        let r = std::fs::canonicalize(d).unwrap_or_else(|_| d.clone());
        if s.starts_with(&r) || r.starts_with(&s) {
            return Err(format!(
                "datastore {} would give tasks access to {} (keys and state): give a directory outside it",
                d.display(),
                s.display()
            ));
        }
    }
    Ok(())
}
