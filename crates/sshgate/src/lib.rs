//! sshgate: the SSH router of sandboxd.
//!
//! A russh server accepts `ssh NAME@host`, authenticates the client's public
//! key against the route of sandbox `NAME`, logs in to the sandbox's sshd with
//! a key of the gateway's own (russh client), checks the upstream's pinned
//! host key, and relays every channel both ways: sessions (pty, env, shell,
//! exec, subsystems, signals, exit status), `-L`/`-D` (direct-tcpip),
//! direct-streamlocal, `-R` (tcpip-forward and forwarded-tcpip back to the
//! client) and agent forwarding.
//!
//! What this crate owns: the SSH protocol on both legs, the failure ban list,
//! the registry of live sessions. What it does not own: where routes come
//! from (the daemon implements [`RouteSource`] over its routing snapshot),
//! configuration files, flags, sled, Incus.
//!
//! Architecture invariant: a route is looked up once per new connection; an
//! established session keeps the [`Route`] it resolved, so editing a route
//! never touches open sessions, with one exception, revocation: after
//! [`Gateway::routes_changed`], a session whose client key was removed, or
//! whose sandbox was stopped, removed or replaced, is ended (and only those).

mod algorithms;
mod ban;
mod budget;
mod conn;
mod keys;
mod limits;
mod registry;
mod relay;
mod upstream;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use russh::keys::{PrivateKey, PublicKey};
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use crate::ban::BanPolicy;
pub use crate::keys::{describe_host_keys, fingerprint, load_or_generate_host_keys};
pub use crate::limits::Startups;
pub use crate::registry::SessionInfo;

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a key file or directory failed.
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A key file exists but cannot be parsed, or a key cannot be made.
    #[error("{path}: {message}")]
    Key {
        path: std::path::PathBuf,
        message: String,
    },
    /// The configuration names an algorithm the gateway does not allow
    /// (only modern algorithms: see [`GatewayConfig::ciphers`]).
    #[error("ssh {kind} `{name}` is not allowed; allowed: {allowed}")]
    Algorithm {
        kind: &'static str,
        name: String,
        allowed: String,
    },
    /// The configuration leaves no algorithm of a kind.
    #[error("no ssh {kind} configured")]
    NoAlgorithm { kind: &'static str },
}

/// Where a sandbox's sshd is, or why it cannot be reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The sandbox runs; its sshd listens here.
    Addr { host: String, port: u16 },
    /// The sandbox exists but is stopped: the client is told so.
    Stopped,
    /// The sandbox exists but cannot be reached for the given reason.
    Unavailable { reason: String },
}

/// Everything the gateway needs to route one sandbox.
#[derive(Debug, Clone)]
pub struct Route {
    /// Sandbox name; also the SSH user name clients log in with.
    pub sandbox: String,
    /// Where to connect.
    pub target: Target,
    /// The login user inside the sandbox.
    pub user: String,
    /// Client keys allowed in.
    pub authorized_keys: Vec<PublicKey>,
    /// The gateway's key for this sandbox (installed in the sandbox).
    pub upstream_key: Arc<PrivateKey>,
    /// The sandbox sshd's pinned host key. `None`: the gateway refuses to
    /// connect and tells the client why.
    pub upstream_host_key: Option<PublicKey>,
}

/// The routing view the daemon gives the gateway. Looked up once per new
/// connection; implementations read an atomically swapped snapshot.
pub trait RouteSource: Send + Sync + 'static {
    /// The route for SSH user `user`, if any.
    fn lookup(&self, user: &str) -> Option<Arc<Route>>;
}

/// Gateway settings. `Default` gives production values; `host_keys` must be
/// filled (see [`load_or_generate_host_keys`]).
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Host keys presented to clients (ed25519 first, RSA for old clients).
    pub host_keys: Vec<PrivateKey>,
    /// Text shown to clients before authentication (an SSH banner).
    pub banner: Option<String>,
    /// Bound on TCP connect + SSH handshake + login to the upstream.
    pub connect_timeout: Duration,
    /// A client must finish its handshake and authenticate within this
    /// time; one that does not counts as a failed login for the ban.
    pub login_grace: Duration,
    /// Constant delay of an authentication rejection (hides timing).
    pub auth_rejection_time: Duration,
    /// Maximum authentication attempts on one connection.
    pub max_auth_attempts: usize,
    /// Connections in the handshake/login phase, all sources together,
    /// as OpenSSH's `MaxStartups` (`start:rate:full`, random early drop);
    /// a connection not taken is closed at accept, before any byte is
    /// sent. Logged-in sessions do not count.
    pub max_startups: Startups,
    /// The same, per source address (IPv6: per /64).
    pub per_source_max_startups: Startups,
    /// Channels open at once on one client connection (sessions,
    /// forwardings, agent); more are refused with "resource shortage".
    pub max_channels_per_connection: usize,
    /// Logged-in connections at once per sandbox; more are told so and
    /// disconnected ("too many connections").
    pub max_sessions_per_sandbox: usize,
    /// Failed-login ban per source address.
    pub ban: BanPolicy,
    /// Send an SSH keepalive after this much silence (both legs); `None`: off.
    pub keepalive_interval: Option<Duration>,
    /// Close a leg after this many unanswered keepalives.
    pub keepalive_max: usize,
    /// Close a connection after this much inactivity; `None` (default): never.
    pub inactivity_timeout: Option<Duration>,
    /// Largest channel window on both legs, in bytes. A channel opens with
    /// `initial_window` and grows towards this as it carries data, drawing
    /// on the relay budget.
    pub window_size: u32,
    /// Window a channel opens with on both legs, in bytes; always granted.
    pub initial_window: u32,
    /// Daemon-wide bytes of channel window above `initial_window`, all
    /// channels together: with the initial windows, the bound on data the
    /// relay buffers (see `budget.rs` for the arithmetic).
    pub relay_budget: u64,
    /// The part of `relay_budget` one sandbox's connections may hold.
    pub relay_budget_per_sandbox: u64,
    /// Maximum channel packet size advertised on both legs, in bytes.
    pub max_packet_size: u32,
    /// Non-data messages (requests, EOF, close) a channel's queue holds on
    /// top of one window of data (data is bounded by the window itself).
    pub channel_buffer_size: usize,
    /// Disable Nagle's algorithm on both legs.
    pub nodelay: bool,
    /// Cipher preference, most preferred first (names as in OpenSSH), for
    /// both legs. Only modern ciphers may be named: chacha20-poly1305@openssh.com,
    /// aes128-gcm@openssh.com, aes256-gcm@openssh.com, aes128-ctr, aes192-ctr,
    /// aes256-ctr; any other name makes [`Gateway::new`] fail.
    pub ciphers: Vec<String>,
    /// Bytes sent or received on a leg before the gateway re-keys it (at
    /// most 1 GiB, russh's default and ceiling).
    pub rekey_bytes: usize,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            host_keys: Vec::new(),
            banner: None,
            connect_timeout: Duration::from_secs(10),
            login_grace: Duration::from_secs(30),
            auth_rejection_time: Duration::from_millis(200),
            max_auth_attempts: 10,
            max_startups: Startups {
                start: 100,
                rate: 30,
                full: 256,
            },
            per_source_max_startups: Startups {
                start: 10,
                rate: 30,
                full: 20,
            },
            max_channels_per_connection: 64,
            max_sessions_per_sandbox: 32,
            ban: BanPolicy::default(),
            keepalive_interval: Some(Duration::from_secs(30)),
            keepalive_max: 4,
            inactivity_timeout: None,
            window_size: 8 * 1024 * 1024,
            initial_window: 64 * 1024,
            relay_budget: 128 * 1024 * 1024,
            relay_budget_per_sandbox: 48 * 1024 * 1024,
            max_packet_size: 65535,
            channel_buffer_size: 64,
            nodelay: true,
            ciphers: vec![
                "aes128-gcm@openssh.com".into(),
                "aes256-gcm@openssh.com".into(),
                "chacha20-poly1305@openssh.com".into(),
                "aes256-ctr".into(),
                "aes192-ctr".into(),
                "aes128-ctr".into(),
            ],
            rekey_bytes: 1 << 30,
        }
    }
}

/// A reference to a [`Gateway`] that does not keep it alive (for callbacks
/// held by the route source itself).
#[derive(Clone)]
pub struct WeakGateway(std::sync::Weak<Inner>);

impl WeakGateway {
    /// The gateway, if it still exists.
    pub fn upgrade(&self) -> Option<Gateway> {
        self.0.upgrade().map(|inner| Gateway { inner })
    }
}

/// The SSH router. Cheap to clone; all clones drive the same gateway.
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) config: GatewayConfig,
    pub(crate) server_config: Arc<russh::server::Config>,
    pub(crate) client_config: Arc<russh::client::Config>,
    pub(crate) routes: Arc<dyn RouteSource>,
    pub(crate) bans: ban::BanList,
    pub(crate) registry: registry::Registry,
    pub(crate) sessions: Arc<limits::SandboxSessions>,
    pub(crate) budget: Arc<budget::Budget>,
    startups: Arc<limits::StartupLimits>,
    next_id: AtomicU64,
    shutdown: watch::Sender<bool>,
}

impl Gateway {
    /// Build a gateway; nothing listens until [`Gateway::serve`]. Fails
    /// if the configuration names an algorithm that is not allowed.
    pub fn new(config: GatewayConfig, routes: Arc<dyn RouteSource>) -> Result<Self, Error> {
        let server_config = Arc::new(conn::server_config(&config)?);
        let client_config = Arc::new(upstream::client_config(&config)?);
        let (shutdown, _) = watch::channel(false);
        let startups = Arc::new(limits::StartupLimits::new(
            config.max_startups,
            config.per_source_max_startups,
        ));
        let sessions = Arc::new(limits::SandboxSessions::new(
            config.max_sessions_per_sandbox,
        ));
        let budget = Arc::new(budget::Budget::new(
            config.relay_budget,
            config.relay_budget_per_sandbox,
        ));
        Ok(Gateway {
            inner: Arc::new(Inner {
                bans: ban::BanList::new(config.ban.clone()),
                config,
                server_config,
                client_config,
                routes,
                registry: registry::Registry::default(),
                sessions,
                budget,
                startups,
                next_id: AtomicU64::new(1),
                shutdown,
            }),
        })
    }

    /// Accept connections on `listener` until [`Gateway::shutdown`]. Every
    /// connection runs in its own task; established sessions outlive this
    /// call (they drain on their own).
    pub async fn serve(&self, listener: TcpListener) -> std::io::Result<()> {
        let mut stop = self.inner.shutdown.subscribe();
        loop {
            if *stop.borrow() {
                return Ok(());
            }
            tokio::select! {
                changed = stop.changed() => {
                    if changed.is_err() || *stop.borrow() {
                        return Ok(());
                    }
                }
                accepted = listener.accept() => match accepted {
                    Ok((socket, peer)) => {
                        if self.inner.bans.is_banned(peer.ip()) {
                            tracing::debug!(client = %peer, "connection from banned address dropped");
                            continue;
                        }
                        let permit = match self.inner.startups.admit(peer.ip()) {
                            Ok(p) => p,
                            Err(why) => {
                                tracing::debug!(client = %peer, ?why, "too many connections logging in; dropped");
                                continue;
                            }
                        };
                        let inner = self.inner.clone();
                        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
                        tokio::spawn(conn::run_connection(inner, socket, peer, id, permit));
                    }
                    Err(e) if is_transient_accept_error(&e) => {
                        tracing::warn!(error = %e, "ssh accept failed; retrying");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
    }

    /// A reference that does not keep the gateway alive.
    pub fn downgrade(&self) -> WeakGateway {
        WeakGateway(Arc::downgrade(&self.inner))
    }

    /// Stop accepting on every listener; live sessions continue and drain.
    pub fn shutdown(&self) {
        self.inner.shutdown.send_replace(true);
    }

    /// Live authenticated sessions.
    pub fn sessions(&self) -> Vec<SessionInfo> {
        self.inner.registry.list()
    }

    /// Disconnect session `id`; `false` if no such session.
    pub fn kill(&self, id: u64) -> bool {
        self.inner.registry.kill(id)
    }

    /// Check live sessions against the routes again, after the route
    /// source changed: a session whose client key is no longer authorized,
    /// whose sandbox is stopped, removed or replaced (a new gateway key) is
    /// ended; every other session is left alone. Cheap when little changed
    /// (one lookup and a pointer comparison per session). Returns how many
    /// sessions were ended.
    pub fn routes_changed(&self) -> usize {
        self.inner
            .registry
            .revalidate(self.inner.routes.as_ref(), None)
    }

    /// Whether `addr`'s source address is banned right now.
    pub fn is_banned(&self, addr: SocketAddr) -> bool {
        self.inner.bans.is_banned(addr.ip())
    }
}

fn is_transient_accept_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted | WouldBlock
    ) || e.raw_os_error() == Some(24) // EMFILE: back off, do not die
        || e.raw_os_error() == Some(23) // ENFILE
}
