//! The control socket: server + client + layerfs-ctl against a small test
//! handler with canned answers (the filesystem's handler is tested elsewhere).

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use layerfs::control::client::{Client, ClientError};
use layerfs::control::proto::*;
use layerfs::control::server::{self, Access, ServerHandle, MAX_CONNECTIONS};
use serde_json::{json, Value};

const CTL: &str = env!("CARGO_BIN_EXE_layerfs-ctl");
/// 2026-11-25T10:00:00Z
const T0: i64 = 1_795_600_800 * 1_000_000_000;

#[derive(Default)]
struct TestHandler {
    last_query: Mutex<Option<JournalQuery>>,
    last_peer: Mutex<Option<Peer>>,
    stream_stopped: AtomicBool,
    corrupt: AtomicBool,
    calls: AtomicUsize,
}

fn status() -> Status {
    Status {
        mountpoint: "/srv/root".into(),
        lowers: vec!["/layers/base".into(), "/layers/app".into()],
        upper: Some("/var/lib/layerfs/upper".into()),
        statedir: Some("/var/lib/layerfs/state".into()),
        journal_seq: 42,
        last_checkpoint: Some("nightly".into()),
        checkpoints: 2,
        store_bytes: 1536,
        overlay_total_bytes: 100 << 30,
        overlay_free_bytes: 25 << 30,
        health: "ok".into(),
        version: "0.1.0".into(),
    }
}

fn checkpoint(name: &str) -> CheckpointInfo {
    CheckpointInfo {
        name: name.into(),
        id: "ab".repeat(32),
        time_ns: T0,
        message: Some("before upgrade".into()),
        seq: 40,
        files: 1234,
        dirs: 56,
        others: 7,
        bytes: 3 << 20,
        auto: false,
        hold_ms: Some(1.5),
        took_ms: Some(120.0),
    }
}

fn record(seq: u64) -> JournalRecord {
    JournalRecord {
        seq,
        time_ns: T0 + seq as i64 * 1_000_000_000,
        op: if seq % 2 == 0 { "write" } else { "rename" }.into(),
        path: "/etc/hosts".into(),
        path2: (seq % 2 == 1).then(|| "/etc/hosts.bak".into()),
        uid: 1000,
        gid: 1000,
        pid: 4321,
        comm: "vim".into(),
        detail: (seq % 2 == 0).then(|| "0+120".into()),
        also: Vec::new(),
    }
}

impl Handler for TestHandler {
    fn handle(
        &self,
        peer: &Peer,
        op: Op,
        events: &mut dyn FnMut(Value) -> std::io::Result<()>,
    ) -> Result<Value, ApiError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        *self.last_peer.lock().unwrap() = Some(*peer);
        match op {
            Op::Status => Ok(j(&status())),
            Op::Journal { query } => {
                *self.last_query.lock().unwrap() = Some(query);
                Ok(j(&vec![record(1), record(2)]))
            }
            Op::Follow { from_seq } if from_seq == 999 => {
                // An endless stream: stops only when the client is gone.
                let start = Instant::now();
                let mut seq = from_seq;
                while start.elapsed() < Duration::from_secs(20) {
                    if events(j(&record(seq))).is_err() {
                        self.stream_stopped.store(true, Ordering::SeqCst);
                        return Err(ApiError::new(ErrorCode::Internal, "client gone"));
                    }
                    seq += 1;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Ok(Value::Null)
            }
            Op::Follow { from_seq } => {
                for s in from_seq..from_seq + 3 {
                    events(j(&record(s))).map_err(ApiError::from)?;
                    // Not records: a follower must skip them.
                    events(json!({ "heartbeat": s })).map_err(ApiError::from)?;
                }
                Ok(json!({"ended": true}))
            }
            Op::CheckpointList => {
                let mut auto = checkpoint("pre-rollback-1");
                auto.auto = true;
                auto.message = None;
                auto.bytes = 1536;
                auto.files = 9;
                Ok(j(&vec![checkpoint("nightly"), auto]))
            }
            Op::CheckpointShow { name } if name == "missing" => Err(ApiError::new(
                ErrorCode::NotFound,
                "no checkpoint named 'missing'",
            )),
            Op::CheckpointShow { name } => Ok(j(&checkpoint(&name))),
            Op::CheckpointDelete { name } => {
                if name == "slow" {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Ok(j(&PruneReport {
                    deleted: vec![name],
                    kept: Vec::new(),
                    freed_bytes: 4096,
                }))
            }
            Op::CheckpointDiff { .. } => Ok(j(&vec![
                DiffEntry {
                    change: "added".into(),
                    path: "/etc/new".into(),
                    kind: "file".into(),
                    old_size: None,
                    new_size: Some(10),
                    old_hash: None,
                    new_hash: Some("0123456789abcdef0123".into()),
                },
                DiffEntry {
                    change: "modified".into(),
                    path: "/etc/hosts".into(),
                    kind: "file".into(),
                    old_size: Some(100),
                    new_size: Some(120),
                    old_hash: Some("aaaaaaaaaaaaaaaa".into()),
                    new_hash: Some("bbbbbbbbbbbbbbbb".into()),
                },
                DiffEntry {
                    change: "deleted".into(),
                    path: "/var/cache".into(),
                    kind: "dir".into(),
                    old_size: None,
                    new_size: None,
                    old_hash: None,
                    new_hash: None,
                },
            ])),
            Op::Verify => {
                events(json!({"progress": "hashing objects"})).map_err(ApiError::from)?;
                let problems = if self.corrupt.load(Ordering::SeqCst) {
                    vec![VerifyProblem {
                        checkpoint: "nightly".into(),
                        path: "/etc/hosts".into(),
                        object: "cd".repeat(32),
                        problem: "corrupt".into(),
                    }]
                } else {
                    Vec::new()
                };
                Ok(j(&VerifyReport {
                    objects: 10,
                    bytes: 4096,
                    problems,
                }))
            }
            Op::Rollback { name } => Ok(j(&RollbackReport {
                checkpoint: name,
                saved_as: Some("auto-1".into()),
                changed_paths: 3,
                hold_ms: 2.0,
                took_ms: 30.0,
            })),
            Op::Prune { policy } => Ok(j(&PruneReport {
                deleted: vec!["old".into()],
                kept: vec![format!("keep_last={:?}", policy.keep_last)],
                freed_bytes: 2048,
            })),
            Op::CheckpointCreate { .. } => panic!("test handler panics on purpose"),
            Op::Restore { name, .. } if name == "ro" => {
                Err(ApiError::new(ErrorCode::ReadOnly, "the mount is read-only"))
            }
            Op::Restore { name, paths } => Ok(j(&RollbackReport {
                checkpoint: name,
                saved_as: None,
                changed_paths: paths.len() as u64,
                hold_ms: 1.0,
                took_ms: 2.0,
            })),
        }
    }
}

fn j<T: serde::Serialize>(t: &T) -> Value {
    serde_json::to_value(t).expect("serializable")
}

struct Env {
    _tmp: tempfile::TempDir,
    sock: PathBuf,
    handler: Arc<TestHandler>,
    server: Option<ServerHandle>,
}

fn start(access: Access) -> Env {
    let tmp = tempfile::tempdir().unwrap();
    // Other uids (the non-root test) must reach the socket.
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let sock = tmp.path().join("run/layerfs/test.sock");
    let handler = Arc::new(TestHandler::default());
    let server = server::spawn(&sock, handler.clone(), access).unwrap();
    Env {
        _tmp: tmp,
        sock,
        handler,
        server: Some(server),
    }
}

fn send_raw(s: &mut UnixStream, payload: &[u8]) {
    let mut buf = (payload.len() as u32).to_be_bytes().to_vec();
    buf.extend_from_slice(payload);
    s.write_all(&buf).unwrap();
}

fn read_reply(s: &mut UnixStream) -> Reply {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let f = read_frame(s).unwrap().expect("a reply frame");
    serde_json::from_slice(&f).unwrap()
}

fn expect_err(r: Reply) -> (u64, ApiError) {
    match r {
        Reply::Err { id, error, .. } => (id, error),
        other => panic!("expected an error reply, got {other:?}"),
    }
}

fn ctl(sock: &Path, args: &[&str]) -> (i32, String, String) {
    ctl_cmd(sock, args, |_| {})
}

fn ctl_cmd(sock: &Path, args: &[&str], f: impl FnOnce(&mut Command)) -> (i32, String, String) {
    let mut c = Command::new(CTL);
    c.arg("-s")
        .arg(sock)
        .args(args)
        .env_remove("LAYERFS_SOCKET")
        .stdin(Stdio::null());
    f(&mut c);
    let out = c.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn round_trip_and_socket_file() {
    let mut env = start(Access::default());
    let meta = std::fs::symlink_metadata(&env.sock).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o600, "root-only socket is 0600");
    let parent = std::fs::metadata(env.sock.parent().unwrap()).unwrap();
    assert_eq!(parent.mode() & 0o777, 0o755);

    let mut c = Client::connect(&env.sock).unwrap();
    let v = c.call(Op::Status).unwrap();
    assert_eq!(serde_json::from_value::<Status>(v).unwrap(), status());
    // Several requests on one connection.
    let v = c.call(Op::CheckpointShow { name: "x1".into() }).unwrap();
    assert_eq!(v["name"], "x1");
    let peer = env.handler.last_peer.lock().unwrap().unwrap();
    assert_eq!(peer.uid, 0);
    assert_eq!(peer.pid, std::process::id() as i32);
    match c.call(Op::CheckpointShow {
        name: "missing".into(),
    }) {
        Err(ClientError::Api(e)) => assert_eq!(e.code, ErrorCode::NotFound),
        other => panic!("{other:?}"),
    }
    // A panicking handler answers Internal and the connection lives on.
    match c.call(Op::CheckpointCreate {
        name: None,
        message: None,
    }) {
        Err(ClientError::Api(e)) => {
            assert_eq!(e.code, ErrorCode::Internal);
            assert!(e.message.contains("checkpoint_create"), "{}", e.message);
        }
        other => panic!("{other:?}"),
    }
    assert!(c.call(Op::Status).is_ok());

    // Drop: the socket file goes away and open connections are closed.
    drop(env.server.take());
    assert!(!env.sock.exists(), "socket file removed on drop");
    match c.call(Op::Status) {
        Err(ClientError::Io(_)) => {}
        other => panic!("expected a closed connection, got {other:?}"),
    }
    match Client::connect(&env.sock) {
        Err(e @ ClientError::Connect(_)) => assert!(
            e.to_string().contains("no layerfs control socket at"),
            "{e}"
        ),
        Err(e) => panic!("{e:?}"),
        Ok(_) => panic!("connected to a dropped server"),
    }
}

#[test]
fn request_ids_increase() {
    // A fake server that checks what the client sends.
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("fake.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let t = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut ids = Vec::new();
        for _ in 0..3 {
            let f = read_frame(&mut s).unwrap().unwrap();
            let req: Request = serde_json::from_slice(&f).unwrap();
            assert_eq!(req.v, PROTOCOL_VERSION);
            ids.push(req.id);
            // An event, then the answer.
            write_frame(&mut s, &Reply::event(req.id, json!({"progress": "x"}))).unwrap();
            write_frame(&mut s, &Reply::ok(req.id, json!(req.id))).unwrap();
        }
        // A reply for the wrong request is a protocol error.
        let f = read_frame(&mut s).unwrap().unwrap();
        let req: Request = serde_json::from_slice(&f).unwrap();
        write_frame(&mut s, &Reply::ok(req.id + 100, Value::Null)).unwrap();
        ids
    });
    let mut c = Client::connect(&sock).unwrap();
    for i in 1..=3u64 {
        let mut events = 0;
        let v = c
            .call_stream(Op::Status, &mut |_| {
                events += 1;
                true
            })
            .unwrap();
        assert_eq!(v, json!(i));
        assert_eq!(events, 1);
    }
    match c.call(Op::Status) {
        Err(e @ ClientError::Protocol(_)) => assert!(e.to_string().contains("protocol error")),
        other => panic!("{other:?}"),
    }
    let ids = t.join().unwrap();
    assert_eq!(ids, vec![1, 2, 3]);
}

#[test]
fn version_mismatch() {
    let env = start(Access::default());
    let mut s = UnixStream::connect(&env.sock).unwrap();
    send_raw(&mut s, br#"{"v":7,"id":3,"op":"status"}"#);
    let (id, e) = expect_err(read_reply(&mut s));
    assert_eq!(id, 3);
    assert_eq!(e.code, ErrorCode::Version);
    assert_eq!(
        e.message,
        "protocol version 7 is not supported; this server speaks 1"
    );
    // The connection is still usable.
    send_raw(&mut s, br#"{"v":1,"id":4,"op":"status"}"#);
    match read_reply(&mut s) {
        Reply::Ok { id: 4, result, .. } => assert_eq!(result["journal_seq"], 42),
        other => panic!("{other:?}"),
    }
}

#[test]
fn malformed_requests() {
    let env = start(Access::default());
    let mut s = UnixStream::connect(&env.sock).unwrap();
    send_raw(&mut s, b"{not json");
    let (id, e) = expect_err(read_reply(&mut s));
    assert_eq!((id, e.code), (0, ErrorCode::BadRequest));
    assert!(e.message.contains("invalid JSON"), "{}", e.message);

    send_raw(&mut s, br#"{"v":1,"id":5,"op":"bogus"}"#);
    let (id, e) = expect_err(read_reply(&mut s));
    assert_eq!((id, e.code), (5, ErrorCode::BadRequest));

    send_raw(&mut s, br#"{"v":1,"id":6}"#);
    let (id, e) = expect_err(read_reply(&mut s));
    assert_eq!((id, e.code), (6, ErrorCode::BadRequest));
    assert!(e.message.contains("op"), "{}", e.message);

    send_raw(&mut s, br#"{"id":7,"op":"status"}"#);
    let (id, e) = expect_err(read_reply(&mut s));
    assert_eq!((id, e.code), (7, ErrorCode::BadRequest));

    // Missing argument of a known op.
    send_raw(&mut s, br#"{"v":1,"id":8,"op":"checkpoint_show"}"#);
    let (id, e) = expect_err(read_reply(&mut s));
    assert_eq!((id, e.code), (8, ErrorCode::BadRequest));

    send_raw(&mut s, b"[1,2,3]");
    let (id, e) = expect_err(read_reply(&mut s));
    assert_eq!((id, e.code), (0, ErrorCode::BadRequest));

    // Still served after all that.
    send_raw(&mut s, br#"{"v":1,"id":9,"op":"status"}"#);
    assert!(matches!(read_reply(&mut s), Reply::Ok { id: 9, .. }));
}

#[test]
fn oversized_frame_closes_only_that_connection() {
    let env = start(Access::default());
    let mut bad = UnixStream::connect(&env.sock).unwrap();
    bad.write_all(&(1u32 << 30).to_be_bytes()).unwrap();
    bad.write_all(b"{\"v\":1").unwrap();
    let (id, e) = expect_err(read_reply(&mut bad));
    assert_eq!((id, e.code), (0, ErrorCode::BadRequest));
    assert!(e.message.contains("larger than"), "{}", e.message);
    // Then the server closes it.
    let mut rest = Vec::new();
    let n = bad.read_to_end(&mut rest).unwrap_or(0);
    assert_eq!(n, 0, "nothing after the error");
    // Others are served.
    let mut c = Client::connect(&env.sock).unwrap();
    assert!(c.call(Op::Status).is_ok());
}

#[test]
fn stalled_client_does_not_block_others() {
    let env = start(Access::default());
    let mut stalled = UnixStream::connect(&env.sock).unwrap();
    stalled.write_all(&[0, 0]).unwrap();
    let t = Instant::now();
    let mut c = Client::connect(&env.sock).unwrap();
    assert!(c.call(Op::Status).is_ok());
    assert!(t.elapsed() < Duration::from_secs(5));
    // An idle connection (no frame started) is left alone, a stalled frame
    // is dropped after FRAME_TIMEOUT (30 s).
    let idle = UnixStream::connect(&env.sock).unwrap();
    stalled
        .set_read_timeout(Some(Duration::from_secs(45)))
        .unwrap();
    let mut buf = [0u8; 16];
    let n = stalled
        .read(&mut buf)
        .expect("closed by the server, not timed out");
    assert_eq!(n, 0);
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_secs(29),
        "closed too early: {waited:?}"
    );
    // The idle one still works.
    let mut idle = idle;
    send_raw(&mut idle, br#"{"v":1,"id":1,"op":"status"}"#);
    assert!(matches!(read_reply(&mut idle), Reply::Ok { id: 1, .. }));
}

#[test]
fn hundred_concurrent_clients() {
    let env = start(Access::default());
    let sock = env.sock.clone();
    let threads: Vec<_> = (0..100)
        .map(|i| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                let name = format!("cp-{i}");
                // More than MAX_CONNECTIONS at once get Busy: retry as told.
                for _ in 0..500 {
                    let r = Client::connect(&sock).and_then(|mut c| {
                        c.call(Op::CheckpointDelete {
                            name: "slow".into(),
                        })?;
                        c.call(Op::CheckpointShow { name: name.clone() })
                    });
                    match r {
                        Ok(v) => {
                            assert_eq!(v["name"], name.as_str());
                            return;
                        }
                        Err(ClientError::Api(e)) if e.code == ErrorCode::Busy => {
                            std::thread::sleep(Duration::from_millis(20))
                        }
                        Err(e) => panic!("client {i}: {e}"),
                    }
                }
                panic!("client {i} never got through");
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn connection_limit() {
    let env = start(Access::default());
    let server = env.server.as_ref().unwrap();
    let held: Vec<UnixStream> = (0..MAX_CONNECTIONS)
        .map(|_| UnixStream::connect(&env.sock).unwrap())
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.active_connections() < MAX_CONNECTIONS {
        assert!(Instant::now() < deadline, "server did not accept them all");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut extra = UnixStream::connect(&env.sock).unwrap();
    let (id, e) = expect_err(read_reply(&mut extra));
    assert_eq!((id, e.code), (0, ErrorCode::Busy));
    // The client library reports it as Busy too.
    match Client::connect(&env.sock).and_then(|mut c| c.call(Op::Status)) {
        Err(ClientError::Api(e)) => assert_eq!(e.code, ErrorCode::Busy),
        other => panic!("{other:?}"),
    }
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.active_connections() > 0 {
        assert!(Instant::now() < deadline, "connections not released");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(Client::connect(&env.sock).unwrap().call(Op::Status).is_ok());
}

#[test]
fn streaming_events_then_final_reply() {
    let env = start(Access::default());
    let mut c = Client::connect(&env.sock).unwrap();
    let mut seqs = Vec::new();
    let v = c
        .call_stream(Op::Follow { from_seq: 10 }, &mut |ev| {
            if let Some(s) = ev.get("seq") {
                seqs.push(s.as_u64().unwrap());
            }
            true
        })
        .unwrap();
    assert_eq!(seqs, vec![10, 11, 12]);
    assert_eq!(v, json!({"ended": true}));

    // The caller stops an endless stream: the handler notices and ends.
    let mut n = 0;
    let v = c
        .call_stream(Op::Follow { from_seq: 999 }, &mut |_| {
            n += 1;
            n < 5
        })
        .unwrap();
    assert_eq!(v, Value::Null);
    assert_eq!(n, 5);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !env.handler.stream_stopped.load(Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "handler kept streaming");
        std::thread::sleep(Duration::from_millis(10));
    }
    // The client reconnects for the next call.
    assert!(c.call(Op::Status).is_ok());
}

#[test]
fn stale_socket_replaced_and_live_one_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("s.sock");
    // A socket file nobody listens on any more.
    drop(UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let h = Arc::new(TestHandler::default());
    let first = server::spawn(&sock, h.clone(), Access::default()).expect("stale socket replaced");
    assert!(Client::connect(&sock).unwrap().call(Op::Status).is_ok());

    let err = match server::spawn(&sock, h.clone(), Access::default()) {
        Err(e) => e,
        Ok(_) => panic!("a second server took over a live socket"),
    };
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
    assert_eq!(
        err.to_string(),
        format!("another layerfs already serves {}", sock.display())
    );
    // The first one is unaffected.
    assert!(Client::connect(&sock).unwrap().call(Op::Status).is_ok());

    // Not a socket: left alone.
    drop(first);
    std::fs::write(&sock, b"data").unwrap();
    let err = server::spawn(&sock, h, Access::default())
        .err()
        .expect("refuses to replace a regular file");
    assert!(err.to_string().contains("is not a socket"), "{err}");
    assert_eq!(std::fs::read(&sock).unwrap(), b"data");
}

#[test]
fn non_root_peer_refused() {
    let env = start(Access::default());
    let nobody = |c: &mut Command| {
        c.uid(65534).gid(65534);
    };
    // 0600: the kernel refuses the connect already.
    let (code, _, err) = ctl_cmd(&env.sock, &["status"], nobody);
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("permission denied"), "{err}");

    // A socket file made reachable by mistake: the server refuses by SO_PEERCRED.
    std::fs::set_permissions(&env.sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let calls = env.handler.calls.load(Ordering::SeqCst);
    let (code, _, err) = ctl_cmd(&env.sock, &["status"], nobody);
    assert_eq!(code, 4, "{err}");
    assert!(
        err.contains("the control socket allows root only; peer uid 65534 (pid "),
        "{err}"
    );
    assert!(err.contains(") is not allowed"), "{err}");
    assert_eq!(
        env.handler.calls.load(Ordering::SeqCst),
        calls,
        "the handler never saw the request"
    );
}

#[test]
fn group_access() {
    let env = start(Access {
        uids: vec![0],
        gid: Some(65534),
    });
    let meta = std::fs::symlink_metadata(&env.sock).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), 65534);
    // Primary group.
    let (code, out, err) = ctl_cmd(&env.sock, &["status"], |c| {
        c.uid(65534).gid(65534);
    });
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("journal seq:"), "{out}");
    assert_eq!(env.handler.last_peer.lock().unwrap().unwrap().uid, 65534);
    // Supplementary group only (SO_PEERGROUPS), set up by setpriv(1).
    if Path::new("/usr/bin/setpriv").exists() {
        let out = Command::new("/usr/bin/setpriv")
            .args([
                "--reuid=65533",
                "--regid=65533",
                "--groups=65534",
                CTL,
                "-s",
            ])
            .arg(&env.sock)
            .arg("status")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{err}");
        assert_eq!(env.handler.last_peer.lock().unwrap().unwrap().gid, 65533);
    } else {
        eprintln!("setpriv missing: supplementary group access not tested");
    }
    // Not in the group: the file mode stops it; with the mode opened, the server does.
    std::fs::set_permissions(&env.sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let (code, _, err) = ctl_cmd(&env.sock, &["status"], |c| {
        c.uid(65533).gid(65533);
    });
    assert_eq!(code, 4, "{err}");
    assert!(
        err.contains("allows uid 0 and group 65534 only; peer uid 65533"),
        "{err}"
    );
}

#[test]
fn cli_status_and_json() {
    let env = start(Access::default());
    let (code, out, err) = ctl(&env.sock, &["status"]);
    assert_eq!(code, 0, "{err}");
    let expected = "\
mountpoint:      /srv/root
lower 1:         /layers/base
lower 2:         /layers/app
upper:           /var/lib/layerfs/upper
state dir:       /var/lib/layerfs/state
journal seq:     42
checkpoints:     2
last checkpoint: nightly
store size:      1.5 KiB
overlay:         25.0 GiB free of 100.0 GiB (75% used)
health:          ok
version:         0.1.0
";
    assert_eq!(out, expected);

    let (code, out, _) = ctl(&env.sock, &["--json", "status"]);
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(serde_json::from_value::<Status>(v).unwrap(), status());
    assert!(
        out.contains("\n  \"journal_seq\": 42"),
        "pretty JSON: {out}"
    );

    // LAYERFS_SOCKET instead of -s.
    let out = Command::new(CTL)
        .arg("status")
        .env("LAYERFS_SOCKET", &env.sock)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn cli_checkpoints() {
    let env = start(Access::default());
    let (code, out, err) = ctl(&env.sock, &["checkpoint", "list"]);
    assert_eq!(code, 0, "{err}");
    let expected = "\
NAME            TIME                  FILES     SIZE  MESSAGE
nightly         2026-11-25T10:00:00Z   1234  3.0 MiB  before upgrade
pre-rollback-1  2026-11-25T10:00:00Z      9  1.5 KiB  [auto]
";
    assert_eq!(out, expected);

    let (code, out, _) = ctl(&env.sock, &["checkpoint", "show", "nightly"]);
    assert_eq!(code, 0);
    assert!(out.contains("name:        nightly\n"), "{out}");
    assert!(out.contains("time:        2026-11-25T10:00:00Z\n"), "{out}");
    assert!(out.contains("writes held: 1.5 ms\n"), "{out}");

    let (code, _, err) = ctl(&env.sock, &["checkpoint", "show", "missing"]);
    assert_eq!(code, 5);
    assert_eq!(err, "layerfs-ctl: no checkpoint named 'missing'\n");

    let (code, out, _) = ctl(&env.sock, &["checkpoint", "diff", "nightly"]);
    assert_eq!(code, 0);
    assert_eq!(
        out,
        "A  /etc/new  (10 B / 0123456789ab)\n\
         M  /etc/hosts  (100 B -> 120 B / aaaaaaaaaaaa -> bbbbbbbbbbbb)\n\
         D  /var/cache  (dir)\n"
    );

    let (code, out, _) = ctl(&env.sock, &["checkpoint", "delete", "old"]);
    assert_eq!(
        (code, out.as_str()),
        (0, "deleted checkpoint old (freed 4.0 KiB)\n")
    );

    let (code, out, _) = ctl(&env.sock, &["rollback", "nightly"]);
    assert_eq!(code, 0);
    assert!(
        out.starts_with("rolled back to nightly: 3 path(s) changed"),
        "{out}"
    );
    assert!(out.contains("saved as checkpoint auto-1"), "{out}");

    // Handler errors map to exit codes: panic -> Internal -> 1; ReadOnly -> 1.
    let (code, _, err) = ctl(&env.sock, &["checkpoint", "create", "--name", "x"]);
    assert_eq!(code, 1, "{err}");
    let (code, _, err) = ctl(&env.sock, &["restore", "ro", "/etc/hosts"]);
    assert_eq!(code, 1);
    assert_eq!(err, "layerfs-ctl: the mount is read-only\n");
    let (code, out, err) = ctl(
        &env.sock,
        &["restore", "nightly", "/etc/hosts", "/etc/motd"],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        "restored from checkpoint nightly: 2 path(s) changed (writes held 1.0 ms, took 2.0 ms)\n"
    );
}

#[test]
fn cli_log_follow_verify_prune() {
    let env = start(Access::default());
    let (code, out, err) = ctl(
        &env.sock,
        &[
            "log",
            "--since",
            "2026-11-25T10:00:00Z",
            "--until",
            "1795600900",
            "--op",
            "write",
            "--op",
            "rename,unlink",
            "--path",
            "/etc",
            "--uid",
            "1000",
            "--limit",
            "50",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let q = env.handler.last_query.lock().unwrap().clone().unwrap();
    assert_eq!(q.since_ns, Some(T0));
    assert_eq!(q.until_ns, Some(T0 + 100 * 1_000_000_000));
    assert_eq!(q.ops, vec!["write", "rename", "unlink"]);
    assert_eq!(q.path_prefix.as_deref(), Some("/etc"));
    assert_eq!((q.uid, q.limit), (Some(1000), Some(50)));
    let expected = "\
SEQ  TIME                  OP      PATH                           UID   PID  COMM  DETAIL
  1  2026-11-25T10:00:01Z  rename  /etc/hosts -> /etc/hosts.bak  1000  4321  vim
  2  2026-11-25T10:00:02Z  write   /etc/hosts                    1000  4321  vim   0+120
";
    assert_eq!(out, expected);

    // Relative time.
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64;
    let (code, _, _) = ctl(&env.sock, &["log", "--since", "2h"]);
    assert_eq!(code, 0);
    let since = env
        .handler
        .last_query
        .lock()
        .unwrap()
        .clone()
        .unwrap()
        .since_ns
        .unwrap();
    let diff = before - 7200 * 1_000_000_000 - since;
    assert!(diff.abs() < 60 * 1_000_000_000, "2h ago: off by {diff} ns");

    // Usage errors exit 2.
    assert_eq!(ctl(&env.sock, &["log", "--since", "yesterday"]).0, 2);
    assert_eq!(ctl(&env.sock, &["log", "--op", "explode"]).0, 2);
    assert_eq!(ctl(&env.sock, &["prune"]).0, 2);
    assert_eq!(ctl(&env.sock, &["restore", "nightly", "etc/hosts"]).0, 2);
    let out = Command::new(CTL)
        .arg("status")
        .env_remove("LAYERFS_SOCKET")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("-m MOUNTPOINT or -s SOCKET"));

    // follow --json: one record per line.
    let (code, out, err) = ctl(&env.sock, &["--json", "follow", "--from-seq", "7"]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    let r: JournalRecord = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(r, record(7));
    // follow without --from-seq starts after the current journal position.
    let (code, out, _) = ctl(&env.sock, &["follow"]);
    assert_eq!(code, 0);
    assert!(
        out.starts_with(
            "      43  2026-11-25T10:00:43Z  rename       /etc/hosts -> /etc/hosts.bak  uid=1000"
        ),
        "{out}"
    );

    let (code, out, _) = ctl(&env.sock, &["verify"]);
    assert_eq!(
        (code, out.as_str()),
        (0, "verified 10 objects (4.0 KiB): no problems\n")
    );
    env.handler.corrupt.store(true, Ordering::SeqCst);
    let (code, out, err) = ctl(&env.sock, &["verify"]);
    assert_eq!(code, 6);
    assert!(out.contains("nightly     /etc/hosts  cdcd"), "{out}");
    assert!(out.contains("corrupt"), "{out}");
    assert!(err.contains("verify found 1 problem(s)"), "{err}");
    // Progress goes to a terminal only: not in captured stderr.
    assert!(!err.contains("hashing"), "{err}");
    let (code, out, _) = ctl(&env.sock, &["--json", "verify"]);
    assert_eq!(code, 6);
    assert!(serde_json::from_str::<VerifyReport>(&out).is_ok());

    let (code, out, _) = ctl(&env.sock, &["prune", "--keep-last", "3"]);
    assert_eq!(code, 0);
    assert!(out.contains("deleted (1): old\n"), "{out}");
    assert!(out.contains("kept (1):    keep_last=Some(3)\n"), "{out}");
    assert!(out.contains("freed:       2.0 KiB\n"), "{out}");
}

#[test]
fn cli_unreachable_and_help() {
    let tmp = tempfile::tempdir().unwrap();
    let (code, _, err) = ctl(&tmp.path().join("none.sock"), &["status"]);
    assert_eq!(code, 3);
    assert!(err.contains("no layerfs control socket at"), "{err}");
    assert!(
        err.contains("is the union mounted (with an upperdir)?"),
        "{err}"
    );
    // Stale socket file.
    let stale = tmp.path().join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    let (code, _, err) = ctl(&stale, &["status"]);
    assert_eq!(code, 3);
    assert!(err.contains("stale"), "{err}");
    // -m computes the socket path from the mountpoint.
    let out = Command::new(CTL)
        .args(["-m", "/nonexistent/mnt/x", "status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/run/layerfs/nonexistent-mnt-x.sock"));

    let out = Command::new(CTL).arg("--help").output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("Exit codes:"), "{help}");
    assert!(help.contains("6  verify found corruption"), "{help}");
}
