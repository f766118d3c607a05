//! Arbitrary server bytes, during transmission and during negotiation,
//! must end in an error or a clean end: never a panic, a hang or an
//! allocation beyond the limits.
use super::*;
use proptest::prelude::*;

fn with_requests(shared: &Mutex<Shared>) -> Vec<oneshot::Receiver<Result<Pending, NbdError>>> {
    let mut rxs = Vec::new();
    let mut sh = shared.lock().unwrap_or_else(|e| e.into_inner());
    for cookie in 0..4u64 {
        let (tx, rx) = oneshot::channel();
        let what = if cookie % 2 == 0 {
            Pending::Read {
                offset: 4096 * cookie,
                buf: ReadBuf::new(BytesMut::new(), 8192),
            }
        } else {
            Pending::Status {
                context: 1,
                descs: Vec::new(),
            }
        };
        sh.inflight.insert(
            cookie,
            InFlight {
                what,
                error: None,
                tx,
            },
        );
        rxs.push(rx);
    }
    rxs
}

fn structured(flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
    let mut r = p::STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
    r.extend_from_slice(&flags.to_be_bytes());
    r.extend_from_slice(&kind.to_be_bytes());
    r.extend_from_slice(&cookie.to_be_bytes());
    r.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    r.extend_from_slice(payload);
    r
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_reply_streams(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let rt = tokio::runtime::Builder::new_current_thread().build().expect("rt");
        let shared = Mutex::new(Shared::default());
        let _rxs = with_requests(&shared);
        let mut r: &[u8] = &bytes;
        let _ = rt.block_on(reply_loop(&mut r, &shared, 1 << 20));
    }

    #[test]
    fn valid_prefix_then_garbage(kind in prop_oneof![Just(1u16), Just(2), Just(5), Just(32769), Just(9)],
                                 payload in proptest::collection::vec(any::<u8>(), 0..64),
                                 tail in proptest::collection::vec(any::<u8>(), 0..64)) {
        // A well-formed header with a random payload, then random bytes.
        let rt = tokio::runtime::Builder::new_current_thread().build().expect("rt");
        let shared = Mutex::new(Shared::default());
        let _rxs = with_requests(&shared);
        let mut s = structured(0, kind, 0, &payload);
        s.extend_from_slice(&tail);
        let mut r: &[u8] = &s;
        let _ = rt.block_on(reply_loop(&mut r, &shared, 1 << 20));
    }

    #[test]
    fn arbitrary_handshakes(
        tail in proptest::collection::vec(any::<u8>(), 0..300),
        well_formed_hello in any::<bool>(),
        tls in any::<bool>(),
    ) {
        // A server that says hello (or not), then sends arbitrary bytes
        // and hangs up: negotiation ends in an error or an export,
        // never a panic or a hang.
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
        let mut bytes = Vec::new();
        if well_formed_hello {
            bytes.extend_from_slice(&p::NBDMAGIC.to_be_bytes());
            bytes.extend_from_slice(&p::IHAVEOPT.to_be_bytes());
            bytes.extend_from_slice(&(p::FLAG_FIXED_NEWSTYLE | p::FLAG_NO_ZEROES).to_be_bytes());
        }
        bytes.extend_from_slice(&tail);
        let uri = NbdUri::parse(if tls {
            "nbds+unix:///disk?socket=/nonexistent"
        } else {
            "nbd+unix:///disk?socket=/nonexistent"
        }).expect("uri");
        // TLS: STARTTLS and the handshake run against the same bytes
        // (a configuration that trusts nothing: the handshake must fail).
        let config = tls.then(|| {
            let c = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
            (std::sync::Arc::new(c), std::path::PathBuf::from("/nonexistent"))
        });
        let r = rt.block_on(async {
            let (client, mut server) = tokio::io::duplex(1 << 16);
            tokio::spawn(async move {
                let _ = server.write_all(&bytes).await;
                let _ = server.shutdown().await;
                let mut sink = vec![0u8; 1 << 16];
                // Drain what the client sends until it gives up.
                while let Ok(n) = server.read(&mut sink).await {
                    if n == 0 { break; }
                }
            });
            let s: Box<dyn Stream> = Box::new(client);
            tokio::time::timeout(
                Duration::from_secs(5),
                NbdClient::negotiate(s, &uri, &ConnectOptions::default(), config),
            ).await
        });
        prop_assert!(r.is_ok(), "negotiation hung");
    }

    #[test]
    fn option_parsers(b in proptest::collection::vec(any::<u8>(), 0..64)) {
        let _ = p::parse_info(&b);
        let _ = p::parse_meta_context(&b);
        let _ = p::parse_server(&b);
        let _ = p::parse_error_chunk(&b);
        let _ = p::parse_block_status(&b);
        let _ = p::payload_offset(&b);
        if b.len() >= 20 {
            let mut h = [0u8; 20];
            h.copy_from_slice(&b[..20]);
            let _ = p::option_reply_header(&h);
        }
    }
}

#[test]
fn a_read_reply_fills_exactly_its_range() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("rt");
    let hole = |at: u64, n: u32| {
        let mut h = at.to_be_bytes().to_vec();
        h.extend_from_slice(&n.to_be_bytes());
        h
    };
    let mut data = 100u64.to_be_bytes().to_vec();
    data.extend_from_slice(b"abcd");
    // Cookie 0 reads [0, 8192), out of order: a hole at the end, data
    // at 100..104, then holes around it.
    let mut s = structured(0, p::REPLY_TYPE_OFFSET_HOLE, 0, &hole(4096, 4096));
    s.extend(structured(0, p::REPLY_TYPE_OFFSET_DATA, 0, &data));
    s.extend(structured(0, p::REPLY_TYPE_OFFSET_HOLE, 0, &hole(0, 100)));
    let done = structured(
        p::REPLY_FLAG_DONE,
        p::REPLY_TYPE_OFFSET_HOLE,
        0,
        &hole(104, 3992),
    );
    let shared = Mutex::new(Shared::default());
    let mut rxs = with_requests(&shared);
    let mut r: &[u8] = &[s.clone(), done].concat();
    assert!(rt.block_on(reply_loop(&mut r, &shared, 1 << 20)).is_ok());
    match rxs.remove(0).try_recv() {
        Ok(Ok(Pending::Read { buf, .. })) => {
            let buf = buf.buf;
            assert_eq!(buf.len(), 8192);
            assert_eq!(&buf[100..104], b"abcd");
            assert!(buf[..100].iter().chain(&buf[104..]).all(|b| *b == 0));
        }
        _ => panic!("read not completed"),
    }

    // The same without the last hole: bytes 104..4096 were never sent.
    let shared = Mutex::new(Shared::default());
    let mut rxs = with_requests(&shared);
    s.extend(structured(p::REPLY_FLAG_DONE, p::REPLY_TYPE_NONE, 0, &[]));
    let mut r: &[u8] = &s;
    assert!(rt.block_on(reply_loop(&mut r, &shared, 1 << 20)).is_ok());
    match rxs.remove(0).try_recv() {
        Ok(Err(NbdError::Protocol(m))) => assert!(m.contains("covered only"), "{m}"),
        _ => panic!("an incomplete read must fail"),
    }
}
