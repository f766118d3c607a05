//! File-level restore from points of real disk images: GPT with ext4,
//! XFS, Btrfs, vfat, NTFS and an ext4 LV in LVM, plus a damaged ext4; and
//! MBR.
//! The images are built by the filesystems' own tools and kernel drivers
//! (in a libguestfs appliance: this host's kernel has no device-mapper
//! for LVM). Listings and extracted files (content, mode, owner, times,
//! symlinks, extended attributes) and tar archives equal what was
//! written; the damaged filesystem is a clear error that harms nothing.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)] // test crate: a panic is a failed test

use datamover_testkit as common;

use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use common::{Fill, can_run, make_image};
use datamover::{BackupOptions, Repository};
use datamover_transports::files::{self, FilesOptions, Kind};

const MTIME: i64 = 1_600_000_000;
const MTIME_NS: u32 = 123_456_789;

fn guestfish(img: &Path, script: &str) {
    let mut c = Command::new("guestfish");
    c.args(["--rw", "-a"])
        .arg(img)
        .env("LIBGUESTFS_BACKEND", "direct");
    if common::guest::accel().0 == "tcg" {
        c.env("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg");
    }
    let mut child = c
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("run guestfish");
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), script.as_bytes()).unwrap();
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success(), "guestfish script failed");
}

/// The files every POSIX filesystem gets under `at` (vfat: content only).
fn populate(at: &str, host: &Path, posix: bool) -> String {
    let a = host.join("a.txt");
    let big = host.join("big.bin");
    let s = host.join("s.txt");
    let mut out = format!(
        "mkdir {at}/dir\nmkdir {at}/dir/sub\nupload {} {at}/dir/a.txt\nupload {} {at}/dir/big.bin\nupload {} {at}/dir/sub/s.txt\n",
        a.display(),
        big.display(),
        s.display()
    );
    if posix {
        out.push_str(&format!(
            "chmod 0640 {at}/dir/a.txt\nchown 1001 1002 {at}/dir/a.txt\nsetxattr user.dm hello 5 {at}/dir/a.txt\nln-s a.txt {at}/dir/link\nchmod 0750 {at}/dir/sub\nutimens {at}/dir/a.txt {MTIME} 111 {MTIME} {MTIME_NS}\n"
        ));
    }
    out
}

fn lgetxattr(p: &Path, name: &str) -> Option<Vec<u8>> {
    use std::os::unix::ffi::OsStrExt;
    let cp = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    let cn = std::ffi::CString::new(name).unwrap();
    let mut buf = vec![0u8; 256];
    // SAFETY: valid C strings and a buffer of its length.
    let n =
        unsafe { libc::lgetxattr(cp.as_ptr(), cn.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (n >= 0).then(|| {
        buf.truncate(n as usize);
        buf
    })
}

fn sha(p: &Path) -> String {
    blake3::hash(&std::fs::read(p).unwrap())
        .to_hex()
        .to_string()
}

/// What `dir` extracted from a POSIX filesystem must hold.
fn check_extracted(dir: &Path, host: &Path, posix: bool) {
    assert_eq!(sha(&dir.join("a.txt")), sha(&host.join("a.txt")));
    assert_eq!(sha(&dir.join("big.bin")), sha(&host.join("big.bin")));
    assert_eq!(sha(&dir.join("sub/s.txt")), sha(&host.join("s.txt")));
    if !posix {
        return;
    }
    let m = std::fs::symlink_metadata(dir.join("a.txt")).unwrap();
    assert_eq!(m.permissions().mode() & 0o7777, 0o640);
    assert_eq!((m.uid(), m.gid()), (1001, 1002));
    assert_eq!((m.mtime(), m.mtime_nsec()), (MTIME, i64::from(MTIME_NS)));
    assert_eq!(
        lgetxattr(&dir.join("a.txt"), "user.dm").as_deref(),
        Some(&b"hello"[..])
    );
    assert_eq!(
        std::fs::read_link(dir.join("link")).unwrap(),
        Path::new("a.txt")
    );
    let sub = std::fs::metadata(dir.join("sub")).unwrap();
    assert_eq!(sub.permissions().mode() & 0o7777, 0o750);
}

#[test]
fn files_come_out_of_gpt_lvm_and_mbr_points_with_their_metadata() {
    if !can_run(
        "files_come_out_of_gpt_lvm_and_mbr_points_with_their_metadata",
        &["guestfish", "qemu-system-x86_64"],
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let host = d.join("src");
    std::fs::create_dir(&host).unwrap();
    std::fs::write(host.join("a.txt"), b"the first file\n").unwrap();
    std::fs::write(host.join("s.txt"), b"nested\n").unwrap();
    make_image(
        &host.join("big.bin"),
        3 << 20,
        &[(0, 3 << 20, Fill::Random(7))],
    );

    // GPT: ext4, XFS, Btrfs, vfat, LVM (an ext4 LV), and an ext4 that is
    // then damaged (its superblock overwritten).
    let img = d.join("gpt.raw");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(640 << 20)
        .unwrap();
    let mut script = String::from(
        "run\npart-init /dev/sda gpt\n\
         part-add /dev/sda p 2048 67583\npart-add /dev/sda p 67584 722943\n\
         part-add /dev/sda p 722944 1001471\npart-add /dev/sda p 1001472 1067007\n\
         part-add /dev/sda p 1067008 1165311\npart-add /dev/sda p 1165312 1198079\n\
         part-add /dev/sda p 1198080 1263615\nmkfs ntfs /dev/sda7\nmkmountpoint /n\n\
         mkfs ext4 /dev/sda1\nmkfs xfs /dev/sda2\nmkfs btrfs /dev/sda3\nmkfs vfat /dev/sda4\n\
         pvcreate /dev/sda5\nvgcreate vg0 /dev/sda5\nlvcreate data vg0 24\nmkfs ext4 /dev/vg0/data\n\
         mkfs ext4 /dev/sda6\n\
         mkmountpoint /e\nmkmountpoint /x\nmkmountpoint /b\nmkmountpoint /v\nmkmountpoint /l\n\
         mount /dev/sda1 /e\nmount /dev/sda2 /x\nmount /dev/sda3 /b\nmount /dev/sda4 /v\nmount /dev/vg0/data /l\nmount /dev/sda7 /n\n",
    );
    for (at, posix) in [
        ("/e", true),
        ("/x", true),
        ("/b", true),
        ("/v", false),
        ("/l", true),
        ("/n", false),
    ] {
        script.push_str(&populate(at, &host, posix));
    }
    script
        .push_str("umount-all\npwrite-device /dev/sda6 \"garbage-garbage-garbage-garbage\" 1024\n");
    guestfish(&img, &script);

    let repo = Repository::init(&d.join("repo")).unwrap();
    let src = datamover::open_source(&img).unwrap();
    let disk: datamover::DiskName = "vm/gpt".parse().unwrap();
    datamover::backup(&repo, src.as_ref(), &disk, &BackupOptions::default()).unwrap();
    let image_size = 640u64 << 20;

    let out = d.join("out");
    std::fs::create_dir(&out).unwrap();
    let point: datamover::PointRef = "vm/gpt".parse().unwrap();
    let t = std::time::Instant::now();
    let loaded = files::browse(&repo, &point, &FilesOptions::default(), |b| {
        eprintln!("appliance up in {:.1} s", t.elapsed().as_secs_f64());
        let top = b.list("/").unwrap();
        let names: Vec<(&str, &str)> = top
            .iter()
            .map(|e| (e.name.as_str(), e.fstype.as_deref().unwrap_or("")))
            .collect();
        assert_eq!(
            names,
            [
                ("sda1", "ext4"),
                ("sda2", "xfs"),
                ("sda3", "btrfs"),
                ("sda4", "vfat"),
                ("sda6", "ext4"),
                ("sda7", "ntfs"),
                ("vg0-data", "ext4"),
            ],
            "{top:#?}"
        );
        assert!(top.iter().all(|e| e.kind == Kind::Filesystem));
        let bad = &top[4];
        assert!(bad.error.is_some(), "{bad:?}");
        let e = b.list("/sda6").unwrap_err();
        assert!(e.to_string().contains("sda6 (ext4) cannot be read"), "{e}");
        let e = b.list("/nope/x").unwrap_err();
        assert!(e.to_string().contains("no filesystem nope"), "{e}");

        // A listing: names, kinds, sizes, modes, owners, times, targets.
        let l = b.list("/sda1/dir").unwrap();
        let shown: Vec<(&str, Kind)> = l.iter().map(|e| (e.name.as_str(), e.kind)).collect();
        assert_eq!(
            shown,
            [
                ("a.txt", Kind::File),
                ("big.bin", Kind::File),
                ("link", Kind::Symlink),
                ("sub", Kind::Dir)
            ]
        );
        let a = &l[0];
        assert_eq!((a.size, a.mode, a.uid, a.gid), (15, 0o640, 1001, 1002));
        assert_eq!((a.mtime, a.mtime_nsec), (MTIME, MTIME_NS));
        assert_eq!(a.path, "/sda1/dir/a.txt");
        assert_eq!(l[2].target.as_deref(), Some("a.txt"));
        assert_eq!(b.list("/sda1/dir/a.txt").unwrap()[0].size, 15);
        // `..` stays inside the filesystem.
        assert_eq!(b.list("/sda1/dir/../../../dir").unwrap().len(), 4);

        // Extraction of each filesystem's tree, metadata and all.
        for (fs, posix) in [
            ("sda1", true),
            ("sda2", true),
            ("sda3", true),
            ("sda4", false),
            ("sda7", false),
            ("vg0-data", true),
        ] {
            let to = out.join(fs);
            std::fs::create_dir(&to).unwrap();
            let x = b.get(&[format!("/{fs}/dir")], &to).unwrap();
            assert_eq!(x.files, 3, "{fs}: {x:?}");
            assert!(x.xattr_errors.is_empty(), "{fs}: {x:?}");
            check_extracted(&to.join("dir"), &host, posix);
        }
        // Never over an existing name.
        let e = b
            .get(&["/sda1/dir".to_string()], &out.join("sda1"))
            .unwrap_err();
        assert!(e.to_string().contains("exists"), "{e}");
        // A damaged filesystem harms nothing: the others still read.
        assert!(b.get(&["/sda6/x".to_string()], &out).is_err());
        assert_eq!(b.list("/sda3/dir").unwrap().len(), 4);

        // A tar archive of the Btrfs tree.
        let mut buf = Vec::new();
        let x = b.tar(&["/sda3/dir".to_string()], &mut buf).unwrap();
        assert_eq!((x.files, x.symlinks, x.dirs), (3, 1, 2));
        let mut ar = tar::Archive::new(&buf[..]);
        let mut seen = Vec::new();
        for ent in ar.entries().unwrap() {
            let mut ent = ent.unwrap();
            let p = ent.path().unwrap().display().to_string();
            let h = ent.header().clone();
            if p == "dir/a.txt" {
                assert_eq!(h.mode().unwrap(), 0o640);
                assert_eq!((h.uid().unwrap(), h.gid().unwrap()), (1001, 1002));
                assert_eq!(h.mtime().unwrap(), MTIME as u64);
                let pax: Vec<(String, Vec<u8>)> = ent
                    .pax_extensions()
                    .unwrap()
                    .unwrap()
                    .map(|x| {
                        let x = x.unwrap();
                        (x.key().unwrap().to_string(), x.value_bytes().to_vec())
                    })
                    .collect();
                assert!(
                    pax.contains(&("SCHILY.xattr.user.dm".to_string(), b"hello".to_vec())),
                    "{pax:?}"
                );
                assert!(
                    pax.contains(&("mtime".to_string(), b"1600000000.123456789".to_vec())),
                    "{pax:?}"
                );
            }
            if p == "dir/link" {
                assert_eq!(
                    ent.link_name().unwrap().unwrap().display().to_string(),
                    "a.txt"
                );
            }
            if p == "dir/big.bin" {
                let mut v = Vec::new();
                ent.read_to_end(&mut v).unwrap();
                assert_eq!(
                    blake3::hash(&v).to_hex().to_string(),
                    sha(&host.join("big.bin"))
                );
            }
            seen.push(p);
        }
        seen.sort();
        assert_eq!(
            seen,
            [
                "dir",
                "dir/a.txt",
                "dir/big.bin",
                "dir/link",
                "dir/sub",
                "dir/sub/s.txt"
            ]
        );
        Ok(b.bytes_loaded())
    })
    .unwrap();
    eprintln!("read {loaded} bytes of a {image_size}-byte disk");
    assert!(loaded < image_size / 2, "{loaded}");
    // The repository was only read.
    let v = datamover::verify(&repo, true).unwrap();
    assert!(v.is_ok(), "{:?}", v.problems);

    // MBR: an ext4 and a vfat partition.
    let mbr = d.join("mbr.raw");
    std::fs::File::create(&mbr)
        .unwrap()
        .set_len(96 << 20)
        .unwrap();
    let mut script = String::from(
        "run\npart-init /dev/sda mbr\npart-add /dev/sda p 2048 100351\npart-add /dev/sda p 100352 165887\n\
         mkfs ext4 /dev/sda1\nmkfs vfat /dev/sda2\nmkmountpoint /e\nmkmountpoint /v\n\
         mount /dev/sda1 /e\nmount /dev/sda2 /v\n",
    );
    script.push_str(&populate("/e", &host, true));
    script.push_str(&populate("/v", &host, false));
    script.push_str("umount-all\n");
    guestfish(&mbr, &script);
    let src = datamover::open_source(&mbr).unwrap();
    let disk: datamover::DiskName = "vm/mbr".parse().unwrap();
    datamover::backup(&repo, src.as_ref(), &disk, &BackupOptions::default()).unwrap();
    let to = d.join("mbr-out");
    std::fs::create_dir(&to).unwrap();
    files::browse(
        &repo,
        &"vm/mbr".parse().unwrap(),
        &FilesOptions::default(),
        |b| {
            let top: Vec<String> = b.list("/").unwrap().into_iter().map(|e| e.name).collect();
            assert_eq!(top, ["sda1", "sda2"]);
            b.get(
                &["/sda1/dir".to_string(), "/sda2/dir/big.bin".to_string()],
                &to,
            )
        },
    )
    .unwrap();
    check_extracted(&to.join("dir"), &host, true);
    assert_eq!(sha(&to.join("big.bin")), sha(&host.join("big.bin")));
}
