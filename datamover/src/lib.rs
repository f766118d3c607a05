//! # datamover — the core data mover
//!
//! Reads a VM disk from a [`BlockSource`], cuts it into chunks, dedupes,
//! compresses and stores them in a [`Repository`]; restores any point
//! byte for byte into a [`BlockTarget`].
//!
//! ## Data flow
//!
//! ```text
//! BlockSource ─extents per window─► reader ─► chunker ─► workers: BLAKE3, dedupe, zstd ─► packs
//!                                     │ holes and zero blocks become zero runs          └► manifest
//! ```
//!
//! * **Chunks** are fixed-size blocks aligned to disk offsets (1 MiB, the
//!   default: measured best for disk images) or content-defined (FastCDC). A chunk's id is the
//!   BLAKE3-256 of its plain bytes; identical chunks are stored once per
//!   repository.
//! * **Frames** wrap each stored chunk with a versioned header and a CRC32;
//!   zstd is used only when it saves space. Restore checks the CRC and the
//!   BLAKE3 of every chunk, so damage is an error, never wrong data.
//! * **Packs** hold frames, ~32 MiB each; **index files** map chunk ids to
//!   (pack, offset, length); one **manifest per restore point** lists every
//!   extent of the disk in order, so every point restores on its own
//!   (forever-incremental, no merges). All formats: [`format`].
//!
//! ## Safety
//!
//! Files are written to `tmp/`, fsynced and renamed; a backup publishes its
//! manifest last. Concurrent backups share a lock that garbage collection
//! takes exclusively ([`repo`]). Bytes from disk are bounds-checked before
//! any allocation; nothing here panics on bad data.
//!
//! ## Entry points
//!
//! [`Repository::init`] / [`Repository::open`], [`backup::backup`],
//! [`restore::restore`], [`verify::verify`], [`prune::prune`].

#![warn(missing_docs)]

pub mod backup;
pub mod buffer;
pub mod cbt;
pub mod chunker;
pub mod compression;
mod direct;
pub mod error;
pub mod format;
pub mod ids;
pub mod progress;
pub mod prune;
pub mod reader;
pub mod replica;
pub mod repo;
pub mod restore;
pub mod source;
pub mod stats;
pub mod store;
pub mod sys;
pub mod target;
pub mod verify;

pub use backup::{BackupOptions, BackupReport, backup, backup_to};
pub use cbt::{ChangeTracker, ChangedRanges, Tracking, WithChanges};
pub use compression::Compression;
pub use error::{Error, ErrorKind, Result, TransportKind};
pub use format::manifest::{ChunkingInfo, ChunkingKind, Consistency, ConsistencyLevel, PointMeta};
pub use ids::{ChunkId, DiskName, PackId, PointId, PointRef};
pub use progress::ProgressFn;
pub use prune::{KeepPolicy, PruneOptions, PruneReport, prune};
pub use repo::{PointSummary, Repository};
pub use restore::{RestoreOptions, RestoreReport, restore};
pub use source::{BlockSource, open_local as open_source};
pub use stats::{Bottleneck, RunStats};
pub use store::{Checked, FrameChecker, FrameSink, Ingest, LocalSession, Store, StoreSession};
pub use target::{BlockTarget, open_local as open_target};
pub use verify::{VerifyReport, verify};
