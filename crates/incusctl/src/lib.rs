//! `incusctl`: an async client of the Incus REST API over its unix socket.
//!
//! This crate is the only part of sandboxd that speaks to Incus. It owns the
//! HTTP/websocket transport on the unix socket (hyper 1 + tokio-tungstenite,
//! never the `incus` command), the typed API objects, waiting for background
//! operations, exec (collected and streamed), the files API, snapshots,
//! images, lifecycle events, and network ACLs and leases. Everything read
//! from an instance (command output, files) and every answer of incusd is
//! read up to a size cap ([`DEFAULT_MAX_OUTPUT`], [`DEFAULT_MAX_FILE`],
//! [`MAX_ANSWER`]) and refused past it with [`Error::TooLarge`]. It knows
//! nothing of routes, the store, or configuration files: the binary passes
//! in a socket path (or `None` for the standard locations) and decides what
//! to do with the answers.
//!
//! ```no_run
//! # async fn demo() -> incusctl::Result<()> {
//! use incusctl::{Client, CreateInstance, ExecRequest, ImageSource};
//! use std::time::Duration;
//!
//! let incus = Client::connect(None).await?;
//! let req = CreateInstance::new("web", ImageSource::local("test/debian-ssh"))
//!     .docker_ready()
//!     .limits_cpu(2)
//!     .start(true);
//! incus.create_instance(&req).await?;
//! let ip = incus.wait_for_ipv4("web", Duration::from_secs(60)).await?;
//! let out = incus.exec("web", &ExecRequest::new(["hostname"])).await?;
//! assert_eq!(out.stdout_text().trim(), "web");
//! # let _ = ip; Ok(()) }
//! ```
//!
//! Architecture invariant: no type of this crate mentions sandboxes, routes
//! or domains; sandbox metadata, when mirrored into Incus, is plain
//! `user.*` configuration keys chosen by the caller.

mod acls;
mod client;
mod error;
mod events;
mod exec;
mod files;
mod host;
mod images;
mod operation;
mod snapshots;
mod state;
mod transport;
mod types;

pub use acls::{AclRule, NetworkAcl, NetworkLease};
pub use client::{Client, ClientOptions, StopOptions, DEFAULT_SOCKETS};
pub use error::{Error, Result};
pub use events::{Event, EventStream, LifecycleAction, LifecycleEvent};
pub use exec::{
    ExecOutput, ExecProcess, ExecRequest, ExecStdin, OutputChunk, DEFAULT_MAX_OUTPUT,
    EXIT_COMMAND_NOT_FOUND,
};
pub use files::{FileKind, FileMeta, PulledFile, PushOptions, DEFAULT_MAX_FILE};
pub use host::{Network, Profile, StoragePool};
pub use images::ImageTarballs;
pub use operation::{OperationInfo, Progress, STATUS_CANCELLED, STATUS_FAILURE, STATUS_SUCCESS};
pub use state::{
    cpu_percent, CpuState, DiskState, InstanceState, MemoryState, NetworkAddress, NetworkCounters,
    NetworkState, DEFAULT_NIC,
};
pub use transport::MAX_ANSWER;
pub use types::{
    CreateInstance, Image, ImageAlias, ImageAliasRef, ImageSource, Instance, ServerEnvironment,
    ServerInfo, Snapshot,
};
