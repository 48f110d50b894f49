//! A sandbox's TLS settings as `add` and `create` give them: the mode
//! ([`store::TlsMode`], parsed already where the request was read), and for
//! `manual` the PEM files, checked before anything is recorded (so a
//! `create` refused here leaves no record and no container; the rules are
//! applied by `crate::sandbox::new_sandbox`). `internal`
//! mode, asked for or the daemon's default, is only for domains under the
//! internal CA's suffixes ([`Policy`]): its root is constrained to them, so
//! a leaf for any other name would be refused by every client.
//!
//! It does not serve or reload the files: httpgate loads them when the
//! route appears, on `certs renew DOMAIN`, every 5 minutes and at start,
//! and reports what fails in `sandboxd certs`. A file that is not there yet
//! is therefore accepted here (it is reported there until it appears);
//! files that are there must be a certificate chain and its leaf's key.

use std::path::Path;

use store::TlsMode;

/// A TLS setting refused before anything is recorded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("give both the certificate file and the key file, or neither")]
    HalfPair,
    #[error(
        "tls mode manual needs a certificate file and a key file (--tls-cert-file, --tls-key-file)"
    )]
    FilesMissing,
    #[error("certificate and key files are for tls mode manual (--tls-mode manual)")]
    NotManual,
    #[error("{what} file {path:?}: give an absolute path")]
    NotAbsolute { what: &'static str, path: String },
    #[error("cannot read {what} file {path}: {source}")]
    Read {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {detail}")]
    Pem { path: String, detail: String },
    #[error("{cert} and {key}: the private key does not match the certificate")]
    Mismatch { cert: String, key: String },
    #[error("key file {path} is readable by other users (mode {mode:04o}): chmod 600 it (owned by the user sandboxd runs as)")]
    KeyReadable { path: String, mode: u32 },
    #[error(
        "{domain} cannot use tls mode internal{}: the internal CA only vouches for names under {}; \
         use --tls-mode acme (a public certificate) or --tls-mode manual (your own files)",
        if *.defaulted { " (the daemon's default)" } else { "" },
        .suffixes.iter().map(|s| format!(".{s}")).collect::<Vec<_>>().join(", ")
    )]
    OutsideInternal {
        domain: String,
        suffixes: Vec<String>,
        defaulted: bool,
    },
}

/// Which domains may use `internal` mode, and whether a sandbox that
/// names no mode gets it (the daemon's `tls_mode`).
#[derive(Debug, Clone, Default)]
pub struct Policy {
    pub default_internal: bool,
    /// The internal CA's suffixes (`internal_ca_suffixes`).
    pub internal_suffixes: Vec<String>,
}

impl Policy {
    /// Refuses `internal` mode (given, or by default) for a domain outside
    /// the internal CA's suffixes.
    pub fn check(&self, mode: Option<TlsMode>, domain: &str) -> Result<(), TlsError> {
        let internal = match mode {
            Some(m) => m == TlsMode::Internal,
            None => self.default_internal,
        };
        if internal && !httpgate::internal_name_allowed(domain, &self.internal_suffixes) {
            return Err(TlsError::OutsideInternal {
                domain: domain.to_string(),
                suffixes: self.internal_suffixes.clone(),
                defaulted: mode.is_none(),
            });
        }
        Ok(())
    }
}

/// The manual mode's files: certificate chain (leaf first) and key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManualFiles {
    pub cert: String,
    pub key: String,
}

/// Checks the mode and the files given with it (without reading them):
/// `manual` needs both files as absolute paths, the others take none.
pub fn settings(
    mode: Option<TlsMode>,
    cert: Option<String>,
    key: Option<String>,
) -> Result<Option<ManualFiles>, TlsError> {
    let files = match (cert, key) {
        (Some(cert), Some(key)) => Some(ManualFiles { cert, key }),
        (None, None) => None,
        _ => return Err(TlsError::HalfPair),
    };
    let manual = mode == Some(TlsMode::Manual);
    match &files {
        None if manual => return Err(TlsError::FilesMissing),
        Some(_) if !manual => return Err(TlsError::NotManual),
        Some(f) => {
            for (what, p) in [("certificate", &f.cert), ("key", &f.key)] {
                if !Path::new(p).is_absolute() || p.contains('\n') {
                    return Err(TlsError::NotAbsolute {
                        what,
                        path: p.clone(),
                    });
                }
            }
        }
        None => {}
    }
    Ok(files)
}

/// Reads the files as the daemon will: when both are there they must be a
/// PEM certificate chain and the private key of its leaf, and the key file
/// must not be readable by group or others (like the LLM key file; httpgate
/// refuses such a key when it loads it, too). A missing file passes (it may
/// be put in place later); any other read error does not. Blocking (small
/// reads): call it off the async threads.
pub fn check_files(files: &ManualFiles) -> Result<(), TlsError> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::metadata(&files.key) {
        Ok(meta) if meta.permissions().mode() & 0o077 != 0 => {
            return Err(TlsError::KeyReadable {
                path: files.key.clone(),
                mode: meta.permissions().mode() & 0o7777,
            })
        }
        _ => {}
    }
    let read = |what: &'static str, path: &str| match std::fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TlsError::Read {
            what,
            path: path.to_string(),
            source,
        }),
    };
    let (Some(cert_pem), Some(key_pem)) =
        (read("certificate", &files.cert)?, read("key", &files.key)?)
    else {
        return Ok(());
    };
    httpgate::check_pem_pair(&cert_pem, &key_pem).map_err(|e| match e {
        httpgate::PemError::Mismatch => TlsError::Mismatch {
            cert: files.cert.clone(),
            key: files.key.clone(),
        },
        httpgate::PemError::Key(_) => TlsError::Pem {
            path: files.key.clone(),
            detail: e.to_string(),
        },
        httpgate::PemError::Cert(_) | httpgate::PemError::Pair(_) => TlsError::Pem {
            path: files.cert.clone(),
            detail: e.to_string(),
        },
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn s(v: &str) -> Option<String> {
        Some(v.to_string())
    }

    #[test]
    fn files_go_with_manual_mode_only() {
        let manual = Some(TlsMode::Manual);
        assert!(matches!(
            settings(None, s("/c.pem"), s("/k.pem")),
            Err(TlsError::NotManual)
        ));
        assert!(matches!(
            settings(Some(TlsMode::Acme), s("/c.pem"), s("/k.pem")),
            Err(TlsError::NotManual)
        ));
        assert!(matches!(
            settings(manual, None, None),
            Err(TlsError::FilesMissing)
        ));
        assert!(matches!(
            settings(manual, s("/c.pem"), None),
            Err(TlsError::HalfPair)
        ));
        assert!(matches!(
            settings(manual, s("c.pem"), s("/k.pem")),
            Err(TlsError::NotAbsolute {
                what: "certificate",
                ..
            })
        ));
        assert_eq!(
            settings(manual, s("/c.pem"), s("/k.pem")).unwrap(),
            Some(ManualFiles {
                cert: "/c.pem".into(),
                key: "/k.pem".into()
            })
        );
        assert_eq!(settings(Some(TlsMode::Internal), None, None).unwrap(), None);
        assert_eq!(settings(None, None, None).unwrap(), None);
        // The messages name the flags a user has to give.
        assert!(TlsError::NotManual
            .to_string()
            .contains("--tls-mode manual"));
        assert!(TlsError::FilesMissing
            .to_string()
            .contains("--tls-cert-file"));
    }

    fn private(path: &Path) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    fn write_pair(dir: &Path, name: &str) -> ManualFiles {
        let ck = rcgen::generate_simple_self_signed(vec!["a.test".to_string()]).unwrap();
        let cert = dir.join(format!("{name}.pem"));
        let key = dir.join(format!("{name}.key"));
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
        private(&key);
        ManualFiles {
            cert: cert.display().to_string(),
            key: key.display().to_string(),
        }
    }

    #[test]
    fn a_pair_must_match_when_its_files_are_there() {
        let dir = tempfile::tempdir().unwrap();
        let a = write_pair(dir.path(), "a");
        let b = write_pair(dir.path(), "b");
        check_files(&a).unwrap();
        let crossed = ManualFiles {
            cert: a.cert.clone(),
            key: b.key.clone(),
        };
        let err = check_files(&crossed).unwrap_err();
        assert!(matches!(err, TlsError::Mismatch { .. }), "{err}");
        assert!(err.to_string().contains("does not match"), "{err}");
        // Not there yet: accepted (httpgate reports it until it appears).
        let later = ManualFiles {
            cert: dir.path().join("later.pem").display().to_string(),
            key: a.key.clone(),
        };
        check_files(&later).unwrap();
        // There but not PEM: refused, naming the file.
        let junk = dir.path().join("junk.key");
        std::fs::write(&junk, "not a key\n").unwrap();
        private(&junk);
        let err = check_files(&ManualFiles {
            cert: a.cert.clone(),
            key: junk.display().to_string(),
        })
        .unwrap_err();
        assert!(err.to_string().contains("no private key"), "{err}");
        // A directory where a file should be: a read error, refused.
        let err = check_files(&ManualFiles {
            cert: dir.path().display().to_string(),
            key: a.key,
        })
        .unwrap_err();
        assert!(matches!(err, TlsError::Read { .. }), "{err}");
        // A key others may read: refused before it is parsed.
        let loose = write_pair(dir.path(), "loose");
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&loose.key, std::fs::Permissions::from_mode(0o640)).unwrap();
        }
        let err = check_files(&loose).unwrap_err();
        assert!(
            matches!(err, TlsError::KeyReadable { mode: 0o640, .. }),
            "{err}"
        );
    }
}
