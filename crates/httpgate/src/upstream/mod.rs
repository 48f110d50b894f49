//! The paths to upstreams.

pub(crate) mod conn;
pub(crate) mod exchange;
