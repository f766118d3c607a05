//! All integration tests of the core, compiled into one binary.
mod common;
mod it;
