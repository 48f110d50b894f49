//! Golden images end to end, through the real CLI, daemon and incusd:
//! `image build` provisions a builder from the test image and publishes it;
//! `create` on it runs only the per-sandbox steps, takes the clean-baseline
//! snapshot and is reachable over SSH through the gateway with the tools in
//! place; every clone has its own SSH host key; `update-agent` reinstalls
//! the agent in place; the LLM key reaches the agent and no log.
//!
//! Needs `.ci/setup-incus.sh` and `.ci/setup-provision.sh` (the host-side
//! package cache at 198.18.0.1:3142, since containers reach nothing
//! outside). The agent is a stand-in (a small Node.js HTTP server installed
//! by an install script) because shelley is built from sources on the
//! internet, which these machines cannot reach.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::incus as support;
use testsupport::{require, Component};

use std::time::Instant;

use support::{block_on, create, exec, gateway_ssh, incus, listed, unique, InstanceGuard};

const APT_CACHE: &str = "http://198.18.0.1:3142";

/// Installs the stand-in agent: answers with whether it sees its key.
const AGENT_INSTALL: &str = r#"#!/bin/sh
set -e
cat >/usr/local/lib/stand-in-agent.js <<'JS'
const http = require('http');
const port = Number(process.env.SANDBOXD_AGENT_PORT || 9999);
http.createServer((req, res) => {
  res.end('stand-in agent ' + (process.env.ANTHROPIC_API_KEY ? 'has-key' : 'no-key') + '\n');
}).listen(port);
JS
echo "stand-in agent installed"
"#;

struct ImageGuard(String);
impl Drop for ImageGuard {
    fn drop(&mut self) {
        let client = incus();
        if let Ok(a) = block_on(client.image_alias(&self.0)) {
            let _ = block_on(client.delete_image(&a.target));
        }
    }
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn golden_image_then_create_clones_it_with_per_sandbox_steps_only() {
    if !require(&[
        Component::Incus,
        Component::PackageCache,
        Component::Program("curl"),
    ]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let install = dir.path().join("agent-install.sh");
    std::fs::write(&install, AGENT_INSTALL).unwrap();
    let alias = format!("test/golden-{}", unique("g"));
    let _image = ImageGuard(alias.clone());
    let d = common::Daemon::builder(common::BIN)
        .config(&format!(
            "default_image = \"{}\"\nincus_reconcile_secs = 5\n\
             [provision]\nmode = \"auto\"\napt_proxy = \"{APT_CACHE}\"\n\
             agent = \"command\"\n\
             agent_command = \"/usr/bin/node /usr/local/lib/stand-in-agent.js\"\n\
             agent_install = \"{}\"\ngolden_alias = \"{alias}\"\n",
            support::TEST_IMAGE,
            install.display()
        ))
        .start();

    // Build: every image step reported, the alias points at a golden image.
    let t = Instant::now();
    let out = d.cli(&["image", "build", "--json"]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), d.log_text());
    let build_secs = t.elapsed().as_secs_f64();
    let progress = stderr(&out);
    for step in ["docker", "go", "node", "agent-install", "sshd"] {
        assert!(
            progress.contains(&format!("{step}: ")),
            "{step}: {progress}"
        );
    }
    let img: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(img["alias"], alias.as_str());
    let client = incus();
    let target = block_on(client.image_alias(&alias)).unwrap().target;
    let props = block_on(client.image(&target)).unwrap().properties;
    assert_eq!(props["sandboxd.golden"], "true");
    // The builder is gone.
    let leftovers: Vec<String> = block_on(client.list_instances_brief())
        .unwrap()
        .into_iter()
        .filter(|i| i.name.starts_with("sandboxd-image-"))
        .map(|i| i.name)
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // Create two sandboxes from it; the first with an LLM key.
    let key_file = dir.path().join("llm.key");
    let secret = "sk-golden-test-4b1d9e0f";
    std::fs::write(&key_file, format!("{secret}\n")).unwrap();
    let a = unique("ga");
    let b = unique("gb");
    let _ga = InstanceGuard::new(&a);
    let _gb = InstanceGuard::new(&b);
    let t = Instant::now();
    let out = create(
        &d,
        &a,
        &[
            "--image",
            &alias,
            "--llm-provider",
            "anthropic",
            "--llm-key-file",
            key_file.to_str().unwrap(),
        ],
    );
    let create_secs = t.elapsed().as_secs_f64();
    assert!(out.status.success(), "{}\n{}", stderr(&out), d.log_text());
    let progress = stderr(&out);
    assert!(progress.contains("per-sandbox"), "{progress}");
    for image_step in ["docker: ", "go: ", "node: "] {
        assert!(!progress.contains(image_step), "{image_step}: {progress}");
    }
    let out = create(&d, &b, &["--image", &alias]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), d.log_text());
    eprintln!("image build {build_secs:.1} s, create from it {create_secs:.1} s");

    // SSH through the gateway lands with the tools ready and sudo working.
    let out = gateway_ssh(
        &d,
        &a,
        "node --version && go version && docker --version && sudo -n true && echo ready",
    );
    assert!(out.status.success(), "{}\n{}", stderr(&out), d.log_text());
    assert!(String::from_utf8_lossy(&out.stdout).contains("ready"));

    // Each clone made its own host key.
    let backup = d.json(&["backup"]);
    let host_key = |n: &str| {
        backup["sandboxes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == n)
            .unwrap()["upstream_host_key"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_ne!(host_key(&a), host_key(&b));

    // The clean baseline exists; the agent runs with the key, which is in
    // no log and no process list.
    let snaps = d.json(&["snapshot", "list", &a, "--json"]);
    assert!(
        snaps
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["name"] == "clean-baseline"),
        "{snaps}"
    );
    let ip = listed(&d, &a).unwrap()["ipv4"]
        .as_str()
        .unwrap()
        .to_string();
    let agent = |ip: &str| {
        std::process::Command::new("curl")
            .args(["-sf", "--max-time", "5"])
            .arg(format!("http://{ip}:9999/"))
            .output()
            .unwrap()
    };
    assert_eq!(
        String::from_utf8_lossy(&agent(&ip).stdout).trim(),
        "stand-in agent has-key"
    );
    let ipb = listed(&d, &b).unwrap()["ipv4"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        String::from_utf8_lossy(&agent(&ipb).stdout).trim(),
        "stand-in agent no-key"
    );
    assert!(!exec(&a, "ps -eo args").contains(secret));
    assert!(!d.log_text().contains(secret));

    // update-agent reinstalls it in place; it answers again.
    let pid_before = exec(&a, "systemctl show -p MainPID --value sandboxd-agent");
    let out = d.cli(&["update-agent", &a]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), d.log_text());
    let pid_after = exec(&a, "systemctl show -p MainPID --value sandboxd-agent");
    assert_ne!(pid_before.trim(), pid_after.trim(), "agent not restarted");
    support::wait_until(std::time::Duration::from_secs(20), "agent back", || {
        agent(&ip).status.success()
    });

    // Deleting a sandbox and the stopped-sandbox case of update-agent.
    d.ok(&["stop", &b]);
    let err = d.fails(&["update-agent", &b]);
    assert!(err.contains("stopped"), "{err}");
}
