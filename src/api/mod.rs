//! The admin API's wire types, shared by the daemon (server) and the CLI
//! (client). Paths are versioned under `/v1/`; errors are
//! `{"error": {"code", "message"}}`; long operations answer with
//! newline-delimited JSON [`Event`]s. The calls of the Incus lifecycle
//! (`/v1/incus/`) have their types in [`incus`]. Domain values travel as
//! their own types, each serialized as its lowercase name: a sandbox's
//! [`TlsMode`] and [`EgressMode`] are the store's, its backend and status
//! are [`BackendKind`] and [`StatusKind`] (the status's step or failure
//! reason travels apart, in `status_reason`).

use serde::{Deserialize, Serialize};
pub use store::{EgressMode, TlsMode};

pub mod incus;

/// Media type of streamed responses.
pub const NDJSON: &str = "application/x-ndjson";

/// `POST /v1/sandboxes`: a sandbox whose backend is an existing machine.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddSandbox {
    pub name: String,
    pub domain: String,
    pub upstream: String,
    #[serde(default)]
    pub ssh_port: Option<u16>,
    #[serde(default)]
    pub app_port: Option<u16>,
    #[serde(default)]
    pub agent_port: Option<u16>,
    #[serde(default)]
    pub agent_prefix: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    pub ssh_keys: Vec<String>,
    #[serde(default)]
    pub upstream_host_key: Option<String>,
    #[serde(default)]
    pub auth: Option<SetAuth>,
    #[serde(default)]
    pub tls_mode: Option<TlsMode>,
    /// `manual` TLS mode: certificate chain and key PEM files (absolute paths).
    #[serde(default)]
    pub tls_cert_file: Option<String>,
    #[serde(default)]
    pub tls_key_file: Option<String>,
}

/// `PUT /v1/sandboxes/{name}/auth`: the password travels only in this body.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetAuth {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for SetAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SetAuth")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// `POST /v1/sandboxes/{name}/keys` and `DELETE` of the same path.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRequest {
    /// For add: OpenSSH public-key lines. For remove: key lines or
    /// `SHA256:` fingerprints.
    pub keys: Vec<String>,
}

/// `PUT /v1/sandboxes/{name}/app-port`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetPort {
    pub port: u16,
}

/// A client key as shown to people.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyView {
    pub algorithm: String,
    pub fingerprint: String,
    pub comment: String,
    pub key: String,
}

/// A sandbox as shown by `list` and `show`; never holds a secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SandboxView {
    pub name: String,
    pub domain: String,
    pub agent_host: String,
    pub backend: BackendKind,
    /// Upstream host (static backends) or Incus instance name.
    pub upstream: String,
    pub ssh_port: u16,
    pub app_port: u16,
    pub agent_port: u16,
    pub user: String,
    pub status: StatusKind,
    /// `creating`: the step under way; `failed`: why.
    pub status_reason: Option<String>,
    /// What the container reports (shown, never routed to).
    pub addresses: Vec<String>,
    /// Incus sandboxes: the fixed address the gates connect to.
    #[serde(default)]
    pub assigned_ipv4: Option<String>,
    /// Incus sandboxes: `open`, `restricted` or `allowlist`.
    #[serde(default)]
    pub egress: Option<EgressMode>,
    /// `allowlist`: the allowed destinations.
    #[serde(default)]
    pub egress_allow: Vec<String>,
    pub client_keys: Vec<KeyView>,
    pub upstream_public_key: String,
    pub upstream_host_key: Option<String>,
    pub auth_user: Option<String>,
    pub tls_mode: Option<TlsMode>,
    /// `manual` TLS mode: the certificate and key files the daemon reads.
    #[serde(default)]
    pub tls_cert_file: Option<String>,
    #[serde(default)]
    pub tls_key_file: Option<String>,
    pub created_at: u64,
    pub updated_at: u64,
}

/// `GET /v1/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub pid: u32,
    pub uptime_secs: u64,
    pub state_dir: String,
    pub admin_socket: String,
    pub ssh_listen: Vec<String>,
    pub https_listen: Vec<String>,
    pub http_listen: Vec<String>,
    pub sandboxes: usize,
    pub routes: usize,
    pub route_generation: u64,
    /// Open HTTPS client connections on each web serving thread.
    #[serde(default)]
    pub https_connections: Vec<usize>,
    /// Set when this start replaced the internal CA's root: clients must
    /// trust the new one (`sandboxd ca-cert`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_notice: Option<String>,
}

/// One entry of the live routing snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouteView {
    /// `ssh` (keyed by user name) or `https` (keyed by host).
    pub protocol: String,
    pub key: String,
    pub sandbox: String,
    /// `app`, `agent` or `ssh`.
    pub service: String,
    /// `HOST:PORT`, or `stopped` / `unavailable: REASON`.
    pub target: String,
}

/// `GET /v1/routes`: what the gates see right now.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RouteDump {
    /// Store sequence number the snapshot reflects.
    pub generation: u64,
    pub routes: Vec<RouteView>,
}

/// The error body of every failed call.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: String,
    pub message: String,
}

/// Wrapper: `{"error": {...}}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorEnvelope {
    pub error: ErrorBody,
}

/// One line of a streamed (NDJSON) response.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A step started or advanced; `total` is 0 when unknown.
    Progress { step: String, done: u64, total: u64 },
    /// A line of information for the operator.
    Message { text: String },
    /// The agent-host login `create`/`import` made because none was given:
    /// the only time its password leaves the daemon (never logged).
    Login { user: String, password: Secret },
    /// The operation succeeded; the last line.
    Done { result: serde_json::Value },
    /// The operation failed; the last line.
    Error { error: ErrorBody },
}

/// A secret on the wire: serialized as a plain string, hidden by `Debug`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<hidden>")
    }
}

/// `POST /v1/restore` answer inside [`Event::Done`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RestoreResult {
    pub sandboxes: usize,
    pub records: usize,
}

/// A live SSH session (`GET /v1/sessions`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionView {
    pub id: u64,
    pub sandbox: String,
    pub client_addr: String,
    pub key_fingerprint: String,
    pub started_unix: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
}

/// Where a sandbox runs, as [`SandboxView::backend`] names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// An existing machine (`sandboxd add`).
    Static,
    /// An Incus container (`sandboxd create` or `import`).
    Incus,
}

/// A sandbox's lifecycle state, as [`SandboxView::status`] names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StatusKind {
    Creating,
    Running,
    Stopped,
    Failed,
}

impl BackendKind {
    /// The lowercase name used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Static => "static",
            BackendKind::Incus => "incus",
        }
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl StatusKind {
    /// The lowercase name used on the wire and in `list`'s STATUS column.
    pub fn as_str(self) -> &'static str {
        match self {
            StatusKind::Creating => "creating",
            StatusKind::Running => "running",
            StatusKind::Stopped => "stopped",
            StatusKind::Failed => "failed",
        }
    }
}

impl std::fmt::Display for StatusKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Status {
    /// The port of the SSH router's first listening address, the one to
    /// give `ssh -p`; `None` when the daemon has no SSH listener.
    pub fn ssh_port(&self) -> Option<u16> {
        self.ssh_listen
            .iter()
            .find_map(|a| a.parse::<std::net::SocketAddr>().ok())
            .map(|a| a.port())
    }
}
