//! `dm-server`: the datamover backup server.
//!
//! ```text
//! dm-server [--data /var/lib/dm-server] [--listen 0.0.0.0:8443] [--name backup.example.com]
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use datamover_server::{ServerConfig, Timing};

#[derive(Parser)]
#[command(
    name = "dm-server",
    version,
    about = "datamover backup server: inventory, jobs, scheduler, REST API"
)]
struct Cli {
    /// Data directory: catalog.sqlite, the CA, admin.token, server.url.
    #[arg(long, env = "DM_SERVER_DATA", default_value = "/var/lib/dm-server")]
    data: PathBuf,
    /// Address to listen at (HTTPS); port 0 picks a free port (see server.url).
    #[arg(long, default_value = "0.0.0.0:8443")]
    listen: SocketAddr,
    /// Another name or address for the server's certificate; repeat.
    #[arg(long)]
    name: Vec<String>,
    /// Do not run the built-in proxy.
    #[arg(long)]
    no_builtin_proxy: bool,
    /// A datastore directory the built-in proxy sees (SAN mode); repeat.
    #[arg(long)]
    datastore: Vec<PathBuf>,
    /// Make the built-in proxy's host a hypervisor: the libvirt connection
    /// whose VMs enter the inventory (qemu:///system for this host's libvirtd).
    #[arg(long, value_name = "URI")]
    hypervisor: Option<String>,
    /// Heartbeat interval proxies are told to use, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    heartbeat_ms: u64,
    /// A proxy silent this long is declared dead and its tasks re-queued (ms).
    #[arg(long, default_value_t = 20000)]
    dead_after_ms: u64,
    /// Delay before a failed task is retried (ms).
    #[arg(long, default_value_t = 30000)]
    retry_delay_ms: u64,
    /// The proxy component installers deploy on hosts with the proxy
    /// role (default: the dm-proxy next to this dm-server). Replacing
    /// the file upgrades every such host.
    #[arg(long)]
    proxy_package: Option<PathBuf>,
    /// Days a host's certificate is valid (hosts renew it over the agent
    /// channel when a third is left).
    #[arg(long, default_value_t = 30)]
    host_cert_days: u64,
    /// Seconds a host's certificate is valid, overriding --host-cert-days
    /// (tests of renewal).
    #[arg(long, hide = true)]
    host_cert_lifetime_s: Option<u64>,
    /// Seconds a client has to finish the TLS handshake.
    #[arg(long, default_value_t = 10)]
    handshake_timeout_s: u64,
    /// Seconds a client has to send a request's headers (and the longest
    /// a kept-alive connection waits for its next request).
    #[arg(long, default_value_t = 30)]
    header_timeout_s: u64,
    /// Seconds a client has to send a request's body.
    #[arg(long, default_value_t = 30)]
    body_timeout_s: u64,
    /// Connections held at once, in all.
    #[arg(long, default_value_t = 512)]
    max_connections: usize,
    /// Connections held at once from one address.
    #[arg(long, default_value_t = 64)]
    max_connections_per_address: usize,
}

#[tokio::main]
async fn main() -> ExitCode {
    datamover_proxy::init_logging();
    let c = Cli::parse();
    let proxy_package = c.proxy_package.or_else(|| {
        std::env::current_exe()
            .ok()
            .map(|e| e.with_file_name("dm-proxy"))
            .filter(|p| p.is_file())
    });
    let cfg = ServerConfig {
        data: c.data,
        listen: c.listen,
        names: c.name,
        builtin_proxy: !c.no_builtin_proxy,
        builtin_datastores: c.datastore,
        builtin_hypervisor: c.hypervisor,
        timing: Timing {
            heartbeat: Duration::from_millis(c.heartbeat_ms.max(50)),
            dead_after: Duration::from_millis(c.dead_after_ms.max(200)),
            retry_delay: Duration::from_millis(c.retry_delay_ms),
            host_cert: Duration::from_secs(
                c.host_cert_lifetime_s
                    .unwrap_or(c.host_cert_days.clamp(1, 3650) * 86400)
                    .max(10),
            ),
            ..Timing::default()
        },
        proxy_package,
        http: datamover_server::http::Limits {
            connections: c.max_connections.max(1),
            per_address: c.max_connections_per_address.max(1),
            handshake: Duration::from_secs(c.handshake_timeout_s.max(1)),
            headers: Duration::from_secs(c.header_timeout_s.max(1)),
            body: Duration::from_secs(c.body_timeout_s.max(1)),
        },
    };
    match datamover_server::run(cfg).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dm-server: {e:#}");
            ExitCode::FAILURE
        }
    }
}
