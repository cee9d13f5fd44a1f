//! The running form of one configured upstream: its endpoints (with live state), policy, retry
//! budget and metric handles. Replaced as a whole on reload (an `ArcSwap` per listener), while the
//! `Endpoint`s that stay are carried over, so health and ejection state survive reloads.

use std::{collections::HashMap, net::SocketAddr, sync::Arc};

use tokio::time::Instant;

use super::{
    body::BodyFailure,
    budget::Budget,
    endpoint::{Endpoint, EndpointSnapshot, Failure},
    errors::Cause,
    metrics::{EndpointCounts, UpstreamMetrics},
    pool::{IdleLearner, IdleReport, IdleView, PoolConfig},
};
use crate::config::{Policy, Upstream};

pub struct UpstreamRt {
    pub name: String,
    pub policy: Policy,
    pub endpoints: Vec<Arc<Endpoint>>,
    pub metrics: Arc<UpstreamMetrics>,
    pub budget: Arc<Budget>,
    /// What the upstream's idle closes and `Keep-Alive` headers say; carried over reloads.
    idle: Arc<IdleLearner>,
    /// Serializes "count the ejected, then eject" so concurrent failures cannot exceed
    /// `maxEjectionPercent`. Taken only when an endpoint is about to be ejected.
    eject_lock: parking_lot::Mutex<()>,
}

impl std::fmt::Debug for UpstreamRt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamRt")
            .field("name", &self.name)
            .field("endpoints", &self.endpoints.len())
            .finish()
    }
}

impl UpstreamRt {
    /// Builds the running upstream from its config, reusing endpoints (and their state, pools)
    /// and the retry budget of `prev` where they carry over.
    pub fn build(
        cfg: &Upstream,
        prev: Option<&UpstreamRt>,
        metrics: Arc<UpstreamMetrics>,
        workers: usize,
    ) -> UpstreamRt {
        let pool_cfg = pool_config(&cfg.policy);
        let idle = prev.map_or_else(Arc::default, |p| p.idle.clone());
        idle.configure(
            pool_cfg.idle_timeout,
            IdleReport {
                upstream: cfg.name.clone(),
                timeout_seconds: metrics.idle_timeout.clone(),
                mismatch: metrics.idle_mismatch.clone(),
            },
        );
        let old: HashMap<SocketAddr, &Arc<Endpoint>> = prev
            .map(|p| p.endpoints.iter().map(|e| (e.addr, e)).collect())
            .unwrap_or_default();
        let endpoints: Vec<Arc<Endpoint>> = cfg
            .endpoints
            .iter()
            .filter_map(|e| {
                let addr = e.socket_addr()?;
                Some(match old.get(&addr) {
                    Some(existing) if existing.pod == e.pod => {
                        existing.set_state(e.state);
                        existing.set_pool_config(pool_cfg);
                        (*existing).clone()
                    }
                    _ => Arc::new(Endpoint::new(
                        addr,
                        e.pod.clone(),
                        e.state,
                        pool_cfg,
                        workers,
                    )),
                })
            })
            .collect();
        for ep in &endpoints {
            ep.set_idle_learner(&idle);
        }
        let budget = match prev {
            Some(p) if p.policy.retries.budget == cfg.policy.retries.budget => p.budget.clone(),
            _ => Arc::new(Budget::new(&cfg.policy.retries.budget)),
        };
        UpstreamRt {
            name: cfg.name.clone(),
            policy: cfg.policy.clone(),
            endpoints,
            metrics,
            budget,
            idle,
            eject_lock: parking_lot::Mutex::new(()),
        }
    }

    /// After this upstream replaced `prev`: the endpoints of `prev` that were not carried over
    /// are retired and their per-endpoint series removed.
    pub fn retire_dropped(&self, prev: &UpstreamRt) {
        for old in &prev.endpoints {
            if !self.endpoints.iter().any(|e| Arc::ptr_eq(e, old)) {
                old.retire();
                self.metrics.remove_endpoint(&old.labels);
            }
        }
    }

    /// Records a failure of live traffic and ejects the endpoint when outlier detection says so
    /// and `maxEjectionPercent` allows it.
    pub fn record_failure(&self, ep: &Endpoint, failure: Failure, now: Instant) {
        let od = &self.policy.outlier_detection;
        let Some(reason) = ep.record_failure(failure, od, now) else {
            return;
        };
        let n = self.endpoints.len();
        let max = if od.max_ejection_percent == 0 {
            0
        } else {
            (n * od.max_ejection_percent as usize / 100).max(1)
        };
        let _serial = self.eject_lock.lock();
        if ep.is_ejected(now) {
            return;
        }
        let ejected = self.endpoints.iter().filter(|e| e.is_ejected(now)).count();
        if ejected >= max {
            self.metrics.ejections_capped.inc();
            tracing::debug!(upstream = %self.name, endpoint = %ep.addr, "ejection skipped: maxEjectionPercent reached");
            return;
        }
        let ejected_for = ep.eject(od, now);
        self.metrics.ejection(&ep.labels, reason);
        tracing::warn!(
            upstream = %self.name,
            endpoint = %ep.addr,
            pod = ep.pod.as_deref().unwrap_or(""),
            reason = reason.as_str(),
            ejected_for_ms = ejected_for.as_millis() as u64,
            "endpoint ejected"
        );
    }

    /// How many endpoints are in each state.
    pub fn endpoint_counts(&self, now: Instant) -> EndpointCounts {
        let mut counts = EndpointCounts::default();
        for e in &self.endpoints {
            counts.add(e.live_state(now));
        }
        counts
    }

    /// How long the upstream keeps idle connections open, as far as detour knows, for `/config`.
    pub fn idle_view(&self) -> IdleView {
        self.idle.view()
    }

    pub fn snapshot(&self, now: Instant) -> Vec<EndpointSnapshot> {
        self.endpoints.iter().map(|e| e.snapshot(now)).collect()
    }
}

impl BodyFailure for UpstreamRt {
    /// The endpoint broke a response body off after its headers were sent: counted, and held
    /// against the endpoint.
    fn body_failed(&self, ep: &Endpoint) {
        self.metrics.incomplete_bodies.inc();
        self.metrics
            .attempt_failure(&ep.labels, Cause::HttpResponseIncomplete);
        self.record_failure(ep, Failure::Gateway, Instant::now());
    }
}

pub fn pool_config(policy: &Policy) -> PoolConfig {
    PoolConfig {
        connect_timeout: policy.timeouts.connect.get(),
        idle_timeout: policy.timeouts.pool_idle.get(),
        ..PoolConfig::default()
    }
}
