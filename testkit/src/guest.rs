//! Real Linux guests for tests: a small Debian image built once per run
//! (`testkit/guest/build-image.sh`, cached under the target directory and
//! rebuilt when the script changes), booted under `qemu-system-x86_64`
//! with a QMP socket and a guest-agent socket, commands run inside
//! (`guest-exec`), and the QEMU process always stopped by PID.
//!
//! KVM is used only when `/dev/kvm` is writable and the CPU shows VT-x or
//! AMD-V; otherwise TCG (`-accel tcg -cpu max`). A missing accelerator is
//! never a skip.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};

use crate::sh;

/// Tools a guest test needs (for [`crate::can_run`]).
pub const GUEST_TOOLS: &[&str] = &[
    "qemu-system-x86_64",
    "qemu-img",
    "debootstrap",
    "busybox",
    "flock",
];

/// The write load's SQLite database in the guest.
pub const GUEST_DB: &str = "/var/lib/dm-load/load.db";

/// The guest image: kernel, initramfs and root disk (qcow2, ext4).
#[derive(Debug)]
pub struct GuestImage {
    /// Directory holding `vmlinuz`, `initrd.img` and `root.qcow2`.
    pub dir: PathBuf,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/build-image.sh")
}

/// FNV-1a, for the recipe's stamp.
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl GuestImage {
    /// The image, built on first use in this run (or reused from an
    /// earlier run of the same recipe). `DM_GUEST_IMAGE` names another
    /// directory.
    pub fn get() -> &'static GuestImage {
        static IMAGE: OnceLock<GuestImage> = OnceLock::new();
        IMAGE.get_or_init(|| {
            let dir = std::env::var_os("DM_GUEST_IMAGE").filter(|d| !d.is_empty()).map_or_else(
                || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/guest-image"),
                PathBuf::from,
            );
            let recipe = std::fs::read(script()).expect("read build-image.sh");
            let stamp = format!("{:016x}", fnv(&recipe));
            std::fs::create_dir_all(dir.parent().expect("parent")).expect("mkdir");
            // Test binaries run at once: one builds, the others wait on the lock.
            let lock = dir.with_extension("lock");
            let t = Instant::now();
            let script = format!(
                "[ \"$(cat '{d}/stamp' 2>/dev/null)\" = {stamp} ] && exit 0; bash '{s}' '{d}' && echo {stamp} >'{d}/stamp'",
                d = dir.display(),
                s = script().display()
            );
            sh(Command::new("flock")
                .arg(&lock)
                .args(["bash", "-c", &script]));
            if t.elapsed() > Duration::from_secs(5) {
                eprintln!(
                    "guest image ready in {:.0} s: {}",
                    t.elapsed().as_secs_f64(),
                    dir.display()
                );
            }
            GuestImage { dir }
        })
    }

    /// A fresh copy of the root disk as `to` (qcow2).
    pub fn copy_disk(&self, to: &Path) {
        sh(Command::new("cp")
            .arg("--sparse=always")
            .arg(self.dir.join("root.qcow2"))
            .arg(to));
    }
}

/// `(accelerator, cpu)`: KVM only with real VT-x/AMD-V.
pub fn accel() -> (&'static str, &'static str) {
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let vt = std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| {
        c.lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
    });
    if kvm && vt {
        ("kvm", "host")
    } else {
        ("tcg", "max")
    }
}

/// A running guest: stopped (QMP `quit`, then SIGKILL by PID) on drop.
#[derive(Debug)]
pub struct Guest {
    /// Its name (file names in `dir`).
    pub name: String,
    /// Where its sockets, pid file and serial log live.
    pub dir: PathBuf,
    /// The QMP socket.
    pub qmp: PathBuf,
    /// The host side of the guest-agent channel.
    pub qga: PathBuf,
    /// The serial console log.
    pub serial: PathBuf,
    pid_file: PathBuf,
    /// A libvirt domain (qemu:///system): reached through `virsh`.
    pub domain: Option<String>,
}

/// A guest's root disk: the image file and its format.
pub fn disk_args(image: &Path, format: &str) -> Vec<String> {
    vec![
        "-blockdev".into(),
        format!("driver=file,node-name=file0,filename={}", image.display()),
        "-blockdev".into(),
        format!("driver={format},node-name=disk0,file=file0"),
    ]
}

impl Guest {
    /// Boot a guest from `image` (`format` qcow2 or raw) with an agent.
    pub fn boot(dir: &Path, name: &str, image: &Path, format: &str) -> Guest {
        Guest::boot_with(dir, name, &disk_args(image, format), true)
    }

    /// Boot a guest whose root disk is the block node `disk0` that
    /// `blockdev` defines; without `agent` it has no guest-agent channel.
    /// Waits (up to 180 s) for the agent to answer, or with no agent for
    /// the guest's init to report on the console.
    pub fn boot_with(dir: &Path, name: &str, blockdev: &[String], agent: bool) -> Guest {
        let img = GuestImage::get();
        let g = Guest::named(dir, name);
        for p in [&g.qmp, &g.qga, &g.serial, &g.pid_file] {
            let _ = std::fs::remove_file(p);
        }
        let (acc, cpu) = accel();
        let mut c = Command::new("qemu-system-x86_64");
        c.args(["-accel", acc, "-cpu", cpu, "-m", "512", "-smp", "1"])
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .arg("-serial")
            .arg(format!("file:{}", g.serial.display()))
            .arg("-kernel")
            .arg(img.dir.join("vmlinuz"))
            .arg("-initrd")
            .arg(img.dir.join("initrd.img"))
            .args([
                "-append",
                "root=/dev/vda rw console=ttyS0 init=/sbin/ga-init quiet",
            ])
            .args(blockdev)
            .args(["-device", "virtio-blk-pci,drive=disk0,id=vblk0"])
            .args(["-device", "virtio-serial-pci,id=vser0"]);
        if agent {
            c.arg("-chardev")
                .arg(format!(
                    "socket,id=qga0,path={},server=on,wait=off",
                    g.qga.display()
                ))
                .args([
                    "-device",
                    "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0",
                ]);
        }
        c.arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", g.qmp.display()))
            .arg("-pidfile")
            .arg(&g.pid_file)
            .arg("-daemonize");
        sh(&mut c);
        let t = Instant::now();
        loop {
            assert!(
                g.pid()
                    .is_some_and(|p| Path::new(&format!("/proc/{p}")).exists()),
                "{name}: QEMU exited; console: {}",
                g.console()
            );
            let up = if agent {
                g.try_agent("guest-ping", json!({}), Duration::from_secs(1))
                    .is_ok()
            } else {
                g.console().contains("ga-init:")
            };
            if up {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(180),
                "{name}: no answer in 180 s; console: {}",
                g.console()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        eprintln!("{name} ({acc}) up in {:.1} s", t.elapsed().as_secs_f64());
        g
    }

    /// The QEMU process id.
    pub fn pid(&self) -> Option<i32> {
        crate::read_pid(&self.pid_file)
    }

    /// The console log so far.
    pub fn console(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    /// Define and start the guest as a libvirt domain (`type='qemu'`
    /// under TCG, `kvm` with VT-x/AMD-V) on `qemu:///system`, with
    /// libvirt's guest-agent channel; waits until its agent answers.
    /// `dir` must be readable by libvirt's QEMU user. `data` are more
    /// qcow2 disks (`vdb`, `vdc`, ...).
    pub fn libvirt(dir: &Path, name: &str, image: &Path, format: &str, data: &[&Path]) -> Guest {
        let img = GuestImage::get();
        let (acc, _) = accel();
        let serial = dir.join(format!("{name}.log"));
        // libvirt's QEMU user must reach the kernel: the image directory may
        // lie under a directory it cannot enter (/root), `dir` does not.
        for f in ["vmlinuz", "initrd.img"] {
            std::fs::copy(img.dir.join(f), dir.join(f)).expect("copy the guest kernel");
        }
        let xml = format!(
            "<domain type='{dtype}'><name>{name}</name><memory unit='MiB'>512</memory><vcpu>1</vcpu>\
             <os><type arch='x86_64' machine='pc'>hvm</type><kernel>{k}</kernel><initrd>{i}</initrd>\
             <cmdline>root=/dev/vda rw console=ttyS0 init=/sbin/ga-init quiet</cmdline></os>\
             <cpu mode='{cpu}'/><devices><emulator>/usr/bin/qemu-system-x86_64</emulator>\
             <disk type='file' device='disk'><driver name='qemu' type='{format}'/><source file='{d}'/><target dev='vda' bus='virtio'/></disk>\
             {extra}<channel type='unix'><source mode='bind'/><target type='virtio' name='org.qemu.guest_agent.0'/></channel>\
             <serial type='file'><source path='{s}'/><target port='0'/></serial></devices></domain>",
            k = dir.join("vmlinuz").display(),
            i = dir.join("initrd.img").display(),
            dtype = if acc == "kvm" { "kvm" } else { "qemu" },
            cpu = if acc == "kvm" {
                "host-passthrough"
            } else {
                "maximum"
            },
            d = image.display(),
            s = serial.display(),
            extra = data
                .iter()
                .zip(b'b'..)
                .map(|(p, c)| format!(
                    "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{}'/><target dev='vd{}' bus='virtio'/></disk>",
                    p.display(),
                    char::from(c)
                ))
                .collect::<String>(),
        );
        let xml_file = dir.join(format!("{name}.xml"));
        std::fs::write(&xml_file, xml).expect("write domain XML");
        let g = Guest::of_domain(dir, name);
        let _ = virsh(&["destroy", name]);
        let _ = virsh(&["undefine", name, "--checkpoints-metadata"]);
        sh(Command::new("virsh")
            .args(["-c", "qemu:///system", "define"])
            .arg(&xml_file));
        sh(Command::new("virsh").args(["-c", "qemu:///system", "start", name]));
        let t = Instant::now();
        while g
            .try_agent("guest-ping", json!({}), Duration::from_secs(1))
            .is_err()
        {
            assert!(
                t.elapsed() < Duration::from_secs(180),
                "{name}: no answer in 180 s; console: {}",
                g.console()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
        eprintln!(
            "{name} (libvirt, {acc}) up in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        g
    }

    /// The handle of libvirt domain `name` (console log `dir/NAME.log`).
    fn of_domain(dir: &Path, name: &str) -> Guest {
        Guest {
            name: name.into(),
            dir: dir.to_path_buf(),
            qmp: PathBuf::new(),
            qga: PathBuf::new(),
            serial: dir.join(format!("{name}.log")),
            pid_file: PathBuf::new(),
            domain: Some(name.into()),
        }
    }

    /// The files of a QEMU guest `name` in `dir`.
    fn named(dir: &Path, name: &str) -> Guest {
        Guest {
            name: name.into(),
            dir: dir.to_path_buf(),
            qmp: dir.join(format!("{name}.qmp")),
            qga: dir.join(format!("{name}.qga")),
            serial: dir.join(format!("{name}.log")),
            pid_file: dir.join(format!("{name}.pid")),
            domain: None,
        }
    }

    /// A QEMU something else started with this kit's file names in `dir`
    /// (`NAME.qmp`, `NAME.qga`, `NAME.log`, `NAME.pid`): waits until its
    /// agent answers; stopped on drop.
    pub fn attach(dir: &Path, name: &str) -> Guest {
        let g = Guest::named(dir, name);
        crate::wait_until(&format!("{name}'s agent"), Duration::from_secs(180), || {
            g.try_agent("guest-ping", json!({}), Duration::from_secs(1))
                .is_ok()
        });
        g
    }

    /// A libvirt domain something else started: waits until its agent
    /// answers; destroyed and undefined on drop.
    pub fn libvirt_running(dir: &Path, name: &str) -> Guest {
        let g = Guest::of_domain(dir, name);
        crate::wait_until(&format!("{name}'s agent"), Duration::from_secs(180), || {
            g.try_agent("guest-ping", json!({}), Duration::from_secs(1))
                .is_ok()
        });
        g
    }

    /// Write `mib` MiB of random bytes to `path` (a file or a disk) and
    /// sync: the sha256 of what was written.
    pub fn write_random(&self, path: &str, mib: u32) -> String {
        self.sh(&format!(
            "dd if=/dev/urandom of={path} bs=1M count={mib} status=none && sync && head -c {} {path} | sha256sum | cut -d' ' -f1",
            u64::from(mib) << 20
        ))
    }

    /// Check the guest's database (the write load's): SQLite's
    /// integrity check says `ok`, and it holds at least the rows its
    /// freeze hook logged before the last freeze, and `min_rows`, and one.
    /// Returns (rows, rows logged at the freeze).
    pub fn check_database(&self, min_rows: u64) -> (u64, u64) {
        assert_eq!(
            self.sh(&format!(
                "sqlite3 -cmd '.timeout 10000' {GUEST_DB} 'PRAGMA integrity_check'"
            )),
            "ok",
            "{}: database",
            self.name
        );
        let n: u64 = self
            .sh(&format!(
                "sqlite3 -cmd '.timeout 10000' {GUEST_DB} 'SELECT count(*) FROM t'"
            ))
            .parse()
            .expect("a row count");
        let logged: u64 = self
            .sh("cat /var/lib/dm-load/rows-at-freeze 2>/dev/null || echo 0")
            .parse()
            .expect("a row count");
        assert!(
            n >= logged.max(min_rows) && n > 0,
            "{}: {n} rows, but the guest had committed {logged} (hook) / {min_rows} before the freeze",
            self.name
        );
        (n, logged)
    }

    /// The VM address `dm` takes: QMP with the agent, or the domain.
    pub fn spec(&self) -> String {
        if let Some(d) = &self.domain {
            return format!("libvirt:///{d}");
        }
        format!(
            "qmp+unix://{}?agent={}",
            self.qmp.display(),
            self.qga.display()
        )
    }

    /// Run a QMP command; panics on an error answer.
    pub fn qmp(&self, cmd: &str, args: Value) -> Value {
        let s = UnixStream::connect(&self.qmp).expect("connect QMP");
        s.set_read_timeout(Some(Duration::from_secs(60))).ok();
        let mut r = BufReader::new(s.try_clone().expect("clone"));
        let mut w = s;
        let mut line = String::new();
        let mut next = |r: &mut BufReader<UnixStream>| loop {
            line.clear();
            r.read_line(&mut line).expect("read QMP");
            let v: Value = serde_json::from_str(&line).expect("QMP JSON");
            if v.get("event").is_none() {
                return v;
            }
        };
        next(&mut r);
        writeln!(w, "{}", json!({"execute": "qmp_capabilities"})).expect("write");
        next(&mut r);
        writeln!(w, "{}", json!({"execute": cmd, "arguments": args})).expect("write");
        let v = next(&mut r);
        assert!(v.get("error").is_none(), "QMP {cmd}: {v}");
        v["return"].clone()
    }

    /// Run an agent command with a deadline; the agent's error answer or
    /// no answer is `Err`.
    pub fn try_agent(&self, cmd: &str, args: Value, timeout: Duration) -> Result<Value, String> {
        if let Some(d) = &self.domain {
            let out = virsh(&[
                "qemu-agent-command",
                d,
                &json!({"execute": cmd, "arguments": args}).to_string(),
                "--timeout",
                &timeout.as_secs().max(1).to_string(),
            ])?;
            let v: Value = serde_json::from_str(&out).map_err(|e| e.to_string())?;
            return v
                .get("return")
                .cloned()
                .ok_or_else(|| v["error"]["desc"].as_str().unwrap_or("error").to_string());
        }
        let s = UnixStream::connect(&self.qga).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        let mut r = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
        let mut w = s;
        let id = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64 % (1 << 40));
        let mut sync = vec![0xffu8];
        sync.extend(
            json!({"execute": "guest-sync-delimited", "arguments": {"id": id}})
                .to_string()
                .bytes(),
        );
        sync.push(b'\n');
        w.write_all(&sync).map_err(|e| e.to_string())?;
        let read = |r: &mut BufReader<UnixStream>| -> Result<Value, String> {
            loop {
                let mut line = Vec::new();
                r.read_until(b'\n', &mut line).map_err(|e| e.to_string())?;
                if line.is_empty() {
                    return Err("agent socket closed".into());
                }
                let t: Vec<u8> = line.into_iter().filter(|b| *b != 0xff).collect();
                let t = String::from_utf8_lossy(&t);
                if !t.trim().is_empty() {
                    return serde_json::from_str(t.trim()).map_err(|e| e.to_string());
                }
            }
        };
        while read(&mut r)?.get("return").and_then(Value::as_u64) != Some(id) {}
        writeln!(w, "{}", json!({"execute": cmd, "arguments": args})).map_err(|e| e.to_string())?;
        let v = read(&mut r)?;
        match v.get("return") {
            Some(x) => Ok(x.clone()),
            None => Err(v["error"]["desc"].as_str().unwrap_or("error").to_string()),
        }
    }

    /// Run an agent command; panics on failure.
    pub fn agent(&self, cmd: &str, args: Value) -> Value {
        self.try_agent(cmd, args, Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("{}: agent {cmd}: {e}", self.name))
    }

    /// Run `script` with /bin/sh in the guest: (exit code, stdout, stderr).
    pub fn exec(&self, script: &str) -> (i64, String, String) {
        let pid = self.agent(
            "guest-exec",
            json!({"path": "/bin/sh", "arg": ["-c", script], "capture-output": true}),
        )["pid"]
            .clone();
        let t = Instant::now();
        loop {
            let st = self.agent("guest-exec-status", json!({ "pid": pid }));
            if st["exited"].as_bool() == Some(true) {
                let dec = |k: &str| {
                    let b = base64::engine::general_purpose::STANDARD
                        .decode(st[k].as_str().unwrap_or_default())
                        .unwrap_or_default();
                    String::from_utf8_lossy(&b).into_owned()
                };
                return (
                    st["exitcode"].as_i64().unwrap_or(-1),
                    dec("out-data"),
                    dec("err-data"),
                );
            }
            assert!(
                t.elapsed() < Duration::from_secs(300),
                "{}: {script:?} still runs after 300 s",
                self.name
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Run `script` in the guest, asserting exit 0; its stdout, trimmed.
    pub fn sh(&self, script: &str) -> String {
        let (code, out, err) = self.exec(script);
        assert_eq!(code, 0, "{}: {script:?} failed: {err}{out}", self.name);
        out.trim().to_string()
    }

    /// Start `script` in the guest in the background (no waiting).
    pub fn spawn(&self, script: &str) {
        self.agent(
            "guest-exec",
            json!({"path": "/bin/sh", "arg": ["-c", format!("{script} >/dev/null 2>&1 &")]}),
        );
    }

    /// Stop the guest: QMP `quit`, then SIGKILL by PID; waits until the
    /// process is gone (it holds image locks).
    pub fn stop(&self) {
        if let Some(d) = &self.domain {
            let _ = virsh(&["destroy", d]);
            let _ = virsh(&["undefine", d, "--checkpoints-metadata"]);
            return;
        }
        let Some(pid) = self.pid() else { return };
        let _ = UnixStream::connect(&self.qmp).and_then(|mut s| {
            s.write_all(b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"quit\"}\n")
        });
        if !crate::wait_gone(pid, Duration::from_secs(5)) {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            crate::wait_gone(pid, Duration::from_secs(10));
        }
        let _ = std::fs::remove_file(&self.pid_file);
    }
}

/// `virsh -c qemu:///system ARGS`: its stdout, or its stderr as the error.
pub fn virsh(args: &[&str]) -> Result<String, String> {
    let out = Command::new("virsh")
        .args(["-c", "qemu:///system"])
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// A libvirt guest `name` in `dir` (made searchable for libvirt's QEMU
/// user) with libvirtd running until the returned guard drops: its root
/// disk a copy of the image (qcow2), and a new `data_mib` qcow2 data disk
/// as `vdb`.
pub fn libvirt_with_data(dir: &Path, name: &str, data_mib: u32) -> (Libvirtd, Guest) {
    sh(Command::new("chmod").arg("0755").arg(dir));
    let libvirtd = Libvirtd::ensure(dir);
    let img = dir.join(format!("{name}-root.qcow2"));
    GuestImage::get().copy_disk(&img);
    let data = dir.join(format!("{name}-data.qcow2"));
    sh(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&data)
        .arg(format!("{data_mib}M")));
    let g = Guest::libvirt(dir, name, &img, "qcow2", &[&data]);
    (libvirtd, g)
}

/// libvirtd (and virtlogd) for a test: started here unless they already
/// run, and then stopped by PID on drop.
#[derive(Debug)]
pub struct Libvirtd {
    started: Vec<crate::Daemon>,
}

impl Libvirtd {
    /// Make sure `qemu:///system` answers.
    pub fn ensure(dir: &Path) -> Libvirtd {
        kvm_group_access();
        let mut started = Vec::new();
        if virsh(&["version"]).is_err() {
            for d in ["/var/log/libvirt", "/run/libvirt"] {
                let _ = std::fs::create_dir_all(d);
            }
            for daemon in ["virtlogd", "libvirtd"] {
                let pid_file = dir.join(format!("{daemon}.pid"));
                sh(Command::new(daemon).arg("-d").arg("-p").arg(&pid_file));
                crate::wait_for(&pid_file);
                started.push(crate::Daemon { pid_file });
            }
            crate::wait_until("libvirtd to answer", Duration::from_secs(30), || {
                virsh(&["version"]).is_ok()
            });
        }
        Libvirtd { started }
    }
}

/// Give `/dev/kvm` the owner Debian's udev rule gives it (`root:kvm`,
/// 0660) where no udev ran (a container: `root:root` 0600). Otherwise
/// libvirt finds KVM when it probes QEMU's capabilities (as root) and
/// not for its QEMU user when it checks them, throws the cache away and
/// probes again (about 30 s under TCG) at every domain define and start.
fn kvm_group_access() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let Ok(m) = std::fs::metadata("/dev/kvm") else {
        return;
    };
    if m.gid() != 0 || m.mode() & 0o060 != 0 {
        return;
    }
    if Command::new("chgrp")
        .args(["kvm", "/dev/kvm"])
        .status()
        .is_ok_and(|s| s.success())
    {
        let _ = std::fs::set_permissions("/dev/kvm", std::fs::Permissions::from_mode(0o660));
    }
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        for d in self.started.drain(..).rev() {
            d.stop();
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.stop();
    }
}
