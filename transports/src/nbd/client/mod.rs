//! An async NBD client: fixed newstyle handshake, structured replies, meta
//! contexts, and many requests in flight on one connection, matched by
//! cookie. Shaped after libnbd: negotiation, then transmission where one
//! reader task dispatches replies; unknown non-error chunks are skipped,
//! protocol violations kill the connection (every waiting request fails with
//! the reason), lengths are checked before anything is allocated.
//!
//! The client by concept: [`error`] (NbdError), `readbuf` (a read's
//! buffer), `handshake` (negotiation), `replies` (the reply loop); this
//! file holds the connection and the requests of transmission.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::oneshot;

use super::proto as p;
use super::tls;
use super::uri::{Endpoint, NbdUri};

mod error;
mod handshake;
mod readbuf;
mod replies;

#[cfg(test)]
mod fuzz;

pub use error::NbdError;
use error::io;
use readbuf::*;
use replies::*;

/// Connection settings.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Per-request (and handshake) timeout.
    pub timeout: Duration,
    /// Also ask for `qemu:dirty-bitmap:<name>` (whether the server granted
    /// it is in [`ExportInfo::contexts`]).
    pub bitmap: Option<String>,
    /// TLS certificates directory for `nbds` addresses that do not name
    /// one (`tls-certificates=` in the address wins).
    pub tls_certificates: Option<std::path::PathBuf>,
    /// Connections a reader opens when the server allows several
    /// (CAN_MULTI_CONN); 1 turns multi-conn off. `None`: 4 over TCP, 1 on a
    /// unix socket (a local server shares the proxy's CPUs, and extra
    /// connections there only cost server CPU: measured in benches/nbd.sh).
    pub connections: Option<usize>,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            timeout: Duration::from_secs(60),
            bitmap: None,
            tls_certificates: None,
            connections: None,
        }
    }
}

/// What negotiation established.
#[derive(Debug, Clone, Default)]
pub struct ExportInfo {
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    /// Block size constraints (min, preferred, max payload).
    pub block: (u32, u32, u32),
    /// Structured replies are on.
    pub structured: bool,
    /// Meta contexts selected: (id, name).
    pub contexts: Vec<(u32, String)>,
}

impl ExportInfo {
    /// The id of a selected meta context.
    pub fn context(&self, name: &str) -> Option<u32> {
        self.contexts.iter().find(|c| c.1 == name).map(|c| c.0)
    }
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

enum Pending {
    Read {
        offset: u64,
        buf: ReadBuf,
    },
    Status {
        /// The context asked about.
        context: u32,
        /// Bytes asked about.
        len: u32,
        /// Every negotiated context: the reply has one chunk for each.
        expect: Vec<u32>,
        /// Contexts a chunk came for.
        seen: Vec<u32>,
        descs: Vec<(u32, u32)>,
    },
    /// Writes, zeroes, trims, flushes: only success or an error.
    Ack,
}

struct InFlight {
    what: Pending,
    error: Option<(u32, String)>,
    tx: oneshot::Sender<Result<Pending, NbdError>>,
}

#[derive(Default)]
struct Shared {
    inflight: HashMap<u64, InFlight>,
    dead: Option<NbdError>,
}

/// A connected NBD client. Cheap to share (`Arc`); requests may be issued
/// from many tasks at once.
pub struct NbdClient {
    info: ExportInfo,
    shared: Arc<Mutex<Shared>>,
    writer: tokio::sync::Mutex<WriteHalf<Box<dyn Stream>>>,
    cookie: AtomicU64,
    timeout: Duration,
}

impl std::fmt::Debug for NbdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdClient")
            .field("info", &self.info)
            .finish()
    }
}

impl NbdClient {
    /// Connect to `uri` and negotiate.
    pub async fn connect(uri: &NbdUri, opts: &ConnectOptions) -> Result<NbdClient, NbdError> {
        // TLS settings are checked before connecting: a missing certificates
        // directory is a configuration error, whatever the server does.
        let tls = if uri.tls {
            Some(Self::tls_config(uri, opts)?)
        } else {
            None
        };
        let connect = async {
            let s: Box<dyn Stream> = match &uri.endpoint {
                Endpoint::Tcp { host, port } => {
                    let t = tokio::net::TcpStream::connect((host.as_str(), *port))
                        .await
                        .map_err(io)?;
                    let _ = t.set_nodelay(true);
                    Box::new(t)
                }
                Endpoint::Unix(path) => {
                    Box::new(tokio::net::UnixStream::connect(path).await.map_err(|e| {
                        NbdError::Io {
                            what: format!("cannot connect to {}: {e}", path.display()),
                            source: Some(Arc::new(e)),
                        }
                    })?)
                }
            };
            Self::negotiate(s, uri, opts, tls).await
        };
        let (s, info) = tokio::time::timeout(opts.timeout, connect)
            .await
            .map_err(|_| NbdError::Timeout(opts.timeout))??;
        let (rd, wr) = tokio::io::split(s);
        let shared = Arc::new(Mutex::new(Shared::default()));
        tokio::spawn(reader(rd, shared.clone(), info.clone()));
        Ok(NbdClient {
            info,
            shared,
            writer: tokio::sync::Mutex::new(wr),
            cookie: AtomicU64::new(1),
            timeout: opts.timeout,
        })
    }

    /// What negotiation established.
    pub fn info(&self) -> &ExportInfo {
        &self.info
    }

    async fn submit(
        &self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
        what: Pending,
    ) -> Result<Pending, NbdError> {
        let cookie = self.cookie.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut sh = self.shared.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(e) = &sh.dead {
                return Err(e.clone());
            }
            sh.inflight.insert(
                cookie,
                InFlight {
                    what,
                    error: None,
                    tx,
                },
            );
        }
        let req = p::request(flags, cmd, cookie, offset, len);
        let sent = async {
            let mut w = self.writer.lock().await;
            w.write_all(&req).await?;
            if !payload.is_empty() {
                w.write_all(payload).await?;
            }
            w.flush().await
        };
        if let Err(e) = sent.await {
            self.shared
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .inflight
                .remove(&cookie);
            return Err(io(e));
        }
        match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(NbdError::io_msg("the connection closed before the reply")),
            Err(_) => Err(NbdError::Timeout(self.timeout)),
        }
    }

    /// Read `len` bytes at `offset` (len at most the server's maximum).
    pub async fn read(&self, offset: u64, len: u32) -> Result<BytesMut, NbdError> {
        self.read_into(offset, len, BytesMut::with_capacity(len as usize))
            .await
    }

    /// Read `len` bytes at `offset` into `buf` (its contents are replaced;
    /// give it `len` bytes of capacity to avoid a reallocation).
    pub async fn read_into(
        &self,
        offset: u64,
        len: u32,
        buf: BytesMut,
    ) -> Result<BytesMut, NbdError> {
        if len > self.info.block.2 {
            return Err(NbdError::Unsupported(format!(
                "reads over the server's maximum of {} bytes",
                self.info.block.2
            )));
        }
        let buf = ReadBuf::new(buf, len as usize);
        match self
            .submit(
                p::CMD_READ,
                0,
                offset,
                len,
                &[],
                Pending::Read { offset, buf },
            )
            .await?
        {
            Pending::Read { buf, .. } => Ok(buf.buf),
            _ => Err(NbdError::Protocol("reply of the wrong kind".into())),
        }
    }

    /// Block status of `[offset, offset+len)` in meta context `context`:
    /// (length, flags) descriptors from `offset` on; may cover less than asked.
    /// With `one_extent` (`NBD_CMD_FLAG_REQ_ONE`) the server works out one
    /// extent per context, not every extent of `len` bytes in each.
    pub async fn block_status(
        &self,
        offset: u64,
        len: u32,
        context: u32,
        one_extent: bool,
    ) -> Result<Vec<(u32, u32)>, NbdError> {
        let flags = if one_extent { p::CMD_FLAG_REQ_ONE } else { 0 };
        match self
            .submit(
                p::CMD_BLOCK_STATUS,
                flags,
                offset,
                len,
                &[],
                Pending::Status {
                    context,
                    len,
                    expect: self.info.contexts.iter().map(|c| c.0).collect(),
                    seen: Vec::new(),
                    descs: Vec::new(),
                },
            )
            .await?
        {
            Pending::Status { descs, .. } => Ok(descs),
            _ => Err(NbdError::Protocol("reply of the wrong kind".into())),
        }
    }

    fn require(&self, flag: u16, what: &str) -> Result<(), NbdError> {
        if self.info.flags & p::TFLAG_READ_ONLY != 0 {
            return Err(NbdError::Unsupported(format!(
                "{what} on a read-only export (serve it writable, e.g. qemu-nbd without -r)"
            )));
        }
        if flag != 0 && self.info.flags & flag == 0 {
            return Err(NbdError::Unsupported(format!(
                "{what}: the server does not offer it"
            )));
        }
        Ok(())
    }

    async fn ack(
        &self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> Result<(), NbdError> {
        self.submit(cmd, flags, offset, len, payload, Pending::Ack)
            .await
            .map(drop)
    }

    /// Write `data` at `offset` (at most the server's maximum payload).
    pub async fn write(&self, offset: u64, data: &[u8]) -> Result<(), NbdError> {
        self.require(0, "writing")?;
        let len = u32::try_from(data.len())
            .ok()
            .filter(|l| *l <= self.info.block.2)
            .ok_or_else(|| {
                NbdError::Unsupported(format!(
                    "writes over the server's maximum of {} bytes",
                    self.info.block.2
                ))
            })?;
        self.ack(p::CMD_WRITE, 0, offset, len, data).await
    }

    /// Make `[offset, offset+len)` read as zeros. With `fast`, the server
    /// must refuse (ENOTSUP) rather than zero slowly; only asked when it
    /// offers FAST_ZERO.
    pub async fn write_zeroes(&self, offset: u64, len: u32, fast: bool) -> Result<(), NbdError> {
        self.require(p::TFLAG_SEND_WRITE_ZEROES, "WRITE_ZEROES")?;
        let flags = if fast {
            self.require(p::TFLAG_SEND_FAST_ZERO, "FAST_ZERO")?;
            p::CMD_FLAG_FAST_ZERO
        } else {
            0
        };
        self.ack(p::CMD_WRITE_ZEROES, flags, offset, len, &[]).await
    }

    /// Tell the server `[offset, offset+len)` is no longer needed.
    pub async fn trim(&self, offset: u64, len: u32) -> Result<(), NbdError> {
        self.require(p::TFLAG_SEND_TRIM, "TRIM")?;
        self.ack(p::CMD_TRIM, 0, offset, len, &[]).await
    }

    /// Make completed writes durable (a no-op success when the server
    /// does not take FLUSH: it then writes through).
    pub async fn flush(&self) -> Result<(), NbdError> {
        if self.info.flags & p::TFLAG_SEND_FLUSH == 0 {
            return Ok(());
        }
        self.ack(p::CMD_FLUSH, 0, 0, 0, &[]).await
    }

    /// Tell the server we are leaving (best effort; no reply).
    pub async fn disconnect(&self) {
        let cookie = self.cookie.fetch_add(1, Ordering::Relaxed);
        let mut w = self.writer.lock().await;
        let _ = w.write_all(&p::request(0, p::CMD_DISC, cookie, 0, 0)).await;
        let _ = w.shutdown().await;
    }
}
