//! The sandbox lifecycle on Incus: the create and import pipelines,
//! start/stop/restart, delete, snapshots, the reconcile of store records
//! with Incus' view, and live figures for `list`/`top`.
//!
//! This module owns the order of the steps and what the store records
//! between them; `incusctl` owns the REST calls, the store owns durability,
//! and the routing snapshot follows the store. It does not watch Incus
//! events itself (see `crate::watcher`) and knows nothing of HTTP (see
//! [`http`]).
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

pub mod access;
pub mod golden;
pub mod http;
pub mod netpolicy;
pub mod network;
pub mod wire;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use store::{Backend, Sandbox, SandboxStatus, Store};
use tokio::sync::mpsc;

use crate::api::{Event, SandboxView};
use crate::config::{IncusConfig, ProvisionConfig, ProvisionMode};
use crate::routes::Routes;
use wire::{
    CreateSandbox, ImportSandbox, SandboxStats, SnapshotView, StatsAnswer, UnmanagedInstance,
};

/// Store collection holding each Incus sandbox's lifecycle metadata.
pub const META_COLLECTION: &str = "lifecycle";
/// Store collection of certificates, keyed by host name.
pub const CERTS_COLLECTION: &str = "certs";
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

const CREATE_STEPS: [&str; 10] = [
    "create",
    "start",
    "address",
    "ready",
    "provision",
    "user",
    "keys",
    "host-key",
    "baseline",
    "live",
];
const IMPORT_STEPS: [&str; 8] = [
    "adopt", "start", "address", "ready", "user", "keys", "host-key", "live",
];

/// Why a lifecycle call failed.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    /// What Incus said (including "Incus is not running: ...").
    #[error("{0}")]
    Incus(#[from] incusctl::Error),
    #[error("{0}")]
    Store(#[from] store::Error),
    #[error("{0}")]
    Invalid(String),
    #[error("an Incus instance named {0} already exists and sandboxd does not manage it (adopt it with `sandboxd import {0} --domain ...`, or pick another name)")]
    Untracked(String),
    #[error("sandbox {0} is busy with another lifecycle operation; try again when it ends")]
    Busy(String),
    #[error("sandbox {0} is not an Incus sandbox (use `sandboxd remove` for static ones)")]
    NotIncus(String),
    #[error("sandbox {name} is {state}; {hint}")]
    WrongState {
        name: String,
        state: String,
        hint: &'static str,
    },
    /// A pipeline step failed; the sandbox is recorded as failed.
    #[error("{what} of {name} failed at step {step}: {source}")]
    Step {
        what: &'static str,
        name: String,
        step: &'static str,
        #[source]
        source: Box<LifecycleError>,
    },
    #[error("{0}")]
    Internal(String),
}

impl LifecycleError {
    /// Stable error code and HTTP status for the admin API.
    pub fn classify(&self) -> (u16, &'static str) {
        match self {
            LifecycleError::Incus(e) if e.is_not_running() => (503, "incus_not_running"),
            LifecycleError::Incus(e) if e.is_not_found() => (404, "incus_not_found"),
            LifecycleError::Incus(e) if e.is_conflict() => (409, "incus_conflict"),
            LifecycleError::Incus(e) if e.is_timeout() => (504, "incus_timeout"),
            LifecycleError::Incus(e) if e.is_too_large() => (502, "container_data_too_large"),
            LifecycleError::Incus(_) => (502, "incus_error"),
            LifecycleError::Store(e) => {
                use store::Error as E;
                let status = match e {
                    E::Invalid { .. } => 400,
                    E::NameTaken(_) | E::HostTaken { .. } => 409,
                    E::NotFound(_) => 404,
                    _ => 500,
                };
                (status, e.code())
            }
            LifecycleError::Invalid(_) => (400, "invalid_argument"),
            LifecycleError::Untracked(_) => (409, "untracked_instance"),
            LifecycleError::Busy(_) => (409, "busy"),
            LifecycleError::NotIncus(_) => (400, "not_incus"),
            LifecycleError::WrongState { .. } => (409, "wrong_state"),
            LifecycleError::Step { source, .. } => source.classify(),
            LifecycleError::Internal(_) => (500, "internal"),
        }
    }
}

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

/// One CPU sample of an instance.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    cpu_ns: u64,
}

/// The two latest CPU samples of an instance kept at least
/// [`MIN_CPU_WINDOW`] apart: whenever a reading comes, one of them is at
/// least that old, so a figure can be given.
#[derive(Debug, Clone, Copy)]
struct Samples {
    older: Option<Sample>,
    newer: Sample,
}

/// Shortest span a CPU % is computed over.
const MIN_CPU_WINDOW: Duration = Duration::from_millis(200);

/// See [`Lifecycle::cpu_sample`].
fn record_cpu(
    samples: &mut HashMap<String, Samples>,
    instance: &str,
    reading: Sample,
) -> Option<f64> {
    let Some(s) = samples.get_mut(instance) else {
        samples.insert(
            instance.to_string(),
            Samples {
                older: None,
                newer: reading,
            },
        );
        return None;
    };
    if reading.cpu_ns < s.newer.cpu_ns {
        // The counter went back: the container restarted. Start over.
        *s = Samples {
            older: None,
            newer: reading,
        };
        return None;
    }
    let since = |p: &Sample| reading.at.saturating_duration_since(p.at);
    let base = [Some(s.newer), s.older]
        .into_iter()
        .flatten()
        .find(|p| since(p) >= MIN_CPU_WINDOW);
    let pct = base.map(|p| incusctl::cpu_percent(p.cpu_ns, reading.cpu_ns, since(&p)));
    if since(&s.newer) >= MIN_CPU_WINDOW {
        s.older = Some(s.newer);
        s.newer = reading;
    }
    pct
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

/// Marks a sandbox busy for the reconcile's own work; skipped when a
/// lifecycle operation holds it.
struct BusyGuard<'a> {
    set: &'a Mutex<HashSet<String>>,
    name: String,
}

impl<'a> BusyGuard<'a> {
    fn try_new(set: &'a Mutex<HashSet<String>>, name: &str) -> Option<Self> {
        if !lock(set).insert(name.to_string()) {
            return None;
        }
        Some(BusyGuard {
            set,
            name: name.to_string(),
        })
    }
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        lock(self.set).remove(&self.name);
    }
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

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
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

/// The progress sink of a streamed operation; sending never fails the
/// operation (a CLI that went away does not stop a create).
#[derive(Clone)]
pub struct Progress(Option<mpsc::Sender<Event>>);

impl Progress {
    pub fn new(tx: mpsc::Sender<Event>) -> Self {
        Progress(Some(tx))
    }

    pub fn none() -> Self {
        Progress(None)
    }

    async fn send(&self, event: Event) {
        if let Some(tx) = &self.0 {
            let _ = tx.send(event).await;
        }
    }

    async fn step(&self, step: &str, done: u64, total: u64) {
        self.send(Event::Progress {
            step: step.to_string(),
            done,
            total,
        })
        .await;
    }

    async fn message(&self, text: impl Into<String>) {
        self.send(Event::Message { text: text.into() }).await;
    }

    /// Hands a generated login to the caller (the one place its password
    /// goes; it is in no log line).
    async fn login(&self, login: Option<crate::api::SetAuth>) {
        if let Some(l) = login {
            self.send(Event::Login {
                user: l.user,
                password: crate::api::Secret(l.password),
            })
            .await;
        }
    }
}

/// Everything the provisioning steps need, resolved before they run.
struct Plan {
    name: String,
    instance: String,
    meta: Meta,
    /// Create (`true`) or adopt (`false`).
    create: bool,
    /// Per-request provisioning inputs (LLM key, hook).
    extras: golden::Extras,
}

/// A new sandbox's certificate settings as the request gave them; checked
/// with `add`'s rules by [`crate::admin::new_sandbox`].
#[derive(Debug, Default)]
struct Tls {
    mode: Option<String>,
    cert_file: Option<String>,
    key_file: Option<String>,
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

    /// Like [`Lifecycle::set_status`], only while the sandbox is settled
    /// (running or stopped) and only when something changes; returns
    /// whether it wrote. Used by the watcher and reconcile, which must not
    /// overwrite a pipeline's or a delete's status.
    pub async fn settle(
        &self,
        name: &str,
        status: SandboxStatus,
        addresses: Vec<String>,
    ) -> Result<bool> {
        let n = name.to_string();
        let outcome = self
            .write(move |s| {
                s.update(&n, |sb| {
                    let settled =
                        matches!(sb.status, SandboxStatus::Running | SandboxStatus::Stopped);
                    if !settled || (sb.status == status && sb.addresses == addresses) {
                        return Err(store::Error::Invalid {
                            field: "status",
                            reason: "unchanged".into(),
                        });
                    }
                    sb.status = status.clone();
                    sb.addresses = addresses.clone();
                    Ok(())
                })
            })
            .await;
        match outcome {
            Ok(_) => Ok(true),
            Err(LifecycleError::Store(store::Error::Invalid {
                field: "status", ..
            })) => Ok(false),
            Err(e) => Err(e),
        }
    }

    // ----- create and import ------------------------------------------------

    /// `sandboxd create`: preflight (nothing stored on failure), record,
    /// then the provisioning steps. Running it again for a sandbox that
    /// failed or was interrupted resumes it with the settings recorded by
    /// the first run (domain, image, limits, auth, TLS mode and files): the
    /// request's own are not read then.
    pub async fn create(
        self: &Arc<Self>,
        req: CreateSandbox,
        progress: Progress,
    ) -> Result<SandboxView> {
        store::validate_name(&req.name)?;
        let name = req.name.clone();
        let mode = req.provision;
        let extras = golden::Extras {
            llm: req.llm.clone(),
            hook: req.hook.clone(),
        };
        let egress = egress_of(req.egress.as_ref())?;
        let _claim = self.claim(&name)?;
        // Incus must answer before anything is stored.
        self.incus.server_info().await?;

        if let Some(existing) = self.get(&name).await? {
            let meta = self.meta(&name).await?;
            let resumable = matches!(
                existing.status,
                SandboxStatus::Creating { .. } | SandboxStatus::Failed { .. }
            ) && incus_instance(&existing) == Some(name.as_str());
            return match (resumable, meta) {
                (true, Some(meta)) if meta.image.is_some() => {
                    progress
                        .message(format!(
                            "resuming the creation of {name} (was {}); the stored settings apply",
                            state_name(&existing.status)
                        ))
                        .await;
                    let plan = Plan {
                        name: name.clone(),
                        instance: name.clone(),
                        meta,
                        create: true,
                        extras,
                    };
                    self.provision(plan, progress).await
                }
                _ => Err(store::Error::NameTaken(name).into()),
            };
        }

        let domain = req.domain.trim().to_ascii_lowercase();
        store::validate_domain(&domain)?;
        let user = req.user.clone().unwrap_or_else(|| DEFAULT_USER.to_string());
        store::validate_user(&user)?;
        let image = req
            .image
            .clone()
            .unwrap_or_else(|| self.default_image.clone());
        let source = image_source(&image)?;
        if let Some(size) = &req.memory {
            check_size("memory", size)?;
        }
        if let Some(size) = &req.disk {
            check_size("disk", size)?;
        }
        if req.cpu == Some(0) {
            return Err(LifecycleError::Invalid("--cpu must be at least 1".into()));
        }
        let generated = req.auth.is_none().then(access::generated_login);
        let mut sandbox = self
            .new_record(
                &name,
                &domain,
                &user,
                &req.ssh_keys,
                req.app_port,
                req.auth.clone().or_else(|| generated.clone()),
                Tls {
                    mode: req.tls_mode.clone(),
                    cert_file: req.tls_cert_file.clone(),
                    key_file: req.tls_key_file.clone(),
                },
            )
            .await?;
        sandbox.egress = egress;
        if self.incus.instance_exists(&name).await? {
            return Err(LifecycleError::Untracked(name));
        }
        if let incusctl::ImageSource::LocalAlias(alias) = &source {
            self.incus.image_alias(alias).await?;
        }

        let meta = Meta {
            id: random_id(),
            image: Some(image),
            cpu: req.cpu,
            memory: req.memory.clone(),
            disk: req.disk.clone(),
            provision: mode,
            gateway_key_only: true,
        };
        self.put_meta(&name, &meta).await?;
        if let Err(e) = self
            .write(move |s| s.insert(sandbox).map(|seq| ((), seq)))
            .await
        {
            let n = name.clone();
            let _ = self
                .blocking(move |s| s.delete_record(META_COLLECTION, &n))
                .await;
            return Err(e);
        }
        progress.login(generated).await;
        tracing::info!(sandbox = %name, "sandbox recorded; creating its container");
        let plan = Plan {
            name: name.clone(),
            instance: name,
            meta,
            create: true,
            extras,
        };
        self.provision(plan, progress).await
    }

    /// `sandboxd import INSTANCE --domain ...`: adopts an untracked
    /// instance (installs the gateway key, pins the host key).
    pub async fn import(
        self: &Arc<Self>,
        req: ImportSandbox,
        progress: Progress,
    ) -> Result<SandboxView> {
        let name = req.instance.clone();
        store::validate_name(&name).map_err(|e| {
            LifecycleError::Invalid(format!(
                "instance {name:?} cannot be a sandbox name (the SSH user name): {e}"
            ))
        })?;
        let egress = egress_of(req.egress.as_ref())?;
        let _claim = self.claim(&name)?;
        self.incus.server_info().await?;
        if let Some(existing) = self.get(&name).await? {
            let meta = self.meta(&name).await?;
            let resumable = matches!(
                existing.status,
                SandboxStatus::Creating { .. } | SandboxStatus::Failed { .. }
            );
            return match (resumable, meta) {
                (true, Some(meta)) if meta.image.is_none() => {
                    progress
                        .message(format!("resuming the import of {name}"))
                        .await;
                    let plan = Plan {
                        name: name.clone(),
                        instance: name,
                        meta,
                        create: false,
                        extras: golden::Extras::default(),
                    };
                    self.provision(plan, progress).await
                }
                _ => Err(store::Error::NameTaken(name).into()),
            };
        }
        let instance = self.incus.instance(&name).await?;
        if instance.kind != "container" {
            return Err(LifecycleError::Invalid(format!(
                "instance {name} is a {}; sandboxd manages containers",
                instance.kind
            )));
        }
        let domain = req.domain.trim().to_ascii_lowercase();
        store::validate_domain(&domain)?;
        let user = req.user.clone().unwrap_or_else(|| DEFAULT_USER.to_string());
        store::validate_user(&user)?;
        let generated = req.auth.is_none().then(access::generated_login);
        let mut sandbox = self
            .new_record(
                &name,
                &domain,
                &user,
                &req.ssh_keys,
                req.app_port,
                req.auth.clone().or_else(|| generated.clone()),
                Tls {
                    mode: req.tls_mode.clone(),
                    cert_file: req.tls_cert_file.clone(),
                    key_file: req.tls_key_file.clone(),
                },
            )
            .await?;
        sandbox.egress = egress;
        let meta = Meta {
            id: random_id(),
            image: None,
            cpu: None,
            memory: None,
            disk: None,
            provision: None,
            gateway_key_only: true,
        };
        self.put_meta(&name, &meta).await?;
        if let Err(e) = self
            .write(move |s| s.insert(sandbox).map(|seq| ((), seq)))
            .await
        {
            let n = name.clone();
            let _ = self
                .blocking(move |s| s.delete_record(META_COLLECTION, &n))
                .await;
            return Err(e);
        }
        progress.login(generated).await;
        tracing::info!(sandbox = %name, "adopting instance");
        let plan = Plan {
            name: name.clone(),
            instance: name,
            meta,
            create: false,
            extras: golden::Extras::default(),
        };
        self.provision(plan, progress).await
    }

    /// A new record in state `Creating`, not stored yet.
    #[allow(clippy::too_many_arguments)]
    async fn new_record(
        &self,
        name: &str,
        domain: &str,
        user: &str,
        ssh_keys: &[String],
        app_port: Option<u16>,
        auth: Option<crate::api::SetAuth>,
        tls: Tls,
    ) -> Result<Sandbox> {
        let sandbox = crate::admin::new_sandbox(crate::admin::NewSandbox {
            name: name.to_string(),
            domain: domain.to_string(),
            backend: Backend::Incus {
                instance: name.to_string(),
            },
            ssh_port: store::DEFAULT_SSH_PORT,
            app_port: app_port.unwrap_or(store::DEFAULT_APP_PORT),
            agent_port: store::DEFAULT_AGENT_PORT,
            agent_prefix: store::DEFAULT_AGENT_PREFIX.to_string(),
            user: user.to_string(),
            ssh_keys: ssh_keys.to_vec(),
            upstream_host_key: None,
            auth,
            tls_mode: tls.mode,
            tls_cert_file: tls.cert_file,
            tls_key_file: tls.key_file,
            status: SandboxStatus::Creating {
                step: "record".into(),
            },
            tls_policy: self.tls_policy.clone(),
        })
        .await
        .map_err(|e| {
            if e.status == ::http::StatusCode::BAD_REQUEST {
                LifecycleError::Invalid(e.message)
            } else {
                LifecycleError::Internal(e.message)
            }
        })?;
        // Shape problems (domain taken is checked by the insert itself).
        sandbox.validate()?;
        if let Some(owner) = {
            let d = domain.to_string();
            self.blocking(move |s| s.owner_of_host(&d)).await?
        } {
            return Err(store::Error::HostTaken {
                host: domain.to_string(),
                owner,
            }
            .into());
        }
        Ok(sandbox)
    }

    /// Runs the steps of `plan`, recording each; a failure records
    /// `Failed { reason }` with the step and returns it.
    async fn provision(&self, plan: Plan, progress: Progress) -> Result<SandboxView> {
        let steps: &[&'static str] = if plan.create {
            &CREATE_STEPS
        } else {
            &IMPORT_STEPS
        };
        let what = if plan.create { "create" } else { "import" };
        let total = steps.len() as u64;
        let started = Instant::now();
        let mut ctx = StepState::default();
        for (i, step) in steps.iter().enumerate() {
            self.set_status(
                &plan.name,
                SandboxStatus::Creating {
                    step: (*step).to_string(),
                },
                None,
            )
            .await?;
            progress.step(step, i as u64 + 1, total).await;
            let t = Instant::now();
            if let Err(e) = self.run_step(step, &plan, &mut ctx, &progress).await {
                let reason = format!("{what} failed at step {step}: {e}");
                tracing::warn!(sandbox = %plan.name, %reason, "lifecycle step failed");
                if let Err(store_err) = self
                    .set_status(&plan.name, SandboxStatus::Failed { reason }, Some(vec![]))
                    .await
                {
                    tracing::error!(sandbox = %plan.name, error = %store_err, "cannot record the failure");
                }
                return Err(LifecycleError::Step {
                    what,
                    name: plan.name.clone(),
                    step,
                    source: Box::new(e),
                });
            }
            tracing::debug!(sandbox = %plan.name, step, elapsed = ?t.elapsed(), "step done");
        }
        tracing::info!(sandbox = %plan.name, elapsed = ?started.elapsed(), "sandbox live");
        let sb = self
            .get(&plan.name)
            .await?
            .ok_or_else(|| store::Error::NotFound(plan.name.clone()))?;
        Ok(crate::admin::view(&sb))
    }

    async fn run_step(
        &self,
        step: &str,
        plan: &Plan,
        ctx: &mut StepState,
        progress: &Progress,
    ) -> Result<()> {
        let inst = plan.instance.as_str();
        match step {
            "create" => self.step_create(plan, progress).await,
            "adopt" => {
                let i = self.incus.instance(inst).await?;
                match i.config.get(ID_KEY) {
                    Some(id) if *id != plan.meta.id => Err(LifecycleError::Untracked(format!(
                        "{inst} (it carries another sandboxd id)"
                    ))),
                    _ => {
                        let mut cfg = std::collections::BTreeMap::new();
                        cfg.insert(ID_KEY.to_string(), plan.meta.id.clone());
                        self.incus.update_config(inst, &cfg).await?;
                        let (ip, restart) = self.isolate_instance(&plan.name, inst).await?;
                        progress.message(format!("fixed address {ip}")).await;
                        if restart {
                            progress
                                .message(format!(
                                    "restarting {inst} so that it takes its fixed address"
                                ))
                                .await;
                            self.incus
                                .restart(inst, incusctl::StopOptions::graceful(STOP_GRACE))
                                .await?;
                        }
                        Ok(())
                    }
                }
            }
            "start" => Ok(self.incus.start(inst).await?),
            "address" => {
                let ip = self.wait_address(&plan.name, inst).await?;
                progress.message(format!("address {ip}")).await;
                Ok(())
            }
            "ready" => self.wait_booted(inst, progress).await,
            "provision" => {
                let mode = plan.meta.provision.unwrap_or(self.provision.mode);
                let image = plan.meta.image.clone().unwrap_or_default();
                let Some(phase) = self.phase_for(mode, &image).await? else {
                    progress.message("provisioning: none asked").await;
                    return Ok(());
                };
                let sb = self.require(&plan.name).await?;
                let p = self.plan_for(phase, Some(&sb.user), sb.agent_port, &plan.extras)?;
                progress
                    .message(format!(
                        "provisioning: {} steps",
                        match phase {
                            crate::provision::Phase::Sandbox => "per-sandbox",
                            _ => "all",
                        }
                    ))
                    .await;
                self.run_plan(inst, &p, progress).await?;
                Ok(())
            }
            "baseline" => {
                let mode = plan.meta.provision.unwrap_or(self.provision.mode);
                if mode == ProvisionMode::None {
                    return Ok(());
                }
                self.baseline(inst, progress).await
            }
            "user" => {
                let sb = self.require(&plan.name).await?;
                // A validated login name: safe inside the script.
                let script = access::account_script(&sb.user, true);
                let out = self
                    .incus
                    .exec_ok(
                        inst,
                        &incusctl::ExecRequest::shell(script).max_output(MAX_SMALL_OUTPUT),
                    )
                    .await?;
                ctx.user = Some(access::parse_account(&sb.user, &out.stdout_text())?);
                Ok(())
            }
            "keys" => {
                let sb = self.require(&plan.name).await?;
                let Some((uid, gid, home)) = ctx.user.clone() else {
                    return Err(LifecycleError::Internal("user step skipped".into()));
                };
                // Only the gateway's key: client keys stay in the gateway.
                self.write_authorized_keys(inst, &sb, (uid, gid, &home))
                    .await
            }
            "host-key" => {
                let f = self
                    .incus
                    .pull_file_when_ready(
                        inst,
                        HOST_KEY_PATH,
                        MAX_HOST_KEY_FILE,
                        Duration::from_millis(200),
                        HOST_KEY_TIMEOUT,
                    )
                    .await?;
                let text = String::from_utf8_lossy(&f.data).to_string();
                let key = crate::keys::parse_public(&text).map_err(|e| {
                    LifecycleError::Invalid(format!("host key {HOST_KEY_PATH}: {e}"))
                })?;
                let line = crate::keys::to_line(&key);
                let n = plan.name.clone();
                self.write(move |s| {
                    s.update(&n, |sb| {
                        sb.upstream_host_key = Some(line.clone());
                        Ok(())
                    })
                })
                .await?;
                Ok(())
            }
            "live" => {
                let st = self.incus.instance_state(inst).await?;
                let addrs = addresses_of(&st);
                let sb = self.require(&plan.name).await?;
                let assigned = sb.assigned_ipv4.clone().unwrap_or_default();
                if !addrs.contains(&assigned) {
                    return Err(LifecycleError::Invalid(format!(
                        "the container does not carry its fixed address {assigned:?}"
                    )));
                }
                self.set_status(&plan.name, SandboxStatus::Running, Some(addrs))
                    .await?;
                Ok(())
            }
            other => Err(LifecycleError::Internal(format!("unknown step {other}"))),
        }
    }

    async fn require(&self, name: &str) -> Result<Sandbox> {
        Ok(self
            .get(name)
            .await?
            .ok_or_else(|| store::Error::NotFound(name.to_string()))?)
    }

    async fn step_create(&self, plan: &Plan, progress: &Progress) -> Result<()> {
        let inst = plan.instance.as_str();
        match self.incus.instance(inst).await {
            Ok(i) => {
                if i.config.get(ID_KEY) != Some(&plan.meta.id) {
                    return Err(LifecycleError::Untracked(inst.to_string()));
                }
                if i.status != "Error" {
                    progress
                        .message(format!("container {inst} exists already ({})", i.status))
                        .await;
                    return Ok(());
                }
                progress
                    .message(format!("container {inst} is broken; making it again"))
                    .await;
                self.incus.delete_instance(inst, true).await?;
            }
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
        // The address and egress policy exist before the container does, so
        // that its first DHCP lease is its fixed address and its first
        // packet is filtered. Incus refuses, when the container starts, an
        // address another NIC has (a daemon with another store on the same
        // bridge took it meanwhile): then again with another address.
        let (bridge, base) = self.bridge_of(None).await?;
        let mut refused = HashSet::new();
        for attempt in 1..=3 {
            let ip = self
                .assign_address(&plan.name, inst, &bridge, None, &refused)
                .await?;
            let sb = self.require(&plan.name).await?;
            self.apply_egress(&sb, &bridge).await?;
            progress
                .message(format!(
                    "fixed address {ip} on {}, egress {}",
                    bridge.name,
                    sb.egress.mode.as_str()
                ))
                .await;
            match self
                .create_container(plan, &sb, &base, &bridge, ip, progress)
                .await
            {
                Err(LifecycleError::Incus(e))
                    if attempt < 3 && e.to_string().contains("already defined on another NIC") =>
                {
                    progress
                        .message(format!("{ip} is taken on {}; another address", bridge.name))
                        .await;
                    refused.insert(ip);
                    match self.incus.delete_instance(inst, true).await {
                        Ok(()) => {}
                        Err(e) if e.is_not_found() => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                other => return other,
            }
        }
        Err(LifecycleError::Internal("no address could be used".into()))
    }

    async fn create_container(
        &self,
        plan: &Plan,
        sb: &Sandbox,
        base: &std::collections::BTreeMap<String, String>,
        bridge: &network::Bridge,
        ip: std::net::Ipv4Addr,
        progress: &Progress,
    ) -> Result<()> {
        let inst = plan.instance.as_str();
        let image = plan.meta.image.clone().unwrap_or_default();
        let mut req = incusctl::CreateInstance::new(inst, image_source(&image)?)
            .device("eth0", network::nic_device(base, bridge, ip))
            .docker_ready()
            .config(ID_KEY, plan.meta.id.clone())
            .config("user.sandboxd.domain", sb.domain.clone())
            .description(format!("sandboxd sandbox {}", sb.name))
            // Started by the same operation; the `start` step is then a no-op.
            .start(true);
        if let Some(cpu) = plan.meta.cpu {
            req = req.limits_cpu(cpu);
        }
        if let Some(m) = &plan.meta.memory {
            req = req.limits_memory(m.clone());
        }
        if let Some(d) = &plan.meta.disk {
            req = req.root_disk("default", Some(d));
        }
        let (tx, mut rx) = mpsc::channel::<incusctl::Progress>(32);
        let forward = {
            let progress = progress.clone();
            tokio::spawn(async move {
                let mut last = String::new();
                while let Some(p) = rx.recv().await {
                    if p.text != last {
                        progress.message(p.text.clone()).await;
                        last = p.text;
                    }
                }
            })
        };
        let created = self.incus.create_instance_with_progress(&req, tx).await;
        let _ = forward.await;
        created?;
        Ok(())
    }

    // ----- start / stop / restart / delete ----------------------------------

    fn settled(sb: &Sandbox) -> Result<()> {
        match &sb.status {
            SandboxStatus::Running | SandboxStatus::Stopped => Ok(()),
            other => Err(LifecycleError::WrongState {
                name: sb.name.clone(),
                state: state_name(other),
                hint: "run `sandboxd create` again to finish it, or `sandboxd delete` it",
            }),
        }
    }

    /// Waits until the instance carries the sandbox's fixed address (any
    /// IPv4 address for a record that has none yet).
    async fn wait_address(&self, name: &str, instance: &str) -> Result<std::net::Ipv4Addr> {
        let sb = self.require(name).await?;
        let ip = match sb.assigned_ipv4.as_deref().and_then(|a| a.parse().ok()) {
            Some(ip) => {
                self.incus
                    .wait_for_this_ipv4(instance, ip, ADDRESS_TIMEOUT)
                    .await?
            }
            None => self.incus.wait_for_ipv4(instance, ADDRESS_TIMEOUT).await?,
        };
        Ok(ip)
    }

    /// Re-reads the address of a running instance and records it.
    async fn refresh_running(&self, name: &str, instance: &str) -> Result<Sandbox> {
        self.wait_address(name, instance).await?;
        let st = self.incus.instance_state(instance).await?;
        self.set_status(name, SandboxStatus::Running, Some(addresses_of(&st)))
            .await
    }

    /// Starts a sandbox's container and routes to its (new) address.
    pub async fn start(self: &Arc<Self>, name: &str) -> Result<SandboxView> {
        let _claim = self.claim(name)?;
        let (sb, inst) = self.get_incus(name).await?;
        Self::settled(&sb)?;
        self.incus.start(&inst).await?;
        let sb = self.refresh_running(name, &inst).await?;
        Ok(crate::admin::view(&sb))
    }

    /// Stops a sandbox's container (clean shutdown, killed after a grace
    /// period); its routes answer "stopped".
    pub async fn stop(self: &Arc<Self>, name: &str) -> Result<SandboxView> {
        let _claim = self.claim(name)?;
        let (sb, inst) = self.get_incus(name).await?;
        Self::settled(&sb)?;
        self.incus.stop_or_kill(&inst, STOP_GRACE).await?;
        let sb = self
            .set_status(name, SandboxStatus::Stopped, Some(vec![]))
            .await?;
        Ok(crate::admin::view(&sb))
    }

    /// Restarts a sandbox's container; the route follows the new address.
    pub async fn restart(self: &Arc<Self>, name: &str) -> Result<SandboxView> {
        let _claim = self.claim(name)?;
        let (sb, inst) = self.get_incus(name).await?;
        Self::settled(&sb)?;
        let running = self.incus.instance(&inst).await?.is_running();
        if running {
            self.incus
                .restart(&inst, incusctl::StopOptions::graceful(STOP_GRACE))
                .await?;
        } else {
            self.incus.start(&inst).await?;
        }
        let sb = self.refresh_running(name, &inst).await?;
        Ok(crate::admin::view(&sb))
    }

    /// Deletes a sandbox: its route first, then the container, then its
    /// certificates, then the record. A failure leaves the record `Failed`
    /// (unrouted) so that `delete` can be run again.
    pub async fn delete(self: &Arc<Self>, name: &str) -> Result<SandboxView> {
        let _claim = self.claim(name)?;
        let (sb, inst) = self.get_incus(name).await?;
        self.set_status(
            name,
            SandboxStatus::Failed {
                reason: "being deleted".into(),
            },
            Some(vec![]),
        )
        .await?;
        let meta = self.meta(name).await?;
        let ours = match self.incus.instance(&inst).await {
            Ok(i) => match (&meta, i.config.get(ID_KEY)) {
                (Some(m), Some(id)) => *id == m.id,
                // Adopted before ids existed, or a record without meta.
                (None, _) => true,
                (Some(_), None) => false,
            },
            Err(e) if e.is_not_found() => false,
            Err(e) => return Err(self.delete_failed(name, e.into()).await),
        };
        if ours {
            match self.incus.delete_instance(&inst, true).await {
                Ok(()) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(self.delete_failed(name, e.into()).await),
            }
        } else {
            tracing::info!(sandbox = %name, instance = %inst, "no container of ours to delete");
        }
        if let Err(e) = self.remove_egress(&sb).await {
            return Err(self.delete_failed(name, e).await);
        }
        let hosts = sb.hosts();
        let n = name.to_string();
        self.blocking(move |s| {
            for h in &hosts {
                s.delete_record(CERTS_COLLECTION, h)?;
            }
            s.delete_record(META_COLLECTION, &n)?;
            Ok(())
        })
        .await?;
        let n = name.to_string();
        let removed = self.write(move |s| s.remove(&n)).await?;
        lock(&self.samples).remove(&inst);
        tracing::info!(sandbox = %name, "sandbox deleted with its container");
        Ok(crate::admin::view(&removed))
    }

    async fn delete_failed(&self, name: &str, e: LifecycleError) -> LifecycleError {
        let reason = format!("delete failed: {e}");
        if let Err(se) = self
            .set_status(name, SandboxStatus::Failed { reason }, None)
            .await
        {
            tracing::error!(sandbox = %name, error = %se, "cannot record the failure");
        }
        e
    }

    // ----- snapshots ----------------------------------------------------------

    pub async fn snapshot_create(
        self: &Arc<Self>,
        name: &str,
        snap: Option<String>,
    ) -> Result<SnapshotView> {
        let _claim = self.claim(name)?;
        let (_, inst) = self.get_incus(name).await?;
        let snap = snap.unwrap_or_else(|| format!("snap-{}", now_secs()));
        check_snapshot_name(&snap)?;
        self.incus.create_snapshot(&inst, &snap).await?;
        let all = self.snapshot_list(name).await?;
        all.into_iter()
            .find(|s| s.name == snap)
            .ok_or_else(|| LifecycleError::Internal(format!("snapshot {snap} vanished")))
    }

    pub async fn snapshot_list(&self, name: &str) -> Result<Vec<SnapshotView>> {
        let (_, inst) = self.get_incus(name).await?;
        Ok(self
            .incus
            .list_snapshots(&inst)
            .await?
            .into_iter()
            .map(|s| SnapshotView {
                name: s.name,
                created_at: s.created_at,
                stateful: s.stateful,
            })
            .collect())
    }

    /// Restores a snapshot (Incus stops, restores and starts a running
    /// instance); the route follows the address.
    pub async fn snapshot_restore(self: &Arc<Self>, name: &str, snap: &str) -> Result<SandboxView> {
        let _claim = self.claim(name)?;
        let (sb, inst) = self.get_incus(name).await?;
        Self::settled(&sb)?;
        check_snapshot_name(snap)?;
        self.incus.restore_snapshot(&inst, snap).await?;
        let sb = if self.incus.instance(&inst).await?.is_running() {
            self.refresh_running(name, &inst).await?
        } else {
            self.set_status(name, SandboxStatus::Stopped, Some(vec![]))
                .await?
        };
        Ok(crate::admin::view(&sb))
    }

    pub async fn snapshot_delete(self: &Arc<Self>, name: &str, snap: &str) -> Result<()> {
        let _claim = self.claim(name)?;
        let (_, inst) = self.get_incus(name).await?;
        check_snapshot_name(snap)?;
        self.incus.delete_snapshot(&inst, snap).await?;
        Ok(())
    }

    // ----- import list, stats, reconcile ------------------------------------

    /// Instances no sandbox manages.
    pub async fn unmanaged(&self) -> Result<Vec<UnmanagedInstance>> {
        let all = self.incus.list_instances_brief().await?;
        let managed: HashSet<String> = self
            .blocking(|s| s.list())
            .await?
            .iter()
            .filter_map(|sb| incus_instance(sb).map(str::to_string))
            .collect();
        let mut out: Vec<UnmanagedInstance> = all
            .into_iter()
            .filter(|i| !managed.contains(&i.name))
            .map(|i| UnmanagedInstance {
                name: i.name,
                status: i.status,
                kind: i.kind,
                created_at: i.created_at,
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// CPU % of `instance` since the latest of its samples at least
    /// [`MIN_CPU_WINDOW`] old, recording this reading. Every reading
    /// counts (the periodic reconcile's too), so two kept samples are
    /// needed: with one, a reading just after the reconcile's would find
    /// only a sample too recent to give a figure.
    fn cpu_sample(&self, instance: &str, cpu_ns: u64) -> Option<f64> {
        let reading = Sample {
            at: Instant::now(),
            cpu_ns,
        };
        record_cpu(&mut lock(&self.samples), instance, reading)
    }

    fn stats_of(&self, sb: &Sandbox, inst: Option<&incusctl::Instance>) -> Option<SandboxStats> {
        let instance = incus_instance(sb)?;
        let Some(i) = inst else {
            return Some(SandboxStats {
                name: sb.name.clone(),
                state: "Missing".into(),
                ipv4: None,
                ipv6: None,
                cpu_percent: None,
                memory_bytes: None,
                memory_limit_bytes: None,
                disk_bytes: None,
            });
        };
        let st = i.state.as_ref();
        let running = i.is_running();
        Some(SandboxStats {
            name: sb.name.clone(),
            state: i.status.clone(),
            ipv4: i.ipv4().map(|a| a.to_string()),
            ipv6: i.ipv6().map(|a| a.to_string()),
            cpu_percent: st
                .filter(|_| running)
                .and_then(|s| self.cpu_sample(instance, s.cpu_usage_ns())),
            memory_bytes: st.filter(|_| running).map(|s| s.memory_usage_bytes()),
            memory_limit_bytes: st.and_then(|s| s.memory_limit_bytes()),
            disk_bytes: st.and_then(|s| s.disk_usage_bytes()),
        })
    }

    /// Live figures of every Incus sandbox from one `list_instances` call.
    pub async fn stats(&self) -> StatsAnswer {
        let sandboxes = match self.blocking(|s| s.list()).await {
            Ok(s) => s,
            Err(e) => {
                return StatsAnswer {
                    incus_error: Some(e.to_string()),
                    sandboxes: vec![],
                }
            }
        };
        if !sandboxes.iter().any(|sb| incus_instance(sb).is_some()) {
            return StatsAnswer::default();
        }
        let list = match self.incus.list_instances().await {
            Ok(l) => l,
            Err(e) => {
                return StatsAnswer {
                    incus_error: Some(e.to_string()),
                    sandboxes: vec![],
                }
            }
        };
        let by_name: HashMap<&str, &incusctl::Instance> =
            list.iter().map(|i| (i.name.as_str(), i)).collect();
        StatsAnswer {
            incus_error: None,
            sandboxes: sandboxes
                .iter()
                .filter_map(|sb| {
                    let inst = incus_instance(sb).and_then(|n| by_name.get(n).copied());
                    self.stats_of(sb, inst)
                })
                .collect(),
        }
    }

    /// Compares every settled Incus sandbox with Incus' view (one
    /// `list_instances`) and repairs status and addresses; returns how many
    /// records changed.
    pub async fn reconcile(self: &Arc<Self>) -> Result<usize> {
        let list = self.incus.list_instances().await?;
        let sandboxes = self.blocking(|s| s.list()).await?;
        let by_name: HashMap<&str, &incusctl::Instance> =
            list.iter().map(|i| (i.name.as_str(), i)).collect();
        let mut changed = 0;
        for sb in &sandboxes {
            let Some(instance) = incus_instance(sb) else {
                continue;
            };
            if !matches!(sb.status, SandboxStatus::Running | SandboxStatus::Stopped) {
                continue;
            }
            // Before the address check below: a container whose NIC lost
            // its filters may have lost its address with them.
            if let Some(i) = by_name.get(instance) {
                if self.needs_isolation(sb, i) {
                    if let Some(_busy) = BusyGuard::try_new(&self.busy, &sb.name) {
                        changed += usize::from(self.reisolate(&sb.name, instance).await);
                    }
                }
            }
            let (status, addrs) = match by_name.get(instance) {
                None => (
                    SandboxStatus::Failed {
                        reason: format!("container {instance} no longer exists in Incus"),
                    },
                    vec![],
                ),
                Some(i) if i.is_running() => {
                    if let Some(st) = &i.state {
                        let _ = self.cpu_sample(instance, st.cpu_usage_ns());
                    }
                    let addrs = i.state.as_ref().map(addresses_of).unwrap_or_default();
                    if addrs.is_empty() && sb.status == SandboxStatus::Running {
                        // Booting: the event path records the address.
                        continue;
                    }
                    (SandboxStatus::Running, addrs)
                }
                Some(_) => (SandboxStatus::Stopped, vec![]),
            };
            if self.settle(&sb.name, status, addrs).await? {
                tracing::info!(sandbox = %sb.name, "reconciled with Incus");
                changed += 1;
            }
        }
        self.upgrade_authorized_keys().await;
        Ok(changed)
    }

    /// The reconcile's isolation of one sandbox (made before isolation
    /// existed, or whose NIC was changed): address, ACL, NIC, and a
    /// restart when the running container must change its address.
    async fn reisolate(&self, name: &str, instance: &str) -> bool {
        match self.isolate_instance(name, instance).await {
            Ok((ip, restart)) => {
                if restart {
                    tracing::warn!(sandbox = %name, %ip, "restarting the container so that it takes its fixed address");
                    if let Err(e) = self
                        .incus
                        .restart(instance, incusctl::StopOptions::graceful(STOP_GRACE))
                        .await
                    {
                        tracing::warn!(sandbox = %name, error = %e, "restart failed");
                    }
                }
                true
            }
            Err(e) => {
                tracing::warn!(sandbox = %name, error = %e, "cannot isolate the sandbox's network");
                false
            }
        }
    }

    /// `sandboxd egress NAME MODE`: changes the policy and applies it.
    pub async fn set_egress(
        self: &Arc<Self>,
        name: &str,
        egress: store::Egress,
    ) -> Result<SandboxView> {
        let _claim = self.claim(name)?;
        let (sb, inst) = self.get_incus(name).await?;
        Self::settled(&sb)?;
        store::validate_egress(&egress)?;
        let n = name.to_string();
        let e = egress.clone();
        self.write(move |s| {
            s.update(&n, |sb| {
                sb.egress = e.clone();
                Ok(())
            })
        })
        .await?;
        let (_, restart) = self.isolate_instance(name, &inst).await?;
        if restart {
            self.incus
                .restart(&inst, incusctl::StopOptions::graceful(STOP_GRACE))
                .await?;
            self.refresh_running(name, &inst).await?;
        }
        let sb = self.require(name).await?;
        tracing::info!(sandbox = %name, egress = egress.mode.as_str(), "egress policy applied");
        Ok(crate::admin::view(&sb))
    }

    /// Settled Incus sandboxes backed by `instance`.
    pub async fn sandboxes_of(&self, instance: &str) -> Result<Vec<Sandbox>> {
        let inst = instance.to_string();
        self.blocking(move |s| {
            Ok(s.list()?
                .into_iter()
                .filter(|sb| incus_instance(sb) == Some(inst.as_str()))
                .collect())
        })
        .await
    }

    /// An instance was renamed outside sandboxd: follow it.
    pub async fn follow_rename(&self, old: &str, new: &str) -> Result<()> {
        for sb in self.sandboxes_of(old).await? {
            let new_name = new.to_string();
            let n = sb.name.clone();
            self.write(move |s| {
                s.update(&n, |sb| {
                    sb.backend = Backend::Incus {
                        instance: new_name.clone(),
                    };
                    Ok(())
                })
            })
            .await?;
            tracing::info!(sandbox = %sb.name, old, new, "instance renamed; following");
        }
        Ok(())
    }
}

/// What earlier steps learned, for later ones in the same run.
#[derive(Default)]
struct StepState {
    /// uid, gid and home of the login user.
    user: Option<(u32, u32, String)>,
}

/// The requested egress policy, `restricted` when none is given.
fn egress_of(req: Option<&wire::SetEgress>) -> Result<store::Egress> {
    match req {
        Some(e) => e.to_egress().map_err(LifecycleError::Invalid),
        None => Ok(store::Egress::default()),
    }
}

fn random_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

fn check_size(what: &str, size: &str) -> Result<()> {
    let digits: String = size.chars().take_while(char::is_ascii_digit).collect();
    let unit = &size[digits.len()..];
    let ok_unit = [
        "", "B", "kB", "MB", "GB", "TB", "KiB", "MiB", "GiB", "TiB", "%",
    ]
    .contains(&unit);
    if digits.is_empty() || !ok_unit || (unit == "%" && what == "disk") {
        return Err(LifecycleError::Invalid(format!(
            "--{what} {size:?}: write a size like 512MiB, 2GiB or 10GB"
        )));
    }
    Ok(())
}

fn check_snapshot_name(snap: &str) -> Result<()> {
    let ok = !snap.is_empty()
        && snap.len() <= 63
        && snap
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if !ok {
        return Err(LifecycleError::Invalid(format!(
            "snapshot name {snap:?}: use 1 to 63 of a-z, A-Z, 0-9, '-', '_', '.'"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn cpu_percent_has_a_base_even_just_after_another_reading() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut m = HashMap::new();
        let mut read = |ms: u64, cpu_ms: u64| {
            record_cpu(
                &mut m,
                "c",
                Sample {
                    at: at(ms),
                    cpu_ns: cpu_ms * 1_000_000,
                },
            )
        };
        assert_eq!(read(0, 0), None, "no earlier sample");
        // 100 ms of CPU over 1 s: 10%.
        let p = read(1000, 100).unwrap();
        assert!((p - 10.0).abs() < 1e-9, "{p}");
        // 50 ms after that reading (the periodic reconcile's, say): the
        // one before it is the base.
        let p = read(1050, 105).unwrap();
        assert!((p - 10.0).abs() < 1e-9, "{p}");
        // The counter went back (the container restarted): no figure, then
        // figures from the new counter.
        assert_eq!(read(1500, 3), None);
        let p = read(2000, 53).unwrap();
        assert!((p - 10.0).abs() < 1e-9, "{p}");
    }

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

    #[test]
    fn sizes_and_snapshot_names() {
        assert!(check_size("memory", "512MiB").is_ok());
        assert!(check_size("memory", "50%").is_ok());
        assert!(check_size("disk", "10GiB").is_ok());
        assert!(check_size("disk", "50%").is_err());
        assert!(check_size("memory", "lots").is_err());
        assert!(check_snapshot_name("before-upgrade.1").is_ok());
        assert!(check_snapshot_name("a/b").is_err());
        assert!(check_snapshot_name("").is_err());
    }
}
