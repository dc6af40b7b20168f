//! The agent core: one operation, role-checked, run on a mount's control
//! socket and audited. The local HTTP API and the coordinator link both go
//! through `Agent::call` / `Agent::follow`, so the rules cannot diverge.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use layerfs::control::proto::{JournalRecord, Op};
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::sync::{mpsc, Notify};

use crate::audit::{AuditLog, AuditRecord, AuditResult, MAX_LIMIT};
use crate::config::AgentConfig;
use crate::mounts::{internal, Kind, MountHandle, QUICK_TIMEOUT};
use crate::roles::{self, op_name, FOLLOW_OP};
use crate::{AgentError, AgentOp, Caller, Role};

pub struct Agent {
    config: AgentConfig,
    mounts: Vec<Arc<MountHandle>>,
    audit: AuditLog,
    started: Instant,
    /// What the coordinator link reports about itself (shown in status).
    link_state: Mutex<Option<Value>>,
    /// Calls running (their audit record not written yet), for shutdown.
    inflight: AtomicUsize,
    idle: Notify,
    /// For `call(&self)` to run the operation in a task of its own, which a
    /// caller that goes away (timeout, disconnect) cannot cancel halfway.
    me: Weak<Agent>,
}

struct Inflight(Arc<Agent>);

impl Drop for Inflight {
    fn drop(&mut self) {
        if self.0.inflight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

fn bad_request(m: String) -> AgentError {
    AgentError {
        code: "bad_request".into(),
        message: m,
        required_role: None,
    }
}

impl Agent {
    /// Opens the audit log (`state_dir/audit`).
    pub fn new(config: AgentConfig) -> anyhow::Result<Arc<Agent>> {
        let audit = AuditLog::open(&config.state_dir.join("audit"))?;
        let mounts = config
            .mounts
            .iter()
            .cloned()
            .map(|m| Arc::new(MountHandle::new(m)))
            .collect();
        Ok(Arc::new_cyclic(|me| Agent {
            config,
            mounts,
            audit,
            started: Instant::now(),
            link_state: Mutex::new(None),
            inflight: AtomicUsize::new(0),
            idle: Notify::new(),
            me: me.clone(),
        }))
    }

    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

    pub fn audit_log(&self) -> &AuditLog {
        &self.audit
    }

    /// Mount names and paths (for registration with the coordinator).
    pub fn mounts(&self) -> Vec<(String, PathBuf)> {
        self.mounts
            .iter()
            .map(|m| (m.cfg.name.clone(), m.cfg.path.clone()))
            .collect()
    }

    /// Role of a caller: Local by grants (uid 0 = Manager); Coordinator =
    /// config.coordinator.role.
    pub fn role_of(&self, caller: &Caller) -> Option<Role> {
        match caller {
            Caller::Local {
                uid, gid, groups, ..
            } => roles::local_role(&self.config.grants, *uid, *gid, groups),
            Caller::Coordinator { .. } => self.config.coordinator.as_ref().map(|c| c.role),
        }
    }

    /// The coordinator link publishes its state here (shown by status as
    /// `agent.coordinator.state`).
    pub fn set_link_state(&self, state: Value) {
        *self.link_state.lock() = Some(state);
    }

    fn handle(&self, name: Option<&str>) -> Result<&Arc<MountHandle>, AgentError> {
        let cfg = self.config.mount(name)?;
        self.mounts
            .iter()
            .find(|m| m.cfg.name == cfg.name)
            .ok_or_else(|| internal("mount table out of sync"))
    }

    fn enter(&self) -> Result<Inflight, AgentError> {
        let me = self
            .me
            .upgrade()
            .ok_or_else(|| internal("agent is shutting down"))?;
        me.inflight.fetch_add(1, Ordering::SeqCst);
        Ok(Inflight(me))
    }

    /// Wait until no call is running (their audit records are written), at
    /// most `limit`. True if none is left.
    pub async fn drain(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.idle.notified();
            if self.inflight.load(Ordering::SeqCst) == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.inflight.load(Ordering::SeqCst) == 0;
            }
        }
    }

    /// Check the role, run the operation on the mount's control socket
    /// (blocking client in spawn_blocking), audit it (ok / denied / error,
    /// duration). Never panics on bad input. The operation runs in a task of
    /// its own: dropping this future does not stop it or its audit record.
    pub async fn call(&self, caller: &Caller, op: AgentOp) -> Result<Value, AgentError> {
        let guard = self.enter()?;
        let caller = caller.clone();
        let task = tokio::spawn(async move {
            let agent = guard.0.clone();
            let r = agent.call_audited(&caller, op).await;
            drop(guard);
            r
        });
        task.await
            .map_err(|e| internal(&format!("the operation failed unexpectedly: {e}")))?
    }

    async fn call_audited(&self, caller: &Caller, op: AgentOp) -> Result<Value, AgentError> {
        let start = Instant::now();
        let time_ns = now_ns();
        let name = op_name(&op);
        let role = self.role_of(caller);
        let needed = roles::required_role(&op, caller);
        let mount = op_mount(&op).map(|m| match self.config.mount(Some(m)) {
            Ok(c) => c.name.clone(),
            Err(_) => m.to_string(),
        });
        let args = op_args(&op);
        let sync = roles::changes_state(&op);
        let res = if role.is_some_and(|r| r >= needed) {
            self.run(caller, role.unwrap_or(Role::Monitor), op).await
        } else {
            Err(roles::denied(name, needed, caller, role))
        };
        let info = CallInfo {
            caller,
            role,
            op: name,
            mount,
            args,
            time_ns,
        };
        self.record(
            info.finished(&res, start.elapsed().as_secs_f64() * 1000.0),
            sync,
        )
        .await;
        res
    }

    /// Append to the audit log (synced for denied and state-changing
    /// calls). A failed audit write is logged; the call's answer stands.
    async fn record(&self, rec: AuditRecord, sync: bool) {
        let sync = sync || rec.result == AuditResult::Denied;
        let (op, res) = (rec.op.clone(), rec.result);
        if let Err(e) = self.audit.record(rec, sync).await {
            tracing::error!(op, result = ?res, "audit record lost: {e:#}");
        }
    }

    async fn run(&self, caller: &Caller, role: Role, op: AgentOp) -> Result<Value, AgentError> {
        let (mount, lop, kind) = match op {
            AgentOp::Status => return Ok(self.status(caller, role).await),
            AgentOp::Audit { mut query } => {
                if query.limit.is_some_and(|l| l == 0 || l > MAX_LIMIT) {
                    return Err(bad_request(format!("limit must be 1 to {MAX_LIMIT}")));
                }
                roles::filter_own(&mut query, caller, role);
                let me = self
                    .me
                    .upgrade()
                    .ok_or_else(|| internal("agent is shutting down"))?;
                let recs = tokio::task::spawn_blocking(move || me.audit.query(&query))
                    .await
                    .map_err(|e| internal(&format!("audit query failed: {e}")))?
                    .map_err(|e| internal(&format!("{e:#}")))?;
                return serde_json::to_value(recs).map_err(|e| internal(&e.to_string()));
            }
            AgentOp::Changes { mount, query } => (mount, Op::Journal { query }, Kind::Quick),
            AgentOp::CheckpointList { mount } => (mount, Op::CheckpointList, Kind::Quick),
            AgentOp::CheckpointShow { mount, name } => {
                (mount, Op::CheckpointShow { name }, Kind::Quick)
            }
            AgentOp::CheckpointCreate {
                mount,
                name,
                message,
            } => (mount, Op::CheckpointCreate { name, message }, Kind::Slow),
            AgentOp::CheckpointDiff { mount, a, b } => {
                (mount, Op::CheckpointDiff { a, b }, Kind::Slow)
            }
            AgentOp::CheckpointDelete { mount, name } => {
                (mount, Op::CheckpointDelete { name }, Kind::Slow)
            }
            AgentOp::Rollback { mount, name } => (mount, Op::Rollback { name }, Kind::Slow),
            AgentOp::Restore { mount, name, paths } => {
                if paths.is_empty() {
                    return Err(bad_request("restore needs at least one path".into()));
                }
                (mount, Op::Restore { name, paths }, Kind::Slow)
            }
            AgentOp::Verify { mount } => (mount, Op::Verify, Kind::Slow),
            AgentOp::Prune { mount, policy } => (mount, Op::Prune { policy }, Kind::Slow),
        };
        let h = self.handle(mount.as_deref())?;
        // Slow calls wait as long as the mount takes (rollback, verify).
        h.call(lop, kind, QUICK_TIMEOUT).await
    }

    /// The agent and every mount; a mount that cannot be reached has
    /// `status: null` and the reason in `error`.
    async fn status(&self, caller: &Caller, role: Role) -> Value {
        // Every mount's call is under way before waiting for the first.
        let pending: Vec<_> = self.mounts.iter().map(|m| m.status_start()).collect();
        let mut mounts = Vec::with_capacity(pending.len());
        for (m, rx) in self.mounts.iter().zip(pending) {
            let (status, error) = match rx.await.as_deref() {
                Ok(Ok(v)) => (v.clone(), Value::Null),
                Ok(Err(e)) => (Value::Null, Value::String(e.message.clone())),
                Err(_) => (Value::Null, Value::String("status call abandoned".into())),
            };
            mounts.push(json!({
                "name": m.cfg.name,
                "path": m.cfg.path,
                "socket": m.cfg.socket,
                "status": status,
                "error": error,
            }));
        }
        let coordinator = self.config.coordinator.as_ref().map(|c| {
            json!({
                "address": c.address,
                "role": c.role,
                "state": self.link_state.lock().clone(),
            })
        });
        json!({
            "agent": {
                "server_id": self.config.server_id,
                "version": env!("CARGO_PKG_VERSION"),
                "pid": std::process::id(),
                "uptime_s": self.started.elapsed().as_secs(),
                "socket": self.config.socket,
                "audit_seq": self.audit.last_seq(),
                "coordinator": coordinator,
                "caller": {"who": caller, "role": role},
            },
            "mounts": mounts,
        })
    }

    /// Journal records of `mount` from `from_seq` on, as they are written (a
    /// blocking thread runs the layerfs `Follow` stream); role checked
    /// (monitor) and audited once. Ends when the receiver is dropped.
    pub async fn follow(
        &self,
        caller: &Caller,
        mount: Option<String>,
        from_seq: u64,
    ) -> Result<mpsc::Receiver<JournalRecord>, AgentError> {
        self.follow_from(caller, mount, Some(from_seq)).await
    }

    /// As `follow`; `from_seq` None = only records written from now on.
    pub async fn follow_from(
        &self,
        caller: &Caller,
        mount: Option<String>,
        from_seq: Option<u64>,
    ) -> Result<mpsc::Receiver<JournalRecord>, AgentError> {
        let guard = self.enter()?;
        let start = Instant::now();
        let time_ns = now_ns();
        let role = self.role_of(caller);
        let mount_name = mount.as_deref().map(|m| match self.config.mount(Some(m)) {
            Ok(c) => c.name.clone(),
            Err(_) => m.to_string(),
        });
        let args = json!({ "mount": mount, "from_seq": from_seq });
        let res = if role.is_some_and(|r| r >= Role::Monitor) {
            self.start_follow(mount.as_deref(), from_seq).await
        } else {
            Err(roles::denied(FOLLOW_OP, Role::Monitor, caller, role))
        };
        let info = CallInfo {
            caller,
            role,
            op: FOLLOW_OP,
            mount: mount_name,
            args,
            time_ns,
        };
        self.record(
            info.finished(&res, start.elapsed().as_secs_f64() * 1000.0),
            false,
        )
        .await;
        drop(guard);
        res
    }

    /// A call refused before it could become an `AgentOp` (malformed
    /// request, body too large): denied if the caller lacks `needed` (the
    /// role check comes first), else `err`. Audited either way; returns the
    /// error to answer with.
    pub async fn refuse(
        &self,
        caller: &Caller,
        op: &str,
        needed: Role,
        mount: Option<String>,
        args: Value,
        err: AgentError,
    ) -> AgentError {
        let time_ns = now_ns();
        let role = self.role_of(caller);
        let e = if role.is_some_and(|r| r >= needed) {
            err
        } else {
            roles::denied(op, needed, caller, role)
        };
        let res: Result<(), AgentError> = Err(e);
        let info = CallInfo {
            caller,
            role,
            op,
            mount,
            args,
            time_ns,
        };
        self.record(info.finished(&res, 0.0), false).await;
        res.err()
            .unwrap_or_else(|| internal("refusal without an error"))
    }

    async fn start_follow(
        &self,
        mount: Option<&str>,
        from_seq: Option<u64>,
    ) -> Result<mpsc::Receiver<JournalRecord>, AgentError> {
        let h = self.handle(mount)?.clone();
        let from = match from_seq {
            Some(s) => s,
            None => {
                let st = h.status().await?;
                st.get("journal_seq").and_then(Value::as_u64).unwrap_or(0) + 1
            }
        };
        let (tx, rx) = mpsc::channel(crate::mounts::FOLLOW_BUFFER);
        tokio::task::spawn_blocking(move || h.start_follow(from, tx))
            .await
            .map_err(|e| internal(&format!("cannot start following: {e}")))??;
        Ok(rx)
    }
}

/// What the audit log says of a call besides how it ended.
struct CallInfo<'a> {
    caller: &'a Caller,
    role: Option<Role>,
    op: &'a str,
    mount: Option<String>,
    args: Value,
    time_ns: i64,
}

impl CallInfo<'_> {
    /// The audit record of the call, ended with `res` after `duration_ms`.
    fn finished<T>(self, res: &Result<T, AgentError>, duration_ms: f64) -> AuditRecord {
        AuditRecord {
            seq: 0,
            time_ns: self.time_ns,
            caller: self.caller.clone(),
            role: self.role,
            op: self.op.to_string(),
            mount: self.mount,
            args: self.args,
            result: outcome(res),
            error: res
                .as_ref()
                .err()
                .map(|e| format!("{}: {}", e.code, e.message)),
            duration_ms,
        }
    }
}

fn outcome<T>(r: &Result<T, AgentError>) -> AuditResult {
    match r {
        Ok(_) => AuditResult::Ok,
        Err(e) if e.code == "permission_denied" && e.required_role.is_some() => AuditResult::Denied,
        Err(_) => AuditResult::Error,
    }
}

fn op_mount(op: &AgentOp) -> Option<&str> {
    match op {
        AgentOp::Status | AgentOp::Audit { .. } => None,
        AgentOp::Changes { mount, .. }
        | AgentOp::CheckpointCreate { mount, .. }
        | AgentOp::CheckpointList { mount }
        | AgentOp::CheckpointShow { mount, .. }
        | AgentOp::CheckpointDiff { mount, .. }
        | AgentOp::CheckpointDelete { mount, .. }
        | AgentOp::Rollback { mount, .. }
        | AgentOp::Restore { mount, .. }
        | AgentOp::Verify { mount }
        | AgentOp::Prune { mount, .. } => Some(mount.as_deref().unwrap_or("_")),
    }
}

/// The operation's fields (without the `op` tag), for the audit record.
fn op_args(op: &AgentOp) -> Value {
    match serde_json::to_value(op) {
        Ok(Value::Object(mut m)) => {
            m.remove("op");
            Value::Object(m)
        }
        Ok(v) => v,
        Err(_) => Value::Null,
    }
}
