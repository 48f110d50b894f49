//! The agent host through the real daemon: closed without a login (no
//! upstream connection at all), and open websockets ended when the login
//! changes or the sandbox's routes go, with curl and python3-websockets as
//! the clients.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Daemon;

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

/// A python3-websockets echo server on a free loopback port.
struct WsEcho {
    port: u16,
    child: Child,
}

impl Drop for WsEcho {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ws_echo() -> WsEcho {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let script = r#"
import asyncio, sys, websockets
async def echo(ws, path=None):
    async for m in ws:
        await ws.send(m)
async def main():
    async with websockets.serve(echo, "127.0.0.1", int(sys.argv[1])):
        await asyncio.Future()
asyncio.run(main())
"#;
    let child = Command::new("/usr/bin/python3")
        .args(["-c", script, &port.to_string()])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "ws echo did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    WsEcho { port, child }
}

/// A websocket client through the gate to `host` with basic auth `cred`.
/// It prints `open hi` after its first echo, then `closed` when the
/// connection ends, or `still-open again` after a line on its stdin.
struct WsClient {
    child: Child,
    out: std::io::Lines<BufReader<ChildStdout>>,
}

impl Drop for WsClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl WsClient {
    fn open(gate: &Gate, host: &str, cred: &str) -> WsClient {
        let script = r#"
import asyncio, base64, socket, ssl, sys, websockets
async def main():
    port, ca, host, cred = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    ctx = ssl.create_default_context(cafile=ca)
    sock = socket.create_connection(("127.0.0.1", int(port)))
    auth = "Basic " + base64.b64encode(cred.encode()).decode()
    async with websockets.connect("wss://%s:%s/ws" % (host, port), ssl=ctx, sock=sock,
            server_hostname=host, extra_headers={"Authorization": auth}) as ws:
        await ws.send("hi")
        print("open " + await ws.recv(), flush=True)
        line = asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        closed = asyncio.ensure_future(ws.wait_closed())
        done, _ = await asyncio.wait([line, closed], return_when=asyncio.FIRST_COMPLETED)
        if closed in done:
            print("closed", flush=True)
            return
        await ws.send("again")
        print("still-open " + await ws.recv(), flush=True)
asyncio.run(main())
"#;
        let mut child = Command::new("timeout")
            .args(["60", "/usr/bin/python3", "-c", script])
            .arg(gate.port.to_string())
            .arg(&gate.ca)
            .arg(host)
            .arg(cred)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut c = WsClient { child, out };
        assert_eq!(c.line(), "open hi", "websocket to {host}");
        c
    }

    fn line(&mut self) -> String {
        self.out.next().map(|l| l.unwrap()).unwrap_or_default()
    }

    /// `closed` or `still-open again`.
    fn state(&mut self) -> String {
        let mut stdin = self.child.stdin.take().unwrap();
        // The client may have ended already: a broken pipe is an answer too.
        let _ = stdin.write_all(b"check\n");
        let _ = stdin.flush();
        self.line()
    }
}

#[test]
fn websockets_end_when_the_login_changes_or_the_sandbox_is_removed() {
    let d = Daemon::builder(common::BIN)
        .args(&["--tls-mode", "internal"])
        .start();
    let (a_app, a_agent, b_app, b_agent) = (ws_echo(), ws_echo(), ws_echo(), ws_echo());
    let pw = write_secret(d.dir.path(), "pw", "correct horse\n");
    add(&d, "wsa", a_app.port, a_agent.port, Some(&pw));
    add(&d, "wsb", b_app.port, b_agent.port, Some(&pw));
    let gate = Gate::of(&d);
    let cred = "alice:correct horse";
    let mut wsa_agent = WsClient::open(&gate, "shelley.wsa.test", cred);
    let mut wsa_app = WsClient::open(&gate, "wsa.test", "x:y");
    let mut wsb_agent = WsClient::open(&gate, "shelley.wsb.test", cred);
    let mut wsb_app = WsClient::open(&gate, "wsb.test", "x:y");

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
    let mut wsa_agent = WsClient::open(&gate, "shelley.wsa.test", "alice:battery staple");

    // Removing wsb ends both its websockets; wsa's stay open.
    d.ok(&["remove", "wsb"]);
    assert_eq!(wsb_agent.line(), "closed");
    assert_eq!(wsb_app.line(), "closed");
    assert_eq!(wsa_agent.state(), "still-open again");
    assert_eq!(wsa_app.state(), "still-open again");

    // Removing wsa's login ends its agent websocket.
    let mut wsa_agent = WsClient::open(&gate, "shelley.wsa.test", "alice:battery staple");
    d.ok(&["auth", "wsa", "--remove"]);
    assert_eq!(wsa_agent.line(), "closed");
}
