//! Helpers for `benches/nbd.sh` (not part of the test run):
//!
//! * `nbd-tool read URI` reads every allocated byte of an NBD export to a
//!   null sink the way a backup does (extents per window, 8 MiB reads with
//!   read-ahead) and prints seconds and bytes: the "plain NBD read" that the
//!   script compares with `nbdcopy URI null:`.
//! * `nbd-tool apply-diff OLD NEW URI` writes every 64 KiB block where NEW
//!   differs from OLD into the writable export URI (so a dirty bitmap on it
//!   records exactly the change between two disk versions).
//! * `nbd-tool randread URI SECONDS THREADS` reads 4 KiB at random
//!   4 KiB-aligned offsets for SECONDS from THREADS connections, one read
//!   in flight each, and prints the reads per second.
#![allow(clippy::print_stdout)]

use std::os::unix::fs::FileExt;
use std::time::Instant;

use datamover::source::ExtentKind;
use transports::{SourceOptions, open_source, open_target};

fn fail(msg: String) -> ! {
    eprintln!("nbd-tool: {msg}");
    std::process::exit(1)
}

fn read(uri: &str) {
    let src = open_source(uri).unwrap_or_else(|e| fail(e.to_string()));
    let t = Instant::now();
    let (size, io, window) = (src.size(), 8u64 << 20, 64u64 << 20);
    let mut total = 0u64;
    // The data pieces of the window at `win`, as the backup's reader cuts
    // them; the next window's are asked for before this one's are read,
    // so read-ahead runs on over the windows' edges (as in a backup).
    let pieces_of = |win: u64| -> Vec<(u64, usize)> {
        if win >= size {
            return Vec::new();
        }
        let wend = size.min(win + window);
        let exts = src
            .extents(win, wend - win)
            .unwrap_or_else(|e| fail(e.to_string()));
        exts.iter()
            .filter(|e| e.kind == ExtentKind::Data)
            .flat_map(|e| {
                let end = e.offset + e.len;
                let mut v = Vec::new();
                let mut p = e.offset;
                while p < end {
                    let to = end.min((p / io + 1) * io);
                    v.push((p, (to - p) as usize));
                    p = to;
                }
                v
            })
            .collect()
    };
    let mut win = 0u64;
    let mut pieces = pieces_of(win);
    while win < size {
        let next = pieces_of(win + window);
        for (i, &(off, len)) in pieces.iter().enumerate() {
            for &(o, l) in pieces
                .iter()
                .chain(&next)
                .skip(i + 1)
                .take(src.read_ahead())
            {
                src.will_read(o, l);
            }
            let b = src
                .read_bytes(off, len)
                .unwrap_or_else(|e| fail(e.to_string()));
            total += b.len() as u64;
        }
        win += window;
        pieces = next;
    }
    let s = t.elapsed().as_secs_f64();
    println!(
        "{{\"seconds\": {s:.3}, \"bytes_read\": {total}, \"mb_per_s\": {:.0}}}",
        total as f64 / s / 1e6
    );
}

fn apply_diff(old: &str, new: &str, uri: &str) {
    let open = |p: &str| std::fs::File::open(p).unwrap_or_else(|e| fail(format!("{p}: {e}")));
    let (a, b) = (open(old), open(new));
    let size = b
        .metadata()
        .map(|m| m.len())
        .unwrap_or_else(|e| fail(e.to_string()));
    let t = open_target(uri, size, false, &SourceOptions::default())
        .unwrap_or_else(|e| fail(e.to_string()));
    let blk = 64usize << 10;
    let (mut x, mut y) = (vec![0u8; 8 << 20], vec![0u8; 8 << 20]);
    let mut changed = 0u64;
    let mut off = 0u64;
    while off < size {
        let n = (size - off).min(x.len() as u64) as usize;
        a.read_exact_at(&mut x[..n], off)
            .unwrap_or_else(|e| fail(e.to_string()));
        b.read_exact_at(&mut y[..n], off)
            .unwrap_or_else(|e| fail(e.to_string()));
        for s in (0..n).step_by(blk) {
            let e = (s + blk).min(n);
            if x[s..e] != y[s..e] {
                t.write_at(off + s as u64, &y[s..e])
                    .unwrap_or_else(|e| fail(e.to_string()));
                changed += (e - s) as u64;
            }
        }
        off += n as u64;
    }
    t.flush().unwrap_or_else(|e| fail(e.to_string()));
    println!("{{\"bytes_changed\": {changed}}}");
}

fn randread(uri: &str, seconds: &str, threads: &str) {
    let secs: f64 = seconds.parse().unwrap_or_else(|_| fail("SECONDS".into()));
    let n: usize = threads.parse().unwrap_or_else(|_| fail("THREADS".into()));
    let t = Instant::now();
    let total: u64 = std::thread::scope(|s| {
        let hs: Vec<_> = (0..n)
            .map(|i| {
                s.spawn(move || {
                    let src = open_source(uri).unwrap_or_else(|e| fail(e.to_string()));
                    let blocks = src.size() / 4096;
                    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (i as u64 + 1);
                    let mut buf = vec![0u8; 4096];
                    let mut done = 0u64;
                    while t.elapsed().as_secs_f64() < secs {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        src.read_at((x % blocks) * 4096, &mut buf)
                            .unwrap_or_else(|e| fail(e.to_string()));
                        done += 1;
                    }
                    done
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap_or(0)).sum()
    });
    println!(
        "{{\"reads\": {total}, \"iops\": {:.0}}}",
        total as f64 / t.elapsed().as_secs_f64()
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["read", uri] => read(uri),
        ["apply-diff", old, new, uri] => apply_diff(old, new, uri),
        ["randread", uri, secs, threads] => randread(uri, secs, threads),
        _ => fail("usage: nbd-tool read URI | nbd-tool apply-diff OLD NEW URI".into()),
    }
}
