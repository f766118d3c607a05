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
    let h: NewHost = serde_json::from_value(serde_json::json!({"name": "p1"})).unwrap();
    e.add_host(&h).unwrap();
    let host = Engine::host_id(&e.db(), "p1").unwrap();
    let hb = Heartbeat {
        version: "t".into(),
        cores: 2,
        datastores: vec!["/".into()],
        running: Vec::new(),
        service_port: None,
        serving: Vec::new(),
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
