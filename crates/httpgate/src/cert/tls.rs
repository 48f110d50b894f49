//! TLS termination: the rustls server configuration and the certificate
//! resolver (SNI picks the certificate; ALPN `acme-tls/1` gets the TLS-ALPN-01
//! challenge certificate; an unknown SNI gets no certificate, so the handshake
//! is refused).

use std::fmt;
use std::sync::{Arc, Weak};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::Certs;

pub(crate) const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// Holds the certificates weakly: they hold the configuration.
struct Resolver {
    certs: Weak<Certs>,
}

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Resolver")
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let certs = self.certs.upgrade()?;
        let sni = hello
            .server_name()?
            .trim_end_matches('.')
            .to_ascii_lowercase();
        let acme = hello
            .alpn()
            .map(|mut a| a.any(|p| p == ACME_TLS_ALPN))
            .unwrap_or(false);
        if acme {
            return certs.alpn_challenge(&sni);
        }
        certs.serving_for(&sni)
    }
}

/// The server configuration of the HTTPS listeners, made on first use and
/// shared by every listener and serving thread: a client resumes its TLS
/// session whichever thread takes its next connection.
pub(crate) fn server_config(
    certs: &Arc<Certs>,
) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    if let Some(c) = certs.tls.get() {
        return Ok(c.clone());
    }
    let made = make_server_config(Arc::downgrade(certs))?;
    Ok(certs.tls.get_or_init(|| made).clone())
}

/// Cipher suites are chosen by the server's order, AES-128-GCM first: as
/// strong for this use and cheaper than AES-256-GCM with its SHA-384
/// transcript hash (measured: a visible share of a handshake's CPU).
///
/// Sessions resume from stateless tickets (one per handshake, keys
/// rotated every 6 hours; a TLS 1.3 resumption still runs an ECDHE
/// exchange, so traffic keys stay forward-secret) or, for TLS 1.2 clients
/// without tickets, from an in-memory session cache. A resumed handshake
/// sends no certificate and makes no signature: it costs the server and
/// the client far less CPU than a full one. No certificate is looked up
/// on resumption either, so a ticket issued for a name that has since lost
/// its route still completes the handshake; its requests then get the
/// unknown host's 404.
fn make_server_config(certs: Weak<Certs>) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    use rustls::crypto::ring::cipher_suite as cs;
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = vec![
        cs::TLS13_AES_128_GCM_SHA256,
        cs::TLS13_CHACHA20_POLY1305_SHA256,
        cs::TLS13_AES_256_GCM_SHA384,
        cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
        cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
    ];
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Resolver { certs }));
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec(), ACME_TLS_ALPN.to_vec()];
    cfg.session_storage = rustls::server::ServerSessionMemoryCache::new(4096);
    cfg.ticketer = rustls::crypto::ring::Ticketer::new()?;
    cfg.ignore_client_order = true;
    cfg.send_tls13_tickets = 1;
    Ok(Arc::new(cfg))
}
