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

/// True when systemd is the init system (the test `sd_booted()` makes).
fn systemd_running() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Runs a command; a failure carries its last output lines.
fn run(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {shown}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(3).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!("{shown} failed ({}): {}", out.status, tail.join(" / "));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn os_release() -> Result<BTreeMap<String, String>> {
    let text = std::fs::read_to_string("/etc/os-release")
        .or_else(|_| std::fs::read_to_string("/usr/lib/os-release"))
        .context("cannot read /etc/os-release")?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
        .collect())
}

/// Derives the bookworm-backports sources from the machine's own Debian
/// sources (deb822 stanzas): the stanzas whose suites include `bookworm`,
/// with their suite changed. No archive address is written by us.
pub fn derive_backports(debian_sources: &str) -> Option<String> {
    let mut out = String::new();
    for stanza in debian_sources.split("\n\n") {
        let mut keep = false;
        let mut lines = Vec::new();
        for line in stanza.lines() {
            if let Some(suites) = line.strip_prefix("Suites:") {
                keep = suites.split_whitespace().any(|s| s == "bookworm");
                lines.push("Suites: bookworm-backports".to_string());
            } else {
                lines.push(line.to_string());
            }
        }
        if keep {
            out.push_str(&lines.join("\n"));
            out.push_str("\n\n");
        }
    }
    (!out.is_empty()).then_some(out)
}

/// The same for a one-line-style `sources.list`.
fn derive_backports_list(list: &str) -> Option<String> {
    let out: Vec<String> = list
        .lines()
        .filter(|l| l.trim_start().starts_with("deb "))
        .filter_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let i = words.iter().position(|w| *w == "bookworm")?;
            let mut w = words.clone();
            w[i] = "bookworm-backports";
            Some(w.join(" "))
        })
        .collect();
    (!out.is_empty()).then(|| out.join("\n") + "\n")
}

fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    let tmp = path.with_extension("sandboxd-tmp");
    std::fs::write(&tmp, data).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn user_ids(name: &str) -> Result<(nix::unistd::Uid, nix::unistd::Gid)> {
    let u = nix::unistd::User::from_name(name)?.with_context(|| format!("no user {name:?}"))?;
    Ok((u.uid, u.gid))
}

/// Makes `dir` exist with `mode`, owned by `owner`; says whether it changed.
fn ensure_dir(dir: &Path, mode: u32, owner: (nix::unistd::Uid, nix::unistd::Gid)) -> Result<bool> {
    let mut changed = false;
    if !dir.is_dir() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        changed = true;
    }
    let meta = std::fs::metadata(dir)?;
    if meta.mode() & 0o7777 != mode {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))?;
        changed = true;
    }
    if meta.uid() != owner.0.as_raw() || meta.gid() != owner.1.as_raw() {
        std::os::unix::fs::chown(dir, Some(owner.0.as_raw()), Some(owner.1.as_raw()))?;
        changed = true;
    }
    Ok(changed)
}

fn toml_list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| format!("{s:?}")).collect();
    format!("[{}]", quoted.join(", "))
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

    fn os(&self) -> Result<Outcome> {
        let os = os_release()?;
        let id = os.get("ID").map(String::as_str).unwrap_or("?");
        let version = os.get("VERSION_ID").map(String::as_str).unwrap_or("?");
        let pretty = os.get("PRETTY_NAME").cloned().unwrap_or_default();
        match (id, version) {
            ("debian", "12") | ("ubuntu", "24.04") => Ok(Outcome::Ok(pretty)),
            _ => bail!("{pretty} ({id} {version}) is not supported: use Debian 12 or Ubuntu 24.04"),
        }
    }

    fn incusd_path() -> Option<PathBuf> {
        ["/usr/libexec/incus/incusd", "/opt/incus/bin/incusd"]
            .map(PathBuf::from)
            .into_iter()
            .find(|p| p.is_file())
            .or_else(|| find_program("incusd"))
    }

    fn incus(&self) -> Result<Outcome> {
        if let Some(p) = Self::incusd_path() {
            return Ok(Outcome::Ok(format!("installed ({})", p.display())));
        }
        let os = os_release()?;
        let id = os.get("ID").cloned().unwrap_or_default();
        let codename = os.get("VERSION_CODENAME").cloned().unwrap_or_default();
        let apt = |args: &[&str]| {
            run(Command::new("apt-get")
                .args(args)
                .env("DEBIAN_FRONTEND", "noninteractive"))
        };
        let detail = match self.plan.source {
            Source::Distro if id == "debian" => {
                let dst = Path::new("/etc/apt/sources.list.d/sandboxd-backports.sources");
                let list_dst = Path::new("/etc/apt/sources.list.d/sandboxd-backports.list");
                if !dst.exists() && !list_dst.exists() {
                    let deb822 = std::fs::read_to_string("/etc/apt/sources.list.d/debian.sources")
                        .ok()
                        .and_then(|t| derive_backports(&t));
                    match deb822 {
                        Some(text) => write_atomic(dst, text.as_bytes(), 0o644)?,
                        None => {
                            let list = std::fs::read_to_string("/etc/apt/sources.list")
                                .ok()
                                .and_then(|t| derive_backports_list(&t))
                                .context(
                                    "found no bookworm source in /etc/apt to derive bookworm-backports from",
                                )?;
                            write_atomic(list_dst, list.as_bytes(), 0o644)?;
                        }
                    }
                }
                // Other sources may fail to refresh; the install decides.
                let _ = apt(&["update", "-q"]);
                apt(&["install", "-y", "-q", "-t", "bookworm-backports", "incus"])?;
                "installed incus from bookworm-backports"
            }
            Source::Distro => {
                let _ = apt(&["update", "-q"]);
                apt(&["install", "-y", "-q", "incus"])?;
                "installed incus from the distribution"
            }
            Source::Zabbly => {
                let (Some(repo), Some(key)) = (&self.args().zabbly_repo, &self.args().zabbly_key)
                else {
                    bail!("--incus-source zabbly needs --zabbly-repo and --zabbly-key");
                };
                let keyring = Path::new("/etc/apt/keyrings/sandboxd-zabbly.asc");
                std::fs::create_dir_all("/etc/apt/keyrings")?;
                let key_text =
                    std::fs::read(key).with_context(|| format!("reading {}", key.display()))?;
                write_atomic(keyring, &key_text, 0o644)?;
                let arch = run(Command::new("dpkg").arg("--print-architecture"))?;
                let sources = format!(
                    "Enabled: yes\nTypes: deb\nURIs: {}/incus/stable\nSuites: {codename}\nComponents: main\nArchitectures: {}\nSigned-By: {}\n",
                    repo.trim_end_matches('/'),
                    arch.trim(),
                    keyring.display()
                );
                write_atomic(
                    Path::new("/etc/apt/sources.list.d/sandboxd-zabbly-incus.sources"),
                    sources.as_bytes(),
                    0o644,
                )?;
                let _ = apt(&["update", "-q"]);
                apt(&["install", "-y", "-q", "incus"])?;
                "installed incus from the maintainers' repository"
            }
        };
        if Self::incusd_path().is_none() {
            bail!("incus was installed but incusd is not found");
        }
        Ok(Outcome::Done(detail.to_string()))
    }

    async fn answering(path: &Path) -> Option<String> {
        let c = incusctl::Client::lazy(
            path.to_path_buf(),
            incusctl::ClientOptions {
                request_timeout: Duration::from_secs(5),
                ..Default::default()
            },
        );
        c.server_info()
            .await
            .ok()
            .map(|i| i.environment.server_version.clone())
    }

    async fn find_answering(&self) -> Option<(PathBuf, String)> {
        let candidates: Vec<PathBuf> = match &self.args().incus_socket {
            Some(p) => vec![p.clone()],
            None => incusctl::DEFAULT_SOCKETS.map(PathBuf::from).to_vec(),
        };
        for p in candidates {
            if let Some(v) = Self::answering(&p).await {
                return Some((p, v));
            }
        }
        None
    }

    async fn wait_answering(&self, limit: Duration) -> Option<(PathBuf, String)> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(found) = self.find_answering().await {
                return Some(found);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn incusd(&mut self) -> Result<Outcome> {
        if let Some((p, v)) = self.find_answering().await {
            self.socket = Some(p.clone());
            return Ok(Outcome::Ok(format!("Incus {v} answers on {}", p.display())));
        }
        let how = if systemd_running() {
            run(Command::new("systemctl").args([
                "enable",
                "--now",
                "incus.socket",
                "incus.service",
            ]))?;
            "started incus.socket and incus.service".to_string()
        } else {
            let incusd = Self::incusd_path().context("incusd not found")?;
            let group = if nix::unistd::Group::from_name(INCUS_GROUP)?.is_some() {
                INCUS_GROUP
            } else {
                "root"
            };
            let log_path = Path::new("/var/log/incusd-sandboxd.log");
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log_path)
                .with_context(|| format!("opening {}", log_path.display()))?;
            // From /: a detached daemon must not hold on to (or lose) the
            // directory setup was run from.
            let child = Command::new("setsid")
                .current_dir("/")
                .arg(&incusd)
                .args(["--group", group])
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .with_context(|| format!("starting {}", incusd.display()))?;
            write_atomic(
                Path::new("/run/incusd-sandboxd.pid"),
                format!("{}\n", child.id()).as_bytes(),
                0o644,
            )?;
            format!(
                "systemd not found: started incusd detached (pid {}, log {}, PID file /run/incusd-sandboxd.pid)",
                child.id(),
                log_path.display()
            )
        };
        match self.wait_answering(Duration::from_secs(60)).await {
            Some((p, v)) => {
                self.socket = Some(p.clone());
                Ok(Outcome::Done(format!(
                    "{how}; Incus {v} answers on {}",
                    p.display()
                )))
            }
            None => bail!("{how}, but no Incus socket answered within 60 s"),
        }
    }

    async fn storage(&self) -> Result<Outcome> {
        let incus = self.client()?;
        let name = &self.args().pool;
        if let Some(p) = incus.storage_pool(name).await? {
            let note = if p.driver != self.plan.driver.name() {
                format!(" (--storage {} not applied)", self.plan.driver.name())
            } else {
                String::new()
            };
            return Ok(Outcome::Ok(format!(
                "pool {name} exists, driver {}{note}",
                p.driver
            )));
        }
        let mut config = BTreeMap::new();
        match self.plan.driver {
            Driver::Dir => {}
            Driver::Btrfs => {
                if find_program("mkfs.btrfs").is_none() {
                    run(Command::new("apt-get")
                        .args(["install", "-y", "-q", "btrfs-progs"])
                        .env("DEBIAN_FRONTEND", "noninteractive"))
                    .context("btrfs needs btrfs-progs")?;
                }
                config.insert("size".to_string(), self.args().storage_size.clone());
            }
            Driver::Zfs => {
                if find_program("zfs").is_none() || find_program("zpool").is_none() {
                    bail!("--storage zfs needs the zfs tools (zfsutils-linux) and the zfs kernel module; install them or use --storage btrfs");
                }
                config.insert("size".to_string(), self.args().storage_size.clone());
            }
        }
        incus
            .create_storage_pool(name, self.plan.driver.name(), &config)
            .await?;
        let size = config
            .get("size")
            .map(|s| format!(", loop file of {s}"))
            .unwrap_or_default();
        Ok(Outcome::Done(format!(
            "created pool {name} (driver {}{size})",
            self.plan.driver.name()
        )))
    }

    async fn network(&self) -> Result<Outcome> {
        let incus = self.client()?;
        let a = self.args();
        // The sandboxes' egress rules live in one ACL attached to the
        // bridge (see `lifecycle::network`); made and attached here so that
        // the daemon never has to change the network.
        let acl = crate::lifecycle::network::acl_name(&a.bridge);
        incus.edit_network_acl(&acl, |_| false).await?;
        if let Some(n) = incus.network(&a.bridge).await? {
            let addr = n.config.get("ipv4.address").cloned().unwrap_or_default();
            let set = incus
                .edit_network_config(&a.bridge, |cfg| {
                    let mut changed = false;
                    for key in ACL_DEFAULT_KEYS {
                        if !cfg.contains_key(key) {
                            cfg.insert(key.to_string(), "allow".to_string());
                            changed = true;
                        }
                    }
                    let list = cfg.get("security.acls").cloned().unwrap_or_default();
                    if !list.split(',').any(|x| x.trim() == acl) {
                        let joined = if list.trim().is_empty() {
                            acl.clone()
                        } else {
                            format!("{list},{acl}")
                        };
                        cfg.insert("security.acls".to_string(), joined);
                        changed = true;
                    }
                    changed
                })
                .await?;
            let what = format!("network {} exists ({} {addr})", a.bridge, n.kind);
            return Ok(if set {
                Outcome::Done(format!("{what}; egress ACL {acl} attached"))
            } else {
                Outcome::Ok(what)
            });
        }
        let mut config: BTreeMap<String, String> = [
            ("ipv4.address", a.bridge_ipv4.as_str()),
            ("ipv4.nat", if a.no_nat { "false" } else { "true" }),
            ("ipv6.address", a.bridge_ipv6.as_str()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for key in ACL_DEFAULT_KEYS {
            config.insert(key.to_string(), "allow".to_string());
        }
        config.insert("security.acls".to_string(), acl);
        incus.create_bridge(&a.bridge, &config).await?;
        Ok(Outcome::Done(format!(
            "created bridge {} ({}, NAT {})",
            a.bridge,
            a.bridge_ipv4,
            if a.no_nat { "off" } else { "on" }
        )))
    }

    async fn profile(&self) -> Result<Outcome> {
        let incus = self.client()?;
        let a = self.args();
        let eth0: BTreeMap<String, String> = [
            ("type", "nic"),
            ("name", "eth0"),
            ("network", a.bridge.as_str()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let root: BTreeMap<String, String> =
            [("type", "disk"), ("path", "/"), ("pool", a.pool.as_str())]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        match incus.profile(&a.profile).await? {
            None => {
                let p = incusctl::Profile {
                    name: a.profile.clone(),
                    description: "sandboxd: sandboxes' network and root disk".to_string(),
                    devices: [("eth0".to_string(), eth0), ("root".to_string(), root)]
                        .into_iter()
                        .collect(),
                    ..Default::default()
                };
                incus.create_profile(&p).await?;
                Ok(Outcome::Done(format!(
                    "created profile {} (eth0 on {}, root on {})",
                    a.profile, a.bridge, a.pool
                )))
            }
            Some(mut p) => {
                let mut added = Vec::new();
                if !p.devices.contains_key("eth0") {
                    p.devices.insert("eth0".into(), eth0);
                    added.push(format!("eth0 on {}", a.bridge));
                }
                if !p.devices.contains_key("root") {
                    p.devices.insert("root".into(), root);
                    added.push(format!("root on {}", a.pool));
                }
                if added.is_empty() {
                    let on = |dev: &str, key: &str| {
                        p.devices
                            .get(dev)
                            .and_then(|d| d.get(key))
                            .cloned()
                            .unwrap_or_default()
                    };
                    return Ok(Outcome::Ok(format!(
                        "profile {} has eth0 (on {}) and root (on {})",
                        a.profile,
                        on("eth0", "network"),
                        on("root", "pool")
                    )));
                }
                incus.update_profile(&p).await?;
                Ok(Outcome::Done(format!(
                    "profile {}: added {}",
                    a.profile,
                    added.join(", ")
                )))
            }
        }
    }

    fn user(&self) -> Result<Outcome> {
        let name = &self.args().user;
        let mut did = Vec::new();
        if nix::unistd::Group::from_name(INCUS_GROUP)?.is_none() {
            run(Command::new("groupadd").args(["--system", INCUS_GROUP]))?;
            did.push(format!("created group {INCUS_GROUP}"));
        }
        let user = nix::unistd::User::from_name(name)?;
        if user.is_none() {
            run(Command::new("useradd")
                .args(["--system", "--user-group", "--no-create-home"])
                .arg("--home-dir")
                .arg(&self.args().state_dir)
                .args([
                    "--shell",
                    "/usr/sbin/nologin",
                    "--comment",
                    "sandboxd daemon",
                ])
                .args(["--groups", INCUS_GROUP])
                .arg(name))?;
            did.push(format!("created system user {name} in group {INCUS_GROUP}"));
        } else {
            let members = nix::unistd::Group::from_name(INCUS_GROUP)?
                .map(|g| g.mem)
                .unwrap_or_default();
            if !members.iter().any(|m| m == name) {
                run(Command::new("usermod").args(["--append", "--groups", INCUS_GROUP, name]))?;
                did.push(format!("added {name} to group {INCUS_GROUP}"));
            }
        }
        if did.is_empty() {
            Ok(Outcome::Ok(format!(
                "user {name} exists, member of {INCUS_GROUP}"
            )))
        } else {
            Ok(Outcome::Done(did.join("; ")))
        }
    }

    fn config_text(&self) -> String {
        let a = self.args();
        let mut s = String::new();
        let _ = writeln!(s, "# sandboxd configuration, written by `sandboxd setup`.");
        let _ = writeln!(
            s,
            "# Every key is described in README.md; unknown keys are errors."
        );
        let _ = writeln!(s, "state_dir = {:?}", a.state_dir.display().to_string());
        let _ = writeln!(
            s,
            "admin_socket = {:?}",
            a.run_dir.join("admin.sock").display().to_string()
        );
        let _ = writeln!(s, "ssh_listen = {}", toml_list(&self.plan.ssh));
        let _ = writeln!(s, "https_listen = {}", toml_list(&self.plan.https));
        let _ = writeln!(s, "http_listen = {}", toml_list(&self.plan.http));
        let _ = writeln!(
            s,
            "# \"internal\" serves certificates of a local CA; switch to \"acme\" (and set\n# acme_email) once DNS points the sandboxes' names here."
        );
        let _ = writeln!(s, "tls_mode = \"internal\"");
        if let Some(sock) = &self.socket {
            let _ = writeln!(s, "incus_socket = {:?}", sock.display().to_string());
        }
        let _ = writeln!(s, "log = \"info\"");
        s
    }

    fn config(&self) -> Result<Outcome> {
        let owner = user_ids(&self.args().user)?;
        let dir = &self.args().config_dir;
        let mut did = Vec::new();
        if ensure_dir(dir, 0o700, owner)? {
            did.push(format!("{} (0700)", dir.display()));
        }
        let file = self.config_file();
        if !file.exists() {
            write_atomic(&file, self.config_text().as_bytes(), 0o600)?;
            std::os::unix::fs::chown(&file, Some(owner.0.as_raw()), Some(owner.1.as_raw()))?;
            did.push(format!("wrote {} (0600)", file.display()));
        } else {
            let meta = std::fs::metadata(&file)?;
            if meta.mode() & 0o777 != 0o600 {
                std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))?;
                did.push(format!("{} made 0600", file.display()));
            }
            if meta.uid() != owner.0.as_raw() {
                std::os::unix::fs::chown(&file, Some(owner.0.as_raw()), Some(owner.1.as_raw()))?;
                did.push(format!("{} given to {}", file.display(), self.args().user));
            }
        }
        // The file must be one the daemon accepts.
        let serve = crate::config::ServeArgs {
            config: Some(file.clone()),
            ..Default::default()
        };
        crate::config::load(&serve, None)
            .with_context(|| format!("{} is not a valid configuration", file.display()))?;
        if did.is_empty() {
            Ok(Outcome::Ok(format!("{} (kept as it is)", file.display())))
        } else {
            Ok(Outcome::Done(did.join("; ")))
        }
    }

    fn state(&self) -> Result<Outcome> {
        let owner = user_ids(&self.args().user)?;
        let dir = &self.args().state_dir;
        if ensure_dir(dir, 0o700, owner)? {
            Ok(Outcome::Done(format!(
                "{} (0700, {})",
                dir.display(),
                self.args().user
            )))
        } else {
            Ok(Outcome::Ok(dir.display().to_string()))
        }
    }

    fn binary(&mut self) -> Result<Outcome> {
        let me = std::env::current_exe().context("finding the running executable")?;
        let target = self.bin();
        if me == target {
            return Ok(Outcome::Ok(format!("{} (running it)", target.display())));
        }
        let mine = std::fs::read(&me).with_context(|| format!("reading {}", me.display()))?;
        if std::fs::read(&target).ok().as_deref() == Some(&mine[..]) {
            return Ok(Outcome::Ok(format!("{} is this version", target.display())));
        }
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        write_atomic(&target, &mine, 0o755)?;
        // A running service must move to the new binary: the start step
        // restarts it as it does for a changed unit.
        self.unit_changed = true;
        Ok(Outcome::Done(format!("installed {}", target.display())))
    }

    /// The unit text for these paths and this user.
    pub fn unit_text(&self) -> String {
        let a = self.args();
        let exec = format!(
            "{} serve --config {}",
            self.bin().display(),
            self.config_file().display()
        );
        let mut text = UNIT.replace(UNIT_EXEC, &exec);
        if a.user != "sandboxd" {
            text = text
                .replace("\nUser=sandboxd\n", &format!("\nUser={}\n", a.user))
                .replace("\nGroup=sandboxd\n", &format!("\nGroup={}\n", a.user));
        }
        let extra: Vec<String> = [
            (&a.state_dir, crate::config::DEFAULT_STATE_DIR),
            (&a.run_dir, "/run/sandboxd"),
        ]
        .iter()
        .filter(|(p, default)| p.as_path() != Path::new(default))
        .map(|(p, _)| p.display().to_string())
        .collect();
        if !extra.is_empty() {
            text = text.replace(
                "\nUMask=0077\n",
                &format!("\nUMask=0077\nReadWritePaths={}\n", extra.join(" ")),
            );
        }
        text
    }

    fn unit(&mut self) -> Result<Outcome> {
        let path = self.args().unit_dir.join("sandboxd.service");
        let text = self.unit_text();
        if std::fs::read_to_string(&path).ok().as_deref() == Some(text.as_str()) {
            return Ok(Outcome::Ok(path.display().to_string()));
        }
        std::fs::create_dir_all(&self.args().unit_dir)?;
        write_atomic(&path, text.as_bytes(), 0o644)?;
        self.unit_changed = true;
        Ok(Outcome::Done(format!("installed {}", path.display())))
    }

    /// The PID in the PID file, if that process is a live sandboxd, and
    /// whether it runs a binary that has been replaced since it started.
    fn running_pid(&self) -> Option<(i32, bool)> {
        let pid: i32 = std::fs::read_to_string(self.pid_file())
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
        match exe.file_name()?.to_str()? {
            "sandboxd" => Some((pid, false)),
            "sandboxd (deleted)" => Some((pid, true)),
            _ => None,
        }
    }

    /// Stops a detached daemon (SIGTERM: it drains) and waits for it.
    fn stop_detached(pid: i32) -> Result<()> {
        use nix::sys::signal::{kill, Signal};
        let pid = nix::unistd::Pid::from_raw(pid);
        kill(pid, Signal::SIGTERM).with_context(|| format!("stopping sandboxd (pid {pid})"))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while Path::new(&format!("/proc/{pid}")).exists() {
            if Instant::now() > deadline {
                bail!("sandboxd (pid {pid}) did not stop within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    fn start(&self) -> Result<Outcome> {
        if self.plan.args.no_start {
            return Ok(Outcome::Ok("not started (--no-start)".into()));
        }
        if systemd_running() {
            let active = Command::new("systemctl")
                .args(["is-active", "--quiet", "sandboxd.service"])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if self.unit_changed {
                run(Command::new("systemctl").arg("daemon-reload"))?;
            }
            if active && !self.unit_changed {
                run(Command::new("systemctl").args(["enable", "sandboxd.service"]))?;
                return Ok(Outcome::Ok("sandboxd.service is active".into()));
            }
            run(Command::new("systemctl").args(["enable", "sandboxd.service"]))?;
            // Type=notify: returns once the daemon said READY=1.
            run(Command::new("systemctl").args(["restart", "sandboxd.service"]))?;
            return Ok(Outcome::Done("sandboxd.service enabled and started".into()));
        }
        match self.running_pid() {
            Some((pid, false)) => {
                return Ok(Outcome::Ok(format!(
                    "systemd not found; sandboxd runs detached (pid {pid}, {})",
                    self.pid_file().display()
                )))
            }
            Some((pid, true)) => {
                // Its binary was replaced (by the binary step of this or an
                // earlier run): restart it on the new one.
                Self::stop_detached(pid)?;
                return match self.start_detached()? {
                    Outcome::Done(how) => Ok(Outcome::Done(format!(
                        "restarted on the new binary (was pid {pid}); {how}"
                    ))),
                    other => Ok(other),
                };
            }
            None => {}
        }
        self.start_detached()
    }

    /// Without systemd: `setsid setpriv ... sandboxd serve`, readiness heard
    /// through the daemon's own sd_notify on an abstract socket.
    fn start_detached(&self) -> Result<Outcome> {
        use std::os::linux::net::SocketAddrExt;
        let a = self.args();
        let owner = user_ids(&a.user)?;
        ensure_dir(&a.run_dir, 0o700, owner)?;
        let log_path = a.state_dir.join("sandboxd.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        std::os::unix::fs::chown(&log_path, Some(owner.0.as_raw()), Some(owner.1.as_raw()))?;
        let name = format!("sandboxd-setup-{}", std::process::id());
        let notify = std::os::unix::net::UnixDatagram::bind_addr(
            &std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?,
        )?;
        let mut cmd = Command::new("setsid");
        cmd.current_dir("/");
        if owner.0.is_root() {
            cmd.arg(self.bin());
        } else {
            cmd.arg("setpriv")
                .arg(format!("--reuid={}", owner.0))
                .arg(format!("--regid={}", owner.1))
                .arg("--init-groups")
                .arg("--inh-caps=+net_bind_service")
                .arg("--ambient-caps=+net_bind_service")
                .arg("--")
                .arg(self.bin());
        }
        let mut child = cmd
            .arg("serve")
            .arg("--config")
            .arg(self.config_file())
            .env("NOTIFY_SOCKET", format!("@{name}"))
            .env_remove("WATCHDOG_USEC")
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting sandboxd serve")?;
        notify.set_read_timeout(Some(Duration::from_millis(250)))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut buf = [0u8; 4096];
        loop {
            if let Ok(n) = notify.recv(&mut buf) {
                if String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .any(|l| l == "READY=1")
                {
                    break;
                }
            }
            if let Some(status) = child.try_wait()? {
                let text = std::fs::read_to_string(&log_path).unwrap_or_default();
                let last = text.lines().last().unwrap_or("").to_string();
                bail!(
                    "sandboxd serve exited ({status}); see {}: {last}",
                    log_path.display()
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "sandboxd serve was not ready within 60 s; see {}",
                    log_path.display()
                );
            }
        }
        write_atomic(
            &self.pid_file(),
            format!("{}\n", child.id()).as_bytes(),
            0o644,
        )?;
        Ok(Outcome::Done(format!(
            "systemd not found: started sandboxd detached as {} (pid {}, PID file {}, log {})",
            a.user,
            child.id(),
            self.pid_file().display(),
            log_path.display()
        )))
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
        let _ = writeln!(
            s,
            "  2. Firewall: open TCP 2222 (sandbox SSH), 80 and 443 (HTTPS, certificates) and 22 (this host's own sshd)."
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
        let _ = writeln!(s, "       ssh -p 2222 myapp@myapp.example.com");
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn backports_from_deb822() {
        let src = "Types: deb\nURIs: http://mirror.invalid/debian\nSuites: bookworm bookworm-updates\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\nTypes: deb\nURIs: http://mirror.invalid/debian-security\nSuites: bookworm-security\nComponents: main\n";
        let out = derive_backports(src).unwrap();
        assert_eq!(out.matches("Suites: bookworm-backports").count(), 1);
        assert!(!out.contains("security"));
        assert!(out.contains("URIs: http://mirror.invalid/debian\n"));
        assert!(derive_backports("Types: deb\nSuites: trixie\n").is_none());
    }

    #[test]
    fn backports_from_sources_list() {
        let out = derive_backports_list(
            "deb http://m.invalid/debian bookworm main\ndeb http://m.invalid/s bookworm-security main\n",
        )
        .unwrap();
        assert_eq!(out, "deb http://m.invalid/debian bookworm-backports main\n");
    }
}
