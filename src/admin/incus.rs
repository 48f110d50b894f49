//! Admin API calls of the Incus lifecycle, under `/v1/incus/`:
//!
//! | call | answer |
//! |------|--------|
//! | `POST create` (body [`CreateSandbox`]) | NDJSON events, `done` with the sandbox |
//! | `POST import` (body [`ImportSandbox`]) | NDJSON events, `done` with the sandbox |
//! | `GET unmanaged` | instances no sandbox manages |
//! | `GET stats` | [`crate::api::incus::StatsAnswer`] from one Incus listing |
//! | `POST sandboxes/NAME/{start,stop,restart}` | the sandbox |
//! | `DELETE sandboxes/NAME` | the deleted sandbox |
//! | `POST sandboxes/NAME/egress` (body [`SetEgress`]) | the sandbox, policy applied |
//! | `GET`/`POST sandboxes/NAME/snapshots` | snapshots / the new snapshot |
//! | `POST sandboxes/NAME/snapshots/SNAP/restore` | the sandbox |
//! | `DELETE sandboxes/NAME/snapshots/SNAP` | `{}` |
//! | `POST images/build` (body [`ImageBuild`]) | NDJSON events, `done` with the image |
//! | `POST sandboxes/NAME/update-agent` | NDJSON events, `done` with the step |
//!
//! This module only translates HTTP to [`crate::lifecycle::Lifecycle`]
//! calls; their errors get their status and code from [`super::error`].

use std::sync::Arc;

use http::{Method, Request, StatusCode};
use hyper::body::Incoming;

use super::{event_stream, json, read_json, AdminContext, ApiError, Body, MAX_BODY};
use crate::api::incus::{CreateSandbox, ImageBuild, ImportSandbox, SetEgress, SnapshotRequest};
use crate::api::Event;
use crate::lifecycle::{LifecycleError, Progress};

/// Handles `/v1/incus/REST...`.
pub(super) async fn handle(
    ctx: &Arc<AdminContext>,
    method: &Method,
    rest: &[&str],
    req: Request<Incoming>,
) -> Result<http::Response<Body>, ApiError> {
    let lc = &ctx.lifecycle;
    match (method, rest) {
        (&Method::POST, ["create"]) => {
            let body: CreateSandbox = read_json(req.into_body(), MAX_BODY).await?;
            let lc = lc.clone();
            Ok(streamed(move |p| async move { lc.create(body, p).await }))
        }
        (&Method::POST, ["import"]) => {
            let body: ImportSandbox = read_json(req.into_body(), MAX_BODY).await?;
            let lc = lc.clone();
            Ok(streamed(move |p| async move { lc.import(body, p).await }))
        }
        (&Method::POST, ["images", "build"]) => {
            let body: ImageBuild = read_json(req.into_body(), MAX_BODY).await?;
            let lc = lc.clone();
            Ok(streamed(
                move |p| async move { lc.build_image(body, p).await },
            ))
        }
        (&Method::POST, ["sandboxes", name, "update-agent"]) => {
            let lc = lc.clone();
            let name = name.to_string();
            Ok(streamed(
                move |p| async move { lc.update_agent(&name, p).await },
            ))
        }
        (&Method::GET, ["unmanaged"]) => Ok(json(StatusCode::OK, &lc.unmanaged().await?)),
        (&Method::GET, ["stats"]) => Ok(json(StatusCode::OK, &lc.stats().await)),
        (&Method::POST, ["sandboxes", name, "start"]) => {
            Ok(json(StatusCode::OK, &lc.start(name).await?))
        }
        (&Method::POST, ["sandboxes", name, "stop"]) => {
            Ok(json(StatusCode::OK, &lc.stop(name).await?))
        }
        (&Method::POST, ["sandboxes", name, "restart"]) => {
            Ok(json(StatusCode::OK, &lc.restart(name).await?))
        }
        (&Method::DELETE, ["sandboxes", name]) => Ok(json(StatusCode::OK, &lc.delete(name).await?)),
        (&Method::POST, ["sandboxes", name, "egress"]) => {
            let body: SetEgress = read_json(req.into_body(), MAX_BODY).await?;
            let egress = body.to_egress().map_err(ApiError::bad)?;
            Ok(json(StatusCode::OK, &lc.set_egress(name, egress).await?))
        }
        (&Method::GET, ["sandboxes", name, "snapshots"]) => {
            Ok(json(StatusCode::OK, &lc.snapshot_list(name).await?))
        }
        (&Method::POST, ["sandboxes", name, "snapshots"]) => {
            let body: SnapshotRequest = read_json(req.into_body(), MAX_BODY).await?;
            Ok(json(
                StatusCode::CREATED,
                &lc.snapshot_create(name, body.name).await?,
            ))
        }
        (&Method::POST, ["sandboxes", name, "snapshots", snap, "restore"]) => Ok(json(
            StatusCode::OK,
            &lc.snapshot_restore(name, snap).await?,
        )),
        (&Method::DELETE, ["sandboxes", name, "snapshots", snap]) => {
            lc.snapshot_delete(name, snap).await?;
            Ok(json(StatusCode::OK, &serde_json::json!({})))
        }
        _ => Err(ApiError::not_found_call(format!(
            "no admin call {method} /v1/incus/{}",
            rest.join("/")
        ))),
    }
}

/// Runs `op` in its own task (it goes on if the client leaves) and streams
/// its progress, then `done` or `error`.
fn streamed<F, Fut, T>(op: F) -> http::Response<Body>
where
    F: FnOnce(Progress) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, LifecycleError>> + Send,
    T: serde::Serialize + Send,
{
    let (tx, resp) = event_stream();
    tokio::spawn(async move {
        let outcome = op(Progress::new(tx.clone())).await;
        let event = match outcome {
            Ok(view) => Event::Done {
                result: serde_json::to_value(&view).unwrap_or_default(),
            },
            Err(e) => Event::Error {
                error: ApiError::from(e).body(),
            },
        };
        let _ = tx.send(event).await;
    });
    resp
}
