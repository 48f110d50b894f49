//! Log output for the serving threads: a writer to standard error that, on
//! the gateway's own threads (see [`crate::HttpGateway::spawn_threads`]),
//! gathers lines (one access-log line per request) and writes them in one
//! go when the thread goes idle or has 32 KiB pending, instead of one
//! `write` per line. Elsewhere it writes each line at once.
//!
//! It owns no log format: the daemon's tracing subscriber formats lines and
//! hands them to [`LogWriter`].

use std::cell::RefCell;
use std::io::{self, Write};

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
        let buffered = PENDING.with(|p| {
            let Ok(mut p) = p.try_borrow_mut() else {
                return false;
            };
            let Some(v) = p.as_mut() else {
                return false;
            };
            v.extend_from_slice(buf);
            if v.len() >= FLUSH_AT {
                let _ = io::stderr().lock().write_all(v);
                v.clear();
            }
            true
        });
        if !buffered {
            io::stderr().lock().write_all(buf)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
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
