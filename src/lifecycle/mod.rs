//! The sandbox lifecycle on Incus: the create and import pipelines,
//! start/stop/restart, delete, snapshots, the reconcile of store records
//! with Incus' view, and live figures for `list`/`top`.
//!
//! This module owns the order of the steps and what the store records
//! between them; `incusctl` owns the REST calls, the store owns durability,
//! and the routing snapshot follows the store. It does not watch Incus
//! events itself (see `crate::watcher`) and knows nothing of HTTP (its
//! admin API calls are `crate::admin`'s, their wire types
//! `crate::api::incus`). The rules every sandbox record follows
//! (keys, login, TLS, ports) and its view are `crate::sandbox`'s.
//!
//! Invariants:
//! - a sandbox gets a routable status (`Running` with addresses) only from
//!   the last step of a pipeline, so a failure never leaves a route to a
//!   half-made container; a failed step leaves `Failed { reason }` naming
//!   the step, and running the pipeline again resumes it (every step is
//!   idempotent);
//! - an instance is ours only when its `user.sandboxd.id` equals the id kept
//!   in the store's `lifecycle` collection; anything else with the name is
//!   an untracked instance and is never touched by `create`;
//! - Incus being absent never stops the daemon: every call here answers
//!   "Incus is not running: ..." instead.
//! - a container's login user has only the gateway's key in
//!   `authorized_keys`, and a sandbox made without a login gets a generated
//!   one ([`access`]);
//! - a sandbox's container gets its fixed address, its NIC filters and
//!   its egress rules before its first boot (create) or when adopted
//!   (import), and the reconcile gives them to sandboxes made before they
//!   existed ([`network`]); routes use only that address;
//! - containers come back with the host in their last state: sandboxd
//!   leaves `boot.autostart` unset, which Incus reads as "restore the state
//!   the instance had when incusd stopped" (a sandbox stopped with
//!   `sandboxd stop` stays stopped, a running one starts again).
//!
//! Files: this one holds the [`Lifecycle`] service, its store helpers and
//! the small shared helpers; `create.rs` and `import.rs` the two entry
//! points, which share their start and their record-keeping in
//! `record.rs`; `pipeline.rs` the steps (an enum) and their order, with
//! each step's status and failure recorded; `steps.rs` what each step
//! does; `power.rs` start/stop/restart/delete and the egress change;
//! `snapshots.rs`; `reconcile.rs` (with [`Lifecycle::settle`], the
//! watcher's and the reconcile's only status write); `stats.rs` (live
//! figures and CPU sampling); `progress.rs` ([`Progress`]) and `error.rs`
//! ([`LifecycleError`]).

pub mod access;
mod create;
mod error;
pub mod golden;
mod import;
pub mod netpolicy;
pub mod network;
mod pipeline;
mod power;
mod progress;
mod reconcile;
mod record;
mod snapshots;
mod stats;
mod steps;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use store::{Backend, Sandbox, SandboxStatus, Store};

use crate::config::{IncusConfig, ProvisionConfig, ProvisionMode};
use crate::routes::Routes;

pub use error::LifecycleError;
pub use progress::Progress;
use stats::Samples;

/// Store collection holding each Incus sandbox's lifecycle metadata.
pub const META_COLLECTION: &str = "lifecycle";
/// Instance config key carrying the sandbox id.
pub const ID_KEY: &str = "user.sandboxd.id";
/// Default login user made in new containers.
pub const DEFAULT_USER: &str = "debian";

/// Bound on waiting for a container's first IPv4 address.
const ADDRESS_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on the boot finishing (`systemctl is-system-running --wait`).
const READY_TIMEOUT: Duration = Duration::from_secs(90);
/// Grace period of a clean stop before the instance is killed.
const STOP_GRACE: Duration = Duration::from_secs(30);
/// Bound on the sshd host key appearing.
const HOST_KEY_TIMEOUT: Duration = Duration::from_secs(30);
/// The host key pinned for the upstream leg.
const HOST_KEY_PATH: &str = "/etc/ssh/ssh_host_ed25519_key.pub";
/// Cap on the host key file read from a container (a key line is ~100
/// bytes; the file is the container's to fill).
const MAX_HOST_KEY_FILE: usize = 16 * 1024;
/// Cap on the output of the small commands the pipeline runs itself
/// (`id`, `getent`, `systemctl is-system-running`).
pub(crate) const MAX_SMALL_OUTPUT: usize = 64 * 1024;

type Result<T, E = LifecycleError> = std::result::Result<T, E>;

/// What the store keeps per Incus sandbox besides the routing record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    /// Random id written into the instance as `user.sandboxd.id`.
    pub id: String,
    /// Image the instance was (or is to be) made from; `None` for imports.
    pub image: Option<String>,
    pub cpu: Option<u32>,
    pub memory: Option<String>,
    pub disk: Option<String>,
    /// Provisioning mode of `create` (the daemon's when absent).
    #[serde(default)]
    pub provision: Option<ProvisionMode>,
    /// The container's `authorized_keys` holds only the gateway's key
    /// (false in records of earlier versions: see [`access`]).
    #[serde(default)]
    pub gateway_key_only: bool,
}

/// The lifecycle service shared by the admin API and the watcher.
pub struct Lifecycle {
    store: Arc<Store>,
    routes: Arc<Routes>,
    incus: incusctl::Client,
    default_image: String,
    reconcile_every: Duration,
    provision: ProvisionConfig,
    busy: Mutex<HashSet<String>>,
    samples: Mutex<HashMap<String, Samples>>,
    /// Every sandbox's `authorized_keys` is gateway-only ([`access`]).
    keys_upgraded: std::sync::atomic::AtomicBool,
    /// Which domains may use `internal` TLS mode.
    tls_policy: crate::tlsfiles::Policy,
    /// Egress policy each sandbox's ACL was last written with by this
    /// process (the reconcile writes every one once after a start).
    applied: Mutex<HashMap<String, store::Egress>>,
    /// This daemon's edits of the bridges' egress ACLs, one at a time.
    acl_edits: tokio::sync::Mutex<()>,
}

/// Releases a sandbox name claimed for an operation.
struct Claim {
    lifecycle: Arc<Lifecycle>,
    name: String,
}

impl Drop for Claim {
    fn drop(&mut self) {
        lock(&self.lifecycle.busy).remove(&self.name);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Which socket to use: the configured one, else the first standard one
/// that exists, else the first standard one (so errors name it).
fn socket_path(configured: Option<PathBuf>) -> PathBuf {
    configured.unwrap_or_else(|| {
        incusctl::DEFAULT_SOCKETS
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from(incusctl::DEFAULT_SOCKETS[0]))
    })
}

/// Parses `--image`: a local alias, or `https://SERVER:ALIAS` on a
/// simplestreams server.
pub fn image_source(image: &str) -> Result<incusctl::ImageSource> {
    let image = image.trim();
    if image.is_empty() {
        return Err(LifecycleError::Invalid("empty image name".into()));
    }
    if let Some(rest) = image.strip_prefix("https://") {
        return match rest.rsplit_once(':') {
            Some((server, alias)) if !server.is_empty() && !alias.is_empty() => Ok(
                incusctl::ImageSource::simplestreams(format!("https://{server}"), alias),
            ),
            _ => Err(LifecycleError::Invalid(format!(
                "image {image:?}: a remote image is written https://SERVER:ALIAS"
            ))),
        };
    }
    Ok(incusctl::ImageSource::local(image))
}

/// Addresses of a running instance for the store: IPv4 first, then IPv6.
pub fn addresses_of(state: &incusctl::InstanceState) -> Vec<String> {
    let mut out: Vec<String> = state
        .ipv4_of(incusctl::DEFAULT_NIC)
        .iter()
        .map(ToString::to_string)
        .collect();
    out.extend(
        state
            .ipv6_of(incusctl::DEFAULT_NIC)
            .iter()
            .map(ToString::to_string),
    );
    out
}

fn incus_instance(sb: &Sandbox) -> Option<&str> {
    match &sb.backend {
        Backend::Incus { instance } => Some(instance),
        Backend::Static { .. } => None,
    }
}

fn state_name(status: &SandboxStatus) -> String {
    match status {
        SandboxStatus::Running => "running".into(),
        SandboxStatus::Stopped => "stopped".into(),
        SandboxStatus::Creating { step } => format!("being created (step {step})"),
        SandboxStatus::Failed { reason } => format!("failed ({reason})"),
    }
}

impl Lifecycle {
    /// A lifecycle service; does not contact Incus (the daemon starts and
    /// serves static sandboxes while Incus is absent).
    pub fn new(
        store: Arc<Store>,
        routes: Arc<Routes>,
        config: &IncusConfig,
        provision: ProvisionConfig,
        tls_policy: crate::tlsfiles::Policy,
    ) -> Arc<Self> {
        let options = incusctl::ClientOptions {
            request_timeout: Duration::from_secs(30),
            operation_timeout: Duration::from_secs(180),
        };
        Arc::new(Lifecycle {
            store,
            routes,
            incus: incusctl::Client::lazy(socket_path(config.socket.clone()), options),
            default_image: config.default_image.clone(),
            reconcile_every: Duration::from_secs(config.reconcile_secs),
            provision,
            busy: Mutex::new(HashSet::new()),
            samples: Mutex::new(HashMap::new()),
            keys_upgraded: std::sync::atomic::AtomicBool::new(false),
            tls_policy,
            applied: Mutex::new(HashMap::new()),
            acl_edits: tokio::sync::Mutex::new(()),
        })
    }

    /// The Incus client (for the watcher).
    pub fn incus(&self) -> &incusctl::Client {
        &self.incus
    }

    /// Period of the full reconcile.
    pub fn reconcile_every(&self) -> Duration {
        self.reconcile_every
    }

    fn claim(self: &Arc<Self>, name: &str) -> Result<Claim> {
        if !lock(&self.busy).insert(name.to_string()) {
            return Err(LifecycleError::Busy(name.to_string()));
        }
        Ok(Claim {
            lifecycle: self.clone(),
            name: name.to_string(),
        })
    }

    // ----- store helpers ---------------------------------------------------

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, store::Error> + Send + 'static,
    ) -> Result<T> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| LifecycleError::Internal(format!("store worker failed: {e}")))?
            .map_err(Into::into)
    }

    /// Writes through `f` and waits until the routing snapshot shows it.
    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<(T, u64), store::Error> + Send + 'static,
    ) -> Result<T> {
        let (value, seq) = self.blocking(f).await?;
        self.routes.wait_applied(seq).await;
        Ok(value)
    }

    async fn get(&self, name: &str) -> Result<Option<Sandbox>> {
        let n = name.to_string();
        self.blocking(move |s| s.get(&n)).await
    }

    async fn get_incus(&self, name: &str) -> Result<(Sandbox, String)> {
        let sb = self
            .get(name)
            .await?
            .ok_or_else(|| store::Error::NotFound(name.to_string()))?;
        let instance = incus_instance(&sb)
            .ok_or_else(|| LifecycleError::NotIncus(name.to_string()))?
            .to_string();
        Ok((sb, instance))
    }

    async fn meta(&self, name: &str) -> Result<Option<Meta>> {
        let n = name.to_string();
        let raw = self
            .blocking(move |s| s.get_record(META_COLLECTION, &n))
            .await?;
        Ok(raw.and_then(|v| serde_json::from_value(v).ok()))
    }

    async fn put_meta(&self, name: &str, meta: &Meta) -> Result<()> {
        let n = name.to_string();
        let v = serde_json::to_value(meta).map_err(|e| LifecycleError::Internal(e.to_string()))?;
        self.blocking(move |s| s.put_record(META_COLLECTION, &n, &v))
            .await
    }

    /// Sets the status (and, when given, the addresses) of a sandbox.
    async fn set_status(
        &self,
        name: &str,
        status: SandboxStatus,
        addresses: Option<Vec<String>>,
    ) -> Result<Sandbox> {
        let n = name.to_string();
        self.write(move |s| {
            s.update(&n, |sb| {
                sb.status = status.clone();
                if let Some(a) = &addresses {
                    sb.addresses = a.clone();
                }
                Ok(())
            })
        })
        .await
    }

    async fn require(&self, name: &str) -> Result<Sandbox> {
        Ok(self
            .get(name)
            .await?
            .ok_or_else(|| store::Error::NotFound(name.to_string()))?)
    }
}

fn random_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn image_sources() {
        assert_eq!(
            image_source("test/debian-ssh").unwrap(),
            incusctl::ImageSource::local("test/debian-ssh")
        );
        assert_eq!(
            image_source("https://images.example:8443:debian/12").unwrap(),
            incusctl::ImageSource::simplestreams("https://images.example:8443", "debian/12")
        );
        assert!(image_source("https://nowhere").is_err());
        assert!(image_source(" ").is_err());
    }
}
