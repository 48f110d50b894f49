//! The reverse proxy: per request, find the route by host, check SNI/Host and
//! basic auth, forward to the sandbox over a pooled keep-alive HTTP/1.1
//! connection with streaming bodies both ways, tunnel upgrades (websockets),
//! and answer errors according to who caused them (client 4xx, upstream
//! 502/504). Also the plain-HTTP listener's handler (ACME HTTP-01 + redirect)
//! and the access log.
//!
//! Every path to an upstream (bodiless exchange, hyper client, HTTP/2 pool,
//! upgrade) gets its request headers from one place, `set_forwarded`: `Host`
//! and `X-Forwarded-Host` are the routed host, the client-address headers
//! are the proxy's own, names with `_` are dropped; and `handle` adds HSTS
//! to the responses of hosts whose certificate mode asks for it.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::header::{
    HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, CONNECTION, CONTENT_LENGTH, HOST,
    STRICT_TRANSPORT_SECURITY, TRANSFER_ENCODING, UPGRADE,
};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use crate::upstream::exchange::{self, BoxError, ExchangeError, IdlePool, UpBody};
use crate::framing::FramingFlags;
use crate::gateway::Shared;
use crate::sources::{SourceLimit, SourceSeat};
use crate::upstream::conn::{self as upstream, ConnUpstreams, UpstreamError};
use crate::{access, pages, HttpConfig, Route, Target, TlsMode};

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static FORWARDED: HeaderName = HeaderName::from_static("forwarded");
static X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");
static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
static TRUE_CLIENT_IP: HeaderName = HeaderName::from_static("true-client-ip");

/// Header values the proxy sets, made once from the configuration.
pub(crate) struct HeaderValues {
    /// `X-Forwarded-Port`: the public HTTPS port.
    forwarded_port: HeaderValue,
    /// `Strict-Transport-Security`, unless switched off.
    hsts: Option<HeaderValue>,
    /// What follows the routed host in `Host`: `:PORT`, or nothing for 443.
    host_port: String,
}

impl HeaderValues {
    pub(crate) fn new(cfg: &HttpConfig) -> Self {
        let hsts = (cfg.hsts.max_age_secs > 0)
            .then(|| HeaderValue::from_str(&format!("max-age={}", cfg.hsts.max_age_secs)).ok())
            .flatten();
        let host_port = match cfg.https_port {
            443 => String::new(),
            p => format!(":{p}"),
        };
        Self {
            forwarded_port: HeaderValue::from(cfg.https_port),
            hsts,
            host_port,
        }
    }
}

/// Facts about one client connection, shared by its requests.
pub(crate) struct ConnInfo {
    pub peer: SocketAddr,
    pub sni: Option<String>,
    pub tls: bool,
    pub framing: Option<Arc<FramingFlags>>,
    pub seq: AtomicU64,
    /// The peer's address as a header value (X-Forwarded-For), made once.
    peer_ip: HeaderValue,
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

/// The pooled clients to upstreams: one pool per shard, a thread always
/// using the same shard, so that a pooled connection is mostly driven on the
/// thread that uses it (no cross-thread wake-ups per request).
pub(crate) struct Upstreams {
    shards: Vec<Client<HttpConnector, ReqBody>>,
}

thread_local! {
    static SHARD: usize = next_shard();
}

fn next_shard() -> usize {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

impl Upstreams {
    pub(crate) fn new(cfg: &HttpConfig) -> Self {
        let n = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, 64);
        Self {
            shards: (0..n).map(|_| Self::client(cfg)).collect(),
        }
    }

    fn pick(&self) -> &Client<HttpConnector, ReqBody> {
        let i = SHARD.with(|s| *s) % self.shards.len();
        &self.shards[i]
    }

    fn client(cfg: &HttpConfig) -> Client<HttpConnector, ReqBody> {
        let mut conn = HttpConnector::new();
        conn.set_connect_timeout(Some(cfg.timeouts.upstream_connect));
        conn.set_nodelay(true);
        conn.set_keepalive(Some(std::time::Duration::from_secs(60)));
        conn.enforce_http(true);
        Client::builder(TokioExecutor::new())
            .pool_idle_timeout(cfg.timeouts.upstream_pool_idle)
            .pool_max_idle_per_host(cfg.limits.upstream_pool_max_idle)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .set_host(false)
            .build(conn)
    }
}

/// Request body sent upstream; remembers whether the client's side failed
/// (a malformed chunked body is the client's fault: 400, not 502).
pub(crate) struct ReqBody {
    inner: Option<Incoming>,
    client_fault: Arc<AtomicBool>,
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(Some(Err(e))) => {
                this.client_fault.store(true, Ordering::Relaxed);
                Poll::Ready(Some(Err(e)))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint())
    }
}

enum RespInner {
    Upstream(Incoming),
    /// From a bodiless exchange, read off the upstream socket as polled.
    Fast(UpBody),
    Full(Option<Bytes>),
}

/// Response body to the client: the upstream's, streamed, or a page of ours.
/// Counts bytes for the access log, written when the body is dropped.
pub(crate) struct RespBody {
    inner: RespInner,
    log: Option<Box<AccessLog>>,
    /// The request's place under its source's open-request cap (HTTP/2),
    /// given back when the response is done or dropped.
    seat: Option<SourceSeat>,
}

impl RespBody {
    pub(crate) fn full(b: Bytes) -> Self {
        Self {
            inner: RespInner::Full(Some(b)),
            log: None,
            seat: None,
        }
    }
}

impl Body for RespBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let res = match &mut this.inner {
            RespInner::Upstream(b) => Pin::new(b).poll_frame(cx).map_err(BoxError::from),
            RespInner::Fast(b) => Pin::new(b).poll_frame(cx),
            RespInner::Full(b) => Poll::Ready(b.take().map(|d| Ok(Frame::data(d)))),
        };
        if let (Poll::Ready(Some(Ok(f))), Some(log)) = (&res, this.log.as_mut()) {
            if let Some(d) = f.data_ref() {
                log.bytes += d.len() as u64;
            }
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            RespInner::Upstream(b) => b.is_end_stream(),
            RespInner::Fast(b) => b.is_end_stream(),
            RespInner::Full(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            RespInner::Upstream(b) => b.size_hint(),
            RespInner::Fast(b) => b.size_hint(),
            RespInner::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            RespInner::Full(None) => SizeHint::with_exact(0),
        }
    }
}

/// One access-log line, written when the response body is done (or dropped).
pub(crate) struct AccessLog {
    /// The request's host (its first `host_len` bytes, `None`: no valid
    /// host), then its path: one allocation, made when the request arrives,
    /// so that a request cancelled on the way is logged with both.
    host_path: String,
    host_len: Option<usize>,
    method: Method,
    status: u16,
    bytes: u64,
    start: Instant,
    upstream_ms: Option<u128>,
    peer: SocketAddr,
}

impl AccessLog {
    fn host(&self) -> Option<&str> {
        self.host_len.and_then(|n| self.host_path.get(..n))
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        use crate::logbuf::{push_addr, push_clean, push_num};
        crate::logbuf::access_line(|out| {
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

fn access_log_enabled() -> bool {
    tracing::enabled!(target: "httpgate::access", tracing::Level::INFO)
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
        let answer = shared
            .http01
            .read()
            .ok()
            .and_then(|m| m.get(token).cloned());
        return match answer {
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

/// The request's host: `:authority` / absolute URI, else the Host header;
/// lowercase, without port or trailing dot. `None` if absent or malformed.
/// The string is made with room for `extra` more bytes (one allocation for
/// the host and the path of the access-log record).
fn request_host<B>(req: &Request<B>, extra: usize) -> Option<String> {
    let raw = match req.uri().authority() {
        Some(a) => a.host(),
        None => host_header_host(req.headers().get(HOST)?.to_str().ok()?)?,
    };
    let raw = raw.trim_end_matches('.');
    let valid = !raw.is_empty()
        && raw.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b':' | b'[' | b']')
        });
    if !valid {
        return None;
    }
    let mut host = String::with_capacity(raw.len() + extra);
    host.push_str(raw);
    host.make_ascii_lowercase();
    Some(host)
}

/// The host part of a Host header value: `name[:port]` or `[v6][:port]`,
/// the port digits only. `None` if it is neither.
fn host_header_host(v: &str) -> Option<&str> {
    let (host, port) = match v.strip_prefix('[') {
        Some(rest) => {
            let inner = &rest[..rest.find(']')?];
            let ok = !inner.is_empty()
                && inner
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() || matches!(b, b':' | b'.'));
            if !ok {
                return None;
            }
            v.split_at(inner.len() + 2)
        }
        None => {
            let (host, port) = v.split_at(v.find(':').unwrap_or(v.len()));
            if host.contains(['[', ']']) {
                return None;
            }
            (host, port)
        }
    };
    let port_ok = port.is_empty()
        || port
            .strip_prefix(':')
            .is_some_and(|p| p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()));
    port_ok.then_some(host)
}

const HOP_BY_HOP: [HeaderName; 8] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    http::header::TE,
    http::header::TRAILER,
    TRANSFER_ENCODING,
    UPGRADE,
    http::header::PROXY_AUTHORIZATION,
];

fn strip_hop_by_hop(h: &mut HeaderMap) {
    // Most messages carry none: one pass over the names, no lookups.
    if !h.keys().any(|k| HOP_BY_HOP.contains(k)) {
        return;
    }
    // Usually Connection lists only options ("keep-alive", "close") or
    // names removed below anyway: no list to build.
    let only_known = h
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .all(|t| {
            let t = t.trim();
            t.eq_ignore_ascii_case("close")
                || HOP_BY_HOP
                    .iter()
                    .any(|n| t.eq_ignore_ascii_case(n.as_str()))
        });
    if only_known {
        for n in &HOP_BY_HOP {
            h.remove(n);
        }
        return;
    }
    let listed: Vec<HeaderName> = h
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for n in listed {
        h.remove(n);
    }
    for n in &HOP_BY_HOP {
        h.remove(n);
    }
}

fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(UPGRADE)
        && req
            .headers()
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// The `Host` an upstream gets: the routed host (with the public HTTPS
/// port when it is not 443), whatever the client sent in `Host` beside an
/// absolute-form target or HTTP/2 `:authority`. The client's own value is
/// reused when it is exactly that (the usual case: no allocation).
fn routed_host(shared: &Shared, h: &HeaderMap, host: &str) -> Option<HeaderValue> {
    let port = shared.header_values.host_port.as_bytes();
    if let Some(v) = h.get(HOST) {
        if v.as_bytes().strip_prefix(host.as_bytes()) == Some(port) {
            return Some(v.clone());
        }
    }
    let v = match port.is_empty() {
        true => HeaderValue::from_str(host),
        false => HeaderValue::from_str(&format!("{host}{}", shared.header_values.host_port)),
    };
    v.ok()
}

/// Drop request headers whose names contain `_`: CGI-style servers map
/// `X_Forwarded_For` and `X-Forwarded-For` to the same variable, which
/// would let a client pass one past the proxy's own.
fn strip_underscored(h: &mut HeaderMap) {
    if !h.keys().any(|k| k.as_str().contains('_')) {
        return;
    }
    let names: Vec<HeaderName> = h
        .keys()
        .filter(|k| k.as_str().contains('_'))
        .cloned()
        .collect();
    for n in names {
        h.remove(n);
    }
}

/// The headers by which the upstream learns who asked what: `Host` and
/// `X-Forwarded-Host` (the routed host), `X-Forwarded-For`, `-Proto`,
/// `-Port` and `X-Real-IP` set by the proxy; `True-Client-IP`, `Forwarded`
/// and names with `_` dropped. From a trusted proxy, the `X-Forwarded-*`,
/// `X-Real-IP`, `True-Client-IP` and `Forwarded` it sent are kept
/// (`X-Forwarded-For` appended to); `Host` and the `_` rule hold for
/// every peer.
fn set_forwarded(shared: &Shared, conn: &ConnInfo, h: &mut HeaderMap, host: &str) {
    strip_underscored(h);
    let routed = routed_host(shared, h, host);
    match &routed {
        Some(v) => h.insert(HOST, v.clone()),
        None => h.remove(HOST),
    };
    let trusted = shared.config.trusted_proxies.contains(&conn.peer.ip());
    let prev = match trusted {
        true => h.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()),
        false => None,
    };
    let xff = match prev {
        Some(prev) => HeaderValue::from_str(&format!("{prev}, {}", conn.peer.ip())).ok(),
        None => Some(conn.peer_ip.clone()),
    };
    if let Some(v) = xff {
        h.insert(X_FORWARDED_FOR.clone(), v);
    }
    if !(trusted && h.contains_key(&X_FORWARDED_PROTO)) {
        let proto = if conn.tls { "https" } else { "http" };
        h.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
    }
    if !(trusted && h.contains_key(&X_FORWARDED_HOST)) {
        match routed {
            Some(v) => h.insert(X_FORWARDED_HOST.clone(), v),
            None => h.remove(&X_FORWARDED_HOST),
        };
    }
    if !(trusted && h.contains_key(&X_FORWARDED_PORT)) {
        let port = shared.header_values.forwarded_port.clone();
        h.insert(X_FORWARDED_PORT.clone(), port);
    }
    if !(trusted && h.contains_key(&X_REAL_IP)) {
        h.insert(X_REAL_IP.clone(), conn.peer_ip.clone());
    }
    if !trusted {
        h.remove(&FORWARDED);
        h.remove(&TRUE_CLIENT_IP);
    }
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
    set_forwarded(shared, conn, &mut parts.headers, host);
    parts.version = Version::HTTP_11;
    let timeouts = &shared.config.timeouts;
    if let Some(own) = conn.upstreams.as_ref() {
        if !upgrade && exchange::eligible(&parts.method, body.is_end_stream()) {
            origin_form(&mut parts.uri);
            let t0 = Instant::now();
            let send =
                exchange::exchange(&own.idle, up_host, port, timeouts.upstream_connect, &parts);
            let result = tokio::time::timeout(timeouts.upstream_response, send).await;
            *upstream_ms = Some(t0.elapsed().as_millis());
            return match upstream_result(shared, route, port, result, false) {
                Ok(r) => relay(r.map(RespInner::Fast)),
                Err(page) => *page,
            };
        }
    }
    let client_fault = Arc::new(AtomicBool::new(false));
    let body = ReqBody {
        inner: Some(body),
        client_fault: client_fault.clone(),
    };
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
        return Response::from_parts(
            parts,
            RespBody {
                inner: RespInner::Upstream(body),
                log: None,
                seat: None,
            },
        );
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
    resp.map(|inner| RespBody {
        inner,
        log: None,
        seat: None,
    })
}

/// Rewrite an absolute-form request target to origin form (what an
/// HTTP/1.1 connection to the upstream sends).
fn origin_form(uri: &mut Uri) {
    if uri.scheme().is_none() && uri.authority().is_none() {
        return;
    }
    let pq = uri.path_and_query().map_or("/", |p| p.as_str());
    if let Ok(u) = Uri::try_from(pq) {
        *uri = u;
    }
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn host_of(uri: &str, host_header: Option<&str>) -> Option<String> {
        let mut b = Request::builder().uri(uri);
        if let Some(h) = host_header {
            b = b.header(HOST, h);
        }
        request_host(&b.body(()).expect("request"), 0)
    }

    #[test]
    fn host_from_header_lowercase_without_port_or_dot() {
        assert_eq!(
            host_of("/", Some("App.Example.COM")).as_deref(),
            Some("app.example.com")
        );
        assert_eq!(
            host_of("/", Some("app.example.com.:8443")).as_deref(),
            Some("app.example.com")
        );
        assert_eq!(
            host_of("/", Some("app.example.com:")).as_deref(),
            Some("app.example.com")
        );
        assert_eq!(host_of("/", Some("[::1]:443")).as_deref(), Some("[::1]"));
        assert_eq!(
            host_of("/", Some("[2001:DB8::1]")).as_deref(),
            Some("[2001:db8::1]")
        );
    }

    #[test]
    fn host_from_authority_wins_over_header() {
        let h = host_of("https://Other.Example.com:8443/x", Some("app.example.com"));
        assert_eq!(h.as_deref(), Some("other.example.com"));
    }

    #[test]
    fn malformed_hosts_are_refused() {
        for bad in [
            "",
            ".",
            "user@app.example.com",
            "app.example.com:80x",
            "app.example.com:123456",
            "a:b:c",
            "app example.com",
            "app.example.com/x",
            "[::1",
            "[]",
            "[::1]x",
            "[[::1]",
            "a]b",
            "app%2eexample.com",
        ] {
            assert_eq!(host_of("/", Some(bad)), None, "{bad:?}");
        }
        assert_eq!(host_of("/", None), None);
    }

    #[test]
    fn host_string_has_room_for_the_path() {
        let req = Request::builder()
            .uri("/some/path")
            .header(HOST, "app.example.com")
            .body(())
            .expect("request");
        let h = request_host(&req, 10).expect("host");
        assert!(h.capacity() >= h.len() + 10);
    }
}
