//! Open upgraded tunnels (websockets), so that revocation reaches them.
//!
//! Established connections keep the route they resolved (the routing
//! invariant), with two exceptions checked at every routes change
//! ([`Tunnels::revoke`]): a tunnel ends when its host is no longer routed to
//! the sandbox it was opened for (the sandbox was removed, or the name
//! moved), when that sandbox is stopped, or when the host's access changed
//! (a login set, changed or removed: the tunnel was opened with a login that
//! no longer holds). Any other edit (a new upstream address, other hosts,
//! other sandboxes) leaves it open. Plain requests need no such care: each
//! one is checked against the current route.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::{Route, RouteSource, Target};

struct Entry {
    host: String,
    route: Arc<Route>,
    end: Arc<Notify>,
}

#[derive(Default)]
struct Inner {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Entry>>,
}

#[derive(Default)]
pub(crate) struct Tunnels {
    inner: Arc<Inner>,
}

/// A registered tunnel; deregisters when dropped.
pub(crate) struct Registration {
    tunnels: Arc<Inner>,
    id: u64,
    /// Notified when the tunnel must end.
    pub(crate) end: Arc<Notify>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Ok(mut m) = self.tunnels.open.lock() {
            m.remove(&self.id);
        }
    }
}

impl Tunnels {
    /// Register a tunnel opened on `host` through `route`. If the routes
    /// changed since the request was admitted, the tunnel is ended at once
    /// (a [`Tunnels::revoke`] that ran before the registration could not
    /// see it, and one that runs after will).
    pub(crate) fn register(
        &self,
        routes: &dyn RouteSource,
        host: &str,
        route: Arc<Route>,
    ) -> Registration {
        let inner = &self.inner;
        let id = inner.next.fetch_add(1, Ordering::Relaxed);
        let end = Arc::new(Notify::new());
        if let Ok(mut m) = inner.open.lock() {
            m.insert(
                id,
                Entry {
                    host: host.to_owned(),
                    route: route.clone(),
                    end: end.clone(),
                },
            );
        }
        if !still_allowed(routes, host, &route) {
            end.notify_one();
        }
        Registration {
            tunnels: inner.clone(),
            id,
            end,
        }
    }

    /// End the tunnels the current routes no longer allow; returns how many.
    pub(crate) fn revoke(&self, routes: &dyn RouteSource) -> usize {
        let Ok(m) = self.inner.open.lock() else {
            return 0;
        };
        let mut ended = 0;
        for e in m.values() {
            if !still_allowed(routes, &e.host, &e.route) {
                e.end.notify_one();
                ended += 1;
            }
        }
        ended
    }

    /// Tunnels open now.
    pub(crate) fn count(&self) -> usize {
        self.inner.open.lock().map_or(0, |m| m.len())
    }
}

/// Whether a tunnel opened on `host` through `opened` may stay open.
fn still_allowed(routes: &dyn RouteSource, host: &str, opened: &Route) -> bool {
    routes.lookup(host).is_some_and(|now| {
        now.sandbox == opened.sandbox
            && now.access == opened.access
            && now.target != Target::Stopped
    })
}
