//! The coordinator protocol (version 1): message types and framing, shared by
//! the agent's side (`link`) and the coordinator (`coordinator`).
//! docs/COORDINATOR.md is the specification; this file implements it.
//!
//! Framing: every frame is a 4-byte big-endian length, then that many bytes of
//! UTF-8 JSON: one object with `"v": 1` and `"type"` naming the message. A
//! declared length over `MAX_FRAME` is refused before anything is allocated.
//! A frame whose `v` is not `PROTOCOL_VERSION` is refused with
//! `DecodeError::Version`, whatever else it holds; `error` frames keep their
//! shape in every version so a peer can always read why it was refused.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::{AgentError, AgentOp};
use layerfs::control::proto::JournalRecord;

pub const PROTOCOL_VERSION: u32 = 1;
/// Largest frame either side accepts. A `records` batch is bounded far below
/// it (`MAX_BATCH_BYTES`); command results (a diff) are the large ones.
pub const MAX_FRAME: usize = 16 << 20;
/// Each side sends a `ping` this often when it has nothing else to send...
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);
/// ...and drops a connection on which nothing arrived for this long.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(15);
/// TLS handshake + hello + welcome must complete within this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A `records` message holds at most this many records...
pub const MAX_BATCH_RECORDS: usize = 1000;
/// ...and about this many bytes of JSON (one more record may cross it).
pub const MAX_BATCH_BYTES: usize = 1 << 20;

/// A secret (the token): serialized as a plain string, never shown by Debug.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// One mount as the agent registers it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MountInfo {
    /// The mount's name in agent.toml (`[[mount]] name`).
    pub name: String,
    pub path: String,
    /// The mount's highest journal sequence number, if its status could be read.
    #[serde(default)]
    pub journal_seq: Option<u64>,
    /// layerfs `Status` of the mount (layers, upper, journal, checkpoints count, health).
    #[serde(default)]
    pub status: Option<Value>,
    /// `CheckpointList` of the mount.
    #[serde(default)]
    pub checkpoints: Option<Value>,
    /// Why status or checkpoints are missing (mount unreachable...).
    #[serde(default)]
    pub error: Option<String>,
}

/// First message of the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub token: Secret,
    pub server_id: String,
    pub hostname: String,
    pub agent_version: String,
    pub mounts: Vec<MountInfo>,
}

/// The coordinator's answer to an accepted `hello`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    pub server_id: String,
    pub coordinator_version: String,
    /// Per mount: the highest sequence number stored (0: none). The agent
    /// sends that mount's records from the next one on; a mount missing here
    /// starts at 0.
    pub cursors: BTreeMap<String, u64>,
}

/// Result of one command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandResult {
    pub id: u64,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<AgentError>,
}

/// Every message of the protocol; `type` on the wire is the snake_case name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    /// agent -> coordinator, first frame.
    Hello(Hello),
    /// coordinator -> agent, answer to an accepted hello.
    Welcome(Welcome),
    /// agent -> coordinator: journal records of one mount, in sequence order.
    Records {
        mount: String,
        records: Vec<JournalRecord>,
    },
    /// coordinator -> agent: every record of `mount` with seq <= `seq` is stored durably.
    Ack { mount: String, seq: u64 },
    /// coordinator -> agent: run `command` (an agent operation) under the coordinator's role.
    Command { id: u64, command: AgentOp },
    /// agent -> coordinator: outcome of command `id`.
    Result(CommandResult),
    /// agent -> coordinator: fresh mount inventory (after a command changed it).
    Inventory { mounts: Vec<MountInfo> },
    /// Either way, every `HEARTBEAT_INTERVAL`.
    Ping { time_ns: i64 },
    /// Either way: a refusal or fatal error; the sender closes the connection after it.
    Error { code: String, message: String },
}

impl Message {
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello(_) => "hello",
            Message::Welcome(_) => "welcome",
            Message::Records { .. } => "records",
            Message::Ack { .. } => "ack",
            Message::Command { .. } => "command",
            Message::Result(_) => "result",
            Message::Inventory { .. } => "inventory",
            Message::Ping { .. } => "ping",
            Message::Error { .. } => "error",
        }
    }

    pub fn ping() -> Message {
        Message::Ping { time_ns: now_ns() }
    }

    pub fn error(code: &str, message: impl Into<String>) -> Message {
        Message::Error {
            code: code.to_string(),
            message: message.into(),
        }
    }
}

/// Error codes of `error` messages.
pub mod codes {
    /// The peer speaks another protocol version.
    pub const VERSION: &str = "version";
    /// The token is unknown.
    pub const UNAUTHORIZED: &str = "unauthorized";
    /// Malformed frame, unexpected message, invalid name.
    pub const BAD_REQUEST: &str = "bad_request";
    /// The coordinator cannot store records (disk full, I/O error).
    pub const INTERNAL: &str = "internal";
    /// The connection was replaced by a newer one of the same server.
    pub const REPLACED: &str = "replaced";
}

/// Why a frame could not be turned into a `Message`.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// `got` is None if the frame had no numeric `v`.
    #[error("{}", version_message(*got))]
    Version {
        got: Option<u64>,
        /// The message of an `error` frame of another version, if it was one.
        peer_error: Option<(String, String)>,
    },
    #[error("malformed message: {0}")]
    Malformed(String),
}

fn version_message(got: Option<u64>) -> String {
    match got {
        Some(v) => format!(
            "protocol version {v} is not supported: this side speaks version {PROTOCOL_VERSION} \
             (run matching versions of layerd and layerfs-coordinator)"
        ),
        None => format!(
            "message without a protocol version (\"v\"): this side speaks version {PROTOCOL_VERSION}; \
             is the peer a layerfs agent/coordinator?"
        ),
    }
}

/// Encode one frame: length (u32 big-endian), then `{"v":1,` + the message's fields.
pub fn encode(msg: &Message) -> std::io::Result<Vec<u8>> {
    let body = serde_json::to_vec(msg).map_err(std::io::Error::other)?;
    // An internally tagged enum always serializes as an object: `{"type":...`.
    debug_assert!(body.first() == Some(&b'{'));
    let prefix = format!("{{\"v\":{PROTOCOL_VERSION},");
    let len = prefix.len() + body.len() - 1;
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "{} message of {len} bytes is larger than the {MAX_FRAME}-byte frame limit",
                msg.kind()
            ),
        ));
    }
    let mut buf = Vec::with_capacity(4 + len);
    buf.extend_from_slice(&(len as u32).to_be_bytes());
    buf.extend_from_slice(prefix.as_bytes());
    buf.extend_from_slice(&body[1..]);
    Ok(buf)
}

#[derive(Deserialize)]
struct Head {
    #[serde(default)]
    v: Option<Value>,
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

/// Decode one frame's payload: the version first, then the message.
pub fn decode(payload: &[u8]) -> Result<Message, DecodeError> {
    let head: Head = serde_json::from_slice(payload)
        .map_err(|e| DecodeError::Malformed(format!("not a JSON object: {e}")))?;
    let v = head.v.as_ref().and_then(Value::as_u64);
    if v != Some(PROTOCOL_VERSION as u64) {
        let peer_error = match (&head.kind, head.code, head.message) {
            (Some(k), Some(c), Some(m)) if k == "error" => Some((c, m)),
            _ => None,
        };
        return Err(DecodeError::Version { got: v, peer_error });
    }
    serde_json::from_slice(payload).map_err(|e| {
        DecodeError::Malformed(match head.kind {
            Some(k) => format!("{k}: {e}"),
            None => format!("no \"type\": {e}"),
        })
    })
}

/// Read one frame's payload. `Ok(None)`: clean end of stream before a frame.
/// A declared length over `max` fails (InvalidData) before reading it.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> std::io::Result<Option<Vec<u8>>> {
    let mut hdr = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = r.read(&mut hdr[got..]).await?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed in the middle of a frame header",
            ));
        }
        got += n;
    }
    let len = u32::from_be_bytes(hdr) as usize;
    if len > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {len} bytes is larger than the {max}-byte limit"),
        ));
    }
    // Grow with the data actually received, not with the declared length.
    let mut buf = Vec::with_capacity(len.min(64 << 10));
    (&mut *r).take(len as u64).read_to_end(&mut buf).await?;
    if buf.len() != len {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed in the middle of a frame",
        ));
    }
    Ok(Some(buf))
}

/// Write one encoded message and flush it.
pub async fn write_message<W: AsyncWrite + Unpin>(w: &mut W, msg: &Message) -> std::io::Result<()> {
    let buf = encode(msg)?;
    w.write_all(&buf).await?;
    w.flush().await
}

/// What a reader gets: a message, the clean end of the stream, or why the
/// stream cannot go on.
#[derive(Debug)]
pub enum Incoming {
    Message(Message),
    Closed,
}

/// Read and decode one message (frame errors and decode errors both end the stream).
pub async fn read_message<R: AsyncRead + Unpin>(r: &mut R) -> Result<Incoming, ReadError> {
    read_message_limited(r, MAX_FRAME).await
}

/// As `read_message`, with a smaller frame limit (before authentication).
pub async fn read_message_limited<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<Incoming, ReadError> {
    match read_frame(r, max).await {
        Ok(None) => Ok(Incoming::Closed),
        Ok(Some(p)) => decode(&p).map(Incoming::Message).map_err(ReadError::Decode),
        Err(e) => Err(ReadError::Io(e)),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{0}")]
    Io(std::io::Error),
    #[error("{0}")]
    Decode(DecodeError),
}

/// Names used as file names by the coordinator (server ids, mount names):
/// 1..=128 bytes of `[A-Za-z0-9._@:-]` (what agent.toml allows for mount
/// names), not starting with '.'.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'@' | b':'))
}

/// Compare two secrets in time independent of where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    // The length is not secret-dependent in a way worth hiding (tokens have a
    // fixed format); every byte of the shorter length is still compared.
    let mut diff = (a.len() != b.len()) as u8;
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= x ^ y;
    }
    std::hint::black_box(diff) == 0
}

pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// The tokens in a token file: one per line, surrounding whitespace and empty
/// lines and `#` comments ignored. At least one is required.
pub fn parse_tokens(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect()
}

/// Read a token file; warns (once per process and path) if it is readable by
/// others than its owner.
pub fn read_token_file(path: &std::path::Path) -> anyhow::Result<Vec<String>> {
    use std::os::unix::fs::MetadataExt;
    static WARNED: parking_lot::Mutex<Vec<std::path::PathBuf>> =
        parking_lot::Mutex::new(Vec::new());
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read the token file {}: {e}", path.display()))?;
    if let Ok(m) = std::fs::metadata(path) {
        let mut warned = WARNED.lock();
        if m.mode() & 0o077 != 0 && !warned.iter().any(|p| p == path) {
            warned.push(path.to_path_buf());
            tracing::warn!(
                path = %path.display(),
                "the token file is readable by group or others (mode {:o}); chmod 600 it",
                m.mode() & 0o777
            );
        }
    }
    let tokens = parse_tokens(&text);
    if tokens.is_empty() {
        anyhow::bail!("the token file {} holds no token", path.display());
    }
    Ok(tokens)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A journal record for tests (also used by the coordinator's and the link's).
    pub(crate) fn rec(seq: u64) -> JournalRecord {
        JournalRecord {
            seq,
            time_ns: 1_700_000_000_000_000_000 + seq as i64,
            op: "create".into(),
            path: format!("/f{seq}"),
            path2: None,
            uid: 0,
            gid: 0,
            pid: 42,
            comm: "touch".into(),
            detail: None,
            also: Vec::new(),
        }
    }

    fn all_messages() -> Vec<Message> {
        vec![
            Message::Hello(Hello {
                token: Secret("s3cret".into()),
                server_id: "guest01".into(),
                hostname: "guest01.example".into(),
                agent_version: "0.1.0".into(),
                mounts: vec![MountInfo {
                    name: "root".into(),
                    path: "/srv/root".into(),
                    journal_seq: Some(7),
                    status: Some(serde_json::json!({"journal_seq": 7})),
                    checkpoints: Some(serde_json::json!([])),
                    error: None,
                }],
            }),
            Message::Welcome(Welcome {
                server_id: "guest01".into(),
                coordinator_version: "0.1.0".into(),
                cursors: [("root".to_string(), 5u64)].into_iter().collect(),
            }),
            Message::Records {
                mount: "root".into(),
                records: vec![rec(1), rec(2)],
            },
            Message::Ack {
                mount: "root".into(),
                seq: 2,
            },
            Message::Command {
                id: 3,
                command: AgentOp::Rollback {
                    mount: None,
                    name: "cp1".into(),
                },
            },
            Message::Result(CommandResult {
                id: 3,
                ok: false,
                result: None,
                error: Some(AgentError {
                    code: "permission_denied".into(),
                    message: "rollback needs role manager".into(),
                    required_role: Some(crate::Role::Manager),
                }),
            }),
            Message::Inventory { mounts: vec![] },
            Message::Ping { time_ns: 12 },
            Message::error(codes::VERSION, "nope"),
        ]
    }

    #[test]
    fn every_message_round_trips_with_version_and_big_endian_length() {
        for m in all_messages() {
            let buf = encode(&m).unwrap();
            let len = u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize;
            assert_eq!(len, buf.len() - 4);
            let v: Value = serde_json::from_slice(&buf[4..]).unwrap();
            assert_eq!(v["v"], 1, "{}", String::from_utf8_lossy(&buf[4..]));
            assert_eq!(v["type"], m.kind());
            assert_eq!(decode(&buf[4..]).unwrap(), m);
        }
    }

    #[test]
    fn wire_shape_is_as_documented() {
        let buf = encode(&Message::Ack {
            mount: "root".into(),
            seq: 9,
        })
        .unwrap();
        assert_eq!(&buf[..4], &[0, 0, 0, (buf.len() - 4) as u8]);
        assert_eq!(&buf[4..], br#"{"v":1,"type":"ack","mount":"root","seq":9}"#);
        let cmd = encode(&Message::Command {
            id: 1,
            command: AgentOp::CheckpointCreate {
                mount: Some("root".into()),
                name: Some("a".into()),
                message: None,
            },
        })
        .unwrap();
        let v: Value = serde_json::from_slice(&cmd[4..]).unwrap();
        assert_eq!(v["command"]["op"], "checkpoint_create");
    }

    #[test]
    fn other_versions_are_refused_with_a_clear_message() {
        let e = decode(br#"{"v":2,"type":"hello","token":"x"}"#).unwrap_err();
        assert!(matches!(
            e,
            DecodeError::Version {
                got: Some(2),
                peer_error: None
            }
        ));
        let text = e.to_string();
        assert!(text.contains("version 2 is not supported"), "{text}");
        assert!(text.contains("speaks version 1"), "{text}");
        // No version at all.
        let e = decode(br#"{"type":"ping","time_ns":1}"#).unwrap_err();
        assert!(matches!(e, DecodeError::Version { got: None, .. }), "{e}");
        // An error frame of another version still carries its reason.
        let e =
            decode(br#"{"v":3,"type":"error","code":"version","message":"speak 3"}"#).unwrap_err();
        match e {
            DecodeError::Version {
                got: Some(3),
                peer_error: Some((c, m)),
            } => {
                assert_eq!(c, "version");
                assert_eq!(m, "speak 3");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn malformed_messages_are_refused() {
        for bad in [
            &b"not json"[..],
            br#"[1,2]"#,
            br#"{"v":1,"type":"launch_missiles"}"#,
            br#"{"v":1,"type":"ack","mount":"root"}"#,
            br#"{"v":1}"#,
        ] {
            assert!(
                matches!(decode(bad), Err(DecodeError::Malformed(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[tokio::test]
    async fn framing_limits_and_truncation() {
        // Two frames back to back, then a clean end.
        let mut data = encode(&Message::Ping { time_ns: 1 }).unwrap();
        data.extend(encode(&Message::Ping { time_ns: 2 }).unwrap());
        let mut r = &data[..];
        for want in [1, 2] {
            match read_message(&mut r).await.unwrap() {
                Incoming::Message(Message::Ping { time_ns }) => assert_eq!(time_ns, want),
                other => panic!("{other:?}"),
            }
        }
        assert!(matches!(
            read_message(&mut r).await.unwrap(),
            Incoming::Closed
        ));
        // A declared length over the limit is refused without reading it.
        let huge = ((MAX_FRAME + 1) as u32).to_be_bytes();
        let e = read_frame(&mut &huge[..], MAX_FRAME).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
        // Truncated header and truncated payload.
        let e = read_frame(&mut &[0u8, 0][..], MAX_FRAME).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
        let mut short = 10u32.to_be_bytes().to_vec();
        short.extend_from_slice(b"{\"v\"");
        let e = read_frame(&mut &short[..], MAX_FRAME).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
        // Encoding refuses what the peer would refuse.
        let big = Message::error("x", "y".repeat(MAX_FRAME));
        assert!(encode(&big).is_err());
    }

    #[test]
    fn names_tokens_and_secrets() {
        for ok in ["root", "guest01", "a.b-c_d", "X", "srv@a:b"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "a b",
            "é",
            &"x".repeat(129),
        ] {
            assert!(!valid_name(bad), "{bad}");
        }
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
        assert_eq!(parse_tokens("# c\n tok1 \n\ntok2\n"), vec!["tok1", "tok2"]);
        assert_eq!(format!("{:?}", Secret("s3cret".into())), "Secret(..)");
    }
}
