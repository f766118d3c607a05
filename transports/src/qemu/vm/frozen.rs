//! A frozen disk: held still (overlay or internal snapshot) with its
//! checkpoint rotated, exported over NBD, and undone afterwards.
//!
//! Invariant: whatever a run created in the VM is removed by
//! [`Frozen::finish`] or, for a failed run, on drop.

use super::*;

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
pub(super) struct Server {
    pub(super) dir: Option<PathBuf>,
}

/// A frozen disk of a running VM: undone by [`Frozen::finish`], or on drop
/// (as a failed run).
#[derive(Debug)]
pub struct Frozen {
    pub(super) vm: Vm,
    pub(super) disk: DiskInfo,
    pub(super) checkpoint: String,
    pub(super) tmp: Option<String>,
    pub(super) overlay: Option<(String, PathBuf)>,
    pub(super) internal: Option<String>,
    pub(super) export: Option<(String, String)>,
    pub(super) server: Option<Server>,
    pub(super) finished: bool,
    pub(super) consistency: datamover::Consistency,
}

impl Frozen {
    /// The disk as it was frozen (its node holds the frozen data unless an
    /// internal snapshot does).
    pub fn disk(&self) -> &DiskInfo {
        &self.disk
    }
    /// How consistent the frozen data is.
    pub fn consistency(&self) -> &datamover::Consistency {
        &self.consistency
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
