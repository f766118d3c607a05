//! A running VM's disks, driven over QMP: list them, freeze one (an
//! external overlay or an internal snapshot) with its checkpoint bitmaps
//! rotated in the same `transaction`, export the frozen disk over NBD, and
//! undo it all afterwards, on success, error or a run killed earlier.
//!
//! Checkpoints: every point taken from a VM starts a persistent dirty
//! bitmap `dm-cp-<stamp>` on the disk at the instant its data is frozen
//! (non-persistent on raw images, which cannot store bitmaps: those
//! checkpoints do not survive a VM restart). The next backup reads its
//! changes from the checkpoint its parent point started: a disabled copy
//! `dm-x-<stamp>` of it, made in the same transaction, is exported with
//! the frozen disk. A successful run removes the older checkpoints; a
//! failed one removes the one it started, so the parent's checkpoint still
//! covers everything since the parent.
//!
//! Writes the VM makes while frozen go to the overlay; committing it back
//! (`block-commit` + `job-complete`) writes them into the disk, where the
//! enabled checkpoint bitmaps record them.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::qmp::{Qmp, QmpAddr};
use datamover::{Error, Result, TransportKind};

/// Prefix of everything this module creates in a VM (bitmaps, nodes,
/// exports, snapshots, jobs): leftovers of a killed run are found by it.
pub const PREFIX: &str = "dm-";
const CHECKPOINT: &str = "dm-cp-";
const EXPORT_COPY: &str = "dm-x-";
const OVERLAY: &str = "dm-ov-";
const INTERNAL: &str = "dm-snap-";

/// A VM address: `qmp+unix:///path/to/qmp.sock` or `qmp://host:port`,
/// with optional parameters after `?`:
/// * `nbd-server=PATH|HOST:PORT`: the VM's NBD server, when it already
///   runs one (a VM process has at most one); otherwise the backup starts
///   one for the run and stops it afterwards;
/// * `nbd-port=N`: port for the NBD server started on a TCP VM (10809);
/// * `overlay-dir=PATH`: where the VM host keeps overlays while a disk is
///   frozen (default: next to the disk's image file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmAddress {
    /// The address as given.
    pub spec: String,
    /// The QMP monitor.
    pub qmp: QmpAddr,
    /// The VM's running NBD server, if any.
    pub nbd_server: Option<String>,
    /// Port for an NBD server started on a TCP VM.
    pub nbd_port: u16,
    /// Directory for overlays.
    pub overlay_dir: Option<PathBuf>,
}

/// Whether `spec` names a VM.
pub fn is_vm(spec: &str) -> bool {
    spec.starts_with("qmp://") || spec.starts_with("qmp+unix://")
}

impl VmAddress {
    /// Parse a VM address.
    pub fn parse(spec: &str) -> Result<VmAddress> {
        let bad = |why: &str| {
            Error::InvalidArgument(format!(
                "bad VM address {spec:?}: {why} (qmp+unix:///path/to/qmp.sock or qmp://host:port, optionally ?nbd-server=…&overlay-dir=…)"
            ))
        };
        let (base, query) = spec.split_once('?').unwrap_or((spec, ""));
        let qmp = if let Some(p) = base.strip_prefix("qmp+unix://") {
            if !p.starts_with('/') {
                return Err(bad("the socket path must be absolute"));
            }
            QmpAddr::Unix(PathBuf::from(p))
        } else if let Some(hp) = base.strip_prefix("qmp://") {
            let hp = hp.trim_end_matches('/');
            match hp.rsplit_once(':') {
                Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok() => {
                    QmpAddr::Tcp(hp.to_string())
                }
                _ => return Err(bad("give host:port")),
            }
        } else {
            return Err(bad("unknown scheme"));
        };
        let mut a = VmAddress {
            spec: spec.to_string(),
            qmp,
            nbd_server: None,
            nbd_port: 10809,
            overlay_dir: None,
        };
        for kv in query.split('&').filter(|s| !s.is_empty()) {
            match kv.split_once('=') {
                Some(("nbd-server", v)) if !v.is_empty() => a.nbd_server = Some(v.to_string()),
                Some(("nbd-port", v)) => {
                    a.nbd_port = v
                        .parse()
                        .map_err(|_| bad("nbd-port must be a port number"))?
                }
                Some(("overlay-dir", v)) if v.starts_with('/') => {
                    a.overlay_dir = Some(PathBuf::from(v))
                }
                _ => return Err(bad(&format!("unknown or empty parameter {kv:?}"))),
            }
        }
        Ok(a)
    }

    /// Whether the VM runs on this host (its monitor is a unix socket or a
    /// loopback address): the condition for HotAdd.
    pub fn is_local(&self) -> bool {
        match &self.qmp {
            QmpAddr::Unix(_) => true,
            QmpAddr::Tcp(hp) => {
                let host = hp.rsplit_once(':').map_or(hp.as_str(), |h| h.0);
                let host = host.trim_start_matches('[').trim_end_matches(']');
                host == "localhost"
                    || host
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            }
        }
    }
}

/// A dirty bitmap on a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    /// Name.
    pub name: String,
    /// Whether it records writes.
    pub recording: bool,
    /// Whether it is stored in the image (qcow2).
    pub persistent: bool,
}

/// One disk of a VM: its top block node as QEMU reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskInfo {
    /// Node name of the top (active) node.
    pub node: String,
    /// Device name (qemu-system), or the export id (qemu-storage-daemon).
    pub device: Option<String>,
    /// Format driver: "qcow2", "raw", ...
    pub driver: String,
    /// The image file or block device holding the data, as the VM host
    /// names it.
    pub file: Option<PathBuf>,
    /// Virtual size in bytes.
    pub size: u64,
    /// Whether the image has a backing file.
    pub backing: bool,
    /// Dirty bitmaps on the node.
    pub bitmaps: Vec<Bitmap>,
    /// Names of internal snapshots (qcow2).
    pub snapshots: Vec<String>,
}

impl DiskInfo {
    fn from_node(n: &Value, device: Option<String>) -> Option<DiskInfo> {
        let node = n["node-name"].as_str()?.to_string();
        let image = &n["image"];
        let mut bitmaps: Vec<Bitmap> = n["dirty-bitmaps"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|b| {
                        Some(Bitmap {
                            name: b["name"].as_str()?.to_string(),
                            recording: b["recording"].as_bool().unwrap_or(false),
                            persistent: b["persistent"].as_bool().unwrap_or(false),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        bitmaps.sort_by(|a, b| a.name.cmp(&b.name));
        Some(DiskInfo {
            node,
            device,
            driver: n["drv"].as_str().unwrap_or("?").to_string(),
            file: n["file"]
                .as_str()
                .filter(|f| !f.is_empty())
                .map(PathBuf::from),
            size: image["virtual-size"].as_u64().unwrap_or(0),
            backing: image.get("backing-image").is_some()
                || image.get("backing-filename").is_some(),
            bitmaps,
            snapshots: image["snapshots"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s["name"].as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default(),
        })
    }

    fn backing_file(n: &Value) -> Option<&str> {
        n["image"]["backing-image"]["filename"]
            .as_str()
            .or_else(|| n["image"]["backing-filename"].as_str())
    }

    /// What `dm vm-disks --json` and Python's `vm_disks()` show of a disk.
    pub fn summary(&self) -> Value {
        json!({
            "node": self.node, "device": self.device, "format": self.driver,
            "file": self.file, "size": self.size, "backing": self.backing,
            "checkpoints": self.checkpoints().map(|b| &b.name).collect::<Vec<_>>(),
        })
    }

    /// The checkpoints on this disk, oldest first.
    pub fn checkpoints(&self) -> impl Iterator<Item = &Bitmap> {
        self.bitmaps
            .iter()
            .filter(|b| b.name.starts_with(CHECKPOINT))
    }

    /// Whether the VM host's image path is visible here, readable, and
    /// holds as many bytes as a raw disk needs.
    pub fn visible_here(&self) -> std::result::Result<&Path, String> {
        let Some(f) = &self.file else {
            return Err(format!("QEMU names no image file for node {}", self.node));
        };
        match std::fs::File::open(f) {
            Ok(_) => Ok(f.as_path()),
            Err(e) => Err(format!(
                "{} is not visible from this proxy: {e}",
                f.display()
            )),
        }
    }
}

/// The disks among `nodes` whose top nodes are `roots`.
fn disks_of(nodes: &[Value], roots: Vec<(String, Option<String>)>) -> Vec<DiskInfo> {
    roots
        .into_iter()
        .filter_map(|(node, dev)| {
            let n = nodes.iter().find(|n| n["node-name"] == node.as_str())?;
            DiskInfo::from_node(n, dev)
        })
        .collect()
}

/// A VM, connected over QMP.
#[derive(Debug)]
pub struct Vm {
    qmp: Qmp,
    addr: VmAddress,
    timeout: Duration,
}

impl Vm {
    /// Connect to the VM's monitor.
    pub fn connect(addr: VmAddress, timeout: Duration) -> Result<Vm> {
        let qmp = Qmp::connect(&addr.qmp, timeout)?;
        Ok(Vm { qmp, addr, timeout })
    }

    /// The VM's address.
    pub fn address(&self) -> &VmAddress {
        &self.addr
    }

    /// Its monitor.
    pub fn qmp(&mut self) -> &mut Qmp {
        &mut self.qmp
    }

    fn nodes(&mut self) -> Result<Vec<Value>> {
        let v = self
            .qmp
            .execute("query-named-block-nodes", json!({"flat": true}))?;
        Ok(v.as_array().cloned().unwrap_or_default())
    }

    /// Top nodes of the VM's disks with their device names: from
    /// `query-block` (qemu-system) and `query-block-exports`
    /// (qemu-storage-daemon; ours excluded).
    fn roots(&mut self) -> Result<Vec<(String, Option<String>)>> {
        let mut out: Vec<(String, Option<String>)> = Vec::new();
        let mut push = |node: &str, dev: Option<String>| {
            if !out.iter().any(|o| o.0 == node) {
                out.push((node.to_string(), dev));
            }
        };
        if let Ok(Value::Array(devs)) = self.qmp.try_execute("query-block", json!({}))? {
            for d in devs {
                if let Some(node) = d["inserted"]["node-name"].as_str() {
                    let dev = d["qdev"]
                        .as_str()
                        .or(d["device"].as_str())
                        .filter(|s| !s.is_empty());
                    push(node, dev.map(str::to_string));
                }
            }
        }
        if let Ok(Value::Array(ex)) = self.qmp.try_execute("query-block-exports", json!({}))? {
            for e in ex {
                let id = e["id"].as_str().unwrap_or_default();
                if let (Some(node), false) = (e["node-name"].as_str(), id.starts_with(PREFIX)) {
                    push(node, Some(id.to_string()));
                }
            }
        }
        Ok(out)
    }

    /// The VM's disks.
    pub fn disks(&mut self) -> Result<Vec<DiskInfo>> {
        let nodes = self.nodes()?;
        let roots = self.roots()?;
        Ok(disks_of(&nodes, roots))
    }

    fn node_info(&mut self, node: &str) -> Result<DiskInfo> {
        let nodes = self.nodes()?;
        nodes
            .iter()
            .find(|n| n["node-name"] == node)
            .and_then(|n| DiskInfo::from_node(n, None))
            .ok_or_else(|| self.err(format!("node {node} vanished")))
    }

    fn err(&self, detail: String) -> Error {
        Error::transport(self.addr.spec.clone(), TransportKind::Refused, detail)
    }

    /// Find a disk by device name, export id or node name, after undoing
    /// what a killed run may have left on it (an overlay still active, our
    /// exports, export copies of bitmaps, internal snapshots).
    pub fn disk(&mut self, name: &str) -> Result<DiskInfo> {
        let mut nodes = self.nodes()?;
        let mut roots = self.roots()?;
        // A killed run's overlay on top of the named node: commit it first.
        let mut committed = false;
        if let Some(n) = nodes.iter().find(|n| n["node-name"] == name) {
            let file = n["file"].as_str().unwrap_or_default();
            for (root, _) in &roots {
                let Some(rn) = nodes.iter().find(|n| n["node-name"] == root.as_str()) else {
                    continue;
                };
                if root.starts_with(OVERLAY) && DiskInfo::backing_file(rn) == Some(file) {
                    tracing::warn!(overlay = %root, "committing the overlay a killed run left");
                    self.commit(root)?;
                    committed = true;
                    if let (Some(f), true) = (rn["file"].as_str(), self.addr.is_local()) {
                        let _ = std::fs::remove_file(f);
                    }
                }
            }
        }
        if committed {
            nodes = self.nodes()?;
            roots = self.roots()?;
        }
        let disks = disks_of(&nodes, roots);
        let found = disks
            .iter()
            .find(|d| d.node == name || d.device.as_deref() == Some(name))
            .cloned()
            .or_else(|| {
                // A format node named directly (a VM whose disks are neither
                // devices nor exports).
                nodes
                    .iter()
                    .find(|n| n["node-name"] == name && !is_protocol(n["drv"].as_str()))
                    .and_then(|n| DiskInfo::from_node(n, None))
            });
        let disk = match found {
            Some(d) => d,
            None => {
                let known: Vec<String> = disks
                    .iter()
                    .map(|d| match &d.device {
                        Some(dev) if dev != &d.node => format!("{} (node {})", dev, d.node),
                        _ => d.node.clone(),
                    })
                    .collect();
                return Err(Error::InvalidArgument(format!(
                    "{}: the VM has no disk {name:?}; its disks: {}",
                    self.addr.spec,
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                )));
            }
        };
        // Our exports and export copies are never in use between runs.
        if let Ok(Value::Array(ex)) = self.qmp.try_execute("query-block-exports", json!({}))? {
            for e in ex {
                if let Some(id) = e["id"].as_str().filter(|i| i.starts_with(PREFIX)) {
                    self.del_export(id)?;
                }
            }
        }
        for b in disk
            .bitmaps
            .iter()
            .filter(|b| b.name.starts_with(EXPORT_COPY))
        {
            self.qmp.execute(
                "block-dirty-bitmap-remove",
                json!({"node": disk.node, "name": b.name}),
            )?;
        }
        for s in disk.snapshots.iter().filter(|s| s.starts_with(INTERNAL)) {
            self.qmp.execute(
                "blockdev-snapshot-delete-internal-sync",
                json!({"device": disk.node, "name": s}),
            )?;
        }
        self.node_info(&disk.node).map(|mut d| {
            d.device = disk.device;
            d
        })
    }

    fn del_export(&mut self, id: &str) -> Result<()> {
        if let Err(f) = self
            .qmp
            .try_execute("block-export-del", json!({"id": id, "mode": "hard"}))?
        {
            if !f.desc.contains("not found") && !f.desc.contains("shutting down") {
                return Err(self.err(format!("removing export {id}: {}", f.desc)));
            }
        }
        // Deleting is asynchronous: wait until it is gone.
        let deadline = Instant::now() + self.timeout;
        loop {
            let ex = self.qmp.execute("query-block-exports", json!({}))?;
            if !ex
                .as_array()
                .is_some_and(|a| a.iter().any(|e| e["id"] == id))
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(self.err(format!("export {id} was not removed in time")));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Commit the active overlay `top` into its backing node and wait for
    /// the job (`block-commit`, ready, `job-complete`, concluded).
    fn commit(&mut self, top: &str) -> Result<()> {
        let job = format!("{PREFIX}commit-{}", stamp());
        self.qmp.execute(
            "block-commit",
            json!({"job-id": job, "device": top, "auto-dismiss": false}),
        )?;
        let mut completed = false;
        loop {
            let jobs = self.qmp.execute("query-jobs", json!({}))?;
            let Some(j) = jobs
                .as_array()
                .and_then(|a| a.iter().find(|j| j["id"] == job.as_str()))
                .cloned()
            else {
                return Err(self.err(format!("commit job {job} vanished")));
            };
            match j["status"].as_str().unwrap_or_default() {
                "ready" if !completed => {
                    self.qmp.execute("job-complete", json!({"id": job}))?;
                    completed = true;
                }
                "concluded" => {
                    self.qmp.execute("job-dismiss", json!({"id": job}))?;
                    return match j["error"].as_str() {
                        None => Ok(()),
                        Some(e) => Err(self.err(format!(
                            "committing overlay {top} failed: {e}; the VM still runs on the overlay"
                        ))),
                    };
                }
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// Freeze `disk`: in one transaction, copy the checkpoint `since` (if
    /// the disk has it) for export, start a new checkpoint, and take the
    /// snapshot `how` asks for. [`Frozen::export_uri`] then exports the
    /// frozen disk read-only over NBD (with the copied checkpoint).
    pub fn freeze(mut self, disk: &DiskInfo, how: Hold, since: Option<&str>) -> Result<Frozen> {
        let st = stamp();
        let checkpoint = format!("{CHECKPOINT}{st}");
        let have_since = since.filter(|s| disk.bitmaps.iter().any(|b| b.name == *s));
        let tmp = have_since.map(|_| format!("{EXPORT_COPY}{st}"));
        let mut actions = Vec::new();
        if let (Some(t), Some(s)) = (&tmp, have_since) {
            actions.push(json!({"type": "block-dirty-bitmap-add",
                "data": {"node": disk.node, "name": t, "disabled": true, "persistent": false}}));
            actions.push(json!({"type": "block-dirty-bitmap-merge",
                "data": {"node": disk.node, "target": t, "bitmaps": [s]}}));
        }
        actions.push(json!({"type": "block-dirty-bitmap-add",
            "data": {"node": disk.node, "name": checkpoint, "persistent": disk.driver == "qcow2"}}));
        let (mut overlay, mut internal) = (None, None);
        match how {
            Hold::Overlay => {
                let dir = match (&self.addr.overlay_dir, &disk.file) {
                    (Some(d), _) => d.clone(),
                    (None, Some(f)) if !f.starts_with("/dev/") => {
                        f.parent().map(Path::to_path_buf).unwrap_or_default()
                    }
                    _ => {
                        return Err(Error::InvalidArgument(format!(
                            "{}: disk {} is not an image file; give the VM host's overlay directory with ?overlay-dir=/path in the VM address",
                            self.addr.spec, disk.node
                        )));
                    }
                };
                let path = dir.join(format!("{}.{OVERLAY}{st}.qcow2", disk.node));
                let node = format!("{OVERLAY}{st}");
                actions.push(json!({"type": "blockdev-snapshot-sync", "data": {
                    "node-name": disk.node, "snapshot-file": path, "snapshot-node-name": node,
                    "format": "qcow2"}}));
                overlay = Some((node, path));
            }
            Hold::Internal => {
                if disk.driver != "qcow2" {
                    return Err(Error::Unsupported(format!(
                        "internal snapshots need a qcow2 disk; {} is {}",
                        disk.node, disk.driver
                    )));
                }
                let name = format!("{INTERNAL}{st}");
                actions.push(json!({"type": "blockdev-snapshot-internal-sync",
                    "data": {"device": disk.node, "name": name}}));
                internal = Some(name);
            }
        }
        let frozen = self.qmp.execute("transaction", json!({"actions": actions}));
        if let (Err(_), Some((_, path)), true) = (&frozen, &overlay, self.addr.is_local()) {
            // QEMU may have created the overlay file before the transaction failed.
            let _ = std::fs::remove_file(path);
        }
        frozen.map_err(|e| match e {
            Error::Transport {
                address,
                kind,
                detail,
                source,
            } => Error::Transport {
                address,
                kind,
                detail: format!("freezing disk {}: {detail}", disk.node),
                source,
            },
            e => e,
        })?;
        if let Some((node, path)) = &overlay {
            // A disk nothing uses (no device, no export) drops the overlay
            // at once: there is then nothing to commit.
            if !self
                .nodes()?
                .iter()
                .any(|n| n["node-name"] == node.as_str())
            {
                tracing::info!(disk = %disk.node, "the disk has no users; no overlay kept");
                if self.addr.is_local() {
                    let _ = std::fs::remove_file(path);
                }
                overlay = None;
            }
        }
        Ok(Frozen {
            vm: self,
            disk: disk.clone(),
            checkpoint,
            tmp,
            overlay,
            internal,
            export: None,
            server: None,
            finished: false,
        })
    }
}

/// Protocol drivers: nodes that hold bytes of an image, not a disk.
fn is_protocol(drv: Option<&str>) -> bool {
    matches!(
        drv,
        None | Some(
            "file"
                | "host_device"
                | "host_cdrom"
                | "nbd"
                | "iscsi"
                | "rbd"
                | "ssh"
                | "http"
                | "https"
        )
    )
}

/// How a disk is held still while it is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// An external overlay takes the VM's writes (a VM snapshot).
    Overlay,
    /// A qcow2 internal snapshot (the disk keeps taking writes).
    Internal,
}

/// A unique stamp for names (also of local files), sortable by time: milliseconds since the
/// epoch in hex (11 digits until the year 2527) and a random suffix. QEMU
/// node names are at most 31 characters.
pub(crate) fn stamp() -> String {
    let mut r = [0u8; 2];
    let _ = getrandom::fill(&mut r);
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    format!("{ms:011x}-{:04x}", u16::from_le_bytes(r))
}

/// An NBD server this run started in the VM (stopped afterwards).
#[derive(Debug)]
struct Server {
    dir: Option<PathBuf>,
}

/// A frozen disk of a running VM: undone by [`Frozen::finish`], or on drop
/// (as a failed run).
#[derive(Debug)]
pub struct Frozen {
    vm: Vm,
    disk: DiskInfo,
    checkpoint: String,
    tmp: Option<String>,
    overlay: Option<(String, PathBuf)>,
    internal: Option<String>,
    export: Option<(String, String)>,
    server: Option<Server>,
    finished: bool,
}

impl Frozen {
    /// The disk as it was frozen (its node holds the frozen data unless an
    /// internal snapshot does).
    pub fn disk(&self) -> &DiskInfo {
        &self.disk
    }
    /// The checkpoint this run started.
    pub fn checkpoint(&self) -> &str {
        &self.checkpoint
    }
    /// The VM's address.
    pub fn address(&self) -> &VmAddress {
        &self.vm.addr
    }
    /// The internal snapshot holding the data, if that is how it is held.
    pub fn internal_snapshot(&self) -> Option<&str> {
        self.internal.as_deref()
    }
    /// Name of the bitmap exported with the disk (the parent's checkpoint
    /// as it was when frozen), when there is one.
    pub fn exported_bitmap(&self) -> Option<&str> {
        self.tmp.as_deref()
    }
    /// The NBD address of the frozen disk, exporting it on first use.
    pub fn export_uri(&mut self) -> Result<String> {
        if let Some((_, uri)) = &self.export {
            return Ok(uri.clone());
        }
        let base = match (&self.vm.addr.nbd_server, &self.vm.addr.qmp) {
            (Some(s), _) if s.starts_with('/') => format!("nbd+unix:///{{}}?socket={s}"),
            (Some(s), _) => format!("nbd://{s}/{{}}"),
            (None, QmpAddr::Unix(_)) => {
                let dir = std::env::temp_dir().join(format!("{PREFIX}nbd-{}", stamp()));
                std::fs::create_dir(&dir).map_err(|e| Error::io("create", &dir, e))?;
                let sock = dir.join("nbd.sock");
                self.server = Some(Server { dir: Some(dir) });
                self.start_server(json!({"type": "unix", "data": {"path": sock}}))?;
                format!("nbd+unix:///{{}}?socket={}", sock.display())
            }
            (None, QmpAddr::Tcp(hp)) => {
                let host = hp.rsplit_once(':').map_or(hp.as_str(), |h| h.0).to_string();
                self.server = Some(Server { dir: None });
                let port = self.vm.addr.nbd_port;
                self.start_server(
                    json!({"type": "inet", "data": {"host": host, "port": port.to_string()}}),
                )?;
                format!("nbd://{host}:{port}/{{}}")
            }
        };
        let id = format!("{PREFIX}{}", self.checkpoint.trim_start_matches(CHECKPOINT));
        let mut args = json!({"type": "nbd", "id": id, "node-name": self.disk.node,
            "name": id, "writable": false});
        if let Some(t) = &self.tmp {
            args["bitmaps"] = json!([t]);
        }
        self.vm.qmp.execute("block-export-add", args)?;
        let uri = base.replace("{}", &id);
        self.export = Some((id, uri.clone()));
        Ok(uri)
    }

    fn start_server(&mut self, addr: Value) -> Result<()> {
        let Err(f) = self
            .vm
            .qmp
            .try_execute("nbd-server-start", json!({"addr": addr}))?
        else {
            return Ok(());
        };
        if let Some(Server { dir: Some(d) }) = self.server.take() {
            let _ = std::fs::remove_dir_all(d);
        }
        Err(self.vm.err(if f.desc.contains("already running") {
            "the VM already runs an NBD server (QEMU allows one); give its address with ?nbd-server=PATH or ?nbd-server=HOST:PORT in the VM address".into()
        } else {
            format!("starting an NBD server: {}", f.desc)
        }))
    }

    /// Let the VM go on the disk now (the data is held elsewhere, e.g. in a
    /// storage snapshot): commit the overlay.
    pub fn release_overlay(&mut self) -> Result<()> {
        if let Some((node, path)) = self.overlay.take() {
            self.vm.commit(&node)?;
            if self.vm.addr.is_local() {
                let _ = std::fs::remove_file(&path);
            }
        }
        Ok(())
    }

    /// Undo the freeze: remove the export (and the NBD server this run
    /// started), commit the overlay or delete the internal snapshot, then
    /// keep the new checkpoint and drop the older ones when `ok` (the point
    /// was written), else drop the new one. Every step is tried; the
    /// first error is returned.
    pub fn finish(mut self, ok: bool) -> Result<()> {
        self.cleanup(ok)
    }

    fn cleanup(&mut self, ok: bool) -> Result<()> {
        self.finished = true;
        let mut first: Option<Error> = None;
        let mut note = |r: Result<()>| {
            if let Err(e) = r {
                tracing::warn!(error = %e, "VM cleanup step failed");
                first.get_or_insert(e);
            }
        };
        if let Some((id, _)) = self.export.take() {
            note(self.vm.del_export(&id));
        }
        if let Some(s) = self.server.take() {
            note(self.vm.qmp.execute("nbd-server-stop", json!({})).map(drop));
            if let Some(d) = s.dir {
                let _ = std::fs::remove_dir_all(d);
            }
        }
        // Persistent bitmaps are read-only while their node is a backing
        // node: release the disk first.
        let node = self.disk.node.clone();
        note(self.release_overlay());
        if let Some(s) = self.internal.take() {
            note(
                self.vm
                    .qmp
                    .execute(
                        "blockdev-snapshot-delete-internal-sync",
                        json!({"device": node, "name": s}),
                    )
                    .map(drop),
            );
        }
        let mut remove: Vec<String> = self.tmp.take().into_iter().collect();
        if ok {
            remove.extend(
                self.disk
                    .checkpoints()
                    .map(|b| b.name.clone())
                    .filter(|n| *n != self.checkpoint),
            );
        } else {
            remove.push(self.checkpoint.clone());
        }
        for b in remove {
            note(
                self.vm
                    .qmp
                    .execute(
                        "block-dirty-bitmap-remove",
                        json!({"node": node, "name": b}),
                    )
                    .map(drop),
            );
        }
        first.map_or(Ok(()), Err)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if !self.finished {
            let _ = self.cleanup(false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse() {
        let a = VmAddress::parse("qmp+unix:///run/vm1.qmp?nbd-server=/run/n.sock&overlay-dir=/ov")
            .expect("parse");
        assert_eq!(a.qmp, QmpAddr::Unix("/run/vm1.qmp".into()));
        assert_eq!(a.nbd_server.as_deref(), Some("/run/n.sock"));
        assert_eq!(a.overlay_dir, Some(PathBuf::from("/ov")));
        assert!(a.is_local());
        let t = VmAddress::parse("qmp://10.0.0.5:4444?nbd-port=10900").expect("parse");
        assert_eq!(t.qmp, QmpAddr::Tcp("10.0.0.5:4444".into()));
        assert_eq!(t.nbd_port, 10900);
        assert!(!t.is_local());
        assert!(
            VmAddress::parse("qmp://127.0.0.1:4444")
                .expect("p")
                .is_local()
        );
        for bad in [
            "qmp+unix://rel.sock",
            "qmp://host",
            "qmp://:1",
            "qmp+unix:///s?x=1",
            "qmp+unix:///s?overlay-dir=rel",
            "qmp://h:1?nbd-port=x",
            "nbd://h/x",
        ] {
            let e = VmAddress::parse(bad).expect_err(bad);
            assert!(e.to_string().contains("bad VM address"), "{e}");
        }
    }
}
