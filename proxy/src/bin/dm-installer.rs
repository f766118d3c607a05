//! `dm-installer`: the installer service of a managed host. It joins the
//! server once (one-time token), then deploys, runs, upgrades and removes
//! the components of the roles the server gives the host.
//!
//! ```text
//! dm-installer run --server https://backup:8443 --token dmj1.… [--dir /var/lib/dm-installer]
//!                  [--datastore /var/lib/libvirt/images]… [--repo-listen 0.0.0.0:8444]
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use clap::Parser;
use datamover_control::pki::Identity;
use datamover_proxy::installer::{self, InstallerConfig};

#[derive(Parser)]
#[command(
    name = "dm-installer",
    version,
    about = "datamover installer service: deploys and upgrades the proxy component the server assigns"
)]
struct Cli {
    /// State directory: the host's identity, installed components, logs.
    #[arg(
        long,
        env = "DM_INSTALLER_DIR",
        default_value = "/var/lib/dm-installer"
    )]
    dir: PathBuf,
    /// The server, https://host:port (default: the one enrolled with).
    #[arg(long, env = "DM_SERVER")]
    server: Option<String>,
    /// Enroll first with this one-time token if not enrolled yet.
    #[arg(long, env = "DM_ENROLL_TOKEN")]
    token: Option<String>,
    /// A datastore the proxy sees (passed to `dm-proxy run`); repeat.
    #[arg(long)]
    datastore: Vec<PathBuf>,
    /// Where the proxy's repository service listens (`dm-proxy run --repo-listen`).
    #[arg(long)]
    repo_listen: Option<String>,
    /// Poll interval in milliseconds (the server may change it).
    #[arg(long, default_value_t = 2000)]
    interval_ms: u64,
    /// What to do.
    #[arg(value_parser = ["run"], default_value = "run")]
    command: String,
}

fn main() -> ExitCode {
    datamover_proxy::init_logging();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dm-installer: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    let server = datamover_proxy::join(&cli.dir, cli.server.as_deref(), cli.token.as_deref())?;
    let identity = datamover_proxy::identity::LiveIdentity::new(
        Identity::load(&cli.dir)?,
        Some(cli.dir.clone()),
    );
    let mut proxy_args = Vec::new();
    for d in &cli.datastore {
        proxy_args.push("--datastore".to_string());
        proxy_args.push(d.display().to_string());
    }
    if let Some(l) = &cli.repo_listen {
        proxy_args.push("--repo-listen".into());
        proxy_args.push(l.clone());
    }
    let cfg = InstallerConfig {
        server,
        identity,
        dir: cli.dir,
        interval: Duration::from_millis(cli.interval_ms.max(50)),
        proxy_args,
    };
    let stop = AtomicBool::new(false);
    installer::run(&cfg, &stop)?;
    Ok(())
}
