//! The pod's own labels (downward API file), so a sidecar serves only the upstreams whose
//! `workloadSelector` selects its pod (matching lives in `config::selector`).

use std::collections::BTreeMap;

pub use crate::config::selector::matches;

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
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};

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
