//! # datamover-testkit — what every crate's tests share (dev-only)
//!
//! Disk generators and hashes ([`disk`]), the rule for tests that need
//! root or a tool ([`env`]), real processes stopped by PID ([`process`]),
//! loop devices and mounts ([`block`]), network namespaces ([`net`]) and
//! real Linux guests under QEMU with their guest agent ([`guest`]).
//! Every guard cleans up on drop, also when a test fails.
//!
//! Helpers panic on failure: they run inside tests, where a panic is the
//! failure report.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod block;
pub mod disk;
pub mod env;
pub mod guest;
pub mod net;
pub mod process;
pub mod tls;

pub use block::*;
pub use disk::*;
pub use env::*;
pub use guest::{Guest, GuestImage};
pub use net::*;
pub use process::*;
