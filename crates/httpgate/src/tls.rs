//! TLS termination: the rustls server configuration and the certificate
//! resolver (SNI picks the certificate; ALPN `acme-tls/1` gets the TLS-ALPN-01
//! challenge certificate; an unknown SNI gets no certificate, so the handshake
//! is refused).

use std::fmt;
use std::sync::Arc;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::gateway::Shared;

pub(crate) const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

struct Resolver {
    shared: Arc<Shared>,
}

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Resolver")
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let sni = hello
            .server_name()?
            .trim_end_matches('.')
            .to_ascii_lowercase();
        let acme = hello
            .alpn()
            .map(|mut a| a.any(|p| p == ACME_TLS_ALPN))
            .unwrap_or(false);
        if acme {
            return self.shared.alpn01.read().ok()?.get(&sni).cloned();
        }
        self.shared.serving.load().get(&sni).cloned()
    }
}

/// The server configuration of the HTTPS listeners.
pub(crate) fn server_config(shared: Arc<Shared>) -> Arc<rustls::ServerConfig> {
    let mut cfg = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Resolver { shared }));
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec(), ACME_TLS_ALPN.to_vec()];
    cfg.session_storage = rustls::server::ServerSessionMemoryCache::new(4096);
    Arc::new(cfg)
}
