//! The persistent state of sandboxd: sandboxes (the routing table), opaque
//! records for other subsystems (certificates, ACME accounts, the internal CA),
//! and settings, kept in sled behind this crate's own typed API.
//!
//! This crate owns durability, uniqueness and the change feed. It knows
//! nothing of SSH, HTTP or Incus: records are plain data, validated for shape
//! (names, domains, ports), never interpreted. Nothing outside this crate sees
//! a sled type.
//!
//! Guarantees:
//! - every write is one sled transaction across the trees it touches, flushed
//!   to disk before the call returns, so an acknowledged write survives
//!   `kill -9`;
//! - sandbox names are unique, and so are host names: a sandbox's domain and
//!   its agent host (`PREFIX.DOMAIN`) may not equal any other sandbox's;
//! - an assigned IPv4 address belongs to one sandbox (an index beside the
//!   host index, kept in the same transactions; [`Store::assign_ipv4`]
//!   picks a free one inside the write transaction);
//! - writes are serialised and each one publishes a [`Change`] with a
//!   strictly increasing sequence number, in commit order.

mod db;
mod error;
mod model;

pub use db::{AddressPool, Backup, Change, ChangeKind, Store, BACKUP_FORMAT, SCHEMA_VERSION};
pub use error::{Error, Result};
pub use model::{
    validate_domain, validate_egress, validate_name, validate_user, Backend, BasicAuth, Egress,
    EgressMode, KeyPair, Sandbox, SandboxStatus, TlsMode, DEFAULT_AGENT_PORT, DEFAULT_AGENT_PREFIX,
    DEFAULT_APP_PORT, DEFAULT_SSH_PORT,
};
