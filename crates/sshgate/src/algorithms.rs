//! The algorithms both legs offer and accept: key exchange, ciphers, MACs,
//! host-key signatures, and the signature algorithms a client may log in
//! with. One rule for all of them: modern only, on the client leg (russh
//! server) and the upstream leg (russh client) alike.
//!
//! - Key exchange: mlkem768x25519-sha256, curve25519-sha256 (both names),
//!   diffie-hellman-group16/18-sha512. No SHA-1 groups, no 2048-bit
//!   group14, no group exchange, no NIST-curve ECDH.
//! - Ciphers: chacha20-poly1305, aes128/256-gcm (AEAD), aes128/192/256-ctr;
//!   a configured list may only reorder or drop these.
//! - MACs (used with the CTR ciphers only): hmac-sha2-512-etm and
//!   hmac-sha2-256-etm, never encrypt-and-MAC.
//! - Signatures: no SHA-1 `ssh-rsa`, neither for host keys nor for user
//!   authentication (RSA keys sign with rsa-sha2-512/256, as OpenSSH 8.8+
//!   requires), and no DSA.
//!
//! A peer that offers nothing from these lists is refused, never served
//! with something weaker.

use russh::keys::{Algorithm, EcdsaCurve, HashAlg};
use russh::{cipher, kex, mac, Preferred};

use crate::{Error, GatewayConfig};

/// Key exchange, most preferred first, then the protocol extensions
/// (RFC 8308 ext-info and OpenSSH's strict key exchange; russh sends each
/// leg's own half).
const KEX: &[kex::Name] = &[
    kex::MLKEM768X25519_SHA256,
    kex::CURVE25519,
    kex::CURVE25519_PRE_RFC_8731,
    kex::DH_G16_SHA512,
    kex::DH_G18_SHA512,
    kex::EXTENSION_SUPPORT_AS_CLIENT,
    kex::EXTENSION_SUPPORT_AS_SERVER,
    kex::EXTENSION_OPENSSH_STRICT_KEX_AS_CLIENT,
    kex::EXTENSION_OPENSSH_STRICT_KEX_AS_SERVER,
];

/// The ciphers a configuration may name (`GatewayConfig::ciphers`).
pub(crate) const CIPHERS: &[cipher::Name] = &[
    cipher::AES_128_GCM,
    cipher::AES_256_GCM,
    cipher::CHACHA20_POLY1305,
    cipher::AES_256_CTR,
    cipher::AES_192_CTR,
    cipher::AES_128_CTR,
];

/// MACs, encrypt-then-MAC only (AEAD ciphers use none).
const MACS: &[mac::Name] = &[mac::HMAC_SHA512_ETM, mac::HMAC_SHA256_ETM];

/// Host-key signature algorithms offered to clients (and, as
/// `server-sig-algs`, the user-auth signatures advertised): no SHA-1
/// `ssh-rsa`; RSA host keys sign with rsa-sha2-512/256.
pub(crate) const HOST_KEY_ALGORITHMS: &[Algorithm] = &[
    Algorithm::Ed25519,
    Algorithm::Ecdsa {
        curve: EcdsaCurve::NistP256,
    },
    Algorithm::Ecdsa {
        curve: EcdsaCurve::NistP384,
    },
    Algorithm::Ecdsa {
        curve: EcdsaCurve::NistP521,
    },
    Algorithm::Rsa {
        hash: Some(HashAlg::Sha512),
    },
    Algorithm::Rsa {
        hash: Some(HashAlg::Sha256),
    },
];

/// Whether a client may log in with a signature of `algorithm` (the one
/// named in its publickey request, which russh holds the signature to).
/// The same set as OpenSSH 9's default `PubkeyAcceptedAlgorithms`: no
/// `ssh-rsa` (RSA with SHA-1) and no DSA.
pub(crate) fn userauth_allowed(algorithm: &Algorithm) -> bool {
    match algorithm {
        Algorithm::Ed25519
        | Algorithm::Ecdsa { .. }
        | Algorithm::SkEd25519
        | Algorithm::SkEcdsaSha2NistP256 => true,
        Algorithm::Rsa { hash } => matches!(hash, Some(HashAlg::Sha256 | HashAlg::Sha512)),
        _ => false,
    }
}

/// The hash the upstream leg signs its login with when the gateway's key
/// for a sandbox is RSA, from what the upstream advertised
/// (`best_supported_rsa_hash`): never SHA-1. An upstream that only takes
/// `ssh-rsa` refuses the login, which is reported as such.
pub(crate) fn upstream_rsa_hash(advertised: Option<Option<HashAlg>>) -> HashAlg {
    match advertised {
        Some(Some(HashAlg::Sha256)) => HashAlg::Sha256,
        _ => HashAlg::Sha512,
    }
}

/// How a log line or a client message names an algorithm kind.
pub(crate) fn kind_name(kind: &russh::AlgorithmKind) -> &'static str {
    match kind {
        russh::AlgorithmKind::Kex => "key exchange",
        russh::AlgorithmKind::Key => "host key",
        russh::AlgorithmKind::Cipher => "cipher",
        russh::AlgorithmKind::Mac => "MAC",
        russh::AlgorithmKind::Compression => "compression",
    }
}

/// The configured cipher preference, checked: every name must be one of
/// [`CIPHERS`], and at least one must be given.
pub(crate) fn ciphers(cfg: &GatewayConfig) -> Result<Vec<cipher::Name>, Error> {
    if cfg.ciphers.is_empty() {
        return Err(Error::NoAlgorithm { kind: "cipher" });
    }
    cfg.ciphers
        .iter()
        .map(|want| {
            CIPHERS
                .iter()
                .find(|k| k.as_ref() == want.as_str())
                .copied()
                .ok_or_else(|| Error::Algorithm {
                    kind: "cipher",
                    name: want.clone(),
                    allowed: CIPHERS
                        .iter()
                        .map(|c| c.as_ref())
                        .collect::<Vec<_>>()
                        .join(", "),
                })
        })
        .collect()
}

/// Key exchange, ciphers and MACs for both legs; each leg sets its own
/// host-key list (and the server its compression) over it.
pub(crate) fn preferred(cfg: &GatewayConfig) -> Result<Preferred, Error> {
    Ok(Preferred {
        kex: KEX.into(),
        cipher: ciphers(cfg)?.into(),
        mac: MACS.into(),
        key: HOST_KEY_ALGORITHMS.into(),
        ..Preferred::default()
    })
}

#[cfg(test)]
#[allow(clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn sha1_rsa_and_dsa_logins_are_refused() {
        assert!(!userauth_allowed(&Algorithm::Rsa { hash: None }));
        assert!(!userauth_allowed(&Algorithm::Dsa));
        for ok in [
            Algorithm::Rsa {
                hash: Some(HashAlg::Sha256),
            },
            Algorithm::Rsa {
                hash: Some(HashAlg::Sha512),
            },
            Algorithm::Ed25519,
            Algorithm::Ecdsa {
                curve: EcdsaCurve::NistP256,
            },
        ] {
            assert!(userauth_allowed(&ok), "{ok:?}");
        }
    }

    #[test]
    fn the_upstream_leg_never_signs_with_sha1() {
        assert_eq!(upstream_rsa_hash(None), HashAlg::Sha512);
        assert_eq!(upstream_rsa_hash(Some(None)), HashAlg::Sha512);
        assert_eq!(
            upstream_rsa_hash(Some(Some(HashAlg::Sha256))),
            HashAlg::Sha256
        );
        assert_eq!(
            upstream_rsa_hash(Some(Some(HashAlg::Sha512))),
            HashAlg::Sha512
        );
    }

    #[test]
    fn default_ciphers_are_all_allowed_and_old_ones_are_refused() {
        let cfg = GatewayConfig::default();
        assert_eq!(ciphers(&cfg).expect("defaults").len(), cfg.ciphers.len());
        for bad in ["aes128-cbc", "3des-cbc", "none", "arcfour", ""] {
            let cfg = GatewayConfig {
                ciphers: vec!["aes128-gcm@openssh.com".into(), bad.into()],
                ..GatewayConfig::default()
            };
            let err = ciphers(&cfg).expect_err(bad).to_string();
            assert!(err.contains(&format!("`{bad}`")), "{err}");
            assert!(err.contains("chacha20-poly1305@openssh.com"), "{err}");
        }
        let cfg = GatewayConfig {
            ciphers: vec![],
            ..GatewayConfig::default()
        };
        assert!(ciphers(&cfg).is_err());
    }

    #[test]
    fn nothing_weak_is_offered() {
        let p = preferred(&GatewayConfig::default()).expect("defaults");
        for k in p.kex.iter() {
            let k = k.as_ref();
            assert!(
                !k.contains("sha1") && !k.contains("nistp") && !k.contains("group14"),
                "{k}"
            );
        }
        for m in p.mac.iter() {
            assert!(m.as_ref().ends_with("-etm@openssh.com"), "{}", m.as_ref());
        }
        assert!(!p.key.contains(&Algorithm::Rsa { hash: None }));
    }
}
