//! The registry of live, authenticated sessions: what `sessions()` lists and
//! what `kill()` reaches. Each entry holds shared byte counters that the
//! channel relays update.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::Notify;

/// One live session, as listed by [`crate::Gateway::sessions`].
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SessionInfo {
    /// Identifier for [`crate::Gateway::kill`].
    pub id: u64,
    /// Sandbox (and SSH user) name.
    pub sandbox: String,
    /// Client address and port.
    pub client_addr: String,
    /// SHA256 fingerprint of the client key that logged in.
    pub key_fingerprint: String,
    /// Start time, seconds since the Unix epoch.
    pub started_unix: u64,
    /// Bytes of channel data from the client to the sandbox.
    pub bytes_up: u64,
    /// Bytes of channel data from the sandbox to the client.
    pub bytes_down: u64,
}

/// Byte counters of one connection.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) up: AtomicU64,
    pub(crate) down: AtomicU64,
}

impl Counters {
    pub(crate) fn add_up(&self, n: usize) {
        self.up.fetch_add(n as u64, Ordering::Relaxed);
    }
    pub(crate) fn add_down(&self, n: usize) {
        self.down.fetch_add(n as u64, Ordering::Relaxed);
    }
}

struct Entry {
    sandbox: String,
    client: SocketAddr,
    fingerprint: String,
    started: SystemTime,
    counters: Arc<Counters>,
    kill: Arc<Notify>,
}

#[derive(Default)]
pub(crate) struct Registry {
    entries: Mutex<BTreeMap<u64, Entry>>,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Entry>> {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn insert(
        &self,
        id: u64,
        sandbox: String,
        client: SocketAddr,
        fingerprint: String,
        counters: Arc<Counters>,
        kill: Arc<Notify>,
    ) {
        self.lock().insert(
            id,
            Entry {
                sandbox,
                client,
                fingerprint,
                started: SystemTime::now(),
                counters,
                kill,
            },
        );
    }

    pub(crate) fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    pub(crate) fn list(&self) -> Vec<SessionInfo> {
        self.lock()
            .iter()
            .map(|(id, e)| SessionInfo {
                id: *id,
                sandbox: e.sandbox.clone(),
                client_addr: e.client.to_string(),
                key_fingerprint: e.fingerprint.clone(),
                started_unix: e
                    .started
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
                bytes_up: e.counters.up.load(Ordering::Relaxed),
                bytes_down: e.counters.down.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// Signals the session to close and drops it from the list at once, so
    /// a second kill of the same id reports that it is gone even while the
    /// connection is still being torn down.
    pub(crate) fn kill(&self, id: u64) -> bool {
        match self.lock().remove(&id) {
            Some(e) => {
                e.kill.notify_one();
                true
            }
            None => false,
        }
    }
}
