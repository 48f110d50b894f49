//! The `[http]` table: the HTTPS proxy's limits, timeouts and trusted
//! proxies, applied over `httpgate`'s defaults by [`HttpSettings::apply`].

use super::keys::{config_keys, sub_table, Int, List};

config_keys! {
    /// The `[http]` table as read.
    pub(crate) struct RawHttp in "http" {
        /// Peers whose X-Forwarded-* headers are kept and appended to.
        trusted_proxies: List = "[]",
        /// Open client connections per listening address.
        max_connections: Int<1, 1_000_000> = "10000",
        /// Open client connections per listening address from one IPv4 address or IPv6 /64 (0: no cap).
        max_connections_per_source: Int<0, 1_000_000> = "256",
        /// Strict-Transport-Security max-age on responses (0: never).
        hsts_max_age_secs: Int<0, 63_072_000> = "31536000",
        /// Certificate modes whose hosts get HSTS (acme, manual, internal).
        hsts_tls_modes: List = "[\"acme\"]",
        /// Agent host: wrong passwords from one address (IPv6: /64) before it must wait.
        login_failures_per_source: Int<1, 100_000> = "10",
        /// Agent host: wrong passwords from all addresses before those without a good login wait.
        login_failures_per_sandbox: Int<1, 1_000_000> = "50",
        /// Agent host: the longest wait, in seconds (1 s first, doubling).
        login_max_backoff_secs: Int<1, 86_400> = "300",
        /// Largest request head in bytes (larger ones get 431).
        max_header_bytes: Int<1024, 1_048_576> = "32768",
        /// Seconds for a client's TLS handshake.
        handshake_timeout_secs: Int<1, 86_400> = "10",
        /// Seconds for a client to send a complete request head.
        header_timeout_secs: Int<1, 86_400> = "15",
        /// Seconds before an idle client connection is closed.
        idle_timeout_secs: Int<1, 86_400> = "120",
        /// Seconds for the TCP connect to a sandbox (then 502).
        upstream_connect_timeout_secs: Int<1, 86_400> = "5",
        /// Seconds from the request sent to the response head (then 504).
        upstream_response_timeout_secs: Int<1, 86_400> = "120",
        /// Seconds a kept-alive connection to a sandbox may stay unused.
        upstream_idle_timeout_secs: Int<1, 86_400> = "60",
        /// HTTP/2: seconds of client silence before a PING.
        h2_ping_interval_secs: Int<1, 86_400> = "30",
        /// HTTP/2: seconds a PING may go unanswered before the connection closes.
        h2_ping_timeout_secs: Int<1, 86_400> = "20",
    }
}

/// The `[http]` table. `None` keeps the proxy's built-in default (see
/// `httpgate::config`): the defaults suit most hosts, these are for hosts
/// behind a load balancer (`trusted_proxies`) or with unusual clients.
#[derive(Debug, Clone, Default)]
pub struct HttpSettings {
    /// Peers whose X-Forwarded-* headers are kept and appended to; from any
    /// other peer they are replaced.
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// Open client connections per listener; more are closed at once.
    pub max_connections: Option<usize>,
    /// Open client connections per listener from one source address (IPv6:
    /// one /64); more are closed at accept. 0: no cap.
    pub max_connections_per_source: Option<usize>,
    /// `Strict-Transport-Security: max-age=N` on responses; 0: never.
    pub hsts_max_age: Option<u64>,
    /// The certificate modes whose hosts get HSTS (default: acme only).
    pub hsts_tls_modes: Option<Vec<store::TlsMode>>,
    /// Agent logins: distinct wrong passwords a source address (IPv6: its
    /// /64) may send before it must wait.
    pub login_failures_per_source: Option<u32>,
    /// Agent logins: distinct wrong passwords a sandbox takes from all
    /// sources before every source without a good login must wait.
    pub login_failures_per_sandbox: Option<u32>,
    /// Agent logins: the longest wait (the first is 1 s, then it doubles).
    pub login_max_backoff: Option<std::time::Duration>,
    /// Largest request head (request line and headers), in bytes.
    pub max_header_bytes: Option<usize>,
    /// TLS handshake of a client.
    pub handshake_timeout: Option<std::time::Duration>,
    /// Time a client has to send a complete request head.
    pub header_timeout: Option<std::time::Duration>,
    /// Idle client connections (HTTP/1 keep-alive, HTTP/2 with no stream) are closed after this.
    pub idle_timeout: Option<std::time::Duration>,
    /// TCP connect to a sandbox.
    pub upstream_connect_timeout: Option<std::time::Duration>,
    /// From the request sent to the response head received (then 504).
    pub upstream_response_timeout: Option<std::time::Duration>,
    /// Kept-alive connections to a sandbox unused for this long are closed.
    pub upstream_idle_timeout: Option<std::time::Duration>,
    /// HTTP/2: a PING when nothing came from the client for this long.
    pub h2_ping_interval: Option<std::time::Duration>,
    /// HTTP/2: a connection whose PING is not answered in this time is closed.
    pub h2_ping_timeout: Option<std::time::Duration>,
}

impl HttpSettings {
    /// Applies the configured values over the proxy's defaults.
    pub fn apply(&self, cfg: &mut httpgate::HttpConfig) {
        cfg.trusted_proxies.clone_from(&self.trusted_proxies);
        let set = |slot: &mut std::time::Duration, v: Option<std::time::Duration>| {
            if let Some(v) = v {
                *slot = v;
            }
        };
        set(&mut cfg.timeouts.handshake, self.handshake_timeout);
        set(&mut cfg.timeouts.header_read, self.header_timeout);
        set(&mut cfg.timeouts.idle, self.idle_timeout);
        set(
            &mut cfg.timeouts.upstream_connect,
            self.upstream_connect_timeout,
        );
        set(
            &mut cfg.timeouts.upstream_response,
            self.upstream_response_timeout,
        );
        set(
            &mut cfg.timeouts.upstream_pool_idle,
            self.upstream_idle_timeout,
        );
        set(&mut cfg.timeouts.h2_ping_interval, self.h2_ping_interval);
        set(&mut cfg.timeouts.h2_ping_timeout, self.h2_ping_timeout);
        if let Some(n) = self.max_connections {
            cfg.limits.max_connections = n;
        }
        if let Some(n) = self.max_connections_per_source {
            cfg.limits.max_connections_per_source = n;
        }
        if let Some(n) = self.hsts_max_age {
            cfg.hsts.max_age_secs = n;
        }
        if let Some(modes) = &self.hsts_tls_modes {
            use store::TlsMode;
            cfg.hsts.acme = modes.contains(&TlsMode::Acme);
            cfg.hsts.manual = modes.contains(&TlsMode::Manual);
            cfg.hsts.internal = modes.contains(&TlsMode::Internal);
        }
        if let Some(n) = self.max_header_bytes {
            cfg.limits.max_header_bytes = n;
        }
        if let Some(n) = self.login_failures_per_source {
            cfg.login.source_free_failures = n;
        }
        if let Some(n) = self.login_failures_per_sandbox {
            cfg.login.sandbox_free_failures = n;
        }
        if let Some(d) = self.login_max_backoff {
            cfg.login.max_backoff = d;
            cfg.login.first_backoff = cfg.login.first_backoff.min(d);
        }
    }
}

/// Reads the `[http]` table of `table`, if any.
pub(crate) fn read(table: &toml::Table, errs: &mut Vec<String>) -> HttpSettings {
    let Some(t) = sub_table(table, "http", errs) else {
        return HttpSettings::default();
    };
    let raw = RawHttp::read(t, errs);
    let mut h = HttpSettings::default();
    for ip in raw.trusted_proxies.unwrap_or_default() {
        match ip.parse() {
            Ok(a) => h.trusted_proxies.push(a),
            Err(_) => errs.push(format!(
                "`http.trusted_proxies`: {ip:?} is not an IP address"
            )),
        }
    }
    let size = |n: u64| usize::try_from(n).ok();
    let count = |n: u64| u32::try_from(n).ok();
    let secs = std::time::Duration::from_secs;
    h.max_connections = raw.max_connections.and_then(size);
    h.max_connections_per_source = raw.max_connections_per_source.and_then(size);
    h.hsts_max_age = raw.hsts_max_age_secs;
    h.login_failures_per_source = raw.login_failures_per_source.and_then(count);
    h.login_failures_per_sandbox = raw.login_failures_per_sandbox.and_then(count);
    h.login_max_backoff = raw.login_max_backoff_secs.map(secs);
    if let Some(names) = raw.hsts_tls_modes {
        let mut modes = Vec::new();
        for m in &names {
            match m.parse() {
                Ok(mode) => modes.push(mode),
                Err(_) => errs.push(format!(
                    "`http.hsts_tls_modes`: {m:?} is not acme, manual or internal"
                )),
            }
        }
        h.hsts_tls_modes = Some(modes);
    }
    h.max_header_bytes = raw.max_header_bytes.and_then(size);
    h.handshake_timeout = raw.handshake_timeout_secs.map(secs);
    h.header_timeout = raw.header_timeout_secs.map(secs);
    h.idle_timeout = raw.idle_timeout_secs.map(secs);
    h.upstream_connect_timeout = raw.upstream_connect_timeout_secs.map(secs);
    h.upstream_response_timeout = raw.upstream_response_timeout_secs.map(secs);
    h.upstream_idle_timeout = raw.upstream_idle_timeout_secs.map(secs);
    h.h2_ping_interval = raw.h2_ping_interval_secs.map(secs);
    h.h2_ping_timeout = raw.h2_ping_timeout_secs.map(secs);
    h
}
