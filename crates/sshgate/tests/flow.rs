//! Flow control and truthful replies through the gateway, with the real
//! OpenSSH client multiplexing channels over one connection (ControlMaster)
//! and a real sshd upstream: a channel whose far end stops reading, in
//! either direction, leaves the connection's other channels working; a
//! request the upstream refuses (subsystem, pty, remote forward) is
//! reported to the client as refused, by the client itself.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
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

/// Run a command to its end, failing the test if it takes longer than
/// `limit` (a stalled connection would hang it forever). Output goes to
/// files: a multiplexed ssh hands its descriptors to the master, so pipes
/// would not close when it ends.
fn run_within(c: &mut Command, limit: Duration) -> Output {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let dir = tempfile::tempdir().unwrap();
    let n = SEQ.fetch_add(1, Ordering::SeqCst);
    let (out_path, err_path) = (
        dir.path().join(format!("out{n}")),
        dir.path().join(format!("err{n}")),
    );
    let mut child = c
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{c:?} did not finish within {limit:?}: the connection stalled ({})",
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: std::fs::read(&out_path).unwrap(),
        stderr: std::fs::read(&err_path).unwrap(),
    }
}

/// Wait until `counter` reached `min` and then stopped moving for a second:
/// the pipeline behind it is full.
fn wait_stalled(counter: &AtomicU64, min: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut last = u64::MAX;
    let mut since = Instant::now();
    loop {
        let now = counter.load(Ordering::SeqCst);
        if now != last {
            last = now;
            since = Instant::now();
        } else if now >= min && since.elapsed() >= Duration::from_secs(1) {
            return now;
        }
        assert!(Instant::now() < deadline, "never stalled ({now} bytes)");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A TCP service that accepts connections and never reads from them.
fn sink_server() -> (u16, Arc<Mutex<Vec<TcpStream>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let held = Arc::new(Mutex::new(Vec::new()));
    let h = held.clone();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            h.lock().unwrap().push(s);
        }
    });
    (port, held)
}

/// A TCP service that sends to every connection until the peer goes away
/// (at most 4 GiB), counting what the kernel accepted.
fn firehose_server(sent: Arc<AtomicU64>) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let sent = sent.clone();
            std::thread::spawn(move || {
                let chunk = vec![0x5au8; 64 * 1024];
                for _ in 0..(4u64 << 30) / chunk.len() as u64 {
                    if s.write_all(&chunk).is_err() {
                        return;
                    }
                    sent.fetch_add(chunk.len() as u64, Ordering::SeqCst);
                }
            });
        }
    });
    port
}

/// An OpenSSH ControlMaster connection through the gateway with an echo
/// `-L` forward and `extra` forwards; commands go through its socket.
struct Master {
    ctl: PathBuf,
    echo_port: u16,
    _ssh: Kill,
}

fn master(h: &Harness, extra: &[String]) -> Master {
    let echo = echo_server();
    let echo_port = free_port();
    let ctl = h.path("ctl.sock");
    let ssh = Kill(
        h.ssh()
            .args(["-N", "-o", "ControlMaster=yes", "-o"])
            .arg(format!("ControlPath={}", ctl.display()))
            .arg("-L")
            .arg(format!("127.0.0.1:{echo_port}:127.0.0.1:{echo}"))
            .args(extra)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    eventually(Duration::from_secs(20), || ctl.exists().then_some(()));
    Master {
        ctl,
        echo_port,
        _ssh: ssh,
    }
}

impl Master {
    /// `ssh` through the master's socket (a new session channel on the
    /// same connection).
    fn ssh(&self, h: &Harness) -> Command {
        let mut c = h.ssh();
        c.args(["-o", "ControlMaster=no", "-o"])
            .arg(format!("ControlPath={}", self.ctl.display()));
        c
    }

    /// Every kind of channel on this connection still answers promptly.
    fn assert_other_channels_work(&self, h: &Harness) {
        for i in 0..3 {
            let t = Instant::now();
            let out = run_within(
                self.ssh(h).arg(format!("echo exec-{i}")),
                Duration::from_secs(15),
            );
            assert_eq!(
                text(&out.stdout),
                format!("exec-{i}\n"),
                "{}",
                text(&out.stderr)
            );
            assert!(t.elapsed() < Duration::from_secs(10));
        }
        // A terminal session.
        let out = run_within(
            self.ssh(h).args(["-tt", "tty; echo pty-ok"]),
            Duration::from_secs(15),
        );
        let shown = text(&out.stdout);
        assert!(
            shown.contains("/dev/pts/") && shown.contains("pty-ok"),
            "{shown}"
        );
        // Another -L channel on the same connection.
        let mut s = connect_when_ready(self.echo_port);
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"still flowing").unwrap();
        let mut got = [0u8; 13];
        s.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"still flowing");
    }
}

#[test]
fn a_destination_that_stops_reading_does_not_stall_the_connection() {
    if !require(&[Component::Sshd]) {
        return;
    }
    let h = harness().start();
    let (sink, _held) = sink_server();
    let lp = free_port();
    let m = master(
        &h,
        &["-L".into(), format!("127.0.0.1:{lp}:127.0.0.1:{sink}")],
    );
    // Push 64 MiB towards a service that never reads.
    let s = connect_when_ready(lp);
    let closer = s.try_clone().unwrap();
    let written = Arc::new(AtomicU64::new(0));
    let w = written.clone();
    let writer = std::thread::spawn(move || {
        let mut s = s;
        let chunk = vec![0xa5u8; 256 * 1024];
        for _ in 0..256 {
            if s.write_all(&chunk).is_err() {
                return;
            }
            w.fetch_add(chunk.len() as u64, Ordering::SeqCst);
        }
    });
    let stuck_at = wait_stalled(&written, 1 << 20);
    assert!(stuck_at < 64 << 20, "the sink never pushed back");
    m.assert_other_channels_work(&h);
    // The stuck channel is still held back (nothing was dropped).
    assert!(written.load(Ordering::SeqCst) < 64 << 20);
    let _ = closer.shutdown(Shutdown::Both);
    let _ = writer.join();
    h.assert_serves();
}

#[test]
fn a_client_that_stops_reading_does_not_stall_the_connection() {
    if !require(&[Component::Sshd]) {
        return;
    }
    let h = harness().start();
    let sent = Arc::new(AtomicU64::new(0));
    let hose = firehose_server(sent.clone());
    let lp = free_port();
    let m = master(
        &h,
        &["-L".into(), format!("127.0.0.1:{lp}:127.0.0.1:{hose}")],
    );
    // Open the forward and never read from it.
    let s = connect_when_ready(lp);
    let stuck_at = wait_stalled(&sent, 1 << 20);
    m.assert_other_channels_work(&h);
    // The upstream service is still held back, not drained into memory.
    assert!(sent.load(Ordering::SeqCst) < stuck_at + (64 << 20));
    drop(s);
    h.assert_serves();
}

#[test]
fn refused_requests_are_reported_as_refused() {
    if !require(&[Component::Sshd]) {
        return;
    }
    let h = harness().start();
    // A subsystem the upstream sshd does not have: the client is told the
    // request failed (its own message), not that it succeeded.
    let out = run_within(
        h.ssh().args(["-s", "no-such-subsystem"]),
        Duration::from_secs(20),
    );
    assert_eq!(out.status.code(), Some(255), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("subsystem request failed"),
        "{}",
        text(&out.stderr)
    );
    // A remote forward the upstream cannot bind (the port is taken):
    // `ssh -R` reports it and, with ExitOnForwardFailure, exits non-zero.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let echo = echo_server();
    let t = Instant::now();
    let out = run_within(
        h.ssh()
            .args(["-o", "ExitOnForwardFailure=yes", "-R"])
            .arg(format!("127.0.0.1:{port}:127.0.0.1:{echo}"))
            .arg("sleep 30"),
        Duration::from_secs(25),
    );
    assert_eq!(out.status.code(), Some(255), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("remote port forwarding failed"),
        "{}",
        text(&out.stderr)
    );
    assert!(t.elapsed() < Duration::from_secs(20));
    // Exec and env requests the upstream accepts still succeed.
    let out = run_within(
        h.ssh()
            .args(["-o", "SetEnv=TESTVAR_FLOW=yes"])
            .arg("echo $TESTVAR_FLOW"),
        Duration::from_secs(20),
    );
    assert_eq!(text(&out.stdout), "yes\n", "{}", text(&out.stderr));
}

#[test]
fn a_pty_the_upstream_refuses_is_reported_by_the_client_itself() {
    if !require(&[Component::Sshd]) {
        return;
    }
    // sshd answers pty-req with failure; OpenSSH prints its own message
    // only when it really gets that failure, and behaves as it does
    // against that sshd directly.
    let h = harness().sshd_config("PermitTTY no\n").start();
    let direct = run_within(
        h.ssh_direct().args(["-tt", "true"]),
        Duration::from_secs(20),
    );
    let out = run_within(h.ssh().args(["-tt", "true"]), Duration::from_secs(20));
    for o in [&direct, &out] {
        assert!(
            text(&o.stderr).contains("PTY allocation request failed on channel"),
            "{}",
            text(&o.stderr)
        );
    }
    assert_eq!(out.status.code(), direct.status.code());
}
