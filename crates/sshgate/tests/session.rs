//! Session channels through the gateway: exec, exit codes, stdout/stderr,
//! stdin to EOF, env, pty with modes and resize, signals, banner, and the
//! live-session registry.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::process::Stdio;

use common::*;

#[test]
fn exec_keeps_exit_code_stdout_and_stderr_apart() {
    let h = harness().start();
    let out = run(h.ssh().arg("echo out; echo err >&2; exit 7"));
    assert_eq!(out.status.code(), Some(7), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "out\n");
    assert!(text(&out.stderr).contains("err\n"));
    assert!(!text(&out.stderr).contains("out"));
    let out = run(h.ssh().arg("true"));
    assert_eq!(out.status.code(), Some(0));
}
