//! [`LifecycleError`]: why a lifecycle call failed, with its stable code
//! and status for the admin API.

/// Why a lifecycle call failed.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    /// What Incus said (including "Incus is not running: ...").
    #[error("{0}")]
    Incus(#[from] incusctl::Error),
    #[error("{0}")]
    Store(#[from] store::Error),
    #[error("{0}")]
    Invalid(String),
    #[error("an Incus instance named {0} already exists and sandboxd does not manage it (adopt it with `sandboxd import {0} --domain ...`, or pick another name)")]
    Untracked(String),
    #[error("sandbox {0} is busy with another lifecycle operation; try again when it ends")]
    Busy(String),
    #[error("sandbox {0} is not an Incus sandbox (use `sandboxd remove` for static ones)")]
    NotIncus(String),
    #[error("sandbox {name} is {state}; {hint}")]
    WrongState {
        name: String,
        state: String,
        hint: &'static str,
    },
    /// A pipeline step failed; the sandbox is recorded as failed.
    #[error("{what} of {name} failed at step {step}: {source}")]
    Step {
        what: &'static str,
        name: String,
        step: &'static str,
        #[source]
        source: Box<LifecycleError>,
    },
    #[error("{0}")]
    Internal(String),
}

impl LifecycleError {
    /// Stable error code and HTTP status for the admin API.
    pub fn classify(&self) -> (u16, &'static str) {
        match self {
            LifecycleError::Incus(e) if e.is_not_running() => (503, "incus_not_running"),
            LifecycleError::Incus(e) if e.is_not_found() => (404, "incus_not_found"),
            LifecycleError::Incus(e) if e.is_conflict() => (409, "incus_conflict"),
            LifecycleError::Incus(e) if e.is_timeout() => (504, "incus_timeout"),
            LifecycleError::Incus(e) if e.is_too_large() => (502, "container_data_too_large"),
            LifecycleError::Incus(_) => (502, "incus_error"),
            LifecycleError::Store(e) => {
                use store::Error as E;
                let status = match e {
                    E::Invalid { .. } => 400,
                    E::NameTaken(_) | E::HostTaken { .. } => 409,
                    E::NotFound(_) => 404,
                    _ => 500,
                };
                (status, e.code())
            }
            LifecycleError::Invalid(_) => (400, "invalid_argument"),
            LifecycleError::Untracked(_) => (409, "untracked_instance"),
            LifecycleError::Busy(_) => (409, "busy"),
            LifecycleError::NotIncus(_) => (400, "not_incus"),
            LifecycleError::WrongState { .. } => (409, "wrong_state"),
            LifecycleError::Step { source, .. } => source.classify(),
            LifecycleError::Internal(_) => (500, "internal"),
        }
    }
}
