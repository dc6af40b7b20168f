//! The coordinator: accepts agent links (TCP, TLS unless on loopback), checks
//! their token, stores every journal record durably before acknowledging it
//! (at-least-once in, exactly-once stored), sends operators' commands to
//! connected servers and answers an admin socket. A library so tests can run
//! it in-process; `bin/layerfs-coordinator.rs` is the command around it.
//!
//! Data directory (format v1, text: JSON and JSON lines, UTF-8):
//! ```text
//! DIR/format.json                              {"v":1,"kind":"layerfs-coordinator"}
//! DIR/lock                                     flock: one coordinator per directory
//! DIR/admin.sock                               admin socket (0600)
//! DIR/servers/<server>/server.json             last registration (written atomically)
//! DIR/servers/<server>/commands.jsonl          commands sent and their results
//! DIR/servers/<server>/mounts/<mount>/changes.jsonl   journal records, one JSON per line, seq ascending
//! DIR/servers/<server>/mounts/<mount>/cursor.json     {"v":1,"last_seq","len","count"} (tmp + fsync + rename)
//! ```
//! `changes.jsonl` may hold bytes past `cursor.len` only after a crash between
//! appending and moving the cursor: those records were never acknowledged, so
//! they are cut off at the next open and the agent sends them again.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, BufRead, Read, Write};
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use layerfs::control::proto::JournalRecord;
use layerfs::sys;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_rustls::rustls;

use crate::wire::{
    self, codes, CommandResult, DecodeError, Hello, Incoming, Message, MountInfo, ReadError,
};
use crate::AgentOp;

/// Version of the data directory's format.
pub const DATA_FORMAT_VERSION: u32 = 1;
/// Default time an admin `command` waits for the agent's result.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(300);
/// Connections accepted but not yet authenticated, at most.
pub const MAX_HANDSHAKES: usize = 64;
/// Largest `hello` (status and checkpoint lists of every mount).
pub const MAX_HELLO_FRAME: usize = 4 << 20;
/// Most records one admin `changes` call returns (pages beyond it).
pub const MAX_CHANGES_PAGE: u64 = 50_000;

// ---- Durable store ----------------------------------------------------------

/// Position of a mount's log: everything up to it is stored and acknowledged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub v: u32,
    /// Highest sequence number stored (0: none).
    pub last_seq: u64,
    /// Byte length of changes.jsonl up to and including that record's line.
    pub len: u64,
    /// Records stored.
    pub count: u64,
}

fn ename(name: &str) -> &OsStr {
    OsStr::new(name)
}

fn no_follow_dir_flags() -> i32 {
    libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW
}

/// Open (creating if asked) directory `name` under `parent`, never following a symlink.
fn open_dir_at(parent: &File, name: &str, create: bool) -> io::Result<File> {
    if create {
        match sys::mkdirat(parent.as_fd(), ename(name), 0o750) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(e),
        }
    }
    sys::openat(parent.as_fd(), ename(name), no_follow_dir_flags(), 0).map(File::from)
}

fn open_file_at(dir: &File, name: &str, flags: i32, mode: u32) -> io::Result<File> {
    sys::openat(dir.as_fd(), ename(name), flags | libc::O_NOFOLLOW, mode).map(File::from)
}

fn not_found(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOENT)
}

/// Replace `name` in `dir` with `data`: write `name.tmp`, fsync, rename over, fsync the directory.
fn write_atomic(dir: &File, name: &str, data: &[u8]) -> io::Result<()> {
    let tmp = format!("{name}.tmp");
    let mut f = open_file_at(
        dir,
        &tmp,
        libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC,
        0o640,
    )?;
    f.write_all(data)?;
    f.sync_all()?;
    drop(f);
    sys::renameat2(dir.as_fd(), ename(&tmp), dir.as_fd(), ename(name), 0)?;
    dir.sync_all()
}

fn read_small_at(dir: &File, name: &str) -> io::Result<Option<Vec<u8>>> {
    match open_file_at(dir, name, libc::O_RDONLY, 0) {
        Ok(f) => {
            let mut buf = Vec::new();
            f.take(16 << 20).read_to_end(&mut buf)?;
            Ok(Some(buf))
        }
        Err(e) if not_found(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// One mount's record log.
pub struct MountLog {
    dir: File,
    file: File,
    cursor: Cursor,
    label: String,
}

impl MountLog {
    const LOG: &'static str = "changes.jsonl";
    const CURSOR: &'static str = "cursor.json";

    /// Open the log in `dir`, cutting off anything past the cursor (never
    /// acknowledged) and rebuilding the cursor from the log if the two disagree.
    pub fn open(dir: File, label: String) -> io::Result<MountLog> {
        let cursor = match read_small_at(&dir, Self::CURSOR)? {
            Some(b) => {
                let c: Cursor = serde_json::from_slice(&b)
                    .map_err(|e| invalid(format!("{label}: unreadable cursor.json: {e}")))?;
                if c.v != DATA_FORMAT_VERSION {
                    return Err(invalid(format!(
                        "{label}: cursor.json has format version {} (this coordinator reads {DATA_FORMAT_VERSION})",
                        c.v
                    )));
                }
                Some(c)
            }
            None => None,
        };
        let file = open_file_at(
            &dir,
            Self::LOG,
            libc::O_RDWR | libc::O_CREAT | libc::O_APPEND,
            0o640,
        )?;
        let size = file.metadata()?.len();
        let mut log = MountLog {
            dir,
            file,
            cursor: cursor.unwrap_or(Cursor {
                v: DATA_FORMAT_VERSION,
                ..Cursor::default()
            }),
            label,
        };
        match cursor {
            Some(c) if size == c.len => {}
            Some(c) if size > c.len => {
                // Appended but not acknowledged before a crash: the agent resends.
                tracing::info!(log = %log.label, extra = size - c.len, "cutting unacknowledged records off the log");
                log.file.set_len(c.len)?;
                log.file.sync_all()?;
            }
            None if size == 0 => {}
            _ => {
                tracing::warn!(log = %log.label, size, cursor = ?cursor, "log and cursor disagree: rebuilding the cursor from the log");
                log.rebuild()?;
            }
        }
        Ok(log)
    }

    /// Scan the log: keep the complete, readable, ascending lines; cut the rest.
    fn rebuild(&mut self) -> io::Result<()> {
        let mut c = Cursor {
            v: DATA_FORMAT_VERSION,
            ..Cursor::default()
        };
        let mut reader = io::BufReader::new(open_file_at(&self.dir, Self::LOG, libc::O_RDONLY, 0)?);
        let mut line = Vec::new();
        loop {
            line.clear();
            if reader.read_until(b'\n', &mut line)? == 0 || line.last() != Some(&b'\n') {
                break; // end, or a torn last line
            }
            match serde_json::from_slice::<JournalRecord>(&line[..line.len() - 1]) {
                Ok(r) if r.seq > c.last_seq => {
                    c.last_seq = r.seq;
                    c.len += line.len() as u64;
                    c.count += 1;
                }
                _ => break,
            }
        }
        self.file.set_len(c.len)?;
        self.file.sync_all()?;
        self.write_cursor(c)
    }

    fn write_cursor(&mut self, c: Cursor) -> io::Result<()> {
        let data = serde_json::to_vec(&c).map_err(io::Error::other)?;
        write_atomic(&self.dir, Self::CURSOR, &data)?;
        self.cursor = c;
        Ok(())
    }

    pub fn cursor(&self) -> Cursor {
        self.cursor
    }

    /// Store the records not stored yet (seq above the cursor, ascending),
    /// durably; returns the new highest stored seq (what may be acknowledged).
    pub fn append(&mut self, records: &[JournalRecord]) -> io::Result<u64> {
        let mut last = self.cursor.last_seq;
        let mut buf = Vec::new();
        let mut n = 0u64;
        for r in records {
            if r.seq <= last {
                continue; // already stored: at-least-once in, exactly-once stored
            }
            serde_json::to_writer(&mut buf, r).map_err(io::Error::other)?;
            buf.push(b'\n');
            last = r.seq;
            n += 1;
        }
        if n == 0 {
            return Ok(self.cursor.last_seq);
        }
        let res = self
            .file
            .write_all(&buf)
            .and_then(|_| self.file.sync_data());
        if let Err(e) = res {
            // Leave the log as the cursor describes it.
            let _ = self.file.set_len(self.cursor.len);
            return Err(e);
        }
        let c = Cursor {
            v: DATA_FORMAT_VERSION,
            last_seq: last,
            len: self.cursor.len + buf.len() as u64,
            count: self.cursor.count + n,
        };
        self.write_cursor(c)?;
        Ok(last)
    }

    /// The mount's journal started over (its seq is below what we stored):
    /// keep the old log under another name and start an empty one.
    pub fn start_over(&mut self, journal_seq: u64) -> io::Result<()> {
        let old = format!("changes.{}.jsonl", wire::now_ns());
        tracing::warn!(
            log = %self.label, stored = self.cursor.last_seq, journal_seq,
            "the mount's journal is behind what was stored (new journal?): keeping the old log as {old} and starting over"
        );
        sys::renameat2(
            self.dir.as_fd(),
            ename(Self::LOG),
            self.dir.as_fd(),
            ename(&old),
            0,
        )?;
        self.dir.sync_all()?;
        self.file = open_file_at(
            &self.dir,
            Self::LOG,
            libc::O_RDWR | libc::O_CREAT | libc::O_APPEND,
            0o640,
        )?;
        self.write_cursor(Cursor {
            v: DATA_FORMAT_VERSION,
            ..Cursor::default()
        })
    }

    /// What `read_records` needs, taken under the lock; the read itself needs
    /// none (the log only grows past `cursor.len`).
    pub fn snapshot(&self) -> io::Result<(File, Cursor)> {
        Ok((
            open_file_at(&self.dir, Self::LOG, libc::O_RDONLY, 0)?,
            self.cursor,
        ))
    }

    /// Records with seq >= `from_seq`, at most `limit`, from the acknowledged part.
    pub fn read(&self, from_seq: u64, limit: u64) -> io::Result<Vec<JournalRecord>> {
        let (f, c) = self.snapshot()?;
        read_records(f, c, from_seq, limit, &self.label)
    }
}

/// Records with seq >= `from_seq`, at most `limit`, from the first `cursor.len` bytes of `f`.
pub fn read_records(
    f: File,
    cursor: Cursor,
    from_seq: u64,
    limit: u64,
    label: &str,
) -> io::Result<Vec<JournalRecord>> {
    let reader = io::BufReader::with_capacity(1 << 20, f.take(cursor.len));
    let mut out = Vec::new();
    for line in reader.split(b'\n') {
        let line = line?;
        let r: JournalRecord = serde_json::from_slice(&line)
            .map_err(|e| invalid(format!("{label}: unreadable record: {e}")))?;
        if r.seq >= from_seq {
            out.push(r);
            if out.len() as u64 >= limit {
                break;
            }
        }
    }
    Ok(out)
}

/// A mount's log, shared by the tasks that write and read it.
pub type SharedLog = Arc<Mutex<MountLog>>;

/// The data directory.
pub struct Store {
    servers: File,
    /// Open logs, shared by every session of a server (a reconnecting agent's
    /// new session may overlap its old one: one writer per file).
    logs: Mutex<HashMap<(String, String), SharedLog>>,
    _lock: File,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct FormatFile {
    v: u32,
    kind: String,
}

impl Store {
    pub fn open(dir: &Path) -> anyhow::Result<Store> {
        std::fs::create_dir_all(dir).map_err(|e| {
            anyhow::anyhow!("cannot create the data directory {}: {e}", dir.display())
        })?;
        let root =
            File::open(dir).map_err(|e| anyhow::anyhow!("cannot open {}: {e}", dir.display()))?;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
        let lock = open_file_at(&root, "lock", libc::O_RDWR | libc::O_CREAT, 0o600)?;
        if lock.try_lock().is_err() {
            anyhow::bail!(
                "another layerfs-coordinator uses the data directory {} (its lock file is held)",
                dir.display()
            );
        }
        match read_small_at(&root, "format.json")? {
            Some(b) => {
                let f: FormatFile = serde_json::from_slice(&b).map_err(|e| {
                    anyhow::anyhow!("{}/format.json is unreadable: {e}", dir.display())
                })?;
                if f.v != DATA_FORMAT_VERSION || f.kind != "layerfs-coordinator" {
                    anyhow::bail!(
                        "{} holds data format {} of {:?}; this coordinator reads format {DATA_FORMAT_VERSION}",
                        dir.display(),
                        f.v,
                        f.kind
                    );
                }
            }
            None => write_atomic(
                &root,
                "format.json",
                &serde_json::to_vec(&FormatFile {
                    v: DATA_FORMAT_VERSION,
                    kind: "layerfs-coordinator".into(),
                })?,
            )?,
        }
        let servers = open_dir_at(&root, "servers", true)?;
        Ok(Store {
            servers,
            logs: Mutex::new(HashMap::new()),
            _lock: lock,
        })
    }

    fn server_dir(&self, server: &str, create: bool) -> io::Result<File> {
        if !wire::valid_name(server) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid server id {server:?}"),
            ));
        }
        open_dir_at(&self.servers, server, create)
    }

    /// The log of `server`/`mount`, opened once and shared.
    pub fn mount_log(&self, server: &str, mount: &str) -> io::Result<SharedLog> {
        let key = (server.to_string(), mount.to_string());
        if let Some(l) = self.logs.lock().get(&key) {
            return Ok(l.clone());
        }
        if !wire::valid_name(mount) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid mount name {mount:?}"),
            ));
        }
        let sdir = self.server_dir(server, true)?;
        let mdir = open_dir_at(&open_dir_at(&sdir, "mounts", true)?, mount, true)?;
        let log = MountLog::open(mdir, format!("{server}/{mount}"))?;
        let mut logs = self.logs.lock();
        // Another thread may have opened it meanwhile: keep the first.
        Ok(logs
            .entry(key)
            .or_insert_with(|| Arc::new(Mutex::new(log)))
            .clone())
    }

    /// Existing log of `server`/`mount` (None if nothing was ever stored).
    pub fn existing_log(&self, server: &str, mount: &str) -> io::Result<Option<SharedLog>> {
        if !wire::valid_name(server) || !wire::valid_name(mount) {
            return Ok(None);
        }
        match self
            .server_dir(server, false)
            .and_then(|d| open_dir_at(&d, "mounts", false))
            .and_then(|d| sys::fstatat(d.as_fd(), ename(mount)))
        {
            Ok(_) => self.mount_log(server, mount).map(Some),
            Err(e) if not_found(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn write_server_json(&self, server: &str, v: &Value) -> io::Result<()> {
        let d = self.server_dir(server, true)?;
        write_atomic(
            &d,
            "server.json",
            &serde_json::to_vec_pretty(v).map_err(io::Error::other)?,
        )
    }

    fn read_server_json(&self, server: &str) -> io::Result<Option<Value>> {
        let d = match self.server_dir(server, false) {
            Ok(d) => d,
            Err(e) if not_found(&e) => return Ok(None),
            Err(e) => return Err(e),
        };
        Ok(read_small_at(&d, "server.json")?.and_then(|b| serde_json::from_slice(&b).ok()))
    }

    fn append_command_log(&self, server: &str, v: &Value) -> io::Result<()> {
        let d = self.server_dir(server, true)?;
        let mut f = open_file_at(
            &d,
            "commands.jsonl",
            libc::O_WRONLY | libc::O_CREAT | libc::O_APPEND,
            0o640,
        )?;
        let mut line = serde_json::to_vec(v).map_err(io::Error::other)?;
        line.push(b'\n');
        f.write_all(&line)
    }

    /// Server ids with a directory.
    pub fn server_ids(&self) -> io::Result<Vec<String>> {
        let mut out: Vec<String> = sys::read_dir_all(self.servers.as_fd())?
            .into_iter()
            .filter_map(|e| String::from_utf8(e.name).ok())
            .filter(|n| wire::valid_name(n))
            .collect();
        out.sort();
        Ok(out)
    }

    /// Mount names with a log under `server`.
    pub fn mount_names(&self, server: &str) -> io::Result<Vec<String>> {
        let d = match self
            .server_dir(server, false)
            .and_then(|d| open_dir_at(&d, "mounts", false))
        {
            Ok(d) => d,
            Err(e) if not_found(&e) => return Ok(vec![]),
            Err(e) => return Err(e),
        };
        let mut out: Vec<String> = sys::read_dir_all(d.as_fd())?
            .into_iter()
            .filter_map(|e| String::from_utf8(e.name).ok())
            .filter(|n| wire::valid_name(n))
            .collect();
        out.sort();
        Ok(out)
    }
}

// ---- The service --------------------------------------------------------------

/// How to run a coordinator.
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Accepted tokens (shared secrets).
    pub tokens: Vec<String>,
    /// TLS certificate chain and key (PEM). Required unless `listen` is loopback.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Admin socket; default `data_dir/admin.sock`.
    pub admin_socket: Option<PathBuf>,
}

struct Session {
    conn_id: u64,
    peer: String,
    tx: mpsc::Sender<Message>,
    pending: Mutex<HashMap<u64, oneshot::Sender<CommandResult>>>,
    kick: Notify,
    connected_at_ns: i64,
    last_seen_ns: AtomicU64,
    mounts: Mutex<Vec<MountInfo>>,
    hello: Mutex<Value>,
    /// Set when the connection is over (its writers stopped).
    ended: tokio::sync::watch::Sender<bool>,
}

/// Marks its session ended when dropped (also when the task is cancelled).
struct EndGuard(Arc<Session>);

impl Drop for EndGuard {
    fn drop(&mut self) {
        self.0.ended.send_replace(true);
    }
}

pub struct Coordinator {
    store: Store,
    tokens: Vec<String>,
    sessions: Mutex<HashMap<String, Arc<Session>>>,
    next_conn: AtomicU64,
    next_cmd: AtomicU64,
    handshakes: Arc<tokio::sync::Semaphore>,
    /// Set on shutdown: every connection task ends.
    stop: tokio::sync::watch::Sender<bool>,
}

/// A running coordinator (in-process: tests; the binary waits on `wait`).
pub struct Running {
    pub coordinator: Arc<Coordinator>,
    pub local_addr: SocketAddr,
    pub admin_socket: PathBuf,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Stop accepting and drop every connection (as a crash would, minus the process).
    pub fn shutdown(self) {
        for t in &self.tasks {
            t.abort();
        }
        self.coordinator.stop.send_replace(true);
        self.coordinator.sessions.lock().clear();
        let _ = std::fs::remove_file(&self.admin_socket);
    }
}

fn is_loopback(addr: &SocketAddr) -> bool {
    addr.ip().is_loopback()
}

pub fn load_server_tls(cert: &Path, key: &Path) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    let certs: Vec<_> =
        rustls_pemfile::certs(&mut io::BufReader::new(File::open(cert).map_err(|e| {
            anyhow::anyhow!("cannot read the certificate {}: {e}", cert.display())
        })?))
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("{}: not a PEM certificate chain: {e}", cert.display()))?;
    if certs.is_empty() {
        anyhow::bail!("{} holds no certificate", cert.display());
    }
    let key = rustls_pemfile::private_key(&mut io::BufReader::new(
        File::open(key)
            .map_err(|e| anyhow::anyhow!("cannot read the key {}: {e}", key.display()))?,
    ))
    .map_err(|e| anyhow::anyhow!("{}: not a PEM key: {e}", key.display()))?
    .ok_or_else(|| anyhow::anyhow!("{} holds no private key", key.display()))?;
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| anyhow::anyhow!("certificate and key do not fit together: {e}"))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

/// Start a coordinator: open the store, bind the agent listener and the admin socket.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    if config.tokens.is_empty() || config.tokens.iter().any(|t| t.is_empty()) {
        anyhow::bail!(
            "no token: agents could not authenticate (give a token file with one token per line)"
        );
    }
    let tls = match &config.tls {
        Some((c, k)) => Some(load_server_tls(c, k)?),
        None if !is_loopback(&config.listen) => anyhow::bail!(
            "listening on {} (not loopback) needs --cert and --key: agents refuse to send their token in clear text to a non-loopback address",
            config.listen
        ),
        None => None,
    };
    let store = Store::open(&config.data_dir)?;
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
    let local_addr = listener.local_addr()?;
    let admin_path = config
        .admin_socket
        .clone()
        .unwrap_or_else(|| config.data_dir.join("admin.sock"));
    let admin = bind_admin(&admin_path).await?;
    let coordinator = Arc::new(Coordinator {
        store,
        tokens: config.tokens,
        sessions: Mutex::new(HashMap::new()),
        next_conn: AtomicU64::new(1),
        next_cmd: AtomicU64::new(1),
        handshakes: Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES)),
        stop: tokio::sync::watch::channel(false).0,
    });
    tracing::info!(%local_addr, tls = tls.is_some(), admin = %admin_path.display(), "coordinator listening");
    let c = coordinator.clone();
    let admin_task = tokio::spawn(async move { c.admin_loop(admin).await });
    let c = coordinator.clone();
    let accept_task = tokio::spawn(async move { c.accept_loop(listener, tls).await });
    Ok(Running {
        coordinator,
        local_addr,
        admin_socket: admin_path,
        tasks: vec![admin_task, accept_task],
    })
}

async fn bind_admin(path: &Path) -> anyhow::Result<UnixListener> {
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            anyhow::bail!("{} is served by another coordinator", path.display());
        }
        std::fs::remove_file(path)
            .map_err(|e| anyhow::anyhow!("cannot remove the stale {}: {e}", path.display()))?;
    }
    let l = UnixListener::bind(path)
        .map_err(|e| anyhow::anyhow!("cannot bind {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

trait Conn: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Conn for T {}

/// Read one message within `t`; a timeout is an error (`None`).
async fn read_within<R: AsyncRead + Unpin>(
    r: &mut R,
    t: Duration,
) -> Result<Incoming, Option<ReadError>> {
    match tokio::time::timeout(t, wire::read_message(r)).await {
        Err(_) => Err(None),
        Ok(Ok(i)) => Ok(i),
        Ok(Err(e)) => Err(Some(e)),
    }
}

fn describe(e: &Option<ReadError>, t: Duration) -> String {
    match e {
        None => format!("nothing received for {} s", t.as_secs()),
        Some(e) => e.to_string(),
    }
}

impl Coordinator {
    pub fn store(&self) -> &Store {
        &self.store
    }

    async fn accept_loop(
        self: Arc<Self>,
        listener: TcpListener,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) {
        loop {
            let Some((tcp, peer)) = accepted(listener.accept().await, "accept").await else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            // Unauthenticated connections are bounded: each may hold a hello buffer.
            let Ok(permit) = self.handshakes.clone().try_acquire_owned() else {
                tracing::warn!(%peer, "too many connections in their handshake: dropped");
                continue;
            };
            let me = self.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let conn: Box<dyn Conn> = match tls {
                    Some(acc) => {
                        match tokio::time::timeout(wire::HANDSHAKE_TIMEOUT, acc.accept(tcp)).await {
                            Ok(Ok(s)) => Box::new(s),
                            Ok(Err(e)) => {
                                tracing::warn!(%peer, "TLS handshake failed: {e}");
                                return;
                            }
                            Err(_) => {
                                tracing::warn!(%peer, "TLS handshake timed out");
                                return;
                            }
                        }
                    }
                    None => Box::new(tcp),
                };
                let mut stop = me.stop.subscribe();
                tokio::select! {
                    _ = me.clone().serve_conn(conn, peer, permit) => {}
                    _ = stop.wait_for(|s| *s) => {}
                }
            });
        }
    }

    async fn serve_conn(
        self: Arc<Self>,
        conn: Box<dyn Conn>,
        peer: SocketAddr,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) {
        let (mut rd, mut wr) = tokio::io::split(conn);
        let first = tokio::time::timeout(
            wire::HANDSHAKE_TIMEOUT,
            wire::read_message_limited(&mut rd, MAX_HELLO_FRAME),
        )
        .await
        .unwrap_or_else(|_| {
            Err(ReadError::Io(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no hello within {} s", wire::HANDSHAKE_TIMEOUT.as_secs()),
            )))
        })
        .map_err(Some);
        let hello = match first {
            Ok(Incoming::Message(Message::Hello(h))) => h,
            Ok(Incoming::Message(m)) => {
                let msg = format!("expected hello, got {}", m.kind());
                tracing::warn!(%peer, "{msg}");
                let _ =
                    wire::write_message(&mut wr, &Message::error(codes::BAD_REQUEST, msg)).await;
                return;
            }
            Ok(Incoming::Closed) => return,
            Err(e) => {
                // A version mismatch is answered with an `error` frame, a shape every version reads.
                let code = match &e {
                    Some(ReadError::Decode(DecodeError::Version { .. })) => codes::VERSION,
                    _ => codes::BAD_REQUEST,
                };
                let msg = describe(&e, wire::HANDSHAKE_TIMEOUT);
                tracing::warn!(%peer, "agent connection refused: {msg}");
                let _ = wire::write_message(
                    &mut wr,
                    &Message::error(code, format!("refused by the coordinator: {msg}")),
                )
                .await;
                return;
            }
        };
        let server_id = hello.server_id.clone();
        if !self.token_ok(&hello.token.0) {
            tracing::warn!(%peer, server_id = %server_id, "agent refused: unknown token");
            let _ = wire::write_message(
                &mut wr,
                &Message::error(
                    codes::UNAUTHORIZED,
                    "unknown token: check the agent's coordinator token_file",
                ),
            )
            .await;
            return;
        }
        if let Err(msg) = check_hello(&hello) {
            tracing::warn!(%peer, "agent refused: {msg}");
            let _ = wire::write_message(&mut wr, &Message::error(codes::BAD_REQUEST, msg)).await;
            return;
        }
        drop(permit);
        // A previous connection of this server stops first, so that nothing it
        // still stores lands after the cursors below are read (or a log restarted).
        let old = self.sessions.lock().get(&server_id).cloned();
        if let Some(old) = old {
            tracing::info!(server_id = %server_id, old = %old.peer, "replacing the server's previous connection");
            old.kick.notify_one();
            let mut ended = old.ended.subscribe();
            let _ = tokio::time::timeout(Duration::from_secs(5), ended.wait_for(|e| *e)).await;
        }
        // Cursors (and journal restarts) for every mount the agent has.
        let me = self.clone();
        let h = hello.clone();
        let prepared = tokio::task::spawn_blocking(move || me.prepare_mounts(&h)).await;
        let (logs, cursors) = match prepared {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => {
                tracing::error!(server_id = %server_id, "cannot open the server's logs: {e}");
                let _ = wire::write_message(
                    &mut wr,
                    &Message::error(codes::INTERNAL, format!("coordinator storage error: {e}")),
                )
                .await;
                return;
            }
            Err(e) => {
                tracing::error!("{e}");
                return;
            }
        };
        let (tx, mut rx) = mpsc::channel::<Message>(64);
        let conn_id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let mut hello_json = serde_json::to_value(&hello).unwrap_or(Value::Null);
        if let Some(o) = hello_json.as_object_mut() {
            o.remove("token");
            o.remove("mounts");
        }
        let session = Arc::new(Session {
            conn_id,
            peer: peer.to_string(),
            tx,
            pending: Mutex::new(HashMap::new()),
            kick: Notify::new(),
            connected_at_ns: wire::now_ns(),
            last_seen_ns: AtomicU64::new(wire::now_ns() as u64),
            mounts: Mutex::new(hello.mounts.clone()),
            hello: Mutex::new(hello_json),
            ended: tokio::sync::watch::channel(false).0,
        });
        let _ended = EndGuard(session.clone());
        self.save_server(&server_id, &session);
        if let Some(old) = self
            .sessions
            .lock()
            .insert(server_id.clone(), session.clone())
        {
            tracing::info!(server_id = %server_id, old = %old.peer, "replacing the server's previous connection");
            old.kick.notify_one();
        }
        tracing::info!(server_id = %server_id, %peer, ?cursors, "agent connected");
        let welcome = Message::Welcome(wire::Welcome {
            server_id: server_id.clone(),
            coordinator_version: env!("CARGO_PKG_VERSION").into(),
            cursors,
        });
        let writer = tokio::spawn(async move {
            if wire::write_message(&mut wr, &welcome).await.is_err() {
                return;
            }
            let mut tick = tokio::time::interval(wire::HEARTBEAT_INTERVAL);
            tick.tick().await;
            loop {
                let msg = tokio::select! {
                    m = rx.recv() => match m { Some(m) => m, None => break },
                    _ = tick.tick() => Message::ping(),
                };
                let last = matches!(msg, Message::Error { .. });
                let written =
                    tokio::time::timeout(wire::PEER_TIMEOUT, wire::write_message(&mut wr, &msg))
                        .await;
                if !matches!(written, Ok(Ok(()))) || last {
                    break;
                }
            }
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut wr).await;
        });
        let why = self.read_loop(&server_id, &session, &mut rd, &logs).await;
        tracing::info!(server_id = %server_id, %peer, "agent disconnected: {why}");
        // Pending commands learn that their result will not come.
        session.pending.lock().clear();
        {
            let mut sessions = self.sessions.lock();
            if sessions
                .get(&server_id)
                .is_some_and(|s| s.conn_id == conn_id)
            {
                sessions.remove(&server_id);
            }
        }
        drop(session);
        // The writer ends when its queue is dropped (after a final error frame).
        let mut writer = writer;
        if tokio::time::timeout(Duration::from_secs(2), &mut writer)
            .await
            .is_err()
        {
            writer.abort();
        }
    }

    fn token_ok(&self, token: &str) -> bool {
        // Compare against every token, without stopping at a match.
        let mut ok = false;
        for t in &self.tokens {
            ok |= wire::constant_time_eq(t.as_bytes(), token.as_bytes());
        }
        ok
    }

    fn prepare_mounts(
        &self,
        hello: &Hello,
    ) -> io::Result<(HashMap<String, SharedLog>, BTreeMap<String, u64>)> {
        let mut logs = HashMap::new();
        let mut cursors = BTreeMap::new();
        for m in &hello.mounts {
            let log = self.store.mount_log(&hello.server_id, &m.name)?;
            {
                let mut l = log.lock();
                if let Some(js) = m.journal_seq {
                    if l.cursor().last_seq > js {
                        l.start_over(js)?;
                    }
                }
                cursors.insert(m.name.clone(), l.cursor().last_seq);
            }
            logs.insert(m.name.clone(), log);
        }
        Ok((logs, cursors))
    }

    fn save_server(&self, server_id: &str, s: &Session) {
        let mut v = s.hello.lock().clone();
        if let Some(o) = v.as_object_mut() {
            o.insert("v".into(), json!(DATA_FORMAT_VERSION));
            o.insert("address".into(), json!(s.peer));
            o.insert("connected_at_ns".into(), json!(s.connected_at_ns));
            o.insert(
                "mounts".into(),
                serde_json::to_value(&*s.mounts.lock()).unwrap_or(Value::Null),
            );
        }
        if let Err(e) = self.store.write_server_json(server_id, &v) {
            tracing::warn!(server_id, "cannot write server.json: {e}");
        }
    }

    async fn read_loop<R: AsyncRead + Unpin>(
        &self,
        server_id: &str,
        s: &Arc<Session>,
        rd: &mut R,
        logs: &HashMap<String, SharedLog>,
    ) -> String {
        // One writer per mount: it stores what queued up while its previous
        // fsync ran in one go (group commit), then acknowledges the highest seq.
        let mut writers = HashMap::new();
        let mut workers: tokio::task::JoinSet<String> = tokio::task::JoinSet::new();
        for (mount, log) in logs {
            let (q, rx) = mpsc::channel::<Vec<JournalRecord>>(STORE_QUEUE);
            writers.insert(mount.clone(), q);
            workers.spawn(store_worker(
                server_id.to_string(),
                mount.clone(),
                log.clone(),
                rx,
                s.tx.clone(),
            ));
        }
        loop {
            let got = tokio::select! {
                r = read_within(rd, wire::PEER_TIMEOUT) => r,
                Some(done) = workers.join_next() => {
                    return done.unwrap_or_else(|e| format!("storage task failed: {e}"));
                }
                _ = s.kick.notified() => {
                    // try_send: a writer stuck on a dead peer must not hold this up.
                    let _ = s.tx.try_send(Message::error(codes::REPLACED, "a newer connection of this server replaced this one"));
                    return "replaced by a newer connection".into();
                }
            };
            let msg = match got {
                Ok(Incoming::Message(m)) => m,
                Ok(Incoming::Closed) => return "closed by the agent".into(),
                Err(e) => {
                    let e = describe(&e, wire::PEER_TIMEOUT);
                    let _ = s.tx.try_send(Message::error(codes::BAD_REQUEST, e.clone()));
                    return e;
                }
            };
            s.last_seen_ns
                .store(wire::now_ns() as u64, Ordering::Relaxed);
            match msg {
                Message::Records { mount, records } => {
                    let Some(q) = writers.get(&mount) else {
                        let e = format!(
                            "records for mount {mount:?}, which the hello did not register"
                        );
                        let _ =
                            s.tx.send(Message::error(codes::BAD_REQUEST, e.clone()))
                                .await;
                        return e;
                    };
                    // Waits while the mount's writer is behind: backpressure to the agent.
                    if q.send(records).await.is_err() {
                        return "storage writer gone".into();
                    }
                }
                Message::Result(r) => {
                    let waiter = s.pending.lock().remove(&r.id);
                    match waiter {
                        Some(w) => {
                            let _ = w.send(r);
                        }
                        None => tracing::warn!(
                            server_id,
                            id = r.id,
                            "result for an unknown command (timed out?)"
                        ),
                    }
                }
                Message::Inventory { mounts } => {
                    if mounts.iter().all(|m| logs.contains_key(&m.name)) {
                        *s.mounts.lock() = mounts;
                        self.save_server(server_id, s);
                    }
                }
                Message::Ping { .. } => {}
                Message::Error { code, message } => {
                    return format!("agent error {code}: {message}")
                }
                other => {
                    let e = format!("unexpected {} message from an agent", other.kind());
                    let _ =
                        s.tx.send(Message::error(codes::BAD_REQUEST, e.clone()))
                            .await;
                    return e;
                }
            }
        }
    }

    /// Send `command` to `server` and wait for its result.
    pub async fn command(
        &self,
        server: &str,
        command: AgentOp,
        timeout: Duration,
    ) -> Result<CommandResult, AdminError> {
        let session = self.sessions.lock().get(server).cloned().ok_or_else(|| {
            AdminError::new(
                "not_connected",
                format!("server {server:?} is not connected"),
            )
        })?;
        let id = self.next_cmd.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        session.pending.lock().insert(id, tx);
        let sent_at = wire::now_ns();
        let cmd_json = serde_json::to_value(&command).unwrap_or(Value::Null);
        if session
            .tx
            .send(Message::Command { id, command })
            .await
            .is_err()
        {
            session.pending.lock().remove(&id);
            return Err(AdminError::new(
                "not_connected",
                format!("server {server:?} disconnected"),
            ));
        }
        let outcome = match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(_)) => Err(AdminError::new(
                "disconnected",
                format!(
                    "server {server:?} disconnected before reporting the result of command {id}"
                ),
            )),
            Err(_) => {
                session.pending.lock().remove(&id);
                Err(AdminError::new(
                    "timeout",
                    format!(
                        "no result from server {server:?} within {} s",
                        timeout.as_secs()
                    ),
                ))
            }
        };
        let entry = json!({
            "time_ns": sent_at, "id": id, "command": cmd_json,
            "outcome": match &outcome { Ok(r) => serde_json::to_value(r).unwrap_or(Value::Null), Err(e) => json!({"error": e}) },
        });
        if let Err(e) = self.store.append_command_log(server, &entry) {
            tracing::warn!(server, "cannot log the command: {e}");
        }
        outcome
    }

    /// Every known server: registration, connection, per-mount stored position.
    pub fn servers(&self) -> io::Result<Vec<Value>> {
        let mut out = Vec::new();
        let sessions = self.sessions.lock().clone();
        for id in self.store.server_ids()? {
            let mut v = self
                .store
                .read_server_json(&id)?
                .unwrap_or_else(|| json!({}));
            let s = sessions.get(&id);
            let mounts_info: Vec<MountInfo> = match s {
                Some(s) => s.mounts.lock().clone(),
                None => v
                    .get("mounts")
                    .cloned()
                    .and_then(|m| serde_json::from_value(m).ok())
                    .unwrap_or_default(),
            };
            let mut names = self.store.mount_names(&id)?;
            for m in &mounts_info {
                if !names.contains(&m.name) {
                    names.push(m.name.clone());
                }
            }
            let mut mounts = Vec::new();
            for name in names {
                let c = match self.store.existing_log(&id, &name)? {
                    Some(l) => l.lock().cursor(),
                    None => Cursor::default(),
                };
                let info = mounts_info.iter().find(|m| m.name == name);
                mounts.push(json!({
                    "name": name,
                    "path": info.map(|m| m.path.clone()),
                    "journal_seq": info.and_then(|m| m.journal_seq),
                    "stored_seq": c.last_seq,
                    "stored_records": c.count,
                    "status": info.and_then(|m| m.status.clone()),
                    "checkpoints": info.and_then(|m| m.checkpoints.clone()),
                    "error": info.and_then(|m| m.error.clone()),
                }));
            }
            if let Some(o) = v.as_object_mut() {
                o.remove("v");
                o.insert("server_id".into(), json!(id));
                o.insert("connected".into(), json!(s.is_some()));
                if let Some(s) = s {
                    o.insert("address".into(), json!(s.peer));
                    o.insert("connected_at_ns".into(), json!(s.connected_at_ns));
                    o.insert(
                        "last_seen_ns".into(),
                        json!(s.last_seen_ns.load(Ordering::Relaxed)),
                    );
                }
                o.insert("mounts".into(), Value::Array(mounts));
            }
            out.push(v);
        }
        Ok(out)
    }

    /// Stored records of `server`'s `mount` (None: its only mount).
    pub fn changes(
        &self,
        server: &str,
        mount: Option<&str>,
        from_seq: u64,
        limit: u64,
    ) -> Result<Value, AdminError> {
        let mount = match mount {
            Some(m) => m.to_string(),
            None => {
                let names = self.store.mount_names(server).map_err(AdminError::io)?;
                match names.as_slice() {
                    [one] => one.clone(),
                    [] => {
                        return Err(AdminError::new(
                            "not_found",
                            format!("no records stored for server {server:?}"),
                        ))
                    }
                    _ => {
                        return Err(AdminError::new(
                            "bad_request",
                            format!(
                                "server {server:?} has several mounts ({}): pass --mount",
                                names.join(", ")
                            ),
                        ))
                    }
                }
            }
        };
        let log = self
            .store
            .existing_log(server, &mount)
            .map_err(AdminError::io)?
            .ok_or_else(|| {
                AdminError::new(
                    "not_found",
                    format!("no records stored for {server}/{mount}"),
                )
            })?;
        let (file, cursor) = log.lock().snapshot().map_err(AdminError::io)?;
        let label = format!("{server}/{mount}");
        let records = read_records(
            file,
            cursor,
            from_seq,
            limit.clamp(1, MAX_CHANGES_PAGE),
            &label,
        )
        .map_err(AdminError::io)?;
        let next_seq = records
            .last()
            .map(|r| r.seq + 1)
            .unwrap_or(from_seq.max(cursor.last_seq + 1));
        Ok(json!({
            "server": server, "mount": mount, "records": records, "next_seq": next_seq,
            "stored_seq": cursor.last_seq, "stored_records": cursor.count,
        }))
    }

    async fn admin_loop(self: Arc<Self>, listener: UnixListener) {
        let me_uid = sys::geteuid();
        loop {
            let Some((stream, _)) = accepted(listener.accept().await, "admin accept").await else {
                continue;
            };
            match stream.peer_cred() {
                Ok(c) if c.uid() == 0 || c.uid() == me_uid => {}
                other => {
                    tracing::warn!(cred = ?other.map(|c| c.uid()), "admin connection refused: not root or the coordinator's user");
                    continue;
                }
            }
            let me = self.clone();
            tokio::spawn(async move { me.admin_conn(stream).await });
        }
    }

    async fn admin_conn(self: Arc<Self>, stream: UnixStream) {
        let (mut rd, mut wr) = stream.into_split();
        loop {
            let frame = match wire::read_frame(&mut rd, 1 << 20).await {
                Ok(Some(f)) => f,
                _ => return,
            };
            let reply = match serde_json::from_slice::<AdminRequest>(&frame) {
                Ok(req) if req.v != wire::PROTOCOL_VERSION => Err(AdminError::new(
                    "version",
                    format!("admin protocol version {} is not supported; this coordinator speaks version {}", req.v, wire::PROTOCOL_VERSION),
                )),
                Ok(req) => self.admin(req.op).await,
                Err(e) => Err(AdminError::new("bad_request", format!("unreadable admin request: {e}"))),
            };
            let body = match reply {
                Ok(result) => json!({"v": wire::PROTOCOL_VERSION, "ok": true, "result": result}),
                Err(error) => json!({"v": wire::PROTOCOL_VERSION, "ok": false, "error": error}),
            };
            let Ok(mut buf) = serde_json::to_vec(&body) else {
                return;
            };
            let len = (buf.len() as u32).to_be_bytes();
            buf.splice(0..0, len);
            if tokio::io::AsyncWriteExt::write_all(&mut wr, &buf)
                .await
                .is_err()
            {
                return;
            }
        }
    }

    async fn admin(self: &Arc<Self>, op: AdminOp) -> Result<Value, AdminError> {
        match op {
            AdminOp::Servers => {
                let me = self.clone();
                tokio::task::spawn_blocking(move || me.servers())
                    .await
                    .map_err(|e| AdminError::new("internal", e.to_string()))?
                    .map(Value::Array)
                    .map_err(AdminError::io)
            }
            AdminOp::Changes {
                server,
                mount,
                from_seq,
                limit,
            } => {
                let me = self.clone();
                tokio::task::spawn_blocking(move || {
                    me.changes(
                        &server,
                        mount.as_deref(),
                        from_seq.unwrap_or(1),
                        limit.unwrap_or(1000),
                    )
                })
                .await
                .map_err(|e| AdminError::new("internal", e.to_string()))?
            }
            AdminOp::Command {
                server,
                command,
                timeout_s,
            } => {
                let t = timeout_s
                    .filter(|t| t.is_finite() && *t > 0.0)
                    .map(Duration::from_secs_f64)
                    .unwrap_or(DEFAULT_COMMAND_TIMEOUT);
                let r = self.command(&server, command, t).await?;
                Ok(
                    json!({"server": server, "id": r.id, "ok": r.ok, "result": r.result, "error": r.error}),
                )
            }
        }
    }
}

/// Record batches queued per mount before the reader waits.
const STORE_QUEUE: usize = 64;
/// Most records stored by one commit.
const MAX_COMMIT_RECORDS: usize = 100_000;

/// Store the batches of one mount as they come, several per commit when they
/// queue up; acknowledge after each commit. Returns only on failure.
async fn store_worker(
    server_id: String,
    mount: String,
    log: SharedLog,
    mut rx: mpsc::Receiver<Vec<JournalRecord>>,
    tx: mpsc::Sender<Message>,
) -> String {
    while let Some(mut all) = rx.recv().await {
        while all.len() < MAX_COMMIT_RECORDS {
            match rx.try_recv() {
                Ok(more) => all.extend(more),
                Err(_) => break,
            }
        }
        let l = log.clone();
        match tokio::task::spawn_blocking(move || l.lock().append(&all)).await {
            Ok(Ok(seq)) => {
                let ack = Message::Ack {
                    mount: mount.clone(),
                    seq,
                };
                if tx.send(ack).await.is_err() {
                    return "writer gone".into();
                }
            }
            Ok(Err(e)) => {
                tracing::error!(server_id, mount = %mount, "cannot store records: {e}");
                let msg = format!("coordinator cannot store records: {e}");
                let _ = tx.send(Message::error(codes::INTERNAL, msg)).await;
                return format!("storage error: {e}");
            }
            Err(e) => return format!("storage task failed: {e}"),
        }
    }
    "link closed".into()
}

fn check_hello(h: &Hello) -> Result<(), String> {
    if !wire::valid_name(&h.server_id) {
        return Err(format!(
            "invalid server_id {:?}: use 1-128 of [A-Za-z0-9._@:-], not starting with '.'",
            h.server_id
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for m in &h.mounts {
        if !wire::valid_name(&m.name) {
            return Err(format!(
                "invalid mount name {:?}: use 1-128 of [A-Za-z0-9._@:-], not starting with '.'",
                m.name
            ));
        }
        if !seen.insert(m.name.as_str()) {
            return Err(format!("mount name {:?} appears twice", m.name));
        }
    }
    Ok(())
}

// ---- Admin protocol -----------------------------------------------------------

/// An admin request: `{"v":1,"op":"servers"}`, framed like the agent protocol.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdminRequest {
    pub v: u32,
    #[serde(flatten)]
    pub op: AdminOp,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum AdminOp {
    Servers,
    Changes {
        server: String,
        #[serde(default)]
        mount: Option<String>,
        #[serde(default)]
        from_seq: Option<u64>,
        #[serde(default)]
        limit: Option<u64>,
    },
    Command {
        server: String,
        command: AgentOp,
        #[serde(default)]
        timeout_s: Option<f64>,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AdminError {
    pub code: String,
    pub message: String,
}

impl AdminError {
    pub fn new(code: &str, message: impl Into<String>) -> AdminError {
        AdminError {
            code: code.into(),
            message: message.into(),
        }
    }

    fn io(e: io::Error) -> AdminError {
        AdminError::new("internal", e.to_string())
    }
}

impl std::fmt::Display for AdminError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Client side of the admin socket (the CLI, tests).
pub struct AdminClient {
    stream: UnixStream,
}

impl AdminClient {
    pub async fn connect(path: &Path) -> anyhow::Result<AdminClient> {
        let stream = UnixStream::connect(path).await.map_err(|e| {
            anyhow::anyhow!("cannot reach the coordinator's admin socket {}: {e} (is `layerfs-coordinator serve` running with this --data?)", path.display())
        })?;
        Ok(AdminClient { stream })
    }

    /// One request; Ok(Err) is the coordinator's refusal.
    pub async fn call(&mut self, op: AdminOp) -> anyhow::Result<Result<Value, AdminError>> {
        use tokio::io::AsyncWriteExt;
        let req = AdminRequest {
            v: wire::PROTOCOL_VERSION,
            op,
        };
        let body = serde_json::to_vec(&req)?;
        let mut buf = (body.len() as u32).to_be_bytes().to_vec();
        buf.extend_from_slice(&body);
        self.stream.write_all(&buf).await?;
        let frame = wire::read_frame(&mut self.stream, wire::MAX_FRAME)
            .await?
            .ok_or_else(|| anyhow::anyhow!("the coordinator closed the admin connection"))?;
        let v: Value = serde_json::from_slice(&frame)?;
        if v.get("ok") == Some(&Value::Bool(true)) {
            Ok(Ok(v.get("result").cloned().unwrap_or(Value::Null)))
        } else {
            let e: AdminError =
                serde_json::from_value(v.get("error").cloned().unwrap_or(Value::Null))
                    .unwrap_or_else(|_| {
                        AdminError::new("internal", format!("unreadable reply: {v}"))
                    });
            Ok(Err(e))
        }
    }
}

/// The result of an accept; a failure (EMFILE and friends) is logged as
/// "`what` failed" and followed by a pause instead of spinning.
async fn accepted<T>(res: std::io::Result<T>, what: &str) -> Option<T> {
    match res {
        Ok(x) => Some(x),
        Err(e) => {
            tracing::warn!("{what} failed: {e}");
            tokio::time::sleep(Duration::from_millis(200)).await;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::wire::tests::rec;

    fn seqs(l: &MountLog) -> Vec<u64> {
        l.read(0, u64::MAX).unwrap().iter().map(|r| r.seq).collect()
    }

    #[test]
    fn append_dedups_by_seq() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        let log = store.mount_log("s1", "root").unwrap();
        let mut l = log.lock();
        assert_eq!(l.append(&[rec(1), rec(2), rec(3)]).unwrap(), 3);
        // Resent overlap, out-of-order duplicates within a batch.
        assert_eq!(
            l.append(&[rec(2), rec(3), rec(4), rec(4), rec(3), rec(6)])
                .unwrap(),
            6
        );
        assert_eq!(l.append(&[rec(1)]).unwrap(), 6);
        assert_eq!(seqs(&l), vec![1, 2, 3, 4, 6]);
        assert_eq!(l.cursor().count, 5);
        assert_eq!(l.cursor().last_seq, 6);
        assert_eq!(l.read(4, 1).unwrap()[0].seq, 4);
    }

    #[test]
    fn reopen_cuts_unacknowledged_tail_and_survives_torn_tmp() {
        let tmp = tempfile::tempdir().unwrap();
        let mdir = tmp.path().join("servers/s1/mounts/root");
        {
            let store = Store::open(tmp.path()).unwrap();
            let log = store.mount_log("s1", "root").unwrap();
            log.lock().append(&[rec(1), rec(2)]).unwrap();
        }
        // A crash after appending but before the cursor moved, in the middle of
        // writing the next cursor's tmp file and of a line.
        let good = std::fs::read(mdir.join("changes.jsonl")).unwrap();
        let cursor_before = std::fs::read(mdir.join("cursor.json")).unwrap();
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(mdir.join("changes.jsonl"))
            .unwrap();
        f.write_all(&serde_json::to_vec(&rec(3)).unwrap()).unwrap();
        f.write_all(b"\n{\"seq\":4,\"ti").unwrap();
        std::fs::write(mdir.join("cursor.json.tmp"), b"{\"v\":1,\"last_se").unwrap();
        drop(f);
        {
            let store = Store::open(tmp.path()).unwrap();
            let log = store.mount_log("s1", "root").unwrap();
            let mut l = log.lock();
            assert_eq!(std::fs::read(mdir.join("changes.jsonl")).unwrap(), good);
            assert_eq!(
                std::fs::read(mdir.join("cursor.json")).unwrap(),
                cursor_before
            );
            assert_eq!(l.cursor().last_seq, 2);
            // The agent resends from 3: stored exactly once.
            l.append(&[rec(3), rec(4)]).unwrap();
            assert_eq!(seqs(&l), vec![1, 2, 3, 4]);
        }
        // Cursor lost entirely: rebuilt from the log.
        std::fs::remove_file(mdir.join("cursor.json")).unwrap();
        {
            let store = Store::open(tmp.path()).unwrap();
            let log = store.mount_log("s1", "root").unwrap();
            let l = log.lock();
            assert_eq!(l.cursor().last_seq, 4);
            assert_eq!(l.cursor().count, 4);
        }
        // Log shorter than the cursor says (lost tail): rebuilt, torn line cut.
        let full = std::fs::read(mdir.join("changes.jsonl")).unwrap();
        std::fs::write(mdir.join("changes.jsonl"), &full[..full.len() - 5]).unwrap();
        {
            let store = Store::open(tmp.path()).unwrap();
            let log = store.mount_log("s1", "root").unwrap();
            let l = log.lock();
            assert_eq!(l.cursor().last_seq, 3);
            assert_eq!(seqs(&l), vec![1, 2, 3]);
        }
    }

    #[test]
    fn store_refuses_other_formats_bad_names_and_a_second_coordinator() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        let e = Store::open(tmp.path()).err().unwrap().to_string();
        assert!(e.contains("another layerfs-coordinator"), "{e}");
        assert!(store.mount_log("../x", "root").is_err());
        assert!(store.mount_log("s1", "..").is_err());
        assert!(store.mount_log("s1", "a/b").is_err());
        drop(store);
        std::fs::write(
            tmp.path().join("format.json"),
            br#"{"v":2,"kind":"layerfs-coordinator"}"#,
        )
        .unwrap();
        let e = Store::open(tmp.path()).err().unwrap().to_string();
        assert!(e.contains("format 2"), "{e}");
        // A symlinked server directory is not followed.
        std::fs::write(
            tmp.path().join("format.json"),
            br#"{"v":1,"kind":"layerfs-coordinator"}"#,
        )
        .unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), tmp.path().join("servers/evil")).unwrap();
        let store = Store::open(tmp.path()).unwrap();
        assert!(store.mount_log("evil", "root").is_err());
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
    }

    #[test]
    fn start_over_keeps_the_old_log() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        let log = store.mount_log("s1", "root").unwrap();
        let mut l = log.lock();
        l.append(&[rec(1), rec(2), rec(3)]).unwrap();
        l.start_over(1).unwrap();
        assert_eq!(l.cursor().last_seq, 0);
        l.append(&[rec(1)]).unwrap();
        assert_eq!(seqs(&l), vec![1]);
        let old: Vec<_> = std::fs::read_dir(tmp.path().join("servers/s1/mounts/root"))
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("changes.1"))
            .collect();
        assert_eq!(old.len(), 1);
    }
}
