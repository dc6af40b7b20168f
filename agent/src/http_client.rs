//! A small blocking HTTP/1.1 client over a Unix stream socket, for `layerctl`
//! talking to `layerd`. One request per connection (`Connection: close`).
//! Response bodies are framed by Content-Length, chunked transfer encoding
//! (decoded incrementally, so a never-ending NDJSON stream can be read line
//! by line as it arrives) or the end of the connection.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

/// Largest response head (status line and headers) accepted.
pub const MAX_HEAD: usize = 64 << 10;
/// Most header lines accepted.
pub const MAX_HEADERS: usize = 100;
/// Longest chunk-size or trailer line accepted.
const MAX_CHUNK_LINE: usize = 4096;

#[derive(Debug)]
pub enum HttpError {
    /// The socket cannot be connected to (missing, refused, not a socket, no access).
    Connect { path: PathBuf, source: io::Error },
    /// The connection failed while talking (including a close mid-response).
    Io(io::Error),
    /// The answer is not HTTP/1.x as this client understands it.
    Protocol(String),
}

impl std::fmt::Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HttpError::Connect { path, source } => {
                write!(f, "cannot connect to {}: {source}", path.display())
            }
            HttpError::Io(e) => write!(f, "talking to layerd failed: {e}"),
            HttpError::Protocol(m) => write!(f, "bad HTTP response from layerd: {m}"),
        }
    }
}

impl std::error::Error for HttpError {}

impl From<io::Error> for HttpError {
    fn from(e: io::Error) -> Self {
        // Framing problems found while decoding surface as InvalidData.
        if e.kind() == io::ErrorKind::InvalidData {
            HttpError::Protocol(e.to_string())
        } else {
            HttpError::Io(e)
        }
    }
}

/// Connect to `socket`, send one request and read the response head. The
/// body is read from the returned `Response` (its `Body` implements `Read`).
pub fn send(
    socket: &Path,
    method: &str,
    target: &str,
    body: Option<&[u8]>,
) -> Result<Response<UnixStream>, HttpError> {
    let stream = UnixStream::connect(socket).map_err(|source| HttpError::Connect {
        path: socket.to_path_buf(),
        source,
    })?;
    write_request(&mut &stream, method, target, body)?;
    read_response(stream)
}

/// Write one request. `target` is the origin-form path and query
/// ("/v1/status"), already percent-encoded; a JSON `body` gets its
/// Content-Type and Content-Length.
pub fn write_request<W: Write>(
    w: &mut W,
    method: &str,
    target: &str,
    body: Option<&[u8]>,
) -> io::Result<()> {
    let bad = |s: &str| s.is_empty() || s.bytes().any(|b| b <= b' ' || b == 0x7f);
    if bad(method) || bad(target) || !target.starts_with('/') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid request line: {method:?} {target:?}"),
        ));
    }
    let mut head = format!(
        "{method} {target} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: layerctl/{}\r\n\
         Accept: application/json\r\nConnection: close\r\n",
        env!("CARGO_PKG_VERSION")
    );
    match body {
        Some(b) => head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        )),
        // A POST without a body still says so, or a server may wait for one.
        None if method != "GET" && method != "HEAD" => head.push_str("Content-Length: 0\r\n"),
        None => {}
    }
    head.push_str("\r\n");
    let mut buf = head.into_bytes();
    if let Some(b) = body {
        buf.extend_from_slice(b);
    }
    w.write_all(&buf)?;
    w.flush()
}

/// A response: status and headers read, the body not yet.
pub struct Response<R> {
    pub status: u16,
    pub reason: String,
    /// Names as sent; look them up with `header` (case-insensitive).
    pub headers: Vec<(String, String)>,
    body: Body<R>,
}

impl<R: Read> Response<R> {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body, to read incrementally (streams).
    pub fn into_body(self) -> Body<R> {
        self.body
    }

    /// The whole body; more than `limit` bytes is a protocol error.
    pub fn read_body(self, limit: u64) -> Result<Vec<u8>, HttpError> {
        let mut out = Vec::new();
        self.body.take(limit + 1).read_to_end(&mut out)?;
        if out.len() as u64 > limit {
            return Err(HttpError::Protocol(format!(
                "response body larger than {limit} bytes"
            )));
        }
        Ok(out)
    }
}

/// Read a response head from `r` (interim 1xx responses are skipped).
pub fn read_response<R: Read>(r: R) -> Result<Response<R>, HttpError> {
    let mut inner = BufReader::new(r);
    loop {
        let mut used = 0usize;
        let status_line = match read_line(&mut inner, MAX_HEAD)? {
            (Some(l), true) => l,
            (None, _) => {
                return Err(HttpError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "layerd closed the connection without an answer",
                )))
            }
            (Some(_), false) => {
                return Err(HttpError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed in the middle of the status line",
                )))
            }
        };
        used += status_line.len();
        let (status, reason) = parse_status_line(&status_line)?;
        let mut headers = Vec::new();
        loop {
            let line = match read_line(&mut inner, MAX_HEAD.saturating_sub(used))? {
                (Some(l), true) => l,
                _ => {
                    return Err(HttpError::Io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed in the middle of the response headers",
                    )))
                }
            };
            used += line.len() + 2;
            if used > MAX_HEAD {
                return Err(HttpError::Protocol(format!(
                    "response head larger than {MAX_HEAD} bytes"
                )));
            }
            if line.is_empty() {
                break;
            }
            if headers.len() >= MAX_HEADERS {
                return Err(HttpError::Protocol(format!(
                    "more than {MAX_HEADERS} header lines"
                )));
            }
            headers.push(parse_header(&line)?);
        }
        if (100..200).contains(&status) && status != 101 {
            continue;
        }
        let kind = body_kind(status, &headers)?;
        return Ok(Response {
            status,
            reason,
            headers,
            body: Body { inner, kind },
        });
    }
}

fn parse_status_line(line: &str) -> Result<(u16, String), HttpError> {
    let bad = || HttpError::Protocol(format!("bad status line {line:?}"));
    let rest = line
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| line.strip_prefix("HTTP/1.0 "))
        .ok_or_else(bad)?;
    let (code, reason) = rest.split_once(' ').unwrap_or((rest, ""));
    if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let status: u16 = code.parse().map_err(|_| bad())?;
    if !(100..600).contains(&status) {
        return Err(bad());
    }
    Ok((status, reason.to_string()))
}

fn parse_header(line: &str) -> Result<(String, String), HttpError> {
    let bad = || HttpError::Protocol(format!("bad header line {line:?}"));
    // Folded continuation lines are obsolete (RFC 9112 5.2): refuse them.
    if line.starts_with([' ', '\t']) {
        return Err(bad());
    }
    let (name, value) = line.split_once(':').ok_or_else(bad)?;
    if name.is_empty() || name.bytes().any(|b| b <= b' ' || b >= 0x7f) {
        return Err(bad());
    }
    Ok((name.to_string(), value.trim().to_string()))
}

/// How the body of a response is delimited (RFC 9112 6.3).
fn body_kind(status: u16, headers: &[(String, String)]) -> Result<Kind, HttpError> {
    if status == 204 || status == 304 || (100..200).contains(&status) {
        return Ok(Kind::Done);
    }
    let te: Vec<&str> = headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("transfer-encoding"))
        .flat_map(|(_, v)| v.split(','))
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect();
    if let Some(last) = te.last() {
        // Transfer-Encoding overrides Content-Length; only "chunked" is decoded.
        if last.eq_ignore_ascii_case("chunked") {
            if te.len() > 1 {
                return Err(HttpError::Protocol(format!(
                    "unsupported transfer encoding {}",
                    te.join(", ")
                )));
            }
            return Ok(Kind::Chunked(Chunk::Size));
        }
        return Ok(Kind::UntilClose);
    }
    let mut len: Option<u64> = None;
    for (_, v) in headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("content-length"))
    {
        for part in v.split(',').map(str::trim) {
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(HttpError::Protocol(format!("bad Content-Length {v:?}")));
            }
            let n: u64 = part
                .parse()
                .map_err(|_| HttpError::Protocol(format!("bad Content-Length {v:?}")))?;
            if len.is_some_and(|l| l != n) {
                return Err(HttpError::Protocol(
                    "conflicting Content-Length headers".to_string(),
                ));
            }
            len = Some(n);
        }
    }
    Ok(match len {
        Some(0) => Kind::Done,
        Some(n) => Kind::Length { left: n, total: n },
        None => Kind::UntilClose,
    })
}

/// The body of a response; reads return data as soon as it arrives.
pub struct Body<R> {
    inner: BufReader<R>,
    kind: Kind,
}

enum Kind {
    Length { left: u64, total: u64 },
    Chunked(Chunk),
    UntilClose,
    Done,
}

enum Chunk {
    /// Next: a chunk-size line.
    Size,
    /// Inside a chunk, this many bytes left.
    Data(u64),
    /// Next: the CRLF that ends a chunk's data.
    End,
}

impl<R: Read> Body<R> {
    /// The response's underlying stream (for shutdown or timeouts).
    pub fn get_ref(&self) -> &R {
        self.inner.get_ref()
    }

    fn read_chunk_line(&mut self, what: &str) -> io::Result<String> {
        match read_line(&mut self.inner, MAX_CHUNK_LINE)? {
            (Some(l), true) => Ok(l),
            _ => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("connection closed before the end of the chunked body ({what})"),
            )),
        }
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

impl<R: Read> Read for Body<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            match &mut self.kind {
                Kind::Done => return Ok(0),
                Kind::UntilClose => return self.inner.read(buf),
                Kind::Length { left, total } => {
                    let want = (*left).min(buf.len() as u64) as usize;
                    let n = self.inner.read(&mut buf[..want])?;
                    if n == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!(
                                "connection closed after {} of {} body bytes",
                                *total - *left,
                                *total
                            ),
                        ));
                    }
                    *left -= n as u64;
                    if *left == 0 {
                        self.kind = Kind::Done;
                    }
                    return Ok(n);
                }
                Kind::Chunked(Chunk::Data(left)) => {
                    let want = (*left).min(buf.len() as u64) as usize;
                    let n = self.inner.read(&mut buf[..want])?;
                    if n == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "connection closed in the middle of a chunk",
                        ));
                    }
                    *left -= n as u64;
                    if *left == 0 {
                        self.kind = Kind::Chunked(Chunk::End);
                    }
                    return Ok(n);
                }
                Kind::Chunked(Chunk::End) => {
                    let l = self.read_chunk_line("chunk end")?;
                    if !l.is_empty() {
                        return Err(invalid(format!("chunk data followed by {l:?}, not CRLF")));
                    }
                    self.kind = Kind::Chunked(Chunk::Size);
                }
                Kind::Chunked(Chunk::Size) => {
                    let l = self.read_chunk_line("chunk size")?;
                    // Chunk extensions (";name=value") carry nothing for us.
                    let hex = l.split(';').next().unwrap_or("").trim();
                    if hex.is_empty()
                        || hex.len() > 16
                        || !hex.bytes().all(|b| b.is_ascii_hexdigit())
                    {
                        return Err(invalid(format!("bad chunk size line {l:?}")));
                    }
                    let size = u64::from_str_radix(hex, 16)
                        .map_err(|_| invalid(format!("bad chunk size line {l:?}")))?;
                    if size > 0 {
                        self.kind = Kind::Chunked(Chunk::Data(size));
                        continue;
                    }
                    // Last chunk: skip trailer fields up to the empty line.
                    let mut trailers = 0;
                    loop {
                        let t = self.read_chunk_line("trailer")?;
                        if t.is_empty() {
                            break;
                        }
                        trailers += 1;
                        if trailers > MAX_HEADERS {
                            return Err(invalid("too many trailer lines".to_string()));
                        }
                    }
                    self.kind = Kind::Done;
                }
            }
        }
    }
}

/// One line of at most `limit` bytes from `r`, without its "\n" or "\r\n".
/// Returns `(None, _)` at a clean end of stream, `(Some(line), false)` when the
/// stream ended in the middle of a line. Not UTF-8 or too long: InvalidData.
pub fn read_line<B: BufRead>(r: &mut B, limit: usize) -> io::Result<(Option<String>, bool)> {
    let mut line: Vec<u8> = Vec::new();
    loop {
        let avail = match r.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if avail.is_empty() {
            if line.is_empty() {
                return Ok((None, false));
            }
            return Ok((Some(into_text(line)?), false));
        }
        let (take, done) = match avail.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (avail.len(), false),
        };
        if line.len() + take > limit + 2 {
            return Err(invalid(format!("line longer than {limit} bytes")));
        }
        line.extend_from_slice(&avail[..take]);
        r.consume(take);
        if done {
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            if line.len() > limit {
                return Err(invalid(format!("line longer than {limit} bytes")));
            }
            return Ok((Some(into_text(line)?), true));
        }
    }
}

fn into_text(line: Vec<u8>) -> io::Result<String> {
    String::from_utf8(line).map_err(|_| invalid("line is not UTF-8".to_string()))
}

/// Percent-encode `s` for a path segment or a query value: everything but
/// RFC 3986 unreserved characters.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// A query string ("?a=1&b=x") of the pairs given, or "" for none.
pub fn query(pairs: &[(&str, String)]) -> String {
    if pairs.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
        .collect();
    format!("?{}", parts.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(raw: &[u8]) -> Result<(u16, Vec<u8>), HttpError> {
        let r = read_response(raw)?;
        let s = r.status;
        Ok((s, r.read_body(1 << 20)?))
    }

    #[test]
    fn content_length_and_chunked() {
        let (s, b) = resp(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloEXTRA").unwrap();
        assert_eq!((s, b.as_slice()), (200, &b"hello"[..]));
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                    3;x=y\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\nX-T: 1\r\n\r\n";
        let (_, b) = resp(raw).unwrap();
        assert_eq!(b, b"abc0123456789abcdef");
        // Interim response skipped; 204 has no body.
        let (s, b) = resp(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n").unwrap();
        assert_eq!((s, b.len()), (204, 0));
    }

    #[test]
    fn refuses_bad_framing() {
        for raw in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel"[..],
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nab",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/2 200\r\n\r\n",
            b"HTTP/1.1 20 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n folded\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-",
            b"",
        ] {
            assert!(resp(raw).is_err(), "{}", String::from_utf8_lossy(raw));
        }
    }

    #[test]
    fn request_format() {
        let mut out = Vec::new();
        write_request(&mut out, "POST", "/v1/x?a=%20", Some(b"{}")).unwrap();
        let s = String::from_utf8(out).unwrap();
        assert!(s.starts_with("POST /v1/x?a=%20 HTTP/1.1\r\nHost: localhost\r\n"));
        assert!(s.contains("Content-Type: application/json\r\nContent-Length: 2\r\n"));
        assert!(s.contains("Connection: close\r\n"));
        assert!(s.ends_with("\r\n\r\n{}"));
        let mut out = Vec::new();
        write_request(&mut out, "POST", "/v1/verify", None).unwrap();
        assert!(String::from_utf8(out)
            .unwrap()
            .contains("Content-Length: 0\r\n"));
        assert!(write_request(&mut Vec::new(), "GET", "/a b", None).is_err());
        assert!(write_request(&mut Vec::new(), "GET", "/a\r\nX: y", None).is_err());
    }

    #[test]
    fn encodes() {
        assert_eq!(encode("a b/c%é"), "a%20b%2Fc%25%C3%A9");
        assert_eq!(
            query(&[("op", "write".into()), ("path", "/etc".into())]),
            "?op=write&path=%2Fetc"
        );
        assert_eq!(query(&[]), "");
    }
}
