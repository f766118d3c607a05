//! The reply loop of transmission: one reader task reads every reply and
//! hands it to the request with its cookie.
//!
//! Invariant: every MUST and MUST NOT of proto.md about replies is
//! checked here (see the README's "NBD client" section for the list); a
//! violation, a reply for an unknown cookie or an unknown non-error chunk
//! ends the connection and fails every request in flight with the reason.
//! A read completes only when its chunks covered every byte exactly once.

use super::*;

/// The reply loop: reads every reply and hands it to its request.
pub(super) async fn reader(
    r: ReadHalf<Box<dyn Stream>>,
    shared: Arc<Mutex<Shared>>,
    info: ExportInfo,
) {
    // Headers are small: read them from a buffer, not one syscall each.
    // Large payload reads bypass the buffer when it is empty.
    let mut r = tokio::io::BufReader::with_capacity(64 << 10, r);
    let err = match reply_loop(&mut r, &shared, &info).await {
        Ok(()) => NbdError::closed(),
        Err(e) => e,
    };
    tracing::debug!("NBD connection ends: {err}");
    let mut sh = shared.lock().unwrap_or_else(|e| e.into_inner());
    sh.dead = Some(err.clone());
    for (_, f) in sh.inflight.drain() {
        let _ = f.tx.send(Err(err.clone()));
    }
}

pub(super) fn take(shared: &Mutex<Shared>, cookie: u64) -> Result<InFlight, NbdError> {
    shared
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .inflight
        .remove(&cookie)
        .ok_or_else(|| NbdError::Protocol(format!("reply for unknown cookie {cookie}")))
}

pub(super) fn put_back(shared: &Mutex<Shared>, cookie: u64, f: InFlight) {
    shared
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .inflight
        .insert(cookie, f);
}

/// The end of a reply: the request gets its result. A reply that broke a
/// rule only visible at its end is a violation, returned to end the
/// connection.
pub(super) fn finish(f: InFlight) -> Result<(), NbdError> {
    let violation = match (&f.error, &f.what) {
        (Some(_), _) => None,
        (None, Pending::Read { buf, .. }) if !buf.complete() => Some(format!(
            "the reply to a read of {} bytes covered only {:?}",
            buf.want, buf.covered
        )),
        (None, Pending::Status { expect, seen, .. }) if seen.len() != expect.len() => Some(
            format!("a block status reply with chunks for contexts {seen:?} of {expect:?}"),
        ),
        _ => None,
    };
    let r = match (violation, f.error) {
        (Some(v), _) => Err(NbdError::Protocol(v)),
        (None, Some((errno, msg))) => Err(NbdError::Request { errno, msg }),
        (None, None) => Ok(f.what),
    };
    let dead = r
        .as_ref()
        .err()
        .filter(|e| matches!(e, NbdError::Protocol(_)))
        .cloned();
    let _ = f.tx.send(r);
    dead.map_or(Ok(()), Err)
}

pub(super) async fn reply_loop<R: AsyncRead + Unpin>(
    r: &mut R,
    shared: &Mutex<Shared>,
    info: &ExportInfo,
) -> Result<(), NbdError> {
    loop {
        let mut magic = [0u8; 4];
        match r.read_exact(&mut magic).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(io(e)),
        }
        match u32::from_be_bytes(magic) {
            p::SIMPLE_REPLY_MAGIC => {
                let mut h = [0u8; 12];
                read_exact(r, &mut h).await?;
                let errno = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
                let cookie = u64::from_be_bytes(h[4..12].try_into().unwrap_or_default());
                let mut f = take(shared, cookie)?;
                let r = simple(r, errno, &mut f, info).await;
                if let Err(e) = r {
                    let _ = f.tx.send(Err(e.clone()));
                    return Err(e);
                }
                finish(f)?;
            }
            p::STRUCTURED_REPLY_MAGIC => {
                let mut h = [0u8; 16];
                read_exact(r, &mut h).await?;
                let h = p::chunk_header(&h);
                let mut f = take(shared, h.cookie)?;
                let r = if info.structured {
                    chunk(r, &h, &mut f, info).await
                } else {
                    Err(NbdError::Protocol(
                        "a structured reply, which this client did not negotiate".into(),
                    ))
                };
                if let Err(e) = r {
                    // The request taken out gets the reason too.
                    let _ = f.tx.send(Err(e.clone()));
                    return Err(e);
                }
                // Other flag bits are ignored, as proto.md requires.
                if h.flags & p::REPLY_FLAG_DONE != 0 {
                    finish(f)?;
                } else {
                    put_back(shared, h.cookie, f);
                }
            }
            m => return Err(NbdError::Protocol(format!("bad reply magic {m:#x}"))),
        }
    }
}

/// A simple reply: an error, or success with the data of a read.
async fn simple<R: AsyncRead + Unpin>(
    r: &mut R,
    errno: u32,
    f: &mut InFlight,
    info: &ExportInfo,
) -> Result<(), NbdError> {
    if errno != 0 {
        // No payload follows an error, also for a read.
        f.error = Some((errno, String::new()));
        return Ok(());
    }
    match &mut f.what {
        Pending::Read { .. } if info.structured => Err(NbdError::Protocol(
            "a simple reply to a read after structured replies were negotiated".into(),
        )),
        Pending::Read { buf, .. } => {
            let n = buf.want;
            if n > 0 {
                buf.data(r, 0, n).await
            } else {
                Ok(())
            }
        }
        Pending::Status { .. } => Err(NbdError::Protocol(
            "a simple reply with success to a block status request".into(),
        )),
        Pending::Ack => Ok(()),
    }
}

pub(super) async fn payload<R: AsyncRead + Unpin>(
    r: &mut R,
    len: u32,
    limit: u32,
) -> Result<Vec<u8>, NbdError> {
    if len > limit {
        return Err(NbdError::Protocol(format!(
            "chunk of {len} bytes is beyond the limit of {limit}"
        )));
    }
    let mut b = vec![0u8; len as usize];
    read_exact(r, &mut b).await?;
    Ok(b)
}

/// Where `[at, at+n)` starts in a read of `buf.want` bytes at `offset`.
fn within(offset: u64, want: usize, at: u64, n: usize) -> Result<usize, NbdError> {
    at.checked_sub(offset)
        .and_then(|s| usize::try_from(s).ok())
        .filter(|s| n > 0 && s.checked_add(n).is_some_and(|e| e <= want))
        .ok_or_else(|| {
            NbdError::Protocol(format!(
                "a chunk for {at}+{n} outside the read of {offset}+{want}"
            ))
        })
}

pub(super) async fn chunk<R: AsyncRead + Unpin>(
    r: &mut R,
    h: &p::ChunkHeader,
    f: &mut InFlight,
    info: &ExportInfo,
) -> Result<(), NbdError> {
    match h.kind {
        p::REPLY_TYPE_NONE => {
            if h.len != 0 || h.flags & p::REPLY_FLAG_DONE == 0 {
                return Err(NbdError::Protocol(
                    "NONE chunk with payload or without DONE".into(),
                ));
            }
        }
        p::REPLY_TYPE_OFFSET_DATA => {
            let Pending::Read { offset, buf } = &mut f.what else {
                return Err(NbdError::Protocol(
                    "data chunk for a request that reads nothing".into(),
                ));
            };
            if h.len <= 8 || h.len - 8 > info.block.2 {
                return Err(NbdError::Protocol(format!("data chunk of {} bytes", h.len)));
            }
            let mut o = [0u8; 8];
            read_exact(r, &mut o).await?;
            let n = (h.len - 8) as usize;
            let s = within(*offset, buf.want, u64::from_be_bytes(o), n)?;
            buf.data(r, s, n).await?;
        }
        p::REPLY_TYPE_OFFSET_HOLE => {
            let Pending::Read { offset, buf } = &mut f.what else {
                return Err(NbdError::Protocol(
                    "hole chunk for a request that reads nothing".into(),
                ));
            };
            if h.len != 12 {
                return Err(NbdError::Protocol("hole chunk of a wrong length".into()));
            }
            let d = payload(r, h.len, 12).await?;
            let at = p::payload_offset(&d)?;
            let n = u32::from_be_bytes([d[8], d[9], d[10], d[11]]) as usize;
            let s = within(*offset, buf.want, at, n)?;
            buf.hole(s, n)?;
        }
        p::REPLY_TYPE_BLOCK_STATUS => {
            let d = payload(r, h.len, p::MAX_META_CHUNK).await?;
            let (id, ds) = p::parse_block_status(&d)?;
            let Pending::Status {
                context,
                len,
                expect,
                seen,
                descs,
            } = &mut f.what
            else {
                return Err(NbdError::Protocol(
                    "block status for a request that is not one".into(),
                ));
            };
            if !expect.contains(&id) {
                return Err(NbdError::Protocol(format!(
                    "block status for context {id}, which was not negotiated"
                )));
            }
            if seen.contains(&id) {
                return Err(NbdError::Protocol(format!(
                    "two block status chunks for context {id} in one reply"
                )));
            }
            seen.push(id);
            // All but the last descriptor lie inside the request.
            let inside: u64 = ds[..ds.len() - 1].iter().map(|d| u64::from(d.0)).sum();
            if inside >= u64::from(*len) {
                return Err(NbdError::Protocol(format!(
                    "block status descriptors beyond the {len} bytes asked for"
                )));
            }
            if *context == id {
                descs.extend(ds);
            }
        }
        p::REPLY_TYPE_ERROR | p::REPLY_TYPE_ERROR_OFFSET => {
            let d = payload(r, h.len, p::MAX_META_CHUNK).await?;
            let e = p::parse_error_chunk(h.kind, &d)?;
            if let (Some(at), Pending::Read { offset, buf }) = (e.offset, &f.what) {
                within(*offset, buf.want, at, 1)?;
            }
            f.error = Some((e.errno, e.msg));
        }
        t if t & (1 << 15) != 0 => {
            // An unknown error type: the request failed; the message, if
            // it has the common layout, is kept.
            let d = payload(r, h.len, p::MAX_META_CHUNK).await?;
            let (errno, msg) = match p::parse_error_chunk(t, &d) {
                Ok(e) => (e.errno, e.msg),
                Err(_) => (0, String::new()),
            };
            f.error = Some((errno, format!("unknown error chunk type {t}: {msg}")));
        }
        t => {
            return Err(NbdError::Protocol(format!(
                "a chunk of unknown type {t} (proto.md: a client must disconnect)"
            )));
        }
    }
    Ok(())
}
