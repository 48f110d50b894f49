//! The systemd service-manager protocol (`sd_notify`), spoken by hand: one
//! datagram per message to the unix socket named by `$NOTIFY_SOCKET` (a
//! path, or an abstract name written with a leading `@`), and the watchdog
//! period from `$WATCHDOG_USEC` / `$WATCHDOG_PID`.
//!
//! Owns only the wire format and the timing. What "ready" and "healthy" mean
//! is decided by the daemon (`daemon::run`), which calls [`Notifier::ready`],
//! [`Notifier::stopping`] and runs [`Notifier::watchdog`] with its own
//! health check. When `$NOTIFY_SOCKET` is unset (not started by systemd)
//! every call does nothing.

use std::future::Future;
use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::Arc;
use std::time::Duration;

/// Errors of reading the notification environment.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// `$NOTIFY_SOCKET` names something that is not a usable socket address.
    #[error("NOTIFY_SOCKET {0:?} is not a unix socket path or @abstract name")]
    BadSocket(String),
    /// `$WATCHDOG_USEC` is not a positive integer.
    #[error("WATCHDOG_USEC {0:?} is not a positive number of microseconds")]
    BadWatchdog(String),
    /// The datagram socket could not be created.
    #[error("cannot open a datagram socket for sd_notify: {0}")]
    Io(#[from] io::Error),
}

#[derive(Debug)]
struct Target {
    socket: UnixDatagram,
    addr: SocketAddr,
}

/// Sends state changes to the service manager. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Notifier {
    target: Option<Arc<Target>>,
    watchdog: Option<Duration>,
}

/// Parses `$NOTIFY_SOCKET`: an absolute path, or `@name` for the abstract
/// namespace.
fn parse_addr(value: &str) -> Result<SocketAddr, NotifyError> {
    if let Some(name) = value.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        return SocketAddr::from_abstract_name(name.as_bytes())
            .map_err(|_| NotifyError::BadSocket(value.to_string()));
    }
    if value.starts_with('/') {
        return SocketAddr::from_pathname(value)
            .map_err(|_| NotifyError::BadSocket(value.to_string()));
    }
    Err(NotifyError::BadSocket(value.to_string()))
}

/// The watchdog period asked for, if it is meant for this process.
fn parse_watchdog(
    usec: Option<&str>,
    pid: Option<&str>,
    own_pid: u32,
) -> Result<Option<Duration>, NotifyError> {
    let Some(usec) = usec else { return Ok(None) };
    if let Some(pid) = pid {
        // Meant for another process of the service (e.g. a wrapper).
        if pid.trim().parse::<u32>().ok() != Some(own_pid) {
            return Ok(None);
        }
    }
    match usec.trim().parse::<u64>() {
        Ok(n) if n > 0 => Ok(Some(Duration::from_micros(n))),
        _ => Err(NotifyError::BadWatchdog(usec.to_string())),
    }
}

impl Notifier {
    /// A notifier that does nothing.
    pub fn disabled() -> Self {
        Notifier::default()
    }

    /// Reads `$NOTIFY_SOCKET`, `$WATCHDOG_USEC` and `$WATCHDOG_PID`. Unset
    /// `NOTIFY_SOCKET` gives a disabled notifier (and no watchdog: nobody
    /// would hear the pings).
    pub fn from_env() -> Result<Self, NotifyError> {
        let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
            return Ok(Notifier::disabled());
        };
        let socket = socket.to_string_lossy().into_owned();
        let addr = parse_addr(&socket)?;
        let watchdog = parse_watchdog(
            std::env::var("WATCHDOG_USEC").ok().as_deref(),
            std::env::var("WATCHDOG_PID").ok().as_deref(),
            std::process::id(),
        )?;
        Ok(Notifier {
            target: Some(Arc::new(Target {
                socket: UnixDatagram::unbound()?,
                addr,
            })),
            watchdog,
        })
    }

    /// True when a service manager listens.
    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// The watchdog timeout systemd enforces, if any.
    pub fn watchdog_timeout(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Sends one message (newline-separated `KEY=VALUE` lines). Failures are
    /// logged, never fatal: the daemon serves whether or not anyone listens.
    pub fn send(&self, message: &str) {
        let Some(t) = &self.target else { return };
        if let Err(e) = t.socket.send_to_addr(message.as_bytes(), &t.addr) {
            tracing::warn!(error = %e, "sd_notify failed");
        }
    }

    /// `READY=1` with a one-line status.
    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={}", one_line(status)));
    }

    /// A new one-line status.
    pub fn status(&self, status: &str) {
        self.send(&format!("STATUS={}", one_line(status)));
    }

    /// `STOPPING=1`: the daemon drains.
    pub fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=draining");
    }

    /// Sends `WATCHDOG=1` every half watchdog period for as long as
    /// `healthy` answers `true` (each check bounded by a quarter period);
    /// an unhealthy or hung check skips the ping, so systemd restarts a
    /// daemon that stays unhealthy. Returns at once without a watchdog.
    pub async fn watchdog<F, Fut>(self, mut healthy: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        let Some(period) = self.watchdog else { return };
        let every = period / 2;
        let bound = period / 4;
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match tokio::time::timeout(bound, healthy()).await {
                Ok(true) => self.send("WATCHDOG=1"),
                Ok(false) => tracing::warn!("health check failed: watchdog not pinged"),
                Err(_) => tracing::warn!("health check hung: watchdog not pinged"),
            }
        }
    }
}

fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn addresses() {
        assert!(parse_addr("/run/systemd/notify").is_ok());
        let a = parse_addr("@sd-notify-x").unwrap();
        use std::os::linux::net::SocketAddrExt;
        assert_eq!(a.as_abstract_name(), Some(&b"sd-notify-x"[..]));
        assert!(parse_addr("relative").is_err());
        assert!(parse_addr("").is_err());
    }

    #[test]
    fn watchdog_env() {
        assert_eq!(parse_watchdog(None, None, 7).unwrap(), None);
        assert_eq!(
            parse_watchdog(Some("2000000"), None, 7).unwrap(),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            parse_watchdog(Some("2000000"), Some("7"), 7).unwrap(),
            Some(Duration::from_secs(2))
        );
        assert_eq!(parse_watchdog(Some("2000000"), Some("8"), 7).unwrap(), None);
        assert!(parse_watchdog(Some("0"), None, 7).is_err());
        assert!(parse_watchdog(Some("soon"), None, 7).is_err());
    }

    #[test]
    fn abstract_socket_receives() {
        let name = format!("sandboxd-notify-test-{}", std::process::id());
        use std::os::linux::net::SocketAddrExt;
        let rx = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(&name).unwrap()).unwrap();
        let n = Notifier {
            target: Some(Arc::new(Target {
                socket: UnixDatagram::unbound().unwrap(),
                addr: parse_addr(&format!("@{name}")).unwrap(),
            })),
            watchdog: None,
        };
        n.ready("two\nlines");
        let mut buf = [0u8; 256];
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=two lines");
    }
}
