//! The server's integration tests, one module per area.

mod api;
mod cluster;
mod guest;
mod jobs;
mod netns;
mod trust;
