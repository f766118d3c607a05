//! Random access to a restore point: what an NBD export of a point (and an
//! instant recovery) reads. Every chunk is checked as a restore checks it
//! (the frame's CRC, the BLAKE3 of the plain bytes against the chunk's id)
//! and kept in a cache bounded by bytes; a damaged or missing chunk is an
//! error for the reads that touch it, never wrong data. Zero runs are
//! answered without touching the repository.
//!
//! Read-ahead: a read that starts where a recent one ended continues a
//! sequential run; the chunks after it (up to [`READ_AHEAD`] bytes) are
//! queued for [`PointReader::prefetcher`], a worker the caller runs, which
//! loads them into the cache while the client takes the data it has.
//!
//! Where the chunks come from is a [`ChunkSource`]: a repository on this
//! host ([`PointReader::open`]), or a repository service holding one (the
//! proxy's client, through [`PointReader::new`]), which is asked for the
//! chunks read and nothing else. Either way the frames are checked here.
//! [`PointSource`] is what an export or an instant recovery opens points
//! through.
//!
//! Invariant: the chunk source holds the repository's shared lock (here,
//! or in the service's session), so garbage collection cannot remove a
//! chunk of the point while it is served.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::format::frame::FrameDecoder;
use crate::format::manifest::{Extent, Place, PointMeta};
use crate::ids::{ChunkId, DiskName, PointId};
use crate::repo::Index;
use crate::repo::{PackReader, PointFile, RepoLock, Repository};
use crate::sys::LockMode;

/// Default cache size.
pub const DEFAULT_CACHE: u64 = 64 << 20;
/// How far ahead of a sequential run chunks are loaded.
pub const READ_AHEAD: u64 = 8 << 20;
/// Sequential runs followed at once (the ends of the latest reads).
const RUNS: usize = 16;

/// Chunks decoded, for a benchmark or a test to see what a read cost.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReaderStats {
    /// Chunks read from packs (and checked).
    pub chunks_loaded: u64,
    /// Their plain bytes.
    pub bytes_loaded: u64,
    /// Reads of a chunk the cache held.
    pub hits: u64,
}

/// Buffers of evicted chunks kept for the next loads.
const SPARE: usize = 8;

/// A bounded LRU of decoded chunks.
struct Cache {
    max: u64,
    bytes: u64,
    tick: u64,
    map: HashMap<ChunkId, (Arc<Vec<u8>>, u64)>,
    /// Buffers of evicted chunks no read holds any more: a load reuses
    /// one instead of clearing a fresh one (a clear and its page faults
    /// cost a random read about a sixth of its time).
    spare: Vec<Vec<u8>>,
}

impl Cache {
    fn get(&mut self, id: &ChunkId) -> Option<Arc<Vec<u8>>> {
        self.tick += 1;
        let t = self.tick;
        self.map.get_mut(id).map(|(b, used)| {
            *used = t;
            b.clone()
        })
    }

    /// A buffer of `len` bytes for a chunk to load (what it holds is to
    /// be overwritten).
    fn buffer(&mut self, len: usize) -> Vec<u8> {
        let mut b = self
            .spare
            .iter()
            .position(|b| b.capacity() >= len)
            .map(|i| self.spare.swap_remove(i))
            .unwrap_or_default();
        b.resize(len, 0);
        b
    }

    fn put(&mut self, id: ChunkId, b: Arc<Vec<u8>>) {
        let len = b.len() as u64;
        if len > self.max {
            return;
        }
        while self.bytes + len > self.max {
            let Some(old) = self
                .map
                .iter()
                .min_by_key(|(_, (_, u))| *u)
                .map(|(k, _)| *k)
            else {
                break;
            };
            if let Some((b, _)) = self.map.remove(&old) {
                self.bytes -= b.len() as u64;
                if let Ok(b) = Arc::try_unwrap(b)
                    && self.spare.len() < SPARE
                {
                    self.spare.push(b);
                }
            }
        }
        self.tick += 1;
        if self.map.insert(id, (b, self.tick)).is_none() {
            self.bytes += len;
        }
    }
}

/// Where a point's chunks are read from.
pub trait ChunkSource: Send + Sync {
    /// Decode chunk `id` (`len` plain bytes, as the manifest says) into
    /// `out` with `dec`, which checks the frame's CRC and the BLAKE3 of
    /// the plain bytes against `id`; the bytes decoded.
    fn read_chunk(
        &self,
        dec: &mut FrameDecoder,
        id: ChunkId,
        len: u32,
        out: &mut [u8],
    ) -> Result<usize>;
}

/// The chunks of a repository on this host, under its shared lock.
struct LocalChunks<'r> {
    index: Index,
    packs: PackReader<'r>,
    _lock: Option<RepoLock>,
}

impl ChunkSource for LocalChunks<'_> {
    fn read_chunk(
        &self,
        dec: &mut FrameDecoder,
        id: ChunkId,
        len: u32,
        out: &mut [u8],
    ) -> Result<usize> {
        let loc = self.index.get(&id).ok_or(Error::ChunkMissing {
            chunk: id,
            at: None,
        })?;
        if loc.plain_len != len {
            return Err(Error::ChunkDamaged {
                chunk: id,
                pack: loc.pack,
                pack_offset: loc.offset,
                at: None,
                detail: format!("the manifest says {len} bytes, the index {}", loc.plain_len),
            });
        }
        self.packs.read_chunk_into(dec, id, &loc, out)
    }
}

/// Points to open for reads: a repository on this host, or one a
/// repository service holds.
pub trait PointSource: Sync {
    /// Where the points are, for messages and the session's record.
    fn describe(&self) -> String;
    /// The disks whose points it holds.
    fn disks(&self) -> Result<Vec<DiskName>>;
    /// The point of `disk` that `wanted` names (an id or its prefix; none:
    /// the newest).
    fn resolve(&self, disk: &DiskName, wanted: Option<&str>) -> Result<PointId>;
    /// The metadata of a point.
    fn meta(&self, disk: &DiskName, point: &PointId) -> Result<PointMeta>;
    /// Open a point for reads, with a chunk cache of at most `cache_bytes`.
    fn open_point(
        &self,
        disk: &DiskName,
        point: &PointId,
        cache_bytes: u64,
    ) -> Result<PointReader<'_>>;
}

impl PointSource for Repository {
    fn describe(&self) -> String {
        self.root().display().to_string()
    }
    fn disks(&self) -> Result<Vec<DiskName>> {
        Repository::disks(self)
    }
    fn resolve(&self, disk: &DiskName, wanted: Option<&str>) -> Result<PointId> {
        self.resolve_point(disk, wanted)
    }
    fn meta(&self, disk: &DiskName, point: &PointId) -> Result<PointMeta> {
        Ok(self.point_meta(disk, point)?.meta)
    }
    fn open_point(
        &self,
        disk: &DiskName,
        point: &PointId,
        cache_bytes: u64,
    ) -> Result<PointReader<'_>> {
        PointReader::open(self, disk, point, cache_bytes)
    }
}

/// A point opened for reads at any offset.
pub struct PointReader<'r> {
    disk: DiskName,
    point: PointId,
    size: u64,
    /// Its extents, read from the manifest file by blocks.
    map: ExtentMap,
    chunks: Box<dyn ChunkSource + 'r>,
    cache: Mutex<Cache>,
    loaded: AtomicU64,
    loaded_bytes: AtomicU64,
    hits: AtomicU64,
    /// Where the latest reads ended (sequential runs continue there).
    ends: Mutex<[u64; RUNS]>,
    /// Chunks (disk offset, id, length) to load ahead; bounded, a full
    /// queue drops.
    ahead: (
        crossbeam_channel::Sender<Ahead>,
        crossbeam_channel::Receiver<Ahead>,
    ),
}

/// A chunk to load ahead: its disk offset, id and length.
type Ahead = (u64, ChunkId, u32);

/// A block of the map, decoded: (offset, extent)s.
type Block = Arc<Vec<(u64, Extent)>>;

/// Extents per block of the map.
const BLOCK: u64 = 4096;
/// Decoded blocks kept (about 200 KiB each).
const BLOCKS_KEPT: usize = 8;

/// A point's extents for reads at any offset, in memory that does not grow
/// with the disk: the manifest file stays open, a pass at open checks it
/// whole and notes where every [`BLOCK`]th extent lies, and a read decodes
/// the block it needs (a few are kept, most recent first).
struct ExtentMap {
    file: PointFile,
    /// Where each block starts, in disk order.
    places: Vec<Place>,
    /// Decoded blocks: (block number, its (offset, extent)s).
    kept: Mutex<std::collections::VecDeque<(usize, Block)>>,
}

impl ExtentMap {
    fn new(file: PointFile) -> Result<Self> {
        let mut places = Vec::new();
        {
            let mut it = file.extents()?;
            loop {
                let place = it.place();
                match it.next() {
                    None => break,
                    Some(e) => {
                        e?;
                        if place.count % BLOCK == 0 {
                            places.push(place);
                        }
                    }
                }
            }
        }
        Ok(ExtentMap {
            file,
            places,
            kept: Mutex::new(std::collections::VecDeque::new()),
        })
    }

    fn block(&self, b: usize) -> Result<Block> {
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = kept.iter().position(|(n, _)| *n == b) {
            let hit = kept
                .remove(i)
                .ok_or_else(|| Error::Internal("block cache".into()))?;
            kept.push_front(hit.clone());
            return Ok(hit.1);
        }
        drop(kept);
        let place = *self
            .places
            .get(b)
            .ok_or_else(|| Error::Internal(format!("extent block {b} beyond the map")))?;
        let mut out = Vec::with_capacity(BLOCK as usize);
        let mut off = place.disk_offset;
        for e in self.file.extents_from(place)?.take(BLOCK as usize) {
            let e = e?;
            out.push((off, e));
            off += e.len();
        }
        let out = Arc::new(out);
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        kept.push_front((b, out.clone()));
        kept.truncate(BLOCKS_KEPT);
        Ok(out)
    }

    /// Visit the extents (offset, extent) from the one holding `off` on,
    /// while `f` says go on.
    fn walk(&self, off: u64, mut f: impl FnMut(u64, Extent) -> Result<bool>) -> Result<()> {
        let mut b = self
            .places
            .partition_point(|p| p.disk_offset <= off)
            .saturating_sub(1);
        let mut first = true;
        while b < self.places.len() {
            let block = self.block(b)?;
            let from = if first {
                block.partition_point(|(o, _)| *o <= off).saturating_sub(1)
            } else {
                0
            };
            first = false;
            for (o, e) in block.get(from..).unwrap_or_default() {
                if !f(*o, *e)? {
                    return Ok(());
                }
            }
            b += 1;
        }
        Ok(())
    }
}

impl std::fmt::Debug for PointReader<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PointReader")
            .field("disk", &self.disk)
            .field("point", &self.point)
            .field("size", &self.size)
            .finish()
    }
}

impl<'r> PointReader<'r> {
    /// Open `point` of `disk` with a chunk cache of at most `cache_bytes`.
    pub fn open(
        repo: &'r Repository,
        disk: &DiskName,
        point: &PointId,
        cache_bytes: u64,
    ) -> Result<Self> {
        let lock = repo.lock(LockMode::Shared, true)?;
        let m = repo.open_point(disk, point)?;
        let chunks = LocalChunks {
            index: repo.load_index()?,
            packs: PackReader::new(repo),
            _lock: lock,
        };
        PointReader::new(m, Box::new(chunks), cache_bytes)
    }

    /// Point `m` (its manifest, read through and checked here) with its
    /// chunks read from `chunks`, and a chunk cache of at most
    /// `cache_bytes`.
    pub fn new(m: PointFile, chunks: Box<dyn ChunkSource + 'r>, cache_bytes: u64) -> Result<Self> {
        let disk: DiskName = m.meta.name.parse()?;
        let point: PointId = m.meta.point.parse()?;
        let size = m.meta.disk_size;
        Ok(PointReader {
            size,
            disk,
            point,
            map: ExtentMap::new(m)?,
            chunks,
            cache: Mutex::new(Cache {
                max: cache_bytes,
                bytes: 0,
                tick: 0,
                map: HashMap::new(),
                spare: Vec::new(),
            }),
            loaded: AtomicU64::new(0),
            loaded_bytes: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            ends: Mutex::new([u64::MAX; RUNS]),
            ahead: crossbeam_channel::bounded(64),
        })
    }

    /// The disk's size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The disk.
    pub fn disk(&self) -> &DiskName {
        &self.disk
    }

    /// The point.
    pub fn point(&self) -> &PointId {
        &self.point
    }

    /// What reads cost so far.
    pub fn stats(&self) -> ReaderStats {
        ReaderStats {
            chunks_loaded: self.loaded.load(Ordering::Relaxed),
            bytes_loaded: self.loaded_bytes.load(Ordering::Relaxed),
            hits: self.hits.load(Ordering::Relaxed),
        }
    }

    fn out_of_range(&self, off: u64, len: u64) -> Option<Error> {
        (off.checked_add(len).is_none_or(|end| end > self.size)).then(|| {
            Error::InvalidArgument(format!(
                "read of {len} bytes at {off} is beyond the disk's {} bytes",
                self.size
            ))
        })
    }

    /// Read `buf.len()` bytes at `off`.
    pub fn read_at(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        if let Some(e) = self.out_of_range(off, buf.len() as u64) {
            return Err(e);
        }
        self.follow(off, off + buf.len() as u64);
        let mut done = 0usize;
        self.map.walk(off, |start, e| {
            let pos = off + done as u64;
            let skip = (pos - start) as usize;
            let n = ((e.len() - skip as u64) as usize).min(buf.len() - done);
            match e {
                Extent::Zero { .. } => buf[done..done + n].fill(0),
                Extent::Chunk { id, len } => {
                    let c = self.chunk(id, len, start)?;
                    buf[done..done + n].copy_from_slice(&c[skip..skip + n]);
                }
            }
            done += n;
            Ok(done < buf.len())
        })?;
        if done != buf.len() {
            return Err(Error::Internal(format!(
                "{}@{}: the extents end before {}",
                self.disk,
                self.point,
                off + buf.len() as u64
            )));
        }
        Ok(())
    }

    fn chunk(&self, id: ChunkId, len: u32, at: u64) -> Result<Arc<Vec<u8>>> {
        if let Some(b) = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
        {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(b);
        }
        let where_ = || format!("{}@{}, disk offset {at}", self.disk, self.point);
        let mut out = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .buffer(len as usize);
        // One decoder per thread: making one per chunk costs as much as a
        // small chunk's read.
        thread_local! {
            static DEC: std::cell::RefCell<Option<FrameDecoder>> = const { std::cell::RefCell::new(None) };
        }
        let n = DEC
            .with(|d| -> Result<usize> {
                let mut d = d.borrow_mut();
                if d.is_none() {
                    *d = Some(FrameDecoder::new().map_err(|e| Error::Internal(e.to_string()))?);
                }
                let dec = d
                    .as_mut()
                    .ok_or_else(|| Error::Internal("decoder".into()))?;
                self.chunks.read_chunk(dec, id, len, &mut out)
            })
            .map_err(|e| e.used_at(where_()))?;
        if n != len as usize {
            return Err(Error::corrupt(
                "chunk",
                std::path::PathBuf::from(where_()),
                format!("{} holds {n} bytes, the manifest says {len}", id.short()),
            ));
        }
        let b = Arc::new(out);
        self.loaded.fetch_add(1, Ordering::Relaxed);
        self.loaded_bytes.fetch_add(n as u64, Ordering::Relaxed);
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .put(id, b.clone());
        Ok(b)
    }

    /// Note a read of `[off, end)`: when it continues a recent one, queue
    /// the chunks after it that the cache lacks.
    fn follow(&self, off: u64, end: u64) {
        let sequential = {
            let mut ends = self.ends.lock().unwrap_or_else(|p| p.into_inner());
            let hit = ends.iter().position(|e| *e == off);
            let slot = hit.unwrap_or_else(|| {
                // Replace the oldest: the ends are kept in recency order.
                ends.len() - 1
            });
            ends.copy_within(0..slot, 1);
            ends[0] = end;
            hit.is_some()
        };
        if !sequential || end >= self.size {
            return;
        }
        let stop = end.saturating_add(READ_AHEAD);
        let r = self.map.walk(end, |start, e| {
            if start >= stop {
                return Ok(false);
            }
            if let Extent::Chunk { id, len } = e {
                if !self.cached(&id) && self.ahead.0.try_send((start, id, len)).is_err() {
                    return Ok(false);
                }
            }
            Ok(true)
        });
        if let Err(e) = r {
            tracing::debug!("read-ahead: {e}");
        }
    }

    /// Whether the cache holds chunk `id`.
    fn cached(&self, id: &ChunkId) -> bool {
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map
            .contains_key(id)
    }

    /// Load the chunks reads ahead queued, until `stop` is set: run it in
    /// a thread of its own beside the reads (a damaged chunk is left for
    /// the read that needs it to report).
    pub fn prefetcher(&self, stop: &std::sync::atomic::AtomicBool) {
        let mut last = u64::MAX;
        while !stop.load(Ordering::Relaxed) {
            let Ok((start, id, len)) = self
                .ahead
                .1
                .recv_timeout(std::time::Duration::from_millis(100))
            else {
                continue;
            };
            if start == last {
                continue;
            }
            last = start;
            if !self.cached(&id)
                && let Err(e) = self.chunk(id, len, start)
            {
                tracing::debug!("read-ahead: {e}");
            }
        }
    }

    /// The allocation of `[off, off+len)`: runs of (length, zero), merged,
    /// covering the range (clipped to the disk).
    pub fn runs(&self, off: u64, len: u64) -> Result<Vec<(u64, bool)>> {
        let end = off.saturating_add(len).min(self.size);
        let mut out: Vec<(u64, bool)> = Vec::new();
        if off >= end {
            return Ok(out);
        }
        let mut pos = off;
        self.map.walk(off, |start, e| {
            let n = (start + e.len()).min(end) - pos;
            let zero = matches!(e, Extent::Zero { .. });
            match out.last_mut() {
                Some((l, z)) if *z == zero => *l += n,
                _ => out.push((n, zero)),
            }
            pos += n;
            Ok(pos < end)
        })?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_cache_keeps_the_most_recent_within_its_bytes() {
        let mut c = Cache {
            max: 10,
            bytes: 0,
            tick: 0,
            map: HashMap::new(),
            spare: Vec::new(),
        };
        let id = |n: u8| ChunkId::of(&[n]);
        c.put(id(1), Arc::new(vec![0; 4]));
        c.put(id(2), Arc::new(vec![0; 4]));
        assert!(c.get(&id(1)).is_some());
        c.put(id(3), Arc::new(vec![0; 4]));
        // 2 was the least recently used.
        assert!(c.get(&id(2)).is_none());
        assert!(c.get(&id(1)).is_some() && c.get(&id(3)).is_some());
        assert_eq!(c.bytes, 8);
        c.put(id(4), Arc::new(vec![0; 11]));
        assert!(c.get(&id(4)).is_none(), "larger than the cache");
        // An evicted chunk's buffer is kept for reuse (2's was), one a
        // read holds is not.
        assert_eq!(c.spare.len(), 1);
        let held = c.get(&id(1)).unwrap();
        c.put(id(5), Arc::new(vec![7; 4]));
        c.put(id(6), Arc::new(vec![7; 4]));
        assert!(c.get(&id(1)).is_none() && c.get(&id(3)).is_none());
        assert_eq!(c.spare.len(), 2, "3's, not 1's: a read holds it");
        drop(held);
        let b = c.buffer(3);
        assert_eq!((b.len(), b.capacity() >= 4, c.spare.len()), (3, true, 1));
        assert_eq!(c.buffer(9).len(), 9);
    }
}
