//! Application-aware processing: the guest's filesystems are frozen by its
//! agent (`guest-fsfreeze-freeze`, which first runs the guest's fsfreeze
//! hooks: that is how a database flushes itself) just before the snapshot
//! transaction, and thawed right after it.
//!
//! Limits (see [`QuiesceLimits`]): the freeze command, hooks included, must
//! answer within 60 s; once frozen, the guest is thawed after at most 10 s
//! whatever the snapshot is doing (a watchdog thaws it; the point is then
//! only crash-consistent). A thaw is attempted on every path. A run killed
//! while the guest was frozen leaves it frozen until the next run, which
//! finds it frozen (`guest-fsfreeze-status`) and thaws it before anything
//! else.
//!
//! [`Quiesce::Auto`] quiesces when an agent answers and otherwise takes a
//! crash-consistent point and says why; [`Quiesce::Required`] fails
//! instead; [`Quiesce::Off`] never asks the guest.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;

use super::agent::GuestAgent;
use datamover::{Consistency, ConsistencyLevel, Error, Result};

/// Whether to quiesce the guest around the snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Quiesce {
    /// Quiesce when the guest agent answers; otherwise a crash-consistent
    /// point, with a warning that says why.
    #[default]
    Auto,
    /// Fail the backup when the guest cannot be quiesced.
    Required,
    /// Never ask the guest (crash-consistent points).
    Off,
    /// The caller froze the guest and keeps it frozen (and paused) over
    /// the snapshot, as a migration's final sync does: the agent is not
    /// asked and points are application-consistent. Not a user's choice.
    Held,
}

impl Quiesce {
    /// The name used on the command line and in jobs.
    pub fn name(self) -> &'static str {
        match self {
            Quiesce::Auto => "auto",
            Quiesce::Required => "required",
            Quiesce::Off => "off",
            Quiesce::Held => "held",
        }
    }
}

impl std::fmt::Display for Quiesce {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Quiesce {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Quiesce::Auto),
            "required" => Ok(Quiesce::Required),
            "off" => Ok(Quiesce::Off),
            other => Err(Error::InvalidArgument(format!(
                "unknown quiesce mode {other:?}: use auto, required or off"
            ))),
        }
    }
}

/// How long each step may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuiesceLimits {
    /// Connecting to the agent and each plain exchange (ping, status, thaw).
    pub agent: Duration,
    /// `guest-fsfreeze-freeze`, the guest's hooks included.
    pub freeze: Duration,
    /// The longest the guest stays frozen: a watchdog thaws it then.
    pub frozen: Duration,
}

impl Default for QuiesceLimits {
    fn default() -> Self {
        QuiesceLimits {
            agent: Duration::from_secs(10),
            freeze: Duration::from_secs(60),
            frozen: Duration::from_secs(10),
        }
    }
}

/// The guest's freeze and thaw, through its agent: directly (QMP VMs,
/// [`GuestAgent`]) or through libvirt's agent integration.
pub trait GuestFreezer: Send {
    /// Where the agent is (for messages).
    fn describe(&self) -> String;
    /// Thaw a guest an earlier run left frozen: the filesystems thawed
    /// (0 when it was not frozen).
    fn thaw_leftover(&mut self) -> Result<u64>;
    /// `guest-fsfreeze-freeze` with `timeout`: the filesystems frozen, or
    /// the agent's refusal (a hook that failed) as `Ok(Err(..))`.
    fn freeze(&mut self, timeout: Duration) -> Result<std::result::Result<u64, String>>;
    /// `guest-fsfreeze-thaw`.
    fn thaw(&mut self) -> Result<u64>;
    /// After a freeze that failed or did not answer: make sure the guest
    /// is thawed (a late freeze may still have happened).
    fn recover(&mut self) -> Result<()>;
}

/// The QEMU guest agent's socket, reached directly.
#[derive(Debug)]
struct Qga {
    agent: GuestAgent,
    limit: Duration,
}

impl GuestFreezer for Qga {
    fn describe(&self) -> String {
        self.agent.addr().to_string()
    }
    fn thaw_leftover(&mut self) -> Result<u64> {
        if self.agent.frozen()? {
            self.agent.thaw()
        } else {
            Ok(0)
        }
    }
    fn freeze(&mut self, timeout: Duration) -> Result<std::result::Result<u64, String>> {
        Ok(self
            .agent
            .try_execute_within("guest-fsfreeze-freeze", json!({}), timeout)?
            .map(|v| v.as_u64().unwrap_or(0))
            .map_err(|f| f.desc))
    }
    fn thaw(&mut self) -> Result<u64> {
        match self.agent.thaw() {
            Ok(n) => Ok(n),
            Err(e) => {
                // A lost session: a new one, then thaw.
                tracing::warn!(error = %e, "thawing the guest failed; reconnecting");
                self.agent = GuestAgent::connect(self.agent.addr(), self.limit)?;
                self.agent.thaw()
            }
        }
    }
    fn recover(&mut self) -> Result<()> {
        // This session may hold a late answer: a new one.
        self.agent = GuestAgent::connect(self.agent.addr(), self.limit)?;
        self.thaw_leftover().map(|_| ())
    }
}

/// A guest ready to be quiesced around a snapshot (or the reason it
/// cannot be).
pub struct Quiescer {
    mode: Quiesce,
    agent: Option<Box<dyn GuestFreezer>>,
    why_not: Option<String>,
    limits: QuiesceLimits,
    /// What happened that the run report should say.
    pub notes: Vec<String>,
}

impl std::fmt::Debug for Quiescer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Quiescer")
            .field("mode", &self.mode)
            .field("agent", &self.agent.as_ref().map(|a| a.describe()))
            .field("why_not", &self.why_not)
            .finish()
    }
}

impl Quiescer {
    /// Reach the guest agent at `agent` (unless `mode` is off), and thaw a
    /// guest an earlier, killed run left frozen. With
    /// [`Quiesce::Required`], an agent that cannot be reached is an error.
    pub fn open(mode: Quiesce, agent: Option<&str>, limits: QuiesceLimits) -> Result<Quiescer> {
        Quiescer::with(
            mode,
            |limits| {
                match agent {
                None => Err("the VM address names no guest agent (add ?agent=/path/to/qga.sock, the host side of its org.qemu.guest_agent.0 channel)".to_string()),
                Some(a) => GuestAgent::connect(a, limits.agent)
                    .map(|agent| Box::new(Qga { agent, limit: limits.agent }) as Box<dyn GuestFreezer>)
                    .map_err(|e| format!("the guest agent cannot be used: {e}")),
            }
            },
            limits,
        )
    }

    /// [`Quiescer::open`] with any way to the agent: `reach` gives it, or
    /// why there is none (not called when `mode` is off).
    pub fn with(
        mode: Quiesce,
        reach: impl FnOnce(&QuiesceLimits) -> std::result::Result<Box<dyn GuestFreezer>, String>,
        limits: QuiesceLimits,
    ) -> Result<Quiescer> {
        let mut q = Quiescer {
            mode,
            agent: None,
            why_not: None,
            limits,
            notes: Vec::new(),
        };
        if mode == Quiesce::Off {
            q.why_not = Some("quiescing is off".into());
            return Ok(q);
        }
        if mode == Quiesce::Held {
            return Ok(q);
        }
        let reached = reach(&limits).and_then(|mut g| match g.thaw_leftover() {
            Ok(0) => Ok(g),
            Ok(n) => {
                tracing::warn!(agent = %g.describe(), "the guest was left frozen (by a killed run?); thawed {n} filesystems");
                q.notes.push(format!("the guest was found frozen (left by an earlier run?) and was thawed ({n} filesystems)"));
                Ok(g)
            }
            Err(e) => Err(format!("the guest agent cannot be used: {e}")),
        });
        match reached {
            Ok(g) => q.agent = Some(g),
            Err(why) if mode == Quiesce::Required => {
                return Err(Error::Unsupported(format!(
                    "the guest cannot be quiesced (--quiesce required): {why}"
                )));
            }
            Err(why) => q.why_not = Some(why),
        }
        Ok(q)
    }

    /// The mode asked for.
    pub fn mode(&self) -> Quiesce {
        self.mode
    }

    /// What a snapshot of consistency `c` means for the run: an error with
    /// [`Quiesce::Required`] when it is only crash-consistent (the caller
    /// undoes the snapshot), a note with [`Quiesce::Auto`], else nothing.
    pub fn settle(&self, c: &Consistency) -> Result<Option<String>> {
        if c.level != ConsistencyLevel::Crash {
            return Ok(None);
        }
        match self.mode {
            Quiesce::Required => Err(Error::Unsupported(format!(
                "the guest cannot be quiesced (--quiesce required): {}",
                c.reason
            ))),
            Quiesce::Auto => Ok(Some(format!("crash-consistent: {}", c.reason))),
            Quiesce::Off | Quiesce::Held => Ok(None),
        }
    }

    /// Run `snapshot` with the guest frozen, and thaw it. Returns what
    /// `snapshot` returned and the consistency reached. An error only comes
    /// before `snapshot` ran: with [`Quiesce::Required`], when the guest
    /// could not be frozen (it is left thawed).
    pub fn around<T>(&mut self, snapshot: impl FnOnce() -> T) -> Result<(T, Consistency)> {
        if self.mode == Quiesce::Held {
            return Ok((
                snapshot(),
                Consistency {
                    level: ConsistencyLevel::Application,
                    reason:
                        "the guest was frozen through its agent and paused before this snapshot"
                            .into(),
                    frozen_ms: None,
                },
            ));
        }
        let Some(mut agent) = self.agent.take() else {
            let why = self.why_not.clone().unwrap_or_default();
            return Ok((snapshot(), Consistency::crash(why)));
        };
        let addr = agent.describe();
        let asked = Instant::now();
        let n = match agent.freeze(self.limits.freeze) {
            Ok(Ok(n)) => n,
            Ok(Err(desc)) => {
                let why = format!("the guest agent could not freeze the guest: {desc}");
                self.make_sure_thawed(agent);
                return self.not_quiesced(why, snapshot);
            }
            Err(e) => {
                let why = format!("freezing the guest failed: {e}");
                self.make_sure_thawed(agent);
                return self.not_quiesced(why, snapshot);
            }
        };
        let freeze_ms = asked.elapsed().as_millis();
        let frozen_at = Instant::now();
        let agent = Mutex::new(agent);
        let by_watchdog = AtomicBool::new(false);
        let (done, wait) = std::sync::mpsc::channel::<()>();
        let limit = self.limits.frozen;
        let (out, thawed) = std::thread::scope(|s| {
            let (agent, by_watchdog, addr) = (&agent, &by_watchdog, addr.as_str());
            let watchdog = s.spawn(move || {
                if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = wait.recv_timeout(limit) {
                    by_watchdog.store(true, Ordering::SeqCst);
                    tracing::warn!(
                        agent = addr,
                        "the snapshot outlasted the {limit:?} freeze limit: thawing the guest now"
                    );
                    thaw_locked(agent, addr);
                }
            });
            let out = snapshot();
            let _ = done.send(());
            let _ = watchdog.join();
            let thawed = if by_watchdog.load(Ordering::SeqCst) {
                true
            } else {
                thaw_locked(agent, addr)
            };
            (out, thawed)
        });
        let frozen_ms = u64::try_from(frozen_at.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.agent = agent.into_inner().ok();
        if !thawed {
            self.notes.push(format!("the guest could not be thawed through {addr}: it may still be frozen; the next run thaws it, or run `dm vm-thaw`"));
        }
        if by_watchdog.load(Ordering::SeqCst) {
            let why = format!(
                "the snapshot took longer than the {} s freeze limit; the guest was thawed before it completed",
                limit.as_secs()
            );
            self.notes.push(why.clone());
            return Ok((
                out,
                Consistency {
                    level: ConsistencyLevel::Crash,
                    reason: why,
                    frozen_ms: Some(frozen_ms),
                },
            ));
        }
        tracing::info!(filesystems = n, freeze_ms, frozen_ms, "guest quiesced");
        Ok((
            out,
            Consistency {
                level: ConsistencyLevel::Application,
                reason: format!(
                    "the guest agent froze {n} filesystem{} (hooks and freeze took {freeze_ms} ms)",
                    if n == 1 { "" } else { "s" }
                ),
                frozen_ms: Some(frozen_ms),
            },
        ))
    }

    fn not_quiesced<T>(
        &mut self,
        why: String,
        snapshot: impl FnOnce() -> T,
    ) -> Result<(T, Consistency)> {
        if self.mode == Quiesce::Required {
            return Err(Error::Unsupported(format!(
                "the guest cannot be quiesced (--quiesce required): {why}"
            )));
        }
        tracing::warn!("taking a crash-consistent point: {why}");
        Ok((snapshot(), Consistency::crash(why)))
    }

    /// Thaw the guest if it is frozen (a failed freeze thaws what it froze,
    /// but a late one may not have).
    fn make_sure_thawed(&mut self, mut agent: Box<dyn GuestFreezer>) {
        match agent.recover() {
            Ok(()) => self.agent = Some(agent),
            Err(e) => {
                tracing::error!(error = %e, "could not check that the guest is thawed; the next run thaws it");
                self.notes
                    .push(format!("could not check that the guest is thawed: {e}"));
            }
        }
    }
}

/// Thaw through the shared session (a watchdog may race the main thread;
/// the lock orders them). True when the agent answered.
fn thaw_locked(agent: &Mutex<Box<dyn GuestFreezer>>, addr: &str) -> bool {
    let Ok(mut g) = agent.lock() else {
        return false;
    };
    for attempt in 0..3 {
        match g.thaw() {
            Ok(_) => return true,
            Err(e) => {
                tracing::warn!(agent = addr, attempt, error = %e, "thawing the guest failed; retrying");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
    false
}

/// Thaw a guest an earlier run left frozen: for operators (`dm vm-thaw`).
/// Returns the number of filesystems thawed (0 if it was not frozen).
pub fn thaw(agent: &str, timeout: Duration) -> Result<u64> {
    let mut g = GuestAgent::connect(agent, timeout)?;
    if g.frozen()? { g.thaw() } else { Ok(0) }
}
