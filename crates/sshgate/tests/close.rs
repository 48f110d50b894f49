//! Channel close ordering through the gateway. PuTTY and dropbear send
//! `CHANNEL_CLOSE` as soon as both sides have sent EOF; sshd may send its
//! EOF before `exit-status` (always when the command closes its output
//! before it exits). Whatever side closes first, every message the other
//! side sends before its own close must arrive. The client here is a russh
//! client driven message by message, so that the order is exactly the one
//! those clients use; each case also runs straight to sshd as a control.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use russh::keys::{
    load_secret_key, HashAlg, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate,
};
use russh::{client, ChannelMsg};
use testsupport::{require, Component};

use common::*;

/// Accepts exactly one host key.
struct Pinned(PublicKey);

impl client::Handler for Pinned {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(match key {
            PublicKeyOrCertificate::PublicKey { key, .. } => key.key_data() == self.0.key_data(),
            PublicKeyOrCertificate::Certificate(_) => false,
        })
    }
}

/// When the client sends its close.
#[derive(Clone, Copy, Debug)]
enum CloseAt {
    /// As PuTTY and dropbear: once both sides have sent EOF.
    AfterEofs,
    /// Right after the command starts, without waiting for anything.
    AtOnce,
}

/// What the client saw of one exec.
#[derive(Debug, PartialEq)]
struct Seen {
    stdout: Vec<u8>,
    exit_status: Option<u32>,
    exit_signal: Option<String>,
    /// The channel ended with the server's close (not a dropped connection).
    closed: bool,
}

/// The gateway's host key, from the harness's known_hosts.
fn host_key(h: &Harness) -> PublicKey {
    let text = std::fs::read_to_string(&h.known_hosts).unwrap();
    let marker = format!("[127.0.0.1]:{} ", h.addr.port());
    let line = text.lines().find(|l| l.starts_with(&marker)).unwrap();
    PublicKey::from_openssh(&line[marker.len()..]).unwrap()
}

async fn exec(
    addr: SocketAddr,
    host: PublicKey,
    user: &str,
    key: &Path,
    command: &str,
    close_at: CloseAt,
) -> Seen {
    let config = Arc::new(client::Config::default());
    let mut session = client::connect(config, addr, Pinned(host)).await.unwrap();
    let key = Arc::new(load_secret_key(key, None).unwrap());
    let auth = session
        .authenticate_publickey(user, PrivateKeyWithHashAlg::new(key, Some(HashAlg::Sha512)))
        .await
        .unwrap();
    assert!(auth.success(), "public key refused");
    let mut channel = session.channel_open_session().await.unwrap();
    channel.exec(true, command).await.unwrap();
    let mut seen = Seen {
        stdout: Vec::new(),
        exit_status: None,
        exit_signal: None,
        closed: false,
    };
    let mut sent_close = false;
    if let CloseAt::AtOnce = close_at {
        channel.eof().await.unwrap();
        channel.close().await.unwrap();
        sent_close = true;
    }
    let mut server_eof = false;
    while let Some(msg) = tokio::time::timeout(Duration::from_secs(30), channel.wait())
        .await
        .expect("the channel neither closed nor sent anything for 30 s")
    {
        match msg {
            ChannelMsg::Data { data } => seen.stdout.extend_from_slice(&data),
            ChannelMsg::ExitStatus { exit_status } => seen.exit_status = Some(exit_status),
            ChannelMsg::ExitSignal { signal_name, .. } => {
                seen.exit_signal = Some(format!("{signal_name:?}"))
            }
            ChannelMsg::Eof => server_eof = true,
            ChannelMsg::Close => {
                seen.closed = true;
                break;
            }
            _ => {}
        }
        if server_eof && !sent_close {
            channel.eof().await.unwrap();
            channel.close().await.unwrap();
            sent_close = true;
        }
    }
    let _ = session
        .disconnect(russh::Disconnect::ByApplication, "", "en")
        .await;
    seen
}

fn run(h: &Harness, command: &str, close_at: CloseAt) -> (Seen, Seen) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let via = exec(
            h.addr,
            host_key(h),
            &h.sandbox,
            &h.keys[0],
            command,
            close_at,
        )
        .await;
        let sshd: SocketAddr = format!("127.0.0.1:{}", h.sshd.port).parse().unwrap();
        let host =
            PublicKey::from_openssh(&std::fs::read_to_string(&h.sshd.host_pub).unwrap()).unwrap();
        let direct = exec(sshd, host, &whoami(), &h.direct_key, command, close_at).await;
        (via, direct)
    })
}

#[test]
fn exit_status_after_the_client_closed_on_both_eofs() {
    if !require(&[Component::Sshd]) {
        return;
    }
    let h = harness().start();
    // The command closes its output, so sshd sends EOF a second before
    // its exit status; the client closes on that EOF.
    let (via, direct) = run(
        &h,
        "echo out; exec >&- 2>&-; sleep 1; exit 7",
        CloseAt::AfterEofs,
    );
    assert_eq!(direct.exit_status, Some(7), "control: {direct:?}");
    assert_eq!(via, direct);
    assert_eq!(via.stdout, b"out\n");
    assert!(via.closed);
}

#[test]
fn exit_status_of_ordinary_commands_survives_the_race() {
    if !require(&[Component::Sshd]) {
        return;
    }
    let h = harness().start();
    for i in 0..40 {
        let (via, direct) = run(&h, "echo out; echo err >&2; exit 7", CloseAt::AfterEofs);
        assert_eq!(direct.exit_status, Some(7), "control, run {i}: {direct:?}");
        assert_eq!(via, direct, "run {i}");
    }
}

#[test]
fn exit_signal_after_the_client_closed() {
    if !require(&[Component::Sshd]) {
        return;
    }
    let h = harness().start();
    let (via, direct) = run(
        &h,
        "exec >&- 2>&-; sleep 1; kill -TERM $$",
        CloseAt::AfterEofs,
    );
    assert_eq!(
        direct.exit_signal.as_deref(),
        Some("TERM"),
        "control: {direct:?}"
    );
    assert_eq!(via, direct);
}

#[test]
fn a_client_closing_at_once_still_gets_the_exit_status() {
    if !require(&[Component::Sshd]) {
        return;
    }
    let h = harness().start();
    // The client closes before the command has printed anything: sshd
    // still reports how the command ended, and so must the gateway.
    let (via, direct) = run(&h, "sleep 1; exit 3", CloseAt::AtOnce);
    assert!(direct.closed, "control: {direct:?}");
    assert_eq!(via, direct);
}

#[test]
fn closed_channels_do_not_pile_up_on_a_long_connection() {
    if !require(&[Component::Sshd]) {
        return;
    }
    // More channels on one connection than it may hold at once, each
    // closed by the client first: each must end on both legs (its slot
    // freed), or the per-connection channel limit would refuse new ones.
    let limit = 4;
    let h = harness()
        .config(|c| c.max_channels_per_connection = limit)
        .start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let config = Arc::new(client::Config::default());
        let mut session = client::connect(config, h.addr, Pinned(host_key(&h)))
            .await
            .unwrap();
        let key = Arc::new(load_secret_key(&h.keys[0], None).unwrap());
        let auth = session
            .authenticate_publickey(
                h.sandbox.clone(),
                PrivateKeyWithHashAlg::new(key, Some(HashAlg::Sha512)),
            )
            .await
            .unwrap();
        assert!(auth.success());
        for i in 0..limit * 3 {
            let mut channel = session.channel_open_session().await.unwrap_or_else(|e| {
                panic!("channel {i} refused (limit {limit}): {e}");
            });
            channel.exec(true, "exit 5").await.unwrap();
            let mut status = None;
            while let Some(msg) = channel.wait().await {
                match msg {
                    ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
                    ChannelMsg::Eof => channel.close().await.unwrap(),
                    ChannelMsg::Close => break,
                    _ => {}
                }
            }
            assert_eq!(status, Some(5), "channel {i}");
        }
    });
}
