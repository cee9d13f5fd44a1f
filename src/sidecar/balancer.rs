//! Endpoint choice: power of two choices over the eligible endpoints, least load wins.
//!
//! Tiers, first non-empty wins: (1) eligible endpoints not yet tried by this request; in panic
//! mode (eligible share below `panicThreshold`) every non-terminating endpoint not yet tried;
//! (2) terminating endpoints that are still healthy (a rolling update left nothing else);
//! (3) the same again including endpoints this request already tried — a retry goes to the same
//! endpoint only when no other exists.

use std::{net::SocketAddr, sync::Arc};

use rand::Rng;
use smallvec::SmallVec;
use tokio::time::Instant;

use super::endpoint::{Endpoint, Health};
use crate::config::LoadBalancer;

#[derive(Debug)]
pub struct Pick<'a> {
    /// Borrowed from the upstream: the request path clones it only for what outlives the pick.
    pub endpoint: &'a Arc<Endpoint>,
    /// Chosen in panic mode.
    pub panic: bool,
}

/// Why nothing could be picked (for the 503's details).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoEndpoint {
    pub total: usize,
    pub unhealthy: usize,
    pub ejected: usize,
    pub terminating: usize,
}

impl std::fmt::Display for NoEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.total == 0 {
            write!(f, "the upstream has no endpoints")
        } else {
            write!(
                f,
                "no eligible endpoint among {} ({} unhealthy, {} ejected, {} terminating)",
                self.total, self.unhealthy, self.ejected, self.terminating
            )
        }
    }
}

pub fn pick<'a>(
    endpoints: &'a [Arc<Endpoint>],
    tried: &[SocketAddr],
    lb: LoadBalancer,
    panic_threshold: u32,
    now: Instant,
) -> Result<Pick<'a>, NoEndpoint> {
    // One pass sorts every endpoint into its tier; the state read here is the state used.
    let mut eligible: SmallVec<[&Arc<Endpoint>; 8]> = SmallVec::new();
    let mut eligible_tried: SmallVec<[&Arc<Endpoint>; 8]> = SmallVec::new();
    let mut bad: SmallVec<[&Arc<Endpoint>; 8]> = SmallVec::new();
    let mut bad_tried: SmallVec<[&Arc<Endpoint>; 8]> = SmallVec::new();
    let mut draining: SmallVec<[&Arc<Endpoint>; 8]> = SmallVec::new();
    let mut draining_tried: SmallVec<[&Arc<Endpoint>; 8]> = SmallVec::new();
    let mut why = NoEndpoint {
        total: endpoints.len(),
        unhealthy: 0,
        ejected: 0,
        terminating: 0,
    };
    for e in endpoints {
        let was_tried = tried.contains(&e.addr);
        let ejected = e.is_ejected(now);
        let unhealthy = e.health() == Health::Unhealthy;
        let (fresh, again) = if e.is_terminating() {
            why.terminating += 1;
            if ejected || unhealthy {
                continue;
            }
            (&mut draining, &mut draining_tried)
        } else if ejected || unhealthy {
            if ejected {
                why.ejected += 1;
            } else {
                why.unhealthy += 1;
            }
            (&mut bad, &mut bad_tried)
        } else {
            (&mut eligible, &mut eligible_tried)
        };
        if was_tried {
            again.push(e);
        } else {
            fresh.push(e);
        }
    }
    // Panic when too few endpoints can take traffic; healthy terminating ones count as capacity
    // (they still serve), so one ejected pod next to draining ones does not get all the traffic.
    let usable = eligible.len() + eligible_tried.len() + draining.len() + draining_tried.len();
    let total = usable + bad.len() + bad_tried.len();
    let panic = !bad.is_empty() || !bad_tried.is_empty();
    let panic = panic && usable * 100 < panic_threshold as usize * total;
    if panic {
        // Balance over every ready endpoint, good or bad (Envoy's panic routing).
        eligible.extend(bad.iter().copied());
        eligible_tried.extend(bad_tried.iter().copied());
    }
    let tiers: [(&[&Arc<Endpoint>], bool); 4] = [
        (&eligible, panic),
        (&draining, false),
        (&eligible_tried, panic),
        (&draining_tried, false),
    ];
    for (candidates, in_panic) in tiers {
        if let Some(endpoint) = p2c(candidates, lb) {
            return Ok(Pick {
                endpoint,
                panic: in_panic,
            });
        }
    }
    Err(why)
}

/// Two random distinct candidates; the less loaded one wins.
fn p2c<'a>(candidates: &[&'a Arc<Endpoint>], lb: LoadBalancer) -> Option<&'a Arc<Endpoint>> {
    let n = candidates.len();
    match n {
        0 => return None,
        1 => return Some(candidates[0]),
        _ => {}
    }
    let mut rng = rand::rng();
    let a = rng.random_range(0..n);
    let mut b = rng.random_range(0..n - 1);
    if b >= a {
        b += 1;
    }
    let (x, y) = (candidates[a], candidates[b]);
    let y_better = match lb {
        LoadBalancer::LeastRequest => y.inflight() < x.inflight(),
        LoadBalancer::PeakEwma => y.ewma_load() < x.ewma_load(),
    };
    Some(if y_better { y } else { x })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{EndpointState, HealthCheck, OutlierDetection};

    fn eps(n: u16) -> Vec<Arc<Endpoint>> {
        (1..=n)
            .map(|i| {
                let addr: SocketAddr = format!("127.0.0.1:{i}").parse().unwrap();
                Arc::new(Endpoint::new(
                    addr,
                    None,
                    EndpointState::Ready,
                    Default::default(),
                    0,
                ))
            })
            .collect()
    }

    fn lr<'a>(
        eps: &'a [Arc<Endpoint>],
        tried: &[SocketAddr],
        panic: u32,
    ) -> Result<Pick<'a>, NoEndpoint> {
        pick(
            eps,
            tried,
            LoadBalancer::LeastRequest,
            panic,
            Instant::now(),
        )
    }

    #[test]
    fn least_request_wins_between_two() {
        let e = eps(2);
        let _busy: Vec<_> = (0..5).map(|_| e[0].start_request()).collect();
        for _ in 0..50 {
            assert_eq!(lr(&e, &[], 50).unwrap().endpoint.addr, e[1].addr);
        }
    }

    #[test]
    fn spreads_over_equal_endpoints() {
        let e = eps(3);
        let mut hits = [0; 3];
        for _ in 0..3000 {
            let p = lr(&e, &[], 50).unwrap();
            hits[e.iter().position(|x| x.addr == p.endpoint.addr).unwrap()] += 1;
        }
        assert!(hits.iter().all(|h| *h > 700), "{hits:?}");
    }

    #[test]
    fn retries_go_elsewhere_unless_nothing_else() {
        let e = eps(3);
        for _ in 0..50 {
            let p = lr(&e, &[e[0].addr, e[1].addr], 50).unwrap();
            assert_eq!(p.endpoint.addr, e[2].addr);
        }
        let all: Vec<_> = e.iter().map(|x| x.addr).collect();
        assert!(lr(&e, &all, 50).is_ok());
    }

    #[test]
    fn unhealthy_and_ejected_are_skipped() {
        let e = eps(4);
        let hc = HealthCheck::default();
        e[0].record_check(false, &hc);
        e[1].eject(&OutlierDetection::default(), Instant::now());
        for _ in 0..50 {
            let p = lr(&e, &[], 50).unwrap();
            assert!(p.endpoint.addr == e[2].addr || p.endpoint.addr == e[3].addr);
            assert!(!p.panic);
        }
    }

    #[test]
    fn panic_mode_balances_over_all() {
        let e = eps(4);
        let hc = HealthCheck::default();
        for x in &e[..3] {
            x.record_check(false, &hc);
        }
        // 1 of 4 eligible = 25 % < 50 %: panic.
        let mut seen = std::collections::HashSet::new();
        for _ in 0..500 {
            let p = lr(&e, &[], 50).unwrap();
            assert!(p.panic);
            seen.insert(p.endpoint.addr);
        }
        assert_eq!(seen.len(), 4);
        // Panic disabled: only the healthy one.
        for _ in 0..50 {
            let p = lr(&e, &[], 0).unwrap();
            assert_eq!(p.endpoint.addr, e[3].addr);
            assert!(!p.panic);
        }
    }

    #[test]
    fn terminating_only_when_nothing_else() {
        let e = eps(2);
        e[0].set_state(EndpointState::Terminating);
        for _ in 0..50 {
            assert_eq!(lr(&e, &[], 50).unwrap().endpoint.addr, e[1].addr);
        }
        e[1].set_state(EndpointState::Terminating);
        assert!(lr(&e, &[], 50).is_ok());
        let hc = HealthCheck::default();
        e[0].record_check(false, &hc);
        e[1].record_check(false, &hc);
        let err = lr(&e, &[], 50).unwrap_err();
        assert_eq!(err.terminating, 2);
        assert!(err.to_string().contains("2 terminating"));
    }

    #[test]
    fn healthy_terminating_beats_an_ejected_ready_endpoint() {
        let e = eps(3);
        e[0].eject(&OutlierDetection::default(), Instant::now());
        e[1].set_state(EndpointState::Terminating);
        e[2].set_state(EndpointState::Terminating);
        for _ in 0..50 {
            let p = lr(&e, &[], 50).unwrap();
            assert_ne!(p.endpoint.addr, e[0].addr);
            assert!(!p.panic);
        }
    }

    #[test]
    fn no_endpoints() {
        let err = lr(&[], &[], 50).unwrap_err();
        assert_eq!(err.to_string(), "the upstream has no endpoints");
    }

    #[test]
    fn all_ejected_without_panic_is_unavailable() {
        let e = eps(2);
        for x in &e {
            x.eject(&OutlierDetection::default(), Instant::now());
        }
        let err = lr(&e, &[], 0).unwrap_err();
        assert_eq!(err.ejected, 2);
        assert!(lr(&e, &[], 50).unwrap().panic);
    }
}
