//! Connection limits: unauthenticated connections (globally and per source
//! address, OpenSSH's `MaxStartups` idea with random early drop), and
//! authenticated connections per sandbox.
//!
//! Everything here is on the accept path or the login path, so it is one
//! short critical section under an uncontended mutex per event: no I/O, no
//! allocation except the first connection of a new source or sandbox.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// `start:rate:full`, as in OpenSSH's `MaxStartups`: below `start`
/// connections logging in, a new one is always taken; from `start` on, it
/// is dropped with probability `rate` percent, rising linearly to 100 % at
/// `full`; at `full` and above, it is always dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Startups {
    pub start: u32,
    pub rate: u32,
    pub full: u32,
}

impl Startups {
    /// A hard limit of `n` with no early drop.
    pub const fn hard(n: u32) -> Self {
        Startups {
            start: n,
            rate: 100,
            full: n,
        }
    }

    /// Whether a new connection is taken while `current` are logging in;
    /// `roll` is a uniform random number in `0..100`.
    fn admits(&self, current: u32, roll: u32) -> bool {
        if current >= self.full {
            return false;
        }
        if current < self.start {
            return true;
        }
        let span = self.full.saturating_sub(self.start).max(1);
        let drop_pct = self.rate + (100 - self.rate.min(100)) * (current - self.start) / span;
        roll >= drop_pct
    }
}

impl std::fmt::Display for Startups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}", self.start, self.rate, self.full)
    }
}

impl std::str::FromStr for Startups {
    type Err = String;

    /// `N` (a hard limit) or `START:RATE:FULL` with `RATE` in percent,
    /// `1 <= START <= FULL`.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not N or START:RATE:FULL (e.g. 10:30:100)");
        let nums: Vec<u32> = s
            .split(':')
            .map(|p| p.trim().parse::<u32>())
            .collect::<Result<_, _>>()
            .map_err(|_| bad())?;
        let v = match nums.as_slice() {
            [n] => Startups::hard(*n),
            [start, rate, full] => Startups {
                start: *start,
                rate: *rate,
                full: *full,
            },
            _ => return Err(bad()),
        };
        if v.start == 0 || v.full < v.start || v.rate > 100 {
            return Err(format!(
                "{s:?}: need 1 <= START <= FULL and RATE between 0 and 100"
            ));
        }
        Ok(v)
    }
}

/// The key a source address is counted under: IPv4 addresses as they are
/// (IPv4-mapped IPv6 too), IPv6 addresses by their /64, since one host
/// commonly holds a whole /64.
pub(crate) fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
        v4 => v4,
    }
}

#[derive(Default)]
struct Counts {
    total: u32,
    per_source: HashMap<IpAddr, u32>,
}

/// Connections in the handshake/login phase, globally and per source.
pub(crate) struct StartupLimits {
    global: Startups,
    per_source: Startups,
    counts: Mutex<Counts>,
    seed: AtomicU64,
}

/// Why a connection was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    Global,
    Source,
}

impl StartupLimits {
    pub(crate) fn new(global: Startups, per_source: Startups) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9e37_79b9_7f4a_7c15)
            | 1;
        StartupLimits {
            global,
            per_source,
            counts: Mutex::new(Counts::default()),
            seed: AtomicU64::new(seed),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A number in `0..100` (xorshift; early drop needs no strong randomness).
    fn roll(&self) -> u32 {
        let mut x = self.seed.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.seed.store(x, Ordering::Relaxed);
        (x % 100) as u32
    }

    /// Take a slot for a new connection from `ip`, or say why not.
    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<StartupPermit, Refused> {
        let key = source_key(ip);
        let roll = self.roll();
        let mut c = self.lock();
        let mine = c.per_source.get(&key).copied().unwrap_or(0);
        if !self.per_source.admits(mine, roll) {
            return Err(Refused::Source);
        }
        if !self.global.admits(c.total, roll) {
            return Err(Refused::Global);
        }
        c.total += 1;
        *c.per_source.entry(key).or_insert(0) += 1;
        Ok(StartupPermit {
            limits: self.clone(),
            key,
        })
    }

    #[cfg(test)]
    fn held(&self, ip: IpAddr) -> u32 {
        self.lock()
            .per_source
            .get(&source_key(ip))
            .copied()
            .unwrap_or(0)
    }
}

/// A connection's slot among those logging in; freed on drop.
pub(crate) struct StartupPermit {
    limits: Arc<StartupLimits>,
    key: IpAddr,
}

impl Drop for StartupPermit {
    fn drop(&mut self) {
        let mut c = self.limits.lock();
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_source.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                c.per_source.remove(&self.key);
            }
        }
    }
}

/// Live authenticated connections per sandbox.
pub(crate) struct SandboxSessions {
    max: usize,
    counts: Mutex<HashMap<String, usize>>,
}

impl SandboxSessions {
    pub(crate) fn new(max: usize) -> Self {
        SandboxSessions {
            max: max.max(1),
            counts: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn max(&self) -> usize {
        self.max
    }

    /// A slot for one more connection to `sandbox`, if it has one left.
    pub(crate) fn claim(self: &Arc<Self>, sandbox: &str) -> Option<SessionSlot> {
        let mut m = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let n = m.entry(sandbox.to_owned()).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(SessionSlot {
            sessions: self.clone(),
            sandbox: sandbox.to_owned(),
        })
    }
}

/// One connection's place in its sandbox's count; freed on drop.
pub(crate) struct SessionSlot {
    sessions: Arc<SandboxSessions>,
    sandbox: String,
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        let mut m = self
            .sessions
            .counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = m.get_mut(&self.sandbox) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.sandbox);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn startups_parse_and_drop_early() {
        let s: Startups = "10:30:20".parse().unwrap();
        assert_eq!(s.to_string(), "10:30:20");
        assert_eq!("5".parse::<Startups>().unwrap(), Startups::hard(5));
        for bad in ["", "0", "3:30", "5:30:4", "5:101:9", "a:b:c"] {
            assert!(bad.parse::<Startups>().is_err(), "{bad}");
        }
        assert!(s.admits(9, 0));
        assert!(!s.admits(10, 29));
        assert!(s.admits(10, 30));
        assert!(!s.admits(15, 64));
        assert!(s.admits(15, 65));
        assert!(!s.admits(20, 99));
        assert!(!Startups::hard(2).admits(2, 99));
    }

    #[test]
    fn per_source_counts_are_separate_and_freed() {
        let l = Arc::new(StartupLimits::new(Startups::hard(100), Startups::hard(2)));
        let a: IpAddr = [127, 0, 0, 1].into();
        let b: IpAddr = [127, 0, 0, 2].into();
        let p1 = l.admit(a).unwrap();
        let _p2 = l.admit(a).unwrap();
        assert_eq!(l.admit(a).err(), Some(Refused::Source));
        let _p3 = l.admit(b).unwrap();
        drop(p1);
        assert_eq!(l.held(a), 1);
        let _p4 = l.admit(a).unwrap();
    }

    #[test]
    fn ipv6_counts_by_64_and_mapped_v4_as_v4() {
        let x: IpAddr = "2001:db8:1:2::5".parse().unwrap();
        let y: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let z: IpAddr = "2001:db8:1:3::5".parse().unwrap();
        assert_eq!(source_key(x), source_key(y));
        assert_ne!(source_key(x), source_key(z));
        let m: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(source_key(m), IpAddr::from([192, 0, 2, 1]));
    }

    #[test]
    fn sandbox_sessions_are_capped_per_sandbox() {
        let s = Arc::new(SandboxSessions::new(2));
        let a1 = s.claim("a").unwrap();
        let _a2 = s.claim("a").unwrap();
        assert!(s.claim("a").is_none());
        let _b = s.claim("b").unwrap();
        drop(a1);
        assert!(s.claim("a").is_some());
    }
}
