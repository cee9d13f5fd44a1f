//! Operator metrics (`detour_operator_*`), registered once in a private registry.

use std::collections::HashMap;

use parking_lot::Mutex;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use super::webhook;
use crate::api::{condition, ConditionStatus};

/// Values of `detour_operator_sidecar_scrapes_total`'s `result`: success first.
const SCRAPE_RESULTS: [&str; 2] = ["ok", "error"];

pub struct Metrics {
    registry: Registry,
    reconciles: IntCounterVec,
    reconcile_duration: Histogram,
    renders: IntCounterVec,
    status_patches: IntCounterVec,
    sidecar_scrapes: IntCounterVec,
    policies: IntGaugeVec,
    leader: IntGauge,
    injections: IntCounterVec,
    /// Latest condition statuses per policy (`ns/name`), so the gauge is a count, not a sum of
    /// deltas that could drift.
    by_policy: Mutex<HashMap<String, [ConditionStatus; 3]>>,
}

// === impl Metrics ===

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let metrics = Metrics {
            reconciles: counter(
                &registry,
                "detour_operator_reconciles_total",
                "Reconciles by result (ok or an error kind).",
            ),
            reconcile_duration: register(
                &registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "detour_operator_reconcile_duration_seconds",
                        "Time spent in one reconcile.",
                    )
                    .buckets(vec![
                        0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    ]),
                ),
            ),
            renders: counter(
                &registry,
                "detour_operator_config_renders_total",
                "Renders of a namespace's detour-config by outcome (applied, unchanged, deleted).",
            ),
            status_patches: counter(
                &registry,
                "detour_operator_status_patches_total",
                "Status writes by result (only changed statuses are written).",
            ),
            sidecar_scrapes: counter(
                &registry,
                "detour_operator_sidecar_scrapes_total",
                "Reads of a sidecar's GET /endpoints by result (ok or error).",
            ),
            policies: register(
                &registry,
                IntGaugeVec::new(
                    Opts::new(
                        "detour_operator_policies",
                        "UpstreamPolicies by condition type and status.",
                    ),
                    &["condition", "status"],
                ),
            ),
            leader: register(
                &registry,
                IntGauge::new(
                    "detour_operator_leader",
                    "1 while this replica holds the leader lease.",
                ),
            ),
            injections: counter(
                &registry,
                "detour_operator_injections_total",
                "Pods seen by the admission webhook, by result: injected, skipped (opted out, already injected, excluded namespace), error (allowed unchanged with a warning), invalid (a malformed review).",
            ),
            by_policy: Mutex::default(),
            registry,
        };
        metrics.start_at_zero();
        metrics
    }

    /// Series present at 0 from the start, so a rate over them works before the first failure.
    fn start_at_zero(&self) {
        for r in SCRAPE_RESULTS {
            self.sidecar_scrapes.with_label_values(&[r]).reset();
        }
        for r in webhook::Outcome::LABELS {
            self.injections.with_label_values(&[r]).reset();
        }
        for c in condition::ALL {
            for s in ConditionStatus::ALL {
                self.policies.with_label_values(&[c, s.as_str()]).set(0);
            }
        }
    }

    pub fn reconciled(&self, result: &str, seconds: f64) {
        self.reconciles.with_label_values(&[result]).inc();
        self.reconcile_duration.observe(seconds);
    }

    pub fn rendered(&self, result: &str) {
        self.renders.with_label_values(&[result]).inc();
    }

    pub fn status_patched(&self, result: &str) {
        self.status_patches.with_label_values(&[result]).inc();
    }

    /// One sidecar scrape, successful or not.
    pub fn sidecar_scraped(&self, ok: bool) {
        let result = SCRAPE_RESULTS[usize::from(!ok)];
        self.sidecar_scrapes.with_label_values(&[result]).inc();
    }

    pub fn injection(&self, result: &str) {
        self.injections.with_label_values(&[result]).inc();
    }

    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }

    /// Records a policy's condition statuses, in the order of [`condition::ALL`] (`None` when the
    /// policy is gone).
    pub fn policy_conditions(&self, key: &str, statuses: Option<[ConditionStatus; 3]>) {
        let mut map = self.by_policy.lock();
        match statuses {
            Some(s) => map.insert(key.to_string(), s),
            None => map.remove(key),
        };
        for (i, c) in condition::ALL.iter().enumerate() {
            for s in ConditionStatus::ALL {
                let n = map.values().filter(|v| v[i] == s).count();
                self.policies
                    .with_label_values(&[c, s.as_str()])
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
    }

    /// Prometheus text format.
    pub fn text(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding");
        String::from_utf8(buf).expect("prometheus text is UTF-8")
    }
}

/// A counter labelled by `result`, registered.
fn counter(registry: &Registry, name: &str, help: &str) -> IntCounterVec {
    register(
        registry,
        IntCounterVec::new(Opts::new(name, help), &["result"]),
    )
}

fn register<M>(registry: &Registry, metric: prometheus::Result<M>) -> M
where
    M: prometheus::core::Collector + Clone + 'static,
{
    let metric = metric.expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("unique metric");
    metric
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_gauge_counts_latest_statuses() {
        let m = Metrics::new();
        use ConditionStatus::{False, True};
        m.policy_conditions("a/x", Some([True, True, False]));
        m.policy_conditions("a/y", Some([True, True, True]));
        m.policy_conditions("a/x", Some([True, True, True]));
        let t = m.text();
        assert!(
            t.contains("detour_operator_policies{condition=\"Ready\",status=\"True\"} 2"),
            "{t}"
        );
        assert!(t.contains("detour_operator_policies{condition=\"Ready\",status=\"False\"} 0"));
        m.policy_conditions("a/y", None);
        assert!(m
            .text()
            .contains("detour_operator_policies{condition=\"Ready\",status=\"True\"} 1"));
        assert!(
            t.contains("detour_operator_sidecar_scrapes_total{result=\"error\"} 0"),
            "{t}"
        );
        m.sidecar_scraped(true);
        assert!(m
            .text()
            .contains("detour_operator_sidecar_scrapes_total{result=\"ok\"} 1"));
        m.reconciled("ok", 0.01);
        assert!(m
            .text()
            .contains("detour_operator_reconciles_total{result=\"ok\"} 1"));
    }
}
