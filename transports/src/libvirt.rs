//! libvirt VMs: most KVM estates run their VMs under libvirt, which owns
//! each VM's QMP monitor and guest agent, so `dm` goes through libvirt's
//! own backup API (with the libvirt project's Rust bindings, `virt`).
//!
//! Addresses: `libvirt:///DOMAIN` (the local `qemu:///system`),
//! `libvirt://HOST/DOMAIN` (`qemu+ssh://HOST/system`), and `?uri=URI` for
//! any connection URI. Without a domain (`libvirt:///`) they name the
//! connection, for listing its domains.
//!
//! A backup of one disk, in libvirt's **pull mode**:
//! 1. a killed run's leftovers go first: a backup job still running is
//!    aborted, a guest left frozen is thawed (libvirt's `FSThaw`), and our
//!    checkpoints of the disk other than the parent point's are deleted;
//! 2. `virDomainBackupBegin` with one new checkpoint (`dm-cp-DISK-STAMP`,
//!    one per point) and, after the first point, `<incremental>` from the
//!    parent point's checkpoint; the guest is frozen through libvirt's
//!    agent integration (`virDomainFSFreeze`/`FSThaw`) for that call only;
//! 3. libvirt exports the frozen disk over NBD on a unix socket in a
//!    directory of the run (owned by the VM's QEMU user), with the
//!    changed blocks as `qemu:dirty-bitmap:backup-DISK`; our NBD client
//!    reads it;
//! 4. the job is ended (`virDomainAbortJob`, which is how a pull backup
//!    ends), older checkpoints are deleted on success, the new one on
//!    failure, and the point stores the domain's XML.
//!
//! Transport modes: only `nbd` (libvirt's export of the frozen disk). SAN
//! and HotAdd read a frozen image file where the proxy sees it, and a pull
//! backup makes none (the frozen data lives in QEMU's copy-before-write
//! filter, not in a file): asking for them is a clear error, or a fall back
//! to NBD with `--failover-to-network`.

use std::ffi::{CStr, CString};
use std::path::PathBuf;

use serde::Serialize;
use virt::connect::Connect;
use virt::domain::Domain;
use virt::sys;

use crate::nbd::{ConnectOptions, NbdSource};
use crate::qemu::quiesce::GuestFreezer;
use crate::qemu::{BackupRun, Failover, Mode, Quiescer, Since, TransportChoice, VmJob, VmTracker};
use datamover::format::manifest::SourceInfo;
use datamover::source::BlockSource;
use datamover::{BackupOptions, DiskName, Error, Result, Store, TransportKind};

pub(crate) const CHECKPOINT: &str = "dm-cp-";

/// Where a TCP export's scratch files go on the hypervisor: libvirt's
/// state directory for QEMU, which its QEMU user may write.
const REMOTE_SCRATCH: &str = "/var/lib/libvirt/qemu";

/// Whether `spec` names a libvirt VM or connection.
pub fn is_libvirt(spec: &str) -> bool {
    spec.starts_with("libvirt://")
}

/// A parsed libvirt address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LibvirtAddress {
    /// The address as given.
    pub spec: String,
    /// The libvirt connection URI.
    pub uri: String,
    /// The domain, when the address names one.
    pub domain: Option<String>,
    /// How libvirt's backup export reaches us.
    pub export: Export,
}

/// Where libvirt serves a pull backup's NBD export (`?nbd=`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Export {
    /// A unix socket in a directory of the run (`nbd=unix`, the default
    /// for a local connection; for a remote one only when the hypervisor
    /// runs on this machine, as for a proxy on its host).
    Unix,
    /// TCP at `host` (`nbd-host=`, default the connection's host), the
    /// port libvirt picks; with TLS (`nbd=tls`, the default for a remote
    /// connection: libvirt's `backup_tls_x509_cert_dir`, our
    /// `--tls-certificates`) or without (`nbd=tcp`, a trusted network).
    Tcp {
        /// Host name or address the export listens at.
        host: String,
        /// TLS.
        tls: bool,
        /// The port (`nbd-port=`); by default one that is free here when
        /// the host is this machine, else one of the dynamic range (an
        /// address in use is retried with another).
        port: Option<u16>,
    },
}

/// The host of a libvirt connection URI (`qemu+ssh://user@kvm01:22/system`
/// → `kvm01`), `None` for a local one.
fn uri_host(uri: &str) -> Option<String> {
    let rest = uri.split_once("://")?.1;
    let auth = rest.split('/').next().unwrap_or_default();
    let host = auth.rsplit_once('@').map_or(auth, |(_, h)| h);
    let host = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => host.split(':').next().unwrap_or_default(),
    };
    (!host.is_empty() && host != "localhost").then(|| host.to_string())
}

impl LibvirtAddress {
    /// `on` parsed, its domain `default` when it names none: the address
    /// and the domain's name.
    pub fn named(on: &str, default: &str) -> Result<(LibvirtAddress, String)> {
        let mut a = LibvirtAddress::parse(on)?;
        let name = a.domain.clone().unwrap_or_else(|| default.to_string());
        a.domain = Some(name.clone());
        Ok((a, name))
    }

    /// Parse `libvirt:///DOMAIN`, `libvirt://HOST/DOMAIN`, with `?uri=`.
    pub fn parse(spec: &str) -> Result<LibvirtAddress> {
        let bad = |why: &str| {
            Error::InvalidArgument(format!(
                "bad libvirt address {spec:?}: {why} (libvirt:///DOMAIN, libvirt://HOST/DOMAIN, optionally ?uri=qemu+tls://host/system)"
            ))
        };
        let rest = spec
            .strip_prefix("libvirt://")
            .ok_or_else(|| bad("it must start with libvirt://"))?;
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (host, domain) = rest.split_once('/').unwrap_or((rest, ""));
        let domain = domain.trim_end_matches('/');
        if domain.contains('/') || domain.chars().any(char::is_control) {
            return Err(bad("a domain name has no '/'"));
        }
        let mut uri = if host.is_empty() {
            "qemu:///system".to_string()
        } else {
            format!("qemu+ssh://{host}/system")
        };
        let (mut nbd, mut nbd_host, mut port) = (None, None, None);
        for kv in query.split('&').filter(|s| !s.is_empty()) {
            match kv.split_once('=') {
                Some(("uri", v)) if !v.is_empty() => uri = v.to_string(),
                Some(("nbd", v @ ("unix" | "tcp" | "tls"))) => nbd = Some(v),
                Some(("nbd-port", v)) if v.parse::<u16>().is_ok_and(|p| p > 0) => {
                    port = v.parse().ok();
                }
                Some(("nbd-host", v))
                    if !v.is_empty()
                        && v.chars()
                            .all(|c| c.is_ascii_alphanumeric() || ".-:_".contains(c)) =>
                {
                    nbd_host = Some(v.to_string());
                }
                _ => {
                    return Err(bad(&format!(
                        "unknown or empty parameter {kv:?} (uri=, nbd=unix|tcp|tls, nbd-host=, nbd-port=)"
                    )));
                }
            }
        }
        let remote = uri_host(&uri);
        let host = || {
            nbd_host
                .clone()
                .or_else(|| remote.clone())
                .unwrap_or_else(|| "127.0.0.1".into())
        };
        let export = match nbd.unwrap_or(if remote.is_some() { "tls" } else { "unix" }) {
            "unix" => Export::Unix,
            "tcp" => Export::Tcp {
                host: host(),
                tls: false,
                port,
            },
            _ => Export::Tcp {
                host: host(),
                tls: true,
                port,
            },
        };
        Ok(LibvirtAddress {
            spec: spec.to_string(),
            uri,
            domain: (!domain.is_empty()).then(|| domain.to_string()),
            export,
        })
    }
}

pub(crate) fn lv_err(what: &str, e: virt::error::Error) -> Error {
    Error::transport(
        "libvirt",
        TransportKind::Refused,
        format!("{what}: {}", e.message()),
    )
}

/// libvirt prints every error to stderr unless told otherwise; ours are
/// returned (or expected: a lookup of a name that must be free).
fn quiet() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(virt::error::clear_error_callback);
}

/// The last libvirt error, after a `sys` call failed.
pub(crate) fn last(what: &str) -> Error {
    lv_err(what, virt::error::Error::last_error())
}

pub(crate) fn connect(addr: &LibvirtAddress) -> Result<Connect> {
    quiet();
    Connect::open(Some(&addr.uri)).map_err(|e| {
        Error::transport(
            addr.uri.clone(),
            TransportKind::Connect,
            format!(
                "cannot connect to libvirt at {}: {}; check that libvirtd runs there",
                addr.uri,
                e.message()
            ),
        )
    })
}

pub(crate) fn domain(conn: &Connect, addr: &LibvirtAddress) -> Result<Domain> {
    let name = addr.domain.as_deref().ok_or_else(|| {
        Error::InvalidArgument(format!(
            "{} names no domain: libvirt:///DOMAIN (`dm vms {}` lists them)",
            addr.spec, addr.spec
        ))
    })?;
    Domain::lookup_by_name(conn, name).map_err(|e| {
        Error::InvalidArgument(format!(
            "{}: no domain {name:?} at {}: {}",
            addr.spec,
            addr.uri,
            e.message()
        ))
    })
}

/// A domain as `dm vms` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct DomainInfo {
    /// Its name.
    pub name: String,
    /// `running`, `paused`, `shut off`, ...
    pub state: String,
    /// Its disks.
    pub disks: Vec<LibvirtDisk>,
}

/// A disk of a domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LibvirtDisk {
    /// The target device (`vda`): the disk's name in libvirt.
    pub target: String,
    /// The image format (`qcow2`, `raw`).
    pub format: String,
    /// The image file or device, as the VM host names it.
    pub source: Option<String>,
}

/// The disks (`device='disk'`) of a domain's XML.
pub fn disks_of_xml(xml: &str) -> Result<Vec<LibvirtDisk>> {
    let doc = roxmltree::Document::parse(xml)
        .map_err(|e| Error::Internal(format!("libvirt domain XML: {e}")))?;
    Ok(doc
        .descendants()
        .filter(|n| n.has_tag_name("disk") && n.attribute("device").unwrap_or("disk") == "disk")
        .filter(|n| n.parent().is_some_and(|p| p.has_tag_name("devices")))
        .filter_map(|n| {
            let child = |t: &str| n.children().find(|c| c.has_tag_name(t));
            let target = child("target")?.attribute("dev")?.to_string();
            let src = child("source");
            Some(LibvirtDisk {
                target,
                format: child("driver")
                    .and_then(|d| d.attribute("type"))
                    .unwrap_or("raw")
                    .to_string(),
                source: src.and_then(|s| {
                    s.attribute("file")
                        .or(s.attribute("dev"))
                        .or(s.attribute("name"))
                        .map(str::to_string)
                }),
            })
        })
        .collect())
}

fn state_name(s: sys::virDomainState) -> &'static str {
    match s {
        sys::VIR_DOMAIN_RUNNING => "running",
        sys::VIR_DOMAIN_BLOCKED => "blocked",
        sys::VIR_DOMAIN_PAUSED => "paused",
        sys::VIR_DOMAIN_SHUTDOWN => "shutting down",
        sys::VIR_DOMAIN_SHUTOFF => "shut off",
        sys::VIR_DOMAIN_CRASHED => "crashed",
        sys::VIR_DOMAIN_PMSUSPENDED => "suspended",
        _ => "unknown",
    }
}

fn info(d: &Domain) -> Result<DomainInfo> {
    let name = d.get_name().map_err(|e| lv_err("domain name", e))?;
    let state = d.get_state().map_err(|e| lv_err("domain state", e))?.0;
    let xml = d.get_xml_desc(0).map_err(|e| lv_err("domain XML", e))?;
    Ok(DomainInfo {
        name,
        state: state_name(state).into(),
        disks: disks_of_xml(&xml)?,
    })
}

/// The domains of a connection (`libvirt:///`), or the one an address names.
pub fn domains(spec: &str) -> Result<Vec<DomainInfo>> {
    let addr = LibvirtAddress::parse(spec)?;
    let conn = connect(&addr)?;
    if addr.domain.is_some() {
        return Ok(vec![info(&domain(&conn, &addr)?)?]);
    }
    let all = conn
        .list_all_domains(0)
        .map_err(|e| lv_err("listing domains", e))?;
    let mut out = all.iter().map(info).collect::<Result<Vec<_>>>()?;
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// The disks of the domain `spec` names.
pub fn disks(spec: &str) -> Result<Vec<LibvirtDisk>> {
    let addr = LibvirtAddress::parse(spec)?;
    let conn = connect(&addr)?;
    let d = domain(&conn, &addr)?;
    Ok(info(&d)?.disks)
}

/// The names of the domain's checkpoints.
pub(crate) fn checkpoints(d: &Domain) -> Result<Vec<String>> {
    let mut list: *mut sys::virDomainCheckpointPtr = std::ptr::null_mut();
    // SAFETY: libvirt fills `list` with `n` checkpoint pointers that we
    // own: each is read, then freed, and the array is freed with free(3).
    let n = unsafe { sys::virDomainListAllCheckpoints(d.as_ptr(), &mut list, 0) };
    if n < 0 {
        return Err(last("listing checkpoints"));
    }
    let mut names = Vec::new();
    for i in 0..usize::try_from(n).unwrap_or(0) {
        // SAFETY: i < n, the array's length.
        let cp = unsafe { *list.add(i) };
        // SAFETY: a valid checkpoint; the name belongs to it (copied here).
        let name = unsafe { sys::virDomainCheckpointGetName(cp) };
        if !name.is_null() {
            // SAFETY: a NUL-terminated string owned by `cp`.
            names.push(
                unsafe { CStr::from_ptr(name) }
                    .to_string_lossy()
                    .into_owned(),
            );
        }
        // SAFETY: each checkpoint reference is ours to release, once.
        unsafe { sys::virDomainCheckpointFree(cp) };
    }
    if !list.is_null() {
        // SAFETY: the array libvirt allocated with malloc.
        unsafe { libc::free(list.cast()) };
    }
    Ok(names)
}

pub(crate) fn delete_checkpoint(d: &Domain, name: &str) -> Result<()> {
    delete_checkpoint_with(d, name, 0)
}

/// Delete a checkpoint with `virDomainCheckpointDelete` flags (`0`, or
/// `VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY` for a domain that is off).
pub(crate) fn delete_checkpoint_with(d: &Domain, name: &str, flags: u32) -> Result<()> {
    let c = CString::new(name).map_err(|_| Error::Internal("checkpoint name".into()))?;
    // SAFETY: valid domain and C string; the looked-up reference is freed.
    unsafe {
        let cp = sys::virDomainCheckpointLookupByName(d.as_ptr(), c.as_ptr(), 0);
        if cp.is_null() {
            return Err(last(&format!("checkpoint {name}")));
        }
        let r = sys::virDomainCheckpointDelete(cp, flags);
        sys::virDomainCheckpointFree(cp);
        if r < 0 {
            return Err(last(&format!("deleting checkpoint {name}")));
        }
    }
    Ok(())
}

/// Whether a backup job runs on the domain. (Through `sys`: the
/// binding's `get_job_stats` builds a slice from libvirt's null array when
/// no job runs.)
fn backup_running(d: &Domain) -> Result<bool> {
    let mut kind: std::os::raw::c_int = 0;
    let mut params: sys::virTypedParameterPtr = std::ptr::null_mut();
    let mut n: std::os::raw::c_int = 0;
    // SAFETY: a valid domain; libvirt allocates `params` (n entries), freed below.
    let r = unsafe { sys::virDomainGetJobStats(d.as_ptr(), &mut kind, &mut params, &mut n, 0) };
    if r < 0 {
        return Err(last("job stats"));
    }
    let mut op: std::os::raw::c_int = -1;
    if !params.is_null() {
        // SAFETY: `params` holds `n` entries; the key is a C string literal.
        unsafe {
            sys::virTypedParamsGetInt(params, n, c"operation".as_ptr(), &mut op);
            sys::virTypedParamsFree(params, n);
        }
    }
    Ok(kind != sys::VIR_DOMAIN_JOB_NONE as std::os::raw::c_int
        && op == sys::VIR_DOMAIN_JOB_OPERATION_BACKUP as std::os::raw::c_int)
}

fn abort_job(d: &Domain) -> Result<()> {
    // SAFETY: a valid domain.
    if unsafe { sys::virDomainAbortJob(d.as_ptr()) } < 0 {
        let e = virt::error::Error::last_error();
        // The job ended between the look and the abort (seen in CI under
        // load: "no job is active on the domain"): no job is the goal.
        if e.code() == virt::error::ErrorNumber::OperationInvalid && !backup_running(d)? {
            return Ok(());
        }
        return Err(lv_err("ending the backup job", e));
    }
    Ok(())
}

/// The ports to offer libvirt for a TCP export, in order: the one asked
/// for; else, for this machine, ports free here now; else ports of the
/// dynamic range.
fn export_ports(e: &Export) -> Vec<u16> {
    let Export::Tcp { host, port, .. } = e else {
        return vec![0];
    };
    if let Some(p) = port {
        return vec![*p];
    }
    let local: Vec<u16> = (0..4)
        .filter_map(|_| {
            std::net::TcpListener::bind((host.as_str(), 0))
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .ok()
        })
        .collect();
    if !local.is_empty() {
        return local;
    }
    let seed = crate::qemu::vm::stamp()
        .bytes()
        .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
    (0..4u32)
        .map(|i| 49152 + ((seed.wrapping_add(i.wrapping_mul(7919))) % 16000) as u16)
        .collect()
}

/// Freeze the guest's filesystems through libvirt's agent integration:
/// how many, or why not (the agent's or libvirt's message).
pub(crate) fn fs_freeze(dom: &Domain) -> std::result::Result<u64, String> {
    // SAFETY: a valid domain; no mountpoints (all filesystems).
    let n = unsafe { sys::virDomainFSFreeze(dom.as_ptr(), std::ptr::null_mut(), 0, 0) };
    if n < 0 {
        return Err(virt::error::Error::last_error().message().to_string());
    }
    Ok(u64::try_from(n).unwrap_or(0))
}

/// Thaw the guest's filesystems: how many were thawed.
pub(crate) fn fs_thaw(dom: &Domain) -> Result<u64> {
    // SAFETY: a valid domain; no mountpoints (all filesystems).
    let n = unsafe { sys::virDomainFSThaw(dom.as_ptr(), std::ptr::null_mut(), 0, 0) };
    if n < 0 {
        return Err(last("thawing the guest"));
    }
    Ok(u64::try_from(n).unwrap_or(0))
}

/// What a guest's disks hold after a freeze that went (`application`) or
/// did not (`crash (why)`), as the migration and failback reports say.
pub(crate) fn consistency_of(frozen: &std::result::Result<(), String>) -> String {
    match frozen {
        Ok(()) => "application".into(),
        Err(why) => format!("crash ({why})"),
    }
}

/// The guest's freeze through libvirt's agent integration.
struct LibvirtFreezer {
    dom: Domain,
    name: String,
}

impl GuestFreezer for LibvirtFreezer {
    fn describe(&self) -> String {
        format!("libvirt's agent of {}", self.name)
    }
    fn thaw_leftover(&mut self) -> Result<u64> {
        self.thaw()
    }
    fn freeze(
        &mut self,
        _timeout: std::time::Duration,
    ) -> Result<std::result::Result<u64, String>> {
        Ok(fs_freeze(&self.dom))
    }
    fn thaw(&mut self) -> Result<u64> {
        fs_thaw(&self.dom)
    }
    fn recover(&mut self) -> Result<()> {
        self.thaw().map(|_| ())
    }
}

/// The owner libvirt runs the domain's QEMU as (`<seclabel model='dac'>`
/// label `+UID:+GID`), for the run directory QEMU creates its socket in.
fn qemu_owner(xml: &str) -> Option<(u32, u32)> {
    let doc = roxmltree::Document::parse(xml).ok()?;
    let label = doc
        .descendants()
        .filter(|n| n.has_tag_name("seclabel") && n.attribute("model") == Some("dac"))
        .find_map(|n| n.children().find(|c| c.has_tag_name("label")))?
        .text()?;
    parse_label(label)
}

pub(crate) fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

/// The run's directory (socket and scratch file), removed on drop.
struct RunDir(PathBuf);
impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running pull backup: ended (and its checkpoint kept or deleted) by
/// [`PullBackup::finish`], or on drop as a failure.
struct PullBackup<'d> {
    dom: &'d Domain,
    checkpoint: String,
    finished: bool,
}

impl PullBackup<'_> {
    fn finish(mut self, ok: bool, keep_prefix: &str) -> Result<()> {
        self.finished = true;
        self.end(ok, keep_prefix)
    }
    fn end(&mut self, ok: bool, keep_prefix: &str) -> Result<()> {
        let mut first_err = None;
        if backup_running(self.dom).unwrap_or(true)
            && let Err(e) = abort_job(self.dom)
        {
            first_err.get_or_insert(e);
        }
        let names = checkpoints(self.dom)?;
        for n in names.iter().filter(|n| n.starts_with(keep_prefix)) {
            let drop_it = if ok {
                *n != self.checkpoint
            } else {
                *n == self.checkpoint
            };
            if drop_it && let Err(e) = delete_checkpoint(self.dom, n) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

impl Drop for PullBackup<'_> {
    fn drop(&mut self) {
        if !self.finished {
            let cp = self.checkpoint.clone();
            if let Err(e) = self.end(false, &cp) {
                tracing::warn!(error = %e, "undoing the libvirt backup failed; the next run undoes it");
            }
        }
    }
}

/// The frozen disk as libvirt exports it.
struct LibvirtSource {
    inner: NbdSource,
    tracker: Option<VmTracker>,
    unavailable: Option<String>,
    location: String,
    checkpoint: String,
    consistency: datamover::Consistency,
    definition: String,
}

impl std::fmt::Debug for LibvirtSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LibvirtSource")
            .field("location", &self.location)
            .finish()
    }
}

impl BlockSource for LibvirtSource {
    crate::forward_reads!(inner);
    fn info(&self) -> SourceInfo {
        SourceInfo {
            kind: "libvirt".into(),
            location: self.location.clone(),
        }
    }
    fn transport(&self) -> &'static str {
        Mode::Nbd.name()
    }
    fn change_tracking(&self) -> datamover::cbt::Tracking<'_> {
        crate::qemu::tracking(&self.tracker, &self.unavailable)
    }
    fn checkpoint(&self) -> Option<String> {
        Some(self.checkpoint.clone())
    }
    fn consistency(&self) -> Option<datamover::Consistency> {
        Some(self.consistency.clone())
    }
    fn vm_definition(&self) -> Option<String> {
        Some(self.definition.clone())
    }
}

/// Back up one disk of a running libvirt domain (see the module docs).
pub(crate) fn backup(
    repo: &dyn Store,
    spec: &str,
    name: &DiskName,
    job: &VmJob<'_>,
    opts: &BackupOptions,
) -> Result<BackupRun> {
    let mut runs = backup_set(
        repo,
        spec,
        &[(job.disk.to_string(), name.clone())],
        job,
        opts,
    )?;
    runs.pop()
        .ok_or_else(|| Error::Internal("a one-disk backup wrote no point".into()))
}

/// One disk of a set being backed up.
struct Member {
    disk: LibvirtDisk,
    name: DiskName,
    since: Since,
}

/// Back up several disks of a running libvirt domain at one instant: one
/// freeze, one backup job, one checkpoint for all of them; each disk gets
/// its point (`set`: the disk's target and the point's name).
pub(crate) fn backup_set(
    repo: &dyn Store,
    spec: &str,
    set: &[(String, DiskName)],
    job: &VmJob<'_>,
    opts: &BackupOptions,
) -> Result<Vec<BackupRun>> {
    let addr = LibvirtAddress::parse(spec)?;
    let mut notes = Vec::new();
    let mut failover = None;
    if let TransportChoice::Pinned(m) = job.choice
        && m != Mode::Nbd
    {
        let why = format!(
            "a libvirt VM is read from libvirt's NBD export of the frozen disk; {} reads a frozen image file, which a libvirt pull backup does not make",
            m.name()
        );
        if !job.failover {
            return Err(Error::Unsupported(format!(
                "transport {} cannot read {spec}: {why}; use --transport nbd (or auto), or --failover-to-network",
                m.name()
            )));
        }
        failover = Some(Failover {
            from: m.name().into(),
            reason: why,
        });
    }
    let conn = connect(&addr)?;
    let dom = domain(&conn, &addr)?;
    let dname = addr.domain.clone().unwrap_or_default();
    if !dom.is_active().map_err(|e| lv_err("domain state", e))? {
        return Err(Error::Unsupported(format!(
            "domain {dname} is not running: libvirt backs up running domains only; back up its disk image itself (`dm backup IMAGE`)"
        )));
    }
    let xml = dom.get_xml_desc(0).map_err(|e| lv_err("domain XML", e))?;
    // What the point keeps: the definition, not the running state.
    let definition = dom
        .get_xml_desc(sys::VIR_DOMAIN_XML_INACTIVE)
        .map_err(|e| lv_err("domain XML", e))?;
    let all = disks_of_xml(&xml)?;
    if set.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "{spec}: no disk to back up"
        )));
    }
    let mut members = Vec::new();
    for (target, name) in set {
        let disk = all
            .iter()
            .find(|d| d.target == *target)
            .cloned()
            .ok_or_else(|| {
                let known: Vec<&str> = all.iter().map(|d| d.target.as_str()).collect();
                Error::InvalidArgument(format!(
                    "{spec}: domain {dname} has no disk {target:?}; its disks: {}",
                    known.join(", ")
                ))
            })?;
        if members
            .iter()
            .any(|m: &Member| m.disk.target == disk.target)
        {
            return Err(Error::InvalidArgument(format!(
                "{spec}: disk {target} named twice"
            )));
        }
        members.push(Member {
            disk,
            name: name.clone(),
            since: Since::First,
        });
    }
    let targets: Vec<String> = members.iter().map(|m| m.disk.target.clone()).collect();
    let prefix = format!("{CHECKPOINT}{}-", targets.join("_"));

    // 1. What a killed run left.
    if backup_running(&dom)? {
        tracing::warn!(domain = %dname, "aborting the backup job a killed run left");
        abort_job(&dom)?;
        notes.push("aborted a backup job an earlier run left".to_string());
    }
    let existing = checkpoints(&dom)?;
    for m in &mut members {
        m.since = Since::of(
            repo,
            &m.name,
            |c| existing.iter().any(|e| e == c),
            &format!("is not in domain {dname} (deleted, or the domain was redefined)"),
        )?;
    }
    for n in existing.iter().filter(|n| {
        n.starts_with(&prefix)
            && !members
                .iter()
                .any(|m| m.since.checkpoint() == Some(n.as_str()))
    }) {
        tracing::warn!(checkpoint = %n, "deleting a checkpoint of the disks that is not their newest point's (a killed run's, or another repository's chain)");
        delete_checkpoint(&dom, n)?;
    }

    // 2. The run's directory, where the VM's QEMU creates its socket and
    // scratch files (a TCP export's host may be another: libvirt then
    // names the scratch files itself, there).
    if let Export::Tcp { tls: true, .. } = &addr.export
        && job.nbd.tls_certificates.is_none()
    {
        return Err(Error::InvalidArgument(format!(
            "{spec}: libvirt serves the backup over TLS (its backup_tls_x509_cert_dir): give --tls-certificates DIR with the CA and our client certificate (Python: tls_certificates=), or nbd=tcp on a trusted network"
        )));
    }
    let st = crate::qemu::vm::stamp();
    let dir = match addr.export {
        Export::Unix => {
            let d = RunDir(std::env::temp_dir().join(format!("dm-lv-{st}")));
            std::fs::create_dir(&d.0).map_err(|e| Error::io("create", &d.0, e))?;
            if let Some((uid, gid)) = qemu_owner(&xml) {
                std::os::unix::fs::chown(&d.0, Some(uid), Some(gid))
                    .map_err(|e| Error::io("chown", &d.0, e))?;
            }
            Some(d)
        }
        Export::Tcp { .. } => None,
    };
    let sock = dir.as_ref().map(|d| d.0.join("nbd.sock"));
    let checkpoint = format!("{prefix}{st}");
    let mut bdisks = String::new();
    let mut cdisks = String::new();
    for d in &all {
        let t = xml_escape(&d.target);
        match members.iter().find(|m| m.disk.target == d.target) {
            Some(m) => {
                let mode = match m.since.checkpoint() {
                    Some(c) => format!("backupmode='incremental' incremental='{}'", xml_escape(c)),
                    None => "backupmode='full'".to_string(),
                };
                // Where the VM's QEMU keeps what the guest overwrites
                // during the job: our run directory, or (a TCP export,
                // maybe on another host) libvirt's own state directory
                // there; libvirt creates the file and removes it.
                let scratch = match &dir {
                    Some(dir) => dir.0.join(format!("{}.scratch", d.target)),
                    None => {
                        PathBuf::from(REMOTE_SCRATCH).join(format!("dm-scratch-{st}-{}", d.target))
                    }
                };
                let scratch = format!(
                    "<scratch file='{}'/>",
                    xml_escape(&scratch.display().to_string())
                );
                bdisks.push_str(&format!(
                    "<disk name='{t}' backup='yes' type='file' {mode}>{scratch}</disk>"
                ));
                cdisks.push_str(&format!("<disk name='{t}' checkpoint='bitmap'/>"));
            }
            None => {
                bdisks.push_str(&format!("<disk name='{t}' backup='no'/>"));
                cdisks.push_str(&format!("<disk name='{t}' checkpoint='no'/>"));
            }
        }
    }
    let server = |port: u16| match (&addr.export, &sock) {
        (Export::Tcp { host, tls, .. }, _) => format!(
            "<server transport='tcp' name='{}' port='{port}' tls='{}'/>",
            xml_escape(host),
            if *tls { "yes" } else { "no" }
        ),
        (Export::Unix, Some(s)) => format!(
            "<server transport='unix' socket='{}'/>",
            xml_escape(&s.display().to_string())
        ),
        (Export::Unix, None) => String::new(),
    };
    let checkpoint_xml = format!(
        "<domaincheckpoint><name>{}</name><disks>{cdisks}</disks></domaincheckpoint>",
        xml_escape(&checkpoint)
    );

    // 3. Begin, with the guest frozen for that call only.
    let freezer_dom = Domain::lookup_by_name(&conn, &dname).map_err(|e| lv_err("domain", e))?;
    let mut quiescer = Quiescer::with(
        job.quiesce,
        |_| {
            Ok(Box::new(LibvirtFreezer {
                dom: freezer_dom,
                name: dname.clone(),
            }) as Box<dyn GuestFreezer>)
        },
        job.quiesce_limits,
    )?;
    let cx = CString::new(checkpoint_xml).map_err(|_| Error::Internal("checkpoint XML".into()))?;
    // A TCP port in use is tried again with another (the guest is thawed
    // in between: each attempt is its own freeze).
    let ports = export_ports(&addr.export);
    let mut tried = 0;
    let (port, consistency) = loop {
        let port = ports.get(tried).copied().unwrap_or(0);
        tried += 1;
        let backup_xml = format!(
            "<domainbackup mode='pull'>{}<disks>{bdisks}</disks></domainbackup>",
            server(port)
        );
        let bx = CString::new(backup_xml).map_err(|_| Error::Internal("backup XML".into()))?;
        let (begun, consistency) = quiescer.around(|| {
            // SAFETY: a valid domain and two C strings that outlive the call.
            let r = unsafe { sys::virDomainBackupBegin(dom.as_ptr(), bx.as_ptr(), cx.as_ptr(), 0) };
            // The thaw that follows would reset libvirt's last error.
            (
                r,
                (r < 0).then(|| virt::error::Error::last_error().message().to_string()),
            )
        })?;
        notes.append(&mut quiescer.notes);
        match begun {
            (r, _) if r >= 0 => break (port, consistency),
            (_, Some(why))
                if tried < ports.len() && why.to_lowercase().contains("address already in use") =>
            {
                tracing::info!("port {port} is in use on the hypervisor; trying another");
            }
            (_, why) => {
                return Err(Error::transport(
                    "libvirt",
                    TransportKind::Refused,
                    format!(
                        "starting the backup of {dname} ({}): {}",
                        targets.join(", "),
                        why.unwrap_or_default()
                    ),
                ));
            }
        }
    };
    let pull = PullBackup {
        dom: &dom,
        checkpoint: checkpoint.clone(),
        finished: false,
    };
    match quiescer.settle(&consistency) {
        Ok(note) => notes.extend(note),
        Err(e) => {
            drop(pull);
            return Err(e);
        }
    }
    if members.len() > 1 {
        notes.push(format!(
            "disks {} were frozen together (one backup job, checkpoint {checkpoint})",
            targets.join(", ")
        ));
    }

    // 4. Read libvirt's export of each disk (over TCP at the port libvirt
    // picked, which its backup XML now names).
    let base = match (&addr.export, &sock) {
        (Export::Tcp { host, tls, .. }, _) => {
            let host = if host.contains(':') {
                format!("[{host}]")
            } else {
                host.clone()
            };
            format!("{}://{host}:{port}/", if *tls { "nbds" } else { "nbd" })
        }
        (Export::Unix, _) => String::new(),
    };
    let read = |m: &Member| -> Result<datamover::BackupReport> {
        let uri = match &sock {
            Some(s) if base.is_empty() => {
                format!("nbd+unix:///{}?socket={}", m.disk.target, s.display())
            }
            _ => format!("{base}{}", m.disk.target),
        };
        let inner = NbdSource::connect(&uri, &job.nbd)?;
        let tracker = match m.since.checkpoint() {
            Some(c) => Some(VmTracker {
                nbd: NbdSource::connect(
                    &uri,
                    &ConnectOptions {
                        bitmap: Some(format!("backup-{}", m.disk.target)),
                        connections: Some(1),
                        ..job.nbd.clone()
                    },
                )?,
                since: c.to_string(),
            }),
            None => None,
        };
        let src = LibvirtSource {
            inner,
            tracker,
            unavailable: m.since.missing(),
            location: format!("{spec}#{}", m.disk.target),
            checkpoint: checkpoint.clone(),
            consistency: consistency.clone(),
            definition: definition.clone(),
        };
        datamover::backup_to(repo, &src, &m.name, opts)
    };
    let mut reports = Vec::new();
    let mut failed = None;
    for m in &members {
        match read(m) {
            Ok(r) => reports.push(r),
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    // A point of a failed set names the deleted checkpoint: its disk's
    // next backup reads it whole (and says why).
    let cleanup = pull.finish(failed.is_none(), &prefix);
    let done: Vec<String> = reports
        .iter()
        .map(|r| format!("{}@{}", r.disk, r.point))
        .collect();
    if let Some(e) = failed {
        if reports.is_empty() {
            return Err(e);
        }
        return Err(Error::Transport {
            address: spec.to_string(),
            kind: TransportKind::Refused,
            source: None,
            detail: format!("{e} (points written before it: {})", done.join(", ")),
        });
    }
    if let Err(e) = cleanup {
        return Err(Error::Transport {
            address: spec.to_string(),
            kind: TransportKind::Refused,
            source: None,
            detail: format!(
                "points {} were written, but ending libvirt's backup job failed: {e}",
                done.join(", ")
            ),
        });
    }
    if let Some(f) = &failover {
        notes.push(format!("{} not possible, used nbd: {}", f.from, f.reason));
    }
    Ok(reports
        .into_iter()
        .map(|report| BackupRun {
            report,
            failover: failover.clone(),
            notes: notes.clone(),
        })
        .collect())
}

/// A VM paused for a final sync (a quick migration): its guest frozen
/// first when its agent answers, so what is on its disks is clean.
#[derive(Debug)]
pub struct Paused {
    dom: Domain,
    /// `Ok` when the guest was frozen, else why not.
    pub frozen: std::result::Result<(), String>,
}

/// Freeze (unless `quiesce` is off; `required` fails when the guest
/// cannot be frozen, before anything is paused) and pause the VM `spec`
/// names. [`Paused::resume`] undoes both.
pub fn pause(spec: &str, quiesce: crate::qemu::Quiesce) -> Result<Paused> {
    use crate::qemu::Quiesce;
    let addr = LibvirtAddress::parse(spec)?;
    let conn = connect(&addr)?;
    let dom = domain(&conn, &addr)?;
    let frozen = match quiesce {
        Quiesce::Off | Quiesce::Held => Err("quiesce off".to_string()),
        _ => fs_freeze(&dom).map(|_| ()),
    };
    if let (Err(why), Quiesce::Required) = (&frozen, quiesce) {
        return Err(Error::InvalidArgument(format!(
            "{spec}: the guest could not be quiesced for the final sync ({why}); nothing was paused"
        )));
    }
    let p = Paused { dom, frozen };
    let state = p.dom.get_state().map(|s| s.0).unwrap_or(0);
    if state != sys::VIR_DOMAIN_PAUSED
        && let Err(e) = p.dom.suspend()
    {
        p.resume();
        return Err(lv_err(&format!("pausing {spec}"), e));
    }
    Ok(p)
}

impl Paused {
    /// What the guest's disks hold: `application` (frozen) or `crash`,
    /// with why.
    pub fn consistency(&self) -> String {
        consistency_of(&self.frozen)
    }

    /// How a snapshot of the paused VM is quiesced: held (frozen before
    /// the pause), or off.
    pub fn held(&self) -> crate::qemu::Quiesce {
        match self.frozen {
            Ok(()) => crate::qemu::Quiesce::Held,
            Err(_) => crate::qemu::Quiesce::Off,
        }
    }

    /// Run the guest again and thaw it (errors are logged: this is the
    /// way back from a failure).
    pub fn resume(&self) {
        if self.dom.get_state().map(|s| s.0).ok() == Some(sys::VIR_DOMAIN_PAUSED)
            && let Err(e) = self.dom.resume()
        {
            tracing::error!("resuming the source VM failed: {}", e.message());
        }
        if self.frozen.is_ok()
            && let Err(e) = fs_thaw(&self.dom)
        {
            tracing::error!("{e}");
        }
    }

    /// Power the paused VM off (it runs elsewhere now); it stays defined.
    pub fn power_off(&self) -> Result<()> {
        self.dom
            .destroy()
            .map_err(|e| lv_err("powering the source VM off", e))
    }
}

/// Where a disk of a new domain reads from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NewDisk {
    /// An image file in `format` (raw, qcow2).
    File {
        /// The image.
        path: String,
        /// Its format.
        format: String,
    },
    /// An NBD export on a unix socket (instant recovery), raw.
    Nbd {
        /// The socket.
        socket: String,
        /// The export's name.
        export: String,
    },
}

impl NewDisk {
    /// A raw image file.
    pub fn raw(path: impl Into<String>) -> NewDisk {
        NewDisk::File {
            path: path.into(),
            format: "raw".into(),
        }
    }

    fn xml(&self, target: &str) -> String {
        match self {
            NewDisk::File { path, format } => format!(
                "<disk type='file' device='disk'><driver name='qemu' type='{}'/><source file='{}'/>{target}</disk>",
                xml_escape(format),
                xml_escape(path)
            ),
            NewDisk::Nbd { socket, export } => format!(
                "<disk type='network' device='disk'><driver name='qemu' type='raw'/><source protocol='nbd' name='{}'><host transport='unix' socket='{}'/></source>{target}</disk>",
                xml_escape(export),
                xml_escape(socket)
            ),
        }
    }
}

/// A VM's definition for a new domain: named `name`, without the old
/// domain's UUID and MAC addresses (libvirt makes new ones), each disk in
/// `disks` (target, source) reading from its restored image or export,
/// the disks not in `disks` refused, and consoles logged to a file given
/// a file of their own (the old domain's name in it replaced).
pub fn definition_for(xml: &str, name: &str, disks: &[(String, NewDisk)]) -> Result<String> {
    let doc = roxmltree::Document::parse(xml)
        .map_err(|e| Error::InvalidArgument(format!("the point's domain XML: {e}")))?;
    let root = doc.root_element();
    let mut edits: Vec<(std::ops::Range<usize>, String)> = Vec::new();
    for n in root.children().filter(roxmltree::Node::is_element) {
        match n.tag_name().name() {
            "name" => edits.push((n.range(), format!("<name>{}</name>", xml_escape(name)))),
            "uuid" => edits.push((n.range(), String::new())),
            _ => {}
        }
    }
    for mac in doc.descendants().filter(|n| n.has_tag_name("mac")) {
        edits.push((mac.range(), String::new()));
    }
    // A console logged to a file gets its own file: the old domain may
    // still run on this host (a migration, a failover test), and two
    // QEMUs cannot log to one file.
    let old = root
        .children()
        .find(|n| n.has_tag_name("name"))
        .and_then(|n| n.text())
        .unwrap_or_default();
    for dev in doc.descendants().filter(|n| {
        (n.has_tag_name("serial") || n.has_tag_name("console"))
            && n.attribute("type") == Some("file")
    }) {
        let Some(a) = dev
            .children()
            .find(|c| c.has_tag_name("source"))
            .and_then(|s| s.attribute_node("path"))
        else {
            continue;
        };
        let path = std::path::Path::new(a.value());
        let file = path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        let renamed = if !old.is_empty() && file.contains(old) {
            file.replacen(old, name, 1)
        } else {
            format!("{file}.{name}")
        };
        edits.push((
            a.range_value(),
            xml_escape(&path.with_file_name(renamed).display().to_string()),
        ));
    }
    let all = disks_of_xml(xml)?;
    for d in &all {
        let Some((_, source)) = disks.iter().find(|(t, _)| *t == d.target) else {
            return Err(Error::InvalidArgument(format!(
                "the VM's disk {} has no point to restore from: back it up, or leave it out of the definition",
                d.target
            )));
        };
        let node = doc
            .descendants()
            .find(|n| {
                n.has_tag_name("disk")
                    && n.children().any(|c| {
                        c.has_tag_name("target") && c.attribute("dev") == Some(d.target.as_str())
                    })
            })
            .ok_or_else(|| Error::Internal(format!("disk {} vanished from the XML", d.target)))?;
        let target = node
            .children()
            .find(|c| c.has_tag_name("target"))
            .map(|t| doc.input_text()[t.range()].to_string())
            .unwrap_or_default();
        edits.push((node.range(), source.xml(&target)));
    }
    edits.sort_by_key(|(r, _)| std::cmp::Reverse(r.start));
    let mut out = xml.to_string();
    for (r, text) in edits {
        out.replace_range(r, &text);
    }
    Ok(out)
}

/// Start copying disk `target` of `d` to the disk `dest` describes
/// (`virDomainBlockCopy`).
pub(crate) fn block_copy(d: &Domain, target: &str, dest: &str, flags: u32) -> Result<()> {
    let (t, x) = (cstring(target)?, cstring(dest)?);
    // SAFETY: valid domain and C strings; no typed parameters.
    let r = unsafe {
        sys::virDomainBlockCopy(
            d.as_ptr(),
            t.as_ptr(),
            x.as_ptr(),
            std::ptr::null_mut(),
            0,
            flags,
        )
    };
    if r < 0 {
        return Err(last(&format!("copying disk {target}")));
    }
    Ok(())
}

/// The block job on disk `target`: (bytes done, bytes to do), equal once
/// a copy is ready to pivot; `None` when no job runs.
pub(crate) fn block_job(d: &Domain, target: &str) -> Result<Option<(u64, u64)>> {
    let t = cstring(target)?;
    let mut info = sys::virDomainBlockJobInfo {
        type_: 0,
        bandwidth: 0,
        cur: 0,
        end: 0,
    };
    // SAFETY: valid domain, C string and an info struct we own.
    let r = unsafe { sys::virDomainGetBlockJobInfo(d.as_ptr(), t.as_ptr(), &mut info, 0) };
    match r {
        r if r < 0 => Err(last(&format!("the block job of {target}"))),
        0 => Ok(None),
        _ => Ok(Some((info.cur, info.end))),
    }
}

/// End the block job on disk `target`: with `pivot`, switch the disk to
/// the copy (synchronously); else drop the copy.
pub(crate) fn block_job_end(d: &Domain, target: &str, pivot: bool) -> Result<()> {
    let t = cstring(target)?;
    let flags = if pivot {
        sys::VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT
    } else {
        0
    };
    // SAFETY: valid domain and C string.
    if unsafe { sys::virDomainBlockJobAbort(d.as_ptr(), t.as_ptr(), flags) } < 0 {
        return Err(last(&format!(
            "{} the copy of {target}",
            if pivot { "switching to" } else { "ending" }
        )));
    }
    Ok(())
}

fn cstring(s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::InvalidArgument(format!("{s:?} holds a NUL byte")))
}

/// The newest VM definition the points (disk, point id or prefix) stored.
pub(crate) fn newest_definition(
    repo: &dyn datamover::reader::PointSource,
    points: &[(DiskName, String)],
) -> Result<Option<String>> {
    let mut best: Option<(String, String)> = None;
    for (d, p) in points {
        let id = repo.resolve(d, Some(p))?;
        let m = repo.meta(d, &id)?;
        if let Some(x) = m.vm_definition
            && best.as_ref().is_none_or(|(s, _)| m.started > *s)
        {
            best = Some((m.started, x));
        }
    }
    Ok(best.map(|(_, x)| x))
}

/// The user and group libvirt runs QEMU as on `conn` (its DAC security
/// model's base label for `domain_type`), to hand it a socket.
pub(crate) fn qemu_user(conn: &Connect, domain_type: &str) -> Option<(u32, u32)> {
    let caps = conn.get_capabilities().ok()?;
    let doc = roxmltree::Document::parse(&caps).ok()?;
    let model = doc.descendants().find(|n| {
        n.has_tag_name("secmodel")
            && n.children()
                .any(|c| c.has_tag_name("model") && c.text() == Some("dac"))
    })?;
    let label = model
        .children()
        .filter(|c| c.has_tag_name("baselabel"))
        .find(|c| c.attribute("type") == Some(domain_type))
        .or_else(|| model.children().find(|c| c.has_tag_name("baselabel")))?
        .text()?;
    parse_label(label)
}

fn parse_label(label: &str) -> Option<(u32, u32)> {
    let (u, g) = label.split_once(':')?;
    Some((
        u.trim_start_matches('+').parse().ok()?,
        g.trim_start_matches('+').parse().ok()?,
    ))
}

/// Recreate a VM from its points: each disk's newest point of `vm`
/// (`VM/TARGET`) restored as a raw image `DIR/NAME-TARGET.raw`, a domain
/// `name` defined on `uri` from the definition the newest point stored,
/// and started unless `start` is false. Returns the images written.
pub fn restore_vm(
    repo: &datamover::Repository,
    vm: &str,
    dir: &std::path::Path,
    uri: &str,
    name: &str,
    start: bool,
) -> Result<Vec<PathBuf>> {
    let prefix = format!("{vm}/");
    let mut latest: Vec<(DiskName, datamover::PointMeta)> = Vec::new();
    for d in repo.disks()? {
        if d.to_string().starts_with(&prefix)
            && let Some((_, meta)) = datamover::Store::latest_meta(repo, &d)?
        {
            latest.push((d, meta));
        }
    }
    let newest = latest
        .iter()
        .filter(|(_, m)| m.vm_definition.is_some())
        .max_by(|a, b| a.1.started.cmp(&b.1.started))
        .ok_or_else(|| {
            Error::InvalidArgument(format!(
                "no point of {vm}/* stores a VM definition (only libvirt backups do)"
            ))
        })?;
    let xml = newest.1.vm_definition.clone().unwrap_or_default();
    std::fs::create_dir_all(dir).map_err(|e| Error::io("create", dir, e))?;
    let mut disks = Vec::new();
    let mut images = Vec::new();
    for (d, _) in &latest {
        let target = d.to_string()[prefix.len()..].to_string();
        let path = dir.join(format!("{name}-{target}.raw"));
        let id = repo.resolve_point(d, None)?;
        let size = repo.point_meta(d, &id)?.meta.disk_size;
        let t = datamover::target::open_local(&path, size, false)?;
        datamover::restore(
            repo,
            d,
            &id,
            t.as_ref(),
            &datamover::RestoreOptions::default(),
        )?;
        disks.push((target, NewDisk::raw(path.display().to_string())));
        images.push(path);
    }
    let def = definition_for(&xml, name, &disks)?;
    quiet();
    let conn = Connect::open(Some(uri)).map_err(|e| lv_err(&format!("connecting to {uri}"), e))?;
    let dom =
        Domain::define_xml(&conn, &def).map_err(|e| lv_err(&format!("defining {name}"), e))?;
    if start {
        dom.create()
            .map_err(|e| lv_err(&format!("starting {name}"), e))?;
    }
    Ok(images)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse() {
        let a = LibvirtAddress::parse("libvirt:///web01").expect("parse");
        assert_eq!(
            (a.uri.as_str(), a.domain.as_deref()),
            ("qemu:///system", Some("web01"))
        );
        let a = LibvirtAddress::parse("libvirt://kvm01/web01").expect("parse");
        assert_eq!(a.uri, "qemu+ssh://kvm01/system");
        let a = LibvirtAddress::parse("libvirt:///web01?uri=qemu+tls://kvm02/system").expect("p");
        assert_eq!(a.uri, "qemu+tls://kvm02/system");
        assert_eq!(
            LibvirtAddress::parse("libvirt:///").expect("p").domain,
            None
        );
        // The export: a socket for a local connection, TLS over TCP to a
        // remote one (its host), plain TCP only when asked.
        assert_eq!(
            LibvirtAddress::parse("libvirt:///w").expect("p").export,
            Export::Unix
        );
        assert_eq!(
            LibvirtAddress::parse("libvirt://kvm01/w")
                .expect("p")
                .export,
            Export::Tcp {
                host: "kvm01".into(),
                tls: true,
                port: None
            }
        );
        assert_eq!(
            LibvirtAddress::parse("libvirt:///w?uri=qemu+ssh://root@[fd00::5]:2222/system")
                .expect("p")
                .export,
            Export::Tcp {
                host: "fd00::5".into(),
                tls: true,
                port: None
            }
        );
        assert_eq!(
            LibvirtAddress::parse("libvirt:///w?nbd=tcp&nbd-port=10809")
                .expect("p")
                .export,
            Export::Tcp {
                host: "127.0.0.1".into(),
                tls: false,
                port: Some(10809)
            }
        );
        assert_eq!(
            LibvirtAddress::parse("libvirt:///w?nbd=tcp")
                .expect("p")
                .export,
            Export::Tcp {
                host: "127.0.0.1".into(),
                tls: false,
                port: None
            }
        );
        assert_eq!(
            LibvirtAddress::parse("libvirt://kvm01/w?nbd=tls&nbd-host=10.0.0.31")
                .expect("p")
                .export,
            Export::Tcp {
                host: "10.0.0.31".into(),
                tls: true,
                port: None
            }
        );
        for bad in [
            "libvirt:///a/b",
            "libvirt:///a?x=1",
            "libvirt:///a?uri=",
            "qmp:///x",
            "libvirt:///a?nbd=ftp",
            "libvirt:///a?nbd-host=a/b",
            "libvirt:///a?nbd-port=0",
            "libvirt:///a?nbd-port=70000",
        ] {
            assert!(LibvirtAddress::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_new_definition_renames_and_gives_file_consoles_their_own_file() {
        let xml = "<domain type='qemu'><name>web</name><uuid>u</uuid><devices>\
            <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/v/a.qcow2'/><target dev='vda' bus='virtio'/></disk>\
            <interface type='network'><mac address='52:54:00:00:00:01'/></interface>\
            <serial type='file'><source path='/log/web.log' append='on'/><target port='0'/></serial>\
            <console type='file'><source path='/log/other'/></console>\
            </devices></domain>";
        let d = definition_for(xml, "web-r", &[("vda".into(), NewDisk::raw("/r/vda.img"))])
            .expect("definition");
        assert!(d.contains("<name>web-r</name>"), "{d}");
        assert!(!d.contains("<uuid>") && !d.contains("<mac"), "{d}");
        assert!(
            d.contains("<source file='/r/vda.img'/>") && d.contains("type='raw'"),
            "{d}"
        );
        assert!(d.contains("path='/log/web-r.log' append='on'"), "{d}");
        assert!(d.contains("path='/log/other.web-r'"), "{d}");
        assert!(definition_for(xml, "x", &[]).is_err());
    }

    #[test]
    fn disks_and_owner_come_from_the_domain_xml() {
        let xml = "<domain type='qemu'><devices>\
            <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/v/a.qcow2'/><target dev='vda' bus='virtio'/></disk>\
            <disk type='file' device='cdrom'><source file='/v/x.iso'/><target dev='sda'/></disk>\
            <disk type='block' device='disk'><source dev='/dev/vg/b'/><target dev='vdb'/></disk>\
            </devices><seclabel type='dynamic' model='dac' relabel='yes'><label>+64055:+108</label></seclabel></domain>";
        let d = disks_of_xml(xml).expect("parse");
        assert_eq!(
            d,
            vec![
                LibvirtDisk {
                    target: "vda".into(),
                    format: "qcow2".into(),
                    source: Some("/v/a.qcow2".into())
                },
                LibvirtDisk {
                    target: "vdb".into(),
                    format: "raw".into(),
                    source: Some("/dev/vg/b".into())
                },
            ]
        );
        assert_eq!(qemu_owner(xml), Some((64055, 108)));
        assert!(disks_of_xml("<domain").is_err());
        assert_eq!(xml_escape("a'<&"), "a&apos;&lt;&amp;");
    }
}
