//! `sandboxd create`: a new sandbox in a new container. The checks of
//! the request (nothing stored when one fails), the record (shared with
//! import, `record.rs`), then the create pipeline.

use std::sync::Arc;

use super::pipeline::{Pipeline, Plan};
use super::record::{egress_of, Settings};
use super::{golden, image_source, random_id, Lifecycle, LifecycleError, Meta, Progress, Result};
use crate::api::incus::CreateSandbox;
use crate::api::SandboxView;

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
        let mode = req.provision;
        let extras = golden::Extras {
            llm: req.llm.clone(),
            hook: req.hook.clone(),
        };
        let egress = egress_of(req.egress.as_ref())?;
        let (_claim, resume) = self
            .begin(Pipeline::Create, &name, extras.clone(), &progress)
            .await?;
        if let Some(plan) = resume {
            return self.provision(plan, progress).await;
        }

        let settings = Settings::of(&req)?;
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
        let record = self.new_record(&name, settings, egress).await?;
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
        self.keep_record(record, &meta, &progress).await?;
        tracing::info!(sandbox = %name, "sandbox recorded; creating its container");
        let plan = Plan::new(Pipeline::Create, &name, meta, extras);
        self.provision(plan, progress).await
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
