//! [`LifecycleError`]: why a lifecycle call failed. Its stable codes and
//! HTTP statuses are the admin API's to choose (`crate::admin`).

/// Why a lifecycle call failed.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    /// What Incus said (including "Incus is not running: ...").
    #[error("{0}")]
    Incus(#[from] incusctl::Error),
    #[error("{0}")]
    Store(#[from] store::Error),
    /// The sandbox request broke a domain rule (keys, login, TLS, ports).
    #[error("{0}")]
    Sandbox(#[from] crate::sandbox::SandboxError),
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
