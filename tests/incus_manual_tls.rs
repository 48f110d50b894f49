//! `create --tls-mode manual` on a real incusd: the sandbox's HTTPS hosts
//! are served from the user's PEM files (checked with real curl and
//! openssl against the test CA), re-read on `certs renew`, left in place by
//! `delete`; a key that does not match its certificate, or files without
//! `--tls-mode manual`, are refused before anything is recorded or created
//! (by the same checks as `add`).
//!
//! Needs `.ci/setup-incus.sh` (incusd, bridge sbx0, image test/debian-ssh).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::incus as support;
use testsupport::{require, Component};

use std::process::Command;
use std::time::Instant;

use common::pki::{file_serial, served_serial, Ca};
use support::{block_on, daemon, incus, listed, unique, InstanceGuard};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// The sandbox's entry in `certs --json`.
fn cert_status(d: &common::Daemon, domain: &str) -> serde_json::Value {
    d.cert_entry(domain)
        .unwrap_or_else(|| panic!("{domain} not in certs"))
}

#[test]
fn create_serves_manual_certificates_and_refuses_a_mismatched_key() {
    if !require(&[
        Component::Incus,
        Component::Program("curl"),
        Component::Program("ssh-keygen"),
        Component::Program("openssl"),
    ]) {
        return;
    }
    let d = daemon();
    let name = unique("tls");
    let _guard = InstanceGuard::new(&name);
    let domain = format!("{name}.test");
    let agent = format!("shelley.{domain}");
    let pki = d.dir.path().join("pki");
    std::fs::create_dir(&pki).unwrap();
    let ca = Ca::new(&pki, "sandboxd-manual-ca");
    let (cert, key) = ca.leaf("site", &[&domain, &agent]);
    common::pki::key(&pki, "other.key");
    let ssh_key = d.keygen("client");
    // The CLI runs in the pki directory: relative file names are made
    // absolute by it (the daemon reads them from elsewhere).
    let cli = |args: &[&str]| {
        Command::new(common::BIN)
            .arg("--admin-socket")
            .arg(&d.socket)
            .args(args)
            .current_dir(&pki)
            .output()
            .unwrap()
    };
    let manual = |cert: &'static str, key: &'static str| {
        [
            "--tls-mode",
            "manual",
            "--tls-cert-file",
            cert,
            "--tls-key-file",
            key,
        ]
    };
    let create = |tls: &[&str]| {
        let mut args = vec!["create", &name, "--domain", &domain, "--ssh-key"];
        args.push(ssh_key.to_str().unwrap());
        args.extend_from_slice(tls);
        cli(&args)
    };
    let nothing_made = || {
        assert!(listed(&d, &name).is_none(), "no record");
        assert!(
            !block_on(incus().instance_exists(&name)).unwrap(),
            "no container"
        );
    };

    // A key that is not the certificate's: refused at once, nothing made.
    let t = Instant::now();
    let out = create(&manual("site.pem", "other.key"));
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("the private key does not match the certificate") && err.contains("other.key"),
        "{err}"
    );
    assert!(!err.contains("[1/10]"), "refused before any step: {err}");
    eprintln!("mismatch refused in {:?}: {err}", t.elapsed());
    nothing_made();
    // Files without the manual mode: refused the same way as by `add`.
    let out = create(&manual("site.pem", "site.key")[2..]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("--tls-mode manual"),
        "{}",
        stderr(&out)
    );
    nothing_made();
    // `add` shares the check.
    let mut add = vec!["add", "static-mismatch", "--domain", "static-mismatch.test"];
    add.extend(["--upstream", "127.0.0.1", "--ssh-key"]);
    add.push(ssh_key.to_str().unwrap());
    add.extend(manual("site.pem", "other.key"));
    let out = cli(&add);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("does not match"), "{}", stderr(&out));
    assert!(listed(&d, "static-mismatch").is_none());

    // The good pair.
    let t = Instant::now();
    let out = create(&manual("site.pem", "site.key"));
    assert!(
        out.status.success(),
        "create failed: {}\n{}",
        stderr(&out),
        d.log_text()
    );
    eprintln!("create took {:?}", t.elapsed());
    let sb = d.json(&["show", &name, "--json"]);
    assert_eq!(sb["tls_mode"], "manual", "{sb}");
    assert_eq!(sb["status"], "running", "{sb}");

    // Served from the files: the exact certificate, verified by curl
    // against the test CA (the container's app port is closed: 502 page).
    let https = d.listen_port("https_listen");
    let curl = |host: &str| {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "10", "-o", "-", "-w", "\n%{http_code}"])
            .arg("--cacert")
            .arg(&ca.cert)
            .arg("--resolve")
            .arg(format!("{host}:{https}:127.0.0.1"))
            .arg(format!("https://{host}:{https}/"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.to_string(), body.to_string(), stderr(&out))
    };
    let (code, body, err) = curl(&domain);
    assert_eq!(code, "502", "{err}\n{body}\n{}", d.log_text());
    assert!(body.contains(&name), "the page names the sandbox: {body}");
    assert_eq!(served_serial(&domain, https).unwrap(), file_serial(&cert));
    assert_eq!(served_serial(&agent, https).unwrap(), file_serial(&cert));
    let c = cert_status(&d, &domain);
    assert_eq!(c["mode"], "manual", "{c}");
    assert!(
        c["issuer"].as_str().unwrap().contains("sandboxd-manual-ca"),
        "{c}"
    );
    assert!(c["last_error"].is_null(), "{c}");

    // New files in place are served after `certs renew`, as for `add`.
    let first = file_serial(&cert);
    let (new_cert, new_key) = ca.leaf("site2", &[&domain, &agent]);
    std::fs::copy(&new_cert, &cert).unwrap();
    std::fs::copy(&new_key, &key).unwrap();
    let out = d.ok(&["certs", "renew", &domain]);
    assert!(out.contains("reloaded"), "{out}");
    let second = file_serial(&new_cert);
    assert_ne!(first, second);
    assert_eq!(served_serial(&domain, https).unwrap(), second);
    assert_eq!(curl(&domain).0, "502");

    // delete: container and record gone, the user's files left alone.
    d.ok(&["delete", &name]);
    assert!(!block_on(incus().instance_exists(&name)).unwrap());
    assert!(cert.exists() && key.exists());
    assert_eq!(served_serial(&domain, https), None, "no longer served");
}
