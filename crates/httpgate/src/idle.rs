//! Idle client connections: counts the requests (HTTP/2 streams) open on one
//! connection, remembers when the last one ended, and resolves a future once
//! the connection has had none open for the configured idle timeout. The
//! listener then shuts the connection down gracefully (HTTP/2: GOAWAY, then
//! close; HTTP/1: close between requests). A request counts as open from its
//! head until its response body has been sent or dropped, so a long request,
//! a slow upstream or a long streamed response keeps the connection.
//!
//! Before its first request a connection gets its own, usually shorter,
//! limit (HTTP/2: the time to send a preface and open a stream).
//!
//! It does not own dead-peer detection: HTTP/2 keep-alive PINGs (hyper's
//! `keep_alive_interval`) close a connection whose peer stops answering.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body, Frame, SizeHint};
use tokio::time::Instant;

/// The open requests of one client connection.
pub(crate) struct Activity {
    start: Instant,
    open: AtomicUsize,
    /// Whether any request was ever opened.
    seen: AtomicBool,
    /// When a request last began or ended, milliseconds since `start`.
    last_ms: AtomicU64,
}

impl Activity {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            start: Instant::now(),
            open: AtomicUsize::new(0),
            seen: AtomicBool::new(false),
            last_ms: AtomicU64::new(0),
        })
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Release);
    }

    /// A request began; it stays open until the returned guard is dropped.
    pub(crate) fn begin(self: &Arc<Self>) -> OpenRequest {
        self.open.fetch_add(1, Ordering::AcqRel);
        if !self.seen.load(Ordering::Relaxed) {
            self.seen.store(true, Ordering::Relaxed);
        }
        self.touch();
        OpenRequest(self.clone())
    }

    /// Whether the connection ever carried a request (an HTTP/2 client that
    /// never sent its preface has not; hyper defers its graceful close until
    /// the handshake ends, so such a connection is dropped outright).
    pub(crate) fn seen_any(&self) -> bool {
        self.seen.load(Ordering::Relaxed)
    }

    /// Resolves once no request has been open for `limit`, or, before the
    /// first request, once `first` has passed since the start.
    pub(crate) async fn idle(&self, first: Duration, limit: Duration) {
        loop {
            if !self.seen_any() {
                let since = self.start.elapsed();
                if since >= first {
                    return;
                }
                tokio::time::sleep((first - since).max(Duration::from_millis(10))).await;
                continue;
            }
            let last = Duration::from_millis(self.last_ms.load(Ordering::Acquire));
            let since = self.start.elapsed().saturating_sub(last);
            let wait = if self.open.load(Ordering::Acquire) > 0 {
                limit
            } else if since >= limit {
                return;
            } else {
                limit - since
            };
            tokio::time::sleep(wait.max(Duration::from_millis(10))).await;
        }
    }
}

/// One open request; dropping it marks the request finished.
pub(crate) struct OpenRequest(Arc<Activity>);

impl OpenRequest {
    /// Keep the request open until `body` has been sent or dropped.
    pub(crate) fn wrap<B>(self, body: B) -> Tracked<B> {
        Tracked { body, _open: self }
    }
}

impl Drop for OpenRequest {
    fn drop(&mut self) {
        self.0.touch();
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that holds its request open while it is being sent.
pub(crate) struct Tracked<B> {
    body: B,
    _open: OpenRequest,
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn idle_only_without_open_requests() {
        let a = Activity::new();
        let limit = Duration::from_millis(200);
        let open = a.begin();
        // An open request: still not idle well after the limit.
        let r = tokio::time::timeout(limit * 4, a.idle(limit, limit)).await;
        assert!(r.is_err());
        drop(open);
        let t = Instant::now();
        a.idle(limit, limit).await;
        assert!(t.elapsed() >= limit);
        assert!(t.elapsed() < limit * 3);
    }
}
