//! Where restores write to: the [`BlockTarget`] trait, a sparse image file
//! and a block device.
//!
//! Invariant: a target is at least as large as the disk restored into it;
//! zero extents are holes in a new file and explicitly zeroed on a device.

use std::fs::OpenOptions;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use crate::direct::DirectFile;
use crate::error::{Error, IoContext, Result};
use crate::sys;

/// A disk to restore into. Writes may come from several threads at once.
pub trait BlockTarget: Send + Sync {
    /// Usable size in bytes.
    fn size(&self) -> u64;
    /// Write `data` at `offset`.
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()>;
    /// Make `[offset, offset+len)` read as zeros.
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()>;
    /// Make all writes durable.
    fn flush(&self) -> Result<()>;
    /// Read back `buf.len()` bytes at `offset` (for a restore that writes
    /// only what differs, [`crate::RestoreOptions::compare`]). `Ok(false)`:
    /// this target cannot be read, so everything is written.
    fn read_at(&self, _offset: u64, _buf: &mut [u8]) -> Result<bool> {
        Ok(false)
    }
    /// Whether `[offset, offset+len)` is known to read as zeros without
    /// reading it (a hole of a file, an extent an NBD server reports as
    /// zero). `false`: unknown, read it.
    fn reads_zero(&self, _offset: u64, _len: u64) -> Result<bool> {
        Ok(false)
    }
    /// Called when a restore fails: remove what cannot be trusted (a new
    /// file is deleted; a device is left as it is).
    fn discard(&self) {}
}

/// A new sparse image file: zero runs stay holes. Or an existing image
/// being brought up to date ([`FileTarget::update`]).
#[derive(Debug)]
pub struct FileTarget {
    file: DirectFile,
    size: u64,
    /// Created by this run: unwritten bytes are holes, and a failed run
    /// removes it.
    fresh: bool,
}

impl FileTarget {
    /// Create `path` with `size` bytes (all holes). An existing file is an
    /// error unless `overwrite`.
    pub fn create(path: &Path, size: u64, overwrite: bool) -> Result<Self> {
        let mut o = OpenOptions::new();
        o.read(true).write(true);
        if overwrite {
            o.create(true).truncate(true);
        } else {
            o.create_new(true);
        }
        let file = o.open(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                Error::TargetExists {
                    path: path.to_path_buf(),
                }
            } else {
                Error::io("create restore target", path, e)
            }
        })?;
        file.set_len(size).ctx("size restore target", path)?;
        Ok(FileTarget {
            file: DirectFile::new(file, path),
            size,
            fresh: true,
        })
    }

    /// Open the existing image `path` to update it in place (a replica):
    /// it is resized to `size`, zero runs are punched as holes, and a
    /// failed run leaves the file (its owner knows it is incomplete).
    pub fn update(path: &Path, size: u64) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .ctx("open replica", path)?;
        if file.metadata().ctx("stat", path)?.len() != size {
            file.set_len(size).ctx("size replica", path)?;
        }
        Ok(FileTarget {
            file: DirectFile::new(file, path),
            size,
            fresh: false,
        })
    }
}

impl BlockTarget for FileTarget {
    fn size(&self) -> u64 {
        self.size
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.file.write_at(offset, data)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        if self.fresh {
            // The file was created empty: every byte not written is a hole.
            return Ok(());
        }
        if sys::punch_hole(&self.file.buffered, offset, len).is_ok() {
            return Ok(());
        }
        write_zero_bytes(self, offset, len)
    }
    fn flush(&self) -> Result<()> {
        self.file.sync()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<bool> {
        self.file.read_at(offset, buf)
    }
    fn reads_zero(&self, offset: u64, len: u64) -> Result<bool> {
        // No data from `offset` up to the range's end: a hole.
        Ok(sys::seek_data(&self.file.buffered, offset)
            .map(|d| d.is_none_or(|d| d >= offset + len))
            .unwrap_or(false))
    }
    fn discard(&self) {
        if !self.fresh {
            return;
        }
        if let Err(e) = std::fs::remove_file(&self.file.path) {
            tracing::warn!(
                "could not remove incomplete restore target {}: {e}",
                self.file.path.display()
            );
        }
    }
}

/// A block device; zero runs are written with BLKZEROOUT.
#[derive(Debug)]
pub struct BlockDeviceTarget {
    file: DirectFile,
    size: u64,
}

impl BlockDeviceTarget {
    /// Open the device for writing; it must hold at least `need` bytes.
    pub fn open(path: &Path, need: u64) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .ctx("open restore target", path)?;
        let size = sys::block_device_size(&file).ctx("get the size of block device", path)?;
        if size < need {
            return Err(Error::TargetTooSmall {
                path: path.to_path_buf(),
                need,
                have: size,
            });
        }
        Ok(BlockDeviceTarget {
            file: DirectFile::new(file, path),
            size,
        })
    }
}

impl BlockTarget for BlockDeviceTarget {
    fn size(&self) -> u64 {
        self.size
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.file.write_at(offset, data)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        // BLKZEROOUT needs 512-byte alignment; write the unaligned edges.
        let a = offset.next_multiple_of(512);
        let b = (offset + len) / 512 * 512;
        if b > a && sys::block_zero_out(&self.file.buffered, a, b - a).is_ok() {
            write_zero_bytes(self, offset, a - offset)?;
            return write_zero_bytes(self, b, offset + len - b);
        }
        write_zero_bytes(self, offset, len)
    }
    fn flush(&self) -> Result<()> {
        self.file.sync()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<bool> {
        self.file.read_at(offset, buf)
    }
}

fn write_zero_bytes(t: &dyn BlockTarget, mut offset: u64, mut len: u64) -> Result<()> {
    static Z: [u8; 64 << 10] = [0; 64 << 10];
    while len > 0 {
        let n = len.min(Z.len() as u64);
        t.write_at(offset, &Z[..n as usize])?;
        offset += n;
        len -= n;
    }
    Ok(())
}

/// Open a local restore target for a disk of `size` bytes: an existing
/// block device is written in place; otherwise a new sparse file is made
/// (an existing regular file only with `overwrite`).
pub fn open_local(path: &Path, size: u64, overwrite: bool) -> Result<Box<dyn BlockTarget>> {
    match std::fs::metadata(path) {
        Ok(m) if m.file_type().is_block_device() => {
            Ok(Box::new(BlockDeviceTarget::open(path, size)?))
        }
        Ok(m) if !m.is_file() => Err(Error::InvalidArgument(format!(
            "restore target {} is neither a block device nor a regular file",
            path.display()
        ))),
        _ => Ok(Box::new(FileTarget::create(path, size, overwrite)?)),
    }
}
