//! The control socket server: accepts connections on a Unix socket, checks
//! the peer's credentials (SO_PEERCRED), reads framed requests and answers
//! them through a `Handler`, one thread per connection.
//!
//! Robustness rules: a stalled or malicious client never blocks another one
//! (each connection has its own thread, a started frame must complete within
//! `FRAME_TIMEOUT`, replies are written with `WRITE_TIMEOUT`), the number of
//! connections is bounded (`MAX_CONNECTIONS`), and a frame that cannot be
//! parsed gets an error reply instead of killing anything.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::proto::{
    encode_frame, ApiError, ErrorCode, Handler, Peer, Reply, Request, MAX_FRAME, PROTOCOL_VERSION,
};
use crate::sys;

/// Connections served at once; one more is answered `Busy` and closed.
pub const MAX_CONNECTIONS: usize = 64;
/// Once the first byte of a frame arrived, the rest must follow within this.
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(30);
/// A reply (or event) that cannot be written within this closes the connection.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Who may use the control socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    /// Peers with one of these uids.
    pub uids: Vec<u32>,
    /// Peers in this group (primary or supplementary); the socket file is
    /// then 0660 and owned by this group.
    pub gid: Option<u32>,
}

impl Default for Access {
    /// Root only.
    fn default() -> Self {
        Access {
            uids: vec![0],
            gid: None,
        }
    }
}

impl Access {
    pub fn root_only() -> Self {
        Access::default()
    }

    /// Whether a peer with these credentials (and supplementary `groups`) may
    /// use the socket.
    pub fn allows(&self, peer: &Peer, groups: &[u32]) -> bool {
        self.uids.contains(&peer.uid)
            || self
                .gid
                .is_some_and(|g| peer.gid == g || groups.contains(&g))
    }

    /// "root only", "uids 0, 1000 and group 27".
    pub fn describe(&self) -> String {
        if self.uids == [0] && self.gid.is_none() {
            return "root only".to_string();
        }
        let mut parts = Vec::new();
        if !self.uids.is_empty() {
            let list: Vec<String> = self.uids.iter().map(|u| u.to_string()).collect();
            parts.push(format!(
                "uid{} {}",
                if self.uids.len() > 1 { "s" } else { "" },
                list.join(", ")
            ));
        }
        if let Some(g) = self.gid {
            parts.push(format!("group {g}"));
        }
        if parts.is_empty() {
            "nobody".to_string()
        } else {
            format!("{} only", parts.join(" and "))
        }
    }
}

/// A running server. Dropping it stops accepting, closes every open
/// connection and removes the socket file (if it is still the one bound).
pub struct ServerHandle {
    path: PathBuf,
    listener: Arc<UnixListener>,
    stop: Arc<AtomicBool>,
    accept_thread: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
    /// (dev, ino) of the socket file we bound, so Drop never unlinks a
    /// socket another server put at the same path since.
    ident: (u64, u64),
}

struct Shared {
    handler: Arc<dyn Handler>,
    access: Access,
    active: AtomicUsize,
    next_conn: AtomicU64,
    /// A clone of every open connection, to shut them down on Drop.
    conns: Mutex<HashMap<u64, UnixStream>>,
}

impl ServerHandle {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Connections currently being served.
    pub fn active_connections(&self) -> usize {
        self.shared.active.load(Ordering::SeqCst)
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept(2) blocked in the accept thread (EINVAL).
        if let Err(e) = sys::shutdown_socket(self.listener.as_fd()) {
            tracing::warn!(path = %self.path.display(), "control socket: shutdown failed: {e}");
        }
        if let Some(t) = self.accept_thread.take() {
            let _ = t.join();
        }
        for (_, s) in self.shared.conns.lock().drain() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if (m.dev(), m.ino()) == self.ident => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    tracing::warn!(path = %self.path.display(), "cannot remove the control socket: {e}");
                }
            }
            _ => {}
        }
    }
}

/// Bind the control socket at `path` and serve it on background threads.
///
/// A socket file already at `path` that nobody answers on is stale and
/// replaced; one that answers means another layerfs serves it (AddrInUse).
pub fn spawn(path: &Path, handler: Arc<dyn Handler>, access: Access) -> io::Result<ServerHandle> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(parent)
                .map_err(|e| annotate(e, format!("cannot create {}", parent.display())))?;
        }
    }
    remove_stale(path)?;
    let listener = UnixListener::bind(path).map_err(|e| {
        annotate(
            e,
            format!("cannot bind the control socket {}", path.display()),
        )
    })?;
    let meta = match restrict(path, &access) {
        Ok(m) => m,
        Err(e) => {
            // Do not leave a socket nobody serves behind.
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
    };
    let listener = Arc::new(listener);
    let stop = Arc::new(AtomicBool::new(false));
    let shared = Arc::new(Shared {
        handler,
        access,
        active: AtomicUsize::new(0),
        next_conn: AtomicU64::new(1),
        conns: Mutex::new(HashMap::new()),
    });
    let accept_thread = {
        let listener = listener.clone();
        let stop = stop.clone();
        let shared = shared.clone();
        let p = path.to_path_buf();
        std::thread::Builder::new()
            .name("layerfs-ctl-accept".into())
            .spawn(move || accept_loop(&listener, &stop, &shared, &p))?
    };
    tracing::info!(path = %path.display(), access = %shared.access.describe(), "control socket listening");
    Ok(ServerHandle {
        path: path.to_path_buf(),
        listener,
        stop,
        accept_thread: Some(accept_thread),
        shared,
        ident: (meta.dev(), meta.ino()),
    })
}

/// Set the socket file's mode and group; returns its metadata.
fn restrict(path: &Path, access: &Access) -> io::Result<std::fs::Metadata> {
    // The peer check does not depend on the mode; the mode keeps everyone
    // else from even connecting.
    let mode = if access.gid.is_some() { 0o660 } else { 0o600 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    if let Some(g) = access.gid {
        std::os::unix::fs::chown(path, None, Some(g))
            .map_err(|e| annotate(e, format!("cannot chown {} to group {g}", path.display())))?;
    }
    std::fs::symlink_metadata(path)
}

fn annotate(e: io::Error, what: String) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// Unlink a dead socket at `path`; refuse a live one or a non-socket.
fn remove_stale(path: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} exists and is not a socket; remove it or choose another control socket path",
                path.display()
            ),
        ));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("another layerfs already serves {}", path.display()),
        )),
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
            tracing::info!(path = %path.display(), "removing stale control socket");
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        }
        Err(e) => Err(annotate(
            e,
            format!("cannot tell whether {} is in use", path.display()),
        )),
    }
}

fn accept_loop(listener: &UnixListener, stop: &AtomicBool, shared: &Arc<Shared>, path: &Path) {
    loop {
        let res = listener.accept();
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let stream = match res {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // EMFILE/ENFILE/ENOMEM: back off instead of spinning.
                tracing::warn!(path = %path.display(), "control socket accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if shared.active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            shared.active.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!("control socket: {MAX_CONNECTIONS} connections open, refusing one");
            refuse_busy(stream);
            continue;
        }
        let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
        if let Ok(clone) = stream.try_clone() {
            shared.conns.lock().insert(id, clone);
        }
        let guard = ConnGuard {
            shared: shared.clone(),
            id,
        };
        let spawned = std::thread::Builder::new()
            .name("layerfs-ctl-conn".into())
            .spawn(move || {
                let g = guard;
                serve_connection(stream, &g.shared);
            });
        if let Err(e) = spawned {
            // The guard went down with the closure: counter and registry are clean.
            tracing::warn!("control socket: cannot start a connection thread: {e}");
        }
    }
}

/// Keeps the connection count and registry right however the thread ends.
struct ConnGuard {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.shared.conns.lock().remove(&self.id);
        self.shared.active.fetch_sub(1, Ordering::SeqCst);
    }
}

fn refuse_busy(mut stream: UnixStream) {
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    let reply = Reply::err(
        0,
        ApiError::new(
            ErrorCode::Busy,
            format!(
                "the control socket already serves {MAX_CONNECTIONS} connections; try again later"
            ),
        ),
    );
    if let Ok(buf) = encode_frame(&reply) {
        let _ = stream.write_all(&buf);
    }
}

/// How reading one frame ended.
enum Incoming {
    Frame(Vec<u8>),
    /// The client closed the connection between frames.
    Closed,
    /// The declared length is over MAX_FRAME.
    TooBig(usize),
    /// A started frame did not complete within FRAME_TIMEOUT.
    Stalled,
    Failed(io::Error),
}

fn read_incoming(stream: &mut UnixStream) -> Incoming {
    // Idle connections may stay open: no timeout until a frame starts.
    if let Err(e) = stream.set_read_timeout(None) {
        return Incoming::Failed(e);
    }
    let mut hdr = [0u8; 4];
    loop {
        match stream.read(&mut hdr[..1]) {
            Ok(0) => return Incoming::Closed,
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Incoming::Failed(e),
        }
    }
    let deadline = Instant::now() + FRAME_TIMEOUT;
    if let Err(i) = read_until(stream, &mut hdr[1..], deadline) {
        return i;
    }
    let len = u32::from_be_bytes(hdr) as usize;
    if len > MAX_FRAME {
        return Incoming::TooBig(len);
    }
    // Allocate as data arrives, not as declared.
    let mut buf = Vec::with_capacity(len.min(64 << 10));
    let mut chunk = [0u8; 64 << 10];
    while buf.len() < len {
        let want = (len - buf.len()).min(chunk.len());
        if let Err(i) = read_until(stream, &mut chunk[..want], deadline) {
            return i;
        }
        buf.extend_from_slice(&chunk[..want]);
    }
    Incoming::Frame(buf)
}

/// Fill `buf` completely before `deadline`.
fn read_until(stream: &mut UnixStream, buf: &mut [u8], deadline: Instant) -> Result<(), Incoming> {
    let mut got = 0;
    while got < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Incoming::Stalled);
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(Incoming::Failed)?;
        match stream.read(&mut buf[got..]) {
            Ok(0) => {
                return Err(Incoming::Failed(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed in the middle of a frame",
                )))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(Incoming::Stalled)
            }
            Err(e) => return Err(Incoming::Failed(e)),
        }
    }
    Ok(())
}

/// Write one reply; a reply too large for a frame becomes an error reply.
fn send(stream: &mut UnixStream, reply: &Reply) -> io::Result<()> {
    let buf = match encode_frame(reply) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::InvalidData => {
            let err = Reply::err(
                reply.id(),
                ApiError::new(
                    ErrorCode::Internal,
                    format!("the answer is too large to send ({e}); narrow the request"),
                ),
            );
            encode_frame(&err)?
        }
        Err(e) => return Err(e),
    };
    stream.write_all(&buf)
}

fn serve_connection(mut stream: UnixStream, shared: &Shared) {
    let peer = match sys::peer_cred(stream.as_fd()) {
        Ok((pid, uid, gid)) => Peer { pid, uid, gid },
        Err(e) => {
            tracing::warn!("control socket: cannot read the peer's credentials: {e}");
            return;
        }
    };
    // Supplementary groups only matter when a group is allowed.
    let groups = if shared.access.gid.is_some() {
        sys::peer_groups(stream.as_fd()).unwrap_or_default()
    } else {
        Vec::new()
    };
    let allowed = shared.access.allows(&peer, &groups);
    if !allowed {
        tracing::warn!(
            uid = peer.uid,
            gid = peer.gid,
            pid = peer.pid,
            "control socket: refusing a peer that is not allowed ({})",
            shared.access.describe()
        );
    } else {
        tracing::debug!(uid = peer.uid, pid = peer.pid, "control socket: connection");
    }
    if let Err(e) = stream.set_write_timeout(Some(WRITE_TIMEOUT)) {
        tracing::warn!("control socket: cannot set a write timeout: {e}");
        return;
    }
    loop {
        let frame = match read_incoming(&mut stream) {
            Incoming::Frame(f) => f,
            Incoming::Closed => break,
            Incoming::TooBig(len) => {
                tracing::warn!(
                    pid = peer.pid,
                    "control socket: frame of {len} bytes refused"
                );
                let reply = Reply::err(
                    0,
                    ApiError::new(
                        ErrorCode::BadRequest,
                        format!(
                            "frame of {len} bytes is larger than the {MAX_FRAME}-byte limit; closing the connection"
                        ),
                    ),
                );
                let _ = send(&mut stream, &reply);
                // The rest of that frame is still coming: no way to resync.
                break;
            }
            Incoming::Stalled => {
                tracing::warn!(
                    pid = peer.pid,
                    "control socket: a frame did not complete within {}s; closing the connection",
                    FRAME_TIMEOUT.as_secs()
                );
                break;
            }
            Incoming::Failed(e) => {
                tracing::debug!(pid = peer.pid, "control socket: connection ended: {e}");
                break;
            }
        };
        let reply_ok = answer(&mut stream, shared, &peer, allowed, &frame);
        if !reply_ok {
            break;
        }
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

/// Answer one frame; false when the connection is no longer usable.
fn answer(
    stream: &mut UnixStream,
    shared: &Shared,
    peer: &Peer,
    allowed: bool,
    frame: &[u8],
) -> bool {
    let value: serde_json::Value = match serde_json::from_slice(frame) {
        Ok(v) => v,
        Err(e) => {
            let r = Reply::err(
                0,
                ApiError::new(ErrorCode::BadRequest, format!("invalid JSON: {e}")),
            );
            return send(stream, &r).is_ok();
        }
    };
    let id = value.get("id").and_then(|i| i.as_u64()).unwrap_or(0);
    if !allowed {
        let r = Reply::err(
            id,
            ApiError::new(
                ErrorCode::PermissionDenied,
                format!(
                    "the control socket allows {}; peer uid {} (pid {}) is not allowed",
                    shared.access.describe(),
                    peer.uid,
                    peer.pid
                ),
            ),
        );
        return send(stream, &r).is_ok();
    }
    match value.get("v").map(|v| v.as_u64()) {
        None => {
            let r = Reply::err(
                id,
                ApiError::new(ErrorCode::BadRequest, "missing protocol version \"v\""),
            );
            return send(stream, &r).is_ok();
        }
        Some(Some(v)) if v == u64::from(PROTOCOL_VERSION) => {}
        Some(v) => {
            let shown = v.map_or_else(|| value["v"].to_string(), |n| n.to_string());
            let r = Reply::err(
                id,
                ApiError::new(
                    ErrorCode::Version,
                    format!(
                        "protocol version {shown} is not supported; this server speaks {PROTOCOL_VERSION}"
                    ),
                ),
            );
            return send(stream, &r).is_ok();
        }
    }
    if value.get("op").is_none() {
        let r = Reply::err(id, ApiError::new(ErrorCode::BadRequest, "missing \"op\""));
        return send(stream, &r).is_ok();
    }
    let req: Request = match serde_json::from_value(value) {
        Ok(r) => r,
        Err(e) => {
            let r = Reply::err(
                id,
                ApiError::new(ErrorCode::BadRequest, format!("bad request: {e}")),
            );
            return send(stream, &r).is_ok();
        }
    };
    let op_name = req.op.name();
    let mut alive = true;
    let result = {
        let mut events = |event: serde_json::Value| -> io::Result<()> {
            if !alive {
                return Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "the client is gone",
                ));
            }
            // An event too large for a frame is refused to the handler;
            // the connection itself stays usable.
            let buf = encode_frame(&Reply::event(req.id, event))?;
            let r = stream.write_all(&buf);
            if r.is_err() {
                alive = false;
            }
            r
        };
        let handler = &shared.handler;
        // A panicking handler must not take the connection thread's
        // bookkeeping down with it, nor leave the client waiting.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            handler.handle(peer, req.op, &mut events)
        }))
    };
    if !alive {
        tracing::debug!(
            op = op_name,
            "control socket: client went away during the request"
        );
        return false;
    }
    let reply = match result {
        Ok(Ok(v)) => Reply::ok(req.id, v),
        Ok(Err(e)) => Reply::err(req.id, e),
        Err(_) => {
            tracing::error!(op = op_name, "control socket: the request handler panicked");
            Reply::err(
                req.id,
                ApiError::new(
                    ErrorCode::Internal,
                    format!("internal error while handling {op_name} (see the layerfs log)"),
                ),
            )
        }
    };
    match send(stream, &reply) {
        Ok(()) => true,
        Err(e) => {
            tracing::debug!(op = op_name, "control socket: cannot send the reply: {e}");
            false
        }
    }
}
