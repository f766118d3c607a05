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
//! ## Wire protocol `dmrs/1`
//!
//! Mutual TLS (ALPN `dmrs/1`): both ends present certificates issued by
//! the installation's CA. Then messages, each
//!
//! ```text
//! u32 LE  length of what follows (type + payload), at most 80 MiB
//! u8      type
//! …       payload
//! ```
//!
//! | type | name | direction | payload |
//! |---|---|---|---|
//! | 1 | HELLO | c→s | JSON [`Hello`] (magic `DMRS`, version 1) |
//! | 2 | READY | s→c | JSON [`Ready`] |
//! | 3 | GET_PARENT | c→s | empty |
//! | 4 | MANIFEST_PART | both | manifest bytes (≤ 4 MiB per message) |
//! | 5 | MANIFEST_END | both | empty (s→c: after the parent's parts) |
//! | 6 | HAVE | c→s | n × 32-byte chunk ids |
//! | 7 | MISSING | s→c | n bits, LSB first: 1 = send it |
//! | 8 | FRAMES | c→s | whole chunk frames as stored in packs; no answer |
//! | 10 | COMMIT | c→s | empty, after the manifest's parts |
//! | 11 | COMMITTED | s→c | JSON [`Committed`] |
//! | 255 | ERROR | s→c | JSON `{"error": …}`; the server then closes |
//!
//! A session: HELLO → READY; optionally GET_PARENT; any number of HAVE /
//! FRAMES; MANIFEST_PART…, COMMIT → COMMITTED.
//!
//! The service reads a connection on one thread and answers HAVE at once
//! (from the index as the session began and the frames received so far);
//! a worker thread checks and stores the frames, so reading, checking and
//! writing overlap. COMMIT waits for the worker. HELLO with `op: "latest"`
//! gets READY and the connection ends.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use datamover::format::manifest::{self, Manifest, PointMeta};
use datamover::replica::{self, ReplicaReport};
use datamover::{ChunkId, DiskName, Error, FrameSink, Ingest, PointId, Store, StoreSession};
use rustls::pki_types::ServerName;
use serde::{Deserialize, Serialize};

use crate::pki::{ClientAuth, Identity};

/// ALPN protocol name.
pub const ALPN: &[u8] = b"dmrs/1";
/// Magic in HELLO.
pub const MAGIC: &str = "DMRS";
/// Protocol version.
pub const VERSION: u32 = 1;
/// Largest message.
pub const MAX_MESSAGE: usize = 80 << 20;
/// Frames sent per HAVE/FRAMES round.
const BATCH_BYTES: usize = 8 << 20;
/// Manifest bytes per MANIFEST_PART.
const PART: usize = 4 << 20;
/// FRAMES messages queued for the worker that checks and stores them.
const WORKER_QUEUE: usize = 4;
/// Connections served at once.
const MAX_CONNECTIONS: usize = 64;
/// A silent peer is dropped after this long.
const IDLE: Duration = Duration::from_secs(300);

const HELLO: u8 = 1;
const READY: u8 = 2;
const GET_PARENT: u8 = 3;
const MANIFEST_PART: u8 = 4;
const MANIFEST_END: u8 = 5;
const HAVE: u8 = 6;
const MISSING: u8 = 7;
const FRAMES: u8 = 8;
const COMMIT: u8 = 10;
const COMMITTED: u8 = 11;
const ERROR: u8 = 255;

/// What a client opens a connection for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Op {
    /// Write a new point.
    Backup,
    /// Only ask for the newest point's metadata.
    Latest,
}

/// The first message.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    /// `DMRS`.
    pub magic: String,
    /// Protocol version.
    pub version: u32,
    /// Repository name, as the server assigned it to the service.
    pub repository: String,
    /// Disk name, `vm/disk`.
    pub disk: String,
    /// What for.
    pub op: Op,
    /// When the backup started (RFC 3339; names the point).
    #[serde(default)]
    pub started: Option<String>,
    /// After the commit, bring the disk's replica image
    /// (`<repository>/replicas/<vm>/<disk>.img`) to the new point.
    #[serde(default)]
    pub replica: bool,
}

/// Answer to HELLO.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ready {
    /// The new point (op `backup`).
    pub point: Option<String>,
    /// The disk's newest point.
    pub parent: Option<String>,
    /// Its metadata.
    pub parent_meta: Option<PointMeta>,
}

/// Answer to COMMIT.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Committed {
    /// The point published.
    pub point: String,
    /// Frames received.
    pub frames: u64,
    /// Frames stored (the rest the repository held already).
    pub frames_new: u64,
    /// Bytes stored.
    pub bytes_new: u64,
    /// The replica update, for a replica repository.
    pub replica: Option<ReplicaReport>,
}

#[derive(Debug, Serialize, Deserialize)]
struct ErrorMsg {
    error: String,
}

/// A repository the service offers, as the server assigned it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Served {
    /// Its directory on this proxy.
    pub path: PathBuf,
}

/// The repositories a service offers, by name; the agent updates it from
/// the server's orders.
pub type ServedMap = Arc<RwLock<HashMap<String, Served>>>;

/// Where the replica images of a replica repository live.
pub fn replica_root(path: &Path) -> PathBuf {
    path.join("replicas")
}

// ---- messages ----

fn write_msg(w: &mut impl Write, ty: u8, payload: &[u8]) -> io::Result<()> {
    let len = u32::try_from(payload.len() + 1)
        .ok()
        .filter(|n| *n as usize <= MAX_MESSAGE)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "message too long"))?;
    w.write_all(&len.to_le_bytes())?;
    w.write_all(&[ty])?;
    w.write_all(payload)?;
    Ok(())
}

/// Read one message; its length is checked before anything is allocated.
fn read_msg(r: &mut impl Read) -> io::Result<(u8, Vec<u8>)> {
    let mut h = [0u8; 5];
    r.read_exact(&mut h)?;
    let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
    if len == 0 || len > MAX_MESSAGE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("message length {len} outside 1..={MAX_MESSAGE}"),
        ));
    }
    let mut b = vec![0u8; len - 1];
    r.read_exact(&mut b)?;
    Ok((h[4], b))
}

fn json<T: Serialize>(v: &T) -> io::Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(io::Error::other)
}

// ---- server ----

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

/// Serve the repositories in `served` on `listener` until `stop` is set,
/// one thread per connection (at most 64). Only clients with a
/// certificate from the installation's CA get past TLS.
pub fn serve(
    listener: TcpListener,
    identity: &Identity,
    served: ServedMap,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let tls = identity.server_config(ClientAuth::Required)?;
    let mut cfg = (*tls).clone();
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    let tls = Arc::new(cfg);
    listener.set_nonblocking(true)?;
    let active = Arc::new(AtomicUsize::new(0));
    while !stop.load(Ordering::Relaxed) {
        let (tcp, peer) = match listener.accept() {
            Ok(x) => x,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(e) => {
                tracing::warn!("repository service: accept: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if active.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
            tracing::warn!(
                "repository service: {peer} refused, {MAX_CONNECTIONS} connections busy"
            );
            continue;
        }
        let (tls, served, active) = (tls.clone(), served.clone(), active.clone());
        active.fetch_add(1, Ordering::Relaxed);
        let spawned = std::thread::Builder::new()
            .name("repo-service".into())
            .spawn(move || {
                if let Err(e) = connection(tcp, tls, &served) {
                    tracing::info!("repository service: {peer}: {e}");
                }
                active.fetch_sub(1, Ordering::Relaxed);
            });
        if let Err(e) = spawned {
            tracing::warn!("repository service: cannot start a thread: {e}");
        }
    }
    Ok(())
}

type ServerStream = rustls::StreamOwned<rustls::ServerConnection, TcpStream>;

fn connection(
    tcp: TcpStream,
    tls: Arc<rustls::ServerConfig>,
    served: &ServedMap,
) -> io::Result<()> {
    tcp.set_nonblocking(false)?;
    tcp.set_read_timeout(Some(IDLE))?;
    tcp.set_write_timeout(Some(IDLE))?;
    tcp.set_nodelay(true)?;
    let conn = rustls::ServerConnection::new(tls).map_err(io::Error::other)?;
    let mut s = rustls::StreamOwned::new(conn, tcp);
    let r = session(&mut s, served);
    if let Err(e) = &r {
        // Tell the client why, if it still listens.
        let m = json(&ErrorMsg {
            error: e.to_string(),
        })?;
        let _ = write_msg(&mut s, ERROR, &m).and_then(|_| s.flush());
    }
    s.conn.send_close_notify();
    let _ = s.flush();
    r.map_err(|e| io::Error::other(e.to_string()))
}

/// One session; errors are sent to the client as its message.
/// A lost or broken connection to the client, on the service's side.
fn net(e: io::Error) -> Error {
    Error::Transport {
        address: "repository service client".into(),
        detail: e.to_string(),
    }
}

/// The frame worker's end: its ingest, or why it stopped.
fn join<'r>(
    worker: std::thread::ScopedJoinHandle<'_, Result<Ingest<'r>, Error>>,
) -> Result<Ingest<'r>, Error> {
    worker
        .join()
        .unwrap_or_else(|_| Err(Error::Internal("the frame worker panicked".into())))
}

fn session(s: &mut ServerStream, served: &ServedMap) -> Result<(), Error> {
    let bad = |d: String| Error::InvalidArgument(d);
    let (ty, b) = read_msg(s).map_err(net)?;
    if ty != HELLO {
        return Err(bad(format!("expected HELLO, got message type {ty}")));
    }
    let hello: Hello = serde_json::from_slice(&b).map_err(|e| bad(format!("bad HELLO: {e}")))?;
    if hello.magic != MAGIC || hello.version != VERSION {
        return Err(bad(format!(
            "unsupported protocol {} version {} (this service speaks {MAGIC} {VERSION})",
            hello.magic, hello.version
        )));
    }
    let target = served
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .get(&hello.repository)
        .cloned()
        .ok_or_else(|| {
            bad(format!(
                "this proxy serves no repository {:?}",
                hello.repository
            ))
        })?;
    let disk: DiskName = hello.disk.parse()?;
    let repo = crate::open_or_init(&target.path)?;
    if hello.op == Op::Latest {
        let latest = Store::latest_meta(&repo, &disk)?;
        let ready = Ready {
            point: None,
            parent: latest.as_ref().map(|l| l.0.to_string()),
            parent_meta: latest.map(|l| l.1),
        };
        write_msg(s, READY, &json(&ready).map_err(net)?).map_err(net)?;
        return s.flush().map_err(net);
    }
    let started = hello
        .started
        .as_deref()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&chrono::Utc))
        .ok_or_else(|| bad("HELLO for a backup needs `started` (RFC 3339)".into()))?;
    let ingest = Ingest::begin(&repo, &disk, started)?;
    let parent = Store::latest_meta(&repo, &disk)?;
    let ready = Ready {
        point: Some(ingest.point().to_string()),
        parent: parent.as_ref().map(|p| p.0.to_string()),
        parent_meta: parent.as_ref().map(|p| p.1.clone()),
    };
    write_msg(s, READY, &json(&ready).map_err(net)?).map_err(net)?;
    s.flush().map_err(net)?;
    // This thread reads the connection and answers HAVE at once; a worker
    // checks and stores the frames. HAVE is answered from the index as it
    // was at the start and the ids of every frame forwarded so far, which
    // is what the worker will hold once it has caught up.
    let held = ingest.held_at_begin();
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(WORKER_QUEUE);
    std::thread::scope(|sc| {
        let worker = sc.spawn(move || -> Result<Ingest<'_>, Error> {
            let mut ingest = ingest;
            for b in rx {
                ingest.add_frames(&b)?;
            }
            Ok(ingest)
        });
        let mut tx = Some(tx);
        let mut forwarded: HashSet<ChunkId> = HashSet::new();
        let mut manifest: Vec<u8> = Vec::new();
        loop {
            let (ty, b) = read_msg(s).map_err(net)?;
            match ty {
                GET_PARENT => {
                    if let Some((p, _)) = &parent {
                        let bytes =
                            datamover::store::read_manifest_file(&repo.point_path(&disk, p))?;
                        for part in bytes.chunks(PART) {
                            write_msg(s, MANIFEST_PART, part).map_err(net)?;
                        }
                    }
                    write_msg(s, MANIFEST_END, &[]).map_err(net)?;
                    s.flush().map_err(net)?;
                }
                HAVE => {
                    if b.len() % 32 != 0 {
                        return Err(bad(format!("HAVE of {} bytes, not whole ids", b.len())));
                    }
                    let mut bits = vec![0u8; (b.len() / 32).div_ceil(8)];
                    for (i, id) in b.chunks_exact(32).enumerate() {
                        let mut a = [0u8; 32];
                        a.copy_from_slice(id);
                        let id = ChunkId(a);
                        if !held.contains(&id) && !forwarded.contains(&id) {
                            bits[i / 8] |= 1 << (i % 8);
                        }
                    }
                    write_msg(s, MISSING, &bits).map_err(net)?;
                    s.flush().map_err(net)?;
                }
                FRAMES => {
                    // Headers only here; a run that does not parse is
                    // refused before it is queued.
                    forwarded.extend(Ingest::frame_ids(&b)?);
                    let sent = tx.as_ref().is_some_and(|t| t.send(b).is_ok());
                    if !sent {
                        // The worker stopped taking frames: its error.
                        drop(tx.take());
                        return Err(join(worker).err().unwrap_or_else(|| {
                            Error::Internal("the frame worker stopped early".into())
                        }));
                    }
                }
                MANIFEST_PART => {
                    if (manifest.len() + b.len()) as u64 > manifest::MAX_MANIFEST_LEN {
                        return Err(bad("manifest beyond the 1 GiB limit".into()));
                    }
                    manifest.extend_from_slice(&b);
                }
                COMMIT => {
                    drop(tx.take());
                    let ingest = join(worker)?;
                    return commit(s, &hello, &target, &repo, &disk, ingest, &manifest);
                }
                t => return Err(bad(format!("unexpected message type {t}"))),
            }
        }
    })
}

/// Publish the point (every frame is stored), bring the replica up to
/// date when asked, and answer COMMITTED.
fn commit(
    s: &mut ServerStream,
    hello: &Hello,
    target: &Served,
    repo: &datamover::Repository,
    disk: &DiskName,
    ingest: Ingest<'_>,
    manifest: &[u8],
) -> Result<(), Error> {
    let (frames, frames_new, bytes_new) = (ingest.frames, ingest.frames_new, ingest.bytes_new);
    let point: PointId = ingest.point().clone();
    ingest.commit(manifest)?;
    tracing::info!(
        "repository {}: point {disk}@{point} ({frames_new} of {frames} frames new)",
        hello.repository
    );
    let replica = if hello.replica {
        let img = replica::replica_path(&replica_root(&target.path), disk);
        let r = replica::apply(repo, disk, &point, &img)?;
        tracing::info!(
            "replica {} now holds {point} ({} bytes written)",
            r.path,
            r.bytes_written
        );
        Some(r)
    } else {
        None
    };
    let c = Committed {
        point: point.to_string(),
        frames,
        frames_new,
        bytes_new,
        replica,
    };
    write_msg(s, COMMITTED, &json(&c).map_err(net)?).map_err(net)?;
    s.flush().map_err(net)
}

// ---- client ----

/// Where a repository service is and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceAddress {
    /// `host:port` to connect to.
    pub address: String,
    /// The name its certificate is checked against.
    pub server_name: String,
    /// The repository's name.
    pub repository: String,
    /// Keep the disks' replica images up to date (replication).
    #[serde(default)]
    pub replica: bool,
}

/// A repository service as a [`Store`]: `transports::backup` writes
/// through it exactly as into a local repository.
#[derive(Debug)]
pub struct RemoteStore {
    at: ServiceAddress,
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
    /// Bytes on the wire, every connection of this store.
    pub wire: Arc<Wire>,
    /// The service's answer to the last commit.
    pub last: Mutex<Option<Committed>>,
    /// Where the manifest of each disk's last point written through this
    /// store is kept, so the next backup need not fetch it back.
    cache: Option<PathBuf>,
}

type ClientStream = rustls::StreamOwned<rustls::ClientConnection, Counted<TcpStream>>;

impl RemoteStore {
    /// A store writing to `at` as `identity`.
    pub fn new(at: ServiceAddress, identity: &Identity) -> anyhow::Result<RemoteStore> {
        Ok(RemoteStore {
            tls: identity.client_config(ALPN)?,
            at,
            timeout: IDLE,
            wire: Arc::new(Wire::default()),
            last: Mutex::new(None),
            cache: None,
        })
    }

    /// Keep the manifest of each disk's last point under `dir` (one file
    /// a disk, replaced at each commit). The next backup of the disk then
    /// knows the parent's chunks without a word on the wire: a full read
    /// asks the service only about chunks the parent lacks (an unchanged
    /// disk: none, so about its new manifest crosses), and an incremental
    /// need not fetch the parent. A cached manifest is used only when it
    /// is the parent the service names (disk and point id checked after
    /// decoding).
    pub fn with_manifest_cache(mut self, dir: PathBuf) -> RemoteStore {
        self.cache = Some(dir);
        self
    }

    /// The cache file of `disk`'s last manifest.
    fn cached(&self, disk: &DiskName) -> Option<PathBuf> {
        let safe = |s: &str| -> String {
            s.chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                        c
                    } else {
                        '_'
                    }
                })
                .collect()
        };
        let dir = self.cache.as_ref()?;
        let store = format!("{}@{}", safe(&self.at.repository), safe(&self.at.address));
        Some(
            dir.join(store)
                .join(format!("{}.point", safe(&disk.to_string()))),
        )
    }

    fn err(&self, detail: impl std::fmt::Display) -> Error {
        Error::Transport {
            address: self.describe(),
            detail: detail.to_string(),
        }
    }

    fn connect(&self, hello: &Hello) -> datamover::Result<(ClientStream, Ready)> {
        let addr = self
            .at
            .address
            .to_socket_addrs()
            .map_err(|e| self.err(format!("cannot resolve: {e}")))?
            .next()
            .ok_or_else(|| self.err("no address"))?;
        let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .map_err(|e| self.err(format!("cannot connect: {e}")))?;
        let _ = tcp.set_nodelay(true);
        tcp.set_read_timeout(Some(self.timeout))
            .and_then(|_| tcp.set_write_timeout(Some(self.timeout)))
            .map_err(|e| self.err(e))?;
        let name = ServerName::try_from(self.at.server_name.clone())
            .map_err(|e| self.err(format!("bad server name: {e}")))?;
        let conn =
            rustls::ClientConnection::new(self.tls.clone(), name).map_err(|e| self.err(e))?;
        let mut s = rustls::StreamOwned::new(
            conn,
            Counted {
                inner: tcp,
                wire: self.wire.clone(),
            },
        );
        write_msg(&mut s, HELLO, &json(hello).map_err(|e| self.err(e))?)
            .and_then(|_| s.flush())
            .map_err(|e| self.err(e))?;
        let b = self.expect(&mut s, READY)?;
        let ready: Ready =
            serde_json::from_slice(&b).map_err(|e| self.err(format!("bad READY: {e}")))?;
        Ok((s, ready))
    }

    /// Read a message of type `want`; an ERROR becomes the service's message.
    fn expect(&self, s: &mut ClientStream, want: u8) -> datamover::Result<Vec<u8>> {
        let (ty, b) = read_msg(s).map_err(|e| self.err(format!("connection lost: {e}")))?;
        match ty {
            t if t == want => Ok(b),
            ERROR => {
                let m: ErrorMsg = serde_json::from_slice(&b).unwrap_or(ErrorMsg {
                    error: String::from_utf8_lossy(&b).into_owned(),
                });
                Err(self.err(format!("the repository service refused: {}", m.error)))
            }
            t => Err(self.err(format!("unexpected message type {t} (wanted {want})"))),
        }
    }

    fn hello(&self, disk: &DiskName, op: Op, started: Option<String>) -> Hello {
        Hello {
            magic: MAGIC.into(),
            version: VERSION,
            repository: self.at.repository.clone(),
            disk: disk.to_string(),
            op,
            started,
            replica: self.at.replica,
        }
    }
}

impl Store for RemoteStore {
    fn describe(&self) -> String {
        format!("dmrs://{}/{}", self.at.address, self.at.repository)
    }

    fn latest_meta(&self, disk: &DiskName) -> datamover::Result<Option<(PointId, PointMeta)>> {
        let (_, r) = self.connect(&self.hello(disk, Op::Latest, None))?;
        match (r.parent, r.parent_meta) {
            (Some(p), Some(m)) => Ok(Some((p.parse()?, m))),
            _ => Ok(None),
        }
    }

    fn begin<'s>(
        &'s self,
        disk: &DiskName,
        started: chrono::DateTime<chrono::Utc>,
    ) -> datamover::Result<Box<dyn StoreSession + 's>> {
        let t = started.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let (s, r) = self.connect(&self.hello(disk, Op::Backup, Some(t)))?;
        let point: PointId = r
            .point
            .as_deref()
            .ok_or_else(|| self.err("READY without a point"))?
            .parse()?;
        let session = RemoteSession {
            store: self,
            conn: Mutex::new(s),
            point,
            parent: r.parent,
            known: RwLock::new(HashSet::new()),
            cache: self.cached(disk),
            disk: disk.clone(),
        };
        // The parent's chunks from the cache, if it holds the parent: a
        // full read then asks the service about none of them.
        if let Some(m) = session
            .parent
            .as_deref()
            .and_then(|p| p.parse().ok())
            .and_then(|p| session.cached_parent(&p))
        {
            session.learn(&m);
        }
        Ok(Box::new(session))
    }
}

struct RemoteSession<'s> {
    store: &'s RemoteStore,
    conn: Mutex<ClientStream>,
    point: PointId,
    parent: Option<String>,
    /// Chunks of the parent: held by the repository.
    known: RwLock<HashSet<ChunkId>>,
    /// This disk's manifest cache file.
    cache: Option<PathBuf>,
    disk: DiskName,
}

impl RemoteSession<'_> {
    fn conn(&self) -> std::sync::MutexGuard<'_, ClientStream> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The chunks of `m` (the parent) are held by the repository.
    fn learn(&self, m: &Manifest) {
        let mut k = self.known.write().unwrap_or_else(|p| p.into_inner());
        k.extend(m.extents.iter().filter_map(|e| match e {
            manifest::Extent::Chunk { id, .. } => Some(*id),
            manifest::Extent::Zero { .. } => None,
        }));
    }

    /// The parent's manifest from the cache, if it is that point's.
    fn cached_parent(&self, id: &PointId) -> Option<Manifest> {
        let path = self.cache.as_ref()?;
        let bytes = datamover::store::read_manifest_file(path).ok()?;
        let m = manifest::decode(&bytes).ok()?;
        (m.meta.point == id.as_str() && m.meta.name == self.disk.to_string()).then_some(m)
    }

    /// The parent's manifest from the service.
    fn fetch_parent(&self, id: &PointId) -> datamover::Result<Manifest> {
        let st = self.store;
        let mut s = self.conn();
        write_msg(&mut *s, GET_PARENT, &[])
            .and_then(|_| s.flush())
            .map_err(|e| st.err(e))?;
        let mut bytes = Vec::new();
        loop {
            let (ty, b) = read_msg(&mut *s).map_err(|e| st.err(format!("connection lost: {e}")))?;
            match ty {
                MANIFEST_PART => {
                    if (bytes.len() + b.len()) as u64 > manifest::MAX_MANIFEST_LEN {
                        return Err(st.err("parent manifest beyond the 1 GiB limit"));
                    }
                    bytes.extend_from_slice(&b);
                }
                MANIFEST_END => break,
                ERROR => {
                    let m: ErrorMsg = serde_json::from_slice(&b).unwrap_or(ErrorMsg {
                        error: String::from_utf8_lossy(&b).into_owned(),
                    });
                    return Err(st.err(format!("the repository service refused: {}", m.error)));
                }
                t => return Err(st.err(format!("unexpected message type {t}"))),
            }
        }
        let m = manifest::decode(&bytes).map_err(|e| {
            Error::corrupt(
                "point manifest",
                PathBuf::from(st.describe()),
                format!("{e:?}"),
            )
        })?;
        if m.meta.point != id.as_str() {
            return Err(st.err(format!("sent the manifest of {}, not {id}", m.meta.point)));
        }
        Ok(m)
    }

    /// Keep `bytes` (the committed point's manifest) as this disk's
    /// cached one; a failure only costs a fetch next time.
    fn keep(&self, bytes: &[u8]) {
        let Some(path) = &self.cache else { return };
        let tmp = path.with_extension("tmp");
        let r = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = r {
            tracing::debug!("manifest cache {}: {e}", path.display());
            let _ = std::fs::remove_file(&tmp);
        }
    }
}

impl StoreSession for RemoteSession<'_> {
    fn point(&self) -> &PointId {
        &self.point
    }

    fn parent(&self) -> datamover::Result<Option<(PointId, Manifest)>> {
        let Some(p) = &self.parent else {
            return Ok(None);
        };
        let id: PointId = p.parse()?;
        let m = match self.cached_parent(&id) {
            Some(m) => m,
            None => self.fetch_parent(&id)?,
        };
        self.learn(&m);
        Ok(Some((id, m)))
    }

    fn has(&self, id: &ChunkId) -> bool {
        self.known
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(id)
    }

    fn missing_of(&self, _m: &Manifest) -> Option<ChunkId> {
        // The service checks every chunk a manifest names at commit.
        None
    }

    fn sink(&self, _pack_target: u64) -> datamover::Result<Box<dyn FrameSink + '_>> {
        Ok(Box::new(RemoteSink {
            session: self,
            batch: Vec::new(),
            bytes: 0,
        }))
    }

    fn manifest_temp(&self) -> datamover::Result<(File, PathBuf)> {
        let f = tempfile::Builder::new()
            .prefix("dm-point-")
            .tempfile()
            .map_err(|e| Error::io("create", std::env::temp_dir(), e))?;
        let (file, path) = f
            .keep()
            .map_err(|e| Error::io("create", std::env::temp_dir(), e.error))?;
        Ok((file, path))
    }

    fn commit(self: Box<Self>, path: &Path) -> datamover::Result<()> {
        let st = self.store;
        let bytes = datamover::store::read_manifest_file(path)?;
        let _ = std::fs::remove_file(path);
        let mut s = self.conn();
        for part in bytes.chunks(PART) {
            write_msg(&mut *s, MANIFEST_PART, part).map_err(|e| st.err(e))?;
        }
        write_msg(&mut *s, COMMIT, &[])
            .and_then(|_| s.flush())
            .map_err(|e| st.err(e))?;
        let b = st.expect(&mut s, COMMITTED)?;
        let c: Committed =
            serde_json::from_slice(&b).map_err(|e| st.err(format!("bad COMMITTED: {e}")))?;
        if c.point != self.point.as_str() {
            return Err(st.err(format!("committed {}, not {}", c.point, self.point)));
        }
        drop(s);
        self.keep(&bytes);
        *st.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(c);
        Ok(())
    }
}

struct RemoteSink<'a> {
    session: &'a RemoteSession<'a>,
    batch: Vec<(ChunkId, Vec<u8>)>,
    bytes: usize,
}

impl RemoteSink<'_> {
    /// Ask which frames of the batch the repository lacks; send those.
    fn flush(&mut self) -> datamover::Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let st = self.session.store;
        let mut s = self.session.conn();
        let ids: Vec<u8> = self.batch.iter().flat_map(|(id, _)| id.0).collect();
        write_msg(&mut *s, HAVE, &ids)
            .and_then(|_| s.flush())
            .map_err(|e| st.err(e))?;
        let bits = st.expect(&mut s, MISSING)?;
        if bits.len() != self.batch.len().div_ceil(8) {
            return Err(st.err("MISSING answer of the wrong length"));
        }
        let mut out = Vec::with_capacity(self.bytes);
        for (i, (_, frame)) in self.batch.iter().enumerate() {
            if bits[i / 8] & (1 << (i % 8)) != 0 {
                if out.len() + frame.len() > MAX_MESSAGE - 1 {
                    write_msg(&mut *s, FRAMES, &out).map_err(|e| st.err(e))?;
                    out.clear();
                }
                out.extend_from_slice(frame);
            }
        }
        if !out.is_empty() {
            write_msg(&mut *s, FRAMES, &out).map_err(|e| st.err(e))?;
        }
        self.batch.clear();
        self.bytes = 0;
        Ok(())
    }
}

impl FrameSink for RemoteSink<'_> {
    fn add(&mut self, id: ChunkId, _plain_len: u32, frame: Vec<u8>) -> datamover::Result<()> {
        self.bytes += frame.len();
        self.batch.push((id, frame));
        if self.bytes >= BATCH_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> datamover::Result<()> {
        self.flush()?;
        let st = self.session.store;
        self.session.conn().flush().map_err(|e| st.err(e))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// dmrs/1 on the wire, pinned: the framing (u32 LE length of type +
    /// payload, then the type) and HELLO's JSON. A change here is a new
    /// protocol version.
    #[test]
    fn golden_wire_bytes() {
        let hello = Hello {
            magic: MAGIC.into(),
            version: VERSION,
            repository: "vault".into(),
            disk: "web01/vda".into(),
            op: Op::Backup,
            started: Some("2026-11-28T00:00:00.000Z".into()),
            replica: true,
        };
        let mut b = Vec::new();
        write_msg(&mut b, HELLO, &json(&hello).unwrap()).unwrap();
        let body = br#"{"magic":"DMRS","version":1,"repository":"vault","disk":"web01/vda","op":"backup","started":"2026-11-28T00:00:00.000Z","replica":true}"#;
        let mut want = ((body.len() + 1) as u32).to_le_bytes().to_vec();
        want.push(1);
        want.extend_from_slice(body);
        assert_eq!(b, want);
        let mut m = Vec::new();
        write_msg(&mut m, MISSING, &[0b0000_0101]).unwrap();
        assert_eq!(m, [2, 0, 0, 0, 7, 0b0000_0101]);
        assert_eq!(
            (HELLO, READY, GET_PARENT, MANIFEST_PART, MANIFEST_END, HAVE),
            (1, 2, 3, 4, 5, 6)
        );
        assert_eq!(
            (MISSING, FRAMES, COMMIT, COMMITTED, ERROR),
            (7, 8, 10, 11, 255)
        );
        assert_eq!(ALPN, b"dmrs/1");
    }

    #[test]
    fn messages_round_trip_and_bad_lengths_are_refused() {
        let mut b = Vec::new();
        write_msg(&mut b, HAVE, &[7u8; 64]).unwrap();
        let (t, p) = read_msg(&mut &b[..]).unwrap();
        assert_eq!((t, p.len()), (HAVE, 64));
        // Zero and oversized lengths are errors before any allocation.
        for len in [0u32, (MAX_MESSAGE + 1) as u32, u32::MAX] {
            let mut m = len.to_le_bytes().to_vec();
            m.push(HAVE);
            let e = read_msg(&mut &m[..]).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{len}");
        }
        // A truncated payload is an error, not a short message.
        let e = read_msg(&mut &b[..20]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }
}
