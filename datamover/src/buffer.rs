//! Page-aligned byte buffers for direct I/O, without unsafe code: a `Vec`
//! over-allocated by one alignment unit and used from its first aligned byte.
//! Invariant: `as_slice().as_ptr()` is a multiple of [`DIRECT_ALIGN`].

/// Alignment that O_DIRECT needs on every device we meet (4 KiB).
pub const DIRECT_ALIGN: usize = 4096;

/// A reusable aligned buffer holding `len` valid bytes.
#[derive(Debug, Default)]
pub struct AlignedBuf {
    v: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// Make room for `len` bytes (reallocating only to grow) and return them.
    pub fn prepare(&mut self, len: usize) -> &mut [u8] {
        let need = len.next_multiple_of(DIRECT_ALIGN);
        if self.v.len() < self.start + need {
            self.v = vec![0u8; need + DIRECT_ALIGN];
            self.start = self.v.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
        }
        self.len = len;
        &mut self.v[self.start..self.start + len]
    }

    /// Set the number of valid bytes (at most what was prepared).
    pub fn set_len(&mut self, len: usize) {
        self.len = len.min(self.v.len().saturating_sub(self.start));
    }

    /// The valid bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.v[self.start..self.start + self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_reused() {
        let mut b = AlignedBuf::default();
        let p = b.prepare(10_000).as_ptr() as usize;
        assert_eq!(p % DIRECT_ALIGN, 0);
        b.set_len(5);
        assert_eq!(b.as_slice().len(), 5);
        assert_eq!(
            b.prepare(9000).as_ptr() as usize,
            p,
            "no reallocation when it fits"
        );
        assert_eq!(b.prepare(1 << 20).as_ptr() as usize % DIRECT_ALIGN, 0);
    }
}
