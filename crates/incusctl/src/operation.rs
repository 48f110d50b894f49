//! Incus background operations (`/1.0/operations`): the [`OperationInfo`]
//! type and waiting for an operation to finish within a bound.
//!
//! Every mutating call of Incus (create, start, snapshot, exec...) answers
//! with an operation; the typed calls of [`crate::Client`] wait for it and
//! turn a failure into an [`Error`] carrying Incus' own message.

use std::collections::BTreeMap;
use std::time::Duration;

use http::Method;
use serde::{Deserialize, Serialize};

use crate::client::Client;
use crate::error::{Error, Result};
use crate::transport::{percent_encode, Answer};

/// Status code of a successful operation.
pub const STATUS_SUCCESS: u16 = 200;
/// Status code of a failed operation.
pub const STATUS_FAILURE: u16 = 400;
/// Status code of a cancelled operation.
pub const STATUS_CANCELLED: u16 = 401;

/// A background operation.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct OperationInfo {
    /// UUID.
    pub id: String,
    /// `task`, `websocket` or `token`.
    pub class: String,
    /// What it does, e.g. `Creating instance`.
    pub description: String,
    /// `Pending`, `Running`, `Success`, `Failure`, `Cancelled`.
    pub status: String,
    /// Numeric status (see the `STATUS_*` constants).
    pub status_code: u16,
    /// Objects the operation touches, e.g. `instances: [/1.0/instances/a]`.
    pub resources: Option<BTreeMap<String, Vec<String>>>,
    /// Operation-specific data (exec: `fds`, `return`, `output`).
    pub metadata: Option<serde_json::Value>,
    /// Whether it can be cancelled.
    pub may_cancel: bool,
    /// Error message when it failed.
    pub err: String,
}

impl OperationInfo {
    /// True when the operation reached a final state.
    pub fn is_final(&self) -> bool {
        self.status_code >= STATUS_SUCCESS
    }

    /// True when the operation succeeded.
    pub fn is_success(&self) -> bool {
        self.status_code == STATUS_SUCCESS
    }

    /// The first instance name among the operation's resources.
    pub fn instance(&self) -> Option<String> {
        self.resources
            .as_ref()
            .and_then(|r| r.get("instances"))
            .and_then(|v| v.first())
            .and_then(|p| p.strip_prefix("/1.0/instances/"))
            .map(|s| crate::transport::percent_decode(s.split('?').next().unwrap_or(s)))
    }

    /// Turns a final, failed operation into an error.
    pub(crate) fn into_result(self, what: Option<&str>) -> Result<OperationInfo> {
        if self.is_success() {
            return Ok(self);
        }
        let message = if self.err.is_empty() {
            self.status.clone()
        } else {
            self.err.clone()
        };
        Err(Error::from_operation(
            &self.id,
            &self.description,
            &self.status,
            message,
            what,
        ))
    }
}

/// Progress of a long operation as Incus reports it (the `*_progress` keys
/// of the operation's metadata, e.g. image download or unpack).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// The metadata key, e.g. `create_instance_from_image_unpack_progress`.
    pub stage: String,
    /// Incus' text, e.g. `Unpacking image: 45% (1.20GB/s)`.
    pub text: String,
    /// The percentage in the text, when there is one.
    pub percent: Option<u8>,
}

impl Progress {
    fn from_pair(stage: &str, text: &str) -> Progress {
        Progress {
            stage: stage.to_string(),
            text: text.to_string(),
            percent: parse_percent(text),
        }
    }
}

/// The number before the first `%` of `text`.
fn parse_percent(text: &str) -> Option<u8> {
    let pos = text.find('%')?;
    let digits: String = text[..pos]
        .chars()
        .rev()
        .take_while(char::is_ascii_digit)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    digits.parse::<u8>().ok().filter(|p| *p <= 100)
}

/// Forwards progress updates of operation `id` (received once known) from
/// an operation-events websocket until the operation ends or the receiver
/// goes away.
pub(crate) async fn forward_progress(
    mut ws: crate::transport::Ws,
    id: tokio::sync::oneshot::Receiver<String>,
    tx: tokio::sync::mpsc::Sender<Progress>,
) {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;

    let Ok(id) = id.await else { return };
    let mut last: BTreeMap<String, String> = BTreeMap::new();
    while let Some(Ok(msg)) = ws.next().await {
        let text = match msg {
            Message::Text(t) => t.as_str().to_string(),
            Message::Binary(b) => String::from_utf8_lossy(&b).into_owned(),
            Message::Close(_) => break,
            _ => continue,
        };
        let Ok(ev) = serde_json::from_str::<serde_json::Value>(&text) else {
            continue;
        };
        let Some(op) = ev.get("metadata") else {
            continue;
        };
        if op.get("id").and_then(|v| v.as_str()) != Some(id.as_str()) {
            continue;
        }
        if let Some(meta) = op.get("metadata").and_then(|m| m.as_object()) {
            for (k, v) in meta {
                let Some(v) = v.as_str() else { continue };
                if !k.ends_with("_progress") || last.get(k).map(String::as_str) == Some(v) {
                    continue;
                }
                last.insert(k.clone(), v.to_string());
                if tx.send(Progress::from_pair(k, v)).await.is_err() {
                    return;
                }
            }
        }
        if op
            .get("status_code")
            .and_then(serde_json::Value::as_u64)
            .is_some_and(|c| c >= u64::from(STATUS_SUCCESS))
        {
            break;
        }
    }
}

impl Client {
    /// Fetches an operation.
    pub async fn operation(&self, id: &str) -> Result<OperationInfo> {
        let path = format!("/1.0/operations/{}", percent_encode(id));
        self.transport()
            .json::<()>(Method::GET, &path, None)
            .await?
            .into_sync(&path)
    }

    /// Cancels an operation (only some operations can be cancelled).
    pub async fn cancel_operation(&self, id: &str) -> Result<()> {
        let path = format!("/1.0/operations/{}", percent_encode(id));
        self.transport()
            .json::<()>(Method::DELETE, &path, None)
            .await?;
        Ok(())
    }

    /// Waits up to `timeout` for operation `id` to reach a final state and
    /// returns it, whatever its outcome (a failed operation is returned, not
    /// turned into an error).
    ///
    /// Uses `GET /1.0/operations/{id}/wait?timeout=N`; a wait that runs out
    /// gives [`Error::Timeout`] (the operation itself goes on).
    pub async fn wait_operation(&self, id: &str, timeout: Duration) -> Result<OperationInfo> {
        let secs = timeout.as_secs().max(1) + u64::from(timeout.subsec_nanos() > 0);
        let path = format!("/1.0/operations/{}/wait?timeout={secs}", percent_encode(id));
        // Leave Incus time to answer after its own timeout.
        let http_timeout = Duration::from_secs(secs + 10);
        let answer = self
            .transport()
            .json_with_timeout::<()>(Method::GET, &path, None, Some(http_timeout))
            .await;
        let op: OperationInfo = match answer {
            Ok(Answer::Sync(v)) => serde_json::from_value(v)
                .map_err(|e| Error::protocol(&path, format!("bad operation: {e}")))?,
            Ok(Answer::Async(op)) => op,
            Err(e) if e.is_not_found() || e.is_not_running() => return Err(e),
            // Incus answers an error when its wait deadline expires; look at
            // the operation to tell a timeout from a real failure.
            Err(e) => {
                let op = self.operation(id).await.map_err(|_| e)?;
                if !op.is_final() {
                    return Err(Error::Timeout {
                        what: format!("operation \"{}\" ({id})", op.description),
                        after: timeout,
                    });
                }
                op
            }
        };
        if !op.is_final() {
            return Err(Error::Timeout {
                what: format!("operation \"{}\" ({id})", op.description),
                after: timeout,
            });
        }
        Ok(op)
    }

    /// Waits for operation `op` and turns a failure into an error naming
    /// `what` (e.g. `instance "web"`).
    pub(crate) async fn wait_success(
        &self,
        op: &OperationInfo,
        timeout: Duration,
        what: &str,
    ) -> Result<OperationInfo> {
        self.wait_operation(&op.id, timeout)
            .await?
            .into_result(Some(what))
    }

    /// Waits for an answer that may be sync (done) or async (an operation).
    pub(crate) async fn complete(
        &self,
        answer: Answer,
        timeout: Duration,
        what: &str,
    ) -> Result<Option<OperationInfo>> {
        match answer {
            Answer::Sync(_) => Ok(None),
            Answer::Async(op) => Ok(Some(self.wait_success(&op, timeout, what).await?)),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn percent_is_read_from_progress_text() {
        assert_eq!(parse_percent("Unpacking image: 45% (1.20GB/s)"), Some(45));
        assert_eq!(parse_percent("rootfs: 100% (5.00MB/s)"), Some(100));
        assert_eq!(parse_percent("no number"), None);
        assert_eq!(parse_percent("odd 300%"), None);
        let p = Progress::from_pair("download_progress", "metadata: 7% (1MB/s)");
        assert_eq!(p.percent, Some(7));
    }
}
