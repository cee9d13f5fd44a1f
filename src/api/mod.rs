//! The `UpstreamPolicy` custom resource (`detour.dev/v1alpha1`).
//!
//! The spec embeds [`Policy`], the same type the sidecar's config document uses, so defaults and
//! validation rules exist once. The CRD YAML committed in `crds/` is generated from these types.

use k8s_openapi::{
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    apimachinery::pkg::{
        apis::meta::v1::{Condition, LabelSelector},
        util::intstr::IntOrString,
    },
};
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::config::Policy;

/// API group of every detour resource.
pub const GROUP: &str = "detour.dev";

/// Label on every pod that runs the detour sidecar (any value). The operator watches only pods
/// carrying it, to collect the sidecars' live endpoint state; the injector sets it, and so must
/// whoever adds the sidecar by hand.
pub const SIDECAR_LABEL: &str = "detour.dev/sidecar";

/// Name of the sidecar container's admin port (`containerPort` of `--admin`). The operator reads
/// `GET /endpoints` there; the admin server must then listen on the pod IP (`--admin 0.0.0.0:9901`).
pub const SIDECAR_ADMIN_PORT: &str = "detour-admin";

/// Condition types written to `status.conditions`.
pub mod condition {
    /// The policy is valid and its listener is free: it is part of the rendered config.
    pub const ACCEPTED: &str = "Accepted";
    /// The Service and port it names exist.
    pub const RESOLVED_REFS: &str = "ResolvedRefs";
    /// Accepted, resolved, and at least one endpoint is ready.
    pub const READY: &str = "Ready";
    /// Every type, in the order a status lists them.
    pub const ALL: [&str; 3] = [ACCEPTED, RESOLVED_REFS, READY];
}

/// What a condition's `status` says, as Kubernetes spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConditionStatus {
    True,
    False,
    /// Not decided yet (`ResolvedRefs` of a policy that is not accepted).
    Unknown,
}

// === impl ConditionStatus ===

impl ConditionStatus {
    pub const ALL: [ConditionStatus; 3] = [
        ConditionStatus::True,
        ConditionStatus::False,
        ConditionStatus::Unknown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ConditionStatus::True => "True",
            ConditionStatus::False => "False",
            ConditionStatus::Unknown => "Unknown",
        }
    }
}

/// Condition reasons: each one says what to do next.
pub mod reason {
    pub const ACCEPTED: &str = "Accepted";
    /// The spec breaks a rule (only possible when the API server did not enforce the schema).
    pub const INVALID: &str = "Invalid";
    /// Another policy in the namespace claims the same listener port.
    pub const LISTENER_CONFLICT: &str = "ListenerConflict";
    pub const RESOLVED: &str = "ResolvedRefs";
    pub const SERVICE_NOT_FOUND: &str = "ServiceNotFound";
    pub const PORT_NOT_FOUND: &str = "PortNotFound";
    /// `ExternalName` Services have no endpoints to balance over.
    pub const UNSUPPORTED_SERVICE: &str = "UnsupportedServiceType";
    pub const NO_ENDPOINTS: &str = "NoEndpoints";
    pub const READY: &str = "Ready";
    /// Ready is false because the policy is not accepted.
    pub const NOT_ACCEPTED: &str = "NotAccepted";
    /// Ready is false because the Service or port is missing.
    pub const REFS_NOT_RESOLVED: &str = "RefsNotResolved";
    /// Ready is false because the API server refused the namespace's `detour-config` write.
    pub const CONFIG_NOT_APPLIED: &str = "ConfigNotApplied";
}

/// Resilience policy for calls from selected client pods to one Service.
// Several printer columns share a `type_`, which this lint mistakes for repeated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "detour.dev",
    version = "v1alpha1",
    kind = "UpstreamPolicy",
    namespaced,
    shortname = "upol",
    status = "UpstreamPolicyStatus",
    derive = "PartialEq",
    doc = "Resilience policy (health checks, outlier detection, retries, timeouts) for calls from selected client pods to one Service, run by the detour sidecar.",
    printcolumn(
        name = "Upstream",
        type_ = "string",
        json_path = ".spec.upstream.service"
    ),
    printcolumn(
        name = "Listener",
        type_ = "integer",
        json_path = ".spec.listener.port"
    ),
    printcolumn(
        name = "Ready-Endpoints",
        type_ = "integer",
        json_path = ".status.endpoints.ready"
    ),
    printcolumn(
        name = "Total-Endpoints",
        type_ = "integer",
        json_path = ".status.endpoints.total"
    ),
    printcolumn(
        name = "Ejected",
        type_ = "integer",
        json_path = ".status.endpoints.ejected"
    ),
    printcolumn(
        name = "Sidecars",
        type_ = "integer",
        priority = 1,
        json_path = ".status.sidecars"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        priority = 1,
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
// Flattening `Policy` keeps the spec flat (`spec.retries`, not `spec.policy.retries`) but loses
// struct-level schema extensions of `Policy`, so cross-struct rules live here.
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.retries) || !has(self.retries.perTryTimeout) || !has(self.timeouts) || !has(self.timeouts.request) || duration(self.retries.perTryTimeout) <= duration(self.timeouts.request)",
     "message": "retries.perTryTimeout must not exceed timeouts.request",
     "fieldPath": ".retries.perTryTimeout"}
]))]
pub struct UpstreamPolicySpec {
    /// Which client pods' sidecars apply this policy (in the policy's namespace). Absent selects
    /// every pod running the sidecar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_selector: Option<LabelSelector>,
    /// The Service called through the sidecar.
    pub upstream: UpstreamRef,
    /// The sidecar's local listener for this upstream.
    pub listener: Listener,
    #[serde(flatten)]
    pub policy: Policy,
}

/// A Service in the policy's namespace and one of its ports.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
// int-or-string: a port number, or a port name (IANA_SVC_NAME, as Service ports are named; a
// name of digits only reads as a number). `string()` because client-side CEL lacks `type()`.
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "string(self.port).matches('^[0-9]+$') ? (int(string(self.port)) >= 1 && int(string(self.port)) <= 65535) : (size(string(self.port)) <= 15 && string(self.port).matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$') && !string(self.port).contains('--'))",
     "message": "port must be 1-65535 or a port name (at most 15 lowercase letters, digits and '-', with a letter)",
     "fieldPath": ".port"}
]))]
pub struct UpstreamRef {
    /// Name of the Service (same namespace as the policy).
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub service: String,
    /// The Service port: its number (`port`, not `targetPort`) or its name.
    pub port: IntOrString,
}

/// Local listener of the sidecar.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Listener {
    /// Port on 127.0.0.1 the application calls instead of the Service (1024-65535).
    #[schemars(range(min = 1024, max = 65535))]
    pub port: u16,
}

/// What the operator observed and rendered.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamPolicyStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Accepted`, `ResolvedRefs` and `Ready`.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Endpoint counts of the upstream Service port.
    #[serde(default)]
    pub endpoints: EndpointCounts,
    /// Sidecars (pods labelled `detour.dev/sidecar`) that answered the operator's last scrape
    /// and run this policy's upstream. 0 means `endpoints.ejected` has no one to come from.
    #[serde(default)]
    pub sidecars: u32,
    /// Hash of the rendered `detour-config` document the policy is part of (what sidecars
    /// report in `/config` and `detour_config_info`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_hash: Option<String>,
}

/// Endpoints of the upstream Service port, by EndpointSlice condition.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EndpointCounts {
    /// Every distinct endpoint address.
    pub total: u32,
    /// `ready`: receive traffic.
    pub ready: u32,
    /// `serving` (ready or terminating but still serving).
    pub serving: u32,
    /// `terminating` (still serving ones are used only when nothing else is left).
    pub terminating: u32,
    /// Endpoints at least one sidecar has ejected (outlier detection on live traffic), as of the
    /// operator's last scrape of the sidecars.
    #[serde(default)]
    pub ejected: u32,
}

// === impl UpstreamPolicy ===

impl UpstreamPolicy {
    /// The condition of the given type, if set.
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.status
            .as_ref()?
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
    }
}

/// The CRD object.
pub fn crd() -> CustomResourceDefinition {
    UpstreamPolicy::crd()
}

/// The CRD as YAML, as `detour crd` prints it.
pub fn crd_yaml() -> String {
    let yaml = serde_saphyr::to_string(&crd()).expect("CRD serializes");
    format!("# Generated by `detour crd`: do not edit.\n{yaml}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn spec_schema() -> Value {
        let crd = serde_json::to_value(crd()).unwrap();
        crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"].clone()
    }

    #[test]
    fn flattened_policy_fields_keep_bounds_patterns_defaults_and_cel() {
        let s = spec_schema();
        let p = &s["properties"];
        for f in [
            "healthCheck",
            "outlierDetection",
            "retries",
            "timeouts",
            "panicThreshold",
            "loadBalancer",
            "upstream",
            "listener",
            "workloadSelector",
        ] {
            assert!(p.get(f).is_some(), "spec.{f} missing: {s:#}");
        }
        assert_eq!(p["panicThreshold"]["maximum"].as_f64(), Some(100.0));
        assert_eq!(p["panicThreshold"]["default"], json!(50));
        assert_eq!(
            p["retries"]["properties"]["attempts"]["maximum"].as_f64(),
            Some(10.0)
        );
        assert_eq!(
            p["retries"]["properties"]["perTryTimeout"]["pattern"],
            json!(crate::config::DURATION_PATTERN)
        );
        assert_eq!(p["healthCheck"]["properties"]["interval"]["default"], "2s");
        assert_eq!(
            p["healthCheck"]["properties"]["healthyThreshold"]["minimum"].as_f64(),
            Some(1.0)
        );
        assert_eq!(
            p["outlierDetection"]["properties"]["maxEjectionPercent"]["maximum"].as_f64(),
            Some(100.0)
        );
        let rules = |v: &Value| -> Vec<String> {
            v["x-kubernetes-validations"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|r| r["rule"].as_str().unwrap().to_string())
                        .collect()
                })
                .unwrap_or_default()
        };
        assert!(rules(&p["healthCheck"])[0].contains("self.timeout"));
        assert!(rules(&p["outlierDetection"])[0].contains("baseEjectionTime"));
        assert!(rules(&p["timeouts"])[0].contains("self.connect"));
        assert!(
            rules(&s)[0].contains("self.retries.perTryTimeout"),
            "spec-level rule missing: {s:#}"
        );
        assert_eq!(
            p["upstream"]["properties"]["port"]["x-kubernetes-int-or-string"],
            json!(true)
        );
        let req = s["required"].as_array().unwrap();
        assert!(req.contains(&json!("upstream")) && req.contains(&json!("listener")));
    }

    #[test]
    fn schema_is_structural() {
        // No `$ref`, `oneOf`/`anyOf` without types, or `additionalProperties: false` next to
        // properties: the API server rejects such schemas.
        fn walk(v: &Value, path: &str, bad: &mut Vec<String>) {
            match v {
                Value::Object(m) => {
                    for (k, c) in m {
                        if k == "$ref" || k == "$defs" || k == "definitions" {
                            bad.push(format!("{path}.{k}"));
                        }
                        if (k == "oneOf" || k == "anyOf") && path.ends_with("properties") {
                            bad.push(format!("{path}.{k}"));
                        }
                        walk(c, &format!("{path}.{k}"), bad);
                    }
                }
                Value::Array(a) => a.iter().for_each(|c| walk(c, path, bad)),
                _ => {}
            }
        }
        let crd = serde_json::to_value(crd()).unwrap();
        let mut bad = Vec::new();
        walk(&crd, "", &mut bad);
        assert!(bad.is_empty(), "{bad:?}");
    }

    #[test]
    fn status_conditions_are_a_list_map_by_type() {
        let crd = serde_json::to_value(crd()).unwrap();
        let c = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
            ["properties"]["conditions"];
        assert_eq!(c["x-kubernetes-list-type"], "map");
        assert_eq!(c["x-kubernetes-list-map-keys"], json!(["type"]));
        let v = &crd["spec"]["versions"][0];
        assert_eq!(v["subresources"]["status"], json!({}));
        assert_eq!(crd["spec"]["names"]["shortNames"], json!(["upol"]));
    }

    #[test]
    fn printer_columns_show_ejected_after_ready_and_total() {
        let crd = serde_json::to_value(crd()).unwrap();
        let cols = crd["spec"]["versions"][0]["additionalPrinterColumns"]
            .as_array()
            .unwrap();
        let names: Vec<&str> = cols.iter().map(|c| c["name"].as_str().unwrap()).collect();
        assert_eq!(
            names,
            [
                "Upstream",
                "Listener",
                "Ready-Endpoints",
                "Total-Endpoints",
                "Ejected",
                "Sidecars",
                "Ready",
                "Reason",
                "Age"
            ]
        );
        let col = |n: &str| cols.iter().find(|c| c["name"] == n).unwrap();
        assert_eq!(col("Ejected")["jsonPath"], ".status.endpoints.ejected");
        assert_eq!(col("Sidecars")["jsonPath"], ".status.sidecars");
        assert_eq!(col("Sidecars")["priority"], 1, "only in -o wide");
        // Both paths exist in the schema (a typo in a jsonPath shows an empty column).
        let status = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
            ["status"]["properties"];
        assert_eq!(
            status["endpoints"]["properties"]["ejected"]["type"],
            "integer"
        );
        assert_eq!(status["sidecars"]["type"], "integer");
    }

    #[test]
    fn status_from_before_sidecar_health_still_reads() {
        let s: UpstreamPolicyStatus = serde_json::from_value(json!({
            "endpoints": {"total": 2, "ready": 1, "serving": 1, "terminating": 0},
        }))
        .unwrap();
        assert_eq!((s.endpoints.ejected, s.sidecars), (0, 0));
    }

    #[test]
    fn spec_defaults_come_from_the_policy_type() {
        let p: UpstreamPolicySpec = serde_json::from_value(json!({
            "upstream": {"service": "payments", "port": "http"},
            "listener": {"port": 18080},
            "retries": {"attempts": 4}
        }))
        .unwrap();
        assert_eq!(p.policy.retries.attempts, 4);
        let mut want = Policy::default();
        want.retries.attempts = 4;
        assert_eq!(p.policy, want);
        assert_eq!(p.upstream.port, IntOrString::String("http".into()));
    }

    #[test]
    fn crd_snapshot_matches_committed_files() {
        let root = env!("CARGO_MANIFEST_DIR");
        let want = crd_yaml();
        for path in [
            "crds/upstreampolicies.detour.dev.yaml",
            "charts/detour/crds/upstreampolicies.detour.dev.yaml",
        ] {
            let full = format!("{root}/{path}");
            if std::env::var_os("DETOUR_UPDATE_CRDS").is_some() {
                std::fs::create_dir_all(std::path::Path::new(&full).parent().unwrap()).unwrap();
                std::fs::write(&full, &want).unwrap();
            }
            let got = std::fs::read_to_string(&full).unwrap_or_default();
            assert!(
                got == want,
                "{path} differs from the generated CRD; regenerate with \
                 `DETOUR_UPDATE_CRDS=1 cargo test --lib api::` (or `detour crd > {path}`)"
            );
        }
    }
}
