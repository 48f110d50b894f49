//! Only modern algorithms, on both legs: ssh-audit finds nothing on the
//! gateway that it does not find on a stock OpenSSH sshd; the upstream leg
//! negotiates (and offers) only modern algorithms with a real sshd and
//! refuses one that has nothing modern; clients cannot log in with SHA-1
//! `ssh-rsa` signatures or encrypt-and-MAC MACs, while rsa-sha2-* and ETM
//! MACs work.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use common::*;
use russh::keys::{HashAlg, PrivateKey, PrivateKeyWithHashAlg};
use testsupport::{require, Component};

/// Key exchange the gateway may offer or agree on (with the protocol
/// extension pseudo-algorithms).
const MODERN_KEX: &[&str] = &[
    "mlkem768x25519-sha256",
    "curve25519-sha256",
    "curve25519-sha256@libssh.org",
    "diffie-hellman-group16-sha512",
    "diffie-hellman-group18-sha512",
    "ext-info-c",
    "ext-info-s",
    "kex-strict-c-v00@openssh.com",
    "kex-strict-s-v00@openssh.com",
];
const MODERN_CIPHERS: &[&str] = &[
    "chacha20-poly1305@openssh.com",
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "aes128-ctr",
    "aes192-ctr",
    "aes256-ctr",
];
const MODERN_MACS: &[&str] = &[
    "hmac-sha2-256-etm@openssh.com",
    "hmac-sha2-512-etm@openssh.com",
];

/// Findings of ssh-audit 2.5.0 the gateway may show although sshd does not,
/// each with its reason.
const ACCEPTED_FINDINGS: &[(&str, &str, &str, &str)] = &[(
    // ssh-audit 2.5.0 (2021) predates this hybrid post-quantum key
    // exchange (OpenSSH 9.9, 2024) and reports every name it does not know.
    "kex",
    "mlkem768x25519-sha256",
    "warn",
    "unknown algorithm",
)];

/// One finding: (category, algorithm, level, text).
type Finding = (String, String, String, String);

/// ssh-audit's warnings and failures for the server on `port`, from its
/// batch output (`(kex) NAME [(N-bit)] -- [warn] TEXT`; 2.5.0's JSON has
/// no findings).
fn audit(port: u16) -> (BTreeSet<Finding>, usize) {
    let out = Command::new("ssh-audit")
        .args(["-b", "-n", "-t", "30", "-p", &port.to_string(), "127.0.0.1"])
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    let mut findings = BTreeSet::new();
    let mut lines = 0;
    for line in stdout.lines() {
        let Some(rest) = line.strip_prefix('(') else {
            continue;
        };
        let Some((category, rest)) = rest.split_once(") ") else {
            continue;
        };
        let Some((name, finding)) = rest.split_once(" -- [") else {
            continue;
        };
        let Some((level, what)) = finding.split_once("] ") else {
            continue;
        };
        lines += 1;
        if level == "warn" || level == "fail" {
            let name = name.split_whitespace().next().unwrap_or_default();
            findings.insert((
                category.to_owned(),
                name.to_owned(),
                level.to_owned(),
                what.trim().to_owned(),
            ));
        }
    }
    assert!(
        lines >= 10,
        "ssh-audit said little about port {port}:\n{stdout}\n{}",
        text(&out.stderr)
    );
    (findings, lines)
}

#[test]
fn ssh_audit_finds_nothing_on_the_gateway_that_stock_sshd_does_not() {
    if !require(&[Component::Sshd, Component::Program("ssh-audit")]) {
        return;
    }
    // The harness's sshd runs with Debian's default algorithms (its config
    // names none) and, like the gateway here, one ed25519 host key.
    let h = harness().start();
    let (sshd, _) = audit(h.sshd.port);
    let (gateway, _) = audit(h.addr.port());
    eprintln!("ssh-audit on the gateway: {gateway:#?}");
    let accepted: BTreeSet<Finding> = ACCEPTED_FINDINGS
        .iter()
        .map(|(c, n, l, t)| (c.to_string(), n.to_string(), l.to_string(), t.to_string()))
        .collect();
    let extra: Vec<&Finding> = gateway
        .iter()
        .filter(|f| !sshd.contains(*f) && !accepted.contains(*f))
        .collect();
    assert!(
        extra.is_empty(),
        "ssh-audit finds on the gateway but not on sshd: {extra:#?}"
    );
    // sshd shows findings the gateway avoids: the comparison is not vacuous.
    assert!(
        sshd.iter().any(|f| f.3.contains("encrypt-and-MAC")),
        "{sshd:#?}"
    );
    // And the gateway has none of those, nor any failure.
    assert!(
        !gateway
            .iter()
            .any(|f| f.2 == "fail" || f.3.contains("encrypt-and-MAC") || f.3.contains("weak")),
        "{gateway:#?}"
    );
    h.assert_serves();
}

/// The comma-separated list sshd logged after `label` for the gateway's
/// proposal ("peer client KEXINIT proposal").
fn peer_proposal(log: &str, label: &str) -> Vec<String> {
    let start = log
        .find("peer client KEXINIT proposal")
        .unwrap_or_else(|| panic!("no client proposal in sshd's log:\n{log}"));
    let line = log[start..]
        .lines()
        .find_map(|l| l.split_once(&format!("debug2: {label}: ")).map(|(_, v)| v))
        .unwrap_or_else(|| panic!("no {label} in sshd's log"));
    let list = line.trim_end_matches(" [preauth]").trim();
    list.split(',').map(str::to_owned).collect()
}

/// What sshd logged as agreed (`kex: ...` lines).
fn agreed(log: &str, prefix: &str) -> String {
    log.lines()
        .find_map(|l| l.split_once(prefix).map(|(_, v)| v))
        .unwrap_or_else(|| panic!("no {prefix:?} in sshd's log:\n{log}"))
        .trim_end_matches(" [preauth]")
        .to_owned()
}

#[test]
fn the_upstream_leg_offers_and_agrees_on_modern_algorithms_only() {
    if !require(&[Component::Sshd]) {
        return;
    }
    let h = harness().sshd_config("LogLevel DEBUG3\n").start();
    h.assert_serves();
    let log = h.sshd.log_text();
    for kex in peer_proposal(&log, "KEX algorithms") {
        assert!(MODERN_KEX.contains(&kex.as_str()), "gateway offers {kex}");
    }
    for dir in ["ciphers ctos", "ciphers stoc"] {
        for c in peer_proposal(&log, dir) {
            assert!(MODERN_CIPHERS.contains(&c.as_str()), "gateway offers {c}");
        }
    }
    for dir in ["MACs ctos", "MACs stoc"] {
        for m in peer_proposal(&log, dir) {
            assert!(MODERN_MACS.contains(&m.as_str()), "gateway offers {m}");
        }
    }
    let kex = agreed(&log, "kex: algorithm: ");
    assert!(MODERN_KEX.contains(&kex.as_str()), "agreed on {kex}");
    for dir in ["client->server", "server->client"] {
        // "CIPHER MAC: <implicit> compression: none"
        let line = agreed(&log, &format!("kex: {dir} cipher: "));
        let mut words = line.split_whitespace();
        let cipher = words.next().unwrap_or_default();
        let mac = words.nth(1).unwrap_or_default();
        assert!(MODERN_CIPHERS.contains(&cipher), "{dir}: {line}");
        assert!(
            mac == "<implicit>" || MODERN_MACS.contains(&mac),
            "{dir}: {line}"
        );
    }
}

#[test]
fn the_upstream_leg_uses_etm_with_a_ctr_cipher() {
    if !require(&[Component::Sshd]) {
        return;
    }
    // sshd's first choices are the weak ones; the gateway must pick ETM.
    let h = harness()
        .sshd_config(
            "LogLevel DEBUG\nCiphers aes256-ctr\n\
             MACs hmac-sha2-256,hmac-sha2-512,hmac-sha2-256-etm@openssh.com\n",
        )
        .start();
    h.assert_serves();
    let log = h.sshd.log_text();
    let line = agreed(&log, "kex: client->server cipher: ");
    assert!(
        line.starts_with("aes256-ctr MAC: hmac-sha2-256-etm@openssh.com"),
        "{line}"
    );
}

#[test]
fn an_upstream_without_modern_macs_is_refused_not_downgraded() {
    if !require(&[Component::Sshd]) {
        return;
    }
    let h = harness()
        .sshd_config(
            "LogLevel DEBUG\nCiphers aes128-ctr,aes256-ctr\n\
             MACs hmac-sha2-256,hmac-sha2-512,hmac-sha1\n",
        )
        .start();
    let out = run(h.ssh().arg("true"));
    assert_eq!(out.status.code(), Some(255));
    let err = text(&out.stderr);
    assert!(
        err.contains("sandbox app-example-com: its sshd offers no modern MAC algorithm"),
        "{err}"
    );
    // sshd agreed on no algorithms with the gateway and let nobody in.
    // (Whether it logs "no matching MAC found" depends on whether the
    // gateway's KEXINIT reached it before the gateway hung up.)
    let log = h.sshd.log_text();
    assert!(!log.contains("kex: client->server cipher"), "{log}");
    assert!(!log.contains("Accepted publickey"), "{log}");
}

/// A 3072-bit RSA key, authorized on the gateway's route and on sshd.
fn rsa_key(h: &Harness) -> std::path::PathBuf {
    let path = h.path("client_rsa");
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "rsa", "-b", "3072", "-N", "", "-C", "rsa", "-f"])
        .arg(&path)
        .status()
        .unwrap();
    assert!(st.success());
    let public = read_pub(&path);
    let mut route = h.routes.get(&h.sandbox);
    route.authorized_keys.push(public.clone());
    h.routes.set(route);
    h.sshd.authorize(&public.to_openssh().unwrap());
    path
}

/// `ssh` with `key` and extra options, to the gateway or (direct) to sshd.
fn ssh_with(h: &Harness, key: &Path, direct: bool, opts: &[&str]) -> Command {
    let mut c = Command::new("ssh");
    c.args(h.ssh_opts())
        .args(["-i", &key.display().to_string()])
        .args(["-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none"])
        .args(opts);
    if direct {
        c.args(["-p", &h.sshd.port.to_string()])
            .arg(format!("{}@127.0.0.1", whoami()));
    } else {
        c.args(["-p", &h.addr.port().to_string()])
            .arg(format!("{}@127.0.0.1", h.sandbox));
    }
    c.arg("echo in");
    c
}

fn logs_in(c: &mut Command) -> (bool, String) {
    let out = run(c);
    (text(&out.stdout) == "in\n", text(&out.stderr))
}

#[test]
fn openssh_client_rsa_logins_need_sha2() {
    if !require(&[Component::Sshd]) {
        return;
    }
    let h = harness().start();
    let key = rsa_key(&h);
    for direct in [true, false] {
        let who = if direct { "sshd" } else { "gateway" };
        // Default: rsa-sha2-512.
        let (ok, err) = logs_in(&mut ssh_with(&h, &key, direct, &[]));
        assert!(ok, "{who}: {err}");
        // SHA-1 only: refused by sshd (the control) and by the gateway.
        let (ok, err) = logs_in(&mut ssh_with(
            &h,
            &key,
            direct,
            &["-o", "PubkeyAcceptedAlgorithms=ssh-rsa"],
        ));
        assert!(!ok, "{who} accepted ssh-rsa");
        assert!(err.contains("Permission denied"), "{who}: {err}");
    }
}

#[test]
fn openssh_client_needs_an_etm_mac_with_ctr() {
    if !require(&[Component::Sshd]) {
        return;
    }
    let h = harness().start();
    let key = h.keys[0].clone();
    let (ok, err) = logs_in(&mut ssh_with(
        &h,
        &key,
        false,
        &["-c", "aes128-ctr", "-o", "MACs=hmac-sha2-256"],
    ));
    assert!(!ok, "encrypt-and-MAC accepted");
    assert!(err.contains("no matching MAC found"), "{err}");
    let (ok, err) = logs_in(&mut ssh_with(
        &h,
        &key,
        false,
        &[
            "-c",
            "aes128-ctr",
            "-o",
            "MACs=hmac-sha2-256-etm@openssh.com",
        ],
    ));
    assert!(ok, "{err}");
    // Old ciphers are not offered at all.
    let (ok, err) = logs_in(&mut ssh_with(&h, &key, false, &["-c", "aes128-cbc"]));
    assert!(!ok);
    assert!(err.contains("no matching cipher found"), "{err}");
}

/// Accepts any host key: these logins test user authentication only.
struct AnyHost;

impl russh::client::Handler for AnyHost {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        _key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(true)
    }
}

/// Whether russh's client logs in to `port` as `user`, signing with `key`
/// and exactly `hash` (`None`: SHA-1 `ssh-rsa`, whatever the server
/// advertises — which OpenSSH's client does not do when the server's
/// `server-sig-algs` leaves it out).
fn russh_login(port: u16, user: &str, key: &Arc<PrivateKey>, hash: Option<HashAlg>) -> bool {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let config = Arc::new(russh::client::Config::default());
        let mut handle = russh::client::connect(config, ("127.0.0.1", port), AnyHost)
            .await
            .unwrap();
        let result = handle
            .authenticate_publickey(user, PrivateKeyWithHashAlg::new(key.clone(), hash))
            .await
            .unwrap();
        result.success()
    })
}

#[test]
fn sha1_rsa_signatures_are_refused_as_sshd_refuses_them() {
    if !require(&[Component::Sshd]) {
        return;
    }
    let h = harness().start();
    let path = rsa_key(&h);
    let key =
        Arc::new(PrivateKey::from_openssh(std::fs::read_to_string(&path).unwrap().trim()).unwrap());
    let me = whoami();
    let targets = [
        ("sshd", h.sshd.port, me.as_str()),
        ("gateway", h.addr.port(), h.sandbox.as_str()),
    ];
    for (who, port, user) in targets {
        assert!(
            !russh_login(port, user, &key, None),
            "{who} accepted an ssh-rsa (SHA-1) signature"
        );
        for hash in [HashAlg::Sha512, HashAlg::Sha256] {
            assert!(
                russh_login(port, user, &key, Some(hash)),
                "{who} refused rsa-sha2 ({hash:?})"
            );
        }
    }
}
