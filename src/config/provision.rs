//! The `[provision]` table: what `create` and `image build` install in
//! containers (where packages come from, which agent runs, the LLM
//! provider's key file on the host, a hook script).

use std::path::PathBuf;

use super::keys::{config_keys, sub_table, Str};

config_keys! {
    /// The `[provision]` table as read.
    pub(crate) struct RawProvision in "provision" {
        /// How much `create` installs: auto, full, sandbox or none.
        mode: Str = "\"auto\"",
        /// Where packages come from: distro or upstream installers.
        packages: Str = "\"distro\"",
        /// HTTP proxy or package cache for apt inside containers.
        apt_proxy: Str = "none",
        /// The coding agent: shelley, command (agent_command) or none.
        agent: Str = "\"shelley\"",
        /// The agent's command line (its unit's ExecStart) with agent = "command".
        agent_command: Str = "none",
        /// A host file run in the container to install the agent.
        agent_install: Str = "none",
        /// LLM provider: anthropic, openai or fireworks.
        llm_provider: Str = "none",
        /// Host file holding the provider's API key (0600), read at each provisioning.
        llm_key_file: Str = "none",
        /// Base URL of the provider's API (a proxy or gateway).
        llm_base_url: Str = "none",
        /// Host file run last in every new sandbox, as root.
        hook: Str = "none",
        /// Alias that `sandboxd image build` publishes to.
        golden_alias: Str = "\"sandboxd/golden\"",
    }
}

/// How much provisioning `create` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProvisionMode {
    /// Per-sandbox steps on a golden image (one made by `sandboxd image
    /// build`), everything on any other image.
    Auto,
    /// Every step, whatever the image.
    Full,
    /// Only the per-sandbox steps.
    Sandbox,
    /// Nothing beyond the login user and keys.
    None,
}

impl std::str::FromStr for ProvisionMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "full" => Ok(Self::Full),
            "sandbox" => Ok(Self::Sandbox),
            "none" => Ok(Self::None),
            other => Err(format!(
                "unknown provisioning mode {other:?} (auto, full, sandbox or none)"
            )),
        }
    }
}

/// The `[provision]` table: where packages come from, which agent runs in
/// each sandbox, the LLM provider's key file on the host and a hook script.
/// Files are read when a sandbox is provisioned, so a key can be rotated
/// without a restart; the key itself never enters the configuration.
#[derive(Debug, Clone)]
pub struct ProvisionConfig {
    pub mode: ProvisionMode,
    /// `distro` (the distribution's packages) or `upstream` installers.
    pub packages: String,
    /// HTTP proxy or package cache for apt inside containers.
    pub apt_proxy: Option<String>,
    /// `shelley`, `command` (see `agent_command`) or `none`.
    pub agent: String,
    /// The agent's command line (ExecStart of its unit) for `agent = "command"`.
    pub agent_command: Option<String>,
    /// A host file run in the container to install the agent.
    pub agent_install: Option<PathBuf>,
    /// `anthropic`, `openai` or `fireworks`.
    pub llm_provider: Option<String>,
    /// Host file holding the provider's API key (mode 0600 or stricter).
    pub llm_key_file: Option<PathBuf>,
    pub llm_base_url: Option<String>,
    /// Host file run last in every new sandbox, as root.
    pub hook: Option<PathBuf>,
    /// Alias that `sandboxd image build` publishes to.
    pub golden_alias: String,
}

/// Alias of the golden image unless configured.
pub const DEFAULT_GOLDEN_ALIAS: &str = "sandboxd/golden";

impl Default for ProvisionConfig {
    fn default() -> Self {
        Self {
            mode: ProvisionMode::Auto,
            packages: "distro".into(),
            apt_proxy: None,
            agent: "shelley".into(),
            agent_command: None,
            agent_install: None,
            llm_provider: None,
            llm_key_file: None,
            llm_base_url: None,
            hook: None,
            golden_alias: DEFAULT_GOLDEN_ALIAS.into(),
        }
    }
}

/// Reads the `[provision]` table of `table`, if any; values are checked
/// (modes, URL, files that must exist) with every problem reported.
pub(crate) fn read(table: &toml::Table, errs: &mut Vec<String>) -> ProvisionConfig {
    let mut p = ProvisionConfig::default();
    let Some(t) = sub_table(table, "provision", errs) else {
        return p;
    };
    let raw = RawProvision::read(t, errs);
    let one_of = |key: &str, v: Option<String>, allowed: &[&str], errs: &mut Vec<String>| {
        let v = v?;
        if allowed.contains(&v.as_str()) {
            Some(v)
        } else {
            errs.push(format!(
                "`provision.{key}` must be one of {}, not {v:?}",
                allowed.join(", ")
            ));
            None
        }
    };
    if let Some(m) = raw.mode {
        match m.parse() {
            Ok(m) => p.mode = m,
            Err(e) => errs.push(format!("`provision.mode`: {e}")),
        }
    }
    if let Some(v) = one_of("packages", raw.packages, &["distro", "upstream"], errs) {
        p.packages = v;
    }
    p.apt_proxy = raw.apt_proxy;
    if let Some(u) = &p.apt_proxy {
        if !(u.starts_with("http://") || u.starts_with("https://"))
            || u.contains(char::is_whitespace)
        {
            errs.push(format!(
                "`provision.apt_proxy` must be an http(s) URL, not {u:?}"
            ));
        }
    }
    if let Some(v) = one_of("agent", raw.agent, &["shelley", "command", "none"], errs) {
        p.agent = v;
    }
    p.agent_command = raw.agent_command;
    if p.agent == "command"
        && p.agent_command
            .as_deref()
            .is_none_or(|c| c.trim().is_empty())
    {
        errs.push("`provision.agent = \"command\"` needs `provision.agent_command`".into());
    }
    p.agent_install = raw.agent_install.map(PathBuf::from);
    p.llm_provider = one_of(
        "llm_provider",
        raw.llm_provider,
        &["anthropic", "openai", "fireworks"],
        errs,
    );
    p.llm_key_file = raw.llm_key_file.map(PathBuf::from);
    if p.llm_key_file.is_some() && p.llm_provider.is_none() {
        errs.push("`provision.llm_key_file` needs `provision.llm_provider`".into());
    }
    p.llm_base_url = raw.llm_base_url;
    p.hook = raw.hook.map(PathBuf::from);
    for (key, path) in [
        ("agent_install", &p.agent_install),
        ("llm_key_file", &p.llm_key_file),
        ("hook", &p.hook),
    ] {
        if let Some(path) = path {
            if let Err(e) = std::fs::metadata(path) {
                errs.push(format!("`provision.{key}` {}: {e}", path.display()));
            }
        }
    }
    if let Some(a) = raw.golden_alias {
        if a.trim().is_empty() {
            errs.push("`provision.golden_alias` must not be empty".into());
        } else {
            p.golden_alias = a;
        }
    }
    p
}
