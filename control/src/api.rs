//! What goes over the wire between `dm`, the server and proxies: JSON
//! bodies of the REST API (`/api/v1/…`, bearer token) and of the agent API
//! (`/agent/v1/…`, mutual TLS). One place, so client and server cannot
//! drift apart; the OpenAPI document (`server/openapi.json`) describes the
//! same shapes.

use datamover::{DiskName, PointId};
use serde::{Deserialize, Serialize};

/// API version prefix of the REST API.
pub const API: &str = "/api/v1";
/// Prefix of the agent API (proxies and installers, mutual TLS).
pub const AGENT: &str = "/agent/v1";

/// An error body: every 4xx/5xx answer carries one.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong, for a person.
    pub error: String,
}

/// A managed host to add; the answer carries its enrollment token.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewHost {
    /// Unique name (letters, digits, `-`, `_`, `.`).
    pub name: String,
    /// Addresses the host is reached at (names or IPs), put in its
    /// certificate so its repository service can be verified.
    #[serde(default)]
    pub addresses: Vec<String>,
    /// Roles the server assigns; the host's installer deploys the
    /// components they need (`proxy`: `dm-proxy`).
    #[serde(default)]
    pub roles: Vec<HostRole>,
    /// Directories its proxy may read disks from and restore into
    /// (absolute; the proxy may report fewer, never more). None: the
    /// proxy gets no path tasks.
    #[serde(default)]
    pub datastores: Vec<String>,
    /// A hypervisor: the libvirt connection URI its proxy lists and backs
    /// up VMs through (`qemu:///system` for the host's own libvirtd). Its
    /// VMs enter the server's inventory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hypervisor: Option<String>,
}

/// A role a managed host can be given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HostRole {
    /// Backup proxy: the installer deploys, runs and upgrades `dm-proxy`.
    Proxy,
}

impl HostRole {
    /// Lower-case name.
    pub fn as_str(&self) -> &'static str {
        match self {
            HostRole::Proxy => "proxy",
        }
    }

    /// The component the role needs.
    pub fn component(&self) -> &'static str {
        match self {
            HostRole::Proxy => COMPONENT_PROXY,
        }
    }
}

impl std::str::FromStr for HostRole {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "proxy" => Ok(HostRole::Proxy),
            _ => Err(format!("unknown role {s:?} (known: proxy)")),
        }
    }
}

/// Name of the proxy component (the `dm-proxy` binary).
pub const COMPONENT_PROXY: &str = "proxy";

/// A managed host.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Host {
    /// Name.
    pub name: String,
    /// Addresses.
    pub addresses: Vec<String>,
    /// Whether it has enrolled (holds a certificate).
    pub enrolled: bool,
    /// When it was added (RFC 3339).
    pub created: String,
    /// Roles assigned to it.
    #[serde(default)]
    pub roles: Vec<HostRole>,
    /// The datastores its proxy may use.
    #[serde(default)]
    pub datastores: Vec<String>,
    /// When its current certificate ends (RFC 3339; the host renews it
    /// before): none before it enrolls.
    #[serde(default)]
    pub cert_expires: Option<String>,
    /// What its installer last reported, if one runs there.
    #[serde(default)]
    pub installer: Option<InstallerStatus>,
    /// Its libvirt connection, when it is a hypervisor.
    #[serde(default)]
    pub hypervisor: Option<String>,
}

/// Changes to a host.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostPatch {
    /// The host's roles from now on (its installer follows within a poll).
    #[serde(default)]
    pub roles: Option<Vec<HostRole>>,
    /// The datastores its proxy may use from now on.
    #[serde(default)]
    pub datastores: Option<Vec<String>>,
    /// Its libvirt connection from now on (`""`: no longer a hypervisor).
    #[serde(default)]
    pub hypervisor: Option<String>,
}

/// A VM as a hypervisor's proxy reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmReport {
    /// The libvirt domain's name.
    pub name: String,
    /// `running`, `paused`, `shut off`, ...
    pub state: String,
    /// Its disks.
    pub disks: Vec<VmDisk>,
}

/// A disk of a VM in the inventory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDisk {
    /// The target device (`vda`).
    pub target: String,
    /// The image format.
    pub format: String,
    /// The image file or device, as the hypervisor names it.
    #[serde(default)]
    pub source: Option<String>,
}

/// A VM of the server's inventory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryVm {
    /// The hypervisor (host) it runs on.
    pub host: String,
    /// The domain's name.
    pub name: String,
    /// Its state when last reported.
    pub state: String,
    /// Its disks.
    pub disks: Vec<VmDisk>,
    /// When its host last reported it (RFC 3339).
    pub seen: String,
}

/// A whole VM in a job: every disk of it becomes a task per run (from the
/// inventory, when the run starts), but those `exclude` names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobVm {
    /// The VM's name in the inventory.
    pub name: String,
    /// Its hypervisor, when several have a VM of that name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Disks (targets, `vdb`) left out.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<String>,
    /// Migration jobs: the domain's name on the target (default: the
    /// VM's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_as: Option<String>,
}

/// A host's installer as the server last heard from it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstallerStatus {
    /// When it last reported (RFC 3339).
    pub last_seen: String,
    /// Its report.
    #[serde(flatten)]
    pub report: InstallerReport,
}

/// Answer to adding a host.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostAdded {
    /// The host.
    pub host: Host,
    /// One-time enrollment token (`dmj1.<secret>.<ca sha256>`).
    pub enrollment_token: String,
    /// When the token expires (RFC 3339).
    pub expires: String,
}

/// A host's enrollment request (the only unauthenticated call besides
/// fetching the CA certificate, and it needs the one-time secret).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    /// The secret part of the enrollment token.
    pub secret: String,
    /// A PEM certificate request for the host's own key.
    pub csr: String,
}

/// Answer to enrollment.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Enrolled {
    /// The host's name in the inventory.
    pub host: String,
    /// Its certificate, PEM.
    pub cert: String,
    /// The CA, PEM.
    pub ca: String,
}

/// A host asks for a new certificate for a new key (over the agent
/// channel, authenticated by its current certificate).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    /// A PEM certificate request for the host's new key.
    pub csr: String,
}

/// A renewed certificate.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Renewed {
    /// The certificate, PEM (names and usages from the inventory).
    pub cert: String,
}

/// The state of a proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProxyState {
    /// Heartbeating.
    Online,
    /// Missed its heartbeats; its tasks were re-queued.
    Dead,
    /// Taken out of service by an operator.
    Disabled,
}

impl ProxyState {
    /// Lower-case name.
    pub fn as_str(&self) -> &'static str {
        match self {
            ProxyState::Online => "online",
            ProxyState::Dead => "dead",
            ProxyState::Disabled => "disabled",
        }
    }
}

/// A proxy as the server sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Proxy {
    /// Name (its host's name; `builtin` for the server's own).
    pub name: String,
    /// Task slots.
    pub slots: u32,
    /// Transport modes it may use (empty: all).
    pub modes: Vec<String>,
    /// Site (jobs may prefer proxies of a site).
    pub site: Option<String>,
    /// State.
    pub state: ProxyState,
    /// Tasks it runs now.
    pub running: u32,
    /// Datastores (directories) it reports it can see.
    pub datastores: Vec<String>,
    /// Its version.
    pub version: String,
    /// Last heartbeat (RFC 3339).
    pub last_seen: Option<String>,
}

/// Changes to a proxy's settings.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyPatch {
    /// Task slots (1–1024).
    pub slots: Option<u32>,
    /// Allowed transport modes.
    pub modes: Option<Vec<String>>,
    /// Site.
    pub site: Option<String>,
    /// Take out of service (true) or back in (false).
    pub disabled: Option<bool>,
}

/// A repository the server writes to.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Repository {
    /// Name.
    pub name: String,
    /// Its directory: on the proxy named by `proxy`, or else at the same
    /// path on every proxy that writes to it (shared storage). Created
    /// (`dm init`) if missing.
    pub path: String,
    /// The proxy that holds it and serves it to the others (its
    /// repository service); none: shared storage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<String>,
}

/// Kinds of job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobKind {
    /// Full, then CBT incrementals, into a repository.
    Backup,
    /// A one-off full copy into a repository: the whole disk is read even
    /// when changes are tracked.
    Copy,
    /// Into a repository on a target proxy, which keeps each disk's
    /// replica image (`<path>/replicas/<vm>/<disk>.img`) up to date;
    /// incremental after the first run.
    Replication,
    /// Quick migration: replicate, pause the source VM, replicate the
    /// last changes, hand the replica image over as the disk.
    Migration,
    /// Write a point (`JobDisk::point`, default the newest) to the
    /// location in `JobDisk::source`, through a proxy.
    Restore,
}

impl JobKind {
    /// Lower-case name.
    pub fn as_str(&self) -> &'static str {
        match self {
            JobKind::Backup => "backup",
            JobKind::Copy => "copy",
            JobKind::Replication => "replication",
            JobKind::Migration => "migration",
            JobKind::Restore => "restore",
        }
    }

    /// Whether the job keeps replica images on its target proxy.
    pub fn replicates(&self) -> bool {
        matches!(self, JobKind::Replication | JobKind::Migration)
    }
}

/// One disk of a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobDisk {
    /// Name in the repository, `vm/disk`.
    pub name: DiskName,
    /// What `dm backup` reads: an image or device path, `nbd://…`,
    /// `nbd+unix://…`, or a VM `qmp+unix://…` / `qmp://…`. For a restore
    /// job: where to write (a path or an NBD export).
    pub source: String,
    /// Restore jobs: the point to restore (an id or a unique prefix;
    /// default the newest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub point: Option<String>,
    /// The VM disk's node name when `source` is a VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
    /// The VM host the disk lives on (for HotAdd placement).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_host: Option<String>,
    /// Migration of a libvirt VM: the domain's name on the target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_as: Option<String>,
}

/// A job to create.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// Unique name.
    pub name: String,
    /// Kind.
    pub kind: JobKind,
    /// Target repository (by name).
    pub repository: String,
    /// Its disks; each becomes one task per run.
    #[serde(default)]
    pub disks: Vec<JobDisk>,
    /// Whole VMs of the inventory: each of their disks becomes one task
    /// per run, named `VM/TARGET`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vms: Vec<JobVm>,
    /// Proxies it may use (empty: any).
    #[serde(default)]
    pub proxies: Vec<String>,
    /// Transport mode: `auto` (default) or one to pin.
    #[serde(default = "auto")]
    pub transport: String,
    /// Fall back to network mode when the pinned/best mode fails.
    #[serde(default)]
    pub failover_to_network: bool,
    /// Retries of a failed task (each with its reason), default 2.
    #[serde(default = "two")]
    pub retries: u32,
    /// Run every this many minutes (none: on demand only).
    #[serde(default)]
    pub every_minutes: Option<u32>,
    /// Restore jobs: write over targets that exist (files, devices).
    /// Off by default: a restore then only creates new files (or writes
    /// into NBD exports, which always exist).
    #[serde(default)]
    pub overwrite: bool,
    /// VM disks: application-aware processing through the guest agent:
    /// `auto` (default: quiesce when the agent answers, else a
    /// crash-consistent point with a warning), `required` or `off`.
    #[serde(default = "auto")]
    pub quiesce: String,
}

fn auto() -> String {
    "auto".into()
}
fn two() -> u32 {
    2
}

/// A job as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    /// Its spec.
    #[serde(flatten)]
    pub spec: JobSpec,
    /// When it last ran (RFC 3339).
    pub last_run: Option<String>,
    /// Its newest session.
    pub last_session: Option<u64>,
}

/// State of a session or a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    /// Waiting for a slot.
    Queued,
    /// Placed on a proxy, not yet confirmed running.
    Assigned,
    /// Moving data.
    Running,
    /// Done.
    Success,
    /// Done with an error (after its retries).
    Failed,
}

impl State {
    /// Lower-case name.
    pub fn as_str(&self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Assigned => "assigned",
            State::Running => "running",
            State::Success => "success",
            State::Failed => "failed",
        }
    }
    /// Whether nothing more will happen.
    pub fn is_final(&self) -> bool {
        matches!(self, State::Success | State::Failed)
    }
}

impl std::str::FromStr for State {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "queued" => State::Queued,
            "assigned" => State::Assigned,
            "running" => State::Running,
            "success" => State::Success,
            "failed" => State::Failed,
            _ => return Err(format!("unknown state {s:?}")),
        })
    }
}

/// One attempt of a task that did not succeed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Attempt {
    /// 1-based.
    pub attempt: u32,
    /// Where it ran.
    pub proxy: Option<String>,
    /// Why it ended.
    pub reason: String,
    /// When (RFC 3339).
    pub at: String,
}

/// One task: one disk of one session.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Task {
    /// Id.
    pub id: u64,
    /// The disk (`vm/disk`).
    pub disk: DiskName,
    /// State.
    pub state: State,
    /// The proxy running (or that ran) it.
    pub proxy: Option<String>,
    /// Current attempt, 1-based.
    pub attempt: u32,
    /// Transport mode used.
    pub mode: Option<String>,
    /// Bytes of the disk covered so far.
    pub done: u64,
    /// Disk size, once known.
    pub total: u64,
    /// The run's bottleneck (source, proxy CPU, target).
    pub bottleneck: Option<String>,
    /// The point written.
    pub point: Option<PointId>,
    /// Bytes read from the source.
    pub bytes_read: Option<u64>,
    /// Bytes newly stored.
    pub bytes_stored: Option<u64>,
    /// Bytes sent to a repository service (both ways, TLS included).
    pub wire_bytes: Option<u64>,
    /// Replication and migration: the replica image the point was
    /// applied to (on the target proxy).
    pub replica: Option<String>,
    /// Error of the last attempt.
    pub error: Option<String>,
    /// While queued: why no proxy can take it (none sees its disk, none
    /// of the job's proxies is online, …); absent while it only waits
    /// for a free slot.
    #[serde(default)]
    pub waiting: Option<String>,
    /// VM disks: the point's consistency (application or crash, why, and
    /// how long the guest was frozen).
    #[serde(default)]
    pub consistency: Option<datamover::Consistency>,
    /// Earlier attempts and why they ended.
    pub attempts: Vec<Attempt>,
    /// Started (RFC 3339), of the current attempt.
    pub started: Option<String>,
    /// Finished (RFC 3339).
    pub finished: Option<String>,
}

/// A run of a job.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Session {
    /// Id.
    pub id: u64,
    /// The job.
    pub job: String,
    /// Kind.
    pub kind: JobKind,
    /// Running until every task is final; then success or failed.
    pub state: State,
    /// Created (RFC 3339).
    pub created: String,
    /// Finished (RFC 3339).
    pub finished: Option<String>,
    /// Its tasks.
    pub tasks: Vec<Task>,
}

// ---- agent API ----

/// An installer's poll: what it has installed and how it runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstallerReport {
    /// Version of the installer.
    pub version: String,
    /// Components installed on the host.
    pub components: Vec<InstalledComponent>,
}

/// A component installed by an installer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstalledComponent {
    /// Name (`proxy`).
    pub name: String,
    /// SHA-256 of the installed package (hex).
    pub sha256: String,
    /// Where it is installed.
    pub path: String,
    /// Its process id while it runs.
    pub pid: Option<u32>,
    /// How often it was restarted after exiting on its own.
    #[serde(default)]
    pub restarts: u32,
    /// The last problem (a failed download, an exit status).
    #[serde(default)]
    pub error: Option<String>,
}

/// The server's answer to an installer: the components the host's roles
/// need, each at the server's version; an installed component that is
/// not listed is stopped and removed.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct InstallerOrders {
    /// When to poll next.
    pub interval_ms: u64,
    /// Components to run.
    pub components: Vec<ComponentOrder>,
}

/// One component an installer must run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComponentOrder {
    /// Name (`proxy`).
    pub name: String,
    /// SHA-256 of the package (hex): a download must match it.
    pub sha256: String,
    /// Package size in bytes.
    pub size: u64,
    /// Where to fetch it (agent API path).
    pub url: String,
}

/// A proxy's heartbeat: who it is, what it can do, how its tasks go.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Version of the proxy component.
    pub version: String,
    /// CPU cores (the default slot count).
    pub cores: u32,
    /// Datastores (directories) it can see.
    pub datastores: Vec<String>,
    /// Tasks it runs now, with progress.
    pub running: Vec<TaskProgress>,
    /// The port its repository service listens at, if it runs one.
    #[serde(default)]
    pub service_port: Option<u16>,
    /// The repositories its service offers now (as last ordered).
    #[serde(default)]
    pub serving: Vec<String>,
    /// A hypervisor's VMs, listed through its libvirt connection (every
    /// 30 s; absent in between: the last list stands).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vms: Option<Vec<VmReport>>,
    /// Operations on VM replicas it runs or has ended.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub operations: Vec<OperationStatus>,
    /// Instant recoveries it serves or has ended.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recoveries: Vec<RecoveryStatus>,
    /// File requests it runs or has ended.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<FilesStatus>,
}

/// Progress of a running task.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskProgress {
    /// Task id.
    pub task: u64,
    /// Its attempt.
    pub attempt: u32,
    /// Bytes covered.
    pub done: u64,
    /// Disk size.
    pub total: u64,
}

/// The server's answer to a heartbeat or a task result.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Orders {
    /// New tasks for this proxy.
    pub assign: Vec<TaskOrder>,
    /// Tasks to stop (no longer this proxy's).
    pub cancel: Vec<u64>,
    /// When to send the next heartbeat.
    pub interval_ms: u64,
    /// Repositories this proxy's repository service offers: name → path.
    #[serde(default)]
    pub serve: Vec<ServedRepository>,
    /// When its host is a hypervisor: the libvirt connection whose VMs it
    /// reports.
    #[serde(default)]
    pub hypervisor: Option<String>,
    /// Operations on VM replicas for this proxy to run (sent once).
    #[serde(default)]
    pub operations: Vec<OperationOrder>,
    /// Instant recovery orders for this proxy (each sent once).
    #[serde(default)]
    pub recoveries: Vec<RecoveryOrder>,
    /// File requests for this proxy (each sent once).
    #[serde(default)]
    pub files: Vec<FilesOrder>,
}

/// What to do with a point's files through the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FilesOp {
    /// List one path (`/` lists the filesystems).
    Ls,
    /// A tar archive of paths, to download from the server.
    Tar,
}

/// Asks for a point's files (`POST /api/v1/files`): the proxy holding the
/// repository reads them in its file-level restore appliance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilesRequest {
    /// The repository (held by a proxy).
    pub repository: String,
    /// `VM/DISK[@POINT]`.
    pub point: String,
    /// ls or tar.
    pub op: FilesOp,
    /// ls: the path (one; default `/`); tar: the paths (`/FILESYSTEM/PATH`).
    #[serde(default)]
    pub paths: Vec<String>,
}

/// A file request as the server tracks it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FilesJob {
    /// Id.
    pub id: u64,
    /// What was asked.
    pub request: FilesRequest,
    /// The proxy that runs it.
    pub proxy: String,
    /// queued, running, done, failed.
    pub state: String,
    /// When it was asked for (RFC 3339).
    pub created: String,
    /// When it ended.
    pub finished: Option<String>,
    /// ls: the entries (name, path, kind, size, mode, uid, gid, mtime, …).
    pub entries: Option<serde_json::Value>,
    /// tar: the archive's size, to download at `/api/v1/files/{id}/content`.
    pub size: Option<u64>,
    /// Why it failed.
    pub error: Option<String>,
}

impl FilesJob {
    /// Whether it has ended.
    pub fn ended(&self) -> bool {
        matches!(self.state.as_str(), "done" | "failed")
    }
}

/// A file request for a proxy (sent once).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilesOrder {
    /// Request id.
    pub id: u64,
    /// The repository's directory on the proxy.
    pub repository: String,
    /// What to do.
    pub request: FilesRequest,
}

/// How a file request goes, in a proxy's heartbeat (until one carried
/// its end). A tar archive is uploaded before its request is reported
/// done.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FilesStatus {
    /// Request id.
    pub id: u64,
    /// Ended.
    pub done: bool,
    /// ls: the entries.
    pub entries: Option<serde_json::Value>,
    /// Why it failed.
    pub error: Option<String>,
}

/// Asks for an instant recovery (`POST /api/v1/recoveries`): the VM
/// started from its points by the proxy holding the repository, through
/// its host's hypervisor, its disks served from the repository.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecoveryRequest {
    /// The repository (held by a proxy).
    pub repository: String,
    /// The VM (its disks are VM/DISK).
    pub vm: String,
    /// Which points: `VM/DISK[@POINT]` each (default: each disk's newest).
    #[serde(default)]
    pub points: Vec<String>,
    /// The domain to start: `libvirt:///NAME[?uri=…]` (default
    /// `libvirt:///VM-instant` on the mount server's host's hypervisor).
    #[serde(default)]
    pub on: Option<String>,
    /// The proxy to be the mount server (default: the one holding the
    /// repository). Another proxy reads the points from the holder's
    /// repository service, the chunks it reads and no more; then each
    /// point is named `VM/DISK[@POINT]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<String>,
}

/// Moves a recovered VM to production storage while it runs
/// (`POST /api/v1/recoveries/{id}/migrate`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecoveryMigrate {
    /// A directory in one of the proxy's datastores.
    pub to: String,
    /// `raw` (default) or `qcow2`.
    #[serde(default = "raw")]
    pub format: String,
}

fn raw() -> String {
    "raw".into()
}

/// An instant recovery as the server tracks it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Recovery {
    /// Id.
    pub id: u64,
    /// The repository.
    pub repository: String,
    /// The VM.
    pub vm: String,
    /// The proxy serving it (its mount server).
    pub proxy: String,
    /// queued, starting, serving, migrating, stopping (being discarded);
    /// ended: migrated, stopped, discarded, failed.
    pub state: String,
    /// Migration progress (percent).
    pub percent: u8,
    /// A control sent to the proxy and not yet done (migrate, discard).
    pub pending: Option<String>,
    /// When it was asked for (RFC 3339).
    pub created: String,
    /// When it ended.
    pub finished: Option<String>,
    /// The proxy's session (domain, disks, points, overlays, migrated
    /// images, downtime).
    pub session: Option<serde_json::Value>,
    /// What went wrong last (a failed migration leaves it serving).
    pub error: Option<String>,
}

impl Recovery {
    /// Whether it has ended.
    pub fn ended(&self) -> bool {
        matches!(
            self.state.as_str(),
            "migrated" | "stopped" | "discarded" | "failed"
        )
    }

    /// Whether its VM runs from the repository.
    pub fn serves(&self) -> bool {
        self.state == "serving"
    }

    /// Whether the control last asked for (migrate, discard) failed: sent,
    /// and the recovery serves on with an error.
    pub fn control_failed(&self) -> bool {
        self.pending.is_none() && self.serves() && self.error.is_some()
    }
}

/// What a proxy is to do for a recovery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecoveryAction {
    /// Start the VM and serve it.
    Start,
    /// Move it to production storage.
    Migrate,
    /// Power it off and drop its writes.
    Discard,
}

/// An instant recovery order (each sent once).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryOrder {
    /// Recovery id.
    pub id: u64,
    /// What to do.
    pub action: RecoveryAction,
    /// Start: the repository's directory on the proxy.
    #[serde(default)]
    pub repository: String,
    /// Start: the points.
    #[serde(default)]
    pub points: Vec<String>,
    /// Start: the domain's address.
    #[serde(default)]
    pub on: String,
    /// Start: the points are read from this repository service (the
    /// repository is another proxy's); `repository` is then empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceAddress>,
    /// Migrate: where to.
    #[serde(default)]
    pub to: Option<RecoveryMigrate>,
}

/// How a recovery goes, in a proxy's heartbeat: every one it serves, and
/// each ended one until a heartbeat carried it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecoveryStatus {
    /// Recovery id.
    pub id: u64,
    /// The session's state (starting, serving, migrating, stopping;
    /// ended: migrated, stopped, discarded, failed).
    pub state: String,
    /// Migration progress.
    pub percent: u8,
    /// Ended: no longer served.
    pub done: bool,
    /// The session.
    pub session: Option<serde_json::Value>,
    /// What went wrong last.
    pub error: Option<String>,
}

/// What to do with a VM's replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplicaAction {
    /// Start the VM on its replicas.
    Failover,
    /// Stop and remove the VM a failover started; its writes are dropped
    /// at the next update.
    Undo,
    /// Move the replica VM's changes back to the original VM and start it.
    Failback,
}

impl ReplicaAction {
    /// The name in the API and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            ReplicaAction::Failover => "failover",
            ReplicaAction::Undo => "undo",
            ReplicaAction::Failback => "failback",
        }
    }
}

fn yes() -> bool {
    true
}

/// `POST /api/v1/jobs/{name}/replicas`: an operation on the replicas of
/// one VM of a replication (or migration) job, run by the proxy that
/// holds the job's repository, through its host's hypervisor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaRequest {
    /// failover, undo or failback.
    pub action: ReplicaAction,
    /// The VM (its disks are VM/DISK in the job's repository).
    pub vm: String,
    /// The replica VM: `libvirt:///NAME[?uri=…]` (default
    /// `libvirt:///VM-replica` on the holding host's hypervisor).
    #[serde(default)]
    pub on: Option<String>,
    /// Failback: the original VM (default: the VM where the inventory
    /// shows it, through its hypervisor's connection).
    #[serde(default)]
    pub to: Option<String>,
    /// Start the VM (failover, failback).
    #[serde(default = "yes")]
    pub start: bool,
}

/// An operation on a VM's replicas, as the server tracks it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Operation {
    /// Id.
    pub id: u64,
    /// The job whose replicas it works on.
    pub job: String,
    /// What it does.
    pub action: ReplicaAction,
    /// The VM.
    pub vm: String,
    /// The proxy that runs it.
    pub proxy: String,
    /// queued, running, done, failed.
    pub state: String,
    /// When it was asked for (RFC 3339).
    pub created: String,
    /// When it ended.
    pub finished: Option<String>,
    /// What it did (done): the replica VM, or the failback report.
    pub result: Option<serde_json::Value>,
    /// Why it failed.
    pub error: Option<String>,
}

/// An operation a proxy is ordered to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperationOrder {
    /// Operation id.
    pub id: u64,
    /// What to do.
    pub action: ReplicaAction,
    /// The VM.
    pub vm: String,
    /// The repository's directory on the proxy (replicas beside it).
    pub repository: String,
    /// The replica VM's address.
    pub on: String,
    /// Failback: the original VM's address.
    pub to: Option<String>,
    /// Start the VM.
    pub start: bool,
}

/// How an operation goes, in a proxy's heartbeat: every one it runs
/// (`done` false), and each ended one until a heartbeat carried it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OperationStatus {
    /// Operation id.
    pub id: u64,
    /// Ended.
    pub done: bool,
    /// What it did (ended well).
    pub result: Option<serde_json::Value>,
    /// Why it failed.
    pub error: Option<String>,
}

/// A repository a proxy serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServedRepository {
    /// Name.
    pub name: String,
    /// Directory on the proxy.
    pub path: String,
    /// Who may use it now, and for what: one grant per task the server
    /// has assigned that writes to it. The service admits nobody else.
    #[serde(default)]
    pub grants: Vec<Grant>,
}

/// Leave for one peer to use one disk of a served repository, for one
/// task: the server derives it from its assignments and sends it to the
/// repository's proxy with every heartbeat answer, so removing a host,
/// its role or its task withdraws it within a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// The task it is for.
    pub task: u64,
    /// The peer: the SHA-256 fingerprint of its certificate (DER).
    pub peer: String,
    /// The disk it may read the newest point of and write a point of.
    pub disk: DiskName,
    /// Whether its commits bring the disk's replica image up to date
    /// (replication and migration jobs).
    pub replica: bool,
    /// A migration task: it may start its VM on the replicas (the
    /// service's host's hypervisor) once its final sync is in.
    #[serde(default)]
    pub start: bool,
    /// A read grant (an instant recovery another proxy serves; `task` is
    /// the recovery's id): the peer may read the disk's points (only
    /// `point`, when set) and write nothing. No other grant reads.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read: bool,
    /// The point a read grant is for (an id or its prefix, as asked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub point: Option<String>,
}

/// A task for a proxy.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskOrder {
    /// Task id.
    pub task: u64,
    /// Attempt (results of an older attempt are refused).
    pub attempt: u32,
    /// Kind.
    pub kind: JobKind,
    /// Disk name in the repository.
    pub disk: DiskName,
    /// Source spec.
    pub source: String,
    /// VM disk node, for VM sources.
    pub vm_disk: Option<String>,
    /// Repository directory (when written locally).
    pub repository: String,
    /// Transport: `auto` or a pinned mode.
    pub transport: String,
    /// Failover to network mode.
    pub failover_to_network: bool,
    /// Write through this repository service instead of the directory.
    #[serde(default)]
    pub service: Option<ServiceAddress>,
    /// Why the repository service cannot be reached (its proxy runs none).
    #[serde(default)]
    pub service_error: Option<String>,
    /// Restore: the point.
    #[serde(default)]
    pub point: Option<String>,
    /// Restore: write over a file or device that exists (the job's
    /// `overwrite`); without it such a target is refused.
    #[serde(default)]
    pub overwrite: bool,
    /// This proxy holds the task's repository (named here) and writes it
    /// directly: it signs the result's [`Receipt`] itself.
    #[serde(default)]
    pub receipt_for: Option<String>,
    /// VM disks: `auto`, `required` or `off` (the job's `quiesce`).
    #[serde(default = "auto")]
    pub quiesce: String,
    /// Migration of a libvirt VM: the domain's name on the target
    /// (default: the VM's).
    #[serde(default)]
    pub start_as: Option<String>,
}

/// How a task ended on the proxy.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskResult {
    /// Task id.
    pub task: u64,
    /// Attempt.
    pub attempt: u32,
    /// The point, when it succeeded.
    pub point: Option<PointId>,
    /// Mode used.
    pub mode: Option<String>,
    /// Bottleneck.
    pub bottleneck: Option<String>,
    /// Bytes read.
    pub bytes_read: u64,
    /// Bytes stored.
    pub bytes_stored: u64,
    /// Bytes on the wire to a repository service.
    #[serde(default)]
    pub wire_bytes: u64,
    /// The replica image updated (replication, migration).
    #[serde(default)]
    pub replica: Option<String>,
    /// Disk size.
    pub total: u64,
    /// The error, when it failed.
    pub error: Option<String>,
    /// Whether retrying cannot help (bad input).
    pub permanent: bool,
    /// For a point written through a repository service: the service's
    /// signed receipt for it, which the server checks before the task
    /// counts as a success.
    #[serde(default)]
    pub receipt: Option<Receipt>,
    /// VM disks: the point's consistency (application or crash, why, and
    /// how long the guest was frozen).
    #[serde(default)]
    pub consistency: Option<datamover::Consistency>,
}

/// A repository service's statement, signed with its host's key, that it
/// published a point for a task: the server takes a task's success on a
/// repository a proxy holds only with a receipt that verifies under that
/// proxy's certificate and names the task, repository, disk, point and
/// size the result claims.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The task the point was written for (the grant's).
    pub task: u64,
    /// The repository.
    pub repository: String,
    /// The disk.
    pub disk: DiskName,
    /// The point published.
    pub point: PointId,
    /// Its disk size in bytes.
    pub size: u64,
    /// ECDSA P-256 / SHA-256 signature (hex, fixed-size r||s) over
    /// [`Receipt::signed_bytes`].
    pub signature: String,
}

impl Receipt {
    /// A receipt for `point` of `disk` in `repository`, written for
    /// `task`, signed with `by`'s key.
    pub fn signed(
        by: &crate::pki::Identity,
        task: u64,
        repository: &str,
        disk: &DiskName,
        point: &PointId,
        size: u64,
    ) -> crate::pki::Result<Receipt> {
        let mut r = Receipt {
            task,
            repository: repository.to_string(),
            disk: disk.clone(),
            point: point.clone(),
            size,
            signature: String::new(),
        };
        r.signature = by.sign(&r.signed_bytes())?;
        Ok(r)
    }

    /// Whether the key of the PEM certificate `cert_pem` signed it.
    pub fn signed_by(&self, cert_pem: &str) -> bool {
        crate::pki::verify_signature(cert_pem, &self.signed_bytes(), &self.signature)
    }

    /// The bytes signed: a versioned, line-separated form of the fields.
    pub fn signed_bytes(&self) -> Vec<u8> {
        format!(
            "dm-receipt/1\n{}\n{}\n{}\n{}\n{}\n",
            self.task, self.repository, self.disk, self.point, self.size
        )
        .into_bytes()
    }
}

/// Where a repository service is and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceAddress {
    /// `host:port` to connect to.
    pub address: String,
    /// The name its certificate is checked against.
    pub server_name: String,
    /// The repository's name.
    pub repository: String,
    /// Keep the disks' replica images up to date (replication).
    #[serde(default)]
    pub replica: bool,
    /// The task the connection is for (it selects the grant, and so the
    /// receipt's task, when a host has several for one disk).
    #[serde(default)]
    pub task: Option<u64>,
}

/// The REST API's paths, built in one place (names are path segments the
/// server checks: letters, digits, `.`, `_`, `-`).
pub mod paths {
    use super::API;

    /// `/api/v1/ca` (open: the CA certificate).
    pub fn ca() -> String {
        format!("{API}/ca")
    }
    /// `/api/v1/enroll` (open with a one-time secret).
    pub fn enroll() -> String {
        format!("{API}/enroll")
    }
    /// `/api/v1/hosts`.
    pub fn hosts() -> String {
        format!("{API}/hosts")
    }
    /// `/api/v1/hosts/{name}`.
    pub fn host(name: &str) -> String {
        format!("{API}/hosts/{name}")
    }
    /// `/api/v1/vms` (the VM inventory).
    pub fn vms() -> String {
        format!("{API}/vms")
    }
    /// `/api/v1/proxies`.
    pub fn proxies() -> String {
        format!("{API}/proxies")
    }
    /// `/api/v1/proxies/{name}`.
    pub fn proxy(name: &str) -> String {
        format!("{API}/proxies/{name}")
    }
    /// `/api/v1/repositories`.
    pub fn repositories() -> String {
        format!("{API}/repositories")
    }
    /// `/api/v1/jobs`.
    pub fn jobs() -> String {
        format!("{API}/jobs")
    }
    /// `/api/v1/jobs/{name}`.
    pub fn job(name: &str) -> String {
        format!("{API}/jobs/{name}")
    }
    /// `/api/v1/jobs/{name}/run`.
    pub fn job_run(name: &str) -> String {
        format!("{API}/jobs/{name}/run")
    }
    /// `/api/v1/jobs/{name}/replicas` (failover, undo, failback).
    pub fn job_replicas(name: &str) -> String {
        format!("{API}/jobs/{name}/replicas")
    }
    /// `/api/v1/files`.
    pub fn files() -> String {
        format!("{API}/files")
    }
    /// `/api/v1/files/{id}`.
    pub fn files_job(id: u64) -> String {
        format!("{API}/files/{id}")
    }
    /// `/api/v1/files/{id}/content` (a tar request's archive).
    pub fn files_content(id: u64) -> String {
        format!("{API}/files/{id}/content")
    }
    /// `/agent/v1/files/{id}/content`: where the proxy uploads it.
    pub fn agent_files_content(id: u64) -> String {
        format!("{}/files/{id}/content", super::AGENT)
    }
    /// `/api/v1/recoveries`.
    pub fn recoveries() -> String {
        format!("{API}/recoveries")
    }
    /// `/api/v1/recoveries/{id}`.
    pub fn recovery(id: u64) -> String {
        format!("{API}/recoveries/{id}")
    }
    /// `/api/v1/recoveries/{id}/{action}` (migrate, discard).
    pub fn recovery_action(id: u64, action: &str) -> String {
        format!("{API}/recoveries/{id}/{action}")
    }
    /// `/api/v1/operations`.
    pub fn operations() -> String {
        format!("{API}/operations")
    }
    /// `/api/v1/operations/{id}`.
    pub fn operation(id: u64) -> String {
        format!("{API}/operations/{id}")
    }
    /// `/api/v1/sessions?limit={limit}`.
    pub fn sessions(limit: u32) -> String {
        format!("{API}/sessions?limit={limit}")
    }
    /// `/api/v1/sessions/{id}`.
    pub fn session(id: u64) -> String {
        format!("{API}/sessions/{id}")
    }
    /// `/api/v1/tokens`.
    pub fn tokens() -> String {
        format!("{API}/tokens")
    }
    /// `/api/v1/tokens/{name}`.
    pub fn token(name: &str) -> String {
        format!("{API}/tokens/{name}")
    }
    /// `/api/v1/audit?limit={limit}`.
    pub fn audit(limit: u32) -> String {
        format!("{API}/audit?limit={limit}")
    }
}

/// What an API token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TokenRole {
    /// Everything: hosts, proxies, repositories, jobs, tokens, the audit log.
    Admin,
    /// Reads everything but tokens and the audit log; runs jobs; creates
    /// restore jobs.
    Operator,
    /// Reads everything, the audit log included; changes nothing.
    Auditor,
}

impl TokenRole {
    /// Lower-case name.
    pub fn as_str(&self) -> &'static str {
        match self {
            TokenRole::Admin => "admin",
            TokenRole::Operator => "operator",
            TokenRole::Auditor => "auditor",
        }
    }
}

impl std::fmt::Display for TokenRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for TokenRole {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "admin" => Ok(TokenRole::Admin),
            "operator" => Ok(TokenRole::Operator),
            "auditor" => Ok(TokenRole::Auditor),
            _ => Err(format!(
                "unknown token role {s:?}: use admin, operator or auditor"
            )),
        }
    }
}

/// A token to create.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    /// Unique name (who the audit log says acted).
    pub name: String,
    /// What it may do.
    pub role: TokenRole,
    /// Days until it expires (1-3650; default 90).
    #[serde(default)]
    pub expires_days: Option<u32>,
}

/// An API token as listed (never its secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiToken {
    /// Name.
    pub name: String,
    /// Role.
    pub role: TokenRole,
    /// When it was made (RFC 3339).
    pub created: String,
    /// When it stops working (RFC 3339); none: never (the first token,
    /// until rotated).
    pub expires: Option<String>,
}

/// A token just made: the only time its secret is shown.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenCreated {
    /// The token.
    #[serde(flatten)]
    pub token: ApiToken,
    /// The bearer secret (`dmt1.…`).
    pub secret: String,
}

/// One entry of the audit log: a change or a restore, who made it, when.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Sequence number.
    pub id: u64,
    /// When (RFC 3339).
    pub at: String,
    /// Who: `token:NAME`, `host:NAME`, or `enrollment`.
    pub who: String,
    /// What: the method and path, e.g. `POST /api/v1/jobs/nightly/run`.
    pub action: String,
    /// The answer's status.
    pub status: u16,
}
