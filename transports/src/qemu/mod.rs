//! The QEMU platform: back up a running VM's disk the way the big
//! products do. Freeze it (a VM snapshot: an external overlay, or a
//! storage snapshot), rotate its changed-block-tracking checkpoint in the
//! same QMP transaction, read the frozen data through the best transport
//! mode, and undo the freeze on every path.
//!
//! Transport modes, most efficient first (see [`Mode`]):
//! * **Direct storage access** (`san`): the proxy reads the raw image file
//!   or LUN itself, as the VM host names it.
//! * **Virtual appliance** (`hotadd`): on the VM's host, the frozen disk is
//!   attached to the proxy: a read-only loop device (raw), or a local
//!   qemu-nbd export (qcow2).
//! * **Network** (`nbd`): the VM exports the frozen disk over NBD.
//! * **Storage snapshot** (`storage-snapshot`, only when asked for): a
//!   [`snapshot::StorageSnapshot`] provider snapshots the image; the VM is
//!   held only for that moment.
//!
//! Changed blocks always come from the VM's checkpoint bitmap over the
//! control channel (NBD block status on the VM's export of the disk), not
//! from the data path, as VMware's QueryChangedDiskAreas is separate from
//! its transports.

pub mod agent;
pub mod local;
pub mod qmp;
pub mod quiesce;
pub mod snapshot;
pub mod vm;

use std::time::Duration;

use datamover::cbt::{ChangeTracker, Tracking};
use datamover::format::manifest::SourceInfo;
use datamover::source::BlockSource;
use datamover::{BackupOptions, BackupReport, DiskName, Error, Result, Store, TransportKind};

use crate::nbd::{ConnectOptions, NbdSource};
use local::{LocalExport, LoopDevice};
pub use quiesce::{Quiesce, QuiesceLimits, Quiescer};
use snapshot::{SnapshotImage, StorageSnapshot};
pub use vm::{DiskInfo, Vm, VmAddress, is_vm};

pub use crate::mode::Mode;

/// Which transport a job uses: chosen per disk, or pinned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TransportChoice {
    /// The most efficient mode that can serve the disk: san > hotadd > nbd.
    #[default]
    Auto,
    /// Only this mode (with failover to network, if the job allows it).
    Pinned(Mode),
}

impl std::str::FromStr for TransportChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(TransportChoice::Auto),
            other => other.parse::<Mode>().map(TransportChoice::Pinned).map_err(|_| {
                Error::InvalidArgument(format!(
                    "unknown transport {other:?}: use auto, san, hotadd, nbd or storage-snapshot"
                ))
            }),
        }
    }
}

/// A fall back to network mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failover {
    /// The mode that failed.
    pub from: String,
    /// Why.
    pub reason: String,
}

/// The outcome of [`crate::backup`].
#[derive(Debug, Clone)]
pub struct BackupRun {
    /// The backup's report (its point's meta names the mode used).
    pub report: BackupReport,
    /// Set when the run fell back to network mode.
    pub failover: Option<Failover>,
    /// What the run decided and why (modes skipped, ...), for the log.
    pub notes: Vec<String>,
}

/// Why `mode` cannot read `disk` from this proxy, or `None`.
/// `provider` is the storage snapshot provider that can snapshot the disk,
/// or why none can.
fn unusable(
    mode: Mode,
    addr: &VmAddress,
    disk: &DiskInfo,
    provider: &std::result::Result<&dyn StorageSnapshot, String>,
) -> Option<String> {
    match mode {
        Mode::San => {
            if disk.driver != "raw" && !crate::image::FORMATS.contains(&disk.driver.as_str()) {
                Some(format!(
                    "disk {} is {}: direct access reads raw and {} images and LUNs",
                    disk.node,
                    disk.driver,
                    crate::image::FORMATS.join(", ")
                ))
            } else if disk.backing {
                Some(format!("disk {} has a backing file", disk.node))
            } else {
                disk.visible_here().err()
            }
        }
        Mode::HotAdd => {
            if !addr.is_local() {
                Some("the proxy is not on the VM's host".into())
            } else {
                disk.visible_here().err()
            }
        }
        Mode::Nbd => None,
        Mode::StorageSnapshot => provider.as_ref().err().cloned(),
    }
}

/// The first provider that can snapshot `disk`, or why none can.
fn pick_provider<'p>(
    providers: &'p [Box<dyn StorageSnapshot>],
    disk: &DiskInfo,
) -> std::result::Result<&'p dyn StorageSnapshot, String> {
    let mut why = Vec::new();
    for p in providers {
        match p.unusable(disk) {
            None => return Ok(p.as_ref()),
            Some(w) => why.push(format!("{}: {w}", p.name())),
        }
    }
    Err(why.join("; "))
}

/// What opening a mode attached; dropped after the reader.
#[derive(Debug)]
enum Attachment {
    Loop(#[allow(dead_code)] LoopDevice),
    Local(#[allow(dead_code)] LocalExport),
}

/// A frozen VM disk read through one transport mode, with its changes
/// from the VM's checkpoint.
pub struct VmSource {
    inner: Box<dyn BlockSource>,
    _attached: Vec<Attachment>,
    tracker: Option<VmTracker>,
    unavailable: Option<String>,
    mode: Mode,
    location: String,
    checkpoint: String,
    consistency: datamover::Consistency,
}

impl std::fmt::Debug for VmSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmSource")
            .field("mode", &self.mode)
            .field("location", &self.location)
            .finish()
    }
}

pub(crate) struct VmTracker {
    pub(crate) nbd: NbdSource,
    pub(crate) since: String,
}

impl ChangeTracker for VmTracker {
    fn changed(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>> {
        self.nbd.changed(offset, len)
    }
    fn describe(&self) -> String {
        format!("qemu:dirty-bitmap:{}", self.since)
    }
    fn since_checkpoint(&self) -> Option<String> {
        Some(self.since.clone())
    }
}

impl BlockSource for VmSource {
    crate::forward_reads!(inner);
    fn info(&self) -> SourceInfo {
        SourceInfo {
            kind: "vm".into(),
            location: self.location.clone(),
        }
    }
    fn transport(&self) -> &'static str {
        self.mode.name()
    }
    fn change_tracking(&self) -> Tracking<'_> {
        tracking(&self.tracker, &self.unavailable)
    }
    fn checkpoint(&self) -> Option<String> {
        Some(self.checkpoint.clone())
    }
    fn consistency(&self) -> Option<datamover::Consistency> {
        Some(self.consistency.clone())
    }
}

/// A VM source's change tracking: its checkpoint's bitmap, or why there
/// is none for this point.
pub(crate) fn tracking<'a>(
    tracker: &'a Option<VmTracker>,
    unavailable: &Option<String>,
) -> Tracking<'a> {
    match (tracker, unavailable) {
        (Some(t), _) => Tracking::On(t),
        (None, Some(why)) => Tracking::Unavailable(why.clone()),
        (None, None) => Tracking::Off,
    }
}

/// How to back up a VM disk (from [`crate::SourceOptions`]).
#[derive(Debug, Clone)]
pub(crate) struct VmJob<'a> {
    pub disk: &'a str,
    pub choice: TransportChoice,
    pub failover: bool,
    pub provider: &'a str,
    pub nbd: ConnectOptions,
    pub quiesce: Quiesce,
    pub quiesce_limits: QuiesceLimits,
}

/// Whether the changes since the parent point can be read, and from
/// which checkpoint.
pub(crate) enum Since {
    /// The disk's first point.
    First,
    /// From this checkpoint (the parent point's, still in the VM).
    Checkpoint(String),
    /// Not possible, and why.
    Missing(String),
}

impl Since {
    /// From `name`'s newest point: its checkpoint when `exists` says the
    /// VM still has it, else why not (`gone` completes "checkpoint C of
    /// the previous point P ...").
    pub(crate) fn of(
        repo: &dyn Store,
        name: &DiskName,
        exists: impl Fn(&str) -> bool,
        gone: &str,
    ) -> Result<Since> {
        Ok(match repo.latest_meta(name)? {
            None => Since::First,
            Some((p, meta)) => match meta.checkpoint {
                None => Since::Missing(format!(
                    "the previous point {p} started no checkpoint (it was not taken from this VM)"
                )),
                Some(c) if exists(&c) => Since::Checkpoint(c),
                Some(c) => {
                    Since::Missing(format!("checkpoint {c} of the previous point {p} {gone}"))
                }
            },
        })
    }

    /// The checkpoint to read changes from, if any.
    pub(crate) fn checkpoint(&self) -> Option<&str> {
        match self {
            Since::Checkpoint(c) => Some(c),
            _ => None,
        }
    }

    /// Why changes cannot be read (none for a first point).
    pub(crate) fn missing(&self) -> Option<String> {
        match self {
            Since::Missing(why) => Some(why.clone()),
            _ => None,
        }
    }
}

fn nbd_source(uri: &str, opts: &ConnectOptions) -> Result<Box<dyn BlockSource>> {
    Ok(Box::new(NbdSource::connect(uri, opts)?))
}

/// Open the frozen disk through `mode`.
fn open_mode(
    mode: Mode,
    frozen: &mut vm::Frozen,
    image: Option<&SnapshotImage>,
    job: &VmJob<'_>,
) -> Result<(Box<dyn BlockSource>, Vec<Attachment>)> {
    let disk = frozen.disk().clone();
    let path = || disk.visible_here().map_err(Error::InvalidArgument);
    let local = |p: &std::path::Path, driver: &str, snap: Option<&str>| {
        let ex = LocalExport::start(p, driver, snap)?;
        let src = nbd_source(ex.uri(), &job.nbd)?;
        Ok::<_, Error>((src, vec![Attachment::Local(ex)]))
    };
    match mode {
        Mode::San if disk.driver == "raw" => Ok((datamover::source::open_local(path()?)?, vec![])),
        // A qcow2 (or other image) on a datastore the proxy sees: read
        // through a local read-only export of the file, as the VM host
        // names it (the driver comes from the VM, not from probing).
        Mode::San => local(path()?, &disk.driver, None),
        Mode::HotAdd if disk.driver == "raw" => {
            let dev = LoopDevice::attach(path()?)?;
            let src = datamover::source::open_local(dev.path())?;
            Ok((src, vec![Attachment::Loop(dev)]))
        }
        Mode::HotAdd => local(path()?, &disk.driver, None),
        Mode::Nbd => Ok((nbd_source(&frozen.export_uri()?, &job.nbd)?, vec![])),
        Mode::StorageSnapshot => {
            let img = image.ok_or_else(|| Error::Internal("no storage snapshot taken".into()))?;
            if img.format == "raw" && img.internal.is_none() {
                Ok((datamover::source::open_local(&img.path)?, vec![]))
            } else {
                local(&img.path, &img.format, img.internal.as_deref())
            }
        }
    }
}

/// Back up one disk of a running VM (see the module docs).
pub(crate) fn backup(
    repo: &dyn Store,
    spec: &str,
    name: &DiskName,
    job: &VmJob<'_>,
    opts: &BackupOptions,
) -> Result<BackupRun> {
    let addr = VmAddress::parse(spec)?;
    let mut vm = Vm::connect(addr.clone(), job.nbd.timeout)?;
    let disk = vm.disk(job.disk)?;
    // Before anything is frozen: reach the agent (thawing a guest a
    // killed run left frozen).
    let mut quiescer = Quiescer::open(job.quiesce, addr.agent.as_deref(), job.quiesce_limits)?;
    let mut notes = Vec::new();

    let since = Since::of(
        repo,
        name,
        |c| disk.bitmaps.iter().any(|b| b.name == c),
        &format!(
            "is not on disk {} (the bitmap was removed, or the VM restarted with a raw disk, whose checkpoints are not persistent)",
            disk.node
        ),
    )?;

    let providers = snapshot::providers(job.provider)?;
    // Storage snapshots are only used when asked for: only then look.
    let provider = if job.choice == TransportChoice::Pinned(Mode::StorageSnapshot) {
        pick_provider(&providers, &disk)
    } else {
        Err("not asked for".into())
    };
    let mut failover: Option<Failover> = None;
    let mut mode = match job.choice {
        TransportChoice::Auto => {
            let mut chosen = Mode::Nbd;
            for m in [Mode::San, Mode::HotAdd] {
                match unusable(m, &addr, &disk, &provider) {
                    None => {
                        chosen = m;
                        break;
                    }
                    Some(why) => notes.push(format!("{} not used: {why}", m.name())),
                }
            }
            chosen
        }
        TransportChoice::Pinned(m) => match unusable(m, &addr, &disk, &provider) {
            None => m,
            Some(why) if job.failover => {
                failover = Some(Failover {
                    from: m.name().into(),
                    reason: why,
                });
                Mode::Nbd
            }
            Some(why) => {
                return Err(Error::Unsupported(format!(
                    "transport {} cannot read disk {} of {spec}: {why}; pass --failover-to-network (Python: failover_to_network=True) to fall back to NBD",
                    m.name(),
                    disk.node
                )));
            }
        },
    };
    let hold = match (mode, &provider) {
        (Mode::StorageSnapshot, Ok(p)) => p.hold(),
        _ => vm::Hold::Overlay,
    };

    let frozen = vm.freeze(&disk, hold, since.checkpoint(), &mut quiescer);
    notes.append(&mut quiescer.notes);
    let mut frozen = frozen?;
    let consistency = frozen.consistency().clone();
    match quiescer.settle(&consistency) {
        Ok(note) => notes.extend(note),
        Err(e) => {
            let _ = frozen.finish(false);
            return Err(e);
        }
    }
    let mut image = None;
    if let (Mode::StorageSnapshot, Ok(p)) = (mode, &provider) {
        match p.take(&frozen) {
            Ok(img) => {
                notes.push(format!(
                    "storage snapshot by {}: {}",
                    p.name(),
                    img.path.display()
                ));
                image = Some(img);
                frozen.release_overlay()?;
            }
            Err(e) if job.failover && hold == vm::Hold::Overlay => {
                failover = Some(Failover {
                    from: mode.name().into(),
                    reason: e.to_string(),
                });
                mode = Mode::Nbd;
            }
            Err(e) => return Err(e),
        }
    }

    let tracker = match (&since, frozen.exported_bitmap().map(str::to_string)) {
        (Since::Checkpoint(c), Some(tmp)) => {
            let uri = frozen.export_uri()?;
            let nbd = NbdSource::connect(
                &uri,
                &ConnectOptions {
                    bitmap: Some(tmp),
                    connections: Some(1),
                    ..job.nbd.clone()
                },
            )?;
            Some((c.clone(), nbd))
        }
        _ => None,
    };
    let mut tracker = tracker.map(|(since, nbd)| VmTracker { nbd, since });
    let unavailable = since.missing();
    let location = format!("{spec}#{}", disk.node);
    let result = loop {
        let attempt = open_mode(mode, &mut frozen, image.as_ref(), job).and_then(|(inner, att)| {
            let src = VmSource {
                inner,
                _attached: att,
                tracker: tracker.take(),
                unavailable: unavailable.clone(),
                mode,
                location: location.clone(),
                checkpoint: frozen.checkpoint().to_string(),
                consistency: consistency.clone(),
            };
            let r = datamover::backup_to(repo, &src, name, opts);
            tracker = src.tracker;
            r
        });
        match attempt {
            Err(e)
                if mode != Mode::Nbd
                    && image.is_none()
                    && job.failover
                    && !matches!(
                        e.kind(),
                        datamover::ErrorKind::Cancelled | datamover::ErrorKind::InvalidInput
                    ) =>
            {
                tracing::warn!(mode = mode.name(), error = %e, "failing over to network mode");
                failover = Some(Failover {
                    from: mode.name().into(),
                    reason: e.to_string(),
                });
                mode = Mode::Nbd;
            }
            r => break r,
        }
    };
    drop(tracker);
    drop(image);
    let cleanup = frozen.finish(result.is_ok());
    let report = result?;
    if let Err(e) = cleanup {
        return Err(Error::Transport {
            address: spec.to_string(),
            kind: TransportKind::Refused,
            source: None,
            detail: format!(
                "point {} was written, but undoing the VM snapshot failed: {e}",
                report.point
            ),
        });
    }
    if let Some(f) = &failover {
        notes.push(format!("{} failed, used nbd: {}", f.from, f.reason));
    }
    Ok(BackupRun {
        report,
        failover,
        notes,
    })
}

/// List a VM's disks.
pub fn disks(spec: &str, timeout: Duration) -> Result<Vec<DiskInfo>> {
    Vm::connect(VmAddress::parse(spec)?, timeout)?.disks()
}

/// Pause a VM's guest (QMP `stop`) so its disks stop changing: the last
/// step of a quick migration before the final sync. A qemu-storage-daemon
/// has no guest to pause; that is not an error (nothing writes through it
/// but its exports' clients).
pub fn pause(spec: &str) -> Result<()> {
    let mut vm = Vm::connect(VmAddress::parse(spec)?, Duration::from_secs(30))?;
    if let Err(e) = vm.qmp().try_execute("stop", serde_json::json!({}))? {
        tracing::info!("{spec}: no guest to pause ({e:?})");
    }
    Ok(())
}

/// Whether KVM can run a guest here: `/dev/kvm` writable and the CPU
/// shows VT-x/AMD-V (else QEMU runs under TCG).
pub(crate) fn kvm_usable() -> bool {
    let writable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    writable
        && std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| {
            c.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
        })
}
