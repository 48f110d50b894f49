//! Certificate material helpers: PEM parsing into rustls signing keys, and the
//! facts (names, validity, issuer) read back from a leaf certificate.

use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

/// A parsed certificate chain and key, ready to serve, plus facts about its leaf.
#[derive(Debug, Clone)]
pub(crate) struct Loaded {
    pub key: Arc<CertifiedKey>,
    pub names: Vec<String>,
    pub issuer: String,
    pub not_before: i64,
    pub not_after: i64,
}

/// Why a PEM certificate chain and private key cannot serve together.
#[derive(Debug, thiserror::Error)]
pub enum PemError {
    /// The certificate file is not a PEM chain.
    #[error("certificate PEM: {0}")]
    Cert(String),
    /// The key file is not a usable PEM private key.
    #[error("key PEM: {0}")]
    Key(String),
    /// The key is not the leaf certificate's.
    #[error("the private key does not match the certificate")]
    Mismatch,
    /// The pair fails otherwise.
    #[error("certificate and key: {0}")]
    Pair(String),
}

/// Checks that `cert_pem` is a PEM certificate chain (leaf first) and
/// `key_pem` the leaf's private key in a form the proxy can serve, as it
/// does when it loads manual certificate files.
pub fn check_pem_pair(cert_pem: &[u8], key_pem: &[u8]) -> Result<(), PemError> {
    parse_pem(cert_pem, key_pem).and_then(|(chain, key)| certified(chain, &key).map(drop))
}

fn parse_pem(
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), PemError> {
    let chain: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut &cert_pem[..])
        .collect::<Result<_, _>>()
        .map_err(|e| PemError::Cert(e.to_string()))?;
    if chain.is_empty() {
        return Err(PemError::Cert("no certificate in PEM".to_owned()));
    }
    let key = rustls_pemfile::private_key(&mut &key_pem[..])
        .map_err(|e| PemError::Key(e.to_string()))?
        .ok_or_else(|| PemError::Key("no private key in PEM".to_owned()))?;
    Ok((chain, key))
}

/// The chain with a signer made from `key`, which must be the leaf's.
fn certified(
    chain: Vec<CertificateDer<'static>>,
    key: &PrivateKeyDer<'static>,
) -> Result<CertifiedKey, PemError> {
    let signer = rustls::crypto::ring::sign::any_supported_type(key)
        .map_err(|e| PemError::Key(format!("unsupported private key: {e}")))?;
    let ck = CertifiedKey::new(chain, signer);
    ck.keys_match().map_err(|e| match e {
        rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
            PemError::Mismatch
        }
        other => PemError::Pair(other.to_string()),
    })?;
    Ok(ck)
}

/// Parse a PEM chain (leaf first) and a PEM private key; the key must be the
/// certificate's.
pub(crate) fn load_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<Loaded, String> {
    let (chain, key) = parse_pem(cert_pem, key_pem).map_err(|e| e.to_string())?;
    from_der(chain, key)
}

/// Build a serving key from DER parts.
pub(crate) fn from_der(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Loaded, String> {
    let leaf = chain
        .first()
        .ok_or_else(|| "empty certificate chain".to_owned())?;
    let facts = leaf_facts(leaf)?;
    let ck = certified(chain, &key).map_err(|e| e.to_string())?;
    Ok(Loaded {
        key: Arc::new(ck),
        names: facts.names,
        issuer: facts.issuer,
        not_before: facts.not_before,
        not_after: facts.not_after,
    })
}

pub(crate) struct LeafFacts {
    pub names: Vec<String>,
    pub issuer: String,
    pub not_before: i64,
    pub not_after: i64,
}

/// Read the DNS names, issuer and validity of a DER certificate.
pub(crate) fn leaf_facts(der: &[u8]) -> Result<LeafFacts, String> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| format!("certificate: {e}"))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for gn in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(n) = gn {
                names.push(n.to_ascii_lowercase());
            }
        }
    }
    Ok(LeafFacts {
        names,
        issuer: cert.issuer().to_string(),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
    })
}

pub(crate) fn to_datetime(unix: i64) -> Option<time::OffsetDateTime> {
    time::OffsetDateTime::from_unix_timestamp(unix).ok()
}
