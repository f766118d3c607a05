//! Backup from storage snapshots: a [`StorageSnapshot`] provider takes a
//! storage-level snapshot of a disk's image while the VM is held still
//! for that moment only, and the proxy then reads the storage snapshot.
//!
//! Providers: [`Reflink`] (a `FICLONE` copy of the image on XFS or btrfs,
//! taken while an overlay holds the VM's writes, which is committed right
//! after) and [`Qcow2Internal`] (a qcow2 internal snapshot, taken inside
//! the QMP transaction itself).

use std::path::{Path, PathBuf};

use super::vm::{DiskInfo, Frozen, Hold};
use datamover::{Error, Result};

/// A storage snapshot taken: where its data is.
#[derive(Debug)]
pub struct SnapshotImage {
    /// The image file to read.
    pub path: PathBuf,
    /// Its format ("raw", "qcow2").
    pub format: String,
    /// The internal snapshot inside it to read, if any.
    pub internal: Option<String>,
    /// Remove `path` when done.
    remove_file: bool,
}

impl Drop for SnapshotImage {
    fn drop(&mut self) {
        if self.remove_file {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A way to take storage snapshots of a VM's disk.
pub trait StorageSnapshot: Send + Sync + std::fmt::Debug {
    /// The provider's name (`reflink`, `qcow2-internal`).
    fn name(&self) -> &'static str;
    /// Why it cannot snapshot `disk` from this proxy, or `None`.
    fn unusable(&self, disk: &DiskInfo) -> Option<String>;
    /// How the VM is held while the snapshot is taken.
    fn hold(&self) -> Hold;
    /// Take the snapshot of the frozen disk. The VM is let go right after.
    fn take(&self, frozen: &Frozen) -> Result<SnapshotImage>;
}

/// Reflink copies (`FICLONE`) of the image file, on XFS (reflink=1) or
/// btrfs: instant and sharing blocks until the VM overwrites them.
#[derive(Debug, Default, Clone, Copy)]
pub struct Reflink;

const XFS_MAGIC: i64 = 0x5846_5342;
const BTRFS_MAGIC: i64 = 0x9123_683e;

fn fs_magic(path: &Path) -> std::io::Result<i64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let mut st: libc::statfs = unsafe_zeroed();
    // SAFETY: `c` is a valid C string and `st` a writable statfs.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)]
    Ok(st.f_type as i64)
}

fn unsafe_zeroed() -> libc::statfs {
    // SAFETY: statfs is plain old data; all-zero is a valid value.
    unsafe { std::mem::zeroed() }
}

impl StorageSnapshot for Reflink {
    fn name(&self) -> &'static str {
        "reflink"
    }
    fn unusable(&self, disk: &DiskInfo) -> Option<String> {
        let path = match disk.visible_here() {
            Ok(p) => p,
            Err(e) => return Some(e),
        };
        if !std::fs::metadata(path).is_ok_and(|m| m.is_file()) {
            return Some(format!("{} is not an image file", path.display()));
        }
        if disk.backing {
            return Some(format!("{} has a backing file", path.display()));
        }
        match fs_magic(path) {
            Ok(XFS_MAGIC | BTRFS_MAGIC) => None,
            Ok(m) => Some(format!(
                "{} is on a filesystem without reflinks (type {m:#x}); XFS with reflink=1 or btrfs has them",
                path.display()
            )),
            Err(e) => Some(format!("statfs {}: {e}", path.display())),
        }
    }
    fn hold(&self) -> Hold {
        Hold::Overlay
    }
    fn take(&self, frozen: &Frozen) -> Result<SnapshotImage> {
        let disk = frozen.disk();
        let src = disk.visible_here().map_err(Error::InvalidArgument)?;
        let name = format!(
            "{}.dm-snap-{}",
            src.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            frozen.checkpoint().trim_start_matches("dm-cp-")
        );
        let dst = src.with_file_name(name);
        let from = std::fs::File::open(src).map_err(|e| Error::io("open", src, e))?;
        let to = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&dst)
            .map_err(|e| Error::io("create", &dst, e))?;
        let img = SnapshotImage {
            path: dst.clone(),
            format: disk.driver.clone(),
            internal: None,
            remove_file: true,
        };
        use std::os::fd::AsRawFd;
        // SAFETY: FICLONE takes the source fd as its argument; both fds are open.
        let r = unsafe { libc::ioctl(to.as_raw_fd(), libc::FICLONE as _, from.as_raw_fd()) };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            return Err(Error::Unsupported(format!(
                "reflink of {} failed: {e}; the datastore needs XFS with reflink=1 or btrfs",
                src.display()
            )));
        }
        Ok(img)
    }
}

/// qcow2 internal snapshots, taken atomically with the checkpoint in the
/// QMP transaction and deleted afterwards; read through a local qemu-nbd
/// on the image (the proxy must see the image file).
#[derive(Debug, Default, Clone, Copy)]
pub struct Qcow2Internal;

impl StorageSnapshot for Qcow2Internal {
    fn name(&self) -> &'static str {
        "qcow2-internal"
    }
    fn unusable(&self, disk: &DiskInfo) -> Option<String> {
        if disk.driver != "qcow2" {
            return Some(format!("disk {} is {}, not qcow2", disk.node, disk.driver));
        }
        disk.visible_here().err()
    }
    fn hold(&self) -> Hold {
        Hold::Internal
    }
    fn take(&self, frozen: &Frozen) -> Result<SnapshotImage> {
        let disk = frozen.disk();
        let path = disk.visible_here().map_err(Error::InvalidArgument)?;
        Ok(SnapshotImage {
            path: path.to_path_buf(),
            format: "qcow2".into(),
            internal: frozen.internal_snapshot().map(str::to_string),
            remove_file: false,
        })
    }
}

/// The providers by name; `auto` tries reflink first (no metadata load on
/// the image), then qcow2 internal snapshots.
pub fn providers(name: &str) -> Result<Vec<Box<dyn StorageSnapshot>>> {
    Ok(match name {
        "auto" => vec![Box::new(Reflink), Box::new(Qcow2Internal)],
        "reflink" => vec![Box::new(Reflink)],
        "qcow2-internal" => vec![Box::new(Qcow2Internal)],
        other => {
            return Err(Error::InvalidArgument(format!(
                "unknown storage snapshot provider {other:?}: use auto, reflink or qcow2-internal"
            )));
        }
    })
}
