//! The daemon's steps of `sandboxd setup`: its system user, configuration
//! file, state directory, binary and systemd unit, and starting it (systemd,
//! or a detached process with a PID file).

use super::*;

impl Host {
    pub(super) fn user(&self) -> Result<Outcome> {
        let name = &self.args().user;
        let mut did = Vec::new();
        if nix::unistd::Group::from_name(INCUS_GROUP)?.is_none() {
            run(Command::new("groupadd").args(["--system", INCUS_GROUP]))?;
            did.push(format!("created group {INCUS_GROUP}"));
        }
        let user = nix::unistd::User::from_name(name)?;
        if user.is_none() {
            run(Command::new("useradd")
                .args(["--system", "--user-group", "--no-create-home"])
                .arg("--home-dir")
                .arg(&self.args().state_dir)
                .args([
                    "--shell",
                    "/usr/sbin/nologin",
                    "--comment",
                    "sandboxd daemon",
                ])
                .args(["--groups", INCUS_GROUP])
                .arg(name))?;
            did.push(format!("created system user {name} in group {INCUS_GROUP}"));
        } else {
            let members = nix::unistd::Group::from_name(INCUS_GROUP)?
                .map(|g| g.mem)
                .unwrap_or_default();
            if !members.iter().any(|m| m == name) {
                run(Command::new("usermod").args(["--append", "--groups", INCUS_GROUP, name]))?;
                did.push(format!("added {name} to group {INCUS_GROUP}"));
            }
        }
        if did.is_empty() {
            Ok(Outcome::Ok(format!(
                "user {name} exists, member of {INCUS_GROUP}"
            )))
        } else {
            Ok(Outcome::Done(did.join("; ")))
        }
    }

    pub(super) fn config_text(&self) -> String {
        let a = self.args();
        let mut s = String::new();
        let _ = writeln!(s, "# sandboxd configuration, written by `sandboxd setup`.");
        let _ = writeln!(
            s,
            "# Every key is described in README.md; unknown keys are errors."
        );
        let _ = writeln!(
            s,
            "state_dir = {}",
            toml_str(&a.state_dir.display().to_string())
        );
        let _ = writeln!(
            s,
            "admin_socket = {}",
            toml_str(&a.run_dir.join("admin.sock").display().to_string())
        );
        let _ = writeln!(s, "ssh_listen = {}", toml_list(&self.plan.ssh));
        let _ = writeln!(s, "https_listen = {}", toml_list(&self.plan.https));
        let _ = writeln!(s, "http_listen = {}", toml_list(&self.plan.http));
        let _ = writeln!(
            s,
            "# \"internal\" serves certificates of a local CA; switch to \"acme\" (and set\n# acme_email) once DNS points the sandboxes' names here."
        );
        let _ = writeln!(s, "tls_mode = \"internal\"");
        if let Some(sock) = &self.socket {
            let _ = writeln!(
                s,
                "incus_socket = {}",
                toml_str(&sock.display().to_string())
            );
        }
        let _ = writeln!(s, "log = \"info\"");
        s
    }

    pub(super) fn config(&self) -> Result<Outcome> {
        let owner = user_ids(&self.args().user)?;
        let dir = &self.args().config_dir;
        let mut did = Vec::new();
        if ensure_dir(dir, 0o700, owner)? {
            did.push(format!("{} (0700)", dir.display()));
        }
        let file = self.config_file();
        if !file.exists() {
            write_atomic(&file, self.config_text().as_bytes(), 0o600)?;
            std::os::unix::fs::chown(&file, Some(owner.0.as_raw()), Some(owner.1.as_raw()))?;
            did.push(format!("wrote {} (0600)", file.display()));
        } else {
            let meta = std::fs::metadata(&file)?;
            if meta.mode() & 0o777 != 0o600 {
                std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))?;
                did.push(format!("{} made 0600", file.display()));
            }
            if meta.uid() != owner.0.as_raw() {
                std::os::unix::fs::chown(&file, Some(owner.0.as_raw()), Some(owner.1.as_raw()))?;
                did.push(format!("{} given to {}", file.display(), self.args().user));
            }
        }
        // The file must be one the daemon accepts.
        let serve = crate::config::ServeArgs {
            config: Some(file.clone()),
            ..Default::default()
        };
        crate::config::load(&serve, None)
            .with_context(|| format!("{} is not a valid configuration", file.display()))?;
        if did.is_empty() {
            Ok(Outcome::Ok(format!("{} (kept as it is)", file.display())))
        } else {
            Ok(Outcome::Done(did.join("; ")))
        }
    }

    pub(super) fn state(&self) -> Result<Outcome> {
        let owner = user_ids(&self.args().user)?;
        let dir = &self.args().state_dir;
        if ensure_dir(dir, 0o700, owner)? {
            Ok(Outcome::Done(format!(
                "{} (0700, {})",
                dir.display(),
                self.args().user
            )))
        } else {
            Ok(Outcome::Ok(dir.display().to_string()))
        }
    }

    pub(super) fn binary(&mut self) -> Result<Outcome> {
        let me = std::env::current_exe().context("finding the running executable")?;
        let target = self.bin();
        if me == target {
            return Ok(Outcome::Ok(format!("{} (running it)", target.display())));
        }
        let mine = std::fs::read(&me).with_context(|| format!("reading {}", me.display()))?;
        if std::fs::read(&target).ok().as_deref() == Some(&mine[..]) {
            return Ok(Outcome::Ok(format!("{} is this version", target.display())));
        }
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        write_atomic(&target, &mine, 0o755)?;
        // A running service must move to the new binary: the start step
        // restarts it as it does for a changed unit.
        self.unit_changed = true;
        Ok(Outcome::Done(format!("installed {}", target.display())))
    }

    /// The unit text for these paths and this user.
    pub fn unit_text(&self) -> String {
        let a = self.args();
        let exec = format!(
            "{} serve --config {}",
            self.bin().display(),
            self.config_file().display()
        );
        let mut text = UNIT.replace(UNIT_EXEC, &exec);
        if a.user != "sandboxd" {
            text = text
                .replace("\nUser=sandboxd\n", &format!("\nUser={}\n", a.user))
                .replace("\nGroup=sandboxd\n", &format!("\nGroup={}\n", a.user));
        }
        let extra: Vec<String> = [
            (&a.state_dir, crate::config::DEFAULT_STATE_DIR),
            (&a.run_dir, "/run/sandboxd"),
        ]
        .iter()
        .filter(|(p, default)| p.as_path() != Path::new(default))
        .map(|(p, _)| p.display().to_string())
        .collect();
        if !extra.is_empty() {
            text = text.replace(
                "\nUMask=0077\n",
                &format!("\nUMask=0077\nReadWritePaths={}\n", extra.join(" ")),
            );
        }
        text
    }

    pub(super) fn unit(&mut self) -> Result<Outcome> {
        let path = self.args().unit_dir.join("sandboxd.service");
        let text = self.unit_text();
        if std::fs::read_to_string(&path).ok().as_deref() == Some(text.as_str()) {
            return Ok(Outcome::Ok(path.display().to_string()));
        }
        std::fs::create_dir_all(&self.args().unit_dir)?;
        write_atomic(&path, text.as_bytes(), 0o644)?;
        self.unit_changed = true;
        Ok(Outcome::Done(format!("installed {}", path.display())))
    }

    /// The PID in the PID file, if that process is a live sandboxd, and
    /// whether it runs a binary that has been replaced since it started.
    pub(super) fn running_pid(&self) -> Option<(i32, bool)> {
        let pid: i32 = std::fs::read_to_string(self.pid_file())
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
        match exe.file_name()?.to_str()? {
            "sandboxd" => Some((pid, false)),
            "sandboxd (deleted)" => Some((pid, true)),
            _ => None,
        }
    }

    /// Stops a detached daemon (SIGTERM: it drains) and waits for it.
    pub(super) fn stop_detached(pid: i32) -> Result<()> {
        use nix::sys::signal::{kill, Signal};
        let pid = nix::unistd::Pid::from_raw(pid);
        kill(pid, Signal::SIGTERM).with_context(|| format!("stopping sandboxd (pid {pid})"))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while Path::new(&format!("/proc/{pid}")).exists() {
            if Instant::now() > deadline {
                bail!("sandboxd (pid {pid}) did not stop within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    pub(super) fn start(&self) -> Result<Outcome> {
        if self.plan.args.no_start {
            return Ok(Outcome::Ok("not started (--no-start)".into()));
        }
        if systemd_running() {
            let active = Command::new("systemctl")
                .args(["is-active", "--quiet", "sandboxd.service"])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if self.unit_changed {
                run(Command::new("systemctl").arg("daemon-reload"))?;
            }
            if active && !self.unit_changed {
                run(Command::new("systemctl").args(["enable", "sandboxd.service"]))?;
                return Ok(Outcome::Ok("sandboxd.service is active".into()));
            }
            run(Command::new("systemctl").args(["enable", "sandboxd.service"]))?;
            // Type=notify: returns once the daemon said READY=1.
            run(Command::new("systemctl").args(["restart", "sandboxd.service"]))?;
            return Ok(Outcome::Done("sandboxd.service enabled and started".into()));
        }
        match self.running_pid() {
            Some((pid, false)) => {
                return Ok(Outcome::Ok(format!(
                    "systemd not found; sandboxd runs detached (pid {pid}, {})",
                    self.pid_file().display()
                )))
            }
            Some((pid, true)) => {
                // Its binary was replaced (by the binary step of this or an
                // earlier run): restart it on the new one.
                Self::stop_detached(pid)?;
                return match self.start_detached()? {
                    Outcome::Done(how) => Ok(Outcome::Done(format!(
                        "restarted on the new binary (was pid {pid}); {how}"
                    ))),
                    other => Ok(other),
                };
            }
            None => {}
        }
        self.start_detached()
    }

    /// Without systemd: `setsid setpriv ... sandboxd serve`, readiness heard
    /// through the daemon's own sd_notify on an abstract socket.
    pub(super) fn start_detached(&self) -> Result<Outcome> {
        use std::os::linux::net::SocketAddrExt;
        let a = self.args();
        let owner = user_ids(&a.user)?;
        ensure_dir(&a.run_dir, 0o700, owner)?;
        let log_path = a.state_dir.join("sandboxd.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        std::os::unix::fs::chown(&log_path, Some(owner.0.as_raw()), Some(owner.1.as_raw()))?;
        let name = format!("sandboxd-setup-{}", std::process::id());
        let notify = std::os::unix::net::UnixDatagram::bind_addr(
            &std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?,
        )?;
        let mut cmd = Command::new("setsid");
        cmd.current_dir("/");
        if owner.0.is_root() {
            cmd.arg(self.bin());
        } else {
            cmd.arg("setpriv")
                .arg(format!("--reuid={}", owner.0))
                .arg(format!("--regid={}", owner.1))
                .arg("--init-groups")
                .arg("--inh-caps=+net_bind_service")
                .arg("--ambient-caps=+net_bind_service")
                .arg("--")
                .arg(self.bin());
        }
        let mut child = cmd
            .arg("serve")
            .arg("--config")
            .arg(self.config_file())
            .env("NOTIFY_SOCKET", format!("@{name}"))
            .env_remove("WATCHDOG_USEC")
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting sandboxd serve")?;
        notify.set_read_timeout(Some(Duration::from_millis(250)))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut buf = [0u8; 4096];
        loop {
            if let Ok(n) = notify.recv(&mut buf) {
                if String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .any(|l| l == "READY=1")
                {
                    break;
                }
            }
            if let Some(status) = child.try_wait()? {
                let text = std::fs::read_to_string(&log_path).unwrap_or_default();
                let last = text.lines().last().unwrap_or("").to_string();
                bail!(
                    "sandboxd serve exited ({status}); see {}: {last}",
                    log_path.display()
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "sandboxd serve was not ready within 60 s; see {}",
                    log_path.display()
                );
            }
        }
        write_atomic(
            &self.pid_file(),
            format!("{}\n", child.id()).as_bytes(),
            0o644,
        )?;
        Ok(Outcome::Done(format!(
            "systemd not found: started sandboxd detached as {} (pid {}, PID file {}, log {})",
            a.user,
            child.id(),
            self.pid_file().display(),
            log_path.display()
        )))
    }
}
