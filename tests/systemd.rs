//! systemd integration: the real daemon binary talks the sd_notify protocol
//! to a real unix datagram socket given as `NOTIFY_SOCKET` (readiness only
//! once the SSH port accepts, watchdog pings at the requested rate and only
//! for the right PID, `STOPPING=1` on SIGTERM), and the shipped unit file
//! passes `systemd-analyze verify` and scores at most 4.5 ("OK") in
//! `systemd-analyze security --offline=true`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use testsupport::{require, Component};

const BIN: &str = env!("CARGO_BIN_EXE_sandboxd");
const UNIT: &str = include_str!("../systemd/sandboxd.service");

/// A daemon started with `NOTIFY_SOCKET` pointing at our own socket.
struct Notified {
    dir: tempfile::TempDir,
    socket: UnixDatagram,
    child: Option<Child>,
}

impl Notified {
    fn start(env: &[(&str, String)]) -> Notified {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        let log = std::fs::File::create(dir.path().join("daemon.log")).unwrap();
        let mut cmd = Command::new(BIN);
        cmd.arg("serve")
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--admin-socket")
            .arg(dir.path().join("admin.sock"))
            .args(["--ssh-listen", "127.0.0.1:0"])
            .args(["--https-listen", "127.0.0.1:0"])
            .args(["--http-listen", "127.0.0.1:0"])
            // No Incus needed for these tests: point it at nothing.
            .arg("--incus-socket")
            .arg(dir.path().join("no-incus.sock"))
            .env("NOTIFY_SOCKET", &path)
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap();
        Notified {
            dir,
            socket,
            child: Some(child),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// The next datagram, or `None` after `limit`.
    fn recv(&self, limit: Duration) -> Option<String> {
        self.socket.set_read_timeout(Some(limit)).unwrap();
        let mut buf = vec![0u8; 4096];
        match self.socket.recv(&mut buf) {
            Ok(n) => Some(String::from_utf8(buf[..n].to_vec()).unwrap()),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                None
            }
            Err(e) => panic!("recv: {e}"),
        }
    }

    /// Waits for the READY=1 message and returns it.
    fn ready(&self) -> String {
        let msg = self
            .recv(Duration::from_secs(30))
            .unwrap_or_else(|| panic!("no READY=1 within 30 s:\n{}", self.log()));
        assert!(
            msg.lines().any(|l| l == "READY=1"),
            "first message is not READY=1: {msg:?}"
        );
        msg
    }

    fn sigterm(&self) {
        let pid = self.child.as_ref().unwrap().id();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
    }

    fn wait(&mut self) -> std::process::ExitStatus {
        self.child.take().unwrap().wait().unwrap()
    }
}

impl Drop for Notified {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `ssh 127.0.0.1:PORT` out of the STATUS= line.
fn ssh_addr(msg: &str) -> String {
    let status = msg
        .lines()
        .find_map(|l| l.strip_prefix("STATUS="))
        .unwrap_or_else(|| panic!("no STATUS= in {msg:?}"));
    status
        .split(';')
        .find_map(|part| part.trim().strip_prefix("ssh "))
        .unwrap_or_else(|| panic!("no ssh address in {status:?}"))
        .split(',')
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn ready_is_sent_once_the_ssh_port_accepts() {
    let d = Notified::start(&[]);
    let msg = d.ready();
    // At the moment READY=1 arrives the SSH router already answers with its
    // banner: systemd may start dependants now.
    let addr = ssh_addr(&msg);
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut banner = [0u8; 8];
    s.read_exact(&mut banner).unwrap();
    assert_eq!(&banner, b"SSH-2.0-", "from {addr}");
    assert!(msg.contains("serving 0 sandboxes"), "{msg:?}");
    // Without a watchdog nothing else is sent while it runs.
    assert_eq!(d.recv(Duration::from_millis(500)), None);
}

#[test]
fn watchdog_pings_at_half_the_requested_period() {
    // WATCHDOG_USEC=400 ms: a ping every 200 ms.
    let d = Notified::start(&[("WATCHDOG_USEC", "400000".to_string())]);
    d.ready();
    let start = Instant::now();
    let mut pings = 0;
    while start.elapsed() < Duration::from_secs(2) {
        if let Some(m) = d.recv(Duration::from_millis(500)) {
            assert_eq!(m, "WATCHDOG=1");
            pings += 1;
        }
    }
    // 2 s / 200 ms = 10 nominal; never as slow as the 400 ms deadline.
    assert!((8..=12).contains(&pings), "{pings} pings in 2 s");
}

#[test]
fn watchdog_meant_for_another_pid_is_not_pinged() {
    let d = Notified::start(&[
        ("WATCHDOG_USEC", "200000".to_string()),
        ("WATCHDOG_PID", "1".to_string()),
    ]);
    d.ready();
    assert_eq!(d.recv(Duration::from_millis(800)), None);
}

#[test]
fn stopping_is_sent_on_sigterm_and_the_daemon_exits_cleanly() {
    let mut d = Notified::start(&[]);
    d.ready();
    d.sigterm();
    let msg = d
        .recv(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no STOPPING=1:\n{}", d.log()));
    assert!(msg.lines().any(|l| l == "STOPPING=1"), "{msg:?}");
    assert!(d.wait().success(), "{}", d.log());
}

#[test]
fn abstract_notify_socket_is_understood() {
    let name = format!(
        "sandboxd-test-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    );
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let listener = UnixDatagram::bind_addr(&addr).unwrap();
    let mut d = Notified::start(&[("NOTIFY_SOCKET", format!("@{name}"))]);
    listener
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = listener
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("{e}:\n{}", d.log()));
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("READY=1\n"));
    d.sigterm();
    assert!(d.wait().success());
}

/// The unit with ExecStart= pointing at the binary just built: `verify`
/// insists that the program exists, and /usr/local/bin/sandboxd does not
/// on a test machine.
fn unit_copy() -> (tempfile::TempDir, PathBuf) {
    assert!(
        UNIT.contains("ExecStart=/usr/local/bin/sandboxd serve"),
        "unexpected ExecStart"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sandboxd.service");
    std::fs::write(&path, UNIT.replace("/usr/local/bin/sandboxd", BIN)).unwrap();
    (dir, path)
}

fn systemd_analyze(args: &[&str], unit: &Path) -> std::process::Output {
    Command::new("systemd-analyze")
        .args(args)
        .arg(unit)
        .output()
        .expect("systemd-analyze (install the systemd package: .ci/setup-host.sh)")
}

#[test]
fn unit_passes_systemd_analyze_verify() {
    if !require(&[Component::Program("systemd-analyze")]) {
        return;
    }
    let (_dir, unit) = unit_copy();
    let out = systemd_analyze(&["verify"], &unit);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "verify failed: {stderr}");
    assert!(stderr.trim().is_empty(), "verify complained: {stderr}");
    // The unit relies on the daemon's notify support.
    for line in [
        "Type=notify",
        "NotifyAccess=main",
        "WatchdogSec=",
        "User=sandboxd",
        // Resource ceilings (systemd/README.md, "Resource limits").
        "MemoryMax=1G",
        "TasksMax=1024",
    ] {
        assert!(UNIT.lines().any(|l| l.starts_with(line)), "{line} missing");
    }
}

#[test]
fn unit_security_exposure_is_ok() {
    if !require(&[Component::Program("systemd-analyze")]) {
        return;
    }
    let (_dir, unit) = unit_copy();
    let out = systemd_analyze(&["security", "--offline=true", "--no-pager"], &unit);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| {
            panic!(
                "no exposure line:\n{stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let figure: f64 = line
        .rsplit(':')
        .next()
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    println!("systemd-analyze security: {figure}");
    assert!(figure <= 4.5, "exposure {figure} > 4.5:\n{stdout}");
}
