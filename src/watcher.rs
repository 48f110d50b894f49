//! The Incus watcher: follows lifecycle events so that the store (and so
//! the routing snapshot) tracks every container at once, and runs a full
//! reconcile when the event stream (re)connects and periodically, to repair
//! anything events do not carry or that was missed while disconnected, and
//! to give sandboxes made before network isolation their fixed address,
//! filters and egress ACL (see `crate::lifecycle::network`).
//!
//! The addresses it records are what the container reports, for people to
//! see; routes never use them: the gates connect to the fixed address
//! sandboxd assigned (`Sandbox::assigned_ipv4`).
//!
//! It only ever touches settled sandboxes (running or stopped); records a
//! create, import or delete is working on are left to that pipeline.

use std::sync::Arc;

use incusctl::{Event, LifecycleAction, LifecycleEvent};
use store::SandboxStatus;
use tokio::sync::watch;

use crate::lifecycle::Lifecycle;

/// Bound on a started container getting its address.
const ADDRESS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Runs until `shutdown` turns true.
pub async fn run(lifecycle: Arc<Lifecycle>, mut shutdown: watch::Receiver<bool>) {
    let mut events = lifecycle.incus().events();
    let mut tick = tokio::time::interval(lifecycle.reconcile_every());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Incus absent is normal (static sandboxes only): say it once.
    let mut reported_down = false;
    loop {
        tokio::select! {
            ev = events.next_event() => match ev {
                Some(Event::Connected) => {
                    if reported_down {
                        tracing::info!("Incus events connected again");
                    }
                    reported_down = false;
                    reconcile(&lifecycle).await;
                }
                Some(Event::Disconnected { reason }) => {
                    if !reported_down {
                        tracing::info!(%reason, "Incus events unavailable; retrying in the background");
                        reported_down = true;
                    }
                }
                Some(Event::Lifecycle(e)) => on_event(&lifecycle, e).await,
                None => {
                    tracing::warn!("Incus event stream ended; starting a new one");
                    events = lifecycle.incus().events();
                }
            },
            _ = tick.tick() => {
                if !reported_down {
                    reconcile(&lifecycle).await;
                }
            }
            () = async { let _ = shutdown.wait_for(|s| *s).await; } => return,
        }
    }
}

async fn reconcile(lifecycle: &Arc<Lifecycle>) {
    match lifecycle.reconcile().await {
        Ok(0) => tracing::debug!("reconcile: all sandboxes match Incus"),
        Ok(n) => tracing::info!(changed = n, "reconcile repaired sandboxes"),
        Err(e) => tracing::debug!(error = %e, "reconcile skipped"),
    }
}

async fn on_event(lifecycle: &Arc<Lifecycle>, e: LifecycleEvent) {
    let Some(instance) = e.instance.clone() else {
        return;
    };
    // Snapshot events name the instance too; they change nothing routed.
    if e.snapshot.is_some() {
        return;
    }
    match &e.action {
        LifecycleAction::InstanceStarted
        | LifecycleAction::InstanceRestarted
        | LifecycleAction::InstanceRestored
        | LifecycleAction::InstanceResumed => {
            if !managed(lifecycle, &instance).await {
                return;
            }
            // Waiting for the address must not hold up other events.
            let lc = lifecycle.clone();
            tokio::spawn(async move { follow_start(&lc, &instance).await });
        }
        LifecycleAction::InstanceStopped
        | LifecycleAction::InstanceShutdown
        | LifecycleAction::InstancePaused => {
            set_all(lifecycle, &instance, SandboxStatus::Stopped, vec![]).await;
        }
        LifecycleAction::InstanceDeleted => {
            let reason = format!("container {instance} was deleted outside sandboxd");
            set_all(
                lifecycle,
                &instance,
                SandboxStatus::Failed { reason },
                vec![],
            )
            .await;
        }
        LifecycleAction::InstanceRenamed => {
            if let Some(old) = e.old_name() {
                if let Err(err) = lifecycle.follow_rename(old, &instance).await {
                    tracing::warn!(error = %err, old, new = %instance, "cannot follow a rename");
                }
            }
        }
        _ => {}
    }
}

async fn managed(lifecycle: &Lifecycle, instance: &str) -> bool {
    lifecycle
        .sandboxes_of(instance)
        .await
        .map(|v| !v.is_empty())
        .unwrap_or(false)
}

async fn set_all(
    lifecycle: &Lifecycle,
    instance: &str,
    status: SandboxStatus,
    addresses: Vec<String>,
) {
    let Ok(sandboxes) = lifecycle.sandboxes_of(instance).await else {
        return;
    };
    for sb in sandboxes {
        match lifecycle
            .settle(&sb.name, status.clone(), addresses.clone())
            .await
        {
            Ok(true) => tracing::info!(sandbox = %sb.name, ?status, "status follows Incus"),
            Ok(false) => {}
            Err(e) => tracing::warn!(sandbox = %sb.name, error = %e, "cannot record status"),
        }
    }
}

async fn follow_start(lifecycle: &Lifecycle, instance: &str) {
    let incus = lifecycle.incus();
    match incus.wait_for_ipv4(instance, ADDRESS_TIMEOUT).await {
        Ok(_) => match incus.instance_state(instance).await {
            Ok(st) => {
                let addrs = crate::lifecycle::addresses_of(&st);
                set_all(lifecycle, instance, SandboxStatus::Running, addrs).await;
            }
            Err(e) => tracing::debug!(instance, error = %e, "cannot read state after start"),
        },
        Err(e) => tracing::debug!(instance, error = %e, "no address after start"),
    }
}
