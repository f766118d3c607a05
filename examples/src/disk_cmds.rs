//! `dm backup`, `dm vm-disks`, `dm restore`: moving a disk into and out
//! of a local repository.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use datamover::{
    BackupOptions, ChunkingInfo, ChunkingKind, Compression, DiskName, PointRef, Repository,
    RestoreOptions,
};
use serde_json::json;

use crate::output::{Failure, human, parse_size, progress_bar, progress_fn};

/// Arguments of `dm backup`.
#[derive(Args)]
pub struct BackupArgs {
    /// Raw image file, block device, file:// URI, NBD export (nbd://host[:port]/export, nbds://… with TLS, nbd+unix:///export?socket=PATH), or a running VM (qmp+unix:///path/to/qmp.sock or qmp://host:port, with --disk).
    pub source: String,
    /// Repository directory.
    #[arg(long, env = "DM_REPO")]
    pub repo: PathBuf,
    /// Name of the disk: <vm>/<disk>.
    #[arg(long)]
    pub name: String,
    /// Chunking: fixed (default: blocks aligned to disk offsets) or cdc (content-defined).
    #[arg(long, default_value = "fixed", value_parser = ["fixed", "cdc"])]
    pub chunking: String,
    /// Chunk size: 256K, 512K, 1M (default) or 4M.
    #[arg(long, default_value = "1M")]
    pub block_size: String,
    /// Compression: none, fast, optimal (default), high, extreme.
    #[arg(long, default_value = "optimal")]
    pub compression: String,
    /// Worker threads for hashing and compression (default: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Incremental (CBT): read only what this QEMU dirty bitmap marks
    /// changed since the disk's previous point (NBD sources).
    #[arg(long, value_name = "NAME")]
    pub bitmap: Option<String>,
    /// With --bitmap: when no incremental is possible (no previous point,
    /// no such bitmap, the disk was resized), read the whole disk instead of failing.
    #[arg(long)]
    pub full_if_needed: bool,
    /// Network timeout in seconds (NBD handshake and each request).
    #[arg(long, value_name = "SECONDS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout: u64,
    /// TLS certificates for nbds:// addresses: a directory with ca-cert.pem
    /// (and client-cert.pem + client-key.pem if the server checks clients).
    #[arg(long, value_name = "DIR")]
    pub tls_certificates: Option<PathBuf>,
    /// VM sources: the disk to back up (node name, device or export id;
    /// `dm vm-disks` lists them).
    #[arg(long, value_name = "NODE", conflicts_with = "all_disks")]
    pub disk: Option<String>,
    /// libvirt VMs: every disk at one instant (one freeze, one backup job,
    /// one checkpoint); --name is then the VM's name and each disk's point
    /// is NAME/TARGET.
    #[arg(long)]
    pub all_disks: bool,
    /// With --all-disks: leave this disk out (repeat).
    #[arg(long, value_name = "TARGET", requires = "all_disks")]
    pub exclude: Vec<String>,
    /// VM sources: transport mode: auto (san > hotadd > nbd), san (direct
    /// storage access), hotadd (attach to this proxy), nbd (network), or
    /// storage-snapshot.
    #[arg(long, default_value = "auto",
          value_parser = ["auto", "san", "hotadd", "nbd", "storage-snapshot"])]
    pub transport: String,
    /// VM sources: when the chosen mode cannot read the disk, read it over NBD.
    #[arg(long)]
    pub failover_to_network: bool,
    /// VM sources, --transport storage-snapshot: auto, reflink (XFS/btrfs)
    /// or qcow2-internal.
    #[arg(long, default_value = "auto",
          value_parser = ["auto", "reflink", "qcow2-internal"])]
    pub snapshot_provider: String,
    /// VM sources: application-aware processing through the guest agent
    /// (the VM address's ?agent=): auto (quiesce when the agent answers,
    /// else a crash-consistent point with a warning), required (fail when
    /// the guest cannot be quiesced) or off.
    #[arg(long, default_value = "auto", value_parser = ["auto", "required", "off"])]
    pub quiesce: String,
    /// Path sources: the image format. auto reads a qcow2, vmdk, vhdx,
    /// vdi, vpc or qed file as the disk it holds (but refuses one that
    /// names a backing or data file: name its format to follow those);
    /// raw reads the file's bytes.
    #[arg(long, default_value = "auto",
          value_parser = ["auto", "raw", "qcow2", "qcow", "vmdk", "vhdx", "vdi", "vpc", "qed"])]
    pub format: String,
    /// Print one JSON object with the run's figures.
    #[arg(long)]
    pub json: bool,
}

/// Back up a disk (image file, block device, NBD export, or a running
/// VM's disk) as a new restore point.
pub fn backup(args: BackupArgs) -> Result<u8, Failure> {
    let BackupArgs {
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
        all_disks,
        exclude,
        transport,
        failover_to_network,
        snapshot_provider,
        quiesce,
        format,
        json,
    } = args;
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
        quiesce: quiesce.parse()?,
        quiesce_limits: Default::default(),
        format: Some(format),
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
    if all_disks {
        let runs = transports::backup_vm(&r, &source, &name, &[], &exclude, &sopts, &opts);
        if let Some(b) = &bar {
            b.finish_and_clear();
        }
        let runs = runs?;
        if json {
            let v: Vec<_> = runs.iter().map(transports::RunReport::of_run).collect();
            println!("{}", json!(v));
        } else {
            for run in &runs {
                print_run(run);
            }
        }
        return Ok(0);
    }
    let disk: DiskName = name.parse()?;
    let run = transports::backup(&r, &source, &disk, &sopts, &opts);
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let run = run?;
    if json {
        let v = json!(transports::RunReport::of_run(&run));
        println!("{v}");
    } else {
        print_run(&run);
    }
    Ok(0)
}

/// A backup's outcome for a terminal: its notes, figures and consistency.
fn print_run(run: &transports::BackupRun) {
    for n in &run.notes {
        eprintln!("note: {n}");
    }
    let rep = &run.report;
    let s = &rep.stats;
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
    if let Some(c) = &rep.meta.consistency {
        match c.frozen_ms {
            Some(ms) => println!("consistency: {} ({}; frozen {ms} ms)", c.level, c.reason),
            None => println!("consistency: {} ({})", c.level, c.reason),
        }
    }
}

/// Arguments of `dm vm-disks`.
#[derive(Args)]
pub struct VmDisksArgs {
    /// The VM's QMP address.
    pub address: String,
    /// Timeout in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout: u64,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// List a running VM's disks (qmp+unix:///path/to/qmp.sock, qmp://host:port
/// or libvirt:///DOMAIN).
pub fn vm_disks(args: VmDisksArgs) -> Result<u8, Failure> {
    let VmDisksArgs {
        address,
        timeout,
        json,
    } = args;
    if transports::libvirt::is_libvirt(&address) {
        let disks = transports::libvirt::disks(&address)?;
        if json {
            println!("{}", serde_json::json!(disks));
        } else {
            for d in &disks {
                println!(
                    "{}\t{}\t{}",
                    d.target,
                    d.format,
                    d.source.as_deref().unwrap_or("-")
                );
            }
        }
        return Ok(0);
    }
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
    Ok(0)
}

/// Arguments of `dm vms`.
#[derive(Args)]
pub struct VmsArgs {
    /// A libvirt connection (libvirt:///, libvirt://HOST/, ?uri=…) or domain.
    #[arg(default_value = "libvirt:///")]
    pub address: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// List the VMs (libvirt domains) of a connection, with their disks.
pub fn vms(args: VmsArgs) -> Result<u8, Failure> {
    let VmsArgs { address, json } = args;
    let doms = transports::libvirt::domains(&address)?;
    if json {
        println!("{}", serde_json::json!(doms));
        return Ok(0);
    }
    println!("{:<24} {:<14} DISKS", "DOMAIN", "STATE");
    for d in &doms {
        let disks: Vec<String> = d
            .disks
            .iter()
            .map(|k| {
                format!(
                    "{} ({}, {})",
                    k.target,
                    k.format,
                    k.source.as_deref().unwrap_or("-")
                )
            })
            .collect();
        println!("{:<24} {:<14} {}", d.name, d.state, disks.join(", "));
    }
    Ok(0)
}

/// Arguments of `dm vm-restore`.
#[derive(Args)]
pub struct VmRestoreArgs {
    /// The VM (its points are VM/TARGET, backed up from libvirt).
    pub vm: String,
    /// Repository directory.
    #[arg(long, env = "DM_REPO")]
    pub repo: PathBuf,
    /// Where the restored disk images go (NAME-TARGET.raw).
    #[arg(long, value_name = "DIR")]
    pub to: PathBuf,
    /// The libvirt connection to define the VM on.
    #[arg(long, default_value = "qemu:///system")]
    pub uri: String,
    /// The new domain's name (default: VM-restored).
    #[arg(long)]
    pub name: Option<String>,
    /// Define the domain but do not start it.
    #[arg(long)]
    pub no_start: bool,
}

/// Recreate a libvirt VM from its newest points: every disk restored, the
/// domain defined from the definition its point stored, and started.
pub fn vm_restore(args: VmRestoreArgs) -> Result<u8, Failure> {
    let VmRestoreArgs {
        vm,
        repo,
        to,
        uri,
        name,
        no_start,
    } = args;
    let r = Repository::open(&repo)?;
    let name = name.unwrap_or_else(|| format!("{vm}-restored"));
    let images = transports::libvirt::restore_vm(&r, &vm, &to, &uri, &name, !no_start)?;
    for i in &images {
        println!("restored {}", i.display());
    }
    println!(
        "domain {name} defined on {uri}{}",
        if no_start { "" } else { " and started" }
    );
    Ok(0)
}

/// Arguments of `dm vm-thaw`.
#[derive(Args)]
pub struct VmThawArgs {
    /// The VM's address with its agent (qmp+unix:///…?agent=/path/qga.sock),
    /// or the agent socket itself.
    pub address: String,
    /// Timeout in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout: u64,
}

/// Thaw a guest a killed backup left frozen (the next backup does it too).
pub fn vm_thaw(args: VmThawArgs) -> Result<u8, Failure> {
    let VmThawArgs { address, timeout } = args;
    let agent = if transports::qemu::is_vm(&address) {
        transports::qemu::VmAddress::parse(&address)?
            .agent
            .ok_or_else(|| {
                datamover::Error::InvalidArgument(format!(
                    "{address} names no guest agent: add ?agent=/path/to/qga.sock"
                ))
            })?
    } else {
        address
    };
    let n = transports::qemu::quiesce::thaw(&agent, Duration::from_secs(timeout))?;
    if n == 0 {
        println!("the guest was not frozen");
    } else {
        println!("thawed {n} filesystems");
    }
    Ok(0)
}

/// Arguments of `dm restore`.
#[derive(Args)]
pub struct RestoreArgs {
    /// <vm>/<disk>[@<point id or prefix>]
    pub point: String,
    /// Target: a new file (sparse), an existing block device, or a writable
    /// NBD export (nbd://host[:port]/export, nbd+unix:///export?socket=PATH).
    pub target: String,
    /// Repository directory.
    #[arg(long, env = "DM_REPO")]
    pub repo: PathBuf,
    /// Overwrite an existing target file.
    #[arg(long)]
    pub force: bool,
    /// Network timeout in seconds (NBD targets).
    #[arg(long, value_name = "SECONDS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout: u64,
    /// TLS certificates for nbds:// targets (a directory with ca-cert.pem).
    #[arg(long, value_name = "DIR")]
    pub tls_certificates: Option<PathBuf>,
    /// Print one JSON object with the run's figures.
    #[arg(long)]
    pub json: bool,
}

/// Restore a point (the newest without @POINT) to a file or block device.
pub fn restore(args: RestoreArgs) -> Result<u8, Failure> {
    let RestoreArgs {
        point,
        target,
        repo,
        force,
        timeout,
        tls_certificates,
        json,
    } = args;
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
    Ok(0)
}
