//! What a test may use here: root, tools, CI. Outside CI a test that
//! lacks one is skipped with a message; in CI it fails, because `.ci/run`
//! installs everything.

use std::path::Path;
use std::process::Command;

/// Whether this run is CI's (`CI=true`).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// True when this test can use root-only facilities and `tools`. Outside
/// CI a missing one skips the test (with a message); in CI it fails, because
/// `.ci/run` installs everything.
pub fn can_run(test: &str, tools: &[&str]) -> bool {
    let root = euid() == 0;
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

/// The effective uid, read from /proc (no libc).
pub fn euid() -> u32 {
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

/// Whether `t` is installed in a system bin directory.
pub fn have_tool(t: &str) -> bool {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin", "/usr/local/bin"]
        .iter()
        .any(|d| Path::new(d).join(t).exists())
}

/// Run `cmd`, asserting success; returns its stdout, trimmed.
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
