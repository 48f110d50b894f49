//! Provisioning for real: a container of `test/debian-ssh` provisioned
//! through the host's package cache (`.ci/setup-incus.sh`, then
//! `.ci/setup-provision.sh`), checked the way a user would: sudo, sshd's
//! effective settings, Docker/Go/Node, the agent answering on its port
//! (also after a container restart), the LLM key file, a re-run that
//! changes nothing, a failing hook; and shellcheck over every script.
//!
//! The agent here is a stand-in given by `SANDBOXD_AGENT_COMMAND` (a tiny
//! Node.js HTTP server installed by an agent install script): shelley is
//! built with `go install` from a Go module proxy, which these machines
//! cannot reach.
//!
//! `SANDBOXD_TEST_APT_PROXY` overrides the cache address
//! (default `http://198.18.0.1:3142`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::incus as support;
use testsupport::{require, Component};

use std::process::Command;
use std::time::{Duration, Instant};

use incusctl::{CreateInstance, ExecRequest, ImageSource, StopOptions};
use sandboxd::provision::{
    self, Agent, AgentKind, ApiKey, Llm, Phase, Plan, Provider, ProvisionError, StepReport,
};
use support::{block_on, incus, InstanceGuard, TEST_IMAGE};

const AGENT_JS: &str = r#"
const http = require('http');
http.createServer((req, res) => {
  res.end('stand-in agent ' + (process.env.FIREWORKS_API_KEY ? 'has-key' : 'no-key') + '\n');
}).listen(Number(process.env.SANDBOXD_AGENT_PORT), '0.0.0.0');
"#;

fn install_script() -> Vec<u8> {
    format!(
        "#!/bin/bash\nset -euo pipefail\nmkdir -p /opt/sandboxd-test-agent\n\
         cat > /opt/sandboxd-test-agent/agent.js <<'JS'\n{AGENT_JS}\nJS\n\
         echo installed stand-in agent\n"
    )
    .into_bytes()
}

fn apt_proxy() -> String {
    std::env::var("SANDBOXD_TEST_APT_PROXY").unwrap_or_else(|_| "http://198.18.0.1:3142".into())
}

fn plan(key: &str) -> Plan {
    Plan {
        phase: Phase::All,
        user: None,
        apt_proxy: Some(apt_proxy()),
        agent: Agent {
            kind: AgentKind::Command {
                command: "/usr/bin/node /opt/sandboxd-test-agent/agent.js".into(),
                install: Some(install_script()),
            },
            port: 9999,
        },
        llm: Some(Llm {
            provider: Provider::Fireworks,
            key: ApiKey::new(key),
            base_url: Some("https://llm.test/inference/v1".into()),
        }),
        hook: Some(b"#!/bin/sh\necho hook says hello\n".to_vec()),
        ..Plan::default()
    }
}

/// Runs a shell command in the container; returns (exit code, stdout).
fn sh(name: &str, script: &str) -> (i32, String) {
    let out = block_on(incus().exec(name, &ExecRequest::shell(script))).unwrap();
    (out.exit_code, out.stdout_text())
}

fn run(name: &str, plan: &Plan, log: &mut Vec<String>) -> Result<Vec<StepReport>, ProvisionError> {
    let client = incus();
    block_on(provision::run(&client, name, plan, |r| {
        let line = format!(
            "  {:<14} {:<9} {:>6.1}s  {}",
            r.step,
            if r.changed { "changed" } else { "unchanged" },
            r.elapsed.as_secs_f64(),
            r.detail
        );
        eprintln!("{line}");
        log.push(line);
    }))
}

/// Waits until the agent answers inside the container.
fn agent_answer(name: &str, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let (code, out) = sh(name, "curl -sf --max-time 2 http://127.0.0.1:9999/");
        if code == 0 {
            return out;
        }
        assert!(
            Instant::now() < deadline,
            "the agent did not answer within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn start_container(name: &str) {
    let client = incus();
    let req = CreateInstance::new(name, ImageSource::local(TEST_IMAGE))
        .docker_ready()
        .start(true);
    block_on(client.create_instance(&req)).unwrap();
    block_on(client.wait_for_ipv4(name, Duration::from_secs(60))).unwrap();
    // systemd finished booting (running or degraded).
    let (_, state) = sh(
        name,
        "systemctl is-system-running --wait 2>/dev/null || true",
    );
    assert!(!state.trim().is_empty(), "systemd state unknown");
}

#[test]
fn full_provisioning_rerun_restart_key_and_failing_hook() {
    if !require(&[Component::Incus, Component::PackageCache]) {
        return;
    }
    let name = support::unique("prov");
    let _guard = InstanceGuard::new(&name);
    start_container(&name);
    let key = format!("fw-test-{:016x}", rand::random::<u64>());
    let plan = plan(&key);
    let mut log = Vec::new();

    // Full provisioning: every step of both phases reports, in order.
    let t = Instant::now();
    let reports = run(&name, &plan, &mut log).expect("full provisioning");
    let full = t.elapsed();
    eprintln!("full provisioning: {full:.1?}");
    let names: Vec<&str> = reports.iter().map(|r| r.step).collect();
    assert_eq!(names, provision::step_names(Phase::All));
    assert!(
        reports.iter().all(|r| r.step == "apt-source" || r.changed),
        "{reports:#?}"
    );
    let hook = reports.iter().find(|r| r.step == "hook").unwrap();
    assert!(hook.output.contains("hook says hello"), "{hook:?}");

    // The user has passwordless sudo.
    let (code, _) = sh(&name, "runuser -u debian -- sudo -n true");
    assert_eq!(code, 0, "sudo -n true failed for debian");
    // sshd refuses root and passwords (effective settings).
    let (code, cfg) = sh(&name, "sshd -T");
    assert_eq!(code, 0);
    for want in [
        "permitrootlogin no",
        "passwordauthentication no",
        "kbdinteractiveauthentication no",
        "pubkeyauthentication yes",
        "authenticationmethods publickey",
    ] {
        assert!(cfg.lines().any(|l| l == want), "sshd -T lacks {want:?}");
    }
    // Docker, Go, Node.
    let (code, out) = sh(
        &name,
        "docker --version && go version && node --version && npm --version",
    );
    assert_eq!(code, 0, "{out}");
    let (code, out) = sh(&name, "id -nG debian");
    assert!(
        code == 0 && out.split_whitespace().any(|g| g == "docker"),
        "{out}"
    );
    let (docker_code, docker_info) = sh(
        &name,
        "docker info --format '{{.ServerVersion}} {{.Driver}}' 2>&1",
    );
    eprintln!("docker info: exit {docker_code}: {}", docker_info.trim());
    assert_eq!(docker_code, 0, "dockerd does not answer: {docker_info}");
    let (code, _) = sh(&name, "runuser -u debian -- docker info >/dev/null 2>&1");
    assert_eq!(code, 0, "the login user cannot reach dockerd");
    // The agent unit is enabled, active, and answers with the key in its env.
    let (_, enabled) = sh(&name, "systemctl is-enabled sandboxd-agent");
    assert_eq!(enabled.trim(), "enabled");
    assert_eq!(
        agent_answer(&name, Duration::from_secs(5)).trim(),
        "stand-in agent has-key"
    );

    // The key file: 0600, owned by the user, read by login shells.
    let client = incus();
    let meta = block_on(client.stat_file(&name, "/home/debian/.config/sandboxd/llm.env"))
        .unwrap()
        .expect("the LLM env file exists");
    let (_, ids) = sh(&name, "id -u debian; id -g debian");
    let ids: Vec<u32> = ids.split_whitespace().map(|s| s.parse().unwrap()).collect();
    assert_eq!((meta.mode, meta.uid, meta.gid), (0o600, ids[0], ids[1]));
    let (_, seen) = sh(&name, "su - debian -c 'printenv FIREWORKS_API_KEY'");
    assert!(
        seen.trim() == key,
        "a login shell of the user does not see the key"
    );
    let (_, seen) = sh(&name, "su - debian -c 'printenv FIREWORKS_BASE_URL'");
    assert_eq!(seen.trim(), "https://llm.test/inference/v1");
    let (_, count) = sh(
        &name,
        "tr '\\0' '\\n' < /proc/$(systemctl show -p MainPID --value sandboxd-agent)/environ | grep -c '^FIREWORKS_API_KEY=' || true",
    );
    assert_eq!(count.trim(), "1", "the unit's process lacks the key");

    // Re-running changes nothing.
    let t = Instant::now();
    let again = run(&name, &plan, &mut log).expect("re-run");
    eprintln!("re-run: {:.1?}", t.elapsed());
    let changed: Vec<&StepReport> = again.iter().filter(|r| r.changed).collect();
    assert!(changed.is_empty(), "re-run changed: {changed:#?}");

    // After a restart of the container the agent is back.
    block_on(client.restart(&name, StopOptions::graceful(Duration::from_secs(30)))).unwrap();
    block_on(client.wait_for_ipv4(&name, Duration::from_secs(60))).unwrap();
    assert_eq!(
        agent_answer(&name, Duration::from_secs(60)).trim(),
        "stand-in agent has-key"
    );
    let (_, active) = sh(&name, "systemctl is-active sandboxd-agent");
    assert_eq!(active.trim(), "active");

    // The key's value is in no process list, no journal, no provisioning
    // log, and not in this test's own output.
    for (what, script) in [
        ("process list", "ps -eo args"),
        ("journal", "journalctl --no-pager -o cat 2>/dev/null"),
        (
            "unit journal",
            "journalctl -u sandboxd-agent --no-pager -o cat 2>/dev/null",
        ),
        ("provisioning log", "cat /var/log/sandboxd/provision.log"),
    ] {
        let (_, text) = sh(&name, script);
        assert!(!text.contains(&key), "the key appears in the {what}");
    }
    assert!(
        log.iter().all(|l| !l.contains(&key)),
        "the key appears in the reports"
    );
    let reports_text = format!("{reports:?}{again:?}{plan:?}");
    assert!(
        !reports_text.contains(&key),
        "the key appears in Debug output"
    );

    // A failing hook fails the step `hook` with its message.
    let failing = Plan {
        phase: Phase::Sandbox,
        hook: Some(b"#!/bin/sh\necho about to fail\necho the hook gave up >&2\nexit 3\n".to_vec()),
        ..plan.clone()
    };
    match run(&name, &failing, &mut log) {
        Err(ProvisionError::Step { step, reason }) => {
            assert_eq!(step, "hook");
            assert!(
                reason.contains("status 3") && reason.contains("the hook gave up"),
                "{reason}"
            );
        }
        other => panic!("a failing hook gave {other:?}"),
    }
}

#[test]
fn every_provisioning_script_passes_shellcheck() {
    if !require(&[Component::Program("shellcheck")]) {
        return;
    }
    let root = env!("CARGO_MANIFEST_DIR");
    let mut files = vec![
        format!("{root}/provision/lib.sh"),
        format!("{root}/.ci/setup-provision.sh"),
    ];
    for entry in std::fs::read_dir(format!("{root}/provision/steps")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "sh") {
            files.push(path.display().to_string());
        }
    }
    assert!(files.len() >= 12, "{files:?}");
    let out = Command::new("shellcheck")
        .arg("-x")
        .args(&files)
        .output()
        .expect("shellcheck is installed (.ci/setup-provision.sh)");
    assert!(
        out.status.success(),
        "shellcheck findings:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
