//! Where backups read from: the [`BlockSource`] trait and the local sources
//! (regular image files and block devices).
//!
//! Invariant: extents returned by [`BlockSource::extents`] are sorted,
//! non-overlapping, non-empty and inside the asked window, which is inside
//! the disk; gaps between them are holes. Sources are asked per window,
//! never for the whole disk at once.

mod blockdev;
mod file;

use std::path::Path;

pub use blockdev::BlockDeviceSource;
pub use file::FileSource;

use crate::error::{Error, Result};
use crate::format::manifest::SourceInfo;

/// What a byte range of a source holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentKind {
    /// Allocated data: must be read.
    Data,
    /// Allocated but known to read as zeros: not read.
    Zero,
    /// Unallocated: reads as zeros, not read.
    Hole,
}

/// A byte range of a source and what it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceExtent {
    /// Disk offset.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// What it holds.
    pub kind: ExtentKind,
}

/// Optional features a source advertises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Capabilities {
    /// `extents` reports holes/zeros (not just one data extent).
    pub extents: bool,
    /// `read_at` may be called from several threads at once.
    pub concurrent_reads: bool,
    /// Read it in order: a full backup then reads it in one stream, not
    /// two parts in turn (for a source that seeks slowly or streams).
    /// Local files and devices say false: sysfs's `rotational` flag
    /// cannot tell (virtio disks and many array LUNs report 1).
    pub sequential: bool,
}

/// A disk to back up. Implementations must be safe to share across threads.
pub trait BlockSource: Send + Sync {
    /// Disk size in bytes.
    fn size(&self) -> u64;
    /// The read size this source works best with (bytes, a power of two).
    fn preferred_io_size(&self) -> usize;
    /// Optional features.
    fn capabilities(&self) -> Capabilities;
    /// Where the data comes from, for the point's metadata.
    fn info(&self) -> SourceInfo;
    /// Transport mode used to read it ("file", "blockdev", ...).
    fn transport(&self) -> &'static str;
    /// Fill `buf` with the bytes at `offset` (the range is inside the disk).
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// Extents of the window `[offset, offset+len)`; by default all data.
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<SourceExtent>> {
        Ok(vec![SourceExtent {
            offset,
            len,
            kind: ExtentKind::Data,
        }])
    }
    /// The bytes at `[offset, offset+len)` as an owned buffer. Sources that
    /// receive data into buffers of their own (network) return those
    /// without a copy; the default reads into a new buffer.
    fn read_bytes(&self, offset: u64, len: usize) -> Result<bytes::Bytes> {
        let pool = crate::buffer::pool();
        let mut buf = pool.filled(len);
        self.read_at(offset, &mut buf)?;
        Ok(pool.bytes(buf))
    }
    /// A hint: `read_at(offset, len)` will be called soon (sequential
    /// read-ahead). Network sources start fetching; the default ignores it.
    fn will_read(&self, offset: u64, len: usize) {
        let _ = (offset, len);
    }
    /// How many reads ahead of the current one the reader announces with
    /// [`BlockSource::will_read`] (0: none).
    fn read_ahead(&self) -> usize {
        0
    }
    /// Changed-block tracking: whether the source knows what changed since
    /// the disk's previous point (a backup is then incremental).
    fn change_tracking(&self) -> crate::cbt::Tracking<'_> {
        crate::cbt::Tracking::Off
    }
    /// How consistent the data is (a running guest's disk: quiesced by
    /// its agent or crash-consistent); stored in the point.
    fn consistency(&self) -> Option<crate::format::manifest::Consistency> {
        None
    }
    /// The VM's definition (a libvirt domain's XML), stored in the point.
    fn vm_definition(&self) -> Option<String> {
        None
    }
    /// The checkpoint this source started when it froze the disk (the
    /// bitmap that records the writes after this read's instant), stored
    /// in the point so the next incremental can build on it.
    fn checkpoint(&self) -> Option<String> {
        None
    }
}

/// An open local file or device: what both local sources share.
#[derive(Debug)]
pub(crate) struct LocalFile {
    file: std::fs::File,
    path: std::path::PathBuf,
    size: u64,
}

impl LocalFile {
    /// Open `path` read-only; `size_of` tells its size.
    fn open(
        path: &Path,
        size_of: impl FnOnce(&std::fs::File) -> std::io::Result<u64>,
    ) -> Result<Self> {
        use crate::error::IoContext;
        let file = std::fs::File::open(path).map_err(|source| Error::SourceUnavailable {
            path: path.to_path_buf(),
            source,
        })?;
        let size = size_of(&file).ctx("get the size of", path)?;
        crate::sys::advise_sequential(&file);
        Ok(LocalFile {
            file,
            path: path.to_path_buf(),
            size,
        })
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        use crate::error::IoContext;
        use std::os::unix::fs::FileExt;
        self.file.read_exact_at(buf, offset).ctx("read", &self.path)
    }

    fn info(&self, kind: &str) -> SourceInfo {
        SourceInfo {
            kind: kind.into(),
            location: self.path.display().to_string(),
        }
    }
}

/// Open a source named by a path or a URI: `/path/to/disk.raw`, `/dev/sdb`,
/// `file:///path`. This is the one place that knows source addresses, so
/// every front door (CLI, Python) accepts the same ones. NBD addresses are
/// opened by `datamover_transports::open_source` (which delegates the rest
/// here); VM addresses (`qmp://`, `qmp+unix://`) are refused until their
/// transport exists.
pub fn open(spec: &str) -> Result<Box<dyn BlockSource>> {
    if let Some(path) = local_path(spec)? {
        return open_local(path);
    }
    match spec.split_once("://").map_or("", |s| s.0) {
        scheme @ ("nbd" | "nbds" | "nbd+unix" | "nbds+unix") => Err(Error::Unsupported(format!(
            "{scheme}:// sources in the core library: open them with datamover_transports::open_source"
        ))),
        scheme @ ("qmp" | "qmp+unix") => Err(Error::Unsupported(format!(
            "{scheme}:// sources in the core library: back VMs up with datamover_transports::backup"
        ))),
        scheme => Err(Error::InvalidArgument(format!(
            "unknown source scheme {scheme}://: give a path, file://, nbd://, nbd+unix:// or qmp+unix://"
        ))),
    }
}

/// The local path an address names: a plain path, or a `file://` URI
/// (`file:///abs/path` or `file://localhost/abs/path`); `None` for any
/// other scheme. Sources and targets alike accept these.
pub fn local_path(spec: &str) -> Result<Option<&Path>> {
    match spec.split_once("://") {
        None => Ok(Some(Path::new(spec))),
        Some(("file", rest)) => {
            let path = rest.strip_prefix("localhost").unwrap_or(rest);
            if path.starts_with('/') {
                Ok(Some(Path::new(path)))
            } else {
                Err(Error::InvalidArgument(format!(
                    "{spec}: a file URI needs an absolute path (file:///...)"
                )))
            }
        }
        Some(_) => Ok(None),
    }
}

/// Open a local path as a source: a block device or a regular (raw) image
/// file. Anything else is a clear error.
pub fn open_local(path: &Path) -> Result<Box<dyn BlockSource>> {
    let meta = std::fs::metadata(path).map_err(|source| Error::SourceUnavailable {
        path: path.to_path_buf(),
        source,
    })?;
    use std::os::unix::fs::FileTypeExt;
    let ft = meta.file_type();
    if ft.is_block_device() {
        Ok(Box::new(BlockDeviceSource::open(path)?))
    } else if ft.is_file() {
        Ok(Box::new(FileSource::open(path)?))
    } else {
        Err(Error::InvalidArgument(format!(
            "source {} is neither a disk image file nor a block device",
            path.display()
        )))
    }
}
