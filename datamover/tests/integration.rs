//! All integration tests of the core, compiled into one binary.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)] // test crate: a panic is a failed test
use datamover_testkit as common;
mod it;
