//! Provisioning of sandbox containers: the runner of the scripts in
//! `provision/` (embedded in the binary with `include_str!`).
//!
//! This module owns the provisioning plan (what to install and how), pushing
//! the scripts to [`SCRIPT_DIR`] inside a container through the Incus files
//! API, running them one step at a time through Incus exec with `SANDBOXD_*`
//! environment variables, and parsing each step's `sandboxd-step:` result
//! line into a [`StepReport`]. It also writes the LLM environment file
//! ([`LLM_ENV_RELATIVE`] under the login user's home, mode 0600, owned by the
//! user) through the files API: secrets never pass through a command line or
//! an exec environment. It does not create containers, users' SSH keys or
//! routes: `lifecycle` does, and calls [`run`] once the container is up.
//!
//! Steps are split into two phases: [`Phase::Image`] (what a golden image
//! can carry: package source, base packages, sshd hardening, Docker, Go,
//! Node.js, the agent's program) and [`Phase::Sandbox`] (what belongs to one
//! sandbox: the login user, the LLM environment, the agent's unit for that
//! user, the user's hook). [`Phase::All`] runs both.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use incusctl::{Client, ExecRequest, PushOptions};
use serde::{Deserialize, Serialize};

mod plan;
pub use plan::{
    Agent, AgentKind, ApiKey, Llm, LlmSettings, Packages, Plan, Provider, UpstreamSources,
};

/// Directory inside the container that holds the scripts (mode 0700).
pub const SCRIPT_DIR: &str = "/var/lib/sandboxd/provision";

/// The LLM environment file, relative to the login user's home.
pub const LLM_ENV_RELATIVE: &str = ".config/sandboxd/llm.env";

/// Default agent port inside the container.
pub const DEFAULT_AGENT_PORT: u16 = 9999;

/// Bound on one step's run time (package installs and agent builds).
const STEP_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Cap on each of a step's stdout and stderr as the daemon collects them:
/// 4 MiB. Steps send tool output to the log inside the container and print
/// a short summary; the hook step prints only the tail of the hook's
/// output. A step over the cap is killed and fails with the cap error.
pub const MAX_STEP_OUTPUT: usize = 4 << 20;

/// Cap on the output of the small lookups (`/etc/os-release`, `getent`).
const MAX_SMALL_OUTPUT: usize = 64 * 1024;

/// Cap on the LLM environment file read back for comparison (a larger
/// file is not sandboxd's and is written again).
const MAX_LLM_ENV_FILE: usize = 64 * 1024;

const LIB: &str = include_str!("../../provision/lib.sh");

/// One embedded step script.
struct Script {
    name: &'static str,
    file: &'static str,
    body: &'static str,
}

const SCRIPTS: &[Script] = &[
    Script {
        name: "apt-source",
        file: "10-apt-source.sh",
        body: include_str!("../../provision/steps/10-apt-source.sh"),
    },
    Script {
        name: "base",
        file: "20-base.sh",
        body: include_str!("../../provision/steps/20-base.sh"),
    },
    Script {
        name: "sshd",
        file: "30-sshd.sh",
        body: include_str!("../../provision/steps/30-sshd.sh"),
    },
    Script {
        name: "docker",
        file: "40-docker.sh",
        body: include_str!("../../provision/steps/40-docker.sh"),
    },
    Script {
        name: "go",
        file: "50-go.sh",
        body: include_str!("../../provision/steps/50-go.sh"),
    },
    Script {
        name: "node",
        file: "60-node.sh",
        body: include_str!("../../provision/steps/60-node.sh"),
    },
    Script {
        name: "agent-install",
        file: "70-agent-install.sh",
        body: include_str!("../../provision/steps/70-agent-install.sh"),
    },
    Script {
        name: "user",
        file: "80-user.sh",
        body: include_str!("../../provision/steps/80-user.sh"),
    },
    Script {
        name: "llm-env",
        file: "85-llm-env.sh",
        body: include_str!("../../provision/steps/85-llm-env.sh"),
    },
    Script {
        name: "agent",
        file: "90-agent.sh",
        body: include_str!("../../provision/steps/90-agent.sh"),
    },
    Script {
        name: "hook",
        file: "99-hook.sh",
        body: include_str!("../../provision/steps/99-hook.sh"),
    },
];

const IMAGE_STEPS: &[&str] = &[
    "apt-source",
    "base",
    "sshd",
    "docker",
    "go",
    "node",
    "agent-install",
];
const SANDBOX_STEPS: &[&str] = &["apt-source", "user", "llm-env", "agent", "hook"];
const ALL_STEPS: &[&str] = &[
    "apt-source",
    "base",
    "sshd",
    "docker",
    "go",
    "node",
    "agent-install",
    "user",
    "llm-env",
    "agent",
    "hook",
];

/// Which steps to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// What a golden image carries: apt-source, base, sshd, docker, go,
    /// node, agent-install.
    Image,
    /// What each sandbox needs (also on a clone of a golden image):
    /// apt-source, user, llm-env, agent, hook.
    Sandbox,
    /// Both, in order: full provisioning of a plain image.
    #[default]
    All,
}

/// The step names of a phase, in the order they run.
pub fn step_names(phase: Phase) -> &'static [&'static str] {
    match phase {
        Phase::Image => IMAGE_STEPS,
        Phase::Sandbox => SANDBOX_STEPS,
        Phase::All => ALL_STEPS,
    }
}

/// The outcome of one step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepReport {
    /// Step name (one of [`step_names`]).
    pub step: &'static str,
    /// Whether the step changed anything.
    pub changed: bool,
    /// The script's short description of the outcome.
    pub detail: String,
    /// Other output of the step (for the hook: its own output).
    pub output: String,
    /// Run time, including pushing its files.
    pub elapsed: Duration,
}

/// Why provisioning stopped.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// The plan cannot be carried out as given.
    #[error("invalid provisioning plan: {0}")]
    InvalidPlan(String),
    /// A step exited non-zero; `reason` is its last stderr line.
    #[error("provisioning step {step} failed: {reason}")]
    Step {
        /// Step name.
        step: &'static str,
        /// The script's one-line reason.
        reason: String,
    },
    /// A step exited 0 without its result line.
    #[error("provisioning step {step} printed no `sandboxd-step:` result line")]
    NoResult {
        /// Step name.
        step: &'static str,
    },
    /// Incus refused or failed a request.
    #[error("provisioning {context}: {source}")]
    Incus {
        /// What was being done.
        context: String,
        /// The Incus client's error.
        #[source]
        source: incusctl::Error,
    },
}

fn incus_err(context: impl Into<String>) -> impl FnOnce(incusctl::Error) -> ProvisionError {
    let context = context.into();
    move |source| ProvisionError::Incus { context, source }
}

fn script(name: &str) -> Result<&'static Script, ProvisionError> {
    SCRIPTS
        .iter()
        .find(|s| s.name == name)
        .ok_or_else(|| ProvisionError::InvalidPlan(format!("unknown step {name}")))
}

/// The login user and their ids, as the container knows them.
struct Account {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

/// A prepared run: the container, the plan, the environment of the steps.
struct Runner<'a> {
    incus: &'a Client,
    instance: &'a str,
    plan: &'a Plan,
    user: String,
    env: BTreeMap<String, String>,
}

impl<'a> Runner<'a> {
    async fn prepare(
        incus: &'a Client,
        instance: &'a str,
        plan: &'a Plan,
    ) -> Result<Runner<'a>, ProvisionError> {
        validate(plan)?;
        let user = match &plan.user {
            Some(u) => u.clone(),
            None => default_user(incus, instance).await?,
        };
        let env = step_env(plan, &user);
        let runner = Runner {
            incus,
            instance,
            plan,
            user,
            env,
        };
        runner.push_scripts().await?;
        Ok(runner)
    }

    async fn push_scripts(&self) -> Result<(), ProvisionError> {
        let mkdir = ExecRequest::new([
            "install",
            "-d",
            "-m",
            "0700",
            "/var/lib/sandboxd",
            SCRIPT_DIR,
            &format!("{SCRIPT_DIR}/steps"),
        ]);
        let out = self
            .incus
            .exec(self.instance, &mkdir)
            .await
            .map_err(incus_err("making the script directory"))?;
        if !out.success() {
            return Err(ProvisionError::Step {
                step: "prepare",
                reason: last_line(&out.stderr_text())
                    .unwrap_or("cannot create the script directory")
                    .to_string(),
            });
        }
        let mode = PushOptions::mode(0o700);
        self.push(
            &format!("{SCRIPT_DIR}/lib.sh"),
            LIB.as_bytes().to_vec(),
            &mode,
        )
        .await?;
        for s in SCRIPTS {
            self.push(
                &format!("{SCRIPT_DIR}/steps/{}", s.file),
                s.body.as_bytes().to_vec(),
                &mode,
            )
            .await?;
        }
        if let AgentKind::Command {
            install: Some(bytes),
            ..
        } = &self.plan.agent.kind
        {
            self.push(&agent_install_path(), bytes.clone(), &mode)
                .await?;
        }
        if let Some(hook) = &self.plan.hook {
            self.push(&hook_path(), hook.clone(), &mode).await?;
        }
        Ok(())
    }

    async fn push(
        &self,
        path: &str,
        data: Vec<u8>,
        opts: &PushOptions,
    ) -> Result<(), ProvisionError> {
        self.incus
            .push_file(self.instance, path, data, opts)
            .await
            .map_err(incus_err(format!("pushing {path}")))
    }

    /// Runs one step with extra environment variables.
    async fn step(
        &self,
        name: &'static str,
        extra: &[(&str, &str)],
    ) -> Result<StepReport, ProvisionError> {
        let started = Instant::now();
        let s = script(name)?;
        let mut pre_changed = false;
        if name == "llm-env" {
            if let Some(llm) = &self.plan.llm {
                pre_changed = self.write_llm_env(llm).await?;
            }
        }
        let mut req =
            ExecRequest::new(["bash".to_string(), format!("{SCRIPT_DIR}/steps/{}", s.file)])
                .cwd("/")
                .timeout(STEP_TIMEOUT)
                .max_output(MAX_STEP_OUTPUT);
        for (k, v) in &self.env {
            req = req.env(k.clone(), v.clone());
        }
        for (k, v) in extra {
            req = req.env(*k, *v);
        }
        let out = self
            .incus
            .exec(self.instance, &req)
            .await
            .map_err(incus_err(format!("running step {name}")))?;
        let stdout = out.stdout_text();
        let stderr = out.stderr_text();
        if !out.success() {
            let reason = last_line(&stderr)
                .map(str::to_string)
                .unwrap_or_else(|| format!("exit code {}", out.exit_code));
            return Err(ProvisionError::Step { step: name, reason });
        }
        let (changed, detail, rest) =
            parse_result(&stdout).ok_or(ProvisionError::NoResult { step: name })?;
        let mut output = rest;
        if !stderr.trim().is_empty() {
            output.push_str(&stderr);
        }
        Ok(StepReport {
            step: name,
            changed: changed || pre_changed,
            detail,
            output,
            elapsed: started.elapsed(),
        })
    }

    /// Writes the LLM environment file through the files API when its
    /// content, mode or owner differ. Returns whether it wrote.
    async fn write_llm_env(&self, llm: &Llm) -> Result<bool, ProvisionError> {
        let account = account(self.incus, self.instance, &self.user).await?;
        let path = format!("{}/{LLM_ENV_RELATIVE}", account.home.trim_end_matches('/'));
        let data = llm.env_file()?;
        let current = match self
            .incus
            .pull_file_capped(self.instance, &path, MAX_LLM_ENV_FILE)
            .await
        {
            Ok(f) => Some(f),
            // Missing, or not what sandboxd wrote: written again.
            Err(e) if e.is_not_found() || e.is_too_large() => None,
            Err(e) => return Err(incus_err("reading the LLM environment file")(e)),
        };
        if let Some(f) = current {
            if f.data.as_ref() == data.as_slice()
                && f.meta.mode == 0o600
                && f.meta.uid == account.uid
                && f.meta.gid == account.gid
            {
                return Ok(false);
            }
        }
        self.push(
            &path,
            data,
            &PushOptions::mode(0o600).owner(account.uid, account.gid),
        )
        .await
        .map_err(|e| match e {
            ProvisionError::Incus { source, .. } => ProvisionError::Incus {
                context: "writing the LLM environment file".into(),
                source,
            },
            other => other,
        })?;
        tracing::debug!(instance = self.instance, user = %account.name, "LLM environment file written");
        Ok(true)
    }
}

/// Runs the plan's phase in `instance` (running, with systemd): pushes the
/// scripts, then runs each step in order, calling `on_step` after each one.
/// Stops at the first failing step.
pub async fn run(
    incus: &Client,
    instance: &str,
    plan: &Plan,
    mut on_step: impl FnMut(&StepReport),
) -> Result<Vec<StepReport>, ProvisionError> {
    let runner = Runner::prepare(incus, instance, plan).await?;
    let mut reports = Vec::new();
    for &name in step_names(plan.phase) {
        let report = runner.step(name, &[]).await?;
        on_step(&report);
        reports.push(report);
    }
    Ok(reports)
}

/// Reinstalls (rebuilds) the agent and restarts its unit: the steps
/// agent-install (forced) and agent (restart forced), reported as one step
/// named `agent`.
pub async fn update_agent(
    incus: &Client,
    instance: &str,
    plan: &Plan,
) -> Result<StepReport, ProvisionError> {
    let started = Instant::now();
    let runner = Runner::prepare(incus, instance, plan).await?;
    let install = runner
        .step("agent-install", &[("SANDBOXD_AGENT_FORCE", "1")])
        .await?;
    let unit = runner
        .step("agent", &[("SANDBOXD_AGENT_RESTART", "1")])
        .await?;
    Ok(StepReport {
        step: "agent",
        changed: install.changed || unit.changed,
        detail: format!("{}; {}", install.detail, unit.detail),
        output: format!("{}{}", install.output, unit.output),
        elapsed: started.elapsed(),
    })
}

/// Path of the LLM environment file for a user whose home is `home`.
pub fn llm_env_path(home: &str) -> String {
    format!("{}/{LLM_ENV_RELATIVE}", home.trim_end_matches('/'))
}

fn agent_install_path() -> String {
    format!("{SCRIPT_DIR}/agent-install")
}

fn hook_path() -> String {
    format!("{SCRIPT_DIR}/hook")
}

fn validate(plan: &Plan) -> Result<(), ProvisionError> {
    if let Some(user) = &plan.user {
        let ok = !user.is_empty()
            && user.len() <= 32
            && user
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
            && user
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if !ok || user == "root" {
            return Err(ProvisionError::InvalidPlan(format!(
                "invalid login user name {user:?}"
            )));
        }
    }
    if plan.agent.port == 0 {
        return Err(ProvisionError::InvalidPlan("agent port 0".into()));
    }
    if let AgentKind::Command { command, .. } = &plan.agent.kind {
        if command.trim().is_empty() || command.contains(['\n', '\r']) {
            return Err(ProvisionError::InvalidPlan(
                "the agent command must be one non-empty line".into(),
            ));
        }
    }
    if let Some(llm) = &plan.llm {
        llm.env_file()?;
    }
    if plan.packages == Packages::Upstream {
        let u = &plan.upstream;
        let missing: Vec<&str> = [
            ("docker_apt_url", &u.docker_apt_url),
            ("docker_apt_key_url", &u.docker_apt_key_url),
            ("go_version", &u.go_version),
            ("go_url", &u.go_url),
            ("node_version", &u.node_version),
            ("node_url", &u.node_url),
        ]
        .iter()
        .filter(|(_, v)| v.is_none())
        .map(|(k, _)| *k)
        .collect();
        if !missing.is_empty() && plan.phase != Phase::Sandbox {
            return Err(ProvisionError::InvalidPlan(format!(
                "upstream packages need: {}",
                missing.join(", ")
            )));
        }
    }
    Ok(())
}

/// The `SANDBOXD_*` variables of the steps (no secret among them).
fn step_env(plan: &Plan, user: &str) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    let mut set = |k: &str, v: &str| {
        env.insert(k.to_string(), v.to_string());
    };
    set("SANDBOXD_USER", user);
    set(
        "SANDBOXD_PACKAGES",
        match plan.packages {
            Packages::Distro => "distro",
            Packages::Upstream => "upstream",
        },
    );
    if let Some(p) = &plan.apt_proxy {
        set("SANDBOXD_APT_PROXY", p);
    }
    let u = &plan.upstream;
    for (k, v) in [
        ("SANDBOXD_DOCKER_APT_URL", &u.docker_apt_url),
        ("SANDBOXD_DOCKER_APT_KEY_URL", &u.docker_apt_key_url),
        ("SANDBOXD_GO_VERSION", &u.go_version),
        ("SANDBOXD_GO_URL", &u.go_url),
        ("SANDBOXD_GO_SHA256", &u.go_sha256),
        ("SANDBOXD_NODE_VERSION", &u.node_version),
        ("SANDBOXD_NODE_URL", &u.node_url),
        ("SANDBOXD_NODE_SHA256", &u.node_sha256),
    ] {
        if let Some(v) = v {
            set(k, v);
        }
    }
    set("SANDBOXD_AGENT_PORT", &plan.agent.port.to_string());
    match &plan.agent.kind {
        AgentKind::Shelley {
            package,
            version,
            goproxy,
        } => {
            set("SANDBOXD_AGENT", "shelley");
            if let Some(p) = package {
                set("SANDBOXD_SHELLEY_PACKAGE", p);
            }
            set("SANDBOXD_SHELLEY_VERSION", version);
            if let Some(g) = goproxy {
                set("SANDBOXD_GOPROXY", g);
            }
        }
        AgentKind::Command { command, install } => {
            set("SANDBOXD_AGENT", "command");
            set("SANDBOXD_AGENT_COMMAND", command);
            if install.is_some() {
                set("SANDBOXD_AGENT_INSTALL", &agent_install_path());
            }
        }
        AgentKind::None => set("SANDBOXD_AGENT", "none"),
    }
    if plan.hook.is_some() {
        set("SANDBOXD_HOOK", &hook_path());
    }
    env
}

/// `ubuntu` on Ubuntu, `debian` on Debian (from /etc/os-release).
async fn default_user(incus: &Client, instance: &str) -> Result<String, ProvisionError> {
    // /etc/os-release is usually a symlink, which the files API does not
    // follow: let the container read it.
    let out = incus
        .exec(
            instance,
            &ExecRequest::new(["cat", "/etc/os-release"]).max_output(MAX_SMALL_OUTPUT),
        )
        .await
        .map_err(incus_err("reading /etc/os-release"))?;
    let text = out.stdout_text();
    let id = text
        .lines()
        .find_map(|l| l.strip_prefix("ID="))
        .map(|v| v.trim().trim_matches('"').to_string())
        .unwrap_or_default();
    match id.as_str() {
        "ubuntu" => Ok("ubuntu".into()),
        "debian" => Ok("debian".into()),
        other => Err(ProvisionError::InvalidPlan(format!(
            "no default login user for distribution {other:?}: name one"
        ))),
    }
}

async fn account(incus: &Client, instance: &str, user: &str) -> Result<Account, ProvisionError> {
    let out = incus
        .exec(
            instance,
            &ExecRequest::new(["getent", "passwd", user]).max_output(MAX_SMALL_OUTPUT),
        )
        .await
        .map_err(incus_err(format!("looking up user {user}")))?;
    let line = out.stdout_text();
    let fields: Vec<&str> = line.trim().split(':').collect();
    let parsed = (fields.len() >= 7)
        .then(|| {
            Some(Account {
                name: fields[0].to_string(),
                uid: fields[2].parse().ok()?,
                gid: fields[3].parse().ok()?,
                home: fields[5].to_string(),
            })
        })
        .flatten();
    parsed.ok_or_else(|| ProvisionError::Step {
        step: "llm-env",
        reason: format!("user {user} does not exist"),
    })
}

fn last_line(text: &str) -> Option<&str> {
    text.lines().rev().map(str::trim).find(|l| !l.is_empty())
}

/// Parses the last non-empty stdout line: `sandboxd-step: changed|unchanged
/// DETAIL`. Returns (changed, detail, the other output).
fn parse_result(stdout: &str) -> Option<(bool, String, String)> {
    let lines: Vec<&str> = stdout.lines().collect();
    let idx = lines.iter().rposition(|l| !l.trim().is_empty())?;
    let rest = lines[idx].trim().strip_prefix("sandboxd-step: ")?;
    let (word, detail) = rest.split_once(' ').unwrap_or((rest, ""));
    let changed = match word {
        "changed" => true,
        "unchanged" => false,
        _ => return None,
    };
    let mut other = lines[..idx].join("\n");
    if !other.is_empty() {
        other.push('\n');
    }
    Some((changed, detail.trim().to_string(), other))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn result_line_is_parsed() {
        let (c, d, o) = parse_result("hello\nsandboxd-step: changed did it\n\n").unwrap();
        assert!(c);
        assert_eq!(d, "did it");
        assert_eq!(o, "hello\n");
        let (c, d, _) = parse_result("sandboxd-step: unchanged x y").unwrap();
        assert!(!c);
        assert_eq!(d, "x y");
        assert!(parse_result("sandboxd-step: maybe x").is_none());
        assert!(parse_result("sandboxd-step: changed x\nmore").is_none());
        assert!(parse_result("").is_none());
    }

    #[test]
    fn every_phase_step_has_a_script() {
        for phase in [Phase::Image, Phase::Sandbox, Phase::All] {
            for name in step_names(phase) {
                assert!(script(name).is_ok(), "{name}");
            }
        }
        assert_eq!(ALL_STEPS.len(), SCRIPTS.len());
    }

    #[test]
    fn key_is_never_debug_printed_and_bad_values_are_refused() {
        let llm = Llm {
            provider: Provider::Fireworks,
            key: ApiKey::new("sk-secret-123"),
            base_url: Some("https://llm.test/v1".into()),
        };
        assert!(!format!("{llm:?}").contains("sk-secret-123"));
        let text = String::from_utf8(llm.env_file().unwrap()).unwrap();
        assert!(text.contains("FIREWORKS_API_KEY='sk-secret-123'\n"));
        assert!(text.contains("FIREWORKS_BASE_URL='https://llm.test/v1'\n"));
        let bad = Llm {
            key: ApiKey::new("a'b; rm -rf /"),
            ..llm
        };
        let err = bad.env_file().unwrap_err().to_string();
        assert!(!err.contains("rm -rf"), "{err}");
    }

    #[test]
    fn step_env_carries_no_key() {
        let plan = Plan {
            llm: Some(Llm {
                provider: Provider::Anthropic,
                key: ApiKey::new("sk-ant-zzz"),
                base_url: None,
            }),
            hook: Some(b"echo hi".to_vec()),
            ..Plan::default()
        };
        let env = step_env(&plan, "debian");
        assert!(env.values().all(|v| !v.contains("sk-ant-zzz")));
        assert_eq!(env["SANDBOXD_AGENT"], "shelley");
        assert_eq!(env["SANDBOXD_HOOK"], hook_path());
    }

    #[test]
    fn plan_pieces_round_trip_through_toml() {
        let agent = Agent {
            kind: AgentKind::Command {
                command: "/usr/bin/node /opt/a.js".into(),
                install: None,
            },
            port: 8080,
        };
        let text = toml::to_string(&agent).unwrap();
        let back: Agent = toml::from_str(&text).unwrap();
        assert_eq!(back, agent);
        let shelley: Agent = toml::from_str("kind = \"shelley\"\n").unwrap();
        assert_eq!(shelley, Agent::default());
    }
}
