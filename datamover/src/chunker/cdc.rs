//! FastCDC (the 2020 variant of the `fastcdc` crate): average = block size,
//! min = size/4, max = size*4, normalization level 1.
//!
//! Streaming rule: a cut is only searched once at least `max` bytes are
//! pending (or the segment has ended), because FastCDC's answer on a shorter
//! buffer depends on the buffer's length. That makes cuts independent of
//! how the stream was fed.

use bytes::Bytes;
use fastcdc::v2020::{MASKS, Normalization};

use super::{Chunker, Pending};

/// Content-defined chunker.
#[derive(Debug)]
pub struct CdcChunker {
    min: usize,
    avg: usize,
    max: usize,
    masks: [u64; 4],
    pending: Pending,
}

impl CdcChunker {
    /// A chunker averaging `avg` bytes (256 KiB to 4 MiB).
    pub fn new(avg: u32) -> Self {
        let bits = avg.max(256).ilog2();
        let n = Normalization::Level1.bits();
        let (s, l) = (MASKS[(bits + n) as usize], MASKS[(bits - n) as usize]);
        CdcChunker {
            min: avg as usize / 4,
            avg: avg as usize,
            max: avg as usize * 4,
            masks: [s, l, s << 1, l << 1],
            pending: Pending::default(),
        }
    }

    fn cut(&self, buf: &[u8]) -> usize {
        let [s, l, sl, ll] = self.masks;
        fastcdc::v2020::cut(buf, self.min, self.avg, self.max, s, l, sl, ll).1
    }

    fn drain(&mut self, all: bool, emit: &mut dyn FnMut(Bytes)) {
        while self.pending.len() >= self.max || (all && self.pending.len() > 0) {
            let n = self.cut(&self.pending.buf).max(1);
            emit(self.pending.take(n));
        }
    }
}

impl Chunker for CdcChunker {
    fn start(&mut self, _offset: u64, emit: &mut dyn FnMut(Bytes)) {
        self.finish(emit);
    }
    fn push(&mut self, data: Bytes, emit: &mut dyn FnMut(Bytes)) {
        self.pending.push(data);
        self.drain(false, emit);
    }
    fn finish(&mut self, emit: &mut dyn FnMut(Bytes)) {
        self.drain(true, emit);
    }
}
