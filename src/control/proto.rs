//! The control protocol of a mounted layerfs (version 1).
//!
//! Transport: a Unix stream socket. Framing: every message is a 4-byte
//! big-endian length followed by that many bytes of JSON (UTF-8); a frame
//! over `MAX_FRAME` is refused. A client sends `Request`s; the server answers
//! each with zero or more `Reply::Event` frames (streams: journal follow,
//! progress) and exactly one final `Reply::Ok` or `Reply::Err`, all carrying
//! the request's `id`. Requests on one connection are answered in order.
//! A request whose `v` is not `PROTOCOL_VERSION` gets `ErrorCode::Version`.
//! The agent (layerd) speaks this same protocol to each mount.

use serde::{Deserialize, Serialize};

pub const PROTOCOL_VERSION: u32 = 1;
/// Largest frame either side accepts (a journal page or a diff fits easily).
pub const MAX_FRAME: usize = 16 << 20;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Request {
    pub v: u32,
    pub id: u64,
    #[serde(flatten)]
    pub op: Op,
}

/// Journal query: every field narrows the result; all empty = everything.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct JournalQuery {
    /// Records with sequence number >= from_seq.
    pub from_seq: Option<u64>,
    /// Unix time in nanoseconds, inclusive range.
    pub since_ns: Option<i64>,
    pub until_ns: Option<i64>,
    /// Union path prefix ("/etc" matches /etc and everything below it).
    pub path_prefix: Option<String>,
    /// Operation names (see `journal::Op`), any of them.
    pub ops: Vec<String>,
    /// Process name (comm), exact.
    pub comm: Option<String>,
    pub uid: Option<u32>,
    /// At most this many records (default 1000, most 100000).
    pub limit: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Mount, layers, journal position, last checkpoint, health.
    Status,
    /// Journal records matching the query, oldest first.
    Journal {
        query: JournalQuery,
    },
    /// Stream records from `from_seq` on as `Event::Record`, then keep
    /// streaming new ones as they are written until the client disconnects.
    Follow {
        from_seq: u64,
    },
    CheckpointCreate {
        name: Option<String>,
        message: Option<String>,
    },
    CheckpointList,
    CheckpointShow {
        name: String,
    },
    /// `b` None: against the live state.
    CheckpointDiff {
        a: String,
        b: Option<String>,
    },
    CheckpointDelete {
        name: String,
    },
    /// Make the union exactly checkpoint `name`.
    Rollback {
        name: String,
    },
    /// Bring back `paths` (union paths) as they are in checkpoint `name`.
    Restore {
        name: String,
        paths: Vec<String>,
    },
    /// Re-hash every stored object.
    Verify,
    /// Apply a retention policy now (fields that are None keep nothing by that rule).
    Prune {
        policy: Retention,
    },
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Retention {
    pub keep_last: Option<u32>,
    pub keep_hourly: Option<u32>,
    pub keep_daily: Option<u32>,
    pub keep_weekly: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Reply {
    Ok {
        v: u32,
        id: u64,
        result: serde_json::Value,
    },
    Err {
        v: u32,
        id: u64,
        error: ApiError,
    },
    Event {
        v: u32,
        id: u64,
        event: serde_json::Value,
    },
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Malformed frame or JSON, unknown operation, bad argument.
    BadRequest,
    /// Unsupported protocol version.
    Version,
    /// The peer's credentials do not allow this operation.
    PermissionDenied,
    /// No such checkpoint or path.
    NotFound,
    /// A checkpoint of that name exists.
    Exists,
    /// Out of space on the overlay partition; nothing was changed.
    NoSpace,
    /// Stored data failed verification.
    Corrupt,
    /// Another state-changing operation is running; try again.
    Busy,
    /// The mount is read-only (no upper layer).
    ReadOnly,
    Internal,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ApiError {
    pub code: ErrorCode,
    /// One sentence an operator can act on.
    pub message: String,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.message)
    }
}

impl std::error::Error for ApiError {}

impl From<std::io::Error> for ApiError {
    fn from(e: std::io::Error) -> Self {
        let code = match e.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => ErrorCode::NoSpace,
            Some(libc::ENOENT) => ErrorCode::NotFound,
            Some(libc::EROFS) => ErrorCode::ReadOnly,
            _ if e.kind() == std::io::ErrorKind::InvalidData => ErrorCode::Corrupt,
            _ => ErrorCode::Internal,
        };
        ApiError::new(code, e.to_string())
    }
}

/// Who is on the other end of the socket (SO_PEERCRED).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

/// What the server needs from the filesystem: implemented by the mounted
/// union (`control::service`). `events` sends `Reply::Event` frames for this
/// request; it fails once the client is gone, and a stream must then stop.
pub trait Handler: Send + Sync + 'static {
    fn handle(
        &self,
        peer: &Peer,
        op: Op,
        events: &mut dyn FnMut(serde_json::Value) -> std::io::Result<()>,
    ) -> Result<serde_json::Value, ApiError>;
}

// ---- Results (the `result` / `event` JSON of each operation) ----------------

/// One journal record (`Journal`, `Follow` events).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JournalRecord {
    pub seq: u64,
    /// Unix time in nanoseconds.
    pub time_ns: i64,
    /// create, mkdir, mknod, symlink, link, write, truncate, fallocate, unlink,
    /// rmdir, rename, chmod, chown, utimes, setxattr, removexattr, rollback,
    /// restore, recovered (found in the upper after a crash, no record).
    pub op: String,
    /// Union path (absolute, "/etc/hosts"); names are shown lossily as UTF-8.
    pub path: String,
    /// Second path: rename and link targets.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub path2: Option<String>,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
    /// Process name (comm) of the caller, as the kernel reported it.
    pub comm: String,
    /// Op details: write ranges/sizes, modes, xattr names, checkpoint names.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub detail: Option<String>,
    /// Later changes to the same object by the same process folded into this
    /// record (for example a created file's write, chown, chmod and utimes).
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub also: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub mountpoint: String,
    pub lowers: Vec<String>,
    pub upper: Option<String>,
    pub statedir: Option<String>,
    /// Highest journal sequence number written (0: none).
    pub journal_seq: u64,
    pub last_checkpoint: Option<String>,
    pub checkpoints: u64,
    /// Bytes used by the object store.
    pub store_bytes: u64,
    /// Overlay partition usage.
    pub overlay_total_bytes: u64,
    pub overlay_free_bytes: u64,
    /// "ok", or what needs attention.
    pub health: String,
    pub version: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CheckpointInfo {
    pub name: String,
    /// Root tree hash (hex).
    pub id: String,
    pub time_ns: i64,
    pub message: Option<String>,
    /// Journal sequence number the checkpoint includes (every record <= it).
    pub seq: u64,
    /// Regular files, directories, other entries in the upper at that time.
    pub files: u64,
    pub dirs: u64,
    pub others: u64,
    /// Bytes of file data (logical).
    pub bytes: u64,
    /// Created automatically (before a rollback).
    pub auto: bool,
    /// How long writes were held, and the whole operation took (create only).
    pub hold_ms: Option<f64>,
    pub took_ms: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DiffEntry {
    /// added, modified, deleted
    pub change: String,
    pub path: String,
    /// "file", "dir", "symlink", "whiteout", "device", "fifo", "socket"
    pub kind: String,
    pub old_size: Option<u64>,
    pub new_size: Option<u64>,
    pub old_hash: Option<String>,
    pub new_hash: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RollbackReport {
    pub checkpoint: String,
    /// The automatic checkpoint of the state before the rollback (roll forward target).
    pub saved_as: Option<String>,
    pub changed_paths: u64,
    pub hold_ms: f64,
    pub took_ms: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VerifyProblem {
    pub checkpoint: String,
    pub path: String,
    pub object: String,
    /// "missing", "corrupt", "unreadable: ..."
    pub problem: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VerifyReport {
    pub objects: u64,
    pub bytes: u64,
    pub problems: Vec<VerifyProblem>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PruneReport {
    pub deleted: Vec<String>,
    pub kept: Vec<String>,
    pub freed_bytes: u64,
}

// ---- Framing helpers (shared by the server, the client and the agent) -------

/// Encode one frame: 4-byte big-endian length, then the JSON of `msg`.
/// Fails (InvalidData) if the JSON is larger than `MAX_FRAME`.
pub fn encode_frame<T: Serialize>(msg: &T) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 4];
    serde_json::to_writer(&mut buf, msg).map_err(std::io::Error::other)?;
    let len = buf.len() - 4;
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("message of {len} bytes is larger than the {MAX_FRAME}-byte frame limit"),
        ));
    }
    buf[..4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(buf)
}

/// Write one frame (header and payload in one buffer, so a frame is never
/// interleaved with another writer's bytes at the syscall level).
pub fn write_frame<W: std::io::Write, T: Serialize>(w: &mut W, msg: &T) -> std::io::Result<()> {
    let buf = encode_frame(msg)?;
    w.write_all(&buf)?;
    w.flush()
}

/// Read one frame's payload. `Ok(None)`: clean end of stream before a frame
/// started. A declared length over `MAX_FRAME` fails with InvalidData before
/// anything of the payload is read or allocated.
pub fn read_frame<R: std::io::Read>(r: &mut R) -> std::io::Result<Option<Vec<u8>>> {
    let mut hdr = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut hdr[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "connection closed in the middle of a frame header",
                ))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let len = u32::from_be_bytes(hdr) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {len} bytes is larger than the {MAX_FRAME}-byte limit"),
        ));
    }
    // Grow with the data actually received, not with the declared length.
    let mut buf = Vec::with_capacity(len.min(64 << 10));
    std::io::Read::read_to_end(&mut std::io::Read::take(r, len as u64), &mut buf)?;
    if buf.len() != len {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed in the middle of a frame",
        ));
    }
    Ok(Some(buf))
}

impl Reply {
    pub fn ok(id: u64, result: serde_json::Value) -> Reply {
        Reply::Ok {
            v: PROTOCOL_VERSION,
            id,
            result,
        }
    }

    pub fn err(id: u64, error: ApiError) -> Reply {
        Reply::Err {
            v: PROTOCOL_VERSION,
            id,
            error,
        }
    }

    pub fn event(id: u64, event: serde_json::Value) -> Reply {
        Reply::Event {
            v: PROTOCOL_VERSION,
            id,
            event,
        }
    }

    pub fn id(&self) -> u64 {
        match self {
            Reply::Ok { id, .. } | Reply::Err { id, .. } | Reply::Event { id, .. } => *id,
        }
    }
}

impl Request {
    pub fn new(id: u64, op: Op) -> Request {
        Request {
            v: PROTOCOL_VERSION,
            id,
            op,
        }
    }
}

impl Op {
    /// The wire name of the operation ("checkpoint_create"), for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Status => "status",
            Op::Journal { .. } => "journal",
            Op::Follow { .. } => "follow",
            Op::CheckpointCreate { .. } => "checkpoint_create",
            Op::CheckpointList => "checkpoint_list",
            Op::CheckpointShow { .. } => "checkpoint_show",
            Op::CheckpointDiff { .. } => "checkpoint_diff",
            Op::CheckpointDelete { .. } => "checkpoint_delete",
            Op::Rollback { .. } => "rollback",
            Op::Restore { .. } => "restore",
            Op::Verify => "verify",
            Op::Prune { .. } => "prune",
        }
    }
}
