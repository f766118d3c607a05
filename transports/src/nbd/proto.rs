//! NBD wire format (doc/proto.md of NetworkBlockDevice/nbd): constants and
//! pure, bounds-checked encoders and parsers. All integers are big-endian.
//! Nothing here allocates more than a caller-given limit, and no input can
//! make it panic (fuzzed in tests).

/// "NBDMAGIC": first 8 bytes from the server.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": newstyle negotiation, and the magic of option requests.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Oldstyle negotiation magic (refused).
pub const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Option reply magic.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Request magic.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Simple reply magic.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Structured reply magic.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
/// Server will not send the 124 zero bytes.
pub const FLAG_NO_ZEROES: u16 = 2;
/// Client flags.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1;
/// Client flag: no zeroes.
pub const FLAG_C_NO_ZEROES: u32 = 2;

/// Options.
pub const OPT_ABORT: u32 = 2;
/// List exports.
pub const OPT_LIST: u32 = 3;
/// Upgrade to TLS.
pub const OPT_STARTTLS: u32 = 5;
/// Select an export and end negotiation.
pub const OPT_GO: u32 = 7;
/// Structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// Meta contexts for block status.
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply types.
pub const REP_ACK: u32 = 1;
/// One export of a list.
pub const REP_SERVER: u32 = 2;
/// Export information.
pub const REP_INFO: u32 = 3;
/// A selected meta context.
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
/// Option not supported.
pub const REP_ERR_UNSUP: u32 = REP_ERR + 1;
/// Forbidden by policy.
pub const REP_ERR_POLICY: u32 = REP_ERR + 2;
/// Invalid option.
pub const REP_ERR_INVALID: u32 = REP_ERR + 3;
/// TLS required.
pub const REP_ERR_TLS_REQD: u32 = REP_ERR + 5;
/// Unknown export.
pub const REP_ERR_UNKNOWN: u32 = REP_ERR + 6;

/// Info types.
pub const INFO_EXPORT: u16 = 0;
/// Block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flag every conforming server sets.
pub const TFLAG_HAS_FLAGS: u16 = 1;
/// Transmission flags: read-only export.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// Server accepts FLUSH.
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// Server accepts TRIM.
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
/// Server accepts WRITE_ZEROES.
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Several connections see the same data.
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// "Don't fragment" reads; only with structured replies.
pub const TFLAG_SEND_DF: u16 = 1 << 7;
/// Server honours the FAST_ZERO command flag.
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

/// Commands.
pub const CMD_READ: u16 = 0;
/// Write.
pub const CMD_WRITE: u16 = 1;
/// Disconnect.
pub const CMD_DISC: u16 = 2;
/// Flush.
pub const CMD_FLUSH: u16 = 3;
/// Trim (discard).
pub const CMD_TRIM: u16 = 4;
/// Write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Block status.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flag (block status): one extent per meta context.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Command flag: fail fast (ENOTSUP) rather than zero slowly.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Error numbers with a meaning for the client.
pub const ENOTSUP: u32 = 95;

/// Structured reply flag: last chunk of a reply.
pub const REPLY_FLAG_DONE: u16 = 1;
/// Structured reply chunk types.
pub const REPLY_TYPE_NONE: u16 = 0;
/// Data at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// A hole (zeros) at an offset.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Block status descriptors.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Error.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
/// Error at an offset.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

/// base:allocation flags.
pub const STATE_HOLE: u32 = 1;
/// Reads as zeros.
pub const STATE_ZERO: u32 = 2;
/// `qemu:dirty-bitmap:` flag: the range changed since the bitmap was cleared.
pub const STATE_DIRTY: u32 = 1;

/// Largest option reply payload accepted (bytes).
pub const MAX_OPTION_REPLY: u32 = 64 << 10;
/// Largest non-data structured chunk accepted (bytes).
pub const MAX_META_CHUNK: u32 = 1 << 20;
/// Longest string (names, messages) the protocol allows.
pub const MAX_STRING: usize = 4096;
/// Largest minimum block size the protocol allows.
pub const MAX_MIN_BLOCK: u32 = 1 << 16;
/// Largest export size that can be real: an off_t.
pub const MAX_EXPORT_SIZE: u64 = i64::MAX as u64;

/// A protocol violation, described for the error message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation(pub String);

fn v(s: impl Into<String>) -> Violation {
    Violation(s.into())
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// An option request: IHAVEOPT, option, length, data.
pub fn option_request(option: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + data.len());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// Data of NBD_OPT_GO: export name and the info requests.
pub fn go_data(export: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(export.len() as u32).to_be_bytes());
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

/// Data of NBD_OPT_SET_META_CONTEXT.
pub fn meta_context_data(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(export.len() as u32).to_be_bytes());
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

/// Header of an option reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option replied to.
    pub option: u32,
    /// Reply type.
    pub reply: u32,
    /// Payload length (checked against [`MAX_OPTION_REPLY`]).
    pub len: u32,
}

/// Parse the 20-byte option reply header.
pub fn option_reply_header(b: &[u8; 20]) -> Result<OptionReplyHeader, Violation> {
    if be64(b, 0) != OPT_REPLY_MAGIC {
        return Err(v("bad option reply magic"));
    }
    let h = OptionReplyHeader {
        option: be32(b, 8),
        reply: be32(b, 12),
        len: be32(b, 16),
    };
    if h.len > MAX_OPTION_REPLY {
        return Err(v(format!(
            "option reply of {} bytes is beyond the limit",
            h.len
        )));
    }
    Ok(h)
}

/// Whether an option reply type is an error.
pub fn is_error_reply(reply: u32) -> bool {
    reply & REP_ERR != 0
}

/// What an NBD_REP_INFO payload says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Info {
    /// Export size and transmission flags.
    Export {
        /// Size in bytes.
        size: u64,
        /// Transmission flags.
        flags: u16,
    },
    /// Block size constraints.
    BlockSize {
        /// Minimum.
        min: u32,
        /// Preferred.
        preferred: u32,
        /// Maximum payload.
        max: u32,
    },
    /// Another info type (ignored).
    Other(u16),
}

/// Parse an NBD_REP_INFO payload.
pub fn parse_info(p: &[u8]) -> Result<Info, Violation> {
    if p.len() < 2 {
        return Err(v("info reply too short"));
    }
    match be16(p, 0) {
        INFO_EXPORT if p.len() == 12 => Ok(Info::Export {
            size: be64(p, 2),
            flags: be16(p, 10),
        }),
        INFO_BLOCK_SIZE if p.len() == 14 => {
            let (min, preferred, max) = (be32(p, 2), be32(p, 6), be32(p, 10));
            // proto.md, "Block size constraints": min a power of two up
            // to 64 KiB; preferred a power of two of at least max(min,
            // 512); max at least preferred.
            if !min.is_power_of_two()
                || min > MAX_MIN_BLOCK
                || !preferred.is_power_of_two()
                || preferred < min.max(512)
                || max < preferred
            {
                return Err(v(format!(
                    "impossible block size constraints (minimum {min}, preferred {preferred}, maximum {max})"
                )));
            }
            Ok(Info::BlockSize {
                min,
                preferred,
                max,
            })
        }
        INFO_EXPORT | INFO_BLOCK_SIZE => Err(v("info reply of the wrong length")),
        t => Ok(Info::Other(t)),
    }
}

/// Parse NBD_REP_META_CONTEXT: context id and name (UTF-8, at most
/// [`MAX_STRING`] bytes).
pub fn parse_meta_context(p: &[u8]) -> Result<(u32, String), Violation> {
    if p.len() < 4 {
        return Err(v("meta context reply too short"));
    }
    if p.len() - 4 > MAX_STRING {
        return Err(v("meta context name longer than 4096 bytes"));
    }
    let name =
        std::str::from_utf8(&p[4..]).map_err(|_| v("meta context name that is not UTF-8"))?;
    Ok((be32(p, 0), name.to_owned()))
}

/// Parse NBD_REP_SERVER: an export name.
pub fn parse_server(p: &[u8]) -> Result<String, Violation> {
    if p.len() < 4 {
        return Err(v("server reply too short"));
    }
    let n = be32(p, 0) as usize;
    let name = p
        .get(4..4 + n)
        .ok_or_else(|| v("export name beyond the reply"))?;
    Ok(String::from_utf8_lossy(name).into_owned())
}

/// An option reply (server side): header and `data`.
pub fn option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut r = OPT_REPLY_MAGIC.to_be_bytes().to_vec();
    r.extend_from_slice(&option.to_be_bytes());
    r.extend_from_slice(&reply.to_be_bytes());
    r.extend_from_slice(&(data.len() as u32).to_be_bytes());
    r.extend_from_slice(data);
    r
}

/// One structured reply chunk (server side): header and `payload`.
pub fn structured_chunk(flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
    let mut r = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
    r.extend_from_slice(&flags.to_be_bytes());
    r.extend_from_slice(&kind.to_be_bytes());
    r.extend_from_slice(&cookie.to_be_bytes());
    r.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    r.extend_from_slice(payload);
    r
}

/// A transmission request header (28 bytes).
pub fn request(flags: u16, cmd: u16, cookie: u64, offset: u64, len: u32) -> [u8; 28] {
    let mut r = [0u8; 28];
    r[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    r[4..6].copy_from_slice(&flags.to_be_bytes());
    r[6..8].copy_from_slice(&cmd.to_be_bytes());
    r[8..16].copy_from_slice(&cookie.to_be_bytes());
    r[16..24].copy_from_slice(&offset.to_be_bytes());
    r[24..28].copy_from_slice(&len.to_be_bytes());
    r
}

/// The rest of a structured reply header after its magic (16 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    /// Flags (DONE).
    pub flags: u16,
    /// Chunk type.
    pub kind: u16,
    /// Request cookie.
    pub cookie: u64,
    /// Payload length.
    pub len: u32,
}

/// Parse a structured reply header (after the 4-byte magic).
pub fn chunk_header(b: &[u8; 16]) -> ChunkHeader {
    ChunkHeader {
        flags: be16(b, 0),
        kind: be16(b, 2),
        cookie: be64(b, 4),
        len: be32(b, 12),
    }
}

/// An error chunk's payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorChunk {
    /// The error number (never 0).
    pub errno: u32,
    /// The server's message.
    pub msg: String,
    /// Where the error is (NBD_REPLY_TYPE_ERROR_OFFSET only).
    pub offset: Option<u64>,
}

/// Parse an error chunk of type `kind`: a nonzero error, a message of at
/// most [`MAX_STRING`] bytes that fills the chunk (plus the 8-byte offset
/// of NBD_REPLY_TYPE_ERROR_OFFSET). Unknown error types keep whatever
/// follows the message.
pub fn parse_error_chunk(kind: u16, p: &[u8]) -> Result<ErrorChunk, Violation> {
    if p.len() < 6 {
        return Err(v("error chunk too short"));
    }
    let errno = be32(p, 0);
    if errno == 0 {
        return Err(v("error chunk with error number 0"));
    }
    let n = be16(p, 4) as usize;
    if n > MAX_STRING {
        return Err(v("error message longer than 4096 bytes"));
    }
    let msg = p
        .get(6..6 + n)
        .ok_or_else(|| v("error message beyond the chunk"))?;
    let rest = &p[6 + n..];
    let offset = match kind {
        REPLY_TYPE_ERROR if rest.is_empty() => None,
        REPLY_TYPE_ERROR_OFFSET if rest.len() == 8 => Some(be64(rest, 0)),
        REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET => {
            return Err(v("error chunk whose length does not match its message"));
        }
        _ => None,
    };
    Ok(ErrorChunk {
        errno,
        msg: String::from_utf8_lossy(msg).into_owned(),
        offset,
    })
}

/// A block status chunk: context id and (length, flags) descriptors.
pub fn parse_block_status(p: &[u8]) -> Result<(u32, Vec<(u32, u32)>), Violation> {
    if p.len() < 12 || (p.len() - 4) % 8 != 0 {
        return Err(v("block status chunk of a wrong length"));
    }
    let id = be32(p, 0);
    let ds: Vec<(u32, u32)> = p[4..]
        .chunks_exact(8)
        .map(|d| (be32(d, 0), be32(d, 4)))
        .collect();
    if ds.iter().any(|d| d.0 == 0) {
        return Err(v("block status descriptor of length 0"));
    }
    Ok((id, ds))
}

/// Read an 8-byte offset at the start of a payload.
pub fn payload_offset(p: &[u8]) -> Result<u64, Violation> {
    if p.len() < 8 {
        return Err(v("chunk too short for its offset"));
    }
    Ok(be64(p, 0))
}

/// An errno from the server as text.
pub fn errno_name(e: u32) -> &'static str {
    match e {
        1 => "EPERM",
        5 => "EIO",
        12 => "ENOMEM",
        22 => "EINVAL",
        28 => "ENOSPC",
        75 => "EOVERFLOW",
        95 => "ENOTSUP",
        108 => "ESHUTDOWN",
        _ => "error",
    }
}
