//! The coordinator link end to end, with real processes: a mounted layerfs
//! (target/release/layerfs, built by `cargo build --release --workspace`),
//! a real layerd and a real layerfs-coordinator on 127.0.0.x.
//!
//! Run: `cargo build --release --workspace && cargo test --release -p layerfs-agent --test coordinator`.
//! Benchmark (figures only): `... --test coordinator -- --ignored --nocapture bench_`.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread::sleep;
use std::time::{Duration, Instant};

use layerfs::control::client::Client;
use layerfs::control::proto::Op;

mod common;
use common::is_mounted;
use serde_json::{json, Value};

const LAYERFS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/release/layerfs");
const LAYERD: &str = env!("CARGO_BIN_EXE_layerd");
const COORD: &str = env!("CARGO_BIN_EXE_layerfs-coordinator");
const TOKEN: &str = "0123456789abcdef-test-token";
const SERVER: &str = "guest01";

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        sleep(Duration::from_millis(25));
    }
}

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("lfco")
        .tempdir_in("/tmp")
        .expect("tempdir")
}

/// Logs without terminal colour sequences (ESC [ ... m).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars();
    while let Some(c) = it.next() {
        if c == '\x1b' {
            for c in it.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Write a secret file readable by its owner only.
fn write_secret(p: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(p, text).unwrap();
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).unwrap();
}

// ---- A mounted layerfs ----------------------------------------------------------

struct Mount {
    _tmp: tempfile::TempDir,
    mnt: PathBuf,
    ctl: PathBuf,
    opts: String,
    child: Option<Child>,
}

impl Mount {
    fn new() -> Mount {
        assert!(
            Path::new(LAYERFS).exists(),
            "{LAYERFS} is missing: run `cargo build --release --workspace` first"
        );
        let tmp = tempdir();
        let r = tmp.path();
        for d in ["lower", "upper", "work", "mnt"] {
            std::fs::create_dir_all(r.join(d)).unwrap();
        }
        std::fs::write(r.join("lower/base.txt"), "base\n").unwrap();
        let mnt = r.join("mnt");
        let ctl = r.join("ctl.sock");
        let opts = format!(
            "lowerdir={},upperdir={},workdir={},control={}",
            r.join("lower").display(),
            r.join("upper").display(),
            r.join("work").display(),
            ctl.display()
        );
        let mut m = Mount {
            _tmp: tmp,
            mnt,
            ctl,
            opts,
            child: None,
        };
        m.mount();
        m
    }

    fn mount(&mut self) {
        let child = Command::new(LAYERFS)
            .args(["-f", "-o", &self.opts])
            .arg(&self.mnt)
            .env("RUST_LOG", "warn,fuser::session=error")
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn layerfs");
        self.child = Some(child);
        let (mnt, ctl) = (&self.mnt, &self.ctl);
        wait_until(
            "layerfs mount and control socket",
            Duration::from_secs(20),
            || is_mounted(mnt) && layerfs::sys::statfs_errno(mnt).is_none() && ctl.exists(),
        );
    }

    fn unmount(&mut self) {
        common::unmount(&self.mnt, self.child.take());
    }

    fn journal_seq(&self) -> u64 {
        let mut c = Client::connect(&self.ctl).expect("control socket");
        let st = c.call(Op::Status).expect("status");
        st["journal_seq"].as_u64().expect("journal_seq")
    }

    fn control(&self, op: Op) -> Value {
        Client::connect(&self.ctl)
            .expect("control socket")
            .call(op)
            .expect("control call")
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        self.unmount();
    }
}

// ---- The coordinator --------------------------------------------------------------

struct Coordinator {
    dir: tempfile::TempDir,
    child: Option<Child>,
    addr: SocketAddr,
    tls: Option<(PathBuf, PathBuf)>,
}

impl Coordinator {
    fn start(host: &str) -> Coordinator {
        Coordinator::start_tls(host, None)
    }

    fn start_tls(host: &str, tls: Option<(PathBuf, PathBuf)>) -> Coordinator {
        let dir = tempdir();
        write_secret(&dir.path().join("token"), &format!("# agents\n{TOKEN}\n"));
        let mut c = Coordinator {
            dir,
            child: None,
            addr: format!("{host}:0").parse().unwrap(),
            tls,
        };
        c.spawn();
        c
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Start (again) on the same address and data; waits for "listening on".
    fn spawn(&mut self) {
        let mut cmd = Command::new(COORD);
        cmd.arg("serve")
            .arg("--listen")
            .arg(self.addr.to_string())
            .arg("--data")
            .arg(self.data())
            .arg("--token-file")
            .arg(self.dir.path().join("token"));
        if let Some((cert, key)) = &self.tls {
            cmd.arg("--cert").arg(cert).arg("--key").arg(key);
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("coordinator.log"))
            .unwrap();
        let mut child = cmd
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn layerfs-coordinator");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(20)).unwrap_or_default();
        let Some(addr) = line.trim().strip_prefix("listening on ") else {
            let _ = child.kill();
            panic!("coordinator did not start: {line:?}\n{}", self.log());
        };
        self.addr = addr.parse().unwrap();
        self.child = Some(child);
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    fn log(&self) -> String {
        strip_ansi(
            &std::fs::read_to_string(self.dir.path().join("coordinator.log")).unwrap_or_default(),
        )
    }

    fn cli(&self, args: &[&str]) -> (bool, String) {
        let o = Command::new(COORD)
            .arg("--data")
            .arg(self.data())
            .args(args)
            .output()
            .expect("run layerfs-coordinator");
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).to_string(),
        )
    }

    fn json(&self, args: &[&str]) -> (bool, Value) {
        let (ok, out) = self.cli(args);
        let v = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out:?}"));
        (ok, v)
    }

    fn servers(&self) -> Vec<Value> {
        let (ok, v) = self.json(&["servers"]);
        assert!(ok, "{v}");
        v.as_array().unwrap().clone()
    }

    fn server(&self) -> Option<Value> {
        self.servers()
            .into_iter()
            .find(|s| s["server_id"] == SERVER)
    }

    fn connected(&self) -> bool {
        self.server().is_some_and(|s| s["connected"] == true)
    }

    /// (highest stored seq, records stored) of guest01/root.
    fn stored(&self) -> (u64, u64) {
        match self.server() {
            Some(s) => {
                let m = &s["mounts"][0];
                (
                    m["stored_seq"].as_u64().unwrap_or(0),
                    m["stored_records"].as_u64().unwrap_or(0),
                )
            }
            None => (0, 0),
        }
    }

    /// Stored records, read back from the log through the admin socket.
    fn changes(&self) -> Vec<Value> {
        let (ok, v) = self.json(&["changes", "--server", SERVER, "--mount", "root"]);
        assert!(ok, "{v}");
        v.as_array().unwrap().clone()
    }

    fn command(&self, args: &[&str]) -> (bool, Value) {
        let mut a = vec!["command", "--server", SERVER, "--timeout", "60"];
        a.extend_from_slice(args);
        self.json(&a)
    }

    /// Every seq 1..=journal_seq stored exactly once, in order.
    fn assert_exactly_once(&self, journal_seq: u64) {
        let recs = self.changes();
        let seqs: Vec<u64> = recs.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
        let unique: BTreeSet<u64> = seqs.iter().copied().collect();
        assert_eq!(unique.len(), seqs.len(), "duplicates stored");
        assert_eq!(seqs, (1..=journal_seq).collect::<Vec<_>>(), "stored seqs");
        // The raw file agrees with the admin view.
        let raw = std::fs::read_to_string(
            self.data()
                .join("servers/guest01/mounts/root/changes.jsonl"),
        )
        .unwrap();
        assert_eq!(raw.lines().count() as u64, journal_seq);
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        self.kill9();
    }
}

// ---- layerd ----------------------------------------------------------------------------

struct Layerd {
    dir: tempfile::TempDir,
    child: Option<Child>,
}

struct LinkOpts<'a> {
    address: String,
    token: &'a str,
    role: &'a str,
    ca_file: Option<&'a Path>,
    server_name: Option<&'a str>,
}

impl<'a> LinkOpts<'a> {
    fn to(c: &Coordinator) -> LinkOpts<'a> {
        LinkOpts {
            address: c.addr.to_string(),
            token: TOKEN,
            role: "manager",
            ca_file: None,
            server_name: None,
        }
    }
}

impl Layerd {
    fn start(m: &Mount, link: LinkOpts) -> Layerd {
        let dir = tempdir();
        let d = dir.path();
        write_secret(&d.join("token"), &format!("{}\n", link.token));
        let mut toml = format!(
            "socket = \"{}\"\nstate_dir = \"{}\"\nserver_id = \"{SERVER}\"\n\n[[mount]]\nname = \"root\"\npath = \"{}\"\nsocket = \"{}\"\n\n[coordinator]\naddress = \"{}\"\ntoken_file = \"{}\"\nrole = \"{}\"\n",
            d.join("layerd.sock").display(),
            d.join("state").display(),
            m.mnt.display(),
            m.ctl.display(),
            link.address,
            d.join("token").display(),
            link.role,
        );
        if let Some(ca) = link.ca_file {
            toml += &format!("ca_file = \"{}\"\n", ca.display());
        }
        if let Some(n) = link.server_name {
            toml += &format!("server_name = \"{n}\"\n");
        }
        std::fs::write(d.join("agent.toml"), toml).unwrap();
        let mut l = Layerd { dir, child: None };
        l.spawn();
        l
    }

    fn spawn(&mut self) {
        let d = self.dir.path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("layerd.log"))
            .unwrap();
        let child = Command::new(LAYERD)
            .arg("--config")
            .arg(d.join("agent.toml"))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn layerd");
        self.child = Some(child);
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    fn log(&self) -> String {
        strip_ansi(&std::fs::read_to_string(self.dir.path().join("layerd.log")).unwrap_or_default())
    }

    /// GET on the local HTTP API (HTTP/1.1 over the Unix socket).
    fn get(&self, path: &str) -> Value {
        let mut s = std::os::unix::net::UnixStream::connect(self.dir.path().join("layerd.sock"))
            .expect("layerd socket");
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: l\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).unwrap();
        let text = String::from_utf8_lossy(&resp);
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let body = if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            dechunk(body)
        } else {
            body.to_string()
        };
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {text}"))
    }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((len, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

impl Drop for Layerd {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Mount + coordinator + layerd, connected.
fn connected(role: &str) -> (Mount, Coordinator, Layerd) {
    let m = Mount::new();
    let c = Coordinator::start("127.0.0.1");
    let l = Layerd::start(
        &m,
        LinkOpts {
            role,
            ..LinkOpts::to(&c)
        },
    );
    wait_until("layerd registered", Duration::from_secs(20), || {
        c.connected()
    });
    (m, c, l)
}

// ---- 1. A change arrives, with its process name -------------------------------------

#[test]
fn change_arrives_with_process_name() {
    let (m, c, l) = connected("manager");
    let st = Command::new("touch")
        .arg(m.p("hello.txt"))
        .status()
        .unwrap();
    assert!(st.success());
    wait_until(
        "the record at the coordinator",
        Duration::from_secs(20),
        || {
            c.changes()
                .iter()
                .any(|r| r["path"] == "/hello.txt" && r["comm"] == "touch")
        },
    );
    let recs = c.changes();
    let r = recs.iter().find(|r| r["path"] == "/hello.txt").unwrap();
    assert_eq!(r["op"], "create", "{r}");
    assert!(r["pid"].as_u64().unwrap() > 0);
    // Registration: server, mount path, layers (status), checkpoints.
    let s = c.server().unwrap();
    assert_eq!(s["connected"], true);
    assert!(!s["hostname"].as_str().unwrap().is_empty());
    let mount = &s["mounts"][0];
    assert_eq!(mount["name"], "root");
    assert_eq!(mount["path"], m.mnt.display().to_string());
    assert!(
        mount["status"]["lowers"][0]
            .as_str()
            .unwrap()
            .ends_with("/lower"),
        "{mount}"
    );
    assert!(mount["checkpoints"].is_array(), "{mount}");
    // layerd shows the link in its status.
    wait_until(
        "link state in layerd's status",
        Duration::from_secs(5),
        || {
            let st = l.get("/v1/status");
            st["agent"]["coordinator"]["state"]["state"] == "connected"
        },
    );
    c.assert_exactly_once(m.journal_seq());
}

// ---- 2. Commands from the coordinator ------------------------------------------------

#[test]
fn checkpoint_and_rollback_commanded_by_the_coordinator() {
    let (m, c, _l) = connected("manager");
    std::fs::write(m.p("app.conf"), "one\n").unwrap();
    let (ok, r) = c.command(&["checkpoint", "--name", "cp1", "--message", "before"]);
    assert!(ok, "{r}");
    assert_eq!(r["ok"], true);
    assert_eq!(r["result"]["name"], "cp1");

    std::fs::write(m.p("app.conf"), "two\n").unwrap();
    std::fs::write(m.p("new.txt"), "new\n").unwrap();
    std::fs::remove_file(m.p("base.txt")).unwrap();
    let (ok, r) = c.command(&["rollback", "cp1"]);
    assert!(ok, "{r}");
    assert_eq!(r["ok"], true);
    assert!(r["result"]["changed_paths"].as_u64().unwrap() >= 3, "{r}");
    assert!(r["result"]["saved_as"].is_string(), "{r}");
    assert_eq!(std::fs::read_to_string(m.p("app.conf")).unwrap(), "one\n");
    assert!(!m.p("new.txt").exists());
    assert_eq!(std::fs::read_to_string(m.p("base.txt")).unwrap(), "base\n");

    // Restore of one path, status, checkpoint list; a failing command is reported as such.
    std::fs::write(m.p("app.conf"), "three\n").unwrap();
    let (ok, r) = c.command(&["restore", "cp1", "/app.conf"]);
    assert!(ok, "{r}");
    assert_eq!(std::fs::read_to_string(m.p("app.conf")).unwrap(), "one\n");
    let (ok, r) = c.command(&["status"]);
    assert!(ok, "{r}");
    assert_eq!(r["result"]["mounts"][0]["name"], "root");
    let (ok, r) = c.command(&["checkpoints"]);
    assert!(ok, "{r}");
    assert!(r["result"]
        .as_array()
        .unwrap()
        .iter()
        .any(|cp| cp["name"] == "cp1"));
    let (ok, r) = c.command(&["rollback", "no-such-checkpoint"]);
    assert!(!ok);
    assert_eq!(r["ok"], false);
    assert_eq!(r["error"]["code"], "not_found", "{r}");

    // The inventory follows (sent after state-changing commands) and commands are logged.
    wait_until("inventory with cp1", Duration::from_secs(10), || {
        c.server().unwrap()["mounts"][0]["checkpoints"]
            .as_array()
            .is_some_and(|a| a.iter().any(|cp| cp["name"] == "cp1"))
    });
    let log = std::fs::read_to_string(c.data().join("servers/guest01/commands.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 6, "{log}");
    // The rollback's own journal record reaches the coordinator too.
    wait_until("rollback record", Duration::from_secs(10), || {
        c.changes().iter().any(|r| r["op"] == "rollback")
    });
    // Commands to a server that is not connected fail clearly.
    let (ok, r) = c.json(&["command", "--server", "nobody", "status"]);
    assert!(!ok);
    assert_eq!(r["error"]["code"], "not_connected", "{r}");
}

// ---- 3. Coordinator down: nothing lost ---------------------------------------------

#[test]
fn coordinator_killed_changes_kept_and_delivered_once() {
    let (m, mut c, _l) = connected("manager");
    std::fs::write(m.p("before.txt"), "x").unwrap();
    wait_until("first records", Duration::from_secs(20), || {
        c.stored().0 == m.journal_seq()
    });
    c.kill9();
    for i in 0..500 {
        std::fs::create_dir(m.p(&format!("d{i}"))).unwrap();
    }
    let seq = m.journal_seq();
    assert!(seq >= 500);
    sleep(Duration::from_millis(500));
    c.spawn();
    wait_until(
        "all records after the restart",
        Duration::from_secs(30),
        || c.stored().0 == seq,
    );
    c.assert_exactly_once(seq);
    let recs = c.changes();
    for i in 0..500 {
        let p = format!("/d{i}");
        assert_eq!(
            recs.iter()
                .filter(|r| r["path"] == p.as_str() && r["op"] == "mkdir")
                .count(),
            1,
            "{p}"
        );
    }
}

// ---- 4. layerd killed mid-stream: nothing lost, no duplicates ----------------------------

#[test]
fn layerd_killed_mid_stream_nothing_lost_no_duplicates() {
    let (m, c, mut l) = connected("manager");
    let mnt = m.mnt.clone();
    let writer = std::thread::spawn(move || {
        // 5,000 records over ~3 s, so layerd dies while they are being sent.
        for i in 0..5000 {
            std::fs::create_dir(mnt.join(format!("d{i}"))).unwrap();
            if i % 20 == 0 {
                sleep(Duration::from_millis(10));
            }
        }
    });
    wait_until("some records", Duration::from_secs(30), || {
        c.stored().0 > 300
    });
    l.kill9();
    let at_kill = c.stored();
    sleep(Duration::from_millis(300));
    l.spawn();
    writer.join().unwrap();
    let seq = m.journal_seq();
    assert!(seq >= 5000);
    assert!(
        at_kill.0 < seq,
        "killed after everything was sent ({at_kill:?} of {seq}): not mid-stream"
    );
    wait_until(
        "all records after the restart",
        Duration::from_secs(60),
        || c.stored().0 == seq,
    );
    c.assert_exactly_once(seq);
    eprintln!("layerd killed with {} of {seq} records stored", at_kill.0);
}

// ---- 5. Role: a monitor coordinator cannot roll back -----------------------------------

#[test]
fn monitor_coordinator_is_refused_rollback() {
    let (m, c, l) = connected("monitor");
    std::fs::write(m.p("f.txt"), "v1").unwrap();
    m.control(Op::CheckpointCreate {
        name: Some("cp1".into()),
        message: None,
    });
    std::fs::write(m.p("f.txt"), "v2").unwrap();
    let (ok, r) = c.command(&["rollback", "cp1"]);
    assert!(!ok, "{r}");
    assert_eq!(r["ok"], false);
    assert_eq!(r["error"]["code"], "permission_denied", "{r}");
    assert_eq!(r["error"]["required_role"], "manager", "{r}");
    assert_eq!(std::fs::read_to_string(m.p("f.txt")).unwrap(), "v2");
    let (ok, r) = c.command(&["checkpoint", "--name", "cp2"]);
    assert!(!ok);
    assert_eq!(r["error"]["code"], "permission_denied", "{r}");
    // What monitor may do still works.
    let (ok, r) = c.command(&["checkpoints"]);
    assert!(ok, "{r}");
    // The refusal is in layerd's audit log, as the coordinator's call.
    let audit = l.get("/v1/audit?denied=true");
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["op"] == "rollback" && a["caller"]["kind"] == "coordinator"),
        "{audit}"
    );
}

// ---- 6. Refusals: token, version, clear text; TLS ----------------------------------------

#[test]
fn wrong_token_is_refused() {
    let m = Mount::new();
    let c = Coordinator::start("127.0.0.1");
    let l = Layerd::start(
        &m,
        LinkOpts {
            token: "not-the-token",
            ..LinkOpts::to(&c)
        },
    );
    wait_until(
        "layerd to report the refusal",
        Duration::from_secs(20),
        || l.log().contains("unauthorized"),
    );
    assert!(c.log().contains("unknown token"), "{}", c.log());
    assert!(c.servers().is_empty());
}

/// Frame a JSON value: 4-byte big-endian length + the bytes.
fn frame(v: &Value) -> Vec<u8> {
    let b = serde_json::to_vec(v).unwrap();
    let mut out = (b.len() as u32).to_be_bytes().to_vec();
    out.extend(b);
    out
}

fn read_json_frame(s: &mut TcpStream) -> Value {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).unwrap();
    let mut b = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut b).unwrap();
    serde_json::from_slice(&b).unwrap()
}

#[test]
fn unknown_protocol_version_is_refused_both_ways() {
    // An agent speaking version 2 to the coordinator.
    let c = Coordinator::start("127.0.0.1");
    let mut s = TcpStream::connect(c.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&frame(
        &json!({"v": 2, "type": "hello", "token": TOKEN, "server_id": "x"}),
    ))
    .unwrap();
    let reply = read_json_frame(&mut s);
    assert_eq!(reply["type"], "error", "{reply}");
    assert_eq!(reply["code"], "version", "{reply}");
    let msg = reply["message"].as_str().unwrap();
    assert!(
        msg.contains("protocol version 2 is not supported") && msg.contains("version 1"),
        "{msg}"
    );
    // And then the connection is closed.
    assert_eq!(s.read(&mut [0u8; 1]).unwrap_or(0), 0);

    // A coordinator speaking version 2 to layerd.
    let m = Mount::new();
    let fake = TcpListener::bind("127.0.0.1:0").unwrap();
    let l = Layerd::start(
        &m,
        LinkOpts {
            address: fake.local_addr().unwrap().to_string(),
            token: TOKEN,
            role: "manager",
            ca_file: None,
            server_name: None,
        },
    );
    let (mut s, _) = fake.accept().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let hello = read_json_frame(&mut s);
    assert_eq!(hello["v"], 1);
    assert_eq!(hello["type"], "hello");
    assert_eq!(hello["token"], TOKEN);
    assert_eq!(hello["server_id"], SERVER);
    s.write_all(&frame(
        &json!({"v": 2, "type": "welcome", "server_id": SERVER, "cursors": {}}),
    ))
    .unwrap();
    wait_until(
        "layerd to report the version",
        Duration::from_secs(10),
        || {
            l.log()
                .contains("the coordinator speaks protocol version 2; this layerd speaks version 1")
        },
    );
}

/// A CA and a server certificate for `coord.test` and 127.0.0.2, made by openssl.
fn make_certs(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let run = |args: &[&str]| {
        let o = Command::new("openssl")
            .current_dir(dir)
            .args(args)
            .output()
            .expect("openssl");
        assert!(
            o.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=layerfs test CA",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=coord.test",
    ]);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:coord.test,IP:127.0.0.2\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
    (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    )
}

/// A local address that is not loopback (the host's own), if there is one.
fn non_loopback_ip() -> Option<std::net::IpAddr> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("192.0.2.1:9").ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

#[test]
fn tls_works_and_clear_text_to_non_loopback_is_refused() {
    let certs = tempdir();
    let (ca, cert, key) = make_certs(certs.path());
    let m = Mount::new();

    // TLS on 127.0.0.2 with the server name of the certificate.
    let c = Coordinator::start_tls("127.0.0.2", Some((cert.clone(), key.clone())));
    let l = Layerd::start(
        &m,
        LinkOpts {
            ca_file: Some(&ca),
            server_name: Some("coord.test"),
            ..LinkOpts::to(&c)
        },
    );
    wait_until("TLS link", Duration::from_secs(20), || c.connected());
    std::fs::write(m.p("over-tls.txt"), "x").unwrap();
    wait_until("record over TLS", Duration::from_secs(20), || {
        c.changes().iter().any(|r| r["path"] == "/over-tls.txt")
    });
    assert!(l.log().contains("tls=true"), "{}", l.log());
    drop(l);

    // Same coordinator, address as IP (the certificate has IP:127.0.0.2): works too.
    let l = Layerd::start(
        &m,
        LinkOpts {
            ca_file: Some(&ca),
            ..LinkOpts::to(&c)
        },
    );
    wait_until("TLS link by IP", Duration::from_secs(20), || {
        c.connected() && l.log().contains("connected to the coordinator")
    });
    drop(l);

    // A name the certificate does not have: the handshake fails, nothing is sent.
    let l = Layerd::start(
        &m,
        LinkOpts {
            ca_file: Some(&ca),
            server_name: Some("other.test"),
            ..LinkOpts::to(&c)
        },
    );
    wait_until("handshake failure", Duration::from_secs(20), || {
        l.log().contains("TLS handshake")
    });
    assert!(!l.log().contains("connected to the coordinator"));
    drop(l);

    // No CA file, and a non-loopback address: layerd refuses to connect at all.
    let ip = non_loopback_ip().unwrap_or("203.0.113.1".parse().unwrap());
    let trap = TcpListener::bind((ip, 0)).ok();
    let address = match &trap {
        Some(t) => t.local_addr().unwrap().to_string(),
        None => format!("{ip}:7443"),
    };
    let l = Layerd::start(
        &m,
        LinkOpts {
            address,
            token: TOKEN,
            role: "manager",
            ca_file: None,
            server_name: None,
        },
    );
    wait_until("the clear-text refusal", Duration::from_secs(20), || {
        l.log()
            .contains("refusing to send the coordinator token in clear text")
    });
    if let Some(t) = trap {
        t.set_nonblocking(true).unwrap();
        sleep(Duration::from_millis(1500));
        assert!(
            t.accept().is_err(),
            "layerd connected in clear text to a non-loopback address"
        );
    }
}

// ---- The mount goes away and comes back: the stream resumes ------------------------

#[test]
fn mount_restart_resumes_the_stream() {
    let (mut m, c, _l) = connected("manager");
    std::fs::write(m.p("one.txt"), "1").unwrap();
    wait_until("first record", Duration::from_secs(20), || {
        c.stored().0 == m.journal_seq()
    });
    m.unmount();
    sleep(Duration::from_millis(500));
    m.mount();
    for i in 0..50 {
        std::fs::create_dir(m.p(&format!("again{i}"))).unwrap();
    }
    let seq = m.journal_seq();
    wait_until("records after the remount", Duration::from_secs(40), || {
        c.stored().0 == seq
    });
    c.assert_exactly_once(seq);
}

// ---- 7. Heartbeats: a frozen peer is noticed within ~15 s, both ways ------------------

fn signal(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(st.success());
}

#[test]
fn frozen_peers_are_noticed_by_heartbeat() {
    let (m, c, l) = connected("manager");
    // The coordinator freezes (SIGSTOP): TCP stays up, nothing comes.
    let cpid = c.child.as_ref().unwrap().id();
    signal(cpid, "STOP");
    let t = Instant::now();
    wait_until(
        "layerd to notice the silent coordinator",
        Duration::from_secs(30),
        || {
            l.log()
                .contains("nothing received from the coordinator for 15 s")
        },
    );
    let noticed = t.elapsed();
    signal(cpid, "CONT");
    assert!(
        noticed >= Duration::from_secs(10) && noticed <= Duration::from_secs(20),
        "{noticed:?}"
    );
    // It comes back by itself, and records flow again.
    std::fs::write(m.p("after-freeze.txt"), "x").unwrap();
    wait_until("records after the freeze", Duration::from_secs(30), || {
        c.connected() && c.changes().iter().any(|r| r["path"] == "/after-freeze.txt")
    });

    // layerd freezes: the coordinator drops it.
    signal(l.pid(), "STOP");
    let t = Instant::now();
    wait_until(
        "the coordinator to notice the silent agent",
        Duration::from_secs(30),
        || !c.connected(),
    );
    let noticed = t.elapsed();
    signal(l.pid(), "CONT");
    assert!(
        noticed >= Duration::from_secs(10) && noticed <= Duration::from_secs(20),
        "{noticed:?}"
    );
    assert!(c.log().contains("nothing received for 15 s"), "{}", c.log());
    wait_until("layerd back", Duration::from_secs(30), || c.connected());
    c.assert_exactly_once(m.journal_seq());
}

// ---- Benchmark (figures only) ------------------------------------------------------------------

fn vm_hwm_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// 500 create/unlink pairs (about 1,000 journal records).
fn churn(m: &Mount, prefix: &str, i: &mut u64) {
    for _ in 0..500 {
        let p = m.p(&format!("{prefix}{i}"));
        std::fs::File::create(&p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
        std::fs::remove_file(&p).unwrap_or_else(|e| panic!("unlink {}: {e}", p.display()));
        *i += 1;
    }
}

/// Records/s delivered to the coordinator, and layerd's peak RSS.
/// BENCH_RECORDS (default 200000) journal records from a create/unlink loop.
#[test]
#[ignore]
fn bench_agent_link() {
    let n: u64 = std::env::var("BENCH_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let (m, mut c, l) = connected("manager");
    let base = m.journal_seq();
    wait_until("idle", Duration::from_secs(20), || c.stored().0 == base);

    // Live: records are delivered while they are written (BENCH_WRITERS
    // threads, default 2, each in its own directory).
    let writers: usize = std::env::var("BENCH_WRITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let t0 = Instant::now();
    let mut i = 0u64;
    std::thread::scope(|sc| {
        for w in 0..writers {
            let m = &m;
            sc.spawn(move || {
                let dir = format!("w{w}");
                std::fs::create_dir(m.p(&dir)).unwrap();
                let mut j = 0u64;
                while m.journal_seq() < base + n / 2 {
                    churn(m, &format!("{dir}/f"), &mut j);
                }
            });
        }
    });
    let written = t0.elapsed();
    let live_target = m.journal_seq();
    wait_until("live delivery", Duration::from_secs(600), || {
        c.stored().0 >= live_target
    });
    let live = t0.elapsed();
    let live_n = live_target - base;

    // Catch-up: the coordinator is down while the journal grows, then reads it all.
    c.kill9();
    while m.journal_seq() < live_target + n / 2 {
        churn(&m, "g", &mut i);
    }
    let target = m.journal_seq();
    let t1 = Instant::now();
    c.spawn();
    // The agent reconnects within its backoff (at most 5 s); time the
    // delivery from the moment it is registered.
    wait_until("reconnect", Duration::from_secs(30), || c.connected());
    let t2 = Instant::now();
    let at_connect = c.stored().0;
    wait_until("catch-up delivery", Duration::from_secs(600), || {
        c.stored().0 >= target
    });
    let catchup = t1.elapsed();
    let delivery = t2.elapsed();
    let catch_n = target - live_target;
    let hwm = vm_hwm_kib(l.pid());
    c.assert_exactly_once(target);
    println!(
        "live ({writers} writers): {live_n} records written in {:.2} s ({:.0}/s), all stored after {:.2} s ({:.0}/s)",
        written.as_secs_f64(),
        live_n as f64 / written.as_secs_f64(),
        live.as_secs_f64(),
        live_n as f64 / live.as_secs_f64()
    );
    println!(
        "catch-up: {catch_n} records stored {:.2} s after the coordinator started; {} more in the {:.2} s after the agent was seen connected ({:.0} records/s)",
        catchup.as_secs_f64(),
        target - at_connect.min(target),
        delivery.as_secs_f64(),
        (target - at_connect.min(target)) as f64 / delivery.as_secs_f64()
    );
    println!("layerd VmHWM: {:.1} MiB", hwm as f64 / 1024.0);
}
