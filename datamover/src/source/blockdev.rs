//! A block device (LUN, loop device, partition): size from BLKGETSIZE64,
//! large aligned reads.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::{BlockSource, Capabilities};
use crate::error::{Error, IoContext, Result};
use crate::format::manifest::SourceInfo;
use crate::sys;

/// A block device opened read-only.
#[derive(Debug)]
pub struct BlockDeviceSource {
    file: File,
    path: PathBuf,
    size: u64,
}

impl BlockDeviceSource {
    /// Open the device at `path` read-only.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|source| Error::SourceUnavailable {
            path: path.to_path_buf(),
            source,
        })?;
        let size = sys::block_device_size(&file).ctx("get the size of block device", path)?;
        sys::advise_sequential(&file);
        Ok(BlockDeviceSource {
            file,
            path: path.to_path_buf(),
            size,
        })
    }
}

impl BlockSource for BlockDeviceSource {
    fn size(&self) -> u64 {
        self.size
    }
    fn preferred_io_size(&self) -> usize {
        // Large, aligned reads: the pipeline reads at multiples of this.
        4 << 20
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            extents: false,
            concurrent_reads: true,
        }
    }
    fn info(&self) -> SourceInfo {
        SourceInfo {
            kind: "blockdev".into(),
            location: self.path.display().to_string(),
        }
    }
    fn transport(&self) -> &'static str {
        "blockdev"
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.file.read_exact_at(buf, offset).ctx("read", &self.path)
    }
}
