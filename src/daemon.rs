//! `sandboxd serve`: the composition root. Loads the configuration, takes
//! the state directory, binds every listener (reporting all failures at
//! once), wires the store, the routing snapshot, the gates and the admin
//! API together, and drains on SIGTERM/SIGINT.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use store::Store;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;

use crate::admin::{self, Access, AdminContext};
use crate::certstore::StoreCerts;
use crate::config::{self, Config, ServeArgs, TlsMode};
use crate::routes::{self, Defaults, Routes, RoutingTable};

/// How long in-flight work may take after a shutdown signal.
const GRACE: Duration = Duration::from_secs(10);

/// Every listener the daemon serves, bound before it starts.
pub struct Bound {
    pub ssh: Vec<TcpListener>,
    /// The HTTPS and HTTP sockets of each web serving thread: every address
    /// is bound once, with a handle of the socket per thread (see
    /// [`httpgate::HttpGateway::spawn_threads`]).
    pub web: Vec<httpgate::ThreadListeners>,
    pub https_addrs: Vec<SocketAddr>,
    pub http_addrs: Vec<SocketAddr>,
    pub admin: UnixListener,
}

/// The listeners of [`bind_all`]: ssh sockets, then the web threads' sockets
/// and the HTTPS and HTTP addresses they listen on.
type BoundTcp = (
    Vec<std::net::TcpListener>,
    Vec<httpgate::ThreadListeners>,
    Vec<SocketAddr>,
    Vec<SocketAddr>,
);

fn bind_tcp(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let domain = socket2::Domain::for_address(addr);
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    if addr.is_ipv6() {
        // So that 0.0.0.0:P and [::]:P can both be bound.
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Binds all TCP listeners of `config`, the web ones once per serving
/// thread (`threads`); every failure is reported.
fn bind_all(config: &Config, threads: usize) -> Result<BoundTcp> {
    let mut problems = Vec::new();
    let mut ssh = Vec::new();
    for addr in &config.ssh_listen {
        match bind_tcp(*addr) {
            Ok(l) => ssh.push(l),
            Err(e) => problems.push(format!("cannot listen for ssh on {addr}: {e}")),
        }
    }
    let threads = threads.max(1);
    let mut web: Vec<httpgate::ThreadListeners> =
        (0..threads).map(|_| Default::default()).collect();
    let mut bind_web = |what: &str, addrs: &[SocketAddr], https: bool| {
        let mut bound = Vec::new();
        for addr in addrs {
            match httpgate::bind_per_thread(*addr, threads)
                .and_then(|ls| Ok((ls[0].local_addr()?, ls)))
            {
                Ok((local, ls)) => {
                    bound.push(local);
                    for (t, l) in web.iter_mut().zip(ls) {
                        match https {
                            true => t.https.push(l),
                            false => t.http.push(l),
                        }
                    }
                }
                Err(e) => problems.push(format!("cannot listen for {what} on {addr}: {e}")),
            }
        }
        bound
    };
    let https = bind_web("https", &config.https_listen, true);
    let http = bind_web("http", &config.http_listen, false);
    if !problems.is_empty() {
        return Err(anyhow!(problems.join("; ")));
    }
    if https.is_empty() && http.is_empty() {
        web.clear();
    }
    Ok((ssh, web, https, http))
}

fn init_tracing(filter: &str) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|f| tracing_subscriber::EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new(filter));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Standard error; the HTTPS threads' access-log lines are written in
        // batches when the thread goes idle.
        .with_writer(httpgate::LogWriter::default)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Entry point of `sandboxd serve`.
pub fn main(args: ServeArgs, admin_socket: Option<PathBuf>) -> Result<()> {
    let config = config::load(&args, admin_socket)?;
    init_tracing(&config.log);
    // Everything the daemon creates (database, keys, sockets) is private.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting runtime")?;
    rt.block_on(async move {
        let store = {
            let dir = config.state_dir.clone();
            tokio::task::spawn_blocking(move || Store::open(&dir))
                .await
                .context("opening the store")??
        };
        // One web serving thread per core (a connection never changes threads).
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let (ssh, web, https_addrs, http_addrs) = bind_all(&config, threads)?;
        let group = match &config.admin_group {
            Some(name) => nix::unistd::Group::from_name(name)?.map(|g| g.gid),
            None => None,
        };
        let admin = admin::bind_socket(&config.admin_socket, group).with_context(|| {
            format!("cannot bind admin socket {}", config.admin_socket.display())
        })?;
        let to_tokio = |v: Vec<std::net::TcpListener>| -> Result<Vec<TcpListener>> {
            v.into_iter()
                .map(|l| TcpListener::from_std(l).map_err(Into::into))
                .collect()
        };
        let bound = Bound {
            ssh: to_tokio(ssh)?,
            web,
            https_addrs,
            http_addrs,
            admin,
        };
        run(config, Arc::new(store), bound, shutdown_signal()).await
    })
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed when this is
/// called, not when first polled, so that a SIGTERM right after READY=1
/// drains instead of killing the process.
fn shutdown_signal() -> impl Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let streams = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    async move {
        let (Ok(mut term), Ok(mut int)) = streams else {
            tracing::error!("cannot install signal handlers; stop with SIGKILL");
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: draining"),
            _ = int.recv() => tracing::info!("SIGINT: draining"),
        }
    }
}

fn addrs(listeners: &[TcpListener]) -> Vec<String> {
    listeners
        .iter()
        .filter_map(|l| l.local_addr().ok())
        .map(|a| a.to_string())
        .collect()
}

fn addr_strings(addrs: &[SocketAddr]) -> Vec<String> {
    addrs.iter().map(ToString::to_string).collect()
}

/// Runs the daemon on already-bound listeners until `shutdown` resolves.
pub async fn run(
    config: Config,
    store: Arc<Store>,
    bound: Bound,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let started = Instant::now();
    // sd_notify (issue 6): a no-op unless started by systemd.
    let notify = crate::notify::Notifier::from_env()?;
    // Subscribe before the first build so that no change falls in between.
    let feed = store.subscribe();
    let defaults = Arc::new(Defaults {
        tls: config.default_route_tls(),
    });
    let initial = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || -> Result<RoutingTable, store::Error> {
            let seq = store.seq();
            Ok(RoutingTable::build(store.list()?, seq, defaults))
        })
        .await??
    };
    let routes = Routes::new(initial);
    let keeper = tokio::spawn(routes::keep_in_step(store.clone(), routes.clone(), feed));

    let host_keys = {
        let dir = config.state_dir.join("ssh");
        tokio::task::spawn_blocking(move || sshgate::load_or_generate_host_keys(&dir))
            .await
            .context("loading ssh host keys")??
    };
    let ssh_host_keys = sshgate::describe_host_keys(&host_keys);
    let mut ssh_config = sshgate::GatewayConfig {
        host_keys,
        banner: config.ssh_banner.clone(),
        ..Default::default()
    };
    config.ssh.apply(&mut ssh_config);
    let ssh = sshgate::Gateway::new(ssh_config, Arc::new(routes::SshRoutes(routes.clone())))
        .context("ssh gate configuration")?;
    // Revocation: every snapshot swap ends the SSH sessions it revokes
    // (removed key, stopped/removed/replaced sandbox) before the change is
    // reported as applied.
    {
        let gate = ssh.downgrade();
        routes.on_swap(move || {
            if let Some(g) = gate.upgrade() {
                g.routes_changed();
            }
        });
    }

    let acme_ca_root_pem = match &config.acme_ca_root {
        Some(path) => {
            Some(std::fs::read(path).with_context(|| format!("reading {}", path.display()))?)
        }
        None => None,
    };
    let https_port = bound.https_addrs.first().map_or(443, |a| a.port());
    let mut http_config = httpgate::HttpConfig {
        acme_directory: Some(config.acme_directory.clone()),
        acme_ca_root_pem,
        acme_email: config.acme_email.clone(),
        acme_challenges: config.acme_challenges.clone(),
        https_port,
        internal_suffixes: config.internal_ca_suffixes.clone(),
        ..Default::default()
    };
    config.http.apply(&mut http_config);
    // Made on a blocking thread: it reads and may write the store (the
    // internal CA) and makes the first certificates.
    let http = {
        let http_routes = Arc::new(routes::HttpRoutes(routes.clone()));
        let certs = Arc::new(StoreCerts(store.clone()));
        tokio::task::spawn_blocking(move || {
            httpgate::HttpGateway::new(http_config, http_routes, certs)
        })
        .await
        .context("starting the HTTPS gate")?
        .context("starting the HTTPS gate")?
    };
    // Certificates follow the routing snapshot.
    let follower = {
        let http = http.clone();
        let mut changes = routes.watch();
        tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                http.routes_changed().await;
            }
        })
    };

    let (stop_tx, stop_rx) = watch::channel(false);
    let tls_policy = crate::tlsfiles::Policy {
        default_internal: config.tls_mode == TlsMode::Internal,
        internal_suffixes: config.internal_ca_suffixes.clone(),
    };
    let lifecycle = crate::lifecycle::Lifecycle::new(
        store.clone(),
        routes.clone(),
        &config.incus,
        config.provision.clone(),
        tls_policy.clone(),
    );
    let ctx = Arc::new(AdminContext {
        http: http.clone(),
        ssh: ssh.clone(),
        ssh_host_keys,
        store: store.clone(),
        routes: routes.clone(),
        started,
        admin_socket: config.admin_socket.clone(),
        ssh_listen: addrs(&bound.ssh),
        https_listen: addr_strings(&bound.https_addrs),
        http_listen: addr_strings(&bound.http_addrs),
        lifecycle: lifecycle.clone(),
        tls_policy,
    });
    let access = Access {
        daemon_uid: nix::unistd::getuid().as_raw(),
        group: match &config.admin_group {
            Some(name) => nix::unistd::Group::from_name(name)?.map(|g| g.gid),
            None => None,
        },
    };
    let mut tasks = tokio::task::JoinSet::new();
    for l in bound.ssh {
        let gate = ssh.clone();
        tasks.spawn(async move {
            if let Err(e) = gate.serve(l).await {
                tracing::error!(error = %e, "ssh listener failed");
            }
        });
    }
    // HTTPS and HTTP: one single-threaded runtime per core, off this runtime.
    let web = http
        .spawn_threads(bound.web)
        .context("starting the web threads")?;
    tasks.spawn(async move {
        let joined = tokio::task::spawn_blocking(move || {
            web.into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(std::io::Error::other("panicked")))
                })
                .collect::<Vec<_>>()
        })
        .await;
        for r in joined.unwrap_or_default() {
            if let Err(e) = r {
                tracing::error!(error = %e, "web listener failed");
            }
        }
    });
    tasks.spawn(crate::watcher::run(lifecycle, stop_rx.clone()));
    tasks.spawn(admin::serve(
        bound.admin,
        ctx.clone(),
        access,
        stop_rx.clone(),
    ));
    tracing::info!(
        state_dir = %config.state_dir.display(),
        admin = %config.admin_socket.display(),
        ssh = ?ctx.ssh_listen,
        https = ?ctx.https_listen,
        http = ?ctx.http_listen,
        sandboxes = routes.snapshot().len(),
        "sandboxd ready"
    );
    // sd_notify: listeners are bound and the routing snapshot is loaded.
    notify.ready(&format!(
        "serving {} sandboxes; ssh {}; https {}; http {}",
        routes.snapshot().len(),
        ctx.ssh_listen.join(","),
        ctx.https_listen.join(","),
        ctx.http_listen.join(","),
    ));
    let watchdog = tokio::spawn(notify.clone().watchdog({
        let store = store.clone();
        move || {
            let store = store.clone();
            async move {
                // Healthy: the runtime schedules this, the blocking pool
                // answers and the store reads.
                tokio::task::spawn_blocking(move || store.get_record("health", "probe").is_ok())
                    .await
                    .unwrap_or(false)
            }
        }
    }));

    shutdown.await;
    notify.stopping();
    watchdog.abort();
    ssh.shutdown();
    http.shutdown();
    follower.abort();
    let _ = stop_tx.send(true);
    let drained =
        tokio::time::timeout(GRACE, async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!("grace period over; closing what is left");
        tasks.abort_all();
    }
    keeper.abort();
    let _ = std::fs::remove_file(&config.admin_socket);
    tokio::task::spawn_blocking(move || drop(store)).await.ok();
    tracing::info!("sandboxd stopped");
    Ok(())
}
