//! The server and two proxy hosts as separate hosts, each in a network
//! namespace this test creates (a bridge in the server's namespace; the
//! test itself talks to the server as an admin workstation over a veth of
//! its own). On host `a` runs only the installer service: given the proxy
//! role, it fetches `dm-proxy` from the server, checks it and runs it; it
//! upgrades it when the server's package changes and removes it when the
//! role is taken away. Host `b` runs `dm-proxy` started by hand and holds
//! the repositories (its repository service). Backups and a replication
//! cross the namespaces over mutual TLS and restore byte for byte.
//!
//! Needs root and iproute2: outside CI it is skipped without them.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use crate::common::{
    Cluster, Net, Proc, assert_restores, bin, can_make_namespaces, command_in, dm, make_disk,
    wait_until,
};
use datamover_control::api::{
    API, Host, HostAdded, HostRole, Job, JobDisk, JobKind, JobSpec, NewHost, Proxy, ProxyState,
    Repository, Session, State,
};

const MIB: usize = 1 << 20;
const T: Duration = Duration::from_secs(60);

fn host(c: &Cluster, name: &str) -> Host {
    let hs: Vec<Host> = c.api().get(&format!("{API}/hosts")).unwrap();
    hs.into_iter().find(|h| h.name == name).unwrap()
}

/// The installed proxy on host `name`: (sha256, pid) once it runs.
fn deployed(c: &Cluster, name: &str) -> Option<(String, u32)> {
    let h = host(c, name);
    let comp = h
        .installer?
        .report
        .components
        .into_iter()
        .find(|x| x.name == "proxy")?;
    Some((comp.sha256, comp.pid?))
}

fn proxy_online(c: &Cluster, name: &str) -> bool {
    let ps: Vec<Proxy> = c.api().get(&format!("{API}/proxies")).unwrap();
    ps.iter()
        .any(|p| p.name == name && p.state == ProxyState::Online)
}

fn run(c: &Cluster, job: &str) -> Session {
    let s: Session = c.api().post(&format!("{API}/jobs/{job}/run"), &()).unwrap();
    let s = c.wait_session(s.id, T);
    assert_eq!(s.state, State::Success, "{s:#?}\n{}", c.logs());
    s
}

fn alive(pid: u32) -> bool {
    // A zombie is not alive: read its state.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}

fn write_package(path: &Path, bytes: &[u8]) {
    // As a package manager would: a new file renamed over the old.
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[test]
fn hosts_in_namespaces_installer_deploys_upgrades_and_removes_the_proxy() {
    let _serial = crate::common::serial();
    if !can_make_namespaces() {
        return;
    }
    let net = Net::new("n", &["s", "a", "b"]);
    let work = tempfile::tempdir().unwrap();
    let pkg = work.path().join("dm-proxy.pkg");
    let v1 = std::fs::read(bin("dm-proxy")).unwrap();
    write_package(&pkg, &v1);
    let mut c = Cluster::start_in(
        Some(&net.ns[0]),
        &format!("{}:0", net.addr(1)),
        &[
            "--no-builtin-proxy",
            "--heartbeat-ms",
            "200",
            "--dead-after-ms",
            "3000",
            "--retry-delay-ms",
            "200",
            "--proxy-package",
            pkg.to_str().unwrap(),
        ],
    );
    assert!(c.url.contains(&net.addr(1)), "{}", c.url);
    let api = c.api();

    // Host a: one API call with the role and its datastore, then only
    // the installer there.
    let images = c.path("images");
    std::fs::create_dir_all(&images).unwrap();
    let added: HostAdded = api
        .post(
            &format!("{API}/hosts"),
            &NewHost {
                name: "a".into(),
                addresses: vec![net.addr(2)],
                roles: vec![HostRole::Proxy],
                datastores: vec![images.display().to_string()],
                hypervisor: None,
            },
        )
        .unwrap();
    let idir = c.path("installer-a");
    let log = std::fs::File::create(c.path("installer-a.log")).unwrap();
    let installer = command_in(Some(&net.ns[1]), &bin("dm-installer"))
        .arg("run")
        .arg("--dir")
        .arg(&idir)
        .args(["--server", &c.url, "--token", &added.enrollment_token])
        .arg("--datastore")
        .arg(&images)
        .args(["--repo-listen", "off", "--interval-ms", "200"])
        .env("DM_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut installer = Proc {
        child: installer,
        name: "dm-installer".into(),
    };
    let sha1 = datamover_control::pki::fingerprint(&v1);
    wait_until("the installer to deploy the proxy", T, || {
        deployed(&c, "a").is_some_and(|(s, _)| s == sha1) && proxy_online(&c, "a")
    });
    let (_, pid1) = deployed(&c, "a").unwrap();
    let exe1 = idir.join("components/proxy").join(&sha1).join("dm-proxy");
    assert_eq!(std::fs::read(&exe1).unwrap(), v1, "installed bytes differ");

    // Host b: a proxy started by hand, holding the repositories.
    c.add_proxy_in(Some(&net.ns[2]), &net.addr(3), "b", &[], 2);
    for (name, dir) in [("vault", c.path("vault")), ("dr", c.path("dr"))] {
        let _: Repository = api
            .post(
                &format!("{API}/repositories"),
                &Repository {
                    name: name.into(),
                    path: dir.display().to_string(),
                    proxy: Some("b".into()),
                },
            )
            .unwrap();
    }
    let img = images.join("web.raw");
    make_disk(&img, 8 * MIB, 7);
    let disk = JobDisk {
        name: "web/vda".parse().unwrap(),
        source: img.display().to_string(),
        disk: None,
        vm_host: None,
        start_as: None,
        point: None,
    };
    let job = |name: &str, kind: JobKind, repo: &str| JobSpec {
        name: name.into(),
        kind,
        repository: repo.into(),
        disks: vec![disk.clone()],
        proxies: vec!["a".into()],
        transport: "auto".into(),
        failover_to_network: false,
        retries: 0,
        every_minutes: None,
        overwrite: false,
        quiesce: "auto".into(),
        vms: Vec::new(),
    };
    let _: Job = api
        .post(
            &format!("{API}/jobs"),
            &job("nightly", JobKind::Backup, "vault"),
        )
        .unwrap();
    let _: Job = api
        .post(
            &format!("{API}/jobs"),
            &job("rep", JobKind::Replication, "dr"),
        )
        .unwrap();

    // Backup from a (direct access: it sees the datastore) to b's repository
    // service.
    let s = run(&c, "nightly");
    let t = &s.tasks[0];
    assert_eq!(
        (t.proxy.as_deref(), t.mode.as_deref()),
        (Some("a"), Some("file")),
        "{t:#?}"
    );
    assert!(t.wire_bytes.unwrap() > 4 * MIB as u64, "{t:#?}");
    assert_restores(&c.path("vault"), "web/vda", &img);
    // Replication a -> b: the replica on b equals the source.
    let s = run(&c, "rep");
    let replica = s.tasks[0].replica.clone().unwrap();
    assert_eq!(
        std::fs::read(&replica).unwrap(),
        std::fs::read(&img).unwrap()
    );

    // Upgrade: the server's package changes; the installer fetches the
    // new one, checks it, replaces the running proxy and deletes the old.
    let mut v2 = v1.clone();
    v2.extend_from_slice(b"\n# datamover upgrade test: trailing bytes after the ELF image\n");
    write_package(&pkg, &v2);
    let sha2 = datamover_control::pki::fingerprint(&v2);
    wait_until("the installer to upgrade the proxy", T, || {
        deployed(&c, "a").is_some_and(|(s, p)| s == sha2 && p != pid1) && proxy_online(&c, "a")
    });
    let (_, pid2) = deployed(&c, "a").unwrap();
    assert!(!alive(pid1), "the old proxy (pid {pid1}) still runs");
    assert!(!exe1.exists(), "the old package was not removed");
    // The upgraded proxy works: an incremental run after a change.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        f.write_all_at(&[0x3c; 65536], 5 * MIB as u64).unwrap();
    }
    let s = run(&c, "nightly");
    assert_eq!(s.tasks[0].proxy.as_deref(), Some("a"));
    assert_restores(&c.path("vault"), "web/vda", &img);
    let s = run(&c, "rep");
    assert_eq!(
        std::fs::read(s.tasks[0].replica.clone().unwrap()).unwrap(),
        std::fs::read(&img).unwrap()
    );

    // Remove the role with the CLI: the proxy is stopped and deleted, the
    // server forgets it and refuses it.
    let out = dm(&c)
        .args(["host", "set", "a", "--roles", ""])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    wait_until("the installer to remove the proxy", T, || {
        host(&c, "a")
            .installer
            .is_some_and(|i| i.report.components.is_empty())
    });
    assert!(!alive(pid2), "the removed proxy (pid {pid2}) still runs");
    assert!(!idir.join("components/proxy").exists());
    let ps: Vec<Proxy> = api.get(&format!("{API}/proxies")).unwrap();
    assert!(ps.iter().all(|p| p.name != "a"), "{ps:#?}");
    let out = dm(&c).args(["host", "list"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with("a ") && l.contains("nothing")),
        "{text}"
    );
    assert!(
        text.contains(&format!("  datastores: {}", images.display())),
        "{text}"
    );
    // Without a proxy on a, its jobs wait; the installer itself stays.
    assert!(
        installer.child.try_wait().unwrap().is_none(),
        "{}",
        c.logs()
    );
    installer.kill9();
    drop(c);
    drop(net);
}
