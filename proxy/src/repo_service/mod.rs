//! The target data mover: a repository service on a proxy, and the client
//! a source proxy writes through ([`RemoteStore`], a [`Store`] like a local
//! repository).
//!
//! The source proxy reads, chunks, hashes and compresses; it learns the
//! chunks of the disk's newest point from the service, asks about every
//! other new chunk in batches, and sends only the frames the repository
//! lacks. The service checks every frame (header, CRC, BLAKE3 of the
//! decompressed bytes) before storing it, and publishes the point only
//! when every chunk its manifest names is durable. A connection that ends
//! before the commit leaves no point. A replication target also brings
//! the disk's replica image up to date ([`datamover::replica`]).
//!
//!
//! * [`wire`]: the `dmrs/1` protocol (framing, message types, limits).
//! * [`server`]: the service ([`serve`]).
//! * [`client`]: [`RemoteStore`], the source proxy's side.
//!
//!
//! Who may do what: the service admits a peer only with a grant from the
//! server's orders for the repository, its certificate's fingerprint and
//! the disk (a grant exists while the server has a task of that peer
//! writing that disk there); the grant is checked again at COMMIT, so a
//! host removed mid-backup commits nothing. The point's time is the
//! service's clock and its replica flag the grant's, never the peer's.
//!
//! The service reads a connection on one thread and answers HAVE at once
//! (from the index as the session began and the frames received so far);
//! a worker thread checks and stores the frames, so reading, checking and
//! writing overlap. COMMIT waits for the worker. HELLO with `op: "latest"`
//! gets READY and the connection ends.

pub mod client;
pub mod read;
pub mod server;
pub mod wire;

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};

pub use client::RemoteStore;
pub use read::RemotePoints;
pub use server::serve;
pub use wire::{ALPN, Committed, Hello, MAGIC, MAX_MESSAGE, Op, Ready, VERSION};

/// A repository the service offers, as the server assigned it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Served {
    /// Its directory on this proxy.
    pub path: PathBuf,
    /// Who may use it, for which disk, as the server's last orders said
    /// (see [`datamover_control::api::Grant`]); nobody else is admitted.
    #[serde(default)]
    pub grants: Vec<datamover_control::api::Grant>,
    /// Its host's libvirt connection when the host is a hypervisor (a
    /// migration starts VMs there).
    #[serde(default)]
    pub hypervisor: Option<String>,
}

/// The repositories a service offers, by name; the agent updates it from
/// the server's orders.
pub type ServedMap = Arc<RwLock<HashMap<String, Served>>>;

/// Where the replica images of a replica repository live.
pub fn replica_root(path: &Path) -> PathBuf {
    path.join("replicas")
}

/// Counts bytes through a stream (what goes over the wire, TLS included).
#[derive(Debug)]
pub struct Counted<S> {
    inner: S,
    /// Bytes read and written.
    pub wire: Arc<Wire>,
}

/// Bytes on the wire.
#[derive(Debug, Default)]
pub struct Wire {
    /// Sent.
    pub sent: AtomicU64,
    /// Received.
    pub received: AtomicU64,
}

impl<S: Read> Read for Counted<S> {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(b)?;
        self.wire.received.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

impl<S: Write> Write for Counted<S> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(b)?;
        self.wire.sent.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
