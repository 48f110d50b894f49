//! The routing snapshot: an immutable table built from the store and swapped
//! atomically on every committed change. The gates read it per new
//! connection or request; nothing they hold is ever mutated, so a route edit
//! never touches an established connection.
//!
//! Architecture invariant: the snapshot reflects a store sequence number
//! (`generation`); admin calls that change routes wait until the snapshot has
//! reached their write's number before answering, so a route is usable by
//! the gates as soon as the CLI returns.

use std::sync::Arc;

use arc_swap::ArcSwap;
use store::{Backend, Change, ChangeKind, Sandbox, SandboxStatus, Store};
use tokio::sync::{broadcast, watch};

use crate::api::{RouteDump, RouteView};
use crate::keys;

/// Where a service of a sandbox is reached right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Addr { host: String, port: u16 },
    Stopped,
    Unavailable { reason: String },
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Addr { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Target::Addr { host, port } => write!(f, "{host}:{port}"),
            Target::Stopped => f.write_str("stopped"),
            Target::Unavailable { reason } => write!(f, "unavailable: {reason}"),
        }
    }
}

/// Which service of a sandbox an HTTP host leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    App,
    Agent,
}

/// Settings that shape routes but are not stored per sandbox.
#[derive(Debug, Clone)]
pub struct Defaults {
    /// Certificate mode of sandboxes that do not choose one.
    pub tls: httpgate::TlsMode,
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            tls: httpgate::TlsMode::Internal,
        }
    }
}

/// Everything the gates need about one sandbox, derived once per change.
#[derive(Debug)]
pub struct SandboxRoute {
    pub sandbox: Arc<Sandbox>,
    /// Upstream host for all services, or why there is none.
    host: Result<String, Target>,
    /// The SSH gate's view, keys parsed; `None` if the stored gateway key
    /// is unreadable (logged once per snapshot change).
    pub ssh: Option<Arc<sshgate::Route>>,
    /// The HTTPS gate's views of the app and agent hosts.
    pub http_app: Arc<httpgate::Route>,
    pub http_agent: Arc<httpgate::Route>,
}

impl SandboxRoute {
    pub fn new(sandbox: Arc<Sandbox>, defaults: &Defaults) -> Self {
        let host = match (&sandbox.status, &sandbox.backend) {
            (SandboxStatus::Running, Backend::Static { host }) => Ok(host.clone()),
            // Only the address sandboxd assigned (and Incus enforces on the
            // NIC), never one the container reports: a tenant cannot point
            // the gates anywhere else.
            (SandboxStatus::Running, Backend::Incus { .. }) => {
                match sandbox.assigned_ipv4.as_ref() {
                    Some(a) => Ok(a.clone()),
                    None => Err(Target::Unavailable {
                        reason: "network isolation not applied yet".into(),
                    }),
                }
            }
            (SandboxStatus::Stopped, _) => Err(Target::Stopped),
            (SandboxStatus::Creating { step }, _) => Err(Target::Unavailable {
                reason: format!("being created ({step})"),
            }),
            (SandboxStatus::Failed { reason }, _) => Err(Target::Unavailable {
                reason: reason.clone(),
            }),
        };
        let placeholder = Arc::new(httpgate::Route {
            sandbox: String::new(),
            kind: httpgate::RouteKind::App,
            target: httpgate::Target::Stopped,
            access: httpgate::Access::Closed,
            tls: httpgate::TlsMode::Internal,
        });
        let mut route = SandboxRoute {
            sandbox,
            host,
            ssh: None,
            http_app: placeholder.clone(),
            http_agent: placeholder,
        };
        route.ssh = route.build_ssh();
        route.http_app = route.build_http(Service::App, defaults);
        route.http_agent = route.build_http(Service::Agent, defaults);
        route
    }

    fn build_http(&self, service: Service, defaults: &Defaults) -> Arc<httpgate::Route> {
        let sb = &self.sandbox;
        let target = match self.http_target(service) {
            Target::Addr { host, port } => httpgate::Target::Addr { host, port },
            Target::Stopped => httpgate::Target::Stopped,
            Target::Unavailable { reason } => httpgate::Target::Unavailable { reason },
        };
        // httpgate has its own route-level mode (it does not depend on the
        // store); a manual record without its files gets the default.
        let tls = match sb.tls_mode {
            Some(store::TlsMode::Acme) => httpgate::TlsMode::Acme,
            Some(store::TlsMode::Internal) => httpgate::TlsMode::Internal,
            Some(store::TlsMode::Manual) => match (&sb.tls_cert_file, &sb.tls_key_file) {
                (Some(cert), Some(key)) => httpgate::TlsMode::Manual {
                    cert_pem_path: cert.into(),
                    key_pem_path: key.into(),
                },
                _ => defaults.tls.clone(),
            },
            None => defaults.tls.clone(),
        };
        // The agent host fails closed: no login set, no way in.
        let (kind, access) = match service {
            Service::App => (httpgate::RouteKind::App, httpgate::Access::Open),
            Service::Agent => (
                httpgate::RouteKind::Agent,
                match &sb.basic_auth {
                    Some(a) => httpgate::Access::Login(httpgate::BasicAuth {
                        user: a.user.clone(),
                        password_hash: a.password_hash.clone(),
                    }),
                    None => httpgate::Access::Closed,
                },
            ),
        };
        Arc::new(httpgate::Route {
            sandbox: sb.name.clone(),
            kind,
            target,
            access,
            tls,
        })
    }

    /// The HTTPS gate's route for `service`.
    pub fn http(&self, service: Service) -> &Arc<httpgate::Route> {
        match service {
            Service::App => &self.http_app,
            Service::Agent => &self.http_agent,
        }
    }

    fn build_ssh(&self) -> Option<Arc<sshgate::Route>> {
        let sb = &self.sandbox;
        let upstream_key = match russh::keys::PrivateKey::from_openssh(
            &sb.upstream_key.private_openssh,
        ) {
            Ok(k) => Arc::new(k),
            Err(e) => {
                tracing::error!(sandbox = %sb.name, error = %e, "stored gateway key unreadable; ssh route disabled");
                return None;
            }
        };
        let target = match self.ssh_target() {
            Target::Addr { host, port } => sshgate::Target::Addr { host, port },
            Target::Stopped => sshgate::Target::Stopped,
            Target::Unavailable { reason } => sshgate::Target::Unavailable { reason },
        };
        Some(Arc::new(sshgate::Route {
            sandbox: sb.name.clone(),
            target,
            user: sb.user.clone(),
            authorized_keys: sb
                .client_keys
                .iter()
                .filter_map(|k| keys::parse_public(k).ok())
                .collect(),
            upstream_key,
            upstream_host_key: sb
                .upstream_host_key
                .as_deref()
                .and_then(|k| keys::parse_public(k).ok()),
        }))
    }

    fn target(&self, port: u16) -> Target {
        match &self.host {
            Ok(host) => Target::Addr {
                host: host.clone(),
                port,
            },
            Err(t) => t.clone(),
        }
    }

    /// Where SSH connections for this sandbox go.
    pub fn ssh_target(&self) -> Target {
        self.target(self.sandbox.ssh_port)
    }

    /// Where HTTP requests for `service` go. The app host is closed while
    /// its port is the agent's (a record from before `port` refused that,
    /// or restored from such a backup): it has no login, so it would serve
    /// the agent to anyone.
    pub fn http_target(&self, service: Service) -> Target {
        let sb = &self.sandbox;
        match service {
            Service::App if sb.app_port == sb.agent_port => Target::Unavailable {
                reason: format!(
                    "its app port {} is the agent port; move the app with `sandboxd port {} PORT`",
                    sb.app_port, sb.name
                ),
            },
            Service::App => self.target(self.sandbox.app_port),
            Service::Agent => self.target(self.sandbox.agent_port),
        }
    }
}

/// One immutable routing snapshot.
#[derive(Debug, Default, Clone)]
pub struct RoutingTable {
    /// Store sequence number this table reflects.
    pub generation: u64,
    defaults: Arc<Defaults>,
    // Persistent (structurally shared) maps: a change copies O(log n)
    // nodes, not the whole table.
    by_name: imbl::HashMap<String, Arc<SandboxRoute>>,
    by_host: imbl::HashMap<String, (Arc<SandboxRoute>, Service)>,
}

impl RoutingTable {
    /// Builds a table from every sandbox.
    pub fn build(
        sandboxes: impl IntoIterator<Item = Sandbox>,
        generation: u64,
        defaults: Arc<Defaults>,
    ) -> Self {
        let mut table = RoutingTable {
            generation,
            defaults,
            ..Default::default()
        };
        for sb in sandboxes {
            table.put(Arc::new(sb));
        }
        table
    }

    fn put(&mut self, sandbox: Arc<Sandbox>) {
        self.remove(&sandbox.name);
        let route = Arc::new(SandboxRoute::new(sandbox, &self.defaults));
        let sb = &route.sandbox;
        self.by_host
            .insert(sb.domain.clone(), (route.clone(), Service::App));
        self.by_host
            .insert(sb.agent_host(), (route.clone(), Service::Agent));
        self.by_name.insert(sb.name.clone(), route);
    }

    fn remove(&mut self, name: &str) {
        if let Some(old) = self.by_name.remove(name) {
            for host in old.sandbox.hosts() {
                if self
                    .by_host
                    .get(&host)
                    .is_some_and(|(r, _)| r.sandbox.name == name)
                {
                    self.by_host.remove(&host);
                }
            }
        }
    }

    /// The route for an SSH user name.
    pub fn by_user(&self, user: &str) -> Option<&Arc<SandboxRoute>> {
        self.by_name.get(user)
    }

    /// The route for an HTTP host (lowercase, no port).
    pub fn by_host(&self, host: &str) -> Option<&(Arc<SandboxRoute>, Service)> {
        self.by_host.get(host)
    }

    /// Number of sandboxes routed.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// True when nothing is routed.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// Number of entries over all protocols (SSH users + HTTP hosts).
    pub fn entries(&self) -> usize {
        self.by_name.len() + self.by_host.len()
    }

    /// A stable, sorted dump for `sandboxd routes`.
    pub fn dump(&self) -> RouteDump {
        let mut routes: Vec<RouteView> = self
            .by_name
            .iter()
            .map(|(user, r)| RouteView {
                protocol: "ssh".into(),
                key: user.clone(),
                sandbox: r.sandbox.name.clone(),
                service: "ssh".into(),
                target: r.ssh_target().to_string(),
            })
            .chain(self.by_host.iter().map(|(host, (r, svc))| RouteView {
                protocol: "https".into(),
                key: host.clone(),
                sandbox: r.sandbox.name.clone(),
                service: match svc {
                    Service::App => "app".into(),
                    Service::Agent => "agent".into(),
                },
                target: r.http_target(*svc).to_string(),
            }))
            .collect();
        routes.sort_by(|a, b| (&a.protocol, &a.key).cmp(&(&b.protocol, &b.key)));
        RouteDump {
            generation: self.generation,
            routes,
        }
    }
}

/// The shared handle: the current snapshot and the generation applied.
pub struct Routes {
    table: ArcSwap<RoutingTable>,
    applied: watch::Sender<u64>,
    /// Called after each swap, before the generation is published (the
    /// SSH gate ends sessions the new table revokes), so that a caller of
    /// [`Routes::wait_applied`] finds it done.
    on_swap: std::sync::OnceLock<Box<dyn Fn() + Send + Sync>>,
}

impl Routes {
    pub fn new(table: RoutingTable) -> Arc<Self> {
        let generation = table.generation;
        Arc::new(Routes {
            table: ArcSwap::from_pointee(table),
            applied: watch::channel(generation).0,
            on_swap: std::sync::OnceLock::new(),
        })
    }

    /// Set the callback run after every swap (once; later calls are ignored).
    pub fn on_swap(&self, f: impl Fn() + Send + Sync + 'static) {
        let _ = self.on_swap.set(Box::new(f));
    }

    /// The current snapshot; cheap, lock-free.
    pub fn snapshot(&self) -> Arc<RoutingTable> {
        self.table.load_full()
    }

    /// Follows swaps: the value is the generation last applied.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.applied.subscribe()
    }

    fn swap(&self, table: RoutingTable) {
        let generation = table.generation;
        self.table.store(Arc::new(table));
        if let Some(f) = self.on_swap.get() {
            f();
        }
        self.applied.send_replace(generation);
    }

    /// Applies one committed change on top of the current snapshot.
    pub fn apply(&self, change: &Change) -> bool {
        let mut table = RoutingTable::clone(&self.table.load());
        match &change.kind {
            ChangeKind::Put(sb) => table.put(sb.clone()),
            ChangeKind::Removed(name) => table.remove(name),
            ChangeKind::Reset => return false,
        }
        table.generation = table.generation.max(change.seq);
        self.swap(table);
        true
    }

    /// Replaces the snapshot with one built from the whole store.
    pub fn rebuild(&self, store: &Store) -> Result<(), store::Error> {
        // Read the sequence first: a change committed after this point is
        // applied again from the feed, which is idempotent.
        let seq = store.seq();
        let defaults = self.table.load().defaults.clone();
        let table = RoutingTable::build(store.list()?, seq, defaults);
        self.swap(table);
        Ok(())
    }

    /// Waits until the snapshot reflects store sequence `seq`.
    pub async fn wait_applied(&self, seq: u64) {
        let mut rx = self.applied.subscribe();
        // The sender lives as long as `self`; an error cannot happen here.
        let _ = rx.wait_for(|g| *g >= seq).await;
    }
}

/// Keeps `routes` in step with `store` until the feed closes.
pub async fn keep_in_step(
    store: Arc<Store>,
    routes: Arc<Routes>,
    mut feed: broadcast::Receiver<Change>,
) {
    loop {
        match feed.recv().await {
            Ok(change) => {
                if !routes.apply(&change) {
                    rebuild_logged(&store, &routes).await;
                }
            }
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::debug!(missed = n, "route feed lagged; rebuilding the snapshot");
                rebuild_logged(&store, &routes).await;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

async fn rebuild_logged(store: &Arc<Store>, routes: &Arc<Routes>) {
    let (store, routes) = (store.clone(), routes.clone());
    let done = tokio::task::spawn_blocking(move || routes.rebuild(&store)).await;
    match done {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "cannot rebuild the routing snapshot"),
        Err(e) => tracing::error!(error = %e, "routing rebuild task failed"),
    }
}

/// The SSH gate's window on the snapshot.
pub struct SshRoutes(pub Arc<Routes>);

impl sshgate::RouteSource for SshRoutes {
    fn lookup(&self, user: &str) -> Option<Arc<sshgate::Route>> {
        self.0.snapshot().by_user(user).and_then(|r| r.ssh.clone())
    }
}

/// The HTTPS gate's window on the snapshot.
pub struct HttpRoutes(pub Arc<Routes>);

impl httpgate::RouteSource for HttpRoutes {
    fn lookup(&self, host: &str) -> Option<Arc<httpgate::Route>> {
        let table = self.0.snapshot();
        let (route, service) = table.by_host(host)?;
        Some(route.http(*service).clone())
    }

    fn hosts(&self) -> Vec<(String, Arc<httpgate::Route>)> {
        let table = self.0.snapshot();
        table
            .by_host
            .iter()
            .map(|(host, (route, service))| (host.clone(), route.http(*service).clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests;
