//! Bad input and load: random bytes, a truncated version line, a client
//! that stops mid-handshake, 1,000 connections opened and dropped, and 100
//! concurrent sessions; the gateway keeps serving throughout.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Stdio;
use std::time::{Duration, Instant};
use testsupport::{require, Component};

use common::*;

/// Read until the peer closes; returns how long that took.
fn closed_within(mut s: TcpStream, limit: Duration) -> bool {
    s.set_read_timeout(Some(limit)).unwrap();
    let t = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
        if t.elapsed() > limit {
            return false;
        }
    }
}

#[test]
fn garbage_and_truncated_version_lines_are_dropped() {
    if !require(&[Component::Sshd]) {
        return;
    }
    let h = harness().start();
    let mut random = vec![0u8; 64 * 1024];
    rand::Rng::fill(&mut rand::thread_rng(), &mut random[..]);
    let mut s = TcpStream::connect(h.addr).unwrap();
    let _ = s.write_all(&random);
    assert!(closed_within(s, Duration::from_secs(10)));

    let mut s = TcpStream::connect(h.addr).unwrap();
    s.write_all(b"SSH-2.0-trunc").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(closed_within(s, Duration::from_secs(10)));

    // A valid version line followed by a garbage packet.
    let mut s = TcpStream::connect(h.addr).unwrap();
    s.write_all(b"SSH-2.0-OpenSSH_9.2\r\n").unwrap();
    s.write_all(&[0xff; 64]).unwrap();
    assert!(closed_within(s, Duration::from_secs(10)));
    h.assert_serves();
}

#[test]
fn a_client_stalled_mid_handshake_is_cut_after_the_login_grace() {
    if !require(&[Component::Sshd]) {
        return;
    }
    let h = harness().login_grace(Duration::from_secs(2)).start();
    // Version line only, then silence.
    let mut a = TcpStream::connect(h.addr).unwrap();
    a.write_all(b"SSH-2.0-OpenSSH_9.2\r\n").unwrap();
    // Nothing at all.
    let b = TcpStream::connect(h.addr).unwrap();
    // Half a version line.
    let mut c = TcpStream::connect(h.addr).unwrap();
    c.write_all(b"SSH-2.0-Op").unwrap();
    // Others are served meanwhile.
    h.assert_serves();
    for s in [a, b, c] {
        assert!(closed_within(s, Duration::from_secs(10)));
    }
    h.assert_serves();
}

#[test]
fn a_thousand_dropped_connections_do_not_disturb_service() {
    if !require(&[Component::Sshd]) {
        return;
    }
    let h = harness()
        .config(|c| {
            // The probes must not meet the start-up limits' random early
            // drop while the churn is in flight (a slow machine keeps more
            // of it pending): this test is about leaks and crashes, the
            // limits have tests of their own.
            c.per_source_max_startups = sshgate::Startups::hard(1000);
            c.max_startups = sshgate::Startups::hard(2000);
        })
        .start();
    let addr = h.addr;
    let churn = std::thread::spawn(move || {
        for i in 0..1000u32 {
            if let Ok(mut s) = TcpStream::connect(addr) {
                match i % 3 {
                    0 => {}
                    1 => {
                        let _ = s.write_all(b"SSH-2.0-x\r\n");
                    }
                    _ => {
                        let _ = s.write_all(b"\x00\x01garbage");
                    }
                }
            }
        }
    });
    let mut served = 0;
    while !churn.is_finished() || served < 3 {
        h.assert_serves();
        served += 1;
    }
    churn.join().unwrap();
    h.assert_serves();
}

#[test]
fn a_hundred_concurrent_sessions_all_succeed() {
    if !require(&[Component::Sshd]) {
        return;
    }
    // One address logging in 100 times at once, 100 connections to one
    // sandbox: beyond the per-source and per-sandbox defaults; this test
    // is about the relay, so lift them.
    let h = harness()
        .config(|c| {
            c.per_source_max_startups = sshgate::Startups::hard(1000);
            c.max_sessions_per_sandbox = 1000;
        })
        .start();
    let children: Vec<_> = (0..100)
        .map(|i| {
            h.ssh()
                .arg(format!("echo session-{i}"))
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (i, c) in children.into_iter().enumerate() {
        let out = c.wait_with_output().unwrap();
        assert_eq!(
            text(&out.stdout),
            format!("session-{i}\n"),
            "{}",
            text(&out.stderr)
        );
    }
    h.wait_sessions(0);
}

#[test]
fn connections_beyond_the_login_limit_are_dropped_until_slots_free() {
    if !require(&[Component::Sshd]) {
        return;
    }
    let h = harness()
        .config(|c| c.max_startups = sshgate::Startups::hard(2))
        .login_grace(Duration::from_secs(3))
        .start();
    // Two clients sit in the handshake and hold both slots.
    let a = TcpStream::connect(h.addr).unwrap();
    let b = TcpStream::connect(h.addr).unwrap();
    // Make sure the gateway has accepted both (it sends its version line).
    for s in [&a, &b] {
        let mut s = s;
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"SSH-");
    }
    // A third is closed at once, before any version line.
    let c = TcpStream::connect(h.addr).unwrap();
    let t = Instant::now();
    assert!(closed_within(c, Duration::from_secs(2)));
    assert!(t.elapsed() < Duration::from_secs(2));
    // Once the stalled ones are gone (closed by the client here), logins work.
    drop(a);
    drop(b);
    eventually(Duration::from_secs(10), || {
        let out = h
            .ssh()
            .arg("echo ok")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (text(&out.stdout) == "ok\n").then_some(())
    });
    // A logged-in session does not hold a slot: two sessions plus a third login.
    let mut held: Vec<_> = (0..2)
        .map(|_| {
            h.ssh()
                .arg("sleep 30")
                .stdin(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    h.wait_sessions(2);
    h.assert_serves();
    for c in &mut held {
        let _ = c.kill();
        let _ = c.wait();
    }
}
