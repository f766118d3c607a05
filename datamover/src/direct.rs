//! A file written through O_DIRECT where it can be: restore targets and
//! pack files. Direct writes skip the page cache (no copy into it, no
//! writeback at fsync time, no eviction of what the host caches); a
//! filesystem that refuses them (tmpfs on older kernels, some FUSE ones)
//! gets buffered writes instead, for good after its first refusal.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::buffer::DIRECT_ALIGN;
use crate::error::{Error, IoContext, Result};

/// Writes through O_DIRECT when offset, length and buffer are aligned (no
/// page-cache copy, no writeback at fsync time), buffered otherwise. Falls
/// back to buffered for good if the filesystem refuses direct I/O.
#[derive(Debug)]
pub(crate) struct DirectFile {
    pub(crate) buffered: File,
    direct: Option<File>,
    direct_ok: AtomicBool,
    pub(crate) path: PathBuf,
}

impl DirectFile {
    /// Read back through the page cache (the file is opened for reading
    /// too; a target opened write-only says it cannot be read).
    pub(crate) fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<bool> {
        match self.buffered.read_exact_at(buf, offset) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::EBADF) => Ok(false),
            Err(e) => Err(Error::io("read back", &self.path, e)),
        }
    }

    pub(crate) fn new(buffered: File, path: &Path) -> Self {
        let direct = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok();
        let ok = direct.is_some();
        DirectFile {
            buffered,
            direct,
            direct_ok: AtomicBool::new(ok),
            path: path.to_path_buf(),
        }
    }

    /// Write `data` at `offset`: the page-aligned middle (when the buffer's
    /// memory alignment agrees with the disk offset) with O_DIRECT, the
    /// unaligned head and tail through the page cache.
    pub(crate) fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        let a = DIRECT_ALIGN as u64;
        let head = (((a - offset % a) % a) as usize).min(data.len());
        let body = (data.len() - head) / DIRECT_ALIGN * DIRECT_ALIGN;
        let mem_ok = (data.as_ptr() as usize + head) % DIRECT_ALIGN == 0;
        if let (true, Some(d)) = (
            body > 0 && mem_ok && self.direct_ok.load(Ordering::Relaxed),
            &self.direct,
        ) {
            match d.write_all_at(&data[head..head + body], offset + head as u64) {
                Ok(()) => {
                    self.buffered_at(offset, &data[..head])?;
                    return self.buffered_at(offset + (head + body) as u64, &data[head + body..]);
                }
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::debug!(
                        "direct I/O refused on {}; writing buffered",
                        self.path.display()
                    );
                    self.direct_ok.store(false, Ordering::Relaxed);
                }
                Err(e) => return Err(Error::io("write", &self.path, e)),
            }
        }
        self.buffered_at(offset, data)
    }

    fn buffered_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        self.buffered
            .write_all_at(data, offset)
            .ctx("write", &self.path)
    }

    pub(crate) fn sync(&self) -> Result<()> {
        self.buffered.sync_all().ctx("sync", &self.path)
    }
}
