//! ACME against a real Pebble: HTTP-01 and TLS-ALPN-01 issuance verified
//! against Pebble's root, reuse after a restart, renewal without failed
//! requests, and an outage (backoff, old certificate served, error shown).
//! Each test holds a file lock while its Pebble runs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use testsupport::{require, Component};

use common::*;
use httpgate::{BasicAuth, ChallengeKind, TlsMode};

fn has_cert(gw: &Gateway, domain: &str) -> bool {
    gw.gw
        .certs()
        .iter()
        .any(|c| c.domain == domain && c.not_after.is_some())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http01_issues_and_restart_reuses() {
    if !require(&[
        Component::Pebble,
        Component::Program("curl"),
        Component::Program("openssl"),
    ]) {
        return;
    }
    init_tracing();
    let pebble = Pebble::start_async(None).await;
    let root = pebble.root_file();
    let app = Upstream::start("app").await;
    let store = Arc::new(MemStore::default());
    let gw = GatewayBuilder::new()
        .acme(&pebble, ChallengeKind::Http01)
        .store(store.clone())
        .with_http(&format!("127.0.0.1:{}", pebble.http_port))
        .start()
        .await;
    // The route appears after start, as with `sandboxd add`.
    let t = Instant::now();
    gw.routes
        .set("app.test", app_route("app", app.addr, TlsMode::Acme));
    gw.routes.set(
        "shelley.app.test",
        agent_route(
            "app",
            app.addr,
            TlsMode::Acme,
            BasicAuth {
                user: "u".into(),
                password_hash: argon2_hash("p"),
            },
        ),
    );
    gw.gw.routes_changed().await;
    eventually(30, "HTTP-01 certificate", || has_cert(&gw, "app.test")).await;
    let took = t.elapsed();
    eprintln!("route to certificate (HTTP-01): {took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");

    let r = Curl::new("app.test", gw.https.port(), "/")
        .cacert(&root)
        .run()
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = Curl::new("shelley.app.test", gw.https.port(), "/")
        .cacert(&root)
        .user("u:p")
        .run()
        .await;
    assert_eq!(r.status, 200, "agent host is in the certificate: {r:?}");
    let status = gw.gw.certs();
    let c = status.iter().find(|c| c.domain == "app.test").unwrap();
    assert_eq!(c.mode, httpgate::CertMode::Acme);
    assert!(c.issuer.as_deref().unwrap().contains("Pebble"), "{c:?}");
    assert!(c.last_error.is_none());
    assert_eq!(store.certs.lock().unwrap().len(), 1);
    assert_eq!(store.accounts.lock().unwrap().len(), 1);
    let serial = served_serial("app.test", gw.https.port()).unwrap();
    let routes = gw.routes.clone();
    gw.stop().await;

    // Restart with the same store and routes, Pebble gone: the stored
    // certificate is served at once, without a new order.
    let mut pebble = pebble;
    pebble.stop_pebble();
    let gw2 = GatewayBuilder::new()
        .acme(&pebble, ChallengeKind::Http01)
        .store(store.clone())
        .routes(routes)
        .start()
        .await;
    gw2.gw.routes_changed().await;
    let r = Curl::new("app.test", gw2.https.port(), "/")
        .cacert(&root)
        .run()
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(served_serial("app.test", gw2.https.port()).unwrap(), serial);
    let c2 = gw2.gw.certs();
    let c2 = c2.iter().find(|c| c.domain == "app.test").unwrap();
    assert_eq!(c2.not_after, c.not_after);
    assert!(c2.next_renewal.unwrap() > time::OffsetDateTime::now_utc());

    // Removing the sandbox stops its renewals and forgets the certificate.
    gw2.routes.remove("app.test");
    gw2.routes.remove("shelley.app.test");
    gw2.gw.routes_changed().await;
    assert!(gw2.gw.certs().is_empty());
    assert!(store.certs.lock().unwrap().is_empty());
    gw2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_alpn01_issues() {
    if !require(&[Component::Pebble, Component::Program("curl")]) {
        return;
    }
    init_tracing();
    let pebble = Pebble::start_async(None).await;
    let root = pebble.root_file();
    let app = Upstream::start("app").await;
    let t = Instant::now();
    let gw = GatewayBuilder::new()
        .acme(&pebble, ChallengeKind::TlsAlpn01)
        .https_addr(&format!("127.0.0.1:{}", pebble.tls_port))
        .route("alpn.test", app_route("alpn", app.addr, TlsMode::Acme))
        .start()
        .await;
    eventually(30, "TLS-ALPN-01 certificate", || has_cert(&gw, "alpn.test")).await;
    eprintln!("route to certificate (TLS-ALPN-01): {:?}", t.elapsed());
    let r = Curl::new("alpn.test", gw.https.port(), "/")
        .cacert(&root)
        .run()
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    let j: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(j["upstream"], "app");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_without_failed_requests_then_outage() {
    if !require(&[
        Component::Pebble,
        Component::Program("curl"),
        Component::Program("openssl"),
    ]) {
        return;
    }
    init_tracing();
    // Short-lived certificates: renewal is due after two thirds of 15 s.
    let mut pebble = Pebble::start_async(Some(15)).await;
    let root = pebble.root_file();
    let app = Upstream::start("app").await;
    let gw = GatewayBuilder::new()
        .acme(&pebble, ChallengeKind::TlsAlpn01)
        .config(|c| {
            c.acme_backoff_base = Duration::from_secs(3);
            c.acme_backoff_cap = Duration::from_secs(10);
        })
        .https_addr(&format!("127.0.0.1:{}", pebble.tls_port))
        .route("renew.test", app_route("renew", app.addr, TlsMode::Acme))
        .start()
        .await;
    eventually(30, "first certificate", || has_cert(&gw, "renew.test")).await;
    let first = served_serial("renew.test", gw.https.port()).unwrap();

    // Requests keep flowing while the certificate is replaced.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let port = gw.https.port();
    let load = {
        let (stop, failures, done, root) =
            (stop.clone(), failures.clone(), done.clone(), root.clone());
        tokio::task::spawn_blocking(move || {
            while !stop.load(Ordering::Relaxed) {
                let r = Curl::new("renew.test", port, "/")
                    .cacert(&root)
                    .run_blocking();
                if r.status != 200 {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
                done.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut second = first.clone();
    while Instant::now() < deadline && second == first {
        tokio::time::sleep(Duration::from_millis(250)).await;
        second = served_serial("renew.test", port).unwrap_or_else(|| first.clone());
    }
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    assert_ne!(second, first, "certificate was renewed");
    assert!(done.load(Ordering::Relaxed) > 5);
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "no request failed during renewal"
    );

    // Pebble goes away: a forced renewal fails, the error shows, the current
    // certificate keeps serving, and retries back off.
    pebble.stop_pebble();
    let err = gw.gw.renew("renew.test").await.unwrap_err();
    eprintln!("renewal while Pebble is down: {err}");
    let st = gw.gw.certs();
    let c = st.iter().find(|c| c.domain == "renew.test").unwrap();
    assert!(c.last_error.is_some(), "{c:?}");
    assert!(c.next_renewal.unwrap() > time::OffsetDateTime::now_utc());
    let r = Curl::new("renew.test", port, "/").cacert(&root).run().await;
    assert_eq!(r.status, 200, "old certificate still served: {r:?}");
    assert_eq!(served_serial("renew.test", port).unwrap(), second);
    gw.stop().await;
}
