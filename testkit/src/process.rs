//! Real processes for tests (qemu-nbd, daemons, our own binaries),
//! stopped by PID on drop, also when the test fails.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use crate::sh;

/// A daemon started with a pid file; stopped on drop.
#[derive(Debug)]
pub struct Daemon {
    pub pid_file: PathBuf,
}
impl Daemon {
    pub fn pid(&self) -> Option<i32> {
        read_pid(&self.pid_file)
    }
    pub fn kill(&self, sig: &str) {
        if let Some(p) = self.pid() {
            let _ = Command::new("kill").arg(sig).arg(p.to_string()).status();
        }
    }
    /// Stop the daemon (if it still runs) and wait until it is gone: it may
    /// hold image locks.
    pub fn stop(self) {
        let pid = self.pid();
        self.kill("-TERM");
        if let Some(p) = pid {
            wait_gone(p, Duration::from_secs(10));
        }
    }
}
impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill("-TERM");
    }
}

/// The pid a pid file holds.
pub fn read_pid(pid_file: &Path) -> Option<i32> {
    std::fs::read_to_string(pid_file).ok()?.trim().parse().ok()
}

/// Wait until process `pid` is gone, up to `timeout`; true if it is.
pub fn wait_gone(pid: i32, timeout: Duration) -> bool {
    let t = Instant::now();
    // A zombie has exited: whoever reaps orphans here may be late. (Its
    // leader alone: a leader shows Z while its other threads still run.)
    let zombie = || {
        let z = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .map(|(_, r)| r.trim_start().starts_with('Z'))
            })
            .unwrap_or(false);
        z && std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, Iterator::count) <= 1
    };
    while Path::new(&format!("/proc/{pid}")).exists() && !zombie() {
        if t.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// Wait (up to 10 s) until `path` exists.
pub fn wait_for(path: &Path) {
    let t = Instant::now();
    while !path.exists() && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(path.exists(), "{} did not appear", path.display());
}

/// A TCP port free on loopback now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// `qemu-nbd --fork` with `args`; stopped by PID on drop.
pub fn qemu_nbd(dir: &Path, args: &[&str]) -> Daemon {
    let pid_file = dir.join(format!("qemu-nbd-{}.pid", free_port()));
    let _ = std::fs::remove_file(&pid_file);
    let mut c = Command::new("qemu-nbd");
    c.arg("--fork")
        .arg(format!("--pid-file={}", pid_file.display()))
        .args(args);
    sh(&mut c);
    wait_for(&pid_file);
    Daemon { pid_file }
}

/// A child process killed (SIGKILL) and reaped on drop.
#[derive(Debug)]
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Poll `f` every 50 ms until it holds; fail after `timeout`, naming `what`.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
