//! One endpoint's live state: what Kubernetes says (ready/terminating), what active health checks
//! say, what passive outlier detection says, and the load on it. Read on every request, so the
//! hot fields are atomics; the rare transitions (ejection) take a lock.
//!
//! The passive state machine: consecutive failures → ejected for base × n (capped) → back on
//! probation, where the first gateway failure ejects again at once and the first success clears it.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering},
        Arc,
    },
    time::Duration,
};

use parking_lot::Mutex;
use serde::Serialize;
use tokio::time::Instant;

use super::pool::{IdleLearner, Pool, PoolConfig};
use crate::config::{EndpointState, HealthCheck, OutlierDetection};
use crate::report::LiveState;

pub struct Endpoint {
    pub addr: SocketAddr,
    pub pod: Option<String>,
    /// What its own metric series are labelled with.
    pub labels: EndpointLabels,
    /// `Host` for a request that came without one: the endpoint's address.
    host: http::HeaderValue,
    /// One pool per worker thread (plus one for callers outside the workers), so a connection
    /// is only ever used by the thread that drives it.
    pools: Box<[Pool]>,
    terminating: AtomicBool,
    inflight: AtomicU32,
    /// Active health: see `Health`.
    health: AtomicU8,
    check_ok_streak: AtomicU32,
    check_fail_streak: AtomicU32,
    consecutive_gateway: AtomicU32,
    consecutive_5xx: AtomicU32,
    /// Milliseconds after `epoch` until which the endpoint is ejected (0: not ejected).
    ejected_until_ms: AtomicU64,
    probation: AtomicBool,
    epoch: Instant,
    ejection: Mutex<EjectionHistory>,
    /// Peak-EWMA latency in nanoseconds and when it was last updated.
    ewma: Mutex<(f64, Instant)>,
}

/// An endpoint as its own metric series name it, and whether it left the config: its series
/// are then gone, and requests still in flight on it must not bring them back.
#[derive(Debug)]
pub struct EndpointLabels {
    /// `upstream_address` (not `endpoint`: Prometheus attaches that to the scrape target and
    /// would rename ours `exported_endpoint`).
    pub address: String,
    /// `upstream_pod`, empty when the pod is not known.
    pub pod: String,
    retired: AtomicBool,
}

#[derive(Default)]
struct EjectionHistory {
    count: u32,
    last_end: Option<Instant>,
}

/// Result of active health checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Not checked yet (or checks disabled): trusted, as Kubernetes said ready.
    Unknown,
    Healthy,
    Unhealthy,
}

/// A failure seen on live traffic, for outlier detection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// Connect refused: nothing listens.
    Refused,
    /// Another gateway failure: connect timeout, reset, per-try timeout, 502/503/504.
    Gateway,
    /// A 5xx that is not a gateway error (500, 501, 505...).
    ServerError,
}

/// Why an endpoint was ejected (`reason` label of `detour_ejections_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EjectReason {
    ConnectRefused,
    ConsecutiveGatewayErrors,
    Consecutive5xx,
    ProbationFailure,
}

/// A change of active health state worth logging.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HealthChange {
    BecameHealthy,
    BecameUnhealthy,
}

/// Decrements the endpoint's in-flight count when dropped.
#[derive(Debug)]
pub struct InflightGuard(Arc<Endpoint>);

/// A point-in-time view for `/config` and metrics.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSnapshot {
    pub address: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    pub state: EndpointState,
    pub health: Health,
    pub ejected: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ejected_for_ms: Option<u64>,
    pub ejections: u32,
    pub probation: bool,
    pub inflight: u32,
    pub consecutive_gateway_errors: u32,
    pub idle_connections: usize,
}

// === impl Endpoint ===

impl Endpoint {
    pub fn new(
        addr: SocketAddr,
        pod: Option<String>,
        state: EndpointState,
        pool: PoolConfig,
        workers: usize,
    ) -> Self {
        let now = Instant::now();
        Endpoint {
            labels: EndpointLabels::new(addr, pod.as_deref()),
            addr,
            pod,
            host: http::HeaderValue::from_str(&addr.to_string()).expect("an address is ASCII"),
            pools: (0..=workers).map(|_| Pool::new(addr, pool)).collect(),
            terminating: AtomicBool::new(state == EndpointState::Terminating),
            inflight: AtomicU32::new(0),
            health: AtomicU8::new(Health::Unknown as u8),
            check_ok_streak: AtomicU32::new(0),
            check_fail_streak: AtomicU32::new(0),
            consecutive_gateway: AtomicU32::new(0),
            consecutive_5xx: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            probation: AtomicBool::new(false),
            epoch: now,
            ejection: Mutex::new(EjectionHistory::default()),
            // A new endpoint starts at 1 ms, not 0: an untested (maybe hung) pod must not look
            // infinitely fast to peak-EWMA.
            ewma: Mutex::new((1e6, now)),
        }
    }

    pub fn host_header(&self) -> &http::HeaderValue {
        &self.host
    }

    /// The connection pool of the calling thread.
    pub fn pool(&self) -> &Pool {
        let last = self.pools.len() - 1;
        let i = super::workers::current().map_or(last, |w| w.min(last));
        &self.pools[i]
    }

    /// Closes pooled connections idle for longer than `poolIdle`, on every worker's pool.
    pub fn purge_idle_connections(&self) {
        for p in self.pools.iter() {
            p.purge();
        }
    }

    pub fn set_pool_config(&self, cfg: PoolConfig) {
        for p in self.pools.iter() {
            p.set_config(cfg);
        }
    }

    /// Every worker's pool reports to, and is limited by, the upstream's idle learner.
    pub fn set_idle_learner(&self, learner: &Arc<IdleLearner>) {
        for p in self.pools.iter() {
            p.set_learner(learner.clone());
        }
    }

    /// Marks the endpoint as gone from the config.
    pub fn retire(&self) {
        self.labels.retire();
    }

    pub fn set_state(&self, state: EndpointState) {
        self.terminating
            .store(state == EndpointState::Terminating, Ordering::Relaxed);
    }

    pub fn is_terminating(&self) -> bool {
        self.terminating.load(Ordering::Relaxed)
    }

    pub fn inflight(&self) -> u32 {
        self.inflight.load(Ordering::Relaxed)
    }

    pub fn start_request(self: &Arc<Self>) -> InflightGuard {
        self.inflight.fetch_add(1, Ordering::Relaxed);
        InflightGuard(self.clone())
    }

    pub fn health(&self) -> Health {
        match self.health.load(Ordering::Relaxed) {
            1 => Health::Healthy,
            2 => Health::Unhealthy,
            _ => Health::Unknown,
        }
    }

    /// Forgets active-check results (health checks were turned off).
    pub fn reset_health(&self) {
        self.health.store(Health::Unknown as u8, Ordering::Relaxed);
        self.check_ok_streak.store(0, Ordering::Relaxed);
        self.check_fail_streak.store(0, Ordering::Relaxed);
    }

    /// Applies one active check result. The first result decides at once; after that the
    /// thresholds apply.
    pub fn record_check(&self, ok: bool, hc: &HealthCheck) -> Option<HealthChange> {
        let (streak, other) = if ok {
            (&self.check_ok_streak, &self.check_fail_streak)
        } else {
            (&self.check_fail_streak, &self.check_ok_streak)
        };
        other.store(0, Ordering::Relaxed);
        let n = streak.fetch_add(1, Ordering::Relaxed) + 1;
        let cur = self.health();
        let next = match (cur, ok) {
            (Health::Unknown, true) => Health::Healthy,
            (Health::Unknown, false) => Health::Unhealthy,
            (Health::Unhealthy, true) if n >= hc.healthy_threshold => Health::Healthy,
            (Health::Healthy, false) if n >= hc.unhealthy_threshold => Health::Unhealthy,
            (h, _) => h,
        };
        self.health.store(next as u8, Ordering::Relaxed);
        match (cur, next) {
            (Health::Unhealthy, Health::Healthy) => Some(HealthChange::BecameHealthy),
            (Health::Unknown | Health::Healthy, Health::Unhealthy) => {
                Some(HealthChange::BecameUnhealthy)
            }
            _ => None,
        }
    }

    pub fn is_ejected(&self, now: Instant) -> bool {
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        until != 0 && self.millis(now) < until
    }

    pub fn live_state(&self, now: Instant) -> LiveState {
        if self.is_terminating() {
            LiveState::Terminating
        } else if self.is_ejected(now) {
            LiveState::Ejected
        } else if self.health() == Health::Unhealthy {
            LiveState::Unhealthy
        } else {
            LiveState::Healthy
        }
    }

    /// Usable for normal balancing: healthy (or not yet checked), not ejected, not terminating.
    #[cfg(test)]
    pub fn is_eligible(&self, now: Instant) -> bool {
        !self.is_terminating() && self.health() != Health::Unhealthy && !self.is_ejected(now)
    }

    /// A response that was not a failure clears the failure streaks and ends probation.
    pub fn record_success(&self) {
        if self.consecutive_gateway.load(Ordering::Relaxed) != 0 {
            self.consecutive_gateway.store(0, Ordering::Relaxed);
        }
        if self.consecutive_5xx.load(Ordering::Relaxed) != 0 {
            self.consecutive_5xx.store(0, Ordering::Relaxed);
        }
        if self.probation.load(Ordering::Relaxed) {
            self.probation.store(false, Ordering::Relaxed);
        }
    }

    /// Records a failure on live traffic; returns the reason to eject, if the endpoint should be.
    /// The caller checks the upstream-wide cap and then calls `eject`.
    pub fn record_failure(
        &self,
        failure: Failure,
        od: &OutlierDetection,
        now: Instant,
    ) -> Option<EjectReason> {
        if self.is_ejected(now) {
            // Requests already in flight when it was ejected: no double ejection.
            return None;
        }
        let gateway = matches!(failure, Failure::Refused | Failure::Gateway);
        let gateway_streak = if gateway {
            self.consecutive_gateway.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            self.consecutive_gateway.store(0, Ordering::Relaxed);
            0
        };
        let error_streak = self.consecutive_5xx.fetch_add(1, Ordering::Relaxed) + 1;
        if gateway && self.probation.load(Ordering::Relaxed) {
            return Some(EjectReason::ProbationFailure);
        }
        if failure == Failure::Refused && od.eject_on_connect_refused {
            return Some(EjectReason::ConnectRefused);
        }
        if od.consecutive_gateway_errors > 0 && gateway_streak >= od.consecutive_gateway_errors {
            return Some(EjectReason::ConsecutiveGatewayErrors);
        }
        if od.consecutive_5xx > 0 && error_streak >= od.consecutive_5xx {
            return Some(EjectReason::Consecutive5xx);
        }
        None
    }

    /// Ejects for base × (number of recent ejections), capped at the max. Returns the duration.
    pub fn eject(&self, od: &OutlierDetection, now: Instant) -> Duration {
        let mut hist = self.ejection.lock();
        if let Some(end) = hist.last_end {
            // A long clean stretch forgives earlier ejections (Envoy decays the multiplier too).
            if now.saturating_duration_since(end) > od.max_ejection_time.get() {
                hist.count = 0;
            }
        }
        hist.count = hist.count.saturating_add(1);
        let d = od
            .base_ejection_time
            .get()
            .saturating_mul(hist.count)
            .min(od.max_ejection_time.get());
        let until = now + d;
        hist.last_end = Some(until);
        self.ejected_until_ms
            .store(self.millis(until).max(1), Ordering::Relaxed);
        self.probation.store(true, Ordering::Relaxed);
        self.consecutive_gateway.store(0, Ordering::Relaxed);
        self.consecutive_5xx.store(0, Ordering::Relaxed);
        d
    }

    pub fn ejections(&self) -> u32 {
        self.ejection.lock().count
    }

    fn millis(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// Records a response latency for peak-EWMA balancing (decay constant 10 s, as Finagle and
    /// Linkerd use; a slower sample replaces the average at once: "peak").
    pub fn observe_latency(&self, rtt: Duration, now: Instant) {
        const TAU_NS: f64 = 10e9;
        let sample = rtt.as_nanos() as f64;
        let mut ewma = self.ewma.lock();
        let (cost, last) = *ewma;
        let next = if sample > cost {
            sample
        } else {
            let elapsed = now.saturating_duration_since(last).as_nanos() as f64;
            let weight = (-elapsed / TAU_NS).exp();
            cost * weight + sample * (1.0 - weight)
        };
        *ewma = (next, now);
    }

    /// Peak-EWMA load: latency estimate × (requests in flight + 1).
    pub fn ewma_load(&self) -> f64 {
        let cost = self.ewma.lock().0.max(1.0);
        cost * (self.inflight() as f64 + 1.0)
    }

    pub fn snapshot(&self, now: Instant) -> EndpointSnapshot {
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        let now_ms = self.millis(now);
        let ejected = until != 0 && now_ms < until;
        EndpointSnapshot {
            address: self.addr.to_string(),
            pod: self.pod.clone(),
            state: if self.is_terminating() {
                EndpointState::Terminating
            } else {
                EndpointState::Ready
            },
            health: self.health(),
            ejected,
            ejected_for_ms: ejected.then(|| until - now_ms),
            ejections: self.ejections(),
            probation: self.probation.load(Ordering::Relaxed),
            inflight: self.inflight(),
            consecutive_gateway_errors: self.consecutive_gateway.load(Ordering::Relaxed),
            idle_connections: self.pools.iter().map(Pool::idle_len).sum(),
        }
    }
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("addr", &self.addr)
            .field("pod", &self.pod)
            .finish()
    }
}

impl InflightGuard {
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.0
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

// === impl EndpointLabels ===

impl EndpointLabels {
    pub fn new(addr: SocketAddr, pod: Option<&str>) -> Self {
        EndpointLabels {
            address: addr.to_string(),
            pod: pod.unwrap_or_default().to_string(),
            retired: AtomicBool::new(false),
        }
    }

    pub fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
    }

    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Relaxed)
    }
}

// === impl EjectReason ===

impl EjectReason {
    /// Every reason, in declaration order (`index` is the position here).
    pub const ALL: [EjectReason; 4] = [
        EjectReason::ConnectRefused,
        EjectReason::ConsecutiveGatewayErrors,
        EjectReason::Consecutive5xx,
        EjectReason::ProbationFailure,
    ];

    /// The position in `ALL`, for series kept per reason.
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn as_str(self) -> &'static str {
        match self {
            EjectReason::ConnectRefused => "connect_refused",
            EjectReason::ConsecutiveGatewayErrors => "consecutive_gateway_errors",
            EjectReason::Consecutive5xx => "consecutive_5xx",
            EjectReason::ProbationFailure => "probation_failure",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Duration as CfgDuration;

    fn ep() -> Arc<Endpoint> {
        Arc::new(Endpoint::new(
            "127.0.0.1:1".parse().unwrap(),
            None,
            EndpointState::Ready,
            PoolConfig::default(),
            0,
        ))
    }

    fn od() -> OutlierDetection {
        OutlierDetection {
            base_ejection_time: CfgDuration::from_secs(10),
            max_ejection_time: CfgDuration::from_secs(25),
            ..Default::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_gateway_errors_eject_then_return_on_probation() {
        let e = ep();
        let od = od();
        let now = Instant::now();
        assert_eq!(e.record_failure(Failure::Gateway, &od, now), None);
        assert_eq!(e.record_failure(Failure::Gateway, &od, now), None);
        let r = e.record_failure(Failure::Gateway, &od, now);
        assert_eq!(r, Some(EjectReason::ConsecutiveGatewayErrors));
        assert_eq!(e.eject(&od, now), Duration::from_secs(10));
        assert!(e.is_ejected(Instant::now()) && !e.is_eligible(Instant::now()));

        tokio::time::advance(Duration::from_millis(9_999)).await;
        assert!(e.is_ejected(Instant::now()));
        tokio::time::advance(Duration::from_millis(2)).await;
        assert!(!e.is_ejected(Instant::now()) && e.is_eligible(Instant::now()));

        // On probation: the first failure ejects again, for twice as long.
        let now = Instant::now();
        assert_eq!(
            e.record_failure(Failure::Gateway, &od, now),
            Some(EjectReason::ProbationFailure)
        );
        assert_eq!(e.eject(&od, now), Duration::from_secs(20));
        // Third time is capped at max.
        tokio::time::advance(Duration::from_secs(21)).await;
        let now = Instant::now();
        e.record_failure(Failure::Gateway, &od, now).unwrap();
        assert_eq!(e.eject(&od, now), Duration::from_secs(25));
    }

    #[tokio::test(start_paused = true)]
    async fn success_ends_probation_and_resets_streaks() {
        let e = ep();
        let od = od();
        let now = Instant::now();
        e.record_failure(Failure::Gateway, &od, now);
        e.record_failure(Failure::Gateway, &od, now);
        e.record_success();
        assert_eq!(e.record_failure(Failure::Gateway, &od, now), None);
        e.eject(&od, now);
        tokio::time::advance(Duration::from_secs(11)).await;
        e.record_success();
        assert_eq!(
            e.record_failure(Failure::Gateway, &od, Instant::now()),
            None
        );
    }

    #[tokio::test(start_paused = true)]
    async fn refusal_ejects_at_once_unless_disabled() {
        let e = ep();
        let mut od = od();
        assert_eq!(
            e.record_failure(Failure::Refused, &od, Instant::now()),
            Some(EjectReason::ConnectRefused)
        );
        let e = ep();
        od.eject_on_connect_refused = false;
        assert_eq!(
            e.record_failure(Failure::Refused, &od, Instant::now()),
            None
        );
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_5xx_only_when_enabled() {
        let e = ep();
        let mut od = od();
        for _ in 0..10 {
            assert_eq!(
                e.record_failure(Failure::ServerError, &od, Instant::now()),
                None
            );
        }
        od.consecutive_5xx = 2;
        let e = ep();
        assert_eq!(
            e.record_failure(Failure::ServerError, &od, Instant::now()),
            None
        );
        assert_eq!(
            e.record_failure(Failure::ServerError, &od, Instant::now()),
            Some(EjectReason::Consecutive5xx)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn multiplier_decays_after_a_long_clean_stretch() {
        let e = ep();
        let od = od();
        e.eject(&od, Instant::now());
        tokio::time::advance(Duration::from_secs(11)).await;
        e.record_success();
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(e.eject(&od, Instant::now()), Duration::from_secs(10));
    }

    #[test]
    fn first_check_decides_then_thresholds_apply() {
        let e = ep();
        let hc = HealthCheck {
            healthy_threshold: 2,
            unhealthy_threshold: 3,
            ..Default::default()
        };
        assert_eq!(e.health(), Health::Unknown);
        assert_eq!(
            e.record_check(false, &hc),
            Some(HealthChange::BecameUnhealthy)
        );
        assert_eq!(e.record_check(true, &hc), None);
        assert_eq!(e.health(), Health::Unhealthy);
        assert_eq!(e.record_check(true, &hc), Some(HealthChange::BecameHealthy));
        assert_eq!(e.record_check(false, &hc), None);
        assert_eq!(e.record_check(false, &hc), None);
        assert_eq!(e.record_check(true, &hc), None);
        assert_eq!(e.record_check(false, &hc), None);
        assert_eq!(e.record_check(false, &hc), None);
        assert_eq!(
            e.record_check(false, &hc),
            Some(HealthChange::BecameUnhealthy)
        );
    }

    #[test]
    fn inflight_guard_counts() {
        let e = ep();
        let a = e.start_request();
        let b = e.start_request();
        assert_eq!(e.inflight(), 2);
        drop(a);
        drop(b);
        assert_eq!(e.inflight(), 0);
    }

    #[test]
    fn every_eject_reason_is_listed_once_at_its_index() {
        for (i, r) in EjectReason::ALL.into_iter().enumerate() {
            assert_eq!(r.index(), i, "{}", r.as_str());
        }
    }

    #[test]
    fn labels_name_the_address_and_pod_and_retiring_marks_them() {
        let e = Endpoint::new(
            "10.0.0.7:8080".parse().unwrap(),
            Some("web-1".into()),
            EndpointState::Ready,
            PoolConfig::default(),
            0,
        );
        assert_eq!(
            (e.labels.address.as_str(), e.labels.pod.as_str()),
            ("10.0.0.7:8080", "web-1")
        );
        assert!(!e.labels.is_retired());
        e.retire();
        assert!(e.labels.is_retired());
        assert_eq!(ep().labels.pod, "", "no pod: an empty label");
    }

    #[test]
    fn terminating_is_not_eligible() {
        let e = ep();
        e.set_state(EndpointState::Terminating);
        assert!(!e.is_eligible(Instant::now()));
        e.set_state(EndpointState::Ready);
        assert!(e.is_eligible(Instant::now()));
    }
}
