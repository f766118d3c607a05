//! A blocking HTTPS client for the server's REST and agent APIs: `dm
//! --server`, the proxies and installers use it. It trusts only the
//! installation's CA and authenticates with a bearer token (users) or a
//! client certificate (hosts).

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use ureq::tls::{Certificate, ClientCert, PrivateKey, RootCerts, TlsConfig};

use crate::api::{
    ErrorBody, Host, HostAdded, HostPatch, Job, JobSpec, NewHost, Proxy, ProxyPatch, Repository,
    Session, paths,
};
use crate::pki::{self, Identity};

/// What a call to the server can end with.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error status.
    #[error("server refused ({status}): {message}")]
    Status {
        /// HTTP status.
        status: u16,
        /// The server's message.
        message: String,
    },
    /// No answer: connection, TLS or timeout.
    #[error("cannot reach {url}: {source}")]
    Unreachable {
        /// What was called.
        url: String,
        /// Why (ureq's or the socket's error).
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A certificate, key or token that is not usable.
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    /// A bad setting (certificate files, URL) or a local file that could
    /// not be written.
    #[error("{0}")]
    Config(String),
}

impl ClientError {
    /// The HTTP status, when the server answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether the same call may succeed later: no answer at all, or a
    /// server error (5xx, 429). A refusal (4xx) or a bad setting will
    /// not change by itself.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Unreachable { .. } => true,
            ClientError::Status { status, .. } => *status >= 500 || *status == 429,
            ClientError::Pki(_) | ClientError::Config(_) => false,
        }
    }
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, ClientError>;

/// How the client proves who it is.
#[derive(Debug, Clone)]
pub enum Auth {
    /// `Authorization: Bearer …` (users, `dm`).
    Token(String),
    /// A client certificate (hosts).
    Certificate,
    /// Nothing (fetching the CA, enrolling).
    None,
}

/// A connection to one server.
#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    agent: ureq::Agent,
    auth: Auth,
}

fn config_err(e: impl std::fmt::Display) -> ClientError {
    ClientError::Config(e.to_string())
}

impl Client {
    /// A client of `base` (`https://host:port`) trusting `ca_pem`,
    /// presenting `identity` when given.
    pub fn new(
        base: &str,
        ca_pem: &str,
        identity: Option<&Identity>,
        auth: Auth,
        timeout: Duration,
    ) -> Result<Client> {
        pki::install_crypto();
        let roots: Vec<Certificate<'static>> = pki::certs_from_pem(ca_pem)?
            .into_iter()
            .map(|c| Certificate::from_der(&c).to_owned())
            .collect();
        if roots.is_empty() {
            return Err(ClientError::Config("no CA certificate given".into()));
        }
        let mut tls = TlsConfig::builder().root_certs(RootCerts::Specific(Arc::new(roots)));
        if let Some(id) = identity {
            let chain: Vec<Certificate<'static>> = pki::certs_from_pem(&id.cert_pem)?
                .into_iter()
                .map(|c| Certificate::from_der(&c).to_owned())
                .collect();
            let key = PrivateKey::from_pem(id.key_pem.as_bytes()).map_err(config_err)?;
            tls = tls.client_cert(Some(ClientCert::new_with_certs(&chain, key)));
        }
        Ok(Self::with_tls(base, tls.build(), auth, timeout))
    }

    /// A client of the agent API at `server` for an enrolled host: its
    /// certificate, the installation's CA, 30 s per call.
    pub fn for_host(server: &str, identity: &Identity) -> Result<Client> {
        Self::new(
            server,
            &identity.ca_pem,
            Some(identity),
            Auth::Certificate,
            Duration::from_secs(30),
        )
    }

    fn with_tls(base: &str, tls: TlsConfig, auth: Auth, timeout: Duration) -> Client {
        let agent = ureq::Agent::config_builder()
            .tls_config(tls)
            .https_only(true)
            .http_status_as_error(false)
            .timeout_global(Some(timeout))
            .build()
            .into();
        Client {
            base: base.trim_end_matches('/').to_string(),
            agent,
            auth,
        }
    }

    /// Fetch the server's CA certificate without trusting anything yet,
    /// and accept it only if its SHA-256 is `fingerprint` (from the
    /// enrollment token).
    pub fn fetch_ca(base: &str, fingerprint: &str, timeout: Duration) -> Result<String> {
        pki::install_crypto();
        let tls = TlsConfig::builder().disable_verification(true).build();
        let c = Self::with_tls(base, tls, Auth::None, timeout);
        let pem: String = c.call_text("GET", &paths::ca())?;
        let der = pki::cert_der_from_pem(&pem)?;
        let got = pki::fingerprint(&der);
        if got != fingerprint {
            return Err(ClientError::Config(format!(
                "the server at {base} shows CA {got}, but the enrollment token names CA {fingerprint}: not enrolling"
            )));
        }
        Ok(pem)
    }

    /// The server's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    fn request(&self, method: &str, path: &str, body: Option<Vec<u8>>) -> Result<(u16, Vec<u8>)> {
        let url = format!("{}{path}", self.base);
        let unreachable = |e: ureq::Error| ClientError::Unreachable {
            url: url.clone(),
            source: Box::new(e),
        };
        let mut b = ureq::http::Request::builder().method(method).uri(&url);
        if let Auth::Token(t) = &self.auth {
            b = b.header("Authorization", format!("Bearer {t}"));
        }
        let resp = match body {
            Some(body) => {
                let req = b
                    .header("Content-Type", "application/json")
                    .body(body)
                    .map_err(config_err)?;
                self.agent.run(req)
            }
            None => self.agent.run(b.body(()).map_err(config_err)?),
        };
        let mut resp = resp.map_err(unreachable)?;
        let status = resp.status().as_u16();
        let bytes = resp
            .body_mut()
            .with_config()
            .limit(64 << 20)
            .read_to_vec()
            .map_err(unreachable)?;
        Ok((status, bytes))
    }

    fn check(status: u16, bytes: &[u8]) -> Result<()> {
        if (200..300).contains(&status) {
            return Ok(());
        }
        let message = serde_json::from_slice::<ErrorBody>(bytes)
            .map(|e| e.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(bytes).chars().take(500).collect());
        Err(ClientError::Status { status, message })
    }

    fn call_text(&self, method: &str, path: &str) -> Result<String> {
        let (status, bytes) = self.request(method, path, None)?;
        Self::check(status, &bytes)?;
        String::from_utf8(bytes).map_err(config_err)
    }

    fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T> {
        let (status, bytes) = self.request(method, path, body)?;
        Self::check(status, &bytes)?;
        let bytes = if bytes.is_empty() {
            b"null".to_vec()
        } else {
            bytes
        };
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Status {
            status,
            message: format!("unexpected answer from {path}: {e}"),
        })
    }

    /// GET `path` (e.g. `/api/v1/jobs`).
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.call("GET", path, None)
    }

    /// GET `path` as text.
    pub fn get_text(&self, path: &str) -> Result<String> {
        self.call_text("GET", path)
    }

    /// POST a JSON body.
    pub fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        let b = serde_json::to_vec(body).map_err(config_err)?;
        self.call("POST", path, Some(b))
    }

    /// PATCH a JSON body.
    pub fn patch<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        let b = serde_json::to_vec(body).map_err(config_err)?;
        self.call("PATCH", path, Some(b))
    }

    /// PUT file `file` as the body of `path`, streamed (a file request's
    /// archive; a 30-minute time limit instead of the API's).
    pub fn upload(&self, path: &str, file: &std::path::Path) -> Result<()> {
        let url = format!("{}{path}", self.base);
        let unreachable = |e: Box<dyn std::error::Error + Send + Sync>| ClientError::Unreachable {
            url: url.clone(),
            source: e,
        };
        let f = std::fs::File::open(file).map_err(|e| unreachable(Box::new(e)))?;
        let mut req = self
            .agent
            .put(&url)
            .config()
            .timeout_global(Some(Duration::from_secs(1800)))
            .build()
            .header("Content-Type", "application/x-tar");
        if let Auth::Token(t) = &self.auth {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        let mut resp = req.send(f).map_err(|e| unreachable(Box::new(e)))?;
        let status = resp.status().as_u16();
        let bytes = resp
            .body_mut()
            .with_config()
            .limit(1 << 20)
            .read_to_vec()
            .map_err(|e| unreachable(Box::new(e)))?;
        Self::check(status, &bytes)
    }

    /// GET `path` as bytes streamed into `out` (a package: no size limit
    /// but `max`, and a 30-minute time limit instead of the API's).
    /// Returns the length and the SHA-256 (hex) of what was written.
    pub fn download(
        &self,
        path: &str,
        out: &mut dyn std::io::Write,
        max: u64,
    ) -> Result<(u64, String)> {
        let url = format!("{}{path}", self.base);
        let unreachable = |e: Box<dyn std::error::Error + Send + Sync>| ClientError::Unreachable {
            url: url.clone(),
            source: e,
        };
        let mut req = self
            .agent
            .get(&url)
            .config()
            .timeout_global(Some(Duration::from_secs(1800)))
            .build();
        if let Auth::Token(t) = &self.auth {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        let mut resp = req.call().map_err(|e| unreachable(Box::new(e)))?;
        let status = resp.status().as_u16();
        if !(200..300).contains(&status) {
            let bytes = resp
                .body_mut()
                .with_config()
                .limit(1 << 20)
                .read_to_vec()
                .map_err(|e| unreachable(Box::new(e)))?;
            Self::check(status, &bytes)?;
        }
        let mut body = resp.body_mut().with_config().limit(max).reader();
        let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
        let mut buf = vec![0u8; 1 << 20];
        let mut len = 0u64;
        loop {
            let n = match std::io::Read::read(&mut body, &mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(unreachable(Box::new(e))),
            };
            hash.update(&buf[..n]);
            out.write_all(&buf[..n])
                .map_err(|e| ClientError::Config(format!("writing the download of {url}: {e}")))?;
            len += n as u64;
        }
        Ok((len, pki::hex(hash.finish().as_ref())))
    }

    /// DELETE.
    pub fn delete(&self, path: &str) -> Result<()> {
        let (status, bytes) = self.request("DELETE", path, None)?;
        Self::check(status, &bytes)
    }

    // ---- the REST API, typed ----

    /// Managed hosts.
    pub fn hosts(&self) -> Result<Vec<Host>> {
        self.get(&paths::hosts())
    }
    /// Add a host; the answer carries its one-time enrollment token.
    pub fn add_host(&self, h: &NewHost) -> Result<HostAdded> {
        self.post(&paths::hosts(), h)
    }
    /// Change a host (its roles).
    pub fn patch_host(&self, name: &str, p: &HostPatch) -> Result<Host> {
        self.patch(&paths::host(name), p)
    }
    /// Remove a host (revokes its certificate).
    pub fn remove_host(&self, name: &str) -> Result<()> {
        self.delete(&paths::host(name))
    }
    /// Proxies.
    pub fn proxies(&self) -> Result<Vec<Proxy>> {
        self.get(&paths::proxies())
    }
    /// The VM inventory (what the hypervisors' proxies report).
    pub fn vms(&self) -> Result<Vec<crate::api::InventoryVm>> {
        self.get(&paths::vms())
    }
    /// Change a proxy's settings.
    pub fn patch_proxy(&self, name: &str, p: &ProxyPatch) -> Result<Proxy> {
        self.patch(&paths::proxy(name), p)
    }
    /// Repositories.
    pub fn repositories(&self) -> Result<Vec<Repository>> {
        self.get(&paths::repositories())
    }
    /// Add a repository.
    pub fn add_repository(&self, r: &Repository) -> Result<Repository> {
        self.post(&paths::repositories(), r)
    }
    /// Jobs.
    pub fn jobs(&self) -> Result<Vec<Job>> {
        self.get(&paths::jobs())
    }
    /// Create a job.
    pub fn create_job(&self, j: &JobSpec) -> Result<Job> {
        self.post(&paths::jobs(), j)
    }
    /// Start a run of a job: its new session.
    pub fn run_job(&self, name: &str) -> Result<Session> {
        self.post(&paths::job_run(name), &serde_json::json!({}))
    }
    /// Ask for an operation on a VM's replicas (failover, undo, failback).
    pub fn replica_operation(
        &self,
        job: &str,
        r: &crate::api::ReplicaRequest,
    ) -> Result<crate::api::Operation> {
        self.post(&paths::job_replicas(job), r)
    }
    /// One operation.
    pub fn operation(&self, id: u64) -> Result<crate::api::Operation> {
        self.get(&paths::operation(id))
    }
    /// Recent operations, newest first.
    pub fn operations(&self) -> Result<Vec<crate::api::Operation>> {
        self.get(&paths::operations())
    }
    /// Ask for a point's files (a listing, or a tar archive to download).
    pub fn create_files_job(&self, r: &crate::api::FilesRequest) -> Result<crate::api::FilesJob> {
        self.post(&paths::files(), r)
    }
    /// One file request.
    pub fn files_job(&self, id: u64) -> Result<crate::api::FilesJob> {
        self.get(&paths::files_job(id))
    }
    /// Ask for a point's files and wait for the answer (`each` between
    /// polls: a check for Ctrl-C); a failed request is an error.
    pub fn files<E: From<ClientError>>(
        &self,
        r: &crate::api::FilesRequest,
        mut each: impl FnMut() -> std::result::Result<(), E>,
    ) -> std::result::Result<crate::api::FilesJob, E> {
        let mut j = self.create_files_job(r)?;
        while !j.ended() {
            each()?;
            std::thread::sleep(SESSION_POLL);
            j = self.files_job(j.id)?;
        }
        if j.state == "failed" {
            return Err(ClientError::Status {
                status: 422,
                message: j.error.unwrap_or_else(|| "the file request failed".into()),
            }
            .into());
        }
        Ok(j)
    }
    /// Ask for an instant recovery.
    pub fn create_recovery(&self, r: &crate::api::RecoveryRequest) -> Result<crate::api::Recovery> {
        self.post(&paths::recoveries(), r)
    }
    /// One instant recovery.
    pub fn recovery(&self, id: u64) -> Result<crate::api::Recovery> {
        self.get(&paths::recovery(id))
    }
    /// Instant recoveries, newest first.
    pub fn recoveries(&self) -> Result<Vec<crate::api::Recovery>> {
        self.get(&paths::recoveries())
    }
    /// Move a recovered VM to production storage while it runs.
    pub fn migrate_recovery(
        &self,
        id: u64,
        m: &crate::api::RecoveryMigrate,
    ) -> Result<crate::api::Recovery> {
        self.post(&paths::recovery_action(id, "migrate"), m)
    }
    /// Power a recovered VM off and drop its writes.
    pub fn discard_recovery(&self, id: u64) -> Result<crate::api::Recovery> {
        self.post(
            &paths::recovery_action(id, "discard"),
            &serde_json::json!({}),
        )
    }
    /// Delete a job (refused while it runs).
    pub fn delete_job(&self, name: &str) -> Result<()> {
        self.delete(&paths::job(name))
    }
    /// Recent sessions, newest first.
    pub fn sessions(&self, limit: u32) -> Result<Vec<Session>> {
        self.get(&paths::sessions(limit))
    }
    /// One session with its tasks.
    pub fn session(&self, id: u64) -> Result<Session> {
        self.get(&paths::session(id))
    }
    /// Every API token (never their secrets).
    pub fn tokens(&self) -> Result<Vec<crate::api::ApiToken>> {
        self.get(&paths::tokens())
    }
    /// Make an API token; the answer holds its secret (shown only once).
    pub fn create_token(&self, t: &crate::api::NewToken) -> Result<crate::api::TokenCreated> {
        self.post(&paths::tokens(), t)
    }
    /// Revoke an API token: it stops working at once.
    pub fn revoke_token(&self, name: &str) -> Result<()> {
        self.delete(&paths::token(name))
    }
    /// The newest `limit` entries of the audit log, newest first.
    pub fn audit(&self, limit: u32) -> Result<Vec<crate::api::AuditEntry>> {
        self.get(&paths::audit(limit))
    }

    /// Poll session `id` every [`SESSION_POLL`] until it ends, calling
    /// `each` with every state seen (progress bars, a check for Ctrl-C);
    /// an error from `each` stops the wait. Returns the ended session.
    pub fn wait_session<E: From<ClientError>>(
        &self,
        id: u64,
        mut each: impl FnMut(&Session) -> std::result::Result<(), E>,
    ) -> std::result::Result<Session, E> {
        loop {
            let s = self.session(id)?;
            each(&s)?;
            if s.state.is_final() {
                return Ok(s);
            }
            std::thread::sleep(SESSION_POLL);
        }
    }

    /// Poll operation `id` every [`SESSION_POLL`] until it is done or
    /// failed, calling `each` between polls (a check for Ctrl-C); an error
    /// from `each` stops the wait. Returns the ended operation.
    pub fn wait_operation<E: From<ClientError>>(
        &self,
        id: u64,
        mut each: impl FnMut() -> std::result::Result<(), E>,
    ) -> std::result::Result<crate::api::Operation, E> {
        loop {
            let o = self.operation(id)?;
            if o.state != "queued" && o.state != "running" {
                return Ok(o);
            }
            each()?;
            std::thread::sleep(SESSION_POLL);
        }
    }
}

impl Client {
    /// Poll recovery `id` every [`SESSION_POLL`] until `until` holds of
    /// it or it ended, calling `each` with every state seen; an error
    /// from `each` stops the wait.
    pub fn wait_recovery<E: From<ClientError>>(
        &self,
        id: u64,
        until: impl Fn(&crate::api::Recovery) -> bool,
        mut each: impl FnMut(&crate::api::Recovery) -> std::result::Result<(), E>,
    ) -> std::result::Result<crate::api::Recovery, E> {
        loop {
            let r = self.recovery(id)?;
            each(&r)?;
            if r.ended() || until(&r) {
                return Ok(r);
            }
            std::thread::sleep(SESSION_POLL);
        }
    }
}

/// How often [`Client::wait_session`] asks for a session's state.
pub const SESSION_POLL: Duration = Duration::from_millis(250);
