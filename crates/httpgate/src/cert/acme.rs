//! The ACME client of the certificate manager (instant-acme): the account
//! (created once per directory and persisted), one order per issuance with
//! HTTP-01 or TLS-ALPN-01 answers published through the certificate
//! module's challenge maps while it runs, and ARI renewal windows. Key
//! generation, signing and the store's reads and writes run on the
//! blocking threads.

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
use rustls::sign::CertifiedKey;

use super::{blocking, Certs};
use crate::config::ChallengeKind;

/// An error and its causes, `outer: inner: innermost`, so that a refused
/// connection or a certificate the ACME server's TLS fails with is named.
pub(super) fn causes(e: &dyn std::error::Error) -> String {
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

pub(super) enum AriOutcome {
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
pub(super) struct AcmeClient {
    account: Option<Account>,
    pub(super) ari_supported: Option<bool>,
}

impl AcmeClient {
    async fn account(&mut self, certs: &Certs) -> Result<Account, String> {
        if let Some(a) = &self.account {
            return Ok(a.clone());
        }
        let dir = certs
            .config
            .acme_directory
            .clone()
            .ok_or_else(|| "no ACME directory configured".to_owned())?;
        let builder = || -> Result<instant_acme::AccountBuilder, String> {
            match &certs.config.acme_ca_root_pem {
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
        let stored = {
            let (store, dir) = (certs.store.clone(), dir.clone());
            blocking(move || store.load_account(&dir)).await?
        };
        let account = match stored {
            Some(creds) => {
                let creds: AccountCredentials =
                    serde_json::from_str(&creds).map_err(|e| format!("stored account: {e}"))?;
                builder()?
                    .from_credentials(creds)
                    .await
                    .map_err(|e| format!("ACME account: {}", causes(&e)))?
            }
            None => {
                let contact = certs
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
                let (store, d) = (certs.store.clone(), dir.clone());
                blocking(move || store.save_account(&d, &creds))
                    .await?
                    .map_err(|e| e.to_string())?;
                tracing::info!(directory = %dir, "ACME account created");
                account
            }
        };
        self.account = Some(account.clone());
        Ok(account)
    }

    pub(super) async fn renewal_window(
        &mut self,
        certs: &Certs,
        der: &CertificateDer<'_>,
    ) -> AriOutcome {
        let Ok(account) = self.account(certs).await else {
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
    pub(super) async fn issue(
        &mut self,
        certs: &Certs,
        names: &[String],
        kind: ChallengeKind,
        replaces: Option<&CertificateDer<'static>>,
    ) -> Result<(String, String), String> {
        let account = self.account(certs).await?;
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
            certs,
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
                    guard.add_alpn01(&name, ka.digest().as_ref()).await?;
                }
                ch.set_ready()
                    .await
                    .map_err(|e| format!("challenge ready: {}", causes(&e)))?;
            }
        }
        let retry = RetryPolicy::new()
            .initial_delay(Duration::from_millis(100))
            .backoff(1.5)
            .timeout(certs.config.acme_order_timeout);
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
        let names = names.to_vec();
        let (csr, key_pem) = blocking(move || -> Result<_, String> {
            let key = KeyPair::generate().map_err(|e| e.to_string())?;
            let mut params = CertificateParams::new(names).map_err(|e| e.to_string())?;
            params.distinguished_name = DistinguishedName::new();
            let csr = params.serialize_request(&key).map_err(|e| e.to_string())?;
            Ok((csr.der().to_vec(), key.serialize_pem()))
        })
        .await??;
        order
            .finalize_csr(&csr)
            .await
            .map_err(|e| format!("finalize: {}", causes(&e)))?;
        let chain = order
            .poll_certificate(&retry)
            .await
            .map_err(|e| format!("certificate: {}", causes(&e)))?;
        Ok((chain, key_pem))
    }
}

/// Removes published challenge answers when an order attempt ends.
struct ChallengeGuard<'a> {
    certs: &'a Certs,
    tokens: Vec<String>,
    alpn_names: Vec<String>,
}

impl ChallengeGuard<'_> {
    fn add_http01(&mut self, token: String, key_auth: String) {
        self.certs
            .challenges
            .publish_http01(token.clone(), key_auth);
        self.tokens.push(token);
    }

    async fn add_alpn01(&mut self, name: &str, digest: &[u8]) -> Result<(), String> {
        let (n, d) = (name.to_owned(), digest.to_vec());
        let ck = blocking(move || alpn_challenge_cert(&n, &d)).await??;
        self.certs
            .challenges
            .publish_alpn01(name.to_owned(), Arc::new(ck));
        self.alpn_names.push(name.to_owned());
        Ok(())
    }
}

impl Drop for ChallengeGuard<'_> {
    fn drop(&mut self) {
        self.certs
            .challenges
            .withdraw(&self.tokens, &self.alpn_names);
    }
}

/// The self-signed certificate that answers a TLS-ALPN-01 challenge for
/// `name` (RFC 8737: the `acmeIdentifier` extension holds the digest).
fn alpn_challenge_cert(name: &str, digest: &[u8]) -> Result<CertifiedKey, String> {
    let key = KeyPair::generate().map_err(|e| e.to_string())?;
    let mut params = CertificateParams::new(vec![name.to_owned()]).map_err(|e| e.to_string())?;
    params.custom_extensions = vec![CustomExtension::new_acme_identifier(digest)];
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signer =
        rustls::crypto::ring::sign::any_supported_type(&key_der).map_err(|e| e.to_string())?;
    Ok(CertifiedKey::new(vec![cert.der().clone()], signer))
}
