//! Objects the render steps' unit tests build: policy specs, Services, EndpointSlices.

use k8s_openapi::{
    api::{
        core::v1::{ObjectReference, Service, ServicePort, ServiceSpec},
        discovery::v1::{
            Endpoint as SliceEndpoint, EndpointConditions, EndpointPort, EndpointSlice,
        },
    },
    apimachinery::pkg::{
        apis::meta::v1::{ObjectMeta, Time},
        util::intstr::IntOrString,
    },
    jiff::Timestamp,
};

use super::{PolicyInput, SERVICE_NAME_LABEL};
use crate::api::{Listener, UpstreamPolicySpec, UpstreamRef};

pub(super) fn spec(service: &str, port: IntOrString, listener: u16) -> UpstreamPolicySpec {
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

pub(super) fn service(name: &str, ports: &[(Option<&str>, i32)]) -> Service {
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
pub(super) type Ep<'a> = (&'a str, Option<bool>, Option<bool>, Option<bool>);

pub(super) fn slice(
    svc: &str,
    family: &str,
    port: (Option<&str>, i32),
    eps: &[Ep<'_>],
) -> EndpointSlice {
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

pub(super) fn ts(s: i64) -> Time {
    Time(Timestamp::from_second(s).unwrap())
}

pub(super) fn input<'a>(
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

/// An upstream the sidecars run now for policy `ns/p` on port 18080, with no endpoints.
pub(super) fn running_upstream() -> crate::config::Upstream {
    crate::config::Upstream {
        name: "ns/p".into(),
        listen: "127.0.0.1:18080".into(),
        workload_selector: None,
        endpoints: Vec::new(),
        policy: Default::default(),
    }
}
