//! The local HTTP API: HTTP/1.1 + JSON over layerd's Unix socket (axum
//! routes, served connection by connection with hyper so every connection
//! carries its peer's credentials and its own timeouts). See docs/AGENT-API.md.
//!
//! Robustness: request headers must arrive within `HEADER_TIMEOUT` and a
//! body within `BODY_TIMEOUT` (at most `MAX_BODY` bytes); a response the
//! client does not read for `WRITE_STALL_TIMEOUT` closes the connection; a
//! request's operation gets `REQUEST_TIMEOUT_*` (not the follow stream); at
//! most `MAX_CONNECTIONS` connections at once (fewer under a low open-files
//! limit). None of these holds anything another client needs.

use std::future::Future;
use std::io;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use hyper::body::Frame;
use hyper_util::rt::{TokioIo, TokioTimer};
use layerfs::control::proto::{JournalQuery, JournalRecord, Retention};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tower::ServiceExt;

use crate::audit::AuditQuery;
use crate::ops::Agent;
use crate::{AgentError, AgentOp, Caller, Role};

/// Largest request body.
pub const MAX_BODY: usize = 1 << 20;
/// A request's line and headers must arrive within this.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Its body must arrive within this (once the headers are in).
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// A response write that makes no progress for this long closes the connection.
pub const WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Reads (GET) get an answer within this, or 504.
pub const REQUEST_TIMEOUT_READ: Duration = Duration::from_secs(120);
/// Operations that change state or re-hash everything (POST, DELETE).
pub const REQUEST_TIMEOUT_CHANGE: Duration = Duration::from_secs(3600);
/// Connections served at once; more are answered 503 and closed.
pub const MAX_CONNECTIONS: usize = 1024;
/// On shutdown, open connections and running operations get this long.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// The API version prefix this layerd serves.
pub const API_PREFIX: &str = "/v1";

/// The credentials of the connection a request came on (SO_PEERCRED,
/// SO_PEERGROUPS), put into every request's extensions.
#[derive(Debug, Clone)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: i32,
    pub groups: Vec<u32>,
}

impl Peer {
    pub fn of(stream: &UnixStream) -> io::Result<Peer> {
        let cred = stream.peer_cred()?;
        let groups = layerfs::sys::peer_groups(stream.as_fd()).unwrap_or_else(|e| {
            tracing::warn!("SO_PEERGROUPS failed ({e}); only the primary group counts");
            Vec::new()
        });
        Ok(Peer {
            uid: cred.uid(),
            gid: cred.gid(),
            pid: cred.pid().unwrap_or(0),
            groups,
        })
    }

    pub fn caller(&self) -> Caller {
        Caller::Local {
            uid: self.uid,
            gid: self.gid,
            pid: self.pid,
            groups: self.groups.clone(),
        }
    }
}

#[derive(Clone)]
struct AppState {
    agent: Arc<Agent>,
    /// Becomes true when layerd shuts down (ends follow streams).
    stop: watch::Receiver<bool>,
}

// ---- Errors ----------------------------------------------------------------

/// The HTTP status of an `AgentError` code.
pub fn http_status(code: &str) -> StatusCode {
    match code {
        "bad_request" => StatusCode::BAD_REQUEST,
        "permission_denied" => StatusCode::FORBIDDEN,
        "not_found" => StatusCode::NOT_FOUND,
        "exists" | "busy" | "read_only" => StatusCode::CONFLICT,
        "unavailable" => StatusCode::SERVICE_UNAVAILABLE,
        "no_space" => StatusCode::INSUFFICIENT_STORAGE,
        "too_large" => StatusCode::PAYLOAD_TOO_LARGE,
        "request_timeout" => StatusCode::REQUEST_TIMEOUT,
        "timeout" => StatusCode::GATEWAY_TIMEOUT,
        "method_not_allowed" => StatusCode::METHOD_NOT_ALLOWED,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn err(code: &str, message: impl Into<String>) -> AgentError {
    AgentError {
        code: code.into(),
        message: message.into(),
        required_role: None,
    }
}

fn json_response(status: StatusCode, v: &impl serde::Serialize) -> Response {
    let mut body = serde_json::to_vec(v).unwrap_or_else(|_| b"null".to_vec());
    body.push(b'\n');
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn error_response(e: &AgentError) -> Response {
    json_response(http_status(&e.code), &serde_json::json!({ "error": e }))
}

// ---- Request input ----------------------------------------------------------

/// Query parameters, percent-decoded, in order (a key may repeat).
struct Params(Vec<(String, String)>);

fn percent_decode(s: &str) -> Result<String, AgentError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = b
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| {
                        err(
                            "bad_request",
                            format!("bad percent-encoding in query: {s:?}"),
                        )
                    })?;
                out.push(hex);
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| {
        err(
            "bad_request",
            format!("query parameter is not UTF-8: {s:?}"),
        )
    })
}

impl Params {
    fn parse(q: Option<&str>) -> Result<Params, AgentError> {
        let mut v = Vec::new();
        for part in q.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, val) = part.split_once('=').unwrap_or((part, ""));
            v.push((percent_decode(k)?, percent_decode(val)?));
        }
        Ok(Params(v))
    }

    /// Refuse parameters this endpoint does not know (typos would otherwise
    /// silently widen a query).
    fn only(&self, allowed: &[&str]) -> Result<(), AgentError> {
        for (k, _) in &self.0 {
            if !allowed.contains(&k.as_str()) {
                return Err(err(
                    "bad_request",
                    format!(
                        "unknown query parameter {k:?}; this endpoint takes {}",
                        if allowed.is_empty() {
                            "none".to_string()
                        } else {
                            allowed.join(", ")
                        }
                    ),
                ));
            }
        }
        Ok(())
    }

    fn last(&self, k: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    }

    fn num<T: std::str::FromStr>(&self, k: &str) -> Result<Option<T>, AgentError> {
        match self.last(k) {
            None => Ok(None),
            Some(v) => v.parse().map(Some).map_err(|_| {
                err(
                    "bad_request",
                    format!("query parameter {k}: not a valid number: {v:?}"),
                )
            }),
        }
    }

    fn string(&self, k: &str) -> Option<String> {
        self.last(k).map(str::to_string)
    }

    /// Every value of a repeated key; commas separate values too.
    fn list(&self, k: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(key, _)| key == k)
            .flat_map(|(_, v)| v.split(','))
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    }

    fn flag(&self, k: &str) -> Result<bool, AgentError> {
        match self.last(k) {
            None | Some("false") | Some("0") | Some("no") => Ok(false),
            Some("") | Some("true") | Some("1") | Some("yes") => Ok(true),
            Some(v) => Err(err(
                "bad_request",
                format!("query parameter {k}: expected true or false, not {v:?}"),
            )),
        }
    }
}

/// What a handler turns into an `AgentOp`.
struct Input {
    params: Params,
    body: Bytes,
}

impl Input {
    /// The JSON body as `T`; an empty body counts as `{}`.
    fn json<T: DeserializeOwned>(&self) -> Result<T, AgentError> {
        let b: &[u8] = if self.body.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            &self.body
        };
        serde_json::from_slice(b).map_err(|e| err("bad_request", format!("request body: {e}")))
    }
}

fn path_err(e: PathRejection) -> AgentError {
    err("bad_request", format!("bad path: {}", e.body_text()))
}

/// The mount named in a /v1/mounts/{mount}/... URL (for audit records of
/// refused calls).
fn mount_in(path: &str) -> Option<String> {
    let rest = path.strip_prefix("/v1/mounts/")?;
    let m = rest.split('/').next()?;
    percent_decode(m).ok()
}

/// What a refused call's audit record names: the mount in the URL and the
/// request line.
#[derive(Clone)]
struct Target {
    mount: Option<String>,
    method: Method,
    uri: axum::http::Uri,
}

/// How one endpoint is handled.
struct Endpoint {
    op: &'static str,
    /// The least role that can possibly use it (checked before anything
    /// else; `Agent::call` applies the exact rule).
    min_role: Role,
    ok: StatusCode,
    params: &'static [&'static str],
}

impl AppState {
    /// Role pre-check, body read (bounded), `build` the operation, run it
    /// with the request timeout. Every refusal is audited.
    async fn handle(
        &self,
        req: Request,
        ep: Endpoint,
        build: impl FnOnce(Input) -> Result<AgentOp, AgentError>,
    ) -> Response {
        let limit = if req.method() == Method::GET {
            REQUEST_TIMEOUT_READ
        } else {
            REQUEST_TIMEOUT_CHANGE
        };
        let (caller, mount, params, body) = match self.prepare(req, &ep).await {
            Ok(x) => x,
            Err(resp) => return resp,
        };
        let op = match build(Input { params, body }) {
            Ok(op) => op,
            Err(e) => return self.refused(&caller, &ep, mount, e).await,
        };
        match tokio::time::timeout(limit, self.agent.call(&caller, op)).await {
            Ok(Ok(v)) => json_response(ep.ok, &v),
            Ok(Err(e)) => error_response(&e),
            Err(_) => error_response(&err(
                "timeout",
                format!(
                    "{} did not finish within {} s; it goes on in the background and its outcome will be in the audit log (GET /v1/audit?op={})",
                    ep.op,
                    limit.as_secs(),
                    ep.op
                ),
            )),
        }
    }

    /// Audit a refusal (denied if the caller lacks the endpoint's role).
    async fn refused(
        &self,
        caller: &Caller,
        ep: &Endpoint,
        target: Target,
        e: AgentError,
    ) -> Response {
        let args = serde_json::json!({ "request": format!("{} {}", target.method, target.uri) });
        error_response(
            &self
                .agent
                .refuse(caller, ep.op, ep.min_role, target.mount, args, e)
                .await,
        )
    }

    /// Caller, pre-check, parameters and body. Err: the response to send.
    async fn prepare(
        &self,
        req: Request,
        ep: &Endpoint,
    ) -> Result<(Caller, Target, Params, Bytes), Response> {
        let Some(peer) = req.extensions().get::<Peer>().cloned() else {
            return Err(error_response(&err(
                "internal",
                "connection without peer credentials",
            )));
        };
        let caller = peer.caller();
        let mount = Target {
            mount: mount_in(req.uri().path()),
            method: req.method().clone(),
            uri: req.uri().clone(),
        };
        let allowed = matches!(self.agent.role_of(&caller), Some(r) if r >= ep.min_role);
        if !allowed {
            return Err(self
                .refused(&caller, ep, mount.clone(), err("permission_denied", ""))
                .await);
        }
        match params_and_body(req, ep).await {
            Ok((params, body)) => Ok((caller, mount, params, body)),
            Err(e) => Err(self.refused(&caller, ep, mount.clone(), e).await),
        }
    }
}

/// The query parameters (only those of `ep`) and the body (at most
/// MAX_BODY, within BODY_TIMEOUT) of a request.
async fn params_and_body(req: Request, ep: &Endpoint) -> Result<(Params, Bytes), AgentError> {
    let params = Params::parse(req.uri().query()).and_then(|p| p.only(ep.params).map(|_| p))?;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(too_large());
    }
    let chunked = req.headers().contains_key(header::TRANSFER_ENCODING);
    if declared.unwrap_or(0) == 0 && !chunked {
        return Ok((params, Bytes::new()));
    }
    match tokio::time::timeout(
        BODY_TIMEOUT,
        axum::body::to_bytes(req.into_body(), MAX_BODY),
    )
    .await
    {
        Ok(Ok(b)) => Ok((params, b)),
        Ok(Err(e)) => Err(if is_length_limit(&*e.into_inner()) {
            too_large()
        } else {
            err("bad_request", "the request body could not be read")
        }),
        Err(_) => Err(err(
            "request_timeout",
            format!(
                "the request body did not arrive within {} s",
                BODY_TIMEOUT.as_secs()
            ),
        )),
    }
}

fn too_large() -> AgentError {
    err(
        "too_large",
        format!("request body larger than {} bytes", MAX_BODY),
    )
}

fn is_length_limit(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(x) = cur {
        if x.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cur = x.source();
    }
    false
}

// ---- Handlers ---------------------------------------------------------------

const NO_PARAMS: &[&str] = &[];

/// The endpoint of operation `op` (its least role from `roles::min_role`).
fn ep(op: &'static str, ok: StatusCode, params: &'static [&'static str]) -> Endpoint {
    Endpoint {
        op,
        // Unknown names cannot happen (all literals here); refuse if they did.
        min_role: crate::roles::min_role(op).unwrap_or(Role::Manager),
        ok,
        params,
    }
}

async fn status(State(s): State<AppState>, req: Request) -> Response {
    s.handle(req, ep("status", StatusCode::OK, NO_PARAMS), |_| {
        Ok(AgentOp::Status)
    })
    .await
}

const CHANGES_PARAMS: &[&str] = &[
    "from_seq", "since_ns", "until_ns", "path", "op", "comm", "uid", "limit",
];

async fn changes(
    State(s): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    req: Request,
) -> Response {
    s.handle(req, ep("changes", StatusCode::OK, CHANGES_PARAMS), |i| {
        let Path(mount) = path.map_err(path_err)?;
        let p = &i.params;
        let query = JournalQuery {
            from_seq: p.num("from_seq")?,
            since_ns: p.num("since_ns")?,
            until_ns: p.num("until_ns")?,
            path_prefix: p.string("path"),
            ops: p.list("op"),
            comm: p.string("comm"),
            uid: p.num("uid")?,
            limit: p.num("limit")?,
        };
        Ok(AgentOp::Changes {
            mount: Some(mount),
            query,
        })
    })
    .await
}

async fn checkpoint_list(
    State(s): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    req: Request,
) -> Response {
    s.handle(
        req,
        ep("checkpoint_list", StatusCode::OK, NO_PARAMS),
        |_| {
            let Path(mount) = path.map_err(path_err)?;
            Ok(AgentOp::CheckpointList { mount: Some(mount) })
        },
    )
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    name: Option<String>,
    message: Option<String>,
}

async fn checkpoint_create(
    State(s): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    req: Request,
) -> Response {
    s.handle(
        req,
        ep("checkpoint_create", StatusCode::CREATED, NO_PARAMS),
        |i| {
            let Path(mount) = path.map_err(path_err)?;
            let b: CreateBody = i.json()?;
            Ok(AgentOp::CheckpointCreate {
                mount: Some(mount),
                name: b.name,
                message: b.message,
            })
        },
    )
    .await
}

async fn checkpoint_show(
    State(s): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    req: Request,
) -> Response {
    s.handle(
        req,
        ep("checkpoint_show", StatusCode::OK, NO_PARAMS),
        |_| {
            let Path((mount, name)) = path.map_err(path_err)?;
            Ok(AgentOp::CheckpointShow {
                mount: Some(mount),
                name,
            })
        },
    )
    .await
}

async fn checkpoint_delete(
    State(s): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    req: Request,
) -> Response {
    s.handle(
        req,
        ep("checkpoint_delete", StatusCode::OK, NO_PARAMS),
        |_| {
            let Path((mount, name)) = path.map_err(path_err)?;
            Ok(AgentOp::CheckpointDelete {
                mount: Some(mount),
                name,
            })
        },
    )
    .await
}

async fn checkpoint_diff(
    State(s): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    req: Request,
) -> Response {
    s.handle(req, ep("checkpoint_diff", StatusCode::OK, &["to"]), |i| {
        let Path((mount, a)) = path.map_err(path_err)?;
        Ok(AgentOp::CheckpointDiff {
            mount: Some(mount),
            a,
            b: i.params.string("to").filter(|s| !s.is_empty()),
        })
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RollbackBody {
    checkpoint: String,
}

async fn rollback(
    State(s): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    req: Request,
) -> Response {
    s.handle(req, ep("rollback", StatusCode::OK, NO_PARAMS), |i| {
        let Path(mount) = path.map_err(path_err)?;
        let b: RollbackBody = i.json()?;
        Ok(AgentOp::Rollback {
            mount: Some(mount),
            name: b.checkpoint,
        })
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RestoreBody {
    checkpoint: String,
    paths: Vec<String>,
}

async fn restore(
    State(s): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    req: Request,
) -> Response {
    s.handle(req, ep("restore", StatusCode::OK, NO_PARAMS), |i| {
        let Path(mount) = path.map_err(path_err)?;
        let b: RestoreBody = i.json()?;
        Ok(AgentOp::Restore {
            mount: Some(mount),
            name: b.checkpoint,
            paths: b.paths,
        })
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Empty {}

async fn verify(
    State(s): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    req: Request,
) -> Response {
    s.handle(req, ep("verify", StatusCode::OK, NO_PARAMS), |i| {
        let Path(mount) = path.map_err(path_err)?;
        let _: Empty = i.json()?;
        Ok(AgentOp::Verify { mount: Some(mount) })
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PruneBody {
    keep_last: Option<u32>,
    keep_hourly: Option<u32>,
    keep_daily: Option<u32>,
    keep_weekly: Option<u32>,
}

async fn prune(
    State(s): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    req: Request,
) -> Response {
    s.handle(req, ep("prune", StatusCode::OK, NO_PARAMS), |i| {
        let Path(mount) = path.map_err(path_err)?;
        let b: PruneBody = i.json()?;
        Ok(AgentOp::Prune {
            mount: Some(mount),
            policy: Retention {
                keep_last: b.keep_last,
                keep_hourly: b.keep_hourly,
                keep_daily: b.keep_daily,
                keep_weekly: b.keep_weekly,
            },
        })
    })
    .await
}

async fn audit(State(s): State<AppState>, req: Request) -> Response {
    // Monitor may read its own calls (uid=its own); Agent::call decides.
    let e = ep(
        "audit",
        StatusCode::OK,
        &["since_ns", "until_ns", "uid", "op", "denied", "limit"],
    );
    s.handle(req, e, |i| {
        let p = &i.params;
        Ok(AgentOp::Audit {
            query: AuditQuery {
                since_ns: p.num("since_ns")?,
                until_ns: p.num("until_ns")?,
                uid: p.num("uid")?,
                op: p.string("op"),
                denied: p.flag("denied")?,
                limit: p.num("limit")?,
            },
        })
    })
    .await
}

/// GET /v1/mounts/{mount}/changes/follow?from_seq=N: NDJSON, one journal
/// record per line, until the client disconnects.
async fn follow(
    State(s): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    req: Request,
) -> Response {
    let ep = ep("follow", StatusCode::OK, &["from_seq"]);
    let (caller, mount, params, _) = match s.prepare(req, &ep).await {
        Ok(x) => x,
        Err(resp) => return resp,
    };
    let parsed = path
        .map_err(path_err)
        .and_then(|Path(m)| Ok((m, params.num::<u64>("from_seq")?)));
    let (m, from_seq) = match parsed {
        Ok(x) => x,
        Err(e) => return s.refused(&caller, &ep, mount, e).await,
    };
    let rx = match s.agent.follow_from(&caller, Some(m), from_seq).await {
        Ok(rx) => rx,
        Err(e) => return error_response(&e),
    };
    let mut r = Response::new(Body::new(ndjson(rx, s.stop.clone())));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// The body of a follow response: records as JSON lines, several per chunk
/// when they come fast. A stream that ends because the mount went away
/// ends with an error (the connection is cut without the final chunk, so a
/// client can tell it from a clean end); layerd's shutdown ends it cleanly.
fn ndjson(mut rx: mpsc::Receiver<JournalRecord>, mut stop: watch::Receiver<bool>) -> NdjsonBody {
    let (btx, brx) = mpsc::channel::<Result<Bytes, io::Error>>(16);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                r = rx.recv() => match r {
                    Some(rec) => {
                        let mut buf = Vec::with_capacity(256);
                        let mut next = Some(rec);
                        while let Some(rec) = next.take() {
                            if serde_json::to_writer(&mut buf, &rec).is_ok() {
                                buf.push(b'\n');
                            }
                            if buf.len() < 64 << 10 {
                                next = rx.try_recv().ok();
                            }
                        }
                        if btx.send(Ok(Bytes::from(buf))).await.is_err() {
                            break;
                        }
                    }
                    None => {
                        if !*stop.borrow() {
                            let _ = btx.send(Err(io::Error::other("the mount's journal stream ended"))).await;
                        }
                        break;
                    }
                },
                _ = stopped(&mut stop) => break,
                _ = btx.closed() => break,
            }
        }
    });
    NdjsonBody { rx: brx }
}

struct NdjsonBody {
    rx: mpsc::Receiver<Result<Bytes, io::Error>>,
}

impl hyper::body::Body for NdjsonBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.rx.poll_recv(cx).map(|o| o.map(|r| r.map(Frame::data)))
    }
}

async fn not_found(req: Request) -> Response {
    let p = req.uri().path();
    let msg = if p == API_PREFIX || p.starts_with("/v1/") {
        format!(
            "no such endpoint: {} {p} (see docs/AGENT-API.md)",
            req.method()
        )
    } else {
        format!(
            "no such endpoint: {} {p}; this layerd serves API version {API_PREFIX} (e.g. GET {API_PREFIX}/status)",
            req.method()
        )
    };
    error_response(&err("not_found", msg))
}

async fn wrong_method(req: Request) -> Response {
    error_response(&err(
        "method_not_allowed",
        format!(
            "{} is not allowed on {} (see docs/AGENT-API.md)",
            req.method(),
            req.uri().path()
        ),
    ))
}

fn router(agent: Arc<Agent>, stop: watch::Receiver<bool>) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/audit", get(audit))
        .route("/v1/mounts/{mount}/changes", get(changes))
        .route("/v1/mounts/{mount}/changes/follow", get(follow))
        .route(
            "/v1/mounts/{mount}/checkpoints",
            get(checkpoint_list).post(checkpoint_create),
        )
        .route(
            "/v1/mounts/{mount}/checkpoints/{name}",
            get(checkpoint_show).delete(checkpoint_delete),
        )
        .route(
            "/v1/mounts/{mount}/checkpoints/{name}/diff",
            get(checkpoint_diff),
        )
        .route("/v1/mounts/{mount}/rollback", post(rollback))
        .route("/v1/mounts/{mount}/restore", post(restore))
        .route("/v1/mounts/{mount}/verify", post(verify))
        .route("/v1/mounts/{mount}/prune", post(prune))
        .fallback(not_found)
        .method_not_allowed_fallback(wrong_method)
        .with_state(AppState { agent, stop })
}

// ---- Serving ----------------------------------------------------------------

/// The connection as hyper sees it: a Unix stream whose writes fail after
/// `WRITE_STALL_TIMEOUT` without progress (a client that stops reading
/// cannot pin its connection), and whose HTTP-level error answers (hyper's
/// bodiless 400/414/431 for a request it cannot parse) get a JSON body like
/// every other error of the API.
struct ConnIo {
    io: UnixStream,
    stall: Option<Pin<Box<tokio::time::Sleep>>>,
    /// A replacement being written: bytes, how many are out, and the
    /// length of the original write to report once done.
    replacing: Option<(Vec<u8>, usize, usize)>,
}

/// hyper's automatic answer to an unparsable request, if `head` is one.
fn replacement_for(head: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(head).ok()?;
    if !text.ends_with("\r\n\r\n") || !text.contains("\r\ncontent-length: 0\r\n") {
        return None;
    }
    let (status, message) = match text.get(..13)? {
        "HTTP/1.1 400 " => (
            "400 Bad Request",
            "malformed HTTP request (this socket speaks HTTP/1.1 + JSON: GET /v1/status)",
        ),
        "HTTP/1.1 414 " => ("414 URI Too Long", "request URI too long"),
        "HTTP/1.1 431 " => (
            "431 Request Header Fields Too Large",
            "request headers too large",
        ),
        _ => return None,
    };
    let body = serde_json::json!({"error": err("bad_request", message)}).to_string() + "\n";
    Some(
        format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    )
}

impl ConnIo {
    fn new(io: UnixStream) -> ConnIo {
        ConnIo {
            io,
            stall: None,
            replacing: None,
        }
    }

    fn pending<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let s = self
            .stall
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(WRITE_STALL_TIMEOUT)));
        match s.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "client stopped reading the response",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn done<T>(&mut self, r: Poll<io::Result<T>>, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        match r {
            Poll::Ready(r) => {
                self.stall = None;
                Poll::Ready(r)
            }
            Poll::Pending => self.pending(cx),
        }
    }

    /// Go on writing the replacement; reports the original write's length.
    fn poll_replacing(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        loop {
            let Some((bytes, pos, orig)) = &mut self.replacing else {
                return Poll::Ready(Ok(0));
            };
            if *pos >= bytes.len() {
                let n = *orig;
                self.replacing = None;
                return Poll::Ready(Ok(n));
            }
            let r = Pin::new(&mut self.io).poll_write(cx, &bytes[*pos..]);
            match self.done(r, cx) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    if let Some((_, pos, _)) = &mut self.replacing {
                        *pos += n;
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl AsyncRead for ConnIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for ConnIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.replacing.is_none() && buf.starts_with(b"HTTP/1.1 4") {
            if let Some(r) = replacement_for(buf) {
                this.replacing = Some((r, 0, buf.len()));
            }
        }
        if this.replacing.is_some() {
            return this.poll_replacing(cx);
        }
        let r = Pin::new(&mut this.io).poll_write(cx, buf);
        this.done(r, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.replacing.is_none() && bufs.first().is_some_and(|b| b.starts_with(b"HTTP/1.1 4")) {
            let all: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            if let Some(r) = replacement_for(&all) {
                this.replacing = Some((r, 0, all.len()));
            }
        }
        if this.replacing.is_some() {
            return this.poll_replacing(cx);
        }
        let r = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.done(r, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_flush(cx);
        this.done(r, cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Serve the API on `listener` until `shutdown` completes; then stop
/// accepting, end follow streams, let requests in progress finish (at most
/// `SHUTDOWN_GRACE`) and wait for running operations' audit records.
pub async fn serve(
    agent: Arc<Agent>,
    listener: UnixListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let app = router(agent.clone(), stop_rx.clone());
    let max_conns = connection_limit();
    let conns = Arc::new(Semaphore::new(max_conns));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => {
                let stream = match r {
                    Ok((s, _)) => s,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                match conns.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let app = app.clone();
                        let stop = stop_rx.clone();
                        tokio::spawn(async move {
                            connection(stream, app, stop).await;
                            drop(permit);
                        });
                    }
                    Err(_) => {
                        tokio::spawn(refuse_connection(stream, max_conns));
                    }
                }
            }
        }
    }
    tracing::info!("shutting down: no new connections");
    let _ = stop_tx.send(true);
    if tokio::time::timeout(SHUTDOWN_GRACE, conns.acquire_many(max_conns as u32))
        .await
        .is_err()
    {
        tracing::warn!(
            "connections still open after {} s; closing them",
            SHUTDOWN_GRACE.as_secs()
        );
    }
    if !agent.drain(SHUTDOWN_GRACE).await {
        tracing::warn!("operations still running at exit; their audit records are lost");
    }
    Ok(())
}

async fn connection(stream: UnixStream, app: Router, mut stop: watch::Receiver<bool>) {
    let peer = match Peer::of(&stream) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!("cannot read the peer's credentials, connection dropped: {e}");
            return;
        }
    };
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(peer.clone());
        app.clone().oneshot(req.map(Body::new))
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(64 << 10)
        .keep_alive(true);
    let io = TokioIo::new(ConnIo::new(stream));
    let conn = builder.serve_connection(io, svc);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!("connection ended: {e}");
            }
        }
        _ = stopped(&mut stop) => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, conn).await;
        }
    }
}

/// Resolves once layerd shuts down (or the sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|v| *v).await;
}

/// `MAX_CONNECTIONS`, or fewer if the open-files limit would not allow as
/// many (accept would then fail with EMFILE instead of a clear 503): what
/// the soft RLIMIT_NOFILE leaves after 128 descriptors for everything else.
fn connection_limit() -> usize {
    let soft = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| {
            l.lines()
                .find(|x| x.starts_with("Max open files"))
                .and_then(|x| x.split_whitespace().nth(3).map(str::to_string))
        })
        .and_then(|v| v.parse::<usize>().ok());
    match soft {
        Some(n) => MAX_CONNECTIONS.min(n.saturating_sub(128)).max(16),
        None => MAX_CONNECTIONS,
    }
}

/// Over the connection limit: a short 503 and close (bounded in time too).
async fn refuse_connection(mut stream: UnixStream, max: usize) {
    let body = serde_json::json!({"error": err("unavailable", format!(
        "layerd is serving {max} connections already; try again later"))})
    .to_string();
    let resp = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}\n",
        body.len() + 1
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(resp.as_bytes())).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params() {
        let p = Params::parse(Some(
            "op=write&op=rename,chmod&path=%2Fetc%20x&comm=a+b&denied",
        ))
        .unwrap();
        assert_eq!(p.list("op"), vec!["write", "rename", "chmod"]);
        assert_eq!(p.string("path").as_deref(), Some("/etc x"));
        assert_eq!(p.string("comm").as_deref(), Some("a b"));
        assert!(p.flag("denied").unwrap());
        assert!(!p.flag("nothing").unwrap());
        assert!(p.only(&["op", "path", "comm", "denied"]).is_ok());
        assert!(p.only(&["op"]).unwrap_err().message.contains("\"path\""));
        let p = Params::parse(Some("limit=x")).unwrap();
        assert_eq!(p.num::<u64>("limit").unwrap_err().code, "bad_request");
        assert!(Params::parse(Some("a=%zz")).is_err());
        assert!(Params::parse(Some("a=%ff")).is_err());
        assert_eq!(
            mount_in("/v1/mounts/root/checkpoints").as_deref(),
            Some("root")
        );
        assert_eq!(mount_in("/v1/status"), None);
    }

    #[test]
    fn statuses() {
        assert_eq!(http_status("permission_denied"), StatusCode::FORBIDDEN);
        assert_eq!(http_status("unavailable"), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(http_status("busy"), StatusCode::CONFLICT);
        assert_eq!(http_status("no_space"), StatusCode::INSUFFICIENT_STORAGE);
        assert_eq!(http_status("corrupt"), StatusCode::INTERNAL_SERVER_ERROR);
    }
}
