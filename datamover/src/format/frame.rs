//! Chunk frame: how one chunk is stored inside a pack.
//!
//! ```text
//! offset size field
//! 0      4    magic "DMCF"
//! 4      1    version = 1
//! 5      1    codec: 0 = raw, 1 = zstd
//! 6      2    reserved, 0
//! 8      4    plain_len  (bytes of the chunk)
//! 12     4    stored_len (bytes of payload following the header)
//! 16     32   chunk id = BLAKE3-256 of the plain bytes
//! 48     4    CRC32 of bytes 0..48 followed by the stored payload
//! 52     …    payload (stored_len bytes)
//! ```
//!
//! The CRC catches damage to the stored bytes (and the header) before any
//! decompression; the id is checked again after decompression, so a frame
//! either decodes to exactly the bytes that were backed up or is an error.

use crate::ids::ChunkId;

/// Frame magic.
pub const FRAME_MAGIC: [u8; 4] = *b"DMCF";
/// Frame version written by this build.
pub const FRAME_VERSION: u8 = 1;
/// Header length.
pub const FRAME_HEADER_LEN: usize = 52;
/// The largest chunk (plain or stored) any frame may hold: 64 MiB. Lengths
/// read from disk are checked against it before anything is allocated.
pub const MAX_CHUNK_LEN: u32 = 64 << 20;

const _: () = assert!(FRAME_HEADER_LEN == 4 + 1 + 1 + 2 + 4 + 4 + 32 + 4);

/// How a frame's payload is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Codec {
    /// Payload is the plain chunk.
    Raw = 0,
    /// Payload is one zstd frame.
    Zstd = 1,
}

/// A parsed, bounds-checked frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Payload codec.
    pub codec: Codec,
    /// Plain chunk length.
    pub plain_len: u32,
    /// Payload length.
    pub stored_len: u32,
    /// Chunk id.
    pub id: ChunkId,
    /// CRC32 recorded in the header.
    pub crc: u32,
}

impl FrameHeader {
    /// Whole frame length (header + payload).
    pub fn frame_len(&self) -> u64 {
        FRAME_HEADER_LEN as u64 + u64::from(self.stored_len)
    }

    /// Serialize; the CRC field is computed over the header and `payload`.
    pub fn encode(
        codec: Codec,
        plain_len: u32,
        id: ChunkId,
        payload: &[u8],
    ) -> [u8; FRAME_HEADER_LEN] {
        let mut h = [0u8; FRAME_HEADER_LEN];
        h[0..4].copy_from_slice(&FRAME_MAGIC);
        h[4] = FRAME_VERSION;
        h[5] = codec as u8;
        h[8..12].copy_from_slice(&plain_len.to_le_bytes());
        h[12..16].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        h[16..48].copy_from_slice(&id.0);
        let crc = frame_crc(&h, payload);
        h[48..52].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// Parse and bounds-check a header; errors are details for a
    /// corruption message.
    pub fn parse(h: &[u8]) -> Result<FrameHeader, String> {
        if h.len() < FRAME_HEADER_LEN {
            return Err(format!(
                "frame header truncated ({} of {FRAME_HEADER_LEN} bytes)",
                h.len()
            ));
        }
        if h[0..4] != FRAME_MAGIC {
            return Err("bad frame magic".into());
        }
        if h[4] != FRAME_VERSION {
            return Err(format!("unsupported frame version {}", h[4]));
        }
        let codec = match h[5] {
            0 => Codec::Raw,
            1 => Codec::Zstd,
            c => return Err(format!("unknown codec {c}")),
        };
        let plain_len = super::le32(h, 8);
        let stored_len = super::le32(h, 12);
        if plain_len > MAX_CHUNK_LEN || stored_len > MAX_CHUNK_LEN {
            return Err(format!(
                "frame lengths {plain_len}/{stored_len} exceed the {MAX_CHUNK_LEN} byte limit"
            ));
        }
        if codec == Codec::Raw && plain_len != stored_len {
            return Err("raw frame with different plain and stored lengths".into());
        }
        Ok(FrameHeader {
            codec,
            plain_len,
            stored_len,
            id: ChunkId(super::arr32(h, 16)),
            crc: super::le32(h, 48),
        })
    }
}

/// CRC32 of the first 48 header bytes and the payload.
fn frame_crc(h: &[u8], payload: &[u8]) -> u32 {
    let mut c = crc32fast::Hasher::new();
    c.update(&h[..48]);
    c.update(payload);
    c.finalize()
}

/// Encodes chunks into frames, reusing one zstd context. The payload is
/// compressed straight into the output after a header-sized gap (no
/// scratch buffer to copy from), and the header is written into the gap.
pub struct FrameEncoder {
    level: Option<i32>,
    zstd: Option<zstd::bulk::Compressor<'static>>,
}

impl std::fmt::Debug for FrameEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameEncoder")
            .field("level", &self.level)
            .finish()
    }
}

impl FrameEncoder {
    /// An encoder compressing at zstd `level` (with the chain log of
    /// [`crate::compression::zstd_chain_log`]), or storing raw if `None`.
    pub fn new(level: Option<i32>) -> std::io::Result<Self> {
        let zstd = match level {
            Some(l) => {
                let mut z = zstd::bulk::Compressor::new(l)?;
                if let Some(c) = crate::compression::zstd_chain_log(l) {
                    z.set_parameter(zstd::zstd_safe::CParameter::ChainLog(c))?;
                }
                Some(z)
            }
            None => None,
        };
        Ok(FrameEncoder { level, zstd })
    }

    /// Encode `plain` (already hashed to `id`) into a full frame appended to
    /// `out`. Compressed only when that saves at least 1/32 of the size;
    /// data that looks random ([`crate::compression::looks_incompressible`])
    /// is stored raw without trying. Returns the codec used.
    pub fn encode_into(
        &mut self,
        id: ChunkId,
        plain: &[u8],
        out: &mut Vec<u8>,
    ) -> std::io::Result<Codec> {
        let plain_len = u32::try_from(plain.len())
            .ok()
            .filter(|l| *l <= MAX_CHUNK_LEN)
            .ok_or_else(|| std::io::Error::other("chunk larger than the frame limit"))?;
        let start = out.len();
        let body = start + FRAME_HEADER_LEN;
        out.resize(body, 0);
        let mut codec = Codec::Raw;
        if let Some(z) = self
            .zstd
            .as_mut()
            .filter(|_| !crate::compression::looks_incompressible(plain))
        {
            out.reserve(zstd::zstd_safe::compress_bound(plain.len()));
            // The cursor makes zstd write from `body` on and set the
            // length to the end of what it wrote.
            let mut at = std::io::Cursor::new(&mut *out);
            at.set_position(body as u64);
            let n = z.compress_to_buffer(plain, &mut at)?;
            if n < plain.len() - plain.len() / 32 {
                codec = Codec::Zstd;
            }
        }
        if codec == Codec::Raw {
            out.truncate(body);
            out.extend_from_slice(plain);
        }
        let header = FrameHeader::encode(codec, plain_len, id, &out[body..]);
        out[start..body].copy_from_slice(&header);
        Ok(codec)
    }
}

/// Decodes frames, reusing one zstd context.
pub struct FrameDecoder {
    zstd: zstd::bulk::Decompressor<'static>,
    /// Where [`FrameDecoder::check`] decompresses, kept for the next frame.
    scratch: Vec<u8>,
}

impl std::fmt::Debug for FrameDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FrameDecoder")
    }
}

impl FrameDecoder {
    /// A new decoder.
    pub fn new() -> std::io::Result<Self> {
        Ok(FrameDecoder {
            zstd: zstd::bulk::Decompressor::new()?,
            scratch: Vec::new(),
        })
    }

    /// Check a complete frame as [`FrameDecoder::decode`] does, keeping
    /// nothing: a raw chunk is hashed where it lies, a compressed one is
    /// decompressed into a buffer this decoder keeps for the next frame.
    pub fn check(&mut self, frame: &[u8], expect: Option<ChunkId>) -> Result<(), String> {
        let h = FrameHeader::parse(frame)?;
        let end = FRAME_HEADER_LEN + h.stored_len as usize;
        let payload = frame
            .get(FRAME_HEADER_LEN..end)
            .ok_or_else(|| format!("frame truncated ({} of {end} bytes)", frame.len()))?;
        check_stored(&h, frame, payload, expect)?;
        match h.codec {
            Codec::Raw => check_plain(&h, payload)?,
            Codec::Zstd => {
                let mut out = std::mem::take(&mut self.scratch);
                out.resize(h.plain_len as usize, 0);
                let r = self
                    .zstd
                    .decompress_to_buffer(payload, &mut out[..])
                    .map_err(|e| format!("zstd payload does not decompress: {e}"))
                    .and_then(|n| check_plain(&h, &out[..n]));
                self.scratch = out;
                r?
            }
        };
        Ok(())
    }

    /// Check a complete frame (header + payload) and return its plain bytes.
    /// Verifies the CRC, decompresses within the header's bounds, and checks
    /// the BLAKE3 id (and that it is `expect`, when given). Errors are details
    /// for a [`crate::Error::ChunkDamaged`].
    pub fn decode(&mut self, frame: &[u8], expect: Option<ChunkId>) -> Result<Vec<u8>, String> {
        let h = FrameHeader::parse(frame)?;
        let mut out = vec![0u8; h.plain_len as usize];
        self.decode_into(frame, expect, &mut out)?;
        Ok(out)
    }

    /// Check a frame read in two parts: its `header`, and its payload,
    /// already in `out` (the header's stored length of it); a raw chunk is
    /// then checked where it lies, a compressed one is decompressed into
    /// `out`. Returns the chunk's length, as [`FrameDecoder::decode_into`].
    pub fn decode_in_place(
        &mut self,
        header: &[u8],
        expect: Option<ChunkId>,
        out: &mut [u8],
    ) -> Result<usize, String> {
        let h = FrameHeader::parse(header)?;
        let stored = h.stored_len as usize;
        let payload = out
            .get(..stored)
            .ok_or_else(|| format!("payload of {stored} bytes beyond the buffer"))?;
        check_stored(&h, header, payload, expect)?;
        let plain_len = h.plain_len as usize;
        let n = match h.codec {
            Codec::Raw if stored == plain_len => plain_len,
            Codec::Raw => {
                return Err(format!(
                    "raw payload of {stored} bytes, header says {plain_len}"
                ));
            }
            Codec::Zstd => {
                let payload = payload.to_vec();
                let out = out.get_mut(..plain_len).ok_or_else(|| {
                    format!("output buffer smaller than the chunk ({plain_len} bytes)")
                })?;
                self.zstd
                    .decompress_to_buffer(&payload, out)
                    .map_err(|e| format!("zstd payload does not decompress: {e}"))?
            }
        };
        check_plain(&h, &out[..n.min(out.len())])
    }

    /// Like [`FrameDecoder::decode`], into `out` (at least the header's
    /// plain length); returns the number of bytes written.
    pub fn decode_into(
        &mut self,
        frame: &[u8],
        expect: Option<ChunkId>,
        out: &mut [u8],
    ) -> Result<usize, String> {
        let h = FrameHeader::parse(frame)?;
        let end = FRAME_HEADER_LEN + h.stored_len as usize;
        if frame.len() < end {
            return Err(format!("frame truncated ({} of {end} bytes)", frame.len()));
        }
        let payload = &frame[FRAME_HEADER_LEN..end];
        check_stored(&h, frame, payload, expect)?;
        let plain_len = h.plain_len as usize;
        let out = out
            .get_mut(..plain_len)
            .ok_or_else(|| format!("output buffer smaller than the chunk ({plain_len} bytes)"))?;
        let n = match h.codec {
            Codec::Raw => {
                out.copy_from_slice(payload);
                plain_len
            }
            Codec::Zstd => self
                .zstd
                .decompress_to_buffer(payload, out)
                .map_err(|e| format!("zstd payload does not decompress: {e}"))?,
        };
        check_plain(&h, &out[..n])
    }
}

/// The stored bytes against the header's CRC, and the chunk it names
/// against `expect`.
fn check_stored(
    h: &FrameHeader,
    header: &[u8],
    payload: &[u8],
    expect: Option<ChunkId>,
) -> Result<(), String> {
    if frame_crc(header, payload) != h.crc {
        return Err("CRC mismatch (stored bytes damaged)".into());
    }
    if expect.is_some_and(|e| e != h.id) {
        return Err(format!("frame holds chunk {} instead", h.id.short()));
    }
    Ok(())
}

/// The decoded bytes against the header's length and id; their length.
fn check_plain(h: &FrameHeader, plain: &[u8]) -> Result<usize, String> {
    if plain.len() != h.plain_len as usize {
        return Err(format!(
            "decoded {} bytes, header says {}",
            plain.len(),
            h.plain_len
        ));
    }
    if ChunkId::of(plain) != h.id {
        return Err("BLAKE3 mismatch (content differs from its id)".into());
    }
    Ok(plain.len())
}
