//! The agent host's defences: fail closed without a login, no ambient
//! authority for other sites' pages (checked with a real headless
//! Chromium), backoff of online guessing, and revocation of open tunnels.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::convert::Infallible;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use testsupport::{require, Component};

use base64::Engine;
use bytes::Bytes;
use common::*;
use http_body_util::Full;
use httpgate::{Access, BasicAuth, Route, TlsMode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use testsupport::ws::WsClient;
use tokio::net::TcpListener;

fn login(user: &str, password: &str) -> BasicAuth {
    BasicAuth {
        user: user.into(),
        password_hash: argon2_hash(password),
    }
}

/// A websocket client through the gateway to `host` with basic-auth
/// credentials `user:pw` (see `testsupport::ws::WsClient`); bounded: a
/// client left open ends after 30 s (then prints nothing).
fn ws_client(gw: &Gateway, host: &str, user_pw: &str) -> WsClient {
    WsClient::start(gw.https.port(), &gw.ca_file, host, user_pw, 30)
}

/// The client's next line, read off the async threads.
async fn next_line(mut client: WsClient) -> (String, WsClient) {
    tokio::task::spawn_blocking(move || (client.line(), client))
        .await
        .unwrap()
}

/// Whether the client's connection is still open, asked off the async threads.
async fn ask_state(mut client: WsClient) -> (String, WsClient) {
    tokio::task::spawn_blocking(move || (client.state(), client))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_host_without_login_never_reaches_its_upstream() {
    if !require(&[Component::Program("curl")]) {
        return;
    }
    let agent = Upstream::start("agent").await;
    let gw = GatewayBuilder::new()
        .route(
            "shelley.app.test",
            closed_agent_route("app", agent.addr, TlsMode::Internal),
        )
        .route(
            // An agent route marked open is closed all the same.
            "shelley.open.test",
            Route {
                access: Access::Open,
                ..closed_agent_route("open", agent.addr, TlsMode::Internal)
            },
        )
        .start()
        .await;
    for host in ["shelley.app.test", "shelley.open.test"] {
        let r = gw.curl(host, "/").run().await;
        assert_eq!(r.status, 401, "{r:?}");
        assert!(r.body.contains("no login set"), "{}", r.body);
        assert!(r.body.contains("sandboxd auth"), "{}", r.body);
        assert_eq!(r.header("www-authenticate"), None);
        for extra in [
            vec!["-u", "alice:anything"],
            vec!["-X", "POST", "--data", "x"],
            vec![
                "--http1.1",
                "-H",
                "Connection: Upgrade",
                "-H",
                "Upgrade: websocket",
            ],
            vec!["--http2"],
        ] {
            let mut c = gw.curl(host, "/x");
            for a in extra {
                c = c.arg(a);
            }
            let r = c.run().await;
            assert_eq!(r.status, 401, "{r:?}");
        }
    }
    assert_eq!(
        agent.accepted.load(Ordering::SeqCst),
        0,
        "a closed agent host opened an upstream connection"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsafe_cross_origin_requests_to_the_agent_are_refused() {
    if !require(&[Component::Program("curl")]) {
        return;
    }
    let agent = Upstream::start("agent").await;
    let app = Upstream::start("app").await;
    let gw = GatewayBuilder::new()
        .route("app.test", app_route("app", app.addr, TlsMode::Internal))
        .route(
            "shelley.app.test",
            agent_route("app", agent.addr, TlsMode::Internal, login("alice", "pw")),
        )
        .start()
        .await;
    let port = gw.https.port();
    let own = format!("Origin: https://shelley.app.test:{port}");
    let cases: [(&[&str], u16); 9] = [
        (&["-X", "POST"], 200),
        (&["-X", "POST", "-H", &own], 200),
        (&["-X", "DELETE", "-H", "Sec-Fetch-Site: same-origin"], 200),
        (
            &[
                "-H",
                "Origin: https://evil.test",
                "-H",
                "Sec-Fetch-Site: cross-site",
            ],
            200,
        ),
        (&["-X", "POST", "-H", "Origin: https://evil.test"], 403),
        (
            &[
                "-X",
                "PUT",
                "-H",
                &format!("Origin: https://app.test:{port}"),
            ],
            403,
        ),
        (&["-X", "POST", "-H", "Sec-Fetch-Site: same-site"], 403),
        (
            &["-X", "POST", "-H", &own, "-H", "Sec-Fetch-Site: cross-site"],
            403,
        ),
        (
            &[
                "--http1.1",
                "-H",
                "Connection: Upgrade",
                "-H",
                "Upgrade: websocket",
                "-H",
                "Origin: https://evil.test",
            ],
            403,
        ),
    ];
    for (args, want) in cases {
        let mut c = gw.curl("shelley.app.test", "/x").user("alice:pw");
        for a in args {
            c = c.arg(a);
        }
        let r = c.run().await;
        assert_eq!(r.status, want, "{args:?}: {r:?}");
        if want == 403 {
            assert!(r.body.contains("another site"), "{}", r.body);
        }
    }
    // The app host is not the agent's: cross-origin POSTs are its own business.
    let r = gw
        .curl("app.test", "/x")
        .arg("-X")
        .arg("POST")
        .header("Origin: https://evil.test")
        .run()
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    gw.stop().await;
}

// ---------- a real browser ----------

/// What the browser test's agent upstream saw.
#[derive(Default)]
struct Seen {
    probes: AtomicUsize,
    posts: AtomicUsize,
    upgrades: AtomicUsize,
}

/// An HTTP/1.1 server (hyper) playing the agent (or the app): `/` is an
/// empty HTML page, `/probe` and `/act` count GETs and POSTs, `/ws` accepts
/// websocket handshakes (and then holds the connection).
async fn page_server(seen: Arc<Seen>) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let seen = seen.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| page(seen.clone(), req));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    (addr, task)
}

async fn page(
    seen: Arc<Seen>,
    mut req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if let Some(key) = req.headers().get("sec-websocket-key").cloned() {
        seen.upgrades.fetch_add(1, Ordering::SeqCst);
        let mut input = key.as_bytes().to_vec();
        input.extend_from_slice(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
        let digest = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, &input);
        let accept = base64::engine::general_purpose::STANDARD.encode(digest.as_ref());
        let up = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(io) = up.await {
                let mut io = TokioIo::new(io);
                let mut buf = [0u8; 1024];
                use tokio::io::AsyncReadExt;
                while matches!(io.read(&mut buf).await, Ok(n) if n > 0) {}
            }
        });
        let resp = Response::builder()
            .status(101)
            .header("upgrade", "websocket")
            .header("connection", "Upgrade")
            .header("sec-websocket-accept", accept)
            .body(Full::new(Bytes::new()))
            .unwrap();
        return Ok(resp);
    }
    match (req.method().as_str(), req.uri().path()) {
        ("POST", "/act") => {
            seen.posts.fetch_add(1, Ordering::SeqCst);
        }
        (_, "/probe") if req.uri().query() == Some("from=app") => {
            seen.probes.fetch_add(1, Ordering::SeqCst);
        }
        _ => {}
    }
    let resp = Response::builder()
        .header("content-type", "text/html")
        .body(Full::new(Bytes::from_static(
            b"<!doctype html><title>page</title><p>page</p>",
        )))
        .unwrap();
    Ok(resp)
}

/// The script a page runs: a POST and a websocket to the agent host at
/// `agent` (an origin), each reported as what the page could observe.
fn attempt_script(agent: &str, cross: bool, from: &str) -> String {
    let opts = if cross {
        "{method:'POST', mode:'no-cors', credentials:'include', body:'x'}"
    } else {
        "{method:'POST', body:'x'}"
    };
    format!(
        r#"(async () => {{
  const probe = {probe};
  const post = await fetch('{agent}/act', {opts}).then(r => r.type === 'opaque' ? 'opaque' : r.status, e => 'error');
  const ws = await new Promise(done => {{
    const s = new WebSocket('{wss}/ws');
    s.onopen = () => {{ done('open'); s.close(); }};
    s.onerror = () => done('error');
    setTimeout(() => done('timeout'), 10000);
  }});
  return [probe, post, ws];
}})()"#,
        probe = if cross {
            format!("await fetch('{agent}/probe?from={from}', {{mode:'no-cors', credentials:'include'}}).then(r => r.type, e => 'error')")
        } else {
            "null".to_owned()
        },
        wss = agent.replacen("https://", "wss://", 1),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_page_of_another_site_cannot_drive_the_agent() {
    if !require(&[Component::Chromium, Component::PyWebsockets]) {
        return;
    }
    let agent_seen = Arc::new(Seen::default());
    let (agent_addr, _agent) = page_server(agent_seen.clone()).await;
    let (app_addr, _app) = page_server(Arc::new(Seen::default())).await;
    let gw = GatewayBuilder::new()
        .route("app.test", app_route("app", app_addr, TlsMode::Internal))
        .route(
            "shelley.app.test",
            agent_route("app", agent_addr, TlsMode::Internal, login("alice", "pw")),
        )
        .route("evil.test", app_route("evil", app_addr, TlsMode::Internal))
        .start()
        .await;
    let port = gw.https.port();
    let agent = format!("https://shelley.app.test:{port}");
    let steps = serde_json::json!([
        // Log in: the browser caches the credentials for the agent's origin.
        {"url": format!("https://alice:pw@shelley.app.test:{port}/"), "eval": "document.title"},
        {"url": format!("{agent}/"), "eval": attempt_script(&agent, false, "agent")},
        {"url": format!("https://app.test:{port}/"), "eval": attempt_script(&agent, true, "app")},
        {"url": format!("https://evil.test:{port}/"), "eval": attempt_script(&agent, true, "evil")},
    ]);
    let chromium_args = serde_json::json!([
        "--ignore-certificate-errors",
        "--host-resolver-rules=MAP *.test 127.0.0.1",
    ]);
    let driver = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser/cdp.py");
    let out = tokio::task::spawn_blocking(move || {
        Command::new("timeout")
            .args(["120", "/usr/bin/python3", driver])
            .arg(chromium_args.to_string())
            .arg(steps.to_string())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "browser driver failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let results: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // The agent's own page: same-origin POST and websocket work.
    assert_eq!(results[0], "page", "{results}");
    assert_eq!(
        results[1],
        serde_json::json!([null, 200, "open"]),
        "{results}"
    );
    // Pages of the app domain and of another site: the websocket is refused.
    for i in [2, 3] {
        assert_eq!(results[i][2], "error", "{results}");
    }
    // The app domain's GET reached the agent, so the browser did send the
    // cached credentials with it (it is same-site: Chromium 156 sends none
    // to other sites, which would then get 401 anyway)...
    assert_eq!(agent_seen.probes.load(Ordering::SeqCst), 1, "{results}");
    // ...but only the agent's own POST and websocket got through.
    assert_eq!(agent_seen.posts.load(Ordering::SeqCst), 1, "{results}");
    assert_eq!(agent_seen.upgrades.load(Ordering::SeqCst), 1, "{results}");
    gw.stop().await;
}

// ---------- online guessing ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_passwords_back_off_without_locking_out_the_owner() {
    if !require(&[Component::Program("curl")]) {
        return;
    }
    let agent = Upstream::start("agent").await;
    let gw = GatewayBuilder::new()
        .config(|c| {
            c.login.source_free_failures = 3;
            c.login.sandbox_free_failures = 6;
            c.login.refusal_delay = std::time::Duration::ZERO;
        })
        .route(
            "shelley.app.test",
            agent_route("app", agent.addr, TlsMode::Internal, login("alice", "pw")),
        )
        .route(
            "shelley.other.test",
            agent_route("other", agent.addr, TlsMode::Internal, login("alice", "pw")),
        )
        .start()
        .await;
    let from = |src: &str, host: &str, cred: &str| {
        gw.curl(host, "/").arg("--interface").arg(src).user(cred)
    };
    // The owner is logged in from 127.0.0.2.
    let r = from("127.0.0.2", "shelley.app.test", "alice:pw")
        .run()
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    // 127.0.0.1 guesses: 401 for the free failures, then 429 with Retry-After,
    // even for the right password.
    for i in 0..3 {
        let r = from("127.0.0.1", "shelley.app.test", &format!("alice:guess{i}"))
            .run()
            .await;
        assert_eq!(r.status, 401, "{r:?}");
    }
    for cred in ["alice:guess9", "alice:pw"] {
        let r = from("127.0.0.1", "shelley.app.test", cred).run().await;
        assert_eq!(r.status, 429, "{r:?}");
        let wait: u64 = r.header("retry-after").unwrap().parse().unwrap();
        assert!(wait >= 1, "{wait}");
    }
    // Guesses spread over other addresses bring the whole sandbox to a
    // backoff: a new address gets 429 even with the right password...
    for (i, src) in ["127.0.0.3", "127.0.0.4", "127.0.0.5"].iter().enumerate() {
        let r = from(src, "shelley.app.test", &format!("alice:other{i}"))
            .run()
            .await;
        assert_eq!(r.status, 401, "{r:?}");
    }
    let r = from("127.0.0.6", "shelley.app.test", "alice:pw")
        .run()
        .await;
    assert_eq!(r.status, 429, "{r:?}");
    // ...but the owner, already logged in from 127.0.0.2, keeps access, and
    // other sandboxes are not affected.
    let r = from("127.0.0.2", "shelley.app.test", "alice:pw")
        .run()
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = from("127.0.0.6", "shelley.other.test", "alice:pw")
        .run()
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    gw.stop().await;
}

// ---------- revocation ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_changes_and_removals_end_open_websockets() {
    if !require(&[Component::PyWebsockets]) {
        return;
    }
    let (_ws, ws_addr) = ws_echo_server().await;
    let alice = login("alice", "pw");
    let gw = GatewayBuilder::new()
        .route(
            "shelley.a.test",
            agent_route("a", ws_addr, TlsMode::Internal, alice.clone()),
        )
        .route("a.test", app_route("a", ws_addr, TlsMode::Internal))
        .route(
            "shelley.b.test",
            agent_route("b", ws_addr, TlsMode::Internal, alice.clone()),
        )
        .route("b.test", app_route("b", ws_addr, TlsMode::Internal))
        .start()
        .await;
    let a_agent_out = ws_client(&gw, "shelley.a.test", "alice:pw");
    let a_app_out = ws_client(&gw, "a.test", "x:y");
    let b_agent_out = ws_client(&gw, "shelley.b.test", "alice:pw");
    let b_app_out = ws_client(&gw, "b.test", "x:y");
    let (l, a_agent_out) = next_line(a_agent_out).await;
    assert_eq!(l, "open hi");
    let (l, a_app_out) = next_line(a_app_out).await;
    assert_eq!(l, "open hi");
    let (l, b_agent_out) = next_line(b_agent_out).await;
    assert_eq!(l, "open hi");
    let (l, b_app_out) = next_line(b_app_out).await;
    assert_eq!(l, "open hi");

    // A new password for a's agent: its websocket ends, nothing else does.
    gw.routes.set(
        "shelley.a.test",
        agent_route("a", ws_addr, TlsMode::Internal, login("alice", "new")),
    );
    gw.gw.routes_changed().await;
    let (l, _) = next_line(a_agent_out).await;
    assert_eq!(l, "closed");
    // Sandbox b removed: its app and agent tunnels end; a's app tunnel stays.
    gw.routes.remove("shelley.b.test");
    gw.routes.remove("b.test");
    gw.gw.routes_changed().await;
    let (l, _) = next_line(b_agent_out).await;
    assert_eq!(l, "closed");
    let (l, _) = next_line(b_app_out).await;
    assert_eq!(l, "closed");
    let (l, _) = ask_state(a_app_out).await;
    assert_eq!(l, "still-open again");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attacked_sandbox_does_not_starve_the_logins_of_others() {
    if !require(&[Component::Program("curl")]) {
        return;
    }
    use argon2::password_hash::{PasswordHasher, SaltString};
    let agent = Upstream::start("agent").await;
    // A costly hash (argon2id defaults: 19 MiB, 2 passes) on the attacked sandbox.
    let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
    let costly = argon2::Argon2::default()
        .hash_password(b"pw", &salt)
        .unwrap()
        .to_string();
    let gw = GatewayBuilder::new()
        .config(|c| {
            c.login.source_free_failures = 1000;
            c.login.sandbox_free_failures = 1000;
            c.login.max_queued_verifications = 64;
        })
        .route(
            "shelley.x.test",
            agent_route(
                "x",
                agent.addr,
                TlsMode::Internal,
                BasicAuth {
                    user: "alice".into(),
                    password_hash: costly,
                },
            ),
        )
        .route(
            "shelley.y.test",
            agent_route("y", agent.addr, TlsMode::Internal, login("bob", "pw")),
        )
        .start()
        .await;
    let gw = Arc::new(gw);
    // 32 distinct wrong guesses at x at once: verified one at a time.
    let done = Arc::new(AtomicUsize::new(0));
    let mut guesses = Vec::new();
    for i in 0..32 {
        let (gw, done) = (gw.clone(), done.clone());
        guesses.push(tokio::spawn(async move {
            let r = gw
                .curl("shelley.x.test", "/")
                .user(&format!("alice:guess{i}"))
                .run()
                .await;
            done.fetch_add(1, Ordering::SeqCst);
            r.status
        }));
    }
    // Wait until the guesses are in (the first has been answered).
    eventually(60, "a first answer to the guesses", || {
        done.load(Ordering::SeqCst) > 0
    })
    .await;
    // A first login at y (a verification too) does not wait behind them.
    let r = gw.curl("shelley.y.test", "/").user("bob:pw").run().await;
    assert_eq!(r.status, 200, "{r:?}");
    let answered = done.load(Ordering::SeqCst);
    assert!(
        answered < 16,
        "y's login waited for {answered} of x's 32 verifications"
    );
    for g in guesses {
        assert_eq!(g.await.unwrap(), 401);
    }
    match Arc::try_unwrap(gw) {
        Ok(gw) => gw.stop().await,
        Err(_) => panic!("gateway still shared"),
    }
}
