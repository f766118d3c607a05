//! Disk images for tests: seeded data, sparse images with regions, and
//! hashes to check a restore byte for byte.
//!
//! Invariant: the same seed always makes the same bytes.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

/// xorshift64*: fast, seeded, reproducible.
#[derive(Debug)]
pub struct Rng(u64);
impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// What a region of a generated image holds.
#[derive(Debug, Clone, Copy)]
pub enum Fill {
    Random(u64),
    Text,
    Zeros,
}

/// Write `fill` at `offset` for `len` bytes into `f`.
pub fn write_region(f: &File, offset: u64, len: u64, fill: Fill) {
    let mut buf = vec![0u8; len.min(4 << 20) as usize];
    let mut rng = Rng::new(match fill {
        Fill::Random(s) => s,
        _ => 0,
    });
    let mut done = 0;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        match fill {
            Fill::Random(_) => rng.fill(&mut buf[..n]),
            Fill::Text => {
                for (i, b) in buf[..n].iter_mut().enumerate() {
                    *b = b"2026-11-25 INFO vm started, disk attached\n"[(done as usize + i) % 42];
                }
            }
            Fill::Zeros => buf[..n].fill(0),
        }
        f.write_all_at(&buf[..n], offset + done)
            .expect("write test image");
        done += n as u64;
    }
}

/// A sparse image of `size` bytes with the given regions written.
pub fn make_image(path: &Path, size: u64, regions: &[(u64, u64, Fill)]) {
    let f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)
        .expect("create image");
    f.set_len(size).expect("size image");
    for &(o, l, fill) in regions {
        write_region(&f, o, l, fill);
    }
}

/// BLAKE3 of a whole file or device.
pub fn hash_file(path: &Path) -> String {
    let mut f = File::open(path).expect("open for hash");
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).expect("read for hash");
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    h.finalize().to_hex().to_string()
}

/// Bytes allocated on disk for a file (st_blocks * 512).
pub fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).expect("stat").blocks() * 512
}

/// Write a file of `len` seeded random bytes.
pub fn random_file(path: &Path, len: usize, seed: u64) {
    let mut v = vec![0u8; len];
    Rng::new(seed).fill(&mut v);
    File::create(path)
        .and_then(|mut f| f.write_all(&v))
        .expect("write file");
}

/// A disk image of `len` bytes of seeded pseudo-random data (a few
/// all-zero MiB in the middle, so zero runs are exercised too).
pub fn make_disk(path: &Path, len: usize, seed: u64) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut buf = vec![0u8; len];
    for (i, c) in buf.chunks_mut(8).enumerate() {
        if (i * 8) / (1 << 20) % 5 == 2 {
            continue;
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
    }
    std::fs::write(path, buf).unwrap();
}
