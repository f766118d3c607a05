//! The chunk, hash/compress and write stages of the pipeline.
//!
//! Invariant: the writer appends frames as they come but writes extents
//! into the manifest in disk order (by sequence number); a chunk is
//! stored once even when several workers meet it at the same time.
//!
//! Sequence numbers: segment `g` of a read in lanes numbers its items from
//! `g << SEGMENT_SHIFT` and closes with an `End`, after which the writer
//! goes on at segment `g + 1`; a read in one lane is all segment 0.

use super::*;

/// Bits of a sequence number that count items inside a segment.
const SEGMENT_SHIFT: u32 = 40;

pub(super) enum Work {
    Chunk(u64, Bytes),
    Zero(u64, u64),
    /// Extents of the parent point, as they are.
    Reused(u64, Vec<Extent>),
    /// The segment's last item came before this one.
    End(u64),
}

pub(super) enum Done {
    New {
        seq: u64,
        id: ChunkId,
        len: u32,
        frame: Vec<u8>,
    },
    Known {
        seq: u64,
        id: ChunkId,
        len: u32,
    },
    Zero {
        seq: u64,
        len: u64,
    },
    Reused {
        seq: u64,
        extents: Vec<Extent>,
    },
    End {
        seq: u64,
    },
}

/// What the writer holds for the manifest until its turn comes.
enum Item {
    One(Extent),
    Run(Vec<Extent>),
    /// The end of a segment: the next item is the next segment's first.
    End,
}

#[derive(Default)]
pub(super) struct WriteStats {
    pub(super) busy: f64,
    pub(super) bytes_zero: u64,
    pub(super) bytes_new: u64,
    pub(super) bytes_stored: u64,
    pub(super) chunks: u64,
    pub(super) chunks_new: u64,
}

/// Numbers every item (chunk or zero run) in disk order and sends it on.
pub(super) struct Emitter {
    pub(super) seq: u64,
    pub(super) tx: Sender<Work>,
    pub(super) broken: bool,
}

impl Emitter {
    pub(super) fn send(&mut self, w: impl FnOnce(u64) -> Work) {
        if !self.broken && self.tx.send(w(self.seq)).is_err() {
            self.broken = true;
        }
        self.seq += 1;
    }
    pub(super) fn chunk(&mut self, b: Bytes) {
        if !b.is_empty() {
            self.send(|s| Work::Chunk(s, b));
        }
    }
}

/// One segment being cut: its chunker and its numbering.
struct Lane {
    chunker: Box<dyn crate::chunker::Chunker>,
    em: Emitter,
    next_data: Option<u64>,
}

impl Lane {
    fn new(chunker: Box<dyn crate::chunker::Chunker>, seg: u32, tx: &Sender<Work>) -> Self {
        Lane {
            chunker,
            em: Emitter {
                seq: u64::from(seg) << SEGMENT_SHIFT,
                tx: tx.clone(),
                broken: false,
            },
            next_data: None,
        }
    }

    fn take(&mut self, m: ReadMsg) {
        let (chunker, em) = (&mut self.chunker, &mut self.em);
        match m {
            ReadMsg::Data(off, b) => {
                if self.next_data != Some(off) {
                    chunker.start(off, &mut |c| em.chunk(c));
                }
                self.next_data = Some(off + b.len() as u64);
                chunker.push(b, &mut |c| em.chunk(c));
            }
            ReadMsg::Zero(_, len) => {
                chunker.finish(&mut |c| em.chunk(c));
                self.next_data = None;
                em.send(|s| Work::Zero(s, len));
            }
            ReadMsg::Reuse(v) => {
                chunker.finish(&mut |c| em.chunk(c));
                self.next_data = None;
                em.send(|s| Work::Reused(s, v));
            }
            ReadMsg::Segment(_) | ReadMsg::SegmentEnd(_) => {}
        }
    }

    fn finish(&mut self) {
        let em = &mut self.em;
        self.chunker.finish(&mut |c| em.chunk(c));
    }
}

/// Cuts what the reader sends into chunks, one chunker per segment being
/// read (`chunker` cuts segment 0, or the whole of a read in one lane).
pub(super) fn chunk_stage(
    chunker: Box<dyn crate::chunker::Chunker>,
    chunking: ChunkingInfo,
    rx: Receiver<ReadMsg>,
    tx: Sender<Work>,
) -> Result<f64> {
    let mut lanes = BTreeMap::from([(0u32, Lane::new(chunker, 0, &tx))]);
    let mut current = 0u32;
    let mut busy = 0f64;
    for m in rx {
        let t = Instant::now();
        let broken = match m {
            ReadMsg::Segment(g) => {
                if let std::collections::btree_map::Entry::Vacant(v) = lanes.entry(g) {
                    v.insert(Lane::new(new_chunker(chunking)?, g, &tx));
                }
                current = g;
                false
            }
            ReadMsg::SegmentEnd(g) => match lanes.remove(&g) {
                Some(mut l) => {
                    l.finish();
                    l.em.send(Work::End);
                    l.em.broken
                }
                None => {
                    return Err(Error::Internal(format!(
                        "reader closed segment {g}, which is not open"
                    )));
                }
            },
            m => match lanes.get_mut(&current) {
                Some(l) => {
                    l.take(m);
                    l.em.broken
                }
                None => {
                    return Err(Error::Internal(format!(
                        "reader sent data for segment {current}, which is closed"
                    )));
                }
            },
        };
        busy += t.elapsed().as_secs_f64();
        if broken {
            return Ok(busy);
        }
    }
    for l in lanes.values_mut() {
        l.finish();
    }
    Ok(busy)
}

pub(super) fn hash_stage(
    store: &dyn StoreSession,
    inflight: &Mutex<HashSet<ChunkId>>,
    compression: Compression,
    rx: Receiver<Work>,
    tx: Sender<Done>,
) -> Result<f64> {
    let mut enc =
        FrameEncoder::new(compression.zstd_level()).map_err(|e| Error::Internal(e.to_string()))?;
    let mut busy = 0f64;
    for w in rx {
        let t = Instant::now();
        let d = match w {
            Work::Zero(seq, len) => Done::Zero { seq, len },
            Work::Reused(seq, extents) => Done::Reused { seq, extents },
            Work::End(seq) => Done::End { seq },
            Work::Chunk(seq, b) => {
                let id = ChunkId::of(&b);
                let len = b.len() as u32;
                let known = store.has(&id)
                    || !inflight
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(id);
                if known {
                    Done::Known { seq, id, len }
                } else {
                    let mut frame =
                        Vec::with_capacity(FRAME_HEADER_LEN + b.len() + b.len() / 64 + 64);
                    enc.encode_into(id, &b, &mut frame)
                        .map_err(|e| Error::Internal(format!("compress: {e}")))?;
                    Done::New {
                        seq,
                        id,
                        len,
                        frame,
                    }
                }
            }
        };
        busy += t.elapsed().as_secs_f64();
        if tx.send(d).is_err() {
            break;
        }
    }
    Ok(busy)
}

pub(super) type ManifestOut = ManifestWriter<BufWriter<File>>;

pub(super) fn write_stage(
    sink: &mut dyn FrameSink,
    mut mw: ManifestOut,
    rx: Receiver<Done>,
) -> Result<(ManifestOut, WriteStats)> {
    let mut st = WriteStats::default();
    let mut pending: BTreeMap<u64, Item> = BTreeMap::new();
    let mut next = 0u64;
    for d in rx {
        let (seq, e) = match d {
            Done::New {
                seq,
                id,
                len,
                frame,
            } => {
                let t = Instant::now();
                st.bytes_stored += frame.len() as u64;
                sink.add(id, len, frame)?;
                st.busy += t.elapsed().as_secs_f64();
                st.bytes_new += u64::from(len);
                st.chunks_new += 1;
                st.chunks += 1;
                (seq, Item::One(Extent::Chunk { id, len }))
            }
            Done::Known { seq, id, len } => {
                st.chunks += 1;
                (seq, Item::One(Extent::Chunk { id, len }))
            }
            Done::Zero { seq, len } => {
                st.bytes_zero += len;
                (seq, Item::One(Extent::Zero { len }))
            }
            Done::Reused { seq, extents } => {
                for e in &extents {
                    match e {
                        Extent::Chunk { .. } => st.chunks += 1,
                        Extent::Zero { len } => st.bytes_zero += len,
                    }
                }
                (seq, Item::Run(extents))
            }
            Done::End { seq } => (seq, Item::End),
        };
        pending.insert(seq, e);
        let manifest_err = |e| Error::io("write", PathBuf::from("point manifest"), e);
        while let Some(item) = pending.remove(&next) {
            next += 1;
            match item {
                Item::One(e) => mw.push(e).map_err(manifest_err)?,
                Item::Run(v) => {
                    for e in v {
                        mw.push(e).map_err(manifest_err)?;
                    }
                }
                Item::End => next = ((next >> SEGMENT_SHIFT) + 1) << SEGMENT_SHIFT,
            }
        }
    }
    // Anything left means an upstream stage stopped early; the caller sees
    // its error, or the size check fails.
    Ok((mw, st))
}
