//! Retention and garbage collection: forgotten points go, the space only
//! they used is freed, partly used packs are repacked, every kept point
//! still restores byte for byte, and a running backup is never harmed.
use datamover::{KeepPolicy, PruneOptions};

use super::helpers::{backup, new_repo, restore, small_packs};
use crate::common::{Fill, hash_file, make_image, write_region};

fn keep_last(n: usize) -> PruneOptions {
    PruneOptions {
        keep: KeepPolicy {
            last: Some(n),
            ..Default::default()
        },
        ..Default::default()
    }
}

fn repo_bytes(dir: &std::path::Path) -> u64 {
    fn walk(d: &std::path::Path) -> u64 {
        std::fs::read_dir(d)
            .expect("read_dir")
            .flatten()
            .map(|e| {
                let p = e.path();
                if p.is_dir() {
                    walk(&p)
                } else {
                    e.metadata().map(|m| m.len()).unwrap_or(0)
                }
            })
            .sum()
    }
    walk(&dir.join("packs"))
}

#[test]
fn keep_last_frees_space_and_keeps_points_restorable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = new_repo(dir.path());
    let img = dir.path().join("d.raw");
    make_image(&img, 32 << 20, &[(0, 24 << 20, Fill::Random(1))]);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .expect("open");
    let mut hashes = Vec::new();
    for v in 0..4u64 {
        // Each version rewrites 6 MiB: old versions own chunks of their own.
        write_region(&f, v * (6 << 20), 6 << 20, Fill::Random(100 + v));
        backup(&repo, &img, "vm/disk", &small_packs());
        hashes.push(hash_file(&img));
    }
    let before = repo_bytes(repo.root());
    let dry = datamover::prune(
        &repo,
        &PruneOptions {
            dry_run: true,
            ..keep_last(2)
        },
    )
    .expect("dry run");
    assert_eq!(dry.points_removed.len(), 2);
    assert_eq!(
        repo.list_points(None).expect("points").0.len(),
        4,
        "dry run changes nothing"
    );
    let rep = datamover::prune(&repo, &keep_last(2)).expect("prune");
    assert_eq!(rep.points_removed.len(), 2);
    assert_eq!(rep.points_kept, 2);
    assert!(rep.chunks_removed > 0 && rep.bytes_freed > 0, "{rep:?}");
    let after = repo_bytes(repo.root());
    assert!(after < before - (8 << 20), "before {before}, after {after}");
    let v = datamover::verify(&repo, true).expect("verify");
    assert!(v.is_ok() && v.unindexed_packs == 0, "{v:?}");
    let points = repo.list_points(None).expect("points").0;
    for (p, h) in points.iter().zip(&hashes[2..]) {
        let out = dir.path().join("out.raw");
        restore(&repo, "vm/disk", Some(p.id.as_str()), &out).expect("restore");
        assert_eq!(&hash_file(&out), h);
    }
    // Index files were merged into one.
    assert_eq!(
        std::fs::read_dir(repo.root().join("index"))
            .expect("ls")
            .count(),
        1
    );
}

#[test]
fn prune_with_no_rule_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = new_repo(dir.path());
    let e = datamover::prune(&repo, &PruneOptions::default()).expect_err("refused");
    assert!(e.to_string().contains("--keep-last"), "{e}");
}

#[test]
fn daily_buckets_keep_the_newest_point_of_each_day() {
    let ids: Vec<datamover::PointId> = [
        "20261120T010000.000Z-000001",
        "20261120T230000.000Z-000002",
        "20261121T120000.000Z-000003",
        "20261123T080000.000Z-000004",
        "20261123T090000.000Z-000005",
    ]
    .iter()
    .map(|s| s.parse().expect("id"))
    .collect();
    let keep = KeepPolicy {
        daily: Some(2),
        ..Default::default()
    };
    let forget: Vec<String> = datamover::prune::select_forget(&ids, &keep)
        .iter()
        .map(|i| i.to_string())
        .collect();
    assert_eq!(
        forget,
        [
            "20261120T010000.000Z-000001",
            "20261120T230000.000Z-000002",
            "20261123T080000.000Z-000004"
        ]
    );
    let keep = KeepPolicy {
        last: Some(1),
        daily: Some(3),
        ..Default::default()
    };
    let forget = datamover::prune::select_forget(&ids, &keep);
    assert_eq!(forget.len(), 2);
}

#[test]
fn prune_waits_for_a_running_backup() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = new_repo(dir.path());
    let a = dir.path().join("a.raw");
    let b = dir.path().join("b.raw");
    make_image(&a, 16 << 20, &[(0, 16 << 20, Fill::Random(1))]);
    make_image(&b, 96 << 20, &[(0, 96 << 20, Fill::Random(2))]);
    backup(&repo, &a, "vm/a", &small_packs());
    backup(&repo, &a, "vm/a", &small_packs());
    // A slow backup of b (extreme compression) runs while prune collects
    // garbage; b reuses nothing, but prune must not remove its packs.
    std::thread::scope(|s| {
        let slow = s.spawn(|| {
            let o = datamover::BackupOptions {
                compression: datamover::Compression::High,
                ..small_packs()
            };
            backup(&repo, &b, "vm/b", &o)
        });
        std::thread::sleep(std::time::Duration::from_millis(300));
        let rep = datamover::prune(&repo, &keep_last(1)).expect("prune");
        assert_eq!(rep.points_removed.len(), 1);
        // Prune got its exclusive lock only after the backup published its point.
        let b_points = repo
            .list_points(Some(&"vm/b".parse().expect("name")))
            .expect("points")
            .0;
        assert_eq!(
            b_points.len(),
            1,
            "prune ran while the backup was still running"
        );
        slow.join().expect("backup thread");
    });
    for (name, img) in [("vm/a", &a), ("vm/b", &b)] {
        let out = dir.path().join("out.raw");
        restore(&repo, name, None, &out).expect("restore");
        assert_eq!(hash_file(&out), hash_file(img));
    }
    assert!(datamover::verify(&repo, true).expect("verify").is_ok());
}

#[test]
fn half_dead_pack_is_repacked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = new_repo(dir.path());
    let img = dir.path().join("d.raw");
    // One pack per backup: v1 = [A | B], v2 = [A | C]. Forgetting v1 leaves
    // its pack half dead (B), so it is rewritten with A only.
    let opts = datamover::BackupOptions {
        chunking: datamover::ChunkingInfo {
            kind: datamover::ChunkingKind::Fixed,
            block_size: 1 << 20,
        },
        compression: datamover::Compression::None,
        pack_target: 64 << 20,
        ..Default::default()
    };
    make_image(
        &img,
        16 << 20,
        &[
            (0, 8 << 20, Fill::Random(1)),
            (8 << 20, 8 << 20, Fill::Random(2)),
        ],
    );
    backup(&repo, &img, "vm/disk", &opts);
    make_image(
        &img,
        16 << 20,
        &[
            (0, 8 << 20, Fill::Random(1)),
            (8 << 20, 8 << 20, Fill::Random(3)),
        ],
    );
    backup(&repo, &img, "vm/disk", &opts);
    let before = repo_bytes(repo.root());
    let rep = datamover::prune(&repo, &keep_last(1)).expect("prune");
    assert_eq!(
        (rep.packs_repacked, rep.packs_deleted, rep.chunks_removed),
        (1, 0, 8),
        "{rep:?}"
    );
    let after = repo_bytes(repo.root());
    assert!(
        before - after >= 8 << 20,
        "B's 8 MiB freed: {before} -> {after}"
    );
    let out = dir.path().join("out.raw");
    restore(&repo, "vm/disk", None, &out).expect("restore");
    assert_eq!(hash_file(&out), hash_file(&img));
    let v = datamover::verify(&repo, true).expect("verify");
    assert!(v.is_ok() && v.packs == 2 && v.chunks == 16, "{v:?}");
}
