//! HTTP basic auth for routes that carry a login (the agent host), and the
//! limits on online guessing.
//!
//! Passwords are stored as argon2id (PHC) or bcrypt hashes. A presented
//! credential costs one hash verification the first time it is seen; the
//! outcome is cached under an HMAC of (sandbox, stored login, presented user
//! and password, and for a good login the source) with a per-process random
//! key, so the cache holds no usable secret. The presented password is
//! always verified against the stored hash, whether the user name matches or
//! not, so unknown users cost the same.
//!
//! Guessing is bounded three ways:
//! - Per source (an IPv4 address, an IPv6 /64): after
//!   [`LoginLimits::source_free_failures`] distinct wrong logins, further
//!   credentialed requests from that source get 429 with `Retry-After`
//!   until a delay that doubles with each new failure (up to
//!   [`LoginLimits::max_backoff`]). Nothing is verified meanwhile, not even
//!   a correct password: a source in backoff learns nothing. Verifications
//!   under way count against the free failures, so a burst of concurrent
//!   guesses gets no more verified than a sequence would.
//! - Per sandbox: after [`LoginLimits::sandbox_free_failures`] wrong logins
//!   from all sources together, the same backoff applies to every source
//!   that has no good login cached, so a guesser spread over many addresses
//!   is bounded too. A login already verified good *from the same source*
//!   passes (no hash is computed, and the attacker cannot be that source
//!   without sharing its address), so an owner who is logged in keeps access
//!   while the sandbox is attacked.
//! - Hash verifications run one at a time per sandbox (and at most one per
//!   CPU over all sandboxes), with a short bounded queue per sandbox beyond
//!   which requests get 429: an attacked sandbox cannot starve other
//!   sandboxes' logins.
//!
//! Repeating the same wrong credentials (a browser with a stale saved
//! password) is answered from the cache and is not counted again: only
//! distinct guesses count. Failure counts are forgotten after
//! [`LoginLimits::failure_memory`] without a new failure; a success does not
//! reset a source's count (an attacker could otherwise reset it with a login
//! of its own on another sandbox).
//!
//! The caches are bounded: good and bad outcomes are kept apart (so that a
//! flood of wrong guesses cannot evict a good login), and each keeps two
//! generations, a hit moving an entry to the current one; when the current
//! generation is full the previous one is dropped. Entries in use survive,
//! nothing is cleared wholesale.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use argon2::{Argon2, PasswordHash, PasswordVerifier};
use base64::Engine;
use ring::hmac;
use tokio::sync::Semaphore;

use crate::config::LoginLimits;
use crate::BasicAuth;

/// Good logins remembered (over both generations).
const GOOD_MAX: usize = 8192;
/// Wrong logins remembered (over both generations).
const BAD_MAX: usize = 4096;
/// Sources whose failures are tracked; beyond, sources out of backoff are
/// forgotten first.
const SOURCES_MAX: usize = 65_536;

/// The outcome of a login check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Granted,
    /// No or wrong credentials: 401.
    Denied,
    /// Too many failures (or verifications queued): 429, retry after this.
    Backoff(Duration),
}

/// Failures of one source or one sandbox.
#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    last: Instant,
    until: Option<Instant>,
    /// Verifications under way (sources only): they count against the free
    /// failures, so that a burst of guesses cannot all be verified before
    /// the first failure is recorded.
    pending: u32,
}

impl Failures {
    fn new(now: Instant) -> Self {
        Self {
            count: 0,
            last: now,
            until: None,
            pending: 0,
        }
    }

    /// The time left in backoff, if any.
    fn backoff(&self, now: Instant) -> Option<Duration> {
        self.until
            .and_then(|u| u.checked_duration_since(now))
            .filter(|d| !d.is_zero())
    }

    fn record(&mut self, now: Instant, free: u32, limits: &LoginLimits) {
        if now.saturating_duration_since(self.last) > limits.failure_memory {
            self.count = 0;
            self.until = None;
        }
        self.count = self.count.saturating_add(1);
        self.last = now;
        if self.count >= free {
            let doublings = (self.count - free).min(20);
            let delay = limits
                .first_backoff
                .saturating_mul(1u32 << doublings)
                .min(limits.max_backoff);
            self.until = Some(now + delay);
        }
    }

    fn forgotten(&self, now: Instant, limits: &LoginLimits) -> bool {
        self.pending == 0
            && self.backoff(now).is_none()
            && now.saturating_duration_since(self.last) > limits.failure_memory
    }
}

/// A bounded map that keeps recently used entries: two generations, a hit
/// in the previous one moves the entry to the current one, and a full
/// current generation becomes the previous one (dropping the older).
struct TwoGen<K, V> {
    cur: HashMap<K, V>,
    prev: HashMap<K, V>,
    half: usize,
}

impl<K: Hash + Eq, V: Copy> TwoGen<K, V> {
    fn new(max: usize) -> Self {
        Self {
            cur: HashMap::new(),
            prev: HashMap::new(),
            half: (max / 2).max(1),
        }
    }

    fn get(&mut self, k: K) -> Option<V> {
        if let Some(v) = self.cur.get(&k) {
            return Some(*v);
        }
        let v = self.prev.remove(&k)?;
        self.insert(k, v);
        Some(v)
    }

    fn insert(&mut self, k: K, v: V) {
        if self.cur.len() >= self.half && !self.cur.contains_key(&k) {
            self.prev = std::mem::take(&mut self.cur);
        }
        self.cur.insert(k, v);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.cur.len() + self.prev.len()
    }
}

/// The per-sandbox state: its failures and its verification queue.
struct SandboxGuard {
    failures: Mutex<Failures>,
    hashing: Semaphore,
    /// Requests waiting for (or holding) `hashing`.
    queued: AtomicUsize,
}

/// Counts a request in a sandbox's verification queue while alive.
struct Queued<'a>(&'a AtomicUsize);

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A verification under way for a source; ends when dropped.
struct SourcePending<'a> {
    cache: &'a AuthCache,
    src: Option<IpAddr>,
}

impl Drop for SourcePending<'_> {
    fn drop(&mut self) {
        let Some(src) = self.src else { return };
        if let Ok(mut m) = self.cache.sources.lock() {
            if let Some(f) = m.get_mut(&src) {
                f.pending = f.pending.saturating_sub(1);
            }
        }
    }
}

pub(crate) struct AuthCache {
    key: hmac::Key,
    limits: LoginLimits,
    good: Mutex<TwoGen<[u8; 32], ()>>,
    bad: Mutex<TwoGen<[u8; 32], ()>>,
    sources: Mutex<HashMap<IpAddr, Failures>>,
    sandboxes: Mutex<HashMap<String, Arc<SandboxGuard>>>,
    /// Bounds the CPU spent on hash verifications at once, over all sandboxes.
    hashing: Semaphore,
}

/// The address failures are counted under: IPv4 as is, IPv6 by /64 (one
/// host usually holds a whole /64).
fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

impl AuthCache {
    pub(crate) fn new(limits: LoginLimits) -> Self {
        let seed: [u8; 32] = rand::random();
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, &seed),
            limits,
            good: Mutex::new(TwoGen::new(GOOD_MAX)),
            bad: Mutex::new(TwoGen::new(BAD_MAX)),
            sources: Mutex::new(HashMap::new()),
            sandboxes: Mutex::new(HashMap::new()),
            hashing: Semaphore::new(cpus.clamp(1, 64)),
        }
    }

    fn guard(&self, sandbox: &str) -> Option<Arc<SandboxGuard>> {
        let mut m = self.sandboxes.lock().ok()?;
        if let Some(g) = m.get(sandbox) {
            return Some(g.clone());
        }
        if m.len() >= SOURCES_MAX {
            // Sandboxes that are gone: nobody queued, failures forgotten.
            let now = Instant::now();
            m.retain(|_, g| {
                g.queued.load(Ordering::Relaxed) > 0
                    || g.failures
                        .lock()
                        .map_or(true, |f| !f.forgotten(now, &self.limits))
            });
        }
        let g = Arc::new(SandboxGuard {
            failures: Mutex::new(Failures::new(Instant::now())),
            hashing: Semaphore::new(1),
            queued: AtomicUsize::new(0),
        });
        m.insert(sandbox.to_owned(), g.clone());
        Some(g)
    }

    fn source_backoff(&self, src: IpAddr, now: Instant) -> Option<Duration> {
        self.sources
            .lock()
            .ok()
            .and_then(|m| m.get(&src).and_then(|f| f.backoff(now)))
    }

    /// Room for `src` in the sources map (full: the forgotten go first,
    /// then those neither in backoff nor verifying). False if none.
    fn make_room(&self, m: &mut HashMap<IpAddr, Failures>, src: IpAddr, now: Instant) -> bool {
        if m.len() < SOURCES_MAX || m.contains_key(&src) {
            return true;
        }
        m.retain(|_, f| !f.forgotten(now, &self.limits));
        if m.len() >= SOURCES_MAX {
            m.retain(|_, f| f.pending > 0 || f.backoff(now).is_some());
        }
        m.len() < SOURCES_MAX
    }

    /// Starts a verification for `src`, or says how long it must wait: a
    /// source may have at most its free failures left in flight.
    fn source_start(&self, src: IpAddr, now: Instant) -> Result<SourcePending<'_>, Duration> {
        let untracked = SourcePending {
            cache: self,
            src: None,
        };
        let Ok(mut m) = self.sources.lock() else {
            return Ok(untracked);
        };
        if !self.make_room(&mut m, src, now) {
            return Ok(untracked);
        }
        let f = m.entry(src).or_insert_with(|| Failures::new(now));
        if let Some(d) = f.backoff(now) {
            return Err(d);
        }
        let stale = now.saturating_duration_since(f.last) > self.limits.failure_memory;
        let failures = if stale { 0 } else { f.count };
        if failures.saturating_add(f.pending) >= self.limits.source_free_failures {
            return Err(self.limits.first_backoff);
        }
        f.pending += 1;
        Ok(SourcePending {
            cache: self,
            src: Some(src),
        })
    }

    fn record_source_failure(&self, src: IpAddr, now: Instant) {
        let Ok(mut m) = self.sources.lock() else {
            return;
        };
        if !self.make_room(&mut m, src, now) {
            return;
        }
        m.entry(src).or_insert_with(|| Failures::new(now)).record(
            now,
            self.limits.source_free_failures,
            &self.limits,
        );
    }

    /// The cache key of a presented login: an HMAC of every part, each
    /// prefixed by its length.
    fn tag(
        &self,
        sandbox: &str,
        expected: &BasicAuth,
        user: &str,
        password: &str,
        source: &[u8],
    ) -> [u8; 32] {
        let mut ctx = hmac::Context::with_key(&self.key);
        for part in [
            sandbox.as_bytes(),
            expected.user.as_bytes(),
            expected.password_hash.as_bytes(),
            user.as_bytes(),
            password.as_bytes(),
            source,
        ] {
            ctx.update(&(part.len() as u64).to_be_bytes());
            ctx.update(part);
        }
        let mut key = [0u8; 32];
        key.copy_from_slice(ctx.sign().as_ref());
        key
    }

    /// Whether the `Authorization` header value, sent from `peer`, grants
    /// access to a route protected by `expected` (of sandbox `sandbox`).
    pub(crate) async fn check(
        &self,
        sandbox: &str,
        expected: &BasicAuth,
        header: Option<&[u8]>,
        peer: IpAddr,
    ) -> Verdict {
        let Some((user, password)) = header.and_then(parse_basic) else {
            return Verdict::Denied;
        };
        let src = source_key(peer);
        let now = Instant::now();
        if let Some(d) = self.source_backoff(src, now) {
            return Verdict::Backoff(d);
        }
        let ip = match src {
            IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
            IpAddr::V6(a) => a.octets(),
        };
        // Good logins are remembered per source; wrong ones for everyone (a
        // refuted guess teaches nobody anything, and is not counted again).
        let good_key = self.tag(sandbox, expected, &user, &password, &ip);
        if self
            .good
            .lock()
            .ok()
            .and_then(|mut c| c.get(good_key))
            .is_some()
        {
            return Verdict::Granted;
        }
        let bad_key = self.tag(sandbox, expected, &user, &password, &[]);
        if self
            .bad
            .lock()
            .ok()
            .and_then(|mut c| c.get(bad_key))
            .is_some()
        {
            return Verdict::Denied;
        }
        let Some(guard) = self.guard(sandbox) else {
            return Verdict::Backoff(Duration::from_secs(1));
        };
        if let Some(d) = guard.failures.lock().ok().and_then(|f| f.backoff(now)) {
            return Verdict::Backoff(d);
        }
        if guard.queued.fetch_add(1, Ordering::Relaxed) >= self.limits.max_queued_verifications {
            guard.queued.fetch_sub(1, Ordering::Relaxed);
            return Verdict::Backoff(Duration::from_secs(1));
        }
        let _queued = Queued(&guard.queued);
        let _pending = match self.source_start(src, now) {
            Ok(p) => p,
            Err(d) => return Verdict::Backoff(d),
        };
        let Ok(_mine) = guard.hashing.acquire().await else {
            return Verdict::Denied;
        };
        let Ok(_cpu) = self.hashing.acquire().await else {
            return Verdict::Denied;
        };
        let user_ok = constant_time_eq(
            hmac::sign(&self.key, user.as_bytes()).as_ref(),
            hmac::sign(&self.key, expected.user.as_bytes()).as_ref(),
        );
        let hash = expected.password_hash.clone();
        // On a low-priority thread: the serving threads go first (background.rs).
        let pw_ok = crate::background::run(move || verify_password(&password, &hash))
            .await
            .unwrap_or(false);
        if user_ok && pw_ok {
            if let Ok(mut c) = self.good.lock() {
                c.insert(good_key, ());
            }
            return Verdict::Granted;
        }
        let now = Instant::now();
        if let Ok(mut c) = self.bad.lock() {
            c.insert(bad_key, ());
        }
        self.record_source_failure(src, now);
        if let Ok(mut f) = guard.failures.lock() {
            f.record(now, self.limits.sandbox_free_failures, &self.limits);
        }
        Verdict::Denied
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Split `Basic base64(user:password)`.
fn parse_basic(value: &[u8]) -> Option<(String, String)> {
    let value = std::str::from_utf8(value).ok()?.trim();
    let (scheme, rest) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (u, p) = text.split_once(':')?;
    Some((u.to_owned(), p.to_owned()))
}

/// Verify a password against an argon2 PHC string or a bcrypt hash.
pub(crate) fn verify_password(password: &str, hash: &str) -> bool {
    if hash.starts_with("$2") {
        return bcrypt::verify(password, hash).unwrap_or(false);
    }
    match PasswordHash::new(hash) {
        Ok(parsed) => Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use argon2::password_hash::{PasswordHasher, SaltString};

    fn argon(pw: &str) -> String {
        let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
        let params = argon2::Params::new(1024, 1, 1, None).unwrap();
        argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
            .hash_password(pw.as_bytes(), &salt)
            .unwrap()
            .to_string()
    }

    fn header(u: &str, p: &str) -> Vec<u8> {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
        )
        .into_bytes()
    }

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 2));

    #[tokio::test]
    async fn argon2_and_bcrypt_credentials() {
        let cache = AuthCache::new(LoginLimits::default());
        let a = BasicAuth {
            user: "alice".into(),
            password_hash: argon("s3cret"),
        };
        let check = |ba: &BasicAuth, h: Option<Vec<u8>>| {
            let ba = ba.clone();
            let cache = &cache;
            async move { cache.check("sb", &ba, h.as_deref(), A).await }
        };
        assert_eq!(
            check(&a, Some(header("alice", "s3cret"))).await,
            Verdict::Granted
        );
        // Cached answer is the same.
        assert_eq!(
            check(&a, Some(header("alice", "s3cret"))).await,
            Verdict::Granted
        );
        assert_eq!(
            check(&a, Some(header("alice", "wrong"))).await,
            Verdict::Denied
        );
        assert_eq!(
            check(&a, Some(header("bob", "s3cret"))).await,
            Verdict::Denied
        );
        assert_eq!(check(&a, None).await, Verdict::Denied);
        assert_eq!(check(&a, Some(b"Bearer x".to_vec())).await, Verdict::Denied);
        let b = BasicAuth {
            user: "bob".into(),
            password_hash: bcrypt::hash("pw", 4).unwrap(),
        };
        assert_eq!(check(&b, Some(header("bob", "pw"))).await, Verdict::Granted);
        assert_eq!(check(&b, Some(header("bob", "pw2"))).await, Verdict::Denied);
        // A changed password hash is not served from the cache.
        let a2 = BasicAuth {
            user: "alice".into(),
            password_hash: argon("other"),
        };
        assert_eq!(
            check(&a2, Some(header("alice", "s3cret"))).await,
            Verdict::Denied
        );
    }

    #[tokio::test]
    async fn wrong_guesses_back_off_per_source_then_per_sandbox() {
        let limits = LoginLimits {
            source_free_failures: 2,
            sandbox_free_failures: 3,
            ..LoginLimits::default()
        };
        let cache = AuthCache::new(limits);
        let a = BasicAuth {
            user: "alice".into(),
            password_hash: argon("s3cret"),
        };
        let good = header("alice", "s3cret");
        // The owner logs in from B before the attack.
        assert_eq!(
            cache.check("sb", &a, Some(&good), B).await,
            Verdict::Granted
        );
        for i in 0..2 {
            let h = header("alice", &format!("guess{i}"));
            assert_eq!(cache.check("sb", &a, Some(&h), A).await, Verdict::Denied);
        }
        // A is in backoff, even with the right password.
        assert!(matches!(
            cache.check("sb", &a, Some(&good), A).await,
            Verdict::Backoff(_)
        ));
        // Repeating a known-wrong guess is not a new failure.
        let c = IpAddr::V4(std::net::Ipv4Addr::new(198, 51, 100, 7));
        let h = header("alice", "guess0");
        for _ in 0..5 {
            assert_eq!(cache.check("sb", &a, Some(&h), c).await, Verdict::Denied);
        }
        assert_eq!(
            cache.check("sb", &a, Some(&good), c).await,
            Verdict::Granted
        );
        // One more distinct guess from C: the sandbox reaches its limit.
        let h = header("alice", "guess-c");
        assert_eq!(cache.check("sb", &a, Some(&h), c).await, Verdict::Denied);
        let d = IpAddr::V4(std::net::Ipv4Addr::new(198, 51, 100, 8));
        assert!(matches!(
            cache.check("sb", &a, Some(&good), d).await,
            Verdict::Backoff(_)
        ));
        // The owner at B, known good, is not locked out; nor is another sandbox.
        assert_eq!(
            cache.check("sb", &a, Some(&good), B).await,
            Verdict::Granted
        );
        assert_eq!(
            cache.check("other", &a, Some(&good), d).await,
            Verdict::Granted
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burst_of_guesses_gets_only_the_free_failures_verified() {
        let cache = Arc::new(AuthCache::new(LoginLimits {
            source_free_failures: 3,
            ..LoginLimits::default()
        }));
        let a = BasicAuth {
            user: "alice".into(),
            password_hash: argon("s3cret"),
        };
        let mut tasks = Vec::new();
        for i in 0..20 {
            let (cache, a) = (cache.clone(), a.clone());
            tasks.push(tokio::spawn(async move {
                let h = header("alice", &format!("burst{i}"));
                cache.check("sb", &a, Some(&h), A).await
            }));
        }
        let mut denied = 0;
        for t in tasks {
            match t.await.unwrap() {
                Verdict::Denied => denied += 1,
                Verdict::Backoff(_) => {}
                Verdict::Granted => panic!("a wrong guess granted"),
            }
        }
        assert_eq!(denied, 3, "verified guesses");
    }

    #[test]
    fn two_generations_keep_what_is_used() {
        let mut c: TwoGen<u32, ()> = TwoGen::new(8);
        c.insert(0, ());
        for i in 1..100u32 {
            c.insert(i, ());
            // Entry 0 is used all along: it stays.
            assert!(c.get(0).is_some(), "{i}");
            assert!(c.len() <= 8);
        }
        assert!(c.get(1).is_none());
    }
}
