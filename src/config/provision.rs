//! The `[provision]` table: what `create` and `image build` install in
//! containers (where packages come from, which agent runs, the LLM
//! provider's key file on the host, a hook script).

use super::keys::{config_keys, declared_str, Choice, Choices, Parsed, Str};

config_keys! {
    /// The `[provision]` table as read: `None` keeps the default.
    pub(crate) struct RawProvision in "provision" for ProvisionConfig {
        /// How much `create` installs: auto, full, sandbox or none.
        mode: Parsed<ProvisionMode> = "\"auto\""
            => |c, v| c.mode = v,
        /// Where packages come from: distro or upstream installers.
        packages: Choice<Packages> = "\"distro\""
            => |c, v| c.packages = v,
        /// HTTP proxy or package cache for apt inside containers.
        apt_proxy: Str = "none"
            => |c, v| c.apt_proxy = Some(v),
        /// The coding agent: shelley, command (agent_command) or none.
        agent: Choice<Agents> = "\"shelley\""
            => |c, v| c.agent = v,
        /// The agent's command line (its unit's ExecStart) with agent = "command".
        agent_command: Str = "none"
            => |c, v| c.agent_command = Some(v),
        /// A host file run in the container to install the agent.
        agent_install: Str = "none"
            => |c, v| c.agent_install = Some(v.into()),
        /// LLM provider: anthropic, openai or fireworks.
        llm_provider: Choice<Providers> = "none"
            => |c, v| c.llm_provider = Some(v),
        /// Host file holding the provider's API key (0600), read at each provisioning.
        llm_key_file: Str = "none"
            => |c, v| c.llm_key_file = Some(v.into()),
        /// Base URL of the provider's API (a proxy or gateway).
        llm_base_url: Str = "none"
            => |c, v| c.llm_base_url = Some(v),
        /// Host file run last in every new sandbox, as root.
        hook: Str = "none"
            => |c, v| c.hook = Some(v.into()),
        /// Alias that `sandboxd image build` publishes to.
        golden_alias: Str = "\"sandboxd/golden\""
            => |c, v| c.golden_alias = v,
    }
}

/// `provision.packages`.
pub(crate) struct Packages;
impl Choices for Packages {
    const ALL: &'static [&'static str] = &["distro", "upstream"];
}

/// `provision.agent`.
pub(crate) struct Agents;
impl Choices for Agents {
    const ALL: &'static [&'static str] = &["shelley", "command", "none"];
}

/// `provision.llm_provider`.
pub(crate) struct Providers;
impl Choices for Providers {
    const ALL: &'static [&'static str] = &["anthropic", "openai", "fireworks"];
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

impl Choices for ProvisionMode {
    const ALL: &'static [&'static str] = &["auto", "full", "sandbox", "none"];
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
    pub agent_install: Option<std::path::PathBuf>,
    /// `anthropic`, `openai` or `fireworks`.
    pub llm_provider: Option<String>,
    /// Host file holding the provider's API key (mode 0600 or stricter).
    pub llm_key_file: Option<std::path::PathBuf>,
    pub llm_base_url: Option<String>,
    /// Host file run last in every new sandbox, as root.
    pub hook: Option<std::path::PathBuf>,
    /// Alias that `sandboxd image build` publishes to.
    pub golden_alias: String,
}

/// Alias of the golden image unless configured (declared with the key).
pub const DEFAULT_GOLDEN_ALIAS: &str = declared_str(RawProvision::KEYS, "golden_alias");

impl Default for ProvisionConfig {
    /// The declared defaults of the `[provision]` keys.
    fn default() -> Self {
        let mut p = Self {
            mode: ProvisionMode::Auto,
            packages: String::new(),
            apt_proxy: None,
            agent: String::new(),
            agent_command: None,
            agent_install: None,
            llm_provider: None,
            llm_key_file: None,
            llm_base_url: None,
            hook: None,
            golden_alias: String::new(),
        };
        RawProvision::defaults().apply(&mut p);
        p
    }
}

/// Reads the `[provision]` table of `table`, if any, over the defaults;
/// values are checked (types and words when read, then the URL, the keys
/// that need another and the files that must exist) with every problem
/// reported.
pub(crate) fn read(table: &toml::Table, errs: &mut Vec<String>) -> ProvisionConfig {
    let mut p = ProvisionConfig::default();
    RawProvision::from_parent(table, errs).apply(&mut p);
    if let Some(u) = &p.apt_proxy {
        if !(u.starts_with("http://") || u.starts_with("https://"))
            || u.contains(char::is_whitespace)
        {
            errs.push(format!(
                "`provision.apt_proxy` must be an http(s) URL, not {u:?}"
            ));
        }
    }
    if p.agent == "command"
        && p.agent_command
            .as_deref()
            .is_none_or(|c| c.trim().is_empty())
    {
        errs.push("`provision.agent = \"command\"` needs `provision.agent_command`".into());
    }
    if p.llm_key_file.is_some() && p.llm_provider.is_none() {
        errs.push("`provision.llm_key_file` needs `provision.llm_provider`".into());
    }
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
    if p.golden_alias.trim().is_empty() {
        errs.push("`provision.golden_alias` must not be empty".into());
    }
    p
}
