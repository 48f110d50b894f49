//! Who gets into an Incus sandbox: the agent host's generated login and the
//! login user's `authorized_keys`.
//!
//! - `create` and `import` without a login make one: user [`LOGIN_USER`]
//!   and a random password of [`PASSWORD_LEN`] alphanumeric characters from
//!   the OS's random source (about 143 bits), stored as an argon2id hash
//!   like any other. The plain password leaves the daemon once, in the
//!   operation's event stream ([`crate::api::Event::Login`]), and is never
//!   logged.
//! - Client keys never go into the container: the login user's
//!   `authorized_keys` holds only the gateway's own per-sandbox key
//!   ([`authorized_keys`]), so `key remove` is the whole revocation and no
//!   client key works on the container's sshd directly. The file is
//!   written whole by the pipeline's `keys` step; sandboxes made by earlier
//!   versions (whose file also held the client keys) get it rewritten once
//!   by [`super::Lifecycle::upgrade_authorized_keys`], run after each
//!   reconcile until every running sandbox is done (a stopped one is done
//!   once it runs; a restore makes it look again). The rewrite puts the gateway's key in, so it cannot
//!   lock the gateway out, and running it again changes nothing; the
//!   lifecycle record's `gateway_key_only` marks it done (new sandboxes
//!   carry it from the start), after which sandboxd leaves the file alone.

use rand::Rng;
use store::{Sandbox, SandboxStatus};

use super::{incus_instance, lock, Lifecycle, LifecycleError, Meta, Result, META_COLLECTION};
use crate::api::SetAuth;

/// User name of a generated agent-host login.
pub const LOGIN_USER: &str = "admin";
/// Length of a generated password (alphanumeric: log2(62) ≈ 5.95 bits per
/// character, 24 characters ≈ 143 bits).
pub const PASSWORD_LEN: usize = 24;

/// A fresh agent-host login with a password from the OS's random source.
pub fn generated_login() -> SetAuth {
    let password: String = rand::rngs::OsRng
        .sample_iter(&rand::distributions::Alphanumeric)
        .take(PASSWORD_LEN)
        .map(char::from)
        .collect();
    SetAuth {
        user: LOGIN_USER.to_string(),
        password,
    }
}

/// The whole `authorized_keys` of a sandbox's login user: the gateway's key
/// and nothing else.
pub fn authorized_keys(sb: &Sandbox) -> String {
    format!(
        "# managed by sandboxd: only the gateway's key; client keys stay in the gateway\n{}\n",
        sb.upstream_key.public_openssh.trim()
    )
}

/// Shell script printing `UID GID HOME` of user `u` after making sure its
/// `~/.ssh` exists (0700, owned by the user); with `create`, the user is
/// made first when missing. `u` must be a validated login name.
pub(super) fn account_script(u: &str, create: bool) -> String {
    let make = if create {
        format!("id -u {u} >/dev/null 2>&1 || useradd -m -s /bin/bash {u}; ")
    } else {
        String::new()
    };
    format!(
        "set -e; {make}home=$(getent passwd {u} | cut -d: -f6); \
         install -d -m 700 -o {u} -g $(id -g {u}) \"$home/.ssh\"; \
         printf '%s %s %s\\n' $(id -u {u}) $(id -g {u}) \"$home\""
    )
}

/// Parses what [`account_script`] printed.
pub(super) fn parse_account(user: &str, text: &str) -> Result<(u32, u32, String)> {
    let mut parts = text.split_whitespace();
    match (
        parts.next().and_then(|p| p.parse().ok()),
        parts.next().and_then(|p| p.parse().ok()),
        parts.next(),
    ) {
        (Some(uid), Some(gid), Some(home)) => Ok((uid, gid, home.to_string())),
        _ => Err(LifecycleError::Invalid(format!(
            "cannot read uid, gid and home of {user}: {:?}",
            text.chars().take(200).collect::<String>()
        ))),
    }
}

impl Lifecycle {
    /// Writes the gateway-only `authorized_keys` of `sb`'s login user in
    /// `instance`, whose uid, gid and home are given.
    pub(super) async fn write_authorized_keys(
        &self,
        instance: &str,
        sb: &Sandbox,
        (uid, gid, home): (u32, u32, &str),
    ) -> Result<()> {
        self.incus
            .push_file(
                instance,
                &format!("{}/.ssh/authorized_keys", home.trim_end_matches('/')),
                authorized_keys(sb).into_bytes(),
                &incusctl::PushOptions::mode(0o600).owner(uid, gid),
            )
            .await?;
        Ok(())
    }

    /// Rewrites `authorized_keys` to the gateway's key alone in every
    /// running Incus sandbox whose record does not say it was done (made by
    /// an earlier version, which put the client keys there too). Errors
    /// are logged and the sandbox is tried again after the next reconcile.
    pub async fn upgrade_authorized_keys(&self) {
        if self
            .keys_upgraded
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return;
        }
        let pending = match self.keys_pending().await {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(error = %e, "cannot list sandboxes for the authorized_keys upgrade");
                return;
            }
        };
        let mut left = false;
        for (sb, mut meta) in pending {
            let Some(instance) = incus_instance(&sb).map(str::to_string) else {
                continue;
            };
            if sb.status != SandboxStatus::Running || lock(&self.busy).contains(&sb.name) {
                left = true;
                continue;
            }
            match self.rewrite_keys(&instance, &sb).await {
                Ok(()) => {
                    meta.gateway_key_only = true;
                    if let Err(e) = self.put_meta(&sb.name, &meta).await {
                        tracing::warn!(sandbox = %sb.name, error = %e, "cannot record the authorized_keys upgrade");
                        left = true;
                        continue;
                    }
                    tracing::info!(sandbox = %sb.name, "authorized_keys now holds only the gateway's key (client keys written by an earlier version removed)");
                }
                Err(e) => {
                    left = true;
                    tracing::warn!(sandbox = %sb.name, error = %e, "cannot rewrite authorized_keys; trying again after the next reconcile");
                }
            }
        }
        if !left {
            self.keys_upgraded
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Makes the next reconcile look for sandboxes to upgrade again (after
    /// a restore, which may bring records of an earlier version).
    pub fn recheck_authorized_keys(&self) {
        self.keys_upgraded
            .store(false, std::sync::atomic::Ordering::Relaxed);
    }

    /// Settled Incus sandboxes whose lifecycle record lacks
    /// `gateway_key_only`, with that record.
    async fn keys_pending(&self) -> Result<Vec<(Sandbox, Meta)>> {
        let sandboxes = self.blocking(|s| s.list()).await?;
        let mut out = Vec::new();
        for sb in sandboxes {
            if incus_instance(&sb).is_none()
                || !matches!(sb.status, SandboxStatus::Running | SandboxStatus::Stopped)
            {
                continue;
            }
            let name = sb.name.clone();
            let raw = self
                .blocking(move |s| s.get_record(META_COLLECTION, &name))
                .await?;
            let Some(meta) = raw.and_then(|v| serde_json::from_value::<Meta>(v).ok()) else {
                continue;
            };
            if !meta.gateway_key_only {
                out.push((sb, meta));
            }
        }
        Ok(out)
    }

    async fn rewrite_keys(&self, instance: &str, sb: &Sandbox) -> Result<()> {
        let out = self
            .incus
            .exec_ok(
                instance,
                &incusctl::ExecRequest::shell(account_script(&sb.user, false))
                    .max_output(super::MAX_SMALL_OUTPUT),
            )
            .await?;
        let (uid, gid, home) = parse_account(&sb.user, &out.stdout_text())?;
        self.write_authorized_keys(instance, sb, (uid, gid, &home))
            .await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn generated_passwords_are_long_alphanumeric_and_differ() {
        let a = generated_login();
        let b = generated_login();
        assert_eq!(a.user, LOGIN_USER);
        assert_eq!(a.password.len(), PASSWORD_LEN);
        assert!(a.password.chars().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(a.password, b.password);
    }

    #[test]
    fn account_lines_parse() {
        assert_eq!(
            parse_account("debian", "1000 1000 /home/debian\n").unwrap(),
            (1000, 1000, "/home/debian".to_string())
        );
        assert!(parse_account("debian", "no such user").is_err());
    }
}
