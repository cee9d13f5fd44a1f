//! Prometheus metrics of the sidecar: prefix `detour_`, base units, bounded labels.
//!
//! Each sidecar has its own registry (tests run several in one process). Per-upstream handles are
//! resolved once when the upstream is installed, so the request path does no label lookups except
//! for the response status, and every series of an upstream is removed when it goes away.

use std::{
    collections::HashSet,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, OnceLock,
    },
};

use parking_lot::RwLock;
use prometheus::{
    Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use super::{
    endpoint::{EjectReason, Endpoint, ALL_EJECT_REASONS},
    errors::{Cause, ALL_CAUSES},
};

/// Why a failed request was not retried (`reason` of `detour_retries_skipped_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoRetry {
    /// The request may have reached the upstream and is not idempotent.
    NonIdempotent,
    /// The body was streamed (larger than the replay buffer) and already sent.
    BodyNotReplayable,
    /// `retries.attempts` used up.
    AttemptsExhausted,
    /// The request deadline leaves no time for another attempt.
    Deadline,
    /// The failure kind is not listed in `retries.on`.
    NotRetryable,
    /// The retry budget is used up.
    BudgetExhausted,
}

const NO_RETRY: [NoRetry; 6] = [
    NoRetry::BudgetExhausted,
    NoRetry::NonIdempotent,
    NoRetry::BodyNotReplayable,
    NoRetry::AttemptsExhausted,
    NoRetry::Deadline,
    NoRetry::NotRetryable,
];

impl NoRetry {
    pub fn as_str(self) -> &'static str {
        match self {
            NoRetry::NonIdempotent => "non_idempotent",
            NoRetry::BodyNotReplayable => "body_not_replayable",
            NoRetry::AttemptsExhausted => "attempts_exhausted",
            NoRetry::Deadline => "deadline",
            NoRetry::NotRetryable => "not_retryable",
            NoRetry::BudgetExhausted => "budget_exhausted",
        }
    }
}

/// Endpoint states reported by `detour_endpoints`.
pub const ENDPOINT_STATES: [&str; 4] = ["healthy", "unhealthy", "ejected", "terminating"];

pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    duration: HistogramVec,
    gateway_errors: IntCounterVec,
    attempt_failures: IntCounterVec,
    retries: IntCounterVec,
    retries_skipped: IntCounterVec,
    budget_exhausted: IntCounterVec,
    rescued: IntCounterVec,
    endpoints: IntGaugeVec,
    ejections: IntCounterVec,
    ejections_capped: IntCounterVec,
    endpoint_failures: IntCounterVec,
    endpoint_ejections: IntCounterVec,
    health_checks: IntCounterVec,
    panic: IntCounterVec,
    keepalive_races: IntCounterVec,
    incomplete_bodies: IntCounterVec,
    idle_timeout: GaugeVec,
    idle_mismatch: IntGaugeVec,
    pub reloads_success: IntCounter,
    pub reloads_failure: IntCounter,
    config_info: IntGaugeVec,
    config_hash: RwLock<String>,
}

/// Handles of one upstream, resolved once.
pub struct UpstreamMetrics {
    name: String,
    metrics: Arc<Metrics>,
    /// `detour_requests_total` per status 100-599, created on first use (no lock per request).
    statuses: Box<[OnceLock<IntCounter>]>,
    /// Set when the upstream left the config: late requests must not bring series back.
    removed: AtomicBool,
    pub duration: prometheus::Histogram,
    attempt_failures: Vec<IntCounter>,
    proxy_errors: Vec<IntCounter>,
    upstream_errors: [IntCounter; 3],
    retries: Vec<IntCounter>,
    pub keepalive_race_retries: IntCounter,
    retries_skipped: Vec<IntCounter>,
    pub budget_exhausted: IntCounter,
    pub rescued: IntCounter,
    ejections: Vec<IntCounter>,
    pub ejections_capped: IntCounter,
    pub checks_ok: IntCounter,
    pub checks_failed: IntCounter,
    pub panic: IntCounter,
    pub keepalive_races: IntCounter,
    pub incomplete_bodies: IntCounter,
    pub idle_timeout: Gauge,
    pub idle_mismatch: IntGauge,
    endpoint_gauges: Vec<IntGauge>,
    /// Endpoints (address, pod) that have per-endpoint series, to remove them when they go.
    endpoint_series: parking_lot::Mutex<HashSet<(String, String)>>,
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let v = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(v.clone())).expect("unique metric");
    v
}

// === impl Metrics ===

impl Metrics {
    pub fn new() -> Arc<Self> {
        let r = Registry::new();
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "detour_request_duration_seconds",
                "Time from receiving a request to sending response headers, retries included.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0,
            ]),
            &["upstream"],
        )
        .expect("valid metric");
        r.register(Box::new(duration.clone()))
            .expect("unique metric");
        let endpoints = IntGaugeVec::new(
            Opts::new(
                "detour_endpoints",
                "Endpoints by state: healthy (eligible), unhealthy (active checks), ejected (outlier detection), terminating.",
            ),
            &["upstream", "state"],
        )
        .expect("valid metric");
        r.register(Box::new(endpoints.clone()))
            .expect("unique metric");
        let config_info = IntGaugeVec::new(
            Opts::new("detour_config_info", "The running config: 1 for its hash."),
            &["hash"],
        )
        .expect("valid metric");
        r.register(Box::new(config_info.clone()))
            .expect("unique metric");
        let reloads = counter_vec(
            &r,
            "detour_config_reloads_total",
            "Config loads by result; a failed one leaves the running config in place.",
            &["result"],
        );
        let idle_timeout = GaugeVec::new(
            Opts::new("detour_upstream_idle_timeout_seconds", "How long the upstream keeps an idle keep-alive connection open, from its Keep-Alive header or learned from its closes (0: not known). Pooled connections are retired before it."),
            &["upstream"],
        )
        .expect("valid metric");
        r.register(Box::new(idle_timeout.clone()))
            .expect("unique metric");
        let idle_mismatch = IntGaugeVec::new(
            Opts::new("detour_pool_idle_mismatch", "1 when the upstream closes idle connections before timeouts.poolIdle would (see detour_upstream_idle_timeout_seconds): set poolIdle below it."),
            &["upstream"],
        )
        .expect("valid metric");
        r.register(Box::new(idle_mismatch.clone()))
            .expect("unique metric");
        Arc::new(Metrics {
            idle_timeout,
            idle_mismatch,
            requests: counter_vec(&r, "detour_requests_total", "Responses sent to clients, by upstream and status.", &["upstream", "status"]),
            duration,
            gateway_errors: counter_vec(
                &r,
                "detour_gateway_errors_total",
                "502/503/504 responses sent to clients: origin=proxy (the sidecar answered, cause says why) or origin=upstream (passed through).",
                &["upstream", "status", "origin", "cause"],
            ),
            attempt_failures: counter_vec(&r, "detour_attempt_failures_total", "Failed attempts by cause, including those a retry rescued.", &["upstream", "cause"]),
            retries: counter_vec(&r, "detour_retries_total", "Retries by the failure that caused them.", &["upstream", "reason"]),
            retries_skipped: counter_vec(&r, "detour_retries_skipped_total", "Failed attempts that were not retried, by reason.", &["upstream", "reason"]),
            budget_exhausted: counter_vec(&r, "detour_retry_budget_exhausted_total", "Retries refused because the retry budget was used up.", &["upstream"]),
            rescued: counter_vec(&r, "detour_requests_rescued_total", "Requests that failed at least once and were answered by a retry (gateway errors avoided).", &["upstream"]),
            endpoints,
            ejections: counter_vec(&r, "detour_ejections_total", "Endpoints ejected by outlier detection, by reason.", &["upstream", "reason"]),
            ejections_capped: counter_vec(&r, "detour_ejections_skipped_total", "Ejections not done because maxEjectionPercent was reached.", &["upstream"]),
            endpoint_failures: counter_vec(&r, "detour_endpoint_attempt_failures_total", "Failed attempts per endpoint (pod) by cause; a series appears at the endpoint's first failure and goes when the endpoint leaves the config.", &["upstream", "upstream_address", "upstream_pod", "cause"]),
            endpoint_ejections: counter_vec(&r, "detour_endpoint_ejections_total", "Ejections per endpoint (pod) by reason; a series appears at the endpoint's first ejection and goes when the endpoint leaves the config.", &["upstream", "upstream_address", "upstream_pod", "reason"]),
            health_checks: counter_vec(&r, "detour_health_checks_total", "Active health checks by result.", &["upstream", "result"]),
            panic: counter_vec(&r, "detour_panic_mode_total", "Requests balanced over all endpoints because too few were eligible (panic mode).", &["upstream"]),
            keepalive_races: counter_vec(&r, "detour_keepalive_races_total", "Requests that failed on a reused idle connection the upstream had closed.", &["upstream"]),
            incomplete_bodies: counter_vec(&r, "detour_response_body_errors_total", "Response bodies the upstream broke off after headers were sent (cause http_response_incomplete).", &["upstream"]),
            reloads_success: reloads.with_label_values(&["success"]),
            reloads_failure: reloads.with_label_values(&["failure"]),
            config_info,
            config_hash: RwLock::new(String::new()),
            registry: r,
        })
    }

    pub fn set_config_hash(&self, hash: &str) {
        let mut cur = self.config_hash.write();
        if !cur.is_empty() {
            let _ = self.config_info.remove_label_values(&[cur.as_str()]);
        }
        self.config_info.with_label_values(&[hash]).set(1);
        *cur = hash.to_string();
    }

    /// Where collectors owned elsewhere (the config source's) register.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn encode(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding");
        String::from_utf8(buf).expect("utf-8 metrics")
    }
}

// === impl UpstreamMetrics ===

impl UpstreamMetrics {
    pub fn new(metrics: &Arc<Metrics>, name: &str) -> Self {
        let m = metrics;
        let u = name;
        UpstreamMetrics {
            name: name.to_string(),
            statuses: (100..600).map(|_| OnceLock::new()).collect(),
            removed: AtomicBool::new(false),
            duration: m.duration.with_label_values(&[u]),
            attempt_failures: ALL_CAUSES
                .iter()
                .map(|c| m.attempt_failures.with_label_values(&[u, c.as_str()]))
                .collect(),
            proxy_errors: PROXY_CAUSES
                .iter()
                .map(|c| {
                    let status = c.status().as_u16().to_string();
                    m.gateway_errors.with_label_values(&[
                        u,
                        status.as_str(),
                        "proxy",
                        c.proxy_status_error(),
                    ])
                })
                .collect(),
            upstream_errors: ["502", "503", "504"].map(|s| {
                m.gateway_errors.with_label_values(&[
                    u,
                    s,
                    "upstream",
                    Cause::UpstreamStatus.as_str(),
                ])
            }),
            retries: ALL_CAUSES
                .iter()
                .map(|c| m.retries.with_label_values(&[u, c.as_str()]))
                .collect(),
            keepalive_race_retries: m
                .retries
                .with_label_values(&[u, Cause::KeepaliveRace.as_str()]),
            retries_skipped: NO_RETRY
                .iter()
                .map(|r| m.retries_skipped.with_label_values(&[u, r.as_str()]))
                .collect(),
            budget_exhausted: m.budget_exhausted.with_label_values(&[u]),
            rescued: m.rescued.with_label_values(&[u]),
            ejections: ALL_EJECT_REASONS
                .iter()
                .map(|r| m.ejections.with_label_values(&[u, r.as_str()]))
                .collect(),
            ejections_capped: m.ejections_capped.with_label_values(&[u]),
            checks_ok: m.health_checks.with_label_values(&[u, "success"]),
            checks_failed: m.health_checks.with_label_values(&[u, "failure"]),
            panic: m.panic.with_label_values(&[u]),
            keepalive_races: m.keepalive_races.with_label_values(&[u]),
            incomplete_bodies: m.incomplete_bodies.with_label_values(&[u]),
            idle_timeout: m.idle_timeout.with_label_values(&[u]),
            idle_mismatch: m.idle_mismatch.with_label_values(&[u]),
            endpoint_gauges: ENDPOINT_STATES
                .iter()
                .map(|s| m.endpoints.with_label_values(&[u, s]))
                .collect(),
            endpoint_series: parking_lot::Mutex::new(HashSet::new()),
            metrics: metrics.clone(),
        }
    }

    pub fn response(&self, status: u16) {
        let Some(slot) = self.statuses.get(status.wrapping_sub(100) as usize) else {
            return;
        };
        if let Some(c) = slot.get() {
            c.inc();
            return;
        }
        if self.removed.load(Ordering::Relaxed) {
            return;
        }
        slot.get_or_init(|| {
            self.metrics
                .requests
                .with_label_values(&[self.name.as_str(), &status.to_string()])
        })
        .inc();
    }

    /// An attempt on `ep` failed: the upstream's total and `ep`'s own series (created here at
    /// its first failure of this cause: failures only, so successful requests do no label lookup).
    pub fn attempt_failure(&self, ep: &Endpoint, cause: Cause) {
        self.attempt_failures[cause_index(cause)].inc();
        self.endpoint_inc(&self.metrics.endpoint_failures, ep, cause.as_str());
    }

    pub fn retry(&self, cause: Cause) {
        self.retries[cause_index(cause)].inc();
    }

    pub fn retry_skipped(&self, why: NoRetry) {
        self.retries_skipped[NO_RETRY.iter().position(|r| *r == why).expect("known")].inc();
    }

    /// A 502/503/504 the sidecar answered itself.
    pub fn proxy_error(&self, cause: Cause) {
        let i = PROXY_CAUSES
            .iter()
            .position(|c| c.proxy_status_error() == cause.proxy_status_error())
            .expect("every final cause has a series");
        self.proxy_errors[i].inc();
    }

    /// A 502/503/504 the upstream sent that was passed through.
    pub fn upstream_error(&self, status: u16) {
        if let Some(i) = [502, 503, 504].iter().position(|s| *s == status) {
            self.upstream_errors[i].inc();
        }
    }

    /// `ep` was ejected: the upstream's total and `ep`'s own series.
    pub fn ejection(&self, ep: &Endpoint, reason: EjectReason) {
        let i = ALL_EJECT_REASONS
            .iter()
            .position(|r| *r == reason)
            .expect("known");
        self.ejections[i].inc();
        self.endpoint_inc(&self.metrics.endpoint_ejections, ep, reason.as_str());
    }

    /// Counts under the lock that removal takes, so a reload retiring the endpoint at the same
    /// moment either sees the series (and removes it) or stops this from creating it.
    fn endpoint_inc(&self, vec: &IntCounterVec, ep: &Endpoint, why: &str) {
        let mut seen = self.endpoint_series.lock();
        // Once the endpoint or this upstream left the config, a request still in flight must
        // not bring the series back.
        if self.removed.load(Ordering::Relaxed) || ep.is_retired() {
            return;
        }
        let key = series_key(ep);
        vec.with_label_values(&[self.name.as_str(), &key.0, &key.1, why])
            .inc();
        seen.insert(key);
    }

    /// Removes the per-endpoint series of an endpoint that left the config (retired first).
    pub fn remove_endpoint(&self, ep: &Endpoint) {
        let key = series_key(ep);
        let mut seen = self.endpoint_series.lock();
        if seen.remove(&key) {
            self.remove_endpoint_series(&key);
        }
    }

    fn remove_endpoint_series(&self, (addr, pod): &(String, String)) {
        let m = &self.metrics;
        let u = self.name.as_str();
        for c in ALL_CAUSES {
            let _ = m
                .endpoint_failures
                .remove_label_values(&[u, addr, pod, c.as_str()]);
        }
        for r in ALL_EJECT_REASONS {
            let _ = m
                .endpoint_ejections
                .remove_label_values(&[u, addr, pod, r.as_str()]);
        }
    }

    /// Sets `detour_endpoints` (healthy, unhealthy, ejected, terminating).
    pub fn set_endpoint_counts(&self, counts: [i64; 4]) {
        for (g, n) in self.endpoint_gauges.iter().zip(counts) {
            g.set(n);
        }
    }

    /// Removes every series of this upstream (it left the config).
    pub fn remove(&self) {
        self.removed.store(true, Ordering::Relaxed);
        let m = &self.metrics;
        let u = self.name.as_str();
        for (i, slot) in self.statuses.iter().enumerate() {
            if slot.get().is_some() {
                let _ = m.requests.remove_label_values(&[u, &(100 + i).to_string()]);
            }
        }
        let _ = m.duration.remove_label_values(&[u]);
        for c in ALL_CAUSES {
            let _ = m.attempt_failures.remove_label_values(&[u, c.as_str()]);
            let _ = m.retries.remove_label_values(&[u, c.as_str()]);
        }
        for c in PROXY_CAUSES {
            let status = c.status().as_u16().to_string();
            let _ = m.gateway_errors.remove_label_values(&[
                u,
                status.as_str(),
                "proxy",
                c.proxy_status_error(),
            ]);
        }
        for s in ["502", "503", "504"] {
            let _ = m.gateway_errors.remove_label_values(&[
                u,
                s,
                "upstream",
                Cause::UpstreamStatus.as_str(),
            ]);
        }
        for r in NO_RETRY {
            let _ = m.retries_skipped.remove_label_values(&[u, r.as_str()]);
        }
        for r in ALL_EJECT_REASONS {
            let _ = m.ejections.remove_label_values(&[u, r.as_str()]);
        }
        for s in ENDPOINT_STATES {
            let _ = m.endpoints.remove_label_values(&[u, s]);
        }
        for v in [
            &m.budget_exhausted,
            &m.rescued,
            &m.ejections_capped,
            &m.panic,
            &m.keepalive_races,
            &m.incomplete_bodies,
        ] {
            let _ = v.remove_label_values(&[u]);
        }
        let _ = m.idle_timeout.remove_label_values(&[u]);
        let _ = m.idle_mismatch.remove_label_values(&[u]);
        let _ = m.health_checks.remove_label_values(&[u, "success"]);
        let _ = m.health_checks.remove_label_values(&[u, "failure"]);
        let mut seen = self.endpoint_series.lock();
        for key in seen.drain() {
            self.remove_endpoint_series(&key);
        }
    }
}

/// Causes that can end a request with the sidecar's own error response (a keep-alive race ends
/// one as `connection_terminated`; an upstream status is passed through, not answered).
const PROXY_CAUSES: [Cause; 8] = [
    Cause::ProxyInternalError,
    Cause::ConnectionRefused,
    Cause::ConnectionTimeout,
    Cause::ConnectionTerminated,
    Cause::HttpResponseTimeout,
    Cause::HttpResponseIncomplete,
    Cause::HttpProtocolError,
    Cause::DestinationUnavailable,
];

/// The `upstream_address` and `upstream_pod` labels of an endpoint's series (not `endpoint` and
/// `pod`: Prometheus attaches those to the scrape target and would rename ours `exported_*`).
fn series_key(ep: &Endpoint) -> (String, String) {
    (ep.addr.to_string(), ep.pod.clone().unwrap_or_default())
}

fn cause_index(c: Cause) -> usize {
    ALL_CAUSES
        .iter()
        .position(|x| *x == c)
        .expect("known cause")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_exist_at_zero_and_are_removed_with_the_upstream() {
        let m = Metrics::new();
        let u = UpstreamMetrics::new(&m, "shop/web");
        u.response(200);
        u.proxy_error(Cause::KeepaliveRace);
        u.upstream_error(503);
        let text = m.encode();
        assert!(
            text.contains(r#"detour_requests_total{status="200",upstream="shop/web"} 1"#),
            "{text}"
        );
        assert!(text.contains(
            r#"detour_gateway_errors_total{cause="connection_terminated",origin="proxy",status="502",upstream="shop/web"} 1"#
        ));
        assert!(text.contains(
            r#"detour_gateway_errors_total{cause="upstream_status",origin="upstream",status="503",upstream="shop/web"} 1"#
        ));
        assert!(text.contains(
            r#"detour_attempt_failures_total{cause="connection_refused",upstream="shop/web"} 0"#
        ));
        u.remove();
        assert!(!m.encode().contains("shop/web"), "{}", m.encode());
    }

    #[test]
    fn endpoint_series_appear_on_failure_and_go_with_the_endpoint_or_the_upstream() {
        use crate::config::EndpointState;
        let ep = |port: u16, pod: &str| {
            Endpoint::new(
                ([127, 0, 0, 1], port).into(),
                Some(pod.to_string()),
                EndpointState::Ready,
                Default::default(),
                0,
            )
        };
        let (a, b) = (ep(1001, "web-a"), ep(1002, "web-b"));
        let m = Metrics::new();
        let u = UpstreamMetrics::new(&m, "shop/web");
        // Nothing per endpoint until it fails.
        assert!(!m.encode().contains("detour_endpoint_"), "{}", m.encode());
        u.attempt_failure(&a, Cause::ConnectionRefused);
        u.attempt_failure(&a, Cause::ConnectionRefused);
        u.ejection(&a, EjectReason::ConnectRefused);
        u.attempt_failure(&b, Cause::HttpResponseTimeout);
        let text = m.encode();
        assert!(text.contains(
            r#"detour_endpoint_attempt_failures_total{cause="connection_refused",upstream="shop/web",upstream_address="127.0.0.1:1001",upstream_pod="web-a"} 2"#
        ), "{text}");
        assert!(text.contains(
            r#"detour_endpoint_ejections_total{reason="connect_refused",upstream="shop/web",upstream_address="127.0.0.1:1001",upstream_pod="web-a"} 1"#
        ), "{text}");
        // `a` leaves the config: its series go, and a late failure on it does not bring them back.
        a.retire();
        u.remove_endpoint(&a);
        u.attempt_failure(&a, Cause::ConnectionRefused);
        let text = m.encode();
        assert!(!text.contains("web-a"), "{text}");
        assert!(text.contains(r#"upstream_pod="web-b""#), "{text}");
        // The upstream goes: every per-endpoint series with it.
        u.remove();
        assert!(!m.encode().contains("detour_endpoint_"), "{}", m.encode());
    }

    #[test]
    fn config_hash_keeps_one_series() {
        let m = Metrics::new();
        m.set_config_hash("aaaa");
        m.set_config_hash("bbbb");
        let text = m.encode();
        assert!(text.contains(r#"detour_config_info{hash="bbbb"} 1"#));
        assert!(!text.contains("aaaa"));
    }
}
