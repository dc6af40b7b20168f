//! The layerfs agent: `layerd` runs on every guest beside its layerfs mounts.
//! It is the one door through which admins (local socket, HTTP/1.1 + JSON)
//! and the coordinator (outbound TCP/TLS link) operate the server, and where
//! roles are enforced and every call is audited.
//!
//! Map: `config` (agent.toml), `roles` (who may do what), `audit` (durable
//! log of every call), `mounts` (each mount's control socket), `ops` (one
//! operation, checked and audited: `Agent::call`), `api` (the local HTTP
//! API), `wire` (the coordinator protocol), `link` (the agent's side of it),
//! `coordinator` (the coordinator's side, for `layerfs-coordinator`).

pub mod api;
pub mod audit;
pub mod config;
pub mod coordinator;
pub mod http_client;
pub mod link;
pub mod mounts;
pub mod ops;
pub mod roles;
pub mod wire;

use serde::{Deserialize, Serialize};

pub use layerfs::control::proto::{JournalQuery, Retention};

/// Roles, least to most powerful. Each includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// status, changes, checkpoint list/show, audit of own calls
    Monitor,
    /// monitor + checkpoint create, diff
    User,
    /// user + rollback, restore, checkpoint delete, verify, prune, audit log
    Manager,
}

/// Who is calling: a local peer (by its socket credentials) or the coordinator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Caller {
    Local {
        uid: u32,
        gid: u32,
        pid: i32,
        groups: Vec<u32>,
    },
    Coordinator {
        address: String,
    },
}

/// One operation of the agent (local API and coordinator commands alike).
/// `mount` names a mount from agent.toml (`[[mount]] name`); None = the only one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum AgentOp {
    Status,
    Changes {
        mount: Option<String>,
        query: JournalQuery,
    },
    CheckpointCreate {
        mount: Option<String>,
        name: Option<String>,
        message: Option<String>,
    },
    CheckpointList {
        mount: Option<String>,
    },
    CheckpointShow {
        mount: Option<String>,
        name: String,
    },
    CheckpointDiff {
        mount: Option<String>,
        a: String,
        b: Option<String>,
    },
    CheckpointDelete {
        mount: Option<String>,
        name: String,
    },
    Rollback {
        mount: Option<String>,
        name: String,
    },
    Restore {
        mount: Option<String>,
        name: String,
        paths: Vec<String>,
    },
    Verify {
        mount: Option<String>,
    },
    Prune {
        mount: Option<String>,
        policy: Retention,
    },
    Audit {
        query: audit::AuditQuery,
    },
}

/// Errors as the API and the coordinator see them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct AgentError {
    /// As layerfs's `ErrorCode` (snake_case), plus `unavailable` (a mount's
    /// control socket cannot be reached).
    pub code: String,
    pub message: String,
    /// For `permission_denied`: the role the operation needs.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub required_role: Option<Role>,
}
