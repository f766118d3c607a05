//! The `dmrs/1` wire protocol of the repository service: framing,
//! message types, limits and the JSON bodies. One module, like
//! `datamover::format`: a change here is a new protocol version, and the
//! golden test below pins the bytes.
//!
//! Invariant: a message's length is checked against [`MAX_MESSAGE`]
//! before anything is allocated, and an unknown message type is a
//! protocol violation ([`std::io::ErrorKind::InvalidData`]).
//!
//! ## Wire protocol `dmrs/1`

//!
//! Mutual TLS (ALPN `dmrs/1`): both ends present certificates issued by
//! the installation's CA. Then messages, each
//!
//! ```text
//! u32 LE  length of what follows (type + payload), at most 80 MiB
//! u8      type
//! …       payload
//! ```
//!
//! | type | name | direction | payload |
//! |---|---|---|---|
//! | 1 | HELLO | c→s | JSON [`Hello`] (magic `DMRS`, version 1) |
//! | 2 | READY | s→c | JSON [`Ready`] |
//! | 3 | GET_PARENT | c→s | empty |
//! | 4 | MANIFEST_PART | both | manifest bytes (≤ 4 MiB per message) |
//! | 5 | MANIFEST_END | both | empty (s→c: after the parent's parts) |
//! | 6 | HAVE | c→s | n × 32-byte chunk ids |
//! | 7 | MISSING | s→c | n bits, LSB first: 1 = send it |
//! | 8 | FRAMES | c→s | whole chunk frames as stored in packs; no answer |
//! | 10 | COMMIT | c→s | empty, after the manifest's parts |
//! | 11 | COMMITTED | s→c | JSON [`Committed`] |
//! | 12 | STARTED | s→c | JSON: the VM started on the replicas |
//! | 13 | GET_CHUNK | c→s | one 32-byte chunk id (op `read`) |
//! | 14 | CHUNK | s→c | u8 status, then: 0 the frame as stored; 1 (the repository lacks it) nothing; 2 (it cannot be read) the reason, UTF-8 |
//! | 15 | GET_MANIFEST | c→s | empty (op `read`): the point's manifest follows as MANIFEST_PART…, MANIFEST_END |
//! | 255 | ERROR | s→c | JSON `{"error": …}`; the server then closes |
//!
//! A session: HELLO → READY; optionally GET_PARENT; any number of HAVE /
//! FRAMES; MANIFEST_PART…, COMMIT → COMMITTED.
//!
//! Admission and trust (version 1 as of the issue "Trust"): a HELLO is
//! answered only for a peer the server granted the repository and disk
//! (else ERROR "not granted"); HELLO's `started` is ignored (the service
//! dates the point) and its `replica` must match the grant. COMMITTED
//! carries `receipt`, the service's signature over the point for the
//! server (an optional field: older clients ignore it).
//!
//! The service reads a connection on one thread and answers HAVE at once
//! (from the index as the session began and the frames received so far);
//! a worker thread checks and stores the frames, so reading, checking and
//! writing overlap. COMMIT waits for the worker. HELLO with `op: "latest"`
//! gets READY and the connection ends.
//!
//! HELLO with `op: "start-vm"` (added by the issue "Real guests"; an older
//! service refuses the op) ends a quick migration: from a peer whose
//! grant for the disk says `start` (a migration task), the service starts
//! the disk's VM on its replicas through its host's hypervisor (domain
//! `start_as`, default the VM's name) and answers STARTED, or ERROR.
//!
//! HELLO with `op: "read"` (added by the issue "Instant VM recovery"; an
//! older service refuses the op) reads one point: `point` names it (an id
//! or its prefix; none: the newest). It needs a read grant for the disk
//! (and that point, when the grant names one), which no backup grant is,
//! and a read grant writes nothing. READY names the point (`point`) and
//! carries its metadata (`parent_meta`); then GET_MANIFEST and GET_CHUNK,
//! each answered at once, until the client closes. The session holds the
//! repository's shared lock, so no collection removes a chunk it reads.
//! The client checks every frame (CRC, BLAKE3 against the id) itself.

use std::io::{self, Read, Write};
use std::time::Duration;

use datamover::format::manifest::PointMeta;
use datamover::replica::ReplicaReport;
use serde::{Deserialize, Serialize};

/// ALPN protocol name.
pub const ALPN: &[u8] = b"dmrs/1";
/// Magic in HELLO.
pub const MAGIC: &str = "DMRS";
/// Protocol version.
pub const VERSION: u32 = 1;
/// Largest message.
pub const MAX_MESSAGE: usize = 80 << 20;
/// Frames sent per HAVE/FRAMES round.
pub const BATCH_BYTES: usize = 8 << 20;
/// Manifest bytes per MANIFEST_PART.
pub const PART: usize = 4 << 20;
/// Threads checking one session's frames, at most (one a core): the
/// decompression and BLAKE3 of every frame is the service's main cost.
pub const CHECKERS: usize = 4;
/// Sessions (connections past TLS and HELLO) served at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Connections in their TLS handshake at once (before a peer has shown a
/// certificate it holds no session slot).
pub const MAX_HANDSHAKES: usize = 32;
/// Connections from one address at once, handshaking or in session.
pub const MAX_PER_ADDRESS: usize = 16;
/// Time a new connection has to finish TLS and send HELLO.
pub const HANDSHAKE: Duration = Duration::from_secs(10);
/// A silent peer in session is dropped after this long (the client's own
/// wait for an answer, a commit with its replica update included).
pub const IDLE: Duration = Duration::from_secs(300);
/// A session waits this long for the next message of its peer.
pub const SESSION_IDLE: Duration = Duration::from_secs(120);

/// A message type: the byte after a message's length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Msg {
    /// c→s: JSON [`Hello`].
    Hello = 1,
    /// s→c: JSON [`Ready`].
    Ready = 2,
    /// c→s: empty; ask for the parent's manifest.
    GetParent = 3,
    /// Both ways: manifest bytes (at most [`PART`] per message).
    ManifestPart = 4,
    /// Both ways: empty; the manifest is complete.
    ManifestEnd = 5,
    /// c→s: n × 32-byte chunk ids.
    Have = 6,
    /// s→c: n bits, LSB first: 1 = send it.
    Missing = 7,
    /// c→s: whole chunk frames as stored in packs; no answer.
    Frames = 8,
    /// c→s: empty, after the manifest's parts.
    Commit = 10,
    /// s→c: JSON [`Committed`].
    Committed = 11,
    /// s→c: JSON, the VM a `start-vm` HELLO started on the replicas.
    Started = 12,
    /// c→s (op `read`): one 32-byte chunk id.
    GetChunk = 13,
    /// s→c: [`ChunkStatus`], then the frame (or the reason it is not).
    Chunk = 14,
    /// c→s (op `read`): empty; the point's manifest follows.
    GetManifest = 15,
    /// s→c: JSON `{"error": …}`; the server then closes.
    Error = 255,
}

impl std::fmt::Display for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            Msg::Hello => "HELLO",
            Msg::Ready => "READY",
            Msg::GetParent => "GET_PARENT",
            Msg::ManifestPart => "MANIFEST_PART",
            Msg::ManifestEnd => "MANIFEST_END",
            Msg::Have => "HAVE",
            Msg::Missing => "MISSING",
            Msg::Frames => "FRAMES",
            Msg::Commit => "COMMIT",
            Msg::Committed => "COMMITTED",
            Msg::Started => "STARTED",
            Msg::GetChunk => "GET_CHUNK",
            Msg::Chunk => "CHUNK",
            Msg::GetManifest => "GET_MANIFEST",
            Msg::Error => "ERROR",
        };
        write!(f, "{name} ({})", *self as u8)
    }
}

impl Msg {
    /// The type of byte `b`, if it names one.
    pub fn from_byte(b: u8) -> Option<Msg> {
        Some(match b {
            1 => Msg::Hello,
            2 => Msg::Ready,
            3 => Msg::GetParent,
            4 => Msg::ManifestPart,
            5 => Msg::ManifestEnd,
            6 => Msg::Have,
            7 => Msg::Missing,
            8 => Msg::Frames,
            10 => Msg::Commit,
            11 => Msg::Committed,
            12 => Msg::Started,
            13 => Msg::GetChunk,
            14 => Msg::Chunk,
            15 => Msg::GetManifest,
            255 => Msg::Error,
            _ => return None,
        })
    }
}

/// What a client opens a connection for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Op {
    /// Write a new point.
    Backup,
    /// Only ask for the newest point's metadata.
    Latest,
    /// Start the disk's VM on its replicas (a migration's last step).
    StartVm,
    /// Read one point (an export or an instant recovery on another host).
    Read,
}

/// The first byte of a CHUNK answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ChunkStatus {
    /// The frame as stored follows.
    Frame = 0,
    /// The repository's index lacks the chunk.
    Missing = 1,
    /// It could not be read; the reason follows.
    Unreadable = 2,
}

impl ChunkStatus {
    /// The status byte `b` names, if any.
    pub fn from_byte(b: u8) -> Option<ChunkStatus> {
        Some(match b {
            0 => ChunkStatus::Frame,
            1 => ChunkStatus::Missing,
            2 => ChunkStatus::Unreadable,
            _ => return None,
        })
    }
}

/// The first message.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    /// `DMRS`.
    pub magic: String,
    /// Protocol version.
    pub version: u32,
    /// Repository name, as the server assigned it to the service.
    pub repository: String,
    /// Disk name, `vm/disk`.
    pub disk: String,
    /// What for.
    pub op: Op,
    /// When the backup started (RFC 3339; names the point).
    #[serde(default)]
    pub started: Option<String>,
    /// After the commit, bring the disk's replica image
    /// (`<repository>/replicas/<vm>/<disk>.img`) to the new point.
    #[serde(default)]
    pub replica: bool,
    /// The task this session is for: it selects the grant (a host may
    /// hold several for one disk: a task ending, the next starting).
    /// Left out when none, so a HELLO without it is byte for byte the
    /// original one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<u64>,
    /// `start-vm`: the domain's name on this host (default: the VM's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_as: Option<String>,
    /// `read`: the point (an id or its prefix; none: the newest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub point: Option<String>,
}

/// Answer to HELLO.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ready {
    /// The new point (op `backup`).
    pub point: Option<String>,
    /// The disk's newest point.
    pub parent: Option<String>,
    /// Its metadata.
    pub parent_meta: Option<PointMeta>,
}

/// Answer to COMMIT.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Committed {
    /// The point published.
    pub point: String,
    /// Frames received.
    pub frames: u64,
    /// Frames stored (the rest the repository held already).
    pub frames_new: u64,
    /// Bytes stored.
    pub bytes_new: u64,
    /// The replica update, for a replica repository.
    pub replica: Option<ReplicaReport>,
    /// The service's signed receipt for the point (for the server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receipt: Option<datamover_control::api::Receipt>,
}

/// Body of an ERROR message.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorMsg {
    /// What went wrong.
    pub error: String,
}

/// Write one message.
pub fn write_msg(w: &mut impl Write, ty: Msg, payload: &[u8]) -> io::Result<()> {
    write_msg_parts(w, ty, &[payload])
}

/// Write one message whose payload is `parts` one after the other (frames
/// go to the stream from where they lie, not through a copy).
pub fn write_msg_parts(w: &mut impl Write, ty: Msg, parts: &[&[u8]]) -> io::Result<()> {
    let len = u32::try_from(parts.iter().map(|p| p.len()).sum::<usize>() + 1)
        .ok()
        .filter(|n| *n as usize <= MAX_MESSAGE)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "message too long"))?;
    w.write_all(&len.to_le_bytes())?;
    w.write_all(&[ty as u8])?;
    for p in parts {
        w.write_all(p)?;
    }
    Ok(())
}

/// Read one message; its length is checked before anything is allocated.
pub fn read_msg(r: &mut impl Read) -> io::Result<(Msg, Vec<u8>)> {
    let mut b = Vec::new();
    let ty = read_msg_into(r, &mut b)?;
    Ok((ty, b))
}

/// Read one message's payload into `b`, reusing its allocation (a buffer
/// the last message's consumer handed back: no fresh pages to fault in and
/// zero for every message of frames).
pub fn read_msg_into(r: &mut impl Read, b: &mut Vec<u8>) -> io::Result<Msg> {
    let mut h = [0u8; 5];
    r.read_exact(&mut h)?;
    let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
    if len == 0 || len > MAX_MESSAGE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("message length {len} outside 1..={MAX_MESSAGE}"),
        ));
    }
    let ty = Msg::from_byte(h[4]).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unknown message type {}", h[4]),
        )
    })?;
    // Only bytes beyond the old length are zeroed; the read overwrites all.
    b.resize(len - 1, 0);
    r.read_exact(b)?;
    Ok(ty)
}

/// A JSON body.
pub fn json<T: Serialize>(v: &T) -> io::Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(io::Error::other)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// dmrs/1 on the wire, pinned: the framing (u32 LE length of type +
    /// payload, then the type) and HELLO's JSON. A change here is a new
    /// protocol version.
    #[test]
    fn golden_wire_bytes() {
        let hello = Hello {
            magic: MAGIC.into(),
            version: VERSION,
            repository: "vault".into(),
            disk: "web01/vda".into(),
            op: Op::Backup,
            started: Some("2026-11-28T00:00:00.000Z".into()),
            replica: true,
            task: None,
            start_as: None,
            point: None,
        };
        let mut b = Vec::new();
        write_msg(&mut b, Msg::Hello, &json(&hello).unwrap()).unwrap();
        let body = br#"{"magic":"DMRS","version":1,"repository":"vault","disk":"web01/vda","op":"backup","started":"2026-11-28T00:00:00.000Z","replica":true}"#;
        let mut want = ((body.len() + 1) as u32).to_le_bytes().to_vec();
        want.push(1);
        want.extend_from_slice(body);
        assert_eq!(b, want);
        // With the task that selects the grant (added by issue "Trust";
        // older services ignore it).
        let with_task = Hello {
            task: Some(7),
            ..hello
        };
        let body = br#"{"magic":"DMRS","version":1,"repository":"vault","disk":"web01/vda","op":"backup","started":"2026-11-28T00:00:00.000Z","replica":true,"task":7}"#;
        assert_eq!(json(&with_task).unwrap(), body.to_vec());
        let back: Hello = serde_json::from_slice(body).unwrap();
        assert_eq!(back.task, Some(7));
        // A migration's last step (added by issue "Real guests").
        let start = Hello {
            op: Op::StartVm,
            started: None,
            task: Some(9),
            start_as: Some("web01-new".into()),
            ..with_task
        };
        let body = br#"{"magic":"DMRS","version":1,"repository":"vault","disk":"web01/vda","op":"start-vm","started":null,"replica":true,"task":9,"start_as":"web01-new"}"#;
        assert_eq!(json(&start).unwrap(), body.to_vec());
        // Reading a point (added by issue "Instant VM recovery").
        let read = Hello {
            op: Op::Read,
            started: None,
            replica: false,
            task: None,
            start_as: None,
            point: Some("20261201T000000".into()),
            ..start
        };
        let body = br#"{"magic":"DMRS","version":1,"repository":"vault","disk":"web01/vda","op":"read","started":null,"replica":false,"point":"20261201T000000"}"#;
        assert_eq!(json(&read).unwrap(), body.to_vec());
        assert_eq!(
            (
                Msg::GetChunk as u8,
                Msg::Chunk as u8,
                Msg::GetManifest as u8
            ),
            (13, 14, 15)
        );
        for (s, b) in [
            (ChunkStatus::Frame, 0),
            (ChunkStatus::Missing, 1),
            (ChunkStatus::Unreadable, 2),
        ] {
            assert_eq!((s as u8, ChunkStatus::from_byte(b)), (b, Some(s)));
        }
        assert_eq!(ChunkStatus::from_byte(3), None);
        assert_eq!(Msg::Started as u8, 12);
        assert_eq!(Msg::from_byte(12), Some(Msg::Started));
        let mut m = Vec::new();
        write_msg(&mut m, Msg::Missing, &[0b0000_0101]).unwrap();
        assert_eq!(m, [2, 0, 0, 0, 7, 0b0000_0101]);
        assert_eq!(
            (
                Msg::Hello as u8,
                Msg::Ready as u8,
                Msg::GetParent as u8,
                Msg::ManifestPart as u8,
                Msg::ManifestEnd as u8,
                Msg::Have as u8
            ),
            (1, 2, 3, 4, 5, 6)
        );
        assert_eq!(
            (
                Msg::Missing as u8,
                Msg::Frames as u8,
                Msg::Commit as u8,
                Msg::Committed as u8,
                Msg::Error as u8
            ),
            (7, 8, 10, 11, 255)
        );
        assert_eq!(ALPN, b"dmrs/1");
    }

    #[test]
    fn messages_round_trip_and_bad_lengths_are_refused() {
        let mut b = Vec::new();
        write_msg(&mut b, Msg::Have, &[7u8; 64]).unwrap();
        let (t, p) = read_msg(&mut &b[..]).unwrap();
        assert_eq!((t, p.len()), (Msg::Have, 64));
        // Zero and oversized lengths are errors before any allocation.
        for len in [0u32, (MAX_MESSAGE + 1) as u32, u32::MAX] {
            let mut m = len.to_le_bytes().to_vec();
            m.push(Msg::Have as u8);
            let e = read_msg(&mut &m[..]).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{len}");
        }
        // A truncated payload is an error, not a short message.
        let e = read_msg(&mut &b[..20]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }
}
