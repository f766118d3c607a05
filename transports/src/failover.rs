//! VMs on replicas (libvirt): failover, its undo, failback, and quick
//! migration. The replicas are the images [`datamover::replica`] keeps
//! (`ROOT/VM/DISK.img`, raw, one state file each); the VM definition is
//! the domain XML the newest libvirt point of the VM stored.
//!
//! * **Failover** defines a domain on the replicas (new name, UUID and
//!   MACs; disks on the images) and starts it. The replicas' state says
//!   `failover`, so replication refuses to write under the running VM.
//! * **Undo** stops and undefines that domain; the guest's writes are
//!   dropped at the next update, which compares the images (only what
//!   differs is written back).
//! * **Failback** moves what changed while failed over back to the
//!   original VM: the replica VM is quiesced (guest agent freeze) and
//!   powered off, each replica image is backed up as a new point of its
//!   disk (only changed chunks are stored), and the original disks, which
//!   must be shut off, are brought to those points by comparing them
//!   extent by extent: only the differences are written (qcow2 disks
//!   through a writable qemu-nbd with QEMU's image locking on). The
//!   original domain's checkpoints are deleted (its disks were written
//!   outside its dirty tracking, so its next backup reads everything),
//!   and it is started.
//! * **Quick migration**: a first backup of the running source VM brings
//!   the replicas close; the guest is frozen (agent) and paused; a final
//!   incremental brings the replicas to that instant; the VM starts on the
//!   target from them; the source is powered off (and left defined). If
//!   anything fails before the target runs, the source is resumed and
//!   thawed: a migration never leaves both or neither VM running.

use std::path::Path;
use std::time::Instant;

use serde::Serialize;
use virt::domain::Domain;
use virt::sys;

use crate::libvirt::{self, LibvirtAddress};
use crate::{BackupRun, SourceOptions};
use datamover::replica::{self, FAILOVER, ReplicaReport};
use datamover::{BackupOptions, DiskName, Error, Repository, Result};

/// One disk of a VM on its replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReplicaDisk {
    /// `VM/DISK`.
    pub disk: String,
    /// The replica image.
    pub image: String,
    /// The point it held when the VM started on it.
    pub point: String,
}

/// A VM started on (or stopped from) its replicas.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReplicaVm {
    /// The VM's name in the repository (`VM` of `VM/DISK`).
    pub vm: String,
    /// The libvirt domain that runs on the replicas.
    pub domain: String,
    /// Its connection.
    pub uri: String,
    /// Whether it was started.
    pub started: bool,
    /// Its disks.
    pub disks: Vec<ReplicaDisk>,
}

/// What a failback did to one disk.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FailbackDisk {
    /// `VM/DISK`.
    pub disk: String,
    /// The point taken of the replica (the VM's state at failback).
    pub point: String,
    /// The original disk written.
    pub original: String,
    /// Bytes the replica VM changed, as stored in the repository.
    pub bytes_stored: u64,
    /// Bytes written to the original disk (the rest already matched).
    pub bytes_written: u64,
    /// Disk size.
    pub disk_size: u64,
}

/// What a failback did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FailbackReport {
    /// The original domain.
    pub domain: String,
    /// Whether it was started.
    pub started: bool,
    /// `application` (the replica VM was frozen before power-off) or
    /// `crash` (no agent answered), with the reason.
    pub consistency: String,
    /// Per disk.
    pub disks: Vec<FailbackDisk>,
    /// Seconds from the replica VM's power-off to the original's start.
    pub downtime_seconds: f64,
    /// Seconds in all.
    pub seconds: f64,
}

/// What a quick migration did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MigrationReport {
    /// The VM on the target.
    pub vm: ReplicaVm,
    /// Bytes read from the source by the first pass (VM running).
    pub first_pass_bytes: u64,
    /// Bytes read by the final sync (VM paused).
    pub final_sync_bytes: u64,
    /// `application` (frozen before the pause) or `crash`, with why.
    pub consistency: String,
    /// Seconds from the pause to the VM running on the target.
    pub downtime_seconds: f64,
    /// Seconds in all.
    pub seconds: f64,
}

/// Bring every replica of `vm` under `root` to its disk's newest point
/// (new replicas are written whole, others only where they differ).
pub fn sync(repo: &Repository, root: &Path, vm: &str) -> Result<Vec<ReplicaReport>> {
    let disks: Vec<DiskName> = repo.disks()?.into_iter().filter(|d| d.vm() == vm).collect();
    if disks.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "the repository has no disk of VM {vm} (`dm disks` lists them)"
        )));
    }
    disks
        .iter()
        .map(|d| {
            let p = repo.resolve_point(d, None)?;
            replica::apply(repo, d, &p, &replica::replica_path(root, d))
        })
        .collect()
}

/// The domain and connection an address names, or `VM-replica` on the
/// local `qemu:///system` when it names no domain.
fn target(on: &str, vm: &str) -> Result<(LibvirtAddress, String)> {
    LibvirtAddress::named(on, &format!("{vm}-replica"))
}

/// The replicas of `vm` a VM can start on: every one holds a whole point.
fn ready_replicas(repo: &Repository, root: &Path, vm: &str) -> Result<Vec<ReplicaDisk>> {
    let all = replica::replicas_of(repo, root, vm)?;
    if all.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "no replica of VM {vm} under {} (a replication job, or `dm replica sync`, makes them)",
            root.display()
        )));
    }
    all.into_iter()
        .map(|(d, img, st)| match st {
            Some(s) if s.state == "applied" => Ok(ReplicaDisk {
                disk: d.to_string(),
                image: img.display().to_string(),
                point: s.point,
            }),
            Some(s) if s.state == FAILOVER => Err(Error::InvalidArgument(format!(
                "replica {} is failed over already (a VM runs on it): undo or fail back first",
                img.display()
            ))),
            _ => Err(Error::InvalidArgument(format!(
                "replica {} holds no whole point (an update was interrupted, or a failover undone): `dm replica sync {vm}` first",
                img.display()
            ))),
        })
        .collect()
}

/// The newest definition among the points the replicas hold.
fn definition(repo: &Repository, disks: &[ReplicaDisk]) -> Result<String> {
    let points = disks
        .iter()
        .map(|r| Ok((r.disk.parse()?, r.point.clone())))
        .collect::<Result<Vec<_>>>()?;
    libvirt::newest_definition(repo, &points)?.ok_or_else(|| {
        Error::InvalidArgument(
            "no point the replicas hold stores a VM definition (only libvirt backups do): start a VM on the images by hand".into(),
        )
    })
}

fn target_of(disk: &str) -> &str {
    disk.split_once('/').map_or(disk, |(_, t)| t)
}

/// A domain defined on a VM's replicas, not started yet.
struct Defined {
    dom: Domain,
    name: String,
    uri: String,
}

/// Define a domain `on` names on the replicas of `vm` from the newest
/// definition the points they hold stored (refused when a domain of that
/// name exists).
fn define(repo: &Repository, root: &Path, vm: &str, on: &str) -> Result<Defined> {
    let (addr, name) = target(on, vm)?;
    let disks = ready_replicas(repo, root, vm)?;
    let xml = definition(repo, &disks)?;
    let files: Vec<(String, libvirt::NewDisk)> = disks
        .iter()
        .map(|r| {
            (
                target_of(&r.disk).to_string(),
                libvirt::NewDisk::raw(r.image.clone()),
            )
        })
        .collect();
    let def = libvirt::definition_for(&xml, &name, &files)?;
    let conn = libvirt::connect(&addr)?;
    if Domain::lookup_by_name(&conn, &name).is_ok() {
        return Err(Error::InvalidArgument(format!(
            "a domain {name} exists at {} already: give another name (libvirt:///NAME), or undo the failover that made it",
            addr.uri
        )));
    }
    let dom = Domain::define_xml(&conn, &def)
        .map_err(|e| libvirt::lv_err(&format!("defining {name}"), e))?;
    Ok(Defined {
        dom,
        name,
        uri: addr.uri,
    })
}

/// Mark the replicas of `vm` failed over (no update writes under the VM)
/// and start the defined domain unless `start` is false; on failure the
/// domain is undefined and the replicas hold their points again.
fn start_on(
    repo: &Repository,
    root: &Path,
    vm: &str,
    d: Defined,
    start: bool,
) -> Result<ReplicaVm> {
    let disks = match ready_replicas(repo, root, vm) {
        Ok(x) => x,
        Err(e) => {
            let _ = d.dom.undefine();
            return Err(e);
        }
    };
    let set = |state: &str| -> Result<()> {
        for r in &disks {
            replica::set_state(Path::new(&r.image), &r.point, state)?;
        }
        Ok(())
    };
    let r = set(FAILOVER).and_then(|()| {
        if start {
            d.dom
                .create()
                .map_err(|e| libvirt::lv_err(&format!("starting {}", d.name), e))?;
        }
        Ok(())
    });
    if let Err(e) = r {
        let _ = d.dom.undefine();
        if let Err(x) = set("applied") {
            tracing::warn!("restoring the replicas' state: {x}");
        }
        return Err(e);
    }
    Ok(ReplicaVm {
        vm: vm.to_string(),
        domain: d.name,
        uri: d.uri,
        started: start,
        disks,
    })
}

/// Define a domain on the replicas of `vm` at `on` (`libvirt:///NAME`,
/// default `VM-replica` on `qemu:///system`) and start it unless `start`
/// is false. The replicas are marked failed over first, so no update
/// writes under the VM.
pub fn failover(
    repo: &Repository,
    root: &Path,
    vm: &str,
    on: &str,
    start: bool,
) -> Result<ReplicaVm> {
    let d = define(repo, root, vm, on)?;
    start_on(repo, root, vm, d, start)
}

/// Power a domain off and undefine it (with its checkpoints' metadata).
fn remove_domain(dom: &Domain, name: &str) -> Result<()> {
    if dom.is_active().unwrap_or(false) {
        dom.destroy()
            .map_err(|e| libvirt::lv_err(&format!("stopping {name}"), e))?;
    }
    dom.undefine_flags(
        sys::VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
            | sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
            | sys::VIR_DOMAIN_UNDEFINE_NVRAM,
    )
    .map_err(|e| libvirt::lv_err(&format!("undefining {name}"), e))
}

/// Undo a failover: the domain at `on` is powered off and undefined, and
/// the replicas are marked untrusted (the next update compares them with
/// their point and writes back only what the guest changed).
pub fn undo(repo: &Repository, root: &Path, vm: &str, on: &str) -> Result<ReplicaVm> {
    let (addr, name) = target(on, vm)?;
    let conn = libvirt::connect(&addr)?;
    let dom = libvirt::domain(&conn, &addr)?;
    let disks = failed_over(repo, root, vm)?;
    check_runs_on(&dom, &name, &disks)?;
    remove_domain(&dom, &name)?;
    for r in &disks {
        replica::set_state(Path::new(&r.image), &r.point, "applying")?;
    }
    Ok(ReplicaVm {
        vm: vm.to_string(),
        domain: name,
        uri: addr.uri,
        started: false,
        disks,
    })
}

/// The replicas of `vm` a VM runs on (marked failed over).
fn failed_over(repo: &Repository, root: &Path, vm: &str) -> Result<Vec<ReplicaDisk>> {
    Ok(replica::replicas_of(repo, root, vm)?
        .into_iter()
        .filter_map(|(d, img, st)| {
            st.filter(|s| s.state == FAILOVER).map(|s| ReplicaDisk {
                disk: d.to_string(),
                image: img.display().to_string(),
                point: s.point,
            })
        })
        .collect())
}

/// Refuse to touch a domain that does not run on these replicas.
fn check_runs_on(dom: &Domain, name: &str, disks: &[ReplicaDisk]) -> Result<()> {
    let xml = dom
        .get_xml_desc(sys::VIR_DOMAIN_XML_INACTIVE)
        .map_err(|e| libvirt::lv_err("domain XML", e))?;
    let sources: Vec<String> = libvirt::disks_of_xml(&xml)?
        .into_iter()
        .filter_map(|d| d.source)
        .collect();
    if disks.is_empty() || !disks.iter().all(|r| sources.contains(&r.image)) {
        return Err(Error::InvalidArgument(format!(
            "domain {name} does not run on the failed-over replicas of this VM ({}); nothing was changed",
            if disks.is_empty() {
                "none is failed over".to_string()
            } else {
                disks
                    .iter()
                    .map(|r| r.image.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        )));
    }
    Ok(())
}

/// Open a VM's own disk for writing, as its format needs: a raw file or
/// a device in place, another format through a writable local qemu-nbd
/// (QEMU's image locking refuses an image a VM holds).
fn open_original(
    path: &Path,
    format: &str,
    size: u64,
) -> Result<(
    Box<dyn datamover::target::BlockTarget>,
    Option<crate::qemu::local::LocalExport>,
)> {
    use std::os::unix::fs::FileTypeExt;
    let meta = std::fs::metadata(path).map_err(|e| Error::io("open", path, e))?;
    if format == "raw" {
        if meta.file_type().is_block_device() {
            return Ok((
                Box::new(datamover::target::BlockDeviceTarget::open(path, size)?),
                None,
            ));
        }
        return Ok((
            Box::new(datamover::target::FileTarget::update(path, size)?),
            None,
        ));
    }
    let export = crate::qemu::local::LocalExport::start_writable(path, format)?;
    let t = crate::nbd::NbdTarget::connect(export.uri(), size, &Default::default())?;
    Ok((Box::new(t), Some(export)))
}

/// Fail back: move the state of the VM running on the replicas (`on`,
/// default `VM-replica`) to the original domain `to` (shut off; its disks
/// where this host sees them), then remove the replica VM and start the
/// original unless `start` is false. See the module comment.
pub fn failback(
    repo: &Repository,
    root: &Path,
    vm: &str,
    on: &str,
    to: &str,
    start: bool,
    backup: &BackupOptions,
) -> Result<FailbackReport> {
    let t0 = Instant::now();
    let (addr, name) = target(on, vm)?;
    let orig_addr = LibvirtAddress::parse(to)?;
    let orig_conn = libvirt::connect(&orig_addr)?;
    let orig = libvirt::domain(&orig_conn, &orig_addr)?;
    let orig_name = orig_addr.domain.clone().unwrap_or_default();
    if orig.is_active().unwrap_or(true) {
        return Err(Error::InvalidArgument(format!(
            "the original VM {orig_name} is running: shut it off before failing back onto it (its disks are written)"
        )));
    }
    let orig_xml = orig
        .get_xml_desc(sys::VIR_DOMAIN_XML_INACTIVE)
        .map_err(|e| libvirt::lv_err("domain XML", e))?;
    let orig_disks = libvirt::disks_of_xml(&orig_xml)?;
    let conn = libvirt::connect(&addr)?;
    let dom = libvirt::domain(&conn, &addr)?;
    let disks = failed_over(repo, root, vm)?;
    check_runs_on(&dom, &name, &disks)?;
    // Every replicated disk needs its original before anything stops.
    let mut pairs = Vec::new();
    for r in &disks {
        let t = target_of(&r.disk);
        let o = orig_disks
            .iter()
            .find(|o| o.target == t)
            .and_then(|o| o.source.clone().map(|s| (s, o.format.clone())))
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "the original VM {orig_name} has no disk {t} with a file or device to fail back onto"
                ))
            })?;
        pairs.push((r, o));
    }
    // Quiesce, then power off: the replicas now hold the guest's state.
    let frozen = if dom.is_active().unwrap_or(false) {
        libvirt::fs_freeze(&dom).map(|_| ())
    } else {
        Err("the replica VM was not running".into())
    };
    let down = Instant::now();
    dom.destroy()
        .or_else(|e| {
            if dom.is_active().unwrap_or(true) {
                Err(e)
            } else {
                Ok(())
            }
        })
        .map_err(|e| libvirt::lv_err(&format!("stopping {name}"), e))?;
    let mut out = Vec::new();
    let src = SourceOptions {
        format: Some("raw".into()),
        ..Default::default()
    };
    let full = BackupOptions {
        full_if_needed: true,
        ..backup.clone()
    };
    for (r, (path, format)) in &pairs {
        let disk: DiskName = r.disk.parse()?;
        let run = crate::backup(repo, &r.image, &disk, &src, &full)?;
        let point = run.report.point.clone();
        let size = run.report.meta.disk_size;
        let (t, export) = open_original(Path::new(path), format, size)?;
        let res = datamover::restore(
            repo,
            &disk,
            &point,
            t.as_ref(),
            &datamover::RestoreOptions {
                compare: true,
                ..Default::default()
            },
        )?;
        // Our connection ends before its qemu-nbd is stopped (which
        // otherwise waits for it).
        drop(t);
        drop(export);
        replica::set_state(Path::new(&r.image), point.as_str(), "applied")?;
        out.push(FailbackDisk {
            disk: r.disk.clone(),
            point: point.to_string(),
            original: path.clone(),
            bytes_stored: run.report.stats.bytes_stored,
            bytes_written: res.stats.bytes_new,
            disk_size: size,
        });
    }
    // The original's disks changed outside its dirty tracking.
    for c in libvirt::checkpoints(&orig)?
        .into_iter()
        .filter(|c| c.starts_with(libvirt::CHECKPOINT))
    {
        if libvirt::delete_checkpoint(&orig, &c).is_err() {
            // libvirt deletes checkpoints of running domains only: drop
            // the metadata, and the bitmap from each qcow2 disk ourselves.
            libvirt::delete_checkpoint_with(
                &orig,
                &c,
                sys::VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY,
            )?;
            for (_, (path, format)) in pairs.iter().filter(|(_, (_, f))| f == "qcow2") {
                remove_bitmap(Path::new(path), format, &c);
            }
        }
    }
    remove_domain(&dom, &name)?;
    if start {
        orig.create()
            .map_err(|e| libvirt::lv_err(&format!("starting {orig_name}"), e))?;
    }
    Ok(FailbackReport {
        domain: orig_name,
        started: start,
        consistency: libvirt::consistency_of(&frozen),
        disks: out,
        downtime_seconds: down.elapsed().as_secs_f64(),
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// Remove bitmap `name` from an image that is not in use (a bitmap that
/// is not there is fine: not every disk is in every checkpoint).
fn remove_bitmap(path: &Path, format: &str, name: &str) {
    let out = std::process::Command::new("qemu-img")
        .args(["bitmap", "--remove", "-f", format])
        .arg(path)
        .arg(name)
        .output();
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => tracing::debug!(
            "qemu-img bitmap --remove {} {name}: {}",
            path.display(),
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => tracing::warn!("qemu-img: {e}"),
    }
}

fn read_bytes(runs: &[BackupRun]) -> u64 {
    runs.iter().map(|r| r.report.stats.bytes_read).sum()
}

/// Quick migration of the libvirt VM `from` to `to` (`libvirt:///NAME`,
/// any connection; default name: the VM's), through the repository and
/// the replicas under `root` (on storage `to`'s host sees). See the
/// module comment. `vm` names its disks in the repository (default: the
/// source domain's name).
pub fn migrate(
    repo: &Repository,
    root: &Path,
    vm: Option<&str>,
    from: &str,
    to: &str,
    opts: &SourceOptions,
    backup: &BackupOptions,
) -> Result<MigrationReport> {
    let t0 = Instant::now();
    let src_addr = LibvirtAddress::parse(from)?;
    let vm = match vm {
        Some(v) => v,
        None => src_addr.domain.as_deref().ok_or_else(|| {
            Error::InvalidArgument(format!("{from} names no domain (libvirt:///DOMAIN)"))
        })?,
    };
    let (to_addr, name) = {
        let mut a = LibvirtAddress::parse(to)?;
        let n = a.domain.clone().unwrap_or_else(|| vm.to_string());
        a.domain = Some(n.clone());
        (a, n)
    };
    let to_conn = libvirt::connect(&to_addr)?;
    if Domain::lookup_by_name(&to_conn, &name).is_ok() {
        return Err(Error::InvalidArgument(format!(
            "a domain {name} exists at {} already: name the migrated VM (libvirt:///NAME)",
            to_addr.uri
        )));
    }
    // The source must exist before anything is read.
    libvirt::domain(&libvirt::connect(&src_addr)?, &src_addr)?;
    let full = BackupOptions {
        full_if_needed: true,
        ..backup.clone()
    };
    // First pass: the VM runs.
    let first = crate::backup_vm(repo, from, vm, &[], &[], opts, &full)?;
    sync(repo, root, vm)?;
    // The target domain is defined while the VM still runs (its
    // definition does not change); only its start is in the pause.
    let on = format!("libvirt:///{name}?uri={}", to_addr.uri);
    let defined = define(repo, root, vm, &on)?;
    let undefine = |d: &Defined| {
        if let Err(e) = d.dom.undefine() {
            tracing::warn!("undefining {}: {}", d.name, e.message());
        }
    };
    // Final sync: frozen (when an agent answers) and paused.
    let down = Instant::now();
    let paused = match libvirt::pause(from, opts.quiesce) {
        Ok(p) => p,
        Err(e) => {
            undefine(&defined);
            return Err(e);
        }
    };
    let still = SourceOptions {
        quiesce: paused.held(),
        ..opts.clone()
    };
    let runs = match crate::backup_vm(repo, from, vm, &[], &[], &still, &full)
        .and_then(|runs| sync(repo, root, vm).map(|_| runs))
    {
        Ok(r) => r,
        Err(e) => {
            paused.resume();
            undefine(&defined);
            return Err(e);
        }
    };
    // `start_on` undefines the target itself when it cannot start it.
    let started = match start_on(repo, root, vm, defined, true) {
        Ok(s) => s,
        Err(e) => {
            paused.resume();
            return Err(e);
        }
    };
    let downtime = down.elapsed().as_secs_f64();
    if let Err(e) = paused.power_off() {
        tracing::warn!("the VM runs on the target, but: {e}");
    }
    Ok(MigrationReport {
        vm: started,
        first_pass_bytes: read_bytes(&first),
        final_sync_bytes: read_bytes(&runs),
        consistency: paused.consistency(),
        downtime_seconds: downtime,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// A replica as `dm replica list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReplicaInfo {
    /// `VM/DISK`.
    pub disk: String,
    /// The image.
    pub image: String,
    /// What it holds: `applied POINT`, `applying POINT`, `failover POINT`,
    /// or `unknown` (no state file).
    pub state: String,
}

/// The replicas of `vm` under `root`, with what each holds.
pub fn replicas(repo: &Repository, root: &Path, vm: &str) -> Result<Vec<ReplicaInfo>> {
    Ok(replica::replicas_of(repo, root, vm)?
        .into_iter()
        .map(|(d, img, st)| ReplicaInfo {
            disk: d.to_string(),
            image: img.display().to_string(),
            state: st.map_or_else(
                || "unknown".to_string(),
                |s| format!("{} {}", s.state, s.point),
            ),
        })
        .collect())
}
