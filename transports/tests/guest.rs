//! Real guests: a Debian guest under qemu-system-x86_64 (TCG unless real
//! VT-x/AMD-V), with qemu-ga inside, backed up through QMP while it writes
//! (a SQLite database, one transaction per row, and a log whose every line
//! carries its checksum). Points are restored, checked on the host (e2fsck,
//! the ext4 journal) and booted as new guests that check their own data.
//! The quiesce failure cases (no agent, an agent that does not answer, a
//! hook that fails, a run killed while the guest is frozen) each end with
//! the guest thawed.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)] // test crate: a panic is a failed test

use datamover_testkit as common;

use std::path::Path;
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use common::guest::GUEST_TOOLS;
use common::{Guest, GuestImage, can_run, sh};
use datamover::{BackupOptions, ConsistencyLevel, DiskName, Repository, RestoreOptions};
use datamover_transports::qemu::{Quiesce, QuiesceLimits};
use datamover_transports::{BackupRun, SourceOptions};
use serde_json::json;

/// Guests are heavy under TCG: one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const DB: &str = "/var/lib/dm-load/load.db";

fn setup(test: &str) -> Option<(std::sync::MutexGuard<'static, ()>, tempfile::TempDir)> {
    let mut tools = GUEST_TOOLS.to_vec();
    tools.extend(["e2fsck", "dumpe2fs"]);
    if !can_run(test, &tools) {
        return None;
    }
    let guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    GuestImage::get();
    Some((guard, tempfile::tempdir().unwrap()))
}

/// A guest booted from a fresh copy of the image, and a new repository.
fn guest_and_repo(dir: &Path, name: &str) -> (Guest, Repository) {
    let img = dir.join(format!("{name}.qcow2"));
    GuestImage::get().copy_disk(&img);
    let g = Guest::boot(dir, name, &img, "qcow2");
    (g, Repository::init(&dir.join("repo")).unwrap())
}

fn opts(quiesce: Quiesce) -> SourceOptions {
    SourceOptions {
        disk: Some("vblk0".into()),
        quiesce,
        quiesce_limits: QuiesceLimits {
            agent: Duration::from_secs(5),
            ..QuiesceLimits::default()
        },
        timeout: Some(Duration::from_secs(60)),
        ..SourceOptions::default()
    }
}

fn backup(
    repo: &Repository,
    spec: &str,
    name: &str,
    quiesce: Quiesce,
) -> datamover::Result<BackupRun> {
    datamover_transports::backup(
        repo,
        spec,
        &name.parse().unwrap(),
        &opts(quiesce),
        &BackupOptions {
            full_if_needed: true,
            ..BackupOptions::default()
        },
    )
}

/// Start the write load and wait until it has committed `rows` rows.
fn start_load(g: &Guest, rows: u64) {
    g.spawn("dm-load");
    wait_rows(g, rows);
}

fn rows(g: &Guest) -> u64 {
    let (code, out, _) = g.exec(&format!(
        "sqlite3 -cmd '.timeout 5000' {DB} 'SELECT count(*) FROM t'"
    ));
    if code != 0 {
        return 0;
    }
    out.trim().parse().unwrap_or(0)
}

fn wait_rows(g: &Guest, n: u64) {
    common::wait_until(
        &format!("{n} rows in the guest's database"),
        Duration::from_secs(120),
        || rows(g) >= n,
    );
}

/// Restore `name`@`point` to a raw image in `dir`.
fn restore(repo: &Repository, name: &str, point: &str, out: &Path) {
    let disk: DiskName = name.parse().unwrap();
    let id = repo.resolve_point(&disk, Some(point)).unwrap();
    let size = repo.point_meta(&disk, &id).unwrap().meta.disk_size;
    let t = datamover::target::open_local(out, size, true).unwrap();
    datamover::restore(repo, &disk, &id, t.as_ref(), &RestoreOptions::default()).unwrap();
}

/// Host-side checks of a restored root filesystem: e2fsck finds nothing,
/// and a quiesced point's journal needs no recovery.
fn check_filesystem(image: &Path, quiesced: bool) {
    let header = sh(Command::new("dumpe2fs").arg("-h").arg(image));
    let features = header
        .lines()
        .find(|l| l.starts_with("Filesystem features:"))
        .unwrap_or_default()
        .to_string();
    if quiesced {
        assert!(
            !features.contains("needs_recovery"),
            "a quiesced point's journal needs recovery: {features}"
        );
        let out = Command::new("e2fsck")
            .args(["-fn"])
            .arg(image)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "e2fsck of a quiesced point: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Boot `image` as a new guest and check, from inside, what a point must
/// hold: an intact database with at least the rows its freeze hook logged
/// (or `min_rows`), a log whose every line is whole and right, and the
/// files in `sums` (path, sha256).
fn boot_and_check(dir: &Path, name: &str, image: &Path, min_rows: u64, sums: &[(&str, &str)]) {
    let g = Guest::boot(dir, name, image, "raw");
    let (n, logged) = g.check_database(min_rows);
    // Every line of the log: "N md5("row N")"; a quiesced point has no torn line.
    let bad = g.sh(
        "n=0; while read i s; do [ \"$(echo \"row $i\" | md5sum | cut -c1-32)\" = \"$s\" ] || n=$((n+1)); done </var/lib/dm-load/log; echo $n",
    );
    assert_eq!(bad, "0", "{name}: log lines with a wrong checksum");
    for (path, sum) in sums {
        assert_eq!(
            &g.sh(&format!("sha256sum {path} | cut -d' ' -f1")),
            sum,
            "{name}: {path}"
        );
    }
    eprintln!("{name}: {n} rows (hook logged {logged}), database ok");
}

#[test]
fn a_running_guest_is_backed_up_quiesced_full_then_incremental_and_every_point_boots() {
    let Some((_g, tmp)) =
        setup("a_running_guest_is_backed_up_quiesced_full_then_incremental_and_every_point_boots")
    else {
        return;
    };
    let dir = tmp.path();
    let (g, repo) = guest_and_repo(dir, "src");
    start_load(&g, 5);

    // Full, while the load runs.
    let before = rows(&g);
    let full = backup(&repo, &g.spec(), "vm/root", Quiesce::Auto).unwrap();
    let c = full
        .report
        .meta
        .consistency
        .clone()
        .expect("consistency recorded");
    assert_eq!(
        c.level,
        ConsistencyLevel::Application,
        "{c:?}, notes {:?}",
        full.notes
    );
    let frozen_ms = c.frozen_ms.expect("frozen time");
    assert!(frozen_ms < 10_000, "frozen {frozen_ms} ms");
    assert!(full.report.parent().is_none());

    // The guest writes a file and more rows; the incremental reads only that.
    let sum = g.sh("dd if=/dev/urandom of=/root/blob bs=1M count=4 status=none && sync && sha256sum /root/blob | cut -d' ' -f1");
    wait_rows(&g, before + 10);
    let inc = backup(&repo, &g.spec(), "vm/root", Quiesce::Auto).unwrap();
    let c2 = inc.report.meta.consistency.clone().expect("consistency");
    assert_eq!(c2.level, ConsistencyLevel::Application, "{c2:?}");
    assert_eq!(
        inc.report.parent(),
        Some(full.report.point.to_string().as_str())
    );
    let changed = inc.report.bytes_changed().expect("an incremental");
    let read = inc.report.stats.bytes_read;
    let size = inc.report.stats.bytes_total;
    assert!(
        changed >= 4 << 20,
        "4 MiB written, {changed} marked changed"
    );
    // Changes are read whole chunks at a time (1 MiB around each changed
    // 64 KiB block of the bitmap): never much more than what changed.
    assert!(
        read <= 2 * changed + (8 << 20),
        "read {read} of {changed} changed bytes"
    );
    assert!(read < size / 8, "read {read} of a {size}-byte disk");
    eprintln!(
        "full: frozen {frozen_ms} ms, read {}; incremental: frozen {:?} ms, changed {changed}, read {read}",
        full.report.stats.bytes_read, c2.frozen_ms
    );
    g.stop();

    // Every point: restored, checked on the host, booted and checked inside.
    for (i, (rep, sums)) in [
        (&full.report, vec![]),
        (&inc.report, vec![("/root/blob", sum.as_str())]),
    ]
    .into_iter()
    .enumerate()
    {
        let out = dir.join(format!("restored-{i}.raw"));
        restore(&repo, "vm/root", &rep.point.to_string(), &out);
        check_filesystem(&out, true);
        boot_and_check(dir, &format!("restored{i}"), &out, before.min(1), &sums);
        std::fs::remove_file(&out).unwrap();
    }
    let v = datamover::verify(&repo, true).unwrap();
    assert!(v.is_ok(), "{:?}", v.problems);
}

fn point_count(repo: &Repository) -> usize {
    repo.list_points(None).unwrap().0.len()
}

fn status(g: &Guest) -> String {
    g.agent("guest-fsfreeze-status", json!({}))
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn a_guest_that_cannot_be_quiesced_gives_a_crash_point_or_with_required_none() {
    let Some((_g, tmp)) =
        setup("a_guest_that_cannot_be_quiesced_gives_a_crash_point_or_with_required_none")
    else {
        return;
    };
    let dir = tmp.path();
    let (g, repo) = guest_and_repo(dir, "q");
    let qmp_only = format!("qmp+unix://{}", g.qmp.display());

    // 1. No agent named: auto says why; required refuses and writes nothing.
    let r = backup(&repo, &qmp_only, "vm/root", Quiesce::Auto).unwrap();
    let c = r.report.meta.consistency.clone().unwrap();
    assert_eq!(c.level, ConsistencyLevel::Crash);
    assert!(c.reason.contains("names no guest agent"), "{}", c.reason);
    assert!(
        r.notes.iter().any(|n| n.contains("crash-consistent")),
        "{:?}",
        r.notes
    );
    let e = backup(&repo, &qmp_only, "vm/root", Quiesce::Required).unwrap_err();
    assert!(e.to_string().contains("cannot be quiesced"), "{e}");
    assert_eq!(point_count(&repo), 1);

    // 2. A hook that fails: crash with the agent's reason; required fails;
    //    the guest is thawed either way.
    g.sh("touch /etc/dm-fail-freeze");
    let r = backup(&repo, &g.spec(), "vm/root", Quiesce::Auto).unwrap();
    let c = r.report.meta.consistency.clone().unwrap();
    assert_eq!(c.level, ConsistencyLevel::Crash);
    assert!(c.reason.contains("hook"), "{}", c.reason);
    assert_eq!(status(&g), "thawed");
    let e = backup(&repo, &g.spec(), "vm/root", Quiesce::Required).unwrap_err();
    assert!(e.to_string().contains("hook"), "{e}");
    assert_eq!(status(&g), "thawed");
    assert_eq!(point_count(&repo), 2);
    g.sh("rm /etc/dm-fail-freeze");

    // 3. Quiescing off: crash, and the guest is not asked.
    let r = backup(&repo, &g.spec(), "vm/root", Quiesce::Off).unwrap();
    assert_eq!(
        r.report.meta.consistency.unwrap().reason,
        "quiescing is off"
    );

    // 4. An agent that does not answer (qemu-ga stopped for 25 s).
    g.spawn("p=$(pidof qemu-ga); sleep 1; kill -STOP $p; sleep 25; kill -CONT $p");
    std::thread::sleep(Duration::from_secs(3));
    let t = std::time::Instant::now();
    let r = backup(&repo, &g.spec(), "vm/root", Quiesce::Auto).unwrap();
    let c = r.report.meta.consistency.clone().unwrap();
    assert_eq!(c.level, ConsistencyLevel::Crash);
    assert!(c.reason.contains("did not answer"), "{}", c.reason);
    let e = backup(&repo, &g.spec(), "vm/root", Quiesce::Required).unwrap_err();
    assert!(e.to_string().contains("did not answer"), "{e}");
    assert!(
        t.elapsed() < Duration::from_secs(25),
        "the agent came back before the test ended"
    );
    assert_eq!(point_count(&repo), 4);
    common::wait_until("the agent to answer again", Duration::from_secs(60), || {
        g.try_agent("guest-ping", json!({}), Duration::from_secs(2))
            .is_ok()
    });
    assert_eq!(status(&g), "thawed");

    // 5. A run killed while the guest is frozen: the guest stays frozen
    //    until the next run, which thaws it and takes a quiesced point.
    let me = std::env::current_exe().unwrap();
    let out = Command::new(me)
        .args([
            "--ignored",
            "--exact",
            "freeze_guest_and_die",
            "--nocapture",
        ])
        .env("DM_FREEZE_AGENT", &g.qga)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(status(&g), "frozen");
    let r = backup(&repo, &g.spec(), "vm/root", Quiesce::Required).unwrap();
    assert_eq!(
        r.report.meta.consistency.unwrap().level,
        ConsistencyLevel::Application
    );
    assert!(
        r.notes.iter().any(|n| n.contains("found frozen")),
        "{:?}",
        r.notes
    );
    assert_eq!(status(&g), "thawed");
    g.sh("touch /root/alive && sync");
}

/// Run by the test above in a child process: freeze the guest and die
/// inside the frozen window, as `kill -9` would.
#[test]
#[ignore = "a helper run in a child process"]
fn freeze_guest_and_die() {
    let Ok(agent) = std::env::var("DM_FREEZE_AGENT") else {
        return;
    };
    let mut q = datamover_transports::qemu::Quiescer::open(
        Quiesce::Required,
        Some(&agent),
        QuiesceLimits::default(),
    )
    .unwrap();
    let _ = q.around(|| std::process::exit(7));
}

fn checkpoints_of(domain: &str) -> Vec<String> {
    common::guest::virsh(&["checkpoint-list", domain, "--name"])
        .unwrap()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

fn job_of(domain: &str) -> String {
    common::guest::virsh(&["domjobinfo", domain]).unwrap()
}

#[test]
fn a_libvirt_guest_is_backed_up_through_libvirt_quiesced_full_then_incremental() {
    let mut tools = GUEST_TOOLS.to_vec();
    tools.extend(["libvirtd", "virtlogd", "virsh"]);
    let test = "a_libvirt_guest_is_backed_up_through_libvirt_quiesced_full_then_incremental";
    if !can_run(test, &tools) {
        return;
    }
    let Some((_g, tmp)) = setup(test) else {
        return;
    };
    let dir = tmp.path();
    // libvirt's QEMU user reads the image and writes its log here.
    sh(Command::new("chmod").arg("0755").arg(dir));
    let _libvirtd = common::guest::Libvirtd::ensure(dir);
    let img = dir.join("lv.qcow2");
    GuestImage::get().copy_disk(&img);
    let dom = format!("dm-test-{}", std::process::id());
    let data = dir.join("data.qcow2");
    common::run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", data.to_str().unwrap(), "64M"],
    );
    let g = Guest::libvirt(dir, &dom, &img, "qcow2", &[&data]);
    let spec = g.spec();
    assert_eq!(
        datamover_transports::libvirt::disks(&spec).unwrap()[0].target,
        "vda"
    );
    let repo = Repository::init(&dir.join("repo")).unwrap();
    start_load(&g, 5);
    let before = rows(&g);
    let mut o = opts(Quiesce::Auto);
    o.disk = Some("vda".into());
    let go = |o: &SourceOptions| {
        datamover_transports::backup(
            &repo,
            &spec,
            &"lv/vda".parse().unwrap(),
            o,
            &BackupOptions::default(),
        )
    };

    // Full, quiesced through libvirt's agent integration.
    let full = go(&o).unwrap();
    let c = full.report.meta.consistency.clone().unwrap();
    assert_eq!(
        c.level,
        ConsistencyLevel::Application,
        "{c:?} {:?}",
        full.notes
    );
    assert_eq!(full.report.meta.transport, "nbd");
    assert!(
        full.report
            .meta
            .vm_definition
            .as_deref()
            .unwrap_or("")
            .contains(&format!("<name>{dom}</name>"))
    );
    let cps = checkpoints_of(&dom);
    assert_eq!(cps, vec![full.report.meta.checkpoint.clone().unwrap()]);
    assert!(job_of(&dom).contains("None"), "{}", job_of(&dom));

    // Incremental: only the guest's changes are read.
    let sum = g.sh("dd if=/dev/urandom of=/root/blob bs=1M count=4 status=none && sync && sha256sum /root/blob | cut -d' ' -f1");
    wait_rows(&g, before + 5);
    let inc = go(&o).unwrap();
    assert_eq!(
        inc.report.parent(),
        Some(full.report.point.to_string().as_str())
    );
    let changed = inc.report.bytes_changed().unwrap();
    let read = inc.report.stats.bytes_read;
    assert!(
        changed >= 4 << 20 && read <= 2 * changed + (8 << 20),
        "changed {changed}, read {read}"
    );
    assert!(read < inc.report.stats.bytes_total / 8, "read {read}");
    assert_eq!(
        inc.report.meta.consistency.clone().unwrap().level,
        ConsistencyLevel::Application
    );
    assert_eq!(
        checkpoints_of(&dom),
        vec![inc.report.meta.checkpoint.clone().unwrap()]
    );
    eprintln!(
        "libvirt: full frozen {:?} ms read {}; incremental frozen {:?} ms changed {changed} read {read}",
        c.frozen_ms,
        full.report.stats.bytes_read,
        inc.report.meta.consistency.unwrap().frozen_ms
    );

    // libvirt's export over TCP (what a remote hypervisor uses; here on
    // loopback, without TLS): the same chain goes on, incremental.
    let tcp = format!("{spec}?nbd=tcp");
    g.sh("dd if=/dev/urandom of=/root/blob2 bs=1M count=2 status=none && sync");
    let over_tcp = datamover_transports::backup(
        &repo,
        &tcp,
        &"lv/vda".parse().unwrap(),
        &o,
        &BackupOptions::default(),
    )
    .unwrap();
    assert_eq!(
        over_tcp.report.parent(),
        Some(inc.report.point.to_string().as_str())
    );
    let changed = over_tcp.report.bytes_changed().unwrap();
    assert!(
        changed >= 2 << 20
            && over_tcp.report.stats.bytes_read < over_tcp.report.stats.bytes_total / 8,
        "{:?}",
        over_tcp.report.stats
    );
    // Over the network libvirt's export is TLS unless told otherwise.
    let e = datamover_transports::backup(
        &repo,
        &format!("{spec}?nbd=tls"),
        &"lv/vda".parse().unwrap(),
        &o,
        &BackupOptions::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("--tls-certificates"), "{e}");

    // Modes other than nbd: a clear error, or NBD with failover.
    let mut san = o.clone();
    san.transport = "san".parse().unwrap();
    let e = go(&san).unwrap_err();
    assert!(e.to_string().contains("libvirt's NBD export"), "{e}");
    san.failover_to_network = true;
    let r = go(&san).unwrap();
    assert_eq!(r.failover.unwrap().from, "san");

    // A run killed while libvirt's backup job runs: the next one aborts
    // the job and deletes the checkpoint it left, and stays incremental.
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "libvirt_backup_and_die",
            "--nocapture",
        ])
        .env("DM_LV_SPEC", &spec)
        .env("DM_LV_REPO", dir.join("repo"))
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(job_of(&dom).contains("Backup"), "{}", job_of(&dom));
    assert_eq!(checkpoints_of(&dom).len(), 2, "the killed run's checkpoint");
    let next = go(&o).unwrap();
    assert!(next.report.parent().is_some());
    assert!(
        next.notes
            .iter()
            .any(|n| n.contains("aborted a backup job")),
        "{:?}",
        next.notes
    );
    assert!(job_of(&dom).contains("None"), "{}", job_of(&dom));
    assert_eq!(
        checkpoints_of(&dom),
        vec![next.report.meta.checkpoint.clone().unwrap()]
    );
    assert_eq!(g.agent("guest-fsfreeze-status", json!({})), "thawed");

    // The whole VM at one instant: one freeze, one job, one checkpoint.
    let data_sum = g.sh(
        "dd if=/dev/urandom of=/dev/vdb bs=1M count=8 status=none && sync && head -c 8388608 /dev/vdb | sha256sum | cut -d' ' -f1",
    );
    let vm = |disks: &[String], exclude: &[String]| {
        datamover_transports::backup_vm(
            &repo,
            &spec,
            "whole",
            disks,
            exclude,
            &o,
            &BackupOptions::default(),
        )
    };
    let runs = vm(&[], &[]).unwrap();
    let names: Vec<String> = runs.iter().map(|r| r.report.disk.to_string()).collect();
    assert_eq!(names, ["whole/vda", "whole/vdb"]);
    let c0 = runs[0].report.meta.consistency.clone().unwrap();
    assert_eq!(c0.level, ConsistencyLevel::Application, "{c0:?}");
    assert_eq!(
        Some(c0),
        runs[1].report.meta.consistency.clone(),
        "one freeze for both"
    );
    assert_eq!(
        runs[0].report.meta.checkpoint,
        runs[1].report.meta.checkpoint
    );
    let set_cp = runs[0].report.meta.checkpoint.clone().unwrap();
    assert!(set_cp.starts_with("dm-cp-vda_vdb-"), "{set_cp}");
    assert!(checkpoints_of(&dom).contains(&set_cp));
    // Excluding a disk: the other's chain goes on from the set's checkpoint.
    let runs = vm(&[], &["vda".to_string()]).unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(
        runs[0].report.meta.cbt.as_ref().map(|c| c.tracker.clone()),
        Some(format!("qemu:dirty-bitmap:{set_cp}"))
    );
    let e = vm(&["vdz".to_string()], &[]).unwrap_err();
    assert!(e.to_string().contains("has no disk \"vdz\""), "{e}");
    assert!(job_of(&dom).contains("None"), "{}", job_of(&dom));
    g.stop();
    let out = dir.join("restored-vdb.raw");
    restore(&repo, "whole/vdb", &runs[0].report.point.to_string(), &out);
    let got = sh(Command::new("sh").arg("-c").arg(format!(
        "head -c 8388608 {} | sha256sum | cut -d' ' -f1",
        out.display()
    )));
    assert_eq!(got, data_sum, "the data disk's restore");

    // The whole VM recreated from its points: both disks restored, a new
    // domain defined from the stored definition, booted, data checked inside.
    let again = format!("{dom}-r");
    let images = datamover_transports::libvirt::restore_vm(
        &repo,
        "whole",
        dir,
        "qemu:///system",
        &again,
        true,
    )
    .unwrap();
    assert_eq!(images.len(), 2);
    let r = Guest::libvirt_running(dir, &again);
    assert_eq!(r.sh("sha256sum /root/blob | cut -d' ' -f1"), sum);
    assert_eq!(
        r.sh("head -c 8388608 /dev/vdb | sha256sum | cut -d' ' -f1"),
        data_sum
    );
    assert_eq!(
        r.sh(&format!("sqlite3 {DB} 'PRAGMA integrity_check'")),
        "ok"
    );
    drop(r);
    // A definition whose disk has no point is refused, not half-made.
    let e = datamover_transports::libvirt::definition_for(
        &repo
            .point_meta(
                &"whole/vda".parse().unwrap(),
                &repo
                    .resolve_point(&"whole/vda".parse().unwrap(), None)
                    .unwrap(),
            )
            .unwrap()
            .meta
            .vm_definition
            .unwrap(),
        "x",
        &[(
            "vda".into(),
            datamover_transports::libvirt::NewDisk::raw("/x.raw"),
        )],
    )
    .unwrap_err();
    assert!(e.to_string().contains("vdb has no point"), "{e}");

    // The incremental point restores to a disk that boots with the data.
    let out = dir.join("restored-lv.raw");
    restore(&repo, "lv/vda", &inc.report.point.to_string(), &out);
    check_filesystem(&out, true);
    boot_and_check(dir, "restoredlv", &out, 1, &[("/root/blob", sum.as_str())]);
    let v = datamover::verify(&repo, true).unwrap();
    assert!(v.is_ok(), "{:?}", v.problems);
}

/// Run by the test above in a child process: start a libvirt backup and
/// die while it reads, as `kill -9` would.
#[test]
#[ignore = "a helper run in a child process"]
fn libvirt_backup_and_die() {
    let (Ok(spec), Ok(repo)) = (std::env::var("DM_LV_SPEC"), std::env::var("DM_LV_REPO")) else {
        return;
    };
    let repo = Repository::open(Path::new(&repo)).unwrap();
    let mut o = opts(Quiesce::Off);
    o.disk = Some("vda".into());
    let b = BackupOptions {
        full: true,
        progress: Some(std::sync::Arc::new(|_, _| std::process::exit(7))),
        ..BackupOptions::default()
    };
    let _ = datamover_transports::backup(&repo, &spec, &"lv/vda".parse().unwrap(), &o, &b);
    std::process::exit(8);
}
