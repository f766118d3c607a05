//! The HTTPS front of the server: one TLS port for the REST API (bearer
//! token) and the agent API (client certificate of an enrolled host).
//!
//! TLS is accepted here by hand (tokio-rustls + hyper) rather than by a
//! wrapper crate, because each connection's client certificate must reach
//! the handlers: its fingerprint is put in the request's extensions.
//! Client certificates are optional at the TLS layer (users come with a
//! token), and required by every `/agent/v1` handler. Only two calls need
//! neither: fetching the CA certificate (public, and checked by the host
//! against its token) and enrolling (which needs the one-time secret).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use datamover_control::api::{
    self, EnrollRequest, ErrorBody, Heartbeat, HostPatch, InstallerReport, JobSpec, NewHost,
    ProxyPatch, TaskResult,
};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::engine::access::Caller;
use crate::engine::{Engine, EngineError, ErrorKind};
use datamover_control::api::{NewToken, TokenRole};

/// The OpenAPI document of the REST API.
pub const OPENAPI: &str = include_str!("../openapi.json");

/// An error answer: a status and a JSON [`ErrorBody`]. The one place an
/// engine error's kind becomes an HTTP status.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// What went wrong.
    pub message: String,
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let status = match e.kind {
            ErrorKind::BadInput => StatusCode::BAD_REQUEST,
            ErrorKind::Unauthenticated => StatusCode::UNAUTHORIZED,
            ErrorKind::Forbidden => StatusCode::FORBIDDEN,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::Conflict => StatusCode::CONFLICT,
            ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError {
            status,
            message: e.message,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status;
        if status.is_server_error() {
            tracing::error!("{}", self.message);
        }
        (
            status,
            Json(ErrorBody {
                error: self.message,
            }),
        )
            .into_response()
    }
}

/// The TLS peer of a connection: its client certificate's fingerprint,
/// and when that certificate ends (Unix seconds).
#[derive(Debug, Clone)]
struct Peer {
    fingerprint: Option<String>,
    not_after: Option<i64>,
}

type AppState = Arc<Engine>;

/// A caller with a valid API token whose role allows the call (by its
/// route and method, [`allowed`]).
struct User(Caller);

/// The caller of a request's bearer token.
fn caller(headers: &axum::http::HeaderMap, st: &AppState) -> Result<Caller, EngineError> {
    let h = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            EngineError::unauthorized("an API token is needed: Authorization: Bearer <token>")
        })?;
    let t = h.strip_prefix("Bearer ").ok_or_else(|| {
        EngineError::unauthorized("the Authorization header must be: Bearer <token>")
    })?;
    st.check_token(t.trim())
}

/// What each role may call, by route and method: an administrator
/// anything; an auditor only reads; an operator reads (not tokens nor the
/// audit log), runs jobs and creates jobs (restore jobs only, checked by
/// the handler).
pub fn allowed(role: TokenRole, method: &axum::http::Method, route: &str) -> bool {
    use axum::http::Method;
    let a = api::API;
    let reads = method == Method::GET || method == Method::HEAD;
    // A point's files are its data: administrators only.
    if route.starts_with(&format!("{a}/files")) {
        return role == TokenRole::Admin;
    }
    match role {
        TokenRole::Admin => true,
        TokenRole::Auditor => reads,
        TokenRole::Operator => {
            (reads && route != format!("{a}/tokens") && route != format!("{a}/audit"))
                || (method == Method::POST
                    && (route == format!("{a}/jobs/{{name}}/run") || route == format!("{a}/jobs")))
        }
    }
}

impl FromRequestParts<AppState> for User {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, st: &AppState) -> Result<Self, ApiError> {
        let c = caller(&parts.headers, st)?;
        let route = parts
            .extensions
            .get::<axum::extract::MatchedPath>()
            .map(|m| m.as_str().to_string())
            .unwrap_or_default();
        if !allowed(c.role, &parts.method, &route) {
            return Err(EngineError::forbidden(format!(
                "token {} ({}) may not {} {route}",
                c.name,
                c.role.as_str(),
                parts.method
            ))
            .into());
        }
        Ok(User(c))
    }
}

/// Every call that changes something (any method but GET and HEAD) on
/// the REST API goes into the audit log with its caller and status:
/// `token:NAME` (or `anonymous`), `enrollment` for a host enrolling.
async fn audit(State(e): State<AppState>, req: Request, next: axum::middleware::Next) -> Response {
    use axum::http::Method;
    let path = req.uri().path().to_string();
    let record =
        req.method() != Method::GET && req.method() != Method::HEAD && path.starts_with(api::API);
    if !record {
        return next.run(req).await;
    }
    let who = if path == format!("{}/enroll", api::API) {
        "enrollment".to_string()
    } else {
        match caller(req.headers(), &e) {
            Ok(c) => format!("token:{}", c.name),
            Err(_) => "anonymous".into(),
        }
    };
    let action = format!("{} {path}", req.method());
    let res = next.run(req).await;
    let status = res.status().as_u16();
    let r = blocking(move || e.audit(&who, &action, status)).await;
    if let Err(err) = r {
        tracing::error!("audit log: {}", err.message);
    }
    res
}

/// An enrolled host, by its client certificate.
struct HostPeer {
    id: crate::catalog::ids::HostId,
}

impl FromRequestParts<AppState> for HostPeer {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, st: &AppState) -> Result<Self, ApiError> {
        let peer = parts.extensions.get::<Peer>().cloned();
        let fp = peer
            .as_ref()
            .and_then(|p| p.fingerprint.clone())
            .ok_or_else(|| {
                EngineError::unauthorized(
                    "the agent API needs the client certificate of an enrolled host",
                )
            })?;
        // TLS checked the certificate's dates at the handshake; a kept-
        // alive connection outlives them, so each request checks again.
        if let Some(end) = peer.and_then(|p| p.not_after)
            && end < st.clock.now().timestamp()
        {
            return Err(EngineError::unauthorized(
                "the client certificate has expired (renew it before its end, or enroll the host again)",
            )
            .into());
        }
        let (id, _name) = st.host_of_cert(&fp)?;
        Ok(HostPeer { id })
    }
}

/// A JSON body whose rejections are JSON errors with a 4xx status.
struct Body<T>(T);

impl<T: serde::de::DeserializeOwned> FromRequest<AppState> for Body<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, st: &AppState) -> Result<Self, ApiError> {
        let declared = req
            .headers()
            .get(axum::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > MAX_BODY) {
            return Err(ApiError {
                status: StatusCode::PAYLOAD_TOO_LARGE,
                message: format!("request bodies are at most {MAX_BODY} bytes"),
            });
        }
        let deadline = limits().body;
        let read = tokio::time::timeout(deadline, Json::<T>::from_request(req, st)).await;
        let Ok(read) = read else {
            return Err(ApiError {
                status: StatusCode::REQUEST_TIMEOUT,
                message: format!("the request body did not arrive within {deadline:?}"),
            });
        };
        match read {
            Ok(Json(v)) => Ok(Body(v)),
            Err(e) => Err(ApiError {
                status: e.status(),
                message: e.body_text(),
            }),
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, EngineError> + Send + 'static,
) -> Result<T, ApiError> {
    Ok(tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| EngineError::internal(format!("handler: {e}")))??)
}

/// An id from the path; not a number, or one beyond what the catalog
/// stores (2^63 - 1), is a 400 with a message.
fn number(what: &str, s: &str) -> Result<u64, EngineError> {
    let n: u64 = s
        .parse()
        .map_err(|_| EngineError::bad(format!("{what} id {s:?} is not a number")))?;
    if n > i64::MAX as u64 {
        return Err(EngineError::bad(format!(
            "{what} id {s} is out of range (at most {})",
            i64::MAX
        )));
    }
    Ok(n)
}

#[derive(serde::Deserialize)]
struct Limit {
    limit: Option<u32>,
}

/// The router.
pub fn router(engine: AppState) -> Router {
    let a = api::API;
    let g = api::AGENT;
    Router::new()
        .route(
            &format!("{a}/ca"),
            get(|State(e): State<AppState>| async move { e.ca().cert_pem().to_string() }),
        )
        .route(
            &format!("{a}/enroll"),
            post(|State(e): State<AppState>, Body(r): Body<EnrollRequest>| {
                blocking(move || e.enroll(&r).map(Json))
            }),
        )
        .route(
            &format!("{a}/openapi.json"),
            get(|_: User| async { ([("content-type", "application/json")], OPENAPI) }),
        )
        .route(
            &format!("{a}/hosts"),
            get(|_: User, State(e): State<AppState>| blocking(move || e.hosts().map(Json))).post(
                |_: User, State(e): State<AppState>, Body(h): Body<NewHost>| {
                    blocking(move || e.add_host(&h).map(|r| (StatusCode::CREATED, Json(r))))
                },
            ),
        )
        .route(
            &format!("{a}/hosts/{{name}}"),
            axum::routing::delete(
                |_: User, State(e): State<AppState>, Path(n): Path<String>| {
                    blocking(move || e.remove_host(&n).map(|()| StatusCode::NO_CONTENT))
                },
            )
            .patch(
                |_: User,
                 State(e): State<AppState>,
                 Path(n): Path<String>,
                 Body(p): Body<HostPatch>| {
                    blocking(move || e.patch_host(&n, &p).map(Json))
                },
            ),
        )
        .route(
            &format!("{a}/proxies"),
            get(|_: User, State(e): State<AppState>| blocking(move || e.proxies().map(Json))),
        )
        .route(
            &format!("{a}/vms"),
            get(|_: User, State(e): State<AppState>| blocking(move || e.vms().map(Json))),
        )
        .route(
            &format!("{a}/proxies/{{name}}"),
            axum::routing::patch(
                |_: User,
                 State(e): State<AppState>,
                 Path(n): Path<String>,
                 Body(p): Body<ProxyPatch>| {
                    blocking(move || e.patch_proxy(&n, &p).map(Json))
                },
            ),
        )
        .route(
            &format!("{a}/repositories"),
            get(|_: User, State(e): State<AppState>| blocking(move || e.repositories().map(Json)))
                .post(
                    |_: User, State(e): State<AppState>, Body(r): Body<api::Repository>| {
                        blocking(move || {
                            e.add_repository(&r).map(|r| (StatusCode::CREATED, Json(r)))
                        })
                    },
                ),
        )
        .route(
            &format!("{a}/jobs"),
            get(|_: User, State(e): State<AppState>| blocking(move || e.jobs().map(Json))).post(
                |User(u): User, State(e): State<AppState>, Body(j): Body<JobSpec>| {
                    blocking(move || {
                        if u.role == TokenRole::Operator && j.kind != api::JobKind::Restore {
                            return Err(EngineError::forbidden(format!(
                                "token {} (operator) may create restore jobs only",
                                u.name
                            )));
                        }
                        e.create_job(&j).map(|r| (StatusCode::CREATED, Json(r)))
                    })
                },
            ),
        )
        .route(
            &format!("{a}/jobs/{{name}}"),
            get(
                |_: User, State(e): State<AppState>, Path(n): Path<String>| {
                    blocking(move || e.job(&n).map(Json))
                },
            )
            .delete(
                |_: User, State(e): State<AppState>, Path(n): Path<String>| {
                    blocking(move || e.delete_job(&n).map(|()| StatusCode::NO_CONTENT))
                },
            ),
        )
        .route(
            &format!("{a}/jobs/{{name}}/run"),
            post(
                |_: User, State(e): State<AppState>, Path(n): Path<String>| {
                    blocking(move || e.run_job(&n).map(|s| (StatusCode::CREATED, Json(s))))
                },
            ),
        )
        .route(
            &format!("{a}/jobs/{{name}}/replicas"),
            post(
                |_: User,
                 State(e): State<AppState>,
                 Path(n): Path<String>,
                 Body(r): Body<api::ReplicaRequest>| {
                    blocking(move || {
                        e.replica_operation(&n, &r)
                            .map(|o| (StatusCode::ACCEPTED, Json(o)))
                    })
                },
            ),
        )
        .route(
            &format!("{a}/operations"),
            get(
                |_: User, State(e): State<AppState>, Query(l): Query<Limit>| {
                    blocking(move || e.operations(l.limit.unwrap_or(50).min(1000)).map(Json))
                },
            ),
        )
        .route(
            &format!("{a}/operations/{{id}}"),
            get(
                |_: User, State(e): State<AppState>, Path(id): Path<String>| {
                    blocking(move || e.operation(number("operation", &id)?).map(Json))
                },
            ),
        )
        .route(
            &format!("{a}/recoveries"),
            get(
                |_: User, State(e): State<AppState>, Query(l): Query<Limit>| {
                    blocking(move || e.recoveries(l.limit.unwrap_or(50).min(1000)).map(Json))
                },
            )
            .post(
                |_: User, State(e): State<AppState>, Body(r): Body<api::RecoveryRequest>| {
                    blocking(move || {
                        e.create_recovery(&r)
                            .map(|o| (StatusCode::ACCEPTED, Json(o)))
                    })
                },
            ),
        )
        .route(
            &format!("{a}/recoveries/{{id}}"),
            get(
                |_: User, State(e): State<AppState>, Path(id): Path<String>| {
                    blocking(move || e.recovery(number("recovery", &id)?).map(Json))
                },
            ),
        )
        .route(
            &format!("{a}/recoveries/{{id}}/migrate"),
            post(
                |_: User,
                 State(e): State<AppState>,
                 Path(id): Path<String>,
                 Body(m): Body<api::RecoveryMigrate>| {
                    blocking(move || {
                        e.migrate_recovery(number("recovery", &id)?, &m)
                            .map(|o| (StatusCode::ACCEPTED, Json(o)))
                    })
                },
            ),
        )
        .route(
            &format!("{a}/recoveries/{{id}}/discard"),
            post(
                |_: User, State(e): State<AppState>, Path(id): Path<String>| {
                    blocking(move || {
                        e.discard_recovery(number("recovery", &id)?)
                            .map(|o| (StatusCode::ACCEPTED, Json(o)))
                    })
                },
            ),
        )
        .route(
            &format!("{a}/sessions"),
            get(
                |_: User, State(e): State<AppState>, Query(l): Query<Limit>| {
                    blocking(move || e.sessions(l.limit.unwrap_or(50).min(1000)).map(Json))
                },
            ),
        )
        .route(
            &format!("{a}/sessions/{{id}}"),
            get(
                |_: User, State(e): State<AppState>, Path(id): Path<String>| {
                    blocking(move || e.session(number("session", &id)?).map(Json))
                },
            ),
        )
        .route(
            &format!("{a}/sessions/{{id}}/timeline"),
            get(
                |_: User, State(e): State<AppState>, Path(id): Path<String>| {
                    blocking(move || e.timeline(number("session", &id)?).map(Json))
                },
            ),
        )
        .route(
            &format!("{g}/heartbeat"),
            post(
                |h: HostPeer, State(e): State<AppState>, Body(hb): Body<Heartbeat>| {
                    blocking(move || e.heartbeat(h.id, &hb).map(Json))
                },
            ),
        )
        .route(
            &format!("{g}/installer"),
            post(
                |h: HostPeer, State(e): State<AppState>, Body(r): Body<InstallerReport>| {
                    blocking(move || e.installer_poll(h.id, &r).map(Json))
                },
            ),
        )
        .route(
            &format!("{g}/components/{{name}}"),
            get(
                |h: HostPeer, State(e): State<AppState>, Path(n): Path<String>| async move {
                    let pkg = blocking(move || e.component_for(h.id, &n)).await?;
                    stream_file(pkg)
                },
            ),
        )
        .route(
            &format!("{g}/files/{{id}}/content"),
            axum::routing::put(
                |h: HostPeer,
                 State(e): State<AppState>,
                 Path(id): Path<String>,
                 body: axum::body::Body| async move {
                    let id = number("file request", &id)?;
                    let e2 = e.clone();
                    let (part, done) = blocking(move || e2.files_upload_to(h.id, id)).await?;
                    let size = receive_file(body, &part, &done).await?;
                    blocking(move || e.files_uploaded(id, size)).await?;
                    Ok::<_, ApiError>(StatusCode::NO_CONTENT)
                },
            ),
        )
        .route(
            &format!("{a}/files"),
            post(
                |_: User, State(e): State<AppState>, Body(r): Body<api::FilesRequest>| {
                    blocking(move || {
                        e.create_files_job(&r)
                            .map(|j| (StatusCode::ACCEPTED, Json(j)))
                    })
                },
            ),
        )
        .route(
            &format!("{a}/files/{{id}}"),
            get(
                |_: User, State(e): State<AppState>, Path(id): Path<String>| {
                    blocking(move || e.files_job(number("file request", &id)?).map(Json))
                },
            ),
        )
        .route(
            &format!("{a}/files/{{id}}/content"),
            get(
                |_: User, State(e): State<AppState>, Path(id): Path<String>| async move {
                    let pkg =
                        blocking(move || e.files_archive(number("file request", &id)?)).await?;
                    stream_file(pkg)
                },
            ),
        )
        .route(
            &format!("{g}/renew"),
            post(
                |h: HostPeer, State(e): State<AppState>, Body(r): Body<api::RenewRequest>| {
                    blocking(move || {
                        e.renew(h.id, &r.csr)
                            .map(|cert| Json(api::Renewed { cert }))
                    })
                },
            ),
        )
        .route(
            &format!("{g}/tasks/{{id}}/result"),
            post(
                |h: HostPeer,
                 State(e): State<AppState>,
                 Path(id): Path<String>,
                 Body(r): Body<TaskResult>| {
                    blocking(move || {
                        let id = number("task", &id)?;
                        if r.task != id {
                            return Err(EngineError::bad(format!(
                                "result of task {} posted to task {id}",
                                r.task
                            )));
                        }
                        e.task_result(h.id, &r).map(Json)
                    })
                },
            ),
        )
        .route(
            &format!("{a}/tokens"),
            get(|_: User, State(e): State<AppState>| blocking(move || e.tokens().map(Json))).post(
                |_: User, State(e): State<AppState>, Body(t): Body<NewToken>| {
                    blocking(move || e.create_token(&t).map(|r| (StatusCode::CREATED, Json(r))))
                },
            ),
        )
        .route(
            &format!("{a}/tokens/{{name}}"),
            axum::routing::delete(
                |_: User, State(e): State<AppState>, Path(n): Path<String>| {
                    blocking(move || e.revoke_token(&n).map(|()| StatusCode::NO_CONTENT))
                },
            ),
        )
        .route(
            &format!("{a}/audit"),
            get(
                |_: User, State(e): State<AppState>, Query(l): Query<Limit>| {
                    blocking(move || e.audit_log(l.limit.unwrap_or(100).min(10_000)).map(Json))
                },
            ),
        )
        .fallback(|| async {
            ApiError {
                status: StatusCode::NOT_FOUND,
                message: "no such API path".into(),
            }
        })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY as usize))
        .layer(axum::middleware::from_fn_with_state(engine.clone(), audit))
        .with_state(engine)
}

/// A package as the body of an answer, read in 1 MiB pieces by a
/// blocking thread (it may be large). If the file changes meanwhile, the
/// installer's checksum refuses what it got.
/// The largest archive a proxy may upload.
const MAX_ARCHIVE: u64 = 64 << 30;

/// How long an upload may take.
const UPLOAD_TIME: Duration = Duration::from_secs(1800);

/// Write a request body to `part`, then rename it to `done`: its size.
async fn receive_file(
    body: axum::body::Body,
    part: &std::path::Path,
    done: &std::path::Path,
) -> Result<u64, ApiError> {
    use futures_util::StreamExt;
    use tokio::io::AsyncWriteExt;
    let io = |e: std::io::Error| ApiError::from(EngineError::unavailable(format!("archive: {e}")));
    let mut f = tokio::fs::File::create(part).await.map_err(io)?;
    let mut stream = body.into_data_stream();
    let mut size = 0u64;
    let read = tokio::time::timeout(UPLOAD_TIME, async {
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| EngineError::bad(format!("the upload broke: {e}")))?;
            size += chunk.len() as u64;
            if size > MAX_ARCHIVE {
                return Err(EngineError::bad(format!(
                    "archives are at most {MAX_ARCHIVE} bytes"
                )));
            }
            f.write_all(&chunk)
                .await
                .map_err(|e| EngineError::unavailable(format!("archive: {e}")))?;
        }
        f.sync_all()
            .await
            .map_err(|e| EngineError::unavailable(format!("archive: {e}")))
    })
    .await;
    let r = match read {
        Ok(r) => r.map_err(ApiError::from),
        Err(_) => Err(ApiError {
            status: StatusCode::REQUEST_TIMEOUT,
            message: format!("the archive did not arrive within {UPLOAD_TIME:?}"),
        }),
    };
    if let Err(e) = r {
        let _ = tokio::fs::remove_file(part).await;
        return Err(e);
    }
    tokio::fs::rename(part, done).await.map_err(io)?;
    Ok(size)
}

fn stream_file(pkg: crate::deploy::Package) -> Result<Response, ApiError> {
    use std::io::Read;
    let mut f = std::fs::File::open(&pkg.path)
        .map_err(|e| EngineError::unavailable(format!("{}: {e}", pkg.path.display())))?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<axum::body::Bytes, std::io::Error>>(4);
    tokio::task::spawn_blocking(move || {
        let mut left = pkg.size;
        while left > 0 {
            let mut buf = vec![0u8; (1 << 20).min(left as usize)];
            let r = match f.read(&mut buf) {
                Ok(0) => Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "package shrank while being sent",
                )),
                Ok(n) => {
                    buf.truncate(n);
                    left -= n as u64;
                    Ok(axum::body::Bytes::from(buf))
                }
                Err(e) => Err(e),
            };
            let failed = r.is_err();
            if tx.blocking_send(r).is_err() || failed {
                return;
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Response::builder()
        .header("content-type", "application/octet-stream")
        .header("content-length", pkg.size)
        .header("x-sha256", pkg.sha256)
        .body(axum::body::Body::from_stream(stream))
        .map_err(|e| EngineError::internal(e).into())
}

/// What one client, or all of them, may hold of the HTTPS port.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connections at once.
    pub connections: usize,
    /// Connections from one address at once.
    pub per_address: usize,
    /// Time to finish the TLS handshake.
    pub handshake: Duration,
    /// Time to send a request's headers (also the most a kept-alive
    /// connection waits for its next request).
    pub headers: Duration,
    /// Time to send a request's body once its headers are in.
    pub body: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connections: 512,
            per_address: 64,
            handshake: Duration::from_secs(10),
            headers: Duration::from_secs(30),
            body: Duration::from_secs(30),
        }
    }
}

/// The largest request body accepted (a larger declared length is
/// refused with 413 before a byte of it is read).
pub const MAX_BODY: u64 = 1 << 20;

/// The limits [`serve`] was started with.
static LIMITS: std::sync::OnceLock<Limits> = std::sync::OnceLock::new();

fn limits() -> Limits {
    LIMITS.get().cloned().unwrap_or_default()
}

/// Connections held, in all and by address.
#[derive(Debug, Default)]
struct Held {
    all: usize,
    by_address: std::collections::HashMap<std::net::IpAddr, usize>,
}

/// A connection's place in [`Held`], given back when dropped.
struct Place {
    held: Arc<std::sync::Mutex<Held>>,
    ip: std::net::IpAddr,
}

impl Place {
    fn take(held: &Arc<std::sync::Mutex<Held>>, ip: std::net::IpAddr, l: &Limits) -> Option<Place> {
        let mut h = held.lock().unwrap_or_else(|p| p.into_inner());
        let mine = h.by_address.get(&ip).copied().unwrap_or(0);
        if h.all >= l.connections || mine >= l.per_address {
            return None;
        }
        h.all += 1;
        *h.by_address.entry(ip).or_default() += 1;
        Some(Place {
            held: held.clone(),
            ip,
        })
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut h = self.held.lock().unwrap_or_else(|p| p.into_inner());
        h.all -= 1;
        if let Some(n) = h.by_address.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                h.by_address.remove(&self.ip);
            }
        }
    }
}

/// Serve `router` over TLS on `listener` until the process ends, within
/// `limits` (the first call's limits hold for the process).
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    app: Router,
    limits: Limits,
) {
    let _ = LIMITS.set(limits);
    let l = self::limits();
    let acceptor = TlsAcceptor::from(tls);
    let held: Arc<std::sync::Mutex<Held>> = Default::default();
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(place) = Place::take(&held, peer.ip(), &l) else {
            tracing::warn!(
                "{peer}: connection refused ({} in all or {} from its address held)",
                l.connections,
                l.per_address
            );
            drop(tcp);
            continue;
        };
        let (acceptor, app) = (acceptor.clone(), app.clone());
        tokio::spawn(async move {
            connection(acceptor, app, tcp, peer).await;
            drop(place);
        });
    }
}

async fn connection(
    acceptor: TlsAcceptor,
    app: Router,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
) {
    let l = limits();
    let tls = match tokio::time::timeout(l.handshake, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!("TLS handshake with {peer} failed: {e}");
            return;
        }
        Err(_) => return,
    };
    let cert = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .cloned();
    let fingerprint = cert
        .as_ref()
        .map(|c| datamover_control::pki::fingerprint(c));
    let not_after = cert
        .as_ref()
        .and_then(|c| datamover_control::pki::validity_der(c).ok())
        .map(|v| v.1);
    let app = app.layer(Extension(Peer {
        fingerprint,
        not_after,
    }));
    let svc = hyper_util::service::TowerToHyperService::new(app);
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(l.headers)
        .serve_connection(TokioIo::new(tls), svc);
    if let Err(e) = conn.await {
        tracing::debug!("connection with {peer}: {e}");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tower::ServiceExt;

    /// Every operation of the OpenAPI document is routed (with that
    /// method), and every one but the two open calls wants a token.
    #[tokio::test]
    async fn openapi_document_matches_the_router() {
        let d = tempfile::tempdir().unwrap();
        let db = crate::catalog::open(&d.path().join("c.sqlite")).unwrap();
        let ca = crate::ca::Ca::load_or_create(&d.path().join("ca"), "t").unwrap();
        let app = router(Arc::new(Engine::new(db, ca, crate::Timing::default())));
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        assert!(paths.len() >= 14);
        for (path, ops) in paths {
            for (method, op) in ops.as_object().unwrap() {
                let uri = path.replace("{name}", "x").replace("{id}", "1");
                let req = axum::http::Request::builder()
                    .method(method.to_uppercase().as_str())
                    .uri(&uri)
                    .header("content-type", "application/json")
                    .body(axum::body::Body::from("{}"))
                    .unwrap();
                let resp = app.clone().oneshot(req).await.unwrap();
                let s = resp.status().as_u16();
                let open = op.get("security").is_some();
                assert!(s != 404 && s != 405, "{method} {path}: {s}, not routed");
                if !open {
                    assert_eq!(s, 401, "{method} {path} must want a token");
                }
            }
        }
    }
}
