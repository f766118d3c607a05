//! A raw disk image in a regular file; holes found with SEEK_DATA/SEEK_HOLE.

use std::path::Path;

use super::{BlockSource, Capabilities, ExtentKind, LocalFile, SourceExtent};
use crate::error::{IoContext, Result};
use crate::format::manifest::SourceInfo;
use crate::sys;

/// A raw image file.
#[derive(Debug)]
pub struct FileSource(LocalFile);

impl FileSource {
    /// Open `path` read-only.
    pub fn open(path: &Path) -> Result<Self> {
        LocalFile::open(path, |f| f.metadata().map(|m| m.len())).map(FileSource)
    }
}

impl BlockSource for FileSource {
    fn size(&self) -> u64 {
        self.0.size
    }
    fn preferred_io_size(&self) -> usize {
        4 << 20
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            extents: true,
            concurrent_reads: true,
            sequential: false,
        }
    }
    fn info(&self) -> SourceInfo {
        self.0.info("file")
    }
    fn transport(&self) -> &'static str {
        "file"
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.0.read_at(offset, buf)
    }
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<SourceExtent>> {
        let (file, path) = (&self.0.file, &self.0.path);
        let end = offset.saturating_add(len).min(self.0.size);
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            let data = match sys::seek_data(file, pos).ctx("seek data in", path)? {
                Some(d) if d < end => d,
                _ => break,
            };
            let hole = sys::seek_hole(file, data)
                .ctx("seek hole in", path)?
                .unwrap_or(end)
                .min(end);
            if hole <= data {
                // The file changed under us (truncated); treat the rest as data.
                out.push(SourceExtent {
                    offset: data,
                    len: end - data,
                    kind: ExtentKind::Data,
                });
                break;
            }
            out.push(SourceExtent {
                offset: data,
                len: hole - data,
                kind: ExtentKind::Data,
            });
            pos = hole;
        }
        Ok(out)
    }
}
