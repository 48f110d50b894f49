//! Listeners: accept loops with a connection limit, the TLS handshake under a
//! timeout (each in its own task, so stalled handshakes block nobody), hyper's
//! HTTP/1 + HTTP/2 server with header-size and header-time limits, and a
//! graceful drain at shutdown.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;

use crate::framing::{FramingFlags, FramingIo};
use crate::gateway::Shared;
use crate::proxy::{self, ConnInfo};
use crate::tls;

type Builder = auto::Builder<TokioExecutor>;

fn builder(shared: &Shared) -> Builder {
    let cfg = &shared.config;
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.timeouts.header_read)
        .max_buf_size(cfg.limits.max_header_bytes.max(8192))
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(cfg.limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(cfg.limits.max_h2_streams)
        .keep_alive_interval(Some(cfg.timeouts.idle))
        .keep_alive_timeout(Duration::from_secs(20));
    b
}

/// Accept connections until shutdown, then wait (bounded) for open ones.
pub(crate) async fn serve(shared: Arc<Shared>, listener: TcpListener, tls: bool) -> io::Result<()> {
    let acceptor = tls.then(|| TlsAcceptor::from(tls::server_config(shared.clone())));
    let builder = Arc::new(builder(&shared));
    let max = shared.config.limits.max_connections.max(1);
    let limit = Arc::new(Semaphore::new(max));
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
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            tracing::debug!(peer = %peer, "connection limit reached");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(connection(
            shared.clone(),
            acceptor.clone(),
            builder.clone(),
            stream,
            peer,
            permit,
            shutdown.clone(),
        ));
    }
    drop(listener);
    let all = u32::try_from(max).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(
        shared.config.timeouts.shutdown_grace,
        limit.acquire_many(all),
    )
    .await;
    Ok(())
}

async fn connection(
    shared: Arc<Shared>,
    acceptor: Option<TlsAcceptor>,
    builder: Arc<Builder>,
    stream: TcpStream,
    peer: SocketAddr,
    _permit: OwnedSemaphorePermit,
    shutdown: watch::Receiver<bool>,
) {
    let Some(acceptor) = acceptor else {
        let flags = FramingFlags::new();
        let info = ConnInfo {
            peer,
            sni: None,
            tls: false,
            framing: Some(flags.clone()),
            seq: AtomicU64::new(0),
        };
        serve_conn(
            shared,
            builder,
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
        let info = ConnInfo {
            peer,
            sni,
            tls: true,
            framing: None,
            seq: AtomicU64::new(0),
        };
        serve_conn(shared, builder, tls, info, shutdown).await;
    } else {
        let flags = FramingFlags::new();
        let info = ConnInfo {
            peer,
            sni,
            tls: true,
            framing: Some(flags.clone()),
            seq: AtomicU64::new(0),
        };
        serve_conn(shared, builder, FramingIo::new(tls, flags), info, shutdown).await;
    }
}

async fn serve_conn<I>(
    shared: Arc<Shared>,
    builder: Arc<Builder>,
    io: I,
    info: ConnInfo,
    mut shutdown: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let info = Arc::new(info);
    let svc = service_fn(move |req| {
        let shared = shared.clone();
        let info = info.clone();
        async move { Ok::<_, Infallible>(proxy::handle(shared, info, req).await) }
    });
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    tokio::pin!(conn);
    if *shutdown.borrow() {
        conn.as_mut().graceful_shutdown();
    }
    tokio::select! {
        res = conn.as_mut() => {
            if let Err(e) = res {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        }
        _ = shutdown.changed() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}
