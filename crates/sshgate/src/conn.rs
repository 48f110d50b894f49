//! One client connection: the russh server handler (authentication, channel
//! opens, channel requests, forwarding requests) and the task that owns the
//! connection's lifetime (login grace, ban check, kill, upstream loss, the
//! closing log line).
//!
//! Handler callbacks never wait on channel I/O or on the upstream once the
//! session is up: channel opens spawn a task that opens the upstream twin
//! and only then accepts the client's channel; channel requests are
//! answered by the relay with the upstream's answer; forwarding requests
//! (`tcpip-forward`, `streamlocal-forward` and their cancels) take over
//! their reply (`Session::defer_request_reply`, a patch of the vendored
//! russh) and answer from a task once the upstream answered, bounded by a
//! timeout. The one bounded wait inside a callback is the upstream login
//! (inside public-key authentication, before any channel exists).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use russh::keys::PublicKey;
use russh::server::{self, Auth, Msg, PublicKeyOffer, Session, VerifiedPublicKey};
use russh::{
    client, Channel, ChannelId, ChannelOpenFailure, Disconnect, MethodKind, MethodSet, Preferred,
    Pty, Sig, SshId,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::limits::{SessionSlot, StartupPermit};
use crate::registry::{Admission, Counters, KillSignal};
use crate::upstream::{self, UpstreamHandle};
use crate::{algorithms, budget};
use crate::{keys, relay, GatewayConfig, Inner, Route};

/// How long a forwarding request may wait for the upstream's answer.
const FORWARD_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client gets to go away by itself before its socket is cut.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// After a failed upstream login, how long to wait for a session channel
/// that can carry the reason before disconnecting with it.
const FAILURE_CHANNEL_WAIT: Duration = Duration::from_secs(1);

/// Compression offered to clients: none, or zlib only after
/// authentication (`zlib@openssh.com`); never `zlib` from the first packet,
/// which would expose the decompressor to anyone.
const COMPRESSION: &[russh::compression::Name] =
    &[russh::compression::NONE, russh::compression::ZLIB_LEGACY];

pub(crate) fn server_config(cfg: &GatewayConfig) -> Result<server::Config, crate::Error> {
    Ok(server::Config {
        server_id: SshId::Standard(
            format!("SSH-2.0-sandboxd_{}", env!("CARGO_PKG_VERSION")).into(),
        ),
        methods: MethodSet::from(&[MethodKind::PublicKey][..]),
        auth_rejection_time: cfg.auth_rejection_time,
        auth_rejection_time_initial: Some(Duration::ZERO),
        keys: cfg.host_keys.clone(),
        window_size: cfg.initial_window.min(cfg.window_size),
        max_window_size: cfg.window_size,
        // The relay answers each close once the upstream side has closed.
        hold_close_reply: true,
        maximum_packet_size: cfg.max_packet_size,
        channel_buffer_size: cfg.channel_buffer_size,
        preferred: Preferred {
            compression: COMPRESSION.into(),
            ..algorithms::preferred(cfg)?
        },
        max_auth_attempts: cfg.max_auth_attempts,
        limits: upstream::rekey_limits(cfg),
        inactivity_timeout: cfg.inactivity_timeout,
        keepalive_interval: cfg.keepalive_interval,
        keepalive_max: cfg.keepalive_max,
        nodelay: cfg.nodelay,
        ..server::Config::default()
    })
}

/// State shared by the connection task, its handler, its upstream handler
/// and its channel relays.
pub(crate) struct ConnShared {
    pub(crate) sandbox: String,
    pub(crate) counters: Arc<Counters>,
    /// The sandbox's share of the relay budget (see `budget.rs`).
    pub(crate) budget: budget::Share,
    /// Channel windows: initial and largest.
    pub(crate) initial_window: u32,
    pub(crate) max_window: u32,
    /// Channels open or being opened, and their limit.
    open_channels: AtomicUsize,
    max_channels: usize,
    refused_channels: AtomicUsize,
    /// This connection's place in its sandbox's session count.
    _slot: Option<SessionSlot>,
    server: OnceLock<server::Handle>,
    upstream: Mutex<Option<Arc<UpstreamHandle>>>,
    gone: Notify,
    failure_shown: Notify,
    channels: AtomicUsize,
    channels_idle: Notify,
}

impl ConnShared {
    pub(crate) fn server_handle(&self) -> Option<server::Handle> {
        self.server.get().cloned()
    }

    pub(crate) fn upstream_gone(&self) {
        self.gone.notify_one();
    }

    /// A slot for one more channel on this connection, or `None` (logged)
    /// when the connection has `max_channels_per_connection` open.
    pub(crate) fn channel_slot(self: &Arc<Self>, kind: &str) -> Option<ChannelSlot> {
        let taken = self
            .open_channels
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_channels).then_some(n + 1)
            });
        if taken.is_ok() {
            return Some(ChannelSlot(self.clone()));
        }
        let refused = self.refused_channels.fetch_add(1, Ordering::Relaxed) + 1;
        // One line per connection at warning level, then every 1,000th.
        if refused == 1 || refused.is_multiple_of(1000) {
            tracing::warn!(
                sandbox = %self.sandbox,
                kind,
                limit = self.max_channels,
                refused,
                "channel refused: too many channels on one connection"
            );
        }
        None
    }

    pub(crate) fn channel_started(self: &Arc<Self>) -> ChannelGuard {
        self.channels.fetch_add(1, Ordering::SeqCst);
        ChannelGuard(self.clone())
    }

    async fn channels_done(&self, limit: Duration) {
        let wait = async {
            loop {
                let idle = self.channels_idle.notified();
                if self.channels.load(Ordering::SeqCst) == 0 {
                    return;
                }
                idle.await;
            }
        };
        let _ = tokio::time::timeout(limit, wait).await;
    }
}

/// One open (or opening) channel's place in the connection's limit.
pub(crate) struct ChannelSlot(Arc<ConnShared>);

impl Drop for ChannelSlot {
    fn drop(&mut self) {
        self.0.open_channels.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Counts a live channel relay; dropping it ends the count.
pub(crate) struct ChannelGuard(Arc<ConnShared>);

impl Drop for ChannelGuard {
    fn drop(&mut self) {
        if self.0.channels.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.channels_idle.notify_waiters();
        }
    }
}

/// Per-connection facts set by the handler, read by the connection task.
#[derive(Default)]
struct ConnState {
    /// A failed login of this connection was counted for the ban.
    failure_counted: AtomicBool,
    authed: Notify,
    session: OnceLock<Authed>,
    server: OnceLock<server::Handle>,
}

struct Authed {
    shared: Arc<ConnShared>,
    key: PublicKey,
    route: Arc<Route>,
    fingerprint: String,
    failure: Option<Refusal>,
}

/// Why a logged-in client gets no upstream, and how it is told.
#[derive(Clone)]
struct Refusal {
    message: String,
    /// The sandbox has `max_sessions_per_sandbox` connections already.
    too_many: bool,
}

struct ClientHandler {
    inner: Arc<Inner>,
    peer: SocketAddr,
    state: Arc<ConnState>,
    failed_once: bool,
    /// Route resolved for the user name of the current attempt.
    route: Option<(String, Option<Arc<Route>>)>,
    shared: Option<Arc<ConnShared>>,
    upstream: Option<Arc<UpstreamHandle>>,
    failure: Option<Refusal>,
}

impl ClientHandler {
    fn route_for(&mut self, user: &str) -> Option<Arc<Route>> {
        match &self.route {
            Some((u, r)) if u == user => r.clone(),
            _ => {
                let r = self.inner.routes.lookup(user);
                self.route = Some((user.to_owned(), r.clone()));
                r
            }
        }
    }

    fn allowed(&mut self, user: &str, key: &PublicKey) -> Option<Arc<Route>> {
        if self.inner.bans.is_banned(self.peer.ip()) {
            return None;
        }
        let route = self.route_for(user)?;
        route
            .authorized_keys
            .iter()
            .any(|k| k.key_data() == key.key_data())
            .then_some(route)
    }

    fn note_failure(&mut self) {
        if !self.failed_once {
            self.failed_once = true;
            let user = self.route.as_ref().map(|(u, _)| u.as_str()).unwrap_or("");
            tracing::info!(client = %self.peer, user, "public key refused (first refusal on this connection)");
            self.state.failure_counted.store(true, Ordering::SeqCst);
            if self.inner.bans.record_failure(self.peer.ip()) {
                tracing::warn!(client = %self.peer, "too many failed logins; address banned");
            }
        }
    }

    /// Open the upstream twin of a client channel in a task, then accept or
    /// reject the client's channel with the upstream's answer.
    fn open_twin<F, Fut>(
        &self,
        kind: &'static str,
        channel: Channel<Msg>,
        reply: server::ChannelOpenHandle,
        open: F,
    ) where
        F: FnOnce(Arc<UpstreamHandle>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Channel<client::Msg>, russh::Error>> + Send,
    {
        let Some(shared) = self.shared.clone() else {
            return; // dropping `reply` rejects
        };
        match (&self.upstream, &self.failure) {
            (Some(up), _) => {
                let Some(slot) = shared.channel_slot(kind) else {
                    tokio::spawn(reply.reject(ChannelOpenFailure::ResourceShortage));
                    return;
                };
                let up = up.clone();
                tokio::spawn(async move {
                    match open(up).await {
                        Ok(up_chan) => {
                            reply.accept().await;
                            relay::spawn_client_initiated(shared, channel, up_chan, slot);
                        }
                        Err(russh::Error::ChannelOpenFailure(reason)) => reply.reject(reason).await,
                        Err(e) => {
                            tracing::debug!(error = %e, "upstream channel open failed");
                            reply.reject(ChannelOpenFailure::ConnectFailed).await
                        }
                    }
                });
            }
            (None, Some(refusal)) => {
                let reason = ChannelOpenFailure::Other {
                    // SSH_OPEN_RESOURCE_SHORTAGE or SSH_OPEN_CONNECT_FAILED
                    code: if refusal.too_many { 4 } else { 2 },
                    reason: refusal.message.clone(),
                };
                tokio::spawn(reply.reject(reason));
            }
            (None, None) => {}
        }
    }
}

impl server::Handler for ClientHandler {
    type Error = russh::Error;

    async fn authentication_banner(&mut self) -> Result<Option<String>, Self::Error> {
        Ok(self.inner.config.banner.clone())
    }

    async fn auth_publickey_offered(
        &mut self,
        user: &str,
        offer: PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        if !algorithms::userauth_allowed(offer.algorithm) {
            // A known key offered with SHA-1 `ssh-rsa`: the client may try
            // again with rsa-sha2-*; not a failure for the ban.
            tracing::info!(client = %self.peer, user, algorithm = %offer.algorithm, "login signature algorithm refused (SHA-1 or DSA)");
            return Ok(Auth::reject());
        }
        if self.allowed(user, offer.public_key).is_some() {
            Ok(Auth::Accept)
        } else {
            self.note_failure();
            Ok(Auth::reject())
        }
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        if !algorithms::userauth_allowed(key.algorithm) {
            return Ok(Auth::reject());
        }
        let Some(route) = self.allowed(user, key.public_key) else {
            self.note_failure();
            return Ok(Auth::reject());
        };
        if self.failed_once {
            self.inner.bans.forgive_one(self.peer.ip());
        }
        let fingerprint = keys::fingerprint(key.public_key);
        let slot = self.inner.sessions.claim(&route.sandbox);
        let cfg = &self.inner.config;
        let shared = Arc::new(ConnShared {
            sandbox: route.sandbox.clone(),
            counters: Arc::default(),
            budget: self.inner.budget.share(&route.sandbox),
            initial_window: cfg.initial_window.min(cfg.window_size),
            max_window: cfg.window_size,
            open_channels: AtomicUsize::new(0),
            max_channels: cfg.max_channels_per_connection.max(1),
            refused_channels: AtomicUsize::new(0),
            _slot: slot,
            server: OnceLock::new(),
            upstream: Mutex::new(None),
            gone: Notify::new(),
            failure_shown: Notify::new(),
            channels: AtomicUsize::new(0),
            channels_idle: Notify::new(),
        });
        if let Some(h) = self.state.server.get() {
            let _ = shared.server.set(h.clone());
        }
        if shared._slot.is_none() {
            let limit = self.inner.sessions.max();
            tracing::warn!(
                sandbox = %route.sandbox,
                client = %self.peer,
                limit,
                "login refused: too many connections to this sandbox"
            );
            self.failure = Some(Refusal {
                message: format!(
                    "sandbox {} has too many open connections ({limit}); close one and retry",
                    route.sandbox
                ),
                too_many: true,
            });
        } else {
            // Boxed: the upstream login (a whole client handshake) would
            // otherwise be inlined into this callback's future, and so into
            // the session task, which keeps that size for its whole life.
            match Box::pin(upstream::connect(
                &self.inner.client_config,
                self.inner.config.connect_timeout,
                &route,
                shared.clone(),
            ))
            .await
            {
                Ok(handle) => {
                    let handle = Arc::new(handle);
                    *shared
                        .upstream
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(handle.clone());
                    self.upstream = Some(handle);
                }
                Err(message) => {
                    self.failure = Some(Refusal {
                        message,
                        too_many: false,
                    })
                }
            }
        }
        let _ = self.state.session.set(Authed {
            shared: shared.clone(),
            key: key.public_key.clone(),
            route: route.clone(),
            fingerprint,
            failure: self.failure.clone(),
        });
        self.shared = Some(shared);
        self.state.authed.notify_one();
        Ok(Auth::Accept)
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let (None, Some(refusal), Some(shared)) = (&self.upstream, &self.failure, &self.shared) {
            // Show the reason on the client's terminal (stderr), then end.
            let line = format!("{}\r\n", refusal.message);
            let shared = shared.clone();
            tokio::spawn(async move {
                reply.accept().await;
                let _ = channel.extended_data_bytes(1, line.into_bytes()).await;
                let _ = channel.exit_status(255).await;
                let _ = channel.eof().await;
                let _ = channel.close().await;
                shared.failure_shown.notify_one();
            });
            return Ok(());
        }
        self.open_twin("session", channel, reply, |up| async move {
            up.channel_open_session().await
        });
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        originator_address: &str,
        originator_port: u32,
        reply: server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let (host, orig) = (host_to_connect.to_owned(), originator_address.to_owned());
        self.open_twin("direct-tcpip", channel, reply, move |up| async move {
            up.channel_open_direct_tcpip(host, port_to_connect, orig, originator_port)
                .await
        });
        Ok(())
    }

    async fn channel_open_direct_streamlocal(
        &mut self,
        channel: Channel<Msg>,
        socket_path: &str,
        reply: server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let path = socket_path.to_owned();
        self.open_twin("direct-streamlocal", channel, reply, move |up| async move {
            up.channel_open_direct_streamlocal(path).await
        });
        Ok(())
    }

    // Channel requests: russh hands each one to the channel's queue as well,
    // where the relay forwards it upstream in order and answers the client
    // with the upstream's answer (X11 is refused there, in order). So the
    // callbacks below do nothing: replying here would answer too early.

    async fn pty_request(
        &mut self,
        _channel: ChannelId,
        _term: &str,
        _col_width: u32,
        _row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(Pty, u32)],
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        Ok(())
    }

    async fn x11_request(
        &mut self,
        _channel: ChannelId,
        _single_connection: bool,
        _x11_auth_protocol: &str,
        _x11_auth_cookie: &str,
        _x11_screen_number: u32,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        Ok(())
    }

    async fn env_request(
        &mut self,
        _channel: ChannelId,
        _variable_name: &str,
        _variable_value: &str,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        Ok(())
    }

    async fn shell_request(
        &mut self,
        _channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        Ok(())
    }

    async fn exec_request(
        &mut self,
        _channel: ChannelId,
        _data: &[u8],
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        Ok(())
    }

    async fn subsystem_request(
        &mut self,
        _channel: ChannelId,
        _name: &str,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        Ok(())
    }

    async fn agent_request(
        &mut self,
        _channel: ChannelId,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        Ok(self.upstream.is_some())
    }

    async fn signal(
        &mut self,
        _channel: ChannelId,
        _signal: Sig,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        Ok(())
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let Some(up) = self.upstream.clone() else {
            return Ok(false);
        };
        let (address, asked) = (address.to_owned(), *port);
        answer_later(session, async move {
            match up.tcpip_forward(address, asked).await {
                // The bound port goes back only when the client asked for 0.
                Ok(bound) => Some((asked == 0).then_some(bound)),
                Err(e) => {
                    tracing::debug!(error = %e, "upstream refused tcpip-forward");
                    None
                }
            }
        });
        Ok(true)
    }

    async fn cancel_tcpip_forward(
        &mut self,
        address: &str,
        port: u32,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let Some(up) = self.upstream.clone() else {
            return Ok(false);
        };
        let address = address.to_owned();
        answer_later(session, async move {
            up.cancel_tcpip_forward(address, port)
                .await
                .ok()
                .map(|()| None)
        });
        Ok(true)
    }

    async fn streamlocal_forward(
        &mut self,
        socket_path: &str,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let Some(up) = self.upstream.clone() else {
            return Ok(false);
        };
        let path = socket_path.to_owned();
        answer_later(session, async move {
            up.streamlocal_forward(path).await.ok().map(|()| None)
        });
        Ok(true)
    }

    async fn cancel_streamlocal_forward(
        &mut self,
        socket_path: &str,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let Some(up) = self.upstream.clone() else {
            return Ok(false);
        };
        let path = socket_path.to_owned();
        answer_later(session, async move {
            up.cancel_streamlocal_forward(path)
                .await
                .ok()
                .map(|()| None)
        });
        Ok(true)
    }
}

/// Forward a global request upstream from a task and answer the client
/// with the upstream's answer (`Some(port to report)` or `None` for a
/// refusal), or with a failure after [`FORWARD_REQUEST_TIMEOUT`]. The
/// session loop goes on serving meanwhile; russh keeps replies in request
/// order.
fn answer_later<F>(session: &mut Session, upstream: F)
where
    F: Future<Output = Option<Option<u32>>> + Send + 'static,
{
    let reply = session.defer_request_reply();
    tokio::spawn(async move {
        let answer = tokio::time::timeout(FORWARD_REQUEST_TIMEOUT, upstream).await;
        match (reply, answer) {
            (Some(reply), Ok(Some(port))) => reply.success(port),
            (Some(reply), _) => reply.failure(),
            (None, _) => {}
        }
    });
}

/// Serve one accepted TCP connection to its end.
pub(crate) async fn run_connection(
    inner: Arc<Inner>,
    socket: TcpStream,
    peer: SocketAddr,
    id: u64,
    startup: StartupPermit,
) {
    let _ = socket.set_nodelay(inner.config.nodelay);
    let started = Instant::now();
    let deadline = tokio::time::Instant::from_std(started + inner.config.login_grace);
    let kill_switch = Arc::new(KillSwitch::default());
    let stream = Killable {
        inner: socket,
        kill: kill_switch.clone(),
    };
    let state = Arc::new(ConnState::default());
    let handler = ClientHandler {
        inner: inner.clone(),
        peer,
        state: state.clone(),
        failed_once: false,
        route: None,
        shared: None,
        upstream: None,
        failure: None,
    };
    let session = match tokio::time::timeout_at(
        deadline,
        server::run_stream(inner.server_config.clone(), stream, handler),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(client = %peer, error = %e, "ssh handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(client = %peer, "no ssh version line within the login grace time");
            grace_exceeded(&inner, &state, peer);
            return;
        }
    };
    let handle = session.handle();
    let _ = state.server.set(handle.clone());
    tokio::pin!(session);

    // Phase 1: handshake and authentication, bounded by the login grace.
    let mut ended = false;
    tokio::select! {
        r = &mut session => {
            ended = true;
            if let Err(e) = r {
                tracing::debug!(client = %peer, error = %e, "connection ended with an error");
            }
        }
        _ = state.authed.notified() => {}
        _ = tokio::time::sleep_until(deadline) => {}
    };
    // A quick client may log in and finish before this task looks: what
    // counts is whether authentication happened, not which branch fired.
    drop(startup);
    let Some(auth) = state.session.get() else {
        if !ended {
            grace_exceeded(&inner, &state, peer);
        }
        kill_switch.kill();
        return;
    };
    let shared = auth.shared.clone();
    // The handler may have authenticated before the server handle was
    // published; publish it now for upstream-initiated channels.
    let _ = shared.server.set(handle.clone());

    let kill = Arc::new(KillSignal::default());
    inner.registry.insert(
        id,
        Admission {
            sandbox: shared.sandbox.clone(),
            client: peer,
            key: auth.key.clone(),
            fingerprint: auth.fingerprint.clone(),
            route: auth.route.clone(),
        },
        shared.counters.clone(),
        kill.clone(),
        inner.routes.as_ref(),
    );

    let end_reason: &str;
    if ended {
        end_reason = "client closed";
    } else if let Some(refusal) = &auth.failure {
        // Phase 2a: no upstream for this client. Tell it, then end.
        let code = if refusal.too_many {
            Disconnect::TooManyConnections
        } else {
            Disconnect::ByApplication
        };
        tokio::select! {
            _ = &mut session => {}
            _ = shared.failure_shown.notified() => {
                let _ = tokio::time::timeout(CLOSE_GRACE, &mut session).await;
            }
            _ = tokio::time::sleep(FAILURE_CHANNEL_WAIT) => {
                let _ = handle
                    .disconnect(code, refusal.message.clone(), String::new())
                    .await;
                let _ = tokio::time::timeout(CLOSE_GRACE, &mut session).await;
            }
        }
        end_reason = if refusal.too_many {
            "too many connections to the sandbox"
        } else {
            "upstream unavailable"
        };
    } else {
        // Phase 2b: relay until either side ends or the session is killed.
        end_reason = tokio::select! {
            _ = &mut session => "client closed",
            why = kill.fired() => {
                let _ = handle
                    .disconnect(Disconnect::ByApplication, why, String::new())
                    .await;
                let _ = tokio::time::timeout(CLOSE_GRACE, &mut session).await;
                "killed"
            }
            _ = shared.gone.notified() => {
                // Let the relays deliver what the upstream sent last.
                shared.channels_done(CLOSE_GRACE).await;
                let _ = handle
                    .disconnect(
                        Disconnect::ByApplication,
                        format!("sandbox {} closed the connection", shared.sandbox),
                        String::new(),
                    )
                    .await;
                let _ = tokio::time::timeout(CLOSE_GRACE, &mut session).await;
                "upstream closed"
            }
        };
    }
    kill_switch.kill();
    inner.registry.remove(id);
    let upstream = shared
        .upstream
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
    if let Some(up) = upstream {
        let _ = up.disconnect(Disconnect::ByApplication, "", "").await;
    }
    tracing::info!(
        session = id,
        sandbox = %shared.sandbox,
        client = %peer,
        key = %auth.fingerprint,
        duration_ms = started.elapsed().as_millis() as u64,
        bytes_up = shared.counters.up.load(Ordering::Relaxed),
        bytes_down = shared.counters.down.load(Ordering::Relaxed),
        end = end_reason,
        "ssh session ended"
    );
}

/// A connection did not log in within the login grace time: that counts
/// as a failed login of its source (unless it already failed one), so that
/// holding connections open in the handshake leads to a ban like guessing.
fn grace_exceeded(inner: &Inner, state: &ConnState, peer: SocketAddr) {
    if state.failure_counted.swap(true, Ordering::SeqCst) {
        tracing::debug!(client = %peer, "login grace time exceeded");
        return;
    }
    tracing::info!(client = %peer, "login grace time exceeded; counted as a failed login");
    if inner.bans.record_failure(peer.ip()) {
        tracing::warn!(client = %peer, "too many failed logins; address banned");
    }
}

/// Cuts a connection's socket from outside the russh session task, so that
/// a stuck or killed connection never outlives its owner.
#[derive(Default)]
struct KillSwitch {
    killed: AtomicBool,
    wakers: Mutex<[Option<Waker>; 2]>,
}

impl KillSwitch {
    fn kill(&self) {
        self.killed.store(true, Ordering::SeqCst);
        let wakers = std::mem::take(
            &mut *self
                .wakers
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for w in wakers.into_iter().flatten() {
            w.wake();
        }
    }

    fn check(&self, slot: usize, cx: &Context<'_>) -> std::io::Result<()> {
        if self.killed.load(Ordering::SeqCst) {
            return Err(std::io::ErrorKind::ConnectionAborted.into());
        }
        let mut wakers = self
            .wakers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(w) = wakers.get_mut(slot) {
            match w {
                Some(old) if old.will_wake(cx.waker()) => {}
                _ => *w = Some(cx.waker().clone()),
            }
        }
        drop(wakers);
        if self.killed.load(Ordering::SeqCst) {
            return Err(std::io::ErrorKind::ConnectionAborted.into());
        }
        Ok(())
    }
}

struct Killable {
    inner: TcpStream,
    kill: Arc<KillSwitch>,
}

impl AsyncRead for Killable {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.kill.check(0, cx)?;
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Killable {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.kill.check(1, cx)?;
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.kill.check(1, cx)?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.kill.check(1, cx)?;
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
