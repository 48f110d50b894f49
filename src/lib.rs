//! The `sandboxd` binary's library: CLI, configuration, admin API, routing
//! snapshot and the daemon's composition root. The gates, the store and the
//! Incus client are separate crates; only this one reads flags, config files
//! and environment variables.

pub mod admin;
pub mod api;
pub mod certstore;
pub mod cli;
pub mod cli_lifecycle;
pub mod client;
pub mod config;
pub mod daemon;
pub mod keys;
pub mod lifecycle;
pub mod notify;
pub mod provision;
pub mod routes;
pub mod sandbox;
pub mod setup;
pub mod tlsfiles;
pub mod watcher;
