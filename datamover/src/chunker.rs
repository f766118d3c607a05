//! Cutting a stream of disk bytes into chunks: content-defined (FastCDC) or
//! fixed-size.
//!
//! The stream is a sequence of *segments*: runs of contiguous data between
//! zero runs or holes. A segment is chunked on its own (zeros are never
//! chunked). Invariant: the cut points of a segment depend only on its bytes
//! and its disk offset, never on how the bytes were fed (one byte at a time
//! gives the same chunks as the whole segment at once).

mod cdc;
mod fixed;

use bytes::Bytes;

pub use cdc::CdcChunker;
pub use fixed::FixedChunker;

use crate::error::{Error, Result};
use crate::format::manifest::{ChunkingInfo, ChunkingKind};

/// Chunk sizes a user may choose (bytes).
pub const BLOCK_SIZES: [u32; 4] = [256 << 10, 512 << 10, 1 << 20, 4 << 20];
/// Default chunk size: 1 MiB.
pub const DEFAULT_BLOCK_SIZE: u32 = 1 << 20;

/// Turns segments into chunks.
pub trait Chunker: Send {
    /// Start a new segment at disk `offset` (ends any open one first).
    fn start(&mut self, offset: u64, emit: &mut dyn FnMut(Bytes));
    /// Feed the next bytes of the current segment.
    fn push(&mut self, data: Bytes, emit: &mut dyn FnMut(Bytes));
    /// End the current segment, emitting what is left.
    fn finish(&mut self, emit: &mut dyn FnMut(Bytes));
}

/// Make the chunker for `info`; the size must be one of [`BLOCK_SIZES`].
pub fn new_chunker(info: ChunkingInfo) -> Result<Box<dyn Chunker>> {
    if !BLOCK_SIZES.contains(&info.block_size) {
        return Err(Error::InvalidArgument(format!(
            "block size {} is not one of 256K, 512K, 1M, 4M",
            info.block_size
        )));
    }
    Ok(match info.kind {
        ChunkingKind::Cdc => Box::new(CdcChunker::new(info.block_size)),
        ChunkingKind::Fixed => Box::new(FixedChunker::new(info.block_size)),
    })
}

/// Pending bytes of a segment, kept contiguous.
#[derive(Debug, Default)]
struct Pending {
    buf: Bytes,
}

impl Pending {
    fn push(&mut self, data: Bytes) {
        if self.buf.is_empty() {
            self.buf = data;
        } else if !data.is_empty() {
            let mut b = bytes::BytesMut::with_capacity(self.buf.len() + data.len());
            b.extend_from_slice(&self.buf);
            b.extend_from_slice(&data);
            self.buf = b.freeze();
        }
    }
    fn take(&mut self, n: usize) -> Bytes {
        self.buf.split_to(n)
    }
    fn len(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn run(c: &mut dyn Chunker, offset: u64, data: &[u8], step: usize) -> Vec<usize> {
        let mut out = Vec::new();
        c.start(offset, &mut |b| out.push(b.len()));
        for piece in data.chunks(step.max(1)) {
            c.push(Bytes::copy_from_slice(piece), &mut |b| out.push(b.len()));
        }
        c.finish(&mut |b| out.push(b.len()));
        out
    }

    fn data(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(12))]
        #[test]
        fn cdc_feeding_does_not_change_cuts(seed in any::<u64>(), len in 0usize..3_000_000, step in 1usize..700_000) {
            let d = data(seed, len);
            let whole = run(&mut CdcChunker::new(256 << 10), 0, &d, usize::MAX);
            let pieces = run(&mut CdcChunker::new(256 << 10), 0, &d, step);
            prop_assert_eq!(&whole, &pieces);
            prop_assert_eq!(whole.iter().sum::<usize>(), len);
            prop_assert!(whole.iter().all(|l| *l <= 1 << 20));
        }

        #[test]
        fn fixed_cuts_on_the_grid(seed in any::<u64>(), offset in 0u64..1_000_000, len in 0usize..2_000_000, step in 1usize..300_000) {
            let d = data(seed, len);
            let bs = 256u64 << 10;
            let cuts = run(&mut FixedChunker::new(bs as u32), offset, &d, step);
            prop_assert_eq!(cuts.iter().sum::<usize>(), len);
            let mut pos = offset;
            for (i, l) in cuts.iter().enumerate() {
                pos += *l as u64;
                if i + 1 < cuts.len() { prop_assert_eq!(pos % bs, 0); }
            }
        }
    }

    #[test]
    fn cdc_finds_shifted_content() {
        // Inserting bytes at the front must leave most chunks identical.
        let d = data(7, 6 << 20);
        let mut shifted = vec![1u8; 1000];
        shifted.extend_from_slice(&d);
        let ids = |v: &[u8]| {
            let mut c = CdcChunker::new(256 << 10);
            let mut out = std::collections::HashSet::new();
            let mut e = |b: Bytes| {
                out.insert(crate::ChunkId::of(&b));
            };
            c.start(0, &mut e);
            c.push(Bytes::copy_from_slice(v), &mut e);
            c.finish(&mut e);
            out
        };
        let (a, b) = (ids(&d), ids(&shifted));
        assert!(
            a.intersection(&b).count() + 2 >= a.len(),
            "{} of {}",
            a.intersection(&b).count(),
            a.len()
        );
    }
}
