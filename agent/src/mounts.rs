//! Each configured mount's layerfs control socket: a small pool of blocking
//! clients, bounded so the agent never takes more than its share of the
//! mount's connections (a layerfs serves at most 64 at once).

use std::sync::Arc;
use std::time::Duration;

use layerfs::control::client::{Client, ClientError};
use layerfs::control::proto::{ErrorCode, JournalRecord, Op};
use parking_lot::Mutex;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use crate::config::MountConfig;
use crate::AgentError;

/// Read-only calls at once per mount (pooled connections).
pub const QUICK_CALLS: usize = 12;
/// Long or state-changing calls at once per mount (own connection each;
/// layerfs runs one state change at a time anyway and answers `busy`).
pub const SLOW_CALLS: usize = 4;
/// Journal followers per mount (one connection and one thread each).
pub const FOLLOWERS: usize = 32;
/// A quick call that gets no answer for this long fails (the mount hangs).
pub const QUICK_TIMEOUT: Duration = Duration::from_secs(60);
/// Status is what monitoring polls: it must fail fast.
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(5);
/// Records buffered between a follower's reader thread and its consumer.
pub const FOLLOW_BUFFER: usize = 1024;

pub struct MountHandle {
    pub cfg: MountConfig,
    idle: Mutex<Vec<Client>>,
    /// Status requests waiting for the next status call (see `status`).
    status_waiters: Mutex<StatusFlight>,
    quick: Arc<Semaphore>,
    slow: Arc<Semaphore>,
    followers: Arc<Semaphore>,
}

/// How an operation uses the mount's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Read-only and short: pooled connection, retried once on a fresh one
    /// if a pooled connection turns out dead.
    Quick,
    /// State-changing or long: a fresh connection, no read timeout, no retry.
    Slow,
}

/// One status call's answer, shared by everyone who waited for it.
pub type StatusResult = Arc<Result<Value, AgentError>>;
type StatusReply = oneshot::Sender<StatusResult>;

#[derive(Default)]
struct StatusFlight {
    running: bool,
    next: Vec<StatusReply>,
}

impl MountHandle {
    pub fn new(cfg: MountConfig) -> MountHandle {
        MountHandle {
            cfg,
            idle: Mutex::new(Vec::new()),
            status_waiters: Mutex::new(StatusFlight::default()),
            quick: Arc::new(Semaphore::new(QUICK_CALLS)),
            slow: Arc::new(Semaphore::new(SLOW_CALLS)),
            followers: Arc::new(Semaphore::new(FOLLOWERS)),
        }
    }

    /// "mount root (/srv/root)"
    pub fn describe(&self) -> String {
        format!("mount {} ({})", self.cfg.name, self.cfg.path.display())
    }

    /// Run `op` on the mount's control socket.
    pub async fn call(
        self: &Arc<Self>,
        op: Op,
        kind: Kind,
        timeout: Duration,
    ) -> Result<Value, AgentError> {
        let sem = match kind {
            Kind::Quick => self.quick.clone(),
            Kind::Slow => self.slow.clone(),
        };
        let permit = sem
            .acquire_owned()
            .await
            .map_err(|_| internal("connection limiter closed"))?;
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            me.call_blocking(op, kind, timeout)
        })
        .await
        .map_err(|e| internal(&format!("control socket call failed: {e}")))?
    }

    /// The mount's status, with concurrent requests sharing calls: a request
    /// joins the next call to start (never one already running, so the
    /// answer is never older than the request). Under a burst of monitoring
    /// polls the mount sees at most one status call at a time.
    pub async fn status(self: &Arc<Self>) -> Result<Value, AgentError> {
        match self.status_start().await {
            Ok(r) => (*r).clone(),
            Err(_) => Err(internal("status call abandoned")),
        }
    }

    /// Join the next status call now (starting it if none runs); the
    /// answer comes on the returned channel. Lets a caller start several
    /// mounts' calls before waiting for any.
    pub fn status_start(self: &Arc<Self>) -> oneshot::Receiver<StatusResult> {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut f = self.status_waiters.lock();
            f.next.push(tx);
            !std::mem::replace(&mut f.running, true)
        };
        if start {
            let me = self.clone();
            tokio::spawn(async move {
                loop {
                    let batch = std::mem::take(&mut me.status_waiters.lock().next);
                    if batch.is_empty() {
                        let mut f = me.status_waiters.lock();
                        if f.next.is_empty() {
                            f.running = false;
                            return;
                        }
                        continue;
                    }
                    // Shared, not copied here: each waiter copies what it
                    // needs on its own thread.
                    let r = Arc::new(me.call(Op::Status, Kind::Quick, STATUS_TIMEOUT).await);
                    for w in batch {
                        let _ = w.send(r.clone());
                    }
                }
            });
        }
        rx
    }

    fn call_blocking(&self, op: Op, kind: Kind, timeout: Duration) -> Result<Value, AgentError> {
        let pooled = match kind {
            Kind::Quick => self.idle.lock().pop(),
            Kind::Slow => None,
        };
        let reused = pooled.is_some();
        let mut client = match pooled {
            Some(c) => c,
            None => self.connect()?,
        };
        let t = (kind == Kind::Quick).then_some(timeout);
        let mut res = client
            .set_read_timeout(t)
            .and_then(|_| client.call(op.clone()));
        // A pooled connection may have died with its layerfs (remount): a
        // read-only call is safe to send again on a fresh one.
        if reused && matches!(res, Err(ClientError::Io(_))) {
            client = self.connect()?;
            res = client.set_read_timeout(t).and_then(|_| client.call(op));
        }
        match &res {
            Ok(_) | Err(ClientError::Api(_)) if kind == Kind::Quick => {
                let mut idle = self.idle.lock();
                if idle.len() < QUICK_CALLS {
                    idle.push(client);
                }
            }
            _ => {}
        }
        res.map_err(|e| self.error(e))
    }

    fn connect(&self) -> Result<Client, AgentError> {
        Client::connect(&self.cfg.socket).map_err(|e| self.error(e))
    }

    /// Journal records from `from_seq` on, sent to `tx` by a thread of its
    /// own until `tx`'s receiver is dropped (noticed at the next record or
    /// heartbeat, at least once a second) or the mount goes away.
    pub fn start_follow(
        self: &Arc<Self>,
        from_seq: u64,
        tx: mpsc::Sender<JournalRecord>,
    ) -> Result<(), AgentError> {
        let permit: OwnedSemaphorePermit =
            self.followers
                .clone()
                .try_acquire_owned()
                .map_err(|_| AgentError {
                    code: "busy".into(),
                    message: format!(
                        "{}: {FOLLOWERS} followers already; try again later",
                        self.describe()
                    ),
                    required_role: None,
                })?;
        let mut client = self.connect()?;
        // Heartbeats come every second: silence this long means a hung mount.
        client
            .set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| self.error(e))?;
        let name = self.cfg.name.clone();
        let what = self.describe();
        std::thread::Builder::new()
            .name(format!("follow-{name}"))
            .spawn(move || {
                let _permit = permit;
                let mut bad = 0u64;
                let r = client.call_stream(Op::Follow { from_seq }, &mut |ev| {
                    if ev.get("heartbeat").is_some() {
                        return !tx.is_closed();
                    }
                    match serde_json::from_value::<JournalRecord>(ev) {
                        Ok(rec) => tx.blocking_send(rec).is_ok(),
                        Err(e) => {
                            bad += 1;
                            if bad == 1 {
                                tracing::warn!("{what}: unreadable journal event skipped: {e}");
                            }
                            true
                        }
                    }
                });
                match r {
                    Ok(_) => tracing::debug!("{what}: follower ended"),
                    Err(e) => tracing::warn!("{what}: journal follow ended: {e}"),
                }
            })
            .map_err(|e| internal(&format!("cannot start a follower thread: {e}")))?;
        Ok(())
    }

    /// An error of the control socket as the API reports it, naming the mount.
    pub fn error(&self, e: ClientError) -> AgentError {
        let what = self.describe();
        match e {
            ClientError::Connect(m) => unavailable(format!("{what}: {m}")),
            ClientError::Io(_) => unavailable(format!("{what}: {e}")),
            ClientError::Protocol(m) => AgentError {
                code: "internal".into(),
                message: format!("{what}: protocol error: {m} (are layerd and the mounted layerfs the same version?)"),
                required_role: None,
            },
            ClientError::Api(a) => match a.code {
                // layerd itself may not use the socket: not the caller's fault.
                ErrorCode::PermissionDenied => unavailable(format!("{what}: {}", a.message)),
                ErrorCode::Version => AgentError {
                    code: "internal".into(),
                    message: format!("{what}: {}", a.message),
                    required_role: None,
                },
                code => AgentError {
                    code: code_name(code),
                    message: a.message,
                    required_role: None,
                },
            },
        }
    }
}

/// The snake_case name of a layerfs error code ("not_found").
pub fn code_name(c: ErrorCode) -> String {
    serde_json::to_value(c)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| "internal".into())
}

pub fn unavailable(message: String) -> AgentError {
    AgentError {
        code: "unavailable".into(),
        message,
        required_role: None,
    }
}

pub fn internal(m: &str) -> AgentError {
    AgentError {
        code: "internal".into(),
        message: m.to_string(),
        required_role: None,
    }
}
