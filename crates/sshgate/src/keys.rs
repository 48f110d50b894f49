//! Host keys of the gateway: load them from a directory, or make them on
//! first start (ed25519, and RSA for clients that only speak rsa-sha2),
//! written in OpenSSH format with mode 0600 in a 0700 directory.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use russh::keys::ssh_key::LineEnding;
use russh::keys::{Algorithm, HashAlg, PrivateKey, PublicKey};

use crate::Error;

const ED25519_FILE: &str = "ssh_host_ed25519_key";
const RSA_FILE: &str = "ssh_host_rsa_key";
const RSA_BITS: usize = 3072;

/// Load the gateway's host keys from `dir`, generating missing ones.
/// Returns ed25519 first, then RSA.
pub fn load_or_generate_host_keys(dir: &Path) -> Result<Vec<PrivateKey>, Error> {
    if !dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| Error::Io {
                path: dir.to_path_buf(),
                source,
            })?;
    }
    let ed = load_or_make(&dir.join(ED25519_FILE), || {
        PrivateKey::random(&mut rand_ssh::rng(), Algorithm::Ed25519)
    })?;
    let rsa = load_or_make(&dir.join(RSA_FILE), || {
        russh::keys::ssh_key::private::RsaKeypair::random(&mut rand_ssh::rng(), RSA_BITS)
            .map(PrivateKey::from)
    })?;
    Ok(vec![ed, rsa])
}

/// `SHA256:...` fingerprint of a public key, as OpenSSH prints it.
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// One line per host key, as `sandboxd host-key` prints them:
/// `ALGORITHM BASE64 SHA256:FINGERPRINT`.
pub fn describe_host_keys(keys: &[PrivateKey]) -> Vec<String> {
    keys.iter()
        .map(|k| {
            let public = k.public_key();
            let line = public
                .to_openssh()
                .unwrap_or_else(|_| public.algorithm().to_string());
            format!("{} {}", line.trim(), fingerprint(public))
        })
        .collect()
}

fn load_or_make(
    path: &Path,
    make: impl FnOnce() -> Result<PrivateKey, russh::keys::ssh_key::Error>,
) -> Result<PrivateKey, Error> {
    let key_err = |path: &Path, message: String| Error::Key {
        path: path.to_path_buf(),
        message,
    };
    match fs::read_to_string(path) {
        Ok(text) => PrivateKey::from_openssh(text.trim()).map_err(|e| key_err(path, e.to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = make().map_err(|e| key_err(path, e.to_string()))?;
            let text = key
                .to_openssh(LineEnding::LF)
                .map_err(|e| key_err(path, e.to_string()))?;
            write_private(path, text.as_bytes())?;
            Ok(key)
        }
        Err(source) => Err(Error::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Write a new file with mode 0600 (never replacing an existing one), via a
/// temporary name so that a crash never leaves a half-written key.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let io = |path: PathBuf| move |source| Error::Io { path, source };
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(tmp.clone()))?;
    f.write_all(bytes).map_err(io(tmp.clone()))?;
    f.sync_all().map_err(io(tmp.clone()))?;
    drop(f);
    fs::hard_link(&tmp, path).map_err(io(path.to_path_buf()))?;
    fs::remove_file(&tmp).map_err(io(tmp))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn keys_are_made_once_with_private_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("keys");
        let first = load_or_generate_host_keys(&dir).unwrap();
        assert_eq!(first.len(), 2);
        assert_eq!(first[0].algorithm(), Algorithm::Ed25519);
        assert!(matches!(first[1].algorithm(), Algorithm::Rsa { .. }));
        let mode = fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        for f in [ED25519_FILE, RSA_FILE] {
            let mode = fs::metadata(dir.join(f)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{f}");
        }
        let again = load_or_generate_host_keys(&dir).unwrap();
        assert_eq!(
            fingerprint(first[0].public_key()),
            fingerprint(again[0].public_key())
        );
        assert_eq!(
            fingerprint(first[1].public_key()),
            fingerprint(again[1].public_key())
        );
        assert!(fingerprint(first[0].public_key()).starts_with("SHA256:"));
        let lines = describe_host_keys(&first);
        assert!(lines[0].starts_with("ssh-ed25519 AAAA"), "{}", lines[0]);
        assert!(lines[1].starts_with("ssh-rsa AAAA"), "{}", lines[1]);
        assert!(lines[0].ends_with(&fingerprint(first[0].public_key())));
    }
}
