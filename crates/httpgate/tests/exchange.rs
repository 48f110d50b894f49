//! Bodiless requests (GET, HEAD) against an upstream that answers with
//! hand-written bytes: chunked bodies with extensions and trailers, 103
//! Early Hints, bodies delimited by the connection's close, idle
//! connections closed by the upstream, and malformed responses. A framework
//! server would not produce these shapes on demand, so the upstream here is
//! a plain TCP server written for the test (real sockets, real curl).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use httpgate::TlsMode;
use testsupport::{require, Component};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

struct Scripted {
    addr: std::net::SocketAddr,
    accepted: Arc<AtomicUsize>,
    heads: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What the upstream does after answering.
enum After {
    KeepOpen,
    Close,
    CloseSoon,
    /// A whole second response, unasked, 30 ms later (a broken upstream).
    Stray,
}

fn answer(path: &str) -> (Vec<u8>, After) {
    if path == "/big-head" {
        // A 40 KiB response head (long cookies), more than the request limit.
        let cookie = "c".repeat(40 * 1024);
        let head =
            format!("HTTP/1.1 200 OK\r\nSet-Cookie: a={cookie}\r\nContent-Length: 3\r\n\r\nbig");
        return (head.into_bytes(), After::KeepOpen);
    }
    let (bytes, after): (&[u8], After) = match path {
        "/len" => (
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\nhello",
            After::KeepOpen,
        ),
        "/chunked" => (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n",
            After::KeepOpen,
        ),
        "/hints" => (
            b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            After::KeepOpen,
        ),
        "/until-close" => (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nread until close",
            After::Close,
        ),
        "/once" => (
            b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nonce",
            After::CloseSoon,
        ),
        "/conflicting-length" => (
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            After::Close,
        ),
        "/bad-chunk" => (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n",
            After::KeepOpen,
        ),
        "/garbage" => (b"this is not HTTP\r\n\r\n", After::Close),
        "/bare-lf" => (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\n0\n\n",
            After::KeepOpen,
        ),
        "/http10-chunked" => (
            b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            After::Close,
        ),
        "/stray" => (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst", After::Stray),
        _ => (
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
            After::KeepOpen,
        ),
    };
    (bytes.to_vec(), after)
}

impl Scripted {
    async fn start() -> Self {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let (count, log) = (accepted.clone(), heads.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                count.fetch_add(1, Ordering::SeqCst);
                let log = log.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                            let mut chunk = [0u8; 4096];
                            match s.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                            continue;
                        };
                        let head = String::from_utf8_lossy(&buf[..end]).to_string();
                        buf.drain(..end + 4);
                        let path = head.split(' ').nth(1).unwrap_or("/").to_owned();
                        let head_request = head.starts_with("HEAD ");
                        log.lock().unwrap().push(head);
                        let (bytes, after) = answer(&path);
                        let bytes: &[u8] = match head_request {
                            // The head only (the body follows the blank line).
                            true => {
                                let e = bytes.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
                                &bytes[..e + 4]
                            }
                            false => &bytes,
                        };
                        if s.write_all(bytes).await.is_err() {
                            return;
                        }
                        match after {
                            After::KeepOpen => {}
                            After::Close => return,
                            After::CloseSoon => {
                                tokio::time::sleep(Duration::from_millis(50)).await;
                                return;
                            }
                            After::Stray => {
                                tokio::time::sleep(Duration::from_millis(30)).await;
                                let stray = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstray";
                                if s.write_all(stray).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        Self {
            addr,
            accepted,
            heads,
            task,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// One curl process fetching `paths` in order over one connection (HTTP/1.1,
/// `gap` apart); stdout holds each body followed by `|STATUS` and a newline.
async fn fetch(
    gw: &Gateway,
    paths: &[&str],
    gap: Option<&str>,
    extra: &[&str],
) -> (bool, String, String) {
    let port = gw.https.port();
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--http1.1", "--max-time", "20", "--resolve"])
        .arg(format!("app.test:{port}:127.0.0.1"))
        .arg("--cacert")
        .arg(&gw.ca_file)
        .args(["-w", "|%{http_code}\\n"])
        .args(extra);
    if let Some(rate) = gap {
        cmd.args(["--rate", rate]);
    }
    for p in paths {
        cmd.arg(format!("https://app.test:{port}{p}"));
    }
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

async fn gateway(up: &Scripted) -> Gateway {
    GatewayBuilder::new()
        .route("app.test", app_route("app", up.addr, TlsMode::Internal))
        .start()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framed_bodies_are_relayed_on_one_upstream_connection() {
    if !require(&[Component::Program("curl")]) {
        return;
    }
    let up = Scripted::start().await;
    let gw = gateway(&up).await;
    let (ok, out, err) = fetch(&gw, &["/chunked", "/len", "/hints", "/chunked"], None, &[]).await;
    assert!(ok, "{err}");
    assert_eq!(out, "hello world|200\nhello|200\nok|200\nhello world|200\n");
    assert_eq!(up.accepted(), 1, "one upstream connection for all four");
    let heads = up.heads.lock().unwrap().clone();
    assert!(
        heads[0].starts_with("GET /chunked HTTP/1.1\r\n"),
        "{heads:?}"
    );
    assert!(heads[0].contains("x-forwarded-for: 127.0.0.1"), "{heads:?}");
    assert!(heads[0].contains("host: app.test"), "{heads:?}");

    // HEAD: the upstream's head only, with its Content-Length, and the
    // connection stays usable.
    let (ok, out, err) = fetch(&gw, &["/len", "/len"], None, &["-I"]).await;
    assert!(ok, "{err}");
    assert!(
        out.to_ascii_lowercase().contains("content-length: 5"),
        "{out}"
    );
    assert!(!out.contains("hello"), "{out}");
    // A new client connection (this second curl) takes the idle upstream
    // connection the first one left.
    assert_eq!(up.accepted(), 1);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closes_by_the_upstream_cost_no_request() {
    if !require(&[Component::Program("curl")]) {
        return;
    }
    let up = Scripted::start().await;
    let gw = gateway(&up).await;
    // A body delimited by the close: relayed whole; the next request opens
    // a new upstream connection.
    let (ok, out, err) = fetch(&gw, &["/until-close", "/len"], None, &[]).await;
    assert!(ok, "{err}");
    assert_eq!(out, "read until close|200\nhello|200\n");
    assert_eq!(up.accepted(), 2);
    // The upstream closes its idle connection after each answer (as a
    // keep-alive timeout would): each next request still gets its answer.
    // The first takes the connection the previous client left idle.
    let (ok, out, err) = fetch(&gw, &["/once", "/once", "/once"], Some("5/s"), &[]).await;
    assert!(ok, "{err}");
    assert_eq!(out, "once|200\nonce|200\nonce|200\n");
    assert_eq!(up.accepted(), 4);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_responses_are_the_upstreams_fault() {
    if !require(&[Component::Program("curl")]) {
        return;
    }
    let up = Scripted::start().await;
    let gw = gateway(&up).await;
    for path in ["/conflicting-length", "/garbage", "/http10-chunked"] {
        let r = gw.curl("app.test", path).arg("--http1.1").run().await;
        assert_eq!(r.status, 502, "{path}: {r:?}");
        assert!(
            r.body.contains("app sent a malformed response"),
            "{path}: {}",
            r.body
        );
    }
    // A broken chunk once the head is relayed: the client's response is cut
    // short (not passed off as complete), and the gateway serves on.
    for path in ["/bad-chunk", "/bare-lf"] {
        let (ok, _, err) = fetch(&gw, &[path], None, &[]).await;
        assert!(!ok, "{path}: a broken body must fail the transfer: {err}");
    }
    let (ok, out, err) = fetch(&gw, &["/len"], None, &[]).await;
    assert!(ok, "{err}");
    assert_eq!(out, "hello|200\n");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_after_a_response_never_answer_the_next_request() {
    if !require(&[Component::Program("curl")]) {
        return;
    }
    let up = Scripted::start().await;
    let gw = gateway(&up).await;
    // The upstream sends a second, unasked response on the idle connection:
    // the next request gets its own answer on a new connection, never the
    // stray one.
    let (ok, out, err) = fetch(&gw, &["/stray", "/len", "/len"], Some("4/s"), &[]).await;
    assert!(ok, "{err}");
    assert_eq!(out, "first|200\nhello|200\nhello|200\n");
    assert_eq!(up.accepted(), 2);
    // A response head longer than the client request-head limit is relayed.
    let (ok, out, err) = fetch(&gw, &["/big-head"], None, &["-D", "-"]).await;
    assert!(ok, "{err}");
    assert!(
        out.contains("200") && out.ends_with("big|200\n"),
        "{}",
        &out[..200.min(out.len())]
    );
    gw.stop().await;
}
