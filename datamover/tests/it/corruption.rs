//! Damage of every kind is detected by verify and by restore, names what it
//! affects, and never yields wrong data.
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use datamover::{ErrorKind, Repository};

use super::helpers::{backup, new_repo, restore, small_packs};
use crate::common::{Fill, make_image};

struct Setup {
    dir: tempfile::TempDir,
    repo: Repository,
}

/// Two disks, two points each; small packs.
fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = new_repo(dir.path());
    for (name, seed) in [("vm1/vda", 1u64), ("vm2/vda", 2)] {
        let img = dir.path().join(format!("{seed}.raw"));
        make_image(&img, 16 << 20, &[(0, 12 << 20, Fill::Random(seed))]);
        backup(&repo, &img, name, &small_packs());
        backup(&repo, &img, name, &small_packs());
    }
    Setup { dir, repo }
}

fn files(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in walk(dir) {
        if e.extension().is_some_and(|x| x == ext) {
            out.push(e);
        }
    }
    out.sort();
    out
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).expect("read_dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p))
        } else {
            out.push(p)
        }
    }
    out
}

/// The pack that holds data of `vm1/vda` (the first pack with a chunk of it).
fn pack_of_vm1(s: &Setup) -> PathBuf {
    let disk = "vm1/vda".parse().expect("name");
    let id = s.repo.resolve_point(&disk, None).expect("point");
    let m = s.repo.read_point(&disk, &id).expect("manifest");
    let idx = s.repo.load_index().expect("index");
    let chunk = m
        .extents
        .iter()
        .find_map(|e| match e {
            datamover::format::manifest::Extent::Chunk { id, .. } => Some(*id),
            _ => None,
        })
        .expect("a chunk");
    s.repo.pack_path(&idx.get(&chunk).expect("indexed").pack)
}

fn damaged_names(v: &datamover::VerifyReport) -> Vec<String> {
    v.damaged_points
        .iter()
        .map(|d| d.point.split('@').next().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn flipped_byte_in_a_pack() {
    let s = setup();
    let pack = pack_of_vm1(&s);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&pack)
        .expect("open pack");
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, 1000).expect("read");
    f.write_all_at(&[b[0] ^ 0x40], 1000).expect("write");
    drop(f);
    // Structure looks fine; reading the data finds it.
    assert!(datamover::verify(&s.repo, false).expect("verify").is_ok());
    let v = datamover::verify(&s.repo, true).expect("verify");
    assert!(!v.is_ok());
    let names = damaged_names(&v);
    assert_eq!(
        names,
        ["vm1/vda", "vm1/vda"],
        "both points of vm1 and only them: {v:?}"
    );
    assert!(v.damaged_points[0].problems[0].contains("CRC"), "{v:?}");
    let out = s.dir.path().join("out.raw");
    let e = restore(&s.repo, "vm1/vda", None, &out).expect_err("restore must fail");
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    let msg = e.to_string();
    let pack_name = pack.file_stem().and_then(|x| x.to_str()).expect("stem");
    assert!(
        msg.contains(pack_name) && msg.contains("disk offset") && msg.contains("vm1/vda@"),
        "{msg}"
    );
    assert!(!out.exists(), "a failed restore leaves no file behind");
    restore(&s.repo, "vm2/vda", None, &out).expect("other disk intact");
}

#[test]
fn truncated_pack() {
    let s = setup();
    let pack = pack_of_vm1(&s);
    let len = std::fs::metadata(&pack).expect("stat").len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&pack)
        .and_then(|f| f.set_len(len / 2))
        .expect("truncate");
    let v = datamover::verify(&s.repo, false).expect("verify");
    assert!(v.problems.iter().any(|p| p.contains("truncated")), "{v:?}");
    assert!(damaged_names(&v).contains(&"vm1/vda".to_string()));
    let e = restore(&s.repo, "vm1/vda", None, &s.dir.path().join("o")).expect_err("fails");
    assert!(e.to_string().contains("truncated"), "{e}");
}

#[test]
fn missing_pack() {
    let s = setup();
    let pack = pack_of_vm1(&s);
    std::fs::remove_file(&pack).expect("rm");
    let v = datamover::verify(&s.repo, false).expect("verify");
    assert!(v.problems.iter().any(|p| p.contains("missing")), "{v:?}");
    assert_eq!(damaged_names(&v), ["vm1/vda", "vm1/vda"]);
    let e = restore(&s.repo, "vm1/vda", None, &s.dir.path().join("o")).expect_err("fails");
    assert!(e.to_string().contains("missing"), "{e}");
}

#[test]
fn damaged_manifest() {
    let s = setup();
    let m = &files(&s.repo.root().join("points/vm2"), "point")[0];
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(m)
        .expect("open");
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, 40).expect("read");
    f.write_all_at(&[b[0] ^ 1], 40).expect("write");
    drop(f);
    let v = datamover::verify(&s.repo, false).expect("verify");
    assert_eq!(v.damaged_points.len(), 1, "{v:?}");
    assert!(
        v.damaged_points[0].problems[0].contains("corrupt point manifest"),
        "{v:?}"
    );
    let id = m.file_stem().and_then(|x| x.to_str()).expect("stem");
    let e = restore(&s.repo, "vm2/vda", Some(id), &s.dir.path().join("o")).expect_err("fails");
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    // A truncated manifest too.
    let len = std::fs::metadata(m).expect("stat").len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(m)
        .and_then(|f| f.set_len(len - 10))
        .expect("truncate");
    let e = restore(&s.repo, "vm2/vda", Some(id), &s.dir.path().join("o")).expect_err("fails");
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
}

#[test]
fn damaged_index_file() {
    let s = setup();
    let idx = &files(&s.repo.root().join("index"), "idx")[0];
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(idx)
        .expect("open");
    f.write_all_at(b"garbage!", 30).expect("write");
    drop(f);
    let v = datamover::verify(&s.repo, false).expect("verify");
    assert!(
        v.problems.iter().any(|p| p.contains("corrupt index")),
        "{v:?}"
    );
    assert!(
        !v.damaged_points.is_empty(),
        "points losing their index are named"
    );
    let e = s.repo.load_index().expect_err("index load fails");
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    // Prune refuses to collect garbage with an unreadable index.
    let p = datamover::prune(
        &s.repo,
        &datamover::PruneOptions {
            keep: datamover::KeepPolicy {
                last: Some(1),
                ..Default::default()
            },
            ..Default::default()
        },
    );
    assert!(p.is_err());
}

#[test]
fn unknown_versions_are_refused() {
    let s = setup();
    let cfg = s.repo.root().join("config");
    let text = std::fs::read_to_string(&cfg)
        .expect("read")
        .replace("\"version\": 1", "\"version\": 7");
    std::fs::write(&cfg, text).expect("write");
    let e = Repository::open(s.repo.root()).expect_err("refused");
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    assert!(e.to_string().contains("version 7"), "{e}");
    let e = Repository::open(s.dir.path()).expect_err("not a repo");
    assert!(e.to_string().contains("not a datamover repository"), "{e}");
}
