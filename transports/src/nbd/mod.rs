//! Network mode: a hand-written NBD client (no crate does structured
//! replies, block status and TLS): [`NbdSource`] for backups (with CBT from
//! QEMU dirty bitmaps) and [`NbdTarget`] for restores.
//!
//! * [`uri`]: libnbd-style addresses (`nbd://`, `nbds://`, `nbd+unix://`,
//!   `nbds+unix://`, `tls-certificates=`, `tls-hostname=`).
//! * [`proto`]: wire constants and bounds-checked parsers.
//! * [`client`]: fixed newstyle negotiation (oldstyle refused), STARTTLS
//!   ([`tls`]), NBD_OPT_GO with block sizes, NBD_OPT_LIST for unknown
//!   exports, meta contexts (`base:allocation`, `qemu:dirty-bitmap:NAME`),
//!   structured replies, many requests in flight matched by cookie, READ,
//!   WRITE, WRITE_ZEROES (FAST_ZERO), TRIM, FLUSH, BLOCK_STATUS, DISC,
//!   timeouts.
//! * [`source`]: reads split into pieces, fetched ahead, spread over
//!   several connections when the server allows (CAN_MULTI_CONN).
//! * [`target`]: pipelined writes for restores.

pub mod client;
pub mod proto;
pub mod server;
pub mod source;
pub mod target;
pub mod tls;
pub mod uri;

pub use client::{ConnectOptions, ExportInfo, NbdClient, NbdError};
pub use source::NbdSource;
pub use target::NbdTarget;
pub use uri::NbdUri;
