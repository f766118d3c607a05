//! A VM's disks as QMP shows them: block nodes, their bitmaps
//! (checkpoints) and image files.
//!
//! Invariant: a disk is a root node with a format driver above its
//! protocol node; protocol nodes are never listed as disks.

use super::*;

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
    pub(super) fn from_node(n: &Value, device: Option<String>) -> Option<DiskInfo> {
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

    pub(super) fn backing_file(n: &Value) -> Option<&str> {
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
pub(super) fn disks_of(nodes: &[Value], roots: Vec<(String, Option<String>)>) -> Vec<DiskInfo> {
    roots
        .into_iter()
        .filter_map(|(node, dev)| {
            let n = nodes.iter().find(|n| n["node-name"] == node.as_str())?;
            DiskInfo::from_node(n, dev)
        })
        .collect()
}

/// Protocol drivers: nodes that hold bytes of an image, not a disk.
pub(super) fn is_protocol(drv: Option<&str>) -> bool {
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
