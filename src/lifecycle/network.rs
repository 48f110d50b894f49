//! Tenant network isolation of Incus sandboxes, done by Incus:
//!
//! - each sandbox's instance gets its own `eth0` device (an override of
//!   the profile's) with a fixed `ipv4.address` that sandboxd picks from
//!   the bridge's subnet and records in the store (unique, chosen inside
//!   the store's write transaction), and `security.port_isolation`,
//!   `security.mac_filtering`, `security.ipv4_filtering` and
//!   `security.ipv6_filtering`: a sandbox cannot reach another over the
//!   bridge, nor use another MAC or IP address (IPv6 only where the bridge
//!   assigns fixed IPv6 addresses by stateful DHCPv6; otherwise none);
//! - the gates connect to that recorded address only (`crate::routes`),
//!   never to what the container reports;
//! - its egress policy is a set of rules, all with the sandbox's address as
//!   source, in the Incus network ACL `sandboxd-egress-BRIDGE` attached to
//!   the bridge (see [`super::netpolicy`] for why on the network and not
//!   on the NIC); the rules are removed with the sandbox.
//!
//! One ACL per bridge, not one per sandbox: attaching or detaching an ACL
//! changes the network, and Incus 6.0 then re-runs the bridge's setup
//! (its DHCP/DNS server restarts for every container on it), and two such
//! changes at once fail inside Incus ("Address already in use"). Editing
//! an attached ACL's rules only swaps one nftables chain. The ACL is
//! attached once (by `sandboxd setup`, or here when missing) and every
//! edit of it is ETag-guarded, so daemons sharing a bridge do not lose
//! each other's rules. A sandbox's rules are found by the tag starting
//! their description (`sandboxd NAME: `); an address with rules of anyone
//! else (another daemon on the bridge, or one that died before deleting)
//! is never assigned.
//!
//! Every step is idempotent: the create and import pipelines run it, the
//! reconcile runs it once per daemon start for every settled sandbox (the
//! upgrade path of sandboxes made before isolation existed) and whenever
//! an instance's NIC stops matching, and `sandboxd egress` runs it after
//! changing the policy. Allowlisted names are resolved each time it runs.

use std::collections::{BTreeMap, HashSet};
use std::net::Ipv4Addr;

use store::{AddressPool, EgressMode, Sandbox};

use super::netpolicy::{self, NetFacts};
use super::{lock, Lifecycle, LifecycleError, Result};

/// The NIC device sandboxd gives each instance.
const NIC: &str = "eth0";
/// Bound on waiting for DNS when resolving allowlisted names.
const RESOLVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A managed bridge as sandboxd uses it.
#[derive(Debug, Clone)]
pub(crate) struct Bridge {
    pub name: String,
    pub gateway: Ipv4Addr,
    pub prefix: u8,
}

/// Prefix of the egress ACLs sandboxd attaches to bridges.
pub const ACL_PREFIX: &str = "sandboxd-egress-";

/// The start of the description of each of a sandbox's rules, by which
/// sandboxd finds them again.
fn rule_tag(sandbox: &str) -> String {
    format!("sandboxd {sandbox}: ")
}

/// Name of a bridge's egress ACL: `sandboxd-egress-BRIDGE` (bridge names
/// have at most 15 characters).
pub fn acl_name(bridge: &str) -> String {
    format!("{ACL_PREFIX}{bridge}")
}

/// The `eth0` device an instance gets: the profile's (its network and
/// name) with the fixed address and the filters.
pub(crate) fn nic_device(
    base: &BTreeMap<String, String>,
    bridge: &Bridge,
    ip: Ipv4Addr,
) -> BTreeMap<String, String> {
    let mut dev = BTreeMap::new();
    dev.insert("type".to_string(), "nic".to_string());
    dev.insert("network".to_string(), bridge.name.clone());
    dev.insert(
        "name".to_string(),
        base.get("name").cloned().unwrap_or_else(|| NIC.to_string()),
    );
    for key in [
        "hwaddr",
        "mtu",
        "limits.ingress",
        "limits.egress",
        "limits.max",
    ] {
        if let Some(v) = base.get(key) {
            dev.insert(key.to_string(), v.clone());
        }
    }
    dev.insert("ipv4.address".to_string(), ip.to_string());
    dev.insert("security.port_isolation".to_string(), "true".to_string());
    dev.insert("security.mac_filtering".to_string(), "true".to_string());
    dev.insert("security.ipv4_filtering".to_string(), "true".to_string());
    // No IPv6 of its own unless the bridge hands out fixed ones (stateful
    // DHCPv6): without this, IPv6 from the container would be neither
    // source-checked nor under the egress rules (which match the IPv4
    // source). On a bridge without IPv6 it changes nothing.
    dev.insert("security.ipv6_filtering".to_string(), "true".to_string());
    dev
}

/// Whether an instance's own `eth0` carries the isolation for `ip`.
pub(crate) fn nic_isolated(instance: &incusctl::Instance, ip: &str) -> bool {
    instance.devices.get(NIC).is_some_and(|d| {
        let on = |k: &str| d.get(k).map(String::as_str) == Some("true");
        d.get("ipv4.address").map(String::as_str) == Some(ip)
            && on("security.port_isolation")
            && on("security.mac_filtering")
            && on("security.ipv4_filtering")
            && on("security.ipv6_filtering")
    })
}

/// The package cache's address and port from `[provision] apt_proxy`
/// (`http://198.18.0.1:3142`), when it names an IPv4 address.
fn cache_of(apt_proxy: Option<&str>) -> Option<(Ipv4Addr, u16)> {
    let url = apt_proxy?;
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split('/').next()?;
    let authority = authority.rsplit('@').next()?;
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (h, p.parse().ok()?),
        None => (authority, if scheme == "https" { 443 } else { 80 }),
    };
    Some((host.parse().ok()?, port))
}

/// Every IPv4 address of the host's interfaces.
fn host_addresses() -> Vec<Ipv4Addr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return vec![];
    };
    let mut out: Vec<Ipv4Addr> = addrs
        .filter_map(|a| a.address)
        .filter_map(|s| s.as_sockaddr_in().map(|sin| sin.ip()))
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

impl Lifecycle {
    /// The managed bridge of `eth0`: the instance's (profiles applied), or
    /// the default profile's for an instance still to be made.
    pub(crate) async fn bridge_of(
        &self,
        instance: Option<&incusctl::Instance>,
    ) -> Result<(Bridge, BTreeMap<String, String>)> {
        let base = match instance {
            Some(i) => i.expanded_devices.get(NIC).cloned(),
            None => self
                .incus
                .profile("default")
                .await?
                .and_then(|p| p.devices.get(NIC).cloned()),
        }
        .unwrap_or_default();
        let Some(network) = base.get("network").cloned() else {
            return Err(LifecycleError::Invalid(format!(
                "sandboxd needs {NIC} on a managed Incus bridge (a `network` key in the \
                 default profile's {NIC}; `sandboxd setup` makes one)"
            )));
        };
        let net = self.incus.network(&network).await?.ok_or_else(|| {
            LifecycleError::Invalid(format!("network {network} of {NIC} does not exist"))
        })?;
        if net.kind != "bridge" {
            return Err(LifecycleError::Invalid(format!(
                "network {network} is a {}; sandboxd isolates sandboxes on a bridge",
                net.kind
            )));
        }
        let cidr = net.config.get("ipv4.address").cloned().unwrap_or_default();
        let parsed = cidr
            .split_once('/')
            .and_then(|(ip, p)| Some((ip.parse::<Ipv4Addr>().ok()?, p.parse::<u8>().ok()?)));
        let Some((gateway, prefix)) = parsed.filter(|(_, p)| (8..=30).contains(p)) else {
            return Err(LifecycleError::Invalid(format!(
                "network {network} has no IPv4 subnet sandboxd can assign from ({cidr:?})"
            )));
        };
        Ok((
            Bridge {
                name: network,
                gateway,
                prefix,
            },
            base,
        ))
    }

    /// Gives sandbox `name` its fixed address on `bridge` (keeping the one
    /// it has; else `preferred` when free; never an address leased to
    /// another instance).
    pub(crate) async fn assign_address(
        &self,
        name: &str,
        instance: &str,
        bridge: &Bridge,
        preferred: Option<Ipv4Addr>,
        also_exclude: &HashSet<Ipv4Addr>,
    ) -> Result<Ipv4Addr> {
        let (first, last) = netpolicy::subnet(bridge.gateway, bridge.prefix);
        let mut exclude: HashSet<Ipv4Addr> = also_exclude.clone();
        exclude.insert(bridge.gateway);
        // Addresses with rules of another sandbox (of another daemon
        // sharing the bridge, or left by one that died): those rules would
        // apply to whoever got the address.
        let tag = rule_tag(name);
        if let Some(acl) = self.incus.network_acl(&acl_name(&bridge.name)).await? {
            for r in acl
                .egress
                .iter()
                .filter(|r| !r.description.starts_with(&tag))
            {
                exclude.extend(
                    r.source
                        .split(',')
                        .filter_map(|s| s.trim().parse::<Ipv4Addr>().ok()),
                );
            }
        }
        for lease in self.incus.network_leases(&bridge.name).await? {
            if lease.hostname == instance {
                continue;
            }
            if let Ok(ip) = lease.address.parse::<Ipv4Addr>() {
                exclude.insert(ip);
            }
        }
        let pool = AddressPool {
            label: format!(
                "network {} ({}/{})",
                bridge.name,
                Ipv4Addr::from(first),
                bridge.prefix
            ),
            first: Ipv4Addr::from(first + 1),
            last: Ipv4Addr::from(last - 1),
            preferred,
            exclude,
            start_offset: rand::random::<u32>(),
        };
        let n = name.to_string();
        let sb = self.write(move |s| s.assign_ipv4(&n, &pool)).await?;
        sb.assigned_ipv4
            .as_deref()
            .and_then(|ip| ip.parse().ok())
            .ok_or_else(|| LifecycleError::Internal("no address after assignment".into()))
    }

    /// Writes the sandbox's rules into its bridge's egress ACL (replacing
    /// its earlier ones, found by their description's tag) and makes sure
    /// the ACL is
    /// attached to the bridge (with the bridge's default actions `allow`
    /// when unset, since Incus otherwise rejects all traffic no rule
    /// allows once an ACL is attached).
    pub(crate) async fn apply_egress(&self, sb: &Sandbox, bridge: &Bridge) -> Result<()> {
        let Some(ip) = sb
            .assigned_ipv4
            .as_deref()
            .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
        else {
            return Err(LifecycleError::Internal(format!(
                "sandbox {} has no assigned address",
                sb.name
            )));
        };
        let mut allowed = Vec::new();
        if sb.egress.mode == EgressMode::Allowlist {
            for entry in &sb.egress.allow {
                if let Some(r) = netpolicy::parse_cidr(entry) {
                    allowed.push(r);
                    continue;
                }
                let lookup = tokio::net::lookup_host((entry.as_str(), 0));
                let found = match tokio::time::timeout(RESOLVE_TIMEOUT, lookup).await {
                    Ok(Ok(addrs)) => addrs
                        .filter_map(|a| match a.ip() {
                            std::net::IpAddr::V4(v4) => Some(v4),
                            std::net::IpAddr::V6(_) => None,
                        })
                        .collect::<Vec<_>>(),
                    Ok(Err(e)) => {
                        tracing::warn!(sandbox = %sb.name, name = %entry, error = %e, "allowlisted name does not resolve; not allowed");
                        vec![]
                    }
                    Err(_) => {
                        tracing::warn!(sandbox = %sb.name, name = %entry, "allowlisted name did not resolve in time; not allowed");
                        vec![]
                    }
                };
                allowed.extend(found.into_iter().map(|a| (u32::from(a), u32::from(a))));
            }
        }
        let facts = NetFacts {
            gateway: bridge.gateway,
            prefix: bridge.prefix,
            host_addrs: host_addresses(),
            cache: cache_of(self.provision.apt_proxy.as_deref()),
        };
        let mut rules = netpolicy::egress_rules(ip, sb.egress.mode, &allowed, &facts);
        let tag = rule_tag(&sb.name);
        for r in &mut rules {
            r.description = format!("{tag}{}", r.description);
        }
        let name = acl_name(&bridge.name);
        let _one_at_a_time = self.acl_edits.lock().await;
        self.incus
            .edit_network_acl(&name, |acl| {
                // Idempotent, and blind to other sandboxes' rules around ours.
                let ours: Vec<&incusctl::AclRule> = acl
                    .egress
                    .iter()
                    .filter(|r| r.description.starts_with(&tag))
                    .collect();
                let current =
                    ours.len() == rules.len() && ours.iter().zip(&rules).all(|(a, b)| *a == b);
                if current && !acl.description.is_empty() {
                    return false;
                }
                acl.egress.retain(|r| !r.description.starts_with(&tag));
                acl.egress.extend(rules.iter().cloned());
                if acl.description.is_empty() {
                    acl.description =
                        "sandboxd: egress of the sandboxes (rules by source address)".into();
                }
                true
            })
            .await?;
        self.attach_acl(bridge).await?;
        lock(&self.applied).insert(sb.name.clone(), sb.egress.clone());
        Ok(())
    }

    /// Attaches the bridge's egress ACL once (`sandboxd setup` and the test
    /// host's setup do it beforehand; changing a network makes Incus
    /// restart its DHCP and DNS server).
    async fn attach_acl(&self, bridge: &Bridge) -> Result<()> {
        let name = acl_name(&bridge.name);
        let changed = self
            .incus
            .edit_network_config(&bridge.name, |cfg| {
                let mut changed = false;
                let mut list: Vec<String> = cfg
                    .get("security.acls")
                    .map(|v| {
                        v.split(',')
                            .map(|s| s.trim().to_string())
                            .filter(|s| !s.is_empty())
                            .collect()
                    })
                    .unwrap_or_default();
                if !list.contains(&name) {
                    list.push(name.clone());
                    cfg.insert("security.acls".into(), list.join(","));
                    changed = true;
                }
                for key in [
                    "security.acls.default.egress.action",
                    "security.acls.default.ingress.action",
                ] {
                    if !cfg.contains_key(key) {
                        cfg.insert(key.into(), "allow".into());
                        changed = true;
                    }
                }
                changed
            })
            .await?;
        if changed {
            tracing::info!(network = %bridge.name, acl = %name, "egress ACL attached to the bridge");
        }
        Ok(())
    }

    /// Removes a sandbox's rules from every sandboxd egress ACL.
    pub(crate) async fn remove_egress(&self, sb: &Sandbox) -> Result<()> {
        lock(&self.applied).remove(&sb.name);
        let tag = rule_tag(&sb.name);
        let _one_at_a_time = self.acl_edits.lock().await;
        for acl in self.incus.list_network_acls().await? {
            let mine = |r: &incusctl::AclRule| r.description.starts_with(&tag);
            if !acl.name.starts_with(ACL_PREFIX) || !acl.egress.iter().any(mine) {
                continue;
            }
            self.incus
                .edit_network_acl(&acl.name, |acl| {
                    let n = acl.egress.len();
                    acl.egress.retain(|r| !mine(r));
                    acl.egress.len() != n
                })
                .await?;
        }
        Ok(())
    }

    /// The whole network setup of an existing instance: address, ACL and
    /// NIC. Returns the assigned address and whether the running instance
    /// must restart to take it (its NIC had another address).
    pub(crate) async fn isolate_instance(
        &self,
        name: &str,
        instance: &str,
    ) -> Result<(Ipv4Addr, bool)> {
        let inst = self.incus.instance(instance).await?;
        let (bridge, base) = self.bridge_of(Some(&inst)).await?;
        let current = if inst.is_running() {
            self.incus.instance_state(instance).await?.ipv4()
        } else {
            None
        };
        let ip = self
            .assign_address(name, instance, &bridge, current, &HashSet::new())
            .await?;
        let sb = self.require(name).await?;
        self.apply_egress(&sb, &bridge).await?;
        let desired = nic_device(&base, &bridge, ip);
        if inst.devices.get(NIC) != Some(&desired) {
            let mut devices = serde_json::Map::new();
            devices.insert(NIC.into(), serde_json::json!(desired));
            self.incus
                .patch_instance(instance, &serde_json::json!({ "devices": devices }))
                .await?;
            tracing::info!(sandbox = %name, %ip, "NIC isolated with its fixed address");
        }
        let restart = inst.is_running() && current != Some(ip);
        Ok((ip, restart))
    }

    /// Whether the reconcile should run [`Lifecycle::isolate_instance`]
    /// for `sb`: not yet done by this daemon, or the NIC changed.
    pub(crate) fn needs_isolation(&self, sb: &Sandbox, instance: &incusctl::Instance) -> bool {
        let Some(ip) = &sb.assigned_ipv4 else {
            return true;
        };
        lock(&self.applied).get(&sb.name) != Some(&sb.egress) || !nic_isolated(instance, ip)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn acl_names_fit_incus() {
        // Bridge names have at most 15 characters; ACL names 63.
        assert_eq!(acl_name("sbx0"), "sandboxd-egress-sbx0");
        assert!(acl_name(&"b".repeat(15)).len() <= 63);
    }

    #[test]
    fn cache_address_from_the_proxy_url() {
        assert_eq!(
            cache_of(Some("http://198.18.0.1:3142")),
            Some(("198.18.0.1".parse().unwrap(), 3142))
        );
        assert_eq!(
            cache_of(Some("http://10.0.0.5/")),
            Some(("10.0.0.5".parse().unwrap(), 80))
        );
        assert_eq!(cache_of(Some("http://cache.lan:3142")), None);
        assert_eq!(cache_of(None), None);
    }

    #[test]
    fn nic_keeps_the_profile_network_and_pins_the_address() {
        let base: BTreeMap<String, String> =
            [("type", "nic"), ("network", "sbx0"), ("name", "eth0")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        let bridge = Bridge {
            name: "sbx0".into(),
            gateway: "198.18.0.1".parse().unwrap(),
            prefix: 24,
        };
        let dev = nic_device(&base, &bridge, "198.18.0.9".parse().unwrap());
        assert_eq!(dev["ipv4.address"], "198.18.0.9");
        assert_eq!(dev["security.ipv4_filtering"], "true");
        assert_eq!(dev["network"], "sbx0");
        let inst = incusctl::Instance {
            devices: [("eth0".to_string(), dev)].into_iter().collect(),
            ..Default::default()
        };
        assert!(nic_isolated(&inst, "198.18.0.9"));
        assert!(!nic_isolated(&inst, "198.18.0.10"));
    }
}
