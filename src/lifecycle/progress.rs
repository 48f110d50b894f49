//! [`Progress`]: the event sink of a streamed lifecycle operation.

use tokio::sync::mpsc;

use crate::api::Event;

/// The progress sink of a streamed operation; sending never fails the
/// operation (a CLI that went away does not stop a create).
#[derive(Clone)]
pub struct Progress(Option<mpsc::Sender<Event>>);

impl Progress {
    pub fn new(tx: mpsc::Sender<Event>) -> Self {
        Progress(Some(tx))
    }

    pub fn none() -> Self {
        Progress(None)
    }

    pub(super) async fn send(&self, event: Event) {
        if let Some(tx) = &self.0 {
            let _ = tx.send(event).await;
        }
    }

    pub(super) async fn step(&self, step: &str, done: u64, total: u64) {
        self.send(Event::Progress {
            step: step.to_string(),
            done,
            total,
        })
        .await;
    }

    pub(super) async fn message(&self, text: impl Into<String>) {
        self.send(Event::Message { text: text.into() }).await;
    }

    /// Hands a generated login to the caller (the one place its password
    /// goes; it is in no log line).
    pub(super) async fn login(&self, login: Option<crate::api::SetAuth>) {
        if let Some(l) = login {
            self.send(Event::Login {
                user: l.user,
                password: crate::api::Secret(l.password),
            })
            .await;
        }
    }
}
