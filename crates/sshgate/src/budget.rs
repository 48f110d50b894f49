//! The relay's byte budget: how much channel window the gateway grants
//! beyond each channel's initial window, daemon-wide and per sandbox.
//!
//! Why: by the flow-control invariant (ARCHITECTURE.md) a channel holds at
//! most one receive window of data per direction in the gateway (queued or
//! in flight towards it), so what the relay can be made to buffer is the
//! sum of the windows it granted. With a fixed 8 MiB window, 400 stalled
//! forwarded channels could pin 400 x 2 x 8 MiB = 6.4 GiB.
//!
//! How: every channel leg opens with `initial_window` (always granted). As
//! the relay moves data through a direction, that direction's window
//! doubles (slow start: after each window's worth of data moved) up to
//! `window_size`, each step borrowed from the sandbox's share
//! (`relay_budget_per_sandbox`) and from the daemon-wide pool
//! (`relay_budget`). A borrowed step is held until the channel closes (so
//! the bound holds whatever the peer does with a window it was given) and
//! then returned. When nothing is left to borrow, channels keep working
//! with the window they have.
//!
//! The arithmetic (defaults in brackets): data buffered by the relay is at
//! most `relay_budget` [128 MiB] + open channels x 2 legs x
//! `initial_window` [64 KiB], plus one packet per direction in the relay's
//! hands. One sandbox holds at most `relay_budget_per_sandbox` [48 MiB] of
//! the pool, so other sandboxes' channels can still grow; and its channels
//! are bounded by `max_sessions_per_sandbox` x `max_channels_per_connection`
//! [32 x 64]. For 400 stalled channels of one sandbox: 48 MiB + 400 x 2 x
//! 64 KiB = 98 MiB.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use russh::ChannelReadHalf;

/// The daemon-wide pool and the per-sandbox shares.
pub(crate) struct Budget {
    total: u64,
    per_sandbox: u64,
    used: AtomicU64,
    shares: Mutex<HashMap<String, Weak<AtomicU64>>>,
}

/// Take up to `want` from a counter capped at `cap`; returns what was taken.
fn take_up_to(counter: &AtomicU64, cap: u64, want: u64) -> u64 {
    let mut got = 0;
    let _ = counter.fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
        got = cap.saturating_sub(cur).min(want);
        (got > 0).then_some(cur + got)
    });
    got
}

impl Budget {
    pub(crate) fn new(total: u64, per_sandbox: u64) -> Self {
        Budget {
            total,
            per_sandbox: per_sandbox.min(total),
            used: AtomicU64::new(0),
            shares: Mutex::new(HashMap::new()),
        }
    }

    /// The share of `sandbox` (one counter per sandbox with live sessions).
    pub(crate) fn share(self: &Arc<Self>, sandbox: &str) -> Share {
        let mut m = self.shares.lock().unwrap_or_else(PoisonError::into_inner);
        let used = match m.get(sandbox).and_then(Weak::upgrade) {
            Some(u) => u,
            None => {
                if m.len() >= 1024 {
                    m.retain(|_, w| w.strong_count() > 0);
                }
                let u = Arc::new(AtomicU64::new(0));
                m.insert(sandbox.to_owned(), Arc::downgrade(&u));
                u
            }
        };
        Share {
            budget: self.clone(),
            used,
        }
    }

    /// Bytes borrowed from the pool right now.
    #[cfg(test)]
    pub(crate) fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }
}

/// One sandbox's place in the budget, shared by its connections.
#[derive(Clone)]
pub(crate) struct Share {
    budget: Arc<Budget>,
    used: Arc<AtomicU64>,
}

impl Share {
    fn borrow(&self, want: u64) -> u64 {
        let mine = take_up_to(&self.used, self.budget.per_sandbox, want);
        if mine == 0 {
            return 0;
        }
        let got = take_up_to(&self.budget.used, self.budget.total, mine);
        if got < mine {
            self.used.fetch_sub(mine - got, Ordering::AcqRel);
        }
        got
    }

    fn give_back(&self, n: u64) {
        if n > 0 {
            self.used.fetch_sub(n, Ordering::AcqRel);
            self.budget.used.fetch_sub(n, Ordering::AcqRel);
        }
    }
}

/// The receive window of one direction of one relayed channel.
pub(crate) struct Grant {
    share: Share,
    window: u64,
    max: u64,
    borrowed: u64,
    moved: u64,
}

impl Grant {
    pub(crate) fn new(share: Share, initial: u32, max: u32) -> Self {
        Grant {
            share,
            window: u64::from(initial.max(1)),
            max: u64::from(max.max(initial)),
            borrowed: 0,
            moved: 0,
        }
    }

    /// The relay took `len` bytes out of `from`: after each window's worth,
    /// try to double the window.
    pub(crate) fn moved(&mut self, len: usize, from: &ChannelReadHalf) {
        if self.window >= self.max {
            return;
        }
        self.moved += len as u64;
        if self.moved < self.window {
            return;
        }
        self.moved = 0;
        let want = self.window.min(self.max - self.window);
        let got = self.share.borrow(want);
        if got > 0 {
            self.borrowed += got;
            self.window += got;
            from.set_window_target(u32::try_from(self.window).unwrap_or(u32::MAX));
        }
    }
}

impl Drop for Grant {
    fn drop(&mut self) {
        self.share.give_back(self.borrowed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_are_capped_per_sandbox_and_in_total() {
        let b = Arc::new(Budget::new(100, 60));
        let a = b.share("a");
        let a2 = b.share("a");
        let c = b.share("c");
        assert_eq!(a.borrow(50), 50);
        assert_eq!(a2.borrow(50), 10);
        assert_eq!(c.borrow(50), 40);
        assert_eq!(c.borrow(1), 0);
        a.give_back(50);
        // c is at its share's cap (60) now, whatever the pool holds.
        assert_eq!(c.borrow(50), 20);
        assert_eq!(b.used(), 70);
        assert_eq!(a.borrow(100), 30);
        assert_eq!(b.used(), 100);
    }
}
