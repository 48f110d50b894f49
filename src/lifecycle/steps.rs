//! What each [`Step`] of the pipelines does (the order and the recording
//! around them are in `pipeline.rs`). Every step is idempotent: a resumed
//! pipeline runs them all again.

use std::collections::HashSet;
use std::time::Duration;

use store::{Sandbox, SandboxStatus};
use tokio::sync::mpsc;

use super::pipeline::Step;
use super::pipeline::{Plan, StepState};
use super::{
    access, addresses_of, image_source, network, Lifecycle, LifecycleError, Progress, Result,
    HOST_KEY_PATH, HOST_KEY_TIMEOUT, ID_KEY, MAX_HOST_KEY_FILE, MAX_SMALL_OUTPUT, STOP_GRACE,
};
use crate::config::ProvisionMode;

impl Lifecycle {
    /// Runs one step of `plan`.
    pub(super) async fn run_step(
        &self,
        step: Step,
        plan: &Plan,
        ctx: &mut StepState,
        progress: &Progress,
    ) -> Result<()> {
        match step {
            Step::Create => self.step_create(plan, progress).await,
            Step::Adopt => self.step_adopt(plan, progress).await,
            Step::Start => Ok(self.incus.start(&plan.instance).await?),
            Step::Address => self.step_address(plan, progress).await,
            Step::Ready => self.wait_booted(&plan.instance, progress).await,
            Step::Provision => self.step_provision(plan, progress).await,
            Step::User => self.step_user(plan, ctx).await,
            Step::Keys => self.step_keys(plan, ctx).await,
            Step::HostKey => self.step_host_key(plan).await,
            Step::Baseline => self.step_baseline(plan, progress).await,
            Step::Live => self.step_live(plan).await,
        }
    }

    /// [`Step::Adopt`].
    pub(super) async fn step_adopt(&self, plan: &Plan, progress: &Progress) -> Result<()> {
        let inst = plan.instance.as_str();
        let i = self.incus.instance(inst).await?;
        match i.config.get(ID_KEY) {
            Some(id) if *id != plan.meta.id => Err(LifecycleError::Untracked(format!(
                "{inst} (it carries another sandboxd id)"
            ))),
            _ => {
                let mut cfg = std::collections::BTreeMap::new();
                cfg.insert(ID_KEY.to_string(), plan.meta.id.clone());
                self.incus.update_config(inst, &cfg).await?;
                let (ip, restart) = self.isolate_instance(&plan.name, inst).await?;
                progress.message(format!("fixed address {ip}")).await;
                if restart {
                    progress
                        .message(format!(
                            "restarting {inst} so that it takes its fixed address"
                        ))
                        .await;
                    self.incus
                        .restart(inst, incusctl::StopOptions::graceful(STOP_GRACE))
                        .await?;
                }
                Ok(())
            }
        }
    }

    /// [`Step::Address`].
    pub(super) async fn step_address(&self, plan: &Plan, progress: &Progress) -> Result<()> {
        let ip = self.wait_address(&plan.name, &plan.instance).await?;
        progress.message(format!("address {ip}")).await;
        Ok(())
    }

    /// [`Step::Provision`].
    pub(super) async fn step_provision(&self, plan: &Plan, progress: &Progress) -> Result<()> {
        let mode = plan.meta.provision.unwrap_or(self.provision.mode);
        let image = plan.meta.image.clone().unwrap_or_default();
        let Some(phase) = self.phase_for(mode, &image).await? else {
            progress.message("provisioning: none asked").await;
            return Ok(());
        };
        let sb = self.require(&plan.name).await?;
        let p = self.plan_for(phase, Some(&sb.user), sb.agent_port, &plan.extras)?;
        progress
            .message(format!(
                "provisioning: {} steps",
                match phase {
                    crate::provision::Phase::Sandbox => "per-sandbox",
                    _ => "all",
                }
            ))
            .await;
        self.run_plan(&plan.instance, &p, progress).await?;
        Ok(())
    }

    /// [`Step::Baseline`].
    pub(super) async fn step_baseline(&self, plan: &Plan, progress: &Progress) -> Result<()> {
        let mode = plan.meta.provision.unwrap_or(self.provision.mode);
        if mode == ProvisionMode::None {
            return Ok(());
        }
        self.baseline(&plan.instance, progress).await
    }

    /// [`Step::User`]: learns the user's uid, gid and home for
    /// [`Step::Keys`].
    pub(super) async fn step_user(&self, plan: &Plan, ctx: &mut StepState) -> Result<()> {
        let sb = self.require(&plan.name).await?;
        // A validated login name: safe inside the script.
        let script = access::account_script(&sb.user, true);
        let out = self
            .incus
            .exec_ok(
                &plan.instance,
                &incusctl::ExecRequest::shell(script).max_output(MAX_SMALL_OUTPUT),
            )
            .await?;
        ctx.user = Some(access::parse_account(&sb.user, &out.stdout_text())?);
        Ok(())
    }

    /// [`Step::Keys`].
    pub(super) async fn step_keys(&self, plan: &Plan, ctx: &StepState) -> Result<()> {
        let sb = self.require(&plan.name).await?;
        let Some((uid, gid, home)) = ctx.user.clone() else {
            return Err(LifecycleError::Internal("user step skipped".into()));
        };
        // Only the gateway's key: client keys stay in the gateway.
        self.write_authorized_keys(&plan.instance, &sb, (uid, gid, &home))
            .await
    }

    /// [`Step::HostKey`].
    pub(super) async fn step_host_key(&self, plan: &Plan) -> Result<()> {
        let f = self
            .incus
            .pull_file_when_ready(
                &plan.instance,
                HOST_KEY_PATH,
                MAX_HOST_KEY_FILE,
                Duration::from_millis(200),
                HOST_KEY_TIMEOUT,
            )
            .await?;
        let text = String::from_utf8_lossy(&f.data).to_string();
        let key = crate::keys::parse_public(&text)
            .map_err(|e| LifecycleError::Invalid(format!("host key {HOST_KEY_PATH}: {e}")))?;
        let line = crate::keys::to_line(&key);
        let n = plan.name.clone();
        self.write(move |s| {
            s.update(&n, |sb| {
                sb.upstream_host_key = Some(line.clone());
                Ok(())
            })
        })
        .await?;
        Ok(())
    }

    /// [`Step::Live`]: the only step that makes a sandbox routable.
    pub(super) async fn step_live(&self, plan: &Plan) -> Result<()> {
        let st = self.incus.instance_state(&plan.instance).await?;
        let addrs = addresses_of(&st);
        let sb = self.require(&plan.name).await?;
        let assigned = sb.assigned_ipv4.clone().unwrap_or_default();
        if !addrs.contains(&assigned) {
            return Err(LifecycleError::Invalid(format!(
                "the container does not carry its fixed address {assigned:?}"
            )));
        }
        self.set_status(&plan.name, SandboxStatus::Running, Some(addrs))
            .await?;
        Ok(())
    }

    /// [`Step::Create`].
    pub(super) async fn step_create(&self, plan: &Plan, progress: &Progress) -> Result<()> {
        let inst = plan.instance.as_str();
        match self.incus.instance(inst).await {
            Ok(i) => {
                if i.config.get(ID_KEY) != Some(&plan.meta.id) {
                    return Err(LifecycleError::Untracked(inst.to_string()));
                }
                if i.status != "Error" {
                    progress
                        .message(format!("container {inst} exists already ({})", i.status))
                        .await;
                    return Ok(());
                }
                progress
                    .message(format!("container {inst} is broken; making it again"))
                    .await;
                self.incus.delete_instance(inst, true).await?;
            }
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
        // The address and egress policy exist before the container does, so
        // that its first DHCP lease is its fixed address and its first
        // packet is filtered. Incus refuses, when the container starts, an
        // address another NIC has (a daemon with another store on the same
        // bridge took it meanwhile): then again with another address.
        let (bridge, base) = self.bridge_of(None).await?;
        let mut refused = HashSet::new();
        for attempt in 1..=3 {
            let ip = self
                .assign_address(&plan.name, inst, &bridge, None, &refused)
                .await?;
            let sb = self.require(&plan.name).await?;
            self.apply_egress(&sb, &bridge).await?;
            progress
                .message(format!(
                    "fixed address {ip} on {}, egress {}",
                    bridge.name,
                    sb.egress.mode.as_str()
                ))
                .await;
            match self
                .create_container(plan, &sb, &base, &bridge, ip, progress)
                .await
            {
                Err(LifecycleError::Incus(e))
                    if attempt < 3 && e.to_string().contains("already defined on another NIC") =>
                {
                    progress
                        .message(format!("{ip} is taken on {}; another address", bridge.name))
                        .await;
                    refused.insert(ip);
                    match self.incus.delete_instance(inst, true).await {
                        Ok(()) => {}
                        Err(e) if e.is_not_found() => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                other => return other,
            }
        }
        Err(LifecycleError::Internal("no address could be used".into()))
    }

    async fn create_container(
        &self,
        plan: &Plan,
        sb: &Sandbox,
        base: &std::collections::BTreeMap<String, String>,
        bridge: &network::Bridge,
        ip: std::net::Ipv4Addr,
        progress: &Progress,
    ) -> Result<()> {
        let inst = plan.instance.as_str();
        let image = plan.meta.image.clone().unwrap_or_default();
        let mut req = incusctl::CreateInstance::new(inst, image_source(&image)?)
            .device("eth0", network::nic_device(base, bridge, ip))
            .docker_ready()
            .config(ID_KEY, plan.meta.id.clone())
            .config("user.sandboxd.domain", sb.domain.clone())
            .description(format!("sandboxd sandbox {}", sb.name))
            // Started by the same operation; the `start` step is then a no-op.
            .start(true);
        if let Some(cpu) = plan.meta.cpu {
            req = req.limits_cpu(cpu);
        }
        if let Some(m) = &plan.meta.memory {
            req = req.limits_memory(m.clone());
        }
        if let Some(d) = &plan.meta.disk {
            req = req.root_disk("default", Some(d));
        }
        let (tx, mut rx) = mpsc::channel::<incusctl::Progress>(32);
        let forward = {
            let progress = progress.clone();
            tokio::spawn(async move {
                let mut last = String::new();
                while let Some(p) = rx.recv().await {
                    if p.text != last {
                        progress.message(p.text.clone()).await;
                        last = p.text;
                    }
                }
            })
        };
        let created = self.incus.create_instance_with_progress(&req, tx).await;
        let _ = forward.await;
        created?;
        Ok(())
    }
}
