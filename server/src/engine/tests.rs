//! Unit tests of the engine on an in-memory catalog: the domain rules
//! without HTTP, TLS or proxies.
#![allow(clippy::unwrap_used)]

use super::*;
use datamover_control::api::State;

fn engine() -> (Engine, tempfile::TempDir) {
    let d = tempfile::tempdir().unwrap();
    let db = crate::catalog::open(std::path::Path::new(":memory:")).unwrap();
    let ca = Ca::load_or_create(&d.path().join("ca"), "unit").unwrap();
    (Engine::new(db, ca, Timing::default()), d)
}

fn repo(e: &Engine, name: &str) {
    e.add_repository(&api::Repository {
        name: name.into(),
        path: format!("/tmp/dm-unit-{name}"),
        proxy: None,
    })
    .unwrap();
}

/// A heartbeat of a 2-core proxy that runs nothing and reports nothing.
fn quiet_heartbeat() -> Heartbeat {
    Heartbeat {
        version: "t".into(),
        cores: 2,
        datastores: Vec::new(),
        running: Vec::new(),
        service_port: None,
        serving: Vec::new(),
        vms: None,
        operations: Vec::new(),
        recoveries: Vec::new(),
        files: Vec::new(),
    }
}

fn job(name: &str, repository: &str, sources: &[&str]) -> JobSpec {
    serde_json::from_value(serde_json::json!({
        "name": name,
        "kind": "backup",
        "repository": repository,
        "disks": sources.iter().enumerate().map(|(i, s)| serde_json::json!({
            "name": format!("vm{i}/vda"),
            "source": s,
        })).collect::<Vec<_>>(),
    }))
    .unwrap()
}

#[test]
fn names_are_checked_with_a_bad_input_error() {
    assert!(check_name("job", "web-01.daily_2").is_ok());
    for bad in ["", ".hidden", "-x", "a/b", "sp ace", &"x".repeat(65)] {
        let e = check_name("job", bad).unwrap_err();
        assert_eq!(e.kind, ErrorKind::BadInput, "{bad:?}");
        assert!(e.message.contains("not valid"), "{}", e.message);
    }
}

#[test]
fn a_duplicate_host_is_a_conflict_and_an_unknown_one_not_found() {
    let (e, _d) = engine();
    let h: NewHost = serde_json::from_value(serde_json::json!({"name": "pve1"})).unwrap();
    let added = e.add_host(&h).unwrap();
    assert!(added.enrollment_token.starts_with("dmj1."));
    assert_eq!(e.hosts().unwrap().len(), 1);
    let dup = e.add_host(&h).unwrap_err();
    assert_eq!(dup.kind, ErrorKind::Conflict);
    assert!(dup.message.contains("pve1"), "{}", dup.message);
    assert_eq!(e.remove_host("nope").unwrap_err().kind, ErrorKind::NotFound);
    e.remove_host("pve1").unwrap();
    assert!(e.hosts().unwrap().is_empty());
}

#[test]
fn a_job_runs_one_queued_task_per_disk_and_only_once_at_a_time() {
    let (e, _d) = engine();
    repo(&e, "vault");
    let bad = e
        .create_job(&job("j", "vault", &["relative.img"]))
        .unwrap_err();
    assert_eq!(bad.kind, ErrorKind::BadInput);
    let missing = e.create_job(&job("j", "nowhere", &["/a.img"])).unwrap_err();
    assert_eq!(missing.kind, ErrorKind::BadInput, "{}", missing.message);
    assert!(missing.message.contains("nowhere"), "{}", missing.message);
    e.create_job(&job("j", "vault", &["/a.img", "/b.img"]))
        .unwrap();
    let s = e.run_job("j").unwrap();
    assert_eq!(s.tasks.len(), 2);
    // No proxy is registered: both tasks wait in the queue.
    assert!(s.tasks.iter().all(|t| t.state == State::Queued), "{s:?}");
    assert_eq!(e.run_job("j").unwrap_err().kind, ErrorKind::Conflict);
    assert_eq!(e.delete_job("j").unwrap_err().kind, ErrorKind::Conflict);
    assert_eq!(e.session(s.id).unwrap().tasks.len(), 2);
    assert_eq!(e.run_job("other").unwrap_err().kind, ErrorKind::NotFound);
}

/// A proxy that stops heartbeating is declared dead once the clock has
/// moved past `dead_after`, not before, and its task goes back to the
/// queue with the reason (time moved by hand, no sleeping).
#[test]
fn a_silent_proxy_is_declared_dead_when_the_clock_says_so() {
    let (e, _d) = engine();
    let clock = Arc::new(ManualClock::new(chrono::Utc::now()));
    let e = e.with_clock(clock.clone());
    repo(&e, "vault");
    let h: NewHost = serde_json::from_value(
        serde_json::json!({"name": "p1", "roles": ["proxy"], "datastores": ["/"]}),
    )
    .unwrap();
    e.add_host(&h).unwrap();
    let host = Engine::host_id(&e.db(), "p1").unwrap();
    let hb = Heartbeat {
        datastores: vec!["/".into()],
        ..quiet_heartbeat()
    };
    e.create_job(&job("j", "vault", &["/a.img"])).unwrap();
    let s = e.run_job("j").unwrap();
    let orders = e.heartbeat(host, &hb).unwrap();
    assert_eq!(orders.assign.len(), 1, "{orders:?}");
    let running = |e: &Engine| e.session(s.id).unwrap().tasks[0].clone();
    assert_eq!(running(&e).proxy.as_deref(), Some("p1"));

    clock.advance(e.timing().dead_after / 2);
    e.tick().unwrap();
    assert_eq!(e.proxies().unwrap()[0].state, ProxyState::Online);

    clock.advance(e.timing().dead_after);
    e.tick().unwrap();
    assert_eq!(e.proxies().unwrap()[0].state, ProxyState::Dead);
    let t = running(&e);
    assert_eq!(t.state, State::Queued, "{t:?}");
    let why = t
        .attempts
        .last()
        .map(|a| a.reason.clone())
        .unwrap_or_default();
    assert!(why.contains("declared dead"), "{t:?}");
}

/// A host's name and addresses go into its certificate: wildcards, the
/// server's names and another host's are refused; a proxy's datastores
/// are what the administrator gave, whatever it reports.
#[test]
fn certificate_names_and_datastores_are_the_administrators() {
    let (e, _d) = engine();
    e.set_server_names(&["dm.example.com".into(), "10.0.0.1".into()]);
    let add = |name: &str, addresses: &[&str]| {
        let h: NewHost = serde_json::from_value(
            serde_json::json!({"name": name, "addresses": addresses, "roles": ["proxy"],
                "datastores": ["/srv/a"]}),
        )
        .unwrap();
        e.add_host(&h)
    };
    add("kvm1", &["10.0.0.2", "kvm1.example.com"]).unwrap();
    for (name, addresses, why) in [
        ("kvm2", vec!["*.example.com"], "wildcard"),
        ("kvm2", vec!["10.0.0.1"], "server"),
        ("kvm2", vec!["DM.example.com"], "server"),
        ("kvm2", vec!["localhost"], "server"),
        ("localhost", vec![], "server"),
        ("kvm2", vec!["10.0.0.2"], "another host"),
        ("kvm2", vec!["kvm1"], "another host"),
        ("kvm2", vec!["0.0.0.0"], "one host"),
        ("kvm2", vec!["a b"], "not a host name"),
    ] {
        let err = add(name, &addresses).unwrap_err();
        assert_eq!(err.kind, ErrorKind::BadInput, "{addresses:?}");
        assert!(err.message.contains(why), "{addresses:?}: {}", err.message);
    }
    assert_eq!(add("kvm1", &[]).unwrap_err().kind, ErrorKind::Conflict);
    let h: NewHost =
        serde_json::from_value(serde_json::json!({"name": "kvm3", "datastores": ["/srv/../etc"]}))
            .unwrap();
    assert_eq!(e.add_host(&h).unwrap_err().kind, ErrorKind::BadInput);

    // kvm1 may use /srv/a: it reports /, /srv/a/vm and /srv/b; only
    // /srv/a/vm is kept.
    let host = Engine::host_id(&e.db(), "kvm1").unwrap();
    let hb = Heartbeat {
        datastores: vec!["/".into(), "/srv/a/vm".into(), "/srv/b".into()],
        ..quiet_heartbeat()
    };
    e.heartbeat(host, &hb).unwrap();
    assert_eq!(
        e.proxies().unwrap()[0].datastores,
        vec!["/srv/a/vm".to_string()]
    );
    // Taking the datastore away narrows it at once.
    e.patch_host(
        "kvm1",
        &serde_json::from_value(serde_json::json!({"datastores": []})).unwrap(),
    )
    .unwrap();
    assert!(e.proxies().unwrap()[0].datastores.is_empty());
}

/// Tokens: roles, expiry by the clock, revocation at once, the last
/// administrator token kept; checking one never waits for the catalog.
#[test]
fn tokens_expire_are_revoked_and_are_checked_without_the_catalog() {
    use datamover_control::api::{NewToken, TokenRole};
    let (e, _d) = engine();
    let clock = Arc::new(ManualClock::new(chrono::Utc::now()));
    let e = e.with_clock(clock.clone());
    let admin = e.bootstrap_token().unwrap().unwrap();
    assert_eq!(e.check_token(&admin).unwrap().role, TokenRole::Admin);
    let ops = e
        .create_token(&NewToken {
            name: "ops".into(),
            role: TokenRole::Operator,
            expires_days: Some(2),
        })
        .unwrap();
    let c = e.check_token(&ops.secret).unwrap();
    assert_eq!((c.name.as_str(), c.role), ("ops", TokenRole::Operator));
    // Two days later it no longer works, and says why.
    clock.advance(Duration::from_secs(2 * 86400 + 1));
    let err = e.check_token(&ops.secret).unwrap_err();
    assert_eq!(err.kind, ErrorKind::Unauthenticated);
    assert!(err.message.contains("expired"), "{}", err.message);
    // The first token never expires; it cannot be revoked while it is the
    // only administrator, and can once another exists.
    assert_eq!(
        e.revoke_token("admin").unwrap_err().kind,
        ErrorKind::Conflict
    );
    let second = e
        .create_token(&NewToken {
            name: "admin2".into(),
            role: TokenRole::Admin,
            expires_days: None,
        })
        .unwrap();
    e.revoke_token("admin").unwrap();
    assert_eq!(
        e.check_token(&admin).unwrap_err().kind,
        ErrorKind::Unauthenticated
    );
    assert_eq!(
        e.revoke_token("nope").unwrap_err().kind,
        ErrorKind::NotFound
    );
    for days in [0, 3651] {
        let t = NewToken {
            name: "x".into(),
            role: TokenRole::Auditor,
            expires_days: Some(days),
        };
        assert_eq!(e.create_token(&t).unwrap_err().kind, ErrorKind::BadInput);
    }
    // With the catalog's lock held (a long scheduler step), a token is
    // still checked at once.
    let held = e.db();
    let t = std::time::Instant::now();
    std::thread::scope(|s| {
        s.spawn(|| assert!(e.check_token(&second.secret).is_ok()));
    });
    assert!(t.elapsed() < Duration::from_secs(1));
    drop(held);
}

/// A job naming a whole VM: at each run, every disk of the VM as its
/// hypervisor last reported it becomes a task (but the excluded ones),
/// read through that hypervisor's libvirt by a proxy on that host.
#[test]
fn a_job_of_whole_vms_expands_to_their_disks_from_the_inventory() {
    use datamover_control::api::{VmDisk, VmReport};
    let (e, _dir) = engine();
    repo(&e, "vault");
    let h: datamover_control::api::NewHost = serde_json::from_value(serde_json::json!({
        "name": "kvm01", "roles": ["proxy"], "hypervisor": "qemu:///system"
    }))
    .unwrap();
    e.add_host(&h).unwrap();
    let bad: datamover_control::api::NewHost = serde_json::from_value(serde_json::json!({
        "name": "kvm02", "hypervisor": "not a uri"
    }))
    .unwrap();
    assert_eq!(e.add_host(&bad).unwrap_err().kind, ErrorKind::BadInput);
    let host = Engine::host_id(&e.db(), "kvm01").unwrap();
    let disk = |t: &str| VmDisk {
        target: t.into(),
        format: "qcow2".into(),
        source: Some(format!("/images/web01-{t}.qcow2")),
    };
    let hb = Heartbeat {
        vms: Some(vec![VmReport {
            name: "web01".into(),
            state: "running".into(),
            disks: vec![disk("vda"), disk("vdb")],
        }]),
        ..quiet_heartbeat()
    };
    let orders = e.heartbeat(host, &hb).unwrap();
    assert_eq!(orders.hypervisor.as_deref(), Some("qemu:///system"));
    let inv = e.vms().unwrap();
    assert_eq!(
        (
            inv[0].host.as_str(),
            inv[0].name.as_str(),
            inv[0].disks.len()
        ),
        ("kvm01", "web01", 2)
    );

    let spec = |job: &str, vm: &str, exclude: &[&str]| -> JobSpec {
        serde_json::from_value(serde_json::json!({
            "name": job, "kind": "backup", "repository": "vault",
            "vms": [{"name": vm, "exclude": exclude}],
        }))
        .unwrap()
    };
    e.create_job(&spec("web", "web01", &["vdb"])).unwrap();
    let s = e.run_job("web").unwrap();
    let names: Vec<String> = s.tasks.iter().map(|t| t.disk.to_string()).collect();
    assert_eq!(names, ["web01/vda"]);
    let orders = e
        .heartbeat(
            host,
            &Heartbeat {
                vms: None,
                operations: Vec::new(),
                ..hb.clone()
            },
        )
        .unwrap();
    let t = &orders.assign[0];
    assert_eq!(t.source, "libvirt:///web01?uri=qemu:///system&nbd=unix");
    assert_eq!(t.vm_disk.as_deref(), Some("vda"));

    // Not in the inventory, or a disk it does not have: a clear refusal.
    e.create_job(&spec("db", "db01", &[])).unwrap();
    let err = e.run_job("db").unwrap_err();
    assert!(err.to_string().contains("not in the inventory"), "{err}");
    e.create_job(&spec("typo", "web01", &["vdz"])).unwrap();
    let err = e.run_job("typo").unwrap_err();
    assert!(err.to_string().contains("excluded disk vdz"), "{err}");
    // A host that is no longer a hypervisor leaves the inventory.
    e.patch_host(
        "kvm01",
        &serde_json::from_value(serde_json::json!({"hypervisor": ""})).unwrap(),
    )
    .unwrap();
    assert!(e.vms().unwrap().is_empty());
}

/// Failover, undo and failback of a replication job's VM: checked when
/// asked for, sent once to the proxy holding the replicas with the
/// addresses filled in, ended by its report, and failed (never re-sent)
/// when the proxy stops reporting it.
#[test]
fn replica_operations_go_once_to_the_proxy_holding_the_replicas() {
    use datamover_control::api::{OperationStatus, ReplicaAction, ReplicaRequest};
    let (e, _dir) = engine();
    let h: NewHost = serde_json::from_value(serde_json::json!({
        "name": "dr1", "roles": ["proxy"], "hypervisor": "qemu+ssh://dr1/system"
    }))
    .unwrap();
    e.add_host(&h).unwrap();
    e.add_repository(&api::Repository {
        name: "drvault".into(),
        path: "/srv/drvault".into(),
        proxy: Some("dr1".into()),
    })
    .unwrap();
    repo(&e, "shared");
    let spec = |name: &str, kind: &str, repository: &str| -> JobSpec {
        serde_json::from_value(serde_json::json!({
            "name": name, "kind": kind, "repository": repository,
            "disks": [{"name": "web01/vda", "source": "/images/web01.raw"}],
        }))
        .unwrap()
    };
    let host = Engine::host_id(&e.db(), "dr1").unwrap();
    let beat = |ops: Vec<OperationStatus>| {
        e.heartbeat(
            host,
            &Heartbeat {
                operations: ops,
                ..quiet_heartbeat()
            },
        )
        .unwrap()
    };
    beat(Vec::new());
    e.create_job(&spec("rep", "replication", "drvault"))
        .unwrap();
    e.create_job(&spec("bk", "backup", "shared")).unwrap();
    let ask = |job: &str, action: ReplicaAction, vm: &str| {
        e.replica_operation(
            job,
            &ReplicaRequest {
                action,
                vm: vm.into(),
                on: None,
                to: None,
                start: true,
            },
        )
    };
    let bad = ask("bk", ReplicaAction::Failover, "web01").unwrap_err();
    assert!(bad.message.contains("backup job"), "{}", bad.message);
    let bad = ask("rep", ReplicaAction::Failover, "db01").unwrap_err();
    assert!(bad.message.contains("no VM db01"), "{}", bad.message);
    // A failback needs the original: not in the inventory, so it is asked for.
    let bad = ask("rep", ReplicaAction::Failback, "web01").unwrap_err();
    assert!(bad.message.contains("\"to\""), "{}", bad.message);
    let op = ask("rep", ReplicaAction::Failover, "web01").unwrap();
    assert_eq!((op.state.as_str(), op.proxy.as_str()), ("queued", "dr1"));
    assert_eq!(
        ask("rep", ReplicaAction::Undo, "web01").unwrap_err().kind,
        ErrorKind::Conflict
    );
    let o = beat(Vec::new());
    assert_eq!(o.operations.len(), 1);
    let order = &o.operations[0];
    assert_eq!(
        order.on,
        "libvirt:///web01-replica?uri=qemu+ssh://dr1/system"
    );
    assert_eq!(order.repository, "/srv/drvault");
    assert_eq!(e.operation(op.id).unwrap().state, "running");
    let running = OperationStatus {
        id: op.id,
        done: false,
        result: None,
        error: None,
    };
    assert!(
        beat(vec![running.clone()]).operations.is_empty(),
        "sent once"
    );
    let done = OperationStatus {
        done: true,
        result: Some(serde_json::json!({"domain": "web01-replica"})),
        ..running
    };
    beat(vec![done]);
    let ended = e.operation(op.id).unwrap();
    assert_eq!(ended.state, "done");
    assert_eq!(ended.result.unwrap()["domain"], "web01-replica");
    // An operation the proxy stops reporting fails; it is not re-sent.
    let undo = ask("rep", ReplicaAction::Undo, "web01").unwrap();
    assert_eq!(beat(Vec::new()).operations.len(), 1);
    assert!(beat(Vec::new()).operations.is_empty());
    let lost = e.operation(undo.id).unwrap();
    assert_eq!(lost.state, "failed");
    assert!(lost.error.unwrap().contains("no longer runs it"));
    assert_eq!(e.operations(10).unwrap().len(), 2);
}

/// Instant recoveries: checked when asked for, started once on the proxy
/// holding the repository (the domain filled in from its hypervisor),
/// its state and progress as the proxy reports them, controls sent once,
/// and failed (never restarted) when the proxy stops reporting it.
#[test]
fn recoveries_start_once_on_the_holding_proxy_and_controls_follow() {
    use datamover_control::api::{
        RecoveryAction, RecoveryMigrate, RecoveryRequest, RecoveryStatus,
    };
    let (e, _dir) = engine();
    let h: NewHost = serde_json::from_value(serde_json::json!({
        "name": "kvm1", "roles": ["proxy"], "hypervisor": "qemu:///system"
    }))
    .unwrap();
    e.add_host(&h).unwrap();
    e.add_repository(&api::Repository {
        name: "vault".into(),
        path: "/srv/vault".into(),
        proxy: Some("kvm1".into()),
    })
    .unwrap();
    repo(&e, "shared");
    let host = Engine::host_id(&e.db(), "kvm1").unwrap();
    let beat = |st: Vec<RecoveryStatus>| {
        e.heartbeat(
            host,
            &Heartbeat {
                recoveries: st,
                ..quiet_heartbeat()
            },
        )
        .unwrap()
    };
    beat(Vec::new());
    let ask = |repository: &str, vm: &str, points: &[&str]| {
        e.create_recovery(&RecoveryRequest {
            repository: repository.into(),
            vm: vm.into(),
            points: points.iter().map(|p| p.to_string()).collect(),
            on: None,
            proxy: None,
        })
    };
    let bad = ask("shared", "web01", &[]).unwrap_err();
    assert!(
        bad.message.contains("not held by a proxy"),
        "{}",
        bad.message
    );
    let bad = ask("vault", "web01", &["db01/vda"]).unwrap_err();
    assert!(bad.message.contains("not of VM web01"), "{}", bad.message);
    assert_eq!(
        ask("nope", "web01", &[]).unwrap_err().kind,
        ErrorKind::NotFound
    );
    let r = ask("vault", "web01", &[]).unwrap();
    assert_eq!((r.state.as_str(), r.proxy.as_str()), ("queued", "kvm1"));
    assert_eq!(
        ask("vault", "web01", &[]).unwrap_err().kind,
        ErrorKind::Conflict
    );
    let migrate = RecoveryMigrate {
        to: "/srv/prod".into(),
        format: "raw".into(),
    };
    assert_eq!(
        e.migrate_recovery(r.id, &migrate).unwrap_err().kind,
        ErrorKind::Conflict,
        "only a serving recovery migrates"
    );
    let o = beat(Vec::new());
    assert_eq!(o.recoveries.len(), 1);
    let start = &o.recoveries[0];
    assert_eq!(start.action, RecoveryAction::Start);
    assert_eq!(start.on, "libvirt:///web01-instant?uri=qemu:///system");
    assert_eq!(start.repository, "/srv/vault");
    assert_eq!(start.points, ["web01"]);
    assert_eq!(e.recovery(r.id).unwrap().state, "starting");
    let serving = RecoveryStatus {
        id: r.id,
        state: "serving".into(),
        percent: 0,
        done: false,
        session: Some(serde_json::json!({"name": "web01-instant"})),
        error: None,
    };
    assert!(
        beat(vec![serving.clone()]).recoveries.is_empty(),
        "sent once"
    );
    assert!(e.recovery(r.id).unwrap().serves());
    let bad = e
        .migrate_recovery(
            r.id,
            &RecoveryMigrate {
                format: "vmdk".into(),
                ..migrate.clone()
            },
        )
        .unwrap_err();
    assert!(bad.message.contains("raw or qcow2"), "{}", bad.message);
    let m = e.migrate_recovery(r.id, &migrate).unwrap();
    assert_eq!(m.pending.as_deref(), Some("migrate"));
    assert!(!m.control_failed());
    let o = beat(vec![serving.clone()]);
    assert_eq!(o.recoveries[0].action, RecoveryAction::Migrate);
    assert_eq!(o.recoveries[0].to.as_ref(), Some(&migrate));
    let migrating = RecoveryStatus {
        state: "migrating".into(),
        percent: 40,
        ..serving.clone()
    };
    assert!(beat(vec![migrating]).recoveries.is_empty());
    let now = e.recovery(r.id).unwrap();
    assert_eq!(
        (now.state.as_str(), now.percent, now.pending),
        ("migrating", 40, None)
    );
    assert_eq!(
        e.discard_recovery(r.id).unwrap_err().kind,
        ErrorKind::Conflict,
        "not while it migrates"
    );
    beat(vec![RecoveryStatus {
        state: "migrated".into(),
        percent: 100,
        done: true,
        ..serving.clone()
    }]);
    let ended = e.recovery(r.id).unwrap();
    assert!(ended.ended() && ended.finished.is_some(), "{ended:?}");
    assert_eq!(ended.session.unwrap()["name"], "web01-instant");

    // One the proxy stops reporting fails; a queued one is discarded here.
    let lost = ask("vault", "web01", &["web01/vda"]).unwrap();
    assert_eq!(beat(Vec::new()).recoveries.len(), 1);
    assert!(beat(Vec::new()).recoveries.is_empty());
    let lost = e.recovery(lost.id).unwrap();
    assert_eq!(lost.state, "failed");
    assert!(lost.error.unwrap().contains("no longer serves it"));
    let q = ask("vault", "web01", &[]).unwrap();
    assert_eq!(e.discard_recovery(q.id).unwrap().state, "discarded");
    // A QEMU of the proxy's own instead of a libvirt domain.
    let own = |on: &str| {
        e.create_recovery(&RecoveryRequest {
            repository: "vault".into(),
            vm: "web01".into(),
            points: Vec::new(),
            on: Some(on.into()),
            proxy: None,
        })
    };
    let bad = own("qmp:///a/b").unwrap_err();
    assert!(bad.message.contains("qmp:///NAME"), "{}", bad.message);
    let q = own("qmp:///web01-q").unwrap();
    assert_eq!(beat(Vec::new()).recoveries[0].on, "qmp:///web01-q");
    assert_eq!(e.discard_recovery(q.id).unwrap().state, "starting");
    beat(Vec::new());
    assert!(beat(Vec::new()).recoveries.is_empty(), "never started");
    assert_eq!(e.recoveries(10).unwrap().len(), 4);

    // Another proxy as the mount server: it names each disk, reads from
    // the holder's repository service, and the holder grants it reads of
    // those disks while the recovery lives.
    let h: NewHost = serde_json::from_value(serde_json::json!({
        "name": "kvm2", "roles": ["proxy"], "hypervisor": "qemu:///system"
    }))
    .unwrap();
    e.add_host(&h).unwrap();
    let kvm2 = Engine::host_id(&e.db(), "kvm2").unwrap();
    e.heartbeat(kvm2, &quiet_heartbeat()).unwrap();
    e.db()
        .execute(
            "UPDATE hosts SET addresses = '[\"10.0.0.1\"]', cert_fingerprint = 'aa' WHERE name = 'kvm1'",
            [],
        )
        .unwrap();
    e.db()
        .execute(
            "UPDATE hosts SET cert_fingerprint = 'bb' WHERE name = 'kvm2'",
            [],
        )
        .unwrap();
    let far = |points: &[&str]| {
        e.create_recovery(&RecoveryRequest {
            repository: "vault".into(),
            vm: "web01".into(),
            points: points.iter().map(|p| p.to_string()).collect(),
            on: None,
            proxy: Some("kvm2".into()),
        })
    };
    let bad = far(&[]).unwrap_err();
    assert!(
        bad.message.contains("name the VM's disks"),
        "{}",
        bad.message
    );
    let bad = far(&["web01/vda"]).unwrap_err();
    assert!(
        bad.message.contains("repository service is not running"),
        "{}",
        bad.message
    );
    let serving = Heartbeat {
        service_port: Some(7443),
        ..quiet_heartbeat()
    };
    e.heartbeat(host, &serving).unwrap();
    let r = far(&["web01/vda@2026"]).unwrap();
    assert_eq!(r.proxy, "kvm2");
    let served = |h| {
        e.heartbeat(h, &serving)
            .unwrap()
            .serve
            .into_iter()
            .flat_map(|s| s.grants)
            .filter(|g| g.read)
            .collect::<Vec<_>>()
    };
    let grants = served(host);
    assert_eq!(grants.len(), 1, "{grants:?}");
    assert_eq!(
        (
            grants[0].peer.as_str(),
            grants[0].disk.to_string(),
            grants[0].point.as_deref(),
            grants[0].task
        ),
        ("bb", "web01/vda".to_string(), Some("2026"), r.id)
    );
    let o = e.heartbeat(kvm2, &quiet_heartbeat()).unwrap();
    let start = &o.recoveries[0];
    assert_eq!(start.repository, "", "not a path on kvm2");
    let at = start.service.as_ref().unwrap();
    assert_eq!(
        (at.address.as_str(), at.repository.as_str(), at.replica),
        ("10.0.0.1:7443", "vault", false)
    );
    assert_eq!(start.points, ["web01/vda@2026"]);
    // Ended (kvm2 stopped reporting it): no grant is left.
    e.heartbeat(kvm2, &quiet_heartbeat()).unwrap();
    assert_eq!(e.recovery(r.id).unwrap().state, "failed");
    assert!(served(host).is_empty());
}

/// File requests: checked when asked for, sent once to the proxy holding
/// the repository, a tar request done only with its archive uploaded (by
/// that proxy alone), and failed when the proxy stops reporting it.
#[test]
fn file_requests_go_once_to_the_holding_proxy_and_archives_come_back() {
    use datamover_control::api::{FilesOp, FilesRequest, FilesStatus};
    let (e, dir) = engine();
    let e = e.with_files_dir(dir.path().join("files"));
    for h in ["kvm1", "other"] {
        let h: NewHost =
            serde_json::from_value(serde_json::json!({"name": h, "roles": ["proxy"]})).unwrap();
        e.add_host(&h).unwrap();
    }
    e.add_repository(&api::Repository {
        name: "vault".into(),
        path: "/srv/vault".into(),
        proxy: Some("kvm1".into()),
    })
    .unwrap();
    repo(&e, "shared");
    let host = Engine::host_id(&e.db(), "kvm1").unwrap();
    let other = Engine::host_id(&e.db(), "other").unwrap();
    let beat = |h, st: Vec<FilesStatus>| {
        e.heartbeat(
            h,
            &Heartbeat {
                files: st,
                ..quiet_heartbeat()
            },
        )
        .unwrap()
    };
    beat(host, Vec::new());
    beat(other, Vec::new());
    let ask = |repository: &str, op, paths: &[&str]| {
        e.create_files_job(&FilesRequest {
            repository: repository.into(),
            point: "web01/vda".into(),
            op,
            paths: paths.iter().map(|p| p.to_string()).collect(),
        })
    };
    let bad = ask("shared", FilesOp::Ls, &[]).unwrap_err();
    assert!(
        bad.message.contains("not held by a proxy"),
        "{}",
        bad.message
    );
    assert!(ask("vault", FilesOp::Tar, &[]).is_err());
    assert!(ask("vault", FilesOp::Ls, &["/a", "/b"]).is_err());
    assert!(ask("vault", FilesOp::Ls, &["relative"]).is_err());
    let ls = ask("vault", FilesOp::Ls, &["/sda1/etc"]).unwrap();
    let tar = ask("vault", FilesOp::Tar, &["/sda1/etc"]).unwrap();
    assert_eq!(ls.state, "queued");
    let o = beat(host, Vec::new());
    assert_eq!(o.files.len(), 2);
    assert_eq!(o.files[0].repository, "/srv/vault");
    let running = |id| FilesStatus {
        id,
        done: false,
        entries: None,
        error: None,
    };
    assert!(
        beat(host, vec![running(ls.id), running(tar.id)])
            .files
            .is_empty(),
        "sent once"
    );
    assert_eq!(e.files_job(ls.id).unwrap().state, "running");
    // Only the proxy running a tar request may upload its archive.
    assert_eq!(
        e.files_upload_to(other, tar.id).unwrap_err().kind,
        ErrorKind::Forbidden
    );
    assert!(e.files_upload_to(host, ls.id).is_err(), "ls has no archive");
    let (part, done) = e.files_upload_to(host, tar.id).unwrap();
    std::fs::write(&part, b"tar").unwrap();
    std::fs::rename(&part, &done).unwrap();
    e.files_uploaded(tar.id, 3).unwrap();
    assert_eq!(
        e.files_archive(tar.id).unwrap_err().kind,
        ErrorKind::Conflict,
        "not before the proxy reports it done"
    );
    beat(
        host,
        vec![
            FilesStatus {
                done: true,
                entries: Some(serde_json::json!([{"name": "fstab"}])),
                ..running(ls.id)
            },
            FilesStatus {
                done: true,
                ..running(tar.id)
            },
        ],
    );
    let l = e.files_job(ls.id).unwrap();
    assert_eq!(l.state, "done");
    assert_eq!(l.entries.unwrap()[0]["name"], "fstab");
    let a = e.files_archive(tar.id).unwrap();
    assert_eq!(
        (a.size, std::fs::read(&a.path).unwrap()),
        (3, b"tar".to_vec())
    );
    // A tar request reported done without its archive fails.
    let t2 = ask("vault", FilesOp::Tar, &["/x"]).unwrap();
    beat(host, Vec::new());
    beat(
        host,
        vec![FilesStatus {
            done: true,
            ..running(t2.id)
        }],
    );
    let t2 = e.files_job(t2.id).unwrap();
    assert_eq!(t2.state, "failed");
    assert!(t2.error.unwrap().contains("never uploaded"));
    // One the proxy stops reporting fails.
    let t3 = ask("vault", FilesOp::Ls, &[]).unwrap();
    assert_eq!(beat(host, Vec::new()).files.len(), 1);
    beat(host, Vec::new());
    let t3 = e.files_job(t3.id).unwrap();
    assert!(t3.error.unwrap().contains("no longer runs it"));
}
