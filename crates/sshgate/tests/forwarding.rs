//! Forwarding through the gateway: -L (TCP and unix socket), -D (SOCKS),
//! -R back to the client, -A agent forwarding, the VS Code Remote-SSH
//! pattern, and a never-answering -L destination that must not stall the
//! session's other channels.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use testsupport::{require, Component};

use common::*;

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn echo_roundtrip(port: u16, payload: &[u8]) -> Vec<u8> {
    let mut s = connect_when_ready(port);
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(payload).unwrap();
    let mut got = vec![0u8; payload.len()];
    s.read_exact(&mut got).unwrap();
    got
}

#[test]
fn local_forward_tcp_and_unix_socket() {
    if !require(&[Component::Sshd]) {
        return;
    }
    let h = harness().start();
    let echo = echo_server();
    let sock = h.path("echo.sock");
    let l = UnixListener::bind(&sock).unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut r = s.try_clone().unwrap();
                let mut w = s;
                let _ = std::io::copy(&mut r, &mut w);
            });
        }
    });
    let (lp, up) = (free_port(), free_port());
    let _ssh = Kill(
        h.ssh()
            .arg("-N")
            .arg("-L")
            .arg(format!("127.0.0.1:{lp}:127.0.0.1:{echo}"))
            .arg("-L")
            .arg(format!("127.0.0.1:{up}:{}", sock.display()))
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let payload: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    assert!(echo_roundtrip(lp, &payload) == payload);
    assert_eq!(
        echo_roundtrip(up, b"over a unix socket"),
        b"over a unix socket"
    );
}

/// True if `port` answers a SOCKS5 greeting (no authentication) as ssh's
/// `-D` listener does.
fn socks_greets(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut reply = [0u8; 2];
    s.write_all(&[5, 1, 0]).is_ok() && s.read_exact(&mut reply).is_ok() && reply == [5, 0]
}

/// `ssh -N -D 127.0.0.1:PORT` (from `ssh`) on a free port, returned once the
/// port answers as a SOCKS5 proxy. A parallel test can take the port between
/// `free_port` and ssh's bind: ssh then exits (ExitOnForwardFailure) and
/// another port is tried.
fn socks_forward(ssh: impl Fn() -> Command) -> (u16, Kill) {
    for _ in 0..5 {
        let dp = free_port();
        let mut child = Kill(
            ssh()
                .args(["-N", "-o", "ExitOnForwardFailure=yes", "-D"])
                .arg(format!("127.0.0.1:{dp}"))
                .stdin(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline && child.0.try_wait().unwrap().is_none() {
            if socks_greets(dp) {
                return (dp, child);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    panic!("ssh -D never came up");
}

#[test]
fn dynamic_forward_socks() {
    if !require(&[Component::Sshd, Component::Program("curl")]) {
        return;
    }
    let h = harness().start();
    let web = http_server("hello through socks");
    let (dp, _ssh) = socks_forward(|| h.ssh());
    let out = run(Command::new("curl")
        .args(["-sS", "--max-time", "20", "--socks5-hostname"])
        .arg(format!("127.0.0.1:{dp}"))
        .arg(format!("http://127.0.0.1:{web}/")));
    assert_eq!(
        text(&out.stdout),
        "hello through socks",
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn remote_forward_reaches_back_to_the_client() {
    if !require(&[Component::Sshd]) {
        return;
    }
    let h = harness().start();
    let echo = echo_server();
    let rp = free_port();
    let remote =
        format!("exec 3<>/dev/tcp/127.0.0.1/{rp}; echo ping-from-upstream >&3; head -n1 <&3");
    let out = run(h
        .ssh()
        .args(["-o", "ExitOnForwardFailure=yes", "-R"])
        .arg(format!("127.0.0.1:{rp}:127.0.0.1:{echo}"))
        .arg(remote));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "ping-from-upstream\n");
}

#[test]
fn remote_forward_with_dynamic_port_then_cancel() {
    if !require(&[Component::Sshd]) {
        return;
    }
    let h = harness().start();
    let echo = echo_server();
    let ctl = h.path("ctl.sock");
    let ctl_opt = format!("ControlPath={}", ctl.display());
    let _master = Kill(
        h.ssh()
            .args(["-N", "-o", "ControlMaster=yes", "-o", &ctl_opt])
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    eventually(Duration::from_secs(20), || ctl.exists().then_some(()));
    // `-R 0:...` lets the upstream pick the port; ssh prints it.
    let spec = format!("127.0.0.1:0:127.0.0.1:{echo}");
    let out = run(h.ssh().args(["-o", &ctl_opt, "-O", "forward", "-R", &spec]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let port: u16 = text(&out.stdout).trim().parse().unwrap();
    // The upstream sshd listens on this machine: connect to it directly.
    assert_eq!(echo_roundtrip(port, b"dynamic -R"), b"dynamic -R");
    // A fixed-port forward, then its cancellation.
    let fixed = free_port();
    let spec = format!("127.0.0.1:{fixed}:127.0.0.1:{echo}");
    let out = run(h.ssh().args(["-o", &ctl_opt, "-O", "forward", "-R", &spec]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(echo_roundtrip(fixed, b"fixed -R"), b"fixed -R");
    let cancel = spec;
    let port = fixed;
    let out = run(h
        .ssh()
        .args(["-o", &ctl_opt, "-O", "cancel", "-R", &cancel]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    eventually(Duration::from_secs(10), || {
        TcpStream::connect(("127.0.0.1", port))
            .is_err()
            .then_some(())
    });
}

#[test]
fn remote_forward_of_a_unix_socket() {
    if !require(&[Component::Sshd]) {
        return;
    }
    let h = harness().start();
    let echo = echo_server();
    let remote_sock = h.path("remote.sock");
    let spec = format!("{}:127.0.0.1:{echo}", remote_sock.display());
    let _ssh = Kill(
        h.ssh()
            .args(["-N", "-o", "ExitOnForwardFailure=yes", "-R", &spec])
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // The upstream sshd runs on this machine: its socket is right here.
    let mut s = eventually(Duration::from_secs(20), || {
        std::os::unix::net::UnixStream::connect(&remote_sock).ok()
    });
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(b"via streamlocal").unwrap();
    let mut got = [0u8; 15];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"via streamlocal");
}

#[test]
fn agent_forwarding_shows_the_clients_agent_upstream() {
    if !require(&[Component::Sshd]) {
        return;
    }
    let h = harness().start();
    let sock = h.path("agent.sock");
    let _agent = Kill(
        Command::new("ssh-agent")
            .arg("-D")
            .arg("-a")
            .arg(&sock)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    eventually(Duration::from_secs(10), || sock.exists().then_some(()));
    let add = run(Command::new("ssh-add")
        .env("SSH_AUTH_SOCK", &sock)
        .arg(&h.keys[0]));
    assert!(add.status.success(), "{}", text(&add.stderr));
    let mut c = Command::new("ssh");
    c.env("SSH_AUTH_SOCK", &sock)
        .args(h.ssh_opts())
        .args(["-A", "-p"])
        .arg(h.addr.port().to_string())
        .arg(format!("{}@127.0.0.1", h.sandbox))
        .arg("ssh-add -l");
    let out = run(&mut c);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("client0"),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn vscode_pattern_script_on_stdin_then_socks() {
    if !require(&[Component::Sshd, Component::Program("curl")]) {
        return;
    }
    let h = harness().start();
    let web = http_server("vscode server");
    let dp = free_port();
    let mut child = h
        .ssh()
        .args(["-T", "-D"])
        .arg(format!("127.0.0.1:{dp}"))
        .arg("bash")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(b"echo \"listeningOn==$((40000+1))==\"; echo marker-end\n")
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut seen = String::new();
    while !seen.contains("marker-end") {
        let mut line = String::new();
        assert!(out.read_line(&mut line).unwrap() > 0, "ssh ended: {seen}");
        seen.push_str(&line);
    }
    assert!(seen.contains("listeningOn==40001=="));
    let got = run(Command::new("curl")
        .args(["-sS", "--max-time", "20", "--socks5-hostname"])
        .arg(format!("127.0.0.1:{dp}"))
        .arg(format!("http://127.0.0.1:{web}/")));
    assert_eq!(text(&got.stdout), "vscode server", "{}", text(&got.stderr));
    stdin.write_all(b"exit 0\n").unwrap();
    drop(stdin);
    assert!(child.wait().unwrap().success());
}

/// A TCP listener whose accept queue is full: connects to it hang (SYNs
/// are dropped), like a destination that never answers.
fn blackhole() -> (u16, Vec<TcpStream>, std::net::TcpListener) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let listener = rt.block_on(async {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        s.listen(0).unwrap().into_std().unwrap()
    });
    let port = listener.local_addr().unwrap().port();
    let mut fillers = Vec::new();
    for _ in 0..8 {
        if let Ok(s) =
            TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200))
        {
            fillers.push(s);
        }
    }
    (port, fillers, listener)
}

#[test]
fn never_answering_destination_does_not_stall_other_channels() {
    if !require(&[Component::Sshd]) {
        return;
    }
    let h = harness().start();
    let (hole, _fillers, _l) = blackhole();
    let echo = echo_server();
    let (p_hole, p_echo) = (free_port(), free_port());
    let _ssh = Kill(
        h.ssh()
            .arg("-N")
            .arg("-L")
            .arg(format!("127.0.0.1:{p_hole}:127.0.0.1:{hole}"))
            .arg("-L")
            .arg(format!("127.0.0.1:{p_echo}:127.0.0.1:{echo}"))
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // Open several channels to the black hole; they stay pending.
    let mut pending = Vec::new();
    for _ in 0..3 {
        let mut s = connect_when_ready(p_hole);
        s.write_all(b"anyone?").unwrap();
        pending.push(s);
    }
    // The black hole really does not answer: no reply, no close.
    pending[0]
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 1];
    let err = pending[0].read(&mut buf).unwrap_err();
    assert!(matches!(
        err.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    ));
    // Meanwhile the same session keeps serving other channels promptly.
    for i in 0..5 {
        let t = Instant::now();
        let msg = format!("still flowing {i}");
        assert_eq!(echo_roundtrip(p_echo, msg.as_bytes()), msg.as_bytes());
        assert!(t.elapsed() < Duration::from_secs(5));
    }
    // And new sessions too.
    h.assert_serves();
}
