//! Channel relay: once a client channel and its upstream twin are both open,
//! two tasks copy messages between them, one per direction. Each direction
//! awaits the destination's window before sending, so a slow reader slows
//! its writer only (russh's bounded per-channel queues carry the pressure
//! back to TCP). Channel requests (pty, env, shell, exec, subsystem,
//! window-change, signal, agent) go client -> upstream; exit-status,
//! exit-signal, EOF and close go both ways as the protocol allows.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use russh::{client, server, Channel, ChannelMsg, ChannelReadHalf, ChannelWriteHalf};

use crate::conn::ConnShared;

/// A request we forwarded upstream with want_reply, awaiting its answer.
#[derive(Debug, Clone, Copy)]
enum Pending {
    Pty,
    Start(&'static str),
}

type PendingQueue = Arc<Mutex<VecDeque<Pending>>>;

fn push(q: &PendingQueue, p: Pending) {
    q.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push_back(p);
}

fn pop(q: &PendingQueue) -> Option<Pending> {
    q.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .pop_front()
}

/// Relay a client-opened channel (session, direct-tcpip, direct-streamlocal)
/// to its upstream twin until both sides are closed.
pub(crate) fn spawn_client_initiated(
    shared: Arc<ConnShared>,
    client_chan: Channel<server::Msg>,
    up_chan: Channel<client::Msg>,
) {
    let (c_read, c_write) = client_chan.split();
    let (u_read, u_write) = up_chan.split();
    let pending: PendingQueue = Arc::default();
    let guard = shared.channel_started();
    let s1 = shared.clone();
    let p1 = pending.clone();
    let up_task = tokio::spawn(async move { client_to_upstream(s1, c_read, u_write, p1).await });
    tokio::spawn(async move {
        upstream_to_client(shared, u_read, c_write, pending).await;
        // The upstream side is finished: the other direction has nothing
        // left to deliver to, so stop it if the client has not closed yet.
        up_task.abort();
        drop(guard);
    });
}

/// Relay an upstream-opened channel (forwarded-tcpip, agent) to the client
/// channel opened for it.
pub(crate) fn spawn_upstream_initiated(
    shared: Arc<ConnShared>,
    up_chan: Channel<client::Msg>,
    client_chan: Channel<server::Msg>,
) {
    spawn_client_initiated(shared, client_chan, up_chan);
}

async fn client_to_upstream(
    shared: Arc<ConnShared>,
    mut from: ChannelReadHalf,
    to: ChannelWriteHalf<client::Msg>,
    pending: PendingQueue,
) {
    while let Some(msg) = from.wait().await {
        let sent = match msg {
            ChannelMsg::Data { data } => {
                shared.counters.add_up(data.len());
                to.data_bytes(data).await
            }
            ChannelMsg::ExtendedData { data, ext } => {
                shared.counters.add_up(data.len());
                to.extended_data_bytes(ext, data).await
            }
            ChannelMsg::Eof => to.eof().await,
            ChannelMsg::Close => {
                let _ = to.close().await;
                return;
            }
            ChannelMsg::RequestPty {
                term,
                col_width,
                row_height,
                pix_width,
                pix_height,
                terminal_modes,
                ..
            } => {
                push(&pending, Pending::Pty);
                to.request_pty(
                    true,
                    &term,
                    col_width,
                    row_height,
                    pix_width,
                    pix_height,
                    &terminal_modes,
                )
                .await
            }
            ChannelMsg::RequestShell { .. } => {
                push(&pending, Pending::Start("shell"));
                to.request_shell(true).await
            }
            ChannelMsg::Exec { command, .. } => {
                push(&pending, Pending::Start("exec"));
                to.exec(true, command).await
            }
            ChannelMsg::RequestSubsystem { name, .. } => {
                push(&pending, Pending::Start("subsystem"));
                to.request_subsystem(true, name).await
            }
            ChannelMsg::SetEnv {
                variable_name,
                variable_value,
                ..
            } => to.set_env(false, variable_name, variable_value).await,
            ChannelMsg::WindowChange {
                col_width,
                row_height,
                pix_width,
                pix_height,
            } => {
                to.window_change(col_width, row_height, pix_width, pix_height)
                    .await
            }
            ChannelMsg::Signal { signal } => to.signal(signal).await,
            ChannelMsg::AgentForward { .. } => to.agent_forward(false).await,
            _ => Ok(()),
        };
        if sent.is_err() {
            break;
        }
    }
    // The client side vanished (connection gone) or the upstream refused a
    // write: close the upstream twin.
    let _ = to.close().await;
}

async fn upstream_to_client(
    shared: Arc<ConnShared>,
    mut from: ChannelReadHalf,
    to: ChannelWriteHalf<server::Msg>,
    pending: PendingQueue,
) {
    let id = to.id();
    while let Some(msg) = from.wait().await {
        let sent = match msg {
            ChannelMsg::Data { data } => {
                shared.counters.add_down(data.len());
                to.data_bytes(data).await
            }
            ChannelMsg::ExtendedData { data, ext } => {
                shared.counters.add_down(data.len());
                to.extended_data_bytes(ext, data).await
            }
            ChannelMsg::Eof => to.eof().await,
            ChannelMsg::Close => {
                let _ = to.close().await;
                return;
            }
            ChannelMsg::ExitStatus { exit_status } => to.exit_status(exit_status).await,
            ChannelMsg::ExitSignal {
                signal_name,
                core_dumped,
                error_message,
                lang_tag,
            } => match shared.server_handle() {
                Some(h) => h
                    .exit_signal_request(id, signal_name, core_dumped, error_message, lang_tag)
                    .await
                    .map_err(|()| russh::Error::SendError),
                None => Ok(()),
            },
            ChannelMsg::XonXoff { client_can_do } => match shared.server_handle() {
                Some(h) => h
                    .xon_xoff_request(id, client_can_do)
                    .await
                    .map_err(|()| russh::Error::SendError),
                None => Ok(()),
            },
            ChannelMsg::Success => {
                pop(&pending);
                Ok(())
            }
            ChannelMsg::Failure => match pop(&pending) {
                Some(Pending::Start(what)) => {
                    tracing::info!(sandbox = %shared.sandbox, what, "upstream refused a channel request");
                    let line = format!("sandbox {}: {what} request refused\r\n", shared.sandbox);
                    let _ = to.extended_data_bytes(1, line.into_bytes()).await;
                    let _ = to.exit_status(255).await;
                    let _ = to.eof().await;
                    let _ = to.close().await;
                    return;
                }
                Some(Pending::Pty) => {
                    let line = "PTY allocation request failed\r\n";
                    to.extended_data_bytes(1, line.as_bytes().to_vec()).await
                }
                None => Ok(()),
            },
            _ => Ok(()),
        };
        if sent.is_err() {
            break;
        }
    }
    let _ = to.close().await;
}
