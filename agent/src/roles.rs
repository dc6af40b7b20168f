//! Who may do what: the role each operation needs, and the role of a local
//! peer from its socket credentials and the grants in agent.toml.

use crate::audit::AuditQuery;
use crate::config::Grant;
use crate::{AgentError, AgentOp, Caller, Role};

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Monitor => "monitor",
            Role::User => "user",
            Role::Manager => "manager",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The wire name of an operation ("checkpoint_create"), as in the audit log.
pub fn op_name(op: &AgentOp) -> &'static str {
    match op {
        AgentOp::Status => "status",
        AgentOp::Changes { .. } => "changes",
        AgentOp::CheckpointCreate { .. } => "checkpoint_create",
        AgentOp::CheckpointList { .. } => "checkpoint_list",
        AgentOp::CheckpointShow { .. } => "checkpoint_show",
        AgentOp::CheckpointDiff { .. } => "checkpoint_diff",
        AgentOp::CheckpointDelete { .. } => "checkpoint_delete",
        AgentOp::Rollback { .. } => "rollback",
        AgentOp::Restore { .. } => "restore",
        AgentOp::Verify { .. } => "verify",
        AgentOp::Prune { .. } => "prune",
        AgentOp::Audit { .. } => "audit",
    }
}

/// Name of the journal follow stream in the audit log (not an `AgentOp`).
pub const FOLLOW_OP: &str = "follow";

/// The least role that may use an operation, by name (`op_name`, or
/// `FOLLOW_OP`); None for an unknown name. For `audit` this is the role
/// that may read its own records; `required_role` has the exact rule.
pub fn min_role(op: &str) -> Option<Role> {
    Some(match op {
        "status" | "changes" | FOLLOW_OP | "checkpoint_list" | "checkpoint_show" | "audit" => {
            Role::Monitor
        }
        "checkpoint_create" | "checkpoint_diff" => Role::User,
        "checkpoint_delete" | "rollback" | "restore" | "verify" | "prune" => Role::Manager,
        _ => return None,
    })
}

/// The role an operation needs.
///
/// The audit log is the manager's, except that anyone with a role may read
/// the records of their own calls: a local caller asking for its own uid
/// needs only monitor (`filter_own` then pins the query to that uid).
pub fn required_role(op: &AgentOp, caller: &Caller) -> Role {
    match op {
        AgentOp::Audit { query } => match caller {
            Caller::Local { uid, .. } if query.uid == Some(*uid) => Role::Monitor,
            _ => Role::Manager,
        },
        // Every op_name is in the table; Manager would be the safe side.
        _ => min_role(op_name(op)).unwrap_or(Role::Manager),
    }
}

/// Whether an operation changes a mount's state (its audit record is synced).
pub fn changes_state(op: &AgentOp) -> bool {
    matches!(
        op,
        AgentOp::CheckpointCreate { .. }
            | AgentOp::CheckpointDelete { .. }
            | AgentOp::Rollback { .. }
            | AgentOp::Restore { .. }
            | AgentOp::Prune { .. }
    )
}

/// The role of a local peer: root is always manager; otherwise the highest
/// role of the grants naming its uid, primary gid or a supplementary group.
pub fn local_role(grants: &[Grant], uid: u32, gid: u32, groups: &[u32]) -> Option<Role> {
    if uid == 0 {
        return Some(Role::Manager);
    }
    grants
        .iter()
        .filter(|g| {
            g.uids.contains(&uid)
                || g.gids.contains(&gid)
                || g.gids.iter().any(|x| groups.contains(x))
        })
        .map(|g| g.role)
        .max()
}

/// "uid 1001", "the coordinator (10.0.0.5:7443)".
pub fn describe_caller(c: &Caller) -> String {
    match c {
        Caller::Local { uid, .. } => format!("uid {uid}"),
        Caller::Coordinator { address } => format!("the coordinator ({address})"),
    }
}

/// The `permission_denied` error for `op_name` needing `needed`.
pub fn denied(op_name: &str, needed: Role, caller: &Caller, has: Option<Role>) -> AgentError {
    let who = describe_caller(caller);
    let message = match has {
        Some(r) => format!("{op_name} needs role {needed}; {who} has role {r}"),
        None => format!(
            "{op_name} needs role {needed}; {who} has no role (no [[grant]] in agent.toml names it or its groups)"
        ),
    };
    AgentError {
        code: "permission_denied".into(),
        message,
        required_role: Some(needed),
    }
}

/// A non-manager reading the audit log sees only its own calls.
pub fn filter_own(query: &mut AuditQuery, caller: &Caller, role: Role) {
    if role < Role::Manager {
        if let Caller::Local { uid, .. } = caller {
            query.uid = Some(*uid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(uid: u32) -> Caller {
        Caller::Local {
            uid,
            gid: uid,
            pid: 1,
            groups: vec![],
        }
    }

    #[test]
    fn grants() {
        let g = vec![
            Grant {
                role: Role::Monitor,
                uids: vec![1001],
                gids: vec![4],
            },
            Grant {
                role: Role::User,
                uids: vec![],
                gids: vec![100],
            },
        ];
        assert_eq!(local_role(&g, 0, 0, &[]), Some(Role::Manager));
        assert_eq!(local_role(&g, 1001, 1001, &[]), Some(Role::Monitor));
        assert_eq!(local_role(&g, 1001, 1001, &[100]), Some(Role::User));
        assert_eq!(local_role(&g, 5, 4, &[]), Some(Role::Monitor));
        assert_eq!(local_role(&g, 5, 5, &[]), None);
    }

    #[test]
    fn needed_roles() {
        let c = local(1001);
        let m = || None;
        assert_eq!(required_role(&AgentOp::Status, &c), Role::Monitor);
        assert_eq!(
            required_role(
                &AgentOp::CheckpointCreate {
                    mount: m(),
                    name: None,
                    message: None
                },
                &c
            ),
            Role::User
        );
        assert_eq!(
            required_role(
                &AgentOp::Rollback {
                    mount: m(),
                    name: "a".into()
                },
                &c
            ),
            Role::Manager
        );
        let own = AuditQuery {
            uid: Some(1001),
            ..Default::default()
        };
        assert_eq!(
            required_role(&AgentOp::Audit { query: own }, &c),
            Role::Monitor
        );
        assert_eq!(
            required_role(
                &AgentOp::Audit {
                    query: AuditQuery::default()
                },
                &c
            ),
            Role::Manager
        );
        for name in [
            "status",
            "changes",
            "follow",
            "checkpoint_list",
            "checkpoint_show",
            "audit",
            "checkpoint_create",
            "checkpoint_diff",
            "checkpoint_delete",
            "rollback",
            "restore",
            "verify",
            "prune",
        ] {
            assert!(min_role(name).is_some(), "{name}");
        }
        assert_eq!(min_role("nope"), None);
        assert_eq!(
            required_role(&AgentOp::Verify { mount: m() }, &c),
            Role::Manager
        );
        assert_eq!(
            required_role(&AgentOp::CheckpointList { mount: m() }, &c),
            Role::Monitor
        );
        let e = denied("checkpoint_create", Role::User, &c, Some(Role::Monitor));
        assert_eq!(
            e.message,
            "checkpoint_create needs role user; uid 1001 has role monitor"
        );
        assert_eq!(e.required_role, Some(Role::User));
        assert!(denied("status", Role::Monitor, &c, None)
            .message
            .contains("no role"));
    }
}
