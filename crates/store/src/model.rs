//! Record types and their shape validation. Validation here is about form
//! (a DNS label, a port); meaning (is this key parseable, is that host up)
//! belongs to the callers.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Default port of the upstream sshd.
pub const DEFAULT_SSH_PORT: u16 = 22;
/// Default port of the sandbox's web app.
pub const DEFAULT_APP_PORT: u16 = 8000;
/// Default port of the coding agent's web UI.
pub const DEFAULT_AGENT_PORT: u16 = 9999;
/// Default first label of the agent host (`shelley.DOMAIN`).
pub const DEFAULT_AGENT_PREFIX: &str = "shelley";

/// Where a sandbox runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Backend {
    /// An existing machine reached at `host` (name or IP address).
    Static { host: String },
    /// An Incus instance; its address is learned from Incus.
    Incus { instance: String },
}

/// Lifecycle status as last recorded (Incus sandboxes update it; static
/// sandboxes are always `running`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum SandboxStatus {
    /// Being created; not routed yet.
    Creating { step: String },
    /// Up and routed.
    #[default]
    Running,
    /// Stopped on purpose; routes answer "stopped".
    Stopped,
    /// A lifecycle step failed; routes answer "unavailable" with the reason.
    Failed { reason: String },
}

/// Where a sandbox's certificates come from. Stored, and sent over the
/// admin API, as the lowercase names `acme`, `internal` and `manual`; a
/// record without one uses the daemon's default mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TlsMode {
    /// A public certificate from the ACME directory.
    Acme,
    /// A leaf signed by the daemon's internal CA.
    Internal,
    /// The operator's own PEM files (`tls_cert_file`, `tls_key_file`).
    Manual,
}

impl TlsMode {
    /// Every mode, in the order help texts list them.
    pub const ALL: [TlsMode; 3] = [TlsMode::Acme, TlsMode::Internal, TlsMode::Manual];

    /// The lowercase name used on the command line, on the wire and on disk.
    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::Acme => "acme",
            TlsMode::Internal => "internal",
            TlsMode::Manual => "manual",
        }
    }
}

impl std::fmt::Display for TlsMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for TlsMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        TlsMode::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| format!("tls mode {s:?}: use acme, internal or manual"))
    }
}

impl Serialize for TlsMode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for TlsMode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

/// What an Incus sandbox may reach besides the gateway's own connections
/// to it (applied by the binary as an Incus network ACL).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum EgressMode {
    /// Everything but the other sandboxes on the bridge.
    Open,
    /// The internet; no private, link-local, carrier-grade NAT or loopback
    /// range and none of the host's services except DHCP, DNS and the
    /// package cache.
    #[default]
    Restricted,
    /// Only the listed networks and names (plus DHCP, DNS, package cache).
    Allowlist,
}

impl EgressMode {
    /// The lowercase name used on the command line and in views.
    pub fn as_str(self) -> &'static str {
        match self {
            EgressMode::Open => "open",
            EgressMode::Restricted => "restricted",
            EgressMode::Allowlist => "allowlist",
        }
    }
}

impl std::str::FromStr for EgressMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "open" => Ok(EgressMode::Open),
            "restricted" => Ok(EgressMode::Restricted),
            "allowlist" => Ok(EgressMode::Allowlist),
            other => Err(format!(
                "egress mode {other:?}: use open, restricted or allowlist"
            )),
        }
    }
}

/// A sandbox's egress policy. Records written before it existed read as
/// `restricted`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Egress {
    pub mode: EgressMode,
    /// `allowlist` only: IPv4 addresses, CIDRs or DNS names (resolved each
    /// time the policy is applied).
    #[serde(default)]
    pub allow: Vec<String>,
}

/// An SSH key pair in OpenSSH text formats. `private_openssh` is a secret.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyPair {
    pub private_openssh: String,
    pub public_openssh: String,
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyPair")
            .field("public_openssh", &self.public_openssh)
            .finish_non_exhaustive()
    }
}

/// HTTP basic-auth credentials for the agent host; only a password hash
/// (PHC string) is kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BasicAuth {
    pub user: String,
    pub password_hash: String,
}

/// One sandbox: its identity, where it runs and how it is reached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sandbox {
    /// DNS label; also the SSH user name clients log in with.
    pub name: String,
    /// Public host name of the app.
    pub domain: String,
    pub backend: Backend,
    pub ssh_port: u16,
    pub app_port: u16,
    pub agent_port: u16,
    /// First label of the agent host.
    pub agent_prefix: String,
    /// User the gateway logs in as upstream.
    pub user: String,
    /// OpenSSH public-key lines allowed to log in.
    pub client_keys: Vec<String>,
    /// The gateway's own key for the upstream leg.
    pub upstream_key: KeyPair,
    /// Pinned host key of the upstream sshd (OpenSSH public-key line).
    pub upstream_host_key: Option<String>,
    pub basic_auth: Option<BasicAuth>,
    /// TLS mode override for this sandbox's hosts; the daemon's default
    /// when `None`.
    #[serde(default)]
    pub tls_mode: Option<TlsMode>,
    /// `manual` mode: the PEM certificate chain file (absolute path on the host).
    #[serde(default)]
    pub tls_cert_file: Option<String>,
    /// `manual` mode: the PEM private key file (absolute path on the host).
    #[serde(default)]
    pub tls_key_file: Option<String>,
    #[serde(default)]
    pub status: SandboxStatus,
    /// Addresses an Incus instance last reported (IPv4 first); shown to
    /// people, never routed to.
    #[serde(default)]
    pub addresses: Vec<String>,
    /// The fixed IPv4 address sandboxd gave an Incus sandbox's NIC; unique
    /// across sandboxes (enforced by the store) and the only address the
    /// gates connect to.
    #[serde(default)]
    pub assigned_ipv4: Option<String>,
    /// Egress policy of an Incus sandbox.
    #[serde(default)]
    pub egress: Egress,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    pub updated_at: u64,
}

impl Sandbox {
    /// The agent UI host, `PREFIX.DOMAIN`.
    pub fn agent_host(&self) -> String {
        format!("{}.{}", self.agent_prefix, self.domain)
    }

    /// Every host name this sandbox claims.
    pub fn hosts(&self) -> [String; 2] {
        [self.domain.clone(), self.agent_host()]
    }

    /// Checks the shape of every field; domains must already be lowercase.
    pub fn validate(&self) -> Result<()> {
        validate_name(&self.name)?;
        validate_domain(&self.domain)?;
        validate_label("agent prefix", &self.agent_prefix)?;
        validate_domain(&self.agent_host())?;
        validate_user(&self.user)?;
        for (field, port) in [
            ("ssh port", self.ssh_port),
            ("app port", self.app_port),
            ("agent port", self.agent_port),
        ] {
            if port == 0 {
                return Err(Error::Invalid {
                    field,
                    reason: "must be between 1 and 65535".into(),
                });
            }
        }
        match &self.backend {
            Backend::Static { host } => validate_upstream_host(host)?,
            Backend::Incus { instance } => validate_label("instance", instance)?,
        }
        if let Some(ip) = &self.assigned_ipv4 {
            if ip.parse::<std::net::Ipv4Addr>().is_err() {
                return Err(invalid(
                    "assigned address",
                    format!("{ip:?} is not an IPv4 address"),
                ));
            }
        }
        validate_egress(&self.egress)?;
        if self.client_keys.iter().any(|k| k.contains('\n')) {
            return Err(Error::Invalid {
                field: "ssh key",
                reason: "one key per line".into(),
            });
        }
        Ok(())
    }
}

fn invalid(field: &'static str, reason: impl Into<String>) -> Error {
    Error::Invalid {
        field,
        reason: reason.into(),
    }
}

fn validate_label(field: &'static str, label: &str) -> Result<()> {
    if label.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if label.len() > 63 {
        return Err(invalid(
            field,
            format!("{label:?} is {} characters; at most 63", label.len()),
        ));
    }
    if let Some(c) = label
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        let hint = if c.is_ascii_uppercase() {
            " (use lowercase)"
        } else {
            ""
        };
        return Err(invalid(
            field,
            format!("{label:?} contains {c:?}; only a-z, 0-9 and '-' are allowed{hint}"),
        ));
    }
    if label.starts_with('-') || label.ends_with('-') {
        return Err(invalid(
            field,
            format!("{label:?} must not start or end with '-'"),
        ));
    }
    Ok(())
}

/// A sandbox name: one DNS label (a-z, 0-9, '-', at most 63 characters).
pub fn validate_name(name: &str) -> Result<()> {
    validate_label("name", name)
}

/// A domain: lowercase DNS name of at least two labels, at most 253 characters.
pub fn validate_domain(domain: &str) -> Result<()> {
    if domain.is_empty() {
        return Err(invalid("domain", "must not be empty"));
    }
    if domain.len() > 253 {
        return Err(invalid("domain", "longer than 253 characters"));
    }
    if domain.ends_with('.') {
        return Err(invalid(
            "domain",
            format!("{domain:?} must not end with '.'"),
        ));
    }
    let labels: Vec<&str> = domain.split('.').collect();
    if labels.len() < 2 {
        return Err(invalid(
            "domain",
            format!("{domain:?} needs at least two labels, like app.example.com"),
        ));
    }
    for label in &labels {
        validate_label("domain", label).map_err(|e| match e {
            Error::Invalid { reason, .. } => invalid("domain", format!("{domain:?}: {reason}")),
            other => other,
        })?;
    }
    if labels
        .last()
        .is_some_and(|tld| tld.chars().all(|c| c.is_ascii_digit()))
    {
        return Err(invalid(
            "domain",
            format!("{domain:?} looks like an IP address, not a domain"),
        ));
    }
    Ok(())
}

/// A Unix login name: `[a-z_][a-z0-9_-]*`, at most 32 characters.
pub fn validate_user(user: &str) -> Result<()> {
    let ok_first = user
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    let ok_rest = user
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    if !ok_first || !ok_rest || user.len() > 32 {
        return Err(invalid(
            "user",
            format!("{user:?} is not a valid login name (a-z, 0-9, '_', '-'; at most 32)"),
        ));
    }
    Ok(())
}

/// An egress policy: entries only with `allowlist`, each an IPv4 address,
/// an IPv4 CIDR or a DNS name.
pub fn validate_egress(egress: &Egress) -> Result<()> {
    if egress.mode != EgressMode::Allowlist && !egress.allow.is_empty() {
        return Err(invalid(
            "egress",
            format!(
                "allowed destinations go with the allowlist mode, not {}",
                egress.mode.as_str()
            ),
        ));
    }
    if egress.allow.len() > 64 {
        return Err(invalid("egress", "at most 64 allowed destinations"));
    }
    for entry in &egress.allow {
        let ok = match entry.split_once('/') {
            Some((ip, prefix)) => {
                ip.parse::<std::net::Ipv4Addr>().is_ok()
                    && prefix.parse::<u8>().is_ok_and(|p| p <= 32)
            }
            None => {
                entry.parse::<std::net::Ipv4Addr>().is_ok()
                    || (entry.contains('.')
                        && entry.len() <= 253
                        && validate_domain(&entry.to_ascii_lowercase()).is_ok())
            }
        };
        if !ok {
            return Err(invalid(
                "egress",
                format!("{entry:?} is not an IPv4 address, an IPv4 CIDR or a DNS name"),
            ));
        }
    }
    Ok(())
}

fn validate_upstream_host(host: &str) -> Result<()> {
    if host.is_empty() || host.len() > 253 {
        return Err(invalid("upstream", "must be a host name or an IP address"));
    }
    if host.parse::<std::net::IpAddr>().is_ok() {
        return Ok(());
    }
    let ok = host
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    if !ok || host.starts_with(['-', '.']) {
        return Err(invalid(
            "upstream",
            format!("{host:?} is not a host name or an IP address"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_name("myapp-example-com").is_ok());
        assert!(validate_name("a").is_ok());
        for bad in ["", "-a", "a-", "MyApp", "a_b", "a.b", &"x".repeat(64)] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn domains() {
        for good in ["app.example.com", "demo.localhost", "x-1.co.uk"] {
            assert!(validate_domain(good).is_ok(), "{good:?} rejected");
        }
        for bad in ["", "com", "a..b", "a.b.", "-a.b", "a_b.c", "1.2.3.4", "A.b"] {
            assert!(validate_domain(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn egress_policies() {
        let allow = |mode, allow: &[&str]| Egress {
            mode,
            allow: allow.iter().map(|s| s.to_string()).collect(),
        };
        assert!(validate_egress(&Egress::default()).is_ok());
        assert!(validate_egress(&allow(
            EgressMode::Allowlist,
            &["10.0.0.0/8", "1.2.3.4", "deb.example.org"]
        ))
        .is_ok());
        for bad in [
            "10.0.0.0/33",
            "fe80::1",
            "no_such",
            "1.2.3.4/x",
            "localhost",
        ] {
            assert!(
                validate_egress(&allow(EgressMode::Allowlist, &[bad])).is_err(),
                "{bad:?} accepted"
            );
        }
        assert!(validate_egress(&allow(EgressMode::Open, &["1.2.3.4"])).is_err());
        assert_eq!("allowlist".parse::<EgressMode>(), Ok(EgressMode::Allowlist));
        assert!("closed".parse::<EgressMode>().is_err());
    }

    #[test]
    fn users() {
        assert!(validate_user("debian").is_ok());
        assert!(validate_user("_svc-1").is_ok());
        for bad in ["", "1a", "Root", "a b", &"u".repeat(33)] {
            assert!(validate_user(bad).is_err(), "{bad:?} accepted");
        }
    }
}
