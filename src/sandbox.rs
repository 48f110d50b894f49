//! The sandbox domain: the rules a sandbox record must meet beyond its
//! shape (client keys, the pinned host key, the agent login, the app and
//! agent ports, the TLS mode and its files), how a new record is made from
//! a request ([`new_sandbox`], for `add`, `create` and `import` alike), the
//! client-key edits, and the public view of a record ([`view`]).
//!
//! It knows nothing of HTTP: the admin API (`crate::admin`) and the Incus
//! lifecycle (`crate::lifecycle`) both call it and get a [`SandboxError`]
//! back; the admin API alone turns that into a status and a stable code.
//! The store checks the shape of records (names, domains, uniqueness) and
//! owns durability; this module adds what needs parsing (keys, PEM files)
//! or hashing (the login's password).

use russh::keys::PublicKey;
use store::{Backend, KeyPair, Sandbox, SandboxStatus, TlsMode};

use crate::api::{BackendKind, KeyView, SandboxView, SetAuth, StatusKind};
use crate::keys::{self, KeyError};
use crate::tlsfiles::{self, TlsError};

/// Why a sandbox request was refused. Every variant but the last three
/// (`Hash`, `KeyGeneration`, `Worker`: the daemon's own failures) is the
/// caller's to fix.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The app port equals the agent port: the app domain is served without
    /// a login, so it would open the agent to everyone.
    #[error("invalid app port: {0} is the agent port: the app domain has no login, so it would serve the agent to anyone; pick another port")]
    AppPortIsAgentPort(u16),
    #[error("at least one client SSH key is needed, or nobody could log in")]
    NoClientKey,
    #[error("no key given")]
    NoKeyGiven,
    /// A client key line that does not parse.
    #[error("{0}")]
    Key(KeyError),
    #[error("upstream host key: {0}")]
    UpstreamHostKey(KeyError),
    #[error("auth user must be 1 to 64 characters, without ':' or control characters")]
    AuthUser,
    #[error("password must be 1 to 1024 bytes")]
    Password,
    /// The TLS mode or its files (see [`crate::tlsfiles`]).
    #[error("{0}")]
    Tls(#[from] TlsError),
    #[error("sandbox {name} has no key matching {wanted}")]
    KeyNotFound { name: String, wanted: String },
    #[error("removing that would leave {name} with no client key; add another first")]
    LastKey { name: String },
    #[error("hashing password: {0}")]
    Hash(String),
    /// The gateway's key pair could not be made.
    #[error("{0}")]
    KeyGeneration(KeyError),
    /// A blocking worker (hash, file checks) ended without an answer.
    #[error("worker failed: {0}")]
    Worker(String),
}

type Result<T, E = SandboxError> = std::result::Result<T, E>;

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| SandboxError::Worker(e.to_string()))?
}

/// The public view of a sandbox: no private key, no password hash.
pub fn view(sb: &Sandbox) -> SandboxView {
    let (backend, upstream) = match &sb.backend {
        Backend::Static { host } => (BackendKind::Static, host.clone()),
        Backend::Incus { instance } => (BackendKind::Incus, instance.clone()),
    };
    let (status, status_reason) = match &sb.status {
        SandboxStatus::Running => (StatusKind::Running, None),
        SandboxStatus::Stopped => (StatusKind::Stopped, None),
        SandboxStatus::Creating { step } => (StatusKind::Creating, Some(step.clone())),
        SandboxStatus::Failed { reason } => (StatusKind::Failed, Some(reason.clone())),
    };
    SandboxView {
        name: sb.name.clone(),
        domain: sb.domain.clone(),
        agent_host: sb.agent_host(),
        backend,
        upstream,
        ssh_port: sb.ssh_port,
        app_port: sb.app_port,
        agent_port: sb.agent_port,
        user: sb.user.clone(),
        status,
        status_reason,
        addresses: sb.addresses.clone(),
        assigned_ipv4: sb.assigned_ipv4.clone(),
        egress: match &sb.backend {
            Backend::Incus { .. } => Some(sb.egress.mode),
            Backend::Static { .. } => None,
        },
        egress_allow: sb.egress.allow.clone(),
        client_keys: key_views(sb),
        upstream_public_key: sb.upstream_key.public_openssh.clone(),
        upstream_host_key: sb.upstream_host_key.clone(),
        auth_user: sb.basic_auth.as_ref().map(|a| a.user.clone()),
        tls_mode: sb.tls_mode,
        tls_cert_file: sb.tls_cert_file.clone(),
        tls_key_file: sb.tls_key_file.clone(),
        created_at: sb.created_at,
        updated_at: sb.updated_at,
    }
}

/// A sandbox's client keys as shown to people.
pub fn key_views(sb: &Sandbox) -> Vec<KeyView> {
    sb.client_keys.iter().map(|k| keys::view(k)).collect()
}

/// Client key lines, each parsed and written back in the one canonical
/// form.
pub fn parse_keys(lines: &[String]) -> Result<Vec<String>> {
    lines
        .iter()
        .map(|l| {
            keys::parse_public(l)
                .map(|k| keys::to_line(&k))
                .map_err(SandboxError::Key)
        })
        .collect()
}

/// Keys to add to a sandbox: at least one, each parsed (canonical line and
/// key).
pub fn keys_to_add(lines: &[String]) -> Result<Vec<(String, PublicKey)>> {
    if lines.is_empty() {
        return Err(SandboxError::NoKeyGiven);
    }
    lines
        .iter()
        .map(|l| {
            keys::parse_public(l)
                .map(|k| (keys::to_line(&k), k))
                .map_err(SandboxError::Key)
        })
        .collect()
}

/// Adds the keys a sandbox does not have yet (same key, any comment, is
/// the same key), in order.
pub fn add_keys(client_keys: &mut Vec<String>, new: &[(String, PublicKey)]) {
    for (line, key) in new {
        if !client_keys.iter().any(|k| keys::same_key(k, key)) {
            client_keys.push(line.clone());
        }
    }
}

/// The client keys of sandbox `name` left after removing each of `wanted`
/// (key lines or `SHA256:` fingerprints). Each must match a key, and at
/// least one key must remain.
pub fn keys_after_removal(
    name: &str,
    current: &[String],
    wanted: &[String],
) -> Result<Vec<String>> {
    if wanted.is_empty() {
        return Err(SandboxError::NoKeyGiven);
    }
    let mut keep = current.to_vec();
    for w in wanted {
        let before = keep.len();
        if w.starts_with("SHA256:") {
            keep.retain(|k| keys::view(k).fingerprint != *w);
        } else {
            let key = keys::parse_public(w).map_err(SandboxError::Key)?;
            keep.retain(|k| !keys::same_key(k, &key));
        }
        if keep.len() == before {
            return Err(SandboxError::KeyNotFound {
                name: name.to_string(),
                wanted: w.clone(),
            });
        }
    }
    if keep.is_empty() {
        return Err(SandboxError::LastKey {
            name: name.to_string(),
        });
    }
    Ok(keep)
}

/// The agent host's login: a user name fit for basic auth and a password
/// of sane length.
pub fn check_auth(auth: &SetAuth) -> Result<()> {
    if auth.user.is_empty()
        || auth.user.len() > 64
        || auth.user.contains(':')
        || auth.user.chars().any(char::is_control)
    {
        return Err(SandboxError::AuthUser);
    }
    if auth.password.is_empty() || auth.password.len() > 1024 {
        return Err(SandboxError::Password);
    }
    Ok(())
}

/// The app port must not be the agent port: the app domain is served
/// without a login, so it would open the agent to everyone.
pub fn check_ports(app_port: u16, agent_port: u16) -> Result<()> {
    if app_port == agent_port {
        return Err(SandboxError::AppPortIsAgentPort(app_port));
    }
    Ok(())
}

/// Hashes a password as an argon2id PHC string (off the async threads).
pub async fn hash_password(password: String) -> Result<String> {
    blocking(move || {
        use argon2::password_hash::{PasswordHasher, SaltString};
        let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
        argon2::Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|e| SandboxError::Hash(e.to_string()))
    })
    .await
}

/// The stored login for `auth`, checked and its password hashed.
pub async fn basic_auth(auth: SetAuth) -> Result<store::BasicAuth> {
    check_auth(&auth)?;
    Ok(store::BasicAuth {
        user: auth.user,
        password_hash: hash_password(auth.password).await?,
    })
}

/// A requested domain as records hold it: without surrounding blanks,
/// lowercased. Its shape is checked by the store.
pub fn normalize_domain(domain: &str) -> String {
    domain.trim().to_ascii_lowercase()
}

/// What a new sandbox record is made from; shared by `add` (static
/// backends) and the Incus `create`/`import`.
pub struct NewSandbox {
    pub name: String,
    /// As requested; [`new_sandbox`] normalizes it ([`normalize_domain`]).
    pub domain: String,
    pub backend: Backend,
    pub ssh_port: u16,
    pub app_port: u16,
    pub agent_port: u16,
    pub agent_prefix: String,
    pub user: String,
    pub ssh_keys: Vec<String>,
    pub upstream_host_key: Option<String>,
    pub auth: Option<SetAuth>,
    pub tls_mode: Option<TlsMode>,
    /// `manual` mode's PEM files (certificate chain, key), absolute paths;
    /// checked by [`crate::tlsfiles`].
    pub tls_cert_file: Option<String>,
    pub tls_key_file: Option<String>,
    pub status: SandboxStatus,
    /// Which domains may use `internal` TLS mode.
    pub tls_policy: tlsfiles::Policy,
}

/// Normalizes the domain, checks what the store cannot (client keys, host
/// key, auth, TLS mode and manual files), hashes the password and makes
/// the gateway's key pair. The record is not stored yet; its shape is checked by the store's
/// insert.
pub async fn new_sandbox(mut req: NewSandbox) -> Result<Sandbox> {
    req.domain = normalize_domain(&req.domain);
    check_ports(req.app_port, req.agent_port)?;
    if req.ssh_keys.is_empty() {
        return Err(SandboxError::NoClientKey);
    }
    let client_keys = parse_keys(&req.ssh_keys)?;
    let upstream_host_key = match &req.upstream_host_key {
        Some(k) => Some(
            keys::parse_public(k)
                .map(|k| keys::to_line(&k))
                .map_err(SandboxError::UpstreamHostKey)?,
        ),
        None => None,
    };
    let basic_auth = match req.auth {
        Some(auth) => Some(basic_auth(auth).await?),
        None => None,
    };
    let tls_files = tlsfiles::settings(req.tls_mode, req.tls_cert_file, req.tls_key_file)?;
    // A malformed domain gets the store's message, not this one.
    if store::validate_domain(&req.domain).is_ok() {
        req.tls_policy.check(req.tls_mode, &req.domain)?;
    }
    let (tls_cert_file, tls_key_file) = match tls_files {
        Some(files) => {
            let checked = files.clone();
            blocking(move || Ok(tlsfiles::check_files(&checked)?)).await?;
            (Some(files.cert), Some(files.key))
        }
        None => (None, None),
    };
    let (private, public) = keys::generate_ed25519(&format!("sandboxd@{}", req.name))
        .map_err(SandboxError::KeyGeneration)?;
    Ok(Sandbox {
        name: req.name,
        domain: req.domain,
        backend: req.backend,
        ssh_port: req.ssh_port,
        app_port: req.app_port,
        agent_port: req.agent_port,
        agent_prefix: req.agent_prefix,
        user: req.user,
        client_keys,
        upstream_key: KeyPair {
            private_openssh: private,
            public_openssh: public,
        },
        upstream_host_key,
        basic_auth,
        tls_mode: req.tls_mode,
        tls_cert_file,
        tls_key_file,
        status: req.status,
        addresses: vec![],
        assigned_ipv4: None,
        egress: Default::default(),
        created_at: 0,
        updated_at: 0,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn key(comment: &str) -> String {
        keys::generate_ed25519(comment).unwrap().1
    }

    fn request(keys: Vec<String>) -> NewSandbox {
        NewSandbox {
            name: "web".into(),
            domain: "web.example.com".into(),
            backend: Backend::Static {
                host: "127.0.0.1".into(),
            },
            ssh_port: 22,
            app_port: 8000,
            agent_port: 9999,
            agent_prefix: "shelley".into(),
            user: "root".into(),
            ssh_keys: keys,
            upstream_host_key: None,
            auth: None,
            tls_mode: None,
            tls_cert_file: None,
            tls_key_file: None,
            status: SandboxStatus::Running,
            tls_policy: tlsfiles::Policy {
                default_internal: false,
                internal_suffixes: vec!["test".into()],
            },
        }
    }

    #[test]
    fn key_edits_match_keys_not_comments_and_keep_one() {
        let (a, b) = (key("a"), key("b"));
        let mut current = vec![a.clone()];
        // The same key with another comment is not added twice.
        let a_renamed = format!("{} renamed", a.rsplit_once(' ').unwrap().0);
        add_keys(
            &mut current,
            &keys_to_add(&[a_renamed.clone(), b.clone()]).unwrap(),
        );
        assert_eq!(current.len(), 2);
        assert!(matches!(keys_to_add(&[]), Err(SandboxError::NoKeyGiven)));
        assert!(matches!(
            keys_to_add(&["ssh-ed25519 nonsense".into()]),
            Err(SandboxError::Key(_))
        ));
        // Removal by key line (any comment) or fingerprint.
        let fp = keys::view(&b).fingerprint;
        assert_eq!(
            keys_after_removal("web", &current, &[a_renamed]).unwrap(),
            vec![b.clone()]
        );
        assert_eq!(
            keys_after_removal("web", &current, std::slice::from_ref(&fp)).unwrap(),
            vec![a.clone()]
        );
        assert!(matches!(
            keys_after_removal("web", &current, &[a.clone(), fp]),
            Err(SandboxError::LastKey { .. })
        ));
        assert!(matches!(
            keys_after_removal("web", &current, &["SHA256:nope".into()]),
            Err(SandboxError::KeyNotFound { .. })
        ));
    }

    #[test]
    fn logins_and_ports() {
        let auth = |user: &str, password: &str| SetAuth {
            user: user.into(),
            password: password.into(),
        };
        assert!(check_auth(&auth("admin", "pw")).is_ok());
        for user in ["", "a:b", "a\nb", &"u".repeat(65)] {
            assert!(matches!(
                check_auth(&auth(user, "pw")),
                Err(SandboxError::AuthUser)
            ));
        }
        assert!(matches!(
            check_auth(&auth("admin", "")),
            Err(SandboxError::Password)
        ));
        assert!(check_ports(8000, 9999).is_ok());
        assert!(matches!(
            check_ports(9999, 9999),
            Err(SandboxError::AppPortIsAgentPort(9999))
        ));
    }

    #[tokio::test]
    async fn a_new_record_s_domain_is_normalized() {
        assert_eq!(normalize_domain("\tA.Test \n"), "a.test");
        let mut req = request(vec![key("alice")]);
        req.domain = " Web.Example.COM ".into();
        assert_eq!(new_sandbox(req).await.unwrap().domain, "web.example.com");
    }

    #[tokio::test]
    async fn a_new_record_is_checked_then_made() {
        let sb = new_sandbox(request(vec![key("alice")])).await.unwrap();
        assert_eq!(sb.client_keys.len(), 1);
        assert!(sb.upstream_key.private_openssh.contains("PRIVATE KEY"));
        assert_eq!(
            view(&sb).upstream_public_key,
            sb.upstream_key.public_openssh
        );

        assert!(matches!(
            new_sandbox(request(vec![])).await,
            Err(SandboxError::NoClientKey)
        ));
        let mut internal = request(vec![key("alice")]);
        internal.tls_mode = Some(TlsMode::Internal);
        let err = new_sandbox(internal).await.unwrap_err();
        assert!(
            matches!(err, SandboxError::Tls(TlsError::OutsideInternal { .. })),
            "{err}"
        );
        let mut manual = request(vec![key("alice")]);
        manual.tls_mode = Some(TlsMode::Manual);
        assert!(matches!(
            new_sandbox(manual).await,
            Err(SandboxError::Tls(TlsError::FilesMissing))
        ));
        let mut login = request(vec![key("alice")]);
        login.auth = Some(SetAuth {
            user: "admin".into(),
            password: "correct horse".into(),
        });
        let sb = new_sandbox(login).await.unwrap();
        let stored = sb.basic_auth.unwrap();
        assert_eq!(stored.user, "admin");
        assert!(stored.password_hash.starts_with("$argon2id$"));
        assert!(!stored.password_hash.contains("correct horse"));
    }

    #[tokio::test]
    async fn views_carry_the_same_names_on_the_wire() {
        let mut sb = new_sandbox(request(vec![key("alice")])).await.unwrap();
        let json = serde_json::to_value(view(&sb)).unwrap();
        assert_eq!(json["backend"], "static");
        assert_eq!(json["status"], "running");
        assert_eq!(json["status_reason"], serde_json::Value::Null);
        assert_eq!(json["egress"], serde_json::Value::Null);

        sb.backend = Backend::Incus {
            instance: "sbx-web".into(),
        };
        sb.egress.mode = store::EgressMode::Allowlist;
        for (status, name, reason) in [
            (SandboxStatus::Stopped, "stopped", None),
            (
                SandboxStatus::Creating {
                    step: "launch".into(),
                },
                "creating",
                Some("launch"),
            ),
            (
                SandboxStatus::Failed {
                    reason: "disk full".into(),
                },
                "failed",
                Some("disk full"),
            ),
        ] {
            sb.status = status;
            let v = view(&sb);
            let json = serde_json::to_value(&v).unwrap();
            assert_eq!(json["backend"], "incus");
            assert_eq!(json["upstream"], "sbx-web");
            assert_eq!(json["status"], name);
            assert_eq!(json["status_reason"].as_str(), reason);
            assert_eq!(json["egress"], "allowlist");
            // What an older daemon sent reads back as the same view.
            let back: SandboxView = serde_json::from_value(json).unwrap();
            assert_eq!(back, v);
        }
    }
}
