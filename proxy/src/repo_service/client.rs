//! The source proxy's side of the repository service: [`RemoteStore`], a
//! [`Store`] that `transports::backup` writes through exactly as into a
//! local repository.
//!
//! Invariant: only frames the service says it lacks are sent, and a
//! point exists only once the service answered COMMITTED.

use std::collections::HashSet;
use std::fs::File;
use std::io::Write;
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use datamover::format::manifest::{self, PointMeta};
use datamover::repo::PointFile;
use datamover::{ChunkId, DiskName, Error, FrameSink, PointId, Store, StoreSession, TransportKind};
use rustls::pki_types::ServerName;

use datamover_control::api::ServiceAddress;

use super::wire::*;
use super::{Counted, Wire};
use datamover_control::pki::Identity;

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

pub(super) type ClientStream = rustls::StreamOwned<rustls::ClientConnection, Counted<TcpStream>>;

impl RemoteStore {
    /// A store writing to `at` as `identity`.
    pub fn new(
        at: ServiceAddress,
        identity: &Identity,
    ) -> Result<RemoteStore, datamover_control::pki::PkiError> {
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

    /// The service broke the protocol.
    pub(super) fn err(&self, detail: impl std::fmt::Display) -> Error {
        Error::transport(self.describe(), TransportKind::Protocol, detail.to_string())
    }

    /// No connection, or it broke.
    pub(super) fn lost(&self, detail: impl std::fmt::Display) -> Error {
        Error::transport(self.describe(), TransportKind::Connect, detail.to_string())
    }

    /// TLS could not be set up.
    fn tls_err(&self, detail: impl std::fmt::Display) -> Error {
        Error::transport(self.describe(), TransportKind::Tls, detail.to_string())
    }

    /// The service refused (its ERROR message).
    fn refused(&self, detail: impl std::fmt::Display) -> Error {
        Error::transport(self.describe(), TransportKind::Refused, detail.to_string())
    }

    /// A migration's last step: ask the service to start the VM of `disk`
    /// on its replicas (as `start_as`); what it started.
    pub fn start_vm(
        &self,
        disk: &DiskName,
        start_as: Option<&str>,
    ) -> datamover::Result<serde_json::Value> {
        let hello = Hello {
            op: Op::StartVm,
            start_as: start_as.map(str::to_string),
            ..self.hello(disk, Op::StartVm, None)
        };
        let mut s = self.open(&hello)?;
        let b = self.expect(&mut s, Msg::Started)?;
        serde_json::from_slice(&b).map_err(|e| self.err(format!("bad STARTED: {e}")))
    }

    pub(super) fn connect(&self, hello: &Hello) -> datamover::Result<(ClientStream, Ready)> {
        let mut s = self.open(hello)?;
        let b = self.expect(&mut s, Msg::Ready)?;
        let ready: Ready =
            serde_json::from_slice(&b).map_err(|e| self.err(format!("bad READY: {e}")))?;
        Ok((s, ready))
    }

    /// Ask with `ask` for a manifest and write its parts to `out`, at
    /// most [`manifest::MAX_MANIFEST_LEN`] bytes.
    fn receive(
        &self,
        s: &mut ClientStream,
        ask: Msg,
        out: &mut dyn Write,
    ) -> datamover::Result<()> {
        write_msg(s, ask, &[])
            .and_then(|_| s.flush())
            .map_err(|e| self.lost(e))?;
        let mut len = 0u64;
        loop {
            let (ty, b) = read_msg(s).map_err(|e| self.lost(format!("connection lost: {e}")))?;
            match ty {
                Msg::ManifestPart => {
                    len += b.len() as u64;
                    if len > manifest::MAX_MANIFEST_LEN {
                        return Err(self.err("manifest beyond the 1 GiB limit"));
                    }
                    out.write_all(&b)
                        .map_err(|e| Error::io("write", std::env::temp_dir(), e))?;
                }
                Msg::ManifestEnd => return Ok(()),
                Msg::Error => return Err(self.refusal(&b)),
                t => return Err(self.err(format!("unexpected message type {t}"))),
            }
        }
    }

    /// The service sent `name`@`point` when asked for `disk`@`id`.
    fn check_names(
        &self,
        name: &str,
        point: &str,
        disk: &DiskName,
        id: &PointId,
    ) -> datamover::Result<()> {
        if point != id.as_str() || name != disk.to_string() {
            return Err(self.err(format!(
                "sent the manifest of {name}@{point}, not {disk}@{id}"
            )));
        }
        Ok(())
    }

    /// Ask with `ask` for the manifest of point `id` of `disk` into a
    /// temp file (removed once closed): bounded memory at any disk size.
    /// Its metadata is checked to be that point's; its extents are
    /// checked as they are read.
    pub(super) fn manifest_file(
        &self,
        s: &mut ClientStream,
        ask: Msg,
        disk: &DiskName,
        id: &PointId,
    ) -> datamover::Result<PointFile> {
        let tmp = std::env::temp_dir();
        let f = tempfile::tempfile().map_err(|e| Error::io("create", &tmp, e))?;
        let mut w = std::io::BufWriter::new(f);
        self.receive(s, ask, &mut w)?;
        let f = w
            .into_inner()
            .map_err(|e| Error::io("write", &tmp, e.into_error()))?;
        let m = PointFile::from_file(f, &PathBuf::from(self.describe()))?;
        self.check_names(&m.meta.name, &m.meta.point, disk, id)?;
        Ok(m)
    }

    /// The service's ERROR message, as the error it is.
    pub(super) fn refusal(&self, b: &[u8]) -> Error {
        let m: ErrorMsg = serde_json::from_slice(b).unwrap_or(ErrorMsg {
            error: String::from_utf8_lossy(b).into_owned(),
        });
        self.refused(format!("the repository service refused: {}", m.error))
    }

    /// Connect and send HELLO.
    fn open(&self, hello: &Hello) -> datamover::Result<ClientStream> {
        let addr = self
            .at
            .address
            .to_socket_addrs()
            .map_err(|e| self.lost(format!("cannot resolve: {e}")))?
            .next()
            .ok_or_else(|| self.lost("no address"))?;
        let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .map_err(|e| self.lost(format!("cannot connect: {e}")))?;
        let _ = tcp.set_nodelay(true);
        tcp.set_read_timeout(Some(self.timeout))
            .and_then(|_| tcp.set_write_timeout(Some(self.timeout)))
            .map_err(|e| self.lost(e))?;
        let name = ServerName::try_from(self.at.server_name.clone())
            .map_err(|e| self.tls_err(format!("bad server name: {e}")))?;
        let conn =
            rustls::ClientConnection::new(self.tls.clone(), name).map_err(|e| self.tls_err(e))?;
        let mut s = rustls::StreamOwned::new(
            conn,
            Counted {
                inner: tcp,
                wire: self.wire.clone(),
            },
        );
        write_msg(&mut s, Msg::Hello, &json(hello).map_err(|e| self.err(e))?)
            .and_then(|_| s.flush())
            .map_err(|e| self.lost(e))?;
        Ok(s)
    }

    /// Read a message of type `want`; an ERROR becomes the service's message.
    pub(super) fn expect(&self, s: &mut ClientStream, want: Msg) -> datamover::Result<Vec<u8>> {
        let (ty, b) = read_msg(s).map_err(|e| self.lost(format!("connection lost: {e}")))?;
        match ty {
            t if t == want => Ok(b),
            Msg::Error => Err(self.refusal(&b)),
            t => Err(self.err(format!("unexpected message {t} (wanted {want})"))),
        }
    }

    pub(super) fn hello(&self, disk: &DiskName, op: Op, started: Option<String>) -> Hello {
        Hello {
            magic: MAGIC.into(),
            version: VERSION,
            repository: self.at.repository.clone(),
            disk: disk.to_string(),
            op,
            started,
            replica: self.at.replica,
            task: self.at.task,
            start_as: None,
            point: None,
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
        let mut session = RemoteSession {
            store: self,
            conn: Mutex::new(s),
            point,
            parent: r.parent,
            known: RwLock::new(HashSet::new()),
            cache: self.cached(disk),
            from_cache: Mutex::new(None),
            disk: disk.clone(),
        };
        // The parent's chunks from the cache, if it holds the parent: a
        // full read then asks the service about none of them. Kept for
        // `parent`, which then neither reads nor learns it again.
        let cached = session
            .parent
            .as_deref()
            .and_then(|p| p.parse().ok())
            .and_then(|p| session.cached_parent(&p));
        *session
            .from_cache
            .get_mut()
            .unwrap_or_else(|p| p.into_inner()) = cached;
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
    /// The parent's manifest from the cache (its chunks learnt), until
    /// `parent` takes it.
    from_cache: Mutex<Option<PointFile>>,
    disk: DiskName,
}

impl RemoteSession<'_> {
    fn conn(&self) -> std::sync::MutexGuard<'_, ClientStream> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The chunks of `m` (the parent) are held by the repository; reading
    /// them all checks `m` (nothing is learnt from a damaged one).
    fn learn(&self, m: &PointFile) -> datamover::Result<()> {
        let mut ids = HashSet::new();
        for e in m.extents()? {
            if let manifest::Extent::Chunk { id, .. } = e? {
                ids.insert(id);
            }
        }
        let mut k = self.known.write().unwrap_or_else(|p| p.into_inner());
        k.extend(ids);
        Ok(())
    }

    /// The parent's manifest from the cache, if it is that point's and
    /// reads whole.
    fn cached_parent(&self, id: &PointId) -> Option<PointFile> {
        let path = self.cache.as_ref()?;
        let m = PointFile::open(path).ok()?;
        let ours = m.meta.point == id.as_str() && m.meta.name == self.disk.to_string();
        (ours && self.learn(&m).is_ok()).then_some(m)
    }

    /// The parent's manifest from the service.
    fn fetch_parent(&self, id: &PointId) -> datamover::Result<PointFile> {
        let m = self
            .store
            .manifest_file(&mut self.conn(), Msg::GetParent, &self.disk, id)?;
        self.learn(&m)?;
        Ok(m)
    }

    /// Keep a copy of `src` (the committed point's manifest) as this
    /// disk's cached one; a failure only costs a fetch next time.
    fn keep(&self, src: &Path) {
        let Some(path) = &self.cache else { return };
        let tmp = path.with_extension("tmp");
        let r = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::copy(src, &tmp).map(drop))
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

    fn parent(&self) -> datamover::Result<Option<(PointId, PointFile)>> {
        let Some(p) = &self.parent else {
            return Ok(None);
        };
        let id: PointId = p.parse()?;
        let cached = self
            .from_cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let m = match cached {
            Some(m) => m,
            None => self.fetch_parent(&id)?,
        };
        Ok(Some((id, m)))
    }

    fn has(&self, id: &ChunkId) -> bool {
        self.known
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(id)
    }

    fn missing_of(&self, _m: &PointFile) -> datamover::Result<Option<ChunkId>> {
        // The service checks every chunk a manifest names at commit.
        Ok(None)
    }

    fn sink(&self, _pack_target: u64) -> datamover::Result<Box<dyn FrameSink + '_>> {
        Ok(Box::new(RemoteSink {
            session: self,
            batch: Vec::new(),
            bytes: 0,
            asked: Vec::new(),
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
        let mut s = self.conn();
        datamover::store::manifest_parts(path, PART, |part| {
            write_msg(&mut *s, Msg::ManifestPart, part).map_err(|e| st.lost(e))
        })?;
        write_msg(&mut *s, Msg::Commit, &[])
            .and_then(|_| s.flush())
            .map_err(|e| st.lost(e))?;
        let b = st.expect(&mut s, Msg::Committed)?;
        let c: Committed =
            serde_json::from_slice(&b).map_err(|e| st.err(format!("bad COMMITTED: {e}")))?;
        if c.point != self.point.as_str() {
            return Err(st.err(format!("committed {}, not {}", c.point, self.point)));
        }
        drop(s);
        self.keep(path);
        let _ = std::fs::remove_file(path);
        *st.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(c);
        Ok(())
    }
}

/// Frames go in batches of about [`BATCH_BYTES`]: a HAVE asks which
/// of a batch's chunks the repository lacks, a MISSING answers, the
/// lacking frames follow. One batch is always asked ahead: its HAVE
/// goes out before the frames of the batch before it, so the answer's
/// round trip (and the service's work on the frames queued before it)
/// overlaps the making of the next batch instead of stalling it. A
/// chunk in both batches may then be sent twice; the service keeps one.
struct RemoteSink<'a> {
    session: &'a RemoteSession<'a>,
    batch: Vec<(ChunkId, Vec<u8>)>,
    bytes: usize,
    /// The batch whose HAVE is out, its answer not yet read.
    asked: Vec<(ChunkId, Vec<u8>)>,
}

impl RemoteSink<'_> {
    /// Send the asked batch's lacking frames; ask about the current
    /// batch (which becomes the asked one).
    fn flush(&mut self) -> datamover::Result<()> {
        let st = self.session.store;
        let mut s = self.session.conn();
        if !self.batch.is_empty() {
            let ids: Vec<u8> = self.batch.iter().flat_map(|(id, _)| id.0).collect();
            write_msg(&mut *s, Msg::Have, &ids)
                .and_then(|_| s.flush())
                .map_err(|e| st.lost(e))?;
        }
        let asked = std::mem::replace(&mut self.asked, std::mem::take(&mut self.batch));
        self.bytes = 0;
        if asked.is_empty() {
            return Ok(());
        }
        let bits = st.expect(&mut s, Msg::Missing)?;
        if bits.len() != asked.len().div_ceil(8) {
            return Err(st.err("MISSING answer of the wrong length"));
        }
        // The missing frames, in messages of at most MAX_MESSAGE, each
        // frame written from where it lies.
        let mut out: Vec<&[u8]> = Vec::with_capacity(asked.len());
        let mut len = 0;
        for (i, (_, frame)) in asked.iter().enumerate() {
            if bits[i / 8] & (1 << (i % 8)) != 0 {
                if len + frame.len() > MAX_MESSAGE - 1 {
                    write_msg_parts(&mut *s, Msg::Frames, &out).map_err(|e| st.lost(e))?;
                    out.clear();
                    len = 0;
                }
                out.push(frame);
                len += frame.len();
            }
        }
        if !out.is_empty() {
            write_msg_parts(&mut *s, Msg::Frames, &out).map_err(|e| st.lost(e))?;
        }
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
        // The last batch asked, then answered and sent.
        self.flush()?;
        self.flush()?;
        let st = self.session.store;
        self.session.conn().flush().map_err(|e| st.lost(e))
    }
}
