//! Instant VM recovery: a VM started straight from its restore points,
//! its disks served from the repository while it runs, then moved to
//! production storage without stopping it. The VM is a transient libvirt
//! domain, or (`--on qmp`, [`Runner::Qemu`]) a QEMU this process starts
//! itself; the steps below say libvirt's calls, and QEMU's are the same
//! over QMP (`drive-mirror`, `block-job-complete`, `stop`/`cont`).
//!
//! * **Recover** ([`recover`]): each disk's point is served over NBD on a
//!   unix socket by this process (the *mount server*: [`crate::export`],
//!   every chunk checked, a bounded cache with read-ahead), the guest's
//!   writes going to a sparse overlay next to the socket; a transient
//!   libvirt domain is started from the definition the points stored (new
//!   name, UUID and MACs) with its disks on those sockets (or our QEMU,
//!   from that definition's memory, CPUs and kernel when there is one). The repository
//!   is never written. The mount server runs until the VM is migrated or
//!   the session discarded, or until it is stopped (the VM is then
//!   powered off and the overlays kept: recovering the same points under
//!   the same name resumes over them).
//! * **Migrate** ([`migrate`]): libvirt's block copy (QEMU's mirror job,
//!   writes mirrored synchronously so it converges under load) copies
//!   each disk to an image in production storage while the guest runs;
//!   once every copy is in step, the VM is paused, each disk switched
//!   (pivot) to its copy, and resumed: the downtime is that pause. The
//!   domain is then defined persistently on its new images, and the
//!   mount server ends and the session's files go.
//! * **Discard** ([`discard`]): the VM is powered off, the mount server
//!   ends, and the session's overlays and sockets are removed.
//!
//! A session lives in `DIR/NAME/` (default [`DEFAULT_DIR`]): `session.json`
//! (its state, which the mount server follows: see [`Session`]), and per
//! disk `TARGET.sock` (owned by libvirt's QEMU user, mode 0600) and
//! `TARGET.overlay` (mode 0600). `DIR/NAME` is mode 0711, so QEMU reaches
//! its sockets by name and lists nothing.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use virt::domain::Domain;
use virt::sys;

use crate::export::PointDisk;
use crate::libvirt::{self, LibvirtAddress, NewDisk};
use crate::nbd::server::{self, ExportOptions, Listener};
use datamover::reader::PointSource;
use datamover::{Error, PointRef, Result};

/// Where sessions live unless told otherwise.
pub const DEFAULT_DIR: &str = "/var/lib/datamover/instant";

/// The version of `session.json`.
pub const SESSION_VERSION: u32 = 1;

const SESSION_FILE: &str = "session.json";

/// How often the mount server looks at its session and its VM.
const POLL: Duration = Duration::from_millis(200);

/// Where a session stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// The exports are up, the VM starting.
    Starting,
    /// The VM runs from the repository.
    Serving,
    /// Its disks are being copied to production storage.
    Migrating,
    /// It runs from production storage; the session is over.
    Migrated,
    /// Being discarded: the mount server is told to end.
    Stopping,
    /// No mount server: the VM is off, the overlays kept.
    Stopped,
}

impl State {
    /// The state's name, as in `session.json`.
    pub fn name(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Serving => "serving",
            State::Migrating => "migrating",
            State::Migrated => "migrated",
            State::Stopping => "stopping",
            State::Stopped => "stopped",
        }
    }
}

/// One disk of a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionDisk {
    /// `VM/DISK`.
    pub disk: String,
    /// The point served.
    pub point: String,
    /// The disk's target in the domain (`vda`).
    pub target: String,
    /// The export's socket.
    pub socket: String,
    /// The guest's writes.
    pub overlay: String,
    /// Disk size in bytes.
    pub size: u64,
    /// The production image it was migrated to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migrated_to: Option<String>,
}

/// An instant recovery session (`DIR/NAME/session.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Session {
    /// [`SESSION_VERSION`].
    pub version: u32,
    /// The domain's name, and the session's.
    pub name: String,
    /// The VM the points are of.
    pub vm: String,
    /// The libvirt connection.
    pub uri: String,
    /// The repository served from.
    pub repo: String,
    /// Where it stands.
    pub state: State,
    /// Migration progress, percent of the bytes to copy.
    pub percent: u8,
    /// The mount server's process while it serves.
    pub server_pid: Option<u32>,
    /// When the session started (RFC 3339).
    pub started: String,
    /// What happened last, when worth saying.
    #[serde(default)]
    pub message: Option<String>,
    /// The migration's pause, in milliseconds.
    #[serde(default)]
    pub downtime_ms: Option<u64>,
    /// Its disks.
    pub disks: Vec<SessionDisk>,
    /// What runs the VM.
    #[serde(default, skip_serializing_if = "Runner::is_libvirt")]
    pub runner: Runner,
    /// A QEMU run by us: its process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qemu_pid: Option<u32>,
}

/// What runs a recovered VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Runner {
    /// A transient libvirt domain.
    #[default]
    Libvirt,
    /// A QEMU process started by the mount server (`--on qmp`): its QMP
    /// socket, guest-agent socket, console log and pid file are
    /// `DIR/NAME.vm/NAME.{qmp,qga,log,pid}`.
    Qemu,
}

impl Runner {
    fn is_libvirt(&self) -> bool {
        *self == Runner::Libvirt
    }
}

/// Where a QEMU run by us keeps its sockets, log and pid file.
pub fn vm_dir(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.vm"))
}

/// The QEMU command line of a recovered VM: memory, CPUs, machine and
/// direct kernel boot from the stored libvirt definition when there is
/// one (else 1 GiB, one CPU, BIOS boot from the first disk); each disk a
/// virtio disk on its export; the guest agent's channel; no network.
fn qemu_args(name: &str, xml: Option<&str>, disks: &[SessionDisk], vdir: &Path) -> Vec<String> {
    let doc = xml.and_then(|x| roxmltree::Document::parse(x).ok());
    let text = |tag: &str| {
        doc.as_ref().and_then(|d| {
            d.descendants()
                .find(|n| n.has_tag_name(tag))
                .and_then(|n| n.text())
                .map(str::to_string)
        })
    };
    let mib = doc
        .as_ref()
        .and_then(|d| d.descendants().find(|n| n.has_tag_name("memory")))
        .and_then(|n| {
            let v: u64 = n.text()?.trim().parse().ok()?;
            Some(match n.attribute("unit").unwrap_or("KiB") {
                "MiB" | "M" => v,
                "GiB" | "G" => v << 10,
                "b" | "bytes" => v >> 20,
                _ => v >> 10,
            })
        })
        .unwrap_or(1024)
        .max(128);
    let cpus = text("vcpu")
        .and_then(|v| v.trim().parse::<u32>().ok())
        .unwrap_or(1)
        .max(1);
    let kvm = crate::qemu::kvm_usable();
    let f = |ext: &str| vdir.join(format!("{name}.{ext}")).display().to_string();
    let esc = |s: &str| s.replace(',', ",,");
    let mut a: Vec<String> = [
        "-name",
        name,
        "-machine",
        &format!("pc,accel={}", if kvm { "kvm" } else { "tcg" }),
        "-cpu",
        if kvm { "host" } else { "max" },
        "-m",
        &mib.to_string(),
        "-smp",
        &cpus.to_string(),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-daemonize",
        "-pidfile",
        &f("pid"),
        "-qmp",
        &format!("unix:{},server=on,wait=off", esc(&f("qmp"))),
        "-serial",
        &format!("file:{}", esc(&f("log"))),
        "-chardev",
        &format!("socket,path={},server=on,wait=off,id=qga0", esc(&f("qga"))),
        "-device",
        "virtio-serial",
        "-device",
        "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
        "-nic",
        "none",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut sorted: Vec<&SessionDisk> = disks.iter().collect();
    sorted.sort_by(|x, y| x.target.cmp(&y.target));
    for d in sorted {
        a.push("-blockdev".into());
        a.push(format!(
            "driver=nbd,node-name=disk-{},server.type=unix,server.path={},export={}",
            esc(&d.target),
            esc(&d.socket),
            esc(&d.disk)
        ));
        a.push("-device".into());
        a.push(format!(
            "virtio-blk-pci,drive=disk-{0},id=dev-{0}",
            esc(&d.target)
        ));
    }
    for (tag, opt) in [
        ("kernel", "-kernel"),
        ("initrd", "-initrd"),
        ("cmdline", "-append"),
    ] {
        if let Some(v) = text(tag) {
            a.push(opt.into());
            a.push(v);
        }
    }
    a
}

/// Start a QEMU with `args` (it daemonizes): its pid.
fn start_qemu(args: &[String], vdir: &Path, name: &str) -> Result<u32> {
    let out = std::process::Command::new("qemu-system-x86_64")
        .args(args)
        .output()
        .map_err(|e| {
            Error::transport(
                "qemu-system-x86_64",
                datamover::TransportKind::Tool,
                format!("cannot run it: {e}"),
            )
        })?;
    if !out.status.success() {
        return Err(Error::transport(
            "qemu-system-x86_64",
            datamover::TransportKind::Tool,
            format!(
                "starting {name}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    let pidfile = vdir.join(format!("{name}.pid"));
    std::fs::read_to_string(&pidfile)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| Error::Internal(format!("QEMU left no pid in {}", pidfile.display())))
}

/// End process `pid`: SIGTERM, then SIGKILL after 10 s.
fn kill_wait(pid: u32) {
    let Ok(p) = i32::try_from(pid) else { return };
    for (sig, wait) in [(libc::SIGTERM, 100), (libc::SIGKILL, 100)] {
        // SAFETY: kill(2) on a process this session started.
        unsafe { libc::kill(p, sig) };
        for _ in 0..wait {
            if !alive(pid) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Session {
    /// Whether a live mount server serves the session.
    pub fn served(&self) -> bool {
        self.server_pid.is_some_and(alive)
    }
}

fn alive(pid: u32) -> bool {
    let Ok(p) = i32::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks that the process exists.
    (unsafe { libc::kill(p, 0) } == 0) && !crate::qemu::local::exited(p)
}

fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "{name:?} cannot name an instant recovery session: use letters, digits, '.', '_' and '-' (at most 64)"
        )))
    }
}

fn session_dir(dir: &Path, name: &str) -> Result<PathBuf> {
    check_name(name)?;
    Ok(dir.join(name))
}

/// The session `name` under `dir`.
pub fn load(dir: &Path, name: &str) -> Result<Session> {
    let path = session_dir(dir, name)?.join(SESSION_FILE);
    let b = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::InvalidArgument(format!(
                "no instant recovery session {name} under {} (`dm instant-recover --list` shows them)",
                dir.display()
            )));
        }
        Err(e) => return Err(Error::io("read", &path, e)),
    };
    let s: Session = serde_json::from_slice(&b).map_err(|e| {
        Error::InvalidArgument(format!(
            "{} is damaged ({e}): power off domain {name} if it runs, then remove {} by hand",
            path.display(),
            path.parent().unwrap_or(dir).display()
        ))
    })?;
    if s.version != SESSION_VERSION {
        return Err(Error::Unsupported(format!(
            "{}: session version {} (this dm knows {SESSION_VERSION})",
            path.display(),
            s.version
        )));
    }
    Ok(s)
}

fn save(dir: &Path, s: &Session) -> Result<()> {
    let sdir = session_dir(dir, &s.name)?;
    let tmp = sdir.join(format!(".{SESSION_FILE}.{}", std::process::id()));
    let b = serde_json::to_vec_pretty(s).map_err(|e| Error::Internal(e.to_string()))?;
    std::fs::write(&tmp, b).map_err(|e| Error::io("write", &tmp, e))?;
    let path = sdir.join(SESSION_FILE);
    std::fs::rename(&tmp, &path).map_err(|e| Error::io("write", &path, e))
}

/// Every session under `dir`; one whose mount server is gone shows as
/// stopped.
pub fn sessions(dir: &Path) -> Result<Vec<Session>> {
    let rd = match std::fs::read_dir(dir) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("list", dir, e)),
    };
    let mut out = Vec::new();
    for e in rd {
        let e = e.map_err(|e| Error::io("list", dir, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if check_name(&name).is_err() || !e.path().join(SESSION_FILE).exists() {
            continue;
        }
        let mut s = load(dir, &name)?;
        if !s.served() && s.state != State::Stopped {
            s.message = Some(format!("its mount server is gone (was {})", s.state.name()));
            s.state = State::Stopped;
            s.server_pid = None;
        }
        out.push(s);
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// The QEMU of our own that `on` names (`qmp` for `default`, or
/// `qmp:///NAME`), its name checked; none when `on` names a libvirt
/// domain.
pub fn own_qemu(on: &str, default: &str) -> Result<Option<String>> {
    if on != "qmp" && !on.starts_with("qmp:") {
        return Ok(None);
    }
    let name = match on {
        "qmp" | "qmp:///" => default.to_string(),
        on => on
            .strip_prefix("qmp:///")
            .filter(|n| !n.contains('/'))
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "{on}: give qmp (a QEMU named {default}) or qmp:///NAME"
                ))
            })?
            .to_string(),
    };
    check_name(&name)?;
    Ok(Some(name))
}

/// The points `specs` name: `VM/DISK[@POINT]`, or `VM` for the newest
/// point of each of its disks.
pub fn points_named(repo: &dyn PointSource, specs: &[String]) -> Result<Vec<PointRef>> {
    let mut out = Vec::new();
    for s in specs {
        if s.contains('/') {
            out.push(s.parse()?);
            continue;
        }
        let mut any = false;
        for d in repo.disks()?.into_iter().filter(|d| d.vm() == s) {
            any = true;
            out.push(PointRef { disk: d, at: None });
        }
        if !any {
            return Err(Error::InvalidArgument(format!(
                "the repository holds no disk of VM {s} (`dm points` lists them)"
            )));
        }
    }
    Ok(out)
}

/// How to recover.
#[derive(Debug, Clone)]
pub struct Recover {
    /// `libvirt:///NAME` (`?uri=` for another connection); without a
    /// name the domain is `VM-instant`.
    pub on: String,
    /// Where sessions live ([`DEFAULT_DIR`]).
    pub dir: PathBuf,
    /// Chunk cache bytes per disk (0: the default).
    pub cache_bytes: u64,
}

impl Default for Recover {
    fn default() -> Self {
        Recover {
            on: "libvirt:///".into(),
            dir: PathBuf::from(DEFAULT_DIR),
            cache_bytes: 0,
        }
    }
}

/// A new session's directory, removed on drop while armed.
struct FreshDir(Option<PathBuf>);
impl Drop for FreshDir {
    fn drop(&mut self) {
        if let Some(d) = self.0.take() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// A disk ready to serve.
struct Served<'r> {
    disk: PointDisk<'r>,
    listener: Listener,
    name: String,
}

/// Start the VM whose disks `points` name (every disk of its definition,
/// one VM) from the repository, and serve it until it is migrated,
/// discarded, shut down, or `stop` is set (the VM is then powered off).
/// `ready` gets the session once the VM runs. Returns the session as it
/// ended.
pub fn recover(
    repo: &dyn PointSource,
    points: &[PointRef],
    how: &Recover,
    stop: &AtomicBool,
    ready: impl FnOnce(&Session),
) -> Result<Session> {
    let first = points
        .first()
        .ok_or_else(|| Error::InvalidArgument("name the VM's disks to recover".into()))?;
    let vm = first.disk.vm().to_string();
    let mut resolved = Vec::new();
    for p in points {
        if p.disk.vm() != vm {
            return Err(Error::InvalidArgument(format!(
                "{} is not a disk of {vm}: recover one VM at a time",
                p.disk
            )));
        }
        if resolved
            .iter()
            .any(|(d, _): &(datamover::DiskName, String)| d == &p.disk)
        {
            return Err(Error::InvalidArgument(format!("{} is named twice", p.disk)));
        }
        let id = repo.resolve(&p.disk, p.at.as_deref())?;
        resolved.push((p.disk.clone(), id.to_string()));
    }
    let xml = libvirt::newest_definition(repo, &resolved)?;
    let default_name = format!("{vm}-instant");
    let own = own_qemu(&how.on, &default_name)?;
    let runner = if own.is_some() {
        Runner::Qemu
    } else {
        Runner::Libvirt
    };
    let (name, uri, conn) = match own {
        Some(name) => {
            if let Some(pid) = qemu_running(&how.dir, &name) {
                return Err(Error::InvalidArgument(format!(
                    "a QEMU named {name} runs already (pid {pid}): give another name (qmp:///NAME)"
                )));
            }
            (name, "qmp".to_string(), None)
        }
        None => {
            if xml.is_none() {
                return Err(Error::InvalidArgument(format!(
                    "no point of {vm} given stores a VM definition (only libvirt backups do): recover it with --on qmp (a QEMU of our own), or serve the disks with `dm export`"
                )));
            }
            let (addr, name) = LibvirtAddress::named(&how.on, &default_name)?;
            let conn = libvirt::connect(&addr)?;
            if Domain::lookup_by_name(&conn, &name).is_ok() {
                return Err(Error::InvalidArgument(format!(
                    "a domain {name} exists at {} already: give another name (libvirt:///NAME)",
                    addr.uri
                )));
            }
            (name, addr.uri, Some(conn))
        }
    };
    let sdir = session_dir(&how.dir, &name)?;
    let disks: Vec<SessionDisk> = resolved
        .iter()
        .map(|(d, id)| SessionDisk {
            disk: d.to_string(),
            point: id.clone(),
            target: d.disk().to_string(),
            socket: sdir
                .join(format!("{}.sock", d.disk()))
                .display()
                .to_string(),
            overlay: sdir
                .join(format!("{}.overlay", d.disk()))
                .display()
                .to_string(),
            size: 0,
            migrated_to: None,
        })
        .collect();
    // A stopped session of the same points resumes over its overlays.
    let resumed = sdir.join(SESSION_FILE).exists();
    if resumed {
        let old = load(&how.dir, &name)?;
        if old.served() {
            return Err(Error::InvalidArgument(format!(
                "session {name} is served already (pid {})",
                old.server_pid.unwrap_or_default()
            )));
        }
        let same = |a: &[SessionDisk], b: &[SessionDisk]| {
            a.len() == b.len()
                && a.iter()
                    .all(|x| b.iter().any(|y| x.disk == y.disk && x.point == y.point))
        };
        if !same(&old.disks, &disks) {
            return Err(Error::InvalidArgument(format!(
                "session {name} holds the guest's writes over other points: discard it (`dm instant-recover --discard {name}`) or give another name"
            )));
        }
    }
    std::fs::create_dir_all(&sdir).map_err(|e| Error::io("create", &sdir, e))?;
    // Until the VM is asked to start, a failure takes a new session's
    // directory with it.
    let mut fresh = FreshDir(Some(sdir.clone()).filter(|_| !resumed));
    std::fs::set_permissions(&sdir, std::fs::Permissions::from_mode(0o711))
        .map_err(|e| Error::io("set mode of", &sdir, e))?;
    let domain_type = xml
        .as_deref()
        .and_then(|x| roxmltree::Document::parse(x).ok())
        .and_then(|d| d.root_element().attribute("type").map(str::to_string))
        .unwrap_or_else(|| "qemu".into());
    // Our own QEMU runs as this process's user; libvirt's as its QEMU user.
    let owner = conn
        .as_ref()
        .and_then(|c| libvirt::qemu_user(c, &domain_type));
    if let Some((uid, gid)) = owner
        && let Some(blocked) = unreachable_by(&sdir, uid, gid)
    {
        return Err(Error::InvalidArgument(format!(
            "libvirt's QEMU user ({uid}:{gid}) cannot enter {} to reach the session's sockets: let it (chmod o+x), or keep sessions elsewhere (--dir)",
            blocked.display()
        )));
    }

    let mut served = Vec::new();
    let mut session = Session {
        version: SESSION_VERSION,
        name: name.clone(),
        vm: vm.clone(),
        uri,
        repo: repo.describe(),
        state: State::Starting,
        percent: 0,
        server_pid: Some(std::process::id()),
        started: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        message: None,
        downtime_ms: None,
        disks,
        runner,
        qemu_pid: None,
    };
    let cache = if how.cache_bytes == 0 {
        datamover::reader::DEFAULT_CACHE
    } else {
        how.cache_bytes
    };
    for (d, p) in session.disks.iter_mut().zip(points) {
        let overlay = Path::new(&d.overlay);
        let disk = PointDisk::open(repo, p, Some(overlay), cache)?;
        for f in [
            overlay.to_path_buf(),
            overlay.with_extension("overlay.dm-overlay"),
        ] {
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| Error::io("set mode of", &f, e))?;
        }
        d.size = server::Disk::size(&disk);
        let sock = Path::new(&d.socket);
        let _ = std::fs::remove_file(sock);
        let listener = Listener::bind(&format!("unix:{}", d.socket))?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(sock, Some(uid), Some(gid))
                .map_err(|e| Error::io("hand to QEMU's user", sock, e))?;
        }
        std::fs::set_permissions(sock, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| Error::io("set mode of", sock, e))?;
        served.push(Served {
            disk,
            listener,
            name: d.disk.clone(),
        });
    }
    let start = match (&conn, &xml) {
        (Some(conn), Some(xml)) => {
            let nbd: Vec<(String, NewDisk)> = session
                .disks
                .iter()
                .map(|d| {
                    (
                        d.target.clone(),
                        NewDisk::Nbd {
                            socket: d.socket.clone(),
                            export: d.disk.clone(),
                        },
                    )
                })
                .collect();
            Start::Domain(conn, libvirt::definition_for(xml, &name, &nbd)?)
        }
        _ => {
            let vdir = vm_dir(&how.dir, &name);
            Start::Qemu(
                qemu_args(&name, xml.as_deref(), &session.disks, &vdir),
                vdir,
            )
        }
    };
    save(&how.dir, &session)?;
    fresh.0 = None;

    let done = AtomicBool::new(false);
    let outcome = std::thread::scope(|s| {
        for sv in &served {
            let done = &done;
            s.spawn(move || sv.disk.reader().prefetcher(done));
            s.spawn(move || {
                let opts = ExportOptions {
                    name: sv.name.clone(),
                    tls: None,
                };
                if let Err(e) = server::serve(&sv.listener, &sv.disk, &opts, done) {
                    tracing::error!("serving {}: {e}", sv.name);
                }
            });
        }
        let r = run(start, &how.dir, &mut session, stop, ready);
        done.store(true, Ordering::Relaxed);
        r
    });
    for d in &session.disks {
        let _ = std::fs::remove_file(&d.socket);
    }
    // A new session whose VM never ran holds nothing worth keeping.
    let never_ran = !resumed && session.state == State::Starting;
    // What the controlling command wrote last, with the server gone.
    let mut last = load(&how.dir, &name).unwrap_or(session);
    last.server_pid = None;
    if !matches!(last.state, State::Migrated | State::Stopping) {
        last.state = State::Stopped;
    }
    if let Err(e) = &outcome {
        last.message = Some(e.to_string());
    }
    if never_ran || matches!(last.state, State::Migrated | State::Stopping) {
        // Migrated or discarded: its files go with it (the controlling
        // command waits for that).
        std::fs::remove_dir_all(&sdir).map_err(|e| Error::io("remove", &sdir, e))?;
    } else {
        save(&how.dir, &last)?;
    }
    outcome.map(|()| last)
}

/// The first directory above `path` (itself excluded) that `uid:gid`
/// may not search, if any.
fn unreachable_by(path: &Path, uid: u32, gid: u32) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    if uid == 0 {
        return None;
    }
    path.ancestors().skip(1).find_map(|d| {
        let m = std::fs::metadata(d).ok()?;
        let mode = m.mode();
        let may = if m.uid() == uid {
            mode & 0o100 != 0
        } else if m.gid() == gid {
            mode & 0o010 != 0
        } else {
            mode & 0o001 != 0
        };
        (!may).then(|| d.to_path_buf())
    })
}

/// How to start a session's VM.
enum Start<'c> {
    /// A transient libvirt domain of this definition.
    Domain(&'c virt::connect::Connect, String),
    /// QEMU with these arguments, its files in this directory.
    Qemu(Vec<String>, PathBuf),
}

/// A session's running VM.
enum Vm {
    Domain(Domain),
    Qemu(u32),
}

impl Vm {
    fn running(&self) -> bool {
        match self {
            Vm::Domain(d) => d.is_active().unwrap_or(false),
            Vm::Qemu(pid) => alive(*pid),
        }
    }

    /// Power it off (a domain only while it runs from the session).
    fn power_off(&self, s: &Session) {
        match self {
            Vm::Domain(d) => {
                if uses_session(d, s) {
                    let _ = d.destroy();
                }
            }
            Vm::Qemu(pid) => kill_wait(*pid),
        }
    }
}

/// The QEMU of ours named `name` that runs, if any.
fn qemu_running(dir: &Path, name: &str) -> Option<u32> {
    let pidfile = vm_dir(dir, name).join(format!("{name}.pid"));
    let pid: u32 = std::fs::read_to_string(pidfile).ok()?.trim().parse().ok()?;
    alive(pid).then_some(pid)
}

/// Start the VM and follow the session until it ends.
fn run(
    start: Start<'_>,
    dir: &Path,
    session: &mut Session,
    stop: &AtomicBool,
    ready: impl FnOnce(&Session),
) -> Result<()> {
    let vm = match start {
        Start::Domain(conn, def) => Vm::Domain(
            Domain::create_xml(conn, &def, 0)
                .map_err(|e| libvirt::lv_err(&format!("starting {}", session.name), e))?,
        ),
        Start::Qemu(args, vdir) => {
            let _ = std::fs::remove_dir_all(&vdir);
            std::fs::create_dir_all(&vdir).map_err(|e| Error::io("create", &vdir, e))?;
            std::fs::set_permissions(&vdir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| Error::io("set mode of", &vdir, e))?;
            let pid = start_qemu(&args, &vdir, &session.name)?;
            session.qemu_pid = Some(pid);
            Vm::Qemu(pid)
        }
    };
    session.state = State::Serving;
    save(dir, session)?;
    ready(session);
    let mut checked = Instant::now();
    loop {
        std::thread::sleep(POLL);
        if stop.load(Ordering::Relaxed) {
            vm.power_off(session);
            let mut s = load(dir, &session.name)?;
            s.message = Some(
                "stopped: the VM was powered off and its overlays kept (recover the same points under this name to resume, or discard)".into(),
            );
            s.state = State::Stopped;
            save(dir, &s)?;
            return Ok(());
        }
        let s = load(dir, &session.name)?;
        match s.state {
            State::Migrated => return Ok(()),
            // Discarded: the VM goes before the server reports its end.
            State::Stopping => {
                vm.power_off(session);
                return Ok(());
            }
            State::Migrating => continue,
            _ => {}
        }
        if checked.elapsed() >= Duration::from_secs(1) {
            checked = Instant::now();
            if !vm.running() {
                // A discard marks the session before it powers the VM off.
                let mut s = load(dir, &session.name)?;
                if matches!(s.state, State::Migrated | State::Stopping) {
                    return Ok(());
                }
                s.state = State::Stopped;
                s.message = Some("the VM was shut down; its overlays are kept".into());
                save(dir, &s)?;
                return Ok(());
            }
        }
    }
}

/// Whether the running domain still reads a disk from the session.
fn uses_session(dom: &Domain, s: &Session) -> bool {
    dom.get_xml_desc(0)
        .map(|x| s.disks.iter().any(|d| x.contains(&d.socket)))
        .unwrap_or(false)
}

/// Wait until no mount server serves the session (at most `limit`): it
/// removed the session, or it is gone (the session is then removed here).
fn wait_unserved(dir: &Path, name: &str, limit: Duration) -> Result<()> {
    let t = Instant::now();
    let sdir = session_dir(dir, name)?;
    loop {
        if !sdir.join(SESSION_FILE).exists() {
            return Ok(());
        }
        let s = load(dir, name)?;
        if !s.served() {
            return std::fs::remove_dir_all(&sdir).map_err(|e| Error::io("remove", &sdir, e));
        }
        if t.elapsed() > limit {
            return Err(Error::Internal(format!(
                "the mount server of {name} (pid {}) did not end within {} s",
                s.server_pid.unwrap_or_default(),
                limit.as_secs()
            )));
        }
        std::thread::sleep(POLL);
    }
}

/// How to migrate.
#[derive(Debug, Clone)]
pub struct Migrate {
    /// The directory the production images go to (`NAME-TARGET.FORMAT`).
    pub to: PathBuf,
    /// `raw` or `qcow2`.
    pub format: String,
}

/// Copy the disks of the running session `name` to production storage,
/// switch the VM over (paused for the switch only), define it there, and
/// end the session. `progress` gets the percent copied.
pub fn migrate(
    dir: &Path,
    name: &str,
    how: &Migrate,
    mut progress: impl FnMut(u8),
) -> Result<Session> {
    let mut s = load(dir, name)?;
    if !s.served() || s.state != State::Serving {
        return Err(Error::InvalidArgument(format!(
            "session {name} is {}{}: only a served session migrates",
            s.state.name(),
            if s.served() {
                ""
            } else {
                " with no mount server (recover it again to resume)"
            }
        )));
    }
    if !matches!(how.format.as_str(), "raw" | "qcow2") {
        return Err(Error::InvalidArgument(format!(
            "format {:?}: raw or qcow2",
            how.format
        )));
    }
    std::fs::create_dir_all(&how.to).map_err(|e| Error::io("create", &how.to, e))?;
    let to = how
        .to
        .canonicalize()
        .map_err(|e| Error::io("resolve", &how.to, e))?;
    let dests: Vec<PathBuf> = s
        .disks
        .iter()
        .map(|d| to.join(format!("{name}-{}.{}", d.target, how.format)))
        .collect();
    if let Some(d) = dests.iter().find(|d| d.exists()) {
        return Err(Error::InvalidArgument(format!(
            "{} exists: migrate to another directory, or move it away",
            d.display()
        )));
    }
    // libvirt: the domain, checked to run from the session; ours: QMP.
    let domain = match s.runner {
        Runner::Libvirt => {
            let (addr, _) =
                LibvirtAddress::named(&format!("libvirt:///{name}?uri={}", s.uri), name)?;
            let conn = libvirt::connect(&addr)?;
            let dom = libvirt::domain(&conn, &addr)?;
            if !uses_session(&dom, &s) {
                return Err(Error::InvalidArgument(format!(
                    "domain {name} does not run from session {name}'s exports"
                )));
            }
            Some((conn, dom))
        }
        Runner::Qemu => None,
    };
    let mut mirror: Box<dyn Mirror + '_> = match &domain {
        Some((_, dom)) => Box::new(LibvirtMirror(dom)),
        None => {
            if !s.qemu_pid.is_some_and(alive) {
                return Err(Error::InvalidArgument(format!(
                    "the QEMU of session {name} does not run"
                )));
            }
            let qmp = vm_dir(dir, name).join(format!("{name}.qmp"));
            Box::new(QmpMirror(crate::qemu::qmp::Qmp::connect(
                &crate::qemu::qmp::QmpAddr::Unix(qmp),
                Duration::from_secs(10),
            )?))
        }
    };
    s.state = State::Migrating;
    s.percent = 0;
    save(dir, &s)?;
    let copied = copy_and_switch(mirror.as_mut(), &s, &dests, dir, &mut progress);
    drop(mirror);
    let downtime = match copied {
        Ok(t) => t,
        Err(e) => {
            for d in &dests {
                let _ = std::fs::remove_file(d);
            }
            let mut now = load(dir, name)?;
            if now.state == State::Migrating {
                now.state = State::Serving;
            }
            now.percent = 0;
            now.message = Some(format!("migration failed: {e}"));
            save(dir, &now)?;
            return Err(e);
        }
    };
    // The VM runs from production storage: a domain is defined there; our
    // QEMU runs on (its QMP socket and pid file stay in DIR/NAME.vm).
    let defined = match &domain {
        Some((conn, dom)) => dom
            .get_xml_desc(sys::VIR_DOMAIN_XML_MIGRATABLE)
            .map_err(|e| libvirt::lv_err("domain XML", e))
            .and_then(|x| {
                Domain::define_xml(conn, &x)
                    .map(|_| ())
                    .map_err(|e| libvirt::lv_err(&format!("defining {name}"), e))
            }),
        None => Ok(()),
    };
    for (d, p) in s.disks.iter_mut().zip(&dests) {
        d.migrated_to = Some(p.display().to_string());
    }
    s.state = State::Migrated;
    s.percent = 100;
    s.downtime_ms = Some(downtime.as_millis() as u64);
    s.message = match (&defined, s.runner) {
        (Err(e), _) => Some(format!(
            "the VM runs from production storage but is not defined persistently: {e}"
        )),
        (Ok(()), Runner::Qemu) => Some(format!(
            "it runs on as QEMU pid {}, QMP at {}",
            s.qemu_pid.unwrap_or_default(),
            vm_dir(dir, name).join(format!("{name}.qmp")).display()
        )),
        (Ok(()), Runner::Libvirt) => None,
    };
    save(dir, &s)?;
    progress(100);
    wait_unserved(dir, name, Duration::from_secs(60))?;
    defined?;
    s.server_pid = None;
    Ok(s)
}

/// What a migration needs of the VM's hypervisor: a mirror job per disk
/// (named by the disk's target), to follow, abandon, or switch to.
trait Mirror {
    /// Start copying disk `target` to the image `dest` (format `fmt`),
    /// guest writes mirrored synchronously.
    fn start(&mut self, target: &str, dest: &Path, fmt: &str) -> Result<()>;
    /// (bytes done, bytes to do, in step); `None` once the job is gone.
    fn status(&mut self, target: &str) -> Result<Option<(u64, u64, bool)>>;
    /// Drop the copy (the disk stays where it was).
    fn abandon(&mut self, target: &str);
    /// Pause the VM.
    fn pause(&mut self) -> Result<()>;
    /// Switch disk `target` to its copy (the VM paused).
    fn switch(&mut self, target: &str) -> Result<()>;
    /// Resume the VM.
    fn resume(&mut self) -> Result<()>;
}

/// libvirt's block copy (`virDomainBlockCopy`, pivot).
struct LibvirtMirror<'d>(&'d Domain);

impl Mirror for LibvirtMirror<'_> {
    fn start(&mut self, target: &str, dest: &Path, fmt: &str) -> Result<()> {
        let xml = format!(
            "<disk type='file'><source file='{}'/><driver type='{fmt}'/></disk>",
            libvirt::xml_escape(&dest.display().to_string())
        );
        let flags = sys::VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB
            | sys::VIR_DOMAIN_BLOCK_COPY_SYNCHRONOUS_WRITES;
        libvirt::block_copy(self.0, target, &xml, flags)
    }
    fn status(&mut self, target: &str) -> Result<Option<(u64, u64, bool)>> {
        Ok(libvirt::block_job(self.0, target)?.map(|(c, e)| (c, e, e > 0 && c == e)))
    }
    fn abandon(&mut self, target: &str) {
        let _ = libvirt::block_job_end(self.0, target, false);
    }
    fn pause(&mut self) -> Result<()> {
        self.0
            .suspend()
            .map(|_| ())
            .map_err(|e| libvirt::lv_err("pausing the VM to switch its disks", e))
    }
    fn switch(&mut self, target: &str) -> Result<()> {
        libvirt::block_job_end(self.0, target, true)
    }
    fn resume(&mut self) -> Result<()> {
        self.0
            .resume()
            .map(|_| ())
            .map_err(|e| libvirt::lv_err("resuming the VM after the switch", e))
    }
}

/// QEMU's mirror job over QMP (`drive-mirror`, `block-job-complete`).
struct QmpMirror(crate::qemu::qmp::Qmp);

fn job_id(target: &str) -> String {
    format!("dm-mirror-{target}")
}

impl Mirror for QmpMirror {
    fn start(&mut self, target: &str, dest: &Path, fmt: &str) -> Result<()> {
        self.0
            .execute(
                "drive-mirror",
                serde_json::json!({
                    "job-id": job_id(target), "device": format!("disk-{target}"),
                    "target": dest.display().to_string(), "format": fmt, "sync": "full",
                    "mode": "absolute-paths", "copy-mode": "write-blocking",
                }),
            )
            .map(|_| ())
    }
    fn status(&mut self, target: &str) -> Result<Option<(u64, u64, bool)>> {
        let v = self.0.execute("query-block-jobs", serde_json::json!({}))?;
        let id = job_id(target);
        Ok(v.as_array().and_then(|jobs| {
            jobs.iter().find(|j| j["device"] == id.as_str()).map(|j| {
                (
                    j["offset"].as_u64().unwrap_or(0),
                    j["len"].as_u64().unwrap_or(0),
                    j["ready"].as_bool().unwrap_or(false),
                )
            })
        }))
    }
    fn abandon(&mut self, target: &str) {
        let _ = self.0.execute(
            "block-job-cancel",
            serde_json::json!({"device": job_id(target), "force": true}),
        );
    }
    fn pause(&mut self) -> Result<()> {
        self.0.execute("stop", serde_json::json!({})).map(|_| ())
    }
    fn switch(&mut self, target: &str) -> Result<()> {
        self.0.execute(
            "block-job-complete",
            serde_json::json!({"device": job_id(target)}),
        )?;
        // Complete: the job goes once the disk reads from its copy.
        for _ in 0..1000 {
            if self.status(target)?.is_none() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Err(Error::Internal(format!(
            "the copy of {target} did not complete in 10 s"
        )))
    }
    fn resume(&mut self) -> Result<()> {
        self.0.execute("cont", serde_json::json!({})).map(|_| ())
    }
}

/// Mirror every disk to its destination, wait until all are in step,
/// then pause, switch, resume: the pause's length.
fn copy_and_switch(
    m: &mut dyn Mirror,
    s: &Session,
    dests: &[PathBuf],
    dir: &Path,
    progress: &mut impl FnMut(u8),
) -> Result<Duration> {
    let mut started: Vec<&str> = Vec::new();
    let abort = |m: &mut dyn Mirror, started: &[&str]| {
        for t in started {
            m.abandon(t);
        }
    };
    for (d, p) in s.disks.iter().zip(dests) {
        let fmt = p.extension().and_then(|e| e.to_str()).unwrap_or("raw");
        if let Err(e) = m.start(&d.target, p, fmt) {
            abort(m, &started);
            return Err(e);
        }
        started.push(d.target.as_str());
    }
    let mut shown = 0u8;
    loop {
        let mut ready = true;
        let (mut cur, mut end) = (0u64, 0u64);
        for t in started.clone() {
            match m.status(t) {
                Ok(Some((c, e, r))) => {
                    cur += c;
                    end += e;
                    ready &= r;
                }
                Ok(None) => {
                    abort(m, &started);
                    return Err(Error::Internal(format!(
                        "the copy of {t} ended by itself (see the hypervisor's log)"
                    )));
                }
                Err(e) => {
                    abort(m, &started);
                    return Err(e);
                }
            }
        }
        let pct = cur
            .saturating_mul(100)
            .checked_div(end)
            .map_or(0, |p| p.min(99) as u8);
        if pct != shown {
            shown = pct;
            progress(pct);
            let mut now = load(dir, &s.name)?;
            if now.state != State::Migrating {
                abort(m, &started);
                return Err(Error::InvalidArgument(format!(
                    "session {} became {} during the migration",
                    s.name,
                    now.state.name()
                )));
            }
            now.percent = pct;
            save(dir, &now)?;
        }
        if ready {
            break;
        }
        std::thread::sleep(POLL);
    }
    let t = Instant::now();
    if let Err(e) = m.pause() {
        abort(m, &started);
        return Err(e);
    }
    let mut switched = Vec::new();
    let mut failed = None;
    for tg in &started {
        match m.switch(tg) {
            Ok(()) => switched.push(*tg),
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    if let Some(e) = failed {
        let rest: Vec<&str> = started
            .iter()
            .filter(|t| !switched.contains(t))
            .copied()
            .collect();
        abort(m, &rest);
        let _ = m.resume();
        return Err(if switched.is_empty() {
            e
        } else {
            Error::Internal(format!(
                "{e}; disks {} run from production storage already, the others from the repository: keep the session served and retry",
                switched.join(", ")
            ))
        });
    }
    m.resume()?;
    Ok(t.elapsed())
}

/// Power off session `name`'s VM (if it still runs from the session),
/// end its mount server and remove its overlays and sockets.
pub fn discard(dir: &Path, name: &str) -> Result<Session> {
    let mut s = load(dir, name)?;
    if s.state == State::Migrating && s.served() {
        return Err(Error::InvalidArgument(format!(
            "session {name} is migrating: wait for it (or stop the migration) first"
        )));
    }
    // Marked first: the mount server then takes the VM's end for the
    // discard it is, not for a shutdown.
    if s.served() {
        s.state = State::Stopping;
        save(dir, &s)?;
    }
    match s.runner {
        Runner::Libvirt => {
            if let Ok((addr, _)) =
                LibvirtAddress::named(&format!("libvirt:///{name}?uri={}", s.uri), name)
                && let Ok(conn) = libvirt::connect(&addr)
                && let Ok(dom) = Domain::lookup_by_name(&conn, name)
                && uses_session(&dom, &s)
            {
                // The mount server may power it off first (it saw the
                // session stopping): a domain already gone is the goal.
                match dom.destroy() {
                    Err(e)
                        if !matches!(
                            e.code(),
                            virt::error::ErrorNumber::NoDomain
                                | virt::error::ErrorNumber::OperationInvalid
                        ) =>
                    {
                        return Err(libvirt::lv_err(&format!("powering off {name}"), e));
                    }
                    _ => {}
                }
            }
        }
        Runner::Qemu => {
            if let Some(pid) = s.qemu_pid.filter(|p| alive(*p)) {
                kill_wait(pid);
            }
        }
    }
    wait_unserved(dir, name, Duration::from_secs(60))?;
    if s.runner == Runner::Qemu {
        let v = vm_dir(dir, name);
        let _ = std::fs::remove_dir_all(&v);
    }
    s.state = State::Stopped;
    s.server_pid = None;
    s.message = Some("discarded".into());
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Session {
        Session {
            version: SESSION_VERSION,
            name: "web-instant".into(),
            vm: "web".into(),
            uri: "qemu:///system".into(),
            repo: "/r".into(),
            state: State::Serving,
            percent: 0,
            server_pid: None,
            started: "2026-12-01T00:00:00Z".into(),
            message: None,
            downtime_ms: None,
            disks: vec![SessionDisk {
                disk: "web/vda".into(),
                point: "p".into(),
                target: "vda".into(),
                socket: "/s".into(),
                overlay: "/o".into(),
                size: 1 << 30,
                migrated_to: None,
            }],
            runner: Runner::Libvirt,
            qemu_pid: None,
        }
    }

    /// `session.json` version 1, byte for byte: a change here is a
    /// format change (a new version, and a reader for the old one).
    #[test]
    fn session_file_golden() {
        let mut s = Session {
            state: State::Migrating,
            percent: 42,
            server_pid: Some(7),
            ..sample()
        };
        s.disks[0].point = "20261201T000000.000Z-abcdef".into();
        s.disks[0].socket = "/d/web-instant/vda.sock".into();
        s.disks[0].overlay = "/d/web-instant/vda.overlay".into();
        s.disks[0].migrated_to = Some("/p/web-instant-vda.raw".into());
        let golden = r#"{"version":1,"name":"web-instant","vm":"web","uri":"qemu:///system","repo":"/r","state":"migrating","percent":42,"server_pid":7,"started":"2026-12-01T00:00:00Z","message":null,"downtime_ms":null,"disks":[{"disk":"web/vda","point":"20261201T000000.000Z-abcdef","target":"vda","socket":"/d/web-instant/vda.sock","overlay":"/d/web-instant/vda.overlay","size":1073741824,"migrated_to":"/p/web-instant-vda.raw"}]}"#;
        assert_eq!(serde_json::to_string(&s).expect("json"), golden);
        let back: Session = serde_json::from_str(golden).expect("parse");
        assert_eq!(back, s);
        // A QEMU of ours: two more fields.
        let q = Session {
            runner: Runner::Qemu,
            qemu_pid: Some(9),
            ..sample()
        };
        let text = serde_json::to_string(&q).expect("json");
        assert!(text.ends_with(r#""runner":"qemu","qemu_pid":9}"#), "{text}");
        assert_eq!(serde_json::from_str::<Session>(&text).expect("parse"), q);
    }

    #[test]
    fn session_names_are_plain_file_names() {
        for ok in ["web01-instant", "a.b_c", "x"] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".hidden", "a/b", "..", "a b", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_session_file_round_trips_and_a_gone_server_shows_stopped() {
        let tmp = tempfile::tempdir().expect("tmp");
        let s = Session {
            // No process has pid 0x7fff_fff0.
            server_pid: Some(0x7fff_fff0),
            ..sample()
        };
        std::fs::create_dir_all(tmp.path().join("web-instant")).expect("mkdir");
        save(tmp.path(), &s).expect("save");
        assert_eq!(load(tmp.path(), "web-instant").expect("load"), s);
        let text = std::fs::read_to_string(tmp.path().join("web-instant/session.json")).expect("r");
        assert!(text.contains("\"state\": \"serving\""), "{text}");
        let all = sessions(tmp.path()).expect("list");
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].state, State::Stopped);
        assert!(!all[0].served());
        assert!(load(tmp.path(), "other").is_err());
        assert!(
            sessions(&tmp.path().join("none"))
                .expect("empty")
                .is_empty()
        );
        // Another version is refused, not misread.
        std::fs::write(
            tmp.path().join("web-instant/session.json"),
            text.replace("\"version\": 1", "\"version\": 9"),
        )
        .expect("w");
        assert!(load(tmp.path(), "web-instant").is_err());
    }
}
