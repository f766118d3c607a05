//! Instant VM recovery of a real libvirt guest: booted from its points
//! (served by us over NBD, its writes to an overlay), the guest sees the
//! point's data and writes more, is migrated to production images while
//! it runs, and those images hold its writes; the repository is
//! unchanged and verifies. A discarded session leaves nothing behind.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)] // test crate: a panic is a failed test

use datamover_testkit as common;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use common::guest::{GUEST_TOOLS, virsh};
use common::{Guest, GuestImage, can_run, sh};
use datamover::{BackupOptions, PointRef, Repository};
use datamover_transports::SourceOptions;
use datamover_transports::instant::{self, Migrate, Recover, Runner, State};
use datamover_transports::qemu::{Quiesce, QuiesceLimits};

fn sum(g: &Guest, path: &str) -> String {
    g.sh(&format!("sha256sum {path} | cut -d' ' -f1"))
}

/// The sha256 of `path` in the ext4 filesystem of image `img`, read
/// offline with debugfs.
/// The file's checksum as the image holds it. The guest may still run on
/// the image, and ext4 keeps recent metadata in its journal until a
/// checkpoint, which debugfs does not read: the check reads a sparse copy
/// whose journal e2fsck replayed first.
fn offline_sum(img: &Path, path: &str) -> String {
    let copy = img.with_extension("offline");
    let out = sh(Command::new("sh").arg("-c").arg(format!(
        "cp --sparse=always {img} {copy} && {{ e2fsck -E journal_only -y {copy} >/dev/null 2>&1; \
         debugfs -R 'cat {path}' {copy} 2>/dev/null | sha256sum | cut -d' ' -f1; rm -f {copy}; }}",
        img = img.display(),
        copy = copy.display()
    )));
    out.trim().to_string()
}

/// Ends a mount server when the test fails.
struct StopOnDrop<'a>(&'a AtomicBool);
impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Run a mount server for `how` while `f` works with the session it
/// started (the server is stopped if `f` fails); the session as the
/// server ended it.
fn with_server(
    repo: &Repository,
    wanted: &[PointRef],
    how: &Recover,
    f: impl FnOnce(&instant::Session),
) -> instant::Session {
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let (tx, rx) = mpsc::channel();
        let server = s.spawn(|| {
            instant::recover(repo, wanted, how, &stop, move |x| {
                let _ = tx.send(x.clone());
            })
        });
        {
            let _stop = StopOnDrop(&stop);
            let started = rx
                .recv_timeout(Duration::from_secs(120))
                .expect("the VM starts from its points");
            f(&started);
        }
        server
            .join()
            .expect("the server thread")
            .expect("the server")
    })
}

fn points(repo: &Repository) -> Vec<(String, Vec<String>)> {
    repo.disks()
        .unwrap()
        .into_iter()
        .map(|d| {
            let ids = repo
                .point_ids(&d)
                .unwrap()
                .iter()
                .map(|p| p.to_string())
                .collect();
            (d.to_string(), ids)
        })
        .collect()
}

#[test]
fn a_libvirt_guest_boots_from_its_points_migrates_while_running_and_a_discard_leaves_nothing() {
    let mut tools = GUEST_TOOLS.to_vec();
    tools.extend(["libvirtd", "virtlogd", "virsh", "debugfs"]);
    let test =
        "a_libvirt_guest_boots_from_its_points_migrates_while_running_and_a_discard_leaves_nothing";
    if !can_run(test, &tools) {
        return;
    }
    GuestImage::get();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let dom = format!("dm-ir-{}", std::process::id());
    let (_libvirtd, g) = common::guest::libvirt_with_data(dir, &dom, 64);
    let repo = Repository::init(&dir.join("repo")).unwrap();
    g.spawn("dm-load");
    let before = g.write_random("/root/before", 2);
    let vdb = g.write_random("/dev/vdb", 4);
    let opts = SourceOptions {
        quiesce: Quiesce::Auto,
        quiesce_limits: QuiesceLimits {
            agent: Duration::from_secs(5),
            ..QuiesceLimits::default()
        },
        timeout: Some(Duration::from_secs(60)),
        ..SourceOptions::default()
    };
    datamover_transports::backup_vm(
        &repo,
        &g.spec(),
        "app",
        &["vda".to_string(), "vdb".to_string()],
        &[],
        &opts,
        &BackupOptions::default(),
    )
    .unwrap();
    // The original is gone (a lost host); the recovery must not need it.
    drop(g);
    let held = points(&repo);
    let wanted: Vec<PointRef> = ["app/vda", "app/vdb"]
        .iter()
        .map(|p| p.parse().unwrap())
        .collect();
    let sessions = dir.join("sessions");
    let name = format!("{dom}-ir");
    let how = Recover {
        on: format!("libvirt:///{name}"),
        dir: sessions.clone(),
        cache_bytes: 0,
    };

    let ended = with_server(&repo, &wanted, &how, |started| {
        assert_eq!(started.state, State::Serving);
        assert_eq!(started.disks.len(), 2);
        let sock = Path::new(&started.disks[0].socket);
        let mode = std::os::unix::fs::PermissionsExt::mode(&sock.metadata().unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600, "the export is QEMU's alone");
        // A second recovery under the same name is refused.
        let e =
            instant::recover(&repo, &wanted, &how, &AtomicBool::new(false), |_| {}).unwrap_err();
        assert!(e.to_string().contains("exists"), "{e}");

        // The guest sees exactly the point's data, and writes more.
        let r = Guest::libvirt_running(dir, &name);
        assert_eq!(sum(&r, "/root/before"), before);
        assert_eq!(
            r.sh("head -c 4194304 /dev/vdb | sha256sum | cut -d' ' -f1"),
            vdb
        );
        r.check_database(0);
        let after = r.sh(
            "dd if=/dev/urandom of=/root/after bs=1M count=3 status=none && sync && sha256sum /root/after | cut -d' ' -f1",
        );
        let overlay = Path::new(&started.disks[0].overlay);
        assert!(
            std::fs::metadata(overlay).unwrap().len() > 0 && overlay.exists(),
            "writes go to the overlay"
        );
        // The guest keeps writing while its disks move.
        r.spawn("dm-load");

        // Migration to production storage while it runs.
        let prod = dir.join("prod");
        let mut seen = Vec::new();
        let m = instant::migrate(
            &sessions,
            &name,
            &Migrate {
                to: prod.clone(),
                format: "raw".into(),
            },
            |p| seen.push(p),
        )
        .unwrap();
        eprintln!("migration: {m:?}, progress {seen:?}");
        assert_eq!(m.state, State::Migrated);
        assert_eq!(seen.last(), Some(&100));
        assert!(
            !sessions.join(&name).exists(),
            "the session's files are gone"
        );
        let blk = virsh(&["domblklist", &name]).unwrap();
        let vda_prod = prod.join(format!("{name}-vda.raw"));
        assert!(blk.contains(vda_prod.to_str().unwrap()), "{blk}");
        assert!(!blk.contains(".sock"), "{blk}");
        let info = virsh(&["dominfo", &name]).unwrap();
        assert!(
            info.lines()
                .any(|l| l.starts_with("Persistent:") && l.ends_with("yes")),
            "{info}"
        );
        // The guest runs on, from production storage.
        assert_eq!(sum(&r, "/root/after"), after);
        r.sh("sync");
        r.check_database(0);
        drop(r);
        assert_eq!(offline_sum(&vda_prod, "/root/after"), after);
        assert_eq!(offline_sum(&vda_prod, "/root/before"), before);
        let vdb_prod = prod.join(format!("{name}-vdb.raw"));
        let head = sh(Command::new("sh").arg("-c").arg(format!(
            "head -c 4194304 {} | sha256sum | cut -d' ' -f1",
            vdb_prod.display()
        )));
        assert_eq!(head.trim(), vdb);
    });
    assert_eq!(ended.state, State::Migrated);
    assert_eq!(points(&repo), held, "the repository's points are unchanged");
    let v = datamover::verify(&repo, true).unwrap();
    assert!(v.is_ok(), "{:?}", v.problems);

    // A discarded session: the VM off and undefined, nothing left.
    let name2 = format!("{dom}-d");
    let how2 = Recover {
        on: format!("libvirt:///{name2}"),
        ..how.clone()
    };
    let ended = with_server(&repo, &wanted, &how2, |_| {
        assert_eq!(
            instant::sessions(&sessions).unwrap()[0].state,
            State::Serving
        );
        let d = instant::discard(&sessions, &name2).unwrap();
        assert_eq!(d.state, State::Stopped);
    });
    assert_eq!(ended.state, State::Stopping);
    assert!(virsh(&["domstate", &name2]).is_err(), "the domain is gone");
    assert!(
        std::fs::read_dir(&sessions).unwrap().next().is_none(),
        "a discard leaves nothing behind"
    );
    assert!(instant::discard(&sessions, &name2).is_err());
    let _ = virsh(&["destroy", &name]);
    let _ = virsh(&["undefine", &name]);

    // A QEMU of our own (`--on qmp`), from the stored definition's kernel:
    // the point's data, writes, a migration to qcow2 images while it
    // runs; and one discarded.
    let name3 = format!("{dom}-q");
    let how3 = Recover {
        on: format!("qmp:///{name3}"),
        ..how.clone()
    };
    let ended = with_server(&repo, &wanted, &how3, |started| {
        assert_eq!(started.runner, Runner::Qemu);
        let q = Guest::attach(&instant::vm_dir(&sessions, &name3), &name3);
        assert_eq!(sum(&q, "/root/before"), before);
        let mine = q.write_random("/root/q", 2);
        let m = instant::migrate(
            &sessions,
            &name3,
            &Migrate {
                to: dir.join("prod-q"),
                format: "qcow2".into(),
            },
            |_| {},
        )
        .unwrap();
        assert_eq!(m.state, State::Migrated);
        assert!(m.message.unwrap_or_default().contains("QMP at"));
        // It runs on, from the qcow2 copies.
        assert_eq!(sum(&q, "/root/q"), mine);
        q.sh("sync");
        drop(q);
        let raw = dir.join("q.raw");
        common::run(
            "qemu-img",
            &[
                "convert",
                "-O",
                "raw",
                dir.join("prod-q")
                    .join(format!("{name3}-vda.qcow2"))
                    .to_str()
                    .unwrap(),
                raw.to_str().unwrap(),
            ],
        );
        assert_eq!(offline_sum(&raw, "/root/q"), mine);
    });
    assert_eq!(ended.state, State::Migrated);
    let name4 = format!("{dom}-qd");
    let how4 = Recover {
        on: format!("qmp:///{name4}"),
        ..how.clone()
    };
    let ended = with_server(&repo, &wanted, &how4, |started| {
        let pid = started.qemu_pid.unwrap();
        instant::discard(&sessions, &name4).unwrap();
        assert!(
            common::wait_gone(pid as i32, Duration::from_secs(10)),
            "QEMU is gone"
        );
    });
    assert_eq!(ended.state, State::Stopping);
    assert!(!sessions.join(&name4).exists() && !instant::vm_dir(&sessions, &name4).exists());
    assert_eq!(points(&repo), held);
}
