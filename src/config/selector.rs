//! Kubernetes label selectors as upstreams' `workloadSelector`: matching a pod's labels, checking
//! a selector is well formed, and deciding whether two selectors can ever select the same pod
//! (two upstreams may share a listen address only when they cannot).

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use super::FieldErrors;

const OPERATORS: [&str; 4] = ["In", "NotIn", "Exists", "DoesNotExist"];

/// Does `sel` select a pod with `labels`? (`matchLabels` AND every `matchExpressions` entry.)
/// An unknown operator selects nothing, as the API server's own matching does.
pub fn matches(sel: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    if let Some(ml) = &sel.match_labels {
        if ml.iter().any(|(k, v)| labels.get(k) != Some(v)) {
            return false;
        }
    }
    for e in sel.match_expressions.iter().flatten() {
        let have = labels.get(&e.key);
        let values = e.values.as_deref().unwrap_or_default();
        let ok = match e.operator.as_str() {
            "In" => have.is_some_and(|v| values.contains(v)),
            "NotIn" => have.is_none_or(|v| !values.contains(v)),
            "Exists" => have.is_some(),
            "DoesNotExist" => have.is_none(),
            _ => false,
        };
        if !ok {
            return false;
        }
    }
    true
}

/// Records every malformed requirement of `sel` below `path` (the rules the API server applies to
/// a Deployment's selector, which a CRD's schema does not).
pub fn validate(sel: &LabelSelector, path: &str, errs: &mut FieldErrors) {
    for (i, e) in sel.match_expressions.iter().flatten().enumerate() {
        let p = format!("{path}.matchExpressions[{i}]");
        if e.key.is_empty() {
            errs.push(format!("{p}.key"), "must not be empty");
        }
        let n = e.values.as_ref().map_or(0, Vec::len);
        match e.operator.as_str() {
            "In" | "NotIn" if n == 0 => errs.push(
                format!("{p}.values"),
                format!("must not be empty with operator {}", e.operator),
            ),
            "Exists" | "DoesNotExist" if n > 0 => errs.push(
                format!("{p}.values"),
                format!("must be empty with operator {}", e.operator),
            ),
            op if !OPERATORS.contains(&op) => errs.push(
                format!("{p}.operator"),
                format!("must be one of In, NotIn, Exists, DoesNotExist, got {op:?}"),
            ),
            _ => {}
        }
    }
}

/// Can no pod be selected by both `a` and `b`? `None` (no selector) selects every pod.
///
/// Exact, not a guess: a selector is a conjunction of per-key requirements and keys are
/// independent, so two selectors share a pod unless the requirements of some one key,
/// taken together, cannot be met.
pub fn disjoint(a: Option<&LabelSelector>, b: Option<&LabelSelector>) -> bool {
    let (Some(a), Some(b)) = (a, b) else {
        return false;
    };
    let mut keys: BTreeMap<&str, KeyRule<'_>> = BTreeMap::new();
    for sel in [a, b] {
        for (k, v) in sel.match_labels.iter().flatten() {
            keys.entry(k).or_default().only(std::iter::once(v.as_str()));
        }
        for e in sel.match_expressions.iter().flatten() {
            let values = e.values.iter().flatten().map(String::as_str);
            let rule = keys.entry(&e.key).or_default();
            match e.operator.as_str() {
                "In" => rule.only(values),
                "NotIn" => rule.not.extend(values),
                "Exists" => rule.present = true,
                "DoesNotExist" => rule.absent = true,
                // Selects nothing, so shares nothing.
                _ => return true,
            }
        }
    }
    keys.values().any(KeyRule::impossible)
}

/// Everything two selectors together demand of one label key.
#[derive(Default)]
struct KeyRule<'a> {
    present: bool,
    absent: bool,
    /// The value must be one of these (the intersection of every `In` and `matchLabels`).
    one_of: Option<BTreeSet<&'a str>>,
    not: BTreeSet<&'a str>,
}

impl<'a> KeyRule<'a> {
    fn only(&mut self, values: impl Iterator<Item = &'a str>) {
        let values: BTreeSet<&str> = values.collect();
        self.one_of = Some(match self.one_of.take() {
            None => values,
            Some(prev) => prev.intersection(&values).copied().collect(),
        });
    }

    fn impossible(&self) -> bool {
        let needs_value = self.present || self.one_of.is_some();
        match &self.one_of {
            _ if self.absent && needs_value => true,
            Some(one_of) => one_of.iter().all(|v| self.not.contains(v)),
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn sel(labels: &[(&str, &str)], exprs: &[(&str, &str, &[&str])]) -> LabelSelector {
        LabelSelector {
            match_labels: (!labels.is_empty()).then(|| {
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            }),
            match_expressions: (!exprs.is_empty()).then(|| {
                exprs
                    .iter()
                    .map(|(k, op, vs)| LabelSelectorRequirement {
                        key: k.to_string(),
                        operator: op.to_string(),
                        values: (!vs.is_empty())
                            .then(|| vs.iter().map(|v| v.to_string()).collect()),
                    })
                    .collect()
            }),
        }
    }

    fn pod(labels: &[(&str, &str)]) -> BTreeMap<String, String> {
        labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn disjoint_when_one_key_cannot_be_satisfied() {
        let cases: &[(LabelSelector, LabelSelector, bool)] = &[
            // matchLabels with different values.
            (sel(&[("app", "a")], &[]), sel(&[("app", "b")], &[]), true),
            (sel(&[("app", "a")], &[]), sel(&[("app", "a")], &[]), false),
            // Different keys can both hold.
            (
                sel(&[("app", "a")], &[]),
                sel(&[("tier", "edge")], &[]),
                false,
            ),
            // In sets that do not intersect, and ones that do.
            (
                sel(&[], &[("app", "In", &["a", "b"])]),
                sel(&[], &[("app", "In", &["c"])]),
                true,
            ),
            (
                sel(&[], &[("app", "In", &["a", "b"])]),
                sel(&[("app", "b")], &[]),
                false,
            ),
            // NotIn covering every allowed value, and leaving one.
            (
                sel(&[], &[("app", "In", &["a", "b"])]),
                sel(&[], &[("app", "NotIn", &["a", "b"])]),
                true,
            ),
            (
                sel(&[], &[("app", "In", &["a", "b"])]),
                sel(&[], &[("app", "NotIn", &["a"])]),
                false,
            ),
            // Exists / DoesNotExist.
            (
                sel(&[], &[("canary", "Exists", &[])]),
                sel(&[], &[("canary", "DoesNotExist", &[])]),
                true,
            ),
            (
                sel(&[("canary", "yes")], &[]),
                sel(&[], &[("canary", "DoesNotExist", &[])]),
                true,
            ),
            // NotIn alone is met by a pod without the label.
            (
                sel(&[], &[("app", "NotIn", &["a"])]),
                sel(&[], &[("app", "DoesNotExist", &[])]),
                false,
            ),
            // The empty selector selects every pod.
            (LabelSelector::default(), sel(&[("app", "a")], &[]), false),
        ];
        for (i, (a, b, want)) in cases.iter().enumerate() {
            assert_eq!(disjoint(Some(a), Some(b)), *want, "case {i}");
            assert_eq!(disjoint(Some(b), Some(a)), *want, "case {i} swapped");
        }
        let a = sel(&[("app", "a")], &[]);
        assert!(!disjoint(None, Some(&a)));
        assert!(!disjoint(Some(&a), None));
        assert!(!disjoint(None, None));
    }

    /// `disjoint` agrees with `matches` over every pod drawn from a small label universe.
    #[test]
    fn disjoint_agrees_with_matching_on_every_pod() {
        let values: [Option<&str>; 3] = [None, Some("a"), Some("b")];
        let mut pods = Vec::new();
        for app in values {
            for tier in values {
                let mut p = BTreeMap::new();
                if let Some(v) = app {
                    p.insert("app".to_string(), v.to_string());
                }
                if let Some(v) = tier {
                    p.insert("tier".to_string(), v.to_string());
                }
                pods.push(p);
            }
        }
        let selectors = [
            sel(&[("app", "a")], &[]),
            sel(&[("app", "b")], &[]),
            sel(&[("app", "a"), ("tier", "b")], &[]),
            sel(&[], &[("app", "In", &["a", "b"])]),
            sel(&[], &[("app", "NotIn", &["a"])]),
            sel(&[], &[("app", "Exists", &[])]),
            sel(&[], &[("app", "DoesNotExist", &[])]),
            sel(&[], &[("tier", "In", &["b"]), ("app", "NotIn", &["b"])]),
            LabelSelector::default(),
        ];
        for a in &selectors {
            for b in &selectors {
                let shared = pods.iter().any(|p| matches(a, p) && matches(b, p));
                assert_eq!(disjoint(Some(a), Some(b)), !shared, "{a:?} / {b:?}");
            }
        }
    }

    #[test]
    fn matches_requirements() {
        let p = pod(&[("app", "gateway"), ("tier", "edge")]);
        assert!(matches(&sel(&[("app", "gateway")], &[]), &p));
        assert!(!matches(&sel(&[("app", "other")], &[]), &p));
        assert!(matches(&sel(&[], &[("tier", "In", &["edge", "x"])]), &p));
        assert!(matches(&sel(&[], &[("zone", "NotIn", &["x"])]), &p));
        assert!(!matches(&sel(&[], &[("zone", "Exists", &[])]), &p));
        assert!(matches(&sel(&[], &[("zone", "DoesNotExist", &[])]), &p));
        assert!(!matches(&sel(&[], &[("app", "Like", &["g"])]), &p));
    }

    #[test]
    fn malformed_requirements_are_named() {
        let s = sel(
            &[],
            &[
                ("app", "In", &[]),
                ("app", "Exists", &["x"]),
                ("app", "Like", &["x"]),
                ("", "Exists", &[]),
            ],
        );
        let mut errs = FieldErrors::default();
        validate(&s, "spec.workloadSelector", &mut errs);
        let text = errs.to_string();
        for want in [
            "spec.workloadSelector.matchExpressions[0].values: must not be empty with operator In",
            "spec.workloadSelector.matchExpressions[1].values: must be empty with operator Exists",
            "spec.workloadSelector.matchExpressions[2].operator: must be one of In, NotIn, Exists, DoesNotExist, got \"Like\"",
            "spec.workloadSelector.matchExpressions[3].key: must not be empty",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
    }
}
