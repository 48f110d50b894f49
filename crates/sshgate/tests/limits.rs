//! Abuse limits with real OpenSSH and raw TCP: stalled connections from one
//! address, login-grace timeouts and the ban, channels per connection,
//! connections per sandbox, revocation of a key's live sessions, and the
//! algorithms ssh-audit judges.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;
use testsupport::{require, Component};

use common::*;

/// The first thing the gateway does with a TCP connection from the test:
/// `true` if it greeted it with its version line, `false` if it closed it.
fn greeted(mut s: &TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 4];
    match s.read(&mut buf) {
        Ok(0) => false,
        Ok(_) => buf.starts_with(b"SSH-") || buf.starts_with(b"S"),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => false,
        Err(e) => panic!("no answer from the gateway: {e}"),
    }
}

fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

#[test]
fn three_hundred_stalled_connections_from_one_address_do_not_lock_out_another() {
    if !require(&[Component::Sshd]) {
        return;
    }
    let h = harness().start();
    // 300 connections from 127.0.0.1 that never log in: half send nothing,
    // half only a version line.
    let stalled: Vec<TcpStream> = (0..300)
        .map(|i| {
            let mut s = TcpStream::connect(h.addr).unwrap();
            if i % 2 == 1 {
                let _ = s.write_all(b"SSH-2.0-OpenSSH_9.2\r\n");
            }
            s
        })
        .collect();
    // Another address logs in at once.
    let out = run(h.ssh().args(["-b", "127.0.0.2"]).arg("echo other"));
    assert_eq!(text(&out.stdout), "other\n", "{}", text(&out.stderr));
    // The gateway kept only a few of the 300 (per_source_max_startups
    // 10:30:20 by default) and closed the others at once.
    let kept = stalled.iter().filter(|s| greeted(s)).count();
    assert!((1..=20).contains(&kept), "kept {kept} of 300");
}

#[test]
fn connections_that_time_out_in_login_grace_get_their_address_banned() {
    if !require(&[Component::Sshd]) {
        return;
    }
    let h = harness()
        .ban(2, Duration::from_secs(600))
        .login_grace(Duration::from_secs(1))
        .start();
    // Three connections from 127.0.0.1 sit silent until the gateway cuts
    // them at the end of the login grace time.
    for _ in 0..3 {
        let mut s = TcpStream::connect(h.addr).unwrap();
        assert!(closed_within(&mut s, Duration::from_secs(20)));
    }
    // That was three failed logins: 127.0.0.1 is banned, even with the
    // right key...
    let out = run(h.ssh().arg("echo in"));
    assert_eq!(out.status.code(), Some(255), "{}", text(&out.stdout));
    // ...while 127.0.0.2 logs in.
    let out = run(h.ssh().args(["-b", "127.0.0.2"]).arg("echo other"));
    assert_eq!(text(&out.stdout), "other\n", "{}", text(&out.stderr));
}

#[test]
fn channels_beyond_the_per_connection_limit_are_refused() {
    if !require(&[Component::Sshd]) {
        return;
    }
    let h = harness()
        .config(|c| c.max_channels_per_connection = 4)
        .start();
    let echo = echo_server();
    let local = free_port();
    let mut fwd = h
        .ssh()
        .args(["-N", "-o", "ExitOnForwardFailure=yes", "-L"])
        .arg(format!("{local}:127.0.0.1:{echo}"))
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let first = connect_when_ready(local);
    let mut open = vec![first];
    for _ in 0..5 {
        open.push(TcpStream::connect(("127.0.0.1", local)).unwrap());
    }
    // Each local connection is one direct-tcpip channel: the first four
    // echo, the fifth and sixth are refused (the client closes them).
    let mut echoed = 0;
    for s in &mut open {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.write_all(b"ping");
        let mut buf = [0u8; 4];
        match s.read_exact(&mut buf) {
            Ok(()) if &buf == b"ping" => echoed += 1,
            Ok(()) => panic!("garbled echo"),
            Err(e) => assert!(
                matches!(
                    e.kind(),
                    std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
                ),
                "{e}"
            ),
        }
    }
    assert_eq!(echoed, 4);
    // Closing channels frees their places.
    open.clear();
    eventually(Duration::from_secs(10), || {
        let mut s = TcpStream::connect(("127.0.0.1", local)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"pong").ok()?;
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).ok()?;
        (&buf == b"pong").then_some(())
    });
    let _ = fwd.kill();
    let out = fwd.wait_with_output().unwrap();
    assert!(
        text(&out.stderr).contains("resource shortage"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn connections_beyond_the_per_sandbox_limit_are_told_so() {
    if !require(&[Component::Sshd]) {
        return;
    }
    let h = harness().config(|c| c.max_sessions_per_sandbox = 2).start();
    let mut held: Vec<_> = (0..2)
        .map(|_| {
            h.ssh()
                .arg("sleep 60")
                .stdin(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    h.wait_sessions(2);
    let out = run(h.ssh().arg("echo third"));
    assert_eq!(out.status.code(), Some(255));
    assert_eq!(text(&out.stdout), "");
    assert!(
        text(&out.stderr).contains("too many open connections"),
        "{}",
        text(&out.stderr)
    );
    // One goes away: a new login works again.
    let mut first = held.remove(0);
    let _ = first.kill();
    let _ = first.wait();
    h.wait_sessions(1);
    h.assert_serves();
    for mut c in held {
        let _ = c.kill();
        let _ = c.wait();
    }
}

#[test]
fn removing_a_key_ends_that_keys_sessions_only() {
    if !require(&[Component::Sshd]) {
        return;
    }
    let h = harness().client_keys(2).start();
    let mut route = h.routes.get(&h.sandbox);
    route.authorized_keys.push(read_pub(&h.keys[1]));
    h.routes.set(route.clone());
    let spawn = |key: usize| {
        h.ssh_as(&h.sandbox, &h.keys[key])
            .arg("echo up; sleep 60")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let a = spawn(0);
    let mut b = spawn(1);
    h.wait_sessions(2);
    // An unrelated edit (another sandbox appears) ends nothing.
    let mut other = route.clone();
    other.sandbox = "other".into();
    h.routes.set(other);
    assert_eq!(h.gateway.routes_changed(), 0);
    // Key A is removed from the route.
    route.authorized_keys.remove(0);
    h.routes.set(route);
    assert_eq!(h.gateway.routes_changed(), 1);
    let out = a.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(255));
    assert!(
        text(&out.stderr).contains("key removed"),
        "{}",
        text(&out.stderr)
    );
    // B's session goes on.
    let left = h.wait_sessions(1);
    assert_eq!(
        left[0].key_fingerprint,
        sshgate::fingerprint(&read_pub(&h.keys[1]))
    );
    assert!(b.try_wait().unwrap().is_none());
    // Removing the sandbox ends the rest.
    h.routes.remove(&h.sandbox);
    assert_eq!(h.gateway.routes_changed(), 1);
    let status = b.wait().unwrap();
    assert_eq!(status.code(), Some(255));
}

#[test]
fn ssh_audit_finds_no_failure_and_openssh_rsa_sha2_still_works() {
    if !require(&[Component::Sshd]) {
        return;
    }
    let h = harness().host_keys_from_dir().start();
    let out = Command::new("ssh-audit")
        .args(["-j", "-t", "20", "-p"])
        .arg(h.addr.port().to_string())
        .arg("127.0.0.1")
        .output()
        .expect("ssh-audit (Debian package ssh-audit, .ci/setup-sshgate.sh)");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", text(&out.stdout)));
    // ssh-audit's exit code (2.5.0): 0 good, 2 warnings, 3 failures, 1 no
    // connection; its text report marks each failing item "[fail]".
    let plain = Command::new("ssh-audit")
        .args(["-n", "-t", "20", "-p"])
        .arg(h.addr.port().to_string())
        .arg("127.0.0.1")
        .output()
        .unwrap();
    let report_text = text(&plain.stdout);
    let failures: Vec<&str> = report_text
        .lines()
        .filter(|l| l.contains("[fail]"))
        .collect();
    assert!(failures.is_empty(), "{failures:#?}");
    for status in [out.status, plain.status] {
        assert!(
            matches!(status.code(), Some(0 | 2)),
            "{status:?} {report_text}"
        );
    }
    let keys: Vec<&str> = report["key"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|k| k["algorithm"].as_str())
        .collect();
    assert!(!keys.contains(&"ssh-rsa"), "{keys:?}");
    assert!(keys.contains(&"rsa-sha2-512"), "{keys:?}");
    let compression: Vec<&str> = report["compression"]
        .as_array()
        .map(|a| a.iter().filter_map(|c| c.as_str()).collect())
        .unwrap_or_default();
    assert!(!compression.contains(&"zlib"), "{compression:?}");
    // An RSA-only OpenSSH client, and one that asks for compression, log in.
    for opts in [vec!["-o", "HostKeyAlgorithms=rsa-sha2-256"], vec!["-C"]] {
        let out = run(h.ssh().args(&opts).arg("echo ok"));
        assert_eq!(text(&out.stdout), "ok\n", "{opts:?}: {}", text(&out.stderr));
    }
    // A client that insists on SHA-1 RSA signatures finds nothing in common.
    let out = run(h
        .ssh()
        .args(["-o", "HostKeyAlgorithms=ssh-rsa"])
        .arg("true"));
    assert_eq!(out.status.code(), Some(255));
}
