//! `codec-sweep IMAGE CONFIG...`: how each zstd setting trades size for
//! CPU on a disk image, cut as a backup cuts it (1 MiB chunks, all-zero
//! chunks and repeated chunks left out, a chunk stored raw unless
//! compressing saves 1/32 of it). One thread, one context per setting,
//! each setting run three times in turn (interleaved), best time shown.
//!
//! CONFIG is a zstd level with optional parameters: `3`, `2`,
//! `3:hlog=16,clog=14`, `3:strategy=1` (hlog, clog, slog, mml, wlog,
//! strategy). A CONFIG ending in `+skip` first asks datamover's
//! `looks_incompressible` and stores raw what it says will not compress,
//! as a backup does (`3:clog=14+skip` is what `dm backup` does by
//! default: `datamover::compression::zstd_chain_log`). Not part of the
//! test run; used to choose the default level and its parameters (the
//! README's "Why zstd level 3 by default").
#![allow(clippy::print_stdout)]

use std::collections::HashSet;
use std::io::Read;
use std::time::Instant;

use zstd::zstd_safe::{CCtx, CParameter, Strategy};

const CHUNK: usize = 1 << 20;
const ROUNDS: usize = 3;

fn fail(msg: String) -> ! {
    eprintln!("codec-sweep: {msg}");
    std::process::exit(1)
}

fn strategy(n: u32) -> Strategy {
    match n {
        1 => Strategy::ZSTD_fast,
        2 => Strategy::ZSTD_dfast,
        3 => Strategy::ZSTD_greedy,
        4 => Strategy::ZSTD_lazy,
        5 => Strategy::ZSTD_lazy2,
        _ => fail(format!("strategy {n}: use 1 (fast) to 5 (lazy2)")),
    }
}

fn context(config: &str) -> CCtx<'static> {
    let config = config.strip_suffix("+skip").unwrap_or(config);
    let (level, params) = config.split_once(':').unwrap_or((config, ""));
    let level: i32 = level
        .parse()
        .unwrap_or_else(|_| fail(format!("{config}: level")));
    let mut cx = CCtx::create();
    let mut set = |p| {
        cx.set_parameter(p)
            .unwrap_or_else(|e| fail(format!("{config}: {}", zstd::zstd_safe::get_error_name(e))));
    };
    set(CParameter::CompressionLevel(level));
    for kv in params.split(',').filter(|s| !s.is_empty()) {
        let (k, v) = kv
            .split_once('=')
            .unwrap_or_else(|| fail(format!("{kv}: want key=value")));
        let v: u32 = v.parse().unwrap_or_else(|_| fail(format!("{kv}: value")));
        set(match k {
            "hlog" => CParameter::HashLog(v),
            "clog" => CParameter::ChainLog(v),
            "slog" => CParameter::SearchLog(v),
            "mml" => CParameter::MinMatch(v),
            "wlog" => CParameter::WindowLog(v),
            "strategy" => CParameter::Strategy(strategy(v)),
            _ => fail(format!("{k}: unknown parameter")),
        });
    }
    cx
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((image, configs)) = args.split_first() else {
        fail("usage: codec-sweep IMAGE CONFIG...".into())
    };
    let mut f = std::fs::File::open(image).unwrap_or_else(|e| fail(format!("{image}: {e}")));
    let mut seen = HashSet::new();
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    loop {
        let mut b = Vec::with_capacity(CHUNK);
        let n = (&mut f)
            .take(CHUNK as u64)
            .read_to_end(&mut b)
            .unwrap_or_else(|e| fail(format!("{image}: {e}")));
        if n == 0 {
            break;
        }
        if b.iter().any(|x| *x != 0) && seen.insert(*blake3::hash(&b).as_bytes()) {
            chunks.push(b);
        }
    }
    let plain: usize = chunks.iter().map(Vec::len).sum();
    println!(
        "{image}: {} distinct non-zero chunks, {} MiB",
        chunks.len(),
        plain >> 20
    );
    let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(CHUNK));
    let mut best = vec![f64::MAX; configs.len()];
    let mut stored = vec![0usize; configs.len()];
    for _ in 0..ROUNDS {
        for (i, config) in configs.iter().enumerate() {
            let mut cx = context(config);
            let skip = config.ends_with("+skip");
            let t = Instant::now();
            let mut total = 0;
            for c in &chunks {
                if skip && datamover::compression::looks_incompressible(c) {
                    total += c.len();
                    continue;
                }
                out.clear();
                let n = cx
                    .compress2(&mut out, c)
                    .unwrap_or_else(|e| fail(zstd::zstd_safe::get_error_name(e).into()));
                total += if n < c.len() - c.len() / 32 {
                    n
                } else {
                    c.len()
                };
            }
            best[i] = best[i].min(t.elapsed().as_secs_f64());
            stored[i] = total;
        }
    }
    // What the sample check passed over, what the first setting would
    // have saved on it, and what the check and that setting cost there.
    if configs.iter().any(|c| c.ends_with("+skip")) {
        let mut cx = context(&configs[0]);
        let mut check = f64::MAX;
        let mut skipped = Vec::new();
        for _ in 0..ROUNDS {
            let t = Instant::now();
            skipped = chunks
                .iter()
                .filter(|c| datamover::compression::looks_incompressible(c))
                .collect();
            check = check.min(t.elapsed().as_secs_f64());
        }
        let (mut lost, mut missed, mut zstd_s) = (0, 0, f64::MAX);
        for _ in 0..ROUNDS {
            (lost, missed) = (0, 0);
            let t = Instant::now();
            for c in &skipped {
                out.clear();
                let z = cx
                    .compress2(&mut out, c)
                    .unwrap_or_else(|e| fail(zstd::zstd_safe::get_error_name(e).into()));
                if z < c.len() - c.len() / 32 {
                    missed += 1;
                    lost += c.len() - z;
                }
            }
            zstd_s = zstd_s.min(t.elapsed().as_secs_f64());
        }
        println!(
            "sample check: {:.3} s over all chunks; {} chunks judged incompressible, \
             which {} compresses in {zstd_s:.3} s; {missed} of them would have \
             shrunk by {:.1} MiB",
            check,
            skipped.len(),
            configs[0],
            lost as f64 / 1048576.0,
        );
    }
    println!("| setting | stored MiB | vs first | MB/s (one core) | CPU s vs first |");
    println!("|---|---|---|---|---|");
    for (i, config) in configs.iter().enumerate() {
        println!(
            "| {config} | {:.1} | {:+.2} % | {:.0} | {:+.2} |",
            stored[i] as f64 / 1048576.0,
            (stored[i] as f64 / stored[0] as f64 - 1.0) * 100.0,
            plain as f64 / best[i] / 1e6,
            best[i] - best[0]
        );
    }
}
