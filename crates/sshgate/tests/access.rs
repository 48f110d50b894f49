//! Who gets in and what people see when they cannot: several offered keys,
//! unknown user vs wrong key, per-address bans, stopped / unreachable
//! upstreams, pinned host keys.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};
use testsupport::{require, Component};

use common::*;
use sshgate::Target;

#[test]
fn several_keys_offered_right_one_last() {
    if !require(&[Component::Sshd]) {
        return;
    }
    let h = harness().client_keys(5).start();
    let mut c = Command::new("ssh");
    c.args(h.ssh_opts())
        .args(["-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none"]);
    // Wrong keys first, the authorized keys[0] last.
    for k in h.keys[1..].iter().chain(std::iter::once(&h.keys[0])) {
        c.arg("-i").arg(k);
    }
    c.arg("-p")
        .arg(h.addr.port().to_string())
        .arg(format!("{}@127.0.0.1", h.sandbox))
        .arg("echo in");
    let out = run(&mut c);
    assert_eq!(text(&out.stdout), "in\n", "{}", text(&out.stderr));
    // Trying wrong keys before the right one is not a failed login.
    assert!(!h.gateway.is_banned(h.addr));
}

#[test]
fn unknown_user_and_wrong_key_fail_the_same_way() {
    if !require(&[Component::Sshd]) {
        return;
    }
    let h = harness().client_keys(2).start();
    let wrong_key = run(h.ssh_as(&h.sandbox, &h.keys[1]).arg("true"));
    let unknown_user = run(h.ssh_as("no-such-sandbox", &h.keys[0]).arg("true"));
    assert_eq!(wrong_key.status.code(), Some(255));
    assert_eq!(unknown_user.status.code(), Some(255));
    let norm = |b: &[u8]| {
        text(b)
            .replace("no-such-sandbox", "USER")
            .replace(&h.sandbox, "USER")
    };
    assert_eq!(norm(&wrong_key.stderr), norm(&unknown_user.stderr));
    assert!(text(&wrong_key.stderr).contains("Permission denied (publickey)"));
}

#[test]
fn repeated_failures_ban_that_address_only_and_the_ban_expires() {
    if !require(&[Component::Sshd]) {
        return;
    }
    let h = harness()
        .client_keys(2)
        .ban(2, Duration::from_secs(4))
        .start();
    for _ in 0..3 {
        let out = run(h.ssh_as(&h.sandbox, &h.keys[1]).arg("true"));
        assert_eq!(out.status.code(), Some(255));
    }
    let banned_at = Instant::now();
    // Now even the right key from 127.0.0.1 is refused at once...
    let out = run(h.ssh().arg("true"));
    assert_eq!(out.status.code(), Some(255));
    assert!(
        !text(&out.stderr).contains("Permission denied"),
        "{}",
        text(&out.stderr)
    );
    // ...while another source address logs in.
    let out = run(h.ssh().args(["-b", "127.0.0.2"]).arg("echo other"));
    assert_eq!(text(&out.stdout), "other\n", "{}", text(&out.stderr));
    // The ban expires.
    while banned_at.elapsed() < Duration::from_secs(4) {
        std::thread::sleep(Duration::from_millis(100));
    }
    h.assert_serves();
}

fn assert_one_line_refusal(h: &Harness, expect: &str) {
    let t = Instant::now();
    let out = run(h.ssh().arg("true"));
    assert_eq!(out.status.code(), Some(255));
    let err = text(&out.stderr);
    assert!(err.contains(expect), "expected {expect:?} in {err:?}");
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "took {:?}",
        t.elapsed()
    );
    // An interactive-style session without a command shows it too.
    let out = run(h.ssh().arg("-T"));
    assert!(text(&out.stderr).contains(expect), "{}", text(&out.stderr));
    // A forward-only client gets it as the disconnect reason.
    let out = run(h.ssh().arg("-N"));
    assert!(text(&out.stderr).contains(expect), "{}", text(&out.stderr));
}

#[test]
fn stopped_sandbox_says_so() {
    if !require(&[Component::Sshd]) {
        return;
    }
    let h = harness().target(Target::Stopped).start();
    assert_one_line_refusal(&h, "sandbox app-example-com is stopped");
}

#[test]
fn unreachable_sandbox_says_so_promptly() {
    if !require(&[Component::Sshd]) {
        return;
    }
    let closed = free_port();
    let h = harness()
        .target(Target::Addr {
            host: "127.0.0.1".into(),
            port: closed,
        })
        .start();
    assert_one_line_refusal(&h, "sandbox app-example-com is unreachable");
}

#[test]
fn upstream_that_never_answers_times_out() {
    if !require(&[Component::Sshd]) {
        return;
    }
    // A listener that accepts but never speaks SSH.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let h = harness()
        .target(Target::Addr {
            host: "127.0.0.1".into(),
            port,
        })
        .config(|c| c.connect_timeout = Duration::from_secs(2))
        .start();
    let t = Instant::now();
    let out = run(h.ssh().arg("true"));
    assert!(
        text(&out.stderr).contains("is unreachable"),
        "{}",
        text(&out.stderr)
    );
    assert!(t.elapsed() < Duration::from_secs(8));
    drop(l);
}

#[test]
fn wrong_upstream_host_key_is_refused() {
    if !require(&[Component::Sshd]) {
        return;
    }
    let h = harness().wrong_pinned_host_key().start();
    assert_one_line_refusal(&h, "host key mismatch");
}

#[test]
fn missing_pinned_host_key_is_refused() {
    if !require(&[Component::Sshd]) {
        return;
    }
    let h = harness().no_pinned_host_key().start();
    assert_one_line_refusal(&h, "has no pinned host key");
}

#[test]
fn persistent_host_keys_serve_ed25519_and_rsa_sha2_clients() {
    if !require(&[Component::Sshd]) {
        return;
    }
    let h = harness().host_keys_from_dir().start();
    for alg in ["ssh-ed25519", "rsa-sha2-512", "rsa-sha2-256"] {
        let out = run(h
            .ssh()
            .args(["-o", &format!("HostKeyAlgorithms={alg}")])
            .arg("echo ok"));
        assert_eq!(text(&out.stdout), "ok\n", "{alg}: {}", text(&out.stderr));
    }
}

#[test]
fn ipv6_listener_serves_the_same_routes() {
    if !require(&[Component::Sshd]) {
        return;
    }
    let h = harness().ipv6().start();
    let a6 = h.addr6.unwrap();
    let mut c = Command::new("ssh");
    c.args(h.ssh_opts())
        .args(["-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none", "-i"])
        .arg(&h.keys[0])
        .arg("-p")
        .arg(a6.port().to_string())
        .arg(format!("{}@::1", h.sandbox))
        .arg("echo v6; sleep 1");
    let child = c
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let sessions = h.wait_sessions(1);
    assert!(
        sessions[0].client_addr.starts_with("[::1]:"),
        "{:?}",
        sessions[0]
    );
    let out = child.wait_with_output().unwrap();
    assert_eq!(text(&out.stdout), "v6\n", "{}", text(&out.stderr));
    h.assert_serves();
}
