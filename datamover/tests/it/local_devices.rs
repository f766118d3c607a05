//! Real filesystems and block devices: an ext4 image made with mkfs.ext4 and
//! filled through a loop mount; a loop device as the backup source and as
//! the restore target. Guards detach loop devices even when a test fails.
use std::process::Command;

use datamover::ErrorKind;

use super::helpers::{backup, new_repo, restore, small_packs};
use crate::common::{Fill, LoopDev, Mount, can_run, hash_file, make_image, random_file, sh};

/// A 256 MiB ext4 image holding a small OS-like tree, random files, a copy
/// of one of them, a log and a file of zeros.
fn make_ext4(dir: &std::path::Path) -> std::path::PathBuf {
    let img = dir.join("fs.raw");
    make_image(&img, 256 << 20, &[]);
    sh(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
        .arg(&img));
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).expect("mkdir");
    let lo = LoopDev::attach(&img, false);
    {
        let mut c = Command::new("mount");
        c.arg(&lo.dev).arg(&mnt);
        let _m = Mount::new(c, &mnt);
        for d in ["etc", "usr/bin", "var/log"] {
            std::fs::create_dir_all(mnt.join(d)).expect("mkdir");
        }
        for i in 0..40 {
            std::fs::write(
                mnt.join(format!("etc/conf{i}")),
                format!("setting_{i} = {}\n", i * 7).repeat(50),
            )
            .expect("w");
        }
        random_file(&mnt.join("usr/bin/tool"), 9 << 20, 11);
        random_file(&mnt.join("usr/bin/blob"), 20 << 20, 12);
        std::fs::copy(mnt.join("usr/bin/blob"), mnt.join("usr/bin/blob.copy")).expect("cp");
        std::fs::write(
            mnt.join("var/log/syslog"),
            "Nov 25 09:52:35 host kernel: eth0 up\n".repeat(200_000),
        )
        .expect("w");
        std::fs::write(mnt.join("zeros"), vec![0u8; 16 << 20]).expect("w");
        sh(&mut Command::new("sync"));
    }
    img
}

#[test]
fn ext4_image_restores_byte_for_byte_and_mounts() {
    if !can_run("ext4_image", &["mkfs.ext4", "losetup", "mount"]) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let img = make_ext4(dir.path());
    let repo = new_repo(dir.path());
    let rep = backup(&repo, &img, "vm/root", &small_packs());
    assert!(
        rep.stats.bytes_read < 200 << 20,
        "unused ext4 space is holes: read {}",
        rep.stats.bytes_read
    );
    // The duplicated 20 MiB file is stored once.
    assert!(
        rep.stats.bytes_new < rep.stats.bytes_data() - (15 << 20),
        "{:?}",
        rep.stats
    );
    let out = dir.path().join("out.raw");
    restore(&repo, "vm/root", None, &out).expect("restore");
    assert_eq!(hash_file(&img), hash_file(&out));
    // The restored filesystem is clean and mountable.
    sh(Command::new("e2fsck").args(["-f", "-n"]).arg(&out));
}

#[test]
fn loop_device_source_and_target() {
    if !can_run("loop_device", &["losetup"]) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("lun.raw");
    make_image(
        &img,
        48 << 20,
        &[
            (1 << 20, 20 << 20, Fill::Random(8)),
            (30 << 20, 4 << 20, Fill::Text),
        ],
    );
    let repo = new_repo(dir.path());
    let src = LoopDev::attach(&img, true);
    let rep = backup(&repo, &src.dev, "vm/lun", &small_packs());
    assert_eq!(rep.meta.transport, "blockdev");
    assert_eq!(rep.stats.bytes_total, 48 << 20);
    // Restore into another loop device pre-filled with garbage: zero runs
    // must be zeroed on a device, not skipped.
    let dst_img = dir.path().join("dst.raw");
    make_image(&dst_img, 48 << 20, &[(0, 48 << 20, Fill::Random(9))]);
    let dst = LoopDev::attach(&dst_img, false);
    restore(&repo, "vm/lun", None, &dst.dev).expect("restore to device");
    assert_eq!(hash_file(&dst.dev), hash_file(&img));
    // A device smaller than the disk is refused before anything is written.
    let small_img = dir.path().join("small.raw");
    make_image(&small_img, 8 << 20, &[]);
    let small = LoopDev::attach(&small_img, false);
    let e = restore(&repo, "vm/lun", None, &small.dev).expect_err("too small");
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert!(e.to_string().contains("at least as large"), "{e}");
}
