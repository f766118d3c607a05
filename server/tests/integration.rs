//! All integration tests of the server, compiled into one binary: real
//! `dm-server`, `dm-proxy` and `dm-installer` processes, qemu-storage-daemon
//! disks and network namespaces. The tests take turns (`common::serial`):
//! each starts a cluster of processes whose timing the others would
//! disturb on a two-core machine.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test crate: a panic is a failed test

mod common;
mod it;
