//! The server alone with its built-in proxy: a job runs on the server
//! itself; every refusal (no token, bad token, no or foreign client
//! certificate, used or bad enrollment token, removed host) and every bad
//! input gets a 4xx with a message; `dm --server` drives it all.

use std::process::Command;
use std::time::Duration;

use crate::common::{Cluster, assert_restores, dm, make_disk, status};
use datamover_control::api::{
    AGENT, API, Heartbeat, Host, HostAdded, HostPatch, HostRole, Job, NewHost, Proxy, Session,
    State,
};
use datamover_control::client::{Auth, Client, ClientError};
use datamover_control::pki::Identity;
use datamover_server::ca::Ca;

const T: Duration = Duration::from_secs(20);

fn heartbeat() -> Heartbeat {
    Heartbeat {
        version: "test".into(),
        cores: 1,
        datastores: vec![],
        running: vec![],
        service_port: None,
        serving: vec![],
        vms: None,
        operations: Vec::new(),
        recoveries: Vec::new(),
        files: Vec::new(),
    }
}

#[test]
fn builtin_proxy_runs_jobs_and_every_refusal_is_a_clear_4xx() {
    let _serial = crate::common::serial();
    let c = Cluster::start(&["--heartbeat-ms", "200", "--retry-delay-ms", "100"]);
    let api = c.api();

    // With no proxy added, the server's built-in proxy moves the data,
    // driven through the dm CLI.
    let img = c.ds("disk.raw");
    make_disk(&img, 8 << 20, 7);
    let repo = c.path("repo");
    c.dm_repo_add("main", &repo);
    let out = dm(&c)
        .args(["job", "create", "j1", "--repo", "main", "--disk"])
        .arg(format!("web/vda={}", img.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = dm(&c)
        .args(["job", "run", "j1", "--wait", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        c.logs()
    );
    let s: Session = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s.state, State::Success);
    assert_eq!(s.tasks[0].proxy.as_deref(), Some("builtin"));
    assert_eq!(s.tasks[0].mode.as_deref(), Some("file"));
    assert_restores(&repo, "web/vda", &img);
    // A failing disk: retried with the reason of each attempt, then failed
    // (exit 1 from dm, the reasons in `dm session show`).
    let _: Job = api
        .post(
            &format!("{API}/jobs"),
            &serde_json::json!({"name": "j2", "kind": "backup", "repository": "main", "retries": 1,
                "disks": [{"name": "web/vdb", "source": c.ds("missing.raw")}]}),
        )
        .unwrap();
    let out = dm(&c)
        .args(["job", "run", "j2", "--wait"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("failed") && text.contains("attempt 1 on builtin"),
        "{text}"
    );
    let s: Session = api.get(&format!("{API}/sessions/2")).unwrap();
    assert_eq!(s.tasks[0].attempts.len(), 2, "{s:#?}");
    assert!(
        s.tasks[0].error.as_deref().unwrap().contains("missing.raw"),
        "{s:#?}"
    );

    // REST API without a token, with a bad one, with a malformed header.
    let anon = Client::new(&c.url, &c.ca_pem, None, Auth::None, T).unwrap();
    let (st, m) = status(anon.get::<Vec<Job>>(&format!("{API}/jobs")));
    assert_eq!(st, 401);
    assert!(m.contains("API token"), "{m}");
    let bad = Client::new(&c.url, &c.ca_pem, None, Auth::Token("dmt1.nope".into()), T).unwrap();
    assert_eq!(status(bad.get::<Vec<Job>>(&format!("{API}/jobs"))).0, 401);
    let out = dm(&c)
        .env("DM_TOKEN", "wrong")
        .args(["job", "list"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not valid"));

    // A client that does not trust the server's CA cannot even talk.
    let other = Ca::load_or_create(&c.path("other-ca"), "other").unwrap();
    let mitm = Client::new(
        &c.url,
        other.cert_pem(),
        None,
        Auth::Token(c.token.clone()),
        T,
    )
    .unwrap();
    assert!(matches!(
        mitm.get::<Vec<Job>>(&format!("{API}/jobs")),
        Err(ClientError::Unreachable { .. })
    ));

    // The agent API: no certificate, a token instead, a foreign certificate.
    let (st, m) =
        status(anon.post::<_, serde_json::Value>(&format!("{AGENT}/heartbeat"), &heartbeat()));
    assert_eq!(st, 401);
    assert!(m.contains("client certificate"), "{m}");
    assert_eq!(
        status(api.post::<_, serde_json::Value>(&format!("{AGENT}/heartbeat"), &heartbeat())).0,
        401
    );
    let foreign = other
        .issue(
            "evil",
            &["127.0.0.1".into()],
            datamover_server::ca::Usage::Host,
        )
        .unwrap();
    let fc = Client::new(&c.url, &c.ca_pem, Some(&foreign), Auth::Certificate, T).unwrap();
    assert!(
        fc.post::<_, serde_json::Value>(&format!("{AGENT}/heartbeat"), &heartbeat())
            .is_err()
    );

    // Enrollment: a good token works once; a reused or invented one does not.
    let added: HostAdded = api
        .post(
            &format!("{API}/hosts"),
            &NewHost {
                name: "h1".into(),
                addresses: vec!["127.0.0.7".into()],
                roles: vec![],
                datastores: vec![],
                hypervisor: None,
            },
        )
        .unwrap();
    let hdir = c.path("h1");
    let (_, id) = datamover_proxy::enroll(&c.url, &added.enrollment_token, &hdir).unwrap();
    let e = datamover_proxy::enroll(&c.url, &added.enrollment_token, &c.path("h1b")).unwrap_err();
    assert_eq!(e.status(), Some(401), "{e}");
    assert!(e.to_string().contains("already used"), "{e}");
    let fake = added.enrollment_token.replacen("dmj1.", "dmj1.00", 1);
    assert_eq!(
        datamover_proxy::enroll(&c.url, &fake, &c.path("h1c"))
            .unwrap_err()
            .status(),
        Some(401)
    );
    // A token naming another CA is refused by the host before it sends anything.
    let wrong_ca = format!("dmj1.abc.{}", other.fingerprint());
    let e = datamover_proxy::enroll(&c.url, &wrong_ca, &c.path("h1d")).unwrap_err();
    assert!(e.to_string().contains("not enrolling"), "{e}");
    // The enrolled host's certificate works on the agent API, but without
    // the proxy role it is no proxy: its heartbeat is refused.
    let hc = Client::new(
        &c.url,
        &id.ca_pem,
        Some(&Identity::load(&hdir).unwrap()),
        Auth::Certificate,
        T,
    )
    .unwrap();
    let (st, m) =
        status(hc.post::<_, serde_json::Value>(&format!("{AGENT}/heartbeat"), &heartbeat()));
    assert_eq!(st, 403, "{m}");
    assert!(m.contains("proxy role"), "{m}");
    // Given the role, it is one, and the built-in one stops taking tasks.
    let _: Host = api
        .patch(
            &format!("{API}/hosts/h1"),
            &HostPatch {
                roles: Some(vec![HostRole::Proxy]),
                ..Default::default()
            },
        )
        .unwrap();
    let _: serde_json::Value = hc
        .post(&format!("{AGENT}/heartbeat"), &heartbeat())
        .unwrap();
    let ps: Vec<Proxy> = api.get(&format!("{API}/proxies")).unwrap();
    assert!(ps.iter().any(|p| p.name == "h1"), "{ps:?}");
    // Removing the host revokes its certificate at once.
    api.delete(&format!("{API}/hosts/h1")).unwrap();
    let (st, m) =
        status(hc.post::<_, serde_json::Value>(&format!("{AGENT}/heartbeat"), &heartbeat()));
    assert_eq!(st, 401);
    assert!(m.contains("belongs to no host"), "{m}");

    // Bad input: each a 4xx with a message, nothing created.
    let cases: Vec<(&str, &str, &[u8], u16, &str)> = vec![
        ("POST", "/jobs", b"{not json", 400, ""),
        ("POST", "/jobs", br#"{"name":"x"}"#, 422, "missing field"),
        ("POST", "/jobs", br#"{"name":"x","kind":"backup","repository":"nope","disks":[{"name":"a/b","source":"/x"}]}"#, 400, "no repository named nope"),
        ("POST", "/jobs", br#"{"name":"../x","kind":"backup","repository":"main","disks":[{"name":"a/b","source":"/x"}]}"#, 400, "not valid"),
        ("POST", "/jobs", br#"{"name":"x","kind":"backup","repository":"main","disks":[]}"#, 400, "at least one disk"),
        ("POST", "/jobs", br#"{"name":"x","kind":"backup","repository":"main","disks":[{"name":"a/b","source":"relative.raw"}]}"#, 400, "absolute path"),
        ("POST", "/jobs", br#"{"name":"x","kind":"backup","repository":"main","disks":[{"name":"a/b","source":"qmp+unix:///s"}]}"#, 400, "name the VM disk"),
        ("POST", "/jobs", br#"{"name":"x","kind":"backup","repository":"main","transport":"warp","disks":[{"name":"a/b","source":"/x"}]}"#, 400, "transport"),
        ("POST", "/jobs", br#"{"name":"x","kind":"teleport","repository":"main","disks":[{"name":"a/b","source":"/x"}]}"#, 422, "kind"),
        ("POST", "/jobs", br#"{"name":"j1","kind":"backup","repository":"main","disks":[{"name":"a/b","source":"/x"}]}"#, 409, "exists"),
        ("POST", "/repositories", br#"{"name":"r","path":"relative"}"#, 400, "absolute"),
        ("POST", "/hosts", br#"{"name":"builtin"}"#, 400, "server's own"),
        ("POST", "/jobs/nope/run", b"", 404, "no job named nope"),
        ("GET", "/sessions/999", b"", 404, "no session"),
        ("GET", "/sessions/abc", b"", 400, "not a number"),
        ("PATCH", "/proxies/builtin", br#"{"slots":0}"#, 400, "slots"),
        ("PATCH", "/proxies/nope", br#"{"slots":2}"#, 404, "no proxy"),
        ("DELETE", "/hosts/nope", b"", 404, "no host"),
        ("GET", "/nothing/here", b"", 404, "no such API path"),
    ];
    for (method, path, body, want, msg) in cases {
        let out = Command::new("curl")
            .args([
                "-s",
                "-o",
                "-",
                "-w",
                "\n%{http_code}",
                "-X",
                method,
                "--cacert",
            ])
            .arg(c.path("server/ca/ca.pem"))
            .args(["-H", &format!("Authorization: Bearer {}", c.token)])
            .args([
                "-H",
                "content-type: application/json",
                "--data-binary",
                "@-",
            ])
            .arg(format!("{}{API}{path}", c.url))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut ch| {
                use std::io::Write;
                ch.stdin.take().unwrap().write_all(body)?;
                ch.wait_with_output()
            })
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let (body, code) = text.rsplit_once('\n').unwrap();
        assert_eq!(code, want.to_string(), "{method} {path}: {body}");
        let err: serde_json::Value = serde_json::from_str(body)
            .unwrap_or_else(|_| panic!("{method} {path}: error body is not JSON: {body}"));
        let m = err["error"].as_str().unwrap();
        assert!(m.contains(msg), "{method} {path}: {m:?} lacks {msg:?}");
    }
    let jobs: Vec<Job> = api.get(&format!("{API}/jobs")).unwrap();
    assert_eq!(jobs.len(), 2, "bad input created nothing");
}
