//! `dm export`: a restore point served over NBD ([`crate::nbd::server`]),
//! read through [`datamover::reader::PointReader`] (every chunk checked,
//! a bounded cache), read-only or with writes going to a local overlay;
//! the repository is never written.
//!
//! The overlay is a sparse file the size of the disk: a block it holds
//! (allocated) is the guest's, every other block is the point's. Writes
//! are made whole 4 KiB blocks first (the rest of a block read from what
//! the export shows), so an allocated block never mixes the two. A
//! side file `OVERLAY.dm-overlay` names the disk and point, so an overlay
//! is only ever reused over the point it was written on.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;

use serde::{Deserialize, Serialize};

use crate::nbd::server::{self, Disk, ExportOptions, Listener};
use datamover::reader::{PointReader, PointSource};
use datamover::{DiskName, Error, PointId, PointRef, Result};

/// Overlay block size.
const BLOCK: u64 = 4096;

/// The side file of an overlay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct OverlayOf {
    disk: String,
    point: String,
    size: u64,
}

/// Guest writes over a point.
#[derive(Debug)]
pub struct Overlay {
    file: File,
    path: PathBuf,
    size: u64,
    /// Writes are read-modify-write of whole blocks: one at a time.
    writing: Mutex<()>,
}

impl Overlay {
    /// Open (or create) the overlay at `path` for `point` of `disk`.
    pub fn open(path: &Path, disk: &DiskName, point: &PointId, size: u64) -> Result<Overlay> {
        let mut side = path.as_os_str().to_owned();
        side.push(".dm-overlay");
        let side = PathBuf::from(side);
        let of = OverlayOf {
            disk: disk.to_string(),
            point: point.to_string(),
            size,
        };
        let exists = path.exists();
        if exists {
            let b = std::fs::read(&side).map_err(|e| {
                Error::InvalidArgument(format!(
                    "{} exists but is no overlay of ours ({}: {e}); give a new path",
                    path.display(),
                    side.display()
                ))
            })?;
            let was: OverlayOf = serde_json::from_slice(&b)
                .map_err(|e| Error::InvalidArgument(format!("{}: {e}", side.display())))?;
            if was != of {
                return Err(Error::InvalidArgument(format!(
                    "overlay {} holds writes over {}@{}, not {disk}@{point}: give a new path",
                    path.display(),
                    was.disk,
                    was.point
                )));
            }
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| Error::io("open overlay", path, e))?;
        if !exists {
            file.set_len(size)
                .map_err(|e| Error::io("size overlay", path, e))?;
            let b = serde_json::to_vec(&of).map_err(|e| Error::Internal(e.to_string()))?;
            std::fs::write(&side, b).map_err(|e| Error::io("write", &side, e))?;
        }
        Ok(Overlay {
            file,
            path: path.to_path_buf(),
            size,
            writing: Mutex::new(()),
        })
    }

    /// The blocks the overlay holds within `[off, end)`: (start, end).
    fn held(&self, off: u64, end: u64) -> Result<Vec<(u64, u64)>> {
        let mut out = Vec::new();
        let mut at = off;
        while at < end {
            let Some(d) = datamover::sys::seek_data(&self.file, at)
                .map_err(|e| Error::io("seek", &self.path, e))?
            else {
                break;
            };
            if d >= end {
                break;
            }
            let h = datamover::sys::seek_hole(&self.file, d)
                .map_err(|e| Error::io("seek", &self.path, e))?
                .unwrap_or(self.size);
            out.push((d, h.min(end)));
            at = h;
        }
        Ok(out)
    }
}

/// A point as an export's disk.
pub struct PointDisk<'r> {
    reader: PointReader<'r>,
    overlay: Option<Overlay>,
}

impl std::fmt::Debug for PointDisk<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PointDisk")
            .field("reader", &self.reader)
            .field("overlay", &self.overlay)
            .finish()
    }
}

impl<'r> PointDisk<'r> {
    /// The point `point` names, with writes to `overlay` if given.
    pub fn open(
        repo: &'r dyn PointSource,
        point: &PointRef,
        overlay: Option<&Path>,
        cache_bytes: u64,
    ) -> Result<Self> {
        let id = repo.resolve(&point.disk, point.at.as_deref())?;
        let reader = repo.open_point(&point.disk, &id, cache_bytes)?;
        let overlay = overlay
            .map(|p| Overlay::open(p, &point.disk, &id, reader.size()))
            .transpose()?;
        Ok(PointDisk { reader, overlay })
    }

    /// The point served.
    pub fn reader(&self) -> &PointReader<'r> {
        &self.reader
    }
}

impl Disk for PointDisk<'_> {
    fn size(&self) -> u64 {
        self.reader.size()
    }

    fn read_at(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        let Some(o) = &self.overlay else {
            return self.reader.read_at(off, buf);
        };
        let end = off + buf.len() as u64;
        let held = o.held(off, end)?;
        // Only what the overlay does not hold comes from the point.
        let mut at = off;
        for &(a, b) in held.iter().chain(std::iter::once(&(end, end))) {
            if a > at {
                let (i, j) = ((at - off) as usize, (a - off) as usize);
                self.reader.read_at(at, &mut buf[i..j])?;
            }
            if b > a {
                let (i, j) = ((a - off) as usize, (b - off) as usize);
                o.file
                    .read_exact_at(&mut buf[i..j], a)
                    .map_err(|e| Error::io("read overlay", &o.path, e))?;
            }
            at = at.max(b);
        }
        Ok(())
    }

    fn runs(&self, off: u64, len: u64) -> Vec<(u64, bool)> {
        let end = off.saturating_add(len).min(self.size());
        // Allocation is advice: when the manifest cannot be read here, all
        // of it is data (the read then reports the error).
        let base = self.reader.runs(off, len).unwrap_or_else(|e| {
            tracing::debug!("block status at {off}: {e}");
            vec![(end.saturating_sub(off), false)]
        });
        let Some(o) = &self.overlay else {
            return base;
        };
        // Blocks the overlay holds are data, whatever the point says.
        let held = o.held(off, end).unwrap_or_else(|_| vec![(off, end)]);
        let mut out: Vec<(u64, bool)> = Vec::new();
        let mut push = |n: u64, zero: bool| match out.last_mut() {
            Some((l, z)) if *z == zero => *l += n,
            _ if n > 0 => out.push((n, zero)),
            _ => {}
        };
        let mut at = off;
        for (l, zero) in base {
            let stop = at + l;
            while at < stop {
                let in_held = held.iter().find(|(a, b)| *a <= at && at < *b);
                let next_held = held.iter().map(|(a, _)| *a).filter(|a| *a > at).min();
                let seg_end = match in_held {
                    Some((_, b)) => (*b).min(stop),
                    None => next_held.unwrap_or(stop).min(stop),
                };
                push(seg_end - at, zero && in_held.is_none());
                at = seg_end;
            }
        }
        out
    }

    fn writable(&self) -> bool {
        self.overlay.is_some()
    }

    fn write_at(&self, off: u64, data: &[u8]) -> Result<()> {
        let Some(o) = &self.overlay else {
            return Err(Error::Unsupported("the export is read-only".into()));
        };
        let _one = o.writing.lock().unwrap_or_else(|p| p.into_inner());
        let end = off + data.len() as u64;
        let (a, b) = (off / BLOCK * BLOCK, end.div_ceil(BLOCK) * BLOCK);
        let b = b.min(self.size());
        let mut block = vec![0u8; (b - a) as usize];
        // The edges as the export shows them now, then the new bytes.
        if a < off {
            let n = ((off - a) as usize).min(block.len());
            self.read_at(a, &mut block[..n])?;
        }
        if end < b {
            let i = (end - a) as usize;
            self.read_at(end, &mut block[i..])?;
        }
        let i = (off - a) as usize;
        block[i..i + data.len()].copy_from_slice(data);
        o.file
            .write_all_at(&block, a)
            .map_err(|e| Error::io("write overlay", &o.path, e))
    }

    fn write_zeroes(&self, mut off: u64, len: u64) -> Result<()> {
        const PIECE: u64 = 1 << 20;
        let zeros = vec![0u8; PIECE.min(len) as usize];
        let end = off + len;
        while off < end {
            let n = (end - off).min(PIECE) as usize;
            self.write_at(off, &zeros[..n])?;
            off += n as u64;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        match &self.overlay {
            Some(o) => o
                .file
                .sync_data()
                .map_err(|e| Error::io("flush overlay", &o.path, e)),
            None => Ok(()),
        }
    }
}

/// How to export.
#[derive(Debug, Clone, Default)]
pub struct Export {
    /// `unix:PATH` or `HOST:PORT`.
    pub listen: String,
    /// Writes go to this overlay file (else the export is read-only).
    pub writable: Option<PathBuf>,
    /// A directory with `server-cert.pem`, `server-key.pem` and, to
    /// verify clients, `ca-cert.pem`: TLS is then required.
    pub tls_certificates: Option<PathBuf>,
    /// Chunk cache bytes (0: the default).
    pub cache_bytes: u64,
}

/// Serve `point` until `stop` is set; `ready` gets the NBD URI clients
/// connect to once the export listens.
pub fn export(
    repo: &dyn PointSource,
    point: &PointRef,
    how: &Export,
    stop: &AtomicBool,
    ready: impl FnOnce(&str),
) -> Result<datamover::reader::ReaderStats> {
    let cache = if how.cache_bytes == 0 {
        datamover::reader::DEFAULT_CACHE
    } else {
        how.cache_bytes
    };
    let disk = PointDisk::open(repo, point, how.writable.as_deref(), cache)?;
    let tls = how
        .tls_certificates
        .as_deref()
        .map(server::tls_config)
        .transpose()?;
    let name = point.disk.to_string();
    let listener = Listener::bind(&how.listen)?;
    ready(&listener.uri(&name, tls.is_some()));
    let opts = ExportOptions { name, tls };
    // Read-ahead loads beside the connections' threads.
    let r = std::thread::scope(|s| {
        s.spawn(|| disk.reader().prefetcher(stop));
        server::serve(&listener, &disk, &opts, stop)
    });
    if let Some(path) = how.listen.strip_prefix("unix:") {
        let _ = std::fs::remove_file(path);
    }
    r.map(|()| disk.reader().stats())
}
