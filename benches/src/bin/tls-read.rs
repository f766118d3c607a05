//! `tls-read [GIB] [ROUNDS]`: what reading a TLS stream costs the
//! receiver, with rustls straight on the socket, as the repository
//! service reads (rustls asks the socket for 4 KiB at a time), against
//! rustls over a 256 KiB read buffer (one socket read per 256 KiB, then
//! copies of 4 KiB out of it). A sender thread writes GIB GiB (default
//! 2) in 1 MiB writes over loopback TCP, as a source proxy sends frames to a
//! repository service; the receiver reads them in 1 MiB reads. Both ways
//! run in turn, ROUNDS times (default 5); medians of the receiving
//! thread's CPU seconds (user + system) and of wall seconds are printed.
//! Not part of the test run.
#![allow(clippy::print_stdout)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Instant;

use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};

const BLOCK: usize = 1 << 20;

/// A socket with buffered reads and direct writes.
#[derive(Debug)]
struct SocketReads<S>(std::io::BufReader<S>);

impl<S: Read> Read for SocketReads<S> {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(b)
    }
}

impl<S: Write> Write for SocketReads<S> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.get_mut().write(b)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.get_mut().flush()
    }
}

fn fail(msg: String) -> ! {
    eprintln!("tls-read: {msg}");
    std::process::exit(1)
}

/// CPU seconds (user + system) of the calling thread.
fn thread_cpu() -> f64 {
    let s = std::fs::read_to_string("/proc/thread-self/stat")
        .unwrap_or_else(|e| fail(format!("/proc/thread-self/stat: {e}")));
    // Fields after the command name (which ends with the last ')').
    let rest = s.rsplit_once(')').map_or("", |x| x.1);
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13
    // after the name, counting the state as the first (index 0).
    (f.get(11).copied().unwrap_or(0.0) + f.get(12).copied().unwrap_or(0.0)) / 100.0
}

fn configs() -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
    let key = rcgen::KeyPair::generate().unwrap_or_else(|e| fail(e.to_string()));
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .and_then(|p| p.self_signed(&key))
        .unwrap_or_else(|e| fail(e.to_string()));
    let der = cert.der().clone();
    let server = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![der.clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .unwrap_or_else(|e| fail(e.to_string()));
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der).unwrap_or_else(|e| fail(e.to_string()));
    let client = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    (Arc::new(server), Arc::new(client))
}

/// One transfer of `total` bytes; (receiver CPU s, wall s).
fn transfer(
    server: &Arc<rustls::ServerConfig>,
    client: &Arc<rustls::ClientConfig>,
    total: usize,
    buffered: bool,
) -> (f64, f64) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| fail(e.to_string()));
    let addr = l.local_addr().unwrap_or_else(|e| fail(e.to_string()));
    let client = client.clone();
    let sender = std::thread::spawn(move || {
        let tcp = TcpStream::connect(addr).unwrap_or_else(|e| fail(e.to_string()));
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from("localhost").unwrap_or_else(|e| fail(e.to_string()));
        let conn =
            rustls::ClientConnection::new(client, name).unwrap_or_else(|e| fail(e.to_string()));
        let mut s = rustls::StreamOwned::new(conn, tcp);
        let block = vec![0x5au8; BLOCK];
        let mut sent = 0;
        while sent < total {
            s.write_all(&block).unwrap_or_else(|e| fail(e.to_string()));
            sent += BLOCK;
        }
        s.flush().unwrap_or_else(|e| fail(e.to_string()));
        // Wait for the receiver's one byte, so the connection outlives
        // the transfer.
        let mut one = [0u8; 1];
        let _ = s.read(&mut one);
    });
    let (tcp, _) = l.accept().unwrap_or_else(|e| fail(e.to_string()));
    let _ = tcp.set_nodelay(true);
    let conn =
        rustls::ServerConnection::new(server.clone()).unwrap_or_else(|e| fail(e.to_string()));
    let mut buf = vec![0u8; BLOCK];
    let (c0, t0) = (thread_cpu(), Instant::now());
    let mut got = 0;
    let ack = if buffered {
        let mut s = rustls::StreamOwned::new(
            conn,
            SocketReads(std::io::BufReader::with_capacity(256 << 10, tcp)),
        );
        while got < total {
            s.read_exact(&mut buf)
                .unwrap_or_else(|e| fail(e.to_string()));
            got += BLOCK;
        }
        s.write_all(b"k").and_then(|_| s.flush())
    } else {
        let mut s = rustls::StreamOwned::new(conn, tcp);
        while got < total {
            s.read_exact(&mut buf)
                .unwrap_or_else(|e| fail(e.to_string()));
            got += BLOCK;
        }
        s.write_all(b"k").and_then(|_| s.flush())
    };
    let r = (thread_cpu() - c0, t0.elapsed().as_secs_f64());
    ack.unwrap_or_else(|e| fail(e.to_string()));
    sender
        .join()
        .unwrap_or_else(|_| fail("sender failed".into()));
    r
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let gib: usize = args.first().map_or(2, |a| a.parse().unwrap_or(2));
    let rounds: usize = args.get(1).map_or(5, |a| a.parse().unwrap_or(5)).max(1);
    let (server, client) = configs();
    let total = gib << 30;
    let (mut direct, mut buffered) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        direct.push(transfer(&server, &client, total, false));
        buffered.push(transfer(&server, &client, total, true));
    }
    println!("| receiver | CPU s | wall s |\n|---|---|---|");
    for (name, v) in [
        ("rustls on the socket (4 KiB reads)", direct),
        ("rustls over a 256 KiB read buffer", buffered),
    ] {
        println!(
            "| {name} | {:.2} | {:.2} |",
            median(v.iter().map(|x| x.0).collect()),
            median(v.iter().map(|x| x.1).collect())
        );
    }
    println!("{gib} GiB each, medians of {rounds} interleaved rounds");
}
