//! The gate's edge against abuse: connections per source, HTTP/2
//! connections that never open a stream, the headers an upstream is given
//! (checked by an upstream that echoes what it received, on every path:
//! bodiless exchange, hyper client, HTTP/2, absolute-form targets), HSTS,
//! and the internal CA's name constraints (checked with openssl).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use httpgate::{CaRecord, TlsMode};
use testsupport::{require, Component};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A TCP connection to `addr` from source address `from`.
async fn tcp_from(from: IpAddr, addr: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(from, 0))?;
    sock.connect(addr).await
}

/// A TLS connection (SNI `host`, ALPN `alpn`) from source address `from`.
async fn tls_from(
    from: IpAddr,
    addr: SocketAddr,
    host: &str,
    ca_file: &Path,
    alpn: &[u8],
) -> std::io::Result<RawTls> {
    httpgate::install_crypto_provider();
    let pem = std::fs::read(ca_file)?;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut &pem[..]) {
        roots.add(c?).map_err(std::io::Error::other)?;
    }
    let mut cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = tcp_from(from, addr).await?;
    let name =
        rustls::pki_types::ServerName::try_from(host.to_owned()).map_err(std::io::Error::other)?;
    connector.connect(name, tcp).await
}

/// Whether the peer closes `s` within `secs` (end of file or an error),
/// reading and dropping whatever it sends first.
async fn closed_within<S: tokio::io::AsyncRead + Unpin>(s: &mut S, secs: u64) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 1));
const OTHER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_source_holding_300_stalled_connections_does_not_lock_out_others() {
    if !require(&[Component::Program("curl")]) {
        return;
    }
    // A global limit one source could fill on its own: 300 connections.
    let (_app, gw) = app_gateway(|c| {
        c.limits.max_connections = 300;
        c.timeouts.handshake = Duration::from_secs(120);
        c.timeouts.header_read = Duration::from_secs(120);
    })
    .await;
    assert_eq!(
        httpgate::Limits::default().max_connections_per_source,
        256,
        "the documented default"
    );
    let (port, handles) = spawn_threads(&gw, 2);
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    // 127.0.0.1 opens 300 connections, in turn: TLS that sends nothing,
    // HTTP/2 that sends no preface, bare TCP. Its cap is half the global
    // limit (150 of 300, below the default 256): above it, connections are
    // closed at accept, so their handshake fails, and bare ones read end
    // of file.
    let mut held_tls = Vec::new();
    let mut held_tcp = Vec::new();
    let mut refused_tls = 0;
    for i in 0..300 {
        match i % 3 {
            0 | 1 => {
                let alpn: &[u8] = if i % 3 == 0 { b"http/1.1" } else { b"h2" };
                match tls_from(LOCAL, addr, "app.test", &gw.ca_file, alpn).await {
                    Ok(s) => held_tls.push(s),
                    Err(_) => refused_tls += 1,
                }
            }
            _ => held_tcp.push(tcp_from(LOCAL, addr).await.unwrap()),
        }
    }
    let closed = |held: &[tokio::net::TcpStream]| {
        held.iter()
            .filter(|s| {
                let mut b = [0u8; 1];
                match s.try_read(&mut b) {
                    Ok(0) => true,
                    Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
                    Ok(_) => false,
                }
            })
            .count()
    };
    for _ in 0..100 {
        if refused_tls + closed(&held_tcp) >= 150 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        refused_tls + closed(&held_tcp),
        150,
        "300 connections from one source, capped at 150"
    );
    assert_eq!(held_tls.len() + held_tcp.len() - closed(&held_tcp), 150);
    let more = tls_from(LOCAL, addr, "app.test", &gw.ca_file, b"http/1.1").await;
    assert!(
        more.is_err(),
        "the 257th connection of 127.0.0.1 is refused"
    );
    // Another address still gets the page, on both protocols.
    for proto in ["--http1.1", "--http2"] {
        let r = Curl::new("app.test", port, "/")
            .cacert(&gw.ca_file)
            .arg("--interface")
            .arg("127.0.0.2")
            .arg(proto)
            .run()
            .await;
        assert_eq!(
            r.status, 200,
            "{proto} from 127.0.0.2 while 127.0.0.1 holds 256: {r:?}"
        );
        let j: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(j["headers"]["x-forwarded-for"], "127.0.0.2");
    }
    drop(held_tls);
    drop(held_tcp);
    stop_with_threads(gw, handles).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_connections_without_a_stream_are_closed_after_the_header_timeout() {
    if !require(&[Component::Program("curl")]) {
        return;
    }
    let (_app, gw) = app_gateway(|c| {
        c.timeouts.header_read = Duration::from_secs(1);
        c.timeouts.idle = Duration::from_secs(120);
    })
    .await;
    // No preface at all.
    let mut silent = tls_from(OTHER, gw.https, "app.test", &gw.ca_file, b"h2")
        .await
        .unwrap();
    // The preface and an empty SETTINGS frame, but no stream.
    let mut preface_only = tls_from(OTHER, gw.https, "app.test", &gw.ca_file, b"h2")
        .await
        .unwrap();
    preface_only
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    preface_only.flush().await.unwrap();
    assert!(
        closed_within(&mut silent, 20).await,
        "an h2 connection without a preface stays open"
    );
    assert!(
        closed_within(&mut preface_only, 20).await,
        "an h2 connection without a stream stays open"
    );
    // A client that opens a stream at once is served as before.
    let r = gw.curl("app.test", "/").arg("--http2").run().await;
    assert_eq!((r.status, r.version.as_str()), (200, "2"), "{r:?}");
    gw.stop().await;
}

/// One HTTP/2 frame header and payload.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
    let mut f = vec![len[1], len[2], len[3], kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HPACK literal header field without indexing, new name.
fn hpack_literal(name: &str, value: &str) -> Vec<u8> {
    let mut v = vec![0, u8::try_from(name.len()).unwrap()];
    v.extend_from_slice(name.as_bytes());
    v.push(u8::try_from(value.len()).unwrap());
    v.extend_from_slice(value.as_bytes());
    v
}

/// Every HTTP/2 stream may hold an upstream connection: one source's
/// connection cap must not let it hold `max_h2_streams` times as many
/// requests (fds and memory of the daemon, connections to the sandbox).
/// Past four open requests per connection of its cap, its new streams get
/// 429 at once; other sources are served, and the source is again once
/// its requests end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_source_cannot_multiply_its_connections_with_http2_streams() {
    if !require(&[Component::Program("curl")]) {
        return;
    }
    let (_app, gw) = app_gateway(|c| c.limits.max_connections_per_source = 2).await;
    let attacker: IpAddr = [127, 0, 0, 3].into();
    let mut s = tls_from(attacker, gw.https, "app.test", &gw.ca_file, b"h2")
        .await
        .unwrap();
    // 2 connections x 4 = 8 open requests; 12 streams, each held by the
    // upstream for a minute.
    let mut head = vec![0x82, 0x87]; // :method GET, :scheme https
    head.extend(hpack_literal(":path", "/sleep/60000"));
    head.extend(hpack_literal(":authority", "app.test"));
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(h2_frame(4, 0, 0, &[]));
    for i in 0..12u32 {
        out.extend(h2_frame(1, 0x5, 1 + 2 * i, &head)); // END_STREAM | END_HEADERS
    }
    s.write_all(&out).await.unwrap();
    s.flush().await.unwrap();
    // The four streams above the cap are answered at once.
    let mut answered = 0;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        let mut chunk = [0u8; 4096];
        while answered < 4 {
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "connection closed");
            buf.extend_from_slice(&chunk[..n]);
            while buf.len() >= 9 {
                let len =
                    usize::from(buf[0]) << 16 | usize::from(buf[1]) << 8 | usize::from(buf[2]);
                if buf.len() < 9 + len {
                    break;
                }
                if buf[3] == 1 {
                    answered += 1;
                }
                buf.drain(..9 + len);
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "one source held 12 HTTP/2 requests open with a cap of 2 connections (answered: {answered})"
    );
    // The same address is refused a new request while they are open ...
    let from = |ip: &str| {
        gw.curl("app.test", "/")
            .arg("--http2")
            .arg("--interface")
            .arg(ip)
    };
    let r = from("127.0.0.3").run().await;
    assert_eq!(r.status, 429, "{r:?}");
    // ... another is served ...
    let r = from("127.0.0.2").run().await;
    assert_eq!(r.status, 200, "{r:?}");
    // ... and the first is again once its requests are gone.
    drop(s);
    let mut status = 0;
    for _ in 0..50 {
        status = from("127.0.0.3").run().await.status;
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, 200, "the source's requests were not given back");
    gw.stop().await;
}

/// Spoofing headers a client may send.
const SPOOFED: [&str; 7] = [
    "X-Real-IP: 6.6.6.6",
    "True-Client-IP: 6.6.6.6",
    "X-Forwarded-Port: 1",
    "X-Forwarded-Host: evil.test",
    "X_Forwarded_For: 6.6.6.6",
    "X-Forwarded_Host: evil.test",
    "Forwarded: for=6.6.6.6",
];

fn assert_proxys_own_headers(what: &str, r: &CurlOut) {
    assert_eq!(r.status, 200, "{what}: {r:?}");
    let j: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    let h = j["headers"].as_object().unwrap();
    assert_eq!(h["host"], "app.test", "{what}: {h:?}");
    assert_eq!(h["x-forwarded-host"], "app.test", "{what}");
    assert_eq!(h["x-real-ip"], "127.0.0.1", "{what}");
    assert_eq!(h["x-forwarded-for"], "127.0.0.1", "{what}");
    assert_eq!(h["x-forwarded-port"], "443", "{what}");
    assert_eq!(h["x-forwarded-proto"], "https", "{what}");
    for gone in ["true-client-ip", "forwarded"] {
        assert!(!h.contains_key(gone), "{what}: {gone} forwarded: {h:?}");
    }
    assert!(
        !h.keys().any(|k| k.contains('_')),
        "{what}: a name with _ forwarded: {h:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstreams_get_the_routed_host_and_the_proxys_own_client_headers() {
    if !require(&[Component::Program("curl")]) {
        return;
    }
    let (_app, gw) = app_gateway(|_| {}).await;
    let port = gw.https.port();
    let with_spoofs = |mut c: Curl| {
        for h in SPOOFED {
            c = c.header(h);
        }
        c
    };
    // Bodiless GET (the exchange path), HTTP/1.1.
    let r = with_spoofs(gw.curl("app.test", "/get").arg("--http1.1"))
        .run()
        .await;
    assert_proxys_own_headers("GET over HTTP/1.1", &r);
    // POST (hyper's client), HTTP/1.1.
    let r = with_spoofs(gw.curl("app.test", "/post").arg("--http1.1"))
        .arg("--data")
        .arg("x=1")
        .run()
        .await;
    assert_proxys_own_headers("POST over HTTP/1.1", &r);
    // HTTP/2 (the shared pool), GET and POST.
    let r = with_spoofs(gw.curl("app.test", "/h2").arg("--http2"))
        .run()
        .await;
    assert_eq!(r.version, "2");
    assert_proxys_own_headers("GET over HTTP/2", &r);
    let r = with_spoofs(gw.curl("app.test", "/h2").arg("--http2"))
        .arg("--data")
        .arg("x=1")
        .run()
        .await;
    assert_proxys_own_headers("POST over HTTP/2", &r);
    // An absolute-form target routes by its authority; the Host the client
    // sent beside it does not reach the upstream.
    for (what, extra) in [("GET", None), ("POST", Some("x=1"))] {
        let mut c = with_spoofs(gw.curl("app.test", "/abs").arg("--http1.1"))
            .arg("--request-target")
            .arg(&format!("https://app.test:{port}/abs"))
            .header("Host: evil.test");
        if let Some(d) = extra {
            c = c.arg("--data").arg(d);
        }
        let r = c.run().await;
        assert_proxys_own_headers(&format!("absolute-form {what}"), &r);
    }
    // The same with a raw client: one request, no curl normalization.
    let mut s = tls_connect(gw.https, "app.test", &gw.ca_file)
        .await
        .unwrap();
    let head = format!(
        "GET https://APP.test:{port}/raw HTTP/1.1\r\nHost: evil.test:8443\r\nConnection: close\r\n\r\n"
    );
    let mut got = raw_exchange(&mut s, head.as_bytes(), 10).await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest)).await;
    got.push_str(&String::from_utf8_lossy(&rest));
    let body = got
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or_default();
    let j: serde_json::Value = serde_json::from_str(body.trim()).unwrap();
    assert_eq!(j["headers"]["host"], "app.test", "{j}");
    assert_eq!(j["headers"]["x-forwarded-host"], "app.test", "{j}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_public_port_goes_into_host_when_it_is_not_443() {
    if !require(&[Component::Program("curl")]) {
        return;
    }
    let (_app, gw) = app_gateway(|c| c.https_port = 8443).await;
    let r = gw
        .curl("app.test", "/")
        .header("X-Forwarded-Port: 1")
        .run()
        .await;
    let j: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(j["headers"]["host"], "app.test:8443");
    assert_eq!(j["headers"]["x-forwarded-host"], "app.test:8443");
    assert_eq!(j["headers"]["x-forwarded-port"], "8443");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hsts_on_acme_hosts_only_by_default() {
    if !require(&[Component::Program("curl")]) {
        return;
    }
    let app = Upstream::start("app").await;
    // One sandbox: its app host `app.test` in internal mode (which decides
    // the certificate both names share) and a second name, `pub.test`, in
    // ACME mode (no ACME directory here: its requests come over the
    // `app.test` connection, which the gate allows within one sandbox).
    let both = |b: GatewayBuilder| {
        b.route("app.test", app_route("app", app.addr, TlsMode::Internal))
            .route(
                "pub.test",
                agent_route("app", app.addr, TlsMode::Acme, basic_auth()),
            )
    };
    let gw = both(GatewayBuilder::new()).start().await;
    let hsts = |r: &CurlOut| r.header("strict-transport-security");
    for proto in ["--http1.1", "--http2"] {
        let r = gw
            .curl("app.test", "/")
            .arg(proto)
            .header("Host: pub.test")
            .user("alice:pw")
            .run()
            .await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(
            hsts(&r).as_deref(),
            Some("max-age=31536000"),
            "{proto}: {r:?}"
        );
        for data in [None, Some("x=1")] {
            let mut c = gw.curl("app.test", "/").arg(proto);
            if let Some(d) = data {
                c = c.arg("--data").arg(d);
            }
            let r = c.run().await;
            assert_eq!(r.status, 200, "{r:?}");
            assert_eq!(hsts(&r), None, "internal host: {r:?}");
        }
    }
    gw.stop().await;
    // Configured for internal hosts too, on every path.
    let gw = both(GatewayBuilder::new().config(|c| {
        c.hsts.internal = true;
        c.hsts.max_age_secs = 600;
    }))
    .start()
    .await;
    for proto in ["--http1.1", "--http2"] {
        for data in [None, Some("x=1")] {
            let mut c = gw.curl("app.test", "/").arg(proto);
            if let Some(d) = data {
                c = c.arg("--data").arg(d);
            }
            let r = c.run().await;
            assert_eq!(hsts(&r).as_deref(), Some("max-age=600"), "{r:?}");
        }
    }
    gw.stop().await;
    // Off with max-age 0.
    let gw = both(GatewayBuilder::new().config(|c| c.hsts.max_age_secs = 0))
        .start()
        .await;
    let r = gw
        .curl("app.test", "/")
        .header("Host: pub.test")
        .user("alice:pw")
        .run()
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(hsts(&r), None);
    gw.stop().await;
}

fn basic_auth() -> httpgate::BasicAuth {
    httpgate::BasicAuth {
        user: "alice".into(),
        password_hash: argon2_hash("pw"),
    }
}

// ---------- the internal CA ----------

/// A leaf for `name` signed with the CA record's key (as anyone holding it
/// could make), written to `dir/leaf-NAME.pem`.
fn leaf_signed_by(ca: &CaRecord, name: &str, dir: &Path) -> std::path::PathBuf {
    let ca_key = rcgen::KeyPair::from_pem(&ca.key_pem).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let path = dir.join(format!("leaf-{name}.pem"));
    std::fs::write(&path, cert.pem()).unwrap();
    path
}

/// `openssl verify` of `leaf` against the root `ca`: (success, output).
fn openssl_verify(ca: &Path, leaf: &Path) -> (bool, String) {
    let out = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(ca)
        .arg(leaf)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_internal_root_only_vouches_for_its_suffixes() {
    if !require(&[Component::Program("curl"), Component::Program("openssl")]) {
        return;
    }
    let (_app, gw) = app_gateway(|_| {}).await;
    let ca = gw.store.ca.lock().unwrap().clone().unwrap();
    let dir = gw.dir.path();
    // A leaf for a public name, even signed with the CA's own key, fails
    // on the root's name constraints.
    for outside in ["bank.example.com", "evil.com", "localhost.evil.com"] {
        let leaf = leaf_signed_by(&ca, outside, dir);
        let (ok, text) = openssl_verify(&gw.ca_file, &leaf);
        assert!(!ok, "{outside} verified: {text}");
        assert!(
            text.contains("name constraint") || text.contains("permitted subtree"),
            "{outside}: {text}"
        );
    }
    for inside in ["app.test", "x.localhost", "box.home.arpa", "a.b.internal"] {
        let leaf = leaf_signed_by(&ca, inside, dir);
        let (ok, text) = openssl_verify(&gw.ca_file, &leaf);
        assert!(ok, "{inside}: {text}");
    }
    // What the gate serves for app.test passes curl's (OpenSSL's) checks.
    let r = gw.curl("app.test", "/").run().await;
    assert_eq!(r.status, 200, "{r:?}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_internal_ca_refuses_names_outside_its_suffixes() {
    if !require(&[Component::Program("curl")]) {
        return;
    }
    let app = Upstream::start("app").await;
    let gw = GatewayBuilder::new()
        .route("app.test", app_route("app", app.addr, TlsMode::Internal))
        .route(
            "app.example.com",
            app_route("pub", app.addr, TlsMode::Internal),
        )
        .start()
        .await;
    let status = gw.gw.certs();
    let outside = status
        .iter()
        .find(|c| c.domain == "app.example.com")
        .unwrap();
    assert!(outside.not_after.is_none(), "{outside:?}");
    let err = outside.last_error.as_deref().unwrap_or_default();
    assert!(
        err.contains("outside the internal CA") && err.contains("acme"),
        "{err}"
    );
    let r = gw.curl("app.example.com", "/").run().await;
    assert_eq!(r.status, 0, "no certificate, no handshake: {r:?}");
    assert_eq!(gw.curl("app.test", "/").run().await.status, 200);
    gw.stop().await;
}

/// A CA record as versions without name constraints made it.
fn unconstrained_ca() -> CaRecord {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "sandboxd internal CA old");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key).unwrap();
    CaRecord {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unconstrained_root_is_replaced_at_start() {
    if !require(&[Component::Program("curl"), Component::Program("openssl")]) {
        return;
    }
    let old = unconstrained_ca();
    let store = Arc::new(MemStore::default());
    *store.ca.lock().unwrap() = Some(old.clone());
    let app = Upstream::start("app").await;
    let gw = GatewayBuilder::new()
        .store(store.clone())
        .route("app.test", app_route("app", app.addr, TlsMode::Internal))
        .start()
        .await;
    let notice = gw.gw.ca_replaced().expect("the operator is told");
    assert!(notice.contains("sandboxd ca-cert"), "{notice}");
    let new = store.ca.lock().unwrap().clone().unwrap();
    assert_ne!(new.cert_pem, old.cert_pem, "a new root is stored");
    assert_eq!(gw.gw.ca_cert_pem(), new.cert_pem);
    // The host is served by a leaf of the new root (the harness wrote the
    // new root to ca_file), not of the old one.
    assert_eq!(gw.curl("app.test", "/").run().await.status, 200);
    let old_file = gw.dir.path().join("old-ca.pem");
    std::fs::write(&old_file, &old.cert_pem).unwrap();
    let r = Curl::new("app.test", gw.https.port(), "/")
        .cacert(&old_file)
        .run()
        .await;
    assert_eq!(r.status, 0, "{r:?}");
    let leaf = leaf_signed_by(&new, "evil.com", gw.dir.path());
    assert!(!openssl_verify(&gw.ca_file, &leaf).0);
    gw.stop().await;
    // The next start keeps the (constrained) root and says nothing.
    let gw = GatewayBuilder::new()
        .store(store.clone())
        .route("app.test", app_route("app", app.addr, TlsMode::Internal))
        .start()
        .await;
    assert_eq!(gw.gw.ca_replaced(), None);
    assert_eq!(gw.gw.ca_cert_pem(), new.cert_pem);
    gw.stop().await;
    // Other suffixes in the configuration: a root for them.
    let gw = GatewayBuilder::new()
        .store(store.clone())
        .config(|c| c.internal_suffixes = vec![".corp".into()])
        .route("app.corp", app_route("app", app.addr, TlsMode::Internal))
        .start()
        .await;
    assert!(gw.gw.ca_replaced().is_some());
    assert_eq!(gw.curl("app.corp", "/").run().await.status, 200);
    let ca = store.ca.lock().unwrap().clone().unwrap();
    let leaf = leaf_signed_by(&ca, "app.test", gw.dir.path());
    assert!(!openssl_verify(&gw.ca_file, &leaf).0);
    gw.stop().await;
}
