//! SSH key handling for the daemon and CLI: parsing client keys, making the
//! gateway's per-sandbox upstream key pair, fingerprints.

use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::ssh_key::LineEnding;
use russh::keys::{HashAlg, PrivateKey, PublicKey};

use crate::api::KeyView;

/// A key that could not be used, with the reason.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {reason}")]
pub struct KeyError {
    pub what: String,
    pub reason: String,
}

/// Parses one OpenSSH public-key line (`TYPE BASE64 [COMMENT]`), also
/// accepting `known_hosts`/`authorized_keys` lines with a leading field.
pub fn parse_public(line: &str) -> Result<PublicKey, KeyError> {
    let line = line.trim();
    if let Ok(k) = PublicKey::from_openssh(line) {
        return Ok(k);
    }
    // `host keytype base64` or `options keytype base64`: drop the first field.
    if let Some((_, rest)) = line.split_once(char::is_whitespace) {
        if let Ok(k) = PublicKey::from_openssh(rest.trim()) {
            return Ok(k);
        }
    }
    let shown: String = line.chars().take(40).collect();
    Err(KeyError {
        what: format!("key {shown:?}"),
        reason: "not an OpenSSH public key".into(),
    })
}

/// Public-key lines found in a file's text: blank lines and `#` comments
/// skipped, every other line must parse.
pub fn parse_key_lines(text: &str) -> Result<Vec<PublicKey>, KeyError> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(parse_public)
        .collect()
}

/// The canonical one-line form, comment kept.
pub fn to_line(key: &PublicKey) -> String {
    key.to_openssh().unwrap_or_default()
}

/// `SHA256:...` fingerprint.
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// A key as shown to people.
pub fn view(line: &str) -> KeyView {
    match parse_public(line) {
        Ok(k) => KeyView {
            algorithm: k.algorithm().as_str().to_string(),
            fingerprint: fingerprint(&k),
            comment: k.comment().to_string(),
            key: line.to_string(),
        },
        Err(_) => KeyView {
            algorithm: "unknown".into(),
            fingerprint: String::new(),
            comment: String::new(),
            key: line.to_string(),
        },
    }
}

/// True when `line` is the same key as `key` (comments ignored).
pub fn same_key(line: &str, key: &PublicKey) -> bool {
    parse_public(line).is_ok_and(|k| k.key_data() == key.key_data())
}

/// A fresh ed25519 key pair in OpenSSH formats: (private PEM, public line).
pub fn generate_ed25519(comment: &str) -> Result<(String, String), KeyError> {
    let seed: [u8; 32] = rand::random();
    let mut key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
    key.set_comment(comment);
    let fail = |e: russh::keys::ssh_key::Error| KeyError {
        what: "generated key".into(),
        reason: e.to_string(),
    };
    let private = key.to_openssh(LineEnding::LF).map_err(fail)?;
    let public = key.public_key().to_openssh().map_err(fail)?;
    Ok((private.to_string(), public))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn generated_keys_parse_back() {
        let (private, public) = generate_ed25519("sandboxd@test").unwrap();
        let parsed = PrivateKey::from_openssh(&private).unwrap();
        let pubkey = parse_public(&public).unwrap();
        assert_eq!(parsed.public_key().key_data(), pubkey.key_data());
        assert!(same_key(&public, &pubkey));
        assert!(fingerprint(&pubkey).starts_with("SHA256:"));
    }

    #[test]
    fn key_lines_and_errors() {
        let (_, public) = generate_ed25519("a").unwrap();
        let text = format!("# comment\n\n{public}\nhost.example {public}\n");
        assert_eq!(parse_key_lines(&text).unwrap().len(), 2);
        assert!(parse_key_lines("ssh-ed25519 notbase64").is_err());
    }
}
