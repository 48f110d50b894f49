//! The certificate manager: decides which names need certificates (from the
//! routing snapshot), issues them (internal CA, PEM files, or ACME through
//! instant-acme with HTTP-01 / TLS-ALPN-01), schedules renewals (one third of
//! the lifetime left, or earlier inside the ARI window), backs off on failure
//! while the old certificate keeps serving, and persists ACME certificates.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, BodyWrapper, CertificateIdentifier,
    ChallengeType, Identifier, NewAccount, NewOrder, OrderStatus, RetryPolicy,
};
use rcgen::{CertificateParams, CustomExtension, DistinguishedName, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::oneshot;

use crate::cert::pem::{self as certs, Loaded};
use crate::config::ChallengeKind;
use crate::gateway::Shared;
use crate::{CertRecord, CertSource, CertStatus, Error, RouteKind, TlsMode};

/// How a managed certificate is obtained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Mode {
    Acme,
    Internal,
    Manual { cert: PathBuf, key: PathBuf },
}

impl Mode {
    fn from_tls(t: &TlsMode) -> Self {
        match t {
            TlsMode::Acme => Mode::Acme,
            TlsMode::Internal => Mode::Internal,
            TlsMode::Manual {
                cert_pem_path,
                key_pem_path,
            } => Mode::Manual {
                cert: cert_pem_path.clone(),
                key: key_pem_path.clone(),
            },
        }
    }

    fn label(&self) -> &'static str {
        match self {
            Mode::Acme => "acme",
            Mode::Internal => "internal",
            Mode::Manual { .. } => "manual",
        }
    }
}

/// One domain's certificate and its schedule.
pub(crate) struct Managed {
    pub names: Vec<String>,
    pub mode: Mode,
    pub current: Option<Loaded>,
    /// The certificate's stored record (ACME only), for `replaces`.
    pub record: Option<CertRecord>,
    /// When the next attempt is due, unix milliseconds.
    pub due_ms: Option<i64>,
    pub failures: u32,
    pub last_error: Option<String>,
    /// When to ask the ACME server for renewal information next, unix milliseconds.
    pub ari_check_ms: i64,
}

/// PEM files of `manual` mode are re-read this often, besides on a forced
/// renewal (`sandboxd certs renew DOMAIN`) and when a route names other files.
const MANUAL_RELOAD_MS: i64 = 5 * 60 * 1000;

fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// When to renew a certificate valid from `not_before` to `not_after` (unix
/// seconds): when one third of its lifetime is left. Returns unix milliseconds.
pub(crate) fn renewal_due_ms(not_before: i64, not_after: i64) -> i64 {
    let life = (not_after - not_before).max(0);
    (not_before + life * 2 / 3) * 1000
}

/// Combine the lifetime rule with an ARI suggested window (unix seconds):
/// a uniformly random point inside the window, if earlier than the rule.
pub(crate) fn apply_ari_window(due_ms: i64, start: i64, end: i64, rand01: f64) -> i64 {
    if end < start {
        return due_ms;
    }
    let span = (end - start) as f64 * 1000.0;
    let pick = start * 1000 + (span * rand01.clamp(0.0, 1.0)) as i64;
    due_ms.min(pick)
}

/// Exponential backoff after `failures` consecutive failures, capped.
pub(crate) fn backoff(base: Duration, cap: Duration, failures: u32) -> Duration {
    let shift = failures.saturating_sub(1).min(30);
    base.checked_mul(1u32 << shift).unwrap_or(cap).min(cap)
}

/// The certificates the routing snapshot asks for: primary domain → (names, mode).
fn desired(shared: &Shared) -> HashMap<String, (Vec<String>, Mode)> {
    struct Group {
        app: Option<String>,
        names: BTreeSet<String>,
        mode: Option<Mode>,
    }
    let mut by_sandbox: HashMap<String, Group> = HashMap::new();
    for (host, route) in shared.routes.hosts() {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let g = by_sandbox
            .entry(route.sandbox.clone())
            .or_insert_with(|| Group {
                app: None,
                names: BTreeSet::new(),
                mode: None,
            });
        if route.kind == RouteKind::App {
            g.app = Some(host.clone());
            g.mode = Some(Mode::from_tls(&route.tls));
        } else if g.mode.is_none() {
            g.mode = Some(Mode::from_tls(&route.tls));
        }
        g.names.insert(host);
    }
    let mut out = HashMap::new();
    for g in by_sandbox.into_values() {
        let Some(primary) = g.app.clone().or_else(|| g.names.iter().next().cloned()) else {
            continue;
        };
        let mut names = vec![primary.clone()];
        names.extend(g.names.into_iter().filter(|n| *n != primary));
        let mode = g.mode.unwrap_or(Mode::Acme);
        out.insert(primary, (names, mode));
    }
    out
}

/// Bring the managed set in line with the routing snapshot. Internal and
/// manual certificates are made at once; ACME ones are scheduled.
pub(crate) fn reconcile(shared: &Shared) {
    let want = desired(shared);
    let mut deleted = Vec::new();
    {
        let Ok(mut managed) = shared.managed.lock() else {
            return;
        };
        let now = now_ms();
        managed.retain(|domain, m| match want.get(domain) {
            Some((_, mode)) if *mode == m.mode => true,
            _ => {
                if m.mode == Mode::Acme && !matches!(want.get(domain), Some((_, Mode::Acme))) {
                    deleted.push(domain.clone());
                }
                false
            }
        });
        for (domain, (names, mode)) in want {
            if let Some(m) = managed.get_mut(&domain) {
                if m.names != names {
                    m.names = names;
                    // The old certificate keeps serving the names it covers.
                    m.due_ms = Some(now);
                    m.failures = 0;
                }
                continue;
            }
            let m = new_managed(shared, &domain, names, mode, now);
            managed.insert(domain, m);
        }
        rebuild_serving(shared, &managed);
    }
    for domain in deleted {
        tracing::info!(domain = %domain, "route removed: certificate no longer managed");
        if let Err(e) = shared.store.delete_cert(&domain) {
            tracing::warn!(domain = %domain, error = %e, "could not delete certificate");
        }
    }
}

fn new_managed(shared: &Shared, domain: &str, names: Vec<String>, mode: Mode, now: i64) -> Managed {
    let mut m = Managed {
        names,
        mode,
        current: None,
        record: None,
        due_ms: Some(now),
        failures: 0,
        last_error: None,
        ari_check_ms: i64::MAX,
    };
    match m.mode.clone() {
        Mode::Internal => issue_internal(shared, &mut m, now),
        Mode::Manual { cert, key } => load_manual(&mut m, &cert, &key, now),
        Mode::Acme => {
            let rec = shared.stored.lock().ok().and_then(|mut s| s.remove(domain));
            if let Some(rec) = rec {
                match certs::load_pem(rec.cert_pem.as_bytes(), rec.key_pem.as_bytes()) {
                    Ok(loaded) if loaded.not_after * 1000 > now => {
                        let covers = m.names.iter().all(|n| loaded.names.contains(n));
                        m.due_ms = Some(if covers {
                            renewal_due_ms(loaded.not_before, loaded.not_after)
                        } else {
                            now
                        });
                        m.ari_check_ms = now;
                        m.current = Some(loaded);
                        m.record = Some(rec);
                    }
                    Ok(_) => tracing::info!(domain, "stored certificate expired"),
                    Err(e) => tracing::warn!(domain, error = %e, "stored certificate unreadable"),
                }
            }
            if shared.config.acme_directory.is_none() {
                m.last_error = Some("no ACME directory configured".into());
                m.due_ms = None;
            }
        }
    }
    m
}

fn issue_internal(shared: &Shared, m: &mut Managed, now: i64) {
    match shared
        .ca
        .issue(&m.names, shared.config.internal_leaf_validity)
    {
        Ok(loaded) => {
            m.due_ms = Some(renewal_due_ms(loaded.not_before, loaded.not_after));
            m.current = Some(loaded);
            m.failures = 0;
            m.last_error = None;
        }
        Err(e) => fail(shared, m, e, now),
    }
}

fn load_manual(m: &mut Managed, cert: &PathBuf, key: &PathBuf, now: i64) {
    let read = |what: &str, p: &PathBuf| {
        std::fs::read(p).map_err(|e| format!("cannot read {what} file {}: {e}", p.display()))
    };
    // A key others can read is refused (the operator is told in `certs`).
    let private = |p: &PathBuf| {
        use std::os::unix::fs::PermissionsExt;
        match std::fs::metadata(p) {
            Ok(meta) if meta.permissions().mode() & 0o077 != 0 => Err(format!(
                "key file {} is readable by other users (mode {:04o}): chmod 600 it",
                p.display(),
                meta.permissions().mode() & 0o7777
            )),
            _ => Ok(()),
        }
    };
    let res = read("certificate", cert)
        .and_then(|c| private(key).and_then(|()| read("key", key)).map(|k| (c, k)))
        .and_then(|(c, k)| {
            certs::load_pem(&c, &k)
                .map_err(|e| format!("{} and {}: {e}", cert.display(), key.display()))
        });
    match res {
        Ok(loaded) => {
            let missing: Vec<&str> = m
                .names
                .iter()
                .filter(|n| !loaded.names.contains(n))
                .map(String::as_str)
                .collect();
            // Served for the names it covers; the others are refused and said so.
            m.last_error = (!missing.is_empty())
                .then(|| format!("{} does not cover {}", cert.display(), missing.join(", ")));
            m.current = Some(loaded);
            m.failures = 0;
        }
        // The certificate loaded before (if any) keeps serving.
        Err(e) => m.last_error = Some(e),
    }
    m.due_ms = Some(now + MANUAL_RELOAD_MS);
}

fn fail(shared: &Shared, m: &mut Managed, err: String, now: i64) {
    m.failures = m.failures.saturating_add(1);
    let delay = backoff(
        shared.config.acme_backoff_base,
        shared.config.acme_backoff_cap,
        m.failures,
    );
    m.due_ms = Some(now + delay.as_millis() as i64);
    m.last_error = Some(err);
}

/// Publish the serving map from the managed set.
fn rebuild_serving(shared: &Shared, managed: &HashMap<String, Managed>) {
    let mut map = HashMap::new();
    for m in managed.values() {
        if let Some(cur) = &m.current {
            for n in &m.names {
                if cur.names.iter().any(|c| c == n) {
                    map.insert(n.clone(), cur.key.clone());
                }
            }
        }
    }
    shared.serving.store(Arc::new(map));
}

pub(crate) fn statuses(shared: &Shared) -> Vec<CertStatus> {
    let Ok(managed) = shared.managed.lock() else {
        return Vec::new();
    };
    let mut out: Vec<CertStatus> = managed
        .iter()
        .map(|(domain, m)| CertStatus {
            domain: domain.clone(),
            names: m.names.clone(),
            mode: m.mode.label().to_owned(),
            issuer: m.current.as_ref().map(|c| c.issuer.clone()),
            not_after: m
                .current
                .as_ref()
                .and_then(|c| certs::to_datetime(c.not_after)),
            next_renewal: m.due_ms.and_then(|ms| {
                time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok()
            }),
            last_error: m.last_error.clone(),
        })
        .collect();
    out.sort_by(|a, b| a.domain.cmp(&b.domain));
    out
}

pub(crate) fn request_renewal(
    shared: &Shared,
    name: &str,
) -> Result<oneshot::Receiver<Result<(), String>>, Error> {
    let (tx, rx) = oneshot::channel();
    {
        let mut managed = shared
            .managed
            .lock()
            .map_err(|_| Error::Acme("state poisoned".into()))?;
        let domain = if managed.contains_key(name) {
            name.to_owned()
        } else {
            managed
                .iter()
                .find(|(_, m)| m.names.iter().any(|n| n == name))
                .map(|(d, _)| d.clone())
                .ok_or_else(|| Error::UnknownDomain(name.to_owned()))?
        };
        if let Some(m) = managed.get_mut(&domain) {
            m.due_ms = Some(now_ms());
        }
        if let Ok(mut w) = shared.renew_waiters.lock() {
            w.entry(domain).or_default().push(tx);
        }
    }
    shared.wake.notify_one();
    Ok(rx)
}

fn finish_waiters(shared: &Shared, domain: &str, res: &Result<(), String>) {
    let waiters = shared
        .renew_waiters
        .lock()
        .ok()
        .and_then(|mut w| w.remove(domain))
        .unwrap_or_default();
    for w in waiters {
        let _ = w.send(res.clone());
    }
}

/// What the manager takes out of the lock to work on.
struct Job {
    domain: String,
    names: Vec<String>,
    mode: Mode,
    failures: u32,
    replaces: Option<CertificateDer<'static>>,
}

/// The manager task: runs due work, then sleeps until the next due time or a wake-up.
pub(crate) async fn run_manager(shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.subscribe();
    let mut acme = AcmeClient::default();
    loop {
        if *shutdown.borrow() {
            break;
        }
        let now = now_ms();
        let jobs: Vec<Job> = match shared.managed.lock() {
            Ok(managed) => managed
                .iter()
                .filter(|(_, m)| m.due_ms.is_some_and(|d| d <= now))
                .map(|(d, m)| Job {
                    domain: d.clone(),
                    names: m.names.clone(),
                    mode: m.mode.clone(),
                    failures: m.failures,
                    replaces: m.current.as_ref().and_then(|c| c.key.cert.first().cloned()),
                })
                .collect(),
            Err(_) => break,
        };
        for job in jobs {
            let res = run_job(&shared, &mut acme, &job).await;
            finish_waiters(&shared, &job.domain, &res);
        }
        check_ari(&shared, &mut acme).await;
        let next = shared.managed.lock().ok().and_then(|m| {
            m.values()
                .flat_map(|m| {
                    [
                        m.due_ms,
                        (m.ari_check_ms != i64::MAX).then_some(m.ari_check_ms),
                    ]
                })
                .flatten()
                .min()
        });
        let sleep = match next {
            Some(t) => Duration::from_millis((t - now_ms()).clamp(0, 3_600_000) as u64),
            None => Duration::from_secs(3600),
        };
        tokio::select! {
            _ = tokio::time::sleep(sleep) => {}
            _ = shared.wake.notified() => {}
            _ = shutdown.changed() => {}
        }
    }
}

async fn run_job(shared: &Arc<Shared>, acme: &mut AcmeClient, job: &Job) -> Result<(), String> {
    let now = now_ms();
    match &job.mode {
        Mode::Internal | Mode::Manual { .. } => {
            let mut managed = shared.managed.lock().map_err(|_| "poisoned".to_owned())?;
            let Some(m) = managed.get_mut(&job.domain) else {
                return Err("route removed".into());
            };
            match job.mode.clone() {
                Mode::Manual { cert, key } => load_manual(m, &cert, &key, now),
                _ => issue_internal(shared, m, now),
            }
            let res = match &m.last_error {
                Some(e) => Err(e.clone()),
                None => Ok(()),
            };
            rebuild_serving(shared, &managed);
            res
        }
        Mode::Acme => {
            let kind = pick_challenge(&shared.config.acme_challenges, job.failures);
            tracing::info!(domain = %job.domain, names = ?job.names, challenge = ?kind, "ordering certificate");
            let attempt = tokio::time::timeout(
                shared.config.acme_order_timeout,
                acme.issue(shared, &job.names, kind, job.replaces.as_ref()),
            )
            .await
            .unwrap_or_else(|_| Err("order timed out".into()));
            let res = attempt.and_then(|(chain_pem, key_pem)| {
                let loaded = certs::load_pem(chain_pem.as_bytes(), key_pem.as_bytes())?;
                let rec = CertRecord {
                    name: job.domain.clone(),
                    names: job.names.clone(),
                    cert_pem: chain_pem,
                    key_pem,
                    source: CertSource::Acme {
                        directory: shared.config.acme_directory.clone().unwrap_or_default(),
                    },
                    not_after: loaded.not_after,
                    not_before: loaded.not_before,
                };
                Ok((loaded, rec))
            });
            let mut managed = shared.managed.lock().map_err(|_| "poisoned".to_owned())?;
            let Some(m) = managed.get_mut(&job.domain) else {
                return Err("route removed".into());
            };
            if m.names != job.names || m.mode != Mode::Acme {
                // The route changed while ordering; the next round orders again.
                return Err("route changed while ordering".into());
            }
            match res {
                Ok((loaded, rec)) => {
                    tracing::info!(domain = %job.domain, not_after = loaded.not_after, "certificate issued");
                    if let Err(e) = shared.store.save_cert(&rec) {
                        tracing::warn!(domain = %job.domain, error = %e, "could not persist certificate");
                    }
                    m.due_ms = Some(renewal_due_ms(loaded.not_before, loaded.not_after));
                    m.current = Some(loaded);
                    m.record = Some(rec);
                    m.failures = 0;
                    m.last_error = None;
                    m.ari_check_ms = if acme.ari_supported == Some(false) {
                        i64::MAX
                    } else {
                        now_ms()
                    };
                    rebuild_serving(shared, &managed);
                    Ok(())
                }
                Err(e) => {
                    tracing::warn!(domain = %job.domain, error = %e, failures = m.failures + 1, "certificate order failed");
                    fail(shared, m, e.clone(), now_ms());
                    Err(e)
                }
            }
        }
    }
}

/// An error and its causes, `outer: inner: innermost`, so that a refused
/// connection or a certificate the ACME server's TLS fails with is named.
fn causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let s = c.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = c.source();
    }
    out
}

fn pick_challenge(prefs: &[ChallengeKind], failures: u32) -> ChallengeKind {
    if prefs.is_empty() {
        return ChallengeKind::Http01;
    }
    prefs[(failures as usize) % prefs.len()]
}

/// Ask the ACME server for renewal windows of certificates whose check is due.
async fn check_ari(shared: &Arc<Shared>, acme: &mut AcmeClient) {
    if acme.ari_supported == Some(false) {
        return;
    }
    let now = now_ms();
    let due: Vec<(String, CertificateDer<'static>)> = match shared.managed.lock() {
        Ok(m) => m
            .iter()
            .filter(|(_, m)| m.mode == Mode::Acme && m.ari_check_ms <= now)
            .filter_map(|(d, m)| {
                m.current
                    .as_ref()
                    .and_then(|c| c.key.cert.first().cloned())
                    .map(|c| (d.clone(), c))
            })
            .collect(),
        Err(_) => return,
    };
    for (domain, der) in due {
        let outcome = acme.renewal_window(shared, &der).await;
        let Ok(mut managed) = shared.managed.lock() else {
            return;
        };
        let Some(m) = managed.get_mut(&domain) else {
            continue;
        };
        match outcome {
            AriOutcome::Window {
                start,
                end,
                retry_after,
            } => {
                if let Some(due) = m.due_ms {
                    let picked = apply_ari_window(due, start, end, rand::random::<f64>());
                    if picked < due {
                        tracing::info!(domain = %domain, "ARI window moves renewal earlier");
                    }
                    m.due_ms = Some(picked);
                }
                let wait = retry_after.clamp(Duration::from_secs(3600), Duration::from_secs(86400));
                m.ari_check_ms = now_ms() + wait.as_millis() as i64;
            }
            AriOutcome::Unsupported => m.ari_check_ms = i64::MAX,
            AriOutcome::Failed => m.ari_check_ms = now_ms() + 3_600_000,
        }
    }
}

enum AriOutcome {
    Window {
        start: i64,
        end: i64,
        retry_after: Duration,
    },
    Unsupported,
    Failed,
}

/// The ACME account, created once per directory and persisted.
#[derive(Default)]
struct AcmeClient {
    account: Option<Account>,
    ari_supported: Option<bool>,
}

impl AcmeClient {
    async fn account(&mut self, shared: &Shared) -> Result<Account, String> {
        if let Some(a) = &self.account {
            return Ok(a.clone());
        }
        let dir = shared
            .config
            .acme_directory
            .clone()
            .ok_or_else(|| "no ACME directory configured".to_owned())?;
        let builder = || -> Result<instant_acme::AccountBuilder, String> {
            match &shared.config.acme_ca_root_pem {
                Some(pem) => {
                    let mut roots = rustls::RootCertStore::empty();
                    for c in rustls_pemfile::certs(&mut &pem[..]) {
                        let c = c.map_err(|e| format!("ACME root PEM: {e}"))?;
                        roots.add(c).map_err(|e| format!("ACME root: {e}"))?;
                    }
                    let tls = rustls::ClientConfig::builder()
                        .with_root_certificates(roots)
                        .with_no_client_auth();
                    let connector = hyper_rustls::HttpsConnectorBuilder::new()
                        .with_tls_config(tls)
                        .https_only()
                        .enable_http1()
                        .enable_http2()
                        .build();
                    let client: HyperClient<_, BodyWrapper<Bytes>> =
                        HyperClient::builder(TokioExecutor::new()).build(connector);
                    Ok(Account::builder_with_http(Box::new(client)))
                }
                None => Account::builder().map_err(|e| e.to_string()),
            }
        };
        let account = match shared.store.load_account(&dir) {
            Some(creds) => {
                let creds: AccountCredentials =
                    serde_json::from_str(&creds).map_err(|e| format!("stored account: {e}"))?;
                builder()?
                    .from_credentials(creds)
                    .await
                    .map_err(|e| format!("ACME account: {}", causes(&e)))?
            }
            None => {
                let contact = shared
                    .config
                    .acme_email
                    .as_ref()
                    .map(|e| format!("mailto:{e}"));
                let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
                let (account, creds) = builder()?
                    .create(
                        &NewAccount {
                            contact: &contacts,
                            terms_of_service_agreed: true,
                            only_return_existing: false,
                        },
                        dir.clone(),
                        None,
                    )
                    .await
                    .map_err(|e| format!("ACME account: {}", causes(&e)))?;
                let creds = serde_json::to_string(&creds).map_err(|e| e.to_string())?;
                shared
                    .store
                    .save_account(&dir, &creds)
                    .map_err(|e| e.to_string())?;
                tracing::info!(directory = %dir, "ACME account created");
                account
            }
        };
        self.account = Some(account.clone());
        Ok(account)
    }

    async fn renewal_window(&mut self, shared: &Shared, der: &CertificateDer<'_>) -> AriOutcome {
        let Ok(account) = self.account(shared).await else {
            return AriOutcome::Failed;
        };
        let Ok(id) = CertificateIdentifier::try_from(der) else {
            return AriOutcome::Failed;
        };
        match account.renewal_info(&id).await {
            Ok((info, retry_after)) => {
                self.ari_supported = Some(true);
                AriOutcome::Window {
                    start: info.suggested_window.start.unix_timestamp(),
                    end: info.suggested_window.end.unix_timestamp(),
                    retry_after,
                }
            }
            Err(instant_acme::Error::Unsupported(_)) => {
                self.ari_supported = Some(false);
                AriOutcome::Unsupported
            }
            Err(e) => {
                tracing::debug!(error = %e, "ARI lookup failed");
                AriOutcome::Failed
            }
        }
    }

    /// One complete order. Returns (chain PEM, key PEM).
    async fn issue(
        &mut self,
        shared: &Shared,
        names: &[String],
        kind: ChallengeKind,
        replaces: Option<&CertificateDer<'static>>,
    ) -> Result<(String, String), String> {
        let account = self.account(shared).await?;
        let ids: Vec<Identifier> = names.iter().map(|n| Identifier::Dns(n.clone())).collect();
        let replaces_id = replaces
            .filter(|_| self.ari_supported == Some(true))
            .and_then(|der| CertificateIdentifier::try_from(der).ok());
        let mut order = match replaces_id {
            Some(id) => match account.new_order(&NewOrder::new(&ids).replaces(id)).await {
                Ok(o) => o,
                Err(e) => {
                    tracing::info!(error = %e, "order with `replaces` refused, ordering without");
                    account
                        .new_order(&NewOrder::new(&ids))
                        .await
                        .map_err(|e| format!("new order: {}", causes(&e)))?
                }
            },
            None => account
                .new_order(&NewOrder::new(&ids))
                .await
                .map_err(|e| format!("new order: {}", causes(&e)))?,
        };
        let mut guard = ChallengeGuard {
            shared,
            tokens: Vec::new(),
            alpn_names: Vec::new(),
        };
        {
            let mut authzs = order.authorizations();
            while let Some(authz) = authzs.next().await {
                let mut authz = authz.map_err(|e| format!("authorization: {}", causes(&e)))?;
                match authz.status {
                    AuthorizationStatus::Valid => continue,
                    AuthorizationStatus::Pending => {}
                    other => return Err(format!("authorization is {other:?}")),
                }
                let offered: Vec<ChallengeType> =
                    authz.challenges.iter().map(|c| c.r#type.clone()).collect();
                let want = match kind {
                    ChallengeKind::Http01 => ChallengeType::Http01,
                    ChallengeKind::TlsAlpn01 => ChallengeType::TlsAlpn01,
                };
                let ctype = if offered.contains(&want) {
                    want
                } else if offered.contains(&ChallengeType::Http01) {
                    ChallengeType::Http01
                } else if offered.contains(&ChallengeType::TlsAlpn01) {
                    ChallengeType::TlsAlpn01
                } else {
                    return Err("no supported challenge offered".into());
                };
                let mut ch = authz
                    .challenge(ctype.clone())
                    .ok_or_else(|| "challenge vanished".to_owned())?;
                let ka = ch.key_authorization();
                let name = match ch.identifier().identifier {
                    Identifier::Dns(n) => n.clone(),
                    other => return Err(format!("unsupported identifier {other:?}")),
                };
                if ctype == ChallengeType::Http01 {
                    guard.add_http01(ch.token.clone(), ka.as_str().to_owned());
                } else {
                    guard.add_alpn01(&name, ka.digest().as_ref())?;
                }
                ch.set_ready()
                    .await
                    .map_err(|e| format!("challenge ready: {}", causes(&e)))?;
            }
        }
        let retry = RetryPolicy::new()
            .initial_delay(Duration::from_millis(100))
            .backoff(1.5)
            .timeout(shared.config.acme_order_timeout);
        let status = order
            .poll_ready(&retry)
            .await
            .map_err(|e| format!("order: {}", causes(&e)))?;
        if status != OrderStatus::Ready {
            let detail = order
                .state()
                .error
                .as_ref()
                .map(|p| p.to_string())
                .unwrap_or_default();
            return Err(format!("order is {status:?} {detail}").trim().to_owned());
        }
        drop(guard);
        let key = KeyPair::generate().map_err(|e| e.to_string())?;
        let mut params = CertificateParams::new(names.to_vec()).map_err(|e| e.to_string())?;
        params.distinguished_name = DistinguishedName::new();
        let csr = params.serialize_request(&key).map_err(|e| e.to_string())?;
        order
            .finalize_csr(csr.der())
            .await
            .map_err(|e| format!("finalize: {}", causes(&e)))?;
        let chain = order
            .poll_certificate(&retry)
            .await
            .map_err(|e| format!("certificate: {}", causes(&e)))?;
        Ok((chain, key.serialize_pem()))
    }
}

/// Removes published challenge answers when an order attempt ends.
struct ChallengeGuard<'a> {
    shared: &'a Shared,
    tokens: Vec<String>,
    alpn_names: Vec<String>,
}

impl ChallengeGuard<'_> {
    fn add_http01(&mut self, token: String, key_auth: String) {
        if let Ok(mut m) = self.shared.http01.write() {
            m.insert(token.clone(), key_auth);
        }
        self.tokens.push(token);
    }

    fn add_alpn01(&mut self, name: &str, digest: &[u8]) -> Result<(), String> {
        let key = KeyPair::generate().map_err(|e| e.to_string())?;
        let mut params =
            CertificateParams::new(vec![name.to_owned()]).map_err(|e| e.to_string())?;
        params.custom_extensions = vec![CustomExtension::new_acme_identifier(digest)];
        let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signer =
            rustls::crypto::ring::sign::any_supported_type(&key_der).map_err(|e| e.to_string())?;
        let ck = rustls::sign::CertifiedKey::new(vec![cert.der().clone()], signer);
        if let Ok(mut m) = self.shared.alpn01.write() {
            m.insert(name.to_owned(), Arc::new(ck));
        }
        self.alpn_names.push(name.to_owned());
        Ok(())
    }
}

impl Drop for ChallengeGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut m) = self.shared.http01.write() {
            for t in &self.tokens {
                m.remove(t);
            }
        }
        if let Ok(mut m) = self.shared.alpn01.write() {
            for n in &self.alpn_names {
                m.remove(n);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_at_one_third_left() {
        // 90 days from t=0: due at day 60.
        let day = 86_400;
        assert_eq!(renewal_due_ms(0, 90 * day), 60 * day * 1000);
    }

    #[test]
    fn ari_window_only_moves_renewal_earlier() {
        let due = 1_000_000_000;
        // Window entirely before the lifetime rule: a point inside it.
        let picked = apply_ari_window(due, 100, 200, 0.5);
        assert_eq!(picked, 150_000);
        // Window after the rule: the rule stands.
        assert_eq!(apply_ari_window(due, 2_000_000, 3_000_000, 0.0), due);
        // Inverted window from a broken server: ignored.
        assert_eq!(apply_ari_window(due, 200, 100, 0.5), due);
    }

    #[test]
    fn ari_recorded_response_parses_and_applies() {
        // A renewal-info response as served by a CA that offers ARI (RFC 9773 example).
        let body = r#"{"suggestedWindow":{"start":"2025-01-02T04:00:00Z","end":"2025-01-03T04:00:00Z"},"explanationURL":"https://acme.example.com/docs/ari"}"#;
        let info: instant_acme::RenewalInfo =
            serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}"));
        let start = info.suggested_window.start.unix_timestamp();
        let end = info.suggested_window.end.unix_timestamp();
        assert_eq!(end - start, 86_400);
        let due_far = (end + 10 * 86_400) * 1000;
        let picked = apply_ari_window(due_far, start, end, 0.25);
        assert_eq!(picked, (start + 21_600) * 1000);
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let base = Duration::from_secs(60);
        let cap = Duration::from_secs(3600);
        assert_eq!(backoff(base, cap, 1), Duration::from_secs(60));
        assert_eq!(backoff(base, cap, 2), Duration::from_secs(120));
        assert_eq!(backoff(base, cap, 4), Duration::from_secs(480));
        assert_eq!(backoff(base, cap, 7), cap);
        assert_eq!(backoff(base, cap, 400), cap);
    }
}
