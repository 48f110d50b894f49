//! Open client connections per source, for the per-source cap of a
//! listening address (`Limits::max_connections_per_source`), and open
//! HTTP/2 requests per source (four per connection of that cap: every
//! stream may hold an upstream connection, so without it one source's
//! connections would hold `max_h2_streams` times as many).
//!
//! A source is an IPv4 address, or an IPv6 /64 (what one host, or one
//! customer of a provider, is usually given); an IPv4-mapped IPv6 peer is
//! its IPv4 address. The cap is checked when a connection is accepted,
//! before anything is read or the TLS handshake is run, so connections
//! above it cost one `accept` and one `close`. Every serving thread that
//! accepts on the address shares the counts: they sit in a fixed number of
//! shards, each a map behind its own mutex, held only to add or remove one
//! (never across an await), so two threads rarely meet on one lock. A
//! source's entry is removed when its last connection ends: the maps hold
//! at most one entry per open connection.
//!
//! Peers listed in `trusted_proxies` are exempt (a load balancer in front
//! carries every client's connections).

use std::collections::hash_map::{Entry, HashMap, RandomState};
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

/// Shards of the count map (a power of two).
const SHARDS: usize = 32;

/// The open-connection counts of one listening address, by source.
pub(crate) struct SourceLimit {
    /// 0: no cap (nothing is counted).
    cap: u32,
    exempt: Vec<IpAddr>,
    hasher: RandomState,
    shards: Box<[Mutex<HashMap<u128, u32>>]>,
}

/// One connection counted on its source; uncounted when dropped.
pub(crate) struct SourceSeat {
    limit: Arc<SourceLimit>,
    key: u128,
}

/// The source `ip` is counted as.
fn source_key(ip: IpAddr) -> u128 {
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_ipv6_mapped(),
            None => return u128::from(v6) & !u128::from(u64::MAX),
        },
    };
    u128::from(v6)
}

impl SourceLimit {
    pub(crate) fn new(cap: usize, exempt: Vec<IpAddr>) -> Arc<Self> {
        Arc::new(Self {
            cap: u32::try_from(cap).unwrap_or(u32::MAX),
            exempt,
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        })
    }

    fn shard(&self, key: u128) -> &Mutex<HashMap<u128, u32>> {
        let i = (self.hasher.hash_one(key) as usize) & (SHARDS - 1);
        &self.shards[i]
    }

    /// Count a connection from `ip`: `Err(())` if its source already holds
    /// the cap; `Ok(None)` if the source is not counted (no cap, or a
    /// trusted proxy).
    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Option<SourceSeat>, ()> {
        if self.cap == 0 || self.exempt.contains(&ip) {
            return Ok(None);
        }
        let key = source_key(ip);
        let mut map = self
            .shard(key)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let n = map.entry(key).or_insert(0);
        if *n >= self.cap {
            return Err(());
        }
        *n += 1;
        drop(map);
        Ok(Some(SourceSeat {
            limit: self.clone(),
            key,
        }))
    }

    /// Open connections counted on the source of `ip`.
    #[cfg(test)]
    fn open_from(&self, ip: IpAddr) -> u32 {
        let key = source_key(ip);
        let map = self
            .shard(key)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        map.get(&key).copied().unwrap_or(0)
    }
}

impl Drop for SourceSeat {
    fn drop(&mut self) {
        let mut map = self
            .limit
            .shard(self.key)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Entry::Occupied(mut e) = map.entry(self.key) {
            if *e.get() <= 1 {
                e.remove();
            } else {
                *e.get_mut() -= 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_source_is_capped_and_others_are_not() {
        let l = SourceLimit::new(3, vec![]);
        let seats: Vec<_> = (0..3).map(|_| l.admit(ip("192.0.2.1")).unwrap()).collect();
        assert!(l.admit(ip("192.0.2.1")).is_err());
        // The same address as IPv4-mapped IPv6 is the same source.
        assert!(l.admit(ip("::ffff:192.0.2.1")).is_err());
        assert!(l.admit(ip("192.0.2.2")).unwrap().is_some());
        drop(seats);
        assert_eq!(l.open_from(ip("192.0.2.1")), 0);
        assert!(l.admit(ip("192.0.2.1")).is_ok());
    }

    #[test]
    fn an_ipv6_64_is_one_source() {
        let l = SourceLimit::new(2, vec![]);
        let _a = l.admit(ip("2001:db8:1:2::1")).unwrap();
        let _b = l.admit(ip("2001:db8:1:2:ffff::9")).unwrap();
        assert!(l.admit(ip("2001:db8:1:2::3")).is_err());
        assert!(l.admit(ip("2001:db8:1:3::1")).unwrap().is_some());
    }

    #[test]
    fn trusted_proxies_and_no_cap_are_not_counted() {
        let l = SourceLimit::new(1, vec![ip("10.0.0.1")]);
        let seats: Vec<_> = (0..5).map(|_| l.admit(ip("10.0.0.1")).unwrap()).collect();
        assert!(seats.iter().all(Option::is_none));
        let off = SourceLimit::new(0, vec![]);
        assert!(off.admit(ip("10.0.0.2")).unwrap().is_none());
    }
}
