//! A cluster of real processes for tests: one `dm-server`, `dm-proxy`
//! processes enrolled with one-time tokens, nbdkit disks. Everything is
//! stopped by PID when the cluster is dropped, also when a test fails.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use datamover_control::api::{self, API, HostAdded, NewHost, Proxy, ProxyPatch, Session};
use datamover_control::client::{Auth, Client, ClientError};
#[allow(unused_imports)] // each test binary uses a different part
pub use datamover_testkit::{Net, Proc, can_make_namespaces, make_disk, wait_until};

/// One test at a time: hold the guard for the test's whole run. A test
/// that failed (panicked) does not block the next.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// A binary of the workspace, next to `dm-server`.
pub fn bin(name: &str) -> PathBuf {
    let server = PathBuf::from(env!("CARGO_BIN_EXE_dm-server"));
    let p = server.with_file_name(name);
    assert!(
        p.exists(),
        "{} is missing: run the tests with `cargo test --workspace` (it builds every binary)",
        p.display()
    );
    p
}

/// `exe` run in network namespace `netns` (`ip netns exec`, which execs:
/// the child's PID is the program's), or here.
pub fn command_in(netns: Option<&str>, exe: &Path) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(exe);
            c
        }
        None => Command::new(exe),
    }
}

pub struct Cluster {
    /// The server's network namespace, if not this one.
    pub netns: Option<String>,
    pub dir: tempfile::TempDir,
    pub server: Proc,
    pub url: String,
    pub token: String,
    pub ca_pem: String,
    pub proxies: Vec<Proc>,
}

impl Cluster {
    /// Start a server on loopback with `args` added to its command line.
    pub fn start(args: &[&str]) -> Cluster {
        Self::start_in(None, "127.0.0.1:0", args)
    }

    /// Start a server in network namespace `netns`, listening at `listen`.
    pub fn start_in(netns: Option<&str>, listen: &str, args: &[&str]) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("server");
        // The built-in proxy's datastore (it has none unless given).
        std::fs::create_dir_all(dir.path().join("ds")).unwrap();
        let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
        let child = command_in(netns, &bin("dm-server"))
            .arg("--data")
            .arg(&data)
            .arg("--datastore")
            .arg(dir.path().join("ds"))
            .args(["--listen", listen])
            .args(args)
            .env("DM_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let server = Proc {
            child,
            name: "dm-server".into(),
        };
        wait_until("server.url", Duration::from_secs(20), || {
            data.join("server.url").exists()
        });
        let url = std::fs::read_to_string(data.join("server.url"))
            .unwrap()
            .trim()
            .to_string();
        let token = std::fs::read_to_string(data.join("admin.token"))
            .unwrap()
            .trim()
            .to_string();
        let ca_pem = std::fs::read_to_string(data.join("ca/ca.pem")).unwrap();
        Cluster {
            netns: netns.map(str::to_string),
            dir,
            server,
            url,
            token,
            ca_pem,
            proxies: Vec::new(),
        }
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// `p` in the built-in proxy's datastore.
    pub fn ds(&self, p: &str) -> PathBuf {
        self.dir.path().join("ds").join(p)
    }

    /// The admin's API client.
    pub fn api(&self) -> Client {
        Client::new(
            &self.url,
            &self.ca_pem,
            None,
            Auth::Token(self.token.clone()),
            Duration::from_secs(30),
        )
        .unwrap()
    }

    /// Add host `name`, start `dm-proxy run` enrolled with its token and
    /// seeing `datastores`; wait until it heartbeats, set its slots.
    /// Each proxy has its own loopback address (127.0.0.2, .3, ...): a
    /// host's certificate names only its own addresses.
    pub fn add_proxy(&mut self, name: &str, datastores: &[&Path], slots: u32) {
        let address = format!("127.0.0.{}", 2 + self.proxies.len());
        self.add_proxy_in(None, &address, name, datastores, slots);
    }

    /// [`Cluster::add_proxy`] on a host in network namespace `netns` at
    /// `address`.
    pub fn add_proxy_in(
        &mut self,
        netns: Option<&str>,
        address: &str,
        name: &str,
        datastores: &[&Path],
        slots: u32,
    ) {
        let api = self.api();
        let added = self.add_host(
            name,
            address,
            vec![api::HostRole::Proxy],
            datastores.iter().map(|d| d.display().to_string()).collect(),
        );
        let state = self.dir.path().join(format!("proxy-{name}"));
        let log = std::fs::File::create(self.dir.path().join(format!("{name}.log"))).unwrap();
        let mut cmd = command_in(netns, &bin("dm-proxy"));
        cmd.arg("--dir")
            .arg(&state)
            .arg("run")
            .args(["--server", &self.url, "--token", &added.enrollment_token])
            .args(["--interval-ms", "200"])
            .args(["--repo-listen", &format!("{address}:0")])
            .arg("--instant-dir")
            .arg(self.dir.path().join(format!("instant-{name}")));
        for d in datastores {
            cmd.arg("--datastore").arg(d);
        }
        let child = cmd
            .env("DM_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.proxies.push(Proc {
            child,
            name: name.into(),
        });
        wait_until(
            &format!("proxy {name} online"),
            Duration::from_secs(20),
            || {
                let ps: Vec<Proxy> = api.get(&format!("{API}/proxies")).unwrap();
                ps.iter()
                    .any(|p| p.name == name && p.state == api::ProxyState::Online)
            },
        );
        let _: Proxy = api
            .patch(
                &format!("{API}/proxies/{name}"),
                &ProxyPatch {
                    slots: Some(slots),
                    ..Default::default()
                },
            )
            .unwrap();
    }

    /// Add host `name` at `address` with `roles` and the datastores its
    /// proxy may use; its one-time enrollment token is in the answer.
    pub fn add_host(
        &self,
        name: &str,
        address: &str,
        roles: Vec<api::HostRole>,
        datastores: Vec<String>,
    ) -> HostAdded {
        self.api()
            .post(
                &format!("{API}/hosts"),
                &NewHost {
                    name: name.into(),
                    addresses: vec![address.into()],
                    roles,
                    datastores,
                    hypervisor: None,
                },
            )
            .unwrap()
    }

    /// `dm repo add NAME PATH` (a repository on shared storage).
    pub fn dm_repo_add(&self, name: &str, path: &Path) {
        dm_ok(self, ["repo", "add", name, &path.display().to_string()]);
    }

    /// Create a job from its JSON spec.
    pub fn create_job(&self, spec: serde_json::Value) -> api::Job {
        self.api().post(&format!("{API}/jobs"), &spec).unwrap()
    }

    /// Run job `job` and wait (a minute at most) until its session ends.
    pub fn run_job(&self, job: &str) -> Session {
        let s: Session = self
            .api()
            .post(&format!("{API}/jobs/{job}/run"), &serde_json::json!({}))
            .unwrap();
        self.wait_session(s.id, Duration::from_secs(60))
    }

    pub fn proxy(&mut self, name: &str) -> &mut Proc {
        self.proxies.iter_mut().find(|p| p.name == name).unwrap()
    }

    /// Poll a session until it ends.
    pub fn wait_session(&self, id: u64, timeout: Duration) -> Session {
        let api = self.api();
        let t = Instant::now();
        loop {
            let s: Session = api.get(&format!("{API}/sessions/{id}")).unwrap();
            if s.state.is_final() {
                return s;
            }
            assert!(
                t.elapsed() < timeout,
                "session {id} still {:?} after {timeout:?}: {s:#?}\n{}",
                s.state,
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The tails of every log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for e in std::fs::read_dir(self.dir.path()).unwrap().flatten() {
            if e.path().extension().is_some_and(|x| x == "log") {
                let s = std::fs::read_to_string(e.path()).unwrap_or_default();
                let tail: Vec<&str> = s.lines().rev().take(15).collect();
                out += &format!("--- {}\n", e.path().display());
                for l in tail.into_iter().rev() {
                    out += l;
                    out += "\n";
                }
            }
        }
        out
    }
}

/// The error status and message of a refused call.
pub fn status<T: std::fmt::Debug>(r: Result<T, ClientError>) -> (u16, String) {
    match r {
        Err(ClientError::Status { status, message }) => (status, message),
        other => panic!("expected an error status, got {other:?}"),
    }
}

/// Run `dm` against the cluster with `args`, asserting it succeeds; its
/// standard output.
pub fn dm_ok<const N: usize>(c: &Cluster, args: [&str; N]) -> Vec<u8> {
    let out = dm(c).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "dm {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// `dm` talking to the cluster's server as its admin.
pub fn dm(c: &Cluster) -> Command {
    let mut cmd = Command::new(bin("dm"));
    cmd.env("DM_SERVER", &c.url)
        .env("DM_TOKEN", &c.token)
        .env("DM_CA", c.path("server/ca/ca.pem"));
    cmd
}

/// One qemu-storage-daemon exporting each image read-only over NBD on
/// the unix socket `sock`, each through its own throttle group limited to
/// `bytes_per_s` of reads, so a task lasts a few seconds. (nbdkit 1.32's
/// rate filter sometimes stopped accepting connections after a reader was
/// killed mid-read; QEMU's throttling does not.) Returns the daemon and
/// one `nbd+unix://` address per image.
pub fn qsd_throttled(images: &[PathBuf], sock: &Path, bytes_per_s: u64) -> (Proc, Vec<String>) {
    let mut cmd = Command::new("qemu-storage-daemon");
    // The NBD server first: exports join it in order.
    cmd.arg("--nbd-server")
        .arg(format!("addr.type=unix,addr.path={}", sock.display()));
    let mut uris = Vec::new();
    for (i, img) in images.iter().enumerate() {
        cmd.arg("--object")
            .arg(format!(
                "throttle-group,id=tg{i},limits.bps-read={bytes_per_s}"
            ))
            .arg("--blockdev")
            .arg(format!(
                "driver=file,filename={},node-name=f{i},read-only=on",
                img.display()
            ))
            .arg("--blockdev")
            .arg(format!(
                "driver=throttle,throttle-group=tg{i},file=f{i},node-name=t{i},read-only=on"
            ))
            .arg("--export")
            .arg(format!("type=nbd,id=e{i},node-name=t{i},name=d{i}"));
        uris.push(format!("nbd+unix:///d{i}?socket={}", sock.display()));
    }
    cmd.stdout(Stdio::null()).stderr(
        std::fs::File::create(sock.with_extension("log"))
            .map_or_else(|_| Stdio::null(), Stdio::from),
    );
    let child = cmd
        .spawn()
        .expect("qemu-storage-daemon (apt install qemu-utils)");
    wait_until(
        "qemu-storage-daemon socket",
        Duration::from_secs(10),
        || sock.exists(),
    );
    (
        Proc {
            child,
            name: "qemu-storage-daemon".into(),
        },
        uris,
    )
}

/// Restore the newest point of `disk` from the repository at `repo` and
/// compare it byte for byte with `original`.
pub fn assert_restores(repo: &Path, disk: &str, original: &Path) {
    let r = datamover::Repository::open(repo).unwrap();
    let d: datamover::DiskName = disk.parse().unwrap();
    let point = r.resolve_point(&d, None).unwrap();
    let size = std::fs::metadata(original).unwrap().len();
    let out = repo.with_file_name(format!("restore-{}", disk.replace('/', "_")));
    let _ = std::fs::remove_file(&out);
    let t = datamover::open_target(&out, size, false).unwrap();
    datamover::restore(&r, &d, &point, &*t, &datamover::RestoreOptions::default()).unwrap();
    drop(t);
    let a = std::fs::read(original).unwrap();
    let b = std::fs::read(&out).unwrap();
    assert!(
        a == b,
        "restore of {disk} differs from {}",
        original.display()
    );
    std::fs::remove_file(&out).unwrap();
}
