//! The installer service of a managed host: it deploys the components
//! the server's roles for this host need, runs them, upgrades them when
//! the server's package changes, and removes them when a role is taken
//! away.
//!
//! It polls the server's agent API (mutual TLS, the host's certificate)
//! with what it has installed; the answer lists each component to run
//! with the SHA-256 and size of the server's package. A component whose
//! installed checksum differs is downloaded from the server, checked
//! (size and SHA-256 of every byte written, else nothing changes),
//! installed beside the old one, switched to, and the old one is stopped
//! and deleted. A component the answer does not list is stopped and
//! deleted.
//!
//! Invariants:
//! * what runs is always `components/<name>/current`, a symlink to a
//!   directory named by the package's SHA-256 that was checked in full;
//! * a failed or partial download leaves only a temporary file, removed
//!   before the next try;
//! * components run as children of the installer (as under a service
//!   manager) and are told to stop (SIGTERM, the kernel's parent-death
//!   signal) when the installer ends, so none is orphaned.
//!
//! State directory (shared with the proxy it runs, which uses the same
//! host identity):
//!
//! ```text
//! <dir>/host.key, host.pem, ca.pem, server.url   identity (see pki)
//! <dir>/components/proxy/<sha256>/dm-proxy       installed package
//! <dir>/components/proxy/current -> <sha256>
//! <dir>/logs/proxy.log                           the component's output
//! ```

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use datamover_control::api::{
    AGENT, COMPONENT_PROXY, ComponentOrder, InstalledComponent, InstallerOrders, InstallerReport,
};
use datamover_control::client::{Client, ClientError};

/// The version of the installer.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The largest package accepted.
pub const MAX_PACKAGE: u64 = 1 << 30;
/// How long a component gets to stop after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// What went wrong while installing or running a component.
#[derive(Debug, thiserror::Error)]
pub enum InstallerError {
    /// The server could not be reached or refused.
    #[error(transparent)]
    Server(#[from] ClientError),
    /// The downloaded package is not the one the server announced.
    #[error(
        "package {name} from the server does not match its checksum: expected {expected_size} bytes with SHA-256 {expected}, got {size} bytes with SHA-256 {got}; nothing was installed"
    )]
    Checksum {
        /// Component.
        name: String,
        /// Announced SHA-256.
        expected: String,
        /// Announced size.
        expected_size: u64,
        /// What came.
        got: String,
        /// Its size.
        size: u64,
    },
    /// A local file operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The server ordered a component this installer does not know.
    #[error("unknown component {0:?} (this installer knows: proxy)")]
    Unknown(String),
}

type Result<T> = std::result::Result<T, InstallerError>;

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> InstallerError {
    let path = path.to_path_buf();
    move |source| InstallerError::Io { what, path, source }
}

/// How an installer runs.
#[derive(Debug, Clone)]
pub struct InstallerConfig {
    /// The server, `https://host:port`.
    pub server: String,
    /// The host's identity (also the proxy's; either renews it).
    pub identity: crate::identity::LiveIdentity,
    /// State directory.
    pub dir: PathBuf,
    /// Poll interval until the server says otherwise.
    pub interval: Duration,
    /// Extra arguments for `dm-proxy run` (datastores, repository
    /// service address).
    pub proxy_args: Vec<String>,
}

/// One component under the installer's care.
#[derive(Debug)]
struct Component {
    name: String,
    child: Option<Child>,
    restarts: u32,
    error: Option<String>,
    /// Do not (re)start or download before this.
    not_before: Instant,
}

impl Component {
    fn new(name: &str) -> Component {
        Component {
            name: name.into(),
            child: None,
            restarts: 0,
            error: None,
            not_before: Instant::now(),
        }
    }

    fn base(dir: &Path, name: &str) -> PathBuf {
        dir.join("components").join(name)
    }

    /// The SHA-256 of the installed package, if one is installed.
    fn installed(&self, dir: &Path) -> Option<String> {
        let base = Self::base(dir, &self.name);
        let target = fs::read_link(base.join("current")).ok()?;
        let sha = target.file_name()?.to_str()?.to_string();
        base.join(&sha)
            .join(binary(&self.name))
            .is_file()
            .then_some(sha)
    }

    fn report(&self, dir: &Path) -> Option<InstalledComponent> {
        let sha = self.installed(dir)?;
        Some(InstalledComponent {
            name: self.name.clone(),
            path: Self::base(dir, &self.name)
                .join(&sha)
                .join(binary(&self.name))
                .display()
                .to_string(),
            sha256: sha,
            pid: self.child.as_ref().map(Child::id),
            restarts: self.restarts,
            error: self.error.clone(),
        })
    }

    /// Stop the running process: SIGTERM, then SIGKILL after the grace.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = child.id() as libc::pid_t;
        // SAFETY: kill(2) on our own child's pid; it is not reaped yet.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let t = Instant::now();
        while t.elapsed() < STOP_GRACE {
            if let Ok(Some(_)) = child.try_wait() {
                tracing::info!("{} (pid {pid}) stopped", self.name);
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        tracing::warn!("{} (pid {pid}) did not stop in time: killed", self.name);
    }

    /// Start the installed package `sha`.
    fn start(&mut self, cfg: &InstallerConfig, sha: &str) -> Result<()> {
        let exe = Self::base(&cfg.dir, &self.name)
            .join(sha)
            .join(binary(&self.name));
        let logs = cfg.dir.join("logs");
        fs::create_dir_all(&logs).map_err(io("create", &logs))?;
        let log_path = logs.join(format!("{}.log", self.name));
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io("open", &log_path))?;
        let err = log.try_clone().map_err(io("open", &log_path))?;
        let mut cmd = Command::new(&exe);
        cmd.arg("run")
            .arg("--dir")
            .arg(&cfg.dir)
            .arg("--server")
            .arg(&cfg.server)
            .args(&cfg.proxy_args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err);
        // SAFETY: prctl is async-signal-safe; nothing else runs between
        // fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(io("start", &exe))?;
        tracing::info!(
            "{} started (pid {}, {})",
            self.name,
            child.id(),
            exe.display()
        );
        self.child = Some(child);
        Ok(())
    }

    /// Download (with `fetch`), check and install `order`; make it
    /// current. Returns the package it replaced, which stays until the
    /// caller has switched processes.
    fn install(
        &self,
        fetch: &mut Fetch<'_>,
        dir: &Path,
        order: &ComponentOrder,
    ) -> Result<Option<String>> {
        let base = Self::base(dir, &self.name);
        fs::create_dir_all(&base).map_err(io("create", &base))?;
        let tmp = base.join(format!(".download-{}", std::process::id()));
        let _ = fs::remove_file(&tmp);
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o755)
            .open(&tmp)
            .map_err(io("create", &tmp))?;
        let got = fetch(&mut f);
        let got = got.and_then(|g| {
            f.sync_all()
                .map_err(|e| ClientError::Config(format!("{}: {e}", tmp.display())))?;
            Ok(g)
        });
        drop(f);
        let (size, sha) = match got {
            Ok(x) => x,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(e.into());
            }
        };
        if size != order.size || sha != order.sha256 {
            let _ = fs::remove_file(&tmp);
            return Err(InstallerError::Checksum {
                name: self.name.clone(),
                expected: order.sha256.clone(),
                expected_size: order.size,
                got: sha,
                size,
            });
        }
        let old = self.installed(dir);
        let dest_dir = base.join(&sha);
        fs::create_dir_all(&dest_dir).map_err(io("create", &dest_dir))?;
        let dest = dest_dir.join(binary(&self.name));
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755)).map_err(io("chmod", &tmp))?;
        fs::rename(&tmp, &dest).map_err(io("install", &dest))?;
        let link_tmp = base.join(".current.tmp");
        let _ = fs::remove_file(&link_tmp);
        std::os::unix::fs::symlink(&sha, &link_tmp).map_err(io("link", &link_tmp))?;
        fs::rename(&link_tmp, base.join("current")).map_err(io("switch", &base))?;
        File::open(&base)
            .and_then(|d| d.sync_all())
            .map_err(io("sync", &base))?;
        tracing::info!(
            "{} {} installed ({size} bytes, checksum verified)",
            self.name,
            &sha[..12]
        );
        Ok(old.filter(|o| *o != sha))
    }

    /// Stop and delete everything of this component.
    fn remove(&mut self, dir: &Path) -> Result<()> {
        self.stop();
        let base = Self::base(dir, &self.name);
        if base.exists() {
            fs::remove_dir_all(&base).map_err(io("remove", &base))?;
            tracing::info!("{} removed", self.name);
        }
        self.restarts = 0;
        self.error = None;
        Ok(())
    }

    /// Follow the server's order for this component (`None`: remove it).
    fn apply(&mut self, cfg: &InstallerConfig, client: &Client, order: Option<&ComponentOrder>) {
        let Some(order) = order else {
            if self.installed(&cfg.dir).is_some() || self.child.is_some() {
                if let Err(e) = self.remove(&cfg.dir) {
                    tracing::warn!("{e}");
                    self.error = Some(e.to_string());
                }
            }
            return;
        };
        if self.installed(&cfg.dir).as_deref() != Some(order.sha256.as_str()) {
            if Instant::now() < self.not_before {
                return;
            }
            let mut fetch = |w: &mut dyn std::io::Write| {
                client.download(&order.url, w, order.size.min(MAX_PACKAGE) + 1)
            };
            match self.install(&mut fetch, &cfg.dir, order) {
                Ok(old) => {
                    self.error = None;
                    self.restarts = 0;
                    self.stop();
                    if let Some(old) = old {
                        let p = Self::base(&cfg.dir, &self.name).join(old);
                        if let Err(e) = fs::remove_dir_all(&p) {
                            tracing::warn!("cannot remove the old package {}: {e}", p.display());
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!("installing {}: {e}", self.name);
                    self.error = Some(e.to_string());
                    self.not_before = Instant::now() + Duration::from_secs(5);
                    return;
                }
            }
        }
        self.supervise(cfg);
    }

    /// Keep the installed component running; restarts back off.
    fn supervise(&mut self, cfg: &InstallerConfig) {
        if let Some(c) = self.child.as_mut() {
            match c.try_wait() {
                Ok(None) => return,
                Ok(Some(status)) => {
                    self.restarts += 1;
                    let wait = Duration::from_secs(1 << self.restarts.min(6));
                    let msg = format!("{} exited ({status}); restarting in {wait:?}", self.name);
                    tracing::warn!("{msg}");
                    self.error = Some(msg);
                    self.not_before = Instant::now() + wait;
                    self.child = None;
                }
                Err(e) => {
                    tracing::warn!("{}: {e}", self.name);
                    return;
                }
            }
        }
        if self.child.is_some() || Instant::now() < self.not_before {
            return;
        }
        if let Some(sha) = self.installed(&cfg.dir) {
            if let Err(e) = self.start(cfg, &sha) {
                tracing::warn!("{e}");
                self.error = Some(e.to_string());
                self.not_before = Instant::now() + Duration::from_secs(5);
            }
        }
    }
}

/// Writes a package into the writer; returns its length and SHA-256.
type Fetch<'a> =
    dyn FnMut(&mut dyn std::io::Write) -> std::result::Result<(u64, String), ClientError> + 'a;

/// The file name of a component's package once installed.
fn binary(component: &str) -> &'static str {
    match component {
        COMPONENT_PROXY => "dm-proxy",
        _ => "component",
    }
}

/// Run the installer until `stop` is set; then stop what it runs (the
/// installed packages stay). Errors reaching the server are logged and
/// retried.
pub fn run(cfg: &InstallerConfig, stop: &AtomicBool) -> Result<()> {
    let mut client = Client::for_host(&cfg.server, &cfg.identity.get())?;
    let mut proxy = Component::new(COMPONENT_PROXY);
    let mut interval = cfg.interval;
    let mut failures = 0u32;
    while !stop.load(Ordering::Relaxed) {
        let report = InstallerReport {
            version: VERSION.into(),
            components: proxy.report(&cfg.dir).into_iter().collect(),
        };
        match client.post::<_, InstallerOrders>(&format!("{AGENT}/installer"), &report) {
            Ok(o) => {
                failures = 0;
                interval = Duration::from_millis(o.interval_ms.clamp(50, 600_000));
                if let Some(unknown) = o.components.iter().find(|c| c.name != COMPONENT_PROXY) {
                    tracing::warn!("{}", InstallerError::Unknown(unknown.name.clone()));
                }
                let order = o.components.iter().find(|c| c.name == COMPONENT_PROXY);
                proxy.apply(cfg, &client, order);
                // Renew the host's certificate when it is due (or adopt
                // the proxy's renewal).
                cfg.identity.keep_fresh(&cfg.server, &mut client);
            }
            Err(e) => {
                failures += 1;
                if failures == 1 || failures % 30 == 0 {
                    tracing::warn!("cannot reach the server ({failures} in a row): {e}");
                }
                // Keep what runs running while the server is away.
                proxy.supervise(cfg);
            }
        }
        let until = Instant::now() + interval;
        while Instant::now() < until && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50).min(interval));
        }
    }
    proxy.stop();
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn fetch_of(
        bytes: &[u8],
    ) -> impl FnMut(&mut dyn std::io::Write) -> std::result::Result<(u64, String), ClientError> + '_
    {
        move |w| {
            w.write_all(bytes).unwrap();
            Ok((
                bytes.len() as u64,
                datamover_control::pki::fingerprint(bytes),
            ))
        }
    }

    fn order(bytes: &[u8]) -> ComponentOrder {
        ComponentOrder {
            name: COMPONENT_PROXY.into(),
            sha256: datamover_control::pki::fingerprint(bytes),
            size: bytes.len() as u64,
            url: "/agent/v1/components/proxy".into(),
        }
    }

    /// A package that is not the announced one is refused and leaves
    /// nothing behind; a good one becomes current, and an upgrade names
    /// the package it replaced.
    #[test]
    fn checksums_guard_every_install() {
        let d = tempfile::tempdir().unwrap();
        let c = Component::new(COMPONENT_PROXY);
        let good = b"#!/bin/sh\nexit 0\n".to_vec();
        let mut bad = good.clone();
        bad[3] ^= 1;
        let e = c
            .install(&mut fetch_of(&bad), d.path(), &order(&good))
            .unwrap_err();
        assert!(matches!(e, InstallerError::Checksum { .. }), "{e}");
        assert!(e.to_string().contains("nothing was installed"), "{e}");
        assert_eq!(c.installed(d.path()), None);
        let base = Component::base(d.path(), COMPONENT_PROXY);
        assert_eq!(
            std::fs::read_dir(&base).unwrap().count(),
            0,
            "a temporary file was left"
        );
        // Short by one byte: also refused.
        let e = c
            .install(
                &mut fetch_of(&good[..good.len() - 1]),
                d.path(),
                &order(&good),
            )
            .unwrap_err();
        assert!(matches!(e, InstallerError::Checksum { .. }), "{e}");

        assert_eq!(
            c.install(&mut fetch_of(&good), d.path(), &order(&good))
                .unwrap(),
            None
        );
        let sha = datamover_control::pki::fingerprint(&good);
        assert_eq!(c.installed(d.path()).as_deref(), Some(sha.as_str()));
        let exe = base.join(&sha).join("dm-proxy");
        assert_eq!(std::fs::read(&exe).unwrap(), good);
        assert_eq!(
            std::fs::metadata(&exe).unwrap().permissions().mode() & 0o777,
            0o755
        );

        let newer = b"#!/bin/sh\nexit 1\n".to_vec();
        let old = c
            .install(&mut fetch_of(&newer), d.path(), &order(&newer))
            .unwrap();
        assert_eq!(old.as_deref(), Some(sha.as_str()));
        assert_eq!(
            c.installed(d.path()),
            Some(datamover_control::pki::fingerprint(&newer))
        );
    }
}
