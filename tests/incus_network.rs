//! Tenant network isolation on a real incusd with real containers: what
//! one sandbox can reach of another sandbox, of the host and of the rest,
//! under each egress policy, and what spoofing an address or a MAC gets
//! it. Two sandboxes are made once and reused by every check (a container
//! costs seconds).
//!
//! Needs `.ci/setup-incus.sh` (incusd, bridge sbx0 198.18.0.1/24, image
//! test/debian-ssh) and `.ci/setup-provision.sh` (the package cache on
//! 198.18.0.1:3142). The test image has bash but no nc, curl or python:
//! connections from a container use bash's /dev/tcp, and the listener in
//! the other sandbox is its sshd on port 22.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::incus as support;
use testsupport::{require, Component};

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use support::{
    block_on, create, exec, gateway_ssh, incus, listed, ssh_target, unique, wait_until,
    InstanceGuard, TEST_IMAGE,
};

/// The bridge's own address (the host's side of sbx0).
const HOST: &str = "198.18.0.1";
/// The package cache `.ci/setup-provision.sh` runs on the bridge.
const CACHE_PORT: u16 = 3142;

/// Whether `name` can open a TCP connection to `ip:port` (bounded: 3 s).
fn reaches(name: &str, ip: &str, port: u16) -> bool {
    let out = exec(
        name,
        &format!(
            "timeout 3 bash -c 'exec 3<>/dev/tcp/{ip}/{port}' 2>/dev/null && echo OPEN || echo CLOSED"
        ),
    );
    match out.trim() {
        "OPEN" => true,
        "CLOSED" => false,
        other => panic!("unexpected output {other:?}"),
    }
}

/// A listener on the host's bridge address answering every connection.
fn host_listener() -> u16 {
    let l = TcpListener::bind((HOST, 0)).unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut c in l.incoming().flatten() {
            let _ = c.write_all(b"host\n");
        }
    });
    port
}

fn view(d: &common::Daemon, name: &str) -> serde_json::Value {
    listed(d, name).unwrap_or_else(|| panic!("{name} not listed"))
}

fn assigned(d: &common::Daemon, name: &str) -> String {
    view(d, name)["assigned_ipv4"]
        .as_str()
        .expect("an assigned address")
        .to_string()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// The sshd of `ip` answers the host with its banner.
fn sshd_answers_host(ip: &str) -> bool {
    let Ok(mut s) =
        TcpStream::connect_timeout(&format!("{ip}:22").parse().unwrap(), Duration::from_secs(5))
    else {
        return false;
    };
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf).is_ok() && &buf == b"SSH-2.0"
}

/// The bridge's egress ACL of sandboxd (attached by `.ci/setup-incus.sh`).
const ACL: &str = "sandboxd-egress-sbx0";

/// Sources of the rules in the bridge's egress ACL.
fn acl_sources() -> Vec<String> {
    block_on(incus().network_acl(ACL))
        .unwrap()
        .map(|a| a.egress.into_iter().map(|r| r.source).collect())
        .unwrap_or_default()
}

/// Removes a sandbox's rules (tagged with its name) from the bridge's ACL
/// when the test ends early (a normal run's `delete` has done it already).
struct RulesGuard(String);

impl Drop for RulesGuard {
    fn drop(&mut self) {
        let tag = format!("sandboxd {}: ", self.0);
        let _ = block_on(incus().edit_network_acl(ACL, |acl| {
            let n = acl.egress.len();
            acl.egress.retain(|r| !r.description.starts_with(&tag));
            acl.egress.len() != n
        }));
    }
}

#[test]
fn tenants_are_isolated_by_incus() {
    if !require(&[Component::Incus, Component::Program("ssh-keygen")]) {
        return;
    }
    let d = common::Daemon::builder(common::BIN)
        .config(&format!(
            "default_image = \"{TEST_IMAGE}\"\nincus_reconcile_secs = 1\n\
             [provision]\nmode = \"none\"\napt_proxy = \"http://{HOST}:{CACHE_PORT}\"\n"
        ))
        .start();
    let a = unique("net-a");
    let b = unique("net-b");
    // Dropped in reverse order: the containers go first, then the rules.
    let _rules = (RulesGuard(a.clone()), RulesGuard(b.clone()));
    let _ga = InstanceGuard::new(&a);
    let _gb = InstanceGuard::new(&b);
    // Both at once: each create waits seconds for its container. (The
    // client key both use is made first, not by two racing ssh-keygens.)
    d.keygen("client");
    std::thread::scope(|scope| {
        let d = &d;
        let made: Vec<_> = [&a, &b]
            .into_iter()
            .map(|name| scope.spawn(move || (name, create(d, name, &[]))))
            .collect();
        for m in made {
            let (name, out) = m.join().unwrap();
            assert!(
                out.status.success(),
                "create {name}: {}\n{}",
                stderr(&out),
                d.log_text()
            );
        }
    });
    let (ip_a, ip_b) = (assigned(&d, &a), assigned(&d, &b));
    assert_ne!(ip_a, ip_b);
    assert!(ip_a.starts_with("198.18.0."), "{ip_a}");

    // 1. B's sshd answers the host, never A (any policy: checked again
    //    under `open` below).
    assert!(sshd_answers_host(&ip_b), "B's sshd is up");
    assert!(!reaches(&a, &ip_b, 22), "A reached B's port 22");

    // The default policy is restricted; show says so, and where the
    // gates connect.
    let shown = d.ok(&["show", &a]);
    assert!(shown.contains("egress:            restricted"), "{shown}");
    assert!(
        shown.contains(&format!("address:           {ip_a} (fixed")),
        "{shown}"
    );

    // 2. restricted: a host port is closed to A; DNS answers (B's name),
    //    the package cache port is open, DHCP gave A its fixed address.
    let port = host_listener();
    assert!(!reaches(&a, HOST, port), "restricted A reached the host");
    assert!(
        reaches(&a, HOST, CACHE_PORT),
        "restricted A lost the package cache"
    );
    let dns = exec(&a, &format!("getent hosts {b} || true"));
    assert!(dns.contains(&ip_b), "DNS from A: {dns:?}");
    assert!(
        view(&d, &a)["addresses"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x == ip_a.as_str()),
        "A's lease is its fixed address"
    );

    // 3. open: the host port opens; B stays closed.
    let out = d.ok(&["egress", &a, "open"]);
    assert!(out.contains("open"), "{out}");
    assert!(reaches(&a, HOST, port), "open A cannot reach the host");
    assert!(!reaches(&a, &ip_b, 22), "open A reached B");

    // 4. allowlist: only what is listed (plus the cache).
    d.ok(&["egress", &a, "allowlist", "--allow", "192.0.2.0/24"]);
    assert!(
        !reaches(&a, HOST, port),
        "allowlist A reached an unlisted host"
    );
    assert!(
        reaches(&a, HOST, CACHE_PORT),
        "allowlist A lost the package cache"
    );
    d.ok(&["egress", &a, "allowlist", "--allow", &format!("{HOST}/32")]);
    assert!(reaches(&a, HOST, port), "allowlisted host not reachable");
    assert!(!reaches(&a, &ip_b, 22), "allowlist A reached B");
    let shown = d.ok(&["show", &a]);
    assert!(shown.contains(&format!("allowlist ({HOST}/32)")), "{shown}");
    let err = d.fails(&["egress", &a, "open", "--allow", "192.0.2.0/24"]);
    assert!(err.contains("allowlist"), "{err}");

    // 5. Spoofing, under `open` so that only the NIC's filters can stop
    //    it. A moves to another address: nothing gets through, and the
    //    gates keep connecting to A's assigned address even though A now
    //    reports the other one.
    d.ok(&["egress", &a, "open"]);
    let spoofed = "198.18.0.251";
    exec(
        &a,
        &format!(
            "ip addr flush dev eth0 && ip addr add {spoofed}/24 dev eth0 && \
             ip route replace default via {HOST}"
        ),
    );
    assert!(
        !reaches(&a, HOST, port),
        "A got through with another address"
    );
    wait_until(
        Duration::from_secs(20),
        "A's new address to be reported",
        || view(&d, &a)["addresses"] == serde_json::json!([spoofed]),
    );
    assert_eq!(ssh_target(&d, &a).unwrap(), format!("{ip_a}:22"));
    // A claims B's address: still nothing gets out, and the gateway still
    // reaches the real B.
    exec(&a, &format!("ip addr flush dev eth0 && ip addr add {ip_b}/24 dev eth0 && ip route replace default via {HOST}"));
    assert!(!reaches(&a, HOST, port), "A got through with B's address");
    let out = gateway_ssh(&d, &b, "hostname");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        b,
        "{}",
        stderr(&out)
    );
    // A's own address with another MAC: dropped too; its own MAC again:
    // through (so the failures above were the filters').
    let mac = exec(&a, "cat /sys/class/net/eth0/address")
        .trim()
        .to_string();
    let back = format!(
        "ip addr flush dev eth0 && ip addr add {ip_a}/24 dev eth0 && ip route replace default via {HOST}"
    );
    exec(
        &a,
        &format!("ip link set eth0 down && ip link set eth0 address 02:5a:00:00:00:01 && ip link set eth0 up && {back}"),
    );
    assert!(!reaches(&a, HOST, port), "A got through with another MAC");
    exec(
        &a,
        &format!("ip link set eth0 down && ip link set eth0 address {mac} && ip link set eth0 up && {back}"),
    );
    assert!(reaches(&a, HOST, port), "A with its own address and MAC");
    assert_eq!(ssh_target(&d, &a).unwrap(), format!("{ip_a}:22"));

    // 6. The Incus objects: A's NIC carries the filters and its address;
    //    the bridge's ACL holds A's rules until A is deleted.
    let inst = block_on(incus().instance(&a)).unwrap();
    let nic = &inst.devices["eth0"];
    assert_eq!(nic["ipv4.address"], ip_a);
    for key in [
        "security.port_isolation",
        "security.mac_filtering",
        "security.ipv4_filtering",
        "security.ipv6_filtering",
    ] {
        assert_eq!(nic[key], "true", "{key}");
    }
    assert!(acl_sources().contains(&ip_a), "{:?}", acl_sources());

    // 7. Upgrade: B as an earlier sandboxd left it (the profile's plain
    //    NIC, a record without address or policy) gets its fixed address
    //    (the one it has), filters and rules from the reconcile.
    let out = std::process::Command::new("incus")
        .args(["config", "device", "remove", &b, "eth0"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let mut backup = d.json(&["backup"]);
    for sb in backup["sandboxes"].as_array_mut().unwrap() {
        if sb["name"] == b.as_str() {
            let obj = sb.as_object_mut().unwrap();
            obj.remove("assigned_ipv4");
            obj.remove("egress");
        }
    }
    // The old B had no rules either.
    block_on(incus().edit_network_acl(ACL, |acl| {
        let n = acl.egress.len();
        acl.egress.retain(|r| r.source != ip_b);
        acl.egress.len() != n
    }))
    .unwrap();
    assert!(!acl_sources().contains(&ip_b));
    let out = d.cli_with_stdin(
        &["restore", "--replace"],
        serde_json::to_string(&backup).unwrap().as_bytes(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    wait_until(
        Duration::from_secs(60),
        "the reconcile to isolate B again",
        || {
            let inst = block_on(incus().instance(&b)).unwrap();
            view(&d, &b)["assigned_ipv4"].as_str().is_some()
                && inst
                    .devices
                    .get("eth0")
                    .is_some_and(|n| n.contains_key("ipv4.address"))
                && ssh_target(&d, &b).is_some_and(|t| t.ends_with(":22"))
        },
    );
    let ip_b2 = assigned(&d, &b);
    assert!(acl_sources().contains(&ip_b2), "{:?}", acl_sources());
    assert_eq!(view(&d, &b)["egress"], "restricted");
    assert!(!reaches(&a, &ip_b2, 22), "A reached the upgraded B");
    let out = gateway_ssh(&d, &b, "hostname");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        b,
        "{}",
        stderr(&out)
    );
    let ip_b = ip_b2;

    for (name, ip) in [(&a, &ip_a), (&b, &ip_b)] {
        d.ok(&["delete", name]);
        assert!(!acl_sources().contains(ip), "rules of {name} left");
    }
    assert!(
        block_on(incus().network("sbx0")).unwrap().unwrap().config["security.acls"]
            .split(',')
            .any(|x| x == ACL),
        "the bridge's ACL stays attached"
    );
}
