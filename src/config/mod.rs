//! The config document sidecars run on: one versioned YAML/JSON file listing upstreams.
//!
//! The operator renders it into a ConfigMap; standalone users write it by hand. Parsing reports
//! the field path of a type error, and `validate` reports every rule broken, each with its path
//! (`upstreams[1].policy.retries.attempts: must be 0..=10, got 11`).

mod duration;
mod policy;
pub mod selector;

use std::{collections::BTreeMap, fmt, net::SocketAddr, path::Path};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use self::duration::{Duration, ParseDurationError, DURATION_PATTERN};
pub use self::policy::{
    HealthCheck, HealthCheckProtocol, LoadBalancer, OutlierDetection, Policy, Retries, RetryBudget,
    RetryOn, StatusRange, Timeouts,
};

/// The only `apiVersion` this build reads.
pub const API_VERSION: &str = "detour.dev/v1alpha1";
/// The `kind` of the sidecar config document.
pub const KIND: &str = "SidecarConfig";

/// The whole document.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Config {
    /// Must be `detour.dev/v1alpha1`.
    pub api_version: String,
    /// Must be `SidecarConfig`.
    pub kind: String,
    /// One entry per local listener.
    #[serde(default, deserialize_with = "null_as_empty::seq")]
    pub upstreams: Vec<Upstream>,
}

/// One upstream service: a local listener, its endpoints and its policy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Upstream {
    /// Unique name, used as the `upstream` metric label (`namespace/policy` when rendered by the
    /// operator).
    pub name: String,
    /// Local address the application calls, e.g. `127.0.0.1:18080`.
    pub listen: String,
    /// Which client pods this upstream applies to (set by the operator). A sidecar started with
    /// pod labels serves only the upstreams whose selector matches; absent means every pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_selector: Option<LabelSelector>,
    /// Endpoints to balance over.
    #[serde(default, deserialize_with = "null_as_empty::seq")]
    pub endpoints: Vec<Endpoint>,
    #[serde(default, deserialize_with = "null_as_empty::section")]
    pub policy: Policy,
}

/// One endpoint (pod) of an upstream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// `ip:port` (`[v6]:port` for IPv6).
    pub address: String,
    /// The pod behind the endpoint, for logs, `/config` and per-pod metrics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(default)]
    pub state: EndpointState,
}

/// What Kubernetes says about the endpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum EndpointState {
    /// Ready to serve.
    #[default]
    Ready,
    /// Shutting down (rolling update): used only when no other endpoint is left.
    Terminating,
}

/// Why a document was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("invalid config:\n{0}")]
    Invalid(FieldErrors),
}

/// Every rule a document breaks, each with its field path.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldErrors(Vec<FieldError>);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

// === impl FieldErrors ===

impl FieldErrors {
    pub fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            path: path.into(),
            message: message.into(),
        });
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = &FieldError> {
        self.0.iter()
    }

    pub fn into_result(self) -> Result<(), FieldErrors> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(self)
        }
    }
}

impl fmt::Display for FieldErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{}: {}", e.path, e.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for FieldErrors {}

/// Name of the ConfigMap the operator renders in each namespace with policies, and that
/// sidecars in `--config-source kubernetes` mode watch.
pub const CONFIG_MAP: &str = "detour-config";
/// Key of the config document in that ConfigMap.
pub const CONFIG_KEY: &str = "config.yaml";

// === impl Config ===

impl Config {
    /// An empty document of the current version.
    pub fn empty() -> Self {
        Config {
            api_version: API_VERSION.to_string(),
            kind: KIND.to_string(),
            upstreams: Vec::new(),
        }
    }

    /// Parses YAML or JSON (JSON is YAML) and validates it.
    pub fn from_str_validated(text: &str) -> Result<Self, ConfigError> {
        // Fields the schema does not know (typos such as `retires:`) are reported, not ignored.
        let mut unknown = Vec::new();
        let cfg = parse_with_paths(text, &mut unknown)?;
        let mut errs = FieldErrors::default();
        for path in unknown {
            errs.push(path, "unknown field");
        }
        cfg.validate_into(&mut errs);
        errs.into_result().map_err(ConfigError::Invalid)?;
        Ok(cfg)
    }

    /// Reads and validates a file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_str_validated(&text)
    }

    pub fn validate(&self) -> Result<(), FieldErrors> {
        let mut errs = FieldErrors::default();
        self.validate_into(&mut errs);
        errs.into_result()
    }

    fn validate_into(&self, errs: &mut FieldErrors) {
        if self.api_version != API_VERSION {
            errs.push(
                "apiVersion",
                format!("must be {API_VERSION:?}, got {:?}", self.api_version),
            );
        }
        if self.kind != KIND {
            errs.push("kind", format!("must be {KIND:?}, got {:?}", self.kind));
        }
        let mut names = BTreeMap::new();
        let mut listens: BTreeMap<SocketAddr, Vec<usize>> = BTreeMap::new();
        for (i, u) in self.upstreams.iter().enumerate() {
            let p = format!("upstreams[{i}]");
            if !valid_name(&u.name) {
                errs.push(
                    format!("{p}.name"),
                    "must be 1-253 characters of a-z, A-Z, 0-9, '-', '.', '_', '/', starting with a letter or digit",
                );
            } else if let Some(j) = names.insert(u.name.as_str(), i) {
                errs.push(
                    format!("{p}.name"),
                    format!("duplicates upstreams[{j}].name"),
                );
            }
            match u.listen.parse::<SocketAddr>() {
                Err(_) => errs.push(
                    format!("{p}.listen"),
                    format!("must be ip:port, got {:?}", u.listen),
                ),
                // Port 0 (any free port, used by tests and the demo) never collides.
                Ok(a) if a.port() == 0 => {}
                // Upstreams for workloads no pod can share (disjoint `workloadSelector`s) may
                // share an address: each sidecar binds only the ones that select its pod.
                Ok(a) => {
                    let before: &mut Vec<usize> = listens.entry(a).or_default();
                    let clash = before.iter().copied().find(|&j: &usize| {
                        !selector::disjoint(
                            self.upstreams[j].workload_selector.as_ref(),
                            u.workload_selector.as_ref(),
                        )
                    });
                    if let Some(j) = clash {
                        errs.push(
                            format!("{p}.listen"),
                            format!(
                                "{a} is already used by upstreams[{j}], and their workloadSelectors can select the same pod"
                            ),
                        );
                    }
                    before.push(i);
                }
            }
            if let Some(sel) = &u.workload_selector {
                selector::validate(sel, &format!("{p}.workloadSelector"), errs);
            }
            let mut addrs = BTreeMap::new();
            for (k, e) in u.endpoints.iter().enumerate() {
                match e.address.parse::<SocketAddr>() {
                    Err(_) => errs.push(
                        format!("{p}.endpoints[{k}].address"),
                        format!("must be ip:port, got {:?}", e.address),
                    ),
                    Ok(a) if a.port() == 0 => {
                        errs.push(format!("{p}.endpoints[{k}].address"), "port must not be 0")
                    }
                    Ok(a) => {
                        if let Some(j) = addrs.insert(a, k) {
                            errs.push(
                                format!("{p}.endpoints[{k}].address"),
                                format!("duplicates endpoints[{j}]"),
                            );
                        }
                    }
                }
            }
            u.policy.validate(&format!("{p}.policy"), errs);
        }
    }

    /// Short stable hash of the document's canonical JSON form (what `/config` and the
    /// `detour_config_info` metric show, and what the operator records in status).
    pub fn hash(&self) -> String {
        let json = serde_json::to_vec(self).expect("config serializes");
        let digest = Sha256::digest(&json);
        digest[..8].iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn to_yaml(&self) -> String {
        serde_saphyr::to_string(self).expect("config serializes")
    }
}

impl Endpoint {
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        self.address.parse().ok()
    }
}

impl Upstream {
    /// The validated listen address. Panics only if called on an unvalidated document.
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen.parse().expect("validated listen address")
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'/'))
}

/// How detour reads YAML (the config document, `detour inject`'s manifests): YAML 1.2 scalars
/// as the serde_yaml crate read them (`yes`, `0755` and `1_000` are strings, not a boolean and
/// numbers), `<<` an ordinary key, and no application tags (`!Ref`), which no Kubernetes object
/// has. Errors are plain messages: callers name the field or document themselves.
pub(crate) fn yaml_options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        strict_booleans: true,
        leading_zero_numbers_as_strings: true,
        underscored_numbers_as_strings: true,
        merge_keys: serde_saphyr::MergeKeyPolicy::AsOrdinary,
        reject_unsupported_tags: true,
        non_finite_float_policy: serde_saphyr::NonFiniteFloatPolicy::PassThrough,
        with_snippet: false,
        // `app:` and `app: null` as label values are the text, as serde_yaml read them.
        null_as_string: true,
        // Whole `kubectl get -A -o yaml` lists go through `detour inject`, and a config may
        // reuse one anchored policy for every upstream: serde-saphyr's defaults (250,000 nodes,
        // depth 64, at most 10 aliases per anchor) refuse both. These bounds still stop a
        // billion-laughs document.
        budget: Some(yaml_budget()),
    }
}

fn yaml_budget() -> serde_saphyr::Budget {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_nodes = 20_000_000;
    budget.max_events = 50_000_000;
    budget.max_depth = 128;
    budget.enforce_alias_anchor_ratio = false;
    budget
}

/// For a list or a section written as a key with no value (`endpoints:`, `retries:`): read it
/// as an empty list or as the section with its defaults, as if the key were left out (what
/// serde_yaml did, and what hand-written documents rely on).
pub(crate) mod null_as_empty {
    use serde::{de::value::MapDeserializer, Deserialize, Deserializer};

    /// `key:` with no value → an empty list.
    pub fn seq<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Vec<T>, D::Error> {
        Ok(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default())
    }

    /// `key:` with no value → the section read from an empty mapping (each field's default).
    pub fn section<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<T, D::Error> {
        match Option::<T>::deserialize(d)? {
            Some(v) => Ok(v),
            None => T::deserialize(MapDeserializer::<_, D::Error>::new(std::iter::empty::<(
                &str,
                &str,
            )>())),
        }
    }
}

/// Deserializes a document, recording the paths of fields the schema ignores in `unknown`; a
/// type error names the field it is in.
fn parse_with_paths(text: &str, unknown: &mut Vec<String>) -> Result<Config, ConfigError> {
    let mut path = String::new();
    let res = serde_saphyr::with_deserializer_from_str_with_options(text, yaml_options(), |de| {
        let mut on_unknown = |p: serde_ignored::Path<'_>| unknown.push(ignored_path(&p));
        let ignored = serde_ignored::Deserializer::new(de, &mut on_unknown);
        serde_path_to_error::deserialize(ignored).map_err(|e| {
            path = e.path().to_string();
            e.into_inner()
        })
    });
    res.map_err(|e| ConfigError::Parse {
        path: if path.is_empty() || path == "." {
            "document".into()
        } else {
            path
        },
        message: parse_message(&e, text),
    })
}

/// serde-saphyr says only `invalid u32` when a scalar is not of the field's type; the message
/// names the scalar as serde's own type errors do (`invalid type: "many", expected u32`).
fn parse_message(e: &serde_saphyr::Error, text: &str) -> String {
    let serde_saphyr::Error::InvalidScalar { ty, location } = e else {
        return e.to_string();
    };
    let span = location.span();
    let scalar = span
        .byte_offset()
        .zip(span.byte_len())
        .and_then(|(at, len)| text.get(usize::try_from(at).ok()?..usize::try_from(at + len).ok()?));
    match scalar {
        Some(s) => format!(
            "invalid type: {:?}, expected {ty} at line {}, column {}",
            s.trim_matches(['"', '\'']),
            location.line(),
            location.column()
        ),
        None => format!("invalid type: expected {ty}"),
    }
}

/// Renders a serde_ignored path the way validation errors spell paths (`upstreams[0].policy`).
fn ignored_path(p: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match p {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", ignored_path(parent)),
        Path::Map { parent, key } => {
            let base = ignored_path(parent);
            if base.is_empty() {
                key.clone()
            } else {
                format!("{base}.{key}")
            }
        }
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => ignored_path(parent),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
apiVersion: detour.dev/v1alpha1
kind: SidecarConfig
upstreams:
  - name: shop/payments
    listen: 127.0.0.1:18080
    endpoints:
      - address: 10.0.0.1:8080
        pod: payments-0
      - address: "[fd00::2]:8080"
        state: terminating
    policy:
      retries:
        attempts: 3
        perTryTimeout: 250ms
      healthCheck:
        protocol: tcp
"#;

    #[test]
    fn parses_and_applies_defaults() {
        let cfg = Config::from_str_validated(GOOD).unwrap();
        let u = &cfg.upstreams[0];
        assert_eq!(u.endpoints[1].state, EndpointState::Terminating);
        assert_eq!(u.endpoints[0].state, EndpointState::Ready);
        assert_eq!(u.policy.retries.attempts, 3);
        assert_eq!(u.policy.retries.per_try_timeout, Duration::from_millis(250));
        assert_eq!(u.policy.timeouts, Timeouts::default());
        assert_eq!(u.policy.health_check.protocol, HealthCheckProtocol::Tcp);
    }

    fn parsed(text: &str) -> Config {
        parse_with_paths(text, &mut Vec::new()).unwrap()
    }

    #[test]
    fn a_key_with_no_value_reads_as_left_out() {
        let empty = "apiVersion: detour.dev/v1alpha1\nkind: SidecarConfig\nupstreams:\n";
        assert!(parsed(empty).upstreams.is_empty());
        let given = |body: &str| {
            format!("apiVersion: detour.dev/v1alpha1\nkind: SidecarConfig\nupstreams:\n  - name: a\n    listen: 127.0.0.1:1\n{body}")
        };
        let blank = parsed(&given("    endpoints:\n    policy:\n"));
        let left_out = parsed(&given(""));
        assert_eq!(blank, left_out);
        let sections = parsed(&given(
            "    policy:\n      healthCheck:\n      outlierDetection:\n      retries:\n      timeouts:\n",
        ));
        assert_eq!(sections, left_out);
        let lists = parsed(&given(
            "    policy:\n      retries:\n        on:\n      healthCheck:\n        expectedStatuses:\n",
        ));
        assert!(lists.upstreams[0].policy.retries.on.is_empty());
        assert!(lists.upstreams[0]
            .policy
            .health_check
            .expected_statuses
            .is_empty());
    }

    #[test]
    fn blank_and_null_label_values_are_text_and_anchors_may_be_reused() {
        let mut text = String::from(
            "apiVersion: detour.dev/v1alpha1\nkind: SidecarConfig\nupstreams:\n  - name: u0\n    listen: 127.0.0.1:1000\n    workloadSelector:\n      matchLabels:\n        app:\n        tier: null\n    policy: &std\n      retries:\n        attempts: 1\n",
        );
        for i in 1..150 {
            text.push_str(&format!(
                "  - name: u{i}\n    listen: 127.0.0.1:{}\n    policy: *std\n",
                1000 + i
            ));
        }
        let cfg = parsed(&text);
        let selector = cfg.upstreams[0].workload_selector.as_ref().unwrap();
        let labels = selector.match_labels.as_ref().unwrap();
        assert_eq!(labels["app"], "");
        assert_eq!(labels["tier"], "null");
        assert_eq!(cfg.upstreams.len(), 150);
        assert!(cfg.upstreams.iter().all(|u| u.policy.retries.attempts == 1));
    }

    #[test]
    fn json_is_accepted_and_round_trips() {
        let cfg = Config::from_str_validated(GOOD).unwrap();
        let json = serde_json::to_string(&cfg).unwrap();
        let back = Config::from_str_validated(&json).unwrap();
        assert_eq!(cfg, back);
        assert_eq!(cfg.hash(), back.hash());
        assert_eq!(cfg.hash().len(), 16);
    }

    #[test]
    fn type_errors_name_the_field() {
        let bad = GOOD.replace("attempts: 3", "attempts: many");
        let e = Config::from_str_validated(&bad).unwrap_err().to_string();
        assert!(
            e.starts_with("upstreams[0].policy.retries.attempts: "),
            "{e}"
        );
        let bad = GOOD.replace("250ms", "quarter");
        let e = Config::from_str_validated(&bad).unwrap_err().to_string();
        assert!(
            e.contains("upstreams[0].policy.retries.perTryTimeout"),
            "{e}"
        );
        assert!(e.contains("\"quarter\""), "{e}");
    }

    #[test]
    fn parse_errors_name_the_field_once() {
        let bad = GOOD.replace("attempts: 3", "attempts: many");
        let e = Config::from_str_validated(&bad).unwrap_err().to_string();
        assert_eq!(
            e.matches("upstreams[0].policy.retries.attempts").count(),
            1,
            "{e}"
        );
        assert!(e.contains("invalid type"), "{e}");
    }

    #[test]
    fn unknown_fields_are_errors_with_paths() {
        let bad = GOOD.replace(
            "      retries:",
            "      retires:\n        attempts: 1\n      retries:",
        );
        let e = Config::from_str_validated(&bad).unwrap_err().to_string();
        assert!(
            e.contains("upstreams[0].policy.retires: unknown field"),
            "{e}"
        );
    }

    #[test]
    fn all_problems_are_reported_together() {
        let bad = r#"
apiVersion: detour.dev/v2
kind: SidecarConfig
upstreams:
  - name: a
    listen: 127.0.0.1:1
    endpoints: [{address: "nope"}, {address: "127.0.0.1:0"}]
  - name: a
    listen: 127.0.0.1:1
    endpoints: [{address: "127.0.0.1:5"}, {address: "127.0.0.1:5"}]
    policy: {retries: {attempts: 11}}
"#;
        let e = Config::from_str_validated(bad).unwrap_err();
        let ConfigError::Invalid(errs) = e else {
            panic!("{e}")
        };
        let text = errs.to_string();
        for want in [
            "apiVersion: must be \"detour.dev/v1alpha1\"",
            "upstreams[0].endpoints[0].address: must be ip:port",
            "upstreams[0].endpoints[1].address: port must not be 0",
            "upstreams[1].name: duplicates upstreams[0].name",
            "upstreams[1].listen: 127.0.0.1:1 is already used by upstreams[0]",
            "upstreams[1].endpoints[1].address: duplicates endpoints[0]",
            "upstreams[1].policy.retries.attempts: must be 0..=10, got 11",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        assert_eq!(errs.len(), 7, "{text}");
    }

    #[test]
    fn a_listen_address_is_shared_only_by_disjoint_workloads() {
        let doc = |second: &str| {
            format!(
                r#"
apiVersion: detour.dev/v1alpha1
kind: SidecarConfig
upstreams:
  - name: a
    listen: 127.0.0.1:18080
    workloadSelector: {{matchLabels: {{app: web}}}}
  - name: b
    listen: 127.0.0.1:18080
    workloadSelector: {second}
"#
            )
        };
        Config::from_str_validated(&doc("{matchLabels: {app: api}}")).unwrap();
        Config::from_str_validated(&doc(
            "{matchExpressions: [{key: app, operator: NotIn, values: [web]}]}",
        ))
        .unwrap();
        for overlapping in [
            "{matchLabels: {tier: edge}}",
            "{matchExpressions: [{key: app, operator: In, values: [web, api]}]}",
            "{}",
        ] {
            let e = Config::from_str_validated(&doc(overlapping)).unwrap_err();
            assert!(
                e.to_string().contains(
                    "upstreams[1].listen: 127.0.0.1:18080 is already used by upstreams[0], and their workloadSelectors can select the same pod"
                ),
                "{overlapping}: {e}"
            );
        }
        let e = Config::from_str_validated(&doc("{matchExpressions: [{key: app, operator: Has}]}"))
            .unwrap_err();
        assert!(
            e.to_string().contains(
                "upstreams[1].workloadSelector.matchExpressions[0].operator: must be one of"
            ),
            "{e}"
        );
    }

    #[test]
    fn hash_changes_with_content() {
        let a = Config::from_str_validated(GOOD).unwrap();
        let mut b = a.clone();
        b.upstreams[0].endpoints.pop();
        assert_ne!(a.hash(), b.hash());
    }
}
