//! The reverse proxy: per request, find the route by host, check SNI/Host and
//! basic auth, forward to the sandbox over a pooled keep-alive HTTP/1.1
//! connection with streaming bodies both ways, tunnel upgrades (websockets),
//! and answer errors according to who caused them (client 4xx, upstream
//! 502/504). Also the plain-HTTP listener's handler (ACME HTTP-01 + redirect)
//! and the access log.
//!
//! Every path to an upstream (bodiless exchange, hyper client, HTTP/2 pool,
//! upgrade: `upstream/`) gets its request headers from one place,
//! `headers::set_forwarded`; and `handle` adds HSTS to the responses of
//! hosts whose certificate mode asks for it. Bodies are `body.rs`'s.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use http::header::{
    HeaderMap, HeaderValue, AUTHORIZATION, CONNECTION, CONTENT_LENGTH, STRICT_TRANSPORT_SECURITY,
    TRANSFER_ENCODING, UPGRADE,
};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::{Body, Incoming};
use hyper_util::rt::TokioIo;

use crate::body::ReqBody;
use crate::framing::FramingFlags;
use crate::gateway::Shared;
use crate::headers::{is_upgrade, origin_form, request_host, set_forwarded, strip_hop_by_hop};
use crate::logbuf::{access_log_enabled, AccessLog};
use crate::sources::SourceLimit;
use crate::upstream::{self, ConnUpstreams, ExchangeError, IdlePool, UpstreamError};
use crate::{access, pages, HttpConfig, Route, Target, TlsMode};
use crate::{RespBody, RespInner};

/// Facts about one client connection, shared by its requests.
pub(crate) struct ConnInfo {
    pub peer: SocketAddr,
    pub sni: Option<String>,
    pub tls: bool,
    pub framing: Option<Arc<FramingFlags>>,
    pub seq: AtomicU64,
    /// The peer's address as a header value (X-Forwarded-For), made once.
    pub(crate) peer_ip: HeaderValue,
    /// HTTP/1 clients: upstream connections owned by this connection's task
    /// (driven by [`drive`]). HTTP/2 clients use the shared pool.
    upstreams: Option<ConnUpstreams>,
    /// HTTP/2 clients: the open requests of the listening address by
    /// source (each stream may hold an upstream connection, so the
    /// per-source connection cap alone would let one source hold
    /// `max_h2_streams` times as many).
    streams: Option<Arc<SourceLimit>>,
}

impl ConnInfo {
    /// `own_upstreams`: forward over connections owned by this client
    /// connection (bodiless exchanges over those of the given pool), which
    /// the caller must then serve through [`drive`].
    pub(crate) fn new(
        peer: SocketAddr,
        sni: Option<String>,
        tls: bool,
        framing: Option<Arc<FramingFlags>>,
        own_upstreams: Option<Arc<IdlePool>>,
    ) -> Self {
        let peer_ip = HeaderValue::from_str(&peer.ip().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        Self {
            peer,
            sni,
            tls,
            framing,
            seq: AtomicU64::new(0),
            peer_ip,
            upstreams: own_upstreams.map(ConnUpstreams::new),
            streams: None,
        }
    }

    /// Counts this connection's open requests under `limit`, by source.
    pub(crate) fn with_streams(mut self, limit: Arc<SourceLimit>) -> Self {
        self.streams = Some(limit);
        self
    }
}

/// Poll a client connection's future `fut` together with the upstream
/// connections it owns, in the current task.
pub(crate) async fn drive<F: std::future::Future + Unpin>(conn: &ConnInfo, fut: F) -> F::Output {
    match &conn.upstreams {
        Some(u) => u.drive(fut).await,
        None => fut.await,
    }
}

/// Entry point for every request of every listener.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    conn: Arc<ConnInfo>,
    req: Request<Incoming>,
) -> Response<RespBody> {
    let start = Instant::now();
    // One string for the host (routing) and, after it, the path (logging),
    // owned by the log record when there is one: a request cancelled on the
    // way (the client went away) is logged with both.
    let logging = access_log_enabled();
    let path = req.uri().path();
    let host = request_host(&req, if logging { path.len() } else { 0 });
    let (log, host) = if logging {
        let host_len = host.as_ref().map(String::len);
        let mut host_path = host.unwrap_or_default();
        host_path.push_str(path);
        let log = Box::new(AccessLog {
            host_path,
            host_len,
            method: req.method().clone(),
            status: 0,
            bytes: 0,
            start,
            upstream_ms: None,
            peer: conn.peer,
        });
        (Some(log), None)
    } else {
        (None, host)
    };
    let host_ref = match &log {
        Some(l) => l.host(),
        None => host.as_deref(),
    };
    let mut upstream_ms = None;
    let mut hsts = false;
    let head = req.method() == Method::HEAD;
    let seat = match conn.streams.as_ref().map(|l| l.admit(conn.peer.ip())) {
        Some(Err(())) => Err(()),
        Some(Ok(seat)) => Ok(seat),
        None => Ok(None),
    };
    let mut resp = match seat {
        Ok(seat) => {
            let mut r =
                route_request(&shared, &conn, req, host_ref, &mut upstream_ms, &mut hsts).await;
            r.body_mut().seat = seat;
            r
        }
        Err(()) => pages::error(
            StatusCode::TOO_MANY_REQUESTS,
            "Too many open requests from your address.",
        ),
    };
    if head {
        head_only(&mut resp);
    }
    if hsts {
        add_hsts(&shared, resp.headers_mut());
    }
    if let Some(mut log) = log {
        log.status = resp.status().as_u16();
        log.upstream_ms = upstream_ms;
        resp.body_mut().log = Some(log);
    }
    resp
}

async fn route_request(
    shared: &Arc<Shared>,
    conn: &Arc<ConnInfo>,
    req: Request<Incoming>,
    host: Option<&str>,
    upstream_ms: &mut Option<u128>,
    hsts: &mut bool,
) -> Response<RespBody> {
    if let Some(f) = &conn.framing {
        let idx = conn.seq.fetch_add(1, Ordering::Relaxed);
        if f.is_bad(idx) {
            return pages::bad_request("Ambiguous message framing.");
        }
    }
    // Belt and braces for framing the scanner could not see (HTTP/2).
    if req.headers().get_all(CONTENT_LENGTH).iter().count() > 1
        || (req.headers().contains_key(CONTENT_LENGTH)
            && req.headers().contains_key(TRANSFER_ENCODING))
    {
        return pages::bad_request("Ambiguous message framing.");
    }
    let Some(host) = host else {
        return pages::bad_request("Missing or malformed Host.");
    };
    if !conn.tls {
        return plain_http(shared, &req, host);
    }
    let Some(route) = shared.routes.lookup(host) else {
        return pages::error(
            StatusCode::NOT_FOUND,
            &format!("No site is configured for {host}."),
        );
    };
    *hsts = hsts_for(&shared.config, &route);
    if let Some(sni) = &conn.sni {
        if sni != host && !same_sandbox(shared, sni, &route) {
            return pages::error(
                StatusCode::MISDIRECTED_REQUEST,
                "This connection was made for another host name.",
            );
        }
    }
    let pass = match access::admit(shared, conn.peer.ip(), &req, &route).await {
        Ok(pass) => pass,
        Err(page) => return *page,
    };
    match &route.target {
        Target::Stopped => pages::error(
            StatusCode::BAD_GATEWAY,
            &format!("Sandbox {} is stopped.", route.sandbox),
        ),
        Target::Unavailable { reason } => pages::error(
            StatusCode::BAD_GATEWAY,
            &format!("Sandbox {} is unavailable: {reason}.", route.sandbox),
        ),
        Target::Addr {
            host: up_host,
            port,
        } => {
            let up = (up_host.as_str(), *port);
            forward(shared, conn, req, host, &route, pass, up, upstream_ms).await
        }
    }
}

/// A HEAD response carries no content: the gate's own pages lose theirs
/// (their length stays in `Content-Length`). hyper drops it over HTTP/1
/// but sends it over HTTP/2, where the client then resets the stream.
fn head_only(resp: &mut Response<RespBody>) {
    if let RespInner::Full(b) = &mut resp.body_mut().inner {
        if let Some(b) = b.take() {
            resp.headers_mut()
                .entry(CONTENT_LENGTH)
                .or_insert_with(|| HeaderValue::from(b.len()));
        }
    }
}

/// Whether responses for `route` carry `Strict-Transport-Security`: by
/// its certificate mode (`HttpConfig::hsts`).
fn hsts_for(cfg: &HttpConfig, route: &Route) -> bool {
    let h = &cfg.hsts;
    h.max_age_secs > 0
        && match route.tls {
            TlsMode::Acme => h.acme,
            TlsMode::Manual { .. } => h.manual,
            TlsMode::Internal => h.internal,
        }
}

/// HSTS on a response, unless the upstream set its own (its choice of
/// `includeSubDomains` or `preload` is kept).
fn add_hsts(shared: &Shared, h: &mut HeaderMap) {
    if let Some(v) = &shared.header_values.hsts {
        if !h.contains_key(STRICT_TRANSPORT_SECURITY) {
            h.insert(STRICT_TRANSPORT_SECURITY, v.clone());
        }
    }
}

fn same_sandbox(shared: &Shared, sni: &str, route: &Route) -> bool {
    shared
        .routes
        .lookup(sni)
        .is_some_and(|r| r.sandbox == route.sandbox)
}

/// The plain-HTTP listener: ACME HTTP-01 answers, else 301 to HTTPS.
fn plain_http(shared: &Shared, req: &Request<Incoming>, host: &str) -> Response<RespBody> {
    if let Some(token) = req
        .uri()
        .path()
        .strip_prefix("/.well-known/acme-challenge/")
    {
        return match shared.certs.http01(token) {
            Some(ka) => pages::text(ka),
            None => pages::error(StatusCode::NOT_FOUND, "Unknown challenge token."),
        };
    }
    if shared.routes.lookup(host).is_none() {
        return pages::error(
            StatusCode::NOT_FOUND,
            &format!("No site is configured for {host}."),
        );
    }
    let pq = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let port = shared.config.https_port;
    let location = if port == 443 {
        format!("https://{host}{pq}")
    } else {
        format!("https://{host}:{port}{pq}")
    };
    pages::redirect(&location)
}

#[allow(clippy::too_many_arguments)]
async fn forward(
    shared: &Arc<Shared>,
    conn: &Arc<ConnInfo>,
    mut req: Request<Incoming>,
    host: &str,
    route: &Arc<Route>,
    pass: access::Pass,
    (up_host, port): (&str, u16),
    upstream_ms: &mut Option<u128>,
) -> Response<RespBody> {
    let upgrade = is_upgrade(&req);
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    let upgrade_value = if upgrade {
        parts.headers.get(UPGRADE).cloned()
    } else {
        None
    };
    strip_hop_by_hop(&mut parts.headers);
    if let Some(v) = upgrade_value {
        parts
            .headers
            .insert(CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(UPGRADE, v);
    }
    if pass.strip_authorization {
        parts.headers.remove(AUTHORIZATION);
    }
    let client = (conn.peer, &conn.peer_ip, conn.tls);
    set_forwarded(shared, client, &mut parts.headers, host);
    parts.version = Version::HTTP_11;
    let timeouts = &shared.config.timeouts;
    if let Some(own) = conn.upstreams.as_ref() {
        if !upgrade && upstream::eligible(&parts.method, body.is_end_stream()) {
            origin_form(&mut parts.uri);
            let t0 = Instant::now();
            let send =
                upstream::exchange(&own.idle, up_host, port, timeouts.upstream_connect, &parts);
            let result = tokio::time::timeout(timeouts.upstream_response, send).await;
            *upstream_ms = Some(t0.elapsed().as_millis());
            return match upstream_result(shared, route, port, result, false) {
                Ok(r) => relay(r.map(RespInner::Fast)),
                Err(page) => *page,
            };
        }
    }
    let client_fault = Arc::new(AtomicBool::new(false));
    let body = ReqBody::new(body, client_fault.clone());
    let t0 = Instant::now();
    let result = match (&conn.upstreams, upgrade) {
        (Some(own), false) => {
            origin_form(&mut parts.uri);
            let up_req = Request::from_parts(parts, body);
            let send = own.send(
                up_host,
                port,
                timeouts.upstream_connect,
                timeouts.upstream_pool_idle,
                up_req,
            );
            tokio::time::timeout(timeouts.upstream_response, send).await
        }
        (_, true) => {
            origin_form(&mut parts.uri);
            let up_req = Request::from_parts(parts, body);
            let send = upstream::send_upgrade(up_host, port, timeouts.upstream_connect, up_req);
            tokio::time::timeout(timeouts.upstream_response, send).await
        }
        (None, false) => {
            let pq = parts
                .uri
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/");
            let authority = if up_host.contains(':') {
                format!("[{up_host}]:{port}")
            } else {
                format!("{up_host}:{port}")
            };
            parts.uri = match Uri::builder()
                .scheme("http")
                .authority(authority.as_str())
                .path_and_query(pq)
                .build()
            {
                Ok(u) => u,
                Err(_) => return pages::bad_request("Malformed request target."),
            };
            let up_req = Request::from_parts(parts, body);
            let send = shared.upstreams.pick().request(up_req);
            tokio::time::timeout(timeouts.upstream_response, async {
                send.await.map_err(UpstreamError::Pooled)
            })
            .await
        }
    };
    *upstream_ms = Some(t0.elapsed().as_millis());
    let client_fault = client_fault.load(Ordering::Relaxed);
    let mut resp = match upstream_result(shared, route, port, result, client_fault) {
        Ok(r) => r,
        Err(page) => return *page,
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client_up) = client_upgrade {
            let upstream_up = hyper::upgrade::on(&mut resp);
            let sandbox = route.sandbox.clone();
            // Registered before the 101 goes out: a revocation from now on
            // reaches the tunnel (see tunnels.rs).
            let reg = shared
                .tunnels
                .register(&*shared.routes, host, route.clone());
            let revoked = route.sandbox.clone();
            tokio::spawn(async move {
                let end = reg.end.clone();
                let relay = async move {
                    match tokio::try_join!(client_up, upstream_up) {
                        Ok((c, u)) => {
                            let mut c = TokioIo::new(c);
                            let mut u = TokioIo::new(u);
                            let _ = tokio::io::copy_bidirectional(&mut c, &mut u).await;
                        }
                        Err(e) => {
                            tracing::debug!(sandbox = %sandbox, error = %e, "upgrade failed")
                        }
                    }
                };
                tokio::select! {
                    () = relay => {}
                    () = end.notified() => {
                        tracing::info!(sandbox = %revoked, "upgraded connection ended: its route or login changed");
                    }
                }
                drop(reg);
            });
        }
        let (parts, body) = resp.into_parts();
        return Response::from_parts(parts, RespBody::of(RespInner::Upstream(body)));
    }
    relay(resp.map(RespInner::Upstream))
}

/// The upstream's response, or the error page for how the exchange failed.
fn upstream_result<T>(
    shared: &Shared,
    route: &Route,
    port: u16,
    result: Result<Result<Response<T>, UpstreamError>, tokio::time::error::Elapsed>,
    client_fault: bool,
) -> Result<Response<T>, Box<Response<RespBody>>> {
    let page = match result {
        Ok(Ok(r)) => return Ok(r),
        Err(_) => pages::error(
            StatusCode::GATEWAY_TIMEOUT,
            &format!(
                "Sandbox {} did not answer within {} s.",
                route.sandbox,
                shared.config.timeouts.upstream_response.as_secs()
            ),
        ),
        Ok(Err(_)) if client_fault => pages::bad_request("Malformed request body."),
        Ok(Err(e)) => {
            tracing::debug!(sandbox = %route.sandbox, error = ?e, "upstream error");
            pages::error(
                StatusCode::BAD_GATEWAY,
                &upstream_error_text(route, port, &e),
            )
        }
    };
    Err(Box::new(page))
}

/// The upstream's (non-101) response as the client's.
fn relay(mut resp: Response<RespInner>) -> Response<RespBody> {
    strip_hop_by_hop(resp.headers_mut());
    // The response to the client is ours: an HTTP/1.0 upstream must not turn
    // it into HTTP/1.0 (hyper would then close the client's keep-alive
    // connection). hyper still answers an HTTP/1.0 client in HTTP/1.0.
    *resp.version_mut() = Version::HTTP_11;
    resp.map(RespBody::of)
}

fn io_error_text(route: &Route, port: u16, io: &std::io::Error) -> String {
    match io.kind() {
        std::io::ErrorKind::ConnectionRefused => format!(
            "Sandbox {} is running but nothing answers on port {port} (connection refused).",
            route.sandbox
        ),
        std::io::ErrorKind::TimedOut => format!(
            "Sandbox {} could not be reached on port {port} (connect timed out).",
            route.sandbox
        ),
        _ => format!(
            "Sandbox {} could not be reached on port {port} ({io}).",
            route.sandbox
        ),
    }
}

fn upstream_error_text(route: &Route, port: u16, e: &UpstreamError) -> String {
    let (mut src, connect): (Option<&(dyn std::error::Error + 'static)>, bool) = match e {
        UpstreamError::Connect(io) => return io_error_text(route, port, io),
        UpstreamError::ConnectTimeout => {
            return format!(
                "Sandbox {} could not be reached on port {port} (connect timed out).",
                route.sandbox
            )
        }
        UpstreamError::Http(e) => (std::error::Error::source(e), false),
        UpstreamError::Pooled(e) => (std::error::Error::source(e), e.is_connect()),
        UpstreamError::Exchange(ExchangeError::Io(io)) => return io_error_text(route, port, io),
        UpstreamError::Exchange(ExchangeError::Malformed(what)) => {
            return format!(
                "Sandbox {} sent a malformed response on port {port} ({what}).",
                route.sandbox
            )
        }
        UpstreamError::Exchange(ExchangeError::Closed) => (None, false),
    };
    while let Some(s) = src {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return io_error_text(route, port, io);
        }
        src = s.source();
    }
    if connect {
        format!(
            "Sandbox {} could not be reached on port {port}.",
            route.sandbox
        )
    } else {
        format!(
            "Sandbox {} closed the connection on port {port}.",
            route.sandbox
        )
    }
}
