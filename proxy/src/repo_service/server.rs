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
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use datamover::format::manifest::{self};
use datamover::replica::{self};
use datamover::{ChunkId, DiskName, Error, Ingest, PointId, Store, TransportKind};

use super::wire::*;
use super::{Served, ServedMap, replica_root};
use datamover_control::pki::{ClientAuth, Identity};

/// Serve the repositories in `served` on `listener` until `stop` is set,
/// one thread per connection (at most 64). Only clients with a
/// certificate from the installation's CA get past TLS.
pub fn serve(
    listener: TcpListener,
    identity: &Identity,
    served: ServedMap,
    stop: Arc<AtomicBool>,
) -> Result<(), crate::error::ProxyError> {
    let tls = identity.server_config(ClientAuth::Required)?;
    let mut cfg = (*tls).clone();
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    let tls = Arc::new(cfg);
    listener
        .set_nonblocking(true)
        .map_err(crate::error::ProxyError::io("repository service: listener"))?;
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

/// The frame worker's end: its ingest, or why it stopped.
fn join<'r>(
    worker: std::thread::ScopedJoinHandle<'_, Result<Ingest<'r>, Error>>,
) -> Result<Ingest<'r>, Error> {
    worker
        .join()
        .unwrap_or_else(|_| Err(Error::Internal("the frame worker panicked".into())))
}

fn session(s: &mut ServerStream, served: &ServedMap) -> Result<(), Error> {
    // What the client sent breaks the protocol: a transport error of the
    // peer (not bad input of ours), told to the client in ERROR.
    let bad = |d: String| Error::transport("repository service client", TransportKind::Protocol, d);
    let (ty, b) = read_msg(s).map_err(net)?;
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
    let repo = crate::open_or_init(&target.path)?;
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
    write_msg(s, Msg::Ready, &json(&ready).map_err(net)?).map_err(net)?;
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
                Msg::GetParent => {
                    if let Some((p, _)) = &parent {
                        let bytes =
                            datamover::store::read_manifest_file(&repo.point_path(&disk, p))?;
                        for part in bytes.chunks(PART) {
                            write_msg(s, Msg::ManifestPart, part).map_err(net)?;
                        }
                    }
                    write_msg(s, Msg::ManifestEnd, &[]).map_err(net)?;
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
                Msg::ManifestPart => {
                    if (manifest.len() + b.len()) as u64 > manifest::MAX_MANIFEST_LEN {
                        return Err(bad("manifest beyond the 1 GiB limit".into()));
                    }
                    manifest.extend_from_slice(&b);
                }
                Msg::Commit => {
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
    write_msg(s, Msg::Committed, &json(&c).map_err(net)?).map_err(net)?;
    s.flush().map_err(net)
}
