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

mod address;
mod disks;
mod frozen;

pub use address::{VmAddress, is_vm};
pub use disks::{Bitmap, DiskInfo};
use disks::{disks_of, is_protocol};
pub(crate) use frozen::stamp;
pub use frozen::{Frozen, Hold};

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
                    // A device added with an id shows as its QOM path
                    // (`/machine/peripheral/ID/virtio-backend`): name it ID.
                    let dev = d["qdev"]
                        .as_str()
                        .map(|q| {
                            q.strip_prefix("/machine/peripheral/")
                                .and_then(|r| r.split('/').next())
                                .unwrap_or(q)
                        })
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
    ///
    /// `quiescer` freezes the guest's filesystems for the instant of the
    /// transaction (see [`super::quiesce`]).
    pub fn freeze(
        mut self,
        disk: &DiskInfo,
        how: Hold,
        since: Option<&str>,
        quiescer: &mut super::Quiescer,
    ) -> Result<Frozen> {
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
        let (frozen, consistency) =
            quiescer.around(|| self.qmp.execute("transaction", json!({"actions": actions})))?;
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
            consistency,
        })
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
