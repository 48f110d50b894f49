//! HTTP/1.1 and websockets over the Incus unix socket.
//!
//! Owns the connection to incusd: one short-lived hyper connection per
//! request (unix sockets are cheap, and this keeps no pool state), the
//! decoding of Incus' response envelope (`sync` / `async` / `error`) and the
//! websocket upgrade used by exec and events. It knows nothing of instances
//! or images; the typed calls live in the other modules.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::net::UnixStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::WebSocketStream;

use crate::error::{Error, Result};
use crate::operation::OperationInfo;

/// Cap on any answer of incusd read whole (instance lists and states carry
/// what containers report, e.g. their addresses): 64 MiB.
pub const MAX_ANSWER: usize = 64 << 20;

/// Cap on one exec websocket message from incusd (output arrives in
/// pieces of a few KiB): 1 MiB.
pub(crate) const MAX_EXEC_MESSAGE: usize = 1 << 20;

/// Cap on one event websocket message (an event carries one object's
/// metadata): 16 MiB.
pub(crate) const MAX_EVENT_MESSAGE: usize = 16 << 20;

/// Request body type used throughout the crate.
pub(crate) type ReqBody = UnsyncBoxBody<Bytes, io::Error>;

/// A websocket to incusd.
pub(crate) type Ws = WebSocketStream<UnixStream>;

/// An empty request body.
pub(crate) fn empty_body() -> ReqBody {
    Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A request body from bytes held in memory.
pub(crate) fn bytes_body(data: impl Into<Bytes>) -> ReqBody {
    Full::new(data.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Incus' response envelope.
#[derive(Debug, Deserialize)]
pub(crate) struct Envelope {
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub error_code: u16,
    #[serde(default)]
    pub error: String,
    #[serde(default)]
    pub metadata: serde_json::Value,
}

/// A decoded successful answer.
#[derive(Debug)]
pub(crate) enum Answer {
    /// A synchronous answer with its metadata.
    Sync(serde_json::Value),
    /// A background operation was created.
    Async(OperationInfo),
}

impl Answer {
    /// The metadata of a sync answer, decoded.
    pub fn into_sync<T: DeserializeOwned>(self, context: &str) -> Result<T> {
        match self {
            Answer::Sync(v) => serde_json::from_value(v)
                .map_err(|e| Error::protocol(context, format!("bad metadata: {e}"))),
            Answer::Async(op) => Err(Error::protocol(
                context,
                format!("expected a sync answer, got operation {}", op.id),
            )),
        }
    }

    /// The operation of an async answer.
    pub fn into_operation(self, context: &str) -> Result<OperationInfo> {
        match self {
            Answer::Async(op) => Ok(op),
            Answer::Sync(_) => Err(Error::protocol(
                context,
                "expected an operation, got a sync answer",
            )),
        }
    }
}

/// A raw answer (status, headers, body), for the files API and logs.
#[derive(Debug)]
pub(crate) struct RawAnswer {
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Connection factory for one socket path.
#[derive(Debug, Clone)]
pub(crate) struct Transport {
    socket: PathBuf,
    request_timeout: Duration,
}

impl Transport {
    pub fn new(socket: PathBuf, request_timeout: Duration) -> Self {
        Transport {
            socket,
            request_timeout,
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Opens a new stream to incusd, mapping "no socket" and "refused" to
    /// [`Error::NotRunning`].
    pub async fn connect(&self) -> Result<UnixStream> {
        UnixStream::connect(&self.socket).await.map_err(|e| {
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound
                    | io::ErrorKind::ConnectionRefused
                    | io::ErrorKind::PermissionDenied
            ) {
                Error::NotRunning {
                    path: self.socket.clone(),
                    source: e,
                }
            } else {
                Error::io(format!("connecting to {}", self.socket.display()), e)
            }
        })
    }

    /// Sends one request and returns the response head and streaming body.
    async fn send(
        &self,
        method: Method,
        path: &str,
        headers: HeaderMap,
        body: ReqBody,
    ) -> Result<http::Response<Incoming>> {
        let stream = self.connect().await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|source| Error::Transport {
                context: format!("{method} {path}"),
                source,
            })?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "incus connection ended with an error");
            }
        });
        let mut req = Request::builder()
            .method(method.clone())
            .uri(path)
            .header(http::header::HOST, "incus")
            .body(body)
            .map_err(|e| Error::InvalidArgument(format!("bad request {path}: {e}")))?;
        req.headers_mut().extend(headers);
        sender
            .send_request(req)
            .await
            .map_err(|source| Error::Transport {
                context: format!("{method} {path}"),
                source,
            })
    }

    /// Sends a request and reads the whole answer (at most [`MAX_ANSWER`]
    /// bytes), within `timeout`.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        headers: HeaderMap,
        body: ReqBody,
        timeout: Option<Duration>,
    ) -> Result<(StatusCode, RawAnswer)> {
        self.raw_capped(method, path, headers, body, timeout, MAX_ANSWER)
            .await
    }

    /// Like [`Transport::raw`], reading at most `max` bytes of answer: a
    /// longer one is abandoned (the connection dropped, so incusd stops
    /// sending) and the result is [`Error::TooLarge`].
    pub async fn raw_capped(
        &self,
        method: Method,
        path: &str,
        headers: HeaderMap,
        body: ReqBody,
        timeout: Option<Duration>,
        max: usize,
    ) -> Result<(StatusCode, RawAnswer)> {
        let timeout = timeout.unwrap_or(self.request_timeout);
        let too_large = || Error::TooLarge {
            what: format!("the answer to {method} {path}"),
            limit: max as u64,
        };
        let fut = async {
            let resp = self.send(method.clone(), path, headers, body).await?;
            let status = resp.status();
            let headers = resp.headers().clone();
            let announced = headers
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            if announced.is_some_and(|n| n > max as u64) {
                return Err(too_large());
            }
            let body = match Limited::new(resp.into_body(), max).collect().await {
                Ok(c) => c.to_bytes(),
                Err(e) => {
                    if e.is::<LengthLimitError>() {
                        return Err(too_large());
                    }
                    return match e.downcast::<hyper::Error>() {
                        Ok(source) => Err(Error::Transport {
                            context: format!("reading answer to {method} {path}"),
                            source: *source,
                        }),
                        Err(e) => Err(Error::protocol(
                            format!("reading answer to {method} {path}"),
                            e.to_string(),
                        )),
                    };
                }
            };
            Ok::<_, Error>((status, RawAnswer { headers, body }))
        };
        match tokio::time::timeout(timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(Error::Timeout {
                what: format!("Incus to answer {method} {path}"),
                after: timeout,
            }),
        }
    }

    /// Sends a request with an optional JSON body and decodes the envelope.
    pub async fn json<B: Serialize + ?Sized>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<Answer> {
        self.json_with_timeout(method, path, body, None).await
    }

    /// Like [`Transport::json`] with an explicit answer timeout.
    pub async fn json_with_timeout<B: Serialize + ?Sized>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        timeout: Option<Duration>,
    ) -> Result<Answer> {
        let mut headers = HeaderMap::new();
        let body = match body {
            Some(b) => {
                headers.insert(
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                let data = serde_json::to_vec(b).map_err(|e| {
                    Error::InvalidArgument(format!("cannot encode body of {path}: {e}"))
                })?;
                bytes_body(data)
            }
            None => empty_body(),
        };
        let (status, raw) = self
            .raw(method.clone(), path, headers, body, timeout)
            .await?;
        decode_envelope(&method, path, status, &raw.body)
    }

    /// Opens a websocket on `path` (which includes its query string) that
    /// takes messages of at most `max_message` bytes (a longer one ends the
    /// socket with an error).
    pub async fn websocket(&self, path: &str, max_message: usize) -> Result<Ws> {
        let stream = self.connect().await?;
        let url = format!("ws://incus{path}");
        let req = url
            .as_str()
            .into_client_request()
            .map_err(|e| Error::websocket(format!("building request for {path}"), e))?;
        let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .max_message_size(Some(max_message))
            .max_frame_size(Some(max_message));
        let fut = tokio_tungstenite::client_async_with_config(req, stream, Some(config));
        match tokio::time::timeout(self.request_timeout, fut).await {
            Ok(Ok((ws, _resp))) => Ok(ws),
            Ok(Err(tokio_tungstenite::tungstenite::Error::Http(resp))) => {
                let status = resp.status().as_u16();
                let msg = resp
                    .body()
                    .as_ref()
                    .and_then(|b| serde_json::from_slice::<Envelope>(b).ok())
                    .map(|e| e.error)
                    .unwrap_or_else(|| resp.status().to_string());
                Err(Error::from_api(status, "GET", path, msg))
            }
            Ok(Err(e)) => Err(Error::websocket(format!("opening {path}"), e)),
            Err(_) => Err(Error::Timeout {
                what: format!("websocket {path}"),
                after: self.request_timeout,
            }),
        }
    }
}

/// Decodes an Incus envelope, turning `error` answers into typed errors.
pub(crate) fn decode_envelope(
    method: &Method,
    path: &str,
    status: StatusCode,
    body: &[u8],
) -> Result<Answer> {
    let env: Envelope = match serde_json::from_slice(body) {
        Ok(e) => e,
        Err(e) => {
            if !status.is_success() {
                return Err(Error::from_api(
                    status.as_u16(),
                    method.as_str(),
                    path,
                    String::from_utf8_lossy(body).trim().to_string(),
                ));
            }
            return Err(Error::protocol(
                format!("{method} {path}"),
                format!("answer is not an Incus envelope: {e}"),
            ));
        }
    };
    match env.kind.as_str() {
        "sync" if status.is_success() => Ok(Answer::Sync(env.metadata)),
        "async" if status.is_success() => {
            let op: OperationInfo = serde_json::from_value(env.metadata).map_err(|e| {
                Error::protocol(format!("{method} {path}"), format!("bad operation: {e}"))
            })?;
            Ok(Answer::Async(op))
        }
        _ => {
            let code = if env.error_code != 0 {
                env.error_code
            } else {
                status.as_u16()
            };
            let message = if env.error.is_empty() {
                status.to_string()
            } else {
                env.error
            };
            Err(Error::from_api(code, method.as_str(), path, message))
        }
    }
}

/// Parses the error envelope of a non-JSON endpoint's failure.
pub(crate) fn raw_error(method: &Method, path: &str, status: StatusCode, body: &[u8]) -> Error {
    match decode_envelope(method, path, status, body) {
        Err(e) => e,
        Ok(_) => Error::from_api(status.as_u16(), method.as_str(), path, status.to_string()),
    }
}

/// Percent-encodes one path segment or query value (RFC 3986 unreserved
/// characters are kept).
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Decodes `%XX` escapes; invalid escapes are kept as they are.
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            if let Some(v) = hex {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn percent_round_trip() {
        let s = "test/debian-ssh a+b%";
        let e = percent_encode(s);
        assert_eq!(e, "test%2Fdebian-ssh%20a%2Bb%25");
        assert_eq!(percent_decode(&e), s);
        assert_eq!(percent_decode("bad%zz%4"), "bad%zz%4");
    }

    #[test]
    fn envelope_errors_are_typed() {
        let body = br#"{"type":"error","status":"","status_code":0,"operation":"","error_code":404,"error":"Instance not found","metadata":null}"#;
        let err = decode_envelope(
            &Method::GET,
            "/1.0/instances/x",
            StatusCode::NOT_FOUND,
            body,
        )
        .unwrap_err();
        assert!(err.is_not_found(), "{err}");
        assert!(err.to_string().contains("Instance not found"));
    }
}
