//! Bodiless HTTP/1.1 exchanges with an upstream (GET and HEAD without a
//! request body: nearly all proxied requests), run in the client
//! connection's own task without hyper's client machinery. The request head
//! is written straight to the socket, the response head parsed with
//! httparse, and the response body read from the socket when the client's
//! side polls for it: no connection task, no channel between the two, no
//! extra wake-ups. Requests with a body and upgrades go through hyper's
//! client (see `conn.rs`).
//!
//! A connection is reused only when its response was complete, framed by
//! Content-Length or chunked encoding, HTTP/1.1 and not marked `close`, and
//! nothing followed it. Idle connections sit in the serving thread's
//! [`IdlePool`], shared by its client connections (nginx's upstream
//! `keepalive` works the same way); one on which anything became readable while idle (the
//! upstream's close, stray bytes) is dropped before use. One closed just as
//! it is used gives no byte of response, and the (idempotent) request is
//! then sent once more on a new connection.
//!
//! It does not own routing, header rewriting or error pages (the proxy does).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::header::TRANSFER_ENCODING;
use http::header::{HeaderMap, HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH};
use http::{Method, Response, StatusCode, Version};
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{tcp_connect, UpstreamError};
use crate::body::BoxError;

/// Most response headers accepted from an upstream (as hyper).
const MAX_HEADERS: usize = 100;
/// Longest chunk-size or trailer line accepted.
const MAX_LINE: usize = 4096;
/// Most trailer bytes accepted (they are read and dropped).
const MAX_TRAILERS: usize = 32 * 1024;
/// Read buffer space made free before a read of a response head, or of a
/// body of unknown length.
const READ_SPACE: usize = 16 * 1024;
/// Most read buffer space made free for a body of known length (fewer
/// reads for large bodies).
const READ_MAX: usize = 64 * 1024;
/// Largest read buffer an idle connection keeps.
const IDLE_BUF: usize = 32 * 1024;
/// Largest response head accepted (hyper's client default).
const MAX_HEAD: usize = 8192 + 4096 * 100;

/// Why an exchange failed, beyond connecting.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ExchangeError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("the upstream closed the connection before responding")]
    Closed,
    #[error("malformed response from the upstream: {0}")]
    Malformed(&'static str),
}

/// One upstream connection used by this module.
pub(crate) struct Conn {
    stream: TcpStream,
    /// Bytes read and not consumed yet.
    buf: BytesMut,
    /// The request head being written (kept to reuse its allocation).
    head: Vec<u8>,
    host: Box<str>,
    port: u16,
    used: Instant,
}

/// The idle connections of one serving thread (or listener), shared by all
/// its client connections: a new client connection finds the upstream
/// connection its predecessor left, so a client that opens a connection
/// per request costs the upstream no TCP handshake. Keyed by upstream host,
/// at most `max_idle` per host and port, most recently used taken first;
/// connections idle for longer than the pool's idle limit are closed by
/// [`IdlePool::sweep`] or found stale by [`IdlePool::take`]. The mutex is
/// uncontended: only the owning thread's tasks use a serving thread's pool.
pub(crate) struct IdlePool {
    conns: Mutex<HashMap<Box<str>, Vec<Conn>>>,
    max_idle: usize,
    idle_limit: Duration,
}

impl IdlePool {
    pub(crate) fn new(max_idle: usize, idle_limit: Duration) -> Self {
        Self {
            conns: Mutex::new(HashMap::new()),
            max_idle,
            idle_limit,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Box<str>, Vec<Conn>>> {
        self.conns.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// An idle connection to `host:port` still usable: not idle for longer
    /// than the idle limit, not closed by the upstream, and without stray
    /// bytes. Others found on the way are dropped.
    fn take(&self, host: &str, port: u16) -> Option<Conn> {
        let now = Instant::now();
        let mut g = self.lock();
        let list = g.get_mut(host)?;
        // Oldest first: drop the expired prefix.
        let stale = list.partition_point(|c| now.duration_since(c.used) > self.idle_limit);
        list.drain(..stale);
        while let Some(i) = list.iter().rposition(|c| c.port == port) {
            let c = list.remove(i);
            // Anything readable on an idle connection (the upstream's close,
            // or stray bytes that would pass for the next response) makes it
            // unusable. No syscall unless the socket became readable since
            // its last read (`poll_fill` reads through tokio's `poll_read`,
            // whose short reads clear the readiness).
            let mut probe = [0u8; 1];
            if let Err(e) = c.stream.try_read(&mut probe) {
                if e.kind() == io::ErrorKind::WouldBlock {
                    return Some(c);
                }
            }
        }
        if list.is_empty() {
            g.remove(host);
        }
        None
    }

    fn put(&self, mut c: Conn) {
        if self.max_idle == 0 {
            return;
        }
        c.used = Instant::now();
        let mut g = self.lock();
        if !g.contains_key(&*c.host) {
            g.insert(c.host.clone(), Vec::new());
        }
        let Some(list) = g.get_mut(&*c.host) else {
            return;
        };
        // Counted only when the host's list could hold too many for one port.
        if list.len() >= self.max_idle
            && list.iter().filter(|o| o.port == c.port).count() >= self.max_idle
        {
            if let Some(i) = list.iter().position(|o| o.port == c.port) {
                list.remove(i);
            }
        }
        list.push(c);
    }

    /// Close the connections idle for longer than the idle limit.
    pub(crate) fn sweep(&self) {
        let now = Instant::now();
        self.lock().retain(|_, list| {
            let stale = list.partition_point(|c| now.duration_since(c.used) > self.idle_limit);
            list.drain(..stale);
            !list.is_empty()
        });
    }

    /// Number of idle connections held.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().values().map(Vec::len).sum()
    }

    /// Sweep every half idle limit until `shutdown` turns true (or its
    /// sender is gone).
    pub(crate) async fn sweep_until(
        self: Arc<Self>,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let every = (self.idle_limit / 2).max(Duration::from_millis(10));
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => self.sweep(),
                r = shutdown.changed() => {
                    if r.is_err() || *shutdown.borrow() {
                        return;
                    }
                }
            }
        }
    }
}

/// Whether a request can take this path: GET or HEAD, without a body.
pub(crate) fn eligible(method: &Method, body_empty: bool) -> bool {
    body_empty && (*method == Method::GET || *method == Method::HEAD)
}

/// Send the bodiless request `parts` (URI in origin form) to `host:port`
/// on an idle connection of `pool` or a new one; the response's body reads
/// from the connection as it is polled.
pub(crate) async fn exchange(
    pool: &Arc<IdlePool>,
    host: &str,
    port: u16,
    connect_timeout: Duration,
    parts: &http::request::Parts,
) -> Result<Response<UpBody>, UpstreamError> {
    let mut idle = pool.take(host, port);
    loop {
        let (mut conn, reused) = match idle.take() {
            Some(c) => (c, true),
            None => {
                let stream = tcp_connect(host, port, connect_timeout).await?;
                let conn = Conn {
                    stream,
                    buf: BytesMut::new(),
                    head: Vec::with_capacity(512),
                    host: host.into(),
                    port,
                    used: Instant::now(),
                };
                (conn, false)
            }
        };
        encode_head(&mut conn.head, parts);
        match round_trip(&mut conn, parts.method == Method::HEAD).await {
            Ok((resp, framing, keep)) => {
                return Ok(finish(resp, framing, keep, conn, pool));
            }
            // A reused connection closed by the upstream just now: the
            // request (GET or HEAD) is sent once more on a new one.
            Err(ExchangeError::Closed) if reused => continue,
            Err(e) => return Err(UpstreamError::Exchange(e)),
        }
    }
}

fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
    )
}

fn encode_head(out: &mut Vec<u8>, parts: &http::request::Parts) {
    out.clear();
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    out.extend_from_slice(pq.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in &parts.headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// How the response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    UntilClose,
}

/// Write the request head, read the response head. A connection closed or
/// reset before any byte of response is [`ExchangeError::Closed`].
async fn round_trip(
    conn: &mut Conn,
    head_request: bool,
) -> Result<(Response<()>, Framing, bool), ExchangeError> {
    let closed = |e: io::Error| match is_reset(&e) {
        true => ExchangeError::Closed,
        false => ExchangeError::Io(e),
    };
    conn.stream.write_all(&conn.head).await.map_err(closed)?;
    let mut got_any = false;
    loop {
        // Parse what is there; read more if the head is incomplete.
        if !conn.buf.is_empty() {
            got_any = true;
            if let Some(parsed) = parse_head(&mut conn.buf, head_request, MAX_HEAD)? {
                return Ok(parsed);
            }
            if conn.buf.len() > MAX_HEAD {
                return Err(ExchangeError::Malformed("response head too large"));
            }
        }
        let (stream, buf) = (&mut conn.stream, &mut conn.buf);
        let n = match std::future::poll_fn(|cx| poll_fill(stream, buf, READ_SPACE, cx)).await {
            Ok(n) => n,
            Err(e) if !got_any => return Err(closed(e)),
            Err(e) => return Err(ExchangeError::Io(e)),
        };
        if n == 0 {
            return Err(match got_any {
                false => ExchangeError::Closed,
                true => ExchangeError::Malformed("connection closed inside the response head"),
            });
        }
    }
}

/// Parse one response head at the start of `buf`, consuming it. Informational
/// (1xx) heads are consumed and skipped. `None`: incomplete.
fn parse_head(
    buf: &mut BytesMut,
    head_request: bool,
    max_head: usize,
) -> Result<Option<(Response<()>, Framing, bool)>, ExchangeError> {
    loop {
        let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut r = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default()
            .parse_response_with_uninit_headers(&mut r, buf, &mut slots);
        let len = match parsed {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(ExchangeError::Malformed("too many headers"))
            }
            Err(_) => return Err(ExchangeError::Malformed("invalid response head")),
        };
        if len > max_head {
            return Err(ExchangeError::Malformed("response head too large"));
        }
        let code = r.code.unwrap_or(0);
        let status =
            StatusCode::from_u16(code).map_err(|_| ExchangeError::Malformed("invalid status"))?;
        if status.is_informational() {
            if status == StatusCode::SWITCHING_PROTOCOLS {
                return Err(ExchangeError::Malformed(
                    "unexpected 101 Switching Protocols",
                ));
            }
            // 100 Continue, 102, 103 Early Hints: not relayed.
            let _ = buf.split_to(len);
            continue;
        }
        let http11 = r.version == Some(1);
        // Names and values are slices of the head, the values shared (no
        // copy): their offsets are noted, then the head is split off.
        let base = buf.as_ptr() as usize;
        let mut spans = [[0u32; 4]; MAX_HEADERS];
        let count = r.headers.len();
        for (span, h) in spans.iter_mut().zip(r.headers.iter()) {
            let name = h.name.as_ptr() as usize - base;
            let value = h.value.as_ptr() as usize - base;
            // Offsets within a head of at most `max_head` bytes.
            *span = [name, name + h.name.len(), value, value + h.value.len()]
                .map(|o| u32::try_from(o).unwrap_or(u32::MAX));
        }
        let head = buf.split_to(len).freeze();
        let mut headers = HeaderMap::with_capacity(count);
        for &[ns, ne, vs, ve] in spans.iter().take(count) {
            let (ns, ne, vs, ve) = (ns as usize, ne as usize, vs as usize, ve as usize);
            let name = head
                .get(ns..ne)
                .and_then(|n| HeaderName::from_bytes(n).ok())
                .ok_or(ExchangeError::Malformed("invalid header name"))?;
            if vs > ve || ve > head.len() {
                return Err(ExchangeError::Malformed("invalid header value"));
            }
            let value = HeaderValue::from_maybe_shared(head.slice(vs..ve))
                .map_err(|_| ExchangeError::Malformed("invalid header value"))?;
            headers.append(name, value);
        }
        let (framing, keep) = framing(&mut headers, status, head_request, http11)?;
        let mut resp = Response::new(());
        *resp.status_mut() = status;
        *resp.version_mut() = if http11 {
            Version::HTTP_11
        } else {
            Version::HTTP_10
        };
        *resp.headers_mut() = headers;
        return Ok(Some((resp, framing, keep)));
    }
}

/// The body's framing (RFC 9112 section 6.3) and whether the connection can
/// be reused after it. Content-Length is dropped when Transfer-Encoding
/// frames the body.
fn framing(
    headers: &mut HeaderMap,
    status: StatusCode,
    head_request: bool,
    http11: bool,
) -> Result<(Framing, bool), ExchangeError> {
    let close = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("close"));
    let keep = http11 && !close;
    if head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok((Framing::Empty, keep));
    }
    if headers.contains_key(TRANSFER_ENCODING) {
        if !http11 {
            // RFC 9112 section 6.1: faulty framing.
            return Err(ExchangeError::Malformed(
                "Transfer-Encoding in an HTTP/1.0 response",
            ));
        }
        // Content-Length beside it: handled, but the connection is not
        // trusted with another exchange (RFC 9112 section 6.3).
        let keep = keep && !headers.contains_key(CONTENT_LENGTH);
        let chunked = headers
            .get_all(TRANSFER_ENCODING)
            .iter()
            .next_back()
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit(',').next())
            .is_some_and(|t| t.trim().eq_ignore_ascii_case("chunked"));
        headers.remove(CONTENT_LENGTH);
        return Ok(match chunked {
            true => (Framing::Chunked, keep),
            false => (Framing::UntilClose, false),
        });
    }
    let mut len = None;
    for v in headers.get_all(CONTENT_LENGTH) {
        for part in v.as_bytes().split(|&b| b == b',') {
            let n = parse_decimal(trim_ows(part))
                .ok_or(ExchangeError::Malformed("invalid Content-Length"))?;
            if len.is_some_and(|l| l != n) {
                return Err(ExchangeError::Malformed("conflicting Content-Length"));
            }
            len = Some(n);
        }
    }
    Ok(match len {
        Some(0) => (Framing::Empty, keep),
        Some(n) => (Framing::Length(n), keep),
        None => (Framing::UntilClose, false),
    })
}

fn trim_ows(mut b: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = b {
        b = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = b {
        b = rest;
    }
    b
}

fn parse_decimal(b: &[u8]) -> Option<u64> {
    if b.is_empty() || b.len() > 19 {
        return None;
    }
    b.iter().try_fold(0u64, |acc, &d| {
        d.is_ascii_digit().then(|| acc * 10 + u64::from(d - b'0'))
    })
}

/// Read what the socket has into `buf`, with room for `want` bytes (at
/// least 4 KiB). `Ok(0)`: end of stream.
fn poll_fill(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    want: usize,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    let want = want.max(4096);
    if buf.capacity() - buf.len() < want {
        buf.reserve(want);
    }
    // Through `poll_read`: a short read clears the socket's readiness, so
    // that `IdlePool::take` can tell an idle connection had nothing since.
    let read = stream.read_buf(buf);
    std::pin::pin!(read).poll(cx)
}

fn finish(
    resp: Response<()>,
    framing: Framing,
    keep: bool,
    conn: Conn,
    pool: &Arc<IdlePool>,
) -> Response<UpBody> {
    let mut body = UpBody {
        conn: Some(conn),
        state: match framing {
            Framing::Empty => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::ChunkSize,
            Framing::UntilClose => State::UntilClose,
        },
        keep,
        pool: pool.clone(),
        trailer_bytes: 0,
    };
    if body.state == State::Done {
        body.release();
    }
    resp.map(|()| body)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Length(u64),
    UntilClose,
    ChunkSize,
    ChunkData(u64),
    ChunkEnd,
    Trailers,
    Done,
}

/// A response body read from its upstream connection as it is polled; the
/// connection goes back to its pool once the body is complete (or is closed
/// if the body is dropped before that).
pub(crate) struct UpBody {
    conn: Option<Conn>,
    state: State,
    keep: bool,
    pool: Arc<IdlePool>,
    trailer_bytes: usize,
}

impl UpBody {
    /// The body is complete: hand the connection back if it can be reused.
    fn release(&mut self) {
        self.state = State::Done;
        if let Some(mut c) = self.conn.take() {
            if self.keep && c.buf.is_empty() {
                if c.buf.capacity() > IDLE_BUF {
                    c.buf = BytesMut::new();
                }
                self.pool.put(c);
            }
        }
    }

    fn fail(&mut self, what: &'static str) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.conn = None;
        self.state = State::Done;
        Poll::Ready(Some(Err(ExchangeError::Malformed(what).into())))
    }

    /// One CRLF-terminated line (without its CRLF) from the front of the
    /// buffer, if whole. A bare LF or an over-long line is an error.
    fn line(buf: &mut BytesMut) -> Result<Option<BytesMut>, &'static str> {
        let Some(i) = buf.iter().position(|&b| b == b'\n') else {
            return match buf.len() > MAX_LINE {
                true => Err("chunk line too long"),
                false => Ok(None),
            };
        };
        if i > MAX_LINE {
            return Err("chunk line too long");
        }
        if i == 0 || buf[i - 1] != b'\r' {
            return Err("bare LF in chunked framing");
        }
        let mut line = buf.split_to(i + 1);
        line.truncate(i - 1);
        Ok(Some(line))
    }
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            let state = this.state;
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            let buf = &mut conn.buf;
            match state {
                State::Done => {
                    this.release();
                    return Poll::Ready(None);
                }
                State::Length(left) if !buf.is_empty() => {
                    let k = usize::try_from(left).map_or(buf.len(), |l| l.min(buf.len()));
                    let data = buf.split_to(k).freeze();
                    let left = left - k as u64;
                    this.state = State::Length(left);
                    if left == 0 {
                        this.release();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                State::UntilClose if !buf.is_empty() => {
                    let data = buf.split().freeze();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                State::ChunkData(left) if !buf.is_empty() => {
                    let k = usize::try_from(left).map_or(buf.len(), |l| l.min(buf.len()));
                    let data = buf.split_to(k).freeze();
                    let left = left - k as u64;
                    this.state = match left {
                        0 => State::ChunkEnd,
                        n => State::ChunkData(n),
                    };
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                State::ChunkSize | State::ChunkEnd | State::Trailers => {
                    let line = match Self::line(buf) {
                        Ok(line) => line,
                        Err(what) => return this.fail(what),
                    };
                    if let Some(line) = line {
                        match state {
                            State::ChunkSize => match parse_chunk_size(&line) {
                                Some(0) => this.state = State::Trailers,
                                Some(n) => this.state = State::ChunkData(n),
                                None => return this.fail("invalid chunk size"),
                            },
                            State::ChunkEnd if line.is_empty() => this.state = State::ChunkSize,
                            State::ChunkEnd => return this.fail("missing CRLF after chunk data"),
                            _ if line.is_empty() => this.state = State::Done,
                            _ => {
                                this.trailer_bytes += line.len();
                                if this.trailer_bytes > MAX_TRAILERS {
                                    return this.fail("trailers too large");
                                }
                            }
                        }
                        continue;
                    }
                }
                _ => {}
            }
            // Nothing usable buffered: read more.
            let want = match state {
                State::Length(left) => usize::try_from(left).map_or(READ_MAX, |l| l.min(READ_MAX)),
                _ => READ_SPACE,
            };
            match ready!(poll_fill(&mut conn.stream, &mut conn.buf, want, cx)) {
                Ok(0) if state == State::UntilClose => {
                    this.conn = None;
                    this.state = State::Done;
                    return Poll::Ready(None);
                }
                Ok(0) => return this.fail("connection closed inside the response body"),
                Ok(_) => {}
                Err(e) => {
                    this.conn = None;
                    this.state = State::Done;
                    return Poll::Ready(Some(Err(ExchangeError::Io(e).into())));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.state == State::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Done => SizeHint::with_exact(0),
            State::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

/// A chunk-size line: hex digits (leading zeros allowed), then optional
/// whitespace and extensions. `None`: malformed or over `u64`.
fn parse_chunk_size(line: &[u8]) -> Option<u64> {
    let end = line
        .iter()
        .position(|b| !b.is_ascii_hexdigit())
        .unwrap_or(line.len());
    let (digits, rest) = line.split_at(end);
    if digits.is_empty() {
        return None;
    }
    let rest = trim_ows(rest);
    if !(rest.is_empty() || rest.first() == Some(&b';')) {
        return None;
    }
    digits.iter().try_fold(0u64, |acc, &d| {
        let v = char::from(d).to_digit(16)?;
        acc.checked_mul(16)?.checked_add(u64::from(v))
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// `n` connected sockets to a loopback listener, as pool entries for `port`.
    async fn conns(n: usize, port: u16) -> (tokio::net::TcpListener, Vec<Conn>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let mut out = Vec::new();
        for _ in 0..n {
            let stream = TcpStream::connect(addr).await.unwrap();
            out.push(Conn {
                stream,
                buf: BytesMut::new(),
                head: Vec::new(),
                host: "10.0.0.1".into(),
                port,
                used: Instant::now(),
            });
        }
        (l, out)
    }

    #[tokio::test]
    async fn pool_keeps_the_newest_per_address_and_sweeps_stale_ones() {
        let pool = IdlePool::new(2, Duration::from_millis(100));
        let (_l, mut cs) = conns(4, 80).await;
        let (_l2, other) = conns(1, 8080).await;
        let newest = cs[3].stream.local_addr().unwrap();
        for c in cs.drain(..) {
            pool.put(c);
        }
        for c in other {
            pool.put(c);
        }
        // Two kept for port 80 (the oldest evicted), one for port 8080.
        assert_eq!(pool.len(), 3);
        assert!(pool.take("10.0.0.2", 80).is_none());
        let c = pool.take("10.0.0.1", 80).unwrap();
        assert_eq!(c.stream.local_addr().unwrap(), newest);
        assert_eq!(pool.len(), 2);
        pool.put(c);
        tokio::time::sleep(Duration::from_millis(150)).await;
        pool.sweep();
        assert_eq!(pool.len(), 0);
        assert!(pool.take("10.0.0.1", 80).is_none());
    }

    #[tokio::test]
    async fn pool_drops_connections_closed_while_idle() {
        let pool = IdlePool::new(4, Duration::from_secs(60));
        let (l, cs) = conns(1, 80).await;
        for c in cs {
            pool.put(c);
        }
        // The upstream closes its end: the idle connection becomes readable.
        let (server_side, _) = l.accept().await.unwrap();
        drop(server_side);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(pool.take("10.0.0.1", 80).is_none());
        assert_eq!(pool.len(), 0);
    }

    fn parse(
        raw: &[u8],
        head: bool,
    ) -> Result<Option<(Response<()>, Framing, bool)>, ExchangeError> {
        let mut b = BytesMut::from(raw);
        parse_head(&mut b, head, 32 * 1024)
    }

    #[test]
    fn framing_follows_rfc9112() {
        let (r, f, keep) = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", false)
            .unwrap()
            .unwrap();
        assert_eq!(
            (r.status(), f, keep),
            (StatusCode::OK, Framing::Length(5), true)
        );
        let (_, f, keep) = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true)
            .unwrap()
            .unwrap();
        assert_eq!((f, keep), (Framing::Empty, true), "HEAD: no body");
        let (r, f, keep) = parse(
            b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            (f, keep),
            (Framing::Chunked, false),
            "TE overrides CL; not reused"
        );
        assert!(r.headers().get(CONTENT_LENGTH).is_none(), "TE overrides CL");
        assert!(parse(
            b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            false
        )
        .is_err());
        let (_, f, keep) = parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", false)
            .unwrap()
            .unwrap();
        assert_eq!((f, keep), (Framing::UntilClose, false));
        let (_, f, keep) = parse(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n", false)
            .unwrap()
            .unwrap();
        assert_eq!(
            (f, keep),
            (Framing::Length(2), false),
            "HTTP/1.0: not reused"
        );
        let (_, _, keep) = parse(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert!(!keep);
        let (_, f, _) = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 3, 3\r\n\r\n", false)
            .unwrap()
            .unwrap();
        assert_eq!(f, Framing::Length(3));
        assert!(parse(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            false
        )
        .is_err());
        assert!(parse(b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", false).is_err());
        assert!(parse(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n", false)
            .unwrap()
            .is_none());
    }

    #[test]
    fn informational_heads_are_skipped() {
        let (r, f, _) = parse(
            b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!((r.status(), f), (StatusCode::NO_CONTENT, Framing::Empty));
        assert!(r.headers().get("link").is_none());
        assert!(parse(b"HTTP/1.1 101 Switching Protocols\r\n\r\n", false).is_err());
    }

    #[test]
    fn chunk_sizes() {
        assert_eq!(parse_chunk_size(b"1a"), Some(26));
        assert_eq!(parse_chunk_size(b"1A;name=value"), Some(26));
        assert_eq!(parse_chunk_size(b"0 ;x"), Some(0));
        assert_eq!(parse_chunk_size(b""), None);
        assert_eq!(parse_chunk_size(b"-1"), None);
        assert_eq!(parse_chunk_size(b"1 2"), None);
        assert_eq!(parse_chunk_size(b"0x10"), None);
        assert_eq!(parse_chunk_size(b"0000000000000010"), Some(16));
        assert_eq!(parse_chunk_size(b"ffffffffffffffff"), Some(u64::MAX));
        assert_eq!(parse_chunk_size(b"10000000000000000"), None);
    }

    #[test]
    fn request_head_is_written_in_origin_form() {
        let req = http::Request::get("/a?b=c")
            .header("host", "example.test")
            .header("x-forwarded-for", "192.0.2.1")
            .body(())
            .unwrap();
        let (parts, ()) = req.into_parts();
        let mut out = Vec::new();
        encode_head(&mut out, &parts);
        assert_eq!(
            out,
            b"GET /a?b=c HTTP/1.1\r\nhost: example.test\r\nx-forwarded-for: 192.0.2.1\r\n\r\n"
        );
    }
}
