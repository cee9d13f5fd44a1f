//! The two webhooks of the `detour-injector` MutatingWebhookConfiguration, as the chart renders
//! them: one definition for the chart's render test and for the webhook end-to-end tests, so the
//! configuration the tests run against cannot drift from the one the chart installs.
// Included by path too (`#[path = "support/webhooks.rs"]`).
#![allow(dead_code)]

use serde_json::{json, Value};

/// The `webhooks` list, for an operator in `release_ns` (no caBundle: the operator's job).
pub fn injector_webhooks(release_ns: &str, failure_policy: &str, timeout: u64) -> Value {
    let webhook = |name: &str, ns_selector: Value, obj_selector: Value| {
        json!({
            "name": name,
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "failurePolicy": failure_policy,
            "timeoutSeconds": timeout,
            "clientConfig": {"service": {"namespace": release_ns, "name": "detour-webhook", "path": "/inject", "port": 443}},
            "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"], "scope": "Namespaced"}],
            "namespaceSelector": ns_selector,
            "objectSelector": obj_selector,
        })
    };
    let not_system = json!({"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": [release_ns, "kube-system"]});
    json!([
        webhook(
            "namespace.inject.detour.dev",
            json!({"matchExpressions": [{"key": "detour.dev/inject", "operator": "In", "values": ["enabled"]}, not_system]}),
            json!({"matchExpressions": [{"key": "detour.dev/inject", "operator": "NotIn", "values": ["false"]}]}),
        ),
        webhook(
            "pod.inject.detour.dev",
            json!({"matchExpressions": [{"key": "detour.dev/inject", "operator": "NotIn", "values": ["enabled"]}, not_system]}),
            json!({"matchLabels": {"detour.dev/inject": "true"}}),
        ),
    ])
}
