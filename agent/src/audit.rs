//! (being written)
use serde::{Deserialize, Serialize};

/// Filter for the audit log; every field narrows.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AuditQuery {
    pub since_ns: Option<i64>,
    pub until_ns: Option<i64>,
    pub uid: Option<u32>,
    pub op: Option<String>,
    /// Only denied calls.
    pub denied: bool,
    pub limit: Option<u64>,
}
