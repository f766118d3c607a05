//! [`NbdTarget`]: a writable NBD export as a restore [`BlockTarget`].
//!
//! Writes are pipelined: each call splits its data into pieces, sends them
//! and returns while up to [`IN_FLIGHT`] requests are still unanswered (a
//! restore never writes the same range twice, so order does not matter).
//! An error of any request is returned by a later call, at the latest by
//! [`BlockTarget::flush`], which waits for every reply and then sends
//! NBD_CMD_FLUSH. Zero runs use WRITE_ZEROES, first with FAST_ZERO where
//! the server offers it (falling back to a plain WRITE_ZEROES on ENOTSUP),
//! and written zero buffers where it offers neither.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use datamover::target::BlockTarget;
use datamover::{Error, Result};
use tokio::task::JoinHandle;

use super::client::{ConnectOptions, NbdClient, NbdError};
use super::proto as p;
use super::source::{connect, err};
use super::uri::NbdUri;

/// Requests left unanswered before a call waits for the oldest.
pub const IN_FLIGHT: usize = 16;
/// Bytes per WRITE request.
const PIECE: usize = 1 << 20;
/// Bytes per WRITE_ZEROES request.
const ZERO_PIECE: u64 = 1 << 30;

/// An NBD export opened for writing.
pub struct NbdTarget {
    rt: tokio::runtime::Runtime,
    client: Arc<NbdClient>,
    uri: NbdUri,
    pending: Mutex<VecDeque<JoinHandle<std::result::Result<(), NbdError>>>>,
    fast_zero: Arc<AtomicBool>,
}

impl std::fmt::Debug for NbdTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdTarget")
            .field("uri", &self.uri.to_string())
            .finish()
    }
}

impl NbdTarget {
    /// Connect to `uri` and check that the export takes writes and holds
    /// at least `size` bytes.
    pub fn connect(uri: &str, size: u64, opts: &ConnectOptions) -> Result<NbdTarget> {
        let (rt, parsed, client) = connect(uri, opts)?;
        let info = client.info();
        if info.flags & p::TFLAG_READ_ONLY != 0 {
            return Err(Error::InvalidArgument(format!(
                "{parsed}: the export is read-only; serve it writable to restore into it (qemu-nbd without -r)"
            )));
        }
        if info.size < size {
            return Err(Error::TargetTooSmall {
                path: parsed.to_string().into(),
                need: size,
                have: info.size,
            });
        }
        let fast = info.flags & p::TFLAG_SEND_FAST_ZERO != 0;
        Ok(NbdTarget {
            rt,
            client: Arc::new(client),
            uri: parsed,
            pending: Mutex::new(VecDeque::new()),
            fast_zero: Arc::new(AtomicBool::new(fast)),
        })
    }

    /// The negotiated export information.
    pub fn client(&self) -> &NbdClient {
        &self.client
    }

    /// Queue a request; wait for the oldest ones beyond [`IN_FLIGHT`].
    fn queue(
        &self,
        fut: impl std::future::Future<Output = std::result::Result<(), NbdError>> + Send + 'static,
    ) -> Result<()> {
        let h = self.rt.spawn(fut);
        let mut q = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        q.push_back(h);
        while q.len() > IN_FLIGHT {
            if let Some(h) = q.pop_front() {
                self.wait(h)?;
            }
        }
        Ok(())
    }

    fn wait(&self, h: JoinHandle<std::result::Result<(), NbdError>>) -> Result<()> {
        self.rt
            .block_on(h)
            .map_err(|e| NbdError::io_msg(format!("write task failed: {e}")))
            .and_then(|r| r)
            .map_err(|e| err(&self.uri, e))
    }

    /// Wait for every request sent so far.
    fn drain(&self) -> Result<()> {
        let all: Vec<_> = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .collect();
        let mut first = Ok(());
        for h in all {
            let r = self.wait(h);
            if first.is_ok() {
                first = r;
            }
        }
        first
    }
}

impl BlockTarget for NbdTarget {
    fn size(&self) -> u64 {
        self.client.info().size
    }

    /// Zero as the server's `base:allocation` reports it.
    fn reads_zero(&self, offset: u64, len: u64) -> Result<bool> {
        let Some(ctx) = self.client.info().context("base:allocation") else {
            return Ok(false);
        };
        let (mut at, end) = (offset, offset + len);
        while at < end {
            let ask = (end - at).min(1 << 30) as u32;
            let descs = self
                .rt
                .block_on(self.client.block_status(at, ask, ctx, false))
                .map_err(|e| err(&self.uri, e))?;
            if descs.is_empty() {
                return Ok(false);
            }
            for (l, flags) in descs {
                if l == 0 || flags & p::STATE_ZERO == 0 {
                    return Ok(false);
                }
                at += u64::from(l);
                if at >= end {
                    break;
                }
            }
        }
        Ok(true)
    }

    /// Reads back (a compare visits each extent once, before any write
    /// to it, so nothing queued overlaps).
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<bool> {
        let piece = PIECE.min(self.client.info().block.2 as usize).max(1);
        for (i, b) in buf.chunks_mut(piece).enumerate() {
            let off = offset + (i * piece) as u64;
            let got = self
                .rt
                .block_on(self.client.read(off, b.len() as u32))
                .map_err(|e| err(&self.uri, e))?;
            if got.len() != b.len() {
                return Err(err(
                    &self.uri,
                    NbdError::io_msg(format!("short read at {off}")),
                ));
            }
            b.copy_from_slice(&got);
        }
        Ok(true)
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        let piece = PIECE.min(self.client.info().block.2 as usize).max(1);
        for (i, d) in data.chunks(piece).enumerate() {
            let c = self.client.clone();
            let d = d.to_vec();
            let off = offset + (i * piece) as u64;
            self.queue(async move { c.write(off, &d).await })?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let info = self.client.info();
        if info.flags & p::TFLAG_SEND_WRITE_ZEROES == 0 {
            // Nothing better offered: write zero buffers.
            let zeros = vec![0u8; PIECE.min(info.block.2 as usize).max(1)];
            let mut at = offset;
            while at < offset + len {
                let n = (offset + len - at).min(zeros.len() as u64) as usize;
                self.write_at(at, &zeros[..n])?;
                at += n as u64;
            }
            return Ok(());
        }
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(ZERO_PIECE) as u32;
            let (c, fast) = (self.client.clone(), self.fast_zero.clone());
            self.queue(async move {
                if fast.load(Ordering::Relaxed) {
                    match c.write_zeroes(at, n, true).await {
                        Err(NbdError::Request { errno, .. }) if errno == p::ENOTSUP => {
                            // Zeroing is slow here; do it anyway, and stop asking.
                            fast.store(false, Ordering::Relaxed);
                        }
                        r => return r,
                    }
                }
                c.write_zeroes(at, n, false).await
            })?;
            at += u64::from(n);
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.drain()?;
        self.rt
            .block_on(self.client.flush())
            .map_err(|e| err(&self.uri, e))
    }
}

impl Drop for NbdTarget {
    fn drop(&mut self) {
        let _ = self.drain();
        self.rt.block_on(self.client.disconnect());
    }
}
