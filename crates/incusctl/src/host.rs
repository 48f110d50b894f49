//! Host-level Incus objects that `sandboxd setup` prepares once: storage
//! pools (`/1.0/storage-pools`), managed networks (`/1.0/networks`) and
//! profiles (`/1.0/profiles`). Read, create, update the devices of, delete.
//!
//! Nothing here decides names or defaults: the caller passes them in.

use std::collections::BTreeMap;

use http::Method;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::client::Client;
use crate::error::Result;
use crate::transport::percent_encode;

/// A storage pool.
#[derive(Debug, Clone, Deserialize)]
pub struct StoragePool {
    pub name: String,
    /// `dir`, `btrfs`, `zfs`, `lvm`, ...
    pub driver: String,
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub used_by: Vec<String>,
}

/// A network.
#[derive(Debug, Clone, Deserialize)]
pub struct Network {
    pub name: String,
    /// `bridge`, `macvlan`, `physical`, ... (`loopback` and so on for
    /// unmanaged interfaces).
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub managed: bool,
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    #[serde(default)]
    pub used_by: Vec<String>,
}

/// A profile: configuration keys and devices applied to instances.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Profile {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    /// Device name to its settings (`type`, `path`, `pool`, `network`...).
    #[serde(default)]
    pub devices: BTreeMap<String, BTreeMap<String, String>>,
    #[serde(default, skip_serializing)]
    pub used_by: Vec<String>,
}

fn pool_path(name: &str) -> String {
    format!("/1.0/storage-pools/{}", percent_encode(name))
}

fn network_path(name: &str) -> String {
    format!("/1.0/networks/{}", percent_encode(name))
}

fn profile_path(name: &str) -> String {
    format!("/1.0/profiles/{}", percent_encode(name))
}

impl Client {
    async fn get_optional<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<Option<T>> {
        match self.transport().json::<()>(Method::GET, path, None).await {
            Ok(answer) => Ok(Some(answer.into_sync(path)?)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn send_and_complete(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
        what: &str,
    ) -> Result<()> {
        let answer = self.transport().json(method, path, body).await?;
        self.complete(answer, self.op_timeout(), what).await?;
        Ok(())
    }

    // ----- storage pools ---------------------------------------------------

    /// The storage pool `name`, or `None` when there is none.
    pub async fn storage_pool(&self, name: &str) -> Result<Option<StoragePool>> {
        self.get_optional(&pool_path(name)).await
    }

    /// Creates a storage pool. `config` holds the driver's keys, e.g.
    /// `size=20GiB` for a loop-backed btrfs or zfs pool.
    ///
    /// Errors: [`crate::Error::Conflict`] when the name is taken.
    pub async fn create_storage_pool(
        &self,
        name: &str,
        driver: &str,
        config: &BTreeMap<String, String>,
    ) -> Result<()> {
        let body = json!({"name": name, "driver": driver, "config": config});
        self.send_and_complete(
            Method::POST,
            "/1.0/storage-pools",
            Some(&body),
            &format!("storage pool \"{name}\""),
        )
        .await
    }

    /// Deletes a storage pool (it must be unused).
    pub async fn delete_storage_pool(&self, name: &str) -> Result<()> {
        self.send_and_complete(
            Method::DELETE,
            &pool_path(name),
            None,
            &format!("storage pool \"{name}\""),
        )
        .await
    }

    // ----- networks --------------------------------------------------------

    /// The network `name`, or `None`.
    pub async fn network(&self, name: &str) -> Result<Option<Network>> {
        self.get_optional(&network_path(name)).await
    }

    /// Creates a managed bridge with `config` (e.g. `ipv4.address`,
    /// `ipv4.nat`, `ipv6.address`).
    pub async fn create_bridge(&self, name: &str, config: &BTreeMap<String, String>) -> Result<()> {
        let body = json!({"name": name, "type": "bridge", "config": config});
        self.send_and_complete(
            Method::POST,
            "/1.0/networks",
            Some(&body),
            &format!("network \"{name}\""),
        )
        .await
    }

    /// Deletes a managed network (it must be unused).
    pub async fn delete_network(&self, name: &str) -> Result<()> {
        self.send_and_complete(
            Method::DELETE,
            &network_path(name),
            None,
            &format!("network \"{name}\""),
        )
        .await
    }

    // ----- profiles --------------------------------------------------------

    /// The profile `name`, or `None`.
    pub async fn profile(&self, name: &str) -> Result<Option<Profile>> {
        self.get_optional(&profile_path(name)).await
    }

    /// Creates a profile with its description, config and devices.
    pub async fn create_profile(&self, profile: &Profile) -> Result<()> {
        let body = serde_json::to_value(profile)
            .map_err(|e| crate::Error::InvalidArgument(format!("cannot encode profile: {e}")))?;
        self.send_and_complete(
            Method::POST,
            "/1.0/profiles",
            Some(&body),
            &format!("profile \"{}\"", profile.name),
        )
        .await
    }

    /// Replaces a profile's description, config and devices (`PUT`).
    pub async fn update_profile(&self, profile: &Profile) -> Result<()> {
        let body = json!({
            "description": profile.description,
            "config": profile.config,
            "devices": profile.devices,
        });
        self.send_and_complete(
            Method::PUT,
            &profile_path(&profile.name),
            Some(&body),
            &format!("profile \"{}\"", profile.name),
        )
        .await
    }

    /// Deletes a profile (it must be unused).
    pub async fn delete_profile(&self, name: &str) -> Result<()> {
        self.send_and_complete(
            Method::DELETE,
            &profile_path(name),
            None,
            &format!("profile \"{name}\""),
        )
        .await
    }
}
