//! Daemon configuration: a TOML file merged with `sandboxd serve` flags
//! (flags win), in two stages: collect raw values, then validate them all,
//! reporting every problem at once. Unknown keys are errors.
//!
//! Each key of the file is declared once, in a `config_keys!` block
//! ([`keys`]): its name, type, default and doc line, and for a table that
//! configures a component (`[provision]` in [`provision`], `[http]` in
//! [`http`], `[ssh]` in [`ssh`]) what it sets in that component's
//! configuration. The top level is declared here; its declared defaults
//! are the ones `load` uses and `serve --help` shows. Adding a key is its
//! declaration plus its line in the README's example (a unit test in
//! `keys` holds the README to the declarations).
//!
//! The daemon's settings come only from here. Other environment variables
//! are read where they are used: `SANDBOXD_ADMIN_SOCKET` by `cli` (the
//! `--admin-socket` option), `SANDBOXD_DAEMON_USER` by `client`,
//! `RUST_LOG` by `daemon` (over `log`), `NOTIFY_SOCKET`, `WATCHDOG_USEC`
//! and `WATCHDOG_PID` by `notify`, and `PATH` by `setup`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::Args;

pub mod http;
pub mod keys;
mod kinds;
pub mod provision;
pub mod ssh;

pub use http::HttpSettings;
pub use provision::{ProvisionConfig, ProvisionMode, DEFAULT_GOLDEN_ALIAS};
pub use ssh::SshSettings;

use keys::{Int, List, Str, Table};

/// Default admin socket path (declared with the key `admin_socket`).
pub const DEFAULT_ADMIN_SOCKET: &str = keys::declared_str(RawFile::KEYS, "admin_socket");
/// Default state directory (declared with the key `state_dir`).
pub const DEFAULT_STATE_DIR: &str = keys::declared_str(RawFile::KEYS, "state_dir");

/// Flags of `sandboxd serve`.
#[derive(Debug, Clone, Default, Args)]
pub struct ServeArgs {
    /// TOML configuration file; flags given here override its values.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Directory for the database, keys and certificates (created 0700).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    // Address for the SSH router (repeatable), and its declared default.
    #[arg(long, value_name = "ADDR",
          help = keys::flag_help("Address for the SSH router (repeatable)", "ssh_listen"))]
    pub ssh_listen: Vec<String>,
    #[arg(long, value_name = "ADDR",
          help = keys::flag_help("Address for HTTPS (repeatable)", "https_listen"))]
    pub https_listen: Vec<String>,
    #[arg(long, value_name = "ADDR", help = keys::flag_help(
        "Address for plain HTTP: ACME HTTP-01 and redirects (repeatable)",
        "http_listen"
    ))]
    pub http_listen: Vec<String>,
    /// Default certificate source for new domains.
    #[arg(long, value_name = "MODE", value_parser = default_tls_mode_parser())]
    pub tls_mode: Option<TlsMode>,
    #[arg(long, value_name = "URL", help = keys::flag_help("ACME directory URL", "acme_directory"))]
    pub acme_directory: Option<String>,
    /// Extra PEM root to trust for the ACME server's own TLS (a test CA).
    #[arg(long, value_name = "FILE")]
    pub acme_ca_root: Option<PathBuf>,
    /// Contact e-mail for the ACME account.
    #[arg(long, value_name = "EMAIL")]
    pub acme_email: Option<String>,
    #[arg(long, value_name = "PATH", help = keys::flag_help("Incus unix socket", "incus_socket"))]
    pub incus_socket: Option<PathBuf>,
}

/// Where certificates come from: the store's mode, of which the daemon's
/// default may be only `internal` or `acme` (see [`default_tls_mode`]).
pub use store::TlsMode;

/// The modes a daemon's default may take: `manual` needs files that only a
/// sandbox names.
pub const DEFAULT_TLS_MODES: [TlsMode; 2] = [TlsMode::Internal, TlsMode::Acme];

/// The daemon's default TLS mode from its name (`tls_mode`, `--tls-mode`).
pub fn default_tls_mode(name: &str) -> Result<TlsMode, String> {
    match name.parse::<TlsMode>() {
        Ok(m) if DEFAULT_TLS_MODES.contains(&m) => Ok(m),
        _ => Err(format!("`tls_mode` must be internal or acme, not {name:?}")),
    }
}

/// `--tls-mode`: one of [`DEFAULT_TLS_MODES`], listed in `--help`.
fn default_tls_mode_parser() -> impl clap::builder::TypedValueParser<Value = TlsMode> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(DEFAULT_TLS_MODES.map(TlsMode::as_str))
        .try_map(|s| default_tls_mode(&s))
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
    /// Default certificate source of new domains: `internal` or `acme`,
    /// never `manual` (refused when read).
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

impl Config {
    /// The default mode as the HTTPS gate's routes take it.
    pub fn default_route_tls(&self) -> httpgate::TlsMode {
        match self.tls_mode {
            TlsMode::Acme => httpgate::TlsMode::Acme,
            // `manual` is refused as a default when the config is read.
            TlsMode::Internal | TlsMode::Manual => httpgate::TlsMode::Internal,
        }
    }
}

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

keys::config_keys! {
    /// The top level of the configuration file as read; `None` means not
    /// given. (Its tables' fields stay empty: their modules read them.)
    #[allow(dead_code)]
    pub(crate) struct RawFile in "" {
        /// Directory of the database, keys and certificates (created 0700).
        state_dir: Str = "\"/var/lib/sandboxd\"",
        /// The admin API's unix socket.
        admin_socket: Str = "\"/run/sandboxd/admin.sock\"",
        /// Members of this group may use the admin socket (besides root).
        admin_group: Str = "none",
        /// Addresses of the SSH router.
        ssh_listen: List = "[\"0.0.0.0:2222\", \"[::]:2222\"]",
        /// Addresses of the HTTPS proxy.
        https_listen: List = "[\"0.0.0.0:443\", \"[::]:443\"]",
        /// Addresses of plain HTTP (ACME HTTP-01 and redirects).
        http_listen: List = "[\"0.0.0.0:80\", \"[::]:80\"]",
        /// Default certificate source of new domains: internal or acme.
        tls_mode: Str = "\"internal\"",
        /// ACME directory URL.
        acme_directory: Str = "\"https://acme-v02.api.letsencrypt.org/directory\"",
        /// Extra PEM root to trust for the ACME server's own TLS.
        acme_ca_root: Str = "none",
        /// Contact e-mail of the ACME account.
        acme_email: Str = "none",
        /// ACME challenge types in order of preference.
        acme_challenges: List = "[\"tls-alpn-01\", \"http-01\"]",
        /// `tracing` filter, e.g. info or sandboxd=debug,info.
        log: Str = "\"info\"",
        /// Text shown to SSH clients before authentication.
        ssh_banner: Str = "none",
        /// Incus unix socket.
        incus_socket: Str = "/var/lib/incus/unix.socket or /run/incus/unix.socket",
        /// Image alias of `create` without --image.
        default_image: Str = "\"debian/12\"",
        /// Seconds between full reconciles with Incus.
        incus_reconcile_secs: Int<1, 86_400> = "30",
        /// DNS suffixes the internal CA may issue for.
        internal_ca_suffixes: List = "httpgate's list of names no public CA issues for",
        /// What containers get (see the `provision` module).
        provision: Table = "",
        /// The HTTPS proxy's limits and timeouts (see the `http` module).
        http: Table = "",
        /// The SSH gate's limits (see the `ssh` module).
        ssh: Table = "",
    }
}

/// The configuration file, read: its top-level values and its tables.
#[derive(Default)]
struct Raw {
    file: RawFile,
    provision: ProvisionConfig,
    http: HttpSettings,
    ssh: SshSettings,
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
    keys::check_unknown(&table, "", RawFile::KEYS, Some(path), errs);
    Raw {
        file: RawFile::read_known(&table, errs),
        provision: provision::read(&table, errs),
        http: HttpSettings::from_parent(&table, errs),
        ssh: SshSettings::from_parent(&table, errs),
    }
}

fn addrs(key: &str, given: Option<Vec<String>>, errs: &mut Vec<String>) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for v in given.unwrap_or_default() {
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

/// Merges the file named by `--config` (if any) with the flags and validates
/// the result. `admin_socket` comes from the global option. Flags win over
/// the file, and the file over the declared defaults (`RawFile::defaults`),
/// the only place a top-level default is written.
pub fn load(args: &ServeArgs, admin_socket: Option<PathBuf>) -> Result<Config, ConfigErrors> {
    let mut errs = Vec::new();
    let raw = match &args.config {
        Some(path) => read_file(path, &mut errs),
        None => Raw::default(),
    };
    let Raw {
        file,
        provision,
        http,
        ssh,
    } = raw;
    let file = file.or(RawFile::defaults());
    let state_dir = args
        .state_dir
        .clone()
        .or(file.state_dir.map(PathBuf::from))
        .unwrap_or_default();
    let admin_socket = admin_socket
        .or(file.admin_socket.map(PathBuf::from))
        .unwrap_or_default();
    let ssh_listen = addrs(
        "ssh_listen",
        nonempty(args.ssh_listen.clone()).or(file.ssh_listen),
        &mut errs,
    );
    let https_listen = addrs(
        "https_listen",
        nonempty(args.https_listen.clone()).or(file.https_listen),
        &mut errs,
    );
    let http_listen = addrs(
        "http_listen",
        nonempty(args.http_listen.clone()).or(file.http_listen),
        &mut errs,
    );
    let from_file = file.tls_mode.map(|name| default_tls_mode(&name));
    let tls_mode = match args.tls_mode.map(Ok).or(from_file) {
        None => TlsMode::Internal,
        Some(Ok(mode)) => mode,
        Some(Err(e)) => {
            errs.push(e);
            TlsMode::Internal
        }
    };
    let acme_directory = args
        .acme_directory
        .clone()
        .or(file.acme_directory)
        .unwrap_or_default();
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
    for c in file.acme_challenges.unwrap_or_default() {
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
    let log = file.log.unwrap_or_default();
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&log) {
        errs.push(format!("`log` {log:?}: {e}"));
    }
    let incus = IncusConfig {
        socket: args
            .incus_socket
            .clone()
            .or(file.incus_socket.map(PathBuf::from)),
        default_image: file.default_image.unwrap_or_default(),
        reconcile_secs: file.incus_reconcile_secs.unwrap_or_default(),
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
        provision,
        http,
        internal_ca_suffixes,
        ssh,
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
mod tests;
