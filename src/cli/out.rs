//! Where the CLI's output goes. Every command writes its results to stdout
//! through [`fmt`] and [`bytes`] (the `outln!`/`out!` macros), which turn a
//! reader that went away (`sandboxd list | head -1`: EPIPE) into [`Closed`]
//! instead of a panic; `cli::main` ends such a command quietly with exit
//! status 0, as the reader took what it wanted (and `set -o pipefail`
//! scripts do not fail on `| head`). Any other write failure (a full disk
//! under `> FILE`) is an error like any other. Progress and notes go to
//! stderr through `errln!`, which never fails a command.

use std::io::{self, Write};

/// The reader of stdout went away: the command stops writing and ends
/// quietly with exit status 0.
#[derive(Debug, thiserror::Error)]
#[error("the reader of the output went away")]
pub(crate) struct Closed;

/// Whether an error means the output's reader went away.
pub(crate) fn is_closed(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<Closed>())
}

fn failed(e: io::Error) -> anyhow::Error {
    if e.kind() == io::ErrorKind::BrokenPipe {
        anyhow::Error::new(Closed)
    } else {
        anyhow::anyhow!("cannot write the output: {e}")
    }
}

/// Writes `bytes` whole to stdout and flushes them.
pub(crate) fn bytes(bytes: &[u8]) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    out.write_all(bytes)
        .and_then(|()| out.flush())
        .map_err(failed)
}

/// Writes formatted text to stdout and flushes it.
pub(crate) fn fmt(args: std::fmt::Arguments<'_>) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    out.write_fmt(args)
        .and_then(|()| out.flush())
        .map_err(failed)
}

/// A line on stderr (progress, notes); a closed stderr is not an error.
pub(crate) fn note(args: std::fmt::Arguments<'_>) {
    let _ = writeln!(io::stderr().lock(), "{args}");
}

/// `println!` to stdout that returns [`Closed`] (with `?`) instead of
/// panicking when the reader went away.
macro_rules! outln {
    () => {
        $crate::cli::out::fmt(format_args!("\n"))?
    };
    ($($arg:tt)*) => {
        $crate::cli::out::fmt(format_args!("{}\n", format_args!($($arg)*)))?
    };
}

/// `print!` to stdout, as [`outln!`].
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::out::fmt(format_args!($($arg)*))?
    };
}

/// `eprintln!` that never panics.
macro_rules! errln {
    ($($arg:tt)*) => {
        $crate::cli::out::note(format_args!($($arg)*))
    };
}

pub(crate) use {errln, out, outln};
