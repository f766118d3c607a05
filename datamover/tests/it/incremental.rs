//! CBT incrementals in the core: a point derived from its parent plus
//! changed ranges must restore bit-identical to the disk, and must be the
//! very manifest a full read of the disk gives (same chunks), while reading
//! only around the changes.
use std::fs::OpenOptions;
use std::path::Path;
use std::sync::Arc;

use datamover::format::manifest::Extent;
use datamover::source::{BlockSource, FileSource};
use datamover::{
    BackupOptions, BackupReport, ChangeTracker, ChangedRanges, ChunkingInfo, ChunkingKind,
    DiskName, ErrorKind, Repository, WithChanges,
};
use proptest::prelude::*;

use super::helpers::{Watched, backup, new_repo, restore, small_packs};
use crate::common::{Fill, hash_file, make_image, write_region};

fn incremental(
    repo: &Repository,
    img: &Path,
    changed: Vec<(u64, u64)>,
    opts: &BackupOptions,
) -> datamover::Result<BackupReport> {
    let s = WithChanges {
        source: FileSource::open(img)?,
        tracker: Arc::new(ChangedRanges::new("test ranges", changed)),
    };
    let disk: DiskName = "vm/disk".parse()?;
    datamover::backup(repo, &s, &disk, opts)
}

fn extents(repo: &Repository, rep: &BackupReport) -> Vec<Extent> {
    repo.read_point(&rep.disk, &rep.point)
        .expect("read point")
        .extents
}

/// Write `changes` into the image; returns the ranges a 64 KiB dirty bitmap
/// would report for them.
fn apply(img: &Path, changes: &[(u64, u64, Fill)]) -> Vec<(u64, u64)> {
    let f = OpenOptions::new().write(true).open(img).expect("open");
    let g = 64 << 10;
    changes
        .iter()
        .map(|&(o, l, fill)| {
            write_region(&f, o, l, fill);
            let s = o / g * g;
            (s, (o + l).div_ceil(g) * g - s)
        })
        .collect()
}

fn fill() -> impl Strategy<Value = Fill> {
    prop_oneof![
        3 => any::<u64>().prop_map(Fill::Random),
        1 => Just(Fill::Text),
        1 => Just(Fill::Zeros)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 10, ..ProptestConfig::default() })]
    #[test]
    fn incrementals_equal_full_reads(
        size in (4u64 << 20)..(20 << 20),
        base in proptest::collection::vec((0u64..(20 << 20), 1u64..(6 << 20), fill()), 1..6),
        rounds in proptest::collection::vec(
            proptest::collection::vec((0u64..(20 << 20), 1u64..(300 << 10), fill()), 0..5), 1..3),
        cdc in any::<bool>(),
        block in prop_oneof![Just(256u32 << 10), Just(1 << 20)],
        spurious in proptest::option::of((0u64..(20 << 20), 1u64..(1 << 20))),
    ) {
        let dir = tempfile::tempdir()?;
        let img = dir.path().join("disk.raw");
        let clip = |v: Vec<(u64, u64, Fill)>| -> Vec<(u64, u64, Fill)> {
            v.into_iter().filter(|r| r.0 < size).map(|(o, l, f)| (o, l.min(size - o), f)).collect()
        };
        make_image(&img, size, &clip(base));
        let opts = BackupOptions {
            chunking: ChunkingInfo {
                kind: if cdc { ChunkingKind::Cdc } else { ChunkingKind::Fixed },
                block_size: block,
            },
            threads: 2,
            ..small_packs()
        };
        let repo = new_repo(dir.path());
        let mut parent = backup(&repo, &img, "vm/disk", &opts);
        for (i, round) in rounds.into_iter().enumerate() {
            let mut dirty = apply(&img, &clip(round));
            // A bitmap may mark more than changed; that must not matter.
            if let Some((o, l)) = spurious.filter(|s| s.0 < size) {
                dirty.push((o, l.min(size - o)));
            }
            let dirty: Vec<(u64, u64)> =
                dirty.into_iter().map(|(o, l)| (o, l.min(size - o))).collect();
            let inc = incremental(&repo, &img, dirty.clone(), &opts)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(inc.parent(), Some(parent.point.as_str()));
            let changed: u64 = ChangedRanges::new("x", dirty.clone())
                .changed(0, size).expect("ranges").iter().map(|r| r.1).sum();
            prop_assert_eq!(inc.bytes_changed(), Some(changed));

            // Byte for byte.
            let out = dir.path().join(format!("out{i}.raw"));
            restore(&repo, "vm/disk", Some(inc.point.as_str()), &out)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(hash_file(&img), hash_file(&out));

            // The same extents as a full read of the same disk.
            let refdir = tempfile::tempdir()?;
            let refrepo = new_repo(refdir.path());
            let full = backup(&refrepo, &img, "vm/disk", &opts);
            prop_assert_eq!(extents(&repo, &inc), extents(&refrepo, &full));

            // Fixed chunks: only the blocks the changes touch are read
            // (plus at most one zero block before each).
            if !cdc {
                let b = u64::from(block);
                let bound: u64 = ChangedRanges::new("x", dirty.iter()
                        .map(|&(o, l)| (o / b * b, (o + l).div_ceil(b) * b - o / b * b)).collect())
                    .changed(0, size).expect("ranges").iter().map(|r| r.1).sum();
                prop_assert!(inc.stats.bytes_read <= bound,
                    "read {} for changes within {bound}", inc.stats.bytes_read);
            }
            parent = inc;
        }
    }
}

#[test]
fn unchanged_disk_reads_nothing_and_changed_disk_reads_all() {
    let dir = tempfile::tempdir().expect("tmp");
    let img = dir.path().join("disk.raw");
    let size = 8u64 << 20;
    make_image(&img, size, &[(0, size, Fill::Random(3))]);
    let repo = new_repo(dir.path());
    let opts = small_packs();
    let full = backup(&repo, &img, "vm/disk", &opts);
    let same = incremental(&repo, &img, vec![], &opts).expect("incremental");
    assert_eq!(same.stats.bytes_read, 0);
    assert_eq!(same.stats.chunks_new, 0);
    assert_eq!(same.bytes_changed(), Some(0));
    assert_eq!(extents(&repo, &same), extents(&repo, &full));
    assert_eq!(same.meta.chunking, full.meta.chunking);

    apply(&img, &[(0, size, Fill::Random(4))]);
    let all = incremental(&repo, &img, vec![(0, size)], &opts).expect("incremental");
    assert_eq!(all.stats.bytes_read, size);
    let out = dir.path().join("out.raw");
    restore(&repo, "vm/disk", None, &out).expect("restore");
    assert_eq!(hash_file(&img), hash_file(&out));
}

#[test]
fn an_incremental_keeps_the_parents_chunking() {
    let dir = tempfile::tempdir().expect("tmp");
    let img = dir.path().join("disk.raw");
    make_image(&img, 6 << 20, &[(0, 6 << 20, Fill::Text)]);
    let repo = new_repo(dir.path());
    let cdc = BackupOptions {
        chunking: ChunkingInfo {
            kind: ChunkingKind::Cdc,
            block_size: 256 << 10,
        },
        ..small_packs()
    };
    backup(&repo, &img, "vm/disk", &cdc);
    let dirty = apply(&img, &[(3 << 20, 100, Fill::Random(9))]);
    let inc = incremental(&repo, &img, dirty, &small_packs()).expect("incremental");
    assert_eq!(inc.meta.chunking, cdc.chunking);
    assert!(inc.stats.bytes_read < 6 << 20, "{}", inc.stats.bytes_read);
}

#[test]
fn no_parent_or_a_resized_disk_needs_full_if_needed() {
    let dir = tempfile::tempdir().expect("tmp");
    let img = dir.path().join("disk.raw");
    make_image(&img, 4 << 20, &[(0, 1 << 20, Fill::Random(1))]);
    let repo = new_repo(dir.path());

    let e = incremental(&repo, &img, vec![(0, 4096)], &small_packs()).expect_err("no parent");
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    let msg = e.to_string();
    assert!(
        msg.contains("no previous point") && msg.contains("--full-if-needed"),
        "{msg}"
    );
    assert!(repo.list_points(None).expect("list").0.is_empty());

    let full_if_needed = BackupOptions {
        full_if_needed: true,
        ..small_packs()
    };
    let first = incremental(&repo, &img, vec![(0, 4096)], &full_if_needed).expect("full");
    assert!(
        first
            .full_reason
            .as_deref()
            .unwrap_or("")
            .contains("no previous point")
    );
    assert_eq!(first.parent(), None);
    assert_eq!(first.stats.bytes_read, 1 << 20);

    // The disk grew: the parent no longer describes it.
    OpenOptions::new()
        .write(true)
        .open(&img)
        .expect("open")
        .set_len(5 << 20)
        .expect("grow");
    let e = incremental(&repo, &img, vec![], &small_packs()).expect_err("resized");
    assert!(e.to_string().contains("5242880 bytes"), "{e}");
    let grown = incremental(&repo, &img, vec![], &full_if_needed).expect("full");
    assert!(grown.full_reason.is_some());
    let out = dir.path().join("out.raw");
    restore(&repo, "vm/disk", None, &out).expect("restore");
    assert_eq!(hash_file(&img), hash_file(&out));
}

/// A source that starts checkpoints and a tracker that knows the one its
/// changes start at: the backup builds only on the point that started it.
#[test]
fn a_checkpointed_tracker_builds_only_on_the_point_that_started_it() {
    struct Since(ChangedRanges, &'static str);
    impl ChangeTracker for Since {
        fn changed(&self, o: u64, l: u64) -> datamover::Result<Vec<(u64, u64)>> {
            self.0.changed(o, l)
        }
        fn describe(&self) -> String {
            format!("bitmap {}", self.1)
        }
        fn since_checkpoint(&self) -> Option<String> {
            Some(self.1.into())
        }
    }
    struct Starts<S>(S, &'static str);
    impl<S: datamover::BlockSource> datamover::BlockSource for Starts<S> {
        fn size(&self) -> u64 {
            self.0.size()
        }
        fn preferred_io_size(&self) -> usize {
            self.0.preferred_io_size()
        }
        fn capabilities(&self) -> datamover::source::Capabilities {
            self.0.capabilities()
        }
        fn info(&self) -> datamover::format::manifest::SourceInfo {
            self.0.info()
        }
        fn transport(&self) -> &'static str {
            "test"
        }
        fn read_at(&self, o: u64, b: &mut [u8]) -> datamover::Result<()> {
            self.0.read_at(o, b)
        }
        fn change_tracking(&self) -> datamover::Tracking<'_> {
            self.0.change_tracking()
        }
        fn checkpoint(&self) -> Option<String> {
            Some(self.1.into())
        }
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let repo = new_repo(tmp.path());
    let img = tmp.path().join("d.raw");
    make_image(&img, 4 << 20, &[(0, 3 << 20, Fill::Random(5))]);
    let disk: DiskName = "vm/disk".parse().expect("name");
    let tracked = |since: &'static str, starts: &'static str| {
        let s = Starts(
            WithChanges {
                source: FileSource::open(&img).expect("open"),
                tracker: Arc::new(Since(ChangedRanges::new("r", vec![(0, 4096)]), since)),
            },
            starts,
        );
        datamover::backup(&repo, &s, &disk, &BackupOptions::default())
    };
    // A parent that started no checkpoint.
    let plain = FileSource::open(&img).expect("open");
    datamover::backup(&repo, &plain, &disk, &BackupOptions::default()).expect("full");
    let e = tracked("cp1", "cp2").expect_err("no checkpoint in the parent");
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert!(e.to_string().contains("started no checkpoint"), "{e}");
    // A full point that starts cp1, then incrementals chained on it.
    let full = BackupOptions {
        full_if_needed: true,
        ..BackupOptions::default()
    };
    let s = Starts(FileSource::open(&img).expect("open"), "cp1");
    let p1 = datamover::backup(&repo, &s, &disk, &full).expect("full");
    assert_eq!(p1.meta.checkpoint.as_deref(), Some("cp1"));
    let p2 = tracked("cp1", "cp2").expect("incremental on cp1");
    assert_eq!(p2.parent(), Some(p1.point.to_string().as_str()));
    assert_eq!(p2.meta.checkpoint.as_deref(), Some("cp2"));
    let e = tracked("cp1", "cp3").expect_err("cp1 is not the newest point's");
    assert!(e.to_string().contains("started checkpoint cp2"), "{e}");
}

/// A few small changes far apart cost a look at their chunks' extents, not
/// at the 64 MiB windows around them (on a 1 TiB disk, that was 64 MiB of
/// allocation map per change).
#[test]
fn an_incremental_asks_only_for_the_extents_of_changed_chunks() {
    let dir = tempfile::tempdir().expect("tmp");
    let img = dir.path().join("disk.raw");
    let size = 512u64 << 20;
    // 4 KiB in every MiB, the rest holes.
    let data: Vec<_> = (0..512u64)
        .map(|i| (i << 20, 4096, Fill::Random(i)))
        .collect();
    make_image(&img, size, &data);
    let repo = new_repo(dir.path());
    let opts = BackupOptions::default();
    backup(&repo, &img, "vm/disk", &opts);
    let changes = apply(
        &img,
        &[
            (3 << 20, 4096, Fill::Random(900)),
            (200 << 20, 4096, Fill::Random(901)),
            ((400 << 20) + 8192, 4096, Fill::Random(902)),
        ],
    );
    let src = Watched::open(&img, false);
    let io = src.preferred_io_size() as u64;
    let s = WithChanges {
        source: src,
        tracker: Arc::new(ChangedRanges::new("test ranges", changes)),
    };
    let rep = datamover::backup(&repo, &s, &"vm/disk".parse().expect("disk"), &opts)
        .expect("incremental");
    assert!(rep.parent().is_some());
    // Each changed chunk is read whole: its old 4 KiB and, at 400 MiB, the
    // new 4 KiB beside them.
    assert_eq!(rep.stats.bytes_read, 4 * 4096);
    let asked = s
        .source
        .extents_asked
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        asked <= 3 * io.max(1 << 20),
        "asked for {asked} bytes of extents for three changed 1 MiB chunks (io {io})"
    );
    let out = dir.path().join("out.raw");
    restore(&repo, "vm/disk", None, &out).expect("restore");
    assert_eq!(hash_file(&img), hash_file(&out));
}

/// The parent's extents are read as the run goes, their CRC checked at
/// the end: a damaged parent fails the run, which leaves no point.
#[test]
fn an_incremental_on_a_damaged_parent_fails_and_leaves_no_point() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().expect("tmp");
    let img = dir.path().join("disk.raw");
    make_image(&img, 8 << 20, &[(0, 6 << 20, Fill::Random(7))]);
    let repo = new_repo(dir.path());
    let full = backup(&repo, &img, "vm/disk", &small_packs());
    let path = repo.point_path(&full.disk, &full.point);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .expect("open");
    let len = f.metadata().expect("stat").len();
    // The footer's CRC of the extent list (bytes 24..28 of the footer).
    let at = len - 32 + 24;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).expect("read");
    f.write_all_at(&[b[0] ^ 0x40], at).expect("damage");
    let changes = apply(&img, &[(1 << 20, 4096, Fill::Random(8))]);
    let e = incremental(&repo, &img, changes, &small_packs()).expect_err("damaged parent");
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(
        e.to_string().contains("CRC mismatch in the extent list"),
        "{e}"
    );
    assert_eq!(repo.point_ids(&full.disk).expect("ids"), vec![full.point]);
}
