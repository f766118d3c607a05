//! The repository service: serves the repositories the server assigned
//! to this proxy over `dmrs/1`.
//!
//! Invariant: a point is published only when every chunk its manifest
//! names is durable in the repository; a connection that ends before
//! COMMIT leaves no point, and every frame is checked (header, CRC,
//! BLAKE3 of the decompressed bytes) before it is stored.

use std::collections::HashSet;
use std::io::{self, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use datamover::format::manifest::{self};
use datamover::replica::{self};
use datamover::{
    Checked, ChunkId, DiskName, Error, FrameChecker, Ingest, PointId, Store, TransportKind,
};

use super::wire::*;
use super::{Served, ServedMap, replica_root};
use datamover_control::pki::{ClientAuth, Identity};

/// How much of the service one peer, or everybody, may hold.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Sessions at once (past TLS and HELLO).
    pub sessions: usize,
    /// Connections in their TLS handshake at once.
    pub handshakes: usize,
    /// Connections from one IP address at once.
    pub per_address: usize,
    /// Time to finish TLS and send HELLO.
    pub handshake: Duration,
    /// Time a session waits for its peer's next message.
    pub idle: Duration,
    /// Time a HELLO waits for its grant ([`GRANT_WAIT`]).
    pub grant_wait: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            sessions: MAX_CONNECTIONS,
            handshakes: MAX_HANDSHAKES,
            per_address: MAX_PER_ADDRESS,
            handshake: HANDSHAKE,
            idle: SESSION_IDLE,
            grant_wait: GRANT_WAIT,
        }
    }
}

/// Serve the repositories in `served` on `listener` until `stop` is set,
/// with the default [`Limits`].
pub fn serve(
    listener: TcpListener,
    identity: &Identity,
    served: ServedMap,
    stop: Arc<AtomicBool>,
) -> Result<(), crate::error::ProxyError> {
    let live = crate::identity::LiveIdentity::new(identity.clone(), None);
    serve_with(listener, &live, served, stop, Limits::default())
}

/// Counts of what is in use, shared by the accept loop and the
/// connections.
#[derive(Debug, Default)]
struct Usage {
    handshakes: usize,
    sessions: usize,
    by_address: std::collections::HashMap<std::net::IpAddr, usize>,
}

type Shared = Arc<std::sync::Mutex<Usage>>;

fn usage(u: &Shared) -> std::sync::MutexGuard<'_, Usage> {
    u.lock().unwrap_or_else(|p| p.into_inner())
}

/// Serve the repositories in `served` on `listener` until `stop` is set,
/// one thread per connection. A connection first gets a handshake slot
/// (at most `handshakes`, and `per_address` from one address) and
/// `handshake` to finish TLS and send HELLO; only a peer whose
/// certificate the installation's CA signed gets that far, and only then
/// does it take a session slot (at most `sessions`).
pub fn serve_with(
    listener: TcpListener,
    identity: &crate::identity::LiveIdentity,
    served: ServedMap,
    stop: Arc<AtomicBool>,
    limits: Limits,
) -> Result<(), crate::error::ProxyError> {
    // The TLS configuration follows the host's certificate as it is
    // renewed (rebuilt when it changed, checked at each connection).
    let config = |id: &Identity| -> Result<Arc<rustls::ServerConfig>, crate::error::ProxyError> {
        let tls = id.server_config(ClientAuth::Required)?;
        let mut cfg = (*tls).clone();
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        Ok(Arc::new(cfg))
    };
    let mut presented = identity.get();
    let mut tls = config(&presented)?;
    listener
        .set_nonblocking(true)
        .map_err(crate::error::ProxyError::io("repository service: listener"))?;
    let shared: Shared = Default::default();
    let limits = Arc::new(limits);
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
        {
            let mut u = usage(&shared);
            let mine = u.by_address.get(&peer.ip()).copied().unwrap_or(0);
            if u.handshakes >= limits.handshakes || mine >= limits.per_address {
                drop(u);
                tracing::warn!(
                    "repository service: {peer} refused: {} connections handshaking, {mine} from its address",
                    limits.handshakes
                );
                drop(tcp);
                continue;
            }
            u.handshakes += 1;
            *u.by_address.entry(peer.ip()).or_default() += 1;
        }
        let now = identity.get();
        if now.cert_pem != presented.cert_pem {
            match config(&now) {
                Ok(c) => {
                    tls = c;
                    presented = now;
                }
                Err(e) => tracing::warn!("repository service: renewed certificate not usable: {e}"),
            }
        }
        let (tls, u) = (tls.clone(), shared.clone());
        let ctx = Ctx {
            served: served.clone(),
            limits: (*limits).clone(),
            identity: identity.clone(),
        };
        let spawned = std::thread::Builder::new()
            .name("repo-service".into())
            .spawn(move || {
                let mut slot = Slot {
                    usage: u,
                    ip: peer.ip(),
                    session: false,
                };
                if let Err(e) = connection(tcp, tls, &ctx, &mut slot) {
                    tracing::info!("repository service: {peer}: {e}");
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("repository service: cannot start a thread: {e}");
            let mut u = usage(&shared);
            u.handshakes -= 1;
            if let Some(n) = u.by_address.get_mut(&peer.ip()) {
                *n -= 1;
            }
        }
    }
    Ok(())
}

type ServerStream = rustls::StreamOwned<rustls::ServerConnection, TcpStream>;

/// A connection's hold on the counts: a handshake slot, then a session
/// slot; given back when it is dropped.
struct Slot {
    usage: Shared,
    ip: std::net::IpAddr,
    session: bool,
}

impl Slot {
    /// Trade the handshake slot for a session slot, if one is free.
    fn take_session(&mut self, max: usize) -> bool {
        let mut u = usage(&self.usage);
        if u.sessions >= max {
            return false;
        }
        u.handshakes -= 1;
        u.sessions += 1;
        self.session = true;
        true
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut u = usage(&self.usage);
        if self.session {
            u.sessions -= 1;
        } else {
            u.handshakes -= 1;
        }
        if let Some(n) = u.by_address.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                u.by_address.remove(&self.ip);
            }
        }
    }
}

/// What a connection needs of its service.
struct Ctx {
    served: ServedMap,
    limits: Limits,
    /// The host's identity, which signs receipts.
    identity: crate::identity::LiveIdentity,
}

fn connection(
    tcp: TcpStream,
    tls: Arc<rustls::ServerConfig>,
    ctx: &Ctx,
    slot: &mut Slot,
) -> io::Result<()> {
    let limits = &ctx.limits;
    tcp.set_nonblocking(false)?;
    // TLS and HELLO under the short handshake deadline.
    tcp.set_read_timeout(Some(limits.handshake))?;
    tcp.set_write_timeout(Some(limits.handshake))?;
    tcp.set_nodelay(true)?;
    let conn = rustls::ServerConnection::new(tls).map_err(io::Error::other)?;
    let mut s = rustls::StreamOwned::new(conn, tcp);
    let deadline = std::time::Instant::now() + limits.handshake;
    while s.conn.is_handshaking() {
        if std::time::Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "TLS handshake not finished in time",
            ));
        }
        s.conn.complete_io(&mut s.sock)?;
    }
    let r = session(&mut s, ctx, slot);
    if let Err(e) = &r {
        // Tell the client why, if it still listens.
        let m = json(&ErrorMsg {
            error: e.to_string(),
        })?;
        let _ = write_msg(&mut s, Msg::Error, &m).and_then(|_| s.flush());
    }
    s.conn.send_close_notify();
    let _ = s.flush();
    r.map_err(|e| io::Error::other(e.to_string()))
}

/// One session; errors are sent to the client as its message.
/// A lost or broken connection to the client, on the service's side.
fn net(e: io::Error) -> Error {
    Error::transport_from(
        "repository service client",
        TransportKind::Connect,
        e.to_string(),
        e,
    )
}

/// A frame worker's end: what it made, or why it stopped.
fn join<T>(worker: std::thread::ScopedJoinHandle<'_, Result<T, Error>>) -> Result<T, Error> {
    worker
        .join()
        .unwrap_or_else(|_| Err(Error::Internal("a frame worker panicked".into())))
}

/// How long a HELLO waits for its grant: the server sends grants with
/// its answers to this proxy's heartbeats, so a task's first connection
/// may arrive a heartbeat before its grant does.
pub const GRANT_WAIT: Duration = Duration::from_secs(10);

/// The SHA-256 fingerprint of the peer's certificate (TLS has checked it
/// is signed by the installation's CA).
fn peer_fingerprint(s: &ServerStream) -> Option<String> {
    s.conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| datamover_control::pki::fingerprint(c.as_ref()))
}

/// The grant of `peer` for `disk` in repository `repo`, if the server's
/// orders hold one now.
fn grant(
    served: &ServedMap,
    repo: &str,
    peer: &str,
    disk: &DiskName,
    task: Option<u64>,
    read: bool,
) -> Option<datamover_control::api::Grant> {
    served
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .get(repo)?
        .grants
        .iter()
        .find(|g| {
            g.peer == peer && &g.disk == disk && g.read == read && task.is_none_or(|t| t == g.task)
        })
        .cloned()
}

fn not_granted(repo: &str, disk: &DiskName) -> Error {
    Error::transport(
        "repository service client",
        TransportKind::Refused,
        format!(
            "not granted: the server has assigned this host no task writing {disk} to repository {repo:?} (removed, or its task ended)"
        ),
    )
}

/// A migration's last step: start the disk's VM on its replicas here.
fn start_vm(
    s: &mut ServerStream,
    hello: &Hello,
    granted: &datamover_control::api::Grant,
    target: &super::Served,
    repo: &datamover::Repository,
    disk: &DiskName,
) -> Result<(), Error> {
    let refused =
        |d: String| Error::transport("repository service client", TransportKind::Refused, d);
    if !granted.start {
        return Err(refused(format!(
            "task {} may not start VMs here (only a migration task may)",
            granted.task
        )));
    }
    let uri = target.hypervisor.as_deref().ok_or_else(|| {
        refused("this proxy's host is no hypervisor: the server must give it one (dm host set HOST --hypervisor URI)".into())
    })?;
    let vm = disk.vm();
    let name = hello.start_as.as_deref().unwrap_or(vm);
    let on = format!("libvirt:///{name}?uri={uri}");
    transports::libvirt::LibvirtAddress::parse(&on)?;
    tracing::info!(
        "repository service: starting VM {vm} as {name} on {uri} (task {})",
        granted.task
    );
    let r =
        transports::failover::failover(repo, &super::replica_root(&target.path), vm, &on, true)?;
    write_msg(s, Msg::Started, &json(&r).map_err(net)?).map_err(net)?;
    s.flush().map_err(net)
}

/// A read session: one point of `disk`, its manifest and its chunks as
/// asked, under the repository's shared lock, until the client closes.
fn read_point(
    s: &mut ServerStream,
    hello: &Hello,
    granted: &datamover_control::api::Grant,
    repo: &datamover::Repository,
    disk: &DiskName,
) -> Result<(), Error> {
    let bad = |d: String| Error::transport("repository service client", TransportKind::Protocol, d);
    let _lock = repo.lock(datamover::sys::LockMode::Shared, true)?;
    let point = repo.resolve_point(disk, hello.point.as_deref())?;
    if let Some(p) = &granted.point
        && repo.resolve_point(disk, Some(p))? != point
    {
        return Err(Error::transport(
            "repository service client",
            TransportKind::Refused,
            format!(
                "not granted: recovery {} may read point {p} of {disk}, not {point}",
                granted.task
            ),
        ));
    }
    let meta = repo.point_meta(disk, &point)?.meta;
    let ready = Ready {
        point: Some(point.to_string()),
        parent: None,
        parent_meta: Some(meta),
    };
    write_msg(s, Msg::Ready, &json(&ready).map_err(net)?).map_err(net)?;
    s.flush().map_err(net)?;
    let index = repo.load_index()?;
    let packs = datamover::repo::PackReader::new(repo);
    loop {
        let (ty, b) = match read_msg(s) {
            Ok(m) => m,
            // The client is done with the point.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(net(e)),
        };
        match ty {
            Msg::GetManifest => {
                send_manifest(s, &repo.point_path(disk, &point))?;
            }
            Msg::GetChunk => {
                let id: [u8; 32] = b
                    .as_slice()
                    .try_into()
                    .map_err(|_| bad(format!("GET_CHUNK of {} bytes, not one id", b.len())))?;
                let id = ChunkId(id);
                let answer = match index.get(&id) {
                    None => vec![ChunkStatus::Missing as u8],
                    Some(loc) => match packs.read_frame(id, &loc) {
                        Ok(frame) => {
                            let mut a = Vec::with_capacity(frame.len() + 1);
                            a.push(ChunkStatus::Frame as u8);
                            a.extend_from_slice(&frame);
                            a
                        }
                        Err(e) => {
                            tracing::warn!("repository service: chunk {id} of {disk}@{point}: {e}");
                            let mut a = vec![ChunkStatus::Unreadable as u8];
                            a.extend_from_slice(e.to_string().as_bytes());
                            a
                        }
                    },
                };
                write_msg(s, Msg::Chunk, &answer).map_err(net)?;
            }
            t => return Err(bad(format!("unexpected message {t} in a read session"))),
        }
        s.flush().map_err(net)?;
    }
}

fn session(s: &mut ServerStream, ctx: &Ctx, slot: &mut Slot) -> Result<(), Error> {
    let (served, limits) = (&ctx.served, &ctx.limits);
    // What the client sent breaks the protocol: a transport error of the
    // peer (not bad input of ours), told to the client in ERROR.
    let bad = |d: String| Error::transport("repository service client", TransportKind::Protocol, d);
    let (ty, b) = read_msg(s).map_err(net)?;
    // A peer with a certificate of this installation, which sent HELLO:
    // now it may take a session slot, and the session's pace.
    if !slot.take_session(limits.sessions) {
        return Err(Error::transport(
            "repository service client",
            TransportKind::Refused,
            format!(
                "the repository service is busy ({} sessions); try again",
                limits.sessions
            ),
        ));
    }
    s.sock.set_read_timeout(Some(limits.idle)).map_err(net)?;
    s.sock.set_write_timeout(Some(IDLE)).map_err(net)?;
    if ty != Msg::Hello {
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
            Error::transport(
                "repository service client",
                TransportKind::Refused,
                format!("this proxy serves no repository {:?}", hello.repository),
            )
        })?;
    let disk: DiskName = hello.disk.parse()?;
    let peer = peer_fingerprint(s).ok_or_else(|| not_granted(&hello.repository, &disk))?;
    let waited = std::time::Instant::now();
    let granted = loop {
        let read = hello.op == Op::Read;
        if let Some(g) = grant(served, &hello.repository, &peer, &disk, hello.task, read) {
            break g;
        }
        if waited.elapsed() >= limits.grant_wait {
            tracing::warn!(
                "repository service: peer {} refused for {disk} in {}: no grant",
                &peer[..16.min(peer.len())],
                hello.repository
            );
            return Err(not_granted(&hello.repository, &disk));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    if hello.replica != granted.replica {
        return Err(bad(format!(
            "HELLO asks for replica={} but task {} is granted replica={}",
            hello.replica, granted.task, granted.replica
        )));
    }
    if hello.op == Op::Read {
        let repo = datamover::Repository::open(&target.path)?;
        return read_point(s, &hello, &granted, &repo, &disk);
    }
    let repo = crate::open_or_init(&target.path)?;
    if hello.op == Op::StartVm {
        return start_vm(s, &hello, &granted, &target, &repo, &disk);
    }
    if hello.op == Op::Latest {
        let latest = Store::latest_meta(&repo, &disk)?;
        let ready = Ready {
            point: None,
            parent: latest.as_ref().map(|l| l.0.to_string()),
            parent_meta: latest.map(|l| l.1),
        };
        write_msg(s, Msg::Ready, &json(&ready).map_err(net)?).map_err(net)?;
        return s.flush().map_err(net);
    }
    // The point is dated by this service's clock: the peer's `started`
    // is not trusted (a peer could date a point in the future and make it
    // every later backup's parent).
    let started = chrono::Utc::now();
    let ingest = Ingest::begin(&repo, &disk, started)?;
    let parent = Store::latest_meta(&repo, &disk)?;
    let ready = Ready {
        point: Some(ingest.point().to_string()),
        parent: parent.as_ref().map(|p| p.0.to_string()),
        parent_meta: parent.as_ref().map(|p| p.1.clone()),
    };
    write_msg(s, Msg::Ready, &json(&ready).map_err(net)?).map_err(net)?;
    s.flush().map_err(net)?;
    // This thread reads the connection and answers HAVE at once; checkers
    // (one a core, up to CHECKERS) check the frames in parallel and one
    // storer stores them. HAVE is answered from the index as it was at
    // the start and the ids of every frame forwarded so far, which is
    // what the storer will hold once it has caught up.
    let held = ingest.held_at_begin();
    // The manifest goes to a file as its parts arrive (removed unless the
    // commit takes it).
    let mut manifest = Received::new(ingest.manifest_temp()?)?;
    let checkers = std::thread::available_parallelism().map_or(1, |n| n.get().clamp(1, CHECKERS));
    // Messages in flight: one being read, one queued, one a checker, one
    // checked and queued, one being stored.
    let (tx, rx) = crossbeam_channel::bounded::<(u64, Vec<u8>)>(1);
    let (checked_tx, checked_rx) = crossbeam_channel::bounded::<Checked>(1);
    // The storer hands each stored message's buffer back for the next.
    let (back, spare) = crossbeam_channel::bounded::<Vec<u8>>(checkers + 4);
    // Raised by a checker or the storer that failed: the reader stops.
    let failed = AtomicBool::new(false);
    std::thread::scope(|sc| {
        let failed = &failed;
        let check: Vec<_> = (0..checkers)
            .map(|_| {
                let (rx, out) = (rx.clone(), checked_tx.clone());
                sc.spawn(move || -> Result<(), Error> {
                    let mut checker = FrameChecker::new()?;
                    for (first, b) in rx {
                        let c = checker.check(b, first).inspect_err(|_| {
                            failed.store(true, Ordering::Relaxed);
                        })?;
                        if out.send(c).is_err() {
                            break;
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        drop((rx, checked_tx));
        let storer = sc.spawn(move || -> Result<Ingest<'_>, Error> {
            let mut ingest = ingest;
            for c in checked_rx {
                ingest.add_checked(&c).inspect_err(|_| {
                    failed.store(true, Ordering::Relaxed);
                })?;
                let _ = back.try_send(c.into_inner());
            }
            Ok(ingest)
        });
        let mut workers = Some((check, storer));
        // Every checker and the storer joined: the ingest, or the first
        // error (a checker's before the storer's, which then only saw
        // the queue end early).
        let mut finish = |tx: &mut Option<crossbeam_channel::Sender<(u64, Vec<u8>)>>| {
            drop(tx.take());
            let (check, storer) = workers
                .take()
                .ok_or_else(|| Error::Internal("the frame workers joined twice".into()))?;
            let mut checked = Ok(());
            for h in check {
                let r = join(h);
                if checked.is_ok() {
                    checked = r;
                }
            }
            let stored = join(storer);
            checked.and(stored)
        };
        let mut tx = Some(tx);
        let mut forwarded: HashSet<ChunkId> = HashSet::new();
        let mut frames = 0u64;
        loop {
            let mut b = spare.try_recv().unwrap_or_default();
            let ty = read_msg_into(s, &mut b).map_err(net)?;
            // Every message is still granted: a host removed mid-session
            // is cut off within a heartbeat, not at its COMMIT.
            if grant(served, &hello.repository, &peer, &disk, hello.task, false).is_none() {
                let _ = finish(&mut tx);
                return Err(not_granted(&hello.repository, &disk));
            }
            if failed.load(Ordering::Relaxed) {
                return Err(finish(&mut tx)
                    .err()
                    .unwrap_or_else(|| Error::Internal("a frame worker stopped early".into())));
            }
            match ty {
                Msg::GetParent => {
                    match &parent {
                        Some((p, _)) => send_manifest(s, &repo.point_path(&disk, p))?,
                        None => write_msg(s, Msg::ManifestEnd, &[]).map_err(net)?,
                    }
                    s.flush().map_err(net)?;
                }
                Msg::Have => {
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
                    write_msg(s, Msg::Missing, &bits).map_err(net)?;
                    s.flush().map_err(net)?;
                }
                Msg::Frames => {
                    // Headers only here; a run that does not parse is
                    // refused before it is queued.
                    let ids = Ingest::frame_ids(&b)?;
                    let first = frames;
                    frames += ids.len() as u64;
                    forwarded.extend(ids);
                    let sent = tx.as_ref().is_some_and(|t| t.send((first, b)).is_ok());
                    if !sent {
                        // The workers stopped taking frames: their error.
                        return Err(finish(&mut tx).err().unwrap_or_else(|| {
                            Error::Internal("the frame workers stopped early".into())
                        }));
                    }
                }
                Msg::ManifestPart => {
                    if manifest.len + b.len() as u64 > manifest::MAX_MANIFEST_LEN {
                        return Err(bad("manifest beyond the 1 GiB limit".into()));
                    }
                    manifest.write(&b)?;
                }
                Msg::Commit => {
                    let ingest = finish(&mut tx)?;
                    // Still granted (the host or its task may have been
                    // removed while it sent).
                    let g = grant(served, &hello.repository, &peer, &disk, hello.task, false)
                        .ok_or_else(|| not_granted(&hello.repository, &disk))?;
                    let path = manifest.done()?;
                    return commit(s, &hello, &g, &target, &repo, &disk, ingest, &path, ctx);
                }
                t => return Err(bad(format!("unexpected message type {t}"))),
            }
        }
    })
}

/// A manifest being received into a temp file of the repository; the file
/// is removed unless [`Received::done`] hands it on.
struct Received {
    out: Option<io::BufWriter<std::fs::File>>,
    path: PathBuf,
    len: u64,
}

impl Received {
    fn new((file, path): (std::fs::File, PathBuf)) -> Result<Self, Error> {
        Ok(Received {
            out: Some(io::BufWriter::with_capacity(1 << 20, file)),
            path,
            len: 0,
        })
    }

    fn write(&mut self, b: &[u8]) -> Result<(), Error> {
        if let Some(o) = &mut self.out {
            o.write_all(b)
                .map_err(|e| Error::io("write", &self.path, e))?;
        }
        self.len += b.len() as u64;
        Ok(())
    }

    /// The file, written and synced; the caller removes it from now on.
    fn done(mut self) -> Result<PathBuf, Error> {
        let out = self
            .out
            .take()
            .ok_or_else(|| Error::Internal("manifest received twice".into()))?;
        let f = out
            .into_inner()
            .map_err(|e| Error::io("write", &self.path, e.into_error()))?;
        f.sync_all().map_err(|e| Error::io("sync", &self.path, e))?;
        Ok(std::mem::take(&mut self.path))
    }
}

impl Drop for Received {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Send the manifest at `path` in parts, then MANIFEST_END.
fn send_manifest(s: &mut ServerStream, path: &Path) -> Result<(), Error> {
    datamover::store::manifest_parts(path, PART, |part| {
        write_msg(s, Msg::ManifestPart, part).map_err(net)
    })?;
    write_msg(s, Msg::ManifestEnd, &[]).map_err(net)
}

/// Publish the point (every frame is stored), bring the replica up to
/// date when asked, and answer COMMITTED.
#[allow(clippy::too_many_arguments)]
fn commit(
    s: &mut ServerStream,
    hello: &Hello,
    grant: &datamover_control::api::Grant,
    target: &Served,
    repo: &datamover::Repository,
    disk: &DiskName,
    ingest: Ingest<'_>,
    manifest: &Path,
    ctx: &Ctx,
) -> Result<(), Error> {
    let replica = grant.replica;
    let (frames, frames_new, bytes_new) = (ingest.frames, ingest.frames_new, ingest.bytes_new);
    let point: PointId = ingest.point().clone();
    ingest.commit(manifest)?;
    tracing::info!(
        "repository {}: point {disk}@{point} ({frames_new} of {frames} frames new)",
        hello.repository
    );
    let replica = if replica {
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
    // The receipt the server checks before it counts the task a success.
    let size = repo.point_meta(disk, &point)?.meta.disk_size;
    let receipt = datamover_control::api::Receipt::signed(
        &ctx.identity.get(),
        grant.task,
        &hello.repository,
        disk,
        &point,
        size,
    )
    .map_err(|e| Error::Internal(format!("sign the receipt: {e}")))?;
    let c = Committed {
        point: point.to_string(),
        frames,
        frames_new,
        bytes_new,
        replica,
        receipt: Some(receipt),
    };
    write_msg(s, Msg::Committed, &json(&c).map_err(net)?).map_err(net)?;
    s.flush().map_err(net)
}
