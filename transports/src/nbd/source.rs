//! [`NbdSource`]: an NBD export as a [`BlockSource`]. Reads are split into
//! pieces sent concurrently on one connection; extents come from the
//! `base:allocation` meta context, asked one window at a time.

use std::sync::Arc;

use datamover::cbt::{ChangeTracker, Tracking};
use datamover::format::manifest::SourceInfo;
use datamover::source::{BlockSource, Capabilities, ExtentKind, SourceExtent};
use datamover::{Error, Result};

use super::client::{ConnectOptions, NbdClient, NbdError};
use super::proto::{STATE_DIRTY, STATE_HOLE, STATE_ZERO};
use super::uri::NbdUri;

/// Bytes per read request; a pipeline read is split into several in flight.
const PIECE: u32 = 1 << 20;

/// An NBD export opened for reading.
pub struct NbdSource {
    rt: tokio::runtime::Runtime,
    client: Arc<NbdClient>,
    uri: NbdUri,
    alloc: Option<u32>,
    /// The dirty bitmap's context id and name, or why it is not there.
    bitmap: Option<Result<(u32, String), String>>,
}

impl std::fmt::Debug for NbdSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdSource")
            .field("uri", &self.uri.to_string())
            .finish()
    }
}

pub(crate) fn err(uri: &NbdUri, e: NbdError) -> Error {
    match e {
        NbdError::Unsupported(what) => Error::Unsupported(what),
        e => Error::Transport {
            address: uri.to_string(),
            detail: e.to_string(),
        },
    }
}

/// The runtime an NBD source or target runs its connection on.
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("nbd")
        .enable_io()
        .enable_time()
        .build()
        .map_err(|e| Error::Internal(format!("tokio runtime: {e}")))
}

impl NbdSource {
    /// Connect to `uri` (an NBD URI) and negotiate.
    pub fn connect(uri: &str, opts: &ConnectOptions) -> Result<NbdSource> {
        let parsed =
            NbdUri::parse(uri).map_err(|e| Error::InvalidArgument(format!("{uri}: {e}")))?;
        let rt = runtime()?;
        let client = rt
            .block_on(NbdClient::connect(&parsed, opts))
            .map_err(|e| err(&parsed, e))?;
        let alloc = client.info().context("base:allocation");
        let bitmap = opts.bitmap.as_ref().map(|b| {
            let name = format!("qemu:dirty-bitmap:{b}");
            match client.info().context(&name) {
                Some(id) => Ok((id, name)),
                None if !client.info().structured => Err(format!(
                    "the NBD server does not do structured replies, so it cannot report dirty bitmap {b:?}"
                )),
                None => Err(format!(
                    "the export has no dirty bitmap {b:?} (qemu-nbd exports one with -B {b}; check the name with `qemu-img info`)"
                )),
            }
        });
        Ok(NbdSource {
            rt,
            client: Arc::new(client),
            uri: parsed,
            alloc,
            bitmap,
        })
    }

    /// The negotiated export information.
    pub fn client(&self) -> &NbdClient {
        &self.client
    }
}

impl BlockSource for NbdSource {
    fn size(&self) -> u64 {
        self.client.info().size
    }
    fn preferred_io_size(&self) -> usize {
        8 << 20
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            extents: self.alloc.is_some(),
            concurrent_reads: true,
        }
    }
    fn info(&self) -> SourceInfo {
        SourceInfo {
            kind: "nbd".into(),
            location: self.uri.to_string(),
        }
    }
    fn transport(&self) -> &'static str {
        "nbd"
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let piece = PIECE.min(self.client.info().block.2).max(1) as usize;
        let pieces: Vec<(u64, usize)> = (0..buf.len())
            .step_by(piece)
            .map(|s| (offset + s as u64, piece.min(buf.len() - s)))
            .collect();
        let results = self.rt.block_on(async {
            let mut set = tokio::task::JoinSet::new();
            for (i, (off, len)) in pieces.iter().copied().enumerate() {
                let c = self.client.clone();
                set.spawn(async move { (i, c.read(off, len as u32).await) });
            }
            let mut out = Vec::with_capacity(pieces.len());
            while let Some(r) = set.join_next().await {
                out.push(r.map_err(|e| NbdError::Io(format!("read task failed: {e}")))?);
            }
            Ok::<_, NbdError>(out)
        });
        for (i, data) in results.map_err(|e| err(&self.uri, e))? {
            let data = data.map_err(|e| err(&self.uri, e))?;
            let start = i * piece;
            buf[start..start + data.len()].copy_from_slice(&data);
        }
        Ok(())
    }

    fn extents(&self, offset: u64, len: u64) -> Result<Vec<SourceExtent>> {
        let Some(ctx) = self.alloc else {
            return Ok(vec![SourceExtent {
                offset,
                len,
                kind: ExtentKind::Data,
            }]);
        };
        let mut out: Vec<SourceExtent> = Vec::new();
        self.walk_status(ctx, offset, len, |pos, l, flags| {
            let kind = if flags & STATE_HOLE != 0 {
                ExtentKind::Hole
            } else if flags & STATE_ZERO != 0 {
                ExtentKind::Zero
            } else {
                ExtentKind::Data
            };
            match out.last_mut() {
                Some(e) if e.kind == kind && e.offset + e.len == pos => e.len += l,
                _ => out.push(SourceExtent {
                    offset: pos,
                    len: l,
                    kind,
                }),
            }
        })?;
        // The pipeline treats gaps as holes; keep only what is not a hole.
        Ok(out
            .into_iter()
            .filter(|e| e.kind != ExtentKind::Hole)
            .collect())
    }

    fn change_tracking(&self) -> Tracking<'_> {
        match &self.bitmap {
            None => Tracking::Off,
            Some(Ok(_)) => Tracking::On(self),
            Some(Err(why)) => Tracking::Unavailable(why.clone()),
        }
    }
}

impl NbdSource {
    /// Walk block status of `[offset, offset+len)` in meta context `ctx`,
    /// calling `f(offset, len, flags)` for each descriptor, in order.
    fn walk_status(
        &self,
        ctx: u32,
        offset: u64,
        len: u64,
        mut f: impl FnMut(u64, u64, u32),
    ) -> Result<()> {
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let ask = u32::try_from(end - pos).unwrap_or(!0xfff);
            let ds = self
                .rt
                .block_on(self.client.block_status(pos, ask, ctx))
                .map_err(|e| err(&self.uri, e))?;
            if ds.is_empty() {
                return Err(err(
                    &self.uri,
                    NbdError::Protocol("block status without descriptors".into()),
                ));
            }
            for (l, flags) in ds {
                if l == 0 {
                    return Err(err(
                        &self.uri,
                        NbdError::Protocol("block status descriptor of length 0".into()),
                    ));
                }
                let l = u64::from(l).min(end - pos);
                f(pos, l, flags);
                pos += l;
                if pos >= end {
                    break;
                }
            }
        }
        Ok(())
    }
}

/// The export's dirty bitmap (`qemu:dirty-bitmap:NAME`) as the tracker of
/// an incremental backup: its dirty extents are the changed ranges.
impl ChangeTracker for NbdSource {
    fn changed(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>> {
        let Some(Ok((ctx, _))) = &self.bitmap else {
            return Err(Error::Internal("no dirty bitmap negotiated".into()));
        };
        let mut out: Vec<(u64, u64)> = Vec::new();
        self.walk_status(*ctx, offset, len, |pos, l, flags| {
            if flags & STATE_DIRTY != 0 {
                match out.last_mut() {
                    Some(r) if r.0 + r.1 == pos => r.1 += l,
                    _ => out.push((pos, l)),
                }
            }
        })?;
        Ok(out)
    }
    fn describe(&self) -> String {
        match &self.bitmap {
            Some(Ok((_, name))) => name.clone(),
            _ => "no dirty bitmap".into(),
        }
    }
}

impl Drop for NbdSource {
    fn drop(&mut self) {
        self.rt.block_on(self.client.disconnect());
    }
}
