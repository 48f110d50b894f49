//! The `[ssh]` table: the SSH gate's limits. Each key is declared once
//! below, with what it sets in `sshgate::GatewayConfig`;
//! [`SshSettings::apply`] sets the keys given over the gate's defaults.

use super::keys::{config_keys, secs, size, Int, Startups};

config_keys! {
    /// The `[ssh]` table as read: `None` keeps the gate's default.
    pub struct SshSettings in "ssh" for sshgate::GatewayConfig {
        /// Connections logging in, all sources: start:rate:full (random early drop).
        max_startups: Startups = "\"100:30:256\""
            => |c, v| c.max_startups = v,
        /// The same per source address (IPv6: per /64).
        per_source_max_startups: Startups = "\"10:30:20\""
            => |c, v| c.per_source_max_startups = v,
        /// Seconds to log in; a timeout counts as a failed login for the ban.
        login_grace_secs: Int<1, 600> = "30"
            => |c, v| c.login_grace = secs(v),
        /// Channels open at once on one connection.
        max_channels_per_connection: Int<1, 100_000> = "64"
            => |c, v| c.max_channels_per_connection = size(v),
        /// Logged-in connections at once per sandbox.
        max_sessions_per_sandbox: Int<1, 100_000> = "32"
            => |c, v| c.max_sessions_per_sandbox = size(v),
        /// MiB of channel window beyond the 64 KiB start, all channels together.
        relay_buffer_mib: Int<0, 1_048_576> = "128"
            => |c, v| c.relay_budget = v * 1024 * 1024,
        /// MiB of it one sandbox may hold.
        relay_buffer_per_sandbox_mib: Int<0, 1_048_576> = "48"
            => |c, v| c.relay_budget_per_sandbox = v * 1024 * 1024,
    }
}
