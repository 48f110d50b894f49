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
    /// The storage engine failed (I/O, disk full, ...).
    #[error("storage error: {0}")]
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
        Error::Storage(e.to_string())
    }
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;
