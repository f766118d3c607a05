//! Points of a repository another proxy's service holds, read over
//! `dmrs/1` (op `read`): [`RemotePoints`] is a [`PointSource`], so an
//! export, an instant recovery or a file-level restore serves them as it
//! serves a local repository's, and fetches only the chunks read.
//!
//! Invariant: every frame is checked here (CRC, BLAKE3 of the plain bytes
//! against the chunk's id) before a byte of it is served: a damaged or
//! missing chunk is an error for the reads that touch it, never wrong
//! data, and the service is not trusted for more than it can prove.
//!
//! Each reader thread takes a connection of its own from a small pool
//! (a request waits for its answer); a pooled connection the service
//! closed while idle is replaced once, transparently.

use std::path::PathBuf;
use std::sync::Mutex;

use datamover::format::frame::FrameDecoder;
use datamover::format::manifest::PointMeta;
use datamover::reader::{ChunkSource, PointReader, PointSource};
use datamover::{ChunkId, DiskName, Error, PointId};
use datamover_control::api::ServiceAddress;
use datamover_control::pki::Identity;

use super::RemoteStore;
use super::client::ClientStream;
use super::wire::*;

/// Idle connections kept per opened point.
const POOL: usize = 8;

/// The points of a repository a service holds, read as `identity` (which
/// needs the server's read grant for each disk: an instant recovery
/// ordered to this proxy brings one).
#[derive(Debug)]
pub struct RemotePoints {
    store: RemoteStore,
}

impl RemotePoints {
    /// Points of the repository at `at`.
    pub fn new(
        at: ServiceAddress,
        identity: &Identity,
    ) -> Result<RemotePoints, datamover_control::pki::PkiError> {
        Ok(RemotePoints {
            store: RemoteStore::new(at, identity)?,
        })
    }

    /// Bytes on the wire so far, both ways.
    pub fn wire_bytes(&self) -> u64 {
        use std::sync::atomic::Ordering::Relaxed;
        self.store.wire.sent.load(Relaxed) + self.store.wire.received.load(Relaxed)
    }

    /// A read session of `disk`'s point `wanted` names: the connection,
    /// the point and its metadata.
    fn session(
        &self,
        disk: &DiskName,
        wanted: Option<&str>,
    ) -> datamover::Result<(ClientStream, PointId, PointMeta)> {
        let hello = Hello {
            point: wanted.map(str::to_string),
            replica: false,
            task: None,
            ..self.store.hello(disk, Op::Read, None)
        };
        let (s, r) = self.store.connect(&hello)?;
        let (Some(point), Some(meta)) = (r.point, r.parent_meta) else {
            return Err(self.store.err("READY without the point read"));
        };
        let point: PointId = point.parse()?;
        if meta.point != point.as_str() || meta.name != disk.to_string() {
            return Err(self.store.err(format!(
                "READY for {}@{}, not the point of {disk} asked for",
                meta.name, meta.point
            )));
        }
        if wanted.is_some_and(|w| !point.as_str().starts_with(w)) {
            return Err(self
                .store
                .err(format!("READY names point {point}, not {wanted:?}")));
        }
        Ok((s, point, meta))
    }
}

impl PointSource for RemotePoints {
    fn describe(&self) -> String {
        Store::describe(&self.store)
    }

    fn disks(&self) -> datamover::Result<Vec<DiskName>> {
        Err(Error::InvalidArgument(format!(
            "{} lists no disks to this host: name each disk (VM/DISK)",
            self.describe()
        )))
    }

    fn resolve(&self, disk: &DiskName, wanted: Option<&str>) -> datamover::Result<PointId> {
        Ok(self.session(disk, wanted)?.1)
    }

    fn meta(&self, disk: &DiskName, point: &PointId) -> datamover::Result<PointMeta> {
        Ok(self.session(disk, Some(point.as_str()))?.2)
    }

    fn open_point(
        &self,
        disk: &DiskName,
        point: &PointId,
        cache_bytes: u64,
    ) -> datamover::Result<PointReader<'_>> {
        let (mut s, id, _) = self.session(disk, Some(point.as_str()))?;
        let m = self
            .store
            .manifest_file(&mut s, Msg::GetManifest, disk, &id)?;
        let chunks = RemoteChunks {
            points: self,
            disk: disk.clone(),
            point: id,
            idle: Mutex::new(vec![s]),
        };
        PointReader::new(m, Box::new(chunks), cache_bytes)
    }
}

use datamover::Store;

/// The chunks of one point, through pooled read sessions.
struct RemoteChunks<'p> {
    points: &'p RemotePoints,
    disk: DiskName,
    point: PointId,
    idle: Mutex<Vec<ClientStream>>,
}

impl RemoteChunks<'_> {
    fn take(&self) -> Option<ClientStream> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop()
    }

    fn give_back(&self, s: ClientStream) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < POOL {
            idle.push(s);
        }
    }

    /// Ask for chunk `id`: the CHUNK answer's payload.
    fn ask(&self, s: &mut ClientStream, id: ChunkId) -> datamover::Result<Vec<u8>> {
        let st = &self.points.store;
        write_msg(s, Msg::GetChunk, &id.0)
            .and_then(|_| std::io::Write::flush(s))
            .map_err(|e| st.lost(e))?;
        st.expect(s, Msg::Chunk)
    }

    fn damaged(&self, id: ChunkId, detail: String) -> Error {
        Error::corrupt(
            "chunk",
            PathBuf::from(format!(
                "{} ({}@{})",
                self.points.describe(),
                self.disk,
                self.point
            )),
            format!("chunk {}: {detail}", id.short()),
        )
    }
}

impl ChunkSource for RemoteChunks<'_> {
    fn read_chunk(
        &self,
        dec: &mut FrameDecoder,
        id: ChunkId,
        _len: u32,
        out: &mut [u8],
    ) -> datamover::Result<usize> {
        // A pooled connection may have been closed by the service while
        // idle: it is replaced once by a fresh one.
        let mut pooled = self.take();
        let answer = loop {
            let fresh = pooled.is_none();
            let mut s = match pooled.take() {
                Some(s) => s,
                None => {
                    self.points
                        .session(&self.disk, Some(self.point.as_str()))?
                        .0
                }
            };
            match self.ask(&mut s, id) {
                Ok(a) => {
                    self.give_back(s);
                    break a;
                }
                Err(e) if fresh => return Err(e),
                Err(_) => continue,
            }
        };
        let (status, body) = answer
            .split_first()
            .ok_or_else(|| self.points.store.err("an empty CHUNK"))?;
        match ChunkStatus::from_byte(*status) {
            Some(ChunkStatus::Frame) => dec
                .decode_into(body, Some(id), out)
                .map_err(|detail| self.damaged(id, detail)),
            Some(ChunkStatus::Missing) => Err(Error::ChunkMissing {
                chunk: id,
                at: None,
            }),
            Some(ChunkStatus::Unreadable) => Err(self.damaged(
                id,
                format!(
                    "the service cannot read it: {}",
                    String::from_utf8_lossy(body)
                ),
            )),
            None => Err(self.points.store.err(format!("CHUNK with status {status}"))),
        }
    }
}
