//! Step 4, assembly: each valid policy's conditions and upstream from what the earlier steps
//! decided, plus the running upstreams that invalid policies keep.

use std::collections::{BTreeMap, BTreeSet};

use super::{
    ports::PortArbitration,
    resolve::{count, port_text, usable, Resolution, ResolvedEndpoint},
    validate::{ValidPolicy, Validation},
    Cond, Outcome, PolicyInput,
};
use crate::{
    api::{reason, ConditionStatus, EndpointCounts, UpstreamPolicySpec},
    config::{selector, Config, Endpoint, Upstream},
};

/// The namespace's config (upstreams sorted by name) and every policy's outcome.
/// `resolutions` holds every valid policy.
pub(super) fn assemble(
    namespace: &str,
    by_age: &[&PolicyInput<'_>],
    validation: Validation<'_>,
    ports: &PortArbitration<'_>,
    resolutions: &BTreeMap<&str, Resolution>,
) -> (Config, BTreeMap<String, Outcome>) {
    let mut outcomes = validation.refused;
    let mut upstreams = Vec::new();
    for policy in &validation.valid {
        let resolution = &resolutions[policy.name];
        let (outcome, upstream) = render_policy(namespace, policy, ports, resolution);
        outcomes.insert(policy.name.to_string(), outcome);
        upstreams.extend(upstream);
    }
    upstreams.extend(keep_last_accepted(
        by_age,
        &validation.valid,
        ports,
        resolutions,
        &mut outcomes,
    ));
    upstreams.sort_by(|a, b| a.name.cmp(&b.name));
    let config = Config {
        upstreams,
        ..Config::empty()
    };
    (config, outcomes)
}

/// A valid policy's outcome, and its upstream unless it lost its listener port.
fn render_policy(
    namespace: &str,
    policy: &ValidPolicy<'_>,
    ports: &PortArbitration<'_>,
    resolution: &Resolution,
) -> (Outcome, Option<Upstream>) {
    let accepted = accepted_condition(policy, ports);
    if accepted.status == ConditionStatus::False {
        return (
            Outcome::not_accepted(accepted.reason, accepted.message),
            None,
        );
    }
    let spec = policy.spec;
    let (resolved_refs, endpoints) = match resolution {
        Ok(endpoints) => (
            Cond::status_true(
                reason::RESOLVED,
                format!(
                    "Service {} port {} resolved",
                    spec.upstream.service,
                    port_text(&spec.upstream.port)
                ),
            ),
            endpoints.as_slice(),
        ),
        Err(unresolved) => (unresolved.clone(), &[][..]),
    };
    let counts = count(endpoints);
    let ready = ready_condition(spec, &resolved_refs, endpoints, counts);
    let upstream = Upstream {
        name: format!("{namespace}/{}", policy.name),
        listen: listen_address(spec),
        workload_selector: spec.workload_selector.clone(),
        endpoints: usable_endpoints(endpoints),
        policy: spec.policy.clone(),
    };
    let outcome = Outcome {
        accepted,
        resolved_refs,
        ready,
        endpoints: counts,
        sidecars: 0,
        rendered: true,
    };
    (outcome, Some(upstream))
}

/// `Accepted` of a valid policy: false when it lost its listener port.
fn accepted_condition(policy: &ValidPolicy<'_>, ports: &PortArbitration<'_>) -> Cond {
    let port = policy.spec.listener.port;
    if let Some(winner) = ports.lost_to.get(policy.name) {
        return Cond::status_false(
            reason::LISTENER_CONFLICT,
            format!(
                "listener port {port} is already used by older policy {winner} for workloads that may overlap; choose another spec.listener.port or a workloadSelector disjoint from its"
            ),
        );
    }
    match ports.beaten.get(policy.name) {
        Some(newer) => Cond::status_true(
            reason::LISTENER_CONFLICT,
            format!(
                "listener port {port} is also claimed by newer {} for workloads that may overlap; this policy is older and keeps it",
                policies(newer)
            ),
        ),
        None => Cond::status_true(
            reason::ACCEPTED,
            "policy is valid and its listener port is free for its workloads",
        ),
    }
}

fn ready_condition(
    spec: &UpstreamPolicySpec,
    resolved_refs: &Cond,
    endpoints: &[ResolvedEndpoint],
    counts: EndpointCounts,
) -> Cond {
    let still_serving = endpoints.iter().filter(|e| usable(e.flags)).count();
    if resolved_refs.status != ConditionStatus::True {
        Cond::status_false(reason::REFS_NOT_RESOLVED, resolved_refs.message.clone())
    } else if counts.ready > 0 {
        Cond::status_true(
            reason::READY,
            format!("{} of {} endpoints ready", counts.ready, counts.total),
        )
    } else if still_serving > 0 {
        Cond::status_false(
            reason::NO_ENDPOINTS,
            format!("no ready endpoints; {still_serving} terminating endpoints still serve"),
        )
    } else {
        Cond::status_false(
            reason::NO_ENDPOINTS,
            format!("Service {} has no ready endpoints", spec.upstream.service),
        )
    }
}

/// The running upstreams of policies that are invalid now: kept as they were accepted, with
/// endpoints refreshed when the policy still names a Service port that resolves. One whose
/// listener a rendered policy for overlapping workloads has taken since is dropped.
fn keep_last_accepted(
    by_age: &[&PolicyInput<'_>],
    valid: &[ValidPolicy<'_>],
    ports: &PortArbitration<'_>,
    resolutions: &BTreeMap<&str, Resolution>,
    outcomes: &mut BTreeMap<String, Outcome>,
) -> Vec<Upstream> {
    let mut kept = Vec::new();
    for p in by_age {
        let Some(running) = p.last_accepted else {
            continue;
        };
        let taken = valid.iter().any(|v| {
            v.name == p.name
                || (ports.keeps(v.name)
                    && listen_address(v.spec) == running.listen
                    && !selector::disjoint(
                        v.spec.workload_selector.as_ref(),
                        running.workload_selector.as_ref(),
                    ))
        });
        if taken {
            continue;
        }
        let mut upstream = running.clone();
        if let Some(Ok(endpoints)) = resolutions.get(p.name) {
            upstream.endpoints = usable_endpoints(endpoints);
        }
        if let Some(o) = outcomes.get_mut(p.name) {
            o.endpoints.total = u32::try_from(upstream.endpoints.len()).unwrap_or(u32::MAX);
            o.rendered = true;
        }
        kept.push(upstream);
    }
    kept
}

fn listen_address(spec: &UpstreamPolicySpec) -> String {
    format!("127.0.0.1:{}", spec.listener.port)
}

/// What goes into the config: ready endpoints, and terminating ones that still serve.
fn usable_endpoints(endpoints: &[ResolvedEndpoint]) -> Vec<Endpoint> {
    endpoints
        .iter()
        .filter(|e| usable(e.flags))
        .map(|e| e.endpoint.clone())
        .collect()
}

/// `policy a` or `policies a, b`, each name once.
fn policies(names: &[&str]) -> String {
    let set: BTreeSet<&str> = names.iter().copied().collect();
    let names: Vec<&str> = set.into_iter().collect();
    match names.as_slice() {
        [one] => format!("policy {one}"),
        many => format!("policies {}", many.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

    use super::*;
    use crate::{
        api::ConditionStatus::{False, True},
        config::EndpointState,
        operator::render::{
            fixtures::{input, running_upstream, spec, ts},
            resolve::Flags,
        },
    };

    fn resolved(flags: &[(bool, bool, bool)]) -> Resolution {
        Ok(flags
            .iter()
            .enumerate()
            .map(|(i, &(ready, serving, terminating))| ResolvedEndpoint {
                endpoint: Endpoint {
                    address: format!("10.0.0.{i}:80"),
                    pod: None,
                    state: if ready {
                        EndpointState::Ready
                    } else {
                        EndpointState::Terminating
                    },
                },
                flags: Flags {
                    ready,
                    serving,
                    terminating,
                },
            })
            .collect())
    }

    fn valid<'a>(name: &'a str, spec: &'a UpstreamPolicySpec) -> ValidPolicy<'a> {
        ValidPolicy { name, spec }
    }

    #[test]
    fn ready_follows_resolution_then_ready_then_still_serving_endpoints() {
        let s = spec("pay", IntOrString::Int(80), 18080);
        let no_ports = PortArbitration::default();
        let outcome = |r: &Resolution| render_policy("ns", &valid("p", &s), &no_ports, r).0;

        let o = outcome(&resolved(&[
            (true, true, false),
            (false, true, true),
            (false, false, false),
        ]));
        assert_eq!(
            (o.accepted.status, o.accepted.reason),
            (True, reason::ACCEPTED)
        );
        assert_eq!(o.resolved_refs.message, "Service pay port 80 resolved");
        assert_eq!(
            (o.ready.status, o.ready.message.as_str()),
            (True, "1 of 3 endpoints ready")
        );
        let o = outcome(&resolved(&[(false, true, true), (false, true, true)]));
        assert_eq!(
            (o.ready.status, o.ready.reason, o.ready.message.as_str()),
            (
                False,
                reason::NO_ENDPOINTS,
                "no ready endpoints; 2 terminating endpoints still serve"
            )
        );
        let o = outcome(&resolved(&[]));
        assert_eq!(o.ready.message, "Service pay has no ready endpoints");
        let missing = Err(Cond::status_false(
            reason::SERVICE_NOT_FOUND,
            "no such Service",
        ));
        let o = outcome(&missing);
        assert_eq!(
            (o.ready.status, o.ready.reason, o.ready.message.as_str()),
            (False, reason::REFS_NOT_RESOLVED, "no such Service")
        );
        assert!(
            o.rendered,
            "rendered without endpoints: the sidecar answers 503 with a cause"
        );
    }

    #[test]
    fn the_upstream_carries_only_usable_endpoints_and_losers_have_none() {
        let s = spec("pay", IntOrString::Int(80), 18080);
        let r = resolved(&[
            (true, true, false),
            (false, true, true),
            (false, false, true),
        ]);
        let (o, up) = render_policy("ns", &valid("p", &s), &PortArbitration::default(), &r);
        let up = up.expect("rendered");
        assert_eq!(
            (up.name.as_str(), up.listen.as_str()),
            ("ns/p", "127.0.0.1:18080")
        );
        let addrs: Vec<&str> = up.endpoints.iter().map(|e| e.address.as_str()).collect();
        assert_eq!(addrs, ["10.0.0.0:80", "10.0.0.1:80"]);
        assert_eq!((o.endpoints.total, o.endpoints.ready), (3, 1));

        let ports = PortArbitration {
            lost_to: BTreeMap::from([("young", "old")]),
            beaten: BTreeMap::from([("old", vec!["young", "younger", "young"])]),
        };
        let (o, up) = render_policy("ns", &valid("young", &s), &ports, &r);
        assert!(up.is_none() && !o.rendered);
        assert_eq!(
            (o.accepted.status, o.accepted.reason),
            (False, reason::LISTENER_CONFLICT)
        );
        assert!(o.accepted.message.contains("older policy old"), "{o:?}");
        let (o, _) = render_policy("ns", &valid("old", &s), &ports, &r);
        assert_eq!(
            (o.accepted.status, o.accepted.reason),
            (True, reason::LISTENER_CONFLICT)
        );
        assert!(
            o.accepted
                .message
                .contains("newer policies young, younger for"),
            "{o:?}"
        );
    }

    #[test]
    fn a_running_upstream_stays_for_an_invalid_policy_until_its_port_is_taken() {
        let t = ts(1);
        let edited = spec("pay", IntOrString::Int(80), 18080);
        let running = running_upstream();
        let p = PolicyInput {
            last_accepted: Some(&running),
            ..input("p", &t, &edited)
        };
        let resolutions =
            BTreeMap::from([("p", resolved(&[(true, true, false), (false, false, false)]))]);
        let mut outcomes = BTreeMap::from([(
            "p".to_string(),
            Outcome::not_accepted(reason::INVALID, "bad".into()),
        )]);
        let kept = keep_last_accepted(
            &[&p],
            &[],
            &PortArbitration::default(),
            &resolutions,
            &mut outcomes,
        );
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].endpoints.len(), 1, "today's usable endpoints");
        assert!(outcomes["p"].rendered);
        assert_eq!(outcomes["p"].endpoints.total, 1);

        let newer = spec("pay", IntOrString::Int(80), 18080);
        let taken = keep_last_accepted(
            &[&p],
            &[valid("q", &newer)],
            &PortArbitration::default(),
            &resolutions,
            &mut outcomes,
        );
        assert!(
            taken.is_empty(),
            "a valid policy for the same workloads took the port"
        );
        let lost = PortArbitration {
            lost_to: BTreeMap::from([("q", "r")]),
            ..Default::default()
        };
        let kept = keep_last_accepted(
            &[&p],
            &[valid("q", &newer)],
            &lost,
            &resolutions,
            &mut outcomes,
        );
        assert_eq!(kept.len(), 1, "a claimant that lost the port takes nothing");
    }
}
