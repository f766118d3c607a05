//! `dm-proxy` refuses to run without an identity and says how to enroll;
//! a malformed enrollment token is refused before any connection.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

fn dm_proxy() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dm-proxy"))
}

#[test]
fn not_enrolled_and_bad_tokens_are_clear_errors() {
    let d = tempfile::tempdir().unwrap();
    let out = dm_proxy()
        .arg("--dir")
        .arg(d.path())
        .arg("run")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not enrolled") && err.contains("dm-proxy enroll"),
        "{err}"
    );

    let out = dm_proxy()
        .arg("--dir")
        .arg(d.path())
        .args([
            "enroll",
            "--server",
            "https://127.0.0.1:1",
            "--token",
            "dmj1.abc.xyz",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not an enrollment token"), "{err}");

    // A well-formed token, but nothing listens: the error names the server.
    let tok = format!("dmj1.abc.{}", "0".repeat(64));
    let out = dm_proxy()
        .arg("--dir")
        .arg(d.path())
        .args(["enroll", "--server", "https://127.0.0.1:1", "--token", &tok])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach https://127.0.0.1:1"), "{err}");
    assert!(
        std::fs::read_dir(d.path()).unwrap().next().is_none(),
        "nothing saved"
    );
}
