//! Snapshots of an instance: create, list, restore, delete
//! (`/1.0/instances/{name}/snapshots`, and `PUT /1.0/instances/{name}` with
//! `restore` for a restore).

use http::Method;
use serde_json::json;

use crate::client::{instance_path, Client};
use crate::error::Result;
use crate::transport::percent_encode;
use crate::types::Snapshot;

fn snapshot_what(name: &str, snap: &str) -> String {
    format!("snapshot \"{name}/{snap}\"")
}

impl Client {
    /// Takes a (stateless) snapshot named `snap`.
    ///
    /// Errors: [`crate::Error::Conflict`] when the name is taken.
    pub async fn create_snapshot(&self, name: &str, snap: &str) -> Result<()> {
        let path = format!("{}/snapshots", instance_path(name));
        let body = json!({"name": snap, "stateful": false});
        let op = self
            .transport()
            .json(Method::POST, &path, Some(&body))
            .await?
            .into_operation(&path)?;
        self.wait_success(&op, self.op_timeout(), &snapshot_what(name, snap))
            .await?;
        Ok(())
    }

    /// Snapshots of an instance, oldest first.
    pub async fn list_snapshots(&self, name: &str) -> Result<Vec<Snapshot>> {
        let path = format!("{}/snapshots?recursion=1", instance_path(name));
        let mut snaps: Vec<Snapshot> = self
            .transport()
            .json::<()>(Method::GET, &path, None)
            .await?
            .into_sync(&path)?;
        for s in &mut snaps {
            // Older servers return `instance/snap`.
            if let Some((_, short)) = s.name.rsplit_once('/') {
                s.name = short.to_string();
            }
        }
        snaps.sort_by(|a, b| a.created_at.cmp(&b.created_at));
        Ok(snaps)
    }

    /// Restores an instance to snapshot `snap`. Incus stops a running
    /// instance for the restore and starts it again afterwards.
    pub async fn restore_snapshot(&self, name: &str, snap: &str) -> Result<()> {
        let path = instance_path(name);
        let body = json!({"restore": snap, "stateful": false});
        let answer = self
            .transport()
            .json(Method::PUT, &path, Some(&body))
            .await?;
        self.complete(answer, self.op_timeout(), &snapshot_what(name, snap))
            .await?;
        Ok(())
    }

    /// Deletes snapshot `snap`.
    pub async fn delete_snapshot(&self, name: &str, snap: &str) -> Result<()> {
        let path = format!("{}/snapshots/{}", instance_path(name), percent_encode(snap));
        let answer = self
            .transport()
            .json::<()>(Method::DELETE, &path, None)
            .await?;
        self.complete(answer, self.op_timeout(), &snapshot_what(name, snap))
            .await?;
        Ok(())
    }
}
