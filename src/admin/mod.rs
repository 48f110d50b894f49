//! The admin API: HTTP/1.1 + JSON on a unix socket. Every CLI command other
//! than `serve` is a client of it.
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
use store::{Backend, KeyPair, Sandbox, SandboxStatus, Store};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, watch};

use crate::api::{
    self, AddSandbox, ErrorBody, ErrorEnvelope, Event, KeyRequest, SandboxView, SetAuth, SetPort,
    Status,
};
use crate::keys;
use crate::routes::Routes;
use crate::tlsfiles;

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

/// A failed call: HTTP status, stable code, one-line message.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
    pub(crate) fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_argument", message)
    }
    pub(crate) fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
    fn body(&self) -> ErrorBody {
        ErrorBody {
            code: self.code.to_string(),
            message: self.message.clone(),
        }
    }
}

impl From<store::Error> for ApiError {
    fn from(e: store::Error) -> Self {
        use store::Error as E;
        let status = match &e {
            E::Invalid { .. } | E::BadBackup(_) => StatusCode::BAD_REQUEST,
            E::NameTaken(_) | E::HostTaken { .. } | E::NotEmpty(_) => StatusCode::CONFLICT,
            E::NotFound(_) => StatusCode::NOT_FOUND,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.code(), e.to_string())
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
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("request body larger than {limit} bytes"),
            ))
        }
        Err(e) => return Err(ApiError::bad(format!("reading request body: {e}"))),
    };
    serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed_json",
            format!("request body: {e}"),
        )
    })
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
                        let uid = uid
                            .map(|u| u.to_string())
                            .unwrap_or_else(|| "unknown".into());
                        error_response(&ApiError::new(
                            StatusCode::FORBIDDEN,
                            "forbidden",
                            format!("uid {uid} may not use the sandboxd admin API (root or the admin group only)"),
                        ))
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
        (&Method::GET, ["v1", "sandboxes"]) => list(&ctx).await,
        (&Method::POST, ["v1", "sandboxes"]) => add(&ctx, req.into_body()).await,
        (&Method::GET, ["v1", "sandboxes", name]) => show(&ctx, name).await,
        (&Method::DELETE, ["v1", "sandboxes", name]) => remove(&ctx, name).await,
        (&Method::GET, ["v1", "sandboxes", name, "keys"]) => keys_list(&ctx, name).await,
        (&Method::POST, ["v1", "sandboxes", name, "keys"]) => {
            keys_add(&ctx, name, req.into_body()).await
        }
        (&Method::DELETE, ["v1", "sandboxes", name, "keys"]) => {
            keys_remove(&ctx, name, req.into_body()).await
        }
        (&Method::PUT, ["v1", "sandboxes", name, "app-port"]) => {
            set_port(&ctx, name, req.into_body()).await
        }
        (&Method::PUT, ["v1", "sandboxes", name, "auth"]) => {
            set_auth(&ctx, name, req.into_body()).await
        }
        (&Method::DELETE, ["v1", "sandboxes", name, "auth"]) => clear_auth(&ctx, name).await,
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
        (_, ["v1", "incus", rest @ ..]) => {
            crate::lifecycle::http::handle(&ctx, &method, rest, req).await
        }
        (_, ["v1", ..]) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "no_such_call",
            format!("no admin call {method} {path}"),
        )),
        _ => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "no_such_call",
            format!("no admin call {method} {path} (this daemon speaks /v1/)"),
        )),
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

/// The public view of a sandbox: no private key, no password hash.
pub fn view(sb: &Sandbox) -> SandboxView {
    let (backend, upstream) = match &sb.backend {
        Backend::Static { host } => ("static", host.clone()),
        Backend::Incus { instance } => ("incus", instance.clone()),
    };
    let (status, status_reason) = match &sb.status {
        SandboxStatus::Running => ("running".to_string(), None),
        SandboxStatus::Stopped => ("stopped".to_string(), None),
        SandboxStatus::Creating { step } => ("creating".to_string(), Some(step.clone())),
        SandboxStatus::Failed { reason } => ("failed".to_string(), Some(reason.clone())),
    };
    SandboxView {
        name: sb.name.clone(),
        domain: sb.domain.clone(),
        agent_host: sb.agent_host(),
        backend: backend.into(),
        upstream,
        ssh_port: sb.ssh_port,
        app_port: sb.app_port,
        agent_port: sb.agent_port,
        user: sb.user.clone(),
        status,
        status_reason,
        addresses: sb.addresses.clone(),
        assigned_ipv4: sb.assigned_ipv4.clone(),
        egress: match &sb.backend {
            Backend::Incus { .. } => Some(sb.egress.mode.as_str().to_string()),
            Backend::Static { .. } => None,
        },
        egress_allow: sb.egress.allow.clone(),
        client_keys: sb.client_keys.iter().map(|k| keys::view(k)).collect(),
        upstream_public_key: sb.upstream_key.public_openssh.clone(),
        upstream_host_key: sb.upstream_host_key.clone(),
        auth_user: sb.basic_auth.as_ref().map(|a| a.user.clone()),
        tls_mode: sb.tls_mode.clone(),
        tls_cert_file: sb.tls_cert_file.clone(),
        tls_key_file: sb.tls_key_file.clone(),
        created_at: sb.created_at,
        updated_at: sb.updated_at,
    }
}

async fn list(ctx: &Arc<AdminContext>) -> Result<Response<Body>, ApiError> {
    let store = ctx.store.clone();
    let all = blocking(move || store.list().map_err(ApiError::from)).await?;
    let views: Vec<SandboxView> = all.iter().map(view).collect();
    Ok(json(StatusCode::OK, &views))
}

async fn get(ctx: &Arc<AdminContext>, name: &str) -> Result<Sandbox, ApiError> {
    let store = ctx.store.clone();
    let n = name.to_string();
    blocking(move || store.get(&n).map_err(ApiError::from))
        .await?
        .ok_or_else(|| store::Error::NotFound(name.to_string()).into())
}

async fn show(ctx: &Arc<AdminContext>, name: &str) -> Result<Response<Body>, ApiError> {
    Ok(json(StatusCode::OK, &view(&get(ctx, name).await?)))
}

pub(crate) fn parse_keys(lines: &[String]) -> Result<Vec<String>, ApiError> {
    lines
        .iter()
        .map(|l| {
            keys::parse_public(l)
                .map(|k| keys::to_line(&k))
                .map_err(|e| ApiError::bad(e.to_string()))
        })
        .collect()
}

pub(crate) fn check_auth(auth: &SetAuth) -> Result<(), ApiError> {
    if auth.user.is_empty()
        || auth.user.len() > 64
        || auth.user.contains(':')
        || auth.user.chars().any(char::is_control)
    {
        return Err(ApiError::bad(
            "auth user must be 1 to 64 characters, without ':' or control characters",
        ));
    }
    if auth.password.is_empty() || auth.password.len() > 1024 {
        return Err(ApiError::bad("password must be 1 to 1024 bytes"));
    }
    Ok(())
}

/// The app port must not be the agent port: the app domain is served
/// without a login, so it would open the agent to everyone.
pub(crate) fn check_ports(app_port: u16, agent_port: u16) -> Result<(), store::Error> {
    if app_port == agent_port {
        return Err(store::Error::Invalid {
            field: "app port",
            reason: format!(
                "{app_port} is the agent port: the app domain has no login, so it would serve the agent to anyone; pick another port"
            ),
        });
    }
    Ok(())
}

/// Hashes a password as an argon2id PHC string (off the async threads).
pub(crate) async fn hash_password(password: String) -> Result<String, ApiError> {
    blocking(move || {
        use argon2::password_hash::{PasswordHasher, SaltString};
        let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
        argon2::Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|e| ApiError::internal(format!("hashing password: {e}")))
    })
    .await
}

/// Commits through `f` on a blocking thread, then waits until the routing
/// snapshot includes the change.
async fn commit<T: Send + 'static>(
    ctx: &Arc<AdminContext>,
    f: impl FnOnce(&Store) -> Result<(T, u64), store::Error> + Send + 'static,
) -> Result<T, ApiError> {
    let store = ctx.store.clone();
    let (value, seq) = blocking(move || f(&store).map_err(ApiError::from)).await?;
    ctx.routes.wait_applied(seq).await;
    Ok(value)
}

/// What a new sandbox record is made from; shared by `add` (static
/// backends) and the Incus `create`/`import`.
pub(crate) struct NewSandbox {
    pub name: String,
    pub domain: String,
    pub backend: Backend,
    pub ssh_port: u16,
    pub app_port: u16,
    pub agent_port: u16,
    pub agent_prefix: String,
    pub user: String,
    pub ssh_keys: Vec<String>,
    pub upstream_host_key: Option<String>,
    pub auth: Option<SetAuth>,
    pub tls_mode: Option<String>,
    /// `manual` mode's PEM files (certificate chain, key), absolute paths;
    /// checked by [`crate::tlsfiles`].
    pub tls_cert_file: Option<String>,
    pub tls_key_file: Option<String>,
    pub status: SandboxStatus,
    /// Which domains may use `internal` TLS mode.
    pub tls_policy: tlsfiles::Policy,
}

/// Checks what the store cannot (client keys, host key, auth, TLS mode
/// and manual files),
/// hashes the password and makes the gateway's key pair. The record is
/// not stored yet; its shape is checked by the store's insert.
pub(crate) async fn new_sandbox(req: NewSandbox) -> Result<Sandbox, ApiError> {
    check_ports(req.app_port, req.agent_port).map_err(ApiError::from)?;
    if req.ssh_keys.is_empty() {
        return Err(ApiError::bad(
            "at least one client SSH key is needed, or nobody could log in",
        ));
    }
    let client_keys = parse_keys(&req.ssh_keys)?;
    let upstream_host_key = match &req.upstream_host_key {
        Some(k) => Some(
            keys::parse_public(k)
                .map(|k| keys::to_line(&k))
                .map_err(|e| ApiError::bad(format!("upstream host key: {e}")))?,
        ),
        None => None,
    };
    let basic_auth = match req.auth {
        Some(auth) => {
            check_auth(&auth)?;
            Some(store::BasicAuth {
                user: auth.user.clone(),
                password_hash: hash_password(auth.password).await?,
            })
        }
        None => None,
    };
    let tls_files =
        tlsfiles::settings(req.tls_mode.as_deref(), req.tls_cert_file, req.tls_key_file)
            .map_err(|e| ApiError::bad(e.to_string()))?;
    // A malformed domain gets the store's message, not this one.
    if store::validate_domain(&req.domain).is_ok() {
        req.tls_policy
            .check(req.tls_mode.as_deref(), &req.domain)
            .map_err(|e| ApiError::bad(e.to_string()))?;
    }
    let (tls_cert_file, tls_key_file) = match tls_files {
        Some(files) => {
            let checked = files.clone();
            blocking(move || {
                tlsfiles::check_files(&checked).map_err(|e| ApiError::bad(e.to_string()))
            })
            .await?;
            (Some(files.cert), Some(files.key))
        }
        None => (None, None),
    };
    let (private, public) = keys::generate_ed25519(&format!("sandboxd@{}", req.name))
        .map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(Sandbox {
        name: req.name,
        domain: req.domain,
        backend: req.backend,
        ssh_port: req.ssh_port,
        app_port: req.app_port,
        agent_port: req.agent_port,
        agent_prefix: req.agent_prefix,
        user: req.user,
        client_keys,
        upstream_key: KeyPair {
            private_openssh: private,
            public_openssh: public,
        },
        upstream_host_key,
        basic_auth,
        tls_mode: req.tls_mode,
        tls_cert_file,
        tls_key_file,
        status: req.status,
        addresses: vec![],
        assigned_ipv4: None,
        egress: Default::default(),
        created_at: 0,
        updated_at: 0,
    })
}

async fn add(ctx: &Arc<AdminContext>, body: Incoming) -> Result<Response<Body>, ApiError> {
    let req: AddSandbox = read_json(body, MAX_BODY).await?;
    store::validate_name(&req.name)?;
    let sandbox = new_sandbox(NewSandbox {
        domain: req.domain.trim().to_ascii_lowercase(),
        backend: Backend::Static {
            host: req.upstream.trim().to_string(),
        },
        ssh_port: req.ssh_port.unwrap_or(store::DEFAULT_SSH_PORT),
        app_port: req.app_port.unwrap_or(store::DEFAULT_APP_PORT),
        agent_port: req.agent_port.unwrap_or(store::DEFAULT_AGENT_PORT),
        agent_prefix: req
            .agent_prefix
            .unwrap_or_else(|| store::DEFAULT_AGENT_PREFIX.to_string()),
        user: req.user.unwrap_or_else(|| "root".to_string()),
        ssh_keys: req.ssh_keys,
        upstream_host_key: req.upstream_host_key,
        auth: req.auth,
        tls_cert_file: req.tls_cert_file,
        tls_key_file: req.tls_key_file,
        tls_mode: req.tls_mode,
        status: SandboxStatus::Running,
        name: req.name,
        tls_policy: ctx.tls_policy.clone(),
    })
    .await?;
    let name = sandbox.name.clone();
    commit(ctx, move |s| s.insert(sandbox).map(|seq| ((), seq))).await?;
    tracing::info!(sandbox = %name, "sandbox added; routes live");
    let sb = get(ctx, &name).await?;
    Ok(json(StatusCode::CREATED, &view(&sb)))
}

async fn remove(ctx: &Arc<AdminContext>, name: &str) -> Result<Response<Body>, ApiError> {
    let n = name.to_string();
    let removed = commit(ctx, move |s| s.remove(&n)).await?;
    tracing::info!(sandbox = %name, "sandbox removed; routes gone");
    Ok(json(StatusCode::OK, &view(&removed)))
}

fn key_views(sb: &Sandbox) -> Vec<api::KeyView> {
    sb.client_keys.iter().map(|k| keys::view(k)).collect()
}

async fn keys_list(ctx: &Arc<AdminContext>, name: &str) -> Result<Response<Body>, ApiError> {
    let sb = get(ctx, name).await?;
    Ok(json(StatusCode::OK, &key_views(&sb)))
}

async fn keys_add(
    ctx: &Arc<AdminContext>,
    name: &str,
    body: Incoming,
) -> Result<Response<Body>, ApiError> {
    let req: KeyRequest = read_json(body, MAX_BODY).await?;
    if req.keys.is_empty() {
        return Err(ApiError::bad("no key given"));
    }
    let new: Vec<(String, russh::keys::PublicKey)> = req
        .keys
        .iter()
        .map(|l| {
            keys::parse_public(l)
                .map(|k| (keys::to_line(&k), k))
                .map_err(|e| ApiError::bad(e.to_string()))
        })
        .collect::<Result<_, _>>()?;
    let n = name.to_string();
    let sb = commit(ctx, move |s| {
        s.update(&n, |sb| {
            for (line, key) in &new {
                if !sb.client_keys.iter().any(|k| keys::same_key(k, key)) {
                    sb.client_keys.push(line.clone());
                }
            }
            Ok(())
        })
    })
    .await?;
    Ok(json(StatusCode::OK, &key_views(&sb)))
}

async fn keys_remove(
    ctx: &Arc<AdminContext>,
    name: &str,
    body: Incoming,
) -> Result<Response<Body>, ApiError> {
    let req: KeyRequest = read_json(body, MAX_BODY).await?;
    if req.keys.is_empty() {
        return Err(ApiError::bad("no key given"));
    }
    let current = get(ctx, name).await?;
    let mut keep = current.client_keys.clone();
    for wanted in &req.keys {
        let before = keep.len();
        if wanted.starts_with("SHA256:") {
            keep.retain(|k| keys::view(k).fingerprint != *wanted);
        } else {
            let key = keys::parse_public(wanted).map_err(|e| ApiError::bad(e.to_string()))?;
            keep.retain(|k| !keys::same_key(k, &key));
        }
        if keep.len() == before {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "key_not_found",
                format!("sandbox {name} has no key matching {wanted}"),
            ));
        }
    }
    if keep.is_empty() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "last_key",
            format!("removing that would leave {name} with no client key; add another first"),
        ));
    }
    let n = name.to_string();
    let expected = current.client_keys.clone();
    let sb = commit(ctx, move |s| {
        s.update(&n, |sb| {
            if sb.client_keys != expected {
                return Err(store::Error::Invalid {
                    field: "ssh key",
                    reason: "keys changed meanwhile; try again".into(),
                });
            }
            sb.client_keys = keep.clone();
            Ok(())
        })
    })
    .await?;
    Ok(json(StatusCode::OK, &key_views(&sb)))
}

async fn set_port(
    ctx: &Arc<AdminContext>,
    name: &str,
    body: Incoming,
) -> Result<Response<Body>, ApiError> {
    let req: SetPort = read_json(body, MAX_BODY).await?;
    let n = name.to_string();
    let sb = commit(ctx, move |s| {
        s.update(&n, |sb| {
            check_ports(req.port, sb.agent_port)?;
            sb.app_port = req.port;
            Ok(())
        })
    })
    .await?;
    Ok(json(StatusCode::OK, &view(&sb)))
}

async fn set_auth(
    ctx: &Arc<AdminContext>,
    name: &str,
    body: Incoming,
) -> Result<Response<Body>, ApiError> {
    let req: SetAuth = read_json(body, MAX_BODY).await?;
    check_auth(&req)?;
    get(ctx, name).await?;
    let auth = store::BasicAuth {
        user: req.user.clone(),
        password_hash: hash_password(req.password).await?,
    };
    let n = name.to_string();
    let sb = commit(ctx, move |s| {
        s.update(&n, |sb| {
            sb.basic_auth = Some(auth.clone());
            Ok(())
        })
    })
    .await?;
    Ok(json(StatusCode::OK, &view(&sb)))
}

async fn clear_auth(ctx: &Arc<AdminContext>, name: &str) -> Result<Response<Body>, ApiError> {
    let n = name.to_string();
    let sb = commit(ctx, move |s| {
        s.update(&n, |sb| {
            sb.basic_auth = None;
            Ok(())
        })
    })
    .await?;
    Ok(json(StatusCode::OK, &view(&sb)))
}

async fn renew(ctx: &AdminContext, domain: &str) -> Result<Response<Body>, ApiError> {
    match ctx.http.renew(domain).await {
        Ok(()) => {
            let status = ctx.http.certs().into_iter().find(|c| c.domain == domain);
            Ok(json(StatusCode::OK, &status))
        }
        Err(e) => Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            "renew_failed",
            e.to_string(),
        )),
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
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "no_such_session",
            format!("no live session {n}"),
        ))
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
