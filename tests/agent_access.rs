//! The agent host through the real daemon: closed without a login (no
//! upstream connection at all), and open websockets ended when the login
//! changes or the sandbox's routes go, with curl and python3-websockets as
//! the clients.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::Daemon;
use testsupport::ws::{echo_server, WsClient};
use testsupport::{require, Component};

/// A loopback HTTP server that counts the TCP connections it accepts and
/// answers every request with 200 "agent".
fn counting_upstream() -> (u16, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            count.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(n) if n > 0 => head.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
                let _ = s.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nagent",
                );
            });
        }
    });
    (port, accepted)
}

fn write_secret(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

struct Gate {
    port: u16,
    ca: PathBuf,
}

impl Gate {
    fn of(d: &Daemon) -> Gate {
        let ca = d.dir.path().join("ca.pem");
        std::fs::write(&ca, d.ok(&["ca-cert"])).unwrap();
        Gate {
            port: d.listen_port("https_listen"),
            ca,
        }
    }

    fn curl(&self, host: &str, extra: &[&str]) -> (u16, String) {
        let resolve = format!("{host}:{}:127.0.0.1", self.port);
        let url = format!("https://{host}:{}/", self.port);
        let mut args = vec!["--cacert", self.ca.to_str().unwrap(), "--resolve", &resolve];
        args.extend_from_slice(extra);
        args.push(&url);
        let (code, body, _) = common::curl(&args);
        (code, body)
    }
}

fn add(d: &Daemon, name: &str, app_port: u16, agent_port: u16, login: Option<&Path>) {
    let key = d.keygen(&format!("key-{name}"));
    let (app, agent) = (app_port.to_string(), agent_port.to_string());
    let domain = format!("{name}.test");
    let mut args = vec![
        "add",
        name,
        "--domain",
        &domain,
        "--upstream",
        "127.0.0.1",
        "--app-port",
        &app,
        "--agent-port",
        &agent,
        "--ssh-key",
        key.to_str().unwrap(),
    ];
    if let Some(pw) = login {
        args.extend_from_slice(&[
            "--auth-user",
            "alice",
            "--auth-password-file",
            pw.to_str().unwrap(),
        ]);
    }
    d.ok(&args);
}

#[test]
fn an_agent_host_without_login_is_closed() {
    if !require(&[Component::Program("curl"), Component::Program("ssh-keygen")]) {
        return;
    }
    let d = Daemon::builder(common::BIN)
        .args(&["--tls-mode", "internal"])
        .start();
    let (agent_port, accepted) = counting_upstream();
    let (app_port, _) = counting_upstream();
    add(&d, "shut", app_port, agent_port, None);
    let gate = Gate::of(&d);
    for extra in [
        &[][..],
        &["-u", "alice:guess"],
        &["-X", "POST", "--data", "x"],
    ] {
        let (code, body) = gate.curl("shelley.shut.test", extra);
        assert_eq!(code, 401, "{body}");
        assert!(body.contains("no login set"), "{body}");
        assert!(body.contains("sandboxd auth shut"), "{body}");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 0, "upstream was reached");
    // A login opens it; removing the login closes it again.
    let pw = write_secret(d.dir.path(), "pw", "correct horse\n");
    d.ok(&[
        "auth",
        "shut",
        "alice",
        "--password-file",
        pw.to_str().unwrap(),
    ]);
    let (code, body) = gate.curl("shelley.shut.test", &["-u", "alice:correct horse"]);
    assert_eq!((code, body.as_str()), (200, "agent"));
    d.ok(&["auth", "shut", "--remove"]);
    let before = accepted.load(Ordering::SeqCst);
    let (code, body) = gate.curl("shelley.shut.test", &["-u", "alice:correct horse"]);
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("no login set"), "{body}");
    assert_eq!(accepted.load(Ordering::SeqCst), before);
}

/// A websocket client through the gate to `host` with basic auth `cred`,
/// once its first echo came back (see `testsupport::ws::WsClient`).
fn open_ws(gate: &Gate, host: &str, cred: &str) -> WsClient {
    let mut c = WsClient::start(gate.port, &gate.ca, host, cred, 60);
    assert_eq!(c.line(), "open hi", "websocket to {host}");
    c
}

#[test]
fn websockets_end_when_the_login_changes_or_the_sandbox_is_removed() {
    if !require(&[
        Component::Program("curl"),
        Component::Program("ssh-keygen"),
        Component::PyWebsockets,
    ]) {
        return;
    }
    let d = Daemon::builder(common::BIN)
        .args(&["--tls-mode", "internal"])
        .start();
    let (a_app, a_agent, b_app, b_agent) =
        (echo_server(), echo_server(), echo_server(), echo_server());
    let pw = write_secret(d.dir.path(), "pw", "correct horse\n");
    add(&d, "wsa", a_app.port, a_agent.port, Some(&pw));
    add(&d, "wsb", b_app.port, b_agent.port, Some(&pw));
    let gate = Gate::of(&d);
    let cred = "alice:correct horse";
    let mut wsa_agent = open_ws(&gate, "shelley.wsa.test", cred);
    let mut wsa_app = open_ws(&gate, "wsa.test", "x:y");
    let mut wsb_agent = open_ws(&gate, "shelley.wsb.test", cred);
    let mut wsb_app = open_ws(&gate, "wsb.test", "x:y");

    // A new password for wsa: its agent websocket ends at once...
    let pw2 = write_secret(d.dir.path(), "pw2", "battery staple\n");
    d.ok(&[
        "auth",
        "wsa",
        "alice",
        "--password-file",
        pw2.to_str().unwrap(),
    ]);
    assert_eq!(wsa_agent.line(), "closed");
    // ...and a new one needs the new password.
    let (code, _) = gate.curl("shelley.wsa.test", &["-u", cred]);
    assert_eq!(code, 401);
    let mut wsa_agent = open_ws(&gate, "shelley.wsa.test", "alice:battery staple");

    // Removing wsb ends both its websockets; wsa's stay open.
    d.ok(&["remove", "wsb"]);
    assert_eq!(wsb_agent.line(), "closed");
    assert_eq!(wsb_app.line(), "closed");
    assert_eq!(wsa_agent.state(), "still-open again");
    assert_eq!(wsa_app.state(), "still-open again");

    // Removing wsa's login ends its agent websocket.
    let mut wsa_agent = open_ws(&gate, "shelley.wsa.test", "alice:battery staple");
    d.ok(&["auth", "wsa", "--remove"]);
    assert_eq!(wsa_agent.line(), "closed");
}
