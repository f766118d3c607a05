//! The reader stage: walks the source in disk order, one window of
//! extents at a time, and sends data, zero runs and reused parent extents
//! to the chunker.
//!
//! Invariant: holes and zero extents are never read; every byte of the
//! disk is covered exactly once, in order, by what is sent.

use super::*;

/// What the reader sends the chunker, in disk order.
#[derive(Debug)]
pub(super) enum ReadMsg {
    /// Bytes read at an offset.
    Data(u64, Bytes),
    /// Zeros: (offset, length).
    Zero(u64, u64),
    /// Unchanged extents of the parent point, taken as they are: a run of
    /// them in one message (an incremental of a large disk sends about
    /// one extent per MiB of it; one message, and one wake-up of each
    /// stage, per extent was most of its cost).
    Reuse(Vec<Extent>),
    /// What follows, up to the next `Segment`, belongs to segment `g` of a
    /// full read in lanes ([`read_full_lanes`]).
    Segment(u32),
    /// Segment `g` is complete.
    SegmentEnd(u32),
}

impl ReadMsg {
    /// (offset, length) of data and zero runs.
    pub(super) fn span(&self) -> (u64, u64) {
        match self {
            ReadMsg::Data(o, b) => (*o, b.len() as u64),
            ReadMsg::Zero(o, l) => (*o, *l),
            ReadMsg::Reuse(v) => (0, v.iter().map(Extent::len).sum()),
            ReadMsg::Segment(_) | ReadMsg::SegmentEnd(_) => (0, 0),
        }
    }
}

#[derive(Default)]
pub(super) struct ReadStats {
    pub(super) busy: f64,
    pub(super) bytes_read: u64,
}

/// Reads the source in order, one preferred-size piece at a time, asking
/// for extents one window at a time; holes and zero extents are not read.
pub(super) struct Scanner<'a> {
    pub(super) src: &'a dyn BlockSource,
    pub(super) progress: &'a Option<ProgressFn>,
    pub(super) size: u64,
    pub(super) io: u64,
    /// Extents (holes left out) of the window `[win.0, win.1)`.
    pub(super) exts: Vec<SourceExtent>,
    pub(super) win: (u64, u64),
    /// The next window's extents, asked for early when reads ahead reach
    /// it, so read-ahead does not stall at every window's edge.
    pub(super) next: Option<(u64, u64, Vec<SourceExtent>)>,
    pub(super) reported: u64,
    /// Reads announced with `will_read` end here.
    pub(super) hinted: u64,
    /// Windows end at the read's limit (rounded up to `io`): set for the
    /// regions of an incremental, which read a chunk or a few here and
    /// there, so a change costs a look at its chunk's extents rather than
    /// at its whole 64 MiB window (on a 1 TiB disk with changes 400 MiB
    /// apart, that was one window of extents per change).
    pub(super) narrow: bool,
    /// Scanners reading the source in turn (lanes): each announces its
    /// share of the source's read-ahead.
    pub(super) lanes: usize,
    pub(super) st: ReadStats,
}

impl<'a> Scanner<'a> {
    pub(super) fn new(src: &'a dyn BlockSource, progress: &'a Option<ProgressFn>) -> Self {
        let io = src
            .preferred_io_size()
            .clamp(ZERO_BLOCK, 16 << 20)
            .next_power_of_two() as u64;
        Scanner {
            src,
            progress,
            size: src.size(),
            io,
            exts: Vec::new(),
            win: (0, 0),
            next: None,
            reported: 0,
            hinted: 0,
            narrow: false,
            lanes: 1,
            st: ReadStats::default(),
        }
    }

    /// Tell progress the reader is at `pos`; an error when cancelled.
    pub(super) fn report(&mut self, pos: u64) -> Result<()> {
        self.reported = self.reported.max(pos);
        if report(self.progress, self.reported, self.size) {
            Ok(())
        } else {
            Err(Error::Cancelled)
        }
    }

    /// Announce the reads that follow `[.., end)` inside this window's
    /// data extents and before `limit`, up to the source's read-ahead.
    pub(super) fn hint(&mut self, end: u64, limit: u64) {
        let n = self.src.read_ahead();
        if n == 0 {
            return;
        }
        let n = (n / self.lanes.max(1)).max(1);
        let mut p = self.hinted.max(end);
        let horizon = limit.min(end + n as u64 * self.io);
        let (ws, we) = (self.win.1, self.window_end(self.win.1, limit));
        if horizon > ws && ws < limit && self.next.as_ref().is_none_or(|x| x.0 != ws) {
            // An error is left for the step that enters the window.
            self.next = self.load(ws, we).ok().map(|x| (ws, we, x));
        }
        let next = self.next.as_ref().map_or(&[][..], |x| x.2.as_slice());
        let i = self.exts.partition_point(|e| e.offset + e.len <= p);
        for e in self.exts[i..].iter().chain(next) {
            if p >= horizon {
                break;
            }
            if e.kind != ExtentKind::Data || e.offset + e.len <= p {
                continue;
            }
            p = p.max(e.offset);
            while p < horizon && p < e.offset + e.len {
                let to = (e.offset + e.len)
                    .min((p / self.io + 1) * self.io)
                    .min(limit);
                self.src.will_read(p, (to - p) as usize);
                p = to;
            }
        }
        self.hinted = p.max(self.hinted);
    }

    /// Where the window that starts at `pos` ends: on the grid of
    /// [`WINDOW`]s, or (narrow) at the first `io` boundary at or past
    /// `limit`, so pieces end where a full read's do.
    fn window_end(&self, pos: u64, limit: u64) -> u64 {
        let w = WINDOW.max(self.io);
        let end = self.size.min((pos / w + 1) * w);
        if self.narrow {
            end.min(limit.max(pos + 1).next_multiple_of(self.io))
        } else {
            end
        }
    }

    /// The extents of `[from, to)` as the source gives them, checked to
    /// tile the range in order.
    fn load(&mut self, from: u64, to: u64) -> Result<Vec<SourceExtent>> {
        let t = Instant::now();
        let exts = self.src.extents(from, to - from)?;
        self.st.busy += t.elapsed().as_secs_f64();
        let mut at = from;
        for e in &exts {
            if e.offset < at || e.len == 0 || e.offset + e.len > to {
                return Err(Error::Internal(format!(
                    "source reported extent {}+{} outside window {at}..{to}",
                    e.offset, e.len
                )));
            }
            at = e.offset + e.len;
        }
        Ok(exts
            .into_iter()
            .filter(|e| e.kind != ExtentKind::Hole)
            .collect())
    }

    /// Describe the disk from `pos` on (at most to the next preferred-size
    /// boundary, extent edge or `limit`) into `out`; returns where it stopped.
    pub(super) fn step(&mut self, pos: u64, limit: u64, out: &mut Vec<ReadMsg>) -> Result<u64> {
        if pos < self.win.0 || pos >= self.win.1 {
            // Windows (and reads) sit on a grid of absolute offsets, so a
            // region read from the middle of the disk sees the same pieces
            // as a full read: same zero runs, same chunks.
            if let Some((s, e, x)) = self.next.take_if(|x| x.0 <= pos && pos < x.1) {
                self.exts = x;
                self.win = (s, e);
            } else {
                let wend = self.window_end(pos, limit);
                self.exts = self.load(pos, wend)?;
                self.win = (pos, wend);
            }
        }
        let i = self.exts.partition_point(|e| e.offset + e.len <= pos);
        Ok(match self.exts.get(i).copied() {
            Some(e) if e.offset <= pos && e.kind == ExtentKind::Data => {
                // Where a full read's piece ends.
                let natural = (e.offset + e.len).min((pos / self.io + 1) * self.io);
                let end = natural.min(limit);
                // From the zero block's start and to its end, so a read that
                // starts or stops inside one (an incremental region) judges
                // it as a full read does; what lies outside is dropped.
                let from = e.offset.max(pos - pos % ZERO_BLOCK as u64);
                let to = natural.min(end.next_multiple_of(ZERO_BLOCK as u64));
                self.hint(end, limit);
                let t = Instant::now();
                let buf = self.src.read_bytes(from, (to - from) as usize)?;
                self.st.busy += t.elapsed().as_secs_f64();
                if buf.len() as u64 != to - from {
                    return Err(Error::Internal(format!(
                        "source returned {} bytes for a read of {}",
                        buf.len(),
                        to - from
                    )));
                }
                self.st.bytes_read += to - from;
                let first = out.len();
                split_zero(from, buf, out);
                if to > end {
                    let read: Vec<ReadMsg> = out.drain(first..).collect();
                    for m in read {
                        let (o, l) = m.span();
                        if o >= end {
                            continue;
                        }
                        let keep = (end - o).min(l);
                        out.push(match m {
                            ReadMsg::Data(o, b) => ReadMsg::Data(o, b.slice(..keep as usize)),
                            ReadMsg::Zero(o, _) => ReadMsg::Zero(o, keep),
                            r => r,
                        });
                    }
                }
                if from < pos {
                    let read: Vec<ReadMsg> = out.drain(first..).collect();
                    for m in read {
                        let (o, l) = m.span();
                        if o + l <= pos {
                            continue;
                        }
                        let skip = pos.saturating_sub(o);
                        out.push(match m {
                            ReadMsg::Data(o, b) => {
                                ReadMsg::Data(o + skip, b.slice(skip as usize..))
                            }
                            ReadMsg::Zero(o, l) => ReadMsg::Zero(o + skip, l - skip),
                            r => r,
                        });
                    }
                }
                end
            }
            Some(e) if e.offset <= pos => {
                let end = (e.offset + e.len).min(limit);
                out.push(ReadMsg::Zero(pos, end - pos));
                end
            }
            Some(e) => {
                let end = e.offset.min(limit);
                out.push(ReadMsg::Zero(pos, end - pos));
                end
            }
            None => {
                let end = self.win.1.min(limit);
                out.push(ReadMsg::Zero(pos, end - pos));
                end
            }
        })
    }
}

/// A full run: every byte of the disk, in order.
pub(super) fn read_full(sc: &mut Scanner<'_>, tx: &Sender<ReadMsg>) -> Result<()> {
    let mut out = Vec::new();
    let mut pos = 0u64;
    sc.report(0)?;
    while pos < sc.size {
        pos = sc.step(pos, sc.size, &mut out)?;
        for m in out.drain(..) {
            if tx.send(m).is_err() {
                return Ok(());
            }
        }
        sc.report(pos)?;
    }
    Ok(())
}

/// Segments of a full read in lanes are at most this long: the writer
/// holds the second lane's extents until the first lane's segment is done
/// (a 16 GiB segment is 16,384 extents of 1 MiB chunks, 262,144 at
/// worst when data and zero blocks alternate: about 16 MiB).
pub(super) const LANE_SPAN_MAX: u64 = 16 << 30;

/// The length of the segments a full read takes two at a time in
/// [`read_full_lanes`], or `None` when it reads in one lane.
///
/// Two lanes keep the cores and the repository's disk busy together: in
/// one lane a stretch of incompressible data (media, archives, encrypted
/// files) costs little CPU but as many bytes of pack writes as it has,
/// so the cores wait on the disk, and in compressible data the disk waits
/// on the cores. Reading two parts of the disk in turn mixes the two.
/// Only for fixed chunks (their cuts sit on a grid, and segments start on
/// the grid of reads and chunks, so each segment is cut as a read in one
/// lane cuts it and the point is the same) and sources that do not ask to
/// be read in order ([`Capabilities::sequential`](crate::source::Capabilities)).
/// A source that fetches ahead gets half its
/// read-ahead announced by each lane.
pub(super) fn lane_span(sc: &Scanner<'_>, chunking: ChunkingInfo) -> Option<u64> {
    let grid = sc.io.max(u64::from(chunking.block_size)).max(1);
    let span = sc
        .size
        .div_ceil(2)
        .next_multiple_of(grid)
        .min(LANE_SPAN_MAX.next_multiple_of(grid));
    let sequential = sc.src.capabilities().sequential;
    (chunking.kind == ChunkingKind::Fixed && !sequential && sc.size > span).then_some(span)
}

/// A full run in two lanes: the disk is cut into segments of `span` bytes
/// (on the grid of windows, so every piece, zero run and chunk is the one
/// a read in one lane makes), taken two at a time; the reader takes a
/// piece of one, then of the other, tagging each with its segment, and
/// the writer puts the second segment's extents after the first's. `sc`
/// reads the first of each pair, a scanner of its own the second; `sc`
/// ends with the figures of both.
pub(super) fn read_full_lanes(sc: &mut Scanner<'_>, span: u64, tx: &Sender<ReadMsg>) -> Result<()> {
    let mut second = Scanner::new(sc.src, sc.progress);
    (sc.lanes, second.lanes) = (2, 2);
    let r = read_lanes(sc, &mut second, span, tx);
    sc.st.busy += second.st.busy;
    sc.st.bytes_read += second.st.bytes_read;
    r
}

fn read_lanes<'a>(
    sc: &mut Scanner<'a>,
    second: &mut Scanner<'a>,
    span: u64,
    tx: &Sender<ReadMsg>,
) -> Result<()> {
    let size = sc.size;
    let mut out = Vec::new();
    sc.report(0)?;
    let (mut base, mut seg) = (0u64, 0u32);
    while base < size {
        let mid = (base + span).min(size);
        let end = (mid + span).min(size);
        // (position, end, segment) of each lane; an empty second lane
        // only at the disk's end.
        let mut lanes = [(base, mid, seg), (mid, end, seg + 1)];
        let mut current = None;
        loop {
            let mut moved = false;
            for (i, (pos, lim, g)) in lanes.iter_mut().enumerate() {
                if *pos >= *lim {
                    continue;
                }
                moved = true;
                if current != Some(*g) {
                    current = Some(*g);
                    out.push(ReadMsg::Segment(*g));
                }
                let s = if i == 0 { &mut *sc } else { &mut *second };
                *pos = s.step(*pos, *lim, &mut out)?;
                if *pos >= *lim {
                    out.push(ReadMsg::SegmentEnd(*g));
                }
                for m in out.drain(..) {
                    if tx.send(m).is_err() {
                        return Ok(());
                    }
                }
            }
            if !moved {
                break;
            }
            sc.report(lanes[0].0 + (lanes[1].0 - mid))?;
        }
        (base, seg) = (end, seg + 2);
    }
    Ok(())
}

/// The parent point's extents with their disk offsets, read from its
/// manifest as the run moves along the disk: only the extents between the
/// run's position and the furthest place it has looked at are held, so
/// memory does not grow with the disk. Every question is about a place at
/// or past the last [`ParentExtents::release`].
pub(super) struct ParentExtents<I> {
    src: I,
    /// The disk size (the sum of the parent's extents).
    size: u64,
    /// Extents held, with where each starts, in disk order.
    win: VecDeque<(u64, Extent)>,
    /// Where the next extent to read starts.
    end: u64,
    /// Extents ending at or before this were released.
    released: u64,
}

impl<I: Iterator<Item = Result<Extent>>> ParentExtents<I> {
    pub(super) fn new(src: I, size: u64) -> Self {
        ParentExtents {
            src,
            size,
            win: VecDeque::new(),
            end: 0,
            released: 0,
        }
    }

    /// The extent holding `b` and where it starts; `None` at the disk's end.
    fn holding(&mut self, b: u64) -> Result<Option<(u64, Extent)>> {
        if b >= self.size {
            return Ok(None);
        }
        if b < self.released {
            return Err(Error::Internal(format!(
                "incremental asked about {b}, before {} (released)",
                self.released
            )));
        }
        while self.end <= b {
            let e = match self.src.next() {
                Some(e) => e?,
                None => {
                    return Err(Error::Internal(format!(
                        "the parent point ends at {} of {} bytes",
                        self.end, self.size
                    )));
                }
            };
            self.win.push_back((self.end, e));
            self.end += e.len();
        }
        let i = self.win.partition_point(|(s, _)| *s <= b);
        Ok(i.checked_sub(1).and_then(|i| self.win.get(i)).copied())
    }

    /// Forget the extents that end at or before `pos`.
    pub(super) fn release(&mut self, pos: u64) {
        while let Some((s, e)) = self.win.front() {
            if s + e.len() > pos {
                break;
            }
            self.win.pop_front();
        }
        self.released = self.released.max(pos);
    }

    /// Read the rest of the manifest, so that its checks (the CRC, the
    /// count and size in its footer) vouch for every extent taken.
    pub(super) fn finish(&mut self) -> Result<()> {
        self.win.clear();
        for e in self.src.by_ref() {
            self.end += e?.len();
        }
        if self.end != self.size {
            return Err(Error::Internal(
                "parent point does not cover the disk".into(),
            ));
        }
        Ok(())
    }

    /// Whether `b` is a zero run of the parent.
    pub(super) fn is_zero(&mut self, b: u64) -> Result<bool> {
        Ok(matches!(self.holding(b)?, Some((_, Extent::Zero { .. }))))
    }

    /// Where the parent's extents may be taken up again: its extent
    /// starts, and every zero block inside its zero runs (a zero run can
    /// be split anywhere a full read would cut it).
    pub(super) fn is_boundary(&mut self, b: u64) -> Result<bool> {
        Ok(match self.holding(b)? {
            None => true,
            Some((s, e)) => {
                s == b || (matches!(e, Extent::Zero { .. }) && b % ZERO_BLOCK as u64 == 0)
            }
        })
    }

    /// Where changes must begin for the boundary `b` to stay a cut of the
    /// new stream. When a zero run starts at `b` off the fixed-block grid
    /// (or with content-defined chunks), a change in its first zero block
    /// makes that block data, and the data before `b` then runs on with
    /// no cut at `b`: such a change counts as one before `b`.
    pub(super) fn guard(&mut self, b: u64, chunking: ChunkingInfo) -> Result<u64> {
        let size = self.size;
        let on_grid =
            chunking.kind == ChunkingKind::Fixed && b % u64::from(chunking.block_size.max(1)) == 0;
        if b == 0 || b >= size || on_grid {
            return Ok(b);
        }
        Ok(match self.holding(b)? {
            Some((s, Extent::Zero { .. })) if s == b => {
                ((b / ZERO_BLOCK as u64 + 1) * ZERO_BLOCK as u64).min(size)
            }
            _ => b,
        })
    }

    /// The first boundary after `after`, if any.
    pub(super) fn next_boundary(&mut self, after: u64) -> Result<Option<u64>> {
        let Some((s, e)) = self.holding(after)? else {
            return Ok(None);
        };
        let next = s + e.len();
        if let Extent::Zero { .. } = e {
            let z = (after / ZERO_BLOCK as u64 + 1) * ZERO_BLOCK as u64;
            if z < next {
                return Ok(Some(z));
            }
        }
        Ok(Some(next))
    }

    /// The parent's extent holding `pos` (a boundary) from `pos` to its
    /// end: the extent itself, or the rest of a zero run; and where it
    /// ends.
    pub(super) fn at(&mut self, pos: u64) -> Result<(Extent, u64)> {
        match self.holding(pos)? {
            Some((s, e)) => {
                let end = s + e.len();
                match e {
                    Extent::Zero { .. } => Ok((Extent::Zero { len: end - pos }, end)),
                    e if s == pos => Ok((e, end)),
                    _ => Err(Error::Internal(format!(
                        "incremental asked for the parent's chunk at {pos}, inside it"
                    ))),
                }
            }
            None => Err(Error::Internal(format!(
                "incremental asked for the parent's extent at the disk's end ({pos})"
            ))),
        }
    }
}

/// An incremental run: unchanged parent extents are sent as they are;
/// from the parent extent where a change starts, the disk is read and
/// chunked again (see [`read_region`]).
pub(super) fn read_incremental<I: Iterator<Item = Result<Extent>>>(
    sc: &mut Scanner<'_>,
    dirty: &mut DirtyRanges<'_>,
    parent: &mut ParentExtents<I>,
    chunking: ChunkingInfo,
    tx: &Sender<ReadMsg>,
) -> Result<()> {
    let size = sc.size;
    if parent.size != size {
        return Err(Error::Internal(
            "parent point does not cover the disk".into(),
        ));
    }
    sc.narrow = true;
    let mut pos = 0u64;
    sc.report(0)?;
    let mut run: Vec<Extent> = Vec::new();
    // Send the run of reused extents; false when the receiver is gone.
    let flush = |run: &mut Vec<Extent>| {
        run.is_empty() || tx.send(ReadMsg::Reuse(std::mem::take(run))).is_ok()
    };
    loop {
        let next = dirty.next_range()?;
        let ds = next.map_or(size, |r| r.0);
        while pos < size {
            let (e, end) = parent.at(pos)?;
            // Not past the change, nor up to a cut the change removes.
            if end > ds || ds < parent.guard(end, chunking)? {
                break;
            }
            run.push(e);
            if run.len() >= REUSE_RUN && !flush(&mut run) {
                return Ok(());
            }
            if end / WINDOW != pos / WINDOW {
                sc.report(end)?;
            }
            pos = end;
            parent.release(pos);
        }
        let Some((_, de)) = next else { break };
        // A change inside a zero run: keep the zeros up to the zero block
        // holding the change (a full read cuts there too), read from there.
        if parent.is_zero(pos)? {
            let z = ds - ds % ZERO_BLOCK as u64;
            if z > pos {
                run.push(Extent::Zero { len: z - pos });
                pos = z;
            }
        }
        if !flush(&mut run) {
            return Ok(());
        }
        match read_region(sc, dirty, parent, pos, de, chunking, tx)? {
            Some(b) => pos = b,
            None => return Ok(()),
        }
    }
    if !flush(&mut run) {
        return Ok(());
    }
    // The point is written only after this: a damaged parent manifest
    // fails the run here, before anything taken from it is committed.
    parent.finish()?;
    sc.report(size)
}

/// Reused extents sent in one message, at most.
const REUSE_RUN: usize = 4096;

/// Follows the cuts a chunker makes on the stream the reader produces:
/// where every chunk ends and where zero runs lie.
pub(super) struct Shadow {
    pub(super) chunker: Box<dyn crate::chunker::Chunker>,
    /// Offset of the next byte to be cut.
    pub(super) cur: u64,
    pub(super) next_data: Option<u64>,
    /// Boundaries seen, in order: (end, whether the stretch before was zeros).
    pub(super) events: Vec<(u64, bool)>,
}

impl Shadow {
    /// Run `f` on the chunker, recording the cuts it makes.
    pub(super) fn with(
        &mut self,
        f: impl FnOnce(&mut dyn crate::chunker::Chunker, &mut dyn FnMut(Bytes)),
    ) {
        let (cur, events) = (&mut self.cur, &mut self.events);
        f(&mut *self.chunker, &mut |c: Bytes| {
            *cur += c.len() as u64;
            events.push((*cur, false));
        });
    }
    pub(super) fn feed(&mut self, m: &ReadMsg) {
        match m {
            ReadMsg::Data(off, b) => {
                if self.next_data != Some(*off) {
                    self.finish();
                    self.cur = *off;
                    self.with(|c, cut| c.start(*off, cut));
                }
                self.next_data = Some(off + b.len() as u64);
                self.with(|c, cut| c.push(b.clone(), cut));
            }
            ReadMsg::Zero(off, len) => {
                self.finish();
                self.next_data = None;
                self.cur = off + len;
                self.events.push((self.cur, true));
            }
            ReadMsg::Reuse(_) | ReadMsg::Segment(_) | ReadMsg::SegmentEnd(_) => {}
        }
    }
    pub(super) fn finish(&mut self) {
        self.with(|c, cut| c.finish(cut));
    }
}

/// Send the queued messages that lie before `limit`, splitting the one
/// across it. False when the receiver is gone.
pub(super) fn send_upto(q: &mut VecDeque<ReadMsg>, limit: u64, tx: &Sender<ReadMsg>) -> bool {
    while let Some(m) = q.pop_front() {
        let (off, len) = m.span();
        if off >= limit {
            q.push_front(m);
            break;
        }
        let m = if off + len <= limit {
            m
        } else {
            let n = limit - off;
            let (head, tail) = match m {
                ReadMsg::Data(o, b) => (
                    ReadMsg::Data(o, b.slice(..n as usize)),
                    ReadMsg::Data(o + n, b.slice(n as usize..)),
                ),
                ReadMsg::Zero(o, l) => (ReadMsg::Zero(o, n), ReadMsg::Zero(o + n, l - n)),
                r => (r, ReadMsg::Zero(limit, 0)),
            };
            q.push_front(tail);
            head
        };
        if tx.send(m).is_err() {
            return false;
        }
    }
    true
}

/// Read from `start` (a parent boundary where a change lies) until a
/// boundary `b` that is both a parent boundary and a cut of the new stream,
/// with no change left before it; everything before `b` is sent, what was
/// read past it is dropped. Returns `b`, or `None` when the receiver is
/// gone.
///
/// Bytes are right whatever the cuts are; the resync rule only decides how
/// much is read again and how well it dedupes. Messages are held back only
/// while the chunker has not decided its cuts (at most a maximum chunk
/// plus one read), so memory stays bounded however long a region runs.
pub(super) fn read_region<I: Iterator<Item = Result<Extent>>>(
    sc: &mut Scanner<'_>,
    dirty: &mut DirtyRanges<'_>,
    parent: &mut ParentExtents<I>,
    start: u64,
    mut de: u64,
    chunking: ChunkingInfo,
    tx: &Sender<ReadMsg>,
) -> Result<Option<u64>> {
    let size = sc.size;
    let mut shadow = Shadow {
        chunker: new_chunker(chunking)?,
        cur: start,
        next_data: None,
        events: Vec::new(),
    };
    let mut queue: VecDeque<ReadMsg> = VecDeque::new();
    let mut out = Vec::new();
    let (mut read_pos, mut decided) = (start, start);
    loop {
        if read_pos < size {
            // Read no further than the first parent boundary at or past the
            // changes: with fixed chunks that is where the new cut lands.
            let want = de.max(read_pos + 1);
            let limit = if parent.is_boundary(want)? {
                want
            } else {
                parent.next_boundary(want)?.unwrap_or(size)
            };
            read_pos = sc.step(read_pos, limit, &mut out)?;
            for m in out.drain(..) {
                shadow.feed(&m);
                queue.push_back(m);
            }
        }
        if read_pos >= size {
            shadow.finish();
        }
        for (end, zeros) in std::mem::take(&mut shadow.events) {
            // Candidates: after a zero stretch, every boundary up to its end;
            // after a chunk, only its end.
            let mut cand = if zeros {
                parent.next_boundary(decided)?
            } else if parent.is_boundary(end)? {
                Some(end)
            } else {
                None
            };
            while let Some(b) = cand.filter(|b| *b <= end) {
                let guard = parent.guard(b, chunking)?;
                while let Some((s, e)) = dirty.peek()? {
                    if s >= guard {
                        break;
                    }
                    de = de.max(e);
                    dirty.next_range()?;
                }
                if b >= de {
                    if !send_upto(&mut queue, b, tx) {
                        return Ok(None);
                    }
                    return Ok(Some(b));
                }
                cand = if zeros {
                    parent.next_boundary(de - 1)?
                } else {
                    None
                };
            }
            decided = end;
        }
        // Nothing before what is decided is asked about again.
        parent.release(decided);
        if !send_upto(&mut queue, decided, tx) {
            return Ok(None);
        }
        sc.report(read_pos)?;
        if read_pos >= size && queue.is_empty() {
            return Err(Error::Internal(format!(
                "incremental region from {start} found no end"
            )));
        }
    }
}

/// Push `buf` (read at `offset`) as data runs and zero runs; aligned
/// [`ZERO_BLOCK`]s (or their parts at the buffer's edges) that are all zero
/// become zero runs.
pub(super) fn split_zero(offset: u64, buf: Bytes, out: &mut Vec<ReadMsg>) {
    static ZEROS: [u8; ZERO_BLOCK] = [0; ZERO_BLOCK];
    let mut run_start = 0usize;
    let mut run_zero = false;
    let mut i = 0usize;
    let mut push = |from: usize, to: usize, zero: bool| {
        if to > from {
            out.push(if zero {
                ReadMsg::Zero(offset + from as u64, (to - from) as u64)
            } else {
                ReadMsg::Data(offset + from as u64, buf.slice(from..to))
            });
        }
    };
    while i < buf.len() {
        let next = ((offset + i as u64) / ZERO_BLOCK as u64 + 1) * ZERO_BLOCK as u64 - offset;
        let end = (next as usize).min(buf.len());
        let zero = buf[i..end] == ZEROS[..end - i];
        if zero != run_zero {
            push(run_start, i, run_zero);
            run_start = i;
            run_zero = zero;
        }
        i = end;
    }
    push(run_start, buf.len(), run_zero);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A parent of a million extents (a 4 KiB chunk, then 1 MiB - 4 KiB
    /// of zeros, over and over), made as it is read.
    fn parent(n: u64) -> impl Iterator<Item = Result<Extent>> {
        (0..2 * n).map(|i| {
            Ok(if i % 2 == 0 {
                Extent::Chunk {
                    id: crate::ids::ChunkId([(i % 251) as u8; 32]),
                    len: 4096,
                }
            } else {
                Extent::Zero {
                    len: (1 << 20) - 4096,
                }
            })
        })
    }

    #[test]
    fn the_parent_is_held_only_around_the_place_the_run_is_at() {
        let n = 1 << 20;
        let size = n << 20;
        let mut p = ParentExtents::new(parent(n), size);
        let (mut pos, mut most) = (0u64, 0usize);
        let cdc = ChunkingInfo {
            kind: ChunkingKind::Cdc,
            block_size: 1 << 20,
        };
        while pos < size {
            let (e, end) = p.at(pos).expect("extent");
            assert_eq!(e.len(), end - pos);
            // What read_incremental and read_region ask about next.
            assert!(p.guard(end, cdc).expect("guard") >= end);
            assert!(p.is_boundary(end).expect("boundary"));
            most = most.max(p.win.len());
            pos = end;
            p.release(pos);
        }
        assert!(most <= 2, "held {most} extents at once");
        p.finish().expect("whole parent");
        // A zero run is a boundary at every zero block inside it.
        let mut p = ParentExtents::new(parent(4), 4 << 20);
        assert_eq!(p.next_boundary(0).expect("next"), Some(4096));
        let z = ZERO_BLOCK as u64;
        assert_eq!(p.next_boundary(4096).expect("next"), Some(z));
        assert_eq!(p.next_boundary(z).expect("next"), Some(2 * z));
        assert!(p.is_boundary(z).expect("boundary") && p.is_zero(z).expect("zero"));
        assert!(!p.is_boundary(z + 4096).expect("boundary"));
        p.release(1 << 20);
        let e = p.at(4096).expect_err("released");
        assert!(e.to_string().contains("released"), "{e}");
    }

    #[test]
    fn a_parent_that_ends_early_or_is_damaged_is_an_error() {
        let mut p = ParentExtents::new(parent(2), 4 << 20);
        let e = p.at(3 << 20).expect_err("short");
        assert!(e.to_string().contains("ends at"), "{e}");
        let damaged = parent(2).chain(std::iter::once(Err(Error::corrupt(
            "point manifest",
            std::path::Path::new("p"),
            "CRC mismatch in the extent list",
        ))));
        let mut p = ParentExtents::new(damaged, 2 << 20);
        p.at(0).expect("first");
        let e = p.finish().expect_err("damaged");
        assert!(e.to_string().contains("CRC mismatch"), "{e}");
    }
}
