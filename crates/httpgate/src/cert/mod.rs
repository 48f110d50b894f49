//! Certificates: the one owner of the gateway's certificate state.
//!
//! [`Certs`] holds the serving certificates, the ACME challenge answers,
//! the managed set with its schedule, the internal CA and the rustls
//! configuration, and hands the rest of the gateway narrow methods: the TLS
//! resolver asks [`Certs::serving_for`] and [`Certs::alpn_challenge`], the
//! plain-HTTP listener [`Certs::http01`]; no other module touches the maps.
//!
//! - `manager.rs`: which names need certificates, issuance, renewal and
//!   deletion of stored records (the only code that deletes them);
//! - `acme.rs`: the ACME client (account, orders, challenges, ARI);
//! - `ca.rs`: the internal CA; `pem.rs`: PEM loading and leaf facts;
//! - `tls.rs`: the rustls server configuration and resolver.
//!
//! Locks: `serving` is an `ArcSwap` (read lock-free per handshake);
//! `challenges` two `RwLock`s (read only by challenge requests); `state`
//! one mutex over the managed set, the certificates read at start and the
//! renewal waiters, held only for moments and never across blocking work
//! or an await; `writes` an async lock that serializes reconciles and the
//! store's writes. A lock poisoned by a panic is recovered (and logged),
//! so no reconcile is ever skipped.

pub(crate) mod acme;
pub(crate) mod ca;
pub(crate) mod manager;
pub(crate) mod pem;
pub(crate) mod tls;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, RwLock};

use arc_swap::ArcSwap;
use rustls::sign::CertifiedKey;
use tokio::sync::Notify;

use self::ca::InternalCa;
use self::manager::Managed;
use crate::gateway::RenewWaiter;
use crate::{CertRecord, CertStore, Error, HttpConfig, RouteSource};

/// The gateway's certificates and everything needed to keep them.
pub(crate) struct Certs {
    config: HttpConfig,
    routes: Arc<dyn RouteSource>,
    store: Arc<dyn CertStore>,
    ca: InternalCa,
    /// Set when the internal CA's root was replaced at this start.
    ca_replaced: Option<String>,
    /// Serving certificates by exact name.
    serving: ArcSwap<HashMap<String, Arc<CertifiedKey>>>,
    challenges: Challenges,
    state: Mutex<State>,
    /// Serializes reconciles and the store's writes (see `manager.rs`).
    writes: tokio::sync::Mutex<()>,
    /// Wakes the manager.
    wake: Notify,
    /// The HTTPS listeners' TLS configuration (see `tls::server_config`).
    tls: OnceLock<Arc<rustls::ServerConfig>>,
}

/// What the manager keeps under [`Certs`]'s state lock.
#[derive(Default)]
pub(crate) struct State {
    /// Managed certificates by primary domain.
    managed: HashMap<String, Managed>,
    /// Certificates read from the store at start, by primary name, not
    /// yet claimed by a route.
    stored: HashMap<String, CertRecord>,
    /// Waiters of forced renewals, by domain.
    renew_waiters: HashMap<String, Vec<RenewWaiter>>,
}

/// The answers to ACME challenges while an order runs.
#[derive(Default)]
struct Challenges {
    /// HTTP-01 token → key authorization.
    http01: RwLock<HashMap<String, String>>,
    /// TLS-ALPN-01 name → challenge certificate.
    alpn01: RwLock<HashMap<String, Arc<CertifiedKey>>>,
}

impl Challenges {
    fn publish_http01(&self, token: String, key_auth: String) {
        write(&self.http01).insert(token, key_auth);
    }

    fn publish_alpn01(&self, name: String, cert: Arc<CertifiedKey>) {
        write(&self.alpn01).insert(name, cert);
    }

    /// Remove the answers of an order that ended.
    fn withdraw(&self, tokens: &[String], names: &[String]) {
        if !tokens.is_empty() {
            let mut m = write(&self.http01);
            for t in tokens {
                m.remove(t);
            }
        }
        if !names.is_empty() {
            let mut m = write(&self.alpn01);
            for n in names {
                m.remove(n);
            }
        }
    }
}

/// The maps hold plain data that a panic cannot leave half-changed: a
/// poisoned lock is taken over.
fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(PoisonError::into_inner)
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}

/// Run `f` on tokio's blocking threads (key generation, signing, file
/// reads, the store's writes); `Err` only if it panicked.
pub(crate) async fn blocking<T, F>(f: F) -> Result<T, String>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| format!("certificate work failed: {e}"))
}

impl Certs {
    /// Restore or create the internal CA and read the stored certificates
    /// (blocking: called once, while the gateway is made). No certificate
    /// is made yet: see [`Certs::reconcile_at_start`].
    pub(crate) fn new(
        config: HttpConfig,
        routes: Arc<dyn RouteSource>,
        store: Arc<dyn CertStore>,
    ) -> Result<Self, Error> {
        let suffixes = &config.internal_suffixes;
        let (ca, ca_replaced) = match store.load_ca() {
            Some(rec) => match InternalCa::from_record(&rec, suffixes)? {
                Some(ca) => (ca, None),
                None => {
                    let (ca, rec) = InternalCa::generate(suffixes)?;
                    store.save_ca(&rec)?;
                    let notice = format!(
                        "the internal CA's root was replaced by one limited to {} \
                         (the old root lacked these name constraints); \
                         internal-mode hosts now use certificates from the new root: \
                         export it with `sandboxd ca-cert` and trust it in place of the old one",
                        suffixes.join(", ")
                    );
                    tracing::warn!("{notice}");
                    (ca, Some(notice))
                }
            },
            None => {
                let (ca, rec) = InternalCa::generate(suffixes)?;
                store.save_ca(&rec)?;
                (ca, None)
            }
        };
        let stored = store
            .load_certs()
            .into_iter()
            .map(|r| (r.name.clone(), r))
            .collect();
        Ok(Self {
            config,
            routes,
            store,
            ca,
            ca_replaced,
            serving: ArcSwap::from_pointee(HashMap::new()),
            challenges: Challenges::default(),
            state: Mutex::new(State {
                stored,
                ..State::default()
            }),
            writes: tokio::sync::Mutex::new(()),
            wake: Notify::new(),
            tls: OnceLock::new(),
        })
    }

    /// The certificate served for `sni` (lowercase, no trailing dot), if
    /// one covers it. Lock-free: one atomic load per handshake.
    #[inline]
    pub(crate) fn serving_for(&self, sni: &str) -> Option<Arc<CertifiedKey>> {
        self.serving.load().get(sni).cloned()
    }

    /// The TLS-ALPN-01 challenge certificate for `sni` while an order
    /// for it runs.
    pub(crate) fn alpn_challenge(&self, sni: &str) -> Option<Arc<CertifiedKey>> {
        read(&self.challenges.alpn01).get(sni).cloned()
    }

    /// The key authorization answering HTTP-01 `token` while its order runs.
    pub(crate) fn http01(&self, token: &str) -> Option<String> {
        read(&self.challenges.http01).get(token).cloned()
    }

    /// Wake the manager (new work, or shutdown).
    pub(crate) fn wake(&self) {
        self.wake.notify_one();
    }

    /// The internal CA's root certificate (PEM).
    pub(crate) fn ca_cert_pem(&self) -> &str {
        self.ca.cert_pem()
    }

    /// Set when this start replaced the internal CA's root.
    pub(crate) fn ca_replaced(&self) -> Option<&str> {
        self.ca_replaced.as_deref()
    }

    /// The state lock. A panic while it was held left plain data behind
    /// (each change is made in one step under the lock): it is taken over,
    /// logged once, and the work goes on.
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| {
            tracing::error!("certificate state lock poisoned by a panic; recovered");
            self.state.clear_poison();
            poisoned.into_inner()
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::{Access, CaRecord, CertMode, Route, RouteKind, StoreError, Target, TlsMode};

    #[derive(Default)]
    struct NoRoutes;
    impl RouteSource for NoRoutes {
        fn lookup(&self, _: &str) -> Option<Arc<Route>> {
            None
        }
        fn hosts(&self) -> Vec<(String, Arc<Route>)> {
            Vec::new()
        }
    }

    /// Routes a test edits.
    #[derive(Default)]
    struct Routes(Mutex<Vec<(String, Arc<Route>)>>);
    impl RouteSource for Routes {
        fn lookup(&self, host: &str) -> Option<Arc<Route>> {
            let r = self.0.lock().unwrap();
            r.iter().find(|(h, _)| h == host).map(|(_, r)| r.clone())
        }
        fn hosts(&self) -> Vec<(String, Arc<Route>)> {
            self.0.lock().unwrap().clone()
        }
    }
    impl Routes {
        fn set(&self, host: &str, tls: TlsMode) {
            let route = Route {
                sandbox: host.to_owned(),
                kind: RouteKind::App,
                target: Target::Stopped,
                access: Access::Open,
                tls,
            };
            let mut r = self.0.lock().unwrap();
            r.retain(|(h, _)| h != host);
            r.push((host.to_owned(), Arc::new(route)));
        }
        fn remove(&self, host: &str) {
            self.0.lock().unwrap().retain(|(h, _)| h != host);
        }
    }

    /// A store that keeps the CA and records which certificates were deleted.
    #[derive(Default)]
    struct Mem(Mutex<Option<CaRecord>>, Mutex<Vec<String>>);
    impl CertStore for Mem {
        fn load_certs(&self) -> Vec<CertRecord> {
            Vec::new()
        }
        fn save_cert(&self, _: &CertRecord) -> Result<(), StoreError> {
            Ok(())
        }
        fn delete_cert(&self, name: &str) -> Result<(), StoreError> {
            self.1.lock().unwrap().push(name.to_owned());
            Ok(())
        }
        fn load_account(&self, _: &str) -> Option<String> {
            None
        }
        fn save_account(&self, _: &str, _: &str) -> Result<(), StoreError> {
            Ok(())
        }
        fn load_ca(&self) -> Option<CaRecord> {
            self.0.lock().unwrap().clone()
        }
        fn save_ca(&self, ca: &CaRecord) -> Result<(), StoreError> {
            *self.0.lock().unwrap() = Some(ca.clone());
            Ok(())
        }
    }

    fn certs() -> Certs {
        crate::install_crypto_provider();
        Certs::new(
            HttpConfig::default(),
            Arc::new(NoRoutes),
            Arc::new(Mem::default()),
        )
        .unwrap()
    }

    #[test]
    fn http01_answers_only_while_published() {
        let c = certs();
        assert_eq!(c.http01("tok"), None);
        c.challenges
            .publish_http01("tok".into(), "tok.thumbprint".into());
        c.challenges
            .publish_http01("other".into(), "other.t".into());
        assert_eq!(c.http01("tok").as_deref(), Some("tok.thumbprint"));
        assert_eq!(c.http01("to"), None, "exact tokens only");
        c.challenges.withdraw(&["tok".to_owned()], &[]);
        assert_eq!(c.http01("tok"), None, "withdrawn with its order");
        assert_eq!(c.http01("other").as_deref(), Some("other.t"));
    }

    #[test]
    fn alpn_challenge_only_for_its_name_while_published() {
        let c = certs();
        let leaf = c
            .issue_internal(&["a.test".to_owned()])
            .expect("internal leaf");
        c.challenges
            .publish_alpn01("a.test".into(), leaf.key.clone());
        assert!(c.alpn_challenge("a.test").is_some());
        assert!(c.alpn_challenge("b.test").is_none());
        assert!(
            c.serving_for("a.test").is_none(),
            "a challenge is not served"
        );
        c.challenges.withdraw(&[], &["a.test".to_owned()]);
        assert!(c.alpn_challenge("a.test").is_none());
    }

    #[test]
    fn serving_for_only_the_names_a_certificate_covers() {
        let c = certs();
        assert!(c.serving_for("a.test").is_none());
        let leaf = c
            .issue_internal(&["a.test".to_owned()])
            .expect("internal leaf");
        let mut st = c.state();
        st.managed.insert(
            "a.test".into(),
            Managed::for_test(vec!["a.test".into(), "b.test".into()], leaf),
        );
        c.rebuild_serving(&st.managed);
        drop(st);
        assert!(c.serving_for("a.test").is_some());
        assert!(
            c.serving_for("b.test").is_none(),
            "a name the certificate lacks gets none"
        );
        assert!(c.serving_for("c.test").is_none());
    }

    #[test]
    fn a_poisoned_state_lock_is_recovered() {
        let c = Arc::new(certs());
        let c2 = c.clone();
        let _ = std::thread::spawn(move || {
            let _g = c2.state();
            panic!("poison it");
        })
        .join();
        assert!(c.state.is_poisoned());
        assert!(c.statuses().is_empty());
        assert!(!c.state.is_poisoned(), "recovered once");
        assert!(c.request_renewal("nothing.test").is_err());
    }

    #[tokio::test]
    async fn reconcile_serves_routed_hosts_and_deletes_only_acme_records() {
        crate::install_crypto_provider();
        let routes = Arc::new(Routes::default());
        let store = Arc::new(Mem::default());
        let c = Arc::new(Certs::new(HttpConfig::default(), routes.clone(), store.clone()).unwrap());
        routes.set("int.test", TlsMode::Internal);
        routes.set("acme.test", TlsMode::Acme);
        assert!(
            c.serving_for("int.test").is_none(),
            "not before the reconcile"
        );
        c.reconcile().await;
        assert!(
            c.serving_for("int.test").is_some(),
            "issued by the reconcile"
        );
        assert!(c.serving_for("acme.test").is_none(), "no ACME directory");
        let modes: Vec<CertMode> = c.statuses().into_iter().map(|s| s.mode).collect();
        assert_eq!(modes, [CertMode::Acme, CertMode::Internal]);
        assert!(store.1.lock().unwrap().is_empty());

        routes.remove("int.test");
        routes.remove("acme.test");
        c.reconcile().await;
        assert!(
            c.serving_for("int.test").is_none(),
            "removed host not served"
        );
        assert!(c.statuses().is_empty());
        assert_eq!(
            *store.1.lock().unwrap(),
            ["acme.test"],
            "the removed ACME host's record is deleted, once; internal leaves none"
        );
    }
}
