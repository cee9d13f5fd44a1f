//! Prometheus metrics of the sidecar: prefix `detour_`, base units, bounded labels.
//!
//! Each sidecar has its own registry (tests run several in one process). Per-upstream handles are
//! resolved once when the upstream is installed, so the request path does no label lookups except
//! for the response status, and every series of an upstream is removed when it goes away: each
//! series is created through one place that also remembers how to remove it.

use std::{
    collections::HashSet,
    ops::RangeInclusive,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, OnceLock,
    },
};

use parking_lot::{Mutex, RwLock};
use prometheus::{
    core::{Collector, MetricVec, MetricVecBuilder},
    Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use super::{
    endpoint::{EjectReason, EndpointLabels},
    errors::Cause,
};
use crate::report::LiveState;

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

impl NoRetry {
    /// Every reason, in declaration order (`index` is the position here).
    pub const ALL: [NoRetry; 6] = [
        NoRetry::NonIdempotent,
        NoRetry::BodyNotReplayable,
        NoRetry::AttemptsExhausted,
        NoRetry::Deadline,
        NoRetry::NotRetryable,
        NoRetry::BudgetExhausted,
    ];

    pub fn index(self) -> usize {
        self as usize
    }

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

/// The `state` label of `detour_endpoints`: an endpoint's live state as it is counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CountedState {
    /// Eligible: healthy or not yet checked.
    Healthy,
    Unhealthy,
    Ejected,
    Terminating,
}

impl CountedState {
    /// Every state, in declaration order (`index` is the position here).
    pub const ALL: [CountedState; 4] = [
        CountedState::Healthy,
        CountedState::Unhealthy,
        CountedState::Ejected,
        CountedState::Terminating,
    ];

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CountedState::Healthy => "healthy",
            CountedState::Unhealthy => "unhealthy",
            CountedState::Ejected => "ejected",
            CountedState::Terminating => "terminating",
        }
    }

    pub fn of(state: LiveState) -> Self {
        match state {
            LiveState::Healthy | LiveState::Unknown => CountedState::Healthy,
            LiveState::Unhealthy => CountedState::Unhealthy,
            LiveState::Ejected => CountedState::Ejected,
            LiveState::Terminating => CountedState::Terminating,
        }
    }
}

/// How many endpoints are in each state (`detour_endpoints`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointCounts([i64; CountedState::ALL.len()]);

impl EndpointCounts {
    pub fn add(&mut self, state: LiveState) {
        self.0[CountedState::of(state).index()] += 1;
    }

    pub fn get(&self, state: CountedState) -> i64 {
        self.0[state.index()]
    }
}

/// Statuses of upstream gateway errors passed through to the client (`origin="upstream"`).
const PASSED_GATEWAY_ERRORS: RangeInclusive<u16> = 502..=504;

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
    /// Per `Cause::index`.
    attempt_failures: Box<[IntCounter]>,
    /// Per `Cause::index`; none for an upstream status, which is passed through, not answered.
    proxy_errors: Box<[Option<IntCounter>]>,
    /// Per status in `PASSED_GATEWAY_ERRORS`.
    upstream_errors: Box<[IntCounter]>,
    /// Per `Cause::index`.
    retries: Box<[IntCounter]>,
    pub keepalive_race_retries: IntCounter,
    /// Per `NoRetry::index`.
    retries_skipped: Box<[IntCounter]>,
    pub budget_exhausted: IntCounter,
    pub rescued: IntCounter,
    /// Per `EjectReason::index`.
    ejections: Box<[IntCounter]>,
    pub ejections_capped: IntCounter,
    pub checks_ok: IntCounter,
    pub checks_failed: IntCounter,
    pub panic: IntCounter,
    pub keepalive_races: IntCounter,
    pub incomplete_bodies: IntCounter,
    pub idle_timeout: Gauge,
    pub idle_mismatch: IntGauge,
    /// Per `CountedState::index`.
    endpoint_gauges: Box<[IntGauge]>,
    /// The fixed series above, to remove exactly those.
    created: Created,
    /// The per-endpoint series created so far, to remove them when their endpoint goes.
    endpoint_series: Mutex<HashSet<EndpointSeries>>,
}

/// The series one upstream created, each with how to remove it again: a series cannot be
/// created without being removed with the upstream.
#[derive(Default)]
struct Created(Vec<Box<dyn Fn() + Send + Sync>>);

/// One per-endpoint series: which counter, and its labels.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct EndpointSeries {
    address: String,
    pod: String,
    event: EndpointEvent,
}

/// What a per-endpoint series counts; says which counter and which last label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum EndpointEvent {
    Failure(Cause),
    Ejection(EjectReason),
}

fn register<C: Collector + Clone + 'static>(r: &Registry, c: C) -> C {
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(
        r,
        IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
    )
}

fn int_gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    register(
        r,
        IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"),
    )
}

fn duration_histogram(r: &Registry) -> HistogramVec {
    let opts = HistogramOpts::new(
        "detour_request_duration_seconds",
        "Time from receiving a request to sending response headers, retries included.",
    )
    .buckets(vec![
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ]);
    register(
        r,
        HistogramVec::new(opts, &["upstream"]).expect("valid metric"),
    )
}

// === impl Metrics ===

impl Metrics {
    pub fn new() -> Arc<Self> {
        let r = Registry::new();
        let reloads = counter_vec(
            &r,
            "detour_config_reloads_total",
            "Config loads by result; a failed one leaves the running config in place.",
            &["result"],
        );
        Arc::new(Metrics {
            idle_timeout: register(&r, GaugeVec::new(
                Opts::new("detour_upstream_idle_timeout_seconds", "How long the upstream keeps an idle keep-alive connection open, from its Keep-Alive header or learned from its closes (0: not known). Pooled connections are retired before it."),
                &["upstream"],
            ).expect("valid metric")),
            idle_mismatch: int_gauge_vec(&r, "detour_pool_idle_mismatch", "1 when the upstream closes idle connections before timeouts.poolIdle would (see detour_upstream_idle_timeout_seconds): set poolIdle below it.", &["upstream"]),
            requests: counter_vec(&r, "detour_requests_total", "Responses sent to clients, by upstream and status.", &["upstream", "status"]),
            duration: duration_histogram(&r),
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
            endpoints: int_gauge_vec(&r, "detour_endpoints", "Endpoints by state: healthy (eligible), unhealthy (active checks), ejected (outlier detection), terminating.", &["upstream", "state"]),
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
            config_info: int_gauge_vec(&r, "detour_config_info", "The running config: 1 for its hash.", &["hash"]),
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
        let mut created = Created::default();
        let mut c = |vec: &IntCounterVec, labels: &[&str]| created.series(vec, labels);
        let attempt_failures = per(&Cause::ALL, |x| c(&m.attempt_failures, &[u, x.as_str()]));
        let retries = per(&Cause::ALL, |x| c(&m.retries, &[u, x.as_str()]));
        // A keep-alive race ends a request as `connection_terminated`: the two share a series.
        let proxy_errors = per(&Cause::ALL, |x| {
            let status = x.status().as_u16().to_string();
            let labels = [u, &status, "proxy", x.proxy_status_error()];
            (x != Cause::UpstreamStatus).then(|| c(&m.gateway_errors, &labels))
        });
        let upstream_errors = PASSED_GATEWAY_ERRORS
            .map(|s| {
                let status = s.to_string();
                c(
                    &m.gateway_errors,
                    &[u, &status, "upstream", Cause::UpstreamStatus.as_str()],
                )
            })
            .collect();
        UpstreamMetrics {
            keepalive_race_retries: retries[Cause::KeepaliveRace.index()].clone(),
            retries,
            attempt_failures,
            proxy_errors,
            upstream_errors,
            retries_skipped: per(&NoRetry::ALL, |x| c(&m.retries_skipped, &[u, x.as_str()])),
            ejections: per(&EjectReason::ALL, |x| c(&m.ejections, &[u, x.as_str()])),
            budget_exhausted: c(&m.budget_exhausted, &[u]),
            rescued: c(&m.rescued, &[u]),
            ejections_capped: c(&m.ejections_capped, &[u]),
            checks_ok: c(&m.health_checks, &[u, "success"]),
            checks_failed: c(&m.health_checks, &[u, "failure"]),
            panic: c(&m.panic, &[u]),
            keepalive_races: c(&m.keepalive_races, &[u]),
            incomplete_bodies: c(&m.incomplete_bodies, &[u]),
            endpoint_gauges: per(&CountedState::ALL, |x| {
                created.series(&m.endpoints, &[u, x.as_str()])
            }),
            duration: created.series(&m.duration, &[u]),
            idle_timeout: created.series(&m.idle_timeout, &[u]),
            idle_mismatch: created.series(&m.idle_mismatch, &[u]),
            created,
            name: name.to_string(),
            statuses: (100..600).map(|_| OnceLock::new()).collect(),
            removed: AtomicBool::new(false),
            endpoint_series: Mutex::new(HashSet::new()),
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

    /// An attempt on an endpoint failed: the upstream's total and the endpoint's own series
    /// (created here at its first failure of this cause: failures only, so successful requests
    /// do no label lookup).
    pub fn attempt_failure(&self, ep: &EndpointLabels, cause: Cause) {
        self.attempt_failures[cause.index()].inc();
        self.endpoint_inc(ep, EndpointEvent::Failure(cause));
    }

    pub fn retry(&self, cause: Cause) {
        self.retries[cause.index()].inc();
    }

    pub fn retry_skipped(&self, why: NoRetry) {
        self.retries_skipped[why.index()].inc();
    }

    /// A 502/503/504 the sidecar answered itself.
    pub fn proxy_error(&self, cause: Cause) {
        self.proxy_errors[cause.index()]
            .as_ref()
            .expect("an upstream status is passed through, not answered")
            .inc();
    }

    /// A 502/503/504 the upstream sent that was passed through.
    pub fn upstream_error(&self, status: u16) {
        if PASSED_GATEWAY_ERRORS.contains(&status) {
            self.upstream_errors[usize::from(status - PASSED_GATEWAY_ERRORS.start())].inc();
        }
    }

    /// An endpoint was ejected: the upstream's total and the endpoint's own series.
    pub fn ejection(&self, ep: &EndpointLabels, reason: EjectReason) {
        self.ejections[reason.index()].inc();
        self.endpoint_inc(ep, EndpointEvent::Ejection(reason));
    }

    /// Counts under the lock that removal takes, so a reload retiring the endpoint at the same
    /// moment either sees the series (and removes it) or stops this from creating it.
    fn endpoint_inc(&self, ep: &EndpointLabels, event: EndpointEvent) {
        let mut seen = self.endpoint_series.lock();
        // Once the endpoint or this upstream left the config, a request still in flight must
        // not bring the series back.
        if self.removed.load(Ordering::Relaxed) || ep.is_retired() {
            return;
        }
        let series = EndpointSeries {
            address: ep.address.clone(),
            pod: ep.pod.clone(),
            event,
        };
        series.counter(&self.metrics, &self.name).inc();
        seen.insert(series);
    }

    /// Removes the per-endpoint series of an endpoint that left the config (retired first).
    pub fn remove_endpoint(&self, ep: &EndpointLabels) {
        self.endpoint_series.lock().retain(|s| {
            let theirs = s.address == ep.address && s.pod == ep.pod;
            if theirs {
                s.remove(&self.metrics, &self.name);
            }
            !theirs
        });
    }

    /// Sets `detour_endpoints`.
    pub fn set_endpoint_counts(&self, counts: EndpointCounts) {
        for s in CountedState::ALL {
            self.endpoint_gauges[s.index()].set(counts.get(s));
        }
    }

    /// Removes every series of this upstream (it left the config).
    pub fn remove(&self) {
        self.removed.store(true, Ordering::Relaxed);
        let u = self.name.as_str();
        for (i, slot) in self.statuses.iter().enumerate() {
            if slot.get().is_some() {
                let status = (100 + i).to_string();
                let _ = self.metrics.requests.remove_label_values(&[u, &status]);
            }
        }
        self.created.remove_all();
        for s in self.endpoint_series.lock().drain() {
            s.remove(&self.metrics, u);
        }
    }
}

/// One counter per value of a label, indexed like `all`.
fn per<L: Copy, M>(all: &[L], make: impl FnMut(L) -> M) -> Box<[M]> {
    all.iter().copied().map(make).collect()
}

// === impl Created ===

impl Created {
    /// The series of `vec` with these label values, remembered for `remove_all`.
    fn series<T, L>(&mut self, vec: &MetricVec<T>, labels: &[L]) -> T::M
    where
        T: MetricVecBuilder + 'static,
        L: AsRef<str> + std::fmt::Debug,
    {
        let owned: Vec<String> = labels.iter().map(|l| l.as_ref().to_string()).collect();
        let v = vec.clone();
        self.0.push(Box::new(move || {
            let _ = v.remove_label_values(&owned);
        }));
        vec.with_label_values(labels)
    }

    fn remove_all(&self) {
        for remove in &self.0 {
            remove();
        }
    }
}

// === impl EndpointSeries ===

impl EndpointSeries {
    fn labels<'a>(&'a self, upstream: &'a str) -> [&'a str; 4] {
        let last = match self.event {
            EndpointEvent::Failure(c) => c.as_str(),
            EndpointEvent::Ejection(r) => r.as_str(),
        };
        [upstream, &self.address, &self.pod, last]
    }

    fn vec<'m>(&self, m: &'m Metrics) -> &'m IntCounterVec {
        match self.event {
            EndpointEvent::Failure(_) => &m.endpoint_failures,
            EndpointEvent::Ejection(_) => &m.endpoint_ejections,
        }
    }

    fn counter(&self, m: &Metrics, upstream: &str) -> IntCounter {
        self.vec(m).with_label_values(&self.labels(upstream))
    }

    fn remove(&self, m: &Metrics, upstream: &str) {
        let _ = self.vec(m).remove_label_values(&self.labels(upstream));
    }
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
        let ep =
            |port: u16, pod: &str| EndpointLabels::new(([127, 0, 0, 1], port).into(), Some(pod));
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

    /// Every series `u` can have: each counter moved once, each gauge set, each per-endpoint
    /// series created for `ep`.
    fn touch_everything(u: &UpstreamMetrics, ep: &EndpointLabels) {
        for status in [200, 404, 502, 503, 504] {
            u.response(status);
            u.upstream_error(status);
        }
        for c in Cause::ALL {
            u.attempt_failure(ep, c);
            u.retry(c);
            if c != Cause::UpstreamStatus {
                u.proxy_error(c);
            }
        }
        for r in NoRetry::ALL {
            u.retry_skipped(r);
        }
        for r in EjectReason::ALL {
            u.ejection(ep, r);
        }
        let mut counts = EndpointCounts::default();
        counts.add(LiveState::Ejected);
        u.set_endpoint_counts(counts);
        for c in [
            &u.keepalive_race_retries,
            &u.budget_exhausted,
            &u.rescued,
            &u.ejections_capped,
            &u.checks_ok,
            &u.checks_failed,
            &u.panic,
            &u.keepalive_races,
            &u.incomplete_bodies,
        ] {
            c.inc();
        }
        u.duration.observe(0.1);
        u.idle_timeout.set(4.0);
        u.idle_mismatch.set(1);
    }

    /// The series lines (not `# HELP`/`# TYPE`) that mention `needle`.
    fn series_with(m: &Metrics, needle: &str) -> Vec<String> {
        m.encode()
            .lines()
            .filter(|l| !l.starts_with('#') && l.contains(needle))
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn removing_an_upstream_removes_every_series_it_created_and_no_other() {
        let m = Metrics::new();
        let (shop, other) = (
            UpstreamMetrics::new(&m, "shop/web"),
            UpstreamMetrics::new(&m, "shop/api"),
        );
        let ep = EndpointLabels::new(([10, 0, 0, 1], 80).into(), Some("web-1"));
        touch_everything(&shop, &ep);
        touch_everything(&other, &ep);
        let before = series_with(&m, "shop/api");
        assert!(series_with(&m, "shop/web").len() > 50);
        shop.remove();
        assert_eq!(series_with(&m, "shop/web"), Vec::<String>::new());
        assert_eq!(
            series_with(&m, "shop/api"),
            before,
            "the other upstream keeps its own"
        );
        // Requests still in flight when it went bring nothing back.
        touch_everything(&shop, &ep);
        assert_eq!(series_with(&m, "shop/web"), Vec::<String>::new());
    }

    #[test]
    fn removing_an_endpoint_removes_every_series_it_has_and_no_other() {
        let m = Metrics::new();
        let u = UpstreamMetrics::new(&m, "shop/web");
        let a = EndpointLabels::new(([10, 0, 0, 1], 80).into(), Some("web-a"));
        let b = EndpointLabels::new(([10, 0, 0, 2], 80).into(), None);
        touch_everything(&u, &a);
        touch_everything(&u, &b);
        let of_b = series_with(&m, "10.0.0.2:80");
        assert_eq!(
            of_b.len(),
            Cause::ALL.len() + EjectReason::ALL.len(),
            "one series per cause and per reason"
        );
        assert!(
            of_b.iter().all(|l| l.contains(r#"upstream_pod="""#)),
            "{of_b:?}"
        );
        a.retire();
        u.remove_endpoint(&a);
        assert_eq!(series_with(&m, "10.0.0.1:80"), Vec::<String>::new());
        assert_eq!(series_with(&m, "10.0.0.2:80"), of_b);
    }

    #[test]
    fn label_lists_are_in_declaration_order_and_counts_go_by_state() {
        for (i, r) in NoRetry::ALL.into_iter().enumerate() {
            assert_eq!(r.index(), i, "{}", r.as_str());
        }
        for (i, s) in CountedState::ALL.into_iter().enumerate() {
            assert_eq!(s.index(), i, "{}", s.as_str());
        }
        let mut counts = EndpointCounts::default();
        for s in [
            LiveState::Healthy,
            LiveState::Unknown,
            LiveState::Unhealthy,
            LiveState::Terminating,
            LiveState::Terminating,
        ] {
            counts.add(s);
        }
        let by_state = CountedState::ALL.map(|s| (s.as_str(), counts.get(s)));
        assert_eq!(
            by_state,
            [
                ("healthy", 2),
                ("unhealthy", 1),
                ("ejected", 0),
                ("terminating", 2)
            ]
        );
        let m = Metrics::new();
        let u = UpstreamMetrics::new(&m, "shop/web");
        u.set_endpoint_counts(counts);
        assert!(m
            .encode()
            .contains(r#"detour_endpoints{state="terminating",upstream="shop/web"} 2"#));
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
