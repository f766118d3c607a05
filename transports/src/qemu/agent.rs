//! A QEMU guest agent client (qemu-ga, reached through the VM's
//! `org.qemu.guest_agent.0` virtio port, whose host side is a unix or TCP
//! socket chardev).
//!
//! The agent protocol has no greeting and no command ids: a client first
//! sends `0xff` and `guest-sync-delimited` with a random id, and skips
//! everything up to the answer carrying that id (stale answers of a client
//! that went away before it read them included). Then one command at a
//! time, each with a deadline. A line longer than [`MAX_LINE`] is a
//! protocol error.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use serde_json::{Value, json};

use datamover::{Error, Result, TransportKind};

/// Longest agent line accepted (answers to the commands we send are small;
/// `guest-exec-status` output is the largest).
pub const MAX_LINE: u64 = 16 << 20;

trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

/// A command the agent answered with an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentFailure {
    /// Error class (`GenericError`, `CommandNotFound`, ...).
    pub class: String,
    /// The agent's message.
    pub desc: String,
}

impl std::fmt::Display for AgentFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.desc, self.class)
    }
}

/// An open, synchronised agent session.
pub struct GuestAgent {
    addr: String,
    conn: BufReader<Box<dyn Stream>>,
    set_timeout: Box<dyn Fn(Duration) -> std::io::Result<()> + Send>,
    timeout: Duration,
}

impl std::fmt::Debug for GuestAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestAgent")
            .field("addr", &self.addr)
            .finish()
    }
}

fn timed_out(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

impl GuestAgent {
    /// Connect to the agent socket at `addr` (an absolute path, or
    /// `host:port`) and synchronise; `timeout` bounds every exchange.
    pub fn connect(addr: &str, timeout: Duration) -> Result<GuestAgent> {
        let fail = |what: &str, e: std::io::Error| {
            let kind = if timed_out(&e) {
                TransportKind::Timeout
            } else {
                TransportKind::Connect
            };
            Error::transport_from(
                format!("agent {addr}"),
                kind,
                format!("{what}: {e}; check the VM's guest-agent channel"),
                e,
            )
        };
        let (stream, set_timeout): (Box<dyn Stream>, Box<dyn Fn(Duration) -> _ + Send>) =
            if addr.starts_with('/') {
                let s = UnixStream::connect(addr).map_err(|e| fail("connect", e))?;
                let c = s.try_clone().map_err(|e| fail("connect", e))?;
                (
                    Box::new(s),
                    Box::new(move |t| {
                        c.set_read_timeout(Some(t))?;
                        c.set_write_timeout(Some(t))
                    }),
                )
            } else {
                use std::net::ToSocketAddrs;
                let sa = addr
                    .to_socket_addrs()
                    .map_err(|e| fail("resolve", e))?
                    .next()
                    .ok_or_else(|| fail("resolve", std::io::ErrorKind::NotFound.into()))?;
                let s = TcpStream::connect_timeout(&sa, timeout).map_err(|e| fail("connect", e))?;
                let c = s.try_clone().map_err(|e| fail("connect", e))?;
                (
                    Box::new(s),
                    Box::new(move |t| {
                        c.set_read_timeout(Some(t))?;
                        c.set_write_timeout(Some(t))
                    }),
                )
            };
        set_timeout(timeout).map_err(|e| fail("set timeout", e))?;
        let mut a = GuestAgent {
            addr: addr.to_string(),
            conn: BufReader::with_capacity(64 << 10, stream),
            set_timeout,
            timeout,
        };
        a.sync()?;
        Ok(a)
    }

    /// The agent's address.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    fn err(&self, kind: TransportKind, detail: String) -> Error {
        Error::transport(format!("agent {}", self.addr), kind, detail)
    }

    fn send(&mut self, bytes: &[u8]) -> Result<()> {
        let r = self
            .conn
            .get_mut()
            .write_all(bytes)
            .and_then(|()| self.conn.get_mut().flush());
        r.map_err(|e| {
            let kind = if timed_out(&e) {
                TransportKind::Timeout
            } else {
                TransportKind::Connect
            };
            self.err(kind, format!("sending to the guest agent: {e}"))
        })
    }

    fn read_msg(&mut self) -> Result<Value> {
        loop {
            let mut line = Vec::new();
            let n = (&mut self.conn)
                .take(MAX_LINE)
                .read_until(b'\n', &mut line)
                .map_err(|e| {
                    if timed_out(&e) {
                        self.err(
                            TransportKind::Timeout,
                            format!(
                                "the guest agent did not answer in {:?} (is qemu-ga running in the guest?)",
                                self.timeout
                            ),
                        )
                    } else {
                        self.err(TransportKind::Connect, format!("reading from the agent: {e}"))
                    }
                })?;
            if n == 0 {
                return Err(self.err(
                    TransportKind::Protocol,
                    "the guest agent's socket closed".into(),
                ));
            }
            if line.last() != Some(&b'\n') {
                return Err(self.err(
                    TransportKind::Protocol,
                    format!("an agent message longer than {MAX_LINE} bytes or cut off"),
                ));
            }
            let text: &[u8] = {
                let t = line.as_slice();
                let start = t.iter().position(|&b| b != 0xff).unwrap_or(t.len());
                &t[start..]
            };
            let text = text.trim_ascii();
            if text.is_empty() {
                continue;
            }
            return serde_json::from_slice(text).map_err(|e| {
                self.err(
                    TransportKind::Protocol,
                    format!("bad JSON from the agent: {e}"),
                )
            });
        }
    }

    /// Resynchronise: skip any stale answer up to ours.
    pub fn sync(&mut self) -> Result<()> {
        let mut r = [0u8; 4];
        let _ = getrandom::fill(&mut r);
        let id = u64::from(u32::from_le_bytes(r) >> 1);
        let mut msg = vec![0xffu8];
        msg.extend_from_slice(
            json!({"execute": "guest-sync-delimited", "arguments": {"id": id}})
                .to_string()
                .as_bytes(),
        );
        msg.push(b'\n');
        self.send(&msg)?;
        // Bounded: stale answers are few (one per unread command).
        for _ in 0..64 {
            let m = self.read_msg()?;
            if m.get("return").and_then(Value::as_u64) == Some(id) {
                return Ok(());
            }
        }
        Err(self.err(
            TransportKind::Protocol,
            "the guest agent did not synchronise".into(),
        ))
    }

    /// Run a command with `timeout` for its answer; the agent's error
    /// answer is `Ok(Err(..))`.
    pub fn try_execute_within(
        &mut self,
        cmd: &str,
        args: Value,
        timeout: Duration,
    ) -> Result<std::result::Result<Value, AgentFailure>> {
        let mut msg = json!({ "execute": cmd });
        if args.as_object().is_some_and(|o| !o.is_empty()) {
            msg["arguments"] = args;
        }
        let mut text = msg.to_string();
        text.push('\n');
        (self.set_timeout)(timeout)
            .map_err(|e| self.err(TransportKind::Connect, format!("set timeout: {e}")))?;
        let saved = std::mem::replace(&mut self.timeout, timeout);
        let r = self.send(text.as_bytes()).and_then(|()| self.read_msg());
        self.timeout = saved;
        let _ = (self.set_timeout)(saved);
        let m = r?;
        if let Some(v) = m.get("return") {
            return Ok(Ok(v.clone()));
        }
        if let Some(e) = m.get("error") {
            return Ok(Err(AgentFailure {
                class: e["class"].as_str().unwrap_or("GenericError").to_string(),
                desc: e["desc"].as_str().unwrap_or_default().to_string(),
            }));
        }
        Err(self.err(
            TransportKind::Protocol,
            format!("unexpected agent message for {cmd}"),
        ))
    }

    /// Run a command; an error answer is an error.
    pub fn execute(&mut self, cmd: &str, args: Value) -> Result<Value> {
        let t = self.timeout;
        self.try_execute_within(cmd, args, t)?
            .map_err(|f| self.err(TransportKind::Refused, format!("{cmd}: {f}")))
    }

    /// `guest-fsfreeze-status`: whether the guest's filesystems are frozen.
    pub fn frozen(&mut self) -> Result<bool> {
        let v = self.execute("guest-fsfreeze-status", json!({}))?;
        Ok(v.as_str() == Some("frozen"))
    }

    /// `guest-fsfreeze-thaw`: the number of filesystems thawed.
    pub fn thaw(&mut self) -> Result<u64> {
        let v = self.execute("guest-fsfreeze-thaw", json!({}))?;
        Ok(v.as_u64().unwrap_or(0))
    }
}
