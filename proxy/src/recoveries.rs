//! Instant recoveries the server ordered: this proxy is their mount
//! server ([`transports::instant`]), each served from a thread of its own
//! until migrated, discarded or stopped; migrate and discard run in
//! threads of their own beside it. The state each heartbeat reports is
//! the session's, as its file says. The points come from the repository
//! this proxy holds, or, when the order names another proxy's repository
//! service, from that service ([`RemotePoints`]: only the chunks read).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::repo_service::RemotePoints;
use datamover::reader::PointSource;
use datamover_control::api::{RecoveryAction, RecoveryOrder, RecoveryStatus};
use transports::instant::{self, State};

/// One recovery as this proxy tracks it.
#[derive(Debug)]
struct Live {
    status: RecoveryStatus,
    /// The session's name once it serves.
    name: Option<String>,
    stop: Arc<AtomicBool>,
}

/// The recoveries of this proxy: served, or ended and not yet reported.
#[derive(Debug, Clone)]
pub(crate) struct Recoveries {
    dir: PathBuf,
    datastores: Vec<PathBuf>,
    live: Arc<Mutex<HashMap<u64, Live>>>,
    /// This host's identity: a remote repository service admits it.
    identity: crate::identity::LiveIdentity,
}

/// The state the server shows: a session still served is not ended,
/// whatever its file says (the mount server is removing its files).
fn state_name(s: State, done: bool) -> &'static str {
    match (s, done) {
        (State::Stopping, true) => "discarded",
        (State::Stopping, false) => "stopping",
        (State::Migrated, false) => "migrating",
        (s, _) => s.name(),
    }
}

impl Recoveries {
    /// Sessions under `dir`; migrations only into `datastores`.
    pub(crate) fn new(
        dir: PathBuf,
        datastores: Vec<PathBuf>,
        identity: crate::identity::LiveIdentity,
    ) -> Recoveries {
        Recoveries {
            dir,
            datastores,
            live: Arc::default(),
            identity,
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut HashMap<u64, Live>) -> T) -> T {
        f(&mut self.live.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// What the next heartbeat says: each served one as its session file
    /// stands, and the ended ones.
    pub(crate) fn statuses(&self) -> Vec<RecoveryStatus> {
        self.with(|m| {
            for l in m.values_mut().filter(|l| !l.status.done) {
                let Some(name) = &l.name else { continue };
                if let Ok(s) = instant::load(&self.dir, name) {
                    l.status.state = state_name(s.state, false).to_string();
                    l.status.percent = s.percent;
                    l.status.session = serde_json::to_value(&s).ok();
                }
            }
            let mut v: Vec<RecoveryStatus> = m.values().map(|l| l.status.clone()).collect();
            v.sort_by_key(|s| s.id);
            v
        })
    }

    /// A heartbeat carried these: the ended ones need not be sent again.
    pub(crate) fn forget_reported(&self, sent: &[RecoveryStatus]) {
        self.with(|m| {
            for s in sent.iter().filter(|s| s.done) {
                m.remove(&s.id);
            }
        });
    }

    /// Stop serving every recovery (the proxy is stopping): their VMs are
    /// powered off, their writes kept.
    pub(crate) fn stop_all(&self) {
        self.with(|m| {
            for l in m.values() {
                l.stop.store(true, Ordering::Relaxed);
            }
        });
    }

    /// Carry out an order of the server.
    pub(crate) fn apply(&self, o: RecoveryOrder) {
        match o.action {
            RecoveryAction::Start => self.start(o),
            RecoveryAction::Migrate | RecoveryAction::Discard => self.control(o),
        }
    }

    fn set(&self, id: u64, f: impl FnOnce(&mut Live)) {
        self.with(|m| {
            if let Some(l) = m.get_mut(&id) {
                f(l);
            }
        });
    }

    fn start(&self, o: RecoveryOrder) {
        let stop = Arc::new(AtomicBool::new(false));
        let fresh = self.with(|m| {
            if m.contains_key(&o.id) {
                return false;
            }
            m.insert(
                o.id,
                Live {
                    status: RecoveryStatus {
                        id: o.id,
                        state: "starting".into(),
                        percent: 0,
                        done: false,
                        session: None,
                        error: None,
                    },
                    name: None,
                    stop: stop.clone(),
                },
            );
            true
        });
        if !fresh {
            return;
        }
        tracing::info!(
            "recovery {}: starting {} on {}",
            o.id,
            o.points.join(" "),
            o.on
        );
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("recovery-{}", o.id))
            .spawn(move || {
                let how = instant::Recover {
                    on: o.on.clone(),
                    dir: me.dir.clone(),
                    cache_bytes: 0,
                };
                let serve = |repo: &dyn PointSource| {
                    let points = instant::points_named(repo, &o.points)?;
                    instant::recover(repo, &points, &how, &stop, |s| {
                        me.set(o.id, |l| {
                            l.name = Some(s.name.clone());
                            l.status.state = state_name(s.state, false).to_string();
                            l.status.session = serde_json::to_value(s).ok();
                        });
                    })
                };
                let r = match &o.service {
                    Some(at) => RemotePoints::new(at.clone(), &me.identity.get())
                        .map_err(|e| {
                            datamover::Error::InvalidArgument(format!(
                                "this host's identity cannot reach {}: {e}",
                                at.address
                            ))
                        })
                        .and_then(|repo| serve(&repo)),
                    None => datamover::Repository::open(Path::new(&o.repository))
                        .and_then(|repo| serve(&repo)),
                };
                me.set(o.id, |l| {
                    l.status.done = true;
                    match r {
                        Ok(s) => {
                            l.status.state = state_name(s.state, true).to_string();
                            l.status.percent = s.percent;
                            l.status.session = serde_json::to_value(&s).ok();
                        }
                        Err(e) => {
                            tracing::warn!("recovery {}: {e}", o.id);
                            l.status.state = "failed".into();
                            l.status.error = Some(e.to_string());
                        }
                    }
                });
            });
        if let Err(e) = spawned {
            self.set(o.id, |l| {
                l.status.done = true;
                l.status.state = "failed".into();
                l.status.error = Some(format!("cannot start a thread: {e}"));
            });
        }
    }

    fn control(&self, o: RecoveryOrder) {
        let Some(name) = self.with(|m| m.get(&o.id).and_then(|l| l.name.clone())) else {
            tracing::warn!(
                "recovery {}: {:?} for a session this proxy does not serve",
                o.id,
                o.action
            );
            return;
        };
        self.set(o.id, |l| l.status.error = None);
        let me = self.clone();
        let run = move || {
            let r = match (o.action, &o.to) {
                (RecoveryAction::Migrate, Some(m)) => {
                    transports::mode::resolve_within(&me.datastores, Path::new(&m.to))
                        .map_err(|e| datamover::Error::InvalidArgument(e.to_string()))
                        .and_then(|to| {
                            instant::migrate(
                                &me.dir,
                                &name,
                                &instant::Migrate {
                                    to,
                                    format: m.format.clone(),
                                },
                                |_| {},
                            )
                        })
                }
                (RecoveryAction::Discard, _) => instant::discard(&me.dir, &name),
                _ => Err(datamover::Error::InvalidArgument(
                    "a migration names no target".into(),
                )),
            };
            if let Err(e) = r {
                tracing::warn!("recovery {}: {:?}: {e}", o.id, o.action);
                me.set(o.id, |l| l.status.error = Some(e.to_string()));
            }
        };
        if let Err(e) = std::thread::Builder::new()
            .name(format!("recovery-{}-control", o.id))
            .spawn(run)
        {
            self.set(o.id, |l| {
                l.status.error = Some(format!("cannot start a thread: {e}"))
            });
        }
    }
}
