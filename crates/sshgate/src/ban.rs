//! Failed-login accounting per source address, and the expiring ban that
//! follows too many failures inside a window. A failure is a refused key
//! or a connection that did not log in within the login grace time.
//! Addresses are counted as [`crate::limits::source_key`] groups them
//! (IPv6 by /64).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::limits::source_key;

/// When a source address gets banned, and for how long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BanPolicy {
    /// Failed logins tolerated inside `window`; the next one bans.
    /// `0` disables banning.
    pub max_failures: u32,
    /// Failures older than this are forgotten.
    pub window: Duration,
    /// How long a ban lasts.
    pub ban_duration: Duration,
    /// Addresses never banned (e.g. a monitoring host; an IPv6 address
    /// stands for its /64).
    pub ignore: Vec<IpAddr>,
}

impl Default for BanPolicy {
    fn default() -> Self {
        BanPolicy {
            max_failures: 10,
            window: Duration::from_secs(600),
            ban_duration: Duration::from_secs(900),
            ignore: Vec::new(),
        }
    }
}

#[derive(Debug)]
struct Entry {
    failures: Vec<Instant>,
    banned_until: Option<Instant>,
}

/// The ban list; cheap lookups, pruned as it is used.
#[derive(Debug)]
pub(crate) struct BanList {
    policy: BanPolicy,
    entries: Mutex<HashMap<IpAddr, Entry>>,
}

/// Upper bound of tracked addresses; the oldest state is dropped beyond it.
const MAX_TRACKED: usize = 65_536;

impl BanList {
    pub(crate) fn new(policy: BanPolicy) -> Self {
        BanList {
            policy,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Entry>> {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn is_banned(&self, ip: IpAddr) -> bool {
        let ip = source_key(ip);
        let now = Instant::now();
        let mut map = self.lock();
        match map.get_mut(&ip) {
            Some(e) => match e.banned_until {
                Some(t) if t > now => true,
                Some(_) => {
                    e.banned_until = None;
                    e.failures.clear();
                    false
                }
                None => false,
            },
            None => false,
        }
    }

    /// Count one failed login; returns true if this failure starts a ban.
    pub(crate) fn record_failure(&self, ip: IpAddr) -> bool {
        let ip = source_key(ip);
        if self.policy.max_failures == 0 || self.policy.ignore.iter().any(|i| source_key(*i) == ip)
        {
            return false;
        }
        let now = Instant::now();
        let mut map = self.lock();
        if map.len() >= MAX_TRACKED && !map.contains_key(&ip) {
            map.retain(|_, e| e.banned_until.is_some_and(|t| t > now));
            if map.len() >= MAX_TRACKED {
                return false;
            }
        }
        let e = map.entry(ip).or_insert_with(|| Entry {
            failures: Vec::new(),
            banned_until: None,
        });
        let window = self.policy.window;
        e.failures.retain(|t| now.duration_since(*t) < window);
        e.failures.push(now);
        if e.failures.len() > self.policy.max_failures as usize && e.banned_until.is_none() {
            e.banned_until = Some(now + self.policy.ban_duration);
            return true;
        }
        false
    }

    /// Take back the last failure of `ip` (a client that tried a wrong key
    /// first and then a right one did not fail).
    pub(crate) fn forgive_one(&self, ip: IpAddr) {
        let ip = source_key(ip);
        let mut map = self.lock();
        if let Some(e) = map.get_mut(&ip) {
            if e.banned_until.is_none() {
                e.failures.pop();
                if e.failures.is_empty() {
                    map.remove(&ip);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ban_after_max_failures_expires_and_is_per_address() {
        let list = BanList::new(BanPolicy {
            max_failures: 2,
            window: Duration::from_secs(60),
            ban_duration: Duration::from_millis(50),
            ignore: vec![],
        });
        let a: IpAddr = [127, 0, 0, 1].into();
        let b: IpAddr = [127, 0, 0, 2].into();
        assert!(!list.record_failure(a));
        assert!(!list.record_failure(a));
        assert!(!list.is_banned(a));
        assert!(list.record_failure(a));
        assert!(list.is_banned(a));
        assert!(!list.is_banned(b));
        std::thread::sleep(Duration::from_millis(60));
        assert!(!list.is_banned(a));
    }

    #[test]
    fn forgiven_failures_do_not_count() {
        let list = BanList::new(BanPolicy {
            max_failures: 1,
            ..BanPolicy::default()
        });
        let a: IpAddr = [127, 0, 0, 1].into();
        for _ in 0..5 {
            list.record_failure(a);
            list.forgive_one(a);
        }
        assert!(!list.is_banned(a));
    }
}
