//! Lifecycle events (`/1.0/events?type=lifecycle` over a websocket), with
//! automatic reconnection, and waits built on them ([`Client::wait_for_ipv4`]).
//!
//! The stream reports its own connection changes ([`Event::Connected`],
//! [`Event::Disconnected`]) so a consumer knows when events may have been
//! missed and a full reconcile (one [`Client::list_instances`]) is due.

use std::net::Ipv4Addr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::StreamExt;
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

use crate::client::Client;
use crate::error::{Error, Result};
use crate::transport::percent_decode;

/// What happened, for the lifecycle actions sandboxd acts on. Everything
/// else is [`LifecycleAction::Other`] with Incus' action name.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LifecycleAction {
    /// `instance-created`
    InstanceCreated,
    /// `instance-started`
    InstanceStarted,
    /// `instance-stopped` (stopped from outside, or killed)
    InstanceStopped,
    /// `instance-shutdown` (clean shutdown)
    InstanceShutdown,
    /// `instance-restarted`
    InstanceRestarted,
    /// `instance-restored` (from a snapshot)
    InstanceRestored,
    /// `instance-deleted`
    InstanceDeleted,
    /// `instance-renamed` (see [`LifecycleEvent::old_name`])
    InstanceRenamed,
    /// `instance-updated` (configuration changed)
    InstanceUpdated,
    /// `instance-paused` (frozen)
    InstancePaused,
    /// `instance-resumed` (unfrozen)
    InstanceResumed,
    /// `instance-snapshot-created`
    SnapshotCreated,
    /// `instance-snapshot-deleted`
    SnapshotDeleted,
    /// Any other action, e.g. `instance-exec`, `image-created`.
    Other(String),
}

impl LifecycleAction {
    fn parse(s: &str) -> Self {
        match s {
            "instance-created" => Self::InstanceCreated,
            "instance-started" => Self::InstanceStarted,
            "instance-stopped" => Self::InstanceStopped,
            "instance-shutdown" => Self::InstanceShutdown,
            "instance-restarted" => Self::InstanceRestarted,
            "instance-restored" => Self::InstanceRestored,
            "instance-deleted" => Self::InstanceDeleted,
            "instance-renamed" => Self::InstanceRenamed,
            "instance-updated" => Self::InstanceUpdated,
            "instance-paused" => Self::InstancePaused,
            "instance-resumed" => Self::InstanceResumed,
            "instance-snapshot-created" => Self::SnapshotCreated,
            "instance-snapshot-deleted" => Self::SnapshotDeleted,
            other => Self::Other(other.to_string()),
        }
    }

    /// True for actions after which the instance is not running.
    pub fn is_down(&self) -> bool {
        matches!(
            self,
            Self::InstanceStopped | Self::InstanceShutdown | Self::InstanceDeleted
        )
    }
}

/// One lifecycle event.
#[derive(Debug, Clone)]
pub struct LifecycleEvent {
    /// Typed action.
    pub action: LifecycleAction,
    /// Incus' action name, e.g. `instance-started`.
    pub action_name: String,
    /// API path of the object, e.g. `/1.0/instances/web`.
    pub source: String,
    /// Instance the event is about, when the source is an instance or one
    /// of its snapshots.
    pub instance: Option<String>,
    /// Snapshot name, for snapshot events.
    pub snapshot: Option<String>,
    /// Project.
    pub project: String,
    /// Cluster member (`none` when not clustered).
    pub location: String,
    /// Time of the event (RFC 3339).
    pub timestamp: String,
    /// Action-specific details (e.g. `old_name` for renames).
    pub context: serde_json::Value,
}

impl LifecycleEvent {
    /// The previous name, for [`LifecycleAction::InstanceRenamed`].
    pub fn old_name(&self) -> Option<&str> {
        self.context.get("old_name").and_then(|v| v.as_str())
    }

    /// Parses one message of the events websocket; `None` for other event
    /// types.
    pub fn parse(text: &str) -> Option<LifecycleEvent> {
        #[derive(Deserialize)]
        struct Raw {
            #[serde(rename = "type")]
            kind: String,
            #[serde(default)]
            timestamp: String,
            #[serde(default)]
            location: String,
            #[serde(default)]
            project: String,
            #[serde(default)]
            metadata: RawMeta,
        }
        #[derive(Deserialize, Default)]
        struct RawMeta {
            #[serde(default)]
            action: String,
            #[serde(default)]
            source: String,
            #[serde(default)]
            context: serde_json::Value,
            #[serde(default)]
            project: String,
        }
        let raw: Raw = serde_json::from_str(text).ok()?;
        if raw.kind != "lifecycle" {
            return None;
        }
        let m = raw.metadata;
        let (instance, snapshot) = parse_source(&m.source);
        Some(LifecycleEvent {
            action: LifecycleAction::parse(&m.action),
            action_name: m.action,
            source: m.source,
            instance,
            snapshot,
            project: if m.project.is_empty() {
                raw.project
            } else {
                m.project
            },
            location: raw.location,
            timestamp: raw.timestamp,
            context: m.context,
        })
    }
}

fn parse_source(source: &str) -> (Option<String>, Option<String>) {
    let path = source.split('?').next().unwrap_or(source);
    let Some(rest) = path.strip_prefix("/1.0/instances/") else {
        return (None, None);
    };
    let mut parts = rest.split('/');
    let instance = parts.next().filter(|s| !s.is_empty()).map(percent_decode);
    let snapshot = match (parts.next(), parts.next()) {
        (Some("snapshots"), Some(s)) => Some(percent_decode(s)),
        _ => None,
    };
    (instance, snapshot)
}

/// An item of an [`EventStream`].
#[derive(Debug, Clone)]
pub enum Event {
    /// The websocket is (re)connected; events from before may be missing.
    Connected,
    /// The websocket dropped; the stream reconnects by itself.
    Disconnected {
        /// Why.
        reason: String,
    },
    /// A lifecycle event.
    Lifecycle(LifecycleEvent),
}

/// Lifecycle events of one Incus server, reconnecting forever with backoff
/// (100 ms doubling up to 5 s). Dropping the stream stops it.
#[derive(Debug)]
pub struct EventStream {
    rx: mpsc::Receiver<Event>,
    task: JoinHandle<()>,
}

impl EventStream {
    /// The next item; `None` only if the background task died.
    pub async fn next_event(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// The next lifecycle event, skipping connection notices.
    pub async fn next_lifecycle(&mut self) -> Option<LifecycleEvent> {
        loop {
            match self.rx.recv().await? {
                Event::Lifecycle(e) => return Some(e),
                Event::Connected | Event::Disconnected { .. } => {}
            }
        }
    }

    /// Waits up to `timeout` for a lifecycle event matching `pred`.
    pub async fn wait_for<F>(&mut self, timeout: Duration, mut pred: F) -> Result<LifecycleEvent>
    where
        F: FnMut(&LifecycleEvent) -> bool,
    {
        let fut = async {
            while let Some(e) = self.next_lifecycle().await {
                if pred(&e) {
                    return Some(e);
                }
            }
            None
        };
        match tokio::time::timeout(timeout, fut).await {
            Ok(Some(e)) => Ok(e),
            Ok(None) => Err(Error::protocol("events", "event stream ended")),
            Err(_) => Err(Error::Timeout {
                what: "a matching lifecycle event".to_string(),
                after: timeout,
            }),
        }
    }
}

impl futures_util::Stream for EventStream {
    type Item = Event;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const EVENTS_PATH: &str = "/1.0/events?type=lifecycle";
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

impl Client {
    /// Subscribes to lifecycle events. Returns at once; the first item is
    /// [`Event::Connected`] once the websocket is up (or
    /// [`Event::Disconnected`] while Incus cannot be reached).
    pub fn events(&self) -> EventStream {
        let (tx, rx) = mpsc::channel(256);
        let client = self.clone();
        let task = tokio::spawn(async move { run_events(client, None, tx).await });
        EventStream { rx, task }
    }

    /// Subscribes to lifecycle events and returns once the websocket is
    /// connected, so that no event after this call is missed. Fails when
    /// Incus cannot be reached now.
    pub async fn events_connected(&self) -> Result<EventStream> {
        let ws = self
            .transport()
            .websocket(EVENTS_PATH, crate::transport::MAX_EVENT_MESSAGE)
            .await?;
        let (tx, rx) = mpsc::channel(256);
        let client = self.clone();
        let task = tokio::spawn(async move { run_events(client, Some(ws), tx).await });
        Ok(EventStream { rx, task })
    }

    /// Waits until instance `name` has a global IPv4 address on `eth0`
    /// and returns it, for at most `timeout`.
    ///
    /// DHCP leases are not Incus events, so this re-reads the instance
    /// state whenever a lifecycle event about the instance arrives and
    /// otherwise at a short, growing interval (50 ms to 500 ms). It fails
    /// fast with [`Error::InstanceNotRunning`] when the instance is stopped
    /// and [`Error::NotFound`] when it is deleted.
    pub async fn wait_for_ipv4(&self, name: &str, timeout: Duration) -> Result<Ipv4Addr> {
        self.wait_for_ipv4_inner(name, None, timeout).await
    }

    /// Like [`Client::wait_for_ipv4`], until `eth0` carries `want`
    /// (among its addresses).
    pub async fn wait_for_this_ipv4(
        &self,
        name: &str,
        want: Ipv4Addr,
        timeout: Duration,
    ) -> Result<Ipv4Addr> {
        self.wait_for_ipv4_inner(name, Some(want), timeout).await
    }

    async fn wait_for_ipv4_inner(
        &self,
        name: &str,
        want: Option<Ipv4Addr>,
        timeout: Duration,
    ) -> Result<Ipv4Addr> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut events = self.events_connected().await?;
        let mut interval = Duration::from_millis(50);
        loop {
            let st = self.instance_state(name).await?;
            match want {
                None => {
                    if let Some(ip) = st.ipv4() {
                        return Ok(ip);
                    }
                }
                Some(w) => {
                    if st.ipv4_of(crate::state::DEFAULT_NIC).contains(&w) {
                        return Ok(w);
                    }
                }
            }
            if !st.is_running() {
                return Err(Error::InstanceNotRunning {
                    name: name.to_string(),
                    status: st.status,
                });
            }
            tokio::select! {
                ev = events.next_event() => {
                    if let Some(Event::Lifecycle(e)) = ev {
                        if e.instance.as_deref() == Some(name)
                            && e.action == LifecycleAction::InstanceDeleted
                        {
                            return Err(Error::NotFound {
                                what: format!("instance \"{name}\""),
                                message: "deleted while waiting for an address".into(),
                            });
                        }
                    }
                }
                () = tokio::time::sleep(interval) => {
                    interval = (interval * 2).min(Duration::from_millis(500));
                }
                () = tokio::time::sleep_until(deadline) => {
                    let what = match want {
                        Some(w) => format!("address {w} on eth0 of instance \"{name}\""),
                        None => format!("an IPv4 address on eth0 of instance \"{name}\""),
                    };
                    return Err(Error::Timeout { what, after: timeout });
                }
            }
        }
    }
}

async fn run_events(
    client: Client,
    mut first: Option<crate::transport::Ws>,
    tx: mpsc::Sender<Event>,
) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let ws = match first.take() {
            Some(ws) => Ok(ws),
            None => {
                client
                    .transport()
                    .websocket(EVENTS_PATH, crate::transport::MAX_EVENT_MESSAGE)
                    .await
            }
        };
        let reason = match ws {
            Ok(mut ws) => {
                backoff = BACKOFF_MIN;
                if tx.send(Event::Connected).await.is_err() {
                    return;
                }
                loop {
                    match ws.next().await {
                        Some(Ok(Message::Text(t))) => {
                            if let Some(e) = LifecycleEvent::parse(t.as_str()) {
                                if tx.send(Event::Lifecycle(e)).await.is_err() {
                                    return;
                                }
                            }
                        }
                        Some(Ok(Message::Binary(b))) => {
                            if let Some(e) =
                                std::str::from_utf8(&b).ok().and_then(LifecycleEvent::parse)
                            {
                                if tx.send(Event::Lifecycle(e)).await.is_err() {
                                    return;
                                }
                            }
                        }
                        Some(Ok(Message::Close(_))) | None => {
                            break "Incus closed the events websocket".to_string()
                        }
                        Some(Ok(_)) => {}
                        Some(Err(e)) => break format!("events websocket failed: {e}"),
                    }
                }
            }
            Err(e) => e.to_string(),
        };
        tracing::debug!(%reason, ?backoff, "incus events disconnected; reconnecting");
        if tx.send(Event::Disconnected { reason }).await.is_err() {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn parses_lifecycle_messages() {
        let text = r#"{"type":"lifecycle","timestamp":"2026-11-23T06:58:37.169Z","metadata":{"action":"instance-started","source":"/1.0/instances/t-probe","context":null,"requestor":{"username":"root","protocol":"unix","address":"@"},"name":"t-probe","project":"default"},"location":"none","project":"default"}"#;
        let e = LifecycleEvent::parse(text).unwrap();
        assert_eq!(e.action, LifecycleAction::InstanceStarted);
        assert_eq!(e.instance.as_deref(), Some("t-probe"));
        assert_eq!(e.snapshot, None);
        assert_eq!(e.project, "default");

        let snap = r#"{"type":"lifecycle","metadata":{"action":"instance-snapshot-created","source":"/1.0/instances/a/snapshots/s%201","context":{}}}"#;
        let e = LifecycleEvent::parse(snap).unwrap();
        assert_eq!(e.action, LifecycleAction::SnapshotCreated);
        assert_eq!(e.instance.as_deref(), Some("a"));
        assert_eq!(e.snapshot.as_deref(), Some("s 1"));

        let renamed = r#"{"type":"lifecycle","metadata":{"action":"instance-renamed","source":"/1.0/instances/b","context":{"old_name":"a"}}}"#;
        assert_eq!(
            LifecycleEvent::parse(renamed).unwrap().old_name(),
            Some("a")
        );

        assert!(LifecycleEvent::parse(r#"{"type":"logging","metadata":{}}"#).is_none());
        assert!(LifecycleEvent::parse("not json").is_none());
    }
}
