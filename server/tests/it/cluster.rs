//! A server and three proxies as separate processes, on loopback and
//! again as four hosts in network namespaces: twelve disks on three
//! proxies with two slots each; a proxy killed with -9 in the middle of
//! its tasks.

use std::collections::HashMap;
use std::time::Duration;

use crate::common::{Cluster, Net, assert_restores, make_disk, qsd_throttled};
use datamover_control::api::{
    API, Job, JobDisk, JobKind, JobSpec, Proxy, ProxyState, Repository, Session, State,
};
use datamover_server::engine::Occupancy;

const DISKS: usize = 12;
const MIB: usize = 1 << 20;

/// The most intervals of one proxy that overlap at any instant.
fn max_overlap(iv: &[&Occupancy]) -> usize {
    let mut ev: Vec<(f64, i32)> = Vec::new();
    for o in iv {
        ev.push((o.started, 1));
        ev.push((o.ended.unwrap_or(f64::MAX), -1));
    }
    // Ends before starts at the same instant: a freed slot refilled at once.
    ev.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let (mut cur, mut max) = (0i32, 0i32);
    for (_, d) in ev {
        cur += d;
        max = max.max(cur);
    }
    max as usize
}

/// On loopback, then with the server and each proxy a host in its own
/// network namespace (one after the other: two at once would share the
/// two cores and blur the slot timings).
#[test]
fn twelve_disks_on_three_proxies_then_one_killed() {
    let _serial = crate::common::serial();
    twelve_disks(None);
    if crate::common::can_make_namespaces() {
        let net = Net::new("c", &["s", "p1", "p2", "p3"]);
        twelve_disks(Some(&net));
    }
}

fn twelve_disks(net: Option<&Net>) {
    let args = [
        "--no-builtin-proxy",
        "--heartbeat-ms",
        "200",
        "--dead-after-ms",
        "1500",
        "--retry-delay-ms",
        "200",
    ];
    let mut c = match net {
        None => Cluster::start(&args),
        Some(n) => Cluster::start_in(Some(&n.ns[0]), &format!("{}:0", n.addr(1)), &args),
    };
    let images = c.path("images");
    std::fs::create_dir_all(&images).unwrap();
    // Twelve 8 MiB disks, each read through its own 2 MiB/s throttle in
    // one qemu-storage-daemon, so a task lasts a few seconds and slots
    // are seen full.
    let imgs: Vec<_> = (0..DISKS)
        .map(|i| {
            let img = images.join(format!("d{i}.raw"));
            make_disk(&img, 8 * MIB, i as u64 + 1);
            img
        })
        .collect();
    let (qsd, uris) = qsd_throttled(&imgs, &images.join("nbd.sock"), 2 * MIB as u64);
    let disks: Vec<JobDisk> = uris
        .into_iter()
        .enumerate()
        .map(|(i, uri)| JobDisk {
            name: format!("vm{}/disk{}", i / 2, i % 2).parse().unwrap(),
            source: uri,
            disk: None,
            vm_host: None,
            start_as: None,
            point: None,
        })
        .collect();
    for (i, p) in ["p1", "p2", "p3"].into_iter().enumerate() {
        match net {
            None => c.add_proxy(p, &[], 2),
            Some(n) => c.add_proxy_in(Some(&n.ns[i + 1]), &n.addr(i + 2), p, &[], 2),
        }
    }
    let api = c.api();
    let repo = c.path("repo");
    let _: Repository = api
        .post(
            &format!("{API}/repositories"),
            &Repository {
                name: "main".into(),
                path: repo.display().to_string(),
                proxy: None,
            },
        )
        .unwrap();
    let _: Job = api
        .post(
            &format!("{API}/jobs"),
            &JobSpec {
                name: "nightly".into(),
                kind: JobKind::Backup,
                repository: "main".into(),
                disks: disks.clone(),
                proxies: vec![],
                transport: "auto".into(),
                failover_to_network: false,
                retries: 2,
                every_minutes: None,
                overwrite: false,
                quiesce: "auto".into(),
                vms: Vec::new(),
            },
        )
        .unwrap();

    // Run 1: every slot busy while work is queued, never more than 2 per proxy.
    let s: Session = api.post(&format!("{API}/jobs/nightly/run"), &()).unwrap();
    assert_eq!(s.tasks.len(), DISKS);
    let placed_at_once = s.tasks.iter().filter(|t| t.state != State::Queued).count();
    assert_eq!(
        placed_at_once, 6,
        "the run fills all 6 slots at once: {s:#?}"
    );
    let s = c.wait_session(s.id, Duration::from_secs(120));
    assert_eq!(s.state, State::Success, "{s:#?}\n{}", c.logs());
    let tl: Vec<Occupancy> = api
        .get(&format!("{API}/sessions/{}/timeline", s.id))
        .unwrap();
    assert_eq!(tl.len(), DISKS, "one placement per task: {tl:#?}");
    let mut by_proxy: HashMap<&str, Vec<&Occupancy>> = HashMap::new();
    for o in &tl {
        by_proxy.entry(&o.proxy).or_default().push(o);
    }
    assert_eq!(by_proxy.len(), 3, "all three proxies worked: {tl:#?}");
    for (p, iv) in &by_proxy {
        assert!(
            max_overlap(iv) <= 2,
            "proxy {p} ran more than 2 tasks at once: {iv:#?}"
        );
    }
    // While tasks were queued (until the last placement), every freed slot
    // was refilled at once: the result's answer carries the next task.
    let last_start = tl.iter().map(|o| o.started).fold(0.0, f64::max);
    for (p, iv) in &by_proxy {
        for o in iv.iter() {
            let end = o.ended.unwrap();
            if end < last_start {
                let next = iv
                    .iter()
                    .filter(|x| x.started >= end)
                    .map(|x| x.started - end)
                    .fold(f64::MAX, f64::min);
                assert!(
                    next < 0.1,
                    "proxy {p}: slot idle {next:.3}s after task {} while tasks were queued: {tl:#?}",
                    o.task
                );
            }
        }
    }
    for t in &s.tasks {
        assert_eq!(t.mode.as_deref(), Some("nbd"), "{t:#?}");
        assert!(t.point.is_some() && t.attempts.is_empty(), "{t:#?}");
        assert_eq!(t.total, 8 * MIB as u64);
    }
    for (i, d) in disks.iter().enumerate() {
        assert_restores(
            &repo,
            &d.name.to_string(),
            &images.join(format!("d{i}.raw")),
        );
    }

    // Run 2: kill -9 p1 while it moves data; its tasks finish elsewhere.
    let s: Session = api.post(&format!("{API}/jobs/nightly/run"), &()).unwrap();
    // Wait until p1 holds tasks.
    let mut on_p1: Vec<u64> = Vec::new();
    let t = std::time::Instant::now();
    while on_p1.is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "p1 got no task\n{}",
            c.logs()
        );
        let s: Session = api.get(&format!("{API}/sessions/{}", s.id)).unwrap();
        on_p1 = s
            .tasks
            .iter()
            .filter(|t| t.proxy.as_deref() == Some("p1") && t.state == State::Running)
            .map(|t| t.id)
            .collect();
        std::thread::sleep(Duration::from_millis(20));
    }
    c.proxy("p1").kill9();
    let s = c.wait_session(s.id, Duration::from_secs(120));
    assert_eq!(s.state, State::Success, "{s:#?}\n{}", c.logs());
    for t in s.tasks.iter().filter(|t| on_p1.contains(&t.id)) {
        assert_ne!(t.proxy.as_deref(), Some("p1"), "{t:#?}");
        assert!(
            t.attempts
                .iter()
                .any(|a| a.proxy.as_deref() == Some("p1") && a.reason.contains("declared dead")),
            "task {} tells why it moved: {t:#?}",
            t.id
        );
    }
    let ps: Vec<Proxy> = api.get(&format!("{API}/proxies")).unwrap();
    let p1 = ps.iter().find(|p| p.name == "p1").unwrap();
    assert_eq!(p1.state, ProxyState::Dead);
    assert_eq!(p1.running, 0);
    // No half point: exactly one point per run per disk, each complete.
    let r = datamover::Repository::open(&repo).unwrap();
    for (i, d) in disks.iter().enumerate() {
        let ids = r.point_ids(&d.name).unwrap();
        assert_eq!(ids.len(), 2, "{}: {ids:?}", d.name);
        assert_restores(
            &repo,
            &d.name.to_string(),
            &images.join(format!("d{i}.raw")),
        );
    }
    let v = datamover::verify(&r, true).unwrap();
    assert!(v.problems.is_empty(), "{:?}", v.problems);
    drop(qsd);
}
