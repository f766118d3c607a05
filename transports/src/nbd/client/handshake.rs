//! Negotiation: the fixed newstyle handshake, STARTTLS, export listing,
//! structured replies and meta contexts, up to transmission.
//!
//! Invariant: an option reply is for the option just sent and its length
//! is read before its payload is allocated; what the server says about
//! the export (flags, sizes, block constraints, meta contexts) obeys
//! proto.md's MUSTs before transmission starts, or negotiation fails.

use super::*;

pub(super) async fn option_reply(
    s: &mut Box<dyn Stream>,
    option: u32,
) -> Result<(p::OptionReplyHeader, Vec<u8>), NbdError> {
    let mut h = [0u8; 20];
    read_exact(s, &mut h).await?;
    let h = p::option_reply_header(&h)?;
    if h.option != option {
        return Err(NbdError::Protocol(format!(
            "reply to option {} while waiting for {option}",
            h.option
        )));
    }
    if h.reply == p::REP_ACK && h.len != 0 {
        return Err(NbdError::Protocol(format!(
            "an acknowledgement of option {option} with {} bytes of payload",
            h.len
        )));
    }
    let mut data = vec![0u8; h.len as usize];
    read_exact(s, &mut data).await?;
    Ok((h, data))
}

/// The export as negotiated obeys the protocol, and its size can be real;
/// checked before anything is read.
pub(super) fn check_export(info: &ExportInfo) -> Result<(), NbdError> {
    let f = info.flags;
    let bad = if f & p::TFLAG_HAS_FLAGS == 0 {
        Some(format!("transmission flags {f:#x} without HAS_FLAGS"))
    } else if f & p::TFLAG_SEND_DF != 0 && !info.structured {
        Some("the DF flag without structured replies".into())
    } else if f & p::TFLAG_SEND_FAST_ZERO != 0 && f & p::TFLAG_SEND_WRITE_ZEROES == 0 {
        Some("the FAST_ZERO flag without WRITE_ZEROES".into())
    } else if info.size > p::MAX_EXPORT_SIZE {
        Some(format!(
            "an export of {} bytes, larger than any disk can be ({} bytes)",
            info.size,
            p::MAX_EXPORT_SIZE
        ))
    } else if info.size % u64::from(info.block.0.max(1)) != 0 {
        Some(format!(
            "an export of {} bytes, not a multiple of its minimum block size {} (its last bytes could not be read)",
            info.size, info.block.0
        ))
    } else {
        None
    };
    bad.map_or(Ok(()), |b| Err(NbdError::Protocol(b)))
}

pub(super) fn option_error(what: &str, reply: u32, data: &[u8]) -> NbdError {
    let msg = String::from_utf8_lossy(data);
    let msg = if msg.is_empty() {
        String::new()
    } else {
        format!(" ({msg})")
    };
    match reply {
        p::REP_ERR_TLS_REQD => NbdError::Server(format!(
            "the server requires TLS{msg}: use an nbds:// address"
        )),
        p::REP_ERR_POLICY => {
            NbdError::Server(format!("{what} refused by the server's policy{msg}"))
        }
        _ => NbdError::Server(format!("{what} failed with reply {reply:#x}{msg}")),
    }
}

impl NbdClient {
    pub(super) async fn negotiate(
        mut s: Box<dyn Stream>,
        uri: &NbdUri,
        opts: &ConnectOptions,
        // Present exactly when the address asks for TLS (see `connect`).
        tls: Option<(std::sync::Arc<rustls::ClientConfig>, std::path::PathBuf)>,
    ) -> Result<(Box<dyn Stream>, ExportInfo), NbdError> {
        let mut hello = [0u8; 18];
        read_exact(&mut s, &mut hello[..16]).await?;
        let magic = u64::from_be_bytes(hello[0..8].try_into().unwrap_or_default());
        let style = u64::from_be_bytes(hello[8..16].try_into().unwrap_or_default());
        if magic != p::NBDMAGIC {
            return Err(NbdError::Protocol("not an NBD server (no NBDMAGIC)".into()));
        }
        if style == p::OLDSTYLE_MAGIC {
            return Err(NbdError::Unsupported(
                "oldstyle NBD servers (use a newstyle server, e.g. qemu-nbd or nbdkit)".into(),
            ));
        }
        if style != p::IHAVEOPT {
            return Err(NbdError::Protocol("unknown negotiation style".into()));
        }
        read_exact(&mut s, &mut hello[16..18]).await?;
        let hflags = u16::from_be_bytes([hello[16], hello[17]]);
        if hflags & !(p::FLAG_FIXED_NEWSTYLE | p::FLAG_NO_ZEROES) != 0 {
            return Err(NbdError::Protocol(format!(
                "handshake flags {hflags:#x} set bits the protocol does not define"
            )));
        }
        if hflags & p::FLAG_FIXED_NEWSTYLE == 0 {
            return Err(NbdError::Unsupported(
                "servers without fixed newstyle negotiation".into(),
            ));
        }
        let mut cflags = p::FLAG_C_FIXED_NEWSTYLE;
        if hflags & p::FLAG_NO_ZEROES != 0 {
            cflags |= p::FLAG_C_NO_ZEROES;
        }
        s.write_all(&cflags.to_be_bytes()).await.map_err(io)?;
        if let Some((config, dir)) = tls {
            s = Self::starttls(s, uri, config, &dir).await?;
        }
        let mut info = ExportInfo::default();

        // Structured replies (needed for holes and block status).
        s.write_all(&p::option_request(p::OPT_STRUCTURED_REPLY, &[]))
            .await
            .map_err(io)?;
        let (h, d) = option_reply(&mut s, p::OPT_STRUCTURED_REPLY).await?;
        match h.reply {
            p::REP_ACK => info.structured = true,
            p::REP_ERR_UNSUP => {}
            r => return Err(option_error("structured replies", r, &d)),
        }
        if info.structured {
            let mut queries = vec!["base:allocation".to_string()];
            if let Some(b) = &opts.bitmap {
                queries.push(format!("qemu:dirty-bitmap:{b}"));
            }
            let q: Vec<&str> = queries.iter().map(String::as_str).collect();
            s.write_all(&p::option_request(
                p::OPT_SET_META_CONTEXT,
                &p::meta_context_data(&uri.export, &q),
            ))
            .await
            .map_err(io)?;
            loop {
                let (h, d) = option_reply(&mut s, p::OPT_SET_META_CONTEXT).await?;
                match h.reply {
                    p::REP_META_CONTEXT => {
                        let (id, name) = p::parse_meta_context(&d)?;
                        if !queries.contains(&name) {
                            return Err(NbdError::Protocol(format!(
                                "meta context {name:?}, which was not asked for"
                            )));
                        }
                        if info.contexts.iter().any(|c| c.0 == id || c.1 == name) {
                            return Err(NbdError::Protocol(format!(
                                "meta context {name:?} (id {id}) given twice or with another's id"
                            )));
                        }
                        info.contexts.push((id, name));
                    }
                    p::REP_ACK => break,
                    p::REP_ERR_UNSUP => break,
                    p::REP_ERR_UNKNOWN => break, // reported by GO below
                    r if p::is_error_reply(r) => {
                        return Err(option_error("meta context selection", r, &d));
                    }
                    _ => {} // unknown reply types are skipped
                }
            }
        }

        // Select the export.
        s.write_all(&p::option_request(
            p::OPT_GO,
            &p::go_data(&uri.export, &[p::INFO_BLOCK_SIZE]),
        ))
        .await
        .map_err(io)?;
        let mut got_export = false;
        info.block = (1, 4096, 32 << 20);
        loop {
            let (h, d) = option_reply(&mut s, p::OPT_GO).await?;
            match h.reply {
                p::REP_INFO => match p::parse_info(&d)? {
                    p::Info::Export { size, flags } => {
                        if got_export && (size, flags) != (info.size, info.flags) {
                            return Err(NbdError::Protocol(format!(
                                "two export informations that disagree: {} bytes, flags {:#x}, then {size} bytes, flags {flags:#x}",
                                info.size, info.flags
                            )));
                        }
                        info.size = size;
                        info.flags = flags;
                        got_export = true;
                    }
                    p::Info::BlockSize {
                        min,
                        preferred,
                        max,
                    } => info.block = (min, preferred, max),
                    p::Info::Other(_) => {}
                },
                p::REP_ACK => break,
                p::REP_ERR_UNKNOWN => {
                    let names = Self::list(&mut s).await.unwrap_or_default();
                    return Err(NbdError::Server(format!(
                        "no export named {:?} on this server; it offers: {}",
                        uri.export,
                        if names.is_empty() {
                            "(none listed)".into()
                        } else {
                            names.join(", ")
                        }
                    )));
                }
                r if p::is_error_reply(r) => {
                    return Err(option_error("selecting the export", r, &d));
                }
                _ => {}
            }
        }
        if !got_export {
            return Err(NbdError::Protocol(
                "NBD_OPT_GO ended without export information".into(),
            ));
        }
        check_export(&info)?;
        Ok((s, info))
    }

    /// Upgrade to TLS before any other option; a refusal is an error,
    /// never a fall back to plain text.
    /// The TLS client configuration and the directory it came from.
    pub(super) fn tls_config(
        uri: &NbdUri,
        opts: &ConnectOptions,
    ) -> Result<(std::sync::Arc<rustls::ClientConfig>, std::path::PathBuf), NbdError> {
        let dir = uri
            .tls_certificates
            .clone()
            .or_else(|| opts.tls_certificates.clone())
            .ok_or_else(|| {
                NbdError::Tls(format!(
                    "an nbds address needs a certificates directory holding {}: add ?tls-certificates=DIR to the address or pass --tls-certificates DIR",
                    tls::CA_CERT
                ))
            })?;
        Ok((tls::client_config(&dir)?, dir))
    }

    pub(super) async fn starttls(
        mut s: Box<dyn Stream>,
        uri: &NbdUri,
        config: std::sync::Arc<rustls::ClientConfig>,
        dir: &std::path::Path,
    ) -> Result<Box<dyn Stream>, NbdError> {
        s.write_all(&p::option_request(p::OPT_STARTTLS, &[]))
            .await
            .map_err(io)?;
        let (h, d) = option_reply(&mut s, p::OPT_STARTTLS).await?;
        if h.reply != p::REP_ACK {
            let msg = String::from_utf8_lossy(&d);
            return Err(NbdError::Tls(format!(
                "the server refused TLS (reply {:#x}{}); not continuing without encryption",
                h.reply,
                if msg.is_empty() {
                    String::new()
                } else {
                    format!(": {msg}")
                }
            )));
        }
        let name = match (&uri.tls_hostname, &uri.endpoint) {
            (Some(n), _) => n.clone(),
            (None, Endpoint::Tcp { host, .. }) => host.clone(),
            (None, Endpoint::Unix(_)) => "localhost".into(),
        };
        let conn = tokio_rustls::TlsConnector::from(config)
            .connect(tls::server_name(&name)?, s)
            .await
            .map_err(|e| {
                NbdError::Tls(format!(
                    "handshake failed: {e} (the server's certificate must be signed by {} and name {name:?})",
                    dir.join(tls::CA_CERT).display()
                ))
            })?;
        Ok(Box::new(conn))
    }

    pub(super) async fn list(s: &mut Box<dyn Stream>) -> Result<Vec<String>, NbdError> {
        s.write_all(&p::option_request(p::OPT_LIST, &[]))
            .await
            .map_err(io)?;
        let mut names = Vec::new();
        loop {
            let (h, d) = option_reply(s, p::OPT_LIST).await?;
            match h.reply {
                p::REP_SERVER => names.push(p::parse_server(&d)?),
                p::REP_ACK => return Ok(names),
                r => return Err(option_error("listing exports", r, &d)),
            }
        }
    }
}
