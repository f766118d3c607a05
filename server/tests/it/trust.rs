//! Attacks on a running installation (issue "Trust"), each against real
//! processes: paths outside every datastore, symlinks out of one, the
//! server's own secrets, restores over existing files, hosts posing as
//! proxies, made-up points, and the server's local files.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::{Cluster, bin, dm, make_disk, status};
use datamover::PointId;
use datamover_control::api::{
    AGENT, API, HostAdded, HostPatch, HostRole, Job, NewHost, Orders, Proxy, Receipt, Session,
    State, TaskOrder, TaskResult,
};
use datamover_control::client::{Auth, Client};
use datamover_control::pki::Identity;

const T: Duration = Duration::from_secs(20);

/// A disk of `size` bytes (pattern `seed`) at `images/NAME`, a directory
/// outside every datastore the cluster gives by itself.
fn image(c: &Cluster, name: &str, size: usize, seed: u64) -> std::path::PathBuf {
    let dir = c.path("images");
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join(name);
    make_disk(&img, size, seed);
    img
}

/// Add host `name` with `roles` and `datastores`, and enroll it as its
/// installer would: its identity, and a client of the agent API with it.
fn enroll(
    c: &Cluster,
    name: &str,
    address: &str,
    roles: Vec<HostRole>,
    datastores: Vec<String>,
) -> (Identity, Client) {
    let added = c.add_host(name, address, roles, datastores);
    let dir = c.path(name);
    datamover_proxy::enroll(&c.url, &added.enrollment_token, &dir).unwrap();
    let id = Identity::load(&dir).unwrap();
    let client = Client::new(&c.url, &c.ca_pem, Some(&id), Auth::Certificate, T).unwrap();
    (id, client)
}

/// A heartbeat of a scripted proxy claiming `datastores`.
fn beat(
    client: &Client,
    datastores: &[&str],
) -> Result<Orders, datamover_control::client::ClientError> {
    client.post(
        &format!("{AGENT}/heartbeat"),
        &datamover_control::api::Heartbeat {
            version: "rogue".into(),
            cores: 4,
            datastores: datastores.iter().map(|d| d.to_string()).collect(),
            running: vec![],
            service_port: None,
            serving: vec![],
            vms: None,
            operations: Vec::new(),
            recoveries: Vec::new(),
            files: Vec::new(),
        },
    )
}

/// Heartbeat as a scripted proxy until the server assigns it a task.
fn next_order(c: &Cluster, client: &Client, datastores: &[&str]) -> TaskOrder {
    let t = Instant::now();
    loop {
        if let Some(a) = beat(client, datastores).unwrap().assign.into_iter().next() {
            return a;
        }
        assert!(t.elapsed() < T, "no task for the proxy\n{}", c.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Report `order` done with a made-up point of 1 MiB, and `receipt`.
fn report(client: &Client, order: &TaskOrder, point: &PointId, receipt: Option<Receipt>) {
    let r = TaskResult {
        task: order.task,
        attempt: order.attempt,
        point: Some(point.clone()),
        mode: Some("san".into()),
        bottleneck: Some("source".into()),
        bytes_read: 1 << 20,
        bytes_stored: 1 << 20,
        total: 1 << 20,
        wire_bytes: 0,
        replica: None,
        error: None,
        permanent: false,
        receipt,
        consistency: None,
    };
    let _: Orders = client
        .post(&format!("{AGENT}/tasks/{}/result", order.task), &r)
        .unwrap();
}

/// The session of `job` as it is now (it must not have ended).
fn still_waiting(c: &Cluster, job: &str) -> Session {
    let s: Session = c
        .api()
        .post(&format!("{API}/jobs/{job}/run"), &serde_json::json!({}))
        .unwrap();
    let t = Instant::now();
    loop {
        let now: Session = c.api().get(&format!("{API}/sessions/{}", s.id)).unwrap();
        assert!(!now.state.is_final(), "{job} ran: {now:#?}");
        if now.tasks[0].waiting.is_some() {
            return now;
        }
        assert!(t.elapsed() < T, "{job}: no reason to wait: {now:#?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn hash(p: &std::path::Path) -> String {
    datamover_testkit::hash_file(p)
}

/// Finding 2: the API token cannot make a proxy read or write outside the
/// datastores its administrator gave it, through `..`, symlinks or the
/// server's own files; a restore does not write over an existing file
/// unless the job says so.
#[test]
fn paths_outside_the_datastores_are_refused_and_restores_do_not_overwrite() {
    let _serial = crate::common::serial();
    let c = Cluster::start(&["--heartbeat-ms", "200", "--retry-delay-ms", "100"]);
    let api = c.api();
    let secret = c.path("outside/secret.img");
    std::fs::create_dir_all(secret.parent().unwrap()).unwrap();
    make_disk(&secret, 1 << 20, 3);
    let img = c.ds("disk.img");
    make_disk(&img, 4 << 20, 5);
    let repo = c.path("repo");
    c.dm_repo_add("main", &repo);

    // `..` is refused when the job is created.
    let dotdot = format!("{}/../outside/secret.img", c.ds("").display());
    let (st, m) = status(api.post::<_, Job>(
        &format!("{API}/jobs"),
        &serde_json::json!({"name": "dd", "kind": "backup", "repository": "main",
            "disks": [{"name": "x/dd", "source": dotdot}]}),
    ));
    assert_eq!(st, 400, "{m}");
    assert!(m.contains(".."), "{m}");

    // A symlink in the datastore that points out of it: placed (the path
    // looks inside), refused by the proxy, which resolves it; no point.
    std::os::unix::fs::symlink(&secret, c.ds("link.img")).unwrap();
    c.create_job(
        serde_json::json!({"name": "ln", "kind": "backup", "repository": "main", "retries": 0,
            "disks": [{"name": "x/ln", "source": c.ds("link.img")}]}),
    );
    let s = c.run_job("ln");
    assert_eq!(s.state, State::Failed, "{s:#?}");
    let e = s.tasks[0].error.clone().unwrap();
    assert!(
        e.contains("resolves to") && e.contains("not under a datastore"),
        "{e}"
    );
    if let Ok(r) = datamover::Repository::open(&repo) {
        assert!(r.resolve_point(&"x/ln".parse().unwrap(), None).is_err());
    }

    // The server's CA key: outside every datastore, so no proxy is given
    // the task (the built-in one has only the datastore it was given).
    c.create_job(
        serde_json::json!({"name": "ca", "kind": "backup", "repository": "main",
            "disks": [{"name": "x/ca", "source": c.path("server/ca/ca.key")}]}),
    );
    let s = still_waiting(&c, "ca");
    assert!(
        s.tasks[0].waiting.as_deref().unwrap().contains("sees"),
        "{s:#?}"
    );

    // The disk inside the datastore is backed up.
    c.create_job(
        serde_json::json!({"name": "ok", "kind": "backup", "repository": "main",
            "disks": [{"name": "x/ok", "source": img}]}),
    );
    assert_eq!(c.run_job("ok").state, State::Success);

    // Restores: outside every datastore, never placed; through a symlinked
    // directory, refused; over an existing file, refused without
    // "overwrite" (the file is unchanged), done with it.
    c.create_job(
        serde_json::json!({"name": "r-out", "kind": "restore", "repository": "main",
            "disks": [{"name": "x/ok", "source": c.path("outside/new.img")}]}),
    );
    still_waiting(&c, "r-out");
    std::os::unix::fs::symlink(c.path("outside"), c.ds("escape")).unwrap();
    c.create_job(
        serde_json::json!({"name": "r-ln", "kind": "restore", "repository": "main", "retries": 0,
            "disks": [{"name": "x/ok", "source": c.ds("escape/new.img")}]}),
    );
    let s = c.run_job("r-ln");
    assert_eq!(s.state, State::Failed, "{s:#?}");
    assert!(!c.path("outside/new.img").exists());
    let victim = c.ds("victim.img");
    make_disk(&victim, 4 << 20, 9);
    let before = hash(&victim);
    c.create_job(
        serde_json::json!({"name": "r-ow", "kind": "restore", "repository": "main", "retries": 0,
            "disks": [{"name": "x/ok", "source": victim}]}),
    );
    let s = c.run_job("r-ow");
    assert_eq!(s.state, State::Failed, "{s:#?}");
    assert!(
        s.tasks[0].error.as_deref().unwrap().contains("overwrite"),
        "{s:#?}"
    );
    assert_eq!(hash(&victim), before);
    let out = dm(&c)
        .args([
            "job", "create", "r-ow2", "--kind", "restore", "--repo", "main",
        ])
        .arg("--disk")
        .arg(format!("x/ok={}", victim.display()))
        .arg("--overwrite")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(c.run_job("r-ow2").state, State::Success);
    assert_eq!(hash(&victim), hash(&img));

    // "overwrite" is for restore jobs only.
    let (st, _) = status(api.post::<_, Job>(
        &format!("{API}/jobs"),
        &serde_json::json!({"name": "bo", "kind": "backup", "repository": "main", "overwrite": true,
            "disks": [{"name": "x/bo", "source": img}]}),
    ));
    assert_eq!(st, 400);

    // Finding 7: the data directory is the server's alone.
    let mode = |p: &str| std::fs::metadata(c.path(p)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode("server"), 0o700);
    assert_eq!(mode("server/catalog.sqlite"), 0o600);
    // An id beyond what the catalog stores is a 400, not a 500.
    for id in ["9223372036854775808", "18446744073709551615"] {
        let (st, m) = status(api.get::<Session>(&format!("{API}/sessions/{id}")));
        assert_eq!(st, 400, "{id}: {m}");
    }

    // A server whose built-in proxy would see its own data directory does
    // not start.
    let out = Command::new(bin("dm-server"))
        .arg("--data")
        .arg(c.path("server2"))
        .arg("--datastore")
        .arg(c.path(""))
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("data directory") || err.contains("keys"),
        "{err}"
    );
}

/// Finding 3: an enrolled host without the proxy role gets nothing; a
/// proxy's datastores are the administrator's, never what it claims; a
/// made-up point does not make a session successful.
#[test]
fn a_host_cannot_pose_as_a_proxy_nor_report_a_made_up_point() {
    let _serial = crate::common::serial();
    let c = Cluster::start(&["--heartbeat-ms", "200", "--retry-delay-ms", "100"]);
    let api = c.api();
    // Finding 5: names that would make a host's certificate good for the
    // server, for any name, or for another host are refused.
    for (addresses, why) in [
        (vec!["*.example.com"], "wildcard"),
        (vec!["127.0.0.1"], "server"),
        (vec!["localhost"], "server"),
    ] {
        let (st, m) = status(api.post::<_, HostAdded>(
            &format!("{API}/hosts"),
            &NewHost {
                name: "evil".into(),
                addresses: addresses.iter().map(|a| a.to_string()).collect(),
                roles: vec![],
                datastores: vec![],
                hypervisor: None,
            },
        ));
        assert_eq!(st, 400, "{addresses:?}: {m}");
        assert!(m.contains(why), "{addresses:?}: {m}");
    }
    let (_, rogue) = enroll(&c, "rogue", "127.0.0.9", vec![], vec![]);
    let beat = |datastores: &[&str]| beat(&rogue, datastores);
    // No role: refused.
    let (st, m) = status(beat(&["/"]));
    assert_eq!(st, 403, "{m}");

    // The role, but no datastore from the administrator: claiming "/"
    // gives it none.
    let _: serde_json::Value = api
        .patch(
            &format!("{API}/hosts/rogue"),
            &HostPatch {
                roles: Some(vec![HostRole::Proxy]),
                ..Default::default()
            },
        )
        .unwrap();
    beat(&["/"]).unwrap();
    let ps: Vec<Proxy> = api.get(&format!("{API}/proxies")).unwrap();
    let p = ps.iter().find(|p| p.name == "rogue").unwrap();
    assert!(p.datastores.is_empty(), "{p:?}");
    let img = image(&c, "disk.img", 1 << 20, 1);
    let dir = img.parent().unwrap().display().to_string();
    let repo = c.path("repo");
    datamover::Repository::init(&repo).unwrap();
    let _: serde_json::Value = api
        .post(
            &format!("{API}/repositories"),
            &serde_json::json!({"name": "main", "path": repo}),
        )
        .unwrap();
    c.create_job(
        serde_json::json!({"name": "j", "kind": "backup", "repository": "main", "retries": 0,
            "disks": [{"name": "x/d", "source": img}]}),
    );
    let s = still_waiting(&c, "j");
    let o = beat(&["/"]).unwrap();
    assert!(o.assign.is_empty(), "{o:?}");

    // Given the directory, it gets the task; its made-up point fails it.
    let _: serde_json::Value = api
        .patch(
            &format!("{API}/hosts/rogue"),
            &HostPatch {
                datastores: Some(vec![dir.clone()]),
                ..Default::default()
            },
        )
        .unwrap();
    let order = next_order(&c, &rogue, &["/", &dir]);
    let ps: Vec<Proxy> = api.get(&format!("{API}/proxies")).unwrap();
    let p = ps.iter().find(|p| p.name == "rogue").unwrap();
    assert_eq!(p.datastores, vec![dir.clone()], "{p:?}");
    let point: PointId = "20261130T120000.000Z-abcdef".parse().unwrap();
    report(&rogue, &order, &point, None);
    let end = c.wait_session(s.id, T);
    assert_eq!(end.state, State::Failed, "{end:#?}");
    let e = end.tasks[0].error.clone().unwrap();
    assert!(e.contains("has no point"), "{e}");
}

/// Finding 3, on a repository a proxy holds: a task's success needs the
/// holder's signed receipt for that task's point. A result without one,
/// or with one the reporting host signed itself, fails the attempt; the
/// holder's own signature is accepted.
#[test]
fn a_success_on_a_held_repository_needs_the_holders_receipt() {
    let _serial = crate::common::serial();
    let c = Cluster::start(&["--heartbeat-ms", "200", "--retry-delay-ms", "100"]);
    let api = c.api();
    let img = image(&c, "disk.img", 1 << 20, 1);
    let dir = img.parent().unwrap().display().to_string();
    let (keeper, _) = enroll(&c, "keeper", "127.0.0.11", vec![HostRole::Proxy], vec![]);
    let (rogue_id, rogue) = enroll(
        &c,
        "rogue",
        "127.0.0.12",
        vec![HostRole::Proxy],
        vec![dir.clone()],
    );
    let _: serde_json::Value = api
        .post(
            &format!("{API}/repositories"),
            &serde_json::json!({"name": "vault", "path": c.path("vault"), "proxy": "keeper"}),
        )
        .unwrap();
    c.create_job(
        serde_json::json!({"name": "j", "kind": "backup", "repository": "vault", "retries": 2,
            "proxies": ["rogue"], "disks": [{"name": "x/d", "source": img}]}),
    );
    let s: Session = api
        .post(&format!("{API}/jobs/j/run"), &serde_json::json!({}))
        .unwrap();
    let next_order = || next_order(&c, &rogue, &[&dir]);
    let point: PointId = "20261130T120000.000Z-abcdef".parse().unwrap();
    let disk = "x/d".parse().unwrap();
    let receipt = |by: &Identity, task: u64| {
        Receipt::signed(by, task, "vault", &disk, &point, 1 << 20).unwrap()
    };
    let report = |order: &TaskOrder, rc| report(&rogue, order, &point, rc);
    // No receipt; then one the rogue signed itself: each attempt fails.
    let o = next_order();
    report(&o, None);
    let o = next_order();
    report(&o, Some(receipt(&rogue_id, o.task)));
    let o = next_order();
    // A genuine receipt for another task does not do either.
    report(&o, Some(receipt(&keeper, o.task + 1)));
    let end = c.wait_session(s.id, T);
    assert_eq!(end.state, State::Failed, "{end:#?}");
    let why: Vec<String> = end.tasks[0]
        .attempts
        .iter()
        .map(|a| a.reason.clone())
        .collect();
    assert!(why[0].contains("no receipt from keeper"), "{why:?}");
    assert!(why[1].contains("not signed by keeper"), "{why:?}");
    assert!(
        end.tasks[0]
            .error
            .as_deref()
            .unwrap()
            .contains("not this task's point"),
        "{end:#?}"
    );
    // The holder's signature for this task's point is what counts.
    let s: Session = api
        .post(&format!("{API}/jobs/j/run"), &serde_json::json!({}))
        .unwrap();
    let o = next_order();
    report(&o, Some(receipt(&keeper, o.task)));
    assert_eq!(c.wait_session(s.id, T).state, State::Success);
}

/// The port a proxy's repository service listens at, from its log.
fn service_port(c: &Cluster, proxy: &str) -> u16 {
    let log = std::fs::read_to_string(c.path(&format!("{proxy}.log"))).unwrap();
    let at = log
        .find("(port ")
        .expect("the repository service's port in the log");
    log[at + 6..].split(')').next().unwrap().parse().unwrap()
}

/// Finding 1: a certificate of the installation is not enough to use a
/// repository service. A host's own certificate, taken after its backup
/// ended (no task of it writes there), reads no manifest; after the host
/// is removed, nothing either; the backup itself went through with the
/// server's grant.
#[test]
fn a_stolen_host_certificate_opens_no_repository_service() {
    let _serial = crate::common::serial();
    let mut c = Cluster::start(&[
        "--no-builtin-proxy",
        "--heartbeat-ms",
        "200",
        "--retry-delay-ms",
        "100",
    ]);
    let img = image(&c, "a.raw", 4 << 20, 4);
    c.add_proxy("src", &[img.parent().unwrap()], 2);
    c.add_proxy("tgt", &[], 2);
    let api = c.api();
    let vault = c.path("vault");
    let _: serde_json::Value = api
        .post(
            &format!("{API}/repositories"),
            &serde_json::json!({"name": "vault", "path": vault, "proxy": "tgt"}),
        )
        .unwrap();
    c.create_job(
        serde_json::json!({"name": "b", "kind": "backup", "repository": "vault", "retries": 0,
            "disks": [{"name": "vm/a", "source": img}]}),
    );
    let s = c.run_job("b");
    assert_eq!(s.state, State::Success, "{s:#?}\n{}", c.logs());

    // The source host's certificate, as a thief would copy it.
    let stolen = Identity::load(&c.path("proxy-src")).unwrap();
    let port = service_port(&c, "tgt");
    let store = |id: &Identity| {
        datamover_proxy::repo_service::RemoteStore::new(
            datamover_control::api::ServiceAddress {
                address: format!("127.0.0.3:{port}"),
                server_name: "127.0.0.3".into(),
                repository: "vault".into(),
                replica: false,
                task: None,
            },
            id,
        )
        .unwrap()
    };
    use datamover::Store;
    let disk: datamover::DiskName = "vm/a".parse().unwrap();
    // The grant goes with the holder's next heartbeat answer after the
    // task ended (200 ms here): until then the task's own certificate
    // still reads its disk's newest point.
    let t = Instant::now();
    let e = loop {
        match store(&stolen).latest_meta(&disk) {
            Err(e) => break e,
            Ok(_) => {
                assert!(t.elapsed() < T, "the grant outlived its task");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    assert!(e.to_string().contains("not granted"), "{e}");
    // Removed: the same (and the server no longer knows it at all).
    api.delete(&format!("{API}/hosts/src")).unwrap();
    let e = store(&stolen).latest_meta(&disk).unwrap_err();
    assert!(e.to_string().contains("not granted"), "{e}");
    let r = datamover::Repository::open(&vault).unwrap();
    assert_eq!(r.point_ids(&disk).unwrap().len(), 1);
}

/// A TLS connection to the cluster's server, as a raw HTTP client.
fn tls_to(c: &Cluster) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
    datamover_control::pki::install_crypto();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(datamover_control::pki::cert_der_from_pem(&c.ca_pem).unwrap())
        .unwrap();
    let cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let addr = c.url.trim_start_matches("https://").to_string();
    let tcp = std::net::TcpStream::connect(&addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(cfg), name).unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

/// Whatever the server sends until it closes (or the read times out).
fn read_all(s: &mut impl std::io::Read) -> String {
    let mut out = Vec::new();
    let mut b = [0u8; 4096];
    while let Ok(n) = s.read(&mut b) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&b[..n]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Finding 4: the HTTPS API caps connections in all and per address,
/// drops connections that do not finish TLS, send headers or send their
/// body in time, and refuses an oversized declared body before reading
/// it.
#[test]
fn the_api_cannot_be_held_by_idle_or_slow_clients() {
    use std::io::Write;
    let _serial = crate::common::serial();
    let c = Cluster::start(&[
        "--handshake-timeout-s",
        "1",
        "--header-timeout-s",
        "2",
        "--body-timeout-s",
        "1",
        "--max-connections-per-address",
        "8",
    ]);
    let api = c.api();
    let addr = c.url.trim_start_matches("https://").to_string();
    let hdr = |method: &str, len: u64| {
        format!(
            "{method} {API}/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\ncontent-type: application/json\r\nContent-Length: {len}\r\n\r\n",
            c.token
        )
    };

    // A declared body over the limit: 413 before any of it is sent.
    let mut s = tls_to(&c);
    let t = Instant::now();
    s.write_all(hdr("POST", 1 << 30).as_bytes()).unwrap();
    s.flush().unwrap();
    let answer = read_all(&mut s);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());

    // A body promised and never sent: 408 at the body deadline.
    let mut s = tls_to(&c);
    let t = Instant::now();
    s.write_all(hdr("POST", 100).as_bytes()).unwrap();
    s.write_all(b"{\"name\":").unwrap();
    s.flush().unwrap();
    let answer = read_all(&mut s);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());

    // Headers never sent after TLS: closed at the header deadline.
    let mut s = tls_to(&c);
    let t = Instant::now();
    s.flush().unwrap();
    let _ = s.conn.complete_io(&mut s.sock);
    let _ = read_all(&mut s);
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());

    // Eight connections that never start TLS fill this address's share:
    // the next is closed at once, and they are all dropped at the
    // handshake deadline; then the API answers again.
    let idle: Vec<std::net::TcpStream> = (0..8)
        .map(|_| std::net::TcpStream::connect(&addr).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut extra = std::net::TcpStream::connect(&addr).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let t = Instant::now();
    assert!(read_all(&mut extra).is_empty());
    assert!(
        t.elapsed() < Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );
    for mut i in idle {
        i.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert!(read_all(&mut i).is_empty());
    }
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    let _: Vec<Job> = api.get(&format!("{API}/jobs")).unwrap();
}

/// Finding 6: named tokens with roles, revoked at once, through the CLI
/// and the API; every change and every restore is in the audit log with
/// who made it.
#[test]
fn tokens_have_roles_are_revoked_at_once_and_changes_are_audited() {
    let _serial = crate::common::serial();
    let c = Cluster::start(&["--heartbeat-ms", "200", "--retry-delay-ms", "100"]);
    let admin = c.api();
    let img = c.ds("disk.img");
    make_disk(&img, 1 << 20, 2);
    let repo = c.path("repo");
    c.dm_repo_add("main", &repo);
    c.create_job(
        serde_json::json!({"name": "b", "kind": "backup", "repository": "main",
            "disks": [{"name": "vm/a", "source": img}]}),
    );
    assert_eq!(c.run_job("b").state, State::Success);

    let make = |name: &str, role: &str| -> Client {
        let out = dm(&c)
            .args([
                "token",
                "create",
                name,
                "--role",
                role,
                "--expires-days",
                "7",
                "--json",
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let t: datamover_control::api::TokenCreated = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(t.token.role.as_str(), role);
        assert!(t.token.expires.is_some());
        Client::new(&c.url, &c.ca_pem, None, Auth::Token(t.secret), T).unwrap()
    };
    let ops = make("ops", "operator");
    let aud = make("aud", "auditor");

    // The auditor reads everything, the audit log included, and changes
    // nothing.
    let _: Vec<Job> = aud.get(&format!("{API}/jobs")).unwrap();
    let _: serde_json::Value = aud.get(&format!("{API}/audit")).unwrap();
    let (st, m) = status(
        aud.post::<_, serde_json::Value>(&format!("{API}/jobs/b/run"), &serde_json::json!({})),
    );
    assert_eq!(st, 403, "{m}");
    // The operator runs jobs and restores, nothing else.
    let (st, _) = status(ops.get::<serde_json::Value>(&format!("{API}/tokens")));
    assert_eq!(st, 403);
    let (st, _) = status(ops.get::<serde_json::Value>(&format!("{API}/audit")));
    assert_eq!(st, 403);
    let (st, _) = status(ops.post::<_, serde_json::Value>(
        &format!("{API}/repositories"),
        &serde_json::json!({"name": "x", "path": "/x"}),
    ));
    assert_eq!(st, 403);
    let (st, m) = status(ops.post::<_, Job>(
        &format!("{API}/jobs"),
        &serde_json::json!({"name": "b2", "kind": "backup", "repository": "main",
            "disks": [{"name": "vm/b", "source": img}]}),
    ));
    assert_eq!(st, 403, "{m}");
    let _: Job = ops
        .post(
            &format!("{API}/jobs"),
            &serde_json::json!({"name": "r", "kind": "restore", "repository": "main",
                "disks": [{"name": "vm/a", "source": c.ds("restored.img")}]}),
        )
        .unwrap();
    let s: Session = ops
        .post(&format!("{API}/jobs/r/run"), &serde_json::json!({}))
        .unwrap();
    assert_eq!(c.wait_session(s.id, T).state, State::Success);

    // Revoked: refused at the next call.
    let out = dm(&c).args(["token", "revoke", "ops"]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let (st, m) = status(ops.get::<Vec<Job>>(&format!("{API}/jobs")));
    assert_eq!(st, 401, "{m}");
    // The last administrator token stays.
    let (st, m) = status(admin.delete(&format!("{API}/tokens/admin")));
    assert_eq!(st, 409, "{m}");
    let list = dm(&c).args(["token", "list"]).output().unwrap();
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(
        text.contains("aud") && text.contains("auditor") && !text.contains("ops"),
        "{text}"
    );

    // The audit log: who did what, the refusals too; reads are not in it.
    let log: Vec<datamover_control::api::AuditEntry> =
        aud.get(&format!("{API}/audit?limit=100")).unwrap();
    let has = |who: &str, action: &str, status: u16| {
        log.iter()
            .any(|e| e.who == who && e.action == action && e.status == status)
    };
    assert!(has("token:admin", "POST /api/v1/tokens", 201), "{log:#?}");
    assert!(has("token:ops", "POST /api/v1/jobs/r/run", 201), "{log:#?}");
    assert!(
        has("token:ops", "POST /api/v1/repositories", 403),
        "{log:#?}"
    );
    assert!(has("token:aud", "POST /api/v1/jobs/b/run", 403), "{log:#?}");
    assert!(
        has("token:admin", "DELETE /api/v1/tokens/ops", 204),
        "{log:#?}"
    );
    assert!(log.iter().all(|e| !e.action.starts_with("GET")), "{log:#?}");
    let out = dm(&c).args(["audit", "--limit", "5"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("token:admin"));
}

/// Finding 6: host certificates are short-lived and renewed over the
/// agent channel, by the proxies and by the built-in proxy; both keep
/// working past the end of the certificate they started with.
#[test]
fn host_certificates_are_renewed_before_they_end() {
    let _serial = crate::common::serial();
    let mut c = Cluster::start(&[
        "--heartbeat-ms",
        "200",
        "--retry-delay-ms",
        "100",
        "--host-cert-lifetime-s",
        "12",
        // A proxy whose certificate ended would be declared dead at once.
        "--dead-after-ms",
        "1500",
    ]);
    let img = image(&c, "a.img", 1 << 20, 8);
    c.add_proxy("p1", &[img.parent().unwrap()], 1);
    let cert = c.path("proxy-p1/cert.pem");
    let first = std::fs::read_to_string(&cert).unwrap();
    let (from, until) = datamover_control::pki::validity(&first).unwrap();
    assert!(until - from <= 14, "{from}..{until}");
    // Renewed when a third is left, for a new key.
    let key = std::fs::read_to_string(c.path("proxy-p1/key.pem")).unwrap();
    crate::common::wait_until("renewal", Duration::from_secs(15), || {
        std::fs::read_to_string(&cert).unwrap_or_default() != first
    });
    assert_ne!(
        std::fs::read_to_string(c.path("proxy-p1/key.pem")).unwrap(),
        key
    );
    // The server shows when the renewed certificate ends.
    let hs: Vec<datamover_control::api::Host> = c.api().get(&format!("{API}/hosts")).unwrap();
    let end = hs[0].cert_expires.clone().unwrap();
    let end = chrono::DateTime::parse_from_rfc3339(&end)
        .unwrap()
        .timestamp();
    assert!(end > until, "{end} after {until}");
    // Past the first certificate's end, the proxy and the built-in proxy
    // still heartbeat, and a job runs.
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    };
    while now() <= until + 1 {
        std::thread::sleep(Duration::from_millis(200));
    }
    // Both heartbeat with their renewed certificates (one whose
    // certificate ended is declared dead 1.5 s after, and stays so; a
    // heartbeat late on a busy machine comes back at the next one).
    std::thread::sleep(Duration::from_secs(2));
    let online = || {
        let ps: Vec<Proxy> = c.api().get(&format!("{API}/proxies")).unwrap();
        ["p1", "builtin"].iter().all(|n| {
            ps.iter()
                .any(|p| &p.name == n && p.state == datamover_control::api::ProxyState::Online)
        })
    };
    let t = Instant::now();
    while !online() {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "a proxy is not online past its first certificate's end\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let repo = c.path("repo");
    c.dm_repo_add("main", &repo);
    c.create_job(
        serde_json::json!({"name": "b", "kind": "backup", "repository": "main",
            "proxies": ["p1"], "disks": [{"name": "vm/a", "source": img}]}),
    );
    assert_eq!(c.run_job("b").state, State::Success, "{}", c.logs());
    let _ = c.proxy("p1");
}
