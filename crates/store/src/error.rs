//! The store's error type: one variant per thing a caller may act on.

/// Errors returned by [`crate::Store`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A field failed validation; the message says which and why.
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    /// A sandbox with this name exists already.
    #[error("a sandbox named {0} exists already")]
    NameTaken(String),
    /// A host name is in use by another sandbox (as its domain or agent host).
    #[error("host {host} is already used by sandbox {owner}")]
    HostTaken { host: String, owner: String },
    /// An address is assigned to another sandbox.
    #[error("address {address} is already assigned to sandbox {owner}")]
    AddressTaken { address: String, owner: String },
    /// Every address of the pool is taken.
    #[error("no free address left in {0}")]
    NoFreeAddress(String),
    /// No sandbox has this name.
    #[error("no sandbox named {0}")]
    NotFound(String),
    /// A restore was asked for on a store that holds data.
    #[error(
        "the store is not empty ({0} sandboxes); restore replaces everything only when asked to"
    )]
    NotEmpty(usize),
    /// The backup document is not one this version can read.
    #[error("backup rejected: {0}")]
    BadBackup(String),
    /// The state directory is locked by another process.
    #[error("state directory {0} is in use by another sandboxd")]
    Locked(String),
    /// The database was written by a newer schema than this binary knows.
    #[error(
        "state was written by a newer sandboxd (schema {found}, this one knows up to {known})"
    )]
    SchemaTooNew { found: u32, known: u32 },
    /// A stored record could not be decoded.
    #[error("corrupt record {key}: {reason}")]
    Corrupt { key: String, reason: String },
    /// The storage engine failed (I/O, disk full, ...); the message is a
    /// sentence for the operator (see [`io_sentence`]).
    #[error("{0}")]
    Storage(String),
}

impl Error {
    /// A stable machine-readable code, used by the admin API.
    pub fn code(&self) -> &'static str {
        match self {
            Error::Invalid { .. } => "invalid_argument",
            Error::NameTaken(_) => "name_taken",
            Error::HostTaken { .. } => "host_taken",
            Error::AddressTaken { .. } => "address_taken",
            Error::NoFreeAddress(_) => "no_free_address",
            Error::NotFound(_) => "not_found",
            Error::NotEmpty(_) => "not_empty",
            Error::BadBackup(_) => "bad_backup",
            Error::Locked(_) => "locked",
            Error::SchemaTooNew { .. } => "schema_too_new",
            Error::Corrupt { .. } => "corrupt",
            Error::Storage(_) => "storage",
        }
    }
}

impl From<sled::Error> for Error {
    fn from(e: sled::Error) -> Self {
        Error::Storage(sled_sentence(&e))
    }
}

/// What a failure of the storage engine means for the operator, in words
/// (sled's own `Display` of an I/O error carries Rust's `Debug` text).
pub(crate) fn sled_sentence(e: &sled::Error) -> String {
    match e {
        sled::Error::Io(io) => io_sentence(io),
        sled::Error::Corruption { .. } => {
            "the database in the state directory is corrupt (restore a backup)".to_string()
        }
        sled::Error::CollectionNotFound(name) => {
            format!("the database has no tree {}", String::from_utf8_lossy(name))
        }
        sled::Error::Unsupported(what) => format!("the database refused an operation: {what}"),
        sled::Error::ReportableBug(what) => format!("the database engine failed: {what}"),
    }
}

/// An I/O error on the state directory as a sentence: what it means, then
/// the operating system's words in parentheses, e.g. `the state
/// directory's disk is full (No space left on device)`.
pub(crate) fn io_sentence(e: &std::io::Error) -> String {
    use std::io::ErrorKind;
    let detail = os_words(e);
    match e.kind() {
        ErrorKind::StorageFull => format!("the state directory's disk is full ({detail})"),
        ErrorKind::QuotaExceeded => {
            format!("the state directory's disk quota is used up ({detail})")
        }
        ErrorKind::PermissionDenied | ErrorKind::ReadOnlyFilesystem => {
            format!("the state directory cannot be written ({detail})")
        }
        _ => format!("reading or writing the state directory failed ({detail})"),
    }
}

/// The operating system's message of an I/O error, without the `(os error
/// N)` suffix and without Rust's `Debug` text (sled copies an error by
/// putting its `Debug` text into a new one: `Os { code: 28, ... }`).
fn os_words(e: &std::io::Error) -> String {
    let text = e.to_string();
    let code = e.raw_os_error().or_else(|| {
        let rest = text.strip_prefix("Os { code: ")?;
        rest.split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    });
    if let Some(code) = code {
        let words = std::io::Error::from_raw_os_error(code).to_string();
        let suffix = format!(" (os error {code})");
        return words.strip_suffix(&suffix).unwrap_or(&words).to_string();
    }
    if text.starts_with("Os {") || text.starts_with("Custom {") || text.starts_with("Kind(") {
        return e.kind().to_string();
    }
    text
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    #[test]
    fn a_full_disk_is_a_sentence() {
        let want = "the state directory's disk is full (No space left on device)";
        let direct = Error::from(sled::Error::Io(io::Error::from_raw_os_error(28)));
        assert_eq!(direct.to_string(), want);
        // sled's copy of an error: its Debug text inside a new one.
        let copied = io::Error::new(
            io::ErrorKind::StorageFull,
            format!("{:?}", io::Error::from_raw_os_error(28)),
        );
        let copied = Error::from(sled::Error::Io(copied));
        assert_eq!(copied.to_string(), want);
        let kind_only = Error::from(sled::Error::Io(io::ErrorKind::StorageFull.into()));
        let text = kind_only.to_string();
        assert!(
            text.starts_with("the state directory's disk is full ("),
            "{text}"
        );
        assert!(!text.contains("Kind(") && !text.contains("Os {"), "{text}");
        assert_eq!(direct.code(), "storage");
    }

    #[test]
    fn other_io_errors_keep_the_system_words() {
        let e = Error::from(sled::Error::Io(io::Error::from_raw_os_error(13)));
        assert_eq!(
            e.to_string(),
            "the state directory cannot be written (Permission denied)"
        );
        let e = Error::from(sled::Error::Io(io::Error::other("checksum mismatch")));
        assert_eq!(
            e.to_string(),
            "reading or writing the state directory failed (checksum mismatch)"
        );
    }
}
