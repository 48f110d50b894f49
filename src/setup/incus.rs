//! The Incus steps of `sandboxd setup`: the OS check, installing Incus,
//! getting incusd to answer, and the storage pool, bridge (with the
//! sandboxes' egress ACL) and profile, through the Incus REST API.

use super::*;

impl Host {
    pub(super) fn os(&self) -> Result<Outcome> {
        let os = os_release()?;
        let id = os.get("ID").map(String::as_str).unwrap_or("?");
        let version = os.get("VERSION_ID").map(String::as_str).unwrap_or("?");
        let pretty = os.get("PRETTY_NAME").cloned().unwrap_or_default();
        match (id, version) {
            ("debian", "12") | ("ubuntu", "24.04") => Ok(Outcome::Ok(pretty)),
            _ => bail!("{pretty} ({id} {version}) is not supported: use Debian 12 or Ubuntu 24.04"),
        }
    }

    pub(super) fn incusd_path() -> Option<PathBuf> {
        ["/usr/libexec/incus/incusd", "/opt/incus/bin/incusd"]
            .map(PathBuf::from)
            .into_iter()
            .find(|p| p.is_file())
            .or_else(|| find_program("incusd"))
    }

    pub(super) fn incus(&self) -> Result<Outcome> {
        if let Some(p) = Self::incusd_path() {
            return Ok(Outcome::Ok(format!("installed ({})", p.display())));
        }
        let os = os_release()?;
        let id = os.get("ID").cloned().unwrap_or_default();
        let codename = os.get("VERSION_CODENAME").cloned().unwrap_or_default();
        let apt = |args: &[&str]| {
            run(Command::new("apt-get")
                .args(args)
                .env("DEBIAN_FRONTEND", "noninteractive"))
        };
        let detail = match self.plan.source {
            Source::Distro if id == "debian" => {
                let dst = Path::new("/etc/apt/sources.list.d/sandboxd-backports.sources");
                let list_dst = Path::new("/etc/apt/sources.list.d/sandboxd-backports.list");
                if !dst.exists() && !list_dst.exists() {
                    let deb822 = std::fs::read_to_string("/etc/apt/sources.list.d/debian.sources")
                        .ok()
                        .and_then(|t| derive_backports(&t));
                    match deb822 {
                        Some(text) => write_atomic(dst, text.as_bytes(), 0o644)?,
                        None => {
                            let list = std::fs::read_to_string("/etc/apt/sources.list")
                                .ok()
                                .and_then(|t| derive_backports_list(&t))
                                .context(
                                    "found no bookworm source in /etc/apt to derive bookworm-backports from",
                                )?;
                            write_atomic(list_dst, list.as_bytes(), 0o644)?;
                        }
                    }
                }
                // Other sources may fail to refresh; the install decides.
                let _ = apt(&["update", "-q"]);
                apt(&["install", "-y", "-q", "-t", "bookworm-backports", "incus"])?;
                "installed incus from bookworm-backports"
            }
            Source::Distro => {
                let _ = apt(&["update", "-q"]);
                apt(&["install", "-y", "-q", "incus"])?;
                "installed incus from the distribution"
            }
            Source::Zabbly => {
                let (Some(repo), Some(key)) = (&self.args().zabbly_repo, &self.args().zabbly_key)
                else {
                    bail!("--incus-source zabbly needs --zabbly-repo and --zabbly-key");
                };
                let keyring = Path::new("/etc/apt/keyrings/sandboxd-zabbly.asc");
                std::fs::create_dir_all("/etc/apt/keyrings")?;
                let key_text =
                    std::fs::read(key).with_context(|| format!("reading {}", key.display()))?;
                write_atomic(keyring, &key_text, 0o644)?;
                let arch = run(Command::new("dpkg").arg("--print-architecture"))?;
                let sources = format!(
                    "Enabled: yes\nTypes: deb\nURIs: {}/incus/stable\nSuites: {codename}\nComponents: main\nArchitectures: {}\nSigned-By: {}\n",
                    repo.trim_end_matches('/'),
                    arch.trim(),
                    keyring.display()
                );
                write_atomic(
                    Path::new("/etc/apt/sources.list.d/sandboxd-zabbly-incus.sources"),
                    sources.as_bytes(),
                    0o644,
                )?;
                let _ = apt(&["update", "-q"]);
                apt(&["install", "-y", "-q", "incus"])?;
                "installed incus from the maintainers' repository"
            }
        };
        if Self::incusd_path().is_none() {
            bail!("incus was installed but incusd is not found");
        }
        Ok(Outcome::Done(detail.to_string()))
    }

    pub(super) async fn answering(path: &Path) -> Option<String> {
        let c = incusctl::Client::lazy(
            path.to_path_buf(),
            incusctl::ClientOptions {
                request_timeout: Duration::from_secs(5),
                ..Default::default()
            },
        );
        c.server_info()
            .await
            .ok()
            .map(|i| i.environment.server_version.clone())
    }

    pub(super) async fn find_answering(&self) -> Option<(PathBuf, String)> {
        let candidates: Vec<PathBuf> = match &self.args().incus_socket {
            Some(p) => vec![p.clone()],
            None => incusctl::DEFAULT_SOCKETS.map(PathBuf::from).to_vec(),
        };
        for p in candidates {
            if let Some(v) = Self::answering(&p).await {
                return Some((p, v));
            }
        }
        None
    }

    pub(super) async fn wait_answering(&self, limit: Duration) -> Option<(PathBuf, String)> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(found) = self.find_answering().await {
                return Some(found);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    pub(super) async fn incusd(&mut self) -> Result<Outcome> {
        if let Some((p, v)) = self.find_answering().await {
            self.socket = Some(p.clone());
            return Ok(Outcome::Ok(format!("Incus {v} answers on {}", p.display())));
        }
        let how = if systemd_running() {
            run(Command::new("systemctl").args([
                "enable",
                "--now",
                "incus.socket",
                "incus.service",
            ]))?;
            "started incus.socket and incus.service".to_string()
        } else {
            let incusd = Self::incusd_path().context("incusd not found")?;
            let group = if nix::unistd::Group::from_name(INCUS_GROUP)?.is_some() {
                INCUS_GROUP
            } else {
                "root"
            };
            let log_path = Path::new("/var/log/incusd-sandboxd.log");
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log_path)
                .with_context(|| format!("opening {}", log_path.display()))?;
            // From /: a detached daemon must not hold on to (or lose) the
            // directory setup was run from.
            let child = Command::new("setsid")
                .current_dir("/")
                .arg(&incusd)
                .args(["--group", group])
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .with_context(|| format!("starting {}", incusd.display()))?;
            write_atomic(
                Path::new("/run/incusd-sandboxd.pid"),
                format!("{}\n", child.id()).as_bytes(),
                0o644,
            )?;
            format!(
                "systemd not found: started incusd detached (pid {}, log {}, PID file /run/incusd-sandboxd.pid)",
                child.id(),
                log_path.display()
            )
        };
        match self.wait_answering(Duration::from_secs(60)).await {
            Some((p, v)) => {
                self.socket = Some(p.clone());
                Ok(Outcome::Done(format!(
                    "{how}; Incus {v} answers on {}",
                    p.display()
                )))
            }
            None => bail!("{how}, but no Incus socket answered within 60 s"),
        }
    }

    pub(super) async fn storage(&self) -> Result<Outcome> {
        let incus = self.client()?;
        let name = &self.args().pool;
        if let Some(p) = incus.storage_pool(name).await? {
            let note = if p.driver != self.plan.driver.name() {
                format!(" (--storage {} not applied)", self.plan.driver.name())
            } else {
                String::new()
            };
            return Ok(Outcome::Ok(format!(
                "pool {name} exists, driver {}{note}",
                p.driver
            )));
        }
        let mut config = BTreeMap::new();
        match self.plan.driver {
            Driver::Dir => {}
            Driver::Btrfs => {
                if find_program("mkfs.btrfs").is_none() {
                    run(Command::new("apt-get")
                        .args(["install", "-y", "-q", "btrfs-progs"])
                        .env("DEBIAN_FRONTEND", "noninteractive"))
                    .context("btrfs needs btrfs-progs")?;
                }
                config.insert("size".to_string(), self.args().storage_size.clone());
            }
            Driver::Zfs => {
                if find_program("zfs").is_none() || find_program("zpool").is_none() {
                    bail!("--storage zfs needs the zfs tools (zfsutils-linux) and the zfs kernel module; install them or use --storage btrfs");
                }
                config.insert("size".to_string(), self.args().storage_size.clone());
            }
        }
        incus
            .create_storage_pool(name, self.plan.driver.name(), &config)
            .await?;
        let size = config
            .get("size")
            .map(|s| format!(", loop file of {s}"))
            .unwrap_or_default();
        Ok(Outcome::Done(format!(
            "created pool {name} (driver {}{size})",
            self.plan.driver.name()
        )))
    }

    pub(super) async fn network(&self) -> Result<Outcome> {
        let incus = self.client()?;
        let a = self.args();
        // The sandboxes' egress rules live in one ACL attached to the
        // bridge (see `lifecycle::network`); made and attached here so that
        // the daemon never has to change the network.
        let acl = crate::lifecycle::network::acl_name(&a.bridge);
        incus.edit_network_acl(&acl, |_| false).await?;
        if let Some(n) = incus.network(&a.bridge).await? {
            let addr = n.config.get("ipv4.address").cloned().unwrap_or_default();
            let set = incus
                .edit_network_config(&a.bridge, |cfg| {
                    let mut changed = false;
                    for key in ACL_DEFAULT_KEYS {
                        if !cfg.contains_key(key) {
                            cfg.insert(key.to_string(), "allow".to_string());
                            changed = true;
                        }
                    }
                    let list = cfg.get("security.acls").cloned().unwrap_or_default();
                    if !list.split(',').any(|x| x.trim() == acl) {
                        let joined = if list.trim().is_empty() {
                            acl.clone()
                        } else {
                            format!("{list},{acl}")
                        };
                        cfg.insert("security.acls".to_string(), joined);
                        changed = true;
                    }
                    changed
                })
                .await?;
            let what = format!("network {} exists ({} {addr})", a.bridge, n.kind);
            return Ok(if set {
                Outcome::Done(format!("{what}; egress ACL {acl} attached"))
            } else {
                Outcome::Ok(what)
            });
        }
        let mut config: BTreeMap<String, String> = [
            ("ipv4.address", a.bridge_ipv4.as_str()),
            ("ipv4.nat", if a.no_nat { "false" } else { "true" }),
            ("ipv6.address", a.bridge_ipv6.as_str()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for key in ACL_DEFAULT_KEYS {
            config.insert(key.to_string(), "allow".to_string());
        }
        config.insert("security.acls".to_string(), acl);
        incus.create_bridge(&a.bridge, &config).await?;
        Ok(Outcome::Done(format!(
            "created bridge {} ({}, NAT {})",
            a.bridge,
            a.bridge_ipv4,
            if a.no_nat { "off" } else { "on" }
        )))
    }

    pub(super) async fn profile(&self) -> Result<Outcome> {
        let incus = self.client()?;
        let a = self.args();
        let eth0: BTreeMap<String, String> = [
            ("type", "nic"),
            ("name", "eth0"),
            ("network", a.bridge.as_str()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let root: BTreeMap<String, String> =
            [("type", "disk"), ("path", "/"), ("pool", a.pool.as_str())]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        match incus.profile(&a.profile).await? {
            None => {
                let p = incusctl::Profile {
                    name: a.profile.clone(),
                    description: "sandboxd: sandboxes' network and root disk".to_string(),
                    devices: [("eth0".to_string(), eth0), ("root".to_string(), root)]
                        .into_iter()
                        .collect(),
                    ..Default::default()
                };
                incus.create_profile(&p).await?;
                Ok(Outcome::Done(format!(
                    "created profile {} (eth0 on {}, root on {})",
                    a.profile, a.bridge, a.pool
                )))
            }
            Some(mut p) => {
                let mut added = Vec::new();
                if !p.devices.contains_key("eth0") {
                    p.devices.insert("eth0".into(), eth0);
                    added.push(format!("eth0 on {}", a.bridge));
                }
                if !p.devices.contains_key("root") {
                    p.devices.insert("root".into(), root);
                    added.push(format!("root on {}", a.pool));
                }
                if added.is_empty() {
                    let on = |dev: &str, key: &str| {
                        p.devices
                            .get(dev)
                            .and_then(|d| d.get(key))
                            .cloned()
                            .unwrap_or_default()
                    };
                    return Ok(Outcome::Ok(format!(
                        "profile {} has eth0 (on {}) and root (on {})",
                        a.profile,
                        on("eth0", "network"),
                        on("root", "pool")
                    )));
                }
                incus.update_profile(&p).await?;
                Ok(Outcome::Done(format!(
                    "profile {}: added {}",
                    a.profile,
                    added.join(", ")
                )))
            }
        }
    }
}
