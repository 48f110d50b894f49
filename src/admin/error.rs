//! The admin API's errors: every failure a call can meet — a request the
//! API itself refuses, a domain rule ([`SandboxError`]), the store
//! ([`store::Error`]) or the Incus lifecycle ([`LifecycleError`]) — becomes
//! one [`ApiError`] here, with its HTTP status and a stable code that
//! scripts may match on. This is the only place those statuses and codes
//! are chosen.

use http::StatusCode;

use crate::api::ErrorBody;
use crate::lifecycle::LifecycleError;
use crate::sandbox::SandboxError;

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
    pub(crate) fn not_found_call(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "no_such_call", message)
    }
    pub(crate) fn body(&self) -> ErrorBody {
        ErrorBody {
            code: self.code.to_string(),
            message: self.message.clone(),
        }
    }
}

/// Status and code of a store error.
fn store_status(e: &store::Error) -> (StatusCode, &'static str) {
    use store::Error as E;
    let status = match e {
        E::Invalid { .. } | E::BadBackup(_) => StatusCode::BAD_REQUEST,
        E::NameTaken(_) | E::HostTaken { .. } | E::AddressTaken { .. } | E::NotEmpty(_) => {
            StatusCode::CONFLICT
        }
        E::NotFound(_) => StatusCode::NOT_FOUND,
        // The pool is exhausted until a sandbox is deleted.
        E::NoFreeAddress(_) => StatusCode::SERVICE_UNAVAILABLE,
        E::Locked(_) | E::SchemaTooNew { .. } | E::Corrupt { .. } | E::Storage(_) => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    };
    (status, e.code())
}

/// Status and code of a refused sandbox request.
fn sandbox_status(e: &SandboxError) -> (StatusCode, &'static str) {
    use SandboxError as E;
    match e {
        E::KeyNotFound { .. } => (StatusCode::NOT_FOUND, "key_not_found"),
        E::LastKey { .. } => (StatusCode::CONFLICT, "last_key"),
        E::Hash(_) | E::KeyGeneration(_) | E::Worker(_) => {
            (StatusCode::INTERNAL_SERVER_ERROR, "internal")
        }
        E::AppPortIsAgentPort(_)
        | E::NoClientKey
        | E::NoKeyGiven
        | E::Key(_)
        | E::UpstreamHostKey(_)
        | E::AuthUser
        | E::Password
        | E::Tls(_) => (StatusCode::BAD_REQUEST, "invalid_argument"),
    }
}

/// Status and code of a failed lifecycle call; a failed pipeline step
/// answers as what made it fail.
fn lifecycle_status(e: &LifecycleError) -> (StatusCode, &'static str) {
    use LifecycleError as E;
    match e {
        E::Incus(e) if e.is_not_running() => (StatusCode::SERVICE_UNAVAILABLE, "incus_not_running"),
        E::Incus(e) if e.is_not_found() => (StatusCode::NOT_FOUND, "incus_not_found"),
        E::Incus(e) if e.is_conflict() => (StatusCode::CONFLICT, "incus_conflict"),
        E::Incus(e) if e.is_timeout() => (StatusCode::GATEWAY_TIMEOUT, "incus_timeout"),
        E::Incus(e) if e.is_too_large() => (StatusCode::BAD_GATEWAY, "container_data_too_large"),
        E::Incus(_) => (StatusCode::BAD_GATEWAY, "incus_error"),
        E::Store(e) => store_status(e),
        E::Sandbox(e) => sandbox_status(e),
        E::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid_argument"),
        E::Untracked(_) => (StatusCode::CONFLICT, "untracked_instance"),
        E::Busy(_) => (StatusCode::CONFLICT, "busy"),
        E::NotIncus(_) => (StatusCode::BAD_REQUEST, "not_incus"),
        E::WrongState { .. } => (StatusCode::CONFLICT, "wrong_state"),
        E::Step { source, .. } => lifecycle_status(source),
        E::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
    }
}

impl From<store::Error> for ApiError {
    fn from(e: store::Error) -> Self {
        let (status, code) = store_status(&e);
        ApiError::new(status, code, e.to_string())
    }
}

impl From<SandboxError> for ApiError {
    fn from(e: SandboxError) -> Self {
        let (status, code) = sandbox_status(&e);
        ApiError::new(status, code, e.to_string())
    }
}

impl From<LifecycleError> for ApiError {
    fn from(e: LifecycleError) -> Self {
        let (status, code) = lifecycle_status(&e);
        ApiError::new(status, code, e.to_string())
    }
}

/// Refusals of the admin API's own: the request's body, the caller, the
/// calls on sessions and certificates.
impl ApiError {
    /// A request body past `limit` bytes.
    pub(crate) fn body_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("request body larger than {limit} bytes"),
        )
    }
    /// A request body that is not the call's JSON.
    pub(crate) fn malformed_json(e: &serde_json::Error) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "malformed_json",
            format!("request body: {e}"),
        )
    }
    /// A peer whose uid may not use the socket (`None`: unknown).
    pub(crate) fn forbidden(uid: Option<u32>) -> Self {
        let uid = uid
            .map(|u| u.to_string())
            .unwrap_or_else(|| "unknown".into());
        Self::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("uid {uid} may not use the sandboxd admin API (root or the admin group only)"),
        )
    }
    /// A certificate renewal the gateway could not complete.
    pub(crate) fn renew_failed(e: &httpgate::Error) -> Self {
        Self::new(StatusCode::BAD_GATEWAY, "renew_failed", e.to_string())
    }
    /// No live SSH session has id `id`.
    pub(crate) fn no_such_session(id: u64) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "no_such_session",
            format!("no live session {id}"),
        )
    }
}
