//! The admin API: HTTP/1.1 + JSON on a unix socket. Every CLI command but
//! `serve`, `setup` and `completions` is a client of it.
//!
//! A thin layer: each call parses its request, asks the sandbox domain
//! (`crate::sandbox`), the store or the lifecycle (`crate::lifecycle`), and
//! answers; `error.rs` is the one mapping of their errors, and of the
//! API's own refusals (body, caller, sessions, renewals), to an HTTP
//! status and a stable code. Files: this one (socket, access, dispatch,
//! status, sessions, certificates, backup/restore), `sandboxes.rs`
//! (`/v1/sandboxes`), `incus.rs` (`/v1/incus`), `error.rs`.
//!
//! Access: the socket is created 0600 (0660 with `admin_group`) inside a
//! directory only its owner can enter, and each connection's peer
//! credentials are checked again (root, the daemon's own uid, or a member of
//! the admin group): a socket whose mode was loosened by hand still refuses
//! other users.

use std::convert::Infallible;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use store::Store;
use tokio::net::UnixListener;
use tokio::sync::{mpsc, watch};

use crate::api::{self, ErrorEnvelope, Event, Status};
use crate::routes::Routes;
use crate::tlsfiles;

mod error;
mod incus;
mod sandboxes;
#[cfg(test)]
mod tests;

pub use error::ApiError;

pub(crate) type Body = UnsyncBoxBody<Bytes, Infallible>;

/// Largest request body accepted, except restores.
pub(crate) const MAX_BODY: usize = 1 << 20;
/// Largest backup accepted by restore.
const MAX_RESTORE_BODY: usize = 256 << 20;

/// What the admin API serves from.
pub struct AdminContext {
    pub store: Arc<Store>,
    pub routes: Arc<Routes>,
    pub started: Instant,
    pub admin_socket: PathBuf,
    pub ssh_listen: Vec<String>,
    pub https_listen: Vec<String>,
    pub http_listen: Vec<String>,
    /// The HTTPS gate, for `certs` and `ca-cert`.
    pub http: httpgate::HttpGateway,
    /// The SSH gate, for `sessions`.
    pub ssh: sshgate::Gateway,
    /// `ALGORITHM BASE64 SHA256:FP` per SSH host key.
    pub ssh_host_keys: Vec<String>,
    /// Incus sandboxes: create, start/stop, snapshots, import, stats.
    pub lifecycle: Arc<crate::lifecycle::Lifecycle>,
    /// Which domains may use `internal` TLS mode.
    pub tls_policy: tlsfiles::Policy,
}

/// Who may use the socket.
#[derive(Debug, Clone)]
pub struct Access {
    pub daemon_uid: u32,
    pub group: Option<nix::unistd::Gid>,
}

impl Access {
    fn allows(&self, uid: u32, gid: u32) -> bool {
        if uid == 0 || uid == self.daemon_uid {
            return true;
        }
        let Some(group) = self.group else {
            return false;
        };
        if gid == group.as_raw() {
            return true;
        }
        // Supplementary groups of the peer's user.
        let Ok(Some(user)) = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) else {
            return false;
        };
        let Ok(name) = std::ffi::CString::new(user.name) else {
            return false;
        };
        nix::unistd::getgrouplist(&name, user.gid)
            .map(|groups| groups.contains(&group))
            .unwrap_or(false)
    }
}

fn full(status: StatusCode, content_type: &str, bytes: Vec<u8>) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(bytes)).boxed_unsync());
    *resp.status_mut() = status;
    if let Ok(v) = http::HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    resp
}

pub(crate) fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    match serde_json::to_vec_pretty(value) {
        Ok(mut bytes) => {
            bytes.push(b'\n');
            full(status, "application/json", bytes)
        }
        Err(e) => error_response(&ApiError::internal(format!("encoding response: {e}"))),
    }
}

fn error_response(e: &ApiError) -> Response<Body> {
    let env = ErrorEnvelope { error: e.body() };
    let bytes = serde_json::to_vec(&env).unwrap_or_default();
    full(e.status, "application/json", bytes)
}

/// A streamed NDJSON response fed by the returned sender.
pub(crate) fn event_stream() -> (mpsc::Sender<Event>, Response<Body>) {
    let (tx, rx) = mpsc::channel::<Event>(64);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        let event = rx.recv().await?;
        let mut line = serde_json::to_vec(&event).unwrap_or_default();
        line.push(b'\n');
        Some((Ok::<_, Infallible>(Frame::data(Bytes::from(line))), rx))
    });
    let mut resp = Response::new(StreamBody::new(stream).boxed_unsync());
    if let Ok(v) = http::HeaderValue::from_str(api::NDJSON) {
        resp.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    (tx, resp)
}

pub(crate) async fn read_json<T: serde::de::DeserializeOwned>(
    body: Incoming,
    limit: usize,
) -> Result<T, ApiError> {
    let bytes = match Limited::new(body, limit).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(ApiError::body_too_large(limit))
        }
        Err(e) => return Err(ApiError::bad(format!("reading request body: {e}"))),
    };
    serde_json::from_slice(&bytes).map_err(|e| ApiError::malformed_json(&e))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("worker failed: {e}")))?
}

/// Binds the admin socket: parent directory 0700 (0750 with a group), no
/// clobbering of a live daemon's socket, mode 0600 (0660 with a group).
pub fn bind_socket(path: &Path, group: Option<nix::unistd::Gid>) -> std::io::Result<UnixListener> {
    use std::io::{Error, ErrorKind};
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(if group.is_some() { 0o750 } else { 0o700 })
                .create(parent)?;
            if let Some(g) = group {
                nix::unistd::chown(parent, None, Some(g)).map_err(Error::from)?;
            }
        }
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(Error::new(
                ErrorKind::AddrInUse,
                format!("another sandboxd is serving {}", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    let mode = if group.is_some() { 0o660 } else { 0o600 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    if let Some(g) = group {
        nix::unistd::chown(path, None, Some(g)).map_err(Error::from)?;
    }
    Ok(listener)
}

/// Serves the admin API until `shutdown` turns true.
pub async fn serve(
    listener: UnixListener,
    ctx: Arc<AdminContext>,
    access: Access,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    continue;
                }
            },
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let peer = stream.peer_cred().ok();
        let permitted = peer
            .map(|c| access.allows(c.uid(), c.gid()))
            .unwrap_or(false);
        if !permitted {
            tracing::warn!(uid = ?peer.map(|c| c.uid()), "admin connection refused: uid not permitted");
        }
        let uid = peer.map(|c| c.uid());
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let ctx = ctx.clone();
                async move {
                    let resp = if permitted {
                        route(ctx, req).await
                    } else {
                        error_response(&ApiError::forbidden(uid))
                    };
                    Ok::<_, Infallible>(resp)
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .max_buf_size(64 * 1024)
                .serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "admin connection ended with an error");
            }
        });
    }
}

async fn route(ctx: Arc<AdminContext>, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let result = match (&method, segments.as_slice()) {
        (&Method::GET, ["v1", "status"]) => Ok(json(StatusCode::OK, &status(&ctx))),
        (&Method::GET, ["v1", "routes"]) => Ok(json(StatusCode::OK, &ctx.routes.snapshot().dump())),
        (&Method::GET, ["v1", "sandboxes"]) => sandboxes::list(&ctx).await,
        (&Method::POST, ["v1", "sandboxes"]) => sandboxes::add(&ctx, req.into_body()).await,
        (&Method::GET, ["v1", "sandboxes", name]) => sandboxes::show(&ctx, name).await,
        (&Method::DELETE, ["v1", "sandboxes", name]) => sandboxes::remove(&ctx, name).await,
        (&Method::GET, ["v1", "sandboxes", name, "keys"]) => sandboxes::keys_list(&ctx, name).await,
        (&Method::POST, ["v1", "sandboxes", name, "keys"]) => {
            sandboxes::keys_add(&ctx, name, req.into_body()).await
        }
        (&Method::DELETE, ["v1", "sandboxes", name, "keys"]) => {
            sandboxes::keys_remove(&ctx, name, req.into_body()).await
        }
        (&Method::PUT, ["v1", "sandboxes", name, "app-port"]) => {
            sandboxes::set_port(&ctx, name, req.into_body()).await
        }
        (&Method::PUT, ["v1", "sandboxes", name, "auth"]) => {
            sandboxes::set_auth(&ctx, name, req.into_body()).await
        }
        (&Method::DELETE, ["v1", "sandboxes", name, "auth"]) => {
            sandboxes::clear_auth(&ctx, name).await
        }
        (&Method::GET, ["v1", "sessions"]) => Ok(json(StatusCode::OK, &ctx.ssh.sessions())),
        (&Method::DELETE, ["v1", "sessions", id]) => kill_session(&ctx, id),
        (&Method::GET, ["v1", "certs"]) => Ok(json(StatusCode::OK, &ctx.http.certs())),
        (&Method::POST, ["v1", "certs", domain, "renew"]) => renew(&ctx, domain).await,
        (&Method::GET, ["v1", "ca-cert"]) => Ok(full(
            StatusCode::OK,
            "application/x-pem-file",
            ctx.http.ca_cert_pem().into_bytes(),
        )),
        (&Method::GET, ["v1", "host-keys"]) => Ok(json(StatusCode::OK, &ctx.ssh_host_keys)),
        (&Method::GET, ["v1", "backup"]) => backup(&ctx).await,
        (&Method::POST, ["v1", "restore"]) => {
            let replace = query.split('&').any(|kv| kv == "replace=true");
            restore(&ctx, req.into_body(), replace).await
        }
        (_, ["v1", "incus", rest @ ..]) => incus::handle(&ctx, &method, rest, req).await,
        (_, ["v1", ..]) => Err(ApiError::not_found_call(format!(
            "no admin call {method} {path}"
        ))),
        _ => Err(ApiError::not_found_call(format!(
            "no admin call {method} {path} (this daemon speaks /v1/)"
        ))),
    };
    let resp = result.unwrap_or_else(|e| error_response(&e));
    tracing::debug!(%method, %path, status = resp.status().as_u16(), "admin call");
    resp
}

fn status(ctx: &AdminContext) -> Status {
    let table = ctx.routes.snapshot();
    Status {
        version: env!("CARGO_PKG_VERSION").to_string(),
        pid: std::process::id(),
        uptime_secs: ctx.started.elapsed().as_secs(),
        state_dir: ctx.store.dir().display().to_string(),
        admin_socket: ctx.admin_socket.display().to_string(),
        ssh_listen: ctx.ssh_listen.clone(),
        https_listen: ctx.https_listen.clone(),
        http_listen: ctx.http_listen.clone(),
        sandboxes: ctx.store.len(),
        routes: table.entries(),
        route_generation: table.generation,
        https_connections: ctx.http.open_connections(),
        ca_notice: ctx.http.ca_replaced(),
    }
}

async fn renew(ctx: &AdminContext, domain: &str) -> Result<Response<Body>, ApiError> {
    match ctx.http.renew(domain).await {
        Ok(()) => {
            let status = ctx.http.certs().into_iter().find(|c| c.domain == domain);
            Ok(json(StatusCode::OK, &status))
        }
        Err(e) => Err(ApiError::renew_failed(&e)),
    }
}

fn kill_session(ctx: &AdminContext, id: &str) -> Result<Response<Body>, ApiError> {
    let Ok(n) = id.parse::<u64>() else {
        return Err(ApiError::bad(format!("session id {id:?} is not a number")));
    };
    if ctx.ssh.kill(n) {
        tracing::info!(session = n, "session killed by an administrator");
        Ok(json(StatusCode::OK, &serde_json::json!({ "killed": n })))
    } else {
        Err(ApiError::no_such_session(n))
    }
}

async fn backup(ctx: &Arc<AdminContext>) -> Result<Response<Body>, ApiError> {
    let store = ctx.store.clone();
    let doc = blocking(move || store.export().map_err(ApiError::from)).await?;
    tracing::info!(sandboxes = doc.sandboxes.len(), "backup exported");
    Ok(json(StatusCode::OK, &doc))
}

async fn restore(
    ctx: &Arc<AdminContext>,
    body: Incoming,
    replace: bool,
) -> Result<Response<Body>, ApiError> {
    let doc: store::Backup = read_json(body, MAX_RESTORE_BODY).await?;
    // Reject a bad document with a plain error before streaming anything.
    Store::check_backup(&doc)?;
    let (tx, resp) = event_stream();
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let total = doc.sandboxes.len() as u64;
        let records: usize = doc.records.values().map(|m| m.len()).sum();
        let store = ctx.store.clone();
        let progress = tx.clone();
        let outcome = blocking(move || {
            let mut done = 0u64;
            store
                .import(&doc, replace, |_| {
                    done += 1;
                    if done == total || done.is_multiple_of(50) {
                        let _ = progress.blocking_send(Event::Progress {
                            step: "restore".into(),
                            done,
                            total,
                        });
                    }
                })
                .map_err(ApiError::from)
        })
        .await;
        let event = match outcome {
            Ok(seq) => {
                ctx.routes.wait_applied(seq).await;
                ctx.lifecycle.recheck_authorized_keys();
                tracing::info!(sandboxes = total, records, "backup restored");
                Event::Done {
                    result: serde_json::json!(api::RestoreResult {
                        sandboxes: total as usize,
                        records
                    }),
                }
            }
            Err(e) => Event::Error { error: e.body() },
        };
        let _ = tx.send(event).await;
    });
    Ok(resp)
}
