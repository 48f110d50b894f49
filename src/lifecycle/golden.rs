//! Provisioning inside the lifecycle: which steps a new sandbox gets (the
//! `provision` and `baseline` steps of `create`), golden images (`image
//! build`: provision one container, publish it, delete it) and
//! `update-agent`.
//!
//! Invariants:
//! - a golden image carries the property `sandboxd.golden=true`; `create`
//!   in `auto` mode runs only the per-sandbox steps on such an image and
//!   everything on any other;
//! - secrets (the LLM key) come from the request or from a host file read
//!   at the moment of use; they are handed to [`crate::provision`], which
//!   writes them with the Incus file API, and are never logged;
//! - an image build never leaves its builder container behind, and moves
//!   the alias only once the new image exists.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use crate::config::ProvisionMode;
use crate::provision::{self, Agent, AgentKind, ApiKey, Llm, LlmSettings, Phase, Provider};

use super::{image_source, random_id, Lifecycle, LifecycleError, Progress, Result};
use crate::api::incus::{ImageBuild, ImageView, LlmKey, StepOutcome};

/// Image property that marks a golden image.
pub const GOLDEN_PROPERTY: &str = "sandboxd.golden";
/// Snapshot taken once a new sandbox is provisioned.
pub const BASELINE_SNAPSHOT: &str = "clean-baseline";
/// Instance config key marking an image builder.
const BUILDER_KEY: &str = "user.sandboxd.image-build";

/// Run in a builder before it is published: every clone must make its own
/// machine id and SSH host keys, and nothing of the build's caches stays.
const SEAL_SCRIPT: &str = include_str!("../../provision/image-seal.sh");
/// The boot unit that makes missing SSH host keys (also in the base image).
const HOSTKEYS_UNIT: &str = include_str!("../../provision/units/sandboxd-ssh-hostkeys.service");
const HOSTKEYS_UNIT_PATH: &str = "/etc/systemd/system/sandboxd-ssh-hostkeys.service";

/// What the caller of `create` adds to the daemon's provisioning settings.
#[derive(Debug, Clone, Default)]
pub struct Extras {
    pub llm: Option<LlmKey>,
    pub hook: Option<String>,
}

fn provider_of(name: &str) -> Result<Provider> {
    serde_json::from_value(serde_json::Value::String(name.to_string()))
        .map_err(|_| LifecycleError::Invalid(format!("unknown LLM provider {name:?}")))
}

/// Reads a host file that holds a secret, refusing one that others may read.
fn read_private(path: &std::path::Path, what: &str) -> Result<String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path)
        .map_err(|e| LifecycleError::Invalid(format!("{what} {}: {e}", path.display())))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(LifecycleError::Invalid(format!(
            "{what} {} is readable by other users: chmod 600 it",
            path.display()
        )));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| LifecycleError::Invalid(format!("{what} {}: {e}", path.display())))?;
    Ok(text.trim().to_string())
}

impl Lifecycle {
    /// The provisioning plan of one sandbox (or a builder, with no user).
    pub(crate) fn plan_for(
        &self,
        phase: Phase,
        user: Option<&str>,
        agent_port: u16,
        extras: &Extras,
    ) -> Result<provision::Plan> {
        let cfg = &self.provision;
        let kind = match cfg.agent.as_str() {
            "none" => AgentKind::None,
            "command" => AgentKind::Command {
                command: cfg.agent_command.clone().unwrap_or_default(),
                install: match &cfg.agent_install {
                    Some(path) => Some(std::fs::read(path).map_err(|e| {
                        LifecycleError::Invalid(format!(
                            "provision.agent_install {}: {e}",
                            path.display()
                        ))
                    })?),
                    None => None,
                },
            },
            _ => AgentKind::default(),
        };
        let llm = match (&extras.llm, &cfg.llm_provider, &cfg.llm_key_file) {
            (Some(k), _, _) => Some(Llm::new(
                LlmSettings {
                    provider: provider_of(&k.provider)?,
                    base_url: k.base_url.clone(),
                },
                ApiKey::new(k.key.clone()),
            )),
            (None, Some(provider), Some(file)) => Some(Llm::new(
                LlmSettings {
                    provider: provider_of(provider)?,
                    base_url: cfg.llm_base_url.clone(),
                },
                ApiKey::new(read_private(file, "provision.llm_key_file")?),
            )),
            _ => None,
        };
        let hook = match (&extras.hook, &cfg.hook) {
            (Some(text), _) => Some(text.clone().into_bytes()),
            (None, Some(path)) => Some(std::fs::read(path).map_err(|e| {
                LifecycleError::Invalid(format!("provision.hook {}: {e}", path.display()))
            })?),
            _ => None,
        };
        Ok(provision::Plan {
            phase,
            user: user.map(str::to_string),
            packages: if cfg.packages == "upstream" {
                provision::Packages::Upstream
            } else {
                provision::Packages::Distro
            },
            upstream: Default::default(),
            apt_proxy: cfg.apt_proxy.clone(),
            agent: Agent {
                kind,
                port: agent_port,
            },
            llm,
            hook,
        })
    }

    /// Which phase `create` runs for `mode` on `image`; `None` for none.
    pub(crate) async fn phase_for(
        &self,
        mode: ProvisionMode,
        image: &str,
    ) -> Result<Option<Phase>> {
        Ok(match mode {
            ProvisionMode::None => None,
            ProvisionMode::Full => Some(Phase::All),
            ProvisionMode::Sandbox => Some(Phase::Sandbox),
            ProvisionMode::Auto => {
                if self.is_golden(image).await? {
                    Some(Phase::Sandbox)
                } else {
                    Some(Phase::All)
                }
            }
        })
    }

    /// Whether `image` is a local alias of a golden image.
    async fn is_golden(&self, image: &str) -> Result<bool> {
        let incusctl::ImageSource::LocalAlias(alias) = image_source(image)? else {
            return Ok(false);
        };
        let target = self.incus.image_alias(&alias).await?.target;
        let img = self.incus.image(&target).await?;
        Ok(img.properties.get(GOLDEN_PROPERTY).map(String::as_str) == Some("true"))
    }

    /// Runs a provisioning plan in `instance`, reporting each step.
    pub(crate) async fn run_plan(
        &self,
        instance: &str,
        plan: &provision::Plan,
        progress: &Progress,
    ) -> Result<Vec<provision::StepReport>> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let forward = {
            let progress = progress.clone();
            tokio::spawn(async move {
                while let Some(line) = rx.recv().await {
                    progress.message(line).await;
                }
            })
        };
        let outcome = provision::run(&self.incus, instance, plan, |r| {
            let _ = tx.send(format!(
                "{}: {} ({}, {:.1} s)",
                r.step,
                if r.changed { "changed" } else { "unchanged" },
                r.detail,
                r.elapsed.as_secs_f64()
            ));
        })
        .await;
        drop(tx);
        let _ = forward.await;
        outcome.map_err(|e| LifecycleError::Invalid(e.to_string()))
    }

    /// `sandboxd image build`: a builder container from `base`, the image
    /// phase of provisioning, sealed, stopped and published under `alias`.
    pub async fn build_image(
        self: &Arc<Self>,
        req: ImageBuild,
        progress: Progress,
    ) -> Result<ImageView> {
        let started = Instant::now();
        let base = req.base.unwrap_or_else(|| self.default_image.clone());
        let alias = req
            .alias
            .unwrap_or_else(|| self.provision.golden_alias.clone());
        if alias.trim().is_empty() || alias.contains(char::is_whitespace) {
            return Err(LifecycleError::Invalid(format!(
                "image alias {alias:?} must be non-empty and without spaces"
            )));
        }
        let source = image_source(&base)?;
        let plan = self.plan_for(
            Phase::Image,
            None,
            store::DEFAULT_AGENT_PORT,
            &Extras::default(),
        )?;
        self.incus.server_info().await?;
        if let incusctl::ImageSource::LocalAlias(a) = &source {
            self.incus.image_alias(a).await?;
        }
        let builder = format!("sandboxd-image-{}", &random_id()[..10]);
        progress.step("builder", 1, 4).await;
        progress
            .message(format!("container {builder} from {base}"))
            .await;
        let outcome = self
            .build_in(&builder, &base, source, &alias, &plan, &progress)
            .await;
        if let Err(e) = self.incus.delete_instance(&builder, true).await {
            if !e.is_not_found() {
                tracing::warn!(%builder, error = %e, "cannot delete the image builder");
            }
        }
        let (fingerprint, size) = outcome?;
        tracing::info!(%alias, %fingerprint, elapsed = ?started.elapsed(), "golden image published");
        Ok(ImageView {
            alias,
            fingerprint,
            base,
            size_bytes: size,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    async fn build_in(
        &self,
        builder: &str,
        base: &str,
        source: incusctl::ImageSource,
        alias: &str,
        plan: &provision::Plan,
        progress: &Progress,
    ) -> Result<(String, i64)> {
        let req = incusctl::CreateInstance::new(builder, source)
            .docker_ready()
            .config(BUILDER_KEY, "true")
            .description(format!("sandboxd image builder for {alias}"))
            .start(true);
        self.incus.create_instance(&req).await?;
        self.incus
            .wait_for_ipv4(builder, super::ADDRESS_TIMEOUT)
            .await?;
        self.wait_booted(builder, progress).await?;

        progress.step("provision", 2, 4).await;
        self.run_plan(builder, plan, progress).await?;

        progress.step("seal", 3, 4).await;
        self.incus
            .push_file(
                builder,
                HOSTKEYS_UNIT_PATH,
                HOSTKEYS_UNIT.as_bytes().to_vec(),
                &incusctl::PushOptions::mode(0o644).owner(0, 0),
            )
            .await?;
        let sealed = self
            .incus
            .exec(
                builder,
                &incusctl::ExecRequest::new(["bash", "-c", SEAL_SCRIPT, "image-seal"]),
            )
            .await?;
        if !sealed.success() {
            return Err(LifecycleError::Invalid(format!(
                "sealing the image failed (exit {}): {}",
                sealed.exit_code,
                sealed.stderr_text().trim()
            )));
        }
        self.incus.stop_or_kill(builder, super::STOP_GRACE).await?;

        progress.step("publish", 4, 4).await;
        let old = match self.incus.image_alias(alias).await {
            Ok(a) => Some(a.target),
            Err(e) if e.is_not_found() => None,
            Err(e) => return Err(e.into()),
        };
        let mut props = BTreeMap::new();
        props.insert(GOLDEN_PROPERTY.to_string(), "true".to_string());
        props.insert("sandboxd.base".to_string(), base.to_string());
        props.insert(
            "description".to_string(),
            format!("sandboxd golden image from {base}"),
        );
        if let incusctl::ImageSource::LocalAlias(a) = image_source(base)? {
            if let Ok(b) = self.incus.image_alias(&a).await {
                if let Ok(img) = self.incus.image(&b.target).await {
                    for key in ["os", "release", "architecture"] {
                        if let Some(v) = img.properties.get(key) {
                            props.insert(key.to_string(), v.clone());
                        }
                    }
                }
            }
        }
        let compression = if std::path::Path::new("/usr/bin/zstd").exists() {
            "zstd"
        } else {
            "gzip"
        };
        let fingerprint = self
            .incus
            .publish_instance(builder, Some(alias), &props, compression)
            .await?;
        if let Some(old) = old.filter(|o| *o != fingerprint) {
            if let Err(e) = self.incus.delete_image(&old).await {
                tracing::warn!(image = %old, error = %e, "cannot delete the previous golden image");
            }
        }
        let size = self.incus.image(&fingerprint).await?.size;
        Ok((fingerprint, size))
    }

    /// Waits for systemd in `instance` to finish booting.
    pub(crate) async fn wait_booted(&self, instance: &str, progress: &Progress) -> Result<()> {
        let out = self
            .incus
            .exec(
                instance,
                &incusctl::ExecRequest::new(["systemctl", "is-system-running", "--wait"])
                    .timeout(super::READY_TIMEOUT)
                    .max_output(super::MAX_SMALL_OUTPUT),
            )
            .await?;
        let state = out.stdout_text().trim().to_string();
        match state.as_str() {
            "running" | "degraded" => Ok(()),
            _ if out.exit_code == incusctl::EXIT_COMMAND_NOT_FOUND => {
                progress
                    .message("no systemd in the container; not waiting for boot")
                    .await;
                Ok(())
            }
            _ => Err(LifecycleError::Invalid(format!(
                "the container did not finish booting: systemd is {state:?}"
            ))),
        }
    }

    /// `sandboxd update-agent NAME`: reinstalls the agent in place and
    /// restarts its unit.
    pub async fn update_agent(
        self: &Arc<Self>,
        name: &str,
        progress: Progress,
    ) -> Result<StepOutcome> {
        let _claim = self.claim(name)?;
        let (sb, inst) = self.get_incus(name).await?;
        if !matches!(sb.status, store::SandboxStatus::Running) {
            return Err(LifecycleError::WrongState {
                name: name.to_string(),
                state: super::state_name(&sb.status),
                hint: "start it first",
            });
        }
        let plan = self.plan_for(
            Phase::Sandbox,
            Some(&sb.user),
            sb.agent_port,
            &Extras::default(),
        )?;
        progress.step("agent", 1, 1).await;
        let t = Instant::now();
        let report = provision::update_agent(&self.incus, &inst, &plan)
            .await
            .map_err(|e| LifecycleError::Invalid(e.to_string()))?;
        tracing::info!(sandbox = %name, changed = report.changed, elapsed = ?t.elapsed(), "agent updated");
        Ok(StepOutcome {
            step: report.step.to_string(),
            changed: report.changed,
            detail: report.detail,
        })
    }

    /// Takes the `clean-baseline` snapshot unless it exists.
    pub(crate) async fn baseline(&self, instance: &str, progress: &Progress) -> Result<()> {
        let snaps = self.incus.list_snapshots(instance).await?;
        if snaps.iter().any(|s| s.name == BASELINE_SNAPSHOT) {
            progress.message("clean-baseline exists already").await;
            return Ok(());
        }
        let t = Instant::now();
        self.incus
            .create_snapshot(instance, BASELINE_SNAPSHOT)
            .await?;
        progress
            .message(format!(
                "snapshot {BASELINE_SNAPSHOT} in {:.1} s",
                t.elapsed().as_secs_f64()
            ))
            .await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_key_file_others_may_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("llm.key");
        std::fs::write(&path, "sk-test-value\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = read_private(&path, "provision.llm_key_file").unwrap_err();
        assert!(err.to_string().contains("chmod 600"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            read_private(&path, "provision.llm_key_file").unwrap(),
            "sk-test-value"
        );
    }
}
