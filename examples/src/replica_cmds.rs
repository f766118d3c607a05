//! `dm replica …` and `dm migrate`: VMs on replicas (libvirt); `dm export`:
//! a point served over NBD.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use datamover::Repository;

use serde_json::json;
use transports::failover;

use crate::output::Failure;

/// Where a VM's replicas are.
#[derive(Args)]
pub struct ReplicaPlace {
    /// The VM (its points are VM/DISK).
    pub vm: String,
    /// Repository directory.
    #[arg(long, env = "DM_REPO")]
    pub repo: PathBuf,
    /// The replica directory (images REPLICAS/VM/DISK.img).
    #[arg(long, value_name = "DIR")]
    pub replicas: PathBuf,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `dm replica`.
#[derive(Subcommand)]
pub enum ReplicaCmd {
    /// Bring a VM's replicas to its newest points (only what differs is
    /// written).
    Sync(ReplicaPlace),
    /// List a VM's replicas and what each holds.
    List(ReplicaPlace),
    /// Start the VM on its replicas (a libvirt domain defined from the
    /// definition its points stored). Replication stops writing them.
    Failover {
        #[command(flatten)]
        place: ReplicaPlace,
        /// The domain to create: libvirt:///NAME[?uri=…] (default
        /// libvirt:///VM-replica on qemu:///system).
        #[arg(long, default_value = "libvirt:///")]
        on: String,
        /// Define the domain, do not start it.
        #[arg(long)]
        no_start: bool,
    },
    /// Undo a failover: stop and remove the replica VM; its writes are
    /// dropped at the next sync.
    Undo {
        #[command(flatten)]
        place: ReplicaPlace,
        /// The replica VM (default libvirt:///VM-replica).
        #[arg(long, default_value = "libvirt:///")]
        on: String,
    },
    /// Fail back: the replica VM's changes onto the original VM (shut
    /// off), which is then started; the replica VM is removed.
    Failback {
        #[command(flatten)]
        place: ReplicaPlace,
        /// The replica VM (default libvirt:///VM-replica).
        #[arg(long, default_value = "libvirt:///")]
        on: String,
        /// The original VM: libvirt:///DOMAIN[?uri=…].
        #[arg(long)]
        to: String,
        /// Do not start the original VM.
        #[arg(long)]
        no_start: bool,
    },
}

/// Arguments of `dm migrate`.
#[derive(Args)]
pub struct MigrateArgs {
    /// The running VM: libvirt:///DOMAIN[?uri=…].
    pub from: String,
    /// Where it runs next: libvirt:///NAME[?uri=…] (default name: --vm).
    #[arg(long)]
    pub to: String,
    /// The VM's name in the repository (default: the domain's).
    #[arg(long)]
    pub vm: Option<String>,
    /// Repository directory.
    #[arg(long, env = "DM_REPO")]
    pub repo: PathBuf,
    /// The replica directory the new VM runs from (storage the target
    /// host sees).
    #[arg(long, value_name = "DIR")]
    pub replicas: PathBuf,
    /// Quiesce the guest for the final sync: auto, required, off.
    #[arg(long, default_value = "auto")]
    pub quiesce: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

fn print<T: serde::Serialize>(json: bool, v: &T, text: impl FnOnce()) {
    if json {
        println!("{}", json!(v));
    } else {
        text();
    }
}

/// `dm replica …`.
pub fn replica(cmd: ReplicaCmd) -> Result<u8, Failure> {
    match cmd {
        ReplicaCmd::Sync(p) => {
            let repo = Repository::open(&p.repo)?;
            let r = failover::sync(&repo, &p.replicas, &p.vm)?;
            print(p.json, &r, || {
                for x in &r {
                    println!(
                        "{}: point {} ({} of {} bytes written{}) in {:.2} s",
                        x.path,
                        x.point,
                        x.bytes_written,
                        x.disk_size,
                        x.base
                            .as_ref()
                            .map(|b| format!(", from {b}"))
                            .unwrap_or_default(),
                        x.seconds
                    );
                }
            });
        }
        ReplicaCmd::List(p) => {
            let repo = Repository::open(&p.repo)?;
            let r = failover::replicas(&repo, &p.replicas, &p.vm)?;
            print(p.json, &r, || {
                for x in &r {
                    println!("{}\t{}\t{}", x.disk, x.image, x.state);
                }
            });
        }
        ReplicaCmd::Failover {
            place,
            on,
            no_start,
        } => {
            let repo = Repository::open(&place.repo)?;
            let v = failover::failover(&repo, &place.replicas, &place.vm, &on, !no_start)?;
            print(place.json, &v, || print_vm(&v, "failed over to"));
        }
        ReplicaCmd::Undo { place, on } => {
            let repo = Repository::open(&place.repo)?;
            let v = failover::undo(&repo, &place.replicas, &place.vm, &on)?;
            print(place.json, &v, || {
                println!(
                    "domain {} stopped and removed; `dm replica sync {}` drops its writes",
                    v.domain, v.vm
                );
            });
        }
        ReplicaCmd::Failback {
            place,
            on,
            to,
            no_start,
        } => {
            let repo = Repository::open(&place.repo)?;
            let r = failover::failback(
                &repo,
                &place.replicas,
                &place.vm,
                &on,
                &to,
                !no_start,
                &Default::default(),
            )?;
            print(place.json, &r, || {
                for d in &r.disks {
                    println!(
                        "{} -> {}: point {}, {} bytes written of {}",
                        d.disk, d.original, d.point, d.bytes_written, d.disk_size
                    );
                }
                println!(
                    "failed back to {} ({}; {:.1} s down, {:.1} s in all){}",
                    r.domain,
                    r.consistency,
                    r.downtime_seconds,
                    r.seconds,
                    if r.started { ", started" } else { "" }
                );
            });
        }
    }
    Ok(0)
}

fn print_vm(v: &failover::ReplicaVm, what: &str) {
    for d in &v.disks {
        println!("{}: {} (point {})", d.disk, d.image, d.point);
    }
    println!(
        "{} {what} domain {} on {}{}",
        v.vm,
        v.domain,
        v.uri,
        if v.started { ", running" } else { "" }
    );
}

/// `dm migrate`.
pub fn migrate(a: MigrateArgs) -> Result<u8, Failure> {
    let repo = Repository::open(&a.repo)?;
    let opts = transports::SourceOptions {
        quiesce: a.quiesce.parse()?,
        ..Default::default()
    };
    let r = failover::migrate(
        &repo,
        &a.replicas,
        a.vm.as_deref(),
        &a.from,
        &a.to,
        &opts,
        &Default::default(),
    )?;
    print(a.json, &r, || {
        print_vm(&r.vm, "migrated to");
        println!(
            "first pass {} bytes, final sync {} bytes ({}), {:.1} s paused, {:.1} s in all",
            r.first_pass_bytes, r.final_sync_bytes, r.consistency, r.downtime_seconds, r.seconds
        );
    });
    Ok(0)
}

/// Arguments of `dm export`.
#[derive(Args)]
pub struct ExportArgs {
    /// The point: VM/DISK (the newest) or VM/DISK@POINT.
    pub point: String,
    /// Repository directory.
    #[arg(long, env = "DM_REPO")]
    pub repo: PathBuf,
    /// Where to listen: unix:PATH or HOST:PORT (port 0: any free one).
    #[arg(long)]
    pub listen: String,
    /// Take writes into this overlay file (sparse; the repository is
    /// never written). Without it the export is read-only.
    #[arg(long, value_name = "OVERLAY")]
    pub writable: Option<PathBuf>,
    /// Require TLS: a directory with server-cert.pem, server-key.pem and,
    /// to admit only clients it signed, ca-cert.pem.
    #[arg(long, value_name = "DIR")]
    pub tls_certificates: Option<PathBuf>,
    /// Chunk cache in MiB.
    #[arg(long, default_value_t = 64)]
    pub cache_mib: u64,
}

/// `dm export`: serve a point over NBD until SIGINT or SIGTERM.
pub fn export(a: ExportArgs) -> Result<u8, Failure> {
    let repo = Repository::open(&a.repo)?;
    let point: datamover::PointRef = a.point.parse()?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone())
            .map_err(|e| Failure(1, format!("cannot handle signals: {e}")))?;
    }
    let how = transports::export::Export {
        listen: a.listen,
        writable: a.writable,
        tls_certificates: a.tls_certificates,
        cache_bytes: a.cache_mib.max(1) << 20,
    };
    let stats = transports::export::export(&repo, &point, &how, &stop, |uri| {
        println!("{uri}");
        eprintln!("serving {point} at {uri} until SIGINT or SIGTERM");
    })?;
    eprintln!(
        "export ended: {} chunks read from the repository ({} bytes), {} cache hits",
        stats.chunks_loaded, stats.bytes_loaded, stats.hits
    );
    Ok(0)
}

/// `dm instant-recover`.
#[derive(Args)]
pub struct InstantArgs {
    /// The points: VM/DISK[@POINT]..., or VM for each disk's newest.
    pub points: Vec<String>,
    /// Repository directory.
    #[arg(long, env = "DM_REPO")]
    pub repo: Option<PathBuf>,
    /// What runs the VM: libvirt:///NAME[?uri=…] (a transient domain;
    /// default libvirt:///VM-instant on qemu:///system), or qmp[:///NAME]
    /// (a QEMU of our own, its QMP socket in DIR/NAME.vm).
    #[arg(long, default_value = "libvirt:///")]
    pub on: String,
    /// A session (its domain's name), for --migrate and --discard.
    #[arg(long)]
    pub session: Option<String>,
    /// Copy the session's disks to images in this directory while the VM
    /// runs, switch the VM to them, define it there, end the session.
    #[arg(
        long,
        value_name = "DIR",
        requires = "session",
        conflicts_with = "discard"
    )]
    pub migrate: Option<PathBuf>,
    /// Format of the migrated images: raw or qcow2.
    #[arg(long, default_value = "raw", requires = "migrate")]
    pub format: String,
    /// Power off the session's VM and drop its writes.
    #[arg(long, requires = "session")]
    pub discard: bool,
    /// List the sessions.
    #[arg(long, conflicts_with_all = ["migrate", "discard"])]
    pub list: bool,
    /// Where sessions (sockets, overlays) live.
    #[arg(long, value_name = "DIR", default_value = transports::instant::DEFAULT_DIR)]
    pub dir: PathBuf,
    /// Chunk cache per disk in MiB.
    #[arg(long, default_value_t = 64)]
    pub cache_mib: u64,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

fn show_session(s: &transports::instant::Session, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(s).unwrap_or_default());
        return;
    }
    let pct = if s.state == transports::instant::State::Migrating {
        format!(" {}%", s.percent)
    } else {
        String::new()
    };
    println!(
        "{}\t{}{pct}\t{}\t{}",
        s.name,
        s.state.name(),
        s.disks
            .iter()
            .map(|d| format!("{}@{}", d.disk, d.point))
            .collect::<Vec<_>>()
            .join(","),
        s.message.as_deref().unwrap_or("")
    );
}

/// `dm instant-recover`: start a VM from its points and serve it (until
/// it is migrated or discarded, or SIGINT/SIGTERM), or migrate, discard
/// or list sessions.
pub fn instant_recover(a: InstantArgs) -> Result<u8, Failure> {
    use transports::instant;
    if a.list {
        let all = instant::sessions(&a.dir)?;
        if a.json {
            println!("{}", serde_json::to_string_pretty(&all).unwrap_or_default());
        } else {
            for s in &all {
                show_session(s, false);
            }
        }
        return Ok(0);
    }
    if let (Some(name), Some(to)) = (&a.session, &a.migrate) {
        let how = instant::Migrate {
            to: to.clone(),
            format: a.format.clone(),
        };
        let s = instant::migrate(&a.dir, name, &how, |p| eprintln!("migrating {name}: {p}%"))?;
        eprintln!(
            "{name} runs from {} (paused {} ms for the switch)",
            to.display(),
            s.downtime_ms.unwrap_or_default()
        );
        show_session(&s, a.json);
        return Ok(0);
    }
    if let (Some(name), true) = (&a.session, a.discard) {
        let s = instant::discard(&a.dir, name)?;
        eprintln!("{name}: powered off, its writes dropped");
        show_session(&s, a.json);
        return Ok(0);
    }
    if a.session.is_some() {
        return Err(Failure(
            2,
            "--session goes with --migrate DIR or --discard".into(),
        ));
    }
    let repo_dir = a
        .repo
        .ok_or_else(|| Failure(2, "--repo (or DM_REPO) is required to recover".into()))?;
    if a.points.is_empty() {
        return Err(Failure(2, "name the VM (or its disks) to recover".into()));
    }
    let repo = Repository::open(&repo_dir)?;
    let points = instant::points_named(&repo, &a.points)?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone())
            .map_err(|e| Failure(1, format!("cannot handle signals: {e}")))?;
    }
    let how = instant::Recover {
        on: a.on,
        dir: a.dir.clone(),
        cache_bytes: a.cache_mib.max(1) << 20,
    };
    let json = a.json;
    let s = instant::recover(&repo, &points, &how, &stop, |s| {
        show_session(s, json);
        eprintln!(
            "{} runs from the repository; its writes go to {}.\n  migrate: dm instant-recover --session {} --migrate DIR\n  discard: dm instant-recover --session {} --discard\n(SIGINT or SIGTERM powers it off and keeps its writes)",
            s.name,
            a.dir.join(&s.name).display(),
            s.name,
            s.name
        );
    })?;
    eprintln!(
        "session {} ended: {}{}",
        s.name,
        s.state.name(),
        s.message
            .as_deref()
            .map(|m| format!(" ({m})"))
            .unwrap_or_default()
    );
    Ok(0)
}

/// `dm files`.
#[derive(Args)]
pub struct FilesArgs {
    /// The point: VM/DISK (the newest) or VM/DISK@POINT.
    pub point: String,
    /// Repository directory.
    #[arg(long, env = "DM_REPO", global = true)]
    pub repo: Option<PathBuf>,
    /// Through a server (--server): the repository of that name, read by
    /// the proxy holding it (get: as a tar archive, --tar).
    #[arg(long, value_name = "NAME", global = true, conflicts_with = "repo")]
    pub server_repo: Option<String>,
    /// The appliance's memory in MiB.
    #[arg(long, default_value_t = 512, global = true)]
    pub appliance_mib: i32,
    #[command(subcommand)]
    pub op: FilesOp,
}

/// What to do with a point's files.
#[derive(Subcommand)]
pub enum FilesOp {
    /// List the filesystems (no PATH), a directory, or a file:
    /// /FILESYSTEM/PATH (with one filesystem, /PATH).
    Ls {
        /// The path.
        path: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Copy files, symlinks and whole directories out, with their mode,
    /// owner, times and extended attributes.
    Get {
        /// The paths (/FILESYSTEM/PATH).
        #[arg(required = true)]
        paths: Vec<String>,
        /// Into this directory (made if missing; nothing in it is
        /// overwritten).
        #[arg(
            long,
            value_name = "DIR",
            conflicts_with = "tar",
            required_unless_present = "tar"
        )]
        to: Option<PathBuf>,
        /// As a tar archive (PAX: extended attributes, exact times) to
        /// this file, or - for standard output.
        #[arg(long, value_name = "FILE")]
        tar: Option<String>,
        /// Print JSON (what was extracted).
        #[arg(long)]
        json: bool,
    },
}

fn ls_line(e: &transports::files::Entry) -> String {
    use transports::files::Kind;
    let t = match e.kind {
        Kind::Filesystem => 'F',
        Kind::Dir => 'd',
        Kind::Symlink => 'l',
        Kind::Char => 'c',
        Kind::Block => 'b',
        Kind::Fifo => 'p',
        Kind::Socket => 's',
        Kind::File => '-',
    };
    if e.kind == Kind::Filesystem {
        return format!(
            "{t} {:<8} {:>10} {}{}",
            e.fstype.as_deref().unwrap_or(""),
            crate::output::human(e.size),
            e.name,
            e.error
                .as_deref()
                .map(|x| format!("  (unreadable: {x})"))
                .unwrap_or_default()
        );
    }
    let bits = |m: u32, s: [char; 3]| -> String {
        (0..3)
            .map(|i| if m & (4 >> i) != 0 { s[i] } else { '-' })
            .collect()
    };
    let time = chrono::DateTime::from_timestamp(e.mtime, 0)
        .map(|t| t.format("%Y-%m-%d %H:%M").to_string())
        .unwrap_or_default();
    format!(
        "{t}{}{}{} {:>5} {:>5} {:>12} {time} {}{}",
        bits(e.mode >> 6, ['r', 'w', 'x']),
        bits(e.mode >> 3, ['r', 'w', 'x']),
        bits(e.mode, ['r', 'w', 'x']),
        e.uid,
        e.gid,
        e.size,
        e.name,
        e.target
            .as_deref()
            .map(|x| format!(" -> {x}"))
            .unwrap_or_default()
    )
}

/// `dm files … --server-repo NAME`.
fn remote_files(
    server: &crate::remote::ServerArgs,
    name: &str,
    a: &FilesArgs,
) -> Result<u8, Failure> {
    match &a.op {
        FilesOp::Ls { path, json } => {
            let v =
                crate::remote::files_ls(server, name, &a.point, path.as_deref().unwrap_or("/"))?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else {
                let entries: Vec<transports::files::Entry> = serde_json::from_value(v)
                    .map_err(|e| Failure(1, format!("the server's listing: {e}")))?;
                for e in &entries {
                    println!("{}", ls_line(e));
                }
            }
        }
        FilesOp::Get { paths, tar, to, .. } => {
            let (Some(file), None) = (tar, to) else {
                return Err(Failure(
                    2,
                    "through a server, files come as a tar archive: give --tar FILE (or -)".into(),
                ));
            };
            let n = if file == "-" {
                crate::remote::files_tar(
                    server,
                    name,
                    &a.point,
                    paths,
                    &mut std::io::stdout().lock(),
                )?
            } else {
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(file)
                    .map_err(|e| Failure(1, format!("{file}: {e}")))?;
                crate::remote::files_tar(server, name, &a.point, paths, &mut f)?
            };
            eprintln!("{n} bytes of tar archive from the server");
        }
    }
    Ok(0)
}

/// `dm files`: list or copy a point's files (a libguestfs appliance reads
/// the point's filesystems through an NBD export of it).
pub fn files(server: &crate::remote::ServerArgs, a: FilesArgs) -> Result<u8, Failure> {
    use transports::files::{FilesOptions, browse};
    if let Some(name) = &a.server_repo {
        return remote_files(server, name, &a);
    }
    let repo_dir = a
        .repo
        .ok_or_else(|| Failure(2, "--repo (or DM_REPO) is required".into()))?;
    let repo = Repository::open(&repo_dir)?;
    let point: datamover::PointRef = a.point.parse()?;
    let opts = FilesOptions {
        appliance_mib: a.appliance_mib.max(256),
        ..FilesOptions::default()
    };
    let t = std::time::Instant::now();
    match a.op {
        FilesOp::Ls { path, json } => {
            let path = path.unwrap_or_else(|| "/".into());
            let entries = browse(&repo, &point, &opts, |b| b.list(&path))?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&entries).unwrap_or_default()
                );
            } else {
                for e in &entries {
                    println!("{}", ls_line(e));
                }
            }
        }
        FilesOp::Get {
            paths,
            to,
            tar,
            json,
        } => {
            let x = browse(&repo, &point, &opts, |b| match (&to, tar.as_deref()) {
                (Some(dir), _) => {
                    std::fs::create_dir_all(dir)
                        .map_err(|e| datamover::Error::io("create", dir, e))?;
                    b.get(&paths, dir)
                }
                (None, Some("-")) => {
                    b.tar(&paths, std::io::BufWriter::new(std::io::stdout().lock()))
                }
                (None, Some(file)) => {
                    let f = std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .open(file)
                        .map_err(|e| {
                            datamover::Error::io("create", std::path::Path::new(file), e)
                        })?;
                    b.tar(&paths, std::io::BufWriter::new(f))
                }
                (None, None) => Err(datamover::Error::InvalidArgument(
                    "give --to DIR or --tar FILE".into(),
                )),
            })?;
            if json {
                eprintln!("{}", serde_json::to_string_pretty(&x).unwrap_or_default());
            }
            eprintln!(
                "{} file(s), {} dir(s), {} symlink(s), {} bytes in {:.1} s; {} bytes read from the repository{}",
                x.files,
                x.dirs,
                x.symlinks,
                x.bytes,
                t.elapsed().as_secs_f64(),
                x.bytes_loaded,
                if x.skipped.is_empty() {
                    String::new()
                } else {
                    format!("; left out: {}", x.skipped.join(", "))
                }
            );
            for w in &x.xattr_errors {
                eprintln!("warning: extended attribute not set: {w}");
            }
        }
    }
    Ok(0)
}
