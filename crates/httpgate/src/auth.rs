//! HTTP basic auth for routes that carry credentials (the agent host).
//!
//! Passwords are stored as argon2id (PHC) or bcrypt hashes. A presented
//! credential costs one hash verification the first time it is seen; the
//! outcome is cached under an HMAC of (route, stored hash, presented user and
//! password) with a per-process random key, so the cache holds no usable
//! secret. The presented password is always verified against the stored
//! hash, whether the user name matches or not, so unknown users cost the same.

use std::collections::HashMap;
use std::sync::Mutex;

use argon2::{Argon2, PasswordHash, PasswordVerifier};
use base64::Engine;
use ring::hmac;
use tokio::sync::Semaphore;

use crate::BasicAuth;

const CACHE_MAX: usize = 8192;

pub(crate) struct AuthCache {
    key: hmac::Key,
    cache: Mutex<HashMap<[u8; 32], bool>>,
    /// Bounds the CPU spent on hash verifications at once.
    hashing: Semaphore,
}

impl AuthCache {
    pub(crate) fn new() -> Self {
        let seed: [u8; 32] = rand::random();
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, &seed),
            cache: Mutex::new(HashMap::new()),
            hashing: Semaphore::new(2),
        }
    }

    /// Whether the `Authorization` header value grants access to a route
    /// protected by `expected` (of sandbox `sandbox`).
    pub(crate) async fn check(
        &self,
        sandbox: &str,
        expected: &BasicAuth,
        header: Option<&[u8]>,
    ) -> bool {
        let Some((user, password)) = header.and_then(parse_basic) else {
            return false;
        };
        let mut ctx = hmac::Context::with_key(&self.key);
        for part in [
            sandbox.as_bytes(),
            expected.user.as_bytes(),
            expected.password_hash.as_bytes(),
            user.as_bytes(),
            password.as_bytes(),
        ] {
            ctx.update(&(part.len() as u64).to_be_bytes());
            ctx.update(part);
        }
        let tag = ctx.sign();
        let mut cache_key = [0u8; 32];
        cache_key.copy_from_slice(tag.as_ref());
        if let Some(ok) = self
            .cache
            .lock()
            .ok()
            .and_then(|c| c.get(&cache_key).copied())
        {
            return ok;
        }
        let user_ok = constant_time_eq(
            hmac::sign(&self.key, user.as_bytes()).as_ref(),
            hmac::sign(&self.key, expected.user.as_bytes()).as_ref(),
        );
        let hash = expected.password_hash.clone();
        let Ok(_permit) = self.hashing.acquire().await else {
            return false;
        };
        let pw_ok = tokio::task::spawn_blocking(move || verify_password(&password, &hash))
            .await
            .unwrap_or(false);
        let ok = user_ok && pw_ok;
        if let Ok(mut c) = self.cache.lock() {
            if c.len() >= CACHE_MAX {
                c.clear();
            }
            c.insert(cache_key, ok);
        }
        ok
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
        Argon2::default()
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

    #[tokio::test]
    async fn argon2_and_bcrypt_credentials() {
        let cache = AuthCache::new();
        let a = BasicAuth {
            user: "alice".into(),
            password_hash: argon("s3cret"),
        };
        assert!(
            cache
                .check("sb", &a, Some(&header("alice", "s3cret")))
                .await
        );
        // Cached answer is the same.
        assert!(
            cache
                .check("sb", &a, Some(&header("alice", "s3cret")))
                .await
        );
        assert!(!cache.check("sb", &a, Some(&header("alice", "wrong"))).await);
        assert!(!cache.check("sb", &a, Some(&header("bob", "s3cret"))).await);
        assert!(!cache.check("sb", &a, None).await);
        assert!(!cache.check("sb", &a, Some(b"Bearer x")).await);
        let b = BasicAuth {
            user: "bob".into(),
            password_hash: bcrypt::hash("pw", 4).unwrap(),
        };
        assert!(cache.check("sb", &b, Some(&header("bob", "pw"))).await);
        assert!(!cache.check("sb", &b, Some(&header("bob", "pw2"))).await);
        // A changed password hash is not served from the cache.
        let a2 = BasicAuth {
            user: "alice".into(),
            password_hash: argon("other"),
        };
        assert!(
            !cache
                .check("sb", &a2, Some(&header("alice", "s3cret")))
                .await
        );
    }
}
