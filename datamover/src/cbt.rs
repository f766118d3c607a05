//! Changed-block tracking (CBT): which byte ranges of a disk changed since
//! its previous restore point.
//!
//! A source that knows (an NBD export with a QEMU dirty bitmap; later a VM
//! host asked over QMP) offers a [`ChangeTracker`] through
//! [`BlockSource::change_tracking`]. The backup then reads only the changed
//! ranges and takes everything else from the previous point's manifest (see
//! [`crate::backup`]); the new point is complete on its own, like every
//! point.
//!
//! The tracker must describe the changes since the moment the previous
//! point was read. Keeping that true (clearing or rotating the bitmap when
//! a point is taken) is the job of whoever drives the VM: issue #4's QMP
//! platform does it atomically with the VM snapshot.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::format::manifest::SourceInfo;
use crate::source::{BlockSource, Capabilities, SourceExtent};

/// Tells which ranges of a disk changed since the previous point.
pub trait ChangeTracker: Send + Sync {
    /// Changed ranges `(offset, len)` inside `[offset, offset+len)`: sorted,
    /// non-overlapping, non-empty. Asked one window at a time, in order.
    fn changed(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>>;
    /// What tracks the changes, for the point's metadata
    /// (e.g. `qemu:dirty-bitmap:b0`).
    fn describe(&self) -> String;
    /// The checkpoint these changes start at, when the tracker knows it
    /// (a VM's bitmaps, named per point). The backup then builds on the
    /// point that started this checkpoint ([`crate::PointMeta::checkpoint`])
    /// and on no other; `None` (a bitmap the user manages) trusts the
    /// caller that the changes start at the disk's newest point.
    fn since_checkpoint(&self) -> Option<String> {
        None
    }
}

/// Whether a source tracks changes.
pub enum Tracking<'a> {
    /// Not asked for: a full backup.
    Off,
    /// Changes are tracked: an incremental backup.
    On(&'a dyn ChangeTracker),
    /// Asked for but not available (the reason says why, e.g. the export
    /// has no such bitmap): an error, or a full backup when the caller
    /// allows one.
    Unavailable(String),
}

impl std::fmt::Debug for Tracking<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Tracking::Off => f.write_str("Off"),
            Tracking::On(t) => write!(f, "On({})", t.describe()),
            Tracking::Unavailable(why) => write!(f, "Unavailable({why:?})"),
        }
    }
}

/// A fixed list of changed ranges, given by the caller (a host's
/// "changed areas" answer, a test).
#[derive(Debug, Clone)]
pub struct ChangedRanges {
    ranges: Vec<(u64, u64)>,
    name: String,
}

impl ChangedRanges {
    /// `ranges` as `(offset, len)` in any order; overlaps are merged.
    pub fn new(name: impl Into<String>, mut ranges: Vec<(u64, u64)>) -> Self {
        ranges.retain(|r| r.1 > 0);
        ranges.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
        for (o, l) in ranges {
            let end = o.saturating_add(l);
            match merged.last_mut() {
                Some((mo, ml)) if *mo + *ml >= o => *ml = (*ml).max(end - *mo),
                _ => merged.push((o, end - o)),
            }
        }
        ChangedRanges {
            ranges: merged,
            name: name.into(),
        }
    }
}

impl ChangeTracker for ChangedRanges {
    fn changed(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>> {
        let end = offset.saturating_add(len);
        let first = self.ranges.partition_point(|r| r.0 + r.1 <= offset);
        Ok(self.ranges[first..]
            .iter()
            .take_while(|r| r.0 < end)
            .map(|&(o, l)| {
                let s = o.max(offset);
                (s, (o + l).min(end) - s)
            })
            .collect())
    }
    fn describe(&self) -> String {
        self.name.clone()
    }
}

/// A source with changes tracked elsewhere: data from `source`, changed
/// ranges from `tracker` (the SAN mode's shape: data from the LUN, changes
/// from the host).
pub struct WithChanges<S> {
    /// Where the data is read.
    pub source: S,
    /// What changed.
    pub tracker: Arc<dyn ChangeTracker>,
}

impl<S> std::fmt::Debug for WithChanges<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WithChanges")
            .field("tracker", &self.tracker.describe())
            .finish()
    }
}

impl<S: BlockSource> BlockSource for WithChanges<S> {
    fn size(&self) -> u64 {
        self.source.size()
    }
    fn preferred_io_size(&self) -> usize {
        self.source.preferred_io_size()
    }
    fn capabilities(&self) -> Capabilities {
        self.source.capabilities()
    }
    fn info(&self) -> SourceInfo {
        self.source.info()
    }
    fn transport(&self) -> &'static str {
        self.source.transport()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.source.read_at(offset, buf)
    }
    fn read_bytes(&self, offset: u64, len: usize) -> Result<bytes::Bytes> {
        self.source.read_bytes(offset, len)
    }
    fn will_read(&self, offset: u64, len: usize) {
        self.source.will_read(offset, len)
    }
    fn read_ahead(&self) -> usize {
        self.source.read_ahead()
    }
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<SourceExtent>> {
        self.source.extents(offset, len)
    }
    fn change_tracking(&self) -> Tracking<'_> {
        Tracking::On(self.tracker.as_ref())
    }
    fn checkpoint(&self) -> Option<String> {
        self.source.checkpoint()
    }
    fn consistency(&self) -> Option<crate::Consistency> {
        self.source.consistency()
    }
    fn vm_definition(&self) -> Option<String> {
        self.source.vm_definition()
    }
}

/// Changed ranges as `[start, end)`, asked one window at a time; ranges
/// that touch across windows are merged, so a range is only handed out
/// once it is complete.
pub(crate) struct DirtyRanges<'a> {
    tracker: &'a dyn ChangeTracker,
    size: u64,
    window: u64,
    asked: u64,
    buf: VecDeque<(u64, u64)>,
    /// Sum of the changed bytes handed out so far.
    pub bytes: u64,
}

impl<'a> DirtyRanges<'a> {
    pub(crate) fn new(tracker: &'a dyn ChangeTracker, size: u64, window: u64) -> Self {
        DirtyRanges {
            tracker,
            size,
            window,
            asked: 0,
            buf: VecDeque::new(),
            bytes: 0,
        }
    }

    fn complete(&self) -> bool {
        self.asked >= self.size
            || self.buf.len() >= 2
            || self.buf.front().is_some_and(|r| r.1 < self.asked)
    }

    /// The next changed range, without taking it.
    pub(crate) fn peek(&mut self) -> Result<Option<(u64, u64)>> {
        while !self.complete() {
            let end = self.size.min(self.asked + self.window);
            let mut pos = self.asked;
            for (o, l) in self.tracker.changed(self.asked, end - self.asked)? {
                let e = o.saturating_add(l);
                if o < pos || l == 0 || e > end {
                    return Err(Error::Internal(format!(
                        "{} reported changed range {o}+{l} outside window {pos}..{end}",
                        self.tracker.describe()
                    )));
                }
                match self.buf.back_mut() {
                    Some(b) if b.1 == o => b.1 = e,
                    _ => self.buf.push_back((o, e)),
                }
                pos = e;
            }
            self.asked = end;
        }
        Ok(self.buf.front().copied())
    }

    /// Take the next changed range.
    pub(crate) fn next_range(&mut self) -> Result<Option<(u64, u64)>> {
        let r = self.peek()?;
        if let Some((s, e)) = r {
            self.buf.pop_front();
            self.bytes += e - s;
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_and_clip() {
        let c = ChangedRanges::new("t", vec![(10, 5), (0, 4), (12, 10), (100, 0)]);
        assert_eq!(c.changed(0, 1000).expect("c"), vec![(0, 4), (10, 12)]);
        assert_eq!(c.changed(2, 10).expect("c"), vec![(2, 2), (10, 2)]);
        assert_eq!(c.changed(22, 10).expect("c"), vec![]);
    }

    #[test]
    fn dirty_ranges_join_across_windows() {
        let c = ChangedRanges::new("t", vec![(5, 20), (40, 1), (41, 3), (90, 10)]);
        let mut d = DirtyRanges::new(&c, 100, 8);
        let mut got = Vec::new();
        while let Some(r) = d.next_range().expect("r") {
            got.push(r);
        }
        assert_eq!(got, vec![(5, 25), (40, 44), (90, 100)]);
        assert_eq!(d.bytes, 20 + 4 + 10);
    }
}
