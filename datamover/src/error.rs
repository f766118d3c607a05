//! The library's one error type.
//!
//! Rules: every error is structured (a variant = a kind, fields = context:
//! path, offset, chunk, point), its message is one line that says what went
//! wrong and what to do, and [`Error::kind`] gives a coarse, stable category
//! that front doors (CLI exit codes, Python exception classes) map from.
//! Library code never panics on bytes from disk or the wire; it returns
//! [`Error::Corrupt`] or [`Error::ChunkDamaged`] instead.
//!
//! A transport failure ([`Error::Transport`]) carries a [`TransportKind`]
//! (connect, timeout, TLS, refused, protocol violation, server error with
//! its errno) and, where there is one, its source error: never only a
//! string. [`Error::is_retryable`] says whether running the same work
//! again can help; task retries follow it.

use std::io;
use std::path::{Path, PathBuf};

use crate::ids::{ChunkId, DiskName, PackId};

/// Result alias for the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Coarse category of an error, stable for front doors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The user gave something wrong (name, path, size, option).
    InvalidInput,
    /// A file or object that should exist does not.
    NotFound,
    /// Repository data is damaged or of an unknown format.
    Corrupt,
    /// The operation or format version is not supported by this build.
    Unsupported,
    /// Reading the source or writing the target failed.
    Io,
    /// The run was cancelled by the caller.
    Cancelled,
}

/// What kind of transport failure an [`Error::Transport`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportKind {
    /// No connection, or the connection broke (refused, reset, closed).
    Connect,
    /// No answer in time.
    Timeout,
    /// TLS could not be set up, or a certificate was refused.
    Tls,
    /// The peer refused what was asked (an option, a command, a policy).
    Refused,
    /// The peer broke the protocol.
    Protocol,
    /// The peer failed a request with an error number (NBD errno values).
    ServerError {
        /// The error number.
        errno: u32,
    },
    /// A helper process or tool (qemu-img, losetup) failed.
    Tool,
}

/// Everything that can go wrong in the data mover.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O call failed on a path.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done ("read", "open", "write", ...).
        op: &'static str,
        /// The file involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A write failed because the filesystem is full.
    #[error("no space left on device writing {}: free space or use another repository; the repository is unchanged", path.display())]
    NoSpace {
        /// The file being written.
        path: PathBuf,
    },
    /// The source to back up cannot be opened.
    #[error("cannot open source {}: {source}; check the path and that you may read it", path.display())]
    SourceUnavailable {
        /// The source path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The path is not a datamover repository.
    #[error("{} is not a datamover repository (no config file); create one with `dm init {}`", path.display(), path.display())]
    NotARepository {
        /// The path given.
        path: PathBuf,
    },
    /// `init` on a path that already holds something.
    #[error("{} already exists and is not empty; choose a new directory for the repository", path.display())]
    AlreadyExists {
        /// The path given.
        path: PathBuf,
    },
    /// A file's format version is newer (or other) than this build reads.
    #[error("{} has format version {found}, this build reads version {supported}; upgrade datamover", path.display())]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// Version found on disk.
        found: u32,
        /// Version this build supports.
        supported: u32,
    },
    /// A repository file is damaged.
    #[error("corrupt {what} {}: {detail}; run `dm verify --read-data` to see what is affected", path.display())]
    Corrupt {
        /// What kind of file ("pack", "index", "point manifest", "config").
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A chunk could not be read back intact.
    #[error("damaged chunk {} in pack {pack} at pack offset {pack_offset}{}: {detail}", chunk.short(), at.as_ref().map(|a| format!(" (point {a})")).unwrap_or_default())]
    ChunkDamaged {
        /// The chunk.
        chunk: ChunkId,
        /// The pack holding it.
        pack: PackId,
        /// Frame offset in the pack.
        pack_offset: u64,
        /// Where it is used ("vm/disk@point, disk offset N"), when known.
        at: Option<String>,
        /// What is wrong.
        detail: String,
    },
    /// A chunk referenced by a point is not in the repository index.
    #[error("chunk {} is missing from the repository{}; run `dm verify` to list the affected points", chunk.short(), at.as_ref().map(|a| format!(" (needed by {a})")).unwrap_or_default())]
    ChunkMissing {
        /// The chunk.
        chunk: ChunkId,
        /// Where it is used, when known.
        at: Option<String>,
    },
    /// A name or id given by the user is malformed.
    #[error("bad name {name:?}: {reason}")]
    InvalidName {
        /// What was given.
        name: String,
        /// The rule it breaks.
        reason: &'static str,
    },
    /// No point matches what was asked.
    #[error("no restore point {wanted} for {disk}; list them with `dm points`")]
    PointNotFound {
        /// The disk.
        disk: DiskName,
        /// The point asked for ("latest" or an id/prefix).
        wanted: String,
    },
    /// A restore target is smaller than the disk.
    #[error("target {} is {have} bytes but the disk is {need} bytes; use a target at least as large", path.display())]
    TargetTooSmall {
        /// The target.
        path: PathBuf,
        /// Disk size.
        need: u64,
        /// Target size.
        have: u64,
    },
    /// A restore target file exists already.
    #[error("target {} already exists; remove it or pass --force to overwrite", path.display())]
    TargetExists {
        /// The target.
        path: PathBuf,
    },
    /// A transport (NBD, QMP, a repository service, a helper tool) failed.
    #[error("{address}: {detail}")]
    Transport {
        /// The address as given (URI).
        address: String,
        /// What kind of failure.
        kind: TransportKind,
        /// What went wrong and, where possible, what to do.
        detail: String,
        /// The error underneath, if any.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// A changed-block-tracking backup was asked for but cannot be built.
    #[error(
        "cannot back up {disk} incrementally: {reason}; pass --full-if-needed (Python: full_if_needed=True) to read the whole disk instead"
    )]
    IncrementalImpossible {
        /// The disk.
        disk: DiskName,
        /// Why (no previous point, size changed, bitmap missing, ...).
        reason: String,
    },
    /// An option or argument is out of range.
    #[error("{0}")]
    InvalidArgument(String),
    /// An operation is not supported by this source/target/build.
    #[error("not supported: {0}")]
    Unsupported(String),
    /// The caller cancelled the run; nothing partial was left visible.
    #[error("cancelled; no restore point was written")]
    Cancelled,
    /// A bug or an impossible state (never bad input).
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// A damaged chunk's error with where the chunk is used ("vm/disk@point,
    /// disk offset N"); other errors as they are.
    pub fn used_at(self, at: String) -> Error {
        match self {
            Error::ChunkDamaged {
                chunk,
                pack,
                pack_offset,
                detail,
                ..
            } => Error::ChunkDamaged {
                chunk,
                pack,
                pack_offset,
                at: Some(at),
                detail,
            },
            Error::ChunkMissing { chunk, .. } => Error::ChunkMissing {
                chunk,
                at: Some(at),
            },
            e => e,
        }
    }

    /// The coarse category of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Io { source, .. } if source.kind() == io::ErrorKind::NotFound => {
                ErrorKind::NotFound
            }
            Error::Io { .. }
            | Error::NoSpace { .. }
            | Error::Internal(_)
            | Error::Transport { .. } => ErrorKind::Io,
            Error::SourceUnavailable { source, .. } if source.kind() == io::ErrorKind::NotFound => {
                ErrorKind::NotFound
            }
            Error::SourceUnavailable { .. } => ErrorKind::Io,
            Error::NotARepository { .. } | Error::PointNotFound { .. } => ErrorKind::NotFound,
            Error::UnsupportedVersion { .. } | Error::Unsupported(_) => ErrorKind::Unsupported,
            Error::Corrupt { .. } | Error::ChunkDamaged { .. } | Error::ChunkMissing { .. } => {
                ErrorKind::Corrupt
            }
            Error::AlreadyExists { .. }
            | Error::InvalidName { .. }
            | Error::TargetTooSmall { .. }
            | Error::TargetExists { .. }
            | Error::IncrementalImpossible { .. }
            | Error::InvalidArgument(_) => ErrorKind::InvalidInput,
            Error::Cancelled => ErrorKind::Cancelled,
        }
    }

    /// Whether running the same work again may succeed: everything but
    /// bad input and what this build or source cannot do. Task retries
    /// (the server's) follow this.
    pub fn is_retryable(&self) -> bool {
        !matches!(
            self.kind(),
            ErrorKind::InvalidInput | ErrorKind::Unsupported
        )
    }

    /// A transport failure of `kind` at `address`, without a source.
    pub fn transport(
        address: impl Into<String>,
        kind: TransportKind,
        detail: impl Into<String>,
    ) -> Self {
        Error::Transport {
            address: address.into(),
            kind,
            detail: detail.into(),
            source: None,
        }
    }

    /// A transport failure with the error underneath it.
    pub fn transport_from(
        address: impl Into<String>,
        kind: TransportKind,
        detail: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Error::Transport {
            address: address.into(),
            kind,
            detail: detail.into(),
            source: Some(Box::new(source)),
        }
    }

    /// An I/O error on `path`; a full filesystem becomes [`Error::NoSpace`].
    pub fn io(op: &'static str, path: impl AsRef<Path>, source: io::Error) -> Self {
        let path = path.as_ref().to_path_buf();
        if source.raw_os_error() == Some(libc::ENOSPC)
            || source.raw_os_error() == Some(libc::EDQUOT)
        {
            Error::NoSpace { path }
        } else {
            Error::Io { op, path, source }
        }
    }

    /// A corruption error.
    pub fn corrupt(what: &'static str, path: impl AsRef<Path>, detail: impl Into<String>) -> Self {
        Error::Corrupt {
            what,
            path: path.as_ref().to_path_buf(),
            detail: detail.into(),
        }
    }
}

/// Attach an operation and path to `io::Result`s.
pub(crate) trait IoContext<T> {
    /// Map the error with [`Error::io`].
    fn ctx(self, op: &'static str, path: &Path) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, op: &'static str, path: &Path) -> Result<T> {
        self.map_err(|e| Error::io(op, path, e))
    }
}
