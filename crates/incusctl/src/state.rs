//! Runtime state of an instance (`GET /1.0/instances/{name}/state`, or the
//! `state` field of `recursion=2` listings) and helpers to read what sandboxd
//! needs from it: addresses of `eth0`, CPU time, memory and disk usage.
//!
//! CPU % is not computed here: it needs two samples in time, which is the
//! caller's business ([`cpu_percent`] helps with the arithmetic).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

use crate::types::null_as_default;

/// The interface sandboxd reads addresses from.
pub const DEFAULT_NIC: &str = "eth0";

/// Runtime state of an instance.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct InstanceState {
    /// `Running`, `Stopped`, `Frozen`...
    #[serde(deserialize_with = "null_as_default")]
    pub status: String,
    /// Numeric status.
    pub status_code: u16,
    /// Disk usage per disk device (`root`...).
    pub disk: Option<BTreeMap<String, DiskState>>,
    /// Memory usage.
    #[serde(deserialize_with = "null_as_default")]
    pub memory: MemoryState,
    /// Network interfaces inside the instance (absent when stopped).
    pub network: Option<BTreeMap<String, NetworkState>>,
    /// PID of the instance's init on the host (0 when stopped).
    pub pid: i64,
    /// Number of processes (-1 when unknown).
    pub processes: i64,
    /// CPU usage.
    #[serde(deserialize_with = "null_as_default")]
    pub cpu: CpuState,
}

/// Disk usage of one disk device.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct DiskState {
    /// Bytes used.
    pub usage: i64,
    /// Bytes available in total (0 when unknown).
    pub total: i64,
}

/// Memory usage.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct MemoryState {
    /// Bytes in use.
    pub usage: i64,
    /// Peak bytes in use.
    pub usage_peak: i64,
    /// Limit in bytes (0 when unlimited or unknown).
    pub total: i64,
    /// Swap bytes in use.
    pub swap_usage: i64,
}

/// CPU usage.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct CpuState {
    /// CPU time consumed, in nanoseconds.
    pub usage: i64,
}

/// One network interface inside the instance.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct NetworkState {
    /// Addresses on the interface.
    #[serde(deserialize_with = "null_as_default")]
    pub addresses: Vec<NetworkAddress>,
    /// MAC address.
    #[serde(deserialize_with = "null_as_default")]
    pub hwaddr: String,
    /// Host-side interface name.
    #[serde(deserialize_with = "null_as_default")]
    pub host_name: String,
    /// MTU.
    pub mtu: i64,
    /// `up` or `down`.
    #[serde(deserialize_with = "null_as_default")]
    pub state: String,
    /// `broadcast`, `loopback`...
    #[serde(rename = "type")]
    #[serde(deserialize_with = "null_as_default")]
    pub kind: String,
    /// Traffic counters.
    #[serde(deserialize_with = "null_as_default")]
    pub counters: NetworkCounters,
}

/// Traffic counters of an interface.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct NetworkCounters {
    /// Bytes received.
    pub bytes_received: i64,
    /// Bytes sent.
    pub bytes_sent: i64,
}

/// One address of an interface.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct NetworkAddress {
    /// `inet` or `inet6`.
    #[serde(deserialize_with = "null_as_default")]
    pub family: String,
    /// The address.
    #[serde(deserialize_with = "null_as_default")]
    pub address: String,
    /// Prefix length.
    #[serde(deserialize_with = "null_as_default")]
    pub netmask: String,
    /// `global`, `link`, `local`.
    #[serde(deserialize_with = "null_as_default")]
    pub scope: String,
}

impl InstanceState {
    /// True when the instance is running.
    pub fn is_running(&self) -> bool {
        self.status_code == 103 || self.status == "Running"
    }

    fn addresses<'a>(&'a self, nic: &str) -> impl Iterator<Item = &'a NetworkAddress> + 'a {
        self.network
            .as_ref()
            .and_then(|n| n.get(nic))
            .into_iter()
            .flat_map(|n| n.addresses.iter())
            .filter(|a| a.scope == "global")
    }

    /// Global-scope IPv4 addresses of interface `nic`.
    pub fn ipv4_of(&self, nic: &str) -> Vec<Ipv4Addr> {
        self.addresses(nic)
            .filter(|a| a.family == "inet")
            .filter_map(|a| a.address.parse().ok())
            .collect()
    }

    /// Global-scope IPv6 addresses of interface `nic`.
    pub fn ipv6_of(&self, nic: &str) -> Vec<Ipv6Addr> {
        self.addresses(nic)
            .filter(|a| a.family == "inet6")
            .filter_map(|a| a.address.parse().ok())
            .collect()
    }

    /// The first global IPv4 address of `eth0`.
    pub fn ipv4(&self) -> Option<Ipv4Addr> {
        self.ipv4_of(DEFAULT_NIC).into_iter().next()
    }

    /// The first global IPv6 address of `eth0`.
    pub fn ipv6(&self) -> Option<Ipv6Addr> {
        self.ipv6_of(DEFAULT_NIC).into_iter().next()
    }

    /// CPU time consumed so far, in nanoseconds.
    pub fn cpu_usage_ns(&self) -> u64 {
        u64::try_from(self.cpu.usage).unwrap_or(0)
    }

    /// Memory in use, in bytes.
    pub fn memory_usage_bytes(&self) -> u64 {
        u64::try_from(self.memory.usage).unwrap_or(0)
    }

    /// Memory limit in bytes, when one is known.
    pub fn memory_limit_bytes(&self) -> Option<u64> {
        u64::try_from(self.memory.total).ok().filter(|t| *t > 0)
    }

    /// Disk usage of the root disk in bytes, when the storage driver
    /// reports it.
    pub fn disk_usage_bytes(&self) -> Option<u64> {
        self.disk
            .as_ref()
            .and_then(|d| d.get("root"))
            .and_then(|d| u64::try_from(d.usage).ok())
    }
}

/// CPU use in percent of one CPU between two samples of
/// [`InstanceState::cpu_usage_ns`] taken `elapsed` apart (100.0 = one CPU
/// fully busy). Returns 0 when the counter went backwards (a restart).
pub fn cpu_percent(before_ns: u64, after_ns: u64, elapsed: std::time::Duration) -> f64 {
    let wall = elapsed.as_nanos();
    if wall == 0 || after_ns < before_ns {
        return 0.0;
    }
    // Precision loss is irrelevant at display resolution.
    #[allow(clippy::cast_precision_loss)]
    let pct = (after_ns - before_ns) as f64 / wall as f64 * 100.0;
    pct
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    const SAMPLE: &str = r#"{
        "status":"Running","status_code":103,
        "disk":{"root":{"usage":123456,"total":0}},
        "memory":{"usage":4096,"usage_peak":8192,"total":0,"swap_usage":0},
        "network":{
          "eth0":{"addresses":[
              {"family":"inet","address":"198.18.0.7","netmask":"24","scope":"global"},
              {"family":"inet6","address":"fe80::1","netmask":"64","scope":"link"},
              {"family":"inet6","address":"fd42::7","netmask":"64","scope":"global"}],
            "hwaddr":"00:16:3e:00:00:01","host_name":"veth1","mtu":1500,"state":"up","type":"broadcast",
            "counters":{"bytes_received":1,"bytes_sent":2}},
          "lo":{"addresses":[{"family":"inet","address":"127.0.0.1","netmask":"8","scope":"local"}]}},
        "pid":1234,"processes":7,"cpu":{"usage":5000000000}}"#;

    #[test]
    fn reads_addresses_and_usage() {
        let s: InstanceState = serde_json::from_str(SAMPLE).unwrap();
        assert!(s.is_running());
        assert_eq!(s.ipv4(), Some(Ipv4Addr::new(198, 18, 0, 7)));
        assert_eq!(s.ipv6(), Some("fd42::7".parse().unwrap()));
        assert!(s.ipv4_of("lo").is_empty(), "local scope is not global");
        assert_eq!(s.cpu_usage_ns(), 5_000_000_000);
        assert_eq!(s.memory_usage_bytes(), 4096);
        assert_eq!(s.memory_limit_bytes(), None);
        assert_eq!(s.disk_usage_bytes(), Some(123_456));
    }

    #[test]
    fn stopped_state_has_no_address() {
        let s: InstanceState = serde_json::from_str(
            r#"{"status":"Stopped","status_code":102,"network":null,"cpu":{"usage":0}}"#,
        )
        .unwrap();
        assert_eq!(s.ipv4(), None);
        assert_eq!(s.disk_usage_bytes(), None);
    }

    #[test]
    fn cpu_percent_from_deltas() {
        let p = cpu_percent(
            1_000_000_000,
            1_500_000_000,
            std::time::Duration::from_secs(1),
        );
        assert!((p - 50.0).abs() < 1e-9);
        assert!(cpu_percent(10, 5, std::time::Duration::from_secs(1)).abs() < f64::EPSILON);
    }
}
