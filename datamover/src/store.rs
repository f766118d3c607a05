//! Where a backup writes: the seam between the pipeline and storage.
//!
//! [`backup_to`](crate::backup::backup_to) talks to a [`Store`] and the
//! [`StoreSession`] it opens per new point. A local [`Repository`] is one;
//! a repository service reached over the network (the proxy crate's
//! client) is another. The pipeline asks the session whether a chunk is
//! stored already ([`StoreSession::has`]), hands new frames to its
//! [`FrameSink`] and finally commits the manifest, which the store publishes
//! only after every frame the manifest names is durable.
//!
//! The receiving side of a repository service runs [`Ingest`]: it takes
//! frames from the wire, checks each one (header, CRC, BLAKE3 of the
//! decompressed bytes), stores the new ones and refuses a manifest that
//! names a chunk the repository does not hold.

use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};
use crate::format::frame::{FrameDecoder, FrameHeader};
use crate::format::manifest::{self, Extent, PointMeta};
use crate::ids::{ChunkId, DiskName, PointId};
use crate::repo::{Index, PackWriter, PointFile, RepoLock, Repository};
use crate::sys::LockMode;

/// Somewhere points can be written.
pub trait Store: Sync {
    /// Where it is, for messages: a path or a service address.
    fn describe(&self) -> String;
    /// The metadata of the newest point of `disk`, if any.
    fn latest_meta(&self, disk: &DiskName) -> Result<Option<(PointId, PointMeta)>>;
    /// Start a new point of `disk`; nothing is visible until
    /// [`StoreSession::commit`].
    fn begin<'s>(
        &'s self,
        disk: &DiskName,
        started: chrono::DateTime<chrono::Utc>,
    ) -> Result<Box<dyn StoreSession + 's>>;
}

/// One point being written.
pub trait StoreSession: Sync {
    /// The new point's id.
    fn point(&self) -> &PointId;
    /// The disk's newest point (its manifest, open, its extents read as
    /// they are needed), to build on and dedupe against.
    fn parent(&self) -> Result<Option<(PointId, PointFile)>>;
    /// Whether the store holds chunk `id` already (`false` when unsure: the
    /// sink may still find it there and skip sending it).
    fn has(&self, id: &ChunkId) -> bool;
    /// A chunk of `m` the store is known to lack (a parent that cannot be
    /// built on), or `None`; reading `m` through checks it.
    fn missing_of(&self, m: &PointFile) -> Result<Option<ChunkId>>;
    /// Where new frames go (one sink per session).
    fn sink(&self, pack_target: u64) -> Result<Box<dyn FrameSink + '_>>;
    /// A temp file for the new manifest.
    fn manifest_temp(&self) -> Result<(File, PathBuf)>;
    /// Publish the manifest written (and fsynced) at `path`, after every
    /// frame was finished by the sink.
    fn commit(self: Box<Self>, path: &Path) -> Result<()>;
}

/// Takes the frames of new chunks.
pub trait FrameSink: Send {
    /// One encoded frame of chunk `id` (`plain_len` bytes).
    fn add(&mut self, id: ChunkId, plain_len: u32, frame: Vec<u8>) -> Result<()>;
    /// Make every frame added durable and findable.
    fn finish(self: Box<Self>) -> Result<()>;
}

impl FrameSink for PackWriter<'_> {
    fn add(&mut self, id: ChunkId, plain_len: u32, frame: Vec<u8>) -> Result<()> {
        PackWriter::add(self, id, plain_len, &frame)
    }
    fn finish(self: Box<Self>) -> Result<()> {
        self.commit()
    }
}

/// A new point of a local repository: holds the shared lock (so garbage
/// collection cannot remove a chunk counted as stored) and the index.
pub struct LocalSession<'r> {
    repo: &'r Repository,
    _lock: Option<RepoLock>,
    disk: DiskName,
    point: PointId,
    index: std::sync::Arc<Index>,
}

impl std::fmt::Debug for LocalSession<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalSession")
            .field("repo", &self.repo.root())
            .field("disk", &self.disk)
            .field("point", &self.point)
            .finish()
    }
}

impl<'r> LocalSession<'r> {
    /// Lock `repo`, load its index and pick the new point's id.
    pub fn begin(
        repo: &'r Repository,
        disk: &DiskName,
        started: chrono::DateTime<chrono::Utc>,
    ) -> Result<Self> {
        let lock = repo.lock(LockMode::Shared, true)?;
        let point = repo.new_point_id(disk, started)?;
        let index = std::sync::Arc::new(repo.load_index()?);
        Ok(LocalSession {
            repo,
            _lock: lock,
            disk: disk.clone(),
            point,
            index,
        })
    }

    /// The repository.
    pub fn repo(&self) -> &'r Repository {
        self.repo
    }
}

impl StoreSession for LocalSession<'_> {
    fn point(&self) -> &PointId {
        &self.point
    }
    fn parent(&self) -> Result<Option<(PointId, PointFile)>> {
        match self.repo.point_ids(&self.disk)?.pop() {
            None => Ok(None),
            Some(p) => {
                let m = self.repo.open_point(&self.disk, &p)?;
                Ok(Some((p, m)))
            }
        }
    }
    fn has(&self, id: &ChunkId) -> bool {
        self.index.contains(id)
    }
    fn missing_of(&self, m: &PointFile) -> Result<Option<ChunkId>> {
        for e in m.extents()? {
            match e? {
                Extent::Chunk { id, .. } if !self.index.contains(&id) => return Ok(Some(id)),
                _ => {}
            }
        }
        Ok(None)
    }
    fn sink(&self, pack_target: u64) -> Result<Box<dyn FrameSink + '_>> {
        Ok(Box::new(PackWriter::with_target(self.repo, pack_target)))
    }
    fn manifest_temp(&self) -> Result<(File, PathBuf)> {
        self.repo.temp_file("point")
    }
    fn commit(self: Box<Self>, path: &Path) -> Result<()> {
        self.repo.publish(
            path,
            &self.repo.disk_dir(&self.disk),
            &format!("{}.point", self.point),
        )?;
        Ok(())
    }
}

impl Store for Repository {
    fn describe(&self) -> String {
        self.root().display().to_string()
    }
    fn latest_meta(&self, disk: &DiskName) -> Result<Option<(PointId, PointMeta)>> {
        match self.point_ids(disk)?.pop() {
            None => Ok(None),
            Some(p) => {
                let s = self.point_meta(disk, &p)?;
                Ok(Some((p, s.meta)))
            }
        }
    }
    fn begin<'s>(
        &'s self,
        disk: &DiskName,
        started: chrono::DateTime<chrono::Utc>,
    ) -> Result<Box<dyn StoreSession + 's>> {
        Ok(Box::new(LocalSession::begin(self, disk, started)?))
    }
}

/// The frames of a run of whole frames, each with its parsed header; a
/// header that does not parse or a frame cut short ends the walk with an
/// error.
fn frames(mut b: &[u8]) -> impl Iterator<Item = Result<(FrameHeader, &[u8])>> {
    let bad = |d: String| Error::corrupt("received frame", Path::new("repository service"), d);
    std::iter::from_fn(move || {
        if b.is_empty() {
            return None;
        }
        let r = FrameHeader::parse(b).map_err(bad).and_then(|h| {
            let n = usize::try_from(h.frame_len()).map_err(|_| bad("frame too long".into()))?;
            let frame = b
                .get(..n)
                .ok_or_else(|| bad(format!("truncated ({} of {n} bytes)", b.len())))?;
            Ok((h, frame))
        });
        match &r {
            Ok((_, f)) => b = &b[f.len()..],
            Err(_) => b = &[],
        }
        Some(r)
    })
}

/// A run of frames every one of which was checked: the only thing
/// [`Ingest::add_checked`] stores.
#[derive(Debug)]
pub struct Checked(Vec<u8>);

impl Checked {
    /// The run's buffer, for the next message.
    pub fn into_inner(self) -> Vec<u8> {
        self.0
    }
}

/// Checks runs of received frames, one checker a thread (each keeps its
/// own decompression context and buffer).
pub struct FrameChecker {
    dec: FrameDecoder,
}

impl std::fmt::Debug for FrameChecker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FrameChecker")
    }
}

impl FrameChecker {
    /// A checker.
    pub fn new() -> Result<Self> {
        Ok(FrameChecker {
            dec: FrameDecoder::new().map_err(|e| Error::Internal(e.to_string()))?,
        })
    }

    /// Check every frame of `run`: header, CRC, and the BLAKE3 of its
    /// decompressed bytes against the id it claims; a damaged or
    /// truncated frame is an error naming its place (`first` numbers the
    /// run's first frame in its session).
    pub fn check(&mut self, run: Vec<u8>, first: u64) -> Result<Checked> {
        let bad = |d: String| Error::corrupt("received frame", Path::new("repository service"), d);
        for (n, f) in (first..).zip(frames(&run)) {
            let (h, frame) = f.map_err(|e| match e {
                Error::Corrupt { detail, .. } => bad(format!("frame {n}: {detail}")),
                e => e,
            })?;
            self.dec
                .check(frame, Some(h.id))
                .map_err(|d| bad(format!("frame {n} (chunk {}): {d}", h.id.short())))?;
        }
        Ok(Checked(run))
    }
}

/// The receiving end of a repository service: one new point of one disk,
/// written from frames that arrive over the wire. Frames are checked
/// before they are stored; chunks the repository (or this session) holds
/// already are dropped.
pub struct Ingest<'r> {
    session: LocalSession<'r>,
    sink: PackWriter<'r>,
    added: HashSet<ChunkId>,
    /// Frames received and checked.
    pub frames: u64,
    /// Frames stored (the rest were held already).
    pub frames_new: u64,
    /// Frame bytes stored.
    pub bytes_new: u64,
}

impl std::fmt::Debug for Ingest<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ingest")
            .field("session", &self.session)
            .field("frames", &self.frames)
            .field("frames_new", &self.frames_new)
            .finish()
    }
}

impl<'r> Ingest<'r> {
    /// Begin a new point of `disk` in `repo`.
    pub fn begin(
        repo: &'r Repository,
        disk: &DiskName,
        started: chrono::DateTime<chrono::Utc>,
    ) -> Result<Self> {
        let session = LocalSession::begin(repo, disk, started)?;
        Ok(Ingest {
            sink: PackWriter::new(repo),
            session,
            added: HashSet::new(),
            frames: 0,
            frames_new: 0,
            bytes_new: 0,
        })
    }

    /// The new point's id.
    pub fn point(&self) -> &PointId {
        &self.session.point
    }

    /// The disk's newest point.
    pub fn parent(&self) -> Result<Option<(PointId, PointFile)>> {
        self.session.parent()
    }

    /// Whether the repository or this session holds chunk `id`.
    pub fn has(&self, id: &ChunkId) -> bool {
        self.session.index.contains(id) || self.added.contains(id)
    }

    /// The repository's index as it was when the session began, to
    /// answer "which of these chunks are held?" on another thread while
    /// this one checks and stores frames.
    pub fn held_at_begin(&self) -> std::sync::Arc<Index> {
        self.session.index.clone()
    }

    /// The chunk ids of a run of whole frames, from their headers alone
    /// (nothing is checked beyond the headers and lengths; a run that does
    /// not parse is an error, as [`FrameChecker::check`] would say).
    pub fn frame_ids(b: &[u8]) -> Result<Vec<ChunkId>> {
        let mut out = Vec::new();
        for f in frames(b) {
            out.push(f?.0.id);
        }
        Ok(out)
    }

    /// Store a run a [`FrameChecker`] checked (checks run in parallel on
    /// other threads, stores in one place); chunks held already are
    /// dropped.
    pub fn add_checked(&mut self, run: &Checked) -> Result<()> {
        for f in frames(&run.0) {
            let (h, frame) = f?;
            self.frames += 1;
            if !self.has(&h.id) {
                self.sink.add(h.id, h.plain_len, frame)?;
                self.added.insert(h.id);
                self.frames_new += 1;
                self.bytes_new += frame.len() as u64;
            }
        }
        Ok(())
    }

    /// A temp file in the repository for the manifest to be received
    /// (written as its parts arrive, then given to [`Ingest::commit`]).
    pub fn manifest_temp(&self) -> Result<(File, PathBuf)> {
        self.session.manifest_temp()
    }

    /// Check the manifest received into `path` (a file of
    /// [`Ingest::manifest_temp`], written and synced): its disk, its point,
    /// every extent, every chunk it names is held. Then make every frame
    /// durable and publish the point. The file is read a piece at a time,
    /// whatever the disk's size, and is gone afterwards, published or
    /// removed.
    pub fn commit(self, path: &Path) -> Result<PointMeta> {
        let r = self.commit_file(path);
        if r.is_err() {
            let _ = std::fs::remove_file(path);
        }
        r
    }

    fn commit_file(self, path: &Path) -> Result<PointMeta> {
        let Ingest {
            session,
            sink,
            added,
            ..
        } = self;
        // Messages name what it is, not the temp file.
        let named = PathBuf::from("received manifest");
        let m = PointFile::from_file(File::open(path).ctx("open", path)?, &named)?;
        if m.meta.name != session.disk.to_string() || m.meta.point != session.point.as_str() {
            return Err(Error::corrupt(
                "point manifest",
                &named,
                format!(
                    "it names {}@{}, this session writes {}@{}",
                    m.meta.name, m.meta.point, session.disk, session.point
                ),
            ));
        }
        for e in m.extents()? {
            if let Extent::Chunk { id, .. } = e? {
                if !session.index.contains(&id) && !added.contains(&id) {
                    return Err(Error::ChunkMissing {
                        chunk: id,
                        at: Some(format!(
                            "the manifest of {}@{}",
                            session.disk, session.point
                        )),
                    });
                }
            }
        }
        sink.commit()?;
        let meta = m.meta;
        Box::new(session).commit(path)?;
        Ok(meta)
    }
}

/// Read the manifest file at `path` (at most
/// [`manifest::MAX_MANIFEST_LEN`] bytes) `part` bytes at a time, handing
/// each piece to `f`: what a manifest sent over the wire costs in memory.
pub fn manifest_parts(
    path: &Path,
    part: usize,
    mut f: impl FnMut(&[u8]) -> Result<()>,
) -> Result<()> {
    use std::io::Read;
    let mut file = File::open(path).ctx("open", path)?;
    let len = file.metadata().ctx("stat", path)?.len();
    if len > manifest::MAX_MANIFEST_LEN {
        return Err(Error::corrupt(
            "point manifest",
            path,
            "larger than the 1 GiB limit",
        ));
    }
    let mut buf = vec![0u8; part.max(1).min(len as usize)];
    let mut left = len;
    while left > 0 {
        let n = buf.len().min(left as usize);
        file.read_exact(&mut buf[..n]).ctx("read", path)?;
        f(&buf[..n])?;
        left -= n as u64;
    }
    Ok(())
}
