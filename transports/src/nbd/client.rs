//! An async NBD client: fixed newstyle handshake, structured replies, meta
//! contexts, and many requests in flight on one connection, matched by
//! cookie. Shaped after libnbd: negotiation, then transmission where one
//! reader task dispatches replies; unknown non-error chunks are skipped,
//! protocol violations kill the connection (every waiting request fails with
//! the reason), lengths are checked before anything is allocated.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::oneshot;

use super::proto::{self as p, Violation};
use super::tls;
use super::uri::{Endpoint, NbdUri};

/// What went wrong talking to a server.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NbdError {
    /// Could not connect or the connection broke.
    #[error("{0}")]
    Io(String),
    /// The server broke the protocol; the connection was closed.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The server refused an option.
    #[error("{0}")]
    Server(String),
    /// The server failed a request with an error number.
    #[error("server error {} ({errno}){}", p::errno_name(*errno), if msg.is_empty() { String::new() } else { format!(": {msg}") })]
    Request {
        /// NBD error number (errno values).
        errno: u32,
        /// The server's message, if it sent one.
        msg: String,
    },
    /// Something we do not do (yet), refused rather than worked around.
    #[error("not supported: {0}")]
    Unsupported(String),
    /// TLS could not be set up, or the server refused it.
    #[error("TLS: {0}")]
    Tls(String),
    /// No reply in time.
    #[error("no reply within {0:?}; the server may be hung (raise the timeout if it is just slow)")]
    Timeout(Duration),
}

impl From<Violation> for NbdError {
    fn from(v: Violation) -> Self {
        NbdError::Protocol(v.0)
    }
}

fn io(e: std::io::Error) -> NbdError {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::UnexpectedEof => NbdError::Io("the server closed the connection".into()),
        K::ConnectionReset | K::BrokenPipe | K::ConnectionAborted => {
            NbdError::Io(format!("the server closed the connection ({e})"))
        }
        _ => NbdError::Io(e.to_string()),
    }
}

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
        context: u32,
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

async fn read_exact<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> Result<(), NbdError> {
    r.read_exact(buf).await.map(drop).map_err(io)
}

/// The buffer of a read in flight. Data and hole chunks may come in any
/// order; bytes are appended straight from the socket when they arrive in
/// order (no zero-filling first), and the reply must cover every byte.
pub(crate) struct ReadBuf {
    buf: BytesMut,
    want: usize,
    /// Covered ranges, sorted and merged.
    covered: Vec<(usize, usize)>,
}

impl ReadBuf {
    fn new(mut buf: BytesMut, want: usize) -> Self {
        buf.clear();
        ReadBuf {
            buf,
            want,
            covered: Vec::new(),
        }
    }

    fn cover(&mut self, s: usize, e: usize) {
        let i = self.covered.partition_point(|c| c.1 < s);
        let mut j = i;
        let (mut ns, mut ne) = (s, e);
        while j < self.covered.len() && self.covered[j].0 <= e {
            ns = ns.min(self.covered[j].0);
            ne = ne.max(self.covered[j].1);
            j += 1;
        }
        self.covered.splice(i..j, [(ns, ne)]);
    }

    fn complete(&self) -> bool {
        self.want == 0 || self.covered.as_slice() == [(0, self.want)]
    }

    /// `n` bytes of data for `[s, s+n)` from `r`.
    async fn data<R: AsyncRead + Unpin>(
        &mut self,
        r: &mut R,
        s: usize,
        n: usize,
    ) -> Result<(), NbdError> {
        use bytes::BufMut;
        let e = s + n;
        if self.buf.len() < s {
            self.buf.resize(s, 0);
        }
        let m = e.min(self.buf.len());
        if s < m {
            read_exact(r, &mut self.buf[s..m]).await?;
        }
        while self.buf.len() < e {
            let k = e - self.buf.len();
            let got = r
                .read_buf(&mut (&mut self.buf).limit(k))
                .await
                .map_err(io)?;
            if got == 0 {
                return Err(NbdError::Io("the server closed the connection".into()));
            }
        }
        self.cover(s, e);
        Ok(())
    }

    /// Zeros for `[s, s+n)`.
    fn hole(&mut self, s: usize, n: usize) {
        let (e, old) = (s + n, self.buf.len());
        if old < e {
            self.buf.resize(e, 0);
        }
        if s < old.min(e) {
            self.buf[s..old.min(e)].fill(0);
        }
        self.cover(s, e);
    }
}

async fn option_reply(
    s: &mut Box<dyn Stream>,
    option: u32,
) -> Result<(p::OptionReplyHeader, Vec<u8>), NbdError> {
    let mut h = [0u8; 20];
    read_exact(s, &mut h).await?;
    let h = p::option_reply_header(&h)?;
    if h.option != option {
        return Err(NbdError::Protocol(format!(
            "reply to option {} while waiting for {option}",
            h.option
        )));
    }
    let mut data = vec![0u8; h.len as usize];
    read_exact(s, &mut data).await?;
    Ok((h, data))
}

fn option_error(what: &str, reply: u32, data: &[u8]) -> NbdError {
    let msg = String::from_utf8_lossy(data);
    let msg = if msg.is_empty() {
        String::new()
    } else {
        format!(" ({msg})")
    };
    match reply {
        p::REP_ERR_TLS_REQD => NbdError::Server(format!(
            "the server requires TLS{msg}: use an nbds:// address"
        )),
        p::REP_ERR_POLICY => {
            NbdError::Server(format!("{what} refused by the server's policy{msg}"))
        }
        _ => NbdError::Server(format!("{what} failed with reply {reply:#x}{msg}")),
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
                        NbdError::Io(format!("cannot connect to {}: {e}", path.display()))
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
        tokio::spawn(reader(rd, shared.clone(), info.block.2));
        Ok(NbdClient {
            info,
            shared,
            writer: tokio::sync::Mutex::new(wr),
            cookie: AtomicU64::new(1),
            timeout: opts.timeout,
        })
    }

    async fn negotiate(
        mut s: Box<dyn Stream>,
        uri: &NbdUri,
        opts: &ConnectOptions,
        // Present exactly when the address asks for TLS (see `connect`).
        tls: Option<(std::sync::Arc<rustls::ClientConfig>, std::path::PathBuf)>,
    ) -> Result<(Box<dyn Stream>, ExportInfo), NbdError> {
        let mut hello = [0u8; 18];
        read_exact(&mut s, &mut hello[..16]).await?;
        let magic = u64::from_be_bytes(hello[0..8].try_into().unwrap_or_default());
        let style = u64::from_be_bytes(hello[8..16].try_into().unwrap_or_default());
        if magic != p::NBDMAGIC {
            return Err(NbdError::Protocol("not an NBD server (no NBDMAGIC)".into()));
        }
        if style == p::OLDSTYLE_MAGIC {
            return Err(NbdError::Unsupported(
                "oldstyle NBD servers (use a newstyle server, e.g. qemu-nbd or nbdkit)".into(),
            ));
        }
        if style != p::IHAVEOPT {
            return Err(NbdError::Protocol("unknown negotiation style".into()));
        }
        read_exact(&mut s, &mut hello[16..18]).await?;
        let hflags = u16::from_be_bytes([hello[16], hello[17]]);
        if hflags & p::FLAG_FIXED_NEWSTYLE == 0 {
            return Err(NbdError::Unsupported(
                "servers without fixed newstyle negotiation".into(),
            ));
        }
        let mut cflags = p::FLAG_C_FIXED_NEWSTYLE;
        if hflags & p::FLAG_NO_ZEROES != 0 {
            cflags |= p::FLAG_C_NO_ZEROES;
        }
        s.write_all(&cflags.to_be_bytes()).await.map_err(io)?;
        if let Some((config, dir)) = tls {
            s = Self::starttls(s, uri, config, &dir).await?;
        }
        let mut info = ExportInfo::default();

        // Structured replies (needed for holes and block status).
        s.write_all(&p::option_request(p::OPT_STRUCTURED_REPLY, &[]))
            .await
            .map_err(io)?;
        let (h, d) = option_reply(&mut s, p::OPT_STRUCTURED_REPLY).await?;
        match h.reply {
            p::REP_ACK => info.structured = true,
            p::REP_ERR_UNSUP => {}
            r => return Err(option_error("structured replies", r, &d)),
        }
        if info.structured {
            let mut queries = vec!["base:allocation".to_string()];
            if let Some(b) = &opts.bitmap {
                queries.push(format!("qemu:dirty-bitmap:{b}"));
            }
            let q: Vec<&str> = queries.iter().map(String::as_str).collect();
            s.write_all(&p::option_request(
                p::OPT_SET_META_CONTEXT,
                &p::meta_context_data(&uri.export, &q),
            ))
            .await
            .map_err(io)?;
            loop {
                let (h, d) = option_reply(&mut s, p::OPT_SET_META_CONTEXT).await?;
                match h.reply {
                    p::REP_META_CONTEXT => info.contexts.push(p::parse_meta_context(&d)?),
                    p::REP_ACK => break,
                    p::REP_ERR_UNSUP => break,
                    p::REP_ERR_UNKNOWN => break, // reported by GO below
                    r if p::is_error_reply(r) => {
                        return Err(option_error("meta context selection", r, &d));
                    }
                    _ => {} // unknown reply types are skipped
                }
            }
        }

        // Select the export.
        s.write_all(&p::option_request(
            p::OPT_GO,
            &p::go_data(&uri.export, &[p::INFO_BLOCK_SIZE]),
        ))
        .await
        .map_err(io)?;
        let mut got_export = false;
        info.block = (1, 4096, 32 << 20);
        loop {
            let (h, d) = option_reply(&mut s, p::OPT_GO).await?;
            match h.reply {
                p::REP_INFO => match p::parse_info(&d)? {
                    p::Info::Export { size, flags } => {
                        info.size = size;
                        info.flags = flags;
                        got_export = true;
                    }
                    p::Info::BlockSize {
                        min,
                        preferred,
                        max,
                    } => info.block = (min, preferred, max),
                    p::Info::Other(_) => {}
                },
                p::REP_ACK => break,
                p::REP_ERR_UNKNOWN => {
                    let names = Self::list(&mut s).await.unwrap_or_default();
                    return Err(NbdError::Server(format!(
                        "no export named {:?} on this server; it offers: {}",
                        uri.export,
                        if names.is_empty() {
                            "(none listed)".into()
                        } else {
                            names.join(", ")
                        }
                    )));
                }
                r if p::is_error_reply(r) => {
                    return Err(option_error("selecting the export", r, &d));
                }
                _ => {}
            }
        }
        if !got_export {
            return Err(NbdError::Protocol(
                "NBD_OPT_GO ended without export information".into(),
            ));
        }
        Ok((s, info))
    }

    /// Upgrade to TLS before any other option; a refusal is an error,
    /// never a fall back to plain text.
    /// The TLS client configuration and the directory it came from.
    fn tls_config(
        uri: &NbdUri,
        opts: &ConnectOptions,
    ) -> Result<(std::sync::Arc<rustls::ClientConfig>, std::path::PathBuf), NbdError> {
        let dir = uri
            .tls_certificates
            .clone()
            .or_else(|| opts.tls_certificates.clone())
            .ok_or_else(|| {
                NbdError::Tls(format!(
                    "an nbds address needs a certificates directory holding {}: add ?tls-certificates=DIR to the address or pass --tls-certificates DIR",
                    tls::CA_CERT
                ))
            })?;
        Ok((tls::client_config(&dir)?, dir))
    }

    async fn starttls(
        mut s: Box<dyn Stream>,
        uri: &NbdUri,
        config: std::sync::Arc<rustls::ClientConfig>,
        dir: &std::path::Path,
    ) -> Result<Box<dyn Stream>, NbdError> {
        s.write_all(&p::option_request(p::OPT_STARTTLS, &[]))
            .await
            .map_err(io)?;
        let (h, d) = option_reply(&mut s, p::OPT_STARTTLS).await?;
        if h.reply != p::REP_ACK {
            let msg = String::from_utf8_lossy(&d);
            return Err(NbdError::Tls(format!(
                "the server refused TLS (reply {:#x}{}); not continuing without encryption",
                h.reply,
                if msg.is_empty() {
                    String::new()
                } else {
                    format!(": {msg}")
                }
            )));
        }
        let name = match (&uri.tls_hostname, &uri.endpoint) {
            (Some(n), _) => n.clone(),
            (None, Endpoint::Tcp { host, .. }) => host.clone(),
            (None, Endpoint::Unix(_)) => "localhost".into(),
        };
        let conn = tokio_rustls::TlsConnector::from(config)
            .connect(tls::server_name(&name)?, s)
            .await
            .map_err(|e| {
                NbdError::Tls(format!(
                    "handshake failed: {e} (the server's certificate must be signed by {} and name {name:?})",
                    dir.join(tls::CA_CERT).display()
                ))
            })?;
        Ok(Box::new(conn))
    }

    async fn list(s: &mut Box<dyn Stream>) -> Result<Vec<String>, NbdError> {
        s.write_all(&p::option_request(p::OPT_LIST, &[]))
            .await
            .map_err(io)?;
        let mut names = Vec::new();
        loop {
            let (h, d) = option_reply(s, p::OPT_LIST).await?;
            match h.reply {
                p::REP_SERVER => names.push(p::parse_server(&d)?),
                p::REP_ACK => return Ok(names),
                r => return Err(option_error("listing exports", r, &d)),
            }
        }
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
            Ok(Err(_)) => Err(NbdError::Io(
                "the connection closed before the reply".into(),
            )),
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
    pub async fn block_status(
        &self,
        offset: u64,
        len: u32,
        context: u32,
    ) -> Result<Vec<(u32, u32)>, NbdError> {
        match self
            .submit(
                p::CMD_BLOCK_STATUS,
                0,
                offset,
                len,
                &[],
                Pending::Status {
                    context,
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

/// The reply loop: reads every reply and hands it to its request.
async fn reader(r: ReadHalf<Box<dyn Stream>>, shared: Arc<Mutex<Shared>>, max_payload: u32) {
    // Headers are small: read them from a buffer, not one syscall each.
    // Large payload reads bypass the buffer when it is empty.
    let mut r = tokio::io::BufReader::with_capacity(64 << 10, r);
    let err = match reply_loop(&mut r, &shared, max_payload).await {
        Ok(()) => NbdError::Io("the server closed the connection".into()),
        Err(e) => e,
    };
    tracing::debug!("NBD connection ends: {err}");
    let mut sh = shared.lock().unwrap_or_else(|e| e.into_inner());
    sh.dead = Some(err.clone());
    for (_, f) in sh.inflight.drain() {
        let _ = f.tx.send(Err(err.clone()));
    }
}

fn take(shared: &Mutex<Shared>, cookie: u64) -> Result<InFlight, NbdError> {
    shared
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .inflight
        .remove(&cookie)
        .ok_or_else(|| NbdError::Protocol(format!("reply for unknown cookie {cookie}")))
}

fn put_back(shared: &Mutex<Shared>, cookie: u64, f: InFlight) {
    shared
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .inflight
        .insert(cookie, f);
}

fn finish(f: InFlight) {
    let r = match f.error {
        Some((errno, msg)) => Err(NbdError::Request { errno, msg }),
        None => match f.what {
            Pending::Read { buf, .. } if !buf.complete() => Err(NbdError::Protocol(format!(
                "the reply to a read of {} bytes covered only {:?}",
                buf.want, buf.covered
            ))),
            w => Ok(w),
        },
    };
    let _ = f.tx.send(r);
}

async fn reply_loop<R: AsyncRead + Unpin>(
    r: &mut R,
    shared: &Mutex<Shared>,
    max_payload: u32,
) -> Result<(), NbdError> {
    loop {
        let mut magic = [0u8; 4];
        match r.read_exact(&mut magic).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(io(e)),
        }
        match u32::from_be_bytes(magic) {
            p::SIMPLE_REPLY_MAGIC => {
                let mut h = [0u8; 12];
                read_exact(r, &mut h).await?;
                let errno = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
                let cookie = u64::from_be_bytes(h[4..12].try_into().unwrap_or_default());
                let mut f = take(shared, cookie)?;
                if errno != 0 {
                    f.error = Some((errno, String::new()));
                } else if let Pending::Read { buf, .. } = &mut f.what {
                    let n = buf.want;
                    if let Err(e) = buf.data(r, 0, n).await {
                        let _ = f.tx.send(Err(e.clone()));
                        return Err(e);
                    }
                }
                finish(f);
            }
            p::STRUCTURED_REPLY_MAGIC => {
                let mut h = [0u8; 16];
                read_exact(r, &mut h).await?;
                let h = p::chunk_header(&h);
                let mut f = take(shared, h.cookie)?;
                if let Err(e) = chunk(r, &h, &mut f, max_payload).await {
                    // The request taken out gets the reason too.
                    let _ = f.tx.send(Err(e.clone()));
                    return Err(e);
                }
                if h.flags & p::REPLY_FLAG_DONE != 0 {
                    finish(f);
                } else {
                    put_back(shared, h.cookie, f);
                }
            }
            m => return Err(NbdError::Protocol(format!("bad reply magic {m:#x}"))),
        }
    }
}

async fn payload<R: AsyncRead + Unpin>(
    r: &mut R,
    len: u32,
    limit: u32,
) -> Result<Vec<u8>, NbdError> {
    if len > limit {
        return Err(NbdError::Protocol(format!(
            "chunk of {len} bytes is beyond the limit of {limit}"
        )));
    }
    let mut b = vec![0u8; len as usize];
    read_exact(r, &mut b).await?;
    Ok(b)
}

async fn chunk<R: AsyncRead + Unpin>(
    r: &mut R,
    h: &p::ChunkHeader,
    f: &mut InFlight,
    max_payload: u32,
) -> Result<(), NbdError> {
    match h.kind {
        p::REPLY_TYPE_NONE => {
            if h.len != 0 || h.flags & p::REPLY_FLAG_DONE == 0 {
                return Err(NbdError::Protocol(
                    "NONE chunk with payload or without DONE".into(),
                ));
            }
        }
        p::REPLY_TYPE_OFFSET_DATA => {
            let Pending::Read { offset, buf } = &mut f.what else {
                return Err(NbdError::Protocol(
                    "data chunk for a request that reads nothing".into(),
                ));
            };
            if h.len < 8 || h.len - 8 > max_payload {
                return Err(NbdError::Protocol(format!("data chunk of {} bytes", h.len)));
            }
            let mut o = [0u8; 8];
            read_exact(r, &mut o).await?;
            let at = u64::from_be_bytes(o);
            let n = (h.len - 8) as usize;
            let start = at.checked_sub(*offset).map(|s| s as usize);
            match start.filter(|s| s.checked_add(n).is_some_and(|e| e <= buf.want)) {
                Some(s) => buf.data(r, s, n).await?,
                None => {
                    return Err(NbdError::Protocol(format!(
                        "data chunk at {at}+{n} outside the request"
                    )));
                }
            }
        }
        p::REPLY_TYPE_OFFSET_HOLE => {
            let Pending::Read { offset, buf } = &mut f.what else {
                return Err(NbdError::Protocol(
                    "hole chunk for a request that reads nothing".into(),
                ));
            };
            let d = payload(r, h.len, 12).await?;
            if d.len() != 12 {
                return Err(NbdError::Protocol("hole chunk of a wrong length".into()));
            }
            let at = p::payload_offset(&d)?;
            let n = u32::from_be_bytes([d[8], d[9], d[10], d[11]]) as usize;
            let start = at.checked_sub(*offset).map(|s| s as usize);
            match start.filter(|s| n > 0 && s.checked_add(n).is_some_and(|e| e <= buf.want)) {
                Some(s) => buf.hole(s, n),
                None => {
                    return Err(NbdError::Protocol(format!(
                        "hole at {at}+{n} outside the request"
                    )));
                }
            }
        }
        p::REPLY_TYPE_BLOCK_STATUS => {
            let d = payload(r, h.len, p::MAX_META_CHUNK).await?;
            let (id, ds) = p::parse_block_status(&d)?;
            match &mut f.what {
                Pending::Status { context, descs } if *context == id => descs.extend(ds),
                Pending::Status { .. } => {} // another context: not asked for here
                _ => {
                    return Err(NbdError::Protocol(
                        "block status for a request that is not one".into(),
                    ));
                }
            }
        }
        p::REPLY_TYPE_ERROR | p::REPLY_TYPE_ERROR_OFFSET => {
            let d = payload(r, h.len, p::MAX_META_CHUNK).await?;
            let (errno, msg) = p::parse_error_chunk(&d)?;
            f.error = Some((errno, msg));
        }
        t if t & (1 << 15) != 0 => {
            let _ = payload(r, h.len, p::MAX_META_CHUNK).await?;
            f.error = Some((0, format!("unknown error chunk type {t}")));
        }
        _ => {
            // Unknown non-error chunk: skip it, in bounded pieces.
            let mut left = h.len as usize;
            let mut sink = [0u8; 4096];
            while left > 0 {
                let n = left.min(sink.len());
                read_exact(r, &mut sink[..n]).await?;
                left -= n;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod fuzz {
    //! Arbitrary server bytes, during transmission and during negotiation,
    //! must end in an error or a clean end: never a panic, a hang or an
    //! allocation beyond the limits.
    use super::*;
    use proptest::prelude::*;

    fn with_requests(shared: &Mutex<Shared>) -> Vec<oneshot::Receiver<Result<Pending, NbdError>>> {
        let mut rxs = Vec::new();
        let mut sh = shared.lock().unwrap_or_else(|e| e.into_inner());
        for cookie in 0..4u64 {
            let (tx, rx) = oneshot::channel();
            let what = if cookie % 2 == 0 {
                Pending::Read {
                    offset: 4096 * cookie,
                    buf: ReadBuf::new(BytesMut::new(), 8192),
                }
            } else {
                Pending::Status {
                    context: 1,
                    descs: Vec::new(),
                }
            };
            sh.inflight.insert(
                cookie,
                InFlight {
                    what,
                    error: None,
                    tx,
                },
            );
            rxs.push(rx);
        }
        rxs
    }

    fn structured(flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
        let mut r = p::STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
        r.extend_from_slice(&flags.to_be_bytes());
        r.extend_from_slice(&kind.to_be_bytes());
        r.extend_from_slice(&cookie.to_be_bytes());
        r.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        r.extend_from_slice(payload);
        r
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_reply_streams(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let rt = tokio::runtime::Builder::new_current_thread().build().expect("rt");
            let shared = Mutex::new(Shared::default());
            let _rxs = with_requests(&shared);
            let mut r: &[u8] = &bytes;
            let _ = rt.block_on(reply_loop(&mut r, &shared, 1 << 20));
        }

        #[test]
        fn valid_prefix_then_garbage(kind in prop_oneof![Just(1u16), Just(2), Just(5), Just(32769), Just(9)],
                                     payload in proptest::collection::vec(any::<u8>(), 0..64),
                                     tail in proptest::collection::vec(any::<u8>(), 0..64)) {
            // A well-formed header with a random payload, then random bytes.
            let rt = tokio::runtime::Builder::new_current_thread().build().expect("rt");
            let shared = Mutex::new(Shared::default());
            let _rxs = with_requests(&shared);
            let mut s = structured(0, kind, 0, &payload);
            s.extend_from_slice(&tail);
            let mut r: &[u8] = &s;
            let _ = rt.block_on(reply_loop(&mut r, &shared, 1 << 20));
        }

        #[test]
        fn arbitrary_handshakes(
            tail in proptest::collection::vec(any::<u8>(), 0..300),
            well_formed_hello in any::<bool>(),
            tls in any::<bool>(),
        ) {
            // A server that says hello (or not), then sends arbitrary bytes
            // and hangs up: negotiation ends in an error or an export,
            // never a panic or a hang.
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
            let mut bytes = Vec::new();
            if well_formed_hello {
                bytes.extend_from_slice(&p::NBDMAGIC.to_be_bytes());
                bytes.extend_from_slice(&p::IHAVEOPT.to_be_bytes());
                bytes.extend_from_slice(&(p::FLAG_FIXED_NEWSTYLE | p::FLAG_NO_ZEROES).to_be_bytes());
            }
            bytes.extend_from_slice(&tail);
            let uri = NbdUri::parse(if tls {
                "nbds+unix:///disk?socket=/nonexistent"
            } else {
                "nbd+unix:///disk?socket=/nonexistent"
            }).expect("uri");
            // TLS: STARTTLS and the handshake run against the same bytes
            // (a configuration that trusts nothing: the handshake must fail).
            let config = tls.then(|| {
                let c = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth();
                (std::sync::Arc::new(c), std::path::PathBuf::from("/nonexistent"))
            });
            let r = rt.block_on(async {
                let (client, mut server) = tokio::io::duplex(1 << 16);
                tokio::spawn(async move {
                    let _ = server.write_all(&bytes).await;
                    let _ = server.shutdown().await;
                    let mut sink = vec![0u8; 1 << 16];
                    // Drain what the client sends until it gives up.
                    while let Ok(n) = server.read(&mut sink).await {
                        if n == 0 { break; }
                    }
                });
                let s: Box<dyn Stream> = Box::new(client);
                tokio::time::timeout(
                    Duration::from_secs(5),
                    NbdClient::negotiate(s, &uri, &ConnectOptions::default(), config),
                ).await
            });
            prop_assert!(r.is_ok(), "negotiation hung");
        }

        #[test]
        fn option_parsers(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = p::parse_info(&b);
            let _ = p::parse_meta_context(&b);
            let _ = p::parse_server(&b);
            let _ = p::parse_error_chunk(&b);
            let _ = p::parse_block_status(&b);
            let _ = p::payload_offset(&b);
            if b.len() >= 20 {
                let mut h = [0u8; 20];
                h.copy_from_slice(&b[..20]);
                let _ = p::option_reply_header(&h);
            }
        }
    }

    #[test]
    fn a_read_reply_fills_exactly_its_range() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("rt");
        let hole = |at: u64, n: u32| {
            let mut h = at.to_be_bytes().to_vec();
            h.extend_from_slice(&n.to_be_bytes());
            h
        };
        let mut data = 100u64.to_be_bytes().to_vec();
        data.extend_from_slice(b"abcd");
        // Cookie 0 reads [0, 8192), out of order: a hole at the end, data
        // at 100..104, then holes around it.
        let mut s = structured(0, p::REPLY_TYPE_OFFSET_HOLE, 0, &hole(4096, 4096));
        s.extend(structured(0, p::REPLY_TYPE_OFFSET_DATA, 0, &data));
        s.extend(structured(0, p::REPLY_TYPE_OFFSET_HOLE, 0, &hole(0, 100)));
        let done = structured(
            p::REPLY_FLAG_DONE,
            p::REPLY_TYPE_OFFSET_HOLE,
            0,
            &hole(104, 3992),
        );
        let shared = Mutex::new(Shared::default());
        let mut rxs = with_requests(&shared);
        let mut r: &[u8] = &[s.clone(), done].concat();
        assert!(rt.block_on(reply_loop(&mut r, &shared, 1 << 20)).is_ok());
        match rxs.remove(0).try_recv() {
            Ok(Ok(Pending::Read { buf, .. })) => {
                let buf = buf.buf;
                assert_eq!(buf.len(), 8192);
                assert_eq!(&buf[100..104], b"abcd");
                assert!(buf[..100].iter().chain(&buf[104..]).all(|b| *b == 0));
            }
            _ => panic!("read not completed"),
        }

        // The same without the last hole: bytes 104..4096 were never sent.
        let shared = Mutex::new(Shared::default());
        let mut rxs = with_requests(&shared);
        s.extend(structured(p::REPLY_FLAG_DONE, p::REPLY_TYPE_NONE, 0, &[]));
        let mut r: &[u8] = &s;
        assert!(rt.block_on(reply_loop(&mut r, &shared, 1 << 20)).is_ok());
        match rxs.remove(0).try_recv() {
            Ok(Err(NbdError::Protocol(m))) => assert!(m.contains("covered only"), "{m}"),
            _ => panic!("an incomplete read must fail"),
        }
    }
}
