//! Shared inputs for the benches: reproducible data of the kinds a VM disk
//! holds (incompressible, text-like, mixed).
#![allow(clippy::expect_used)]

/// `len` bytes of seeded pseudo-random (incompressible) data.
pub fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = vec![0u8; len];
    for c in v.chunks_mut(8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let b = x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
        c.copy_from_slice(&b[..c.len()]);
    }
    v
}

/// `len` bytes of log-like text (compresses about 5-10x with zstd).
pub fn text(len: usize, seed: u64) -> Vec<u8> {
    let words = [
        "GET",
        "/index.html",
        "200",
        "nginx",
        "web01",
        "kernel:",
        "eth0",
        "up",
        "user=42",
        "POST",
        "/api/v1/items",
        "503",
    ];
    let r = random(len / 4 + 8, seed);
    let mut out = Vec::with_capacity(len + 64);
    let mut i = 0;
    while out.len() < len {
        out.extend_from_slice(
            format!("Nov 25 09:{:02}:{:02} ", r[i] % 60, r[i + 1] % 60).as_bytes(),
        );
        for k in 0..6 {
            out.extend_from_slice(words[(r[i + k] as usize) % words.len()].as_bytes());
            out.push(b' ');
        }
        out.push(b'\n');
        i = (i + 7) % (r.len() - 8);
    }
    out.truncate(len);
    out
}

/// Half random, half text, in 1 MiB stripes.
pub fn mixed(len: usize, seed: u64) -> Vec<u8> {
    let (a, b) = (random(len, seed), text(len, seed + 1));
    let mut out = Vec::with_capacity(len);
    for (i, (x, y)) in a.chunks(1 << 20).zip(b.chunks(1 << 20)).enumerate() {
        out.extend_from_slice(if i % 2 == 0 { x } else { y });
    }
    out
}
