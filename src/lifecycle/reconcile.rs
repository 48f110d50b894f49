//! The reconcile of store records with Incus' view: the periodic full
//! pass, [`Lifecycle::settle`] (the watcher's and the reconcile's only
//! status write), and following renamed instances.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use store::{Backend, Sandbox, SandboxStatus};

use super::{addresses_of, incus_instance, lock, Lifecycle, Result, STOP_GRACE};

/// Marks a sandbox busy for the reconcile's own work; skipped when a
/// lifecycle operation holds it.
struct BusyGuard<'a> {
    set: &'a Mutex<HashSet<String>>,
    name: String,
}

impl<'a> BusyGuard<'a> {
    fn try_new(set: &'a Mutex<HashSet<String>>, name: &str) -> Option<Self> {
        if !lock(set).insert(name.to_string()) {
            return None;
        }
        Some(BusyGuard {
            set,
            name: name.to_string(),
        })
    }
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        lock(self.set).remove(&self.name);
    }
}

impl Lifecycle {
    /// Like [`Lifecycle::set_status`], only while the sandbox is settled
    /// (running or stopped) and only when something changes; returns
    /// whether it wrote. Used by the watcher and reconcile, which must not
    /// overwrite a pipeline's or a delete's status.
    pub async fn settle(
        &self,
        name: &str,
        status: SandboxStatus,
        addresses: Vec<String>,
    ) -> Result<bool> {
        let n = name.to_string();
        let (_, written) = self
            .blocking(move |s| {
                s.update_if(&n, |sb| {
                    let settled =
                        matches!(sb.status, SandboxStatus::Running | SandboxStatus::Stopped);
                    if !settled || (sb.status == status && sb.addresses == addresses) {
                        return Ok(false);
                    }
                    sb.status = status.clone();
                    sb.addresses = addresses.clone();
                    Ok(true)
                })
            })
            .await?;
        let Some(seq) = written else {
            return Ok(false);
        };
        self.routes.wait_applied(seq).await;
        Ok(true)
    }

    /// Compares every settled Incus sandbox with Incus' view (one
    /// `list_instances`) and repairs status and addresses; returns how many
    /// records changed.
    pub async fn reconcile(self: &Arc<Self>) -> Result<usize> {
        let list = self.incus.list_instances().await?;
        let sandboxes = self.blocking(|s| s.list()).await?;
        let by_name: HashMap<&str, &incusctl::Instance> =
            list.iter().map(|i| (i.name.as_str(), i)).collect();
        let mut changed = 0;
        for sb in &sandboxes {
            let Some(instance) = incus_instance(sb) else {
                continue;
            };
            if !matches!(sb.status, SandboxStatus::Running | SandboxStatus::Stopped) {
                continue;
            }
            // Before the address check below: a container whose NIC lost
            // its filters may have lost its address with them.
            if let Some(i) = by_name.get(instance) {
                if self.needs_isolation(sb, i) {
                    if let Some(_busy) = BusyGuard::try_new(&self.busy, &sb.name) {
                        changed += usize::from(self.reisolate(&sb.name, instance).await);
                    }
                }
            }
            let (status, addrs) = match by_name.get(instance) {
                None => (
                    SandboxStatus::Failed {
                        reason: format!("container {instance} no longer exists in Incus"),
                    },
                    vec![],
                ),
                Some(i) if i.is_running() => {
                    if let Some(st) = &i.state {
                        let _ = self.cpu_sample(instance, st.cpu_usage_ns());
                    }
                    let addrs = i.state.as_ref().map(addresses_of).unwrap_or_default();
                    if addrs.is_empty() && sb.status == SandboxStatus::Running {
                        // Booting: the event path records the address.
                        continue;
                    }
                    (SandboxStatus::Running, addrs)
                }
                Some(_) => (SandboxStatus::Stopped, vec![]),
            };
            if self.settle(&sb.name, status, addrs).await? {
                tracing::info!(sandbox = %sb.name, "reconciled with Incus");
                changed += 1;
            }
        }
        self.upgrade_authorized_keys().await;
        Ok(changed)
    }

    /// The reconcile's isolation of one sandbox (made before isolation
    /// existed, or whose NIC was changed): address, ACL, NIC, and a
    /// restart when the running container must change its address.
    async fn reisolate(&self, name: &str, instance: &str) -> bool {
        match self.isolate_instance(name, instance).await {
            Ok((ip, restart)) => {
                if restart {
                    tracing::warn!(sandbox = %name, %ip, "restarting the container so that it takes its fixed address");
                    if let Err(e) = self
                        .incus
                        .restart(instance, incusctl::StopOptions::graceful(STOP_GRACE))
                        .await
                    {
                        tracing::warn!(sandbox = %name, error = %e, "restart failed");
                    }
                }
                true
            }
            Err(e) => {
                tracing::warn!(sandbox = %name, error = %e, "cannot isolate the sandbox's network");
                false
            }
        }
    }

    /// Settled Incus sandboxes backed by `instance`.
    pub async fn sandboxes_of(&self, instance: &str) -> Result<Vec<Sandbox>> {
        let inst = instance.to_string();
        self.blocking(move |s| {
            Ok(s.list()?
                .into_iter()
                .filter(|sb| incus_instance(sb) == Some(inst.as_str()))
                .collect())
        })
        .await
    }

    /// An instance was renamed outside sandboxd: follow it.
    pub async fn follow_rename(&self, old: &str, new: &str) -> Result<()> {
        for sb in self.sandboxes_of(old).await? {
            let new_name = new.to_string();
            let n = sb.name.clone();
            self.write(move |s| {
                s.update(&n, |sb| {
                    sb.backend = Backend::Incus {
                        instance: new_name.clone(),
                    };
                    Ok(())
                })
            })
            .await?;
            tracing::info!(sandbox = %sb.name, old, new, "instance renamed; following");
        }
        Ok(())
    }
}
