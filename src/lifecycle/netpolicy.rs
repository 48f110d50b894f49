//! A sandbox's network policy as Incus objects: the bridged NIC that pins
//! its address and stops spoofing, and the egress rules of its network ACL.
//! Pure computation (no Incus call), so that every rule is unit-tested.
//!
//! How the rules work (Incus 6.0, nftables firewall driver): the ACL is
//! attached to the sandbox's *network* (`security.acls` of the bridge), so
//! Incus evaluates it in the `inet` family on traffic from the bridge to
//! the host (input) and through the host (forward). Per-NIC ACLs would need
//! connection tracking in the `bridge` family (`nf_conntrack_bridge`),
//! which kernels without that module cannot load. On a network, Incus runs
//! the drop and reject rules of all attached ACLs before any allow rule and applies
//! one default action for the whole bridge; so the network's defaults are
//! `allow` and each sandbox's ACL holds only `reject` rules whose source is
//! the sandbox's fixed address. That source can be trusted because the NIC
//! has `security.ipv4_filtering` (frames from any other address are dropped
//! at the bridge port) and `security.mac_filtering`. Direct frames between
//! sandboxes never reach the ACL: `security.port_isolation` drops them at
//! the bridge; routed ones (through the host) hit the "peers" drop below.
//!
//! Incus itself accepts DNS (53), DHCP (67) and a few ICMP errors from the
//! bridge to the host before any ACL rule, so DNS and DHCP keep working
//! under every policy.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use store::EgressMode;

/// Inclusive IPv4 range as integers.
pub type Range = (u32, u32);

/// Ranges a `restricted` sandbox may not reach (besides its bridge and the
/// host's own addresses): "this network", RFC 1918, carrier-grade NAT,
/// loopback, link-local (cloud metadata), IETF protocol assignments,
/// benchmarking (RFC 2544), multicast and reserved/broadcast.
pub const PRIVATE_RANGES: [&str; 11] = [
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/4",
    "240.0.0.0/4",
];

/// What the rules depend on besides the sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetFacts {
    /// The bridge's own address (the gateway, DHCP and DNS server).
    pub gateway: Ipv4Addr,
    pub prefix: u8,
    /// The host's own addresses on every interface.
    pub host_addrs: Vec<Ipv4Addr>,
    /// The package cache (`[provision] apt_proxy`), if on an IPv4 address.
    pub cache: Option<(Ipv4Addr, u16)>,
}

/// Parses `A.B.C.D/N` (or a bare address as /32) into a range.
pub fn parse_cidr(text: &str) -> Option<Range> {
    let (ip, prefix) = match text.split_once('/') {
        Some((ip, p)) => (ip.parse::<Ipv4Addr>().ok()?, p.parse::<u8>().ok()?),
        None => (text.parse::<Ipv4Addr>().ok()?, 32),
    };
    if prefix > 32 {
        return None;
    }
    Some(cidr_range(ip, prefix))
}

fn cidr_range(ip: Ipv4Addr, prefix: u8) -> Range {
    let mask: u32 = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    };
    let start = u32::from(ip) & mask;
    (start, start | !mask)
}

/// The subnet of a bridge address.
pub fn subnet(gateway: Ipv4Addr, prefix: u8) -> Range {
    cidr_range(gateway, prefix)
}

/// Sorted, merged ranges.
fn normalize(mut v: Vec<Range>) -> Vec<Range> {
    v.sort_unstable();
    let mut out: Vec<Range> = Vec::with_capacity(v.len());
    for (a, b) in v {
        match out.last_mut() {
            Some(last) if a <= last.1.saturating_add(1) => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

/// `set` minus `cut`.
fn subtract(set: &[Range], cut: &[Range]) -> Vec<Range> {
    let cut = normalize(cut.to_vec());
    let mut out = Vec::new();
    for &(mut a, b) in &normalize(set.to_vec()) {
        let mut alive = true;
        for &(c, d) in &cut {
            if d < a || c > b {
                continue;
            }
            if c > a {
                out.push((a, c - 1));
            }
            if d >= b {
                alive = false;
                break;
            }
            a = d + 1;
        }
        if alive {
            out.push((a, b));
        }
    }
    out
}

fn single(ip: Ipv4Addr) -> Range {
    (u32::from(ip), u32::from(ip))
}

/// Incus' notation: `A` for one address, `A-B` for a range.
fn render(ranges: &[Range]) -> String {
    ranges
        .iter()
        .map(|&(a, b)| {
            if a == b {
                Ipv4Addr::from(a).to_string()
            } else {
                format!("{}-{}", Ipv4Addr::from(a), Ipv4Addr::from(b))
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn ports_except(allowed: &[u16]) -> String {
    let set: Vec<Range> = allowed
        .iter()
        .map(|&p| (u32::from(p), u32::from(p)))
        .collect();
    subtract(&[(1, 65535)], &set)
        .iter()
        .map(|&(a, b)| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}-{b}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The egress rules of a sandbox's ACL: all `reject` (a refused
/// connection fails at once), all from `source`.
/// `allowed` holds the resolved `allowlist` entries (ignored otherwise).
pub fn egress_rules(
    source: Ipv4Addr,
    mode: EgressMode,
    allowed: &[Range],
    facts: &NetFacts,
) -> Vec<incusctl::AclRule> {
    let net = subnet(facts.gateway, facts.prefix);
    let gw = single(facts.gateway);
    // Other sandboxes (and anything else on the bridge), never reachable.
    let peers = subtract(&[net], &[gw]);
    // Destinations reachable on given TCP ports only, with the ports.
    let mut exceptions: BTreeMap<u32, Vec<u16>> = BTreeMap::new();
    exceptions.insert(gw.0, vec![]);
    if let Some((ip, port)) = facts.cache {
        exceptions.entry(u32::from(ip)).or_default().push(port);
    }
    let exception_ranges: Vec<Range> = exceptions.keys().map(|&k| (k, k)).collect();
    let (dropped, limited): (Vec<Range>, Vec<u32>) = match mode {
        EgressMode::Open => (peers.clone(), vec![]),
        EgressMode::Restricted => {
            let mut blocked: Vec<Range> = PRIVATE_RANGES
                .iter()
                .filter_map(|c| parse_cidr(c))
                .collect();
            blocked.push(net);
            blocked.extend(facts.host_addrs.iter().map(|&ip| single(ip)));
            let blocked = normalize(blocked);
            let limited = exceptions
                .keys()
                .copied()
                .filter(|&e| blocked.iter().any(|&(a, b)| a <= e && e <= b))
                .collect();
            (subtract(&blocked, &exception_ranges), limited)
        }
        EgressMode::Allowlist => {
            let allowed = subtract(allowed, &peers);
            let mut keep = allowed.clone();
            keep.extend(exception_ranges.iter().copied());
            let limited = exceptions
                .keys()
                .copied()
                .filter(|&e| !allowed.iter().any(|&(a, b)| a <= e && e <= b))
                .collect();
            (subtract(&[(0, u32::MAX)], &keep), limited)
        }
    };
    let src = source.to_string();
    let rule = |destination: String, protocol: &str, ports: String, what: &str| {
        let mut r = incusctl::AclRule::new("reject");
        r.source = src.clone();
        r.destination = destination;
        r.protocol = protocol.to_string();
        r.destination_port = ports;
        r.description = what.to_string();
        r
    };
    let mut rules = Vec::new();
    if !dropped.is_empty() {
        rules.push(rule(
            render(&dropped),
            "",
            String::new(),
            &format!("sandboxd {}: unreachable ranges", mode.as_str()),
        ));
    }
    for e in limited {
        let dest = Ipv4Addr::from(e).to_string();
        let ports = exceptions.get(&e).cloned().unwrap_or_default();
        if ports.is_empty() {
            rules.push(rule(
                dest,
                "",
                String::new(),
                "sandboxd: host, DNS and DHCP only",
            ));
            continue;
        }
        rules.push(rule(
            dest.clone(),
            "tcp",
            ports_except(&ports),
            "sandboxd: host, package cache port only",
        ));
        rules.push(rule(
            dest.clone(),
            "udp",
            String::new(),
            "sandboxd: host, DNS and DHCP only",
        ));
        rules.push(rule(
            dest,
            "icmp4",
            String::new(),
            "sandboxd: host, no ICMP",
        ));
    }
    rules
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn facts() -> NetFacts {
        NetFacts {
            gateway: ip("198.18.0.1"),
            prefix: 24,
            host_addrs: vec![ip("203.0.113.7"), ip("198.18.0.1")],
            cache: Some((ip("198.18.0.1"), 3142)),
        }
    }

    /// Whether the rules let `source` reach `dest` on a TCP `port`.
    fn reaches(rules: &[incusctl::AclRule], dest: &str, port: u16) -> bool {
        let d = u32::from(ip(dest));
        !rules.iter().any(|r| {
            let in_dest = r.destination.split(',').any(|part| {
                let (a, b) = part.split_once('-').unwrap_or((part, part));
                u32::from(ip(a)) <= d && d <= u32::from(ip(b))
            });
            let proto = r.protocol.is_empty() || r.protocol == "tcp";
            let port_hit = r.destination_port.is_empty()
                || r.destination_port.split(',').any(|p| {
                    let (a, b) = p.split_once('-').unwrap_or((p, p));
                    a.parse::<u16>().unwrap() <= port && port <= b.parse::<u16>().unwrap()
                });
            in_dest && proto && port_hit
        })
    }

    #[test]
    fn ranges_subtract_and_render() {
        assert_eq!(parse_cidr("10.0.0.0/8"), Some((0x0a00_0000, 0x0aff_ffff)));
        assert_eq!(parse_cidr("1.2.3.4"), Some((0x0102_0304, 0x0102_0304)));
        assert_eq!(parse_cidr("1.2.3.4/33"), None);
        let net = subnet(ip("198.18.0.1"), 24);
        let peers = subtract(&[net], &[single(ip("198.18.0.1"))]);
        assert_eq!(render(&peers), "198.18.0.0,198.18.0.2-198.18.0.255");
        assert_eq!(ports_except(&[3142]), "1-3141,3143-65535");
        assert_eq!(subtract(&[(0, 10)], &[(0, 10)]), vec![]);
        assert_eq!(
            normalize(vec![(5, 9), (0, 4), (20, 30)]),
            vec![(0, 9), (20, 30)]
        );
    }

    #[test]
    fn open_blocks_only_peers() {
        let r = egress_rules(ip("198.18.0.10"), EgressMode::Open, &[], &facts());
        assert!(r
            .iter()
            .all(|r| r.source == "198.18.0.10" && r.action == "reject"));
        assert!(!reaches(&r, "198.18.0.11", 22));
        assert!(reaches(&r, "198.18.0.1", 8080));
        assert!(reaches(&r, "10.1.2.3", 80));
        assert!(reaches(&r, "203.0.113.7", 22));
    }

    #[test]
    fn restricted_blocks_private_host_and_metadata() {
        let r = egress_rules(ip("198.18.0.10"), EgressMode::Restricted, &[], &facts());
        for (dest, port) in [
            ("198.18.0.11", 22),
            ("198.18.0.1", 8080),
            ("198.18.0.1", 22),
            ("169.254.169.254", 80),
            ("10.0.0.1", 80),
            ("172.16.5.5", 80),
            ("192.168.1.1", 80),
            ("100.64.0.1", 80),
            ("127.0.0.1", 80),
            ("203.0.113.7", 22),
        ] {
            assert!(!reaches(&r, dest, port), "{dest}:{port} reachable");
        }
        assert!(reaches(&r, "198.18.0.1", 3142), "package cache");
        assert!(reaches(&r, "93.184.216.34", 443), "internet");
        assert!(reaches(&r, "8.8.8.8", 53), "internet");
    }

    #[test]
    fn allowlist_only_listed() {
        let allowed = [
            parse_cidr("192.0.2.0/24").unwrap(),
            parse_cidr("198.18.0.0/16").unwrap(),
        ];
        let r = egress_rules(ip("198.18.0.10"), EgressMode::Allowlist, &allowed, &facts());
        assert!(reaches(&r, "192.0.2.9", 80));
        assert!(!reaches(&r, "93.184.216.34", 443));
        // A listed range never opens the peers; the host only if listed.
        assert!(!reaches(&r, "198.18.0.11", 22));
        assert!(reaches(&r, "198.18.0.1", 8080));
        assert!(reaches(&r, "198.18.1.1", 80));
        let r = egress_rules(ip("198.18.0.10"), EgressMode::Allowlist, &[], &facts());
        assert!(!reaches(&r, "198.18.0.1", 8080));
        assert!(reaches(&r, "198.18.0.1", 3142), "package cache");
        assert!(!reaches(&r, "8.8.8.8", 443));
    }
}
