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
        let mut buf = Vec::new();
        self.read_frame_into(id, loc, &mut buf)?;
        Ok(buf)
    }

    /// Read the raw frame of `id` at `loc` into `buf`, which is grown
    /// when too small and otherwise reused as it is (no bytes cleared);
    /// the frame is `buf[..loc.frame_len]`.
    pub fn read_frame_into(&self, id: ChunkId, loc: &Location, buf: &mut Vec<u8>) -> Result<()> {
        let f = self.pack_of(id, loc)?;
        let len = loc.frame_len as usize;
        if buf.len() < len {
            buf.resize(len, 0);
        }
        f.read_exact_at(&mut buf[..len], loc.offset)
            .map_err(|e| read_failed(id, loc, e))
    }

    /// The open pack of `id` at `loc`, its frame length checked.
    fn pack_of(&self, id: ChunkId, loc: &Location) -> Result<Arc<File>> {
        let f = self.file(loc.pack).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => damaged(id, loc, "its pack file is missing".into()),
            _ => damaged(id, loc, format!("cannot open its pack: {e}")),
        })?;
        if u64::from(loc.frame_len) > (FRAME_HEADER_LEN as u64 + u64::from(MAX_CHUNK_LEN))
            || (loc.frame_len as usize) < FRAME_HEADER_LEN
        {
            return Err(damaged(
                id,
                loc,
                format!("index gives an impossible frame length {}", loc.frame_len),
            ));
        }
        Ok(f)
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
        // A chunk stored raw (as incompressible data is) is read straight
        // into `out` beside its header and checked there: no copy.
        let stored = loc.frame_len as usize - FRAME_HEADER_LEN.min(loc.frame_len as usize);
        if stored == loc.plain_len as usize && stored <= out.len() {
            let f = self.pack_of(id, loc)?;
            let mut header = [0u8; FRAME_HEADER_LEN];
            crate::sys::read_exact_at2(&f, loc.offset, &mut header, &mut out[..stored])
                .map_err(|e| read_failed(id, loc, e))?;
            return dec
                .decode_in_place(&header, Some(id), out)
                .map_err(|detail| damaged(id, loc, detail));
        }
        // Otherwise the frame goes through a buffer of this thread's,
        // reused: a fresh one per chunk costs a clear and its page faults,
        // as much as a quarter of a random read's time.
        thread_local! {
            static FRAME: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        /// Larger frames' buffers are not kept.
        const KEEP: usize = 8 << 20;
        FRAME.with(|b| {
            let mut b = b.borrow_mut();
            let r = self
                .read_frame_into(id, loc, &mut b)
                .and_then(|()| self.decode(dec, id, loc, &b[..loc.frame_len as usize], out));
            if b.len() > KEEP {
                *b = Vec::new();
            }
            r
        })
    }

    fn decode(
        &self,
        dec: &mut FrameDecoder,
        id: ChunkId,
        loc: &Location,
        frame: &[u8],
        out: &mut [u8],
    ) -> Result<usize> {
        dec.decode_into(frame, Some(id), out)
            .map_err(|detail| damaged(id, loc, detail))
    }
}

fn damaged(id: ChunkId, loc: &Location, detail: String) -> Error {
    Error::ChunkDamaged {
        chunk: id,
        pack: loc.pack,
        pack_offset: loc.offset,
        at: None,
        detail,
    }
}

fn read_failed(id: ChunkId, loc: &Location, e: std::io::Error) -> Error {
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof => damaged(id, loc, "pack is truncated".into()),
        _ => damaged(id, loc, format!("cannot read its pack: {e}")),
    }
}
