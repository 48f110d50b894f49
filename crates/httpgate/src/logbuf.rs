//! Log output for the serving threads: a writer to standard error that, on
//! the gateway's own threads (see [`crate::HttpGateway::spawn_threads`]),
//! gathers lines (one access-log line per request) and writes them in one
//! go when the thread goes idle or has 32 KiB pending, instead of one
//! `write` per line. Elsewhere it writes each line at once.
//!
//! The daemon's tracing subscriber formats its lines and hands them to
//! [`LogWriter`]. Access-log lines, one per request, skip the subscriber:
//! [`access_line`] writes them in the same layout straight into the
//! thread's pending bytes, with the date part of the timestamp formatted
//! once a second (the subscriber's generic field formatting cost about a
//! fifth of the CPU of a small proxied request).

use std::cell::RefCell;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use http::Method;

/// Pending bytes at which a serving thread writes without waiting to be idle.
const FLUSH_AT: usize = 32 * 1024;

thread_local! {
    /// `Some` on a serving thread: lines not yet written.
    static PENDING: RefCell<Option<Vec<u8>>> = const { RefCell::new(None) };
}

/// A writer to standard error, buffered on the gateway's serving threads
/// until they go idle. Give it to the log subscriber, e.g.
/// `tracing_subscriber::fmt().with_writer(httpgate::LogWriter::default)`.
/// Lines still pending when the process dies abruptly are lost.
#[derive(Debug, Default, Clone, Copy)]
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if append_pending(|v| v.extend_from_slice(buf)).is_err() {
            io::stderr().lock().write_all(buf)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// On a serving thread, has `f` append to the pending bytes and writes them
/// once they reach [`FLUSH_AT`]; elsewhere hands `f` back unused.
fn append_pending<F: FnOnce(&mut Vec<u8>)>(f: F) -> Result<(), F> {
    PENDING.with(|p| {
        let Ok(mut p) = p.try_borrow_mut() else {
            return Err(f);
        };
        let Some(v) = p.as_mut() else {
            return Err(f);
        };
        f(v);
        if v.len() >= FLUSH_AT {
            let _ = io::stderr().lock().write_all(v);
            v.clear();
        }
        Ok(())
    })
}

/// Start gathering this thread's lines.
pub(crate) fn start() {
    PENDING.with(|p| {
        if let Ok(mut p) = p.try_borrow_mut() {
            p.get_or_insert_with(|| Vec::with_capacity(FLUSH_AT));
        }
    });
}

/// Write this thread's pending lines (the thread is about to be idle).
pub(crate) fn flush() {
    PENDING.with(|p| {
        if let Ok(mut p) = p.try_borrow_mut() {
            if let Some(v) = p.as_mut().filter(|v| !v.is_empty()) {
                let _ = io::stderr().lock().write_all(v);
                v.clear();
            }
        }
    });
}

/// Write what is pending and stop gathering on this thread.
pub(crate) fn stop() {
    flush();
    PENDING.with(|p| {
        if let Ok(mut p) = p.try_borrow_mut() {
            *p = None;
        }
    });
}

thread_local! {
    /// The last whole second formatted on this thread and its text,
    /// `YYYY-MM-DDTHH:MM:SS`.
    static CLOCK: RefCell<(u64, Vec<u8>)> = const { RefCell::new((u64::MAX, Vec::new())) };
}

/// Appends the current UTC time as `YYYY-MM-DDTHH:MM:SS.ffffffZ`.
fn timestamp(out: &mut Vec<u8>) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs();
    CLOCK.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != secs {
            c.1.clear();
            let t = i64::try_from(secs)
                .ok()
                .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
                .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
            let _ = write!(
                c.1,
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute(),
                t.second()
            );
            c.0 = secs;
        }
        out.extend_from_slice(&c.1);
    });
    out.push(b'.');
    push_padded(out, u64::from(now.subsec_micros()), 6);
    out.push(b'Z');
}

/// Appends `n` in decimal, zero-padded to `width` digits.
fn push_padded(out: &mut Vec<u8>, mut n: u64, width: usize) {
    let mut digits = [b'0'; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let start = i.min(digits.len().saturating_sub(width));
    out.extend_from_slice(&digits[start..]);
}

/// Appends `n` in decimal (the access log's numbers, without `fmt`).
pub(crate) fn push_num(out: &mut Vec<u8>, n: u64) {
    push_padded(out, n, 1);
}

/// Appends a client address as `ip:port` (`[ip]:port` for IPv6).
pub(crate) fn push_addr(out: &mut Vec<u8>, addr: &std::net::SocketAddr) {
    match addr {
        std::net::SocketAddr::V4(a) => {
            for (i, o) in a.ip().octets().iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                push_num(out, u64::from(*o));
            }
            out.push(b':');
            push_num(out, u64::from(a.port()));
        }
        std::net::SocketAddr::V6(_) => {
            let _ = write!(out, "{addr}");
        }
    }
}

/// Appends `s`, with spaces, control bytes and non-ASCII bytes written as
/// `\xNN` so that a value can neither split a field nor forge a line.
pub(crate) fn push_clean(out: &mut Vec<u8>, s: &str) {
    for &b in s.as_bytes() {
        if b.is_ascii_graphic() && b != b'\\' {
            out.push(b);
        } else {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
}

/// Writes one access-log line: the timestamp and the prefix the daemon's
/// subscriber gives `INFO` events of target `httpgate::access`, then what
/// `fields` appends (` key=value` pairs), then a newline. On a serving thread
/// the line goes to the pending bytes, elsewhere straight to standard error.
pub(crate) fn access_line(fields: impl FnOnce(&mut Vec<u8>)) {
    let compose = |out: &mut Vec<u8>| {
        timestamp(out);
        out.extend_from_slice(b"  INFO httpgate::access: request");
        fields(out);
        out.push(b'\n');
    };
    if let Err(compose) = append_pending(compose) {
        let mut line = Vec::with_capacity(160);
        compose(&mut line);
        let _ = io::stderr().lock().write_all(&line);
    }
}

/// One access-log line, written when the response body is done (or dropped).
pub(crate) struct AccessLog {
    /// The request's host (its first `host_len` bytes, `None`: no valid
    /// host), then its path: one allocation, made when the request arrives,
    /// so that a request cancelled on the way is logged with both.
    pub(crate) host_path: String,
    pub(crate) host_len: Option<usize>,
    pub(crate) method: Method,
    pub(crate) status: u16,
    pub(crate) bytes: u64,
    pub(crate) start: Instant,
    pub(crate) upstream_ms: Option<u128>,
    pub(crate) peer: SocketAddr,
}

impl AccessLog {
    pub(crate) fn host(&self) -> Option<&str> {
        self.host_len.and_then(|n| self.host_path.get(..n))
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        access_line(|out| {
            out.extend_from_slice(b" peer=");
            push_addr(out, &self.peer);
            let (host, path) = self.host_path.split_at(self.host().map_or(0, str::len));
            out.extend_from_slice(b" host=");
            push_clean(out, host);
            out.extend_from_slice(b" method=");
            push_clean(out, self.method.as_str());
            out.extend_from_slice(b" path=");
            push_clean(out, path);
            out.extend_from_slice(b" status=");
            push_num(out, u64::from(self.status));
            out.extend_from_slice(b" bytes=");
            push_num(out, self.bytes);
            out.extend_from_slice(b" ms=");
            let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
            push_num(out, ms);
            if let Some(m) = self.upstream_ms {
                out.extend_from_slice(b" upstream_ms=");
                push_num(out, u64::try_from(m).unwrap_or(u64::MAX));
            }
        });
    }
}

/// Whether access lines are wanted (checked once per request).
pub(crate) fn access_log_enabled() -> bool {
    tracing::enabled!(target: "httpgate::access", tracing::Level::INFO)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn access_lines_have_the_subscriber_layout_and_clean_values() {
        let mut out = Vec::new();
        timestamp(&mut out);
        let ts = String::from_utf8(out.clone()).unwrap();
        // 2026-11-23T16:30:01.123456Z
        assert_eq!(ts.len(), 27, "{ts}");
        assert!(
            ts.ends_with('Z') && &ts[10..11] == "T" && &ts[19..20] == ".",
            "{ts}"
        );
        let year: i32 = ts[..4].parse().unwrap();
        assert!(year >= 2024, "{ts}");

        for (n, w, want) in [(0, 6, "000000"), (42, 6, "000042"), (123456, 6, "123456")] {
            out.clear();
            push_padded(&mut out, n, w);
            assert_eq!(out, want.as_bytes());
        }
        for n in [0u64, 7, 10, 65535, u64::MAX] {
            out.clear();
            push_num(&mut out, n);
            assert_eq!(out, n.to_string().as_bytes());
        }
        for a in ["10.0.0.255:443", "127.0.0.1:0", "[::1]:8080"] {
            out.clear();
            push_addr(&mut out, &a.parse().unwrap());
            assert_eq!(out, a.as_bytes());
        }
        out.clear();
        push_clean(&mut out, "/a b\nINFO\\x");
        assert_eq!(String::from_utf8(out).unwrap(), "/a\\x20b\\x0aINFO\\x5cx");
    }
}
