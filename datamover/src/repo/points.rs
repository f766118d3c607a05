//! Restore points on disk: `points/<vm>/<disk>/<point id>.point`.
//!
//! Invariant: a `.point` file is visible only once complete (written to
//! `tmp/` and renamed); ids sort by time, so the newest is the last.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::Repository;
use crate::error::{Error, IoContext, Result};
use crate::format::manifest::{
    self, FOOTER_LEN, MANIFEST_VERSION, Manifest, ManifestError, PointMeta,
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
        let path = self.point_path(disk, id);
        let mut f = File::open(&path).ctx("open", &path)?;
        let len = f.metadata().ctx("stat", &path)?.len();
        let mut head = [0u8; manifest::HEADER_LEN];
        f.read_exact(&mut head)
            .map_err(|_| Error::corrupt("point manifest", &path, "truncated"))?;
        manifest::check_header(&head).map_err(|e| map_err(&path, e))?;
        if len < (manifest::HEADER_LEN + 1 + FOOTER_LEN) as u64 {
            return Err(Error::corrupt("point manifest", &path, "truncated"));
        }
        let mut foot = [0u8; FOOTER_LEN];
        f.seek(SeekFrom::Start(len - FOOTER_LEN as u64))
            .ctx("seek", &path)?;
        f.read_exact(&mut foot).ctx("read", &path)?;
        let footer = manifest::parse_footer(&foot).map_err(|e| map_err(&path, e))?;
        let start = (len - FOOTER_LEN as u64)
            .checked_sub(u64::from(footer.meta_len))
            .ok_or_else(|| {
                Error::corrupt("point manifest", &path, "metadata length beyond file")
            })?;
        let mut meta = vec![0u8; footer.meta_len as usize];
        f.seek(SeekFrom::Start(start)).ctx("seek", &path)?;
        f.read_exact(&mut meta).ctx("read", &path)?;
        let meta = manifest::parse_meta(&footer, &meta).map_err(|e| map_err(&path, e))?;
        Ok(PointSummary {
            disk: disk.clone(),
            id: id.clone(),
            meta,
            manifest_len: len,
        })
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

    /// Read and check a whole manifest.
    pub fn read_point(&self, disk: &DiskName, id: &PointId) -> Result<Manifest> {
        let path = self.point_path(disk, id);
        let mut f = File::open(&path).ctx("open", &path)?;
        let len = f.metadata().ctx("stat", &path)?.len();
        if len > manifest::MAX_MANIFEST_LEN {
            return Err(Error::corrupt(
                "point manifest",
                &path,
                "larger than the 1 GiB limit",
            ));
        }
        let mut b = Vec::with_capacity(len as usize);
        f.read_to_end(&mut b).ctx("read", &path)?;
        let m = manifest::decode(&b).map_err(|e| map_err(&path, e))?;
        if m.meta.name != disk.to_string() || m.meta.point != id.as_str() {
            return Err(Error::corrupt(
                "point manifest",
                &path,
                "names another disk or point",
            ));
        }
        Ok(m)
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
