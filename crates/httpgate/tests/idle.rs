//! Idle client connections, with real clients: an HTTP/2 client (hyper's,
//! over rustls, trusting the gateway's CA) and a raw HTTP/1.1 client over TLS.
//! A connection with no open request is closed after the idle timeout
//! (HTTP/2 with a GOAWAY); one with a long request open is not; and an HTTP/2
//! peer that stops answering PINGs is cut off while its stream is open.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Empty};
use httpgate::TlsMode;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

const HOST: &str = "idle.test";

/// A gateway with one internal-CA route and the given idle and PING settings.
async fn gateway(idle: Duration, ping: Duration, ping_timeout: Duration) -> (Gateway, Upstream) {
    init_tracing();
    let app = Upstream::start("app").await;
    let gw = GatewayBuilder::new()
        .config(|c| {
            c.timeouts.idle = idle;
            c.timeouts.h2_ping_interval = ping;
            c.timeouts.h2_ping_timeout = ping_timeout;
        })
        .route(HOST, app_route("idle", app.addr, TlsMode::Internal))
        .start()
        .await;
    (gw, app)
}

/// The outcome of an HTTP/2 client connection: when it ended, and how.
type ConnEnd = JoinHandle<(Instant, Result<(), String>)>;

/// An HTTP/2 client connection (ALPN h2) to `addr` for `HOST`, trusting `ca`.
async fn h2_client(addr: SocketAddr, ca: &Path) -> (SendRequest<Empty<Bytes>>, ConnEnd) {
    httpgate::install_crypto_provider();
    let pem = std::fs::read(ca).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut &pem[..]) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(HOST.to_owned()).unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    let end = tokio::spawn(async move {
        let r = conn.await.map_err(|e| e.to_string());
        (Instant::now(), r)
    });
    (send, end)
}

async fn get(send: &mut SendRequest<Empty<Bytes>>, path: &str) -> (u16, String) {
    send.ready().await.unwrap();
    let req = hyper::Request::get(format!("https://{HOST}{path}"))
        .body(Empty::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_idle_connection_gets_goaway_and_close() {
    let idle = Duration::from_secs(1);
    let (gw, _app) = gateway(idle, Duration::from_secs(30), Duration::from_secs(20)).await;
    let (mut send, end) = h2_client(gw.https, &gw.ca_file).await;
    let (status, _) = get(&mut send, "/").await;
    assert_eq!(status, 200);
    let last = Instant::now();
    let (closed, res) = tokio::time::timeout(Duration::from_secs(10), end)
        .await
        .expect("idle HTTP/2 connection was not closed")
        .unwrap();
    let after = closed - last;
    eprintln!("HTTP/2 connection closed {after:?} after its last response: {res:?}");
    // A graceful end (GOAWAY, then close), not a reset, and not before the timeout.
    assert!(res.is_ok(), "{res:?}");
    assert!(after >= idle - Duration::from_millis(100), "{after:?}");
    assert!(after < idle + Duration::from_secs(3), "{after:?}");
    assert!(send.is_closed());
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_open_stream_keeps_the_connection() {
    let idle = Duration::from_secs(1);
    let (gw, _app) = gateway(idle, Duration::from_secs(30), Duration::from_secs(20)).await;
    let (mut send, end) = h2_client(gw.https, &gw.ca_file).await;
    // One stream open for three idle periods: answered on the same connection.
    let t = Instant::now();
    let (status, body) = get(&mut send, "/sleep/3000").await;
    assert_eq!((status, body.as_str()), (200, "slept"));
    assert!(t.elapsed() >= Duration::from_secs(3));
    assert!(!end.is_finished(), "closed while a stream was open");
    // Still usable right after.
    let (status, _) = get(&mut send, "/").await;
    assert_eq!(status, 200);
    // And closed once idle.
    let (_, res) = tokio::time::timeout(Duration::from_secs(10), end)
        .await
        .expect("not closed once idle")
        .unwrap();
    assert!(res.is_ok(), "{res:?}");
    gw.stop().await;
}

/// A TCP relay between one client and `to` that can be frozen: frozen, it
/// drops bytes both ways (a dead peer), yet reads the server side to notice
/// when the server closes. Returns the relay's address, the freeze switch and
/// a receiver of the moment the server closed.
async fn freezable_relay(
    to: SocketAddr,
) -> (
    SocketAddr,
    Arc<AtomicBool>,
    tokio::sync::oneshot::Receiver<Instant>,
) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let frozen = Arc::new(AtomicBool::new(false));
    let (tx, rx) = tokio::sync::oneshot::channel();
    let f = frozen.clone();
    tokio::spawn(async move {
        let (client, _) = l.accept().await.unwrap();
        let server = TcpStream::connect(to).await.unwrap();
        let (mut cr, mut cw) = client.into_split();
        let (mut sr, mut sw) = server.into_split();
        let f2 = f.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 16384];
            while let Ok(n) = cr.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                if !f2.load(Ordering::SeqCst) && sw.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
        let mut buf = vec![0u8; 16384];
        loop {
            match sr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if !f.load(Ordering::SeqCst) {
                        let _ = cw.write_all(&buf[..n]).await;
                    }
                }
            }
        }
        let _ = tx.send(Instant::now());
    });
    (addr, frozen, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_dead_peer_is_cut_off_by_pings() {
    // The idle timeout is long: only the PINGs can close this connection.
    let ping = Duration::from_millis(300);
    let ping_timeout = Duration::from_millis(700);
    let (gw, _app) = gateway(Duration::from_secs(60), ping, ping_timeout).await;
    let (relay, frozen, server_closed) = freezable_relay(gw.https).await;
    let (mut send, _end) = h2_client(relay, &gw.ca_file).await;
    let (status, _) = get(&mut send, "/").await;
    assert_eq!(status, 200);
    // A live client answers PINGs: still open after several intervals.
    tokio::time::sleep(ping * 4).await;
    let (status, _) = get(&mut send, "/").await;
    assert_eq!(status, 200, "a live peer was cut off");
    // A stream stays open (upstream answers in 10 s) while the peer goes silent.
    send.ready().await.unwrap();
    let pending = send.send_request(
        hyper::Request::get(format!("https://{HOST}/sleep/10000"))
            .body(Empty::new())
            .unwrap(),
    );
    let pending = tokio::spawn(pending);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = Instant::now();
    frozen.store(true, Ordering::SeqCst);
    let closed = tokio::time::timeout(Duration::from_secs(8), server_closed)
        .await
        .expect("a silent peer kept its connection")
        .unwrap();
    let after = closed - t;
    eprintln!("silent HTTP/2 peer cut off after {after:?}");
    assert!(after < Duration::from_secs(5), "{after:?}");
    pending.abort();
    gw.stop().await;
}

/// Send an HTTP/1.1 request over TLS, read the response, then return how long
/// the server kept the connection open afterwards (bounded by `max`).
async fn h1_request_then_time_to_close(
    gw: &Gateway,
    path: &str,
    max: Duration,
) -> (String, Duration) {
    let mut s = tls_connect(gw.https, HOST, &gw.ca_file).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n");
    let head = raw_exchange(&mut s, req.as_bytes(), 10).await;
    let t = Instant::now();
    let mut buf = [0u8; 4096];
    let mut rest = Vec::new();
    loop {
        match tokio::time::timeout(max, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => rest.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
    }
    let _ = rest;
    (head, t.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h1_keep_alive_honours_the_same_idle_timeout() {
    // The header-read timeout (15 s by default) is longer: the idle timeout closes it.
    let idle = Duration::from_secs(1);
    let (gw, _app) = gateway(idle, Duration::from_secs(30), Duration::from_secs(20)).await;
    let (head, open_for) = h1_request_then_time_to_close(&gw, "/", Duration::from_secs(10)).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    eprintln!("HTTP/1.1 keep-alive connection closed after {open_for:?}");
    assert!(
        open_for >= idle - Duration::from_millis(300),
        "{open_for:?}"
    );
    assert!(open_for < idle + Duration::from_secs(3), "{open_for:?}");
    // A request open for longer than the idle timeout is answered.
    let t = Instant::now();
    let (head, _) =
        h1_request_then_time_to_close(&gw, "/sleep/2500", Duration::from_secs(10)).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(t.elapsed() >= Duration::from_millis(2500));
    gw.stop().await;
}
