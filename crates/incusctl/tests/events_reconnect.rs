//! Reconnection of the lifecycle event stream, against a stand-in events
//! endpoint on a temporary unix socket (a real websocket server), so that
//! the real incusd need not be killed.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::result_large_err)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use incusctl::{Client, ClientOptions, Event, LifecycleAction};
use tokio::net::UnixListener;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::Message;

const STEP: Duration = Duration::from_secs(10);

fn started(name: &str) -> String {
    format!(
        r#"{{"type":"lifecycle","timestamp":"2026-01-01T00:00:00Z","metadata":{{"action":"instance-started","source":"/1.0/instances/{name}","context":{{}},"project":"default"}},"location":"none","project":"default"}}"#
    )
}

/// Accepts one websocket, records the request path, sends `events`, then
/// either closes (`close`) or waits for the client to go away.
async fn serve_once(
    listener: &UnixListener,
    paths: Arc<Mutex<Vec<String>>>,
    events: Vec<String>,
    close: bool,
) {
    let (stream, _) = listener.accept().await.unwrap();
    let record = paths.clone();
    let mut ws =
        tokio_tungstenite::accept_hdr_async(stream, move |req: &Request, resp: Response| {
            record.lock().unwrap().push(req.uri().to_string());
            Ok(resp)
        })
        .await
        .unwrap();
    // A logging event the client must skip.
    ws.send(Message::text(
        r#"{"type":"logging","metadata":{"message":"x"}}"#,
    ))
    .await
    .unwrap();
    for e in events {
        ws.send(Message::text(e)).await.unwrap();
    }
    if close {
        ws.close(None).await.unwrap();
    } else {
        while let Some(Ok(_)) = ws.next().await {}
    }
}

async fn next(stream: &mut incusctl::EventStream) -> Event {
    tokio::time::timeout(STEP, stream.next_event())
        .await
        .expect("event in time")
        .expect("stream alive")
}

#[tokio::test]
async fn event_stream_reconnects_after_the_server_drops_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("incus.socket");
    let listener = UnixListener::bind(&path).unwrap();
    let paths = Arc::new(Mutex::new(Vec::new()));
    let server_paths = paths.clone();
    let server = tokio::spawn(async move {
        serve_once(&listener, server_paths.clone(), vec![started("a0")], true).await;
        serve_once(&listener, server_paths, vec![started("a1")], false).await;
    });

    let client = Client::lazy(path, ClientOptions::default());
    let mut events = client.events_connected().await.unwrap();
    assert!(matches!(next(&mut events).await, Event::Connected));
    match next(&mut events).await {
        Event::Lifecycle(e) => {
            assert_eq!(e.action, LifecycleAction::InstanceStarted);
            assert_eq!(e.instance.as_deref(), Some("a0"));
        }
        other => panic!("expected a0 started, got {other:?}"),
    }
    assert!(matches!(
        next(&mut events).await,
        Event::Disconnected { .. }
    ));
    assert!(matches!(next(&mut events).await, Event::Connected));
    let e = events.next_lifecycle().await.unwrap();
    assert_eq!(e.instance.as_deref(), Some("a1"));
    assert_eq!(
        *paths.lock().unwrap(),
        vec!["/1.0/events?type=lifecycle", "/1.0/events?type=lifecycle"]
    );
    drop(events);
    tokio::time::timeout(STEP, server).await.unwrap().unwrap();
}

#[tokio::test]
async fn event_stream_waits_for_incus_to_come_up() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("incus.socket");
    let client = Client::lazy(path.clone(), ClientOptions::default());
    let mut events = client.events();
    match next(&mut events).await {
        Event::Disconnected { reason } => assert!(reason.contains("not running"), "{reason}"),
        other => panic!("expected a disconnection notice, got {other:?}"),
    }
    // Incus appears: the stream connects by itself and delivers events.
    let listener = UnixListener::bind(&path).unwrap();
    let paths = Arc::new(Mutex::new(Vec::new()));
    let server = tokio::spawn(async move {
        serve_once(&listener, paths, vec![started("late")], false).await;
    });
    loop {
        match next(&mut events).await {
            Event::Disconnected { .. } => continue,
            Event::Connected => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    let e = events.next_lifecycle().await.unwrap();
    assert_eq!(e.instance.as_deref(), Some("late"));
    drop(events);
    tokio::time::timeout(STEP, server).await.unwrap().unwrap();
}
