//! A block device (LUN, loop device, partition): size from BLKGETSIZE64,
//! large aligned reads.

use std::path::Path;

use super::{BlockSource, Capabilities, LocalFile};
use crate::error::Result;
use crate::format::manifest::SourceInfo;
use crate::sys;

/// A block device opened read-only.
#[derive(Debug)]
pub struct BlockDeviceSource(LocalFile);

impl BlockDeviceSource {
    /// Open the device at `path` read-only.
    pub fn open(path: &Path) -> Result<Self> {
        LocalFile::open(path, sys::block_device_size).map(BlockDeviceSource)
    }
}

impl BlockSource for BlockDeviceSource {
    fn size(&self) -> u64 {
        self.0.size
    }
    fn preferred_io_size(&self) -> usize {
        // Large, aligned reads: the pipeline reads at multiples of this.
        4 << 20
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            extents: false,
            concurrent_reads: true,
            sequential: false,
        }
    }
    fn info(&self) -> SourceInfo {
        self.0.info("blockdev")
    }
    fn transport(&self) -> &'static str {
        "blockdev"
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.0.read_at(offset, buf)
    }
}
