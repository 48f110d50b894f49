//! SSH client conformance of the router: the clients users come with —
//! OpenSSH ssh/scp/sftp, PuTTY's plink and pscp, dropbear's dbclient,
//! paramiko and asyncssh (drivers in `tests/conformance/`) — run one
//! matrix of cases through the daemon's SSH router and straight to the same
//! sshd. The straight run (the control) must give the expected answers and
//! the router the same ones as the control, case by case: exit status and
//! separate stdout/stderr (repeated, for the exit-status-after-EOF race), a
//! command that closes its output before it exits, exit signals, stdin to
//! EOF, large sftp/scp transfers both ways, -L, -R (port 0 where the client
//! reports the allocated port), agent forwarding that signs, RSA
//! (rsa-sha2-256/512), ECDSA and ed25519 client keys, and a wrong host key
//! refused. Every client verifies the host key it is shown (known_hosts or
//! a pinned fingerprint, never accept-on-first-use).
//!
//! One daemon and one sshd per client; the control and the router legs of
//! a case run side by side; a test reports every differing case at once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use testsupport::{free_port, require, Component, Proc};

use common::sshd::Sshd;
use common::Daemon;

/// Size of the file sent and fetched by every transfer case.
const BIG_MIB: usize = 64;
/// MiB piped into `sha256sum` by the stdin case.
const STDIN_MIB: usize = 8;
/// The exec case, repeated this often per leg (process-per-run clients).
const CLI_REPS: usize = 24;
/// The same for the library clients (one connection, many channels).
const LIB_REPS: usize = 50;
/// Longest any single client run may take.
const LIMIT: Duration = Duration::from_secs(60);

const EXEC: &str = "echo out; echo err >&2; exit 7";
const CLOSE_THEN_EXIT: &str = "echo out; exec >&- 2>&-; sleep 1; exit 7";

/// One way to the sshd: through the router or straight (the control).
struct Target {
    label: &'static str,
    port: u16,
    user: String,
    /// OpenSSH known_hosts with this target's host keys, `[127.0.0.1]:PORT`.
    known_hosts: PathBuf,
    /// The same keys under a wrong (unrelated) key: must be refused.
    wrong_known_hosts: PathBuf,
    /// `SHA256:...` of each host key (plink's `-hostkey`).
    fingerprints: Vec<String>,
    /// A HOME whose `.ssh/known_hosts` holds the keys for dbclient (it
    /// matches on the host name alone, so each target has its own HOME).
    db_home: PathBuf,
    db_wrong_home: PathBuf,
}

#[derive(Clone, Copy, PartialEq)]
enum Key {
    Ed25519,
    Ecdsa,
    Rsa,
}

impl Key {
    fn name(self) -> &'static str {
        match self {
            Key::Ed25519 => "ed25519",
            Key::Ecdsa => "ecdsa",
            Key::Rsa => "rsa",
        }
    }
}

struct Fixture {
    d: Daemon,
    _sshd: Sshd,
    work: PathBuf,
    router: Target,
    direct: Target,
    echo: u16,
    big: PathBuf,
    big_sha: String,
    agent_sock: PathBuf,
    agent_pub: String,
    _agent: Proc,
}

fn sh(cmd: &mut Command) -> String {
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn sha256(path: &Path) -> String {
    sh(Command::new("sha256sum").arg(path))
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

fn keygen(dir: &Path, name: &str, args: &[&str]) -> PathBuf {
    let path = dir.join(name);
    sh(Command::new("ssh-keygen")
        .args(["-q", "-N", "", "-C", name])
        .args(args)
        .arg("-f")
        .arg(&path));
    path
}

/// A loopback echo server, on a thread for the rest of the test.
fn echo_server() -> u16 {
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

/// Sends 1 MiB to `port` and whether the same bytes came back.
fn echo_roundtrip(port: u16) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut s = loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(_) => return false,
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let payload: Vec<u8> = (0..1u32 << 20).map(|i| (i % 253) as u8).collect();
    let writer = {
        let mut w = s.try_clone().unwrap();
        let p = payload.clone();
        std::thread::spawn(move || w.write_all(&p).is_ok())
    };
    let mut got = vec![0u8; payload.len()];
    let ok = s.read_exact(&mut got).is_ok() && got == payload;
    writer.join().unwrap() && ok
}

impl Fixture {
    fn new(name: &str) -> Fixture {
        let d = Daemon::start(common::BIN);
        // The sessions' HOME is an empty directory, so that no dotfile of
        // the machine's root account (a shell init that rewrites files,
        // say) runs in, or writes to the stderr of, the commands under test.
        let work = d.dir.path().join("work");
        std::fs::create_dir_all(&work).unwrap();
        let sshd = Sshd::start_with(
            d.dir.path(),
            name,
            &[],
            &format!("SetEnv HOME={}\n", work.display()),
        );
        let keys = d.dir.path().join("keys");
        std::fs::create_dir_all(&keys).unwrap();
        let ed = keygen(&keys, "ed25519", &["-t", "ed25519"]);
        let ec = keygen(&keys, "ecdsa", &["-t", "ecdsa", "-b", "256"]);
        let rsa = keygen(&keys, "rsa", &["-t", "rsa", "-b", "3072"]);
        let pub_of = |p: &Path| PathBuf::from(format!("{}.pub", p.display()));
        d.ok(&[
            "add",
            name,
            "--domain",
            &format!("{name}.example.test"),
            "--upstream",
            "127.0.0.1",
            "--ssh-port",
            &sshd.port.to_string(),
            "--user",
            "root",
            "--ssh-key",
            pub_of(&ed).to_str().unwrap(),
            "--upstream-host-key",
            sshd.host_pub.to_str().unwrap(),
        ]);
        for k in [&ec, &rsa] {
            d.ok(&["key", "add", name, pub_of(k).to_str().unwrap()]);
        }
        let show = d.json(&["show", name, "--json"]);
        sshd.authorize(show["upstream_public_key"].as_str().unwrap());
        for k in [&ed, &ec, &rsa] {
            sshd.authorize(std::fs::read_to_string(pub_of(k)).unwrap().trim());
        }

        let wrong = keygen(&keys, "not-the-host", &["-t", "ed25519"]);
        let wrong_line = std::fs::read_to_string(pub_of(&wrong)).unwrap();
        let (gw_port, _) = d.gateway_known_hosts();
        let gw_lines: Vec<String> = d
            .ok(&["host-key"])
            .lines()
            .filter(|l| l.starts_with("ssh-") || l.starts_with("ecdsa-"))
            .map(|l| l.split_whitespace().take(2).collect::<Vec<_>>().join(" "))
            .collect();
        assert!(!gw_lines.is_empty(), "no host key from `sandboxd host-key`");
        let direct_lines = vec![sshd
            .host_pub_line()
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ")];
        let router = Target::new(
            d.dir.path(),
            "router",
            gw_port.parse().unwrap(),
            name,
            &gw_lines,
            &wrong_line,
        );
        let direct = Target::new(
            d.dir.path(),
            "direct",
            sshd.port,
            "root",
            &direct_lines,
            &wrong_line,
        );

        let big = work.join("big.bin");
        {
            let mut f = std::fs::File::create(&big).unwrap();
            let mut rnd = std::fs::File::open("/dev/urandom").unwrap();
            let mut buf = vec![0u8; 1 << 20];
            for _ in 0..BIG_MIB {
                rnd.read_exact(&mut buf).unwrap();
                f.write_all(&buf).unwrap();
            }
        }
        let big_sha = sha256(&big);

        // An agent holding a key nobody authorized: only a forwarded agent
        // can make signatures with it.
        let agent_sock = d.dir.path().join("agent.sock");
        let agent = Proc(
            Command::new("ssh-agent")
                .args(["-D", "-a"])
                .arg(&agent_sock)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while !agent_sock.exists() {
            assert!(Instant::now() < deadline, "ssh-agent did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        let agent_key = keygen(&keys, "agent-only", &["-t", "ed25519"]);
        sh(Command::new("ssh-add")
            .arg("-q")
            .arg(&agent_key)
            .env("SSH_AUTH_SOCK", &agent_sock));
        let agent_pub = std::fs::read_to_string(pub_of(&agent_key))
            .unwrap()
            .trim()
            .to_string();

        Fixture {
            d,
            _sshd: sshd,
            work,
            router,
            direct,
            echo: echo_server(),
            big,
            big_sha,
            agent_sock,
            agent_pub,
            _agent: agent,
        }
    }

    fn key(&self, k: Key) -> PathBuf {
        self.d.dir.path().join("keys").join(k.name())
    }

    /// The key converted by `convert` to `ext` (made once).
    fn key_as(&self, k: Key, ext: &str, convert: impl FnOnce(&Path, &Path)) -> PathBuf {
        let out = self.key(k).with_extension(ext);
        if !out.exists() {
            convert(&self.key(k), &out);
        }
        out
    }

    fn ppk(&self, k: Key) -> PathBuf {
        self.key_as(k, "ppk", |from, to| {
            sh(Command::new("puttygen")
                .arg(from)
                .args(["-O", "private", "-o"])
                .arg(to));
        })
    }

    fn dropbear_key(&self, k: Key) -> PathBuf {
        self.key_as(k, "dropbear", |from, to| {
            sh(Command::new("dropbearconvert")
                .args(["openssh", "dropbear"])
                .arg(from)
                .arg(to));
        })
    }

    /// A shell script for the far side: the forwarded agent's keys, then a
    /// signature made by the agent with the agent-only key.
    fn agent_script(&self) -> String {
        format!(
            "ssh-add -l | cut -d' ' -f2; t=$(mktemp); printf '%s\\n' '{}' > $t.pub; \
             echo conformance | ssh-keygen -Y sign -f $t.pub -n conformance 2>/dev/null; rm -f $t $t.pub",
            self.agent_pub
        )
    }

    /// The outcome of [`Fixture::agent_script`]'s output: the agent's keys
    /// and whether the signature verifies.
    fn agent_outcome(&self, status: &str, stdout: &str) -> String {
        let (keys, sig) = match stdout.find("-----BEGIN SSH SIGNATURE-----") {
            Some(i) => (&stdout[..i], &stdout[i..]),
            None => (stdout, ""),
        };
        let sig_file = self.work.join(format!("sig-{}", rand::random::<u64>()));
        std::fs::write(&sig_file, sig).unwrap();
        let mut check = Command::new("ssh-keygen")
            .args(["-Y", "check-novalidate", "-n", "conformance", "-s"])
            .arg(&sig_file)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        check
            .stdin
            .take()
            .unwrap()
            .write_all(b"conformance\n")
            .unwrap();
        let valid = check.wait().unwrap().success();
        let _ = std::fs::remove_file(&sig_file);
        let agent_fp = sh(Command::new("ssh-keygen")
            .arg("-lf")
            .arg(self.d.dir.path().join("keys/agent-only.pub")))
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_string();
        let keys = keys.trim().replace(&agent_fp, "AGENT-KEY");
        format!("{status} agent-keys=[{keys}] signature-valid={valid}")
    }
}

impl Target {
    fn new(
        dir: &Path,
        label: &'static str,
        port: u16,
        user: &str,
        lines: &[String],
        wrong_line: &str,
    ) -> Target {
        let wrong: String = wrong_line
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ");
        let known_hosts = dir.join(format!("known_hosts-{label}"));
        let wrong_known_hosts = dir.join(format!("known_hosts-{label}-wrong"));
        let kh = |l: &str| format!("[127.0.0.1]:{port} {l}\n");
        std::fs::write(
            &known_hosts,
            lines.iter().map(|l| kh(l)).collect::<String>(),
        )
        .unwrap();
        std::fs::write(&wrong_known_hosts, kh(&wrong)).unwrap();
        let db_home = dir.join(format!("home-{label}"));
        let db_wrong_home = dir.join(format!("home-{label}-wrong"));
        for (home, keys) in [(&db_home, lines.to_vec()), (&db_wrong_home, vec![wrong])] {
            std::fs::create_dir_all(home.join(".ssh")).unwrap();
            let text: String = keys.iter().map(|l| format!("127.0.0.1 {l}\n")).collect();
            std::fs::write(home.join(".ssh/known_hosts"), text).unwrap();
        }
        let fingerprints = lines
            .iter()
            .map(|l| {
                let f = dir.join(format!("hostkey-{label}.pub"));
                std::fs::write(&f, format!("{l}\n")).unwrap();
                sh(Command::new("ssh-keygen").arg("-lf").arg(&f))
                    .split_whitespace()
                    .nth(1)
                    .unwrap()
                    .to_string()
            })
            .collect();
        Target {
            label,
            port,
            user: user.to_string(),
            known_hosts,
            wrong_known_hosts,
            fingerprints,
            db_home,
            db_wrong_home,
        }
    }

    fn dest(&self) -> String {
        format!("{}@127.0.0.1", self.user)
    }
}

/// What a client run gave.
struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Out {
    /// Status and both streams, the outcome of an exec case.
    fn shown(&self) -> String {
        format!(
            "status={:?} out={:?} err={:?}",
            self.code, self.stdout, self.stderr
        )
    }

    fn status(&self) -> String {
        format!("status={:?}", self.code)
    }
}

/// Runs `cmd` with `stdin`, killed after [`LIMIT`] (code `None` then).
fn run(mut cmd: Command, stdin: &[u8]) -> Out {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    let feed = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let drain = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut v);
            }
            String::from_utf8_lossy(&v).to_string()
        })
    };
    let out = drain(child.stdout.take().map(|s| Box::new(s) as _));
    let err = drain(child.stderr.take().map(|s| Box::new(s) as _));
    let deadline = Instant::now() + LIMIT;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    feed.join().unwrap();
    Out {
        code: status.and_then(|s| s.code()),
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

/// Runs `f` `n` times, four at a time; the distinct outcomes with counts.
fn repeat(n: usize, f: impl Fn() -> String + Sync) -> String {
    let results = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for w in 0..4 {
            let (f, results) = (&f, &results);
            s.spawn(move || {
                for _ in (w..n).step_by(4) {
                    let r = f();
                    results.lock().unwrap().push(r);
                }
            });
        }
    });
    tally(results.into_inner().unwrap())
}

fn tally(mut v: Vec<String>) -> String {
    v.sort();
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < v.len() {
        let j = v[i..].iter().take_while(|x| **x == v[i]).count();
        out.push(format!("{j} x {}", v[i]));
        i += j;
    }
    out.join("; ")
}

/// One client's results, case by case, on both legs.
struct Matrix<'a> {
    fx: &'a Fixture,
    client: &'static str,
    rows: Vec<(String, Option<String>, String, String)>,
}

impl<'a> Matrix<'a> {
    fn new(fx: &'a Fixture, client: &'static str) -> Matrix<'a> {
        Matrix {
            fx,
            client,
            rows: Vec::new(),
        }
    }

    /// Runs `f` on the control and the router side by side; the control
    /// must give `expected` (if given) and the router what the control gave.
    fn case(&mut self, case: &str, expected: Option<&str>, f: impl Fn(&Target) -> String + Sync) {
        let fx = self.fx;
        let (direct, router) = std::thread::scope(|s| {
            let direct = s.spawn(|| f(&fx.direct));
            let router = f(&fx.router);
            (direct.join().unwrap(), router)
        });
        self.record(case, expected, direct, router);
    }

    fn record(&mut self, case: &str, expected: Option<&str>, direct: String, router: String) {
        self.rows.push((
            case.to_string(),
            expected.map(str::to_string),
            direct,
            router,
        ));
    }

    /// Fails the test with every case where the control missed its
    /// expectation or the router differed from the control.
    fn finish(self) {
        let mut bad = Vec::new();
        for (case, expected, direct, router) in &self.rows {
            if let Some(e) = expected {
                if e != direct {
                    bad.push(format!(
                        "{case}: CONTROL (straight to sshd) gave\n    {direct}\n  expected\n    {e}"
                    ));
                }
            }
            if router != direct {
                bad.push(format!(
                    "{case}: ROUTER differs from the control\n  router:  {router}\n  control: {direct}"
                ));
            }
        }
        if !bad.is_empty() {
            panic!(
                "{}: {} of {} cases failed:\n{}\n--- daemon log (tail) ---\n{}",
                self.client,
                bad.len(),
                self.rows.len(),
                bad.join("\n"),
                tail(&self.fx.d.log_text(), 40)
            );
        }
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A command that runs without a controlling terminal (no client may ask
/// a question), with its own HOME and no agent unless asked.
fn client(fx: &Fixture, program: &str) -> Command {
    let mut c = Command::new("setsid");
    c.arg(program)
        .env("HOME", fx.d.dir.path())
        .env_remove("SSH_AUTH_SOCK");
    c
}

// ---------------------------------------------------------------- OpenSSH

fn ssh_opts(c: &mut Command, key: &Path, known_hosts: &Path) {
    c.args(["-F", "/dev/null", "-o", "BatchMode=yes"])
        .args([
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "IdentitiesOnly=yes",
        ])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
        .arg("-i")
        .arg(key);
}

fn ssh(fx: &Fixture, t: &Target, key: Key) -> Command {
    let mut c = client(fx, "ssh");
    ssh_opts(&mut c, &fx.key(key), &t.known_hosts);
    c.args(["-p", &t.port.to_string()]);
    c
}

/// `scp`/`sftp` up and down of the big file; the outcome names both
/// statuses and whether each copy has the original's checksum.
fn transfer(
    fx: &Fixture,
    t: &Target,
    tag: &str,
    mut copy: impl FnMut(&Path, &Path, bool) -> Out,
) -> String {
    let up = fx.work.join(format!("up-{tag}-{}", t.label));
    let down = fx.work.join(format!("down-{tag}-{}", t.label));
    let a = copy(&fx.big, &up, true);
    let up_ok = up.exists() && sha256(&up) == fx.big_sha;
    let b = copy(&fx.big, &down, false);
    let down_ok = down.exists() && sha256(&down) == fx.big_sha;
    let _ = std::fs::remove_file(&up);
    let _ = std::fs::remove_file(&down);
    let detail = |o: &Out, ok| {
        if ok {
            String::new()
        } else {
            format!(" ({})", o.stderr.trim())
        }
    };
    format!(
        "up {} same={up_ok}{} down {} same={down_ok}{}",
        a.status(),
        detail(&a, up_ok),
        b.status(),
        detail(&b, down_ok)
    )
}

/// Runs a forwarding client (`spawn`), waits for `ready`, then checks an
/// echo round trip through `port` (a port it returns from its stderr).
fn forward_case(mut cmd: Command, port: impl Fn(&str) -> Option<u16>) -> String {
    let mut child = Proc(
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stderr = child.0.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut seen = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            seen.push_str(&line);
            seen.push('\n');
            let _ = tx.send(seen.clone());
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = String::new();
    let p = loop {
        if let Some(p) = port(&seen) {
            break Some(p);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(s) => seen = s,
            Err(_) => break None,
        }
    };
    match p {
        Some(p) => format!("allocated={} echo={}", p > 0, echo_roundtrip(p)),
        None => format!("no port reported ({})", seen.trim()),
    }
}

fn allocated_port(stderr: &str) -> Option<u16> {
    let rest = stderr.split("Allocated port ").nth(1)?;
    rest.split_whitespace().next()?.parse().ok()
}

#[test]
fn openssh_ssh_scp_sftp() {
    if !require(&[Component::Sshd, Component::Program("setsid")]) {
        return;
    }
    let fx = Fixture::new("openssh");
    let mut m = Matrix::new(&fx, "OpenSSH");
    cli_exec_cases(&mut m, CLI_REPS, Some("status=Some(255)"), |t| {
        ssh(&fx, t, Key::Ed25519)
    });
    stdin_case(&mut m, |t| {
        let mut c = ssh(&fx, t, Key::Ed25519);
        c.arg(t.dest());
        c
    });
    let both = "up status=Some(0) same=true down status=Some(0) same=true";
    for (tag, legacy) in [("scp", false), ("scp-O", true)] {
        m.case(tag, Some(both), |t| {
            transfer(&fx, t, tag, |big, path, up| {
                let mut c = client(&fx, "scp");
                ssh_opts(&mut c, &fx.key(Key::Ed25519), &t.known_hosts);
                c.args(["-q", "-P", &t.port.to_string()]);
                if legacy {
                    c.arg("-O");
                }
                if up {
                    c.arg(big).arg(format!("{}:{}", t.dest(), path.display()));
                } else {
                    c.arg(format!("{}:{}", t.dest(), big.display())).arg(path);
                }
                run(c, b"")
            })
        });
    }
    m.case("sftp", Some(both), |t| {
        transfer(&fx, t, "sftp", |big, path, up| {
            let mut c = client(&fx, "sftp");
            ssh_opts(&mut c, &fx.key(Key::Ed25519), &t.known_hosts);
            c.args(["-q", "-b", "-", "-P", &t.port.to_string()])
                .arg(t.dest());
            let batch = if up {
                format!("put {} {}\n", big.display(), path.display())
            } else {
                format!("get {} {}\n", big.display(), path.display())
            };
            run(c, batch.as_bytes())
        })
    });
    let fwd = "allocated=true echo=true";
    m.case("local-forward", Some(fwd), |t| {
        let lp = free_port();
        let mut c = ssh(&fx, t, Key::Ed25519);
        c.args(["-N", "-o", "ExitOnForwardFailure=yes", "-L"])
            .arg(format!("127.0.0.1:{lp}:127.0.0.1:{}", fx.echo))
            .arg(t.dest());
        forward_case(c, |_| Some(lp))
    });
    m.case("remote-forward-0", Some(fwd), |t| {
        let mut c = ssh(&fx, t, Key::Ed25519);
        c.args(["-N", "-o", "ExitOnForwardFailure=yes", "-R"])
            .arg(format!("127.0.0.1:0:127.0.0.1:{}", fx.echo))
            .arg(t.dest());
        forward_case(c, allocated_port)
    });
    let agent_ok = "status=Some(0) agent-keys=[AGENT-KEY] signature-valid=true";
    m.case("agent", Some(agent_ok), |t| {
        let mut c = ssh(&fx, t, Key::Ed25519);
        c.env("SSH_AUTH_SOCK", &fx.agent_sock)
            .arg("-A")
            .arg(t.dest())
            .arg(fx.agent_script());
        let o = run(c, b"");
        fx.agent_outcome(&o.status(), &o.stdout)
    });
    let logged_in = format!("status=Some(0) out={:?}", "in\n");
    for (case, key, alg) in [
        ("key-ed25519", Key::Ed25519, None),
        ("key-ecdsa", Key::Ecdsa, None),
        ("key-rsa-sha2-256", Key::Rsa, Some("rsa-sha2-256")),
        ("key-rsa-sha2-512", Key::Rsa, Some("rsa-sha2-512")),
    ] {
        m.case(case, Some(&logged_in), |t| {
            let mut c = ssh(&fx, t, key);
            if let Some(alg) = alg {
                c.arg("-o").arg(format!("PubkeyAcceptedAlgorithms={alg}"));
            }
            c.arg(t.dest()).arg("echo in");
            let o = run(c, b"");
            format!("{} out={:?}", o.status(), o.stdout)
        });
    }
    m.case("wrong-host-key", Some("status=Some(255)"), |t| {
        let mut c = client(&fx, "ssh");
        ssh_opts(&mut c, &fx.key(Key::Ed25519), &t.wrong_known_hosts);
        c.args(["-p", &t.port.to_string()])
            .arg(t.dest())
            .arg("true");
        run(c, b"").status()
    });
    m.finish();
}

/// `STDIN_MIB` MiB into `sha256sum` through `cmd` (destination given).
fn stdin_case(m: &mut Matrix, cmd: impl Fn(&Target) -> Command + Sync) {
    let data: Vec<u8> = (0..STDIN_MIB << 20).map(|i| (i * 7 % 251) as u8).collect();
    let want = {
        let f = m.fx.work.join("stdin.bin");
        std::fs::write(&f, &data).unwrap();
        let h = sha256(&f);
        let _ = std::fs::remove_file(&f);
        h
    };
    m.case("stdin-eof", Some("status=Some(0) match=true"), |t| {
        let mut c = cmd(t);
        c.arg("sha256sum");
        let o = run(c, &data);
        format!(
            "{} match={}",
            o.status(),
            o.stdout.split_whitespace().next() == Some(want.as_str())
        )
    });
}

// ------------------------------------------------------------------ PuTTY

fn putty_opts(c: &mut Command, fx: &Fixture, t: &Target, key: Key, fingerprints: &[String]) {
    c.args(["-batch", "-noagent"]);
    for fp in fingerprints {
        c.args(["-hostkey", fp]);
    }
    c.arg("-i").arg(fx.ppk(key));
    c.args(["-P", &t.port.to_string()]);
}

fn plink(fx: &Fixture, t: &Target, key: Key) -> Command {
    let mut c = client(fx, "plink");
    c.arg("-ssh");
    putty_opts(&mut c, fx, t, key, &t.fingerprints);
    c
}

#[test]
fn putty_plink_pscp() {
    if !require(&[
        Component::Sshd,
        Component::Program("setsid"),
        Component::Program("plink"),
        Component::Program("pscp"),
        Component::Program("puttygen"),
    ]) {
        return;
    }
    let fx = Fixture::new("putty");
    for k in [Key::Ed25519, Key::Ecdsa, Key::Rsa] {
        fx.ppk(k);
    }
    let mut m = Matrix::new(&fx, "PuTTY");
    cli_exec_cases(&mut m, CLI_REPS, Some("status=Some(128)"), |t| {
        plink(&fx, t, Key::Ed25519)
    });
    stdin_case(&mut m, |t| {
        let mut c = plink(&fx, t, Key::Ed25519);
        c.arg(t.dest());
        c
    });
    let both = "up status=Some(0) same=true down status=Some(0) same=true";
    for (tag, proto) in [("pscp-sftp", "-sftp"), ("pscp-scp", "-scp")] {
        m.case(tag, Some(both), |t| {
            transfer(&fx, t, tag, |big, path, up| {
                let mut c = client(&fx, "pscp");
                putty_opts(&mut c, &fx, t, Key::Ed25519, &t.fingerprints);
                c.args(["-q", proto]);
                if up {
                    c.arg(big).arg(format!("{}:{}", t.dest(), path.display()));
                } else {
                    c.arg(format!("{}:{}", t.dest(), big.display())).arg(path);
                }
                run(c, b"")
            })
        });
    }
    cli_forward_cases(&mut m, |t| {
        let mut c = plink(&fx, t, Key::Ed25519);
        c.arg("-N");
        c
    });
    agent_case(&mut m, |t| {
        let mut c = client(&fx, "plink");
        c.args(["-ssh", "-batch", "-A"]);
        for fp in &t.fingerprints {
            c.args(["-hostkey", fp]);
        }
        c.arg("-i")
            .arg(fx.ppk(Key::Ed25519))
            .args(["-P", &t.port.to_string()]);
        c
    });
    key_cases(&mut m, |t, k| plink(&fx, t, k));
    m.case("wrong-host-key", Some("status=Some(1)"), |t| {
        let mut c = client(&fx, "plink");
        c.arg("-ssh");
        let wrong = vec!["SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".to_string()];
        putty_opts(&mut c, &fx, t, Key::Ed25519, &wrong);
        c.arg(t.dest()).arg("true");
        run(c, b"").status()
    });
    m.finish();
}

/// The exec, close-then-exit and signal cases for a process-per-run
/// client; `cmd` gives the client up to (not including) the destination.
fn cli_exec_cases(
    m: &mut Matrix,
    reps: usize,
    signal: Option<&str>,
    cmd: impl Fn(&Target) -> Command + Sync,
) {
    let exec_ok = format!("status=Some(7) out={:?} err={:?}", "out\n", "err\n");
    m.case("exec-status", Some(&format!("{reps} x {exec_ok}")), |t| {
        repeat(reps, || {
            let mut c = cmd(t);
            c.arg(t.dest()).arg(EXEC);
            run(c, b"").shown()
        })
    });
    let closed = format!("status=Some(7) out={:?} err=\"\"", "out\n");
    m.case("close-then-exit", Some(&closed), |t| {
        repeat(4, || {
            let mut c = cmd(t);
            c.arg(t.dest()).arg(CLOSE_THEN_EXIT);
            let o = run(c, b"");
            format!("status={:?} out={:?}", o.code, o.stdout)
        })
        .replace("4 x ", "")
            + " err=\"\""
    });
    for sig in ["TERM", "KILL"] {
        m.case(&format!("signal-{sig}"), signal, |t| {
            let mut c = cmd(t);
            c.arg(t.dest()).arg(format!("kill -{sig} $$"));
            run(c, b"").status()
        });
    }
}

/// -L to the echo server and -R (a fixed port) back to it; `cmd` gives
/// the client with its "no command" flag, up to the destination.
fn cli_forward_cases(m: &mut Matrix, cmd: impl Fn(&Target) -> Command + Sync) {
    let fwd = "allocated=true echo=true";
    let echo = m.fx.echo;
    m.case("local-forward", Some(fwd), |t| {
        let lp = free_port();
        let mut c = cmd(t);
        c.arg("-L")
            .arg(format!("127.0.0.1:{lp}:127.0.0.1:{echo}"))
            .arg(t.dest());
        forward_case(c, |_| Some(lp))
    });
    m.case("remote-forward", Some(fwd), |t| {
        let rp = free_port();
        let mut c = cmd(t);
        c.arg("-R")
            .arg(format!("127.0.0.1:{rp}:127.0.0.1:{echo}"))
            .arg(t.dest());
        forward_case(c, |_| Some(rp))
    });
}

/// `-A` with the fixture's agent; `cmd` gives the client with its agent
/// flag, up to the destination.
fn agent_case(m: &mut Matrix, cmd: impl Fn(&Target) -> Command + Sync) {
    let fx = m.fx;
    let agent_ok = "status=Some(0) agent-keys=[AGENT-KEY] signature-valid=true";
    m.case("agent", Some(agent_ok), |t| {
        let mut c = cmd(t);
        c.env("SSH_AUTH_SOCK", &fx.agent_sock)
            .arg(t.dest())
            .arg(fx.agent_script());
        let o = run(c, b"");
        fx.agent_outcome(&o.status(), &o.stdout)
    });
}

/// A login with each key type; `cmd` gives the client using that key, up
/// to the destination.
fn key_cases(m: &mut Matrix, cmd: impl Fn(&Target, Key) -> Command + Sync) {
    let logged_in = format!("status=Some(0) out={:?}", "in\n");
    for key in [Key::Ed25519, Key::Ecdsa, Key::Rsa] {
        m.case(&format!("key-{}", key.name()), Some(&logged_in), |t| {
            let mut c = cmd(t, key);
            c.arg(t.dest()).arg("echo in");
            let o = run(c, b"");
            format!("{} out={:?}", o.status(), o.stdout)
        });
    }
}

// --------------------------------------------------------------- dropbear

fn dbclient(fx: &Fixture, t: &Target, key: Key, home: &Path) -> Command {
    let mut c = client(fx, "dbclient");
    c.env("HOME", home)
        .arg("-i")
        .arg(fx.dropbear_key(key))
        .args(["-p", &t.port.to_string()]);
    c
}

#[test]
fn dropbear_dbclient() {
    if !require(&[
        Component::Sshd,
        Component::Program("setsid"),
        Component::Program("dbclient"),
        Component::Program("dropbearconvert"),
    ]) {
        return;
    }
    let fx = Fixture::new("dropbear");
    for k in [Key::Ed25519, Key::Ecdsa, Key::Rsa] {
        fx.dropbear_key(k);
    }
    let mut m = Matrix::new(&fx, "dropbear");
    cli_exec_cases(&mut m, CLI_REPS, Some("status=Some(0)"), |t| {
        dbclient(&fx, t, Key::Ed25519, &t.db_home)
    });
    stdin_case(&mut m, |t| {
        let mut c = dbclient(&fx, t, Key::Ed25519, &t.db_home);
        c.arg(t.dest());
        c
    });
    cli_forward_cases(&mut m, |t| {
        let mut c = dbclient(&fx, t, Key::Ed25519, &t.db_home);
        c.arg("-N");
        c
    });
    agent_case(&mut m, |t| {
        let mut c = dbclient(&fx, t, Key::Ed25519, &t.db_home);
        c.arg("-A");
        c
    });
    key_cases(&mut m, |t, k| dbclient(&fx, t, k, &t.db_home));
    m.case("wrong-host-key", Some("status=Some(1)"), |t| {
        let mut c = dbclient(&fx, t, Key::Ed25519, &t.db_wrong_home);
        c.arg(t.dest()).arg("true");
        run(c, b"").status()
    });
    m.finish();
}

// ------------------------------------------------------ paramiko, asyncssh

/// Runs `tests/conformance/DRIVER` on both legs and records each case it
/// reports, against `expected` (case, control outcome).
fn python_matrix(fx: &Fixture, client: &'static str, driver: &str, expected: &[(&str, &str)]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/conformance")
        .join(driver);
    let run_leg = |t: &Target| -> serde_json::Map<String, serde_json::Value> {
        let spec = serde_json::json!({
            "host": "127.0.0.1",
            "port": t.port,
            "user": t.user,
            "known_hosts": t.known_hosts,
            "wrong_known_hosts": t.wrong_known_hosts,
            "keys": {
                "ed25519": fx.key(Key::Ed25519),
                "ecdsa": fx.key(Key::Ecdsa),
                "rsa": fx.key(Key::Rsa),
            },
            "reps": LIB_REPS,
            "stdin_mib": STDIN_MIB,
            "echo_port": fx.echo,
            "big": fx.big,
            "big_sha": fx.big_sha,
            "remote_dir": fx.work.join(format!("{client}-{}-remote", t.label)),
            "local_dir": fx.work.join(format!("{client}-{}-local", t.label)),
            "agent_script": fx.agent_script(),
        });
        for d in ["remote", "local"] {
            std::fs::create_dir_all(fx.work.join(format!("{client}-{}-{d}", t.label))).unwrap();
        }
        let spec_file = fx.work.join(format!("{client}-{}.json", t.label));
        std::fs::write(&spec_file, spec.to_string()).unwrap();
        let mut c = Command::new("/usr/bin/python3");
        c.arg(&script)
            .arg(&spec_file)
            .env("HOME", fx.d.dir.path())
            .env("SSH_AUTH_SOCK", &fx.agent_sock);
        let o = run(c, b"");
        match serde_json::from_str::<serde_json::Value>(&o.stdout) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => panic!(
                "{client} driver ({}) gave no result: {:?}\n{}",
                t.label, o.code, o.stderr
            ),
        }
    };
    let (direct, router) = std::thread::scope(|s| {
        let d = s.spawn(|| run_leg(&fx.direct));
        let r = run_leg(&fx.router);
        (d.join().unwrap(), r)
    });
    let mut m = Matrix::new(fx, client);
    let text = |v: Option<&serde_json::Value>| {
        v.and_then(|v| v.as_str())
            .unwrap_or("(no outcome)")
            .to_string()
    };
    for (case, want) in expected {
        let d = text(direct.get(*case));
        let mut d = d;
        let mut r = text(router.get(*case));
        if *case == "agent" {
            for (s, v) in [(&mut d, direct.get(*case)), (&mut r, router.get(*case))] {
                let raw = text(v);
                let (status, out) = raw.split_once('\n').unwrap_or((&raw, ""));
                *s = fx.agent_outcome(status, out);
            }
        }
        m.record(case, Some(*want), d, r);
    }
    m.finish();
}

#[test]
fn paramiko() {
    if !require(&[Component::Sshd, Component::PyModule("paramiko")]) {
        return;
    }
    let fx = Fixture::new("paramiko");
    let exec = format!("{LIB_REPS} x status=7 out='out\\n' err='err\\n'");
    python_matrix(
        &fx,
        "paramiko",
        "paramiko_driver.py",
        &[
            ("exec-status", &exec),
            ("close-then-exit", "status=7 out='out\\n' err=''"),
            ("signal-term", "status=-1 out='' err=''"),
            ("signal-kill", "status=-1 out='' err=''"),
            ("stdin-eof", "status=0 match=True"),
            ("sftp", "up=True down=True"),
            ("local-forward", "echo=True"),
            ("remote-forward-0", "allocated=True echo=True"),
            (
                "agent",
                "status=0 agent-keys=[AGENT-KEY] signature-valid=true",
            ),
            ("key-ed25519", "status=0 out='in\\n'"),
            ("key-ecdsa", "status=0 out='in\\n'"),
            ("key-rsa-sha2-256", "status=0 out='in\\n'"),
            ("key-rsa-sha2-512", "status=0 out='in\\n'"),
            ("wrong-host-key", "refused"),
        ],
    );
}

#[test]
fn asyncssh() {
    if !require(&[Component::Sshd, Component::PyModule("asyncssh")]) {
        return;
    }
    let fx = Fixture::new("asyncssh");
    let exec = format!("{LIB_REPS} x status=7 signal=None out='out\\n' err='err\\n'");
    python_matrix(
        &fx,
        "asyncssh",
        "asyncssh_driver.py",
        &[
            ("exec-status", &exec),
            (
                "close-then-exit",
                "status=7 signal=None out='out\\n' err=''",
            ),
            ("signal-term", "status=-1 signal=TERM out='' err=''"),
            ("signal-kill", "status=-1 signal=KILL out='' err=''"),
            ("stdin-eof", "status=0 match=True"),
            ("sftp", "up=True down=True"),
            ("local-forward", "echo=True"),
            ("remote-forward-0", "allocated=True echo=True"),
            (
                "agent",
                "status=0 agent-keys=[AGENT-KEY] signature-valid=true",
            ),
            ("key-ed25519", "status=0 out='in\\n'"),
            ("key-ecdsa", "status=0 out='in\\n'"),
            ("key-rsa-sha2-256", "status=0 out='in\\n'"),
            ("key-rsa-sha2-512", "status=0 out='in\\n'"),
            ("wrong-host-key", "refused"),
        ],
    );
}
