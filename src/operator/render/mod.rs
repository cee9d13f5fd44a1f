//! Pure desired state: the policies of one namespace, their Services and EndpointSlices in; the
//! sidecar config document and each policy's conditions out. No client calls here, so every
//! condition reason and endpoint condition is covered by plain unit tests.
//!
//! [`render_namespace`] runs four steps, each a function of its own with its own tests:
//! [`validate::validate`] (every spec, as config files are validated), [`ports::arbitrate`]
//! (who keeps a contested listener port), [`resolve::resolve_all`] (Service port →
//! endpoints) and [`assemble::assemble`] (conditions and upstreams).

mod assemble;
#[cfg(test)]
mod fixtures;
mod ports;
mod resolve;
mod validate;

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{core::v1::Service, discovery::v1::EndpointSlice},
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
};

use crate::{
    api::{
        condition, reason, ConditionStatus, EndpointCounts, UpstreamPolicySpec,
        UpstreamPolicyStatus,
    },
    config::{Config, FieldErrors, Upstream},
};

pub use self::resolve::SERVICE_NAME_LABEL;

/// One policy as the renderer sees it.
#[derive(Clone, Debug)]
pub struct PolicyInput<'a> {
    pub name: &'a str,
    /// Older policies win listener conflicts; `None` sorts first (never happens on a server).
    pub created: Option<&'a Time>,
    /// `Err` holds why the object could not be read or validated.
    pub spec: Result<&'a UpstreamPolicySpec, String>,
    /// The policy's upstream in the config the sidecars run now (the rendered ConfigMap): kept
    /// while the policy is invalid, so a bad edit never takes a working upstream away.
    pub last_accepted: Option<&'a Upstream>,
}

/// One condition before it gets its type and timestamps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cond {
    pub status: ConditionStatus,
    pub reason: &'static str,
    pub message: String,
}

/// What the renderer decided for one policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub accepted: Cond,
    pub resolved_refs: Cond,
    pub ready: Cond,
    pub endpoints: EndpointCounts,
    /// Sidecars reporting this policy's upstream (see [`Outcome::sidecar_figures`]).
    pub sidecars: u32,
    /// Part of the rendered config.
    pub rendered: bool,
}

/// The rendered namespace.
#[derive(Clone, Debug)]
pub struct Rendered {
    pub config: Config,
    pub outcomes: BTreeMap<String, Outcome>,
}

/// The rendered document failed the sidecar's own validation: a bug in the renderer, reported
/// rather than shipped to every sidecar in the namespace.
#[derive(Debug, thiserror::Error)]
#[error("rendered config for namespace {namespace} is invalid: {errors}")]
pub struct RenderError {
    pub namespace: String,
    pub errors: FieldErrors,
}

/// Renders one namespace. `services` and `slices` may hold objects of any Service; only those the
/// policies name are used.
pub fn render_namespace(
    namespace: &str,
    policies: &[PolicyInput<'_>],
    services: &[&Service],
    slices: &[&EndpointSlice],
) -> Result<Rendered, RenderError> {
    let mut by_age: Vec<&PolicyInput<'_>> = policies.iter().collect();
    by_age.sort_by(|a, b| (a.created, a.name).cmp(&(b.created, b.name)));

    let validation = validate::validate(&by_age);
    let ports = ports::arbitrate(&validation.valid);
    let cluster = resolve::Cluster::new(services, slices);
    let resolutions = resolve::resolve_all(&by_age, &cluster);
    let (config, outcomes) =
        assemble::assemble(namespace, &by_age, validation, &ports, &resolutions);

    config.validate().map_err(|errors| RenderError {
        namespace: namespace.to_string(),
        errors,
    })?;
    Ok(Rendered { config, outcomes })
}

/// The status a policy should have. Condition transition times are kept from `previous` while
/// the condition's status is unchanged, so an unchanged outcome yields an identical status and no
/// write.
pub fn desired_status(
    outcome: &Outcome,
    generation: Option<i64>,
    config_hash: Option<&str>,
    previous: Option<&UpstreamPolicyStatus>,
    now: &Time,
) -> UpstreamPolicyStatus {
    let condition = |(type_, c): (&str, &Cond)| {
        let prev = previous.and_then(|p| p.conditions.iter().find(|x| x.type_ == type_));
        let last_transition_time = match prev {
            Some(p) if p.status == c.status.as_str() => p.last_transition_time.clone(),
            _ => now.clone(),
        };
        Condition {
            type_: type_.to_string(),
            status: c.status.as_str().to_string(),
            reason: c.reason.to_string(),
            message: c.message.clone(),
            observed_generation: generation,
            last_transition_time,
        }
    };
    UpstreamPolicyStatus {
        observed_generation: generation,
        conditions: outcome.conditions().into_iter().map(condition).collect(),
        endpoints: outcome.endpoints,
        sidecars: outcome.sidecars,
        config_hash: outcome
            .rendered
            .then(|| config_hash.map(str::to_string))
            .flatten(),
    }
}

// === impl Outcome ===

impl Outcome {
    /// A policy left out of the config: `Accepted` is false for `reason`, the rest follows.
    fn not_accepted(reason: &'static str, message: String) -> Outcome {
        Outcome {
            accepted: Cond::status_false(reason, message),
            resolved_refs: Cond {
                status: ConditionStatus::Unknown,
                reason: reason::NOT_ACCEPTED,
                message: "references are resolved once the policy is accepted".into(),
            },
            ready: Cond::status_false(
                reason::NOT_ACCEPTED,
                "the policy is not accepted (see Accepted)",
            ),
            endpoints: EndpointCounts::default(),
            sidecars: 0,
            rendered: false,
        }
    }

    /// The conditions with their types, in the order of [`condition::ALL`].
    pub fn conditions(&self) -> [(&'static str, &Cond); 3] {
        [
            (condition::ACCEPTED, &self.accepted),
            (condition::RESOLVED_REFS, &self.resolved_refs),
            (condition::READY, &self.ready),
        ]
    }

    /// The API server refused the namespace's ConfigMap: a rendered policy is not Ready, whatever
    /// its endpoints, and the user sees the server's reason. Policies left out or with unresolved
    /// references keep their own, more basic reason.
    pub fn config_not_applied(&mut self, config_map: &str, error: &str) {
        if self.rendered && self.resolved_refs.status == ConditionStatus::True {
            self.ready = Cond::status_false(
                reason::CONFIG_NOT_APPLIED,
                format!("{config_map} could not be written: {error}"),
            );
        }
    }

    /// What the sidecars report (collected by the operator, not rendered): how many run this
    /// upstream and how many of its endpoints they ejected. Only a rendered policy has sidecars.
    pub fn sidecar_figures(&mut self, sidecars: u32, ejected: u32) {
        if self.rendered {
            self.sidecars = sidecars;
            self.endpoints.ejected = ejected;
        }
    }
}

// === impl Cond ===

impl Cond {
    fn status_true(reason: &'static str, message: impl Into<String>) -> Self {
        Cond {
            status: ConditionStatus::True,
            reason,
            message: message.into(),
        }
    }

    fn status_false(reason: &'static str, message: impl Into<String>) -> Self {
        Cond {
            status: ConditionStatus::False,
            reason,
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::*;
    use super::*;
    use crate::{
        api::ConditionStatus::{False, True, Unknown},
        config::EndpointState,
    };
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

    #[test]
    fn endpoint_conditions_map_to_states_and_counts() {
        let t0 = ts(1);
        let s = spec("pay", IntOrString::String("http".into()), 18080);
        let svc = service("pay", &[(Some("http"), 80), (Some("admin"), 81)]);
        let sl = slice(
            "pay",
            "IPv4",
            (Some("http"), 8080),
            &[
                ("10.0.0.1", Some(true), Some(true), Some(false)),
                ("10.0.0.2", Some(false), Some(true), Some(true)),
                ("10.0.0.3", Some(false), Some(false), Some(true)),
                ("10.0.0.4", Some(false), Some(false), Some(false)),
                ("10.0.0.5", None, None, None),
            ],
        );
        let other_port = slice(
            "pay",
            "IPv4",
            (Some("admin"), 9090),
            &[("10.9.9.9", None, None, None)],
        );
        let r =
            render_namespace("shop", &[input("p", &t0, &s)], &[&svc], &[&sl, &other_port]).unwrap();
        let u = &r.config.upstreams[0];
        assert_eq!(u.name, "shop/p");
        assert_eq!(u.listen, "127.0.0.1:18080");
        let got: Vec<(&str, EndpointState, Option<&str>)> = u
            .endpoints
            .iter()
            .map(|e| (e.address.as_str(), e.state, e.pod.as_deref()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("10.0.0.1:8080", EndpointState::Ready, Some("pay-0")),
                ("10.0.0.2:8080", EndpointState::Terminating, Some("pay-1")),
                ("10.0.0.5:8080", EndpointState::Ready, Some("pay-4")),
            ]
        );
        let o = &r.outcomes["p"];
        assert_eq!(
            o.endpoints,
            EndpointCounts {
                total: 5,
                ready: 2,
                serving: 3,
                terminating: 2,
                ejected: 0,
            }
        );
        assert_eq!((o.ready.status, o.ready.reason), (True, reason::READY));
        assert_eq!(o.ready.message, "2 of 5 endpoints ready");
        assert_eq!(o.accepted.reason, reason::ACCEPTED);
        assert_eq!(o.resolved_refs.reason, reason::RESOLVED);
    }

    #[test]
    fn port_by_number_unnamed_and_ipv6_and_dual_stack() {
        let t0 = ts(1);
        let s = spec("pay", IntOrString::Int(80), 18080);
        let mut svc = service("pay", &[(None, 80)]);
        let v4 = slice(
            "pay",
            "IPv4",
            (None, 8080),
            &[("10.0.0.1", Some(true), None, None)],
        );
        let v6 = slice(
            "pay",
            "IPv6",
            (None, 8080),
            &[("fd00::1", Some(true), None, None)],
        );
        let fqdn = slice(
            "pay",
            "FQDN",
            (None, 8080),
            &[("pay.example", Some(true), None, None)],
        );
        let render = |svc: &Service| {
            render_namespace("ns", &[input("p", &t0, &s)], &[svc], &[&v4, &v6, &fqdn]).unwrap()
        };
        // No family preference: both families, IPv6 bracketed.
        let addrs: Vec<String> = render(&svc).config.upstreams[0]
            .endpoints
            .iter()
            .map(|e| e.address.clone())
            .collect();
        assert_eq!(addrs, vec!["10.0.0.1:8080", "[fd00::1]:8080"]);
        // Dual stack, IPv6 primary: one endpoint per pod, from the primary family.
        svc.spec.as_mut().unwrap().ip_families = Some(vec!["IPv6".into(), "IPv4".into()]);
        let r = render(&svc);
        assert_eq!(r.config.upstreams[0].endpoints.len(), 1);
        assert_eq!(r.config.upstreams[0].endpoints[0].address, "[fd00::1]:8080");
        assert_eq!(r.outcomes["p"].endpoints.total, 1);
    }

    #[test]
    fn duplicate_addresses_across_slices_keep_the_better_state() {
        let t0 = ts(1);
        let s = spec("pay", IntOrString::Int(80), 18080);
        let svc = service("pay", &[(None, 80)]);
        let mut a = slice(
            "pay",
            "IPv4",
            (None, 8080),
            &[("10.0.0.1", Some(false), Some(true), Some(true))],
        );
        a.metadata.name = Some("a".into());
        let b = slice(
            "pay",
            "IPv4",
            (None, 8080),
            &[("10.0.0.1", Some(true), None, None)],
        );
        let r = render_namespace("ns", &[input("p", &t0, &s)], &[&svc], &[&a, &b]).unwrap();
        assert_eq!(
            r.config.upstreams[0].endpoints[0].state,
            EndpointState::Ready
        );
        assert_eq!(r.outcomes["p"].endpoints.total, 1);
    }

    #[test]
    fn unresolved_references_name_what_is_missing() {
        let t0 = ts(1);
        let svc = service("pay", &[(Some("http"), 80)]);
        let missing_svc = spec("nope", IntOrString::Int(80), 18080);
        let missing_port = spec("pay", IntOrString::String("grpc".into()), 18081);
        let missing_num = spec("pay", IntOrString::Int(81), 18082);
        let r = render_namespace(
            "ns",
            &[
                input("a", &t0, &missing_svc),
                input("b", &t0, &missing_port),
                input("c", &t0, &missing_num),
            ],
            &[&svc],
            &[],
        )
        .unwrap();
        let a = &r.outcomes["a"];
        assert_eq!(
            (a.resolved_refs.status, a.resolved_refs.reason),
            (False, reason::SERVICE_NOT_FOUND)
        );
        assert_eq!(
            (a.ready.status, a.ready.reason),
            (False, reason::REFS_NOT_RESOLVED)
        );
        assert_eq!(a.accepted.status, True);
        let b = &r.outcomes["b"];
        assert_eq!(b.resolved_refs.reason, reason::PORT_NOT_FOUND);
        assert_eq!(
            b.resolved_refs.message,
            "Service pay has no port \"grpc\" (ports: http/80)"
        );
        assert_eq!(r.outcomes["c"].resolved_refs.reason, reason::PORT_NOT_FOUND);
        // Still rendered, with no endpoints: the sidecar answers 503 with a cause instead of the
        // application getting "connection refused" on its local port.
        assert_eq!(r.config.upstreams.len(), 3);
        assert!(r.config.upstreams.iter().all(|u| u.endpoints.is_empty()));
    }

    #[test]
    fn udp_ports_and_external_name_services_are_refused() {
        let t0 = ts(1);
        let mut udp = service("dns", &[(Some("dns"), 53)]);
        udp.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].protocol = Some("UDP".into());
        let mut ext = service("ext", &[(None, 80)]);
        ext.spec.as_mut().unwrap().type_ = Some("ExternalName".into());
        let a = spec("dns", IntOrString::Int(53), 18080);
        let b = spec("ext", IntOrString::Int(80), 18081);
        let r = render_namespace(
            "ns",
            &[input("a", &t0, &a), input("b", &t0, &b)],
            &[&udp, &ext],
            &[],
        )
        .unwrap();
        assert_eq!(r.outcomes["a"].resolved_refs.reason, reason::PORT_NOT_FOUND);
        assert!(r.outcomes["a"].resolved_refs.message.contains("UDP"));
        assert_eq!(
            r.outcomes["b"].resolved_refs.reason,
            reason::UNSUPPORTED_SERVICE
        );
    }

    #[test]
    fn ready_and_terminating_endpoints_are_terminating() {
        // publishNotReadyAddresses: a terminating pod keeps ready=true.
        let t0 = ts(1);
        let s = spec("pay", IntOrString::Int(80), 18080);
        let svc = service("pay", &[(None, 80)]);
        let both = slice(
            "pay",
            "IPv4",
            (None, 8080),
            &[
                ("10.0.0.1", Some(true), Some(true), Some(true)),
                ("10.0.0.2", Some(true), Some(true), Some(false)),
            ],
        );
        let r = render_namespace("ns", &[input("p", &t0, &s)], &[&svc], &[&both]).unwrap();
        let states: Vec<EndpointState> = r.config.upstreams[0]
            .endpoints
            .iter()
            .map(|e| e.state)
            .collect();
        assert_eq!(
            states,
            vec![EndpointState::Terminating, EndpointState::Ready]
        );
        let o = &r.outcomes["p"];
        assert_eq!((o.endpoints.ready, o.endpoints.terminating), (1, 1));
        assert_eq!(o.ready.message, "1 of 2 endpoints ready");
        // Only such endpoints left: not Ready, still rendered as a last resort.
        let only = slice(
            "pay",
            "IPv4",
            (None, 8080),
            &[("10.0.0.1", Some(true), None, Some(true))],
        );
        let r = render_namespace("ns", &[input("p", &t0, &s)], &[&svc], &[&only]).unwrap();
        assert_eq!(r.outcomes["p"].ready.reason, reason::NO_ENDPOINTS);
        assert_eq!(
            r.config.upstreams[0].endpoints[0].state,
            EndpointState::Terminating
        );
    }

    #[test]
    fn no_endpoints_and_only_terminating_endpoints() {
        let t0 = ts(1);
        let s = spec("pay", IntOrString::Int(80), 18080);
        let svc = service("pay", &[(None, 80)]);
        let r = render_namespace("ns", &[input("p", &t0, &s)], &[&svc], &[]).unwrap();
        assert_eq!(r.outcomes["p"].ready.reason, reason::NO_ENDPOINTS);
        assert_eq!(r.outcomes["p"].resolved_refs.status, True);
        let term = slice(
            "pay",
            "IPv4",
            (None, 8080),
            &[("10.0.0.1", Some(false), Some(true), Some(true))],
        );
        let r = render_namespace("ns", &[input("p", &t0, &s)], &[&svc], &[&term]).unwrap();
        let o = &r.outcomes["p"];
        assert_eq!(
            (o.ready.status, o.ready.reason),
            (False, reason::NO_ENDPOINTS)
        );
        assert!(
            o.ready.message.contains("1 terminating"),
            "{}",
            o.ready.message
        );
        assert_eq!(
            r.config.upstreams[0].endpoints[0].state,
            EndpointState::Terminating
        );
    }

    #[test]
    fn listener_conflict_older_keeps_the_port_both_are_told() {
        let (t1, t2, t3) = (ts(100), ts(200), ts(300));
        let svc = service("pay", &[(None, 80)]);
        let a = spec("pay", IntOrString::Int(80), 18080);
        let b = a.clone();
        let c = spec("pay", IntOrString::Int(80), 18081);
        // Input order must not matter: age decides.
        let r = render_namespace(
            "ns",
            &[
                input("young", &t2, &b),
                input("old", &t1, &a),
                input("other", &t3, &c),
            ],
            &[&svc],
            &[],
        )
        .unwrap();
        let old = &r.outcomes["old"];
        let young = &r.outcomes["young"];
        assert_eq!(
            (old.accepted.status, old.accepted.reason),
            (True, reason::LISTENER_CONFLICT)
        );
        assert!(
            old.accepted.message.contains("newer policy young"),
            "{}",
            old.accepted.message
        );
        assert_eq!(
            (young.accepted.status, young.accepted.reason),
            (False, reason::LISTENER_CONFLICT)
        );
        assert!(young.accepted.message.contains("older policy old"));
        assert_eq!(young.ready.reason, reason::NOT_ACCEPTED);
        assert!(!young.rendered);
        assert_eq!(r.outcomes["other"].accepted.reason, reason::ACCEPTED);
        let names: Vec<&str> = r.config.upstreams.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(names, vec!["ns/old", "ns/other"]);
    }

    #[test]
    fn disjoint_workloads_share_a_listener_port_overlapping_ones_conflict() {
        let (t1, t2, t3, t4) = (ts(100), ts(200), ts(300), ts(400));
        let svc = service("pay", &[(None, 80)]);
        let with = |sel: serde_json::Value| {
            let mut s = spec("pay", IntOrString::Int(80), 18080);
            s.workload_selector = Some(serde_json::from_value(sel).unwrap());
            s
        };
        let x = with(serde_json::json!({"matchLabels": {"app": "x"}}));
        let xy = with(serde_json::json!({"matchExpressions": [
            {"key": "app", "operator": "In", "values": ["x", "y"]}]}));
        let y = with(serde_json::json!({"matchLabels": {"app": "y"}}));
        let bad = with(serde_json::json!({"matchExpressions": [
            {"key": "app", "operator": "Like", "values": ["x"]}]}));
        let r = render_namespace(
            "ns",
            &[
                input("y", &t3, &y),
                input("xy", &t2, &xy),
                input("x", &t1, &x),
                input("bad", &t4, &bad),
            ],
            &[&svc],
            &[],
        )
        .unwrap();
        let (rx, rxy, ry) = (&r.outcomes["x"], &r.outcomes["xy"], &r.outcomes["y"]);
        // x is oldest and keeps the port; xy overlaps it and loses.
        assert_eq!(
            (rx.accepted.status, rx.accepted.reason),
            (True, reason::LISTENER_CONFLICT)
        );
        assert!(rx.accepted.message.contains("newer policy xy"), "{rx:?}");
        assert_eq!(
            (rxy.accepted.status, rxy.accepted.reason),
            (False, reason::LISTENER_CONFLICT)
        );
        assert!(rxy.accepted.message.contains("older policy x "), "{rxy:?}");
        // y overlaps only xy, which holds no port: y serves other pods than x on the same port.
        assert_eq!(
            (ry.accepted.status, ry.accepted.reason),
            (True, reason::ACCEPTED)
        );
        let bad = &r.outcomes["bad"];
        assert_eq!(bad.accepted.reason, reason::INVALID);
        assert!(
            bad.accepted
                .message
                .contains("spec.workloadSelector.matchExpressions[0].operator"),
            "{bad:?}"
        );
        let names: Vec<(&str, &str)> = r
            .config
            .upstreams
            .iter()
            .map(|u| (u.name.as_str(), u.listen.as_str()))
            .collect();
        assert_eq!(
            names,
            vec![("ns/x", "127.0.0.1:18080"), ("ns/y", "127.0.0.1:18080")]
        );
    }

    #[test]
    fn invalid_policies_are_reported_and_left_out() {
        let t0 = ts(1);
        let svc = service("pay", &[(None, 80)]);
        let mut bad = spec("pay", IntOrString::Int(80), 18080);
        bad.policy.retries.per_try_timeout = crate::config::Duration::from_secs(60);
        let good = spec("pay", IntOrString::Int(80), 18080);
        let r = render_namespace(
            "ns",
            &[
                input("bad", &t0, &bad),
                PolicyInput {
                    name: "garbled",
                    created: Some(&t0),
                    spec: Err("spec.listener.port: invalid type: string".into()),
                    last_accepted: None,
                },
                input("good", &ts(5), &good),
            ],
            &[&svc],
            &[],
        )
        .unwrap();
        let b = &r.outcomes["bad"];
        assert_eq!(
            (b.accepted.status, b.accepted.reason),
            (False, reason::INVALID)
        );
        assert!(
            b.accepted
                .message
                .contains("spec.retries.perTryTimeout: must not exceed timeouts.request"),
            "{}",
            b.accepted.message
        );
        assert_eq!(b.resolved_refs.status, Unknown);
        assert_eq!(r.outcomes["garbled"].accepted.reason, reason::INVALID);
        // The invalid one did not claim the port.
        assert_eq!(r.outcomes["good"].accepted.reason, reason::ACCEPTED);
        assert_eq!(r.config.upstreams.len(), 1);
    }

    #[test]
    fn an_invalid_edit_keeps_the_last_accepted_upstream_with_fresh_endpoints() {
        let t0 = ts(1);
        let svc = service("pay", &[(None, 80)]);
        let sl = slice(
            "pay",
            "IPv4",
            (None, 8080),
            &[("10.0.0.9", Some(true), None, None)],
        );
        let accepted = spec("pay", IntOrString::Int(80), 18080);
        let first = render_namespace("ns", &[input("p", &t0, &accepted)], &[&svc], &[&sl]).unwrap();
        let mut last = first.config.upstreams[0].clone();
        last.endpoints.clear(); // what ran before the pods changed
        let mut edited = accepted.clone();
        edited.policy.retries.per_try_timeout = crate::config::Duration::from_secs(60);
        let r = render_namespace(
            "ns",
            &[PolicyInput {
                last_accepted: Some(&last),
                ..input("p", &t0, &edited)
            }],
            &[&svc],
            &[&sl],
        )
        .unwrap();
        let o = &r.outcomes["p"];
        assert_eq!(
            (o.accepted.status, o.accepted.reason),
            (False, reason::INVALID)
        );
        assert!(
            o.accepted.message.contains("last accepted version"),
            "{o:?}"
        );
        assert_eq!(r.config.upstreams.len(), 1, "the upstream stays");
        let u = &r.config.upstreams[0];
        assert_eq!(u.policy, accepted.policy, "with the accepted values");
        let eps: Vec<&str> = u.endpoints.iter().map(|e| e.address.as_str()).collect();
        assert_eq!(eps, ["10.0.0.9:8080"], "and today's endpoints");

        // A valid newer policy for the same workloads took the port since: the old one goes.
        let other = spec("pay", IntOrString::Int(80), 18080);
        let r = render_namespace(
            "ns",
            &[
                PolicyInput {
                    last_accepted: Some(&last),
                    ..input("p", &t0, &edited)
                },
                input("q", &ts(5), &other),
            ],
            &[&svc],
            &[&sl],
        )
        .unwrap();
        let names: Vec<&str> = r.config.upstreams.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(names, ["ns/q"]);
    }

    #[test]
    fn rendered_document_is_valid_stable_and_carries_the_policy() {
        let t0 = ts(1);
        let svc = service("pay", &[(None, 80)]);
        let mut s = spec("pay", IntOrString::Int(80), 18080);
        s.policy.retries.attempts = 5;
        s.workload_selector = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector {
                match_labels: Some([("app".to_string(), "web".to_string())].into()),
                ..Default::default()
            },
        );
        let sl = slice(
            "pay",
            "IPv4",
            (None, 8080),
            &[
                ("10.0.0.2", None, None, None),
                ("10.0.0.1", None, None, None),
            ],
        );
        let r1 = render_namespace("ns", &[input("p", &t0, &s)], &[&svc], &[&sl]).unwrap();
        let text = r1.config.to_yaml();
        let back = Config::from_str_validated(&text).unwrap();
        assert_eq!(back, r1.config);
        assert_eq!(back.upstreams[0].policy.retries.attempts, 5);
        assert!(back.upstreams[0].workload_selector.is_some());
        let mut sl2 = sl.clone();
        sl2.endpoints.reverse();
        let r2 = render_namespace("ns", &[input("p", &t0, &s)], &[&svc], &[&sl2]).unwrap();
        assert_eq!(r1.config.hash(), r2.config.hash());
    }

    #[test]
    fn a_refused_config_makes_rendered_policies_not_ready() {
        let t0 = ts(1);
        let ok = spec("pay", IntOrString::Int(80), 18080);
        let clash = spec("pay", IntOrString::Int(80), 18080);
        let svc = service("pay", &[(None, 80)]);
        let up = slice(
            "pay",
            "IPv4",
            (None, 8080),
            &[("10.0.0.1", Some(true), None, None)],
        );
        let r = render_namespace(
            "ns",
            &[input("a", &t0, &ok), input("b", &ts(2), &clash)],
            &[&svc],
            &[&up],
        )
        .unwrap();
        let mut a = r.outcomes["a"].clone();
        assert_eq!(a.ready.reason, reason::READY);
        a.config_not_applied("detour-config", "Too long: must have at most 1048576 bytes");
        assert_eq!(
            (a.ready.status, a.ready.reason),
            (False, "ConfigNotApplied")
        );
        assert!(a
            .ready
            .message
            .contains("detour-config could not be written: Too long"));
        assert_eq!(a.accepted, r.outcomes["a"].accepted, "only Ready changes");
        // Not in the config: its own reason stays.
        let mut b = r.outcomes["b"].clone();
        b.config_not_applied("detour-config", "boom");
        assert_eq!(b, r.outcomes["b"]);
    }

    #[test]
    fn status_keeps_transition_times_until_the_status_flips() {
        let t0 = ts(1);
        let s = spec("pay", IntOrString::Int(80), 18080);
        let svc = service("pay", &[(None, 80)]);
        let up = slice(
            "pay",
            "IPv4",
            (None, 8080),
            &[("10.0.0.1", None, None, None)],
        );
        let r = render_namespace("ns", &[input("p", &t0, &s)], &[&svc], &[&up]).unwrap();
        let hash = r.config.hash();
        let first = desired_status(&r.outcomes["p"], Some(3), Some(&hash), None, &ts(10));
        assert_eq!(first.observed_generation, Some(3));
        assert_eq!(first.config_hash.as_deref(), Some(hash.as_str()));
        assert!(first
            .conditions
            .iter()
            .all(|c| c.last_transition_time == ts(10)));
        assert_eq!(
            first
                .conditions
                .iter()
                .map(|c| c.type_.as_str())
                .collect::<Vec<_>>(),
            vec!["Accepted", "ResolvedRefs", "Ready"]
        );
        // Same outcome later: identical status, so no write.
        let again = desired_status(
            &r.outcomes["p"],
            Some(3),
            Some(&hash),
            Some(&first),
            &ts(20),
        );
        assert_eq!(again, first);
        // Ready flips: only Ready gets a new time.
        let r = render_namespace("ns", &[input("p", &t0, &s)], &[&svc], &[]).unwrap();
        let down = desired_status(
            &r.outcomes["p"],
            Some(3),
            Some(&hash),
            Some(&first),
            &ts(30),
        );
        let times: Vec<i64> = down
            .conditions
            .iter()
            .map(|c| c.last_transition_time.0.as_second())
            .collect();
        assert_eq!(times, vec![10, 10, 30]);
        assert_eq!(down.endpoints.total, 0);
    }
}
