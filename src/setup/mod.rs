//! `sandboxd setup`: prepares the host, as root, idempotently.
//!
//! Owns the host-side steps and nothing else: the OS check, installing Incus
//! (the distribution's packages, or its maintainers' repository), getting
//! incusd to answer, the storage pool, bridge and profile (through the Incus
//! REST API, via `incusctl`), the `sandboxd` system user, the configuration
//! file and state directory, the binary and the systemd unit, and starting
//! the daemon (systemd when it is PID 1, otherwise a detached process with a
//! PID file). Every step prints one line, `ok` (already there), `done`
//! (changed) or `FAILED <reason>`; the first failure stops the run.
//!
//! Flags are validated before anything is touched, so a bad flag changes
//! nothing.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

mod incus;
mod service;
mod system;
use system::*;

/// The unit installed to `<unit-dir>/sandboxd.service`.
pub const UNIT: &str = include_str!("../../systemd/sandboxd.service");
const UNIT_EXEC: &str = "/usr/local/bin/sandboxd serve --config /etc/sandboxd/sandboxd.toml";

/// Group of the Incus unix socket in the Debian, Ubuntu and upstream packages.
pub const INCUS_GROUP: &str = "incus-admin";

/// Flags of `sandboxd setup`.
#[derive(Debug, Clone, clap::Args)]
pub struct SetupArgs {
    /// Where Incus comes from when it is missing: `distro` (Debian 12:
    /// bookworm-backports; Ubuntu 24.04: its own archive) or `zabbly` (the
    /// Incus maintainers' repository; needs --zabbly-repo and --zabbly-key).
    #[arg(long, default_value = "distro", value_name = "SOURCE")]
    pub incus_source: String,
    /// Base URL of the maintainers' repository, as published in their README.
    #[arg(long, value_name = "URL")]
    pub zabbly_repo: Option<String>,
    /// The maintainers' signing key (ASCII-armoured file).
    #[arg(long, value_name = "FILE")]
    pub zabbly_key: Option<PathBuf>,
    /// Incus unix socket [default: the first standard socket that answers].
    #[arg(long, value_name = "PATH")]
    pub incus_socket: Option<PathBuf>,
    /// Storage driver of a new pool: dir, btrfs (loop-backed, instant
    /// snapshots) or zfs (needs the zfs tools).
    #[arg(long, default_value = "dir", value_name = "DRIVER")]
    pub storage: String,
    /// Size of a loop-backed btrfs or zfs pool.
    #[arg(long, default_value = "30GiB", value_name = "SIZE")]
    pub storage_size: String,
    /// Storage pool name (left alone when it exists).
    #[arg(long, default_value = "default", value_name = "NAME")]
    pub pool: String,
    /// Bridge the sandboxes are attached to (left alone when it exists).
    #[arg(long, default_value = "sandboxd0", value_name = "NAME")]
    pub bridge: String,
    /// IPv4 address/prefix of a new bridge.
    #[arg(long, default_value = "10.213.7.1/24", value_name = "CIDR")]
    pub bridge_ipv4: String,
    /// IPv6 of a new bridge: `none`, `auto` or an address/prefix.
    #[arg(long, default_value = "none", value_name = "CIDR")]
    pub bridge_ipv6: String,
    /// No NAT on a new bridge (containers reach only the host and each other).
    #[arg(long)]
    pub no_nat: bool,
    /// Profile that gets the eth0 and root devices.
    #[arg(long, default_value = "default", value_name = "NAME")]
    pub profile: String,
    /// System user the daemon runs as.
    #[arg(long, default_value = "sandboxd", value_name = "NAME")]
    pub user: String,
    /// Directory of sandboxd.toml.
    #[arg(long, default_value = "/etc/sandboxd", value_name = "DIR")]
    pub config_dir: PathBuf,
    /// State directory of the daemon.
    #[arg(long, default_value = crate::config::DEFAULT_STATE_DIR, value_name = "DIR")]
    pub state_dir: PathBuf,
    /// Runtime directory (admin socket; PID file without systemd).
    #[arg(long, default_value = "/run/sandboxd", value_name = "DIR")]
    pub run_dir: PathBuf,
    /// The binary goes to PREFIX/bin/sandboxd.
    #[arg(long, default_value = "/usr/local", value_name = "DIR")]
    pub prefix: PathBuf,
    /// Where the unit file goes.
    #[arg(long, default_value = "/etc/systemd/system", value_name = "DIR")]
    pub unit_dir: PathBuf,
    /// SSH listen address of a new config (repeatable) [default: 0.0.0.0:2222, [::]:2222].
    #[arg(long, value_name = "ADDR")]
    pub ssh_listen: Vec<String>,
    /// HTTPS listen address of a new config (repeatable) [default: 0.0.0.0:443, [::]:443].
    #[arg(long, value_name = "ADDR")]
    pub https_listen: Vec<String>,
    /// HTTP listen address of a new config (repeatable) [default: 0.0.0.0:80, [::]:80].
    #[arg(long, value_name = "ADDR")]
    pub http_listen: Vec<String>,
    /// Install everything but do not start (or restart) the daemon.
    #[arg(long)]
    pub no_start: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Driver {
    Dir,
    Btrfs,
    Zfs,
}

impl Driver {
    fn name(self) -> &'static str {
        match self {
            Driver::Dir => "dir",
            Driver::Btrfs => "btrfs",
            Driver::Zfs => "zfs",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Distro,
    Zabbly,
}

/// Flags after validation.
struct Plan {
    args: SetupArgs,
    driver: Driver,
    source: Source,
    ssh: Vec<String>,
    https: Vec<String>,
    http: Vec<String>,
}

/// Bridge keys set to `allow`: the sandboxes' egress ACL attached to the
/// bridge holds only reject rules for sandboxes' own addresses, and Incus
/// applies these defaults to all other traffic on the bridge (its own
/// default, once an ACL is attached, is to reject).
const ACL_DEFAULT_KEYS: [&str; 2] = [
    "security.acls.default.egress.action",
    "security.acls.default.ingress.action",
];

fn valid_name(what: &str, name: &str, max: usize, problems: &mut Vec<String>) {
    let ok = !name.is_empty()
        && name.len() <= max
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        && !name.starts_with('-');
    if !ok {
        problems.push(format!(
            "{what} {name:?} must be 1-{max} letters, digits, '-' or '_'"
        ));
    }
}

fn listen(
    flag: &str,
    given: &[String],
    default: [&str; 2],
    problems: &mut Vec<String>,
) -> Vec<String> {
    let list: Vec<String> = if given.is_empty() {
        default.iter().map(|s| s.to_string()).collect()
    } else {
        given.to_vec()
    };
    for a in &list {
        if a.parse::<std::net::SocketAddr>().is_err() {
            problems.push(format!("{flag} {a:?} is not an address like 0.0.0.0:2222"));
        }
    }
    list
}

fn absolute(flag: &str, p: &Path, problems: &mut Vec<String>) {
    if !p.is_absolute() {
        problems.push(format!("{flag} {} must be an absolute path", p.display()));
    }
}

fn validate(args: SetupArgs) -> Result<Plan> {
    let mut problems = Vec::new();
    let driver = match args.storage.as_str() {
        "dir" => Driver::Dir,
        "btrfs" => Driver::Btrfs,
        "zfs" => Driver::Zfs,
        other => {
            problems.push(format!(
                "--storage must be dir, btrfs or zfs, not {other:?}"
            ));
            Driver::Dir
        }
    };
    let source = match args.incus_source.as_str() {
        "distro" => Source::Distro,
        "zabbly" => {
            if args.zabbly_repo.is_none() || args.zabbly_key.is_none() {
                problems.push(
                    "--incus-source zabbly needs --zabbly-repo URL and --zabbly-key FILE".into(),
                );
            }
            Source::Zabbly
        }
        other => {
            problems.push(format!(
                "--incus-source must be distro or zabbly, not {other:?}"
            ));
            Source::Distro
        }
    };
    let size_ok = {
        let s = args.storage_size.as_str();
        let digits = s.trim_end_matches(|c: char| c.is_ascii_alphabetic());
        let unit = &s[digits.len()..];
        digits.parse::<u64>().map(|n| n > 0).unwrap_or(false)
            && ["", "B", "KiB", "MiB", "GiB", "TiB", "KB", "MB", "GB", "TB"].contains(&unit)
    };
    if !size_ok {
        problems.push(format!(
            "--storage-size {:?} is not a size like 30GiB",
            args.storage_size
        ));
    }
    valid_name("--pool", &args.pool, 63, &mut problems);
    // Linux interface names: at most 15 bytes.
    valid_name("--bridge", &args.bridge, 15, &mut problems);
    valid_name("--profile", &args.profile, 63, &mut problems);
    valid_name("--user", &args.user, 32, &mut problems);
    match args.bridge_ipv4.split_once('/') {
        Some((ip, len))
            if ip.parse::<std::net::Ipv4Addr>().is_ok()
                && len.parse::<u8>().map(|l| (8..=30).contains(&l)) == Ok(true) => {}
        _ => problems.push(format!(
            "--bridge-ipv4 {:?} is not an address/prefix like 10.213.7.1/24",
            args.bridge_ipv4
        )),
    }
    if !matches!(args.bridge_ipv6.as_str(), "none" | "auto") {
        let ok = args
            .bridge_ipv6
            .split_once('/')
            .map(|(ip, _)| ip.parse::<std::net::Ipv6Addr>().is_ok())
            .unwrap_or(false);
        if !ok {
            problems.push(format!(
                "--bridge-ipv6 {:?} must be none, auto or an address/prefix",
                args.bridge_ipv6
            ));
        }
    }
    for (flag, p) in [
        ("--config-dir", &args.config_dir),
        ("--state-dir", &args.state_dir),
        ("--run-dir", &args.run_dir),
        ("--prefix", &args.prefix),
        ("--unit-dir", &args.unit_dir),
    ] {
        absolute(flag, p, &mut problems);
    }
    let ssh = listen(
        "--ssh-listen",
        &args.ssh_listen,
        ["0.0.0.0:2222", "[::]:2222"],
        &mut problems,
    );
    let https = listen(
        "--https-listen",
        &args.https_listen,
        ["0.0.0.0:443", "[::]:443"],
        &mut problems,
    );
    let http = listen(
        "--http-listen",
        &args.http_listen,
        ["0.0.0.0:80", "[::]:80"],
        &mut problems,
    );
    if !problems.is_empty() {
        bail!("{}", problems.join("; "));
    }
    Ok(Plan {
        args,
        driver,
        source,
        ssh,
        https,
        http,
    })
}

/// What a step did.
enum Outcome {
    Ok(String),
    Done(String),
}

fn report(step: &str, outcome: &Result<Outcome>) {
    let line = match outcome {
        Ok(Outcome::Ok(d)) => format!("{step:<9} ok      {d}"),
        Ok(Outcome::Done(d)) => format!("{step:<9} done    {d}"),
        Err(e) => {
            let mut msg = e.to_string();
            for cause in e.chain().skip(1) {
                msg.push_str(": ");
                msg.push_str(&cause.to_string());
            }
            format!("{step:<9} FAILED  {}", msg.replace('\n', " "))
        }
    };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Entry point of `sandboxd setup`.
pub fn main(args: SetupArgs) -> Result<()> {
    let plan = validate(args)?;
    if !nix::unistd::geteuid().is_root() {
        bail!("sandboxd setup must run as root");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting runtime")?;
    let mut host = Host {
        plan,
        socket: None,
        unit_changed: false,
    };
    macro_rules! step {
        ($name:expr, $e:expr) => {{
            let outcome = $e;
            report($name, &outcome);
            if outcome.is_err() {
                bail!("setup stopped at step {}", $name);
            }
        }};
    }
    step!("os", host.os());
    step!("incus", host.incus());
    step!("incusd", rt.block_on(host.incusd()));
    step!("storage", rt.block_on(host.storage()));
    step!("network", rt.block_on(host.network()));
    step!("profile", rt.block_on(host.profile()));
    step!("user", host.user());
    step!("config", host.config());
    step!("state", host.state());
    step!("binary", host.binary());
    step!("unit", host.unit());
    step!("start", host.start());
    // Like the step lines: a closed stdout does not stop the setup.
    let _ = std::io::stdout()
        .lock()
        .write_all(host.next_steps().as_bytes());
    Ok(())
}

struct Host {
    plan: Plan,
    socket: Option<PathBuf>,
    unit_changed: bool,
}

impl Host {
    fn args(&self) -> &SetupArgs {
        &self.plan.args
    }

    fn config_file(&self) -> PathBuf {
        self.args().config_dir.join("sandboxd.toml")
    }

    fn bin(&self) -> PathBuf {
        self.args().prefix.join("bin/sandboxd")
    }

    fn pid_file(&self) -> PathBuf {
        self.args().run_dir.join("sandboxd.pid")
    }

    fn client(&self) -> Result<incusctl::Client> {
        let socket = self.socket.clone().context("incusd is not answering")?;
        Ok(incusctl::Client::lazy(
            socket,
            incusctl::ClientOptions::default(),
        ))
    }

    fn next_steps(&self) -> String {
        let a = self.args();
        let socket = a.run_dir.join("admin.sock");
        let mut s = String::new();
        let _ = writeln!(s, "\nWhat is left for you to do:");
        let _ = writeln!(
            s,
            "  1. DNS: an A (and AAAA) record for each sandbox's domain pointing at this server,"
        );
        let _ = writeln!(
            s,
            "     and a wildcard or one record per agent host (shelley.DOMAIN)."
        );
        // The ports of the configuration the daemon runs with (a kept file
        // may name others than the flags).
        let serve = crate::config::ServeArgs {
            config: Some(self.config_file()),
            ..Default::default()
        };
        let (ssh, web) = match crate::config::load(&serve, None) {
            Ok(c) => (
                ports(c.ssh_listen.iter().map(|a| a.port())),
                ports(
                    c.http_listen
                        .iter()
                        .chain(&c.https_listen)
                        .map(|a| a.port()),
                ),
            ),
            Err(_) => {
                let port = |a: &String| a.parse::<std::net::SocketAddr>().ok().map(|a| a.port());
                let p = &self.plan;
                (
                    ports(p.ssh.iter().filter_map(port)),
                    ports(p.http.iter().chain(&p.https).filter_map(port)),
                )
            }
        };
        let ssh_port = ssh.first().copied();
        let _ = writeln!(
            s,
            "  2. Firewall: open TCP {} (sandbox SSH), {} (HTTPS, certificates) and 22 (this host's own sshd).",
            join_ports(&ssh),
            join_ports(&web)
        );
        let _ = writeln!(
            s,
            "  3. For public certificates set tls_mode = \"acme\" and acme_email in {}, then restart the daemon\n     (internal certificates cover only internal_ca_suffixes: .test, .localhost, .internal, ...).",
            self.config_file().display()
        );
        let _ = writeln!(s, "  4. Import an image and create the first sandbox:");
        // The CLI talks only to a socket served by root, its own user or
        // the daemon's user (`sandboxd` unless named).
        let env = if a.user == crate::client::DAEMON_USER {
            String::new()
        } else {
            format!("SANDBOXD_DAEMON_USER={} ", a.user)
        };
        let _ = writeln!(
            s,
            "       {env}sandboxd --admin-socket {} create myapp --domain myapp.example.com --ssh-key ~/.ssh/id_ed25519.pub",
            socket.display()
        );
        match ssh_port {
            Some(22) => {
                let _ = writeln!(s, "       ssh myapp@myapp.example.com");
            }
            Some(port) => {
                let _ = writeln!(s, "       ssh -p {port} myapp@myapp.example.com");
            }
            None => {}
        }
        if !systemd_running() && !a.no_start {
            let _ = writeln!(
                s,
                "  systemd was not found: the daemon runs detached (PID file {}); it will not be restarted on failure or at boot.",
                self.pid_file().display()
            );
        }
        s
    }
}

/// Distinct ports, sorted.
fn ports(all: impl Iterator<Item = u16>) -> Vec<u16> {
    let mut v: Vec<u16> = all.collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// `80 and 443`, `2222`, or `none`.
fn join_ports(ports: &[u16]) -> String {
    let words: Vec<String> = ports.iter().map(u16::to_string).collect();
    match words.as_slice() {
        [] => "none".into(),
        [one] => one.clone(),
        [rest @ .., last] => format!("{} and {last}", rest.join(", ")),
    }
}
