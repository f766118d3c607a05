//! # datamover-server — the point of control
//!
//! One process: the catalog in SQLite ([`catalog`]), the inventory, jobs
//! and task life cycle ([`engine`]), placement of per-disk tasks on proxy
//! slots ([`scheduler`]), and the HTTPS REST and agent APIs ([`http`]),
//! under the installation's own CA. With no proxy added, its built-in
//! proxy (the same agent code as `dm-proxy`) moves the data itself.
//!
//! Files in the data directory:
//!
//! | file | what |
//! |---|---|
//! | `catalog.sqlite` | the catalog (WAL mode; 0600) |
//! | `ca/ca.pem`, `ca/ca.key` | the CA (key mode 0600) |
//! | `admin.token` | the first API token, written once (0600) |
//! | `server.url` | the URL the server listens at, written at each start |
//!
//! The directory itself is 0700 (set at every start): only the server's
//! user reads the catalog, the CA key and the tokens. No datastore of the
//! built-in proxy may contain it or lie inside it.
//!
//! Installers of managed hosts fetch the proxy component from the server:
//! by default the `dm-proxy` next to `dm-server` (`--proxy-package`), see
//! [`deploy`].

#![warn(missing_docs)]

pub mod ca;
pub mod catalog;
pub mod deploy;
pub mod engine;
pub mod http;
pub mod scheduler;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::ca::Ca;
use datamover_control::pki::{self, ClientAuth};
use datamover_proxy::agent::{self, AgentConfig};

pub use engine::{Engine, Timing};

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Data directory (catalog, CA, tokens).
    pub data: PathBuf,
    /// Address to listen at (port 0: any free port; see `server.url`).
    pub listen: SocketAddr,
    /// Extra names or addresses for the server's certificate.
    pub names: Vec<String>,
    /// Run the built-in proxy (it works while no other proxy exists).
    pub builtin_proxy: bool,
    /// Datastores the built-in proxy sees (none: it gets no path tasks).
    /// None may contain the data directory or lie inside it.
    pub builtin_datastores: Vec<PathBuf>,
    /// The built-in proxy's host as a hypervisor: its libvirt connection.
    pub builtin_hypervisor: Option<String>,
    /// Task life cycle timing.
    pub timing: Timing,
    /// The proxy component's package handed to installers (none: hosts
    /// cannot be given the proxy role).
    pub proxy_package: Option<PathBuf>,
    /// What clients may hold of the HTTPS port.
    pub http: http::Limits,
}

/// What can stop the server from starting.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The CA or the server's certificate.
    #[error(transparent)]
    Pki(#[from] datamover_control::pki::PkiError),
    /// The catalog cannot be opened or migrated.
    #[error(transparent)]
    Catalog(#[from] catalog::CatalogError),
    /// The engine's first steps (the bootstrap token, the built-in
    /// proxy's identity).
    #[error(transparent)]
    Engine(#[from] engine::EngineError),
    /// A setting that cannot be used.
    #[error("{0}")]
    Config(String),
    /// A directory, a file or the listening socket.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// Why it failed.
        source: std::io::Error,
    },
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> StartError {
    let context = context.into();
    move |source| StartError::Io { context, source }
}

/// Run the server until the process ends.
pub async fn run(cfg: ServerConfig) -> Result<(), StartError> {
    pki::install_crypto();
    private_data_dir(&cfg.data)?;
    check_builtin_datastores(&cfg.builtin_datastores, &cfg.data)?;
    let ca = Ca::load_or_create(&cfg.data.join("ca"), &host_name())?;
    let db = catalog::open(&cfg.data.join("catalog.sqlite"))?;
    let mut engine = Engine::new(db, ca, cfg.timing.clone()).with_files_dir(cfg.data.join("files"));
    if let Some(p) = &cfg.proxy_package {
        engine = engine.with_proxy_package(p.clone());
    }
    let engine = Arc::new(engine);
    if let Some(t) = engine.bootstrap_token()? {
        let p = cfg.data.join("admin.token");
        pki::write_private(&p, format!("{t}\n").as_bytes())?;
        tracing::info!("first API token written to {}", p.display());
    }
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(io(format!("listen at {}", cfg.listen)))?;
    let addr = listener
        .local_addr()
        .map_err(io(format!("listen at {}", cfg.listen)))?;
    let mut names = vec![
        "localhost".to_string(),
        "127.0.0.1".into(),
        "::1".into(),
        host_name(),
    ];
    if !addr.ip().is_unspecified() {
        names.push(addr.ip().to_string());
    }
    names.extend(cfg.names.iter().cloned());
    names.sort();
    names.dedup();
    engine.set_server_names(&names);
    let identity = engine.ca().issue("dm-server", &names, ca::Usage::Server)?;
    let tls = identity.server_config(ClientAuth::Optional)?;
    let url = match addr {
        SocketAddr::V4(a) => format!("https://{}:{}", a.ip(), a.port()),
        SocketAddr::V6(a) => format!("https://[{}]:{}", a.ip(), a.port()),
    };
    let local = if addr.ip().is_unspecified() {
        format!("https://127.0.0.1:{}", addr.port())
    } else {
        url.clone()
    };
    let _builtin = if cfg.builtin_proxy {
        let id = engine.builtin_identity(&["localhost".into()])?;
        engine.set_builtin_datastores(
            &cfg.builtin_datastores
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>(),
        )?;
        engine.set_builtin_hypervisor(cfg.builtin_hypervisor.as_deref())?;
        Some(agent::spawn(AgentConfig {
            server: local,
            identity: datamover_proxy::identity::LiveIdentity::new(id, None),
            // Only what the administrator gave (`--datastore`); none by
            // default.
            datastores: cfg.builtin_datastores.clone(),
            interval: cfg.timing.heartbeat,
            served: Default::default(),
            service_port: None,
            manifest_cache: None,
            recoveries: std::path::PathBuf::from(transports::instant::DEFAULT_DIR),
        }))
    } else {
        None
    };
    let e = engine.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let e = e.clone();
            match tokio::task::spawn_blocking(move || e.tick()).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => tracing::error!("scheduler tick: {err}"),
                Err(err) => tracing::error!("scheduler tick: {err}"),
            }
        }
    });
    let url_file = cfg.data.join("server.url");
    std::fs::write(&url_file, format!("{url}\n")).map_err(io(url_file.display().to_string()))?;
    tracing::info!(
        "dm-server listening at {url} (CA {})",
        engine.ca().fingerprint()
    );
    http::serve(listener, tls, http::router(engine), cfg.http.clone()).await;
    Ok(())
}

/// This machine's host name.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Create the data directory, make it 0700, and make the catalog's files
/// 0600 (SQLite gives its WAL and shared-memory files the catalog's mode).
fn private_data_dir(data: &std::path::Path) -> Result<(), StartError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    std::fs::create_dir_all(data)
        .map_err(io(format!("create data directory {}", data.display())))?;
    std::fs::set_permissions(data, std::fs::Permissions::from_mode(0o700))
        .map_err(io(format!("make {} private (0700)", data.display())))?;
    let catalog = data.join("catalog.sqlite");
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&catalog)
        .map_err(io(format!("create {}", catalog.display())))?;
    for f in ["catalog.sqlite", "catalog.sqlite-wal", "catalog.sqlite-shm"] {
        let p = data.join(f);
        if p.exists() {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))
                .map_err(io(format!("make {} private (0600)", p.display())))?;
        }
    }
    Ok(())
}

/// No datastore of the built-in proxy may hold the server's secrets (the
/// data directory) or lie inside them: a backup or a restore could then
/// copy out the CA key or overwrite the catalog.
fn check_builtin_datastores(ds: &[PathBuf], data: &std::path::Path) -> Result<(), StartError> {
    datamover_proxy::check_datastores_outside(ds, data)
        .map_err(|e| StartError::Config(format!("--datastore: {e}")))
}
