//! Wire types of the Incus lifecycle calls of the admin API (under
//! `/v1/incus/`), shared by the daemon and the CLI.

use serde::{Deserialize, Serialize};

use crate::api::{SetAuth, TlsMode};

/// `POST /v1/incus/create`: a new sandbox in a new Incus container.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSandbox {
    pub name: String,
    pub domain: String,
    /// Local image alias, or `URL:ALIAS` on a simplestreams server; the
    /// daemon's `default_image` when absent.
    #[serde(default)]
    pub image: Option<String>,
    pub ssh_keys: Vec<String>,
    #[serde(default)]
    pub app_port: Option<u16>,
    /// Login user made in the container (default `debian`).
    #[serde(default)]
    pub user: Option<String>,
    /// `limits.cpu`.
    #[serde(default)]
    pub cpu: Option<u32>,
    /// `limits.memory`, e.g. `2GiB`.
    #[serde(default)]
    pub memory: Option<String>,
    /// Root disk size, e.g. `10GiB`.
    #[serde(default)]
    pub disk: Option<String>,
    #[serde(default)]
    pub auth: Option<SetAuth>,
    #[serde(default)]
    pub tls_mode: Option<TlsMode>,
    /// `manual` TLS mode: certificate chain and key PEM files (absolute
    /// paths), as in [`crate::api::AddSandbox`].
    #[serde(default)]
    pub tls_cert_file: Option<String>,
    #[serde(default)]
    pub tls_key_file: Option<String>,
    /// `auto`, `full`, `sandbox` or `none`; the daemon's `provision.mode`
    /// when absent.
    #[serde(default)]
    pub provision: Option<crate::config::ProvisionMode>,
    /// The LLM provider's key for this sandbox (else the daemon's
    /// `provision.llm_key_file`). Travels only over the admin socket.
    #[serde(default)]
    pub llm: Option<LlmKey>,
    /// A hook script run last in the container, as root (else the
    /// daemon's `provision.hook`).
    #[serde(default)]
    pub hook: Option<String>,
    /// Egress policy; `restricted` when absent.
    #[serde(default)]
    pub egress: Option<SetEgress>,
}

/// An egress policy as requested (`create`, `import`, and
/// `POST /v1/incus/sandboxes/{name}/egress`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetEgress {
    /// `open`, `restricted` or `allowlist`.
    pub mode: String,
    /// `allowlist`: IPv4 addresses, CIDRs or DNS names.
    #[serde(default)]
    pub allow: Vec<String>,
}

impl SetEgress {
    /// The policy, checked.
    pub fn to_egress(&self) -> Result<store::Egress, String> {
        let egress = store::Egress {
            mode: self.mode.parse()?,
            allow: self.allow.iter().map(|a| a.trim().to_string()).collect(),
        };
        store::validate_egress(&egress).map_err(|e| e.to_string())?;
        Ok(egress)
    }
}

/// An LLM provider's key as sent by the CLI. `Debug` hides the key.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlmKey {
    /// `anthropic`, `openai` or `fireworks`.
    pub provider: String,
    pub key: String,
    #[serde(default)]
    pub base_url: Option<String>,
}

impl std::fmt::Debug for LlmKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlmKey")
            .field("provider", &self.provider)
            .field("key", &"<hidden>")
            .field("base_url", &self.base_url)
            .finish()
    }
}

/// `POST /v1/incus/images/build`: provision a container from `base` and
/// publish it as the golden image.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageBuild {
    /// Base image (local alias or `URL:ALIAS`); the daemon's
    /// `default_image` when absent.
    #[serde(default)]
    pub base: Option<String>,
    /// Alias to publish to; the daemon's `provision.golden_alias` when absent.
    #[serde(default)]
    pub alias: Option<String>,
}

/// A golden image as published by `image build`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageView {
    pub alias: String,
    pub fingerprint: String,
    pub base: String,
    pub size_bytes: i64,
    /// Seconds the build took.
    pub seconds: f64,
}

/// One provisioning step as reported by `update-agent`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepOutcome {
    pub step: String,
    pub changed: bool,
    pub detail: String,
}

/// `POST /v1/incus/import`: adopt an existing, untracked instance.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportSandbox {
    /// Instance name; also the sandbox name.
    pub instance: String,
    pub domain: String,
    pub ssh_keys: Vec<String>,
    #[serde(default)]
    pub app_port: Option<u16>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub auth: Option<SetAuth>,
    /// As in [`CreateSandbox`].
    #[serde(default)]
    pub tls_mode: Option<TlsMode>,
    #[serde(default)]
    pub tls_cert_file: Option<String>,
    #[serde(default)]
    pub tls_key_file: Option<String>,
    /// Egress policy; `restricted` when absent.
    #[serde(default)]
    pub egress: Option<SetEgress>,
}

/// An Incus instance that no sandbox manages (`GET /v1/incus/unmanaged`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnmanagedInstance {
    pub name: String,
    pub status: String,
    pub kind: String,
    pub created_at: String,
}

/// `POST /v1/incus/sandboxes/{name}/snapshots`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// Snapshot name; `snap-UNIXTIME` when absent.
    #[serde(default)]
    pub name: Option<String>,
}

/// One snapshot of a sandbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotView {
    pub name: String,
    pub created_at: String,
    pub stateful: bool,
}

/// Live figures of one Incus sandbox (`GET /v1/incus/stats`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SandboxStats {
    pub name: String,
    /// Incus' status of the instance (`Running`, `Stopped`, ...), or
    /// `Missing` when the instance does not exist.
    pub state: String,
    pub ipv4: Option<String>,
    pub ipv6: Option<String>,
    /// CPU use in percent of one CPU since the previous sample the daemon
    /// took (`list`, `top` or the periodic reconcile); `None` without one.
    pub cpu_percent: Option<f64>,
    pub memory_bytes: Option<u64>,
    pub memory_limit_bytes: Option<u64>,
    pub disk_bytes: Option<u64>,
}

/// `GET /v1/incus/stats`: figures of every Incus sandbox from one listing.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StatsAnswer {
    /// Why there are no figures (Incus unreachable), if so.
    pub incus_error: Option<String>,
    pub sandboxes: Vec<SandboxStats>,
}
