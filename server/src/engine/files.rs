//! A point's files through the API: a listing, or a tar archive, made by
//! the proxy holding the repository in its file-level restore appliance;
//! an archive is uploaded to the server (`<data>/files/ID.tar`, kept a
//! day) and downloaded from it.

use std::path::PathBuf;

use super::*;
use datamover_control::api::{FilesJob, FilesOp, FilesRequest};

/// How long an archive is kept at the server.
const KEEP: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

impl Engine {
    fn files_dir(&self) -> R<&PathBuf> {
        self.files_dir
            .as_ref()
            .ok_or_else(|| EngineError::unavailable("this server keeps no file archives"))
    }

    /// Ask for `req` of the proxy holding its repository.
    pub fn create_files_job(&self, req: &FilesRequest) -> R<FilesJob> {
        req.point
            .parse::<datamover::PointRef>()
            .map_err(|e| EngineError::bad(format!("point {:?}: {e}", req.point)))?;
        match (req.op, req.paths.len()) {
            (FilesOp::Ls, 0 | 1) => {}
            (FilesOp::Ls, _) => return Err(EngineError::bad("ls takes one path")),
            (FilesOp::Tar, 0) => return Err(EngineError::bad("tar needs the paths to archive")),
            (FilesOp::Tar, _) => {}
        }
        if let Some(p) = req
            .paths
            .iter()
            .find(|p| !p.starts_with('/') || p.contains('\0') || p.len() > 4096)
        {
            return Err(EngineError::bad(format!(
                "path {p:?}: give /FILESYSTEM/PATH"
            )));
        }
        if req.op == FilesOp::Tar {
            self.prune_archives();
        }
        let mut db = self.db();
        let tx = db.transaction()?;
        let (holder, _, pid) = Self::holding_proxy(
            &tx,
            &req.repository,
            "files are read by the proxy holding the repository",
        )?;
        let id = catalog::files::insert(&tx, req, (pid, &holder), &self.clock.rfc3339())?;
        tx.commit()?;
        drop(db);
        self.files_job(id)
    }

    /// One file request.
    pub fn files_job(&self, id: u64) -> R<FilesJob> {
        catalog::files::get(&self.db(), id)?
            .ok_or_else(|| EngineError::not_found("file request", id))
    }

    /// Where the proxy on `host` puts tar request `id`'s archive: (the
    /// file to write first, the archive's path).
    pub fn files_upload_to(&self, host: HostId, id: u64) -> R<(PathBuf, PathBuf)> {
        let dir = self.files_dir()?.clone();
        let db = self.db();
        let pid = Self::proxy_id(&db, host)?
            .ok_or_else(|| EngineError::forbidden("this host is not a registered proxy"))?;
        if !catalog::files::uploads(&db, pid, id)? {
            return Err(EngineError::forbidden(format!(
                "file request {id} is no running tar request of this proxy"
            )));
        }
        std::fs::create_dir_all(&dir)
            .map_err(|e| EngineError::unavailable(format!("{}: {e}", dir.display())))?;
        Ok((
            dir.join(format!("{id}.tar.part")),
            dir.join(format!("{id}.tar")),
        ))
    }

    /// Tar request `id`'s archive is at the server, `size` bytes.
    pub fn files_uploaded(&self, id: u64, size: u64) -> R<()> {
        Ok(catalog::files::uploaded(&self.db(), id, size)?)
    }

    /// A done tar request's archive: its path and size.
    pub fn files_archive(&self, id: u64) -> R<crate::deploy::Package> {
        let j = self.files_job(id)?;
        let (FilesOp::Tar, "done", Some(size)) = (j.request.op, j.state.as_str(), j.size) else {
            return Err(EngineError::conflict(format!(
                "file request {id} has no archive to download (it is a {} request, {})",
                if j.request.op == FilesOp::Tar {
                    "tar"
                } else {
                    "ls"
                },
                j.state
            )));
        };
        let path = self.files_dir()?.join(format!("{id}.tar"));
        if !path.exists() {
            return Err(EngineError::not_found("archive of file request", id));
        }
        Ok(crate::deploy::Package {
            path,
            size,
            sha256: String::new(),
        })
    }

    /// Remove archives older than [`KEEP`].
    fn prune_archives(&self) {
        let Some(dir) = &self.files_dir else { return };
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > KEEP);
            if old {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}
