//! The [`Client`]: connecting to incusd, server info, instances and their
//! state changes.
//!
//! Exec, files, snapshots, images and events add their own `impl Client`
//! blocks in their modules. The client holds no connection: every call opens
//! a fresh one on the unix socket, so a `Client` is cheap to clone and share
//! and survives incusd restarts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::Method;
use serde_json::json;

use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, Result};
use crate::operation::{forward_progress, Progress};
use crate::state::InstanceState;
use crate::transport::{percent_encode, Answer, Transport};
use crate::types::{CreateInstance, ImageSource, Instance, ServerInfo};

/// Socket paths tried, in order, when none is given.
pub const DEFAULT_SOCKETS: [&str; 2] = ["/var/lib/incus/unix.socket", "/run/incus/unix.socket"];

/// Timeouts of a [`Client`].
#[derive(Debug, Clone, Copy)]
pub struct ClientOptions {
    /// Bound on one plain request (answer fully read).
    pub request_timeout: Duration,
    /// Bound on waiting for a background operation (create, start, stop,
    /// snapshot...) when the call itself takes no timeout.
    pub operation_timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            request_timeout: Duration::from_secs(60),
            operation_timeout: Duration::from_secs(300),
        }
    }
}

/// How to stop (or restart) an instance.
#[derive(Debug, Clone, Copy, Default)]
pub struct StopOptions {
    /// Grace period for a clean shutdown; `None` lets Incus wait as long as
    /// the operation timeout allows.
    pub timeout: Option<Duration>,
    /// Kill instead of shutting down cleanly.
    pub force: bool,
}

impl StopOptions {
    /// Kill at once.
    pub fn force() -> Self {
        StopOptions {
            timeout: None,
            force: true,
        }
    }

    /// Clean shutdown within `timeout`.
    pub fn graceful(timeout: Duration) -> Self {
        StopOptions {
            timeout: Some(timeout),
            force: false,
        }
    }
}

/// An async client of the Incus REST API over its unix socket.
#[derive(Debug, Clone)]
pub struct Client {
    transport: Transport,
    options: ClientOptions,
}

impl Client {
    /// Connects to incusd at `path`, or at the first existing standard socket
    /// ([`DEFAULT_SOCKETS`]) when `path` is `None`, and checks that it
    /// answers `GET /1.0`.
    ///
    /// Errors: [`Error::NoSocket`] when no socket file exists,
    /// [`Error::NotRunning`] when it refuses connections.
    pub async fn connect(path: Option<PathBuf>) -> Result<Client> {
        Self::connect_with(path, ClientOptions::default()).await
    }

    /// Like [`Client::connect`] with explicit timeouts.
    pub async fn connect_with(path: Option<PathBuf>, options: ClientOptions) -> Result<Client> {
        let socket = match path {
            Some(p) => p,
            None => find_socket()?,
        };
        let client = Client::lazy(socket, options);
        client.server_info().await?;
        Ok(client)
    }

    /// A client for `socket` that does not contact incusd until first used
    /// (for a daemon that may start before incusd).
    pub fn lazy(socket: PathBuf, options: ClientOptions) -> Client {
        Client {
            transport: Transport::new(socket, options.request_timeout),
            options,
        }
    }

    /// The socket path in use.
    pub fn socket(&self) -> &Path {
        self.transport.socket()
    }

    /// The timeouts in use.
    pub fn options(&self) -> ClientOptions {
        self.options
    }

    pub(crate) fn transport(&self) -> &Transport {
        &self.transport
    }

    pub(crate) fn op_timeout(&self) -> Duration {
        self.options.operation_timeout
    }

    /// `GET /1.0`: server version, environment and API extensions.
    pub async fn server_info(&self) -> Result<ServerInfo> {
        self.transport
            .json::<()>(Method::GET, "/1.0", None)
            .await?
            .into_sync("GET /1.0")
    }

    // ----- instances -------------------------------------------------------

    /// All instances with their full state and snapshots, in one call
    /// (`GET /1.0/instances?recursion=2`).
    pub async fn list_instances(&self) -> Result<Vec<Instance>> {
        let raw: Vec<serde_json::Value> = self
            .transport
            .json::<()>(Method::GET, "/1.0/instances?recursion=2", None)
            .await?
            .into_sync("list instances")?;
        raw.into_iter()
            .map(|v| {
                let name = v
                    .get("name")
                    .and_then(|n| n.as_str())
                    .unwrap_or("?")
                    .to_string();
                serde_json::from_value(v).map_err(|e| {
                    Error::protocol("list instances", format!("instance \"{name}\": {e}"))
                })
            })
            .collect()
    }

    /// All instances without runtime state (`recursion=1`, cheaper).
    pub async fn list_instances_brief(&self) -> Result<Vec<Instance>> {
        self.transport
            .json::<()>(Method::GET, "/1.0/instances?recursion=1", None)
            .await?
            .into_sync("list instances")
    }

    /// One instance (configuration and status, no runtime state).
    pub async fn instance(&self, name: &str) -> Result<Instance> {
        let path = instance_path(name);
        self.transport
            .json::<()>(Method::GET, &path, None)
            .await?
            .into_sync(&path)
    }

    /// One instance with its state and snapshots (`recursion=1` on the
    /// instance endpoint).
    pub async fn instance_full(&self, name: &str) -> Result<Instance> {
        let path = format!("{}?recursion=1", instance_path(name));
        self.transport
            .json::<()>(Method::GET, &path, None)
            .await?
            .into_sync(&path)
    }

    /// Runtime state of an instance (addresses, CPU, memory, disk).
    pub async fn instance_state(&self, name: &str) -> Result<InstanceState> {
        let path = format!("{}/state", instance_path(name));
        self.transport
            .json::<()>(Method::GET, &path, None)
            .await?
            .into_sync(&path)
    }

    /// True when an instance of that name exists.
    pub async fn instance_exists(&self, name: &str) -> Result<bool> {
        match self.instance(name).await {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Creates an instance and waits for the operation (which includes the
    /// start when `req.start` is set).
    ///
    /// Errors: [`Error::Conflict`] when the name is taken,
    /// [`Error::NotFound`] when a local image alias does not exist (or a
    /// remote server says so), [`Error::OperationFailed`] otherwise.
    pub async fn create_instance(&self, req: &CreateInstance) -> Result<Instance> {
        self.create_instance_inner(req, None).await
    }

    /// Like [`Client::create_instance`], sending Incus' progress reports
    /// (image download, unpack) to `progress` while it runs.
    pub async fn create_instance_with_progress(
        &self,
        req: &CreateInstance,
        progress: mpsc::Sender<Progress>,
    ) -> Result<Instance> {
        self.create_instance_inner(req, Some(progress)).await
    }

    async fn create_instance_inner(
        &self,
        req: &CreateInstance,
        progress: Option<mpsc::Sender<Progress>>,
    ) -> Result<Instance> {
        let what = format!("instance \"{}\"", req.name);
        if self.instance_exists(&req.name).await? {
            return Err(Error::Conflict {
                what,
                message: format!("an instance named \"{}\" already exists", req.name),
            });
        }
        if let ImageSource::LocalAlias(alias) = &req.source {
            // Incus reports a missing local alias with an unhelpful message
            // ("Image not provided for instance creation"); check first.
            self.image_alias(alias).await?;
        }
        // Subscribe before the operation exists so no update is missed.
        let watcher = match progress {
            Some(tx) => {
                let ws = self
                    .transport
                    .websocket(
                        "/1.0/events?type=operation",
                        crate::transport::MAX_EVENT_MESSAGE,
                    )
                    .await?;
                let (id_tx, id_rx) = oneshot::channel();
                let task = tokio::spawn(forward_progress(ws, id_rx, tx));
                Some((id_tx, task))
            }
            None => None,
        };
        let answer = self
            .transport
            .json(Method::POST, "/1.0/instances", Some(&req.to_json()))
            .await?;
        let op = answer.into_operation("create instance")?;
        let task = watcher.map(|(id_tx, task)| {
            let _ = id_tx.send(op.id.clone());
            task
        });
        let result = self.wait_success(&op, self.op_timeout(), &what).await;
        if let Some(task) = task {
            // The watcher ends with the operation; bound the wait anyway.
            if tokio::time::timeout(Duration::from_secs(2), task)
                .await
                .is_err()
            {
                tracing::debug!("progress watcher did not end with the operation");
            }
        }
        result?;
        self.instance(&req.name).await
    }

    /// Merges configuration keys into an instance (`PATCH`); an empty value
    /// removes the key.
    pub async fn update_config(&self, name: &str, config: &BTreeMap<String, String>) -> Result<()> {
        self.patch_instance(name, &json!({ "config": config }))
            .await
    }

    /// Sends an arbitrary `PATCH` body (e.g. `{"devices": {...}}`).
    pub async fn patch_instance(&self, name: &str, body: &serde_json::Value) -> Result<()> {
        let path = instance_path(name);
        let answer = self
            .transport
            .json(Method::PATCH, &path, Some(body))
            .await?;
        self.complete(answer, self.op_timeout(), &instance_what(name))
            .await?;
        Ok(())
    }

    /// Deletes an instance. With `force`, a running instance is killed first;
    /// without it, deleting a running instance fails.
    pub async fn delete_instance(&self, name: &str, force: bool) -> Result<()> {
        if force {
            match self.stop(name, StopOptions::force()).await {
                Ok(()) => {}
                Err(e) if e.is_not_found() => return Err(e),
                Err(e) => {
                    tracing::debug!(instance = name, error = %e, "force stop before delete failed");
                }
            }
        }
        let path = instance_path(name);
        let answer = self
            .transport
            .json::<()>(Method::DELETE, &path, None)
            .await?;
        self.complete(answer, self.op_timeout(), &instance_what(name))
            .await?;
        Ok(())
    }

    /// Renames a stopped instance (Incus refuses to rename a running one).
    pub async fn rename_instance(&self, name: &str, new_name: &str) -> Result<()> {
        let path = instance_path(name);
        let answer = self
            .transport
            .json(Method::POST, &path, Some(&json!({ "name": new_name })))
            .await?;
        self.complete(answer, self.op_timeout(), &instance_what(name))
            .await?;
        Ok(())
    }

    // ----- state changes ---------------------------------------------------

    /// Starts an instance; starting a running instance is a no-op.
    pub async fn start(&self, name: &str) -> Result<()> {
        match self
            .change_state(name, json!({"action": "start"}), self.op_timeout())
            .await
        {
            Err(e) if already(&e, "already running") => Ok(()),
            r => r,
        }
    }

    /// Stops an instance; stopping a stopped instance is a no-op.
    pub async fn stop(&self, name: &str, opts: StopOptions) -> Result<()> {
        let body = state_body("stop", opts);
        match self.change_state(name, body, self.wait_for(opts)).await {
            Err(e) if already(&e, "already stopped") => Ok(()),
            r => r,
        }
    }

    /// Stops cleanly within `grace`, then kills if the clean stop failed.
    pub async fn stop_or_kill(&self, name: &str, grace: Duration) -> Result<()> {
        match self.stop(name, StopOptions::graceful(grace)).await {
            Ok(()) => Ok(()),
            Err(e) if e.is_not_found() || e.is_not_running() => Err(e),
            Err(e) => {
                tracing::debug!(instance = name, error = %e, "clean stop failed, killing");
                self.stop(name, StopOptions::force()).await
            }
        }
    }

    /// Restarts an instance.
    pub async fn restart(&self, name: &str, opts: StopOptions) -> Result<()> {
        let body = state_body("restart", opts);
        self.change_state(name, body, self.wait_for(opts)).await
    }

    /// Freezes (pauses) all processes of an instance.
    pub async fn freeze(&self, name: &str) -> Result<()> {
        self.change_state(name, json!({"action": "freeze"}), self.op_timeout())
            .await
    }

    /// Thaws a frozen instance.
    pub async fn unfreeze(&self, name: &str) -> Result<()> {
        self.change_state(name, json!({"action": "unfreeze"}), self.op_timeout())
            .await
    }

    fn wait_for(&self, opts: StopOptions) -> Duration {
        match opts.timeout {
            Some(t) => t + Duration::from_secs(30),
            None => self.op_timeout(),
        }
    }

    async fn change_state(
        &self,
        name: &str,
        body: serde_json::Value,
        timeout: Duration,
    ) -> Result<()> {
        let path = format!("{}/state", instance_path(name));
        let answer: Answer = self.transport.json(Method::PUT, &path, Some(&body)).await?;
        self.complete(answer, timeout, &instance_what(name)).await?;
        Ok(())
    }
}

fn state_body(action: &str, opts: StopOptions) -> serde_json::Value {
    let timeout: i64 = match opts.timeout {
        Some(t) => i64::try_from(t.as_secs().max(1)).unwrap_or(i64::MAX),
        None => -1,
    };
    json!({"action": action, "timeout": timeout, "force": opts.force, "stateful": false})
}

fn already(e: &Error, needle: &str) -> bool {
    match e {
        Error::Api { message, .. } | Error::OperationFailed { message, .. } => {
            message.to_ascii_lowercase().contains(needle)
        }
        _ => false,
    }
}

/// `/1.0/instances/{name}` with the name escaped.
pub(crate) fn instance_path(name: &str) -> String {
    format!("/1.0/instances/{}", percent_encode(name))
}

pub(crate) fn instance_what(name: &str) -> String {
    format!("instance \"{name}\"")
}

fn find_socket() -> Result<PathBuf> {
    find_socket_in(DEFAULT_SOCKETS.iter().map(PathBuf::from).collect())
}

fn find_socket_in(tried: Vec<PathBuf>) -> Result<PathBuf> {
    tried
        .iter()
        .find(|p| p.exists())
        .cloned()
        .ok_or(Error::NoSocket { tried })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn first_existing_socket_wins_and_none_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.socket");
        let b = dir.path().join("b.socket");
        let err = find_socket_in(vec![a.clone(), b.clone()]).unwrap_err();
        assert!(err.is_not_running());
        let msg = err.to_string();
        assert!(msg.contains("Incus is not running"), "{msg}");
        assert!(
            msg.contains("a.socket") && msg.contains("b.socket"),
            "{msg}"
        );
        std::fs::write(&b, b"").unwrap();
        assert_eq!(find_socket_in(vec![a.clone(), b.clone()]).unwrap(), b);
        std::fs::write(&a, b"").unwrap();
        assert_eq!(find_socket_in(vec![a.clone(), b]).unwrap(), a);
    }

    #[test]
    fn stop_body_carries_timeout_and_force() {
        let v = state_body("stop", StopOptions::graceful(Duration::from_secs(30)));
        assert_eq!(v["timeout"], 30);
        assert_eq!(v["force"], false);
        let v = state_body("stop", StopOptions::force());
        assert_eq!(v["timeout"], -1);
        assert_eq!(v["force"], true);
    }
}
