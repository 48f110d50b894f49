//! Bad input: each case gets one clear message and changes nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::Command;
use testsupport::{require, Component};

use common::{Daemon, BIN};

fn add_args<'a>(name: &'a str, domain: &'a str, key: &'a str) -> Vec<&'a str> {
    vec![
        "add",
        name,
        "--domain",
        domain,
        "--upstream",
        "127.0.0.1",
        "--ssh-key",
        key,
    ]
}

#[test]
fn invalid_names_and_domains_change_nothing() {
    if !require(&[Component::Program("ssh-keygen")]) {
        return;
    }
    let d = Daemon::start(common::BIN);
    d.add("good", "good.example.test");
    let before = d.ok(&["list", "--json"]);
    let key = d.keygen("k");
    let key = key.to_str().unwrap();
    let long = "a".repeat(64);
    let cases: Vec<(&str, &str, &str)> = vec![
        ("My-App", "x.example.test", "use lowercase"),
        ("my_app", "x.example.test", "only a-z"),
        ("app-", "x.example.test", "start or end"),
        (&long, "x.example.test", "at most 63"),
        ("ok", "localhost", "two labels"),
        ("ok", "a..example.test", "must not be empty"),
        ("ok", "bad_label.example.test", "only a-z"),
        ("ok", "10.0.0.1", "IP address"),
        ("ok", "x.example.test.", "must not end"),
    ];
    for (name, domain, needle) in cases {
        let err = d.fails(&add_args(name, domain, key));
        assert!(err.contains(needle), "{name} {domain}: {err}");
    }
    let err = d.fails(&[
        "add",
        "ok",
        "--domain",
        "ok.example.test",
        "--upstream",
        "bad host!",
        "--ssh-key",
        key,
    ]);
    assert!(err.contains("upstream"), "{err}");
    let bad_key = d.dir.path().join("bad.pub");
    std::fs::write(&bad_key, "ssh-ed25519 AAAAnotakey\n").unwrap();
    let err = d.fails(&add_args(
        "ok",
        "ok.example.test",
        bad_key.to_str().unwrap(),
    ));
    assert!(err.contains("not an OpenSSH public key"), "{err}");
    assert_eq!(d.ok(&["list", "--json"]), before);
}

#[test]
fn duplicates_and_unknown_sandboxes() {
    if !require(&[Component::Program("ssh-keygen")]) {
        return;
    }
    let d = Daemon::start(common::BIN);
    d.add("a", "a.example.test");
    let before = d.ok(&["list", "--json"]);
    let key = d.keygen("k");
    let key = key.to_str().unwrap();
    let err = d.fails(&add_args("a", "other.example.test", key));
    assert!(err.contains("a sandbox named a exists already"), "{err}");
    let err = d.fails(&add_args("b", "A.example.test", key));
    assert!(
        err.contains("host a.example.test is already used by sandbox a"),
        "{err}"
    );
    // b's domain collides with a's agent host.
    let err = d.fails(&add_args("b", "shelley.a.example.test", key));
    assert!(err.contains("already used by sandbox a"), "{err}");
    assert_eq!(d.ok(&["list", "--json"]), before);

    for args in [
        vec!["show", "nope"],
        vec!["remove", "nope"],
        vec!["port", "nope", "80"],
        vec!["key", "list", "nope"],
        vec!["key", "remove", "nope", "SHA256:x"],
    ] {
        let err = d.fails(&args);
        assert!(err.contains("no sandbox named nope"), "{args:?}: {err}");
    }
    let err = d.fails(&["port", "a", "0"]);
    assert!(err.contains("app port"), "{err}");
    assert_eq!(d.ok(&["list", "--json"]), before);
}

fn curl(socket: &std::path::Path, args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "-o", "-", "-w", "\n%{http_code}", "--unix-socket"])
        .arg(socket)
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.parse().unwrap(), body.to_string())
}

#[test]
fn malformed_and_oversized_admin_requests() {
    if !require(&[Component::Program("curl"), Component::Program("ssh-keygen")]) {
        return;
    }
    let d = Daemon::start(common::BIN);
    d.add("a", "a.example.test");
    let before = d.ok(&["list", "--json"]);
    let url = "http://sandboxd/v1/sandboxes";
    let (code, body) = curl(
        &d.socket,
        &[
            "-X",
            "POST",
            "-H",
            "content-type: application/json",
            "--data",
            "{not json",
            url,
        ],
    );
    assert_eq!(code, 400);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], "malformed_json");

    let (code, body) = curl(
        &d.socket,
        &["-X", "POST", "--data", r#"{"name":"x","bogus":1}"#, url],
    );
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("bogus"), "unknown field named: {body}");

    let big = d.dir.path().join("big.json");
    std::fs::write(&big, vec![b' '; 2 << 20]).unwrap();
    let arg = format!("@{}", big.display());
    let (code, body) = curl(&d.socket, &["-X", "POST", "--data-binary", &arg, url]);
    assert_eq!(code, 413, "{body}");
    assert!(body.contains("body_too_large"));

    let (code, body) = curl(&d.socket, &["http://sandboxd/v2/whatever"]);
    assert_eq!(code, 404);
    assert!(body.contains("no_such_call"));
    let (code, _) = curl(&d.socket, &["-X", "PATCH", url]);
    assert_eq!(code, 404);

    // Garbage instead of HTTP does not hurt the daemon.
    {
        use std::io::Write;
        let mut s = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
        s.write_all(b"\x00\x01garbage\r\n\r\n").unwrap();
    }
    assert_eq!(d.ok(&["list", "--json"]), before);
}

#[test]
fn other_uids_are_refused() {
    if !require(&[Component::Root, Component::Program("ssh-keygen")]) {
        return;
    }
    // A world-traversable directory so that uid 65534 can reach the socket
    // path at all; the daemon still makes the socket itself 0600.
    let d = Daemon::start(common::BIN);
    d.add("a", "a.example.test");
    let before = d.ok(&["list", "--json"]);
    let open = tempfile::tempdir().unwrap();
    std::fs::set_permissions(open.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = open.path().join("sandboxd");
    std::fs::copy(BIN, &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "admin socket mode");
    let dir_mode = std::fs::metadata(d.socket.parent().unwrap())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(dir_mode, 0o700, "admin socket directory mode");

    // Expose the socket by hand, as a careless operator might.
    let link_dir = open.path().join("run");
    std::fs::create_dir(&link_dir).unwrap();
    std::fs::set_permissions(&link_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let as_nobody = |socket: &std::path::Path, args: &[&str]| {
        Command::new(&bin)
            .arg("--admin-socket")
            .arg(socket)
            .args(args)
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap()
    };
    // 1. Through the real path: the file system says no.
    for p in [d.dir.path(), d.socket.parent().unwrap()] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let out = as_nobody(&d.socket, &["list"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("permission denied"), "{err}");
    // 2. Socket mode loosened: the peer check still says no.
    std::fs::set_permissions(&d.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = as_nobody(&d.socket, &["remove", "a"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("uid 65534 may not use the sandboxd admin API"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1);
    assert_eq!(d.ok(&["list", "--json"]), before);
    assert!(d.log_text().contains("uid not permitted"));
}

/// `sandboxd serve` on loopback port 0 with the given state and socket.
fn serve_on(state: &std::path::Path, socket: &std::path::Path) -> std::process::Output {
    Command::new(BIN)
        .arg("serve")
        .arg("--state-dir")
        .arg(state)
        .arg("--admin-socket")
        .arg(socket)
        .args([
            "--ssh-listen",
            "127.0.0.1:0",
            "--https-listen",
            "127.0.0.1:0",
        ])
        .args(["--http-listen", "127.0.0.1:0"])
        .output()
        .unwrap()
}

#[test]
fn second_daemon_on_same_state_is_refused_and_first_unharmed() {
    if !require(&[Component::Program("ssh-keygen")]) {
        return;
    }
    let d = Daemon::start(common::BIN);
    d.add("a", "a.example.test");
    let other_socket = d.dir.path().join("other.sock");
    let out = serve_on(&d.state, &other_socket);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("in use by another sandboxd") && err.contains(&format!("pid {}", d.pid())),
        "{err}"
    );
    assert!(!other_socket.exists());

    // Another state directory but the same socket: refused, socket kept.
    let out = serve_on(&d.dir.path().join("state2"), &d.socket);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another sandboxd is serving"), "{err}");
    assert_eq!(d.json(&["list", "--json"]).as_array().unwrap().len(), 1);
}

/// `sandboxd serve ARGS` must fail before binding its admin socket, and
/// (for configuration errors) before creating its state directory.
fn serve_fails(args: &[&str]) -> String {
    serve_fails_with(args, true)
}

fn serve_fails_with(args: &[&str], config_error: bool) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .arg("serve")
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--admin-socket")
        .arg(dir.path().join("admin.sock"))
        .args(args)
        .output()
        .unwrap();
    assert!(!out.status.success(), "serve {args:?} started");
    assert!(!dir.path().join("admin.sock").exists());
    assert!(
        !config_error || !dir.path().join("state").exists(),
        "state created despite a bad config"
    );
    String::from_utf8(out.stderr).unwrap()
}

#[test]
fn bad_config_files() {
    let dir = tempfile::tempdir().unwrap();
    let corrupt = dir.path().join("corrupt.toml");
    std::fs::write(&corrupt, "state_dir = [unclosed\n").unwrap();
    let err = serve_fails(&["--config", corrupt.to_str().unwrap()]);
    assert!(err.contains("not valid TOML"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");

    let err = serve_fails(&["--config", "/nonexistent/sandboxd.toml"]);
    assert!(
        err.contains("cannot read config file /nonexistent/sandboxd.toml"),
        "{err}"
    );

    let unreadable = dir.path().join("dir.toml");
    std::fs::create_dir(&unreadable).unwrap();
    let err = serve_fails(&["--config", unreadable.to_str().unwrap()]);
    assert!(err.contains("cannot read config file"), "{err}");

    let many = dir.path().join("many.toml");
    std::fs::write(
        &many,
        "colour = \"red\"\nssh_listen = [\"nowhere\"]\ntls_mode = \"magic\"\n",
    )
    .unwrap();
    let err = serve_fails(&["--config", many.to_str().unwrap()]);
    assert!(err.contains("3 problems"), "{err}");
    for needle in ["unknown key `colour`", "\"nowhere\"", "\"magic\""] {
        assert!(err.contains(needle), "{needle}: {err}");
    }
    let err = serve_fails(&["--ssh-listen", "127.0.0.1:99999"]);
    assert!(err.contains("ssh_listen"), "{err}");
}

#[test]
fn missing_state_dir_is_created_private() {
    if !require(&[Component::Program("ssh-keygen")]) {
        return;
    }
    let d = Daemon::builder(common::BIN).start();
    // The harness points --state-dir at a directory that did not exist.
    let mode = std::fs::metadata(&d.state).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    d.add("a", "a.example.test");
    for entry in walk(&d.state) {
        let m = std::fs::metadata(&entry).unwrap();
        let mode = m.permissions().mode() & 0o777;
        assert_eq!(mode & 0o077, 0, "{} is {mode:o}", entry.display());
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

#[test]
fn busy_listener_port_is_reported() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let err = serve_fails_with(
        &[
            "--ssh-listen",
            &addr,
            "--https-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ],
        false,
    );
    assert!(
        err.contains(&format!("cannot listen for ssh on {addr}")),
        "{err}"
    );
}

/// Issue 14, item 11: a socket served by another user (planted on the path
/// the CLI is told to use) gets nothing: not the password of `auth`, not a
/// request at all. The fake daemon runs as uid 65534 and answers like the
/// real one would.
#[test]
fn a_socket_served_by_another_user_gets_nothing() {
    if !require(&[Component::Root, Component::Program("python3")]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let run = dir.path().join("run");
    std::fs::create_dir(&run).unwrap();
    nix::unistd::chown(&run, Some(65534.into()), Some(65534.into())).unwrap();
    let socket = run.join("admin.sock");
    let captured = run.join("captured");
    // Accepts connections for at most 20 s, records what it is sent and
    // answers 200 with an empty JSON object.
    let fake = r#"
import socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1]); s.listen(8); s.settimeout(0.2)
print("ready", flush=True)
end = time.time() + 20
while time.time() < end:
    try:
        c, _ = s.accept()
    except socket.timeout:
        continue
    c.settimeout(1)
    got = b""
    try:
        while True:
            b = c.recv(65536)
            if not b: break
            got += b
            if b"\r\n\r\n" in got and len(got.split(b"\r\n\r\n", 1)[1]) > 0: break
    except socket.timeout:
        pass
    open(sys.argv[2], "ab").write(got)
    try:
        c.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}")
    except OSError:
        pass
    c.close()
"#;
    let mut child = Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(fake)
        .arg(&socket)
        .arg(&captured)
        .uid(65534)
        .gid(65534)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
        &mut ready,
    )
    .unwrap();
    assert_eq!(ready.trim(), "ready");

    let pw = dir.path().join("pw");
    std::fs::write(&pw, "planted-socket-must-not-see-this\n").unwrap();
    let out = Command::new(BIN)
        .arg("--admin-socket")
        .arg(&socket)
        .args(["auth", "a", "alice", "--password-file"])
        .arg(&pw)
        .output()
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&format!(
            "refusing the admin socket {}: it is served by uid 65534",
            socket.display()
        )) && err.contains("nothing was sent"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    let seen = std::fs::read(&captured).unwrap_or_default();
    assert!(
        seen.is_empty(),
        "the planted socket got: {}",
        String::from_utf8_lossy(&seen)
    );
}
