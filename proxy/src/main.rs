//! `dm-proxy`: a datamover proxy (transport service).
//!
//! ```text
//! dm-proxy enroll --server https://backup:8443 --token dmj1.… [--dir /var/lib/dm-proxy]
//! dm-proxy run [--dir /var/lib/dm-proxy] [--datastore /var/lib/libvirt/images]…
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use clap::{Parser, Subcommand};
use datamover_control::pki::Identity;
use datamover_proxy::agent::{self, AgentConfig};
use datamover_proxy::repo_service::{self, ServedMap};

#[derive(Parser)]
#[command(
    name = "dm-proxy",
    version,
    about = "datamover proxy: runs backup tasks for a dm-server"
)]
struct Cli {
    /// State directory: the host's key, certificate, CA and server URL.
    #[arg(
        long,
        global = true,
        env = "DM_PROXY_DIR",
        default_value = "/var/lib/dm-proxy"
    )]
    dir: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Join a server with a one-time enrollment token (`dm host add` prints it).
    Enroll {
        /// The server, https://host:port.
        #[arg(long, env = "DM_SERVER")]
        server: String,
        /// The enrollment token.
        #[arg(long, env = "DM_ENROLL_TOKEN")]
        token: String,
    },
    /// Run the transport service until stopped.
    Run {
        /// A directory of VM disks this proxy can open directly (SAN mode); repeat.
        #[arg(long)]
        datastore: Vec<PathBuf>,
        /// Heartbeat interval in milliseconds (the server may change it).
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
        /// Enroll first with this token if not enrolled yet (needs --server).
        #[arg(long, env = "DM_ENROLL_TOKEN")]
        token: Option<String>,
        /// The server (default: the one enrolled with).
        #[arg(long, env = "DM_SERVER")]
        server: Option<String>,
        /// Where the repository service listens (the target data mover:
        /// other proxies write to the repositories the server assigns to
        /// this one); `off` runs none.
        #[arg(long, default_value = "0.0.0.0:8444")]
        repo_listen: String,
        /// Where instant recoveries this proxy serves keep their sessions
        /// (NBD sockets libvirt's QEMU user connects to, and the guests'
        /// overlays): not under the state directory, which only root
        /// may enter.
        #[arg(long, value_name = "DIR", default_value = transports::instant::DEFAULT_DIR)]
        instant_dir: PathBuf,
    },
}

fn main() -> ExitCode {
    datamover_proxy::init_logging();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dm-proxy: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    match cli.cmd {
        Cmd::Enroll { server, token } => {
            let (e, _) = datamover_proxy::enroll(&server, &token, &cli.dir)?;
            println!("enrolled as {} (identity in {})", e.host, cli.dir.display());
            Ok(())
        }
        Cmd::Run {
            datastore,
            interval_ms,
            token,
            server,
            repo_listen,
            instant_dir,
        } => {
            datamover_proxy::check_datastores_outside(&datastore, &cli.dir)?;
            let server = datamover_proxy::join(&cli.dir, server.as_deref(), token.as_deref())?;
            let identity = datamover_proxy::identity::LiveIdentity::new(
                Identity::load(&cli.dir)?,
                Some(cli.dir.clone()),
            );
            let served: ServedMap = Default::default();
            let stop = Arc::new(AtomicBool::new(false));
            let service_port = if repo_listen == "off" {
                None
            } else {
                match std::net::TcpListener::bind(&repo_listen) {
                    Ok(l) => {
                        let port = l.local_addr()?.port();
                        let (id, m, st) = (identity.clone(), served.clone(), stop.clone());
                        std::thread::Builder::new()
                            .name("repo-service".into())
                            .spawn(move || {
                                let limits = repo_service::server::Limits::default();
                                if let Err(e) =
                                    repo_service::server::serve_with(l, &id, m, st, limits)
                                {
                                    tracing::error!("repository service stopped: {e}");
                                }
                            })?;
                        tracing::info!(
                            "repository service listening at {repo_listen} (port {port})"
                        );
                        Some(port)
                    }
                    Err(e) => {
                        tracing::warn!(
                            "repository service not started: cannot listen at {repo_listen}: {e}"
                        );
                        None
                    }
                }
            };
            let cfg = AgentConfig {
                server,
                identity,
                datastores: datastore,
                interval: Duration::from_millis(interval_ms),
                served,
                service_port,
                manifest_cache: Some(cli.dir.join("cache").join("manifests")),
                recoveries: instant_dir,
            };
            Ok(agent::run(&cfg, &stop)?)
        }
    }
}
