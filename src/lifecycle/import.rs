//! `sandboxd import`: adopting an untracked Incus instance as a sandbox,
//! and the list of instances no sandbox manages.

use std::collections::HashSet;
use std::sync::Arc;

use store::SandboxStatus;

use super::create::{egress_of, Tls};
use super::pipeline::{Pipeline, Plan};
use super::{
    access, golden, incus_instance, random_id, Lifecycle, LifecycleError, Meta, Progress, Result,
    DEFAULT_USER, META_COLLECTION,
};
use crate::api::incus::{ImportSandbox, UnmanagedInstance};
use crate::api::SandboxView;

impl Lifecycle {
    /// `sandboxd import INSTANCE --domain ...`: adopts an untracked
    /// instance (installs the gateway key, pins the host key).
    pub async fn import(
        self: &Arc<Self>,
        req: ImportSandbox,
        progress: Progress,
    ) -> Result<SandboxView> {
        let name = req.instance.clone();
        store::validate_name(&name).map_err(|e| {
            LifecycleError::Invalid(format!(
                "instance {name:?} cannot be a sandbox name (the SSH user name): {e}"
            ))
        })?;
        let egress = egress_of(req.egress.as_ref())?;
        let _claim = self.claim(&name)?;
        self.incus.server_info().await?;
        if let Some(existing) = self.get(&name).await? {
            let meta = self.meta(&name).await?;
            let resumable = matches!(
                existing.status,
                SandboxStatus::Creating { .. } | SandboxStatus::Failed { .. }
            );
            return match (resumable, meta) {
                (true, Some(meta)) if meta.image.is_none() => {
                    progress
                        .message(format!("resuming the import of {name}"))
                        .await;
                    let plan = Plan {
                        name: name.clone(),
                        instance: name,
                        meta,
                        pipeline: Pipeline::Import,
                        extras: golden::Extras::default(),
                    };
                    self.provision(plan, progress).await
                }
                _ => Err(store::Error::NameTaken(name).into()),
            };
        }
        let instance = self.incus.instance(&name).await?;
        if instance.kind != "container" {
            return Err(LifecycleError::Invalid(format!(
                "instance {name} is a {}; sandboxd manages containers",
                instance.kind
            )));
        }
        let domain = req.domain.trim().to_ascii_lowercase();
        store::validate_domain(&domain)?;
        let user = req.user.clone().unwrap_or_else(|| DEFAULT_USER.to_string());
        store::validate_user(&user)?;
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
        let meta = Meta {
            id: random_id(),
            image: None,
            cpu: None,
            memory: None,
            disk: None,
            provision: None,
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
        tracing::info!(sandbox = %name, "adopting instance");
        let plan = Plan {
            name: name.clone(),
            instance: name,
            meta,
            pipeline: Pipeline::Import,
            extras: golden::Extras::default(),
        };
        self.provision(plan, progress).await
    }

    /// Instances no sandbox manages.
    pub async fn unmanaged(&self) -> Result<Vec<UnmanagedInstance>> {
        let all = self.incus.list_instances_brief().await?;
        let managed: HashSet<String> = self
            .blocking(|s| s.list())
            .await?
            .iter()
            .filter_map(|sb| incus_instance(sb).map(str::to_string))
            .collect();
        let mut out: Vec<UnmanagedInstance> = all
            .into_iter()
            .filter(|i| !managed.contains(&i.name))
            .map(|i| UnmanagedInstance {
                name: i.name,
                status: i.status,
                kind: i.kind,
                created_at: i.created_at,
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }
}
