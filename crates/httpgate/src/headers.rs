//! The request heads the proxy forwards: the host a request is for
//! (`request_host`), and every upstream request's headers from one place,
//! `set_forwarded`: `Host` and `X-Forwarded-Host` are the routed host, the
//! client-address headers are the proxy's own, names with `_` are dropped;
//! hop-by-hop headers go both ways (`strip_hop_by_hop`).

use std::net::SocketAddr;

use http::header::{
    HeaderMap, HeaderName, HeaderValue, CONNECTION, HOST, TRANSFER_ENCODING, UPGRADE,
};
use http::{Request, Uri, Version};

use crate::gateway::Shared;
use crate::HttpConfig;

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
    pub(crate) forwarded_port: HeaderValue,
    /// `Strict-Transport-Security`, unless switched off.
    pub(crate) hsts: Option<HeaderValue>,
    /// What follows the routed host in `Host`: `:PORT`, or nothing for 443.
    pub(crate) host_port: String,
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

/// The request's host: `:authority` / absolute URI, else the Host header;
/// lowercase, without port or trailing dot. `None` if absent or malformed.
/// The string is made with room for `extra` more bytes (one allocation for
/// the host and the path of the access-log record).
pub(crate) fn request_host<B>(req: &Request<B>, extra: usize) -> Option<String> {
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

pub(crate) fn strip_hop_by_hop(h: &mut HeaderMap) {
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

pub(crate) fn is_upgrade<B>(req: &Request<B>) -> bool {
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
/// every peer. `peer` is the client (`peer_ip`: its address as a header
/// value, made once per connection); `tls`: whether it came over HTTPS.
pub(crate) fn set_forwarded(
    shared: &Shared,
    (peer, peer_ip, tls): (SocketAddr, &HeaderValue, bool),
    h: &mut HeaderMap,
    host: &str,
) {
    strip_underscored(h);
    let routed = routed_host(shared, h, host);
    match &routed {
        Some(v) => h.insert(HOST, v.clone()),
        None => h.remove(HOST),
    };
    let trusted = shared.config.trusted_proxies.contains(&peer.ip());
    let prev = match trusted {
        true => h.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()),
        false => None,
    };
    let xff = match prev {
        Some(prev) => HeaderValue::from_str(&format!("{prev}, {}", peer.ip())).ok(),
        None => Some(peer_ip.clone()),
    };
    if let Some(v) = xff {
        h.insert(X_FORWARDED_FOR.clone(), v);
    }
    if !(trusted && h.contains_key(&X_FORWARDED_PROTO)) {
        let proto = if tls { "https" } else { "http" };
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
        h.insert(X_REAL_IP.clone(), peer_ip.clone());
    }
    if !trusted {
        h.remove(&FORWARDED);
        h.remove(&TRUE_CLIENT_IP);
    }
}

/// Rewrite an absolute-form request target to origin form (what an
/// HTTP/1.1 connection to the upstream sends).
pub(crate) fn origin_form(uri: &mut Uri) {
    if uri.scheme().is_none() && uri.authority().is_none() {
        return;
    }
    let pq = uri.path_and_query().map_or("/", |p| p.as_str());
    if let Ok(u) = Uri::try_from(pq) {
        *uri = u;
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
