//! The engine's clock, injected so tests can move time: wall-clock time
//! for what is stored and shown, a monotonic reading for liveness.
//!
//! Invariant: the engine reads time only through its [`Clock`]; the
//! catalog never reads it at all (times are parameters).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

/// Where the engine gets the time.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Wall-clock time (stored and shown; schedules and retry delays).
    fn now(&self) -> DateTime<Utc>;
    /// A monotonic reading (proxy liveness): only differences count.
    fn monotonic(&self) -> Duration;

    /// Now, RFC 3339 with milliseconds.
    fn rfc3339(&self) -> String {
        self.now()
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    }
    /// Now, milliseconds since the Unix epoch.
    fn ms(&self) -> i64 {
        self.now().timestamp_millis()
    }
    /// Now, seconds since the Unix epoch.
    fn secs(&self) -> f64 {
        self.ms() as f64 / 1000.0
    }
}

/// The system's clocks.
#[derive(Debug)]
pub struct SystemClock {
    start: Instant,
}

impl Default for SystemClock {
    fn default() -> Self {
        SystemClock {
            start: Instant::now(),
        }
    }
}

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
    fn monotonic(&self) -> Duration {
        self.start.elapsed()
    }
}

/// A clock that moves only when told to (tests).
#[derive(Debug)]
pub struct ManualClock {
    at: Mutex<(DateTime<Utc>, Duration)>,
}

impl ManualClock {
    /// A clock showing `at`.
    pub fn new(at: DateTime<Utc>) -> Self {
        ManualClock {
            at: Mutex::new((at, Duration::ZERO)),
        }
    }

    /// Move both readings forward by `d`.
    pub fn advance(&self, d: Duration) {
        let mut g = self.at.lock().unwrap_or_else(|p| p.into_inner());
        g.0 += chrono::Duration::from_std(d).unwrap_or_default();
        g.1 += d;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        self.at.lock().unwrap_or_else(|p| p.into_inner()).0
    }
    fn monotonic(&self) -> Duration {
        self.at.lock().unwrap_or_else(|p| p.into_inner()).1
    }
}
