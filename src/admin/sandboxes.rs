//! `/v1/sandboxes`: add, list, show and remove sandboxes, and edit their
//! client keys, app port and agent login. Each call reads its request, asks
//! [`crate::sandbox`] for the rules and [`store`] for the record, and
//! answers with the sandbox's view once the routing snapshot has the
//! change.

use std::cell::RefCell;
use std::sync::Arc;

use http::{Response, StatusCode};
use hyper::body::Incoming;
use store::{Backend, Sandbox, SandboxStatus, Store};

use super::{blocking, json, read_json, AdminContext, ApiError, Body, MAX_BODY};
use crate::api::{AddSandbox, KeyRequest, SandboxView, SetAuth, SetPort};
use crate::sandbox::{self, key_views, view, NewSandbox, SandboxError};

pub(super) async fn list(ctx: &Arc<AdminContext>) -> Result<Response<Body>, ApiError> {
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

pub(super) async fn show(ctx: &Arc<AdminContext>, name: &str) -> Result<Response<Body>, ApiError> {
    Ok(json(StatusCode::OK, &view(&get(ctx, name).await?)))
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

/// Edits sandbox `name` in one store transaction under a domain rule:
/// when `edit` refuses, nothing is written and its [`SandboxError`] is the
/// answer; otherwise the call waits until the routing snapshot has the
/// change. Returns the record as it now is.
async fn edit(
    ctx: &Arc<AdminContext>,
    name: &str,
    edit: impl Fn(&mut Sandbox) -> Result<(), SandboxError> + Send + 'static,
) -> Result<Sandbox, ApiError> {
    let store = ctx.store.clone();
    let n = name.to_string();
    let (sb, seq) = blocking(move || {
        // The transaction may run `edit` more than once: its last run
        // decides.
        let refusal = RefCell::new(None);
        let (sb, seq) = store.update_if(&n, |sb| {
            let outcome = edit(sb);
            let write = outcome.is_ok();
            *refusal.borrow_mut() = outcome.err();
            Ok(write)
        })?;
        match refusal.into_inner() {
            Some(e) => Err(ApiError::from(e)),
            None => Ok((sb, seq)),
        }
    })
    .await?;
    if let Some(seq) = seq {
        ctx.routes.wait_applied(seq).await;
    }
    Ok(sb)
}

pub(super) async fn add(
    ctx: &Arc<AdminContext>,
    body: Incoming,
) -> Result<Response<Body>, ApiError> {
    let req: AddSandbox = read_json(body, MAX_BODY).await?;
    store::validate_name(&req.name)?;
    let sandbox = sandbox::new_sandbox(NewSandbox {
        domain: req.domain,
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

pub(super) async fn remove(
    ctx: &Arc<AdminContext>,
    name: &str,
) -> Result<Response<Body>, ApiError> {
    let n = name.to_string();
    let removed = commit(ctx, move |s| s.remove(&n)).await?;
    tracing::info!(sandbox = %name, "sandbox removed; routes gone");
    Ok(json(StatusCode::OK, &view(&removed)))
}

pub(super) async fn keys_list(
    ctx: &Arc<AdminContext>,
    name: &str,
) -> Result<Response<Body>, ApiError> {
    let sb = get(ctx, name).await?;
    Ok(json(StatusCode::OK, &key_views(&sb)))
}

pub(super) async fn keys_add(
    ctx: &Arc<AdminContext>,
    name: &str,
    body: Incoming,
) -> Result<Response<Body>, ApiError> {
    let req: KeyRequest = read_json(body, MAX_BODY).await?;
    let new = sandbox::keys_to_add(&req.keys)?;
    let n = name.to_string();
    let sb = commit(ctx, move |s| {
        s.update(&n, |sb| {
            sandbox::add_keys(&mut sb.client_keys, &new);
            Ok(())
        })
    })
    .await?;
    Ok(json(StatusCode::OK, &key_views(&sb)))
}

pub(super) async fn keys_remove(
    ctx: &Arc<AdminContext>,
    name: &str,
    body: Incoming,
) -> Result<Response<Body>, ApiError> {
    let req: KeyRequest = read_json(body, MAX_BODY).await?;
    let n = name.to_string();
    // The rule (each key known, one left) is checked on the record inside
    // the write.
    let sb = edit(ctx, name, move |sb| {
        sb.client_keys = sandbox::keys_after_removal(&n, &sb.client_keys, &req.keys)?;
        Ok(())
    })
    .await?;
    Ok(json(StatusCode::OK, &key_views(&sb)))
}

pub(super) async fn set_port(
    ctx: &Arc<AdminContext>,
    name: &str,
    body: Incoming,
) -> Result<Response<Body>, ApiError> {
    let req: SetPort = read_json(body, MAX_BODY).await?;
    // Checked against the record's agent port inside the write.
    let sb = edit(ctx, name, move |sb| {
        sandbox::check_ports(req.port, sb.agent_port)?;
        sb.app_port = req.port;
        Ok(())
    })
    .await?;
    Ok(json(StatusCode::OK, &view(&sb)))
}

pub(super) async fn set_auth(
    ctx: &Arc<AdminContext>,
    name: &str,
    body: Incoming,
) -> Result<Response<Body>, ApiError> {
    let req: SetAuth = read_json(body, MAX_BODY).await?;
    // Looked up before the password is hashed.
    get(ctx, name).await?;
    let auth = sandbox::basic_auth(req).await?;
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

pub(super) async fn clear_auth(
    ctx: &Arc<AdminContext>,
    name: &str,
) -> Result<Response<Body>, ApiError> {
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
