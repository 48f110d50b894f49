//! Command-line interface: argument parsing, and every command except
//! `serve`, `setup` and `completions` as a client of the admin API, whose
//! answers are read as the typed views of `api`. Output is a human table by
//! default and JSON with `--json`, written through [`out`] (a reader that
//! went away ends the command quietly, status 0); failures print one line
//! and exit non-zero.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{CommandFactory, Parser, Subcommand};
use http::Method;

use crate::api::{
    self, AddSandbox, BackendKind, Event, KeyRequest, KeyView, RouteDump, SandboxView, SetAuth,
    SetPort, Status,
};
use crate::api::{SessionView, TlsMode};
use crate::cli_lifecycle::Power;
use crate::client::Client;
use crate::config::{ServeArgs, DEFAULT_ADMIN_SOCKET};
use httpgate::{CertMode, CertStatus};

pub(crate) mod out;
use out::{errln, out, outln};

/// sandboxd hosts persistent coding sandboxes (Incus system containers)
/// behind one SSH router and one HTTPS proxy.
///
/// `sandboxd serve` runs the daemon and `sandboxd setup` prepares the host
/// for it; every other command except `completions` talks to the daemon
/// over its admin socket.
#[derive(Debug, Parser)]
#[command(
    name = "sandboxd",
    version,
    propagate_version = true,
    max_term_width = 100
)]
pub struct Cli {
    /// Admin socket of the daemon [default: /run/sandboxd/admin.sock].
    #[arg(
        long,
        global = true,
        env = "SANDBOXD_ADMIN_SOCKET",
        value_name = "PATH"
    )]
    pub admin_socket: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: SSH router, HTTPS proxy and admin API.
    Serve(ServeArgs),
    /// Add a sandbox whose backend is an existing machine (no Incus).
    ///
    /// Example: sandboxd add myapp --domain myapp.example.com --upstream 10.0.0.5
    /// --ssh-key ~/.ssh/id_ed25519.pub --upstream-host-key /etc/ssh/ssh_host_ed25519_key.pub
    Add(AddArgs),
    /// List sandboxes.
    List {
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one sandbox, including the public key to install upstream.
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove a sandbox and its routes (nothing upstream is touched); its
    /// live SSH sessions end.
    Remove { name: String },
    /// Manage the client SSH keys allowed into a sandbox.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Set the app port that https://DOMAIN proxies to.
    Port { name: String, app_port: u16 },
    /// Set the basic-auth login of the agent host (password from a prompt,
    /// stdin or a file, never an argument). Without a login the agent host
    /// is closed.
    Auth {
        name: String,
        /// Login name; omit with --remove.
        #[arg(required_unless_present = "remove")]
        user: Option<String>,
        /// Read the password from FILE ('-' for stdin).
        #[arg(long, value_name = "FILE")]
        password_file: Option<PathBuf>,
        /// Remove the login: the agent host is closed (401 to everyone)
        /// until a new one is set.
        #[arg(long, conflicts_with_all = ["user", "password_file"])]
        remove: bool,
    },
    /// Daemon status: listeners, routes, version.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// The live routing table exactly as the gates see it.
    Routes {
        #[arg(long)]
        json: bool,
    },
    /// Live SSH sessions; `sessions kill ID` ends one.
    Sessions {
        #[command(subcommand)]
        action: Option<SessionsCommand>,
        #[arg(long)]
        json: bool,
    },
    /// The SSH router's host keys and fingerprints (for known_hosts).
    HostKey {
        #[arg(long)]
        json: bool,
    },
    /// Certificates: issuer, expiry, next renewal, last error.
    Certs {
        #[command(subcommand)]
        action: Option<CertsCommand>,
        #[arg(long)]
        json: bool,
    },
    /// Print the internal CA's root certificate (PEM), for clients to trust.
    CaCert,
    /// Write everything (including private keys) as JSON to FILE or a
    /// redirected stdout (never to a terminal).
    Backup {
        /// Write the backup to FILE (made 0600; an existing FILE is
        /// replaced atomically) instead of stdout.
        #[arg(short = 'o', long = "output", value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Restore a backup read from stdin.
    Restore {
        /// Replace a non-empty state (otherwise refused).
        #[arg(long)]
        replace: bool,
    },
    /// Create a sandbox in a new Incus container and route to it.
    ///
    /// Example: sandboxd create myapp --domain myapp.example.com --ssh-key ~/.ssh/id_ed25519.pub
    Create(crate::cli_lifecycle::CreateArgs),
    /// Start a sandbox's container.
    Start { name: String },
    /// Stop a sandbox's container; its routes answer "stopped".
    Stop { name: String },
    /// Restart a sandbox's container (it keeps its fixed address).
    Restart { name: String },
    /// Delete a sandbox: its routes, its container, certificates and record.
    Delete { name: String },
    /// Set what a sandbox's container may reach (an Incus network ACL;
    /// applied at once). Other sandboxes are never reachable.
    ///
    /// Example: sandboxd egress myapp allowlist --allow 203.0.113.0/24 --allow api.example.com
    Egress(crate::cli_lifecycle::EgressCommandArgs),
    /// Snapshots of a sandbox's container.
    #[command(subcommand)]
    Snapshot(crate::cli_lifecycle::SnapshotCommand),
    /// List Incus instances no sandbox manages, or adopt one.
    Import(crate::cli_lifecycle::ImportArgs),
    /// Golden images: `image build` provisions and publishes one.
    #[command(subcommand)]
    Image(crate::cli_lifecycle::ImageCommand),
    /// Reinstall or rebuild the coding agent of a sandbox in place.
    UpdateAgent { name: String },
    /// Live state, addresses, CPU, memory and disk of every sandbox.
    Top {
        /// Refresh this many times, then exit [default: until Ctrl-C].
        #[arg(long, value_name = "N")]
        count: Option<u64>,
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 2.0, value_name = "SECS")]
        interval: f64,
    },
    /// Prepare this host (as root): Incus, storage, bridge, profile, the
    /// sandboxd user, config, binary and systemd unit; then start the
    /// daemon. Safe to run again: every step says ok, done or FAILED.
    Setup(Box<crate::setup::SetupArgs>),
    /// Print shell completions.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, clap::Args)]
pub struct AddArgs {
    /// Sandbox name: a DNS label, also the SSH user name.
    pub name: String,
    /// Public domain of the app; the agent UI is served at shelley.DOMAIN.
    #[arg(long)]
    pub domain: String,
    /// Host name or IP address of the machine.
    #[arg(long)]
    pub upstream: String,
    #[arg(long, default_value_t = store::DEFAULT_SSH_PORT)]
    pub ssh_port: u16,
    #[arg(long, default_value_t = store::DEFAULT_APP_PORT)]
    pub app_port: u16,
    #[arg(long, default_value_t = store::DEFAULT_AGENT_PORT)]
    pub agent_port: u16,
    /// Upstream login user.
    #[arg(long, default_value = "root")]
    pub user: String,
    /// Client public key file(s) allowed in (authorized_keys format, '-' for stdin).
    #[arg(long = "ssh-key", value_name = "FILE", required = true, num_args = 1..)]
    pub ssh_keys: Vec<PathBuf>,
    /// The upstream sshd's host key: a key line or a file holding one.
    #[arg(long, value_name = "KEY-OR-FILE")]
    pub upstream_host_key: Option<String>,
    #[command(flatten)]
    pub access: AccessArgs,
}

/// Agent-host login and certificate options of `add`, `create` and `import`.
#[derive(Debug, clap::Args)]
pub struct AccessArgs {
    /// Basic-auth login for the agent host. Without it, `create` and
    /// `import` make one (user admin, a random password shown once) and
    /// `add` leaves the agent host closed until `sandboxd auth` sets one.
    #[arg(long, requires = "auth_password_file")]
    pub auth_user: Option<String>,
    /// File holding the basic-auth password ('-' for stdin).
    #[arg(long, value_name = "FILE", requires = "auth_user")]
    pub auth_password_file: Option<PathBuf>,
    /// Certificate source for this sandbox's hosts.
    #[arg(long, value_parser = tls_mode_parser())]
    pub tls_mode: Option<TlsMode>,
    /// `--tls-mode manual`: PEM certificate chain file (leaf first), read by
    /// the daemon, again on `certs renew DOMAIN` and every 5 minutes.
    #[arg(long, value_name = "FILE", requires = "tls_key_file")]
    pub tls_cert_file: Option<PathBuf>,
    /// `--tls-mode manual`: PEM private key file of that certificate.
    #[arg(long, value_name = "FILE", requires = "tls_cert_file")]
    pub tls_key_file: Option<PathBuf>,
}

/// `--tls-mode`: one of the mode names, listed in `--help`.
fn tls_mode_parser() -> impl clap::builder::TypedValueParser<Value = TlsMode> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(TlsMode::ALL.map(TlsMode::as_str))
        .try_map(|s| s.parse::<TlsMode>())
}

impl AccessArgs {
    /// The basic-auth login, its password read from the file.
    pub(crate) fn auth(&self) -> Result<Option<SetAuth>> {
        Ok(match (&self.auth_user, &self.auth_password_file) {
            (Some(user), Some(file)) => Some(SetAuth {
                user: user.clone(),
                password: read_password_file(file)?,
            }),
            _ => None,
        })
    }

    /// The `manual` mode's certificate and key files as absolute paths
    /// (the daemon reads them from its own working directory).
    pub(crate) fn tls_files(&self) -> Result<(Option<String>, Option<String>)> {
        Ok((
            self.tls_cert_file.as_deref().map(absolute).transpose()?,
            self.tls_key_file.as_deref().map(absolute).transpose()?,
        ))
    }
}

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Obtain a new certificate for DOMAIN now and wait for the outcome.
    Renew { domain: String },
}

#[derive(Debug, Subcommand)]
pub enum SessionsCommand {
    /// Disconnect a live session.
    Kill { id: u64 },
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Add keys from files ('-' for stdin).
    Add {
        name: String,
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
    /// List a sandbox's client keys.
    List {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove keys by SHA256 fingerprint or by key line; SSH sessions
    /// logged in with them end.
    Remove {
        name: String,
        #[arg(required = true, value_name = "FINGERPRINT-OR-KEY")]
        keys: Vec<String>,
    },
}

fn read_input(path: &Path) -> Result<String> {
    if path == Path::new("-") {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading stdin")?;
        return Ok(s);
    }
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

pub(crate) fn read_key_files(files: &[PathBuf]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for f in files {
        let text = read_input(f)?;
        let keys =
            crate::keys::parse_key_lines(&text).with_context(|| format!("in {}", f.display()))?;
        if keys.is_empty() {
            bail!("{} holds no public key", f.display());
        }
        out.extend(keys.iter().map(crate::keys::to_line));
    }
    Ok(out)
}

pub(crate) fn read_password_file(path: &Path) -> Result<String> {
    let text = read_input(path)?;
    let pw = text.lines().next().unwrap_or("").to_string();
    if pw.is_empty() {
        bail!("{} holds no password (first line is empty)", path.display());
    }
    Ok(pw)
}

fn read_password(file: Option<&Path>) -> Result<String> {
    if let Some(f) = file {
        return read_password_file(f);
    }
    if std::io::stdin().is_terminal() {
        let a = rpassword::prompt_password("Password: ")?;
        let b = rpassword::prompt_password("Again: ")?;
        if a != b {
            bail!("the passwords differ");
        }
        if a.is_empty() {
            bail!("empty password");
        }
        return Ok(a);
    }
    read_password_file(Path::new("-"))
}

fn upstream_host_key(arg: &str) -> Result<String> {
    if let Ok(k) = crate::keys::parse_public(arg) {
        return Ok(crate::keys::to_line(&k));
    }
    let text = std::fs::read_to_string(arg).with_context(|| {
        format!("--upstream-host-key {arg:?} is neither a key nor a readable file")
    })?;
    let keys = crate::keys::parse_key_lines(&text).with_context(|| format!("in {arg}"))?;
    match keys.first() {
        Some(k) => Ok(crate::keys::to_line(k)),
        None => bail!("{arg} holds no public key"),
    }
}

/// Column-aligned table.
pub(crate) fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<String>| {
        let last = cells.len().saturating_sub(1);
        for (i, cell) in cells.iter().enumerate() {
            if i == last {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        out.push('\n');
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row);
    }
    out
}

pub(crate) fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    outln!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn print_sandbox(sb: &SandboxView, ssh: &str) -> Result<()> {
    let target = match sb.backend {
        BackendKind::Static => format!("{}:{}", sb.upstream, sb.ssh_port),
        BackendKind::Incus => format!("incus:{}", sb.upstream),
    };
    outln!("name:              {}", sb.name);
    outln!(
        "domain:            https://{} -> port {}",
        sb.domain,
        sb.app_port
    );
    outln!(
        "agent:             https://{} -> port {}",
        sb.agent_host,
        sb.agent_port
    );
    outln!("ssh:               {ssh} -> {}@{}", sb.user, target);
    let status = match &sb.status_reason {
        Some(r) => format!("{} ({r})", sb.status),
        None => sb.status.to_string(),
    };
    outln!("status:            {status}");
    if let Some(ip) = &sb.assigned_ipv4 {
        outln!("address:           {ip} (fixed; the gates connect here)");
    }
    if !sb.addresses.is_empty() {
        outln!("reported:          {}", sb.addresses.join(", "));
    }
    if let Some(mode) = sb.egress.map(|m| m.as_str()) {
        match sb.egress_allow.as_slice() {
            [] => outln!("egress:            {mode}"),
            allow => outln!("egress:            {mode} ({})", allow.join(", ")),
        }
    }
    outln!("agent login:       {}", login_state(sb));
    let certs = match (&sb.tls_mode, &sb.tls_cert_file, &sb.tls_key_file) {
        (Some(m), Some(c), Some(k)) => format!("{m} (certificate {c}, key {k})"),
        (Some(m), _, _) => m.to_string(),
        (None, _, _) => "the daemon's default mode".into(),
    };
    outln!("certificates:      {certs}");
    outln!(
        "upstream host key: {}",
        sb.upstream_host_key.as_deref().unwrap_or("not pinned")
    );
    outln!("client keys:");
    for k in &sb.client_keys {
        outln!("  {} {} {}", k.algorithm, k.fingerprint, k.comment);
    }
    outln!("gateway key (add to the upstream user's authorized_keys):");
    outln!("  {}", sb.upstream_public_key);
    Ok(())
}

/// The port to give `ssh -p`: the daemon's SSH listening port as
/// `/v1/status` reports it. `Err` when the daemon could not be asked,
/// `Ok(None)` when it has no SSH listener.
pub(crate) async fn ssh_port(client: &Client) -> Result<Option<u16>> {
    let st: Status = client.call(Method::GET, "/v1/status", None::<&()>).await?;
    Ok(st.ssh_port())
}

/// The SSH command line that reaches sandbox `name` through the gateway.
pub(crate) fn ssh_command(port: Result<Option<u16>>, name: &str) -> String {
    match port {
        Ok(Some(22)) => format!("ssh {name}@HOST"),
        Ok(Some(port)) => format!("ssh -p {port} {name}@HOST"),
        Ok(None) => format!("no SSH (the daemon has no SSH listener) for {name}"),
        Err(_) => format!("ssh -p SSH-PORT {name}@HOST"),
    }
}

/// A certificate time as the admin API writes it (RFC 3339), or `none`.
fn time_or(t: Option<time::OffsetDateTime>, none: &str) -> String {
    t.and_then(|t| {
        t.format(&time::format_description::well_known::Rfc3339)
            .ok()
    })
    .unwrap_or_else(|| none.to_string())
}

/// The agent host's login as `list` and `show` say it.
pub(crate) fn login_state(sb: &SandboxView) -> String {
    match &sb.auth_user {
        Some(u) => u.clone(),
        None => CLOSED.to_string(),
    }
}

/// What `list` and `show` say of an agent host with no login (it answers
/// 401 to everyone).
pub(crate) const CLOSED: &str = "closed (no login)";

fn print_keys(keys: &[KeyView]) -> Result<()> {
    let rows = keys
        .iter()
        .map(|k| {
            vec![
                k.algorithm.clone(),
                k.fingerprint.clone(),
                k.comment.clone(),
            ]
        })
        .collect();
    out!("{}", table(&["TYPE", "FINGERPRINT", "COMMENT"], rows));
    Ok(())
}

/// Runs the CLI; returns the process exit code.
pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => crate::daemon::main(args, cli.admin_socket),
        Command::Setup(args) => crate::setup::main(*args),
        Command::Completions { shell } => {
            // Generated whole first: clap_complete panics on a failed write.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "sandboxd", &mut script);
            out::bytes(&script)
        }
        command => {
            let socket = cli
                .admin_socket
                .unwrap_or_else(|| PathBuf::from(DEFAULT_ADMIN_SOCKET));
            client_main(command, &socket)
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // The reader of the output went away: a normal, quiet end.
        Err(e) if out::is_closed(&e) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let mut msg = e.to_string();
            for cause in e.chain().skip(1) {
                msg.push_str(": ");
                msg.push_str(&cause.to_string());
            }
            let _ = writeln!(std::io::stderr(), "sandboxd: error: {msg}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn client_main(command: Command, socket: &Path) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting runtime")?;
    rt.block_on(run_client(command, Client::new(socket)))
}

async fn run_client(command: Command, client: Client) -> Result<()> {
    const NONE: Option<&()> = None;
    match command {
        // Handled in `main` without a client.
        Command::Serve(_) | Command::Setup(_) | Command::Completions { .. } => {}
        Command::Add(a) => {
            let auth = a.access.auth()?;
            let (tls_cert_file, tls_key_file) = a.access.tls_files()?;
            let req = AddSandbox {
                name: a.name,
                domain: a.domain,
                upstream: a.upstream,
                ssh_port: Some(a.ssh_port),
                app_port: Some(a.app_port),
                agent_port: Some(a.agent_port),
                agent_prefix: None,
                user: Some(a.user),
                ssh_keys: read_key_files(&a.ssh_keys)?,
                upstream_host_key: a
                    .upstream_host_key
                    .as_deref()
                    .map(upstream_host_key)
                    .transpose()?,
                auth,
                tls_mode: a.access.tls_mode,
                tls_cert_file,
                tls_key_file,
            };
            let sb: SandboxView = client
                .call(Method::POST, "/v1/sandboxes", Some(&req))
                .await?;
            let ssh = ssh_command(ssh_port(&client).await, &sb.name);
            outln!("added {}: https://{} and {ssh}", sb.name, sb.domain);
            outln!("install the gateway key for {} upstream:", sb.user);
            outln!("  {}", sb.upstream_public_key);
            if sb.auth_user.is_none() {
                outln!(
                    "the agent host https://{} is closed until it has a login: sandboxd auth {} USER",
                    sb.agent_host, sb.name
                );
            }
        }
        Command::List { json } => crate::cli_lifecycle::list(&client, json).await?,
        Command::Create(a) => crate::cli_lifecycle::create(&client, a).await?,
        Command::Start { name } => {
            crate::cli_lifecycle::state_change(&client, &name, Power::Start).await?
        }
        Command::Stop { name } => {
            crate::cli_lifecycle::state_change(&client, &name, Power::Stop).await?
        }
        Command::Restart { name } => {
            crate::cli_lifecycle::state_change(&client, &name, Power::Restart).await?
        }
        Command::Delete { name } => crate::cli_lifecycle::delete(&client, &name).await?,
        Command::Egress(a) => crate::cli_lifecycle::egress(&client, a).await?,
        Command::Snapshot(cmd) => crate::cli_lifecycle::snapshot(&client, cmd).await?,
        Command::Image(cmd) => crate::cli_lifecycle::image(&client, cmd).await?,
        Command::UpdateAgent { name } => crate::cli_lifecycle::update_agent(&client, &name).await?,
        Command::Import(a) => crate::cli_lifecycle::import(&client, a).await?,
        Command::Top { count, interval } => {
            crate::cli_lifecycle::top(&client, count, interval).await?
        }
        Command::Show { name, json } => {
            let path = format!("/v1/sandboxes/{name}");
            let (sb, port) = tokio::join!(
                client.call::<SandboxView>(Method::GET, &path, NONE),
                ssh_port(&client)
            );
            let sb = sb?;
            if json {
                return print_json(&sb);
            }
            print_sandbox(&sb, &ssh_command(port, &sb.name))?;
        }
        Command::Remove { name } => {
            let sb: SandboxView = client
                .call(Method::DELETE, &format!("/v1/sandboxes/{name}"), NONE)
                .await?;
            outln!("removed {} ({})", sb.name, sb.domain);
        }
        Command::Key(KeyCommand::Add { name, files }) => {
            let req = KeyRequest {
                keys: read_key_files(&files)?,
            };
            let keys: Vec<KeyView> = client
                .call(
                    Method::POST,
                    &format!("/v1/sandboxes/{name}/keys"),
                    Some(&req),
                )
                .await?;
            print_keys(&keys)?;
        }
        Command::Key(KeyCommand::List { name, json }) => {
            let keys: Vec<KeyView> = client
                .call(Method::GET, &format!("/v1/sandboxes/{name}/keys"), NONE)
                .await?;
            if json {
                return print_json(&keys);
            }
            print_keys(&keys)?;
        }
        Command::Key(KeyCommand::Remove { name, keys }) => {
            let req = KeyRequest { keys };
            let left: Vec<KeyView> = client
                .call(
                    Method::DELETE,
                    &format!("/v1/sandboxes/{name}/keys"),
                    Some(&req),
                )
                .await?;
            print_keys(&left)?;
        }
        Command::Port { name, app_port } => {
            let sb: SandboxView = client
                .call(
                    Method::PUT,
                    &format!("/v1/sandboxes/{name}/app-port"),
                    Some(&SetPort { port: app_port }),
                )
                .await?;
            outln!("https://{} -> port {}", sb.domain, sb.app_port);
        }
        Command::Auth {
            name,
            user,
            password_file,
            remove,
        } => {
            let path = format!("/v1/sandboxes/{name}/auth");
            if remove {
                let sb: SandboxView = client.call(Method::DELETE, &path, NONE).await?;
                outln!(
                    "login removed from {name}: https://{} is closed until it has a login again (sandboxd auth {name} USER)",
                    sb.agent_host
                );
            } else {
                let user = user.unwrap_or_default();
                let password = read_password(password_file.as_deref())?;
                let sb: SandboxView = client
                    .call(Method::PUT, &path, Some(&SetAuth { user, password }))
                    .await?;
                outln!(
                    "https://{} now asks for user {}",
                    sb.agent_host,
                    sb.auth_user.unwrap_or_default()
                );
            }
        }
        Command::Status { json } => {
            let st: Status = client.call(Method::GET, "/v1/status", NONE).await?;
            if json {
                return print_json(&st);
            }
            outln!(
                "sandboxd {} (pid {}), up {} s",
                st.version,
                st.pid,
                st.uptime_secs
            );
            outln!("state:      {}", st.state_dir);
            outln!("admin:      {}", st.admin_socket);
            outln!("ssh:        {}", st.ssh_listen.join(" "));
            outln!("https:      {}", st.https_listen.join(" "));
            outln!("http:       {}", st.http_listen.join(" "));
            outln!("sandboxes:  {}", st.sandboxes);
            outln!(
                "routes:     {} (generation {})",
                st.routes,
                st.route_generation
            );
            let conns: Vec<String> = st.https_connections.iter().map(|n| n.to_string()).collect();
            match conns.is_empty() {
                true => outln!("https open: none"),
                false => outln!(
                    "https open: {} (client connections per serving thread)",
                    conns.join(" + ")
                ),
            }
            if let Some(notice) = &st.ca_notice {
                outln!("notice:     {notice}");
            }
        }
        Command::Routes { json } => {
            let dump: RouteDump = client.call(Method::GET, "/v1/routes", NONE).await?;
            if json {
                return print_json(&dump);
            }
            let rows = dump
                .routes
                .iter()
                .map(|r| {
                    vec![
                        r.protocol.clone(),
                        r.key.clone(),
                        r.sandbox.clone(),
                        r.service.clone(),
                        r.target.clone(),
                    ]
                })
                .collect();
            out!(
                "{}",
                table(
                    &["PROTO", "USER/HOST", "SANDBOX", "SERVICE", "TARGET"],
                    rows
                )
            );
        }
        Command::Sessions {
            action: Some(SessionsCommand::Kill { id }),
            ..
        } => {
            let _: serde::de::IgnoredAny = client
                .call(Method::DELETE, &format!("/v1/sessions/{id}"), NONE)
                .await?;
            outln!("session {id} killed");
        }
        Command::Sessions { action: None, json } => {
            let sessions: Vec<SessionView> = client.call(Method::GET, "/v1/sessions", NONE).await?;
            if json {
                return print_json(&sessions);
            }
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let rows = sessions
                .iter()
                .map(|s| {
                    vec![
                        s.id.to_string(),
                        s.sandbox.clone(),
                        s.client_addr.clone(),
                        format!("{}s", now.saturating_sub(s.started_unix)),
                        s.bytes_up.to_string(),
                        s.bytes_down.to_string(),
                        s.key_fingerprint.clone(),
                    ]
                })
                .collect();
            out!(
                "{}",
                table(
                    &["ID", "SANDBOX", "CLIENT", "AGE", "UP", "DOWN", "KEY"],
                    rows
                )
            );
        }
        Command::HostKey { json } => {
            let keys: Vec<String> = client.call(Method::GET, "/v1/host-keys", NONE).await?;
            if json {
                return print_json(&keys);
            }
            for k in keys {
                outln!("{k}");
            }
        }
        Command::Certs {
            action: Some(CertsCommand::Renew { domain }),
            ..
        } => {
            let status: Option<CertStatus> = client
                .call(Method::POST, &format!("/v1/certs/{domain}/renew"), NONE)
                .await?;
            let done = match status.as_ref().map(|s| s.mode) {
                Some(CertMode::Manual) => "reloaded from its files",
                Some(CertMode::Acme | CertMode::Internal) | None => "renewed",
            };
            let until = status.and_then(|s| s.not_after);
            outln!("{domain}: {done}, valid until {}", time_or(until, "?"));
        }
        Command::Certs { action: None, json } => {
            let certs: Vec<CertStatus> = client.call(Method::GET, "/v1/certs", NONE).await?;
            if json {
                return print_json(&certs);
            }
            let or_dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
            let rows = certs
                .iter()
                .map(|c| {
                    vec![
                        c.domain.clone(),
                        c.mode.to_string(),
                        or_dash(&c.issuer),
                        time_or(c.not_after, "-"),
                        time_or(c.next_renewal, "-"),
                        or_dash(&c.last_error),
                    ]
                })
                .collect();
            out!(
                "{}",
                table(
                    &[
                        "DOMAIN",
                        "MODE",
                        "ISSUER",
                        "EXPIRES",
                        "RENEWAL",
                        "LAST ERROR"
                    ],
                    rows
                )
            );
        }
        Command::CaCert => {
            let pem = client.call_raw(Method::GET, "/v1/ca-cert", None).await?;
            out::bytes(&pem)?;
        }
        Command::Backup { output } => {
            if output.is_none() && std::io::stdout().is_terminal() {
                bail!("a backup holds private keys: refusing to print it to a terminal; use -o FILE or redirect stdout (sandboxd backup > FILE)");
            }
            let bytes = client.call_raw(Method::GET, "/v1/backup", None).await?;
            match output {
                Some(path) => write_private(&path, &bytes)?,
                None => {
                    restrict_stdout_file();
                    out::bytes(&bytes)?;
                }
            }
        }
        Command::Restore { replace } => {
            let mut doc = Vec::new();
            std::io::stdin()
                .read_to_end(&mut doc)
                .context("reading the backup from stdin")?;
            if doc.iter().all(u8::is_ascii_whitespace) {
                bail!("no backup on stdin (use: sandboxd restore < FILE)");
            }
            let path = if replace {
                "/v1/restore?replace=true"
            } else {
                "/v1/restore"
            };
            let result = client
                .stream(Method::POST, path, Some(doc), |ev| {
                    if let Event::Progress { step, done, total } = ev {
                        errln!("{step}: {done}/{total}");
                    }
                })
                .await?;
            let r: api::RestoreResult = serde_json::from_value(result)?;
            outln!(
                "restored {} sandboxes and {} records",
                r.sandboxes,
                r.records
            );
        }
    }
    Ok(())
}

/// Writes a file only its owner can read: a new file made 0600 with
/// O_EXCL next to `path`, written, synced and renamed over `path`. An
/// existing `path` is replaced whole (never left half-written, never
/// opened with its old mode); a failure leaves it as it was.
fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| anyhow::anyhow!("{}: not a file name", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.{:016x}.tmp",
        file_name.to_string_lossy(),
        rand::random::<u64>()
    ));
    let written = (|| -> Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("cannot move the backup to {}", path.display()))?;
        Ok(())
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// When stdout is redirected to a regular file (`backup > FILE`), takes
/// group and other permissions off it: the shell made it with its umask.
fn restrict_stdout_file() {
    use std::os::fd::AsRawFd;
    let fd = std::io::stdout().as_raw_fd();
    if let Ok(st) = nix::sys::stat::fstat(fd) {
        let mode = st.st_mode;
        if mode & nix::libc::S_IFMT == nix::libc::S_IFREG && mode & 0o077 != 0 {
            let _ =
                nix::sys::stat::fchmod(fd, nix::sys::stat::Mode::from_bits_truncate(mode & 0o7700));
        }
    }
}

/// A path made absolute against the current directory, since the daemon
/// reads it from elsewhere.
fn absolute(p: &Path) -> Result<String> {
    let abs = std::path::absolute(p).with_context(|| format!("{}", p.display()))?;
    abs.to_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow::anyhow!("{}: not a UTF-8 path", abs.display()))
}
