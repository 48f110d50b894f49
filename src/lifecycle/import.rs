//! `sandboxd import`: adopting an untracked Incus instance as a sandbox,
//! and the list of instances no sandbox manages.

use std::collections::HashSet;
use std::sync::Arc;

use super::pipeline::{Pipeline, Plan};
use super::record::{egress_of, Settings};
use super::{golden, incus_instance, random_id, Lifecycle, LifecycleError, Meta, Progress, Result};
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
        let (_claim, resume) = self
            .begin(
                Pipeline::Import,
                &name,
                golden::Extras::default(),
                &progress,
            )
            .await?;
        if let Some(plan) = resume {
            return self.provision(plan, progress).await;
        }
        let instance = self.incus.instance(&name).await?;
        if instance.kind != "container" {
            return Err(LifecycleError::Invalid(format!(
                "instance {name} is a {}; sandboxd manages containers",
                instance.kind
            )));
        }
        let settings = Settings::of(&req)?;
        let record = self.new_record(&name, settings, egress).await?;
        let meta = Meta {
            id: random_id(),
            image: None,
            cpu: None,
            memory: None,
            disk: None,
            provision: None,
            gateway_key_only: true,
        };
        self.keep_record(record, &meta, &progress).await?;
        tracing::info!(sandbox = %name, "adopting instance");
        let plan = Plan::new(Pipeline::Import, &name, meta, golden::Extras::default());
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
