//! Test certificates made with the real openssl command: a CA, leaf
//! certificates it signs, and what a server presents on the wire.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A private key file (ECDSA P-256, PKCS#8 PEM), mode 0600.
pub fn key(dir: &Path, name: &str) -> PathBuf {
    openssl(
        dir,
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            name,
        ],
    );
    let p = dir.join(name);
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

/// A self-signed CA in `dir`: `NAME.pem` and `NAME.key`.
pub struct Ca {
    pub dir: PathBuf,
    pub name: String,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Ca {
    pub fn new(dir: &Path, name: &str) -> Ca {
        let key = key(dir, &format!("{name}.key"));
        let cert = dir.join(format!("{name}.pem"));
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-new",
                "-key",
                key.to_str().unwrap(),
                "-days",
                "2",
                "-subj",
                &format!("/CN={name}"),
                "-out",
                cert.to_str().unwrap(),
            ],
        );
        Ca {
            dir: dir.to_path_buf(),
            name: name.to_string(),
            cert,
            key,
        }
    }

    /// A leaf for `names` (host names or IP addresses) signed by this CA, written as `FILE.pem` (the
    /// chain: leaf, then this CA) and `FILE.key` (0600). Returns both paths.
    pub fn leaf(&self, file: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let dir = &self.dir;
        let key = key(dir, &format!("{file}.key"));
        let csr = dir.join(format!("{file}.csr"));
        openssl(
            dir,
            &[
                "req",
                "-new",
                "-key",
                key.to_str().unwrap(),
                "-subj",
                &format!("/CN={}", names[0]),
                "-out",
                csr.to_str().unwrap(),
            ],
        );
        let ext = dir.join(format!("{file}.ext"));
        let sans: Vec<String> = names
            .iter()
            .map(|n| match n.parse::<std::net::IpAddr>() {
                Ok(_) => format!("IP:{n}"),
                Err(_) => format!("DNS:{n}"),
            })
            .collect();
        std::fs::write(&ext, format!("subjectAltName={}\n", sans.join(","))).unwrap();
        let leaf = dir.join(format!("{file}.leaf.pem"));
        let serial = format!("0x{:016x}", rand::random::<u64>() >> 1);
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                csr.to_str().unwrap(),
                "-CA",
                self.cert.to_str().unwrap(),
                "-CAkey",
                self.key.to_str().unwrap(),
                "-set_serial",
                &serial,
                "-days",
                "2",
                "-extfile",
                ext.to_str().unwrap(),
                "-out",
                leaf.to_str().unwrap(),
            ],
        );
        let chain = dir.join(format!("{file}.pem"));
        let mut pem = std::fs::read_to_string(&leaf).unwrap();
        pem.push_str(&std::fs::read_to_string(&self.cert).unwrap());
        std::fs::write(&chain, pem).unwrap();
        (chain, key)
    }
}

/// The serial number (hex) of the certificate a TLS server on
/// 127.0.0.1:`port` presents for `host`, or `None` if the handshake fails.
pub fn served_serial(host: &str, port: u16) -> Option<String> {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect 127.0.0.1:{port} -servername {host} </dev/null 2>/dev/null | openssl x509 -noout -serial"
        ))
        .output()
        .ok()?;
    let s = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    s.strip_prefix("serial=").map(str::to_owned)
}

/// The serial number (hex, as `served_serial` prints it) of a PEM file's first certificate.
pub fn file_serial(pem: &Path) -> String {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-serial", "-in"])
        .arg(pem)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .strip_prefix("serial=")
        .unwrap()
        .to_owned()
}
