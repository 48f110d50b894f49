//! The binary's test harness: the shared one of the `testsupport` crate
//! (a daemon on temp dirs, listeners on 127.0.0.1:0, driven through the
//! real CLI; sshd, Pebble, test PKI, Incus helpers), bound to this
//! package's `sandboxd` binary.
#![allow(dead_code, unused_imports)]

pub use testsupport::daemon::*;
pub use testsupport::{pebble, pki, sshd};

/// The `sandboxd` binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_sandboxd");

/// The Incus helpers, with a daemon of [`BIN`] wired to the test image.
pub mod incus {
    pub use testsupport::incus::*;

    use super::{Daemon, DaemonBuilder, BIN};

    /// A daemon whose default image is the test image and whose reconcile
    /// runs every second; `tune` adds flags or replaces nothing else.
    pub fn daemon_with(tune: impl FnOnce(DaemonBuilder) -> DaemonBuilder) -> Daemon {
        testsupport::incus::daemon_with(BIN, tune)
    }

    pub fn daemon() -> Daemon {
        daemon_with(|b| b)
    }
}
