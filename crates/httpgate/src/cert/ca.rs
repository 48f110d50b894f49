//! The internal certificate authority: created once with rcgen, persisted
//! through the [`crate::CertStore`], and used to issue leaf certificates for
//! routed names in `internal` mode at once.
//!
//! Its root cannot vouch for the world: it carries X.509 name constraints
//! (critical) that permit only the configured DNS suffixes
//! (`HttpConfig::internal_suffixes`) and exclude every IP address, so a
//! client that trusts it (after `sandboxd ca-cert`) rejects a leaf for any
//! other name, even one made with the CA's key. The CA does not issue such
//! leaves either. A stored root whose constraints are not exactly the
//! configured ones (roots made before constraints existed have none) is
//! replaced by a new root at start; leaves are never stored, so every
//! internal-mode host gets a leaf from the new root at once, and the
//! operator is told to re-export the root.

use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CidrSubnet, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, GeneralSubtree, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    NameConstraints, SerialNumber,
};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::cert::pem::{self as certs, Loaded};
use crate::{CaRecord, Error};

pub(crate) struct InternalCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    /// The permitted DNS suffixes (lowercase, no leading dot).
    suffixes: Vec<String>,
}

/// A suffix as written in a name constraint: lowercase, without leading
/// or trailing dot.
pub(crate) fn normalize_suffix(s: &str) -> String {
    s.trim().trim_matches('.').to_ascii_lowercase()
}

/// Whether `name` is one of `suffixes` or a name under one (the rule of
/// RFC 5280 dNSName constraints: labels may be added on the left).
pub fn internal_name_allowed(name: &str, suffixes: &[String]) -> bool {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    suffixes.iter().any(|s| {
        let s = normalize_suffix(s);
        !s.is_empty()
            && (name == s
                || name
                    .strip_suffix(s.as_str())
                    .is_some_and(|head| head.ends_with('.') && head.len() > 1))
    })
}

/// The permitted DNS subtrees of a CA certificate's name constraints
/// (sorted), `None` if it has no name constraints or they are not
/// exactly such subtrees plus the exclusion of every IP address.
fn constraints_of(cert_pem: &str) -> Result<Option<Vec<String>>, Error> {
    use x509_parser::extensions::GeneralName;
    let der = pem_der(cert_pem)?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(&der).map_err(|e| Error::Ca(e.to_string()))?;
    let Ok(Some(nc)) = cert.name_constraints() else {
        return Ok(None);
    };
    let mut dns = Vec::new();
    for sub in nc.value.permitted_subtrees.iter().flatten() {
        match &sub.base {
            GeneralName::DNSName(n) => dns.push(normalize_suffix(n)),
            _ => return Ok(None),
        }
    }
    let excluded: Vec<&[u8]> = nc
        .value
        .excluded_subtrees
        .iter()
        .flatten()
        .filter_map(|s| match &s.base {
            GeneralName::IPAddress(b) => Some(*b),
            _ => None,
        })
        .collect();
    let all_v4 = excluded.iter().any(|b| *b == [0u8; 8]);
    let all_v6 = excluded.iter().any(|b| *b == [0u8; 32]);
    if !(all_v4 && all_v6) {
        return Ok(None);
    }
    dns.sort();
    Ok(Some(dns))
}

fn pem_der(pem: &str) -> Result<Vec<u8>, Error> {
    let mut rd = pem.as_bytes();
    let first = rustls_pemfile::certs(&mut rd).next();
    match first {
        Some(Ok(der)) => Ok(der.to_vec()),
        Some(Err(e)) => Err(Error::Ca(e.to_string())),
        None => Err(Error::Ca("no certificate in the stored CA record".into())),
    }
}

/// The configured suffixes as the root carries them: normalized, sorted,
/// without duplicates or empty ones.
fn normalized(suffixes: &[String]) -> Vec<String> {
    let mut v: Vec<String> = suffixes
        .iter()
        .map(|s| normalize_suffix(s))
        .filter(|s| !s.is_empty())
        .collect();
    v.sort();
    v.dedup();
    v
}

impl InternalCa {
    /// Restore the CA from its record, if its root carries exactly the name
    /// constraints for `suffixes`; `Ok(None)` if it does not (it must then
    /// be replaced).
    pub(crate) fn from_record(rec: &CaRecord, suffixes: &[String]) -> Result<Option<Self>, Error> {
        let want = normalized(suffixes);
        if constraints_of(&rec.cert_pem)?.as_ref() != Some(&want) {
            return Ok(None);
        }
        let key = KeyPair::from_pem(&rec.key_pem).map_err(|e| Error::Ca(e.to_string()))?;
        let issuer =
            Issuer::from_ca_cert_pem(&rec.cert_pem, key).map_err(|e| Error::Ca(e.to_string()))?;
        Ok(Some(Self {
            issuer,
            cert_pem: rec.cert_pem.clone(),
            suffixes: want,
        }))
    }

    /// Make a new CA (ECDSA P-256, ten years) constrained to `suffixes`.
    pub(crate) fn generate(suffixes: &[String]) -> Result<(Self, CaRecord), Error> {
        let suffixes = normalized(suffixes);
        if suffixes.is_empty() {
            return Err(Error::Ca("no DNS suffix for the internal CA".into()));
        }
        let key = KeyPair::generate().map_err(|e| Error::Ca(e.to_string()))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        let tag: u32 = rand::random();
        dn.push(DnType::OrganizationName, "sandboxd");
        dn.push(
            DnType::CommonName,
            format!("sandboxd internal CA {tag:08x}"),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(3650);
        params.serial_number = Some(random_serial());
        params.name_constraints = Some(NameConstraints {
            permitted_subtrees: suffixes
                .iter()
                .map(|s| GeneralSubtree::DnsName(s.clone()))
                .collect(),
            // No IP address in any leaf (an empty permitted IP set is not
            // expressible, so all of them are excluded).
            excluded_subtrees: vec![
                GeneralSubtree::IpAddress(CidrSubnet::V4([0; 4], [0; 4])),
                GeneralSubtree::IpAddress(CidrSubnet::V6([0; 16], [0; 16])),
            ],
        });
        let cert = params
            .self_signed(&key)
            .map_err(|e| Error::Ca(e.to_string()))?;
        let rec = CaRecord {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        };
        match Self::from_record(&rec, &suffixes)? {
            Some(ca) => Ok((ca, rec)),
            None => Err(Error::Ca("the new root lacks its name constraints".into())),
        }
    }

    pub(crate) fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issue a leaf for `names` (first is the common name).
    pub(crate) fn issue(&self, names: &[String], validity: Duration) -> Result<Loaded, String> {
        if let Some(out) = names
            .iter()
            .find(|n| !internal_name_allowed(n, &self.suffixes))
        {
            return Err(format!(
                "{out} is outside the internal CA's names ({}): use tls mode acme or manual",
                self.suffixes.join(", ")
            ));
        }
        let key = KeyPair::generate().map_err(|e| e.to_string())?;
        let mut params = CertificateParams::new(names.to_vec()).map_err(|e| e.to_string())?;
        let mut dn = DistinguishedName::new();
        if let Some(first) = names.first() {
            dn.push(DnType::CommonName, first.as_str());
        }
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + time::Duration::seconds(validity.as_secs() as i64);
        params.serial_number = Some(random_serial());
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| e.to_string())?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        // The leaf alone: the CA is a root, which a client that trusts it
        // already has, so sending it costs bytes and (for OpenSSL clients,
        // which parse and check every certificate sent) client CPU.
        certs::from_der(vec![cert.der().clone()], key_der)
    }
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f;
    SerialNumber::from_slice(&bytes)
}
