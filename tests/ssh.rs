//! The SSH router wired into the real daemon: `add` then `ssh -p PORT
//! NAME@127.0.0.1` with the real OpenSSH client to a real sshd.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use testsupport::{require, Component};

use common::sshd::Sshd;
use common::Daemon;

struct Setup {
    d: Daemon,
    sshd: Sshd,
    key: PathBuf,
    known_hosts: PathBuf,
    port: String,
}

fn setup(name: &str) -> Setup {
    let d = Daemon::start(common::BIN);
    let sshd = Sshd::start(d.dir.path(), name);
    let key = d.keygen(&format!("client-{name}"));
    let user = "root";
    d.ok(&[
        "add",
        name,
        "--domain",
        &format!("{name}.example.test"),
        "--upstream",
        "127.0.0.1",
        "--ssh-port",
        &sshd.port.to_string(),
        "--user",
        user,
        "--ssh-key",
        key.to_str().unwrap(),
        "--upstream-host-key",
        sshd.host_pub.to_str().unwrap(),
    ]);
    let show = d.json(&["show", name, "--json"]);
    sshd.authorize(show["upstream_public_key"].as_str().unwrap());
    let (port, known_hosts) = d.gateway_known_hosts();
    Setup {
        d,
        sshd,
        key: key.with_extension(""),
        known_hosts,
        port,
    }
}

fn ssh_cmd(s: &Setup, user: &str, key: &Path) -> Command {
    let mut c = Command::new("ssh");
    c.args([
        "-F",
        "/dev/null",
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        "IdentitiesOnly=yes",
    ])
    .arg("-o")
    .arg(format!("UserKnownHostsFile={}", s.known_hosts.display()))
    .arg("-i")
    .arg(key)
    .args(["-p", &s.port])
    .arg(format!("{user}@127.0.0.1"));
    c
}

fn run(mut c: Command) -> Output {
    c.stdin(Stdio::null()).output().unwrap()
}

#[test]
fn ssh_through_the_daemon_right_after_add() {
    if !require(&[Component::Sshd]) {
        return;
    }
    let s = setup("web");
    let out = run({
        let mut c = ssh_cmd(&s, "web", &s.key);
        c.arg("echo out; echo err >&2; exit 7");
        c
    });
    assert_eq!(
        out.status.code(),
        Some(7),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        s.d.log_text()
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("err"));

    // Unknown user and wrong key fail the same way.
    let other = s.d.keygen("stranger");
    let other = other.with_extension("");
    let unknown = run({
        let mut c = ssh_cmd(&s, "nobody-here", &s.key);
        c.arg("true");
        c
    });
    let wrong = run({
        let mut c = ssh_cmd(&s, "web", &other);
        c.arg("true");
        c
    });
    assert_eq!(unknown.status.code(), Some(255));
    assert_eq!(wrong.status.code(), Some(255));
    let norm = |o: &Output| {
        String::from_utf8_lossy(&o.stderr)
            .replace("nobody-here", "USER")
            .replace("web", "USER")
    };
    assert_eq!(norm(&unknown), norm(&wrong));
}

/// `ssh ... 'echo ready; sleep 60'` with `key`, once it printed ready.
fn held_session(s: &Setup, user: &str, key: &Path) -> std::process::Child {
    let mut child = ssh_cmd(s, user, key)
        .arg("echo ready; sleep 60")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 6];
    std::io::Read::read_exact(child.stdout.as_mut().unwrap(), &mut buf).unwrap();
    assert_eq!(&buf, b"ready\n");
    child
}

#[test]
fn sessions_listed_and_killed() {
    if !require(&[Component::Sshd]) {
        return;
    }
    let s = setup("live");
    let mut child = held_session(&s, "live", &s.key);
    let sessions = s.d.json(&["sessions", "--json"]);
    let list = sessions.as_array().unwrap();
    assert_eq!(list.len(), 1, "{sessions}");
    assert_eq!(list[0]["sandbox"], "live");
    assert!(list[0]["key_fingerprint"]
        .as_str()
        .unwrap()
        .starts_with("SHA256:"));

    let id = list[0]["id"].as_u64().unwrap().to_string();
    s.d.ok(&["sessions", "kill", &id]);
    let status = child.wait().unwrap();
    assert!(!status.success());
    let err = s.d.fails(&["sessions", "kill", &id]);
    assert!(err.contains("no live session"), "{err}");
    drop(s.sshd);
}

#[test]
fn key_remove_ends_that_keys_sessions_and_remove_ends_the_rest() {
    if !require(&[Component::Sshd]) {
        return;
    }
    let s = setup("revoke");
    let key_b = s.d.keygen("client-b");
    s.d.ok(&["key", "add", "revoke", key_b.to_str().unwrap()]);
    let key_b = key_b.with_extension("");
    let a = held_session(&s, "revoke", &s.key);
    let sessions = s.d.json(&["sessions", "--json"]);
    let fp_a = sessions[0]["key_fingerprint"].as_str().unwrap().to_string();
    let mut b = held_session(&s, "revoke", &key_b);
    assert_eq!(
        s.d.json(&["sessions", "--json"]).as_array().unwrap().len(),
        2
    );
    // An edit of the sandbox that revokes nothing ends nothing.
    s.d.ok(&["port", "revoke", "8081"]);
    assert_eq!(
        s.d.json(&["sessions", "--json"]).as_array().unwrap().len(),
        2
    );

    // Key A is removed: A's session ends (it is told why), B's goes on.
    s.d.ok(&["key", "remove", "revoke", &fp_a]);
    let out = a.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(255));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("key removed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let left = s.d.json(&["sessions", "--json"]);
    let left = left.as_array().unwrap();
    assert_eq!(left.len(), 1, "{left:?}");
    assert_ne!(left[0]["key_fingerprint"].as_str().unwrap(), fp_a);
    assert!(b.try_wait().unwrap().is_none(), "key B's session ended");

    // Removing the sandbox ends every session of it.
    s.d.ok(&["remove", "revoke"]);
    let status = b.wait().unwrap();
    assert_eq!(status.code(), Some(255));
    assert!(s
        .d
        .json(&["sessions", "--json"])
        .as_array()
        .unwrap()
        .is_empty());
    drop(s.sshd);
}

#[test]
fn host_key_persists_across_restarts() {
    if !require(&[Component::Sshd]) {
        return;
    }
    let mut s = setup("persist");
    let before = s.d.ok(&["host-key"]);
    assert!(
        before.contains("ssh-ed25519") && before.contains("SHA256:"),
        "{before}"
    );
    assert!(s.d.terminate().success());
    s.d.restart();
    assert_eq!(s.d.ok(&["host-key"]), before);
    let st = s.d.json(&["status", "--json"]);
    let port = st["ssh_listen"][0]
        .as_str()
        .unwrap()
        .rsplit_once(':')
        .unwrap()
        .1
        .to_string();
    // The known_hosts written before the restart still matches.
    let kh = std::fs::read_to_string(&s.known_hosts)
        .unwrap()
        .replace(&format!("]:{}", s.port), &format!("]:{port}"));
    std::fs::write(&s.known_hosts, kh).unwrap();
    s.port = port;
    let out = run({
        let mut c = ssh_cmd(&s, "persist", &s.key);
        c.arg("hostname >/dev/null && echo ok");
        c
    });
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "ok\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
