//! Compression levels offered to users, mapped to zstd levels.

use std::fmt;
use std::str::FromStr;

use crate::error::Error;

/// How hard to compress chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// Store chunks as they are.
    None,
    /// zstd level 1.
    Fast,
    /// zstd level 3 (chain log 14, [`zstd_chain_log`]): the default, the
    /// best ratio per CPU second.
    #[default]
    Optimal,
    /// zstd level 9.
    High,
    /// zstd level 19: slow; for archives.
    Extreme,
}

impl Compression {
    /// The zstd level, or `None` for no compression.
    pub fn zstd_level(self) -> Option<i32> {
        match self {
            Compression::None => None,
            Compression::Fast => Some(1),
            Compression::Optimal => Some(3),
            Compression::High => Some(9),
            Compression::Extreme => Some(19),
        }
    }
}

/// The zstd chain log used at `level`, where it differs from zstd's own
/// choice. Level 3 (`optimal`) gets 14 in place of 16: its smaller match
/// table stays in a core's cache, which saves 0.3-1.1 CPU s of the 4-6 s
/// a full backup of the comparison image spends compressing, for 0.17 %
/// more stored (README, "Why zstd level 3 by default"). Only the
/// encoder's search changes: frames decode as before.
pub fn zstd_chain_log(level: i32) -> Option<u32> {
    (level == 3).then_some(14)
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Compression::None => "none",
            Compression::Fast => "fast",
            Compression::Optimal => "optimal",
            Compression::High => "high",
            Compression::Extreme => "extreme",
        })
    }
}

impl FromStr for Compression {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Ok(match s {
            "none" => Compression::None,
            "fast" => Compression::Fast,
            "optimal" => Compression::Optimal,
            "high" => Compression::High,
            "extreme" => Compression::Extreme,
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "unknown compression {s:?}: use none, fast, optimal, high or extreme"
                )));
            }
        })
    }
}

/// Pieces of a chunk [`looks_incompressible`] looks at, and their length.
const SAMPLES: usize = 16;
const SAMPLE_LEN: usize = 4096;

/// Whether `data` looks like bytes zstd cannot shrink by the 1/32 a frame
/// asks for (compressed files, encrypted volumes, random data), judged
/// without compressing: 16 pieces of 4 KiB spread evenly over it must have
/// their bytes spread over the 256 values about as evenly as random bytes
/// have, and no two of its 4 KiB blocks may begin with the same 16 bytes
/// (a file or block repeated within the chunk, which zstd would find: a
/// disk holds many copies of the same small compressed file). Data shorter
/// than the 16 pieces is never judged so.
///
/// Evenly spread means a collision count (the sum over byte values of
/// `c·(c−1)`) at most 10 % above random bytes' mean. For 4 KiB of random
/// bytes that bound is 18 standard deviations away, so random data is not
/// missed; a piece within it has a Rényi entropy of at least 7.78 bits per
/// byte, so entropy coding alone saves it under 2.8 %.
///
/// Compressible data usually fails on the first piece (one 4 KiB
/// histogram); what passes cost 64 KiB of histograms and a look at each
/// block's first bytes instead of a zstd pass over the whole chunk. What
/// it can miss: a compressible stretch shorter than the 64 KiB between
/// pieces inside otherwise random data, or a repeat that does not start
/// on a 4 KiB boundary; its chunk is then stored raw.
pub fn looks_incompressible(data: &[u8]) -> bool {
    if data.len() < SAMPLES * SAMPLE_LEN {
        return false;
    }
    let stride = data.len() / SAMPLES / SAMPLE_LEN * SAMPLE_LEN;
    if !(0..SAMPLES).all(|i| evenly_spread(&data[i * stride..i * stride + SAMPLE_LEN])) {
        return false;
    }
    // The first 16 bytes of every 4 KiB block (of at most MAX_BLOCKS,
    // evenly spaced, in a longer chunk).
    let step = data.len().div_ceil(MAX_BLOCKS).next_multiple_of(SAMPLE_LEN);
    let mut heads = [0u128; MAX_BLOCKS];
    let mut n = 0;
    for (head, at) in heads.iter_mut().zip((0..data.len() - 16).step_by(step)) {
        let mut b = [0u8; 16];
        b.copy_from_slice(&data[at..at + 16]);
        *head = u128::from_ne_bytes(b);
        n += 1;
    }
    let heads = &mut heads[..n];
    heads.sort_unstable();
    !heads.windows(2).any(|w| w[0] == w[1])
}

/// Blocks whose beginnings [`looks_incompressible`] compares, at most
/// (every 4 KiB block of a chunk up to 4 MiB).
const MAX_BLOCKS: usize = 1024;

/// Whether the byte values of `piece` collide at most 10 % more often
/// than random bytes' would.
fn evenly_spread(piece: &[u8]) -> bool {
    // Four tables, so that runs of one byte value do not wait on the same
    // counter.
    let mut h = [[0u32; 256]; 4];
    for q in piece.chunks_exact(4) {
        h[0][q[0] as usize] += 1;
        h[1][q[1] as usize] += 1;
        h[2][q[2] as usize] += 1;
        h[3][q[3] as usize] += 1;
    }
    for &b in piece.chunks_exact(4).remainder() {
        h[0][b as usize] += 1;
    }
    let collisions: u64 = (0..256)
        .map(|v| {
            let c = u64::from(h[0][v] + h[1][v] + h[2][v] + h[3][v]);
            c * c.saturating_sub(1)
        })
        .sum();
    let n = piece.len() as u64;
    // collisions ≤ 1.1 · n(n−1)/256
    collisions * 256 * 10 <= n * (n - 1) * 11
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                // xorshift64*
                x ^= x >> 12;
                x ^= x << 25;
                x ^= x >> 27;
                (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
            })
            .collect()
    }

    #[test]
    fn random_bytes_are_judged_incompressible() {
        for seed in 1..20 {
            assert!(looks_incompressible(&random(1 << 20, seed)), "seed {seed}");
        }
        // Any length from the 16 pieces up, not only whole MiB.
        assert!(looks_incompressible(&random(SAMPLES * SAMPLE_LEN, 7)));
        assert!(looks_incompressible(&random((1 << 20) + 12345, 8)));
    }

    #[test]
    fn compressible_data_is_compressed() {
        let text: Vec<u8> = b"Nov 25 12:00:01 web01 nginx[123]: GET /index.html 200 12ms\n"
            .iter()
            .copied()
            .cycle()
            .take(1 << 20)
            .collect();
        assert!(!looks_incompressible(&text));
        assert!(!looks_incompressible(&vec![0u8; 1 << 20]));
        // Too short to judge.
        assert!(!looks_incompressible(&random(SAMPLES * SAMPLE_LEN - 1, 3)));
        // Random bytes over 128 values only: 1 bit per byte to save.
        let half: Vec<u8> = random(1 << 20, 4).iter().map(|b| b & 0x7f).collect();
        assert!(!looks_incompressible(&half));
    }

    #[test]
    fn mixed_and_repeated_chunks_are_compressed() {
        // Random data with one compressible stretch of 64 KiB anywhere:
        // some piece lands in it.
        for at in [0usize, 100_000, 500_000, (1 << 20) - 65536] {
            let mut d = random(1 << 20, 5);
            d[at..at + 65536].fill(b'a');
            assert!(!looks_incompressible(&d), "stretch at {at}");
        }
        // One random 64 KiB block repeated through the chunk: every piece
        // looks random, but pieces repeat.
        let block = random(64 << 10, 6);
        let rep: Vec<u8> = block.iter().copied().cycle().take(1 << 20).collect();
        assert!(!looks_incompressible(&rep));
        let z = zstd::bulk::compress(&rep, 3).unwrap_or_default();
        assert!(z.len() < rep.len() / 2, "zstd shrinks it: {}", z.len());
    }
}
