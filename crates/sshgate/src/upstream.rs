//! The upstream leg: a russh client that connects to the sandbox's sshd
//! under a bounded timeout, checks its pinned host key, logs in with the
//! gateway's per-sandbox key, and turns channels the upstream opens towards
//! us (`-R` forwarded-tcpip, forwarded-streamlocal, agent) into channels
//! opened towards the client.

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use russh::client::{self, AuthResult};
use russh::keys::{Algorithm, HashAlg, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};
use russh::{Channel, ChannelOpenFailure, Preferred};

use crate::conn::ConnShared;
use crate::{algorithms, relay, GatewayConfig, Route, Target};

pub(crate) type UpstreamHandle = client::Handle<UpHandler>;

/// Re-key after `rekey_bytes` either way (capped at russh's 1 GiB) or an hour.
pub(crate) fn rekey_limits(cfg: &GatewayConfig) -> russh::Limits {
    let bytes = cfg.rekey_bytes.clamp(1 << 16, 1 << 30);
    russh::Limits::new(bytes, bytes, std::time::Duration::from_secs(3600))
}

pub(crate) fn client_config(cfg: &GatewayConfig) -> Result<client::Config, crate::Error> {
    Ok(client::Config {
        limits: rekey_limits(cfg),
        window_size: cfg.initial_window.min(cfg.window_size),
        max_window_size: cfg.window_size,
        // The relay answers each close once the client side has closed.
        hold_close_reply: true,
        maximum_packet_size: cfg.max_packet_size,
        channel_buffer_size: cfg.channel_buffer_size,
        inactivity_timeout: cfg.inactivity_timeout,
        keepalive_interval: cfg.keepalive_interval,
        keepalive_max: cfg.keepalive_max,
        nodelay: cfg.nodelay,
        preferred: algorithms::preferred(cfg)?,
        client_id: client_id(),
        ..client::Config::default()
    })
}

fn client_id() -> russh::SshId {
    russh::SshId::Standard(concat!("SSH-2.0-sandboxd_", env!("CARGO_PKG_VERSION")).into())
}

/// Host-key algorithms to ask the upstream for, so that it presents the
/// key that is pinned rather than another of its keys.
fn host_key_algorithms(pinned: &PublicKey) -> Vec<Algorithm> {
    match pinned.algorithm() {
        Algorithm::Rsa { .. } => vec![
            Algorithm::Rsa {
                hash: Some(HashAlg::Sha512),
            },
            Algorithm::Rsa {
                hash: Some(HashAlg::Sha256),
            },
        ],
        other => vec![other],
    }
}

/// Connect and log in to the route's upstream. The error is the one line
/// the client is shown.
pub(crate) async fn connect(
    base: &client::Config,
    timeout: std::time::Duration,
    route: &Route,
    shared: Arc<ConnShared>,
) -> Result<UpstreamHandle, String> {
    let name = &route.sandbox;
    let (host, port) = match &route.target {
        Target::Addr { host, port } => (host.clone(), *port),
        Target::Stopped => return Err(format!("sandbox {name} is stopped")),
        Target::Unavailable { reason } => {
            return Err(format!("sandbox {name} is unavailable: {reason}"))
        }
    };
    let Some(pinned) = route.upstream_host_key.clone() else {
        tracing::warn!(sandbox = %name, "no pinned upstream host key; refusing to connect");
        return Err(format!(
            "sandbox {name} has no pinned host key; refusing to connect"
        ));
    };
    let config = Arc::new(client::Config {
        preferred: Preferred {
            key: Cow::Owned(host_key_algorithms(&pinned)),
            ..base.preferred.clone()
        },
        client_id: client_id(),
        limits: base.limits.clone(),
        window_size: base.window_size,
        max_window_size: base.max_window_size,
        hold_close_reply: base.hold_close_reply,
        maximum_packet_size: base.maximum_packet_size,
        channel_buffer_size: base.channel_buffer_size,
        inactivity_timeout: base.inactivity_timeout,
        keepalive_interval: base.keepalive_interval,
        keepalive_max: base.keepalive_max,
        anonymous: false,
        gex: base.gex.clone(),
        nodelay: base.nodelay,
    });
    let mismatch = Arc::new(AtomicBool::new(false));
    let handler = UpHandler {
        pinned,
        mismatch: mismatch.clone(),
        shared: shared.clone(),
        _gone: GoneGuard(shared.clone()),
    };
    let login = async {
        let addr = (host.as_str(), port);
        let mut handle = client::connect(config, addr, handler)
            .await
            .map_err(|e| (e, true))?;
        // An RSA key signs with rsa-sha2-*, never SHA-1 `ssh-rsa`.
        let hash = if route.upstream_key.algorithm().is_rsa() {
            let advertised = handle
                .best_supported_rsa_hash()
                .await
                .map_err(|e| (e, false))?;
            Some(algorithms::upstream_rsa_hash(advertised))
        } else {
            None
        };
        let key = PrivateKeyWithHashAlg::new(route.upstream_key.clone(), hash);
        match handle
            .authenticate_publickey(route.user.clone(), key)
            .await
            .map_err(|e| (e, false))?
        {
            AuthResult::Success => Ok(handle),
            AuthResult::Failure { .. } => Err((russh::Error::NotAuthenticated, false)),
        }
    };
    match tokio::time::timeout(timeout, login).await {
        Ok(Ok(handle)) => Ok(handle),
        Ok(Err((e, _))) if mismatch.load(Ordering::SeqCst) => {
            tracing::warn!(sandbox = %name, error = %e, "upstream host key does not match the pinned key; refusing");
            Err(format!(
                "sandbox {name}: host key mismatch; refusing to connect"
            ))
        }
        Ok(Err((russh::Error::NoCommonAlgo { kind, theirs, .. }, _))) => {
            let kind = algorithms::kind_name(&kind);
            tracing::warn!(sandbox = %name, kind, offered = %theirs.join(","), "upstream offers no {kind} algorithm the gateway allows (modern only); refusing");
            Err(format!(
                "sandbox {name}: its sshd offers no modern {kind} algorithm; refusing to connect"
            ))
        }
        Ok(Err((russh::Error::NotAuthenticated, _))) => {
            tracing::warn!(sandbox = %name, user = %route.user, "upstream refused the gateway's key");
            Err(format!("sandbox {name} refused the gateway's login key"))
        }
        Ok(Err((e, _))) => {
            tracing::info!(sandbox = %name, error = %e, "upstream unreachable");
            Err(format!("sandbox {name} is unreachable"))
        }
        Err(_) => {
            tracing::info!(sandbox = %name, ?timeout, "upstream connect timed out");
            Err(format!("sandbox {name} is unreachable"))
        }
    }
}

/// Wakes the connection when the upstream session ends, however it ends.
struct GoneGuard(Arc<ConnShared>);

impl Drop for GoneGuard {
    fn drop(&mut self) {
        self.0.upstream_gone();
    }
}

pub(crate) struct UpHandler {
    pinned: PublicKey,
    mismatch: Arc<AtomicBool>,
    shared: Arc<ConnShared>,
    _gone: GoneGuard,
}

impl UpHandler {
    /// Open the client twin of an upstream-opened channel in a task; accept
    /// the upstream channel only once the client accepted.
    fn bridge<F, Fut>(
        &self,
        kind: &'static str,
        up: Channel<client::Msg>,
        reply: client::ChannelOpenHandle,
        open: F,
    ) where
        F: FnOnce(russh::server::Handle) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<Channel<russh::server::Msg>, russh::Error>> + Send,
    {
        let shared = self.shared.clone();
        let Some(slot) = shared.channel_slot(kind) else {
            tokio::spawn(reply.reject(ChannelOpenFailure::ResourceShortage));
            return;
        };
        tokio::spawn(async move {
            let Some(server) = shared.server_handle() else {
                reply.reject(ChannelOpenFailure::ConnectFailed).await;
                return;
            };
            match open(server).await {
                Ok(client_chan) => {
                    reply.accept().await;
                    relay::spawn_upstream_initiated(shared, up, client_chan, slot);
                }
                Err(russh::Error::ChannelOpenFailure(reason)) => reply.reject(reason).await,
                Err(_) => reply.reject(ChannelOpenFailure::ConnectFailed).await,
            }
        });
    }
}

impl client::Handler for UpHandler {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let ok = match key {
            PublicKeyOrCertificate::PublicKey { key, .. } => {
                key.key_data() == self.pinned.key_data()
            }
            _ => false,
        };
        if !ok {
            self.mismatch.store(true, Ordering::SeqCst);
        }
        Ok(ok)
    }

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        channel: Channel<client::Msg>,
        connected_address: &str,
        connected_port: u32,
        originator_address: &str,
        originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        let (ca, oa) = (connected_address.to_owned(), originator_address.to_owned());
        self.bridge(
            "forwarded-tcpip",
            channel,
            reply,
            move |server| async move {
                server
                    .channel_open_forwarded_tcpip(ca, connected_port, oa, originator_port)
                    .await
            },
        );
        Ok(())
    }

    async fn server_channel_open_forwarded_streamlocal(
        &mut self,
        channel: Channel<client::Msg>,
        socket_path: &str,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        let path = socket_path.to_owned();
        self.bridge(
            "forwarded-streamlocal",
            channel,
            reply,
            move |server| async move { server.channel_open_forwarded_streamlocal(path).await },
        );
        Ok(())
    }

    async fn server_channel_open_agent_forward(
        &mut self,
        channel: Channel<client::Msg>,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        self.bridge("agent", channel, reply, move |server| async move {
            server.channel_open_agent().await
        });
        Ok(())
    }

    async fn disconnected(
        &mut self,
        reason: client::DisconnectReason<Self::Error>,
    ) -> Result<(), Self::Error> {
        match reason {
            client::DisconnectReason::ReceivedDisconnect(info) => {
                tracing::debug!(sandbox = %self.shared.sandbox, message = %info.message, "upstream disconnected");
                Ok(())
            }
            client::DisconnectReason::Error(e) => Err(e),
        }
    }
}
