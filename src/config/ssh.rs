//! The `[ssh]` table: the SSH gate's limits, applied over `sshgate`'s
//! defaults by [`SshSettings::apply`].

use super::keys::{config_keys, sub_table, Int, Startups};

config_keys! {
    /// The `[ssh]` table as read.
    pub(crate) struct RawSsh in "ssh" {
        /// Connections logging in, all sources: start:rate:full (random early drop).
        max_startups: Startups = "\"100:30:256\"",
        /// The same per source address (IPv6: per /64).
        per_source_max_startups: Startups = "\"10:30:20\"",
        /// Seconds to log in; a timeout counts as a failed login for the ban.
        login_grace_secs: Int<1, 600> = "30",
        /// Channels open at once on one connection.
        max_channels_per_connection: Int<1, 100_000> = "64",
        /// Logged-in connections at once per sandbox.
        max_sessions_per_sandbox: Int<1, 100_000> = "32",
        /// MiB of channel window beyond the 64 KiB start, all channels together.
        relay_buffer_mib: Int<0, 1_048_576> = "128",
        /// MiB of it one sandbox may hold.
        relay_buffer_per_sandbox_mib: Int<0, 1_048_576> = "48",
    }
}

/// The `[ssh]` table: the SSH gate's limits. `None` keeps the gate's
/// built-in default (see `sshgate::GatewayConfig`).
#[derive(Debug, Clone, Default)]
pub struct SshSettings {
    /// Connections logging in, all sources (`start:rate:full`) [100:30:256].
    pub max_startups: Option<sshgate::Startups>,
    /// Connections logging in per source address, IPv6 per /64 [10:30:20].
    pub per_source_max_startups: Option<sshgate::Startups>,
    /// Time to log in; a connection that takes longer counts as a failed
    /// login for the ban [30 s].
    pub login_grace: Option<std::time::Duration>,
    /// Channels open at once on one connection [64].
    pub max_channels_per_connection: Option<usize>,
    /// Logged-in connections at once per sandbox [32].
    pub max_sessions_per_sandbox: Option<usize>,
    /// Channel window above the initial one, all channels together, in MiB [128].
    pub relay_buffer_mib: Option<u64>,
    /// The part of `relay_buffer_mib` one sandbox may hold, in MiB [48].
    pub relay_buffer_per_sandbox_mib: Option<u64>,
}

impl SshSettings {
    /// Applies the configured values over the gate's defaults.
    pub fn apply(&self, cfg: &mut sshgate::GatewayConfig) {
        if let Some(v) = self.max_startups {
            cfg.max_startups = v;
        }
        if let Some(v) = self.per_source_max_startups {
            cfg.per_source_max_startups = v;
        }
        if let Some(v) = self.login_grace {
            cfg.login_grace = v;
        }
        if let Some(v) = self.max_channels_per_connection {
            cfg.max_channels_per_connection = v;
        }
        if let Some(v) = self.max_sessions_per_sandbox {
            cfg.max_sessions_per_sandbox = v;
        }
        if let Some(v) = self.relay_buffer_mib {
            cfg.relay_budget = v * 1024 * 1024;
        }
        if let Some(v) = self.relay_buffer_per_sandbox_mib {
            cfg.relay_budget_per_sandbox = v * 1024 * 1024;
        }
    }
}

/// Reads the `[ssh]` table of `table`, if any.
pub(crate) fn read(table: &toml::Table, errs: &mut Vec<String>) -> SshSettings {
    let Some(t) = sub_table(table, "ssh", errs) else {
        return SshSettings::default();
    };
    let raw = RawSsh::read(t, errs);
    let size = |n: u64| usize::try_from(n).ok();
    SshSettings {
        max_startups: raw.max_startups,
        per_source_max_startups: raw.per_source_max_startups,
        login_grace: raw.login_grace_secs.map(std::time::Duration::from_secs),
        max_channels_per_connection: raw.max_channels_per_connection.and_then(size),
        max_sessions_per_sandbox: raw.max_sessions_per_sandbox.and_then(size),
        relay_buffer_mib: raw.relay_buffer_mib,
        relay_buffer_per_sandbox_mib: raw.relay_buffer_per_sandbox_mib,
    }
}
