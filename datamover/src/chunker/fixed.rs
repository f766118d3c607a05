//! Fixed-size chunks aligned to disk offsets: a chunk never crosses a
//! multiple of the block size, so a changed block maps to exactly one chunk
//! (what CBT incrementals replace).

use bytes::Bytes;

use super::{Chunker, Pending};

/// Fixed-size chunker.
#[derive(Debug)]
pub struct FixedChunker {
    size: u64,
    pos: u64,
    pending: Pending,
}

impl FixedChunker {
    /// A chunker of `size`-byte blocks.
    pub fn new(size: u32) -> Self {
        FixedChunker {
            size: u64::from(size),
            pos: 0,
            pending: Pending::default(),
        }
    }

    fn to_boundary(&self) -> usize {
        (self.size - self.pos % self.size) as usize
    }
}

impl Chunker for FixedChunker {
    fn start(&mut self, offset: u64, emit: &mut dyn FnMut(Bytes)) {
        self.finish(emit);
        self.pos = offset;
    }
    fn push(&mut self, data: Bytes, emit: &mut dyn FnMut(Bytes)) {
        self.pending.push(data);
        while self.pending.len() >= self.to_boundary() {
            let n = self.to_boundary();
            self.pos += n as u64;
            emit(self.pending.take(n));
        }
    }
    fn finish(&mut self, emit: &mut dyn FnMut(Bytes)) {
        if self.pending.len() > 0 {
            let n = self.pending.len();
            self.pos += n as u64;
            emit(self.pending.take(n));
        }
    }
}
