//! `dm`: the datamover command line. Glue only: parse arguments, show
//! progress, print results; all logic lives in the `datamover` crate.
//!
//! Exit codes: 0 success, 1 failure (I/O, missing data), 2 bad usage or
//! input, 3 repository damaged (verify found problems, corrupt data).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

mod remote;

use clap::{Parser, Subcommand};
use datamover::{
    BackupOptions, ChunkingInfo, ChunkingKind, Compression, DiskName, ErrorKind, KeepPolicy,
    PointRef, PruneOptions, Repository, RestoreOptions,
};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

#[derive(Parser)]
#[command(
    name = "dm",
    version,
    about = "Back up and restore VM disks: dedupe, compression, verified restores"
)]
struct Cli {
    #[command(flatten)]
    server: remote::ServerArgs,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a new repository in an empty or new directory.
    Init {
        /// Repository directory.
        repo: PathBuf,
    },
    /// Back up a disk (image file, block device, NBD export, or a running
    /// VM's disk) as a new restore point.
    Backup {
        /// Raw image file, block device, file:// URI, NBD export (nbd://host[:port]/export, nbds://… with TLS, nbd+unix:///export?socket=PATH), or a running VM (qmp+unix:///path/to/qmp.sock or qmp://host:port, with --disk).
        source: String,
        /// Repository directory.
        #[arg(long, env = "DM_REPO")]
        repo: PathBuf,
        /// Name of the disk: <vm>/<disk>.
        #[arg(long)]
        name: String,
        /// Chunking: fixed (default: blocks aligned to disk offsets) or cdc (content-defined).
        #[arg(long, default_value = "fixed", value_parser = ["fixed", "cdc"])]
        chunking: String,
        /// Chunk size: 256K, 512K, 1M (default) or 4M.
        #[arg(long, default_value = "1M")]
        block_size: String,
        /// Compression: none, fast, optimal (default), high, extreme.
        #[arg(long, default_value = "optimal")]
        compression: String,
        /// Worker threads for hashing and compression (default: one per core).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Incremental (CBT): read only what this QEMU dirty bitmap marks
        /// changed since the disk's previous point (NBD sources).
        #[arg(long, value_name = "NAME")]
        bitmap: Option<String>,
        /// With --bitmap: when no incremental is possible (no previous point,
        /// no such bitmap, the disk was resized), read the whole disk instead of failing.
        #[arg(long)]
        full_if_needed: bool,
        /// Network timeout in seconds (NBD handshake and each request).
        #[arg(long, value_name = "SECONDS", default_value_t = 60,
              value_parser = clap::value_parser!(u64).range(1..))]
        timeout: u64,
        /// TLS certificates for nbds:// addresses: a directory with ca-cert.pem
        /// (and client-cert.pem + client-key.pem if the server checks clients).
        #[arg(long, value_name = "DIR")]
        tls_certificates: Option<PathBuf>,
        /// VM sources: the disk to back up (node name, device or export id;
        /// `dm vm-disks` lists them).
        #[arg(long, value_name = "NODE")]
        disk: Option<String>,
        /// VM sources: transport mode: auto (san > hotadd > nbd), san (direct
        /// storage access), hotadd (attach to this proxy), nbd (network), or
        /// storage-snapshot.
        #[arg(long, default_value = "auto",
              value_parser = ["auto", "san", "hotadd", "nbd", "storage-snapshot"])]
        transport: String,
        /// VM sources: when the chosen mode cannot read the disk, read it over NBD.
        #[arg(long)]
        failover_to_network: bool,
        /// VM sources, --transport storage-snapshot: auto, reflink (XFS/btrfs)
        /// or qcow2-internal.
        #[arg(long, default_value = "auto",
              value_parser = ["auto", "reflink", "qcow2-internal"])]
        snapshot_provider: String,
        /// Print one JSON object with the run's figures.
        #[arg(long)]
        json: bool,
    },
    /// List a running VM's disks (qmp+unix:///path/to/qmp.sock or qmp://host:port).
    VmDisks {
        /// The VM's QMP address.
        address: String,
        /// Timeout in seconds.
        #[arg(long, value_name = "SECONDS", default_value_t = 60,
              value_parser = clap::value_parser!(u64).range(1..))]
        timeout: u64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Restore a point (the newest without @POINT) to a file or block device.
    Restore {
        /// <vm>/<disk>[@<point id or prefix>]
        point: String,
        /// Target: a new file (sparse), an existing block device, or a writable
        /// NBD export (nbd://host[:port]/export, nbd+unix:///export?socket=PATH).
        target: String,
        /// Repository directory.
        #[arg(long, env = "DM_REPO")]
        repo: PathBuf,
        /// Overwrite an existing target file.
        #[arg(long)]
        force: bool,
        /// Network timeout in seconds (NBD targets).
        #[arg(long, value_name = "SECONDS", default_value_t = 60,
              value_parser = clap::value_parser!(u64).range(1..))]
        timeout: u64,
        /// TLS certificates for nbds:// targets (a directory with ca-cert.pem).
        #[arg(long, value_name = "DIR")]
        tls_certificates: Option<PathBuf>,
        /// Print one JSON object with the run's figures.
        #[arg(long)]
        json: bool,
    },
    /// List restore points.
    Points {
        /// Only this disk (<vm>/<disk>).
        name: Option<String>,
        /// Repository directory.
        #[arg(long, env = "DM_REPO")]
        repo: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check the repository; with --read-data, read and check every chunk.
    Verify {
        /// Repository directory.
        #[arg(long, env = "DM_REPO")]
        repo: PathBuf,
        /// Read every chunk (CRC, decompression, BLAKE3).
        #[arg(long)]
        read_data: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Managed hosts of a server (--server): add (prints the enrollment token), list, remove.
    #[command(subcommand)]
    Host(remote::HostCmd),
    /// Proxies of a server (--server): list, set slots/modes/site, disable.
    #[command(subcommand)]
    Proxy(remote::ProxyCmd),
    /// Repositories of a server (--server).
    #[command(subcommand)]
    Repo(remote::RepoCmd),
    /// Jobs of a server (--server): create, list, run, delete.
    #[command(subcommand)]
    Job(remote::JobCmd),
    /// Sessions (job runs) of a server (--server): list, show, watch.
    #[command(subcommand)]
    Session(remote::SessionCmd),
    /// Forget old points and free the space only they used.
    Prune {
        /// Repository directory.
        #[arg(long, env = "DM_REPO")]
        repo: PathBuf,
        /// Keep the newest N points of each disk.
        #[arg(long)]
        keep_last: Option<usize>,
        /// Keep the newest point of each of the last N days.
        #[arg(long)]
        keep_daily: Option<usize>,
        /// Keep the newest point of each of the last N weeks.
        #[arg(long)]
        keep_weekly: Option<usize>,
        /// Keep the newest point of each of the last N months.
        #[arg(long)]
        keep_monthly: Option<usize>,
        /// Show what would be removed, change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Failure carrying its exit code.
struct Failure(u8, String);

impl From<datamover::Error> for Failure {
    fn from(e: datamover::Error) -> Self {
        let code = match e.kind() {
            ErrorKind::InvalidInput => 2,
            ErrorKind::Corrupt => 3,
            _ => 1,
        };
        Failure(code, e.to_string())
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DM_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .without_time()
        .init();
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(Failure(code, msg)) => {
            eprintln!("dm: error: {msg}");
            ExitCode::from(code)
        }
    }
}

fn run(cli: Cli) -> Result<u8, Failure> {
    match cli.cmd {
        Cmd::Init { repo } => {
            let r = Repository::init(&repo)?;
            println!(
                "created repository {} (id {})",
                repo.display(),
                r.config().id
            );
        }
        Cmd::Backup {
            source,
            repo,
            name,
            chunking,
            block_size,
            compression,
            threads,
            bitmap,
            full_if_needed,
            timeout,
            tls_certificates,
            disk: vm_disk,
            transport,
            failover_to_network,
            snapshot_provider,
            json,
        } => {
            let disk: DiskName = name.parse()?;
            let kind: ChunkingKind = chunking.parse()?;
            let block_size = parse_size(&block_size)?;
            let compression: Compression = compression.parse()?;
            let r = Repository::open(&repo)?;
            let sopts = transports::SourceOptions {
                bitmap,
                timeout: Some(Duration::from_secs(timeout)),
                tls_certificates,
                disk: vm_disk,
                transport: transport.parse()?,
                failover_to_network,
                snapshot_provider: Some(snapshot_provider),
            };
            let bar = progress_bar(0);
            let opts = BackupOptions {
                chunking: ChunkingInfo { kind, block_size },
                compression,
                threads,
                progress: bar.as_ref().map(progress_fn),
                full_if_needed,
                ..BackupOptions::default()
            };
            let run = transports::backup(&r, &source, &disk, &sopts, &opts);
            if let Some(b) = &bar {
                b.finish_and_clear();
            }
            let run = run?;
            for n in &run.notes {
                if !json {
                    eprintln!("note: {n}");
                }
            }
            let rep = &run.report;
            let s = &rep.stats;
            if json {
                let v = json!(transports::RunReport::of_run(&run));
                println!("{v}");
            } else {
                if let Some(why) = &rep.full_reason {
                    eprintln!("note: full backup: {why}");
                }
                if let (Some(p), Some(c)) = (rep.parent(), rep.bytes_changed()) {
                    println!(
                        "incremental from {p}: {} changed, {} read of {}",
                        human(c),
                        human(s.bytes_read),
                        human(s.bytes_total)
                    );
                }
                println!(
                    "{}@{}: {} in {:.1} s ({:.0} MB/s); read {}, new {}, stored {}; dedupe {}, compression {:.2}x; bottleneck: {}",
                    rep.disk,
                    rep.point,
                    human(s.bytes_total),
                    s.seconds,
                    s.mb_per_s(),
                    human(s.bytes_read),
                    human(s.bytes_new),
                    human(s.bytes_stored),
                    if s.bytes_new == 0 {
                        "all known".to_string()
                    } else {
                        format!("{:.2}x", s.dedupe_ratio())
                    },
                    s.compression_ratio(),
                    s.bottleneck()
                );
            }
        }
        Cmd::VmDisks {
            address,
            timeout,
            json,
        } => {
            let disks = transports::qemu::disks(&address, Duration::from_secs(timeout))?;
            if json {
                let v: Vec<_> = disks.iter().map(|d| d.summary()).collect();
                println!("{}", serde_json::Value::Array(v));
            } else {
                for d in &disks {
                    println!(
                        "{}\t{}\t{}\t{}\t{}",
                        d.device.as_deref().unwrap_or("-"),
                        d.node,
                        d.driver,
                        human(d.size),
                        d.file
                            .as_ref()
                            .map_or("-".into(), |f| f.display().to_string())
                    );
                }
            }
        }
        Cmd::Restore {
            point,
            target,
            repo,
            force,
            timeout,
            tls_certificates,
            json,
        } => {
            let point: PointRef = point.parse()?;
            let r = Repository::open(&repo)?;
            let bar = progress_bar(0);
            let opts = RestoreOptions {
                progress: bar.as_ref().map(progress_fn),
                ..RestoreOptions::default()
            };
            let sopts = transports::SourceOptions {
                timeout: Some(Duration::from_secs(timeout)),
                tls_certificates,
                ..Default::default()
            };
            let rep = transports::restore(&r, &point, &target, force, &sopts, &opts);
            if let Some(b) = &bar {
                b.finish_and_clear();
            }
            let rep = rep?;
            let s = &rep.stats;
            if json {
                let mut v = json!(transports::RunReport::of_stats(
                    &rep.disk, &rep.point, "", s
                ));
                v["target"] = json!(target);
                println!("{v}");
            } else {
                println!(
                    "restored {}@{} to {}: {} in {:.1} s ({:.0} MB/s), every chunk checked",
                    rep.disk,
                    rep.point,
                    target,
                    human(s.bytes_total),
                    s.seconds,
                    s.mb_per_s()
                );
            }
        }
        Cmd::Points { name, repo, json } => {
            let disk = name.map(|n| n.parse::<DiskName>()).transpose()?;
            let r = Repository::open(&repo)?;
            let (points, bad) = r.list_points(disk.as_ref())?;
            for e in &bad {
                eprintln!("dm: warning: {e}");
            }
            if json {
                let v: Vec<_> = points
                    .iter()
                    .map(|p| {
                        json!({"disk": p.disk.to_string(), "point": p.id.to_string(), "meta": p.meta,
                               "manifest_bytes": p.manifest_len})
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(v));
            } else if points.is_empty() {
                println!("no restore points");
            } else {
                println!(
                    "{:<20} {:<28} {:<19} {:>10} {:>10} {:<16} SOURCE",
                    "DISK", "POINT", "STARTED", "SIZE", "STORED", "TRANSPORT"
                );
                for p in &points {
                    println!(
                        "{:<20} {:<28} {:<19} {:>10} {:>10} {:<16} {}",
                        p.disk.to_string(),
                        p.id.to_string(),
                        p.meta
                            .started
                            .get(..19)
                            .unwrap_or(&p.meta.started)
                            .replace('T', " "),
                        human(p.meta.disk_size),
                        human(p.meta.stats.bytes_stored),
                        p.meta.transport,
                        p.meta.source.location
                    );
                }
            }
            if !bad.is_empty() {
                return Ok(3);
            }
        }
        Cmd::Verify {
            repo,
            read_data,
            json,
        } => {
            let r = Repository::open(&repo)?;
            let rep = datamover::verify(&r, read_data)?;
            if json {
                println!("{}", json!(rep));
            } else {
                for p in &rep.problems {
                    println!("problem: {p}");
                }
                for d in &rep.damaged_points {
                    println!("damaged point {}:", d.point);
                    for p in &d.problems {
                        println!("  {p}");
                    }
                    if d.more > 0 {
                        println!("  ... and {} more", d.more);
                    }
                }
                if rep.unindexed_packs > 0 {
                    println!(
                        "note: {} pack(s) left by interrupted backups; `dm prune` removes them",
                        rep.unindexed_packs
                    );
                }
                println!(
                    "{}: {} points, {} packs, {} chunks{}",
                    if rep.is_ok() { "ok" } else { "DAMAGED" },
                    rep.points,
                    rep.packs,
                    rep.chunks,
                    if read_data {
                        format!(", {} chunks read and checked", rep.chunks_read)
                    } else {
                        String::new()
                    }
                );
            }
            if !rep.is_ok() {
                return Ok(3);
            }
        }
        Cmd::Host(c) => return remote::host(&cli.server, c),
        Cmd::Proxy(c) => return remote::proxy(&cli.server, c),
        Cmd::Repo(c) => return remote::repo(&cli.server, c),
        Cmd::Job(c) => return remote::job(&cli.server, c),
        Cmd::Session(c) => return remote::session(&cli.server, c),
        Cmd::Prune {
            repo,
            keep_last,
            keep_daily,
            keep_weekly,
            keep_monthly,
            dry_run,
            json,
        } => {
            let r = Repository::open(&repo)?;
            let opts = PruneOptions {
                keep: KeepPolicy {
                    last: keep_last,
                    daily: keep_daily,
                    weekly: keep_weekly,
                    monthly: keep_monthly,
                },
                dry_run,
                ..PruneOptions::default()
            };
            let rep = datamover::prune(&r, &opts)?;
            if json {
                println!("{}", json!(rep));
            } else {
                for p in &rep.points_removed {
                    println!("{} {p}", if dry_run { "would forget" } else { "forgot" });
                }
                println!(
                    "{}{} points kept, {} forgotten; {} packs deleted, {} repacked, {} orphan packs removed; {} freed",
                    if dry_run { "dry run: " } else { "" },
                    rep.points_kept,
                    rep.points_removed.len(),
                    rep.packs_deleted,
                    rep.packs_repacked,
                    rep.orphan_packs_deleted,
                    human(rep.bytes_freed)
                );
            }
        }
    }
    Ok(0)
}

fn progress_bar(total: u64) -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let b = ProgressBar::new(total);
    let style = ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] [{wide_bar}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    b.set_style(style);
    b.enable_steady_tick(Duration::from_millis(200));
    Some(b)
}

fn progress_fn(b: &ProgressBar) -> datamover::ProgressFn {
    let b = b.clone();
    Arc::new(move |done, total| {
        if b.length() != Some(total) {
            b.set_length(total);
        }
        b.set_position(done);
        true
    })
}

/// Parse "1M", "256K", "4MiB", "1048576".
fn parse_size(s: &str) -> Result<u32, Failure> {
    let t = s.trim().to_ascii_uppercase();
    let t = t.trim_end_matches("IB").trim_end_matches('B');
    let (num, mult) = match t.chars().last() {
        Some('K') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M') => (&t[..t.len() - 1], 1 << 20),
        Some('G') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| Failure(2, format!("bad size {s:?}: use 256K, 512K, 1M or 4M")))
}

fn human(b: u64) -> String {
    const U: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < U.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}
