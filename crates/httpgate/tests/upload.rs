//! A 1 GiB upload streams through the gateway with bounded memory. In its
//! own test binary so that the process's peak memory is this test's alone.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::*;
use testsupport::{require, Component};

fn peak_rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_upload_streams_with_bounded_memory() {
    if !require(&[Component::Program("curl")]) {
        return;
    }
    let (_app, gw) = app_gateway(|_| {}).await;
    let before = peak_rss_kib();
    let port = gw.https.port();
    let ca = gw.ca_file.clone();
    // curl streams stdin as a chunked PUT; nothing is written to disk.
    let out = tokio::task::spawn_blocking(move || {
        Command::new("sh")
            .arg("-c")
            .arg(format!(
                "head -c 1073741824 /dev/zero | curl -sS --max-time 300 --http1.1 \
                 --resolve app.test:{port}:127.0.0.1 --cacert {ca} -T - \
                 -w ' %{{http_code}}' https://app.test:{port}/upload",
                ca = ca.display()
            ))
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(text, "1073741824 200", "{out:?}");
    let after = peak_rss_kib();
    let grew_mib = (after.saturating_sub(before)) / 1024;
    eprintln!("peak RSS before {before} KiB, after {after} KiB (+{grew_mib} MiB)");
    assert!(grew_mib < 64, "peak memory grew by {grew_mib} MiB");
    gw.stop().await;
}
