//! Every CLI command against the real daemon, as a user runs them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::Daemon;
use testsupport::{require, Component};

#[test]
fn add_list_show_remove() {
    if !require(&[Component::Program("ssh-keygen")]) {
        return;
    }
    let d = Daemon::start(common::BIN);
    let out = d.add("myapp-example-com", "MyApp.Example.test");
    assert!(
        out.contains("ssh-ed25519 "),
        "add prints the gateway key: {out}"
    );

    let list = d.json(&["list", "--json"]);
    let arr = list.as_array().unwrap();
    assert_eq!(arr.len(), 1);
    let sb = &arr[0];
    assert_eq!(sb["name"], "myapp-example-com");
    assert_eq!(sb["domain"], "myapp.example.test", "domain lowercased");
    assert_eq!(sb["agent_host"], "shelley.myapp.example.test");
    assert_eq!(sb["ssh_port"], 22);
    assert_eq!(sb["app_port"], 8000);
    assert_eq!(sb["agent_port"], 9999);
    let text = serde_json::to_string(&list).unwrap();
    assert!(!text.contains("PRIVATE KEY"), "no secret in list output");

    let show = d.json(&["show", "myapp-example-com", "--json"]);
    let upk = show["upstream_public_key"].as_str().unwrap();
    assert!(upk.starts_with("ssh-ed25519 AAAA"), "{upk}");
    // The key is a real OpenSSH key: ssh-keygen can fingerprint it.
    let f = d.dir.path().join("upstream.pub");
    std::fs::write(&f, format!("{upk}\n")).unwrap();
    let fp = std::process::Command::new("ssh-keygen")
        .arg("-lf")
        .arg(&f)
        .output()
        .unwrap();
    assert!(fp.status.success());

    let table = d.ok(&["list"]);
    assert!(table.starts_with("NAME"), "{table}");
    assert!(table.contains("myapp.example.test"));
    let human = d.ok(&["show", "myapp-example-com"]);
    assert!(
        human.contains("https://shelley.myapp.example.test"),
        "{human}"
    );
    // The SSH port the daemon listens on, not a fixed 2222.
    let ssh = format!(
        "ssh -p {} myapp-example-com@HOST",
        d.listen_port("ssh_listen")
    );
    assert!(human.contains(&ssh), "{human}");
    assert!(out.contains(&ssh), "add: {out}");

    d.ok(&["remove", "myapp-example-com"]);
    assert_eq!(d.json(&["list", "--json"]), serde_json::json!([]));
    let err = d.fails(&["show", "myapp-example-com"]);
    assert!(err.contains("no sandbox named myapp-example-com"), "{err}");
}

#[test]
fn add_with_all_options_and_host_key_file() {
    if !require(&[Component::Program("ssh-keygen")]) {
        return;
    }
    let d = Daemon::start(common::BIN);
    let k1 = d.keygen("k1");
    let k2 = d.keygen("k2");
    let host = d.keygen("hostkey");
    let pw = d.dir.path().join("pw");
    std::fs::write(&pw, "s3cret\n").unwrap();
    d.ok(&[
        "add",
        "box",
        "--domain",
        "box.test",
        "--upstream",
        "::1",
        "--ssh-port",
        "2200",
        "--app-port",
        "3000",
        "--agent-port",
        "9000",
        "--user",
        "debian",
        "--ssh-key",
        k1.to_str().unwrap(),
        k2.to_str().unwrap(),
        "--upstream-host-key",
        host.to_str().unwrap(),
        "--auth-user",
        "alice",
        "--auth-password-file",
        pw.to_str().unwrap(),
    ]);
    let sb = d.json(&["show", "box", "--json"]);
    assert_eq!(sb["ssh_port"], 2200);
    assert_eq!(sb["app_port"], 3000);
    assert_eq!(sb["agent_port"], 9000);
    assert_eq!(sb["user"], "debian");
    assert_eq!(sb["auth_user"], "alice");
    assert_eq!(sb["client_keys"].as_array().unwrap().len(), 2);
    let pinned = std::fs::read_to_string(&host).unwrap();
    let pinned_b64 = pinned.split_whitespace().nth(1).unwrap();
    assert!(sb["upstream_host_key"]
        .as_str()
        .unwrap()
        .contains(pinned_b64));
    let dump = serde_json::to_string(&d.json(&["backup"])).unwrap();
    assert!(!dump.contains("s3cret"), "password stored in clear");
    assert!(
        dump.contains("$argon2id$"),
        "password stored as an argon2id hash"
    );
    // The route for ::1 is bracketed.
    let routes = d.ok(&["routes"]);
    assert!(routes.contains("[::1]:2200"), "{routes}");
}

#[test]
fn keys_port_and_auth() {
    if !require(&[Component::Program("ssh-keygen")]) {
        return;
    }
    let d = Daemon::start(common::BIN);
    d.add("a", "a.example.test");
    let extra = d.keygen("extra");
    let listed = d.ok(&["key", "add", "a", extra.to_str().unwrap()]);
    assert!(listed.contains("extra"), "{listed}");
    // Adding the same key twice keeps one copy.
    d.ok(&["key", "add", "a", extra.to_str().unwrap()]);
    let keys = d.json(&["key", "list", "a", "--json"]);
    assert_eq!(keys.as_array().unwrap().len(), 2);
    let fp = keys[1]["fingerprint"].as_str().unwrap().to_string();
    assert!(fp.starts_with("SHA256:"));
    d.ok(&["key", "remove", "a", &fp]);
    assert_eq!(
        d.json(&["key", "list", "a", "--json"])
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let err = d.fails(&["key", "remove", "a", &fp]);
    assert!(err.contains("no key matching"), "{err}");
    // The last key cannot be removed.
    let last = d.json(&["key", "list", "a", "--json"])[0]["fingerprint"]
        .as_str()
        .unwrap()
        .to_string();
    let err = d.fails(&["key", "remove", "a", &last]);
    assert!(err.contains("no client key"), "{err}");
    // Keys from stdin.
    let other = std::fs::read(d.keygen("other")).unwrap();
    let out = d.cli_with_stdin(&["key", "add", "a", "-"], &other);
    assert!(out.status.success());

    d.ok(&["port", "a", "5173"]);
    assert_eq!(d.json(&["show", "a", "--json"])["app_port"], 5173);
    let routes = d.ok(&["routes"]);
    assert!(
        routes.contains("127.0.0.1:5173"),
        "port change live: {routes}"
    );

    // Password from stdin (not a terminal here), never an argument.
    let out = d.cli_with_stdin(&["auth", "a", "bob"], b"hunter2\n");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(d.json(&["show", "a", "--json"])["auth_user"], "bob");
    let pw = d.dir.path().join("pw");
    std::fs::write(&pw, "pw2").unwrap();
    d.ok(&[
        "auth",
        "a",
        "carol",
        "--password-file",
        pw.to_str().unwrap(),
    ]);
    assert_eq!(d.json(&["show", "a", "--json"])["auth_user"], "carol");
    d.ok(&["auth", "a", "--remove"]);
    assert_eq!(
        d.json(&["show", "a", "--json"])["auth_user"],
        serde_json::Value::Null
    );
    let out = d.cli_with_stdin(&["auth", "a", "dave"], b"");
    assert!(!out.status.success(), "empty password accepted");
}

#[test]
fn status_routes_and_completions() {
    if !require(&[Component::Program("ssh-keygen")]) {
        return;
    }
    let d = Daemon::start(common::BIN);
    let st = d.json(&["status", "--json"]);
    assert_eq!(st["sandboxes"], 0);
    for key in ["ssh_listen", "https_listen", "http_listen"] {
        let addr = st[key][0].as_str().unwrap();
        assert!(
            addr.starts_with("127.0.0.1:") && !addr.ends_with(":0"),
            "{key}: {addr}"
        );
        // The listener is really bound.
        std::net::TcpStream::connect(addr).unwrap();
    }
    d.add("a", "a.example.test");
    let st = d.json(&["status", "--json"]);
    assert_eq!(st["sandboxes"], 1);
    assert_eq!(st["routes"], 3, "one ssh user and two https hosts");
    assert!(d.ok(&["status"]).contains("sandboxes:  1"));
    // Open HTTPS client connections, per web serving thread.
    let open = |st: &serde_json::Value| -> Vec<u64> {
        st["https_connections"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_u64().unwrap())
            .collect()
    };
    let threads = std::thread::available_parallelism().unwrap().get();
    // The probes above may still be closing.
    let mut seen = open(&st);
    for _ in 0..50 {
        if seen == vec![0; threads] {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        seen = open(&d.json(&["status", "--json"]));
    }
    assert_eq!(seen, vec![0; threads]);
    let https = st["https_listen"][0].as_str().unwrap().to_string();
    let held = std::net::TcpStream::connect(&https).unwrap();
    let mut seen = Vec::new();
    for _ in 0..50 {
        seen = open(&d.json(&["status", "--json"]));
        if seen.iter().sum::<u64>() == 1 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(seen.iter().sum::<u64>(), 1, "{seen:?}");
    assert!(d.ok(&["status"]).contains("https open: "));
    drop(held);
    for shell in ["bash", "zsh", "fish"] {
        let out = std::process::Command::new(common::BIN)
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success());
        assert!(String::from_utf8_lossy(&out.stdout).contains("sandboxd"));
    }
    let help = std::process::Command::new(common::BIN)
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for cmd in [
        "serve", "add", "list", "show", "remove", "key", "port", "auth", "status", "backup",
        "restore",
    ] {
        assert!(help.contains(cmd), "--help lacks {cmd}");
    }
}

#[test]
fn admin_socket_option_before_or_after_and_from_env() {
    if !require(&[Component::Program("ssh-keygen")]) {
        return;
    }
    let d = Daemon::start(common::BIN);
    d.add("a", "a.example.test");
    let sock = d.socket.to_str().unwrap();
    let after = std::process::Command::new(common::BIN)
        .args(["list", "--json", "--admin-socket", sock])
        .output()
        .unwrap();
    assert!(after.status.success());
    let env = std::process::Command::new(common::BIN)
        .args(["list", "--json"])
        .env("SANDBOXD_ADMIN_SOCKET", sock)
        .output()
        .unwrap();
    assert!(env.status.success());
    assert_eq!(after.stdout, env.stdout);
    let missing = std::process::Command::new(common::BIN)
        .args(["list", "--admin-socket", "/nonexistent/admin.sock"])
        .output()
        .unwrap();
    assert!(!missing.status.success());
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(
        err.contains("does not exist") && err.contains("sandboxd serve"),
        "{err}"
    );
}

#[test]
fn route_is_live_when_add_returns() {
    if !require(&[Component::Program("ssh-keygen")]) {
        return;
    }
    let d = Daemon::start(common::BIN);
    // No sleeps: the order "add acknowledged, then route visible" must hold
    // every time.
    for i in 0..30 {
        let name = format!("s{i}");
        d.add(&name, &format!("{name}.example.test"));
        let dump = d.json(&["routes", "--json"]);
        let routes = dump["routes"].as_array().unwrap();
        assert!(
            routes
                .iter()
                .any(|r| r["protocol"] == "ssh" && r["key"] == name.as_str()),
            "route for {name} not live after add returned"
        );
        assert!(routes
            .iter()
            .any(|r| r["key"] == format!("shelley.{name}.example.test")));
        d.ok(&["remove", &name]);
        let dump = d.json(&["routes", "--json"]);
        assert!(
            !dump["routes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["key"] == name.as_str()),
            "route for {name} still live after remove returned"
        );
    }
}

#[test]
fn backup_wipe_restore_is_identical() {
    if !require(&[Component::Program("ssh-keygen")]) {
        return;
    }
    let mut d = Daemon::start(common::BIN);
    for i in 0..25 {
        d.add(&format!("b{i}"), &format!("b{i}.example.test"));
    }
    let pw = d.dir.path().join("pw");
    std::fs::write(&pw, "pw").unwrap();
    d.ok(&["auth", "b3", "eve", "--password-file", pw.to_str().unwrap()]);
    let before = d.ok(&["list", "--json"]);
    let backup = d.cli(&["backup"]).stdout;
    assert!(String::from_utf8_lossy(&backup).contains("OPENSSH PRIVATE KEY"));

    // Wipe: stop, delete the state directory, start empty.
    assert!(d.terminate().success());
    std::fs::remove_dir_all(&d.state).unwrap();
    d.restart();
    assert_eq!(d.ok(&["list", "--json"]).trim(), "[]");

    let out = d.cli_with_stdin(&["restore"], &backup);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("restore: 25/25"),
        "progress shown"
    );
    assert_eq!(d.ok(&["list", "--json"]), before);
    // Restored routes are live.
    let routes = d.ok(&["routes"]);
    assert!(routes.contains("shelley.b24.example.test"));

    // Restoring over data is refused without --replace, accepted with it.
    let err = {
        let out = d.cli_with_stdin(&["restore"], &backup);
        assert!(!out.status.success());
        String::from_utf8(out.stderr).unwrap()
    };
    assert!(err.contains("not empty"), "{err}");
    let out = d.cli_with_stdin(&["restore", "--replace"], &backup);
    assert!(out.status.success());
    assert_eq!(d.ok(&["list", "--json"]), before);
}

#[test]
fn sigterm_exits_cleanly_and_removes_the_socket() {
    if !require(&[Component::Program("ssh-keygen")]) {
        return;
    }
    let mut d = Daemon::start(common::BIN);
    d.add("a", "a.example.test");
    let status = d.terminate();
    assert!(status.success(), "{status}");
    assert!(!d.socket.exists());
    assert!(d.log_text().contains("sandboxd stopped"));
    d.restart();
    assert_eq!(d.json(&["list", "--json"]).as_array().unwrap().len(), 1);
}

/// Issue 14, item 1: a sandbox added without a login has a closed agent
/// host and every view says so; the app port can never be the agent port.
#[test]
fn no_login_is_closed_and_app_port_is_never_the_agent_port() {
    if !require(&[Component::Program("ssh-keygen")]) {
        return;
    }
    let d = Daemon::start(common::BIN);
    let out = d.add("a", "a.example.test");
    assert!(
        out.contains("the agent host https://shelley.a.example.test is closed until it has a login: sandboxd auth a USER"),
        "{out}"
    );
    let table = d.ok(&["list"]);
    let header = table.lines().next().unwrap();
    assert!(header.trim_end().ends_with("AUTH"), "{table}");
    assert!(
        table
            .lines()
            .nth(1)
            .unwrap()
            .trim_end()
            .ends_with("closed (no login)"),
        "{table}"
    );
    let show = d.ok(&["show", "a"]);
    assert!(
        show.contains("agent login:       closed (no login)"),
        "{show}"
    );

    let pw = d.dir.path().join("pw");
    std::fs::write(&pw, "pw").unwrap();
    d.ok(&[
        "auth",
        "a",
        "alice",
        "--password-file",
        pw.to_str().unwrap(),
    ]);
    assert!(d
        .ok(&["list"])
        .lines()
        .nth(1)
        .unwrap()
        .trim_end()
        .ends_with("alice"));
    assert!(d.ok(&["show", "a"]).contains("agent login:       alice"));
    let out = d.ok(&["auth", "a", "--remove"]);
    assert!(
        out.contains("https://shelley.a.example.test is closed"),
        "{out}"
    );

    // Ports: refused on add (the agent port defaults to 9999) and on port.
    let before = d.ok(&["list", "--json"]);
    let key = d.keygen("k");
    for extra in [
        &["--app-port", "9999"][..],
        &["--app-port", "3000", "--agent-port", "3000"][..],
    ] {
        let mut args = vec![
            "add",
            "b",
            "--domain",
            "b.test",
            "--upstream",
            "127.0.0.1",
            "--ssh-key",
            key.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let err = d.fails(&args);
        assert!(err.contains("is the agent port"), "{err}");
    }
    let err = d.fails(&["port", "a", "9999"]);
    assert!(
        err.contains("invalid app port: 9999 is the agent port"),
        "{err}"
    );
    assert_eq!(d.ok(&["list", "--json"]), before, "nothing changed");
}

/// Issue 14, item 11: `backup -o FILE` makes the file 0600 (also over an
/// existing world-readable file), a shell redirect loses group/other
/// access, and a terminal never gets the private keys.
#[test]
fn backup_is_private_and_never_printed_to_a_terminal() {
    if !require(&[
        Component::Program("ssh-keygen"),
        Component::Program("script"),
    ]) {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let d = Daemon::start(common::BIN);
    d.add("a", "a.example.test");
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let file = d.dir.path().join("backup.json");
    d.ok(&["backup", "-o", file.to_str().unwrap()]);
    assert_eq!(mode(&file), 0o600);
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.contains("OPENSSH PRIVATE KEY"));
    // Over an existing, readable file: replaced whole, 0600.
    std::fs::write(&file, "old").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    d.ok(&["backup", "--output", file.to_str().unwrap()]);
    assert_eq!(mode(&file), 0o600);
    assert_eq!(std::fs::read_to_string(&file).unwrap(), text);
    // A restore from it works.
    let out = d.cli_with_stdin(&["restore", "--replace"], text.as_bytes());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // `backup > FILE` with the usual umask: the file ends up 0600.
    let redirected = d.dir.path().join("redirected.json");
    let st = std::process::Command::new("sh")
        .arg("-c")
        .arg("umask 022; exec \"$0\" --admin-socket \"$1\" backup > \"$2\"")
        .arg(common::BIN)
        .arg(&d.socket)
        .arg(&redirected)
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(mode(&redirected), 0o600);

    // On a terminal (a pty from util-linux's script): refused, no key shown.
    let out = std::process::Command::new("script")
        .args(["-qec"])
        .arg(format!(
            "{} --admin-socket {} backup",
            common::BIN,
            d.socket.display()
        ))
        .arg("/dev/null")
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{shown}");
    assert!(!shown.contains("PRIVATE KEY"), "{shown}");
    assert!(
        shown.contains("refusing to print it to a terminal; use -o FILE or redirect stdout"),
        "{shown}"
    );
}

/// Issue 14, item 11: a manual TLS key file others can read is refused like
/// an LLM key file; nothing is recorded.
#[test]
fn readable_manual_key_file_is_refused() {
    if !require(&[
        Component::Program("ssh-keygen"),
        Component::Program("openssl"),
    ]) {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let d = Daemon::start(common::BIN);
    let pki = d.dir.path().join("pki");
    std::fs::create_dir(&pki).unwrap();
    let ca = common::pki::Ca::new(&pki, "ca");
    let (cert, key) = ca.leaf("site", &["m.test", "shelley.m.test"]);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let ssh = d.keygen("k");
    let args = [
        "add",
        "m",
        "--domain",
        "m.test",
        "--upstream",
        "127.0.0.1",
        "--ssh-key",
        ssh.to_str().unwrap(),
        "--tls-mode",
        "manual",
        "--tls-cert-file",
        cert.to_str().unwrap(),
        "--tls-key-file",
        key.to_str().unwrap(),
    ];
    let err = d.fails(&args);
    assert!(
        err.contains(&format!(
            "key file {} is readable by other users (mode 0644): chmod 600 it",
            key.display()
        )),
        "{err}"
    );
    assert_eq!(d.ok(&["list", "--json"]).trim(), "[]");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    d.ok(&args);
    // Loosened afterwards: the daemon refuses it when it reads it again.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
    let err = d.fails(&["certs", "renew", "m.test"]);
    assert!(
        err.contains("is readable by other users (mode 0640)"),
        "{err}"
    );
}

/// Runs `cmd` with its stdout a pipe whose reader is already gone, so that
/// every write fails (EPIPE).
fn with_closed_stdout(cmd: &mut std::process::Command) -> std::process::Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    cmd.stdin(std::process::Stdio::null())
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap()
}

/// A reader that goes away (`| head -1`) ends a command quietly: exit
/// status 0, nothing on stderr, no panic; whatever the command prints.
#[test]
fn output_survives_a_closed_pipe() {
    if !require(&[Component::Program("ssh-keygen")]) {
        return;
    }
    let d = Daemon::start(common::BIN);
    d.add("a", "a.example.test");
    let quiet = |what: &str, out: std::process::Output| {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && err.is_empty(),
            "{what}: {} {err}",
            out.status
        );
    };
    let bin = || std::process::Command::new(common::BIN);
    quiet(
        "completions bash",
        with_closed_stdout(bin().args(["completions", "bash"])),
    );
    quiet("--help", with_closed_stdout(bin().arg("--help")));
    let socket = d.socket.to_str().unwrap();
    for args in [
        &["list"][..],
        &["list", "--json"],
        &["show", "a"],
        &["status"],
        &["certs"],
        &["key", "list", "a"],
        &["backup"],
        &["top", "--count", "2", "--interval", "0.1"],
    ] {
        let out = with_closed_stdout(bin().args(["--admin-socket", socket]).args(args));
        quiet(&args.join(" "), out);
    }
    // A reader that takes the first line and goes: later writes fail.
    let mut child = bin()
        .args(["--admin-socket", socket])
        .args(["top", "--count", "5", "--interval", "0.1"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    let stdout = child.stdout.take().unwrap();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut first).unwrap();
    assert!(first.starts_with("NAME"), "{first}");
    quiet("top | head -1", child.wait_with_output().unwrap());
    // With the shell's own pipe and pipefail, as users write it.
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            "set -o pipefail; {} completions bash | head -1 >/dev/null",
            common::BIN
        ))
        .output()
        .unwrap();
    quiet("completions bash | head -1", out);
}
