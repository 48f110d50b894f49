//! The public [`HttpGateway`] handle and the state it shares between the
//! listeners and the proxy ([`Shared`]); the certificates' state is the
//! certificate module's ([`Certs`], reached through narrow methods).

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};

use crate::auth::AuthCache;
use crate::cert::Certs;
use crate::server::{self, Placement};
use crate::spread::{Handoff, Spread};
use crate::upstream::{IdlePool, Upstreams};
use crate::{CertStatus, CertStore, Error, HttpConfig, RouteSource};

/// The listening sockets one serving thread accepts on (see
/// [`HttpGateway::spawn_threads`]).
#[derive(Debug, Default)]
pub struct ThreadListeners {
    /// HTTPS listeners (TLS, then HTTP/1.1 or HTTP/2 by ALPN).
    pub https: Vec<std::net::TcpListener>,
    /// Plain-HTTP listeners (ACME HTTP-01, redirect to HTTPS).
    pub http: Vec<std::net::TcpListener>,
}

/// Bind `addr` once and give each of `threads` serving threads (at least
/// one) its own handle on that one listening socket. Every thread waits for
/// connections on the same queue and the first free one takes each, so a
/// busy thread is not handed more (with one `SO_REUSEPORT` socket per
/// thread the kernel would pick by hash, and an unlucky spread of
/// keep-alive connections loads one thread for their whole life). Without
/// `SO_REUSEPORT`, no other process can bind the port alongside.
pub fn bind_per_thread(
    addr: std::net::SocketAddr,
    threads: usize,
) -> io::Result<Vec<std::net::TcpListener>> {
    let first = crate::server::listener(addr)?;
    let mut out = Vec::with_capacity(threads.max(1));
    for _ in 1..threads.max(1) {
        out.push(first.try_clone()?);
    }
    out.insert(0, first);
    Ok(out)
}

/// What one serving thread of [`HttpGateway::spawn_threads`] starts with.
struct ThreadSetup {
    https: Vec<Limited>,
    http: Vec<Limited>,
    place: Placement,
    handoffs: mpsc::UnboundedReceiver<Handoff>,
}

/// A listening socket and the connection limits of its address (overall
/// and per source), shared by every thread that accepts on it.
type Limited = (std::net::TcpListener, Arc<server::ConnLimit>);

/// Receives the outcome of a forced renewal.
pub(crate) type RenewWaiter = oneshot::Sender<Result<(), String>>;

/// State shared by the listeners and the proxy. Certificates (serving
/// map, challenge answers, managed set, internal CA, TLS configuration)
/// are [`Certs`]'s; login checks are the [`AuthCache`]'s.
pub(crate) struct Shared {
    pub config: HttpConfig,
    pub routes: Arc<dyn RouteSource>,
    pub certs: Arc<Certs>,
    pub shutdown: watch::Sender<bool>,
    pub auth: AuthCache,
    /// Open upgraded tunnels, ended when their route revokes them.
    pub tunnels: crate::tunnels::Tunnels,
    pub upstreams: Upstreams,
    /// Header values the proxy sets (made once).
    pub header_values: crate::headers::HeaderValues,
    /// The open-connection counts of the serving threads, once spawned.
    pub spread: Mutex<Option<Arc<Spread>>>,
}

/// The HTTPS gateway. Cheap to clone; every clone drives the same gateway.
#[derive(Clone)]
pub struct HttpGateway {
    pub(crate) shared: Arc<Shared>,
}

impl HttpGateway {
    /// Create the gateway: restore or create the internal CA, load stored
    /// certificates, make the certificates of the hosts routed now, and
    /// start the certificate manager. Must be called inside a tokio
    /// runtime; it blocks (store reads and writes, signing), so a daemon
    /// calls it from `spawn_blocking` (whose threads are inside the
    /// runtime) or before serving anything else.
    pub fn new(
        config: HttpConfig,
        routes: Arc<dyn RouteSource>,
        certs: Arc<dyn CertStore>,
    ) -> Result<Self, Error> {
        let handle = tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime)?;
        crate::install_crypto_provider();
        let cert_state = Certs::new(config.clone(), routes.clone(), certs)?;
        // Before any listener serves: hosts routed now are served at once.
        cert_state.reconcile_at_start();
        let certs = Arc::new(cert_state);
        let (shutdown, _) = watch::channel(false);
        let upstreams = Upstreams::new(&config);
        let header_values = crate::headers::HeaderValues::new(&config);
        let shared = Arc::new(Shared {
            auth: AuthCache::new(config.login.clone()),
            tunnels: crate::tunnels::Tunnels::default(),
            upstreams,
            header_values,
            config,
            routes,
            certs: certs.clone(),
            shutdown,
            spread: Mutex::new(None),
        });
        handle.spawn(certs.run(shared.shutdown.subscribe()));
        Ok(Self { shared })
    }

    /// Serve HTTPS on `listener` until [`HttpGateway::shutdown`]; open
    /// connections then get a grace period to finish.
    pub async fn serve_https(&self, listener: TcpListener) -> io::Result<()> {
        let ctx = server::listener_ctx(&self.shared, true, Some(self.idle_pool()))?;
        let limit = server::limit(&self.shared);
        server::serve(self.shared.clone(), listener, ctx, limit, None).await
    }

    /// A pool of idle upstream connections for the client connections of
    /// one serving thread (or listener), swept by a task of the current
    /// runtime until shutdown.
    fn idle_pool(&self) -> Arc<IdlePool> {
        let cfg = &self.shared.config;
        let pool = Arc::new(IdlePool::new(
            cfg.limits.upstream_pool_max_idle,
            cfg.timeouts.upstream_pool_idle,
        ));
        tokio::spawn(pool.clone().sweep_until(self.shared.shutdown.subscribe()));
        pool
    }

    /// Serve HTTPS on `addr` from `threads` dedicated threads, each with a
    /// single-threaded runtime accepting from the same listening socket.
    /// Same as [`bind_per_thread`] then [`HttpGateway::spawn_threads`].
    pub fn spawn_https_threads(
        &self,
        addr: std::net::SocketAddr,
        threads: usize,
    ) -> io::Result<Vec<std::thread::JoinHandle<io::Result<()>>>> {
        let per_thread = bind_per_thread(addr, threads)?
            .into_iter()
            .map(|l| ThreadListeners {
                https: vec![l],
                http: Vec::new(),
            })
            .collect();
        self.spawn_threads(per_thread)
    }

    /// Serve from one dedicated thread per element of `per_thread`, each
    /// with a single-threaded runtime accepting on its handles of the
    /// listening sockets (from [`bind_per_thread`]: the first free thread
    /// takes each new connection, and hands it, before the TLS handshake,
    /// to a thread with clearly fewer open connections, see `spread.rs`).
    /// From then on a connection, its TLS session and its upstream
    /// connections stay on one thread (measured: about 20% less CPU per
    /// request than one multi-threaded runtime). Routes and certificates
    /// are shared with every thread and stay live. `max_connections` and
    /// `max_connections_per_source` hold per listening address, over all
    /// threads. Stops at [`HttpGateway::shutdown`]; join the handles to
    /// wait for the drain. A thread's result is its first listener error.
    pub fn spawn_threads(
        &self,
        per_thread: Vec<ThreadListeners>,
    ) -> io::Result<Vec<std::thread::JoinHandle<io::Result<()>>>> {
        if per_thread.is_empty() {
            return Ok(Vec::new());
        }
        // One connection limit per listening address, whichever threads
        // hold handles of its socket.
        let mut limits: HashMap<std::net::SocketAddr, Arc<server::ConnLimit>> = HashMap::new();
        let mut limited = |ls: Vec<std::net::TcpListener>| -> io::Result<Vec<Limited>> {
            ls.into_iter()
                .map(|l| {
                    l.set_nonblocking(true)?;
                    let limit = limits
                        .entry(l.local_addr()?)
                        .or_insert_with(|| server::limit(&self.shared))
                        .clone();
                    Ok((l, limit))
                })
                .collect()
        };
        let mut setups = Vec::with_capacity(per_thread.len());
        for ls in per_thread {
            setups.push((limited(ls.https)?, limited(ls.http)?));
        }
        let (spread, handoffs) = Spread::new(setups.len());
        *self
            .shared
            .spread
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(spread.clone());
        let mut handles = Vec::new();
        for (i, ((https, http), handoffs)) in setups.into_iter().zip(handoffs).enumerate() {
            let gw = self.clone();
            let thread = ThreadSetup {
                https,
                http,
                place: Placement {
                    spread: spread.clone(),
                    me: i,
                },
                handoffs,
            };
            let h = std::thread::Builder::new()
                .name(format!("httpgate-{i}"))
                .spawn(move || -> io::Result<()> {
                    // Log lines (see LogWriter) are written when the thread goes idle.
                    crate::logbuf::start();
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .on_thread_park(crate::logbuf::flush)
                        .build()?;
                    let res = rt.block_on(gw.serve_thread(thread));
                    drop(rt);
                    crate::logbuf::stop();
                    res
                })?;
            handles.push(h);
        }
        Ok(handles)
    }

    async fn serve_thread(self, t: ThreadSetup) -> io::Result<()> {
        let mut tasks = tokio::task::JoinSet::new();
        let shared = &self.shared;
        let https = server::listener_ctx(shared, true, Some(self.idle_pool()))?;
        let http = server::listener_ctx(shared, false, None)?;
        tasks.spawn(server::receive(shared.clone(), https.clone(), t.handoffs));
        // HTTPS connections are spread over the threads; plain-HTTP ones
        // (redirects and ACME tokens) stay where they were accepted.
        let kinds = [
            (t.https, https, Some(t.place.clone())),
            (t.http, http, None),
        ];
        for (listeners, ctx, place) in kinds {
            for (l, limit) in listeners {
                let l = TcpListener::from_std(l)?;
                let serve = server::serve(shared.clone(), l, ctx.clone(), limit, place.clone());
                tasks.spawn(serve);
            }
        }
        let mut first = Ok(());
        while let Some(r) = tasks.join_next().await {
            let r = r.unwrap_or_else(|e| Err(io::Error::other(e)));
            if let (Err(e), true) = (r, first.is_ok()) {
                first = Err(e);
            }
        }
        // Connections handed over from other threads' listeners hold those
        // listeners' limits, which this thread's drains do not wait for:
        // the runtime must not be dropped under them.
        let (spread, me) = (&t.place.spread, t.place.me);
        let _ = tokio::time::timeout(shared.config.timeouts.shutdown_grace, async {
            while spread.open_on(me) > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        })
        .await;
        first
    }

    /// The HTTPS client connections open on each serving thread of the
    /// last [`HttpGateway::spawn_threads`] (empty before it).
    pub fn open_connections(&self) -> Vec<usize> {
        let s = self
            .shared
            .spread
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        s.as_ref().map(|s| s.open()).unwrap_or_default()
    }

    /// Serve plain HTTP on `listener`: ACME HTTP-01 answers and a 301 to HTTPS.
    pub async fn serve_http(&self, listener: TcpListener) -> io::Result<()> {
        let ctx = server::listener_ctx(&self.shared, false, None)?;
        let limit = server::limit(&self.shared);
        server::serve(self.shared.clone(), listener, ctx, limit, None).await
    }

    /// Tell the gateway the routing snapshot changed: certificates for new
    /// names are issued (internal, manual before this returns; ACME in the
    /// background), renewals of removed names stop and their stored
    /// certificates are deleted. Open connections are untouched, but for
    /// upgraded tunnels (websockets) whose host was removed, moved to
    /// another sandbox, stopped, or whose login changed: those end (at
    /// once, before the certificate work). Signing, file reads and store
    /// writes run on tokio's blocking threads.
    pub async fn routes_changed(&self) {
        let ended = self.shared.tunnels.revoke(&*self.shared.routes);
        if ended > 0 {
            tracing::info!(ended, "upgraded connections ended by a route change");
        }
        self.shared.certs.reconcile().await;
        self.shared.certs.wake();
    }

    /// Upgraded tunnels (websockets) open now.
    pub fn open_tunnels(&self) -> usize {
        self.shared.tunnels.count()
    }

    /// Stop accepting connections and let the open ones finish (grace period).
    pub fn shutdown(&self) {
        self.shared.shutdown.send_replace(true);
        self.shared.certs.wake();
    }

    /// The state of every managed certificate, sorted by domain.
    pub fn certs(&self) -> Vec<CertStatus> {
        self.shared.certs.statuses()
    }

    /// Force a new certificate for `domain` now, and wait for the outcome.
    pub async fn renew(&self, domain: &str) -> Result<(), Error> {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        let rx = self.shared.certs.request_renewal(&domain)?;
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Error::Cert { domain, reason: e }),
            Err(_) => Err(Error::Shutdown),
        }
    }

    /// The internal CA's root certificate (PEM), for clients to trust.
    pub fn ca_cert_pem(&self) -> String {
        self.shared.certs.ca_cert_pem().to_owned()
    }

    /// What to tell the operator when this start replaced the internal CA's
    /// root (it lacked the configured name constraints): clients must trust
    /// the new one (`sandboxd ca-cert`).
    pub fn ca_replaced(&self) -> Option<String> {
        self.shared.certs.ca_replaced().map(str::to_owned)
    }
}
