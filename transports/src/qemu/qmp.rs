//! A small QMP client: JSON commands over a unix or TCP socket, one at a
//! time, with a timeout. Works against `qemu-system` and
//! `qemu-storage-daemon` alike.
//!
//! Replies are read line by line; asynchronous events in between are
//! skipped. A line longer than [`MAX_LINE`] is a protocol error (no
//! unbounded allocation on bytes from the wire).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};

use datamover::{Error, Result, TransportKind};

/// Longest QMP line accepted (a `query-named-block-nodes` answer of a VM
/// with many disks and snapshots stays far below).
pub const MAX_LINE: u64 = 64 << 20;

/// Where a VM's QMP monitor listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QmpAddr {
    /// A unix socket: the proxy runs on the VM's host.
    Unix(PathBuf),
    /// `host:port`.
    Tcp(String),
}

impl std::fmt::Display for QmpAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QmpAddr::Unix(p) => write!(f, "qmp+unix://{}", p.display()),
            QmpAddr::Tcp(a) => write!(f, "qmp://{a}"),
        }
    }
}

/// A command QEMU answered with an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpFailure {
    /// QMP error class (`GenericError`, `DeviceNotFound`, ...).
    pub class: String,
    /// QEMU's message.
    pub desc: String,
}

trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

/// An open QMP session (capabilities negotiated).
pub struct Qmp {
    addr: QmpAddr,
    conn: BufReader<Box<dyn Stream>>,
    next_id: u64,
    /// QEMU's version as it announced it (`major.minor.micro`).
    pub version: String,
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp")
            .field("addr", &self.addr)
            .field("version", &self.version)
            .finish()
    }
}

impl Qmp {
    /// Connect, read the greeting and leave negotiation mode.
    pub fn connect(addr: &QmpAddr, timeout: Duration) -> Result<Qmp> {
        let fail = |what: &str, e: std::io::Error| {
            let kind = if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) {
                TransportKind::Timeout
            } else {
                TransportKind::Connect
            };
            let detail =
                format!("{what}: {e}; check that the VM runs and its QMP monitor listens there");
            Error::transport_from(addr.to_string(), kind, detail, e)
        };
        let stream: Box<dyn Stream> = match addr {
            QmpAddr::Unix(p) => {
                let s = UnixStream::connect(p).map_err(|e| fail("connect", e))?;
                s.set_read_timeout(Some(timeout))
                    .and_then(|()| s.set_write_timeout(Some(timeout)))
                    .map_err(|e| fail("set timeout", e))?;
                Box::new(s)
            }
            QmpAddr::Tcp(a) => {
                use std::net::ToSocketAddrs;
                let sa = a
                    .to_socket_addrs()
                    .map_err(|e| fail("resolve", e))?
                    .next()
                    .ok_or_else(|| fail("resolve", std::io::ErrorKind::NotFound.into()))?;
                let s = TcpStream::connect_timeout(&sa, timeout).map_err(|e| fail("connect", e))?;
                s.set_read_timeout(Some(timeout))
                    .and_then(|()| s.set_write_timeout(Some(timeout)))
                    .map_err(|e| fail("set timeout", e))?;
                Box::new(s)
            }
        };
        let mut q = Qmp {
            addr: addr.clone(),
            conn: BufReader::with_capacity(64 << 10, stream),
            next_id: 0,
            version: String::new(),
        };
        let greeting = q.read_msg()?;
        let Some(v) = greeting.get("QMP") else {
            return Err(q.protocol(format!(
                "expected the QMP greeting, got {}",
                short(&greeting)
            )));
        };
        let ver = &v["version"]["qemu"];
        q.version = format!("{}.{}.{}", ver["major"], ver["minor"], ver["micro"]);
        q.execute("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    /// The monitor's address.
    pub fn addr(&self) -> &QmpAddr {
        &self.addr
    }

    fn protocol(&self, detail: String) -> Error {
        Error::transport(
            self.addr.to_string(),
            TransportKind::Protocol,
            format!("QMP protocol error: {detail}"),
        )
    }

    fn read_msg(&mut self) -> Result<Value> {
        let mut line = Vec::new();
        let n = (&mut self.conn)
            .take(MAX_LINE)
            .read_until(b'\n', &mut line)
            .map_err(|e| {
                let (kind, detail) = if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) {
                    (TransportKind::Timeout, "QEMU did not answer in time".into())
                } else {
                    (
                        TransportKind::Connect,
                        format!("reading from the monitor: {e}"),
                    )
                };
                Error::transport_from(self.addr.to_string(), kind, detail, e)
            })?;
        if n == 0 {
            return Err(self.protocol("the monitor closed the connection".into()));
        }
        if line.last() != Some(&b'\n') {
            return Err(self.protocol(if n as u64 >= MAX_LINE {
                format!("a message longer than {MAX_LINE} bytes")
            } else {
                "the monitor closed the connection mid-message".into()
            }));
        }
        serde_json::from_slice(&line).map_err(|e| self.protocol(format!("bad JSON: {e}")))
    }

    /// Run a command; QEMU's error answer is `Ok(Err(..))`, so callers can
    /// handle the failures they expect.
    pub fn try_execute(
        &mut self,
        cmd: &str,
        args: Value,
    ) -> Result<std::result::Result<Value, QmpFailure>> {
        self.next_id += 1;
        let id = format!("dm-{}", self.next_id);
        let mut msg = json!({"execute": cmd, "id": id});
        if args.as_object().is_some_and(|o| !o.is_empty()) {
            msg["arguments"] = args;
        }
        let mut text = msg.to_string();
        text.push('\n');
        let addr = self.addr.to_string();
        self.conn
            .get_mut()
            .write_all(text.as_bytes())
            .and_then(|()| self.conn.get_mut().flush())
            .map_err(|e| {
                Error::transport_from(
                    addr,
                    TransportKind::Connect,
                    format!("sending {cmd}: {e}"),
                    e,
                )
            })?;
        loop {
            let m = self.read_msg()?;
            if m.get("event").is_some() {
                tracing::debug!(event = %short(&m), "QMP event");
                continue;
            }
            if m.get("id").and_then(Value::as_str) != Some(id.as_str()) {
                return Err(self.protocol(format!("answer to another command: {}", short(&m))));
            }
            if let Some(r) = m.get("return") {
                return Ok(Ok(r.clone()));
            }
            if let Some(e) = m.get("error") {
                return Ok(Err(QmpFailure {
                    class: e["class"].as_str().unwrap_or("?").to_string(),
                    desc: e["desc"].as_str().unwrap_or("?").to_string(),
                }));
            }
            return Err(self.protocol(format!("neither return nor error: {}", short(&m))));
        }
    }

    /// Run a command; an error answer becomes [`Error::Transport`].
    pub fn execute(&mut self, cmd: &str, args: Value) -> Result<Value> {
        match self.try_execute(cmd, args)? {
            Ok(v) => Ok(v),
            Err(f) => Err(Error::transport(
                self.addr.to_string(),
                TransportKind::Refused,
                format!("QEMU refused {cmd}: {}", f.desc),
            )),
        }
    }
}

/// A message cut short for error texts.
fn short(v: &Value) -> String {
    let s = v.to_string();
    match s.char_indices().nth(200) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A scripted monitor: writes `lines` then echoes nothing else.
    fn peer(lines: Vec<String>) -> (tempfile::TempDir, QmpAddr, std::thread::JoinHandle<()>) {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("qmp.sock");
        let l = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        let h = std::thread::spawn(move || {
            if let Ok((mut s, _)) = l.accept() {
                let mut r = BufReader::new(s.try_clone().expect("clone"));
                for line in lines {
                    if line == "<hold>" {
                        std::thread::sleep(Duration::from_secs(1));
                        continue;
                    }
                    if line == "<read>" {
                        let mut buf = String::new();
                        let _ = r.read_line(&mut buf);
                        continue;
                    }
                    let _ = s.write_all(line.as_bytes());
                }
            }
        });
        (dir, QmpAddr::Unix(path), h)
    }

    const GREETING: &str = "{\"QMP\":{\"version\":{\"qemu\":{\"major\":10,\"minor\":0,\"micro\":2}},\"capabilities\":[]}}\n";

    #[test]
    fn events_are_skipped_and_errors_returned() {
        let (_d, addr, h) = peer(vec![
            GREETING.into(),
            "<read>".into(),
            "{\"return\":{},\"id\":\"dm-1\"}\n".into(),
            "<read>".into(),
            "{\"event\":\"JOB_STATUS_CHANGE\",\"data\":{}}\n".into(),
            "{\"error\":{\"class\":\"GenericError\",\"desc\":\"no\"},\"id\":\"dm-2\"}\n".into(),
        ]);
        let mut q = Qmp::connect(&addr, Duration::from_secs(5)).expect("connect");
        assert_eq!(q.version, "10.0.2");
        let r = q.try_execute("x", json!({})).expect("io");
        assert_eq!(
            r,
            Err(QmpFailure {
                class: "GenericError".into(),
                desc: "no".into()
            })
        );
        h.join().expect("peer");
    }

    #[test]
    fn hostile_monitors_get_clear_errors() {
        for script in [
            vec!["not json\n".to_string()],
            vec!["{\"hello\":1}\n".into()],
            vec![
                GREETING.into(),
                "<read>".into(),
                "{\"return\":{},\"id\":\"other\"}\n".into(),
            ],
            vec![
                GREETING.into(),
                "<read>".into(),
                "{\"id\":\"dm-1\"}\n".into(),
            ],
            vec![GREETING.into(), "<read>".into(), "{\"return\":".into()],
        ] {
            let (_d, addr, h) = peer(script);
            let e = Qmp::connect(&addr, Duration::from_secs(5)).expect_err("refused");
            assert!(e.to_string().contains("QMP protocol error"), "{e}");
            h.join().expect("peer");
        }
        let (_d, addr, h) = peer(vec![GREETING.into(), "<read>".into(), "<hold>".into()]);
        let e = Qmp::connect(&addr, Duration::from_millis(300)).expect_err("timeout");
        assert!(e.to_string().contains("did not answer in time"), "{e}");
        h.join().expect("peer");
    }
}
