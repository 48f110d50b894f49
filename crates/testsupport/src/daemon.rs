//! The daemon harness: runs the real `sandboxd` binary as a daemon on
//! temporary directories and a temporary admin socket, with every listener
//! on 127.0.0.1:0, and drives it through the real CLI. The binary's path
//! comes from the caller (`env!("CARGO_BIN_EXE_sandboxd")`), since this
//! crate cannot depend on the binary.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A running daemon and its files.
pub struct Daemon {
    /// The `sandboxd` binary this daemon and its CLI calls run.
    pub bin: PathBuf,
    pub dir: tempfile::TempDir,
    pub state: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    extra_args: Vec<String>,
    child: Option<Child>,
}

/// Builder for [`Daemon`].
pub struct DaemonBuilder {
    bin: PathBuf,
    config: Option<String>,
    args: Vec<String>,
}

impl DaemonBuilder {
    /// A TOML config file written for this daemon.
    pub fn config(mut self, text: &str) -> Self {
        self.config = Some(text.to_string());
        self
    }

    pub fn arg(mut self, a: &str) -> Self {
        self.args.push(a.to_string());
        self
    }

    pub fn args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    pub fn start(self) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let mut extra_args = self.args;
        if let Some(text) = self.config {
            let path = dir.path().join("sandboxd.toml");
            std::fs::write(&path, text).unwrap();
            extra_args.push("--config".into());
            extra_args.push(path.display().to_string());
        }
        let mut d = Daemon {
            bin: self.bin,
            state: dir.path().join("state"),
            socket: dir.path().join("run/admin.sock"),
            log: dir.path().join("daemon.log"),
            dir,
            extra_args,
            child: None,
        };
        d.spawn();
        d
    }
}

impl Daemon {
    /// A daemon of the binary `bin`, to configure.
    pub fn builder(bin: impl AsRef<Path>) -> DaemonBuilder {
        DaemonBuilder {
            bin: bin.as_ref().to_path_buf(),
            config: None,
            args: Vec::new(),
        }
    }

    /// A daemon of the binary `bin` with the defaults, started.
    pub fn start(bin: impl AsRef<Path>) -> Daemon {
        Self::builder(bin).start()
    }

    /// The `serve` command line this daemon runs with.
    pub fn serve_command(&self) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("serve")
            .arg("--state-dir")
            .arg(&self.state)
            .arg("--admin-socket")
            .arg(&self.socket)
            .args(["--ssh-listen", "127.0.0.1:0"])
            .args(["--https-listen", "127.0.0.1:0"])
            .args(["--http-listen", "127.0.0.1:0"])
            .args(&self.extra_args)
            .env("RUST_LOG", "info");
        cmd
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = self
            .serve_command()
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        self.wait_ready();
    }

    /// Waits until `status` answers (bounded), failing with the log.
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("daemon exited early ({status}):\n{}", self.log_text());
            }
            if self.socket.exists() && self.cli(&["status", "--json"]).status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "daemon not ready:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// SIGKILL, no cleanup: the crash case.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// SIGTERM and wait for a clean exit; returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("daemon running");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        c.wait().unwrap()
    }

    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop the daemon first");
        self.spawn();
    }

    /// Runs the CLI against this daemon.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_with_stdin(args, b"")
    }

    pub fn cli_with_stdin(&self, args: &[&str], stdin: &[u8]) -> Output {
        run_with_stdin(
            Command::new(&self.bin)
                .arg("--admin-socket")
                .arg(&self.socket)
                .args(args),
            stdin,
        )
    }

    /// Runs the CLI and requires success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "sandboxd {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_text()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs the CLI, requires failure, returns stderr (one line).
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            !out.status.success(),
            "sandboxd {args:?} succeeded unexpectedly"
        );
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err:?}");
        err
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        serde_json::from_str(&self.ok(args)).unwrap()
    }

    /// The port of the first address of `status --json`'s `key`
    /// (`https_listen`, `http_listen`, `ssh_listen`).
    pub fn listen_port(&self, key: &str) -> u16 {
        let st = self.json(&["status", "--json"]);
        let addr = st[key][0]
            .as_str()
            .unwrap_or_else(|| panic!("{key} in {st}"));
        addr.rsplit_once(':').unwrap().1.parse().unwrap()
    }

    /// The `certs --json` entry of `domain`, if it has one.
    pub fn cert_entry(&self, domain: &str) -> Option<serde_json::Value> {
        self.json(&["certs", "--json"])
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["domain"] == domain)
            .cloned()
    }

    /// The SSH gate's port, and a known_hosts file for `[127.0.0.1]:PORT`
    /// made from `sandboxd host-key`, so clients check the gateway strictly.
    pub fn gateway_known_hosts(&self) -> (String, PathBuf) {
        let st = self.json(&["status", "--json"]);
        let addr = st["ssh_listen"][0].as_str().unwrap().to_string();
        let port = addr.rsplit_once(':').unwrap().1.to_string();
        let path = self.dir.path().join("gateway_known_hosts");
        let mut kh = String::new();
        for line in self.ok(&["host-key"]).lines() {
            let mut parts = line.split_whitespace();
            let (alg, b64) = (parts.next().unwrap(), parts.next().unwrap());
            kh.push_str(&format!("[127.0.0.1]:{port} {alg} {b64}\n"));
        }
        std::fs::write(&path, kh).unwrap();
        (port, path)
    }

    /// A fresh client key pair; returns the public key file.
    pub fn keygen(&self, name: &str) -> PathBuf {
        keygen(self.dir.path(), name)
    }

    /// `add` with defaults for a static upstream on loopback.
    pub fn add(&self, name: &str, domain: &str) -> String {
        self.add_with(name, domain, &[])
    }

    /// `add` with defaults for a static upstream on loopback, then `extra`.
    pub fn add_with(&self, name: &str, domain: &str, extra: &[&str]) -> String {
        let out = self.try_add(name, domain, extra);
        assert!(
            out.status.success(),
            "sandboxd add {name} {domain} {extra:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_text()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// The same `add`, whatever its outcome (for refusals).
    pub fn try_add(&self, name: &str, domain: &str, extra: &[&str]) -> Output {
        let key = self.keygen(&format!("key-{name}"));
        let mut args = vec![
            "add",
            name,
            "--domain",
            domain,
            "--upstream",
            "127.0.0.1",
            "--ssh-key",
            key.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        self.cli(&args)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// curl with `args` (URL last): (status code, body, stderr); status 0 if
/// curl got no answer.
pub fn curl(args: &[&str]) -> (u16, String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-o", "-", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (
        code.parse().unwrap_or(0),
        body.to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

pub fn run_with_stdin(cmd: &mut Command, stdin: &[u8]) -> Output {
    use std::io::Write;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    out
}

/// Generates an ed25519 key pair with the real ssh-keygen (kept if it
/// exists); returns the public key file.
pub fn keygen(dir: &Path, name: &str) -> PathBuf {
    let path = crate::ssh_key(dir, name);
    PathBuf::from(format!("{}.pub", path.display()))
}

/// Python's http.server on a free loopback port, serving `index.txt` with
/// `content` from `DIR/NAME` (an HTTP/1.0 app, like many real ones).
pub struct Upstream {
    pub port: u16,
    child: Child,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn python_upstream(dir: &Path, name: &str, content: &str) -> Upstream {
    let root = dir.join(name);
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("index.txt"), content).unwrap();
    let port = crate::free_port();
    let child = Command::new("python3")
        .args([
            "-m",
            "http.server",
            "--bind",
            "127.0.0.1",
            &port.to_string(),
        ])
        .current_dir(&root)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "upstream did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Upstream { port, child }
}
