//! Operations on a settled sandbox: start, stop, restart, delete, and
//! the change of its egress policy.

use std::sync::Arc;

use store::{Sandbox, SandboxStatus};

use super::{
    addresses_of, lock, state_name, Lifecycle, LifecycleError, Result, ADDRESS_TIMEOUT, ID_KEY,
    META_COLLECTION, STOP_GRACE,
};
use crate::api::SandboxView;

impl Lifecycle {
    /// Refuses a sandbox that a pipeline or a delete has not finished
    /// with (neither running nor stopped).
    pub(super) fn settled(sb: &Sandbox) -> Result<()> {
        match &sb.status {
            SandboxStatus::Running | SandboxStatus::Stopped => Ok(()),
            other => Err(LifecycleError::WrongState {
                name: sb.name.clone(),
                state: state_name(other),
                hint: "run `sandboxd create` again to finish it, or `sandboxd delete` it",
            }),
        }
    }

    /// Waits until the instance carries the sandbox's fixed address (any
    /// IPv4 address for a record that has none yet).
    pub(super) async fn wait_address(
        &self,
        name: &str,
        instance: &str,
    ) -> Result<std::net::Ipv4Addr> {
        let sb = self.require(name).await?;
        let ip = match sb.assigned_ipv4.as_deref().and_then(|a| a.parse().ok()) {
            Some(ip) => {
                self.incus
                    .wait_for_this_ipv4(instance, ip, ADDRESS_TIMEOUT)
                    .await?
            }
            None => self.incus.wait_for_ipv4(instance, ADDRESS_TIMEOUT).await?,
        };
        Ok(ip)
    }

    /// Re-reads the address of a running instance and records it.
    pub(super) async fn refresh_running(&self, name: &str, instance: &str) -> Result<Sandbox> {
        self.wait_address(name, instance).await?;
        let st = self.incus.instance_state(instance).await?;
        self.set_status(name, SandboxStatus::Running, Some(addresses_of(&st)))
            .await
    }

    /// Starts a sandbox's container and routes to its (new) address.
    pub async fn start(self: &Arc<Self>, name: &str) -> Result<SandboxView> {
        let _claim = self.claim(name)?;
        let (sb, inst) = self.get_incus(name).await?;
        Self::settled(&sb)?;
        self.incus.start(&inst).await?;
        let sb = self.refresh_running(name, &inst).await?;
        Ok(crate::sandbox::view(&sb))
    }

    /// Stops a sandbox's container (clean shutdown, killed after a grace
    /// period); its routes answer "stopped".
    pub async fn stop(self: &Arc<Self>, name: &str) -> Result<SandboxView> {
        let _claim = self.claim(name)?;
        let (sb, inst) = self.get_incus(name).await?;
        Self::settled(&sb)?;
        self.incus.stop_or_kill(&inst, STOP_GRACE).await?;
        let sb = self
            .set_status(name, SandboxStatus::Stopped, Some(vec![]))
            .await?;
        Ok(crate::sandbox::view(&sb))
    }

    /// Restarts a sandbox's container; the route follows the new address.
    pub async fn restart(self: &Arc<Self>, name: &str) -> Result<SandboxView> {
        let _claim = self.claim(name)?;
        let (sb, inst) = self.get_incus(name).await?;
        Self::settled(&sb)?;
        let running = self.incus.instance(&inst).await?.is_running();
        if running {
            self.incus
                .restart(&inst, incusctl::StopOptions::graceful(STOP_GRACE))
                .await?;
        } else {
            self.incus.start(&inst).await?;
        }
        let sb = self.refresh_running(name, &inst).await?;
        Ok(crate::sandbox::view(&sb))
    }

    /// Deletes a sandbox: its route first (the HTTPS gate's certificate
    /// manager then deletes its certificates), then the container, then
    /// the record. A failure leaves the record `Failed`
    /// (unrouted) so that `delete` can be run again.
    pub async fn delete(self: &Arc<Self>, name: &str) -> Result<SandboxView> {
        let _claim = self.claim(name)?;
        let (sb, inst) = self.get_incus(name).await?;
        self.set_status(
            name,
            SandboxStatus::Failed {
                reason: "being deleted".into(),
            },
            Some(vec![]),
        )
        .await?;
        let meta = self.meta(name).await?;
        let ours = match self.incus.instance(&inst).await {
            Ok(i) => match (&meta, i.config.get(ID_KEY)) {
                (Some(m), Some(id)) => *id == m.id,
                // Adopted before ids existed, or a record without meta.
                (None, _) => true,
                (Some(_), None) => false,
            },
            Err(e) if e.is_not_found() => false,
            Err(e) => return Err(self.delete_failed(name, e.into()).await),
        };
        if ours {
            match self.incus.delete_instance(&inst, true).await {
                Ok(()) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(self.delete_failed(name, e.into()).await),
            }
        } else {
            tracing::info!(sandbox = %name, instance = %inst, "no container of ours to delete");
        }
        if let Err(e) = self.remove_egress(&sb).await {
            return Err(self.delete_failed(name, e).await);
        }
        let n = name.to_string();
        // The sandbox's certificate records are the HTTPS gate's to delete
        // (its certificate manager, when the routes go).
        self.blocking(move |s| {
            s.delete_record(META_COLLECTION, &n)?;
            Ok(())
        })
        .await?;
        let n = name.to_string();
        let removed = self.write(move |s| s.remove(&n)).await?;
        lock(&self.samples).remove(&inst);
        tracing::info!(sandbox = %name, "sandbox deleted with its container");
        Ok(crate::sandbox::view(&removed))
    }

    async fn delete_failed(&self, name: &str, e: LifecycleError) -> LifecycleError {
        let reason = format!("delete failed: {e}");
        if let Err(se) = self
            .set_status(name, SandboxStatus::Failed { reason }, None)
            .await
        {
            tracing::error!(sandbox = %name, error = %se, "cannot record the failure");
        }
        e
    }

    /// `sandboxd egress NAME MODE`: changes the policy and applies it.
    pub async fn set_egress(
        self: &Arc<Self>,
        name: &str,
        egress: store::Egress,
    ) -> Result<SandboxView> {
        let _claim = self.claim(name)?;
        let (sb, inst) = self.get_incus(name).await?;
        Self::settled(&sb)?;
        store::validate_egress(&egress)?;
        let n = name.to_string();
        let e = egress.clone();
        self.write(move |s| {
            s.update(&n, |sb| {
                sb.egress = e.clone();
                Ok(())
            })
        })
        .await?;
        let (_, restart) = self.isolate_instance(name, &inst).await?;
        if restart {
            self.incus
                .restart(&inst, incusctl::StopOptions::graceful(STOP_GRACE))
                .await?;
            self.refresh_running(name, &inst).await?;
        }
        let sb = self.require(name).await?;
        tracing::info!(sandbox = %name, egress = egress.mode.as_str(), "egress policy applied");
        Ok(crate::sandbox::view(&sb))
    }
}
