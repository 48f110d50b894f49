//! The internal certificate authority: created once with rcgen, persisted
//! through the [`crate::CertStore`], and used to issue leaf certificates for
//! routed names in `internal` mode at once.

use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::certs::{self, Loaded};
use crate::{CaRecord, Error};

pub(crate) struct InternalCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl InternalCa {
    /// Restore the CA from its record.
    pub(crate) fn from_record(rec: &CaRecord) -> Result<Self, Error> {
        let key = KeyPair::from_pem(&rec.key_pem).map_err(|e| Error::Ca(e.to_string()))?;
        let issuer =
            Issuer::from_ca_cert_pem(&rec.cert_pem, key).map_err(|e| Error::Ca(e.to_string()))?;
        Ok(Self {
            issuer,
            cert_pem: rec.cert_pem.clone(),
        })
    }

    /// Make a new CA (ECDSA P-256, ten years).
    pub(crate) fn generate() -> Result<(Self, CaRecord), Error> {
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
        let cert = params
            .self_signed(&key)
            .map_err(|e| Error::Ca(e.to_string()))?;
        let rec = CaRecord {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        };
        let ca = Self::from_record(&rec)?;
        Ok((ca, rec))
    }

    pub(crate) fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issue a leaf for `names` (first is the common name).
    pub(crate) fn issue(&self, names: &[String], validity: Duration) -> Result<Loaded, String> {
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
