//! Operator metrics (`detour_operator_*`), registered once in a private registry.

use std::collections::HashMap;

use parking_lot::Mutex;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::api::condition;

const CONDITIONS: [&str; 3] = [
    condition::ACCEPTED,
    condition::RESOLVED_REFS,
    condition::READY,
];
const STATUSES: [&str; 3] = ["True", "False", "Unknown"];

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
    by_policy: Mutex<HashMap<String, [&'static str; 3]>>,
}

// === impl Metrics ===

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let reconciles = IntCounterVec::new(
            Opts::new(
                "detour_operator_reconciles_total",
                "Reconciles by result (ok or an error kind).",
            ),
            &["result"],
        )
        .expect("valid metric");
        let reconcile_duration = Histogram::with_opts(
            HistogramOpts::new(
                "detour_operator_reconcile_duration_seconds",
                "Time spent in one reconcile.",
            )
            .buckets(vec![
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
        )
        .expect("valid metric");
        let renders = IntCounterVec::new(
            Opts::new(
                "detour_operator_config_renders_total",
                "Renders of a namespace's detour-config by outcome (applied, unchanged, deleted).",
            ),
            &["result"],
        )
        .expect("valid metric");
        let status_patches = IntCounterVec::new(
            Opts::new(
                "detour_operator_status_patches_total",
                "Status writes by result (only changed statuses are written).",
            ),
            &["result"],
        )
        .expect("valid metric");
        let sidecar_scrapes = IntCounterVec::new(
            Opts::new(
                "detour_operator_sidecar_scrapes_total",
                "Reads of a sidecar's GET /endpoints by result (ok or error).",
            ),
            &["result"],
        )
        .expect("valid metric");
        let policies = IntGaugeVec::new(
            Opts::new(
                "detour_operator_policies",
                "UpstreamPolicies by condition type and status.",
            ),
            &["condition", "status"],
        )
        .expect("valid metric");
        let leader = IntGauge::new(
            "detour_operator_leader",
            "1 while this replica holds the leader lease.",
        )
        .expect("valid metric");
        let injections = IntCounterVec::new(
            Opts::new(
                "detour_operator_injections_total",
                "Pods seen by the admission webhook, by result: injected, skipped (opted out, already injected, excluded namespace), error (allowed unchanged with a warning), invalid (a malformed review).",
            ),
            &["result"],
        )
        .expect("valid metric");
        for c in [
            Box::new(injections.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(reconciles.clone()),
            Box::new(reconcile_duration.clone()),
            Box::new(renders.clone()),
            Box::new(status_patches.clone()),
            Box::new(sidecar_scrapes.clone()),
            Box::new(policies.clone()),
            Box::new(leader.clone()),
        ] {
            registry.register(c).expect("unique metric");
        }
        // Present at 0 from the start, so a rate over them works before the first failure.
        for r in ["ok", "error"] {
            sidecar_scrapes.with_label_values(&[r]).reset();
        }
        for r in ["injected", "skipped", "error", "invalid"] {
            injections.with_label_values(&[r]).reset();
        }
        for c in CONDITIONS {
            for s in STATUSES {
                policies.with_label_values(&[c, s]).set(0);
            }
        }
        Metrics {
            registry,
            reconciles,
            reconcile_duration,
            renders,
            status_patches,
            sidecar_scrapes,
            policies,
            leader,
            injections,
            by_policy: Mutex::default(),
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

    /// One sidecar scrape: `ok` or `error`.
    pub fn sidecar_scraped(&self, result: &str) {
        self.sidecar_scrapes.with_label_values(&[result]).inc();
    }

    pub fn injection(&self, result: &str) {
        self.injections.with_label_values(&[result]).inc();
    }

    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }

    /// Records a policy's condition statuses (`None` when the policy is gone).
    pub fn policy_conditions(&self, key: &str, statuses: Option<[&'static str; 3]>) {
        let mut map = self.by_policy.lock();
        match statuses {
            Some(s) => map.insert(key.to_string(), s),
            None => map.remove(key),
        };
        for (i, c) in CONDITIONS.iter().enumerate() {
            for s in STATUSES {
                let n = map.values().filter(|v| v[i] == s).count();
                self.policies
                    .with_label_values(&[c, s])
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
        m.policy_conditions("a/x", Some(["True", "True", "False"]));
        m.policy_conditions("a/y", Some(["True", "True", "True"]));
        m.policy_conditions("a/x", Some(["True", "True", "True"]));
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
        m.sidecar_scraped("ok");
        assert!(m
            .text()
            .contains("detour_operator_sidecar_scrapes_total{result=\"ok\"} 1"));
        m.reconciled("ok", 0.01);
        assert!(m
            .text()
            .contains("detour_operator_reconciles_total{result=\"ok\"} 1"));
    }
}
