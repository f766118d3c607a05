//! Disk image files as plain sources: a qcow2 (or vmdk, vhdx, …) is read
//! as the disk it holds, never as container bytes; a probed image that
//! refers to other files is refused unless its format is named.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)] // test crate: a panic is a failed test

use datamover_testkit as common;

use std::path::Path;

use common::{Fill, can_run, hash_file, make_image, run};
use datamover::{BackupOptions, DiskName, Repository, RestoreOptions};
use datamover_transports::SourceOptions;

const MIB: u64 = 1 << 20;

fn backup(
    repo: &Repository,
    src: &Path,
    name: &str,
    format: Option<&str>,
) -> datamover::Result<datamover_transports::BackupRun> {
    datamover_transports::backup(
        repo,
        src.to_str().unwrap(),
        &name.parse().unwrap(),
        &SourceOptions {
            format: format.map(str::to_string),
            ..SourceOptions::default()
        },
        &BackupOptions::default(),
    )
}

fn restored_hash(repo: &Repository, name: &str, dir: &Path) -> String {
    let disk: DiskName = name.parse().unwrap();
    let id = repo.resolve_point(&disk, None).unwrap();
    let size = repo.point_meta(&disk, &id).unwrap().meta.disk_size;
    let out = dir.join(format!("{}.restored", name.replace('/', "-")));
    let t = datamover::target::open_local(&out, size, true).unwrap();
    datamover::restore(repo, &disk, &id, t.as_ref(), &RestoreOptions::default()).unwrap();
    hash_file(&out)
}

#[test]
fn image_files_are_read_as_the_disk_they_hold() {
    if !can_run(
        "image_files_are_read_as_the_disk_they_hold",
        &["qemu-img", "qemu-nbd"],
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let repo = Repository::init(&dir.join("repo")).unwrap();
    let raw = dir.join("disk.raw");
    make_image(
        &raw,
        64 * MIB,
        &[
            (MIB, 3 * MIB, Fill::Random(1)),
            (40 * MIB, 2 * MIB, Fill::Text),
        ],
    );
    let want = hash_file(&raw);
    for fmt in ["qcow2", "vmdk", "vhdx", "vdi", "qed"] {
        let img = dir.join(format!("disk.{fmt}"));
        run(
            "qemu-img",
            &[
                "convert",
                "-f",
                "raw",
                "-O",
                fmt,
                raw.to_str().unwrap(),
                img.to_str().unwrap(),
            ],
        );
        assert_eq!(datamover_transports::image::probe(&img).unwrap(), Some(fmt));
        let name = format!("vm/{fmt}");
        let r = backup(&repo, &img, &name, None).unwrap();
        assert_eq!(r.report.meta.source.kind, fmt);
        assert!(
            r.report.meta.disk_size >= 64 * MIB && r.report.meta.disk_size < 65 * MIB,
            "{fmt}: size {}",
            r.report.meta.disk_size
        );
        // The disk, not the container: the restore is the raw disk.
        let got = restored_hash(&repo, &name, dir);
        if r.report.meta.disk_size == 64 * MIB {
            assert_eq!(got, want, "{fmt}: restore differs from the disk");
        }
        // Holes come through as holes where QEMU's driver reports them
        // (vhdx and vdi report everything allocated): only the written 5 MiB are read.
        if ["qcow2", "vmdk", "qed"].contains(&fmt) {
            assert!(
                r.report.stats.bytes_read <= 8 * MIB,
                "{fmt}: read {}",
                r.report.stats.bytes_read
            );
        }
    }
    assert_eq!(datamover_transports::image::probe(&raw).unwrap(), None);
    // A restore over an image file is refused: it would write a raw disk
    // over the container.
    let qcow2 = dir.join("disk.qcow2");
    let before = hash_file(&qcow2);
    let e = datamover_transports::restore(
        &repo,
        &"vm/qcow2".parse().unwrap(),
        qcow2.to_str().unwrap(),
        true,
        &SourceOptions::default(),
        &RestoreOptions::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("is a qcow2 image"), "{e}");
    assert_eq!(hash_file(&qcow2), before, "the image was touched");
}

#[test]
fn a_probed_image_that_names_other_files_is_not_followed() {
    if !can_run(
        "a_probed_image_that_names_other_files_is_not_followed",
        &["qemu-img", "qemu-nbd", "qemu-io"],
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let repo = Repository::init(&dir.join("repo")).unwrap();
    let base = dir.join("base.raw");
    make_image(&base, 16 * MIB, &[(0, 4 * MIB, Fill::Random(7))]);
    let top = dir.join("top.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            base.to_str().unwrap(),
            "-F",
            "raw",
            top.to_str().unwrap(),
        ],
    );
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x33 8M 1M",
            top.to_str().unwrap(),
        ],
    );

    // A guest can write such a header into its raw disk: no guessing.
    let e = backup(&repo, &top, "vm/top", None).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("refers to other files")
            && msg.contains("base.raw")
            && msg.contains("--format qcow2"),
        "{msg}"
    );
    assert!(repo.list_points(None).unwrap().0.is_empty());

    // Named: read through the chain.
    let r = backup(&repo, &top, "vm/top", Some("qcow2")).unwrap();
    assert_eq!(r.report.meta.disk_size, 16 * MIB);
    let expect = dir.join("expect.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            top.to_str().unwrap(),
            expect.to_str().unwrap(),
        ],
    );
    assert_eq!(restored_hash(&repo, "vm/top", dir), hash_file(&expect));

    // --format raw: the bytes of the file, whatever they look like.
    let r = backup(&repo, &top, "vm/bytes", Some("raw")).unwrap();
    assert_eq!(r.report.meta.source.kind, "file");
    assert_eq!(restored_hash(&repo, "vm/bytes", dir), hash_file(&top));

    let e = backup(&repo, &top, "vm/x", Some("iso")).unwrap_err();
    assert!(e.to_string().contains("unknown image format"), "{e}");
}
