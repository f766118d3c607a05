//! Network mode: a hand-written NBD client (no crate does structured
//! replies and block status), as a [`datamover::source::BlockSource`].
//!
//! Done: URIs, fixed newstyle handshake (oldstyle refused), NBD_OPT_GO with
//! block sizes, NBD_OPT_LIST for unknown exports, structured replies
//! (OFFSET_DATA, OFFSET_HOLE, ERROR, ERROR_OFFSET; unknown chunks skipped),
//! base:allocation and dirty-bitmap meta contexts, BLOCK_STATUS, many reads
//! in flight matched by cookie, timeouts.
//! Not yet (issue #3 goes on): TLS (refused, never downgraded), writes and
//! the restore target, multi-conn, CBT incrementals from dirty bitmaps.

pub mod client;
pub mod proto;
pub mod source;
pub mod target;
pub mod tls;
pub mod uri;

pub use client::{ConnectOptions, ExportInfo, NbdClient, NbdError};
pub use source::NbdSource;
pub use target::NbdTarget;
pub use uri::NbdUri;
