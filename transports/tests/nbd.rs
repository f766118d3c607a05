//! The NBD client against real servers (qemu-nbd, nbdkit) started by the
//! tests and stopped by PID. The scripted hostile server, for what no
//! real server sends, is in `nbd_hostile.rs`.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)] // test crate: a panic is a failed test

use datamover_testkit as common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::tls::{issue, make_ca};
use common::{Daemon, Fill, free_port, hash_file, make_image, qemu_nbd, run, wait_for};
use datamover::{BackupOptions, DiskName, ErrorKind, Repository, RestoreOptions};
use datamover_transports::nbd::{ConnectOptions, NbdSource};
use datamover_transports::open_source;

fn open_err(uri: &str) -> datamover::Error {
    match open_source(uri) {
        Ok(_) => panic!("{uri} opened, expected an error"),
        Err(e) => e,
    }
}

/// A read-only, persistent qemu-nbd serving `image` as export "disk" on a unix socket.
fn qemu_nbd_unix(dir: &Path, format: &str, image: &Path, sock: &Path) -> Daemon {
    let (image, sock) = (image.to_str().unwrap(), sock.to_str().unwrap());
    qemu_nbd(
        dir,
        &["-r", "-f", format, "-k", sock, "-x", "disk", "-t", image],
    )
}

/// A read-only, persistent qemu-nbd serving raw `image` as export "disk"
/// on 127.0.0.1:`port`, with `extra` options first.
fn qemu_nbd_tcp(dir: &Path, extra: &[&str], port: u16, image: &Path) -> Daemon {
    let port = port.to_string();
    let mut args = extra.to_vec();
    args.extend(["-r", "-f", "raw", "-b", "127.0.0.1", "-p", &port]);
    args.extend(["-x", "disk", "-t", image.to_str().unwrap()]);
    qemu_nbd(dir, &args)
}

fn tools(test: &str, t: &[&str]) -> bool {
    common::can_run(test, t)
}

fn backup_restore(repo: &Repository, uri: &str, name: &str, out: &Path) -> datamover::BackupReport {
    let src = open_source(uri).unwrap_or_else(|e| panic!("open {uri}: {e}"));
    let disk: DiskName = name.parse().unwrap();
    let rep = datamover::backup(repo, src.as_ref(), &disk, &BackupOptions::default())
        .unwrap_or_else(|e| panic!("backup: {e}"));
    let id = repo.resolve_point(&disk, None).unwrap();
    let t = datamover::open_target(out, rep.stats.bytes_total, true).unwrap();
    datamover::restore(repo, &disk, &id, t.as_ref(), &RestoreOptions::default()).unwrap();
    rep
}

#[test]
fn qemu_nbd_raw_over_tcp_and_qcow2_over_unix() {
    if !tools("qemu_nbd", &["qemu-nbd", "qemu-img"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    make_image(
        &img,
        64 << 20,
        &[
            (3 << 20, 10 << 20, Fill::Random(1)),
            (40 << 20, 5 << 20, Fill::Text),
            (50 << 20, 2 << 20, Fill::Zeros),
        ],
    );
    let repo = Repository::init(&dir.path().join("repo")).unwrap();

    let port = free_port();
    let _raw = qemu_nbd_tcp(dir.path(), &[], port, &img);
    let out = dir.path().join("out-raw.raw");
    let rep = backup_restore(
        &repo,
        &format!("nbd://127.0.0.1:{port}/disk"),
        "vm/raw",
        &out,
    );
    assert_eq!(hash_file(&out), hash_file(&img));
    assert_eq!(rep.meta.transport, "nbd");
    assert!(
        rep.stats.bytes_read <= 18 << 20,
        "holes are not read: {}",
        rep.stats.bytes_read
    );

    let qcow = dir.path().join("disk.qcow2");
    common::sh(
        Command::new("qemu-img")
            .args(["convert", "-O", "qcow2"])
            .arg(&img)
            .arg(&qcow),
    );
    let sock = dir.path().join("q.sock");
    let _q = qemu_nbd_unix(dir.path(), "qcow2", &qcow, &sock);
    let out = dir.path().join("out-qcow.raw");
    let rep = backup_restore(
        &repo,
        &format!("nbd+unix:///disk?socket={}", sock.display()),
        "vm/qcow",
        &out,
    );
    assert_eq!(hash_file(&out), hash_file(&img));
    // qcow2 reports the written zeros as zero/holes: they are not read either.
    assert!(
        rep.stats.bytes_read <= 16 << 20,
        "read {}",
        rep.stats.bytes_read
    );
    // Same data as the raw export: nothing new.
    assert_eq!(rep.stats.bytes_new, 0);
}

#[test]
fn nbdkit_pattern_is_an_independent_second_server() {
    if !tools("nbdkit", &["nbdkit"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("k.sock");
    let _d = nbdkit(dir.path(), &sock, &["pattern", "24M"]);
    let repo = Repository::init(&dir.path().join("repo")).unwrap();
    let out = dir.path().join("out.raw");
    backup_restore(
        &repo,
        &format!("nbd+unix:///?socket={}", sock.display()),
        "vm/pattern",
        &out,
    );
    // nbdkit-pattern-plugin: every 8 bytes hold their own offset, big-endian.
    let mut expect = blake3::Hasher::new();
    for o in (0..24u64 << 20).step_by(8) {
        expect.update(&o.to_be_bytes());
    }
    assert_eq!(hash_file(&out), expect.finalize().to_hex().to_string());
}

#[test]
fn nbdkit_sparse_random_holes_are_not_read() {
    if !tools("nbdkit_sparse", &["nbdkit", "nbdcopy"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("sr.sock");
    // Deterministic for a seed: ~25 % of 64 MiB is random data, the rest holes.
    let _d = nbdkit(
        dir.path(),
        &sock,
        &["sparse-random", "64M", "seed=7", "percent=25"],
    );
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let repo = Repository::init(&dir.path().join("repo")).unwrap();
    let out = dir.path().join("out.raw");
    let rep = backup_restore(&repo, &uri, "vm/sparse", &out);
    // nbdcopy, the reference client, reads the same export.
    let reference = dir.path().join("ref.raw");
    run("nbdcopy", &[&uri, reference.to_str().unwrap()]);
    assert_eq!(hash_file(&out), hash_file(&reference));
    assert!(
        rep.stats.bytes_read < 40 << 20,
        "holes must not be read: read {}",
        rep.stats.bytes_read
    );
    assert!(rep.stats.bytes_zero > 24 << 20, "{}", rep.stats.bytes_zero);
}

#[test]
fn errors_unknown_export_refused_tls_server_killed() {
    if !tools("nbd_errors", &["qemu-nbd", "openssl"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    make_image(&img, 256 << 20, &[(0, 256 << 20, Fill::Random(3))]);
    let sock = dir.path().join("s.sock");
    let d = qemu_nbd_unix(dir.path(), "raw", &img, &sock);

    let e = open_err(&format!("nbd+unix:///nope?socket={}", sock.display()));
    assert!(
        e.to_string().contains("no export named \"nope\"")
            && e.to_string().contains("offers: disk"),
        "{e}"
    );
    assert_eq!(e.kind(), ErrorKind::Io);

    // TLS asked of a server without it: refused, never downgraded.
    let ca = make_ca(dir.path(), "plain");
    let e = open_err(&format!(
        "nbds+unix:///disk?socket={}&tls-certificates={}",
        sock.display(),
        ca.display()
    ));
    assert_eq!(e.kind(), ErrorKind::Io);
    assert!(
        e.to_string().contains("the server refused TLS")
            && e.to_string().contains("not continuing without encryption"),
        "{e}"
    );

    let e = open_err(&format!("nbd://127.0.0.1:{}/disk", free_port()));
    assert!(e.to_string().contains("nbd://127.0.0.1"), "{e}");

    // Kill the server during a backup: a clear error, no point left.
    let repo = Repository::init(&dir.path().join("repo")).unwrap();
    let src = NbdSource::connect(
        &format!("nbd+unix:///disk?socket={}", sock.display()),
        &ConnectOptions::default(),
    )
    .unwrap();
    // Killed from the progress callback once 32 MiB are read: deterministic.
    let pid = d.pid().expect("qemu-nbd pid");
    let killed = std::sync::atomic::AtomicBool::new(false);
    let killed = std::sync::Arc::new(killed);
    let k = killed.clone();
    let opts = BackupOptions {
        progress: Some(std::sync::Arc::new(move |done, _| {
            if done >= 32 << 20 && !k.swap(true, std::sync::atomic::Ordering::SeqCst) {
                let _ = Command::new("kill")
                    .arg("-KILL")
                    .arg(pid.to_string())
                    .status();
            }
            true
        })),
        ..BackupOptions::default()
    };
    let r = datamover::backup(&repo, &src, &"vm/killed".parse().unwrap(), &opts);
    assert!(
        killed.load(std::sync::atomic::Ordering::SeqCst),
        "server was never killed"
    );
    drop(d);
    let e = r.expect_err("backup must fail");
    assert!(
        e.to_string().contains("the server closed the connection"),
        "{e}"
    );
    assert!(
        repo.list_points(None).unwrap().0.is_empty(),
        "no partial point"
    );
}

/// qemu-nbd exporting `qcow2` read-only with its dirty bitmap `bitmap`.
fn qemu_nbd_bitmap(dir: &Path, qcow2: &Path, bitmap: &str, sock: &Path) -> Daemon {
    let _ = std::fs::remove_file(sock);
    qemu_nbd(
        dir,
        &[
            "-r",
            "-f",
            "qcow2",
            "-B",
            bitmap,
            "-k",
            sock.to_str().unwrap(),
            "-x",
            "disk",
            "-t",
            qcow2.to_str().unwrap(),
        ],
    )
}

fn tracked_backup(
    repo: &Repository,
    uri: &str,
    bitmap: &str,
    full_if_needed: bool,
) -> datamover::Result<datamover::BackupReport> {
    let src = datamover_transports::open_source_with(
        uri,
        &datamover_transports::SourceOptions {
            bitmap: Some(bitmap.into()),
            timeout: Some(Duration::from_secs(20)),
            ..Default::default()
        },
    )?;
    let opts = BackupOptions {
        full_if_needed,
        ..BackupOptions::default()
    };
    datamover::backup(repo, src.as_ref(), &"vm/disk".parse().unwrap(), &opts)
}

/// `qemu-img compare` of the qcow2 (shared, it may be exported) with a raw restore.
fn assert_same(qcow2: &Path, raw: &Path) {
    run(
        "qemu-img",
        &[
            "compare",
            "-U",
            "-f",
            "qcow2",
            "-F",
            "raw",
            qcow2.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
}

#[test]
fn cbt_incrementals_from_a_qemu_dirty_bitmap() {
    if !tools("nbd_cbt", &["qemu-nbd", "qemu-img", "qemu-io"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("seed.raw");
    let qcow2 = dir.path().join("disk.qcow2");
    let sock = dir.path().join("cbt.sock");
    let uri = format!("nbd+unix:///disk?socket={}", sock.display());
    make_image(
        &raw,
        96 << 20,
        &[
            (0, 20 << 20, Fill::Random(11)),
            (40 << 20, 30 << 20, Fill::Text),
            (80 << 20, 4 << 20, Fill::Random(12)),
        ],
    );
    let (q, b0) = (qcow2.to_str().unwrap(), "b0");
    run(
        "qemu-img",
        &["convert", "-O", "qcow2", raw.to_str().unwrap(), q],
    );
    run("qemu-img", &["bitmap", "--add", "--enable", q, b0]);
    let repo = Repository::init(&dir.path().join("repo")).unwrap();

    // No previous point: an error unless a full read is allowed.
    let d = qemu_nbd_bitmap(dir.path(), &qcow2, b0, &sock);
    let e = tracked_backup(&repo, &uri, b0, false).expect_err("no parent");
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert!(e.to_string().contains("no previous point"), "{e}");
    // A bitmap the export does not have: the same, named.
    let e = tracked_backup(&repo, &uri, "nope", false).expect_err("no bitmap");
    assert!(
        e.to_string().contains("no dirty bitmap \"nope\"")
            && e.to_string().contains("--full-if-needed"),
        "{e}"
    );
    let full = tracked_backup(&repo, &uri, b0, true).expect("full");
    assert!(full.full_reason.is_some() && full.parent().is_none());
    assert_eq!(full.stats.bytes_read, 54 << 20);
    d.stop();

    // The "guest" writes: 64 KiB, 1 MiB of data, 2 MiB of zeros, all aligned.
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x5a 5M 64k",
            "-c",
            "write -P 0x11 30M 1M",
            "-c",
            "write -z 44M 2M",
            q,
        ],
    );
    let d = qemu_nbd_bitmap(dir.path(), &qcow2, b0, &sock);
    let inc = tracked_backup(&repo, &uri, b0, false).expect("incremental");
    assert_eq!(inc.parent(), Some(full.point.as_str()));
    assert_eq!(inc.bytes_changed(), Some((64 << 10) + (3 << 20)));
    assert_eq!(
        inc.meta.cbt.as_ref().unwrap().tracker,
        "qemu:dirty-bitmap:b0"
    );
    // Whole 1 MiB blocks around the data writes; the zeroed range is not read.
    assert_eq!(inc.stats.bytes_read, 2 << 20);
    let out = dir.path().join("inc1.raw");
    restore_to(&repo, "vm/disk", out.to_str().unwrap()).unwrap();
    assert_same(&qcow2, &out);
    d.stop();

    // The bitmap is rotated (cleared) with the point; the next incremental
    // holds exactly the later writes.
    run("qemu-img", &["bitmap", "--clear", q, b0]);
    run("qemu-io", &["-f", "qcow2", "-c", "write -P 0x77 90M 4k", q]);
    let d = qemu_nbd_bitmap(dir.path(), &qcow2, b0, &sock);
    let inc2 = tracked_backup(&repo, &uri, b0, false).expect("incremental 2");
    assert_eq!(inc2.parent(), Some(inc.point.as_str()));
    assert_eq!(inc2.bytes_changed(), Some(64 << 10));
    // In a stretch of zeros a chunk starts at the written cluster, as a full
    // read would cut it: one 64 KiB cluster is read.
    assert_eq!(inc2.stats.bytes_read, 64 << 10);
    let out2 = dir.path().join("inc2.raw");
    restore_to(&repo, "vm/disk", out2.to_str().unwrap()).unwrap();
    assert_same(&qcow2, &out2);
    // And the older incremental still restores as it was.
    let disk: DiskName = "vm/disk".parse().unwrap();
    let t = datamover::open_target(&dir.path().join("again.raw"), 96 << 20, true).unwrap();
    datamover::restore(
        &repo,
        &disk,
        &inc.point,
        t.as_ref(),
        &RestoreOptions::default(),
    )
    .unwrap();
    assert_eq!(hash_file(&dir.path().join("again.raw")), hash_file(&out));
    d.stop();
}

/// Many changes in one window of the bitmap: the tracker asks one extent
/// at a time (so qemu does not work out the allocation of the whole
/// window), then, past a few, the rest of the window in one request; the
/// changed ranges are the same either way.
#[test]
fn many_scattered_changes_are_all_found() {
    if !tools("nbd_cbt_many", &["qemu-nbd", "qemu-img", "qemu-io"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let qcow2 = dir.path().join("disk.qcow2");
    let sock = dir.path().join("cbt.sock");
    let uri = format!("nbd+unix:///disk?socket={}", sock.display());
    let (q, b0) = (qcow2.to_str().unwrap(), "b0");
    run("qemu-img", &["create", "-q", "-f", "qcow2", q, "64M"]);
    run("qemu-io", &["-f", "qcow2", "-c", "write -P 0x21 0 64M", q]);
    run("qemu-img", &["bitmap", "--add", "--enable", q, b0]);
    let repo = Repository::init(&dir.path().join("repo")).unwrap();
    let d = qemu_nbd_bitmap(dir.path(), &qcow2, b0, &sock);
    tracked_backup(&repo, &uri, b0, true).expect("full");
    d.stop();
    // 40 writes of 4 KiB, 1.5 MiB apart: 40 dirty 64 KiB granules, 81 runs.
    let writes: Vec<String> = (0..40u64)
        .map(|i| format!("write -P {} {}k 4k", i + 1, i * 1536 + 8))
        .collect();
    let mut args = vec!["-f", "qcow2"];
    for w in &writes {
        args.extend(["-c", w.as_str()]);
    }
    args.push(q);
    run("qemu-io", &args);
    let d = qemu_nbd_bitmap(dir.path(), &qcow2, b0, &sock);
    let inc = tracked_backup(&repo, &uri, b0, false).expect("incremental");
    assert_eq!(inc.bytes_changed(), Some(40 * (64 << 10)));
    let out = dir.path().join("inc.raw");
    restore_to(&repo, "vm/disk", out.to_str().unwrap()).unwrap();
    assert_same(&qcow2, &out);
    d.stop();
}

fn restore_to(repo: &Repository, name: &str, uri: &str) -> datamover::Result<()> {
    let disk: DiskName = name.parse().unwrap();
    let id = repo.resolve_point(&disk, None).unwrap();
    let size = repo.point_meta(&disk, &id).unwrap().meta.disk_size;
    let t = datamover_transports::open_target(
        uri,
        size,
        false,
        &datamover_transports::SourceOptions::default(),
    )?;
    datamover::restore(repo, &disk, &id, t.as_ref(), &RestoreOptions::default()).map(drop)
}

/// The client itself, for requests the pipeline does not make.
fn raw_client(
    uri: &str,
) -> (
    tokio::runtime::Runtime,
    datamover_transports::nbd::NbdClient,
) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let u = datamover_transports::nbd::NbdUri::parse(uri).unwrap();
    let c = rt
        .block_on(datamover_transports::nbd::NbdClient::connect(
            &u,
            &ConnectOptions::default(),
        ))
        .unwrap();
    (rt, c)
}

fn nbdkit(dir: &Path, sock: &Path, args: &[&str]) -> Daemon {
    let pid_file = dir.join(format!("nbdkit-{}.pid", free_port()));
    let _ = std::fs::remove_file(sock);
    common::sh(
        Command::new("nbdkit")
            .arg("-U")
            .arg(sock)
            .arg("-P")
            .arg(&pid_file)
            .args(args),
    );
    wait_for(&pid_file);
    Daemon { pid_file }
}

#[test]
fn restore_into_writable_exports() {
    if !tools(
        "nbd_restore",
        &["qemu-nbd", "qemu-img", "qemu-io", "nbdkit", "nbdcopy"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    let size = 48u64 << 20;
    make_image(
        &img,
        size,
        &[
            (1 << 20, 9 << 20, Fill::Random(5)),
            (20 << 20, 3 << 20, Fill::Zeros),
            (30 << 20, 6 << 20, Fill::Text),
        ],
    );
    let noise = dir.path().join("noise.raw");
    make_image(&noise, size, &[(0, size, Fill::Random(6))]);
    let repo = Repository::init(&dir.path().join("repo")).unwrap();
    for (p, n) in [(&noise, "vm/noise"), (&img, "vm/disk")] {
        let src = open_source(p.to_str().unwrap()).unwrap();
        datamover::backup(
            &repo,
            src.as_ref(),
            &n.parse().unwrap(),
            &BackupOptions::default(),
        )
        .unwrap();
    }

    // qemu-nbd, writable qcow2 full of 0xff: the restore equals the image.
    let q = dir.path().join("target.qcow2");
    let qs = q.to_str().unwrap();
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", qs, &size.to_string()],
    );
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", &format!("write -P 0xff 0 {size}"), qs],
    );
    let sock = dir.path().join("w.sock");
    let uri = format!("nbd+unix:///disk?socket={}", sock.display());
    let d = qemu_nbd(
        dir.path(),
        &[
            "-f",
            "qcow2",
            "-k",
            sock.to_str().unwrap(),
            "-x",
            "disk",
            "-t",
            qs,
        ],
    );
    restore_to(&repo, "vm/disk", &uri).expect("restore into qemu-nbd");
    // TRIM and FLUSH on the same export, through the client.
    let c = NbdSource::connect(&uri, &ConnectOptions::default()).unwrap();
    let flags = c.client().info().flags;
    assert!(flags & datamover_transports::nbd::proto::TFLAG_SEND_TRIM != 0);
    d.stop();
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "qcow2",
            img.to_str().unwrap(),
            qs,
        ],
    );

    // A read-only export and a too small one are refused up front.
    let small = dir.path().join("small.raw");
    make_image(&small, 1 << 20, &[]);
    let ro_sock = dir.path().join("ro.sock");
    let _ro = qemu_nbd_unix(dir.path(), "raw", &img, &ro_sock);
    let e = restore_to(
        &repo,
        "vm/disk",
        &format!("nbd+unix:///disk?socket={}", ro_sock.display()),
    )
    .expect_err("read-only");
    assert!(e.to_string().contains("read-only"), "{e}");
    let small_sock = dir.path().join("small.sock");
    let _small = qemu_nbd(
        dir.path(),
        &[
            "-f",
            "raw",
            "-k",
            small_sock.to_str().unwrap(),
            "-x",
            "disk",
            "-t",
            small.to_str().unwrap(),
        ],
    );
    let e = restore_to(
        &repo,
        "vm/disk",
        &format!("nbd+unix:///disk?socket={}", small_sock.display()),
    )
    .expect_err("too small");
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert!(e.to_string().contains("1048576 bytes"), "{e}");

    // nbdkit memory, three ways of zeroing: WRITE_ZEROES with FAST_ZERO,
    // FAST_ZERO refused (ENOTSUP, then a plain WRITE_ZEROES), and no
    // WRITE_ZEROES at all (zero buffers). Noise first, then the disk: its
    // zero runs must overwrite the noise. nbdcopy reads it back.
    let ks = dir.path().join("k.sock");
    let kuri = format!("nbd+unix:///?socket={}", ks.display());
    for filter in [
        &[][..],
        &["zeromode=emulate", "fastzeromode=slow"],
        &["zeromode=none"],
    ] {
        let mut all = if filter.is_empty() {
            vec![]
        } else {
            vec!["--filter=nozero"]
        };
        all.extend(["memory", "48M"]);
        all.extend(filter);
        let k = nbdkit(dir.path(), &ks, &all);
        if filter.contains(&"fastzeromode=slow") {
            // The fallback is really taken: FAST_ZERO is offered, then refused.
            let (rt, c) = raw_client(&kuri);
            let r = rt.block_on(c.write_zeroes(0, 4096, true));
            assert!(
                matches!(
                    r,
                    Err(datamover_transports::nbd::NbdError::Request { errno: 95, .. })
                ),
                "{r:?}"
            );
            rt.block_on(c.disconnect());
        }
        restore_to(&repo, "vm/noise", &kuri).expect("noise");
        restore_to(&repo, "vm/disk", &kuri).expect("disk");
        let back = dir.path().join("back.raw");
        let _ = std::fs::remove_file(&back);
        run("nbdcopy", &[&kuri, back.to_str().unwrap()]);
        assert_eq!(hash_file(&back), hash_file(&img), "nbdkit {filter:?}");
        if filter.is_empty() {
            // TRIM and FLUSH through the client: nbdkit memory reads a
            // trimmed range back as zeros.
            let (rt, c) = raw_client(&kuri);
            rt.block_on(c.trim(1 << 20, 1 << 20)).expect("trim");
            rt.block_on(c.flush()).expect("flush");
            let data = rt.block_on(c.read(1 << 20, 1 << 20)).expect("read");
            assert!(data.iter().all(|b| *b == 0), "trimmed range reads as zeros");
            rt.block_on(c.disconnect());
        }
        k.stop();
    }
}

fn qemu_nbd_tls(dir: &Path, creds: &Path, verify_peer: bool, port: u16, img: &Path) -> Daemon {
    let creds = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=server,verify-peer={}",
        creds.display(),
        if verify_peer { "on" } else { "off" }
    );
    qemu_nbd_tcp(dir, &["--object", &creds, "--tls-creds", "tls0"], port, img)
}

#[test]
fn tls_with_qemu_nbd_x509() {
    if !tools("nbd_tls", &["qemu-nbd", "openssl"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    make_image(&img, 24 << 20, &[(2 << 20, 6 << 20, Fill::Random(21))]);
    let ca = make_ca(dir.path(), "good");
    let (server, client, anon) = (
        dir.path().join("server"),
        dir.path().join("client"),
        dir.path().join("anon"),
    );
    issue(&ca, &server, "server");
    issue(&ca, &client, "client");
    std::fs::create_dir_all(&anon).unwrap();
    std::fs::copy(ca.join("ca-cert.pem"), anon.join("ca-cert.pem")).unwrap();
    let wrong = make_ca(dir.path(), "wrong");
    let repo = Repository::init(&dir.path().join("repo")).unwrap();

    let port = free_port();
    let _d = qemu_nbd_tls(dir.path(), &server, false, port, &img);
    let uri = |certs: &Path| {
        format!(
            "nbds://127.0.0.1:{port}/disk?tls-certificates={}",
            certs.display()
        )
    };
    // Encrypted backup, restored byte for byte.
    let out = dir.path().join("out.raw");
    let rep = backup_restore(&repo, &uri(&anon), "vm/tls", &out);
    assert_eq!(rep.stats.bytes_read, 6 << 20);
    assert_eq!(hash_file(&out), hash_file(&img));
    // By host name too, with the directory given as an option.
    let src = datamover_transports::open_source_with(
        &format!("nbds://localhost:{port}/disk"),
        &datamover_transports::SourceOptions {
            tls_certificates: Some(anon.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(src.size(), 24 << 20);
    drop(src);

    // A CA that did not sign the server's certificate.
    let e = open_err(&uri(&wrong));
    assert!(
        e.to_string().contains("handshake failed") && e.to_string().contains("UnknownIssuer"),
        "{e}"
    );
    // The name must match.
    let e = open_err(&format!(
        "nbds://127.0.0.1:{port}/disk?tls-certificates={}&tls-hostname=other.example",
        anon.display()
    ));
    assert!(e.to_string().contains("handshake failed"), "{e}");
    // No certificates directory at all.
    let e = open_err(&format!("nbds://127.0.0.1:{port}/disk"));
    assert!(e.to_string().contains("certificates directory"), "{e}");
    // Plain text to a TLS server.
    let e = open_err(&format!("nbd://127.0.0.1:{port}/disk"));
    assert!(e.to_string().contains("requires TLS"), "{e}");

    // A server that checks clients: no client certificate fails, one works.
    let port2 = free_port();
    let _v = qemu_nbd_tls(dir.path(), &server, true, port2, &img);
    let e = open_err(&format!(
        "nbds://127.0.0.1:{port2}/disk?tls-certificates={}",
        anon.display()
    ));
    assert_eq!(e.kind(), ErrorKind::Io, "{e}");
    let src = open_source(&format!(
        "nbds://127.0.0.1:{port2}/disk?tls-certificates={}",
        client.display()
    ))
    .unwrap();
    assert_eq!(src.size(), 24 << 20);
}

#[test]
fn multi_conn_with_qemu_nbd_e4() {
    if !tools("nbd_multi_conn", &["qemu-nbd"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    make_image(
        &img,
        64 << 20,
        &[
            (0, 40 << 20, Fill::Random(31)),
            (50 << 20, 8 << 20, Fill::Text),
        ],
    );
    let sock = dir.path().join("m.sock");
    let (i, k) = (img.to_str().unwrap(), sock.to_str().unwrap());
    let _d = qemu_nbd(
        dir.path(),
        &["-r", "-f", "raw", "-e", "4", "-k", k, "-x", "disk", "-t", i],
    );
    let uri = format!("nbd+unix:///disk?socket={k}");
    // A unix socket means a local server: one connection unless asked.
    let one = NbdSource::connect(&uri, &ConnectOptions::default()).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(one.connections(), 1);
    drop(one);
    let four = ConnectOptions {
        connections: Some(4),
        ..ConnectOptions::default()
    };
    let src = NbdSource::connect(&uri, &four).unwrap();
    let t = Instant::now();
    while src.connections() < 4 && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(src.connections(), 4, "CAN_MULTI_CONN with -e 4");
    let repo = Repository::init(&dir.path().join("repo")).unwrap();
    let disk: DiskName = "vm/mc".parse().unwrap();
    let rep = datamover::backup(&repo, &src, &disk, &BackupOptions::default()).unwrap();
    assert_eq!(rep.stats.bytes_read, 48 << 20);
    drop(src);
    let out = dir.path().join("out.raw");
    let t = datamover::open_target(&out, 64 << 20, true).unwrap();
    datamover::restore(
        &repo,
        &disk,
        &rep.point,
        t.as_ref(),
        &RestoreOptions::default(),
    )
    .unwrap();
    assert_eq!(hash_file(&out), hash_file(&img));

    // Without -e the server allows one client and says so: one connection.
    let sock1 = dir.path().join("one.sock");
    let _one = qemu_nbd_unix(dir.path(), "raw", &img, &sock1);
    let src = NbdSource::connect(
        &format!("nbd+unix:///disk?socket={}", sock1.display()),
        &four,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(src.connections(), 1);
}
