//! The reply loop of transmission: one reader task reads every reply and
//! hands it to the request with its cookie.
//!
//! Invariant: unknown non-error structured chunks are skipped; a reply
//! for an unknown cookie or any other violation ends the connection and
//! fails every request in flight with the reason.

use super::*;

/// The reply loop: reads every reply and hands it to its request.
pub(super) async fn reader(
    r: ReadHalf<Box<dyn Stream>>,
    shared: Arc<Mutex<Shared>>,
    max_payload: u32,
) {
    // Headers are small: read them from a buffer, not one syscall each.
    // Large payload reads bypass the buffer when it is empty.
    let mut r = tokio::io::BufReader::with_capacity(64 << 10, r);
    let err = match reply_loop(&mut r, &shared, max_payload).await {
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

pub(super) fn finish(f: InFlight) {
    let r = match f.error {
        Some((errno, msg)) => Err(NbdError::Request { errno, msg }),
        None => match f.what {
            Pending::Read { buf, .. } if !buf.complete() => Err(NbdError::Protocol(format!(
                "the reply to a read of {} bytes covered only {:?}",
                buf.want, buf.covered
            ))),
            w => Ok(w),
        },
    };
    let _ = f.tx.send(r);
}

pub(super) async fn reply_loop<R: AsyncRead + Unpin>(
    r: &mut R,
    shared: &Mutex<Shared>,
    max_payload: u32,
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
                if errno != 0 {
                    f.error = Some((errno, String::new()));
                } else if let Pending::Read { buf, .. } = &mut f.what {
                    let n = buf.want;
                    if let Err(e) = buf.data(r, 0, n).await {
                        let _ = f.tx.send(Err(e.clone()));
                        return Err(e);
                    }
                }
                finish(f);
            }
            p::STRUCTURED_REPLY_MAGIC => {
                let mut h = [0u8; 16];
                read_exact(r, &mut h).await?;
                let h = p::chunk_header(&h);
                let mut f = take(shared, h.cookie)?;
                if let Err(e) = chunk(r, &h, &mut f, max_payload).await {
                    // The request taken out gets the reason too.
                    let _ = f.tx.send(Err(e.clone()));
                    return Err(e);
                }
                if h.flags & p::REPLY_FLAG_DONE != 0 {
                    finish(f);
                } else {
                    put_back(shared, h.cookie, f);
                }
            }
            m => return Err(NbdError::Protocol(format!("bad reply magic {m:#x}"))),
        }
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

pub(super) async fn chunk<R: AsyncRead + Unpin>(
    r: &mut R,
    h: &p::ChunkHeader,
    f: &mut InFlight,
    max_payload: u32,
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
            if h.len < 8 || h.len - 8 > max_payload {
                return Err(NbdError::Protocol(format!("data chunk of {} bytes", h.len)));
            }
            let mut o = [0u8; 8];
            read_exact(r, &mut o).await?;
            let at = u64::from_be_bytes(o);
            let n = (h.len - 8) as usize;
            let start = at.checked_sub(*offset).map(|s| s as usize);
            match start.filter(|s| s.checked_add(n).is_some_and(|e| e <= buf.want)) {
                Some(s) => buf.data(r, s, n).await?,
                None => {
                    return Err(NbdError::Protocol(format!(
                        "data chunk at {at}+{n} outside the request"
                    )));
                }
            }
        }
        p::REPLY_TYPE_OFFSET_HOLE => {
            let Pending::Read { offset, buf } = &mut f.what else {
                return Err(NbdError::Protocol(
                    "hole chunk for a request that reads nothing".into(),
                ));
            };
            let d = payload(r, h.len, 12).await?;
            if d.len() != 12 {
                return Err(NbdError::Protocol("hole chunk of a wrong length".into()));
            }
            let at = p::payload_offset(&d)?;
            let n = u32::from_be_bytes([d[8], d[9], d[10], d[11]]) as usize;
            let start = at.checked_sub(*offset).map(|s| s as usize);
            match start.filter(|s| n > 0 && s.checked_add(n).is_some_and(|e| e <= buf.want)) {
                Some(s) => buf.hole(s, n),
                None => {
                    return Err(NbdError::Protocol(format!(
                        "hole at {at}+{n} outside the request"
                    )));
                }
            }
        }
        p::REPLY_TYPE_BLOCK_STATUS => {
            let d = payload(r, h.len, p::MAX_META_CHUNK).await?;
            let (id, ds) = p::parse_block_status(&d)?;
            match &mut f.what {
                Pending::Status { context, descs } if *context == id => descs.extend(ds),
                Pending::Status { .. } => {} // another context: not asked for here
                _ => {
                    return Err(NbdError::Protocol(
                        "block status for a request that is not one".into(),
                    ));
                }
            }
        }
        p::REPLY_TYPE_ERROR | p::REPLY_TYPE_ERROR_OFFSET => {
            let d = payload(r, h.len, p::MAX_META_CHUNK).await?;
            let (errno, msg) = p::parse_error_chunk(&d)?;
            f.error = Some((errno, msg));
        }
        t if t & (1 << 15) != 0 => {
            let _ = payload(r, h.len, p::MAX_META_CHUNK).await?;
            f.error = Some((0, format!("unknown error chunk type {t}")));
        }
        _ => {
            // Unknown non-error chunk: skip it, in bounded pieces.
            let mut left = h.len as usize;
            let mut sink = [0u8; 4096];
            while left > 0 {
                let n = left.min(sink.len());
                read_exact(r, &mut sink[..n]).await?;
                left -= n;
            }
        }
    }
    Ok(())
}
