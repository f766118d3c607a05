//! Restore points on disk: `points/<vm>/<disk>/<point id>.point`.
//!
//! Invariant: a `.point` file is visible only once complete (written to
//! `tmp/` and renamed); ids sort by time, so the newest is the last.

use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::Repository;
use crate::error::{Error, IoContext, Result};
use crate::format::manifest::{
    self, Extent, FOOTER_LEN, Footer, MANIFEST_VERSION, Manifest, ManifestError, Place, PointMeta,
};
use crate::ids::{DiskName, PointId};

/// A point as listed: its name, id and metadata (extents not loaded).
#[derive(Debug, Clone)]
pub struct PointSummary {
    /// The disk.
    pub disk: DiskName,
    /// The point.
    pub id: PointId,
    /// Its metadata.
    pub meta: PointMeta,
    /// Manifest file size.
    pub manifest_len: u64,
}

pub(crate) fn map_err(path: &Path, e: ManifestError) -> Error {
    match e {
        ManifestError::Corrupt(d) => Error::corrupt("point manifest", path, d),
        ManifestError::Version(v) => Error::UnsupportedVersion {
            path: path.to_path_buf(),
            found: v,
            supported: MANIFEST_VERSION,
        },
    }
}

impl Repository {
    /// Directory of a disk's points.
    pub(crate) fn disk_dir(&self, disk: &DiskName) -> PathBuf {
        self.path("points").join(disk.vm()).join(disk.disk())
    }

    /// Path of a point's manifest.
    pub fn point_path(&self, disk: &DiskName, id: &PointId) -> PathBuf {
        self.disk_dir(disk).join(format!("{id}.point"))
    }

    /// Every disk that has points, sorted.
    pub fn disks(&self) -> Result<Vec<DiskName>> {
        let mut out = Vec::new();
        let root = self.path("points");
        for vm in fs::read_dir(&root).ctx("list", &root)? {
            let vm = vm.ctx("list", &root)?;
            if !vm.path().is_dir() {
                continue;
            }
            for d in fs::read_dir(vm.path()).ctx("list", &vm.path())? {
                let d = d.ctx("list", &vm.path())?;
                let name = format!(
                    "{}/{}",
                    vm.file_name().to_string_lossy(),
                    d.file_name().to_string_lossy()
                );
                if let Ok(n) = name.parse::<DiskName>() {
                    out.push(n);
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Point ids of a disk, oldest first.
    pub fn point_ids(&self, disk: &DiskName) -> Result<Vec<PointId>> {
        let dir = self.disk_dir(disk);
        let rd = match fs::read_dir(&dir) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io("list", &dir, e)),
        };
        let mut ids = Vec::new();
        for e in rd {
            let e = e.ctx("list", &dir)?;
            let n = e.file_name();
            let n = n.to_string_lossy();
            if let Some(id) = n
                .strip_suffix(".point")
                .and_then(|s| s.parse::<PointId>().ok())
            {
                ids.push(id);
            }
        }
        ids.sort();
        Ok(ids)
    }

    /// A fresh id for a point of `disk` started at `now`: later than every
    /// existing point of the disk, even within the same millisecond.
    pub(crate) fn new_point_id(
        &self,
        disk: &DiskName,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<PointId> {
        let newest = self.point_ids(disk)?.last().and_then(PointId::time);
        let t = match newest {
            Some(n) if n >= now => n + chrono::Duration::milliseconds(1),
            _ => now,
        };
        PointId::new(t)
    }

    /// Read only a point's metadata (footer + JSON).
    pub fn point_meta(&self, disk: &DiskName, id: &PointId) -> Result<PointSummary> {
        let p = self.open_point(disk, id)?;
        Ok(PointSummary {
            disk: disk.clone(),
            id: id.clone(),
            manifest_len: p.len,
            meta: p.meta,
        })
    }

    /// Open a point's manifest: its metadata read and checked (it must
    /// name this disk and point), its extents left on disk to stream.
    pub fn open_point(&self, disk: &DiskName, id: &PointId) -> Result<PointFile> {
        let p = PointFile::open(&self.point_path(disk, id))?;
        if p.meta.name != disk.to_string() || p.meta.point != id.as_str() {
            return Err(Error::corrupt(
                "point manifest",
                &p.path,
                "names another disk or point",
            ));
        }
        Ok(p)
    }

    /// List points (of one disk, or all), oldest first per disk. Manifests
    /// that cannot be read are returned apart.
    pub fn list_points(&self, disk: Option<&DiskName>) -> Result<(Vec<PointSummary>, Vec<Error>)> {
        let disks = match disk {
            Some(d) => vec![d.clone()],
            None => self.disks()?,
        };
        let (mut ok, mut bad) = (Vec::new(), Vec::new());
        for d in &disks {
            for id in self.point_ids(d)? {
                match self.point_meta(d, &id) {
                    Ok(s) => ok.push(s),
                    Err(e) => bad.push(e),
                }
            }
        }
        Ok((ok, bad))
    }

    /// Read and check a whole manifest into memory (at most
    /// [`manifest::MAX_MANIFEST_LEN`] bytes of it); [`Self::open_point`]
    /// streams the extents instead.
    pub fn read_point(&self, disk: &DiskName, id: &PointId) -> Result<Manifest> {
        let p = self.open_point(disk, id)?;
        if p.len > manifest::MAX_MANIFEST_LEN {
            return Err(Error::corrupt(
                "point manifest",
                &p.path,
                "larger than the 1 GiB limit",
            ));
        }
        // extents() bounds the count by the file's size.
        let records = p.extents()?;
        let mut extents = Vec::with_capacity(p.footer.extents as usize);
        for e in records {
            extents.push(e?);
        }
        Ok(Manifest {
            meta: p.meta,
            extents,
        })
    }

    /// Find a point: `None` or "latest" is the newest, otherwise an id or a
    /// unique prefix of one.
    pub fn resolve_point(&self, disk: &DiskName, wanted: Option<&str>) -> Result<PointId> {
        let ids = self.point_ids(disk)?;
        let not_found = || Error::PointNotFound {
            disk: disk.clone(),
            wanted: wanted.unwrap_or("latest").to_owned(),
        };
        match wanted {
            None | Some("latest") => ids.last().cloned().ok_or_else(not_found),
            Some(w) => {
                let m: Vec<&PointId> = ids.iter().filter(|i| i.as_str().starts_with(w)).collect();
                match m.as_slice() {
                    [one] => Ok((*one).clone()),
                    [] => Err(not_found()),
                    _ => Err(Error::InvalidArgument(format!(
                        "point prefix {w:?} matches {} points of {disk}; give more of the id",
                        m.len()
                    ))),
                }
            }
        }
    }
}

/// A point's manifest file, open: its metadata read and checked, its
/// extents read on demand ([`PointFile::extents`], as often as needed), so
/// a manifest of any size costs bounded memory. The file stays open, so a
/// point removed meanwhile (by prune) still reads to its end.
#[derive(Debug)]
pub struct PointFile {
    file: File,
    path: PathBuf,
    footer: Footer,
    body_len: u64,
    len: u64,
    /// Its metadata.
    pub meta: PointMeta,
}

impl PointFile {
    /// Open the manifest at `path`.
    pub fn open(path: &Path) -> Result<PointFile> {
        PointFile::from_file(File::open(path).ctx("open", path)?, path)
    }

    /// Take an open manifest file (`path` names it in messages): check its
    /// header, footer and metadata.
    pub fn from_file(file: File, path: &Path) -> Result<PointFile> {
        let len = file.metadata().ctx("stat", path)?.len();
        let trunc = || Error::corrupt("point manifest", path, "truncated");
        let mut head = [0u8; manifest::HEADER_LEN];
        file.read_exact_at(&mut head, 0).map_err(|_| trunc())?;
        manifest::check_header(&head).map_err(|e| map_err(path, e))?;
        if len < (manifest::HEADER_LEN + 1 + FOOTER_LEN) as u64 {
            return Err(trunc());
        }
        let mut foot = [0u8; FOOTER_LEN];
        file.read_exact_at(&mut foot, len - FOOTER_LEN as u64)
            .ctx("read", path)?;
        let footer = manifest::parse_footer(&foot).map_err(|e| map_err(path, e))?;
        let body_len = manifest::body_len(len, &footer).map_err(|e| map_err(path, e))?;
        let mut meta = vec![0u8; footer.meta_len as usize];
        file.read_exact_at(&mut meta, body_len).ctx("read", path)?;
        let meta = manifest::parse_meta(&footer, &meta).map_err(|e| map_err(path, e))?;
        Ok(PointFile {
            file,
            path: path.to_path_buf(),
            footer,
            body_len,
            len,
            meta,
        })
    }

    /// Read the extents through once, checking them all (CRC, count and
    /// size against the footer): an error here means the manifest is
    /// damaged.
    pub fn check(&self) -> Result<()> {
        for e in self.extents()? {
            e?;
        }
        Ok(())
    }

    /// The extents in disk order, read from the file as they are taken.
    /// Their CRC is checked at the end: trust what was taken only once the
    /// iterator returned `None`.
    pub fn extents(&self) -> Result<PointExtents<'_>> {
        let r = ReadAt {
            file: &self.file,
            at: 0,
        };
        let records = manifest::Records::new(r, &self.footer, self.body_len)
            .map_err(|e| map_err(&self.path, e))?;
        Ok(PointExtents {
            records,
            path: &self.path,
        })
    }

    /// The extents from `place` on (a [`PointExtents::place`] of an
    /// earlier pass over this file, which checked it whole).
    pub fn extents_from(&self, place: Place) -> Result<PointExtents<'_>> {
        let r = ReadAt {
            file: &self.file,
            at: place.at,
        };
        let records = manifest::Records::resume(r, &self.footer, self.body_len, place)
            .map_err(|e| map_err(&self.path, e))?;
        Ok(PointExtents {
            records,
            path: &self.path,
        })
    }
}

/// The extents of a [`PointFile`], read as they are taken.
#[derive(Debug)]
pub struct PointExtents<'a> {
    records: manifest::Records<ReadAt<'a>>,
    path: &'a Path,
}

impl PointExtents<'_> {
    /// Where the next extent lies (to read on from there later with
    /// [`PointFile::extents_from`]).
    pub fn place(&self) -> Place {
        self.records.place()
    }
}

impl Iterator for PointExtents<'_> {
    type Item = Result<Extent>;
    fn next(&mut self) -> Option<Result<Extent>> {
        self.records
            .next()
            .map(|r| r.map_err(|e| map_err(self.path, e)))
    }
}

/// Reads a file from `at` on without moving its shared offset, so several
/// readers of one open file do not disturb each other.
#[derive(Debug)]
struct ReadAt<'f> {
    file: &'f File,
    at: u64,
}

impl Read for ReadAt<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read_at(buf, self.at)?;
        self.at += n as u64;
        Ok(n)
    }
}
