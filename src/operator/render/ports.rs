//! Step 2, port arbitration: in age order, a policy keeps its listener port unless an older
//! policy that kept it serves workloads that may overlap (the same pod could run both). Every
//! claimant is told. Keepers of one port are then pairwise disjoint, as the sidecar's
//! validation demands.

use std::collections::BTreeMap;

use super::validate::ValidPolicy;
use crate::config::selector;

/// Who lost a contested listener port, and to whom.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct PortArbitration<'a> {
    /// A losing policy → the older policy that kept the port.
    pub lost_to: BTreeMap<&'a str, &'a str>,
    /// A keeper → the newer policies it kept the port from.
    pub beaten: BTreeMap<&'a str, Vec<&'a str>>,
}

/// `valid` must be oldest first.
pub(super) fn arbitrate<'a>(valid: &[ValidPolicy<'a>]) -> PortArbitration<'a> {
    let mut keepers: BTreeMap<u16, Vec<&ValidPolicy<'a>>> = BTreeMap::new();
    let mut arbitration = PortArbitration::default();
    for claim in valid {
        let on_port = keepers.entry(claim.spec.listener.port).or_default();
        let older = on_port.iter().find(|kept| {
            !selector::disjoint(
                kept.spec.workload_selector.as_ref(),
                claim.spec.workload_selector.as_ref(),
            )
        });
        match older {
            Some(winner) => {
                arbitration.lost_to.insert(claim.name, winner.name);
                arbitration
                    .beaten
                    .entry(winner.name)
                    .or_default()
                    .push(claim.name);
            }
            None => on_port.push(claim),
        }
    }
    arbitration
}

// === impl PortArbitration ===

impl PortArbitration<'_> {
    /// The policy kept its listener port (or never had to share it).
    pub fn keeps(&self, name: &str) -> bool {
        !self.lost_to.contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

    use super::*;
    use crate::{api::UpstreamPolicySpec, operator::render::fixtures::spec};

    fn on(port: u16, selector: serde_json::Value) -> UpstreamPolicySpec {
        let mut s = spec("pay", IntOrString::Int(80), port);
        if !selector.is_null() {
            s.workload_selector = Some(serde_json::from_value(selector).unwrap());
        }
        s
    }

    #[test]
    fn the_oldest_keeps_a_port_overlapping_newer_claims_lose_disjoint_ones_share() {
        let all = on(18080, serde_json::Value::Null);
        let x = on(18081, serde_json::json!({"matchLabels": {"app": "x"}}));
        let xy = on(
            18081,
            serde_json::json!({"matchExpressions": [
            {"key": "app", "operator": "In", "values": ["x", "y"]}]}),
        );
        let y = on(18081, serde_json::json!({"matchLabels": {"app": "y"}}));
        let valid = [
            ValidPolicy {
                name: "first",
                spec: &all,
            },
            ValidPolicy {
                name: "second",
                spec: &all,
            },
            ValidPolicy {
                name: "third",
                spec: &all,
            },
            ValidPolicy {
                name: "x",
                spec: &x,
            },
            ValidPolicy {
                name: "xy",
                spec: &xy,
            },
            ValidPolicy {
                name: "y",
                spec: &y,
            },
        ];
        let a = arbitrate(&valid);
        assert_eq!(
            a.lost_to,
            BTreeMap::from([("second", "first"), ("third", "first"), ("xy", "x")])
        );
        assert_eq!(
            a.beaten,
            BTreeMap::from([("first", vec!["second", "third"]), ("x", vec!["xy"])])
        );
        // y overlaps only xy, which kept nothing: y shares the port with x.
        assert!(a.keeps("y") && a.keeps("x") && a.keeps("first"));
        assert!(!a.keeps("xy"));
    }

    #[test]
    fn distinct_ports_never_conflict() {
        let (a, b) = (
            on(18080, serde_json::Value::Null),
            on(18081, serde_json::Value::Null),
        );
        let got = arbitrate(&[
            ValidPolicy {
                name: "a",
                spec: &a,
            },
            ValidPolicy {
                name: "b",
                spec: &b,
            },
        ]);
        assert_eq!(got, PortArbitration::default());
    }
}
