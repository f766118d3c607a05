//! An NBD server for one disk: a restore point served by `dm export`
//! (fixed newstyle negotiation, structured replies, `base:allocation`
//! block status, multi-conn, STARTTLS), read-only or with writes going to
//! a local overlay.
//!
//! Each connection is served by its own thread, one request at a time
//! (clients that want parallel reads open several connections: the export
//! says `CAN_MULTI_CONN`). Bad client input gets the protocol's error and
//! the connection goes on; input that leaves the stream out of step (a bad
//! magic, an option or a write longer than the limits) ends that
//! connection only. Nothing a client sends is allocated before its length
//! is checked.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::proto as p;
use datamover::{Error, Result};

/// The largest read or write a client may ask for.
pub const MAX_REQUEST: u32 = 32 << 20;
/// The largest option a client may send.
pub const MAX_OPTION: u32 = 64 << 10;
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 64;
/// A connection silent this long (between requests) is closed.
pub const IDLE: Duration = Duration::from_secs(600);

const EPERM: u32 = 1;
const EIO: u32 = 5;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
const CMD_CACHE: u16 = 5;
const OPT_EXPORT_NAME: u32 = 1;
const OPT_INFO: u32 = 6;
const OPT_LIST_META_CONTEXT: u32 = 9;
const INFO_NAME: u16 = 1;
const INFO_DESCRIPTION: u16 = 2;
/// The id of `base:allocation` in our replies.
const ALLOCATION_ID: u32 = 1;

/// What an export serves: a disk to read, and maybe to write.
pub trait Disk: Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Read `buf.len()` bytes at `off` (in range).
    fn read_at(&self, off: u64, buf: &mut [u8]) -> Result<()>;
    /// Allocation of `[off, off+len)`: (length, reads as zeros) runs from
    /// `off`, covering at least some of it.
    fn runs(&self, off: u64, len: u64) -> Vec<(u64, bool)>;
    /// Whether writes are taken.
    fn writable(&self) -> bool {
        false
    }
    /// Write (a writable disk).
    fn write_at(&self, _off: u64, _data: &[u8]) -> Result<()> {
        Err(Error::Unsupported("the export is read-only".into()))
    }
    /// Make `[off, off+len)` read as zeros (a writable disk).
    fn write_zeroes(&self, _off: u64, _len: u64) -> Result<()> {
        Err(Error::Unsupported("the export is read-only".into()))
    }
    /// Make writes durable.
    fn flush(&self) -> Result<()> {
        Ok(())
    }
}

/// Where an export listens: `unix:PATH` or `HOST:PORT`.
#[derive(Debug)]
pub enum Listener {
    /// A unix socket.
    Unix(UnixListener),
    /// TCP.
    Tcp(TcpListener),
}

impl Listener {
    /// Bind `unix:PATH` or `HOST:PORT` (port 0: any free one).
    pub fn bind(address: &str) -> Result<Listener> {
        let l = match address.strip_prefix("unix:") {
            Some(path) => {
                let l = UnixListener::bind(path)
                    .map_err(|e| Error::io("listen at", Path::new(path), e))?;
                Listener::Unix(l)
            }
            None => Listener::Tcp(TcpListener::bind(address).map_err(|e| {
                Error::InvalidArgument(format!(
                    "cannot listen at {address}: {e} (give unix:PATH or HOST:PORT)"
                ))
            })?),
        };
        match &l {
            Listener::Unix(u) => u.set_nonblocking(true),
            Listener::Tcp(t) => t.set_nonblocking(true),
        }
        .map_err(|e| Error::Internal(format!("listener: {e}")))?;
        Ok(l)
    }

    /// The address clients connect to, as an NBD URI for `export`.
    pub fn uri(&self, export: &str, tls: bool) -> String {
        match self {
            Listener::Unix(u) => {
                let path = u
                    .local_addr()
                    .ok()
                    .and_then(|a| a.as_pathname().map(|p| p.display().to_string()))
                    .unwrap_or_default();
                format!(
                    "{}:///{export}?socket={path}",
                    if tls { "nbds+unix" } else { "nbd+unix" }
                )
            }
            Listener::Tcp(t) => {
                let a = t.local_addr().map(|a| a.to_string()).unwrap_or_default();
                format!("{}://{a}/{export}", if tls { "nbds" } else { "nbd" })
            }
        }
    }
}

/// A TLS configuration for the export from a directory laid out as
/// QEMU's `tls-creds-x509 endpoint=server`: `server-cert.pem`,
/// `server-key.pem`, and `ca-cert.pem` (when present, clients must show a
/// certificate it signed).
pub fn tls_config(dir: &Path) -> Result<Arc<rustls::ServerConfig>> {
    let bad =
        |m: String| Error::InvalidArgument(format!("TLS certificates in {}: {m}", dir.display()));
    let cert = dir.join("server-cert.pem");
    let key = dir.join("server-key.pem");
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert)
        .and_then(|i| i.collect())
        .map_err(|e| bad(format!("cannot read {}: {e}", cert.display())))?;
    let key = PrivateKeyDer::from_pem_file(&key)
        .map_err(|e| bad(format!("cannot read {}: {e}", key.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?;
    let ca = dir.join(super::tls::CA_CERT);
    let builder = if ca.exists() {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(&ca).map_err(|e| bad(e.to_string()))? {
            roots
                .add(c.map_err(|e| bad(e.to_string()))?)
                .map_err(|e| bad(e.to_string()))?;
        }
        let v =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| bad(e.to_string()))?;
        builder.with_client_cert_verifier(v)
    } else {
        builder.with_no_client_auth()
    };
    builder
        .with_single_cert(chain, key)
        .map(Arc::new)
        .map_err(|e| bad(e.to_string()))
}

/// How an export runs.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// The export's name (clients may also ask for "").
    pub name: String,
    /// TLS: required of every client when set.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// Serve `disk` on `listener` until `stop` is set: every connection in
/// its own thread (at most [`MAX_CONNECTIONS`]); returns when all ended.
pub fn serve(
    listener: &Listener,
    disk: &dyn Disk,
    opts: &ExportOptions,
    stop: &AtomicBool,
) -> Result<()> {
    let live = AtomicUsize::new(0);
    // A second handle of each open connection, to end it on stop (a
    // thread blocked reading its client wakes up).
    let open: std::sync::Mutex<std::collections::HashMap<u64, Plain>> = Default::default();
    let mut next = 0u64;
    std::thread::scope(|s| {
        while !stop.load(Ordering::Relaxed) {
            let conn: io::Result<Box<dyn Conn>> = match listener {
                Listener::Unix(u) => u.accept().map(|(c, _)| Box::new(c) as Box<dyn Conn>),
                Listener::Tcp(t) => t.accept().map(|(c, _)| {
                    let _ = c.set_nodelay(true);
                    Box::new(c) as Box<dyn Conn>
                }),
            };
            let c = match conn {
                Ok(c) => c,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                Err(e) => {
                    tracing::warn!("export: accept: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            if live.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
                tracing::warn!("export: {MAX_CONNECTIONS} connections already; one refused");
                continue;
            }
            live.fetch_add(1, Ordering::Relaxed);
            next += 1;
            let id = next;
            if let Ok(h) = c.handle() {
                open.lock().unwrap_or_else(|p| p.into_inner()).insert(id, h);
            }
            let (live, open) = (&live, &open);
            s.spawn(move || {
                if let Err(e) = connection(c, disk, opts, stop) {
                    tracing::debug!("export: connection ended: {e}");
                }
                open.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
                live.fetch_sub(1, Ordering::Relaxed);
            });
        }
        for (_, h) in open.lock().unwrap_or_else(|p| p.into_inner()).drain() {
            h.shutdown();
        }
    });
    Ok(())
}

/// A client's stream.
trait Conn: Read + Write + Send {
    fn set_timeouts(&self, d: Option<Duration>) -> io::Result<()>;
    fn into_tcp_or_unix(self: Box<Self>) -> Plain;
    /// Another handle of the same socket.
    fn handle(&self) -> io::Result<Plain>;
}

/// The stream under TLS.
enum Plain {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Plain {
    fn shutdown(&self) {
        let _ = match self {
            Plain::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Plain::Unix(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }
}

impl Read for Plain {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Plain::Tcp(s) => s.read(b),
            Plain::Unix(s) => s.read(b),
        }
    }
}
impl Write for Plain {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Plain::Tcp(s) => s.write(b),
            Plain::Unix(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Plain::Tcp(s) => s.flush(),
            Plain::Unix(s) => s.flush(),
        }
    }
}

impl Conn for TcpStream {
    fn set_timeouts(&self, d: Option<Duration>) -> io::Result<()> {
        self.set_nonblocking(false)?;
        self.set_read_timeout(d)?;
        self.set_write_timeout(d)
    }
    fn into_tcp_or_unix(self: Box<Self>) -> Plain {
        Plain::Tcp(*self)
    }
    fn handle(&self) -> io::Result<Plain> {
        self.try_clone().map(Plain::Tcp)
    }
}

impl Conn for UnixStream {
    fn set_timeouts(&self, d: Option<Duration>) -> io::Result<()> {
        self.set_nonblocking(false)?;
        self.set_read_timeout(d)?;
        self.set_write_timeout(d)
    }
    fn into_tcp_or_unix(self: Box<Self>) -> Plain {
        Plain::Unix(*self)
    }
    fn handle(&self) -> io::Result<Plain> {
        self.try_clone().map(Plain::Unix)
    }
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn violation(m: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, m.into())
}

/// What negotiation agreed on.
struct Agreed {
    structured: bool,
    allocation: bool,
}

fn export_flags(disk: &dyn Disk) -> u16 {
    let mut f = p::TFLAG_HAS_FLAGS | p::TFLAG_SEND_FLUSH | p::TFLAG_CAN_MULTI_CONN;
    if disk.writable() {
        f |= p::TFLAG_SEND_WRITE_ZEROES | p::TFLAG_SEND_TRIM;
    } else {
        f |= p::TFLAG_READ_ONLY;
    }
    f
}

fn connection(
    c: Box<dyn Conn>,
    disk: &dyn Disk,
    opts: &ExportOptions,
    stop: &AtomicBool,
) -> io::Result<()> {
    c.set_timeouts(Some(IDLE))?;
    let mut s: Box<dyn ReadWrite> = Box::new(Stream(c));
    s.write_all(&p::NBDMAGIC.to_be_bytes())?;
    s.write_all(&p::IHAVEOPT.to_be_bytes())?;
    s.write_all(&(p::FLAG_FIXED_NEWSTYLE | p::FLAG_NO_ZEROES).to_be_bytes())?;
    s.flush()?;
    let cflags = read_u32(&mut s)?;
    if cflags & !(p::FLAG_C_FIXED_NEWSTYLE | p::FLAG_C_NO_ZEROES) != 0 {
        return Err(violation(format!("unknown client flags {cflags:#x}")));
    }
    let no_zeroes = cflags & p::FLAG_C_NO_ZEROES != 0;
    let (mut s, agreed) = match negotiate(s, disk, opts, no_zeroes)? {
        Some(x) => x,
        None => return Ok(()),
    };
    transmission(&mut *s, disk, &agreed, stop)
}

/// A stream, plain or TLS.
trait ReadWrite: Read + Write + Send {
    /// Switch to TLS (STARTTLS); `None` when it already is TLS.
    fn start_tls(self: Box<Self>, cfg: Arc<rustls::ServerConfig>)
    -> io::Result<Box<dyn ReadWrite>>;
}

struct Stream(Box<dyn Conn>);

impl Read for Stream {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        self.0.read(b)
    }
}
impl Write for Stream {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0.write(b)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}
impl ReadWrite for Stream {
    fn start_tls(
        self: Box<Self>,
        cfg: Arc<rustls::ServerConfig>,
    ) -> io::Result<Box<dyn ReadWrite>> {
        let conn = rustls::ServerConnection::new(cfg).map_err(io::Error::other)?;
        let mut t = rustls::StreamOwned::new(conn, self.0.into_tcp_or_unix());
        // Finish the handshake now: a client that fails it is gone.
        while t.conn.is_handshaking() {
            t.conn.complete_io(&mut t.sock)?;
        }
        Ok(Box::new(Tls(t)))
    }
}

struct Tls(rustls::StreamOwned<rustls::ServerConnection, Plain>);

impl Read for Tls {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        self.0.read(b)
    }
}
impl Write for Tls {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0.write(b)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}
impl ReadWrite for Tls {
    fn start_tls(
        self: Box<Self>,
        _cfg: Arc<rustls::ServerConfig>,
    ) -> io::Result<Box<dyn ReadWrite>> {
        Err(violation("STARTTLS twice"))
    }
}

fn reply(s: &mut dyn ReadWrite, option: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    s.write_all(&p::option_reply(option, kind, data))?;
    s.flush()
}

fn error_reply(s: &mut dyn ReadWrite, option: u32, kind: u32, msg: &str) -> io::Result<()> {
    reply(s, option, kind, msg.as_bytes())
}

/// A string of an option's data: u32 length then bytes.
fn take_string(d: &[u8], at: &mut usize) -> Option<String> {
    let len = u32::from_be_bytes(d.get(*at..*at + 4)?.try_into().ok()?) as usize;
    *at += 4;
    let b = d.get(*at..(*at).checked_add(len)?)?;
    *at += len;
    String::from_utf8(b.to_vec()).ok()
}

/// Negotiate; `None` when the client ended it (ABORT).
fn negotiate(
    mut s: Box<dyn ReadWrite>,
    disk: &dyn Disk,
    opts: &ExportOptions,
    no_zeroes: bool,
) -> io::Result<Option<(Box<dyn ReadWrite>, Agreed)>> {
    let mut tls_done = false;
    let mut agreed = Agreed {
        structured: false,
        allocation: false,
    };
    let name_ok = |n: &str| n.is_empty() || n == opts.name;
    loop {
        if read_u64(&mut s)? != p::IHAVEOPT {
            return Err(violation("bad option magic"));
        }
        let option = read_u32(&mut s)?;
        let len = read_u32(&mut s)?;
        if len > MAX_OPTION {
            return Err(violation(format!("option of {len} bytes")));
        }
        let mut d = vec![0u8; len as usize];
        s.read_exact(&mut d)?;
        let needs_tls = opts.tls.is_some() && !tls_done;
        if needs_tls && !matches!(option, p::OPT_STARTTLS | p::OPT_ABORT) {
            if option == OPT_EXPORT_NAME {
                return Err(violation("EXPORT_NAME before STARTTLS on a TLS export"));
            }
            error_reply(
                &mut *s,
                option,
                p::REP_ERR_TLS_REQD,
                "this export needs TLS: STARTTLS first",
            )?;
            continue;
        }
        match option {
            p::OPT_ABORT => {
                let _ = reply(&mut *s, option, p::REP_ACK, &[]);
                return Ok(None);
            }
            p::OPT_STARTTLS => {
                let Some(cfg) = opts.tls.clone().filter(|_| !tls_done) else {
                    error_reply(
                        &mut *s,
                        option,
                        p::REP_ERR_POLICY,
                        "no TLS here, or TLS already",
                    )?;
                    continue;
                };
                if len != 0 {
                    error_reply(
                        &mut *s,
                        option,
                        p::REP_ERR_INVALID,
                        "STARTTLS takes no data",
                    )?;
                    continue;
                }
                reply(&mut *s, option, p::REP_ACK, &[])?;
                s = s.start_tls(cfg)?;
                tls_done = true;
            }
            p::OPT_LIST => {
                let mut v = (opts.name.len() as u32).to_be_bytes().to_vec();
                v.extend_from_slice(opts.name.as_bytes());
                reply(&mut *s, option, p::REP_SERVER, &v)?;
                reply(&mut *s, option, p::REP_ACK, &[])?;
            }
            p::OPT_STRUCTURED_REPLY => {
                if len != 0 {
                    error_reply(&mut *s, option, p::REP_ERR_INVALID, "no data expected")?;
                } else {
                    agreed.structured = true;
                    reply(&mut *s, option, p::REP_ACK, &[])?;
                }
            }
            OPT_LIST_META_CONTEXT | p::OPT_SET_META_CONTEXT => {
                let mut at = 0;
                let parsed = take_string(&d, &mut at).and_then(|export| {
                    let n = u32::from_be_bytes(d.get(at..at + 4)?.try_into().ok()?);
                    at += 4;
                    let mut q = Vec::new();
                    for _ in 0..n.min(64) {
                        q.push(take_string(&d, &mut at)?);
                    }
                    (q.len() as u32 == n).then_some((export, q))
                });
                let Some((export, queries)) = parsed else {
                    error_reply(
                        &mut *s,
                        option,
                        p::REP_ERR_INVALID,
                        "bad meta context request",
                    )?;
                    continue;
                };
                if !agreed.structured {
                    error_reply(
                        &mut *s,
                        option,
                        p::REP_ERR_INVALID,
                        "structured replies first",
                    )?;
                    continue;
                }
                if !name_ok(&export) {
                    error_reply(&mut *s, option, p::REP_ERR_UNKNOWN, "no such export")?;
                    continue;
                }
                let listing = option == OPT_LIST_META_CONTEXT;
                let wants = queries
                    .iter()
                    .any(|q| q == "base:allocation" || (listing && (q == "base:" || q.is_empty())))
                    || (listing && queries.is_empty());
                if option == p::OPT_SET_META_CONTEXT {
                    agreed.allocation = wants;
                }
                if wants {
                    let mut v = ALLOCATION_ID.to_be_bytes().to_vec();
                    v.extend_from_slice(b"base:allocation");
                    reply(&mut *s, option, p::REP_META_CONTEXT, &v)?;
                }
                reply(&mut *s, option, p::REP_ACK, &[])?;
            }
            OPT_INFO | p::OPT_GO => {
                let mut at = 0;
                let Some(name) = take_string(&d, &mut at) else {
                    error_reply(&mut *s, option, p::REP_ERR_INVALID, "bad export name")?;
                    continue;
                };
                let n = d
                    .get(at..at + 2)
                    .map(|b| u16::from_be_bytes([b[0], b[1]]) as usize);
                if n.is_none_or(|n| d.len() != at + 2 + 2 * n) {
                    error_reply(
                        &mut *s,
                        option,
                        p::REP_ERR_INVALID,
                        "bad information requests",
                    )?;
                    continue;
                }
                if !name_ok(&name) {
                    error_reply(&mut *s, option, p::REP_ERR_UNKNOWN, "no such export")?;
                    continue;
                }
                let mut export = p::INFO_EXPORT.to_be_bytes().to_vec();
                export.extend_from_slice(&disk.size().to_be_bytes());
                export.extend_from_slice(&export_flags(disk).to_be_bytes());
                reply(&mut *s, option, p::REP_INFO, &export)?;
                let mut bs = p::INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                for v in [1u32, 4096, MAX_REQUEST] {
                    bs.extend_from_slice(&v.to_be_bytes());
                }
                reply(&mut *s, option, p::REP_INFO, &bs)?;
                let asked: Vec<u16> = d[at + 2..]
                    .chunks(2)
                    .map(|c| u16::from_be_bytes([c[0], c[1]]))
                    .collect();
                if asked.contains(&INFO_NAME) {
                    let mut v = INFO_NAME.to_be_bytes().to_vec();
                    v.extend_from_slice(opts.name.as_bytes());
                    reply(&mut *s, option, p::REP_INFO, &v)?;
                }
                if asked.contains(&INFO_DESCRIPTION) {
                    let mut v = INFO_DESCRIPTION.to_be_bytes().to_vec();
                    v.extend_from_slice(b"a datamover restore point");
                    reply(&mut *s, option, p::REP_INFO, &v)?;
                }
                reply(&mut *s, option, p::REP_ACK, &[])?;
                if option == p::OPT_GO {
                    return Ok(Some((s, agreed)));
                }
            }
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&d).into_owned();
                if !name_ok(&name) {
                    return Err(violation("EXPORT_NAME of an unknown export"));
                }
                s.write_all(&disk.size().to_be_bytes())?;
                s.write_all(&export_flags(disk).to_be_bytes())?;
                if !no_zeroes {
                    s.write_all(&[0u8; 124])?;
                }
                s.flush()?;
                // No structured replies in this old way in.
                agreed.structured = false;
                agreed.allocation = false;
                return Ok(Some((s, agreed)));
            }
            _ => error_reply(&mut *s, option, p::REP_ERR_UNSUP, "unsupported option")?,
        }
    }
}

fn simple(s: &mut dyn ReadWrite, cookie: u64, error: u32, data: &[u8]) -> io::Result<()> {
    s.write_all(&p::SIMPLE_REPLY_MAGIC.to_be_bytes())?;
    s.write_all(&error.to_be_bytes())?;
    s.write_all(&cookie.to_be_bytes())?;
    s.write_all(data)?;
    s.flush()
}

fn done(s: &mut dyn ReadWrite, a: &Agreed, cookie: u64) -> io::Result<()> {
    if a.structured {
        s.write_all(&p::structured_chunk(
            p::REPLY_FLAG_DONE,
            p::REPLY_TYPE_NONE,
            cookie,
            &[],
        ))?;
        s.flush()
    } else {
        simple(s, cookie, 0, &[])
    }
}

fn fail(s: &mut dyn ReadWrite, a: &Agreed, cookie: u64, error: u32, msg: &str) -> io::Result<()> {
    if a.structured {
        let m = &msg.as_bytes()[..msg.len().min(4096)];
        let mut pl = error.to_be_bytes().to_vec();
        pl.extend_from_slice(&(m.len() as u16).to_be_bytes());
        pl.extend_from_slice(m);
        s.write_all(&p::structured_chunk(
            p::REPLY_FLAG_DONE,
            p::REPLY_TYPE_ERROR,
            cookie,
            &pl,
        ))?;
        s.flush()
    } else {
        simple(s, cookie, error, &[])
    }
}

fn errno(e: &Error) -> u32 {
    match e {
        Error::Unsupported(_) => EPERM,
        Error::InvalidArgument(_) => EINVAL,
        Error::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC) => ENOSPC,
        _ => EIO,
    }
}

fn transmission(
    s: &mut dyn ReadWrite,
    disk: &dyn Disk,
    a: &Agreed,
    stop: &AtomicBool,
) -> io::Result<()> {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        let mut h = [0u8; 28];
        match s.read_exact(&mut h) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let magic = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
        if magic != p::REQUEST_MAGIC {
            return Err(violation(format!("bad request magic {magic:#x}")));
        }
        let cmd_flags = u16::from_be_bytes([h[4], h[5]]);
        let cmd = u16::from_be_bytes([h[6], h[7]]);
        let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap_or_default());
        let off = u64::from_be_bytes(h[16..24].try_into().unwrap_or_default());
        let len = u32::from_be_bytes([h[24], h[25], h[26], h[27]]);
        let in_range = off
            .checked_add(u64::from(len))
            .is_some_and(|end| end <= disk.size());
        match cmd {
            p::CMD_DISC => return Ok(()),
            p::CMD_READ => {
                if len > MAX_REQUEST || !in_range {
                    fail(s, a, cookie, EINVAL, "read out of range or too large")?;
                    continue;
                }
                buf.resize(len as usize, 0);
                match disk.read_at(off, &mut buf) {
                    Ok(()) if a.structured => {
                        // The chunk's header and offset, then the data as
                        // it is (no copy into one payload).
                        let mut h = Vec::with_capacity(28);
                        h.extend_from_slice(&p::STRUCTURED_REPLY_MAGIC.to_be_bytes());
                        h.extend_from_slice(&p::REPLY_FLAG_DONE.to_be_bytes());
                        h.extend_from_slice(&p::REPLY_TYPE_OFFSET_DATA.to_be_bytes());
                        h.extend_from_slice(&cookie.to_be_bytes());
                        h.extend_from_slice(&(8 + len).to_be_bytes());
                        h.extend_from_slice(&off.to_be_bytes());
                        s.write_all(&h)?;
                        s.write_all(&buf)?;
                        s.flush()?;
                    }
                    Ok(()) => simple(s, cookie, 0, &buf)?,
                    Err(e) => {
                        tracing::warn!("export: read of {len} bytes at {off}: {e}");
                        fail(s, a, cookie, EIO, &e.to_string())?;
                    }
                }
            }
            p::CMD_WRITE => {
                // The payload follows whatever the answer: read it, or
                // end the connection when it is too long to.
                if len > MAX_REQUEST {
                    return Err(violation(format!("write of {len} bytes")));
                }
                buf.resize(len as usize, 0);
                s.read_exact(&mut buf)?;
                if !in_range {
                    fail(s, a, cookie, EINVAL, "write out of range")?;
                } else if !disk.writable() {
                    fail(s, a, cookie, EPERM, "the export is read-only")?;
                } else {
                    match disk.write_at(off, &buf) {
                        Ok(()) => done(s, a, cookie)?,
                        Err(e) => fail(s, a, cookie, errno(&e), &e.to_string())?,
                    }
                }
            }
            p::CMD_WRITE_ZEROES | p::CMD_TRIM => {
                if !in_range {
                    fail(s, a, cookie, EINVAL, "out of range")?;
                } else if !disk.writable() {
                    fail(s, a, cookie, EPERM, "the export is read-only")?;
                } else {
                    match disk.write_zeroes(off, u64::from(len)) {
                        Ok(()) => done(s, a, cookie)?,
                        Err(e) => fail(s, a, cookie, errno(&e), &e.to_string())?,
                    }
                }
            }
            p::CMD_FLUSH => match disk.flush() {
                Ok(()) => done(s, a, cookie)?,
                Err(e) => fail(s, a, cookie, errno(&e), &e.to_string())?,
            },
            CMD_CACHE => {
                if in_range {
                    done(s, a, cookie)?;
                } else {
                    fail(s, a, cookie, EINVAL, "out of range")?;
                }
            }
            p::CMD_BLOCK_STATUS => {
                if !a.structured || !a.allocation || len == 0 || !in_range {
                    fail(
                        s,
                        a,
                        cookie,
                        EINVAL,
                        "block status needs base:allocation and a range",
                    )?;
                    continue;
                }
                let mut pl = ALLOCATION_ID.to_be_bytes().to_vec();
                let most = if cmd_flags & p::CMD_FLAG_REQ_ONE != 0 {
                    1
                } else {
                    1024
                };
                for (l, zero) in disk.runs(off, u64::from(len)).into_iter().take(most) {
                    let l = u32::try_from(l).unwrap_or(u32::MAX);
                    let flags = if zero {
                        p::STATE_HOLE | p::STATE_ZERO
                    } else {
                        0
                    };
                    pl.extend_from_slice(&l.to_be_bytes());
                    pl.extend_from_slice(&flags.to_be_bytes());
                }
                if pl.len() == 4 {
                    fail(s, a, cookie, EINVAL, "empty range")?;
                    continue;
                }
                s.write_all(&p::structured_chunk(
                    p::REPLY_FLAG_DONE,
                    p::REPLY_TYPE_BLOCK_STATUS,
                    cookie,
                    &pl,
                ))?;
                s.flush()?;
            }
            _ => fail(s, a, cookie, EINVAL, "unknown command")?,
        }
    }
}
