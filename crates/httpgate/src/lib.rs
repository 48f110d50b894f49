//! httpgate: the HTTPS side of sandboxd.
//!
//! It owns TLS termination (rustls, SNI picks the certificate), certificates
//! (ACME through instant-acme, a local CA made with rcgen, or PEM files), the
//! plain-HTTP listener (ACME HTTP-01 and the redirect to HTTPS) and the reverse
//! proxy (hyper) from a host name to a sandbox's app or agent port.
//!
//! It knows nothing of sled, Incus or configuration files: the daemon hands it
//! a [`RouteSource`] (an immutable routing snapshot, looked up per request) and
//! a [`CertStore`] (where certificates, the ACME account and the internal CA
//! are persisted), and calls [`HttpGateway::routes_changed`] after each swap.

mod access;
mod auth;
mod background;
mod body;
mod cert;
mod config;
mod error;
mod framing;
mod gateway;
mod headers;
mod idle;
mod logbuf;
mod pages;
mod proxy;
mod server;
mod sources;
mod spread;
mod tunnels;
mod upstream;

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use cert::ca::internal_name_allowed;
pub use cert::pem::{check_pem_pair, PemError};
pub use config::{
    ChallengeKind, Hsts, HttpConfig, Limits, LoginLimits, Timeouts, DEFAULT_INTERNAL_SUFFIXES,
};
pub use error::{Error, StoreError};
pub use gateway::{bind_per_thread, HttpGateway, ThreadListeners};
pub use logbuf::LogWriter;

/// Every response the gateway sends (see `body.rs`, which leaves its parts
/// open so that it depends on no other module).
pub(crate) type RespBody = body::RespBody<upstream::UpBody, logbuf::AccessLog, sources::SourceSeat>;
/// Where a [`RespBody`]'s bytes come from.
pub(crate) type RespInner = body::RespInner<upstream::UpBody>;

impl body::CountsBytes for logbuf::AccessLog {
    #[inline]
    fn sent(&mut self, n: u64) {
        self.bytes += n;
    }
}

/// Which port of a sandbox a host name leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RouteKind {
    /// The sandbox's application (`DOMAIN`).
    App,
    /// The coding agent's web UI (`shelley.DOMAIN`): never served without a
    /// login ([`Access::Open`] on an agent route counts as
    /// [`Access::Closed`]), and only same-origin browsers may send it unsafe
    /// methods or upgrades.
    Agent,
}

/// Who may use a route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Access {
    /// Anyone (app hosts). On an agent route this means [`Access::Closed`].
    Open,
    /// Holders of this HTTP basic-auth login.
    Login(BasicAuth),
    /// No one: every request gets a 401 page saying that no login is set,
    /// and no upstream connection is ever opened.
    Closed,
}

/// Credentials for HTTP basic auth on a route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BasicAuth {
    pub user: String,
    /// A PHC string (`$argon2id$...`) or a bcrypt hash (`$2b$...`).
    pub password_hash: String,
}

/// Where a route's requests go right now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Target {
    /// A running sandbox's address and port.
    Addr { host: String, port: u16 },
    /// The sandbox is stopped (requests get a 502 page saying so).
    Stopped,
    /// The sandbox cannot be reached for another reason (shown on the 502 page).
    Unavailable { reason: String },
}

/// How the certificate for a route's host is obtained.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TlsMode {
    /// From the configured ACME directory (HTTP-01 or TLS-ALPN-01).
    Acme,
    /// Issued at once by the gateway's internal CA.
    Internal,
    /// Read from PEM files (certificate chain and private key).
    Manual {
        cert_pem_path: PathBuf,
        key_pem_path: PathBuf,
    },
}

/// Which of the [`TlsMode`]s a certificate is under, without the manual
/// mode's files; serialized as `acme`, `internal` or `manual`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CertMode {
    Acme,
    Internal,
    Manual,
}

impl CertMode {
    /// The lowercase name used on the wire and in `sandboxd certs`.
    pub fn as_str(self) -> &'static str {
        match self {
            CertMode::Acme => "acme",
            CertMode::Internal => "internal",
            CertMode::Manual => "manual",
        }
    }
}

impl std::fmt::Display for CertMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One routed host name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// The sandbox's name, shown on error pages and in logs.
    pub sandbox: String,
    pub kind: RouteKind,
    pub target: Target,
    pub access: Access,
    pub tls: TlsMode,
}

/// The daemon's routing snapshot, as seen by the gateway.
pub trait RouteSource: Send + Sync + 'static {
    /// The route for an exact host name (lowercase, no port, no trailing dot).
    fn lookup(&self, host: &str) -> Option<Arc<Route>>;
    /// Every routed host, so that the certificate manager knows which names need certificates.
    fn hosts(&self) -> Vec<(String, Arc<Route>)>;
}

/// Who issued a stored certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum CertSource {
    /// An ACME directory (its URL).
    Acme { directory: String },
}

/// A certificate persisted by the daemon (key material included: store it 0600).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertRecord {
    /// The primary name (the sandbox's domain); the record's key.
    pub name: String,
    /// Every name in the certificate, primary first.
    pub names: Vec<String>,
    /// The certificate chain, leaf first.
    pub cert_pem: String,
    /// The private key (PKCS#8 PEM). Secret.
    pub key_pem: String,
    pub source: CertSource,
    /// Expiry of the leaf, unix seconds.
    pub not_after: i64,
    /// Start of validity of the leaf, unix seconds.
    pub not_before: i64,
}

/// The internal CA (key material included: store it 0600).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaRecord {
    pub cert_pem: String,
    /// PKCS#8 PEM. Secret.
    pub key_pem: String,
}

/// Persistence the daemon provides (in its store).
pub trait CertStore: Send + Sync + 'static {
    fn load_certs(&self) -> Vec<CertRecord>;
    fn save_cert(&self, rec: &CertRecord) -> Result<(), StoreError>;
    fn delete_cert(&self, name: &str) -> Result<(), StoreError>;
    /// Serialized ACME account credentials for a directory (secret).
    fn load_account(&self, directory_url: &str) -> Option<String>;
    fn save_account(&self, directory_url: &str, creds: &str) -> Result<(), StoreError>;
    fn load_ca(&self) -> Option<CaRecord>;
    fn save_ca(&self, ca: &CaRecord) -> Result<(), StoreError>;
}

/// The state of one domain's certificate, as shown by `sandboxd certs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertStatus {
    /// The primary name.
    pub domain: String,
    /// Every name the certificate covers (or is meant to cover).
    pub names: Vec<String>,
    /// `acme`, `internal` or `manual` on the wire.
    pub mode: CertMode,
    /// The issuer's distinguished name, if a certificate is held.
    pub issuer: Option<String>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub not_after: Option<time::OffsetDateTime>,
    /// When the next issuance or renewal attempt is due.
    #[serde(with = "time::serde::rfc3339::option")]
    pub next_renewal: Option<time::OffsetDateTime>,
    /// The last failure, cleared by a success.
    pub last_error: Option<String>,
}

/// Install rustls' ring crypto provider as the process default. Idempotent.
pub fn install_crypto_provider() {
    // An error only means a provider is already installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
