//! Daemon configuration: a TOML file merged with `sandboxd serve` flags
//! (flags win), in two stages: collect raw values, then validate them all,
//! reporting every problem at once. Unknown keys are errors.
//!
//! This module is the only place (with `cli`) that reads flags, files named
//! by the operator and environment variables.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::Args;

/// Default admin socket path.
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/sandboxd/admin.sock";
/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/sandboxd";
/// Default ACME directory (Let's Encrypt production).
pub const DEFAULT_ACME_DIRECTORY: &str = "https://acme-v02.api.letsencrypt.org/directory";

/// Flags of `sandboxd serve`.
#[derive(Debug, Clone, Default, Args)]
pub struct ServeArgs {
    /// TOML configuration file; flags given here override its values.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Directory for the database, keys and certificates (created 0700).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Address for the SSH router (repeatable) [default: 0.0.0.0:2222 and [::]:2222].
    #[arg(long, value_name = "ADDR")]
    pub ssh_listen: Vec<String>,
    /// Address for HTTPS (repeatable) [default: 0.0.0.0:443 and [::]:443].
    #[arg(long, value_name = "ADDR")]
    pub https_listen: Vec<String>,
    /// Address for plain HTTP: ACME HTTP-01 and redirects (repeatable) [default: 0.0.0.0:80 and [::]:80].
    #[arg(long, value_name = "ADDR")]
    pub http_listen: Vec<String>,
    /// Default certificate source for new domains.
    #[arg(long, value_name = "MODE", value_parser = ["internal", "acme"])]
    pub tls_mode: Option<String>,
    /// ACME directory URL [default: Let's Encrypt production].
    #[arg(long, value_name = "URL")]
    pub acme_directory: Option<String>,
    /// Extra PEM root to trust for the ACME server's own TLS (a test CA).
    #[arg(long, value_name = "FILE")]
    pub acme_ca_root: Option<PathBuf>,
    /// Contact e-mail for the ACME account.
    #[arg(long, value_name = "EMAIL")]
    pub acme_email: Option<String>,
    /// Incus unix socket [default: /var/lib/incus/unix.socket or /run/incus/unix.socket].
    #[arg(long, value_name = "PATH")]
    pub incus_socket: Option<PathBuf>,
}

/// How certificates are obtained by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    Internal,
    Acme,
}

/// Validated daemon configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub state_dir: PathBuf,
    pub admin_socket: PathBuf,
    /// Members of this group may use the admin socket (besides root).
    pub admin_group: Option<String>,
    pub ssh_listen: Vec<SocketAddr>,
    pub https_listen: Vec<SocketAddr>,
    pub http_listen: Vec<SocketAddr>,
    pub tls_mode: TlsMode,
    pub acme_directory: String,
    pub acme_ca_root: Option<PathBuf>,
    pub acme_email: Option<String>,
    /// ACME challenge types in order of preference (a failed attempt moves to the next).
    pub acme_challenges: Vec<httpgate::ChallengeKind>,
    /// `tracing` filter, e.g. `info` or `sandboxd=debug,info`.
    pub log: String,
    /// Text shown to SSH clients before authentication.
    pub ssh_banner: Option<String>,
    /// Incus settings (socket, default image, reconcile period).
    pub incus: IncusConfig,
    /// What `create` and `image build` install in containers.
    pub provision: ProvisionConfig,
    /// The `[http]` table: proxy limits, timeouts and trusted proxies.
    pub http: HttpSettings,
    /// DNS suffixes the internal CA may issue for (its root's name
    /// constraints), lowercase, without leading dot; `internal` mode is
    /// refused for domains outside them.
    pub internal_ca_suffixes: Vec<String>,
    /// The `[ssh]` table: the SSH gate's limits.
    pub ssh: SshSettings,
}

/// The `[http]` table. `None` keeps the proxy's built-in default (see
/// `httpgate::config`): the defaults suit most hosts, these are for hosts
/// behind a load balancer (`trusted_proxies`) or with unusual clients.
#[derive(Debug, Clone, Default)]
pub struct HttpSettings {
    /// Peers whose X-Forwarded-* headers are kept and appended to; from any
    /// other peer they are replaced.
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// Open client connections per listener; more are closed at once.
    pub max_connections: Option<usize>,
    /// Open client connections per listener from one source address (IPv6:
    /// one /64); more are closed at accept. 0: no cap.
    pub max_connections_per_source: Option<usize>,
    /// `Strict-Transport-Security: max-age=N` on responses; 0: never.
    pub hsts_max_age: Option<u64>,
    /// The certificate modes whose hosts get HSTS (default: acme only).
    pub hsts_tls_modes: Option<Vec<String>>,
    /// Agent logins: distinct wrong passwords a source address (IPv6: its
    /// /64) may send before it must wait.
    pub login_failures_per_source: Option<u32>,
    /// Agent logins: distinct wrong passwords a sandbox takes from all
    /// sources before every source without a good login must wait.
    pub login_failures_per_sandbox: Option<u32>,
    /// Agent logins: the longest wait (the first is 1 s, then it doubles).
    pub login_max_backoff: Option<std::time::Duration>,
    /// Largest request head (request line and headers), in bytes.
    pub max_header_bytes: Option<usize>,
    /// TLS handshake of a client.
    pub handshake_timeout: Option<std::time::Duration>,
    /// Time a client has to send a complete request head.
    pub header_timeout: Option<std::time::Duration>,
    /// Idle client connections (HTTP/1 keep-alive, HTTP/2 with no stream) are closed after this.
    pub idle_timeout: Option<std::time::Duration>,
    /// TCP connect to a sandbox.
    pub upstream_connect_timeout: Option<std::time::Duration>,
    /// From the request sent to the response head received (then 504).
    pub upstream_response_timeout: Option<std::time::Duration>,
    /// Kept-alive connections to a sandbox unused for this long are closed.
    pub upstream_idle_timeout: Option<std::time::Duration>,
    /// HTTP/2: a PING when nothing came from the client for this long.
    pub h2_ping_interval: Option<std::time::Duration>,
    /// HTTP/2: a connection whose PING is not answered in this time is closed.
    pub h2_ping_timeout: Option<std::time::Duration>,
}

impl HttpSettings {
    /// Applies the configured values over the proxy's defaults.
    pub fn apply(&self, cfg: &mut httpgate::HttpConfig) {
        cfg.trusted_proxies.clone_from(&self.trusted_proxies);
        let set = |slot: &mut std::time::Duration, v: Option<std::time::Duration>| {
            if let Some(v) = v {
                *slot = v;
            }
        };
        set(&mut cfg.timeouts.handshake, self.handshake_timeout);
        set(&mut cfg.timeouts.header_read, self.header_timeout);
        set(&mut cfg.timeouts.idle, self.idle_timeout);
        set(
            &mut cfg.timeouts.upstream_connect,
            self.upstream_connect_timeout,
        );
        set(
            &mut cfg.timeouts.upstream_response,
            self.upstream_response_timeout,
        );
        set(
            &mut cfg.timeouts.upstream_pool_idle,
            self.upstream_idle_timeout,
        );
        set(&mut cfg.timeouts.h2_ping_interval, self.h2_ping_interval);
        set(&mut cfg.timeouts.h2_ping_timeout, self.h2_ping_timeout);
        if let Some(n) = self.max_connections {
            cfg.limits.max_connections = n;
        }
        if let Some(n) = self.max_connections_per_source {
            cfg.limits.max_connections_per_source = n;
        }
        if let Some(n) = self.hsts_max_age {
            cfg.hsts.max_age_secs = n;
        }
        if let Some(modes) = &self.hsts_tls_modes {
            let on = |m: &str| modes.iter().any(|x| x == m);
            cfg.hsts.acme = on("acme");
            cfg.hsts.manual = on("manual");
            cfg.hsts.internal = on("internal");
        }
        if let Some(n) = self.max_header_bytes {
            cfg.limits.max_header_bytes = n;
        }
        if let Some(n) = self.login_failures_per_source {
            cfg.login.source_free_failures = n;
        }
        if let Some(n) = self.login_failures_per_sandbox {
            cfg.login.sandbox_free_failures = n;
        }
        if let Some(d) = self.login_max_backoff {
            cfg.login.max_backoff = d;
            cfg.login.first_backoff = cfg.login.first_backoff.min(d);
        }
    }
}

/// An integer `http.KEY` within `lo..=hi`.
fn ranged(t: &toml::Table, key: &str, lo: i64, hi: i64, errs: &mut Vec<String>) -> Option<u64> {
    let n = take_int(t, key, errs)?;
    if (lo..=hi).contains(&n) {
        Some(n.unsigned_abs())
    } else {
        errs.push(format!(
            "`http.{key}` must be between {lo} and {hi}, not {n}"
        ));
        None
    }
}

const HTTP_KEYS: &[&str] = &[
    "trusted_proxies",
    "max_connections",
    "max_connections_per_source",
    "hsts_max_age_secs",
    "hsts_tls_modes",
    "login_failures_per_source",
    "login_failures_per_sandbox",
    "login_max_backoff_secs",
    "max_header_bytes",
    "handshake_timeout_secs",
    "header_timeout_secs",
    "idle_timeout_secs",
    "upstream_connect_timeout_secs",
    "upstream_response_timeout_secs",
    "upstream_idle_timeout_secs",
    "h2_ping_interval_secs",
    "h2_ping_timeout_secs",
];

fn read_http(table: &toml::Table, errs: &mut Vec<String>) -> HttpSettings {
    let mut h = HttpSettings::default();
    let Some(value) = table.get("http") else {
        return h;
    };
    let Some(t) = value.as_table() else {
        errs.push(format!("`http` must be a table, not {}", value.type_str()));
        return h;
    };
    for key in t.keys() {
        if !HTTP_KEYS.contains(&key.as_str()) {
            errs.push(format!(
                "unknown key `http.{key}` (known: {})",
                HTTP_KEYS.join(", ")
            ));
        }
    }
    for ip in take_list(t, "trusted_proxies", errs).unwrap_or_default() {
        match ip.parse() {
            Ok(a) => h.trusted_proxies.push(a),
            Err(_) => errs.push(format!(
                "`http.trusted_proxies`: {ip:?} is not an IP address"
            )),
        }
    }
    let size = |n: u64| usize::try_from(n).ok();
    h.max_connections = ranged(t, "max_connections", 1, 1_000_000, errs).and_then(size);
    h.max_connections_per_source =
        ranged(t, "max_connections_per_source", 0, 1_000_000, errs).and_then(size);
    h.hsts_max_age = ranged(t, "hsts_max_age_secs", 0, 2 * 365 * 86_400, errs);
    let count = |n: u64| u32::try_from(n).ok();
    h.login_failures_per_source =
        ranged(t, "login_failures_per_source", 1, 100_000, errs).and_then(count);
    h.login_failures_per_sandbox =
        ranged(t, "login_failures_per_sandbox", 1, 1_000_000, errs).and_then(count);
    h.login_max_backoff =
        ranged(t, "login_max_backoff_secs", 1, 86_400, errs).map(std::time::Duration::from_secs);
    if let Some(modes) = take_list(t, "hsts_tls_modes", errs) {
        for m in &modes {
            if !["acme", "manual", "internal"].contains(&m.as_str()) {
                errs.push(format!(
                    "`http.hsts_tls_modes`: {m:?} is not acme, manual or internal"
                ));
            }
        }
        h.hsts_tls_modes = Some(modes);
    }
    h.max_header_bytes = ranged(t, "max_header_bytes", 1024, 1024 * 1024, errs).and_then(size);
    let secs = |key: &str, errs: &mut Vec<String>| {
        ranged(t, key, 1, 86_400, errs).map(std::time::Duration::from_secs)
    };
    h.handshake_timeout = secs("handshake_timeout_secs", errs);
    h.header_timeout = secs("header_timeout_secs", errs);
    h.idle_timeout = secs("idle_timeout_secs", errs);
    h.upstream_connect_timeout = secs("upstream_connect_timeout_secs", errs);
    h.upstream_response_timeout = secs("upstream_response_timeout_secs", errs);
    h.upstream_idle_timeout = secs("upstream_idle_timeout_secs", errs);
    h.h2_ping_interval = secs("h2_ping_interval_secs", errs);
    h.h2_ping_timeout = secs("h2_ping_timeout_secs", errs);
    h
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

const PROVISION_KEYS: &[&str] = &[
    "mode",
    "packages",
    "apt_proxy",
    "agent",
    "agent_command",
    "agent_install",
    "llm_provider",
    "llm_key_file",
    "llm_base_url",
    "hook",
    "golden_alias",
];

fn read_provision(table: &toml::Table, errs: &mut Vec<String>) -> ProvisionConfig {
    let mut p = ProvisionConfig::default();
    let Some(value) = table.get("provision") else {
        return p;
    };
    let Some(t) = value.as_table() else {
        errs.push(format!(
            "`provision` must be a table, not {}",
            value.type_str()
        ));
        return p;
    };
    for key in t.keys() {
        if !PROVISION_KEYS.contains(&key.as_str()) {
            errs.push(format!(
                "unknown key `provision.{key}` (known: {})",
                PROVISION_KEYS.join(", ")
            ));
        }
    }
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
    if let Some(m) = take_string(t, "mode", errs) {
        match m.parse() {
            Ok(m) => p.mode = m,
            Err(e) => errs.push(format!("`provision.mode`: {e}")),
        }
    }
    if let Some(v) = one_of(
        "packages",
        take_string(t, "packages", errs),
        &["distro", "upstream"],
        errs,
    ) {
        p.packages = v;
    }
    p.apt_proxy = take_string(t, "apt_proxy", errs);
    if let Some(u) = &p.apt_proxy {
        if !(u.starts_with("http://") || u.starts_with("https://"))
            || u.contains(char::is_whitespace)
        {
            errs.push(format!(
                "`provision.apt_proxy` must be an http(s) URL, not {u:?}"
            ));
        }
    }
    if let Some(v) = one_of(
        "agent",
        take_string(t, "agent", errs),
        &["shelley", "command", "none"],
        errs,
    ) {
        p.agent = v;
    }
    p.agent_command = take_string(t, "agent_command", errs);
    if p.agent == "command"
        && p.agent_command
            .as_deref()
            .is_none_or(|c| c.trim().is_empty())
    {
        errs.push("`provision.agent = \"command\"` needs `provision.agent_command`".into());
    }
    p.agent_install = take_string(t, "agent_install", errs).map(PathBuf::from);
    p.llm_provider = one_of(
        "llm_provider",
        take_string(t, "llm_provider", errs),
        &["anthropic", "openai", "fireworks"],
        errs,
    );
    p.llm_key_file = take_string(t, "llm_key_file", errs).map(PathBuf::from);
    if p.llm_key_file.is_some() && p.llm_provider.is_none() {
        errs.push("`provision.llm_key_file` needs `provision.llm_provider`".into());
    }
    p.llm_base_url = take_string(t, "llm_base_url", errs);
    p.hook = take_string(t, "hook", errs).map(PathBuf::from);
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
    if let Some(a) = take_string(t, "golden_alias", errs) {
        if a.trim().is_empty() {
            errs.push("`provision.golden_alias` must not be empty".into());
        } else {
            p.golden_alias = a;
        }
    }
    p
}

/// Default image alias of `sandboxd create`.
pub const DEFAULT_IMAGE: &str = "debian/12";
/// Default period of the Incus reconcile, in seconds.
pub const DEFAULT_RECONCILE_SECS: u64 = 30;

/// Incus settings of the daemon.
#[derive(Debug, Clone)]
pub struct IncusConfig {
    /// Socket path; `None` finds the standard locations.
    pub socket: Option<PathBuf>,
    /// Image alias (or `URL:ALIAS` on a simplestreams server) used when
    /// `create` names none.
    pub default_image: String,
    /// Period of the full reconcile with Incus.
    pub reconcile_secs: u64,
}

/// Every problem found in the configuration.
#[derive(Debug, thiserror::Error)]
#[error("{}", render(.0))]
pub struct ConfigErrors(pub Vec<String>);

fn render(problems: &[String]) -> String {
    match problems {
        [one] => one.clone(),
        many => {
            let mut s = format!("{} problems in the configuration:", many.len());
            for p in many {
                s.push_str("\n  - ");
                s.push_str(p);
            }
            s
        }
    }
}

const KNOWN_KEYS: &[&str] = &[
    "state_dir",
    "admin_socket",
    "admin_group",
    "ssh_listen",
    "https_listen",
    "http_listen",
    "tls_mode",
    "acme_directory",
    "acme_ca_root",
    "acme_email",
    "acme_challenges",
    "log",
    "ssh_banner",
    "incus_socket",
    "default_image",
    "incus_reconcile_secs",
    "provision",
    "http",
    "internal_ca_suffixes",
    "ssh",
];

/// Raw values, before validation; `None` means not given.
#[derive(Default)]
struct Raw {
    state_dir: Option<String>,
    admin_socket: Option<String>,
    admin_group: Option<String>,
    ssh_listen: Option<Vec<String>>,
    https_listen: Option<Vec<String>>,
    http_listen: Option<Vec<String>>,
    tls_mode: Option<String>,
    acme_directory: Option<String>,
    acme_ca_root: Option<String>,
    acme_email: Option<String>,
    acme_challenges: Option<Vec<String>>,
    log: Option<String>,
    ssh_banner: Option<String>,
    incus_socket: Option<String>,
    default_image: Option<String>,
    incus_reconcile_secs: Option<i64>,
    provision: ProvisionConfig,
    http: HttpSettings,
    internal_ca_suffixes: Option<Vec<String>>,
    ssh: SshSettings,
}

fn take_int(table: &toml::Table, key: &str, errs: &mut Vec<String>) -> Option<i64> {
    match table.get(key)? {
        toml::Value::Integer(i) => Some(*i),
        other => {
            errs.push(format!(
                "`{key}` must be an integer, not {}",
                other.type_str()
            ));
            None
        }
    }
}

fn take_string(table: &toml::Table, key: &str, errs: &mut Vec<String>) -> Option<String> {
    match table.get(key)? {
        toml::Value::String(s) => Some(s.clone()),
        other => {
            errs.push(format!(
                "`{key}` must be a string, not {}",
                other.type_str()
            ));
            None
        }
    }
}

fn take_list(table: &toml::Table, key: &str, errs: &mut Vec<String>) -> Option<Vec<String>> {
    match table.get(key)? {
        toml::Value::Array(items) => {
            let mut out = Vec::new();
            for item in items {
                match item {
                    toml::Value::String(s) => out.push(s.clone()),
                    other => errs.push(format!(
                        "`{key}` must be a list of strings; found {}",
                        other.type_str()
                    )),
                }
            }
            Some(out)
        }
        toml::Value::String(s) => Some(vec![s.clone()]),
        other => {
            errs.push(format!(
                "`{key}` must be a list of strings, not {}",
                other.type_str()
            ));
            None
        }
    }
}

fn read_file(path: &Path, errs: &mut Vec<String>) -> Raw {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            errs.push(format!("cannot read config file {}: {e}", path.display()));
            return Raw::default();
        }
    };
    let table: toml::Table = match text.parse() {
        Ok(t) => t,
        Err(e) => {
            let msg = e.to_string().replace('\n', " ");
            errs.push(format!(
                "config file {} is not valid TOML: {msg}",
                path.display()
            ));
            return Raw::default();
        }
    };
    for key in table.keys() {
        if !KNOWN_KEYS.contains(&key.as_str()) {
            errs.push(format!(
                "unknown key `{key}` in {} (known: {})",
                path.display(),
                KNOWN_KEYS.join(", ")
            ));
        }
    }
    Raw {
        state_dir: take_string(&table, "state_dir", errs),
        admin_socket: take_string(&table, "admin_socket", errs),
        admin_group: take_string(&table, "admin_group", errs),
        ssh_listen: take_list(&table, "ssh_listen", errs),
        https_listen: take_list(&table, "https_listen", errs),
        http_listen: take_list(&table, "http_listen", errs),
        tls_mode: take_string(&table, "tls_mode", errs),
        acme_directory: take_string(&table, "acme_directory", errs),
        acme_ca_root: take_string(&table, "acme_ca_root", errs),
        acme_email: take_string(&table, "acme_email", errs),
        acme_challenges: take_list(&table, "acme_challenges", errs),
        log: take_string(&table, "log", errs),
        ssh_banner: take_string(&table, "ssh_banner", errs),
        incus_socket: take_string(&table, "incus_socket", errs),
        default_image: take_string(&table, "default_image", errs),
        incus_reconcile_secs: take_int(&table, "incus_reconcile_secs", errs),
        provision: read_provision(&table, errs),
        http: read_http(&table, errs),
        internal_ca_suffixes: take_list(&table, "internal_ca_suffixes", errs),
        ssh: read_ssh(&table, errs),
    }
}

fn addrs(
    key: &str,
    given: Option<Vec<String>>,
    default: &[&str],
    errs: &mut Vec<String>,
) -> Vec<SocketAddr> {
    let values = given.unwrap_or_else(|| default.iter().map(|s| s.to_string()).collect());
    let mut out = Vec::new();
    for v in values {
        match v.parse::<SocketAddr>() {
            Ok(a) if !out.contains(&a) => out.push(a),
            Ok(a) => errs.push(format!("`{key}`: {a} is listed twice")),
            Err(_) => errs.push(format!(
                "`{key}`: {v:?} is not an address like 0.0.0.0:2222 or [::]:2222"
            )),
        }
    }
    out
}

fn nonempty(v: Vec<String>) -> Option<Vec<String>> {
    (!v.is_empty()).then_some(v)
}

/// The `[ssh]` table: the SSH gate's limits. `None` keeps the gate's
/// built-in default (see `sshgate::GatewayConfig`).
#[derive(Debug, Clone, Default)]
pub struct SshSettings {
    /// Connections logging in, all sources (`start:rate:full`) [100:30:256].
    pub max_startups: Option<sshgate::Startups>,
    /// Connections logging in per source address, IPv6 per /64 [10:30:20].
    pub per_source_max_startups: Option<sshgate::Startups>,
    /// Time to log in; a connection that takes longer counts as a failed
    /// login for the ban [30 s].
    pub login_grace: Option<std::time::Duration>,
    /// Channels open at once on one connection [64].
    pub max_channels_per_connection: Option<usize>,
    /// Logged-in connections at once per sandbox [32].
    pub max_sessions_per_sandbox: Option<usize>,
    /// Channel window above the initial one, all channels together, in MiB [128].
    pub relay_buffer_mib: Option<u64>,
    /// The part of `relay_buffer_mib` one sandbox may hold, in MiB [48].
    pub relay_buffer_per_sandbox_mib: Option<u64>,
}

impl SshSettings {
    /// Applies the configured values over the gate's defaults.
    pub fn apply(&self, cfg: &mut sshgate::GatewayConfig) {
        if let Some(v) = self.max_startups {
            cfg.max_startups = v;
        }
        if let Some(v) = self.per_source_max_startups {
            cfg.per_source_max_startups = v;
        }
        if let Some(v) = self.login_grace {
            cfg.login_grace = v;
        }
        if let Some(v) = self.max_channels_per_connection {
            cfg.max_channels_per_connection = v;
        }
        if let Some(v) = self.max_sessions_per_sandbox {
            cfg.max_sessions_per_sandbox = v;
        }
        if let Some(v) = self.relay_buffer_mib {
            cfg.relay_budget = v * 1024 * 1024;
        }
        if let Some(v) = self.relay_buffer_per_sandbox_mib {
            cfg.relay_budget_per_sandbox = v * 1024 * 1024;
        }
    }
}

const SSH_KEYS: &[&str] = &[
    "max_startups",
    "per_source_max_startups",
    "login_grace_secs",
    "max_channels_per_connection",
    "max_sessions_per_sandbox",
    "relay_buffer_mib",
    "relay_buffer_per_sandbox_mib",
];

fn read_ssh(table: &toml::Table, errs: &mut Vec<String>) -> SshSettings {
    let mut s = SshSettings::default();
    let Some(value) = table.get("ssh") else {
        return s;
    };
    let Some(t) = value.as_table() else {
        errs.push(format!("`ssh` must be a table, not {}", value.type_str()));
        return s;
    };
    for key in t.keys() {
        if !SSH_KEYS.contains(&key.as_str()) {
            errs.push(format!(
                "unknown key `ssh.{key}` (known: {})",
                SSH_KEYS.join(", ")
            ));
        }
    }
    let ranged = |key: &str, lo: i64, hi: i64, errs: &mut Vec<String>| {
        let n = take_int(t, key, errs)?;
        if (lo..=hi).contains(&n) {
            Some(n.unsigned_abs())
        } else {
            errs.push(format!(
                "`ssh.{key}` must be between {lo} and {hi}, not {n}"
            ));
            None
        }
    };
    s.login_grace = ranged("login_grace_secs", 1, 600, errs).map(std::time::Duration::from_secs);
    let size = |n: u64| usize::try_from(n).ok();
    s.max_channels_per_connection =
        ranged("max_channels_per_connection", 1, 100_000, errs).and_then(size);
    s.max_sessions_per_sandbox =
        ranged("max_sessions_per_sandbox", 1, 100_000, errs).and_then(size);
    s.relay_buffer_mib = ranged("relay_buffer_mib", 0, 1024 * 1024, errs);
    s.relay_buffer_per_sandbox_mib = ranged("relay_buffer_per_sandbox_mib", 0, 1024 * 1024, errs);
    let startups = |key: &str, errs: &mut Vec<String>| match t.get(key)? {
        toml::Value::String(v) => match v.parse::<sshgate::Startups>() {
            Ok(x) => Some(x),
            Err(e) => {
                errs.push(format!("`ssh.{key}`: {e}"));
                None
            }
        },
        toml::Value::Integer(n) => match u32::try_from(*n) {
            Ok(n) if n > 0 => Some(sshgate::Startups::hard(n)),
            _ => {
                errs.push(format!("`ssh.{key}` must be positive, not {n}"));
                None
            }
        },
        other => {
            errs.push(format!(
                "`ssh.{key}` must be a string like \"10:30:100\", not {}",
                other.type_str()
            ));
            None
        }
    };
    s.max_startups = startups("max_startups", errs);
    s.per_source_max_startups = startups("per_source_max_startups", errs);
    s
}

/// Merges the file named by `--config` (if any) with the flags and validates
/// the result. `admin_socket` comes from the global option.
pub fn load(args: &ServeArgs, admin_socket: Option<PathBuf>) -> Result<Config, ConfigErrors> {
    let mut errs = Vec::new();
    let file = match &args.config {
        Some(path) => read_file(path, &mut errs),
        None => Raw::default(),
    };
    let state_dir = args
        .state_dir
        .clone()
        .or(file.state_dir.map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
    let admin_socket = admin_socket
        .or(file.admin_socket.map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_ADMIN_SOCKET));
    let ssh_listen = addrs(
        "ssh_listen",
        nonempty(args.ssh_listen.clone()).or(file.ssh_listen),
        &["0.0.0.0:2222", "[::]:2222"],
        &mut errs,
    );
    let https_listen = addrs(
        "https_listen",
        nonempty(args.https_listen.clone()).or(file.https_listen),
        &["0.0.0.0:443", "[::]:443"],
        &mut errs,
    );
    let http_listen = addrs(
        "http_listen",
        nonempty(args.http_listen.clone()).or(file.http_listen),
        &["0.0.0.0:80", "[::]:80"],
        &mut errs,
    );
    let tls_mode = match args.tls_mode.clone().or(file.tls_mode).as_deref() {
        None | Some("internal") => TlsMode::Internal,
        Some("acme") => TlsMode::Acme,
        Some(other) => {
            errs.push(format!(
                "`tls_mode` must be internal or acme, not {other:?}"
            ));
            TlsMode::Internal
        }
    };
    let acme_directory = args
        .acme_directory
        .clone()
        .or(file.acme_directory)
        .unwrap_or_else(|| DEFAULT_ACME_DIRECTORY.to_string());
    if !acme_directory.starts_with("https://") {
        errs.push(format!(
            "`acme_directory` must be an https:// URL, not {acme_directory:?}"
        ));
    }
    let acme_ca_root = args
        .acme_ca_root
        .clone()
        .or(file.acme_ca_root.map(PathBuf::from));
    if let Some(p) = &acme_ca_root {
        match std::fs::read_to_string(p) {
            Err(e) => errs.push(format!("`acme_ca_root` {}: {e}", p.display())),
            Ok(pem) if !pem.contains("-----BEGIN CERTIFICATE-----") => errs.push(format!(
                "`acme_ca_root` {}: no PEM certificate in it (the ACME server's TLS root, `-----BEGIN CERTIFICATE-----`)",
                p.display()
            )),
            Ok(_) => {}
        }
    }
    let acme_email = args.acme_email.clone().or(file.acme_email);
    if let Some(e) = &acme_email {
        if !e.contains('@') || e.contains(char::is_whitespace) {
            errs.push(format!("`acme_email` {e:?} is not an e-mail address"));
        }
    }
    let mut acme_challenges = Vec::new();
    for c in file
        .acme_challenges
        .unwrap_or_else(|| vec!["tls-alpn-01".into(), "http-01".into()])
    {
        let kind = match c.as_str() {
            "http-01" => httpgate::ChallengeKind::Http01,
            "tls-alpn-01" => httpgate::ChallengeKind::TlsAlpn01,
            other => {
                errs.push(format!(
                    "`acme_challenges`: {other:?} is not http-01 or tls-alpn-01"
                ));
                continue;
            }
        };
        if acme_challenges.contains(&kind) {
            errs.push(format!("`acme_challenges`: {c} is listed twice"));
        } else {
            acme_challenges.push(kind);
        }
    }
    if acme_challenges.is_empty() && !errs.iter().any(|e| e.contains("acme_challenges")) {
        errs.push("`acme_challenges` must name http-01, tls-alpn-01 or both".into());
    }
    let admin_group = file.admin_group;
    if let Some(g) = &admin_group {
        match nix::unistd::Group::from_name(g) {
            Ok(Some(_)) => {}
            Ok(None) => errs.push(format!("`admin_group`: no group named {g:?}")),
            Err(e) => errs.push(format!("`admin_group` {g:?}: {e}")),
        }
    }
    let log = file.log.unwrap_or_else(|| "info".to_string());
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&log) {
        errs.push(format!("`log` {log:?}: {e}"));
    }
    let incus = IncusConfig {
        socket: args
            .incus_socket
            .clone()
            .or(file.incus_socket.map(PathBuf::from)),
        default_image: file
            .default_image
            .unwrap_or_else(|| DEFAULT_IMAGE.to_string()),
        reconcile_secs: match file.incus_reconcile_secs {
            None => DEFAULT_RECONCILE_SECS,
            Some(n) if (1..=86_400).contains(&n) => n.unsigned_abs(),
            Some(n) => {
                errs.push(format!(
                    "`incus_reconcile_secs` must be between 1 and 86400, not {n}"
                ));
                DEFAULT_RECONCILE_SECS
            }
        },
    };
    if incus.default_image.trim().is_empty() {
        errs.push("`default_image` must not be empty".to_string());
    }
    let internal_ca_suffixes = ca_suffixes(file.internal_ca_suffixes, &mut errs);
    if !errs.is_empty() {
        return Err(ConfigErrors(errs));
    }
    Ok(Config {
        state_dir,
        admin_socket,
        admin_group,
        ssh_listen,
        https_listen,
        http_listen,
        tls_mode,
        acme_directory,
        acme_ca_root,
        acme_email,
        acme_challenges,
        log,
        ssh_banner: file.ssh_banner,
        incus,
        provision: file.provision,
        http: file.http,
        internal_ca_suffixes,
        ssh: file.ssh,
    })
}

/// `internal_ca_suffixes`: DNS names (leading and trailing dots are
/// allowed and dropped), at least one; the default is httpgate's list of names no
/// public CA issues for.
fn ca_suffixes(given: Option<Vec<String>>, errs: &mut Vec<String>) -> Vec<String> {
    let Some(given) = given else {
        return httpgate::DEFAULT_INTERNAL_SUFFIXES
            .iter()
            .map(|s| (*s).to_string())
            .collect();
    };
    let mut out: Vec<String> = Vec::new();
    for raw in given {
        let s = raw.trim().trim_matches('.').to_ascii_lowercase();
        let ok = !s.is_empty()
            && s.len() <= 253
            && s.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && !l.starts_with('-')
                    && !l.ends_with('-')
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if !ok {
            errs.push(format!(
                "`internal_ca_suffixes`: {raw:?} is not a DNS suffix like .test or .corp.example"
            ));
        } else if !out.contains(&s) {
            out.push(s);
        }
    }
    if out.is_empty() && !errs.iter().any(|e| e.contains("internal_ca_suffixes")) {
        errs.push("`internal_ca_suffixes` must name at least one DNS suffix".into());
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn with_file(text: &str) -> (tempfile::NamedTempFile, ServeArgs) {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        let args = ServeArgs {
            config: Some(f.path().to_path_buf()),
            ..Default::default()
        };
        (f, args)
    }

    #[test]
    fn flags_override_file() {
        let (_f, mut args) = with_file("state_dir = \"/a\"\nssh_listen = [\"127.0.0.1:1\"]\n");
        args.state_dir = Some("/b".into());
        let c = load(&args, None).unwrap();
        assert_eq!(c.state_dir, PathBuf::from("/b"));
        assert_eq!(c.ssh_listen, vec!["127.0.0.1:1".parse().unwrap()]);
        assert_eq!(c.admin_socket, PathBuf::from(DEFAULT_ADMIN_SOCKET));
    }

    #[test]
    fn every_problem_reported_at_once() {
        let (_f, args) = with_file(
            "bogus = 1\nssh_listen = [\"nope\"]\ntls_mode = \"x\"\nacme_directory = \"http://a\"\nstate_dir = 3\n",
        );
        let err = load(&args, None).unwrap_err();
        assert_eq!(err.0.len(), 5, "{err}");
        let text = err.to_string();
        for needle in ["bogus", "nope", "tls_mode", "acme_directory", "state_dir"] {
            assert!(text.contains(needle), "{needle} missing from {text}");
        }
    }

    #[test]
    fn provision_table_is_checked_key_by_key() {
        let (_f, args) = with_file(
            "[provision]\nmode = \"fast\"\nagent = \"command\"\nllm_key_file = \"/nonexistent/key\"\nbogus = 1\n",
        );
        let text = load(&args, None).unwrap_err().to_string();
        for needle in [
            "provision.mode",
            "agent_command",
            "llm_provider",
            "/nonexistent/key",
            "provision.bogus",
        ] {
            assert!(text.contains(needle), "{needle} missing from {text}");
        }
        let (_f, args) =
            with_file("[provision]\nmode = \"none\"\napt_proxy = \"http://198.18.0.1:3142\"\n");
        let p = load(&args, None).unwrap().provision;
        assert_eq!(p.mode, ProvisionMode::None);
        assert_eq!(p.golden_alias, DEFAULT_GOLDEN_ALIAS);
    }

    #[test]
    fn edge_limits_hsts_and_ca_suffixes() {
        let (_f, args) = with_file(
            "internal_ca_suffixes = [\".corp\", \"bad suffix\"]\n[http]\nhsts_tls_modes = [\"acme\", \"sometimes\"]\n\
             max_connections_per_source = -1\n",
        );
        let text = load(&args, None).unwrap_err().to_string();
        for needle in [
            "\"bad suffix\"",
            "\"sometimes\"",
            "max_connections_per_source",
        ] {
            assert!(text.contains(needle), "{needle} missing from {text}");
        }
        let (_f, args) = with_file(
            "internal_ca_suffixes = [\".Corp.\", \"lab\"]\n[http]\nmax_connections_per_source = 0\n\
             hsts_max_age_secs = 0\nhsts_tls_modes = [\"manual\"]\n",
        );
        let c = load(&args, None).unwrap();
        assert_eq!(c.internal_ca_suffixes, vec!["corp", "lab"]);
        let mut cfg = httpgate::HttpConfig::default();
        c.http.apply(&mut cfg);
        assert_eq!(cfg.limits.max_connections_per_source, 0);
        assert_eq!(cfg.hsts.max_age_secs, 0);
        assert!(cfg.hsts.manual && !cfg.hsts.acme && !cfg.hsts.internal);
        let (_f, args) = with_file("");
        let c = load(&args, None).unwrap();
        assert_eq!(c.internal_ca_suffixes.len(), 6);
        assert!(c.internal_ca_suffixes.contains(&"home.arpa".to_string()));
    }

    #[test]
    fn agent_login_limits_are_read_and_bounded() {
        let (_f, args) =
            with_file("[http]\nlogin_failures_per_source = 0\nlogin_max_backoff_secs = 100000\n");
        let text = load(&args, None).unwrap_err().to_string();
        for needle in [
            "http.login_failures_per_source",
            "http.login_max_backoff_secs",
        ] {
            assert!(text.contains(needle), "{needle} missing from {text}");
        }
        let (_f, args) = with_file(
            "[http]\nlogin_failures_per_source = 3\nlogin_failures_per_sandbox = 7\n\
             login_max_backoff_secs = 60\n",
        );
        let mut cfg = httpgate::HttpConfig::default();
        load(&args, None).unwrap().http.apply(&mut cfg);
        assert_eq!(cfg.login.source_free_failures, 3);
        assert_eq!(cfg.login.sandbox_free_failures, 7);
        assert_eq!(cfg.login.max_backoff, std::time::Duration::from_secs(60));
    }

    #[test]
    fn http_table_is_checked_key_by_key() {
        let (_f, args) = with_file(
            "[http]\ntrusted_proxies = [\"10.0.0.1\", \"nope\"]\nmax_connections = 0\nidle_timeout_secs = \"x\"\nbogus = 1\n",
        );
        let text = load(&args, None).unwrap_err().to_string();
        for needle in [
            "\"nope\"",
            "http.max_connections",
            "idle_timeout_secs",
            "http.bogus",
        ] {
            assert!(text.contains(needle), "{needle} missing from {text}");
        }
        let (_f, args) = with_file(
            "[http]\ntrusted_proxies = [\"10.0.0.1\", \"::1\"]\nidle_timeout_secs = 30\n\
             upstream_idle_timeout_secs = 7\nh2_ping_interval_secs = 11\nh2_ping_timeout_secs = 13\n",
        );
        let h = load(&args, None).unwrap().http;
        let mut cfg = httpgate::HttpConfig::default();
        let before = cfg.timeouts.upstream_connect;
        h.apply(&mut cfg);
        assert_eq!(cfg.trusted_proxies.len(), 2);
        assert_eq!(cfg.timeouts.idle, std::time::Duration::from_secs(30));
        assert_eq!(
            (
                cfg.timeouts.upstream_pool_idle,
                cfg.timeouts.h2_ping_interval,
                cfg.timeouts.h2_ping_timeout
            ),
            (
                std::time::Duration::from_secs(7),
                std::time::Duration::from_secs(11),
                std::time::Duration::from_secs(13)
            )
        );
        assert_eq!(
            cfg.timeouts.upstream_connect, before,
            "unset keys keep the default"
        );
    }

    #[test]
    fn ssh_table_is_checked_and_applied() {
        let (_f, args) = with_file(
            "[ssh]\nmax_startups = \"5:30:2\"\nper_source_max_startups = 0\n\
             max_channels_per_connection = 0\nlogin_grace_secs = \"x\"\nbogus = 1\n",
        );
        let text = load(&args, None).unwrap_err().to_string();
        for needle in [
            "ssh.max_startups",
            "ssh.per_source_max_startups",
            "ssh.max_channels_per_connection",
            "login_grace_secs",
            "ssh.bogus",
        ] {
            assert!(text.contains(needle), "{needle} missing from {text}");
        }
        let (_f, args) = with_file(
            "[ssh]\nmax_startups = \"50:20:100\"\nper_source_max_startups = 4\n\
             login_grace_secs = 20\nmax_sessions_per_sandbox = 8\nrelay_buffer_mib = 64\n",
        );
        let s = load(&args, None).unwrap().ssh;
        let mut cfg = sshgate::GatewayConfig::default();
        let channels = cfg.max_channels_per_connection;
        s.apply(&mut cfg);
        assert_eq!(cfg.max_startups.to_string(), "50:20:100");
        assert_eq!(cfg.per_source_max_startups, sshgate::Startups::hard(4));
        assert_eq!(cfg.login_grace, std::time::Duration::from_secs(20));
        assert_eq!(cfg.max_sessions_per_sandbox, 8);
        assert_eq!(cfg.relay_budget, 64 * 1024 * 1024);
        assert_eq!(
            cfg.max_channels_per_connection, channels,
            "unset keys keep the default"
        );
    }

    #[test]
    fn acme_and_http_settings_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let not_pem = dir.path().join("root.txt");
        std::fs::write(&not_pem, "hello").unwrap();
        let (_f, args) = with_file(&format!("acme_ca_root = \"{}\"\n", not_pem.display()));
        let text = load(&args, None).unwrap_err().to_string();
        assert!(text.contains("no PEM certificate"), "{text}");
        let (_f, args) = with_file("acme_challenges = [\"dns-01\"]\n");
        let text = load(&args, None).unwrap_err().to_string();
        assert!(
            text.contains("\"dns-01\" is not http-01 or tls-alpn-01"),
            "{text}"
        );
        let (_f, args) = with_file("acme_challenges = []\n");
        assert!(load(&args, None).is_err());
        let (_f, args) = with_file("acme_challenges = [\"http-01\"]\n");
        let c = load(&args, None).unwrap();
        assert_eq!(c.acme_challenges, vec![httpgate::ChallengeKind::Http01]);
        assert!(c.acme_ca_root.is_none());
    }

    #[test]
    fn empty_list_disables_a_listener() {
        let (_f, args) = with_file("http_listen = []\n");
        assert!(load(&args, None).unwrap().http_listen.is_empty());
    }
}
