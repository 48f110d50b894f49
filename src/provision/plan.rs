//! What provisioning installs: the [`Plan`] (packages and their sources,
//! the agent, the LLM provider's settings and key, the hook) and the LLM
//! environment file's text.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::{Phase, ProvisionError, DEFAULT_AGENT_PORT};

/// Where packages come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Packages {
    /// The distribution's own packages (docker.io, golang-go, nodejs, npm).
    #[default]
    Distro,
    /// The projects' own repositories and tarballs (URLs in
    /// [`UpstreamSources`]).
    Upstream,
}

/// Addresses and versions for [`Packages::Upstream`]. No defaults are built
/// in: the caller names the sources it trusts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamSources {
    /// Docker's apt repository base URL (the part before `dists/`).
    pub docker_apt_url: Option<String>,
    /// URL of that repository's ASCII-armoured signing key.
    pub docker_apt_key_url: Option<String>,
    /// Go version, e.g. `1.23.4`.
    pub go_version: Option<String>,
    /// Base URL of Go's release tarballs.
    pub go_url: Option<String>,
    /// Expected SHA-256 of the Go tarball.
    pub go_sha256: Option<String>,
    /// Node.js version, e.g. `22.11.0`.
    pub node_version: Option<String>,
    /// Base URL of Node.js' releases (`.../vVERSION/node-vVERSION-linux-ARCH.tar.xz`).
    pub node_url: Option<String>,
    /// Expected SHA-256 of the Node.js tarball.
    pub node_sha256: Option<String>,
}

/// Which coding agent runs in the sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum AgentKind {
    /// shelley, built from source with `go install PACKAGE@VERSION`.
    Shelley {
        /// Go package path (default `shelley.exe.dev/cmd/shelley`).
        #[serde(default)]
        package: Option<String>,
        /// Module version or `latest`.
        #[serde(default = "latest")]
        version: String,
        /// GOPROXY for the build (Go's default when `None`).
        #[serde(default)]
        goproxy: Option<String>,
    },
    /// Another agent: the unit's command line, and optionally a script that
    /// installs it (run as root in the image phase).
    Command {
        /// ExecStart command line; may use `${SANDBOXD_AGENT_PORT}`.
        command: String,
        /// Install script bytes.
        #[serde(default)]
        install: Option<Vec<u8>>,
    },
    /// No agent (its unit is removed if present).
    None,
}

fn latest() -> String {
    "latest".to_string()
}

impl Default for AgentKind {
    fn default() -> Self {
        AgentKind::Shelley {
            package: None,
            version: latest(),
            goproxy: None,
        }
    }
}

/// The agent and its port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Agent {
    /// Which agent.
    #[serde(flatten)]
    pub kind: AgentKind,
    /// TCP port it listens on inside the container.
    #[serde(default = "default_port")]
    pub port: u16,
}

fn default_port() -> u16 {
    DEFAULT_AGENT_PORT
}

impl Default for Agent {
    fn default() -> Self {
        Agent {
            kind: AgentKind::default(),
            port: DEFAULT_AGENT_PORT,
        }
    }
}

/// LLM provider (decides the variable names of the environment file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// `ANTHROPIC_API_KEY`, `ANTHROPIC_BASE_URL`.
    Anthropic,
    /// `OPENAI_API_KEY`, `OPENAI_BASE_URL`.
    #[serde(rename = "openai")]
    OpenAI,
    /// `FIREWORKS_API_KEY`, `FIREWORKS_BASE_URL`.
    Fireworks,
}

impl Provider {
    /// Name of the API key variable.
    pub fn key_var(self) -> &'static str {
        match self {
            Provider::Anthropic => "ANTHROPIC_API_KEY",
            Provider::OpenAI => "OPENAI_API_KEY",
            Provider::Fireworks => "FIREWORKS_API_KEY",
        }
    }

    /// Name of the base URL variable.
    pub fn base_url_var(self) -> &'static str {
        match self {
            Provider::Anthropic => "ANTHROPIC_BASE_URL",
            Provider::OpenAI => "OPENAI_BASE_URL",
            Provider::Fireworks => "FIREWORKS_BASE_URL",
        }
    }
}

/// An API key: never shown by `Debug` or `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    /// Wraps a key.
    pub fn new(key: impl Into<String>) -> Self {
        ApiKey(key.into())
    }

    /// The key itself (only for writing the environment file).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// The LLM provider's settings written to the environment file. Not
/// serializable: the key lives in the caller's secret store; [`LlmSettings`]
/// is the part that may be kept in configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Llm {
    /// Provider.
    pub provider: Provider,
    /// API key.
    pub key: ApiKey,
    /// Optional base URL.
    pub base_url: Option<String>,
}

/// The non-secret part of [`Llm`], for configuration files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlmSettings {
    /// Provider.
    pub provider: Provider,
    /// Optional base URL.
    #[serde(default)]
    pub base_url: Option<String>,
}

impl Llm {
    /// Joins configuration and key.
    pub fn new(settings: LlmSettings, key: ApiKey) -> Self {
        Llm {
            provider: settings.provider,
            key,
            base_url: settings.base_url,
        }
    }

    /// The non-secret part.
    pub fn settings(&self) -> LlmSettings {
        LlmSettings {
            provider: self.provider,
            base_url: self.base_url.clone(),
        }
    }

    /// The environment file's bytes (`KEY='value'` lines, readable by
    /// systemd's `EnvironmentFile=` and by a POSIX shell).
    pub fn env_file(&self) -> Result<Vec<u8>, ProvisionError> {
        check_env_value("the API key", self.key.expose())?;
        let mut text = String::from(
            "# Written by sandboxd: the LLM provider's settings. Mode 0600, owner only.\n",
        );
        text.push_str(&format!(
            "{}='{}'\n",
            self.provider.key_var(),
            self.key.expose()
        ));
        if let Some(url) = &self.base_url {
            check_env_value("the base URL", url)?;
            text.push_str(&format!("{}='{}'\n", self.provider.base_url_var(), url));
        }
        Ok(text.into_bytes())
    }
}

/// Values go between single quotes in a file read by systemd and by sh:
/// printable ASCII without quotes, backslashes or whitespace. The message
/// never contains the value.
fn check_env_value(what: &str, value: &str) -> Result<(), ProvisionError> {
    if value.is_empty() {
        return Err(ProvisionError::InvalidPlan(format!("{what} is empty")));
    }
    if value
        .bytes()
        .any(|b| !(0x21..0x7f).contains(&b) || b == b'\'' || b == b'"' || b == b'\\')
    {
        return Err(ProvisionError::InvalidPlan(format!(
            "{what} may hold only printable ASCII without spaces, quotes or backslashes"
        )));
    }
    Ok(())
}

/// Everything provisioning needs to know.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// Which steps.
    pub phase: Phase,
    /// Login user (default: `ubuntu` on Ubuntu, `debian` on Debian).
    pub user: Option<String>,
    /// Package source.
    pub packages: Packages,
    /// Upstream addresses (only with [`Packages::Upstream`]).
    pub upstream: UpstreamSources,
    /// HTTP proxy or package cache for apt, e.g. `http://198.18.0.1:3142`.
    pub apt_proxy: Option<String>,
    /// The coding agent.
    pub agent: Agent,
    /// LLM provider settings and key (`None`: the file is left as it is).
    pub llm: Option<Llm>,
    /// The user's hook script, run last as root.
    pub hook: Option<Vec<u8>>,
}
