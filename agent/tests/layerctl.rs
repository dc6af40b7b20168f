//! layerctl: its HTTP/1.1 client against a scripted fake server (framing,
//! chunked streams split across reads, error bodies, exit codes), and
//! end to end against the real layerd operating a real layerfs mount.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::{self, sleep};
use std::time::{Duration, Instant};

use layerfs_agent::http_client::{self, HttpError};
use serde_json::{json, Value};

mod common;
use common::{is_mounted, wait_for};

const LAYERCTL: &str = env!("CARGO_BIN_EXE_layerctl");
const LAYERD: &str = env!("CARGO_BIN_EXE_layerd");
const LAYERFS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/release/layerfs");

// ---- Fake HTTP server ---------------------------------------------------------

/// What the fake server does on one connection after reading the request.
type Script = Box<dyn FnOnce(&mut UnixStream) + Send>;

struct Fake {
    _dir: tempfile::TempDir,
    sock: PathBuf,
    /// Each request as received: head and body, as text.
    requests: Arc<Mutex<Vec<String>>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Fake {
    /// Serve one connection per script, in order.
    fn start(scripts: Vec<Script>) -> Fake {
        let dir = tempfile::Builder::new()
            .prefix("lctl")
            .tempdir_in("/tmp")
            .unwrap();
        let sock = dir.path().join("fake.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let reqs = requests.clone();
        let thread = thread::spawn(move || {
            for script in scripts {
                let (mut s, _) = listener.accept().unwrap();
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let req = read_request(&mut s);
                reqs.lock().unwrap().push(req);
                script(&mut s);
            }
        });
        Fake {
            _dir: dir,
            sock,
            requests,
            thread: Some(thread),
        }
    }

    /// One connection answered with `raw` in one write.
    fn answer(raw: &str) -> Fake {
        Fake::answers(vec![raw.to_string()])
    }

    /// One connection per raw response, in order.
    fn answers(raws: Vec<String>) -> Fake {
        Fake::start(
            raws.into_iter()
                .map(|r| -> Script {
                    Box::new(move |s: &mut UnixStream| {
                        let _ = s.write_all(r.as_bytes());
                    })
                })
                .collect(),
        )
    }

    fn ctl(&self, args: &[&str]) -> (i32, String, String) {
        run_ctl(&self.sock, args)
    }

    fn request(&self, i: usize) -> String {
        self.requests.lock().unwrap()[i].clone()
    }

    fn join(mut self) {
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

/// Read a request head and its Content-Length body.
fn read_request(s: &mut UnixStream) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(1) => head.push(b[0]),
            _ => break,
        }
    }
    let text = String::from_utf8_lossy(&head).to_string();
    let len = text
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse::<usize>().unwrap())
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    text + &String::from_utf8_lossy(&body)
}

/// Write `pieces` with a pause between them, so the client sees separate reads.
fn trickle(s: &mut UnixStream, pieces: &[&[u8]]) {
    for p in pieces {
        s.write_all(p).unwrap();
        s.flush().unwrap();
        sleep(Duration::from_millis(30));
    }
}

fn run_ctl(sock: &Path, args: &[&str]) -> (i32, String, String) {
    let o = Command::new(LAYERCTL)
        .arg("-s")
        .arg(sock)
        .args(args)
        .env_remove("LAYERCTL_SOCKET")
        .output()
        .unwrap();
    out3(o)
}

fn out3(o: Output) -> (i32, String, String) {
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).to_string(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    )
}

fn json_response(status: &str, body: &Value) -> String {
    let b = body.to_string();
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b}",
        b.len()
    )
}

fn record(seq: u64, path: &str) -> Value {
    json!({"seq": seq, "time_ns": 1_795_600_800_000_000_000i64 + seq as i64 * 1_000_000_000,
           "op": "write", "path": path, "uid": 1000, "gid": 1000, "pid": 42, "comm": "vim",
           "detail": "0+12"})
}

#[test]
fn chunked_body_split_across_reads() {
    let fake = Fake::start(vec![Box::new(|s: &mut UnixStream| {
        trickle(
            s,
            &[
                b"HTTP/1.1 200 OK\r\nTransfer-Enc",
                b"oding: chunked\r\nX-A: 1\r\n\r\n4",
                b"\r\nab",
                b"cd\r",
                b"\n1",
                b"0;ext=1\r\n0123456789",
                b"abcdef\r\n0\r",
                b"\n\r\n",
            ],
        )
    })]);
    let resp = http_client::send(&fake.sock, "GET", "/v1/x", None).unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("x-a"), Some("1"));
    assert_eq!(resp.header("TRANSFER-ENCODING"), Some("chunked"));
    let body = resp.read_body(1 << 20).unwrap();
    assert_eq!(body, b"abcd0123456789abcdef");
    let req = fake.request(0);
    assert!(req.starts_with("GET /v1/x HTTP/1.1\r\n"), "{req}");
    assert!(req.contains("\r\nHost: localhost\r\n"), "{req}");
    assert!(req.contains("\r\nConnection: close\r\n"), "{req}");
    fake.join();
}

#[test]
fn content_length_and_until_close() {
    let fake = Fake::start(vec![
        Box::new(|s: &mut UnixStream| {
            trickle(
                s,
                &[
                    b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello",
                    b" world",
                ],
            )
        }),
        Box::new(|s: &mut UnixStream| trickle(s, &[b"HTTP/1.0 200 OK\r\n\r\nuntil", b" close"])),
        // Closed early: 3 of 10 bytes.
        Box::new(|s: &mut UnixStream| {
            trickle(s, &[b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"])
        }),
    ]);
    let r = http_client::send(&fake.sock, "GET", "/a", None).unwrap();
    assert_eq!(r.read_body(100).unwrap(), b"hello world");
    let r = http_client::send(&fake.sock, "GET", "/b", None).unwrap();
    assert_eq!(r.read_body(100).unwrap(), b"until close");
    let r = http_client::send(&fake.sock, "GET", "/c", None).unwrap();
    match r.read_body(100) {
        Err(HttpError::Io(e)) => assert!(e.to_string().contains("3 of 10"), "{e}"),
        other => panic!(
            "{:?}",
            other.map(|b| String::from_utf8_lossy(&b).to_string())
        ),
    }
    fake.join();
}

/// A stream's data is handed out as it arrives, before the response ends.
#[test]
fn chunked_stream_is_incremental() {
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let fake = Fake::start(vec![Box::new(move |s: &mut UnixStream| {
        let line = format!("{}\n", record(7, "/etc/hosts"));
        let (a, b) = line.as_bytes().split_at(20);
        let mut msg = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n",
            a.len()
        )
        .into_bytes();
        msg.extend_from_slice(a);
        msg.extend_from_slice(format!("\r\n{:x}\r\n", b.len()).as_bytes());
        trickle(s, &[&msg, b, b"\r\n"]);
        // Hold the stream open until the client has the record.
        go_rx.recv_timeout(Duration::from_secs(20)).unwrap();
        trickle(s, &[b"0\r\n\r\n"]);
    })]);
    let resp = http_client::send(
        &fake.sock,
        "GET",
        "/v1/mounts/_/changes/follow?from_seq=7",
        None,
    )
    .unwrap();
    let mut lines = BufReader::new(resp.into_body());
    let (line, complete) = http_client::read_line(&mut lines, 1 << 20).unwrap();
    assert!(complete);
    let v: Value = serde_json::from_str(&line.unwrap()).unwrap();
    assert_eq!(v["seq"], 7);
    go_tx.send(()).unwrap();
    let (rest, _) = http_client::read_line(&mut lines, 1 << 20).unwrap();
    assert_eq!(rest, None, "clean end after the last chunk");
    fake.join();
}

/// `layerctl follow` prints each record as it comes (the server keeps the stream open).
#[test]
fn follow_prints_records_as_they_arrive() {
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let fake = Fake::start(vec![Box::new(move |s: &mut UnixStream| {
        let mut body = format!("{}\n", json!({"heartbeat": 6}));
        body.push_str(&format!("{}\n", record(7, "/etc/hosts")));
        let head = "HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n";
        let chunk = format!("{:x}\r\n{body}\r\n", body.len());
        trickle(s, &[head.as_bytes(), chunk.as_bytes()]);
        go_rx.recv_timeout(Duration::from_secs(20)).unwrap();
        let r = format!("{}\n", record(8, "/etc/motd"));
        let chunk = format!("{:x}\r\n{r}\r\n0\r\n\r\n", r.len());
        trickle(s, &[chunk.as_bytes()]);
    })]);
    let mut child = Command::new(LAYERCTL)
        .args(["-s"])
        .arg(&fake.sock)
        .args(["follow", "--from-seq", "7"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    assert!(
        first.starts_with("       7  2026-11-25T10:00:07Z  write        /etc/hosts  uid=1000 pid=42 comm=vim  0+12"),
        "{first:?}"
    );
    go_tx.send(()).unwrap();
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    assert!(rest.contains("/etc/motd"), "{rest}");
    assert_eq!(child.wait().unwrap().code(), Some(0));
    let req = fake.request(0);
    assert!(
        req.starts_with("GET /v1/mounts/_/changes/follow?from_seq=7 HTTP/1.1\r\n"),
        "{req}"
    );
    fake.join();
}

#[test]
fn error_bodies_map_to_exit_codes() {
    let denied = json!({"error": {"code": "permission_denied",
        "message": "rollback needs role manager; uid 1001 has role monitor", "required_role": "manager"}});
    let fake = Fake::answer(&json_response("403 Forbidden", &denied));
    let (code, out, err) = fake.ctl(&["rollback", "nightly"]);
    assert_eq!(code, 4, "{err}");
    assert_eq!(out, "");
    assert_eq!(
        err,
        "layerctl: rollback needs role manager; uid 1001 has role monitor\n"
    );
    let req = fake.request(0);
    assert!(
        req.starts_with("POST /v1/mounts/_/rollback HTTP/1.1\r\n"),
        "{req}"
    );
    assert!(
        req.contains("\r\nContent-Type: application/json\r\n"),
        "{req}"
    );
    assert!(
        req.ends_with("\r\n\r\n{\"checkpoint\":\"nightly\"}"),
        "{req}"
    );
    fake.join();

    // A message without the role gets it appended.
    let denied = json!({"error": {"code": "permission_denied", "message": "denied", "required_role": "user"}});
    let fake = Fake::answer(&json_response("403 Forbidden", &denied));
    let (code, _, err) = fake.ctl(&["checkpoint", "create"]);
    assert_eq!(
        (code, err.as_str()),
        (4, "layerctl: denied (needs role user)\n")
    );
    fake.join();

    for (status, code, body, want) in [
        ("404 Not Found", "not_found", "no checkpoint named 'x'", 5),
        (
            "503 Service Unavailable",
            "unavailable",
            "the control socket of mount root is gone",
            3,
        ),
        ("400 Bad Request", "bad_request", "bad name", 2),
        ("409 Conflict", "busy", "another rollback is running", 1),
        (
            "500 Internal Server Error",
            "corrupt",
            "object abc is corrupt",
            6,
        ),
    ] {
        let e = json!({"error": {"code": code, "message": body}});
        let fake = Fake::answer(&json_response(status, &e));
        let (c, _, err) = fake.ctl(&["checkpoint", "show", "x"]);
        assert_eq!(c, want, "{status}: {err}");
        assert_eq!(err, format!("layerctl: {body}\n"));
        fake.join();
    }

    // Not JSON (a proxy, an old server): the status decides, the text is shown.
    let fake = Fake::answer(
        "HTTP/1.1 404 Not Found\r\nContent-Length: 33\r\n\r\nunknown path; this API is at /v1\n",
    );
    let (c, _, err) = fake.ctl(&["status"]);
    assert_eq!(c, 5);
    assert!(
        err.contains("HTTP 404: unknown path; this API is at /v1"),
        "{err}"
    );
    fake.join();
    let fake = Fake::answer("HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n");
    let (c, _, err) = fake.ctl(&["verify"]);
    assert_eq!(c, 1);
    assert!(err.contains("HTTP 500: no details"), "{err}");
    fake.join();

    // Garbage instead of HTTP: 1; closed without an answer: 3.
    let fake = Fake::answer("SSH-2.0-OpenSSH\r\n\r\n");
    let (c, _, err) = fake.ctl(&["status"]);
    assert_eq!(c, 1, "{err}");
    assert!(err.contains("bad status line"), "{err}");
    fake.join();
    let fake = Fake::answer("");
    let (c, _, err) = fake.ctl(&["status"]);
    assert_eq!(c, 3, "{err}");
    fake.join();
}

#[test]
fn requests_and_rendering() {
    let list = json!([
        {"name": "nightly", "id": "ab", "time_ns": 1_795_600_800_000_000_000i64, "message": "before upgrade",
         "seq": 5, "files": 1234, "dirs": 3, "others": 0, "bytes": 3_145_728, "auto": false,
         "hold_ms": null, "took_ms": null},
        {"name": "pre-rollback-1", "id": "cd", "time_ns": 1_795_600_800_000_000_000i64, "message": null,
         "seq": 6, "files": 9, "dirs": 1, "others": 0, "bytes": 1536, "auto": true,
         "hold_ms": null, "took_ms": null}
    ]);
    let created = list[0].clone();
    let records = json!([record(1, "/etc/hosts")]);
    let verify = json!({"objects": 3, "bytes": 10, "problems": [
        {"checkpoint": "nightly", "path": "/etc/hosts", "object": "cdcd", "problem": "corrupt"}]});
    let scripts = vec![
        json_response("200 OK", &list),
        json_response("201 Created", &created),
        json_response("200 OK", &records),
        json_response("200 OK", &json!([])),
        json_response("200 OK", &verify),
        json_response(
            "200 OK",
            &json!({"deleted": ["old"], "kept": ["new"], "freed_bytes": 2048}),
        ),
        json_response("200 OK", &json!([])),
    ];
    let fake = Fake::answers(scripts);

    let (code, out, err) = fake.ctl(&["checkpoint", "list"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        "\
NAME            TIME                  FILES     SIZE  MESSAGE
nightly         2026-11-25T10:00:00Z   1234  3.0 MiB  before upgrade
pre-rollback-1  2026-11-25T10:00:00Z      9  1.5 KiB  [auto]
"
    );
    assert!(fake
        .request(0)
        .starts_with("GET /v1/mounts/_/checkpoints HTTP/1.1\r\n"));

    let (code, out, err) = fake.ctl(&[
        "-m",
        "web app",
        "checkpoint",
        "create",
        "--name",
        "n/1",
        "--message",
        "m x",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with("created checkpoint nightly (1234 files"),
        "{out}"
    );
    let req = fake.request(1);
    assert!(
        req.starts_with("POST /v1/mounts/web%20app/checkpoints HTTP/1.1\r\n"),
        "{req}"
    );
    let body: Value = serde_json::from_str(req.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body, json!({"name": "n/1", "message": "m x"}));

    let (code, out, _) = fake.ctl(&[
        "log",
        "--since",
        "1795600800",
        "--path",
        "/etc",
        "--op",
        "write,rename",
        "--uid",
        "0",
        "--limit",
        "5",
    ]);
    assert_eq!(code, 0);
    assert!(out.starts_with("SEQ  TIME"), "{out}");
    assert!(out.contains("/etc/hosts"), "{out}");
    assert!(
        fake.request(2).starts_with(
            "GET /v1/mounts/_/changes?since_ns=1795600800000000000&path=%2Fetc&op=write&op=rename&uid=0&limit=5 HTTP/1.1\r\n"
        ),
        "{}",
        fake.request(2)
    );

    let (code, out, err) = fake.ctl(&["checkpoint", "diff", "a b", "c"]);
    assert_eq!((code, out.as_str()), (0, ""));
    assert_eq!(err, "no differences\n");
    assert!(fake
        .request(3)
        .starts_with("GET /v1/mounts/_/checkpoints/a%20b/diff?to=c HTTP/1.1\r\n"));

    let (code, out, err) = fake.ctl(&["verify"]);
    assert_eq!(code, 6);
    assert!(out.contains("nightly     /etc/hosts  cdcd"), "{out}");
    assert!(err.contains("verify found 1 problem(s)"), "{err}");
    // Progress only on a terminal.
    assert!(!err.contains("..."), "{err}");
    let req = fake.request(4);
    assert!(
        req.starts_with("POST /v1/mounts/_/verify HTTP/1.1\r\n"),
        "{req}"
    );
    assert!(req.contains("\r\nContent-Length: 0\r\n"), "{req}");

    let (code, out, _) = fake.ctl(&["prune", "--keep-last", "3", "--keep-daily", "2"]);
    assert_eq!(code, 0);
    assert!(out.contains("deleted (1): old\n"), "{out}");
    let body: Value =
        serde_json::from_str(fake.request(5).split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body, json!({"keep_last": 3, "keep_daily": 2}));

    let (code, _, err) = fake.ctl(&[
        "audit",
        "--denied",
        "--op",
        "checkpoint-create",
        "--uid",
        "7",
    ]);
    assert_eq!(code, 0);
    assert_eq!(err, "no audit records match\n");
    assert!(
        fake.request(6)
            .starts_with("GET /v1/audit?uid=7&op=checkpoint_create&denied=true HTTP/1.1\r\n"),
        "{}",
        fake.request(6)
    );
    fake.join();
}

#[test]
fn unreachable_usage_and_completions() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out, err) = run_ctl(&dir.path().join("none.sock"), &["status"]);
    assert_eq!((code, out.as_str()), (3, ""));
    assert!(err.contains("cannot reach layerd at"), "{err}");
    assert!(err.contains("systemctl status layerd.socket"), "{err}");
    // A socket file nobody listens on.
    let stale = dir.path().join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    assert_eq!(run_ctl(&stale, &["status"]).0, 3);
    // LAYERCTL_SOCKET is used without -s.
    let o = Command::new(LAYERCTL)
        .arg("status")
        .env("LAYERCTL_SOCKET", dir.path().join("env.sock"))
        .output()
        .unwrap();
    let (code, _, err) = out3(o);
    assert_eq!(code, 3);
    assert!(err.contains("env.sock"), "{err}");

    for bad in [
        &["prune"][..],
        &["restore", "x", "etc/hosts"],
        &["log", "--since", "yesterday"],
        &["log", "--op", "explode"],
        &["nonsense"],
        &["completions", "tcsh"],
    ] {
        assert_eq!(run_ctl(&stale, bad).0, 2, "{bad:?}");
    }

    for shell in ["bash", "zsh", "fish"] {
        let (code, out, err) = run_ctl(&stale, &["completions", shell]);
        assert_eq!(code, 0, "{err}");
        assert!(out.contains("layerctl"), "{shell}");
        assert!(out.contains("checkpoint"), "{shell}");
    }
}

// ---- End to end: real layerd, real layerfs mount --------------------------------

/// A layerfs mount and a layerd operating it, in one scratch directory.
struct Env {
    tmp: tempfile::TempDir,
    mnt: PathBuf,
    sock: PathBuf,
    layerfs: Option<Child>,
    layerd: Option<Child>,
}

impl Env {
    fn start() -> Env {
        assert!(
            Path::new(LAYERFS).exists(),
            "{LAYERFS} is missing: run `cargo build --release -p layerfs` first"
        );
        let tmp = common::shared_tempdir("lctl-e2e");
        let root = tmp.path().to_path_buf();
        for d in ["l1/etc", "u", "w", "m", "state"] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        fs::write(root.join("l1/etc/hosts"), "base\n").unwrap();
        let mnt = root.join("m");
        let ctl_sock = root.join("ctl.sock");
        let opts = format!(
            "lowerdir={},upperdir={},workdir={},control={}",
            root.join("l1").display(),
            root.join("u").display(),
            root.join("w").display(),
            ctl_sock.display()
        );
        let layerfs = Command::new(LAYERFS)
            .arg("-f")
            .arg("-o")
            .arg(&opts)
            .arg(&mnt)
            .env("RUST_LOG", "warn,fuser::session=error")
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let mut env = Env {
            sock: root.join("layerd.sock"),
            mnt: mnt.clone(),
            layerfs: Some(layerfs),
            layerd: None,
            tmp,
        };
        wait_for("layerfs mount", 30, || {
            is_mounted(&mnt) && ctl_sock.exists()
        });
        let config = format!(
            "socket = \"{}\"\nstate_dir = \"{}\"\nserver_id = \"test01\"\n\n\
             [[mount]]\nname = \"root\"\npath = \"{}\"\nsocket = \"{}\"\n\n\
             [[grant]]\nrole = \"monitor\"\nuids = [65534]\n",
            env.sock.display(),
            root.join("state").display(),
            mnt.display(),
            ctl_sock.display()
        );
        let config_path = root.join("agent.toml");
        fs::write(&config_path, config).unwrap();
        let log = fs::File::create(root.join("layerd.log")).unwrap();
        env.layerd = Some(
            Command::new(LAYERD)
                .arg("--config")
                .arg(&config_path)
                .env("RUST_LOG", "info")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
        let sock = env.sock.clone();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = http_client::send(&sock, "GET", "/v1/status", None)
                .map(|r| r.status == 200)
                .unwrap_or(false);
            if ok {
                break;
            }
            if let Some(Ok(Some(st))) = env.layerd.as_mut().map(|c| c.try_wait()) {
                panic!("layerd exited ({st}): {}", env.layerd_log());
            }
            assert!(
                Instant::now() < deadline,
                "layerd does not answer /v1/status: {}",
                env.layerd_log()
            );
            sleep(Duration::from_millis(50));
        }
        env
    }

    fn layerd_log(&self) -> String {
        fs::read_to_string(self.tmp.path().join("layerd.log")).unwrap_or_default()
    }

    fn m(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    fn ctl(&self, args: &[&str]) -> (i32, String, String) {
        run_ctl(&self.sock, args)
    }

    /// Run layerctl, expect exit 0, return stdout.
    fn ok(&self, args: &[&str]) -> String {
        let (code, out, err) = self.ctl(args);
        assert_eq!(
            code,
            0,
            "layerctl {args:?}: {err}\nlayerd log:\n{}",
            self.layerd_log()
        );
        out
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let out = self.ok(&a);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
    }

    /// layerctl as uid/gid 65534 (nobody).
    fn ctl_nobody(&self, args: &[&str]) -> (i32, String, String) {
        let o = Command::new(LAYERCTL)
            .arg("-s")
            .arg(&self.sock)
            .args(args)
            .uid(65534)
            .gid(65534)
            .current_dir("/")
            .output()
            .unwrap();
        out3(o)
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(d) = self.layerd.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(d.id().to_string())
                .status();
            common::reap(d, Duration::from_secs(10));
        }
        common::unmount(&self.mnt, self.layerfs.take());
    }
}

fn journal_seq(env: &Env) -> u64 {
    let v = env.json(&["status"]);
    v["mounts"][0]["status"]["journal_seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("no journal_seq in {v}"))
}

#[test]
fn e2e_checkpoints_rollback_restore_verify() {
    let env = Env::start();
    let out = env.ok(&["status"]);
    assert!(out.contains("mount root ("), "{out}");
    assert!(out.contains("journal seq:"), "{out}");
    let out = env.ok(&["-m", "root", "status"]);
    assert!(out.contains("mount root ("), "{out}");
    let v = env.json(&["status"]);
    assert_eq!(v["mounts"][0]["name"], "root");
    assert!(v["mounts"][0]["status"].is_object(), "{v}");

    fs::write(env.m("etc/hosts"), "v1\n").unwrap();
    fs::write(env.m("a.txt"), "a\n").unwrap();
    wait_for("journal records", 10, || journal_seq(&env) >= 2);

    let out = env.ok(&["log", "--path", "/a.txt"]);
    assert!(out.starts_with("SEQ  TIME"), "{out}");
    assert!(out.contains("/a.txt"), "{out}");
    let recs = env.json(&["log", "--op", "write", "--path", "/etc"]);
    let recs = recs.as_array().unwrap();
    assert!(!recs.is_empty());
    // A write may be folded into the record of the open's truncation.
    let wrote = |r: &serde_json::Value| {
        r["op"] == "write"
            || r["also"]
                .as_array()
                .is_some_and(|a| a.iter().any(|o| o == "write"))
    };
    assert!(
        recs.iter()
            .all(|r| wrote(r) && r["path"].as_str().unwrap().starts_with("/etc")),
        "{recs:?}"
    );

    let out = env.ok(&["checkpoint", "create", "--name", "c1", "--message", "first"]);
    assert!(out.starts_with("created checkpoint c1 ("), "{out}");

    fs::write(env.m("etc/hosts"), "v2\n").unwrap();
    fs::remove_file(env.m("a.txt")).unwrap();
    fs::write(env.m("b.txt"), "b\n").unwrap();

    let out = env.ok(&["checkpoint", "list"]);
    assert!(out.starts_with("NAME"), "{out}");
    assert!(out.contains("c1 ") && out.contains("first"), "{out}");
    let out = env.ok(&["-m", "root", "checkpoint", "show", "c1"]);
    assert!(out.contains("name:") && out.contains("c1"), "{out}");
    let out = env.ok(&["checkpoint", "diff", "c1"]);
    assert!(out.contains("A  /b.txt"), "{out}");
    assert!(out.contains("D  /a.txt"), "{out}");
    assert!(out.contains("M  /etc/hosts"), "{out}");

    env.ok(&["checkpoint", "create", "--name", "c2"]);
    let out = env.ok(&["checkpoint", "diff", "c1", "c2"]);
    assert!(out.contains("A  /b.txt"), "{out}");

    let out = env.ok(&["rollback", "c1"]);
    assert!(out.starts_with("rolled back to c1:"), "{out}");
    assert_eq!(fs::read_to_string(env.m("etc/hosts")).unwrap(), "v1\n");
    assert_eq!(fs::read_to_string(env.m("a.txt")).unwrap(), "a\n");
    assert!(!env.m("b.txt").exists());

    let out = env.ok(&["restore", "c2", "/b.txt"]);
    assert!(out.starts_with("restored from checkpoint c2:"), "{out}");
    assert_eq!(fs::read_to_string(env.m("b.txt")).unwrap(), "b\n");
    assert_eq!(fs::read_to_string(env.m("etc/hosts")).unwrap(), "v1\n");

    let out = env.ok(&["verify"]);
    assert!(out.contains("no problems"), "{out}");

    let (code, _, err) = env.ctl(&["checkpoint", "show", "nope"]);
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("nope"), "{err}");
    let (code, _, err) = env.ctl(&["-m", "nosuch", "status"]);
    assert_eq!(code, 5, "{err}");
    let (code, _, err) = env.ctl(&["-m", "nosuch", "checkpoint", "list"]);
    assert_eq!(code, 5, "{err}");

    let out = env.ok(&["prune", "--keep-last", "100"]);
    assert!(out.contains("deleted (0)"), "{out}");
    let out = env.ok(&["checkpoint", "delete", "c2"]);
    assert!(out.starts_with("deleted checkpoint c2"), "{out}");

    let out = env.ok(&["audit"]);
    assert!(out.starts_with("SEQ"), "{out}");
    assert!(out.contains("rollback"), "{out}");
    assert!(out.contains("checkpoint_create"), "{out}");
    let recs = env.json(&["audit", "--op", "rollback"]);
    let recs = recs.as_array().unwrap();
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!(recs[0]["result"], "ok");
    assert_eq!(recs[0]["mount"], "root");
}

#[test]
fn e2e_roles_and_audit_of_denials() {
    let env = Env::start();
    env.ok(&["checkpoint", "create", "--name", "base"]);

    // Monitor may look.
    let (code, out, err) = env.ctl_nobody(&["status"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("journal seq:"), "{out}");
    let (code, _, err) = env.ctl_nobody(&["checkpoint", "list"]);
    assert_eq!(code, 0, "{err}");

    // ... but not change anything: exit 4, naming the role needed.
    let (code, _, err) = env.ctl_nobody(&["rollback", "base"]);
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("rollback needs role manager"), "{err}");
    let (code, _, err) = env.ctl_nobody(&["checkpoint", "create"]);
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("needs role user"), "{err}");
    let (code, _, err) = env.ctl_nobody(&["audit"]);
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("layerctl audit --uid 65534"), "{err}");
    // Its own calls it may read.
    let (code, out, err) = env.ctl_nobody(&["--json", "audit", "--uid", "65534"]);
    assert_eq!(code, 0, "{err}");
    let own: Value = serde_json::from_str(&out).unwrap();
    assert!(!own.as_array().unwrap().is_empty(), "{own}");

    let recs = env.json(&["audit", "--denied"]);
    let recs = recs.as_array().unwrap();
    let rb = recs
        .iter()
        .find(|r| r["op"] == "rollback")
        .unwrap_or_else(|| panic!("no denied rollback in {recs:?}"));
    assert_eq!(rb["result"], "denied");
    assert_eq!(rb["caller"]["uid"], 65534);
    assert_eq!(rb["role"], "monitor");
    assert!(recs.iter().all(|r| r["result"] == "denied"), "{recs:?}");
    let out = env.ok(&["audit", "--denied", "--uid", "65534"]);
    assert!(out.contains("uid 65534"), "{out}");
    assert!(out.contains("denied"), "{out}");
    // The union is unchanged.
    assert_eq!(fs::read_to_string(env.m("etc/hosts")).unwrap(), "base\n");
}

#[test]
fn e2e_follow_sees_later_changes() {
    let env = Env::start();
    // A change before follow starts is not printed.
    fs::write(env.m("before.txt"), "x\n").unwrap();
    wait_for("the record of before.txt", 10, || {
        env.json(&["log", "--path", "/before.txt"])
            .as_array()
            .is_some_and(|a| !a.is_empty())
    });
    let mut child = Command::new(LAYERCTL)
        .arg("-s")
        .arg(&env.sock)
        .args(["--json", "follow"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    let reader = thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Give follow time to read the journal position and open the stream:
    // anything written after its status call is included either way.
    sleep(Duration::from_millis(500));
    fs::write(env.m("followed.txt"), "hello\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    let found = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let v: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("not a JSON record ({e}): {line}"));
                assert!(v["seq"].is_u64(), "{v}");
                let hit = v["path"] == "/followed.txt";
                seen.push(line);
                if hit {
                    break true;
                }
            }
            Err(_) => break false,
        }
    };
    let _ = child.kill();
    let status = child.wait().unwrap();
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let _ = reader.join();
    assert!(
        found,
        "follow printed no record of /followed.txt; got {seen:?}; exit {status:?}; stderr: {err}\nlayerd log:\n{}",
        env.layerd_log()
    );
    // Nothing before the start was printed (follow begins after the current position).
    assert!(!seen.iter().any(|l| l.contains("/before.txt")), "{seen:?}");
}

/// A stream cut without its last chunk (the mount went away) is a failure;
/// one that ends with the last chunk (layerd shutting down) is not.
#[test]
fn follow_stream_cut_or_ended() {
    let line = format!("{}\n", record(3, "/x"));
    let head = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
    let cut = format!("{head}{:x}\r\n{line}\r\n", line.len());
    let ended = format!("{cut}0\r\n\r\n");
    let fake = Fake::answers(vec![cut, ended]);
    let (code, out, err) = fake.ctl(&["--json", "follow", "--from-seq", "3"]);
    assert_eq!(code, 3, "{err}");
    assert_eq!(out, line);
    assert!(
        err.contains("the journal stream ended unexpectedly"),
        "{err}"
    );
    let (code, out, err) = fake.ctl(&["--json", "follow", "--from-seq", "3"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, line);
    assert!(err.contains("layerd ended the stream"), "{err}");
    fake.join();
}
