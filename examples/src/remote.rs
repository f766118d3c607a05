//! `dm --server URL …`: the commands that talk to a dm-server. Glue only:
//! every call is one REST request through `datamover_control::client`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use datamover_control::api::{
    Host, HostAdded, HostPatch, HostRole, Job, JobDisk, JobKind, JobSpec, NewHost, Proxy,
    ProxyPatch, Repository, Session, State,
};
use datamover_control::client::{Auth, Client, ClientError};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use crate::Failure;

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

#[derive(Subcommand)]
pub enum HostCmd {
    /// Add a managed host; prints its one-time enrollment token for
    /// `dm-installer` (or `dm-proxy run` by hand).
    Add {
        /// Host name.
        name: String,
        /// An address the host is reached at (put in its certificate); repeat.
        #[arg(long)]
        address: Vec<String>,
        /// A role: `proxy` (its installer deploys and runs dm-proxy); repeat.
        #[arg(long)]
        role: Vec<HostRole>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Change a host's roles (its installer follows within a poll).
    Set {
        /// Host name.
        name: String,
        /// Its roles from now on, comma-separated (`proxy`); `--roles ''` takes all away.
        #[arg(long, value_delimiter = ',', required = true)]
        roles: Vec<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List hosts.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a host: its certificate stops working, its tasks are re-queued.
    Remove {
        /// Host name.
        name: String,
    },
}

#[derive(Subcommand)]
pub enum ProxyCmd {
    /// List proxies with their slots, state and load.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Change a proxy's settings.
    Set {
        /// Proxy name.
        name: String,
        /// Task slots.
        #[arg(long)]
        slots: Option<u32>,
        /// Allowed transport modes, comma-separated (san,hotadd,storage-snapshot,nbd).
        #[arg(long, value_delimiter = ',')]
        modes: Option<Vec<String>>,
        /// Site.
        #[arg(long)]
        site: Option<String>,
        /// Take it out of service.
        #[arg(long, conflicts_with = "enable")]
        disable: bool,
        /// Put it back in service.
        #[arg(long)]
        enable: bool,
    },
}

#[derive(Subcommand)]
pub enum RepoCmd {
    /// Add a repository: a directory at the same path on the proxies that
    /// write to it, or (with --proxy) a directory on one proxy, which serves
    /// it to the others over its repository service.
    Add {
        /// Name.
        name: String,
        /// Directory (created on first use).
        path: String,
        /// The proxy that holds the repository (the target of replication jobs).
        #[arg(long)]
        proxy: Option<String>,
    },
    /// List repositories.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per run
pub enum JobCmd {
    /// Create a job: backup (default), copy, replication, migration or restore.
    Create {
        /// Job name.
        name: String,
        /// Kind: backup, copy (one-off full), replication (replica images
        /// on the repository's proxy), migration (replicate, pause the VM,
        /// final sync), restore.
        #[arg(long, default_value = "backup")]
        kind: String,
        /// Repository (the target; for restore jobs, the source).
        #[arg(long)]
        repo: String,
        /// A disk: NAME=SOURCE (vm/disk=/path/img.raw, =nbd://…, =qmp+unix:///…);
        /// for restore jobs NAME=DESTINATION (a path or nbd:// export); repeat.
        #[arg(long = "disk", required = true)]
        disks: Vec<String>,
        /// Restore jobs: NAME=POINT, the point to restore (default the newest); repeat.
        #[arg(long = "point")]
        points: Vec<String>,
        /// For VM sources: NAME=NODE, the VM's disk node for disk NAME; repeat.
        #[arg(long = "node")]
        nodes: Vec<String>,
        /// For VM sources: NAME=HOST, the VM host (HotAdd placement); repeat.
        #[arg(long = "vm-host")]
        vm_hosts: Vec<String>,
        /// Proxies the job may use; repeat (default: any).
        #[arg(long = "proxy")]
        proxies: Vec<String>,
        /// Transport mode: auto, san, hotadd, nbd, storage-snapshot.
        #[arg(long, default_value = "auto")]
        transport: String,
        /// Fall back to network mode.
        #[arg(long)]
        failover_to_network: bool,
        /// Retries of a failed task.
        #[arg(long, default_value_t = 2)]
        retries: u32,
        /// Run every N minutes.
        #[arg(long)]
        every_minutes: Option<u32>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List jobs.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run a job now; with --wait, show its progress until it ends.
    Run {
        /// Job name.
        name: String,
        /// Watch the session until it ends (exit 1 if it failed).
        #[arg(long)]
        wait: bool,
        /// Print JSON (the session).
        #[arg(long)]
        json: bool,
    },
    /// Delete a job.
    Delete {
        /// Job name.
        name: String,
    },
}

#[derive(Subcommand)]
pub enum SessionCmd {
    /// List recent sessions.
    List {
        /// How many.
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show a session and its tasks.
    Show {
        /// Session id.
        id: u64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Live progress bars per task until the session ends (exit 1 if it failed).
    Watch {
        /// Session id.
        id: u64,
    },
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

fn roles_text(h: &Host) -> String {
    if h.roles.is_empty() {
        "-".into()
    } else {
        h.roles
            .iter()
            .map(HostRole::as_str)
            .collect::<Vec<_>>()
            .join(",")
    }
}

pub fn host(s: &ServerArgs, c: HostCmd) -> Result<u8, Failure> {
    let cl = s.client()?;
    match c {
        HostCmd::Add {
            name,
            address,
            role,
            json,
        } => {
            let r: HostAdded = cl.add_host(&NewHost {
                name,
                addresses: address,
                roles: role,
            })?;
            if json {
                return print_json(&r);
            }
            println!("added host {}", r.host.name);
            println!("enrollment token (one use, expires {}):", r.expires);
            println!("{}", r.enrollment_token);
            println!(
                "on the host: dm-installer run --server {} --token <token>",
                cl.base()
            );
        }
        HostCmd::Set { name, roles, json } => {
            let roles = roles
                .iter()
                .filter(|r| !r.is_empty())
                .map(|r| r.parse::<HostRole>().map_err(|e| Failure(2, e)))
                .collect::<Result<Vec<_>, _>>()?;
            let h: Host = cl.patch_host(&name, &HostPatch { roles: Some(roles) })?;
            if json {
                return print_json(&h);
            }
            println!("host {}: roles {}", h.name, roles_text(&h));
        }
        HostCmd::List { json } => {
            let hs: Vec<Host> = cl.hosts()?;
            if json {
                return print_json(&hs);
            }
            println!(
                "{:<20} {:<9} {:<8} {:<30} ADDRESSES",
                "HOST", "ENROLLED", "ROLES", "INSTALLED"
            );
            for h in hs {
                let installed = match &h.installer {
                    None => "-".to_string(),
                    Some(i) if i.report.components.is_empty() => "nothing".into(),
                    Some(i) => i
                        .report
                        .components
                        .iter()
                        .map(|c| {
                            let run = match (c.pid, &c.error) {
                                (Some(p), _) => format!("pid {p}"),
                                (None, Some(_)) => "failed".into(),
                                (None, None) => "stopped".into(),
                            };
                            format!("{} {} ({run})", c.name, &c.sha256[..c.sha256.len().min(12)])
                        })
                        .collect::<Vec<_>>()
                        .join(", "),
                };
                println!(
                    "{:<20} {:<9} {:<8} {:<30} {}",
                    h.name,
                    if h.enrolled { "yes" } else { "no" },
                    roles_text(&h),
                    installed,
                    h.addresses.join(",")
                );
                if let Some(e) = h
                    .installer
                    .as_ref()
                    .and_then(|i| i.report.components.iter().find_map(|c| c.error.as_ref()))
                {
                    println!("  last problem: {e}");
                }
            }
        }
        HostCmd::Remove { name } => {
            cl.remove_host(&name)?;
            println!("removed host {name}");
        }
    }
    Ok(0)
}

pub fn proxy(s: &ServerArgs, c: ProxyCmd) -> Result<u8, Failure> {
    let cl = s.client()?;
    let show = |ps: &[Proxy]| {
        println!(
            "{:<20} {:<9} {:>5} {:>7} {:<8} DATASTORES",
            "PROXY", "STATE", "SLOTS", "RUNNING", "VERSION"
        );
        for p in ps {
            println!(
                "{:<20} {:<9} {:>5} {:>7} {:<8} {}",
                p.name,
                p.state.as_str(),
                p.slots,
                p.running,
                p.version,
                p.datastores.join(",")
            );
        }
    };
    match c {
        ProxyCmd::List { json } => {
            let ps: Vec<Proxy> = cl.proxies()?;
            if json {
                return print_json(&ps);
            }
            show(&ps);
        }
        ProxyCmd::Set {
            name,
            slots,
            modes,
            site,
            disable,
            enable,
        } => {
            let p: Proxy = cl.patch_proxy(
                &name,
                &ProxyPatch {
                    slots,
                    modes,
                    site,
                    disabled: if disable {
                        Some(true)
                    } else if enable {
                        Some(false)
                    } else {
                        None
                    },
                },
            )?;
            show(&[p]);
        }
    }
    Ok(0)
}

pub fn repo(s: &ServerArgs, c: RepoCmd) -> Result<u8, Failure> {
    let cl = s.client()?;
    match c {
        RepoCmd::Add { name, path, proxy } => {
            let r: Repository = cl.add_repository(&Repository { name, path, proxy })?;
            match &r.proxy {
                Some(p) => println!("added repository {} at {} on proxy {p}", r.name, r.path),
                None => println!("added repository {} at {}", r.name, r.path),
            }
        }
        RepoCmd::List { json } => {
            let rs: Vec<Repository> = cl.repositories()?;
            if json {
                return print_json(&rs);
            }
            for r in rs {
                println!(
                    "{:<24} {:<12} {}",
                    r.name,
                    r.proxy.as_deref().unwrap_or("(shared)"),
                    r.path
                );
            }
        }
    }
    Ok(0)
}

pub fn job(s: &ServerArgs, c: JobCmd) -> Result<u8, Failure> {
    let cl = s.client()?;
    match c {
        JobCmd::Create {
            name,
            kind,
            repo,
            disks,
            points,
            nodes,
            vm_hosts,
            proxies,
            transport,
            failover_to_network,
            retries,
            every_minutes,
            json,
        } => {
            let nodes = pairs("node", &nodes)?;
            let hosts = pairs("vm-host", &vm_hosts)?;
            let points = pairs("point", &points)?;
            let kind: JobKind = serde_json::from_value(serde_json::Value::String(kind.clone()))
                .map_err(|_| {
                    Failure(
                        2,
                        format!(
                            "--kind {kind:?}: use backup, copy, replication, migration or restore"
                        ),
                    )
                })?;
            let disks = disks
                .iter()
                .map(|d| {
                    let (n, src) = d
                        .split_once('=')
                        .ok_or_else(|| Failure(2, format!("--disk {d:?}: expected NAME=SOURCE")))?;
                    Ok(JobDisk {
                        name: n.into(),
                        source: src.into(),
                        disk: nodes.get(n).cloned(),
                        vm_host: hosts.get(n).cloned(),
                        point: points.get(n).cloned(),
                    })
                })
                .collect::<Result<Vec<_>, Failure>>()?;
            let j: Job = cl.create_job(&JobSpec {
                name,
                kind,
                repository: repo,
                disks,
                proxies,
                transport,
                failover_to_network,
                retries,
                every_minutes,
            })?;
            if json {
                return print_json(&j);
            }
            println!(
                "created {} job {} ({} disk(s), repository {})",
                j.spec.kind.as_str(),
                j.spec.name,
                j.spec.disks.len(),
                j.spec.repository
            );
        }
        JobCmd::List { json } => {
            let js: Vec<Job> = cl.jobs()?;
            if json {
                return print_json(&js);
            }
            println!(
                "{:<24} {:<8} {:>5} {:<16} LAST RUN",
                "JOB", "KIND", "DISKS", "REPOSITORY"
            );
            for j in js {
                println!(
                    "{:<24} {:<8} {:>5} {:<16} {}",
                    j.spec.name,
                    j.spec.kind.as_str(),
                    j.spec.disks.len(),
                    j.spec.repository,
                    j.last_run.as_deref().unwrap_or("-")
                );
            }
        }
        JobCmd::Run { name, wait, json } => {
            let sess: Session = cl.run_job(&name)?;
            if wait {
                let end = watch(&cl, sess.id, json)?;
                return finish(&end, json);
            }
            if json {
                return print_json(&sess);
            }
            println!(
                "job {name}: session {} started ({} task(s))",
                sess.id,
                sess.tasks.len()
            );
        }
        JobCmd::Delete { name } => {
            cl.delete_job(&name)?;
            println!("deleted job {name}");
        }
    }
    Ok(0)
}

pub fn session(s: &ServerArgs, c: SessionCmd) -> Result<u8, Failure> {
    let cl = s.client()?;
    match c {
        SessionCmd::List { limit, json } => {
            let ss: Vec<Session> = cl.sessions(limit)?;
            if json {
                return print_json(&ss);
            }
            println!(
                "{:>6} {:<20} {:<8} {:<8} {:>5} CREATED",
                "ID", "JOB", "KIND", "STATE", "TASKS"
            );
            for s in ss {
                println!(
                    "{:>6} {:<20} {:<8} {:<8} {:>5} {}",
                    s.id,
                    s.job,
                    s.kind.as_str(),
                    s.state.as_str(),
                    s.tasks.len(),
                    s.created
                );
            }
            Ok(0)
        }
        SessionCmd::Show { id, json } => {
            let s: Session = cl.session(id)?;
            if json {
                return print_json(&s);
            }
            show_session(&s);
            Ok(if s.state == State::Failed { 1 } else { 0 })
        }
        SessionCmd::Watch { id } => {
            let end = watch(&cl, id, false)?;
            finish(&end, false)
        }
    }
}

fn show_session(s: &Session) {
    println!(
        "session {} of job {} ({}): {}",
        s.id,
        s.job,
        s.kind.as_str(),
        s.state.as_str()
    );
    println!(
        "{:>6} {:<24} {:<8} {:<12} {:<16} {:>3} {:<10} POINT / ERROR",
        "TASK", "DISK", "STATE", "PROXY", "MODE", "TRY", "BOTTLENECK"
    );
    for t in &s.tasks {
        println!(
            "{:>6} {:<24} {:<8} {:<12} {:<16} {:>3} {:<10} {}",
            t.id,
            t.disk,
            t.state.as_str(),
            t.proxy.as_deref().unwrap_or("-"),
            t.mode.as_deref().unwrap_or("-"),
            t.attempt,
            t.bottleneck.as_deref().unwrap_or("-"),
            t.point.as_deref().or(t.error.as_deref()).unwrap_or("")
        );
        if let (State::Queued, Some(w)) = (t.state, &t.waiting) {
            println!("{:>6}   waiting: {w}", "");
        }
        if let Some(r) = &t.replica {
            println!("{:>6}   replica {r}", "");
        }
        if let Some(w) = t.wire_bytes {
            println!(
                "{:>6}   {} stored, {} on the wire to the repository service",
                "",
                human(t.bytes_stored.unwrap_or(0)),
                human(w)
            );
        }
        for a in &t.attempts {
            println!(
                "{:>6}   attempt {} on {}: {}",
                "",
                a.attempt,
                a.proxy.as_deref().unwrap_or("-"),
                a.reason
            );
        }
    }
}

fn human(b: u64) -> String {
    indicatif::HumanBytes(b).to_string()
}

fn finish(s: &Session, json: bool) -> Result<u8, Failure> {
    if json {
        print_json(s)?;
    } else {
        show_session(s);
    }
    Ok(if s.state == State::Failed { 1 } else { 0 })
}

/// Poll a session until it ends, with one progress bar per task (when
/// stderr is a terminal and `quiet` is false).
fn watch(cl: &Client, id: u64, quiet: bool) -> Result<Session, Failure> {
    use std::io::IsTerminal;
    let show = !quiet && std::io::stderr().is_terminal();
    let mp = MultiProgress::new();
    let style = ProgressStyle::with_template(
        "{prefix:<24} {msg:<28} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    let mut bars: HashMap<u64, ProgressBar> = HashMap::new();
    let end = cl.wait_session(id, |s| -> Result<(), Failure> {
        if show {
            for t in &s.tasks {
                let b = bars.entry(t.id).or_insert_with(|| {
                    let b = mp.add(ProgressBar::new(t.total.max(1)));
                    b.set_style(style.clone());
                    b.set_prefix(t.disk.clone());
                    b
                });
                b.set_length(t.total.max(1));
                b.set_position(t.done);
                if let (State::Queued, Some(w)) = (t.state, &t.waiting) {
                    b.set_message(format!("queued: {w}"));
                    continue;
                }
                b.set_message(format!(
                    "{} {}{}",
                    t.state.as_str(),
                    t.proxy.as_deref().unwrap_or(""),
                    t.mode
                        .as_deref()
                        .map(|m| format!(" ({m})"))
                        .unwrap_or_default()
                ));
                if t.state.is_final() && !b.is_finished() {
                    b.finish();
                }
            }
        }
        Ok(())
    })?;
    if show {
        let _ = mp.clear();
    }
    Ok(end)
}
