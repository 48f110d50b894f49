//! The sandbox lifecycle on a real incusd, driven through the real CLI and
//! daemon: create, routes, stop/start/restart, snapshots, address changes,
//! import, delete, and the failure cases (missing image, untracked name,
//! Incus absent, Incus gone in the middle of a create).
//!
//! Needs `.ci/setup-incus.sh` (incusd, bridge sbx0, image test/debian-ssh).
//! Every test uses its own daemon and `t-lc-*` container names and removes
//! its containers when it ends, so the tests run in parallel.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::incus as support;
use testsupport::{require, Component};

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{
    block_on, create, daemon, daemon_with, exec, gateway_ssh, incus, listed, ssh_as_gateway,
    ssh_target, unique, wait_until, InstanceGuard, TEST_IMAGE,
};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

fn address(d: &common::Daemon, name: &str) -> String {
    let sb = listed(d, name).expect("listed");
    sb["ipv4"].as_str().expect("an IPv4 address").to_string()
}

#[test]
fn create_route_stop_start_snapshot_restart_delete() {
    if !require(&[Component::Incus]) {
        return;
    }
    let mut d = daemon();
    let name = unique("main");
    let _guard = InstanceGuard::new(&name);

    let started = Instant::now();
    let out = create(&d, &name, &["--cpu", "1", "--memory", "512MiB"]);
    assert!(
        out.status.success(),
        "create failed: {}\n{}",
        stderr(&out),
        d.log_text()
    );
    eprintln!("create took {:?}", started.elapsed());
    let created = String::from_utf8_lossy(&out.stdout).to_string();
    let progress = stderr(&out);
    assert!(
        progress.contains("[1/10] create") && progress.contains("[10/10] live"),
        "progress per step: {progress}"
    );

    // The container has nesting, Docker's intercepts, the limits and our id.
    let inst = block_on(incus().instance(&name)).unwrap();
    assert_eq!(inst.config["security.nesting"], "true");
    assert_eq!(inst.config["security.syscalls.intercept.mknod"], "true");
    assert_eq!(inst.config["limits.cpu"], "1");
    assert_eq!(inst.config["limits.memory"], "512MiB");
    assert!(inst.config.contains_key("user.sandboxd.id"));

    // list shows it running with its bridge address; the route points there.
    let sb = listed(&d, &name).unwrap();
    assert_eq!(sb["status"], "running");
    assert_eq!(sb["backend"], "incus");
    assert_eq!(sb["state"], "Running");
    assert!(sb["memory_bytes"].as_u64().unwrap() > 0, "{sb}");
    let ip = address(&d, &name);
    assert!(ip.starts_with("198.18.0."), "{ip}");
    assert_eq!(sb["addresses"][0], ip.as_str());
    assert_eq!(ssh_target(&d, &name).unwrap(), format!("{ip}:22"));
    // The gateway's key is installed for the login user and the pinned host
    // key is the container's real one.
    assert_eq!(sb["user"], "debian");
    assert_eq!(ssh_as_gateway(&d, &name, &ip), name);
    // And a user gets into the container through the gateway by name.
    let out = gateway_ssh(&d, &name, "hostname");
    assert!(out.status.success(), "{}\n{}", stderr(&out), d.log_text());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), name);

    generated_login_and_gateway_only_keys(&mut d, &name, &created);

    // stop: list and routes say stopped, and so does the gateway.
    d.ok(&["stop", &name]);
    let out = gateway_ssh(&d, &name, "hostname");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("is stopped"), "{}", stderr(&out));
    let sb = listed(&d, &name).unwrap();
    assert_eq!(sb["status"], "stopped");
    assert_eq!(sb["state"], "Stopped");
    assert_eq!(ssh_target(&d, &name).unwrap(), "stopped");
    assert!(block_on(incus().instance(&name)).unwrap().is_stopped());

    // start: running again with an address.
    d.ok(&["start", &name]);
    let ip = address(&d, &name);
    assert_eq!(listed(&d, &name).unwrap()["status"], "running");
    assert_eq!(ssh_target(&d, &name).unwrap(), format!("{ip}:22"));
    let out = gateway_ssh(&d, &name, "hostname");
    assert!(out.status.success(), "{}", stderr(&out));

    // snapshot, change a file, restore: the file is back.
    exec(&name, "echo original > /root/marker");
    d.ok(&["snapshot", "create", &name, "s1"]);
    let snaps = d.json(&["snapshot", "list", &name, "--json"]);
    assert_eq!(snaps[0]["name"], "s1", "{snaps}");
    exec(&name, "echo changed > /root/marker");
    d.ok(&["snapshot", "restore", &name, "s1"]);
    assert_eq!(exec(&name, "cat /root/marker").trim(), "original");
    let ip = address(&d, &name);
    assert_eq!(ssh_target(&d, &name).unwrap(), format!("{ip}:22"));

    // A changed address (no Incus event) is recorded by the reconcile for
    // people to see, but the route stays on the address sandboxd assigned:
    // the container cannot point the gates elsewhere.
    let moved = loop {
        let candidate = format!("198.18.0.{}", 200 + rand::random::<u8>() % 50);
        if candidate != ip {
            break candidate;
        }
    };
    exec(
        &name,
        // Deleting the primary address first: Linux drops secondaries with it.
        &format!("ip addr del {ip}/24 dev eth0 && ip addr add {moved}/24 dev eth0"),
    );
    wait_until(
        Duration::from_secs(20),
        "the reconcile to record the reported address",
        || listed(&d, &name).unwrap()["addresses"] == serde_json::json!([moved]),
    );
    assert_eq!(ssh_target(&d, &name).unwrap(), format!("{ip}:22"));

    // restart: DHCP gives the fixed address back.
    d.ok(&["restart", &name]);
    let ip = address(&d, &name);
    assert_ne!(ip, moved);
    assert_eq!(ssh_target(&d, &name).unwrap(), format!("{ip}:22"));
    let out = gateway_ssh(&d, &name, "hostname");
    assert!(out.status.success(), "{}", stderr(&out));

    // Stopped and started behind sandboxd's back: the watcher follows.
    block_on(incus().stop(&name, incusctl::StopOptions::force())).unwrap();
    wait_until(
        Duration::from_secs(15),
        "status stopped from events",
        || ssh_target(&d, &name).as_deref() == Some("stopped"),
    );
    block_on(incus().start(&name)).unwrap();
    wait_until(
        Duration::from_secs(60),
        "status running from events",
        || ssh_target(&d, &name).is_some_and(|t| t.starts_with("198.18.0.")),
    );

    d.ok(&["snapshot", "delete", &name, "s1"]);
    assert_eq!(
        d.json(&["snapshot", "list", &name, "--json"]),
        serde_json::json!([])
    );

    // delete: container, route and record gone.
    d.ok(&["delete", &name]);
    assert!(!block_on(incus().instance_exists(&name)).unwrap());
    assert!(listed(&d, &name).is_none());
    assert!(ssh_target(&d, &name).is_none());
    let err = d.fails(&["start", &name]);
    assert!(err.contains("no sandbox named"), "{err}");
}

#[test]
fn import_adopts_an_instance_made_outside() {
    if !require(&[Component::Incus, Component::Program("ssh-keygen")]) {
        return;
    }
    let d = daemon();
    let name = unique("imp");
    let _guard = InstanceGuard::new(&name);
    let req =
        incusctl::CreateInstance::new(&name, incusctl::ImageSource::local(TEST_IMAGE)).start(true);
    block_on(incus().create_instance(&req)).unwrap();

    // The name belongs to an untracked instance: create refuses, stores nothing.
    let out = create(&d, &name, &[]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("sandboxd does not manage it"),
        "{}",
        stderr(&out)
    );
    assert!(listed(&d, &name).is_none());
    assert!(
        !block_on(incus().instance(&name))
            .unwrap()
            .config
            .contains_key("user.sandboxd.id"),
        "create must not touch an untracked instance"
    );

    // `import` lists it, then adopts it.
    let unmanaged = d.json(&["import", "--json"]);
    assert!(
        unmanaged
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["name"] == name.as_str()),
        "{unmanaged}"
    );
    let key = d.keygen("client");
    let pw = d.dir.path().join("agent-password");
    std::fs::write(&pw, "import-s3cret\n").unwrap();
    d.ok(&[
        "import",
        &name,
        "--domain",
        &format!("{name}.test"),
        "--ssh-key",
        key.to_str().unwrap(),
        "--auth-user",
        "alice",
        "--auth-password-file",
        pw.to_str().unwrap(),
        "--tls-mode",
        "internal",
    ]);
    let sb = listed(&d, &name).unwrap();
    assert_eq!(sb["status"], "running");
    // The agent login and certificate mode given to import are the sandbox's.
    assert_eq!(sb["auth_user"], "alice", "{sb}");
    assert_eq!(sb["tls_mode"], "internal", "{sb}");
    let ip = address(&d, &name);
    assert_eq!(ssh_target(&d, &name).unwrap(), format!("{ip}:22"));
    assert_eq!(ssh_as_gateway(&d, &name, &ip), name);

    // `top` refreshes a bounded number of times; CPU % comes from deltas
    // between samples the daemon keeps at least 200 ms apart (three
    // refreshes: a slow first answer under load cannot leave the last
    // without a delta).
    let top = d.ok(&["top", "--count", "3", "--interval", "0.5"]);
    assert_eq!(top.matches("NAME").count(), 3, "{top}");
    let row = top.lines().rev().find(|l| l.starts_with(&name)).unwrap();
    assert!(row.contains('%') && row.contains(&ip), "{row}");
    // `list --json` too, once a sample at least 200 ms older exists.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let sb = listed(&d, &name).unwrap();
    assert!(sb["cpu_percent"].is_f64(), "{sb}");

    let unmanaged = d.json(&["import", "--json"]);
    assert!(!unmanaged
        .as_array()
        .unwrap()
        .iter()
        .any(|i| i["name"] == name.as_str()));

    d.ok(&["delete", &name]);
    assert!(!block_on(incus().instance_exists(&name)).unwrap());
    assert!(listed(&d, &name).is_none());
}

/// `ssh USER@ADDRESS true` straight to the container (not through the
/// gateway) with the client key `create` was given.
fn direct_ssh_with_client_key(d: &common::Daemon, address: &str) -> std::process::Output {
    let key = d.keygen("client").with_extension("");
    Command::new("ssh")
        .args([
            "-F",
            "/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
        ])
        .args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
        ])
        .args(["-o", "ConnectTimeout=10", "-i"])
        .arg(&key)
        .arg(format!("debian@{address}"))
        .arg("true")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Issue 14, items 1 and 8, on the sandbox of the main test (made without
/// `--auth-user`): `create` printed a generated login once, the agent host
/// takes exactly that password, the container's `authorized_keys` holds
/// only the gateway's key, and a file of an earlier version (client key
/// beside it) is rewritten when the new daemon starts.
fn generated_login_and_gateway_only_keys(d: &mut common::Daemon, name: &str, created: &str) {
    let prefix = "agent login (shown only now): user admin, password ";
    let line = created
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no login in create's output: {created}"));
    let password = &line[prefix.len()..];
    assert_eq!(password.len(), 24, "{line}");
    assert!(
        password.chars().all(|c| c.is_ascii_alphanumeric()),
        "{line}"
    );
    assert!(
        created.contains(&format!("change it with: sandboxd auth {name} admin")),
        "{created}"
    );
    assert!(
        !d.log_text().contains(password),
        "the password is in the log"
    );
    let sb = listed(d, name).unwrap();
    assert_eq!(sb["auth_user"], "admin", "{sb}");
    assert!(d
        .ok(&["list"])
        .lines()
        .any(|l| l.starts_with(name) && l.trim_end().ends_with("admin")));

    // The agent host takes that password and nothing else (the agent's port
    // has nothing listening in this container: 502 once past the login).
    let https = d.listen_port("https_listen");
    let agent = format!("shelley.{name}.test");
    let agent_status = |login: Option<&str>| {
        let resolve = format!("{agent}:{https}:127.0.0.1");
        let url = format!("https://{agent}:{https}/");
        let mut args = vec!["-k", "--resolve", resolve.as_str()];
        if let Some(l) = login {
            args.extend(["-u", l]);
        }
        args.push(url.as_str());
        common::curl(&args).0
    };
    assert_eq!(agent_status(None), 401);
    assert_eq!(agent_status(Some("admin:wrong")), 401);
    assert_eq!(agent_status(Some(&format!("admin:{password}"))), 502);

    // authorized_keys: the gateway's key alone; the client key gets nowhere
    // without the gateway.
    let backup = d.json(&["backup"]);
    let gateway_key = backup["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap()["upstream_key"]["public_openssh"]
        .as_str()
        .unwrap()
        .trim()
        .to_string();
    let client_key = std::fs::read_to_string(d.keygen("client"))
        .unwrap()
        .trim()
        .to_string();
    let keys_now = || {
        exec(name, "cat /home/debian/.ssh/authorized_keys")
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert_eq!(keys_now(), vec![gateway_key.clone()]);
    let ip = address(d, name);
    let out = direct_ssh_with_client_key(d, &ip);
    assert!(
        !out.status.success(),
        "client key works on the container itself"
    );
    assert!(
        stderr(&out).contains("Permission denied"),
        "{}",
        stderr(&out)
    );

    // What an earlier version left: the client key beside the gateway's,
    // and a lifecycle record without `gateway_key_only` (restored from that
    // version's backup). The client key then gets in directly...
    exec(
        name,
        &format!(
            "printf '%s\\n' '# managed by sandboxd: the gateway key first' '{gateway_key}' '{client_key}' \
             > /home/debian/.ssh/authorized_keys"
        ),
    );
    assert!(direct_ssh_with_client_key(d, &ip).status.success());
    let mut old = backup.clone();
    let removed = old["records"]["lifecycle"][name]
        .as_object_mut()
        .unwrap()
        .remove("gateway_key_only");
    assert_eq!(removed, Some(serde_json::json!(true)));
    let out = d.cli_with_stdin(
        &["restore", "--replace"],
        serde_json::to_string(&old).unwrap().as_bytes(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    // ...until the new daemon starts on that state: its first reconcile
    // rewrites the file, once, and the gateway still gets in.
    assert!(d.terminate().success());
    d.restart();
    wait_until(Duration::from_secs(30), "authorized_keys rewritten", || {
        keys_now() == vec![gateway_key.clone()]
    });
    assert!(!direct_ssh_with_client_key(d, &ip).status.success());
    assert!(d
        .log_text()
        .contains("authorized_keys now holds only the gateway's key"));
    assert_eq!(ssh_as_gateway(d, name, &ip), name);
    let after = d.json(&["backup"]);
    assert_eq!(
        after["records"]["lifecycle"][name]["gateway_key_only"],
        true
    );
}

#[test]
fn bad_input_and_incus_absent_store_nothing() {
    if !require(&[Component::Incus, Component::Program("ssh-keygen")]) {
        return;
    }
    let d = daemon();
    let name = unique("bad");
    let _guard = InstanceGuard::new(&name);

    // The app port cannot be the agent port (issue 14, item 1).
    let out = create(&d, &name, &["--app-port", "9999"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("invalid app port: 9999 is the agent port"),
        "{}",
        stderr(&out)
    );
    assert!(listed(&d, &name).is_none());
    assert!(!block_on(incus().instance_exists(&name)).unwrap());

    let out = create(&d, &name, &["--image", "t-lc-no/such-image"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("image alias \"t-lc-no/such-image\" not found"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    let out = create(&d, &name, &["--memory", "lots"]);
    assert!(stderr(&out).contains("--memory"), "{}", stderr(&out));
    assert_eq!(d.json(&["list", "--json"]), serde_json::json!([]));
    assert!(!block_on(incus().instance_exists(&name)).unwrap());

    // A daemon pointed at a socket that does not exist: it runs (static
    // sandboxes work) and every Incus feature says Incus is not running.
    let missing = d.dir.path().join("no-incus.socket");
    let d2 = daemon_with(|b| b.arg("--incus-socket").arg(missing.to_str().unwrap()));
    let out = create(&d2, &name, &[]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("Incus is not running"), "{err}");
    assert!(err.contains("no-incus.socket"), "names the socket: {err}");
    assert_eq!(d2.json(&["list", "--json"]), serde_json::json!([]));
    let err = d2.fails(&["import"]);
    assert!(err.contains("Incus is not running"), "{err}");
    d2.add("static-one", "static-one.test");
    let all = d2.json(&["list", "--json"]);
    assert_eq!(all[0]["name"], "static-one");
    assert_eq!(all[0]["status"], "running");
    let err = d2.fails(&["stop", "static-one"]);
    assert!(err.contains("not an Incus sandbox"), "{err}");
}

/// Starts `create` with the daemon's Incus socket a symlink, removes the
/// link while the container waits for its address, and returns the CLI's
/// stderr (the create fails).
fn create_cut_midway(d: &common::Daemon, name: &str, link: &std::path::Path) -> String {
    let key = d.keygen("client");
    let mut child = Command::new(common::BIN)
        .arg("--admin-socket")
        .arg(&d.socket)
        .args([
            "create",
            name,
            "--domain",
            &format!("{name}.test"),
            "--ssh-key",
        ])
        .arg(&key)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("] address") {
            std::fs::remove_file(link).unwrap();
            break;
        }
    }
    for line in lines {
        seen.push_str(&line.unwrap());
        seen.push('\n');
    }
    let status = child.wait().unwrap();
    assert!(!status.success(), "create went through: {seen}");
    seen
}

fn incus_socket() -> std::path::PathBuf {
    incusctl::DEFAULT_SOCKETS
        .iter()
        .map(std::path::PathBuf::from)
        .find(|p| p.exists())
        .expect("incusd socket")
}

fn linked_daemon() -> (tempfile::TempDir, std::path::PathBuf, common::Daemon) {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("incus.socket");
    std::os::unix::fs::symlink(incus_socket(), &link).unwrap();
    let d = daemon_with(|b| b.arg("--incus-socket").arg(link.to_str().unwrap()));
    (dir, link, d)
}

fn assert_failed_unrouted(d: &common::Daemon, name: &str, err: &str) {
    assert!(err.contains("Incus is not running"), "{err}");
    let sb = listed(d, name).expect("the record stays");
    assert_eq!(sb["status"], "failed", "{sb}");
    let reason = sb["status_reason"].as_str().unwrap();
    assert!(
        reason.contains("failed at step") && reason.contains("Incus is not running"),
        "{reason}"
    );
    let target = ssh_target(d, name).unwrap();
    assert!(target.starts_with("unavailable"), "no half route: {target}");
}

#[test]
fn incus_gone_mid_create_then_create_resumes() {
    if !require(&[Component::Incus]) {
        return;
    }
    let (_dir, link, d) = linked_daemon();
    let name = unique("cut");
    let _guard = InstanceGuard::new(&name);
    let err = create_cut_midway(&d, &name, &link);
    assert_failed_unrouted(&d, &name, &err);

    std::os::unix::fs::symlink(incus_socket(), &link).unwrap();
    let out = create(&d, &name, &[]);
    assert!(
        out.status.success(),
        "resume failed: {}\n{}",
        stderr(&out),
        d.log_text()
    );
    assert!(stderr(&out).contains("resuming"), "{}", stderr(&out));
    let ip = address(&d, &name);
    assert_eq!(listed(&d, &name).unwrap()["status"], "running");
    assert_eq!(ssh_target(&d, &name).unwrap(), format!("{ip}:22"));
    assert_eq!(ssh_as_gateway(&d, &name, &ip), name);
    d.ok(&["delete", &name]);
    assert!(!block_on(incus().instance_exists(&name)).unwrap());
}

#[test]
fn incus_gone_mid_create_then_delete_cleans_up() {
    if !require(&[Component::Incus]) {
        return;
    }
    let (_dir, link, d) = linked_daemon();
    let name = unique("cutdel");
    let _guard = InstanceGuard::new(&name);
    let err = create_cut_midway(&d, &name, &link);
    assert_failed_unrouted(&d, &name, &err);

    // While Incus is still unreachable, delete fails clearly and keeps the
    // record (unrouted) so that it can be run again.
    let err = d.fails(&["delete", &name]);
    assert!(err.contains("Incus is not running"), "{err}");
    assert_eq!(listed(&d, &name).unwrap()["status"], "failed");

    std::os::unix::fs::symlink(incus_socket(), &link).unwrap();
    assert!(block_on(incus().instance_exists(&name)).unwrap());
    d.ok(&["delete", &name]);
    assert!(!block_on(incus().instance_exists(&name)).unwrap());
    assert!(listed(&d, &name).is_none());
    assert!(ssh_target(&d, &name).is_none());
}

/// Two sandboxes on one gateway: each client key reaches only its own
/// container, and each sandbox's gateway key opens only its own sshd.
#[test]
fn two_sandboxes_never_reach_each_other() {
    if !require(&[Component::Incus, Component::Program("ssh-keygen")]) {
        return;
    }
    let d = daemon();
    let a = unique("iso-a");
    let b = unique("iso-b");
    let _ga = InstanceGuard::new(&a);
    let _gb = InstanceGuard::new(&b);
    let out = create(&d, &a, &[]);
    assert!(out.status.success(), "create {a}: {}", stderr(&out));
    let key_b = d.keygen("client-b");
    let out = d.cli(&[
        "create",
        &b,
        "--domain",
        &format!("{b}.test"),
        "--ssh-key",
        key_b.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "create {b}: {}", stderr(&out));

    // A's client key: into A, not into B.
    let own = gateway_ssh(&d, &a, "hostname");
    assert_eq!(
        String::from_utf8_lossy(&own.stdout).trim(),
        a,
        "{}",
        stderr(&own)
    );
    let cross = gateway_ssh(&d, &b, "hostname");
    assert_eq!(
        cross.status.code(),
        Some(255),
        "A's key got into B: {}",
        String::from_utf8_lossy(&cross.stdout)
    );
    assert!(cross.stdout.is_empty());

    // A's gateway key opens A's sshd only.
    let addr_a = address(&d, &a);
    let addr_b = address(&d, &b);
    assert_ne!(addr_a, addr_b);
    assert_eq!(ssh_as_gateway(&d, &a, &addr_a), a);
    let backup = d.json(&["backup"]);
    let sb_a = backup["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == a.as_str())
        .unwrap()
        .clone();
    let key_path = d.dir.path().join("gw-a-only");
    std::fs::write(
        &key_path,
        sb_a["upstream_key"]["private_openssh"].as_str().unwrap(),
    )
    .unwrap();
    Command::new("chmod")
        .arg("600")
        .arg(&key_path)
        .status()
        .unwrap();
    let out = Command::new("ssh")
        .args([
            "-F",
            "/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "ConnectTimeout=10",
        ])
        .arg("-i")
        .arg(&key_path)
        .arg(format!("debian@{addr_b}"))
        .arg("hostname")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(255),
        "A's gateway key opened B: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    for name in [&a, &b] {
        d.ok(&["delete", name]);
    }
}
