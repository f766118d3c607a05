//! Attaching a frozen disk to the proxy as a local read-only device
//! (HotAdd): a loop device for raw images and LUNs, a local qemu-nbd
//! export for qcow2 (and for internal snapshots). Both detach on drop, on
//! every path.

use std::path::{Path, PathBuf};
use std::process::Command;

use datamover::{Error, Result, TransportKind};

pub(crate) fn run(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd.output().map_err(|e| {
        Error::Unsupported(format!(
            "{what}: cannot run {:?}: {e}; install it on the proxy",
            cmd.get_program()
        ))
    })?;
    if !out.status.success() {
        return Err(Error::transport(
            what,
            TransportKind::Tool,
            format!(
                "{:?} failed ({}): {}",
                cmd.get_program(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A read-only loop device over an image file or block device.
#[derive(Debug)]
pub struct LoopDevice {
    dev: PathBuf,
}

impl LoopDevice {
    /// `losetup -r -f --show PATH`.
    pub fn attach(path: &Path) -> Result<LoopDevice> {
        let dev = run(
            Command::new("losetup")
                .arg("-r")
                .arg("-f")
                .arg("--show")
                .arg(path),
            &format!("attach {} as a loop device", path.display()),
        )?;
        if !dev.starts_with("/dev/") {
            return Err(Error::Internal(format!("losetup printed {dev:?}")));
        }
        Ok(LoopDevice { dev: dev.into() })
    }
    /// The device path.
    pub fn path(&self) -> &Path {
        &self.dev
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        // The reader has closed the device by now; retry briefly in case
        // udev still holds it.
        for _ in 0..50 {
            match Command::new("losetup").arg("-d").arg(&self.dev).status() {
                Ok(s) if s.success() => return,
                _ => std::thread::sleep(std::time::Duration::from_millis(100)),
            }
        }
        tracing::error!(dev = %self.dev.display(), "could not detach the loop device");
    }
}

/// A qemu-nbd process serving an image read-only on a private unix socket.
#[derive(Debug)]
pub struct LocalExport {
    dir: PathBuf,
    pid: Option<i32>,
    uri: String,
}

/// Escape a value for QEMU's `key=value,...` option syntax.
fn opt(v: &Path) -> String {
    v.display().to_string().replace(',', ",,")
}

impl LocalExport {
    /// Serve `path` (format `driver`; `snapshot`: an internal snapshot of
    /// it) read-only. Image locking is off: the VM holds the image, and
    /// the data read is frozen (a backing file or an internal snapshot).
    pub fn start(path: &Path, driver: &str, snapshot: Option<&str>) -> Result<LocalExport> {
        Self::serve(path, driver, snapshot, false)
    }

    /// Serve `path` (format `driver`) writable, with QEMU's image locking
    /// on: an image a running VM holds is refused, not written under it.
    pub fn start_writable(path: &Path, driver: &str) -> Result<LocalExport> {
        Self::serve(path, driver, None, true)
    }

    fn serve(
        path: &Path,
        driver: &str,
        snapshot: Option<&str>,
        writable: bool,
    ) -> Result<LocalExport> {
        let dir = std::env::temp_dir().join(format!("dm-local-{}", super::vm::stamp()));
        std::fs::create_dir(&dir).map_err(|e| Error::io("create", &dir, e))?;
        let mut me = LocalExport {
            uri: format!("nbd+unix:///disk?socket={}", dir.join("nbd.sock").display()),
            dir,
            pid: None,
        };
        let proto = if path.starts_with("/dev/") {
            "host_device"
        } else {
            "file"
        };
        let image = format!(
            "driver={driver},file.driver={proto},file.filename={},file.locking={}",
            opt(path),
            if writable { "on" } else { "off" }
        );
        let mut cmd = Command::new("qemu-nbd");
        cmd.arg("--fork")
            .arg(format!("--pid-file={}", me.dir.join("pid").display()));
        if !writable {
            cmd.arg("-r");
        }
        cmd.args(["-x", "disk", "-k"]).arg(me.dir.join("nbd.sock"));
        if let Some(s) = snapshot {
            cmd.arg("-l").arg(format!("snapshot.name={s}"));
        }
        cmd.arg("--image-opts").arg(image);
        run(&mut cmd, &format!("export {} locally", path.display()))?;
        let pid = std::fs::read_to_string(me.dir.join("pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok());
        if pid.is_none() {
            return Err(Error::Internal("qemu-nbd left no pid file".into()));
        }
        me.pid = pid;
        Ok(me)
    }
    /// The NBD address.
    pub fn uri(&self) -> &str {
        &self.uri
    }
}

/// Whether `pid` has exited but is not reaped yet (a zombie): qemu-nbd
/// daemonizes, so its parent is whatever reaps orphans here, maybe late.
pub(crate) fn exited(pid: i32) -> bool {
    let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next().map(|st| st == "Z"))
        })
        .unwrap_or(false);
    // A leader shows Z while its other threads still run (and hold files).
    zombie && std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, Iterator::count) <= 1
}

impl Drop for LocalExport {
    fn drop(&mut self) {
        if let Some(pid) = self.pid.take() {
            // SAFETY: kill(2) on a pid we started; no memory is involved.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            for _ in 0..200 {
                // SAFETY: as above; signal 0 only checks the process exists.
                if unsafe { libc::kill(pid, 0) } != 0 || exited(pid) {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
