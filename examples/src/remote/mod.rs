//! `dm --server URL …`: the commands that talk to a dm-server. Glue only:
//! every call is one REST request through `datamover_control::client`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use datamover_control::api::{
    Host, HostAdded, HostPatch, HostRole, Job, JobDisk, JobKind, JobSpec, JobVm, NewHost, Proxy,
    ProxyPatch, ReplicaAction, ReplicaRequest, Repository, Session, State,
};
use datamover_control::client::{Auth, Client, ClientError};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use crate::Failure;

mod files;
mod hosts;
mod jobs;
mod proxies;
mod recoveries;
mod repos;
mod sessions;
mod tokens;
mod vms;

pub use files::{files_ls, files_tar};
pub use hosts::{HostCmd, host};
pub use jobs::{JobCmd, job};
pub use proxies::{ProxyCmd, proxy};
pub use recoveries::{RecoveryCmd, recovery};
pub use repos::{RepoCmd, repo};
pub use sessions::{SessionCmd, session};
pub use tokens::{AuditArgs, TokenCmd, audit, token};
pub use vms::{VmCmd, vm};

/// How to reach the server.
#[derive(Args, Debug, Clone)]
pub struct ServerArgs {
    /// The dm-server, https://host:port (commands host, proxy, repo, job, session).
    #[arg(long, global = true, env = "DM_SERVER")]
    pub server: Option<String>,
    /// API token (or --token-file).
    #[arg(long, global = true, env = "DM_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// File holding the API token (the server writes admin.token in its data directory).
    #[arg(long, global = true, env = "DM_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// The server's CA certificate (ca/ca.pem in its data directory).
    #[arg(long, global = true, env = "DM_CA")]
    pub ca: Option<PathBuf>,
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        let code = match e.status() {
            Some(s) if (400..500).contains(&s) => 2,
            _ => 1,
        };
        Failure(code, e.to_string())
    }
}

impl ServerArgs {
    fn client(&self) -> Result<Client, Failure> {
        let server = self.server.as_deref().ok_or_else(|| {
            Failure(
                2,
                "this command talks to a server: give --server URL (or DM_SERVER)".into(),
            )
        })?;
        let ca_path = self.ca.as_ref().ok_or_else(|| {
            Failure(
                2,
                "give the server's CA certificate with --ca FILE (or DM_CA)".into(),
            )
        })?;
        let ca = std::fs::read_to_string(ca_path)
            .map_err(|e| Failure(2, format!("--ca {}: {e}", ca_path.display())))?;
        let token = match (&self.token, &self.token_file) {
            (Some(t), _) => t.clone(),
            (None, Some(f)) => std::fs::read_to_string(f)
                .map_err(|e| Failure(2, format!("--token-file {}: {e}", f.display())))?
                .trim()
                .to_string(),
            (None, None) => {
                return Err(Failure(
                    2,
                    "give an API token with --token, --token-file or DM_TOKEN".into(),
                ));
            }
        };
        Ok(Client::new(
            server,
            &ca,
            None,
            Auth::Token(token),
            Duration::from_secs(60),
        )?)
    }
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<u8, Failure> {
    let s = serde_json::to_string_pretty(v).map_err(|e| Failure(1, e.to_string()))?;
    println!("{s}");
    Ok(0)
}

fn pairs(what: &str, v: &[String]) -> Result<HashMap<String, String>, Failure> {
    v.iter()
        .map(|p| {
            p.split_once('=')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| Failure(2, format!("--{what} {p:?}: expected NAME=VALUE")))
        })
        .collect()
}
