//! Page-aligned byte buffers for direct I/O, without unsafe code: a `Vec`
//! over-allocated by one alignment unit and used from an aligned position.
//!
//! A buffer can also be *phased*: its first byte placed `phase` bytes past
//! an aligned address, so that memory and disk alignment agree for data
//! that starts at a disk offset with `offset % DIRECT_ALIGN == phase`. The
//! aligned middle of such data can then be written with O_DIRECT.

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
    /// Make room for `len` bytes starting at an aligned address.
    pub fn prepare(&mut self, len: usize) -> &mut [u8] {
        self.prepare_phased(len, 0)
    }

    /// Make room for `len` bytes whose first byte sits `phase % DIRECT_ALIGN`
    /// bytes past an aligned address (reallocating only to grow).
    pub fn prepare_phased(&mut self, len: usize, phase: usize) -> &mut [u8] {
        let phase = phase % DIRECT_ALIGN;
        let need = (phase + len).next_multiple_of(DIRECT_ALIGN) + DIRECT_ALIGN;
        if self.v.len() < need {
            self.v = vec![0u8; need];
        }
        let base = self.v.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
        self.start = base + phase;
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
    fn aligned_phased_and_reused() {
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
        let q = b.prepare_phased(5000, 8192 + 100).as_ptr() as usize;
        assert_eq!(q % DIRECT_ALIGN, 100);
        assert_eq!(b.as_slice().len(), 5000);
    }
}
