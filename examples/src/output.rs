//! What the commands share for output: the exit-code carrying
//! [`Failure`], progress bars and human-readable sizes.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use datamover::ErrorKind;
use indicatif::{ProgressBar, ProgressStyle};

/// Failure carrying its exit code.
pub struct Failure(pub u8, pub String);

impl From<datamover::Error> for Failure {
    fn from(e: datamover::Error) -> Self {
        let code = match e.kind() {
            ErrorKind::InvalidInput => 2,
            ErrorKind::Corrupt => 3,
            _ => 1,
        };
        Failure(code, e.to_string())
    }
}

pub fn progress_bar(total: u64) -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let b = ProgressBar::new(total);
    let style = ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] [{wide_bar}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    b.set_style(style);
    b.enable_steady_tick(Duration::from_millis(200));
    Some(b)
}

pub fn progress_fn(b: &ProgressBar) -> datamover::ProgressFn {
    let b = b.clone();
    Arc::new(move |done, total| {
        if b.length() != Some(total) {
            b.set_length(total);
        }
        b.set_position(done);
        true
    })
}

/// Parse "1M", "256K", "4MiB", "1048576".
pub fn parse_size(s: &str) -> Result<u32, Failure> {
    let t = s.trim().to_ascii_uppercase();
    let t = t.trim_end_matches("IB").trim_end_matches('B');
    let (num, mult) = match t.chars().last() {
        Some('K') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M') => (&t[..t.len() - 1], 1 << 20),
        Some('G') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| Failure(2, format!("bad size {s:?}: use 256K, 512K, 1M or 4M")))
}

pub fn human(b: u64) -> String {
    const U: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < U.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}
