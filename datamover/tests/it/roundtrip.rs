//! Byte-for-byte restores of generated sparse images, dedupe across points,
//! concurrent backups, cancellation.
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use datamover::{BackupOptions, ChunkingInfo, ChunkingKind, Compression};
use proptest::prelude::*;

use super::helpers::{Watched, backup, new_repo, restore, small_packs};
use crate::common::{Fill, allocated, hash_file, make_image};

fn fill_strategy() -> impl Strategy<Value = Fill> {
    prop_oneof![
        any::<u64>().prop_map(Fill::Random),
        Just(Fill::Text),
        Just(Fill::Zeros)
    ]
}

fn opts_strategy() -> impl Strategy<Value = BackupOptions> {
    (
        prop_oneof![Just(ChunkingKind::Cdc), Just(ChunkingKind::Fixed)],
        prop_oneof![Just(256u32 << 10), Just(512 << 10), Just(1 << 20)],
        prop_oneof![
            Just(Compression::None),
            Just(Compression::Fast),
            Just(Compression::Optimal)
        ],
        1usize..4,
    )
        .prop_map(|(kind, block_size, compression, threads)| BackupOptions {
            chunking: ChunkingInfo { kind, block_size },
            compression,
            threads,
            ..small_packs()
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 10, ..ProptestConfig::default() })]
    #[test]
    fn random_sparse_images_restore_byte_for_byte(
        size in 1u64..(24 << 20),
        regions in proptest::collection::vec((0u64..(24 << 20), 1u64..(3 << 20), fill_strategy()), 0..8),
        opts in opts_strategy(),
    ) {
        let dir = tempfile::tempdir()?;
        let img = dir.path().join("disk.raw");
        let regions: Vec<_> = regions.into_iter()
            .filter(|(o, _, _)| *o < size)
            .map(|(o, l, f)| (o, l.min(size - o), f))
            .collect();
        make_image(&img, size, &regions);
        let repo = new_repo(dir.path());
        let rep = backup(&repo, &img, "vm/disk", &opts);
        prop_assert_eq!(rep.stats.bytes_total, size);
        let out = dir.path().join("out.raw");
        restore(&repo, "vm/disk", None, &out).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(hash_file(&img), hash_file(&out));
        // Holes and zeros stay holes: never more allocated than the source.
        prop_assert!(allocated(&out) <= allocated(&img) + (1 << 20));
        let v = datamover::verify(&repo, true).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert!(v.is_ok(), "{:?}", v);
    }
}

#[test]
fn second_backup_stores_only_new_chunks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("disk.raw");
    make_image(
        &img,
        64 << 20,
        &[
            (0, 40 << 20, Fill::Random(1)),
            (48 << 20, 8 << 20, Fill::Text),
        ],
    );
    let repo = new_repo(dir.path());
    let opts = small_packs();
    let first = backup(&repo, &img, "vm/disk", &opts);
    assert_eq!(first.stats.bytes_read, 48 << 20, "holes must not be read");
    assert!(first.stats.bytes_new > 40 << 20);
    let again = backup(&repo, &img, "vm/disk", &opts);
    assert_eq!(again.stats.bytes_new, 0, "unchanged disk stores nothing");
    assert_eq!(again.stats.chunks_new, 0);
    // Change 2 MiB in the middle: only the chunks around it are new.
    make_image(&img.with_extension("v2"), 0, &[]);
    std::fs::copy(&img, img.with_extension("v2")).expect("copy");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(img.with_extension("v2"))
        .expect("open");
    crate::common::write_region(&f, 20 << 20, 2 << 20, Fill::Random(99));
    let third = backup(&repo, &img.with_extension("v2"), "vm/disk", &opts);
    assert!(
        third.stats.bytes_new >= 2 << 20 && third.stats.bytes_new <= 10 << 20,
        "new {}",
        third.stats.bytes_new
    );
    let out = dir.path().join("out.raw");
    let (points, _) = repo.list_points(None).expect("points");
    assert_eq!(points.len(), 3);
    restore(&repo, "vm/disk", Some(points[0].id.as_str()), &out).expect("restore first");
    assert_eq!(hash_file(&out), hash_file(&img));
    restore(&repo, "vm/disk", None, &out).expect("restore newest");
    assert_eq!(hash_file(&out), hash_file(&img.with_extension("v2")));
}

#[test]
fn dedupe_across_disks_and_within_a_disk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = dir.path().join("a.raw");
    let b = dir.path().join("b.raw");
    // b holds a's data twice, at other offsets (aligned to 1 MiB).
    make_image(&a, 16 << 20, &[(0, 16 << 20, Fill::Random(5))]);
    make_image(
        &b,
        40 << 20,
        &[
            (4 << 20, 16 << 20, Fill::Random(5)),
            (22 << 20, 16 << 20, Fill::Random(5)),
        ],
    );
    let repo = new_repo(dir.path());
    let opts = BackupOptions {
        chunking: ChunkingInfo {
            kind: ChunkingKind::Fixed,
            block_size: 1 << 20,
        },
        ..small_packs()
    };
    backup(&repo, &a, "vm1/disk", &opts);
    let rb = backup(&repo, &b, "vm2/disk", &opts);
    assert_eq!(rb.stats.bytes_new, 0, "all of b's chunks are a's");
    let out = dir.path().join("out.raw");
    restore(&repo, "vm2/disk", None, &out).expect("restore");
    assert_eq!(hash_file(&out), hash_file(&b));
}

#[test]
fn concurrent_backups_to_one_repository() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = new_repo(dir.path());
    let imgs: Vec<_> = (0..4u64)
        .map(|i| {
            let p = dir.path().join(format!("d{i}.raw"));
            // Half shared, half unique: both backups race to store the shared part.
            make_image(
                &p,
                24 << 20,
                &[
                    (0, 8 << 20, Fill::Random(77)),
                    (8 << 20, 8 << 20, Fill::Random(i)),
                ],
            );
            p
        })
        .collect();
    std::thread::scope(|s| {
        for (i, p) in imgs.iter().enumerate() {
            let repo = &repo;
            s.spawn(move || backup(repo, p, &format!("vm{i}/vda"), &small_packs()));
        }
    });
    for (i, p) in imgs.iter().enumerate() {
        let out = dir.path().join(format!("out{i}.raw"));
        restore(&repo, &format!("vm{i}/vda"), None, &out).expect("restore");
        assert_eq!(hash_file(&out), hash_file(p));
    }
    let v = datamover::verify(&repo, true).expect("verify");
    assert!(v.is_ok(), "{v:?}");
}

#[test]
fn cancel_from_progress_leaves_no_point_and_chunks_reusable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("disk.raw");
    make_image(&img, 48 << 20, &[(0, 48 << 20, Fill::Random(3))]);
    let repo = new_repo(dir.path());
    let calls = Arc::new(AtomicU64::new(0));
    let last = Arc::new(AtomicU64::new(0));
    let (c, l) = (calls.clone(), last.clone());
    let opts = BackupOptions {
        progress: Some(Arc::new(move |done, total| {
            assert!(
                done >= l.swap(done, Ordering::SeqCst),
                "progress went backwards"
            );
            assert_eq!(total, 48 << 20);
            c.fetch_add(1, Ordering::SeqCst);
            done < 30 << 20
        })),
        ..small_packs()
    };
    let s = datamover::open_source(&img).expect("open");
    let err = datamover::backup(&repo, s.as_ref(), &"vm/disk".parse().expect("name"), &opts)
        .expect_err("cancelled");
    assert!(matches!(err, datamover::Error::Cancelled), "{err}");
    assert!(calls.load(Ordering::SeqCst) > 2);
    assert_eq!(
        repo.list_points(None).expect("points").0.len(),
        0,
        "no partial point"
    );
    let again = backup(&repo, &img, "vm/disk", &small_packs());
    assert!(
        again.stats.bytes_new < 40 << 20,
        "sealed packs reused: new {}",
        again.stats.bytes_new
    );
    let out = dir.path().join("out.raw");
    restore(&repo, "vm/disk", None, &out).expect("restore");
    assert_eq!(hash_file(&out), hash_file(&img));
}

#[test]
fn restore_where_direct_io_is_refused_falls_back_to_buffered() {
    // tmpfs refuses O_DIRECT; the restore must still be exact.
    let shm = std::path::Path::new("/dev/shm");
    if !shm.is_dir() {
        assert!(!crate::common::in_ci(), "/dev/shm missing in CI");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("disk.raw");
    make_image(
        &img,
        20 << 20,
        &[
            (12_345, 9 << 20, Fill::Random(4)),
            (11 << 20, 3 << 20, Fill::Text),
        ],
    );
    let repo = new_repo(dir.path());
    let opts = BackupOptions {
        chunking: ChunkingInfo {
            kind: ChunkingKind::Cdc,
            block_size: 256 << 10,
        },
        ..small_packs()
    };
    backup(&repo, &img, "vm/disk", &opts);
    let out_dir = tempfile::tempdir_in(shm).expect("tmpfs dir");
    let out = out_dir.path().join("out.raw");
    restore(&repo, "vm/disk", None, &out).expect("restore to tmpfs");
    assert_eq!(hash_file(&out), hash_file(&img));
}

/// A restore with `compare` onto a disk that holds nearly the point
/// writes only what differs, and the result is the point byte for byte;
/// a replica whose state is untrusted is brought back the same way.
#[test]
fn a_compare_restore_writes_only_what_differs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("disk.raw");
    make_image(
        &img,
        64 << 20,
        &[
            (0, 24 << 20, Fill::Random(5)),
            (32 << 20, 8 << 20, Fill::Text),
        ],
    );
    let repo = new_repo(dir.path());
    let r = backup(&repo, &img, "vm/disk", &small_packs());
    let disk: datamover::DiskName = "vm/disk".parse().expect("name");
    let out = dir.path().join("out.raw");
    std::fs::copy(&img, &out).expect("copy");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&out)
        .expect("open");
    // 1 MiB changed in data, 1 MiB written into a zero run.
    crate::common::write_region(&f, 4 << 20, 1 << 20, Fill::Random(77));
    crate::common::write_region(&f, 50 << 20, 1 << 20, Fill::Random(78));
    drop(f);
    let t = datamover::target::FileTarget::update(&out, 64 << 20).expect("target");
    let res = datamover::restore(
        &repo,
        &disk,
        &r.point,
        &t,
        &datamover::RestoreOptions {
            compare: true,
            ..Default::default()
        },
    )
    .expect("restore");
    assert!(
        res.stats.bytes_new >= 2 << 20 && res.stats.bytes_new <= 6 << 20,
        "written {}",
        res.stats.bytes_new
    );
    assert_eq!(hash_file(&out), hash_file(&img));

    // A replica left "applying" is compared, not rewritten.
    let rep = dir.path().join("replica.img");
    let full = datamover::replica::apply(&repo, &disk, &r.point, &rep).expect("apply");
    assert_eq!(full.base, None);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&rep)
        .expect("open");
    crate::common::write_region(&f, 10 << 20, 1 << 20, Fill::Random(79));
    drop(f);
    datamover::replica::set_state(&rep, r.point.as_str(), "applying").expect("state");
    let again = datamover::replica::apply(&repo, &disk, &r.point, &rep).expect("apply");
    assert!(
        again.bytes_written >= 1 << 20 && again.bytes_written <= 4 << 20,
        "{again:?}"
    );
    assert_eq!(hash_file(&rep), hash_file(&img));
    // A replica a VM runs on is never written.
    datamover::replica::set_state(&rep, r.point.as_str(), datamover::replica::FAILOVER)
        .expect("state");
    let e = datamover::replica::apply(&repo, &disk, &r.point, &rep).unwrap_err();
    assert!(e.to_string().contains("failed over"), "{e}");
}

/// Random access to a point: every read equals the disk, zero runs cost
/// no chunk, and a sequential run is read ahead by the prefetcher (the
/// chunks after it are loaded before they are asked for).
#[test]
fn a_point_reader_reads_anywhere_and_reads_ahead_of_sequential_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("disk.raw");
    make_image(
        &img,
        32 << 20,
        &[
            (0, 16 << 20, Fill::Random(9)),
            (24 << 20, 2 << 20, Fill::Text),
        ],
    );
    let repo = new_repo(dir.path());
    let r = backup(&repo, &img, "vm/disk", &BackupOptions::default());
    let disk: datamover::DiskName = "vm/disk".parse().expect("name");
    let reader =
        datamover::reader::PointReader::open(&repo, &disk, &r.point, 64 << 20).expect("open");
    let want = std::fs::read(&img).expect("read");
    let mut b = vec![0u8; 5000];
    for off in [0u64, 1_048_000, 20 << 20, 25 << 20, (32 << 20) - 5000] {
        reader.read_at(off, &mut b).expect("read");
        assert!(b[..] == want[off as usize..off as usize + 5000], "at {off}");
    }
    assert!(
        reader.read_at((32 << 20) - 10, &mut b).is_err(),
        "beyond the end"
    );
    let runs = reader.runs(16 << 20, 16 << 20).expect("runs");
    assert_eq!(
        runs,
        vec![(8 << 20, true), (2 << 20, false), (6 << 20, true)]
    );
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| reader.prefetcher(&stop));
        let before = reader.stats();
        let mut piece = vec![0u8; 256 << 10];
        // A sequential run from 4 MiB: reads ahead of it load the next chunks.
        reader.read_at(4 << 20, &mut piece).expect("read");
        reader
            .read_at((4 << 20) + (256 << 10), &mut piece)
            .expect("read");
        let t = std::time::Instant::now();
        while reader.stats().chunks_loaded < before.chunks_loaded + 4
            && t.elapsed() < std::time::Duration::from_secs(10)
        {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(
            reader.stats().chunks_loaded >= before.chunks_loaded + 4,
            "{:?}",
            reader.stats()
        );
        let hits = reader.stats().hits;
        reader.read_at(7 << 20, &mut piece).expect("read");
        assert!(reader.stats().hits > hits, "read ahead, then a cache hit");
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
}

/// A point of many extents (12,288: more than the few blocks of them a
/// reader keeps decoded) reads right anywhere, across the blocks' edges
/// and backwards, and its allocation is right across them too.
#[test]
fn a_point_reader_of_many_extents_reads_across_its_blocks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("disk.raw");
    let size = 96u64 << 20;
    // 4 KiB of data in every 16 KiB: a chunk and a hole each.
    let data: Vec<_> = (0..size / (16 << 10))
        .map(|i| (i * (16 << 10), 4096, Fill::Random(i)))
        .collect();
    make_image(&img, size, &data);
    let repo = new_repo(dir.path());
    let r = backup(&repo, &img, "vm/disk", &BackupOptions::default());
    let disk: datamover::DiskName = "vm/disk".parse().expect("name");
    let m = repo.read_point(&disk, &r.point).expect("manifest");
    assert!(m.extents.len() >= 3 * 4096, "{} extents", m.extents.len());
    let reader =
        datamover::reader::PointReader::open(&repo, &disk, &r.point, 1 << 20).expect("open");
    let want = std::fs::read(&img).expect("read");
    let mut b = vec![0u8; 100_000];
    // Forwards over every block's edge, then back to the start.
    let offs: Vec<u64> = (0..12u64)
        .map(|k| k * (8 << 20) + 4000)
        .chain([(64 << 20) - 50_000, (32 << 20) - 50_000, 7, size - 100_000])
        .collect();
    for off in offs {
        reader.read_at(off, &mut b).expect("read");
        assert!(
            b[..] == want[off as usize..off as usize + b.len()],
            "at {off}"
        );
    }
    // Allocation over 1 MiB from the middle of a data run: 4 KiB data
    // runs and 12 KiB zero runs.
    let runs = reader.runs((40 << 20) + 2048, 1 << 20).expect("runs");
    let mut expect = vec![(2048, false), (12 << 10, true)];
    for _ in 1..64 {
        expect.extend([(4096, false), (12 << 10, true)]);
    }
    expect.push((2048, false));
    assert_eq!(runs, expect);
}

/// Packs are sealed on a thread of their own: a seal that fails (here the
/// packs directory cannot be made) fails the backup with that error,
/// publishes no point and leaves no temp pack; the next backup, once the
/// repository is mended, is whole.
#[test]
fn a_seal_that_fails_fails_the_backup_and_leaves_no_point() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("disk.raw");
    make_image(&img, 24 << 20, &[(0, 20 << 20, Fill::Random(21))]);
    let repo = new_repo(dir.path());
    let packs = dir.path().join("repo/packs");
    std::fs::remove_dir_all(&packs).expect("remove packs");
    std::fs::write(&packs, b"not a directory").expect("packs as a file");
    let disk: datamover::DiskName = "vm/disk".parse().expect("name");
    let src = datamover::open_source(&img).expect("open");
    let opts = BackupOptions {
        compression: Compression::None,
        ..small_packs()
    };
    let err = datamover::backup(&repo, src.as_ref(), &disk, &opts)
        .expect_err("a backup whose packs cannot be published");
    assert!(
        err.to_string().contains("packs"),
        "the error names the packs directory: {err}"
    );
    assert!(repo.point_ids(&disk).expect("points").is_empty());
    let left: Vec<_> = std::fs::read_dir(dir.path().join("repo/tmp"))
        .expect("tmp")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("pack-"))
        .collect();
    assert!(left.is_empty(), "temp packs left behind: {left:?}");
    std::fs::remove_file(&packs).expect("remove the file");
    std::fs::create_dir(&packs).expect("packs again");
    backup(&repo, &img, "vm/disk", &opts);
    let out = dir.path().join("out.raw");
    restore(&repo, "vm/disk", None, &out).expect("restore");
    assert_eq!(hash_file(&out), hash_file(&img));
}

/// A full read of a local file takes the two halves of the disk in turn
/// (so incompressible data in one keeps the disk busy while the other's
/// compresses) and makes the very point a read in one lane makes: the
/// same extents (zero runs and chunks across the middle included), the
/// same bytes restored.
#[test]
fn a_read_in_two_lanes_makes_the_point_a_read_in_one_makes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("disk.raw");
    let mib = 1u64 << 20;
    // Odd size; data across the middle (the lanes meet at 52 MiB), zeros
    // and holes on either side.
    let size = 101 * mib + 12345;
    make_image(
        &img,
        size,
        &[
            (0, 20 * mib, Fill::Random(1)),
            (24 * mib + 4096, 10 * mib, Fill::Text),
            (45 * mib, 3 * mib, Fill::Zeros),
            (48 * mib, 7 * mib + 777, Fill::Random(2)),
            (60 * mib, 30 * mib, Fill::Text),
            (100 * mib, mib + 12345, Fill::Random(3)),
        ],
    );
    for block_size in [256u32 << 10, 1 << 20, 4 << 20] {
        let repo_dir = dir.path().join(format!("r{block_size}"));
        std::fs::create_dir(&repo_dir).expect("mkdir");
        let repo = new_repo(&repo_dir);
        let opts = BackupOptions {
            chunking: ChunkingInfo {
                kind: ChunkingKind::Fixed,
                block_size,
            },
            ..small_packs()
        };
        let disk: datamover::DiskName = "vm/disk".parse().expect("name");
        let mut points = Vec::new();
        for sequential in [false, true] {
            let src = Watched::open(&img, sequential);
            let rep = datamover::backup(&repo, &src, &disk, &opts).expect("backup");
            let reads = src.reads.into_inner().expect("reads");
            let in_order = reads.windows(2).all(|w| w[0] < w[1]);
            // Two lanes: a read of the second half comes before the last
            // of the first half's.
            assert_eq!(in_order, sequential, "block {block_size}: {reads:?}");
            points.push(rep.point);
        }
        let m: Vec<_> = points
            .iter()
            .map(|p| repo.read_point(&disk, p).expect("manifest").extents)
            .collect();
        assert_eq!(m[0], m[1], "block {block_size}");
        let out = dir.path().join("out.raw");
        restore(&repo, "vm/disk", Some(points[0].as_str()), &out).expect("restore");
        assert_eq!(hash_file(&out), hash_file(&img), "block {block_size}");
        let v = datamover::verify(&repo, true).expect("verify");
        assert!(v.is_ok(), "{v:?}");
    }
}
