//! Listeners: accept loops with a connection limit overall and per source
//! (checked at accept, before the TLS handshake: `sources.rs`), the TLS
//! handshake under a timeout (each in its own task, so stalled handshakes
//! block nobody), hyper's HTTP/1 + HTTP/2 server with header-size and
//! header-time limits (HTTP/2: a first stream within the header time), and a
//! graceful drain at shutdown.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;

use crate::cert::tls;
use crate::framing::{FramingFlags, FramingIo};
use crate::gateway::Shared;
use crate::idle::Activity;
use crate::proxy::{self, ConnInfo};
use crate::sources::{SourceLimit, SourceSeat};
use crate::spread::{Handoff, Seat, Spread};
use crate::upstream::IdlePool;

/// The HTTP server builders of one listener: HTTP/1 and HTTP/2 when ALPN
/// decided, auto-detection for plain connections (h2c prior knowledge).
pub(crate) struct Builders {
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
    auto: auto::Builder<TokioExecutor>,
}

/// What the connections of one listener share.
pub(crate) struct Listener {
    /// `None` on plain-HTTP listeners.
    acceptor: Option<TlsAcceptor>,
    /// Idle upstream connections for bodiless exchanges (HTTPS only).
    pool: Option<Arc<IdlePool>>,
    builders: Builders,
}

fn builders(shared: &Shared) -> Builders {
    let cfg = &shared.config;
    let max_buf = cfg.limits.max_header_bytes.max(8192);
    let header_list = u32::try_from(cfg.limits.max_header_bytes).unwrap_or(u32::MAX);
    // HTTPS HTTP/1 connections: no hyper header-read timer (it costs a timer
    // registration and an allocation per request); the connection's idle
    // timer bounds the wait for a head instead (see `serve_conn`).
    let mut h1 = http1::Builder::new();
    h1.max_buf_size(max_buf).keep_alive(true);
    let mut h2 = http2::Builder::new(TokioExecutor::new());
    h2.timer(TokioTimer::new())
        .max_header_list_size(header_list)
        .max_concurrent_streams(cfg.limits.max_h2_streams)
        .keep_alive_interval(Some(cfg.timeouts.h2_ping_interval))
        .keep_alive_timeout(cfg.timeouts.h2_ping_timeout);
    let mut auto = auto::Builder::new(TokioExecutor::new());
    auto.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.timeouts.header_read)
        .max_buf_size(max_buf)
        .keep_alive(true);
    auto.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(header_list)
        .max_concurrent_streams(cfg.limits.max_h2_streams)
        .keep_alive_interval(Some(cfg.timeouts.h2_ping_interval))
        .keep_alive_timeout(cfg.timeouts.h2_ping_timeout);
    Builders { h1, h2, auto }
}

#[derive(Clone, Copy)]
enum Proto {
    H1,
    H2,
    Auto,
}

/// The listener context of HTTPS (`tls`) or plain-HTTP connections.
/// HTTPS client connections take idle upstream connections from `pool`
/// (`None` on plain-HTTP listeners, which proxy nothing).
pub(crate) fn listener_ctx(
    shared: &Arc<Shared>,
    tls: bool,
    pool: Option<Arc<IdlePool>>,
) -> io::Result<Arc<Listener>> {
    let acceptor = match tls {
        true => Some(TlsAcceptor::from(
            tls::server_config(&shared.certs).map_err(io::Error::other)?,
        )),
        false => None,
    };
    Ok(Arc::new(Listener {
        acceptor,
        pool,
        builders: builders(shared),
    }))
}

/// The connection limits of one listening address, whichever serving
/// threads accepted and serve its connections: `max_connections` open at
/// once, and `max_connections_per_source` of them from one source.
pub(crate) struct ConnLimit {
    global: Arc<Semaphore>,
    sources: Arc<SourceLimit>,
    /// Open HTTP/2 requests by source: [`H2_STREAMS_PER_CONNECTION`] per
    /// connection the source may hold.
    streams: Arc<SourceLimit>,
}

/// Open HTTP/2 requests one source may have, per connection of its cap:
/// a stream may hold an upstream connection like an HTTP/1 connection
/// does, so a source's streams are bounded like its connections (with
/// room for browsers that load a page's parts at once).
const H2_STREAMS_PER_CONNECTION: usize = 4;

/// What an accepted connection holds until it ends: its places under the
/// limits of its listening address.
pub(crate) struct Admission {
    _permit: OwnedSemaphorePermit,
    _source: Option<SourceSeat>,
    streams: Option<Arc<SourceLimit>>,
}

impl Admission {
    #[cfg(test)]
    pub(crate) fn for_test(permit: OwnedSemaphorePermit) -> Self {
        Self {
            _permit: permit,
            _source: None,
            streams: None,
        }
    }
}

impl ConnLimit {
    /// Admit a connection from `peer`, or `None` if a limit is reached.
    /// Per source first, so that one source above its cap takes no
    /// place of the global limit even for a moment.
    fn admit(&self, peer: SocketAddr) -> Option<Admission> {
        let source = match self.sources.admit(peer.ip()) {
            Ok(s) => s,
            Err(()) => {
                tracing::debug!(peer = %peer, "per-source connection limit reached");
                return None;
            }
        };
        let Ok(permit) = self.global.clone().try_acquire_owned() else {
            tracing::debug!(peer = %peer, "connection limit reached");
            return None;
        };
        Some(Admission {
            _permit: permit,
            _source: source,
            streams: Some(self.streams.clone()),
        })
    }
}

/// The limits of a new listening address.
pub(crate) fn limit(shared: &Shared) -> Arc<ConnLimit> {
    let l = &shared.config.limits;
    // One source never holds more than half of the global limit.
    let per_source = match l.max_connections_per_source {
        0 => 0,
        n => n.min((l.max_connections / 2).max(1)),
    };
    Arc::new(ConnLimit {
        global: Arc::new(Semaphore::new(l.max_connections.max(1))),
        sources: SourceLimit::new(per_source, shared.config.trusted_proxies.clone()),
        streams: SourceLimit::new(
            per_source.saturating_mul(H2_STREAMS_PER_CONNECTION),
            shared.config.trusted_proxies.clone(),
        ),
    })
}

/// Where the connections a serving thread accepts are served: on thread
/// `me`, unless `spread` finds a thread with clearly fewer open.
#[derive(Clone)]
pub(crate) struct Placement {
    pub spread: Arc<Spread>,
    pub me: usize,
}

/// Accept connections until shutdown, then wait (bounded) for the open ones
/// of this listening address, on every thread.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    listener: TcpListener,
    ctx: Arc<Listener>,
    limit: Arc<ConnLimit>,
    place: Option<Placement>,
) -> io::Result<()> {
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        if *shutdown.borrow() {
            break;
        }
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        // Refused before anything is read: closed at once.
        let Some(permit) = limit.admit(peer) else {
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (stream, permit, seat) = match &place {
            None => (stream, permit, None),
            Some(p) => match p.spread.place(p.me) {
                seat if seat.slot() == p.me => (stream, permit, Some(seat)),
                seat => match hand_off(p, stream, peer, permit, seat) {
                    Some((stream, permit, seat)) => (stream, permit, Some(seat)),
                    None => continue,
                },
            },
        };
        spawn_connection(&shared, &ctx, stream, peer, (permit, seat), &shutdown);
    }
    drop(listener);
    let all = u32::try_from(shared.config.limits.max_connections.max(1)).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(
        shared.config.timeouts.shutdown_grace,
        limit.global.acquire_many(all),
    )
    .await;
    Ok(())
}

/// Send a connection, not yet read from, to the serving thread its seat is
/// on (it leaves this thread's reactor: one `epoll_ctl`). What that thread
/// does not take (it is stopping) comes back, counted on this thread, to be
/// served here.
fn hand_off(
    place: &Placement,
    stream: TcpStream,
    peer: SocketAddr,
    permit: Admission,
    seat: Seat,
) -> Option<(TcpStream, Admission, Seat)> {
    let lost =
        |e: io::Error| tracing::debug!(peer = %peer, error = %e, "connection lost in a handoff");
    let stream = match stream.into_std() {
        Ok(s) => s,
        Err(e) => {
            lost(e);
            return None;
        }
    };
    let h = Handoff {
        stream,
        peer,
        permit,
        seat,
    };
    match place.spread.hand_off(h, place.me) {
        Ok(()) => None,
        Err(h) => match TcpStream::from_std(h.stream) {
            Ok(s) => Some((s, h.permit, h.seat)),
            Err(e) => {
                lost(e);
                None
            }
        },
    }
}

/// Serve `stream` in a task of this thread.
fn spawn_connection(
    shared: &Arc<Shared>,
    ctx: &Arc<Listener>,
    stream: TcpStream,
    peer: SocketAddr,
    held: (Admission, Option<Seat>),
    shutdown: &watch::Receiver<bool>,
) {
    tokio::spawn(connection(
        shared.clone(),
        ctx.clone(),
        stream,
        peer,
        held,
        shutdown.clone(),
    ));
}

/// Serve the connections other serving threads hand to this one (see
/// [`crate::spread`]), until shutdown.
pub(crate) async fn receive(
    shared: Arc<Shared>,
    ctx: Arc<Listener>,
    mut handoffs: mpsc::UnboundedReceiver<Handoff>,
) -> io::Result<()> {
    let mut shutdown = shared.shutdown.subscribe();
    while !*shutdown.borrow() {
        let h = tokio::select! {
            biased;
            _ = shutdown.changed() => break,
            h = handoffs.recv() => match h {
                Some(h) => h,
                None => break,
            },
        };
        // Registered with this thread's reactor from here on.
        match TcpStream::from_std(h.stream) {
            Ok(stream) => {
                let held = (h.permit, Some(h.seat));
                spawn_connection(&shared, &ctx, stream, h.peer, held, &shutdown);
            }
            Err(e) => {
                tracing::warn!(peer = %h.peer, error = %e, "cannot take a handed-off connection")
            }
        }
    }
    // Connections still in the channel are closed unserved with it, as
    // those still in the listening queue are.
    Ok(())
}

async fn connection(
    shared: Arc<Shared>,
    ctx: Arc<Listener>,
    stream: TcpStream,
    peer: SocketAddr,
    // Held until the connection ends: the connection limit and the count of
    // the thread serving it.
    held: (Admission, Option<Seat>),
    shutdown: watch::Receiver<bool>,
) {
    let Some(acceptor) = &ctx.acceptor else {
        let flags = FramingFlags::new();
        let info = ConnInfo::new(peer, None, false, Some(flags.clone()), None);
        serve_conn(
            shared,
            ctx,
            Proto::Auto,
            FramingIo::new(stream, flags),
            info,
            shutdown,
        )
        .await;
        return;
    };
    let handshake = shared.config.timeouts.handshake;
    let tls = match tokio::time::timeout(handshake, acceptor.accept(stream)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(peer = %peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(peer = %peer, "TLS handshake timed out");
            return;
        }
    };
    let (_, session) = tls.get_ref();
    let alpn = session.alpn_protocol().map(<[u8]>::to_vec);
    if alpn.as_deref() == Some(tls::ACME_TLS_ALPN) {
        // The TLS-ALPN-01 validation is the handshake itself.
        return;
    }
    let sni = session
        .server_name()
        .map(|s| s.trim_end_matches('.').to_ascii_lowercase());
    if alpn.as_deref() == Some(b"h2") {
        let mut info = ConnInfo::new(peer, sni, true, None, None);
        if let Some(l) = &held.0.streams {
            info = info.with_streams(l.clone());
        }
        serve_conn(shared, ctx, Proto::H2, tls, info, shutdown).await;
    } else {
        let flags = FramingFlags::new();
        let info = ConnInfo::new(peer, sni, true, Some(flags.clone()), ctx.pool.clone());
        serve_conn(
            shared,
            ctx,
            Proto::H1,
            FramingIo::new(tls, flags),
            info,
            shutdown,
        )
        .await;
    }
}

/// Drive a hyper connection (and the upstream connections it owns, in the
/// same task) until it ends; on shutdown, or when no request has been open
/// for the idle timeout, finish gracefully (HTTP/2: GOAWAY).
macro_rules! drive {
    ($conn:expr, $shutdown:expr, $info:expr, $idle:expr) => {{
        let conn = $conn;
        tokio::pin!(conn);
        if *$shutdown.borrow() {
            conn.as_mut().graceful_shutdown();
        }
        let (activity, idle, grace) = $idle;
        let res = tokio::select! {
            res = proxy::drive(&$info, conn.as_mut()) => res,
            _ = $shutdown.changed() => {
                conn.as_mut().graceful_shutdown();
                proxy::drive(&$info, conn.as_mut()).await
            }
            _ = activity.idle(idle.0, idle.1) => {
                tracing::debug!("idle connection closed");
                conn.as_mut().graceful_shutdown();
                // A live client acknowledges the GOAWAY within a PING's time.
                let bound = if activity.seen_any() { grace } else { Duration::ZERO };
                tokio::time::timeout(bound, proxy::drive(&$info, conn.as_mut()))
                    .await
                    .unwrap_or(Ok(()))
            }
        };
        if let Err(e) = res {
            tracing::debug!(error = %e, "connection ended with an error");
        }
    }};
}

async fn serve_conn<I>(
    shared: Arc<Shared>,
    ctx: Arc<Listener>,
    proto: Proto,
    io: I,
    info: ConnInfo,
    mut shutdown: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let info = Arc::new(info);
    let activity = Activity::new();
    // HTTP/1 over TLS: a head must be complete within `header_read` of the
    // connection's start or of the previous exchange's end (hyper's own
    // header-read timer, as the other listeners use it, behaves alike).
    // HTTP/2 over TLS: the first stream must open within `header_read`
    // of the connection's start (a connection that sends no preface, or
    // only a preface, holds a place for nothing); then the idle timeout.
    let t = &shared.config.timeouts;
    let idle_limit = match proto {
        Proto::H1 => t.idle.min(t.header_read),
        Proto::H2 => t.idle,
        Proto::Auto => t.idle,
    };
    let first_limit = match proto {
        Proto::H2 => t.idle.min(t.header_read),
        Proto::H1 | Proto::Auto => idle_limit,
    };
    let idle = (
        activity.clone(),
        (first_limit, idle_limit),
        shared
            .config
            .timeouts
            .shutdown_grace
            .min(shared.config.timeouts.h2_ping_timeout),
    );
    let conn_info = info.clone();
    let svc = service_fn(move |req| {
        let shared = shared.clone();
        let info = info.clone();
        let open = activity.begin();
        async move { Ok::<_, Infallible>(proxy::handle(shared, info, req).await.map(|b| open.wrap(b))) }
    });
    let io = TokioIo::new(io);
    match proto {
        Proto::H1 => drive!(
            ctx.builders.h1.serve_connection(io, svc).with_upgrades(),
            shutdown,
            conn_info,
            idle
        ),
        Proto::H2 => drive!(
            ctx.builders.h2.serve_connection(io, svc),
            shutdown,
            conn_info,
            idle
        ),
        Proto::Auto => drive!(
            ctx.builders.auto.serve_connection_with_upgrades(io, svc),
            shutdown,
            conn_info,
            idle
        ),
    }
}

/// A listening socket (`SO_REUSEADDR`, IPv6 sockets IPv6-only), non-blocking.
pub(crate) fn listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    sock.set_reuse_address(true)?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    Ok(sock.into())
}
