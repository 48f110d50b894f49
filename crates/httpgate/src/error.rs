//! Error types of the gateway's public API.

/// Failure of the daemon's certificate store.
#[derive(Debug, thiserror::Error)]
#[error("certificate store: {0}")]
pub struct StoreError(pub String);

/// Errors returned by [`crate::HttpGateway`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no tokio runtime: the gateway must be created inside one")]
    NoRuntime,
    #[error("internal CA: {0}")]
    Ca(String),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("certificate for {domain}: {reason}")]
    Cert { domain: String, reason: String },
    #[error("no routed domain {0}")]
    UnknownDomain(String),
    #[error("the gateway is shut down")]
    Shutdown,
    #[error(transparent)]
    Store(#[from] StoreError),
}
