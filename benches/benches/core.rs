//! Criterion benches of the core stages and of the whole pipeline.
//! Run: `cargo bench -p datamover-benches` (not part of `cargo test`).
#![allow(clippy::expect_used, missing_docs)]

use std::time::Duration;

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use datamover::chunker::{CdcChunker, Chunker, FixedChunker};
use datamover::format::frame::{FrameDecoder, FrameEncoder};
use datamover::{BackupOptions, ChunkId, ChunkingInfo, ChunkingKind, Compression, Repository};
use datamover_benches::{mixed, random, text};

const LEN: usize = 64 << 20;

fn chunking(c: &mut Criterion) {
    let data = Bytes::from(random(LEN, 1));
    let mut g = c.benchmark_group("chunking");
    g.throughput(Throughput::Bytes(LEN as u64))
        .sample_size(10)
        .measurement_time(Duration::from_secs(5));
    for size in [256u32 << 10, 1 << 20, 4 << 20] {
        g.bench_with_input(BenchmarkId::new("cdc", size >> 10), &size, |b, &size| {
            b.iter(|| {
                let mut ch = CdcChunker::new(size);
                let mut n = 0usize;
                ch.start(0, &mut |_| n += 1);
                for piece in data.chunks(4 << 20) {
                    ch.push(data.slice_ref(piece), &mut |_| n += 1);
                }
                ch.finish(&mut |_| n += 1);
                n
            })
        });
    }
    g.bench_function("fixed/1024", |b| {
        b.iter(|| {
            let mut ch = FixedChunker::new(1 << 20);
            let mut n = 0usize;
            ch.start(0, &mut |_| n += 1);
            for piece in data.chunks(4 << 20) {
                ch.push(data.slice_ref(piece), &mut |_| n += 1);
            }
            ch.finish(&mut |_| n += 1);
            n
        })
    });
    g.finish();
}

fn hashing(c: &mut Criterion) {
    let data = random(LEN, 2);
    let mut g = c.benchmark_group("hashing");
    g.throughput(Throughput::Bytes(LEN as u64)).sample_size(10);
    g.bench_function("blake3_1MiB_chunks", |b| {
        b.iter(|| data.chunks(1 << 20).map(ChunkId::of).count())
    });
    g.bench_function("crc32_1MiB_chunks", |b| {
        b.iter(|| data.chunks(1 << 20).map(crc32fast::hash).count())
    });
    g.finish();
}

fn compression(c: &mut Criterion) {
    let mut g = c.benchmark_group("compression");
    g.sample_size(10).measurement_time(Duration::from_secs(4));
    let len = 16 << 20;
    g.throughput(Throughput::Bytes(len as u64));
    for (name, data) in [
        ("random", random(len, 3)),
        ("text", text(len, 4)),
        ("mixed", mixed(len, 5)),
    ] {
        for level in [
            Compression::None,
            Compression::Fast,
            Compression::Optimal,
            Compression::High,
        ] {
            let ids: Vec<ChunkId> = data.chunks(1 << 20).map(ChunkId::of).collect();
            g.bench_function(BenchmarkId::new(format!("encode_{name}"), level), |b| {
                let mut enc = FrameEncoder::new(level.zstd_level()).expect("encoder");
                let mut out = Vec::with_capacity(2 << 20);
                b.iter(|| {
                    let mut stored = 0;
                    for (chunk, id) in data.chunks(1 << 20).zip(&ids) {
                        out.clear();
                        enc.encode_into(*id, chunk, &mut out).expect("encode");
                        stored += out.len();
                    }
                    stored
                })
            });
        }
        let mut enc = FrameEncoder::new(Some(3)).expect("encoder");
        let frames: Vec<(ChunkId, Vec<u8>)> = data
            .chunks(1 << 20)
            .map(|ch| {
                let id = ChunkId::of(ch);
                let mut out = Vec::new();
                enc.encode_into(id, ch, &mut out).expect("encode");
                (id, out)
            })
            .collect();
        g.bench_function(BenchmarkId::new("decode_and_check", name), |b| {
            let mut dec = FrameDecoder::new().expect("decoder");
            b.iter(|| {
                frames
                    .iter()
                    .map(|(id, f)| dec.decode(f, Some(*id)).map(|v| v.len()).unwrap_or(0))
                    .sum::<usize>()
            })
        });
    }
    g.finish();
}

/// Whole pipeline: a 256 MiB image (mixed data, 25 % holes) backed up into a
/// fresh repository on tmpfs (/dev/shm), so storage costs almost nothing.
fn pipeline(c: &mut Criterion) {
    let shm = if std::path::Path::new("/dev/shm").is_dir() {
        "/dev/shm"
    } else {
        "/tmp"
    };
    let dir = tempfile::tempdir_in(shm).expect("tempdir");
    let img = dir.path().join("disk.raw");
    let len = 256usize << 20;
    let data = mixed(len * 3 / 4, 6);
    let f = std::fs::File::create(&img).expect("create");
    std::os::unix::fs::FileExt::write_all_at(&f, &data, 0).expect("write");
    f.set_len(len as u64).expect("len");
    let mut g = c.benchmark_group("pipeline");
    g.throughput(Throughput::Bytes(len as u64))
        .sample_size(10)
        .measurement_time(Duration::from_secs(10));
    for (kind, compression) in [
        (ChunkingKind::Cdc, Compression::Optimal),
        (ChunkingKind::Fixed, Compression::Optimal),
        (ChunkingKind::Cdc, Compression::Fast),
    ] {
        let opts = BackupOptions {
            chunking: ChunkingInfo {
                kind,
                block_size: 1 << 20,
            },
            compression,
            ..BackupOptions::default()
        };
        g.bench_function(
            BenchmarkId::new(format!("backup_{kind:?}").to_lowercase(), compression),
            |b| {
                b.iter_with_setup(
                    || {
                        let r = dir.path().join("repo");
                        let _ = std::fs::remove_dir_all(&r);
                        Repository::init(&r).expect("init")
                    },
                    |repo| {
                        let src = datamover::open_source(&img).expect("open");
                        datamover::backup(
                            &repo,
                            src.as_ref(),
                            &"vm/disk".parse().expect("name"),
                            &opts,
                        )
                        .expect("backup")
                    },
                )
            },
        );
    }
    g.finish();
}

/// Loading the chunk index of a repository holding a million chunks (about
/// 1 TiB of unique data at 1 MiB chunks), split over 16 index files.
fn index_load(c: &mut Criterion) {
    use datamover::format::index::{IndexEntry, encode};
    use datamover::ids::PackId;
    let dir = tempfile::tempdir().expect("tempdir");
    let ids = random(32 * 1_000_000, 9);
    for f in 0..16u32 {
        let packs: Vec<PackId> = (0..2000u32)
            .map(|p| PackId([(p % 251) as u8 ^ f as u8; 16]))
            .collect();
        let mut es: Vec<IndexEntry> = ids
            .chunks(32)
            .skip(f as usize * 62_500)
            .take(62_500)
            .enumerate()
            .map(|(i, id)| IndexEntry {
                id: ChunkId(id.try_into().expect("32 bytes")),
                pack: (i % 2000) as u32,
                offset: (i * 1000) as u32,
                frame_len: 1 << 20,
                plain_len: 1 << 20,
            })
            .collect();
        std::fs::write(
            dir.path().join(format!("{f:02}.idx")),
            encode(&packs, &mut es),
        )
        .expect("write");
    }
    let mut g = c.benchmark_group("index");
    g.sample_size(10);
    g.bench_function("load_1M_chunks", |b| {
        b.iter(|| {
            datamover::repo::Index::load(dir.path())
                .expect("load")
                .0
                .len()
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    chunking,
    hashing,
    compression,
    pipeline,
    index_load
);
criterion_main!(benches);
