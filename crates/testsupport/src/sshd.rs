//! A real OpenSSH sshd on loopback, run in the foreground by the test, as
//! the upstream a route points at. Tests that use it start with
//! `require(&[Component::Sshd])`.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{free_port, ssh_key};

/// A running sshd and its files (in `PARENT/sshd-NAME`).
pub struct Sshd {
    pub port: u16,
    pub dir: PathBuf,
    /// Its host key's private file; the public one is [`Sshd::host_pub`].
    pub host_key_file: PathBuf,
    pub host_pub: PathBuf,
    pub authorized_keys: PathBuf,
    /// sshd's own log (`-e`, LogLevel VERBOSE).
    pub log: PathBuf,
    child: Child,
}

impl Sshd {
    /// An sshd that accepts no key yet (see [`Sshd::authorize`]).
    pub fn start(parent: &Path, name: &str) -> Sshd {
        Self::start_with(parent, name, &[], "")
    }

    /// An sshd that accepts `authorized` keys (OpenSSH lines); `extra`
    /// config lines come first, so they win over the defaults.
    pub fn start_with(parent: &Path, name: &str, authorized: &[String], extra: &str) -> Sshd {
        let dir = parent.join(format!("sshd-{name}"));
        std::fs::create_dir_all(&dir).unwrap();
        // The privilege separation directory (present where openssh-server
        // is installed; only root can make it).
        let _ = std::fs::create_dir_all("/run/sshd");
        let host_key_file = ssh_key(&dir, "host_ed25519");
        let authorized_keys = dir.join("authorized_keys");
        let mut lines = authorized.join("\n");
        if !lines.is_empty() {
            lines.push('\n');
        }
        std::fs::write(&authorized_keys, lines).unwrap();
        let log = dir.join("sshd.log");
        // A port taken between free_port and sshd's bind: try another.
        for _attempt in 0..5 {
            let port = free_port();
            let config = dir.join("sshd_config");
            std::fs::write(
                &config,
                format!(
                    "{extra}Port {port}\nListenAddress 127.0.0.1\nHostKey {hk}\nAuthorizedKeysFile {auth}\n\
                     PidFile {pid}\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                     PermitRootLogin prohibit-password\nStrictModes no\nSubsystem sftp /usr/lib/openssh/sftp-server\n\
                     AllowTcpForwarding yes\nAllowAgentForwarding yes\nAllowStreamLocalForwarding yes\n\
                     StreamLocalBindUnlink yes\nAcceptEnv LANG LC_* TESTVAR_*\nMaxStartups 300\nMaxSessions 50\n\
                     PrintMotd no\nPrintLastLog no\nLogLevel VERBOSE\n",
                    hk = host_key_file.display(),
                    auth = authorized_keys.display(),
                    pid = dir.join("sshd.pid").display(),
                ),
            )
            .unwrap();
            let child = Command::new("/usr/sbin/sshd")
                .args(["-D", "-e", "-f"])
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap();
            let mut sshd = Sshd {
                port,
                host_pub: PathBuf::from(format!("{}.pub", host_key_file.display())),
                host_key_file: host_key_file.clone(),
                authorized_keys: authorized_keys.clone(),
                log: log.clone(),
                dir: dir.clone(),
                child,
            };
            if sshd.wait_ready() {
                return sshd;
            }
        }
        panic!(
            "sshd did not start: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    /// Whether sshd greets on its port within 10 s (false if it exited).
    fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut buf = [0u8; 4];
                if s.read_exact(&mut buf).is_ok() && &buf == b"SSH-" {
                    return true;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// sshd's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The host key's public line (`ssh-ed25519 AAAA... comment`).
    pub fn host_pub_line(&self) -> String {
        std::fs::read_to_string(&self.host_pub)
            .unwrap()
            .trim()
            .to_string()
    }

    /// Lets `key_line` log in upstream.
    pub fn authorize(&self, key_line: &str) {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.authorized_keys)
            .unwrap();
        writeln!(f, "{key_line}").unwrap();
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
