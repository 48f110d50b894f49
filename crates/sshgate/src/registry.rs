//! The registry of live, authenticated sessions: what `sessions()` lists,
//! what `kill()` reaches, and what `routes_changed()` checks again. Each
//! entry holds shared byte counters that the channel relays update, and the
//! route and client key the session logged in with, so that revoking that
//! key, stopping or removing the sandbox ends the session.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use russh::keys::PublicKey;
use serde::Serialize;
use tokio::sync::Notify;

use crate::{Route, RouteSource, Target};

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

/// Tells a session to end, and why (the line the client is sent).
#[derive(Default)]
pub(crate) struct KillSignal {
    notify: Notify,
    reason: std::sync::OnceLock<String>,
}

impl KillSignal {
    fn fire(&self, reason: String) {
        let _ = self.reason.set(reason);
        self.notify.notify_one();
    }

    /// Waits until the session is told to end; returns why.
    pub(crate) async fn fired(&self) -> String {
        self.notify.notified().await;
        self.reason.get().cloned().unwrap_or_default()
    }
}

/// What a live session was admitted with.
pub(crate) struct Admission {
    pub(crate) sandbox: String,
    pub(crate) client: SocketAddr,
    pub(crate) key: PublicKey,
    pub(crate) fingerprint: String,
    pub(crate) route: Arc<Route>,
}

struct Entry {
    admission: Admission,
    started: SystemTime,
    counters: Arc<Counters>,
    kill: Arc<KillSignal>,
}

/// Why a session admitted with `old` and `key` may not go on under the
/// current route `new`, if it may not.
fn revoked(old: &Arc<Route>, key: &PublicKey, new: Option<&Arc<Route>>) -> Option<&'static str> {
    let Some(new) = new else {
        return Some("sandbox removed");
    };
    if Arc::ptr_eq(old, new) {
        return None;
    }
    if new.upstream_key.public_key().key_data() != old.upstream_key.public_key().key_data() {
        return Some("sandbox replaced");
    }
    if new.target == Target::Stopped {
        return Some("sandbox stopped");
    }
    if !new
        .authorized_keys
        .iter()
        .any(|k| k.key_data() == key.key_data())
    {
        return Some("key removed");
    }
    None
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

    /// List a session; then check it against the current routes once, so
    /// that a revocation made between its login and this call still ends
    /// it (a later one is found by [`Registry::revalidate`]).
    pub(crate) fn insert(
        &self,
        id: u64,
        admission: Admission,
        counters: Arc<Counters>,
        kill: Arc<KillSignal>,
        routes: &dyn RouteSource,
    ) {
        self.lock().insert(
            id,
            Entry {
                admission,
                started: SystemTime::now(),
                counters,
                kill,
            },
        );
        self.revalidate(routes, Some(id));
    }

    /// End every session (or only session `only`) whose route or key no
    /// longer admits it; returns how many were ended.
    pub(crate) fn revalidate(&self, routes: &dyn RouteSource, only: Option<u64>) -> usize {
        let mut map = self.lock();
        let mut ended = Vec::new();
        for (id, e) in map.iter_mut() {
            if only.is_some_and(|o| o != *id) {
                continue;
            }
            let a = &mut e.admission;
            let current = routes.lookup(&a.sandbox);
            match revoked(&a.route, &a.key, current.as_ref()) {
                Some(why) => ended.push((*id, why)),
                None => {
                    if let Some(r) = current {
                        a.route = r;
                    }
                }
            }
        }
        for (id, why) in &ended {
            if let Some(e) = map.remove(id) {
                tracing::info!(
                    session = id,
                    sandbox = %e.admission.sandbox,
                    key = %e.admission.fingerprint,
                    reason = why,
                    "ending ssh session: access revoked"
                );
                e.kill.fire(format!("session ended: {why}"));
            }
        }
        ended.len()
    }

    pub(crate) fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    pub(crate) fn list(&self) -> Vec<SessionInfo> {
        self.lock()
            .iter()
            .map(|(id, e)| SessionInfo {
                id: *id,
                sandbox: e.admission.sandbox.clone(),
                client_addr: e.admission.client.to_string(),
                key_fingerprint: e.admission.fingerprint.clone(),
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
                e.kill
                    .fire("session terminated by the administrator".into());
                true
            }
            None => false,
        }
    }
}
