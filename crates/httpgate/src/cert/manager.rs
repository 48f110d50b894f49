//! The certificate manager: decides which names need certificates (from the
//! routing snapshot), issues them (internal CA, PEM files, or ACME through
//! `acme.rs` with HTTP-01 / TLS-ALPN-01), schedules renewals (one third of
//! the lifetime left, or earlier inside the ARI window), backs off on failure
//! while the old certificate keeps serving, persists ACME certificates, and
//! deletes the stored record of a certificate no route needs any more, and
//! at its first reconcile the stored records of names no route uses (the
//! only code that deletes certificate records; the ACME account and the
//! internal CA are other records, never deleted).
//!
//! Its state is [`Certs`]'s (see `mod.rs`). The managed set changes under
//! the state lock only for moments: signing, PEM file reads and the
//! store's writes run on the blocking threads with no lock held, and their
//! outcome is applied afterwards. Changes to the managed set and the
//! store's writes are serialized by `Certs::writes` (an async lock), so a
//! record is never written back after the reconcile that deleted it.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use tokio::sync::{oneshot, watch};

use super::acme::{AcmeClient, AriOutcome};
use super::pem::{self, Loaded};
use super::{blocking, Certs, State};
use crate::config::ChallengeKind;
use crate::{CertMode, CertRecord, CertSource, CertStatus, Error, RouteKind, RouteSource, TlsMode};

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

    fn kind(&self) -> CertMode {
        match self {
            Mode::Acme => CertMode::Acme,
            Mode::Internal => CertMode::Internal,
            Mode::Manual { .. } => CertMode::Manual,
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

#[cfg(test)]
impl Managed {
    /// An internal-mode entry holding `current`.
    pub(super) fn for_test(names: Vec<String>, current: Loaded) -> Self {
        Self {
            names,
            mode: Mode::Internal,
            current: Some(current),
            record: None,
            due_ms: None,
            failures: 0,
            last_error: None,
            ari_check_ms: i64::MAX,
        }
    }
}

/// PEM files of `manual` mode are re-read this often, besides on a forced
/// renewal (`sandboxd certs renew DOMAIN`) and when a route names other files.
const MANUAL_RELOAD_MS: i64 = 5 * 60 * 1000;

pub(super) fn now_ms() -> i64 {
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
fn desired(routes: &dyn RouteSource) -> HashMap<String, (Vec<String>, Mode)> {
    struct Group {
        app: Option<String>,
        names: BTreeSet<String>,
        mode: Option<Mode>,
    }
    let mut by_sandbox: HashMap<String, Group> = HashMap::new();
    for (host, route) in routes.hosts() {
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

/// What a reconcile found to do outside the state lock.
pub(super) struct Plan {
    /// New domains: names, mode, and the stored record (ACME) to resume from.
    make: Vec<(String, Vec<String>, Mode, Option<CertRecord>)>,
    /// Domains whose stored ACME certificate no route needs any more, and
    /// stored records of names no route uses.
    delete: Vec<String>,
    now: i64,
}

/// The outcome of a [`Plan`], to apply under the state lock.
pub(super) struct Made {
    managed: Vec<(String, Managed)>,
}

impl Certs {
    /// Bring the managed set in line with the routing snapshot: domains no
    /// route needs stop serving at once and their stored records are
    /// deleted, as are stored records of names no route uses; internal and manual certificates of new domains are made
    /// (on the blocking threads) before this returns; ACME ones are
    /// scheduled. Reconciles run one at a time.
    pub(crate) async fn reconcile(self: &Arc<Self>) {
        let _writes = self.writes.lock().await;
        let plan = self.plan();
        let this = self.clone();
        match blocking(move || this.carry_out(plan)).await {
            Ok(made) => self.apply(made),
            // Only a panic gets here; the domains not made are planned
            // again by the next reconcile.
            Err(e) => tracing::error!(error = %e, "certificate reconcile failed"),
        }
    }

    /// [`Certs::reconcile`] in the caller's thread, for the gateway's
    /// construction (before any listener serves or the manager runs).
    pub(crate) fn reconcile_at_start(&self) {
        let plan = self.plan();
        let made = self.carry_out(plan);
        self.apply(made);
    }

    /// The first step of a reconcile, under the state lock: drop the
    /// domains no route needs (they stop serving now), update the names of
    /// the others, and list what to make and delete.
    fn plan(&self) -> Plan {
        let want = desired(&*self.routes);
        let now = now_ms();
        let mut st = self.state();
        let mut delete = Vec::new();
        // Stored records no route uses (a sandbox removed while the daemon
        // was down, records restored from a backup): deleted at the first
        // reconcile. Records of routed names wait for their domain.
        st.stored.retain(|name, _| {
            let routed = want.values().any(|(names, _)| names.contains(name));
            if !routed {
                delete.push(name.clone());
            }
            routed
        });
        st.managed.retain(|domain, m| match want.get(domain) {
            Some((_, mode)) if *mode == m.mode => true,
            _ => {
                if m.mode == Mode::Acme && !matches!(want.get(domain), Some((_, Mode::Acme))) {
                    delete.push(domain.clone());
                }
                false
            }
        });
        let mut make = Vec::new();
        for (domain, (names, mode)) in want {
            if let Some(m) = st.managed.get_mut(&domain) {
                if m.names != names {
                    m.names = names;
                    // The old certificate keeps serving the names it covers.
                    m.due_ms = Some(now);
                    m.failures = 0;
                }
                continue;
            }
            let stored = match mode {
                Mode::Acme => st.stored.remove(&domain),
                _ => None,
            };
            make.push((domain, names, mode, stored));
        }
        self.rebuild_serving(&st.managed);
        Plan { make, delete, now }
    }

    /// The blocking step of a reconcile, with no lock held: delete records,
    /// issue internal certificates, read PEM files, parse stored ones.
    fn carry_out(&self, plan: Plan) -> Made {
        for domain in plan.delete {
            tracing::info!(domain = %domain, "no route uses it: certificate record deleted");
            if let Err(e) = self.store.delete_cert(&domain) {
                tracing::warn!(domain = %domain, error = %e, "could not delete certificate");
            }
        }
        let managed = plan
            .make
            .into_iter()
            .map(|(domain, names, mode, stored)| {
                let m = self.new_managed(&domain, names, mode, stored, plan.now);
                (domain, m)
            })
            .collect();
        Made { managed }
    }

    /// The last step of a reconcile, under the state lock.
    fn apply(&self, made: Made) {
        let mut st = self.state();
        st.managed.extend(made.managed);
        self.rebuild_serving(&st.managed);
    }

    /// A newly routed domain's entry, its certificate made or loaded
    /// (blocking: runs on the blocking threads or at construction).
    fn new_managed(
        &self,
        domain: &str,
        names: Vec<String>,
        mode: Mode,
        stored: Option<CertRecord>,
        now: i64,
    ) -> Managed {
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
            Mode::Internal => {
                let res = self.issue_internal(&m.names);
                self.internal_done(&mut m, res, now);
            }
            Mode::Manual { cert, key } => {
                let res = read_manual(&cert, &key);
                manual_done(&mut m, res, &cert, now);
            }
            Mode::Acme => {
                if let Some(rec) = stored {
                    match pem::load_pem(rec.cert_pem.as_bytes(), rec.key_pem.as_bytes()) {
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
                        Err(e) => {
                            tracing::warn!(domain, error = %e, "stored certificate unreadable")
                        }
                    }
                }
                if self.config.acme_directory.is_none() {
                    m.last_error = Some("no ACME directory configured".into());
                    m.due_ms = None;
                }
            }
        }
        m
    }

    /// A leaf from the internal CA (blocking: key generation and signing).
    pub(super) fn issue_internal(&self, names: &[String]) -> Result<Loaded, String> {
        self.ca.issue(names, self.config.internal_leaf_validity)
    }

    fn internal_done(&self, m: &mut Managed, res: Result<Loaded, String>, now: i64) {
        match res {
            Ok(loaded) => {
                m.due_ms = Some(renewal_due_ms(loaded.not_before, loaded.not_after));
                m.current = Some(loaded);
                m.failures = 0;
                m.last_error = None;
            }
            Err(e) => self.fail(m, e, now),
        }
    }

    fn fail(&self, m: &mut Managed, err: String, now: i64) {
        m.failures = m.failures.saturating_add(1);
        let delay = backoff(
            self.config.acme_backoff_base,
            self.config.acme_backoff_cap,
            m.failures,
        );
        m.due_ms = Some(now + delay.as_millis() as i64);
        m.last_error = Some(err);
    }

    /// Publish the serving map from the managed set.
    pub(super) fn rebuild_serving(&self, managed: &HashMap<String, Managed>) {
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
        self.serving.store(Arc::new(map));
    }

    /// The state of every managed certificate, sorted by domain.
    pub(crate) fn statuses(&self) -> Vec<CertStatus> {
        let st = self.state();
        let mut out: Vec<CertStatus> = st
            .managed
            .iter()
            .map(|(domain, m)| CertStatus {
                domain: domain.clone(),
                names: m.names.clone(),
                mode: m.mode.kind(),
                issuer: m.current.as_ref().map(|c| c.issuer.clone()),
                not_after: m
                    .current
                    .as_ref()
                    .and_then(|c| pem::to_datetime(c.not_after)),
                next_renewal: m.due_ms.and_then(|ms| {
                    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok()
                }),
                last_error: m.last_error.clone(),
            })
            .collect();
        out.sort_by(|a, b| a.domain.cmp(&b.domain));
        out
    }

    /// Make the certificate covering `name` due now; the receiver gets the
    /// outcome of the attempt.
    pub(crate) fn request_renewal(
        &self,
        name: &str,
    ) -> Result<oneshot::Receiver<Result<(), String>>, Error> {
        let (tx, rx) = oneshot::channel();
        {
            let mut st = self.state();
            let domain = if st.managed.contains_key(name) {
                name.to_owned()
            } else {
                st.managed
                    .iter()
                    .find(|(_, m)| m.names.iter().any(|n| n == name))
                    .map(|(d, _)| d.clone())
                    .ok_or_else(|| Error::UnknownDomain(name.to_owned()))?
            };
            if let Some(m) = st.managed.get_mut(&domain) {
                m.due_ms = Some(now_ms());
            }
            st.renew_waiters.entry(domain).or_default().push(tx);
        }
        self.wake.notify_one();
        Ok(rx)
    }

    fn finish_waiters(&self, domain: &str, res: &Result<(), String>) {
        let waiters = self
            .state()
            .renew_waiters
            .remove(domain)
            .unwrap_or_default();
        for w in waiters {
            let _ = w.send(res.clone());
        }
    }

    /// The manager task: runs due work, then sleeps until the next due
    /// time, a wake-up or `shutdown`.
    pub(crate) async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut acme = AcmeClient::default();
        loop {
            if *shutdown.borrow() {
                break;
            }
            let now = now_ms();
            let jobs: Vec<Job> = self
                .state()
                .managed
                .iter()
                .filter(|(_, m)| m.due_ms.is_some_and(|d| d <= now))
                .map(|(d, m)| Job {
                    domain: d.clone(),
                    names: m.names.clone(),
                    mode: m.mode.clone(),
                    failures: m.failures,
                    replaces: m.current.as_ref().and_then(|c| c.key.cert.first().cloned()),
                })
                .collect();
            for job in jobs {
                let res = self.run_job(&mut acme, &job).await;
                self.finish_waiters(&job.domain, &res);
            }
            self.check_ari(&mut acme).await;
            let next = self
                .state()
                .managed
                .values()
                .flat_map(|m| {
                    [
                        m.due_ms,
                        (m.ari_check_ms != i64::MAX).then_some(m.ari_check_ms),
                    ]
                })
                .flatten()
                .min();
            let sleep = match next {
                Some(t) => Duration::from_millis((t - now_ms()).clamp(0, 3_600_000) as u64),
                None => Duration::from_secs(3600),
            };
            tokio::select! {
                _ = tokio::time::sleep(sleep) => {}
                _ = self.wake.notified() => {}
                _ = shutdown.changed() => {}
            }
        }
    }

    async fn run_job(self: &Arc<Self>, acme: &mut AcmeClient, job: &Job) -> Result<(), String> {
        match &job.mode {
            Mode::Internal | Mode::Manual { .. } => {
                let _writes = self.writes.lock().await;
                let (this, names, mode) = (self.clone(), job.names.clone(), job.mode.clone());
                let res = blocking(move || match &mode {
                    Mode::Manual { cert, key } => read_manual(cert, key),
                    _ => this.issue_internal(&names),
                })
                .await
                .and_then(|r| r);
                let now = now_ms();
                let mut st = self.state();
                let Some(m) = st.managed.get_mut(&job.domain) else {
                    return Err("route removed".into());
                };
                if m.names != job.names || m.mode != job.mode {
                    // Made due again by the reconcile that changed it.
                    return Err("route changed while issuing".into());
                }
                match &job.mode {
                    Mode::Manual { cert, .. } => manual_done(m, res, cert, now),
                    _ => self.internal_done(m, res, now),
                }
                let res = match &m.last_error {
                    Some(e) => Err(e.clone()),
                    None => Ok(()),
                };
                self.rebuild_serving(&st.managed);
                res
            }
            Mode::Acme => self.run_order(acme, job).await,
        }
    }

    /// One ACME issuance for `job`: the order, then the record saved (on
    /// the blocking threads) and the certificate served.
    async fn run_order(self: &Arc<Self>, acme: &mut AcmeClient, job: &Job) -> Result<(), String> {
        let kind = pick_challenge(&self.config.acme_challenges, job.failures);
        tracing::info!(domain = %job.domain, names = ?job.names, challenge = ?kind, "ordering certificate");
        let attempt = tokio::time::timeout(
            self.config.acme_order_timeout,
            acme.issue(self, &job.names, kind, job.replaces.as_ref()),
        )
        .await
        .unwrap_or_else(|_| Err("order timed out".into()));
        let directory = self.config.acme_directory.clone().unwrap_or_default();
        let (domain, names) = (job.domain.clone(), job.names.clone());
        let res = match attempt {
            Ok((chain_pem, key_pem)) => blocking(move || {
                let loaded = pem::load_pem(chain_pem.as_bytes(), key_pem.as_bytes())?;
                let rec = CertRecord {
                    name: domain,
                    names,
                    cert_pem: chain_pem,
                    key_pem,
                    source: CertSource::Acme { directory },
                    not_after: loaded.not_after,
                    not_before: loaded.not_before,
                };
                Ok((loaded, rec))
            })
            .await
            .and_then(|r| r),
            Err(e) => Err(e),
        };
        // From the check to the record's write, no reconcile runs: a
        // domain it removed is not written back.
        let _writes = self.writes.lock().await;
        let still_wanted = |st: &State| {
            st.managed
                .get(&job.domain)
                .map(|m| m.names == job.names && m.mode == Mode::Acme)
        };
        match still_wanted(&self.state()) {
            None => return Err("route removed".into()),
            // The route changed while ordering; the next round orders again.
            Some(false) => return Err("route changed while ordering".into()),
            Some(true) => {}
        }
        let res = match res {
            Ok((loaded, rec)) => {
                tracing::info!(domain = %job.domain, not_after = loaded.not_after, "certificate issued");
                let store = self.store.clone();
                let saved = rec.clone();
                let saved = blocking(move || store.save_cert(&saved).map_err(|e| e.to_string()))
                    .await
                    .and_then(|r| r);
                if let Err(e) = saved {
                    tracing::warn!(domain = %job.domain, error = %e, "could not persist certificate");
                }
                Ok((loaded, rec))
            }
            Err(e) => Err(e),
        };
        let mut st = self.state();
        let Some(m) = st.managed.get_mut(&job.domain) else {
            return Err("route removed".into());
        };
        match res {
            Ok((loaded, rec)) => {
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
                self.rebuild_serving(&st.managed);
                Ok(())
            }
            Err(e) => {
                tracing::warn!(domain = %job.domain, error = %e, failures = m.failures + 1, "certificate order failed");
                self.fail(m, e.clone(), now_ms());
                Err(e)
            }
        }
    }

    /// Ask the ACME server for renewal windows of certificates whose check is due.
    async fn check_ari(&self, acme: &mut AcmeClient) {
        if acme.ari_supported == Some(false) {
            return;
        }
        let now = now_ms();
        let due: Vec<(String, CertificateDer<'static>)> = self
            .state()
            .managed
            .iter()
            .filter(|(_, m)| m.mode == Mode::Acme && m.ari_check_ms <= now)
            .filter_map(|(d, m)| {
                m.current
                    .as_ref()
                    .and_then(|c| c.key.cert.first().cloned())
                    .map(|c| (d.clone(), c))
            })
            .collect();
        for (domain, der) in due {
            let outcome = acme.renewal_window(self, &der).await;
            let mut st = self.state();
            let Some(m) = st.managed.get_mut(&domain) else {
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
                    let wait =
                        retry_after.clamp(Duration::from_secs(3600), Duration::from_secs(86400));
                    m.ari_check_ms = now_ms() + wait.as_millis() as i64;
                }
                AriOutcome::Unsupported => m.ari_check_ms = i64::MAX,
                AriOutcome::Failed => m.ari_check_ms = now_ms() + 3_600_000,
            }
        }
    }
}

/// Read and parse a `manual` certificate's PEM files (blocking). A key
/// file others can read is refused.
fn read_manual(cert: &Path, key: &Path) -> Result<Loaded, String> {
    let read = |what: &str, p: &Path| {
        std::fs::read(p).map_err(|e| format!("cannot read {what} file {}: {e}", p.display()))
    };
    // A key others can read is refused (the operator is told in `certs`).
    let private = |p: &Path| {
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
    read("certificate", cert)
        .and_then(|c| private(key).and_then(|()| read("key", key)).map(|k| (c, k)))
        .and_then(|(c, k)| {
            pem::load_pem(&c, &k)
                .map_err(|e| format!("{} and {}: {e}", cert.display(), key.display()))
        })
}

/// Apply the outcome of [`read_manual`]: the files are re-read after
/// `MANUAL_RELOAD_MS` either way.
fn manual_done(m: &mut Managed, res: Result<Loaded, String>, cert: &Path, now: i64) {
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

/// What the manager takes out of the lock to work on.
struct Job {
    domain: String,
    names: Vec<String>,
    mode: Mode,
    failures: u32,
    replaces: Option<CertificateDer<'static>>,
}

fn pick_challenge(prefs: &[ChallengeKind], failures: u32) -> ChallengeKind {
    if prefs.is_empty() {
        return ChallengeKind::Http01;
    }
    prefs[(failures as usize) % prefs.len()]
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::{Access, CaRecord, CertStore, Route, StoreError, Target};
    use std::sync::Mutex;

    /// Fixed routes: app hosts in ACME mode.
    struct Fixed(Vec<String>);
    impl RouteSource for Fixed {
        fn lookup(&self, _: &str) -> Option<Arc<Route>> {
            None
        }
        fn hosts(&self) -> Vec<(String, Arc<Route>)> {
            self.0
                .iter()
                .map(|h| {
                    let route = Route {
                        sandbox: h.clone(),
                        kind: RouteKind::App,
                        target: Target::Stopped,
                        access: Access::Open,
                        tls: TlsMode::Acme,
                    };
                    (h.clone(), Arc::new(route))
                })
                .collect()
        }
    }

    /// A store holding certificate records, an ACME account and the CA.
    #[derive(Default)]
    struct Kept {
        certs: Mutex<Vec<CertRecord>>,
        account: Mutex<Option<String>>,
        ca: Mutex<Option<CaRecord>>,
    }
    impl CertStore for Kept {
        fn load_certs(&self) -> Vec<CertRecord> {
            self.certs.lock().unwrap().clone()
        }
        fn save_cert(&self, rec: &CertRecord) -> Result<(), StoreError> {
            let mut certs = self.certs.lock().unwrap();
            certs.retain(|c| c.name != rec.name);
            certs.push(rec.clone());
            Ok(())
        }
        fn delete_cert(&self, name: &str) -> Result<(), StoreError> {
            self.certs.lock().unwrap().retain(|c| c.name != name);
            Ok(())
        }
        fn load_account(&self, _: &str) -> Option<String> {
            self.account.lock().unwrap().clone()
        }
        fn save_account(&self, _: &str, creds: &str) -> Result<(), StoreError> {
            *self.account.lock().unwrap() = Some(creds.to_owned());
            Ok(())
        }
        fn load_ca(&self) -> Option<CaRecord> {
            self.ca.lock().unwrap().clone()
        }
        fn save_ca(&self, ca: &CaRecord) -> Result<(), StoreError> {
            *self.ca.lock().unwrap() = Some(ca.clone());
            Ok(())
        }
    }

    fn record(name: &str) -> CertRecord {
        CertRecord {
            name: name.to_owned(),
            names: vec![name.to_owned()],
            cert_pem: String::new(),
            key_pem: String::new(),
            source: CertSource::Acme {
                directory: "https://acme.test/dir".into(),
            },
            not_after: 0,
            not_before: 0,
        }
    }

    #[test]
    fn first_reconcile_deletes_records_of_names_no_route_uses() {
        crate::install_crypto_provider();
        let store = Arc::new(Kept::default());
        *store.certs.lock().unwrap() = vec![record("routed.test"), record("gone.test")];
        *store.account.lock().unwrap() = Some("account".into());
        let routes = Arc::new(Fixed(vec!["routed.test".into()]));
        let c = Certs::new(crate::HttpConfig::default(), routes, store.clone()).unwrap();
        let ca = store.load_ca().expect("CA made");
        let names =
            |s: &Kept| -> Vec<String> { s.load_certs().into_iter().map(|r| r.name).collect() };
        assert_eq!(
            names(&store),
            ["routed.test", "gone.test"],
            "nothing deleted before"
        );
        c.reconcile_at_start();
        assert_eq!(
            names(&store),
            ["routed.test"],
            "the unrouted record is gone"
        );
        assert_eq!(
            store.load_account("https://acme.test/dir").as_deref(),
            Some("account")
        );
        assert_eq!(store.load_ca(), Some(ca), "the internal CA is kept");
    }

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
