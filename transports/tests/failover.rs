//! A real libvirt guest moved between VMs on replicas: quick migration to a
//! new domain on the replicas (the guest's data checked inside), failback
//! to the original domain with only the changes written, then a failover
//! that is undone (the replica compared back to its point, byte for byte).
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)] // test crate: a panic is a failed test

use datamover_testkit as common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::guest::{GUEST_TOOLS, virsh};
use common::{Guest, GuestImage, can_run, sh};
use datamover::{BackupOptions, Repository};
use datamover_transports::SourceOptions;
use datamover_transports::failover;
use datamover_transports::qemu::{Quiesce, QuiesceLimits};

fn state(domain: &str) -> String {
    virsh(&["domstate", domain]).unwrap_or_else(|e| e)
}

fn replica_state(img: &Path) -> String {
    datamover::replica::read_state(img)
        .map(|s| s.state)
        .unwrap_or_default()
}

fn sum(g: &Guest, path: &str) -> String {
    g.sh(&format!("sha256sum {path} | cut -d' ' -f1"))
}

#[test]
fn a_libvirt_guest_migrates_to_its_replicas_fails_back_and_a_failover_is_undone() {
    let mut tools = GUEST_TOOLS.to_vec();
    tools.extend(["libvirtd", "virtlogd", "virsh", "qemu-nbd"]);
    let test = "a_libvirt_guest_migrates_to_its_replicas_fails_back_and_a_failover_is_undone";
    if !can_run(test, &tools) {
        return;
    }
    GuestImage::get();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let dom = format!("dm-mig-{}", std::process::id());
    let (_libvirtd, g) = common::guest::libvirt_with_data(dir, &dom, 64);
    let img = dir.join(format!("{dom}-root.qcow2"));
    let repo = Repository::init(&dir.join("repo")).unwrap();
    let root = dir.join("replicas");
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

    // Quick migration: first pass running, final sync frozen and paused,
    // the VM started on the replicas, the source powered off.
    let target = format!("{dom}-t");
    let m = failover::migrate(
        &repo,
        &root,
        Some("app"),
        &g.spec(),
        &format!("libvirt:///{target}"),
        &opts,
        &BackupOptions::default(),
    )
    .unwrap();
    eprintln!("migration: {m:?}");
    assert_eq!(m.consistency, "application");
    assert_eq!(m.vm.domain, target);
    assert_eq!(m.vm.disks.len(), 2);
    assert!(
        m.final_sync_bytes < m.first_pass_bytes / 4,
        "final sync {} vs first pass {}",
        m.final_sync_bytes,
        m.first_pass_bytes
    );
    assert_eq!(state(&dom), "shut off");
    // The final sync's points say what they are: taken frozen and paused.
    let vda: datamover::DiskName = "app/vda".parse().unwrap();
    let newest = repo.resolve_point(&vda, None).unwrap();
    let c = repo
        .point_meta(&vda, &newest)
        .unwrap()
        .meta
        .consistency
        .unwrap();
    assert_eq!(c.level, datamover::ConsistencyLevel::Application, "{c:?}");
    assert!(c.reason.contains("paused"), "{c:?}");
    let t = Guest::libvirt_running(dir, &target);
    assert_eq!(sum(&t, "/root/before"), before);
    assert_eq!(
        t.sh("head -c 4194304 /dev/vdb | sha256sum | cut -d' ' -f1"),
        vdb
    );
    t.check_database(0);
    let vda_img = root.join("app").join("vda.img");
    assert_eq!(replica_state(&vda_img), "failover");
    // Replication never writes under the running VM.
    let e = failover::sync(&repo, &root, "app").unwrap_err();
    assert!(e.to_string().contains("failed over"), "{e}");
    // A second failover onto the same replicas is refused.
    let e = failover::failover(&repo, &root, "app", "libvirt:///other", true).unwrap_err();
    assert!(e.to_string().contains("failed over already"), "{e}");

    // Failback: what the guest wrote on the target goes back to the
    // original disks; only the differences are written.
    let after = t.write_random("/root/after", 3);
    let failback = || {
        failover::failback(
            &repo,
            &root,
            "app",
            &format!("libvirt:///{target}"),
            &g.spec(),
            true,
            &BackupOptions::default(),
        )
    };
    // The original must be off: a running one is refused untouched.
    sh(Command::new("virsh").args(["-c", "qemu:///system", "start", &dom]));
    let e = failback().unwrap_err();
    assert!(e.to_string().contains("is running"), "{e}");
    assert_eq!(state(&target), "running");
    sh(Command::new("virsh").args(["-c", "qemu:///system", "destroy", &dom]));
    let b = failback().unwrap();
    eprintln!("failback: {b:?}");
    drop(t);
    assert_eq!(b.consistency, "application");
    assert_eq!(b.disks.len(), 2);
    let vda = &b.disks[0];
    assert!(
        vda.bytes_written >= 3 << 20 && vda.bytes_written < vda.disk_size / 8,
        "{vda:?}"
    );
    assert!(
        virsh(&["domstate", &target]).is_err(),
        "the replica VM is gone"
    );
    assert!(
        virsh(&["checkpoint-list", &dom, "--name"])
            .unwrap()
            .trim()
            .is_empty(),
        "the original's checkpoints are stale after failback"
    );
    assert_eq!(replica_state(&vda_img), "applied");
    let info = sh(Command::new("qemu-img").args(["info", "-U"]).arg(&img));
    assert!(!info.contains("dm-cp-"), "stale bitmaps left: {info}");
    let o = Guest::libvirt_running(dir, &dom);
    assert_eq!(sum(&o, "/root/after"), after);
    assert_eq!(sum(&o, "/root/before"), before);
    o.check_database(0);
    // Its next backup reads everything (its dirty tracking missed the
    // failback's writes).
    let next = datamover_transports::backup_vm(
        &repo,
        &o.spec(),
        "app",
        &["vda".to_string()],
        &[],
        &opts,
        &BackupOptions {
            full_if_needed: true,
            ..BackupOptions::default()
        },
    )
    .unwrap();
    assert!(next[0].report.full_reason.is_some(), "{:?}", next[0].report);

    // A failover undone (the original is down meanwhile): the guest's
    // writes on the replica are dropped at the next sync, which compares
    // and writes only what differs.
    failover::sync(&repo, &root, "app").unwrap();
    sh(Command::new("virsh").args(["-c", "qemu:///system", "destroy", &dom]));
    let f = failover::failover(&repo, &root, "app", "libvirt:///", true).unwrap();
    assert_eq!(f.domain, "app-replica");
    let r = Guest::libvirt_running(dir, "app-replica");
    assert_eq!(sum(&r, "/root/after"), after);
    r.sh("dd if=/dev/urandom of=/root/junk bs=1M count=2 status=none && sync");
    let u = failover::undo(&repo, &root, "app", "libvirt:///app-replica").unwrap();
    assert_eq!(u.disks.len(), 2);
    assert!(virsh(&["domstate", "app-replica"]).is_err());
    assert_eq!(replica_state(&vda_img), "applying");
    let s = failover::sync(&repo, &root, "app").unwrap();
    assert!(
        s[0].bytes_written >= 2 << 20 && s[0].bytes_written < s[0].disk_size / 8,
        "{:?}",
        s[0]
    );
    let point = s[0].point.clone();
    let restored = dir.join("check.raw");
    let id = repo
        .resolve_point(&"app/vda".parse().unwrap(), Some(&point))
        .unwrap();
    let size = repo
        .point_meta(&"app/vda".parse().unwrap(), &id)
        .unwrap()
        .meta
        .disk_size;
    let tg = datamover::target::open_local(&restored, size, true).unwrap();
    datamover::restore(
        &repo,
        &"app/vda".parse().unwrap(),
        &id,
        tg.as_ref(),
        &Default::default(),
    )
    .unwrap();
    let same = Command::new("cmp")
        .arg(&restored)
        .arg(&vda_img)
        .status()
        .unwrap();
    assert!(
        same.success(),
        "the replica equals its point after the undo"
    );
    drop(o);
    drop(g);
    let v = datamover::verify(&repo, true).unwrap();
    assert!(v.is_ok(), "{:?}", v.problems);
}
