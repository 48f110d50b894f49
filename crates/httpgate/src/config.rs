//! Gateway configuration: timeouts, limits, ACME settings. Plain data with
//! defaults; the daemon fills it from its own configuration.

use std::net::IpAddr;
use std::time::Duration;

/// An ACME challenge type the gateway can answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChallengeKind {
    /// Answered on the HTTP listener (`/.well-known/acme-challenge/TOKEN`).
    Http01,
    /// Answered on the HTTPS listener (ALPN `acme-tls/1`).
    TlsAlpn01,
}

/// Timeouts applied to clients and upstreams.
#[derive(Debug, Clone)]
pub struct Timeouts {
    /// TLS handshake of a client.
    pub handshake: Duration,
    /// Time for a client to send a complete request head (HTTP/1), counted
    /// from the connection's start or the end of its previous exchange, so
    /// HTTP/1 keep-alive connections without a request close after
    /// `min(idle, header_read)`. HTTP/2 connections get the same time for
    /// their first stream: one that sent no preface, or no request, within
    /// `min(idle, header_read)` of the handshake is closed.
    pub header_read: Duration,
    /// A client connection (HTTP/1 or HTTP/2) with no request open for this
    /// long is closed: HTTP/2 gets a GOAWAY first. An open request (a slow
    /// upstream, a long streamed response) keeps it.
    pub idle: Duration,
    /// HTTP/2 keep-alive: a PING is sent when nothing was received from the
    /// client for this long, open streams or not.
    pub h2_ping_interval: Duration,
    /// HTTP/2 keep-alive: a connection whose PING is not acknowledged within
    /// this time is closed (a dead peer), even with streams open.
    pub h2_ping_timeout: Duration,
    /// TCP connect to an upstream.
    pub upstream_connect: Duration,
    /// From request sent to response head received from an upstream.
    pub upstream_response: Duration,
    /// Idle pooled upstream connections are closed after this.
    pub upstream_pool_idle: Duration,
    /// Grace period for open connections at shutdown.
    pub shutdown_grace: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            handshake: Duration::from_secs(10),
            header_read: Duration::from_secs(15),
            idle: Duration::from_secs(120),
            h2_ping_interval: Duration::from_secs(30),
            h2_ping_timeout: Duration::from_secs(20),
            upstream_connect: Duration::from_secs(5),
            upstream_response: Duration::from_secs(120),
            upstream_pool_idle: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// Size and count limits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Maximum size of a request head (request line and headers), bytes.
    pub max_header_bytes: usize,
    /// Maximum number of open client connections per listener; more are closed at once.
    pub max_connections: usize,
    /// Maximum number of open client connections per listener from one
    /// source (an IPv4 address, or an IPv6 /64); more from that source are
    /// closed at accept, before the TLS handshake. Never more than half of
    /// `max_connections`, so that one source cannot fill that limit. Its
    /// open HTTP/2 requests are capped at four per connection of this cap
    /// (each stream may hold an upstream connection); more get 429. Peers
    /// listed in `trusted_proxies` are exempt. 0: no per-source cap.
    pub max_connections_per_source: usize,
    /// Idle upstream connections kept per upstream address.
    pub upstream_pool_max_idle: usize,
    /// Maximum concurrent HTTP/2 streams per client connection.
    pub max_h2_streams: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header_bytes: 32 * 1024,
            max_connections: 10_000,
            // Enough for a few dozen browsers behind one NAT (6 HTTP/1
            // connections per host each, one per host over HTTP/2), while
            // one address can hold at most 1/40 of `max_connections`.
            max_connections_per_source: 256,
            upstream_pool_max_idle: 64,
            max_h2_streams: 256,
        }
    }
}

/// `Strict-Transport-Security` on responses to HTTPS requests for routed
/// hosts (unless the upstream's response has its own).
#[derive(Debug, Clone)]
pub struct Hsts {
    /// `max-age` in seconds; 0: never sent.
    pub max_age_secs: u64,
    /// Sent for hosts in `acme` mode (certificates browsers trust anywhere).
    pub acme: bool,
    /// Sent for hosts in `manual` mode.
    pub manual: bool,
    /// Sent for hosts in `internal` mode (only browsers that trust the
    /// internal CA can reach them, so pinning HTTPS gains little there).
    pub internal: bool,
}

impl Default for Hsts {
    fn default() -> Self {
        Self {
            max_age_secs: 365 * 24 * 3600,
            acme: true,
            manual: false,
            internal: false,
        }
    }
}

/// Limits on online guessing of agent-host logins (see `auth.rs`).
#[derive(Debug, Clone)]
pub struct LoginLimits {
    /// Distinct wrong logins a source address (IPv6: its /64) may make;
    /// then it must wait.
    pub source_free_failures: u32,
    /// Distinct wrong logins over all sources a sandbox takes; then every
    /// source without a good login cached must wait.
    pub sandbox_free_failures: u32,
    /// The first wait; each further failure doubles it.
    pub first_backoff: Duration,
    /// The longest wait.
    pub max_backoff: Duration,
    /// Failures are forgotten after this long without a new one.
    pub failure_memory: Duration,
    /// Logins waiting for a hash verification per sandbox (one runs at a
    /// time per sandbox); more get 429.
    pub max_queued_verifications: usize,
    /// Longest time a refused attempt (429) is held before the answer, so
    /// that a client ignoring `Retry-After` cannot make the gateway spin.
    pub refusal_delay: Duration,
}

impl Default for LoginLimits {
    fn default() -> Self {
        Self {
            source_free_failures: 10,
            sandbox_free_failures: 50,
            first_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(300),
            failure_memory: Duration::from_secs(900),
            max_queued_verifications: 16,
            refusal_delay: Duration::from_secs(1),
        }
    }
}

/// The DNS suffixes the internal CA's root may vouch for: its name
/// constraints' permitted subtrees (no leading dot: `test` covers `test`
/// and every name under it).
pub const DEFAULT_INTERNAL_SUFFIXES: [&str; 6] = [
    "localhost",
    "test",
    "internal",
    "lan",
    "home.arpa",
    "example",
];

/// Everything the gateway needs besides routes and persistence.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// ACME directory URL; `None` disables ACME (routes in `acme` mode get no certificate).
    pub acme_directory: Option<String>,
    /// Extra trust root (PEM) for the ACME server's own TLS (e.g. Pebble). When set,
    /// only this root is trusted for the ACME connection.
    pub acme_ca_root_pem: Option<Vec<u8>>,
    /// Contact e-mail for the ACME account.
    pub acme_email: Option<String>,
    /// Challenge types in order of preference; a failed attempt moves to the next one.
    pub acme_challenges: Vec<ChallengeKind>,
    /// First retry delay after a failed issuance; doubles on each failure.
    pub acme_backoff_base: Duration,
    /// Cap of the retry delay.
    pub acme_backoff_cap: Duration,
    /// Overall time limit of one issuance attempt.
    pub acme_order_timeout: Duration,
    /// Validity of leaf certificates from the internal CA.
    pub internal_leaf_validity: Duration,
    /// DNS suffixes the internal CA's root is constrained to (lowercase,
    /// without leading dot). A stored root with other constraints, or none,
    /// is replaced by a new one at start (see [`crate::HttpGateway::ca_replaced`]).
    pub internal_suffixes: Vec<String>,
    /// `Strict-Transport-Security` by certificate mode.
    pub hsts: Hsts,
    /// Peers whose X-Forwarded-* headers are kept (and appended to).
    pub trusted_proxies: Vec<IpAddr>,
    /// Prefix of the agent host (`shelley` in `shelley.DOMAIN`), for display only.
    pub agent_prefix: String,
    /// Realm sent with `WWW-Authenticate`.
    pub auth_realm: String,
    pub timeouts: Timeouts,
    pub limits: Limits,
    pub login: LoginLimits,
    /// The public HTTPS port: the HTTP listener redirects to it (443 omits
    /// it from the URL), upstreams get it in `X-Forwarded-Port` and, when it
    /// is not 443, in `Host` and `X-Forwarded-Host`.
    pub https_port: u16,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            acme_directory: None,
            acme_ca_root_pem: None,
            acme_email: None,
            acme_challenges: vec![ChallengeKind::TlsAlpn01, ChallengeKind::Http01],
            acme_backoff_base: Duration::from_secs(60),
            acme_backoff_cap: Duration::from_secs(24 * 3600),
            acme_order_timeout: Duration::from_secs(90),
            internal_leaf_validity: Duration::from_secs(90 * 24 * 3600),
            internal_suffixes: DEFAULT_INTERNAL_SUFFIXES
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
            hsts: Hsts::default(),
            trusted_proxies: Vec::new(),
            agent_prefix: "shelley".to_owned(),
            auth_realm: "sandboxd".to_owned(),
            timeouts: Timeouts::default(),
            limits: Limits::default(),
            login: LoginLimits::default(),
            https_port: 443,
        }
    }
}
