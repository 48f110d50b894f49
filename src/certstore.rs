//! The HTTPS gate's persistence, implemented over the store's opaque
//! records: certificates (`certs`, by name), ACME accounts
//! (`acme-accounts`, by directory URL) and the internal CA (`internal-ca`).
//! All of it lives in the 0700 state directory. Every call may block (a
//! write flushes sled to disk): httpgate makes them on tokio's blocking
//! threads, never on its async ones.

use std::sync::Arc;

use httpgate::{CaRecord, CertRecord, CertStore, StoreError};
use store::Store;

const CERTS: &str = "certs";
const ACCOUNTS: &str = "acme-accounts";
const CA: &str = "internal-ca";
const CA_KEY: &str = "root";

/// [`CertStore`] over [`Store`].
pub struct StoreCerts(pub Arc<Store>);

fn fail(e: impl std::fmt::Display) -> StoreError {
    StoreError(e.to_string())
}

impl CertStore for StoreCerts {
    fn load_certs(&self) -> Vec<CertRecord> {
        match self.0.list_records(CERTS) {
            Ok(records) => records
                .into_iter()
                .filter_map(|(name, v)| match serde_json::from_value(v) {
                    Ok(rec) => Some(rec),
                    Err(e) => {
                        tracing::error!(cert = %name, error = %e, "stored certificate unreadable; it will be issued again");
                        None
                    }
                })
                .collect(),
            Err(e) => {
                tracing::error!(error = %e, "cannot read stored certificates");
                Vec::new()
            }
        }
    }

    fn save_cert(&self, rec: &CertRecord) -> Result<(), StoreError> {
        let v = serde_json::to_value(rec).map_err(fail)?;
        self.0.put_record(CERTS, &rec.name, &v).map_err(fail)
    }

    fn delete_cert(&self, name: &str) -> Result<(), StoreError> {
        self.0.delete_record(CERTS, name).map(|_| ()).map_err(fail)
    }

    fn load_account(&self, directory_url: &str) -> Option<String> {
        match self.0.get_record(ACCOUNTS, directory_url) {
            Ok(Some(serde_json::Value::String(s))) => Some(s),
            Ok(_) => None,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the ACME account");
                None
            }
        }
    }

    fn save_account(&self, directory_url: &str, creds: &str) -> Result<(), StoreError> {
        self.0
            .put_record(
                ACCOUNTS,
                directory_url,
                &serde_json::Value::String(creds.to_string()),
            )
            .map_err(fail)
    }

    fn load_ca(&self) -> Option<CaRecord> {
        match self.0.get_record(CA, CA_KEY) {
            Ok(Some(v)) => serde_json::from_value(v).ok(),
            Ok(None) => None,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the internal CA");
                None
            }
        }
    }

    fn save_ca(&self, ca: &CaRecord) -> Result<(), StoreError> {
        let v = serde_json::to_value(ca).map_err(fail)?;
        self.0.put_record(CA, CA_KEY, &v).map_err(fail)
    }
}
