//! Certificates: the manager, the internal CA, PEM loading and TLS termination.

pub(crate) mod ca;
pub(crate) mod manager;
pub(crate) mod pem;
pub(crate) mod tls;
