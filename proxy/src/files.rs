//! File requests the server ordered: listings and tar archives of a
//! point's files, read in a file-level restore appliance
//! ([`transports::files::Session`]) kept per point while it is used (and
//! closed after [`IDLE`] unused), each request in a thread of its own. A
//! tar archive is built in a private temporary directory and uploaded to
//! the server before the request is reported done.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use datamover_control::api::{FilesOp, FilesOrder, FilesStatus, paths};
use datamover_control::client::Client;
use transports::files::{FilesOptions, Session};

/// An appliance unused this long is stopped.
const IDLE: Duration = Duration::from_secs(300);

/// (repository directory, point).
type Key = (String, String);

/// The appliances running, and when each was last used.
type Sessions = HashMap<Key, (Arc<Session>, Instant)>;

/// The file requests of this proxy.
#[derive(Clone)]
pub(crate) struct FileRequests {
    server: String,
    identity: crate::identity::LiveIdentity,
    sessions: Arc<Mutex<Sessions>>,
    statuses: Arc<Mutex<HashMap<u64, FilesStatus>>>,
}

impl std::fmt::Debug for FileRequests {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FileRequests")
    }
}

impl FileRequests {
    /// Requests of `server`, archives uploaded as `identity`.
    pub(crate) fn new(server: String, identity: crate::identity::LiveIdentity) -> FileRequests {
        FileRequests {
            server,
            identity,
            sessions: Arc::default(),
            statuses: Arc::default(),
        }
    }

    /// What the next heartbeat says; idle appliances are stopped here.
    pub(crate) fn statuses(&self) -> Vec<FilesStatus> {
        let idle: Vec<Arc<Session>> = {
            let mut m = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
            let old: Vec<Key> = m
                .iter()
                .filter(|(_, (_, t))| t.elapsed() > IDLE)
                .map(|(k, _)| k.clone())
                .collect();
            old.iter()
                .filter_map(|k| m.remove(k))
                .map(|(s, _)| s)
                .collect()
        };
        drop(idle);
        let m = self.statuses.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<FilesStatus> = m.values().cloned().collect();
        v.sort_by_key(|s| s.id);
        v
    }

    /// A heartbeat carried these: the ended ones need not be sent again.
    pub(crate) fn forget_reported(&self, sent: &[FilesStatus]) {
        let mut m = self.statuses.lock().unwrap_or_else(|p| p.into_inner());
        for s in sent.iter().filter(|s| s.done) {
            m.remove(&s.id);
        }
    }

    /// The appliance of `point` in the repository at `repo`, started if
    /// none runs.
    fn session(&self, repo: &str, point: &str) -> datamover::Result<Arc<Session>> {
        let key = (repo.to_string(), point.to_string());
        if let Some((s, t)) = self
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&key)
        {
            *t = Instant::now();
            return Ok(s.clone());
        }
        let s = Arc::new(Session::open(
            repo.into(),
            point.parse()?,
            FilesOptions::default(),
        )?);
        let mut m = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let e = m.entry(key).or_insert((s, Instant::now()));
        Ok(e.0.clone())
    }

    fn run(&self, o: &FilesOrder) -> datamover::Result<Option<serde_json::Value>> {
        let s = self.session(&o.repository, &o.request.point)?;
        match o.request.op {
            FilesOp::Ls => {
                let path = o.request.paths.first().map_or("/", String::as_str);
                let entries = s.list(path)?;
                serde_json::to_value(entries)
                    .map(Some)
                    .map_err(|e| datamover::Error::Internal(e.to_string()))
            }
            FilesOp::Tar => {
                let dir = tempfile::Builder::new()
                    .prefix("dm-files-tar-")
                    .tempdir()
                    .map_err(|e| {
                        datamover::Error::io("make a directory in", std::env::temp_dir(), e)
                    })?;
                let file = dir.path().join("files.tar");
                s.tar_to(&o.request.paths, &file)?;
                upload(&self.server, &self.identity, o.id, &file)?;
                Ok(None)
            }
        }
    }

    /// Start a request the server ordered (once), in its own thread.
    pub(crate) fn apply(&self, o: FilesOrder) {
        {
            let mut m = self.statuses.lock().unwrap_or_else(|p| p.into_inner());
            if m.contains_key(&o.id) {
                return;
            }
            m.insert(
                o.id,
                FilesStatus {
                    id: o.id,
                    done: false,
                    entries: None,
                    error: None,
                },
            );
        }
        let me = self.clone();
        let finish = move |id: u64, r: datamover::Result<Option<serde_json::Value>>| {
            if let Err(e) = &r {
                tracing::warn!("file request {id}: {e}");
            }
            let mut m = me.statuses.lock().unwrap_or_else(|p| p.into_inner());
            m.insert(
                id,
                FilesStatus {
                    id,
                    done: true,
                    error: r.as_ref().err().map(ToString::to_string),
                    entries: r.ok().flatten(),
                },
            );
        };
        let worker = self.clone();
        let fail = finish.clone();
        let id = o.id;
        let spawned = std::thread::Builder::new()
            .name(format!("files-{id}"))
            .spawn(move || {
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| worker.run(&o)))
                    .unwrap_or_else(|_| {
                        Err(datamover::Error::Internal(
                            "the file request panicked".into(),
                        ))
                    });
                finish(o.id, r);
            });
        if let Err(e) = spawned {
            fail(
                id,
                Err(datamover::Error::Internal(format!(
                    "cannot start a thread: {e}"
                ))),
            );
        }
    }
}

/// Upload request `id`'s archive to the server.
fn upload(
    server: &str,
    identity: &crate::identity::LiveIdentity,
    id: u64,
    file: &Path,
) -> datamover::Result<()> {
    let c = Client::for_host(server, &identity.get())
        .map_err(|e| datamover::Error::Internal(format!("the server: {e}")))?;
    c.upload(&paths::agent_files_content(id), file)
        .map_err(|e| datamover::Error::Internal(format!("uploading the archive: {e}")))
}
