//! Backing up a running VM: qemu-storage-daemon plays the VM (a qcow2 and
//! a raw disk, QMP on a unix socket, the "guest" writing through a writable
//! NBD export of the active layer), and every transport mode is checked
//! against it: the restore equals the disk at snapshot time, the snapshot
//! is gone afterwards, the next incremental holds exactly the later
//! writes, and no loop device, export, node or file is left behind.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)] // test crate: a panic is a failed test

use datamover_testkit as common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{Daemon, Fill, LoopDev, Mount, can_run, make_image, run, sh, wait_for};
use datamover::{BackupOptions, DiskName, ErrorKind, Repository, RestoreOptions};
use datamover_transports::qemu::qmp::{Qmp, QmpAddr};
use datamover_transports::{BackupRun, Mode, SourceOptions, TransportChoice};
use serde_json::{Value, json};

/// The tests share loop devices, qemu-nbd and /tmp: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const TOOLS: &[&str] = &[
    "qemu-storage-daemon",
    "qemu-img",
    "qemu-io",
    "qemu-nbd",
    "losetup",
];
const MIB: u64 = 1 << 20;

struct Vm {
    dir: PathBuf,
    qmp: PathBuf,
    live: PathBuf,
    images: Vec<(String, PathBuf)>,
    _qsd: Daemon,
}

/// Disk images: "q" (qcow2, 64 MiB) and "r" (raw, 32 MiB), in `at`.
fn images(at: &Path) -> Vec<(String, PathBuf, &'static str)> {
    let raw = at.join("r.raw");
    make_image(
        &raw,
        32 * MIB,
        &[
            (MIB, 3 * MIB, Fill::Random(1)),
            (20 * MIB, MIB, Fill::Random(2)),
        ],
    );
    let base = at.join("q-src.raw");
    make_image(
        &base,
        64 * MIB,
        &[
            (0, 5 * MIB, Fill::Random(3)),
            (40 * MIB, 2 * MIB, Fill::Random(4)),
        ],
    );
    let q = at.join("q.qcow2");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            base.to_str().unwrap(),
            q.to_str().unwrap(),
        ],
    );
    std::fs::remove_file(&base).unwrap();
    vec![("q".into(), q, "qcow2"), ("r".into(), raw, "raw")]
}

impl Vm {
    /// Start the "VM". `wrap` runs qemu-storage-daemon under another
    /// command (a private mount namespace); `nbd_server`: the VM runs one
    /// (the guest's writable exports are on it).
    fn start(dir: &Path, disks: Vec<(String, PathBuf, &str)>, view: Option<(&Path, &Path)>) -> Vm {
        let qmp = dir.join("qmp.sock");
        let live = dir.join("live.sock");
        let pid = dir.join("qsd.pid");
        let mut args: Vec<String> = vec![
            "--chardev".into(),
            format!("socket,path={},server=on,wait=off,id=m0", qmp.display()),
            "--monitor".into(),
            "chardev=m0".into(),
            "--nbd-server".into(),
            format!("addr.type=unix,addr.path={}", live.display()),
            "--pidfile".into(),
            pid.display().to_string(),
            "--daemonize".into(),
        ];
        let mut images = Vec::new();
        for (name, path, fmt) in &disks {
            // The VM sees its images at `view.1` when a view is given.
            let seen = match view {
                Some((real, seen)) => seen.join(path.strip_prefix(real).unwrap()),
                None => path.clone(),
            };
            args.extend([
                "--blockdev".into(),
                format!(
                    "driver=file,filename={},node-name={name}-file",
                    seen.display()
                ),
                "--blockdev".into(),
                format!("driver={fmt},file={name}-file,node-name={name}"),
                "--export".into(),
                format!("type=nbd,id=live-{name},node-name={name},name={name},writable=on"),
            ]);
            images.push((name.clone(), seen));
        }
        match view {
            None => {
                sh(Command::new("qemu-storage-daemon").args(&args));
            }
            Some((real, seen)) => {
                // A private mount namespace in which `seen` shows `real`:
                // this process (the proxy) sees an empty `seen`.
                let script = format!(
                    "mount --make-rprivate / && mount --bind {} {} && exec qemu-storage-daemon \"$@\"",
                    real.display(),
                    seen.display()
                );
                sh(Command::new("unshare")
                    .args(["-m", "sh", "-c", &script, "qsd"])
                    .args(&args));
            }
        }
        wait_for(&pid);
        wait_for(&qmp);
        Vm {
            dir: dir.to_path_buf(),
            qmp,
            live,
            images,
            _qsd: Daemon { pid_file: pid },
        }
    }

    fn spec(&self) -> String {
        format!(
            "qmp+unix://{}?nbd-server={}",
            self.qmp.display(),
            self.live.display()
        )
    }

    fn uri(&self, disk: &str) -> String {
        format!("nbd+unix:///{disk}?socket={}", self.live.display())
    }

    /// The guest writes `len` bytes of `pattern` at `offset`.
    fn write(&self, disk: &str, pattern: u8, offset: u64, len: u64) {
        run(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                &format!("write -P {pattern} {offset} {len}"),
                &self.uri(disk),
            ],
        );
    }

    /// The disk as the guest sees it now, into `out`.
    fn snapshot_to(&self, disk: &str, out: &Path) {
        let _ = std::fs::remove_file(out);
        run(
            "qemu-img",
            &[
                "convert",
                "-f",
                "raw",
                "-O",
                "raw",
                &self.uri(disk),
                out.to_str().unwrap(),
            ],
        );
    }

    fn qmp(&self, cmd: &str, args: Value) -> Value {
        let mut q =
            Qmp::connect(&QmpAddr::Unix(self.qmp.clone()), Duration::from_secs(10)).unwrap();
        q.execute(cmd, args).unwrap()
    }

    /// The checkpoints on `disk`, and asserts nothing else of ours is left:
    /// no overlay node, no export, no export copy of a bitmap, no internal
    /// snapshot, no overlay or reflink file, no loop device on the image.
    fn assert_clean(&self, disk: &str) -> Vec<String> {
        let nodes = self.qmp("query-named-block-nodes", json!({"flat": true}));
        let mut cps = Vec::new();
        for n in nodes.as_array().unwrap() {
            let name = n["node-name"].as_str().unwrap();
            assert!(!name.starts_with("dm-"), "node {name} left behind");
            if name == disk {
                for b in n["dirty-bitmaps"].as_array().into_iter().flatten() {
                    let b = b["name"].as_str().unwrap();
                    assert!(b.starts_with("dm-cp-"), "bitmap {b} left behind");
                    cps.push(b.to_string());
                }
                let snaps = n["image"]["snapshots"].as_array().map_or(0, Vec::len);
                assert_eq!(
                    snaps, 0,
                    "internal snapshot left behind: {}",
                    n["image"]["snapshots"]
                );
            }
        }
        for e in self
            .qmp("query-block-exports", json!({}))
            .as_array()
            .unwrap()
        {
            let id = e["id"].as_str().unwrap();
            assert!(id.starts_with("live-"), "export {id} left behind");
        }
        assert!(
            self.qmp("query-jobs", json!({}))
                .as_array()
                .unwrap()
                .is_empty()
        );
        for (_, path) in &self.images {
            let dir = if path.exists() {
                path.parent().unwrap()
            } else {
                &self.dir
            };
            for f in std::fs::read_dir(dir).unwrap() {
                let f = f.unwrap().file_name().to_string_lossy().into_owned();
                assert!(!f.contains(".dm-"), "file {f} left behind");
            }
            if path.exists() {
                let loops = run("losetup", &["-j", path.to_str().unwrap()]);
                assert!(loops.is_empty(), "loop device left: {loops}");
            }
        }
        let stray = Command::new("pgrep")
            .args(["-f", "dm-local-"])
            .output()
            .unwrap();
        assert!(stray.stdout.is_empty(), "local qemu-nbd left running");
        cps
    }
}

fn opts(disk: &str, transport: &str) -> SourceOptions {
    SourceOptions {
        disk: Some(disk.into()),
        transport: transport.parse().unwrap(),
        timeout: Some(Duration::from_secs(30)),
        ..SourceOptions::default()
    }
}

/// Back up with the guest writing `(pattern, offset, len)` while the
/// backup reads.
fn backup_while_writing(
    vm: &Vm,
    repo: &Repository,
    name: &str,
    o: &SourceOptions,
    disk: &str,
    during: Option<(u8, u64, u64)>,
) -> datamover::Result<BackupRun> {
    let wrote = std::sync::Arc::new(AtomicBool::new(false));
    let (w, uri) = (wrote.clone(), vm.uri(disk));
    let progress: datamover::ProgressFn = std::sync::Arc::new(move |_, _| {
        if let Some((p, off, len)) = during {
            if !w.swap(true, Ordering::SeqCst) {
                run(
                    "qemu-io",
                    &[
                        "-f",
                        "raw",
                        "-c",
                        &format!("write -P {p} {off} {len}"),
                        &uri,
                    ],
                );
            }
        }
        true
    });
    let b = BackupOptions {
        progress: Some(progress),
        threads: 2,
        ..BackupOptions::default()
    };
    let r = datamover_transports::backup(repo, &vm.spec(), &name.parse().unwrap(), o, &b);
    if r.is_ok() && during.is_some() {
        assert!(
            wrote.load(Ordering::SeqCst),
            "the guest write did not happen during the backup"
        );
    }
    r
}

fn restore_equals(repo: &Repository, name: &str, expected: &Path, scratch: &Path) {
    let disk: DiskName = name.parse().unwrap();
    let id = repo.resolve_point(&disk, None).unwrap();
    let out = scratch.join("restored.raw");
    let _ = std::fs::remove_file(&out);
    let t = datamover::target::open_local(
        &out,
        repo.point_meta(&disk, &id).unwrap().meta.disk_size,
        true,
    )
    .unwrap();
    datamover::restore(repo, &disk, &id, t.as_ref(), &RestoreOptions::default()).unwrap();
    drop(t);
    assert_eq!(
        common::hash_file(&out),
        common::hash_file(expected),
        "{name}: restore differs"
    );
}

/// One mode, one disk: a full backup with a guest write during it, then
/// an incremental that must hold exactly that write.
fn check_mode(vm: &Vm, repo: &Repository, disk: &str, transport: &str, expect_mode: &str) {
    let scratch = vm.dir.join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    let name = format!("vm/{}-{disk}", transport.replace('-', ""));
    let o = opts(disk, transport);
    let at_snapshot = scratch.join("expected.raw");
    vm.snapshot_to(disk, &at_snapshot);

    let r1 = backup_while_writing(vm, repo, &name, &o, disk, Some((0x6b, 2 * MIB, 64 << 10)))
        .unwrap_or_else(|e| panic!("{transport} {disk}: {e}"));
    assert_eq!(r1.report.meta.transport, expect_mode);
    assert_eq!(r1.report.parent(), None);
    assert_eq!(r1.failover, None);
    restore_equals(repo, &name, &at_snapshot, &scratch);
    let cps = vm.assert_clean(disk);
    assert_eq!(cps, vec![r1.report.meta.checkpoint.clone().unwrap()]);

    // The next incremental reads exactly the write made during the first run.
    vm.snapshot_to(disk, &at_snapshot);
    let r2 = backup_while_writing(vm, repo, &name, &o, disk, None).unwrap();
    assert_eq!(r2.report.meta.transport, expect_mode);
    assert_eq!(
        r2.report.parent(),
        Some(r1.report.point.to_string().as_str())
    );
    assert_eq!(
        r2.report.bytes_changed(),
        Some(64 << 10),
        "{transport} {disk}"
    );
    assert_eq!(
        r2.report.meta.cbt.as_ref().unwrap().tracker,
        format!(
            "qemu:dirty-bitmap:{}",
            r1.report.meta.checkpoint.as_ref().unwrap()
        )
    );
    restore_equals(repo, &name, &at_snapshot, &scratch);
    assert_eq!(
        vm.assert_clean(disk),
        vec![r2.report.meta.checkpoint.clone().unwrap()]
    );
}

fn setup(test: &str) -> Option<(tempfile::TempDir, Repository)> {
    if !can_run(test, TOOLS) {
        return None;
    }
    let tmp = tempfile::tempdir().unwrap();
    let repo = Repository::init(&tmp.path().join("repo")).unwrap();
    Some((tmp, repo))
}

#[test]
fn every_mode_reads_the_disk_as_it_was_at_snapshot_time() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((tmp, repo)) = setup("every_mode") else {
        return;
    };
    let vm = Vm::start(tmp.path(), images(tmp.path()), None);
    for (disk, transport, mode) in [
        ("r", "auto", "san"),
        ("q", "auto", "san"),
        ("q", "hotadd", "hotadd"),
        ("r", "hotadd", "hotadd"),
        ("q", "nbd", "nbd"),
        ("r", "nbd", "nbd"),
        ("q", "storage-snapshot", "storage-snapshot"),
    ] {
        check_mode(&vm, &repo, disk, transport, mode);
    }
}

#[test]
fn storage_snapshots_by_reflink_on_xfs() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((tmp, repo)) = setup("reflink") else {
        return;
    };
    if !can_run("reflink", &["mkfs.xfs"]) {
        return;
    }
    let fs = tmp.path().join("xfs.img");
    std::fs::File::create(&fs)
        .unwrap()
        .set_len(512 * MIB)
        .unwrap();
    run("mkfs.xfs", &["-q", "-m", "reflink=1", fs.to_str().unwrap()]);
    let dev = LoopDev::attach(&fs, false);
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let m = Mount::new(
        {
            let mut c = Command::new("mount");
            c.arg(&dev.dev).arg(&mnt);
            c
        },
        &mnt,
    );
    {
        let vm = Vm::start(tmp.path(), images(&mnt), None);
        for disk in ["q", "r"] {
            let mut o = opts(disk, "storage-snapshot");
            o.snapshot_provider = Some("reflink".into());
            let r =
                backup_while_writing(&vm, &repo, &format!("vm/x-{disk}"), &o, disk, None).unwrap();
            assert!(
                r.notes.iter().any(|n| n.contains("by reflink")),
                "{:?}",
                r.notes
            );
        }
        check_mode(&vm, &repo, "q", "storage-snapshot", "storage-snapshot");
        drop(vm);
    }
    // The QSD is gone (it held the files) before the unmount.
    std::thread::sleep(Duration::from_millis(200));
    drop(m);
    drop(dev);
}

#[test]
fn failover_to_network_when_the_proxy_cannot_see_the_datastore() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((tmp, repo)) = setup("failover") else {
        return;
    };
    if !can_run("failover", &["unshare", "mount"]) {
        return;
    }
    let real = tmp.path().join("datastore");
    let seen = tmp.path().join("seen");
    std::fs::create_dir_all(&real).unwrap();
    std::fs::create_dir_all(&seen).unwrap();
    let vm = Vm::start(tmp.path(), images(&real), Some((&real, &seen)));

    // Pinned SAN without failover: the task fails with the reason, and
    // nothing is left on the VM.
    let e = backup_while_writing(&vm, &repo, "vm/r", &opts("r", "san"), "r", None).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    assert!(e.to_string().contains("not visible from this proxy"), "{e}");
    assert!(e.to_string().contains("--failover-to-network"), "{e}");
    assert!(vm.assert_clean("r").is_empty());

    // With failover: NBD, said in the run's result, restore equals.
    let expected = tmp.path().join("expected.raw");
    vm.snapshot_to("r", &expected);
    let mut o = opts("r", "san");
    o.failover_to_network = true;
    let r = backup_while_writing(&vm, &repo, "vm/r", &o, "r", Some((0x11, 0, 64 << 10))).unwrap();
    assert_eq!(r.report.meta.transport, "nbd");
    let f = r.failover.expect("failover reported");
    assert_eq!(f.from, "san");
    assert!(f.reason.contains("not visible"), "{}", f.reason);
    restore_equals(&repo, "vm/r", &expected, tmp.path());
    vm.assert_clean("r");
    // Auto picks NBD here on its own (SAN and HotAdd cannot see the disk).
    let r = backup_while_writing(&vm, &repo, "vm/r", &opts("r", "auto"), "r", None).unwrap();
    assert_eq!(r.report.meta.transport, "nbd");
    assert_eq!(r.report.bytes_changed(), Some(64 << 10));
    assert!(
        r.notes.iter().any(|n| n.starts_with("san not used")),
        "{:?}",
        r.notes
    );
}

#[test]
fn a_killed_run_is_undone_by_the_next() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((tmp, repo)) = setup("killed") else {
        return;
    };
    let vm = Vm::start(tmp.path(), images(tmp.path()), None);
    let r1 = backup_while_writing(&vm, &repo, "vm/q", &opts("q", "nbd"), "q", None).unwrap();
    // A run that froze the disk and exported it, then died without
    // cleaning up: a child process that exits without running destructors.
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "freeze_and_die", "--ignored", "--nocapture"])
        .env("DM_FREEZE_SPEC", vm.spec())
        .env(
            "DM_FREEZE_SINCE",
            r1.report.meta.checkpoint.as_deref().unwrap(),
        )
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let nodes = vm.qmp("query-named-block-nodes", json!({"flat": true}));
    assert!(
        nodes
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["node-name"].as_str().unwrap().starts_with("dm-ov-")),
        "the dead run left its overlay"
    );
    vm.write("q", 0x22, 8 * MIB, 64 << 10);

    let expected = tmp.path().join("expected.raw");
    vm.snapshot_to("q", &expected);
    let r2 = backup_while_writing(&vm, &repo, "vm/q", &opts("q", "nbd"), "q", None).unwrap();
    restore_equals(&repo, "vm/q", &expected, tmp.path());
    // The dead run's checkpoint was left; the next success removes it too.
    assert_eq!(
        r2.report.parent(),
        Some(r1.report.point.to_string().as_str())
    );
    assert_eq!(r2.report.bytes_changed(), Some(64 << 10));
    assert_eq!(
        vm.assert_clean("q"),
        vec![r2.report.meta.checkpoint.clone().unwrap()]
    );
}

/// Run by `a_killed_run_is_undone_by_the_next` in a child process.
#[test]
#[ignore = "a helper run in a child process"]
fn freeze_and_die() {
    let (Ok(spec), Ok(since)) = (
        std::env::var("DM_FREEZE_SPEC"),
        std::env::var("DM_FREEZE_SINCE"),
    ) else {
        return;
    };
    use datamover_transports::qemu::{Vm as QVm, VmAddress, vm::Hold};
    let mut v = QVm::connect(VmAddress::parse(&spec).unwrap(), Duration::from_secs(10)).unwrap();
    let d = v.disk("q").unwrap();
    let mut off = datamover_transports::qemu::Quiescer::open(
        datamover_transports::qemu::Quiesce::Off,
        None,
        Default::default(),
    )
    .unwrap();
    let mut frozen = v.freeze(&d, Hold::Overlay, Some(&since), &mut off).unwrap();
    frozen.export_uri().unwrap();
    // Die here: no destructor runs, as with kill -9.
    std::process::exit(7);
}

#[test]
fn checkpoints_and_errors() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((tmp, repo)) = setup("checkpoints") else {
        return;
    };
    let vm = Vm::start(tmp.path(), images(tmp.path()), None);
    let b = BackupOptions::default();
    let name: DiskName = "vm/q".parse().unwrap();
    let go = |o: &SourceOptions, b: &BackupOptions| {
        datamover_transports::backup(&repo, &vm.spec(), &name, o, b)
    };

    // No --disk, unknown disk, --bitmap on a VM.
    let e = go(&SourceOptions::default(), &b).unwrap_err();
    assert!(e.to_string().contains("--disk"), "{e}");
    let e = go(&opts("nope", "auto"), &b).unwrap_err();
    assert!(
        e.to_string().contains("its disks: ") && e.to_string().contains("live-q (node q)"),
        "{e}"
    );
    let mut o = opts("q", "auto");
    o.bitmap = Some("b0".into());
    assert_eq!(go(&o, &b).unwrap_err().kind(), ErrorKind::InvalidInput);

    // A point not taken from the VM cannot be the parent of an incremental.
    let plain = tmp.path().join("plain.raw");
    vm.snapshot_to("q", &plain);
    datamover::backup(
        &repo,
        datamover::source::open(plain.to_str().unwrap())
            .unwrap()
            .as_ref(),
        &name,
        &b,
    )
    .unwrap();
    let e = go(&opts("q", "nbd"), &b).unwrap_err();
    assert!(
        matches!(e, datamover::Error::IncrementalImpossible { .. }),
        "{e}"
    );
    assert!(e.to_string().contains("started no checkpoint"), "{e}");
    assert!(
        vm.assert_clean("q").is_empty(),
        "a failed run removes the checkpoint it started"
    );
    let full = BackupOptions {
        full_if_needed: true,
        ..BackupOptions::default()
    };
    let r = go(&opts("q", "nbd"), &full).unwrap();
    assert!(r.report.full_reason.is_some());
    let cp = r.report.meta.checkpoint.clone().unwrap();

    // The checkpoint removed behind our back: a clear reason, then a full read.
    vm.qmp(
        "block-dirty-bitmap-remove",
        json!({"node": "q", "name": cp}),
    );
    let e = go(&opts("q", "nbd"), &b).unwrap_err();
    assert!(e.to_string().contains("is not on disk q"), "{e}");
    let r = go(&opts("q", "nbd"), &full).unwrap();
    assert!(r.report.full_reason.unwrap().contains("is not on disk q"));
    assert_eq!(r.report.meta.transport, "nbd");

    // Storage snapshots of a raw disk on ext4 cannot be taken.
    let e = datamover_transports::backup(
        &repo,
        &vm.spec(),
        &"vm/r".parse().unwrap(),
        &opts("r", "storage-snapshot"),
        &b,
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("qcow2-internal: disk r is raw"),
        "{e}"
    );
    vm.assert_clean("r");
    assert_eq!(vm.assert_clean("q").len(), 1);

    // The VM's disks as the CLI lists them.
    let disks = datamover_transports::qemu::disks(&vm.spec(), Duration::from_secs(5)).unwrap();
    let q = disks.iter().find(|d| d.node == "q").unwrap();
    assert_eq!(
        (q.driver.as_str(), q.size, q.device.as_deref()),
        ("qcow2", 64 * MIB, Some("live-q"))
    );
    assert_eq!(
        "network".parse::<TransportChoice>().unwrap(),
        TransportChoice::Pinned(Mode::Nbd)
    );
    assert!("tape".parse::<TransportChoice>().is_err());
}

#[test]
fn the_vm_nbd_server_is_started_and_stopped_when_the_vm_has_none() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((tmp, repo)) = setup("own_server") else {
        return;
    };
    let vm = Vm::start(tmp.path(), images(tmp.path()), None);
    // Stop the VM's own server: the backup must start one, then stop it.
    vm.qmp("block-export-del", json!({"id": "live-q"}));
    vm.qmp("block-export-del", json!({"id": "live-r"}));
    vm.qmp("nbd-server-stop", json!({}));
    let spec = format!("qmp+unix://{}", vm.qmp.display());
    let o = opts("q", "nbd");
    let go = || {
        datamover_transports::backup(
            &repo,
            &spec,
            &"vm/q".parse().unwrap(),
            &o,
            &BackupOptions::default(),
        )
    };
    let r = go().unwrap();
    assert_eq!(r.report.meta.transport, "nbd");
    // Stopped: a new server can start.
    let sock = tmp.path().join("again.sock");
    vm.qmp(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": sock}}}),
    );
    vm.qmp("nbd-server-stop", json!({}));
    // With one running and not named in the address: a clear error.
    vm.qmp(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": sock}}}),
    );
    let e = go().unwrap_err();
    assert!(e.to_string().contains("?nbd-server="), "{e}");
    for (_, p) in &vm.images {
        assert!(p.exists());
    }
    let cps = vm.assert_clean("q");
    assert_eq!(cps, vec![r.report.meta.checkpoint.unwrap()]);
}
