//! Every job kind through a server and two proxies (real processes): a
//! source proxy that sees the disks, and a target proxy that holds the
//! repositories and serves them (the target data mover).
//!
//! * backup into the target's repository: only missing chunks cross the
//!   wire (an unchanged second run sends about a manifest);
//! * copy: a one-off full;
//! * replication: the replica image on the target equals the source, and
//!   again after a change (incremental run);
//! * migration: two passes, the replica equals the source;
//! * restore: runs on the proxy holding the repository and writes the
//!   point byte for byte;
//! * bad job specs for these kinds get a 400 with a message.

use std::path::Path;
use std::time::Duration;

use crate::common::{Cluster, assert_restores, dm, make_disk, status};
use datamover_control::api::{API, Job, JobDisk, JobKind, JobSpec, Repository, Session, State};

const MIB: usize = 1 << 20;
const T: Duration = Duration::from_secs(60);

fn spec(name: &str, kind: JobKind, repo: &str, disks: Vec<JobDisk>) -> JobSpec {
    JobSpec {
        name: name.into(),
        kind,
        repository: repo.into(),
        disks,
        proxies: vec!["src".into()],
        transport: "auto".into(),
        failover_to_network: false,
        retries: 0,
        every_minutes: None,
        overwrite: false,
        quiesce: "auto".into(),
        vms: Vec::new(),
    }
}

fn disk(name: &str, source: &Path) -> JobDisk {
    JobDisk {
        name: name.parse().unwrap(),
        source: source.display().to_string(),
        disk: None,
        vm_host: None,
        start_as: None,
        point: None,
    }
}

fn run(c: &Cluster, job: &str) -> Session {
    let s: Session = c.api().post(&format!("{API}/jobs/{job}/run"), &()).unwrap();
    let s = c.wait_session(s.id, T);
    assert_eq!(s.state, State::Success, "{s:#?}\n{}", c.logs());
    s
}

fn same(a: &Path, b: &Path) -> bool {
    std::fs::read(a).unwrap() == std::fs::read(b).unwrap()
}

#[test]
fn backup_copy_replication_migration_and_restore_through_two_proxies() {
    let _serial = crate::common::serial();
    let mut c = Cluster::start(&[
        "--no-builtin-proxy",
        "--heartbeat-ms",
        "200",
        "--retry-delay-ms",
        "100",
    ]);
    let images = c.path("images");
    std::fs::create_dir_all(&images).unwrap();
    let (a, b, m) = (
        images.join("a.raw"),
        images.join("b.raw"),
        images.join("m.raw"),
    );
    make_disk(&a, 8 * MIB, 1);
    make_disk(&b, 8 * MIB, 2);
    make_disk(&m, 8 * MIB, 3);
    // tgt sees one datastore, where the restore writes.
    let out_dir = c.path("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    c.add_proxy("src", &[&images], 2);
    c.add_proxy("tgt", &[&out_dir], 2);
    let api = c.api();
    let vault = c.path("vault");
    let dr = c.path("dr");
    let _: Repository = api
        .post(
            &format!("{API}/repositories"),
            &Repository {
                name: "vault".into(),
                path: vault.display().to_string(),
                proxy: Some("tgt".into()),
            },
        )
        .unwrap();
    // The CLI's way of adding a repository held by a proxy.
    let out = dm(&c)
        .args(["repo", "add", "dr"])
        .arg(&dr)
        .args(["--proxy", "tgt"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    // Backup through the repository service of tgt.
    let _: Job = api
        .post(
            &format!("{API}/jobs"),
            &spec(
                "b",
                JobKind::Backup,
                "vault",
                vec![disk("vm/a", &a), disk("vm/b", &b)],
            ),
        )
        .unwrap();
    let s = run(&c, "b");
    for t in &s.tasks {
        assert_eq!(t.proxy.as_deref(), Some("src"), "{t:#?}");
        let w = t.wire_bytes.unwrap();
        assert!(w >= t.bytes_stored.unwrap(), "{t:#?}");
    }
    assert_restores(&vault, "vm/a", &a);
    assert_restores(&vault, "vm/b", &b);
    let s = run(&c, "b");
    for t in &s.tasks {
        let w = t.wire_bytes.unwrap();
        assert!(w < 64 * 1024, "unchanged second run sent {w} bytes: {t:#?}");
    }

    // Copy: a one-off full, another point.
    let _: Job = api
        .post(
            &format!("{API}/jobs"),
            &spec("c", JobKind::Copy, "vault", vec![disk("vm/a", &a)]),
        )
        .unwrap();
    run(&c, "c");
    let r = datamover::Repository::open(&vault).unwrap();
    assert_eq!(r.point_ids(&"vm/a".parse().unwrap()).unwrap().len(), 3);

    // Replication, created with the CLI; run twice with a change between.
    let out = dm(&c)
        .args([
            "job",
            "create",
            "rep",
            "--kind",
            "replication",
            "--repo",
            "dr",
        ])
        .arg("--disk")
        .arg(format!("vm/a={}", a.display()))
        .args(["--proxy", "src", "--retries", "0"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let s = run(&c, "rep");
    let replica = dr.join("replicas/vm/a.img");
    assert_eq!(
        s.tasks[0].replica.as_deref(),
        Some(replica.to_str().unwrap())
    );
    assert!(same(&replica, &a), "replica differs from the source");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&a).unwrap();
        f.write_all_at(&[0x5a; 3 * 65536], 3 * MIB as u64).unwrap();
    }
    let out = dm(&c)
        .args(["job", "run", "rep", "--wait"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}\n{}", c.logs());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("replica ") && text.contains("on the wire"),
        "{text}"
    );
    assert!(
        same(&replica, &a),
        "replica differs after the incremental run"
    );
    let st = datamover::replica::read_state(&replica).unwrap();
    assert_eq!(st.state, "applied");

    // Quick migration of a file disk: first pass, final sync, handover.
    let _: Job = api
        .post(
            &format!("{API}/jobs"),
            &spec("mig", JobKind::Migration, "dr", vec![disk("vm/m", &m)]),
        )
        .unwrap();
    let s = run(&c, "mig");
    let mrep = dr.join("replicas/vm/m.img");
    assert_eq!(s.tasks[0].replica.as_deref(), Some(mrep.to_str().unwrap()));
    assert!(same(&mrep, &m));
    let r = datamover::Repository::open(&dr).unwrap();
    assert_eq!(r.point_ids(&"vm/m".parse().unwrap()).unwrap().len(), 2);

    // Restore from the target's repository: it runs on tgt (which sees
    // the destination's datastore).
    let dest = out_dir.join("b.raw");
    let mut rs = spec("rest", JobKind::Restore, "vault", vec![disk("vm/b", &dest)]);
    rs.proxies.clear();
    let _: Job = api.post(&format!("{API}/jobs"), &rs).unwrap();
    let s = run(&c, "rest");
    assert_eq!(s.tasks[0].proxy.as_deref(), Some("tgt"), "{s:#?}");
    assert!(same(&dest, &b), "restored disk differs");

    // Bad specs for these kinds.
    let _: Repository = api
        .post(
            &format!("{API}/repositories"),
            &Repository {
                name: "shared".into(),
                path: c.path("shared").display().to_string(),
                proxy: None,
            },
        )
        .unwrap();
    let cases: Vec<(JobSpec, &str)> = vec![
        (
            spec("x1", JobKind::Replication, "shared", vec![disk("vm/a", &a)]),
            "held by its target proxy",
        ),
        (
            spec(
                "x2",
                JobKind::Restore,
                "vault",
                vec![JobDisk {
                    source: "qmp+unix:///run/vm.qmp".into(),
                    ..disk("vm/a", &a)
                }],
            ),
            "absolute path or an nbd",
        ),
        (
            spec(
                "x3",
                JobKind::Backup,
                "vault",
                vec![JobDisk {
                    point: Some("latest".into()),
                    ..disk("vm/a", &a)
                }],
            ),
            "for restore jobs",
        ),
    ];
    for (j, want) in cases {
        let (st, msg) = status(api.post::<_, Job>(&format!("{API}/jobs"), &j));
        assert_eq!(st, 400, "{}: {msg}", j.name);
        assert!(msg.contains(want), "{}: {msg}", j.name);
    }
    let (st, msg) = status(api.post::<_, Repository>(
        &format!("{API}/repositories"),
        &Repository {
            name: "r2".into(),
            path: "/srv/r2".into(),
            proxy: Some("nobody".into()),
        },
    ));
    assert_eq!(st, 400);
    assert!(msg.contains("nobody"), "{msg}");

    // A disk no proxy sees: the task stays queued and says why.
    let lost = Path::new("/nonexistent-datastore/x.raw");
    let _: Job = api
        .post(
            &format!("{API}/jobs"),
            &spec("lost", JobKind::Backup, "vault", vec![disk("vm/x", lost)]),
        )
        .unwrap();
    let s: Session = api.post(&format!("{API}/jobs/lost/run"), &()).unwrap();
    crate::common::wait_until("a waiting reason", T, || {
        let s: Session = api.get(&format!("{API}/sessions/{}", s.id)).unwrap();
        s.tasks[0].waiting.is_some()
    });
    let out = dm(&c)
        .args(["session", "show", &s.id.to_string()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("waiting: no online proxy sees /nonexistent-datastore/x.raw")
            && text.contains("--datastore"),
        "{text}"
    );
}
