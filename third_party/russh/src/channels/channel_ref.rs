use std::sync::Arc;

use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::mpsc::Sender;
use tokio::sync::Notify;

use super::WindowSizeRef;
use crate::ChannelMsg;

/// A handle to the [`super::Channel`]'s to be able to transmit messages
/// to it and update it's `window_size`.
#[derive(Debug)]
pub struct ChannelRef {
    pub(super) sender: Sender<ChannelMsg>,
    pub(super) window_size: WindowSizeRef,
}

impl ChannelRef {
    pub fn new(sender: Sender<ChannelMsg>) -> Self {
        Self {
            sender,
            window_size: WindowSizeRef::new(0),
        }
    }

    pub(crate) fn window_size(&self) -> &WindowSizeRef {
        &self.window_size
    }

    /// sandboxd patch: queue received data without ever waiting. The
    /// receive window was debited by the caller and is credited back when
    /// the consumer takes the data out (at once if nobody reads the channel
    /// any more). The queue has room for a full window of data, so it is
    /// only full if the peer flooded other messages; that is an error.
    pub(crate) fn deliver_data(
        &self,
        msg: ChannelMsg,
        len: usize,
        wake: &Arc<Notify>,
        initial_window: u32,
    ) -> Result<(), crate::Error> {
        let credit = &self.window_size.recv_credit;
        credit.attach(wake, initial_window);
        match self.sender.try_send(msg) {
            Ok(()) => Ok(()),
            Err(TrySendError::Closed(_)) => {
                credit.consumed(len);
                Ok(())
            }
            Err(TrySendError::Full(_)) => Err(crate::Error::Inconsistent),
        }
    }
}

impl std::ops::Deref for ChannelRef {
    type Target = Sender<ChannelMsg>;

    fn deref(&self) -> &Self::Target {
        &self.sender
    }
}
