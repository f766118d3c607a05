//! Small wrappers over the library for the tests.
use std::path::Path;

use datamover::{BackupOptions, BackupReport, DiskName, Repository, RestoreOptions};

pub fn backup(repo: &Repository, src: &Path, name: &str, opts: &BackupOptions) -> BackupReport {
    let s = datamover::open_source(src).unwrap_or_else(|e| panic!("open {}: {e}", src.display()));
    let disk: DiskName = name.parse().unwrap_or_else(|e| panic!("{e}"));
    datamover::backup(repo, s.as_ref(), &disk, opts).unwrap_or_else(|e| panic!("backup: {e}"))
}

pub fn restore(
    repo: &Repository,
    name: &str,
    point: Option<&str>,
    target: &Path,
) -> datamover::Result<()> {
    let disk: DiskName = name.parse()?;
    let id = repo.resolve_point(&disk, point)?;
    let size = repo.point_meta(&disk, &id)?.meta.disk_size;
    let t = datamover::open_target(target, size, true)?;
    datamover::restore(repo, &disk, &id, t.as_ref(), &RestoreOptions::default()).map(|_| ())
}

/// Small packs so that tests exercise many packs.
pub fn small_packs() -> BackupOptions {
    BackupOptions {
        pack_target: 2 << 20,
        ..BackupOptions::default()
    }
}

pub fn new_repo(dir: &Path) -> Repository {
    Repository::init(&dir.join("repo")).unwrap_or_else(|e| panic!("init: {e}"))
}

/// A file source that records what is asked of it: the lengths of the
/// extents asked for, and where it is read; `sequential` is what its
/// capabilities say (true: a full backup reads it in one lane).
pub struct Watched {
    pub inner: datamover::source::FileSource,
    pub sequential: bool,
    pub extents_asked: std::sync::atomic::AtomicU64,
    pub reads: std::sync::Mutex<Vec<u64>>,
}

impl Watched {
    pub fn open(img: &Path, sequential: bool) -> Self {
        Watched {
            inner: datamover::source::FileSource::open(img).unwrap_or_else(|e| panic!("{e}")),
            sequential,
            extents_asked: 0.into(),
            reads: std::sync::Mutex::new(Vec::new()),
        }
    }
}

impl datamover::source::BlockSource for Watched {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn preferred_io_size(&self) -> usize {
        self.inner.preferred_io_size()
    }
    fn capabilities(&self) -> datamover::source::Capabilities {
        datamover::source::Capabilities {
            sequential: self.sequential,
            ..self.inner.capabilities()
        }
    }
    fn info(&self) -> datamover::format::manifest::SourceInfo {
        self.inner.info()
    }
    fn transport(&self) -> &'static str {
        self.inner.transport()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> datamover::Result<()> {
        self.reads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(offset);
        self.inner.read_at(offset, buf)
    }
    fn extents(
        &self,
        offset: u64,
        len: u64,
    ) -> datamover::Result<Vec<datamover::source::SourceExtent>> {
        self.extents_asked
            .fetch_add(len, std::sync::atomic::Ordering::Relaxed);
        self.inner.extents(offset, len)
    }
}
