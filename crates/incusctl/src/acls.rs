//! Network ACLs (`/1.0/network-acls`), the DHCP leases of a managed network,
//! and guarded edits of a network's configuration.
//!
//! A network's configuration and an ACL's rules are edited
//! read-modify-write with the ETag Incus gives them
//! ([`Client::edit_network_config`], [`Client::edit_network_acl`]), so two
//! clients editing the same list never lose each other's change: a write
//! based on a stale read is refused by Incus (412) and redone.

use std::collections::BTreeMap;

use http::{HeaderMap, HeaderValue, Method};
use serde::{Deserialize, Serialize};

use crate::client::Client;
use crate::error::{Error, Result};
use crate::transport::{bytes_body, decode_envelope, empty_body, percent_encode};

/// Rounds of [`Client::edit_network_config`] before giving up.
const EDIT_ATTEMPTS: usize = 8;

/// One rule of a network ACL. Empty fields are left out of the request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct AclRule {
    /// `allow`, `allow-stateless`, `drop` or `reject`.
    pub action: String,
    /// Comma-separated CIDRs, addresses or ranges (`a-b`).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub source: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub destination: String,
    /// `tcp`, `udp`, `icmp4`, `icmp6`, or empty for any.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub protocol: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub source_port: String,
    /// Comma-separated ports or ranges (`a-b`).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub destination_port: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub icmp_type: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub icmp_code: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// `enabled`, `disabled` or `logged`.
    pub state: String,
}

impl AclRule {
    /// An enabled rule with `action`.
    pub fn new(action: &str) -> Self {
        AclRule {
            action: action.to_string(),
            state: "enabled".to_string(),
            ..Default::default()
        }
    }
}

/// A network ACL.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NetworkAcl {
    pub name: String,
    pub description: String,
    /// Traffic leaving the instances.
    pub egress: Vec<AclRule>,
    /// Traffic to the instances.
    pub ingress: Vec<AclRule>,
    pub config: BTreeMap<String, String>,
    /// Networks and instances using it (read only).
    #[serde(skip_serializing)]
    pub used_by: Vec<String>,
}

/// A DHCP lease (or static allocation) of a managed network.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct NetworkLease {
    pub hostname: String,
    pub hwaddr: String,
    pub address: String,
    /// `static` or `dynamic`.
    #[serde(rename = "type")]
    pub kind: String,
}

fn acl_path(name: &str) -> String {
    format!("/1.0/network-acls/{}", percent_encode(name))
}

fn network_path(name: &str) -> String {
    format!("/1.0/networks/{}", percent_encode(name))
}

impl Client {
    /// The network ACL `name`, or `None`.
    pub async fn network_acl(&self, name: &str) -> Result<Option<NetworkAcl>> {
        let path = acl_path(name);
        match self.transport().json::<()>(Method::GET, &path, None).await {
            Ok(answer) => Ok(Some(answer.into_sync(&path)?)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every network ACL with its rules and users.
    pub async fn list_network_acls(&self) -> Result<Vec<NetworkAcl>> {
        let path = "/1.0/network-acls?recursion=1";
        self.transport()
            .json::<()>(Method::GET, path, None)
            .await?
            .into_sync(path)
    }

    /// Creates the ACL `acl.name`, or replaces its description, rules and
    /// config when it exists. Incus applies a change to every network
    /// using it at once.
    pub async fn put_network_acl(&self, acl: &NetworkAcl) -> Result<()> {
        let body = serde_json::json!({
            "description": acl.description,
            "egress": acl.egress,
            "ingress": acl.ingress,
            "config": acl.config,
        });
        let path = acl_path(&acl.name);
        match self.transport().json(Method::PUT, &path, Some(&body)).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => {
                let mut create = body;
                if let Some(obj) = create.as_object_mut() {
                    obj.insert("name".into(), serde_json::json!(acl.name));
                }
                self.transport()
                    .json(Method::POST, "/1.0/network-acls", Some(&create))
                    .await?;
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Edits the rules of ACL `name` with `edit` (which returns whether it
    /// changed anything, and must be idempotent), read-modify-write with
    /// the ACL's ETag and redone from a fresh read when another client
    /// wrote in between; the ACL is created (empty, then edited) when
    /// missing. After a write the ACL is read again and `edit` run on it
    /// until it has nothing left to change: Incus checks the ETag before
    /// its own write, not atomically with it, so two writes at the same
    /// moment can both pass and the later one undo the earlier. Returns
    /// whether a change was written. Incus re-applies the ACL to the
    /// networks using it at once (one nftables transaction, nothing
    /// restarted).
    pub async fn edit_network_acl<F>(&self, name: &str, mut edit: F) -> Result<bool>
    where
        F: FnMut(&mut NetworkAcl) -> bool,
    {
        let path = acl_path(name);
        let mut wrote = false;
        for _ in 0..EDIT_ATTEMPTS {
            let (status, raw) = self
                .transport()
                .raw(Method::GET, &path, HeaderMap::new(), empty_body(), None)
                .await?;
            if status == http::StatusCode::NOT_FOUND {
                let create = serde_json::json!({"name": name, "description": "", "egress": [], "ingress": [], "config": {}});
                match self
                    .transport()
                    .json(Method::POST, "/1.0/network-acls", Some(&create))
                    .await
                {
                    Ok(_) => {}
                    Err(e) if e.is_conflict() || already_exists(&e) => {}
                    Err(e) => return Err(e),
                }
                continue;
            }
            let etag = raw.headers.get(http::header::ETAG).cloned();
            let mut acl: NetworkAcl =
                decode_envelope(&Method::GET, &path, status, &raw.body)?.into_sync(&path)?;
            if !edit(&mut acl) {
                return Ok(wrote);
            }
            let body = serde_json::json!({
                "description": acl.description,
                "egress": acl.egress,
                "ingress": acl.ingress,
                "config": acl.config,
            });
            if self.put_if_match(&path, &body, etag).await? {
                wrote = true;
            } else {
                tracing::debug!(acl = name, "ACL changed under our edit; reading it again");
            }
        }
        Err(Error::Conflict {
            what: format!("network ACL \"{name}\""),
            message: format!("changed by others {EDIT_ATTEMPTS} times during one edit"),
        })
    }

    /// `PUT` with `If-Match`; false when Incus refused it as stale (412).
    async fn put_if_match(
        &self,
        path: &str,
        body: &serde_json::Value,
        etag: Option<HeaderValue>,
    ) -> Result<bool> {
        let data = serde_json::to_vec(body)
            .map_err(|e| Error::InvalidArgument(format!("cannot encode {path}: {e}")))?;
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(tag) = etag {
            headers.insert(http::header::IF_MATCH, tag);
        }
        let (status, raw) = self
            .transport()
            .raw(Method::PUT, path, headers, bytes_body(data), None)
            .await?;
        if status == http::StatusCode::PRECONDITION_FAILED {
            return Ok(false);
        }
        let answer = decode_envelope(&Method::PUT, path, status, &raw.body)?;
        self.complete(answer, self.op_timeout(), path).await?;
        Ok(true)
    }

    /// Deletes a network ACL (Incus refuses while something uses it).
    pub async fn delete_network_acl(&self, name: &str) -> Result<()> {
        self.transport()
            .json::<()>(Method::DELETE, &acl_path(name), None)
            .await?;
        Ok(())
    }

    /// The DHCP leases and static allocations of a managed network.
    pub async fn network_leases(&self, network: &str) -> Result<Vec<NetworkLease>> {
        let path = format!("{}/leases", network_path(network));
        self.transport()
            .json::<()>(Method::GET, &path, None)
            .await?
            .into_sync(&path)
    }

    /// Edits a network's configuration with `edit`, which returns whether
    /// it changed anything; nothing is written when it did not. The write
    /// carries the ETag of the read it is based on and is redone from a
    /// fresh read when another client wrote in between. Returns whether a
    /// change was written.
    ///
    /// Note that Incus re-runs the network's setup on any change (its
    /// DHCP/DNS server restarts), so callers edit only when needed.
    pub async fn edit_network_config<F>(&self, network: &str, mut edit: F) -> Result<bool>
    where
        F: FnMut(&mut BTreeMap<String, String>) -> bool,
    {
        let path = network_path(network);
        for _ in 0..EDIT_ATTEMPTS {
            let (status, raw) = self
                .transport()
                .raw(Method::GET, &path, HeaderMap::new(), empty_body(), None)
                .await?;
            let etag = raw.headers.get(http::header::ETAG).cloned();
            #[derive(Deserialize)]
            struct Current {
                #[serde(default)]
                description: String,
                #[serde(default)]
                config: BTreeMap<String, String>,
            }
            let current: Current =
                decode_envelope(&Method::GET, &path, status, &raw.body)?.into_sync(&path)?;
            let mut config = current.config;
            if !edit(&mut config) {
                return Ok(false);
            }
            let body = serde_json::json!({"description": current.description, "config": config});
            if self.put_if_match(&path, &body, etag).await? {
                return Ok(true);
            }
            tracing::debug!(network, "network changed under our edit; reading it again");
        }
        Err(Error::Conflict {
            what: format!("network \"{network}\""),
            message: format!("changed by others {EDIT_ATTEMPTS} times during one edit"),
        })
    }
}

fn already_exists(e: &Error) -> bool {
    e.to_string()
        .to_ascii_lowercase()
        .contains("already exists")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn rules_leave_out_empty_fields() {
        let mut r = AclRule::new("drop");
        r.source = "10.0.0.2".into();
        r.protocol = "tcp".into();
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"action": "drop", "source": "10.0.0.2", "protocol": "tcp", "state": "enabled"})
        );
    }
}
