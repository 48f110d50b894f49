//! The proxy with internal-CA certificates, driven by curl, raw TLS clients
//! and a python websocket client against real upstream servers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use httpgate::{BasicAuth, Target, TlsMode};
use testsupport::{require, Component};

fn auth() -> BasicAuth {
    BasicAuth {
        user: "alice".into(),
        password_hash: argon2_hash("correct horse"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_app_and_agent_with_internal_certs() {
    if !require(&[Component::Program("curl")]) {
        return;
    }
    init_tracing();
    let app = Upstream::start("app").await;
    let agent = Upstream::start("agent").await;
    let other = Upstream::start("other").await;
    let bcrypt_auth = BasicAuth {
        user: "bob".into(),
        password_hash: bcrypt::hash("pw-bob", 4).unwrap(),
    };
    let gw = GatewayBuilder::new()
        .route(
            "app.test",
            app_route("app-test", app.addr, TlsMode::Internal),
        )
        .route(
            "shelley.app.test",
            agent_route("app-test", agent.addr, TlsMode::Internal, auth()),
        )
        .route(
            "other.test",
            app_route("other-test", other.addr, TlsMode::Internal),
        )
        .route(
            "shelley.other.test",
            agent_route("other-test", other.addr, TlsMode::Internal, bcrypt_auth),
        )
        .start()
        .await;

    // The app host reaches the app port, over a certificate from the internal CA.
    let r = gw
        .curl("app.test", "/hello?x=1")
        .arg("--http1.1")
        .header("X-Forwarded-For: 6.6.6.6")
        .header("Connection: X-Secret")
        .header("X-Secret: hop")
        .run()
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    let j: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(j["upstream"], "app");
    assert_eq!(j["uri"], "/hello?x=1");
    let h = &j["headers"];
    assert_eq!(h["x-forwarded-for"], "127.0.0.1", "client XFF replaced");
    assert_eq!(h["x-forwarded-proto"], "https");
    // The routed host (the public port is 443 here), not the client's.
    assert_eq!(h["x-forwarded-host"], "app.test");
    assert_eq!(h["host"], "app.test");
    assert!(
        h.get("x-secret").is_none(),
        "header named in Connection dropped: {h}"
    );

    // HTTP/2 and HTTP/1.1 from clients.
    let r2 = gw.curl("app.test", "/").arg("--http2").run().await;
    assert_eq!((r2.status, r2.version.as_str()), (200, "2"), "{r2:?}");
    let j: serde_json::Value = serde_json::from_str(&r2.body).unwrap();
    assert_eq!(j["headers"]["host"], "app.test");
    let r1 = gw.curl("app.test", "/").arg("--http1.1").run().await;
    assert_eq!((r1.status, r1.version.as_str()), (200, "1.1"));

    // The agent host: basic auth, then the agent port; the password is not forwarded.
    let missing = gw.curl("shelley.app.test", "/").run().await;
    assert_eq!(missing.status, 401);
    assert!(missing
        .header("www-authenticate")
        .unwrap()
        .starts_with("Basic realm="));
    let wrong = gw
        .curl("shelley.app.test", "/")
        .user("alice:wrong")
        .run()
        .await;
    assert_eq!(wrong.status, 401);
    let unknown = gw
        .curl("shelley.app.test", "/")
        .user("mallory:correct horse")
        .run()
        .await;
    assert_eq!(unknown.status, 401);
    for _ in 0..2 {
        let ok = gw
            .curl("shelley.app.test", "/ui")
            .user("alice:correct horse")
            .run()
            .await;
        assert_eq!(ok.status, 200, "{ok:?}");
        let j: serde_json::Value = serde_json::from_str(&ok.body).unwrap();
        assert_eq!(j["upstream"], "agent");
        assert!(j["headers"].get("authorization").is_none());
    }
    // bcrypt hashes work too.
    let b = gw
        .curl("shelley.other.test", "/")
        .user("bob:pw-bob")
        .run()
        .await;
    assert_eq!(b.status, 200);
    let b = gw
        .curl("shelley.other.test", "/")
        .user("bob:nope")
        .run()
        .await;
    assert_eq!(b.status, 401);

    // Unknown SNI: the handshake is refused.
    let r = gw.curl("nope.test", "/").run().await;
    assert!(!r.ok && r.status == 0, "{r:?}");
    // Known SNI, unknown Host: 404.
    let r = gw
        .curl("app.test", "/")
        .header("Host: nope.test")
        .run()
        .await;
    assert_eq!(r.status, 404);
    // SNI of one sandbox, Host of another: 421.
    let r = gw
        .curl("app.test", "/")
        .header("Host: other.test")
        .run()
        .await;
    assert_eq!(r.status, 421);
    // SNI and Host of the same sandbox (shared certificate): allowed.
    let r = gw
        .curl("app.test", "/")
        .header("Host: shelley.app.test")
        .user("alice:correct horse")
        .run()
        .await;
    assert_eq!(r.status, 200);

    // Certificate status.
    let certs = gw.gw.certs();
    let c = certs.iter().find(|c| c.domain == "app.test").unwrap();
    assert_eq!(c.mode, httpgate::CertMode::Internal);
    assert_eq!(c.names, vec!["app.test", "shelley.app.test"]);
    assert!(c
        .issuer
        .as_deref()
        .unwrap()
        .contains("sandboxd internal CA"));
    assert!(c.next_renewal.unwrap() < c.not_after.unwrap());
    // Forced renewal of an internal certificate works and keeps serving.
    gw.gw.renew("app.test").await.unwrap();
    assert_eq!(gw.curl("app.test", "/").run().await.status, 200);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusted_proxy_headers_are_kept() {
    if !require(&[Component::Program("curl")]) {
        return;
    }
    let (_app, gw) = app_gateway(|c| c.trusted_proxies = vec!["127.0.0.1".parse().unwrap()]).await;
    let r = gw
        .curl("app.test", "/")
        .header("X-Forwarded-For: 6.6.6.6")
        .header("X-Forwarded-Proto: http")
        .run()
        .await;
    let j: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(j["headers"]["x-forwarded-for"], "6.6.6.6, 127.0.0.1");
    assert_eq!(j["headers"]["x-forwarded-proto"], "http");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_listener_redirects_keeping_path_and_query() {
    if !require(&[Component::Program("curl")]) {
        return;
    }
    let app = Upstream::start("app").await;
    let gw = GatewayBuilder::new()
        .with_http("127.0.0.1:0")
        .route("app.test", app_route("app", app.addr, TlsMode::Internal))
        .start()
        .await;
    let port = gw.http.unwrap().port();
    let r = Curl::http("app.test", port, "/a/b?x=1&y=2").run().await;
    assert_eq!(r.status, 301);
    assert_eq!(
        r.header("location").unwrap(),
        "https://app.test/a/b?x=1&y=2"
    );
    let r = Curl::http("nope.test", port, "/").run().await;
    assert_eq!(r.status, 404);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_errors_name_the_sandbox() {
    if !require(&[Component::Program("curl")]) {
        return;
    }
    let slow = Upstream::start("slow").await;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let gw = GatewayBuilder::new()
        .config(|c| c.timeouts.upstream_response = Duration::from_secs(1))
        .route(
            "down.test",
            app_route("down-sbx", closed, TlsMode::Internal),
        )
        .route(
            "slow.test",
            app_route("slow-sbx", slow.addr, TlsMode::Internal),
        )
        .route(
            "stopped.test",
            httpgate::Route {
                target: Target::Stopped,
                ..app_route("stopped-sbx", closed, TlsMode::Internal)
            },
        )
        .route(
            "gone.test",
            httpgate::Route {
                target: Target::Unavailable {
                    reason: "no address yet".into(),
                },
                ..app_route("gone-sbx", closed, TlsMode::Internal)
            },
        )
        .start()
        .await;
    let r = gw.curl("down.test", "/").run().await;
    assert_eq!(r.status, 502);
    assert!(
        r.body.contains("down-sbx") && r.body.contains("connection refused"),
        "{}",
        r.body
    );
    let r = gw.curl("stopped.test", "/").run().await;
    assert_eq!(r.status, 502);
    assert!(r.body.contains("stopped-sbx is stopped"), "{}", r.body);
    let r = gw.curl("gone.test", "/").run().await;
    assert_eq!(r.status, 502);
    assert!(r.body.contains("no address yet"));
    let t = Instant::now();
    let r = gw.curl("slow.test", "/slow").run().await;
    assert_eq!(r.status, 504);
    assert!(r.body.contains("slow-sbx"));
    assert!(t.elapsed() < Duration::from_secs(5));
    // The upstream being slow for one request does not stop the next.
    assert_eq!(gw.curl("slow.test", "/").run().await.status, 200);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_survives_a_route_edit() {
    if !require(&[Component::Program("curl"), Component::PyWebsockets]) {
        return;
    }
    let (_ws, ws_addr) = ws_echo_server().await;
    let other = Upstream::start("other").await;
    let gw = GatewayBuilder::new()
        .route("app.test", app_route("app", ws_addr, TlsMode::Internal))
        .start()
        .await;
    let script = r#"
import asyncio, socket, ssl, sys, websockets
async def main():
    ctx = ssl.create_default_context(cafile=sys.argv[2])
    sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
    async with websockets.connect("wss://app.test:%s/chat" % sys.argv[1], ssl=ctx, sock=sock, server_hostname="app.test") as ws:
        await ws.send("one")
        print("first " + await ws.recv(), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        await ws.send("two")
        print("second " + await ws.recv(), flush=True)
asyncio.run(main())
"#;
    let mut child = Proc(
        Command::new("/usr/bin/python3")
            .arg("-c")
            .arg(script)
            .arg(gw.https.port().to_string())
            .arg(&gw.ca_file)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stdout = child.0.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let first = tokio::task::spawn_blocking(move || {
        let l = lines.next().unwrap().unwrap();
        (l, lines)
    })
    .await
    .unwrap();
    assert_eq!(first.0, "first one");
    let mut lines = first.1;

    // Route edit: the host now points elsewhere (and a new host appears).
    gw.routes
        .set("app.test", app_route("app", other.addr, TlsMode::Internal));
    gw.routes
        .set("new.test", app_route("new", other.addr, TlsMode::Internal));
    gw.gw.routes_changed().await;
    let r = gw.curl("app.test", "/").run().await;
    let j: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(j["upstream"], "other", "new requests follow the edit");
    assert_eq!(gw.curl("new.test", "/").run().await.status, 200);

    // The open websocket still echoes.
    let mut stdin = child.0.stdin.take().unwrap();
    stdin.write_all(b"go\n").unwrap();
    stdin.flush().unwrap();
    let second = tokio::task::spawn_blocking(move || lines.next().unwrap().unwrap())
        .await
        .unwrap();
    assert_eq!(second, "second two");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_attempts_get_400() {
    let (_app, gw) = app_gateway(|_| {}).await;
    let cases: [(&str, &[u8]); 6] = [
        ("CL then TE", b"POST /upload HTTP/1.1\r\nHost: app.test\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /x HTTP/1.1\r\nHost: app.test\r\n\r\n"),
        ("TE then CL", b"POST /upload HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n"),
        ("duplicate CL, different", b"POST /upload HTTP/1.1\r\nHost: app.test\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nabcde"),
        ("duplicate CL, same", b"POST /upload HTTP/1.1\r\nHost: app.test\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc"),
        ("obs-fold", b"GET / HTTP/1.1\r\nHost: app.test\r\nX-A: a\r\n  folded\r\n\r\n"),
        ("bad chunk size", b"POST /upload HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"),
    ];
    for (name, req) in cases {
        let mut s = tls_connect(gw.https, "app.test", &gw.ca_file)
            .await
            .unwrap();
        let resp = raw_exchange(&mut s, req, 5).await;
        assert!(resp.starts_with("HTTP/1.1 400"), "{name}: {resp:?}");
    }
    // A clean request on a fresh connection still works, and so does a
    // keep-alive sequence with a chunked body before it.
    let mut s = tls_connect(gw.https, "app.test", &gw.ca_file)
        .await
        .unwrap();
    let resp = raw_exchange(
        &mut s,
        b"POST /upload HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        5,
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp:?}");
    gw.stop().await;
}

/// Sends a request head one header line every 300 ms (12 s at most);
/// true once the gateway closes the connection or answers.
async fn trickle_is_cut_off<S>(s: &mut S) -> bool
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if s.write_all(b"GET / HTTP/1.1\r\nHost: app.test\r\n")
        .await
        .is_err()
    {
        return true;
    }
    let mut buf = [0u8; 1024];
    for i in 0..40 {
        if s.write_all(format!("X-{i}: y\r\n").as_bytes())
            .await
            .is_err()
        {
            return true;
        }
        if let Ok(Ok(_) | Err(_)) =
            tokio::time::timeout(Duration::from_millis(300), s.read(&mut buf)).await
        {
            return true;
        }
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_oversized_headers_are_cut_off() {
    if !require(&[Component::Program("curl")]) {
        return;
    }
    let app = Upstream::start("app").await;
    let gw = GatewayBuilder::new()
        .config(|c| {
            c.timeouts.header_read = Duration::from_secs(1);
            c.limits.max_header_bytes = 16 * 1024;
        })
        .route("app.test", app_route("app", app.addr, TlsMode::Internal))
        .start()
        .await;
    // Trickling headers: one line every 300 ms, forever; on a new
    // connection, and on one that has just finished an exchange.
    let mut s = tls_connect(gw.https, "app.test", &gw.ca_file)
        .await
        .unwrap();
    let t = Instant::now();
    assert!(
        trickle_is_cut_off(&mut s).await,
        "trickling client was never cut off"
    );
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    let mut s = tls_connect(gw.https, "app.test", &gw.ca_file)
        .await
        .unwrap();
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        s.write_all(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..n]);
    }
    let t = Instant::now();
    assert!(
        trickle_is_cut_off(&mut s).await,
        "trickling after an exchange was never cut off"
    );
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());

    // Oversized headers: 431 (hyper) and nothing reaches the upstream.
    let big = format!("X-Big: {}", "a".repeat(32 * 1024));
    let r = gw
        .curl("app.test", "/")
        .arg("--http1.1")
        .header(&big)
        .run()
        .await;
    assert_eq!(r.status, 431, "{r:?}");
    let r = gw
        .curl("app.test", "/")
        .arg("--http2")
        .header(&big)
        .run()
        .await;
    assert!(r.status != 200, "{r:?}");
    assert_eq!(gw.curl("app.test", "/").run().await.status, 200);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_handshakes_do_not_block_others() {
    if !require(&[Component::Program("curl")]) {
        return;
    }
    let (_app, gw) = app_gateway(|c| c.timeouts.handshake = Duration::from_secs(30)).await;
    let mut idle = Vec::new();
    for i in 0..1000 {
        let mut s = tokio::net::TcpStream::connect(gw.https).await.unwrap();
        if i % 2 == 0 {
            // Half send the start of a TLS record and stop.
            use tokio::io::AsyncWriteExt;
            s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
                .await
                .unwrap();
        }
        idle.push(s);
    }
    // From another address: 127.0.0.1 is at its per-source cap (256 held,
    // the rest closed at accept; see tests/edge.rs).
    let t = Instant::now();
    let r = gw
        .curl("app.test", "/")
        .arg("--interface")
        .arg("127.0.0.2")
        .run()
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    drop(idle);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_thread_https_listeners_serve() {
    if !require(&[Component::Program("curl")]) {
        return;
    }
    let (_app, gw) = app_gateway(|_| {}).await;
    let (port, handles) = spawn_threads(&gw, 2);
    // One listening socket for both threads, without SO_REUSEPORT: another
    // socket cannot bind the port alongside and take a share of connections.
    let intruder =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    intruder.set_reuse_port(true).unwrap();
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let err = intruder.bind(&addr.into()).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse, "{err}");
    for _ in 0..4 {
        let r = Curl::new("app.test", port, "/")
            .cacert(&gw.ca_file)
            .run()
            .await;
        assert_eq!(r.status, 200, "{r:?}");
    }
    stop_with_threads(gw, handles).await;
}

/// One curl process sending `GET /` three times, half a second apart, over
/// one keep-alive connection.
async fn three_spaced_requests(gw: &Gateway) {
    let port = gw.https.port();
    let url = format!("https://app.test:{port}/");
    let out = gw
        .curl("app.test", "/")
        .arg("--http1.1")
        .arg("--rate")
        .arg("2/s")
        .arg("-o")
        .arg("/dev/null")
        .arg("-o")
        .arg("/dev/null")
        .arg(&url)
        .arg(&url)
        .run()
        .await;
    assert!(out.ok && out.status == 200, "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_upstream_connections_are_replaced() {
    if !require(&[Component::Program("curl")]) {
        return;
    }
    // Default pool idle timeout (60 s): the client's three requests share
    // one upstream connection.
    let (app, gw) = app_gateway(|_| {}).await;
    three_spaced_requests(&gw).await;
    assert_eq!(app.accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    gw.stop().await;

    // 200 ms: each request finds the previous upstream connection idle for
    // too long and opens a new one.
    let (app, gw) =
        app_gateway(|c| c.timeouts.upstream_pool_idle = Duration::from_millis(200)).await;
    three_spaced_requests(&gw).await;
    assert_eq!(app.accepted.load(std::sync::atomic::Ordering::SeqCst), 3);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_connections_share_idle_upstream_connections() {
    if !require(&[Component::Program("curl")]) {
        return;
    }
    use std::sync::atomic::Ordering::SeqCst;
    // Five curl processes one after another: five client connections, each
    // with its own TLS handshake, and one upstream connection, which the
    // gateway keeps for the next client connection.
    let (app, gw) =
        app_gateway(|c| c.timeouts.upstream_pool_idle = Duration::from_millis(1500)).await;
    for _ in 0..5 {
        let out = gw.curl("app.test", "/").arg("--http1.1").run().await;
        assert_eq!(out.status, 200, "{out:?}");
    }
    assert_eq!(app.accepted.load(SeqCst), 1);
    assert_eq!(app.closed.load(SeqCst), 0);
    // No request comes to find it idle for too long: the gateway closes it
    // by itself after the pool's idle timeout.
    let t0 = std::time::Instant::now();
    while app.closed.load(SeqCst) == 0 && t0.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        app.closed.load(SeqCst),
        1,
        "idle upstream connection never closed"
    );
    assert!(
        t0.elapsed() >= Duration::from_millis(500),
        "closed before its idle timeout"
    );
    gw.stop().await;
}

/// One HTTPS request with OpenSSL's client, which saves its TLS session to
/// `sess_out` and offers the one in `sess_in`: whether the handshake
/// resumed that session, and the response.
fn s_client_resumes(
    port: u16,
    ca: &std::path::Path,
    sess_in: Option<&std::path::Path>,
    sess_out: &std::path::Path,
) -> (bool, String) {
    let mut cmd = Command::new("openssl");
    cmd.args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .args(["-servername", "app.test", "-ign_eof", "-CAfile"])
        .arg(ca)
        .arg("-sess_out")
        .arg(sess_out);
    if let Some(p) = sess_in {
        cmd.arg("-sess_in").arg(p);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"GET / HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let reused = text.lines().any(|l| l.starts_with("Reused, TLSv1.3"));
    assert!(
        reused || text.lines().any(|l| l.starts_with("New, TLSv1.3")),
        "{text}"
    );
    (reused, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_sessions_resume_on_any_listener_and_thread() {
    if !require(&[Component::Program("openssl")]) {
        return;
    }
    // A client's next connection resumes its TLS session (no certificate,
    // no signature: a far cheaper handshake for both sides) whichever
    // listener or serving thread takes it.
    let (_app, gw) = app_gateway(|_| {}).await;
    let (threaded, handles) = spawn_threads(&gw, 2);
    let ca = gw.ca_file.clone();
    let https = gw.https.port();
    let dir = tempfile::tempdir().unwrap();
    tokio::task::spawn_blocking(move || {
        let sess = |i: usize| dir.path().join(format!("s{i}"));
        let (reused, first) = s_client_resumes(https, &ca, None, &sess(0));
        assert!(!reused);
        assert!(first.contains("HTTP/1.1 200"), "{first}");
        // The full handshake sends the leaf alone: the internal CA's root
        // is the client's trust anchor, not part of the chain.
        assert!(
            first.contains(" 0 s:CN = app.test") && !first.contains(" 1 s:"),
            "{first}"
        );
        // Alternate between the listener the session came from and the
        // other one (two serving threads behind it).
        for i in 1..8 {
            let port = if i % 2 == 0 { https } else { threaded };
            let (reused, out) = s_client_resumes(port, &ca, Some(&sess(i - 1)), &sess(i));
            assert!(
                reused,
                "connection {i} (port {port}) did not resume:\n{out}"
            );
            assert!(out.contains("HTTP/1.1 200"), "{out}");
        }
    })
    .await
    .unwrap();
    stop_with_threads(gw, handles).await;
}

/// Two serving threads of which only thread 0 listens on the returned
/// port: thread 1 listens elsewhere, so it serves only what thread 0 hands
/// it.
fn one_accepting_thread_of_two(gw: &Gateway) -> (u16, ThreadHandles) {
    let listener = |port: u16| {
        httpgate::bind_per_thread(([127, 0, 0, 1], port).into(), 1)
            .unwrap()
            .remove(0)
    };
    let port = free_port();
    let threads = [port, free_port()]
        .map(|p| httpgate::ThreadListeners {
            https: vec![listener(p)],
            http: Vec::new(),
        })
        .into();
    (port, gw.gw.spawn_threads(threads).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_one_thread_accepts_are_spread_over_the_serving_threads() {
    if !require(&[Component::Program("curl")]) {
        return;
    }
    // A thread that accepts every connection (here the only one listening
    // on the port; in the daemon, the one a burst of connections woke
    // first) hands some to the other thread, which serves them to the end.
    let (_app, gw) = app_gateway(|_| {}).await;
    let (port, handles) = one_accepting_thread_of_two(&gw);
    assert_eq!(gw.gw.open_connections(), vec![0, 0]);
    // Ten clients at once, each waiting 4 s for its response (time for all
    // ten processes to connect on a loaded machine).
    let clients: Vec<_> = (0..10)
        .map(|_| {
            let curl = Curl::new("app.test", port, "/sleep/4000").cacert(&gw.ca_file);
            tokio::spawn(curl.run())
        })
        .collect();
    let mut open = Vec::new();
    for _ in 0..300 {
        open = gw.gw.open_connections();
        if open.iter().sum::<usize>() == 10 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(open.iter().sum::<usize>(), 10, "{open:?}");
    assert!(open[0].abs_diff(open[1]) <= 2, "uneven: {open:?}");
    for c in clients {
        let r = c.await.unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.body, "slept");
    }
    // Connections that end are no longer counted.
    let mut open = Vec::new();
    for _ in 0..100 {
        open = gw.gw.open_connections();
        if open == [0, 0] {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(open, vec![0, 0]);
    stop_with_threads(gw, handles).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_limit_holds_over_all_serving_threads() {
    if !require(&[Component::Program("curl")]) {
        return;
    }
    // `max_connections` is per listening address, however many threads
    // accept on it: connections beyond it are closed at once.
    // (No per-source cap here: every connection comes from 127.0.0.1.)
    let (_app, gw) = app_gateway(|c| {
        c.limits.max_connections = 4;
        c.limits.max_connections_per_source = 0;
    })
    .await;
    let (port, handles) = spawn_threads(&gw, 2);
    let closed = tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let socks: Vec<std::net::TcpStream> = (0..6)
            .map(|_| {
                let s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
                s.set_read_timeout(Some(Duration::from_millis(700)))
                    .unwrap();
                s
            })
            .collect();
        // A closed connection reads end of file (or a reset); an open one
        // waits for the TLS handshake that never comes, until the timeout.
        let closed = socks
            .iter()
            .filter(|&s| {
                let mut s: &std::net::TcpStream = s;
                let mut b = [0u8; 1];
                match s.read(&mut b) {
                    Ok(0) => true,
                    Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
                    Ok(_) => false,
                }
            })
            .count();
        drop(socks);
        closed
    })
    .await
    .unwrap();
    assert_eq!(closed, 2, "6 connections against a limit of 4");
    // Once those end, new connections are served again.
    let mut r = None;
    for _ in 0..50 {
        let out = Curl::new("app.test", port, "/")
            .cacert(&gw.ca_file)
            .run()
            .await;
        if out.status == 200 {
            r = Some(out);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(r.is_some(), "no request served after the limit cleared");
    stop_with_threads(gw, handles).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handed_over_requests_finish_when_the_gateway_stops() {
    if !require(&[Component::Program("curl")]) {
        return;
    }
    // A thread serving only connections handed to it by another keeps
    // them through shutdown: their requests are answered within the grace
    // period, as those of the accepting thread are.
    let (app, gw) = app_gateway(|c| c.timeouts.shutdown_grace = Duration::from_secs(5)).await;
    let (port, handles) = one_accepting_thread_of_two(&gw);
    // With three connections, thread 0 keeps two and hands one over.
    let clients: Vec<_> = (0..3)
        .map(|_| {
            let curl = Curl::new("app.test", port, "/sleep/1500").cacert(&gw.ca_file);
            tokio::spawn(curl.run())
        })
        .collect();
    // All three requests have reached the upstream (one connection each).
    let t0 = Instant::now();
    while app.accepted.load(std::sync::atomic::Ordering::SeqCst) < 3 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "requests never arrived"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(gw.gw.open_connections(), vec![2, 1]);
    gw.gw.shutdown();
    for c in clients {
        let r = c.await.unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.body, "slept");
    }
    stop_with_threads(gw, handles).await;
}

/// `curl -I` over HTTP/2 (its default over TLS) gets the gate's own pages
/// (401 of an agent host, 502 of a stopped sandbox) as a head alone: a HEAD
/// response carries no content, and one that does makes the client reset
/// the stream and show a protocol error instead of the status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_requests_get_the_gates_own_pages_without_content() {
    if !require(&[Component::Program("curl")]) {
        return;
    }
    let app = Upstream::start("app").await;
    let auth = httpgate::BasicAuth {
        user: "alice".into(),
        password_hash: argon2_hash("pw"),
    };
    let gw = GatewayBuilder::new()
        .route(
            "shelley.app.test",
            agent_route("app", app.addr, TlsMode::Internal, auth),
        )
        .route(
            "stopped.test",
            httpgate::Route {
                target: Target::Stopped,
                ..app_route("stopped-sbx", app.addr, TlsMode::Internal)
            },
        )
        .start()
        .await;
    for (host, status) in [("shelley.app.test", 401), ("stopped.test", 502)] {
        for v in ["--http2", "--http1.1"] {
            let r = gw.curl(host, "/").arg(v).arg("--head").run().await;
            assert!(r.ok, "{host} {v}: {r:?}");
            assert_eq!(r.status, status, "{host} {v}: {r:?}");
            assert!(!r.body.contains("<html"), "{host} {v}: {r:?}");
            assert!(r.header("content-length").is_some(), "{host} {v}: {r:?}");
        }
    }
    gw.stop().await;
}
