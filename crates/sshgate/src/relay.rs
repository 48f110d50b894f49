//! Channel relay: once a client channel and its upstream twin are both open,
//! two tasks copy messages between them, one per direction. Each direction
//! awaits the destination's window before sending, so a slow reader slows
//! its writer only. The pressure reaches the sender through the SSH window
//! of the source channel alone: the vendored russh (third_party/russh)
//! re-opens a channel's receive window only as its consumer (this relay)
//! takes data out, and its session loop never waits on a channel's queue,
//! so a stuck channel never stalls the connection's other channels.
//!
//! Each direction's window starts small and grows as data moves through
//! it, drawing on the relay budget (`budget.rs`), which bounds what the
//! relay buffers daemon-wide.
//!
//! Channel requests (pty, env, shell, exec, subsystem, window-change,
//! signal, agent) go client -> upstream with the client's want_reply; the
//! upstream's answers go back to the client through the server handle, in
//! request order (X11 is refused here, in its place in that order).
//! Exit-status, exit-signal, EOF and close go both ways as the protocol
//! allows.
//!
//! Closing keeps every message the far side sends before its own close.
//! Both russh sessions hold their answer to a peer's `CHANNEL_CLOSE`
//! (`hold_close_reply`): when one side closes, the relay passes the close
//! on to the other side and goes on relaying what that side still sends
//! (sshd sends `exit-status` after a PuTTY or dropbear client has closed,
//! once the command exits); the held answer goes out when the other side's
//! close arrives. Data that a closed side can no longer take is dropped
//! instead of waiting for a window that will never open.

use std::collections::VecDeque;
use std::sync::Arc;

use std::future::Future;

use russh::{client, server, Channel, ChannelId, ChannelMsg, ChannelReadHalf, ChannelWriteHalf};
use tokio::sync::{watch, Mutex};

use crate::budget::Grant;
use crate::conn::{ChannelSlot, ConnShared};

/// Replies owed to the client for one channel, in request order: `None`
/// while the upstream has not answered, `Some(success)` once known.
#[derive(Default)]
struct Replies {
    slots: VecDeque<Option<bool>>,
}

type ReplyQueue = Arc<Mutex<Replies>>;

impl Replies {
    /// Send every reply that is next in line. Called with the queue locked,
    /// so replies leave in order even though two tasks answer.
    async fn flush(&mut self, shared: &ConnShared, id: ChannelId) {
        while let Some(Some(ok)) = self.slots.front().copied() {
            self.slots.pop_front();
            if let Some(h) = shared.server_handle() {
                let _ = if ok {
                    h.channel_success(id).await
                } else {
                    h.channel_failure(id).await
                };
            }
        }
    }
}

/// Note a request forwarded upstream with want_reply (before forwarding, so
/// the answer always finds its slot).
async fn expect_reply(q: &ReplyQueue, want_reply: bool) -> bool {
    if want_reply {
        q.lock().await.slots.push_back(None);
    }
    want_reply
}

/// Answer a request here (X11 forwarding is not relayed).
async fn answer_locally(q: &ReplyQueue, shared: &ConnShared, id: ChannelId, ok: bool) {
    let mut replies = q.lock().await;
    replies.slots.push_back(Some(ok));
    replies.flush(shared, id).await;
}

/// The upstream answered the oldest request still waiting for it.
async fn upstream_answered(q: &ReplyQueue, shared: &ConnShared, id: ChannelId, ok: bool) {
    let mut replies = q.lock().await;
    if let Some(slot) = replies.slots.iter_mut().find(|s| s.is_none()) {
        *slot = Some(ok);
    }
    replies.flush(shared, id).await;
}

/// Relay a client-opened channel (session, direct-tcpip, direct-streamlocal)
/// to its upstream twin until both sides are closed.
pub(crate) fn spawn_client_initiated(
    shared: Arc<ConnShared>,
    client_chan: Channel<server::Msg>,
    up_chan: Channel<client::Msg>,
    slot: ChannelSlot,
) {
    let (c_read, c_write) = client_chan.split();
    let (u_read, u_write) = up_chan.split();
    let replies: ReplyQueue = Arc::default();
    let guard = shared.channel_started();
    let s1 = shared.clone();
    let r1 = replies.clone();
    let id = c_write.id();
    let (client_closed, client_closed_rx) = watch::channel(false);
    let (upstream_closed, upstream_closed_rx) = watch::channel(false);
    let client_side = Side {
        closed: client_closed,
        peer_closed: upstream_closed_rx,
    };
    let upstream_side = Side {
        closed: upstream_closed,
        peer_closed: client_closed_rx,
    };
    let up_task =
        tokio::spawn(
            async move { client_to_upstream(s1, id, c_read, u_write, r1, client_side).await },
        );
    tokio::spawn(async move {
        upstream_to_client(shared, u_read, c_write, replies, upstream_side).await;
        // The upstream side has closed and the client was sent its close.
        // The channel's slot stays taken until the client answers (or its
        // connection ends): a client that never answers closes cannot pile
        // up half-closed channels beyond the per-connection channel limit.
        let _ = up_task.await;
        drop(guard);
        drop(slot);
    });
}

/// One direction's view of the closing: `closed` is raised when this
/// direction's source has closed (or vanished), `peer_closed` when the
/// destination has.
struct Side {
    closed: watch::Sender<bool>,
    peer_closed: watch::Receiver<bool>,
}

impl Side {
    /// Send data to the destination, unless it closes first: a closed side
    /// opens no more window, and what it would have received is dropped.
    async fn send_data(
        &mut self,
        send: impl Future<Output = Result<(), russh::Error>>,
    ) -> Result<(), russh::Error> {
        tokio::select! {
            biased;
            sent = send => sent,
            _ = self.peer_closed.wait_for(|closed| *closed) => Ok(()),
        }
    }

    /// This direction's source has closed or vanished.
    fn source_closed(&self) {
        self.closed.send_replace(true);
    }
}

/// Relay an upstream-opened channel (forwarded-tcpip, agent) to the client
/// channel opened for it.
pub(crate) fn spawn_upstream_initiated(
    shared: Arc<ConnShared>,
    up_chan: Channel<client::Msg>,
    client_chan: Channel<server::Msg>,
    slot: ChannelSlot,
) {
    spawn_client_initiated(shared, client_chan, up_chan, slot);
}

fn grant(shared: &ConnShared) -> Grant {
    Grant::new(
        shared.budget.clone(),
        shared.initial_window,
        shared.max_window,
    )
}

async fn client_to_upstream(
    shared: Arc<ConnShared>,
    id: ChannelId,
    mut from: ChannelReadHalf,
    to: ChannelWriteHalf<client::Msg>,
    replies: ReplyQueue,
    mut side: Side,
) {
    let mut window = grant(&shared);
    while let Some(msg) = from.wait().await {
        let sent = match msg {
            ChannelMsg::Data { data } => {
                shared.counters.add_up(data.len());
                window.moved(data.len(), &from);
                side.send_data(to.data_bytes(data)).await
            }
            ChannelMsg::ExtendedData { data, ext } => {
                shared.counters.add_up(data.len());
                window.moved(data.len(), &from);
                side.send_data(to.extended_data_bytes(ext, data)).await
            }
            ChannelMsg::Eof => to.eof().await,
            ChannelMsg::Close => break,
            ChannelMsg::RequestPty {
                want_reply,
                term,
                col_width,
                row_height,
                pix_width,
                pix_height,
                terminal_modes,
            } => {
                to.request_pty(
                    expect_reply(&replies, want_reply).await,
                    &term,
                    col_width,
                    row_height,
                    pix_width,
                    pix_height,
                    &terminal_modes,
                )
                .await
            }
            ChannelMsg::RequestShell { want_reply } => {
                to.request_shell(expect_reply(&replies, want_reply).await)
                    .await
            }
            ChannelMsg::Exec {
                want_reply,
                command,
            } => {
                to.exec(expect_reply(&replies, want_reply).await, command)
                    .await
            }
            ChannelMsg::RequestSubsystem { want_reply, name } => {
                to.request_subsystem(expect_reply(&replies, want_reply).await, name)
                    .await
            }
            ChannelMsg::SetEnv {
                want_reply,
                variable_name,
                variable_value,
            } => {
                to.set_env(
                    expect_reply(&replies, want_reply).await,
                    variable_name,
                    variable_value,
                )
                .await
            }
            ChannelMsg::RequestX11 { want_reply, .. } => {
                if want_reply {
                    answer_locally(&replies, &shared, id, false).await;
                }
                Ok(())
            }
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
            // russh answers agent requests itself, from the handler's
            // return value.
            ChannelMsg::AgentForward { .. } => to.agent_forward(false).await,
            _ => Ok(()),
        };
        if sent.is_err() {
            break;
        }
    }
    // The client closed (its close is answered when the upstream's arrives),
    // vanished, or the upstream refused a write: close the upstream twin,
    // whose answer (or own close) ends the other direction.
    side.source_closed();
    let _ = to.close().await;
}

async fn upstream_to_client(
    shared: Arc<ConnShared>,
    mut from: ChannelReadHalf,
    to: ChannelWriteHalf<server::Msg>,
    replies: ReplyQueue,
    mut side: Side,
) {
    let id = to.id();
    let mut window = grant(&shared);
    while let Some(msg) = from.wait().await {
        let sent = match msg {
            ChannelMsg::Data { data } => {
                shared.counters.add_down(data.len());
                window.moved(data.len(), &from);
                side.send_data(to.data_bytes(data)).await
            }
            ChannelMsg::ExtendedData { data, ext } => {
                shared.counters.add_down(data.len());
                window.moved(data.len(), &from);
                side.send_data(to.extended_data_bytes(ext, data)).await
            }
            ChannelMsg::Eof => to.eof().await,
            ChannelMsg::Close => break,
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
                upstream_answered(&replies, &shared, id, true).await;
                Ok(())
            }
            ChannelMsg::Failure => {
                tracing::debug!(sandbox = %shared.sandbox, "upstream refused a channel request");
                upstream_answered(&replies, &shared, id, false).await;
                Ok(())
            }
            _ => Ok(()),
        };
        if sent.is_err() {
            break;
        }
    }
    // The upstream closed, vanished, or the client refused a write: close
    // the client's channel (answering its close if it sent one first).
    side.source_closed();
    let _ = to.close().await;
}
