//! Snapshots of a sandbox's container: create, list, restore, delete.

use std::sync::Arc;

use store::SandboxStatus;

use super::{Lifecycle, LifecycleError, Result};
use crate::api::incus::SnapshotView;
use crate::api::SandboxView;

impl Lifecycle {
    pub async fn snapshot_create(
        self: &Arc<Self>,
        name: &str,
        snap: Option<String>,
    ) -> Result<SnapshotView> {
        let _claim = self.claim(name)?;
        let (_, inst) = self.get_incus(name).await?;
        let snap = snap.unwrap_or_else(|| format!("snap-{}", now_secs()));
        check_snapshot_name(&snap)?;
        self.incus.create_snapshot(&inst, &snap).await?;
        let all = self.snapshot_list(name).await?;
        all.into_iter()
            .find(|s| s.name == snap)
            .ok_or_else(|| LifecycleError::Internal(format!("snapshot {snap} vanished")))
    }

    pub async fn snapshot_list(&self, name: &str) -> Result<Vec<SnapshotView>> {
        let (_, inst) = self.get_incus(name).await?;
        Ok(self
            .incus
            .list_snapshots(&inst)
            .await?
            .into_iter()
            .map(|s| SnapshotView {
                name: s.name,
                created_at: s.created_at,
                stateful: s.stateful,
            })
            .collect())
    }

    /// Restores a snapshot (Incus stops, restores and starts a running
    /// instance); the route follows the address.
    pub async fn snapshot_restore(self: &Arc<Self>, name: &str, snap: &str) -> Result<SandboxView> {
        let _claim = self.claim(name)?;
        let (sb, inst) = self.get_incus(name).await?;
        Self::settled(&sb)?;
        check_snapshot_name(snap)?;
        self.incus.restore_snapshot(&inst, snap).await?;
        let sb = if self.incus.instance(&inst).await?.is_running() {
            self.refresh_running(name, &inst).await?
        } else {
            self.set_status(name, SandboxStatus::Stopped, Some(vec![]))
                .await?
        };
        Ok(crate::sandbox::view(&sb))
    }

    pub async fn snapshot_delete(self: &Arc<Self>, name: &str, snap: &str) -> Result<()> {
        let _claim = self.claim(name)?;
        let (_, inst) = self.get_incus(name).await?;
        check_snapshot_name(snap)?;
        self.incus.delete_snapshot(&inst, snap).await?;
        Ok(())
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn check_snapshot_name(snap: &str) -> Result<()> {
    let ok = !snap.is_empty()
        && snap.len() <= 63
        && snap
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if !ok {
        return Err(LifecycleError::Invalid(format!(
            "snapshot name {snap:?}: use 1 to 63 of a-z, A-Z, 0-9, '-', '_', '.'"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn snapshot_names() {
        assert!(check_snapshot_name("before-upgrade.1").is_ok());
        assert!(check_snapshot_name("a/b").is_err());
        assert!(check_snapshot_name("").is_err());
    }
}
