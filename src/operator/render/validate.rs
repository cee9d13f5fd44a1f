//! Step 1, validation: every spec is checked the way config files are; an invalid policy is left
//! out of the config with `Accepted=False`, and told when its last accepted version keeps running.

use std::collections::BTreeMap;

use super::{Outcome, PolicyInput};
use crate::{
    api::{reason, UpstreamPolicySpec},
    config::{selector, FieldErrors},
};

/// A policy whose spec passed validation.
#[derive(Clone, Copy, Debug)]
pub(super) struct ValidPolicy<'a> {
    pub name: &'a str,
    pub spec: &'a UpstreamPolicySpec,
}

/// What validation decided for a namespace.
#[derive(Debug)]
pub(super) struct Validation<'a> {
    /// The valid policies, in the order they were given (oldest first).
    pub valid: Vec<ValidPolicy<'a>>,
    /// The outcome of every invalid one, by name.
    pub refused: BTreeMap<String, Outcome>,
}

pub(super) fn validate<'a>(by_age: &[&PolicyInput<'a>]) -> Validation<'a> {
    let mut validation = Validation {
        valid: Vec::new(),
        refused: BTreeMap::new(),
    };
    for p in by_age {
        let spec = p.spec.clone().and_then(|spec| check(spec).map(|()| spec));
        match spec {
            Ok(spec) => validation.valid.push(ValidPolicy { name: p.name, spec }),
            Err(problem) => {
                let mut outcome = Outcome::not_accepted(reason::INVALID, problem);
                if p.last_accepted.is_some() {
                    outcome.accepted.message.push_str(
                        "; sidecars keep running the last accepted version of this policy",
                    );
                }
                validation.refused.insert(p.name.to_string(), outcome);
            }
        }
    }
    validation
}

/// Every rule `spec` breaks, on one line (`spec.retries.attempts: ...; spec.workloadSelector...`).
fn check(spec: &UpstreamPolicySpec) -> Result<(), String> {
    let mut errs = FieldErrors::default();
    spec.policy.validate("spec", &mut errs);
    if let Some(sel) = &spec.workload_selector {
        selector::validate(sel, "spec.workloadSelector", &mut errs);
    }
    errs.into_result()
        .map_err(|errs| errs.to_string().replace('\n', "; "))
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

    use super::*;
    use crate::{
        api::ConditionStatus,
        operator::render::fixtures::{input, running_upstream, spec, ts},
    };

    #[test]
    fn invalid_and_unreadable_specs_are_refused_valid_ones_kept_in_order() {
        let t = ts(1);
        let good = spec("pay", IntOrString::Int(80), 18080);
        let mut bad = good.clone();
        bad.policy.retries.attempts = 11;
        bad.workload_selector = Some(
            serde_json::from_value(serde_json::json!({"matchExpressions": [
                {"key": "app", "operator": "Like", "values": ["x"]}]}))
            .unwrap(),
        );
        let unreadable = PolicyInput {
            spec: Err("the object cannot be read: boom".into()),
            ..input("garbled", &t, &good)
        };
        let inputs = [
            input("b", &t, &good),
            input("bad", &t, &bad),
            unreadable,
            input("a", &t, &good),
        ];
        let v = validate(&inputs.iter().collect::<Vec<_>>());
        let names: Vec<&str> = v.valid.iter().map(|p| p.name).collect();
        assert_eq!(names, ["b", "a"], "given order, not name order");
        let bad = &v.refused["bad"].accepted;
        assert_eq!(
            (bad.status, bad.reason),
            (ConditionStatus::False, reason::INVALID)
        );
        assert_eq!(
            bad.message,
            "spec.retries.attempts: must be 0..=10, got 11; spec.workloadSelector.matchExpressions[0].operator: must be one of In, NotIn, Exists, DoesNotExist, got \"Like\""
        );
        assert_eq!(
            v.refused["garbled"].accepted.message,
            "the object cannot be read: boom"
        );
        assert!(!v.refused["garbled"].rendered);
    }

    #[test]
    fn a_refused_policy_with_a_running_version_says_it_keeps_running() {
        let t = ts(1);
        let mut bad = spec("pay", IntOrString::Int(80), 18080);
        bad.policy.retries.attempts = 11;
        let running = running_upstream();
        let p = PolicyInput {
            last_accepted: Some(&running),
            ..input("p", &t, &bad)
        };
        let v = validate(&[&p]);
        assert!(v.valid.is_empty());
        assert!(v.refused["p"]
            .accepted
            .message
            .ends_with("; sidecars keep running the last accepted version of this policy"));
    }
}
