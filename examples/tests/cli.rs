//! The `dm` command line as a user meets it: exit codes, one-line errors,
//! JSON figures, kill -9 in the middle of a backup, a full disk.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)] // test crate: a panic is a failed test
use datamover_testkit as common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{Fill, can_run, hash_file, make_image, qemu_nbd, run};

fn dm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dm"))
        .args(args)
        .output()
        .expect("run dm")
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf8 path")
}

/// Exit code, and the single stderr line (asserted to be one line).
fn fails(out: &Output) -> (i32, String) {
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert!(
        !out.status.success(),
        "expected failure, got success: {err}"
    );
    assert_eq!(err.lines().count(), 1, "one-line error expected: {err}");
    assert!(err.starts_with("dm: error: "), "{err}");
    (out.status.code().unwrap_or(-1), err)
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "dm failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_str(ok(out).trim()).expect("one JSON object")
}

struct Env {
    dir: tempfile::TempDir,
    repo: PathBuf,
    img: PathBuf,
}

fn env() -> Env {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = dir.path().join("repo");
    let img = dir.path().join("disk.raw");
    make_image(
        &img,
        32 << 20,
        &[
            (0, 12 << 20, Fill::Random(1)),
            (16 << 20, 4 << 20, Fill::Text),
        ],
    );
    ok(&dm(&["init", s(&repo)]));
    Env { dir, repo, img }
}

#[test]
fn backup_json_points_restore() {
    let e = env();
    let v = json(&dm(&[
        "backup",
        s(&e.img),
        "--repo",
        s(&e.repo),
        "--name",
        "vm1/vda",
        "--json",
    ]));
    for k in [
        "bytes_read",
        "bytes_new",
        "bytes_stored",
        "dedupe_ratio",
        "compression_ratio",
        "seconds",
        "mb_per_s",
        "bottleneck",
        "point",
    ] {
        assert!(v.get(k).is_some(), "missing {k} in {v}");
    }
    // Exactly the keys of the one run report (Python's Stats.to_dict()
    // has the same: bindings-python/tests).
    let keys: Vec<&str> = v
        .as_object()
        .map(|o| o.keys().map(String::as_str).collect())
        .unwrap_or_default();
    let mut want = transports::RunReport::KEYS.to_vec();
    let mut got = keys.clone();
    want.sort_unstable();
    got.sort_unstable();
    assert_eq!(got, want, "dm backup --json keys");
    assert_eq!(v["bytes_total"], 32 << 20);
    assert_eq!(v["bytes_read"], 16 << 20, "holes are not read");
    assert!(
        v["compression_ratio"].as_f64().unwrap_or(0.0) > 1.2,
        "text compresses: {v}"
    );
    let v2 = json(&dm(&[
        "backup",
        s(&e.img),
        "--repo",
        s(&e.repo),
        "--name",
        "vm1/vda",
        "--json",
        "--chunking",
        "fixed",
    ]));
    assert_eq!(
        v2["bytes_new"], 0,
        "same settings as the default: nothing new"
    );
    let pts = json(&dm(&["points", "--repo", s(&e.repo), "vm1/vda", "--json"]));
    assert_eq!(pts.as_array().map(Vec::len), Some(2));
    assert_eq!(pts[0]["meta"]["transport"], "file");
    let table = ok(&dm(&["points", "--repo", s(&e.repo)]));
    assert!(
        table.contains("vm1/vda") && table.contains("TRANSPORT"),
        "{table}"
    );
    // Restore the first point by id prefix, and the newest without one.
    let first = pts[0]["point"].as_str().expect("id");
    let out = e.dir.path().join("out.raw");
    ok(&dm(&[
        "restore",
        &format!("vm1/vda@{}", &first[..22]),
        s(&out),
        "--repo",
        s(&e.repo),
    ]));
    assert_eq!(hash_file(&out), hash_file(&e.img));
    let rj = json(&dm(&[
        "restore",
        "vm1/vda",
        s(&out),
        "--repo",
        s(&e.repo),
        "--force",
        "--json",
    ]));
    assert_eq!(rj["point"], pts[1]["point"]);
    assert_eq!(hash_file(&out), hash_file(&e.img));
    assert!(ok(&dm(&["verify", "--repo", s(&e.repo), "--read-data"])).starts_with("ok"));
    let pr = json(&dm(&[
        "prune",
        "--repo",
        s(&e.repo),
        "--keep-last",
        "1",
        "--json",
    ]));
    assert_eq!(pr["points_removed"].as_array().map(Vec::len), Some(1));
    // Fixed chunking and every block size and compression level are accepted.
    for (c, b, z) in [
        ("fixed", "256K", "none"),
        ("fixed", "4M", "high"),
        ("cdc", "512K", "fast"),
    ] {
        ok(&dm(&[
            "backup",
            s(&e.img),
            "--repo",
            s(&e.repo),
            "--name",
            "vm2/vda",
            "--chunking",
            c,
            "--block-size",
            b,
            "--compression",
            z,
        ]));
    }
}

#[test]
fn errors_are_one_line_with_exit_codes() {
    let e = env();
    let r = s(&e.repo);
    let cases: Vec<(Vec<&str>, i32, &str)> = vec![
        (
            vec![
                "backup",
                "/nonexistent/disk.raw",
                "--repo",
                r,
                "--name",
                "vm/d",
            ],
            1,
            "cannot open source",
        ),
        (
            vec![
                "backup",
                "qmp+unix:///vm?socket=/run/none.sock",
                "--repo",
                r,
                "--name",
                "vm/d",
            ],
            2,
            "name its disk with --disk",
        ),
        (
            vec![
                "backup",
                "qmp+unix:///run/none.qmp",
                "--disk",
                "vda",
                "--repo",
                r,
                "--name",
                "vm/d",
            ],
            1,
            "check that the VM runs and its QMP monitor listens there",
        ),
        (
            vec![
                "backup",
                s(&e.img),
                "--repo",
                r,
                "--name",
                "vm/d",
                "--disk",
                "vda",
            ],
            2,
            "are for VM addresses",
        ),
        (
            vec!["backup", "ftp://host/disk", "--repo", r, "--name", "vm/d"],
            2,
            "unknown source scheme",
        ),
        (
            vec![
                "backup",
                s(&e.img),
                "--repo",
                s(e.dir.path()),
                "--name",
                "vm/d",
            ],
            1,
            "not a datamover repository",
        ),
        (
            vec!["backup", s(&e.img), "--repo", r, "--name", "no-slash"],
            2,
            "bad name",
        ),
        (
            vec!["backup", s(&e.img), "--repo", r, "--name", "vm/../x"],
            2,
            "bad name",
        ),
        (
            vec![
                "backup",
                s(&e.img),
                "--repo",
                r,
                "--name",
                "vm/d",
                "--compression",
                "max",
            ],
            2,
            "unknown compression",
        ),
        (
            vec![
                "backup",
                s(&e.img),
                "--repo",
                r,
                "--name",
                "vm/d",
                "--block-size",
                "3M",
            ],
            2,
            "block size",
        ),
        (
            vec!["backup", s(e.dir.path()), "--repo", r, "--name", "vm/d"],
            2,
            "neither a disk image file nor a block device",
        ),
        (
            vec!["restore", "vm/none", "/tmp/x", "--repo", r],
            1,
            "no restore point",
        ),
        (vec!["init", s(e.dir.path())], 2, "already exists"),
        (vec!["prune", "--repo", r], 2, "--keep-last"),
    ];
    for (args, code, msg) in cases {
        let (c, err) = fails(&dm(&args));
        assert_eq!(c, code, "{args:?}: {err}");
        assert!(err.contains(msg), "{args:?}: {err}");
    }
    // Restore target handling.
    ok(&dm(&["backup", s(&e.img), "--repo", r, "--name", "vm/d"]));
    let (c, err) = fails(&dm(&["restore", "vm/d", s(&e.img), "--repo", r]));
    assert!(c == 2 && err.contains("--force"), "{err}");
    let (c, err) = fails(&dm(&["restore", "vm/d@2000", "/tmp/x", "--repo", r]));
    assert!(c == 1 && err.contains("no restore point"), "{err}");
    // Unknown format version.
    let cfg = e.repo.join("config");
    let text = std::fs::read_to_string(&cfg).expect("read");
    std::fs::write(&cfg, text.replace("\"version\": 1", "\"version\": 2")).expect("write");
    let (c, err) = fails(&dm(&["points", "--repo", r]));
    assert!(
        c == 1 && err.contains("format version 2") && err.contains("upgrade"),
        "{err}"
    );
    std::fs::write(&cfg, text).expect("write");
    // A damaged manifest: restore exits 3, verify exits 3 and names it.
    let dir = e.repo.join("points/vm/d");
    let m = std::fs::read_dir(&dir)
        .expect("ls")
        .flatten()
        .next()
        .expect("a point")
        .path();
    let mut b = std::fs::read(&m).expect("read");
    b[20] ^= 0xff;
    std::fs::write(&m, b).expect("write");
    let (c, err) = fails(&dm(&["restore", "vm/d", "/tmp/dm-never", "--repo", r]));
    assert!(c == 3 && err.contains("corrupt point manifest"), "{err}");
    let out = dm(&["verify", "--repo", r]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stdout).contains("damaged point vm/d@"));
}

#[test]
fn kill_9_during_backup_leaves_no_point_and_next_backup_reuses_chunks() {
    let e = env();
    let img = e.dir.path().join("big.raw");
    make_image(&img, 160 << 20, &[(0, 160 << 20, Fill::Random(4))]);
    // Extreme compression makes the backup slow enough to kill mid-way.
    let mut child = Command::new(env!("CARGO_BIN_EXE_dm"))
        .args([
            "backup",
            s(&img),
            "--repo",
            s(&e.repo),
            "--name",
            "vm/big",
            "--compression",
            "extreme",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let t = Instant::now();
    let sealed = || {
        std::fs::read_dir(e.repo.join("index"))
            .map(|d| d.count())
            .unwrap_or(0)
            > 0
    };
    while !sealed() && t.elapsed() < Duration::from_secs(120) {
        assert!(
            child.try_wait().expect("wait").is_none(),
            "backup finished before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(sealed(), "no pack sealed within 120 s");
    child.kill().expect("kill -9");
    child.wait().expect("reap");
    let v = ok(&dm(&["verify", "--repo", s(&e.repo), "--read-data"]));
    assert!(v.starts_with("ok: 0 points"), "{v}");
    assert!(ok(&dm(&["points", "--repo", s(&e.repo)])).contains("no restore points"));
    let j = json(&dm(&[
        "backup",
        s(&img),
        "--repo",
        s(&e.repo),
        "--name",
        "vm/big",
        "--json",
        "--compression",
        "fast",
    ]));
    assert!(
        j["bytes_new"].as_u64().unwrap_or(u64::MAX) < 160 << 20,
        "chunks of the killed run are reused: {j}"
    );
    let out = e.dir.path().join("out.raw");
    ok(&dm(&["restore", "vm/big", s(&out), "--repo", s(&e.repo)]));
    assert_eq!(hash_file(&out), hash_file(&img));
    let pr = json(&dm(&[
        "prune",
        "--repo",
        s(&e.repo),
        "--keep-last",
        "1",
        "--json",
    ]));
    assert!(pr.is_object());
    assert!(ok(&dm(&["verify", "--repo", s(&e.repo)])).starts_with("ok: 1 points"));
}

#[test]
fn full_disk_is_a_clear_error_and_the_repository_stays_intact() {
    if !can_run("full_disk", &["mount", "umount"]) {
        return;
    }
    let e = env();
    let mnt = e.dir.path().join("small");
    std::fs::create_dir(&mnt).expect("mkdir");
    let mut c = Command::new("mount");
    c.args(["-t", "tmpfs", "-o", "size=24m", "tmpfs"]).arg(&mnt);
    let _m = common::Mount::new(c, &mnt);
    let repo = mnt.join("repo");
    ok(&dm(&["init", s(&repo)]));
    ok(&dm(&[
        "backup",
        s(&e.img),
        "--repo",
        s(&repo),
        "--name",
        "vm/small",
        "--compression",
        "none",
    ]));
    let img = e.dir.path().join("big.raw");
    make_image(&img, 64 << 20, &[(0, 64 << 20, Fill::Random(5))]);
    let (c, err) = fails(&dm(&[
        "backup",
        s(&img),
        "--repo",
        s(&repo),
        "--name",
        "vm/big",
        "--compression",
        "none",
    ]));
    assert_eq!(c, 1, "{err}");
    assert!(err.contains("no space left"), "{err}");
    let v = ok(&dm(&["verify", "--repo", s(&repo), "--read-data"]));
    assert!(v.starts_with("ok: 1 points"), "{v}");
    assert_eq!(
        std::fs::read_dir(repo.join("tmp")).expect("ls").count(),
        0,
        "temp files removed"
    );
    let out = e.dir.path().join("out.raw");
    ok(&dm(&["restore", "vm/small", s(&out), "--repo", s(&repo)]));
    assert_eq!(hash_file(&out), hash_file(&e.img));
}

/// `dm backup nbd://… --bitmap`: an incremental from a QEMU dirty bitmap,
/// with `--full-if-needed` and the JSON figures a scheduler reads.
#[test]
fn cbt_backup_with_bitmap_over_nbd() {
    if !can_run("cli_cbt", &["qemu-nbd", "qemu-img", "qemu-io"]) {
        return;
    }
    let e = env();
    let q = e.dir.path().join("disk.qcow2");
    let sock = e.dir.path().join("nbd.sock");
    run("qemu-img", &["convert", "-O", "qcow2", s(&e.img), s(&q)]);
    run("qemu-img", &["bitmap", "--add", "--enable", s(&q), "b0"]);
    let serve = || {
        let _ = std::fs::remove_file(&sock);
        let args = [
            "-r",
            "-f",
            "qcow2",
            "-B",
            "b0",
            "-k",
            s(&sock),
            "-x",
            "disk",
            "-t",
            s(&q),
        ];
        qemu_nbd(e.dir.path(), &args)
    };
    let uri = format!("nbd+unix:///disk?socket={}", s(&sock));
    let backup = |extra: &[&str]| {
        let mut a = vec![
            "backup",
            &uri,
            "--repo",
            s(&e.repo),
            "--name",
            "vm/vda",
            "--json",
            "--timeout",
            "20",
        ];
        a.extend_from_slice(extra);
        dm(&a)
    };

    let d = serve();
    let (code, err) = fails(&backup(&["--bitmap", "b0"]));
    assert_eq!(code, 2);
    assert!(
        err.contains("no previous point") && err.contains("--full-if-needed"),
        "{err}"
    );
    let full = json(&backup(&["--bitmap", "b0", "--full-if-needed"]));
    assert_eq!(full["incremental"], false);
    assert!(
        full["full_reason"]
            .as_str()
            .unwrap()
            .contains("no previous point")
    );
    d.stop();

    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x33 2M 64k", s(&q)],
    );
    let d = serve();
    let inc = json(&backup(&["--bitmap", "b0"]));
    d.stop();
    assert_eq!(inc["incremental"], true);
    assert_eq!(inc["parent"], full["point"]);
    assert_eq!(inc["bytes_changed"], 64 << 10);
    assert_eq!(inc["bytes_read"], 1 << 20);
    assert_eq!(inc["bytes_total"], 32 << 20);
    assert_eq!(inc["change_tracker"], "qemu:dirty-bitmap:b0");
    let out = e.dir.path().join("out.raw");
    ok(&dm(&["restore", "vm/vda", s(&out), "--repo", s(&e.repo)]));
    run(
        "qemu-img",
        &["compare", "-f", "qcow2", "-F", "raw", s(&q), s(&out)],
    );

    // Restore into a writable NBD export.
    let t = e.dir.path().join("target.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", s(&t), "32M"]);
    let tsock = e.dir.path().join("t.sock");
    // Without -t: qemu-nbd exits when the restore disconnects.
    let target = qemu_nbd(
        e.dir.path(),
        &["-f", "qcow2", "-k", s(&tsock), "-x", "disk", s(&t)],
    );
    let turi = format!("nbd+unix:///disk?socket={}", s(&tsock));
    let v = json(&dm(&[
        "restore",
        "vm/vda",
        &turi,
        "--repo",
        s(&e.repo),
        "--json",
    ]));
    assert_eq!(v["target"], turi.as_str());
    target.stop();
    run(
        "qemu-img",
        &["compare", "-f", "qcow2", "-F", "qcow2", s(&q), s(&t)],
    );

    // A bitmap needs an NBD source.
    let (code, err) = fails(&dm(&[
        "backup",
        s(&e.img),
        "--repo",
        s(&e.repo),
        "--name",
        "vm/vda",
        "--bitmap",
        "b0",
    ]));
    assert_eq!(code, 2);
    assert!(err.contains("needs an NBD source"), "{err}");
}

/// `dm vm-disks` and `dm backup qmp+unix://… --disk`: the mode used per
/// point in the JSON and in `dm points`, a pinned mode that cannot work
/// (fails with its reason, or falls back to NBD with --failover-to-network).
#[test]
fn vm_backup_modes_and_failover() {
    if !can_run("cli_vm", &["qemu-storage-daemon", "qemu-img", "qemu-io"]) {
        return;
    }
    let e = env();
    let d = e.dir.path();
    let (qmp, live, pid) = (d.join("qmp.sock"), d.join("live.sock"), d.join("qsd.pid"));
    run(
        "qemu-storage-daemon",
        &[
            "--chardev",
            &format!("socket,path={},server=on,wait=off,id=m0", s(&qmp)),
            "--monitor",
            "chardev=m0",
            "--blockdev",
            &format!("driver=file,filename={},node-name=f0", s(&e.img)),
            "--blockdev",
            "driver=raw,file=f0,node-name=vdb",
            "--nbd-server",
            &format!("addr.type=unix,addr.path={}", s(&live)),
            "--export",
            "type=nbd,id=guest,node-name=vdb,name=vdb,writable=on",
            "--pidfile",
            s(&pid),
            "--daemonize",
        ],
    );
    let qsd = common::Daemon { pid_file: pid };
    let vm = format!("qmp+unix://{}?nbd-server={}", s(&qmp), s(&live));

    let disks = json(&dm(&["vm-disks", "--json", &vm]));
    assert_eq!(disks[0]["node"], "vdb");
    assert_eq!(disks[0]["format"], "raw");
    assert_eq!(disks[0]["file"], s(&e.img));

    let backup = |extra: &[&str]| {
        let mut a = vec![
            "backup",
            &vm,
            "--repo",
            s(&e.repo),
            "--name",
            "vm/vdb",
            "--disk",
            "vdb",
        ];
        a.extend_from_slice(extra);
        dm(&a)
    };
    let first = json(&backup(&["--json"]));
    assert_eq!(first["transport"], "san");
    assert_eq!(first["failover"], serde_json::Value::Null);
    assert!(first["checkpoint"].as_str().unwrap().starts_with("dm-cp-"));

    // Storage snapshots of a raw image on ext4: neither provider can.
    let (code, err) = fails(&backup(&["--transport", "storage-snapshot"]));
    assert_ne!(code, 0);
    assert!(
        err.contains("reflink") && err.contains("--failover-to-network"),
        "{err}"
    );
    let fo = json(&backup(&[
        "--transport",
        "storage-snapshot",
        "--failover-to-network",
        "--json",
    ]));
    assert_eq!(fo["transport"], "nbd");
    assert_eq!(fo["failover"]["from"], "storage-snapshot");
    assert_eq!(fo["failover"]["to"], "nbd");
    assert_eq!(fo["incremental"], true);
    assert_eq!(fo["bytes_changed"], 0);

    let points = json(&dm(&["points", "--repo", s(&e.repo), "--json", "vm/vdb"]));
    let modes: Vec<&str> = points
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["meta"]["transport"].as_str().unwrap())
        .collect();
    assert_eq!(modes, ["san", "nbd"]);
    let out = d.join("out.raw");
    ok(&dm(&["restore", "vm/vdb", s(&out), "--repo", s(&e.repo)]));
    assert_eq!(hash_file(&out), hash_file(&e.img));
    qsd.stop();
}

/// `dm export`: prints the URI, serves the point to nbdcopy, ends cleanly
/// on SIGTERM (socket removed, a summary on stderr); a wrong point is a
/// one-line error before anything listens.
#[test]
fn export_serves_a_point_until_sigterm() {
    if !can_run("export_serves_a_point_until_sigterm", &["nbdcopy"]) {
        return;
    }
    let e = env();
    ok(&dm(&[
        "backup",
        s(&e.img),
        "--repo",
        s(&e.repo),
        "--name",
        "vm/disk",
    ]));
    let sock = e.dir.path().join("x.sock");
    let listen = format!("unix:{}", sock.display());
    let (code, msg) = fails(&dm(&[
        "export",
        "vm/nope",
        "--repo",
        s(&e.repo),
        "--listen",
        &listen,
    ]));
    assert_eq!(code, 1, "{msg}");
    assert!(msg.contains("no restore point") && !sock.exists(), "{msg}");
    let mut child = Command::new(env!("CARGO_BIN_EXE_dm"))
        .args([
            "export",
            "vm/disk",
            "--repo",
            s(&e.repo),
            "--listen",
            &listen,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let uri = line.trim();
    assert!(uri.starts_with("nbd+unix:///vm/disk?socket="), "{uri}");
    let out = e.dir.path().join("copy.raw");
    run("nbdcopy", &[uri, s(&out)]);
    assert_eq!(hash_file(&out), hash_file(&e.img));
    // SAFETY: kill(2) on the child we started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let done = child.wait_with_output().unwrap();
    assert!(done.status.success(), "{done:?}");
    let err = String::from_utf8_lossy(&done.stderr);
    assert!(err.contains("export ended"), "{err}");
    assert!(!sock.exists(), "socket left behind");
}

/// `dm instant-recover --list --json`.
fn sessions(dir: &Path) -> Vec<serde_json::Value> {
    let v = json(&dm(&[
        "instant-recover",
        "--list",
        "--json",
        "--dir",
        s(dir),
    ]));
    v.as_array().expect("a list").clone()
}

#[test]
fn instant_recover_serves_until_stopped_resumes_its_writes_and_discards() {
    let mut tools = common::guest::GUEST_TOOLS.to_vec();
    tools.extend(["libvirtd", "virtlogd", "virsh"]);
    let test = "instant_recover_serves_until_stopped_resumes_its_writes_and_discards";
    if !can_run(test, &tools) {
        return;
    }
    common::GuestImage::get();
    let e = env();
    let d = e.dir.path();
    run("chmod", &["0755", s(d)]);
    let _libvirtd = common::guest::Libvirtd::ensure(d);
    let img = d.join("src.qcow2");
    common::GuestImage::get().copy_disk(&img);
    let dom = format!("dm-cli-ir-{}", std::process::id());
    let g = common::Guest::libvirt(d, &dom, &img, "qcow2", &[]);
    ok(&dm(&[
        "backup",
        &g.spec(),
        "--repo",
        s(&e.repo),
        "--name",
        "app",
        "--all-disks",
    ]));
    drop(g);
    let sdir = d.join("sessions");
    let name = format!("{dom}-i");
    let on = format!("libvirt:///{name}");
    let (code, msg) = fails(&dm(&[
        "instant-recover",
        "nope",
        "--repo",
        s(&e.repo),
        "--dir",
        s(&sdir),
    ]));
    assert_eq!(code, 2, "{msg}");
    assert!(msg.contains("no disk of VM nope"), "{msg}");
    let (code, msg) = fails(&dm(&[
        "instant-recover",
        "--session",
        &name,
        "--discard",
        "--dir",
        s(&sdir),
    ]));
    assert_eq!(code, 2, "{msg}");
    assert!(msg.contains("no instant recovery session"), "{msg}");
    assert!(sessions(&sdir).is_empty());

    let start = || {
        Command::new(env!("CARGO_BIN_EXE_dm"))
            .args([
                "instant-recover",
                "app",
                "--repo",
                s(&e.repo),
                "--on",
                &on,
                "--dir",
                s(&sdir),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let serving = || {
        let t = Instant::now();
        while !sessions(&sdir)
            .first()
            .is_some_and(|x| x["state"] == "serving")
        {
            assert!(t.elapsed() < Duration::from_secs(120), "no session serves");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    // Served by a process of its own; stopped by SIGTERM: the VM is
    // powered off and its writes kept.
    let child = start();
    serving();
    let r = common::Guest::libvirt_running(d, &name);
    let sum = r.sh(
        "dd if=/dev/urandom of=/root/mine bs=1M count=1 status=none && sync && sha256sum /root/mine | cut -d' ' -f1",
    );
    // SAFETY: kill(2) on the child we started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let done = child.wait_with_output().unwrap();
    assert!(done.status.success(), "{done:?}");
    let err = String::from_utf8_lossy(&done.stderr);
    assert!(err.contains("ended: stopped"), "{err}");
    let listed = sessions(&sdir);
    assert_eq!(listed[0]["state"], "stopped", "{listed:?}");
    assert!(common::guest::virsh(&["domstate", &name]).is_err());
    // Recovered again under its name: the guest's writes are back.
    let child = start();
    serving();
    let r2 = common::Guest::libvirt_running(d, &name);
    assert_eq!(r2.sh("sha256sum /root/mine | cut -d' ' -f1"), sum);
    std::mem::forget(r); // the domain of the first run is gone; r2 owns the name
    // Discarded from another process: the server ends, nothing is left.
    let out = ok(&dm(&[
        "instant-recover",
        "--session",
        &name,
        "--discard",
        "--dir",
        s(&sdir),
    ]));
    assert!(out.contains(&name), "{out}");
    let done = child.wait_with_output().unwrap();
    assert!(done.status.success(), "{done:?}");
    assert!(common::guest::virsh(&["domstate", &name]).is_err());
    assert!(sessions(&sdir).is_empty());
    assert!(std::fs::read_dir(&sdir).unwrap().next().is_none());
    drop(r2);
    let v = ok(&dm(&["verify", "--read-data", "--repo", s(&e.repo)]));
    assert!(!v.is_empty());
}

#[test]
fn files_lists_and_copies_out_of_a_point() {
    if !can_run(
        "files_lists_and_copies_out_of_a_point",
        &["guestfish", "mkfs.ext4", "tar"],
    ) {
        return;
    }
    let e = env();
    let d = e.dir.path();
    let tree = d.join("tree");
    std::fs::create_dir_all(tree.join("etc")).unwrap();
    std::fs::write(tree.join("etc/motd"), b"welcome\n").unwrap();
    std::os::unix::fs::symlink("motd", tree.join("etc/issue")).unwrap();
    let img = d.join("fs.raw");
    run("mkfs.ext4", &["-q", "-d", s(&tree), s(&img), "16M"]);
    ok(&dm(&[
        "backup",
        s(&img),
        "--repo",
        s(&e.repo),
        "--name",
        "vm/root",
    ]));
    let out = ok(&dm(&[
        "files",
        "vm/root",
        "ls",
        "/etc",
        "--repo",
        s(&e.repo),
    ]));
    assert!(
        out.contains(" motd") && out.contains("issue -> motd"),
        "{out}"
    );
    let to = d.join("out");
    ok(&dm(&[
        "files",
        "vm/root",
        "get",
        "/etc/motd",
        "/etc/issue",
        "--to",
        s(&to),
        "--repo",
        s(&e.repo),
    ]));
    assert_eq!(std::fs::read(to.join("motd")).unwrap(), b"welcome\n");
    assert_eq!(
        std::fs::read_link(to.join("issue")).unwrap(),
        Path::new("motd")
    );
    let tar = d.join("etc.tar");
    ok(&dm(&[
        "files",
        "vm/root",
        "get",
        "/etc",
        "--tar",
        s(&tar),
        "--repo",
        s(&e.repo),
    ]));
    let listed = String::from_utf8_lossy(
        &Command::new("tar")
            .arg("-tf")
            .arg(&tar)
            .output()
            .unwrap()
            .stdout,
    )
    .to_string();
    assert_eq!(listed.lines().collect::<Vec<_>>().len(), 3, "{listed}");
    let (code, msg) = fails(&dm(&[
        "files",
        "vm/root",
        "ls",
        "/nope",
        "--repo",
        s(&e.repo),
    ]));
    assert_eq!(code, 2, "{msg}");
    assert!(msg.contains("no such file or directory"), "{msg}");
    let (code, msg) = fails(&dm(&[
        "files",
        "vm/root",
        "get",
        "/etc/motd",
        "--to",
        s(&to),
        "--repo",
        s(&e.repo),
    ]));
    assert_eq!(code, 2, "{msg}");
    assert!(msg.contains("exists"), "{msg}");
}
