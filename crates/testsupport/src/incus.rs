//! Helpers of the tests that drive the real incusd prepared by
//! `.ci/setup-incus.sh`: a client, unique container names, containers
//! removed when a test ends (also on panic), a daemon wired to the test
//! image, and checks a user would make (routes, list, ssh with the
//! gateway's own key). Tests that use them start with
//! `require(&[Component::Incus])`.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use incusctl::{Client, CreateInstance, ImageSource};

use crate::daemon::{keygen, Daemon, DaemonBuilder};

/// Alias of the image `.ci/setup-incus.sh` imports.
pub const TEST_IMAGE: &str = "test/debian-ssh";

/// Bound on waiting for a fresh container's DHCP address.
pub const ADDRESS_TIMEOUT: Duration = Duration::from_secs(60);

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    })
}

/// Runs a future on the helpers' runtime (from synchronous tests).
pub fn block_on<F: Future>(f: F) -> F::Output {
    runtime().block_on(f)
}

/// A client of the real incusd, or a failure with instructions.
pub async fn client() -> Client {
    Client::connect(None).await.unwrap_or_else(|e| {
        panic!("these tests need incusd with the test image ({e}); run .ci/setup-incus.sh as root")
    })
}

/// [`client`] from synchronous tests.
pub fn incus() -> Client {
    block_on(client())
}

/// `t-lc-<tag>-<random>`: unique per test and per run.
pub fn unique(tag: &str) -> String {
    unique_with("t-lc", tag)
}

/// `t-incusctl-<tag>-<random>`: unique per test and per run.
pub fn unique_name(tag: &str) -> String {
    unique_with("t-incusctl", tag)
}

fn unique_with(prefix: &str, tag: &str) -> String {
    format!("{prefix}-{tag}-{:06x}", rand::random::<u32>() & 0xff_ffff)
}

/// An instance deleted (forcibly) when dropped.
pub struct TestInstance {
    pub client: Client,
    pub name: String,
}

/// The name the daemon tests give [`TestInstance`].
pub type InstanceGuard = TestInstance;

impl TestInstance {
    /// A guard for the container `name` (from synchronous tests).
    pub fn new(name: &str) -> Self {
        Self::adopt(&incus(), name)
    }

    /// A guard for an instance the test creates itself.
    pub fn adopt(client: &Client, name: &str) -> TestInstance {
        TestInstance {
            client: client.clone(),
            name: name.to_string(),
        }
    }

    /// Launches `test/debian-ssh` with nesting and small limits, started.
    pub async fn launch(client: &Client, tag: &str) -> TestInstance {
        let (guard, req) = Self::prepare(client, tag);
        client.create_instance(&req).await.expect("create instance");
        guard
    }

    /// Like [`TestInstance::launch`], collecting Incus' progress reports.
    pub async fn launch_with_progress(
        client: &Client,
        tag: &str,
    ) -> (TestInstance, Vec<incusctl::Progress>) {
        let (guard, req) = Self::prepare(client, tag);
        let (tx, mut rx) = tokio::sync::mpsc::channel(64);
        let collector = tokio::spawn(async move {
            let mut all = Vec::new();
            while let Some(p) = rx.recv().await {
                all.push(p);
            }
            all
        });
        client
            .create_instance_with_progress(&req, tx)
            .await
            .expect("create instance");
        (guard, collector.await.unwrap())
    }

    fn prepare(client: &Client, tag: &str) -> (TestInstance, CreateInstance) {
        let name = unique_name(tag);
        let req = CreateInstance::new(&name, ImageSource::local(TEST_IMAGE))
            .docker_ready()
            .limits_cpu(1)
            .limits_memory("512MiB")
            .config("user.incusctl.test", "1")
            .start(true);
        // The guard exists before the instance, so a half-made instance
        // is removed too.
        (Self::adopt(client, &name), req)
    }
}

impl Drop for TestInstance {
    fn drop(&mut self) {
        let client = self.client.clone();
        let name = self.name.clone();
        // Drop cannot be async and may run on a runtime: clean up on a
        // thread of its own with its own small runtime.
        let handle = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("cleanup runtime");
            rt.block_on(async {
                match client.delete_instance(&name, true).await {
                    Ok(()) => {}
                    Err(e) if e.is_not_found() => {}
                    Err(e) => eprintln!("cleanup of instance {name} failed: {e}"),
                }
            });
        });
        let _ = handle.join();
    }
}

/// A daemon of `bin` whose default image is the test image and whose
/// reconcile runs every second; `tune` adds flags or replaces nothing else.
pub fn daemon_with(
    bin: impl AsRef<Path>,
    tune: impl FnOnce(DaemonBuilder) -> DaemonBuilder,
) -> Daemon {
    tune(Daemon::builder(bin).config(&format!(
        "default_image = \"{TEST_IMAGE}\"\nincus_reconcile_secs = 1\n\
         [provision]\nmode = \"none\"\n"
    )))
    .start()
}

pub fn daemon(bin: impl AsRef<Path>) -> Daemon {
    daemon_with(bin, |b| b)
}

/// Polls `check` every 100 ms until it holds, for at most `limit`.
pub fn wait_until(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The sandbox object of `list --json`, if listed.
pub fn listed(d: &Daemon, name: &str) -> Option<serde_json::Value> {
    d.json(&["list", "--json"])
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .cloned()
}

/// The SSH route's target for user `name` in `routes --json`.
pub fn ssh_target(d: &Daemon, name: &str) -> Option<String> {
    let dump = d.json(&["routes", "--json"]);
    dump["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["protocol"] == "ssh" && r["key"] == name)
        .map(|r| r["target"].as_str().unwrap().to_string())
}

/// `sandboxd create NAME --domain NAME.test --ssh-key K` with extra args.
pub fn create(d: &Daemon, name: &str, extra: &[&str]) -> std::process::Output {
    let key = d.keygen("client");
    let domain = format!("{name}.test");
    let mut args = vec![
        "create",
        name,
        "--domain",
        &domain,
        "--ssh-key",
        key.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    d.cli(&args)
}

/// Runs `hostname` in the container over SSH the way the gateway does: as
/// the sandbox's login user, with the gateway's own key for this sandbox
/// (from a backup), checking the pinned host key strictly.
pub fn ssh_as_gateway(d: &Daemon, name: &str, address: &str) -> String {
    let backup = d.json(&["backup"]);
    let sb = backup["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap()
        .clone();
    let dir = d.dir.path();
    let key = dir.join(format!("gw-{name}"));
    std::fs::write(
        &key,
        sb["upstream_key"]["private_openssh"].as_str().unwrap(),
    )
    .unwrap();
    set_mode(&key, 0o600);
    let known = dir.join(format!("known-{name}"));
    let host_key = sb["upstream_host_key"].as_str().expect("host key pinned");
    std::fs::write(&known, format!("{address} {host_key}\n")).unwrap();
    let out = Command::new("ssh")
        .arg("-i")
        .arg(&key)
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known.display()))
        .args([
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=10",
            "-F",
            "/dev/null",
        ])
        .arg(format!("{}@{address}", sb["user"].as_str().unwrap()))
        .arg("hostname")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ssh with the gateway key failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Runs a shell command in the container through Incus; returns stdout.
pub fn exec(name: &str, script: &str) -> String {
    let client = incus();
    let out = block_on(client.exec_ok(name, &incusctl::ExecRequest::shell(script)))
        .unwrap_or_else(|e| panic!("exec {script:?} in {name}: {e}"));
    out.stdout_text()
}

/// A fresh client key in `dir`.
pub fn client_key(dir: &Path) -> PathBuf {
    keygen(dir, "client")
}

/// `ssh -p PORT NAME@127.0.0.1 COMMAND` through the daemon's SSH gate with
/// the client key `create` used, checking the gateway's host key strictly.
pub fn gateway_ssh(d: &Daemon, name: &str, command: &str) -> std::process::Output {
    let (port, known_hosts) = d.gateway_known_hosts();
    let key = d.keygen("client").with_extension("");
    Command::new("ssh")
        .args(["-F", "/dev/null", "-o", "BatchMode=yes"])
        .args([
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "IdentitiesOnly=yes",
        ])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
        .arg("-i")
        .arg(&key)
        .args(["-p", &port])
        .arg(format!("{name}@127.0.0.1"))
        .arg(command)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
}
