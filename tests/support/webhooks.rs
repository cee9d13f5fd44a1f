//! The injector as the chart installs it: the two webhooks of the `detour-injector`
//! MutatingWebhookConfiguration and the operator's webhook options with the chart's names. One
//! definition for the chart's tests and for the webhook end-to-end tests, so the configuration
//! the tests run against cannot drift from the one the chart installs.
// Included by path too (`#[path = "support/webhooks.rs"]`).
#![allow(dead_code)]

use std::time::Duration;

use detour::operator::{
    certs::{CertSource, TlsOptions},
    inject::Settings,
    WebhookOptions,
};
use serde_json::{json, Value};

/// The chart's names: the webhook's Service, the Secret of its certificate, and the
/// MutatingWebhookConfiguration.
pub const WEBHOOK_SERVICE: &str = "detour-webhook";
pub const WEBHOOK_SECRET: &str = "detour-webhook-tls";
pub const WEBHOOK_CONFIG: &str = "detour-injector";

/// The webhook's certificate, issued by the operator in `release_ns` under the chart's names:
/// serving certificates live `lifetime` and are renewed `renew_before` their end.
pub fn chart_tls(release_ns: &str, lifetime: Duration, renew_before: Duration) -> TlsOptions {
    TlsOptions {
        namespace: release_ns.into(),
        service: WEBHOOK_SERVICE.into(),
        secret: WEBHOOK_SECRET.into(),
        webhook_config: WEBHOOK_CONFIG.into(),
        source: CertSource::Operator,
        lifetime,
        renew_before,
    }
}

/// The webhook as the chart runs it (on 127.0.0.1:0 here), with [`chart_tls`].
pub fn chart_webhook(
    release_ns: &str,
    lifetime: Duration,
    renew_before: Duration,
) -> WebhookOptions {
    WebhookOptions {
        addr: "127.0.0.1:0".parse().unwrap(),
        tls: chart_tls(release_ns, lifetime, renew_before),
        sidecar: Settings::default(),
        excluded_namespaces: vec![release_ns.into(), "kube-system".into()],
    }
}

/// The `webhooks` list, for an operator in `release_ns` (no caBundle: the operator's job).
pub fn injector_webhooks(release_ns: &str, failure_policy: &str, timeout: u64) -> Value {
    let webhook = |name: &str, ns_selector: Value, obj_selector: Value| {
        json!({
            "name": name,
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "failurePolicy": failure_policy,
            "timeoutSeconds": timeout,
            "clientConfig": {"service": {"namespace": release_ns, "name": WEBHOOK_SERVICE, "path": "/inject", "port": 443}},
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
