//! `sandboxd create`: preflight, the new record, then the pipeline; and
//! the record-building shared with import.

use std::sync::Arc;

use store::{Backend, Sandbox, SandboxStatus};

use super::pipeline::{Pipeline, Plan};
use super::{
    access, golden, image_source, incus_instance, random_id, state_name, Lifecycle, LifecycleError,
    Meta, Progress, Result, DEFAULT_USER, META_COLLECTION,
};
use crate::api::incus::{self as wire, CreateSandbox};
use crate::api::SandboxView;
use crate::config::ProvisionMode;

/// A new sandbox's certificate settings as the request gave them; checked
/// with `add`'s rules by [`crate::sandbox::new_sandbox`].
#[derive(Debug, Default)]
pub(super) struct Tls {
    pub(super) mode: Option<store::TlsMode>,
    pub(super) cert_file: Option<String>,
    pub(super) key_file: Option<String>,
}

impl Lifecycle {
    /// `sandboxd create`: preflight (nothing stored on failure), record,
    /// then the provisioning steps. Running it again for a sandbox that
    /// failed or was interrupted resumes it with the settings recorded by
    /// the first run (domain, image, limits, auth, TLS mode and files): the
    /// request's own are not read then.
    pub async fn create(
        self: &Arc<Self>,
        req: CreateSandbox,
        progress: Progress,
    ) -> Result<SandboxView> {
        store::validate_name(&req.name)?;
        let name = req.name.clone();
        let mode = match &req.provision {
            Some(m) => Some(
                m.parse::<ProvisionMode>()
                    .map_err(LifecycleError::Invalid)?,
            ),
            None => None,
        };
        let extras = golden::Extras {
            llm: req.llm.clone(),
            hook: req.hook.clone(),
        };
        let egress = egress_of(req.egress.as_ref())?;
        let _claim = self.claim(&name)?;
        // Incus must answer before anything is stored.
        self.incus.server_info().await?;

        if let Some(existing) = self.get(&name).await? {
            let meta = self.meta(&name).await?;
            let resumable = matches!(
                existing.status,
                SandboxStatus::Creating { .. } | SandboxStatus::Failed { .. }
            ) && incus_instance(&existing) == Some(name.as_str());
            return match (resumable, meta) {
                (true, Some(meta)) if meta.image.is_some() => {
                    progress
                        .message(format!(
                            "resuming the creation of {name} (was {}); the stored settings apply",
                            state_name(&existing.status)
                        ))
                        .await;
                    let plan = Plan {
                        name: name.clone(),
                        instance: name.clone(),
                        meta,
                        pipeline: Pipeline::Create,
                        extras,
                    };
                    self.provision(plan, progress).await
                }
                _ => Err(store::Error::NameTaken(name).into()),
            };
        }

        let domain = req.domain.trim().to_ascii_lowercase();
        store::validate_domain(&domain)?;
        let user = req.user.clone().unwrap_or_else(|| DEFAULT_USER.to_string());
        store::validate_user(&user)?;
        let image = req
            .image
            .clone()
            .unwrap_or_else(|| self.default_image.clone());
        let source = image_source(&image)?;
        if let Some(size) = &req.memory {
            check_size("memory", size)?;
        }
        if let Some(size) = &req.disk {
            check_size("disk", size)?;
        }
        if req.cpu == Some(0) {
            return Err(LifecycleError::Invalid("--cpu must be at least 1".into()));
        }
        let generated = req.auth.is_none().then(access::generated_login);
        let mut sandbox = self
            .new_record(
                &name,
                &domain,
                &user,
                &req.ssh_keys,
                req.app_port,
                req.auth.clone().or_else(|| generated.clone()),
                Tls {
                    mode: req.tls_mode,
                    cert_file: req.tls_cert_file.clone(),
                    key_file: req.tls_key_file.clone(),
                },
            )
            .await?;
        sandbox.egress = egress;
        if self.incus.instance_exists(&name).await? {
            return Err(LifecycleError::Untracked(name));
        }
        if let incusctl::ImageSource::LocalAlias(alias) = &source {
            self.incus.image_alias(alias).await?;
        }

        let meta = Meta {
            id: random_id(),
            image: Some(image),
            cpu: req.cpu,
            memory: req.memory.clone(),
            disk: req.disk.clone(),
            provision: mode,
            gateway_key_only: true,
        };
        self.put_meta(&name, &meta).await?;
        if let Err(e) = self
            .write(move |s| s.insert(sandbox).map(|seq| ((), seq)))
            .await
        {
            let n = name.clone();
            let _ = self
                .blocking(move |s| s.delete_record(META_COLLECTION, &n))
                .await;
            return Err(e);
        }
        progress.login(generated).await;
        tracing::info!(sandbox = %name, "sandbox recorded; creating its container");
        let plan = Plan {
            name: name.clone(),
            instance: name,
            meta,
            pipeline: Pipeline::Create,
            extras,
        };
        self.provision(plan, progress).await
    }

    /// A new record in state `Creating`, not stored yet.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn new_record(
        &self,
        name: &str,
        domain: &str,
        user: &str,
        ssh_keys: &[String],
        app_port: Option<u16>,
        auth: Option<crate::api::SetAuth>,
        tls: Tls,
    ) -> Result<Sandbox> {
        let sandbox = crate::sandbox::new_sandbox(crate::sandbox::NewSandbox {
            name: name.to_string(),
            domain: domain.to_string(),
            backend: Backend::Incus {
                instance: name.to_string(),
            },
            ssh_port: store::DEFAULT_SSH_PORT,
            app_port: app_port.unwrap_or(store::DEFAULT_APP_PORT),
            agent_port: store::DEFAULT_AGENT_PORT,
            agent_prefix: store::DEFAULT_AGENT_PREFIX.to_string(),
            user: user.to_string(),
            ssh_keys: ssh_keys.to_vec(),
            upstream_host_key: None,
            auth,
            tls_mode: tls.mode,
            tls_cert_file: tls.cert_file,
            tls_key_file: tls.key_file,
            status: SandboxStatus::Creating {
                step: "record".into(),
            },
            tls_policy: self.tls_policy.clone(),
        })
        .await?;
        // Shape problems (domain taken is checked by the insert itself).
        sandbox.validate()?;
        if let Some(owner) = {
            let d = domain.to_string();
            self.blocking(move |s| s.owner_of_host(&d)).await?
        } {
            return Err(store::Error::HostTaken {
                host: domain.to_string(),
                owner,
            }
            .into());
        }
        Ok(sandbox)
    }
}

/// The requested egress policy, `restricted` when none is given.
pub(super) fn egress_of(req: Option<&wire::SetEgress>) -> Result<store::Egress> {
    match req {
        Some(e) => e.to_egress().map_err(LifecycleError::Invalid),
        None => Ok(store::Egress::default()),
    }
}

fn check_size(what: &str, size: &str) -> Result<()> {
    let digits: String = size.chars().take_while(char::is_ascii_digit).collect();
    let unit = &size[digits.len()..];
    let ok_unit = [
        "", "B", "kB", "MB", "GB", "TB", "KiB", "MiB", "GiB", "TiB", "%",
    ]
    .contains(&unit);
    if digits.is_empty() || !ok_unit || (unit == "%" && what == "disk") {
        return Err(LifecycleError::Invalid(format!(
            "--{what} {size:?}: write a size like 512MiB, 2GiB or 10GB"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn sizes() {
        assert!(check_size("memory", "512MiB").is_ok());
        assert!(check_size("memory", "50%").is_ok());
        assert!(check_size("disk", "10GiB").is_ok());
        assert!(check_size("disk", "50%").is_err());
        assert!(check_size("memory", "lots").is_err());
    }
}
