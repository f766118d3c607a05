//! A raw disk image in a regular file; holes found with SEEK_DATA/SEEK_HOLE.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::{BlockSource, Capabilities, ExtentKind, SourceExtent};
use crate::error::{Error, IoContext, Result};
use crate::format::manifest::SourceInfo;
use crate::sys;

/// A raw image file.
#[derive(Debug)]
pub struct FileSource {
    file: File,
    path: PathBuf,
    size: u64,
}

impl FileSource {
    /// Open `path` read-only.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|source| Error::SourceUnavailable {
            path: path.to_path_buf(),
            source,
        })?;
        let size = file.metadata().ctx("stat", path)?.len();
        sys::advise_sequential(&file);
        Ok(FileSource {
            file,
            path: path.to_path_buf(),
            size,
        })
    }
}

impl BlockSource for FileSource {
    fn size(&self) -> u64 {
        self.size
    }
    fn preferred_io_size(&self) -> usize {
        4 << 20
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            extents: true,
            concurrent_reads: true,
        }
    }
    fn info(&self) -> SourceInfo {
        SourceInfo {
            kind: "file".into(),
            location: self.path.display().to_string(),
        }
    }
    fn transport(&self) -> &'static str {
        "file"
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.file.read_exact_at(buf, offset).ctx("read", &self.path)
    }
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<SourceExtent>> {
        let end = offset.saturating_add(len).min(self.size);
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            let data = match sys::seek_data(&self.file, pos).ctx("seek data in", &self.path)? {
                Some(d) if d < end => d,
                _ => break,
            };
            let hole = sys::seek_hole(&self.file, data)
                .ctx("seek hole in", &self.path)?
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
