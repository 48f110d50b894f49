//! The provisioning pipelines of create and import: which [`Step`]s run
//! in which order, and what the store records around each. What each step
//! does is in `steps.rs`.
//!
//! Every step is recorded in the sandbox's status (`Creating { step }`)
//! before it runs and announced as a progress event; a failure records
//! `Failed { reason }` naming the step. Only the last step, [`Step::Live`],
//! gives the sandbox a routable status. Every step is idempotent, so
//! running a pipeline again resumes it.

use std::time::Instant;

use store::SandboxStatus;

use super::{golden, Lifecycle, LifecycleError, Meta, Progress, Result};
use crate::api::SandboxView;

/// One step of a pipeline. Its [`Step::name`] is what users and the store
/// see: in the status `Creating { step }`, in a failure's reason, in the
/// progress events and in errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    /// Create only: the fixed address and egress rules, then the
    /// container (made and started by one Incus operation).
    Create,
    /// Import only: claim the instance (our id), fixed address and filters,
    /// restarting it when it must take its address.
    Adopt,
    /// Start the container (a no-op when running).
    Start,
    /// Wait for the container's fixed address.
    Address,
    /// Wait for the boot to finish.
    Ready,
    /// Create only: the provisioning plan (none, per-sandbox or all).
    Provision,
    /// Make (or find) the login user.
    User,
    /// The user's `authorized_keys`: the gateway's key only.
    Keys,
    /// Pin the container's sshd host key for the upstream leg.
    HostKey,
    /// Create only: the baseline of a provisioned container.
    Baseline,
    /// Check the fixed address and give the sandbox its routable status.
    Live,
}

impl Step {
    /// The step's name as users and the store see it.
    pub(super) const fn name(self) -> &'static str {
        match self {
            Step::Create => "create",
            Step::Adopt => "adopt",
            Step::Start => "start",
            Step::Address => "address",
            Step::Ready => "ready",
            Step::Provision => "provision",
            Step::User => "user",
            Step::Keys => "keys",
            Step::HostKey => "host-key",
            Step::Baseline => "baseline",
            Step::Live => "live",
        }
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The steps of `create`, in order.
const CREATE_STEPS: [Step; 10] = [
    Step::Create,
    Step::Start,
    Step::Address,
    Step::Ready,
    Step::Provision,
    Step::User,
    Step::Keys,
    Step::HostKey,
    Step::Baseline,
    Step::Live,
];

/// The steps of `import`, in order.
const IMPORT_STEPS: [Step; 8] = [
    Step::Adopt,
    Step::Start,
    Step::Address,
    Step::Ready,
    Step::User,
    Step::Keys,
    Step::HostKey,
    Step::Live,
];

/// Which pipeline a sandbox is made by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Pipeline {
    /// `sandboxd create`: a new container from an image.
    Create,
    /// `sandboxd import`: an existing instance adopted.
    Import,
}

impl Pipeline {
    /// Its steps, in order.
    pub(super) const fn steps(self) -> &'static [Step] {
        match self {
            Pipeline::Create => &CREATE_STEPS,
            Pipeline::Import => &IMPORT_STEPS,
        }
    }

    /// Its name in errors and failure reasons.
    pub(super) const fn name(self) -> &'static str {
        match self {
            Pipeline::Create => "create",
            Pipeline::Import => "import",
        }
    }
}

/// Everything the provisioning steps need, resolved before they run.
pub(super) struct Plan {
    pub(super) name: String,
    pub(super) instance: String,
    pub(super) meta: Meta,
    pub(super) pipeline: Pipeline,
    /// Per-request provisioning inputs (LLM key, hook).
    pub(super) extras: golden::Extras,
}

impl Plan {
    /// The plan of `pipeline` for the sandbox `name`, whose instance has
    /// its name.
    pub(super) fn new(pipeline: Pipeline, name: &str, meta: Meta, extras: golden::Extras) -> Self {
        Plan {
            name: name.to_string(),
            instance: name.to_string(),
            meta,
            pipeline,
            extras,
        }
    }
}

/// What earlier steps learned, for later ones in the same run.
#[derive(Default)]
pub(super) struct StepState {
    /// uid, gid and home of the login user.
    pub(super) user: Option<(u32, u32, String)>,
}

impl Lifecycle {
    /// Runs the steps of `plan`, recording each; a failure records
    /// `Failed { reason }` with the step and returns it.
    pub(super) async fn provision(&self, plan: Plan, progress: Progress) -> Result<SandboxView> {
        let steps = plan.pipeline.steps();
        let what = plan.pipeline.name();
        let total = steps.len() as u64;
        let started = Instant::now();
        let mut ctx = StepState::default();
        for (i, &step) in steps.iter().enumerate() {
            self.set_status(
                &plan.name,
                SandboxStatus::Creating {
                    step: step.name().to_string(),
                },
                None,
            )
            .await?;
            progress.step(step.name(), i as u64 + 1, total).await;
            let t = Instant::now();
            if let Err(e) = self.run_step(step, &plan, &mut ctx, &progress).await {
                let reason = format!("{what} failed at step {step}: {e}");
                tracing::warn!(sandbox = %plan.name, %reason, "lifecycle step failed");
                if let Err(store_err) = self
                    .set_status(&plan.name, SandboxStatus::Failed { reason }, Some(vec![]))
                    .await
                {
                    tracing::error!(sandbox = %plan.name, error = %store_err, "cannot record the failure");
                }
                return Err(LifecycleError::Step {
                    what,
                    name: plan.name.clone(),
                    step: step.name(),
                    source: Box::new(e),
                });
            }
            tracing::debug!(sandbox = %plan.name, step = step.name(), elapsed = ?t.elapsed(), "step done");
        }
        tracing::info!(sandbox = %plan.name, elapsed = ?started.elapsed(), "sandbox live");
        let sb = self
            .get(&plan.name)
            .await?
            .ok_or_else(|| store::Error::NotFound(plan.name.clone()))?;
        Ok(crate::sandbox::view(&sb))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every step, and where it sits in this list: the match makes a new
    /// step fail to compile here until it is listed (and so checked below).
    const ALL: [Step; 11] = [
        Step::Create,
        Step::Adopt,
        Step::Start,
        Step::Address,
        Step::Ready,
        Step::Provision,
        Step::User,
        Step::Keys,
        Step::HostKey,
        Step::Baseline,
        Step::Live,
    ];
    fn index(step: Step) -> usize {
        match step {
            Step::Create => 0,
            Step::Adopt => 1,
            Step::Start => 2,
            Step::Address => 3,
            Step::Ready => 4,
            Step::Provision => 5,
            Step::User => 6,
            Step::Keys => 7,
            Step::HostKey => 8,
            Step::Baseline => 9,
            Step::Live => 10,
        }
    }

    fn names(p: Pipeline) -> Vec<&'static str> {
        p.steps().iter().map(|s| s.name()).collect()
    }

    fn position(p: Pipeline, step: Step) -> Option<usize> {
        p.steps().iter().position(|s| *s == step)
    }

    #[test]
    fn pipelines_run_the_steps_users_see_in_their_order() {
        // The strings are what `show` prints as the status and what
        // failure reasons ("create failed at step keys: ...") say.
        assert_eq!(
            names(Pipeline::Create),
            [
                "create",
                "start",
                "address",
                "ready",
                "provision",
                "user",
                "keys",
                "host-key",
                "baseline",
                "live"
            ]
        );
        assert_eq!(
            names(Pipeline::Import),
            ["adopt", "start", "address", "ready", "user", "keys", "host-key", "live"]
        );
        assert_eq!(Pipeline::Create.name(), "create");
        assert_eq!(Pipeline::Import.name(), "import");
    }

    #[test]
    fn each_step_runs_after_what_it_needs() {
        for p in [Pipeline::Create, Pipeline::Import] {
            let steps = p.steps();
            // Only the last step gives a routable status.
            assert_eq!(steps.last(), Some(&Step::Live), "{p:?}");
            // The container exists first (made or adopted).
            assert!(matches!(steps[0], Step::Create | Step::Adopt), "{p:?}");
            let before = |a: Step, b: Step| {
                let (Some(a), Some(b)) = (position(p, a), position(p, b)) else {
                    return true;
                };
                a < b
            };
            // Keys need the user's uid and home; the host key and the user
            // need a booted container; the address is waited for before
            // anything reads it.
            assert!(before(Step::User, Step::Keys), "{p:?}");
            assert!(before(Step::Ready, Step::User), "{p:?}");
            assert!(before(Step::Ready, Step::HostKey), "{p:?}");
            assert!(before(Step::Start, Step::Address), "{p:?}");
            assert!(before(Step::Address, Step::Ready), "{p:?}");
            assert!(before(Step::Provision, Step::Baseline), "{p:?}");
            for s in steps {
                assert_eq!(
                    steps.iter().filter(|t| *t == s).count(),
                    1,
                    "{p:?} runs {s} once"
                );
            }
        }
        // Import never makes a container nor provisions one; create never
        // adopts.
        assert_eq!(position(Pipeline::Import, Step::Create), None);
        assert_eq!(position(Pipeline::Import, Step::Provision), None);
        assert_eq!(position(Pipeline::Import, Step::Baseline), None);
        assert_eq!(position(Pipeline::Create, Step::Adopt), None);
    }

    #[test]
    fn step_names_are_distinct_and_lead_back_to_their_step() {
        for (i, step) in ALL.iter().enumerate() {
            assert_eq!(index(*step), i);
            assert_eq!(step.to_string(), step.name());
            // Each name leads back to one step only.
            let back: Vec<Step> = ALL
                .iter()
                .copied()
                .filter(|s| s.name() == step.name())
                .collect();
            assert_eq!(back, [*step]);
            // Every step runs in some pipeline.
            assert!(
                position(Pipeline::Create, *step).is_some()
                    || position(Pipeline::Import, *step).is_some(),
                "{step} runs nowhere"
            );
        }
    }
}
