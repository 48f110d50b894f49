//! Typed mirrors of the Incus API objects this crate reads and writes:
//! server info, instances, snapshots, images, aliases and the create request.
//!
//! Only the fields sandboxd uses are typed; unknown fields are ignored and
//! missing ones default, so newer Incus versions keep working. The runtime
//! state of an instance lives in [`crate::state`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::state::InstanceState;

/// `GET /1.0`: the server and its API extensions.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct ServerInfo {
    /// API extensions the server supports (feature flags).
    #[serde(deserialize_with = "null_as_default")]
    pub api_extensions: Vec<String>,
    /// `stable` or `development`.
    #[serde(deserialize_with = "null_as_default")]
    pub api_status: String,
    /// Always `1.0` today.
    #[serde(deserialize_with = "null_as_default")]
    pub api_version: String,
    /// `trusted` for unix-socket clients.
    #[serde(deserialize_with = "null_as_default")]
    pub auth: String,
    /// Host environment.
    #[serde(deserialize_with = "null_as_default")]
    pub environment: ServerEnvironment,
}

impl ServerInfo {
    /// True when the server announces API extension `name`.
    pub fn has_extension(&self, name: &str) -> bool {
        self.api_extensions.iter().any(|e| e == name)
    }
}

/// The `environment` part of [`ServerInfo`].
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct ServerEnvironment {
    /// Incus version, e.g. `6.0.4`.
    #[serde(deserialize_with = "null_as_default")]
    pub server_version: String,
    /// Server name (host name, or the cluster member name).
    #[serde(deserialize_with = "null_as_default")]
    pub server_name: String,
    /// Whether the server is part of a cluster.
    pub server_clustered: bool,
    /// Kernel name.
    #[serde(deserialize_with = "null_as_default")]
    pub kernel: String,
    /// Kernel version.
    #[serde(deserialize_with = "null_as_default")]
    pub kernel_version: String,
    /// Supported architectures.
    #[serde(deserialize_with = "null_as_default")]
    pub architectures: Vec<String>,
    /// Instance drivers, e.g. `lxc | qemu`.
    #[serde(deserialize_with = "null_as_default")]
    pub driver: String,
    /// Storage drivers in use.
    #[serde(deserialize_with = "null_as_default")]
    pub storage: String,
}

/// An instance, as returned by `GET /1.0/instances/{name}` and, with
/// `state` and `snapshots` filled in, by `GET /1.0/instances?recursion=2`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct Instance {
    /// Instance name.
    #[serde(deserialize_with = "null_as_default")]
    pub name: String,
    /// Description.
    #[serde(deserialize_with = "null_as_default")]
    pub description: String,
    /// `Running`, `Stopped`, `Frozen`, `Error`...
    #[serde(deserialize_with = "null_as_default")]
    pub status: String,
    /// Numeric status (103 running, 102 stopped, 110 frozen, 400 error).
    pub status_code: u16,
    /// `container` or `virtual-machine`.
    #[serde(rename = "type")]
    #[serde(deserialize_with = "null_as_default")]
    pub kind: String,
    /// Architecture, e.g. `x86_64`.
    #[serde(deserialize_with = "null_as_default")]
    pub architecture: String,
    /// Instance-local configuration.
    #[serde(deserialize_with = "null_as_default")]
    pub config: BTreeMap<String, String>,
    /// Instance-local devices.
    #[serde(deserialize_with = "null_as_default")]
    pub devices: BTreeMap<String, BTreeMap<String, String>>,
    /// Configuration with profiles applied.
    #[serde(deserialize_with = "null_as_default")]
    pub expanded_config: BTreeMap<String, String>,
    /// Devices with profiles applied.
    #[serde(deserialize_with = "null_as_default")]
    pub expanded_devices: BTreeMap<String, BTreeMap<String, String>>,
    /// Profiles applied, in order.
    #[serde(deserialize_with = "null_as_default")]
    pub profiles: Vec<String>,
    /// Whether the instance is deleted when stopped.
    pub ephemeral: bool,
    /// Whether the instance has stateful snapshots.
    pub stateful: bool,
    /// Creation time (RFC 3339).
    #[serde(deserialize_with = "null_as_default")]
    pub created_at: String,
    /// Last start time (RFC 3339).
    #[serde(deserialize_with = "null_as_default")]
    pub last_used_at: String,
    /// Cluster member the instance lives on (`none` when not clustered).
    #[serde(deserialize_with = "null_as_default")]
    pub location: String,
    /// Project.
    #[serde(deserialize_with = "null_as_default")]
    pub project: String,
    /// Runtime state (only with `recursion=2`).
    pub state: Option<InstanceState>,
    /// Snapshots (filled only by `recursion=2` listings and
    /// [`crate::Client::instance_full`]; empty otherwise).
    #[serde(deserialize_with = "null_as_default")]
    pub snapshots: Vec<Snapshot>,
}

impl Instance {
    /// True when the instance is running.
    pub fn is_running(&self) -> bool {
        self.status_code == 103 || self.status == "Running"
    }

    /// True when the instance is stopped.
    pub fn is_stopped(&self) -> bool {
        self.status_code == 102 || self.status == "Stopped"
    }

    /// True when the instance is frozen.
    pub fn is_frozen(&self) -> bool {
        self.status_code == 110 || self.status == "Frozen"
    }

    /// First global IPv4 address of `eth0`, from the state included by
    /// `recursion=2` listings.
    pub fn ipv4(&self) -> Option<std::net::Ipv4Addr> {
        self.state.as_ref().and_then(InstanceState::ipv4)
    }

    /// First global IPv6 address of `eth0`, from the included state.
    pub fn ipv6(&self) -> Option<std::net::Ipv6Addr> {
        self.state.as_ref().and_then(InstanceState::ipv6)
    }
}

/// Decodes `null` as the type's default (Incus sends `null` for empty
/// lists).
pub(crate) fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// A snapshot of an instance.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct Snapshot {
    /// Snapshot name (without the `instance/` prefix).
    #[serde(deserialize_with = "null_as_default")]
    pub name: String,
    /// Creation time (RFC 3339).
    #[serde(deserialize_with = "null_as_default")]
    pub created_at: String,
    /// Expiry time (RFC 3339; the zero time when it never expires).
    #[serde(deserialize_with = "null_as_default")]
    pub expires_at: String,
    /// Whether the running state was saved too.
    pub stateful: bool,
    /// Size in bytes, when the storage driver knows it (-1 otherwise).
    pub size: i64,
    /// Description.
    #[serde(deserialize_with = "null_as_default")]
    pub description: String,
}

/// An image in the local image store.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct Image {
    /// SHA-256 fingerprint.
    #[serde(deserialize_with = "null_as_default")]
    pub fingerprint: String,
    /// Aliases pointing at this image.
    #[serde(deserialize_with = "null_as_default")]
    pub aliases: Vec<ImageAliasRef>,
    /// Architecture.
    #[serde(deserialize_with = "null_as_default")]
    pub architecture: String,
    /// Size in bytes.
    pub size: i64,
    /// Image properties (`os`, `release`, `description`...).
    #[serde(deserialize_with = "null_as_default")]
    pub properties: BTreeMap<String, String>,
    /// Whether the image is public.
    pub public: bool,
    /// `container` or `virtual-machine`.
    #[serde(rename = "type")]
    #[serde(deserialize_with = "null_as_default")]
    pub kind: String,
    /// Upload time (RFC 3339).
    #[serde(deserialize_with = "null_as_default")]
    pub uploaded_at: String,
    /// Creation time (RFC 3339).
    #[serde(deserialize_with = "null_as_default")]
    pub created_at: String,
}

/// An alias name as listed inside an [`Image`].
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct ImageAliasRef {
    /// Alias name.
    #[serde(deserialize_with = "null_as_default")]
    pub name: String,
    /// Description.
    #[serde(deserialize_with = "null_as_default")]
    pub description: String,
}

/// An image alias (`GET /1.0/images/aliases/{name}`).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct ImageAlias {
    /// Alias name.
    #[serde(deserialize_with = "null_as_default")]
    pub name: String,
    /// Fingerprint of the image it points at.
    #[serde(deserialize_with = "null_as_default")]
    pub target: String,
    /// Description.
    #[serde(deserialize_with = "null_as_default")]
    pub description: String,
    /// `container` or `virtual-machine`.
    #[serde(rename = "type")]
    #[serde(deserialize_with = "null_as_default")]
    pub kind: String,
}

/// Where a new instance's root filesystem comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    /// An alias in the local image store (e.g. `test/debian-ssh`).
    LocalAlias(String),
    /// An image fingerprint in the local image store.
    Fingerprint(String),
    /// An alias on a remote simplestreams server (e.g. server
    /// `https://images.example`, alias `debian/12`). Incus downloads and
    /// caches it.
    Simplestreams {
        /// Server URL.
        server: String,
        /// Alias on that server.
        alias: String,
    },
}

impl ImageSource {
    /// Shorthand for [`ImageSource::LocalAlias`].
    pub fn local(alias: impl Into<String>) -> Self {
        ImageSource::LocalAlias(alias.into())
    }

    /// Shorthand for [`ImageSource::Simplestreams`].
    pub fn simplestreams(server: impl Into<String>, alias: impl Into<String>) -> Self {
        ImageSource::Simplestreams {
            server: server.into(),
            alias: alias.into(),
        }
    }

    pub(crate) fn to_json(&self) -> serde_json::Value {
        match self {
            ImageSource::LocalAlias(alias) => {
                serde_json::json!({"type": "image", "alias": alias})
            }
            ImageSource::Fingerprint(fp) => {
                serde_json::json!({"type": "image", "fingerprint": fp})
            }
            ImageSource::Simplestreams { server, alias } => serde_json::json!({
                "type": "image",
                "alias": alias,
                "server": server,
                "protocol": "simplestreams",
                "mode": "pull",
            }),
        }
    }
}

impl std::fmt::Display for ImageSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ImageSource::LocalAlias(a) => write!(f, "image alias \"{a}\""),
            ImageSource::Fingerprint(fp) => write!(f, "image \"{fp}\""),
            ImageSource::Simplestreams { server, alias } => {
                write!(f, "image \"{alias}\" on {server}")
            }
        }
    }
}

/// A request to create an instance (`POST /1.0/instances`), built fluently.
///
/// ```
/// use incusctl::{CreateInstance, ImageSource};
/// let req = CreateInstance::new("web", ImageSource::local("test/debian-ssh"))
///     .docker_ready()
///     .limits_cpu(2)
///     .limits_memory("2GiB")
///     .root_disk("default", Some("10GiB"))
///     .config("user.sandboxd.domain", "web.example.com")
///     .start(true);
/// assert_eq!(req.config["security.nesting"], "true");
/// ```
#[derive(Debug, Clone)]
pub struct CreateInstance {
    /// Instance name (a DNS label).
    pub name: String,
    /// Root filesystem source.
    pub source: ImageSource,
    /// Instance configuration keys.
    pub config: BTreeMap<String, String>,
    /// Instance devices (override profile devices of the same name).
    pub devices: BTreeMap<String, BTreeMap<String, String>>,
    /// Profiles; `None` means the server's default (`["default"]`).
    pub profiles: Option<Vec<String>>,
    /// Start the instance once created (part of the same operation).
    pub start: bool,
    /// Description.
    pub description: String,
}

impl CreateInstance {
    /// A container named `name` from `source`, with no extra config.
    pub fn new(name: impl Into<String>, source: ImageSource) -> Self {
        CreateInstance {
            name: name.into(),
            source,
            config: BTreeMap::new(),
            devices: BTreeMap::new(),
            profiles: None,
            start: false,
            description: String::new(),
        }
    }

    /// Sets one configuration key.
    pub fn config(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.config.insert(key.into(), value.into());
        self
    }

    /// `security.nesting=true` plus the syscall interceptions Docker needs
    /// in an unprivileged container (`mknod`, `setxattr`).
    pub fn docker_ready(self) -> Self {
        self.config("security.nesting", "true")
            .config("security.syscalls.intercept.mknod", "true")
            .config("security.syscalls.intercept.setxattr", "true")
    }

    /// `limits.cpu` (number of CPUs).
    pub fn limits_cpu(self, cpus: u32) -> Self {
        self.config("limits.cpu", cpus.to_string())
    }

    /// `limits.memory` (e.g. `2GiB`, `512MiB`, `50%`).
    pub fn limits_memory(self, size: impl Into<String>) -> Self {
        self.config("limits.memory", size)
    }

    /// An instance-level root disk on `pool`, with an optional size quota
    /// (e.g. `10GiB`; the `dir` driver ignores quotas unless project quotas
    /// are enabled on the host).
    pub fn root_disk(mut self, pool: impl Into<String>, size: Option<&str>) -> Self {
        let mut dev = BTreeMap::new();
        dev.insert("type".to_string(), "disk".to_string());
        dev.insert("path".to_string(), "/".to_string());
        dev.insert("pool".to_string(), pool.into());
        if let Some(size) = size {
            dev.insert("size".to_string(), size.to_string());
        }
        self.devices.insert("root".to_string(), dev);
        self
    }

    /// Adds or replaces a device.
    pub fn device(mut self, name: impl Into<String>, device: BTreeMap<String, String>) -> Self {
        self.devices.insert(name.into(), device);
        self
    }

    /// Uses these profiles instead of the default one.
    pub fn profiles(mut self, profiles: Vec<String>) -> Self {
        self.profiles = Some(profiles);
        self
    }

    /// Starts the instance as part of the create operation.
    pub fn start(mut self, start: bool) -> Self {
        self.start = start;
        self
    }

    /// Sets the description.
    pub fn description(mut self, description: impl Into<String>) -> Self {
        self.description = description.into();
        self
    }

    pub(crate) fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "name": self.name,
            "type": "container",
            "source": self.source.to_json(),
            "config": self.config,
            "devices": self.devices,
            "start": self.start,
            "description": self.description,
        });
        if let (Some(profiles), Some(obj)) = (&self.profiles, v.as_object_mut()) {
            obj.insert("profiles".to_string(), serde_json::json!(profiles));
        }
        v
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn create_request_json() {
        let req = CreateInstance::new(
            "web",
            ImageSource::simplestreams("https://images.invalid", "debian/12"),
        )
        .docker_ready()
        .limits_cpu(2)
        .root_disk("default", Some("5GiB"))
        .start(true);
        let v = req.to_json();
        assert_eq!(v["source"]["protocol"], "simplestreams");
        assert_eq!(v["source"]["alias"], "debian/12");
        assert_eq!(v["config"]["limits.cpu"], "2");
        assert_eq!(v["config"]["security.syscalls.intercept.mknod"], "true");
        assert_eq!(v["devices"]["root"]["size"], "5GiB");
        assert_eq!(v["start"], true);
        assert!(v.get("profiles").is_none());
    }

    #[test]
    fn instance_decodes_with_missing_fields() {
        let i: Instance =
            serde_json::from_str(r#"{"name":"a","status":"Running","status_code":103}"#).unwrap();
        assert!(i.is_running());
        assert!(i.state.is_none());
        let i: Instance = serde_json::from_str(r#"{"name":"a","snapshots":null}"#).unwrap();
        assert!(i.snapshots.is_empty());
        // An instance being created or deleted can have nulls everywhere.
        let i: Instance = serde_json::from_str(
            r#"{"name":"a","status":null,"config":null,"devices":null,"expanded_config":null,
                "expanded_devices":null,"profiles":null,"description":null,
                "state":{"status":null,"network":null,"disk":null,"memory":null,"cpu":null}}"#,
        )
        .unwrap();
        assert!(i.config.is_empty());
        assert_eq!(i.state.unwrap().ipv4(), None);
    }
}
