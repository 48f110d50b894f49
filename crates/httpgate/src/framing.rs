//! Request-smuggling guard for HTTP/1 connections.
//!
//! hyper resolves ambiguous framing safely (Transfer-Encoding wins over
//! Content-Length and the connection is closed), but sandboxd refuses such
//! requests outright. This IO wrapper follows the client's byte stream (heads,
//! Content-Length bodies, chunked bodies) and marks the index of the first
//! request whose head carries both Content-Length and Transfer-Encoding, or
//! several Content-Length fields. The handler counts requests in the same
//! order and answers that one with 400 and closes. Once the stream can no
//! longer be followed (an upgrade, garbage hyper will reject itself), the
//! scanner stops.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const MAX_HEAD: usize = 128 * 1024;

/// Shared between the scanner and the request handler.
pub(crate) struct FramingFlags {
    bad: AtomicU64,
}

impl FramingFlags {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            bad: AtomicU64::new(u64::MAX),
        })
    }

    pub(crate) fn is_bad(&self, idx: u64) -> bool {
        self.bad.load(Ordering::Acquire) == idx
    }
}

enum State {
    Head,
    Body(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkEnd(u8),
    Trailers,
    Done,
}

pub(crate) struct Scanner {
    state: State,
    buf: Vec<u8>,
    index: u64,
    flags: Arc<FramingFlags>,
}

impl Scanner {
    pub(crate) fn new(flags: Arc<FramingFlags>) -> Self {
        Self {
            state: State::Head,
            buf: Vec::new(),
            index: 0,
            flags,
        }
    }

    /// Feed bytes read from the client.
    pub(crate) fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match &mut self.state {
                State::Done => return,
                State::Head => {
                    if self.buf.is_empty() {
                        // Empty lines before a request line are allowed.
                        let skip = data
                            .iter()
                            .take_while(|b| **b == b'\r' || **b == b'\n')
                            .count();
                        data = &data[skip..];
                        if data.is_empty() {
                            return;
                        }
                    }
                    let old = self.buf.len();
                    self.buf.extend_from_slice(data);
                    let from = old.saturating_sub(3);
                    match find(&self.buf[from..], b"\r\n\r\n") {
                        Some(pos) => {
                            let end = from + pos + 4;
                            let consumed = end - old;
                            self.buf.truncate(end);
                            self.on_head();
                            self.buf.clear();
                            data = &data[consumed..];
                        }
                        None => {
                            if self.buf.len() > MAX_HEAD {
                                self.state = State::Done;
                            }
                            return;
                        }
                    }
                }
                State::Body(n) => {
                    let take = (*n).min(data.len() as u64);
                    *n -= take;
                    data = &data[take as usize..];
                    if *n == 0 {
                        self.state = State::Head;
                    }
                }
                State::ChunkSize | State::Trailers => {
                    let Some(nl) = data.iter().position(|b| *b == b'\n') else {
                        self.buf.extend_from_slice(data);
                        if self.buf.len() > 4096 {
                            self.state = State::Done;
                        }
                        return;
                    };
                    self.buf.extend_from_slice(&data[..=nl]);
                    data = &data[nl + 1..];
                    let line = std::mem::take(&mut self.buf);
                    let text = trim_eol(&line);
                    if matches!(self.state, State::Trailers) {
                        if text.is_empty() {
                            self.state = State::Head;
                        }
                        continue;
                    }
                    let size = text.split(|b| *b == b';').next().unwrap_or_default();
                    let size = std::str::from_utf8(size)
                        .ok()
                        .map(str::trim)
                        .filter(|s| !s.is_empty() && s.len() <= 16)
                        .and_then(|s| u64::from_str_radix(s, 16).ok());
                    self.state = match size {
                        Some(0) => State::Trailers,
                        Some(n) => State::ChunkData(n),
                        None => State::Done,
                    };
                }
                State::ChunkData(n) => {
                    let take = (*n).min(data.len() as u64);
                    *n -= take;
                    data = &data[take as usize..];
                    if *n == 0 {
                        self.state = State::ChunkEnd(2);
                    }
                }
                State::ChunkEnd(left) => {
                    // "\r\n" after the chunk data.
                    let want = if *left == 2 { b'\r' } else { b'\n' };
                    if data[0] != want {
                        self.state = State::Done;
                        return;
                    }
                    data = &data[1..];
                    *left -= 1;
                    if *left == 0 {
                        self.state = State::ChunkSize;
                    }
                }
            }
        }
    }

    fn on_head(&mut self) {
        let idx = self.index;
        self.index += 1;
        let mut headers = [httparse::EMPTY_HEADER; 128];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&self.buf) {
            Ok(httparse::Status::Complete(_)) => {}
            _ => {
                // hyper rejects what httparse cannot parse.
                self.state = State::Done;
                return;
            }
        }
        let mut cl: Vec<&[u8]> = Vec::new();
        let mut te = 0usize;
        let mut chunked = false;
        let mut upgrade = req.method == Some("CONNECT");
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                cl.push(h.value);
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                te += 1;
                chunked = h
                    .value
                    .rsplit(|b| *b == b',')
                    .next()
                    .is_some_and(|v| v.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            } else if h.name.eq_ignore_ascii_case("upgrade") {
                upgrade = true;
            }
        }
        let ambiguous =
            (te > 0 && !cl.is_empty()) || cl.len() > 1 || cl.iter().any(|v| v.contains(&b','));
        if ambiguous {
            self.flags.bad.store(idx, Ordering::Release);
            self.state = State::Done;
            return;
        }
        if upgrade {
            self.state = State::Done;
            return;
        }
        self.state = if te > 0 {
            if chunked {
                State::ChunkSize
            } else {
                State::Done
            }
        } else if let Some(v) = cl.first() {
            match std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
            {
                Some(0) => State::Head,
                Some(n) => State::Body(n),
                None => State::Done,
            }
        } else {
            State::Head
        };
    }
}

fn trim_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// An IO stream whose read side is followed by a [`Scanner`].
pub(crate) struct FramingIo<T> {
    inner: T,
    scanner: Scanner,
}

impl<T> FramingIo<T> {
    pub(crate) fn new(inner: T, flags: Arc<FramingFlags>) -> Self {
        Self {
            inner,
            scanner: Scanner::new(flags),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for FramingIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let res = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = res {
            if !matches!(this.scanner.state, State::Done) {
                this.scanner.feed(&buf.filled()[before..]);
            }
        }
        res
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for FramingIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(chunks: &[&[u8]]) -> (Arc<FramingFlags>, u64) {
        let flags = FramingFlags::new();
        let mut s = Scanner::new(flags.clone());
        for c in chunks {
            s.feed(c);
        }
        (flags, s.index)
    }

    #[test]
    fn follows_keepalive_requests_and_flags_the_ambiguous_one() {
        let stream: &[u8] = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n\
            POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello\
            POST /y HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n\
            POST /z HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        // Byte by byte and whole: same outcome.
        let (flags, _) = scan(&[stream]);
        assert!(flags.is_bad(3));
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        let (flags, _) = scan(&bytes);
        assert!(flags.is_bad(3));
        assert!(!flags.is_bad(2));
    }

    #[test]
    fn duplicate_content_length_is_flagged() {
        let (flags, _) = scan(&[
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
        ]);
        assert!(flags.is_bad(0));
    }

    #[test]
    fn clean_stream_is_not_flagged() {
        let (flags, n) =
            scan(&[b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n"]);
        assert_eq!(n, 2);
        assert!(!flags.is_bad(0) && !flags.is_bad(1));
    }
}
