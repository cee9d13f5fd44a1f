//! Pure desired state: the policies of one namespace, their Services and EndpointSlices in; the
//! sidecar config document and each policy's conditions out. No client calls here, so every
//! condition reason and endpoint condition is covered by plain unit tests.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
};

use k8s_openapi::{
    api::{core::v1::Service, discovery::v1::EndpointSlice},
    apimachinery::pkg::{
        apis::meta::v1::{Condition, Time},
        util::intstr::IntOrString,
    },
};

use crate::{
    api::{condition, reason, EndpointCounts, UpstreamPolicySpec, UpstreamPolicyStatus},
    config::{selector, Config, Endpoint, EndpointState, FieldErrors, Upstream},
};

/// Label EndpointSlices carry to name their Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

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

/// One condition before it gets timestamps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cond {
    pub status: &'static str,
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
    let services: BTreeMap<&str, &Service> = services
        .iter()
        .filter_map(|s| Some((s.metadata.name.as_deref()?, *s)))
        .collect();
    let mut slices_by_service: BTreeMap<&str, Vec<&EndpointSlice>> = BTreeMap::new();
    for s in slices {
        if let Some(svc) = s
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
        {
            slices_by_service.entry(svc.as_str()).or_default().push(s);
        }
    }

    let mut order: Vec<&PolicyInput<'_>> = policies.iter().collect();
    order.sort_by(|a, b| (a.created, a.name).cmp(&(b.created, b.name)));

    // Validate every spec the same way config files are validated.
    let mut valid: Vec<(&str, &UpstreamPolicySpec)> = Vec::new();
    let mut outcomes = BTreeMap::new();
    for p in &order {
        let problem = match &p.spec {
            Err(e) => Some(e.clone()),
            Ok(spec) => {
                let mut errs = FieldErrors::default();
                spec.policy.validate("spec", &mut errs);
                if let Some(sel) = &spec.workload_selector {
                    selector::validate(sel, "spec.workloadSelector", &mut errs);
                }
                if errs.is_empty() {
                    valid.push((p.name, spec));
                    None
                } else {
                    Some(errs.to_string().replace('\n', "; "))
                }
            }
        };
        if let Some(msg) = problem {
            let mut outcome = not_accepted(reason::INVALID, msg);
            if p.last_accepted.is_some() {
                outcome
                    .accepted
                    .message
                    .push_str("; sidecars keep running the last accepted version of this policy");
            }
            outcomes.insert(p.name.to_string(), outcome);
        }
    }

    // Listener ports: in age order, a policy keeps its port unless an older policy that kept it
    // serves workloads that may overlap (the same pod could run both); every claimant is told.
    // Winners on one port are then pairwise disjoint, as the sidecar's validation demands.
    let mut holders: BTreeMap<u16, Vec<&(&str, &UpstreamPolicySpec)>> = BTreeMap::new();
    let mut lost_to: BTreeMap<&str, &str> = BTreeMap::new();
    let mut beaten: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for claim in &valid {
        let (name, spec) = *claim;
        let kept = holders.entry(spec.listener.port).or_default();
        let older = kept.iter().find(|(_, s)| {
            !selector::disjoint(
                s.workload_selector.as_ref(),
                spec.workload_selector.as_ref(),
            )
        });
        match older {
            Some((winner, _)) => {
                lost_to.insert(name, winner);
                beaten.entry(winner).or_default().push(name);
            }
            None => kept.push(claim),
        }
    }
    let mut upstreams = Vec::new();
    for (name, spec) in &valid {
        let port = spec.listener.port;
        let accepted = if let Some(winner) = lost_to.get(name) {
            outcomes.insert(
                name.to_string(),
                not_accepted(
                    reason::LISTENER_CONFLICT,
                    format!(
                        "listener port {port} is already used by older policy {winner} for workloads that may overlap; choose another spec.listener.port or a workloadSelector disjoint from its"
                    ),
                ),
            );
            continue;
        } else if let Some(newer) = beaten.get(name) {
            Cond::t(
                reason::LISTENER_CONFLICT,
                format!(
                    "listener port {port} is also claimed by newer {} for workloads that may overlap; this policy is older and keeps it",
                    list(newer)
                ),
            )
        } else {
            Cond::t(
                reason::ACCEPTED,
                "policy is valid and its listener port is free for its workloads",
            )
        };

        let (resolved_refs, endpoints) = match resolve(spec, &services, &slices_by_service) {
            Ok(eps) => (
                Cond::t(
                    reason::RESOLVED,
                    format!(
                        "Service {} port {} resolved",
                        spec.upstream.service,
                        port_text(&spec.upstream.port)
                    ),
                ),
                eps,
            ),
            Err(c) => (c, Vec::new()),
        };
        let counts = count(&endpoints);
        let ready = if resolved_refs.status != "True" {
            Cond::f(reason::REFS_NOT_RESOLVED, resolved_refs.message.clone())
        } else if counts.ready > 0 {
            Cond::t(
                reason::READY,
                format!("{} of {} endpoints ready", counts.ready, counts.total),
            )
        } else if endpoints.iter().any(|(_, f)| usable(*f)) {
            Cond::f(
                reason::NO_ENDPOINTS,
                format!(
                    "no ready endpoints; {} terminating endpoints still serve",
                    endpoints.iter().filter(|(_, f)| usable(*f)).count()
                ),
            )
        } else {
            Cond::f(
                reason::NO_ENDPOINTS,
                format!("Service {} has no ready endpoints", spec.upstream.service),
            )
        };
        upstreams.push(Upstream {
            name: format!("{namespace}/{name}"),
            listen: format!("127.0.0.1:{port}"),
            workload_selector: spec.workload_selector.clone(),
            endpoints: endpoints
                .into_iter()
                .filter(|(_, f)| usable(*f))
                .map(|(e, _)| e)
                .collect(),
            policy: spec.policy.clone(),
        });
        outcomes.insert(
            name.to_string(),
            Outcome {
                accepted,
                resolved_refs,
                ready,
                endpoints: counts,
                sidecars: 0,
                rendered: true,
            },
        );
    }
    upstreams.extend(keep_last_accepted(
        &order,
        &valid,
        &lost_to,
        &services,
        &slices_by_service,
        &mut outcomes,
    ));
    upstreams.sort_by(|a, b| a.name.cmp(&b.name));
    let config = Config {
        upstreams,
        ..Config::empty()
    };
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
    let cond = |type_: &str, c: &Cond| {
        let prev = previous.and_then(|p| p.conditions.iter().find(|x| x.type_ == type_));
        let last_transition_time = match prev {
            Some(p) if p.status == c.status => p.last_transition_time.clone(),
            _ => now.clone(),
        };
        Condition {
            type_: type_.to_string(),
            status: c.status.to_string(),
            reason: c.reason.to_string(),
            message: c.message.clone(),
            observed_generation: generation,
            last_transition_time,
        }
    };
    UpstreamPolicyStatus {
        observed_generation: generation,
        conditions: vec![
            cond(condition::ACCEPTED, &outcome.accepted),
            cond(condition::RESOLVED_REFS, &outcome.resolved_refs),
            cond(condition::READY, &outcome.ready),
        ],
        endpoints: outcome.endpoints,
        sidecars: outcome.sidecars,
        config_hash: outcome
            .rendered
            .then(|| config_hash.map(str::to_string))
            .flatten(),
    }
}

// === resolution ===

#[derive(Clone, Copy, Debug, Default)]
struct Flags {
    ready: bool,
    serving: bool,
    terminating: bool,
}

/// The running upstreams of policies that are invalid now: kept as they were accepted, with
/// endpoints refreshed when the policy still names a Service port that resolves. One whose
/// listener a rendered policy for overlapping workloads has taken since is dropped.
fn keep_last_accepted(
    order: &[&PolicyInput<'_>],
    valid: &[(&str, &UpstreamPolicySpec)],
    lost_to: &BTreeMap<&str, &str>,
    services: &BTreeMap<&str, &Service>,
    slices: &BTreeMap<&str, Vec<&EndpointSlice>>,
    outcomes: &mut BTreeMap<String, Outcome>,
) -> Vec<Upstream> {
    let mut kept = Vec::new();
    for p in order {
        let Some(prev) = p.last_accepted else {
            continue;
        };
        if valid.iter().any(|(n, _)| n == &p.name) {
            continue;
        }
        let taken = valid.iter().any(|(n, s)| {
            !lost_to.contains_key(n)
                && format!("127.0.0.1:{}", s.listener.port) == prev.listen
                && !selector::disjoint(
                    s.workload_selector.as_ref(),
                    prev.workload_selector.as_ref(),
                )
        });
        if taken {
            continue;
        }
        let mut up = prev.clone();
        if let Ok(Ok(eps)) = p.spec.as_ref().map(|s| resolve(s, services, slices)) {
            up.endpoints = eps
                .into_iter()
                .filter(|(_, f)| usable(*f))
                .map(|(e, _)| e)
                .collect();
        }
        if let Some(o) = outcomes.get_mut(p.name) {
            o.endpoints.total = u32::try_from(up.endpoints.len()).unwrap_or(u32::MAX);
            o.rendered = true;
        }
        kept.push(up);
    }
    kept
}

fn resolve(
    spec: &UpstreamPolicySpec,
    services: &BTreeMap<&str, &Service>,
    slices: &BTreeMap<&str, Vec<&EndpointSlice>>,
) -> Result<Vec<(Endpoint, Flags)>, Cond> {
    let name = spec.upstream.service.as_str();
    let svc = services.get(name).ok_or_else(|| {
        Cond::f(
            reason::SERVICE_NOT_FOUND,
            format!("Service {name} does not exist in this namespace"),
        )
    })?;
    let svc_spec = svc.spec.clone().unwrap_or_default();
    if svc_spec.type_.as_deref() == Some("ExternalName") {
        return Err(Cond::f(
            reason::UNSUPPORTED_SERVICE,
            format!("Service {name} is of type ExternalName and has no endpoints"),
        ));
    }
    let ports = svc_spec.ports.unwrap_or_default();
    let port = ports
        .iter()
        .find(|p| match &spec.upstream.port {
            IntOrString::Int(n) => p.port == *n,
            IntOrString::String(s) => p.name.as_deref() == Some(s.as_str()),
        })
        .ok_or_else(|| {
            let have: Vec<String> = ports
                .iter()
                .map(|p| match &p.name {
                    Some(n) if !n.is_empty() => format!("{n}/{}", p.port),
                    _ => p.port.to_string(),
                })
                .collect();
            Cond::f(
                reason::PORT_NOT_FOUND,
                format!(
                    "Service {name} has no port {} (ports: {})",
                    port_text(&spec.upstream.port),
                    if have.is_empty() {
                        "none".to_string()
                    } else {
                        have.join(", ")
                    }
                ),
            )
        })?;
    if !is_tcp(port.protocol.as_deref()) {
        return Err(Cond::f(
            reason::PORT_NOT_FOUND,
            format!(
                "Service {name} port {} is {}, not TCP",
                port_text(&spec.upstream.port),
                port.protocol.as_deref().unwrap_or_default()
            ),
        ));
    }
    // EndpointSlice ports carry the Service port's name ("" for a single unnamed port).
    let port_name = port.name.as_deref().unwrap_or("");
    // Dual-stack Services have one slice per family; use the primary family so a pod is one
    // endpoint, not two.
    let family = svc_spec
        .ip_families
        .as_ref()
        .and_then(|f| f.first().cloned());

    let mut found: BTreeMap<SocketAddr, (Endpoint, Flags)> = BTreeMap::new();
    for slice in slices.get(name).into_iter().flatten() {
        let at = slice.address_type.as_str();
        if at != "IPv4" && at != "IPv6" {
            continue;
        }
        if family.as_deref().is_some_and(|f| f != at) {
            continue;
        }
        let Some(target) = slice.ports.iter().flatten().find_map(|p| {
            let same = p.name.as_deref().unwrap_or("") == port_name;
            (same && is_tcp(p.protocol.as_deref()))
                .then_some(p.port)
                .flatten()
        }) else {
            continue;
        };
        let Ok(target) = u16::try_from(target) else {
            continue;
        };
        for ep in &slice.endpoints {
            let Some(ip) = ep.addresses.first().and_then(|a| a.parse::<IpAddr>().ok()) else {
                continue;
            };
            let c = ep.conditions.clone().unwrap_or_default();
            // nil conditions mean "unknown": ready and serving, not terminating (API docs).
            let ready = c.ready.unwrap_or(true);
            let terminating = c.terminating.unwrap_or(false);
            let flags = Flags {
                // With publishNotReadyAddresses a terminating pod still reports ready=true; it
                // must not take new traffic like a ready one.
                ready: ready && !terminating,
                serving: c.serving.unwrap_or(ready),
                terminating,
            };
            let addr = SocketAddr::new(ip, target);
            let pod = ep
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"))
                .and_then(|r| r.name.clone());
            let endpoint = Endpoint {
                address: addr.to_string(),
                pod,
                state: if flags.ready {
                    EndpointState::Ready
                } else {
                    EndpointState::Terminating
                },
            };
            // The same address may sit in two slices while the controller moves it; the more
            // usable report wins.
            let better = match found.get(&addr) {
                None => true,
                Some((_, old)) => rank(flags) > rank(*old),
            };
            if better {
                found.insert(addr, (endpoint, flags));
            }
        }
    }
    Ok(found.into_values().collect())
}

/// Ready endpoints take traffic; terminating ones that still serve are a last resort; the rest
/// (not serving) are left out of the config.
fn usable(f: Flags) -> bool {
    f.ready || (f.terminating && f.serving)
}

fn rank(f: Flags) -> u8 {
    if f.ready {
        2
    } else if f.serving {
        1
    } else {
        0
    }
}

/// Counts every distinct address; the returned list keeps only usable endpoints.
fn count(endpoints: &[(Endpoint, Flags)]) -> EndpointCounts {
    let mut c = EndpointCounts::default();
    for (_, f) in endpoints {
        c.total += 1;
        c.ready += u32::from(f.ready);
        c.serving += u32::from(f.serving);
        c.terminating += u32::from(f.terminating);
    }
    c
}

fn is_tcp(protocol: Option<&str>) -> bool {
    matches!(protocol, None | Some("TCP"))
}

fn port_text(p: &IntOrString) -> String {
    match p {
        IntOrString::Int(n) => n.to_string(),
        IntOrString::String(s) => format!("{s:?}"),
    }
}

fn list(names: &[&str]) -> String {
    let set: BTreeSet<&str> = names.iter().copied().collect();
    let v: Vec<&str> = set.into_iter().collect();
    if v.len() == 1 {
        format!("policy {}", v[0])
    } else {
        format!("policies {}", v.join(", "))
    }
}

fn not_accepted(reason: &'static str, message: String) -> Outcome {
    Outcome {
        accepted: Cond::f(reason, message),
        resolved_refs: Cond {
            status: "Unknown",
            reason: reason::NOT_ACCEPTED,
            message: "references are resolved once the policy is accepted".into(),
        },
        ready: Cond::f(
            reason::NOT_ACCEPTED,
            "the policy is not accepted (see Accepted)",
        ),
        endpoints: EndpointCounts::default(),
        sidecars: 0,
        rendered: false,
    }
}

// === impl Outcome ===

impl Outcome {
    /// The API server refused the namespace's ConfigMap: a rendered policy is not Ready, whatever
    /// its endpoints, and the user sees the server's reason. Policies left out or with unresolved
    /// references keep their own, more basic reason.
    pub fn config_not_applied(&mut self, config_map: &str, error: &str) {
        if self.rendered && self.resolved_refs.status == "True" {
            self.ready = Cond::f(
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
    fn t(reason: &'static str, message: impl Into<String>) -> Self {
        Cond {
            status: "True",
            reason,
            message: message.into(),
        }
    }

    fn f(reason: &'static str, message: impl Into<String>) -> Self {
        Cond {
            status: "False",
            reason,
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Listener, UpstreamRef};
    use k8s_openapi::{
        api::{
            core::v1::{ObjectReference, ServicePort, ServiceSpec},
            discovery::v1::{Endpoint as SliceEndpoint, EndpointConditions, EndpointPort},
        },
        apimachinery::pkg::apis::meta::v1::ObjectMeta,
        jiff::Timestamp,
    };

    fn spec(service: &str, port: IntOrString, listener: u16) -> UpstreamPolicySpec {
        UpstreamPolicySpec {
            workload_selector: None,
            upstream: UpstreamRef {
                service: service.into(),
                port,
            },
            listener: Listener { port: listener },
            policy: Default::default(),
        }
    }

    fn service(name: &str, ports: &[(Option<&str>, i32)]) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                ports: Some(
                    ports
                        .iter()
                        .map(|(n, p)| ServicePort {
                            name: n.map(str::to_string),
                            port: *p,
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// (address, ready, serving, terminating)
    type Ep<'a> = (&'a str, Option<bool>, Option<bool>, Option<bool>);

    fn slice(svc: &str, family: &str, port: (Option<&str>, i32), eps: &[Ep<'_>]) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                name: Some(format!("{svc}-{family}")),
                labels: Some([(SERVICE_NAME_LABEL.to_string(), svc.to_string())].into()),
                ..Default::default()
            },
            address_type: family.into(),
            ports: Some(vec![EndpointPort {
                name: port.0.map(str::to_string),
                port: Some(port.1),
                ..Default::default()
            }]),
            endpoints: eps
                .iter()
                .enumerate()
                .map(|(i, (a, r, s, t))| SliceEndpoint {
                    addresses: vec![a.to_string()],
                    conditions: Some(EndpointConditions {
                        ready: *r,
                        serving: *s,
                        terminating: *t,
                    }),
                    target_ref: Some(ObjectReference {
                        kind: Some("Pod".into()),
                        name: Some(format!("{svc}-{i}")),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .collect(),
        }
    }

    fn ts(s: i64) -> Time {
        Time(Timestamp::from_second(s).unwrap())
    }

    fn input<'a>(
        name: &'a str,
        created: &'a Time,
        spec: &'a UpstreamPolicySpec,
    ) -> PolicyInput<'a> {
        PolicyInput {
            name,
            created: Some(created),
            spec: Ok(spec),
            last_accepted: None,
        }
    }

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
        assert_eq!((o.ready.status, o.ready.reason), ("True", reason::READY));
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
            ("False", reason::SERVICE_NOT_FOUND)
        );
        assert_eq!(
            (a.ready.status, a.ready.reason),
            ("False", reason::REFS_NOT_RESOLVED)
        );
        assert_eq!(a.accepted.status, "True");
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
        assert_eq!(r.outcomes["p"].resolved_refs.status, "True");
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
            ("False", reason::NO_ENDPOINTS)
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
            ("True", reason::LISTENER_CONFLICT)
        );
        assert!(
            old.accepted.message.contains("newer policy young"),
            "{}",
            old.accepted.message
        );
        assert_eq!(
            (young.accepted.status, young.accepted.reason),
            ("False", reason::LISTENER_CONFLICT)
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
            ("True", reason::LISTENER_CONFLICT)
        );
        assert!(rx.accepted.message.contains("newer policy xy"), "{rx:?}");
        assert_eq!(
            (rxy.accepted.status, rxy.accepted.reason),
            ("False", reason::LISTENER_CONFLICT)
        );
        assert!(rxy.accepted.message.contains("older policy x "), "{rxy:?}");
        // y overlaps only xy, which holds no port: y serves other pods than x on the same port.
        assert_eq!(
            (ry.accepted.status, ry.accepted.reason),
            ("True", reason::ACCEPTED)
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
            ("False", reason::INVALID)
        );
        assert!(
            b.accepted
                .message
                .contains("spec.retries.perTryTimeout: must not exceed timeouts.request"),
            "{}",
            b.accepted.message
        );
        assert_eq!(b.resolved_refs.status, "Unknown");
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
            ("False", reason::INVALID)
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
            ("False", "ConfigNotApplied")
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
