//! A real ACME server for tests: Pebble and pebble-challtestsrv (its
//! DNS answers 127.0.0.1 for every name) on free loopback ports. Pebble
//! validates HTTP-01 on `http_port` and TLS-ALPN-01 on `tls_port`, so the
//! gateway or daemon under test listens there. Every Pebble holds a file
//! lock while it runs, so that Pebble instances never overlap (test
//! binaries and tests may run in parallel). Tests that use it start with
//! `require(&[Component::Pebble])`.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::{free_port, wait_port, Proc};

pub struct Pebble {
    pub dir: tempfile::TempDir,
    /// The CA of Pebble's own TLS certificate (trust it to reach the directory).
    pub cert_file: PathBuf,
    pub config_file: PathBuf,
    pub listen: u16,
    pub mgmt: u16,
    pub http_port: u16,
    pub tls_port: u16,
    pub dns_port: u16,
    pebble: Option<Proc>,
    _challtest: Proc,
    _lock: nix::fcntl::Flock<std::fs::File>,
}

impl Pebble {
    /// Pebble with its default certificate validity.
    pub fn start() -> Pebble {
        Self::start_with_validity(None)
    }

    /// [`Pebble::start`] off the async threads (the file lock may wait).
    pub async fn start_async(validity_secs: Option<u64>) -> Pebble {
        tokio::task::spawn_blocking(move || Self::start_with_validity(validity_secs))
            .await
            .unwrap()
    }

    /// Pebble issuing certificates valid for `validity_secs` (its default
    /// if `None`).
    pub fn start_with_validity(validity_secs: Option<u64>) -> Pebble {
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(std::env::temp_dir().join("httpgate-pebble-tests.lock"))
            .unwrap();
        let lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| e)
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        // Pebble's own certificate, from a CA that the daemon is told to trust.
        let ca = crate::pki::Ca::new(dir.path(), "pebble-test-ca");
        let (_, key_file) = ca.leaf("pebble", &["localhost", "127.0.0.1"]);
        let cert_file = ca.cert.clone();
        let leaf_file = dir.path().join("pebble.leaf.pem");
        let (listen, mgmt, http_port, tls_port, dns_port, chall_mgmt) = (
            free_port(),
            free_port(),
            free_port(),
            free_port(),
            free_port(),
            free_port(),
        );
        let mut cfg = serde_json::json!({"pebble": {
            "listenAddress": format!("127.0.0.1:{listen}"),
            "managementListenAddress": format!("127.0.0.1:{mgmt}"),
            "certificate": leaf_file.display().to_string(),
            "privateKey": key_file.display().to_string(),
            "httpPort": http_port, "tlsPort": tls_port,
            "ocspResponderURL": "", "externalAccountBindingRequired": false}});
        if let Some(v) = validity_secs {
            cfg["pebble"]["certificateValidityPeriod"] = serde_json::json!(v);
        }
        let config_file = dir.path().join("pebble.json");
        std::fs::write(&config_file, cfg.to_string()).unwrap();
        let challtest = Proc(
            Command::new("pebble-challtestsrv")
                .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
                .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
                .args(["-management", &format!("127.0.0.1:{chall_mgmt}")])
                .args(["-dns01", &format!("127.0.0.1:{dns_port}")])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        wait_port(chall_mgmt);
        let mut p = Pebble {
            dir,
            cert_file,
            config_file,
            listen,
            mgmt,
            http_port,
            tls_port,
            dns_port,
            pebble: None,
            _challtest: challtest,
            _lock: lock,
        };
        p.start_pebble();
        p
    }

    pub fn start_pebble(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("pebble.log")).unwrap();
        let child = Command::new("pebble")
            .arg("-config")
            .arg(&self.config_file)
            .arg("-dnsserver")
            .arg(format!("127.0.0.1:{}", self.dns_port))
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_AUTHZREUSE", "0")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.pebble = Some(Proc(child));
        wait_port(self.listen);
        wait_port(self.mgmt);
    }

    pub fn stop_pebble(&mut self) {
        self.pebble = None;
    }

    /// Pebble's log (orders, validations), for counting and for failures.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pebble.log")).unwrap_or_default()
    }

    pub fn directory(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.listen)
    }

    /// Pebble's issuing root (it changes at every Pebble start), in a file.
    pub fn root_file(&self) -> PathBuf {
        let out = Command::new("curl")
            .args(["-sS", "--fail", "--max-time", "10", "--cacert"])
            .arg(&self.cert_file)
            .arg(format!("https://127.0.0.1:{}/roots/0", self.mgmt))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let f = self.dir.path().join("root.pem");
        std::fs::write(&f, &out.stdout).unwrap();
        f
    }
}
