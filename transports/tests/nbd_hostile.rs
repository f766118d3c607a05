//! A scripted hostile NBD server on loopback, one case for each rule of
//! proto.md about what a client may receive (negotiation, export
//! information, replies): each violation is a protocol error that fails
//! the read or the backup, never a panic, a hang, or a copy with wrong
//! bytes. The server is real (a TCP listener in a thread, speaking the
//! protocol); only its replies are scripted.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)] // test crate: a panic is a failed test

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use datamover::source::BlockSource;
use datamover::{BackupOptions, DiskName, Repository};
use datamover_transports::nbd::{ConnectOptions, NbdClient, NbdSource, NbdUri, proto as p};

/// Export size the scripted server offers.
const SIZE: u64 = 16 << 20;

/// The disk's bytes: never zero, so a zero-filled range shows.
fn pattern(offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| ((offset + i) % 251) as u8 + 1)
        .collect()
}

/// A request as the server read it.
#[derive(Debug, Clone, Copy)]
struct Req {
    cookie: u64,
    cmd: u16,
    offset: u64,
    len: u32,
}

type OptionFn = dyn Fn(u32, &[u8]) -> Vec<u8> + Send + Sync;
type ReplyFn = dyn Fn(&Req) -> Vec<u8> + Send + Sync;

/// What the scripted server says: its hello, its replies to options and
/// its replies to requests.
struct Script {
    hello_flags: u16,
    option: Box<OptionFn>,
    reply: Box<ReplyFn>,
}

use p::{option_reply as opt_reply, structured_chunk as chunk};

fn export_info(size: u64, flags: u16) -> Vec<u8> {
    let mut i = p::INFO_EXPORT.to_be_bytes().to_vec();
    i.extend_from_slice(&size.to_be_bytes());
    i.extend_from_slice(&flags.to_be_bytes());
    opt_reply(p::OPT_GO, p::REP_INFO, &i)
}

fn block_info(min: u32, pref: u32, max: u32) -> Vec<u8> {
    let mut i = p::INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for v in [min, pref, max] {
        i.extend_from_slice(&v.to_be_bytes());
    }
    opt_reply(p::OPT_GO, p::REP_INFO, &i)
}

fn meta(id: u32, name: &[u8]) -> Vec<u8> {
    let mut m = id.to_be_bytes().to_vec();
    m.extend_from_slice(name);
    opt_reply(p::OPT_SET_META_CONTEXT, p::REP_META_CONTEXT, &m)
}

const FLAGS: u16 = p::TFLAG_HAS_FLAGS | p::TFLAG_READ_ONLY;

/// A conforming server's replies to options, with `go` as the reply to
/// NBD_OPT_GO (before its ACK).
fn options(go: Vec<u8>) -> Box<OptionFn> {
    Box::new(move |opt, _| match opt {
        p::OPT_STRUCTURED_REPLY => opt_reply(opt, p::REP_ACK, &[]),
        p::OPT_SET_META_CONTEXT => {
            [meta(1, b"base:allocation"), opt_reply(opt, p::REP_ACK, &[])].concat()
        }
        p::OPT_GO => [go.clone(), opt_reply(opt, p::REP_ACK, &[])].concat(),
        _ => opt_reply(opt, p::REP_ERR_UNSUP, &[]),
    })
}

const DONE: u16 = p::REPLY_FLAG_DONE;

fn data(cookie: u64, flags: u16, at: u64, len: usize) -> Vec<u8> {
    let mut pl = at.to_be_bytes().to_vec();
    pl.extend(pattern(at, len));
    chunk(flags, p::REPLY_TYPE_OFFSET_DATA, cookie, &pl)
}

fn hole(cookie: u64, flags: u16, at: u64, len: u32) -> Vec<u8> {
    let mut pl = at.to_be_bytes().to_vec();
    pl.extend_from_slice(&len.to_be_bytes());
    chunk(flags, p::REPLY_TYPE_OFFSET_HOLE, cookie, &pl)
}

fn status(cookie: u64, flags: u16, id: u32, ds: &[(u32, u32)]) -> Vec<u8> {
    let mut pl = id.to_be_bytes().to_vec();
    for (l, f) in ds {
        pl.extend_from_slice(&l.to_be_bytes());
        pl.extend_from_slice(&f.to_be_bytes());
    }
    chunk(flags, p::REPLY_TYPE_BLOCK_STATUS, cookie, &pl)
}

fn error_chunk(cookie: u64, kind: u16, errno: u32, msg: &[u8], claimed: u16) -> Vec<u8> {
    let mut pl = errno.to_be_bytes().to_vec();
    pl.extend_from_slice(&claimed.to_be_bytes());
    pl.extend_from_slice(msg);
    chunk(DONE, kind, cookie, &pl)
}

/// A correct reply: the data of a read, one extent of block status.
fn correct(q: &Req) -> Vec<u8> {
    match q.cmd {
        p::CMD_BLOCK_STATUS => status(q.cookie, DONE, 1, &[(q.len, 0)]),
        _ => data(q.cookie, DONE, q.offset, q.len as usize),
    }
}

fn conforming() -> Script {
    Script {
        hello_flags: p::FLAG_FIXED_NEWSTYLE | p::FLAG_NO_ZEROES,
        option: options(export_info(SIZE, FLAGS)),
        reply: Box::new(correct),
    }
}

/// Serves `script` on loopback until the test ends; returns the address
/// and a count of the requests it received.
fn serve(script: Script) -> (String, Arc<AtomicUsize>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let script = Arc::new(script);
    let requests = Arc::new(AtomicUsize::new(0));
    let count = requests.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { return };
            let (script, count) = (script.clone(), count.clone());
            std::thread::spawn(move || {
                let _ = session(s, &script, &count);
            });
        }
    });
    (format!("nbd://127.0.0.1:{port}/x"), requests)
}

fn session(mut s: TcpStream, script: &Script, count: &AtomicUsize) -> std::io::Result<()> {
    let mut hello = p::NBDMAGIC.to_be_bytes().to_vec();
    hello.extend_from_slice(&p::IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&script.hello_flags.to_be_bytes());
    s.write_all(&hello)?;
    let mut cflags = [0u8; 4];
    s.read_exact(&mut cflags)?;
    loop {
        let mut h = [0u8; 16];
        s.read_exact(&mut h)?;
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let mut d = vec![0u8; len.min(1 << 16) as usize];
        s.read_exact(&mut d)?;
        s.write_all(&(script.option)(opt, &d))?;
        if opt == p::OPT_GO {
            break;
        }
    }
    loop {
        let mut r = [0u8; 28];
        s.read_exact(&mut r)?;
        let q = Req {
            cookie: u64::from_be_bytes(r[8..16].try_into().unwrap()),
            cmd: u16::from_be_bytes([r[6], r[7]]),
            offset: u64::from_be_bytes(r[16..24].try_into().unwrap()),
            len: u32::from_be_bytes(r[24..28].try_into().unwrap()),
        };
        if q.cmd == p::CMD_DISC {
            return Ok(());
        }
        if q.cmd == p::CMD_WRITE {
            std::io::copy(&mut (&s).take(u64::from(q.len)), &mut std::io::sink())?;
        }
        count.fetch_add(1, Ordering::Relaxed);
        s.write_all(&(script.reply)(&q))?;
    }
}

fn opts() -> ConnectOptions {
    ConnectOptions {
        timeout: Duration::from_secs(3),
        connections: Some(1),
        ..ConnectOptions::default()
    }
}

/// `what` must fail with a protocol error naming `expect`, in time.
fn assert_violation(what: &str, r: Result<(), String>, expect: &str, t: Instant) {
    match r {
        Ok(()) => panic!("{what}: accepted"),
        Err(m) => assert!(
            m.contains("protocol error") && m.contains(expect),
            "{what}: {m} (expected a protocol error about {expect:?})"
        ),
    }
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "{what}: took {:?}",
        t.elapsed()
    );
}

#[test]
fn negotiation_violations_are_refused_before_anything_is_read() {
    let go = |v: Vec<u8>| options(v);
    let cases: Vec<(&str, Script, &str)> = vec![
        (
            "handshake flags the protocol does not define",
            Script {
                hello_flags: 0x83,
                ..conforming()
            },
            "handshake flags",
        ),
        (
            "an acknowledgement with a payload",
            Script {
                option: Box::new(|opt, d| match opt {
                    p::OPT_STRUCTURED_REPLY => opt_reply(opt, p::REP_ACK, b"junk"),
                    _ => options(export_info(SIZE, FLAGS))(opt, d),
                }),
                ..conforming()
            },
            "acknowledgement",
        ),
        (
            "a meta context not asked for",
            Script {
                option: Box::new(|opt, d| match opt {
                    p::OPT_SET_META_CONTEXT => [
                        meta(1, b"base:allocation"),
                        meta(2, b"qemu:dirty-bitmap:other"),
                        opt_reply(opt, p::REP_ACK, &[]),
                    ]
                    .concat(),
                    _ => options(export_info(SIZE, FLAGS))(opt, d),
                }),
                ..conforming()
            },
            "not asked for",
        ),
        (
            "a meta context given twice",
            Script {
                option: Box::new(|opt, d| match opt {
                    p::OPT_SET_META_CONTEXT => [
                        meta(1, b"base:allocation"),
                        meta(1, b"base:allocation"),
                        opt_reply(opt, p::REP_ACK, &[]),
                    ]
                    .concat(),
                    _ => options(export_info(SIZE, FLAGS))(opt, d),
                }),
                ..conforming()
            },
            "twice",
        ),
        (
            "a meta context name that is not UTF-8",
            Script {
                option: Box::new(|opt, d| match opt {
                    p::OPT_SET_META_CONTEXT => {
                        [meta(1, b"base:\xff\xfe"), opt_reply(opt, p::REP_ACK, &[])].concat()
                    }
                    _ => options(export_info(SIZE, FLAGS))(opt, d),
                }),
                ..conforming()
            },
            "UTF-8",
        ),
        (
            "GO without export information",
            Script {
                option: go(Vec::new()),
                ..conforming()
            },
            "without export information",
        ),
        (
            "two export informations that disagree",
            Script {
                option: go([export_info(SIZE, FLAGS), export_info(2 * SIZE, FLAGS)].concat()),
                ..conforming()
            },
            "disagree",
        ),
        (
            "transmission flags without HAS_FLAGS",
            Script {
                option: go(export_info(SIZE, p::TFLAG_READ_ONLY)),
                ..conforming()
            },
            "HAS_FLAGS",
        ),
        (
            "DF without structured replies",
            Script {
                option: Box::new(|opt, d| match opt {
                    p::OPT_STRUCTURED_REPLY => opt_reply(opt, p::REP_ERR_UNSUP, &[]),
                    _ => options(export_info(SIZE, FLAGS | p::TFLAG_SEND_DF))(opt, d),
                }),
                ..conforming()
            },
            "DF",
        ),
        (
            "FAST_ZERO without WRITE_ZEROES",
            Script {
                option: go(export_info(SIZE, FLAGS | p::TFLAG_SEND_FAST_ZERO)),
                ..conforming()
            },
            "FAST_ZERO",
        ),
        (
            "a size no disk can have",
            Script {
                option: go(export_info(u64::MAX - 511, FLAGS)),
                ..conforming()
            },
            "larger than any disk",
        ),
        (
            "a size that is not a multiple of the minimum block",
            Script {
                option: go([
                    export_info(SIZE + 100, FLAGS),
                    block_info(512, 4096, 1 << 20),
                ]
                .concat()),
                ..conforming()
            },
            "minimum block size",
        ),
        (
            "a minimum block over 64 KiB",
            Script {
                option: go([
                    export_info(SIZE, FLAGS),
                    block_info(1 << 17, 1 << 17, 1 << 20),
                ]
                .concat()),
                ..conforming()
            },
            "block size constraints",
        ),
        (
            "a preferred block that is not a power of two",
            Script {
                option: go([export_info(SIZE, FLAGS), block_info(512, 3000, 1 << 20)].concat()),
                ..conforming()
            },
            "block size constraints",
        ),
        (
            "a maximum payload below the preferred block",
            Script {
                option: go([export_info(SIZE, FLAGS), block_info(512, 4096, 2048)].concat()),
                ..conforming()
            },
            "block size constraints",
        ),
        (
            "a reply to another option",
            Script {
                option: Box::new(|opt, d| match opt {
                    p::OPT_STRUCTURED_REPLY => opt_reply(p::OPT_GO, p::REP_ACK, &[]),
                    _ => options(export_info(SIZE, FLAGS))(opt, d),
                }),
                ..conforming()
            },
            "while waiting for",
        ),
    ];
    let rt = tokio::runtime::Runtime::new().unwrap();
    for (what, script, expect) in cases {
        let (uri, requests) = serve(script);
        let t = Instant::now();
        let r = NbdSource::connect(&uri, &opts())
            .map(drop)
            .map_err(|e| e.to_string());
        assert_violation(what, r, expect, t);
        // The client library directly: the same refusal.
        let u = NbdUri::parse(&uri).unwrap();
        let direct = rt.block_on(NbdClient::connect(&u, &opts()));
        assert!(direct.is_err(), "{what}: the client connected");
        assert_eq!(
            requests.load(Ordering::Relaxed),
            0,
            "{what}: a request was sent"
        );
    }
    // The conforming script is accepted (the cases above fail for their
    // one violation, not for the script).
    let (uri, _) = serve(conforming());
    let src = NbdSource::connect(&uri, &opts()).unwrap();
    let mut buf = vec![0u8; 65536];
    src.read_at(4096, &mut buf).unwrap();
    assert_eq!(buf, pattern(4096, 65536));
}

#[test]
fn reply_violations_fail_the_read() {
    let reply = |f: fn(&Req) -> Vec<u8>| -> Box<ReplyFn> { Box::new(f) };
    let cases: Vec<(&str, Script, &str)> = vec![
        (
            "a bad reply magic",
            Script {
                reply: reply(|_| vec![0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0]),
                ..conforming()
            },
            "magic",
        ),
        (
            "a data chunk longer than any payload",
            Script {
                reply: reply(|q| {
                    let mut c = chunk(DONE, p::REPLY_TYPE_OFFSET_DATA, q.cookie, &[]);
                    let n = c.len();
                    c[n - 4..].copy_from_slice(&u32::MAX.to_be_bytes());
                    c
                }),
                ..conforming()
            },
            "data chunk of",
        ),
        (
            "data outside the request",
            Script {
                reply: reply(|q| data(q.cookie, DONE, 1 << 40, 16)),
                ..conforming()
            },
            "outside",
        ),
        (
            "a data chunk of no bytes",
            Script {
                reply: reply(|q| {
                    chunk(
                        DONE,
                        p::REPLY_TYPE_OFFSET_DATA,
                        q.cookie,
                        &q.offset.to_be_bytes(),
                    )
                }),
                ..conforming()
            },
            "data chunk of 8 bytes",
        ),
        (
            "a reply for an unknown cookie",
            Script {
                reply: reply(|q| data(q.cookie + 77, DONE, q.offset, q.len as usize)),
                ..conforming()
            },
            "unknown cookie",
        ),
        (
            "a hole of length 0",
            Script {
                reply: reply(|q| hole(q.cookie, DONE, q.offset, 0)),
                ..conforming()
            },
            "outside",
        ),
        (
            "a hole over data already sent (the copy would be zeros)",
            Script {
                reply: reply(|q| {
                    [
                        data(q.cookie, 0, q.offset, q.len as usize),
                        hole(q.cookie, DONE, q.offset, q.len),
                    ]
                    .concat()
                }),
                ..conforming()
            },
            "overlaps",
        ),
        (
            "the same data twice",
            Script {
                reply: reply(|q| {
                    [
                        data(q.cookie, 0, q.offset, q.len as usize),
                        data(q.cookie, DONE, q.offset, 512),
                    ]
                    .concat()
                }),
                ..conforming()
            },
            "overlaps",
        ),
        (
            "a read reply that does not cover the request",
            Script {
                reply: reply(|q| data(q.cookie, DONE, q.offset, q.len as usize / 2)),
                ..conforming()
            },
            "covered only",
        ),
        (
            "NONE without DONE",
            Script {
                reply: reply(|q| chunk(0, p::REPLY_TYPE_NONE, q.cookie, &[])),
                ..conforming()
            },
            "NONE",
        ),
        (
            "a chunk of an unknown non-error type",
            Script {
                reply: reply(|q| [chunk(0, 9, q.cookie, b"hint"), correct(q)].concat()),
                ..conforming()
            },
            "unknown type",
        ),
        (
            "an error chunk with error number 0",
            Script {
                reply: reply(|q| error_chunk(q.cookie, p::REPLY_TYPE_ERROR, 0, b"fine?", 5)),
                ..conforming()
            },
            "error number 0",
        ),
        (
            "an error message longer than its chunk",
            Script {
                reply: reply(|q| error_chunk(q.cookie, p::REPLY_TYPE_ERROR, 5, b"oops", 400)),
                ..conforming()
            },
            "beyond the chunk",
        ),
        (
            "an error chunk longer than its message",
            Script {
                reply: reply(|q| error_chunk(q.cookie, p::REPLY_TYPE_ERROR, 5, b"oops", 2)),
                ..conforming()
            },
            "does not match",
        ),
        (
            "an error offset outside the read",
            Script {
                reply: reply(|q| {
                    let mut msg = b"oops".to_vec();
                    msg.extend_from_slice(&(q.offset + (1 << 30)).to_be_bytes());
                    error_chunk(q.cookie, p::REPLY_TYPE_ERROR_OFFSET, 5, &msg, 4)
                }),
                ..conforming()
            },
            "outside",
        ),
        (
            "a simple reply to a read after structured replies",
            Script {
                reply: reply(|q| {
                    let mut r = p::SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
                    r.extend_from_slice(&0u32.to_be_bytes());
                    r.extend_from_slice(&q.cookie.to_be_bytes());
                    r.extend(pattern(q.offset, q.len as usize));
                    r
                }),
                ..conforming()
            },
            "simple reply to a read",
        ),
        (
            "a structured reply that was not negotiated",
            Script {
                option: Box::new(|opt, d| match opt {
                    p::OPT_STRUCTURED_REPLY => opt_reply(opt, p::REP_ERR_UNSUP, &[]),
                    _ => options(export_info(SIZE, FLAGS))(opt, d),
                }),
                ..conforming()
            },
            "did not negotiate",
        ),
    ];
    for (what, script, expect) in cases {
        let (uri, _) = serve(script);
        let src =
            NbdSource::connect(&uri, &opts()).unwrap_or_else(|e| panic!("{what}: connect: {e}"));
        let t = Instant::now();
        let mut buf = vec![0u8; 4096];
        let r = src.read_at(0, &mut buf).map_err(|e| e.to_string());
        assert_violation(what, r, expect, t);
    }
    // A server error is the request's error, with its message.
    let (uri, _) = serve(Script {
        reply: reply(|q| error_chunk(q.cookie, p::REPLY_TYPE_ERROR, 5, b"oops", 4)),
        ..conforming()
    });
    let src = NbdSource::connect(&uri, &opts()).unwrap();
    let e = src.read_at(0, &mut [0u8; 4096]).unwrap_err().to_string();
    assert!(e.contains("EIO") && e.contains("oops"), "{e}");
}

#[test]
fn block_status_violations_fail_the_request() {
    let cases: Vec<(&str, Box<ReplyFn>, &str)> = vec![
        (
            "success as a simple reply",
            Box::new(|q| {
                let mut r = p::SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
                r.extend_from_slice(&0u32.to_be_bytes());
                r.extend_from_slice(&q.cookie.to_be_bytes());
                r
            }),
            "simple reply with success",
        ),
        (
            "a context never negotiated",
            Box::new(|q| status(q.cookie, DONE, 7, &[(q.len, 0)])),
            "not negotiated",
        ),
        (
            "a context twice",
            Box::new(|q| {
                [
                    status(q.cookie, 0, 1, &[(q.len, 0)]),
                    status(q.cookie, DONE, 1, &[(q.len, 1)]),
                ]
                .concat()
            }),
            "two block status",
        ),
        (
            "no chunk for the context",
            Box::new(|q| chunk(DONE, p::REPLY_TYPE_NONE, q.cookie, &[])),
            "contexts",
        ),
        (
            "a descriptor of length 0",
            Box::new(|q| status(q.cookie, DONE, 1, &[(0, 0)])),
            "length 0",
        ),
        (
            "descriptors beyond the request",
            Box::new(|q| status(q.cookie, DONE, 1, &[(q.len, 0), (4096, 3)])),
            "beyond",
        ),
    ];
    let rt = tokio::runtime::Runtime::new().unwrap();
    for (what, reply, expect) in cases {
        let (uri, _) = serve(Script {
            reply,
            ..conforming()
        });
        let c = rt
            .block_on(NbdClient::connect(&NbdUri::parse(&uri).unwrap(), &opts()))
            .unwrap();
        let ctx = c.info().context("base:allocation").unwrap();
        let t = Instant::now();
        let r = rt
            .block_on(c.block_status(0, 1 << 20, ctx, false))
            .map(drop)
            .map_err(|e| e.to_string());
        assert_violation(what, r, expect, t);
    }
}

#[test]
fn a_stalled_server_hits_the_request_timeout() {
    let (uri, requests) = serve(Script {
        reply: Box::new(|_| Vec::new()),
        ..conforming()
    });
    let o = ConnectOptions {
        timeout: Duration::from_secs(1),
        ..opts()
    };
    let src = NbdSource::connect(&uri, &o).unwrap();
    let t = Instant::now();
    let e = src.read_at(0, &mut [0u8; 4096]).unwrap_err().to_string();
    assert!(e.contains("no reply within"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert!(requests.load(Ordering::Relaxed) >= 1);
}

/// The attack of finding 8: a server that sends each read's data and then
/// a hole over the same bytes. Before the fix the backup ended with exit
/// 0 and a point of zeros; now it fails and leaves no point.
#[test]
fn a_backup_from_a_server_that_overwrites_its_own_data_fails_and_keeps_no_point() {
    let dir = tempfile::tempdir().unwrap();
    let repo = Repository::init(&dir.path().join("repo")).unwrap();
    let disk: DiskName = "vm/disk".parse().unwrap();

    // A conforming server first: the backup is exact.
    let (uri, _) = serve(conforming());
    let src = NbdSource::connect(&uri, &opts()).unwrap();
    datamover::backup(&repo, &src, &disk, &BackupOptions::default()).unwrap();
    let id = repo.resolve_point(&disk, None).unwrap();
    let out = dir.path().join("restored.img");
    let t = datamover::open_target(&out, SIZE, true).unwrap();
    datamover::restore(&repo, &disk, &id, t.as_ref(), &Default::default()).unwrap();
    drop(t);
    assert_eq!(std::fs::read(&out).unwrap(), pattern(0, SIZE as usize));

    let (uri, _) = serve(Script {
        reply: Box::new(|q| match q.cmd {
            p::CMD_READ => [
                data(q.cookie, 0, q.offset, q.len as usize),
                hole(q.cookie, DONE, q.offset, q.len),
            ]
            .concat(),
            _ => correct(q),
        }),
        ..conforming()
    });
    let src = NbdSource::connect(&uri, &opts()).unwrap();
    let other: DiskName = "vm/other".parse().unwrap();
    let e = datamover::backup(&repo, &src, &other, &BackupOptions::default())
        .expect_err("a backup from a server that broke the protocol");
    assert!(e.to_string().contains("overlaps"), "{e}");
    assert!(
        repo.resolve_point(&other, None).is_err(),
        "a point was kept"
    );
}
