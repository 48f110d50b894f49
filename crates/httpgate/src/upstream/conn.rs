//! Upstream HTTP/1.1 connections owned by one client connection, for
//! requests with a body and upgrades (bodiless GET and HEAD take
//! connections from the serving thread's pool instead: `exchange.rs`).
//!
//! An HTTP/1 client connection sends one request at a time, so it keeps its
//! own keep-alive connection(s) to the upstream, polled by the client
//! connection's own task (see [`ConnUpstreams::drive`]): a proxied request
//! then costs no cross-task wake-up, no pool lock and no channel between
//! tasks. A connection the upstream closed is dropped and the next request
//! opens a new one; a request that never reached a connection closed under
//! it is retried once on a fresh one. A connection is closed with its client
//! connection (whose idle timeout bounds it), or when a request finds it
//! unused for longer than the pool's idle timeout. Upgrades (websockets) get
//! a dedicated connection driven by its own task, since it outlives the
//! exchange.
//!
//! It does not own routing, header rewriting or error pages (the proxy does).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Mutex, PoisonError};
use std::task::{Context, Waker};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::{tcp_connect, UpstreamError};
use crate::body::ReqBody;

/// Most upstream connections one client connection keeps (route edits can
/// point it at several upstreams over its life).
const MAX_PER_CONN: usize = 4;

type ConnFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

struct Entry {
    host: String,
    port: u16,
    sender: http1::SendRequest<ReqBody>,
    conn: ConnFuture,
    /// When a request was last sent on it.
    used: Instant,
}

#[derive(Default)]
struct Inner {
    entries: Vec<Entry>,
    /// The owning task's waker, to have a new connection polled.
    waker: Option<Waker>,
}

/// The upstream connections of one client connection.
pub(crate) struct ConnUpstreams {
    inner: Mutex<Inner>,
    /// Idle connections of bodiless exchanges (`exchange.rs`), which need
    /// no polling between exchanges: the serving thread's pool, shared with
    /// its other client connections.
    pub(crate) idle: std::sync::Arc<super::IdlePool>,
}

impl ConnUpstreams {
    pub(crate) fn new(idle: std::sync::Arc<super::IdlePool>) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            idle,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Poll `fut` (the client connection) together with this set's upstream
    /// connections, in the caller's task, until `fut` completes.
    pub(crate) async fn drive<F: Future + Unpin>(&self, mut fut: F) -> F::Output {
        std::future::poll_fn(|cx| {
            self.poll_conns(cx);
            Pin::new(&mut fut).poll(cx)
        })
        .await
    }

    fn poll_conns(&self, cx: &mut Context<'_>) {
        let mut g = self.lock();
        let Inner { entries, waker } = &mut *g;
        if waker.as_ref().is_none_or(|w| !w.will_wake(cx.waker())) {
            *waker = Some(cx.waker().clone());
        }
        entries.retain_mut(|e| e.conn.as_mut().poll(cx).is_pending());
    }

    /// Send `req` to `host:port` on an idle connection of this set, or on a
    /// new one; connections idle for longer than `idle_limit` are closed
    /// first. The request's URI must be in origin form.
    pub(crate) async fn send(
        &self,
        host: &str,
        port: u16,
        connect_timeout: Duration,
        idle_limit: Duration,
        mut req: Request<ReqBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        // A reused connection may have been closed by the upstream just
        // now; a request it did not take is retried once on a new one.
        let now = Instant::now();
        let reused = {
            let mut g = self.lock();
            g.entries
                .retain(|e| !(e.sender.is_ready() && now.duration_since(e.used) > idle_limit));
            match g
                .entries
                .iter_mut()
                .find(|e| e.port == port && e.host == host && e.sender.is_ready())
            {
                Some(e) => {
                    e.used = now;
                    Ok(e.sender.try_send_request(req))
                }
                None => Err(req),
            }
        };
        match reused {
            Err(r) => req = r,
            Ok(fut) => match fut.await {
                Ok(resp) => return Ok(resp),
                Err(mut e) => match e.take_message() {
                    Some(r) => req = r,
                    None => return Err(UpstreamError::Http(e.into_error())),
                },
            },
        }
        let (mut sender, conn) = connect(host, port, connect_timeout).await?;
        let fut = sender.send_request(req);
        let conn: ConnFuture = Box::pin(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        {
            let mut g = self.lock();
            if g.entries.len() >= MAX_PER_CONN {
                // Drop an idle one if any, else the oldest (it finishes its
                // exchange, then closes).
                let i = g
                    .entries
                    .iter()
                    .position(|e| e.sender.is_ready())
                    .unwrap_or(0);
                g.entries.remove(i);
            }
            g.entries.push(Entry {
                host: host.to_owned(),
                port,
                sender,
                conn,
                used: now,
            });
            if let Some(w) = &g.waker {
                w.wake_by_ref();
            }
        }
        fut.await.map_err(UpstreamError::Http)
    }
}

/// A dedicated upstream connection for an upgrade (websocket), driven by its
/// own task so that the tunnel outlives the client connection's exchange.
pub(crate) async fn send_upgrade(
    host: &str,
    port: u16,
    connect_timeout: Duration,
    req: Request<ReqBody>,
) -> Result<Response<Incoming>, UpstreamError> {
    let stream = tcp_connect(host, port, connect_timeout).await?;
    let (mut sender, conn) = http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(UpstreamError::Http)?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "upstream upgrade connection ended with an error");
        }
    });
    sender.send_request(req).await.map_err(UpstreamError::Http)
}

type Handshake = (
    http1::SendRequest<ReqBody>,
    http1::Connection<TokioIo<TcpStream>, ReqBody>,
);

async fn connect(host: &str, port: u16, timeout: Duration) -> Result<Handshake, UpstreamError> {
    let stream = tcp_connect(host, port, timeout).await?;
    http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(UpstreamError::Http)
}
