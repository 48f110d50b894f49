//! CLI commands of the Incus lifecycle (create, start/stop/restart, delete,
//! snapshots, import, list with live figures, top): argument definitions and
//! their admin API calls. Progress of long operations is printed on stderr,
//! one line per step; results on stdout.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use http::Method;

use crate::api::incus::{
    CreateSandbox, ImageBuild, ImageView, ImportSandbox, LlmKey, SandboxStats, SnapshotRequest,
    SnapshotView, StatsAnswer, StepOutcome, UnmanagedInstance,
};
use crate::api::{BackendKind, Event, SandboxView, StatusKind};
use crate::cli::out::{errln, out, outln};
use crate::cli::{print_json, read_key_files, table};
use crate::client::Client;

const NONE: Option<&()> = None;

#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// Sandbox name: a DNS label, also the SSH user name and the container name.
    pub name: String,
    /// Public domain of the app; the agent UI is served at shelley.DOMAIN.
    #[arg(long)]
    pub domain: String,
    /// Image: a local alias, or https://SERVER:ALIAS on a simplestreams
    /// server [default: the daemon's `default_image`].
    #[arg(long, value_name = "ALIAS-OR-REMOTE")]
    pub image: Option<String>,
    /// Client public key file(s) allowed in (authorized_keys format, '-' for stdin).
    #[arg(long = "ssh-key", value_name = "FILE", required = true, num_args = 1..)]
    pub ssh_keys: Vec<PathBuf>,
    #[arg(long, default_value_t = store::DEFAULT_APP_PORT)]
    pub app_port: u16,
    /// Login user made in the container.
    #[arg(long, default_value = crate::lifecycle::DEFAULT_USER)]
    pub user: String,
    /// CPU limit (number of CPUs).
    #[arg(long, value_name = "N")]
    pub cpu: Option<u32>,
    /// Memory limit, e.g. 2GiB.
    #[arg(long, value_name = "SIZE")]
    pub memory: Option<String>,
    /// Root disk size, e.g. 10GiB.
    #[arg(long, value_name = "SIZE")]
    pub disk: Option<String>,
    #[command(flatten)]
    pub access: crate::cli::AccessArgs,
    /// How much to install: auto (per-sandbox steps on a golden image,
    /// everything on others), full, sandbox or none [default: the daemon's
    /// `provision.mode`].
    #[arg(long, value_name = "MODE")]
    pub provision: Option<crate::config::ProvisionMode>,
    /// LLM provider of the key given by --llm-key-file.
    #[arg(long, value_parser = ["anthropic", "openai", "fireworks"], requires = "llm_key_file")]
    pub llm_provider: Option<String>,
    /// File holding the LLM provider's API key ('-' for stdin); installed
    /// 0600 in the container, never on a command line.
    #[arg(long, value_name = "FILE", requires = "llm_provider")]
    pub llm_key_file: Option<PathBuf>,
    /// Base URL of the LLM provider's API (a proxy or gateway).
    #[arg(long, value_name = "URL", requires = "llm_provider")]
    pub llm_base_url: Option<String>,
    /// Script run last in the container, as root.
    #[arg(long, value_name = "FILE")]
    pub hook: Option<PathBuf>,
    #[command(flatten)]
    pub egress: EgressArgs,
}

/// The egress policy of a new or adopted sandbox.
#[derive(Debug, clap::Args)]
pub struct EgressArgs {
    /// What the container may reach: open (all but other sandboxes),
    /// restricted (the internet; no private, link-local, carrier-grade NAT
    /// or host addresses except DHCP, DNS and the package cache) or
    /// allowlist (only --allow destinations, plus DHCP, DNS and the cache).
    #[arg(long, value_name = "MODE", default_value = "restricted",
          value_parser = ["open", "restricted", "allowlist"])]
    pub egress: String,
    /// With --egress allowlist: an IPv4 address, CIDR or DNS name
    /// (repeatable; names are resolved when the policy is applied: at
    /// create/import, `sandboxd egress` and daemon start).
    #[arg(long = "allow", value_name = "CIDR-OR-NAME")]
    pub allow: Vec<String>,
}

impl EgressArgs {
    fn request(self) -> crate::api::incus::SetEgress {
        crate::api::incus::SetEgress {
            mode: self.egress,
            allow: self.allow,
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct EgressCommandArgs {
    pub name: String,
    /// open, restricted or allowlist.
    #[arg(value_parser = ["open", "restricted", "allowlist"])]
    pub mode: String,
    /// With allowlist: an IPv4 address, CIDR or DNS name (repeatable;
    /// names are resolved now, and again at each daemon start).
    #[arg(long = "allow", value_name = "CIDR-OR-NAME")]
    pub allow: Vec<String>,
}

#[derive(Debug, clap::Subcommand)]
pub enum ImageCommand {
    /// Provision a container from BASE and publish it as the golden image
    /// that `create` clones: a new sandbox then needs only its own steps.
    Build {
        /// Base image: a local alias or https://SERVER:ALIAS [default: the
        /// daemon's `default_image`].
        #[arg(long, value_name = "IMAGE")]
        base: Option<String>,
        /// Alias to publish [default: the daemon's `provision.golden_alias`].
        #[arg(long)]
        alias: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// Instance to adopt; without it, list the instances no sandbox manages.
    pub instance: Option<String>,
    #[arg(long, requires = "instance")]
    pub domain: Option<String>,
    #[arg(long = "ssh-key", value_name = "FILE", num_args = 1.., requires = "instance")]
    pub ssh_keys: Vec<PathBuf>,
    #[arg(long, default_value_t = store::DEFAULT_APP_PORT)]
    pub app_port: u16,
    #[arg(long, default_value = crate::lifecycle::DEFAULT_USER)]
    pub user: String,
    /// With no INSTANCE: print a JSON array.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub access: crate::cli::AccessArgs,
    #[command(flatten)]
    pub egress: EgressArgs,
}

#[derive(Debug, clap::Subcommand)]
pub enum SnapshotCommand {
    /// Take a snapshot (named snap-UNIXTIME unless SNAP is given).
    Create { name: String, snap: Option<String> },
    /// List a sandbox's snapshots.
    List {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Restore a snapshot (a running sandbox is stopped, restored, started).
    Restore { name: String, snap: String },
    /// Delete a snapshot.
    Delete { name: String, snap: String },
}

/// Draws the progress of a streamed operation on stderr.
fn progress_printer() -> impl FnMut(&Event) {
    move |ev| match ev {
        Event::Progress { step, done, total } if *total > 0 => {
            errln!("[{done}/{total}] {step}");
        }
        Event::Progress { step, .. } => errln!("{step}"),
        Event::Message { text } => errln!("      {text}"),
        Event::Login { .. } | Event::Done { .. } | Event::Error { .. } => {}
    }
}

async fn print_live(client: &Client, sb: &SandboxView, verb: &str) -> Result<()> {
    let addr = sb
        .assigned_ipv4
        .as_deref()
        .or(sb.addresses.first().map(String::as_str))
        .unwrap_or("-");
    let ssh = crate::cli::ssh_command(crate::cli::ssh_port(client).await, &sb.name);
    outln!(
        "{verb} {}: {ssh}, https://{} (container address {addr})",
        sb.name,
        sb.domain
    );
    Ok(())
}

/// Runs a streamed create or import: progress on stderr, and the login the
/// daemon made (if it made one) on stdout once the operation ended, whether
/// it succeeded or not (a failed create keeps its record, and the login).
async fn create_or_import(client: &Client, path: &str, body: Vec<u8>) -> Result<SandboxView> {
    let mut login: Option<(String, String)> = None;
    let mut printer = progress_printer();
    let result = client
        .stream(Method::POST, path, Some(body), |ev| match ev {
            Event::Login { user, password } => login = Some((user.clone(), password.0.clone())),
            other => printer(other),
        })
        .await;
    let view = result.and_then(|v| Ok(serde_json::from_value::<SandboxView>(v)?));
    if let Some((user, password)) = login {
        let name = view.as_ref().map(|sb| sb.name.as_str()).unwrap_or("NAME");
        outln!("agent login (shown only now): user {user}, password {password}");
        outln!("  change it with: sandboxd auth {name} {user}");
    }
    view
}

pub async fn create(client: &Client, a: CreateArgs) -> Result<()> {
    let (tls_cert_file, tls_key_file) = a.access.tls_files()?;
    let req = CreateSandbox {
        name: a.name,
        domain: a.domain,
        image: a.image,
        ssh_keys: read_key_files(&a.ssh_keys)?,
        app_port: Some(a.app_port),
        user: Some(a.user),
        cpu: a.cpu,
        memory: a.memory,
        disk: a.disk,
        auth: a.access.auth()?,
        tls_mode: a.access.tls_mode,
        tls_cert_file,
        tls_key_file,
        provision: a.provision,
        llm: match (a.llm_provider, a.llm_key_file) {
            (Some(provider), Some(file)) => Some(LlmKey {
                provider,
                key: read_secret_file(&file)?,
                base_url: a.llm_base_url,
            }),
            _ => None,
        },
        hook: match a.hook {
            Some(f) => Some(
                std::fs::read_to_string(&f)
                    .with_context(|| format!("reading hook script {}", f.display()))?,
            ),
            None => None,
        },
        egress: Some(a.egress.request()),
    };
    let body = serde_json::to_vec(&req)?;
    let sb = create_or_import(client, "/v1/incus/create", body).await?;
    print_live(client, &sb, "created").await?;
    Ok(())
}

/// Reads a one-line secret from a file or stdin (`-`): surrounding
/// whitespace is dropped, an empty or multi-line value is refused.
fn read_secret_file(path: &std::path::Path) -> Result<String> {
    let text = if path.as_os_str() == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
            .context("reading the key from stdin")?;
        s
    } else {
        std::fs::read_to_string(path)
            .with_context(|| format!("reading the key file {}", path.display()))?
    };
    let key = text.trim();
    if key.is_empty() {
        bail!("the key file {} is empty", path.display());
    }
    if key.contains(['\n', '\r', '\0']) {
        bail!("the key file {} holds more than one line", path.display());
    }
    Ok(key.to_string())
}

pub async fn image(client: &Client, cmd: ImageCommand) -> Result<()> {
    match cmd {
        ImageCommand::Build { base, alias, json } => {
            let body = serde_json::to_vec(&ImageBuild { base, alias })?;
            let result = client
                .stream(
                    Method::POST,
                    "/v1/incus/images/build",
                    Some(body),
                    progress_printer(),
                )
                .await?;
            let img: ImageView = serde_json::from_value(result)?;
            if json {
                print_json(&img)?;
            } else {
                outln!(
                    "published {} ({}, {:.1} MiB, from {}) in {:.0} s",
                    img.alias,
                    &img.fingerprint[..img.fingerprint.len().min(12)],
                    img.size_bytes as f64 / 1048576.0,
                    img.base,
                    img.seconds
                );
            }
        }
    }
    Ok(())
}

pub async fn update_agent(client: &Client, name: &str) -> Result<()> {
    let path = format!("/v1/incus/sandboxes/{name}/update-agent");
    let result = client
        .stream(Method::POST, &path, None, progress_printer())
        .await?;
    let step: StepOutcome = serde_json::from_value(result)?;
    outln!(
        "{name}: agent {} ({})",
        if step.changed { "updated" } else { "unchanged" },
        step.detail
    );
    Ok(())
}

pub async fn import(client: &Client, a: ImportArgs) -> Result<()> {
    let Some(instance) = a.instance else {
        if a.access.auth_user.is_some()
            || a.access.tls_mode.is_some()
            || a.access.tls_cert_file.is_some()
        {
            bail!("--auth-user and --tls-* options need the INSTANCE to adopt");
        }
        let list: Vec<UnmanagedInstance> = client
            .call(Method::GET, "/v1/incus/unmanaged", NONE)
            .await?;
        if a.json {
            return print_json(&list);
        }
        let rows = list
            .iter()
            .map(|i| vec![i.name.clone(), i.status.clone(), i.kind.clone()])
            .collect();
        out!("{}", table(&["INSTANCE", "STATUS", "TYPE"], rows));
        return Ok(());
    };
    let Some(domain) = a.domain else {
        bail!("adopting {instance} needs --domain DOMAIN and --ssh-key FILE");
    };
    if a.ssh_keys.is_empty() {
        bail!("adopting {instance} needs at least one --ssh-key FILE");
    }
    let (tls_cert_file, tls_key_file) = a.access.tls_files()?;
    let req = ImportSandbox {
        instance,
        domain,
        ssh_keys: read_key_files(&a.ssh_keys)?,
        app_port: Some(a.app_port),
        user: Some(a.user),
        auth: a.access.auth()?,
        tls_mode: a.access.tls_mode,
        tls_cert_file,
        tls_key_file,
        egress: Some(a.egress.request()),
    };
    let body = serde_json::to_vec(&req)?;
    let sb = create_or_import(client, "/v1/incus/import", body).await?;
    print_live(client, &sb, "adopted").await?;
    Ok(())
}

/// A power action of `start`, `stop` and `restart`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Power {
    Start,
    Stop,
    Restart,
}

impl Power {
    /// The last segment of the action's path.
    fn path(self) -> &'static str {
        match self {
            Power::Start => "start",
            Power::Stop => "stop",
            Power::Restart => "restart",
        }
    }

    /// The past tense the CLI reports.
    fn past(self) -> &'static str {
        match self {
            Power::Start => "started",
            Power::Stop => "stopped",
            Power::Restart => "restarted",
        }
    }
}

pub async fn state_change(client: &Client, name: &str, action: Power) -> Result<()> {
    let sb: SandboxView = client
        .call(
            Method::POST,
            &format!("/v1/incus/sandboxes/{name}/{}", action.path()),
            NONE,
        )
        .await?;
    let past = action.past();
    if sb.status == StatusKind::Running {
        print_live(client, &sb, past).await?;
    } else {
        outln!("{past} {}", sb.name);
    }
    Ok(())
}

pub async fn egress(client: &Client, a: EgressCommandArgs) -> Result<()> {
    let req = crate::api::incus::SetEgress {
        mode: a.mode,
        allow: a.allow,
    };
    let sb: SandboxView = client
        .call(
            Method::POST,
            &format!("/v1/incus/sandboxes/{}/egress", a.name),
            Some(&req),
        )
        .await?;
    let mode = sb.egress.map_or("-", |m| m.as_str());
    match sb.egress_allow.as_slice() {
        [] => outln!("egress of {}: {mode}", sb.name),
        allow => outln!("egress of {}: {mode} ({})", sb.name, allow.join(", ")),
    }
    Ok(())
}

pub async fn delete(client: &Client, name: &str) -> Result<()> {
    let sb: SandboxView = client
        .call(Method::DELETE, &format!("/v1/incus/sandboxes/{name}"), NONE)
        .await?;
    outln!("deleted {} ({}) and its container", sb.name, sb.domain);
    Ok(())
}

pub async fn snapshot(client: &Client, cmd: SnapshotCommand) -> Result<()> {
    match cmd {
        SnapshotCommand::Create { name, snap } => {
            let s: SnapshotView = client
                .call(
                    Method::POST,
                    &format!("/v1/incus/sandboxes/{name}/snapshots"),
                    Some(&SnapshotRequest { name: snap }),
                )
                .await?;
            outln!("snapshot {} of {name} taken", s.name);
        }
        SnapshotCommand::List { name, json } => {
            let all: Vec<SnapshotView> = client
                .call(
                    Method::GET,
                    &format!("/v1/incus/sandboxes/{name}/snapshots"),
                    NONE,
                )
                .await?;
            if json {
                return print_json(&all);
            }
            let rows = all
                .iter()
                .map(|s| vec![s.name.clone(), s.created_at.clone()])
                .collect();
            out!("{}", table(&["SNAPSHOT", "CREATED"], rows));
        }
        SnapshotCommand::Restore { name, snap } => {
            let sb: SandboxView = client
                .call(
                    Method::POST,
                    &format!("/v1/incus/sandboxes/{name}/snapshots/{snap}/restore"),
                    NONE,
                )
                .await?;
            outln!("restored {name} to {snap}; now {}", sb.status);
        }
        SnapshotCommand::Delete { name, snap } => {
            let _: serde::de::IgnoredAny = client
                .call(
                    Method::DELETE,
                    &format!("/v1/incus/sandboxes/{name}/snapshots/{snap}"),
                    NONE,
                )
                .await?;
            outln!("snapshot {snap} of {name} deleted");
        }
    }
    Ok(())
}

/// One row of `list` and `top`: a sandbox's view and its live Incus
/// figures; in `--json`, one object with the figures' fields beside the
/// view's (null for static sandboxes and when Incus is unreachable).
#[derive(Debug, serde::Serialize)]
struct ListRow {
    #[serde(flatten)]
    sandbox: SandboxView,
    #[serde(flatten)]
    live: Live,
}

/// Live figures of a sandbox (see [`SandboxStats`]).
#[derive(Debug, Default, serde::Serialize)]
struct Live {
    state: Option<String>,
    ipv4: Option<String>,
    ipv6: Option<String>,
    cpu_percent: Option<f64>,
    memory_bytes: Option<u64>,
    memory_limit_bytes: Option<u64>,
    disk_bytes: Option<u64>,
}

impl From<&SandboxStats> for Live {
    fn from(s: &SandboxStats) -> Self {
        Live {
            state: Some(s.state.clone()),
            ipv4: s.ipv4.clone(),
            ipv6: s.ipv6.clone(),
            cpu_percent: s.cpu_percent,
            memory_bytes: s.memory_bytes,
            memory_limit_bytes: s.memory_limit_bytes,
            disk_bytes: s.disk_bytes,
        }
    }
}

/// Every sandbox with its live figures, and the reason there are none
/// when Incus is unreachable.
async fn list_with_stats(client: &Client) -> Result<(Vec<ListRow>, Option<String>)> {
    let (all, stats) = tokio::join!(
        client.call::<Vec<SandboxView>>(Method::GET, "/v1/sandboxes", NONE),
        client.call::<StatsAnswer>(Method::GET, "/v1/incus/stats", NONE),
    );
    let all = all?;
    let stats = stats.context("reading live figures")?;
    let rows = all
        .into_iter()
        .map(|sandbox| {
            let live = stats
                .sandboxes
                .iter()
                .find(|s| s.name == sandbox.name)
                .map(Live::from)
                .unwrap_or_default();
            ListRow { sandbox, live }
        })
        .collect();
    Ok((rows, stats.incus_error))
}

fn human_bytes(b: Option<u64>) -> String {
    let Some(b) = b else {
        return "-".into();
    };
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b}B")
    } else {
        format!("{v:.1}{}", UNITS[i])
    }
}

fn render_table(all: &[ListRow]) -> String {
    let dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let rows = all
        .iter()
        .map(|ListRow { sandbox: sb, live }| {
            let upstream = match sb.backend {
                BackendKind::Static => format!("{}:{}", sb.upstream, sb.ssh_port),
                BackendKind::Incus => format!("incus:{}", sb.upstream),
            };
            let cpu = live
                .cpu_percent
                .map(|c| format!("{c:.1}%"))
                .unwrap_or_else(|| "-".into());
            let mem = match (live.memory_bytes, live.memory_limit_bytes) {
                (Some(m), Some(l)) => format!("{}/{}", human_bytes(Some(m)), human_bytes(Some(l))),
                (m, _) => human_bytes(m),
            };
            vec![
                sb.name.clone(),
                sb.domain.clone(),
                sb.status.to_string(),
                upstream,
                dash(&live.ipv4),
                dash(&live.ipv6),
                cpu,
                mem,
                human_bytes(live.disk_bytes),
                sb.app_port.to_string(),
                sb.client_keys.len().to_string(),
                crate::cli::login_state(sb),
            ]
        })
        .collect();
    table(
        &[
            "NAME", "DOMAIN", "STATUS", "UPSTREAM", "IPV4", "IPV6", "CPU", "MEMORY", "DISK", "APP",
            "KEYS", "AUTH",
        ],
        rows,
    )
}

/// `sandboxd list`: one admin call for the records, one for live figures
/// (one Incus listing).
pub async fn list(client: &Client, json: bool) -> Result<()> {
    let (all, incus_error) = list_with_stats(client).await?;
    if json {
        return print_json(&all);
    }
    out!("{}", render_table(&all));
    if let Some(e) = incus_error {
        errln!("note: no live figures: {e}");
    }
    Ok(())
}

/// `sandboxd top`: `list` refreshed every `interval`, `count` times (or
/// until interrupted).
pub async fn top(client: &Client, count: Option<u64>, interval: f64) -> Result<()> {
    if !(0.1..=3600.0).contains(&interval) {
        bail!("--interval must be between 0.1 and 3600 seconds");
    }
    let tty = std::io::stdout().is_terminal();
    let mut n = 0u64;
    loop {
        let (all, incus_error) = list_with_stats(client).await?;
        let mut out = String::new();
        if tty {
            out.push_str("\x1b[2J\x1b[H");
        } else if n > 0 {
            out.push('\n');
        }
        out.push_str(&render_table(&all));
        if let Some(e) = incus_error {
            out.push_str(&format!("note: no live figures: {e}\n"));
        }
        crate::cli::out::bytes(out.as_bytes())?;
        n += 1;
        if count.is_some_and(|c| n >= c) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs_f64(interval)).await;
    }
}
