//! The buffer of a read in flight.
//!
//! Invariant: a read reply is complete only when its chunks cover every
//! byte of the request exactly once: a chunk that overlaps an earlier one
//! is a protocol violation (proto.md: the server "MUST NOT send content
//! chunks that overlap"), refused before any of its bytes are stored, so
//! a later chunk can never overwrite data that already arrived. No byte is
//! zero-filled before data arrives in order.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};

use super::NbdError;
use super::error::io;

pub(super) async fn read_exact<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
) -> Result<(), NbdError> {
    r.read_exact(buf).await.map(drop).map_err(io)
}

/// The buffer of a read in flight. Data and hole chunks may come in any
/// order; bytes are appended straight from the socket when they arrive in
/// order (no zero-filling first), and the reply must cover every byte.
pub(crate) struct ReadBuf {
    pub(super) buf: BytesMut,
    pub(super) want: usize,
    /// Covered ranges, sorted and merged.
    pub(super) covered: Vec<(usize, usize)>,
}

impl ReadBuf {
    pub(super) fn new(mut buf: BytesMut, want: usize) -> Self {
        buf.clear();
        ReadBuf {
            buf,
            want,
            covered: Vec::new(),
        }
    }

    /// Claim `[s, e)` for a chunk: empty, out-of-range and overlapping
    /// chunks are violations.
    pub(super) fn claim(&self, s: usize, e: usize) -> Result<(), NbdError> {
        if s >= e || e > self.want {
            return Err(NbdError::Protocol(format!(
                "a content chunk for [{s}, {e}) of a read of {} bytes",
                self.want
            )));
        }
        let i = self.covered.partition_point(|c| c.1 <= s);
        match self.covered.get(i) {
            Some(c) if c.0 < e => Err(NbdError::Protocol(format!(
                "a content chunk for [{s}, {e}) overlaps [{}, {}) sent earlier in the same reply",
                c.0, c.1
            ))),
            _ => Ok(()),
        }
    }

    fn cover(&mut self, s: usize, e: usize) {
        let i = self.covered.partition_point(|c| c.1 < s);
        let mut j = i;
        let (mut ns, mut ne) = (s, e);
        while j < self.covered.len() && self.covered[j].0 <= e {
            ns = ns.min(self.covered[j].0);
            ne = ne.max(self.covered[j].1);
            j += 1;
        }
        self.covered.splice(i..j, [(ns, ne)]);
    }

    pub(super) fn complete(&self) -> bool {
        self.want == 0 || self.covered.as_slice() == [(0, self.want)]
    }

    /// `n` bytes of data for `[s, s+n)` from `r`.
    pub(super) async fn data<R: AsyncRead + Unpin>(
        &mut self,
        r: &mut R,
        s: usize,
        n: usize,
    ) -> Result<(), NbdError> {
        use bytes::BufMut;
        let e = s.saturating_add(n);
        self.claim(s, e)?;
        if self.buf.len() < s {
            self.buf.resize(s, 0);
        }
        let m = e.min(self.buf.len());
        if s < m {
            read_exact(r, &mut self.buf[s..m]).await?;
        }
        while self.buf.len() < e {
            let k = e - self.buf.len();
            let got = r
                .read_buf(&mut (&mut self.buf).limit(k))
                .await
                .map_err(io)?;
            if got == 0 {
                return Err(NbdError::closed());
            }
        }
        self.cover(s, e);
        Ok(())
    }

    /// Zeros for `[s, s+n)`.
    pub(super) fn hole(&mut self, s: usize, n: usize) -> Result<(), NbdError> {
        let (e, old) = (s.saturating_add(n), self.buf.len());
        self.claim(s, e)?;
        if old < e {
            self.buf.resize(e, 0);
        }
        if s < old.min(e) {
            self.buf[s..old.min(e)].fill(0);
        }
        self.cover(s, e);
        Ok(())
    }
}
