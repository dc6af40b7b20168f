//! A blocking client of the control socket (used by `layerfs-ctl`; the agent
//! can use it too). One request at a time per `Client`; request ids increase.

use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::proto::{
    read_frame, write_frame, ApiError, ErrorCode, Op, Reply, Request, PROTOCOL_VERSION,
};

#[derive(Debug)]
pub enum ClientError {
    /// The socket cannot be reached (missing, stale, not a socket).
    Connect(String),
    /// The connection failed while talking.
    Io(io::Error),
    /// The server answered with an error. A socket file the caller may not
    /// open is reported here too, as `PermissionDenied`.
    Api(ApiError),
    /// The server's answer does not follow the protocol.
    Protocol(String),
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Connect(m) => f.write_str(m),
            ClientError::Io(e) if is_disconnect(e) => write!(
                f,
                "the layerfs server closed the connection ({e}); did the mount go away? check its log"
            ),
            ClientError::Io(e) => write!(f, "talking to the layerfs control socket failed: {e}"),
            ClientError::Api(e) => f.write_str(&e.message),
            ClientError::Protocol(m) => write!(
                f,
                "protocol error: {m} (are layerfs-ctl and the mounted layerfs the same version?)"
            ),
        }
    }
}

impl std::error::Error for ClientError {}

impl From<io::Error> for ClientError {
    fn from(e: io::Error) -> Self {
        ClientError::Io(e)
    }
}

impl From<ApiError> for ClientError {
    fn from(e: ApiError) -> Self {
        ClientError::Api(e)
    }
}

impl ClientError {
    /// The API error code, if the server (or the socket's permissions) refused.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Api(e) => Some(e.code),
            _ => None,
        }
    }
}

fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
    )
}

pub struct Client {
    path: PathBuf,
    /// None after a stream was stopped by the caller: the server may still be
    /// sending on that connection, so the next call reconnects.
    stream: Option<UnixStream>,
    next_id: u64,
    read_timeout: Option<Duration>,
}

impl Client {
    pub fn connect(path: &Path) -> Result<Client, ClientError> {
        let stream = open(path)?;
        Ok(Client {
            path: path.to_path_buf(),
            stream: Some(stream),
            next_id: 1,
            read_timeout: None,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Give up on a reply after `t` without data (None: wait forever, the
    /// default, since rollback and verify can take long).
    pub fn set_read_timeout(&mut self, t: Option<Duration>) -> Result<(), ClientError> {
        self.read_timeout = t;
        if let Some(s) = &self.stream {
            s.set_read_timeout(t)?;
        }
        Ok(())
    }

    /// Send `op` and wait for its result; events (progress) are ignored.
    pub fn call(&mut self, op: Op) -> Result<serde_json::Value, ClientError> {
        self.call_stream(op, &mut |_| true)
    }

    /// Send `op`, hand every event to `on_event` until the final reply.
    /// `on_event` returning false stops: the connection is closed (the
    /// server notices and ends the stream) and `Ok(Value::Null)` returned;
    /// the next call opens a new connection.
    pub fn call_stream(
        &mut self,
        op: Op,
        on_event: &mut dyn FnMut(serde_json::Value) -> bool,
    ) -> Result<serde_json::Value, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        if self.stream.is_none() {
            let s = open(&self.path)?;
            s.set_read_timeout(self.read_timeout)?;
            self.stream = Some(s);
        }
        let res = self.exchange(id, op, on_event);
        match &res {
            // After a protocol or I/O error the stream position is unknown.
            Err(ClientError::Io(_)) | Err(ClientError::Protocol(_)) | Ok(None) => {
                if let Some(s) = self.stream.take() {
                    let _ = s.shutdown(std::net::Shutdown::Both);
                }
            }
            _ => {}
        }
        res.map(|v| v.unwrap_or(serde_json::Value::Null))
    }

    /// Ok(None): stopped by `on_event`.
    fn exchange(
        &mut self,
        id: u64,
        op: Op,
        on_event: &mut dyn FnMut(serde_json::Value) -> bool,
    ) -> Result<Option<serde_json::Value>, ClientError> {
        let stream = self
            .stream
            .as_mut()
            .ok_or_else(|| ClientError::Protocol("not connected".into()))?;
        if let Err(e) = write_frame(stream, &Request::new(id, op)) {
            // The server may have refused the connection (Busy) and closed it
            // before reading anything: its reason is still in our buffer.
            if is_disconnect(&e) {
                if let Ok(Some(f)) = read_frame(stream) {
                    if let Ok(Reply::Err { error, .. }) = serde_json::from_slice::<Reply>(&f) {
                        return Err(ClientError::Api(error));
                    }
                }
            }
            return Err(ClientError::Io(e));
        }
        loop {
            let frame = match read_frame(stream) {
                Ok(Some(f)) => f,
                Ok(None) => {
                    return Err(ClientError::Io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "no reply",
                    )))
                }
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    return Err(ClientError::Protocol(e.to_string()))
                }
                Err(e) => return Err(ClientError::Io(e)),
            };
            let reply: Reply = serde_json::from_slice(&frame)
                .map_err(|e| ClientError::Protocol(format!("unreadable reply: {e}")))?;
            let (v, rid) = match &reply {
                Reply::Ok { v, id, .. } | Reply::Err { v, id, .. } | Reply::Event { v, id, .. } => {
                    (*v, *id)
                }
            };
            // id 0: the server could not tell which request it answers
            // (unparsable frame, too many connections): still our answer.
            let unattributed_err = rid == 0 && matches!(reply, Reply::Err { .. });
            if rid != id && !unattributed_err {
                return Err(ClientError::Protocol(format!(
                    "reply for request {rid} while waiting for {id}"
                )));
            }
            match reply {
                Reply::Err { error, .. } => return Err(ClientError::Api(error)),
                _ if v != PROTOCOL_VERSION => {
                    return Err(ClientError::Protocol(format!(
                        "server speaks protocol version {v}, this client {PROTOCOL_VERSION}"
                    )))
                }
                Reply::Ok { result, .. } => return Ok(Some(result)),
                Reply::Event { event, .. } => {
                    if !on_event(event) {
                        return Ok(None);
                    }
                }
            }
        }
    }
}

fn open(path: &Path) -> Result<UnixStream, ClientError> {
    let p = path.display();
    UnixStream::connect(path).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOENT) => ClientError::Connect(format!(
            "no layerfs control socket at {p}: is the union mounted (with an upperdir)?"
        )),
        Some(libc::ECONNREFUSED) => ClientError::Connect(format!(
            "nothing answers on {p}: the layerfs that created it is not running (stale socket)"
        )),
        Some(libc::EACCES) | Some(libc::EPERM) => ClientError::Api(ApiError::new(
            ErrorCode::PermissionDenied,
            format!("permission denied on {p}: the control socket is for root (or its group) only; run as root"),
        )),
        Some(libc::ENOTSOCK) => ClientError::Connect(format!(
            "{p} is not a socket: pass the control socket of a layerfs mount (-s) or its mountpoint (-m)"
        )),
        _ => ClientError::Connect(format!("cannot connect to the layerfs control socket {p}: {e}")),
    })
}
