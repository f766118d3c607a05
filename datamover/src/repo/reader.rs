//! Reading frames back from packs, with a small cache of open pack files.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use super::{Location, Repository};
use crate::error::{Error, Result};
use crate::format::frame::{FRAME_HEADER_LEN, FrameDecoder, MAX_CHUNK_LEN};
use crate::ids::{ChunkId, PackId};

const MAX_OPEN: usize = 128;

/// Reads and checks chunks of one repository; shareable across threads.
#[derive(Debug)]
pub struct PackReader<'r> {
    repo: &'r Repository,
    open: Mutex<HashMap<PackId, Arc<File>>>,
}

impl<'r> PackReader<'r> {
    /// A reader for `repo`.
    pub fn new(repo: &'r Repository) -> Self {
        PackReader {
            repo,
            open: Mutex::new(HashMap::new()),
        }
    }

    fn file(&self, pack: PackId) -> std::io::Result<Arc<File>> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = open.get(&pack) {
            return Ok(f.clone());
        }
        if open.len() >= MAX_OPEN {
            open.clear();
        }
        let f = Arc::new(File::open(self.repo.pack_path(&pack))?);
        open.insert(pack, f.clone());
        Ok(f)
    }

    /// Read the raw frame of `id` at `loc`.
    pub fn read_frame(&self, id: ChunkId, loc: &Location) -> Result<Vec<u8>> {
        let damaged = |detail: String| Error::ChunkDamaged {
            chunk: id,
            pack: loc.pack,
            pack_offset: loc.offset,
            at: None,
            detail,
        };
        let f = self.file(loc.pack).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => damaged("its pack file is missing".into()),
            _ => damaged(format!("cannot open its pack: {e}")),
        })?;
        if u64::from(loc.frame_len) > (FRAME_HEADER_LEN as u64 + u64::from(MAX_CHUNK_LEN)) {
            return Err(damaged(format!(
                "index gives an impossible frame length {}",
                loc.frame_len
            )));
        }
        let mut buf = vec![0u8; loc.frame_len as usize];
        f.read_exact_at(&mut buf, loc.offset)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => damaged("pack is truncated".into()),
                _ => damaged(format!("cannot read its pack: {e}")),
            })?;
        Ok(buf)
    }

    /// Read, check (CRC, BLAKE3) and decode the chunk `id` at `loc`.
    pub fn read_chunk(
        &self,
        dec: &mut FrameDecoder,
        id: ChunkId,
        loc: &Location,
    ) -> Result<Vec<u8>> {
        let mut out = vec![0u8; loc.plain_len.min(MAX_CHUNK_LEN) as usize];
        let n = self.read_chunk_into(dec, id, loc, &mut out)?;
        out.truncate(n);
        Ok(out)
    }

    /// Like [`PackReader::read_chunk`], into `out` (at least `loc.plain_len`
    /// bytes); returns the chunk's length.
    pub fn read_chunk_into(
        &self,
        dec: &mut FrameDecoder,
        id: ChunkId,
        loc: &Location,
        out: &mut [u8],
    ) -> Result<usize> {
        let frame = self.read_frame(id, loc)?;
        dec.decode_into(&frame, Some(id), out)
            .map_err(|detail| Error::ChunkDamaged {
                chunk: id,
                pack: loc.pack,
                pack_offset: loc.offset,
                at: None,
                detail,
            })
    }
}
