//! The `[http]` table: the HTTPS proxy's limits, timeouts and trusted
//! proxies. Each key is declared once below, with what it sets in
//! `httpgate::HttpConfig`; [`HttpSettings::apply`] sets the keys given over
//! the proxy's defaults (see `httpgate::config`). The defaults suit most
//! hosts; these are for hosts behind a load balancer (`trusted_proxies`)
//! or with unusual clients.

use store::TlsMode;

use super::keys::{config_keys, count, secs, size, Int, Ips, TlsModes};

config_keys! {
    /// The `[http]` table as read: `None` keeps the proxy's default.
    pub struct HttpSettings in "http" for httpgate::HttpConfig {
        /// Peers whose X-Forwarded-* headers are kept and appended to.
        trusted_proxies: Ips = "[]"
            => |c, v| c.trusted_proxies = v,
        /// Open client connections per listening address.
        max_connections: Int<1, 1_000_000> = "10000"
            => |c, v| c.limits.max_connections = size(v),
        /// Open client connections per listening address from one IPv4 address or IPv6 /64 (0: no cap).
        max_connections_per_source: Int<0, 1_000_000> = "256"
            => |c, v| c.limits.max_connections_per_source = size(v),
        /// Strict-Transport-Security max-age on responses (0: never).
        hsts_max_age_secs: Int<0, 63_072_000> = "31536000"
            => |c, v| c.hsts.max_age_secs = v,
        /// Certificate modes whose hosts get HSTS (acme, manual, internal).
        hsts_tls_modes: TlsModes = "[\"acme\"]"
            => |c, v| {
                c.hsts.acme = v.contains(&TlsMode::Acme);
                c.hsts.manual = v.contains(&TlsMode::Manual);
                c.hsts.internal = v.contains(&TlsMode::Internal);
            },
        /// Agent host: wrong passwords from one address (IPv6: /64) before it must wait.
        login_failures_per_source: Int<1, 100_000> = "10"
            => |c, v| c.login.source_free_failures = count(v),
        /// Agent host: wrong passwords from all addresses before those without a good login wait.
        login_failures_per_sandbox: Int<1, 1_000_000> = "50"
            => |c, v| c.login.sandbox_free_failures = count(v),
        /// Agent host: the longest wait, in seconds (1 s first, doubling).
        login_max_backoff_secs: Int<1, 86_400> = "300"
            => |c, v| {
                c.login.max_backoff = secs(v);
                c.login.first_backoff = c.login.first_backoff.min(secs(v));
            },
        /// Largest request head in bytes (larger ones get 431).
        max_header_bytes: Int<1024, 1_048_576> = "32768"
            => |c, v| c.limits.max_header_bytes = size(v),
        /// Seconds for a client's TLS handshake.
        handshake_timeout_secs: Int<1, 86_400> = "10"
            => |c, v| c.timeouts.handshake = secs(v),
        /// Seconds for a client to send a complete request head.
        header_timeout_secs: Int<1, 86_400> = "15"
            => |c, v| c.timeouts.header_read = secs(v),
        /// Seconds before an idle client connection is closed.
        idle_timeout_secs: Int<1, 86_400> = "120"
            => |c, v| c.timeouts.idle = secs(v),
        /// Seconds for the TCP connect to a sandbox (then 502).
        upstream_connect_timeout_secs: Int<1, 86_400> = "5"
            => |c, v| c.timeouts.upstream_connect = secs(v),
        /// Seconds from the request sent to the response head (then 504).
        upstream_response_timeout_secs: Int<1, 86_400> = "120"
            => |c, v| c.timeouts.upstream_response = secs(v),
        /// Seconds a kept-alive connection to a sandbox may stay unused.
        upstream_idle_timeout_secs: Int<1, 86_400> = "60"
            => |c, v| c.timeouts.upstream_pool_idle = secs(v),
        /// HTTP/2: seconds of client silence before a PING.
        h2_ping_interval_secs: Int<1, 86_400> = "30"
            => |c, v| c.timeouts.h2_ping_interval = secs(v),
        /// HTTP/2: seconds a PING may go unanswered before the connection closes.
        h2_ping_timeout_secs: Int<1, 86_400> = "20"
            => |c, v| c.timeouts.h2_ping_timeout = secs(v),
    }
}
