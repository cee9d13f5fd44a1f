//! Kubernetes label selector matching, so a sidecar serves only the upstreams whose
//! `workloadSelector` selects its own pod.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// Does `sel` select a pod with `labels`? (`matchLabels` AND every `matchExpressions` entry.)
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

/// Parses the downward API `labels` file: one `key="value"` per line.
pub fn parse_downward_labels(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once('=')?;
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(v);
            Some((k.trim().to_string(), v.replace("\\\"", "\"")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels() -> BTreeMap<String, String> {
        parse_downward_labels("app=\"gateway\"\ntier=\"edge\"\n")
    }

    #[test]
    fn parses_downward_api_format() {
        let l = labels();
        assert_eq!(l["app"], "gateway");
        assert_eq!(l["tier"], "edge");
    }

    #[test]
    fn match_labels_and_expressions() {
        let l = labels();
        let sel = LabelSelector {
            match_labels: Some([("app".to_string(), "gateway".to_string())].into()),
            match_expressions: Some(vec![
                LabelSelectorRequirement {
                    key: "tier".into(),
                    operator: "In".into(),
                    values: Some(vec!["edge".into(), "core".into()]),
                },
                LabelSelectorRequirement {
                    key: "canary".into(),
                    operator: "DoesNotExist".into(),
                    values: None,
                },
            ]),
        };
        assert!(matches(&sel, &l));
        let mut other = l.clone();
        other.insert("canary".into(), "1".into());
        assert!(!matches(&sel, &other));
        assert!(matches(&LabelSelector::default(), &l));
        let wrong = LabelSelector {
            match_labels: Some([("app".to_string(), "api".to_string())].into()),
            ..Default::default()
        };
        assert!(!matches(&wrong, &l));
    }
}
