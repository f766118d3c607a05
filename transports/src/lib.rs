//! Transport modes: the ways a proxy reads a VM disk ([`BlockSource`]) and
//! writes one back ([`BlockTarget`]).
//!
//! * Local backends of the core, which serve as *Direct storage access*
//!   when the proxy sees the image file or LUN: [`FileSource`] (raw image,
//!   holes via SEEK_DATA/SEEK_HOLE), [`BlockDeviceSource`], and targets.
//! * [`nbd`]: *Network mode*, an NBD client as a source.
//! * [`qemu`]: running VMs over QMP: VM snapshots, checkpoints (CBT), and
//!   the transport modes SAN, HotAdd, NBD and storage snapshots, chosen
//!   per disk.
//!
//! [`backup`] is the one entry every front door uses to back up any
//! address; [`open_source`] and [`open_target`] parse addresses.

#![warn(missing_docs)]

/// The data-path methods of a [`BlockSource`] that wraps another in
/// field `$f` (what a wrapper adds is its identity, not its reads).
macro_rules! forward_reads {
    ($f:ident) => {
        fn size(&self) -> u64 {
            self.$f.size()
        }
        fn preferred_io_size(&self) -> usize {
            self.$f.preferred_io_size()
        }
        fn capabilities(&self) -> datamover::source::Capabilities {
            self.$f.capabilities()
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> datamover::Result<()> {
            self.$f.read_at(offset, buf)
        }
        fn read_bytes(&self, offset: u64, len: usize) -> datamover::Result<bytes::Bytes> {
            self.$f.read_bytes(offset, len)
        }
        fn will_read(&self, offset: u64, len: usize) {
            self.$f.will_read(offset, len)
        }
        fn read_ahead(&self) -> usize {
            self.$f.read_ahead()
        }
        fn extents(
            &self,
            offset: u64,
            len: u64,
        ) -> datamover::Result<Vec<datamover::source::SourceExtent>> {
            self.$f.extents(offset, len)
        }
    };
}
pub(crate) use forward_reads;

pub mod export;
pub mod failover;
pub mod files;
pub mod image;
pub mod instant;
pub mod libvirt;
pub mod mode;
pub mod nbd;
pub mod qemu;
pub mod report;
mod restore;

pub use mode::Mode;
pub use qemu::{BackupRun, Failover, TransportChoice};
pub use report::RunReport;
pub use restore::restore;

pub use datamover::source::{
    BlockDeviceSource, BlockSource, Capabilities, ExtentKind, FileSource, SourceExtent,
    open_local as open_local_source,
};
pub use datamover::target::{
    BlockDeviceTarget, BlockTarget, FileTarget, open_local as open_local_target,
};

fn is_nbd(spec: &str) -> bool {
    ["nbd://", "nbds://", "nbd+unix://", "nbds+unix://"]
        .iter()
        .any(|s| spec.starts_with(s))
}

/// Open a restore target by address: an NBD export (written through
/// WRITE / WRITE_ZEROES / FLUSH; it must be writable and at least `size`
/// bytes), or a path (a new sparse file, or a block device) through the
/// core. `overwrite` allows replacing an existing file.
pub fn open_target(
    spec: &str,
    size: u64,
    overwrite: bool,
    opts: &SourceOptions,
) -> datamover::Result<Box<dyn BlockTarget>> {
    if is_nbd(spec) {
        let c = nbd::ConnectOptions {
            bitmap: None,
            ..opts.nbd()
        };
        Ok(Box::new(nbd::NbdTarget::connect(spec, size, &c)?))
    } else {
        match datamover::source::local_path(spec)? {
            Some(path) => {
                // Writing a raw disk over an image file would destroy the
                // container, not restore the disk it holds.
                if overwrite
                    && std::fs::metadata(path).is_ok_and(|m| m.is_file())
                    && let Some(fmt) = image::probe(path)?
                {
                    return Err(datamover::Error::InvalidArgument(format!(
                        "{} is a {fmt} image: a restore writes a raw disk and would overwrite its container; restore to a new file (then qemu-img convert it), or into an NBD export of the image (qemu-nbd -f {fmt} {})",
                        path.display(),
                        path.display()
                    )));
                }
                datamover::target::open_local(path, size, overwrite)
            }
            None => Err(datamover::Error::InvalidArgument(format!(
                "unknown target scheme in {spec}: give a path, file:// or an NBD URI"
            ))),
        }
    }
}

/// How to open a source (or target).
#[derive(Debug, Clone, Default)]
pub struct SourceOptions {
    /// Changed-block tracking: the QEMU dirty bitmap to read changes from
    /// (NBD sources only; the export must carry it, e.g. `qemu-nbd -B NAME`).
    pub bitmap: Option<String>,
    /// Network timeout per request and for the handshake (NBD); default 60 s.
    pub timeout: Option<std::time::Duration>,
    /// TLS certificates directory for `nbds://` addresses (`ca-cert.pem`,
    /// optionally `client-cert.pem` + `client-key.pem`); an address's own
    /// `tls-certificates=` wins.
    pub tls_certificates: Option<std::path::PathBuf>,
    /// VM sources: the disk (node name, device name or export id).
    pub disk: Option<String>,
    /// VM sources: the transport mode, or automatic choice.
    pub transport: TransportChoice,
    /// VM sources: when the chosen mode cannot read the disk, read it over
    /// NBD instead of failing.
    pub failover_to_network: bool,
    /// VM sources with the storage-snapshot mode: `auto`, `reflink` or
    /// `qcow2-internal` (default `auto`).
    pub snapshot_provider: Option<String>,
    /// VM sources: whether to quiesce the guest through its agent around
    /// the snapshot (default `auto`).
    pub quiesce: qemu::Quiesce,
    /// VM sources: how long the guest's freeze may take and last.
    pub quiesce_limits: qemu::QuiesceLimits,
    /// Path sources: the image format, `auto` (by its magic; the default)
    /// or `raw`, `qcow2`, `vmdk`, `vhdx`, `vdi`, `vpc`, `qed` (see [`image`]).
    pub format: Option<String>,
}

impl SourceOptions {
    /// How to back up VM disk `disk` (the VM's own checkpoints track its
    /// changes: no `bitmap`).
    fn vm_job<'a>(&'a self, disk: &'a str) -> qemu::VmJob<'a> {
        qemu::VmJob {
            disk,
            choice: self.transport,
            failover: self.failover_to_network,
            provider: self.snapshot_provider.as_deref().unwrap_or("auto"),
            nbd: nbd::ConnectOptions {
                bitmap: None,
                ..self.nbd()
            },
            quiesce: self.quiesce,
            quiesce_limits: self.quiesce_limits,
        }
    }

    fn nbd(&self) -> nbd::ConnectOptions {
        let mut c = nbd::ConnectOptions {
            bitmap: self.bitmap.clone(),
            tls_certificates: self.tls_certificates.clone(),
            ..nbd::ConnectOptions::default()
        };
        if let Some(t) = self.timeout {
            c.timeout = t;
        }
        c
    }
}

/// Back up the disk at `spec` as a new point of `disk`: a path, an NBD
/// export, or a running VM's disk (`qmp+unix://…` / `qmp://…` with
/// [`SourceOptions::disk`]; see [`qemu`]).
pub fn backup(
    repo: &dyn datamover::Store,
    spec: &str,
    disk: &datamover::DiskName,
    opts: &SourceOptions,
    backup: &datamover::BackupOptions,
) -> datamover::Result<BackupRun> {
    if qemu::is_vm(spec) || libvirt::is_libvirt(spec) {
        if let Some(b) = &opts.bitmap {
            return Err(datamover::Error::InvalidArgument(format!(
                "--bitmap {b}: a VM's changes are tracked by its own checkpoints; --bitmap is for NBD exports"
            )));
        }
        let vm_disk = opts.disk.as_deref().ok_or_else(|| {
            datamover::Error::InvalidArgument(format!(
                "{spec} is a VM: name its disk with --disk (Python: disk=); `dm vm-disks {spec}` lists them"
            ))
        })?;
        let job = opts.vm_job(vm_disk);
        if libvirt::is_libvirt(spec) {
            return libvirt::backup(repo, spec, disk, &job, backup);
        }
        return qemu::backup(repo, spec, disk, &job, backup);
    }
    if opts.disk.is_some() || opts.transport != TransportChoice::Auto || opts.failover_to_network {
        return Err(datamover::Error::InvalidArgument(format!(
            "--disk, --transport and --failover-to-network are for VM addresses (qmp+unix://, qmp://), not {spec}"
        )));
    }
    let src = open_source_with(spec, opts)?;
    let report = datamover::backup_to(repo, src.as_ref(), disk, backup)?;
    Ok(BackupRun {
        report,
        failover: None,
        notes: Vec::new(),
    })
}

/// Back up several disks of a running VM at one instant (one freeze, one
/// backup job, one checkpoint), each as a point `VM/TARGET`: `disks` names
/// them (empty: every disk of the VM), `exclude` leaves some out. libvirt
/// VMs only for now; a QMP VM's disks are backed up one by one.
pub fn backup_vm(
    repo: &dyn datamover::Store,
    spec: &str,
    vm: &str,
    disks: &[String],
    exclude: &[String],
    opts: &SourceOptions,
    backup: &datamover::BackupOptions,
) -> datamover::Result<Vec<BackupRun>> {
    if !libvirt::is_libvirt(spec) {
        return Err(datamover::Error::Unsupported(format!(
            "{spec}: backing several disks up at one instant is for libvirt VMs (libvirt:///DOMAIN); back a QMP VM's disks up one by one (--disk NODE)"
        )));
    }
    let all: Vec<String> = if disks.is_empty() {
        libvirt::disks(spec)?
            .into_iter()
            .map(|d| d.target)
            .collect()
    } else {
        disks.to_vec()
    };
    let set = all
        .into_iter()
        .filter(|t| !exclude.contains(t))
        .map(|t| Ok((t.clone(), format!("{vm}/{t}").parse()?)))
        .collect::<datamover::Result<Vec<_>>>()?;
    if set.is_empty() {
        return Err(datamover::Error::InvalidArgument(format!(
            "{spec}: every disk is excluded"
        )));
    }
    let job = opts.vm_job(&set[0].0);
    libvirt::backup_set(repo, spec, &set, &job, backup)
}

/// Open a source by address: `nbd://`, `nbds://`, `nbd+unix://`,
/// `nbds+unix://` through the NBD client; paths and `file://` through the
/// core (which refuses the schemes whose transports are not built yet).
pub fn open_source(spec: &str) -> datamover::Result<Box<dyn BlockSource>> {
    open_source_with(spec, &SourceOptions::default())
}

/// [`open_source`] with options.
pub fn open_source_with(
    spec: &str,
    opts: &SourceOptions,
) -> datamover::Result<Box<dyn BlockSource>> {
    if is_nbd(spec) {
        Ok(Box::new(nbd::NbdSource::connect(spec, &opts.nbd())?))
    } else if qemu::is_vm(spec) {
        Err(datamover::Error::InvalidArgument(format!(
            "{spec} is a VM: back it up with transports::backup (`dm backup {spec} --disk NODE`), which snapshots the disk and keeps its checkpoints"
        )))
    } else if let Some(b) = &opts.bitmap {
        Err(datamover::Error::InvalidArgument(format!(
            "dirty bitmap {b:?} asked for {spec}: changed-block tracking needs an NBD source (nbd://, nbd+unix://) exporting the bitmap"
        )))
    } else if let Some(path) = datamover::source::local_path(spec)? {
        image::open(path, opts.format.as_deref().unwrap_or("auto"), &opts.nbd())
    } else {
        datamover::source::open(spec)
    }
}
