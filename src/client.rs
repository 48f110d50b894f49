//! The admin API client used by every CLI command except `serve`, `setup`
//! and `completions`.
//!
//! Before a byte is sent on a connection, the process serving the socket
//! must be root, the CLI's own user or the daemon's user (see
//! [`DAEMON_USER`]): a socket planted by someone else gets nothing.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::UnixStream;

use crate::api::{ErrorEnvelope, Event};

/// User the daemon runs as when set up by `sandboxd setup` (its `--user`
/// default); `SANDBOXD_DAEMON_USER` names another.
pub const DAEMON_USER: &str = "sandboxd";

/// Refuses an admin socket served by anyone but root, the daemon's user
/// ([`DAEMON_USER`] or `$SANDBOXD_DAEMON_USER`) or the CLI's own user (a
/// daemon run by hand). The kernel's record of who listens on the socket
/// (`SO_PEERCRED`, the uid that created and bound it) is checked, not the
/// file's owner, so nothing can change between check and use; it is done
/// before a byte is sent, so a socket planted by another user (on a
/// path given by `--admin-socket`, the environment, or a runtime directory
/// left behind) never sees a password, key or command.
fn check_server(stream: &UnixStream, socket: &Path) -> Result<()> {
    let cred = stream
        .peer_cred()
        .with_context(|| format!("cannot tell who serves {}", socket.display()))?;
    let uid = cred.uid();
    let me = nix::unistd::geteuid().as_raw();
    let daemon_user =
        std::env::var("SANDBOXD_DAEMON_USER").unwrap_or_else(|_| DAEMON_USER.to_string());
    let daemon_uid = nix::unistd::User::from_name(&daemon_user)
        .ok()
        .flatten()
        .map(|u| u.uid.as_raw());
    if uid == 0 || uid == me || Some(uid) == daemon_uid {
        return Ok(());
    }
    let who = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| format!("uid {uid} ({})", u.name))
        .unwrap_or_else(|| format!("uid {uid}"));
    bail!(
        "refusing the admin socket {}: it is served by {who}, not root, you or the daemon's user {daemon_user} (set SANDBOXD_DAEMON_USER if the daemon runs as another user); nothing was sent",
        socket.display()
    )
}

/// A connection factory for the admin socket.
pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(socket: &Path) -> Self {
        Client {
            socket: socket.to_path_buf(),
        }
    }

    async fn connect(&self) -> Result<UnixStream> {
        let path = self.socket.display();
        let stream = UnixStream::connect(&self.socket).await.map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => anyhow!(
                "cannot reach sandboxd: {path} does not exist (is `sandboxd serve` running? set --admin-socket or SANDBOXD_ADMIN_SOCKET)"
            ),
            std::io::ErrorKind::ConnectionRefused => {
                anyhow!("cannot reach sandboxd: nothing is listening on {path} (is `sandboxd serve` running?)")
            }
            std::io::ErrorKind::PermissionDenied => anyhow!(
                "permission denied on {path}: the admin API is open to root and the admin group only"
            ),
            _ => anyhow!("cannot reach sandboxd at {path}: {e}"),
        })?;
        check_server(&stream, &self.socket)?;
        Ok(stream)
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<http::Response<hyper::body::Incoming>> {
        let stream = self.connect().await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("admin API handshake")?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, "sandboxd");
        if body.is_some() {
            req = req.header(http::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .context("building request")?;
        sender
            .send_request(req)
            .await
            .context("admin API request failed")
    }

    fn error_of(status: StatusCode, bytes: &[u8]) -> anyhow::Error {
        match serde_json::from_slice::<ErrorEnvelope>(bytes) {
            Ok(env) => anyhow!("{}", env.error.message),
            Err(_) => anyhow!("daemon answered {status}"),
        }
    }

    /// One JSON call.
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T> {
        let body = body.map(serde_json::to_vec).transpose()?;
        let resp = self.send(method, path, body).await?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            return Err(Self::error_of(status, &bytes));
        }
        serde_json::from_slice(&bytes).context("daemon sent an unreadable answer")
    }

    /// A call whose body is raw JSON text (backup documents).
    pub async fn call_raw(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Bytes> {
        let resp = self.send(method, path, body).await?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            return Err(Self::error_of(status, &bytes));
        }
        Ok(bytes)
    }

    /// A streamed call: `on_event` sees every progress line; the result of
    /// the final `done` event is returned.
    pub async fn stream(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        mut on_event: impl FnMut(&Event),
    ) -> Result<serde_json::Value> {
        let resp = self.send(method, path, body).await?;
        let status = resp.status();
        let mut body = resp.into_body();
        if !status.is_success() {
            let bytes = body.collect().await?.to_bytes();
            return Err(Self::error_of(status, &bytes));
        }
        let mut buf: Vec<u8> = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.context("stream from daemon broke")?;
            let Some(data) = frame.data_ref() else {
                continue;
            };
            buf.extend_from_slice(data);
            while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=nl).collect();
                let event: Event =
                    serde_json::from_slice(&line).context("unreadable event from daemon")?;
                match event {
                    Event::Done { result } => return Ok(result),
                    Event::Error { error } => bail!("{}", error.message),
                    other => on_event(&other),
                }
            }
        }
        bail!("the daemon ended the operation without a result")
    }
}
