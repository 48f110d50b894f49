//! `sandboxd setup` run for real, as root, against the incusd this machine
//! already runs (`.ci/setup-incus.sh`): it must find and use it, create a
//! uniquely named pool, bridge, profile and system user, write the config
//! and unit under a temporary prefix, and report every step `ok` on a second
//! run without changing anything. Everything made is removed at the end
//! (also on panic) through the Incus REST API and userdel.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};
use testsupport::{require, Component};

const BIN: &str = env!("CARGO_BIN_EXE_sandboxd");

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn incus() -> incusctl::Client {
    rt().block_on(incusctl::Client::connect(None))
        .unwrap_or_else(|e| panic!("these tests need incusd ({e}); run .ci/setup-incus.sh"))
}

/// useradd/userdel lock /etc/passwd: the tests of this file take turns.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn tag() -> String {
    format!("{:06x}", rand::random::<u32>() & 0xff_ffff)
}

/// A host setup under a temporary prefix, with its own Incus objects and
/// user; removes them all when dropped.
struct Fixture {
    dir: tempfile::TempDir,
    pool: String,
    bridge: Option<String>,
    profile: String,
    user: String,
    extra: Vec<String>,
}

impl Fixture {
    fn new(extra: &[&str]) -> Fixture {
        let t = tag();
        let dir = tempfile::tempdir().unwrap();
        // The daemon (run as the new user) must be able to reach its dirs.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        Fixture {
            dir,
            pool: format!("t-setup-{t}"),
            bridge: Some(format!("tsb{t}")),
            profile: format!("t-setup-{t}"),
            user: format!("tsbx{t}"),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn bridge(&self) -> &str {
        self.bridge.as_deref().unwrap_or("sbx0")
    }

    fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "setup".into(),
            "--pool".into(),
            self.pool.clone(),
            "--bridge".into(),
            self.bridge().to_string(),
            // 198.18.0.0/15 is the project's test range (sbx0 is 198.18.0.1).
            "--bridge-ipv4".into(),
            format!("198.19.{}.1/24", 1 + rand::random::<u8>() % 250),
            "--no-nat".into(),
            "--profile".into(),
            self.profile.clone(),
            "--user".into(),
            self.user.clone(),
        ];
        for (flag, p) in [
            ("--config-dir", "etc"),
            ("--state-dir", "state"),
            ("--run-dir", "run"),
            ("--prefix", "usr"),
            ("--unit-dir", "units"),
        ] {
            a.push(flag.into());
            a.push(self.path(p).display().to_string());
        }
        a.extend(self.extra.iter().cloned());
        a
    }

    fn run(&self, more: &[&str]) -> Output {
        Command::new(BIN)
            .args(self.args())
            .args(more)
            .output()
            .unwrap()
    }

    /// Runs setup, requires success, returns step → (status, detail).
    fn ok(&self, more: &[&str]) -> BTreeMap<String, (String, String)> {
        let out = self.run(more);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "setup failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        steps(&stdout)
    }

    fn config(&self) -> PathBuf {
        self.path("etc/sandboxd.toml")
    }
}

/// The step lines (`NAME STATUS DETAIL`) of setup's output.
fn steps(stdout: &str) -> BTreeMap<String, (String, String)> {
    let mut map = BTreeMap::new();
    for line in stdout.lines() {
        if line.trim().is_empty() {
            break;
        }
        let mut parts = line.split_whitespace();
        let step = parts.next().unwrap().to_string();
        let status = parts.next().unwrap().to_string();
        let detail = parts.collect::<Vec<_>>().join(" ");
        map.insert(step, (status, detail));
    }
    map
}

const STEPS: [&str; 12] = [
    "os", "incus", "incusd", "storage", "network", "profile", "user", "config", "state", "binary",
    "unit", "start",
];

impl Drop for Fixture {
    fn drop(&mut self) {
        // A detached daemon first.
        if let Ok(pid) = std::fs::read_to_string(self.path("run/sandboxd.pid")) {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        let c = incus();
        let r = rt();
        let _ = r.block_on(c.delete_profile(&self.profile));
        if let Some(b) = &self.bridge {
            let _ = r.block_on(c.delete_network(b));
            let _ = r.block_on(c.delete_network_acl(&format!("sandboxd-egress-{b}")));
        }
        let _ = r.block_on(c.delete_storage_pool(&self.pool));
        let _ = Command::new("userdel").arg(&self.user).output();
        let _ = Command::new("groupdel").arg(&self.user).output();
    }
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().mode() & 0o7777
}

fn mtime(p: &Path) -> (i64, i64) {
    let m = std::fs::metadata(p).unwrap();
    (m.mtime(), m.mtime_nsec())
}

#[test]
fn setup_twice_creates_then_changes_nothing() {
    if !require(&[
        Component::Root,
        Component::Incus,
        Component::Program("systemd-analyze"),
    ]) {
        return;
    }
    let _serial = serial();
    let f = Fixture::new(&["--no-start", "--ssh-listen", "127.0.0.1:0"]);
    let first = f.ok(&[]);
    assert_eq!(
        first.keys().collect::<Vec<_>>().len(),
        STEPS.len(),
        "{first:?}"
    );
    for step in ["os", "incus", "incusd", "start"] {
        assert_eq!(first[step].0, "ok", "{step}: {first:?}");
    }
    // The running incusd is used, not restarted.
    assert!(first["incusd"].1.contains("answers on"), "{first:?}");
    for step in [
        "storage", "network", "profile", "user", "config", "state", "binary", "unit",
    ] {
        assert_eq!(first[step].0, "done", "{step}: {first:?}");
    }

    // What Incus now has.
    let c = incus();
    let r = rt();
    let pool = r.block_on(c.storage_pool(&f.pool)).unwrap().unwrap();
    assert_eq!(pool.driver, "dir");
    let net = r.block_on(c.network(f.bridge())).unwrap().unwrap();
    assert_eq!(net.kind, "bridge");
    assert_eq!(net.config["ipv4.nat"], "false");
    assert!(net.config["ipv4.address"].starts_with("198.19."));
    // The sandboxes' egress ACL is on the bridge; all else passes.
    assert_eq!(
        net.config["security.acls"],
        format!("sandboxd-egress-{}", f.bridge())
    );
    assert_eq!(net.config["security.acls.default.egress.action"], "allow");
    assert_eq!(net.config["security.acls.default.ingress.action"], "allow");
    let prof = r.block_on(c.profile(&f.profile)).unwrap().unwrap();
    assert_eq!(prof.devices["eth0"]["network"], f.bridge());
    assert_eq!(prof.devices["root"]["pool"], f.pool);
    assert_eq!(prof.devices["root"]["path"], "/");

    // The user, in the Incus socket's group.
    let user = nix::unistd::User::from_name(&f.user).unwrap().unwrap();
    let group = nix::unistd::Group::from_name("incus-admin")
        .unwrap()
        .unwrap();
    assert!(group.mem.contains(&f.user), "{:?}", group.mem);

    // Private config and state, owned by the daemon's user.
    let cfg = f.config();
    assert_eq!(mode(&cfg), 0o600);
    assert_eq!(mode(&f.path("etc")), 0o700);
    assert_eq!(mode(&f.path("state")), 0o700);
    for p in [&cfg, &f.path("etc"), &f.path("state")] {
        assert_eq!(std::fs::metadata(p).unwrap().uid(), user.uid.as_raw());
    }
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert!(text.contains("ssh_listen = [\"127.0.0.1:0\"]"), "{text}");
    assert!(
        text.contains("https_listen = [\"0.0.0.0:443\", \"[::]:443\"]"),
        "{text}"
    );
    // The daemon accepts the file it was given.
    let check = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&cfg)
        .arg("--help")
        .output()
        .unwrap();
    assert!(check.status.success());

    // Binary and unit.
    let bin = f.path("usr/bin/sandboxd");
    assert_eq!(std::fs::read(&bin).unwrap(), std::fs::read(BIN).unwrap());
    assert_eq!(mode(&bin), 0o755);
    let unit = f.path("units/sandboxd.service");
    let unit_text = std::fs::read_to_string(&unit).unwrap();
    assert!(unit_text.contains(&format!(
        "ExecStart={} serve --config {}",
        bin.display(),
        cfg.display()
    )));
    assert!(unit_text.contains(&format!("\nUser={}\n", f.user)));
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .unwrap();
    assert!(
        verify.status.success() && verify.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );

    let before: Vec<_> = [&cfg, &bin, &unit].iter().map(|p| mtime(p)).collect();
    let second = f.ok(&[]);
    for step in STEPS {
        assert_eq!(second[step].0, "ok", "{step}: {second:?}");
    }
    assert!(second["storage"].1.contains("driver dir"), "{second:?}");
    let after: Vec<_> = [&cfg, &bin, &unit].iter().map(|p| mtime(p)).collect();
    assert_eq!(before, after, "second run rewrote files");
    assert_eq!(std::fs::read_to_string(&cfg).unwrap(), text);

    // A config made world-readable is put right, and says so.
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o644)).unwrap();
    let third = f.ok(&[]);
    assert_eq!(third["config"].0, "done", "{third:?}");
    assert_eq!(mode(&cfg), 0o600);
}

#[test]
fn a_bad_flag_is_one_line_and_changes_nothing() {
    if !require(&[Component::Root, Component::Incus]) {
        return;
    }
    let _serial = serial();
    let f = Fixture::new(&["--no-start"]);
    for bad in [
        &["--storage", "ext4"][..],
        &["--incus-source", "ppa"][..],
        &["--ssh-listen", "nowhere"][..],
    ] {
        let out = f.run(bad);
        assert!(!out.status.success(), "{bad:?} accepted");
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.trim_end().lines().count(), 1, "{bad:?}: {err:?}");
        assert!(err.contains(bad[0]), "{bad:?}: {err}");
        assert!(out.stdout.is_empty(), "{bad:?} ran steps");
    }
    assert!(!f.path("etc").exists());
    let c = incus();
    assert!(rt().block_on(c.storage_pool(&f.pool)).unwrap().is_none());
    assert!(nix::unistd::User::from_name(&f.user).unwrap().is_none());
}

#[test]
fn zfs_without_its_tools_fails_at_the_storage_step() {
    if !require(&[Component::Root, Component::Incus]) {
        return;
    }
    let _serial = serial();
    let has_zfs = ["/usr/sbin/zfs", "/sbin/zfs", "/usr/bin/zfs"]
        .iter()
        .any(|p| Path::new(p).exists());
    let f = Fixture::new(&["--no-start", "--storage", "zfs", "--storage-size", "1GiB"]);
    let out = f.run(&[]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let s = steps(&stdout);
    if has_zfs {
        assert!(out.status.success(), "{stdout}");
        assert_eq!(s["storage"].0, "done");
    } else {
        assert_eq!(out.status.code(), Some(1), "{stdout}");
        assert_eq!(s["storage"].0, "FAILED", "{stdout}");
        assert!(s["storage"].1.contains("zfs tools"), "{stdout}");
        // Nothing after the failed step ran.
        assert!(!s.contains_key("network"), "{stdout}");
        assert!(!f.path("etc").exists());
        let c = incus();
        assert!(rt().block_on(c.storage_pool(&f.pool)).unwrap().is_none());
    }
}

#[test]
fn btrfs_loop_pool_is_made_once() {
    if !require(&[Component::Root, Component::Incus]) {
        return;
    }
    let _serial = serial();
    let mut f = Fixture::new(&["--no-start", "--storage", "btrfs", "--storage-size", "1GiB"]);
    // The existing test bridge is found and left alone.
    f.bridge = None;
    let first = f.ok(&[]);
    assert_eq!(first["storage"].0, "done", "{first:?}");
    assert!(first["storage"].1.contains("btrfs"), "{first:?}");
    assert_eq!(first["network"].0, "ok", "{first:?}");
    let c = incus();
    let pool = rt().block_on(c.storage_pool(&f.pool)).unwrap().unwrap();
    assert_eq!(pool.driver, "btrfs");
    assert_eq!(pool.config["size"], "1GiB");
    let second = f.ok(&[]);
    assert_eq!(second["storage"].0, "ok");
    assert!(second["storage"].1.contains("driver btrfs"), "{second:?}");
}

/// A free port below 1024 on 127.0.0.1 (we are root; the daemon will not be).
fn free_low_port() -> u16 {
    (900..1020)
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .expect("no free port in 900..1020")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn without_systemd_the_daemon_starts_detached_as_its_user() {
    if !require(&[Component::Root, Component::Incus]) {
        return;
    }
    let _serial = serial();
    let ssh = free_low_port();
    let f = Fixture::new(&[
        "--ssh-listen",
        &format!("127.0.0.1:{ssh}"),
        "--https-listen",
        &format!("127.0.0.1:{}", free_port()),
        "--http-listen",
        &format!("127.0.0.1:{}", free_port()),
    ]);
    let first = f.ok(&[]);
    assert_eq!(first["start"].0, "done", "{first:?}");
    assert!(first["start"].1.contains("systemd not found"), "{first:?}");
    let pid: i32 = std::fs::read_to_string(f.path("run/sandboxd.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();

    // Ready means the SSH router answers, on a port below 1024, although
    // the daemon is not root: it holds CAP_NET_BIND_SERVICE and nothing else.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", ssh)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut banner = [0u8; 8];
    std::io::Read::read_exact(&mut s, &mut banner).unwrap();
    assert_eq!(&banner, b"SSH-2.0-");
    // Started from /, not from the directory setup ran in.
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap(),
        std::path::PathBuf::from("/")
    );
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    let user = nix::unistd::User::from_name(&f.user).unwrap().unwrap();
    assert_eq!(field("Uid:"), user.uid.as_raw().to_string());
    // CAP_NET_BIND_SERVICE is bit 10.
    assert_eq!(field("CapEff:"), "0000000000000400");
    assert_eq!(field("CapAmb:"), "0000000000000400");
    // The admin socket and the state are private to it.
    assert_eq!(mode(&f.path("run/admin.sock")) & 0o077, 0);

    // Running again finds it and leaves it running.
    let second = f.ok(&[]);
    for step in STEPS {
        assert_eq!(second[step].0, "ok", "{step}: {second:?}");
    }
    assert!(
        second["start"].1.contains(&format!("pid {pid}")),
        "{second:?}"
    );

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while Path::new(&format!("/proc/{pid}")).exists() {
        // Reap if it is our grandchild's zombie: it is not ours, so wait
        // for init to reap it, bounded.
        let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        if st.contains("State:\tZ") {
            break;
        }
        assert!(Instant::now() < deadline, "daemon did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}
