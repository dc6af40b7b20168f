//! The agent's side of the coordinator protocol (docs/COORDINATOR.md).
//!
//! layerd connects OUT to the coordinator, registers (hello: server id,
//! mounts, their status and checkpoints), then streams each mount's journal
//! from where the coordinator says it is (welcome: the highest stored seq per
//! mount) and runs the coordinator's commands through `Agent::call` under the
//! coordinator's role. Nothing is buffered here: the mount's journal is the
//! buffer, so after any disconnect or restart of either side the stream
//! resumes from the last acknowledged record (at-least-once; the coordinator
//! stores each seq once). Memory stays bounded: at most `WINDOW` records are
//! unacknowledged, and those live in the journal, not here.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use layerfs::control::proto::JournalRecord;
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::rustls;

use crate::wire::{self, DecodeError, Incoming, Message, MountInfo, ReadError};
use crate::{AgentError, AgentOp, Caller};

/// Records sent but not acknowledged, per mount, before the agent waits.
pub const WINDOW: u64 = 20_000;
/// Reconnect delays grow from the first to the cap (each jittered).
pub const BACKOFF_FIRST: Duration = Duration::from_millis(200);
pub const BACKOFF_CAP: Duration = Duration::from_secs(5);
/// Coordinator commands run at once, at most (more wait).
const MAX_COMMANDS: usize = 8;
/// How long a batch may wait for more records while the link is busy.
const LINGER: Duration = Duration::from_millis(5);
/// Registration data (status, checkpoint lists) must come within this (the
/// coordinator waits `wire::HANDSHAKE_TIMEOUT` for the hello).
const INVENTORY_TIMEOUT: Duration = Duration::from_secs(6);

/// Where and how to reach the coordinator.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkConfig {
    pub server_id: String,
    /// host:port
    pub address: String,
    pub token_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub server_name: Option<String>,
}

/// What the link needs from the agent (`ops::Agent`; a fake in tests).
pub trait LinkAgent: Send + Sync + 'static {
    fn link_config(&self) -> Option<LinkConfig>;
    /// Mount names and paths.
    fn mount_list(&self) -> Vec<(String, PathBuf)>;
    fn call_op(
        &self,
        caller: &Caller,
        op: AgentOp,
    ) -> impl Future<Output = Result<Value, AgentError>> + Send;
    fn follow_mount(
        &self,
        caller: &Caller,
        mount: String,
        from_seq: u64,
    ) -> impl Future<Output = Result<mpsc::Receiver<JournalRecord>, AgentError>> + Send;
    /// The link's state, for the agent's status.
    fn publish_state(&self, _state: Value) {}
}

impl LinkAgent for crate::ops::Agent {
    fn link_config(&self) -> Option<LinkConfig> {
        let cfg = self.config();
        cfg.coordinator.as_ref().map(|c| LinkConfig {
            server_id: cfg.server_id.clone(),
            address: c.address.clone(),
            token_file: c.token_file.clone(),
            ca_file: c.ca_file.clone(),
            server_name: c.server_name.clone(),
        })
    }

    fn mount_list(&self) -> Vec<(String, PathBuf)> {
        self.mounts()
    }

    fn call_op(
        &self,
        caller: &Caller,
        op: AgentOp,
    ) -> impl Future<Output = Result<Value, AgentError>> + Send {
        self.call(caller, op)
    }

    fn follow_mount(
        &self,
        caller: &Caller,
        mount: String,
        from_seq: u64,
    ) -> impl Future<Output = Result<mpsc::Receiver<JournalRecord>, AgentError>> + Send {
        self.follow(caller, Some(mount), from_seq)
    }

    fn publish_state(&self, state: Value) {
        self.set_link_state(state);
    }
}

/// Start the coordinator link of `agent` (nothing if it has no `[coordinator]`).
/// Runs until the returned task is aborted.
pub fn spawn(agent: Arc<crate::ops::Agent>) -> JoinHandle<()> {
    spawn_link(agent)
}

/// As `spawn`, for any `LinkAgent`.
pub fn spawn_link<A: LinkAgent>(agent: Arc<A>) -> JoinHandle<()> {
    tokio::spawn(run(agent))
}

// ---- Link state (shown in the agent's status) ---------------------------------

#[derive(Default)]
struct StateInner {
    state: &'static str,
    since_ns: i64,
    last_error: Option<String>,
    tls: bool,
    /// mount -> (sent seq, acknowledged seq)
    mounts: HashMap<String, (u64, u64)>,
    published: Option<Instant>,
}

struct LinkState<A: LinkAgent> {
    agent: Arc<A>,
    inner: Mutex<StateInner>,
}

impl<A: LinkAgent> LinkState<A> {
    fn set(&self, state: &'static str, error: Option<String>) {
        {
            let mut s = self.inner.lock();
            if s.state != state {
                s.since_ns = wire::now_ns();
            }
            s.state = state;
            if error.is_some() {
                s.last_error = error;
            }
        }
        self.publish(true);
    }

    fn progress(&self, mount: &str, sent: Option<u64>, acked: Option<u64>) {
        {
            let mut s = self.inner.lock();
            let e = s.mounts.entry(mount.to_string()).or_default();
            if let Some(x) = sent {
                e.0 = x;
            }
            if let Some(x) = acked {
                e.1 = x;
            }
        }
        self.publish(false);
    }

    /// At most once a second unless forced (transitions).
    fn publish(&self, force: bool) {
        let v = {
            let mut s = self.inner.lock();
            if !force
                && s.published
                    .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
            {
                return;
            }
            s.published = Some(Instant::now());
            let mounts: serde_json::Map<String, Value> = s
                .mounts
                .iter()
                .map(|(k, (sent, acked))| {
                    (k.clone(), json!({"sent_seq": sent, "acked_seq": acked}))
                })
                .collect();
            json!({
                "state": s.state, "since_ns": s.since_ns, "tls": s.tls,
                "last_error": s.last_error, "mounts": mounts,
            })
        };
        self.agent.publish_state(v);
    }
}

// ---- The reconnect loop ---------------------------------------------------------

/// Jittered exponential backoff (no rand crate: a xorshift seeded from the clock).
struct Backoff {
    next: Duration,
    rng: u64,
}

impl Backoff {
    fn new() -> Backoff {
        Backoff {
            next: BACKOFF_FIRST,
            rng: ((wire::now_ns() as u64) ^ ((std::process::id() as u64) << 32)) | 1,
        }
    }

    fn reset(&mut self) {
        self.next = BACKOFF_FIRST;
    }

    /// Between half and all of the current step; the step doubles up to the cap.
    fn delay(&mut self) -> Duration {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let frac = 0.5 + (self.rng % 1000) as f64 / 2000.0;
        let d = self.next.mul_f64(frac).max(Duration::from_millis(100));
        self.next = (self.next * 2).min(BACKOFF_CAP);
        d
    }
}

/// How a session ended.
enum End {
    /// Never got a welcome (cannot connect, refused, misconfigured).
    Failed(String),
    /// Was connected, then lost the link.
    Lost(String),
}

async fn run<A: LinkAgent>(agent: Arc<A>) {
    let Some(cfg) = agent.link_config() else {
        return;
    };
    let caller = Caller::Coordinator {
        address: cfg.address.clone(),
    };
    let state = Arc::new(LinkState {
        agent: agent.clone(),
        inner: Mutex::new(StateInner::default()),
    });
    let mut backoff = Backoff::new();
    // The same failure every few seconds is logged once a minute.
    let mut last_failure: Option<(String, Instant)> = None;
    loop {
        state.set("connecting", None);
        match session(&agent, &cfg, &caller, &state).await {
            End::Failed(e) => {
                let repeat = last_failure
                    .as_ref()
                    .is_some_and(|(m, t)| *m == e && t.elapsed() < Duration::from_secs(60));
                if repeat {
                    tracing::debug!(address = %cfg.address, "coordinator link: {e}");
                } else {
                    tracing::error!(address = %cfg.address, "coordinator link: {e}");
                    last_failure = Some((e.clone(), Instant::now()));
                }
                state.set("disconnected", Some(e));
            }
            End::Lost(e) => {
                tracing::warn!(address = %cfg.address, "coordinator link lost: {e}; reconnecting");
                last_failure = None;
                backoff.reset();
                state.set("disconnected", Some(e));
            }
        }
        tokio::time::sleep(backoff.delay()).await;
    }
}

trait Conn: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Conn for T {}

/// Trust anchors from a PEM file.
pub fn client_tls(ca_file: &Path) -> Result<tokio_rustls::TlsConnector, String> {
    let f = std::fs::File::open(ca_file)
        .map_err(|e| format!("cannot read ca_file {}: {e}", ca_file.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut std::io::BufReader::new(f)) {
        let c = c.map_err(|e| format!("ca_file {}: not PEM: {e}", ca_file.display()))?;
        roots
            .add(c)
            .map_err(|e| format!("ca_file {}: unusable certificate: {e}", ca_file.display()))?;
    }
    if roots.is_empty() {
        return Err(format!(
            "ca_file {} holds no certificate",
            ca_file.display()
        ));
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(cfg)))
}

/// The host part of "host:port" / "[v6]:port".
fn host_of(address: &str) -> Option<&str> {
    crate::config::split_host_port(address).map(|(h, _)| h)
}

/// Connect (TCP, then TLS if configured) within the handshake timeout.
/// Without TLS only loopback is allowed: the token would travel in clear text.
async fn connect(cfg: &LinkConfig) -> Result<(Box<dyn Conn>, bool, SocketAddr), String> {
    let host = host_of(&cfg.address).ok_or_else(|| {
        format!(
            "invalid coordinator address {:?}: expected host:port",
            cfg.address
        )
    })?;
    let addrs: Vec<SocketAddr> = tokio::time::timeout(
        wire::HANDSHAKE_TIMEOUT,
        tokio::net::lookup_host(&cfg.address),
    )
    .await
    .map_err(|_| format!("resolving {} timed out", cfg.address))?
    .map_err(|e| format!("cannot resolve {}: {e}", cfg.address))?
    .collect();
    if addrs.is_empty() {
        return Err(format!("{} resolves to no address", cfg.address));
    }
    let tls = match &cfg.ca_file {
        Some(ca) => Some(client_tls(ca)?),
        None => {
            if let Some(a) = addrs.iter().find(|a| !a.ip().is_loopback()) {
                return Err(format!(
                    "refusing to send the coordinator token in clear text to {} ({}, not loopback): \
                     set ca_file (and server_name if needed) in [coordinator] to use TLS",
                    cfg.address,
                    a.ip()
                ));
            }
            None
        }
    };
    let mut last = String::new();
    let mut tcp = None;
    for a in &addrs {
        match tokio::time::timeout(wire::HANDSHAKE_TIMEOUT, TcpStream::connect(a)).await {
            Ok(Ok(s)) => {
                tcp = Some((s, *a));
                break;
            }
            Ok(Err(e)) => last = format!("cannot connect to {} ({a}): {e}", cfg.address),
            Err(_) => last = format!("connecting to {} ({a}) timed out", cfg.address),
        }
    }
    let (tcp, peer) = tcp.ok_or(last)?;
    let _ = tcp.set_nodelay(true);
    let Some(connector) = tls else {
        // Resolved as loopback above; the connected peer must be too.
        if !peer.ip().is_loopback() {
            return Err(format!(
                "refusing to send the token in clear text to {peer}"
            ));
        }
        return Ok((Box::new(tcp), false, peer));
    };
    let name = cfg.server_name.as_deref().unwrap_or(host).to_string();
    let server_name = rustls::pki_types::ServerName::try_from(name.clone())
        .map_err(|e| format!("invalid TLS server name {name:?}: {e}"))?;
    match tokio::time::timeout(wire::HANDSHAKE_TIMEOUT, connector.connect(server_name, tcp)).await {
        Ok(Ok(s)) => Ok((Box::new(s), true, peer)),
        Ok(Err(e)) => Err(format!(
            "TLS handshake with {} (as {name:?}) failed: {e}",
            cfg.address
        )),
        Err(_) => Err(format!("TLS handshake with {} timed out", cfg.address)),
    }
}

fn read_token(cfg: &LinkConfig) -> Result<String, String> {
    let path = cfg
        .token_file
        .as_ref()
        .ok_or("no token_file in [coordinator]: the coordinator refuses agents without a token")?;
    let tokens = wire::read_token_file(path).map_err(|e| format!("{e:#}"))?;
    Ok(tokens.into_iter().next().unwrap_or_default())
}

/// Each mount with its status and checkpoints, as the coordinator caller sees
/// them. Done after connecting (no calls, so no audit records, while the
/// coordinator is unreachable) and within `INVENTORY_TIMEOUT` in all, well
/// inside the coordinator's hello deadline; what does not answer in time is
/// registered with an error and no `journal_seq`.
async fn inventory<A: LinkAgent>(agent: &Arc<A>, caller: &Caller) -> Vec<MountInfo> {
    let deadline = tokio::time::Instant::now() + INVENTORY_TIMEOUT;
    let status =
        match tokio::time::timeout_at(deadline, agent.call_op(caller, AgentOp::Status)).await {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => json!({"error": e.message}),
            Err(_) => json!({"error": "status timed out"}),
        };
    let mut out = Vec::new();
    let mut lists = Vec::new();
    for (name, path) in agent.mount_list() {
        let entry = status
            .get("mounts")
            .and_then(Value::as_array)
            .and_then(|ms| {
                ms.iter()
                    .find(|m| m.get("name").and_then(Value::as_str) == Some(name.as_str()))
            });
        let st = entry
            .and_then(|e| e.get("status"))
            .filter(|s| !s.is_null())
            .cloned();
        let error = entry
            .and_then(|e| e.get("error"))
            .and_then(Value::as_str)
            .map(str::to_string)
            .or_else(|| {
                status
                    .get("error")
                    .and_then(Value::as_str)
                    .map(str::to_string)
            });
        // Checkpoint lists of all mounts at once.
        lists.push(st.is_some().then(|| {
            let (a, c) = (agent.clone(), caller.clone());
            let op = AgentOp::CheckpointList {
                mount: Some(name.clone()),
            };
            tokio::spawn(async move { a.call_op(&c, op).await })
        }));
        out.push(MountInfo {
            journal_seq: st
                .as_ref()
                .and_then(|s| s.get("journal_seq"))
                .and_then(Value::as_u64),
            name,
            path: path.display().to_string(),
            status: st,
            checkpoints: None,
            error,
        });
    }
    for (m, list) in out.iter_mut().zip(lists) {
        let Some(mut task) = list else { continue };
        match tokio::time::timeout_at(deadline, &mut task).await {
            Ok(Ok(Ok(v))) => m.checkpoints = Some(v),
            Ok(Ok(Err(e))) => m.error = Some(e.message),
            Ok(Err(e)) => m.error = Some(format!("checkpoint list failed: {e}")),
            Err(_) => {
                task.abort();
                m.error = Some("checkpoint list timed out".into());
            }
        }
    }
    out
}

async fn read_within<R: AsyncRead + Unpin>(r: &mut R, t: Duration) -> Result<Incoming, String> {
    match tokio::time::timeout(t, wire::read_message(r)).await {
        Err(_) => Err(format!("nothing received from the coordinator for {} s", t.as_secs())),
        Ok(Ok(i)) => Ok(i),
        Ok(Err(ReadError::Decode(DecodeError::Version { got, peer_error }))) => Err(match (got, peer_error) {
            (_, Some((code, msg))) => format!("the coordinator refused the connection ({code}): {msg}"),
            (Some(v), None) => format!(
                "the coordinator speaks protocol version {v}; this layerd speaks version {}: run matching versions",
                wire::PROTOCOL_VERSION
            ),
            (None, None) => "the coordinator sent a message without a protocol version: is it a layerfs-coordinator?".into(),
        }),
        Ok(Err(e)) => Err(e.to_string()),
    }
}

async fn session<A: LinkAgent>(
    agent: &Arc<A>,
    cfg: &LinkConfig,
    caller: &Caller,
    state: &Arc<LinkState<A>>,
) -> End {
    let token = match read_token(cfg) {
        Ok(t) => t,
        Err(e) => return End::Failed(e),
    };
    let (conn, tls, peer) = match connect(cfg).await {
        Ok(c) => c,
        Err(e) => return End::Failed(e),
    };
    state.inner.lock().tls = tls;
    let (mut rd, mut wr) = tokio::io::split(conn);
    let hello = Message::Hello(wire::Hello {
        token: wire::Secret(token),
        server_id: cfg.server_id.clone(),
        hostname: crate::config::hostname(),
        agent_version: env!("CARGO_PKG_VERSION").into(),
        mounts: inventory(agent, caller).await,
    });
    match tokio::time::timeout(
        wire::HANDSHAKE_TIMEOUT,
        wire::write_message(&mut wr, &hello),
    )
    .await
    {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return End::Failed(format!("sending hello to {peer} failed: {e}")),
        Err(_) => return End::Failed(format!("sending hello to {peer} timed out")),
    }
    let welcome = match read_within(&mut rd, wire::HANDSHAKE_TIMEOUT).await {
        Ok(Incoming::Message(Message::Welcome(w))) => w,
        Ok(Incoming::Message(Message::Error { code, message })) => {
            return End::Failed(format!(
                "the coordinator refused the connection ({code}): {message}"
            ))
        }
        Ok(Incoming::Message(m)) => {
            return End::Failed(format!("expected welcome, got {}", m.kind()))
        }
        Ok(Incoming::Closed) => {
            return End::Failed("the coordinator closed the connection during the handshake".into())
        }
        Err(e) => return End::Failed(e),
    };
    tracing::info!(address = %cfg.address, %peer, tls, cursors = ?welcome.cursors, "connected to the coordinator");
    state.set("connected", None);

    let (tx, rx) = mpsc::channel::<Message>(32);
    let commands = Arc::new(tokio::sync::Semaphore::new(MAX_COMMANDS));
    let mut tasks: JoinSet<String> = JoinSet::new();
    tasks.spawn(writer(wr, rx));
    let mut acked: HashMap<String, watch::Sender<u64>> = HashMap::new();
    for (name, _) in agent.mount_list() {
        let start = welcome.cursors.get(&name).copied().unwrap_or(0);
        let (atx, arx) = watch::channel(start);
        state.progress(&name, Some(start), Some(start));
        tasks.spawn(stream_mount(
            agent.clone(),
            caller.clone(),
            name.clone(),
            start,
            arx,
            tx.clone(),
            state.clone(),
        ));
        acked.insert(name, atx);
    }
    loop {
        tokio::select! {
            got = read_within(&mut rd, wire::PEER_TIMEOUT) => match got {
                Ok(Incoming::Message(Message::Ack { mount, seq })) => {
                    if let Some(a) = acked.get(&mount) {
                        a.send_replace(seq);
                        state.progress(&mount, None, Some(seq));
                    }
                }
                Ok(Incoming::Message(Message::Command { id, command })) => {
                    let slots = commands.clone();
                    tokio::spawn(execute(agent.clone(), caller.clone(), id, command, tx.clone(), slots));
                }
                Ok(Incoming::Message(Message::Ping { .. })) => {}
                Ok(Incoming::Message(Message::Error { code, message })) => {
                    return End::Lost(format!("the coordinator closed the link ({code}): {message}"))
                }
                Ok(Incoming::Message(m)) => return End::Lost(format!("unexpected {} message from the coordinator", m.kind())),
                Ok(Incoming::Closed) => return End::Lost("the coordinator closed the connection".into()),
                Err(e) => return End::Lost(e),
            },
            Some(done) = tasks.join_next() => {
                return End::Lost(done.unwrap_or_else(|e| format!("link task failed: {e}")));
            }
        }
    }
}

/// Sends queued messages, and a ping every heartbeat interval.
async fn writer<W: AsyncWrite + Unpin>(mut wr: W, mut rx: mpsc::Receiver<Message>) -> String {
    let mut tick = tokio::time::interval(wire::HEARTBEAT_INTERVAL);
    tick.tick().await;
    loop {
        let msg = tokio::select! {
            m = rx.recv() => match m { Some(m) => m, None => return "link closed".into() },
            _ = tick.tick() => Message::ping(),
        };
        match tokio::time::timeout(wire::PEER_TIMEOUT, wire::write_message(&mut wr, &msg)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return format!("sending to the coordinator failed: {e}"),
            Err(_) => {
                return format!(
                    "the coordinator took no data for {} s",
                    wire::PEER_TIMEOUT.as_secs()
                )
            }
        }
    }
}

/// Run one command and report its result (then the new inventory if it changed checkpoints).
async fn execute<A: LinkAgent>(
    agent: Arc<A>,
    caller: Caller,
    id: u64,
    command: AgentOp,
    tx: mpsc::Sender<Message>,
    slots: Arc<tokio::sync::Semaphore>,
) {
    // Commands beyond MAX_COMMANDS wait their turn.
    let Ok(_slot) = slots.acquire_owned().await else {
        return;
    };
    let changes = matches!(
        command,
        AgentOp::CheckpointCreate { .. }
            | AgentOp::CheckpointDelete { .. }
            | AgentOp::Rollback { .. }
            | AgentOp::Restore { .. }
            | AgentOp::Prune { .. }
    );
    let op = crate::roles::op_name(&command);
    let r = agent.call_op(&caller, command).await;
    match &r {
        Ok(_) => tracing::info!(id, op, "coordinator command done"),
        Err(e) => {
            tracing::warn!(id, op, code = %e.code, "coordinator command failed: {}", e.message)
        }
    }
    let ok = r.is_ok();
    let result = Message::Result(match r {
        Ok(v) => wire::CommandResult {
            id,
            ok: true,
            result: Some(v),
            error: None,
        },
        Err(e) => wire::CommandResult {
            id,
            ok: false,
            result: None,
            error: Some(e),
        },
    });
    if tx.send(result).await.is_err() {
        tracing::warn!(
            id,
            op,
            "the link went down before the command's result could be reported"
        );
        return;
    }
    if changes && ok {
        let mounts = inventory(&agent, &caller).await;
        let _ = tx.send(Message::Inventory { mounts }).await;
    }
}

/// Stream one mount's journal from `start + 1`, in batches, at most `WINDOW`
/// records ahead of the acknowledgements. Returns only if the link is gone.
async fn stream_mount<A: LinkAgent>(
    agent: Arc<A>,
    caller: Caller,
    mount: String,
    start: u64,
    mut acked: watch::Receiver<u64>,
    tx: mpsc::Sender<Message>,
    state: Arc<LinkState<A>>,
) -> String {
    let mut next = start + 1;
    let mut retry = Duration::from_secs(1);
    let mut last_error: Option<String> = None;
    loop {
        let mut rx = match agent.follow_mount(&caller, mount.clone(), next).await {
            Ok(rx) => {
                retry = Duration::from_secs(1);
                if last_error.take().is_some() {
                    tracing::info!(mount = %mount, from_seq = next, "following the mount's journal again");
                }
                rx
            }
            Err(e) => {
                if last_error.as_deref() != Some(e.message.as_str()) {
                    tracing::warn!(mount = %mount, "cannot follow the mount's journal: {}; retrying", e.message);
                    last_error = Some(e.message);
                }
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        loop {
            // Flow control: wait while WINDOW records are unacknowledged.
            loop {
                let a = *acked.borrow_and_update();
                if next <= a.saturating_add(WINDOW) {
                    break;
                }
                if acked.changed().await.is_err() {
                    return "link closed".into();
                }
            }
            let Some(first) = rx.recv().await else {
                break;
            };
            let mut bytes = approx_size(&first);
            let mut batch = vec![first];
            // While earlier records are unacknowledged (the coordinator is
            // busy storing), gather a little longer: fewer, larger batches.
            // An idle link sends at once.
            let busy = next > acked.borrow().saturating_add(1);
            let deadline = tokio::time::Instant::now() + if busy { LINGER } else { Duration::ZERO };
            while batch.len() < wire::MAX_BATCH_RECORDS && bytes < wire::MAX_BATCH_BYTES {
                let r = match rx.try_recv() {
                    Ok(r) => r,
                    Err(mpsc::error::TryRecvError::Disconnected) => break,
                    Err(mpsc::error::TryRecvError::Empty) if busy => {
                        match tokio::time::timeout_at(deadline, rx.recv()).await {
                            Ok(Some(r)) => r,
                            _ => break,
                        }
                    }
                    Err(mpsc::error::TryRecvError::Empty) => break,
                };
                bytes += approx_size(&r);
                batch.push(r);
            }
            batch.retain(|r| r.seq >= next);
            let Some(last) = batch.last().map(|r| r.seq) else {
                continue;
            };
            next = last + 1;
            if tx
                .send(Message::Records {
                    mount: mount.clone(),
                    records: batch,
                })
                .await
                .is_err()
            {
                return "link closed".into();
            }
            state.progress(&mount, Some(last), None);
        }
        // The follow stream ended (mount unmounted, restarted): follow again from here.
        tracing::warn!(mount = %mount, from_seq = next, "the mount's journal stream ended; following again");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn approx_size(r: &JournalRecord) -> usize {
    160 + r.path.len()
        + r.path2.as_ref().map_or(0, |p| p.len())
        + r.comm.len()
        + r.detail.as_ref().map_or(0, |d| d.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_jittered_and_capped() {
        let mut b = Backoff::new();
        let mut prev_max = Duration::ZERO;
        for i in 0..20 {
            let d = b.delay();
            assert!(d >= Duration::from_millis(100), "{i}: {d:?}");
            assert!(d <= BACKOFF_CAP, "{i}: {d:?}");
            prev_max = prev_max.max(d);
        }
        assert!(prev_max >= BACKOFF_CAP / 2);
        b.reset();
        assert!(b.delay() <= BACKOFF_FIRST);
    }

    #[test]
    fn hosts() {
        assert_eq!(host_of("10.0.0.5:7443"), Some("10.0.0.5"));
        assert_eq!(host_of("[::1]:7443"), Some("::1"));
        assert_eq!(host_of("coord.example:1"), Some("coord.example"));
        assert_eq!(host_of("nope"), None);
    }

    #[tokio::test]
    async fn refuses_clear_text_to_non_loopback_without_connecting() {
        let cfg = LinkConfig {
            server_id: "s".into(),
            // TEST-NET-1: nothing answers; a connect attempt would hang.
            address: "192.0.2.77:7443".into(),
            token_file: None,
            ca_file: None,
            server_name: None,
        };
        let t = Instant::now();
        let e = connect(&cfg).await.err().unwrap();
        assert!(
            e.contains("refusing to send the coordinator token in clear text"),
            "{e}"
        );
        assert!(t.elapsed() < Duration::from_secs(1));
    }

    // ---- In-process: a fake agent (journal in memory) against a real coordinator ----

    use crate::coordinator::{self, Running};
    use crate::Role;
    use tokio::sync::Notify;

    struct FakeAgent {
        cfg: LinkConfig,
        role: Role,
        journal: Mutex<Vec<JournalRecord>>,
        grew: Notify,
        follows: std::sync::atomic::AtomicUsize,
        state: Mutex<Value>,
        me: std::sync::Weak<FakeAgent>,
    }

    use crate::wire::tests::rec;

    impl FakeAgent {
        fn append(&self, n: u64) {
            let mut j = self.journal.lock();
            let base = j.len() as u64;
            for i in 1..=n {
                j.push(rec(base + i));
            }
            drop(j);
            self.grew.notify_waiters();
        }
    }

    impl LinkAgent for FakeAgent {
        fn link_config(&self) -> Option<LinkConfig> {
            Some(self.cfg.clone())
        }
        fn mount_list(&self) -> Vec<(String, PathBuf)> {
            vec![("root".into(), PathBuf::from("/srv/root"))]
        }
        fn call_op(
            &self,
            _caller: &Caller,
            op: AgentOp,
        ) -> impl Future<Output = Result<Value, AgentError>> + Send {
            let seq = self.journal.lock().len() as u64;
            let needed = match &op {
                AgentOp::Rollback { .. } => Role::Manager,
                AgentOp::CheckpointCreate { .. } => Role::User,
                _ => Role::Monitor,
            };
            let role = self.role;
            async move {
                if role < needed {
                    return Err(AgentError {
                        code: "permission_denied".into(),
                        message: format!("needs role {needed:?}"),
                        required_role: Some(needed),
                    });
                }
                Ok(match op {
                    AgentOp::Status => {
                        json!({"mounts": [{"name": "root", "path": "/srv/root", "status": {"journal_seq": seq}, "error": null}]})
                    }
                    AgentOp::CheckpointList { .. } => json!([]),
                    other => json!({"did": crate::roles::op_name(&other)}),
                })
            }
        }
        fn follow_mount(
            &self,
            _caller: &Caller,
            _mount: String,
            from_seq: u64,
        ) -> impl Future<Output = Result<mpsc::Receiver<JournalRecord>, AgentError>> + Send
        {
            self.follows
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let (tx, rx) = mpsc::channel(1024);
            let me = self.me.upgrade().expect("fake agent alive");
            tokio::spawn(async move {
                let mut next = from_seq.max(1);
                loop {
                    let grew = me.grew.notified();
                    let batch: Vec<JournalRecord> = me
                        .journal
                        .lock()
                        .iter()
                        .skip(next as usize - 1)
                        .cloned()
                        .collect();
                    for r in batch {
                        next = r.seq + 1;
                        if tx.send(r).await.is_err() {
                            return;
                        }
                    }
                    tokio::select! {
                        _ = grew => {}
                        _ = tx.closed() => return,
                    }
                }
            });
            async move { Ok(rx) }
        }
        fn publish_state(&self, state: Value) {
            *self.state.lock() = state;
        }
    }

    struct Setup {
        dir: tempfile::TempDir,
        agent: Arc<FakeAgent>,
        addr: SocketAddr,
    }

    async fn start_coordinator(dir: &Path, addr: SocketAddr) -> Running {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // The previous coordinator's store lock goes with its last task.
            match coordinator::start(coordinator::Config {
                listen: addr,
                data_dir: dir.join("data"),
                tokens: vec!["good-token".into()],
                tls: None,
                admin_socket: None,
            })
            .await
            {
                Ok(r) => return r,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("{e:#}"),
            }
        }
    }

    fn setup(role: Role, token: &str) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), format!("{token}\n")).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let agent = Arc::new_cyclic(|me| FakeAgent {
            cfg: LinkConfig {
                server_id: "fake01".into(),
                address: addr.to_string(),
                token_file: Some(dir.path().join("token")),
                ca_file: None,
                server_name: None,
            },
            role,
            journal: Mutex::new(Vec::new()),
            grew: Notify::new(),
            follows: Default::default(),
            state: Mutex::new(Value::Null),
            me: me.clone(),
        });
        Setup { dir, agent, addr }
    }

    async fn wait_stored(running: &Running, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let c = match running
                .coordinator
                .store()
                .existing_log("fake01", "root")
                .unwrap()
            {
                Some(l) => l.lock().cursor(),
                None => Default::default(),
            };
            if c.last_seq >= n {
                assert_eq!(c.count, c.last_seq, "every seq once");
                return;
            }
            assert!(Instant::now() < deadline, "stored {c:?}, want {n}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A rollback to "cp" on the fake agent, through the coordinator.
    async fn rollback_cp(
        running: &Running,
    ) -> Result<crate::wire::CommandResult, crate::coordinator::AdminError> {
        let op = AgentOp::Rollback {
            mount: None,
            name: "cp".into(),
        };
        running
            .coordinator
            .command("fake01", op, Duration::from_secs(10))
            .await
    }

    fn stored_seqs(running: &Running) -> Vec<u64> {
        let l = running
            .coordinator
            .store()
            .existing_log("fake01", "root")
            .unwrap()
            .unwrap();
        let l = l.lock();
        l.read(0, u64::MAX).unwrap().iter().map(|r| r.seq).collect()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn streams_resumes_after_coordinator_restart_and_runs_commands() {
        let s = setup(Role::Manager, "good-token");
        s.agent.append(5000);
        let running = start_coordinator(s.dir.path(), s.addr).await;
        let link = spawn_link(s.agent.clone());
        wait_stored(&running, 5000).await;
        assert_eq!(s.agent.state.lock()["state"], "connected");

        // A command, through the coordinator, with its result.
        let r = rollback_cp(&running).await.unwrap();
        assert!(r.ok, "{r:?}");
        assert_eq!(r.result.unwrap()["did"], "rollback");

        // Coordinator gone; the journal grows; a new coordinator on the same data.
        running.shutdown();
        s.agent.append(500);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let running = start_coordinator(s.dir.path(), s.addr).await;
        wait_stored(&running, 5500).await;
        assert_eq!(stored_seqs(&running), (1..=5500).collect::<Vec<_>>());
        // Live records after the catch-up.
        s.agent.append(3);
        wait_stored(&running, 5503).await;
        link.abort();
        running.shutdown();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn monitor_role_is_denied_and_reported() {
        let s = setup(Role::Monitor, "good-token");
        let running = start_coordinator(s.dir.path(), s.addr).await;
        let link = spawn_link(s.agent.clone());
        let deadline = Instant::now() + Duration::from_secs(10);
        let r = loop {
            match rollback_cp(&running).await {
                Ok(r) => break r,
                Err(e) if e.code == "not_connected" && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(e) => panic!("{e:?}"),
            }
        };
        assert!(!r.ok);
        assert_eq!(r.error.unwrap().code, "permission_denied");
        // Logged on the coordinator's side.
        let log = std::fs::read_to_string(s.dir.path().join("data/servers/fake01/commands.jsonl"))
            .unwrap();
        assert!(log.contains("permission_denied"), "{log}");
        link.abort();
        running.shutdown();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn wrong_token_is_refused() {
        let s = setup(Role::Manager, "bad-token");
        s.agent.append(10);
        let running = start_coordinator(s.dir.path(), s.addr).await;
        let link = spawn_link(s.agent.clone());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let st = s.agent.state.lock().clone();
            if st["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("unauthorized"))
            {
                break;
            }
            assert!(Instant::now() < deadline, "{st}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(s.agent.follows.load(std::sync::atomic::Ordering::SeqCst), 0);
        assert!(running
            .coordinator
            .store()
            .existing_log("fake01", "root")
            .unwrap()
            .is_none());
        link.abort();
        running.shutdown();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_journal_that_starts_over_gets_a_new_log() {
        let s = setup(Role::Manager, "good-token");
        s.agent.append(100);
        let running = start_coordinator(s.dir.path(), s.addr).await;
        let link = spawn_link(s.agent.clone());
        wait_stored(&running, 100).await;
        link.abort();
        // A new journal (new state directory): seqs start again at 1.
        s.agent.journal.lock().clear();
        s.agent.append(10);
        let link = spawn_link(s.agent.clone());
        let deadline = Instant::now() + Duration::from_secs(20);
        while stored_seqs(&running) != (1..=10).collect::<Vec<_>>() {
            assert!(Instant::now() < deadline, "{:?}", stored_seqs(&running));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let kept = std::fs::read_dir(s.dir.path().join("data/servers/fake01/mounts/root"))
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| n.starts_with("changes.1"))
            .collect::<Vec<_>>();
        assert_eq!(kept.len(), 1, "{kept:?}");
        link.abort();
        running.shutdown();
    }
}
