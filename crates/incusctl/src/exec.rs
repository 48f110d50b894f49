//! Running commands inside instances (`POST /1.0/instances/{name}/exec`).
//!
//! Every command runs in websocket mode (`wait-for-websocket`): stdout and
//! stderr arrive as they are written, stdin can be fed from memory or any
//! `AsyncRead`, and a timeout kills the command through the control
//! websocket. Incus' `record-output` mode is never used: it writes a
//! command's whole output to log files on the host before anyone can look
//! at it, so a container could fill the host's disk.
//! - [`Client::exec`] / [`Client::exec_ok`] / [`Client::exec_with_stdin`]
//!   collect the output in memory, at most [`ExecRequest::max_output`]
//!   bytes per stream ([`DEFAULT_MAX_OUTPUT`] unless set): past that the
//!   command is killed (SIGKILL), the rest of its output is discarded
//!   unread, and the result is [`Error::TooLarge`].
//! - [`Client::exec_stream`] hands the output over piece by piece through a
//!   bounded queue (the command is paused, by flow control, while the
//!   reader does not read); the reader decides how much it keeps.
//!
//! Output from inside an instance is tenant data: a command's output is
//! whatever the instance's programs write, so nothing here trusts its size.
//!
//! Wire format of the exec websockets (non-interactive): one websocket per
//! fd plus `control`; data travels as binary messages, an empty text message
//! is the end-of-stream barrier in either direction.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::Method;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

use crate::client::{instance_path, instance_what, Client};
use crate::error::{Error, Result};
use crate::operation::OperationInfo;
use crate::transport::{percent_encode, Ws, MAX_EXEC_MESSAGE};

/// A command to run in an instance.
///
/// Incus publishes the command line (not the environment) in its
/// `instance-exec` lifecycle event and logs: pass secrets through stdin or
/// the files API, never as arguments. `Debug` shows environment keys only.
#[derive(Clone, Default)]
pub struct ExecRequest {
    /// Program and arguments (no shell unless you run one).
    pub command: Vec<String>,
    /// Extra environment variables (Incus sets `PATH`, `HOME`, `LANG`...).
    pub env: BTreeMap<String, String>,
    /// Working directory.
    pub cwd: Option<String>,
    /// User id to run as (default root).
    pub user: Option<u32>,
    /// Group id to run as (default root).
    pub group: Option<u32>,
    /// Bound on the command's run time; `None` uses the client's operation
    /// timeout.
    pub timeout: Option<Duration>,
    /// Cap on each collected output stream in bytes; `None` uses
    /// [`DEFAULT_MAX_OUTPUT`].
    pub max_output: Option<usize>,
}

/// Default cap on each of stdout and stderr collected by [`Client::exec`]:
/// 8 MiB.
pub const DEFAULT_MAX_OUTPUT: usize = 8 << 20;

impl std::fmt::Debug for ExecRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecRequest")
            .field("command", &self.command)
            .field("env_keys", &self.env.keys().collect::<Vec<_>>())
            .field("cwd", &self.cwd)
            .field("user", &self.user)
            .field("group", &self.group)
            .field("timeout", &self.timeout)
            .field("max_output", &self.max_output)
            .finish()
    }
}

impl ExecRequest {
    /// A command from its program and arguments.
    pub fn new<I, S>(command: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ExecRequest {
            command: command.into_iter().map(Into::into).collect(),
            ..ExecRequest::default()
        }
    }

    /// `sh -c SCRIPT`.
    pub fn shell(script: impl Into<String>) -> Self {
        ExecRequest::new(["sh".to_string(), "-c".to_string(), script.into()])
    }

    /// Adds an environment variable.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.insert(key.into(), value.into());
        self
    }

    /// Sets the working directory.
    pub fn cwd(mut self, cwd: impl Into<String>) -> Self {
        self.cwd = Some(cwd.into());
        self
    }

    /// Runs as this uid/gid.
    pub fn as_user(mut self, uid: u32, gid: u32) -> Self {
        self.user = Some(uid);
        self.group = Some(gid);
        self
    }

    /// Bounds the run time.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Caps each collected output stream at `bytes`.
    pub fn max_output(mut self, bytes: usize) -> Self {
        self.max_output = Some(bytes);
        self
    }

    fn output_cap(&self) -> usize {
        self.max_output.unwrap_or(DEFAULT_MAX_OUTPUT)
    }

    fn to_json(&self) -> serde_json::Value {
        let mut v = json!({
            "command": self.command,
            "environment": self.env,
            "interactive": false,
            "wait-for-websocket": true,
            "record-output": false,
        });
        if let Some(obj) = v.as_object_mut() {
            if let Some(cwd) = &self.cwd {
                obj.insert("cwd".into(), json!(cwd));
            }
            if let Some(u) = self.user {
                obj.insert("user".into(), json!(u));
            }
            if let Some(g) = self.group {
                obj.insert("group".into(), json!(g));
            }
        }
        v
    }
}

/// What a finished command left behind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecOutput {
    /// Exit code (128+N when killed by signal N, as in a shell).
    pub exit_code: i32,
    /// Everything written to stdout.
    pub stdout: Vec<u8>,
    /// Everything written to stderr.
    pub stderr: Vec<u8>,
}

impl ExecOutput {
    /// True when the exit code is 0.
    pub fn success(&self) -> bool {
        self.exit_code == 0
    }

    /// stdout as text (lossy).
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// stderr as text (lossy).
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// Standard input of a streamed command.
pub enum ExecStdin {
    /// No input (the command reads EOF at once).
    Null,
    /// These bytes, then EOF.
    Data(Bytes),
    /// Everything this reader yields, then EOF.
    Reader(Box<dyn AsyncRead + Send + Unpin>),
}

impl std::fmt::Debug for ExecStdin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExecStdin::Null => f.write_str("Null"),
            ExecStdin::Data(d) => write!(f, "Data({} bytes)", d.len()),
            ExecStdin::Reader(_) => f.write_str("Reader(..)"),
        }
    }
}

/// A piece of output of a streamed command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputChunk {
    /// Bytes written to stdout.
    Stdout(Bytes),
    /// Bytes written to stderr.
    Stderr(Bytes),
}

/// A running streamed command: read its output as it comes, then wait for
/// its exit code.
#[derive(Debug)]
pub struct ExecProcess {
    output: mpsc::Receiver<OutputChunk>,
    task: JoinHandle<Result<i32>>,
    kill: Option<oneshot::Sender<()>>,
    /// `"PROGRAM" in instance "NAME"`, for errors.
    what: String,
}

impl ExecProcess {
    /// The next piece of output, or `None` once both streams ended.
    pub async fn next_output(&mut self) -> Option<OutputChunk> {
        self.output.recv().await
    }

    /// Discards remaining output and returns the exit code.
    pub async fn wait(mut self) -> Result<i32> {
        while self.output.recv().await.is_some() {}
        join(self.task).await
    }

    /// Kills the command (SIGKILL through the control websocket), discards
    /// its remaining output and returns once the command is gone.
    pub async fn kill(mut self) -> Result<i32> {
        if let Some(k) = self.kill.take() {
            let _ = k.send(());
        }
        // Dropping the queue makes the readers discard the rest unread.
        drop(self.output);
        join(self.task).await
    }

    /// Collects all remaining output and the exit code, at most
    /// [`DEFAULT_MAX_OUTPUT`] bytes per stream.
    pub async fn collect(self) -> Result<ExecOutput> {
        self.collect_capped(DEFAULT_MAX_OUTPUT).await
    }

    /// Collects all remaining output and the exit code, at most `max` bytes
    /// per stream: past that the command is killed and the result is
    /// [`Error::TooLarge`].
    pub async fn collect_capped(mut self, max: usize) -> Result<ExecOutput> {
        let mut out = ExecOutput::default();
        while let Some(chunk) = self.output.recv().await {
            let (buf, bytes, stream) = match chunk {
                OutputChunk::Stdout(b) => (&mut out.stdout, b, "standard output"),
                OutputChunk::Stderr(b) => (&mut out.stderr, b, "standard error"),
            };
            if buf.len().saturating_add(bytes.len()) > max {
                let what = format!("the {stream} of {}", self.what);
                if let Err(e) = self.kill().await {
                    tracing::debug!(error = %e, "exec killed for its output size");
                }
                return Err(Error::TooLarge {
                    what,
                    limit: max as u64,
                });
            }
            buf.extend_from_slice(&bytes);
        }
        out.exit_code = join(self.task).await?;
        Ok(out)
    }
}

async fn join(task: JoinHandle<Result<i32>>) -> Result<i32> {
    task.await
        .map_err(|e| Error::protocol("exec", format!("exec task ended abnormally: {e}")))?
}

impl Client {
    /// Runs a command and returns its exit code and output (at most
    /// [`ExecRequest::max_output`] bytes per stream, else
    /// [`Error::TooLarge`] with the command killed). A stopped or frozen
    /// instance gives [`Error::InstanceNotRunning`]; a program that does not
    /// exist gives exit code [`EXIT_COMMAND_NOT_FOUND`] with Incus' message
    /// on stderr. The command gets no stdin. When the timeout expires the
    /// command is killed and the result is [`Error::Timeout`].
    pub async fn exec(&self, name: &str, req: &ExecRequest) -> Result<ExecOutput> {
        self.exec_with_stdin(name, req, ExecStdin::Null).await
    }

    /// Like [`Client::exec`], but fails with [`Error::CommandFailed`] (carrying
    /// stderr) when the exit code is not 0.
    pub async fn exec_ok(&self, name: &str, req: &ExecRequest) -> Result<ExecOutput> {
        let out = self.exec(name, req).await?;
        if out.success() {
            return Ok(out);
        }
        Err(Error::CommandFailed {
            instance: name.to_string(),
            command: req.command.clone(),
            exit_code: out.exit_code,
            stderr: out.stderr_text().trim().to_string(),
        })
    }

    /// Starts a command in websocket mode and returns at once; output
    /// streams through [`ExecProcess::next_output`]. When the timeout
    /// expires the command is killed (SIGKILL) and the result is
    /// [`Error::Timeout`].
    pub async fn exec_stream(
        &self,
        name: &str,
        req: &ExecRequest,
        stdin: ExecStdin,
    ) -> Result<ExecProcess> {
        let path = format!("{}/exec", instance_path(name));
        let op = self
            .transport()
            .json(Method::POST, &path, Some(&req.to_json()))
            .await
            .map_err(|e| not_running(name, e))?
            .into_operation(&path)?;
        let secret = |fd: &str| -> Result<String> {
            op.metadata
                .as_ref()
                .and_then(|m| m.get("fds"))
                .and_then(|f| f.get(fd))
                .and_then(|s| s.as_str())
                .map(str::to_string)
                .ok_or_else(|| Error::protocol(&path, format!("no websocket secret for fd {fd}")))
        };
        let ws_path = |s: String| {
            format!(
                "/1.0/operations/{}/websocket?secret={}",
                percent_encode(&op.id),
                percent_encode(&s)
            )
        };
        // Control first, so Incus never sees a closed data socket without
        // a control connection (which would make it kill the command).
        let ws = |fd: &str| -> Result<_> {
            let path = ws_path(secret(fd)?);
            Ok(async move { self.transport().websocket(&path, MAX_EXEC_MESSAGE).await })
        };
        let control = ws("control")?.await?;
        let ws_in = ws("0")?.await?;
        let ws_out = ws("1")?.await?;
        let ws_err = ws("2")?.await?;

        let (tx, rx) = mpsc::channel(64);
        let (kill, killed) = oneshot::channel();
        let client = self.clone();
        let timeout = req.timeout.unwrap_or(self.op_timeout());
        let what = instance_what(name);
        let task = tokio::spawn(async move {
            run_stream(
                client,
                op,
                what,
                timeout,
                control,
                [ws_in, ws_out, ws_err],
                stdin,
                tx,
                killed,
            )
            .await
        });
        Ok(ExecProcess {
            output: rx,
            task,
            kill: Some(kill),
            what: format!(
                "\"{}\" in instance \"{name}\"",
                req.command.first().map(String::as_str).unwrap_or("")
            ),
        })
    }

    /// Runs a command with `stdin` and collects its output, like
    /// [`Client::exec`].
    pub async fn exec_with_stdin(
        &self,
        name: &str,
        req: &ExecRequest,
        stdin: ExecStdin,
    ) -> Result<ExecOutput> {
        // In-memory stdin can be sent again if Incus fails to start the
        // command (see `is_transient`); a reader cannot.
        let replay = match &stdin {
            ExecStdin::Null => Some(Bytes::new()),
            ExecStdin::Data(d) => Some(d.clone()),
            ExecStdin::Reader(_) => None,
        };
        let mut stdin = Some(stdin);
        let mut attempt = 0;
        loop {
            let input = match (stdin.take(), &replay) {
                (Some(s), _) => s,
                (None, Some(d)) if d.is_empty() => ExecStdin::Null,
                (None, Some(d)) => ExecStdin::Data(d.clone()),
                (None, None) => ExecStdin::Null,
            };
            let result = self
                .exec_stream(name, req, input)
                .await?
                .collect_capped(req.output_cap())
                .await;
            match result {
                Err(e) if is_transient(&e) && replay.is_some() && attempt < TRANSIENT_RETRIES => {
                    attempt += 1;
                    tracing::debug!(instance = name, attempt, "retrying exec after: {e}");
                    tokio::time::sleep(retry_delay(attempt)).await;
                }
                r => return r,
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn run_stream(
    client: Client,
    op: OperationInfo,
    what: String,
    timeout: Duration,
    mut control: Ws,
    [ws_in, ws_out, ws_err]: [Ws; 3],
    stdin: ExecStdin,
    tx: mpsc::Sender<OutputChunk>,
    mut killed: oneshot::Receiver<()>,
) -> Result<i32> {
    let feeder = tokio::spawn(feed_stdin(ws_in, stdin));
    let out = tokio::spawn(pump_output(ws_out, tx.clone(), OutputChunk::Stdout));
    let note = tx.clone();
    let err = tokio::spawn(pump_output(ws_err, tx, OutputChunk::Stderr));

    let waited = tokio::select! {
        r = client.wait_operation(&op.id, timeout) => Some(r),
        Ok(()) = &mut killed => None,
    };
    let Some(waited) = waited else {
        // The reader wants no more: kill the command, and drop the output
        // sockets at once so that whatever else writes to them (children)
        // gets EPIPE instead of being read.
        let kill = json!({"command": "signal", "signal": 9}).to_string();
        if let Err(e) = control.send(Message::text(kill)).await {
            tracing::debug!(error = %e, "could not send kill through exec control");
        }
        out.abort();
        err.abort();
        feeder.abort();
        let done = client.wait_operation(&op.id, Duration::from_secs(10)).await;
        let _ = control.close(None).await;
        return done.and_then(|d| exit_code(&d)).or(Ok(137));
    };
    let result = match waited {
        Ok(done) if is_command_not_found(&done) => {
            let msg = Bytes::from(format!("{}\n", done.err));
            let _ = note.send(OutputChunk::Stderr(msg)).await;
            Ok(EXIT_COMMAND_NOT_FOUND)
        }
        Ok(done) => done.into_result(Some(&what)).and_then(|d| exit_code(&d)),
        Err(e) if e.is_timeout() => {
            let kill = json!({"command": "signal", "signal": 9}).to_string();
            if let Err(e) = control.send(Message::text(kill)).await {
                tracing::debug!(error = %e, "could not send kill through exec control");
            }
            // Give Incus a moment to reap the process.
            let _ = client.wait_operation(&op.id, Duration::from_secs(10)).await;
            Err(e)
        }
        Err(e) => Err(e),
    };
    // Output ends with Incus' barrier once the process is gone; bound the
    // wait so a broken server (or a child left writing) cannot hang us, and
    // stop reading then.
    for h in [out, err] {
        let stop = h.abort_handle();
        if tokio::time::timeout(Duration::from_secs(10), h)
            .await
            .is_err()
        {
            stop.abort();
            tracing::debug!("exec output stream did not end after the command");
        }
    }
    feeder.abort();
    let _ = control.close(None).await;
    result
}

async fn feed_stdin(mut ws: Ws, stdin: ExecStdin) {
    let result: std::result::Result<(), tokio_tungstenite::tungstenite::Error> = async {
        match stdin {
            ExecStdin::Null => {}
            ExecStdin::Data(data) => {
                for chunk in data.chunks(64 * 1024) {
                    ws.send(Message::binary(Bytes::copy_from_slice(chunk)))
                        .await?;
                }
            }
            ExecStdin::Reader(mut r) => {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = match r.read(&mut buf).await {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(e) => {
                            tracing::debug!(error = %e, "exec stdin reader failed; sending EOF");
                            break;
                        }
                    };
                    ws.send(Message::binary(Bytes::copy_from_slice(&buf[..n])))
                        .await?;
                }
            }
        }
        // Barrier: end of stdin.
        ws.send(Message::text("")).await?;
        Ok(())
    }
    .await;
    if let Err(e) = result {
        tracing::debug!(error = %e, "exec stdin websocket failed");
    }
    // Keep the socket open until Incus closes it (the command may still be
    // running); read and ignore whatever comes.
    while let Some(Ok(_)) = ws.next().await {}
}

async fn pump_output(mut ws: Ws, tx: mpsc::Sender<OutputChunk>, wrap: fn(Bytes) -> OutputChunk) {
    let mut receiver_gone = false;
    while let Some(msg) = ws.next().await {
        match msg {
            Ok(Message::Binary(b)) => {
                if !receiver_gone && !b.is_empty() && tx.send(wrap(b)).await.is_err() {
                    receiver_gone = true;
                }
            }
            // Empty text message: Incus' end-of-stream barrier.
            Ok(Message::Text(_)) | Ok(Message::Close(_)) => break,
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(error = %e, "exec output websocket failed");
                break;
            }
        }
    }
}

/// How often an exec that Incus failed to start is tried again.
const TRANSIENT_RETRIES: u32 = 3;

fn retry_delay(attempt: u32) -> Duration {
    Duration::from_millis(100 * u64::from(attempt))
}

/// Incus sometimes fails to attach to a freshly forked command ("Failed to
/// retrieve PID of executing child process", a known race under load); the
/// command did not run, so the exec can be tried again.
fn is_transient(e: &Error) -> bool {
    match e {
        Error::OperationFailed { message, .. } | Error::Api { message, .. } => {
            message.contains("Failed to retrieve PID of executing child process")
        }
        _ => false,
    }
}

/// Exit code reported when the program does not exist in the instance (as
/// a shell would); Incus itself fails the operation with "Command not found".
pub const EXIT_COMMAND_NOT_FOUND: i32 = 127;

fn is_command_not_found(op: &OperationInfo) -> bool {
    !op.is_success() && op.err.to_ascii_lowercase().contains("command not found")
}

/// Incus refuses exec on a stopped or frozen instance with a plain 400;
/// give callers the typed error.
fn not_running(name: &str, e: Error) -> Error {
    match &e {
        Error::Api {
            status: 400,
            message,
            ..
        } => {
            let m = message.to_ascii_lowercase();
            let status = if m.contains("frozen") {
                "Frozen"
            } else if m.contains("not running") {
                "Stopped"
            } else {
                return e;
            };
            Error::InstanceNotRunning {
                name: name.to_string(),
                status: status.to_string(),
            }
        }
        _ => e,
    }
}

fn exit_code(op: &OperationInfo) -> Result<i32> {
    op.metadata
        .as_ref()
        .and_then(|m| m.get("return"))
        .and_then(serde_json::Value::as_i64)
        .and_then(|c| i32::try_from(c).ok())
        .ok_or_else(|| Error::protocol("exec", "operation has no exit code"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn only_the_attach_race_is_retried() {
        let race = Error::OperationFailed {
            id: "x".into(),
            description: "Executing command".into(),
            status: "Failure".into(),
            message: "Failed to retrieve PID of executing child process".into(),
        };
        assert!(is_transient(&race));
        let other = Error::OperationFailed {
            id: "x".into(),
            description: "Executing command".into(),
            status: "Failure".into(),
            message: "boom".into(),
        };
        assert!(!is_transient(&other));
        assert!(retry_delay(2) > retry_delay(1));
    }

    #[test]
    fn debug_hides_environment_values() {
        let req = ExecRequest::new(["true"]).env("API_KEY", "s3cret");
        let dbg = format!("{req:?}");
        assert!(dbg.contains("API_KEY"));
        assert!(!dbg.contains("s3cret"));
    }

    #[test]
    fn exec_request_json() {
        let v = ExecRequest::new(["id"]).cwd("/tmp").as_user(5, 6).to_json();
        assert_eq!(v["wait-for-websocket"], true);
        assert_eq!(v["record-output"], false);
        assert_eq!(v["interactive"], false);
        assert_eq!(
            (v["user"].as_u64(), v["group"].as_u64()),
            (Some(5), Some(6))
        );
        assert_eq!(v["cwd"], "/tmp");
    }
}
