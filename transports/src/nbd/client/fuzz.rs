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
                len: 8192,
                expect: vec![1, 2],
                seen: Vec::new(),
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

/// What the requests above were negotiated with.
fn info() -> ExportInfo {
    ExportInfo {
        size: 1 << 20,
        flags: p::TFLAG_HAS_FLAGS,
        block: (1, 4096, 1 << 20),
        structured: true,
        contexts: vec![
            (1, "base:allocation".into()),
            (2, "qemu:dirty-bitmap:b".into()),
        ],
    }
}

use p::structured_chunk as structured;

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_reply_streams(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let rt = tokio::runtime::Builder::new_current_thread().build().expect("rt");
        let shared = Mutex::new(Shared::default());
        let _rxs = with_requests(&shared);
        let mut r: &[u8] = &bytes;
        let _ = rt.block_on(reply_loop(&mut r, &shared, &info()));
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
        let _ = rt.block_on(reply_loop(&mut r, &shared, &info()));
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
        let _ = p::parse_error_chunk(p::REPLY_TYPE_ERROR, &b);
        let _ = p::parse_error_chunk(p::REPLY_TYPE_ERROR_OFFSET, &b);
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
    assert!(rt.block_on(reply_loop(&mut r, &shared, &info())).is_ok());
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
    // The violation ends the connection too.
    assert!(rt.block_on(reply_loop(&mut r, &shared, &info())).is_err());
    match rxs.remove(0).try_recv() {
        Ok(Err(NbdError::Protocol(m))) => assert!(m.contains("covered only"), "{m}"),
        _ => panic!("an incomplete read must fail"),
    }
}

/// One content chunk of a read reply of cookie 0 (offset 0).
fn content(data: &[u8], at: usize, n: usize, hole: bool, done: bool) -> Vec<u8> {
    let flags = if done { p::REPLY_FLAG_DONE } else { 0 };
    let mut pl = (at as u64).to_be_bytes().to_vec();
    if hole {
        pl.extend_from_slice(&(n as u32).to_be_bytes());
        structured(flags, p::REPLY_TYPE_OFFSET_HOLE, 0, &pl)
    } else {
        pl.extend_from_slice(&data[at..at + n]);
        structured(flags, p::REPLY_TYPE_OFFSET_DATA, 0, &pl)
    }
}

/// Runs a read reply for cookie 0 (8192 bytes at 0) through the loop.
fn run_read(stream: &[u8]) -> Result<Vec<u8>, NbdError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("rt");
    let shared = Mutex::new(Shared::default());
    let mut rxs = with_requests(&shared);
    let mut r: &[u8] = stream;
    let _ = rt.block_on(reply_loop(&mut r, &shared, &info()));
    match rxs.remove(0).try_recv() {
        Ok(Ok(Pending::Read { buf, .. })) => Ok(buf.buf.to_vec()),
        Ok(Ok(_)) => Err(NbdError::Protocol("wrong kind".into())),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(NbdError::io_msg("no result")),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// A read reply split at arbitrary points into data and hole chunks
    /// sent in any order gives exactly the bytes; the same reply with one
    /// chunk repeated, or with an extra chunk overlapping another, is a
    /// protocol error: no later chunk may change bytes already received.
    #[test]
    fn chunks_in_any_order_exact_and_overlaps_refused(
        cuts in proptest::collection::btree_set(1usize..8192, 0..12),
        holes in proptest::collection::vec(any::<bool>(), 13),
        order in Just(()).prop_perturb(|_, mut rng| rng.next_u64()),
        fault in 0u8..3,
        at in 0usize..8192,
        len in 1usize..8192,
    ) {
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8 + 1).collect();
        let mut bounds = vec![0];
        bounds.extend(cuts.iter().copied());
        bounds.push(8192);
        let mut pieces: Vec<(usize, usize, bool)> = bounds
            .windows(2)
            .enumerate()
            .map(|(i, w)| (w[0], w[1] - w[0], holes[i]))
            .collect();
        // A deterministic shuffle from the drawn seed.
        let mut seed = order;
        for i in (1..pieces.len()).rev() {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            pieces.swap(i, (seed >> 33) as usize % (i + 1));
        }
        let expect: Vec<u8> = pieces.iter().fold(data.clone(), |mut d, (a, n, h)| {
            if *h { d[*a..a + n].fill(0); }
            d
        });
        let mut stream = Vec::new();
        for (a, n, h) in &pieces {
            stream.extend(content(&data, *a, *n, *h, false));
        }
        let extra = match fault {
            0 => None,
            1 => pieces.first().map(|(a, n, h)| (*a, *n, !*h)), // repeated, other kind
            _ => Some((at, len.min(8192 - at), true)),           // overlapping hole
        };
        if let Some((a, n, h)) = extra {
            stream.extend(content(&data, a, n, h, false));
        }
        stream.extend(structured(p::REPLY_FLAG_DONE, p::REPLY_TYPE_NONE, 0, &[]));
        match (extra, run_read(&stream)) {
            (None, Ok(got)) => prop_assert_eq!(got, expect),
            (None, Err(e)) => prop_assert!(false, "a valid reply failed: {}", e),
            (Some(_), Ok(_)) => prop_assert!(false, "an overlapping chunk was accepted"),
            (Some(_), Err(e)) => prop_assert!(
                matches!(&e, NbdError::Protocol(m) if m.contains("overlaps")), "{}", e
            ),
        }
    }
}

#[test]
fn block_status_rules() {
    let status = |id: u32, ds: &[(u32, u32)], done: bool| {
        let mut pl = id.to_be_bytes().to_vec();
        for (l, f) in ds {
            pl.extend_from_slice(&l.to_be_bytes());
            pl.extend_from_slice(&f.to_be_bytes());
        }
        structured(
            if done { p::REPLY_FLAG_DONE } else { 0 },
            p::REPLY_TYPE_BLOCK_STATUS,
            1,
            &pl,
        )
    };
    let run = |stream: Vec<u8>| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("rt");
        let shared = Mutex::new(Shared::default());
        let mut rxs = with_requests(&shared);
        let mut r: &[u8] = &stream;
        let _ = rt.block_on(reply_loop(&mut r, &shared, &info()));
        match rxs.remove(1).try_recv() {
            Ok(Ok(Pending::Status { descs, .. })) => Ok(descs),
            Ok(Ok(_)) => Err("wrong kind".to_string()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("no result".to_string()),
        }
    };
    // Both contexts, any order, the last descriptor may run past the end.
    let ok = [
        status(2, &[(8192, 0)], false),
        status(1, &[(4096, 0), (65536, 3)], true),
    ]
    .concat();
    assert_eq!(run(ok), Ok(vec![(4096, 0), (65536, 3)]));
    let cases = [
        (
            "one context missing",
            status(1, &[(8192, 0)], true),
            "contexts",
        ),
        (
            "a context twice",
            [
                status(1, &[(8192, 0)], false),
                status(1, &[(8192, 1)], false),
                status(2, &[(8192, 0)], true),
            ]
            .concat(),
            "two block status",
        ),
        (
            "a context never negotiated",
            status(9, &[(8192, 0)], true),
            "not negotiated",
        ),
        (
            "descriptors past the request before the last",
            [
                status(2, &[(8192, 0)], false),
                status(1, &[(8192, 0), (4096, 1)], true),
            ]
            .concat(),
            "beyond",
        ),
        (
            "a descriptor of length 0",
            status(1, &[(0, 0)], true),
            "length 0",
        ),
    ];
    for (what, stream, expect) in cases {
        match run(stream) {
            Err(e) => assert!(
                e.contains("protocol error") && e.contains(expect),
                "{what}: {e}"
            ),
            Ok(d) => panic!("{what}: accepted {d:?}"),
        }
    }
}
