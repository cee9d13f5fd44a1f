//! Step 3, resolution: the Service port a policy names, and that port's endpoints from the
//! Service's EndpointSlices with their conditions.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
};

use k8s_openapi::{
    api::{
        core::v1::{Service, ServicePort},
        discovery::v1::{Endpoint as SliceEndpoint, EndpointSlice},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};

use super::{Cond, PolicyInput};
use crate::{
    api::{reason, EndpointCounts, UpstreamPolicySpec},
    config::{Endpoint, EndpointState},
};

/// Label EndpointSlices carry to name their Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// A namespace's Services by name, and their EndpointSlices by Service name.
pub(super) struct Cluster<'a> {
    services: BTreeMap<&'a str, &'a Service>,
    slices: BTreeMap<&'a str, Vec<&'a EndpointSlice>>,
}

/// An endpoint's conditions, as EndpointSlices report them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Flags {
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

/// An endpoint of the policy's Service port, usable or not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct ResolvedEndpoint {
    pub endpoint: Endpoint,
    pub flags: Flags,
}

/// Every endpoint of the named Service port, or why it could not be resolved (`ResolvedRefs`).
pub(super) type Resolution = Result<Vec<ResolvedEndpoint>, Cond>;

/// What an EndpointSlice must match to hold the Service port's endpoints.
struct SlicePort<'a> {
    /// Slices name their ports as the Service does ("" for a single unnamed port).
    name: &'a str,
    /// The Service's primary IP family, when it has one.
    family: Option<&'a str>,
}

/// Every policy with a readable spec, resolved: the valid ones, and the invalid ones whose last
/// accepted version keeps running with fresh endpoints.
pub(super) fn resolve_all<'a>(
    by_age: &[&PolicyInput<'a>],
    cluster: &Cluster<'_>,
) -> BTreeMap<&'a str, Resolution> {
    by_age
        .iter()
        .filter_map(|p| Some((p.name, resolve(p.spec.as_ref().ok()?, cluster))))
        .collect()
}

pub(super) fn resolve(spec: &UpstreamPolicySpec, cluster: &Cluster<'_>) -> Resolution {
    let name = spec.upstream.service.as_str();
    let svc = cluster.services.get(name).ok_or_else(|| {
        Cond::status_false(
            reason::SERVICE_NOT_FOUND,
            format!("Service {name} does not exist in this namespace"),
        )
    })?;
    let svc_spec = svc.spec.as_ref();
    if svc_spec.and_then(|s| s.type_.as_deref()) == Some("ExternalName") {
        return Err(Cond::status_false(
            reason::UNSUPPORTED_SERVICE,
            format!("Service {name} is of type ExternalName and has no endpoints"),
        ));
    }
    let ports = svc_spec
        .and_then(|s| s.ports.as_deref())
        .unwrap_or_default();
    let port = service_port(name, &spec.upstream.port, ports)?;
    let target = SlicePort {
        name: port.name.as_deref().unwrap_or(""),
        // Dual-stack Services have one slice per family; use the primary family so a pod is one
        // endpoint, not two.
        family: svc_spec
            .and_then(|s| s.ip_families.as_ref())
            .and_then(|f| f.first())
            .map(String::as_str),
    };
    Ok(endpoints(cluster.slices_of(name), &target))
}

/// The TCP port of Service `service` that `wanted` names, by number or by name.
fn service_port<'a>(
    service: &str,
    wanted: &IntOrString,
    ports: &'a [ServicePort],
) -> Result<&'a ServicePort, Cond> {
    let port = ports.iter().find(|p| match wanted {
        IntOrString::Int(n) => p.port == *n,
        IntOrString::String(s) => p.name.as_deref() == Some(s.as_str()),
    });
    let Some(port) = port else {
        let have: Vec<String> = ports
            .iter()
            .map(|p| match &p.name {
                Some(n) if !n.is_empty() => format!("{n}/{}", p.port),
                _ => p.port.to_string(),
            })
            .collect();
        let have = if have.is_empty() {
            "none".to_string()
        } else {
            have.join(", ")
        };
        return Err(Cond::status_false(
            reason::PORT_NOT_FOUND,
            format!(
                "Service {service} has no port {} (ports: {have})",
                port_text(wanted)
            ),
        ));
    };
    if !is_tcp(port.protocol.as_deref()) {
        return Err(Cond::status_false(
            reason::PORT_NOT_FOUND,
            format!(
                "Service {service} port {} is {}, not TCP",
                port_text(wanted),
                port.protocol.as_deref().unwrap_or_default()
            ),
        ));
    }
    Ok(port)
}

/// The distinct addresses of the slices' endpoints on `target`, sorted. The same address may sit
/// in two slices while the controller moves it; the more usable report wins.
fn endpoints(slices: &[&EndpointSlice], target: &SlicePort<'_>) -> Vec<ResolvedEndpoint> {
    let mut found: BTreeMap<SocketAddr, ResolvedEndpoint> = BTreeMap::new();
    for slice in slices {
        let family = slice.address_type.as_str();
        if !matches!(family, "IPv4" | "IPv6") || target.family.is_some_and(|f| f != family) {
            continue;
        }
        let Some(port) = slice_port(slice, target.name) else {
            continue;
        };
        for (addr, resolved) in slice.endpoints.iter().filter_map(|ep| endpoint(ep, port)) {
            let better = found
                .get(&addr)
                .is_none_or(|old| rank(resolved.flags) > rank(old.flags));
            if better {
                found.insert(addr, resolved);
            }
        }
    }
    found.into_values().collect()
}

/// The slice's TCP port named `name`.
fn slice_port(slice: &EndpointSlice, name: &str) -> Option<u16> {
    let port = slice.ports.iter().flatten().find_map(|p| {
        let same = p.name.as_deref().unwrap_or("") == name;
        (same && is_tcp(p.protocol.as_deref()))
            .then_some(p.port)
            .flatten()
    })?;
    u16::try_from(port).ok()
}

/// One slice endpoint on `port`, keyed by its address.
fn endpoint(ep: &SliceEndpoint, port: u16) -> Option<(SocketAddr, ResolvedEndpoint)> {
    let ip = ep.addresses.first()?.parse::<IpAddr>().ok()?;
    let c = ep.conditions.clone().unwrap_or_default();
    // nil conditions mean "unknown": ready and serving, not terminating (API docs).
    let ready = c.ready.unwrap_or(true);
    let terminating = c.terminating.unwrap_or(false);
    let flags = Flags {
        // With publishNotReadyAddresses a terminating pod still reports ready=true; it must not
        // take new traffic like a ready one.
        ready: ready && !terminating,
        serving: c.serving.unwrap_or(ready),
        terminating,
    };
    let addr = SocketAddr::new(ip, port);
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
    Some((addr, ResolvedEndpoint { endpoint, flags }))
}

/// Ready endpoints take traffic; terminating ones that still serve are a last resort; the rest
/// (not serving) are left out of the config.
pub(super) fn usable(f: Flags) -> bool {
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

/// Counts every distinct address, usable or not.
pub(super) fn count(endpoints: &[ResolvedEndpoint]) -> EndpointCounts {
    let mut c = EndpointCounts::default();
    for ResolvedEndpoint { flags: f, .. } in endpoints {
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

/// A port as a message names it: `80`, or `"http"`.
pub(super) fn port_text(p: &IntOrString) -> String {
    match p {
        IntOrString::Int(n) => n.to_string(),
        IntOrString::String(s) => format!("{s:?}"),
    }
}

// === impl Cluster ===

impl<'a> Cluster<'a> {
    pub fn new(services: &[&'a Service], slices: &[&'a EndpointSlice]) -> Self {
        let services = services
            .iter()
            .filter_map(|s| Some((s.metadata.name.as_deref()?, *s)))
            .collect();
        let mut by_service: BTreeMap<&str, Vec<&EndpointSlice>> = BTreeMap::new();
        for s in slices {
            if let Some(svc) = s
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
            {
                by_service.entry(svc.as_str()).or_default().push(s);
            }
        }
        Cluster {
            services,
            slices: by_service,
        }
    }

    fn slices_of(&self, service: &str) -> &[&'a EndpointSlice] {
        self.slices.get(service).map_or(&[], Vec::as_slice)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::render::fixtures::{service, slice, spec};

    fn addresses(r: &Resolution) -> Vec<(&str, Flags)> {
        let eps = r.as_ref().expect("resolved");
        eps.iter()
            .map(|e| (e.endpoint.address.as_str(), e.flags))
            .collect()
    }

    #[test]
    fn a_named_port_resolves_to_its_slice_endpoints_with_their_conditions() {
        let svc = service("pay", &[(Some("http"), 80), (Some("admin"), 81)]);
        let http = slice(
            "pay",
            "IPv4",
            (Some("http"), 8080),
            &[
                ("10.0.0.2", Some(false), Some(true), Some(true)),
                ("10.0.0.1", None, None, None),
                ("10.0.0.3", Some(true), Some(true), Some(true)),
            ],
        );
        let admin = slice(
            "pay",
            "IPv4",
            (Some("admin"), 9090),
            &[("10.9.9.9", None, None, None)],
        );
        let other = slice(
            "db",
            "IPv4",
            (Some("http"), 5432),
            &[("10.8.8.8", None, None, None)],
        );
        let cluster = Cluster::new(&[&svc], &[&http, &admin, &other]);
        let r = resolve(
            &spec("pay", IntOrString::String("http".into()), 1),
            &cluster,
        );
        let ready = Flags {
            ready: true,
            serving: true,
            terminating: false,
        };
        let draining = Flags {
            ready: false,
            serving: true,
            terminating: true,
        };
        assert_eq!(
            addresses(&r),
            [
                ("10.0.0.1:8080", ready),
                ("10.0.0.2:8080", draining),
                // ready=true while terminating (publishNotReadyAddresses) is not ready
                ("10.0.0.3:8080", draining),
            ]
        );
        let pods: Vec<Option<&str>> = r
            .as_ref()
            .unwrap()
            .iter()
            .map(|e| e.endpoint.pod.as_deref())
            .collect();
        assert_eq!(pods, [Some("pay-1"), Some("pay-0"), Some("pay-2")]);
    }

    #[test]
    fn missing_services_ports_and_non_tcp_ports_say_what_is_wrong() {
        let mut udp = service("dns", &[(Some("dns"), 53)]);
        udp.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].protocol = Some("UDP".into());
        let mut ext = service("ext", &[(None, 80)]);
        ext.spec.as_mut().unwrap().type_ = Some("ExternalName".into());
        let pay = service("pay", &[(Some("http"), 80), (None, 81)]);
        let cluster = Cluster::new(&[&udp, &ext, &pay], &[]);
        let refused = |s: &str, port: IntOrString| {
            let c = resolve(&spec(s, port, 1), &cluster).unwrap_err();
            (c.reason, c.message)
        };
        assert_eq!(
            refused("nope", IntOrString::Int(80)),
            (
                reason::SERVICE_NOT_FOUND,
                "Service nope does not exist in this namespace".into()
            )
        );
        assert_eq!(
            refused("pay", IntOrString::String("grpc".into())),
            (
                reason::PORT_NOT_FOUND,
                "Service pay has no port \"grpc\" (ports: http/80, 81)".into()
            )
        );
        assert_eq!(
            refused("dns", IntOrString::Int(53)),
            (
                reason::PORT_NOT_FOUND,
                "Service dns port 53 is UDP, not TCP".into()
            )
        );
        assert_eq!(
            refused("ext", IntOrString::Int(80)).0,
            reason::UNSUPPORTED_SERVICE
        );
        assert_eq!(
            resolve(&spec("pay", IntOrString::Int(81), 1), &cluster),
            Ok(Vec::new())
        );
    }

    #[test]
    fn the_primary_family_and_the_most_usable_duplicate_win() {
        let mut svc = service("pay", &[(None, 80)]);
        let v4 = slice(
            "pay",
            "IPv4",
            (None, 8080),
            &[("10.0.0.1", Some(false), Some(false), Some(false))],
        );
        let mut v4_again = slice(
            "pay",
            "IPv4",
            (None, 8080),
            &[("10.0.0.1", Some(true), None, None)],
        );
        v4_again.metadata.name = Some("pay-moved".into());
        let v6 = slice(
            "pay",
            "IPv6",
            (None, 8080),
            &[("fd00::1", None, None, None)],
        );
        let fqdn = slice(
            "pay",
            "FQDN",
            (None, 8080),
            &[("pay.example", None, None, None)],
        );
        let slices = [&v4, &v4_again, &v6, &fqdn];
        let cluster = Cluster::new(&[&svc], &slices);
        let s = spec("pay", IntOrString::Int(80), 1);
        let r = resolve(&s, &cluster);
        let got: Vec<&str> = addresses(&r).into_iter().map(|(a, _)| a).collect();
        assert_eq!(got, ["10.0.0.1:8080", "[fd00::1]:8080"]);
        assert!(addresses(&r)[0].1.ready, "the ready report wins");
        svc.spec.as_mut().unwrap().ip_families = Some(vec!["IPv6".into(), "IPv4".into()]);
        let cluster = Cluster::new(&[&svc], &slices);
        let r = resolve(&s, &cluster);
        let got: Vec<&str> = addresses(&r).into_iter().map(|(a, _)| a).collect();
        assert_eq!(got, ["[fd00::1]:8080"]);
    }

    #[test]
    fn counts_cover_every_address_usable_only_ready_or_serving_while_terminating() {
        let f = |ready, serving, terminating| Flags {
            ready,
            serving,
            terminating,
        };
        assert!(usable(f(true, true, false)));
        assert!(usable(f(false, true, true)));
        assert!(!usable(f(false, false, true)));
        assert!(!usable(f(false, true, false)));
        let eps: Vec<ResolvedEndpoint> = [
            f(true, true, false),
            f(false, true, true),
            f(false, false, false),
        ]
        .into_iter()
        .map(|flags| ResolvedEndpoint {
            endpoint: Endpoint {
                address: String::new(),
                pod: None,
                state: EndpointState::Ready,
            },
            flags,
        })
        .collect();
        assert_eq!(
            count(&eps),
            EndpointCounts {
                total: 3,
                ready: 1,
                serving: 2,
                terminating: 1,
                ejected: 0
            }
        );
    }
}
