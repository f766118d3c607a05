//! Appending frames to packs. A pack is written to `tmp/`, sealed when it
//! passes [`PACK_TARGET_LEN`] (fsync, rename into `packs/xx/`, then its own
//! index file), so every sealed pack is reusable even if the backup is killed
//! afterwards. Index files of a session are merged every [`GROUP`] packs and
//! at commit, which bounds both the memory held and the number of files.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::PathBuf;

use super::Repository;
use crate::error::{Error, IoContext, Result};
use crate::format::index::{self as fmt, IndexEntry};
use crate::format::pack::{self, PACK_TARGET_LEN};
use crate::ids::{ChunkId, PackId, hex, random_bytes};

/// Packs per merged index file.
const GROUP: usize = 64;

#[derive(Debug)]
struct OpenPack {
    id: PackId,
    file: BufWriter<File>,
    tmp: PathBuf,
    len: u64,
    entries: Vec<IndexEntry>,
}

/// Writes frames into packs of one repository.
#[derive(Debug)]
pub struct PackWriter<'r> {
    repo: &'r Repository,
    cur: Option<OpenPack>,
    group: Vec<(PackId, Vec<IndexEntry>)>,
    group_files: Vec<PathBuf>,
    target_len: u64,
    /// Bytes written to packs (headers included).
    pub bytes_written: u64,
    /// Packs sealed.
    pub packs_sealed: u64,
}

impl<'r> PackWriter<'r> {
    /// A writer for `repo`.
    pub fn new(repo: &'r Repository) -> Self {
        Self::with_target(repo, PACK_TARGET_LEN)
    }

    /// A writer sealing packs at `target_len` bytes (tests use small packs).
    pub fn with_target(repo: &'r Repository, target_len: u64) -> Self {
        PackWriter {
            repo,
            cur: None,
            group: Vec::new(),
            group_files: Vec::new(),
            target_len,
            bytes_written: 0,
            packs_sealed: 0,
        }
    }

    /// Append one encoded frame for chunk `id`.
    pub fn add(&mut self, id: ChunkId, plain_len: u32, frame: &[u8]) -> Result<()> {
        if self.cur.is_none() {
            let pid = PackId::random()?;
            let (f, tmp) = self.repo.temp_file(&format!("pack-{}", pid.to_hex()))?;
            let mut file = BufWriter::with_capacity(1 << 20, f);
            file.write_all(&pack::header()).ctx("write", &tmp)?;
            self.bytes_written += pack::PACK_HEADER_LEN as u64;
            self.cur = Some(OpenPack {
                id: pid,
                file,
                tmp,
                len: pack::PACK_HEADER_LEN as u64,
                entries: Vec::new(),
            });
        }
        let Some(p) = self.cur.as_mut() else {
            return Err(Error::Internal("no open pack".into()));
        };
        let offset =
            u32::try_from(p.len).map_err(|_| Error::Internal("pack offset beyond 4 GiB".into()))?;
        let frame_len =
            u32::try_from(frame.len()).map_err(|_| Error::Internal("frame beyond 4 GiB".into()))?;
        p.file.write_all(frame).ctx("write", &p.tmp)?;
        p.len += frame.len() as u64;
        self.bytes_written += frame.len() as u64;
        p.entries.push(IndexEntry {
            id,
            pack: 0,
            offset,
            frame_len,
            plain_len,
        });
        if p.len >= self.target_len {
            self.seal()?;
        }
        Ok(())
    }

    fn seal(&mut self) -> Result<()> {
        let Some(p) = self.cur.take() else {
            return Ok(());
        };
        let OpenPack {
            id,
            file,
            tmp,
            mut entries,
            ..
        } = p;
        let f = file
            .into_inner()
            .map_err(|e| Error::io("write", &tmp, e.into_error()))?;
        f.sync_all().ctx("sync", &tmp)?;
        drop(f);
        let dst = self.repo.pack_path(&id);
        let dir = dst.parent().map(PathBuf::from).unwrap_or_default();
        let name = format!("{}.pack", id.to_hex());
        self.repo.publish(&tmp, &dir, &name)?;
        self.packs_sealed += 1;
        let bytes = fmt::encode(&[id], &mut entries);
        let idx = self.repo.write_atomic(
            &self.repo.path("index"),
            &format!("{}.idx", id.to_hex()),
            &bytes,
        )?;
        self.group.push((id, entries));
        self.group_files.push(idx);
        if self.group.len() >= GROUP {
            self.merge_group()?;
        }
        Ok(())
    }

    /// Replace the group's per-pack index files by one.
    fn merge_group(&mut self) -> Result<()> {
        if self.group.len() > 1 {
            let packs: Vec<PackId> = self.group.iter().map(|g| g.0).collect();
            let mut all: Vec<IndexEntry> = self
                .group
                .iter()
                .enumerate()
                .flat_map(|(i, (_, es))| {
                    es.iter().map(move |e| IndexEntry {
                        pack: i as u32,
                        ..*e
                    })
                })
                .collect();
            let bytes = fmt::encode(&packs, &mut all);
            let name = format!("{}.idx", hex(&random_bytes::<16>()?));
            self.repo
                .write_atomic(&self.repo.path("index"), &name, &bytes)?;
            for f in &self.group_files {
                fs::remove_file(f).ctx("remove", f)?;
            }
        }
        self.group.clear();
        self.group_files.clear();
        Ok(())
    }

    /// Seal the open pack and merge this session's index files. After this
    /// every chunk added is durable and in the index.
    pub fn commit(mut self) -> Result<()> {
        self.seal()?;
        self.merge_group()?;
        super::sync_dir(&self.repo.path("index"))
    }
}

impl Drop for PackWriter<'_> {
    fn drop(&mut self) {
        // An unsealed pack is garbage: nothing references it.
        if let Some(p) = self.cur.take() {
            let _ = fs::remove_file(&p.tmp);
        }
    }
}
