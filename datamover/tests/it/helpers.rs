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
