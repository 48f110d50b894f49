//! Errors of the Incus client.
//!
//! Owns the [`Error`] type and the classification of what Incus said (status
//! code and error string) into the cases a caller acts on: not found,
//! conflict, Incus not running, timeout. It does not log anything; callers
//! decide what to show.

use std::path::PathBuf;
use std::time::Duration;

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong talking to Incus.
///
/// Variants carry what Incus said (its status code and error string) so that
/// a message shown to a person names the real cause.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The unix socket is missing or refuses connections: incusd is not
    /// running (or not where we looked).
    #[error("Incus is not running: cannot connect to {}: {source}", path.display())]
    NotRunning {
        /// Socket path that was tried.
        path: PathBuf,
        /// Underlying connect error.
        #[source]
        source: std::io::Error,
    },

    /// No socket was found at any of the standard locations.
    #[error("Incus is not running: no socket at {}", display_paths(tried))]
    NoSocket {
        /// Paths that were tried, in order.
        tried: Vec<PathBuf>,
    },

    /// The object does not exist (HTTP 404, or an operation that failed
    /// because something it needed does not exist).
    #[error("{what} not found: {message}")]
    NotFound {
        /// What was looked up, e.g. `instance "web"` or `image alias "x"`.
        what: String,
        /// What Incus said.
        message: String,
    },

    /// The object already exists (HTTP 409, or a create that hit an existing
    /// name).
    #[error("{what} already exists: {message}")]
    Conflict {
        /// What was being created.
        what: String,
        /// What Incus said.
        message: String,
    },

    /// Any other error answer of the API.
    #[error("Incus answered {status} to {method} {path}: {message}")]
    Api {
        /// HTTP status code (Incus' `error_code`).
        status: u16,
        /// Request method.
        method: String,
        /// Request path.
        path: String,
        /// What Incus said.
        message: String,
    },

    /// A background operation ended in failure or was cancelled.
    #[error("Incus operation \"{description}\" ({id}) failed: {message}")]
    OperationFailed {
        /// Operation id.
        id: String,
        /// Operation description, e.g. `Creating instance`.
        description: String,
        /// Operation status (`Failure`, `Cancelled`).
        status: String,
        /// The operation's `err` field.
        message: String,
    },

    /// A command run with [`crate::Client::exec_ok`] exited non-zero.
    #[error(
        "command {} in instance \"{instance}\" failed with exit code {exit_code}: {stderr}",
        command_line(.command)
    )]
    CommandFailed {
        /// Instance name.
        instance: String,
        /// The command.
        command: Vec<String>,
        /// Its exit code.
        exit_code: i32,
        /// Its stderr (trimmed, lossy UTF-8).
        stderr: String,
    },

    /// The instance is not running (stopped, frozen, error) when the call
    /// needs it running.
    #[error("instance \"{name}\" is not running (status {status})")]
    InstanceNotRunning {
        /// Instance name.
        name: String,
        /// Its status, e.g. `Stopped`.
        status: String,
    },

    /// Something did not finish in the time allowed.
    #[error("timed out after {} waiting for {what}", duration_text(*.after))]
    Timeout {
        /// What we were waiting for.
        what: String,
        /// The bound that was exceeded.
        after: Duration,
    },

    /// The connection to incusd broke (HTTP level).
    #[error("connection to Incus failed during {context}: {source}")]
    Transport {
        /// What we were doing.
        context: String,
        /// Underlying hyper error.
        #[source]
        source: hyper::Error,
    },

    /// A websocket to incusd failed.
    #[error("websocket to Incus failed during {context}: {source}")]
    WebSocket {
        /// What we were doing.
        context: String,
        /// Underlying websocket error.
        #[source]
        source: Box<tokio_tungstenite::tungstenite::Error>,
    },

    /// Incus answered something this client does not understand.
    #[error("unexpected answer from Incus to {context}: {detail}")]
    Protocol {
        /// What we were doing.
        context: String,
        /// What was wrong.
        detail: String,
    },

    /// Local I/O (reading a file to upload, a socket) failed.
    #[error("I/O error during {context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },

    /// The caller passed something unusable (e.g. a relative path).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// Data coming from inside an instance (a command's output, a file) or
    /// an answer of incusd went over the size cap set for it; the command
    /// was killed, the read abandoned. Nothing beyond the cap was kept.
    #[error("{what} is larger than the {limit}-byte cap; refused")]
    TooLarge {
        /// What was being read, e.g. `standard output of "cat" in instance "web"`.
        what: String,
        /// The cap in bytes.
        limit: u64,
    },
}

impl Error {
    /// True when the object does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::NotFound { .. })
    }

    /// True when the object already exists.
    pub fn is_conflict(&self) -> bool {
        matches!(self, Error::Conflict { .. })
    }

    /// True when incusd could not be reached at all.
    pub fn is_not_running(&self) -> bool {
        matches!(self, Error::NotRunning { .. } | Error::NoSocket { .. })
    }

    /// True when data from an instance went over its size cap.
    pub fn is_too_large(&self) -> bool {
        matches!(self, Error::TooLarge { .. })
    }

    /// True when a bound wait expired.
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Timeout { .. })
    }

    /// The HTTP status Incus answered, when the error is an API answer.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::NotFound { .. } => Some(404),
            Error::Conflict { .. } => Some(409),
            Error::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn protocol(context: impl Into<String>, detail: impl Into<String>) -> Self {
        Error::Protocol {
            context: context.into(),
            detail: detail.into(),
        }
    }

    pub(crate) fn websocket(
        context: impl Into<String>,
        source: tokio_tungstenite::tungstenite::Error,
    ) -> Self {
        Error::WebSocket {
            context: context.into(),
            source: Box::new(source),
        }
    }

    /// Classifies an error answer of the API.
    pub(crate) fn from_api(status: u16, method: &str, path: &str, message: String) -> Self {
        match status {
            404 => Error::NotFound {
                what: describe_path(path),
                message,
            },
            409 => Error::Conflict {
                what: describe_path(path),
                message,
            },
            _ => Error::Api {
                status,
                method: method.to_string(),
                path: path.to_string(),
                message,
            },
        }
    }

    /// Classifies a failed operation. Incus reports some conflicts only
    /// through the operation (e.g. a racing create of the same name), and
    /// some missing objects the same way (e.g. an unknown remote image).
    pub(crate) fn from_operation(
        id: &str,
        description: &str,
        status: &str,
        message: String,
        what: Option<&str>,
    ) -> Self {
        let lower = message.to_ascii_lowercase();
        if lower.contains("unique constraint failed") || lower.contains("already exists") {
            return Error::Conflict {
                what: what.unwrap_or(description).to_string(),
                message,
            };
        }
        if lower.contains("not found") {
            return Error::NotFound {
                what: what.unwrap_or(description).to_string(),
                message,
            };
        }
        Error::OperationFailed {
            id: id.to_string(),
            description: description.to_string(),
            status: status.to_string(),
            message,
        }
    }
}

/// A command as a person would type it: its words joined by spaces, a word
/// quoted (single quotes) only when a shell would split or expand it.
fn command_line(words: &[String]) -> String {
    words
        .iter()
        .map(|w| shell_word(w))
        .collect::<Vec<_>>()
        .join(" ")
}

fn shell_word(w: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "@%+=:,./_-".contains(c);
    if !w.is_empty() && w.chars().all(plain) {
        w.to_string()
    } else {
        format!("'{}'", w.replace('\'', r"'\''"))
    }
}

/// A duration in words: `30s`, `1.5s` or `250ms`.
fn duration_text(d: Duration) -> String {
    if d.as_secs() == 0 {
        format!("{}ms", d.as_millis())
    } else if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

fn display_paths(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(" or ")
}

/// Turns an API path into words for error messages:
/// `/1.0/instances/web/state` → `instance "web"`.
fn describe_path(path: &str) -> String {
    let path = path.split('?').next().unwrap_or(path);
    let parts: Vec<&str> = path
        .trim_start_matches("/1.0/")
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    match parts.as_slice() {
        ["instances", name, "snapshots", snap, ..] => {
            format!("snapshot \"{}/{}\"", unescape(name), unescape(snap))
        }
        ["instances", name, ..] => format!("instance \"{}\"", unescape(name)),
        ["images", "aliases", rest @ ..] if !rest.is_empty() => {
            format!("image alias \"{}\"", unescape(&rest.join("/")))
        }
        ["images", fp, ..] => format!("image \"{}\"", unescape(fp)),
        ["operations", id, ..] => format!("operation \"{id}\""),
        ["networks", name, ..] => format!("network \"{}\"", unescape(name)),
        ["profiles", name, ..] => format!("profile \"{}\"", unescape(name)),
        _ => path.to_string(),
    }
}

fn unescape(s: &str) -> String {
    crate::transport::percent_decode(s)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn api_errors_are_classified_by_status() {
        let e = Error::from_api(
            404,
            "GET",
            "/1.0/instances/web",
            "Instance not found".into(),
        );
        assert!(e.is_not_found());
        assert_eq!(
            e.to_string(),
            "instance \"web\" not found: Instance not found"
        );
        let e = Error::from_api(409, "POST", "/1.0/images/aliases", "exists".into());
        assert!(e.is_conflict());
        let e = Error::from_api(400, "PUT", "/1.0/instances/web/state", "bad".into());
        assert_eq!(e.status(), Some(400));
        assert!(e.to_string().contains("bad"));
    }

    #[test]
    fn operation_errors_detect_conflicts_and_missing_objects() {
        let e = Error::from_operation(
            "id",
            "Creating instance",
            "Failure",
            "Failed creating instance record: UNIQUE constraint failed: instances.name".into(),
            Some("instance \"web\""),
        );
        assert!(e.is_conflict());
        let e = Error::from_operation(
            "id",
            "Creating instance",
            "Failure",
            "Failed getting remote image info: Image not found".into(),
            None,
        );
        assert!(e.is_not_found());
        let e = Error::from_operation("id", "Starting instance", "Failure", "boom".into(), None);
        assert!(matches!(e, Error::OperationFailed { .. }));
    }

    #[test]
    fn commands_and_durations_read_as_text() {
        let words = |w: &[&str]| w.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let e = Error::CommandFailed {
            instance: "web".into(),
            command: words(&["sh", "-c", "test -d /root && echo 'ok'", "", "a=b/c.d"]),
            exit_code: 2,
            stderr: "no".into(),
        };
        assert_eq!(
            e.to_string(),
            r#"command sh -c 'test -d /root && echo '\''ok'\''' '' a=b/c.d in instance "web" failed with exit code 2: no"#
        );
        let timeout = |after| {
            Error::Timeout {
                what: "operation \"Starting instance\" (1)".into(),
                after,
            }
            .to_string()
        };
        assert_eq!(
            timeout(Duration::from_secs(30)),
            "timed out after 30s waiting for operation \"Starting instance\" (1)"
        );
        assert!(timeout(Duration::from_millis(1500)).starts_with("timed out after 1.5s "));
        assert!(timeout(Duration::from_millis(250)).starts_with("timed out after 250ms "));
        let e = Error::from_operation("id", "Starting instance", "Failure", "boom".into(), None);
        assert_eq!(
            e.to_string(),
            "Incus operation \"Starting instance\" (id) failed: boom"
        );
    }

    #[test]
    fn describe_path_names_objects() {
        assert_eq!(
            describe_path("/1.0/instances/a/snapshots/s1?x=1"),
            "snapshot \"a/s1\""
        );
        assert_eq!(
            describe_path("/1.0/images/aliases/test%2Fdebian"),
            "image alias \"test/debian\""
        );
    }
}
