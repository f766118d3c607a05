//! Helpers shared by the integration tests (also used by the CLI tests via
//! `#[path]`): seeded data, real loop devices and mounts with guards that
//! always clean up, and the rule for tools that need root.
#![allow(dead_code)]

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// xorshift64*: fast, seeded, reproducible.
pub struct Rng(u64);
impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// What a region of a generated image holds.
#[derive(Debug, Clone, Copy)]
pub enum Fill {
    Random(u64),
    Text,
    Zeros,
}

/// Write `fill` at `offset` for `len` bytes into `f`.
pub fn write_region(f: &File, offset: u64, len: u64, fill: Fill) {
    let mut buf = vec![0u8; len.min(4 << 20) as usize];
    let mut rng = Rng::new(match fill {
        Fill::Random(s) => s,
        _ => 0,
    });
    let mut done = 0;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        match fill {
            Fill::Random(_) => rng.fill(&mut buf[..n]),
            Fill::Text => {
                for (i, b) in buf[..n].iter_mut().enumerate() {
                    *b = b"2026-11-25 INFO vm started, disk attached\n"[(done as usize + i) % 42];
                }
            }
            Fill::Zeros => buf[..n].fill(0),
        }
        f.write_all_at(&buf[..n], offset + done)
            .expect("write test image");
        done += n as u64;
    }
}

/// A sparse image of `size` bytes with the given regions written.
pub fn make_image(path: &Path, size: u64, regions: &[(u64, u64, Fill)]) {
    let f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)
        .expect("create image");
    f.set_len(size).expect("size image");
    for &(o, l, fill) in regions {
        write_region(&f, o, l, fill);
    }
}

/// BLAKE3 of a whole file or device.
pub fn hash_file(path: &Path) -> String {
    let mut f = File::open(path).expect("open for hash");
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).expect("read for hash");
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    h.finalize().to_hex().to_string()
}

/// Bytes allocated on disk for a file (st_blocks * 512).
pub fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).expect("stat").blocks() * 512
}

pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// True when this test can use root-only facilities and `tools`. Outside
/// CI a missing one skips the test (with a message); in CI it fails, because
/// `.ci/run` installs everything.
pub fn can_run(test: &str, tools: &[&str]) -> bool {
    let root = unsafe_free_euid() == 0;
    let missing: Vec<&str> = tools.iter().copied().filter(|t| !have_tool(t)).collect();
    if root && missing.is_empty() {
        return true;
    }
    let why = if !root {
        "not root".to_string()
    } else {
        format!("missing {}", missing.join(", "))
    };
    assert!(!in_ci(), "{test}: cannot run in CI: {why}");
    eprintln!("SKIP {test}: {why}");
    false
}

fn unsafe_free_euid() -> u32 {
    // /proc/self/status "Uid: real effective ..." avoids libc here.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).and_then(|x| x.parse().ok()))
        })
        .unwrap_or(u32::MAX)
}

pub fn have_tool(t: &str) -> bool {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin", "/usr/local/bin"]
        .iter()
        .any(|d| Path::new(d).join(t).exists())
}

pub fn sh(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Run `cmd args…`, asserting success; returns its stdout.
pub fn run(cmd: &str, args: &[&str]) -> String {
    sh(Command::new(cmd).args(args))
}

/// A daemon started with a pid file; stopped on drop.
pub struct Daemon {
    pub pid_file: PathBuf,
}
impl Daemon {
    pub fn pid(&self) -> Option<i32> {
        std::fs::read_to_string(&self.pid_file)
            .ok()?
            .trim()
            .parse()
            .ok()
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
        let t = Instant::now();
        while let Some(p) = pid {
            if !Path::new(&format!("/proc/{p}")).exists() || t.elapsed() > Duration::from_secs(10) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill("-TERM");
    }
}

pub fn wait_for(path: &Path) {
    let t = Instant::now();
    while !path.exists() && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(path.exists(), "{} did not appear", path.display());
}

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

/// A loop device, detached on drop (also when the test panics).
pub struct LoopDev {
    pub dev: PathBuf,
}
impl LoopDev {
    pub fn attach(image: &Path, read_only: bool) -> LoopDev {
        let mut c = Command::new("losetup");
        c.arg("-f").arg("--show");
        if read_only {
            c.arg("-r");
        }
        c.arg(image);
        LoopDev {
            dev: PathBuf::from(sh(&mut c)),
        }
    }
}
impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// A mount, unmounted on drop.
pub struct Mount {
    pub dir: PathBuf,
}
impl Mount {
    pub fn new(mut cmd: Command, dir: &Path) -> Mount {
        sh(&mut cmd);
        Mount {
            dir: dir.to_path_buf(),
        }
    }
}
impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
    }
}

/// Write a file of `len` seeded random bytes.
pub fn random_file(path: &Path, len: usize, seed: u64) {
    let mut v = vec![0u8; len];
    Rng::new(seed).fill(&mut v);
    File::create(path)
        .and_then(|mut f| f.write_all(&v))
        .expect("write file");
}
