//! ACME in the real daemon against a real Pebble: `sandboxd add` orders a
//! certificate for the domain and its agent host, served and verified
//! against Pebble's root; a restart serves the same certificate without a
//! new order; with Pebble gone, `certs renew` fails, the error shows in
//! `certs`, and the old certificate keeps serving; removal stops it. Both
//! challenge types go through the daemon's own listeners: TLS-ALPN-01 (the
//! default first choice) on HTTPS, HTTP-01 (`acme_challenges`) on HTTP.
//!
//! Every Pebble test of the daemon lives in this binary; Pebble runs on free
//! ports under a file lock shared with the httpgate crate's ACME tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use testsupport::{require, Component};

use common::pebble::Pebble;
use common::pki::served_serial;
use common::{python_upstream, Daemon};

/// curl `https://HOST:PORT/index.txt` with `host` resolved to loopback,
/// trusting `ca`: (status, body, stderr).
fn get(host: &str, port: u16, ca: &Path) -> (u16, String, String) {
    let ca = ca.to_str().unwrap();
    let resolve = format!("{host}:{port}:127.0.0.1");
    let url = format!("https://{host}:{port}/index.txt");
    common::curl(&["--cacert", ca, "--resolve", &resolve, &url])
}

fn cert_status(d: &Daemon, domain: &str) -> Option<serde_json::Value> {
    d.cert_entry(domain)
}

/// `certs --json` entry of `domain` once it holds a certificate (bounded wait).
fn wait_issued(d: &Daemon, pebble: &Pebble, domain: &str) -> serde_json::Value {
    let t = Instant::now();
    loop {
        if let Some(c) = cert_status(d, domain).filter(|c| !c["not_after"].is_null()) {
            return c;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no certificate:\n{}\n{}",
            d.log_text(),
            pebble.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn add(d: &Daemon, name: &str, domain: &str, app_port: u16) {
    let key = d.keygen(&format!("k-{name}"));
    d.ok(&[
        "add",
        name,
        "--domain",
        domain,
        "--upstream",
        "127.0.0.1",
        "--app-port",
        &app_port.to_string(),
        "--ssh-key",
        key.to_str().unwrap(),
    ]);
}

fn now_rfc3339_after(v: &serde_json::Value) -> bool {
    // RFC 3339 UTC strings of the same shape compare in time order.
    let now = Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%S"])
        .output()
        .unwrap();
    let now = String::from_utf8_lossy(&now.stdout).trim().to_string();
    v.as_str().unwrap() > now.as_str()
}

#[test]
fn acme_issue_restart_and_outage_in_the_daemon() {
    if !require(&[
        Component::Pebble,
        Component::Program("curl"),
        Component::Program("python3"),
        Component::Program("ssh-keygen"),
        Component::Program("openssl"),
    ]) {
        return;
    }
    let mut pebble = Pebble::start();
    let mut d = Daemon::builder(common::BIN)
        .args(&["--tls-mode", "acme"])
        .args(&["--acme-directory", &pebble.directory()])
        .args(&["--acme-ca-root", pebble.cert_file.to_str().unwrap()])
        .args(&["--https-listen", &format!("127.0.0.1:{}", pebble.tls_port)])
        .args(&["--http-listen", &format!("127.0.0.1:{}", pebble.http_port)])
        .start();
    let app = python_upstream(d.dir.path(), "www", "acme-app");
    let port = pebble.tls_port;
    let (domain, agent) = ("acme.test", "shelley.acme.test");

    // `add` orders a certificate for both hosts at once.
    let t = Instant::now();
    add(&d, "acme", domain, app.port);
    let issued = wait_issued(&d, &pebble, domain);
    eprintln!(
        "sandboxd add to an ACME certificate (Pebble): {:?}",
        t.elapsed()
    );
    assert_eq!(issued["mode"], "acme");
    assert!(
        issued["issuer"].as_str().unwrap().contains("Pebble"),
        "{issued}"
    );
    assert_eq!(issued["names"], serde_json::json!([domain, agent]));
    assert!(issued["last_error"].is_null(), "{issued}");
    assert!(now_rfc3339_after(&issued["next_renewal"]), "{issued}");

    // Served, verified against Pebble's root, for the app and the agent host.
    let root = pebble.root_file();
    let (code, body, err) = get(domain, port, &root);
    assert_eq!((code, body.as_str()), (200, "acme-app"), "{err}");
    let (code, _, err) = get(agent, port, &root);
    assert_ne!(code, 0, "agent host not served: {err}");
    let serial = served_serial(domain, port).unwrap();
    let orders = pebble.log_text().matches("Added order").count();
    assert_eq!(orders, 1, "{}", pebble.log_text());

    // Restart: the stored certificate is served, nothing is ordered.
    assert!(d.terminate().success());
    d.restart();
    let (code, body, err) = get(domain, port, &root);
    assert_eq!((code, body.as_str()), (200, "acme-app"), "{err}");
    assert_eq!(served_serial(domain, port).unwrap(), serial);
    let after = cert_status(&d, domain).unwrap();
    assert_eq!(after["not_after"], issued["not_after"]);
    assert!(after["last_error"].is_null(), "{after}");
    assert_eq!(
        pebble.log_text().matches("Added order").count(),
        orders,
        "a new order after restart"
    );
    assert_eq!(
        d.log_text().matches("ordering certificate").count(),
        1,
        "{}",
        d.log_text()
    );

    // Pebble gone: a forced renewal fails with the error shown; the old
    // certificate keeps serving.
    pebble.stop_pebble();
    let err = d.fails(&["certs", "renew", domain]);
    eprintln!("certs renew with Pebble stopped: {err}");
    assert!(err.contains(domain), "{err}");
    assert!(err.contains("Connection refused"), "{err}");
    let failed = cert_status(&d, domain).unwrap();
    let last_error = failed["last_error"].as_str().unwrap_or_default();
    assert!(!last_error.is_empty(), "{failed}");
    assert!(now_rfc3339_after(&failed["next_renewal"]), "{failed}");
    assert_eq!(failed["not_after"], issued["not_after"]);
    let table = d.ok(&["certs"]);
    assert!(table.contains(domain), "{table}");
    assert!(
        table.contains(last_error.split(':').next().unwrap()),
        "{table}"
    );
    let (code, body, err) = get(domain, port, &root);
    assert_eq!((code, body.as_str()), (200, "acme-app"), "{err}");
    assert_eq!(served_serial(domain, port).unwrap(), serial);

    // Removed: no longer managed, no longer served.
    d.ok(&["remove", "acme"]);
    assert!(cert_status(&d, domain).is_none());
    assert!(served_serial(domain, port).is_none());
}

#[test]
fn acme_http01_through_the_daemons_http_listener() {
    if !require(&[
        Component::Pebble,
        Component::Program("curl"),
        Component::Program("python3"),
        Component::Program("ssh-keygen"),
    ]) {
        return;
    }
    let pebble = Pebble::start();
    // HTTP-01 only, and the HTTPS listener is not where Pebble would look
    // for TLS-ALPN-01: the certificate can only come through the HTTP listener.
    let d = Daemon::builder(common::BIN)
        .config("acme_challenges = [\"http-01\"]\n")
        .args(&["--tls-mode", "acme"])
        .args(&["--acme-directory", &pebble.directory()])
        .args(&["--acme-ca-root", pebble.cert_file.to_str().unwrap()])
        .args(&["--http-listen", &format!("127.0.0.1:{}", pebble.http_port)])
        .start();
    let app = python_upstream(d.dir.path(), "www", "http01-app");
    let t = Instant::now();
    add(&d, "web", "web.test", app.port);
    let issued = wait_issued(&d, &pebble, "web.test");
    eprintln!(
        "sandboxd add to an HTTP-01 certificate (Pebble): {:?}",
        t.elapsed()
    );
    assert!(
        issued["issuer"].as_str().unwrap().contains("Pebble"),
        "{issued}"
    );
    assert!(
        d.log_text().contains("challenge=Http01"),
        "{}",
        d.log_text()
    );
    let https = d.listen_port("https_listen");
    let root = pebble.root_file();
    let (code, body, err) = get("web.test", https, &root);
    assert_eq!((code, body.as_str()), (200, "http01-app"), "{err}");
}
