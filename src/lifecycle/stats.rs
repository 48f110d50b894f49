//! Live figures of Incus sandboxes for `list` and `top`: one Incus
//! listing per call, and CPU % from the two latest samples of each
//! instance (the reconcile's readings count too).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use store::Sandbox;

use super::{incus_instance, lock, Lifecycle};
use crate::api::incus::{SandboxStats, StatsAnswer};

/// One CPU sample of an instance.
#[derive(Debug, Clone, Copy)]
pub(super) struct Sample {
    at: Instant,
    cpu_ns: u64,
}

/// The two latest CPU samples of an instance kept at least
/// [`MIN_CPU_WINDOW`] apart: whenever a reading comes, one of them is at
/// least that old, so a figure can be given.
#[derive(Debug, Clone, Copy)]
pub(super) struct Samples {
    older: Option<Sample>,
    newer: Sample,
}

/// Shortest span a CPU % is computed over.
const MIN_CPU_WINDOW: Duration = Duration::from_millis(200);

/// See [`Lifecycle::cpu_sample`].
fn record_cpu(
    samples: &mut HashMap<String, Samples>,
    instance: &str,
    reading: Sample,
) -> Option<f64> {
    let Some(s) = samples.get_mut(instance) else {
        samples.insert(
            instance.to_string(),
            Samples {
                older: None,
                newer: reading,
            },
        );
        return None;
    };
    if reading.cpu_ns < s.newer.cpu_ns {
        // The counter went back: the container restarted. Start over.
        *s = Samples {
            older: None,
            newer: reading,
        };
        return None;
    }
    let since = |p: &Sample| reading.at.saturating_duration_since(p.at);
    let base = [Some(s.newer), s.older]
        .into_iter()
        .flatten()
        .find(|p| since(p) >= MIN_CPU_WINDOW);
    let pct = base.map(|p| incusctl::cpu_percent(p.cpu_ns, reading.cpu_ns, since(&p)));
    if since(&s.newer) >= MIN_CPU_WINDOW {
        s.older = Some(s.newer);
        s.newer = reading;
    }
    pct
}

impl Lifecycle {
    /// CPU % of `instance` since the latest of its samples at least
    /// [`MIN_CPU_WINDOW`] old, recording this reading. Every reading
    /// counts (the periodic reconcile's too), so two kept samples are
    /// needed: with one, a reading just after the reconcile's would find
    /// only a sample too recent to give a figure.
    pub(super) fn cpu_sample(&self, instance: &str, cpu_ns: u64) -> Option<f64> {
        let reading = Sample {
            at: Instant::now(),
            cpu_ns,
        };
        record_cpu(&mut lock(&self.samples), instance, reading)
    }

    fn stats_of(&self, sb: &Sandbox, inst: Option<&incusctl::Instance>) -> Option<SandboxStats> {
        let instance = incus_instance(sb)?;
        let Some(i) = inst else {
            return Some(SandboxStats {
                name: sb.name.clone(),
                state: "Missing".into(),
                ipv4: None,
                ipv6: None,
                cpu_percent: None,
                memory_bytes: None,
                memory_limit_bytes: None,
                disk_bytes: None,
            });
        };
        let st = i.state.as_ref();
        let running = i.is_running();
        Some(SandboxStats {
            name: sb.name.clone(),
            state: i.status.clone(),
            ipv4: i.ipv4().map(|a| a.to_string()),
            ipv6: i.ipv6().map(|a| a.to_string()),
            cpu_percent: st
                .filter(|_| running)
                .and_then(|s| self.cpu_sample(instance, s.cpu_usage_ns())),
            memory_bytes: st.filter(|_| running).map(|s| s.memory_usage_bytes()),
            memory_limit_bytes: st.and_then(|s| s.memory_limit_bytes()),
            disk_bytes: st.and_then(|s| s.disk_usage_bytes()),
        })
    }

    /// Live figures of every Incus sandbox from one `list_instances` call.
    pub async fn stats(&self) -> StatsAnswer {
        let sandboxes = match self.blocking(|s| s.list()).await {
            Ok(s) => s,
            Err(e) => {
                return StatsAnswer {
                    incus_error: Some(e.to_string()),
                    sandboxes: vec![],
                }
            }
        };
        if !sandboxes.iter().any(|sb| incus_instance(sb).is_some()) {
            return StatsAnswer::default();
        }
        let list = match self.incus.list_instances().await {
            Ok(l) => l,
            Err(e) => {
                return StatsAnswer {
                    incus_error: Some(e.to_string()),
                    sandboxes: vec![],
                }
            }
        };
        let by_name: HashMap<&str, &incusctl::Instance> =
            list.iter().map(|i| (i.name.as_str(), i)).collect();
        StatsAnswer {
            incus_error: None,
            sandboxes: sandboxes
                .iter()
                .filter_map(|sb| {
                    let inst = incus_instance(sb).and_then(|n| by_name.get(n).copied());
                    self.stats_of(sb, inst)
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn cpu_percent_has_a_base_even_just_after_another_reading() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut m = HashMap::new();
        let mut read = |ms: u64, cpu_ms: u64| {
            record_cpu(
                &mut m,
                "c",
                Sample {
                    at: at(ms),
                    cpu_ns: cpu_ms * 1_000_000,
                },
            )
        };
        assert_eq!(read(0, 0), None, "no earlier sample");
        // 100 ms of CPU over 1 s: 10%.
        let p = read(1000, 100).unwrap();
        assert!((p - 10.0).abs() < 1e-9, "{p}");
        // 50 ms after that reading (the periodic reconcile's, say): the
        // one before it is the base.
        let p = read(1050, 105).unwrap();
        assert!((p - 10.0).abs() < 1e-9, "{p}");
        // The counter went back (the container restarted): no figure, then
        // figures from the new counter.
        assert_eq!(read(1500, 3), None);
        let p = read(2000, 53).unwrap();
        assert!((p - 10.0).abs() < 1e-9, "{p}");
    }
}
