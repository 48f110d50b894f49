//! Spreads HTTPS client connections evenly over the serving threads.
//!
//! Every serving thread accepts from the same listening socket (see
//! [`crate::bind_per_thread`]), but a thread that wakes to a burst of new
//! connections accepts the whole burst before the others get to run: the
//! 50 keep-alive connections of a benchmark client often all landed on one
//! thread, which then ran flat out while the other core sat idle (measured:
//! 13–15% of the machine idle and up to a fifth fewer requests per second
//! than with an even spread). A connection never moves once served, so the
//! spread has to be right when it is accepted.
//!
//! The accepting thread therefore counts its open connections against every
//! other serving thread's, and when it holds more than the emptiest thread
//! by more than a small slack, it hands the new socket (before the TLS
//! handshake, so nothing is lost) to that thread over a channel. Counts
//! include idle keep-alive connections: an open connection is work the
//! thread may be asked for at any moment.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::server::Admission;

/// A fresh, accepted connection, taken off the accepting thread's reactor,
/// on its way to another serving thread.
pub(crate) struct Handoff {
    pub stream: std::net::TcpStream,
    pub peer: SocketAddr,
    pub permit: Admission,
    pub seat: Seat,
}

struct Slot {
    open: AtomicUsize,
    /// Unbounded, yet never longer than the connection limit: every
    /// connection in it holds a permit of `max_connections`.
    tx: mpsc::UnboundedSender<Handoff>,
}

/// The open-connection counts of all serving threads and the way into each.
pub(crate) struct Spread {
    slots: Box<[Slot]>,
}

/// One connection counted on one serving thread; uncounted when dropped.
pub(crate) struct Seat {
    spread: Arc<Spread>,
    slot: usize,
}

impl Seat {
    /// The serving thread this connection is counted on.
    pub fn slot(&self) -> usize {
        self.slot
    }

    /// Count the connection on thread `slot` instead.
    fn move_to(&mut self, slot: usize) {
        let slots = &self.spread.slots;
        if let (Some(from), Some(to)) = (slots.get(self.slot), slots.get(slot)) {
            to.open.fetch_add(1, Ordering::Relaxed);
            from.open.fetch_sub(1, Ordering::Relaxed);
            self.slot = slot;
        }
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        if let Some(s) = self.spread.slots.get(self.slot) {
            s.open.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Whether a thread holding `mine` connections should give a new one to a
/// thread holding `least`: when they are more than one apart. A handoff
/// costs a few microseconds (a deregistration, a channel send, a wakeup),
/// little beside a TLS handshake, so the spread is kept tight.
fn overloaded(mine: usize, least: usize) -> bool {
    mine > least + 1
}

impl Spread {
    /// A spread over `threads` serving threads, and the receiving end of
    /// each thread's handoff channel, in thread order.
    pub fn new(threads: usize) -> (Arc<Self>, Vec<mpsc::UnboundedReceiver<Handoff>>) {
        let (slots, rxs): (Vec<_>, Vec<_>) = (0..threads.max(1))
            .map(|_| {
                let (tx, rx) = mpsc::unbounded_channel();
                let slot = Slot {
                    open: AtomicUsize::new(0),
                    tx,
                };
                (slot, rx)
            })
            .unzip();
        let spread = Arc::new(Self {
            slots: slots.into_boxed_slice(),
        });
        (spread, rxs)
    }

    /// Count a connection just accepted by thread `me` on the thread that
    /// should serve it: `me`, unless another thread that still takes
    /// connections holds clearly fewer.
    pub fn place(self: &Arc<Self>, me: usize) -> Seat {
        let mine = self
            .slots
            .get(me)
            .map_or(0, |s| s.open.load(Ordering::Relaxed));
        let (least_at, least) = self
            .slots
            .iter()
            .enumerate()
            .filter(|(i, s)| *i == me || !s.tx.is_closed())
            .map(|(i, s)| (i, s.open.load(Ordering::Relaxed)))
            .min_by_key(|&(_, n)| n)
            .unwrap_or((me, mine));
        let slot = match overloaded(mine, least) {
            true => least_at,
            false => me,
        };
        if let Some(s) = self.slots.get(slot) {
            s.open.fetch_add(1, Ordering::Relaxed);
        }
        Seat {
            spread: self.clone(),
            slot,
        }
    }

    /// Send a connection to the thread its seat is on. If that thread no
    /// longer takes connections (it is stopping), the connection comes
    /// back, counted on thread `me` again, to be served there. (The
    /// handoff comes back whole, unboxed: boxing it would allocate once
    /// per handed-off connection for a case that happens only at shutdown.)
    #[allow(clippy::result_large_err)]
    pub fn hand_off(&self, h: Handoff, me: usize) -> Result<(), Handoff> {
        let sent = match self.slots.get(h.seat.slot) {
            Some(s) => s.tx.send(h).map_err(|e| e.0),
            None => Err(h),
        };
        sent.map_err(|mut h| {
            h.seat.move_to(me);
            h
        })
    }

    /// The open HTTPS connections of thread `slot`.
    pub fn open_on(&self, slot: usize) -> usize {
        self.slots
            .get(slot)
            .map_or(0, |s| s.open.load(Ordering::Relaxed))
    }

    /// The open HTTPS connections of each serving thread.
    pub fn open(&self) -> Vec<usize> {
        self.slots
            .iter()
            .map(|s| s.open.load(Ordering::Relaxed))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn a_burst_on_one_thread_is_spread_evenly() {
        let (spread, _rx) = Spread::new(2);
        // Thread 0 accepts a burst of 50 while thread 1 accepts nothing.
        let seats: Vec<Seat> = (0..50).map(|_| spread.place(0)).collect();
        let open = spread.open();
        assert_eq!(open.iter().sum::<usize>(), 50);
        assert!(open[0].abs_diff(open[1]) <= 2, "{open:?}");
        // Thread 1's own accepts stay on thread 1 while it is not ahead.
        let own = spread.place(1);
        assert_eq!(own.slot(), 1);
        drop(own);
        // Connections that end are uncounted.
        drop(seats);
        assert_eq!(spread.open(), vec![0, 0]);
    }

    #[test]
    fn a_thread_keeps_its_connections_within_the_slack() {
        let (spread, _rx) = Spread::new(3);
        let mut seats = Vec::new();
        for _ in 0..40 {
            seats.push(spread.place(2));
        }
        let open = spread.open();
        let (lo, hi) = (open.iter().min().copied(), open.iter().max().copied());
        let (Some(lo), Some(hi)) = (lo, hi) else {
            panic!("no counts")
        };
        // The accepting thread may be two ahead just after its own accept.
        assert!(hi - lo <= 2, "{open:?}");
        // Close thread 0's connections: the next accepts go there.
        seats.retain(|s| s.slot() != 0);
        assert_eq!(spread.open()[0], 0);
        let next = spread.place(1);
        assert_eq!(next.slot(), 0);
    }

    fn handoff(spread: &Arc<Spread>, me: usize) -> Handoff {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let stream = std::net::TcpStream::connect(addr).expect("connect");
        let permit = Admission::for_test(
            Arc::new(tokio::sync::Semaphore::new(1))
                .try_acquire_owned()
                .expect("permit"),
        );
        Handoff {
            stream,
            peer: addr,
            permit,
            seat: spread.place(me),
        }
    }

    #[test]
    fn a_stopped_thread_takes_no_connections() {
        let (spread, mut rxs) = Spread::new(3);
        let _a = spread.place(0);
        let _b = spread.place(0);
        // Thread 1 stops after the next connection was placed on it: the
        // connection comes back, counted on the accepting thread.
        let h = handoff(&spread, 0);
        assert_eq!(h.seat.slot(), 1);
        drop(rxs.remove(1));
        let back = spread.hand_off(h, 0).expect_err("given back");
        assert_eq!(back.seat.slot(), 0);
        assert_eq!(spread.open(), vec![3, 0, 0]);
        // From now on only thread 2 is handed connections.
        let h = handoff(&spread, 0);
        assert_eq!(h.seat.slot(), 2);
        assert!(spread.hand_off(h, 0).is_ok());
        let got = rxs[1].try_recv().expect("thread 2 got it");
        assert_eq!(got.seat.slot(), 2);
        assert_eq!(spread.open(), vec![3, 0, 1]);
    }
}
