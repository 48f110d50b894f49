//! The record-keeping create and import share: claiming the name and
//! finding an unfinished record to resume ([`Lifecycle::begin`]), the new
//! record checked with `add`'s rules ([`Lifecycle::new_record`]), and
//! storing it with its metadata ([`Lifecycle::keep_record`]). Nothing is
//! stored before the last of these, so a refused request leaves nothing
//! behind.

use std::sync::Arc;

use store::{Backend, Sandbox, SandboxStatus};

use super::pipeline::{Pipeline, Plan};
use super::{
    access, golden, incus_instance, state_name, Claim, Lifecycle, LifecycleError, Meta, Progress,
    Result, DEFAULT_USER, META_COLLECTION,
};
use crate::api::incus::{self as wire, CreateSandbox, ImportSandbox};
use crate::api::SetAuth;

/// The step a record is in from its creation until its pipeline starts.
const RECORD_STEP: &str = "record";

/// A new sandbox's certificate settings as the request gave them; checked
/// with `add`'s rules by [`crate::sandbox::new_sandbox`].
#[derive(Debug, Default)]
pub(super) struct Tls {
    pub(super) mode: Option<store::TlsMode>,
    pub(super) cert_file: Option<String>,
    pub(super) key_file: Option<String>,
}

/// A new sandbox's settings from a create or import request, with the
/// domain and login user checked.
#[derive(Debug)]
pub(super) struct Settings {
    domain: String,
    user: String,
    ssh_keys: Vec<String>,
    app_port: Option<u16>,
    auth: Option<SetAuth>,
    tls: Tls,
}

/// The fields of a create or import request that make a sandbox's
/// settings, as the request gave them.
pub(super) struct Requested<'a> {
    domain: &'a str,
    user: Option<&'a str>,
    ssh_keys: &'a [String],
    app_port: Option<u16>,
    auth: Option<&'a SetAuth>,
    tls: Tls,
}

/// Create and import requests carry these fields under the same names:
/// one body reads them from either.
macro_rules! requested_from {
    ($($request:ty),+) => {$(
        impl<'a> From<&'a $request> for Requested<'a> {
            fn from(req: &'a $request) -> Self {
                Requested {
                    domain: &req.domain,
                    user: req.user.as_deref(),
                    ssh_keys: &req.ssh_keys,
                    app_port: req.app_port,
                    auth: req.auth.as_ref(),
                    tls: Tls {
                        mode: req.tls_mode,
                        cert_file: req.tls_cert_file.clone(),
                        key_file: req.tls_key_file.clone(),
                    },
                }
            }
        }
    )+};
}
requested_from!(CreateSandbox, ImportSandbox);

impl Settings {
    /// The settings of a create or import request: the domain normalized
    /// ([`crate::sandbox::normalize_domain`]), the user `debian` when none
    /// is given; both checked.
    pub(super) fn of<'a>(req: impl Into<Requested<'a>>) -> Result<Self> {
        let req = req.into();
        let domain = crate::sandbox::normalize_domain(req.domain);
        store::validate_domain(&domain)?;
        let user = req.user.unwrap_or(DEFAULT_USER).to_string();
        store::validate_user(&user)?;
        Ok(Settings {
            domain,
            user,
            ssh_keys: req.ssh_keys.to_vec(),
            app_port: req.app_port,
            auth: req.auth.cloned(),
            tls: req.tls,
        })
    }
}

/// A record made by [`Lifecycle::new_record`], not stored yet.
pub(super) struct NewRecord {
    sandbox: Sandbox,
    /// The login generated for a request that gave none.
    generated: Option<SetAuth>,
}

impl Pipeline {
    /// Whether an unfinished record with `meta` was begun by this pipeline
    /// (a created sandbox records its image, an imported one none) and
    /// can be resumed by it; `own_instance`: the record's instance has the
    /// sandbox's name (which a resumed create makes).
    fn resumes(self, meta: &Meta, own_instance: bool) -> bool {
        match self {
            Pipeline::Create => meta.image.is_some() && own_instance,
            Pipeline::Import => meta.image.is_none(),
        }
    }
}

impl Lifecycle {
    /// The start of create and import: claims `name` for the operation,
    /// checks that Incus answers (before anything is stored), and looks
    /// for a record of that name: one `pipeline` left unfinished gives the
    /// plan that resumes it (with `extras`), any other is a taken name;
    /// with none, a new record may be made.
    pub(super) async fn begin(
        self: &Arc<Self>,
        pipeline: Pipeline,
        name: &str,
        extras: golden::Extras,
        progress: &Progress,
    ) -> Result<(Claim, Option<Plan>)> {
        let claim = self.claim(name)?;
        self.incus.server_info().await?;
        let Some(existing) = self.get(name).await? else {
            return Ok((claim, None));
        };
        let meta = self.meta(name).await?;
        let unfinished = matches!(
            existing.status,
            SandboxStatus::Creating { .. } | SandboxStatus::Failed { .. }
        );
        match meta {
            Some(meta)
                if unfinished
                    && pipeline.resumes(&meta, incus_instance(&existing) == Some(name)) =>
            {
                progress
                    .message(match pipeline {
                        Pipeline::Create => format!(
                            "resuming the creation of {name} (was {}); the stored settings apply",
                            state_name(&existing.status)
                        ),
                        Pipeline::Import => format!("resuming the import of {name}"),
                    })
                    .await;
                Ok((claim, Some(Plan::new(pipeline, name, meta, extras))))
            }
            _ => Err(store::Error::NameTaken(name.to_string()).into()),
        }
    }

    /// A new record in state `Creating` with `settings` (and a generated
    /// login when they give none) and `egress`, checked with `add`'s rules;
    /// not stored yet.
    pub(super) async fn new_record(
        &self,
        name: &str,
        settings: Settings,
        egress: store::Egress,
    ) -> Result<NewRecord> {
        let generated = settings.auth.is_none().then(access::generated_login);
        let auth = settings.auth.clone().or_else(|| generated.clone());
        let mut sandbox = crate::sandbox::new_sandbox(crate::sandbox::NewSandbox {
            name: name.to_string(),
            domain: settings.domain.clone(),
            backend: Backend::Incus {
                instance: name.to_string(),
            },
            ssh_port: store::DEFAULT_SSH_PORT,
            app_port: settings.app_port.unwrap_or(store::DEFAULT_APP_PORT),
            agent_port: store::DEFAULT_AGENT_PORT,
            agent_prefix: store::DEFAULT_AGENT_PREFIX.to_string(),
            user: settings.user.clone(),
            ssh_keys: settings.ssh_keys.clone(),
            upstream_host_key: None,
            auth,
            tls_mode: settings.tls.mode,
            tls_cert_file: settings.tls.cert_file,
            tls_key_file: settings.tls.key_file,
            status: SandboxStatus::Creating {
                step: RECORD_STEP.into(),
            },
            tls_policy: self.tls_policy.clone(),
        })
        .await?;
        // Shape problems (domain taken is checked by the insert itself).
        sandbox.validate()?;
        if let Some(owner) = {
            let d = settings.domain.clone();
            self.blocking(move |s| s.owner_of_host(&d)).await?
        } {
            return Err(store::Error::HostTaken {
                host: settings.domain,
                owner,
            }
            .into());
        }
        sandbox.egress = egress;
        Ok(NewRecord { sandbox, generated })
    }

    /// Stores `record` with its `meta` (neither when either fails), then
    /// hands a generated login to the caller.
    pub(super) async fn keep_record(
        &self,
        record: NewRecord,
        meta: &Meta,
        progress: &Progress,
    ) -> Result<()> {
        let NewRecord { sandbox, generated } = record;
        let name = sandbox.name.clone();
        self.put_meta(&name, meta).await?;
        if let Err(e) = self
            .write(move |s| s.insert(sandbox).map(|seq| ((), seq)))
            .await
        {
            let _ = self
                .blocking(move |s| s.delete_record(META_COLLECTION, &name))
                .await;
            return Err(e);
        }
        progress.login(generated).await;
        Ok(())
    }
}

/// The requested egress policy, `restricted` when none is given.
pub(super) fn egress_of(req: Option<&wire::SetEgress>) -> Result<store::Egress> {
    match req {
        Some(e) => e.to_egress().map_err(LifecycleError::Invalid),
        None => Ok(store::Egress::default()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn meta(image: Option<&str>) -> Meta {
        Meta {
            id: "0".repeat(32),
            image: image.map(str::to_string),
            cpu: None,
            memory: None,
            disk: None,
            provision: None,
            gateway_key_only: true,
        }
    }

    #[test]
    fn each_pipeline_resumes_only_its_own_records() {
        let created = meta(Some("test/debian-ssh"));
        let imported = meta(None);
        assert!(Pipeline::Create.resumes(&created, true));
        // A create resumes on the instance named after the sandbox only.
        assert!(!Pipeline::Create.resumes(&created, false));
        // An import's record is not finished by a create, nor a create's by
        // an import.
        assert!(!Pipeline::Create.resumes(&imported, true));
        assert!(Pipeline::Import.resumes(&imported, true));
        assert!(!Pipeline::Import.resumes(&created, true));
    }

    fn requested<'a>(domain: &'a str, user: Option<&'a str>) -> Requested<'a> {
        Requested {
            domain,
            user,
            ssh_keys: &[],
            app_port: None,
            auth: None,
            tls: Tls::default(),
        }
    }

    #[test]
    fn settings_are_normalized_and_checked() {
        let s = Settings::of(requested(" Box.Example.COM ", None)).unwrap();
        assert_eq!(s.domain, "box.example.com");
        assert_eq!(s.user, DEFAULT_USER);
        assert!(Settings::of(requested("no_domain", None)).is_err());
        assert!(Settings::of(requested("a.example.com", Some("Bad User"))).is_err());
    }
}
