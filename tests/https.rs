//! The HTTPS gate wired into the real daemon, in internal-CA mode, with curl
//! as the client and Python's http.server as the sandbox's app and agent.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{python_upstream, Daemon};
use testsupport::{require, Component};

/// curl: returns (status code, body, stderr).
fn curl(args: &[&str]) -> (u16, String, String) {
    let t = Instant::now();
    let r = common::curl(args);
    eprintln!("curl {:?} -> {} in {:?}", args.last(), r.0, t.elapsed());
    r
}

#[test]
fn app_and_agent_hosts_with_internal_certificates() {
    if !require(&[
        Component::Program("curl"),
        Component::Program("python3"),
        Component::Program("ssh-keygen"),
    ]) {
        return;
    }
    let d = Daemon::builder(common::BIN)
        .arg("--tls-mode")
        .arg("internal")
        .start();
    let app = python_upstream(d.dir.path(), "app", "app-content");
    let agent = python_upstream(d.dir.path(), "agent", "agent-content");
    let key = d.keygen("k");
    let pw = d.dir.path().join("pw");
    std::fs::write(&pw, "correct horse\n").unwrap();
    d.ok(&[
        "add",
        "myapp",
        "--domain",
        "myapp.test",
        "--upstream",
        "127.0.0.1",
        "--app-port",
        &app.port.to_string(),
        "--agent-port",
        &agent.port.to_string(),
        "--ssh-key",
        key.to_str().unwrap(),
        "--auth-user",
        "alice",
        "--auth-password-file",
        pw.to_str().unwrap(),
    ]);
    let https = d.listen_port("https_listen");
    let http = d.listen_port("http_listen");
    let ca = d.dir.path().join("ca.pem");
    std::fs::write(&ca, d.ok(&["ca-cert"])).unwrap();
    assert!(std::fs::read_to_string(&ca)
        .unwrap()
        .contains("BEGIN CERTIFICATE"));
    let resolve = |host: &str| format!("{host}:{https}:127.0.0.1");
    let url = |host: &str, path: &str| format!("https://{host}:{https}{path}");
    let ca_s = ca.to_str().unwrap();

    // The app host, verified against the exported root, right after add.
    let (code, body, err) = curl(&[
        "--cacert",
        ca_s,
        "--resolve",
        &resolve("myapp.test"),
        &url("myapp.test", "/index.txt"),
    ]);
    assert_eq!(
        (code, body.as_str()),
        (200, "app-content"),
        "{err}\n{}",
        d.log_text()
    );
    // One access-log line for it, once the serving thread has gone idle.
    let logged = (0..50).any(|_| {
        let found = d.log_text().lines().any(|l| {
            l.contains(" INFO httpgate::access: request peer=127.0.0.1:")
                && l.contains(" host=myapp.test method=GET path=/index.txt status=200 bytes=11 ms=")
                && l.contains(" upstream_ms=")
        });
        if !found {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        found
    });
    assert!(logged, "no access-log line:\n{}", d.log_text());
    // HTTP/2 is offered.
    let out = Command::new("curl")
        .args([
            "-sS",
            "--http2",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{http_version}",
            "--cacert",
            ca_s,
        ])
        .args([
            "--resolve",
            &resolve("myapp.test"),
            &url("myapp.test", "/index.txt"),
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200 2");
    // Python's http.server answers in HTTP/1.0; the client still gets
    // HTTP/1.1 and keeps its connection for the next request.
    let url_txt = url("myapp.test", "/index.txt");
    let out = Command::new("curl")
        .args(["-sS", "--http1.1", "-o", "/dev/null", "-o", "/dev/null"])
        .args(["-w", "%{http_version} %{num_connects};", "--cacert", ca_s])
        .args(["--resolve", &resolve("myapp.test"), &url_txt, &url_txt])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "1.1 1;1.1 0;");

    // The agent host asks for basic auth.
    let agent_host = "shelley.myapp.test";
    let (code, _, _) = curl(&[
        "--cacert",
        ca_s,
        "--resolve",
        &resolve(agent_host),
        &url(agent_host, "/index.txt"),
    ]);
    assert_eq!(code, 401);
    let (code, _, _) = curl(&[
        "-u",
        "alice:wrong",
        "--cacert",
        ca_s,
        "--resolve",
        &resolve(agent_host),
        &url(agent_host, "/index.txt"),
    ]);
    assert_eq!(code, 401);
    let (code, _, _) = curl(&[
        "-u",
        "mallory:correct horse",
        "--cacert",
        ca_s,
        "--resolve",
        &resolve(agent_host),
        &url(agent_host, "/index.txt"),
    ]);
    assert_eq!(code, 401);
    let (code, body, _) = curl(&[
        "-u",
        "alice:correct horse",
        "--cacert",
        ca_s,
        "--resolve",
        &resolve(agent_host),
        &url(agent_host, "/index.txt"),
    ]);
    assert_eq!((code, body.as_str()), (200, "agent-content"));

    // Plain HTTP redirects to HTTPS, keeping path and query.
    let out = Command::new("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{redirect_url}",
        ])
        .arg(format!("http://myapp.test:{http}/a/b?c=1"))
        .args(["--resolve", &format!("myapp.test:{http}:127.0.0.1")])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text, format!("301 https://myapp.test:{https}/a/b?c=1"));

    // A port change applies to the next request (never to the agent's
    // port: the app domain has no login).
    let err = d.fails(&["port", "myapp", &agent.port.to_string()]);
    assert!(err.contains("is the agent port"), "{err}");
    let app2 = python_upstream(d.dir.path(), "app2", "app2-content");
    d.ok(&["port", "myapp", &app2.port.to_string()]);
    let (code, body, _) = curl(&[
        "--cacert",
        ca_s,
        "--resolve",
        &resolve("myapp.test"),
        &url("myapp.test", "/index.txt"),
    ]);
    assert_eq!((code, body.as_str()), (200, "app2-content"));

    let certs = d.json(&["certs", "--json"]);
    assert!(
        certs
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["domain"] == "myapp.test"),
        "{certs}"
    );
    assert!(d.ok(&["certs"]).contains("myapp.test"));

    // The upstream going away gives a 502 page naming the sandbox.
    drop(app);
    drop(agent);
    drop(app2);
    let (code, body, _) = curl(&[
        "--cacert",
        ca_s,
        "--resolve",
        &resolve("myapp.test"),
        &url("myapp.test", "/"),
    ]);
    assert_eq!(code, 502);
    assert!(body.contains("myapp"), "{body}");

    // Removed: the name is no longer served at all.
    d.ok(&["remove", "myapp"]);
    let (code, _, err) = curl(&[
        "--cacert",
        ca_s,
        "--resolve",
        &resolve("myapp.test"),
        &url("myapp.test", "/"),
    ]);
    assert_eq!(code, 0, "unknown host still served: {err}");
    // The CA survives a restart: the same root still verifies new leaves.
    let mut d = d;
    assert!(d.terminate().success());
    d.restart();
    assert_eq!(d.ok(&["ca-cert"]), std::fs::read_to_string(&ca).unwrap());
}

/// `add NAME --domain DOMAIN` routed to an app on 127.0.0.1:`app_port`:
/// the HTTPS port and the exported root certificate's file.
fn add_app(d: &Daemon, name: &str, domain: &str, app_port: u16) -> (u16, std::path::PathBuf) {
    d.add_with(name, domain, &["--app-port", &app_port.to_string()]);
    let ca = d.dir.path().join("ca.pem");
    std::fs::write(&ca, d.ok(&["ca-cert"])).unwrap();
    (d.listen_port("https_listen"), ca)
}

/// An upstream that answers every request with the request head it received,
/// so a test sees exactly which headers the proxy forwarded.
fn echo_upstream() -> u16 {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut out = stream;
                loop {
                    let mut head = String::new();
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        head.push_str(&line.to_ascii_lowercase());
                    }
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{head}",
                        head.len()
                    );
                    if out.write_all(resp.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

/// The `[http]` table reaches the proxy: a client-supplied X-Forwarded-For is
/// replaced unless the peer is a configured trusted proxy, and the request
/// head limit is the configured one.
#[test]
fn http_table_sets_trusted_proxies_and_limits() {
    if !require(&[Component::Program("curl"), Component::Program("ssh-keygen")]) {
        return;
    }
    let echo = echo_upstream();
    let run = |config: &str| -> (String, u16) {
        let d = Daemon::builder(common::BIN)
            .arg("--tls-mode")
            .arg("internal")
            .config(config)
            .start();
        let (https, ca) = add_app(&d, "echo", "echo.test", echo);
        let resolve = format!("echo.test:{https}:127.0.0.1");
        let url = format!("https://echo.test:{https}/");
        let (code, head, err) = curl(&[
            "--cacert",
            ca.to_str().unwrap(),
            "--resolve",
            &resolve,
            "-H",
            "X-Forwarded-For: 203.0.113.9",
            &url,
        ]);
        assert_eq!(code, 200, "{err}\n{}", d.log_text());
        // A 16 KiB header: within the default limit (32 KiB), over an 8 KiB one.
        let big = format!("X-Big: {}", "a".repeat(16 * 1024));
        let (big_code, _, _) = curl(&[
            "--cacert",
            ca.to_str().unwrap(),
            "--resolve",
            &resolve,
            "-H",
            &big,
            &url,
        ]);
        (head, big_code)
    };

    let (head, big) = run("");
    assert!(
        head.contains("x-forwarded-for: 127.0.0.1\r\n"),
        "an untrusted peer's X-Forwarded-For must be replaced:\n{head}"
    );
    assert!(!head.contains("203.0.113.9"), "{head}");
    assert_eq!(big, 200);

    let (head, big) = run("[http]\ntrusted_proxies = [\"127.0.0.1\"]\nmax_header_bytes = 8192\n");
    assert!(
        head.contains("x-forwarded-for: 203.0.113.9, 127.0.0.1\r\n"),
        "a trusted proxy's X-Forwarded-For must be kept and appended to:\n{head}"
    );
    assert_eq!(big, 431, "a head over max_header_bytes is refused");
}

/// The `certs --json` entry of `domain`.
fn cert_status(d: &Daemon, domain: &str) -> serde_json::Value {
    d.cert_entry(domain)
        .unwrap_or_else(|| panic!("{domain} not in certs"))
}

#[test]
fn manual_certificates_from_pem_files() {
    if !require(&[
        Component::Program("curl"),
        Component::Program("python3"),
        Component::Program("ssh-keygen"),
        Component::Program("openssl"),
    ]) {
        return;
    }
    use common::pki::{file_serial, served_serial, Ca};
    let d = Daemon::builder(common::BIN)
        .arg("--tls-mode")
        .arg("internal")
        .start();
    let app = python_upstream(d.dir.path(), "app", "manual-app");
    let pki_dir = d.dir.path().join("pki");
    std::fs::create_dir(&pki_dir).unwrap();
    let ca = Ca::new(&pki_dir, "sandboxd-test-ca");
    let (cert, key) = ca.leaf("site", &["man.test", "shelley.man.test"]);
    let key_s = key.to_str().unwrap();
    let cert_s = cert.to_str().unwrap();
    let ssh_key = d.keygen("k");
    let add = |name: &str, domain: &str, extra: &[&str]| {
        let mut args = vec![
            "add",
            name,
            "--domain",
            domain,
            "--upstream",
            "127.0.0.1",
            "--app-port",
        ];
        let port = app.port.to_string();
        args.push(&port);
        args.extend(["--ssh-key", ssh_key.to_str().unwrap()]);
        args.extend(extra);
        d.cli(&args)
    };

    // Bad requests are refused with a clear message, and nothing is added.
    let out = add("nofiles", "nofiles.test", &["--tls-mode", "manual"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--tls-cert-file"), "{err}");
    let out = add(
        "notmanual",
        "notmanual.test",
        &["--tls-cert-file", cert_s, "--tls-key-file", key_s],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tls-mode manual"));

    // A relative path is made absolute by the CLI (the daemon runs elsewhere).
    let out = Command::new(common::BIN)
        .arg("--admin-socket")
        .arg(&d.socket)
        .args([
            "add",
            "man",
            "--domain",
            "man.test",
            "--upstream",
            "127.0.0.1",
            "--app-port",
            &app.port.to_string(),
            "--ssh-key",
            ssh_key.to_str().unwrap(),
            "--tls-mode",
            "manual",
            "--tls-cert-file",
            "site.pem",
            "--tls-key-file",
            "site.key",
        ])
        .current_dir(&pki_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A second sandbox whose files are missing: added, its error shown in
    // `certs`, its name refused at the handshake, the first one unharmed.
    let missing = pki_dir.join("missing.pem");
    let out = add(
        "broken",
        "broken.test",
        &[
            "--tls-mode",
            "manual",
            "--tls-cert-file",
            missing.to_str().unwrap(),
            "--tls-key-file",
            key_s,
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let https = d.listen_port("https_listen");
    let resolve = |host: &str| format!("{host}:{https}:127.0.0.1");
    let url = |host: &str| format!("https://{host}:{https}/index.txt");
    let ca_s = ca.cert.to_str().unwrap();
    let get = |host: &str| curl(&["--cacert", ca_s, "--resolve", &resolve(host), &url(host)]);

    // Served from the files, verified against the test CA.
    let (code, body, err) = get("man.test");
    assert_eq!(
        (code, body.as_str()),
        (200, "manual-app"),
        "{err}\n{}",
        d.log_text()
    );
    assert_eq!(
        served_serial("man.test", https).unwrap(),
        file_serial(&cert)
    );
    assert!(served_serial("shelley.man.test", https).is_some());
    let c = cert_status(&d, "man.test");
    assert_eq!(c["mode"], "manual");
    assert!(
        c["issuer"].as_str().unwrap().contains("sandboxd-test-ca"),
        "{c}"
    );
    assert!(c["last_error"].is_null(), "{c}");
    // `show` names the files, as the daemon reads them (absolute).
    let shown = d.ok(&["show", "man"]);
    let expect = format!(
        "certificates:      manual (certificate {}, key {})",
        pki_dir.join("site.pem").display(),
        pki_dir.join("site.key").display()
    );
    assert!(shown.contains(&expect), "{shown}");
    let b = cert_status(&d, "broken.test");
    let b_err = b["last_error"].as_str().unwrap_or_default().to_string();
    assert!(
        b_err.contains("cannot read certificate file") && b_err.contains("missing.pem"),
        "{b}"
    );
    let (code, _, _) = get("broken.test");
    assert_eq!(code, 0, "a name without a certificate is refused");
    assert!(d.ok(&["certs"]).contains("cannot read certificate file"));

    // New files in place: served after `certs renew`.
    let first = file_serial(&cert);
    let (new_cert, new_key) = ca.leaf("site2", &["man.test", "shelley.man.test"]);
    std::fs::copy(&new_cert, &cert).unwrap();
    std::fs::copy(&new_key, &key).unwrap();
    assert_eq!(served_serial("man.test", https).unwrap(), first);
    let out = d.ok(&["certs", "renew", "man.test"]);
    assert!(out.contains("reloaded"), "{out}");
    let second = file_serial(&new_cert);
    assert_ne!(first, second);
    assert_eq!(served_serial("man.test", https).unwrap(), second);
    assert_eq!(get("man.test").0, 200);

    // Bad files: the renewal fails with a clear error, shown in `certs`,
    // and the loaded certificate keeps serving.
    let other_key = common::pki::key(&pki_dir, "other.key");
    let cases: [(&dyn Fn(), &str); 3] = [
        (
            &|| {
                std::fs::copy(&other_key, &key).unwrap();
            },
            "does not match the certificate",
        ),
        (
            &|| std::fs::write(&key, "not a key\n").unwrap(),
            "no private key",
        ),
        (
            &|| std::fs::remove_file(&cert).unwrap(),
            "cannot read certificate file",
        ),
    ];
    for (break_it, expected) in cases {
        break_it();
        let err = d.fails(&["certs", "renew", "man.test"]);
        assert!(err.contains(expected), "{expected}: {err}");
        let c = cert_status(&d, "man.test");
        assert!(
            c["last_error"]
                .as_str()
                .unwrap_or_default()
                .contains(expected),
            "{c}"
        );
        assert!(d.ok(&["certs"]).contains(expected));
        assert_eq!(served_serial("man.test", https).unwrap(), second);
        let (code, body, _) = get("man.test");
        assert_eq!((code, body.as_str()), (200, "manual-app"));
        // Restore good files for the next case.
        std::fs::copy(&new_cert, &cert).unwrap();
        std::fs::copy(&new_key, &key).unwrap();
    }
    // Fixed files clear the error.
    d.ok(&["certs", "renew", "man.test"]);
    assert!(cert_status(&d, "man.test")["last_error"].is_null());

    // A restart loads the files again.
    let mut d = d;
    assert!(d.terminate().success());
    d.restart();
    let https = d.listen_port("https_listen");
    assert_eq!(served_serial("man.test", https).unwrap(), second);
}

/// Open a TLS connection with `openssl s_client` (ALPN `alpn`), write
/// `send`, keep stdin open, and return how long the server kept the
/// connection open (bounded by `max`) and what it sent.
fn open_for(
    port: u16,
    host: &str,
    ca: &Path,
    alpn: &str,
    send: &str,
    max: Duration,
) -> (Duration, String) {
    use std::io::{Read, Write};
    let mut child = Command::new("openssl")
        .args(["s_client", "-quiet", "-verify_return_error", "-alpn", alpn])
        .args([
            "-connect",
            &format!("127.0.0.1:{port}"),
            "-servername",
            host,
        ])
        .arg("-CAfile")
        .arg(ca)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(send.as_bytes()).unwrap();
    let t = Instant::now();
    let mut out = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = out.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    });
    while child.try_wait().unwrap().is_none() && t.elapsed() < max {
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = t.elapsed();
    let _ = child.kill();
    let _ = child.wait();
    drop(stdin);
    (took, reader.join().unwrap())
}

#[test]
fn idle_client_connections_closed_after_the_configured_timeout() {
    if !require(&[
        Component::Program("python3"),
        Component::Program("ssh-keygen"),
        Component::Program("openssl"),
    ]) {
        return;
    }
    let d = Daemon::builder(common::BIN)
        .arg("--tls-mode")
        .arg("internal")
        .config("[http]\nidle_timeout_secs = 1\n")
        .start();
    let app = python_upstream(d.dir.path(), "app", "idle-app");
    let (https, ca) = add_app(&d, "idle", "idle.test", app.port);
    let max = Duration::from_secs(10);
    // An HTTP/1.1 connection that sends nothing: closed after about a
    // second, well before the 15 s header-read timeout.
    let (took, _) = open_for(https, "idle.test", &ca, "http/1.1", "", max);
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_secs(4),
        "{took:?}"
    );
    // HTTP/2 with no stream: a GOAWAY, then closed.
    let (took, _) = open_for(https, "idle.test", &ca, "h2", "", max);
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_secs(4),
        "{took:?}"
    );
}

/// A client that gives up before the sandbox answers: the request is still
/// logged, with its host and path and status 0, and nothing in the daemon
/// fails on the way.
#[test]
fn request_abandoned_by_the_client_is_logged() {
    if !require(&[Component::Program("curl"), Component::Program("ssh-keygen")]) {
        return;
    }
    // An app that takes connections and never answers.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in listener.incoming() {
            match s {
                Ok(s) => held.push(s),
                Err(_) => return,
            }
        }
    });
    let d = Daemon::builder(common::BIN)
        .arg("--tls-mode")
        .arg("internal")
        .start();
    let (https, ca) = add_app(&d, "hang", "hang.test", port);
    let resolve = format!("hang.test:{https}:127.0.0.1");
    let url = format!("https://hang.test:{https}/waiting?for=ever");
    let (code, _, err) = curl(&[
        "--max-time",
        "1",
        "--cacert",
        ca.to_str().unwrap(),
        "--resolve",
        &resolve,
        &url,
    ]);
    assert_eq!(code, 0, "{err}");
    let line = " host=hang.test method=GET path=/waiting status=0 bytes=0 ms=";
    let logged = (0..50).any(|_| {
        let found = d.log_text().lines().any(|l| l.contains(line));
        if !found {
            std::thread::sleep(Duration::from_millis(100));
        }
        found
    });
    let log = d.log_text();
    assert!(
        logged,
        "no access-log line for the abandoned request:\n{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
}

/// One address holding 300 stalled connections (more than `max_connections`
/// here) leaves room for another address: the daemon caps connections per
/// source at accept, over all its serving threads. The proxy's headers and
/// HSTS follow the configuration too.
#[test]
fn one_source_cannot_take_every_connection() {
    if !require(&[Component::Program("curl"), Component::Program("ssh-keygen")]) {
        return;
    }
    let echo = echo_upstream();
    let d = Daemon::builder(common::BIN)
        .arg("--tls-mode")
        .arg("internal")
        .config(
            "[http]\nmax_connections = 300\nmax_connections_per_source = 200\n\
             handshake_timeout_secs = 120\nhsts_tls_modes = [\"internal\"]\nhsts_max_age_secs = 60\n",
        )
        .start();
    let (https, ca) = add_app(&d, "echo", "echo.test", echo);
    let held: Vec<std::net::TcpStream> = (0..300)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", https)).unwrap())
        .collect();
    let resolve = format!("echo.test:{https}:127.0.0.1");
    let url = format!("https://echo.test:{https}/");
    let fetch = |from: &str| {
        curl(&[
            "--cacert",
            ca.to_str().unwrap(),
            "--resolve",
            &resolve,
            "--interface",
            from,
            "-D",
            "/dev/stderr",
            "-H",
            "X-Real-IP: 203.0.113.9",
            &url,
        ])
    };
    let (code, head, err) = fetch("127.0.0.2");
    assert_eq!(code, 200, "{err}\n{}", d.log_text());
    assert!(head.contains("x-real-ip: 127.0.0.2\r\n"), "{head}");
    assert!(head.contains("host: echo.test:"), "{head}");
    assert!(
        err.to_ascii_lowercase()
            .contains("strict-transport-security: max-age=60"),
        "{err}"
    );
    // 127.0.0.1 itself is at its cap.
    let (code, _, _) = fetch("127.0.0.1");
    assert_eq!(code, 0);
    drop(held);
}

/// `internal` mode, asked for or the daemon's default, is refused for a
/// domain outside the internal CA's suffixes (the root could not vouch for
/// it), with the way out in the message; the suffixes are configurable.
#[test]
fn internal_mode_is_only_for_the_internal_ca_suffixes() {
    if !require(&[
        Component::Program("ssh-keygen"),
        Component::Program("openssl"),
    ]) {
        return;
    }
    let d = Daemon::builder(common::BIN)
        .arg("--tls-mode")
        .arg("internal")
        .start();
    let key = d.keygen("k");
    let add = |name: &str, domain: &str, extra: &[&str]| d.try_add(name, domain, extra);
    for extra in [&[][..], &["--tls-mode", "internal"][..]] {
        let out = add("pub", "shop.example.com", extra);
        assert!(!out.status.success(), "{extra:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("shop.example.com cannot use tls mode internal")
                && err.contains(".test")
                && err.contains("--tls-mode acme")
                && err.contains("--tls-mode manual"),
            "{err}"
        );
    }
    // `create` (and `import`) check the same rule before anything else.
    let out = d.cli(&[
        "create",
        "pub",
        "--domain",
        "shop.example.com",
        "--ssh-key",
        key.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot use tls mode internal") && err.contains("--tls-mode acme"),
        "{err}"
    );
    assert!(d.json(&["list", "--json"]).as_array().unwrap().is_empty());
    assert!(add("pub", "shop.example.com", &["--tls-mode", "acme"])
        .status
        .success());
    assert!(add("dev", "dev.home.arpa", &[]).status.success());
    drop(d);

    let d = Daemon::builder(common::BIN)
        .arg("--tls-mode")
        .arg("internal")
        .config("internal_ca_suffixes = [\".corp.example.com\"]\n")
        .start();
    let key = d.keygen("k");
    let args = |name: &'static str, domain: &'static str| {
        vec![
            "add".to_string(),
            name.into(),
            "--domain".into(),
            domain.into(),
            "--upstream".into(),
            "127.0.0.1".into(),
            "--ssh-key".into(),
            key.display().to_string(),
        ]
    };
    let run = |a: Vec<String>| d.cli(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(run(args("corp", "app.corp.example.com")).status.success());
    assert!(!run(args("t", "app.test")).status.success());
    // The root's constraints are the configured suffix.
    let ca = d.dir.path().join("ca.pem");
    std::fs::write(&ca, d.ok(&["ca-cert"])).unwrap();
    let text = Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(&ca)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("DNS:corp.example.com"), "{text}");
    assert!(!text.contains("DNS:test"), "{text}");
}

/// A state directory from before name constraints (its internal CA root
/// has none, as `openssl req -x509` makes it) gets a new, constrained root
/// at start; `status` and the log say that clients must re-import it, and
/// internal-mode hosts are served from the new root at once.
#[test]
fn an_unconstrained_ca_root_is_replaced_and_reported() {
    if !require(&[
        Component::Program("curl"),
        Component::Program("ssh-keygen"),
        Component::Program("openssl"),
    ]) {
        return;
    }
    let echo = echo_upstream();
    let mut d = Daemon::builder(common::BIN)
        .arg("--tls-mode")
        .arg("internal")
        .start();
    add_app(&d, "echo", "echo.test", echo);
    let old = common::pki::Ca::new(d.dir.path(), "old-root");
    let mut backup: serde_json::Value = serde_json::from_slice(&d.cli(&["backup"]).stdout).unwrap();
    backup["records"]["internal-ca"]["root"] = serde_json::json!({
        "cert_pem": std::fs::read_to_string(&old.cert).unwrap(),
        "key_pem": std::fs::read_to_string(&old.key).unwrap(),
    });
    // The old state: stop, wipe, restore it, start again.
    assert!(d.terminate().success());
    std::fs::remove_dir_all(&d.state).unwrap();
    d.restart();
    let out = d.cli_with_stdin(&["restore"], backup.to_string().as_bytes());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(d.terminate().success());
    d.restart();

    let st = d.json(&["status", "--json"]);
    let notice = st["ca_notice"].as_str().unwrap_or_default();
    assert!(
        notice.contains("replaced") && notice.contains("sandboxd ca-cert"),
        "{st}"
    );
    assert!(d.ok(&["status"]).contains("notice:"));
    assert!(d.log_text().contains("root was replaced"));
    let root = d.ok(&["ca-cert"]);
    assert_ne!(root, std::fs::read_to_string(&old.cert).unwrap());
    let ca = d.dir.path().join("new-root.pem");
    std::fs::write(&ca, &root).unwrap();
    let https = d.listen_port("https_listen");
    let resolve = format!("echo.test:{https}:127.0.0.1");
    let url = format!("https://echo.test:{https}/");
    let (code, _, err) = curl(&[
        "--cacert",
        ca.to_str().unwrap(),
        "--resolve",
        &resolve,
        &url,
    ]);
    assert_eq!(code, 200, "{err}");
    let (code, _, _) = curl(&[
        "--cacert",
        old.cert.to_str().unwrap(),
        "--resolve",
        &resolve,
        &url,
    ]);
    assert_eq!(code, 0, "the old root no longer vouches for the host");
    // The next start keeps the new root and has nothing to report.
    assert!(d.terminate().success());
    d.restart();
    assert!(d.json(&["status", "--json"]).get("ca_notice").is_none());
    assert_eq!(d.ok(&["ca-cert"]), root);
}

/// A record from before app and agent ports were kept apart (an earlier
/// `sandboxd port NAME 9999`, brought back by upgrade or restore) whose app
/// port is the agent port: the app domain, which has no login, must not
/// serve the agent; the page and `sandboxd routes` say why and what to do.
#[test]
fn an_old_record_with_the_app_on_the_agent_port_does_not_serve_the_agent() {
    if !require(&[
        Component::Program("curl"),
        Component::Program("python3"),
        Component::Program("ssh-keygen"),
    ]) {
        return;
    }
    let mut d = Daemon::builder(common::BIN)
        .arg("--tls-mode")
        .arg("internal")
        .start();
    let agent = python_upstream(d.dir.path(), "agent", "agent-content");
    let app = python_upstream(d.dir.path(), "app", "app-content");
    d.add_with(
        "old",
        "old.test",
        &[
            "--app-port",
            &app.port.to_string(),
            "--agent-port",
            &agent.port.to_string(),
        ],
    );
    let mut backup: serde_json::Value = serde_json::from_slice(&d.cli(&["backup"]).stdout).unwrap();
    backup["sandboxes"][0]["app_port"] = serde_json::json!(agent.port);
    assert!(d.terminate().success());
    std::fs::remove_dir_all(&d.state).unwrap();
    d.restart();
    let out = d.cli_with_stdin(&["restore"], backup.to_string().as_bytes());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let https = d.listen_port("https_listen");
    let ca = d.dir.path().join("ca.pem");
    std::fs::write(&ca, d.ok(&["ca-cert"])).unwrap();
    let (code, body, err) = curl(&[
        "--cacert",
        ca.to_str().unwrap(),
        "--resolve",
        &format!("old.test:{https}:127.0.0.1"),
        &format!("https://old.test:{https}/index.txt"),
    ]);
    assert!(
        !body.contains("agent-content"),
        "the app domain served the agent without a login: {code} {body}"
    );
    assert_eq!(code, 502, "{err}");
    assert!(body.contains("agent port"), "{body}");
    let routes = d.ok(&["routes"]);
    assert!(routes.contains("is the agent port"), "{routes}");
    // Moving the app elsewhere opens the app domain again.
    d.ok(&["port", "old", &app.port.to_string()]);
    let (code, body, err) = curl(&[
        "--cacert",
        ca.to_str().unwrap(),
        "--resolve",
        &format!("old.test:{https}:127.0.0.1"),
        &format!("https://old.test:{https}/index.txt"),
    ]);
    assert_eq!((code, body.as_str()), (200, "app-content"), "{err}");
}
