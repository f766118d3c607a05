//! `dm export`: a restore point served over NBD, checked against the
//! reference clients (nbdcopy, nbdinfo, qemu-img) and our own: byte for
//! byte, holes reported, many clients and multi-conn at once, TLS, a
//! damaged chunk (that read fails, others work), writes to an overlay
//! (the repository untouched), and a scripted hostile client.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)] // test crate: a panic is a failed test

use datamover_testkit as common;

use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;

use common::tls::{issue, make_ca};
use common::{Fill, can_run, hash_file, make_image};
use datamover::format::manifest::Extent;
use datamover::{BackupOptions, BlockTarget, PointRef, Repository};
use datamover_transports::export::{Export, export};
use datamover_transports::nbd::proto as p;

const MIB: u64 = 1 << 20;

/// A repository with one point of a 64 MiB disk: data, text, holes.
fn setup(dir: &Path) -> (Repository, PathBuf) {
    let img = dir.join("disk.raw");
    make_image(
        &img,
        64 * MIB,
        &[
            (MIB, 9 * MIB, Fill::Random(3)),
            (20 * MIB, 4 * MIB, Fill::Text),
            (60 * MIB, 2 * MIB, Fill::Random(4)),
        ],
    );
    let repo = Repository::init(&dir.join("repo")).unwrap();
    let src = datamover::open_source(&img).unwrap();
    datamover::backup(
        &repo,
        src.as_ref(),
        &"vm/disk".parse().unwrap(),
        &BackupOptions::default(),
    )
    .unwrap();
    (repo, img)
}

/// Run `f` with `point` exported as `how`; `f` gets the URI.
fn with_export<T>(repo: &Repository, point: &str, how: Export, f: impl FnOnce(&str) -> T) -> T {
    let stop = AtomicBool::new(false);
    let point: PointRef = point.parse().unwrap();
    std::thread::scope(|s| {
        let (tx, rx) = mpsc::channel();
        let h = s.spawn(|| {
            export(repo, &point, &how, &stop, move |u| {
                tx.send(u.to_string()).unwrap()
            })
        });
        let uri = rx.recv().expect("the export did not start");
        let r = f(&uri);
        stop.store(true, Ordering::Relaxed);
        h.join().unwrap().expect("the export failed");
        r
    })
}

fn sh(cmd: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(cmd).args(args).output().unwrap()
}

fn ok(o: std::process::Output) -> String {
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn reference_clients_read_the_point_byte_for_byte_with_its_holes() {
    if !can_run(
        "reference_clients_read_the_point_byte_for_byte_with_its_holes",
        &["nbdcopy", "nbdinfo", "qemu-img"],
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (repo, img) = setup(dir);
    let sock = dir.join("nbd.sock");
    let how = Export {
        listen: format!("unix:{}", sock.display()),
        ..Export::default()
    };
    with_export(&repo, "vm/disk", how, |uri| {
        assert!(uri.starts_with("nbd+unix:///vm/disk?socket="), "{uri}");
        let out = dir.join("copy.raw");
        ok(sh("nbdcopy", &[uri, out.to_str().unwrap()]));
        assert_eq!(hash_file(&out), hash_file(&img));
        // Many clients at once, each with four connections (multi-conn).
        let outs: Vec<PathBuf> = (0..4).map(|i| dir.join(format!("c{i}.raw"))).collect();
        let kids: Vec<_> = outs
            .iter()
            .map(|o| {
                std::process::Command::new("nbdcopy")
                    .args(["--connections=4", uri, o.to_str().unwrap()])
                    .spawn()
                    .unwrap()
            })
            .collect();
        for (mut k, o) in kids.into_iter().zip(&outs) {
            assert!(k.wait().unwrap().success());
            assert_eq!(hash_file(o), hash_file(&img));
        }
        let conv = dir.join("qemu.raw");
        ok(sh(
            "qemu-img",
            &[
                "convert",
                "-f",
                "raw",
                "-O",
                "raw",
                uri,
                conv.to_str().unwrap(),
            ],
        ));
        assert_eq!(hash_file(&conv), hash_file(&img));
        // base:allocation: the zero runs are holes.
        let map = ok(sh("nbdinfo", &["--map", uri]));
        let holes: Vec<&str> = map.lines().filter(|l| l.contains("hole")).collect();
        assert!(
            map.lines()
                .any(|l| l.trim_start().starts_with("0 ") && l.contains("hole")),
            "{map}"
        );
        assert!(holes.len() >= 3, "{map}");
        // One extent when asked for one (NBD_CMD_FLAG_REQ_ONE), all of
        // them otherwise.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let parsed = datamover_transports::nbd::uri::NbdUri::parse(uri).unwrap();
        let c = rt
            .block_on(datamover_transports::nbd::NbdClient::connect(
                &parsed,
                &Default::default(),
            ))
            .unwrap();
        let ctx = c.info().context("base:allocation").unwrap();
        let one = rt
            .block_on(c.block_status(0, 64 * MIB as u32, ctx, true))
            .unwrap();
        assert_eq!(one, vec![(MIB as u32, p::STATE_HOLE | p::STATE_ZERO)]);
        let all = rt
            .block_on(c.block_status(0, 64 * MIB as u32, ctx, false))
            .unwrap();
        assert!(all.len() >= 6 && all[0] == one[0], "{all:?}");
        rt.block_on(c.disconnect());
        let info = ok(sh("nbdinfo", &["--json", uri]));
        assert!(info.contains("\"can_multi_conn\": true"), "{info}");
        assert!(info.contains("\"is_read_only\": true"), "{info}");
    });
    assert!(
        !sock.exists(),
        "the socket is removed when the export stops"
    );
}

#[test]
fn a_damaged_chunk_fails_its_reads_only_and_tls_is_required_when_set() {
    if !can_run(
        "a_damaged_chunk_fails_its_reads_only_and_tls_is_required_when_set",
        &["nbdcopy", "openssl"],
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (repo, img) = setup(dir);
    // Damage the chunk at 1 MiB (the first data).
    let disk: datamover::DiskName = "vm/disk".parse().unwrap();
    let id = repo.resolve_point(&disk, None).unwrap();
    let m = repo.read_point(&disk, &id).unwrap();
    let mut off = 0;
    let mut victim = None;
    for e in &m.extents {
        if let (Extent::Chunk { id, .. }, true) = (e, off == MIB) {
            victim = Some(*id);
        }
        off += e.len();
    }
    let loc = repo.load_index().unwrap().get(&victim.unwrap()).unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(repo.pack_path(&loc.pack))
        .unwrap();
    let mut b = [0u8; 1];
    let at = loc.offset + u64::from(loc.frame_len) / 2;
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x10], at).unwrap();
    drop(f);

    let ca = make_ca(dir, "t");
    let (server, client) = (dir.join("server"), dir.join("client"));
    issue(&ca, &server, "server");
    issue(&ca, &client, "client");
    let how = Export {
        listen: "127.0.0.1:0".into(),
        tls_certificates: Some(server.clone()),
        ..Export::default()
    };
    with_export(&repo, "vm/disk", how, |uri| {
        assert!(uri.starts_with("nbds://127.0.0.1:"), "{uri}");
        let tls = format!("{uri}?tls-certificates={}", client.display());
        let nbd = |offset: u64, len: u32| {
            let src = datamover_transports::open_source(&tls).unwrap();
            let mut buf = vec![0u8; len as usize];
            src.read_at(offset, &mut buf).map(|()| buf)
        };
        // The damaged chunk's read fails; the rest read right.
        let e = nbd(MIB, 4096).unwrap_err().to_string();
        assert!(e.contains("EIO") && e.contains("damaged chunk"), "{e}");
        let good = nbd(20 * MIB, 65536).unwrap();
        let mut want = vec![0u8; 65536];
        std::fs::File::open(&img)
            .unwrap()
            .read_exact_at(&mut want, 20 * MIB)
            .unwrap();
        assert_eq!(good, want);
        // Without TLS the export says no.
        let plain = uri.replacen("nbds://", "nbd://", 1);
        let o = sh("nbdcopy", &[&plain, dir.join("x.raw").to_str().unwrap()]);
        assert!(!o.status.success());
        // A client without a certificate of the CA is refused.
        let anon = dir.join("anon");
        std::fs::create_dir_all(&anon).unwrap();
        std::fs::copy(ca.join("ca-cert.pem"), anon.join("ca-cert.pem")).unwrap();
        assert!(
            datamover_transports::open_source(&format!(
                "{uri}?tls-certificates={}",
                anon.display()
            ))
            .is_err()
        );
    });
}

#[test]
fn writes_go_to_the_overlay_and_the_repository_stays_as_it_was() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (repo, img) = setup(dir);
    let overlay = dir.join("overlay.img");
    let how = Export {
        listen: format!("unix:{}", dir.join("w.sock").display()),
        writable: Some(overlay.clone()),
        ..Export::default()
    };
    let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    let read_all = |uri: &str| {
        let src = datamover_transports::open_source(uri).unwrap();
        let mut b = vec![0u8; (64 * MIB) as usize];
        src.read_at(0, &mut b).unwrap();
        b
    };
    let mut want = std::fs::read(&img).unwrap();
    with_export(&repo, "vm/disk", how.clone(), |uri| {
        let t = datamover_transports::nbd::NbdTarget::connect(uri, 64 * MIB, &Default::default())
            .unwrap();
        // Unaligned, across a block edge, over data and over a hole.
        t.write_at(MIB + 1000, &data).unwrap();
        t.write_at(40 * MIB + 4000, &data).unwrap();
        t.write_zeroes(60 * MIB, 8192).unwrap();
        t.flush().unwrap();
        drop(t);
        want[(MIB + 1000) as usize..(MIB + 1000) as usize + data.len()].copy_from_slice(&data);
        want[(40 * MIB + 4000) as usize..(40 * MIB + 4000) as usize + data.len()]
            .copy_from_slice(&data);
        want[(60 * MIB) as usize..(60 * MIB + 8192) as usize].fill(0);
        assert!(
            read_all(uri) == want,
            "the export shows the writes over the point"
        );
    });
    // The overlay outlives the export; a new export over the same point
    // shows the writes again, another point is refused.
    with_export(&repo, "vm/disk", how.clone(), |uri| {
        assert!(read_all(uri) == want);
    });
    let v = datamover::verify(&repo, true).unwrap();
    assert!(v.is_ok(), "{v:?}");
    let out = dir.join("restored.raw");
    let disk: datamover::DiskName = "vm/disk".parse().unwrap();
    let id = repo.resolve_point(&disk, None).unwrap();
    let t = datamover::open_target(&out, 64 * MIB, true).unwrap();
    datamover::restore(&repo, &disk, &id, t.as_ref(), &Default::default()).unwrap();
    assert_eq!(hash_file(&out), hash_file(&img), "the point is unchanged");
    let src = datamover::open_source(&img).unwrap();
    datamover::backup(&repo, src.as_ref(), &disk, &BackupOptions::default()).unwrap();
    let newest = repo.resolve_point(&disk, None).unwrap();
    let stop = AtomicBool::new(false);
    let e = export(
        &repo,
        &format!("vm/disk@{newest}").parse().unwrap(),
        &how,
        &stop,
        |_| {},
    )
    .unwrap_err();
    assert!(e.to_string().contains("holds writes over"), "{e}");
}

/// A raw client that breaks the rules: each gets the protocol's error,
/// and the export goes on serving.
#[test]
fn a_hostile_client_gets_errors_and_the_export_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (repo, _img) = setup(dir);
    let sock = dir.join("h.sock");
    let how = Export {
        listen: format!("unix:{}", sock.display()),
        ..Export::default()
    };
    with_export(&repo, "vm/disk", how, |uri| {
        let open = || {
            let mut s = UnixStream::connect(&sock).unwrap();
            s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
                .unwrap();
            let mut hello = [0u8; 18];
            s.read_exact(&mut hello).unwrap();
            assert_eq!(&hello[..8], &p::NBDMAGIC.to_be_bytes());
            s.write_all(&(p::FLAG_C_FIXED_NEWSTYLE | p::FLAG_C_NO_ZEROES).to_be_bytes())
                .unwrap();
            s
        };
        // An unknown option, then a huge one: an error, then the end.
        let mut s = open();
        s.write_all(&p::option_request(99, &[])).unwrap();
        let mut r = [0u8; 20];
        s.read_exact(&mut r).unwrap();
        let h = p::option_reply_header(&r).unwrap();
        assert_eq!(h.reply, p::REP_ERR_UNSUP);
        let mut skip = vec![0u8; h.len as usize];
        s.read_exact(&mut skip).unwrap();
        let mut big = p::IHAVEOPT.to_be_bytes().to_vec();
        big.extend_from_slice(&p::OPT_GO.to_be_bytes());
        big.extend_from_slice(&(1u32 << 30).to_be_bytes());
        s.write_all(&big).unwrap();
        let mut end = [0u8; 1];
        assert_eq!(s.read(&mut end).unwrap_or(0), 0, "connection closed");

        // In transmission: every bad request gets EINVAL or EPERM.
        let mut s = open();
        s.write_all(&p::option_request(p::OPT_GO, &p::go_data("", &[])))
            .unwrap();
        loop {
            let mut r = [0u8; 20];
            s.read_exact(&mut r).unwrap();
            let h = p::option_reply_header(&r).unwrap();
            let mut skip = vec![0u8; h.len as usize];
            s.read_exact(&mut skip).unwrap();
            if h.reply == p::REP_ACK {
                break;
            }
        }
        let ask = |s: &mut UnixStream, cmd: u16, off: u64, len: u32| -> u32 {
            s.write_all(&p::request(0, cmd, 7, off, len)).unwrap();
            if cmd == p::CMD_WRITE {
                s.write_all(&vec![1u8; len as usize]).unwrap();
            }
            let mut r = [0u8; 16];
            s.read_exact(&mut r).unwrap();
            assert_eq!(&r[..4], &p::SIMPLE_REPLY_MAGIC.to_be_bytes());
            u32::from_be_bytes([r[4], r[5], r[6], r[7]])
        };
        assert_eq!(ask(&mut s, p::CMD_READ, 0, 64 << 20), 22, "too large");
        assert_eq!(
            ask(&mut s, p::CMD_READ, 64 * MIB - 10, 20),
            22,
            "beyond the end"
        );
        assert_eq!(ask(&mut s, p::CMD_READ, u64::MAX - 5, 20), 22, "wraps");
        assert_eq!(ask(&mut s, 42, 0, 0), 22, "unknown command");
        assert_eq!(ask(&mut s, p::CMD_WRITE, 0, 512), 1, "read-only");
        assert_eq!(
            ask(&mut s, p::CMD_BLOCK_STATUS, 0, 4096),
            22,
            "no meta context"
        );
        // Still in step: a good read.
        s.write_all(&p::request(0, p::CMD_READ, 8, 0, 512)).unwrap();
        let mut r = vec![0u8; 16 + 512];
        s.read_exact(&mut r).unwrap();
        assert_eq!(u32::from_be_bytes([r[4], r[5], r[6], r[7]]), 0);
        // A bad magic ends this connection; a client vanishing mid-request
        // ends its own.
        s.write_all(&[0u8; 28]).unwrap();
        assert_eq!(s.read(&mut end).unwrap_or(0), 0);
        let mut v = open();
        v.write_all(&p::IHAVEOPT.to_be_bytes()[..5]).unwrap();
        drop(v);
        // The export serves others as before.
        let src = datamover_transports::open_source(uri).unwrap();
        let mut b = vec![0u8; 4096];
        src.read_at(MIB, &mut b).unwrap();
    });
}
