//! Test support shared by every crate of the workspace (a dev-dependency
//! only, `publish = false`): the daemon harness that runs the real
//! `sandboxd` binary ([`daemon`]), a real OpenSSH sshd ([`sshd`]), Pebble
//! ([`pebble`]), test certificates made with openssl ([`pki`]) and helpers
//! for the real incusd ([`incus`]).
//!
//! Tests that need a system component (root, incusd, sshd, Pebble,
//! Chromium, ...) start with [`require`]: where the component is absent it
//! prints `skipped: <test>: <why>` and the test returns early, unless
//! `SANDBOXD_SYSTEM_TESTS=require` (set by `tests/run.sh`, hence in CI),
//! where an absent component fails the test with the same reason.
//!
//! This crate must not depend on `sandboxd` (the binary's path comes from
//! the caller: `env!("CARGO_BIN_EXE_sandboxd")`) nor on `store`, `sshgate`
//! or `httpgate`, whose tests use it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod daemon;
pub mod incus;
pub mod pebble;
pub mod pki;
pub mod sshd;
pub mod ws;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

pub use daemon::{Daemon, DaemonBuilder};

/// A system component some tests need.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Component {
    /// Running as root (effective UID 0).
    Root,
    /// incusd answering on its unix socket, with the test image
    /// (`.ci/setup-incus.sh`).
    Incus,
    /// OpenSSH: `/usr/sbin/sshd` and the client tools (`ssh`, `ssh-keygen`, ...).
    Sshd,
    /// `pebble` and `pebble-challtestsrv` (`.ci/setup-httpgate.sh`).
    Pebble,
    /// `chromium`, run headless (`.ci/setup-browser.sh`).
    Chromium,
    /// The host's package cache the provisioning tests install through
    /// (`SANDBOXD_TEST_APT_PROXY`, default `http://198.18.0.1:3142`;
    /// `.ci/setup-provision.sh`).
    PackageCache,
    /// `/usr/bin/python3` with the `websockets` module (python3-websockets),
    /// which the websocket peers of [`ws`] run on.
    PyWebsockets,
    /// `/usr/bin/python3` that can import the named module (a Debian
    /// `python3-*` package: `paramiko`, `asyncssh`, ...).
    PyModule(&'static str),
    /// Any other program that must be on `PATH` (`curl`, `openssl`, `wrk`, ...).
    Program(&'static str),
}

/// The environment variable that turns skips into failures.
pub const SYSTEM_TESTS_VAR: &str = "SANDBOXD_SYSTEM_TESTS";

/// Whether a test that needs `what` can go on. If every component is
/// present: true. If not: prints `skipped: <test>: <why>` to stderr and
/// returns false, or, with `SANDBOXD_SYSTEM_TESTS=require`, panics with
/// that reason (so that a skip in CI fails).
///
/// ```text
/// if !testsupport::require(&[Component::Incus, Component::Root]) { return; }
/// ```
pub fn require(what: &[Component]) -> bool {
    let missing: Vec<String> = what.iter().filter_map(|c| absent_cached(*c)).collect();
    if missing.is_empty() {
        return true;
    }
    let why = missing.join("; ");
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("this test");
    if std::env::var(SYSTEM_TESTS_VAR).as_deref() == Ok("require") {
        panic!("{test}: {why} (and {SYSTEM_TESTS_VAR}=require)");
    }
    // Straight to the process's stderr: libtest captures `eprintln!` of
    // passing tests, and a skip must be seen.
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "skipped: {test}: {why}");
    false
}

/// [`absent`], asked once per component and process: a test binary asks
/// for the same components in many tests, and some checks talk to incusd
/// or start python3.
fn absent_cached(c: Component) -> Option<String> {
    static SEEN: OnceLock<Mutex<HashMap<Component, Option<String>>>> = OnceLock::new();
    let seen = SEEN.get_or_init(Default::default);
    if let Some(known) = seen.lock().unwrap_or_else(|p| p.into_inner()).get(&c) {
        return known.clone();
    }
    // Checked without the lock held (the Incus check may take a while);
    // two tests asking at once both check, and agree.
    let why = absent(c);
    seen.lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(c, why.clone());
    why
}

/// Why `c` is absent, or `None` if it is there.
fn absent(c: Component) -> Option<String> {
    match c {
        Component::Root => {
            (!nix::unistd::geteuid().is_root()).then(|| "needs root (effective UID 0)".to_string())
        }
        Component::Incus => {
            let sockets = incus_sockets();
            let mut errors = Vec::new();
            for socket in &sockets {
                // The probe connection is closed before incusd is asked.
                let probe = std::os::unix::net::UnixStream::connect(socket);
                match probe {
                    Ok(stream) => {
                        drop(stream);
                        return incus_image_missing(socket.clone());
                    }
                    Err(e) => errors.push(format!("{}: {e}", socket.display())),
                }
            }
            Some(format!(
                "needs incusd on its unix socket ({}); run .ci/setup-incus.sh as root",
                errors.join(", ")
            ))
        }
        Component::Sshd => {
            if !is_executable(Path::new("/usr/sbin/sshd")) {
                return Some("needs OpenSSH's /usr/sbin/sshd (openssh-server)".into());
            }
            if !Path::new("/run/sshd").is_dir() && !nix::unistd::geteuid().is_root() {
                return Some("needs sshd's privilege separation directory /run/sshd".into());
            }
            missing_programs(&["ssh", "ssh-keygen"])
        }
        Component::Pebble => missing_programs(&["pebble", "pebble-challtestsrv"])
            .map(|m| format!("{m} (run .ci/setup-httpgate.sh)")),
        Component::Chromium => missing_programs(&["chromium"])
            .map(|m| format!("{m}, headless (run .ci/setup-browser.sh)")),
        Component::PackageCache => {
            let url = std::env::var("SANDBOXD_TEST_APT_PROXY")
                .unwrap_or_else(|_| "http://198.18.0.1:3142".into());
            let addr = url
                .trim_start_matches("http://")
                .trim_end_matches('/')
                .to_string();
            let reachable = std::net::ToSocketAddrs::to_socket_addrs(&addr.as_str())
                .ok()
                .and_then(|mut a| a.next())
                .is_some_and(|a| {
                    std::net::TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok()
                });
            (!reachable)
                .then(|| format!("needs the package cache at {url} (run .ci/setup-provision.sh)"))
        }
        Component::PyWebsockets => (!python_imports("websockets")).then(|| {
            "needs /usr/bin/python3 with the websockets module (python3-websockets)".into()
        }),
        Component::PyModule(m) => (!python_imports(m)).then(|| {
            format!("needs /usr/bin/python3 with the {m} module (python3-{m}; run .ci/setup-sshgate.sh)")
        }),
        Component::Program(p) => missing_programs(&[p]),
    }
}

/// Whether `/usr/bin/python3` can import `module`.
fn python_imports(module: &str) -> bool {
    Command::new("/usr/bin/python3")
        .args(["-c", &format!("import {module}")])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Why the test image is not in incusd, or `None` if it is. Asked on a
/// thread of its own: the caller may be on an async runtime.
fn incus_image_missing(socket: PathBuf) -> Option<String> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ok()?;
        rt.block_on(async {
            let client = match incusctl::Client::connect(Some(socket)).await {
                Ok(c) => c,
                Err(e) => return Some(format!("needs incusd ({e})")),
            };
            match client.image_alias(incus::TEST_IMAGE).await {
                Ok(_) => None,
                Err(e) => Some(format!(
                    "needs the image {} in incusd ({e}); run .ci/setup-incus.sh as root",
                    incus::TEST_IMAGE
                )),
            }
        })
    })
    .join()
    .unwrap_or_else(|_| Some("the incusd check panicked".into()))
}

/// The sockets incusd may answer on: the ones the daemon's client and the
/// Incus helpers try ([`incusctl::DEFAULT_SOCKETS`]), in order.
fn incus_sockets() -> Vec<PathBuf> {
    incusctl::DEFAULT_SOCKETS
        .iter()
        .map(PathBuf::from)
        .collect()
}

fn missing_programs(programs: &[&str]) -> Option<String> {
    let missing: Vec<&str> = programs
        .iter()
        .copied()
        .filter(|p| on_path(p).is_none())
        .collect();
    (!missing.is_empty()).then(|| format!("needs {} on PATH", missing.join(", ")))
}

/// The file `program` names on `PATH`, if any.
pub fn on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A child process, killed (by its own PID) on drop.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A port that was free on 127.0.0.1 a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits (at most 20 s) until something accepts on 127.0.0.1:`port`.
pub fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "port {port} never opened");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An ed25519 key pair made with the real ssh-keygen as `DIR/NAME` (kept if
/// it exists); returns the private key's path (the public one is `.pub`).
pub fn ssh_key(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    if !path.exists() {
        let st = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
            .arg(&path)
            .status()
            .unwrap();
        assert!(st.success(), "ssh-keygen failed");
    }
    path
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_absent_program_is_named_and_the_answer_is_kept() {
        let c = Component::Program("sandboxd-no-such-program");
        let why = absent_cached(c).expect("absent");
        assert_eq!(why, "needs sandboxd-no-such-program on PATH");
        assert_eq!(absent_cached(c), Some(why), "same answer from the cache");
        assert_eq!(absent_cached(Component::Program("sh")), None);
    }
}
