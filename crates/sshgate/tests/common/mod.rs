//! Test harness: a real OpenSSH sshd upstream on loopback (the shared
//! `testsupport::sshd`), the gateway
//! in-process on 127.0.0.1:0 (own runtime on a background thread) with an
//! in-memory route table, and helpers that drive the system ssh, scp, sftp
//! and rsync against it. Every harness has its own temp dir and ports, so
//! tests run in parallel.
#![allow(dead_code, unused_imports, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use russh::keys::{Algorithm, PrivateKey, PublicKey};
use sshgate::{BanPolicy, Gateway, GatewayConfig, Route, RouteSource, Target};

/// Routes the tests can edit while the gateway runs.
#[derive(Default)]
pub struct MemRoutes(Mutex<HashMap<String, Arc<Route>>>);

impl MemRoutes {
    pub fn set(&self, route: Route) {
        self.0
            .lock()
            .unwrap()
            .insert(route.sandbox.clone(), Arc::new(route));
    }
    pub fn remove(&self, name: &str) {
        self.0.lock().unwrap().remove(name);
    }
    pub fn get(&self, name: &str) -> Route {
        (*self.0.lock().unwrap()[name]).clone()
    }
}

impl RouteSource for MemRoutes {
    fn lookup(&self, user: &str) -> Option<Arc<Route>> {
        self.0.lock().unwrap().get(user).cloned()
    }
}

pub use testsupport::sshd::Sshd;
pub use testsupport::{free_port, ssh_key as keygen};

pub fn read_pub(path: &Path) -> PublicKey {
    let text = std::fs::read_to_string(path.with_extension("pub")).unwrap();
    PublicKey::from_openssh(text.trim()).unwrap()
}

/// Builder for a [`Harness`].
pub struct HarnessBuilder {
    config: GatewayConfig,
    sandbox: String,
    client_keys: usize,
    target: Option<Target>,
    pin: Pin,
    host_key_dir: bool,
    ipv6: bool,
    sshd_extra: String,
}

enum Pin {
    Sshd,
    None,
    Wrong,
}

impl HarnessBuilder {
    pub fn banner(mut self, text: &str) -> Self {
        self.config.banner = Some(text.to_owned());
        self
    }
    pub fn ban(mut self, max_failures: u32, ban_duration: Duration) -> Self {
        self.config.ban = BanPolicy {
            max_failures,
            window: Duration::from_secs(600),
            ban_duration,
            ignore: vec![],
        };
        self
    }
    pub fn login_grace(mut self, d: Duration) -> Self {
        self.config.login_grace = d;
        self
    }
    pub fn config(mut self, f: impl FnOnce(&mut GatewayConfig)) -> Self {
        f(&mut self.config);
        self
    }
    /// Number of client keys made; the route authorizes only the first.
    pub fn client_keys(mut self, n: usize) -> Self {
        self.client_keys = n.max(1);
        self
    }
    pub fn target(mut self, t: Target) -> Self {
        self.target = Some(t);
        self
    }
    /// Use `load_or_generate_host_keys` (ed25519 + RSA) instead of one
    /// in-memory ed25519 key.
    pub fn host_keys_from_dir(mut self) -> Self {
        self.host_key_dir = true;
        self
    }
    /// Extra upstream sshd config lines (they override the defaults).
    pub fn sshd_config(mut self, lines: &str) -> Self {
        self.sshd_extra.push_str(lines);
        self
    }
    /// Serve a second listener on [::1]:0 with the same gateway.
    pub fn ipv6(mut self) -> Self {
        self.ipv6 = true;
        self
    }
    pub fn no_pinned_host_key(mut self) -> Self {
        self.pin = Pin::None;
        self
    }
    pub fn wrong_pinned_host_key(mut self) -> Self {
        self.pin = Pin::Wrong;
        self
    }

    pub fn start(self) -> Harness {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "sshgate=info".into()),
            )
            .with_test_writer()
            .try_init();
        let dir = tempfile::tempdir().unwrap();
        let keys: Vec<PathBuf> = (0..self.client_keys)
            .map(|i| keygen(dir.path(), &format!("client{i}")))
            .collect();
        let upstream_key = PrivateKey::random(&mut rand_ssh::rng(), Algorithm::Ed25519).unwrap();
        let direct_key = keygen(dir.path(), "direct");
        let authorized = vec![
            upstream_key.public_key().to_openssh().unwrap(),
            read_pub(&direct_key).to_openssh().unwrap(),
        ];
        let sshd = Sshd::start_with(dir.path(), "upstream", &authorized, &self.sshd_extra);
        let sshd_host_key = read_pub(&sshd.host_key_file);
        let pinned = match self.pin {
            Pin::Sshd => Some(sshd_host_key.clone()),
            Pin::None => None,
            Pin::Wrong => Some(
                PrivateKey::random(&mut rand_ssh::rng(), Algorithm::Ed25519)
                    .unwrap()
                    .public_key()
                    .clone(),
            ),
        };
        let user = whoami();
        let routes = Arc::new(MemRoutes::default());
        routes.set(Route {
            sandbox: self.sandbox.clone(),
            target: self.target.clone().unwrap_or(Target::Addr {
                host: "127.0.0.1".into(),
                port: sshd.port,
            }),
            user,
            authorized_keys: vec![read_pub(&keys[0])],
            upstream_key: Arc::new(upstream_key),
            upstream_host_key: pinned,
        });
        let host_keys = if self.host_key_dir {
            sshgate::load_or_generate_host_keys(&dir.path().join("hostkeys")).unwrap()
        } else {
            vec![PrivateKey::random(&mut rand_ssh::rng(), Algorithm::Ed25519).unwrap()]
        };
        let mut config = self.config;
        config.host_keys = host_keys.clone();
        let gateway = Gateway::new(config, routes.clone()).unwrap();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (addr6_tx, addr6_rx) = std::sync::mpsc::channel();
        let ipv6 = self.ipv6;
        let gw = gateway.clone();
        let runtime = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                if ipv6 {
                    let l6 = tokio::net::TcpListener::bind("[::1]:0").await.unwrap();
                    addr6_tx.send(l6.local_addr().unwrap()).unwrap();
                    let g6 = gw.clone();
                    tokio::spawn(async move { g6.serve(l6).await });
                }
                gw.serve(listener).await.unwrap();
            });
            // Give open sessions' tasks no further time: the runtime drops here.
        });
        let addr: SocketAddr = addr_rx.recv().unwrap();
        let addr6: Option<SocketAddr> = if self.ipv6 {
            Some(addr6_rx.recv().unwrap())
        } else {
            None
        };
        let known_hosts = dir.path().join("known_hosts");
        let mut kh = format!(
            "[127.0.0.1]:{} {}\n",
            sshd.port,
            sshd_host_key.to_openssh().unwrap()
        );
        for k in &host_keys {
            kh.push_str(&format!(
                "[127.0.0.1]:{} {}\n",
                addr.port(),
                k.public_key().to_openssh().unwrap()
            ));
            if let Some(a6) = addr6 {
                kh.push_str(&format!(
                    "[::1]:{} {}\n",
                    a6.port(),
                    k.public_key().to_openssh().unwrap()
                ));
            }
        }
        std::fs::write(&known_hosts, kh).unwrap();
        Harness {
            addr,
            addr6,
            gateway,
            routes,
            sandbox: self.sandbox,
            keys,
            direct_key,
            known_hosts,
            sshd,
            dir,
            runtime: Some(runtime),
        }
    }
}

pub struct Harness {
    pub addr: SocketAddr,
    /// The [::1] listener, when built with `ipv6()`.
    pub addr6: Option<SocketAddr>,
    pub gateway: Gateway,
    pub routes: Arc<MemRoutes>,
    pub sandbox: String,
    /// Client keys; `keys[0]` is authorized.
    pub keys: Vec<PathBuf>,
    /// A key sshd accepts directly (for comparisons).
    pub direct_key: PathBuf,
    pub known_hosts: PathBuf,
    pub sshd: Sshd,
    pub dir: tempfile::TempDir,
    runtime: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.gateway.shutdown();
        if let Some(t) = self.runtime.take() {
            let _ = t.join();
        }
    }
}

pub fn whoami() -> String {
    let out = Command::new("id").arg("-un").output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

pub fn harness() -> HarnessBuilder {
    let config = GatewayConfig {
        auth_rejection_time: Duration::from_millis(50),
        // Generous for loaded CI machines; the timeout tests set their own.
        connect_timeout: Duration::from_secs(30),
        ..GatewayConfig::default()
    };
    HarnessBuilder {
        config,
        sandbox: "app-example-com".into(),
        client_keys: 1,
        target: None,
        pin: Pin::Sshd,
        host_key_dir: false,
        ipv6: false,
        sshd_extra: String::new(),
    }
}

impl Harness {
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Common OpenSSH options for the gateway (no user config, strict host
    /// key checking against our known_hosts, batch mode).
    pub fn ssh_opts(&self) -> Vec<String> {
        vec![
            "-F".into(),
            "/dev/null".into(),
            "-o".into(),
            format!("UserKnownHostsFile={}", self.known_hosts.display()),
            "-o".into(),
            "StrictHostKeyChecking=yes".into(),
            "-o".into(),
            "BatchMode=yes".into(),
            "-o".into(),
            "ConnectTimeout=20".into(),
        ]
    }

    fn key_opts(&self, key: &Path) -> Vec<String> {
        vec![
            "-i".into(),
            key.display().to_string(),
            "-o".into(),
            "IdentitiesOnly=yes".into(),
            "-o".into(),
            "IdentityAgent=none".into(),
        ]
    }

    /// `ssh -p PORT -i keys[0] SANDBOX@127.0.0.1` without a command.
    pub fn ssh(&self) -> Command {
        self.ssh_as(&self.sandbox.clone(), &self.keys[0].clone())
    }

    pub fn ssh_as(&self, user: &str, key: &Path) -> Command {
        let mut c = Command::new("ssh");
        c.args(self.ssh_opts())
            .args(self.key_opts(key))
            .arg("-p")
            .arg(self.addr.port().to_string())
            .arg(format!("{user}@127.0.0.1"));
        c
    }

    /// ssh straight to the upstream sshd (no gateway), for comparisons.
    pub fn ssh_direct(&self) -> Command {
        let mut c = Command::new("ssh");
        c.args(self.ssh_opts())
            .args(self.key_opts(&self.direct_key))
            .arg("-p")
            .arg(self.sshd.port.to_string())
            .arg(format!("{}@127.0.0.1", whoami()));
        c
    }

    /// The `-e` argument for rsync, and options for scp/sftp.
    pub fn rsh(&self) -> String {
        let mut parts = vec!["ssh".to_owned()];
        parts.extend(self.ssh_opts());
        parts.extend(self.key_opts(&self.keys[0]));
        parts.push("-p".into());
        parts.push(self.addr.port().to_string());
        parts.join(" ")
    }

    pub fn scp(&self) -> Command {
        let mut c = Command::new("scp");
        c.args(self.ssh_opts())
            .args(self.key_opts(&self.keys[0]))
            .arg("-P")
            .arg(self.addr.port().to_string());
        c
    }

    pub fn sftp(&self) -> Command {
        let mut c = Command::new("sftp");
        c.args(self.ssh_opts())
            .args(self.key_opts(&self.keys[0]))
            .arg("-P")
            .arg(self.addr.port().to_string());
        c
    }

    pub fn dest(&self, path: &Path) -> String {
        format!("{}@127.0.0.1:{}", self.sandbox, path.display())
    }

    /// Wait until the gateway lists `n` sessions.
    pub fn wait_sessions(&self, n: usize) -> Vec<sshgate::SessionInfo> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let s = self.gateway.sessions();
            if s.len() == n {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "expected {n} sessions, have {}",
                s.len()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A quick end-to-end check that the gateway still serves logins.
    pub fn assert_serves(&self) {
        let out = self.ssh().arg("echo alive").output().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "alive\n",
            "stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

pub fn run(c: &mut Command) -> Output {
    c.stdin(Stdio::null()).output().unwrap()
}

/// A TCP echo service on loopback (one thread per connection).
pub fn echo_server() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut r = s.try_clone().unwrap();
                let mut w = s;
                let _ = std::io::copy(&mut r, &mut w);
            });
        }
    });
    port
}

/// A tiny HTTP service on loopback that answers every request with `body`.
pub fn http_server(body: &'static str) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut reader = BufReader::new(s.try_clone().unwrap());
                let mut line = String::new();
                while reader.read_line(&mut line).unwrap_or(0) > 0 {
                    if line == "\r\n" || line == "\n" {
                        break;
                    }
                    line.clear();
                }
                let mut s = s;
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
                    body.len(),
                    body
                );
            });
        }
    });
    port
}

/// Poll `f` until it returns Some or the deadline passes.
pub fn eventually<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "condition not met within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Connect to a local forward until it accepts (the ssh client binds it
/// after login).
pub fn connect_when_ready(port: u16) -> TcpStream {
    eventually(Duration::from_secs(20), || {
        TcpStream::connect(("127.0.0.1", port)).ok()
    })
}

/// Write a file of `len` pseudo-random bytes.
pub fn random_file(path: &Path, len: usize) {
    use rand::RngCore;
    let mut rng = rand::thread_rng();
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len());
        rng.fill_bytes(&mut buf[..n]);
        f.write_all(&buf[..n]).unwrap();
        left -= n;
    }
    f.flush().unwrap();
}

pub fn same_file(a: &Path, b: &Path) -> bool {
    std::fs::read(a).unwrap() == std::fs::read(b).unwrap()
}
